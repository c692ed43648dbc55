"""Chapter 6's data: labelled texts (the SMS Spam Collection, CSV/TSV files, Hugging Face datasets), the
book's balancing and split, GPT-2 encoding padded to the longest training text, and batches."""
from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from gptjax import runs
from gptjax.cache import cache_dir as gptjax_cache_dir
from gptjax.data import cached_download, file_sha256
from gptjax.tasks.finetune import PAD_TOKEN_ID, EpochBatches, encode, load_hf_split

SMS_SPAM_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
# sha256 of the extracted `SMSSpamCollection` (UCI v.1): checked on the member, so a re-zipped archive still loads
SMS_SPAM_SHA256 = "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"
SMS_SPAM_LABELS = ("ham", "spam")
IGNORE_LABEL = -100   # label of the filler rows that complete a last partial batch


@dataclass
class LabeledTexts:
    texts: list[str]
    labels_N: np.ndarray          # int32 class ids into label_names
    label_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx_N: Sequence[int] | np.ndarray) -> "LabeledTexts":
        idx_N = np.asarray(idx_N, dtype=np.int64)
        return LabeledTexts([self.texts[i] for i in idx_N], self.labels_N[idx_N], self.label_names)

    def counts(self) -> dict[str, int]:
        return {name: int(np.sum(self.labels_N == i)) for i, name in enumerate(self.label_names)}


def sms_spam_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The UCI SMS Spam Collection file: downloaded once as a zip into the cache, extracted and checksummed."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else gptjax_cache_dir()
    target = cache / f"SMSSpamCollection-{SMS_SPAM_SHA256[:10]}"
    if target.is_file() and file_sha256(target) == SMS_SPAM_SHA256:
        return target
    try:
        zip_path = cached_download(SMS_SPAM_URL, cache_dir=cache_dir)
    except RuntimeError as e:
        raise FileNotFoundError(f"{e}. The SMS Spam Collection is the tab-separated file `SMSSpamCollection` inside "
                                f"that zip: pass its path instead (CLI: --data PATH)") from None
    with zipfile.ZipFile(zip_path) as zf:
        if "SMSSpamCollection" not in zf.namelist():
            raise ValueError(f"{zip_path} has no SMSSpamCollection member (it has {zf.namelist()}); delete it "
                             f"and retry, or pass a local copy of the file")
        data = zf.read("SMSSpamCollection")
    if (got := hashlib.sha256(data).hexdigest()) != SMS_SPAM_SHA256:
        os.remove(zip_path)
        raise ValueError(f"SMSSpamCollection from {SMS_SPAM_URL} has sha256 {got}, expected {SMS_SPAM_SHA256}; "
                         f"the cached zip was deleted. Pass a local copy of the file if the dataset changed")
    return runs.write_atomic(target, lambda tmp: tmp.write_bytes(data))


def _column(header: list[str] | None, col: int | str, path: str) -> int:
    if isinstance(col, int):
        return col
    if header is None or col not in header:
        raise ValueError(f"{path!r} has no column {col!r}; its columns are {header}; pass the label/text "
                         f"column by name or 0-based index")
    return header.index(col)


def read_labeled_table(path: str | os.PathLike, *, label_col: int | str = 0, text_col: int | str = 1,
                       sep: str | None = None) -> tuple[list[str], list[str]]:
    """(labels, texts) from a CSV/TSV, columns by 0-based index (no header) or by name (first row is a header);
    parsed like pandas' read_csv with default quoting, as the book reads SMSSpamCollection."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist; pass a CSV/TSV path, 'sms-spam' or 'hf:NAME'")
    text = path.read_text(encoding="utf-8")
    if sep is None:
        sep = "\t" if "\t" in text.split("\n", 1)[0] or path.suffix.lower() in ("", ".tsv", ".tab") else ","
    rows = [r for r in csv.reader(io.StringIO(text, newline=""), delimiter=sep) if r]
    named = isinstance(label_col, str) or isinstance(text_col, str)
    header = rows.pop(0) if named and rows else None
    li, ti = _column(header, label_col, str(path)), _column(header, text_col, str(path))
    for n, row in enumerate(rows):
        if max(li, ti) >= len(row):
            raise ValueError(f"{str(path)!r} row {n + 1} has {len(row)} fields but columns {li} and {ti} are needed "
                             f"(separator {sep!r}); check --sep and the column options")
    if not rows:
        raise ValueError(f"data file {str(path)!r} has no rows")
    return [row[li].strip() for row in rows], [row[ti] for row in rows]


def _labeled(texts: list[str], values: list, label_names: Sequence[str] | None, where: str) -> LabeledTexts:
    """`texts` and their labels `values` as ids into `label_names` (default: the sorted values, numbers first)."""
    values = [str(v) for v in values]
    if label_names is None:
        label_names = sorted(set(values), key=lambda s: (0, int(s), s) if re.fullmatch(r"-?\d+", s) else (1, 0, s))
    label_names = tuple(str(n) for n in label_names)
    index = {n: i for i, n in enumerate(label_names)}
    if unknown := sorted(set(values) - set(index)):
        raise ValueError(f"{where} has labels {unknown[:5]} that are not among the label names {list(label_names)}; "
                         f"pass all label names (CLI: --labels a,b,...)")
    if len(label_names) < 2:
        raise ValueError(f"{where} has only the label(s) {list(label_names)}; classification needs at least 2 classes")
    return LabeledTexts(texts, np.asarray([index[v] for v in values], np.int32), label_names)


def load_labeled_texts(source: str | os.PathLike | None = None, *, label_names: Sequence[str] | None = None,
                       label_col: int | str | None = None, text_col: int | str | None = None, sep: str | None = None,
                       cache_dir: str | os.PathLike | None = None) -> LabeledTexts:
    """Texts and integer labels from None/'sms-spam' (downloaded once), a CSV/TSV path, or 'hf:NAME[:CONFIG][:SPLIT]'.
    `label_names` fixes the class order (label i = label_names[i]); default ('ham', 'spam') for the SMS data."""
    src = None if source is None else os.fspath(source)
    if src is None or src == "sms-spam":
        labels, texts = read_labeled_table(sms_spam_path(cache_dir), label_col=0, text_col=1, sep="\t")
        return _labeled(texts, labels, label_names or SMS_SPAM_LABELS, "the SMS Spam Collection")
    if src.startswith("hf:"):
        return _load_hf(src, label_names, label_col, text_col, cache_dir)
    labels, texts = read_labeled_table(src, label_col=0 if label_col is None else label_col,
                                       text_col=1 if text_col is None else text_col, sep=sep)
    return _labeled(texts, labels, label_names, repr(src))


def _load_hf(src: str, label_names, label_col, text_col, cache_dir) -> LabeledTexts:
    ds = load_hf_split(src, cache_dir, "a local CSV/TSV (export the dataset to one)")
    cols = ds.column_names
    label_col, text_col = (cols[c] if isinstance(c, int) else c for c in
                           ("label" if label_col is None else label_col, "text" if text_col is None else text_col))
    for c in (label_col, text_col):
        if c not in cols:
            raise ValueError(f"Hugging Face dataset {src!r} has no column {c!r}; its columns are {cols}; "
                             f"pass --label-col/--text-col")
    values = list(ds[label_col])
    feature = ds.features[label_col]
    if label_names is None and hasattr(feature, "names"):  # ClassLabel: ints with names
        label_names = tuple(feature.names)
        values = [feature.names[v] for v in values]
    return _labeled([str(t) for t in ds[text_col]], values, label_names, repr(src))


def balance_indices(labels_N: np.ndarray, seed: int = 123) -> np.ndarray:
    """The book's create_balanced_dataset: undersample every class to the smallest one. Class by class in label
    order, a larger class keeps `RandomState(seed).permutation(n)[:n_min]` of its rows (pandas
    `.sample(n_min, random_state=seed)`); the smallest keeps its rows in order."""
    labels_N = np.asarray(labels_N)
    present = np.unique(labels_N)
    n_min = min(int(np.sum(labels_N == c)) for c in present)
    parts = []
    for c in present:
        idx_c = np.flatnonzero(labels_N == c)
        if len(idx_c) > n_min:
            idx_c = idx_c[np.random.RandomState(seed).permutation(len(idx_c))[:n_min]]
        parts.append(idx_c)
    return np.concatenate(parts)


def random_split_indices(n: int, train_frac: float = 0.7, val_frac: float = 0.1,
                         seed: int = 123) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The book's random_split: shuffle (pandas `.sample(frac=1, random_state=seed)`), then cut 70/10/20."""
    if not (0 < train_frac < 1 and 0 <= val_frac < 1 and train_frac + val_frac <= 1):
        raise ValueError(f"split fractions must satisfy 0 < train < 1, 0 <= val, train + val <= 1; "
                         f"got train={train_frac}, val={val_frac}")
    order_N = np.random.RandomState(seed).permutation(n)
    train_end = int(n * train_frac)
    val_end = train_end + int(n * val_frac)
    return order_N[:train_end], order_N[train_end:val_end], order_N[val_end:]


def book_split(data: LabeledTexts, *, balance: bool = True, train_frac: float = 0.7, val_frac: float = 0.1,
               seed: int = 123) -> dict[str, LabeledTexts]:
    """Balanced (optional) then shuffled 70/10/20 train / validation / test, exactly as chapter 6."""
    idx_N = balance_indices(data.labels_N, seed) if balance else np.arange(len(data))
    parts = random_split_indices(len(idx_N), train_frac, val_frac, seed)
    splits = {name: data.subset(idx_N[p]) for name, p in zip(("train", "val", "test"), parts)}
    if len(splits["train"]) == 0:
        raise ValueError(f"the training split is empty ({len(idx_N)} examples after balancing); use more data")
    return splits


def encode_texts(texts: Sequence[str], tokenizer: Any, *, max_length: int | None = None,
                 context_length: int | None = None, pad_token_id: int = PAD_TOKEN_ID) -> tuple[np.ndarray, int]:
    """The book's SpamDataset: token ids (N, T) padded with `pad_token_id` to `max_length` (None: the longest
    text's), longer texts truncated, nothing longer than `context_length`; and that length."""
    encoded = [encode(tokenizer, t) for t in texts]
    if max_length is None:
        max_length = max((len(e) for e in encoded), default=0)
    if context_length is not None:
        max_length = min(max_length, context_length)
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length} (are all texts empty?)")
    ids_NT = np.full((len(encoded), max_length), pad_token_id, np.int32)
    for i, e in enumerate(encoded):
        ids_NT[i, :min(len(e), max_length)] = e[:max_length]
    return ids_NT, max_length


class ClassBatches(EpochBatches):
    """(x_BT, y_B) batches; a last partial batch is filled with IGNORE_LABEL rows so every batch has one shape."""

    def __init__(self, ids_NT: np.ndarray, labels_N: np.ndarray, batch_size: int, *, shuffle: bool,
                 drop_last: bool, seed: int = 123, name: str = "data"):
        ids_NT, labels_N = np.asarray(ids_NT, np.int32), np.asarray(labels_N, np.int32)
        if ids_NT.ndim != 2 or len(ids_NT) != len(labels_N):
            raise ValueError(f"ids must be (N, T) and labels (N,), got {ids_NT.shape} and {labels_N.shape}")
        super().__init__(len(ids_NT), batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed)
        self.check_size(name)
        self.ids_NT, self.labels_N = ids_NT, labels_N

    @property
    def num_examples(self) -> int:
        """Examples one pass covers (drop_last leaves the rest out, as torch's DataLoader)."""
        return len(self) * self.batch_size if self.drop_last else self.n

    def batch_at(self, epoch: int, i: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self.rows(epoch, i)
        return self.filled(self.ids_NT[rows], 0), self.filled(self.labels_N[rows], IGNORE_LABEL)


def split_batches(splits: dict[str, LabeledTexts], tokenizer: Any, batch_size: int, *, seed: int,
                  max_length: int | None, context_length: int,
                  pad_token_id: int = PAD_TOKEN_ID) -> tuple[dict[str, ClassBatches], int]:
    """({"train", "val"[, "test"]} batches, max_length): every split padded to the longest training example
    (or `max_length`), as the book's SpamDataset; training batches shuffled, the last partial one dropped."""
    train_ids, max_length = encode_texts(splits["train"].texts, tokenizer, max_length=max_length,
                                         context_length=context_length, pad_token_id=pad_token_id)
    loaders = {"train": ClassBatches(train_ids, splits["train"].labels_N, batch_size, shuffle=True, drop_last=True,
                                     seed=seed, name="training")}
    for name in ("val", "test"):
        if len(splits.get(name, ())):
            ids = encode_texts(splits[name].texts, tokenizer, max_length=max_length, context_length=context_length,
                               pad_token_id=pad_token_id)[0]
            loaders[name] = ClassBatches(ids, splits[name].labels_N, batch_size, shuffle=False, drop_last=False)
    if "val" not in loaders:
        raise ValueError("the validation split is empty; use more data or a larger validation fraction")
    return loaders, max_length
