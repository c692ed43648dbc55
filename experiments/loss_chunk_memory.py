"""What the chunked LM head + cross-entropy (Options.loss_chunk) saves: the compiled train step's memory
(XLA's memory analysis: arguments + outputs + temporaries) with the full (B, T, V) float32 logits and with
the head and loss run chunk by chunk, and the step time on this machine.

    python experiments/loss_chunk_memory.py                       # gpt2-small, context 1024, batch 16, compile only
    python experiments/loss_chunk_memory.py --n-layers 2 --context-length 256 --batch-size 4 --time

Writes experiments/results/loss_chunk_memory_<platform>.md (or --out).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from gptjax.runtime import setup

setup()

import jax.numpy as jnp  # noqa: E402

from gptjax.config import get_config  # noqa: E402
from gptjax.measure import device_info, xla_memory_bytes  # noqa: E402
from gptjax.optim import OptimConfig  # noqa: E402
from gptjax.options import Options  # noqa: E402
from gptjax.tasks.pretrain import init_state, make_steps  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt2-small")
    ap.add_argument("--n-layers", type=int, default=None)
    ap.add_argument("--context-length", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--chunks", type=int, nargs="+", default=[0, 256, 128])
    ap.add_argument("--time", action="store_true", help="also run and time 3 steps each")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = get_config(args.preset, context_length=args.context_length, drop_rate=0.0, tie_embeddings=True,
                     **({"n_layers": args.n_layers} if args.n_layers else {}))
    x = jnp.zeros((args.batch_size, args.context_length), jnp.int32)
    rows = []
    for chunk in args.chunks:
        opts = Options.for_backend(dtype=args.dtype, vocab_multiple=64, loss_chunk=chunk)
        steps = make_steps(cfg, OptimConfig(), opts=opts, share=False)
        state = init_state(steps, cfg, 0, opts=opts)
        compiled = steps.lower(state, (x, x)).compile()
        row = {"loss_chunk": chunk, "xla_memory_MB": xla_memory_bytes(compiled) / 2**20}
        if args.time:
            times = []
            for _ in range(4):
                t0 = time.perf_counter()
                state, m = compiled(state, None, (x, x))
                m["loss"].block_until_ready()
                times.append(time.perf_counter() - t0)
            row["step_ms"] = statistics.median(times[1:]) * 1e3
        rows.append(row)
        print(row)
    info = device_info()
    logits_MB = args.batch_size * args.context_length * cfg.vocab_size * 4 / 2**20
    lines = [f"device: {info['platform']} {info['device_kind']}; {args.preset}"
             f"{f' ({args.n_layers} layers)' if args.n_layers else ''}, context {args.context_length}, batch "
             f"{args.batch_size}, {args.dtype} compute, vocab padded to 50,304, tied head; one (B, T, V) float32 "
             f"logits tensor is {logits_MB:,.0f} MB", "",
             "| loss_chunk | train step memory (XLA) MB | vs full logits |" + (" step ms |" if args.time else ""),
             "|---:|---:|---:|" + ("---:|" if args.time else "")]
    for r in rows:
        lines.append(f"| {r['loss_chunk'] or 'off'} | {r['xla_memory_MB']:,.0f} | "
                     f"{r['xla_memory_MB'] / rows[0]['xla_memory_MB']:.2f} |"
                     + (f" {r['step_ms']:.0f} |" if args.time else ""))
    print("\n".join(lines))
    out = Path(args.out or RESULTS / f"loss_chunk_memory_{info['platform']}")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
