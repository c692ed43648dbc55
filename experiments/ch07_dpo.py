"""Book chapter 7 bonus: preference tuning with DPO, from the chapter-7 instruction-tuned model.

    python experiments/ch07_dpo.py --sft checkpoints/ch07_instruct            # the book's run (GPT-2 355M SFT)
    python experiments/ch07_dpo.py --cpu-demo --sft checkpoints/ch07_instruct_cpu --data PATH

The book (dpo-from-scratch): instruction-data-with-preference.json (1,100 records with a polite
`chosen` and an impolite `rejected` answer) split as chapter 7; the policy and a frozen reference
both start as the SFT model; beta 0.1, AdamW lr 5e-6, weight decay 0.01, batch 8, 1 epoch, evaluation
every 5 steps on 5 batches. The loss starts at log 2 = 0.693 (policy = reference) and the reward margin
(chosen minus rejected reward) grows.

--cpu-demo starts from the small randomly initialised model that ch07_instruction_finetune.py --cpu-demo
fine-tuned here, evaluates every 20 steps and skips the test-set responses (decoding without a KV cache
on a shared CPU costs more than the training); with --lr it adds a second run at that learning rate.
Writes experiments/results/ch07_dpo*.{md,json,png}.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import time
from pathlib import Path

import jax

from gptjax.model_io import load_run
from gptjax.tasks.dpo import DPOTrainConfig, finetune_dpo, load_preference_data
from gptjax.tasks.instruct import format_table, run_style
from gptjax.tasks.instruct_data import split_data
from gptjax.tokenizer import get_gpt2_tokenizer
from gptjax.optim import OptimConfig

RESULTS = Path(__file__).parent / "results"


def env_line() -> str:
    return f"jax {jax.__version__}, {jax.devices()[0].device_kind}, {platform.processor() or platform.machine()}"


def history_table(h: dict, rows: int = 12) -> list[str]:
    lines = ["| step | train loss | val loss | train chosen / rejected reward | train margin | val margin |",
             "|---:|---:|---:|---:|---:|---:|"]
    every = max(1, len(h["step"]) // rows)
    for i in sorted(set(range(0, len(h["step"]), every)) | {len(h["step"]) - 1}):
        lines.append(f"| {h['step'][i]} | {h['train_loss'][i]:.4f} | {h['val_loss'][i]:.4f} | "
                     f"{h['train_chosen_reward'][i]:+.4f} / {h['train_rejected_reward'][i]:+.4f} | "
                     f"{h['train_reward_margin'][i]:+.4f} | {h['val_reward_margin'][i]:+.4f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft", default="checkpoints/ch07_instruct", help="the instruction-tuned run to start from")
    ap.add_argument("--data", default="default", help="instruction-data-with-preference.json (default: downloaded)")
    ap.add_argument("--cpu-demo", action="store_true", help="small model; evaluation every 20 steps")
    ap.add_argument("--lr", type=float, default=None, help="also run at this learning rate (beside the book's 5e-6)")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N training records for the --lr run")
    ap.add_argument("--respond", action=argparse.BooleanOptionalAction, default=None,
                    help="answer and score the test set after DPO (default: yes, no with --cpu-demo)")
    ap.add_argument("--out", default=None, help="run directory prefix (weights are not committed)")
    args = ap.parse_args()

    tok = get_gpt2_tokenizer()
    data = load_preference_data(args.data)
    splits = split_data(data)
    sizes = {k: len(v) for k, v in splits.items()}
    params, cfg = load_run(args.sft)
    style = run_style(args.sft)
    demo = args.cpu_demo
    respond = (not demo) if args.respond is None else args.respond
    eval_freq = 20 if demo else 5
    out = Path(args.out or ("checkpoints/ch07_dpo_cpu" if demo else "checkpoints/ch07_dpo"))
    runs = [(5e-6, splits, out)]
    if args.lr:
        lim = {**splits, "train": splits["train"][:args.limit]} if args.limit else splits
        runs.append((args.lr, lim, out.with_name(out.name + f"_lr{args.lr:g}")))
    name = "ch07_dpo" + ("_cpu" if demo else "")
    RESULTS.mkdir(exist_ok=True)
    t0 = time.time()
    results, md_runs = [], []
    for lr, sp, run_dir in runs:
        tcfg = DPOTrainConfig(eval_freq=eval_freq, optim=OptimConfig(lr=lr, weight_decay=0.01))
        print(f"\n=== DPO, lr {lr:g}, {len(sp['train'])} training records ===")
        r = finetune_dpo(params, cfg, sp, tok, run_dir, style=style, tcfg=tcfg, base_model=str(args.sft),
                         data_source=str(args.data), respond=respond)
        tag = f"lr{lr:g}"
        shutil.copy(run_dir / "dpo.png", RESULTS / f"{name}_{tag}_margin.png")
        shutil.copy(run_dir / "loss.png", RESULTS / f"{name}_{tag}_loss.png")
        h = r["history"]
        steps = [json.loads(ln) for ln in (run_dir / "steps.jsonl").read_text().splitlines()]
        last, q = steps[-1], max(1, len(steps) // 4)
        quarters = {k: (sum(x[k] for x in steps[:q]) / q, sum(x[k] for x in steps[-q:]) / q)
                    for k in ("loss", "reward_margin")}
        sft_row = {**json.loads((Path(args.sft) / "eval.json").read_text()), "model": "SFT start (vs `output`)"} \
            if (Path(args.sft) / "eval.json").is_file() else None
        dpo_row = {**r["eval"], "model": f"after DPO lr {lr:g} (vs `chosen`)"} if "eval" in r else None
        results.append({"lr": lr, "train_records": len(sp["train"]), "steps": r["steps"], "initial": r["initial"],
                        "final": r["final"], "history": h, "last_step": last, "quarters": quarters, "eval": r.get("eval"),
                        "wall_s": r["wall_s"]})
        md_runs += [f"## lr {lr:g} ({len(sp['train'])} training records, {r['steps']} steps, {r['wall_s']:.0f} s)", "",
                    f"Before training: loss train {r['initial']['train_loss']:.4f} / "
                    f"val {r['initial']['val_loss']:.4f} "
                    f"(log 2 = {math.log(2):.4f}), reward margins {r['initial']['train_reward_margin']:+.4f} / "
                    f"{r['initial']['val_reward_margin']:+.4f}.", "", *history_table(h), "",
                    f"Last step ({last['step']}), on its own batch: loss {last['loss']:.4f}, chosen / rejected reward "
                    f"{last['chosen_reward']:+.4f} / {last['rejected_reward']:+.4f}, margin "
                    f"{last['reward_margin']:+.4f} (every step: {run_dir}/steps.jsonl). Mean over the first / last quarter "
                    f"of the steps' own batches: loss {quarters['loss'][0]:.4f} / {quarters['loss'][1]:.4f}, margin "
                    f"{quarters['reward_margin'][0]:+.4f} / {quarters['reward_margin'][1]:+.4f}.", "",
                    *(["Test-set responses after DPO, scored against the preferred (`chosen`) answers:", "",
                       format_table([x for x in (sft_row, dpo_row) if x]), ""] if dpo_row else
                      ["Test-set responses: not generated in this run.", ""]),
                    f"Plots: `{name}_{tag}_margin.png`, `{name}_{tag}_loss.png`.", ""]
    wall = time.time() - t0
    md = [f"# ch07 bonus: DPO preference tuning{' (CPU demo, no pretrained GPT-2)' if demo else ''}", "",
          f"Data: {len(data):,} preference records split {sizes['train']} / {sizes['val']} / {sizes['test']} (train / "
          f"val / test). Start and frozen reference: {args.sft} ({cfg.n_layers} blocks x {cfg.emb_dim} dims). "
          f"beta 0.1, AdamW weight decay 0.01, batch 8, 1 epoch, evaluation every {eval_freq} steps on 5 batches. "
          "Rewards are the book's: policy minus reference mean log-probability of the answer tokens (not scaled by "
          "beta); margin = chosen - rejected.",
          *(["The start model is the small GPT trained from random init here, not GPT-2 355M: the numbers show the "
             "DPO mechanics (log 2 at the start, the margin opening), not the book's politeness effect."]
            if demo else []),
          "", *md_runs, f"Total wall time {wall:.0f} s ({env_line()}).", ""]
    (RESULTS / f"{name}.md").write_text("\n".join(md))
    (RESULTS / f"{name}.json").write_text(json.dumps({"runs": results, "sizes": sizes, "sft": str(args.sft),
                                                      "wall_s": wall, "env": env_line()}, indent=1))
    print("\n".join(md))


if __name__ == "__main__":
    main()
