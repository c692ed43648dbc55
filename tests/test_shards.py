import json
from pathlib import Path

import numpy as np
import pytest

from gptjax import shards
from gptjax.shards import Prefetch, ShardDataset, prepare, read_shard, write_shard
from gptjax.tokenizer import get_gpt2_tokenizer


def _tokenizer():
    try:
        return get_gpt2_tokenizer()
    except (RuntimeError, FileNotFoundError):
        for d in ("/work/shared/data", Path(__file__).parents[1] / "shared" / "data"):
            if (Path(d) / "gpt2-vocab.bpe").is_file():
                return get_gpt2_tokenizer(d)
    return None


TOK = _tokenizer()
needs_bpe = pytest.mark.skipif(TOK is None, reason="no offline GPT-2 BPE files on this machine")
WORDS = "the quick brown fox jumps over a lazy dog while every effort moves you toward it".split()


def _docs(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 120)))) + f" #{i}." for i in range(n)]


@pytest.fixture
def corpus(tmp_path):
    """Three text files (one document each) and a JSONL file of 40 documents: 43 documents in order."""
    docs = _docs(43)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"doc{i}.txt").write_text(docs[i], encoding="utf-8")
    with open(src / "more.jsonl", "w", encoding="utf-8") as f:
        for i, d in enumerate(docs[3:]):
            f.write(json.dumps({"id": i, "text": d}) + "\n")
            if i == 5:
                f.write("\n")  # a blank line is no document
    return [str(src / "doc*.txt"), str(src / "more.jsonl")], docs


def _prepare(sources, out, **kw):
    kw = {"shard_tokens": 300, "val_fraction": 0.1, "workers": 0, "progress": False, **kw}
    return prepare(sources, out, **kw)


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.bin"))}


def test_shard_round_trip(tmp_path):
    ids = np.array([0, 1, 50256, 65535, 7], np.int64)
    sha = write_shard(tmp_path / "a.bin", ids)
    got = read_shard(tmp_path / "a.bin")
    assert isinstance(got, np.memmap) and got.dtype == np.uint16
    np.testing.assert_array_equal(got, ids)
    assert sha == shards.file_sha256(tmp_path / "a.bin")
    assert (tmp_path / "a.bin").stat().st_size == 32 + 2 * len(ids)
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]  # no temp file left
    write_shard(tmp_path / "e.bin", [])
    assert len(read_shard(tmp_path / "e.bin")) == 0
    with pytest.raises(ValueError, match=r"must lie in \[0, 65535\]"):
        write_shard(tmp_path / "b.bin", [70000])
    assert not (tmp_path / "b.bin").exists()


def test_read_shard_refuses_truncated_and_foreign_files(tmp_path):
    write_shard(tmp_path / "a.bin", np.arange(100))
    data = (tmp_path / "a.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[:-3])
    with pytest.raises(ValueError, match=r"cut\.bin is truncated or damaged: its header says 100 tokens"):
        read_shard(tmp_path / "cut.bin")
    (tmp_path / "short.bin").write_bytes(data[:10])
    (tmp_path / "foreign.bin").write_bytes(np.arange(100, dtype=np.uint16).tobytes())  # nanoGPT's raw train.bin
    for name in ("short.bin", "foreign.bin"):
        with pytest.raises(ValueError, match=rf"{name} is not a gptjax token shard"):
            read_shard(tmp_path / name)
    (tmp_path / "v9.bin").write_bytes(data[:8] + (9).to_bytes(4, "little") + data[12:])
    with pytest.raises(ValueError, match=r"v9\.bin is shard format 9"):
        read_shard(tmp_path / "v9.bin")


@needs_bpe
def test_prepare_tokens_split_and_meta(corpus, tmp_path):
    sources, docs = corpus
    meta = _prepare(sources, tmp_path / "out")
    ids = [[50256] + TOK.encode_ordinary(d) for d in docs]
    val_docs = [i for i in range(len(docs)) if i % 10 == 0]  # val_fraction 0.1: documents 0, 10, 20, ...
    want = {"val": np.concatenate([ids[i] for i in val_docs]),
            "train": np.concatenate([ids[i] for i in range(len(docs)) if i not in val_docs])}
    assert meta == json.loads((tmp_path / "out" / "meta.json").read_text()) and meta["complete"]
    assert meta["tokenizer"] == {"name": "gpt2", "n_vocab": 50257, "eot": 50256}
    assert [Path(f["path"]).name for f in meta["files"]] == ["doc0.txt", "doc1.txt", "doc2.txt", "more.jsonl"]
    assert meta["sources"] == sources and meta["settings"]["val_fraction"] == 0.1
    for split, toks in want.items():
        info = meta["splits"][split]
        assert info["documents"] == (len(val_docs) if split == "val" else len(docs) - len(val_docs))
        assert info["tokens"] == len(toks) == sum(sh["tokens"] for sh in info["shards"])
        assert [sh["name"] for sh in info["shards"]] == [f"{split}_{k:06d}.bin" for k in range(len(info["shards"]))]
        assert all(sh["tokens"] == 300 for sh in info["shards"][:-1]) and 0 < info["shards"][-1]["tokens"] <= 300
        got = np.concatenate([read_shard(tmp_path / "out" / sh["name"]) for sh in info["shards"]])
        np.testing.assert_array_equal(got, toks)
        for sh in info["shards"]:
            assert sh["sha256"] == shards.file_sha256(tmp_path / "out" / sh["name"])
    assert len(meta["splits"]["train"]["shards"]) >= 4
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.endswith(".bin")) == ["meta.json"]


@needs_bpe
def test_prepare_workers_match_in_process(corpus, tmp_path, monkeypatch):
    sources, _ = corpus
    _prepare(sources, tmp_path / "a")
    monkeypatch.setattr(shards, "_BATCH_DOCS", 3)  # many worker tasks, more than are kept in flight
    _prepare(sources, tmp_path / "b", workers=2)
    assert _files(tmp_path / "a") == _files(tmp_path / "b") and len(_files(tmp_path / "a")) >= 6


@needs_bpe
def test_prepare_rerun_is_a_noop_and_other_sources_are_refused(corpus, tmp_path, monkeypatch):
    sources, _ = corpus
    meta = _prepare(sources, tmp_path / "out")

    def no_write(*a, **k):
        raise AssertionError("a finished prepare wrote a shard again")

    monkeypatch.setattr(shards, "write_shard", no_write)
    assert _prepare(sources, tmp_path / "out") == meta
    with pytest.raises(ValueError, match=r"holds shards of other sources or settings.*overwrite=True"):
        _prepare(sources[:1], tmp_path / "out")
    monkeypatch.undo()
    assert _prepare(sources[:1], tmp_path / "out", overwrite=True)["splits"]["train"]["documents"] == 2
    assert sorted(_files(tmp_path / "out")) == ["train_000000.bin", "val_000000.bin"]  # the old shards are gone


@needs_bpe
@pytest.mark.parametrize("damage", ["kill_after_write", "flip_a_byte"])
def test_interrupted_prepare_resumes_byte_identical(corpus, tmp_path, monkeypatch, damage):
    sources, _ = corpus
    _prepare(sources, tmp_path / "whole")
    real, calls = shards.write_shard, []

    def dying(path, tokens, *a, **k):
        calls.append(Path(path).name)
        out = real(path, tokens, *a, **k)
        if len(calls) == 4:  # the 4th shard is on disk, but the run dies before recording it
            (Path(path).parent / f".{Path(path).name}.x1y2.tmp").write_bytes(b"half")  # and a temp file
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(shards, "write_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        _prepare(sources, tmp_path / "part")
    out = tmp_path / "part"
    assert not (out / "meta.json").exists() and (out / "prepare-progress.json").exists()
    recorded = [sh["name"] for v in json.loads((out / "prepare-progress.json").read_text())["splits"].values()
                for sh in v["shards"]]
    assert recorded == calls[:3]
    if damage == "flip_a_byte":  # a recorded shard that no longer matches its sha256 is written again
        data = bytearray((out / calls[1]).read_bytes())
        data[-1] ^= 1
        (out / calls[1]).write_bytes(bytes(data))
    with pytest.raises(FileNotFoundError, match=r"prepare did not finish; run it again to resume"):
        ShardDataset(out, "train", 8, 2)

    calls.clear()
    monkeypatch.setattr(shards, "write_shard", lambda path, tokens, *a, **k: (calls.append(Path(path).name),
                                                                              real(path, tokens, *a, **k))[1])
    meta = _prepare(sources, out)
    assert _files(out) == _files(tmp_path / "whole")
    assert meta["splits"] == json.loads((tmp_path / "whole" / "meta.json").read_text())["splits"]
    total = sum(len(v["shards"]) for v in meta["splits"].values())
    assert len(calls) == total - (3 if damage == "kill_after_write" else 1)  # kept shards are not written again
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".bin")) == ["meta.json"]


def test_prepare_refuses_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"source .*nothing\*\.txt.* is no file and no glob"):
        prepare([str(tmp_path / "nothing*.txt")], tmp_path / "out", progress=False)
    (tmp_path / "a.jsonl").write_text('{"body": "hi"}\n')
    if TOK is not None:
        with pytest.raises(ValueError, match=r"a\.jsonl:1 has no 'text' field \(\['body'\]\); pass text_field"):
            prepare(tmp_path / "a.jsonl", tmp_path / "out", workers=0, progress=False)


@needs_bpe
def test_prepare_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    docs = _docs(12)
    pq.write_table(pa.table({"content": docs}), tmp_path / "d.parquet")
    meta = _prepare(tmp_path / "d.parquet", tmp_path / "out", text_field="content", val_fraction=0.0)
    assert meta["splits"]["train"]["tokens"] == sum(1 + len(TOK.encode_ordinary(d)) for d in docs)
    assert meta["splits"]["val"] == {"tokens": 0, "documents": 0, "shards": []}


@pytest.fixture
def stream_dir(tmp_path):
    """A prepared-looking folder whose train split is the token stream 0, 1, 2, ... over two shards."""
    toks = np.arange(1000) % 50000
    meta = {"complete": True, "splits": {"train": {"tokens": 1000, "documents": 1, "shards": []}}}
    for k, part in enumerate((toks[:601], toks[601:])):
        name = f"train_{k:06d}.bin"
        sha = write_shard(tmp_path / name, part)
        meta["splits"]["train"]["shards"].append({"name": name, "tokens": len(part), "sha256": sha})
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    return tmp_path


def test_random_batches_are_a_pure_function_of_seed_step_process(stream_dir):
    ds = ShardDataset(stream_dir, "train", 16, 4, seed=3)
    x, y = ds.batch(7)
    assert x.dtype == y.dtype == np.int32 and x.shape == y.shape == (4, 16)
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    np.testing.assert_array_equal(y, x + 1)  # the stream counts up, and no window crosses a shard
    again = ShardDataset(stream_dir, "train", 16, 4, seed=3)
    np.testing.assert_array_equal(again.batch(7)[0], x)
    assert not np.array_equal(ds.batch(8)[0], x)
    assert not np.array_equal(ShardDataset(stream_dir, "train", 16, 4, seed=4).batch(7)[0], x)
    other = ShardDataset(stream_dir, "train", 16, 4, seed=3, process_index=1, process_count=2)
    assert not np.array_equal(other.batch(7)[0], x)
    assert ds.num_windows == (601 - 16) + (399 - 16)
    np.testing.assert_array_equal(ds.batch_at(1, 2)[0], ds.batch(len(ds) + 2)[0])


def test_sequential_processes_read_disjoint_slices_covering_the_split(stream_dir):
    T, B = 10, 3
    seen = {}
    for p in range(2):
        ds = ShardDataset(stream_dir, "train", T, B, process_index=p, process_count=2, mode="sequential")
        assert len(ds) == (60 + 39) // (2 * B)
        for step in range(len(ds)):
            x, y = ds.batch(step)
            np.testing.assert_array_equal(y, x + 1)
            for row in x:
                assert int(row[0]) not in seen
                seen[int(row[0])] = p
        np.testing.assert_array_equal(ds.batch(len(ds))[0], ds.batch(0)[0])  # wraps
    starts = sorted(seen)
    # every window of every shard, in T-token steps, except the global tail that fills no whole step
    windows = [s for s in range(0, 600 - T + 1, T)][:60] + [601 + s for s in range(0, 398 - T + 1, T)][:39]
    assert starts == windows[: len(ds) * 2 * B]
    assert set(seen.values()) == {0, 1}


def test_val_batches_are_fixed_and_spread(stream_dir):
    ds = ShardDataset(stream_dir, "train", 16, 2, seed=1)
    vb = ds.val_batches(3)
    assert len(vb) == 3
    for (x, y), (x2, _) in zip(vb, ShardDataset(stream_dir, "train", 16, 2, seed=9).val_batches(3)):
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, x + 1)
    assert vb[0][0][0, 0] == 0 and vb[-1][0][-1, 0] > 900


def test_loader_errors(stream_dir, tmp_path):
    with pytest.raises(ValueError, match=r"has no 'val' shards"):
        ShardDataset(stream_dir, "val", 16, 2)
    with pytest.raises(ValueError, match=r"too few for 1 x batch 200"):
        ShardDataset(stream_dir, "train", 16, 200, mode="sequential")
    with pytest.raises(FileNotFoundError, match=r"make one with gptjax.shards.prepare"):
        ShardDataset(tmp_path / "nothing", "train", 16, 2)


def test_prefetch_overlaps_and_reports_waits(stream_dir):
    ds = ShardDataset(stream_dir, "train", 16, 2, seed=0)
    with Prefetch(ds.batch, 5, 9) as pf:
        got = list(pf)
    assert len(got) == 4 and len(pf.waits) == 4 and all(w >= 0 for w in pf.waits)
    for step, (x, y) in zip(range(5, 9), got):
        np.testing.assert_array_equal(np.asarray(x), ds.batch(step)[0])

    def broken(step):
        if step == 2:
            raise RuntimeError("bad batch")
        return step

    with Prefetch(broken, put=lambda b: b) as pf, pytest.raises(RuntimeError, match="bad batch"):
        assert [next(it := iter(pf)), next(it)] == [0, 1]
        next(it)
    with Prefetch(lambda s: s, put=lambda b: b) as pf:  # endless: close() stops the thread
        assert next(iter(pf)) == 0
    assert not pf._thread.is_alive()


@needs_bpe
def test_prepare_streams_hf_datasets(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    docs, calls = _docs(9), []

    def fake_load_dataset(name, config=None, *, split, streaming):
        calls.append((name, config, split, streaming))
        return iter([{"text": d, "id": i} for i, d in enumerate(docs)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    meta = _prepare("hf:someone/corpus:cfg", tmp_path / "out", val_fraction=0.0)
    assert calls == [("someone/corpus", "cfg", "train", True)]
    assert meta["files"] == [{"hf": "hf:someone/corpus:cfg"}]
    assert meta["splits"]["train"]["tokens"] == sum(1 + len(TOK.encode_ordinary(d)) for d in docs)
