"""The training engine: jitted steps built from a loss function, and the one run loop every task uses.

A task (pretraining, classification, SFT, DPO) supplies a `loss_fn(trainable, frozen, batch, key) -> (loss,
metrics)` (`trainable`: what the optimizer updates, all weights, the unfrozen part or LoRA adapters; `frozen`:
what it only reads), batches (`len()` per epoch and `batch_at(epoch, i)`, a pure function of the seed) and its
`Hooks` (eval values, validation loss, per-epoch sample). `Steps` turns the loss into `train_step(state, batch)
-> (state, metrics)` (state donated, optimizer and gradient accumulation from `OptimConfig`, dp/fsdp shardings
from a mesh); `run` owns the rest: the step or epoch budget, eval cadence, progress bar, JSONL metrics, Orbax
checkpoints (synchronous and copy-free by default, or async), exact resume, SIGINT/SIGTERM and the NaN guard.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from gptjax import runs, sharding, tracking
from gptjax.checkpoint import (CHECKPOINTS_DIR, CheckpointSaveError, GracefulStop, TrainCheckpoints,
                               TrainingInterrupted)
from gptjax.layout import map_param_trees
from gptjax.optim import OptimConfig, global_norm, make_optimizer
from gptjax.runtime import release_free_memory

IGNORE_INDEX = -100


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array, ignore_index: int = IGNORE_INDEX) -> jax.Array:
    """Mean token cross-entropy in float32, skipping `ignore_index` targets (PyTorch's semantics)."""
    valid_BT = targets_BT != ignore_index
    nll_BT = optax.softmax_cross_entropy_with_integer_labels(
        logits_BTV.astype(jnp.float32), jnp.where(valid_BT, targets_BT, 0))
    return jnp.sum(nll_BT * valid_BT) / jnp.maximum(jnp.sum(valid_BT), 1)


def perplexity(loss: float) -> float:
    return float(math.exp(min(loss, 700.0)))


@flax.struct.dataclass
class TrainState:
    step: jax.Array      # int32 scalar: optimizer updates done
    params: Any          # what trains
    opt_state: Any
    key: jax.Array       # raw uint32 PRNG key; dropout uses fold_in(key, step)


def new_state(params: Any, tx: optax.GradientTransformation, key: jax.Array) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), key=key)


# ----------------------------------------------------------------------------------------------- steps

LossFn = Callable[[Any, Any, Any, "jax.Array | None"], "tuple[jax.Array, dict]"]


def step_functions(loss_fn: LossFn, tx: optax.GradientTransformation, schedule: optax.Schedule | None = None,
                   constrain_grads: Callable | None = None):
    """The un-jitted `train_step(state, frozen, batch) -> (state, metrics)` and `eval_step(params, frozen, batch)`.

    Metrics: the loss function's own, plus the gradient's global norm and, with `schedule`, the learning
    rate. `constrain_grads` (a sharding constraint) applies to the gradients before the update.
    """
    def train_step(state: TrainState, frozen, batch):
        key = jax.random.fold_in(state.key, state.step)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, frozen, batch, key)
        if constrain_grads is not None:
            grads = constrain_grads(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**metrics, "loss": loss, "grad_norm": global_norm(grads)}
        if schedule is not None:
            metrics["lr"] = jnp.asarray(schedule(state.step))
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def eval_step(params, frozen, batch):
        loss, metrics = loss_fn(params, frozen, batch, None)
        return {**metrics, "loss": loss}

    return train_step, eval_step


@lru_cache(maxsize=16)
def _single_device_steps(loss_fn: LossFn, optim: OptimConfig):
    tx = make_optimizer(optim)
    train_fn, eval_fn = step_functions(loss_fn, tx, optim.logged_schedule())
    return tx, jax.jit(train_fn, donate_argnums=0), jax.jit(eval_fn)


class Steps:
    """Jitted `train_step(state, batch) -> (state, metrics)` and `eval_step(params, batch) -> metrics` of a loss.

    `params` is what trains (arrays or their shapes). `frozen` (weights the loss reads but does not train) is an
    argument of the compiled programs, never a constant baked into them, and is not donated. With a `mesh`,
    params, optimizer state and frozen weights are laid out by `strategy` ("dp" or "fsdp", see gptjax.sharding)
    and batches split over the batch axes. `layout` (`(to_saved, from_saved)`, e.g. gptjax.layout.layout_fns)
    converts what trains, and the optimizer state shaped like it, to and from the layout checkpoints hold.
    `share=False` compiles programs of its own (a benchmark timing the compile), not those runs share.
    """

    def __init__(self, loss_fn: LossFn, optim: OptimConfig, params: Any, *, frozen: Any = None,
                 mesh: jax.sharding.Mesh | None = None, strategy: str = "dp",
                 layout: tuple[Callable, Callable] | None = None, share: bool = True):
        self.optim, self.mesh, self.layout, self.frozen, self.shardings = optim, mesh, layout, frozen, None
        if mesh is None:  # one device: the programs are shared by every run of this loss and optimizer
            steps_for = _single_device_steps if share else _single_device_steps.__wrapped__
            self.tx, self.train_jit, self.eval_jit = steps_for(loss_fn, optim)
        else:
            self.tx = make_optimizer(optim)
        key = jax.ShapeDtypeStruct((2,), jnp.uint32)
        self.abstract = jax.eval_shape(lambda p, k: new_state(p, self.tx, k), params, key)
        if mesh is None:
            return
        self.shardings = sharding.state_shardings(self.abstract, mesh, strategy)
        frozen_sharding = sharding.tree_shardings(frozen, mesh, strategy)
        self.frozen = jax.device_put(frozen, frozen_sharding)
        params_sharding = self.shardings.params
        # under FSDP the constraint makes the gradient reduction a reduce-scatter into each device's shard
        train_fn, eval_fn = step_functions(loss_fn, self.tx, optim.logged_schedule(),
                                           lambda g: jax.lax.with_sharding_constraint(g, params_sharding))
        batch, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
        self.train_jit = jax.jit(train_fn, in_shardings=(self.shardings, frozen_sharding, batch),
                                 out_shardings=(self.shardings, replicated), donate_argnums=0)
        self.eval_jit = jax.jit(eval_fn, in_shardings=(params_sharding, frozen_sharding, batch),
                                out_shardings=replicated)

    def init_state(self, params: Any, key: jax.Array) -> TrainState:
        """A fresh state with PRNG key `key`. `params`: arrays (copied, since the first step donates the
        state) or a function `() -> params`, which on a mesh runs sharded: each device draws only its shard."""
        if self.mesh is None:
            params = params() if callable(params) else jax.tree_util.tree_map(jnp.copy, params)
            return new_state(params, self.tx, key)
        if callable(params):
            return self.sharded_init(params)(key)
        params = jax.device_put(params, self.shardings.params)
        return jax.jit(lambda p, k: new_state(p, self.tx, k), out_shardings=self.shardings)(params, key)

    def sharded_init(self, params_fn: Callable[[], Any]):
        """The jitted `key -> state` that draws `params_fn()` straight into this mesh's shards."""
        return jax.jit(lambda k: new_state(params_fn(), self.tx, k), out_shardings=self.shardings)

    def restore_target(self) -> TrainState:
        """ShapeDtypeStructs (with this mesh's shardings) of the state: what a checkpoint restores into."""
        return self.abstract if self.shardings is None else sharding.with_shardings(self.abstract, self.shardings)

    def saved(self, state: TrainState, host: bool = False) -> tuple[Any, dict]:
        """(params, rest of the state) as a checkpoint holds them: in the saved layout. `host` (one device):
        as numpy views of the state's buffers, laid out by views too, so on CPU the conversion copies
        nothing; only for a save that is done before the next step reuses those buffers."""
        rest = {"step": state.step, "opt_state": state.opt_state, "key": state.key}
        if self.layout is None:
            return state.params, rest
        params, opt_state = state.params, state.opt_state
        if host and self.mesh is None:
            params, opt_state = jax.tree_util.tree_map(np.asarray, (params, opt_state))
        to = self.layout[0]
        return to(params), {**rest, "opt_state": map_param_trees(to, opt_state, params)}

    def saved_target(self) -> tuple[Any, dict]:
        """Shapes of `saved(state)`: what a checkpoint restores into."""
        target = self.restore_target()
        return jax.eval_shape(self.saved, target) if self.layout is not None else self.saved(target)

    def restored(self, params: Any, rest: dict) -> TrainState:
        """The state from what `saved` gave, laid out (and placed on the mesh) for these steps."""
        if self.layout is None:
            return TrainState(params=params, **rest)
        fro = self.layout[1]
        state = TrainState(params=fro(params), **{**rest, "opt_state": map_param_trees(fro, rest["opt_state"], params)})
        return state if self.shardings is None else jax.device_put(state, self.shardings)

    def lower(self, state: TrainState, batch):
        """The train step lowered for `state` and `batch` (arrays or shapes): for AOT compiles and cost analysis."""
        return self.train_jit.lower(state, self.frozen, batch)

    def _batch(self, batch):
        return batch if self.mesh is None else sharding.shard_batch(batch, self.mesh)

    def train_step(self, state: TrainState, batch) -> tuple[TrainState, dict]:
        return self.train_jit(state, self.frozen, self._batch(batch))

    def eval_step(self, params: Any, batch) -> dict:
        return self.eval_jit(params, self.frozen, self._batch(batch))


def mean_metrics(steps: Steps, params: Any, batches, num_batches: int | None = None) -> dict[str, float]:
    """The book's calc_loss_loader for every metric: the mean of per-batch values over the first batches."""
    vals = [steps.eval_step(params, batch) for batch in itertools.islice(batches, num_batches)]
    if not vals:
        return {}
    return {k: float(jnp.mean(jnp.stack([v[k] for v in vals]))) for k in vals[0]}


# ------------------------------------------------------------------------------------------- the loop

@dataclass
class TrainConfig:
    """What every run loop needs; tasks subclass it for their defaults and their own settings."""
    epochs: int = 10
    batch_size: int = 2
    eval_freq: int = 5
    eval_iter: int = 5
    seed: int = 123
    optim: OptimConfig = field(default_factory=OptimConfig)
    # checkpoints: always at the end of the run and when it is stopped (SIGINT/SIGTERM); in between every
    # `save_every` steps (0: at the end of every epoch), or with save_every None every `save_minutes`
    save_every: int | None = None
    save_minutes: float = 30.0     # with save_every None: minutes of training between checkpoints (0: none)
    keep_checkpoints: int = 2      # the last K checkpoints, plus the best by validation loss
    async_checkpoint: bool = False  # write in the background (costs a copy of the state in memory)
    sample_tokens: int = 50        # tokens of the greedy sample after each epoch (0: none)
    tracker: str = "none"          # also log the metrics to: none, tensorboard, wandb (gptjax.tracking)

    def __post_init__(self):
        for name in ("epochs", "batch_size", "eval_freq", "eval_iter", "keep_checkpoints"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.save_every is not None and (not isinstance(self.save_every, int) or self.save_every < 0):
            raise ValueError(f"save_every must be None or an integer >= 0 (0 = every epoch), got {self.save_every!r}")
        if not (isinstance(self.save_minutes, (int, float)) and self.save_minutes >= 0):
            raise ValueError(f"save_minutes must be >= 0 (0 = no timed checkpoints), got {self.save_minutes!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if self.sample_tokens < 0:
            raise ValueError(f"sample_tokens must be >= 0 (0 = no sample), got {self.sample_tokens!r}")
        if self.tracker not in tracking.TRACKERS:
            raise ValueError(f"tracker must be one of {tracking.TRACKERS}, got {self.tracker!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        fields_ = {f.name for f in fields(cls)}
        if unknown := set(d) - fields_:
            raise ValueError(f"unknown {cls.__name__} keys {sorted(unknown)}; valid keys: {sorted(fields_)}")
        return cls(**{**d, "optim": OptimConfig(**d.get("optim", {}))})


# settings that only say how checkpoints and logs are written; a resume may change them
CHECKPOINT_KEYS = ("save_every", "save_minutes", "keep_checkpoints", "async_checkpoint", "tracker")
# keys of an eval record copied from its step's own metrics (the tracker has them from the step already)
_FROM_STEP = ("batch_loss", "lr", "grad_norm")


@dataclass
class Hooks:
    """What a task adds to the loop.
    - `evaluate(params, step)`: the eval record's values, "train_loss" and "val_loss" among them;
    - `validate(params)`: the validation loss alone (the best checkpoint is chosen by it);
    - `count(batch)`: the tokens or examples a batch adds to the run's count;
    - `sample(params)`: a text after each epoch; `on_epoch_end(params, step)`: values logged at each
      epoch end (kept apart, in `epoch_history`); `line(rec)`: the progress line of an eval record.
    """
    evaluate: Callable[[Any, int], dict]
    validate: Callable[[Any], float]
    count: Callable[[Any], int]
    sample: Callable[[Any], str] | None = None
    on_epoch_end: Callable[[Any, int], dict] | None = None
    line: Callable[[dict], str] | None = None
    count_name: str = "tokens_seen"  # what `count` counts, as the logs name it


def _default_line(rec: dict) -> str:
    return f"Ep {rec['epoch']} (Step {rec['step']:06d}): " + ", ".join(
        f"{k.replace('_', ' ')} {v:.3f}" for k, v in rec.items() if k.startswith(("train_", "val_")))


class _Log:
    """The run's JSONL logs (and tracker) and in-memory history; per-step metrics stay on device until a flush."""

    def __init__(self, out_dir: Path, done: int, resume: bool, saved: dict | None, writer: tracking.Writer):
        paths = out_dir / "steps.jsonl", out_dir / "metrics.jsonl"
        if resume:
            for path in paths:  # drop what the run logged after its checkpoint
                runs.truncate_jsonl(path, done)
        saved = saved or {}
        self.history: dict[str, list] = saved.get("history", {})
        self.samples: list[dict] = saved.get("samples", [])
        self.epoch_history: dict[str, list] = saved.get("epoch_history", {})
        self.last: dict[str, float] = {}
        self.pending: list[tuple[int, int, dict]] = []
        self.slog, self.mlog = (path.open("a" if resume else "w") for path in paths)
        self.writer = writer

    def flush(self, diverged: Callable[[str, int], Exception]) -> None:
        """Pull the pending step metrics to the host; stop on the first non-finite one."""
        for (s, ep, _), m in zip(self.pending, jax.device_get([m for *_, m in self.pending])):
            rec = {"step": s, "epoch": ep, **{k: float(v) for k, v in m.items()}}
            for k in ("loss", "grad_norm"):
                if k in rec and not math.isfinite(rec[k]):
                    raise diverged(f"{'loss' if k == 'loss' else 'gradient norm'} became {rec[k]}", s)
            self.slog.write(json.dumps(rec) + "\n")
            self.writer.log(s, rec)
            self.last = rec
        self.slog.flush()
        self.pending.clear()

    def record(self, rec: dict, step: int, history: dict | None = None) -> None:
        self.mlog.write(json.dumps(rec) + "\n")
        self.mlog.flush()
        self.writer.log(step, {k: v for k, v in rec.items() if k not in _FROM_STEP})
        for k, v in rec.items():
            if k != "elapsed_s":  # wall time: a log value, not part of the run's (exactly resumable) history
                (self.history if history is None else history).setdefault(k, []).append(v)

    def close(self) -> None:
        for closable in (self.slog, self.mlog, self.writer):
            closable.close()


class _Loop:
    """The run loop's state between steps: counters, logs, checkpoints and what each point of a run does."""

    def __init__(self, steps: Steps, tcfg: TrainConfig, hooks: Hooks, ckpts: TrainCheckpoints, log: _Log,
                 expect: dict, n_batches: int, saved: dict | None):
        self.steps, self.tcfg, self.hooks, self.ckpts, self.log = steps, tcfg, hooks, ckpts, log
        self.expect, self.n_batches = expect, n_batches
        self.tokens_seen, self.wall_before = (saved or {}).get("tokens_seen", 0), (saved or {}).get("wall_s", 0.0)
        self.t0 = self.last_save = time.time()
        self.last_val = (-1, None)

    def save_due(self, done: int, i: int) -> bool:
        """Whether the cadence asks for a checkpoint after `done` steps (batch `i` of its epoch)."""
        every, minutes = self.tcfg.save_every, self.tcfg.save_minutes
        if every is None:
            return bool(minutes) and time.time() - self.last_save >= 60 * minutes
        return done % every == 0 if every else i == self.n_batches - 1

    def elapsed(self) -> float:
        return round(self.wall_before + time.time() - self.t0, 2)

    def diverged(self, what: str, s: int) -> FloatingPointError:
        return FloatingPointError(
            f"training diverged: {what} at step {s} (epoch {s // self.n_batches + 1}); nothing from that step on was "
            f"saved. The last good checkpoint is {self.ckpts.describe(self.ckpts.latest_step())}. Lower the learning "
            f"rate (--lr), add gradient clipping (--clip-norm 1.0) or a warmup, and train again")

    def evaluate(self, state: TrainState, step: int, epoch: int, bar) -> None:
        """An eval point: the task's values, with the step's own batch loss, lr and gradient norm."""
        self.log.flush(self.diverged)
        values = self.hooks.evaluate(state.params, step)
        if not math.isfinite(values["train_loss"]):
            raise self.diverged(f"the parameters became non-finite (their loss is {values['train_loss']})", step)
        self.last_val = (step + 1, values.get("val_loss"))
        rec = {"step": step, "epoch": epoch + 1, self.hooks.count_name: self.tokens_seen, **values,
               **{("batch_loss" if k == "loss" else k): v for k, v in self.log.last.items()
                  if k in ("loss", "lr", "grad_norm")}, "elapsed_s": self.elapsed()}
        self.log.record(rec, step)
        bar.set_postfix(train=f"{values['train_loss']:.3f}", val=f"{values.get('val_loss', 0):.3f}")
        bar.write((self.hooks.line or _default_line)(rec))

    def epoch_end(self, state: TrainState, step: int, epoch: int, bar) -> None:
        if self.hooks.sample is not None and self.tcfg.sample_tokens:
            self.log.samples.append({"epoch": epoch + 1, "text": self.hooks.sample(state.params)})
            bar.write(f"Ep {epoch + 1} sample: {self.log.samples[-1]['text']!r}")
        if self.hooks.on_epoch_end is not None:
            self.log.flush(self.diverged)
            # its step, so that a resume from an earlier checkpoint drops it from metrics.jsonl with the step records
            self.log.record({"step": step, "epoch": epoch + 1, **self.hooks.on_epoch_end(state.params, step),
                             self.hooks.count_name: self.tokens_seen, "elapsed_s": self.elapsed()},
                            step, self.log.epoch_history)

    def checkpoint(self, state: TrainState, step: int, epoch: int, i: int, wait: bool) -> Path:
        self.log.flush(self.diverged)
        done = step + 1
        val = self.last_val[1] if self.last_val[0] == done else self.hooks.validate(state.params)
        meta = {**self.expect, "epoch": epoch + (i + 1) // self.n_batches, "batch": (i + 1) % self.n_batches,
                "tokens_seen": self.tokens_seen, "val_loss": val, "history": self.log.history,
                "epoch_history": self.log.epoch_history, "samples": self.log.samples, "wall_s": self.elapsed()}
        try:
            synchronous = wait or not self.ckpts.async_save  # done before the next step: views, no copy
            path = self.ckpts.save(done, *self.steps.saved(state, host=synchronous), meta, val)
            if wait:
                self.ckpts.wait()
        except CheckpointSaveError as e:
            e.state = state
            raise
        except FloatingPointError:  # the save refused non-finite params or optimizer state
            raise self.diverged("the parameters or optimizer state became non-finite", step) from None
        self.last_save = time.time()
        return path


def _starting_state(steps: Steps, state: TrainState, ckpts: TrainCheckpoints, resume: bool | int,
                    expect: dict) -> tuple[TrainState, dict | None]:
    """(state, the checkpoint's meta) a run starts from: `state` for a fresh run (an earlier run's checkpoints
    dropped), else the newest checkpoint that reads back, or the one of step `resume` (an int)."""
    if not resume:
        if ckpts.latest_step() is not None:
            ckpts.delete_all()
        return state, None
    restore = ckpts.restore_newest_intact if isinstance(resume, bool) else partial(ckpts.restore, step=resume)
    params, rest, saved = restore(*steps.saved_target(), expect=expect)
    state = steps.restored(params, rest)
    ckpts.delete_after(int(state.step))  # newer ones (damaged, or of the timeline left) would be kept
    print(f"resuming from {ckpts.describe(int(state.step))}")
    return state, saved


def _check_warmup(tcfg: TrainConfig, n_batches: int) -> None:
    updates = tcfg.epochs * n_batches // tcfg.optim.grad_accum
    if tcfg.optim.warmup_steps > updates:
        raise ValueError(f"warmup_steps={tcfg.optim.warmup_steps} is longer than the whole run ({updates} optimizer "
                         f"updates: {tcfg.epochs} epochs of {n_batches} batches, grad_accum {tcfg.optim.grad_accum}); "
                         f"use a shorter --warmup-steps / --warmup-frac or more --epochs")


def run(steps: Steps, state: TrainState, tcfg: TrainConfig, train_batches, out_dir: str | Path, hooks: Hooks, *,
        meta: dict, resume: bool | int = False, progress: bool = True, stop_after: int | None = None,
        desc: str = "train", resume_hint: str = "the same command plus --resume") -> dict:
    """The book's train_model_simple over `steps`, checkpointed, resumable and signal-safe.

    Every `eval_freq` steps it logs `hooks.evaluate` to metrics.jsonl (with the step's own batch loss, lr
    and gradient norm); every step's metrics go to steps.jsonl; `tcfg.tracker` sends both to TensorBoard or
    W&B too (gptjax.tracking). Checkpoints (into out_dir/checkpoints, the params and the rest of `state`
    apart) at the end, when stopped, and on the cadence of TrainConfig.save_every / save_minutes.
    `resume` continues exactly from the newest checkpoint that reads back (or, an int, from that step; the
    newer ones are deleted): `meta` (the task, the model, the train settings) must match. SIGINT/SIGTERM
    (or `stop_after` steps) save and raise TrainingInterrupted; a non-finite loss raises FloatingPointError
    (nothing non-finite is saved).
    """
    out_dir = Path(out_dir)
    n_batches = len(train_batches)
    total = tcfg.epochs * n_batches
    _check_warmup(tcfg, n_batches)
    expect = {**meta, "train": {k: v for k, v in tcfg.to_dict().items() if k not in CHECKPOINT_KEYS},
              "steps_per_epoch": n_batches}
    ckpts = TrainCheckpoints(out_dir / CHECKPOINTS_DIR, keep=tcfg.keep_checkpoints, async_save=tcfg.async_checkpoint)
    log = None
    try:
        state, saved = _starting_state(steps, state, ckpts, resume, expect)
        done = int(state.step)
        log = _Log(out_dir, done, resume, saved, tracking.make_writer(tcfg.tracker, out_dir, expect, start_step=done))
        loop = _Loop(steps, tcfg, hooks, ckpts, log, expect, n_batches, saved)
        bar = tqdm(total=total, initial=done, disable=not progress, desc=desc, unit="step")
        with GracefulStop() as stop:
            epoch0, i0 = divmod(done, n_batches)
            for epoch in range(epoch0, tcfg.epochs):
                for i in range(i0 if epoch == epoch0 else 0, n_batches):
                    batch = train_batches.batch_at(epoch, i)
                    state, metrics = steps.train_step(state, batch)
                    step = epoch * n_batches + i  # the book's global_step, counted from 0
                    done = step + 1
                    loop.tokens_seen += hooks.count(batch)
                    log.pending.append((step, epoch + 1, metrics))
                    bar.update(1)
                    if step % tcfg.eval_freq == 0:
                        loop.evaluate(state, step, epoch, bar)
                    if i == n_batches - 1:
                        loop.epoch_end(state, step, epoch, bar)
                    stopping = stop.requested or (stop_after is not None and done >= stop_after)
                    if stopping or done == total or loop.save_due(done, i):
                        path = loop.checkpoint(state, step, epoch, i, wait=stopping)
                    if stopping:
                        bar.close()
                        why = f"by {stop.name}" if stop.requested else f"after {stop_after} steps as asked"
                        raise TrainingInterrupted(
                            f"training stopped {why} after step {step} (epoch {epoch + 1}, batch {i + 1} of "
                            f"{n_batches}); checkpoint saved to {path}. Resume with: {resume_hint}",
                            signum=stop.signum, step=done, checkpoint=path, state=state)
            log.flush(loop.diverged)
            bar.close()
            ckpts.wait()
            release_free_memory()  # the step's temporaries, before the task's final saves
    except BaseException:
        with contextlib.suppress(Exception):
            ckpts.close()  # a pending save still completes, so "the last good checkpoint" is really on disk
        raise
    finally:
        if log is not None:
            log.close()
    ckpts.close()
    return {"state": state, "history": log.history, "epoch_history": log.epoch_history, "samples": log.samples,
            "tokens_seen": loop.tokens_seen, "wall_s": loop.elapsed(), "steps": int(state.step),
            "checkpoints": ckpts.directory}
