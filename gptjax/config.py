"""GPTConfig: the architecture only (the book's keys plus tie_embeddings, n_classes, init), and the GPT-2
presets. How a model runs (precision, layouts, scan, ...) is gptjax.options.Options."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gptjax.options import LEGACY_KEYS, Settings

INITS = ("gpt2", "book")


@dataclass(frozen=True)
class GPTConfig(Settings):
    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.1
    qkv_bias: bool = False
    # The book's GPTModel has its own out_head; OpenAI's GPT-2 ties it to wte.
    tie_embeddings: bool = False
    # > 0 replaces the LM head by a classifier head (the book's chapter 6): Dense(emb_dim -> n_classes)
    n_classes: int = 0
    # "gpt2": normal(0.02) with scaled residual projections (GPT-2/nanoGPT); "book": PyTorch's defaults,
    # which the book's GPTModel gets (Embedding N(0,1), Linear U(+-1/sqrt(fan_in))) and its ch05 numbers need
    init: str = "gpt2"

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.emb_dim % self.n_heads:
            raise ValueError(
                f"GPTConfig.emb_dim={self.emb_dim} is not divisible by n_heads={self.n_heads}; "
                f"choose n_heads among {[h for h in range(1, self.emb_dim + 1) if self.emb_dim % h == 0][:12]}..."
            )
        if not isinstance(self.n_classes, int) or self.n_classes < 0 or self.n_classes == 1:
            raise ValueError(f"GPTConfig.n_classes must be 0 (language model) or >= 2, got {self.n_classes!r}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"GPTConfig.drop_rate must be in [0, 1), got {self.drop_rate!r}")
        if self.init not in INITS:
            raise ValueError(f"GPTConfig.init must be one of {INITS}, got {self.init!r}")

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GPTConfig":
        """From `to_dict`'s output, dropping the execution keys older runs stored here (now Options)."""
        return cls().replace(**{k: v for k, v in d.items() if k not in LEGACY_KEYS})


# The book's model settings (qkv_bias=False, untied head, dropout 0.1).
# OpenAI's released weights use qkv_bias=True and a tied head; gpt2_weights sets those.
PRESETS: dict[str, dict[str, int]] = {
    "gpt2-small": dict(emb_dim=768, n_layers=12, n_heads=12),
    "gpt2-medium": dict(emb_dim=1024, n_layers=24, n_heads=16),
    "gpt2-large": dict(emb_dim=1280, n_layers=36, n_heads=20),
    "gpt2-xl": dict(emb_dim=1600, n_layers=48, n_heads=25),
}
ALIASES = {"124M": "gpt2-small", "355M": "gpt2-medium", "774M": "gpt2-large", "1558M": "gpt2-xl"}


def get_config(name: str, **overrides: Any) -> GPTConfig:
    key = ALIASES.get(name, name)
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {list(PRESETS)} (or {list(ALIASES)})")
    return GPTConfig(**PRESETS[key]).replace(**overrides)
