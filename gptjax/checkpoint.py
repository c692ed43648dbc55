"""Orbax checkpoints of a run (its `checkpoints/` folder: one folder per step, params/ train_state/ meta/)
and the guards that keep a run safe. Everything works on any pytree, so a fine-tuning loop with its own step
function reuses `TrainCheckpoints` (save/restore/keep-best), `GracefulStop` (SIGINT/SIGTERM) and `all_finite`."""
from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import re
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from gptjax.runtime import release_free_memory


def _not_printed_yet(record: logging.LogRecord) -> bool:
    """A logging filter: True when no logger between the record's own and the root has a handler of its own."""
    logger = logging.getLogger(record.name)
    while logger.parent is not None and not logger.handlers:
        logger = logger.parent
    return logger.parent is None


# Orbax logs through absl while it is imported, and absl's first log call runs logging.basicConfig(): a
# root handler that printed every warning a second time after the library's own handler (huggingface_hub's).
for _handler in logging.root.handlers:
    if type(_handler) is logging.StreamHandler and getattr(_handler.formatter, "_fmt", None) == logging.BASIC_FORMAT:
        _handler.addFilter(_not_printed_yet)

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
CHECKPOINTS_DIR = "checkpoints"
_TRASH = "trash"  # Orbax moves dropped steps here first, so a kill mid-delete never leaves half a step
# GPTConfig keys that decide what the params are (drop_rate and init do not)
SHAPE_KEYS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "qkv_bias", "tie_embeddings",
              "n_classes")


class CheckpointMismatchError(ValueError):
    """A checkpoint written for another model or run settings."""


class CheckpointCorruptError(ValueError):
    """A checkpoint folder that exists but cannot be read back."""


class CheckpointSaveError(OSError):
    """Writing a checkpoint failed (disk full, permissions, ...); memory state and older checkpoints are intact."""

    def __init__(self, err: int | None, message: str, step: int | None = None, state: Any = None):
        super().__init__(err, message)
        self.message, self.step, self.state = message, step, state

    def __str__(self) -> str:
        return self.message


class RunExistsError(FileExistsError):
    """`out_dir` already holds the checkpoints of another run."""


class TrainingInterrupted(KeyboardInterrupt):
    """Raised after a stop request (SIGINT/SIGTERM) once the step finished and a checkpoint is on disk."""

    def __init__(self, message: str, *, signum: int | None, step: int, checkpoint: Path | None, state: Any = None):
        super().__init__(message)
        self.message, self.signum, self.step, self.checkpoint, self.state = message, signum, step, checkpoint, state

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal number (130 for Ctrl-C)."""
        return 128 + (self.signum or signal.SIGINT)


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def all_finite(tree) -> bool:
    """True when no floating leaf of `tree` holds a NaN or an infinity (one host sync). Arrays in host
    memory (numpy, or jax on one CPU device) are checked where they are: their float64 sum is finite
    exactly when every value is (float32 values cannot overflow it), with no array-sized temporary."""
    on_host, on_device = [], []
    for x in jax.tree_util.tree_leaves(tree):
        if isinstance(x, jax.Array) and not (len(x.devices()) == 1 and next(iter(x.devices())).platform == "cpu"):
            on_device.append(x)
        elif np.issubdtype(x.dtype, np.inexact):
            on_host.append(np.asarray(x))  # a view of a CPU buffer, no copy
    return bool(_all_finite(on_device)) and all(math.isfinite(np.sum(x, dtype=np.float64)) for x in on_host)


@contextlib.contextmanager
def numpy_written_in_place():
    """Orbax deep-copies the numpy arrays it saves, as they could change during a background save; a
    synchronous save (of views of the training state, `engine.Steps.saved(host=True)`) needs no copy."""
    handlers, absl_log = ocp.type_handlers, logging.getLogger("absl")
    before, level = handlers.get_type_handler(np.ndarray), absl_log.level
    absl_log.setLevel(logging.ERROR)  # Orbax warns at every override of a handler
    try:
        handlers.register_type_handler(np.ndarray, handlers.NumpyHandler(deepcopy_host_arrays=False), override=True)
        yield
    finally:
        handlers.register_type_handler(np.ndarray, before, override=True)
        absl_log.setLevel(level)


class GracefulStop:
    """Context manager: SIGINT/SIGTERM set `.signum` instead of killing, so a loop stops at a step boundary.
    A second signal raises KeyboardInterrupt at once (the checkpoint being written is then dropped, and the
    previous one stays restorable). Outside the main thread it installs nothing and never fires."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "stop request"

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping without a checkpoint")
        self.signum = signum
        print(f"\ngptjax: got {signal.Signals(signum).name}; finishing the current step and saving a checkpoint "
              f"(send it again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


def short_error(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text[:300]}"


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def config_diff(saved: dict, want: dict) -> list[str]:
    """Differences `key is A in the checkpoint but B here` over the keys of `want` (nested keys dotted)."""
    saved, want = _flat(saved), _flat(want)
    return [f"{k} is {saved.get(k)!r} in the checkpoint but {want[k]!r} here" for k in sorted(want)
            if saved.get(k) != want[k]]


class TrainCheckpoints:
    """Orbax CheckpointManager for one run: per step `params`, `train_state` (any pytree) and JSON `meta`.
    Keeps the last `keep` steps plus, with `keep_best`, the one with the lowest validation loss. Saves are
    atomic (Orbax writes `<step>.orbax-checkpoint-tmp` and renames it): a kill mid-save leaves the previous
    step restorable, and a writer opening the directory removes what it left."""

    def __init__(self, directory: str | Path, *, keep: int = 2, keep_best: bool = True, async_save: bool = True,
                 read_only: bool = False):
        if keep < 1:
            raise ValueError(f"keep must be >= 1 checkpoint, got {keep!r}")
        self.directory = Path(directory).absolute()
        self.keep_best, self.async_save, self.read_only = keep_best, async_save, read_only
        if read_only and not self.directory.is_dir():
            raise FileNotFoundError(f"no checkpoints at {str(self.directory)!r} (no such directory); pass the --out "
                                    f"directory of a `gptjax pretrain` run")
        pp = ocp.checkpoint_managers
        best = pp.BestN(get_metric_fn=_val_loss, reverse=True, n=1, keep_checkpoints_without_metrics=False)
        options = ocp.CheckpointManagerOptions(
            read_only=read_only, create=not read_only, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only, todelete_subdir=None if read_only else _TRASH,
            preservation_policy=pp.AnyPreservationPolicy([pp.LatestN(n=keep)] + ([best] if keep_best else [])),
            # best_fn also makes Orbax write the metrics, so best survives a restart
            best_fn=_val_loss if keep_best else None, best_mode="min")
        self._pending: int | None = None
        if not read_only:  # what a kill left half-written, gone before this returns
            for child in self.directory.glob("*.orbax-checkpoint-tmp*"):
                shutil.rmtree(child, ignore_errors=True)
        self._mgr = ocp.CheckpointManager(self.directory, options=options, item_names=("params", "train_state", "meta"))
        self._empty_trash()

    def steps(self) -> list[int]:
        return list(self._mgr.all_steps())

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def best_step(self) -> int | None:
        return self._mgr.best_step() if self.keep_best else self.latest_step()

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def describe(self, step: int | None) -> str:
        return "none yet" if step is None else f"{self.step_dir(step)} (after {step} steps)"

    def save(self, step: int, params: Any, train_state: Any, meta: dict, val_loss: float | None = None) -> Path:
        """Start writing `step` (async when enabled); raises CheckpointSaveError, never half-writes a step."""
        if not all_finite((params, train_state)):
            raise FloatingPointError(f"refusing to checkpoint step {step}: the parameters or optimizer state hold "
                                     f"NaN/inf; the last good checkpoint is {self.describe(self.latest_step())}")
        metrics = {"val_loss": float(val_loss) if val_loss is not None and math.isfinite(val_loss) else 1e30}
        self.check()  # a failed background save surfaces here, before the next one starts
        self._empty_trash()  # the steps the last save retired: retention holds during the run, not only at its end
        if step in self._mgr.all_steps():
            return self.step_dir(step)
        if not self.async_save:
            release_free_memory()  # the last step's temporaries (finished: the check above waited for it)
        try:
            self._pending = step
            with contextlib.nullcontext() if self.async_save else numpy_written_in_place():
                self._mgr.save(step, metrics=metrics, force=True, args=ocp.args.Composite(
                    params=ocp.args.StandardSave(params), train_state=ocp.args.StandardSave(train_state),
                    meta=ocp.args.JsonSave(meta)))
        except Exception as e:
            raise self._save_error(e, step) from e
        if not self.async_save:
            self._empty_trash()
            release_free_memory()  # what the write's buffers held goes back before training goes on
        return self.step_dir(step)

    def check(self) -> None:
        """Re-raise, as CheckpointSaveError, the failure of a background save."""
        try:
            self._mgr.check_for_errors()
        except Exception as e:
            raise self._save_error(e, self._pending) from e

    def wait(self) -> None:
        """Block until the background save is on disk (raises CheckpointSaveError if it failed)."""
        try:
            self._mgr.wait_until_finished()
        except Exception as e:
            raise self._save_error(e, self._pending) from e
        self._pending = None
        self._empty_trash()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._mgr.close()

    def _save_error(self, e: BaseException, step: int | None) -> CheckpointSaveError:
        if isinstance(e, CheckpointSaveError):
            return e
        self._pending = None
        with contextlib.suppress(Exception):
            self._mgr.wait_until_finished()  # an earlier background save may still be committing
        self._mgr.reload()  # forget the step that did not commit
        m = re.search(r"os_error_code='?(\d+)", str(e))  # tensorstore reports OS errors inside a ValueError
        err = e.errno if isinstance(e, OSError) and e.errno else int(m.group(1)) if m else None
        reason = f"[Errno {err}] {os.strerror(err)}" if err else short_error(e)
        hint = {errno.ENOSPC: "free some disk space", errno.EDQUOT: "free some disk space",
                errno.EFBIG: "free some disk space or raise the file-size limit (ulimit -f)",
                errno.EACCES: "make it writable", errno.EPERM: "make it writable",
                errno.EROFS: "use a writable file system"}.get(err, "check the disk")
        return CheckpointSaveError(
            err, f"could not write checkpoint {step} to {self.directory}: {reason}. Training state in memory is "
                 f"intact and older checkpoints are untouched (latest complete: {self.describe(self.latest_step())}); "
                 f"{hint}, then resume from the latest complete checkpoint", step=step)

    def _empty_trash(self) -> None:
        if not self.read_only:
            for child in (self.directory / _TRASH).glob("*"):
                shutil.rmtree(child, ignore_errors=True)

    def delete_after(self, step: int) -> None:
        """Drop the checkpoints of steps after `step` (a resume from `step` writes its own)."""
        for s in self.steps():
            if s > step:
                print(f"deleting checkpoint {self.step_dir(s)}: the run continues from step {step}")
                self._mgr.delete(s)
        self._empty_trash()

    def delete_all(self) -> None:
        self.wait()
        for step in self.steps():
            self._mgr.delete(step)
        self._mgr.reload()
        self._empty_trash()

    def _resolve(self, step: int | str | None) -> int:
        steps = self.steps()
        if not steps:
            raise FileNotFoundError(f"no complete checkpoint in {str(self.directory)!r}; the run saved none yet "
                                    f"(unfinished saves are ignored). Start it again without --resume")
        if step is None or step == "latest":
            return steps[-1]
        if step == "best":
            return self.best_step()
        if int(step) not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in {str(self.directory)!r}; "
                                    f"available steps: {steps}")
        return int(step)

    def _restore(self, step: int, **args) -> dict:
        try:
            return self._mgr.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:
            others = [s for s in self.steps() if s != step]
            fallback = f", or resume from an older one with --step N ({others})" if others else ""
            raise CheckpointCorruptError(
                f"checkpoint {self.step_dir(step)} is damaged or incomplete and cannot be read ({short_error(e)}). "
                f"Delete that folder{fallback}") from None

    def meta(self, step: int | str | None = None) -> dict:
        return self._restore(self._resolve(step), meta=ocp.args.JsonRestore())["meta"]

    def restore(self, params_target: Any, train_state_target: Any = None, step: int | str | None = None,
                expect: dict | None = None) -> tuple[Any, Any, dict]:
        """(params, train_state, meta) of `step` (default latest) into the targets' structure. `expect` maps
        meta keys to the values this run needs (e.g. {"model": cfg.to_dict()}); a difference raises
        CheckpointMismatchError naming every key that differs."""
        step = self._resolve(step)
        meta = self.meta(step)
        for key, want in (expect or {}).items():
            diff = config_diff(meta.get(key) or {}, want) if isinstance(want, dict) else (
                [] if meta.get(key) == want else [f"{key} is {meta.get(key)!r} in the checkpoint but {want!r} here"])
            if diff:
                raise CheckpointMismatchError(
                    f"checkpoint {self.step_dir(step)} was written with other {key} settings: {'; '.join(diff)}. "
                    f"Restore it with the settings stored in the run's {CONFIG_FILE} (gptjax pretrain --resume "
                    f"RUN_DIR reads them), or start a new run in another directory")
        args = {"params": ocp.args.StandardRestore(params_target)}
        if train_state_target is not None:
            args["train_state"] = ocp.args.StandardRestore(train_state_target)
        out = self._restore(step, **args)
        return out["params"], out.get("train_state"), meta

    def restore_newest_intact(self, params_target: Any, train_state_target: Any, expect: dict) -> tuple[Any, Any, dict]:
        """`restore` of the newest checkpoint that reads back: a damaged newer one is passed over, and said so."""
        damaged = []
        for step in sorted(self.steps(), reverse=True):
            try:
                return self.restore(params_target, train_state_target, step=step, expect=expect)
            except CheckpointCorruptError as e:
                print(f"{e}; trying the checkpoint before it")
                damaged.append(step)
        self._resolve(None)  # no checkpoint at all: its own message
        raise CheckpointCorruptError(f"every checkpoint in {str(self.directory)!r} is damaged ({damaged}); start the "
                                     f"run again without --resume")


def _val_loss(metrics: dict) -> float:
    return metrics["val_loss"]
