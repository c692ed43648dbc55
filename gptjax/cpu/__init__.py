"""CPU-only speed code, behind the one hook the model calls: `dense` (a projection), `Embed` (the token
table, int8 for decoding), `tied_head` (logits from wte) and `block_input` (the gradient barrier).
Each takes the run's `Options`; none reads the platform at trace time.

- `linear`: kernels stored (out, in) (`LinearOutIn`, `product_out_in`), bfloat16-operand products
  (`bf16_product`), weight-only int8 for decoding (`quantize_weights`)
- `matvec` (+ `matvec.cc`): the C++ XLA FFI matrix-vector kernel of CPU decoding, built on first use
- `barrier`: `grad_barrier`, which stops XLA:CPU fusing the backward pass across blocks
- `flags`: the XLA:CPU flags `gptjax.runtime.setup` sets before JAX starts
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptjax.cpu import matvec
from gptjax.cpu.barrier import grad_barrier
from gptjax.cpu.linear import LinearOutIn, bf16_product, dense, product_out_in, quantize_weights
from gptjax.options import Options

__all__ = ["dense", "Embed", "tied_head", "block_input", "fastest_linear_layout", "kernel_available", "grad_barrier",
           "bf16_product", "product_out_in", "LinearOutIn", "quantize_weights", "quantize_int8"]

quantize_int8 = matvec.quantize_int8


class Embed(nn.Module):
    """nn.Embed's float32 table and lookup (same param, same init), which may also be weight-only int8:
    an int8 "embedding" with a float32 "embedding_scale" per row (`quantize_weights`), for the tied head."""
    num_embeddings: int
    features: int
    embedding_init: Any = nn.initializers.normal(1.0)

    def setup(self):
        self.embedding = self.param("embedding", self.embedding_init, (self.num_embeddings, self.features), jnp.float32)
        has_scale = self.has_variable("params", "embedding_scale")
        self.scale = self.get_variable("params", "embedding_scale") if has_scale else None

    def __call__(self, idx: jax.Array) -> jax.Array:
        x = jnp.take(self.embedding, idx, axis=0).astype(jnp.float32)
        return x if self.scale is None else x * jnp.take(self.scale, idx, axis=0)[..., None]


def tied_head(x_BTD: jax.Array, wte: Embed, opts: Options) -> jax.Array:
    """float32 logits x @ wte.T (GPT-2's tied head), multiplied in opts.dtype."""
    return product_out_in(x_BTD, wte.embedding, jnp.dtype(opts.dtype), f32_out=True, matvec=opts.matvec,
                          scale_O=wte.scale, matmul_precision=opts.matmul_precision)


def block_input(x_BTD: jax.Array, opts: Options) -> jax.Array:
    """What a block reads: the residual stream, behind `grad_barrier` when opts.grad_barrier."""
    return grad_barrier(x_BTD) if opts.grad_barrier else x_BTD


def fastest_linear_layout() -> str:
    """The kernel layout that runs faster on JAX's backend, asked when options are built: "out_in" on CPU
    (experiments/decode_layout_cpu.py, experiments/cpu_train_apart.py), "in_out" elsewhere."""
    return "out_in" if jax.default_backend() == "cpu" else "in_out"


def kernel_available() -> bool:
    """Whether the C++ matvec kernel is built and registered (`matvec.available`)."""
    return matvec.available()
