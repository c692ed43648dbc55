"""Scaling table: tokens/s, per-device memory and communication of DP vs FSDP on 1, 2, 4, 8 devices.

    python experiments/scaling_cpu.py [--devices 1,2,4,8] [--steps 8] [--batch 16] [--platform cpu|auto]

On CPU the devices are simulated (XLA_FLAGS=--xla_force_host_platform_device_count=8, set here before jax
starts): they all share the machine's cores, so tokens/s cannot grow with the device count there; what
the CPU table measures is the partitioning's overhead, the per-device memory (live state shards and the
compiled step's buffers) and the bytes each step's collectives move, read from the compiled HLO. On a
multi-GPU host (`--platform auto`: the real devices) the same script gives real throughput.
The global batch is fixed (strong scaling), so per-device activations shrink with the device count.
Saves experiments/results/scaling_<platform>.{json,md} (scaling_cpu, scaling_gpu, ...).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
               "s64": 8, "u64": 8, "f64": 8}
_COLLECTIVE = re.compile(r"=\s*(\(.*?\)|\S+)\s+(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
                         r"(?:-start)?\(")
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes of the results of each kind of collective in a compiled (partitioned) HLO module, per device."""
    out: dict[str, int] = {}
    for shapes, op in _COLLECTIVE.findall(hlo_text):
        n = 0
        for dtype, dims in _SHAPE.findall(shapes):
            size = 1
            for d in filter(None, dims.split(",")):
                size *= int(d)
            n += size * DTYPE_BYTES.get(dtype, 4)
        out[op] = out.get(op, 0) + n
    return out


def measure(cfg, ocfg, devices, strategy: str, batch: int, steps: int) -> dict:
    import jax
    import numpy as np

    from gptjax import sharding as sh
    from gptjax.tasks.pretrain import init_state, make_steps

    mesh = sh.make_mesh(strategy, devices=devices)
    sharded = make_steps(cfg, ocfg, mesh, strategy)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (batch, cfg.context_length + 1)).astype(np.int32)
    x_BT, y_BT = sh.shard_batch((ids[:, :-1], ids[:, 1:]), mesh)
    t0 = time.perf_counter()
    state = init_state(sharded, cfg, 0)
    compiled = sharded.lower(state, (x_BT, y_BT)).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    coll = collective_bytes(compiled.as_text())
    for _ in range(2):  # warm up
        state, m = compiled(state, None, (x_BT, y_BT))
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):  # the median step: other processes on a shared machine make single steps slow
        t0 = time.perf_counter()
        state, m = compiled(state, None, (x_BT, y_BT))
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    return {"strategy": strategy, "devices": len(devices), "mesh": dict(mesh.shape), "batch": batch,
            "tokens_per_s": batch * cfg.context_length / step_s, "step_ms": step_s * 1e3, "compile_s": compile_s,
            "state_MB_per_device": max(sh.bytes_per_device(state).values()) / 2**20,
            "step_peak_MB_per_device": (mem.argument_size_in_bytes + mem.output_size_in_bytes
                                        - mem.alias_size_in_bytes + mem.temp_size_in_bytes) / 2**20,
            "temp_MB_per_device": mem.temp_size_in_bytes / 2**20,
            "collective_MB": {k: v / 2**20 for k, v in sorted(coll.items())}, "loss": float(m["loss"])}


def accumulation_check(cfg, devices, batch: int, k: int) -> dict:
    """Collectives of one micro-step with optax.MultiSteps(k): does accumulation save communication?"""
    import numpy as np

    from gptjax import sharding as sh
    from gptjax.optim import OptimConfig
    from gptjax.tasks.pretrain import make_steps

    sharded = make_steps(cfg, OptimConfig(lr=1e-3, grad_accum=k), sh.make_mesh("dp", devices=devices), "dp")
    x_BT = np.zeros((batch, cfg.context_length), np.int32)
    compiled = sharded.lower(sharded.restore_target(), sh.shard_batch((x_BT, x_BT), sharded.mesh))
    return {"grad_accum": k, "devices": len(devices),
            "collective_MB_per_micro_step": {k_: v / 2**20 for k_, v in
                                             sorted(collective_bytes(compiled.compile().as_text()).items())}}


def markdown(rows: list[dict], accum: dict, meta: dict) -> str:
    lines = [f"{meta['model']}; global batch {meta['batch']} x {meta['context_length']} tokens; "
             f"{meta['platform']} ({meta['backend']}, {meta['cpu_count']} cores, load average {meta['load']}); "
             f"jax {meta['jax']}", "",
             "| strategy | devices | mesh (data x fsdp) | tokens/s | median step ms | state MB/device | step peak MB/device "
             "| all-reduce MB/step | all-gather MB/step | loss |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["collective_MB"]
        lines.append(f"| {r['strategy']} | {r['devices']} | {r['mesh']['data']} x {r['mesh']['fsdp']} | "
                     f"{r['tokens_per_s']:,.0f} | {r['step_ms']:.0f} | {r['state_MB_per_device']:.2f} | "
                     f"{r['step_peak_MB_per_device']:.2f} | {c.get('all-reduce', 0):.2f} | "
                     f"{c.get('all-gather', 0):.2f} | {r['loss']:.4f} |")
    lines += ["", f"params: {meta['params']:,} ({meta['params'] * 4 / 2**20:.2f} MB float32); state = params + AdamW "
              f"moments. Collective MB: result bytes of each collective in the compiled step, per device.",
              f"optax.MultiSteps({accum['grad_accum']}) on {accum['devices']} devices (dp), per micro-step: "
              f"{accum['collective_MB_per_micro_step']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", default="1,2,4,8", help="device counts to measure")
    p.add_argument("--steps", type=int, default=8, help="timed steps per setting (after 2 warm-up steps); median")
    p.add_argument("--batch", type=int, default=16, help="global batch (rows); must divide by every device count")
    p.add_argument("--emb-dim", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--context-length", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--platform", default="cpu", choices=["cpu", "auto"],
                   help="cpu: simulated CPU devices; auto: the devices jax finds (GPUs, TPUs)")
    args = p.parse_args(argv)
    counts = [int(n) for n in args.devices.split(",")]
    if args.platform == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        flag = f"--xla_force_host_platform_device_count={max(counts)}"
        if "jax" in sys.modules:
            raise RuntimeError("run this script as a program: the simulated device count must be set before jax starts")
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()

    import jax

    from gptjax.config import GPTConfig
    from gptjax.model import num_params
    from gptjax.optim import OptimConfig

    if max(counts) > jax.device_count():
        raise SystemExit(f"asked for {max(counts)} devices but jax sees {jax.device_count()}")
    cfg = GPTConfig(vocab_size=args.vocab_size, context_length=args.context_length, emb_dim=args.emb_dim,
                    n_heads=4, n_layers=args.n_layers, drop_rate=0.0)
    ocfg = OptimConfig(lr=1e-3)
    rows = []
    for n in counts:
        for strategy in ("dp", "fsdp"):
            r = measure(cfg, ocfg, jax.devices()[:n], strategy, args.batch, args.steps)
            rows.append(r)
            print(f"{strategy:4s} {n} devices: {r['tokens_per_s']:8,.0f} tokens/s  {r['step_ms']:6.0f} ms/step  "
                  f"state {r['state_MB_per_device']:.2f} MB/device  step peak {r['step_peak_MB_per_device']:.2f} "
                  f"MB/device  collectives {r['collective_MB']}  loss {r['loss']:.4f}", flush=True)
    accum = accumulation_check(cfg, jax.devices()[:max(counts)], args.batch, 4)
    print(accum)
    tag = "cpu" if args.platform == "cpu" else jax.default_backend()
    meta = {"model": f"GPT emb_dim={cfg.emb_dim} n_layers={cfg.n_layers} n_heads={cfg.n_heads} "
                     f"vocab={cfg.vocab_size}", "params": num_params(cfg), "batch": args.batch,
            "context_length": cfg.context_length, "platform": platform.platform(terse=True),
            "backend": jax.default_backend(), "cpu_count": os.cpu_count(), "load": round(os.getloadavg()[0], 1),
            "jax": jax.__version__, "command": "python experiments/scaling_cpu.py " + " ".join(argv or sys.argv[1:])}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"scaling_{tag}.json").write_text(json.dumps({"meta": meta, "rows": rows, "accum": accum},
                                                                indent=1))
    md = markdown(rows, accum, meta)
    (RESULTS / f"scaling_{tag}.md").write_text(f"`{meta['command'].strip()}`\n\n" + md)
    print(md)


if __name__ == "__main__":
    main()
