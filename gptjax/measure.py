"""Measurement tools, usable without the benchmark (`gptjax.bench` builds on them): model FLOPs and
device peaks (MFU), the device and host, alternated timing, probes in a fresh process, memory bandwidth
and the decode roofline, per-op XLA traces, compiled and device memory, and random token batches.
"""
from __future__ import annotations

import collections
import contextlib
import glob
import gzip
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from gptjax.config import GPTConfig
from gptjax.model import abstract_params, count_params

# Dense peak FLOP/s per device by device_kind substring (lowercase), from the vendors' data sheets.
# "fp32" is what XLA runs float32 matmuls on by default: TF32 tensor cores on NVIDIA Ampere and newer.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "h200": {"bfloat16": 989e12, "float32": 495e12},
    "h100 pcie": {"bfloat16": 756e12, "float32": 378e12},
    "h100": {"bfloat16": 989e12, "float32": 495e12},  # SXM
    "a100": {"bfloat16": 312e12, "float32": 156e12},
    "l4": {"bfloat16": 121e12, "float32": 60e12},
    "a10": {"bfloat16": 125e12, "float32": 62.5e12},
    "v100": {"float16": 125e12, "float32": 15.7e12},
    "t4": {"float16": 65e12, "float32": 8.1e12},
    "tpu v6 lite": {"bfloat16": 918e12},
    "tpu v5p": {"bfloat16": 459e12},
    "tpu v5 lite": {"bfloat16": 197e12},
    "tpu v5e": {"bfloat16": 197e12},
    "tpu v4": {"bfloat16": 275e12},
    "tpu v3": {"bfloat16": 61.5e12},  # per core (a JAX device)
    "tpu v2": {"bfloat16": 22.5e12},
}


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """The device's dense peak for `dtype` (float32 falls back to nothing on TPU), or None if unknown."""
    kind = device_kind.lower()
    for key, peaks in PEAK_FLOPS.items():  # ordered: specific names before their prefixes
        if key in kind:
            return peaks.get(dtype) or (peaks.get("float16") if dtype == "bfloat16" else None)
    return None


def matmul_params(cfg: GPTConfig) -> int:
    """N for FLOPs: parameters that enter a matmul (blocks + LM head at the real vocab size). Lookups do
    no FLOPs: wte counts only as the tied head, wpe never; with a tied head this is nanoGPT's N."""
    shapes = abstract_params(cfg)
    n = count_params(shapes) - count_params(shapes["wpe"])
    tied_head = cfg.tie_embeddings and not cfg.n_classes
    return n if tied_head else n - count_params(shapes["wte"])


def flops_per_token(cfg: GPTConfig, T: int) -> float:
    """nanoGPT's training FLOPs per token: 6N + 12 L T D (forward + backward, attention included)."""
    return 6 * matmul_params(cfg) + 12 * cfg.n_layers * T * cfg.emb_dim


def device_info() -> dict:
    """The first device, the host and the versions a benchmark result should carry."""
    dev = jax.devices()[0]
    return {"platform": dev.platform, "device_kind": dev.device_kind, "n_devices": jax.device_count(),
            "jax": jax.__version__, "python": platform.python_version(), "host_cpus": os.cpu_count(),
            "cpu": _cpu_model(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "jaxlib": getattr(jaxlib, "__version__", None), "flax": getattr(flax, "__version__", None)}


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def load_average() -> float | None:
    """The 1-minute load average, or None where the OS has none."""
    with contextlib.suppress(OSError):
        return round(os.getloadavg()[0], 2)
    return None


# --- timing ---------------------------------------------------------------------------------

def timed(fn: Callable[..., Any], *args) -> tuple[Any, float]:
    """`fn(*args)` and the seconds it took."""
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def alternate(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run every fn once per round, round after round; seconds per call (warm-up rounds dropped). Each fn
    must block until its work is done. Alternating spreads a shared machine's noise evenly."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(warmup + rounds):
        for name, fn in fns.items():
            _, seconds = timed(fn)
            if r >= warmup:
                times[name].append(seconds)
    return times


def in_fresh_process(module: str, *args: str) -> dict:
    """`python -m MODULE ARGS` in a fresh process: the JSON of its last output line, or {"error": last error line}."""
    out = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True)
    if out.returncode:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_bandwidth(mb: int = 1024, reps: int = 8) -> dict:
    """This device's memory bandwidth (GB/s): read (a sum) and copy (read + write, in place, donated).
    1 GiB by default: larger than server CPUs' last-level caches, which would otherwise be measured."""
    n = mb * 2**20 // 4
    x = [jnp.ones((n,), jnp.float32)]
    total = jax.jit(jnp.sum)
    bump = jax.jit(lambda a: a + 1.0, donate_argnums=0)  # in place: no fresh pages to fault in

    def copy():
        x[0] = bump(x[0])
        x[0].block_until_ready()

    times = alternate({"read": lambda: total(x[0]).block_until_ready(), "copy": copy}, rounds=reps)
    moved = {"read": n * 4, "copy": 2 * n * 4}  # bytes per call
    gbps = lambda k, stat: round(moved[k] / stat(times[k]) / 1e9, 2)
    return {"read_GBps": gbps("read", statistics.median), "copy_GBps": gbps("copy", statistics.median),
            "read_best_GBps": gbps("read", min), "copy_best_GBps": gbps("copy", min), "array_MB": mb}


def roofline_bandwidth(*measurements: dict) -> float:
    """The read bandwidth decode is held to: the best repetition of any measurement (STREAM's
    convention: other load only ever slows a repetition down), reads or half a copy's traffic."""
    return max(max(m["read_best_GBps"], m["copy_best_GBps"] / 2) for m in measurements)


def decode_bytes_per_step(cfg: GPTConfig, B: int, S: int, weight_bytes: int, cache_bytes: int) -> float:
    """Bytes one decode step must read: every matmul weight once, plus the whole static KV cache."""
    return matmul_params(cfg) * weight_bytes + 2 * cfg.n_layers * B * S * cfg.emb_dim * cache_bytes


# XLA:CPU writes one trace event per op only with this flag, which must be in XLA_FLAGS before JAX starts
XPROF_OPS_FLAG = "--xla_cpu_enable_xprof_traceme=true"


def trace_xla_ops(run: Callable[[], Any]) -> tuple[collections.Counter, collections.Counter]:
    """One `jax.profiler` trace of `run()` (which must block until its results are ready):
    milliseconds and number of calls per XLA op name (fusion.12, dot.7, ...)."""
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            run()
        events = json.load(gzip.open(glob.glob(f"{d}/**/*.trace.json.gz", recursive=True)[0]))["traceEvents"]
    ms, calls = collections.Counter(), collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") == "X" and not name.startswith(("$", "Thunk", "np.", "PjitFunction", "Slinky", "end:")):
            ms[name] += e["dur"] / 1e3
            calls[name] += 1
    return ms, calls


def by_op_kind(ms: collections.Counter) -> collections.Counter:
    """Per-op times summed by kind: the op name without its number (all "dot.N" as "dot")."""
    kinds = collections.Counter()
    for name, t in ms.items():
        kinds[re.sub(r"\.\d+$", "", name)] += t
    return kinds


# --- memory and batches ---------------------------------------------------------------------

def random_batch(cfg: GPTConfig, B: int, seed: int = 0) -> tuple[jax.Array, jax.Array]:
    """B random windows of token ids (inputs, targets shifted by one), `cfg.context_length` long."""
    rng = np.random.default_rng(seed)
    x_BT = rng.integers(0, cfg.vocab_size, (B, cfg.context_length + 1), dtype=np.int32)
    return jnp.asarray(x_BT[:, :-1]), jnp.asarray(x_BT[:, 1:])


def xla_memory_bytes(compiled) -> int | None:
    """What a compiled program holds (arguments + outputs + temporaries - aliased), or None if unreported."""
    with contextlib.suppress(Exception):  # not every backend/version reports it
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)
    return None


def device_peak_bytes() -> int | None:
    """The first device's peak bytes in use, where it reports memory stats."""
    return (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
