"""Instruction fine-tuning (the book's chapter 7): Alpaca data, the book's collate, SFT (full or LoRA), responses.

Data: Alpaca-style records {instruction, input, output} from the book's instruction-data.json (downloaded
once), a local JSON file or a Hugging Face dataset, split 85 / 10 / 5 (train / test / val) in file order
as the book. Prompts: the book's Alpaca template or its exercise-7.1 Phi-3 template.
Batches: the book's custom_collate_fn (append <|endoftext|>, pad with it, mask all padding targets but
the first with -100), optionally masking the prompt (exercise 7.2) and padding to length buckets so the
jitted step compiles once per bucket instead of once per batch length.
Training: the shared `run_loop` (also used by DPO) over jitted steps whose state holds only what trains:
every weight, or LoRA adapters beside frozen weights. Responses: greedy KV-cache decoding of many prompts of
different lengths at once, text after the prompt, saved in the book's instruction-data-with-response.json.

Letters: N examples, B batch, T time, V vocab.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gptjax import lora as lora_lib
from gptjax.config import GPTConfig
from gptjax.model import GPT, count_params, dropout_rngs, map_param_trees, to_canonical, to_layout
from gptjax.options import Options
from gptjax.train import IGNORE_INDEX, OptimConfig, TrainState, global_norm, make_optimizer

INSTRUCTION_DATA_URL = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/"
                        "instruction-data.json")
INSTRUCTION_DATA_SHA256 = "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944"
PAD_TOKEN_ID = 50256  # GPT-2's <|endoftext|>: the book's end-of-response and padding token
STYLES = ("alpaca", "phi3")
_ALPACA_HEAD = ("Below is an instruction that describes a task. "
                "Write a response that appropriately completes the request.")
# what starts the answer, and the marker the book strips from generated text
_RESPONSE_PREFIX = {"alpaca": "\n\n### Response:\n", "phi3": "\n<|assistant|>:\n"}
_RESPONSE_MARKER = {"alpaca": "### Response:", "phi3": "<|assistant|>:"}


# --- prompts -------------------------------------------------------------------------------------

def _check_style(style: str) -> str:
    if style not in STYLES:
        raise ValueError(f"unknown prompt style {style!r}; choose one of {STYLES}")
    return style


def format_input(entry: dict, style: str = "alpaca") -> str:
    """The book's format_input: the instruction (and input) in the Alpaca or the Phi-3 template (exercise 7.1)."""
    if _check_style(style) == "phi3":
        return f"<|user|>\n{entry['instruction']}" + (f"\n{entry['input']}" if entry.get("input") else "")
    return (f"{_ALPACA_HEAD}\n\n### Instruction:\n{entry['instruction']}"
            + (f"\n\n### Input:\n{entry['input']}" if entry.get("input") else ""))


def response_prefix(style: str = "alpaca") -> str:
    return _RESPONSE_PREFIX[_check_style(style)]


def format_example(entry: dict, style: str = "alpaca", response_key: str = "output") -> str:
    """Prompt plus answer, the text a training example is made of."""
    return format_input(entry, style) + response_prefix(style) + entry[response_key]


def extract_response(generated_text: str, prompt: str, style: str = "alpaca") -> str:
    """The book's `generated_text[len(input_text):].replace("### Response:", "").strip()`."""
    return generated_text[len(prompt):].replace(_RESPONSE_MARKER[_check_style(style)], "").strip()


# --- data ----------------------------------------------------------------------------------------

def _check_entries(data: Any, where: str, keys: Sequence[str] = ("instruction", "output")) -> list[dict]:
    if isinstance(data, dict):  # {"train": [...]} or {"data": [...]} wrappers
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1:
            data = lists[0]
    if not isinstance(data, list) or not data:
        raise ValueError(f"{where} holds no list of records; expected a JSON list of objects with keys "
                         f"{list(keys)} (+ optional 'input')")
    out = []
    for i, e in enumerate(data):
        if not isinstance(e, dict):
            raise ValueError(f"{where}: record {i} is {type(e).__name__}, not an object with keys {list(keys)}")
        missing = [k for k in keys if k not in e]
        if missing:
            raise ValueError(f"{where}: record {i} lacks {missing} (it has {sorted(e)}); every record needs "
                             f"{list(keys)}")
        out.append({**e, "input": e.get("input") or ""})
    return out


def load_json_records(source: str | os.PathLike | None = None, *, url: str = INSTRUCTION_DATA_URL,
                      sha256: str | None = INSTRUCTION_DATA_SHA256, keys: Sequence[str] = ("instruction", "output"),
                      cache_dir: str | os.PathLike | None = None) -> list[dict]:
    """Records from None/'default' (`url`, downloaded once), a JSON file, an http(s) URL or 'hf:NAME'."""
    from gptjax.data import cached_download

    src = None if source is None else os.fspath(source)
    if src is None or src == "default":
        try:
            path = cached_download(url, cache_dir=cache_dir, sha256=sha256)
        except RuntimeError as e:
            raise FileNotFoundError(f"{e}. The file is {Path(url).name} from the book's repository: pass a local "
                                    f"copy (CLI: --data PATH)") from None
        src = str(path)
    elif src.startswith("hf:"):
        return _check_entries(_load_hf_records(src, cache_dir), repr(src), keys)
    elif src.startswith(("http://", "https://")):
        src = str(cached_download(src, cache_dir=cache_dir))
    path = Path(src).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist; pass a JSON file of records, an http(s) "
                                f"URL, 'hf:NAME' or 'default'")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path)!r} is not valid JSON ({e}); expected a list of records") from None
    return _check_entries(data, repr(str(path)), keys)


def load_instruction_data(source: str | os.PathLike | None = None, *,
                          cache_dir: str | os.PathLike | None = None) -> list[dict]:
    """The book's instruction-data.json (1,100 records, downloaded once) or any Alpaca-style JSON / HF dataset."""
    return load_json_records(source, cache_dir=cache_dir)


def _load_hf_records(src: str, cache_dir) -> list[dict]:
    try:
        import datasets
    except ImportError as e:
        raise ImportError("loading a Hugging Face dataset needs `pip install datasets`; or save it as a JSON "
                          "list of records and pass the path") from e
    name, config, split = (src[3:].split(":", 2) + [None, None])[:3]
    if not name:
        raise ValueError(f"data {src!r} names no dataset; use 'hf:NAME[:CONFIG][:SPLIT]' "
                         f"(e.g. hf:yahma/alpaca-cleaned)")
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train",
                                   cache_dir=None if cache_dir is None else str(Path(cache_dir) / "hf"))
    except Exception as e:
        raise ValueError(f"could not load Hugging Face dataset {src!r}: {type(e).__name__}: {e}; check the name, "
                         f"config and split, or pass a local JSON file") from e
    return [dict(r) for r in ds]


def split_data(data: Sequence[dict], train_frac: float = 0.85, test_frac: float = 0.10) -> dict[str, list[dict]]:
    """The book's split, in file order (no shuffle): train 85%, test 10%, validation the rest (935/110/55)."""
    if not (0 < train_frac < 1 and 0 <= test_frac < 1 and train_frac + test_frac <= 1):
        raise ValueError(f"split fractions must satisfy 0 < train < 1, 0 <= test, train + test <= 1; got "
                         f"train={train_frac}, test={test_frac}")
    n_train, n_test = int(len(data) * train_frac), int(len(data) * test_frac)
    splits = {"train": list(data[:n_train]), "test": list(data[n_train:n_train + n_test]),
              "val": list(data[n_train + n_test:])}
    if not splits["train"] or not splits["val"]:
        raise ValueError(f"{len(data)} records give {len(splits['train'])} training and {len(splits['val'])} "
                         f"validation examples; use more data")
    return splits


def encode(tokenizer: Any, text: str) -> list[int]:
    try:  # tiktoken: a literal "<|endoftext|>" inside a record is text, not the control token
        return tokenizer.encode(text, disallowed_special=())
    except TypeError:
        return tokenizer.encode(text)


@dataclass
class InstructionExamples:
    """Token ids of prompt + response per example, and where the instruction and the answer text start."""
    ids: list[list[int]]
    instruction_len: list[int]  # tokens of format_input (the book's exercise-7.2 mask)
    response_start: list[int]   # tokens before the answer text (prompt + response header)

    def __len__(self) -> int:
        return len(self.ids)


def _prefix_len(full: list[int], prefix: list[int]) -> int:
    """Tokens of `full` that are `prefix` (BPE can merge across the boundary; then the common part)."""
    n = min(len(prefix), len(full))
    if full[:n] == prefix[:n]:
        return n
    return next(i for i, (a, b) in enumerate(zip(full, prefix)) if a != b)


def encode_examples(entries: Sequence[dict], tokenizer: Any, style: str = "alpaca",
                    response_key: str = "output") -> InstructionExamples:
    """The book's InstructionDataset: `tokenizer.encode(format_input(entry) + response)` per record."""
    ids, inst, start = [], [], []
    for e in entries:
        full = encode(tokenizer, format_example(e, style, response_key))
        ids.append(full)
        inst.append(_prefix_len(full, encode(tokenizer, format_input(e, style))))
        start.append(_prefix_len(full, encode(tokenizer, format_input(e, style) + response_prefix(style))))
    return InstructionExamples(ids, inst, start)


# --- the book's collate ----------------------------------------------------------------------------

def bucket_length(n: int, multiple: int, cap: int | None = None) -> int:
    """`n` rounded up to a multiple of `multiple`, at most `cap` (never below n when n <= cap)."""
    t = -(-n // multiple) * multiple if multiple > 1 else n
    return min(t, cap) if cap is not None else t


def collate(batch: Sequence[Sequence[int]], *, pad_token_id: int = PAD_TOKEN_ID, ignore_index: int = IGNORE_INDEX,
            allowed_max_length: int | None = None, mask_lengths: Sequence[int] | None = None,
            pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The book's custom_collate_fn -> (inputs_BT, targets_BT) int32.

    Each item gets one <|endoftext|>, then padding to the longest item + 1; inputs drop the last token,
    targets the first; every padding target but the first becomes `ignore_index`; both are cut to
    `allowed_max_length`. `mask_lengths[i]` (exercise 7.2): the first n tokens of item i are prompt, so
    `targets[:n - 1]` are ignored too. `pad_to`: pad inputs to at least this length (a bucket); the
    extra positions are padding with ignored targets, so the loss equals the book's.
    """
    if not batch:
        raise ValueError("collate needs at least one example")
    batch_max_length = max(len(item) + 1 for item in batch)
    if pad_to is not None:
        batch_max_length = max(batch_max_length, pad_to + 1)
    inputs, targets = [], []
    for i, item in enumerate(batch):
        padded = np.full(batch_max_length, pad_token_id, np.int32)
        padded[:len(item)] = item
        x_T, y_T = padded[:-1], padded[1:].copy()
        pads = np.flatnonzero(y_T == pad_token_id)
        if pads.size > 1:
            y_T[pads[1:]] = ignore_index
        if mask_lengths is not None:
            y_T[:max(int(mask_lengths[i]) - 1, 0)] = ignore_index
        if allowed_max_length is not None:
            x_T, y_T = x_T[:allowed_max_length], y_T[:allowed_max_length]
        inputs.append(x_T)
        targets.append(y_T)
    return np.stack(inputs), np.stack(targets)


MASKS = ("none", "instruction", "prompt")


class InstructionBatches:
    """Batches of the book's collate; a last partial batch is filled with ignored rows so B never changes.

    `pad_multiple` > 1 pads T up to a multiple of it (capped at `allowed_max_length`): a run then
    compiles one step per bucket. `mask`: 'none' (the book), 'instruction' (exercise 7.2: the tokens of
    format_input) or 'prompt' (everything before the answer text, the response header too).
    """

    def __init__(self, examples: InstructionExamples, batch_size: int, *, shuffle: bool, drop_last: bool,
                 seed: int = 123, pad_multiple: int = 1, allowed_max_length: int | None = 1024, mask: str = "none",
                 pad_token_id: int = PAD_TOKEN_ID, name: str = "data"):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if pad_multiple < 1:
            raise ValueError(f"pad_multiple must be >= 1 (1 = the book's per-batch length), got {pad_multiple!r}")
        if mask not in MASKS:
            raise ValueError(f"unknown prompt mask {mask!r}; choose one of {MASKS}")
        if len(examples) == 0 or (drop_last and len(examples) < batch_size):
            raise ValueError(f"the {name} split has {len(examples)} examples, fewer than batch_size={batch_size}; "
                             f"use a smaller --batch-size or more data")
        self.examples, self.batch_size, self.shuffle, self.drop_last = examples, batch_size, shuffle, drop_last
        self.seed, self.pad_multiple, self.allowed_max_length = seed, pad_multiple, allowed_max_length
        self.mask, self.pad_token_id = mask, pad_token_id
        self._masks = {"none": None, "instruction": examples.instruction_len, "prompt": examples.response_start}[mask]

    def __len__(self) -> int:
        n, b = len(self.examples), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def order(self, epoch: int) -> np.ndarray:
        n = len(self.examples)
        return np.random.default_rng((self.seed, epoch)).permutation(n) if self.shuffle else np.arange(n)

    def batch_at(self, epoch: int, i: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self.order(epoch)[i * self.batch_size:(i + 1) * self.batch_size]
        items = [self.examples.ids[r] for r in rows]
        longest = max(len(it) for it in items)
        cap = self.allowed_max_length
        pad_to = bucket_length(longest, self.pad_multiple, cap) if self.pad_multiple > 1 else None
        masks = None if self._masks is None else [self._masks[r] for r in rows]
        x_BT, y_BT = collate(items, pad_token_id=self.pad_token_id, allowed_max_length=cap, mask_lengths=masks,
                             pad_to=pad_to)
        if len(rows) < self.batch_size:  # filler rows: all targets ignored, the loss is unchanged
            fill = self.batch_size - len(rows)
            x_BT = np.concatenate([x_BT, np.full((fill, x_BT.shape[1]), self.pad_token_id, np.int32)])
            y_BT = np.concatenate([y_BT, np.full((fill, y_BT.shape[1]), IGNORE_INDEX, np.int32)])
        return x_BT, y_BT

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for i in range(start, len(self)):
            yield self.batch_at(epoch, i)

    def __iter__(self):
        return self.epoch(0)

    def shapes(self, epoch: int = 0) -> set[tuple[int, int]]:
        """Batch shapes of one pass: the programs a jitted step compiles for it."""
        return {self.batch_at(epoch, i)[0].shape for i in range(len(self))}


# --- model, loss and steps -------------------------------------------------------------------------

def load_base_model(spec: str, *, random_cfg: GPTConfig | None = None, seed: int = 123) -> tuple[dict, GPTConfig]:
    """'random' (a fresh GPT of `random_cfg`), a gptjax run directory, a GPT-2 size or a local HF-format dir/file."""
    from gptjax.checkpoint import load_base_model as load

    return load(spec, random_cfg=random_cfg, seed=seed, language_model=True)


def full_params(trainable: dict, frozen: dict, lora_scale: float = 1.0) -> dict:
    """Model params from what trains and what does not: all weights, or frozen weights + LoRA merged in."""
    params = trainable.get("params") or frozen
    return lora_lib.merge(params, trainable.get("lora"), lora_scale)


def split_trainable(params: dict, lora: lora_lib.LoRAConfig | None, key: jax.Array) -> tuple[dict, dict]:
    """(trainable, frozen): every weight trains, or (LoRA) only fresh adapters do and the weights are frozen."""
    if lora is None:
        return {"params": jax.tree_util.tree_map(jnp.copy, params)}, {}
    return {"lora": lora_lib.init_lora(params, lora, key)}, params


def token_nll(logits_BTV: jax.Array, targets_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(summed negative log-likelihood, count) over targets that are not IGNORE_INDEX, float32."""
    valid_BT = targets_BT != IGNORE_INDEX
    nll_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32),
                                                             jnp.where(valid_BT, targets_BT, 0))
    return jnp.sum(nll_BT * valid_BT), jnp.sum(valid_BT)


def make_sft_steps(cfg: GPTConfig, tx: optax.GradientTransformation, lora_scale: float = 1.0,
                   opts: Options | None = None):
    """Jitted `train_step(state, frozen, (x, y)) -> (state, metrics)` and `eval_step(trainable, frozen, (x, y))`.

    `state.params` holds only what trains; `frozen` is an argument (not a closure) so no weight is baked
    into the program. The loss is the book's: mean cross-entropy over targets that are not -100.
    """
    model = GPT(cfg, opts or Options.for_backend())

    def loss_fn(trainable, frozen, x_BT, y_BT, key):
        rngs = dropout_rngs(key)
        logits_BTV = model.apply({"params": full_params(trainable, frozen, lora_scale)}, x_BT,
                                 deterministic=key is None, rngs=rngs)
        nll, count = token_nll(logits_BTV, y_BT)
        return nll / jnp.maximum(count, 1)

    @partial(jax.jit, donate_argnums=0)
    def train_step(state: TrainState, frozen, batch):
        x_BT, y_BT = batch
        key = jax.random.fold_in(state.key, state.step) if cfg.drop_rate > 0 else None
        loss, grads = jax.value_and_grad(loss_fn)(state.params, frozen, x_BT, y_BT, key)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        metrics = {"loss": loss, "grad_norm": global_norm(grads)}
        return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                             opt_state=opt_state), metrics

    @jax.jit
    def eval_step(trainable, frozen, batch):
        x_BT, y_BT = batch
        return {"loss": loss_fn(trainable, frozen, x_BT, y_BT, None)}

    return train_step, eval_step


@lru_cache(maxsize=4)
def compiled_sft_steps(cfg: GPTConfig, ocfg: OptimConfig, lora_scale: float = 1.0, opts: Options | None = None):
    """(tx, train_step, eval_step) per settings: runs in one process (a resume, a sweep) share the compiled steps."""
    tx = make_optimizer(ocfg)
    return (tx, *make_sft_steps(cfg, tx, lora_scale, opts))


# --- the fine-tuning loop (SFT and DPO) ------------------------------------------------------------

@dataclass
class InstructTrainConfig:
    """The book's chapter-7 run: AdamW lr 5e-5, weight decay 0.1, batch 8, 2 epochs, evaluation every 5 steps."""
    epochs: int = 2
    batch_size: int = 8
    eval_freq: int = 5
    eval_iter: int = 5
    seed: int = 123
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-5, weight_decay=0.1))
    save_every: int = 0          # steps between checkpoints; 0 = at the end of every epoch
    keep_checkpoints: int = 1
    sample_tokens: int = 35      # greedy sample of the first validation prompt after each epoch (0: none)

    def __post_init__(self):
        for name in ("epochs", "batch_size", "eval_freq", "eval_iter", "keep_checkpoints"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.save_every < 0 or self.sample_tokens < 0:
            raise ValueError(f"save_every and sample_tokens must be >= 0, got {self.save_every!r} and "
                             f"{self.sample_tokens!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def mean_metrics(eval_step: Callable, trainable: dict, frozen: Any, batches: Iterator,
                 num_batches: int | None = None) -> dict[str, float]:
    """The book's calc_loss_loader for every metric: the mean of per-batch values over the first batches."""
    vals: list[dict] = []
    for i, batch in enumerate(batches):
        if num_batches is not None and i >= num_batches:
            break
        vals.append(eval_step(trainable, frozen, batch))
    if not vals:
        return {}
    vals = jax.device_get(vals)
    return {k: float(np.mean([v[k] for v in vals])) for k in vals[0]}


def _shape(batch) -> tuple:
    return tuple(tuple(np.shape(x)) for x in jax.tree_util.tree_leaves(batch))


def run_loop(tcfg: Any, state: TrainState, frozen: Any, train_b, val_b, out_dir: str | Path, *,
             train_step: Callable, eval_step: Callable, count_tokens: Callable[[Any], int],
             sample: Callable[[dict], str] | None = None, meta: dict | None = None, resume: bool = False,
             progress: bool = True, stop_after: int | None = None, desc: str = "finetune",
             cfg: GPTConfig | None = None, opts: Options | None = None) -> dict:
    """The book's train_model_simple (and train_model_dpo_simple) over a jitted step, checkpointed and resumable.

    Every `eval_freq` steps it logs the mean of `eval_step`'s metrics over `eval_iter` batches of the
    training and validation data to metrics.jsonl; every step's own metrics go to steps.jsonl. It
    checkpoints every `save_every` steps (0: each epoch end) into out_dir/checkpoints; `resume` continues
    from the latest one exactly. SIGINT/SIGTERM (or `stop_after` steps) save and raise TrainingInterrupted.
    The step donates `state`: pass arrays the caller no longer needs. Returns the final state, the
    evaluation history, the epoch samples and the batch shapes the steps were compiled for.
    With `cfg` and `opts` (the layout of `state.params`), checkpoints hold canonical params and state.
    """
    from gptjax.checkpoint import CHECKPOINTS_DIR, GracefulStop, TrainCheckpoints, TrainingInterrupted

    out_dir = Path(out_dir)
    n_batches = len(train_b)
    total = tcfg.epochs * n_batches
    expect = {"task": (meta or {}).get("task"), "model": (meta or {}).get("model") or {},
              "train": {k: v for k, v in tcfg.to_dict().items() if k not in ("save_every", "keep_checkpoints")},
              "steps_per_epoch": n_batches}
    ckpts = TrainCheckpoints(out_dir / CHECKPOINTS_DIR, keep=tcfg.keep_checkpoints, async_save=False)
    convert = opts is not None and not opts.canonical_layout

    def saved(trainable, opt_state, fn):  # the model params in trainable["params"] and their moments, through fn
        if not convert or "params" not in trainable:
            return trainable, opt_state
        return {**trainable, "params": fn(trainable["params"])}, map_param_trees(fn, opt_state, trainable["params"])
    steps_path, metrics_path = out_dir / "steps.jsonl", out_dir / "metrics.jsonl"
    try:
        if resume:
            p, o = jax.eval_shape(lambda p, o: saved(p, o, lambda t: to_canonical(t, cfg, opts)), state.params,
                                  state.opt_state)
            params, rest, meta_ = ckpts.restore(p, {"step": state.step, "opt_state": o, "key": state.key},
                                                expect=expect)
            params, rest["opt_state"] = saved(params, rest["opt_state"], lambda t: to_layout(t, cfg, opts))
            state = TrainState(params=params, **rest)
            done, tokens_seen, history = int(state.step), meta_["tokens_seen"], meta_["history"]
            samples, wall_before = meta_["samples"], meta_["wall_s"]
            for path in (steps_path, metrics_path):  # drop what the run logged after its checkpoint
                if path.is_file():
                    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] < done]
                    path.write_text("".join(ln + "\n" for ln in keep))
            print(f"resuming from {ckpts.describe(done)}")
        else:
            if ckpts.latest_step() is not None:
                ckpts.delete_all()
            done, tokens_seen, history, samples, wall_before = 0, 0, {}, [], 0.0
            steps_path.write_text("")
            metrics_path.write_text("")
        shapes = {"train": set(), "eval": set()}

        def evaluate(tag: int) -> dict[str, float]:
            tr = mean_metrics(eval_step, state.params, frozen, _counted(train_b.epoch(10**6 + tag), "eval"),
                              tcfg.eval_iter)
            va = mean_metrics(eval_step, state.params, frozen, _counted(val_b.epoch(0), "eval"), tcfg.eval_iter)
            return {**{f"train_{k}": v for k, v in tr.items()}, **{f"val_{k}": v for k, v in va.items()}}

        def _counted(batches, kind):
            for b in batches:
                shapes[kind].add(_shape(b))
                yield b

        pending: list[tuple[int, int, dict]] = []  # per-step metrics still on device: no host sync per step

        def flush(log) -> None:
            for (s, ep, _), m in zip(pending, jax.device_get([m for *_, m in pending])):
                rec = {"step": s, "epoch": ep, **{k: float(v) for k, v in m.items()}}
                if not all(math.isfinite(v) for v in rec.values()):
                    raise FloatingPointError(f"training diverged at step {s}: {rec}; lower the learning rate (--lr); "
                                             f"the last good checkpoint is {ckpts.describe(ckpts.latest_step())}")
                log.write(json.dumps(rec) + "\n")
            log.flush()
            pending.clear()

        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=done, disable=not progress, desc=desc, unit="step")
        t0 = time.time()
        with GracefulStop() as stop, steps_path.open("a") as slog, metrics_path.open("a") as mlog:
            epoch0, i0 = divmod(done, n_batches)
            for epoch in range(epoch0, tcfg.epochs):
                for i in range(i0 if epoch == epoch0 else 0, n_batches):
                    batch = train_b.batch_at(epoch, i)
                    shapes["train"].add(_shape(batch))
                    state, metrics = train_step(state, frozen, batch)
                    step = epoch * n_batches + i  # the book's global_step, from 0
                    done = step + 1
                    tokens_seen += count_tokens(batch)
                    pending.append((step, epoch + 1, metrics))
                    bar.update(1)
                    if step % tcfg.eval_freq == 0:
                        flush(slog)
                        rec = {"step": step, "epoch": epoch + 1, "tokens_seen": tokens_seen, **evaluate(step),
                               "elapsed_s": round(wall_before + time.time() - t0, 2)}
                        if not math.isfinite(rec["train_loss"]):
                            raise FloatingPointError(f"training diverged: loss {rec['train_loss']} after step {step}; "
                                                     f"lower the learning rate (--lr)")
                        mlog.write(json.dumps(rec) + "\n")
                        mlog.flush()
                        for k, v in rec.items():
                            history.setdefault(k, []).append(v)
                        bar.write(f"Ep {epoch + 1} (Step {step:06d}): " + ", ".join(
                            f"{k.replace('_', ' ')} {v:.3f}" for k, v in rec.items()
                            if k.startswith(("train_", "val_"))))
                    if i == n_batches - 1 and sample is not None:
                        samples.append({"epoch": epoch + 1, "text": sample(state.params)})
                        bar.write(f"Ep {epoch + 1} sample: {samples[-1]['text']!r}")
                    stopping = stop.requested or (stop_after is not None and done >= stop_after)
                    if stopping or done == total or (done % tcfg.save_every == 0 if tcfg.save_every
                                                     else i == n_batches - 1):
                        flush(slog)
                        val = history.get("val_loss", [None])[-1]
                        p, o = saved(state.params, state.opt_state, lambda t: to_canonical(t, cfg, opts))
                        path = ckpts.save(done, p, {"step": state.step, "opt_state": o, "key": state.key},
                                          {**expect, "tokens_seen": tokens_seen, "history": history,
                                           "samples": samples, "wall_s": round(wall_before + time.time() - t0, 2)},
                                          val)
                    if stopping:
                        bar.close()
                        why = f"by {stop.name}" if stop.requested else f"after {stop_after} steps as asked"
                        raise TrainingInterrupted(
                            f"training stopped {why} after step {step} (epoch {epoch + 1}); checkpoint saved to "
                            f"{path}. Resume with the same command plus --resume", signum=stop.signum, step=done,
                            checkpoint=path, state=state)
            flush(slog)
        bar.close()
    finally:
        ckpts.close()
    return {"state": state, "history": history, "samples": samples, "tokens_seen": tokens_seen,
            "wall_s": wall_before + time.time() - t0, "steps": int(state.step),
            "compiled_shapes": {k: sorted(v) for k, v in shapes.items()}}


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []


def plot_history(history: dict, path: str | Path, keys: Sequence[tuple[str, str]] = (("train_loss", "Training loss"),
                 ("val_loss", "Validation loss")), ylabel: str = "Loss", title: str | None = None) -> None:
    """The book's plot_losses: metrics against steps, tokens seen on a twin x-axis."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax1 = plt.subplots(figsize=(5, 3))
    for (k, label), style in zip(keys, ("-", "-.", "--", ":")):
        if k in history:
            ax1.plot(history["step"], history[k], linestyle=style, label=label)
    ax1.set_xlabel("Steps")
    ax1.set_ylabel(ylabel)
    ax1.legend(loc="best")
    if history.get("tokens_seen"):
        ax2 = ax1.twiny()
        ax2.plot(history["tokens_seen"], history[keys[0][0]], alpha=0)
        ax2.set_xlabel("Tokens seen")
    if title:
        ax1.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- generation ----------------------------------------------------------------------------------

def generate_responses(params: dict, cfg: GPTConfig, entries: Sequence[dict], tokenizer: Any, *,
                       style: str = "alpaca", max_new_tokens: int = 256, batch_size: int = 8,
                       temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                       seed: int = 123, eos_id: int | None = PAD_TOKEN_ID, progress: bool = False,
                       return_finished: bool = False, opts: Options | None = None
                       ) -> list[str] | tuple[list[str], list[bool]]:
    """The book's test-set loop: generate after format_input(entry) (greedy, 256 tokens, stop at
    <|endoftext|>) and keep the text after the prompt without the "### Response:" marker. Prompts of
    different lengths are decoded `batch_size` at a time (KV cache), each as if alone.
    `return_finished` also returns, per answer, whether it ended with `eos_id` before the limit."""
    from tqdm.auto import tqdm

    from gptjax.generate import decoding_model, generate_batch

    params, opts = decoding_model(params, cfg, opts)  # once for all the batches
    prompts = [format_input(e, style) for e in entries]
    ids = [encode(tokenizer, p) for p in prompts]
    out, finished = [], []
    key = jax.random.key(seed)
    for start in tqdm(range(0, len(ids), batch_size), disable=not progress, desc="respond", unit="batch"):
        chunk = ids[start:start + batch_size]
        n = len(chunk)
        if n < batch_size and len(ids) > batch_size:  # same batch size as the others: no new program
            chunk = chunk + [chunk[-1]] * (batch_size - n)
        new = generate_batch(params, cfg, chunk, max_new_tokens, temperature=temperature, top_k=top_k,
                             top_p=top_p, eos_id=eos_id, key=jax.random.fold_in(key, start), opts=opts)[:n]
        for p, p_ids, n_ids in zip(prompts[start:start + n], chunk, new):
            out.append(extract_response(tokenizer.decode(list(p_ids) + list(n_ids)), p, style))
            finished.append(len(n_ids) < max_new_tokens)  # generate_batch drops the eos it stopped at
    return (out, finished) if return_finished else out


def save_responses(entries: Sequence[dict], responses: Sequence[str], path: str | Path,
                   key: str = "model_response") -> Path:
    """The book's instruction-data-with-response.json: each record plus its `model_response` (indent 4)."""
    from gptjax.checkpoint import write_json_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, [{**e, key: r} for e, r in zip(entries, responses)], indent=4)
    return path


# --- offline evaluation --------------------------------------------------------------------------

def response_nll(params: dict, cfg: GPTConfig, entries: Sequence[dict], tokenizer: Any, *, style: str = "alpaca",
                 response_key: str = "output", batch_size: int = 8, pad_multiple: int = 64,
                 pad_token_id: int = PAD_TOKEN_ID, opts: Options | None = None) -> dict[str, float]:
    """Loss and perplexity of the reference answers given their prompts: mean cross-entropy per token over
    the answer text and its <|endoftext|>, the prompt and the response header excluded."""
    if not entries:
        return {"loss": float("nan"), "perplexity": float("nan"), "tokens": 0}
    ex = encode_examples(entries, tokenizer, style, response_key)
    batches = InstructionBatches(ex, batch_size, shuffle=False, drop_last=False, pad_multiple=pad_multiple,
                                 allowed_max_length=cfg.context_length, mask="prompt", pad_token_id=pad_token_id)
    total, count = 0.0, 0
    for batch in batches:
        nll, n = _nll_batch(params, batch, cfg=cfg, opts=opts or Options())
        total, count = total + float(nll), count + int(n)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count}


@partial(jax.jit, static_argnames=("cfg", "opts"))
def _nll_batch(params, batch, *, cfg: GPTConfig, opts: Options):
    x_BT, y_BT = batch
    return token_nll(GPT(cfg, opts).apply({"params": params}, x_BT, deterministic=True), y_BT)


def offline_report(entries: Sequence[dict], responses: Sequence[str] | None = None, *, params: dict | None = None,
                   cfg: GPTConfig | None = None, tokenizer: Any = None, style: str = "alpaca",
                   name: str = "model", pad_token_id: int = PAD_TOKEN_ID,
                   opts: Options | None = None) -> dict[str, Any]:
    """One row of the offline table: reference loss/perplexity (with a model) and exact match / ROUGE-L
    of `responses` against the references (with responses)."""
    from gptjax.tasks.judge import text_scores

    row: dict[str, Any] = {"model": name, "n": len(entries)}
    if params is not None:
        nll = response_nll(params, cfg, entries, tokenizer, style=style, pad_token_id=pad_token_id, opts=opts)
        row.update(ref_loss=nll["loss"], ref_perplexity=nll["perplexity"], ref_tokens=nll["tokens"])
    if responses is not None:
        row.update(text_scores(responses, [e["output"] for e in entries]))
    return row


def format_table(rows: Sequence[dict]) -> str:
    """Markdown table of offline_report rows (missing values shown as -)."""
    cols = [("model", "model", "{}"), ("n", "n", "{}"), ("ref_loss", "ref. loss", "{:.3f}"),
            ("ref_perplexity", "ref. perplexity", "{:.2f}"), ("exact_match", "exact match", "{:.1%}"),
            ("rouge_l", "ROUGE-L F1", "{:.3f}"), ("judge_score", "judge score", "{:.2f}")]
    cols = [c for c in cols if any(c[0] in r for r in rows)]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "|".join("---" if c[0] == "model" else "---:"
                                                                        for c in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(c[2].format(r[c[0]]) if r.get(c[0]) is not None else "-" for c in cols) + " |")
    return "\n".join(lines)


# --- the whole run -------------------------------------------------------------------------------

RESPONSES_FILE = "test-responses.json"


def finetune_instruct(params: dict, cfg: GPTConfig, data: Sequence[dict] | dict[str, list[dict]], tokenizer: Any,
                      out_dir: str | Path, *, style: str = "alpaca", tcfg: InstructTrainConfig | None = None,
                      lora: lora_lib.LoRAConfig | None = None, mask: str = "none", pad_multiple: int = 64,
                      allowed_max_length: int = 1024, respond: bool = True, max_new_tokens: int = 256,
                      base_model: str | None = None, data_source: str | None = None, resume: bool = False,
                      overwrite: bool = False, progress: bool = True, stop_after: int | None = None,
                      pad_token_id: int = PAD_TOKEN_ID, opts: Options | None = None) -> dict:
    """Chapter 7 end to end; writes a run directory that `load_run`, `gptjax respond/chat/dpo` read.

    `data`: all records (split as the book) or ready {"train", "val", "test"} splits. Writes
    config.json, params/ (LoRA merged in), checkpoints/, metrics.jsonl, steps.jsonl, loss.png and, with
    `respond`, test-responses.json (the book's format) and eval.json / eval.md (the offline table).
    `pad_token_id` is the end-of-text token of the tokenizer (GPT-2's 50256), which also pads.
    `opts`: how it trains (default Options.for_backend()), the layout of `params`; params/,
    checkpoints/ and the returned params are canonical.
    """
    from gptjax.checkpoint import CONFIG_FILE, refuse_existing_run, save_run, write_json_atomic
    from gptjax.generate import generate_batch
    from gptjax.train import _prepare_out_dir

    tcfg = tcfg or InstructTrainConfig()
    opts = opts or Options.for_backend()
    _check_style(style)
    out_dir = Path(out_dir)
    if not resume:
        refuse_existing_run(out_dir, overwrite=overwrite, resume_hint="`gptjax finetune-instruct ... --resume`")
    splits = data if isinstance(data, dict) else split_data(data)
    if cfg.vocab_size <= pad_token_id:
        raise ValueError(f"the model's vocab_size={cfg.vocab_size} cannot hold the end-of-text token {pad_token_id} "
                         f"(GPT-2's <|endoftext|>); use a model with vocab_size 50257")
    max_len = min(allowed_max_length, cfg.context_length)
    enc = {k: encode_examples(v, tokenizer, style) for k, v in splits.items() if v}
    common = dict(pad_multiple=pad_multiple, allowed_max_length=max_len, mask=mask, pad_token_id=pad_token_id)
    train_b = InstructionBatches(enc["train"], tcfg.batch_size, shuffle=True, drop_last=True, seed=tcfg.seed,
                                 name="training", **common)
    if "val" not in enc:
        raise ValueError("the validation split is empty; use more data")
    val_b = InstructionBatches(enc["val"], tcfg.batch_size, shuffle=False, drop_last=False, name="validation",
                               **common)
    _prepare_out_dir(out_dir)

    key = jax.random.PRNGKey(tcfg.seed)
    trainable, frozen = split_trainable(params, lora, jax.random.fold_in(key, 1))
    scale = lora.scale if lora else 1.0
    tx, train_step, eval_step = compiled_sft_steps(cfg, tcfg.optim, scale, opts)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=tx.init(trainable), key=key)
    longest = max(len(x) for x in enc["train"].ids)
    n_train = count_params(trainable)
    print(f"model: {count_params(params):,} parameters, {n_train:,} trainable"
          f"{f' (LoRA r={lora.rank} alpha={lora.alpha:g})' if lora else ''}; splits "
          + ", ".join(f"{k} {len(v)}" for k, v in splits.items()) + f"; longest training example {longest} tokens"
          + (f" (> {max_len}: cut)" if longest > max_len else "") + f"; batches/epoch {len(train_b)}")
    settings = {"task": "instruct", "style": style, "data": data_source, "base_model": base_model, "mask": mask,
                "pad_multiple": pad_multiple, "allowed_max_length": max_len, "lora": lora.to_dict() if lora else None,
                "pad_token_id": pad_token_id, "train": tcfg.to_dict(),
                "split_sizes": {k: len(v) for k, v in splits.items()},
                "trainable_params": n_train}
    if not resume:
        write_json_atomic(out_dir / CONFIG_FILE, {"model": cfg.to_dict(), "options": opts.to_dict(),
                                                  "instruct": settings, "status": "running"})
    initial = {"train_loss": mean_metrics(eval_step, trainable, frozen, train_b.epoch(0), 5).get("loss"),
               "val_loss": mean_metrics(eval_step, trainable, frozen, val_b.epoch(0), 5).get("loss")}
    print(f"initial losses: training {initial['train_loss']:.3f}, validation {initial['val_loss']:.3f}")

    sample_ids = encode(tokenizer, format_input(splits["val"][0], style))

    def sample(tr: dict) -> str:
        new = generate_batch(full_params(tr, frozen, scale), cfg, [sample_ids], tcfg.sample_tokens,
                             eos_id=pad_token_id, opts=opts)[0]
        return tokenizer.decode(sample_ids + new)

    loop = run_loop(tcfg, state, frozen, train_b, val_b, out_dir, train_step=train_step, eval_step=eval_step,
                    count_tokens=lambda b: int(np.sum(b[1] != IGNORE_INDEX)),
                    sample=sample if tcfg.sample_tokens else None,
                    meta={"task": "instruct", "model": cfg.to_dict()}, resume=resume, progress=progress,
                    stop_after=stop_after, desc="finetune-instruct", cfg=cfg, opts=opts)
    trainable = loop["state"].params
    merged = full_params(trainable, frozen, scale)
    h = loop["history"]
    result = {**settings, "initial": initial, "steps": loop["steps"], "tokens_seen": loop["tokens_seen"],
              "wall_s": round(loop["wall_s"], 1), "samples": loop["samples"],
              "final": {"train_loss": h["train_loss"][-1], "val_loss": h["val_loss"][-1]} if h else {},
              "compiled_shapes": {k: [list(map(list, s)) for s in v] for k, v in loop["compiled_shapes"].items()}}
    shapes = loop["compiled_shapes"]
    print(f"trained {loop['steps']} steps in {loop['wall_s']:.0f} s; train step compiled for "
          f"{len(shapes['train'])} batch shape(s), eval step for {len(shapes['eval'])}")
    if h:
        plot_history(h, out_dir / "loss.png")
    if lora is not None:
        lora_lib.save_adapters(out_dir / "adapters.safetensors", trainable["lora"], lora,
                               metadata={"base_model": base_model})
    canonical = to_canonical(merged, cfg, opts)
    save_run(out_dir, canonical, cfg, extra={"options": opts.to_dict(),
                                             "instruct": {k: v for k, v in result.items() if k != "samples"},
                                             "status": "finished"})
    (out_dir / "samples.json").write_text(json.dumps(loop["samples"], indent=1))
    if respond and splits.get("test"):
        result["eval"] = respond_and_evaluate(merged, cfg, splits["test"], tokenizer, out_dir, style=style,
                                              max_new_tokens=max_new_tokens, batch_size=tcfg.batch_size,
                                              name=base_model or "model", progress=progress, eos_id=pad_token_id,
                                              opts=opts)
    return {**result, "history": h, "out_dir": str(out_dir), "params": canonical, "cfg": cfg}


def respond_and_evaluate(params: dict, cfg: GPTConfig, entries: Sequence[dict], tokenizer: Any, out_dir: str | Path,
                         *, style: str = "alpaca", max_new_tokens: int = 256, batch_size: int = 8,
                         name: str = "model", progress: bool = False, eos_id: int = PAD_TOKEN_ID,
                         opts: Options | None = None) -> dict:
    """Test-set responses (test-responses.json) and the offline table (eval.json, eval.md) into `out_dir`."""
    out_dir = Path(out_dir)
    t0 = time.time()
    responses, finished = generate_responses(params, cfg, entries, tokenizer, style=style,
                                             max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress,
                                             eos_id=eos_id, return_finished=True, opts=opts)
    gen_s = time.time() - t0
    save_responses(entries, responses, out_dir / RESPONSES_FILE)
    row = offline_report(entries, responses, params=params, cfg=cfg, tokenizer=tokenizer, style=style, name=name,
                         pad_token_id=eos_id, opts=opts)
    row["generate_s"] = round(gen_s, 1)
    row["unfinished"] = finished.count(False)  # answers cut at max_new_tokens, never ending with eos
    (out_dir / "eval.json").write_text(json.dumps(row, indent=1))
    (out_dir / "eval.md").write_text(format_table([row]) + "\n")
    print(f"test responses saved to {out_dir / RESPONSES_FILE} ({gen_s:.0f} s)\n" + format_table([row]))
    return row


def run_style(run_dir: str | Path | None, default: str = "alpaca") -> str:
    """The prompt style a finetune-instruct (or DPO) run was trained with; `default` for other models."""
    if run_dir is None:
        return default
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        return default
    meta = json.loads(path.read_text())
    for task in ("dpo", "instruct"):
        if isinstance(meta.get(task), dict) and meta[task].get("style"):
            return meta[task]["style"]
    return default
