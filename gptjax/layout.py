"""Param layouts: the canonical one (OpenAI's: per-layer h_0.., kernels (in, out), vocab unpadded), which
checkpoints hold, and the one an `Options` builds (layers stacked for scan_layers, kernels (out, in)
for linear_layout="out_in", vocab rows padded for vocab_multiple). Pure functions over param trees;
towards the canonical layout they also take numpy arrays, and then give views (no copy)."""
from __future__ import annotations

import re
from typing import Any, Callable

import jax
import jax.numpy as jnp

from gptjax.config import GPTConfig
from gptjax.options import Options

_LAYER = re.compile(r"h_(\d+)")


def stack_layers(params: dict) -> dict:
    """{"h_0": tree, "h_1": tree, ...} -> {"h": tree with a leading (L,) axis}: the layout of scan_layers."""
    if "h" in params:
        return params
    idx = sorted(int(m.group(1)) for k in params if (m := _LAYER.fullmatch(k)))
    if idx != list(range(len(idx))) or not idx:
        raise ValueError(f"expected per-layer params h_0..h_{{L-1}}, got keys {sorted(params)}")
    rest = {k: v for k, v in params.items() if not _LAYER.fullmatch(k)}
    return {**rest, "h": jax.tree.map(lambda *xs: jnp.stack(xs), *(params[f"h_{i}"] for i in idx))}


def unstack_layers(params: dict) -> dict:
    """Inverse of `stack_layers`: OpenAI's per-layer names again."""
    if "h" not in params:
        return params
    rest = {k: v for k, v in params.items() if k != "h"}
    L = jax.tree_util.tree_leaves(params["h"])[0].shape[0]
    return {**rest, **{f"h_{i}": jax.tree.map(lambda a, i=i: a[i], params["h"]) for i in range(L)}}


def _fit_vocab(params: dict, vocab_size: int, rows: int) -> dict:
    """wte rows / lm_head (in, out) columns resized to `rows` (zeros added, or padding dropped)."""
    def fit(a: jax.Array, axis: int) -> jax.Array:
        n = a.shape[axis]
        if n < vocab_size:
            raise ValueError(f"params hold {n} vocab rows but cfg.vocab_size is {vocab_size}")
        if n < rows:
            return jnp.pad(a, [(0, rows - n) if ax == axis % a.ndim else (0, 0) for ax in range(a.ndim)])
        return a[(slice(None),) * (axis % a.ndim) + (slice(0, rows),)] if n > rows else a

    out = dict(params)
    for name, leaf, axis in (("wte", "embedding", 0), ("lm_head", "kernel", -1)):
        if name in out:
            out[name] = {**out[name], leaf: fit(out[name][leaf], axis)}
    return out


def _swap_kernels(params: dict) -> dict:
    """Block and LM-head kernels (in, out) <-> (out, in) (the last two axes: stacked ones too); the
    classifier head stays (in, out)."""
    def swap(path, v):
        names = [getattr(k, "key", None) for k in path]
        return v.swapaxes(-1, -2) if names[-1] == "kernel" and "cls_head" not in names else v

    return jax.tree_util.tree_map_with_path(swap, params)


def to_layout(params: dict, cfg: GPTConfig, opts: Options) -> dict:
    """Canonical params (per-layer, (in, out) kernels, vocab unpadded) -> the layout `opts` builds:
    vocab rows padded for vocab_multiple, kernels (out, in) for linear_layout="out_in", layers
    stacked under "h" for scan_layers. Also takes any subtree of the params (e.g. trainable ones)."""
    params = _fit_vocab(params, cfg.vocab_size, opts.padded_vocab_size(cfg.vocab_size))
    if opts.linear_layout == "out_in":
        params = _swap_kernels(params)
    return stack_layers(params) if opts.scan_layers else params


def to_canonical(params: dict, cfg: GPTConfig, opts: Options) -> dict:
    """Inverse of `to_layout`: params laid out by `opts` -> OpenAI's layout, which checkpoints hold."""
    params = unstack_layers(params)
    if opts.linear_layout == "out_in":
        params = _swap_kernels(params)
    return _fit_vocab(params, cfg.vocab_size, cfg.vocab_size)


def map_param_trees(fn: Callable[[Any], Any], tree: Any, params: Any) -> Any:
    """`fn` applied to every subtree of `tree` with the tree structure of `params` (e.g. AdamW's moments
    in an optax state), other leaves left alone: optimizer state converts along with its params."""
    struct = jax.tree.structure(params)
    same = lambda t: jax.tree.structure(t) == struct  # noqa: E731
    return jax.tree.map(lambda t: fn(t) if same(t) else t, tree, is_leaf=same)


def layout_fns(cfg: GPTConfig, opts: Options, key: str | None = None):
    """`(to_canonical, to_layout)` for params laid out by `opts`, or for the `key` entry of a dict that holds
    them (a fine-tuning task's trainable tree); None when that layout is the canonical one."""
    if opts.canonical_layout:
        return None

    def on(fn):
        if key is None:
            return lambda t: fn(t, cfg, opts)
        return lambda t: {**t, key: fn(t[key], cfg, opts)} if key in t else t

    return on(to_canonical), on(to_layout)
