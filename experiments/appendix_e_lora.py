"""Book appendix E: the chapter 6 spam classifier trained with LoRA (rank 16, alpha 16) instead.

    python experiments/appendix_e_lora.py                 # the book's run: OpenAI GPT-2 124M (downloaded)
    python experiments/appendix_e_lora.py --cpu-demo --data /path/to/SMSSpamCollection

The book's setup: every base weight frozen (the new, randomly initialised head too), LoRA adapters on
every Linear layer (q, k, v, out-proj, both MLP layers, the head): 2,666,528 trainable parameters;
AdamW lr 8e-4, weight decay 0.1, batch 8, 5 epochs. The book reports train / val / test accuracy
99.81 / 97.99 / 96.67 %.

--cpu-demo runs the same on the small GPTs of `ch06_spam_classifier.py --cpu-demo` (random init, and
the model pretrained here on SMS text, reused from that run's directory or pretrained again).
It also checks that the saved adapters alone, applied to the base model, give the saved merged model.
Writes experiments/results/appendix_e_lora*.{md,json} and the plots.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from ch06_spam_classifier import RESULTS, SMALL, env_line, pretrain_on_sms, run, table  # noqa: E402

from gptjax.model_io import load_run  # noqa: E402
from gptjax.config import get_config  # noqa: E402
from gptjax.lora import LoRAConfig, lora_param_count  # noqa: E402
from gptjax.model import abstract_params, count_params  # noqa: E402
from gptjax.model_io import load_base_model  # noqa: E402
from gptjax.tasks.classify import Classifier, classifier_from_adapters  # noqa: E402
from gptjax.tasks.classify_data import book_split, load_labeled_texts  # noqa: E402
from gptjax.tokenizer import get_gpt2_tokenizer  # noqa: E402

BOOK = {"train": 99.81, "val": 97.99, "test": 96.67}


def check_adapters(run_dir: Path, base_params, base_cfg, texts: list[str], tok) -> dict:
    """Adapters + base == the saved merged classifier: largest weight difference, and predictions on `texts`."""
    merged, cfg = load_run(run_dir)
    rebuilt, _ = classifier_from_adapters(base_params, base_cfg, run_dir / "adapters.safetensors")
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(rebuilt)))
    max_length = json.loads((run_dir / "config.json").read_text())["classify"]["max_length"]
    p_merged = Classifier(merged, cfg, tok, ("ham", "spam"), max_length).predict_proba(texts)
    p_rebuilt = Classifier(rebuilt, cfg, tok, ("ham", "spam"), max_length).predict_proba(texts)
    size = (run_dir / "adapters.safetensors").stat().st_size
    params_size = sum(f.stat().st_size for f in (run_dir / "params").rglob("*") if f.is_file())
    return {"max_weight_diff": diff, "same_predictions": bool((p_merged.argmax(1) == p_rebuilt.argmax(1)).all()),
            "max_prob_diff": float(np.abs(p_merged - p_rebuilt).max()), "adapter_bytes": size,
            "params_bytes": params_size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="sms-spam", help="'sms-spam' (UCI zip, downloaded once) or a local copy")
    ap.add_argument("--model", default="gpt2-small", help="base model (the book: gpt2-small)")
    ap.add_argument("--cpu-demo", action="store_true", help="small models, random init and pretrained here")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--lr", type=float, default=8e-4)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--pretrain-epochs", type=int, default=2)
    ap.add_argument("--out", default="checkpoints/ch06", help="run directories (shared with the ch06 script)")
    args = ap.parse_args()

    # the book's count, from shapes only (no weights needed): 124M classifier with r=16 adapters everywhere
    shapes = abstract_params(get_config("gpt2-small", qkv_bias=True, tie_embeddings=True, n_classes=2))
    n_book = lora_param_count(shapes, LoRAConfig(16, 16))
    print(f"GPT-2 124M classifier: {count_params(shapes):,} parameters; LoRA r=16 on every Dense: {n_book:,} trainable")

    tok = get_gpt2_tokenizer()
    data = load_labeled_texts(args.data)
    splits = book_split(data)
    lcfg = LoRAConfig(args.rank, args.alpha)
    out = Path(args.out)
    t0 = time.time()
    rows, notes, checks = [], [], {}
    if not args.cpu_demo:
        params, cfg = load_base_model(args.model)
        bases = [(f"{args.model} (OpenAI weights)", "gpt2_lora", params, cfg)]
        name = "appendix_e_lora"
    else:
        pre_params, pre_cfg, meta = pretrain_on_sms(data, tok, out / "pretrain_sms", epochs=args.pretrain_epochs)
        rand_params, rand_cfg = load_base_model("random", random_cfg=SMALL, seed=123)
        bases = [("small GPT, random init", "random_lora", rand_params, rand_cfg),
                 ("small GPT, pretrained here on SMS text", "pretrained_lora", pre_params, pre_cfg)]
        notes.append("The small GPTs and the pretraining are those of `ch06_spam_classifier_cpu.md`.")
        name = "appendix_e_lora_cpu"
    for label, tag, params, cfg in bases:
        r = run(label, params, cfg, splits, tok, out / tag, train="none", lr=args.lr, epochs=args.epochs, lora=lcfg)
        r["train"] = f"LoRA r={args.rank}, alpha={args.alpha:g} (base and head frozen)"
        rows.append(r)
        checks[tag] = check_adapters(out / tag, params, cfg, splits["test"].texts, tok)
        print(f"adapters alone + base vs merged run: {checks[tag]}")
    wall = time.time() - t0

    RESULTS.mkdir(exist_ok=True)
    for r in rows:
        tag = Path(r["out"]).name
        for plot in ("loss", "accuracy"):
            shutil.copy(Path(r["out"]) / f"{plot}.png", RESULTS / f"{name}_{tag}_{plot}.png")
    check_lines = [f"- {tag}: adapters.safetensors {c['adapter_bytes'] / 1e6:.2f} MB vs merged params "
                   f"{c['params_bytes'] / 1e6:.1f} MB; base + adapters vs merged: max weight difference "
                   f"{c['max_weight_diff']:.1e}, max probability difference {c['max_prob_diff']:.1e} over the "
                   f"{len(splits['test'])} test messages, same predictions: {c['same_predictions']}"
                   for tag, c in checks.items()]
    md = [f"# appendix E: LoRA fine-tuning of the spam classifier{' (CPU demo, no pretrained GPT-2)' if args.cpu_demo else ''}", "",
          f"GPT-2 124M classifier shapes (no weights needed): {count_params(shapes):,} parameters; LoRA r=16 on every "
          f"Dense layer, c_attn as three q/k/v adapters, the head included: **{n_book:,} trainable** (the book: 2,666,528).", "",
          f"Settings: AdamW lr {args.lr:g}, weight decay 0.1, batch 8, {args.epochs} epochs; W' = W + (alpha/r) A B, "
          f"A ~ U(+-1/sqrt(r)), B = 0.", "", *notes, "",
          *table(rows, BOOK, "pretrained GPT-2 124M, LoRA r=16"), "",
          "Saving the adapters alone:", "", *check_lines, "",
          f"Total wall time {wall:.0f} s ({env_line()}). Plots: `{name}_<run>_loss.png`, `{name}_<run>_accuracy.png`.", ""]
    (RESULTS / f"{name}.md").write_text("\n".join(md))
    (RESULTS / f"{name}.json").write_text(json.dumps({"rows": rows, "checks": checks, "book_count": n_book,
                                                      "env": env_line(), "wall_s": wall}, indent=1))
    print("\n".join(md))


if __name__ == "__main__":
    main()
