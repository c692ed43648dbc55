"""The chapter-3 progression agrees with itself, with the book, and with the production kernels."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.attention import (
    CausalAttention,
    MultiHeadAttention,
    MultiHeadAttentionWrapper,
    SelfAttentionV1,
    SelfAttentionV2,
    causal_attention,
    cache_attention,
    causal_attention_einsum,
    default_impl,
    simplified_self_attention,
)
from gptjax.config import GPTConfig
from gptjax.model import CausalSelfAttention
from gptjax.options import Options

# "Your journey starts with one step", one 3-d embedding per word (the book's listing 3.3)
BOOK_INPUTS_TD = np.array(
    [[0.43, 0.15, 0.89], [0.55, 0.87, 0.66], [0.57, 0.85, 0.64],
     [0.22, 0.58, 0.33], [0.77, 0.25, 0.10], [0.05, 0.80, 0.55]], np.float32)

B, T, D, H, K = 2, 10, 12, 4, 6
E = H * K


def _normal(seed: int, *shape, dtype=jnp.float32) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def _qkv(seed: int = 0, b: int = B, t: int = T, h: int = H, k: int = K):
    return tuple(_normal(seed + i, b, t, h, k) for i in range(3))


def _mha_heads(p: dict, x_BTD: jax.Array) -> tuple[jax.Array, ...]:
    """q, k, v of a MultiHeadAttention computed by hand from its params, as (B, T, H, K)."""
    out = []
    for name in ("W_query", "W_key", "W_value"):
        a_BTE = x_BTD @ p[name]["kernel"] + p[name].get("bias", 0.0)
        out.append(a_BTE.reshape(*x_BTD.shape[:2], H, K))
    return tuple(out)


def _out_proj(p: dict, ctx_BTE: jax.Array) -> jax.Array:
    return ctx_BTE @ p["out_proj"]["kernel"] + p["out_proj"]["bias"]


# --- the book's examples ---------------------------------------------------------------

def test_simplified_self_attention_matches_book():
    ctx_TD = simplified_self_attention(jnp.asarray(BOOK_INPUTS_TD))
    assert ctx_TD.shape == (6, 3)
    np.testing.assert_allclose(ctx_TD[1], [0.4419, 0.6515, 0.5683], atol=1e-4)  # "journey"
    np.testing.assert_allclose(ctx_TD[0], [0.4421, 0.5931, 0.5790], atol=1e-4)


def test_self_attention_v1_equals_v2_with_copied_weights():
    x_TD = jnp.asarray(BOOK_INPUTS_TD)
    v2 = SelfAttentionV2(d_out=2)
    p2 = v2.init(jax.random.key(789), x_TD)["params"]
    assert set(p2) == {"W_query", "W_key", "W_value"} and "bias" not in p2["W_query"]
    p1 = {name: p2[name]["kernel"] for name in p2}
    y1_TK = SelfAttentionV1(d_out=2).apply({"params": p1}, x_TD)
    y2_TK = v2.apply({"params": p2}, x_TD)
    assert y1_TK.shape == (6, 2)
    np.testing.assert_allclose(y1_TK, y2_TK, rtol=1e-6, atol=1e-6)


def test_self_attention_v1_init_is_uniform_like_torch_rand():
    p = SelfAttentionV1(d_out=2).init(jax.random.key(0), jnp.asarray(BOOK_INPUTS_TD))["params"]
    assert p["W_query"].shape == (3, 2)
    w = np.concatenate([np.ravel(a) for a in p.values()])
    assert w.min() >= 0.0 and w.max() < 1.0


def test_qkv_bias_option_adds_biases():
    p = SelfAttentionV2(d_out=2, qkv_bias=True).init(jax.random.key(0), jnp.asarray(BOOK_INPUTS_TD))["params"]
    assert all(p[name]["bias"].shape == (2,) for name in p)


# --- the steps agree with each other and with the production kernels --------------------

def test_causal_attention_module_last_row_sees_everything():
    """The last query may look at every key, so its row equals unmasked self-attention."""
    x_BTD = _normal(1, B, T, D)
    ca = CausalAttention(d_out=K, context_length=T, drop_rate=0.0)
    p = ca.init(jax.random.key(2), x_BTD)["params"]
    y_BTK = ca.apply({"params": p}, x_BTD)
    full_BTK = SelfAttentionV2(d_out=K).apply({"params": p}, x_BTD)  # same param names
    np.testing.assert_allclose(y_BTK[:, -1], full_BTK[:, -1], rtol=1e-5, atol=1e-6)
    # the first query sees only itself: its context is its own value vector
    np.testing.assert_allclose(y_BTK[:, 0], x_BTD[:, 0] @ p["W_value"]["kernel"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(y_BTK[:, 1:-1], full_BTK[:, 1:-1], atol=1e-3)


@pytest.mark.parametrize("impl", ["xla", "einsum"])
def test_causal_attention_module_equals_production_single_head(impl):
    x_BTD = _normal(3, B, T, D)
    ca = CausalAttention(d_out=K, context_length=T, drop_rate=0.0, qkv_bias=True)
    p = ca.init(jax.random.key(4), x_BTD)["params"]
    q, k, v = ((x_BTD @ p[n]["kernel"] + p[n]["bias"])[:, :, None, :] for n in ("W_query", "W_key", "W_value"))
    ref_BTK = causal_attention(q, k, v, impl=impl)[:, :, 0]
    np.testing.assert_allclose(ca.apply({"params": p}, x_BTD), ref_BTK, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_multi_head_attention_equals_production_kernels(qkv_bias):
    x_BTD = _normal(5, B, T, D)
    mha = MultiHeadAttention(d_out=E, context_length=T, drop_rate=0.0, num_heads=H, qkv_bias=qkv_bias)
    p = mha.init(jax.random.key(6), x_BTD)["params"]
    y_BTE = mha.apply({"params": p}, x_BTD)
    q, k, v = _mha_heads(p, x_BTD)
    for ctx_BTHK in (causal_attention(q, k, v, impl="xla"), causal_attention(q, k, v, impl="einsum"),
                     causal_attention_einsum(q, k, v)):
        np.testing.assert_allclose(_out_proj(p, ctx_BTHK.reshape(B, T, E)), y_BTE, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_wrapper_with_sliced_weights_equals_multi_head_attention(qkv_bias):
    x_BTD = _normal(7, B, T, D)
    mha = MultiHeadAttention(d_out=E, context_length=T, drop_rate=0.0, num_heads=H, qkv_bias=qkv_bias)
    p = mha.init(jax.random.key(8), x_BTD)["params"]
    # head h of the efficient version owns columns h*K:(h+1)*K of each projection
    wrapper_params = {
        f"head_{h}": {name: {leaf: a[..., h * K:(h + 1) * K] for leaf, a in p[name].items()}
                      for name in ("W_query", "W_key", "W_value")}
        for h in range(H)
    }
    wrapper = MultiHeadAttentionWrapper(d_out=K, context_length=T, drop_rate=0.0, num_heads=H, qkv_bias=qkv_bias)
    assert jax.tree.map(jnp.shape, wrapper.init(jax.random.key(0), x_BTD)["params"]) == \
        jax.tree.map(jnp.shape, wrapper_params)
    ctx_BTE = wrapper.apply({"params": wrapper_params}, x_BTD)
    assert ctx_BTE.shape == (B, T, E)
    np.testing.assert_allclose(ctx_BTE, causal_attention(*_mha_heads(p, x_BTD)).reshape(B, T, E),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_out_proj(p, ctx_BTE), mha.apply({"params": p}, x_BTD), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["xla", "einsum"])
def test_model_attention_equals_book_multi_head_attention(impl):
    """The model's fused c_attn is W_query | W_key | W_value side by side; c_proj is out_proj."""
    cfg = GPTConfig(vocab_size=11, context_length=T, emb_dim=E, n_heads=H, n_layers=1, drop_rate=0.0,
                    qkv_bias=True)
    x_BTE = _normal(9, B, T, E)
    p_model = CausalSelfAttention(cfg, Options(attn_impl=impl)).init(jax.random.key(10), x_BTE)["params"]
    split = lambda a: jnp.split(a, 3, axis=-1)  # noqa: E731
    (wq, wk, wv), (bq, bk, bv) = split(p_model["c_attn"]["kernel"]), split(p_model["c_attn"]["bias"])
    p_book = {"W_query": {"kernel": wq, "bias": bq}, "W_key": {"kernel": wk, "bias": bk},
              "W_value": {"kernel": wv, "bias": bv}, "out_proj": p_model["c_proj"]}
    mha = MultiHeadAttention(d_out=E, context_length=T, drop_rate=0.0, num_heads=H, qkv_bias=True)
    np.testing.assert_allclose(CausalSelfAttention(cfg, Options(attn_impl=impl)).apply({"params": p_model}, x_BTE),
                               mha.apply({"params": p_book}, x_BTE), rtol=1e-5, atol=1e-5)


# --- causality ------------------------------------------------------------------------

def _perturb_after(x: jax.Array, t: int, seed: int = 99) -> jax.Array:
    return x.at[:, t + 1:].add(_normal(seed, *x[:, t + 1:].shape))


@pytest.mark.parametrize("impl", ["xla", "einsum"])
def test_production_attention_is_causal(impl):
    q, k, v = _qkv(11)
    t = 4
    y = causal_attention(q, k, v, impl=impl)
    y2 = causal_attention(_perturb_after(q, t, 1), _perturb_after(k, t, 2), _perturb_after(v, t, 3), impl=impl)
    np.testing.assert_allclose(y[:, :t + 1], y2[:, :t + 1], rtol=1e-6, atol=1e-6)
    assert not np.allclose(y[:, t + 1:], y2[:, t + 1:], atol=1e-3)


@pytest.mark.parametrize("make", [
    lambda: CausalAttention(d_out=K, context_length=T, drop_rate=0.0),
    lambda: MultiHeadAttentionWrapper(d_out=K, context_length=T, drop_rate=0.0, num_heads=H),
    lambda: MultiHeadAttention(d_out=E, context_length=T, drop_rate=0.0, num_heads=H),
], ids=["CausalAttention", "MultiHeadAttentionWrapper", "MultiHeadAttention"])
def test_book_modules_are_causal(make):
    module, x_BTD, t = make(), _normal(12, B, T, D), 3
    p = module.init(jax.random.key(13), x_BTD)
    y, y2 = module.apply(p, x_BTD), module.apply(p, _perturb_after(x_BTD, t))
    np.testing.assert_allclose(y[:, :t + 1], y2[:, :t + 1], rtol=1e-6, atol=1e-6)
    assert not np.allclose(y[:, t + 1:], y2[:, t + 1:], atol=1e-3)


def test_book_modules_reject_inputs_longer_than_context():
    x_BTD = _normal(0, 1, T + 1, D)
    with pytest.raises(ValueError, match="context_length"):
        CausalAttention(d_out=K, context_length=T, drop_rate=0.0).init(jax.random.key(0), x_BTD)
    with pytest.raises(ValueError, match="context_length"):
        MultiHeadAttention(d_out=E, context_length=T, drop_rate=0.0, num_heads=H).init(jax.random.key(0), x_BTD)


def test_multi_head_attention_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        MultiHeadAttention(d_out=10, context_length=T, drop_rate=0.0, num_heads=4).init(
            jax.random.key(0), _normal(0, 1, T, D))


# --- dropout on the attention weights ----------------------------------------------------

def _check_half_dropped(w_drop: np.ndarray, w_ref: np.ndarray, rate: float = 0.5) -> None:
    """Visible (causal) weights are either zeroed or scaled by 1/(1-rate); about `rate` of them are zeroed."""
    visible = np.broadcast_to(np.tril(np.ones(w_ref.shape[-2:], bool)), w_ref.shape)
    assert np.all(w_drop[~visible] == 0.0)
    dropped = visible & (w_drop == 0.0)
    kept = visible & ~dropped
    np.testing.assert_allclose(w_drop[kept], w_ref[kept] / (1.0 - rate), rtol=1e-5, atol=1e-7)
    assert 0.4 < dropped.sum() / visible.sum() < 0.6


def test_causal_attention_module_dropout():
    x_BTD = _normal(14, 4, 16, D)
    ca = CausalAttention(d_out=K, context_length=16, drop_rate=0.5)
    p = ca.init(jax.random.key(15), x_BTD)
    k1, k2 = jax.random.key(1), jax.random.key(2)

    def run(key, deterministic):
        y, state = ca.apply(p, x_BTD, deterministic, rngs={"dropout": key}, mutable=["intermediates"])
        return y, np.asarray(state["intermediates"]["attn_weights"][0])

    (y_a, w_ref), (y_b, _) = run(k1, True), run(k2, True)
    np.testing.assert_array_equal(y_a, y_b)
    (y_1, w_1), (y_1again, _), (y_2, _) = run(k1, False), run(k1, False), run(k2, False)
    np.testing.assert_array_equal(y_1, y_1again)
    assert not np.allclose(y_1, y_2) and not np.allclose(y_1, y_a)
    _check_half_dropped(w_1, w_ref)


def test_multi_head_attention_dropout():
    x_BTD = _normal(16, 4, 16, D)
    mha = MultiHeadAttention(d_out=E, context_length=16, drop_rate=0.5, num_heads=H)
    p = mha.init(jax.random.key(17), x_BTD)
    k1, k2 = jax.random.key(1), jax.random.key(2)
    np.testing.assert_array_equal(mha.apply(p, x_BTD, True, rngs={"dropout": k1}),
                                  mha.apply(p, x_BTD, True, rngs={"dropout": k2}))
    _, state = mha.apply(p, x_BTD, False, rngs={"dropout": k1}, mutable=["intermediates"])
    _, ref = mha.apply(p, x_BTD, True, mutable=["intermediates"])
    _check_half_dropped(np.asarray(state["intermediates"]["attn_weights"][0]),
                        np.asarray(ref["intermediates"]["attn_weights"][0]))


def test_einsum_attention_dropout():
    # with one-hot values v[s] = e_s the output row is the attention row itself
    b, t = 4, 16
    q, k, _ = _qkv(18, b=b, t=t, h=2, k=t)
    v = jnp.broadcast_to(jnp.eye(t)[None, :, None, :], (b, t, 2, t))
    as_weights = lambda y_BTHS: np.asarray(y_BTHS.transpose(0, 2, 1, 3))  # noqa: E731
    k1, k2 = jax.random.key(1), jax.random.key(2)
    w_ref = as_weights(causal_attention_einsum(q, k, v))
    np.testing.assert_allclose(w_ref.sum(-1), 1.0, rtol=1e-5)
    y_1 = causal_attention_einsum(q, k, v, dropout_rate=0.5, dropout_rng=k1)
    np.testing.assert_array_equal(y_1, causal_attention_einsum(q, k, v, dropout_rate=0.5, dropout_rng=k1))
    assert not np.allclose(y_1, causal_attention_einsum(q, k, v, dropout_rate=0.5, dropout_rng=k2))
    _check_half_dropped(as_weights(y_1), w_ref)
    # the production entry point routes dropout to the einsum path, whatever impl is asked for
    np.testing.assert_array_equal(causal_attention(q, k, v, impl="xla", dropout_rate=0.5, dropout_rng=k1), y_1)


# --- production kernels: decoding offset, implementations, precision ---------------------

@pytest.mark.parametrize("t0", [0, 3, T - 1])
def test_einsum_q_offset_equals_rows_of_full_attention(t0):
    q, k, v = _qkv(20)
    full = causal_attention_einsum(q, k, v)
    np.testing.assert_allclose(causal_attention_einsum(q[:, t0:], k, v, q_offset=t0), full[:, t0:],
                               rtol=1e-6, atol=1e-6)
    # a KV cache longer than what is filled: slots after the last query are masked, whatever they hold
    pad = lambda a: jnp.concatenate([a, 1e3 * _normal(21, B, 6, H, K)], axis=1)  # noqa: E731
    step = jax.jit(causal_attention_einsum)  # q_offset traced, as in a decode loop
    np.testing.assert_allclose(step(q[:, t0:], pad(k), pad(v), q_offset=jnp.int32(t0)), full[:, t0:],
                               rtol=1e-5, atol=1e-5)


def test_impls_agree():
    q, k, v = _qkv(22)
    xla = causal_attention(q, k, v, impl="xla")
    np.testing.assert_allclose(causal_attention(q, k, v, impl="einsum"), xla, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(causal_attention(q, k, v, impl="auto"), xla, rtol=1e-5, atol=1e-5)
    if jax.default_backend() == "cpu":
        assert default_impl() == "xla"


@pytest.mark.parametrize("impl", ["xla", "einsum"])
def test_bfloat16_agrees_with_float32(impl):
    q, k, v = _qkv(23)
    ref = causal_attention(q, k, v, impl="xla")
    y = causal_attention(*(a.astype(jnp.bfloat16) for a in (q, k, v)), impl=impl)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=2e-2, atol=2e-2)


def test_einsum_per_row_q_offset_equals_each_rows_scalar_offset():
    """Decoding prompts of different lengths: row b's queries sit at their own position."""
    q, k, v = _qkv(24)
    offsets = jnp.array([2, 7])
    y = jax.jit(causal_attention_einsum)(q[:, :3], k, v, q_offset=offsets)
    for b in range(B):
        ref = causal_attention_einsum(q[b:b + 1, :3], k[b:b + 1], v[b:b + 1], q_offset=int(offsets[b]))
        np.testing.assert_allclose(y[b:b + 1], ref, rtol=1e-6, atol=1e-6)


def _empty_cache(S: int, b: int = B):
    return jnp.zeros((b * H, K, S)), jnp.zeros((b * H, S, K))


@pytest.mark.parametrize("shared", [True, False])
def test_cache_attention_prefill_then_steps_equals_full_attention(shared):
    """Prefill 4 tokens, then one token at a time: every output row equals full causal attention,
    with one position for all rows (dynamic_update_slice) and one per row (select/scatter)."""
    q, k, v = _qkv(30)
    full = causal_attention_einsum(q, k, v)
    kc, vc = _empty_cache(T)
    step = jax.jit(cache_attention)
    pos = (lambda t: jnp.int32(t)) if shared else (lambda t: jnp.full((B,), t, jnp.int32))
    y, kc, vc = step(q[:, :4], k[:, :4], v[:, :4], kc, vc, pos(0))
    np.testing.assert_allclose(y, full[:, :4], rtol=1e-5, atol=1e-6)
    for t in range(4, T):
        y, kc, vc = step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], kc, vc, pos(t))
        np.testing.assert_allclose(y[:, 0], full[:, t], rtol=1e-5, atol=1e-6)
    # the layout: keys (B*H, K, S), values (B*H, S, K), row b*H + h holds head h of batch row b
    np.testing.assert_array_equal(kc.reshape(B, H, K, T), k.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(vc.reshape(B, H, T, K), v.transpose(0, 2, 1, 3))


def test_cache_attention_rows_at_their_own_positions_ignore_stale_slots():
    """Row 0 decodes at slot 2, row 1 at slot 7; slots past each row's position hold garbage."""
    q, k, v = _qkv(31)
    kc, vc = _empty_cache(T)
    kc, vc = kc + 5.0, vc - 3.0  # stale values everywhere
    _, kc, vc = cache_attention(q[:, :7], k[:, :7], v[:, :7], kc, vc, jnp.int32(0))
    offsets = jnp.array([2, 7])
    y, kc2, _ = jax.jit(cache_attention)(q[:, 7:8], k[:, 7:8], v[:, 7:8], kc, vc, offsets)
    for b, n in enumerate([2, 7]):
        kk = jnp.concatenate([k[b:b + 1, :n], k[b:b + 1, 7:8]], axis=1)
        vv = jnp.concatenate([v[b:b + 1, :n], v[b:b + 1, 7:8]], axis=1)
        ref = causal_attention_einsum(q[b:b + 1, 7:8], kk, vv, q_offset=n)
        np.testing.assert_allclose(y[b:b + 1], ref, rtol=1e-5, atol=1e-6)
    # each row's new key went to its own slot and nowhere else
    new = k[:, 7].transpose(1, 0, 2)  # (H, B, K)
    np.testing.assert_array_equal(kc2.reshape(B, H, K, T)[0, :, :, 2], new[:, 0])
    np.testing.assert_array_equal(kc2.reshape(B, H, K, T)[1, :, :, 7], new[:, 1])
    np.testing.assert_array_equal(kc2.reshape(B, H, K, T)[0, :, :, 7], kc.reshape(B, H, K, T)[0, :, :, 7])


def test_auto_picks_cudnn_only_where_it_applies(monkeypatch):
    import gptjax.attention as attention

    monkeypatch.setattr(attention, "_nvidia_compute_capability", lambda: 9.0)
    assert default_impl() == "cudnn" and default_impl(jnp.bfloat16, 64) == "cudnn"
    assert default_impl(jnp.float32, 64) == "xla"  # flash attention is half precision only
    assert default_impl(jnp.bfloat16, 96 + 4) == "xla" and default_impl(jnp.float16, 256) == "xla"
    monkeypatch.setattr(attention, "_nvidia_compute_capability", lambda: 7.0)  # pre-Ampere
    assert default_impl(jnp.bfloat16, 64) == "xla"
    monkeypatch.setattr(attention, "_nvidia_compute_capability", lambda: None)  # CPU, TPU, ROCm
    assert default_impl(jnp.bfloat16, 64) == "xla"
