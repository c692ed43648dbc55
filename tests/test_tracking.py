"""Trackers beside the JSONL logs: TensorBoard event files read back, W&B through a stand-in module, a resume
that changes the tracker, and one clear error when the package is missing."""
import importlib.machinery
import importlib.util
import json
import struct
import sys
import types
from pathlib import Path

import pytest

from gptjax import tracking
from gptjax.checkpoint import TrainingInterrupted
from gptjax.cli import main
from gptjax.config import GPTConfig
from gptjax.tasks.pretrain import PretrainConfig, pretrain_corpus

CFG = GPTConfig(context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)


def tb_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of every event file in `log_dir` (TFRecord framing: length, crc, event, crc)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, dict[int, float]] = {}
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, {})[event.step] = v.simple_value
    return out


def jsonl(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines()]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("It had always been his fate to have women say such things of him. " * 20)
    return path


def tiny_run(corpus, out, tracker="none", **kw):
    tcfg = PretrainConfig(epochs=1, batch_size=2, eval_freq=3, eval_iter=1, sample_tokens=0, tracker=tracker)
    return pretrain_corpus(str(corpus), out, CFG, tcfg, progress=False, **kw)


def test_tensorboard_writer_logs_the_numbers_by_step(tmp_path):
    pytest.importorskip("tensorboardX")
    w = tracking.make_writer("tensorboard", tmp_path, {"train": {"lr": 1e-3}})
    w.log(0, {"step": 0, "epoch": 1, "loss": 2.5, "note": "text", "done": True})
    w.log(1, {"loss": 2.0, "lr": 1e-3})
    w.close()
    assert tb_scalars(tmp_path / tracking.TENSORBOARD_DIR) == {"loss": {0: 2.5, 1: 2.0},
                                                               "lr": {1: pytest.approx(1e-3)}}


def test_a_run_logs_every_step_and_eval_to_tensorboard_and_a_resume_may_switch_it_on(tmp_path, corpus):
    pytest.importorskip("tensorboardX")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    tiny_run(corpus, whole, "tensorboard")
    got, steps, evals = tb_scalars(whole / "tensorboard"), jsonl(whole / "steps.jsonl"), jsonl(whole / "metrics.jsonl")
    assert len(steps) > 4 and got["loss"] == {r["step"]: pytest.approx(r["loss"]) for r in steps}
    assert got["grad_norm"] == {r["step"]: pytest.approx(r["grad_norm"]) for r in steps}
    assert got["val_loss"] == {r["step"]: pytest.approx(r["val_loss"]) for r in evals}
    assert set(got["tokens_seen"]) == {r["step"] for r in evals} and "batch_loss" not in got and "epoch" not in got
    # the tracker is not part of what a checkpoint must match: a run started without one resumes with one
    with pytest.raises(TrainingInterrupted):
        tiny_run(corpus, cut, stop_after=3)
    assert not (cut / "tensorboard").exists()
    pretrain_corpus(None, cut, resume=True, progress=False, tracker="tensorboard")
    assert [r["loss"] for r in jsonl(cut / "steps.jsonl")] == [r["loss"] for r in steps]
    resumed = tb_scalars(cut / "tensorboard")["loss"]
    assert resumed == {r["step"]: pytest.approx(r["loss"]) for r in steps if r["step"] >= 3}
    assert json.loads((cut / "config.json").read_text())["train"]["tracker"] == "tensorboard"


class FakeWandb(types.ModuleType):
    """What gptjax uses of wandb: init(...) -> a run with log(metrics, step=) and finish()."""

    def __init__(self):
        super().__init__("wandb")
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kw):
        self.inits.append(kw)
        return self

    def log(self, metrics, step):
        self.logged.append((step, metrics))

    def finish(self):
        self.finished += 1


def test_wandb_gets_the_runs_settings_and_every_metric_offline_without_an_account(tmp_path, corpus, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: no `wandb login`
    run = tmp_path / "run"
    tiny_run(corpus, run, "wandb")
    (init,) = fake.inits
    assert (init["mode"], init["project"], init["name"], init["dir"]) == ("offline", "gptjax", "run", str(run))
    assert init["config"]["train"]["batch_size"] == 2 and init["config"]["model"]["emb_dim"] == 32
    steps = [s for s, _ in fake.logged]
    assert steps == sorted(steps) and fake.finished == 1  # W&B drops a step that goes back
    by_step = {}
    for s, m in fake.logged:
        by_step.setdefault(s, {}).update(m)
    assert [by_step[r["step"]]["loss"] for r in jsonl(run / "steps.jsonl")] == \
        [r["loss"] for r in jsonl(run / "steps.jsonl")]
    assert all(by_step[r["step"]]["val_loss"] == r["val_loss"] for r in jsonl(run / "metrics.jsonl"))
    (tmp_path / ".netrc").write_text("machine api.wandb.ai login user password KEY\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert tracking.wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.wandb_mode() == "disabled"


def test_a_missing_tracker_package_is_one_error_before_anything_is_written(tmp_path, corpus, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    for command in (["pretrain", "--data", str(corpus)], ["finetune-instruct", "--model", "random"]):
        out = tmp_path / command[0]
        assert main([*command, "--tracker", "wandb", "--out", str(out), "--quiet"]) == 2
        assert "--tracker wandb needs the wandb package: pip install 'gptjax[tracking]'" in capsys.readouterr().err
        assert not out.exists()
    with pytest.raises(ValueError, match="tracker must be one of"):
        PretrainConfig(tracker="mlflow")
