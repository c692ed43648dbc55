"""Text generation: the book's greedy loop and sampling (temperature, top-k, top-p, eos).

The whole loop runs inside one jitted `lax.while_loop` over a fixed-size token buffer, so a
generation compiles once per (batch, prompt length, max_new_tokens) instead of once per token.
Without a KV cache each step re-reads a window of up to `context_length` tokens, as the book does.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.config import GPTConfig
from gptjax.model import GPT


def sample_logits(logits_BV: jax.Array, key: jax.Array | None, *, temperature: float = 0.0,
                  top_k: int | None = None, top_p: float | None = None) -> jax.Array:
    """Next token ids (B,) from float32 logits. temperature 0 (or no key) is greedy argmax."""
    logits_BV = logits_BV.astype(jnp.float32)
    neg_inf = jnp.finfo(jnp.float32).min
    if top_k is not None and top_k > 0:
        kth_B1 = jax.lax.top_k(logits_BV, min(top_k, logits_BV.shape[-1]))[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, neg_inf, logits_BV)
    if temperature <= 0.0 or key is None:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV / temperature
    if top_p is not None and 0.0 < top_p < 1.0:
        # keep the smallest set of tokens whose probability mass reaches top_p (the top token always)
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        cum_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
        keep_BV = (cum_BV - jax.nn.softmax(sorted_BV, axis=-1)) < top_p
        cutoff_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV < cutoff_B1, neg_inf, logits_BV)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


def _check(cfg: GPTConfig, idx_BT: np.ndarray, max_new_tokens: int, temperature: float,
           top_k: int | None, top_p: float | None) -> None:
    if idx_BT.ndim != 2 or idx_BT.shape[1] == 0:
        raise ValueError(f"prompt ids must have shape (batch, T>=1), got {idx_BT.shape}; encode a non-empty prompt")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be a positive integer or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if idx_BT.min() < 0 or idx_BT.max() >= cfg.vocab_size:
        raise ValueError(f"prompt token ids must lie in [0, {cfg.vocab_size}), got min {idx_BT.min()} max {idx_BT.max()}")


@partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "top_k", "top_p", "eos_id"))
def _generate_loop(params, idx_BT, key, *, cfg: GPTConfig, max_new_tokens: int, temperature: float,
                   top_k: int | None, top_p: float | None, eos_id: int | None):
    model = GPT(cfg)
    B, T0 = idx_BT.shape
    L = T0 + max_new_tokens
    W = min(L, cfg.context_length)  # the window the model sees each step
    buf_BL = jnp.zeros((B, L), jnp.int32).at[:, :T0].set(idx_BT)
    fill = 0 if eos_id is None else eos_id

    def cond(carry):
        t, _, done_B = carry
        return (t < L) & ~jnp.all(done_B)

    def body(carry):
        t, buf_BL, done_B = carry
        start = jnp.maximum(t - W, 0)  # crop from the left to the last context_length tokens
        win_BW = jax.lax.dynamic_slice_in_dim(buf_BL, start, W, axis=1)
        logits_BWV = model.apply({"params": params}, win_BW, deterministic=True)
        logits_BV = jax.lax.dynamic_index_in_dim(logits_BWV, t - 1 - start, axis=1, keepdims=False)
        nxt_B = sample_logits(logits_BV, jax.random.fold_in(key, t), temperature=temperature, top_k=top_k, top_p=top_p)
        if eos_id is not None:
            done_B = done_B | (nxt_B == eos_id)
        # finished rows keep writing the fill token; the book drops eos, so decode stops at it
        nxt_B = jnp.where(done_B, fill, nxt_B)
        buf_BL = jax.lax.dynamic_update_index_in_dim(buf_BL, nxt_B, t, axis=1)
        return t + 1, buf_BL, done_B

    t, buf_BL, _ = jax.lax.while_loop(cond, body, (jnp.int32(T0), buf_BL, jnp.zeros((B,), bool)))
    return buf_BL, t


def generate(params, cfg: GPTConfig, idx_BT, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
             key: jax.Array | None = None) -> np.ndarray:
    """The book's `generate`, batched: returns prompt + new ids, shape (B, T0 + steps run).

    A row that emits `eos_id` stops there; its remaining positions hold `eos_id` (the eos itself is
    written too, so `trim_at_eos` recovers each row). Prompts longer than the context are cropped
    from the left at every step, as in the book.
    """
    idx_BT = np.asarray(idx_BT, dtype=np.int32)
    if idx_BT.ndim == 1:
        idx_BT = idx_BT[None]
    _check(cfg, idx_BT, max_new_tokens, temperature, top_k, top_p)
    if max_new_tokens == 0:
        return idx_BT
    if temperature > 0 and key is None:
        raise ValueError("sampling with temperature > 0 needs a PRNG key: pass key=jax.random.key(seed)")
    if key is None:
        key = jax.random.key(0)
    buf_BL, t = _generate_loop(params, jnp.asarray(idx_BT), key, cfg=cfg, max_new_tokens=int(max_new_tokens),
                               temperature=float(temperature), top_k=top_k, top_p=top_p, eos_id=eos_id)
    return np.asarray(buf_BL)[:, : int(t)]


def generate_text_simple(params, cfg: GPTConfig, idx_BT, max_new_tokens: int, context_size: int | None = None) -> np.ndarray:
    """The book's greedy loop (chapter 4)."""
    if context_size is not None and context_size != cfg.context_length:
        cfg = cfg.replace(context_length=min(context_size, cfg.context_length))
        params = {**params, "wpe": {"embedding": params["wpe"]["embedding"][: cfg.context_length]}}
    return generate(params, cfg, idx_BT, max_new_tokens)


def trim_at_eos(ids: np.ndarray, eos_id: int | None) -> list[int]:
    ids = [int(i) for i in ids]
    if eos_id is not None and eos_id in ids:
        ids = ids[: ids.index(eos_id)]
    return ids
