import json
import re
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.model_io import load_run
from gptjax.data import Batches, make_windows
from gptjax.generate import generate
from gptjax.model import GPT
from gptjax.layout import to_canonical, to_layout
from gptjax.options import Options
from gptjax.engine import cross_entropy, perplexity
from gptjax.optim import OptimConfig, clip_by_global_norm_after, make_optimizer
from gptjax.tasks.pretrain import PretrainConfig as TrainConfig, create_state, jitted_steps as make_steps, pretrain as train


def test_cross_entropy_matches_numpy_and_ignores_minus_100():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
    targets = np.array([[1, 4, -100], [0, -100, 2]])
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = [logp[b, t, targets[b, t]] for b in range(2) for t in range(3) if targets[b, t] != -100]
    np.testing.assert_allclose(float(cross_entropy(logits, targets)), -np.mean(picked), rtol=1e-6)
    assert float(cross_entropy(logits, np.full((2, 3), -100))) == 0.0
    assert perplexity(np.log(10.0)) == pytest.approx(10.0)


def _batches(cfg, n_tokens=200, batch_size=4, seed=0):
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, n_tokens)
    x, y = make_windows(ids, cfg.context_length, cfg.context_length // 2)
    return Batches(x, y, batch_size, shuffle=True, seed=seed)


def _losses(cfg, steps=8, seeds=(0,)):
    tx = make_optimizer(OptimConfig(lr=1e-3))
    train_step, _ = make_steps(cfg, tx)
    return [_run(train_step, create_state(cfg, tx, seed), cfg, steps) for seed in seeds]


def _run(train_step, state, cfg, steps):
    out, batches = [], _batches(cfg)
    for i in range(steps):
        state, m = train_step(state, batches.batch_at(i // len(batches), i % len(batches)))
        out.append(float(m["loss"]))
    return out


def test_tiny_model_overfits_a_short_text(tiny_cfg):
    text_ids = np.tile(np.arange(40) % tiny_cfg.vocab_size, 3)
    x, y = make_windows(text_ids, tiny_cfg.context_length, 1)
    tx = make_optimizer(OptimConfig(lr=3e-3, weight_decay=0.0))
    state = create_state(tiny_cfg, tx, 0)
    train_step, eval_step = make_steps(tiny_cfg, tx)
    batch = (x[:16], y[:16])
    first = float(eval_step(state.params, batch))
    for _ in range(150):
        state, _ = train_step(state, batch)
    last = float(eval_step(state.params, batch))
    assert first > 4.0 and last < 0.05, (first, last)


def test_same_seed_same_losses_with_dropout(tiny_cfg):
    cfg = tiny_cfg.replace(drop_rate=0.2)
    a, b, c = _losses(cfg, steps=4, seeds=(3, 3, 4))
    assert a == b
    assert a != c


@pytest.mark.parametrize("clip_norm", [None, 0.05])
def test_training_matches_the_books_pytorch_loop(tiny_cfg, tmp_path, clip_norm):
    """The book's train_model_simple in PyTorch (its GPTModel, torch.optim.AdamW with weight decay 0.1,
    clip_grad_norm_ as in appendix D) from the same init on the same batches: the same loss at every step,
    and the same logits after the last update."""
    torch = pytest.importorskip("torch")
    from gptjax.book_torch import book_from_params, calc_loss_batch

    cfg = tiny_cfg.replace(init="book")
    ocfg = OptimConfig(lr=1e-3, weight_decay=0.1, clip_norm=clip_norm)
    tx = make_optimizer(ocfg)
    state = create_state(cfg, tx, 0)
    book = book_from_params(state.params, cfg, tmp_path / "init.safetensors").train()
    opt = torch.optim.AdamW(book.parameters(), lr=ocfg.lr, weight_decay=ocfg.weight_decay)
    train_step, eval_step = make_steps(cfg, tx)
    batches, ours, theirs, clipped = _batches(cfg), [], [], []
    for i in range(6):
        x_BT, y_BT = batches.batch_at(i // len(batches), i % len(batches))
        state, m = train_step(state, (x_BT, y_BT))
        ours.append(float(m["loss"]))
        opt.zero_grad()
        loss = calc_loss_batch(x_BT, y_BT, book)
        loss.backward()
        if clip_norm is not None:
            clipped.append(float(torch.nn.utils.clip_grad_norm_(book.parameters(), clip_norm)) > clip_norm)
        opt.step()
        theirs.append(loss.item())
    np.testing.assert_allclose(ours, theirs, rtol=2e-5)
    assert ours[-1] < ours[0] - 0.1  # it learns, so the updates are not all tiny
    assert all(clipped) and len(clipped) == (6 if clip_norm else 0)  # when clipping, every step clipped
    x_BT = batches.batch_at(0, 0)[0]
    with torch.no_grad():
        ref = book.eval()(torch.as_tensor(x_BT, dtype=torch.long)).numpy()
    np.testing.assert_allclose(GPT(cfg).apply({"params": state.params}, x_BT), ref, atol=2e-4)


def test_schedule_warmup_cosine_and_clipping():
    ocfg = OptimConfig(lr=1e-3, initial_lr=1e-5, warmup_steps=10, decay_steps=90, min_lr=1e-4, clip_norm=1.0)
    sched = ocfg.schedule()
    assert float(sched(0)) == pytest.approx(1e-5, rel=1e-4)
    assert float(sched(10)) == pytest.approx(1e-3, rel=1e-5)
    assert float(sched(55)) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4), rel=1e-4)
    assert float(sched(100)) == pytest.approx(1e-4)
    tx = make_optimizer(ocfg)
    params = {"w": jnp.ones(3)}
    updates, _ = tx.update({"w": jnp.full(3, 100.0)}, tx.init(params), params)
    assert np.isfinite(np.asarray(updates["w"])).all()


def test_gradient_accumulation_equals_a_big_batch(tiny_cfg):
    cfg = tiny_cfg
    batches = _batches(cfg, batch_size=4)
    x, y = batches.batch_at(0, 0)
    big_tx = make_optimizer(OptimConfig(lr=1e-3, weight_decay=0.1))
    acc_tx = make_optimizer(OptimConfig(lr=1e-3, weight_decay=0.1, grad_accum=2))
    big = create_state(cfg, big_tx, 0)
    acc = create_state(cfg, acc_tx, 0)
    big_step, _ = make_steps(cfg, big_tx)
    acc_step, _ = make_steps(cfg, acc_tx)
    big, _ = big_step(big, (x, y))
    acc, _ = acc_step(acc, (x[:2], y[:2]))
    acc, _ = acc_step(acc, (x[2:], y[2:]))
    for a, b in zip(jax.tree_util.tree_leaves(acc.params), jax.tree_util.tree_leaves(big.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)


def test_appendix_d_recipe_matches_the_book():
    ocfg = OptimConfig.appendix_d(135)  # 9 batches x 15 epochs
    assert (ocfg.warmup_steps, ocfg.decay_steps, ocfg.clip_norm, ocfg.clip_after_warmup) == (27, 108, 1.0, True)
    sched = ocfg.schedule()
    # the book: lr = initial + step * (peak - initial) / warmup, then min + (peak - min) * 0.5 * (1 + cos(pi * p))
    book = [1e-5 + s * (1e-3 - 1e-5) / 27 if s < 27 else
            1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + np.cos(np.pi * (s - 27) / 108)) for s in range(135)]
    np.testing.assert_allclose([float(sched(s)) for s in range(135)], book, rtol=1e-5, atol=1e-9)


def test_clipping_starts_after_the_warmup_as_in_the_book():
    clip = clip_by_global_norm_after(1.0, after=2)
    params = {"w": jnp.zeros(4)}
    state = clip.init(params)
    norms = []
    for _ in range(5):
        out, state = clip.update({"w": jnp.full(4, 50.0)}, state, params)
        norms.append(float(jnp.linalg.norm(out["w"])))
    np.testing.assert_allclose(norms, [100.0, 100.0, 100.0, 1.0, 1.0], rtol=1e-6)  # `if global_step > warmup`


def test_logged_lr_follows_updates_under_accumulation(tiny_cfg):
    ocfg = OptimConfig(lr=1e-3, initial_lr=1e-4, warmup_steps=3, grad_accum=2)
    tx = make_optimizer(ocfg)
    train_step, _ = make_steps(tiny_cfg, tx, ocfg.logged_schedule())
    state, batches = create_state(tiny_cfg, tx, 0), _batches(tiny_cfg, batch_size=2)
    lrs = []
    for i in range(6):
        state, m = train_step(state, batches.batch_at(0, i))
        lrs.append(float(m["lr"]))
    sched = ocfg.schedule()
    np.testing.assert_allclose(lrs, [float(sched(i // 2)) for i in range(6)], rtol=1e-6)
    assert lrs[0] == lrs[1] < lrs[2] == lrs[3] < lrs[4]


def test_bfloat16_compute_keeps_float32_params_and_loss(tiny_cfg):
    tx = make_optimizer(OptimConfig(lr=1e-3))
    batch = _batches(tiny_cfg).batch_at(0, 0)
    out = {}
    # bfloat16 compute, and float32 compute with bfloat16 matmuls ((out, in) kernels, as on CPU)
    for name, kw in {"float32": {}, "bfloat16": dict(dtype="bfloat16"),
                     "matmuls": dict(matmul_precision="bfloat16", linear_layout="out_in")}.items():
        cfg, opts = tiny_cfg, Options.for_backend(**kw)
        train_step, eval_step = make_steps(cfg, tx, opts=opts)
        state, m = train_step(create_state(cfg, tx, 0, opts=opts), batch)
        assert m["loss"].dtype == jnp.float32 and m["grad_norm"].dtype == jnp.float32
        assert {a.dtype for a in jax.tree_util.tree_leaves((state.params, state.opt_state))
                if jnp.issubdtype(a.dtype, jnp.floating)} == {jnp.dtype("float32")}
        out[name] = float(m["loss"]), float(eval_step(state.params, batch))
    np.testing.assert_allclose(out["bfloat16"], out["float32"], rtol=2e-2)
    np.testing.assert_allclose(out["matmuls"], out["float32"], rtol=1e-2)
    assert out["matmuls"][1] < out["matmuls"][0]  # the step lowered the loss


def test_train_config_round_trips_through_json():
    tcfg = TrainConfig(epochs=3, save_every=4, optim=OptimConfig.appendix_d(30, grad_accum=2))
    assert TrainConfig.from_dict(json.loads(json.dumps(tcfg.to_dict()))) == tcfg
    with pytest.raises(ValueError, match=r"unknown PretrainConfig keys \['epoch'\]"):
        TrainConfig.from_dict({"epoch": 3})


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=0.0), "learning rate must be a positive"),
    (dict(lr=1e-3, initial_lr=1e-2), r"initial_lr and min_lr must lie in \[0, lr=0.001\]"),
    (dict(clip_norm=0.0), "clip_norm must be > 0 or None, got 0.0"),
    (dict(warmup_steps=-1), "warmup_steps and decay_steps must be >= 0, got -1 and 0"),
    (dict(lr=float("nan")), "learning rate must be a positive"),
    (dict(weight_decay=-1.0), "weight_decay must be a number >= 0, got -1.0"),
    (dict(weight_decay=float("nan")), "weight_decay must be a number >= 0, got nan"),
    (dict(grad_accum=0), "grad_accum must be >= 1"),
])
def test_bad_optimizer_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OptimConfig(**kwargs)


def test_bad_train_settings():
    with pytest.raises(ValueError, match="epochs must be a positive integer, got 0"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got -2"):
        TrainConfig(batch_size=-2)
    with pytest.raises(ValueError, match="keep_checkpoints must be a positive integer, got 0"):
        TrainConfig(keep_checkpoints=0)
    with pytest.raises(ValueError, match=r"save_every must be None or an integer >= 0 \(0 = every epoch\), got -5"):
        TrainConfig(save_every=-5)
    with pytest.raises(ValueError, match=r"save_minutes must be >= 0 \(0 = no timed checkpoints\), got -1"):
        TrainConfig(save_minutes=-1)
    for seed in (2**64, -1, 1.5):
        with pytest.raises(ValueError, match=re.escape(f"seed must be an integer in [0, 2**63), got {seed!r}")):
            TrainConfig(seed=seed)


class _CharTok:
    """A byte-level stand-in for the GPT-2 tokenizer (keeps this test independent of BPE files)."""
    eot_token = 0

    def encode(self, text, allowed_special=()):
        return [b % 96 + 1 for b in text.encode()]

    def decode(self, ids):
        return "".join(chr(i + 31) for i in ids)


def test_out_in_kernels_train_like_in_out(tiny_cfg):
    # the CPU's faster (out, in) storage is the same model under training: the same loss at every
    # step (to float32 rounding), so the same updates
    base = cfg = tiny_cfg.replace(drop_rate=0.1)
    opts = Options.for_backend(linear_layout="out_in")
    tx = make_optimizer(OptimConfig(lr=1e-3, clip_norm=1.0))
    ref = create_state(base, tx, 0)
    copied = jax.tree_util.tree_map(jnp.copy, ref.params)  # the steps donate their state
    state = create_state(cfg, tx, 0, params=to_layout(copied, cfg, opts), opts=opts)
    ref_losses = _run(make_steps(base, tx)[0], ref, base, 4)
    losses = _run(make_steps(cfg, tx, opts=opts)[0], state, cfg, 4)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
def test_train_loop_writes_a_loadable_run(tmp_path, tiny_cfg, layout):
    train_cfg, opts = tiny_cfg, Options.for_backend(linear_layout=layout)
    tok = _CharTok()
    ids = np.array(tok.encode("the quick brown fox jumps over the lazy dog. " * 12))
    x, y = make_windows(ids, tiny_cfg.context_length, tiny_cfg.context_length)
    n = int(0.8 * len(x))
    train_b = Batches(x[:n], y[:n], 4, shuffle=True, seed=0)
    val_b = Batches(x[n:], y[n:], 4, shuffle=False, drop_last=False)
    tcfg = TrainConfig(epochs=3, batch_size=4, eval_freq=2, eval_iter=2, sample_tokens=5, start_context="the",
                       optim=OptimConfig(lr=3e-3))
    res = train(train_cfg, tcfg, train_b, val_b, tok, tmp_path / "run", progress=False, opts=opts)
    h = res["history"]
    assert h["step"][0] == 0 and h["train_loss"][-1] < h["train_loss"][0]
    assert res["tokens_seen"] == 3 * len(train_b) * 4 * tiny_cfg.context_length
    lines = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == h["step"] and {"lr", "grad_norm", "val_loss"} <= set(lines[0])
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    assert len(res["samples"]) == 3
    params, cfg = load_run(tmp_path / "run")
    assert cfg == tiny_cfg  # a run trained with (out, in) kernels loads in the usual (in, out) layout
    trained = to_canonical(res["state"].params, cfg, opts)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(trained)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(generate(params, cfg, [[1, 2]], 4),
                                  generate(res["state"].params, train_cfg, [[1, 2]], 4, opts=opts))


def test_unwritable_output_directory(tmp_path, tiny_cfg):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(PermissionError, match="cannot write to output directory"):
        train(tiny_cfg, TrainConfig(), None, None, None, blocker / "run")


def test_a_warmup_longer_than_the_run_is_refused_before_training(tmp_path, tiny_cfg):
    x = np.zeros((4, tiny_cfg.context_length), np.int32)
    train_b, val_b = Batches(x, x, 2, shuffle=False), Batches(x, x, 2, shuffle=False, drop_last=False)
    tcfg = TrainConfig(epochs=3, sample_tokens=0, optim=OptimConfig(warmup_steps=7))  # 3 epochs x 2 batches: 6 updates
    with pytest.raises(ValueError, match=re.escape("warmup_steps=7 is longer than the whole run (6 optimizer updates: "
                                                   "3 epochs of 2 batches, grad_accum 1)")):
        train(tiny_cfg, tcfg, train_b, val_b, None, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "steps.jsonl").exists()  # not one step ran


def test_missing_run_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a gptjax run directory"):
        load_run(tmp_path / "nope")


def test_an_empty_sample_prompt_is_refused_before_training(tmp_path, tiny_cfg):
    x = np.zeros((4, tiny_cfg.context_length), np.int32)
    train_b, val_b = Batches(x, x, 2, shuffle=False), Batches(x, x, 2, shuffle=False, drop_last=False)

    class Tok:
        def encode(self, text, allowed_special=()):
            return [1 for ch in text if ch.isalpha()]

    with pytest.raises(ValueError, match=r"the sample prompt '  ' is empty after tokenization; give --start-context"):
        train(tiny_cfg, TrainConfig(epochs=1, start_context="  "), train_b, val_b, Tok(), tmp_path / "run",
              progress=False)
    assert not (tmp_path / "run" / "steps.jsonl").exists()
