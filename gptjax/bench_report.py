"""The benchmark's report: markdown tables and a bar chart of a `gptjax.bench.run` result."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from gptjax import runs


def format_table(result: dict) -> str:
    """Markdown tables: device line, then train / compile / decode rows."""
    d = result["device"]
    lines = [f"device: {d['platform']} {d['device_kind']} ({d['cpu']}, {d['host_cpus']} host CPUs); "
             f"jax {d['jax']}, jaxlib {d.get('jaxlib')}, flax {d.get('flax')}, torch {d.get('torch')}; "
             f"load avg {d.get('load_at_start')} -> {d.get('load_at_end')}; XLA_FLAGS={d.get('xla_flags') or '-'}"
             + (f"; GLIBC_TUNABLES={d['glibc_tunables']}" if d.get("glibc_tunables") else "")]
    if "bandwidth" in result:
        b = result["bandwidth"]
        measured = [b] + ([b["before_decode"]] if "before_decode" in b else [])
        seen = "; ".join(f"read {m['read_GBps']} (best {m.get('read_best_GBps')}), copy {m['copy_GBps']} "
                         f"(best {m.get('copy_best_GBps')})" for m in measured)
        lines.append(f"memory bandwidth, GB/s, median (best) of 8: {seen}; copy counts read+write; "
                     f"decode roofline uses the best read rate, {b['roofline_GBps']} GB/s")
    cols = {
        "train": ["framework", "variant", "batch", "T", "dtype", "compile_s", "step_ms", "step_ms_min", "tokens_per_s",
                  "achieved_GFLOPs", "mfu", "xla_memory_MB", "peak_memory_MB", "vs_pytorch_best", "gptjax_over_this"],
        "compile": ["variant", "cache", "lower_s", "compile_s", "lower_plus_compile_s"],
        "decode": ["framework", "variant", "batch", "new_tokens", "tokens_per_s", "roofline_fraction", "vs_no_cache",
                   "vs_pytorch"],
    }
    for part, keys in cols.items():
        rows = [r for r in result["rows"] if r["part"] == part and "error" not in r and "variant" in r
                and not r["variant"].startswith("compilations")]
        if not rows:
            continue
        lines += ["", f"### {part}", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |" for r in rows]
    for r in result["rows"]:
        if r.get("variant") == "compilations in a run":
            lines.append(f"\ncompilations in a training loop of {r['loop_steps']} steps with evals: train_step "
                         f"{r['train_step_programs']}, eval_step {r['eval_step_programs']} program(s); "
                         f"{r['xla_compiles_in_loop']} XLA compiles + {r['cache_loads_in_loop']} persistent-cache "
                         f"loads in the loop (all programs, small ones included)")
        elif "error" in r:
            lines.append(f"\n{r['framework']} {r.get('variant', '')}: {r['error']}")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 10 else f"{v:,.1f}"
    return str(v)


def plot(result: dict, path: str | Path) -> None:
    """Bar charts of tokens/s: training rows and decode rows, each bar labelled."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [p for p in ("train", "decode") if any(r["part"] == p and r.get("tokens_per_s") for r in result["rows"])]
    if not parts:
        return
    fig, axes = plt.subplots(1, len(parts), figsize=(6.5 * len(parts), 4), squeeze=False)
    for ax, part in zip(axes[0], parts):
        rows = [r for r in result["rows"] if r["part"] == part and r.get("tokens_per_s")]
        labels = [f"{r['framework']} {r['variant'][:28]}" + (f"\nB={r['batch']}" if part == "decode" else "") for r in rows]
        colors = ["tab:blue" if r["framework"] == "gptjax" else "tab:orange" for r in rows]
        vals = [r["tokens_per_s"] for r in rows]
        ax.barh(range(len(rows)), vals, color=colors)
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log" if part == "decode" else "linear")
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:,.1f}", va="center", fontsize=7)
        ax.set_xlabel("tokens/s")
        ax.set_title(f"{part} ({result['device']['device_kind']})", fontsize=9)
    fig.tight_layout()
    runs.write_atomic(path, lambda tmp: fig.savefig(tmp, format=Path(path).suffix[1:], dpi=110))
    plt.close(fig)
