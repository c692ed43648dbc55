"""Causal multi-head attention: the production kernel the model uses, and its einsum reference.

Shapes: B batch, T query time, S key time, H heads, K head dim.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def default_impl() -> str:
    """cuDNN's fused kernel on NVIDIA GPUs, XLA everywhere else."""
    return "cudnn" if jax.default_backend() == "gpu" else "xla"


def causal_attention_einsum(
    q_BTHK: jax.Array,
    k_BSHK: jax.Array,
    v_BSHK: jax.Array,
    *,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    q_offset: int | jax.Array = 0,
) -> jax.Array:
    """Reference attention; the only path that supports dropout on the attention weights.

    `q_offset` is the absolute position of q's first row (non-zero when decoding with a cache).
    """
    T, S, K = q_BTHK.shape[1], k_BSHK.shape[1], q_BTHK.shape[-1]
    att_BHTS = jnp.einsum("bthk,bshk->bhts", q_BTHK, k_BSHK).astype(jnp.float32) / jnp.sqrt(K).astype(jnp.float32)
    causal_TS = (jnp.arange(T)[:, None] + q_offset) >= jnp.arange(S)[None, :]
    att_BHTS = jnp.where(causal_TS, att_BHTS, jnp.finfo(jnp.float32).min)
    att_BHTS = jax.nn.softmax(att_BHTS, axis=-1)
    if dropout_rate > 0.0 and dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, att_BHTS.shape)
        att_BHTS = jnp.where(keep, att_BHTS / (1.0 - dropout_rate), 0.0)
    return jnp.einsum("bhts,bshk->bthk", att_BHTS.astype(v_BSHK.dtype), v_BSHK)


def causal_attention(
    q_BTHK: jax.Array,
    k_BTHK: jax.Array,
    v_BTHK: jax.Array,
    *,
    impl: str = "auto",
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """Fused causal attention; falls back to the einsum reference when attention dropout is active."""
    if (dropout_rate > 0.0 and dropout_rng is not None) or impl == "einsum":
        return causal_attention_einsum(q_BTHK, k_BTHK, v_BTHK, dropout_rate=dropout_rate, dropout_rng=dropout_rng)
    if impl == "auto":
        impl = default_impl()
    if impl == "cudnn" and (q_BTHK.dtype == jnp.float32):
        impl = "xla"  # cuDNN flash attention needs half precision
    return jax.nn.dot_product_attention(q_BTHK, k_BTHK, v_BTHK, is_causal=True, implementation=impl)
