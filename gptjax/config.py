"""GPTConfig with the book's keys, and the GPT-2 presets."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")
INITS = ("gpt2", "book")
ATTN_IMPLS = ("auto", "xla", "cudnn", "einsum")
# what the backward pass recomputes instead of storing (jax.checkpoint policies, see model.REMAT_POLICIES)
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
LINEAR_LAYOUTS = ("in_out", "out_in")
MATVECS = ("xla", "kernel")
# what the model's weight matmuls multiply: float32, or operands rounded to bfloat16 (accumulated in float32)
MATMUL_PRECISIONS = ("float32", "bfloat16")
# the weights decoding reads (generate.decoding_weights, --weight-dtype)
WEIGHT_DTYPES = ("float32", "bfloat16", "int8")


@dataclass(frozen=True)
class GPTConfig:
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
    dtype: str = "float32"  # compute dtype; params stay float32
    attn_impl: str = "auto"  # auto: cuDNN flash attention on NVIDIA GPUs in half precision, XLA elsewhere
    # Speed options; none changes the math (tests check each against the plain model).
    # scan_layers: one nn.scan over the blocks, params stacked under "h" (model.stack_layers converts);
    # compiles one block instead of n_layers. scan_unroll: blocks per scan iteration.
    scan_layers: bool = False
    scan_unroll: int = 1
    remat: str = "none"  # recompute activations in the backward pass: none|full|dots|dots_no_batch
    # > 1 pads wte/lm_head rows to a multiple of this (64: 50257 -> 50304, nanoGPT's trick); the
    # padded logits are sliced off inside the model, so loss and sampling never see them
    vocab_multiple: int = 1
    # how block/LM-head kernels are stored: "in_out" (Flax's and OpenAI's Conv1D) or "out_in" (PyTorch's
    # Linear). On CPU "out_in" decodes faster (rows read contiguously; gptjax.generate switches to it)
    # and trains faster (12% on a gpt2-small step; `gptjax pretrain` picks it there). Saved runs load
    # as "in_out" (checkpoint.load_run); model.set_linear_layout converts
    linear_layout: str = "in_out"
    # "kernel": products of at most 8 rows (decoding) with (out, in) kernels and the tied head run
    # gptjax's C++ matrix-vector kernel on CPU (gptjax.cpu_matvec; XLA's dot on other platforms),
    # 15% more tokens/s on two cores; gptjax.generate.decoding_model turns it on where it builds
    matvec: str = "xla"
    # "bfloat16": every weight matmul (not attention's) rounds its operands to bfloat16 and accumulates
    # and returns float32, also in the backward pass; the rest of the step stays in `dtype`. What
    # jax.default_matmul_precision("bfloat16") means on a TPU and torch's "medium" float32 matmul
    # precision, which XLA:CPU does not implement. On a CPU with AMX it halves a float32 train step
    # (experiments/cpu_train_matmul_bf16.py)
    matmul_precision: str = "float32"

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
        if self.dtype not in DTYPES:
            raise ValueError(f"GPTConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"GPTConfig.attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}")
        if self.linear_layout not in LINEAR_LAYOUTS:
            raise ValueError(f"GPTConfig.linear_layout must be one of {LINEAR_LAYOUTS}, got {self.linear_layout!r}")
        if self.matvec not in MATVECS:
            raise ValueError(f"GPTConfig.matvec must be one of {MATVECS}, got {self.matvec!r}")
        if self.matmul_precision not in MATMUL_PRECISIONS:
            raise ValueError(f"GPTConfig.matmul_precision must be one of {MATMUL_PRECISIONS}, got {self.matmul_precision!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"GPTConfig.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        for name in ("scan_unroll", "vocab_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be an integer >= 1, got {value!r}")

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @property
    def padded_vocab_size(self) -> int:
        """Rows of wte (and columns of lm_head): vocab_size rounded up to vocab_multiple."""
        m = self.vocab_multiple
        return -(-self.vocab_size // m) * m

    def replace(self, **overrides: Any) -> "GPTConfig":
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown GPTConfig keys {sorted(unknown)}; valid keys: {[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GPTConfig":
        return cls().replace(**d)


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
