"""Faults: signals, kills mid-save, divergence, failing disks, bad checkpoint input. Real subprocesses where it matters."""
import errno
import json
import os
import re
import resource
import signal
import subprocess
import sys
import textwrap
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from gptjax.checkpoint import CheckpointSaveError, TrainCheckpoints
from gptjax.model_io import load_run
from gptjax.cli import main

TINY = ["--emb-dim", "32", "--n-layers", "2", "--n-heads", "4", "--context-length", "16", "--batch-size", "2",
        "--eval-iter", "1", "--quiet"]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", "GPTJAX_OFFLINE": "1"}


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("It had always been his fate to have women say such things of him. " * 30)
    return path


def _log(run):
    return [{k: v for k, v in json.loads(s).items() if k != "elapsed_s"}
            for s in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sigint_and_sigterm_save_and_say_how_to_resume_and_the_resume_is_exact(tmp_path, corpus, capsys):
    """Two real `gptjax pretrain` processes, stopped by SIGINT / SIGTERM mid-run; then --resume finishes one."""
    args = ["--corpus", str(corpus), "--epochs", "3", "--eval-freq", "1", *TINY]
    procs = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        run = tmp_path / sig.name
        procs[sig] = (run, subprocess.Popen([sys.executable, "-m", "gptjax.cli", "pretrain", "--out", str(run), *args],
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV))
    def stop_at_step_1(p, sig):
        for line in p.stdout:
            if "(Step 000001)" in line:
                p.send_signal(sig)
                break

    watchers = [threading.Thread(target=stop_at_step_1, args=(p, sig)) for sig, (_, p) in procs.items()]
    for w in watchers:
        w.start()
    for w in watchers:
        w.join(timeout=240)
    for sig, (run, p) in procs.items():
        out, err = p.communicate(timeout=240)
        assert p.returncode == 128 + sig, err
        assert f"got {sig.name}; finishing the current step and saving a checkpoint" in err
        m = re.search(rf"training stopped by {sig.name} after step (\d+) \(epoch 1, batch \d+ of 12\); checkpoint "
                      rf"saved to (\S+)\. Resume with: gptjax pretrain --resume {re.escape(str(run))}", err)
        assert m, err
        step = int(m.group(1))
        assert m.group(2) == str(run / "checkpoints" / str(step + 1)) and step < 35
        assert TrainCheckpoints(run / "checkpoints", read_only=True).steps() == [step + 1]
    run = procs[signal.SIGINT][0]
    capsys.readouterr()
    assert main(["pretrain", "--resume", str(run), "--quiet"]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert json.loads((run / "config.json").read_text())["steps"] == 36
    assert main(["pretrain", "--out", str(tmp_path / "whole"), *args]) == 0  # never interrupted
    assert _log(run) == _log(tmp_path / "whole")  # per-step losses across a process boundary, bit for bit
    for a, b in zip(jax.tree_util.tree_leaves(load_run(run)[0]), jax.tree_util.tree_leaves(load_run(tmp_path / "whole")[0])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


_SAVER = textwrap.dedent("""
    import sys
    import numpy as np
    from gptjax.checkpoint import TrainCheckpoints
    ck = TrainCheckpoints(sys.argv[1], keep=2, async_save=sys.argv[2] == "async")
    step = 0
    while True:
        step += 1
        w = np.random.default_rng(step).normal(size=(2, 1 << 20)).astype(np.float32)  # 8 MB, incompressible
        ck.save(step, {"w": w}, {"step": np.int32(step)}, {"step": step}, val_loss=float(step % 3))
        print("saved", step, flush=True)
""")


@pytest.mark.slow
def test_sigkill_mid_save_leaves_the_previous_checkpoint_restorable(tmp_path):
    """Kill -9 a process that checkpoints back to back, at several points, in sync and async mode."""
    script = tmp_path / "saver.py"
    script.write_text(_SAVER)
    cases = [(mode, delay) for mode in ("sync", "async") for delay in (0.0, 0.07, 0.2)]
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / f"{mode}-{delay}"), mode],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV)
             for mode, delay in cases]
    partial = 0
    for (mode, delay), p in zip(cases, procs):
        for line in p.stdout:
            if line.startswith("saved 2"):
                break
        time.sleep(delay)
        p.kill()
        p.wait()
        ck_dir = tmp_path / f"{mode}-{delay}"
        partial += any("tmp" in name for name in os.listdir(ck_dir))
        ck = TrainCheckpoints(ck_dir)  # a writer: drops what the kill left half-written
        assert not any("tmp" in name for name in os.listdir(ck_dir))
        steps = ck.steps()
        assert steps and steps[-1] >= (2 if mode == "sync" else 1)
        for step in steps:
            w, rest, meta = ck.restore({"w": jax.ShapeDtypeStruct((2, 1 << 20), jnp.float32)},
                                       {"step": jax.ShapeDtypeStruct((), jnp.int32)}, step=step)
            expect = np.random.default_rng(step).normal(size=(2, 1 << 20)).astype(np.float32)
            np.testing.assert_array_equal(np.asarray(w["w"]), expect)
            assert int(rest["step"]) == step and meta == {"step": step}
        ck.save(steps[-1] + 1, {"w": jnp.zeros((2, 1 << 20))}, {"step": jnp.asarray(0)}, {})  # and it goes on
        ck.close()
    assert partial >= 1, "no kill landed inside a save; the test proved nothing"


def test_divergence_stops_with_the_step_and_the_last_good_checkpoint(tmp_path, corpus, capsys):
    """A learning rate that jumps from 1e-3 (step 0) to 1e20 (step 1 on): Adam's first steps move each weight by
    about the learning rate, so after step 1 the block weights are ~1e20 (finite) and step 2's forward
    multiplies two of them: 1e40 overflows float32 (max 3.4e38) whatever the order of the sums, so step 2's
    loss is not finite on every XLA. (The old --lr 10 run only hit a NaN where XLA:CPU fused the softmax's
    scale into an FMA: jax 0.10 did; on jax 0.12 the same run stays finite.)"""
    run = tmp_path / "run"
    code = main(["pretrain", "--corpus", str(corpus), "--out", str(run), "--epochs", "2", "--eval-freq", "5",
                 "--save-every", "2", "--initial-lr", "1e-3", "--warmup-steps", "1", "--lr", "1e20",
                 "--weight-decay", "0", "--sync-checkpoints", *TINY])
    err = capsys.readouterr().err
    m = re.search(r"training diverged: (.*(nan|inf|non-finite).*) at step (\d+) \(epoch \d\); nothing from that "
                  r"step on was saved\. The last good checkpoint is (\S+) \(after (\d+) steps\)\. Lower the "
                  r"learning rate", err)
    assert code == 2 and m, err
    bad, good = int(m.group(3)), int(m.group(5))
    assert (bad, good) == (2, 2), err  # step 2's loss; the checkpoint after steps 0 and 1
    ck = TrainCheckpoints(run / "checkpoints", read_only=True)
    assert ck.latest_step() == good <= bad and m.group(4) == str(run / "checkpoints" / str(good))
    params = load_run(run, step=good)[0]  # the latest checkpoint holds no NaN
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree_util.tree_leaves(params))


@pytest.mark.parametrize("err, hint", [(errno.ENOSPC, "No space left on device.*free some disk space"),
                                       (errno.EACCES, "Permission denied.*make it writable")])
def test_failing_disk_keeps_memory_state_and_older_checkpoints(tmp_path, corpus, capsys, monkeypatch, err, hint):
    real_save, calls = ocp.CheckpointManager.save, []

    def save(self, step, *a, **kw):
        calls.append(step)
        if len(calls) > 1:
            raise OSError(err, os.strerror(err))
        return real_save(self, step, *a, **kw)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    run = tmp_path / "run"
    code = main(["pretrain", "--corpus", str(corpus), "--out", str(run), "--epochs", "1", "--save-every", "3",
                 *TINY])
    assert code == 1
    msg = capsys.readouterr().err
    assert re.search(rf"gptjax pretrain: error: could not write checkpoint 6 to {re.escape(str(run))}/checkpoints: "
                     rf"\[Errno {err}\] {hint}, then resume from the latest complete checkpoint", msg), msg
    assert f"latest complete: {run}/checkpoints/3 (after 3 steps)" in msg
    ck = TrainCheckpoints(run / "checkpoints", read_only=True)
    assert ck.steps() == [3]
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree_util.tree_leaves(load_run(run)[0]))


def test_a_real_write_error_from_the_kernel(tmp_path):
    """RLIMIT_FSIZE makes the kernel fail the write with EFBIG (as a full disk would with ENOSPC), root or not."""
    ck = TrainCheckpoints(tmp_path / "ck", async_save=True)
    w = lambda s: {"w": jnp.asarray(np.random.default_rng(s).normal(size=(1 << 18,)), jnp.float32)}
    ck.save(1, w(1), {"step": jnp.asarray(1)}, {"step": 1})
    ck.wait()
    state = w(2)
    old_handler, old_limit = signal.signal(signal.SIGXFSZ, signal.SIG_IGN), resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, old_limit[1]))
    try:
        with pytest.raises(CheckpointSaveError, match=r"could not write checkpoint 2 to .*: \[Errno 27\] File too "
                                                      r"large\. Training state in memory is intact and older "
                                                      r"checkpoints are untouched \(latest complete: .*/1 \(after 1 "
                                                      r"steps\)\); free some disk space or raise the file-size limit"):
            ck.save(2, state, {"step": jnp.asarray(2)}, {"step": 2})
            ck.wait()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(w(2)["w"]))  # memory intact
    assert ck.steps() == [1]
    ck.save(3, state, {"step": jnp.asarray(3)}, {"step": 3})  # space is back: training checkpoints again
    ck.close()
    ck = TrainCheckpoints(tmp_path / "ck", read_only=True)
    assert ck.steps() == [1, 3]
    got, _, _ = ck.restore({"w": jax.ShapeDtypeStruct((1 << 18,), jnp.float32)}, step=1)
    np.testing.assert_array_equal(np.asarray(got["w"]), np.asarray(w(1)["w"]))


def test_resume_bad_input(tmp_path, corpus, capsys):
    assert main(["pretrain", "--resume", str(tmp_path / "nope")]) == 2
    assert "'" + str(tmp_path / "nope") + "' is not a gptjax run directory (no config.json)" in capsys.readouterr().err
    run = tmp_path / "run"
    assert main(["pretrain", "--corpus", str(corpus), "--out", str(run), "--epochs", "1", "--eval-freq", "5",
                 *TINY]) == 0
    assert main(["pretrain", "--resume", str(run), "--emb-dim", "64", "--epochs", "3"]) == 2
    assert ("--resume continues '" + str(run) + "' with the settings saved in its config.json; drop --epochs 3 (the "
            "run has epochs=1), --emb-dim 64 (the run has emb_dim=32)") in capsys.readouterr().err
    # how a run runs is not what it trains: it resumes under other execution options
    assert main(["pretrain", "--resume", str(run), "--scan-layers", "--dtype", "bfloat16", "--quiet"]) == 0
    assert json.loads((run / "config.json").read_text())["options"]["scan_layers"] is True
    other = tmp_path / "other.txt"
    other.write_text("A different story altogether, told at another length entirely. " * 30)
    assert main(["pretrain", "--resume", str(run), "--corpus", str(other)]) == 2
    assert "the corpus differs from the one" in capsys.readouterr().err
    assert main(["pretrain", "--corpus", str(corpus), "--out", str(run), "--epochs", "1", *TINY]) == 2
    assert "already holds a run (checkpoint after 12 steps); continue it with `gptjax pretrain --resume" in \
        capsys.readouterr().err
    assert main(["generate", "--model", str(run), "--prompt", ""]) == 2
    assert "the prompt is empty after tokenization; give --prompt some text" in capsys.readouterr().err
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["pretrain", "--corpus", str(corpus), "--out", str(blocker / "run"), "--epochs", "1", *TINY]) == 2
    assert "cannot write to output directory" in capsys.readouterr().err


@pytest.mark.slow
def test_after_a_sigkill_and_a_resume_only_the_kept_checkpoints_remain(tmp_path, corpus):
    """A run that saves every step, killed with SIGKILL (nothing can clean up) after several checkpoints, then
    resumed: at most --keep-checkpoints 2 plus the best are left, and nothing waits in the trash or half-written."""
    run, ck = tmp_path / "run", tmp_path / "run" / "checkpoints"
    args = ["--corpus", str(corpus), "--epochs", "1", "--save-every", "1", "--keep-checkpoints", "2", *TINY]
    p = subprocess.Popen([sys.executable, "-m", "gptjax.cli", "pretrain", "--out", str(run), *args],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    t0 = time.time()
    try:
        while not (ck.is_dir() and any(d.name.isdigit() and int(d.name) >= 4 for d in ck.iterdir())):
            assert p.poll() is None, p.stderr.read()
            assert time.time() - t0 < 300, "no fourth checkpoint in 5 minutes"
            time.sleep(0.01)
    finally:
        p.kill()  # SIGKILL
        p.wait()
    assert main(["pretrain", "--resume", str(run), "--quiet"]) == 0
    steps = TrainCheckpoints(ck, read_only=True).steps()
    assert steps[-1] == 12 and len(steps) <= 3, steps
    assert sorted(d.name for d in ck.iterdir() if not d.name.isdigit()) in ([], ["trash"]), list(ck.iterdir())
    assert not (ck / "trash").is_dir() or not any((ck / "trash").iterdir())
