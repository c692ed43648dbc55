"""LoRA (the book's appendix E) as a params tree beside the frozen base params.

W' = W + (alpha / r) * A @ B, with A (in, r) initialised like torch's Linear (kaiming-uniform, a=sqrt(5))
and B (r, out) zeros, so a fresh adapter leaves the model unchanged. `merge` folds the adapters into the
kernels inside the jitted forward (model.py has no LoRA code) and is also "merge for inference".

Every adapted Dense gets one leaf pair {"A": (parts, I, R), "B": (parts, R, O/parts)}: parts is 3 for
the fused `c_attn` (one adapter each for q, k, v, as the book's W_query/W_key/W_value) and 1 otherwise.
Blocks stacked for scan_layers (kernel (L, I, O)) get adapters with the same leading L axis.
"""
from __future__ import annotations

import fnmatch
import json
import math
import os
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from gptjax import runs

# Dense layers whose kernel is fused from several of the book's Linear layers: split count per name.
_SPLITS = {"c_attn": 3}


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 16
    alpha: float = 16.0
    # glob patterns over Dense paths like "h_0/attn/c_attn", "cls_head"; None = every Dense layer
    targets: tuple[str, ...] | None = None

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"LoRA alpha must be a positive number, got {self.alpha!r}")
        if self.targets is not None:
            object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "targets": None if self.targets is None else list(self.targets)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoRAConfig":
        return cls(rank=int(d["rank"]), alpha=float(d["alpha"]),
                   targets=None if d.get("targets") is None else tuple(d["targets"]))


def dense_layers(params: Any) -> dict[str, tuple[int, ...]]:
    """'h_0/attn/c_attn' -> kernel shape (in, out) for every Dense in `params` (arrays or shape structs);
    (L, in, out) for blocks stacked for scan_layers ("h/attn/c_attn")."""
    flat = traverse_util.flatten_dict(params)
    return {"/".join(path[:-1]): tuple(x.shape) for path, x in flat.items()
            if path[-1] == "kernel" and len(x.shape) >= 2}


def target_layers(params: Any, lcfg: LoRAConfig) -> dict[str, tuple[int, ...]]:
    layers = dense_layers(params)
    if lcfg.targets is None:
        return layers
    chosen = {k: v for k, v in layers.items() if any(fnmatch.fnmatchcase(k, pat) for pat in lcfg.targets)}
    if not chosen:
        raise ValueError(f"LoRA targets {list(lcfg.targets)} match no Dense layer; layers are e.g. "
                         f"{sorted(layers)[:6]} (glob patterns such as '*/attn/*' or 'cls_head')")
    return chosen


def _splits(name: str, out_features: int) -> int:
    s = _SPLITS.get(name.rsplit("/", 1)[-1], 1)
    return s if out_features % s == 0 else 1


def init_lora(params: Any, lcfg: LoRAConfig, key: jax.Array) -> dict:
    """Fresh adapters for the target Dense layers of `params`: A ~ U(+-1/sqrt(r)), B = 0."""
    return _init_lora(tuple(sorted(target_layers(params, lcfg).items())), lcfg.rank, key)


@partial(jax.jit, static_argnums=(0, 1))
def _init_lora(layers: tuple, rank: int, key: jax.Array) -> dict:
    # torch's kaiming_uniform_(A, a=sqrt(5)) on an (in, r) tensor takes fan_in = r: bound 1/sqrt(r)
    bound = 1.0 / math.sqrt(rank)
    flat = {}
    for i, (name, (*lead, n_in, n_out)) in enumerate(layers):
        parts = _splits(name, n_out)
        path = tuple(name.split("/"))
        flat[path + ("A",)] = jax.random.uniform(jax.random.fold_in(key, i), (*lead, parts, n_in, rank), jnp.float32,
                                                 -bound, bound)
        flat[path + ("B",)] = jnp.zeros((*lead, parts, rank, n_out // parts), jnp.float32)
    return traverse_util.unflatten_dict(flat)


def lora_delta(a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """(alpha/r) * A @ B per split, concatenated along the output features: A (parts, I, R) and
    B (parts, R, O/parts) give (I, O) (leading layer axes kept)."""
    *lead, parts, n_in, _ = a.shape
    delta = jnp.einsum("...pir,...pro->...ipo", a.astype(jnp.float32), b.astype(jnp.float32))  # (I, parts, O/parts)
    return scale * delta.reshape(*lead, n_in, -1)


def merge(params: Any, lora: Any, scale: float) -> dict:
    """Base params with every adapter folded into its kernel (jit-friendly; also the inference export)."""
    if not lora:
        return params
    flat, flat_lora = dict(traverse_util.flatten_dict(params)), traverse_util.flatten_dict(lora)
    for layer in [path[:-1] for path in flat_lora if path[-1] == "A"]:
        if (kpath := (*layer, "kernel")) not in flat:
            raise ValueError(f"LoRA adapter {'/'.join(layer)!r} has no Dense kernel in the base params")
        kernel, a, b = flat[kpath], flat_lora[(*layer, "A")], flat_lora[(*layer, "B")]
        flat[kpath] = (kernel.astype(jnp.float32) + lora_delta(a, b, scale)).astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat)


def lora_param_count(shapes: Any, lcfg: LoRAConfig) -> int:
    """Adapter parameters LoRA adds to a params tree (arrays or `abstract_params` shapes); no allocation."""
    return sum(math.prod(lead) * _splits(name, o) * lcfg.rank * (i + o // _splits(name, o))
               for name, (*lead, i, o) in target_layers(shapes, lcfg).items())


# --- saving the adapters alone -----------------------------------------------------------------

def save_adapters(path: str | os.PathLike, lora: Any, lcfg: LoRAConfig, extra_params: Any = None,
                  metadata: dict[str, Any] | None = None) -> Path:
    """Write the adapters (and any non-base params, e.g. a new head) to one safetensors file."""
    tensors = {".".join((kind, *p)): np.asarray(jax.device_get(x), np.float32)
               for kind, tree in (("lora", lora), ("params", extra_params or {}))
               for p, x in traverse_util.flatten_dict(tree).items()}
    meta = {"format": "gptjax-lora", "lora": json.dumps(lcfg.to_dict()),
            **{k: json.dumps(v) for k, v in (metadata or {}).items()}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return runs.write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load_adapters(path: str | os.PathLike) -> tuple[dict, dict, LoRAConfig, dict[str, Any]]:
    """(lora, extra_params, LoRAConfig, metadata) from a `save_adapters` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA adapter file at {str(path)!r}; pass the adapters.safetensors of a LoRA run")
    lora, extra = {}, {}
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "gptjax-lora":
            raise ValueError(f"{str(path)!r} is not a gptjax LoRA adapter file "
                             f"(metadata format={meta.get('format')!r})")
        for name in f.keys():
            kind, *rest = name.split(".")
            (lora if kind == "lora" else extra)[tuple(rest)] = jnp.asarray(f.get_tensor(name))
    lcfg = LoRAConfig.from_dict(json.loads(meta["lora"]))
    other = {k: json.loads(v) for k, v in meta.items() if k not in ("format", "lora")}
    return traverse_util.unflatten_dict(lora), traverse_util.unflatten_dict(extra) if extra else {}, lcfg, other


# --- what trains and what does not ---------------------------------------------------------------

def partition(params: dict, mask: dict) -> tuple[dict, dict]:
    """(trainable, frozen) sub-dicts of `params` by a bool mask; `combine` puts them back together."""
    flat_p, flat_m = traverse_util.flatten_dict(params), traverse_util.flatten_dict(mask)
    train = {k: v for k, v in flat_p.items() if flat_m[k]}
    frozen = {k: v for k, v in flat_p.items() if not flat_m[k]}
    return traverse_util.unflatten_dict(train), traverse_util.unflatten_dict(frozen)


def combine(*trees: dict) -> dict:
    return traverse_util.unflatten_dict({k: v for t in trees for k, v in traverse_util.flatten_dict(t).items()})


def full_params(trainable: dict, frozen: dict, lora_scale: float = 1.0) -> dict:
    """The model's params from what trains and what does not: `trainable` {"params": weights that train,
    "lora": adapters} over the `frozen` weights, the adapters merged in (every fine-tuning task)."""
    return merge(combine(frozen, trainable.get("params", {})), trainable.get("lora"), lora_scale)
