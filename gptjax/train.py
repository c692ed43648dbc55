"""Loss, pure jitted train/eval steps over explicit state, the optimizer, and the book's train loop."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gptjax.config import GPTConfig
from gptjax.model import GPT, count_params, dropout_rngs, init_params, map_param_trees, to_canonical, to_layout
from gptjax.options import Options

IGNORE_INDEX = -100


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array, ignore_index: int = IGNORE_INDEX) -> jax.Array:
    """Mean token cross-entropy in float32, skipping `ignore_index` targets (PyTorch's semantics)."""
    valid_BT = targets_BT != ignore_index
    nll_BT = optax.softmax_cross_entropy_with_integer_labels(
        logits_BTV.astype(jnp.float32), jnp.where(valid_BT, targets_BT, 0))
    return jnp.sum(nll_BT * valid_BT) / jnp.maximum(jnp.sum(valid_BT), 1)


def perplexity(loss: float) -> float:
    return float(math.exp(min(loss, 700.0)))


def global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree_util.tree_leaves(tree)))


@flax.struct.dataclass
class TrainState:
    step: jax.Array      # int32 scalar: optimizer updates done
    params: Any
    opt_state: Any
    key: jax.Array       # raw uint32 PRNG key; dropout uses fold_in(key, step)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 4e-4               # the peak learning rate when there is a schedule
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    warmup_steps: int = 0          # linear warmup from initial_lr to lr (appendix D)
    initial_lr: float = 0.0
    decay_steps: int = 0           # > 0: cosine decay to min_lr over this many steps after warmup
    min_lr: float = 0.0
    clip_norm: float | None = None  # global-norm gradient clipping (appendix D uses 1.0)
    clip_after_warmup: bool = False  # the book clips only once the warmup is over
    grad_accum: int = 1            # micro-batches per optimizer update (optax.MultiSteps)

    def __post_init__(self):
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"learning rate must be a positive number, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum!r}")
        if self.warmup_steps < 0 or self.decay_steps < 0:
            raise ValueError(f"warmup_steps and decay_steps must be >= 0, got {self.warmup_steps!r} and "
                             f"{self.decay_steps!r}")
        if not 0 <= self.initial_lr <= self.lr or not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"initial_lr and min_lr must lie in [0, lr={self.lr}], got initial_lr={self.initial_lr!r}, "
                             f"min_lr={self.min_lr!r}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0 or None, got {self.clip_norm!r}")

    def schedule(self) -> optax.Schedule:
        """Learning rate by optimizer update (not micro-batch)."""
        if self.warmup_steps == 0 and self.decay_steps == 0:
            return optax.constant_schedule(self.lr)
        warm = optax.linear_schedule(self.initial_lr, self.lr, max(self.warmup_steps, 1))
        if self.decay_steps == 0:
            rest = optax.constant_schedule(self.lr)
        else:
            # half-cosine from lr to min_lr, as the book's appendix D
            rest = optax.cosine_decay_schedule(self.lr, self.decay_steps, alpha=self.min_lr / self.lr)
        return optax.join_schedules([warm, rest], [self.warmup_steps])

    @classmethod
    def appendix_d(cls, total_steps: int, lr: float = 1e-3, warmup_frac: float = 0.2, initial_lr: float = 1e-5,
                   min_lr: float = 1e-5, **kw) -> "OptimConfig":
        """The book's appendix-D recipe over `total_steps` optimizer updates: warmup, cosine, clip 1.0 after warmup."""
        warmup = int(warmup_frac * total_steps)
        return cls(lr=lr, warmup_steps=warmup, initial_lr=initial_lr, decay_steps=max(total_steps - warmup, 1),
                   min_lr=min_lr, clip_norm=1.0, clip_after_warmup=True, **kw)


class ClipAfterState(NamedTuple):
    count: jax.Array  # updates seen


def clip_by_global_norm_after(max_norm: float, after: int) -> optax.GradientTransformation:
    """Global-norm clipping from update `after + 1` on (appendix D: `if global_step > warmup_steps`)."""

    def init(params):
        return ClipAfterState(jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        g_norm = global_norm(updates)
        scale = jnp.where((state.count > after) & (g_norm > max_norm), max_norm / g_norm, 1.0)
        return jax.tree_util.tree_map(lambda g: (g * scale).astype(g.dtype), updates), ClipAfterState(state.count + 1)

    return optax.GradientTransformation(init, update)


def make_optimizer(ocfg: OptimConfig, mask: Any = None) -> optax.GradientTransformation:
    """AdamW as torch.optim.AdamW (decay on every param unless `mask` says otherwise)."""
    chain = []
    if ocfg.clip_norm is not None:
        chain.append(clip_by_global_norm_after(ocfg.clip_norm, ocfg.warmup_steps) if ocfg.clip_after_warmup
                     else optax.clip_by_global_norm(ocfg.clip_norm))
    chain.append(optax.adamw(ocfg.schedule(), b1=ocfg.b1, b2=ocfg.b2, eps=ocfg.eps,
                             weight_decay=ocfg.weight_decay, mask=mask))
    tx = optax.chain(*chain)
    if ocfg.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=ocfg.grad_accum)
    return tx


def logged_schedule(ocfg: OptimConfig) -> optax.Schedule:
    """Learning rate of the update a micro-step feeds (MultiSteps counts updates, the state counts micro-steps)."""
    sched = ocfg.schedule()
    return lambda step: sched(step // ocfg.grad_accum)


def create_state(cfg: GPTConfig, tx: optax.GradientTransformation, seed: int, params: Any = None,
                 opts: Options | None = None) -> TrainState:
    key = jax.random.PRNGKey(seed)
    init_key, train_key = jax.random.split(key)
    if params is None:
        params = init_params(cfg, init_key, opts or Options())
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), key=train_key)


def make_loss_fn(cfg: GPTConfig, opts: Options | None = None) -> Callable:
    model = GPT(cfg, opts or Options.for_backend())

    def loss_fn(params, x_BT, y_BT, key, deterministic: bool):
        rngs = dropout_rngs(key)
        logits_BTV = model.apply({"params": params}, x_BT, deterministic=deterministic, rngs=rngs)
        return cross_entropy(logits_BTV, y_BT)

    return loss_fn


def step_functions(cfg: GPTConfig, tx: optax.GradientTransformation, schedule: optax.Schedule | None = None,
                   constrain_grads: Callable | None = None, opts: Options | None = None):
    """The un-jitted `train_step(state, (x, y)) -> (state, metrics)` and `eval_step(params, (x, y)) -> loss`.

    `constrain_grads` (e.g. a sharding constraint) is applied to the gradients before the update.
    """
    loss_fn = make_loss_fn(cfg, opts)
    schedule = schedule or (lambda step: jnp.nan)

    def train_step(state: TrainState, batch):
        x_BT, y_BT = batch
        key = jax.random.fold_in(state.key, state.step)
        loss, grads = jax.value_and_grad(loss_fn)(state.params, x_BT, y_BT, key, False)
        if constrain_grads is not None:
            grads = constrain_grads(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": global_norm(grads), "lr": jnp.asarray(schedule(state.step))}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def eval_step(params, batch):
        x_BT, y_BT = batch
        return loss_fn(params, x_BT, y_BT, None, True)

    return train_step, eval_step


def make_steps(cfg: GPTConfig, tx: optax.GradientTransformation, schedule: optax.Schedule | None = None,
               opts: Options | None = None):
    """Jitted `train_step(state, (x, y)) -> (state, metrics)` (state donated) and `eval_step(params, (x, y)) -> loss`."""
    train_step, eval_step = step_functions(cfg, tx, schedule, opts=opts)
    return jax.jit(train_step, donate_argnums=0), jax.jit(eval_step)


def evaluate(eval_step: Callable, params: Any, batches: Iterable, num_batches: int | None = None) -> float:
    """The book's calc_loss_loader: mean of per-batch losses over the first `num_batches` batches."""
    losses = []
    for i, batch in enumerate(batches):
        if num_batches is not None and i >= num_batches:
            break
        losses.append(eval_step(params, batch))
    if not losses:
        return float("nan")
    return float(jnp.mean(jnp.stack(losses)))


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 2
    eval_freq: int = 5
    eval_iter: int = 5
    seed: int = 123
    start_context: str = "Every effort moves you"
    sample_tokens: int = 50
    optim: OptimConfig = field(default_factory=OptimConfig)
    save_every: int = 0            # steps between checkpoints; 0 = at the end of every epoch
    keep_checkpoints: int = 2      # the last K checkpoints, plus the best by validation loss
    async_checkpoint: bool = True  # write checkpoints in the background while training goes on

    def __post_init__(self):
        for name in ("epochs", "batch_size", "eval_freq", "eval_iter", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.save_every < 0:
            raise ValueError(f"save_every must be >= 0 (0 = every epoch), got {self.save_every!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        fields_ = {f.name for f in dataclasses.fields(cls)}
        if unknown := set(d) - fields_:
            raise ValueError(f"unknown TrainConfig keys {sorted(unknown)}; valid keys: {sorted(fields_)}")
        d["optim"] = OptimConfig(**d.get("optim", {}))
        return cls(**d)


# settings that only say how checkpoints are written; a resume may change them
_CHECKPOINT_KEYS = ("save_every", "keep_checkpoints", "async_checkpoint")


def train(cfg: GPTConfig, tcfg: TrainConfig, train_batches, val_batches, tokenizer, out_dir: str | Path,
          params: Any = None, progress: bool = True, *, resume: bool = False, overwrite: bool = False,
          run_info: dict | None = None, stop_after: int | None = None, sharding: str = "none",
          fsdp: int | None = None, opts: Options | None = None) -> dict:
    """The book's train loop (appendix D's with a warmup/cosine/clip OptimConfig) over jitted steps, checkpointed.

    Writes config.json, checkpoints/, metrics.jsonl, then params/, samples.json and loss.png at the end.
    `resume` continues from the latest checkpoint of `out_dir` exactly (same losses, bit for bit);
    `overwrite` drops the checkpoints of an earlier run there; `run_info` is stored in config.json
    (the CLI keeps its data settings there); `stop_after` stops as if interrupted once that many steps are done.
    `sharding` "dp" / "fsdp" trains over every device (gptjax.sharding; `fsdp` sets that axis's size).
    `opts`: how the model runs (default Options.for_backend()); `params` are in its layout; checkpoints
    and params/ hold the canonical layout.
    Raises TrainingInterrupted after SIGINT/SIGTERM (a checkpoint is on disk), FloatingPointError when
    the loss stops being finite (nothing non-finite is saved), CheckpointSaveError when a save fails.
    """
    from gptjax.checkpoint import (CHECKPOINTS_DIR, CONFIG_FILE, GracefulStop, TrainCheckpoints, TrainingInterrupted,
                                   CheckpointSaveError, refuse_existing_run, save_run, write_json_atomic)
    from gptjax.generate import generate, trim_at_eos

    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir)
    opts = opts or Options.for_backend()
    canon = lambda t: to_canonical(t, cfg, opts)  # noqa: E731
    if resume and params is not None:
        raise ValueError("pass either params (weights to start from) or resume=True (continue a run), not both")
    n_batches = len(train_batches)
    total_steps = tcfg.epochs * n_batches
    if sharding == "none":
        tx, train_step, eval_step = _compiled_steps(cfg, tcfg.optim, opts)
        abstract_state = lambda: jax.eval_shape(lambda: create_state(cfg, tx, tcfg.seed, opts=opts))  # noqa: E731
        initial_state = lambda: create_state(cfg, tx, tcfg.seed, params, opts=opts)  # noqa: E731
    else:
        from gptjax.sharding import check_batch, make_mesh, make_sharded_steps

        mesh = make_mesh(sharding, fsdp=fsdp)
        check_batch(tcfg.batch_size, mesh)
        tx = make_optimizer(tcfg.optim)
        sharded = make_sharded_steps(cfg, tx, mesh, sharding, logged_schedule(tcfg.optim), opts=opts)
        train_step, eval_step = sharded.train_step, sharded.eval_step
        abstract_state = sharded.abstract_state
        initial_state = lambda: sharded.init_state(tcfg.seed, params)  # noqa: E731
    log_path = out_dir / "metrics.jsonl"
    ckpts = TrainCheckpoints(out_dir / CHECKPOINTS_DIR, keep=tcfg.keep_checkpoints, async_save=tcfg.async_checkpoint)
    log = None
    try:
        if resume:
            abstract = abstract_state()
            train_dict = {k: v for k, v in tcfg.to_dict().items() if k not in _CHECKPOINT_KEYS}
            if not opts.canonical_layout:  # checkpoints hold canonical params (and optimizer state)
                abstract = jax.eval_shape(lambda s: s.replace(params=canon(s.params), opt_state=map_param_trees(
                    canon, s.opt_state, s.params)), abstract)
            p, rest, meta = ckpts.restore(abstract.params, _rest_of(abstract),
                                          expect={"model": cfg.to_dict(), "train": train_dict,
                                                  "steps_per_epoch": n_batches})
            state = TrainState(params=p, **rest)
            if not opts.canonical_layout:
                lay = lambda t: to_layout(t, cfg, opts)  # noqa: E731
                state = state.replace(params=lay(state.params), opt_state=map_param_trees(lay, state.opt_state, p))
                if sharding != "none":
                    state = jax.device_put(state, sharded.state_sharding)
            done = int(state.step)
            epoch0, batch0 = meta["epoch"], meta["batch"]
            tokens_seen, history, samples, steps_log = (meta["tokens_seen"], meta["history"], meta["samples"],
                                                        meta["steps"])
            wall_before = meta["wall_s"]
            _truncate_jsonl(log_path, done)
            print(f"resuming from {ckpts.describe(done)}: epoch {epoch0 + 1}, batch {batch0 + 1} of {n_batches}")
        else:
            refuse_existing_run(out_dir, overwrite=overwrite,
                                resume_hint=f"`gptjax pretrain --resume {out_dir}` (train(..., resume=True))")
            if ckpts.latest_step() is not None:
                ckpts.delete_all()
            state = initial_state()
            done = epoch0 = batch0 = tokens_seen = 0
            wall_before = 0.0
            history = {"step": [], "tokens_seen": [], "epoch": [], "train_loss": [], "val_loss": []}
            samples, steps_log = [], {"loss": [], "lr": [], "grad_norm": []}
            log_path.write_text("")
            write_json_atomic(out_dir / CONFIG_FILE, {"model": cfg.to_dict(), "options": opts.to_dict(),
                                                      "train": tcfg.to_dict(), **(run_info or {}), "status": "running"})
        print(f"model: {count_params(state.params):,} parameters; train {n_batches} batches/epoch, "
              f"val {len(val_batches)} batches; {total_steps} steps")

        pending: list[tuple[int, dict]] = []  # per-step metrics still on device: no host sync between logs
        last_val = (-1, float("nan"))         # (steps done, val loss) of the latest evaluation

        def diverged(what: str, s: int) -> FloatingPointError:
            return FloatingPointError(
                f"training diverged: {what} at step {s} (epoch {s // n_batches + 1}); nothing from that step on was "
                f"saved. The last good checkpoint is {ckpts.describe(ckpts.latest_step())}. Lower the learning rate "
                f"(--lr), add gradient clipping (--clip-norm 1.0) or a warmup, and train again")

        def flush() -> None:
            """Pull the pending step metrics to the host; stop on the first non-finite one."""
            for (s, _), m in zip(pending, jax.device_get([m for _, m in pending])):
                loss, gnorm = float(m["loss"]), float(m["grad_norm"])
                if not (math.isfinite(loss) and math.isfinite(gnorm)):
                    raise diverged(f"loss became {loss}" if not math.isfinite(loss) else
                                   f"gradient norm became {gnorm}", s)
                steps_log["loss"].append(loss)
                steps_log["lr"].append(float(m["lr"]))
                steps_log["grad_norm"].append(gnorm)
            pending.clear()

        start_ids = np.asarray([tokenizer.encode(tcfg.start_context, allowed_special={"<|endoftext|>"})], np.int32)
        log = log_path.open("a")
        bar = _progress(total_steps, progress, initial=done)
        t0 = time.time()
        with GracefulStop() as stop:
            for epoch in range(epoch0, tcfg.epochs):
                for i in range(batch0 if epoch == epoch0 else 0, n_batches):
                    x_BT, y_BT = train_batches.batch_at(epoch, i)
                    state, metrics = train_step(state, (x_BT, y_BT))
                    step = epoch * n_batches + i  # the book's global_step, counted from 0
                    done = step + 1
                    pending.append((step, metrics))
                    tokens_seen += int(x_BT.size)
                    bar.update(1)
                    if step % tcfg.eval_freq == 0:
                        flush()
                        train_loss = evaluate(eval_step, state.params, train_batches.epoch(epoch), tcfg.eval_iter)
                        val_loss = evaluate(eval_step, state.params, val_batches.epoch(0), tcfg.eval_iter)
                        if not math.isfinite(train_loss):
                            raise diverged(f"the parameters became non-finite (their loss is {train_loss})", step)
                        last_val = (done, val_loss)
                        rec = {"step": step, "epoch": epoch + 1, "tokens_seen": tokens_seen, "train_loss": train_loss,
                               "val_loss": val_loss, "batch_loss": steps_log["loss"][-1], "lr": steps_log["lr"][-1],
                               "grad_norm": steps_log["grad_norm"][-1],
                               "elapsed_s": round(wall_before + time.time() - t0, 2)}
                        log.write(json.dumps(rec) + "\n")
                        log.flush()
                        for k in history:
                            history[k].append(rec[k])
                        bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val_loss:.3f}")
                        bar.write(f"Ep {epoch + 1} (Step {step:06d}): Train loss {train_loss:.3f}, "
                                  f"Val loss {val_loss:.3f} (lr {rec['lr']:.2e}, grad norm {rec['grad_norm']:.2f})")
                    if i == n_batches - 1:
                        ids = generate(state.params, cfg, start_ids, tcfg.sample_tokens, opts=opts)
                        samples.append({"epoch": epoch + 1, "text": tokenizer.decode(trim_at_eos(ids[0], None))})
                        bar.write(f"Ep {epoch + 1} sample: {samples[-1]['text']!r}")
                    stopping = stop.requested or (stop_after is not None and done >= stop_after)
                    if (stopping or done == total_steps or (i == n_batches - 1 if tcfg.save_every == 0
                                                            else done % tcfg.save_every == 0)):
                        flush()
                        val = last_val[1] if last_val[0] == done else evaluate(
                            eval_step, state.params, val_batches.epoch(0), tcfg.eval_iter)
                        meta = {"model": cfg.to_dict(), "train": tcfg.to_dict(), "steps_per_epoch": n_batches,
                                "epoch": epoch + (i + 1) // n_batches, "batch": (i + 1) % n_batches,
                                "tokens_seen": tokens_seen, "val_loss": val, "history": history, "samples": samples,
                                "steps": steps_log, "wall_s": round(wall_before + time.time() - t0, 2)}
                        try:
                            rest = _rest_of(state)
                            if not opts.canonical_layout:
                                rest = {**rest, "opt_state": map_param_trees(canon, rest["opt_state"], state.params)}
                            path = ckpts.save(done, canon(state.params), rest, meta, val)
                            if stopping:
                                ckpts.wait()
                        except CheckpointSaveError as e:
                            e.state = state
                            raise
                        except FloatingPointError:  # the save refused non-finite params or optimizer state
                            raise diverged("the parameters or optimizer state became non-finite", step) from None
                    if stopping:
                        bar.close()
                        why = f"by {stop.name}" if stop.requested else f"after {stop_after} steps as asked"
                        raise TrainingInterrupted(
                            f"training stopped {why} after step {step} (epoch {epoch + 1}, batch {i + 1} of "
                            f"{n_batches}); checkpoint saved to {path}. Resume with: gptjax pretrain --resume "
                            f"{out_dir} (or train(..., resume=True))", signum=stop.signum, step=done, checkpoint=path,
                            state=state)
            flush()
            bar.close()
            log.close()
            ckpts.wait()
            wall = wall_before + time.time() - t0
            save_run(out_dir, canon(state.params), cfg,
                     extra={"options": opts.to_dict(), "train": tcfg.to_dict(), **(run_info or {}),
                            "status": "finished", "tokens_seen": tokens_seen, "steps": int(state.step),
                            "wall_s": round(wall, 1)})
            (out_dir / "samples.json").write_text(json.dumps(samples, indent=1))
            if history["step"]:
                plot_losses(history, out_dir / "loss.png")
    except BaseException:
        if log is not None:
            log.close()
        try:
            ckpts.close()  # a pending save still completes, so "the last good checkpoint" is really on disk
        except Exception:
            pass
        raise
    ckpts.close()
    return {"history": history, "samples": samples, "state": state, "wall_s": wall, "tokens_seen": tokens_seen,
            "steps": steps_log, "checkpoints": ckpts.directory}


@lru_cache(maxsize=4)
def _compiled_steps(cfg: GPTConfig, ocfg: OptimConfig, opts: Options | None = None):
    """One optimizer and jitted step pair per (model, optimizer) settings: a resume in the same process reuses them."""
    tx = make_optimizer(ocfg)
    return (tx, *make_steps(cfg, tx, logged_schedule(ocfg), opts=opts))


def _rest_of(state: TrainState) -> dict:
    """Everything but the params: what `train_state` holds in a checkpoint."""
    return {"step": state.step, "opt_state": state.opt_state, "key": state.key}


def _truncate_jsonl(path: Path, steps_done: int) -> None:
    """Drop the log records of steps after the checkpoint: a resume writes them again."""
    if path.is_file():
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] < steps_done]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        os.replace(tmp, path)


def _prepare_out_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"cannot write to output directory {str(out_dir)!r} ({e.strerror}); "
                              f"choose another --out directory") from None


def _progress(total: int, enabled: bool, initial: int = 0):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step")


def plot_losses(history: dict, path: str | Path, title: str | None = None) -> None:
    """The book's figure: train/val loss against epochs, with tokens seen on a twin x-axis."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax1 = plt.subplots(figsize=(5, 3))
    steps = history["step"]
    ax1.plot(steps, history["train_loss"], label="Training loss")
    ax1.plot(steps, history["val_loss"], linestyle="-.", label="Validation loss")
    ax1.set_xlabel("Steps")
    ax1.set_ylabel("Loss")
    ax1.legend(loc="upper right")
    if history.get("tokens_seen"):
        ax2 = ax1.twiny()
        ax2.plot(history["tokens_seen"], history["train_loss"], alpha=0)
        ax2.set_xlabel("Tokens seen")
    if title:
        ax1.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
