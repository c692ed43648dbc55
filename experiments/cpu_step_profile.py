"""Where a gptjax train step spends its time on this machine: a jax.profiler trace of one step, by op.

The book's chapter-5 setting (gpt2-small, context 256, batch 2, float32, AdamW, dropout 0.1). Prints
the median of 3 timed steps, then the traced step's time per XLA op category (fusion kinds, dots,
calls) and the slowest single ops. XLA:CPU reports per-op events with --xla_cpu_enable_xprof_traceme.

    python experiments/cpu_step_profile.py [--dtype bfloat16] [--linear-layout in_out] [--matmul-precision bfloat16]
"""
import argparse
import os
import time

from gptjax.measure import XPROF_OPS_FLAG, by_op_kind, trace_xla_ops  # noqa: E402  (imports jax, starts no backend)

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + XPROF_OPS_FLAG).strip()

from gptjax.runtime import setup  # noqa: E402

setup(compilation_cache=False)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gptjax.config import get_config  # noqa: E402
from gptjax.optim import OptimConfig, make_optimizer  # noqa: E402
from gptjax.tasks.pretrain import create_state, jitted_steps as make_steps  # noqa: E402
from gptjax.options import Options  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    ap.add_argument("--linear-layout", default="out_in", choices=["in_out", "out_in"],
                    help="kernels' storage (out_in: what `gptjax pretrain` uses on CPU)")
    ap.add_argument("--matmul-precision", default="float32", choices=["float32", "bfloat16"],
                    help="Options.matmul_precision")
    args = ap.parse_args()
    cfg = get_config("gpt2-small").replace(context_length=256, drop_rate=0.1)
    opts = Options.for_backend(dtype=args.dtype, linear_layout=args.linear_layout,
                               matmul_precision=args.matmul_precision)
    tx = make_optimizer(OptimConfig(lr=4e-4, weight_decay=0.1))
    state = create_state(cfg, tx, 0, opts=opts)
    step, _ = make_steps(cfg, tx, opts=opts)
    x = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, cfg.context_length + 1), dtype=np.int32)
    batch = (jnp.asarray(x[:, :-1]), jnp.asarray(x[:, 1:]))
    times = []
    for i in range(5):
        t0 = time.perf_counter()
        state, m = step(state, batch)
        float(m["loss"])
        if i >= 2:
            times.append(time.perf_counter() - t0)
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}: {args.dtype}, {args.linear_layout}: median step {np.median(times):.2f} s")
    def traced_step():
        nonlocal state
        state, m = step(state, batch)
        float(m["loss"])

    ops, _ = trace_xla_ops(traced_step)
    by_kind = by_op_kind(ops)
    print(f"traced step: {sum(ops.values()):,.0f} ms in XLA ops")
    print("by op kind:")
    for kind, ms in by_kind.most_common(12):
        print(f"  {ms:8.1f} ms  {kind}")
    print("slowest ops:")
    for name, ms in ops.most_common(8):
        print(f"  {ms:8.1f} ms  {name}")


if __name__ == "__main__":
    main()
