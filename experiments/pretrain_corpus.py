"""Beyond a short story, on a laptop: prepare a corpus of tens of MB into token shards, then pretrain a small
GPT on it for a fixed token budget, with train/val loss against tokens, prepare's and the loader's throughput.

    python experiments/pretrain_corpus.py [--max-mb 40] [--tokens 400000] [--out checkpoints/pretrain_corpus]

The corpus is the text of the installed Python's standard library and site-packages (.py/.rst/.txt files, one
document each; built into a temporary folder by experiments/prepare_throughput.py's builder, never committed).
The model: 6 layers, 384 wide, 6 heads, context 256, tied head, GPT-2 init, batch 8, AdamW 1e-3 with warmup
and cosine decay, validation every 25 steps on 8 fixed val batches. Writes experiments/results/
pretrain_corpus.{md,json,png}.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import tempfile
import time
from pathlib import Path

from gptjax.runtime import setup

setup()

from gptjax import runs, shards  # noqa: E402
from gptjax.config import get_config  # noqa: E402
from gptjax.optim import OptimConfig  # noqa: E402
from gptjax.tasks.pretrain import PretrainConfig, pretrain_shards  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def corpus_builder():
    spec = importlib.util.spec_from_file_location("prepare_throughput", HERE / "prepare_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_corpus


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-mb", type=float, default=40.0, help="MB of text in the corpus")
    ap.add_argument("--tokens", type=int, default=400_000, help="training budget in tokens")
    ap.add_argument("--out", default="checkpoints/pretrain_corpus", help="run directory (not committed)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="gptjax-corpus-") as tmp:
        tmp = Path(tmp)
        corpus = corpus_builder()(tmp, args.max_mb)
        t0 = time.perf_counter()
        meta = shards.prepare(sorted(map(str, tmp.glob("corpus_*.jsonl"))), tmp / "shards", workers=2,
                              shard_tokens=10_000_000, val_fraction=0.005, progress=False)
        prepare_s = time.perf_counter() - t0
        tokens = sum(v["tokens"] for v in meta["splits"].values())
        ds = shards.ShardDataset(tmp / "shards", "train", 256, 8, seed=0)
        t0 = time.perf_counter()
        for step in range(2000):
            ds.batch(step)
        loader_bps = 2000 / (time.perf_counter() - t0)

        cfg = get_config("gpt2-small", n_layers=6, emb_dim=384, n_heads=6, context_length=256, drop_rate=0.0,
                         tie_embeddings=True, qkv_bias=True, init="gpt2")
        steps = args.tokens // (8 * 256)
        tcfg = PretrainConfig(batch_size=8, eval_freq=25, eval_iter=8, sample_tokens=30, start_context="def main(",
                              optim=OptimConfig(lr=1e-3, weight_decay=0.1, b2=0.95, warmup_steps=max(steps // 20, 1),
                                                decay_steps=steps - max(steps // 20, 1), min_lr=1e-4, clip_norm=1.0))
        r = pretrain_shards(tmp / "shards", args.out, cfg, tcfg, max_steps=steps, progress=False, overwrite=True)
    h = r["history"]
    result = {"corpus": corpus, "prepare_s": prepare_s, "prepare_MBps": corpus["text_bytes"] / 1e6 / prepare_s,
              "prepare_tokens_per_s": tokens / prepare_s, "tokens": tokens,
              "train_tokens": meta["splits"]["train"]["tokens"], "val_tokens": meta["splits"]["val"]["tokens"],
              "loader_batches_per_s": loader_bps, "steps": steps, "wall_s": r["wall_s"],
              "train_tokens_per_s": steps * 8 * 256 / r["wall_s"], "history": h, "sample": r["samples"][-1]["text"],
              "data_wait_ms": r.get("data_wait_ms"), "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    runs.plot_curves(h["tokens_seen"], {"Training loss": h["train_loss"], "Validation loss": h["val_loss"]},
                     RESULTS / "pretrain_corpus.png", xlabel="Tokens seen")
    lines = [f"Corpus: {corpus['documents']:,} files of the installed Python ({corpus['text_bytes'] / 1e6:.1f} MB), "
             f"{tokens:,} GPT-2 tokens ({result['val_tokens']:,} val). `prepare` (2 workers): {prepare_s:.1f} s, "
             f"{result['prepare_MBps']:.1f} MB/s, {result['prepare_tokens_per_s']:,.0f} tokens/s; the loader: "
             f"{loader_bps:,.0f} batches/s of 8 x 256.", "",
             f"Model: 6 layers, 384 wide, context 256, {steps} steps of 8 x 256 tokens ({steps * 2048:,} tokens) in "
             f"{r['wall_s']:.0f} s ({result['train_tokens_per_s']:,.0f} tokens/s), peak RSS "
             f"{result['peak_rss_MB']:,.0f} MB; data wait per step {result['data_wait_ms']}", "",
             "| tokens seen | train loss | val loss |", "|---:|---:|---:|"]
    lines += [f"| {t:,} | {a:.3f} | {b:.3f} |" for t, a, b in zip(h["tokens_seen"], h["train_loss"], h["val_loss"])]
    lines += ["", f"Sample after training (`def main(`): `{result['sample']!r}`", "",
              "![loss](pretrain_corpus.png)", "", f"Command: `python experiments/pretrain_corpus.py --max-mb "
              f"{args.max_mb:g} --tokens {args.tokens}`"]
    print("\n".join(lines))
    (RESULTS / "pretrain_corpus.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "pretrain_corpus.json").write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
