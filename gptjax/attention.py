"""Causal multi-head attention: the production kernel the model uses, its einsum reference,
and the book's chapter-3 progression that leads up to them. T is the queries' time, S the keys'.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def _nvidia_compute_capability() -> float | None:
    dev = jax.devices()[0]
    try:  # compute_capability is set on CUDA devices only
        return float(dev.compute_capability) if dev.platform == "gpu" else None
    except (AttributeError, TypeError, ValueError):
        return None


def default_impl(dtype: jnp.dtype | None = None, head_dim: int | None = None) -> str:
    """cuDNN's fused flash attention on NVIDIA GPUs where it applies, XLA everywhere else.

    cuDNN needs Ampere or newer, half precision and a head dim that is a multiple of 8 up to 128;
    without `dtype`/`head_dim` only the device is checked.
    """
    cc = _nvidia_compute_capability()
    if cc is None or cc < 8.0:
        return "xla"
    half = dtype is None or jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if half and (head_dim is None or (head_dim % 8 == 0 and head_dim <= 128)) else "xla"


def dropout(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
    """Inverted dropout whose mask comes from XLA's RngBitGenerator, seeded by `rng`: one op whose bits are
    computed once and kept for the backward pass (with jax.random.bernoulli, XLA re-derives the mask there,
    fused into slow transposes on CPU)."""
    seed = jax.random.bits(rng, (4,), jnp.uint32)
    # ThreeFry, not the backend's default (Philox on CPU): faster on XLA:CPU, and the same masks everywhere
    _, bits = jax.lax.rng_bit_generator(seed, x.shape, dtype=jnp.uint32, algorithm=jax.lax.RandomAlgorithm.RNG_THREE_FRY)
    keep = bits >= jnp.uint32(min(round(rate * 2**32), 2**32 - 1))  # P(keep) = 1 - rate, to 2^-32
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def causal_attention_einsum(q_BTHK: jax.Array, k_BSHK: jax.Array, v_BSHK: jax.Array, *, dropout_rate: float = 0.0,
                            dropout_rng: jax.Array | None = None, q_offset: int | jax.Array = 0) -> jax.Array:
    """Reference attention; the only path that supports dropout on the attention weights.

    `q_offset` is the absolute position of q's first row: a scalar, or one per row (B,) when the
    rows of a batch sit at different positions (decoding prompts of different lengths with a KV
    cache). Keys at positions after a query's are masked, so unfilled cache slots never count.
    """
    T, S, K = q_BTHK.shape[1], k_BSHK.shape[1], q_BTHK.shape[-1]
    att_BHTS = jnp.einsum("bthk,bshk->bhts", q_BTHK, k_BSHK, preferred_element_type=jnp.float32) / jnp.sqrt(K).astype(jnp.float32)
    q_pos_BT = jnp.reshape(jnp.asarray(q_offset), (-1, 1)) + jnp.arange(T)[None, :]  # (1 or B, T)
    causal_B1TS = (q_pos_BT[:, None, :, None] >= jnp.arange(S)[None, None, None, :])
    att_BHTS = jnp.where(causal_B1TS, att_BHTS, jnp.finfo(jnp.float32).min)
    att_BHTS = jax.nn.softmax(att_BHTS, axis=-1)
    if dropout_rate > 0.0 and dropout_rng is not None:
        att_BHTS = dropout(att_BHTS, dropout_rate, dropout_rng)
    return jnp.einsum("bhts,bshk->bthk", att_BHTS.astype(v_BSHK.dtype), v_BSHK)


def cache_attention(q_BTHK: jax.Array, k_BTHK: jax.Array, v_BTHK: jax.Array, k_MKS: jax.Array, v_MSK: jax.Array,
                    pos: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Attention of T new tokens over a KV cache, after writing their keys/values to it: (y, k, v).

    The cache holds keys as (M, K, S) and values as (M, S, K), M = B * H: the operands of the two
    batched matmuls exactly as XLA:CPU's dot takes them (a (B, S, H, K) cache or 4-D head-major ones
    made XLA transpose or copy the whole cache of every layer at every token).

    `pos`: a scalar when every row's tokens start at the same slot (written with one in-place
    dynamic_update_slice; pos + T <= S), or (B,) per row: one token goes in through a one-hot select,
    several through a scatter that drops slots past S. Queries see the slots up to their own position,
    so stale or unfilled slots never count.
    """
    B, T, H, K = q_BTHK.shape
    S, pos = v_MSK.shape[1], jnp.asarray(pos)

    def heads(a: jax.Array) -> jax.Array:  # (B, T, H, K) -> (M, T, K)
        return a.transpose(0, 2, 1, 3).reshape(B * H, T, K)

    q_MTK, k_MTK, v_MTK = heads(q_BTHK), heads(k_BTHK).astype(k_MKS.dtype), heads(v_BTHK).astype(v_MSK.dtype)
    if pos.ndim == 0:
        k_MKS = jax.lax.dynamic_update_slice(k_MKS, k_MTK.transpose(0, 2, 1), (0, 0, pos))
        v_MSK = jax.lax.dynamic_update_slice(v_MSK, v_MTK, (0, pos, 0))
        pos_M = jnp.reshape(pos, (1,))
    else:
        pos_M = jnp.repeat(pos, H)
        if T == 1:
            hit_MS = pos_M[:, None] == jnp.arange(S)[None, :]
            k_MKS = jnp.where(hit_MS[:, None, :], k_MTK.transpose(0, 2, 1), k_MKS)
            v_MSK = jnp.where(hit_MS[:, :, None], v_MTK, v_MSK)
        else:
            rows_M1, slots_MT = jnp.arange(B * H)[:, None], pos_M[:, None] + jnp.arange(T)[None, :]
            k_MKS = k_MKS.at[rows_M1, :, slots_MT].set(k_MTK, mode="drop")
            v_MSK = v_MSK.at[rows_M1, slots_MT].set(v_MTK, mode="drop")
    att_MTS = jnp.einsum("mtk,mks->mts", q_MTK, k_MKS.astype(q_MTK.dtype),
                         preferred_element_type=jnp.float32) / jnp.sqrt(K).astype(jnp.float32)
    q_pos_MT = pos_M[:, None] + jnp.arange(T)[None, :]  # (M or 1, T)
    att_MTS = jnp.where(q_pos_MT[:, :, None] >= jnp.arange(S)[None, None, :], att_MTS, jnp.finfo(jnp.float32).min)
    att_MTS = jax.nn.softmax(att_MTS, axis=-1)
    y_MTK = jnp.einsum("mts,msk->mtk", att_MTS.astype(q_MTK.dtype), v_MSK.astype(q_MTK.dtype))
    return y_MTK.reshape(B, H, T, K).transpose(0, 2, 1, 3), k_MKS, v_MSK


def causal_attention(q_BTHK: jax.Array, k_BTHK: jax.Array, v_BTHK: jax.Array, *, impl: str = "auto",
                     dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None) -> jax.Array:
    """Fused causal attention; falls back to the einsum reference when attention dropout is active.

    impl: "auto" (cuDNN where `default_impl` says it applies, else XLA), "xla", "cudnn" (forced; float32
    inputs still go to XLA since cuDNN's flash kernel is half precision only) or "einsum".
    """
    if (dropout_rate > 0.0 and dropout_rng is not None) or impl == "einsum":
        return causal_attention_einsum(q_BTHK, k_BTHK, v_BTHK, dropout_rate=dropout_rate, dropout_rng=dropout_rng)
    if impl == "auto":
        impl = default_impl(q_BTHK.dtype, q_BTHK.shape[-1])
        if impl == "cudnn":
            try:  # cuDNN checks its shape/version limits while tracing; anything it declines runs on XLA
                return jax.nn.dot_product_attention(q_BTHK, k_BTHK, v_BTHK, is_causal=True, implementation="cudnn")
            except (ValueError, NotImplementedError, RuntimeError):
                impl = "xla"
    if impl == "cudnn" and q_BTHK.dtype == jnp.float32:
        impl = "xla"  # cuDNN flash attention needs half precision
    return jax.nn.dot_product_attention(q_BTHK, k_BTHK, v_BTHK, is_causal=True, implementation=impl)


# Chapter 3, step by step: readable references for teaching and tests, which check that each agrees with
# `causal_attention` above (what the model uses).


def simplified_self_attention(inputs_TD: jax.Array) -> jax.Array:
    """Section 3.3: no weights; each token's context vector mixes all tokens by dot-product similarity."""
    att_TT = inputs_TD @ inputs_TD.T
    w_TT = jax.nn.softmax(att_TT, axis=-1)
    return w_TT @ inputs_TD


class SelfAttentionV1(nn.Module):
    """Section 3.4: trainable (d_in, d_out) matrices and scaled dot-product attention, no mask."""
    d_out: int

    @nn.compact
    def __call__(self, x_TD: jax.Array) -> jax.Array:
        shape = (x_TD.shape[-1], self.d_out)
        init = nn.initializers.uniform(scale=1.0)  # the book's torch.rand
        q_TE, k_TE, v_TE = (x_TD @ self.param(name, init, shape) for name in ("W_query", "W_key", "W_value"))
        att_TT = q_TE @ k_TE.swapaxes(-1, -2)
        w_TT = jax.nn.softmax(att_TT / jnp.sqrt(k_TE.shape[-1]), axis=-1)
        return w_TT @ v_TE


def _qkv(x: jax.Array, d_out: int, bias: bool) -> list[jax.Array]:
    """The query, key and value projections of x: Dense layers W_query, W_key, W_value of the calling module."""
    return [nn.Dense(d_out, use_bias=bias, name=name)(x) for name in ("W_query", "W_key", "W_value")]


class SelfAttentionV2(nn.Module):
    """SelfAttentionV1 with Dense layers (better init, optional bias); same math."""
    d_out: int
    qkv_bias: bool = False

    @nn.compact
    def __call__(self, x_TD: jax.Array) -> jax.Array:
        q_TE, k_TE, v_TE = _qkv(x_TD, self.d_out, self.qkv_bias)
        att_TT = q_TE @ k_TE.swapaxes(-1, -2)
        w_TT = jax.nn.softmax(att_TT / jnp.sqrt(k_TE.shape[-1]), axis=-1)
        return w_TT @ v_TE


def _check_length(T: int, context_length: int) -> None:
    if T > context_length:
        raise ValueError(f"input has {T} tokens but context_length is {context_length}; "
                         f"crop the input to its last {context_length} tokens")


class CausalAttention(nn.Module):
    """Section 3.5: SelfAttentionV2 on batches, future keys masked with -inf, dropout on the weights
    (sown after dropout as intermediates/attn_weights)."""
    d_out: int
    context_length: int
    drop_rate: float
    qkv_bias: bool = False

    @nn.compact
    def __call__(self, x_BTD: jax.Array, deterministic: bool = True) -> jax.Array:
        T = x_BTD.shape[-2]
        _check_length(T, self.context_length)
        q_BTE, k_BTE, v_BTE = _qkv(x_BTD, self.d_out, self.qkv_bias)
        att_BTT = q_BTE @ k_BTE.swapaxes(-1, -2) / jnp.sqrt(self.d_out)
        # -inf (not a zeroed weight) so the softmax renormalises over the visible keys only
        att_BTT = jnp.where(jnp.tril(jnp.ones((T, T), dtype=bool)), att_BTT, -jnp.inf)
        w_BTT = jax.nn.softmax(att_BTT, axis=-1)
        w_BTT = nn.Dropout(self.drop_rate)(w_BTT, deterministic=deterministic)
        self.sow("intermediates", "attn_weights", w_BTT)
        return w_BTT @ v_BTE


class MultiHeadAttentionWrapper(nn.Module):
    """Section 3.6.1: `num_heads` independent CausalAttention heads, outputs concatenated (num_heads * d_out)."""
    d_out: int
    context_length: int
    drop_rate: float
    num_heads: int
    qkv_bias: bool = False

    @nn.compact
    def __call__(self, x_BTD: jax.Array, deterministic: bool = True) -> jax.Array:
        heads = [CausalAttention(self.d_out, self.context_length, self.drop_rate, self.qkv_bias, name=f"head_{h}")
                 for h in range(self.num_heads)]
        return jnp.concatenate([head(x_BTD, deterministic) for head in heads], axis=-1)


class MultiHeadAttention(nn.Module):
    """Section 3.6.2: one projection each for q, k, v split into heads, one batched softmax, then out_proj
    (the weights sown after dropout as intermediates/attn_weights)."""
    d_out: int
    context_length: int
    drop_rate: float
    num_heads: int
    qkv_bias: bool = False

    @nn.compact
    def __call__(self, x_BTD: jax.Array, deterministic: bool = True) -> jax.Array:
        if self.d_out % self.num_heads:
            raise ValueError(f"d_out={self.d_out} is not divisible by num_heads={self.num_heads}")
        B, T, _ = x_BTD.shape
        H, K, E = self.num_heads, self.d_out // self.num_heads, self.d_out
        _check_length(T, self.context_length)
        q_BHTK, k_BHTK, v_BHTK = (a_BTE.reshape(B, T, H, K).transpose(0, 2, 1, 3)
                                  for a_BTE in _qkv(x_BTD, E, self.qkv_bias))
        att_BHTT = q_BHTK @ k_BHTK.swapaxes(-1, -2) / jnp.sqrt(K)
        att_BHTT = jnp.where(jnp.tril(jnp.ones((T, T), dtype=bool)), att_BHTT, -jnp.inf)
        w_BHTT = jax.nn.softmax(att_BHTT, axis=-1)
        w_BHTT = nn.Dropout(self.drop_rate)(w_BHTT, deterministic=deterministic)
        self.sow("intermediates", "attn_weights", w_BHTT)
        ctx_BTE = (w_BHTT @ v_BHTK).transpose(0, 2, 1, 3).reshape(B, T, E)
        return nn.Dense(E, name="out_proj")(ctx_BTE)
