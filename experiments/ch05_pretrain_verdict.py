"""Book chapter 5: pretrain GPT-2 124M (context 256) on the-verdict for 10 epochs.

    python experiments/ch05_pretrain_verdict.py --corpus path/to/the-verdict.txt [--matmul-precision bfloat16]

Writes experiments/results/ch05_pretrain_verdict{,_matmul_bf16}.{md,json,png}. The book's run starts near 9.8 / 9.9
(train / val) and ends near 0.5-0.6 / 6.4, with the best validation loss about 6.1.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

from gptjax.runtime import setup

setup()  # XLA:CPU flags (bfloat16 matmuls need them to run on AMX) before JAX starts

import jax  # noqa: E402

from gptjax.config import get_config  # noqa: E402
from gptjax.data import create_dataloaders, load_corpus  # noqa: E402
from gptjax.tokenizer import get_gpt2_tokenizer  # noqa: E402
from gptjax.optim import OptimConfig  # noqa: E402
from gptjax.tasks.pretrain import PretrainConfig as TrainConfig, pretrain as train  # noqa: E402
from gptjax.options import Options  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="default", help="text file or URL (default: the book's the-verdict, shipped with gptjax)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--out", default="checkpoints/ch05_verdict", help="run directory (weights are not committed)")
    ap.add_argument("--matmul-precision", default="float32", choices=["float32", "bfloat16"],
                    help="Options.matmul_precision (bfloat16: operands rounded, float32 accumulation)")
    args = ap.parse_args()
    name = "ch05_pretrain_verdict" + ("_matmul_bf16" if args.matmul_precision == "bfloat16" else "")

    text = load_corpus(args.corpus)
    tok = get_gpt2_tokenizer()
    cfg = get_config("gpt2-small", context_length=256, drop_rate=0.1, qkv_bias=False, init="book")
    opts = Options.for_backend(matmul_precision=args.matmul_precision)
    tcfg = TrainConfig(epochs=args.epochs, batch_size=2, eval_freq=5, eval_iter=5, seed=args.seed,
                       optim=OptimConfig(lr=4e-4, weight_decay=0.1))
    train_b, val_b = create_dataloaders(text, tok, context_length=256, batch_size=2, train_ratio=0.9, seed=args.seed)
    t0 = time.time()
    res = train(cfg, tcfg, train_b, val_b, tok, args.out, overwrite=True, opts=opts)
    wall = time.time() - t0
    h = res["history"]

    RESULTS.mkdir(exist_ok=True)
    shutil.copy(Path(args.out) / "loss.png", RESULTS / f"{name}.png")
    env = f"jax {jax.__version__}, {jax.devices()[0].device_kind}, {platform.processor() or platform.machine()}"
    rows = ["| step | epoch | tokens seen | train loss | val loss |", "|---:|---:|---:|---:|---:|"]
    rows += [f"| {s} | {e} | {t:,} | {tr:.3f} | {va:.3f} |" for s, e, t, tr, va in
             zip(h["step"], h["epoch"], h["tokens_seen"], h["train_loss"], h["val_loss"])]
    best = min(h["val_loss"])
    md = "\n".join([
        f"# ch05: GPT-2 124M pretrained on the-verdict ({args.epochs} epochs, {args.matmul_precision} matmuls)", "",
        f"wall time {wall:.0f} s ({env}); best validation loss {best:.3f}", "",
        *rows, "", "Samples (\"Every effort moves you\", greedy, 50 tokens):", "",
        *[f"- epoch {s['epoch']}: {s['text']!r}" for s in res["samples"]], ""])
    (RESULTS / f"{name}.md").write_text(md)
    (RESULTS / f"{name}.json").write_text(json.dumps(
        {"history": h, "samples": res["samples"], "wall_s": wall, "env": env}, indent=1))
    print(md)


if __name__ == "__main__":
    main()
