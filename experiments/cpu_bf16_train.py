"""Is bfloat16 compute faster than float32 for a train step on this CPU, under which XLA:CPU flags?

The book's chapter-5 step (gpt2-small, context 256, batch 2, AdamW, dropout 0.1), `GPTConfig.dtype`
float32 and bfloat16 (float32 params and optimizer state either way), and float32 compute with
bfloat16 matmuls (`matmul_precision`), timed alternately in one fresh process per XLA flag setting:
`ynn_fusion_type=dot`, `individual_dot` (gptjax.runtime's: YNNPACK takes each dot alone, AMX
bfloat16 GEMMs where the operand layout suits it) and XLA's defaults. Medians of the timed steps
after two warm-up steps.

    python experiments/cpu_bf16_train.py [--steps 8]
"""
import argparse
import os
import subprocess
import sys

SETTINGS = {"dot": "--xla_cpu_experimental_ynn_fusion_type=dot",
            "individual_dot (gptjax.runtime)": "--xla_cpu_experimental_ynn_fusion_type=individual_dot",
            "XLA defaults": ""}

PROBE = r'''
import statistics, sys
from gptjax.bench import BenchConfig, JaxTrain
from gptjax.measure import alternate
bc = BenchConfig(preset="gpt2-small", context_length=256, batch_size=2, drop_rate=0.1, qkv_bias=False)
runs = {dtype: JaxTrain(*bc.setup(dtype=dtype), bc) for dtype in ("float32", "bfloat16")}
runs["matmuls"] = JaxTrain(*bc.setup(matmul_precision="bfloat16"), bc)
times = alternate(runs, rounds=int(sys.argv[1]), warmup=2)
print(" ".join(f"{1e3 * statistics.median(t):.0f}" for t in times.values()))
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    print("| XLA flags | float32 step (ms) | bfloat16 step (ms) | bfloat16 / float32 time "
          "| float32, bfloat16 matmuls (ms) | its / float32 time |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, flags in SETTINGS.items():
        env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
        out = subprocess.run([sys.executable, "-c", PROBE, str(args.steps)], env=env, capture_output=True, text=True)
        if out.returncode:
            print(f"| {name} | failed: {out.stderr.strip()[-200:]} | | | | |")
            continue
        f32, bf16, mm = (float(v) for v in out.stdout.split()[-3:])
        print(f"| {name} | {f32:,.0f} | {bf16:,.0f} | {bf16 / f32:.2f} | {mm:,.0f} | {mm / f32:.2f} |", flush=True)


if __name__ == "__main__":
    main()
