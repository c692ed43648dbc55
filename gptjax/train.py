"""Loss, pure jitted train/eval steps over explicit state, the optimizer, and the book's train loop."""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gptjax.config import GPTConfig
from gptjax.model import GPT, count_params, init_params

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
    lr: float = 4e-4
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    warmup_steps: int = 0          # linear warmup from initial_lr to lr (appendix D)
    initial_lr: float = 0.0
    decay_steps: int = 0           # > 0: cosine decay to min_lr over this many steps after warmup
    min_lr: float = 0.0
    clip_norm: float | None = None  # global-norm gradient clipping (appendix D uses 1.0)
    grad_accum: int = 1

    def __post_init__(self):
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"learning rate must be a positive number, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum!r}")
        if self.warmup_steps < 0 or self.decay_steps < 0:
            raise ValueError("warmup_steps and decay_steps must be >= 0")
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ValueError(f"clip_norm must be > 0 or None, got {self.clip_norm!r}")

    def schedule(self) -> optax.Schedule:
        if self.warmup_steps == 0 and self.decay_steps == 0:
            return optax.constant_schedule(self.lr)
        warm = optax.linear_schedule(self.initial_lr, self.lr, max(self.warmup_steps, 1))
        if self.decay_steps == 0:
            rest = optax.constant_schedule(self.lr)
        else:
            # half-cosine from lr to min_lr, as the book's appendix D
            rest = optax.cosine_decay_schedule(self.lr, self.decay_steps, alpha=self.min_lr / self.lr)
        return optax.join_schedules([warm, rest], [self.warmup_steps])


def make_optimizer(ocfg: OptimConfig, mask: Any = None) -> optax.GradientTransformation:
    """AdamW as torch.optim.AdamW (decay on every param unless `mask` says otherwise)."""
    chain = []
    if ocfg.clip_norm is not None:
        chain.append(optax.clip_by_global_norm(ocfg.clip_norm))
    chain.append(optax.adamw(ocfg.schedule(), b1=ocfg.b1, b2=ocfg.b2, eps=ocfg.eps,
                             weight_decay=ocfg.weight_decay, mask=mask))
    tx = optax.chain(*chain)
    if ocfg.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=ocfg.grad_accum)
    return tx


def create_state(cfg: GPTConfig, tx: optax.GradientTransformation, seed: int, params: Any = None) -> TrainState:
    key = jax.random.PRNGKey(seed)
    init_key, train_key = jax.random.split(key)
    if params is None:
        params = init_params(cfg, init_key)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), key=train_key)


def make_loss_fn(cfg: GPTConfig) -> Callable:
    model = GPT(cfg)

    def loss_fn(params, x_BT, y_BT, key, deterministic: bool):
        rngs = None if key is None else {"dropout": key}
        logits_BTV = model.apply({"params": params}, x_BT, deterministic=deterministic, rngs=rngs)
        return cross_entropy(logits_BTV, y_BT)

    return loss_fn


def make_steps(cfg: GPTConfig, tx: optax.GradientTransformation, schedule: optax.Schedule | None = None):
    """Jitted `train_step(state, (x, y)) -> (state, metrics)` and `eval_step(params, (x, y)) -> loss`."""
    loss_fn = make_loss_fn(cfg)
    schedule = schedule or (lambda step: jnp.nan)

    @partial(jax.jit, donate_argnums=0)
    def train_step(state: TrainState, batch):
        x_BT, y_BT = batch
        key = jax.random.fold_in(state.key, state.step)
        loss, grads = jax.value_and_grad(loss_fn)(state.params, x_BT, y_BT, key, False)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": global_norm(grads), "lr": jnp.asarray(schedule(state.step))}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    @jax.jit
    def eval_step(params, batch):
        x_BT, y_BT = batch
        return loss_fn(params, x_BT, y_BT, None, True)

    return train_step, eval_step


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

    def __post_init__(self):
        for name in ("epochs", "batch_size", "eval_freq", "eval_iter"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def train(cfg: GPTConfig, tcfg: TrainConfig, train_batches, val_batches, tokenizer, out_dir: str | Path,
          params: Any = None, progress: bool = True) -> dict:
    """The book's `train_model_simple` over jitted steps. Writes metrics.jsonl, loss.png, params/, samples."""
    from gptjax.checkpoint import save_run
    from gptjax.generate import generate, trim_at_eos

    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir)
    tx = make_optimizer(tcfg.optim)
    state = create_state(cfg, tx, tcfg.seed, params)
    train_step, eval_step = make_steps(cfg, tx, tcfg.optim.schedule())
    n_params = count_params(state.params)
    print(f"model: {n_params:,} parameters; train {len(train_batches)} batches/epoch, val {len(val_batches)} batches")

    log_path = out_dir / "metrics.jsonl"
    log = log_path.open("w")
    history: dict[str, list] = {"step": [], "tokens_seen": [], "epoch": [], "train_loss": [], "val_loss": []}
    samples = []
    tokens_seen, t0 = 0, time.time()
    total_steps = tcfg.epochs * len(train_batches)
    bar = _progress(total_steps, progress)
    start_ids = np.asarray([tokenizer.encode(tcfg.start_context, allowed_special={"<|endoftext|>"})], np.int32)
    eos = getattr(tokenizer, "eot_token", None)
    for epoch in range(tcfg.epochs):
        for x_BT, y_BT in train_batches.epoch(epoch):
            state, metrics = train_step(state, (x_BT, y_BT))
            tokens_seen += x_BT.size
            step = int(state.step) - 1  # the book counts from 0 after the first update
            bar.update(1)
            if step % tcfg.eval_freq == 0:
                train_loss = evaluate(eval_step, state.params, train_batches.epoch(epoch), tcfg.eval_iter)
                val_loss = evaluate(eval_step, state.params, val_batches.epoch(0), tcfg.eval_iter)
                if not (math.isfinite(train_loss) and math.isfinite(float(metrics["loss"]))):
                    raise FloatingPointError(f"loss became {train_loss} at step {step}; lower the learning rate")
                rec = {"step": step, "epoch": epoch + 1, "tokens_seen": tokens_seen, "train_loss": train_loss,
                       "val_loss": val_loss, "batch_loss": float(metrics["loss"]), "lr": float(metrics["lr"]),
                       "grad_norm": float(metrics["grad_norm"]), "elapsed_s": round(time.time() - t0, 2)}
                log.write(json.dumps(rec) + "\n")
                log.flush()
                for k in history:
                    history[k].append(rec[k])
                bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val_loss:.3f}")
                bar.write(f"Ep {epoch + 1} (Step {step:06d}): Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
        ids = generate(state.params, cfg, start_ids, tcfg.sample_tokens)
        sample = tokenizer.decode(trim_at_eos(ids[0], None))
        samples.append({"epoch": epoch + 1, "text": sample})
        bar.write(f"Ep {epoch + 1} sample: {sample!r}")
    bar.close()
    log.close()
    wall = time.time() - t0
    save_run(out_dir, state.params, cfg, extra={"train": tcfg.to_dict(), "tokens_seen": tokens_seen,
                                               "steps": int(state.step), "wall_s": round(wall, 1)})
    (out_dir / "samples.json").write_text(json.dumps(samples, indent=1))
    plot_losses(history, out_dir / "loss.png")
    return {"history": history, "samples": samples, "state": state, "wall_s": wall, "tokens_seen": tokens_seen}


def _prepare_out_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"cannot write to output directory {str(out_dir)!r} ({e.strerror}); "
                              f"choose another --out directory") from None


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, disable=not enabled, desc="train", unit="step")


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
