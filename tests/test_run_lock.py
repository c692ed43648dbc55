"""One live run per directory: an OS lock held for the life of the run, and config.json saying how a run ended."""
import json
import signal
import subprocess
import sys
import time

import pytest
from test_faults import ENV, TINY

from gptjax import runs
from gptjax.cli import main


@pytest.fixture
def corpus(tmp_path):  # twice test_faults' corpus: a run that lives long enough to be raced
    path = tmp_path / "corpus.txt"
    path.write_text("It had always been his fate to have women say such things of him. " * 60)
    return path


def files(run):
    return {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def losses(run):
    return [json.loads(s)["loss"] for s in (run / "steps.jsonl").read_text().splitlines()]


def start(run, corpus, *extra):
    return subprocess.Popen([sys.executable, "-m", "gptjax.cli", "pretrain", "--out", str(run), "--corpus",
                             str(corpus), *TINY, *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=ENV)


def wait_for_lock(run, proc, timeout=120.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        lock = run / runs.LOCK_FILE
        if lock.is_file() and lock.read_text().strip() == str(proc.pid) and (run / "config.json").is_file():
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    raise AssertionError("the run never took its lock")


@pytest.mark.slow
def test_a_second_run_is_refused_while_the_first_lives_and_can_start_once_it_is_killed(tmp_path, corpus, capsys):
    first = tmp_path / "run"
    proc = start(first, corpus, "--epochs", "3", "--eval-freq", "4")
    wait_for_lock(first, proc)
    before = files(first)
    for argv in (["pretrain", "--out", str(first), "--corpus", str(corpus), *TINY],
                 ["pretrain", "--out", str(first), "--corpus", str(corpus), "--overwrite", *TINY],
                 ["pretrain", "--resume", str(first)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"is in use by a live run (process {proc.pid})" in err and "--resume" not in err, err
    after = files(first)
    assert {k: v for k, v in after.items() if k in before and k.name == "config.json"} == \
        {k: v for k, v in before.items() if k.name == "config.json"}  # the refused runs wrote nothing of theirs
    assert proc.wait(timeout=600) == 0, proc.stdout.read()
    # the first run finished unharmed: the same losses as a run that was alone
    solo = tmp_path / "solo"
    assert main(["pretrain", "--out", str(solo), "--corpus", str(corpus), "--epochs", "3", "--eval-freq", "4",
                 *TINY]) == 0
    assert losses(first) == losses(solo)
    assert json.loads((first / "config.json").read_text())["status"] == "finished"

    # SIGKILL: the kernel drops the lock, so the directory can be resumed at once
    killed = tmp_path / "killed"
    proc = start(killed, corpus, "--epochs", "1", "--eval-freq", "4", "--save-every", "1")
    wait_for_lock(killed, proc)
    while not (killed / "checkpoints" / "2").is_dir():
        assert proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((killed / "config.json").read_text())["status"] == "running"  # nothing could record it
    assert main(["pretrain", "--resume", str(killed)]) == 0
    assert json.loads((killed / "config.json").read_text())["status"] == "finished"


def test_config_says_how_a_run_ended(tmp_path, corpus):
    assert main(["pretrain", "--out", str(tmp_path / "ok"), "--corpus", str(corpus), "--epochs", "1", *TINY]) == 0
    assert json.loads((tmp_path / "ok" / "config.json").read_text())["status"] == "finished"
    from gptjax.config import GPTConfig
    from gptjax.data import create_dataloaders
    from gptjax.tasks.pretrain import PretrainConfig, pretrain
    from test_checkpoint import CharTok
    from gptjax.checkpoint import TrainingInterrupted
    from gptjax.optim import OptimConfig

    cfg = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
    tok = CharTok()
    train_b, val_b = create_dataloaders(corpus.read_text(), tok, context_length=16, batch_size=2)
    tcfg = PretrainConfig(epochs=1, batch_size=2, eval_iter=1, sample_tokens=0, start_context="It")
    with pytest.raises(TrainingInterrupted):
        pretrain(cfg, tcfg, train_b, val_b, tok, tmp_path / "cut", progress=False, stop_after=2)
    assert json.loads((tmp_path / "cut" / "config.json").read_text())["status"] == "interrupted"
    blowup = PretrainConfig(epochs=1, batch_size=2, eval_iter=1, eval_freq=1, sample_tokens=0,
                            optim=OptimConfig(lr=1e30))
    with pytest.raises(FloatingPointError):
        pretrain(cfg, blowup, train_b, val_b, tok, tmp_path / "nan", progress=False)
    assert json.loads((tmp_path / "nan" / "config.json").read_text())["status"] == "diverged"
    # the lock went with each run: this process can take every directory again
    for run in ("ok", "cut", "nan"):
        runs.check_not_running(tmp_path / run)
        assert tmp_path.joinpath(run).resolve() not in runs._held
