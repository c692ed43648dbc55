"""GPT model: the book's parameter counts, OpenAI's names, causality, dropout, precision, errors,
an independent NumPy forward pass, and the speed options (scan, remat, vocab padding, KV cache)
checked against the plain model."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.config import PRESETS, GPTConfig, get_config
from gptjax.attention import dropout
from gptjax.model import GPT, abstract_params, count_params, dropout_rngs, init_cache, init_params, num_params
from gptjax.layout import stack_layers, to_canonical, to_layout, unstack_layers
from gptjax.options import Options

# (untied head, tied head), qkv_bias=False: the book's chapter 4 numbers
BOOK_PARAM_COUNTS = {
    "gpt2-small": (163_009_536, 124_412_160),
    "gpt2-medium": (406_212_608, 354_749_440),
    "gpt2-large": (838_220_800, 773_891_840),
    "gpt2-xl": (1_637_792_000, 1_557_380_800),
}


def _tokens(cfg: GPTConfig, seed: int = 0, batch: int = 2, T: int | None = None) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (batch, T or cfg.context_length), 0, cfg.vocab_size)


def _randomize(params: dict, seed: int = 0, scale: float = 0.2) -> dict:
    """Push every leaf off its init (biases non-zero, LayerNorm scales not one) so nothing hides."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([a + scale * jax.random.normal(k, a.shape, a.dtype) for a, k in zip(leaves, keys)])


def _params(cfg: GPTConfig, seed: int = 0) -> dict:
    # canonical params depend only on the shapes: share one init (one compile) across options/dropout variants
    return _init(cfg.replace(drop_rate=0.0), seed)


@functools.cache
def _init(cfg: GPTConfig, seed: int) -> dict:
    return init_params(cfg, jax.random.key(seed))


@functools.cache
def _forward(cfg: GPTConfig, opts: Options, deterministic: bool = True):
    """Jitted (params, idx, dropout key) -> logits, one compile per config; eager Flax is slow on CPU."""
    def f(params, idx_BT, key):
        return GPT(cfg, opts).apply({"params": params}, idx_BT, deterministic=deterministic, rngs={"dropout": key})
    return jax.jit(f)


def _apply(cfg: GPTConfig, params: dict, idx_BT: jax.Array, deterministic: bool = True,
           key: jax.Array | None = None, opts: Options = Options()) -> jax.Array:
    return _forward(cfg, opts, deterministic)(params, idx_BT, jax.random.key(0) if key is None else key)


# --- parameter counts and names ----------------------------------------------------------

@pytest.mark.parametrize("name", list(PRESETS))
def test_num_params_match_book(name):
    untied, tied = BOOK_PARAM_COUNTS[name]
    assert num_params(get_config(name)) == untied
    assert num_params(get_config(name, tie_embeddings=True)) == tied


def test_num_params_openai_gpt2_small():
    cfg = get_config("124M", qkv_bias=True, tie_embeddings=True)
    assert num_params(cfg) == 124_439_808
    # nanoGPT's "number of parameters: 123.65M" leaves out the position embeddings
    assert num_params(cfg, exclude_embeddings=True) == 124_439_808 - 1024 * 768


def test_count_params_matches_real_init(tiny_cfg):
    assert count_params(_params(tiny_cfg)) == num_params(tiny_cfg) == 2 * 97 * 32 + 16 * 32 + 2 * 12_608 + 64


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_param_tree_uses_openai_names(tiny_cfg, tie, qkv_bias):
    cfg = tiny_cfg.replace(tie_embeddings=tie, qkv_bias=qkv_bias)
    shapes = jax.tree.map(jnp.shape, abstract_params(cfg))
    D, L = cfg.emb_dim, cfg.n_layers
    expected_top = {"wte", "wpe", "ln_f", *(f"h_{i}" for i in range(L))} | (set() if tie else {"lm_head"})
    assert set(shapes) == expected_top
    assert shapes["wte"] == {"embedding": (cfg.vocab_size, D)}
    assert shapes["wpe"] == {"embedding": (cfg.context_length, D)}
    assert shapes["ln_f"] == {"scale": (D,), "bias": (D,)}
    if not tie:
        assert shapes["lm_head"] == {"kernel": (D, cfg.vocab_size)}
    c_attn = {"kernel": (D, 3 * D)} | ({"bias": (3 * D,)} if qkv_bias else {})
    for i in range(L):
        assert shapes[f"h_{i}"] == {
            "ln_1": {"scale": (D,), "bias": (D,)},
            "attn": {"c_attn": c_attn, "c_proj": {"kernel": (D, D), "bias": (D,)}},
            "ln_2": {"scale": (D,), "bias": (D,)},
            "mlp": {"c_fc": {"kernel": (D, 4 * D), "bias": (4 * D,)},
                    "c_proj": {"kernel": (4 * D, D), "bias": (D,)}},
        }


def test_params_are_float32_even_for_bfloat16_compute(tiny_cfg):
    params = abstract_params(tiny_cfg, Options(dtype="bfloat16"))
    assert {a.dtype for a in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}


# --- behaviour ---------------------------------------------------------------------------

@pytest.mark.parametrize("attn_impl", ["auto", "einsum"])
def test_model_is_causal(tiny_cfg, attn_impl):
    cfg, opts = tiny_cfg, Options(attn_impl=attn_impl)
    params = _params(cfg)
    idx_BT, t = _tokens(cfg), 6
    changed_BT = idx_BT.at[:, t + 1:].set((idx_BT[:, t + 1:] + 1) % cfg.vocab_size)
    logits, logits2 = _apply(cfg, params, idx_BT, opts=opts), _apply(cfg, params, changed_BT, opts=opts)
    assert logits.shape == (2, cfg.context_length, cfg.vocab_size)
    np.testing.assert_allclose(logits[:, :t + 1], logits2[:, :t + 1], rtol=1e-6, atol=1e-6)
    assert not np.any(np.all(np.isclose(logits[:, t + 1:], logits2[:, t + 1:], atol=1e-5), axis=-1))


def test_shorter_inputs_are_prefixes(tiny_cfg):
    """A prompt shorter than the context gives the same logits as the first rows of a longer one."""
    params = _params(tiny_cfg)
    idx_BT = _tokens(tiny_cfg)
    np.testing.assert_allclose(_apply(tiny_cfg, params, idx_BT[:, :5]), _apply(tiny_cfg, params, idx_BT)[:, :5],
                               rtol=1e-5, atol=1e-5)


def test_dropout_is_driven_by_rng_and_deterministic_flag(tiny_cfg):
    cfg = tiny_cfg.replace(drop_rate=0.3)
    params = _params(cfg)
    idx_BT = _tokens(cfg)
    k1, k2 = jax.random.key(1), jax.random.key(2)
    run = lambda key, det: _apply(cfg, params, idx_BT, deterministic=det, key=key)  # noqa: E731
    np.testing.assert_array_equal(run(k1, True), run(k2, True))
    np.testing.assert_array_equal(run(k1, False), run(k1, False))
    assert not np.allclose(run(k1, False), run(k2, False))
    assert not np.allclose(run(k1, False), run(k1, True))


def test_dropout_rngs_reseed_as_rbg_keys_and_keep_the_rate(tiny_cfg):
    """Training re-seeds the dropout key as unsafe_rbg (no threefry loops on CPU): reproducible per
    key, different across keys, and each dropout still zeroes `rate` of its inputs."""
    assert dropout_rngs(None) is None
    rngs = dropout_rngs(jax.random.PRNGKey(0))  # the raw uint32 key TrainState holds
    assert jax.random.key_impl(rngs["dropout"]) == "unsafe_rbg"
    assert dropout_rngs(rngs["dropout"])["dropout"] is rngs["dropout"]
    np.testing.assert_array_equal(jax.random.key_data(dropout_rngs(jax.random.PRNGKey(0))["dropout"]),
                                  jax.random.key_data(rngs["dropout"]))
    cfg = tiny_cfg.replace(drop_rate=0.25)
    params, idx_BT = _params(cfg), _tokens(cfg)
    run = jax.jit(lambda p, x, k: GPT(cfg).apply({"params": p}, x, deterministic=False, rngs=dropout_rngs(k)))
    a, b = run(params, idx_BT, jax.random.key(1)), run(params, idx_BT, jax.random.key(2))
    np.testing.assert_array_equal(a, run(params, idx_BT, jax.random.key(1)))
    assert not np.allclose(a, b)
    x = jnp.ones((64, 1024))
    y = dropout(x, 0.25, dropout_rngs(jax.random.key(3))["dropout"])
    assert abs(float(jnp.mean(y == 0)) - 0.25) < 0.01  # 65,536 draws: 6 sigma is 0.01
    np.testing.assert_allclose(np.unique(np.asarray(y)), [0.0, 1 / 0.75], rtol=1e-6)


@pytest.mark.parametrize("scan", [False, True])
def test_dropout_masks_keep_the_rate_and_are_independent_across_layers_and_steps(tiny_cfg, monkeypatch, scan):
    """Every dropout mask of a training step, for the keys train_step derives (fold_in(key, step)), through
    Flax's per-layer fold-ins (unsafe_rbg XORs) or scan's split: each keeps 1 - rate of its inputs, and no
    two masks of the same shape, in one step or in neighbouring steps, are correlated."""
    import gptjax.attention as attention
    import gptjax.model as model

    rate, masks = 0.1, []

    def recording(x, r, rng):
        keep = dropout(jnp.ones(x.shape, jnp.float32), r, rng) != 0  # the same rng gives the same mask
        jax.debug.callback(lambda k: masks.append(np.asarray(k)), keep)
        return dropout(x, r, rng)

    monkeypatch.setattr(model, "dropout", recording)
    monkeypatch.setattr(attention, "dropout", recording)
    cfg, opts = tiny_cfg.replace(drop_rate=rate, n_layers=3), Options(scan_layers=scan)
    params = to_layout(_params(tiny_cfg.replace(n_layers=3)), cfg, opts)
    idx_BT = _tokens(cfg, batch=4)
    run = jax.jit(lambda p, k: GPT(cfg, opts).apply({"params": p}, idx_BT, deterministic=False, rngs=dropout_rngs(k)))
    key = jax.random.PRNGKey(0)
    for step in range(4):
        jax.block_until_ready(run(params, jax.random.fold_in(key, step)))
    jax.effects_barrier()
    assert len(masks) == 4 * (1 + 3 * cfg.n_layers)  # embeddings, then attention weights and two residuals per block
    for m in masks:
        assert abs(m.mean() - (1 - rate)) < 6 * math.sqrt(rate * (1 - rate) / m.size)
    for i, a in enumerate(masks):
        for b in masks[i + 1:]:
            if a.shape != b.shape:
                continue
            # P(both kept) - P(a) P(b) is 0 for independent masks, with sd ~ p(1 - p) / sqrt(n); equal masks give 0.09
            dev = (a & b).mean() - a.mean() * b.mean()
            assert abs(dev) < 6 * (1 - rate) * rate / math.sqrt(a.size), (a.shape, dev)


def test_zero_dropout_needs_no_rng(tiny_cfg):
    params = _params(tiny_cfg)
    idx_BT = _tokens(tiny_cfg)
    apply = jax.jit(lambda p, idx: GPT(tiny_cfg).apply({"params": p}, idx, deterministic=False))
    np.testing.assert_allclose(apply(params, idx_BT), _apply(tiny_cfg, params, idx_BT), rtol=1e-6, atol=1e-6)


def test_bfloat16_compute_gives_float32_logits_close_to_float32(tiny_cfg):
    params = _randomize(_params(tiny_cfg), scale=0.05)
    idx_BT = _tokens(tiny_cfg)
    ref = _apply(tiny_cfg, params, idx_BT)
    bf16 = _apply(tiny_cfg, params, idx_BT, opts=Options(dtype="bfloat16"))
    assert ref.dtype == bf16.dtype == jnp.float32
    err = np.abs(np.asarray(bf16) - np.asarray(ref)).max()
    assert err < 0.05 * np.abs(np.asarray(ref)).max(), err


@pytest.mark.parametrize("tie", [False, True])
def test_head_reads_final_layernorm(tiny_cfg, tie):
    """Tied: logits = x @ wte.T; untied: x @ lm_head, with x the output of ln_f."""
    cfg = tiny_cfg.replace(tie_embeddings=tie)
    params = _randomize(_params(cfg))
    logits, state = jax.jit(lambda p, idx: GPT(cfg).apply({"params": p}, idx, capture_intermediates=True,
                                                          mutable=["intermediates"]))(params, _tokens(cfg))
    x_BTD = state["intermediates"]["ln_f"]["__call__"][0]
    head_DV = params["wte"]["embedding"].T if tie else params["lm_head"]["kernel"]
    np.testing.assert_allclose(logits, x_BTD @ head_DV, rtol=1e-5, atol=1e-5)


# --- errors a person can act on ----------------------------------------------------------

@pytest.mark.parametrize("overrides, match", [
    (dict(emb_dim=30, n_heads=4), "not divisible by n_heads"),
    (dict(emb_dim=0), "emb_dim must be a positive integer"),
    (dict(n_layers=-1), "n_layers must be a positive integer"),
    (dict(vocab_size=0), "vocab_size must be a positive integer"),
    (dict(context_length=-8), "context_length must be a positive integer"),
    (dict(n_heads=0), "n_heads must be a positive integer"),
    (dict(drop_rate=1.0), "drop_rate must be in"),
    (dict(drop_rate=-0.1), "drop_rate must be in"),
])
def test_bad_config_raises_clear_error(tiny_cfg, overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_cfg.replace(**overrides)
    with pytest.raises(ValueError, match=match):
        GPTConfig(**{**tiny_cfg.to_dict(), **overrides})


def test_unknown_preset_and_key():
    with pytest.raises(ValueError, match="unknown preset 'gpt3'.*gpt2-small"):
        get_config("gpt3")
    with pytest.raises(ValueError, match=r"unknown GPTConfig keys \['n_embd'\]"):
        get_config("gpt2-small", n_embd=768)
    with pytest.raises(ValueError, match=r"unknown GPTConfig keys \['dtype'\] \(\['dtype'\]: how the model runs, now "
                                         r"gptjax.options.Options\)"):
        get_config("gpt2-small", dtype="bfloat16")
    assert get_config("355M") == get_config("gpt2-medium")


def test_input_longer_than_context_raises(tiny_cfg):
    params = _params(tiny_cfg)
    with pytest.raises(ValueError, match="17 tokens but context_length is 16"):
        GPT(tiny_cfg).apply({"params": params}, _tokens(tiny_cfg, T=tiny_cfg.context_length + 1))


# --- an independent NumPy forward pass ---------------------------------------------------

def _np_layer_norm(x, p, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)  # biased, as in the book and GPT-2
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _np_gelu(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def _np_linear(x, p):
    return x @ p["kernel"] + p.get("bias", 0.0)


def _np_gpt(cfg: GPTConfig, params: dict, idx_BT: np.ndarray) -> np.ndarray:
    """GPT-2 forward in float64 NumPy, written from the paper/book, not from model.py."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    B, T = idx_BT.shape
    H, K = cfg.n_heads, cfg.emb_dim // cfg.n_heads
    x = p["wte"]["embedding"][idx_BT] + p["wpe"]["embedding"][:T]
    future = np.triu(np.ones((T, T), bool), k=1)
    for i in range(cfg.n_layers):
        blk = p[f"h_{i}"]
        h = _np_layer_norm(x, blk["ln_1"])
        q, k, v = np.split(_np_linear(h, blk["attn"]["c_attn"]), 3, axis=-1)
        q, k, v = (a.reshape(B, T, H, K).transpose(0, 2, 1, 3) for a in (q, k, v))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(K)
        scores[..., future] = -np.inf
        w = np.exp(scores - scores.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        y = (w @ v).transpose(0, 2, 1, 3).reshape(B, T, cfg.emb_dim)
        x = x + _np_linear(y, blk["attn"]["c_proj"])
        h = _np_gelu(_np_linear(_np_layer_norm(x, blk["ln_2"]), blk["mlp"]["c_fc"]))
        x = x + _np_linear(h, blk["mlp"]["c_proj"])
    x = _np_layer_norm(x, p["ln_f"])
    return x @ (p["wte"]["embedding"].T if cfg.tie_embeddings else p["lm_head"]["kernel"])


@pytest.mark.parametrize("tie, qkv_bias, attn_impl", [
    (False, False, "auto"),  # the book's model
    (True, True, "auto"),  # OpenAI's layout
    (False, False, "einsum"),
])
def test_matches_numpy_reference(tiny_cfg, tie, qkv_bias, attn_impl):
    cfg = tiny_cfg.replace(tie_embeddings=tie, qkv_bias=qkv_bias)
    params = _randomize(_params(cfg), seed=1)
    idx_BT = _tokens(cfg, seed=2)
    logits = _apply(cfg, params, idx_BT, opts=Options(attn_impl=attn_impl))
    ref = _np_gpt(cfg, params, np.asarray(idx_BT))
    assert np.abs(ref).max() > 1.0  # the check is not vacuous
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4)


# --- speed options keep the math -----------------------------------------------------------

def _loss_and_grads(cfg: GPTConfig, params: dict, idx_BT: jax.Array, key: jax.Array, opts: Options = Options()):
    def loss(p):
        logits = GPT(cfg, opts).apply({"params": p}, idx_BT[:, :-1], deterministic=cfg.drop_rate == 0.0,
                                rngs={"dropout": key})
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, idx_BT[:, 1:, None], axis=-1))
    return jax.jit(jax.value_and_grad(loss))(params)


def test_stack_unstack_round_trip(tiny_cfg):
    params = _params(tiny_cfg)
    stacked = stack_layers(params)
    assert set(stacked) == {"wte", "wpe", "h", "ln_f", "lm_head"}
    assert stacked["h"]["attn"]["c_attn"]["kernel"].shape == (tiny_cfg.n_layers, 32, 96)
    assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(jnp.shape, abstract_params(tiny_cfg, Options(scan_layers=True)))
    back = unstack_layers(stacked)
    assert jax.tree_util.tree_all(jax.tree.map(lambda a, b: bool((a == b).all()), back, params))
    assert unstack_layers(params) is params and stack_layers(stacked) is stacked


@pytest.mark.parametrize("opts", [
    dict(scan_layers=True),
    dict(scan_layers=True, scan_unroll=2),
    dict(remat="full"),
    dict(scan_layers=True, remat="dots"),
    dict(remat="dots_no_batch"),
], ids=["scan", "scan-unroll2", "remat-full", "scan-remat-dots", "remat-dots-no-batch"])
def test_scan_and_remat_equal_the_unrolled_model(tiny_cfg, opts):
    """Same loss and gradients (forward and backward), params converted between layouts."""
    params = _randomize(_params(tiny_cfg), seed=3, scale=0.05)
    idx_BT = _tokens(tiny_cfg, seed=4)
    cfg, opts = tiny_cfg, Options(**opts)
    ref_loss, ref_grads = _loss_and_grads(tiny_cfg, params, idx_BT, jax.random.key(0))
    loss, grads = _loss_and_grads(cfg, to_layout(params, cfg, opts), idx_BT, jax.random.key(0), opts)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(unstack_layers(grads)),
                            jax.tree_util.tree_leaves(ref_grads)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_scan_dropout_differs_per_layer_and_is_reproducible(tiny_cfg):
    cfg, opts = tiny_cfg.replace(drop_rate=0.5), Options(scan_layers=True)
    params = to_layout(_params(tiny_cfg), cfg, opts)
    idx_BT = _tokens(cfg)
    run = lambda key: _apply(cfg, params, idx_BT, deterministic=False, key=key, opts=opts)  # noqa: E731
    np.testing.assert_array_equal(run(jax.random.key(1)), run(jax.random.key(1)))
    assert not np.allclose(run(jax.random.key(1)), run(jax.random.key(2)))
    np.testing.assert_allclose(_apply(cfg, params, idx_BT, opts=opts), _apply(tiny_cfg, _params(tiny_cfg), idx_BT),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tie", [False, True])
def test_padded_vocab_gives_the_same_logits_and_grads(tiny_cfg, tie):
    base = cfg = tiny_cfg.replace(tie_embeddings=tie)
    opts = Options(vocab_multiple=64)
    assert opts.padded_vocab_size(cfg.vocab_size) == 128 and opts.padded_vocab_size(50257) == 50_304
    params = _randomize(_params(base), seed=5)
    padded = to_layout(params, cfg, opts)
    assert padded["wte"]["embedding"].shape == (128, 32)
    assert jax.tree.map(jnp.shape, padded) == jax.tree.map(jnp.shape, abstract_params(cfg, opts))
    idx_BT = _tokens(base, seed=6)
    logits = _apply(cfg, padded, idx_BT, opts=opts)
    assert logits.shape == (2, cfg.context_length, cfg.vocab_size)  # padded logits never leave the model
    np.testing.assert_allclose(logits, _apply(base, params, idx_BT), rtol=1e-5, atol=1e-5)
    loss, grads = _loss_and_grads(cfg, padded, idx_BT, jax.random.key(0), opts)
    ref_loss, ref_grads = _loss_and_grads(base, params, idx_BT, jax.random.key(0))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    np.testing.assert_allclose(grads["wte"]["embedding"][:97], ref_grads["wte"]["embedding"], rtol=1e-4, atol=1e-7)
    assert not np.asarray(grads["wte"]["embedding"][97:]).any()  # padding rows learn nothing
    np.testing.assert_array_equal(to_canonical(padded, cfg, opts)["wte"]["embedding"], params["wte"]["embedding"])


def test_convert_params_rejects_a_smaller_vocab(tiny_cfg):
    with pytest.raises(ValueError, match="vocab rows"):
        to_layout(_params(tiny_cfg), tiny_cfg.replace(vocab_size=120), Options(vocab_multiple=64))


@pytest.mark.parametrize("overrides, match", [
    (dict(remat="everything"), "remat must be one of"),
    (dict(scan_unroll=0), "scan_unroll must be an integer >= 1"),
    (dict(vocab_multiple=0), "vocab_multiple must be an integer >= 1"),
    (dict(matmul_precision="tf32"), "matmul_precision must be one of"),
    (dict(dtype="float64"), "dtype must be one of"),
    (dict(attn_impl="flash"), "attn_impl must be one of"),
])
def test_bad_speed_options(overrides, match):
    with pytest.raises(ValueError, match=match):
        Options().replace(**overrides)
    with pytest.raises(ValueError, match=match):
        Options(**overrides)


def test_book_init_uses_pytorch_defaults(tiny_cfg):
    p = abstract_params(tiny_cfg.replace(init="book"))
    assert jax.tree.map(jnp.shape, p) == jax.tree.map(jnp.shape, abstract_params(tiny_cfg))
    params = init_params(tiny_cfg.replace(init="book", qkv_bias=True), jax.random.key(0))
    assert 0.8 < float(jnp.std(params["wte"]["embedding"])) < 1.2  # nn.Embedding: N(0, 1)
    fc = params["h_0"]["mlp"]["c_fc"]
    assert float(jnp.max(jnp.abs(fc["kernel"]))) <= 1 / math.sqrt(32) and float(jnp.abs(fc["bias"]).max()) > 0
    assert float(jnp.max(jnp.abs(params["h_0"]["mlp"]["c_proj"]["kernel"]))) <= 1 / math.sqrt(128)


# --- KV cache ------------------------------------------------------------------------------

def _cached(cfg, params, cache, idx_BT, pos_B, last_B=None):
    f = jax.jit(lambda p, c, x, pos, last: GPT(cfg).apply({"params": p, "cache": c}, x, pos_B=pos, last_B=last,
                                                            mutable=["cache"]))
    logits, state = f(params, cache, idx_BT, pos_B, last_B)
    return logits, state["cache"]


@pytest.mark.parametrize("shared", [True, False])  # one position for all rows / one per row
def test_kv_cache_prefill_then_decode_equals_full_forward(tiny_cfg, shared):
    params = _randomize(_params(tiny_cfg), seed=7, scale=0.05)
    idx_BT = _tokens(tiny_cfg, seed=8)
    full = _apply(tiny_cfg, params, idx_BT)
    B, T0, S = 2, 5, tiny_cfg.context_length
    cache = init_cache(tiny_cfg, B, S)
    assert cache["h_1"]["attn"]["k"].shape == (B * 4, 8, S) and cache["h_1"]["attn"]["v"].shape == (B * 4, S, 8)
    pos = (lambda t: jnp.int32(t)) if shared else (lambda t: jnp.full((B,), t, jnp.int32))
    logits, cache = _cached(tiny_cfg, params, cache, idx_BT[:, :T0], pos(0))
    np.testing.assert_allclose(logits, full[:, :T0], rtol=1e-5, atol=1e-5)
    for t in range(T0, S):
        logits, cache = _cached(tiny_cfg, params, cache, idx_BT[:, t:t + 1], pos(t))
        np.testing.assert_allclose(logits[:, 0], full[:, t], rtol=1e-5, atol=1e-5)


def test_kv_cache_rows_at_different_positions(tiny_cfg):
    """Right-padded prompts of lengths 3 and 6: each row's logits equal its own unpadded forward."""
    params = _randomize(_params(tiny_cfg), seed=9, scale=0.05)
    idx_BT = _tokens(tiny_cfg, seed=10, T=8)
    lens = jnp.array([3, 6])
    cache = init_cache(tiny_cfg, 2, 10)
    last, cache = _cached(tiny_cfg, params, cache, idx_BT, jnp.zeros((2,), jnp.int32), last_B=lens - 1)
    assert last.shape == (2, 1, tiny_cfg.vocab_size)
    nxt = jnp.array([[11], [12]])
    step, _ = _cached(tiny_cfg, params, cache, nxt, lens)
    for b, n in enumerate([3, 6]):
        row = jnp.concatenate([idx_BT[b:b + 1, :n], nxt[b:b + 1]], axis=1)
        ref = _apply(tiny_cfg, params, row)
        np.testing.assert_allclose(last[b, 0], ref[0, n - 1], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(step[b, 0], ref[0, n], rtol=1e-5, atol=1e-5)


def test_kv_cache_needs_per_layer_params(tiny_cfg):
    cfg, opts = tiny_cfg, Options(scan_layers=True)
    with pytest.raises(ValueError, match="unstack_layers"):
        GPT(cfg, opts).apply({"params": to_layout(_params(tiny_cfg), cfg, opts), "cache": {}},
                             jnp.zeros((1, 1), jnp.int32),
                       pos_B=jnp.zeros((1,), jnp.int32), mutable=["cache"])
    with pytest.raises(ValueError, match="exceeds context_length"):
        init_cache(tiny_cfg, 1, tiny_cfg.context_length + 1)


def test_out_in_kernels_are_the_same_model(tiny_cfg):
    """PyTorch's (out, in) kernel layout: same init values transposed, same logits, both ways convertible."""
    cfg, opts = tiny_cfg.replace(qkv_bias=True), Options(linear_layout="out_in")
    base = cfg
    ref = init_params(base, jax.random.key(3))
    params = init_params(cfg, jax.random.key(3), opts)
    assert params["h_0"]["mlp"]["c_fc"]["kernel"].shape == (128, 32)
    np.testing.assert_array_equal(to_canonical(params, cfg, opts)["h_1"]["attn"]["c_proj"]["kernel"],
                                  ref["h_1"]["attn"]["c_proj"]["kernel"])
    ref = _randomize(ref, seed=11, scale=0.05)
    idx_BT = _tokens(base, seed=12)
    np.testing.assert_allclose(_apply(cfg, to_layout(ref, cfg, opts), idx_BT, opts=opts),
                               _apply(base, ref, idx_BT), rtol=1e-5, atol=1e-5)
    stacked = to_layout(ref, cfg, opts.replace(scan_layers=True))  # stacked kernels swap their last two axes
    assert stacked["h"]["mlp"]["c_fc"]["kernel"].shape == (2, 128, 32)
    with pytest.raises(ValueError, match="linear_layout must be one of"):
        Options(linear_layout="column")


def test_grad_barrier_is_the_identity_and_its_gradient_too():
    from gptjax.cpu import grad_barrier

    x = jax.random.normal(jax.random.key(0), (2, 3, 4))
    f = lambda x: jnp.sum(jnp.sin(grad_barrier(x * 3.0)) ** 2)  # noqa: E731
    ref = lambda x: jnp.sum(jnp.sin(x * 3.0) ** 2)  # noqa: E731
    np.testing.assert_array_equal(grad_barrier(x), x)
    np.testing.assert_array_equal(jax.jit(jax.grad(f))(x), jax.jit(jax.grad(ref))(x))
    # a NaN gradient stays NaN where it was and leaves the other entries alone
    g = jax.grad(lambda x: jnp.sum(grad_barrier(x) * jnp.where(jnp.arange(4) == 0, jnp.nan, 1.0)))(x)
    assert np.isnan(g[..., 0]).all() and (g[..., 1:] == 1.0).all()
    # the backward pass carries the gradient through a loop XLA cannot fuse across
    assert "while" in jax.jit(jax.grad(f)).lower(x).as_text()


def _bf16(a) -> np.ndarray:
    return np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32), np.float64)


@pytest.mark.parametrize("w_in_axis", [0, 1])
def test_bf16_product_rounds_operands_to_bfloat16_and_accumulates_in_float32(w_in_axis):
    from gptjax.cpu import bf16_product

    kx, kw, kg = jax.random.split(jax.random.key(5), 3)
    x_BTI = jax.random.normal(kx, (2, 7, 40))
    w = jax.random.normal(kw, (40, 24) if w_in_axis == 0 else (24, 40))
    g_BTO = jax.random.normal(kg, (2, 7, 24))
    y, vjp = jax.vjp(jax.jit(lambda x, w: bf16_product(x, w, w_in_axis)), x_BTI, w)
    dx, dw = vjp(g_BTO)
    w_IO = _bf16(w) if w_in_axis == 0 else _bf16(w).T
    # the float64 products of the rounded operands; the output gradient is rounded as well
    y_ref = _bf16(x_BTI) @ w_IO
    dx_ref = _bf16(g_BTO) @ w_IO.T
    dw_IO = _bf16(x_BTI).reshape(-1, 40).T @ _bf16(g_BTO).reshape(-1, 24)
    assert y.dtype == dx.dtype == dw.dtype == jnp.float32 and dw.shape == w.shape
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, dw_IO if w_in_axis == 0 else dw_IO.T, rtol=1e-5, atol=1e-5)
    # not float32 in disguise: the unrounded product differs by far more than float32 rounding
    assert np.abs(np.asarray(y) - np.asarray(x_BTI, np.float64) @ np.asarray(w if w_in_axis == 0 else w.T)).max() > 1e-2
    # bfloat16 inputs keep their dtype in the gradient
    dxb, _ = jax.vjp(lambda x, w: bf16_product(x, w, w_in_axis), x_BTI.astype(jnp.bfloat16), w)[1](g_BTO)
    assert dxb.dtype == jnp.bfloat16


@pytest.mark.parametrize("layout, tie", [("in_out", False), ("out_in", True)])
def test_bfloat16_matmuls_stay_close_to_float32(tiny_cfg, layout, tie):
    base = cfg = tiny_cfg.replace(tie_embeddings=tie)
    ref_opts = Options(linear_layout=layout)
    opts = ref_opts.replace(matmul_precision="bfloat16")
    params = to_layout(_randomize(_params(base), seed=3, scale=0.05), cfg, ref_opts)
    idx_BT = _tokens(base, seed=4, T=base.context_length + 1)
    loss_ref, grads_ref = _loss_and_grads(base, params, idx_BT, jax.random.key(0), ref_opts)
    loss, grads = _loss_and_grads(cfg, params, idx_BT, jax.random.key(0), opts)
    assert loss != loss_ref  # the products did run in bfloat16
    np.testing.assert_allclose(loss, loss_ref, rtol=5e-3)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        g_ref = np.asarray(dict(jax.tree_util.tree_leaves_with_path(grads_ref))[path]).ravel()
        g = np.asarray(g).ravel()
        assert g.dtype == np.float32
        cos = g @ g_ref / (np.linalg.norm(g) * np.linalg.norm(g_ref) + 1e-30)
        assert cos > 0.99, (jax.tree_util.keystr(path), cos)
