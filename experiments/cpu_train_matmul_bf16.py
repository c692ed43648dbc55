"""Train steps with bfloat16 matmuls (Options.matmul_precision) against float32, gptjax and PyTorch, in
the chapter-5 setting (gpt2-small, context 256, batch 2, AdamW, dropout 0.1) on this CPU.

gptjax: float32 and matmul_precision="bfloat16" ((out, in) kernels, as `gptjax pretrain` trains on
CPU), alternated in one process. PyTorch (transformers' GPT2LMHeadModel, SDPA, fused AdamW), eager
and torch.compile, alternated in a process of its own: float32; float32 with
torch.set_float32_matmul_precision("medium") (oneDNN multiplies float32 in bfloat16, what
matmul_precision="bfloat16" does); and bfloat16 autocast (activations in bfloat16 too). Medians of
`--rounds` steps after warm-up; ratios are of medians from the same run.

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python experiments/cpu_train_matmul_bf16.py

Writes experiments/results/cpu_train_matmul_bf16.md.
"""
import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

GPTJAX = r'''
import json, statistics, sys
from gptjax.runtime import setup
setup(compilation_cache=False)
from gptjax.bench import BenchConfig, JaxTrain
from gptjax.measure import alternate
rounds = int(sys.argv[1])
bc = BenchConfig(preset="gpt2-small", context_length=256, batch_size=2, dtype="float32", linear_layout="out_in")
runs = {f"gptjax, matmuls {p}": JaxTrain(*bc.setup(matmul_precision=p), bc) for p in ("float32", "bfloat16")}
t = alternate(runs, rounds=rounds, warmup=2)
print(json.dumps({k: statistics.median(v) for k, v in t.items()}))
'''
TORCH = r'''
import dataclasses, json, statistics, sys
import torch
from gptjax.bench import BenchConfig
from gptjax.bench_torch import TorchTrain
from gptjax.measure import alternate
rounds = int(sys.argv[1])
bc = BenchConfig(preset="gpt2-small", context_length=256, batch_size=2, dtype="float32")
cfg = bc.model_config()
settings = {"float32": (bc, "highest"), "float32, matmuls medium (bfloat16)": (bc, "medium"),
            "bfloat16 autocast": (dataclasses.replace(bc, dtype="bfloat16"), "highest")}
medians = {}
for name, (b, precision) in settings.items():  # the matmul precision is process-wide: one setting at a time
    torch.set_float32_matmul_precision(precision)
    t = alternate({f"PyTorch eager, {name}": TorchTrain(cfg, b, False, "cpu"),
                   f"PyTorch compile, {name}": TorchTrain(cfg, b, True, "cpu")}, rounds=rounds, warmup=1)
    medians.update({k: statistics.median(v) for k, v in t.items()})
print(json.dumps(medians))
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10, help="timed steps per configuration")
    args = ap.parse_args()
    medians = {}
    for code in (GPTJAX, TORCH):
        out = subprocess.run([sys.executable, "-c", code, str(args.rounds)], capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr[-2000:])
        medians.update(json.loads(out.stdout.strip().splitlines()[-1]))
    ours = medians["gptjax, matmuls bfloat16"]
    import jax
    import torch

    lines = ["# Train step with bfloat16 matmuls, CPU: gptjax and PyTorch", "",
             f"{platform.processor() or platform.machine()}, jax {jax.__version__}, torch {torch.__version__}; "
             f"gpt2-small, context 256, batch 2, AdamW, dropout 0.1; medians of {args.rounds} steps.", "",
             "| train step | median | gptjax bf16 matmuls / this |", "|---|---:|---:|"]
    for name, s in medians.items():
        lines.append(f"| {name} | {1e3 * s:,.0f} ms | {s / ours:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(__file__).parent / "results" / "cpu_train_matmul_bf16.md"
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
