"""What the fine-tuning tasks (the classifier, SFT, DPO) share: the padding token, encoding, the `EpochBatches`
base of their batches, Hugging Face splits, the trainable/frozen split and a finished run's files."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import lora as lora_lib
from gptjax.config import GPTConfig
from gptjax.layout import to_canonical
from gptjax.model_io import save_run
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

    def epoch(self, epoch: int, start: int = 0) -> Iterator:
        for i in range(start, len(self)):
            yield self.batch_at(epoch, i)

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


def check_lora_layout(lora: lora_lib.LoRAConfig | None, opts: Options) -> None:
    """LoRA adapters are (in, out), as the kernels of the canonical layout: refuse (out, in) kernels."""
    if lora is not None and opts.linear_layout != "in_out":
        raise ValueError(f"LoRA adapters train on (in, out) kernels, but the options lay them out "
                         f"{opts.linear_layout!r}; use Options(linear_layout='in_out') (CLI: drop --linear-layout)")


def split_trainable(params: dict, lora: lora_lib.LoRAConfig | None, key: jax.Array) -> tuple[dict, dict]:
    """(trainable, frozen): every weight trains, or (LoRA) only fresh adapters do and the weights are frozen."""
    if lora is None:
        return {"params": jax.tree_util.tree_map(jnp.copy, params)}, {}
    return {"lora": lora_lib.init_lora(params, lora, key)}, params


def check_pad_token(cfg: GPTConfig, pad_token_id: int) -> None:
    if cfg.vocab_size <= pad_token_id:
        raise ValueError(f"the model's vocab_size={cfg.vocab_size} cannot hold the end-of-text token {pad_token_id} "
                         f"(GPT-2's <|endoftext|>); use a model with vocab_size 50257")


def save_finished(out_dir: Path, trainable: dict, frozen: Any, lora: lora_lib.LoRAConfig | None, cfg: GPTConfig,
                  opts: Options, header: dict, adapters_extra: dict | None = None,
                  **adapters_meta) -> tuple[dict, dict]:
    """A finished fine-tuning run's files (SFT, DPO, classifier): with LoRA, adapters.safetensors (the adapters,
    `adapters_extra` params beside them, `adapters_meta`); params/ (LoRA merged in, canonical) and config.json
    (`header`, "finished"). Returns the merged params (as `opts` lays them out) and their canonical copy."""
    merged = lora_lib.full_params(trainable, frozen, lora.scale if lora else 1.0)
    if lora is not None:
        lora_lib.save_adapters(out_dir / "adapters.safetensors", trainable["lora"], lora, adapters_extra,
                               metadata=adapters_meta)
    canonical = to_canonical(merged, cfg, opts)
    save_run(out_dir, canonical, cfg, extra={"options": opts.to_dict(), **header, "status": "finished"})
    return merged, canonical
