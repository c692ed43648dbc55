"""Options: how a model runs, kept apart from GPTConfig; canonical params <-> the layouts Options build,
optimizer state converted along; runs of older versions (execution keys in GPTConfig) still load."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import cpu
from gptjax.model_io import load_run, save_run
from gptjax.config import GPTConfig
from gptjax.data import Batches, make_windows
from gptjax.generate import generate
from gptjax.model import GPT, abstract_params, init_params
from gptjax.layout import map_param_trees, to_canonical, to_layout
from gptjax.options import LEGACY_KEYS, Options
from gptjax.optim import OptimConfig, make_optimizer
from gptjax.tasks.pretrain import create_state, jitted_steps as make_steps

EVERYTHING = Options(scan_layers=True, vocab_multiple=64, linear_layout="out_in")


def _same(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    return [p for p, _ in la] == [p for p, _ in lb] and all(
        x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)) for (_, x), (_, y) in zip(la, lb))


def test_options_validate_replace_and_round_trip():
    opts = Options(dtype="bfloat16", scan_layers=True, remat="dots")
    assert Options.from_dict(json.loads(json.dumps(opts.to_dict()))) == opts
    assert opts.replace(remat="none") == Options(dtype="bfloat16", scan_layers=True)
    with pytest.raises(ValueError, match=r"unknown Options keys \['n_layers'\]"):
        opts.replace(n_layers=2)
    with pytest.raises(ValueError, match="Options.scan_layers must be True or False"):
        Options(scan_layers="yes")
    assert Options(vocab_multiple=64).padded_vocab_size(50257) == 50304
    assert Options().canonical_layout and not Options(linear_layout="out_in").canonical_layout
    assert Options(dtype="bfloat16", remat="full").canonical_layout  # precision and remat keep the layout
    hash(opts)  # static arguments of jitted functions


def test_for_backend_decides_the_barrier_when_options_are_built():
    assert Options.for_backend("cpu").grad_barrier and not Options.for_backend("gpu").grad_barrier
    assert Options.for_backend("tpu", dtype="bfloat16") == Options(dtype="bfloat16")
    assert Options.for_backend().grad_barrier == (jax.default_backend() == "cpu")
    assert not Options().grad_barrier  # a plain Options() is platform-free


def test_barrier_reaches_the_train_step_only_when_asked(tiny_cfg):
    tx = make_optimizer(OptimConfig(lr=1e-3))
    x = jnp.zeros((2, tiny_cfg.context_length), jnp.int32)
    text = {}
    for on in (False, True):
        opts = Options(grad_barrier=on)
        state = create_state(tiny_cfg, tx, 0, opts=opts)
        text[on] = make_steps(tiny_cfg, tx, opts=opts)[0].lower(state, (x, x)).as_text()
    assert text[True].count("while") > text[False].count("while")  # one loop per block's gradient


def test_the_hook_builds_the_layout_options_ask_for():
    import flax.linen as nn

    assert isinstance(cpu.dense(Options(linear_layout="out_in"), 8, "p"), cpu.LinearOutIn)
    assert type(cpu.dense(Options(), 8, "p")) is nn.Dense
    x = jnp.ones((2, 3))
    assert cpu.block_input(x, Options()) is x
    np.testing.assert_array_equal(cpu.block_input(x, Options(grad_barrier=True)), x)


def test_gptconfig_is_the_architecture_and_old_keys_are_dropped(tiny_cfg):
    old = {**tiny_cfg.to_dict(), "dtype": "bfloat16", "attn_impl": "einsum", "scan_layers": True, "scan_unroll": 2,
           "remat": "dots", "vocab_multiple": 64, "linear_layout": "out_in", "matvec": "kernel",
           "matmul_precision": "bfloat16"}
    assert set(old) - set(tiny_cfg.to_dict()) == set(LEGACY_KEYS)
    assert GPTConfig.from_dict(old) == tiny_cfg
    assert not set(tiny_cfg.to_dict()) & set(Options().to_dict())


@pytest.mark.parametrize("opts", [Options(linear_layout="out_in"), Options(scan_layers=True),
                                  Options(vocab_multiple=64), EVERYTHING], ids=["out_in", "scan", "pad", "all"])
@pytest.mark.parametrize("tie", [False, True])
def test_layouts_round_trip_and_init_is_canonical_converted(tiny_cfg, opts, tie):
    cfg = tiny_cfg.replace(tie_embeddings=tie)
    canon = init_params(cfg, jax.random.key(1))
    laid = init_params(cfg, jax.random.key(1), opts)
    assert _same(laid, to_layout(canon, cfg, opts))
    assert jax.tree.map(jnp.shape, laid) == jax.tree.map(jnp.shape, abstract_params(cfg, opts))
    assert _same(to_canonical(laid, cfg, opts), canon)
    idx = jax.random.randint(jax.random.key(2), (2, 16), 0, cfg.vocab_size)
    np.testing.assert_allclose(GPT(cfg, opts).apply({"params": laid}, idx), GPT(cfg).apply({"params": canon}, idx),
                               rtol=1e-5, atol=1e-5)


def test_map_param_trees_converts_adamw_moments_and_leaves_the_rest(tiny_cfg):
    tx = make_optimizer(OptimConfig(lr=1e-3, clip_norm=1.0, grad_accum=2))
    params = init_params(tiny_cfg, jax.random.key(0), EVERYTHING)
    state = jax.tree.map(lambda a: a + 1.0 if jnp.issubdtype(a.dtype, jnp.floating) else a, tx.init(params))
    canon = map_param_trees(lambda t: to_canonical(t, tiny_cfg, EVERYTHING), state, params)
    want = tx.init(to_canonical(params, tiny_cfg, EVERYTHING))
    assert jax.tree.structure(canon) == jax.tree.structure(want)
    assert jax.tree.map(jnp.shape, canon) == jax.tree.map(jnp.shape, want)
    # without vocab padding (whose rows the canonical layout drops) the round trip is exact
    opts = Options(scan_layers=True, linear_layout="out_in")
    params = init_params(tiny_cfg, jax.random.key(0), opts)
    state = jax.tree.map(lambda a: a + jnp.arange(a.size, dtype=a.dtype).reshape(a.shape)
                         if jnp.issubdtype(a.dtype, jnp.floating) else a, tx.init(params))
    canon_params = to_canonical(params, tiny_cfg, opts)
    canon = map_param_trees(lambda t: to_canonical(t, tiny_cfg, opts), state, params)
    assert _same(map_param_trees(lambda t: to_layout(t, tiny_cfg, opts), canon, canon_params), state)


def test_a_run_of_an_older_version_loads_canonical(tmp_path, tiny_cfg):
    """config.json of older versions held the execution keys in "model", and params/ the training layout."""
    params = init_params(tiny_cfg, jax.random.key(4))
    old = Options(linear_layout="out_in", vocab_multiple=64)
    save_run(tmp_path / "run", to_layout(params, tiny_cfg, old), tiny_cfg)
    path = tmp_path / "run" / "config.json"
    meta = json.loads(path.read_text())
    meta["model"].update(dtype="float32", attn_impl="auto", scan_layers=False, scan_unroll=1, remat="none",
                         vocab_multiple=64, linear_layout="out_in", matvec="xla", matmul_precision="float32")
    path.write_text(json.dumps(meta))
    loaded, cfg = load_run(tmp_path / "run")
    assert cfg == tiny_cfg and _same(loaded, params)


def test_train_under_one_layout_evaluate_resume_and_decode_under_others(tiny_cfg):
    """Train scanned + remat + bfloat16, convert params and AdamW state to canonical; evaluate per-layer in
    float32 (same loss as the trained layout in float32), take the next step there (same as in the trained
    layout), and decode with (out, in) kernels and the C++ matvec (same greedy tokens as XLA's path)."""
    cfg = tiny_cfg
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, 400)
    batches = Batches(*make_windows(ids, cfg.context_length, cfg.context_length // 2), 4, shuffle=True, seed=0)
    batch = lambda i: batches.batch_at(0, i)  # noqa: E731
    tx = make_optimizer(OptimConfig(lr=3e-3))
    trained_as = Options(scan_layers=True, remat="full", dtype="bfloat16")
    train_step, _ = make_steps(cfg, tx, opts=trained_as)
    state = create_state(cfg, tx, 0, opts=trained_as)
    losses = []
    for i in range(4):
        state, m = train_step(state, batch(i))
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0]
    canon = lambda t: to_canonical(t, cfg, trained_as)  # noqa: E731
    params = canon(state.params)
    opt_state = map_param_trees(canon, state.opt_state, state.params)
    assert "h_1" in params and params["h_1"]["mlp"]["c_fc"]["kernel"].shape == (32, 128)
    adam = lambda s: next(t for t in jax.tree_util.tree_leaves(s, is_leaf=lambda t: hasattr(t, "mu"))  # noqa: E731
                          if hasattr(t, "mu"))
    np.testing.assert_array_equal(adam(opt_state).nu["h_1"]["attn"]["c_attn"]["kernel"],
                                  adam(state.opt_state).nu["h"]["attn"]["c_attn"]["kernel"][1])

    # evaluation: canonical per-layer float32 == the trained layout in float32
    scan32 = trained_as.replace(dtype="float32")
    x_BT, y_BT = batch(5)
    per_layer = make_steps(cfg, tx, opts=Options())[1](params, (x_BT, y_BT))
    direct = make_steps(cfg, tx, opts=scan32)[1](state.params, (x_BT, y_BT))
    np.testing.assert_allclose(per_layer, direct, rtol=1e-5)

    # the next step from the converted state, in another layout, equals the step in the trained layout (float32)
    out_in = Options(linear_layout="out_in")
    lay = lambda t: to_layout(t, cfg, out_in)  # noqa: E731
    # copies: the steps donate their state, and the leaves to_layout leaves alone are shared with `params`
    moved = jax.tree.map(jnp.copy, state.replace(params=lay(params),
                                                 opt_state=map_param_trees(lay, opt_state, params)))
    copy = jax.tree.map(jnp.copy, state)
    a, ma = make_steps(cfg, tx, opts=out_in)[0](moved, batch(6))
    b, mb = make_steps(cfg, tx, opts=scan32)[0](copy, batch(6))
    np.testing.assert_allclose(float(ma["loss"]), float(mb["loss"]), rtol=1e-5)
    for x, y in zip(jax.tree_util.tree_leaves(to_canonical(a.params, cfg, out_in)),
                    jax.tree_util.tree_leaves(to_canonical(b.params, cfg, scan32))):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)

    # decoding with (out, in) kernels and the C++ kernel: the plain XLA path's greedy tokens
    kernel = Options(linear_layout="out_in", matvec="kernel")
    prompt = np.array([[5, 7, 11, 13]])
    np.testing.assert_array_equal(generate(to_layout(params, cfg, kernel), cfg, prompt, 10, opts=kernel),
                                  generate(params, cfg, prompt, 10))
