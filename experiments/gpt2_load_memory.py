"""Peak host memory of converting a GPT-2 safetensors checkpoint into gptjax params (and of exporting it).

    python experiments/gpt2_load_memory.py --preset gpt2-xl [--path DIR_OR_FILE] [--export]

Without an existing --path, a random checkpoint of the preset's shape (OpenAI/HF naming, float32, with
config.json) is written to a temporary directory and deleted afterwards. Each measurement runs in a fresh
subprocess and reads its peak RSS (ru_maxrss); the ratio is peak RSS over the size of the weights, import
overhead included. Prints a table and saves it to experiments/results/gpt2_load_memory.md.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "gpt2_load_memory.md"


def write_random_checkpoint(preset: str, out_dir: Path, seed: int = 0) -> int:
    """A random, GPT-2-shaped model.safetensors + config.json; returns the weights' bytes."""
    import numpy as np
    from safetensors.numpy import save_file

    from gptjax.config import get_config
    from gptjax.gpt2_export import hf_config
    from gptjax.gpt2_weights import rename_rules

    cfg = get_config(preset, qkv_bias=True, tie_embeddings=True, drop_rate=0.0)
    rng = np.random.default_rng(seed)
    tensors = {}
    for _, names, _, shapes in rename_rules(cfg, "hf"):
        for name, shape in zip(names, shapes):
            x = rng.standard_normal(shape, dtype=np.float32)
            x *= 0.02
            tensors[name] = x
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(hf_config(cfg)))
    return sum(x.nbytes for x in tensors.values())


def _child(task: str, path: str, dtype: str, out: str | None, preset: str) -> None:
    """Runs in a fresh process: one load (or load + export), peak RSS as JSON on stdout."""
    if task == "write":
        print(json.dumps(dict(weights=write_random_checkpoint(preset, Path(path)))))
        return
    import jax

    from gptjax.gpt2_export import export_hf
    from gptjax.gpt2_weights import load_gpt2

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # after importing jax: the floor
    t0 = time.perf_counter()
    params, cfg = load_gpt2(path, dtype=dtype)
    jax.block_until_ready(params)
    weights = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    if task == "export":
        rss_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        t0 = time.perf_counter()
        export_hf(params, cfg, out)
        peak_task = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps(dict(weights=weights, import_rss=rss0, load_rss=rss_load,
                              peak=peak_task, seconds=time.perf_counter() - t0)))
        return
    seconds = time.perf_counter() - t0
    print(json.dumps(dict(weights=weights, import_rss=rss0, peak=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                          seconds=seconds)))


def _run_child(task: str, path: Path, dtype: str = "float32", out: Path | None = None, preset: str = "") -> dict:
    # Everything heavy happens in children: Linux carries a process's peak RSS across fork+exec into
    # its child's ru_maxrss, so this parent stays small (stdlib only).
    cmd = [sys.executable, __file__, "--child", task, "--path", str(path), "--dtype", dtype, "--preset", preset]
    if out is not None:
        cmd += ["--out", str(out)]
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        raise SystemExit(f"measurement failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2-xl", help="shape of the random checkpoint (gpt2-small|medium|large|xl)")
    ap.add_argument("--path", help="an existing checkpoint (directory or .safetensors); if missing, a random one is made")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--export", action="store_true", help="also measure export_hf of the loaded params")
    ap.add_argument("--tmp-dir", default=None, help="where the temporary checkpoint goes (default: system temp)")
    ap.add_argument("--child", choices=["write", "load", "export"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args.child, args.path, args.dtype, args.out, args.preset)

    tmp = None
    try:
        if args.path and Path(args.path).exists():
            path, label = Path(args.path), args.path
        else:
            tmp = Path(tempfile.mkdtemp(prefix="gpt2_load_memory.", dir=args.tmp_dir))
            t0 = time.perf_counter()
            nbytes = _run_child("write", tmp / "ckpt", preset=args.preset)["weights"]
            print(f"wrote a random {args.preset} checkpoint ({nbytes / 1e9:.2f} GB) to {tmp} in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
            path, label = tmp / "ckpt", f"random {args.preset}"
        rows = [("load_gpt2", _run_child("load", path, args.dtype))]
        if args.export:
            out = Path(tmp or tempfile.mkdtemp(prefix="gpt2_load_memory.", dir=args.tmp_dir)) / "export"
            rows.append(("load + export_hf", _run_child("export", path, args.dtype, out)))
            if not tmp:
                shutil.rmtree(out.parent, ignore_errors=True)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    gb = 1e9
    lines = [f"checkpoint: {label}, params dtype {args.dtype}, {sys.platform}",
             "", "| step | weights GB | import RSS GB | peak RSS GB | peak / weights | seconds |",
             "|---|---|---|---|---|---|"]
    for name, r in rows:
        lines.append(f"| {name} | {r['weights'] / gb:.2f} | {r['import_rss'] / gb:.2f} | {r['peak'] / gb:.2f} | "
                     f"{r['peak'] / r['weights']:.2f} | {r['seconds']:.1f} |")
    table = "\n".join(lines)
    print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(table + "\n")


if __name__ == "__main__":
    main()
