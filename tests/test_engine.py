"""gptjax.engine through every task: a run stopped by a real SIGINT and resumed ends bitwise equal to an
uninterrupted one, and data parallelism over 8 simulated CPU devices gives one device's losses.

Run as a script, this file is the 8-device subprocess: `python tests/test_engine.py dp TMP`.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from test_dpo import PREFS as RECORDS  # instruction records that also carry a chosen and a rejected answer
from test_instruct import EOT, CharTokenizer

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [("spam", "WIN a FREE prize now!! call 555"), ("ham", "see you at lunch today, ok?"),
         ("spam", "CLAIM your FREE cash prize"), ("ham", "running late, be there soon")] * 6


def _cfg(**kw):
    from gptjax.config import GPTConfig

    return GPTConfig(**{**dict(vocab_size=257, context_length=256, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.1,
                               tie_embeddings=True), **kw})


def run_task(task: str, out: Path, tcfg_kw: dict | None = None, **kw) -> dict:
    """One tiny run of `task` (6 steps of 8 rows, dropout on where the task allows it); returns its final params
    and every step's loss."""
    from gptjax.engine import OptimConfig
    from gptjax.model import init_params
    from gptjax.tasks import classify, dpo, instruct

    cfg, tok = _cfg(), CharTokenizer()
    params = init_params(cfg, jax.random.key(0))
    common = dict(eval_freq=2, eval_iter=1, save_every=2, seed=5, optim=OptimConfig(lr=1e-3), **(tcfg_kw or {}))
    if task == "classify":
        from gptjax.tasks.classify_data import LabeledTexts

        data = LabeledTexts([t for _, t in TEXTS], np.array([lab == "spam" for lab, _ in TEXTS], np.int32),
                            ("ham", "spam"))
        splits = {"train": data.subset(range(16)), "val": data.subset(range(16, 24))}
        tcfg = classify.ClassifierTrainConfig(epochs=3, batch_size=8, **common)
        r = classify.finetune_classifier(params, cfg, splits, tok, out, tcfg=tcfg, drop_rate=0.1, train="all",
                                         pad_token_id=EOT, progress=False, **kw)
    elif task == "instruct":
        tcfg = instruct.InstructTrainConfig(epochs=3, batch_size=8, sample_tokens=0, **common)
        r = instruct.finetune_instruct(params, cfg, {"train": RECORDS * 4, "val": RECORDS[:2], "test": []}, tok, out,
                                       tcfg=tcfg, pad_token_id=EOT, progress=False, respond=False, **kw)
    else:
        tcfg = dpo.DPOTrainConfig(epochs=3, batch_size=8, sample_tokens=0, **common)
        r = dpo.finetune_dpo(params, cfg.replace(drop_rate=0.0), {"train": RECORDS * 4, "val": RECORDS[:2], "test": []},
                             tok, out, tcfg=tcfg, pad_token_id=EOT, progress=False, respond=False, **kw)
    losses = [json.loads(ln)["loss"] for ln in (out / "steps.jsonl").read_text().splitlines()]
    return {"params": r["params"], "losses": losses}


@pytest.mark.parametrize("task", ["classify", "instruct", "dpo"])
def test_a_sigint_then_resume_ends_bitwise_equal_to_an_uninterrupted_run(task, tmp_path, monkeypatch):
    from gptjax import engine
    from gptjax.checkpoint import TrainingInterrupted

    full = run_task(task, tmp_path / "full")
    assert len(full["losses"]) == 6

    class Bar:  # the progress bar: a real SIGINT to this process once the 3rd step is done
        def __init__(self, *a, **k):
            self.n = 0

        def update(self, n):
            self.n += n
            if self.n == 3:
                signal.raise_signal(signal.SIGINT)

        def __getattr__(self, name):
            return lambda *a, **k: None

    with monkeypatch.context() as m:
        m.setattr(engine, "tqdm", Bar)
        with pytest.raises(TrainingInterrupted, match="stopped by SIGINT after step 2") as info:
            run_task(task, tmp_path / "cut")
    assert info.value.step == 3 and info.value.exit_code == 130
    resumed = run_task(task, tmp_path / "cut", resume=True)
    assert full["losses"][-1] < full["losses"][0]  # it trains
    assert resumed["losses"] == full["losses"]
    for a, b in zip(jax.tree_util.tree_leaves(resumed["params"]), jax.tree_util.tree_leaves(full["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_resume_from_an_earlier_checkpoint_logs_every_eval_and_epoch_once(tmp_path):
    from gptjax.checkpoint import TrainingInterrupted

    def metrics(out: Path) -> list[dict]:  # wall time aside
        return [{k: v for k, v in json.loads(ln).items() if k != "elapsed_s"}
                for ln in (out / "metrics.jsonl").read_text().splitlines()]

    full = run_task("classify", tmp_path / "full")
    keep = dict(keep_checkpoints=5)
    with pytest.raises(TrainingInterrupted):  # stopped after step 5: epochs 1 and 2 are logged
        run_task("classify", tmp_path / "cut", tcfg_kw=keep, stop_after=5)
    resumed = run_task("classify", tmp_path / "cut", tcfg_kw=keep, resume=2)  # back to the end of epoch 1
    assert resumed["losses"] == full["losses"]
    assert metrics(tmp_path / "cut") == metrics(tmp_path / "full")
    assert sum("train_acc" in r for r in metrics(tmp_path / "full")) == 3  # one accuracy record per epoch


def test_a_run_trained_under_some_options_resumes_and_decodes_under_others(tmp_path):
    """Scan + full remat + bfloat16 compute for 3 steps; the checkpoint (canonical params and AdamW moments)
    resumes per-layer in float32 with (out, in) kernels, and the result decodes on the CPU kernel."""
    from gptjax.checkpoint import TrainingInterrupted
    from gptjax.model_io import load_run
    from gptjax.data import Batches, make_windows
    from gptjax.engine import OptimConfig
    from gptjax.generate import generate
    from gptjax.layout import to_layout
    from gptjax.options import Options
    from gptjax.tasks.pretrain import PretrainConfig, pretrain

    cfg = _cfg(vocab_size=97, context_length=16, drop_rate=0.0)
    ids = np.random.default_rng(0).integers(1, 97, 400)
    x, y = make_windows(ids, 16, 16)
    train_b, val_b = Batches(x[:20], y[:20], 4, shuffle=True, seed=1), Batches(x[20:], y[20:], 4, shuffle=False)
    tcfg = PretrainConfig(epochs=2, batch_size=4, eval_freq=2, eval_iter=1, sample_tokens=0, save_every=3,
                          optim=OptimConfig(lr=3e-3))
    fast = Options(scan_layers=True, remat="full", dtype="bfloat16")
    with pytest.raises(TrainingInterrupted):
        pretrain(cfg, tcfg, train_b, val_b, None, tmp_path / "run", progress=False, stop_after=3, opts=fast)
    plain = Options(linear_layout="out_in")
    r = pretrain(cfg, tcfg, train_b, val_b, None, tmp_path / "run", progress=False, resume=True, opts=plain)
    assert r["state"].params["h_0"]["attn"]["c_attn"]["kernel"].shape == (3 * 32, 32)  # per-layer, (out, in)
    losses = r["steps"]["loss"]
    assert len(losses) == 10 and all(np.isfinite(losses)) and losses[-1] < losses[0]
    # the uninterrupted float32 run from the same start: bfloat16 compute for 3 steps moves it only a little
    ref = pretrain(cfg, tcfg, train_b, val_b, None, tmp_path / "ref", progress=False, opts=plain)
    np.testing.assert_allclose(losses[3:], ref["steps"]["loss"][3:], rtol=0.05)
    params, _ = load_run(tmp_path / "run")  # canonical: per-layer (in, out)
    assert params["h_0"]["attn"]["c_attn"]["kernel"].shape == (32, 3 * 32)
    prompt = np.asarray(x[:1, :4], np.int32)
    xla = generate(params, cfg, prompt, 6)
    on_kernel = Options(linear_layout="out_in", matvec="kernel")
    kernel = generate(to_layout(params, cfg, on_kernel), cfg, prompt, 6, opts=on_kernel)
    np.testing.assert_array_equal(kernel, xla)


@pytest.mark.slow
def test_dp_on_8_devices_gives_one_devices_losses_for_every_task(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, __file__, "dp", str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["devices"] == 8
    for task in ("classify", "instruct", "dpo"):
        assert len(r[task]["one"]) == 6 and r[task]["one"][-1] < r[task]["one"][0]
        assert r[task]["dp"] == pytest.approx(r[task]["one"], rel=1e-4, abs=1e-5), task


def worker_dp(tmp: Path) -> dict:
    out = {"devices": jax.device_count()}
    for task in ("classify", "instruct", "dpo"):
        one = run_task(task, tmp / f"{task}-one")
        dp = run_task(task, tmp / f"{task}-dp", sharding="dp")
        out[task] = {"one": one["losses"], "dp": dp["losses"]}
    return out


if __name__ == "__main__":
    mode, tmp = sys.argv[1], Path(sys.argv[2])
    print(json.dumps({"dp": worker_dp}[mode](tmp)))
