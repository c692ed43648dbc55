"""Is the chapter-5 loss spike gptjax's doing? The first 30 steps of the ch05 run (GPT-2 124M, context 256,
batch 2, AdamW lr 4e-4 and weight decay 0.1, no warmup or clipping, the-verdict) for several seeds. Each seed
starts every variant from the same init and batch order:
- gptjax: gptjax's dropout (unsafe_rbg keys, XLA's ThreeFry RngBitGenerator masks);
- stock: Flax's stock path (threefry keys, jax.random.bernoulli masks);
- torch: the book's PyTorch GPTModel and torch.optim.AdamW, with torch's own dropout (torch.manual_seed(seed)),
  from gptjax's init written out by gptjax.gpt2_export.export_book;
- none / torch-none: gptjax and the book's PyTorch code without dropout (the same computation up to rounding);
- clip: gptjax with global-norm gradient clipping at 1.0 (`gptjax pretrain --clip-norm 1.0`);
- warmup: gptjax with appendix D's linear warmup over the first 20 % of the 10-epoch run (18 steps) from 1e-5
  (`gptjax pretrain --warmup-steps 18 --initial-lr 1e-5`), then lr 4e-4;
- b2: gptjax with AdamW's beta2 at 0.95 (nanoGPT's) instead of 0.999;
- lr1e-4: gptjax with a quarter of the book's learning rate.

    python experiments/ch05_loss_spike.py --corpus path/to/the-verdict.txt [--seeds 120 121 ...]

Needs torch for the torch variants. For each run it reports the biggest rise of the batch training loss above its lowest value so far, and the
step of that rise. Writes experiments/results/ch05_loss_spike.{md,json}; runs add to the variants already
in the JSON file (same number of steps), so variants can be run one invocation at a time.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

from gptjax.runtime import setup

setup(compilation_cache=False)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import gptjax.attention as attention  # noqa: E402
import gptjax.model as model  # noqa: E402
import gptjax.tasks.pretrain as train  # noqa: E402
from gptjax import engine  # noqa: E402
from gptjax.config import get_config  # noqa: E402
from gptjax.data import create_dataloaders, load_corpus  # noqa: E402
from gptjax.tokenizer import get_gpt2_tokenizer  # noqa: E402

RESULTS = Path(__file__).parent / "results"
GPTJAX = (model.dropout_rngs, attention.dropout)
VARIANTS = {"gptjax": "gptjax dropout (unsafe_rbg keys)", "stock": "Flax stock dropout (threefry bernoulli)",
            "torch": "book's PyTorch code", "none": "gptjax, no dropout", "torch-none": "PyTorch, no dropout",
            "clip": "gptjax, clip-norm 1.0", "warmup": "gptjax, 18 warmup steps",
            "b2": "gptjax, AdamW beta2 0.95", "lr1e-4": "gptjax, lr 1e-4"}


def stock_dropout(x, rate, rng):
    """Flax nn.Dropout's mask: jax.random.bernoulli on a threefry key."""
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def use_dropout(kind: str) -> None:
    if kind == "gptjax":
        rngs, drop = GPTJAX
    else:  # threefry keys straight from the train state, no re-seeding
        rngs = lambda key: None if key is None else {"dropout": key}  # noqa: E731
        drop = stock_dropout
    train.dropout_rngs = rngs
    model.dropout = attention.dropout = drop


BOOK_OPTIM = dict(lr=4e-4, weight_decay=0.1)  # the book's chapter-5 AdamW


def first_batches(batches, steps: int):
    """The first `steps` batches of the run, epoch after epoch (the train loop's order)."""
    for s in range(steps):
        yield batches.batch_at(s // len(batches), s % len(batches))


def run(cfg, seed: int, steps: int, batches, **optim) -> list[float]:
    tx = engine.make_optimizer(engine.OptimConfig(**{**BOOK_OPTIM, **optim}))
    train_step, _ = train.jitted_steps(cfg, tx)
    state = train.create_state(cfg, tx, seed)
    losses = []
    for x_BT, y_BT in first_batches(batches, steps):
        state, m = train_step(state, (jnp.asarray(x_BT), jnp.asarray(y_BT)))
        losses.append(m["loss"])
    return [float(v) for v in jax.device_get(losses)]


def run_torch(cfg, seed: int, steps: int, batches, tmp: Path) -> list[float]:
    """The book's train_model_simple on the same init and batches, in PyTorch."""
    import torch

    from gptjax.book_torch import book_from_params, calc_loss_batch

    tx = engine.make_optimizer(engine.OptimConfig(**BOOK_OPTIM))
    params = train.create_state(cfg, tx, seed).params  # gptjax's init for this seed
    torch.manual_seed(seed)
    book = book_from_params(params, cfg, tmp / f"init_{seed}.safetensors").train()
    opt = torch.optim.AdamW(book.parameters(), **BOOK_OPTIM)
    losses = []
    for x_BT, y_BT in first_batches(batches, steps):
        opt.zero_grad()
        loss = calc_loss_batch(x_BT, y_BT, book)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def rise(losses: list[float]) -> tuple[float, int]:
    low = np.minimum.accumulate(losses)
    i = int(np.argmax(np.asarray(losses) - low))
    return float(losses[i] - low[i]), i


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="default", help="text file or URL (default: the book's the-verdict, shipped with gptjax)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[120, 121, 122, 123, 124, 125])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()

    text = load_corpus(args.corpus)
    tok = get_gpt2_tokenizer()
    # the chapter-5 loaders; a seed's batch order is the same for every variant
    loaders = {seed: create_dataloaders(text, tok, context_length=256, batch_size=2, train_ratio=0.9, seed=seed)[0]
               for seed in args.seeds}
    store = RESULTS / "ch05_loss_spike.json"
    old = json.loads(store.read_text()) if store.exists() else {}
    out = old.get("losses", {}) if old.get("steps") == args.steps else {}
    t0 = time.time()
    tmp = Path(tempfile.mkdtemp())
    for kind in args.variants:
        use_dropout("stock" if kind == "stock" else "gptjax")
        cfg = get_config("gpt2-small", context_length=256, drop_rate=0.0 if kind.endswith("none") else 0.1,
                         qkv_bias=False, init="book")
        for seed in args.seeds:
            batches = loaders[seed]
            if kind.startswith("torch"):
                losses = run_torch(cfg, seed, args.steps, batches, tmp)
            else:
                optim = {"clip": dict(clip_norm=1.0), "warmup": dict(warmup_steps=18, initial_lr=1e-5),
                         "b2": dict(b2=0.95), "lr1e-4": dict(lr=1e-4)}.get(kind, {})
                losses = run(cfg, seed, args.steps, batches, **optim)
            out[f"{kind}/{seed}"] = losses
            r, i = rise(losses)
            print(f"{kind:7s} seed {seed}: biggest rise {r:5.2f} at step {i}, loss {losses[i]:.2f}", flush=True)
    use_dropout("gptjax")
    shutil.rmtree(tmp)

    kinds = [k for k in VARIANTS if any(name.startswith(k + "/") for name in out)]
    seeds = sorted({int(name.split("/")[1]) for name in out})
    rows = ["| seed | " + " | ".join(VARIANTS[k] for k in kinds) + " |", "|---:|" + "---:|" * len(kinds)]
    for seed in seeds:
        cells = []
        for kind in kinds:
            if f"{kind}/{seed}" in out:
                r, i = rise(out[f"{kind}/{seed}"])
                cells.append(f"{r:.2f} (step {i})")
            else:
                cells.append("")
        rows.append(f"| {seed} | " + " | ".join(cells) + " |")
    parity = []
    if {"none", "torch-none"} <= set(kinds):
        parity = ["Without dropout, gptjax and the book's PyTorch code from the same init and batches (batch loss, "
                  "largest |difference| over the first 5 / 10 / all steps):", ""]
        for seed in [s for s in seeds if f"none/{s}" in out and f"torch-none/{s}" in out]:
            d = np.abs(np.subtract(out[f"none/{seed}"], out[f"torch-none/{seed}"]))
            parity.append(f"- seed {seed}: {d[:5].max():.2g} / {d[:10].max():.2g} / {d.max():.2g}")
        parity.append("")
    env = f"jax {jax.__version__}, {jax.devices()[0].device_kind}, {platform.processor() or platform.machine()}"
    md = "\n".join([
        f"# ch05 loss spikes: biggest rise of the batch training loss above its running minimum, first {args.steps} "
        "steps", "", f"{env}; this invocation {time.time() - t0:.0f} s ({' '.join(args.variants)})", "", *rows, "",
        *parity])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ch05_loss_spike.md").write_text(md)
    store.write_text(json.dumps({"steps": args.steps, "losses": out, "env": env}, indent=1))
    print(md)


if __name__ == "__main__":
    main()
