"""Benchmark every device this machine has (CPU, and a GPU or TPU when present), gptjax next to PyTorch.

Each platform runs `gptjax bench` in its own process (JAX_PLATFORMS pins it) with settings that suit
it, and writes experiments/results/bench_<platform>.json / .md / .png:

  CPU: the book's chapter-5 setting, gpt2-small at context 256, batch 2, float32, AdamW, dropout 0.1.
  GPU: gpt2-small at context 1024, bfloat16 compute, vocab padded to 50,304, cuDNN attention.
  TPU: as the GPU, without PyTorch.

    python experiments/bench_devices.py                 # every platform found
    python experiments/bench_devices.py --platforms cpu --quick
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

SETTINGS = {
    # per-layer blocks with (out, in) kernels (the fastest float32 step on XLA:CPU); timed alongside: scan
    # over layers, 2 per iteration (a 2-3x faster compile), the (in, out) kernels of earlier runs, and
    # bfloat16 matmuls (float32 compute otherwise; PyTorch's rows stay float32)
    "cpu": ["--preset", "gpt2-small", "--context-length", "256", "--batch-size", "2", "--dtype", "float32",
            "--variant", "scan_layers=true,scan_unroll=2", "--variant", "linear_layout=in_out",
            "--variant", "matmul_precision=bfloat16",
            "--steps", "20", "--decode-batch", "1", "8", "--decode-tokens", "200", "--nocache-tokens", "200"],
    # GPU/TPU: nanoGPT's GPT-2 pretraining setting (no dropout: the fused attention kernels take none)
    "gpu": ["--preset", "gpt2-small", "--context-length", "1024", "--batch-size", "16", "--dtype", "bfloat16",
            "--drop-rate", "0", "--vocab-multiple", "64", "--steps", "30", "--decode-batch", "1", "8", "--decode-tokens", "200",
            "--nocache-tokens", "200", "--decode-rounds", "5"],
    "tpu": ["--preset", "gpt2-small", "--context-length", "1024", "--batch-size", "16", "--dtype", "bfloat16",
            "--drop-rate", "0", "--vocab-multiple", "64", "--steps", "30", "--decode-batch", "1", "8", "--decode-tokens", "200",
            "--nocache-tokens", "200", "--no-torch"],
}
QUICK = ["--n-layers", "2", "--steps", "5", "--decode-tokens", "32", "--nocache-tokens", "8", "--decode-rounds", "2",
         "--no-torch-compile"]


def available_platforms() -> list[str]:
    """Platforms JAX can open here, probed in a subprocess so this process never starts a backend."""
    code = ("import jax\nfor p in ('gpu', 'tpu'):\n    try:\n        jax.devices(p); print(p)\n"
            "    except RuntimeError:\n        pass\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return ["cpu", *out.stdout.split()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--platforms", nargs="+", choices=["cpu", "gpu", "tpu"], help="default: every one found")
    ap.add_argument("--quick", action="store_true", help="2 layers, few steps: a smoke run, not a measurement")
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("extra", nargs="*", help="more `gptjax bench` flags, after --")
    args = ap.parse_args(argv)
    platforms = args.platforms or available_platforms()
    failed = []
    for platform in platforms:
        out = Path(args.out_dir) / f"bench_{platform}{'_quick' if args.quick else ''}"
        env = {**os.environ, "JAX_PLATFORMS": platform}
        if platform == "cpu":
            # huge pages for malloc's large blocks: XLA and PyTorch fault in fresh pages for every big
            # buffer each step; measured 10-20% faster CPU train steps (both frameworks get it here)
            env["GLIBC_TUNABLES"] = ":".join(filter(None, [os.environ.get("GLIBC_TUNABLES"), "glibc.malloc.hugetlb=1"]))
        cmd = [sys.executable, "-m", "gptjax.cli", "bench", *SETTINGS[platform], *(QUICK if args.quick else []),
               *args.extra, "--out", str(out)]
        print(f"== {platform}: {' '.join(cmd[1:])}", flush=True)
        if subprocess.run(cmd, env=env).returncode:
            failed.append(platform)
    if failed:
        print(f"benchmark failed on {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
