"""Fine-tuning steps on CPU with the kernels stored (out, in) or (in, out): what `--linear-layout auto`
gives `gptjax finetune-instruct`, `dpo` and `finetune-classifier`.

The chapter-7 instruction fine-tuning step (`tasks.instruct.make_sft_steps`: every weight trains,
AdamW, the loss over non-ignored targets) on a GPT-2 shape with random weights, batch 8 of padded
length --length (the book pads each batch to its longest example), no dropout as the book, timed
for both layouts alternated round after round in one process. Medians.

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python experiments/cpu_finetune_layout.py [--preset gpt2-small] [--length 256]
"""
import argparse
import statistics

from gptjax.runtime import setup

setup(compilation_cache=False)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gptjax.measure import alternate  # noqa: E402
from gptjax.config import get_config  # noqa: E402
from gptjax.engine import IGNORE_INDEX  # noqa: E402
from gptjax.optim import OptimConfig  # noqa: E402
from gptjax.model import init_params  # noqa: E402
from gptjax.layout import to_layout  # noqa: E402
from gptjax.options import Options  # noqa: E402
from gptjax.tasks.finetune import split_trainable  # noqa: E402
from gptjax.tasks.instruct import make_sft_steps  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2-small")
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    base = get_config(args.preset, drop_rate=0.0, qkv_bias=True, tie_embeddings=True)
    params = init_params(base, jax.random.key(0))
    rng = np.random.default_rng(0)
    x = rng.integers(0, base.vocab_size, (args.batch_size, args.length), dtype=np.int32)
    y = np.roll(x, -1, axis=1)
    y[:, -args.length // 4:] = IGNORE_INDEX  # padding past each example's end, as collate masks it
    batch = (jnp.asarray(x), jnp.asarray(y))
    runs, states = {}, {}
    for layout in ("out_in", "in_out"):
        opts = Options.for_backend(linear_layout=layout)
        p = to_layout(params, base, opts)
        trainable, frozen = split_trainable(p, None, jax.random.key(1))
        steps = make_sft_steps(base, OptimConfig(lr=5e-5, weight_decay=0.1), trainable, frozen, opts=opts)
        states[layout] = steps.init_state(trainable, jax.random.PRNGKey(2))

        def run(layout=layout, steps=steps):
            states[layout], m = steps.train_step(states[layout], batch)
            m["loss"].block_until_ready()
        runs[layout] = run
    times = alternate(runs, rounds=args.rounds, warmup=1)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; {args.preset}, batch {args.batch_size} x "
          f"{args.length} tokens, full fine-tuning (AdamW), {args.rounds} rounds alternated, medians")
    print("| kernels | step | tokens/s | (in, out) step / this |")
    print("|---|---:|---:|---:|")
    for k, s in med.items():
        print(f"| ({k.replace('_', ', ')}) | {s * 1e3:,.0f} ms | {args.batch_size * args.length / s:,.0f} "
              f"| {med['in_out'] / s:.2f} |")


if __name__ == "__main__":
    main()
