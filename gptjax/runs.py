"""Run directories: creating them, atomic and JSONL files, and the book's loss plots.

A run directory (`--out RUN`) holds config.json (what the run is: model, task and train settings),
checkpoints/ (gptjax.checkpoint), params/ (the final model), metrics.jsonl (one record per
evaluation), steps.jsonl (one per step), samples.json and the plots.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence


def prepare_out_dir(out_dir: str | Path) -> Path:
    """Create `out_dir` (and parents) and check that it is writable: one clear error naming --out."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"cannot write to output directory {str(out_dir)!r} ({e.strerror}); "
                              f"choose another --out directory") from None
    return out_dir


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write next to `path` and rename it over: a crash never leaves a half-written file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: str | Path, obj: Any, indent: int = 1) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent))


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []


def truncate_jsonl(path: str | Path, steps_done: int) -> None:
    """Drop the records of steps after a checkpoint (a resume writes them again), atomically."""
    path = Path(path)
    if path.is_file():
        keep = [ln for ln in path.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("step", -1) < steps_done]
        write_text_atomic(path, "".join(ln + "\n" for ln in keep))


def plot_curves(x: Sequence[float], curves: dict[str, Sequence[float]], path: str | Path, *, xlabel: str = "Steps",
                ylabel: str = "Loss", twin: tuple[Sequence[float], str] | None = None, title: str | None = None) -> None:
    """The book's plot_losses / plot_values: curves against `x`, with a second x-axis (`twin`: values
    and label, e.g. tokens or examples seen) on top."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax1 = plt.subplots(figsize=(5, 3))
    for (label, ys), style in zip(curves.items(), ("-", "-.", "--", ":")):
        ax1.plot(x, ys, linestyle=style, label=label)
    ax1.set_xlabel(xlabel)
    ax1.set_ylabel(ylabel)
    ax1.legend(loc="best")
    if twin is not None and len(twin[0]):
        ax2 = ax1.twiny()
        ax2.plot(twin[0], next(iter(curves.values())), alpha=0)
        ax2.set_xlabel(twin[1])
    if title:
        ax1.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_history(history: dict, path: str | Path, keys: Sequence[tuple[str, str]] = (
        ("train_loss", "Training loss"), ("val_loss", "Validation loss")), ylabel: str = "Loss",
        title: str | None = None) -> None:
    """Metrics of a run's eval records against steps, tokens seen on a twin x-axis."""
    curves = {label: history[k] for k, label in keys if k in history}
    plot_curves(history["step"], curves, path, ylabel=ylabel, title=title,
                twin=(history["tokens_seen"], "Tokens seen") if history.get("tokens_seen") else None)
