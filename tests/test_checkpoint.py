import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.checkpoint import CheckpointCorruptError, CheckpointMismatchError, RunExistsError, TrainCheckpoints, TrainingInterrupted
from gptjax.model_io import load_run, restore_params
from gptjax.config import GPTConfig
from gptjax.data import Batches, make_windows
from gptjax.generate import generate
from gptjax.optim import OptimConfig
from gptjax.tasks.pretrain import PretrainConfig as TrainConfig, pretrain as train
from gptjax.options import Options


class CharTok:
    """A byte-level stand-in for the GPT-2 tokenizer (no BPE files needed)."""
    eot_token = 0

    def encode(self, text, allowed_special=()):
        return [b % 96 + 1 for b in text.encode()]

    def decode(self, ids):
        return "".join(chr(i + 31) for i in ids)


def loaders(cfg, repeat=12):
    tok = CharTok()
    ids = np.array(tok.encode("the quick brown fox jumps over the lazy dog. " * repeat))
    x, y = make_windows(ids, cfg.context_length, cfg.context_length)
    n = int(0.8 * len(x))
    return Batches(x[:n], y[:n], 2, shuffle=True, seed=5), Batches(x[n:], y[n:], 2, shuffle=False, drop_last=False), tok


def tcfg_(**kw):
    kw = {"epochs": 2, "batch_size": 2, "eval_freq": 3, "eval_iter": 1, "sample_tokens": 3, "start_context": "the",
          **kw}
    return TrainConfig(**kw)


def leaves_equal(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def test_resume_is_bitwise_exact_with_dropout_shuffling_accumulation_and_schedule(tmp_path, tiny_cfg):
    cfg = tiny_cfg.replace(drop_rate=0.1)
    train_b, val_b, tok = loaders(cfg)
    n = 2 * len(train_b)
    tcfg = tcfg_(save_every=4, optim=OptimConfig.appendix_d(n // 2, lr=3e-3, grad_accum=2))
    full = train(cfg, tcfg, train_b, val_b, tok, tmp_path / "full", progress=False)
    stop = len(train_b) + 3  # mid-epoch, mid-accumulation (odd micro-step), between two periodic saves
    with pytest.raises(TrainingInterrupted) as info:
        train(cfg, tcfg, train_b, val_b, tok, tmp_path / "resumed", progress=False, stop_after=stop)
    assert info.value.step == stop and info.value.checkpoint.name == str(stop)
    res = train(cfg, tcfg, train_b, val_b, tok, tmp_path / "resumed", progress=False, resume=True)
    assert len(full["steps"]["loss"]) == n
    assert res["steps"] == full["steps"]  # every per-step loss, lr and grad norm, bit for bit
    assert res["history"] == full["history"] and res["samples"] == full["samples"]
    assert res["tokens_seen"] == full["tokens_seen"]
    assert leaves_equal(res["state"], full["state"])  # params, Adam moments, MultiSteps buffers, step, key
    log = lambda run: [{k: v for k, v in json.loads(s).items() if k != "elapsed_s"}
                       for s in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    assert log("resumed") == log("full")


def test_keeps_last_k_plus_best_and_survives_a_restart(tmp_path):
    params = lambda s: {"w": jnp.full((3,), float(s))}
    ck = TrainCheckpoints(tmp_path / "ck", keep=2)
    for step, val in [(1, 5.0), (2, 1.0), (3, 4.0), (4, 6.0)]:
        ck.save(step, params(step), {"step": jnp.asarray(step)}, {"val_loss": val}, val)
    ck.close()
    ck = TrainCheckpoints(tmp_path / "ck", keep=2)
    assert ck.steps() == [2, 3, 4] and ck.best_step() == 2 and ck.latest_step() == 4
    ck.save(5, params(5), {"step": jnp.asarray(5)}, {"val_loss": 0.5}, 0.5)
    ck.close()
    ck = TrainCheckpoints(tmp_path / "ck", read_only=True)
    assert ck.steps() == [4, 5] and ck.best_step() == 5
    p, rest, meta = ck.restore({"w": jax.ShapeDtypeStruct((3,), jnp.float32)},
                               {"step": jax.ShapeDtypeStruct((), jnp.int32)}, step=4)
    assert float(p["w"][0]) == 4.0 and int(rest["step"]) == 4 and meta == {"val_loss": 6.0}


def test_never_checkpoints_non_finite_values(tmp_path):
    ck = TrainCheckpoints(tmp_path / "ck")
    ck.save(1, {"w": jnp.ones(2)}, {"step": jnp.asarray(1)}, {})
    with pytest.raises(FloatingPointError, match=r"refusing to checkpoint step 2: .*NaN/inf; the last good "
                                                 r"checkpoint is .*ck/1 \(after 1 steps\)"):
        ck.save(2, {"w": jnp.array([1.0, jnp.nan])}, {"step": jnp.asarray(2)}, {})
    ck.close()
    assert TrainCheckpoints(tmp_path / "ck").steps() == [1]


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory):
    """A run stopped after 5 steps: checkpoints 4 and 5, no final params/."""
    cfg = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
    run = tmp_path_factory.mktemp("interrupted") / "run"
    train_b, val_b, tok = loaders(cfg)
    with pytest.raises(TrainingInterrupted):
        train(cfg, tcfg_(save_every=2), train_b, val_b, tok, run, progress=False, stop_after=5)
    return run, cfg


def test_restore_for_inference_in_any_dtype(interrupted_run):
    run, cfg = interrupted_run
    assert not (run / "params").exists()
    params, got_cfg = load_run(run, dtype="bfloat16")  # falls back to the latest checkpoint
    assert got_cfg == cfg
    assert {a.dtype for a in jax.tree_util.tree_leaves(params)} == {jnp.dtype("bfloat16")}
    p32 = restore_params(run / "checkpoints", cfg, step=4)
    assert {a.dtype for a in jax.tree_util.tree_leaves(p32)} == {jnp.dtype("float32")}
    assert generate(params, cfg, [[1, 2]], 3, opts=Options(dtype="bfloat16")).shape == (1, 5)


def test_checkpoint_of_another_model_names_what_differs(interrupted_run):
    run, cfg = interrupted_run
    with pytest.raises(CheckpointMismatchError, match=r"checkpoint .*/checkpoints/5 was written with other model "
                                                      r"settings: emb_dim is 32 in the checkpoint but 64 here; "
                                                      r"n_layers is 2 in the checkpoint but 3 here"):
        restore_params(run / "checkpoints", cfg.replace(emb_dim=64, n_layers=3))


def test_resume_with_other_train_settings_names_what_differs(interrupted_run, tmp_path):
    run, cfg = interrupted_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    train_b, val_b, tok = loaders(cfg)
    with pytest.raises(CheckpointMismatchError, match=r"other train settings: epochs is 2 in the checkpoint but 3 "
                                                      r"here; optim.lr is 0.0004 in the checkpoint but 0.001 here"):
        train(cfg, tcfg_(epochs=3, optim=OptimConfig(lr=1e-3)), train_b, val_b, tok, copy, progress=False,
              resume=True)


def test_missing_and_empty_checkpoint_directories(tmp_path, tiny_cfg):
    with pytest.raises(FileNotFoundError, match=r"no checkpoints at '.*nope' \(no such directory\)"):
        restore_params(tmp_path / "nope", tiny_cfg)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint in '.*empty'; the run saved none yet"):
        restore_params(tmp_path / "empty", tiny_cfg)
    ck = TrainCheckpoints(tmp_path / "some")
    for s in (4, 5):
        ck.save(s, {"w": jnp.ones(2)}, {"step": jnp.asarray(s)}, {})
    ck.close()
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 7 in .*; available steps: \[4, 5\]"):
        restore_params(tmp_path / "some", tiny_cfg, step=7)


@pytest.mark.parametrize("damage", ["garble arrays", "delete meta"])
def test_corrupted_checkpoint_is_one_clear_error(interrupted_run, tmp_path, damage):
    run, cfg = interrupted_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    step_dir = copy / "checkpoints" / "5"
    if damage == "garble arrays":
        for f in (step_dir / "params").rglob("d/*"):
            f.write_bytes(b"\0" * 64)
    else:
        shutil.rmtree(step_dir / "meta")
    with pytest.raises(CheckpointCorruptError, match=r"checkpoint .*/checkpoints/5 is damaged or incomplete and "
                                                     r"cannot be read \(.*\)\. Delete that folder, or resume from an "
                                                     r"older one with --step N \(\[4\]\)"):
        load_run(copy)


def test_a_resume_passes_over_a_damaged_newest_checkpoint_or_starts_from_the_step_asked(tmp_path, capsys):
    cfg = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.1)
    train_b, val_b, tok = loaders(cfg)
    tcfg = tcfg_(save_every=2, keep_checkpoints=5)
    full = train(cfg, tcfg, train_b, val_b, tok, tmp_path / "full", progress=False)
    with pytest.raises(TrainingInterrupted):
        train(cfg, tcfg, train_b, val_b, tok, tmp_path / "cut", progress=False, stop_after=6)
    for f in (tmp_path / "cut" / "checkpoints" / "6" / "params").rglob("d/*"):
        f.write_bytes(b"\0" * 64)  # the newest is damaged: the resume starts from step 4, and says so
    capsys.readouterr()
    res = train(cfg, tcfg, train_b, val_b, tok, tmp_path / "cut", progress=False, resume=True)
    out = capsys.readouterr().out
    assert "checkpoints/6 is damaged or incomplete" in out and "trying the checkpoint before it" in out
    assert "resuming from" in out and "(after 4 steps)" in out
    assert res["steps"] == full["steps"] and leaves_equal(res["state"], full["state"])
    # an older step on purpose: the newer checkpoints go, the run is recomputed from there to the same end
    older = TrainCheckpoints(tmp_path / "full" / "checkpoints", read_only=True).steps()[0]
    again = train(cfg, tcfg, train_b, val_b, tok, tmp_path / "full", progress=False, resume=older)
    assert f"(after {older} steps)" in capsys.readouterr().out
    assert again["steps"] == full["steps"] and leaves_equal(again["state"], full["state"])


def test_a_second_run_in_the_same_directory_is_refused(interrupted_run, tmp_path):
    run, cfg = interrupted_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    train_b, val_b, tok = loaders(cfg)
    with pytest.raises(RunExistsError, match=r"already holds a run \(checkpoint after 5 steps\); continue it with "
                                             r"`gptjax pretrain --resume"):
        train(cfg, tcfg_(), train_b, val_b, tok, copy, progress=False)
    res = train(cfg, tcfg_(epochs=1), train_b, val_b, tok, copy, progress=False, overwrite=True)
    assert TrainCheckpoints(copy / "checkpoints", read_only=True).steps() == [len(train_b)]
    assert res["state"].step == len(train_b)


@pytest.mark.parametrize("opts", [Options(), Options(linear_layout="out_in", scan_layers=True)],
                         ids=["canonical", "out_in+scan"])
def test_default_cadence_saves_at_the_end_only_and_a_synchronous_save_copies_nothing(tmp_path, tiny_cfg, opts):
    cfg = tiny_cfg
    train_b, val_b, tok = loaders(cfg)
    r = train(cfg, tcfg_(), train_b, val_b, tok, tmp_path / "run", progress=False, opts=opts)
    n = 2 * len(train_b)
    assert TrainCheckpoints(tmp_path / "run" / "checkpoints", read_only=True).steps() == [n]  # not one per epoch
    # a checkpoint every step on the clock, the same losses
    timed = train(cfg, tcfg_(save_minutes=1e-9, keep_checkpoints=n), train_b, val_b, tok, tmp_path / "timed",
                  progress=False, opts=opts)
    assert TrainCheckpoints(tmp_path / "timed" / "checkpoints", read_only=True).steps() == list(range(1, n + 1))
    assert timed["steps"] == r["steps"]
    # what a synchronous save writes: views of the state's own buffers, in the canonical layout
    from gptjax.tasks.pretrain import make_steps
    steps = make_steps(cfg, OptimConfig(), opts=opts)
    state = r["state"]
    params, rest = steps.saved(state, host=True)
    buffers = [np.asarray(x) for x in jax.tree_util.tree_leaves((state.params, state.opt_state))]
    for leaf in jax.tree_util.tree_leaves((params, rest["opt_state"])):
        if isinstance(leaf, np.ndarray) and leaf.size > 1:
            assert any(np.shares_memory(leaf, b) for b in buffers)
    assert leaves_equal(params, steps.saved(state)[0]) and leaves_equal(rest, steps.saved(state)[1])


def test_retention_holds_during_the_run(tmp_path, tiny_cfg, monkeypatch):
    """--keep-checkpoints 2 with a save every step: at every save, at most the kept steps, the best one and the
    one being written are on disk, and nothing waits in the trash."""
    train_b, val_b, tok = loaders(tiny_cfg)
    seen = []
    save = TrainCheckpoints.save

    def watched(self, step, *a, **k):
        path = save(self, step, *a, **k)
        steps = [p for p in self.directory.iterdir() if p.name.isdigit()]
        trash = list((self.directory / "trash").iterdir()) if (self.directory / "trash").is_dir() else []
        seen.append((len(steps), len(trash)))
        return path

    monkeypatch.setattr(TrainCheckpoints, "save", watched)
    train(tiny_cfg, tcfg_(save_every=1, keep_checkpoints=2), train_b, val_b, tok, tmp_path / "run", progress=False)
    assert len(seen) == 2 * len(train_b)
    assert max(n for n, _ in seen) <= 3 and max(t for _, t in seen) == 0, seen


def test_a_warning_logged_after_importing_checkpoint_prints_once():
    """Orbax's import runs absl's logging.basicConfig(): its root handler must not repeat what a library's
    own handler (huggingface_hub's) printed, and still prints what nobody else did."""
    import subprocess
    import sys

    script = """if True:
        import logging
        import gptjax.checkpoint
        library = logging.getLogger("somelib")
        library.addHandler(logging.StreamHandler())  # as huggingface_hub and others do
        library.getChild("sub").warning("from a library with its own handler")
        logging.getLogger("plain").warning("from a logger without a handler")
        """
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("from a library with its own handler") == 1
    assert done.stderr.count("from a logger without a handler") == 1
