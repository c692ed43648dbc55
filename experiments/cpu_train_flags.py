"""Float32 train steps under the two XLA:CPU YNNPACK fusion settings gptjax has used: does
`individual_dot` (gptjax.runtime's now: the one that runs bfloat16 matmuls on AMX) cost float32
training anything against `dot` (what it set before)?

The chapter-5 step (gpt2-small, context 256, batch 2, float32, AdamW, dropout 0.1) with (out, in) and
(in, out) kernels, alternated, in one fresh process per setting; the settings themselves alternate
`--repeats` times, so a machine that gets busier mid-run slows both. Medians of `--steps` steps.

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python experiments/cpu_train_flags.py [--repeats 2] [--steps 8]
"""
import argparse
import json
import os
import subprocess
import sys

SETTINGS = {"dot": "--xla_cpu_experimental_ynn_fusion_type=dot",
            "individual_dot": "--xla_cpu_experimental_ynn_fusion_type=individual_dot"}

PROBE = r'''
import json, statistics, sys
from gptjax.bench import BenchConfig, JaxTrain
from gptjax.measure import alternate
bc = BenchConfig(preset="gpt2-small", context_length=256, batch_size=2, dtype="float32")
runs = {layout: JaxTrain(*bc.setup(linear_layout=layout), bc) for layout in ("out_in", "in_out")}
t = alternate(runs, rounds=int(sys.argv[1]), warmup=2)
print(json.dumps({k: statistics.median(v) for k, v in t.items()}))
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    print("| XLA flag | round | float32 step, (out, in) kernels | (in, out) kernels |")
    print("|---|---:|---:|---:|")
    for r in range(args.repeats):
        for name, flags in SETTINGS.items():
            # GPTJAX_NO_XLA_FLAGS: the runtime adds nothing, so the flag here is the only one
            env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", "GPTJAX_NO_XLA_FLAGS": "1"}
            out = subprocess.run([sys.executable, "-c", PROBE, str(args.steps)], env=env, capture_output=True,
                                 text=True)
            if out.returncode:
                print(f"| {name} | {r + 1} | failed: {out.stderr.strip()[-200:]} | |")
                continue
            ms = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {name} | {r + 1} | {1e3 * ms['out_in']:,.0f} ms | {1e3 * ms['in_out']:,.0f} ms |", flush=True)


if __name__ == "__main__":
    main()
