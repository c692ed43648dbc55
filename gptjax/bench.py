"""How fast the jitted steps run: compile time, step time, tokens/s, model FLOPs and MFU, memory,
decode speed with and without the KV cache, and PyTorch (transformers' GPT2LMHeadModel) side by side.

The programs compared alternate (a round runs each once), so a shared machine slows them alike; each
number is a median over rounds after warm-up. On CPU, PyTorch's train rows run after gptjax's in a
process of their own (`BenchConfig.torch_process`): the two frameworks' thread pools slow each other.
Measuring tools are in gptjax.measure, PyTorch's runners in gptjax.bench_torch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import monitoring as jax_monitoring  # its unregister functions: not public in every version

from gptjax import runs
from gptjax.bench_report import format_table, plot
from gptjax.bench_torch import Timed, torch_generate_model, torch_runners, torch_train_apart, torch_version
from gptjax.config import GPTConfig, get_config
from gptjax.engine import mean_metrics
from gptjax.measure import (alternate, decode_bytes_per_step, device_info, device_peak_bytes, flops_per_token,
                            in_fresh_process, load_average, memory_bandwidth, peak_flops, random_batch,
                            roofline_bandwidth, timed, xla_memory_bytes)
from gptjax.optim import OptimConfig
from gptjax.model import count_params, init_params
from gptjax.options import WEIGHT_DTYPES, Options
from gptjax.generate import decoding_model, decoding_weights, generate
from gptjax.runtime import compilation_cache_at, enable_compilation_cache
from gptjax.tasks.pretrain import init_state, make_steps


# --- training -------------------------------------------------------------------------------

@dataclass
class BenchConfig:
    preset: str = "gpt2-small"
    context_length: int = 256
    batch_size: int = 2
    dtype: str = "float32"
    matmul_precision: str = "float32"  # Options'; PyTorch's rows then run torch's "medium" float32 matmuls
    drop_rate: float = 0.1
    qkv_bias: bool = True  # transformers' GPT2 always has q/k/v biases: match it
    tie_embeddings: bool = False  # the book's chapter-5 model has its own head
    attn_impl: str = "auto"
    scan_layers: bool = False
    scan_unroll: int = 1
    remat: str = "none"
    vocab_multiple: int = 1
    n_layers: int | None = None  # override the preset (quick runs)
    model_overrides: dict = field(default_factory=dict)  # any other GPTConfig keys (emb_dim, n_heads, ...)
    steps: int = 20
    warmup: int = 2
    lr: float = 4e-4
    weight_decay: float = 0.1
    decode_batches: tuple[int, ...] = (1, 8)
    decode_prompt: int = 8
    decode_tokens: int = 200
    nocache_tokens: int = 20  # at batch 1 (// B beyond): the no-cache path re-reads the whole window per token
    decode_rounds: int = 3
    weight_dtypes: tuple[str, ...] = WEIGHT_DTYPES
    torch: bool = True
    torch_compile: bool = True
    # PyTorch's train rows alternated with gptjax's ("same"), or after them in a process of their own ("apart")
    torch_process: str = "auto"  # auto: apart on CPU, else same
    parts: tuple[str, ...] = ("bandwidth", "train", "compile", "decode")
    linear_layout: str = "in_out"  # kernel storage of the gptjax train rows (the CLI's auto: out_in on CPU)
    # more gptjax train configs timed in the same rounds (GPTConfig or Options keys), e.g. {"scan_layers": False}
    variants: tuple[dict, ...] = ()
    seed: int = 0

    def __post_init__(self):
        if self.torch_process not in ("auto", "same", "apart"):
            raise ValueError(f"torch_process must be auto, same or apart, got {self.torch_process!r}")
        if bad := [w for w in self.weight_dtypes if w not in WEIGHT_DTYPES]:
            raise ValueError(f"weight_dtypes must be float32, bfloat16 or int8, got {bad}")

    def model_config(self, **overrides) -> GPTConfig:
        """The architecture; `overrides` may also hold Options keys (ignored here, see `options`)."""
        kw = dict(context_length=self.context_length, drop_rate=self.drop_rate, qkv_bias=self.qkv_bias,
                  tie_embeddings=self.tie_embeddings)
        if self.n_layers:
            kw["n_layers"] = self.n_layers
        model_kw = {k: v for k, v in overrides.items() if k not in _OPTION_KEYS}
        return get_config(self.preset, **{**kw, **self.model_overrides, **model_kw})

    def options(self, **overrides) -> Options:
        """How the gptjax rows run (Options.for_backend: CPU's defaults on CPU); `overrides` may also
        hold GPTConfig keys (ignored here, see `model_config`)."""
        return Options.for_backend(**{k: v for k, v in {**vars(self), **overrides}.items() if k in _OPTION_KEYS})

    def setup(self, **overrides) -> tuple[GPTConfig, Options]:
        return self.model_config(**overrides), self.options(**overrides)


_OPTION_KEYS = {f.name for f in dataclasses.fields(Options)}


class JaxTrain:
    """gptjax's jitted train step (the pretraining task's engine steps) on `cfg` under `opts`, compiled AOT."""

    def __init__(self, cfg: GPTConfig, opts: Options, bc: BenchConfig):
        self.cfg, self.opts = cfg, opts
        # programs of its own: the compile time is measured, not found in another run's programs
        self.steps = make_steps(cfg, OptimConfig(lr=bc.lr, weight_decay=bc.weight_decay), opts=opts, share=False)
        self.state = init_state(self.steps, cfg, bc.seed, opts=opts)
        self.n_params = count_params(self.state.params)
        self.batch = random_batch(cfg, bc.batch_size, bc.seed)
        lowered, self.lower_s = timed(self.steps.lower, self.state, self.batch)
        self.step_fn, self.compile_s = timed(lowered.compile)
        self.xla_bytes = xla_memory_bytes(self.step_fn)

    def __call__(self) -> None:
        self.state, metrics = self.step_fn(self.state, None, self.batch)
        metrics["loss"].block_until_ready()


def torch_apart(bc: BenchConfig) -> bool:
    """Whether PyTorch's train rows run in a process of their own (BenchConfig.torch_process)."""
    return bc.torch_process == "apart" or (bc.torch_process == "auto" and jax.default_backend() == "cpu")


def _torch_train_probe(spec: dict) -> dict:
    """In the fresh process of bench_torch.torch_train_apart: PyTorch's train runners alone, alternated."""
    bc = BenchConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["bc"].items()})
    runners, errors = torch_runners(GPTConfig.from_dict(spec["cfg"]), bc, lambda m: print(m, file=sys.stderr), "cpu")
    return {"runners": {k: {"n_params": r.n_params, "first_step_s": r.first_step_s} for k, r in runners.items()},
            "times": alternate(runners, rounds=bc.steps, warmup=bc.warmup), "errors": errors}


def bench_train(bc: BenchConfig, log: Callable[[str], None] = print) -> list[dict]:
    """Train-step rows: gptjax (as configured) and, when torch is installed, HF eager / torch.compile."""
    cfg, opts = bc.setup()
    device_kind = device_info()["device_kind"]
    runners: dict[str, Any] = {}
    cfgs = {"gptjax": (cfg, opts), **{f"gptjax #{i + 1}": bc.setup(**v) for i, v in enumerate(bc.variants)}}
    for name, (c, o) in cfgs.items():
        log(f"compiling gptjax train step ({_describe(c, o)}) ...")
        runners[name] = JaxTrain(c, o, bc)
    torch_errors: dict = {}
    apart = bc.torch and torch_apart(bc)
    if bc.torch and not apart:
        more, torch_errors = torch_runners(cfg, bc, log)
        runners.update(more)
    log(f"timing {bc.steps} steps each, alternating {list(runners)} (load {load_average()}) ...")
    times = alternate(runners, rounds=bc.steps, warmup=bc.warmup)
    if apart:
        more, more_times, torch_errors = torch_train_apart(cfg, bc, log)
        runners.update(more)
        times.update(more_times)
    rows = []
    for name, r in runners.items():
        c, o = cfgs.get(name, (cfg, opts))  # a variant's own shape and dtype; PyTorch runs the base config
        tokens, med = bc.batch_size * c.context_length, statistics.median(times[name])
        fpt, peak = flops_per_token(c, c.context_length), peak_flops(device_kind, o.dtype)
        achieved = fpt * tokens / med
        variant = _describe(c, o, (cfg, opts)) if name in cfgs else (
            name.split()[1] + " sdpa fusedAdamW" + (" matmuls medium" if opts.matmul_precision != "float32" else "")
            + (" own-process" if isinstance(r, Timed) else ""))
        row = {"part": "train", "framework": name.split()[0], "variant": variant, "model": bc.preset,
               "params": r.n_params, "batch": bc.batch_size, "T": c.context_length, "dtype": o.dtype,
               "step_ms": round(1e3 * med, 1), "step_ms_min": round(1e3 * min(times[name]), 1),
               "steps": len(times[name]), "tokens_per_s": round(tokens / med, 1), "flops_per_token": fpt,
               "achieved_GFLOPs": round(achieved / 1e9, 1), "mfu": None if peak is None else round(achieved / peak, 4)}
        if isinstance(r, JaxTrain):
            row.update(lower_s=round(r.lower_s, 2), compile_s=round(r.compile_s, 2), xla_memory_MB=_mb(r.xla_bytes),
                       peak_memory_MB=_mb(device_peak_bytes()))
        else:
            row.update(compile_s=round(r.first_step_s - med, 2) if "compile" in name else None,
                       peak_memory_MB=_mb(r.torch.cuda.max_memory_allocated()) if r.device == "cuda" else None,
                       process="own" if isinstance(r, Timed) else "shared")
        rows.append(row)
    _ratios(rows, "tokens_per_s")
    rows += [{"part": "train", "framework": name.split()[0], "variant": name, "error": err}
             for name, err in torch_errors.items()]
    rows.append({"part": "train", "framework": "gptjax", "variant": "compilations in a run",
                 **count_compilations(runners["gptjax"], bc)})
    return rows


def count_compilations(runner: JaxTrain, bc: BenchConfig, steps: int = 6) -> dict:
    """Programs a training run compiles: fresh train/eval steps over batches of one shape, continuing `runner`."""
    cfg, state = runner.cfg, runner.state
    engine_steps = make_steps(cfg, OptimConfig(lr=bc.lr, weight_decay=bc.weight_decay), opts=runner.opts, share=False)
    events: list[str] = []
    record = lambda name, *a, **k: events.append(name)
    jax.monitoring.register_event_duration_secs_listener(record)
    jax.monitoring.register_event_listener(record)
    try:
        for i in range(steps):
            state, metrics = engine_steps.train_step(state, random_batch(cfg, bc.batch_size, seed=i))
            if i % 3 == 0:
                evals = [random_batch(cfg, bc.batch_size, seed=100 + j) for j in range(2)]
                mean_metrics(engine_steps, state.params, evals)
        float(metrics["loss"])
    finally:
        with contextlib.suppress(AttributeError, ValueError, AssertionError):  # not in every jax version
            jax_monitoring.unregister_event_duration_listener(record)
            jax_monitoring.unregister_event_listener(record)
    runner.state = state
    return {"train_step_programs": engine_steps.train_jit._cache_size(),
            "eval_step_programs": engine_steps.eval_jit._cache_size(),
            "xla_compiles_in_loop": sum(e.endswith("backend_compile_duration") for e in events),
            "cache_loads_in_loop": sum(e.endswith("cache_hits") for e in events), "loop_steps": steps}


_DESCRIBED = ("attn_impl", "scan_layers", "scan_unroll", "remat", "vocab_multiple", "linear_layout",
              "matmul_precision", "grad_barrier", "dtype", "context_length")  # the last two have table columns


def _describe(cfg: GPTConfig, opts: Options, base: tuple[GPTConfig, Options] | None = None) -> str:
    """A train config in a few words; with `base`, also every other field a variant changes."""
    bits = [f"attn={opts.attn_impl}",
            opts.scan_layers and f"scan(unroll={opts.scan_unroll})",
            opts.remat != "none" and f"remat={opts.remat}",
            opts.vocab_multiple > 1 and f"vocab->{opts.padded_vocab_size(cfg.vocab_size)}",
            opts.linear_layout != "in_out" and f"kernels {opts.linear_layout}",
            opts.matmul_precision != "float32" and f"matmuls {opts.matmul_precision}"]
    if base is not None:
        bits += [f"{f.name}={getattr(new, f.name)}" for new, old in zip((cfg, opts), base)
                 for f in dataclasses.fields(new)
                 if f.name not in _DESCRIBED and getattr(new, f.name) != getattr(old, f.name)]
    return " ".join(b for b in bits if b)


def _mb(n: int | None) -> float | None:
    return None if n is None else round(n / 2**20, 1)


def _ratios(rows: list[dict], key: str) -> None:
    """gptjax / best PyTorch for each gptjax row; each PyTorch row gets gptjax / that row."""
    torch_rows, jax_rows = ([r for r in rows if r["framework"] == fw and r.get(key)] for fw in ("pytorch", "gptjax"))
    if not torch_rows or not jax_rows:
        return
    best = max(r[key] for r in torch_rows)
    for r in jax_rows:
        r["vs_pytorch_best"] = round(r[key] / best, 3)
    for r in torch_rows:
        r["gptjax_over_this"] = round(jax_rows[0][key] / r[key], 3)


# --- compile time, cold and from the persistent cache ------------------------------------------

def _compile_probe(spec: dict) -> dict:
    """Run in a fresh process: AOT lower + compile of the train step from abstract shapes."""
    enable_compilation_cache(spec["cache_dir"], min_compile_time_s=0.0)
    cfg, opts = GPTConfig.from_dict(spec["cfg"]), Options.from_dict(spec["opts"])
    steps = make_steps(cfg, OptimConfig(), opts=opts)
    x = jax.ShapeDtypeStruct((spec["batch"], cfg.context_length), jnp.int32)
    lowered, lower_s = timed(steps.lower, steps.abstract, (x, x))
    _, compile_s = timed(lowered.compile)
    lower_s, compile_s = round(lower_s, 2), round(compile_s, 2)
    return {"lower_s": lower_s, "compile_s": compile_s, "lower_plus_compile_s": round(lower_s + compile_s, 2)}


def bench_compile(bc: BenchConfig, log: Callable[[str], None] = print) -> list[dict]:
    """Train-step compile time per layer layout, cold and then from the persistent cache (fresh processes)."""
    rows = []
    for scan in (False, True):
        cfg, opts = bc.setup(scan_layers=scan)
        with tempfile.TemporaryDirectory(prefix="gptjax-cc-") as cache_dir:
            for attempt in ("cold", "persistent cache"):
                log(f"compile probe: scan_layers={scan}, {attempt} ...")
                spec = {"cfg": cfg.to_dict(), "opts": opts.to_dict(), "batch": bc.batch_size, "cache_dir": cache_dir}
                rows.append({"part": "compile", "framework": "gptjax", "variant": _describe(cfg, opts),
                             "model": bc.preset, "batch": bc.batch_size, "T": cfg.context_length, "dtype": opts.dtype,
                             "cache": attempt, **in_fresh_process("gptjax.bench", "--compile-probe", json.dumps(spec))})
    return rows


# --- decoding -------------------------------------------------------------------------------

def bench_decode(bc: BenchConfig, bandwidth_GBps: float | None, log: Callable[[str], None] = print) -> list[dict]:
    """New tokens/s of greedy decoding at each batch size: KV cache, no cache, and transformers' generate."""
    cfg, opts = bc.setup(drop_rate=0.0, scan_layers=False, remat="none")
    # laid out for decoding once, as a caller decoding repeatedly would (on CPU: (out, in) kernels)
    params, opts = decoding_model(init_params(cfg, jax.random.key(bc.seed), opts), cfg, opts)
    rng = np.random.default_rng(bc.seed)
    rows, hf = [], None
    with contextlib.suppress(ImportError):  # without torch or transformers: gptjax's rows alone
        hf = torch_generate_model(cfg) if bc.torch else None
    # as `gptjax generate --weight-dtype`: weight-only bfloat16 where the CPU kernel reads it, int8
    weights = {wd: (params, opts) if wd == "float32" else decoding_weights(params, cfg, opts, wd)
               for wd in bc.weight_dtypes}
    for B in bc.decode_batches:
        prompt_BT = rng.integers(0, cfg.vocab_size, (B, bc.decode_prompt), dtype=np.int32)
        nocache = max(4, bc.nocache_tokens // B)  # the window loop costs B x window per token: same budget per B
        fns, entry_bytes = {}, {}  # bytes per weight and per KV-cache entry, where not float32's (4, 4)
        for wd, (p, o) in weights.items():
            name = "gptjax kv-cache" + ("" if wd == "float32" else
                                        f" {wd}-weights" + (f" {o.dtype}-compute" if o.dtype != wd else ""))
            fns[name] = lambda p=p, o=o, x=prompt_BT: generate(p, cfg, x, bc.decode_tokens, opts=o)
            entry_bytes[name] = (jnp.dtype(wd).itemsize, jnp.dtype(o.dtype).itemsize)
        if opts.matvec == "kernel":  # the kernel's effect: the same decode on XLA's dot
            xla = opts.replace(matvec="xla")
            fns["gptjax kv-cache xla-matvec"] = lambda x=prompt_BT: generate(params, cfg, x, bc.decode_tokens, opts=xla)
        fns["gptjax no-cache"] = lambda x=prompt_BT, n=nocache: generate(params, cfg, x, n, use_cache=False, opts=opts)
        if hf is not None:
            fns["pytorch generate kv-cache"] = lambda x=prompt_BT: hf(x, bc.decode_tokens, True)
            fns["pytorch generate no-cache"] = lambda x=prompt_BT, n=nocache: hf(x, n, False)
        log(f"decode B={B}: warm-up/compile, then {bc.decode_rounds} alternating rounds of {list(fns)} "
            f"(load {load_average()}) ...")
        by_name = {}
        for name, ts in alternate(fns, rounds=bc.decode_rounds, warmup=1).items():
            med = statistics.median(ts)
            n = nocache if "no-cache" in name else bc.decode_tokens
            framework, variant = name.split(" ", 1)
            row = by_name[name] = {"part": "decode", "framework": framework, "variant": variant, "model": bc.preset,
                                   "batch": B, "prompt": bc.decode_prompt, "new_tokens": n, "s_per_call": round(med, 3),
                                   "tokens_per_s": round(B * n / med, 1)}
            if "kv-cache" in name and bandwidth_GBps:
                need = decode_bytes_per_step(cfg, B, bc.decode_prompt + n, *entry_bytes.get(name, (4, 4)))
                roof = B * bandwidth_GBps * 1e9 / need
                row.update(roofline_tokens_per_s=round(roof, 1), roofline_fraction=round(B * n / med / roof, 3))
        cached = by_name["gptjax kv-cache"]
        cached["vs_no_cache"] = round(cached["tokens_per_s"] / by_name["gptjax no-cache"]["tokens_per_s"], 2)
        for name, r in by_name.items():
            if r["framework"] == "gptjax" and hf is not None:  # against PyTorch's row with or without the cache
                ref = by_name["pytorch generate " + ("no-cache" if "no-cache" in name else "kv-cache")]
                r["vs_pytorch"] = round(r["tokens_per_s"] / ref["tokens_per_s"], 3)
        rows += by_name.values()
    return rows


# --- the whole benchmark --------------------------------------------------------------------

def run(bc: BenchConfig, out: str | Path | None = None, log: Callable[[str], None] = print) -> dict:
    """Measure the parts in `bc.parts`, print a table, write out.json / out.md / out.png when `out` is given."""
    # a fresh persistent cache: compile times below are cold, and recompiling the same program
    # (the compilation count) loads it instead of paying a second cold compile
    with tempfile.TemporaryDirectory(prefix="gptjax-bench-cc-") as cache_dir, compilation_cache_at(cache_dir):
        result = _measure(bc, log)
    table = format_table(result)
    log(table)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        runs.write_text_atomic(out.with_suffix(".json"), json.dumps(result, indent=1, default=str))
        runs.write_text_atomic(out.with_suffix(".md"), table + "\n")
        plot(result, out.with_suffix(".png"))
        log(f"wrote {out.with_suffix('.json')}, .md and .png")
    return result


def _measure(bc: BenchConfig, log: Callable[[str], None]) -> dict:
    t0 = time.time()
    info = {**device_info(), "torch": torch_version(), "load_at_start": load_average(),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}
    result: dict[str, Any] = {"device": info, "config": dataclasses.asdict(bc), "rows": []}
    bw = None
    if "bandwidth" in bc.parts:
        log("memory bandwidth ...")
        result["bandwidth"] = memory_bandwidth()
        bw = result["bandwidth"]["roofline_GBps"] = roofline_bandwidth(result["bandwidth"])
    for part, bench_part in (("train", bench_train), ("compile", bench_compile)):
        if part in bc.parts:
            result["rows"] += bench_part(bc, log)
    if "decode" in bc.parts:
        if bw is not None and ("train" in bc.parts or "compile" in bc.parts):
            log("memory bandwidth again, next to the decode measurements ...")
            again = result["bandwidth"]["before_decode"] = memory_bandwidth()
            bw = result["bandwidth"]["roofline_GBps"] = roofline_bandwidth(result["bandwidth"], again)
        result["rows"] += bench_decode(bc, bw, log)
    info.update(load_at_end=load_average(), wall_s=round(time.time() - t0, 1),
                rss_peak_MB=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    return result


_PROBES = {"--compile-probe": _compile_probe, "--torch-train-probe": _torch_train_probe}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in _PROBES:
        print(json.dumps(_PROBES[argv[0]](json.loads(argv[1]))))
        return 0
    print("python -m gptjax.bench runs the benchmark's subprocess probes; run the benchmark with `gptjax bench`",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
