"""gptjax.cpu.matvec: the C++ decoding kernel against numpy and XLA, its fallbacks, and decoding with it."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import generate as gen
from gptjax.config import GPTConfig
from gptjax.cpu import matvec as cpu_matvec
from gptjax.model import GPT, init_params
from gptjax.options import Options

needs_compiler = pytest.mark.skipif(cpu_matvec.find_compiler() is None, reason="no C++ compiler to build the kernel")


@pytest.fixture
def fresh_state(monkeypatch):
    """cpu_matvec's per-process build state, emptied for the test and restored after."""
    monkeypatch.setattr(cpu_matvec, "_state", {})


@needs_compiler
@pytest.mark.parametrize("lead, I, O", [((1,), 768, 2304), ((1, 1), 3072, 768), ((8,), 64, 50), ((3,), 37, 131),
                                        ((2, 3), 16, 4), ((1,), 5, 3), ((4,), 1, 9)])
def test_kernel_matches_numpy(lead, I, O):
    rng = np.random.default_rng(I * O)
    x = rng.standard_normal((*lead, I)).astype(np.float32)
    w = rng.standard_normal((O, I)).astype(np.float32)
    assert cpu_matvec.applies(jnp.asarray(x), jnp.asarray(w))
    y = jax.jit(cpu_matvec.matvec)(x, w)
    assert y.shape == (*lead, O) and y.dtype == jnp.float32
    ref = np.einsum("...i,oi->...o", x.astype(np.float64), w.astype(np.float64))
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5 * np.sqrt(I))
    # it really ran the custom call, not XLA's dot
    assert cpu_matvec.TARGET in jax.jit(cpu_matvec.matvec).lower(x, w).as_text()


@needs_compiler
def test_kernel_is_used_only_where_it_applies():
    w = jnp.ones((6, 4))
    assert cpu_matvec.applies(jnp.ones((cpu_matvec.MAX_ROWS, 4)), w)
    assert not cpu_matvec.applies(jnp.ones((cpu_matvec.MAX_ROWS + 1, 4)), w)  # prefill: XLA's GEMM
    assert cpu_matvec.applies(jnp.ones((1, 4), jnp.bfloat16), w.astype(jnp.bfloat16))
    assert not cpu_matvec.applies(jnp.ones((1, 4), jnp.float16), w.astype(jnp.float16))
    assert not cpu_matvec.applies(jnp.ones((1, 4)), w.astype(jnp.int16))
    assert not cpu_matvec.applies(jnp.ones((1, 4), jnp.int8), w)
    assert not cpu_matvec.applies(jnp.ones((1, 5)), w)
    big = jnp.ones((3, 9, 4))
    assert cpu_matvec.TARGET not in jax.jit(cpu_matvec.matvec).lower(big, w).as_text()
    np.testing.assert_allclose(cpu_matvec.matvec(big, w), jnp.full((3, 9, 6), 4.0))


@needs_compiler
def test_kernel_gradient_and_vmap_match_xla():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 24)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((10, 24)), jnp.float32)
    xla = lambda x, w: x @ w.T  # noqa: E731
    # the backward rule: for one cotangent, the kernel's VJP is XLA's (both are XLA dots of the same operands)
    g = jnp.asarray(rng.standard_normal((2, 10)), jnp.float32)
    for a, b in zip(jax.vjp(cpu_matvec.matvec, x, w)[1](g), jax.vjp(xla, x, w)[1](g)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # end to end through tanh: the forwards differ by float32 summation order (the kernel's 16-lane
    # accumulators vs XLA's dot, up to 2e-6 here at |y| = 12), which tanh's derivative passes on to the
    # cotangent and the backward sums over 10 outputs into each gradient element; XLA's own float32
    # gradient is 1.4e-6 from the float64 one (jax 0.12), so atol 2e-6 (measured: 1.4e-6, and 8e-7 on jax 0.10)
    loss = lambda f: lambda x, w: jnp.sum(jnp.tanh(f(x, w)))  # noqa: E731
    got = jax.grad(loss(cpu_matvec.matvec), argnums=(0, 1))(x, w)
    want = jax.grad(loss(xla), argnums=(0, 1))(x, w)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=2e-6)
    xs = jnp.stack([x, 2 * x, -x])
    np.testing.assert_allclose(jax.vmap(cpu_matvec.matvec, (0, None))(xs, w), xs @ w.T, rtol=1e-5, atol=1e-5)


@needs_compiler
@pytest.mark.parametrize("tie", [False, True])
def test_decoding_with_the_kernel_gives_the_same_tokens(tie):
    cfg = GPTConfig(vocab_size=211, context_length=40, emb_dim=48, n_heads=4, n_layers=2, drop_rate=0.0,
                    qkv_bias=True, tie_embeddings=tie)
    params = init_params(cfg, jax.random.key(3))
    pk, ck = gen.decoding_model(params, cfg)
    px, cx = gen.decoding_model(params, cfg, matvec="xla")
    assert (ck.matvec, ck.linear_layout, cx.matvec) == ("kernel", "out_in", "xla")
    step = jax.jit(lambda p, idx: GPT(cfg, ck).apply({"params": p}, idx))
    assert cpu_matvec.TARGET in step.lower(pk, jnp.zeros((1, 1), jnp.int32)).as_text()
    assert cpu_matvec.TARGET not in step.lower(pk, jnp.zeros((1, 16), jnp.int32)).as_text()  # 16 rows: GEMM
    prompts = [[5, 7, 11], [1], [2, 3, 4, 5, 6, 7]]  # different lengths: batched decode, left padding
    for B in ((1, 3) if not tie else (3,)):
        a = gen.generate_batch(pk, cfg, prompts[:B], 12, opts=ck)
        b = gen.generate_batch(px, cfg, prompts[:B], 12, opts=cx)
        assert a == b
    idx = np.array([[9, 8, 7, 6]])
    np.testing.assert_array_equal(gen.generate(pk, cfg, idx, 10, opts=ck),
                                  gen.generate(params, cfg, idx, 10, use_cache=False))


def test_without_a_compiler_decoding_falls_back_to_xla(monkeypatch, tmp_path, fresh_state):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    monkeypatch.setenv("GPTJAX_KERNEL_DIR", str(tmp_path / "kernels"))
    with pytest.raises(cpu_matvec.KernelBuildError, match="no-such-c"):
        cpu_matvec.build()
    with pytest.warns(UserWarning, match="uses XLA's dot"):
        assert not cpu_matvec.available()
    assert "no-such-c++" in cpu_matvec.status()["reason"]
    assert not list((tmp_path / "kernels").glob("*"))  # no half-written library left behind
    cfg = GPTConfig(vocab_size=50, context_length=16, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0)
    params = init_params(cfg, jax.random.key(0))
    p, c = gen.decoding_model(params, cfg)
    assert c.matvec == "xla" and c.linear_layout == "out_in"
    # options that ask for the kernel still decode, on XLA's dot
    idx = np.array([[1, 2]])
    np.testing.assert_array_equal(gen.generate(p, cfg, idx, 5, opts=c.replace(matvec="kernel")),
                                  gen.generate(p, cfg, idx, 5, opts=c))


@needs_compiler
def test_compile_error_names_the_compiler_and_the_error(monkeypatch, tmp_path):
    bad = tmp_path / "bad.cc"
    bad.write_text("this is not C++\n")
    monkeypatch.setattr(cpu_matvec, "SOURCE", bad)
    with pytest.raises(cpu_matvec.KernelBuildError, match=r"failed to compile bad.cc \(exit \d+\)"):
        cpu_matvec.build(out_dir=tmp_path / "k")
    assert not list((tmp_path / "k").glob("*"))


def test_turned_off_by_environment(monkeypatch, fresh_state):
    monkeypatch.setenv("GPTJAX_CPU_KERNEL", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # turning it off on purpose warns nothing
        assert not cpu_matvec.available()
    assert cpu_matvec.status() == {"available": False, "library": None, "reason": "turned off by GPTJAX_CPU_KERNEL=0"}


@needs_compiler
def test_build_is_cached(tmp_path):
    first = cpu_matvec.build(out_dir=tmp_path)
    mtime = first.stat().st_mtime_ns
    assert cpu_matvec.build(out_dir=tmp_path) == first and first.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


def test_options_reject_an_unknown_matvec():
    with pytest.raises(ValueError, match=r"Options.matvec must be one of \('xla', 'kernel'\), got 'fast'"):
        Options(matvec="fast")


@needs_compiler
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_other_platforms_lower_to_xla_dot(platform):
    """Lowered for a GPU or TPU (cross-platform export, no such device needed), a kernel product is XLA's dot."""
    x, w = jnp.ones((1, 32)), jnp.ones((8, 32))
    assert cpu_matvec.applies(x, w)
    text = jax.export.export(jax.jit(cpu_matvec.matvec), platforms=[platform])(x, w).mlir_module()
    assert cpu_matvec.TARGET not in text and "dot_general" in text


@needs_compiler
@pytest.mark.parametrize("x_dtype", [jnp.float32, jnp.bfloat16])
def test_bfloat16_weights_match_float32_math_on_the_same_values(x_dtype):
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((3, 200)), x_dtype)
    w = jnp.asarray(rng.standard_normal((67, 200)), jnp.bfloat16)
    assert cpu_matvec.applies(x, w)
    f = jax.jit(cpu_matvec.matvec)
    assert cpu_matvec.TARGET_BF16 in f.lower(x, w).as_text()
    y = f(x, w)
    assert y.dtype == jnp.float32
    # the bfloat16 values widened exactly, then float32 products and sums
    ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-4)
    g = jax.grad(lambda w: jnp.sum(cpu_matvec.matvec(x, w)))(w)
    assert g.dtype == jnp.bfloat16


@needs_compiler
def test_bfloat16_decoding_with_the_kernel_follows_xla():
    cfg = GPTConfig(vocab_size=211, context_length=40, emb_dim=48, n_heads=4, n_layers=2, drop_rate=0.0,
                    qkv_bias=True)
    params = jax.tree.map(lambda a: (a * 3.0).astype(jnp.bfloat16), init_params(cfg, jax.random.key(5)))
    pk, ck = gen.decoding_model(params, cfg, Options(dtype="bfloat16"))
    assert ck.matvec == "kernel"
    idx = jnp.asarray([[3, 1, 4, 1, 5]])
    # one token: 1 row, so every product of the kernel config goes through the bfloat16 kernel
    logits = {m: GPT(cfg, ck.replace(matvec=m)).apply({"params": pk}, idx[:, :1]) for m in ("kernel", "xla")}
    lk, lx = (np.asarray(logits[m], np.float32) for m in ("kernel", "xla"))
    assert np.abs(lk - lx).max() < 0.05 * np.abs(lx).max()
    assert (lk.argmax(-1) == lx.argmax(-1)).all()
    # and a whole greedy generation runs on it (tokens may differ from XLA's bfloat16 dot by rounding)
    out = gen.generate(pk, cfg, np.asarray(idx), 8, opts=ck)
    assert out.shape == (1, 13) and (out[:, :5] == np.asarray(idx)).all()


@needs_compiler
def test_bfloat16_weights_with_float32_compute_read_bf16_and_match_xla():
    """Weight-only bfloat16 (what `gptjax generate --weight-dtype bfloat16` runs on CPU): the kernel reads the
    bfloat16 weights as stored, XLA widens them first; the float32 math is the same."""
    cfg = GPTConfig(vocab_size=211, context_length=40, emb_dim=48, n_heads=4, n_layers=2, drop_rate=0.0,
                    tie_embeddings=True)
    params, opts = gen.decoding_model(init_params(cfg, jax.random.key(8)), cfg)
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    idx = jnp.asarray([[7]])
    f = {m: jax.jit(lambda p, i, m=m: GPT(cfg, opts.replace(matvec=m)).apply({"params": p}, i))
         for m in ("kernel", "xla")}
    hlo = f["kernel"].lower(params, idx).as_text()
    assert cpu_matvec.TARGET_BF16 in hlo and cpu_matvec.TARGET not in hlo.replace(cpu_matvec.TARGET_BF16, "")
    lk, lx = (np.asarray(f[m](params, idx)) for m in ("kernel", "xla"))
    assert lk.dtype == np.float32
    np.testing.assert_allclose(lk, lx, rtol=1e-4, atol=1e-4)
    prompt = np.array([[3, 1, 4]])
    np.testing.assert_array_equal(gen.generate(params, cfg, prompt, 10, opts=opts),
                                  gen.generate(params, cfg, prompt, 10, opts=opts.replace(matvec="xla")))


# --- weight-only int8 -------------------------------------------------------------------------

def test_quantize_int8_rounds_each_row_to_its_own_scale():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((2, 5, 33)).astype(np.float32) * np.array([1e-3, 1.0, 50.0, 0.02, 7.0])[:, None]
    w[0, 3] = 0.0  # an all-zero row
    q, s = cpu_matvec.quantize_int8(w)
    assert q.dtype == jnp.int8 and q.shape == w.shape and s.dtype == jnp.float32 and s.shape == (2, 5)
    q, s = np.asarray(q, np.int32), np.asarray(s)
    assert np.abs(q).max() == 127 and (np.abs(q).max(-1)[w.any(-1)] == 127).all()  # each row spans the range
    assert s[0, 3] == 1.0 and (q[0, 3] == 0).all()
    np.testing.assert_allclose(s[w.any(-1)], np.abs(w).max(-1)[w.any(-1)] / 127, rtol=1e-6)
    assert (np.abs(q * s[..., None] - w) <= s[..., None] * (0.5 + 1e-5)).all()  # round to nearest


@needs_compiler
@pytest.mark.parametrize("lead, I, O", [((1,), 768, 2304), ((8,), 64, 50), ((3,), 37, 131), ((2, 3), 16, 4),
                                        ((1,), 5, 3)])
def test_int8_kernel_matches_numpy(lead, I, O):
    rng = np.random.default_rng(I + O)
    x = rng.standard_normal((*lead, I)).astype(np.float32)
    q, s = cpu_matvec.quantize_int8(rng.standard_normal((O, I)).astype(np.float32))
    assert cpu_matvec.applies(jnp.asarray(x), q)
    f = jax.jit(cpu_matvec.matvec)
    assert cpu_matvec.TARGET_INT8 in f.lower(x, q, s).as_text()
    y = f(x, q, s)
    assert y.shape == (*lead, O) and y.dtype == jnp.float32
    ref = np.einsum("...i,oi->...o", x.astype(np.float64), np.asarray(q, np.float64)) * np.asarray(s, np.float64)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5 * np.sqrt(I))
    # past MAX_ROWS (prefill), the same product on XLA
    xs = np.tile(x.reshape(-1, I), (cpu_matvec.MAX_ROWS + 1, 1))
    assert cpu_matvec.TARGET_INT8 not in f.lower(xs, q, s).as_text()
    np.testing.assert_allclose(np.asarray(f(xs, q, s)), np.tile(ref.reshape(-1, O), (cpu_matvec.MAX_ROWS + 1, 1)),
                               rtol=1e-5, atol=1e-5 * np.sqrt(I))


@needs_compiler
def test_int8_gradients_match_xla_and_bad_scales_are_refused():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 40)), jnp.float32)
    q, s = cpu_matvec.quantize_int8(rng.standard_normal((9, 40)).astype(np.float32))
    loss = lambda f: lambda x, s: jnp.sum(jnp.tanh(f(x, s)))  # noqa: E731
    got = jax.grad(loss(lambda x, s: cpu_matvec.matvec(x, q, s)), argnums=(0, 1))(x, s)
    want = jax.grad(loss(lambda x, s: (x @ q.astype(jnp.float32).T) * s), argnums=(0, 1))(x, s)
    for g, r in zip(got, want):  # float32 sums of up to 40 terms in another order
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * float(jnp.abs(r).max()))
    with pytest.raises(ValueError, match=r"one float32 per out row, shape \(9,\).*int8 \(9, 40\) and scale None"):
        cpu_matvec.matvec(x, q)
    with pytest.raises(ValueError, match=r"shape \(9,\)"):
        cpu_matvec.matvec(x, q, s[:4])
    with pytest.raises(ValueError, match="scale goes with int8 weights"):
        cpu_matvec.matvec(x, q.astype(jnp.float32), s)


@needs_compiler
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_int8_on_other_platforms_lowers_to_xla_dot(platform):
    x, (q, s) = jnp.ones((1, 32)), cpu_matvec.quantize_int8(jnp.ones((8, 32)))
    text = jax.export.export(jax.jit(cpu_matvec.matvec), platforms=[platform])(x, q, s).mlir_module()
    assert cpu_matvec.TARGET_INT8 not in text and "dot_general" in text


@needs_compiler
@pytest.mark.parametrize("tie", [False, True])
def test_int8_decoding_reads_int8_and_matches_xla(tie):
    """`gptjax generate --weight-dtype int8`: every matmul weight int8 with its row scales, float32 compute;
    the kernel and XLA's dot give the same tokens, and the logits stay close to float32's."""
    cfg = GPTConfig(vocab_size=211, context_length=40, emb_dim=48, n_heads=4, n_layers=2, drop_rate=0.0,
                    qkv_bias=True, tie_embeddings=tie)
    params = init_params(cfg, jax.random.key(9))
    p32, c32 = gen.decoding_model(params, cfg)
    pb, cb = gen.decoding_model(params, cfg, Options(dtype="bfloat16"))
    pq, cq = gen.decoding_weights(pb, cfg, cb, "int8")
    assert (cq.dtype, cq.matvec, cq.linear_layout) == ("float32", "kernel", "out_in")
    head = pq["wte"] if tie else pq["lm_head"]
    assert head["embedding" if tie else "kernel"].dtype == jnp.int8
    assert pq["h_0"]["mlp"]["c_fc"]["kernel"].dtype == jnp.int8 and pq["h_0"]["mlp"]["c_fc"]["bias"].dtype == jnp.float32
    assert pq["h_1"]["attn"]["c_attn"]["kernel_scale"].shape == (3 * 48,) and pq["wpe"]["embedding"].dtype == jnp.float32
    idx = jnp.asarray([[7]])
    f = {m: jax.jit(lambda p, i, m=m: GPT(cfg, cq.replace(matvec=m)).apply({"params": p}, i))
         for m in ("kernel", "xla")}
    hlo = f["kernel"].lower(pq, idx).as_text()
    assert hlo.count(cpu_matvec.TARGET_INT8) >= 4 * 2 + 1 and cpu_matvec.TARGET_BF16 not in hlo
    lk, lx = (np.asarray(f[m](pq, idx)) for m in ("kernel", "xla"))
    np.testing.assert_allclose(lk, lx, rtol=1e-4, atol=1e-5)
    l32 = np.asarray(GPT(cfg, c32).apply({"params": p32}, idx))
    assert 0 < np.abs(lk - l32).max() < 0.02 * np.abs(l32).max()  # quantized, and close
    prompts = [[3, 1, 4], [1, 5, 9, 2, 6]]
    assert gen.generate_batch(pq, cfg, prompts, 10, opts=cq) == \
        gen.generate_batch(pq, cfg, prompts, 10, opts=cq.replace(matvec="xla"))


def test_decoding_weights_layouts_dtypes_and_errors():
    cfg = GPTConfig(vocab_size=50, context_length=16, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0)
    opts = Options(dtype="bfloat16")
    params = init_params(cfg, jax.random.key(0))
    # int8 from (in, out) kernels: put (out, in) first
    pq, cq = gen.decoding_weights(params, cfg, opts, "int8")
    assert cq.linear_layout == "out_in" and pq["h_0"]["attn"]["c_attn"]["kernel"].shape == (48, 16)
    assert cq.dtype == "bfloat16"  # XLA's dot (a GPU): int8 widened to the compute dtype
    assert gen.decoding_weights(params, cfg, opts.replace(matvec="kernel"), "int8")[1].dtype == "float32"
    x = jnp.asarray([[1, 2, 3]])
    l8 = jax.jit(lambda p, x: GPT(cfg, cq).apply({"params": p}, x))(pq, x)
    l16 = jax.jit(lambda p, x: GPT(cfg, opts).apply({"params": p}, x))(params, x)
    assert l8.dtype == jnp.float32 and np.abs(np.asarray(l8 - l16)).max() < 0.05 * np.abs(np.asarray(l16)).max()
    # bfloat16 under the kernel is weight-only: float32 compute whatever the loaded config said
    pb, cb = gen.decoding_weights(params, cfg, opts.replace(matvec="kernel", linear_layout="out_in"), "bfloat16")
    assert cb.dtype == "float32" and pb["h_0"]["mlp"]["c_fc"]["kernel"].dtype == jnp.bfloat16
    assert gen.decoding_weights(params, cfg, opts, "bfloat16")[1].dtype == "bfloat16"  # XLA's dot: compute follows
    assert gen.decoding_weights(params, cfg, opts, None) == (params, opts)
    with pytest.raises(ValueError, match=r"weight_dtype must be one of \('float32', 'bfloat16', 'int8'\).*'int4'"):
        gen.decoding_weights(params, cfg, opts, "int4")
    from gptjax.cpu import quantize_weights
    with pytest.raises(ValueError, match="int8 weights need \\(out, in\\) kernels.*linear_layout='in_out'"):
        quantize_weights(params, cfg, opts)
