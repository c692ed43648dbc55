"""The optimizer: AdamW as torch.optim.AdamW, the book's appendix-D schedule (warmup, cosine, clipping after
the warmup) and gradient accumulation."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


def global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree_util.tree_leaves(tree)))


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
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"weight_decay must be a number >= 0, got {self.weight_decay!r}")
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
        # then constant, or a half-cosine from lr to min_lr as the book's appendix D
        rest = (optax.constant_schedule(self.lr) if self.decay_steps == 0
                else optax.cosine_decay_schedule(self.lr, self.decay_steps, alpha=self.min_lr / self.lr))
        return optax.join_schedules([warm, rest], [self.warmup_steps])

    def logged_schedule(self) -> optax.Schedule:
        """Learning rate of the update a micro-step feeds (MultiSteps counts updates, the state micro-steps)."""
        sched = self.schedule()
        return lambda step: sched(step // self.grad_accum)

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
