"""Host batches/s of random GPT windows: gptjax.shards.ShardDataset (plain memmap) against Google Grain.

    python experiments/loader_grain_vs_memmap.py [--shards DIR] [--context 1024] [--batch 16] [--batches 2000]

Both read the same uint16 shards (DIR from `prepare_throughput.py --keep-shards DIR`, else a synthetic
32M-token shard in a temporary folder) and cut (x_BT, y_BT) int32 windows at random start positions:
ShardDataset draws starts per step (with replacement, like nanoGPT); Grain shuffles the same window
records (a permutation) and batches them. Timed on the host only (no device), page cache warm; each row
after --warmup batches. Grain is optional: `pip install grain`; without it only the memmap rows run.
Writes experiments/results/loader_grain_vs_memmap.md.
"""
from __future__ import annotations

import argparse
import itertools
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from gptjax.shards import Prefetch, ShardDataset, load_meta, read_shard, write_shard

RESULTS = Path(__file__).resolve().parent / "results"


class WindowSource:
    """Grain random-access source: record i is the T+1 tokens at global start position i (no shard crossing)."""

    def __init__(self, data_dir: str, split: str, T: int):
        self.data_dir, self.split, self.T = data_dir, split, T
        self._open()

    def _open(self):
        meta = load_meta(self.data_dir)
        self.shards = [read_shard(Path(self.data_dir) / sh["name"]) for sh in meta["splits"][self.split]["shards"]]
        self.cum = np.concatenate([[0], np.cumsum([max(0, len(s) - self.T) for s in self.shards])])

    def __getstate__(self):  # memmaps are reopened in Grain's worker processes, not pickled
        return {"data_dir": self.data_dir, "split": self.split, "T": self.T}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return int(self.cum[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        s = int(np.searchsorted(self.cum, i, side="right")) - 1
        o = int(i - self.cum[s])
        return self.shards[s][o:o + self.T + 1]


def to_xy(windows) -> tuple[np.ndarray, np.ndarray]:
    w_BT = np.stack(windows).astype(np.int32)
    return np.ascontiguousarray(w_BT[:, :-1]), np.ascontiguousarray(w_BT[:, 1:])


def synthetic_shards(out: Path, n_tokens: int = 32_000_000) -> None:
    import json

    out.mkdir(parents=True, exist_ok=True)
    toks = np.random.default_rng(0).integers(0, 50257, n_tokens, dtype=np.uint16)
    sha = write_shard(out / "train_000000.bin", toks)
    shard = {"name": "train_000000.bin", "tokens": n_tokens, "sha256": sha}
    (out / "meta.json").write_text(json.dumps({"complete": True, "splits": {
        "train": {"tokens": n_tokens, "documents": 1, "shards": [shard]}}}))


def timed(batches, n: int, warmup: int) -> dict:
    it = iter(batches)
    t0 = time.perf_counter()
    x, y = next(it)
    first = time.perf_counter() - t0
    assert x.shape == y.shape and x.dtype == np.int32
    for _ in range(warmup - 1):
        next(it)
    t0 = time.perf_counter()
    for _ in range(n):
        next(it)
    wall = time.perf_counter() - t0
    return {"first_batch_s": first, "batches_per_s": n / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", help="a prepared folder (default: a synthetic 32M-token shard)")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batches", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--grain-workers", type=int, default=2)
    args = ap.parse_args()
    T, B, n, w = args.context, args.batch, args.batches, args.warmup
    with tempfile.TemporaryDirectory(prefix="gptjax-loader-") as tmp:
        data = args.shards or os.path.join(tmp, "shards")
        if not args.shards:
            synthetic_shards(Path(data))
        ds = ShardDataset(data, "train", T, B, seed=0)
        rows = {"memmap: ShardDataset.batch(step), this thread": timed(map(ds.batch, itertools.count()), n, w)}
        with Prefetch(ds.batch, put=lambda b: b) as pf:
            rows["memmap: ShardDataset + Prefetch (1 thread, depth 2)"] = timed(pf, n, w)
        try:
            import grain
        except ImportError as e:
            grain, why = None, f"Grain not measured: `import grain` failed ({e}); pip install grain"
        if grain is not None:
            why = f"Grain {getattr(grain, '__version__', '?')}"
            src = grain.MapDataset.source(WindowSource(data, "train", T)).shuffle(seed=0)
            batched = src.batch(B, batch_fn=to_xy)
            rows["grain: MapDataset.shuffle.batch, ds[step] in this thread"] = timed(
                (batched[s] for s in range(len(batched))), n, w)
            rows["grain: .to_iter_dataset() (read threads, default ReadOptions)"] = timed(
                batched.to_iter_dataset(), n, w)
            from absl import flags  # Grain's worker processes read absl flags; outside an absl app none are parsed

            flags.FLAGS.mark_as_parsed()
            opts = grain.MultiprocessingOptions(num_workers=args.grain_workers)
            rows[f"grain: .to_iter_dataset().mp_prefetch({args.grain_workers} worker processes)"] = timed(
                batched.to_iter_dataset().mp_prefetch(opts), n, w)
        tokens = ds.num_tokens
    lines = ["# Host batches/s of random windows: plain memmap (`gptjax.shards.ShardDataset`) vs Google Grain\n",
             f"{'the shards in ' + args.shards if args.shards else 'a synthetic shard'} ({tokens:,} tokens); "
             f"context {T}, batch {B}, int32 (x, y); {n} batches timed after {w}; {os.cpu_count()} CPUs, Python "
             f"{platform.python_version()}, {why}.\n",
             "| loader | batches/s | tokens/s | first batch (s) |", "|---|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['batches_per_s']:,.0f} | {r['batches_per_s'] * B * T:,.0f} | "
                     f"{r['first_batch_s']:.3f} |")
    lines += ["", "Command: `python experiments/loader_grain_vs_memmap.py " + " ".join(sys.argv[1:]) + "`", ""]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "loader_grain_vs_memmap.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
