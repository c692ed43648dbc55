"""What the fine-tuning tasks (the classifier, SFT, DPO) share: the padding token, encoding, the `EpochBatches`
base of their batches, Hugging Face splits, options, the trainable/frozen split, steps, a run's start and files."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import lora as lora_lib
from gptjax.config import GPTConfig
from gptjax.engine import LossFn, Steps
from gptjax.layout import layout_fns, to_canonical
from gptjax.model_io import begin_run, save_run
from gptjax.optim import OptimConfig
from gptjax.options import Options

PAD_TOKEN_ID = 50256  # GPT-2's <|endoftext|>: the book's padding (and chapter 7's end-of-response) token


def encode(tokenizer: Any, text: str) -> list[int]:
    try:  # tiktoken: a literal "<|endoftext|>" in a text is text, not the control token
        return tokenizer.encode(text, disallowed_special=())
    except TypeError:
        return tokenizer.encode(text)


class EpochBatches:
    """The task batches' base: `n` items in batches of `batch_size` rows, `batch_at(epoch, i)` a pure function
    of (seed, epoch, i), so a resumed run sees the same batches; drop_last leaves a last partial batch out."""

    def __init__(self, n: int, batch_size: int, *, shuffle: bool, drop_last: bool, seed: int):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.n, self.batch_size, self.shuffle, self.drop_last, self.seed = n, batch_size, shuffle, drop_last, seed

    def check_size(self, name: str, unit: str = "examples") -> None:
        if self.n == 0 or (self.drop_last and self.n < self.batch_size):
            raise ValueError(f"the {name} split has {self.n} {unit}, fewer than batch_size={self.batch_size}; "
                             f"use a smaller --batch-size or more data")

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def rows(self, epoch: int, i: int) -> np.ndarray:
        """The items of batch `i` of `epoch` (fewer than batch_size in a last partial batch)."""
        order_N = np.random.default_rng((self.seed, epoch)).permutation(self.n) if self.shuffle else np.arange(self.n)
        return order_N[i * self.batch_size:(i + 1) * self.batch_size]

    def filled(self, a: np.ndarray, value: Any) -> np.ndarray:
        """`a` completed to batch_size rows with rows of `value`: a last partial batch keeps the batch shape."""
        return np.pad(a, [(0, self.batch_size - len(a))] + [(0, 0)] * (a.ndim - 1), constant_values=value)

    def epoch(self, epoch: int) -> Iterator:
        return (self.batch_at(epoch, i) for i in range(len(self)))

    def __iter__(self):
        return self.epoch(0)


def load_hf_split(src: str, cache_dir: str | os.PathLike | None, local: str) -> Any:
    """The Hugging Face dataset split `src` = 'hf:NAME[:CONFIG][:SPLIT]' names (split default 'train');
    `local` names the file to pass instead when it cannot load."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"loading a Hugging Face dataset needs `pip install datasets`; or pass {local}") from e
    name, config, split = (src[3:].split(":", 2) + [None, None])[:3]
    if not name:
        raise ValueError(f"data {src!r} names no dataset; use 'hf:NAME[:CONFIG][:SPLIT]'")
    try:
        return datasets.load_dataset(name, config or None, split=split or "train",
                                     cache_dir=None if cache_dir is None else str(Path(cache_dir) / "hf"))
    except Exception as e:
        raise ValueError(f"could not load Hugging Face dataset {src!r}: {type(e).__name__}: {e}; check the name, "
                         f"config and split, or pass {local}") from e


def finetune_options(opts: Options | None, lora: lora_lib.LoRAConfig | None) -> Options:
    """`opts` or Options.for_backend(); refused with LoRA unless kernels are (in, out), as its adapters."""
    opts = opts or Options.for_backend()
    if lora is not None and opts.linear_layout != "in_out":
        raise ValueError(f"LoRA adapters train on (in, out) kernels, but the options lay them out "
                         f"{opts.linear_layout!r}; use Options(linear_layout='in_out') (CLI: drop --linear-layout)")
    return opts


def split_trainable(params: dict, lora: lora_lib.LoRAConfig | None, key: jax.Array) -> tuple[dict, dict]:
    """(trainable, frozen): every weight trains, or (LoRA) only fresh adapters do and the weights are frozen."""
    if lora is None:
        return {"params": jax.tree_util.tree_map(jnp.copy, params)}, {}
    return {"lora": lora_lib.init_lora(params, lora, key)}, params


def check_pad_token(cfg: GPTConfig, pad_token_id: int) -> None:
    if cfg.vocab_size <= pad_token_id:
        raise ValueError(f"the model's vocab_size={cfg.vocab_size} cannot hold the end-of-text token {pad_token_id} "
                         f"(GPT-2's <|endoftext|>); use a model with vocab_size 50257")


def make_steps(make_loss: Callable[[Options], LossFn], cfg: GPTConfig, optim: OptimConfig, trainable: Any,
               frozen: Any, mesh: jax.sharding.Mesh | None, strategy: str, opts: Options | None) -> Steps:
    """The engine's steps of the loss `make_loss(opts)`: only `trainable` gets gradients and optimizer state.
    `opts` (default Options.for_backend()) lays out the weights; checkpoints hold canonical ones."""
    opts = opts or Options.for_backend()
    return Steps(make_loss(opts), optim, trainable, frozen=frozen, mesh=mesh, strategy=strategy,
                 layout=layout_fns(cfg, opts, "params"))


def begin(out_dir: str | Path, cfg: GPTConfig, opts: Options, task: str, settings: dict,
          resume: bool | int) -> tuple[Path, dict]:
    """model_io.begin_run, config.json holding the model, the options and the task's `settings`; returns the run
    directory and engine.run's `meta` (what the checkpoints a resume restores must match)."""
    out_dir = begin_run(out_dir, {"model": cfg.to_dict(), "options": opts.to_dict(), task: settings}, resume=resume)
    return out_dir, {"task": task, "model": cfg.to_dict()}


def save_finished(out_dir: Path, trainable: dict, frozen: Any, lora: lora_lib.LoRAConfig | None, cfg: GPTConfig,
                  opts: Options, header: dict, adapters_extra: dict | None = None,
                  **adapters_meta) -> tuple[dict, dict]:
    """A finished run's files: with LoRA, adapters.safetensors (the adapters, `adapters_extra` params beside them,
    `adapters_meta`); params/ (LoRA merged in, canonical) and config.json (`header`, "finished").
    Returns the merged params (as `opts` lays them out) and their canonical copy."""
    merged = lora_lib.full_params(trainable, frozen, lora.scale if lora else 1.0)
    if lora is not None:
        lora_lib.save_adapters(out_dir / "adapters.safetensors", trainable["lora"], lora, adapters_extra,
                               metadata=adapters_meta)
    canonical = to_canonical(merged, cfg, opts)
    save_run(out_dir, canonical, cfg, extra={"options": opts.to_dict(), **header, "status": "finished"})
    return merged, canonical
