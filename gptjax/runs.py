"""Run directories: creating them, atomic and JSONL files, and the book's loss plots.

A run directory (`--out RUN`) holds config.json (what the run is: model, task and train settings),
checkpoints/ (gptjax.checkpoint), params/ (the final model), metrics.jsonl (one record per
evaluation), steps.jsonl (one per step), samples.json and the plots. A live run holds an advisory
lock on its directory (`.lock`, which the kernel drops when the process ends, however it ends), and
config.json's "status" says how it ended: running, finished, interrupted, diverged or failed.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import inspect
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

LOCK_FILE = ".lock"
_held: dict[Path, int] = {}  # run directories this process holds: their lock files' descriptors


class RunLockedError(RuntimeError):
    """Another live process holds the run directory."""


def check_not_running(out_dir: str | Path) -> None:
    """Raise RunLockedError, naming its process id, when another live process holds `out_dir` (takes nothing)."""
    path = Path(out_dir) / LOCK_FILE
    if Path(out_dir).resolve() in _held or not path.is_file():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
        raise RunLockedError(f"{str(out_dir)!r} is in use by a live run (process {pid}); wait for it to finish or "
                             f"stop it (kill -INT {pid} saves a checkpoint), or choose another --out") from None
    finally:
        os.close(fd)


def lock_run_dir(out_dir: str | Path) -> None:
    """Hold `out_dir` for this process until `release_run_dir` (or the process's end, however it ends)."""
    key = Path(out_dir).resolve()
    if key in _held:
        return
    fd = os.open(key / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        check_not_running(out_dir)  # names the holder's process id
        raise RunLockedError(f"{str(out_dir)!r} is in use by another run; choose another --out") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _held[key] = fd


def release_run_dir(out_dir: str | Path) -> None:
    fd = _held.pop(Path(out_dir).resolve(), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def check_output(out: str | Path, inputs: Sequence[str | Path | None], *, directory: bool = False,
                 overwrite: bool = False) -> Path:
    """`out`, checked before anything is written: one clear error when it is one of the command's `inputs` (for
    a `directory` output, also one inside the other) or, unless `overwrite`, an existing file or non-empty directory."""
    target = Path(out).resolve()
    for source in (i for i in inputs if i is not None):
        s = Path(source).resolve()
        if target == s or (directory and (s in target.parents or target in s.parents)):
            raise ValueError(f"--out {str(out)!r} would overwrite the input {str(source)!r}; choose another --out")
    if not overwrite and (target.is_file() or (directory and target.is_dir() and any(target.iterdir()))):
        raise FileExistsError(f"--out {str(out)!r} already exists; pass --overwrite to replace it, or choose "
                              f"another --out")
    return Path(out)


def run_task(fn: Callable) -> Callable:
    """Decorates a task's entry point (its `out_dir` argument is the run directory): the lock the task takes
    (`prepare_out_dir`) is released when it returns or raises, and a run that raises records how it ended."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def task(*args, **kwargs):
        out_dir = Path(signature.bind(*args, **kwargs).arguments["out_dir"])
        held_before = out_dir.resolve() in _held
        try:
            return fn(*args, **kwargs)
        except BaseException as e:
            if out_dir.resolve() in _held:  # this run wrote the directory (TrainingInterrupted is a KeyboardInterrupt)
                set_status(out_dir, "interrupted" if isinstance(e, KeyboardInterrupt) else
                           "diverged" if isinstance(e, FloatingPointError) else "failed")
            raise
        finally:
            if not held_before:
                release_run_dir(out_dir)
    return task


def set_status(out_dir: str | Path, status: str, *, resumed: bool = False) -> None:
    """Record `status` in a running run's config.json (a finished one keeps "finished"); `resumed`: a run that
    ended before and runs again (its status whatever it was)."""
    path = Path(out_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if isinstance(config, dict) and (resumed or config.get("status") == "running"):
        write_json_atomic(path, {**config, "status": status})


def prepare_out_dir(out_dir: str | Path) -> Path:
    """Create `out_dir` (and parents), check that it is writable (one clear error naming --out) and take
    its lock for this run (RunLockedError when another live process holds it)."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"cannot write to output directory {str(out_dir)!r} ({e.strerror}); "
                              f"choose another --out directory") from None
    lock_run_dir(out_dir)
    return out_dir


def write_atomic(path: str | Path, write: Callable[[Path], Any], mode: int = 0o644) -> Path:
    """`write(tmp)` to a fresh `.NAME.*.tmp` next to `path`, synced to disk, then renamed over `path`: a kill
    never leaves `path` half-written, and a failing write leaves nothing behind. `mode`: the file's permissions."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def write_json_atomic(path: str | Path, obj: Any, indent: int = 1) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent))


def read_json_object(path: str | Path, fix: str) -> dict:
    """The JSON object in `path`; an empty, non-JSON or non-object file is one error naming it and `fix`."""
    text = Path(path).read_text(errors="replace")
    try:
        obj = json.loads(text)
    except ValueError as e:
        obj = e
    if not isinstance(obj, dict):
        why = ("it is empty" if not text.strip() else f"not JSON: {obj}" if isinstance(obj, ValueError)
               else f"a JSON {type(obj).__name__}, not an object")
        raise ValueError(f"{path} is damaged ({why}); {fix}")
    return obj


def data_sha256(data: Any) -> str:
    """sha256 of `data` (records, texts, labels) as canonical JSON: what a resume checks it trains on again."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def tree_sha256(tree: Any) -> str:
    """sha256 of a pytree of arrays (each leaf's path, dtype, shape and bytes): the identity of a base model's
    weights, whatever file or name they were loaded from."""
    import jax  # here, not at the top: token-shard workers import runs (through gptjax.shards) and stay jax-free

    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(tree), key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)} {a.dtype} {a.shape};".encode())
        h.update(a.view(np.uint8).reshape(-1))
    return h.hexdigest()


def check_resume_inputs(out_dir: str | Path, header: dict[str, Any]) -> None:
    """A resume trains on what the run started with: the data_sha256 and base_model that the sections of `header`
    (the config.json a new run would write) hold must be those the run's config.json recorded."""
    path = Path(out_dir) / "config.json"
    if not path.is_file():  # no run there: the resume's own error says so
        return
    saved, changed = read_json_object(path, "it should hold the run's settings"), []
    for section, now in header.items():
        was = saved.get(section)
        if not (isinstance(now, dict) and isinstance(was, dict)):
            continue
        a, b = now.get("data_sha256"), was.get("data_sha256")
        if a and b and a != b:
            changed.append(f"the data differs from what it was trained on (sha256 {a[:12]}... vs {b[:12]}...)")
        a, b = now.get("base_model"), was.get("base_model")
        sha, sha_was = now.get("base_sha256"), was.get("base_sha256")
        if sha and sha_was and sha != sha_was:
            changed.append(f"the base model's weights differ from those it was trained from ({a!r}, sha256 "
                           f"{sha[:12]}... vs {sha_was[:12]}...)")
        elif a and b and a != b and not (sha and sha == sha_was) and not (
                Path(a).exists() and Path(a).resolve() == Path(b).resolve()):
            changed.append(f"the base model is {a!r} but it was trained from {b!r}")
    if changed:
        raise ValueError(f"cannot resume {str(out_dir)!r}: {'; '.join(changed)}. Resume with the original data and "
                         f"base model (--data, --model), or start a new run with another --out (or --overwrite)")


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSONL file; a last line that a kill cut short is left out."""
    path = Path(path)
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []
    try:
        return [json.loads(ln) for ln in lines]
    except ValueError:
        return [json.loads(ln) for ln in lines[:-1]]  # damage elsewhere is no kill's: it raises


def truncate_jsonl(path: str | Path, steps_done: int) -> None:
    """Drop the records of steps after a checkpoint (a resume writes them again), atomically."""
    path = Path(path)
    if path.is_file():
        keep = [r for r in read_jsonl(path) if r.get("step", -1) < steps_done]
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in keep))


def plot_curves(x: Sequence[float], curves: dict[str, Sequence[float]], path: str | Path, *, xlabel: str = "Steps",
                ylabel: str = "Loss", twin: tuple[Sequence[float], str] | None = None) -> None:
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
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format=Path(path).suffix[1:], dpi=100))
    plt.close(fig)


def plot_history(history: dict, path: str | Path, keys: Sequence[tuple[str, str]] = (
        ("train_loss", "Training loss"), ("val_loss", "Validation loss")), ylabel: str = "Loss") -> None:
    """Metrics of a run's eval records against steps, tokens seen on a twin x-axis."""
    curves = {label: history[k] for k, label in keys if k in history}
    plot_curves(history["step"], curves, path, ylabel=ylabel,
                twin=(history["tokens_seen"], "Tokens seen") if history.get("tokens_seen") else None)
