import hashlib
import http.server
import os
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

from gptjax import data
from gptjax.data import (
    IGNORE_INDEX,
    Batches,
    cached_download,
    create_dataloaders,
    load_corpus,
    load_hf_text,
    make_windows,
    split_text,
)
from gptjax.tokenizer import get_gpt2_tokenizer


def shared_file(name: str) -> Path | None:
    """A file from the project's shared data folder, if this machine has one (never copied into the repo)."""
    for d in (os.environ.get("GPTJAX_SHARED_DATA"), Path(__file__).parents[1] / "shared" / "data", "/work/shared/data"):
        if d and (Path(d) / name).is_file():
            return Path(d) / name
    return None


VERDICT = shared_file("the-verdict.txt")
needs_verdict = pytest.mark.skipif(VERDICT is None, reason="the-verdict.txt not available on this machine")
TEXT = "In the sunlit terraces of the palace.\nHello, do you like tea?\n"


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_one_cache_root_follows_the_environment(tmp_path, monkeypatch):
    from gptjax import runtime
    from gptjax.cache import cache_dir
    from gptjax.cpu import matvec

    for var in ("GPTJAX_CACHE", "XDG_CACHE_HOME", "GPTJAX_CACHE_DIR", "GPTJAX_KERNEL_DIR"):
        monkeypatch.delenv(var, raising=False)
    assert cache_dir() == Path.home() / ".cache" / "gptjax"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "gptjax"
    monkeypatch.setenv("GPTJAX_CACHE", str(tmp_path / "mine"))  # downloads, compiled programs and the kernel
    assert (cache_dir(), runtime.default_cache_dir(), matvec.kernel_dir()) == \
        (tmp_path / "mine", tmp_path / "mine" / "jax", tmp_path / "mine" / "kernels")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("GPTJAX_CACHE", str(d))
    return d


@pytest.fixture
def server():
    """A tiny HTTP server on 127.0.0.1 serving `files` (path -> bytes) and counting requests per path."""
    files: dict[str, bytes] = {}
    hits: dict[str, int] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits[self.path] = hits.get(self.path, 0) + 1
            if self.path not in files:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(files[self.path])))
            self.end_headers()
            self.wfile.write(files[self.path])

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.files, httpd.hits = files, hits
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


# --- corpora -----------------------------------------------------------------------------------

def test_local_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    assert load_corpus(path) == TEXT
    assert load_corpus(str(path), sha256=sha(TEXT.encode())) == TEXT
    with pytest.raises(ValueError, match="sha256 mismatch.*expected 0+, got " + sha(TEXT.encode())):
        load_corpus(path, sha256="0" * 64)


def test_missing_and_empty_and_non_utf8_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.txt' is not an existing file; pass a local UTF-8 text file"):
        load_corpus(str(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text(" \n")
    with pytest.raises(ValueError, match=r"empty\.txt' is empty"):
        load_corpus(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        load_corpus(tmp_path / "latin1.txt")


def test_file_url_download_is_cached(tmp_path, cache):
    src = tmp_path / "src.txt"
    src.write_text(TEXT, encoding="utf-8")
    url = src.as_uri()
    assert load_corpus(url, sha256=sha(TEXT.encode())) == TEXT
    cached = list(cache.iterdir())
    assert len(cached) == 1 and cached[0].read_text(encoding="utf-8") == TEXT
    src.unlink()  # a second load must come from the cache
    assert load_corpus(url) == TEXT


def test_sha256_mismatch_deletes_download(tmp_path, cache):
    src = tmp_path / "src.txt"
    src.write_text(TEXT, encoding="utf-8")
    with pytest.raises(ValueError, match=f"sha256 mismatch.*expected {'a' * 64}, got {sha(TEXT.encode())}"):
        load_corpus(src.as_uri(), sha256="A" * 64)
    assert not cache.exists() or list(cache.iterdir()) == []  # neither the file nor a .part left behind


def test_http_download_once(server, cache, monkeypatch):
    monkeypatch.delenv("GPTJAX_OFFLINE")  # only a local server on 127.0.0.1 is contacted
    server.files["/corpus.txt"] = TEXT.encode()
    url = server.url + "/corpus.txt"
    assert load_corpus(url, sha256=sha(TEXT.encode())) == TEXT
    assert load_corpus(url, sha256=sha(TEXT.encode())) == TEXT
    assert load_corpus(url) == TEXT
    assert server.hits["/corpus.txt"] == 1
    # A cached file that no longer matches the requested checksum is fetched again.
    server.files["/corpus.txt"] = b"new text"
    assert load_corpus(url, sha256=sha(b"new text")) == "new text"
    assert server.hits["/corpus.txt"] == 2


def test_http_failure_is_a_clear_error(server, cache, monkeypatch):
    monkeypatch.delenv("GPTJAX_OFFLINE")
    with pytest.raises(RuntimeError, match=r"could not download .*/missing\.txt.*pass the local file path"):
        load_corpus(server.url + "/missing.txt")
    assert list(cache.iterdir()) == []


def test_offline_url_not_in_cache(cache):
    with pytest.raises(RuntimeError, match="GPTJAX_OFFLINE is set.*pass the local file path"):
        cached_download("https://example.com/corpus.txt")


def test_default_corpus_is_the_shipped_verdict_with_no_network(cache):
    # GPTJAX_OFFLINE is set (conftest) and the cache is empty: the default reads the package's copy
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text = load_corpus()
    assert text == load_corpus("default")
    assert len(text) == 20479 and text.startswith("I HAD always thought Jack Gisburn")
    assert data.file_sha256(data.VERDICT_PATH) == data.VERDICT_SHA256
    assert not cache.exists() or list(cache.iterdir()) == []  # nothing downloaded, nothing cached
    if VERDICT is not None:  # the book repository's copy, byte for byte
        assert data.VERDICT_PATH.read_bytes() == VERDICT.read_bytes()


def test_the_offline_corpus_name_is_gone():
    with pytest.raises(FileNotFoundError, match=r"'offline' is not an existing file.*'default' \(the-verdict\)"):
        load_corpus("offline")


def test_hf_text_builder_with_local_files(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    text = load_hf_text("text", data_files=str(path), cache_dir=tmp_path / "hf")
    assert text == TEXT.rstrip("\n")
    with pytest.raises(ValueError, match=r"no column 'body'.*\['text'\]"):
        load_hf_text("text", data_files=str(path), text_column="body", cache_dir=tmp_path / "hf")


def test_hf_source_string_with_local_folder(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.txt").write_text(TEXT, encoding="utf-8")
    assert load_corpus(f"hf:{folder}", cache_dir=tmp_path / "cache") == TEXT.rstrip("\n")
    assert load_corpus(f"hf:{folder}::train", cache_dir=tmp_path / "cache") == TEXT.rstrip("\n")
    with pytest.raises(RuntimeError, match=r"could not load Hugging Face dataset .*split='validation'"):
        load_corpus(f"hf:{folder}::validation", cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="names no dataset"):
        load_corpus("hf:")


# --- splits, windows, batches ------------------------------------------------------------------

def test_split_text_by_characters():
    text = "abcdefghij" * 3
    train, val = split_text(text, 0.9)
    assert (train, val) == (text[:27], text[27:])
    with pytest.raises(ValueError, match="train_ratio"):
        split_text(text, 1.0)


def book_windows(ids, max_length, stride):
    """The book's GPTDatasetV1 loop, for comparison."""
    inputs, targets = [], []
    for i in range(0, len(ids) - max_length, stride):
        inputs.append(ids[i : i + max_length])
        targets.append(ids[i + 1 : i + max_length + 1])
    return np.array(inputs), np.array(targets)


@pytest.mark.parametrize("max_length,stride", [(4, 1), (4, 4), (4, 3), (8, 2), (1, 1)])
def test_make_windows_matches_book(max_length, stride):
    ids = list(range(100, 121))
    inputs_NT, targets_NT = make_windows(ids, max_length, stride)
    want_in, want_tgt = book_windows(ids, max_length, stride)
    assert inputs_NT.dtype == targets_NT.dtype == np.int32
    np.testing.assert_array_equal(inputs_NT, want_in)
    np.testing.assert_array_equal(targets_NT, want_tgt)


def test_make_windows_book_example():
    ids = list(range(20))
    inputs_NT, targets_NT = make_windows(ids, 4, 1)
    assert inputs_NT[0].tolist() == ids[0:4] and targets_NT[0].tolist() == ids[1:5]
    inputs_NT, _ = make_windows(ids, 4, 4)
    assert inputs_NT[:, 0].tolist() == [0, 4, 8, 12] and len(set(inputs_NT.ravel().tolist())) == inputs_NT.size
    assert make_windows(ids[:5], 4, 4)[0].shape == (1, 4)  # context_length+1 tokens is exactly enough


def test_make_windows_errors():
    with pytest.raises(ValueError, match=r"validation split has 120 tokens but context_length\+1 = 257 are needed"):
        make_windows(np.zeros(120, np.int32), 256, 256, name="validation")
    with pytest.raises(ValueError, match=r"has 4 tokens.*--context-length.*--train-ratio"):
        make_windows([1, 2, 3, 4], 4, 1)
    with pytest.raises(ValueError, match="max_length and stride must be positive"):
        make_windows([1, 2, 3], 0, 1)
    with pytest.raises(ValueError, match="max_length and stride must be positive"):
        make_windows([1, 2, 3], 1, 0)


def windows(n: int, t: int = 3) -> tuple[np.ndarray, np.ndarray]:
    inputs_NT = np.arange(n * t, dtype=np.int32).reshape(n, t)
    return inputs_NT, inputs_NT + 1


def test_batches_in_order_drop_last():
    loader = Batches(*windows(7), 2, shuffle=False)
    assert len(loader) == 3 and loader.num_tokens == 3 * 2 * 3
    batches = list(loader.epoch(0))
    assert len(batches) == 3
    for i, (x_BT, y_BT) in enumerate(batches):
        assert x_BT.shape == y_BT.shape == (2, 3) and x_BT.dtype == np.int32
        np.testing.assert_array_equal(x_BT[:, 0], [6 * i, 6 * i + 3])
        np.testing.assert_array_equal(y_BT, x_BT + 1)


def test_batches_padded_last_batch():
    loader = Batches(*windows(5), 2, shuffle=False, drop_last=False)
    assert len(loader) == 3 and loader.num_tokens == 5 * 3
    *_, (x_BT, y_BT) = loader.epoch(0)
    assert x_BT.shape == y_BT.shape == (2, 3)
    np.testing.assert_array_equal(x_BT, [[12, 13, 14], [0, 0, 0]])
    np.testing.assert_array_equal(y_BT, [[13, 14, 15], [IGNORE_INDEX] * 3])


def test_batches_shuffle_reproducible_per_seed_and_epoch():
    inputs_NT, targets_NT = windows(10)
    a = Batches(inputs_NT, targets_NT, 2, shuffle=True, seed=1)

    def firsts(loader, epoch):
        return [x_BT[:, 0].tolist() for x_BT, _ in loader.epoch(epoch)]

    assert firsts(a, 3) == firsts(Batches(inputs_NT, targets_NT, 2, shuffle=True, seed=1), 3)  # no history needed
    assert firsts(a, 0) != firsts(a, 1)
    assert firsts(a, 0) != firsts(Batches(inputs_NT, targets_NT, 2, shuffle=True, seed=2), 0)
    assert sorted(sum(firsts(a, 5), [])) == list(range(0, 30, 3))  # every window once per epoch
    for x_BT, y_BT in a.epoch(2):
        np.testing.assert_array_equal(y_BT, x_BT + 1)  # inputs and targets stay paired


def test_batches_resume_position():
    loader = Batches(*windows(10), 2, shuffle=True, seed=7)
    full = list(loader.epoch(4))
    resumed = list(loader.epoch(4, start=3))
    assert len(resumed) == 2
    for (xa, ya), (xb, yb) in zip(full[3:], resumed):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    np.testing.assert_array_equal(loader.batch_at(4, 1)[0], full[1][0])
    with pytest.raises(IndexError, match="an epoch has 5 batches"):
        loader.batch_at(0, 5)


def test_batches_errors():
    with pytest.raises(ValueError, match="batch_size must be positive"):
        Batches(*windows(4), 0, shuffle=False)
    with pytest.raises(ValueError, match=r"only 3 windows for batch_size=4.*--batch-size 3 or smaller"):
        Batches(*windows(3), 4, shuffle=True)
    assert len(Batches(*windows(3), 4, shuffle=False, drop_last=False)) == 1
    with pytest.raises(ValueError, match=r"\(N, T\)"):
        Batches(np.zeros((4, 3)), np.zeros((4, 2)), 2, shuffle=False)


def test_create_dataloaders_small():
    tok = get_gpt2_tokenizer()
    text = load_corpus()[:4_000]
    train, val = create_dataloaders(text, tok, context_length=16, batch_size=4, stride=8, seed=3)
    assert train.shuffle and train.drop_last and not val.shuffle and not val.drop_last
    x_BT, y_BT = next(iter(train.epoch(0)))
    assert x_BT.shape == y_BT.shape == (4, 16)
    train_ids = tok.encode(split_text(text)[0])
    np.testing.assert_array_equal(train.inputs_NT[1], train_ids[8:24])
    with pytest.raises(ValueError, match=r"validation split has \d+ tokens but context_length\+1 = 257"):
        create_dataloaders(text, tok, context_length=256, batch_size=1)
    with pytest.raises(ValueError, match=r"training split has only \d+ windows for batch_size=1000"):
        create_dataloaders(text, tok, context_length=16, batch_size=1000)


@needs_verdict
def test_create_dataloaders_book_ch05():
    text = VERDICT.read_text(encoding="utf-8")
    train, val = create_dataloaders(text, get_gpt2_tokenizer(), context_length=256, batch_size=2, train_ratio=0.9)
    assert (len(train), train.num_tokens) == (9, 4608)
    assert (len(val), val.num_tokens) == (1, 512)
    assert all(x_BT.shape == (2, 256) for x_BT, _ in train.epoch(0))
