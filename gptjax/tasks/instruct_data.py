"""Chapter 7's data: Alpaca-style records {instruction, input, output} (the book's instruction-data.json, a JSON
file or a Hugging Face dataset) split in file order as the book; the Alpaca and Phi-3 (exercise 7.1) prompts; the
book's collate, optionally masking the prompt (exercise 7.2), in length-bucketed batches (one compile per bucket)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from gptjax.data import cached_download
from gptjax.engine import IGNORE_INDEX
from gptjax.tasks.finetune import PAD_TOKEN_ID, EpochBatches, encode, load_hf_split

INSTRUCTION_DATA_URL = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/"
                        "instruction-data.json")
INSTRUCTION_DATA_SHA256 = "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944"
STYLES = ("alpaca", "phi3")
_ALPACA_HEAD = ("Below is an instruction that describes a task. "
                "Write a response that appropriately completes the request.")
# what starts the answer, and the marker the book strips from generated text
_RESPONSE_PREFIX = {"alpaca": "\n\n### Response:\n", "phi3": "\n<|assistant|>:\n"}
_RESPONSE_MARKER = {"alpaca": "### Response:", "phi3": "<|assistant|>:"}


# --- prompts -------------------------------------------------------------------------------------

def check_style(style: str) -> str:
    if style not in STYLES:
        raise ValueError(f"unknown prompt style {style!r}; choose one of {STYLES}")
    return style


def format_input(entry: dict, style: str = "alpaca") -> str:
    """The book's format_input: the instruction (and input) in the Alpaca or the Phi-3 template (exercise 7.1)."""
    if check_style(style) == "phi3":
        return f"<|user|>\n{entry['instruction']}" + (f"\n{entry['input']}" if entry.get("input") else "")
    return (f"{_ALPACA_HEAD}\n\n### Instruction:\n{entry['instruction']}"
            + (f"\n\n### Input:\n{entry['input']}" if entry.get("input") else ""))


def response_prefix(style: str = "alpaca") -> str:
    return _RESPONSE_PREFIX[check_style(style)]


def format_example(entry: dict, style: str = "alpaca", response_key: str = "output") -> str:
    """Prompt plus answer, the text a training example is made of."""
    return format_input(entry, style) + response_prefix(style) + entry[response_key]


def extract_response(generated_text: str, prompt: str, style: str = "alpaca") -> str:
    """The book's `generated_text[len(input_text):].replace("### Response:", "").strip()`."""
    return generated_text[len(prompt):].replace(_RESPONSE_MARKER[check_style(style)], "").strip()


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
        if missing := [k for k in keys if k not in e]:
            raise ValueError(f"{where}: record {i} lacks {missing} (it has {sorted(e)}); every record needs "
                             f"{list(keys)}")
        if wrong := {k: type(e[k]).__name__ for k in (*keys, "input")
                     if e.get(k) is not None and not isinstance(e[k], str)}:
            raise ValueError(f"{where}: record {i} has non-text fields {wrong}; every field the prompts use must be "
                             f"a string")
        out.append({**e, "input": e.get("input") or ""})
    return out


def load_json_records(source: str | os.PathLike | None = None, *, url: str = INSTRUCTION_DATA_URL,
                      sha256: str | None = INSTRUCTION_DATA_SHA256, keys: Sequence[str] = ("instruction", "output"),
                      cache_dir: str | os.PathLike | None = None) -> list[dict]:
    """Records from None/'default' (`url`, downloaded once), a JSON file, an http(s) URL or 'hf:NAME'."""
    src = None if source is None else os.fspath(source)
    if src is None or src == "default":
        try:
            src = str(cached_download(url, cache_dir=cache_dir, sha256=sha256))
        except RuntimeError as e:
            raise FileNotFoundError(f"{e}. The file is {Path(url).name} from the book's repository: pass a local "
                                    f"copy (CLI: --data PATH)") from None
    elif src.startswith("hf:"):
        ds = load_hf_split(src, cache_dir, "a local JSON file (the dataset saved as a list of records)")
        return _check_entries([dict(r) for r in ds], repr(src), keys)
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
    return next((i for i, (a, b) in enumerate(zip(full, prefix)) if a != b), min(len(prefix), len(full)))


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
    """The book's custom_collate_fn -> (inputs_BT, targets_BT) int32. Each item gets one <|endoftext|>, then
    padding to the longest item + 1; inputs drop the last token, targets the first; every padding target but the
    first becomes `ignore_index`; both are cut to `allowed_max_length`. `mask_lengths[i]` (exercise 7.2): the
    first n tokens of item i are prompt, so `targets[:n - 1]` are ignored too. `pad_to`: pad inputs to at least
    this length (a bucket); the extra positions are padding with ignored targets, so the loss equals the book's."""
    if not batch:
        raise ValueError("collate needs at least one example")
    batch_max_length = max(pad_to or 0, *map(len, batch)) + 1
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
        inputs.append(x_T[:allowed_max_length])
        targets.append(y_T[:allowed_max_length])
    return np.stack(inputs), np.stack(targets)


MASKS = ("none", "instruction", "prompt")


class InstructionBatches(EpochBatches):
    """Batches of the book's collate; a last partial batch is filled with ignored rows so B never changes.
    `pad_multiple` > 1 pads T up to a multiple of it (capped at `allowed_max_length`): a run then compiles one
    step per bucket. `mask`: 'none' (the book), 'instruction' (exercise 7.2: the tokens of format_input) or
    'prompt' (everything before the answer text, the response header too)."""

    def __init__(self, examples: InstructionExamples, batch_size: int, *, shuffle: bool, drop_last: bool,
                 seed: int = 123, pad_multiple: int = 1, allowed_max_length: int | None = 1024, mask: str = "none",
                 pad_token_id: int = PAD_TOKEN_ID, name: str = "data"):
        super().__init__(len(examples), batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed)
        if pad_multiple < 1:
            raise ValueError(f"pad_multiple must be >= 1 (1 = the book's per-batch length), got {pad_multiple!r}")
        if mask not in MASKS:
            raise ValueError(f"unknown prompt mask {mask!r}; choose one of {MASKS}")
        self.check_size(name)
        self.examples, self.pad_multiple, self.allowed_max_length = examples, pad_multiple, allowed_max_length
        self.mask, self.pad_token_id = mask, pad_token_id
        self._masks = {"none": None, "instruction": examples.instruction_len, "prompt": examples.response_start}[mask]

    def batch_at(self, epoch: int, i: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self.rows(epoch, i)
        items = [self.examples.ids[r] for r in rows]
        cap = self.allowed_max_length
        masks = None if self._masks is None else [self._masks[r] for r in rows]
        x_BT, y_BT = collate(items, pad_token_id=self.pad_token_id, allowed_max_length=cap, mask_lengths=masks,
                             pad_to=bucket_length(max(map(len, items)), self.pad_multiple, cap))
        return self.filled(x_BT, self.pad_token_id), self.filled(y_BT, IGNORE_INDEX)  # filler targets: ignored

    def shapes(self, epoch: int = 0) -> set[tuple[int, int]]:
        """Batch shapes of one pass: the programs a jitted step compiles for it."""
        return {self.batch_at(epoch, i)[0].shape for i in range(len(self))}
