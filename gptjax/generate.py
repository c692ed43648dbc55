"""Text generation: the book's greedy loop and sampling (temperature, top-k, top-p, eos), with a KV cache.

Two decoders give the same tokens:
- KV cache (the default): a jitted prefill fills a static cache per layer (`model.init_cache`), then each
  step feeds one token per row: `generate` runs the whole loop in one jitted `lax.while_loop`,
  `stream_generate` yields the tokens of jitted decode chunks (cache donated). Rows may have prompts of
  different lengths (right-padded; row b's new tokens follow its n_b prompt tokens).
- No cache, as the book: each step re-reads a window of up to `context_length` tokens.
A KV cache cannot crop from the left (every position would shift), so tokens past the context length
always come from the window, as in the book. `opts` (gptjax.options.Options): how the model runs and how
`params` are laid out (default: canonical); `decoding_model` picks the fastest layout for decoding.
Shape letters: gptjax.model's legend; T0 is the prompt's length.
"""
from __future__ import annotations

import codecs
import itertools
import math
from functools import partial
import os
from typing import Any, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import cpu
from gptjax.model_io import load_model
from gptjax.config import GPTConfig
from gptjax.model import GPT, init_cache
from gptjax.layout import to_canonical, to_layout, unstack_layers
from gptjax.options import WEIGHT_DTYPES, Options
from gptjax.tokenizer import get_gpt2_tokenizer


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
    if cfg.n_classes:
        raise ValueError(f"this model is a classifier (n_classes={cfg.n_classes}) with no language-model head to "
                         f"generate with; classify with `gptjax classify --run RUN` (Classifier.from_run), or "
                         f"generate with a language model")
    if idx_BT.ndim != 2 or idx_BT.shape[1] == 0:
        raise ValueError(f"prompt ids must have shape (batch, T>=1), got {idx_BT.shape}; encode a non-empty prompt")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be a positive integer or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if idx_BT.min() < 0 or idx_BT.max() >= cfg.vocab_size:
        raise ValueError(f"prompt token ids must lie in [0, {cfg.vocab_size}), got min {idx_BT.min()} max {idx_BT.max()}")


def _sampling_key(temperature: float, key: jax.Array | None) -> jax.Array:
    if temperature > 0 and key is None:
        raise ValueError("sampling with temperature > 0 needs a PRNG key: pass key=jax.random.key(seed)")
    return jax.random.key(0) if key is None else key


def _per_layer(params: Any, opts: Options) -> tuple[Any, Options]:
    """Per-layer params (the KV cache walks the layers one by one) and no remat; the kernel layout stays."""
    if opts.scan_layers or opts.remat != "none":
        params, opts = unstack_layers(params), opts.replace(scan_layers=False, remat="none")
    return params, opts


def decoding_model(params: Any, cfg: GPTConfig, opts: Options | None = None, linear_layout: str | None = None,
                   matvec: str | None = None) -> tuple[Any, Options]:
    """Params (laid out by `opts`, default: canonical) and the Options to decode them with: per-layer
    params, no remat, and on CPU (out, in) kernels with the C++ matrix-vector kernel (`gptjax.cpu.matvec`,
    where it builds). `linear_layout` ("in_out"|"out_in") and `matvec` ("xla"|"kernel") override the
    choice. This copies the weights: convert once before decoding, not per call."""
    params, opts = _per_layer(params, opts or Options())
    on_cpu = cpu.fastest_linear_layout() == "out_in"
    target = linear_layout or ("out_in" if on_cpu else opts.linear_layout)
    if target != opts.linear_layout:
        params = to_layout(to_canonical(params, cfg, opts), cfg, opts.replace(linear_layout=target))
        opts = opts.replace(linear_layout=target)
    if matvec is None:
        matvec = "kernel" if on_cpu and cpu.kernel_available() else opts.matvec
    return params, opts.replace(matvec=matvec)


def decoding_weights(params: Any, cfg: GPTConfig, opts: Options, weight_dtype: str | None) -> tuple[Any, Options]:
    """Params and Options to decode with, the weights in `weight_dtype` (None: as they are); `params` are
    laid out by `decoding_model` (with its `opts`).

    - "bfloat16": weight-only (float32 compute) under the CPU kernel (opts.matvec == "kernel"), which
      reads bfloat16 weights itself; elsewhere the compute is bfloat16 too.
    - "int8": weight-only, a scale per out row (`gptjax.cpu.quantize_weights`; kernels put (out, in)
      first). The compute is float32 under the CPU kernel, else opts.dtype.
    - "float32": the weights and compute in float32.
    """
    if weight_dtype is None:
        return params, opts
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {WEIGHT_DTYPES} (or None: as loaded), got {weight_dtype!r}")
    if weight_dtype == "int8":
        params, opts = decoding_model(params, cfg, opts, linear_layout="out_in", matvec=opts.matvec)
        params = jax.tree.map(lambda a: a if a.dtype == jnp.int8 else a.astype(jnp.float32), params)
        return cpu.quantize_weights(params, cfg, opts), (opts.replace(dtype="float32") if opts.matvec == "kernel"
                                                         else opts)
    params = jax.tree.map(lambda a: a.astype(jnp.dtype(weight_dtype)), params)
    weight_only = opts.matvec == "kernel" and weight_dtype == "bfloat16"
    return params, opts.replace(dtype="float32" if weight_only else weight_dtype)


def _bucket(n: int, multiple: int, cap: int) -> int:
    return min(-(-n // multiple) * multiple, cap) if multiple > 1 else n


# --- no cache: the book's windowed loop -----------------------------------------------------

@partial(jax.jit, static_argnames=("cfg", "opts", "max_new_tokens", "temperature", "top_k", "top_p", "eos_id"))
def _generate_loop(params, idx_BT, key, done_B, *, cfg: GPTConfig, opts: Options, max_new_tokens: int,
                   temperature: float, top_k: int | None, top_p: float | None, eos_id: int | None):
    model = GPT(cfg, opts)
    B, T0 = idx_BT.shape
    total = T0 + max_new_tokens
    window = min(total, cfg.context_length)  # the window the model sees each step
    buf_BT = jnp.zeros((B, total), jnp.int32).at[:, :T0].set(idx_BT)
    fill = 0 if eos_id is None else eos_id

    def body(carry):
        t, buf_BT, done_B = carry
        start = jnp.maximum(t - window, 0)  # crop from the left to the last context_length tokens
        win_BT = jax.lax.dynamic_slice_in_dim(buf_BT, start, window, axis=1)
        logits_BTV = model.apply({"params": params}, win_BT, deterministic=True)
        logits_BV = jax.lax.dynamic_index_in_dim(logits_BTV, t - 1 - start, axis=1, keepdims=False)
        nxt_B = sample_logits(logits_BV, jax.random.fold_in(key, t), temperature=temperature, top_k=top_k, top_p=top_p)
        # finished rows keep writing the fill token; the book drops eos, so decode stops at it
        nxt_B = jnp.where(done_B, fill, nxt_B)
        if eos_id is not None:
            done_B = done_B | (nxt_B == eos_id)
        buf_BT = jax.lax.dynamic_update_index_in_dim(buf_BT, nxt_B, t, axis=1)
        return t + 1, buf_BT, done_B

    running = lambda carry: (carry[0] < total) & ~jnp.all(carry[-1])  # tokens left, and a row not done
    t, buf_BT, _ = jax.lax.while_loop(running, body, (jnp.int32(T0), buf_BT, done_B))
    return buf_BT, t


# --- KV cache -------------------------------------------------------------------------------

def _decode(params, cfg: GPTConfig, opts: Options, cache, idx_BT, pos_B, last_B=None):
    """Tokens at position pos_B ((B,), or a scalar for all rows) through the cache -> (logits (B, V) at
    each row's last token, or at its index last_B[b]; cache)."""
    logits_B1V, state = GPT(cfg, opts).apply({"params": params, "cache": cache}, idx_BT, pos_B=pos_B, last_B=last_B,
                                             mutable=["cache"])
    return logits_B1V[:, 0], state["cache"]


def _prefill(params, cfg: GPTConfig, opts: Options, idx_BT, lens_B, max_len: int):
    """Prompts of lengths lens_B ((B,), or a scalar) -> (logits at each row's last prompt token (B, V),
    filled cache of max_len slots)."""
    B, T = idx_BT.shape
    if max_len < T:
        raise ValueError(f"max_len={max_len} cache slots cannot hold the {T}-token prompt: pass max_len >= {T} "
                         f"(prompt plus the tokens to decode)")
    return _decode(params, cfg, opts, init_cache(cfg, B, max_len, opts.dtype), idx_BT, jnp.int32(0),
                   jnp.broadcast_to(lens_B - 1, (B,)))


@partial(jax.jit, static_argnames=("cfg", "opts", "max_len", "temperature", "top_k", "top_p"))
def prefill(params, idx_BT, lens_B, key, *, cfg: GPTConfig, max_len: int, temperature: float = 0.0,
            top_k: int | None = None, top_p: float | None = None, opts: Options = Options()):
    """Jitted prefill + first sample: (B, T) right-padded prompts of lengths lens_B -> (tokens (B,), cache).
    lens_B: (B,), or a scalar when all prompts share it (then decode with a scalar position too: in place)."""
    logits_BV, cache = _prefill(params, cfg, opts, idx_BT, lens_B, max_len)
    return sample_logits(logits_BV, key, temperature=temperature, top_k=top_k, top_p=top_p), cache


@partial(jax.jit, static_argnames=("cfg", "opts", "temperature", "top_k", "top_p"), donate_argnames=("cache",))
def decode_step(params, cache, tok_B, pos_B, key, *, cfg: GPTConfig, temperature: float = 0.0,
                top_k: int | None = None, top_p: float | None = None, opts: Options = Options()):
    """Jitted decode step, cache donated: token at pos_B ((B,), or a scalar for all rows) -> (next tokens (B,), cache)."""
    logits_BV, cache = _decode(params, cfg, opts, cache, tok_B[:, None], pos_B)
    return sample_logits(logits_BV, key, temperature=temperature, top_k=top_k, top_p=top_p), cache


@partial(jax.jit, static_argnames=("cfg", "opts", "n", "temperature", "top_k", "top_p"), donate_argnames=("cache",))
def decode_chunk(params, cache, tok_B, pos, key, *, cfg: GPTConfig, n: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, opts: Options = Options()):
    """`n` decode steps in one program: the tokens (B, n) that follow tok_B (at position `pos`, one scalar for
    all rows), and the cache. Step i samples with fold_in(key, pos + i + 1), as `decode_step` at pos + i does.
    Steps past the cache's last slot compute garbage: callers keep only the tokens that fit."""
    def body(i, carry):
        cache, tok_B, out_BG = carry
        logits_BV, cache = _decode(params, cfg, opts, cache, tok_B[:, None], pos + i)
        nxt_B = sample_logits(logits_BV, jax.random.fold_in(key, pos + i + 1), temperature=temperature, top_k=top_k,
                              top_p=top_p)
        return cache, nxt_B, jax.lax.dynamic_update_index_in_dim(out_BG, nxt_B, i, axis=1)

    out_BG = jnp.zeros((tok_B.shape[0], n), jnp.int32)
    cache, _, out_BG = jax.lax.fori_loop(0, n, body, (cache, tok_B, out_BG))
    return out_BG, cache


@partial(jax.jit, static_argnames=("cfg", "opts", "max_new_tokens", "temperature", "top_k", "top_p", "eos_id"))
def _generate_cached(params, idx_BT, lens_B, key, *, cfg: GPTConfig, opts: Options, max_new_tokens: int,
                     temperature: float, top_k: int | None, top_p: float | None, eos_id: int | None):
    """Prefill + the whole decode loop in one program: new tokens (B, G) and the number of steps run.
    lens_B: (B,) prompt lengths, or a scalar when all rows share it (the faster cache update)."""
    B, T0 = idx_BT.shape
    G = max_new_tokens
    fill = 0 if eos_id is None else eos_id
    sample = partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)
    logits_BV, cache = _prefill(params, cfg, opts, idx_BT, lens_B, T0 + G - 1)
    # step s samples with fold_in(key, T0 + s), the key the windowed loop uses for the same token
    tok_B = sample(logits_BV, jax.random.fold_in(key, T0))
    done_B = jnp.zeros((B,), bool) if eos_id is None else tok_B == eos_id
    out_BG = jnp.full((B, G), fill, jnp.int32).at[:, 0].set(tok_B)

    def body(carry):
        s, cache, out_BG, done_B = carry
        prev_B = jax.lax.dynamic_index_in_dim(out_BG, s - 1, axis=1, keepdims=False)
        logits_BV, cache = _decode(params, cfg, opts, cache, prev_B[:, None], lens_B + s - 1)
        nxt_B = jnp.where(done_B, fill, sample(logits_BV, jax.random.fold_in(key, T0 + s)))
        if eos_id is not None:
            done_B = done_B | (nxt_B == eos_id)
        return s + 1, cache, jax.lax.dynamic_update_index_in_dim(out_BG, nxt_B, s, axis=1), done_B

    running = lambda carry: (carry[0] < G) & ~jnp.all(carry[-1])
    s, _, out_BG, done_B = jax.lax.while_loop(running, body, (jnp.int32(1), cache, out_BG, done_B))
    return out_BG, s, done_B


def generate(params, cfg: GPTConfig, idx_BT, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
             key: jax.Array | None = None, use_cache: bool = True, opts: Options = Options()) -> np.ndarray:
    """The book's `generate`, batched: returns prompt + new ids, shape (B, T0 + steps run).

    A row that emits `eos_id` stops there; its remaining positions hold `eos_id` (the eos itself is
    written too, so `trim_at_eos` recovers each row). Prompts longer than the context are cropped
    from the left at every step, as in the book. `use_cache=False` runs the book's windowed loop;
    both give the same tokens. `params` are laid out by `opts` (default: canonical).
    """
    idx_BT = np.asarray(idx_BT, dtype=np.int32)
    idx_BT = idx_BT[None] if idx_BT.ndim == 1 else idx_BT
    _check(cfg, idx_BT, max_new_tokens, temperature, top_k, top_p)
    if max_new_tokens == 0:
        return idx_BT
    key = _sampling_key(temperature, key)
    params, opts = _per_layer(params, opts)
    B, T0 = idx_BT.shape
    sampling = dict(temperature=float(temperature), top_k=top_k, top_p=top_p, eos_id=eos_id)
    n_cached = min(max_new_tokens, cfg.context_length - T0) if use_cache else 0
    done_B = jnp.zeros((B,), bool)
    if n_cached > 0:
        new_BG, s, done_B = _generate_cached(params, jnp.asarray(idx_BT), jnp.int32(T0), key,
                                             cfg=cfg, opts=opts, max_new_tokens=int(n_cached), **sampling)
        idx_BT = np.concatenate([idx_BT, np.asarray(new_BG)[:, : int(s)]], axis=1)
        if n_cached == max_new_tokens or bool(jnp.all(done_B)):
            return idx_BT
    # past the context (or without a cache): the windowed loop, continuing the same key schedule
    buf_BT, t = _generate_loop(params, jnp.asarray(idx_BT), key, done_B, cfg=cfg, opts=opts,
                               max_new_tokens=int(max_new_tokens - max(n_cached, 0)), **sampling)
    return np.asarray(buf_BT)[:, : int(t)]


def generate_batch(params, cfg: GPTConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                   temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                   eos_id: int | None = None, key: jax.Array | None = None,
                   pad_multiple: int = 64, opts: Options = Options()) -> list[list[int]]:
    """New token ids for prompts of different lengths, decoded together with the KV cache (eos dropped).

    Each row equals `generate` on its prompt alone. Prompts are right-padded to a multiple of
    `pad_multiple` so a stream of batches compiles a handful of programs. Batches that would run past
    the context go row by row through `generate`, which crops as the book does.
    """
    lens = [len(p) for p in prompts]
    if not prompts or min(lens) == 0:
        raise ValueError("every prompt needs at least one token")
    key = _sampling_key(temperature, key)
    if max(lens) + max_new_tokens > cfg.context_length:
        return [trim_at_eos(generate(params, cfg, [list(p)], max_new_tokens, temperature=temperature, top_k=top_k,
                                     top_p=top_p, eos_id=eos_id, key=key, opts=opts)[0, n:], eos_id)
                for p, n in zip(prompts, lens)]
    T = _bucket(max(lens), pad_multiple, cfg.context_length - max_new_tokens)
    idx_BT = np.asarray([list(p) + [0] * (T - len(p)) for p in prompts], np.int32)
    _check(cfg, idx_BT, max_new_tokens, temperature, top_k, top_p)
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    params, opts = _per_layer(params, opts)
    lens_B = jnp.int32(lens[0]) if len(set(lens)) == 1 else jnp.asarray(lens, jnp.int32)
    new_BG, s, _ = _generate_cached(params, jnp.asarray(idx_BT), lens_B, key, cfg=cfg, opts=opts,
                                    max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                                    top_k=top_k, top_p=top_p, eos_id=eos_id)
    return [trim_at_eos(row, eos_id) for row in np.asarray(new_BG)[:, : int(s)]]


def stream_generate(params, cfg: GPTConfig, ids: Sequence[int], max_new_tokens: int, *,
                    temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                    eos_id: int | None = None, key: jax.Array | None = None,
                    pad_multiple: int = 64, chunk: int | None = None, opts: Options = Options()) -> Iterator[int]:
    """Yield new token ids as they are decoded (eos ends the stream and is not yielded): `generate`'s tokens.

    The KV-cache decode runs `chunk` tokens per device program (`decode_chunk`; default 1 on CPU, where a
    dispatch is cheap next to a token, 8 elsewhere): the host reads a chunk while the next one runs, and
    the last chunk may compute up to chunk - 1 tokens that are dropped. The prompt is padded to a multiple
    of `pad_multiple` (few compiles across prompts).
    """
    ids = [int(i) for i in ids]
    chunk = chunk or (1 if jax.default_backend() == "cpu" else 8)
    if not ids:
        raise ValueError("the prompt is empty; give at least one token")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 tokens per device program, got {chunk}")
    _check(cfg, np.asarray([ids], np.int32), max_new_tokens, temperature, top_k, top_p)
    key = _sampling_key(temperature, key)
    params, opts = _per_layer(params, opts)
    sampling = dict(cfg=cfg, opts=opts, temperature=float(temperature), top_k=top_k, top_p=top_p)
    ctx, n = cfg.context_length, len(ids)
    m = min(max_new_tokens, ctx - n)  # tokens the cache can hold

    def cached() -> Iterator[int]:  # every token of every chunk: the caller keeps the first m
        T, S = _bucket(n, pad_multiple, ctx), _bucket(n + m, pad_multiple, ctx)
        prompt_1T = jnp.asarray(np.asarray([ids + [0] * (T - n)], np.int32))
        tok_1, cache = prefill(params, prompt_1T, jnp.int32(n), jax.random.fold_in(key, n), max_len=S, **sampling)
        pending_1G = tok_1[:, None]  # decoded, not yet read
        for pos in range(n, n + m - 1, chunk):  # dispatch the next chunk first: it runs while the host reads this one
            nxt_1G, cache = decode_chunk(params, cache, pending_1G[:, -1], jnp.int32(pos), key, n=chunk, **sampling)
            yield from np.asarray(pending_1G[0]).tolist()
            pending_1G = nxt_1G
        yield from np.asarray(pending_1G[0]).tolist()

    def windowed() -> Iterator[int]:  # past the context: the book's window of the last context_length tokens
        while len(ids) - n < max_new_tokens:
            win = ids[-ctx:]
            tok_1, _ = prefill(params, jnp.asarray([win], np.int32), jnp.int32(len(win)),
                               jax.random.fold_in(key, len(ids)), max_len=len(win), **sampling)
            yield int(tok_1[0])

    for t in itertools.chain(itertools.islice(cached(), m) if m > 0 else (), windowed()):
        if eos_id is not None and t == eos_id:
            return
        ids.append(t)
        yield t


def token_bytes(tokenizer: Any, t: int) -> bytes:
    """Token `t`'s bytes."""
    if hasattr(tokenizer, "decode_single_token_bytes"):  # tiktoken: a token may hold part of a UTF-8 character
        return tokenizer.decode_single_token_bytes(t)
    return tokenizer.decode([t]).encode("utf-8")


def stream_text(params, cfg: GPTConfig, tokenizer: Any, prompt: str, max_new_tokens: int, **kwargs) -> Iterator[str]:
    """`stream_generate` as text: yields each decoded piece as soon as it forms whole UTF-8 characters."""
    ids = tokenizer.encode(prompt, allowed_special={"<|endoftext|>"}) if hasattr(tokenizer, "eot_token") \
        else tokenizer.encode(prompt)
    yield from text_pieces(tokenizer, stream_generate(params, cfg, ids, max_new_tokens, **kwargs))


def text_pieces(tokenizer: Any, tokens: Iterable[int]) -> Iterator[str]:
    """Decode a stream of token ids, yielding each piece as soon as it forms whole UTF-8 characters."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    yield from filter(None, (decoder.decode(token_bytes(tokenizer, t)) for t in tokens))
    if tail := decoder.decode(b"", final=True):
        yield tail


def generate_text_simple(params, cfg: GPTConfig, idx_BT, max_new_tokens: int, context_size: int | None = None,
                         opts: Options = Options()) -> np.ndarray:
    """The book's greedy loop (chapter 4)."""
    if context_size is not None and context_size != cfg.context_length:
        cfg = cfg.replace(context_length=min(context_size, cfg.context_length))
        params, opts = _per_layer(params, opts)
        params = {**params, "wpe": {"embedding": params["wpe"]["embedding"][: cfg.context_length]}}
    return generate(params, cfg, idx_BT, max_new_tokens, opts=opts)


def trim_at_eos(ids: np.ndarray, eos_id: int | None) -> list[int]:
    ids = [int(i) for i in ids]
    return ids[: ids.index(eos_id)] if eos_id is not None and eos_id in ids else ids


def load_for_decoding(spec: str | os.PathLike, weight_dtype: str | None = None, *, attn_impl: str = "auto",
                      linear_layout: str | None = None, matvec: str | None = None) -> tuple[Any, GPTConfig, Options]:
    """(params, cfg, opts): `model_io.load_model(spec)` laid out for decoding (`decoding_model`, which
    `linear_layout` / `matvec` override), the weights in `weight_dtype` (`decoding_weights`)."""
    # bfloat16 is cast as it loads (half the memory); int8 is quantized from float32
    params, cfg = load_model(spec, dtype=None if weight_dtype == "int8" else weight_dtype)
    params, opts = decoding_model(params, cfg, Options(attn_impl=attn_impl), linear_layout=linear_layout,
                                  matvec=matvec)
    params, opts = decoding_weights(params, cfg, opts, weight_dtype)
    return params, cfg, opts


def generate_text(model: Any, prompt: str, max_new_tokens: int = 50, *, temperature: float = 0.0,
                  top_k: int | None = None, top_p: float | None = None, seed: int = 123, stop_at_eos: bool = True,
                  use_cache: bool = True, tokenizer: Any = None, opts: Options | None = None) -> str:
    """The book's text_to_token_ids -> generate -> token_ids_to_text in one call: the prompt and its continuation.

    `model`: what `load_model` returns ((params, cfg), laid out by `opts`, default canonical), or anything it
    accepts (a run directory, a GPT-2 size, a safetensors path). Greedy by default; `temperature`/`top_k`/
    `top_p` sample with `seed`. `tokenizer`: default GPT-2's. Stops at <|endoftext|> unless `stop_at_eos=False`."""
    if isinstance(model, (str, os.PathLike)):
        params, cfg, opts = load_for_decoding(model)
    else:
        (params, cfg), opts = model, opts or Options()
    tok = tokenizer or get_gpt2_tokenizer()
    ids = tok.encode(prompt, allowed_special={"<|endoftext|>"}) if hasattr(tok, "eot_token") else tok.encode(prompt)
    if not ids:
        raise ValueError(f"the prompt {prompt!r} is empty after tokenization; give it some text")
    eos = getattr(tok, "eot_token", None) if stop_at_eos else None
    out = generate(params, cfg, [ids], max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos,
                   key=jax.random.key(seed), use_cache=use_cache, opts=opts)
    return tok.decode(trim_at_eos(out[0], eos))
