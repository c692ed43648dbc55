"""Book appendix D: the training loop with linear warmup, cosine decay and gradient clipping.

    python experiments/appendix_d_training_loop.py --corpus path/to/the-verdict.txt
    python experiments/appendix_d_training_loop.py --resume      # continue after Ctrl-C / SIGTERM / a crash
    python experiments/appendix_d_training_loop.py --report      # write the results of what has run so far

GPT-2 124M (context 256, dropout 0.1, no qkv bias), the-verdict, batch 2, 15 epochs, AdamW (weight
decay 0.1), peak lr 1e-3, 20% linear warmup from 1e-5, cosine decay to 1e-5, gradient clipping at 1.0
once the warmup is over, evaluation every 5 steps on 1 batch: the book's `train_model` settings.
The book prints "Ep 15 (Iter 000130): Train loss 0.041, Val loss 6.915" (the MEAP printing 0.101 / 6.707).
Writes experiments/results/appendix_d_training_loop.{md,json,png}.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
from pathlib import Path

import jax

from gptjax.checkpoint import CHECKPOINTS_DIR, TrainCheckpoints, TrainingInterrupted
from gptjax.config import get_config
from gptjax.data import create_dataloaders, load_corpus
from gptjax.options import Options
from gptjax.tokenizer import get_gpt2_tokenizer
from gptjax.optim import OptimConfig
from gptjax.tasks.pretrain import PretrainConfig as TrainConfig, pretrain as train

RESULTS = Path(__file__).parent / "results"
NAME = "appendix_d_training_loop"
BOOK = {"train_loss": 0.041, "val_loss": 6.915, "step": 130}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="default", help="text file or URL (default: the book's the-verdict, shipped with gptjax)")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="compute dtype (bfloat16: mixed precision, params and loss stay float32)")
    ap.add_argument("--out", default="checkpoints/appendix_d", help="run directory (weights are not committed)")
    ap.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    ap.add_argument("--report", action="store_true", help="only write the results of the run in --out so far")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args()

    text = load_corpus(args.corpus)
    sha = hashlib.sha256(text.encode()).hexdigest()  # lets `gptjax pretrain --resume OUT` check the corpus too
    tok = get_gpt2_tokenizer()
    cfg = get_config("gpt2-small", context_length=256, drop_rate=0.1, qkv_bias=False, init="book")
    opts = Options.for_backend(dtype=args.dtype)
    train_b, val_b = create_dataloaders(text, tok, context_length=256, batch_size=2, train_ratio=0.9, seed=args.seed)
    total = args.epochs * len(train_b)
    ocfg = OptimConfig.appendix_d(total, lr=1e-3, warmup_frac=0.2, initial_lr=1e-5, min_lr=1e-5, weight_decay=0.1)
    tcfg = TrainConfig(epochs=args.epochs, batch_size=2, eval_freq=5, eval_iter=1, seed=args.seed,
                       start_context="Every effort moves you", sample_tokens=50, save_every=0, keep_checkpoints=1,
                       optim=ocfg)
    env = f"jax {jax.__version__}, {jax.devices()[0].device_kind}, {platform.processor() or platform.machine()}"
    if args.report:
        meta = TrainCheckpoints(Path(args.out) / CHECKPOINTS_DIR, read_only=True).meta()
        write_results(meta, opts, ocfg, total, env, finished=len(meta["steps"]["loss"]) == total)
        return 0
    try:
        res = train(cfg, tcfg, train_b, val_b, tok, args.out, progress=not args.quiet, resume=args.resume,
                    overwrite=not args.resume, run_info={"data": {"corpus": args.corpus, "stride": None,
                                                                  "train_ratio": 0.9, "corpus_sha256": sha}},
                    opts=opts)
    except TrainingInterrupted as e:
        print(e, file=sys.stderr)
        meta = TrainCheckpoints(Path(args.out) / CHECKPOINTS_DIR, read_only=True).meta()
        write_results(meta, opts, ocfg, total, env, finished=False)
        return e.exit_code
    write_results({"history": res["history"], "steps": res["steps"], "samples": res["samples"],
                   "tokens_seen": res["tokens_seen"], "wall_s": res["wall_s"]}, opts, ocfg, total, env, finished=True)
    return 0


def write_results(meta: dict, opts: Options, ocfg: OptimConfig, total: int, env: str, finished: bool) -> None:
    h, steps, samples = meta["history"], meta["steps"], meta["samples"]
    done = len(steps["loss"])
    RESULTS.mkdir(exist_ok=True)
    plot(h, steps, RESULTS / f"{NAME}.png")
    state = "finished" if finished else f"UNFINISHED: {done} of {total} steps ran (resume with --resume)"
    rows = ["| step | epoch | tokens seen | train loss | val loss | lr | grad norm |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for i, s in enumerate(h["step"]):
        rows.append(f"| {s} | {h['epoch'][i]} | {h['tokens_seen'][i]:,} | {h['train_loss'][i]:.3f} | "
                    f"{h['val_loss'][i]:.3f} | {steps['lr'][s]:.2e} | {steps['grad_norm'][s]:.2f} |")
    best = min(range(len(h["val_loss"])), key=h["val_loss"].__getitem__)
    md = "\n".join([
        "# Appendix D: warmup + cosine decay + gradient clipping, GPT-2 124M on the-verdict", "",
        f"Run {state}; wall time {meta['wall_s']:.0f} s ({env}); compute dtype {opts.dtype}.",
        f"Settings: {total} steps (batch 2, context 256), AdamW weight decay {ocfg.weight_decay}, lr "
        f"{ocfg.initial_lr:g} -> {ocfg.lr:g} over {ocfg.warmup_steps} warmup steps, cosine to {ocfg.min_lr:g} over "
        f"{ocfg.decay_steps} steps, global-norm clipping {ocfg.clip_norm} after the warmup.", "",
        f"Last evaluation (step {h['step'][-1]}): train loss **{h['train_loss'][-1]:.3f}**, val loss "
        f"**{h['val_loss'][-1]:.3f}**; best val loss {h['val_loss'][best]:.3f} at step {h['step'][best]}. "
        f"The book prints train {BOOK['train_loss']} / val {BOOK['val_loss']} at step {BOOK['step']}.", "",
        *rows, "", f"![loss, learning rate and gradient norm]({NAME}.png)", "",
        "Samples (\"Every effort moves you\", greedy, 50 tokens):", "",
        *[f"- epoch {s['epoch']}: {s['text']!r}" for s in samples], ""])
    (RESULTS / f"{NAME}.md").write_text(md)
    (RESULTS / f"{NAME}.json").write_text(json.dumps(
        {"finished": finished, "steps_done": done, "total_steps": total, "history": h, "steps": steps,
         "samples": samples, "tokens_seen": meta["tokens_seen"], "wall_s": meta["wall_s"], "env": env,
         "optim": ocfg.__dict__, "book": BOOK}, indent=1))
    print(md)


def plot(h: dict, steps: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(13, 3.2))
    ax1.plot(h["step"], h["train_loss"], label="Training loss")
    ax1.plot(h["step"], h["val_loss"], linestyle="-.", label="Validation loss")
    ax1.set_xlabel("Steps")
    ax1.set_ylabel("Loss")
    ax1.legend(loc="upper right")
    ax2.plot(range(len(steps["lr"])), steps["lr"])
    ax2.set_xlabel("Steps")
    ax2.set_ylabel("Learning rate")
    ax3.plot(range(len(steps["grad_norm"])), steps["grad_norm"])
    ax3.set_xlabel("Steps")
    ax3.set_ylabel("Gradient norm (before clipping)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
