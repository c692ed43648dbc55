"""Token shards: a corpus of any size as GPT-2 ids in fixed-size binary files, and a loader over them.

`prepare` streams documents (text files, JSONL, Parquet, `hf:` datasets) through GPT-2 BPE in worker
processes into out_dir/{train,val}_NNNNNN.bin and meta.json; `ShardDataset` memmaps the shards and cuts
(x_BT, y_BT) windows as a pure function of (seed, step, process); `Prefetch` overlaps that with the step.
"""
from __future__ import annotations

import collections
import contextlib
import glob
import hashlib
import importlib.util
import itertools
import json
import multiprocessing
import os
import queue
import re
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from gptjax import runs
from gptjax.data import file_sha256
from gptjax.tokenizer import get_gpt2_tokenizer

MAGIC, VERSION = b"GPTJAXTK", 1
_HEADER = struct.Struct("<8sIIQ8x")  # magic, format version, dtype code, token count, reserved: 32 bytes
_DTYPE_CODE, _DTYPE = 1, np.dtype("<u2")  # the code a later format could give uint32 ids
EOT = 50256  # <|endoftext|>, prepended to every document
SPLITS = ("train", "val")
_BATCH_CHARS, _BATCH_DOCS = 1 << 20, 1024  # one worker task: small enough to bound memory, big enough to amortize
META, PROGRESS = "meta.json", "prepare-progress.json"
_OURS = re.compile(r"^(train|val)_\d{6}\.bin$")
_TEMP = re.compile(r"^\.((train|val)_\d{6}\.bin|meta\.json|prepare-progress\.json)\..+\.tmp$")


def write_shard(path: str | os.PathLike, tokens: np.ndarray | Sequence[int]) -> str:
    """Write 1-D `tokens` as one shard (32-byte header, then uint16 ids) atomically; returns its sha256."""
    arr = np.asarray(tokens).reshape(-1)
    if arr.dtype != _DTYPE and arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise ValueError(f"token ids of {path} must lie in [0, 65535] (uint16), got [{arr.min()}, {arr.max()}]")
    data = np.ascontiguousarray(arr, dtype=_DTYPE)
    header = _HEADER.pack(MAGIC, VERSION, _DTYPE_CODE, data.size)
    h = hashlib.sha256(header)
    h.update(data)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.writelines((header, memoryview(data).cast("B")))

    runs.write_atomic(path, write)
    return h.hexdigest()


def read_shard(path: str | os.PathLike) -> np.ndarray:
    """The tokens of a shard as a read-only np.memmap, after checking its header and size."""
    path = Path(path)
    with open(path, "rb") as f:
        head, size = f.read(_HEADER.size), os.fstat(f.fileno()).st_size
    if len(head) < _HEADER.size or head[:8] != MAGIC:
        raise ValueError(f"{path} is not a gptjax token shard (no {MAGIC.decode()} header); "
                         f"make shards with gptjax.shards.prepare")
    _, version, code, n = _HEADER.unpack(head)
    if version != VERSION or code != _DTYPE_CODE:
        raise ValueError(f"{path} is shard format {version} (dtype code {code}); this gptjax reads format "
                         f"{VERSION}: prepare the corpus again with this version")
    if size != _shard_bytes(n):
        raise ValueError(f"{path} is truncated or damaged: its header says {n} tokens ({_shard_bytes(n)} bytes) "
                         f"but it has {size} bytes; run prepare into its folder again (intact shards are kept)")
    return np.memmap(path, _DTYPE, "r", _HEADER.size, (n,)) if n else np.zeros(0, _DTYPE)


def _shard_bytes(n_tokens: int) -> int:
    return _HEADER.size + n_tokens * _DTYPE.itemsize


# --- documents ---------------------------------------------------------------------------------

def _resolve(sources: Sequence[str | os.PathLike]) -> list[dict]:
    """The sources as entries {"hf": spec} or {"path", "bytes", "mtime_ns"}: globs expanded (sorted), deduplicated."""
    entries, seen = [], set()
    for src in sources:
        s = os.fspath(src)
        if s.startswith("hf:"):
            entries.append({"hf": s})
            continue
        pattern = os.path.expanduser(s)
        paths = sorted(glob.glob(pattern, recursive=True)) if any(c in pattern for c in "*?[") else [pattern]
        if not (paths := [p for p in paths if os.path.isfile(p)]):
            raise FileNotFoundError(f"source {s!r} is no file and no glob that matches files; pass text files, "
                                    f".jsonl, .parquet, globs of them, or 'hf:NAME[:CONFIG][:SPLIT]'")
        for p in (p for p in map(os.path.abspath, paths) if p not in seen):
            if p.endswith(".parquet") and importlib.util.find_spec("pyarrow") is None:
                raise ImportError(f"reading {p} needs pyarrow: pip install pyarrow (or convert it to JSONL)")
            seen.add(p)
            entries.append({"path": p, "bytes": os.path.getsize(p), "mtime_ns": os.stat(p).st_mtime_ns})
    if not entries:
        raise ValueError("prepare needs at least one source")
    return entries


def _field(row: Any, field: str, where: str) -> str:
    if not isinstance(row, dict) or field not in row:
        keys = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise ValueError(f"{where} has no {field!r} field ({keys}); pass text_field=...")
    return "" if row[field] is None else str(row[field])


def _json(line: str, where: str) -> Any:
    try:
        return json.loads(line)
    except ValueError as e:
        raise ValueError(f"{where} is not JSON ({e})") from None


def _hf_rows(spec: str) -> Iterator[Any]:
    name, config, split = (spec[3:].split(":", 2) + [None, None])[:3]
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"{spec!r} needs the `datasets` package: pip install datasets; or pass local "
                          f"JSONL/Parquet files") from e
    try:
        yield from datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
    except Exception as e:
        raise RuntimeError(f"could not stream Hugging Face dataset {spec!r}: {type(e).__name__}: {e}; check the "
                           f"name, config, split and network, or pass local JSONL/Parquet files") from e


def _documents(entries: list[dict], field: str) -> Iterator[str]:
    """Every document's text, in source order: a text file is one document, JSONL a line, Parquet/HF a row."""
    for e in entries:
        if "hf" in e:
            yield from (_field(row, field, f"{e['hf']} row {i}") for i, row in enumerate(_hf_rows(e["hf"])))
            continue
        path = e["path"]
        try:
            if path.endswith((".jsonl", ".ndjson")):
                with open(path, encoding="utf-8") as f:
                    yield from (_field(_json(line, f"{path}:{i}"), field, f"{path}:{i}")
                                for i, line in enumerate(f, 1) if line.strip())
            elif path.endswith(".parquet"):
                import pyarrow.parquet as pq
                pf = pq.ParquetFile(path)
                if field not in pf.schema_arrow.names:
                    raise ValueError(f"{path} has no column {field!r} ({pf.schema_arrow.names}); pass text_field=...")
                for batch in pf.iter_batches(columns=[field], batch_size=1024):
                    yield from ("" if t is None else str(t) for t in batch.column(0).to_pylist())
            else:
                yield Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path} is not UTF-8 text ({err}); convert it to UTF-8 first") from None


def _encode(texts: list[str], bpe_dir: Any) -> tuple[np.ndarray, np.ndarray]:
    """All documents' ids, each led by <|endoftext|>, as one uint16 array, and each document's length."""
    enc = get_gpt2_tokenizer(bpe_dir)  # cached: loaded once per worker process
    docs = [[EOT, *enc.encode_ordinary(t)] for t in texts]
    return np.array([i for doc in docs for i in doc], np.uint16), np.array([len(doc) for doc in docs], np.int64)


# --- prepare -----------------------------------------------------------------------------------

class _SplitWriter:
    """Fills one split's fixed-size buffer and writes it as the next shard each time it is full."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int, done: list[dict], on_shard: Callable):
        self.out_dir, self.split, self.on_shard = out_dir, split, on_shard
        self.shards = list(done)
        # Where this split's stream resumes: (document index, tokens of it already in the kept shards).
        self.start = tuple(done[-1]["next"]) if done else (0, 0)
        self.buf, self.fill = np.empty(shard_tokens, np.uint16), 0

    def add(self, doc: int, toks: np.ndarray) -> None:
        pos = self.start[1] if doc == self.start[0] else 0
        while pos < len(toks):
            n = min(len(self.buf) - self.fill, len(toks) - pos)
            self.buf[self.fill:self.fill + n] = toks[pos:pos + n]
            self.fill, pos = self.fill + n, pos + n
            if self.fill == len(self.buf):
                self.flush((doc, pos) if pos < len(toks) else (doc + 1, 0))

    def flush(self, nxt: tuple[int, int]) -> None:
        name = f"{self.split}_{len(self.shards):06d}.bin"
        sha = write_shard(self.out_dir / name, self.buf[:self.fill])
        self.shards.append({"name": name, "tokens": self.fill, "sha256": sha, "next": list(nxt)})
        self.fill = 0
        self.on_shard()


def _read_record(out_dir: Path) -> dict | None:
    """meta.json of a finished run, else prepare-progress.json of a partial one; None if neither reads."""
    for p in (out_dir / META, out_dir / PROGRESS):
        if p.is_file():
            with contextlib.suppress(ValueError):
                return json.loads(p.read_text())
    return None


def _kept_shards(out_dir: Path, record: dict | None) -> dict[str, list[dict]]:
    """Per split, the longest prefix of the record's shards that are on disk with their recorded sha256."""
    def intact(sh: dict) -> bool:
        return (out_dir / sh["name"]).is_file() and file_sha256(out_dir / sh["name"]) == sh["sha256"]

    splits = (record or {}).get("splits", {})
    return {s: list(itertools.takewhile(intact, splits.get(s, {}).get("shards", []))) for s in SPLITS}


def _is_val(i: int, frac: Fraction) -> bool:
    # Document i is validation when ceil((i+1)f) > ceil(i f): evenly spaced, document 0 first, exact count.
    p, q = frac.numerator, frac.denominator
    return -(-(i + 1) * p // q) > -(-i * p // q)


def prepare(sources: str | os.PathLike | Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
            shard_tokens: int = 100_000_000, val_fraction: float = 0.005, workers: int | None = None,
            text_field: str = "text", bpe_dir: str | os.PathLike | None = None, overwrite: bool = False,
            progress: bool = True) -> dict:
    """Tokenize `sources` into GPT-2 shards in `out_dir`; returns (and writes last) meta.json.

    Sources: text files (one document each), .jsonl (`text_field` per line), .parquet (`text_field` column),
    globs of them, or 'hf:NAME[:CONFIG][:SPLIT]' (streamed). Every document is led by <|endoftext|>; documents
    0, 1/f, 2/f, ... (f = val_fraction) validate. Each split's token stream is cut into {train,val}_NNNNNN.bin
    of `shard_tokens` tokens (the last shorter). `workers` processes tokenize (default: one per CPU; 0: this
    process); memory: two shard buffers and ~2*workers batches of ~1 MB of text in flight.

    Resume: after each full shard, prepare-progress.json records the shards so far and where the next one
    starts in the document stream. A re-run with the same sources and settings keeps the recorded shards whose
    sha256 still match, deletes the rest, skips the documents before the resume point without tokenizing
    them, and writes the same bytes as an uninterrupted run. A finished out_dir with the same sources (paths,
    sizes, mtimes) and settings is a no-op; one with others is refused unless `overwrite`. One prepare per
    out_dir at a time.
    """
    out_dir = Path(out_dir)
    if not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise ValueError(f"shard_tokens must be a positive int, got {shard_tokens!r}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    workers = (os.cpu_count() or 1) if workers is None else workers
    sources = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    entries = _resolve(sources)
    enc = get_gpt2_tokenizer(bpe_dir)
    frac = Fraction(val_fraction).limit_denominator(1_000_000)
    key = {"files": entries, "settings": {"shard_tokens": shard_tokens, "val_fraction": val_fraction,
                                          "text_field": text_field},
           "tokenizer": {"name": enc.name, "n_vocab": enc.n_vocab, "eot": EOT}}
    out_dir.mkdir(parents=True, exist_ok=True)
    record = _read_record(out_dir)
    if record is not None and {k: record.get(k) for k in key} != key:
        if record.get("complete") and not overwrite:
            raise ValueError(f"{out_dir} holds shards of other sources or settings (see its {META}); pass "
                             f"overwrite=True to replace them, or use another out_dir")
        record = None
    if record is not None and record.get("complete") and all(
            (p := out_dir / sh["name"]).is_file() and p.stat().st_size == _shard_bytes(sh["tokens"])
            for s in record["splits"].values() for sh in s["shards"]):
        return record
    kept = _kept_shards(out_dir, record)
    (out_dir / META).unlink(missing_ok=True)  # from here on out_dir holds no finished dataset until the end
    names = {sh["name"] for v in kept.values() for sh in v}
    for p in out_dir.iterdir():
        if (_OURS.match(p.name) and p.name not in names) or _TEMP.match(p.name):
            p.unlink()

    def save(complete: bool = False) -> dict:
        rec = {**key, "format": "gptjax-shards", "version": VERSION, "dtype": "uint16", "complete": complete,
               "sources": [os.fspath(s) for s in sources],
               "splits": {s: {"tokens": sum(sh["tokens"] for sh in w.shards), "documents": n_docs[s],
                              "shards": w.shards} for s, w in writers.items()}}
        runs.write_json_atomic(out_dir / (META if complete else PROGRESS), rec)
        return rec

    n_docs = {s: 0 for s in SPLITS}
    writers = {s: _SplitWriter(out_dir, s, shard_tokens, kept[s], save) for s in SPLITS}
    save()
    _tokenize(_documents(entries, text_field), writers, n_docs, frac, workers, bpe_dir, progress)
    for w in writers.values():
        if w.fill:
            w.flush((sum(n_docs.values()), 0))
    meta = save(complete=True)
    (out_dir / PROGRESS).unlink(missing_ok=True)
    return meta


def _tokenize(docs: Iterator[str], writers: dict, n_docs: dict, frac: Fraction, workers: int, bpe_dir: Any,
              progress: bool) -> None:
    """Documents -> batches of ~1 MB -> `workers` processes -> the split writers, in document order."""
    from tqdm.auto import tqdm
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers else None
    bar = tqdm(disable=not progress, desc="prepare", unit="tok", unit_scale=True)
    pending: collections.deque = collections.deque()  # bounded: Pool.imap would read the whole corpus ahead

    def submit(plan: list, texts: list, drain: bool = False) -> None:
        pending.append((plan, pool.apply_async(_encode, (texts, bpe_dir)) if pool else _encode(texts, bpe_dir)))
        while len(pending) > (0 if drain else 2 * workers):
            plan, job = pending.popleft()
            ids, lens = job.get() if pool else job
            for (doc, split), toks in zip(plan, np.split(ids, np.cumsum(lens)[:-1])):
                writers[split].add(doc, toks)
            bar.update(len(ids))

    try:
        plan, texts, chars = [], [], 0
        for doc, text in enumerate(t for t in docs if t):
            split = "val" if frac and _is_val(doc, frac) else "train"
            n_docs[split] += 1
            if doc < writers[split].start[0]:
                continue  # in a shard a partial run kept
            plan.append((doc, split))
            texts.append(text)
            chars += len(text)
            if chars >= _BATCH_CHARS or len(texts) >= _BATCH_DOCS:
                submit(plan, texts)
                plan, texts, chars = [], [], 0
        submit(plan, texts, drain=True)  # the last batch (possibly empty) and everything still pending
    finally:
        bar.close()
        if pool:
            pool.terminate()


def load_meta(data_dir: str | os.PathLike) -> dict:
    """meta.json of a finished `prepare`."""
    path = Path(data_dir) / META
    if not path.is_file():
        why = "its prepare did not finish; run it again to resume" if (Path(data_dir) / PROGRESS).is_file() else \
            "make one with gptjax.shards.prepare"
        raise FileNotFoundError(f"{data_dir} holds no finished token shards ({META} missing): {why}")
    return json.loads(path.read_text())


# --- loading -----------------------------------------------------------------------------------

class ShardDataset:
    """(x_BT, y_BT) int32 windows of T+1 tokens from one split's memmapped shards; no window crosses a shard.

    `batch(step)` is a pure function of (seed, step, process_index), so a resume needs only the step.
    "random": B window starts drawn uniformly over every position of every shard (nanoGPT's sampling).
    "sequential": non-overlapping windows in token order; step s covers the global windows
    [s*P*B, (s+1)*P*B) and process p reads rows [p*B, (p+1)*B) of them; it wraps after `len(self)` steps.
    `batch_size` is this process's B; P = process_count.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str, context_length: int, batch_size: int, *,
                 seed: int = 0, process_index: int = 0, process_count: int = 1, mode: str = "random"):
        if mode not in ("random", "sequential"):
            raise ValueError(f"mode must be 'random' or 'sequential', got {mode!r}")
        if min(context_length, batch_size, process_count) < 1 or seed < 0 or not 0 <= process_index < process_count:
            raise ValueError(f"need context_length, batch_size, process_count >= 1, seed >= 0 and 0 <= process_index "
                             f"< process_count; got {context_length}, {batch_size}, {process_count}, {seed}, "
                             f"{process_index}")
        meta, self.data_dir = load_meta(data_dir), Path(data_dir)
        info = meta["splits"].get(split)
        if not info or not info["shards"]:
            raise ValueError(f"{data_dir} has no {split!r} shards (splits: "
                             f"{[s for s, v in meta['splits'].items() if v['shards']]})")
        self.shards = [read_shard(self.data_dir / sh["name"]) for sh in info["shards"]]
        for sh, arr in zip(info["shards"], self.shards):
            if len(arr) != sh["tokens"]:
                raise ValueError(f"{self.data_dir / sh['name']} has {len(arr)} tokens, {META} says {sh['tokens']}")
        T, B, P = context_length, batch_size, process_count
        counts = [max(0, len(a) - T) if mode == "random" else max(0, (len(a) - 1) // T) for a in self.shards]
        self._cum = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.num_windows = int(self._cum[-1])
        if self.num_windows < (1 if mode == "random" else B * P):
            raise ValueError(f"the {split!r} split of {data_dir} has {self.num_windows} {mode} windows of "
                             f"{T + 1} tokens, too few for {P} x batch {B}; use a smaller context_length or "
                             f"batch_size, or more data")
        self.split, self.T, self.B, self.P, self.mode = split, T, B, P, mode
        self.seed, self.process_index = seed, process_index
        self.num_tokens = int(info["tokens"])

    def __len__(self) -> int:
        """Steps per epoch: every window once (sequential), or as many draws (random)."""
        return max(1, self.num_windows // (self.B * self.P))

    def windows(self, idx_B: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The (x_BT, y_BT) of global window indices `idx_B` (in this mode's numbering)."""
        shard_B = np.searchsorted(self._cum, idx_B, side="right") - 1
        start_B = (idx_B - self._cum[shard_B]) * (1 if self.mode == "random" else self.T)
        w_BT = np.stack([self.shards[s][o:o + self.T + 1] for s, o in zip(shard_B, start_B)]).astype(np.int32)
        return np.ascontiguousarray(w_BT[:, :-1]), np.ascontiguousarray(w_BT[:, 1:])

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """This process's (x_BT, y_BT) of global step `step`."""
        if self.mode == "random":
            idx_B = np.random.default_rng((self.seed, step, self.process_index)).integers(0, self.num_windows, self.B)
        else:
            first = (step % len(self)) * self.B * self.P + self.process_index * self.B
            idx_B = np.arange(first, first + self.B)
        return self.windows(idx_B)

    def batch_at(self, epoch: int, i: int) -> tuple[np.ndarray, np.ndarray]:
        """The engine's batch protocol: batch i of epoch `epoch` is step epoch * len(self) + i."""
        return self.batch(epoch * len(self) + i)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return (self.batch_at(epoch, i) for i in range(start, len(self)))

    def val_batches(self, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """n fixed batches at evenly spaced windows over the whole split, the same for every seed (windows
        repeat when the split has fewer than n*B*P)."""
        idx = np.linspace(0, self.num_windows - 1, n * self.B * self.P).round().astype(np.int64)
        rows = idx.reshape(n, self.P, self.B)[:, self.process_index]
        return [self.windows(r) for r in rows]


class Prefetch(contextlib.AbstractContextManager):
    """Batches of steps [start, stop) made and put on device by a background thread, `depth` ahead.

    Iterate it for the device batches in step order; `waits[i]` is how long the consumer waited for
    the i-th one (near 0 when the input pipeline keeps up). `put` defaults to jax.device_put (pass a
    sharding-aware one for meshes). Use as a context manager, or call close().
    """

    _END = object()

    def __init__(self, make_batch: Callable[[int], Any], start: int = 0, stop: int | None = None, *,
                 depth: int = 2, put: Callable[[Any], Any] | None = None):
        if put is None:
            import jax
            put = jax.device_put
        self.waits: list[float] = []
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(make_batch, put, start, stop), daemon=True)
        self._thread.start()

    def _offer(self, item: Any) -> bool:
        while not self._stop.is_set():
            with contextlib.suppress(queue.Full):
                self._q.put(item, timeout=0.1)
                return True
        return False

    def _produce(self, make_batch, put, start, stop) -> None:
        step = start
        try:
            while (stop is None or step < stop) and self._offer(put(make_batch(step))):
                step += 1
        except BaseException as e:  # handed to the consumer, who raises it
            self._offer(e)
            return
        self._offer(self._END)

    def __iter__(self) -> Iterator[Any]:
        while True:
            t0 = time.perf_counter()
            item = self._q.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            self.waits.append(time.perf_counter() - t0)
            yield item

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._q.get_nowait()
        self._thread.join(timeout=5)

    def __exit__(self, *exc) -> None:
        self.close()
