"""Book chapter 5, "Loading pretrained weights from OpenAI": OpenAI's GPT-2 generates the book's sample,
and its loss and perplexity on the-verdict, next to the chapter-5 model trained from scratch.

    python experiments/ch05_load_gpt2.py [--model gpt2-small|PATH] [--trained checkpoints/pretrain]

The book loads gpt2-small (124M) and, with seed 123, top-k 50 and temperature 1.5, continues "Every effort
moves you" with 25 tokens. Weights come from the Hugging Face hub (or a local directory: --model PATH).
Writes experiments/results/ch05_load_gpt2.{md,json}.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from gptjax.runtime import setup

setup()

from gptjax.checkpoint import load_model  # noqa: E402
from gptjax.generate import generate_text  # noqa: E402
from gptjax.tasks.pretrain import evaluate_corpus  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2-small", help="a GPT-2 size, hub id or local directory")
    ap.add_argument("--trained", default=None, help="also evaluate this run (e.g. the chapter-5 run)")
    ap.add_argument("--data", default=None, help="corpus to evaluate on (default: the-verdict)")
    ap.add_argument("--out", default=str(RESULTS / "ch05_load_gpt2"), help="writes OUT.md and OUT.json")
    args = ap.parse_args()

    model = load_model(args.model)
    text = generate_text(model, "Every effort moves you", 25, temperature=1.5, top_k=50, seed=123)
    rows = [{"model": args.model, **evaluate_corpus(model, args.data)}]
    if args.trained:
        rows.append({"model": args.trained, **evaluate_corpus(args.trained, args.data)})
    lines = [f"GPT-2 from {args.model}, seed 123, top-k 50, temperature 1.5:", "", f"> {text}", "",
             "| model | loss | perplexity | tokens | window |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['loss']:.3f} | {r['perplexity']:.1f} | {r['tokens']:,} | {r['context_length']} |"
              for r in rows]
    print("\n".join(lines))
    out = Path(args.out)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"sample": text, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
