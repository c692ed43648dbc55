"""Pretraining on token shards: `gptjax prepare`, then `gptjax pretrain --data SHARDS` with a step budget,
tokens per update by gradient accumulation, and an exact resume (batches are a function of the step)."""
import json
import threading

import jax
import numpy as np
import pytest

from gptjax.checkpoint import TrainingInterrupted
from gptjax.cli import main
from gptjax.config import GPTConfig
from gptjax.data import VERDICT_PATH
from gptjax.optim import OptimConfig
from gptjax.shards import ShardDataset
from gptjax.tasks.pretrain import PretrainConfig, StepBatches, pretrain_shards

TINY = ["--emb-dim", "32", "--n-layers", "2", "--n-heads", "4", "--context-length", "16", "--batch-size", "2",
        "--eval-freq", "2", "--eval-iter", "1", "--quiet"]


@pytest.fixture
def shard_dir(tmp_path):
    paragraphs = [p for p in VERDICT_PATH.read_text().split("\n\n") if p.strip()]
    files = []
    for i in range(0, len(paragraphs), 8):  # a document a file
        files.append(tmp_path / f"doc{i:03d}.txt")
        files[-1].write_text("\n\n".join(paragraphs[i:i + 8]))
    out = tmp_path / "shards"
    assert main(["prepare", *map(str, files), "--out", str(out), "--val-fraction", "0.2", "--shard-tokens", "1500",
                 "--workers", "0", "--quiet"]) == 0
    return out


def losses(run):
    return [json.loads(s)["loss"] for s in (run / "steps.jsonl").read_text().splitlines()]


def prefetch_threads():
    return [t for t in threading.enumerate() if "_produce" in t.name and t.is_alive()]


def test_pretrain_on_shards_with_a_step_budget_and_tokens_per_update(tmp_path, shard_dir, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", "--data", str(shard_dir), "--max-steps", "5", "--batch-tokens", "64", "--out", str(run),
                 "--warmup-steps", "1", "--cosine", "--lr", "3e-3", *TINY]) == 0
    assert "data wait per step" in capsys.readouterr().out
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["batch_tokens"] == 64 and config["data"]["steps"] == 10  # 5 updates of 2 micro-batches
    assert config["train"]["optim"]["grad_accum"] == 2 and config["train"]["optim"]["decay_steps"] == 4
    steps = losses(run)
    assert len(steps) == 10 and steps[-1] < steps[0]
    # evaluate reads shards too: all of the val split, near the run's last validation on a sample of it
    assert main(["evaluate", "--model", str(run), "--data", str(shard_dir), "--context-length", "16",
                 "--batch-size", "2", "--out", str(tmp_path / "e.json")]) == 0
    val = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["val_loss"]
    got = json.loads((tmp_path / "e.json").read_text())
    assert got["tokens"] >= 16 * 2 * 10 and abs(got["loss"] - val) < 0.1 * val
    # a budget without shards, or a token count that is not whole micro-batches: one clear error each
    assert main(["pretrain", "--max-steps", "3", "--out", str(tmp_path / "x"), *TINY]) == 2
    assert "budget a run on token shards" in capsys.readouterr().err
    assert main(["pretrain", "--data", str(shard_dir), "--max-steps", "3", "--batch-tokens", "50",
                 "--out", str(tmp_path / "y"), *TINY]) == 2
    assert "--batch-tokens 50 must be a multiple of batch_size x context_length = 32" in capsys.readouterr().err


def test_a_stopped_run_on_shards_resumes_bitwise(tmp_path, shard_dir):
    cfg = GPTConfig(context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.1)
    tcfg = PretrainConfig(batch_size=2, eval_freq=3, eval_iter=1, sample_tokens=0, save_every=2,
                          optim=OptimConfig(lr=3e-3))
    kw = dict(max_steps=6, batch_tokens=64, progress=False)
    with pytest.raises(TrainingInterrupted):
        pretrain_shards(shard_dir, tmp_path / "cut", cfg, tcfg, stop_after=5, **kw)
    assert not prefetch_threads()  # the run's prefetch thread ends with it, also when it raises
    with pytest.raises(ValueError, match="pass neither cfg nor tcfg"):  # a resume takes the run's own settings
        pretrain_shards(shard_dir, tmp_path / "cut", cfg, tcfg, resume=True, progress=False)
    pretrain_shards(shard_dir, tmp_path / "cut", resume=True, progress=False)  # prefetch restarts at step 5
    pretrain_shards(shard_dir, tmp_path / "whole", cfg, tcfg, **kw)
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole") and len(losses(tmp_path / "whole")) == 12
    pretrain_shards(shard_dir, tmp_path / "inline", cfg, tcfg, prefetch=0, **kw)
    assert losses(tmp_path / "inline") == losses(tmp_path / "whole") and not prefetch_threads()


def test_prefetched_batches_are_the_datasets_in_any_order_of_calls(shard_dir):
    ds = ShardDataset(shard_dir, "train", 16, 2, seed=3)
    with StepBatches(ds, 10, prefetch=2) as batches:
        for i in (0, 1, 2, 7, 8, 3, 3):  # a jump (a resume) restarts the prefetcher there
            for got, want in zip(batches.batch_at(0, i), ds.batch(i)):
                np.testing.assert_array_equal(np.asarray(got), want)
        x_BT = batches.batch_at(1, 0)[0]
        assert isinstance(x_BT, jax.Array) and x_BT.shape == (2, 16) and len(batches.wait_s) == 8  # on device
        assert len(prefetch_threads()) == 1
    assert not prefetch_threads()


def test_the_gpt2_124m_recipe_runs_a_few_steps_with_a_tiny_override(tmp_path, shard_dir):
    run = tmp_path / "run"
    assert main(["pretrain", "--config", "gpt2-124m", "--data", str(shard_dir), "--out", str(run), "--max-steps", "2",
                 "--warmup-steps", "1", "--n-layers", "2", "--emb-dim", "64", "--n-heads", "4", "--context-length",
                 "32", "--batch-size", "2", "--batch-tokens", "128", "--eval-freq", "4", "--eval-iter", "1",
                 "--quiet"]) == 0
    config = json.loads((run / "config.json").read_text())
    optim = config["train"]["optim"]
    assert (optim["lr"], optim["b2"], optim["weight_decay"], optim["clip_norm"], optim["min_lr"]) == \
        (6e-4, 0.95, 0.1, 1.0, 6e-5)
    assert optim["grad_accum"] == 2 and optim["decay_steps"] == 1
    assert config["options"]["dtype"] == "bfloat16" and config["options"]["vocab_multiple"] == 64
    assert config["model"]["tie_embeddings"] and config["model"]["qkv_bias"] and config["model"]["n_layers"] == 2
    assert len(losses(run)) == 4


def test_evaluate_equals_the_train_loops_validation_on_the_same_tokens(tmp_path, shard_dir):
    from gptjax.engine import mean_metrics
    from gptjax.layout import to_layout
    from gptjax.model_io import load_run
    from gptjax.options import Options
    from gptjax.shards import ShardDataset
    from gptjax.tasks.pretrain import FixedBatches, evaluate_corpus, make_steps

    run = tmp_path / "run"
    assert main(["pretrain", "--data", str(shard_dir), "--max-steps", "3", "--out", str(run), *TINY]) == 0
    params, cfg = load_run(run)
    opts = Options.for_backend()
    val = ShardDataset(shard_dir, "val", 16, 1, mode="sequential")
    every_window = FixedBatches(val.val_batches(val.num_windows))  # evenly spaced over all of them: all of them
    loop = mean_metrics(make_steps(cfg, OptimConfig(), opts=opts), to_layout(params, cfg, opts), every_window.epoch(0))
    got = evaluate_corpus(run, shard_dir, context_length=16, batch_size=1)
    assert got["tokens"] == val.num_windows * 16 and got["loss"] == pytest.approx(loop["loss"], rel=1e-6)
