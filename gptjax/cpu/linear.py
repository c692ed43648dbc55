"""The projections' CPU speed paths: kernels stored (out, in), bfloat16-operand products with float32
accumulation (and their backward pass), the C++ matvec for decoding, and weight-only int8 for decoding.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptjax.config import GPTConfig
from gptjax.cpu import matvec as cpu_matvec
from gptjax.options import Options


def _transposed(a: jax.Array) -> jax.Array:
    """a.T of a 2-D array, written so that XLA makes the copy instead of folding the transpose into the next dot:
    XLA:CPU runs a bfloat16 product that contracts the leading axis of both operands (a weight gradient,
    x.T @ g) on its slow float32 path, and a transposed copy times the other on AMX, several times faster
    (experiments/cpu_matmul_flags.py)."""
    return jnp.swapaxes(a.reshape(*a.shape, 1), 0, 2)[0]


def _bf16_dot(a: jax.Array, b: jax.Array, a_axis: int, b_axis: int) -> jax.Array:
    bf16 = jnp.bfloat16
    return jax.lax.dot_general(a.astype(bf16), b.astype(bf16), (((a_axis,), (b_axis,)), ((), ())),
                               preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def bf16_product(x_BTI: jax.Array, w: jax.Array, w_in_axis: int) -> jax.Array:
    """x (..., in) @ w with both rounded to bfloat16, accumulated and returned in float32
    (Options.matmul_precision="bfloat16"); w is (in, out) for w_in_axis=0, (out, in) for 1. The backward
    pass rounds the output gradient to bfloat16 too and returns float32 gradients."""
    return _bf16_dot(x_BTI, w, x_BTI.ndim - 1, w_in_axis)


def _bf16_product_fwd(x_BTI, w, w_in_axis):
    xb, wb = x_BTI.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    # the bfloat16 copies are the residuals: half the bytes of float32 activations
    dtypes = jnp.zeros((0,), x_BTI.dtype), jnp.zeros((0,), w.dtype)  # the gradients' dtypes, as arrays
    return _bf16_dot(xb, wb, x_BTI.ndim - 1, w_in_axis), (xb, wb, dtypes)


def _bf16_product_bwd(w_in_axis, res, g_BTO):
    xb, wb, (x_like, w_like) = res
    gb = g_BTO.astype(jnp.bfloat16)
    dx_BTI = _bf16_dot(gb, wb, gb.ndim - 1, 1 - w_in_axis).astype(x_like.dtype)
    g_MO, x_MI = gb.reshape(-1, gb.shape[-1]), xb.reshape(-1, xb.shape[-1])  # M: every token
    # one operand transposed, so the product is a plain (O, M) @ (M, I) or (I, M) @ (M, O) whose result is
    # already in the kernel's layout (no transpose of the weight-sized gradient)
    rows, cols = (g_MO, x_MI) if w_in_axis == 1 else (x_MI, g_MO)
    dw = _bf16_dot(_transposed(rows), cols, 1, 0)
    return dx_BTI, dw.astype(w_like.dtype)


bf16_product.defvjp(_bf16_product_fwd, _bf16_product_bwd)


def _bf16_dot_general_in_out(x, w_IO, dimension_numbers, precision=None, preferred_element_type=None):
    # nn.Dense's dot_general hook: it always contracts x's last axis with the kernel's first
    assert dimension_numbers == (((x.ndim - 1,), (0,)), ((), ())), dimension_numbers
    return bf16_product(x, w_IO, 0)


def product_out_in(x_BTI: jax.Array, w_OI: jax.Array, dtype: Any, f32_out: bool, matvec: str,
                   scale_O: jax.Array | None = None, matmul_precision: str = "float32") -> jax.Array:
    """x (..., in) times an (out, in) kernel in the compute `dtype` (float32 result with `f32_out`).

    matvec="kernel": few-row products (decoding) go to gptjax.cpu.matvec with the weights as stored
    (bfloat16 ones are widened inside the kernel, exactly as astype would), accumulated in float32.
    int8 weights (`quantize_weights`) come with `scale_O`, one scale per out row: y = (x @ w.T) * scale.
    matmul_precision="bfloat16": `bf16_product` (float32 weights only).
    """
    x_BTI = x_BTI.astype(dtype)
    if matvec == "kernel" and cpu_matvec.applies(x_BTI, w_OI):
        y_BTO = cpu_matvec.matvec(x_BTI, w_OI, scale_O)
    elif matmul_precision == "bfloat16" and scale_O is None:
        y_BTO = bf16_product(x_BTI, w_OI, 1)
    else:
        y_BTO = jnp.einsum("...i,oi->...o", x_BTI, w_OI.astype(dtype),
                           preferred_element_type=jnp.float32 if f32_out else None)
        return y_BTO if scale_O is None else y_BTO * scale_O.astype(y_BTO.dtype)
    return y_BTO if f32_out else y_BTO.astype(dtype)


def dense(opts: Options, features: int, name: str, *, use_bias: bool = True, f32_out: bool = False,
          dtype: Any = None, **inits) -> nn.Module:
    """The Flax module of one projection (..., in) -> (..., features), params float32, laid out and multiplied
    as `opts` say (in_out: nn.Dense; out_in: `LinearOutIn`; bfloat16 operands; the C++ matvec), computed in
    `dtype` (default opts.dtype), float32 out with `f32_out`; `inits`: kernel_init / bias_init."""
    dtype = jnp.dtype(dtype or opts.dtype)
    if opts.linear_layout == "out_in":
        return LinearOutIn(features, use_bias=use_bias, dtype=dtype, f32_out=f32_out, name=name, matvec=opts.matvec,
                           matmul_precision=opts.matmul_precision, **inits)
    # f32_out: multiply in the compute dtype (bfloat16 tensor cores on a GPU), accumulate and return float32
    dot_general = functools.partial(jax.lax.dot_general, preferred_element_type=jnp.float32) if f32_out else None
    if opts.matmul_precision == "bfloat16":
        dot_general = _bf16_dot_general_in_out
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name,
                    dot_general=dot_general, **inits)


class LinearOutIn(nn.Module):
    """nn.Dense with its kernel stored (out, in), PyTorch's Linear layout (same init, same math), whose rows
    XLA:CPU's matrix-vector product (decoding one token) reads contiguously (experiments/decode_layout_cpu.py)."""
    features: int
    use_bias: bool = True
    dtype: Any = jnp.float32
    f32_out: bool = False
    matvec: str = "xla"  # "kernel": few-row products through gptjax.cpu.matvec (Options.matvec)
    matmul_precision: str = "float32"  # Options.matmul_precision
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self, x_BTI: jax.Array) -> jax.Array:
        init = self.kernel_init
        w_OI = self.param("kernel", lambda key, shape: init(key, shape[::-1], jnp.float32).T,
                          (self.features, x_BTI.shape[-1]))
        scale_O = self.get_variable("params", "kernel_scale") if self.has_variable("params", "kernel_scale") else None
        y_BTO = product_out_in(x_BTI, w_OI, self.dtype, self.f32_out, self.matvec, scale_O, self.matmul_precision)
        if self.use_bias:
            y_BTO = y_BTO + self.param("bias", self.bias_init, (self.features,), jnp.float32).astype(y_BTO.dtype)
        return y_BTO


def quantize_weights(params: dict, cfg: GPTConfig, opts: Options) -> dict:
    """Weight-only int8 for decoding (not training): every matmul weight (block kernels, the LM head or the
    tied embedding) becomes int8 with a float32 scale per out row (`cpu_matvec.quantize_int8`), stored beside
    it as "kernel_scale" / "embedding_scale"; biases, layer norms and wpe stay as they are. Needs (out, in)
    kernels (opts.linear_layout == "out_in")."""
    if opts.linear_layout != "out_in":
        raise ValueError(f"int8 weights need (out, in) kernels, the options have linear_layout={opts.linear_layout!r}: "
                         f"convert first with layout.to_layout(layout.to_canonical(params, cfg, opts), cfg, "
                         f"opts.replace(linear_layout='out_in')) (generate.decoding_weights does this)")

    def walk(tree: dict, path: tuple) -> dict:
        out = {}
        for k, v in tree.items():
            if isinstance(v, dict):
                out[k] = walk(v, (*path, k))
            elif v.dtype != jnp.int8 and f"{k}_scale" not in tree and (  # not already quantized
                    (k == "kernel" and path[:1] != ("cls_head",))
                    or (k == "embedding" and path == ("wte",) and cfg.tie_embeddings and not cfg.n_classes)):
                out[k], out[f"{k}_scale"] = cpu_matvec.quantize_int8(v)
            else:
                out[k] = v
        return out

    return walk(params, ())
