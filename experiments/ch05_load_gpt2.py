"""Book chapter 5, "Loading pretrained weights from OpenAI": OpenAI's GPT-2 generates the book's sample, its
train/val losses on the-verdict next to the book's (3.7547 / 3.5596), and its loss and perplexity over the
whole story (`gptjax evaluate`), next to the chapter-5 model trained from scratch.

    python experiments/ch05_load_gpt2.py [--model gpt2-small|PATH] [--trained checkpoints/pretrain]

The book loads gpt2-small (124M) and, with seed 123, top-k 50 and temperature 1.5, continues "Every effort
moves you" with 25 tokens; its calc_loss_loader over the chapter's loaders (context 256, batch 2, 90/10
split) gives train 3.7547 and val 3.5596. Weights come from the Hugging Face hub (or a local directory:
--model PATH); where they cannot be had the script says so and exits 1.
Writes experiments/results/ch05_load_gpt2.{md,json}.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from gptjax.runtime import setup

setup()

import sys  # noqa: E402

from gptjax.model_io import load_model  # noqa: E402
from gptjax.data import create_dataloaders, load_corpus  # noqa: E402
from gptjax.engine import mean_metrics  # noqa: E402
from gptjax.generate import generate_text  # noqa: E402
from gptjax.optim import OptimConfig  # noqa: E402
from gptjax.options import Options  # noqa: E402
from gptjax.layout import to_layout  # noqa: E402
from gptjax.tasks.pretrain import evaluate_corpus, make_steps  # noqa: E402
from gptjax.tokenizer import get_gpt2_tokenizer  # noqa: E402

BOOK = {"train_loss": 3.7547, "val_loss": 3.5596}


def book_losses(model, data) -> dict:
    """The book's calc_loss_loader over all batches of chapter 5's loaders (context 256, batch 2, 90/10)."""
    params, cfg = model
    train_b, val_b = create_dataloaders(load_corpus(data), get_gpt2_tokenizer(), context_length=min(256, cfg.context_length), batch_size=2,
                                        seed=123)
    opts = Options.for_backend()
    steps = make_steps(cfg.replace(drop_rate=0.0), OptimConfig(), opts=opts)
    params = to_layout(params, cfg, opts)
    return {"train_loss": mean_metrics(steps, params, train_b.epoch(0))["loss"],
            "val_loss": mean_metrics(steps, params, val_b.epoch(0))["loss"]}

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2-small", help="a GPT-2 size, hub id or local directory")
    ap.add_argument("--trained", default=None, help="also evaluate this run (e.g. the chapter-5 run)")
    ap.add_argument("--data", default=None, help="corpus to evaluate on (default: the-verdict)")
    ap.add_argument("--out", default=str(RESULTS / "ch05_load_gpt2"), help="writes OUT.md and OUT.json")
    args = ap.parse_args()

    try:
        model = load_model(args.model)
    except (ConnectionError, OSError, ValueError) as e:
        print(f"ch05_load_gpt2: cannot load {args.model!r}: {e}", file=sys.stderr)
        sys.exit(1)
    text = generate_text(model, "Every effort moves you", 25, temperature=1.5, top_k=50, seed=123)
    book = book_losses(model, args.data)
    rows = [{"model": args.model, **evaluate_corpus(model, args.data)}]
    if args.trained:
        rows.append({"model": args.trained, **evaluate_corpus(args.trained, args.data)})
    lines = [f"GPT-2 from {args.model}, seed 123, top-k 50, temperature 1.5:", "", f"> {text}", "",
             "| chapter 5's loaders | gptjax | the book |", "|---|---:|---:|"]
    lines += [f"| {k.replace('_', ' ')} | {book[k]:.4f} | {BOOK[k]:.4f} |" for k in BOOK]
    lines += ["", "The whole story, windows of the model's context (`gptjax evaluate`):", "",
             "| model | loss | perplexity | tokens | window |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['loss']:.3f} | {r['perplexity']:.1f} | {r['tokens']:,} | {r['context_length']} |"
              for r in rows]
    print("\n".join(lines))
    out = Path(args.out)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"sample": text, "book_losses": book, "book": BOOK, "rows": rows},
                                                   indent=1))


if __name__ == "__main__":
    main()
