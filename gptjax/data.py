"""Corpora (the book's the-verdict, a file, a URL with cache and checksum, HF datasets), sliding windows, batches."""
from __future__ import annotations

import hashlib
import os
import shutil
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gptjax import runs
from gptjax.cache import cache_dir as gptjax_cache_dir
from gptjax.tokenizer import is_offline, text_to_token_ids

# The book's corpus: Edith Wharton's short story "The Verdict" (1908, public domain), as the book's
# repository has it (ch02/01_main-chapter-code/the-verdict.txt), shipped with the package.
VERDICT_PATH = Path(__file__).parent / "assets" / "the-verdict.txt"
VERDICT_SHA256 = "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"
IGNORE_INDEX = -100  # target value the loss skips; fills the padded rows of a last partial batch

_SOURCES_HELP = "a local UTF-8 text file, an http(s) URL, 'hf:NAME[:CONFIG][:SPLIT]' or 'default' (the-verdict)"


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def cached_download(url: str, *, cache_dir: str | os.PathLike | None = None, sha256: str | None = None) -> Path:
    """Download `url` once into the cache (verified against sha256 when given) and return the local path."""
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else gptjax_cache_dir()
    # The URL's hash in the name keeps two files called e.g. input.txt from different hosts apart.
    stem, suffix = os.path.splitext(Path(urllib.parse.urlparse(url).path).name or "download")
    path = cache_dir / f"{stem}-{hashlib.sha1(url.encode()).hexdigest()[:10]}{suffix}"
    if path.is_file() and (sha256 is None or file_sha256(path) == sha256.lower()):
        return path
    if is_offline() and not url.startswith("file:"):
        raise RuntimeError(f"GPTJAX_OFFLINE is set and {url} is not in the cache ({path}); unset GPTJAX_OFFLINE to "
                           f"download it, or download it yourself and pass the local file path instead")

    def download(tmp: Path) -> None:  # a crash or a bad checksum never leaves a half-written cache entry
        with open(tmp, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=30) as resp:
                    shutil.copyfileobj(resp, out)
            except Exception as e:
                raise RuntimeError(f"could not download {url}: {type(e).__name__}: {e}; check the URL and your "
                                   f"network, or download it yourself and pass the local file path instead") from e
        if sha256 is not None and (got := file_sha256(tmp)) != sha256.lower():
            raise ValueError(f"sha256 mismatch for {url}: expected {sha256.lower()}, got {got}; the download was "
                             f"deleted. If the file changed on purpose, pass the new sha256 (or sha256=None)")

    cache_dir.mkdir(parents=True, exist_ok=True)
    return runs.write_atomic(path, download)


def load_hf_text(name: str, config: str | None = None, split: str = "train", text_column: str = "text",
                 data_files: Any = None, *, cache_dir: str | os.PathLike | None = None, separator: str = "\n") -> str:
    """One split of a Hugging Face dataset as a string: a hub name, a builder ("text") with data_files, or a folder."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"loading {name!r} from Hugging Face needs the `datasets` package: pip install datasets; "
                          f"or save the text to a file and pass its path") from e
    try:
        ds = datasets.load_dataset(name, config, split=split, data_files=data_files,
                                   cache_dir=None if cache_dir is None else str(cache_dir))
    except Exception as e:
        raise RuntimeError(f"could not load Hugging Face dataset {name!r} (config={config!r}, split={split!r}, "
                           f"data_files={data_files!r}): {type(e).__name__}: {e}; check the name, config and split, "
                           f"or pass a local text file instead") from e
    if text_column not in ds.column_names:
        raise ValueError(f"Hugging Face dataset {name!r} has no column {text_column!r}; its columns are "
                         f"{ds.column_names}; pass text_column=...")
    return separator.join(str(t) for t in ds[text_column] if t is not None)


def load_corpus(source: str | os.PathLike | None = None, *, cache_dir: str | os.PathLike | None = None,
                sha256: str | None = None) -> str:
    """Text of None/'default' (the book's the-verdict), a path, a URL, or 'hf:NAME[:CONFIG][:SPLIT]'."""
    if source is None or source == "default":
        source, sha256 = VERDICT_PATH, VERDICT_SHA256
    source_str = os.fspath(source)
    if source_str.startswith("hf:"):
        name, config, split = (source_str[3:].split(":", 2) + [None, None])[:3]
        if not name:
            raise ValueError(f"corpus {source_str!r} names no dataset; use 'hf:NAME[:CONFIG][:SPLIT]', "
                             f"e.g. 'hf:wikitext:wikitext-2-raw-v1:train'")
        hf_cache = None if cache_dir is None else Path(cache_dir) / "hf"
        text = load_hf_text(name, config or None, split or "train", cache_dir=hf_cache)
    else:
        if urllib.parse.urlparse(source_str).scheme in ("http", "https", "file"):
            path = cached_download(source_str, cache_dir=cache_dir, sha256=sha256)
        else:
            path = Path(source_str).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"corpus {source_str!r} is not an existing file; pass {_SOURCES_HELP}")
            if sha256 is not None and (got := file_sha256(path)) != sha256.lower():
                raise ValueError(f"sha256 mismatch for {path}: expected {sha256.lower()}, got {got}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"corpus {source_str!r} is not UTF-8 text ({e}); convert it to UTF-8 first") from None
    if not text.strip():
        raise ValueError(f"corpus {source_str!r} is empty; use {_SOURCES_HELP} that holds some text")
    return text


def split_text(text: str, train_ratio: float = 0.9) -> tuple[str, str]:
    """Split by characters exactly as the book: the first train_ratio of the text trains, the rest validates."""
    if not 0.0 < train_ratio < 1.0:
        raise ValueError(f"train_ratio must be in (0, 1), got {train_ratio!r}")
    split_idx = int(train_ratio * len(text))
    return text[:split_idx], text[split_idx:]


def make_windows(token_ids: Sequence[int] | np.ndarray, max_length: int, stride: int, *,
                 name: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The book's GPTDatasetV1 as arrays: inputs ids[i:i+T], targets ids[i+1:i+T+1] for i in range(0, n-T, stride)."""
    if max_length <= 0 or stride <= 0:
        raise ValueError(f"max_length and stride must be positive, got max_length={max_length}, stride={stride}")
    ids = np.asarray(token_ids, dtype=np.int32).reshape(-1)
    if len(ids) < max_length + 1:
        what = f"{name} split" if name else "the token sequence"
        raise ValueError(f"{what} has {len(ids)} tokens but context_length+1 = {max_length + 1} are needed; "
                         f"use a longer corpus, a smaller --context-length, or a different --train-ratio")
    starts_N = np.arange(0, len(ids) - max_length, stride)
    idx_NT = starts_N[:, None] + np.arange(max_length)[None, :]
    return ids[idx_NT], ids[idx_NT + 1]


class Batches:
    """Batches of windows; epoch e's order depends only on (seed, e), so any (epoch, batch) position resumes exactly."""

    def __init__(self, inputs_NT: np.ndarray, targets_NT: np.ndarray, batch_size: int, *, shuffle: bool,
                 seed: int = 0, drop_last: bool = True, name: str | None = None):
        inputs_NT, targets_NT = np.asarray(inputs_NT, np.int32), np.asarray(targets_NT, np.int32)
        if inputs_NT.ndim != 2 or inputs_NT.shape != targets_NT.shape:
            raise ValueError(f"inputs and targets must both be (N, T), got {inputs_NT.shape} and {targets_NT.shape}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        n = len(inputs_NT)
        if drop_last and n < batch_size:
            raise ValueError(f"{name + ' split has ' if name else 'there are '}only {n} windows for batch_size="
                             f"{batch_size} with drop_last=True, so there would be no batch; use --batch-size "
                             f"{max(n, 1)} or smaller, a longer corpus, or a smaller stride")
        self.inputs_NT, self.targets_NT = inputs_NT, targets_NT
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self._order_cache: tuple[int, np.ndarray] | None = None

    @property
    def num_windows(self) -> int:
        return len(self.inputs_NT)

    @property
    def num_tokens(self) -> int:
        """Input tokens seen in one epoch (padding excluded)."""
        used = len(self) * self.batch_size if self.drop_last else self.num_windows
        return used * self.inputs_NT.shape[1]

    def __len__(self) -> int:
        n, b = self.num_windows, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def order(self, epoch: int) -> np.ndarray:
        """Window indices in epoch `epoch`'s order."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            order_N = (np.random.default_rng((self.seed, epoch)).permutation(self.num_windows) if self.shuffle
                       else np.arange(self.num_windows))
            self._order_cache = (epoch, order_N)
        return self._order_cache[1]

    def batch_at(self, epoch: int, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch i of epoch `epoch` as (x_BT, y_BT); a short last batch is padded (inputs 0, targets -100)."""
        if not 0 <= i < len(self):
            raise IndexError(f"batch index {i} out of range: an epoch has {len(self)} batches")
        rows = self.order(epoch)[i * self.batch_size : (i + 1) * self.batch_size]
        x_BT, y_BT = self.inputs_NT[rows], self.targets_NT[rows]
        pad = self.batch_size - len(rows)
        if pad:  # keep one batch shape so jit compiles once; the loss ignores IGNORE_INDEX targets
            x_BT = np.concatenate([x_BT, np.zeros((pad, x_BT.shape[1]), np.int32)])
            y_BT = np.concatenate([y_BT, np.full((pad, y_BT.shape[1]), IGNORE_INDEX, np.int32)])
        return x_BT, y_BT

    def epoch(self, epoch_index: int, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Iterate epoch `epoch_index` from batch `start` (to resume mid-epoch)."""
        return (self.batch_at(epoch_index, i) for i in range(start, len(self)))

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return self.epoch(0)


def create_dataloaders(text: str, tokenizer: Any, *, context_length: int, batch_size: int, stride: int | None = None,
                       train_ratio: float = 0.9, seed: int = 0) -> tuple[Batches, Batches]:
    """The book's ch05 loaders: split by characters, tokenize each part, window; train shuffled, val in order."""
    train_text, val_text = split_text(text, train_ratio)
    stride = context_length if stride is None else stride
    loaders = []
    for part, name, is_train in ((train_text, "training", True), (val_text, "validation", False)):
        inputs_NT, targets_NT = make_windows(text_to_token_ids(part, tokenizer)[0], context_length, stride, name=name)
        loaders.append(Batches(inputs_NT, targets_NT, batch_size, shuffle=is_train, seed=seed, drop_last=is_train,
                               name=name))
    return loaders[0], loaders[1]
