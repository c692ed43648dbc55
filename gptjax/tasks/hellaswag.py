"""HellaSwag accuracy, the standard eval of GPT-2 reproductions: for each item, the ending (of 4) whose tokens
get the lowest mean loss after the context is the model's choice (the "acc_norm" style nanoGPT and llm.c report).

Reads the official JSONL (rowanz/hellaswag, e.g. data/hellaswag_val.jsonl: `ctx`, 4 `endings`, `label`).
In x_N4T, 4 is the endings and T the tokens of context + ending, cropped from the left to the model's context.
"""
from __future__ import annotations

import itertools
import json
import os
import urllib.parse
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gptjax.model_io import load_model
from gptjax.config import GPTConfig
from gptjax.data import cached_download
from gptjax.layout import to_layout
from gptjax.model import GPT
from gptjax.options import Options
from gptjax.tokenizer import get_gpt2_tokenizer

VAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"


def _item(line: str, where: str) -> dict:
    try:
        row = json.loads(line)
    except ValueError as e:
        raise ValueError(f"{where} is not JSON ({e}); a HellaSwag file holds one JSON object a line") from None
    if not isinstance(row, dict) or not {"ctx", "endings", "label"} <= set(row):
        have = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise ValueError(f"{where} needs the fields ctx, endings and label (it has {have}); the test split has no "
                         f"labels: use the val split")
    ctx, endings, label = row["ctx"], row["endings"], row["label"]
    if not isinstance(ctx, str) or not (isinstance(endings, list) and len(endings) == 4
                                        and all(isinstance(e, str) for e in endings)):
        raise ValueError(f"{where}: ctx must be a string and endings a list of 4 strings")
    try:
        label = int(label)
    except (TypeError, ValueError):
        label = -1
    if not 0 <= label < 4:
        raise ValueError(f"{where}: label must be 0, 1, 2 or 3, got {row['label']!r}")
    return {"ctx": ctx, "endings": endings, "label": label}


def load_hellaswag(source: str | os.PathLike, *, limit: int | None = None,
                   cache_dir: str | os.PathLike | None = None) -> list[dict]:
    """The items {ctx, endings, label} of a HellaSwag JSONL: a path, an http(s) URL, or "val" (the official
    validation split, VAL_URL); URLs are downloaded once into the cache. `limit`: the first N items."""
    src = VAL_URL if os.fspath(source) == "val" else os.fspath(source)
    if urllib.parse.urlparse(src).scheme in ("http", "https"):
        try:
            path = cached_download(src, cache_dir=cache_dir)
        except RuntimeError as e:
            raise FileNotFoundError(f"{e}. HellaSwag's files are in github.com/rowanz/hellaswag (data/): pass a "
                                    f"local copy (CLI: --hellaswag PATH)") from None
    else:
        path = Path(src).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"HellaSwag file {src!r} does not exist; pass the official JSONL (e.g. "
                                    f"hellaswag_val.jsonl), its URL, or 'val' (downloaded once)")
    with open(path, encoding="utf-8") as f:
        lines = ((i, line) for i, line in enumerate(f, 1) if line.strip())
        items = [_item(line, f"{src}:{i}") for i, line in itertools.islice(lines, limit)]
    if not items:
        raise ValueError(f"HellaSwag file {src!r} holds no items")
    return items


@dataclass(frozen=True)
class Encoded:
    """Items as model inputs: each ending after its context, inputs and targets right-padded to one length,
    `mask_N4T` 1 on the targets that are the ending's tokens."""
    x_N4T: np.ndarray
    y_N4T: np.ndarray
    mask_N4T: np.ndarray
    label_N: np.ndarray

    def __len__(self) -> int:
        return len(self.label_N)


def encode(items: list[dict], tokenizer: Any, context_length: int) -> Encoded:
    """GPT-2 tokens of context + " " + ending for every ending, cropped from the left to `context_length` inputs."""
    enc = getattr(tokenizer, "encode_ordinary", tokenizer.encode)
    rows = []
    for item in items:
        ctx = enc(item["ctx"])
        for ending in item["endings"]:
            end = enc(" " + ending)
            ids, mask = ctx + end, [0] * len(ctx) + [1] * len(end)
            rows.append((ids[:-1][-context_length:], ids[1:][-context_length:], mask[1:][-context_length:]))
    T = max(len(x) for x, _, _ in rows)
    x, y, m = (np.zeros((len(rows), T), np.int32) for _ in range(3))
    for r, (xs, ys, ms) in enumerate(rows):
        x[r, :len(xs)], y[r, :len(ys)], m[r, :len(ms)] = xs, ys, ms
    n = len(items)
    return Encoded(x.reshape(n, 4, T), y.reshape(n, 4, T), m.reshape(n, 4, T),
                   np.array([it["label"] for it in items], np.int32))


@lru_cache(maxsize=8)
def _ending_losses(cfg: GPTConfig, opts: Options):
    model = GPT(cfg, opts)

    def losses(params, x_BT, y_BT, mask_BT):
        logits_BTV = model.apply({"params": params}, x_BT, deterministic=True)
        nll_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, y_BT)
        return jnp.sum(nll_BT * mask_BT, -1) / jnp.maximum(jnp.sum(mask_BT, -1), 1)

    return jax.jit(losses)


def score(params: Any, cfg: GPTConfig, data: Encoded, *, batch_size: int = 8, opts: Options | None = None) -> dict:
    """Accuracy of `params` (laid out by `opts`, default Options.for_backend()) on encoded items, `batch_size`
    items (4 rows each) a batch: {"accuracy", "n", "predictions" (per item), "losses" (N, 4)}."""
    fn = _ending_losses(cfg.replace(drop_rate=0.0), opts or Options.for_backend())
    n, T = len(data), data.x_N4T.shape[-1]
    B = min(batch_size, n)  # every batch one shape: one compile
    out = []
    for i in range(0, n, B):
        parts = [a[i:i + B] for a in (data.x_N4T, data.y_N4T, data.mask_N4T)]
        parts = [np.pad(a, ((0, B - len(a)), (0, 0), (0, 0))).reshape(B * 4, T) for a in parts]
        out.append(fn(params, *parts))
    losses_N4 = np.concatenate([np.asarray(v).reshape(B, 4) for v in jax.device_get(out)])[:n]
    pred_N = losses_N4.argmin(-1)
    return {"accuracy": float(np.mean(pred_N == data.label_N)), "n": n, "predictions": pred_N.tolist(),
            "losses": losses_N4}


def evaluate_hellaswag(model: Any, source: str | os.PathLike = "val", *, limit: int | None = None,
                       batch_size: int = 8, context_length: int | None = None, bpe_dir: str | None = None,
                       opts: Options | None = None) -> dict:
    """HellaSwag accuracy of `model` (what load_model takes, or a Model (params, cfg)) on `source` (what
    load_hellaswag takes): {"data", "accuracy", "n", "predictions", "losses"}."""
    params, cfg = load_model(model) if isinstance(model, (str, Path)) else model
    T = context_length or cfg.context_length
    if not 0 < T <= cfg.context_length:
        raise ValueError(f"context_length must be in [1, {cfg.context_length}] for this model, got {T}")
    data = encode(load_hellaswag(source, limit=limit), get_gpt2_tokenizer(bpe_dir), T)
    opts = opts or Options.for_backend()
    return {"data": os.fspath(source), **score(to_layout(params, cfg, opts), cfg, data, batch_size=batch_size,
                                               opts=opts)}
