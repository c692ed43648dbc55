"""Where a training step's time goes: one `jax.profiler` trace of a few gptjax train steps, the time per op
summed by op class (matmuls, attention, fused elementwise, reductions, copies and layout, collectives, ...),
the step time and MFU, and whether the compiled step calls cuDNN's fused attention.

    python experiments/profile_step.py                                          # a small CPU run
    JAX_PLATFORMS=cuda python experiments/profile_step.py --preset gpt2-small --context-length 1024 \\
        --batch-size 16 --dtype bfloat16 --vocab-multiple 64 --drop-rate 0 --out $OUT/profile_gpt2_small

Writes OUT.md and OUT.json (default experiments/results/profile_step_<platform>). The classes come from the
op and kernel names (XLA:CPU: dot, fusion, ...; XLA:GPU: cuBLAS/cutlass gemm kernels, cuDNN attention,
loop/input fusions, NCCL), so read the top ops too: the table lists the 15 slowest by name.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time
from pathlib import Path

from gptjax.measure import XPROF_OPS_FLAG

if "--xla_cpu_enable_xprof_traceme" not in os.environ.get("XLA_FLAGS", ""):  # per-op events on CPU
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + XPROF_OPS_FLAG).strip()

from gptjax.runtime import setup  # noqa: E402

setup()

import jax  # noqa: E402

from gptjax.bench import BenchConfig, JaxTrain  # noqa: E402
from gptjax.measure import device_info, flops_per_token, peak_flops, trace_xla_ops  # noqa: E402

RESULTS = Path(__file__).parent / "results"
# op class by name, first match wins (XLA:CPU op names and XLA:GPU kernel names)
CLASSES = [
    ("attention (cuDNN / flash)", r"cudnn|fmha|flash|sdpa"),
    ("collectives", r"all-reduce|all-gather|reduce-scatter|nccl|collective"),
    ("matmul", r"gemm|dot|cublas|cutlass|nvjet|xmma|matmul|convolution|wgmma|ynn"),  # ynn: XLA:CPU's YNNPACK
    ("reduction (softmax, norms, loss)", r"reduce|softmax|argmax|cross_entropy"),
    ("copy / transpose / layout", r"copy|transpose|bitcast|concatenate|slice|pad|broadcast|memcpy|memset"),
    ("fused elementwise", r"fusion|loop_|input_|elementwise|add|multiply|select|convert|exp|tanh"),
    ("scatter / gather", r"scatter|gather|dynamic"),
]


def op_class(name: str) -> str:
    low = name.lower()
    return next((c for c, pattern in CLASSES if re.search(pattern, low)), "other")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt2-small")
    ap.add_argument("--n-layers", type=int, default=None, help="override the preset (a quick CPU run: 2)")
    ap.add_argument("--context-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--vocab-multiple", type=int, default=1)
    ap.add_argument("--attn-impl", default="auto", choices=["auto", "xla", "cudnn", "einsum"])
    ap.add_argument("--remat", default="none", choices=["none", "full", "dots", "dots_no_batch"])
    ap.add_argument("--drop-rate", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=5, help="traced steps (after 3 untimed ones)")
    ap.add_argument("--out", default=None, help="writes OUT.md and OUT.json")
    args = ap.parse_args()

    bc = BenchConfig(preset=args.preset, n_layers=args.n_layers, context_length=args.context_length,
                     batch_size=args.batch_size, dtype=args.dtype, vocab_multiple=args.vocab_multiple,
                     attn_impl=args.attn_impl, remat=args.remat, drop_rate=args.drop_rate, tie_embeddings=True,
                     linear_layout="out_in" if jax.default_backend() == "cpu" else "in_out")
    cfg, opts = bc.setup()
    runner = JaxTrain(cfg, opts, bc)
    hlo = runner.steps.lower(runner.state, runner.batch).as_text()
    for _ in range(3):
        runner()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        runner()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)

    def traced():
        for _ in range(args.steps):
            runner()

    ms, calls = trace_xla_ops(traced)
    total = sum(ms.values())
    by_class: dict[str, float] = {}
    for name, t in ms.items():
        by_class[op_class(name)] = by_class.get(op_class(name), 0.0) + t
    info = device_info()
    tokens = args.batch_size * args.context_length
    peak = peak_flops(info["device_kind"], args.dtype)
    mfu = flops_per_token(cfg, args.context_length) * tokens / step_s / peak if peak else None
    result = {"device": info, "config": vars(args), "step_ms": step_s * 1e3, "tokens_per_s": tokens / step_s,
              "mfu": mfu, "traced_steps": args.steps, "op_ms_per_step": {k: v / args.steps for k, v in ms.items()},
              "class_ms_per_step": {k: v / args.steps for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])},
              "cudnn_attention_in_hlo": "cudnn" in hlo.lower() and "fmha" in hlo.lower() or "__cudnn$fmha" in hlo,
              "xla_memory_MB": (runner.xla_bytes or 0) / 2**20}
    lines = [f"device: {info['platform']} {info['device_kind']}; {cfg.n_layers} layers, context {args.context_length}, "
             f"batch {args.batch_size}, {args.dtype}, vocab multiple {args.vocab_multiple}, attn {args.attn_impl}, "
             f"remat {args.remat}",
             f"step {step_s * 1e3:.1f} ms (median of {args.steps}), {tokens / step_s:,.0f} tokens/s"
             + (f", MFU {mfu:.1%}" if mfu else "") + f"; cuDNN attention in the HLO: "
             f"{result['cudnn_attention_in_hlo']}; traced op time {total / args.steps:.1f} ms/step", "",
             "| op class | ms/step | share |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:.2f} | {v * args.steps / total:.1%} |" for k, v in result["class_ms_per_step"].items()]
    lines += ["", "| slowest ops | class | ms/step | calls/step |", "|---|---|---:|---:|"]
    for name, t in ms.most_common(15):
        lines.append(f"| `{name[:60]}` | {op_class(name)} | {t / args.steps:.2f} | {calls[name] / args.steps:g} |")
    print("\n".join(lines))
    out = Path(args.out or RESULTS / f"profile_step_{info['platform']}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
