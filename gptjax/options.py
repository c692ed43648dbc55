"""How a model runs: precision, attention implementation, scan/remat, vocab padding, kernel layout.

`GPTConfig` says what a model is and is saved with a run; `Options` are chosen per command and never
stored in a checkpoint, so any checkpoint trains, resumes and decodes under any options. Checkpoints hold
params in one canonical layout (per-layer `h_0..`, kernels (in, out), vocab unpadded); `layout.to_layout` /
`layout.to_canonical` convert to and from an `Options`' layout. Only `dtype` and `matmul_precision`
change the math.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Self

import jax

DTYPES = ("float32", "bfloat16", "float16")
ATTN_IMPLS = ("auto", "xla", "cudnn", "einsum")
# what the backward pass recomputes instead of storing (jax.checkpoint policies, see model.REMAT_POLICIES)
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
LINEAR_LAYOUTS = ("in_out", "out_in")
MATVECS = ("xla", "kernel")
# what the model's weight matmuls multiply: float32, or operands rounded to bfloat16 (accumulated in float32)
MATMUL_PRECISIONS = ("float32", "bfloat16")
# the weights decoding reads (generate.decoding_weights, --weight-dtype)
WEIGHT_DTYPES = ("float32", "bfloat16", "int8")
# The keys GPTConfig carried before Options existed: old run directories' config.json still hold them
LEGACY_KEYS = ("dtype", "matmul_precision", "attn_impl", "scan_layers", "scan_unroll", "remat", "vocab_multiple",
               "linear_layout", "matvec")


class Settings:
    """replace / to_dict / from_dict of a frozen settings dataclass (Options, config.GPTConfig)."""

    def replace(self, **overrides: Any) -> Self:
        """dataclasses.replace, with a clear error for unknown keys."""
        names = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            legacy = sorted(set(unknown) & set(LEGACY_KEYS))  # only a GPTConfig can lack these
            hint = f" ({legacy}: how the model runs, now gptjax.options.Options)" if legacy else ""
            raise ValueError(f"unknown {type(self).__name__} keys {unknown}{hint}; valid keys: {names}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        return cls().replace(**d)


@dataclass(frozen=True)
class Options(Settings):
    # compute dtype; params stay float32, softmax, logits and loss float32
    dtype: str = "float32"
    # "bfloat16": every weight matmul (not attention's) rounds its operands to bfloat16 and accumulates
    # and returns float32, also in the backward pass (torch's "medium" float32 matmul precision, which
    # XLA:CPU does not implement); the rest of the step stays in `dtype`
    matmul_precision: str = "float32"
    attn_impl: str = "auto"  # auto: cuDNN flash attention on NVIDIA GPUs in half precision, XLA elsewhere
    # one nn.scan over the blocks, params stacked under "h"; compiles one block instead of n_layers.
    # scan_unroll: blocks per scan iteration
    scan_layers: bool = False
    scan_unroll: int = 1
    remat: str = "none"  # recompute activations in the backward pass: none|full|dots|dots_no_batch
    # > 1 pads wte/lm_head rows to a multiple of this (64: 50257 -> 50304, nanoGPT's trick); the
    # padded logits are sliced off inside the model, so loss and sampling never see them
    vocab_multiple: int = 1
    # how block/LM-head kernels are stored: "in_out" (Flax's and OpenAI's Conv1D) or "out_in" (PyTorch's
    # Linear), which reads faster on CPU (gptjax.cpu.fastest_linear_layout)
    linear_layout: str = "in_out"
    # "kernel": products of at most 8 rows (decoding) with (out, in) kernels and the tied head run
    # gptjax's C++ matrix-vector kernel on CPU (gptjax.cpu.kernel; XLA's dot elsewhere)
    matvec: str = "xla"
    # > 0: the LM head and cross-entropy run over chunks of this many positions, each recomputed in the
    # backward pass, so the (B, T, V) float32 logits never exist at once (GPT(..., targets_BT=...))
    loss_chunk: int = 0
    # gptjax.cpu.grad_barrier before every block: stops XLA:CPU fusing the backward pass across blocks.
    # On for CPU training by `for_backend()`; off elsewhere (on a GPU it would sync with the host)
    grad_barrier: bool = False

    def __post_init__(self):
        for name, allowed in (("dtype", DTYPES), ("attn_impl", ATTN_IMPLS), ("linear_layout", LINEAR_LAYOUTS),
                              ("matvec", MATVECS), ("matmul_precision", MATMUL_PRECISIONS),
                              ("remat", REMAT_POLICIES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"Options.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name, low, note in (("scan_unroll", 1, ""), ("vocab_multiple", 1, ""),
                                ("loss_chunk", 0, " (0: the whole sequence)")):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"Options.{name} must be an integer >= {low}{note}, got {value!r}")
        for name in ("scan_layers", "grad_barrier"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Options.{name} must be True or False, got {getattr(self, name)!r}")

    @classmethod
    def for_backend(cls, backend: str | None = None, **overrides: Any) -> "Options":
        """Options for running on `backend` (default: JAX's default backend, asked now, not at trace
        time): the gradient barrier on for "cpu" (keeps its train step fast), off elsewhere."""
        return cls(**{"grad_barrier": (jax.default_backend() if backend is None else backend) == "cpu", **overrides})

    def padded_vocab_size(self, vocab_size: int) -> int:
        """Rows of wte (and columns of lm_head): vocab_size rounded up to vocab_multiple."""
        return -(-vocab_size // self.vocab_multiple) * self.vocab_multiple

    @property
    def canonical_layout(self) -> bool:
        """Whether params in this layout are already the canonical ones (nothing to convert)."""
        return not self.scan_layers and self.vocab_multiple == 1 and self.linear_layout == "in_out"
