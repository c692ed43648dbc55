"""Checks that need an NVIDIA GPU: cuDNN flash attention and the bfloat16 training path.

Skipped on CPU (CI). Run on a GPU host with: JAX_PLATFORMS=cuda python -m pytest tests/test_gpu.py
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.attention import causal_attention, default_impl
from gptjax.config import GPTConfig
from gptjax.generate import generate
from gptjax.model import init_params
from gptjax.layout import to_layout
from gptjax.options import Options
from gptjax.optim import OptimConfig, make_optimizer
from gptjax.tasks.pretrain import create_state, jitted_steps as make_steps

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU (JAX_PLATFORMS=cuda)")


def _qkv(seed, B=2, T=1024, H=12, K=64, dtype=jnp.bfloat16):
    ks = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(k, (B, T, H, K), jnp.float32).astype(dtype) for k in ks]


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_auto_picks_cudnn_on_this_gpu():
    assert default_impl(jnp.bfloat16, 64) == "cudnn"


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_cudnn_attention_matches_float32_reference_forward_and_backward(dtype):
    q, k, v = _qkv(0, dtype=dtype)
    ref = lambda q, k, v: causal_attention(q, k, v, impl="einsum")  # noqa: E731
    f32 = [a.astype(jnp.float32) for a in (q, k, v)]
    y = jax.jit(lambda q, k, v: causal_attention(q, k, v, impl="cudnn"))(q, k, v)
    assert y.dtype == dtype
    assert _rel(y, ref(*f32)) < 1e-2
    loss = lambda impl: lambda q, k, v: jnp.sum(causal_attention(q, k, v, impl=impl).astype(jnp.float32) ** 2)  # noqa: E731
    g = jax.jit(jax.grad(loss("cudnn"), argnums=(0, 1, 2)))(q, k, v)
    g_ref = jax.grad(loss("einsum"), argnums=(0, 1, 2))(*f32)
    for a, b in zip(g, g_ref):
        assert _rel(a, b) < 2e-2


def test_cudnn_attention_is_causal():
    q, k, v = _qkv(1)
    f = jax.jit(lambda q, k, v: causal_attention(q, k, v, impl="cudnn"))
    y = f(q, k, v)
    t = 500
    noise = lambda a, s: a.at[:, t:].set(jax.random.normal(jax.random.key(s), a[:, t:].shape).astype(a.dtype))  # noqa: E731
    y2 = f(noise(q, 7), noise(k, 8), noise(v, 9))
    np.testing.assert_array_equal(np.asarray(y[:, :t], np.float32), np.asarray(y2[:, :t], np.float32))


def test_bfloat16_cudnn_training_tracks_float32_xla():
    """A few AdamW steps of a small GPT: bf16 + cuDNN follows the float32 XLA losses, and they go down."""
    base = GPTConfig(vocab_size=512, context_length=128, emb_dim=128, n_heads=2, n_layers=2, drop_rate=0.0)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 512, (8, 129), dtype=np.int32)
    # a learnable sequence: each row repeats a short pattern
    x[:, 16:] = x[:, :113]
    batch = (jnp.asarray(x[:, :-1]), jnp.asarray(x[:, 1:]))
    losses = {}
    for name, opts in {"f32": Options.for_backend(attn_impl="xla"),
                       "bf16": Options.for_backend(dtype="bfloat16", attn_impl="auto")}.items():
        tx = make_optimizer(OptimConfig(lr=1e-3, weight_decay=0.1))
        state = create_state(base, tx, 0, opts=opts)
        step, _ = make_steps(base, tx, opts=opts)
        out = []
        for _ in range(30):
            state, m = step(state, batch)
            out.append(float(m["loss"]))
        losses[name] = np.array(out)
    assert losses["bf16"][-1] < losses["bf16"][0] - 2.0
    np.testing.assert_allclose(losses["bf16"], losses["f32"], rtol=5e-2, atol=5e-2)


def test_kv_cache_greedy_equals_no_cache_on_gpu():
    cfg = GPTConfig(vocab_size=300, context_length=64, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0)
    params = init_params(cfg, jax.random.key(0))
    params = jax.tree.map(lambda a: a * 3.0, params)  # peaked logits: no near-ties to flip under GPU rounding
    idx = np.array([[1, 2, 3, 4], [9, 8, 7, 6]])
    with jax.default_matmul_precision("highest"):
        np.testing.assert_array_equal(generate(params, cfg, idx, 24), generate(params, cfg, idx, 24, use_cache=False))


def test_matvec_kernel_setting_runs_xla_dot_on_gpu():
    """decoding_model leaves XLA's dot on a GPU, and options that ask for the CPU kernel still run there."""
    from gptjax.generate import decoding_model

    cfg = GPTConfig(vocab_size=300, context_length=64, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0,
                    tie_embeddings=True)
    params = jax.tree.map(lambda a: a * 3.0, init_params(cfg, jax.random.key(0)))
    p, c = decoding_model(params, cfg)
    assert (c.linear_layout, c.matvec) == ("in_out", "xla")
    kernel = Options(linear_layout="out_in", matvec="kernel")
    out_in = to_layout(params, cfg, kernel)
    idx = np.array([[1, 2, 3, 4]])
    with jax.default_matmul_precision("highest"):
        np.testing.assert_array_equal(generate(out_in, cfg, idx, 16, opts=kernel), generate(p, cfg, idx, 16, opts=c))


def test_int8_weights_decode_on_gpu():
    """--weight-dtype int8 on a GPU: (out, in) int8 kernels widened by XLA to the compute dtype, logits
    close to float32's; a config that asks for the CPU kernel gives the same tokens there."""
    from gptjax.generate import decoding_model, decoding_weights
    from gptjax.model import GPT

    cfg = GPTConfig(vocab_size=300, context_length=64, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0,
                    tie_embeddings=True)
    params = jax.tree.map(lambda a: a * 3.0, init_params(cfg, jax.random.key(1)))
    pd, cd = decoding_model(params, cfg)
    pq, cq = decoding_weights(pd, cfg, cd, "int8")
    assert (cq.linear_layout, cq.matvec, cq.dtype) == ("out_in", "xla", "float32")
    assert pq["wte"]["embedding"].dtype == jnp.int8
    idx = np.array([[1, 2, 3, 4]])
    with jax.default_matmul_precision("highest"):
        lq = np.asarray(GPT(cfg, cq).apply({"params": pq}, idx))
        l32 = np.asarray(GPT(cfg).apply({"params": params}, idx))
        assert np.abs(lq - l32).max() < 0.05 * np.abs(l32).max()  # 2.5 % on CPU
        np.testing.assert_array_equal(generate(pq, cfg, idx, 16, opts=cq.replace(matvec="kernel")),
                                      generate(pq, cfg, idx, 16, opts=cq))
