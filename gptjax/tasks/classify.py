"""Classification fine-tuning (the book's chapter 6), optionally with LoRA (appendix E).

Data: the SMS Spam Collection (or any labelled CSV/TSV or Hugging Face dataset), balanced and split
exactly as the book; tokenized with GPT-2 BPE and padded with <|endoftext|> to the longest training
example. Model: the GPT with its LM head replaced by `cls_head`, classifying from the last position.
Training: only the chosen parameters (and LoRA adapters) are differentiated and get optimizer state;
the rest is passed to the jitted step as frozen constants.

Letters: N examples, B batch, T time, C classes.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from gptjax import lora as lora_lib
from gptjax.config import GPTConfig
from gptjax.model import GPT, count_params, dropout_rngs, to_canonical
from gptjax.options import Options
from gptjax.train import OptimConfig, TrainState, cross_entropy, make_optimizer

SMS_SPAM_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
# sha256 of the extracted `SMSSpamCollection` (UCI v.1): checked on the member, so a re-zipped archive still loads
SMS_SPAM_SHA256 = "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"
SMS_SPAM_LABELS = ("ham", "spam")
PAD_TOKEN_ID = 50256  # GPT-2's <|endoftext|>, the book's padding token
IGNORE_LABEL = -100   # label of the filler rows that complete a last partial batch


# --- data ------------------------------------------------------------------------------------------

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


def _cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    from gptjax.data import default_cache_dir

    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def sms_spam_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The UCI SMS Spam Collection file: downloaded once as a zip into the cache, extracted and checksummed."""
    from gptjax.data import _file_sha256, cached_download

    target = _cache_dir(cache_dir) / f"SMSSpamCollection-{SMS_SPAM_SHA256[:10]}"
    if target.is_file() and _file_sha256(target) == SMS_SPAM_SHA256:
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
    import hashlib

    if (got := hashlib.sha256(data).hexdigest()) != SMS_SPAM_SHA256:
        os.remove(zip_path)
        raise ValueError(f"SMSSpamCollection from {SMS_SPAM_URL} has sha256 {got}, expected {SMS_SPAM_SHA256}; "
                         f"the cached zip was deleted. Pass a local copy of the file if the dataset changed")
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".part")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, target)
    return target


def _column(header: list[str] | None, col: int | str, path: str) -> int:
    if isinstance(col, int):
        return col
    if header is None or col not in header:
        raise ValueError(f"{path!r} has no column {col!r}; its columns are {header}; pass the label/text "
                         f"column by name or 0-based index")
    return header.index(col)


def read_labeled_table(path: str | os.PathLike, *, label_col: int | str = 0, text_col: int | str = 1,
                       sep: str | None = None) -> tuple[list[str], list[str]]:
    """(labels, texts) from a CSV/TSV. Columns by 0-based index (no header) or by name (first row is a header).

    Parsed like pandas' read_csv with default quoting, as the book reads SMSSpamCollection (5,572 rows).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist; pass a CSV/TSV path, 'sms-spam' or 'hf:NAME'")
    text = path.read_text(encoding="utf-8")
    if sep is None:
        first = text.split("\n", 1)[0]
        sep = "\t" if "\t" in first or path.suffix.lower() in ("", ".tsv", ".tab") else ","
    rows = [r for r in csv.reader(io.StringIO(text, newline=""), delimiter=sep) if r]
    named = isinstance(label_col, str) or isinstance(text_col, str)
    header = rows.pop(0) if named and rows else None
    li, ti = _column(header, label_col, str(path)), _column(header, text_col, str(path))
    labels, texts = [], []
    for n, row in enumerate(rows):
        if max(li, ti) >= len(row):
            raise ValueError(f"{str(path)!r} row {n + 1} has {len(row)} fields but columns {li} and {ti} are needed "
                             f"(separator {sep!r}); check --sep and the column options")
        labels.append(row[li].strip())
        texts.append(row[ti])
    if not rows:
        raise ValueError(f"data file {str(path)!r} has no rows")
    return labels, texts


def _label_ids(values: list, label_names: Sequence[str] | None, where: str) -> tuple[np.ndarray, tuple[str, ...]]:
    values = [str(v) for v in values]
    if label_names is None:
        uniq = sorted(set(values), key=lambda s: (0, int(s), s) if re.fullmatch(r"-?\d+", s) else (1, 0, s))
        label_names = tuple(uniq)
    label_names = tuple(str(n) for n in label_names)
    index = {n: i for i, n in enumerate(label_names)}
    unknown = sorted(set(values) - set(index))
    if unknown:
        raise ValueError(f"{where} has labels {unknown[:5]} that are not among the label names {list(label_names)}; "
                         f"pass all label names (CLI: --labels a,b,...)")
    if len(label_names) < 2:
        raise ValueError(f"{where} has only the label(s) {list(label_names)}; classification needs at least 2 classes")
    return np.asarray([index[v] for v in values], np.int32), label_names


def load_labeled_texts(source: str | os.PathLike | None = None, *, label_names: Sequence[str] | None = None,
                       label_col: int | str | None = None, text_col: int | str | None = None, sep: str | None = None,
                       cache_dir: str | os.PathLike | None = None) -> LabeledTexts:
    """Texts and integer labels from None/'sms-spam' (downloaded once), a CSV/TSV path, or 'hf:NAME[:CONFIG][:SPLIT]'.

    `label_names` fixes the class order (label i = label_names[i]); by default the SMS data uses
    ('ham', 'spam') and other data its sorted label values.
    """
    src = None if source is None else os.fspath(source)
    if src is None or src == "sms-spam":
        labels, texts = read_labeled_table(sms_spam_path(cache_dir), label_col=0, text_col=1, sep="\t")
        ids_N, names = _label_ids(labels, label_names or SMS_SPAM_LABELS, "the SMS Spam Collection")
        return LabeledTexts(texts, ids_N, names)
    if src.startswith("hf:"):
        return _load_hf(src, label_names, label_col, text_col, cache_dir)
    labels, texts = read_labeled_table(src, label_col=0 if label_col is None else label_col,
                                       text_col=1 if text_col is None else text_col, sep=sep)
    ids_N, names = _label_ids(labels, label_names, repr(src))
    return LabeledTexts(texts, ids_N, names)


def _load_hf(src: str, label_names, label_col, text_col, cache_dir) -> LabeledTexts:
    try:
        import datasets
    except ImportError as e:
        raise ImportError("loading a Hugging Face dataset needs `pip install datasets`; or export it to a CSV "
                          "and pass the path") from e
    name, config, split = (src[3:].split(":", 2) + [None, None])[:3]
    if not name:
        raise ValueError(f"data {src!r} names no dataset; use 'hf:NAME[:CONFIG][:SPLIT]'")
    label_col = "label" if label_col is None else label_col
    text_col = "text" if text_col is None else text_col
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train",
                                   cache_dir=None if cache_dir is None else str(Path(cache_dir) / "hf"))
    except Exception as e:
        raise ValueError(f"could not load Hugging Face dataset {src!r}: {type(e).__name__}: {e}; check the name, "
                         f"config and split, or pass a local CSV/TSV") from e
    cols = ds.column_names
    label_col = cols[label_col] if isinstance(label_col, int) else label_col
    text_col = cols[text_col] if isinstance(text_col, int) else text_col
    for c in (label_col, text_col):
        if c not in cols:
            raise ValueError(f"Hugging Face dataset {src!r} has no column {c!r}; its columns are {cols}; "
                             f"pass --label-col/--text-col")
    values = list(ds[label_col])
    feature = ds.features[label_col]
    if label_names is None and hasattr(feature, "names"):  # ClassLabel: ints with names
        label_names = tuple(feature.names)
        values = [feature.names[v] for v in values]
    ids_N, names = _label_ids(values, label_names, repr(src))
    return LabeledTexts([str(t) for t in ds[text_col]], ids_N, names)


def balance_indices(labels_N: np.ndarray, seed: int = 123) -> np.ndarray:
    """The book's create_balanced_dataset: undersample every class to the smallest one.

    Class by class in label order, a larger class keeps `RandomState(seed).permutation(n)[:n_min]`
    of its rows (= pandas `.sample(n_min, random_state=seed)`); the smallest keeps its rows in order.
    """
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
    """The book's SpamDataset: token ids (N, T) padded with `pad_token_id` to `max_length`.

    max_length None: the longest text (the training set's, then reused for val/test). Longer texts
    are truncated; nothing exceeds `context_length`.
    """
    encoded = [_encode(tokenizer, t) for t in texts]
    if max_length is None:
        max_length = max((len(e) for e in encoded), default=0)
    if context_length is not None:
        max_length = min(max_length, context_length)
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length} (are all texts empty?)")
    ids_NT = np.full((len(encoded), max_length), pad_token_id, np.int32)
    for i, e in enumerate(encoded):
        e = e[:max_length]
        ids_NT[i, :len(e)] = e
    return ids_NT, max_length


def _encode(tokenizer: Any, text: str) -> list[int]:
    try:  # tiktoken: a literal "<|endoftext|>" in a message is text, not a control token
        return tokenizer.encode(text, disallowed_special=())
    except TypeError:
        return tokenizer.encode(text)


class ClassBatches:
    """(x_BT, y_B) batches; a last partial batch is filled with IGNORE_LABEL rows so every batch has one shape."""

    def __init__(self, ids_NT: np.ndarray, labels_N: np.ndarray, batch_size: int, *, shuffle: bool,
                 drop_last: bool, seed: int = 123, name: str = "data"):
        ids_NT, labels_N = np.asarray(ids_NT, np.int32), np.asarray(labels_N, np.int32)
        if ids_NT.ndim != 2 or len(ids_NT) != len(labels_N):
            raise ValueError(f"ids must be (N, T) and labels (N,), got {ids_NT.shape} and {labels_N.shape}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if drop_last and len(ids_NT) < batch_size:
            raise ValueError(f"the {name} split has {len(ids_NT)} examples, fewer than batch_size={batch_size}; "
                             f"use a smaller --batch-size or more data")
        self.ids_NT, self.labels_N = ids_NT, labels_N
        self.batch_size, self.shuffle, self.drop_last, self.seed = batch_size, shuffle, drop_last, seed

    @property
    def num_examples(self) -> int:
        """Examples one pass covers (drop_last leaves the rest out, as torch's DataLoader)."""
        return len(self) * self.batch_size if self.drop_last else len(self.ids_NT)

    def __len__(self) -> int:
        n, b = len(self.ids_NT), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def epoch(self, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        n, b = len(self.ids_NT), self.batch_size
        order_N = np.random.default_rng((self.seed, epoch)).permutation(n) if self.shuffle else np.arange(n)
        for i in range(len(self)):
            rows = order_N[i * b:(i + 1) * b]
            x_BT, y_B = self.ids_NT[rows], self.labels_N[rows]
            if len(rows) < b:
                x_BT = np.concatenate([x_BT, np.zeros((b - len(rows), x_BT.shape[1]), np.int32)])
                y_B = np.concatenate([y_B, np.full(b - len(rows), IGNORE_LABEL, np.int32)])
            yield x_BT, y_B

    def __iter__(self):
        return self.epoch(0)


# --- model -----------------------------------------------------------------------------------------

def to_classifier(params: dict, cfg: GPTConfig, n_classes: int, key: jax.Array) -> tuple[dict, GPTConfig]:
    """The book's `model.out_head = nn.Linear(emb_dim, n_classes)`: drop the LM head, add a fresh `cls_head`.

    Initialised as torch's Linear (weight and bias ~ U(+-1/sqrt(emb_dim))).
    """
    bound = 1.0 / math.sqrt(cfg.emb_dim)
    k_w, k_b = jax.random.split(key)
    new = {k: v for k, v in params.items() if k not in ("lm_head", "cls_head")}
    new["cls_head"] = {
        "kernel": jax.random.uniform(k_w, (cfg.emb_dim, n_classes), jnp.float32, -bound, bound),
        "bias": jax.random.uniform(k_b, (n_classes,), jnp.float32, -bound, bound),
    }
    return new, cfg.replace(n_classes=n_classes)


TRAIN_CHOICES = "last-block | last-N (e.g. last-2) | all | head | none"


def trainable_mask(params: dict, train: str = "last-block") -> dict:
    """Bool pytree over `params`: True where fine-tuning updates the parameter.

    'last-block' (the book): the last transformer block, the final LayerNorm and the head;
    'last-N': the last N blocks + ln_f + head; 'all'; 'head': the head only; 'none': nothing (LoRA only).
    """
    n_layers = sum(1 for k in params if re.fullmatch(r"h_\d+", k))
    spec = train.strip().lower()
    if spec == "all":
        chosen = lambda top: True  # noqa: E731
    elif spec == "none":
        chosen = lambda top: False  # noqa: E731
    elif spec == "head":
        chosen = lambda top: top == "cls_head"  # noqa: E731
    elif (m := re.fullmatch(r"last-(block|\d+)", spec)):
        n = 1 if m.group(1) == "block" else int(m.group(1))
        if not 1 <= n <= n_layers:
            raise ValueError(f"--train {train!r}: the model has {n_layers} blocks; choose last-1 .. last-{n_layers}")
        blocks = {f"h_{i}" for i in range(n_layers - n, n_layers)}
        chosen = lambda top: top in blocks or top in ("ln_f", "cls_head")  # noqa: E731
    else:
        raise ValueError(f"unknown layers to train {train!r}; choose {TRAIN_CHOICES}")
    return {top: jax.tree_util.tree_map(lambda _: chosen(top), sub) for top, sub in params.items()}


def partition(params: dict, mask: dict) -> tuple[dict, dict]:
    """(trainable, frozen) sub-dicts of `params` by a bool mask; `combine` puts them back together."""
    flat_p, flat_m = traverse_util.flatten_dict(params), traverse_util.flatten_dict(mask)
    train = {k: v for k, v in flat_p.items() if flat_m[k]}
    frozen = {k: v for k, v in flat_p.items() if not flat_m[k]}
    return traverse_util.unflatten_dict(train), traverse_util.unflatten_dict(frozen)


def combine(*trees: dict) -> dict:
    flat = {}
    for t in trees:
        flat.update(traverse_util.flatten_dict(t))
    return traverse_util.unflatten_dict(flat)


def full_params(trainable: dict, frozen: dict, lora_scale: float = 1.0) -> dict:
    """Classifier params for the forward: trainable base params over the frozen ones, LoRA merged in."""
    params = combine(frozen, trainable.get("params", {}))
    return lora_lib.merge(params, trainable.get("lora"), lora_scale)


def last_token_logits(params: dict, cfg: GPTConfig, x_BT: jax.Array, *, key: jax.Array | None = None,
                      opts: Options | None = None) -> jax.Array:
    """The book's `model(x)[:, -1, :]`: class logits from the last position (padding included, as the book)."""
    rngs = dropout_rngs(key)
    logits_BTC = GPT(cfg, opts or Options()).apply({"params": params}, x_BT, deterministic=key is None, rngs=rngs)
    return logits_BTC[:, -1, :]


def _loss_and_correct(logits_BC: jax.Array, y_B: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    valid_B = y_B != IGNORE_LABEL
    loss = cross_entropy(logits_BC[:, None, :], y_B[:, None], ignore_index=IGNORE_LABEL)
    correct = jnp.sum((jnp.argmax(logits_BC, axis=-1) == y_B) & valid_B)
    return loss, correct, jnp.sum(valid_B)


def make_classifier_steps(cfg: GPTConfig, tx, lora_scale: float = 1.0, opts: Options | None = None):
    """Jitted `train_step(state, frozen, (x, y)) -> (state, metrics)`, `eval_step(trainable, frozen, (x, y))`.

    `state.params` holds only what trains ({"params": ..., "lora": ...}), so gradients and optimizer
    state exist for nothing else; `frozen` enters as an argument (not a closure) so no weight is
    baked into the compiled program as a constant.
    """
    opts = opts or Options.for_backend()

    def loss_fn(trainable, frozen, x_BT, y_B, key):
        logits_BC = last_token_logits(full_params(trainable, frozen, lora_scale), cfg, x_BT, key=key, opts=opts)
        loss, correct, count = _loss_and_correct(logits_BC, y_B)
        return loss, (correct, count)

    @partial(jax.jit, donate_argnums=0)
    def train_step(state: TrainState, frozen, batch):
        x_BT, y_B = batch
        key = jax.random.fold_in(state.key, state.step) if cfg.drop_rate > 0 else None
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (correct, count)), grads = grad_fn(state.params, frozen, x_BT, y_B, key)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "correct": correct, "count": count}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    @jax.jit
    def eval_step(trainable, frozen, batch):
        x_BT, y_B = batch
        loss, (correct, count) = loss_fn(trainable, frozen, x_BT, y_B, None)
        return {"loss": loss, "correct": correct, "count": count}

    return train_step, eval_step


def evaluate_split(eval_step: Callable, trainable: dict, frozen: dict, batches: Iterator,
                   num_batches: int | None = None) -> tuple[float, float]:
    """(loss, accuracy) as the book's calc_loss_loader (mean of batch losses) and calc_accuracy_loader."""
    losses, correct, count = [], 0, 0
    for i, batch in enumerate(batches):
        if num_batches is not None and i >= num_batches:
            break
        m = eval_step(trainable, frozen, batch)
        losses.append(m["loss"])
        correct, count = correct + m["correct"], count + m["count"]
    if not losses:
        return float("nan"), float("nan")
    return float(jnp.mean(jnp.stack(losses))), float(correct) / max(int(count), 1)


# --- the book's training loop -------------------------------------------------------------------

@dataclass
class ClassifierTrainConfig:
    epochs: int = 5
    batch_size: int = 8
    eval_freq: int = 50
    eval_iter: int = 5
    seed: int = 123
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-5, weight_decay=0.1))

    def __post_init__(self):
        for name in ("epochs", "batch_size", "eval_freq", "eval_iter"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def train_classifier(cfg: GPTConfig, trainable: dict, frozen: dict, train_b: ClassBatches, val_b: ClassBatches,
                     tcfg: ClassifierTrainConfig, *, lora_scale: float = 1.0, log_path: str | Path | None = None,
                     progress: bool = True, eval_step: Callable | None = None, opts: Options | None = None) -> dict:
    """The book's train_classifier_simple over jitted steps. Returns the trained `trainable` and the history."""
    tx = make_optimizer(tcfg.optim)
    trainable = jax.tree_util.tree_map(jnp.copy, trainable)  # the step donates its state: keep the caller's arrays
    state = TrainState(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=tx.init(trainable),
                       key=jax.random.PRNGKey(tcfg.seed))
    train_step, new_eval_step = make_classifier_steps(cfg, tx, lora_scale, opts)
    eval_step = eval_step or new_eval_step  # reuse the caller's compiled one
    hist: dict[str, list] = {"step": [], "epoch_frac": [], "examples_seen": [], "train_loss": [], "val_loss": [],
                             "epoch": [], "train_acc": [], "val_acc": []}
    log = open(log_path, "w") if log_path else None
    bar = _progress(tcfg.epochs * len(train_b), progress)
    examples_seen, n_evals, t0 = 0, 0, time.time()
    for epoch in range(tcfg.epochs):
        for i, batch in enumerate(train_b.epoch(epoch)):
            state, metrics = train_step(state, frozen, batch)
            examples_seen += int(np.sum(batch[1] != IGNORE_LABEL))
            step = int(state.step) - 1  # the book's global_step: 0 after the first update
            bar.update(1)
            if step % tcfg.eval_freq == 0:
                n_evals += 1
                # a fresh shuffle, as re-iterating the book's shuffled train DataLoader
                train_loss, _ = evaluate_split(eval_step, state.params, frozen, train_b.epoch(10**6 + n_evals),
                                               tcfg.eval_iter)
                val_loss, _ = evaluate_split(eval_step, state.params, frozen, val_b.epoch(0), tcfg.eval_iter)
                if not (math.isfinite(train_loss) and math.isfinite(float(metrics["loss"]))):
                    raise FloatingPointError(f"loss became {train_loss} at step {step}; lower the learning rate")
                rec = {"step": step, "epoch": epoch + 1, "epoch_frac": epoch + (i + 1) / len(train_b),
                       "examples_seen": examples_seen, "train_loss": train_loss, "val_loss": val_loss,
                       "batch_loss": float(metrics["loss"]), "elapsed_s": round(time.time() - t0, 2)}
                for k in ("step", "epoch_frac", "examples_seen", "train_loss", "val_loss"):
                    hist[k].append(rec[k])
                if log:
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                bar.write(f"Ep {epoch + 1} (Step {step:06d}): Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
        _, train_acc = evaluate_split(eval_step, state.params, frozen, train_b.epoch(10**6 + n_evals), tcfg.eval_iter)
        _, val_acc = evaluate_split(eval_step, state.params, frozen, val_b.epoch(0), tcfg.eval_iter)
        hist["epoch"].append(epoch + 1)
        hist["train_acc"].append(train_acc)
        hist["val_acc"].append(val_acc)
        if log:
            log.write(json.dumps({"epoch": epoch + 1, "train_acc": train_acc, "val_acc": val_acc,
                                  "examples_seen": examples_seen, "elapsed_s": round(time.time() - t0, 2)}) + "\n")
            log.flush()
        bar.write(f"Training accuracy: {train_acc * 100:.2f}% | Validation accuracy: {val_acc * 100:.2f}%")
    bar.close()
    if log:
        log.close()
    return {"trainable": state.params, "history": hist, "examples_seen": examples_seen,
            "steps": int(state.step), "wall_s": time.time() - t0, "eval_step": eval_step}


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc="finetune", unit="step")


def plot_values(epochs_seen: Sequence[float], examples_seen: Sequence[float], train_values: Sequence[float],
                val_values: Sequence[float], label: str, path: str | Path) -> None:
    """The book's plot_values: train/val `label` against epochs, examples seen on a twin x-axis."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax1 = plt.subplots(figsize=(5, 3))
    ax1.plot(epochs_seen, train_values, label=f"Training {label}")
    ax1.plot(epochs_seen, val_values, linestyle="-.", label=f"Validation {label}")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel(label.capitalize())
    ax1.legend()
    ax2 = ax1.twiny()
    ax2.plot(examples_seen, train_values, alpha=0)
    ax2.set_xlabel("Examples seen")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- the whole fine-tuning run -------------------------------------------------------------------

def load_base_model(spec: str, *, random_cfg: GPTConfig | None = None, seed: int = 123) -> tuple[dict, GPTConfig]:
    """'random' (a fresh GPT of `random_cfg`), a gptjax run dir, a GPT-2 size or a local HF-format dir/file."""
    from gptjax.checkpoint import load_base_model as load

    return load(spec, random_cfg=random_cfg, seed=seed)


def finetune_classifier(params: dict, cfg: GPTConfig, data: LabeledTexts | dict[str, LabeledTexts], tokenizer: Any,
                        out_dir: str | Path, *, train: str | None = None, lora: lora_lib.LoRAConfig | None = None,
                        tcfg: ClassifierTrainConfig | None = None, max_length: int | None = None,
                        balance: bool = True, train_frac: float = 0.7, val_frac: float = 0.1,
                        drop_rate: float | None = 0.0, base_model: str | None = None,
                        pad_token_id: int = PAD_TOKEN_ID, progress: bool = True, opts: Options | None = None) -> dict:
    """Chapter 6 (and appendix E with `lora`) end to end; writes a run directory that `Classifier.from_run` loads.

    `params`/`cfg`: the base GPT (an LM or a classifier). `data`: all examples (split as the book) or
    ready {"train", "val", "test"} splits. `train`: which base params train (default 'last-block',
    or 'none' with LoRA, as the book). Writes params/ (merged), config.json, metrics.jsonl,
    loss.png, accuracy.png and, with LoRA, adapters.safetensors. `opts`: how it trains (default
    Options.for_backend()), the layout of `params`; params/ and the returned params are canonical.
    """
    from gptjax.checkpoint import save_run
    from gptjax.train import _prepare_out_dir

    tcfg = tcfg or ClassifierTrainConfig()
    opts = opts or Options.for_backend()
    out_dir = Path(out_dir)
    train = train or ("none" if lora is not None else "last-block")
    splits = data if isinstance(data, dict) else book_split(data, balance=balance, train_frac=train_frac,
                                                             val_frac=val_frac, seed=tcfg.seed)
    label_names = splits["train"].label_names
    n_classes = len(label_names)
    if drop_rate is not None:
        cfg = cfg.replace(drop_rate=drop_rate)
    if cfg.vocab_size < PAD_TOKEN_ID + 1 and pad_token_id == PAD_TOKEN_ID:
        raise ValueError(f"the model's vocab_size={cfg.vocab_size} cannot hold GPT-2 token ids (pad {PAD_TOKEN_ID}); "
                         f"use a model with vocab_size 50257")
    # encode: pad to the longest training example, reuse that length for val/test (the book's SpamDataset)
    train_ids, max_length = encode_texts(splits["train"].texts, tokenizer, max_length=max_length,
                                         context_length=cfg.context_length, pad_token_id=pad_token_id)
    enc = {"train": train_ids}
    for name in ("val", "test"):
        if len(splits.get(name, ())):
            enc[name] = encode_texts(splits[name].texts, tokenizer, max_length=max_length,
                                     context_length=cfg.context_length, pad_token_id=pad_token_id)[0]
    bs = tcfg.batch_size
    loaders = {"train": ClassBatches(enc["train"], splits["train"].labels_N, bs, shuffle=True, drop_last=True,
                                     seed=tcfg.seed, name="training")}
    for name in ("val", "test"):
        if name in enc:
            loaders[name] = ClassBatches(enc[name], splits[name].labels_N, bs, shuffle=False, drop_last=False)
    if "val" not in loaders:
        raise ValueError("the validation split is empty; use more data or a larger validation fraction")

    if opts.scan_layers:
        # per-layer params, so 'last-block' and LoRA can address single blocks
        from gptjax.model import unstack_layers

        params, opts = unstack_layers(params), opts.replace(scan_layers=False)
    key = jax.random.PRNGKey(tcfg.seed)
    head_key, lora_key = jax.random.split(key)
    if cfg.n_classes != n_classes or "cls_head" not in params:
        params, cfg = to_classifier(params, cfg, n_classes, head_key)
    trainable_base, frozen = partition(params, trainable_mask(params, train))
    trainable = {"params": trainable_base}
    lora_scale = 1.0
    if lora is not None:
        trainable["lora"] = lora_lib.init_lora(params, lora, lora_key)
        lora_scale = lora.scale
    _prepare_out_dir(out_dir)  # only once every input checked out: a bad option leaves no directory behind
    n_train, n_total = count_params(trainable), count_params(params)
    with_lora = f", LoRA r={lora.rank} alpha={lora.alpha:g}" if lora else ""
    print(f"model: {n_total:,} parameters, {n_train:,} trainable ({train}{with_lora}); "
          f"max_length {max_length}; batches train {len(loaders['train'])}, val {len(loaders['val'])}"
          + (f", test {len(loaders['test'])}" if "test" in loaders else ""))

    _, eval_step = make_classifier_steps(cfg, optax.identity(), lora_scale, opts)
    # the book's check before fine-tuning: accuracy on 10 batches of each split (about chance)
    initial = {name: evaluate_split(eval_step, trainable, frozen, b.epoch(0), 10)[1] for name, b in loaders.items()}
    print("before fine-tuning: " + "  ".join(f"{k} accuracy {v * 100:.2f}%" for k, v in initial.items()))
    result = train_classifier(cfg, trainable, frozen, loaders["train"], loaders["val"], tcfg, lora_scale=lora_scale,
                              log_path=out_dir / "metrics.jsonl", progress=progress, eval_step=eval_step, opts=opts)
    trainable, eval_step = result["trainable"], result["eval_step"]
    final = {}
    for name, b in loaders.items():  # full passes, as the book's final calc_accuracy_loader calls
        loss, acc = evaluate_split(eval_step, trainable, frozen, b.epoch(0))
        final[name] = {"loss": loss, "accuracy": acc, "examples": b.num_examples}
    print("  ".join(f"{name} accuracy {m['accuracy'] * 100:.2f}%" for name, m in final.items()))

    merged = to_canonical(full_params(trainable, frozen, lora_scale), cfg, opts)
    task = {"task": "classify", "label_names": list(label_names), "max_length": int(max_length),
            "pad_token_id": pad_token_id, "base_model": base_model, "train_layers": train,
            "lora": lora.to_dict() if lora else None, "train": tcfg.to_dict(),
            "trainable_params": n_train, "split_sizes": {k: len(v) for k, v in splits.items()},
            "initial_accuracy": initial, "results": final, "steps": result["steps"],
            "examples_seen": result["examples_seen"],
            "wall_s": round(result["wall_s"], 1)}
    save_run(out_dir, merged, cfg, extra={"options": opts.to_dict(), "classify": task})
    if lora is not None:
        # the adapters alone, plus what the base model lacks (the new head) or what trained beside them
        extra_params = combine({"cls_head": params["cls_head"]}, trainable["params"])
        lora_lib.save_adapters(out_dir / "adapters.safetensors", trainable["lora"], lora, extra_params,
                               metadata={"base_model": base_model, "n_classes": n_classes})
    h = result["history"]
    if h["step"]:
        plot_values(h["epoch_frac"], h["examples_seen"], h["train_loss"], h["val_loss"], "loss", out_dir / "loss.png")
    plot_values(h["epoch"], [result["examples_seen"] * e / tcfg.epochs for e in h["epoch"]], h["train_acc"],
                h["val_acc"], "accuracy", out_dir / "accuracy.png")
    return {**task, "history": h, "out_dir": str(out_dir), "params": merged, "cfg": cfg}


# --- inference -----------------------------------------------------------------------------------

class Classifier:
    """A fine-tuned classifier: `classify(text) -> (label, probability)`, as the book's classify_review."""

    def __init__(self, params: dict, cfg: GPTConfig, tokenizer: Any, label_names: Sequence[str],
                 max_length: int | None = None, pad_token_id: int = PAD_TOKEN_ID):
        if not cfg.n_classes:
            raise ValueError("this model has no classifier head (n_classes=0); fine-tune it with "
                             "`gptjax finetune-classifier` first")
        if len(label_names) != cfg.n_classes:
            raise ValueError(f"{len(label_names)} label names for a {cfg.n_classes}-class head")
        self.params, self.cfg, self.tokenizer = params, cfg.replace(drop_rate=0.0), tokenizer
        self.label_names, self.pad_token_id = tuple(label_names), pad_token_id
        self.max_length = min(max_length or cfg.context_length, cfg.context_length)
        self._probs = jax.jit(lambda p, x_BT: jax.nn.softmax(last_token_logits(p, self.cfg, x_BT), axis=-1))

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, tokenizer: Any = None, bpe_dir: str | None = None) -> "Classifier":
        from gptjax.checkpoint import load_run, load_run_config
        from gptjax.tokenizer import get_gpt2_tokenizer

        _, meta = load_run_config(run_dir)
        task = meta.get("classify")
        if not task:
            raise ValueError(f"{str(run_dir)!r} is not a classifier run (no 'classify' entry in config.json); "
                             f"pass the --out directory of `gptjax finetune-classifier`")
        params, cfg = load_run(run_dir)
        return cls(params, cfg, tokenizer or get_gpt2_tokenizer(bpe_dir), task["label_names"], task["max_length"],
                   task.get("pad_token_id", PAD_TOKEN_ID))

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        # the book pads every input to the training length: the model saw the class at that position
        return encode_texts(texts, self.tokenizer, max_length=self.max_length, pad_token_id=self.pad_token_id)[0]

    def predict_proba(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Class probabilities (N, C)."""
        ids_NT = self.encode(list(texts))
        out = []
        for i in range(0, len(ids_NT), batch_size):
            x_BT = ids_NT[i:i + batch_size]
            n = len(x_BT)
            if n < batch_size and len(ids_NT) > batch_size:  # one shape per batch size: compile once
                x_BT = np.concatenate([x_BT, np.full((batch_size - n, x_BT.shape[1]), self.pad_token_id, np.int32)])
            out.append(np.asarray(self._probs(self.params, x_BT))[:n])
        return np.concatenate(out) if out else np.zeros((0, self.cfg.n_classes), np.float32)

    def classify(self, text: str) -> tuple[str, float]:
        probs_C = self.predict_proba([text])[0]
        i = int(np.argmax(probs_C))
        return self.label_names[i], float(probs_C[i])


def classify(text: str, params: dict, cfg: GPTConfig, tokenizer: Any, *, label_names: Sequence[str] = SMS_SPAM_LABELS,
             max_length: int | None = None, pad_token_id: int = PAD_TOKEN_ID) -> tuple[str, float]:
    """One text -> (label, probability), as the book's classify_review."""
    return Classifier(params, cfg, tokenizer, label_names, max_length, pad_token_id).classify(text)


def classifier_from_adapters(base_params: dict, base_cfg: GPTConfig,
                             adapters_path: str | os.PathLike) -> tuple[dict, GPTConfig]:
    """Rebuild a LoRA run's classifier from its base model and adapters.safetensors (merged, ready to use)."""
    adapters, extra, lcfg, meta = lora_lib.load_adapters(adapters_path)
    if "cls_head" not in extra:
        raise ValueError(f"{str(adapters_path)!r} holds no cls_head; it is not a classifier's adapter file")
    n_classes = int(extra["cls_head"]["kernel"].shape[-1])
    params = {k: v for k, v in base_params.items() if k not in ("lm_head", "cls_head")}
    params = combine(params, extra)
    cfg = base_cfg.replace(n_classes=n_classes)
    return lora_lib.merge(params, adapters, lcfg.scale), cfg
