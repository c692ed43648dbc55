"""The first losses of every training task, through the CLI: a refactor must leave them bitwise equal.

Runs in one process, with the CLI's own settings:
- pretrain: the chapter-5 setting (`gptjax pretrain` on the-verdict, seed 123), the first 10 steps;
- finetune-classifier, finetune-instruct, dpo: tiny random models, the first 5 steps;
- and each task's first evaluations (train and validation loss).

    python experiments/loss_fingerprint.py --verdict PATH/the-verdict.txt --instructions PATH/instruction-data-with-preference.json --out F.json
    python experiments/loss_fingerprint.py ... --compare experiments/results/loss_fingerprint.json

With --compare it prints, per task, whether every loss is bitwise equal to the stored ones and the
largest absolute difference, and exits 1 when any differs.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from gptjax.cli import main

TINY = ["--emb-dim", "16", "--n-layers", "1", "--n-heads", "2", "--context-length", "128", "--tie-embeddings"]


def _column(path: Path, key: str, n: int) -> list[float]:
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if key in r and "step" in r]
    values = [r[key] for r in sorted(rows, key=lambda r: r["step"])][:n]
    if len(values) < n:
        raise SystemExit(f"{path} holds {len(values)} values of {key!r}, expected {n}")
    return values


def _tiny_tsv(path: Path) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(30):
        rows.append(f"spam\tWIN a FREE prize now!! call {rng.integers(100, 999)} to CLAIM\n")
        rows.append(f"ham\tsee you at lunch {['today', 'tomorrow', 'later'][i % 3]}, ok?\n")
    path.write_text("".join(rows))
    return path


def fingerprint(verdict: str, instructions: str, work: Path) -> dict[str, list[float]]:
    def run(argv: list[str]) -> None:
        if (rc := main(argv)) != 0:
            raise SystemExit(f"gptjax {' '.join(argv)} exited {rc}")

    out: dict[str, list[float]] = {}
    run(["pretrain", "--corpus", verdict, "--epochs", "2", "--eval-freq", "1", "--eval-iter", "1", "--quiet",
         "--out", str(work / "ch05")])
    out["pretrain"] = _column(work / "ch05" / "metrics.jsonl", "batch_loss", 10)
    out["pretrain_eval"] = [v for k in ("train_loss", "val_loss") for v in _column(work / "ch05" / "metrics.jsonl", k, 10)]
    run(["finetune-classifier", "--data", str(_tiny_tsv(work / "tiny.tsv")), "--model", "random",
         "--emb-dim", "16", "--n-layers", "1", "--n-heads", "2", "--context-length", "32",
         "--batch-size", "4", "--epochs", "1", "--eval-freq", "1", "--eval-iter", "1", "--lr", "1e-3", "--quiet",
         "--out", str(work / "cls")])
    out["classify"] = _column(work / "cls" / "metrics.jsonl", "batch_loss", 5)
    out["classify_eval"] = [v for k in ("train_loss", "val_loss") for v in _column(work / "cls" / "metrics.jsonl", k, 5)]
    common = ["--data", instructions, "--limit", "40", "--batch-size", "4", "--eval-freq", "1", "--eval-iter", "1",
              "--quiet", "--no-respond", "--epochs", "1"]
    run(["finetune-instruct", "--model", "random", *TINY, *common, "--lr", "1e-3", "--out", str(work / "sft")])
    out["sft"] = _column(work / "sft" / "steps.jsonl", "loss", 5)
    out["sft_eval"] = [v for k in ("train_loss", "val_loss") for v in _column(work / "sft" / "metrics.jsonl", k, 5)]
    run(["dpo", "--model", str(work / "sft"), *common, "--out", str(work / "dpo")])
    out["dpo"] = _column(work / "dpo" / "steps.jsonl", "loss", 5)
    out["dpo_eval"] = [v for k in ("train_loss", "val_loss") for v in _column(work / "dpo" / "metrics.jsonl", k, 5)]
    return out


def compare(new: dict, old: dict) -> bool:
    same = True
    for task, ref in old.items():
        got = new.get(task, [])
        equal = got == ref
        diff = max((abs(a - b) for a, b in zip(got, ref)), default=float("nan"))
        print(f"{task:10s} {'bitwise equal' if equal else 'DIFFERENT'}  max |diff| {diff:.3g}  ({len(got)} losses)")
        same &= equal
    return same


def cli() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--verdict", required=True, help="the-verdict.txt")
    ap.add_argument("--instructions", required=True, help="instruction-data-with-preference.json (the book's)")
    ap.add_argument("--out", default=None, help="write the losses to this JSON file")
    ap.add_argument("--compare", default=None, help="a JSON file written by --out to compare against")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = fingerprint(args.verdict, args.instructions, Path(tmp))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if args.compare:
        return 0 if compare(result, json.loads(Path(args.compare).read_text())) else 1
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
