import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import generate as gen
from gptjax.config import GPTConfig
from gptjax.generate import (decode_step, generate, generate_batch, generate_text_simple, prefill, sample_logits,
                             stream_generate, stream_text, trim_at_eos)
from gptjax.model import GPT, init_params
from gptjax.layout import to_layout
from gptjax.options import Options


@pytest.fixture
def model(tiny_cfg):
    return init_params(tiny_cfg, jax.random.key(0)), tiny_cfg


def naive_greedy(params, cfg, idx, n):
    """The book's generate_text_simple, step by step on the host."""
    idx = np.asarray(idx)
    apply = jax.jit(lambda p, x: GPT(cfg).apply({"params": p}, x))
    for _ in range(n):
        logits = apply(params, idx[:, -cfg.context_length:])
        idx = np.concatenate([idx, np.argmax(np.asarray(logits[:, -1]), -1)[:, None]], axis=1)
    return idx


def test_greedy_matches_the_books_loop(model):
    params, cfg = model
    idx = np.array([[1, 2, 3], [4, 5, 6]])
    np.testing.assert_array_equal(generate(params, cfg, idx, 15), naive_greedy(params, cfg, idx, 15))
    np.testing.assert_array_equal(generate_text_simple(params, cfg, idx, 5), naive_greedy(params, cfg, idx, 5))


def test_prompt_longer_than_context_is_cropped_from_the_left(model):
    params, cfg = model
    idx = np.arange(1, 2 * cfg.context_length + 4)[None] % cfg.vocab_size
    out = generate(params, cfg, idx, 6)
    assert out.shape == (1, idx.shape[1] + 6)
    np.testing.assert_array_equal(out, naive_greedy(params, cfg, idx, 6))


def test_eos_stops_each_row_on_its_own(model):
    params, cfg = model
    idx = np.array([[1, 2, 3], [7, 8, 9]])
    free = generate(params, cfg, idx, 12)
    eos = int(free[0, 5])  # row 0 emits this token at its third step
    assert eos not in free[1, 3:].tolist(), "pick a prompt where row 1 never emits row 0's token"
    out = generate(params, cfg, idx, 12, eos_id=eos)
    assert trim_at_eos(out[0, 3:], eos) == free[0, 3:5].tolist()
    assert (out[0, 5:] == eos).all()
    np.testing.assert_array_equal(out[1], free[1])  # row 1 unaffected


def test_loop_ends_when_every_row_is_done(model):
    params, cfg = model
    idx = np.array([[1, 2, 3]])
    eos = int(generate(params, cfg, idx, 1)[0, -1])
    out = generate(params, cfg, idx, 30, eos_id=eos)
    assert out.shape == (1, 4)


def test_sampling_reproducible_and_key_dependent(model):
    params, cfg = model
    idx = np.array([[1, 2, 3]])
    a = generate(params, cfg, idx, 10, temperature=1.5, key=jax.random.key(1))
    b = generate(params, cfg, idx, 10, temperature=1.5, key=jax.random.key(1))
    c = generate(params, cfg, idx, 10, temperature=1.5, key=jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    greedy = generate(params, cfg, idx, 10)
    np.testing.assert_array_equal(generate(params, cfg, idx, 10, temperature=1.0, top_k=1, key=jax.random.key(3)), greedy)


def test_top_k_and_top_p_restrict_the_support():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    keys = jax.random.split(jax.random.key(0), 400)
    draw = lambda **kw: set(np.asarray(jax.vmap(lambda k: sample_logits(logits, k, temperature=1.0, **kw))(keys)).ravel().tolist())
    assert draw() == {0, 1, 2, 3}
    assert draw(top_k=2) == {0, 1}
    assert draw(top_p=0.7) == {0, 1}
    assert draw(top_p=0.5) == {0}
    assert draw(top_p=0.81) == {0, 1, 2}


@pytest.mark.parametrize("kwargs, match", [
    (dict(idx=[[]]), "non-empty prompt"),
    (dict(idx=[[1, 500]]), r"token ids must lie in \[0, 97\)"),
    (dict(temperature=-1.0), r"temperature must be a number >= 0 \(0 = greedy\), got -1.0"),
    (dict(temperature=float("nan")), r"temperature must be a number >= 0 \(0 = greedy\), got nan"),
    (dict(temperature=0.8), "needs a PRNG key"),
    (dict(top_p=1.5), "top_p must be in"),
    (dict(max_new_tokens=-2), "max_new_tokens must be >= 0"),
])
def test_bad_generation_arguments(model, kwargs, match):
    params, cfg = model
    args = dict(idx=[[1, 2]], max_new_tokens=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate(params, cfg, np.array(args.pop("idx")), args.pop("max_new_tokens"), **args)


# --- KV cache ------------------------------------------------------------------------------

@pytest.mark.parametrize("n_new", [1, 9, 13])  # 13: the cache fills the context, the window loop takes over
def test_cache_and_window_paths_give_the_same_tokens(model, n_new):
    params, cfg = model
    idx = np.array([[1, 2, 3], [4, 5, 6]])
    cached = generate(params, cfg, idx, n_new, use_cache=True)
    np.testing.assert_array_equal(cached, generate(params, cfg, idx, n_new, use_cache=False))
    np.testing.assert_array_equal(cached, naive_greedy(params, cfg, idx, n_new))
    kw = dict(temperature=1.3, top_k=20, key=jax.random.key(5))  # the same key schedule too
    np.testing.assert_array_equal(generate(params, cfg, idx, n_new, **kw),
                                  generate(params, cfg, idx, n_new, use_cache=False, **kw))


def test_batched_prompts_of_different_lengths_equal_their_own_generation(model):
    params, cfg = model
    prompts = [[5], [1, 2, 3, 4, 5, 6, 7], [9, 8, 7]]
    out = generate_batch(params, cfg, prompts, 6)
    assert [len(o) for o in out] == [6, 6, 6]
    for p, o in zip(prompts, out):
        assert o == generate(params, cfg, [p], 6)[0, len(p):].tolist()
    # eos drops the token and what follows, per row
    eos = out[0][2]
    for p, o in zip(prompts, generate_batch(params, cfg, prompts, 6, eos_id=eos)):
        assert o == trim_at_eos(generate(params, cfg, [p], 6)[0, len(p):], eos)
    # too long for one cached pass: row by row through the cropping path
    long = [list(range(1, 12)), [3]]
    for p, o in zip(long, generate_batch(params, cfg, long, 8)):
        assert o == generate(params, cfg, [p], 8)[0, len(p):].tolist()


def test_stream_yields_the_tokens_of_generate(model):
    params, cfg = model
    ids = [1, 2, 3]
    full = generate(params, cfg, [ids], 20)[0, 3:].tolist()  # runs past the 16-token context
    assert list(stream_generate(params, cfg, ids, 20)) == full
    stream = stream_generate(params, cfg, ids, 20)
    assert next(stream) == full[0]  # a generator: tokens come one at a time
    eos = full[4]
    assert list(stream_generate(params, cfg, ids, 20, eos_id=eos)) == trim_at_eos(full, eos)
    kw = dict(temperature=1.0, key=jax.random.key(7))
    assert list(stream_generate(params, cfg, ids, 8, **kw)) == generate(params, cfg, [ids], 8, **kw)[0, 3:].tolist()
    # one device program per chunk of tokens: any chunk size, the same tokens (sampled ones too)
    for chunk in (1, 3, 32):
        assert list(stream_generate(params, cfg, ids, 20, chunk=chunk)) == full
        assert list(stream_generate(params, cfg, ids, 8, chunk=chunk, **kw)) == \
            generate(params, cfg, [ids], 8, **kw)[0, 3:].tolist()
    with pytest.raises(ValueError, match="empty"):
        next(stream_generate(params, cfg, [], 3))


class _ByteTokenizer:
    """Token t is byte t: multi-byte UTF-8 characters arrive in pieces, as with GPT-2's BPE."""

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode_single_token_bytes(self, t):
        return bytes([t])


def test_stream_text_yields_whole_characters():
    cfg = GPTConfig(vocab_size=256, context_length=32, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0)
    params = init_params(cfg, jax.random.key(0))
    ids = list("é".encode()) * 2
    # a model that always continues with the bytes of "é€" would be hard to train here: check the decoder
    # on the real stream instead (every piece decodes on its own, the join equals the whole)
    pieces = list(stream_text(params, cfg, _ByteTokenizer(), "é", 12))
    whole = bytes(generate(params, cfg, [list("é".encode())], 12)[0, 2:].tolist()).decode("utf-8", errors="replace")
    assert "".join(pieces) == whole
    assert all(p for p in pieces) and len(ids) == 4


def test_scanned_and_padded_models_decode_the_same(model):
    params, cfg = model
    idx = np.array([[1, 2, 3]])
    ref = generate(params, cfg, idx, 8)
    for opts in (Options(scan_layers=True, remat="full"), Options(vocab_multiple=64)):
        np.testing.assert_array_equal(generate(to_layout(params, cfg, opts), cfg, idx, 8, opts=opts), ref)


def test_decoding_compiles_once_per_shape(model):
    params, cfg = model
    generate(params, cfg, np.array([[1, 2, 3]]), 5)
    n = gen._generate_cached._cache_size()
    generate(params, cfg, np.array([[7, 8, 9]]), 5)
    assert gen._generate_cached._cache_size() == n
    assert list(stream_generate(params, cfg, [4, 5], 4))
    sizes = gen.decode_chunk._cache_size(), prefill._cache_size()
    assert list(stream_generate(params, cfg, [6, 7, 8, 9], 4))  # another length, the same padded bucket
    assert (gen.decode_chunk._cache_size(), prefill._cache_size()) == sizes


@pytest.mark.parametrize("shared", [True, False])  # scalar position / one per row: same tokens
def test_decode_step_updates_the_donated_cache(model, shared):
    params, cfg = model
    pos = (lambda t: jnp.int32(t)) if shared else (lambda t: jnp.asarray([t], jnp.int32))
    tok, cache = prefill(params, jnp.asarray([[1, 2, 3]]), pos(3), jax.random.key(0), cfg=cfg, max_len=10)
    old = cache["h_0"]["attn"]["k"]
    toks = [int(tok[0])]
    for t in range(3, 8):
        tok, cache = decode_step(params, cache, tok, pos(t), jax.random.key(0), cfg=cfg)
        toks.append(int(tok[0]))
    assert old.is_deleted()  # donated: XLA wrote the new slot in place
    assert cache["h_0"]["attn"]["k"].shape == (4, 8, 10) and cache["h_0"]["attn"]["v"].shape == (4, 10, 8)
    assert toks == generate(params, cfg, np.array([[1, 2, 3]]), 6, use_cache=False)[0, 3:].tolist()


def test_prefill_rejects_a_cache_shorter_than_the_prompt(model):
    params, cfg = model
    with pytest.raises(ValueError, match="max_len=4 cache slots cannot hold the 6-token prompt"):
        prefill(params, jnp.ones((1, 6), jnp.int32), jnp.int32(6), jax.random.key(0), cfg=cfg, max_len=4)


def test_cached_decode_loop_keeps_the_cache_in_place(model):
    """XLA:CPU must neither transpose nor copy the cache inside the decode loop (the layout
    `cache_attention` chose): no copy/transpose of a cache-shaped array in the compiled loop."""
    if jax.default_backend() != "cpu":
        pytest.skip("checks XLA:CPU's compiled program")
    params, cfg = model
    hlo = gen._generate_cached.lower(params, jnp.asarray([[1, 2, 3]]), jnp.int32(3), jax.random.key(0), cfg=cfg,
                                     opts=Options(), max_new_tokens=7, temperature=0.0, top_k=None, top_p=None,
                                     eos_id=None).compile().as_text()
    cache_size = 4 * 9 * 8  # heads x slots (3 + 7 - 1) x head dim, one row
    body = hlo[hlo.index("body"):]
    bad = []
    for line in body.splitlines():
        m = re.search(r"= f32\[([\d,]+)\]\S* (copy|transpose)\(", line)
        if m and math.prod(int(d) for d in m.group(1).split(",")) == cache_size:
            bad.append(line.strip()[:120])
    assert not bad, bad


def test_decoding_layout_converts_once(model):
    params, cfg = model
    dec_params, dec_opts = gen.decoding_model(params, cfg)
    assert dec_opts.linear_layout == "out_in"  # CPU: (out, in) kernels read faster one token at a time
    assert dec_params["h_0"]["mlp"]["c_fc"]["kernel"].shape == (128, 32)
    again = gen.decoding_model(dec_params, cfg, dec_opts)
    assert again[0] is dec_params and again[1] == dec_opts  # already laid out: no copy
    idx = np.array([[1, 2, 3]])
    np.testing.assert_array_equal(generate(dec_params, cfg, idx, 6, opts=dec_opts),
                                  generate(params, cfg, idx, 6, use_cache=False))


def test_a_classifier_is_refused_before_anything_runs(model):
    params, cfg = model
    with pytest.raises(ValueError, match=r"this model is a classifier \(n_classes=2\) with no language-model head.*"
                                         r"gptjax classify --run RUN"):
        generate(params, cfg.replace(n_classes=2), np.array([[1, 2]]), 3)
