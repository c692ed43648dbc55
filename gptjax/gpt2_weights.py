"""Load GPT-2 weights from safetensors (or the book's .pth, with torch) into Flax params; gptjax.hub fetches
them, gptjax.gpt2_export writes them back.

Two checkpoint namings load into the same params: OpenAI's / Hugging Face's GPT-2 (`wte.weight`,
`h.{i}.attn.c_attn.weight`, ...; optionally under `transformer.`) and the book's PyTorch `GPTModel` state
dict (`tok_emb.weight`, `trf_blocks.{i}.att.W_query.weight`, ...). `rename_rules` maps both to gptjax's names.
"""
from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import SafetensorError, safe_open

from gptjax import runs
from gptjax.config import GPTConfig
from gptjax.hub import HUB_REPOS, TORCH_SUFFIXES, check_gpt2_architecture, download_gpt2, first_line, hub_repo
from gptjax.model import abstract_params
from gptjax.options import DTYPES

# How checkpoint tensor(s) become one Flax leaf: (tensors joined along the leaf's last axis, each transposed?).
COPY, T, QKV, CAT = (1, False), (1, True), (3, True), (3, False)

# (Flax leaf, OpenAI/HF name(s), HF transform, book name(s), book transform).
# HF's Conv1D already stores (in, out) like a Flax kernel; the book's nn.Linear stores (out, in)
# and splits c_attn into three projections.
_TOP = [
    ("wte/embedding", ("wte.weight",), COPY, ("tok_emb.weight",), COPY),
    ("wpe/embedding", ("wpe.weight",), COPY, ("pos_emb.weight",), COPY),
    ("ln_f/scale", ("ln_f.weight",), COPY, ("final_norm.scale",), COPY),
    ("ln_f/bias", ("ln_f.bias",), COPY, ("final_norm.shift",), COPY),
    ("lm_head/kernel", ("lm_head.weight",), T, ("out_head.weight",), T),  # only when untied
    # the book's chapter-6 classifier replaces out_head by Linear(emb_dim, n_classes); GPT2LMHeadModel has no such head
    ("cls_head/kernel", None, None, ("out_head.weight",), T),
    ("cls_head/bias", None, None, ("out_head.bias",), COPY),
]
_BLOCK = [
    ("ln_1/scale", ("ln_1.weight",), COPY, ("norm1.scale",), COPY),
    ("ln_1/bias", ("ln_1.bias",), COPY, ("norm1.shift",), COPY),
    ("attn/c_attn/kernel", ("attn.c_attn.weight",), COPY,
     ("att.W_query.weight", "att.W_key.weight", "att.W_value.weight"), QKV),
    ("attn/c_attn/bias", ("attn.c_attn.bias",), COPY,
     ("att.W_query.bias", "att.W_key.bias", "att.W_value.bias"), CAT),
    ("attn/c_proj/kernel", ("attn.c_proj.weight",), COPY, ("att.out_proj.weight",), T),
    ("attn/c_proj/bias", ("attn.c_proj.bias",), COPY, ("att.out_proj.bias",), COPY),
    ("ln_2/scale", ("ln_2.weight",), COPY, ("norm2.scale",), COPY),
    ("ln_2/bias", ("ln_2.bias",), COPY, ("norm2.shift",), COPY),
    ("mlp/c_fc/kernel", ("mlp.c_fc.weight",), COPY, ("ff.layers.0.weight",), T),
    ("mlp/c_fc/bias", ("mlp.c_fc.bias",), COPY, ("ff.layers.0.bias",), COPY),
    ("mlp/c_proj/kernel", ("mlp.c_proj.weight",), COPY, ("ff.layers.2.weight",), T),
    ("mlp/c_proj/bias", ("mlp.c_proj.bias",), COPY, ("ff.layers.2.bias",), COPY),
]
_BLOCK_PREFIX = {"hf": "h.{i}.", "book": "trf_blocks.{i}."}
# Non-parameter buffers some checkpoints carry (causal masks): never loaded.
_BUFFERS = {"hf": re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$"), "book": re.compile(r"^trf_blocks\.\d+\.att\.mask$")}
_STRIP_PREFIXES = ("_orig_mod.", "transformer.")  # torch.compile wrapper; GPT2LMHeadModel's base model
_MAX_LISTED = 10


class _Reader:
    """Names, shapes and dtypes of a (possibly sharded) safetensors checkpoint; reads one tensor at a time,
    opening and closing the file each time (safe_open memory-maps it, and the pages it touched would
    otherwise stay resident until the end, doubling peak memory for a big model)."""

    def __init__(self, files: list[Path]):
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        self.metadata: dict[str, str] = {}
        for path in files:
            try:
                opened = safe_open(str(path), framework="numpy")
            except SafetensorError as e:
                raise ValueError(f"{path} is damaged or not a safetensors file ({e}); replace it with a complete "
                                 f"copy (download or export it again)") from None
            with opened as f:
                self.metadata.update(f.metadata() or {})
                for name in f.keys():
                    s = f.get_slice(name)
                    self.where[name], self.shapes[name], self.dtypes[name] = path, tuple(s.get_shape()), s.get_dtype()
        self._index()

    def _index(self) -> None:
        # checkpoint names without wrapper prefixes -> names as stored
        self.stored = {functools.reduce(str.removeprefix, _STRIP_PREFIXES, name): name for name in self.shapes}
        prefixes = [n[: len(n) - len(c)] for c, n in self.stored.items() if c != "lm_head.weight"]
        self.prefix = max(set(prefixes), key=prefixes.count) if prefixes else ""

    def get(self, canon: str) -> np.ndarray:
        name = self.stored[canon]
        with safe_open(str(self.where[name]), framework="numpy") as f:
            return f.get_tensor(name)

    def shape(self, canon: str) -> tuple[int, ...] | None:
        return self.shapes[self.stored[canon]] if canon in self.stored else None

    def show(self, canon: str) -> str:
        """The name as a person finds it in the file (with its `transformer.` prefix, if it has one)."""
        if canon in self.stored:
            return self.stored[canon]
        return canon if canon == "lm_head.weight" else self.prefix + canon


class _TorchReader(_Reader):
    """A PyTorch state dict: the book's `torch.save(model.state_dict(), "model.pth")`, or a dict holding it under
    "model_state_dict" (its model_and_optimizer.pth). torch reads the whole file at once."""

    def __init__(self, path: Path):
        try:
            import torch
        except ImportError:
            raise ImportError(f"{path} is a PyTorch checkpoint: reading it needs torch (pip install torch)") from None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle, zip and torch's own errors alike
            raise ValueError(f"{path} is damaged or not a PyTorch state dict ({first_line(e)}); replace it with "
                             f"a complete copy") from None
        if isinstance(state, dict) and isinstance(state.get("model_state_dict"), dict):
            state = state["model_state_dict"]
        if not isinstance(state, dict):
            raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict; save "
                             f"model.state_dict() (the book: torch.save(model.state_dict(), 'model.pth'))")
        self.metadata = {}
        self.arrays = {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy()
                       for k, v in state.items() if isinstance(v, torch.Tensor)}
        self.shapes = {k: a.shape for k, a in self.arrays.items()}
        self.dtypes = {k: f"F{8 * a.itemsize}" if a.dtype.kind == "f" else a.dtype.name for k, a in self.arrays.items()}
        self._index()

    def get(self, canon: str) -> np.ndarray:
        return self.arrays[self.stored[canon]]


def _checkpoint_files(source: Path) -> tuple[list[Path], Path | None]:
    """(safetensors files, config.json or None) of a directory or a .safetensors file."""
    if not source.exists():
        raise FileNotFoundError(f"no such file or directory: {str(source)!r}; pass a GPT-2 preset "
                                f"({', '.join(HUB_REPOS)}, 'gpt2', '124M'...), a Hugging Face hub repo id (owner/name), "
                                f"a directory with model.safetensors (+ config.json), a .safetensors file or the "
                                f"book's model.pth")
    config = (source.parent if source.is_file() else source) / "config.json"
    config = config if config.is_file() else None
    if source.is_file():
        if source.suffix not in (".safetensors",) + TORCH_SUFFIXES:
            raise ValueError(f"{str(source)!r} is neither a .safetensors file nor a PyTorch state dict "
                             f"({', '.join(TORCH_SUFFIXES)})")
        return [source], config
    if (source / "model.safetensors").is_file():
        return [source / "model.safetensors"], config
    index = source / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [source / s for s in shards], config
    found = sorted(p.name for p in source.iterdir())[:_MAX_LISTED]
    raise FileNotFoundError(f"{str(source)!r} holds no model.safetensors (found {found}); pass a directory with "
                            f"model.safetensors (+ config.json) or a .safetensors file")


def _naming(reader: _Reader, where: str) -> str:
    names = set(reader.stored)
    if any(n.startswith("trf_blocks.") for n in names) or "tok_emb.weight" in names:
        return "book"
    if any(n.startswith("h.") for n in names) or "wte.weight" in names:
        return "hf"
    raise ValueError(f"{where}: unrecognised tensor names {sorted(reader.shapes)[:5]}...; expected GPT-2's "
                     f"(wte.weight, h.0.attn.c_attn.weight, ...) or the book's GPTModel "
                     f"(tok_emb.weight, trf_blocks.0.att.W_query.weight, ...)")


def _config_from_hf(d: dict[str, Any], where: str) -> dict[str, Any]:
    missing = [k for k in ("n_embd", "n_layer", "n_head", "vocab_size") if k not in d]
    if missing or ("n_positions" not in d and "n_ctx" not in d):
        raise ValueError(f"{where}: GPT-2 config.json lacks {missing or ['n_positions']}; fix it or delete it "
                         f"(sizes are then read from the tensor shapes)")
    D = d["n_embd"]
    checks = [
        (d.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh"),
         f"activation_function {d.get('activation_function')!r} (gptjax uses the tanh GELU, 'gelu_new')"),
        (abs(d.get("layer_norm_epsilon", 1e-5) - 1e-5) < 1e-12,
         f"layer_norm_epsilon {d.get('layer_norm_epsilon')} (need 1e-5)"),
        (d.get("n_inner") in (None, 4 * D), f"n_inner {d.get('n_inner')} (need 4 * n_embd = {4 * D})"),
        (d.get("scale_attn_weights", True) and not d.get("scale_attn_by_inverse_layer_idx", False),
         "attention scaling other than 1/sqrt(head_dim)"),
    ]
    bad = [msg for ok, msg in checks if not ok]
    if bad:
        raise ValueError(f"{where}: this GPT-2 variant is not supported by gptjax's model: {'; '.join(bad)}")
    return dict(vocab_size=d["vocab_size"], context_length=d.get("n_positions", d.get("n_ctx")), emb_dim=D,
                n_heads=d["n_head"], n_layers=d["n_layer"], qkv_bias=True,
                tie_embeddings=bool(d.get("tie_word_embeddings", True)))


def _config_from_shapes(reader: _Reader, naming: str, n_heads: int | None, where: str) -> dict[str, Any]:
    emb, pos, block = ("wte.weight", "wpe.weight", r"h\.(\d+)\.") if naming == "hf" else \
        ("tok_emb.weight", "pos_emb.weight", r"trf_blocks\.(\d+)\.")
    missing = [n for n in (emb, pos) if reader.shape(n) is None]
    if missing:
        raise ValueError(f"{where}: missing tensor(s) {missing}; without them (and without config.json) the "
                         f"model size cannot be inferred")
    (V, D), (n_ctx, _) = reader.shape(emb), reader.shape(pos)
    layers = {int(m.group(1)) for n in reader.stored if (m := re.match(block, n))}
    if n_heads is None:
        # every GPT-2 size has 64-dimensional heads
        if D % 64:
            raise ValueError(f"{where}: no config.json, and the head count of emb_dim={D} cannot be read from "
                             f"tensor shapes; pass n_heads=... (or put a config.json next to the weights)")
        n_heads = D // 64
    return dict(vocab_size=V, context_length=n_ctx, emb_dim=D, n_heads=n_heads, n_layers=max(layers, default=-1) + 1)


def _resolve_config(reader: _Reader, naming: str, config_path: Path | None, n_heads: int | None,
                    where: str, file_given: bool) -> dict[str, Any]:
    d = {}
    # A file's own metadata (export_book's self-description) describes it best; in a directory,
    # config.json is the Hugging Face convention. A config.json beside a file is the fallback.
    if "config" in reader.metadata and (file_given or config_path is None):
        d = json.loads(reader.metadata["config"])
    elif config_path is not None:
        d = runs.read_json_object(config_path, "fix it or delete it (sizes are then read from the tensor shapes)")
    check_gpt2_architecture(d, str(config_path or where))
    if "n_embd" in d:
        kw = _config_from_hf(d, str(config_path or where))
    elif "emb_dim" in d:  # the book's GPT_CONFIG keys
        kw = {k: d[k] for k in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "n_classes") if k in d}
        if "qkv_bias" in d:
            kw["qkv_bias"] = bool(d["qkv_bias"])
        kw = {**_config_from_shapes(reader, naming, kw.get("n_heads", n_heads), where), **kw}
    else:
        kw = _config_from_shapes(reader, naming, n_heads, where)
    if n_heads is not None:
        kw["n_heads"] = n_heads
    if naming == "book":
        kw.setdefault("qkv_bias", reader.shape("trf_blocks.0.att.W_query.bias") is not None)
        kw["tie_embeddings"] = False  # the book's out_head is its own tensor
        if "n_classes" not in kw and (head := reader.shape("out_head.bias")) is not None:
            kw["n_classes"] = head[0]  # chapter 6: a classifier head has a bias, the LM head has none
    else:
        kw.setdefault("qkv_bias", True)
        if "tie_embeddings" not in kw:  # no config: untied only if lm_head is there and differs from wte
            head = reader.shape("lm_head.weight")
            kw["tie_embeddings"] = head is None or (head == reader.shape("wte.weight") and np.array_equal(
                reader.get("lm_head.weight"), reader.get("wte.weight")))
    return kw


def _ckpt_shapes(kind: tuple[int, bool], flax_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    parts, transposed = kind
    shape = (*flax_shape[:-1], flax_shape[-1] // parts)
    return [shape[::-1] if transposed else shape] * parts


def _to_flax(kind: tuple[int, bool], arrays: list[np.ndarray]) -> np.ndarray:
    if kind[1]:
        arrays = [a.T for a in arrays]
    return np.concatenate(arrays, axis=-1) if len(arrays) > 1 else arrays[0]


def from_flax(kind: tuple[int, bool], x: np.ndarray) -> list[np.ndarray]:
    """A Flax leaf as its checkpoint tensor(s): `_to_flax` run backwards."""
    parts, transposed = kind
    return [np.ascontiguousarray(p.T if transposed else p) for p in np.split(x, parts, axis=-1)]


def rename_rules(cfg: GPTConfig, naming: str) -> list[tuple]:
    """(Flax path, checkpoint names, transform, checkpoint shapes) for every leaf of `cfg`'s params."""
    blocks = [(f"h_{i}/", _BLOCK_PREFIX[naming].format(i=i), _BLOCK) for i in range(cfg.n_layers)]
    table = {}
    for flax_pre, pre, rows in [("", "", _TOP), *blocks]:
        for flax, hf, hf_kind, book, book_kind in rows:
            names, kind = (hf, hf_kind) if naming == "hf" else (book, book_kind)
            if names is not None:
                table[flax_pre + flax] = (tuple(pre + n for n in names), kind)
    rules = []
    for path, leaf in traverse_util.flatten_dict(abstract_params(cfg)).items():
        if (name := "/".join(path)) not in table:
            raise ValueError(f"param {name!r} has no name in a {naming} checkpoint")
        names, kind = table[name]
        rules.append((path, names, kind, _ckpt_shapes(kind, tuple(leaf.shape))))
    return rules


def raise_problems(problems: list[str], where: str, cfg: GPTConfig) -> None:
    """One ValueError listing `problems` (the first few) of `where` against `cfg`, if there are any."""
    if problems:
        shown = "\n  - ".join(problems[:_MAX_LISTED])
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise ValueError(f"{where} does not match GPTConfig(vocab_size={cfg.vocab_size}, context_length="
                         f"{cfg.context_length}, emb_dim={cfg.emb_dim}, n_heads={cfg.n_heads}, n_layers={cfg.n_layers}, "
                         f"qkv_bias={cfg.qkv_bias}, tie_embeddings={cfg.tie_embeddings}): {len(problems)} problem(s):"
                         f"\n  - {shown}{more}")


def _check_checkpoint(reader: _Reader, rules, naming: str, cfg: GPTConfig, where: str) -> None:
    problems, used = [], set()
    for _, names, _, shapes in rules:
        for name, want in zip(names, shapes):
            found = reader.shape(name)
            if found is None:
                problems.append(f"missing tensor {reader.show(name)!r} (expected shape {want})")
            elif found != want:
                problems.append(f"tensor {reader.show(name)!r}: expected shape {want}, found {found}")
            elif not (dt := reader.dtypes[reader.stored[name]]).startswith(("F", "BF")):
                problems.append(f"tensor {reader.show(name)!r}: expected a float dtype, found {dt}")
            used.add(name)
    if naming == "hf" and cfg.tie_embeddings:
        used.add("lm_head.weight")  # a tied head is wte; a stored copy is redundant
    for name in sorted(set(reader.stored) - used, key=_natural):
        if not _BUFFERS[naming].match(name):
            problems.append(f"unexpected tensor {reader.stored[name]!r} (shape {reader.shape(name)})")
    raise_problems(problems, where, cfg)


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def load_gpt2(source: str | os.PathLike, *, dtype: str = "float32", cache_dir: str | os.PathLike | None = None,
              drop_rate: float = 0.0, n_heads: int | None = None) -> tuple[dict, GPTConfig]:
    """GPT-2 weights -> (Flax params, GPTConfig).

    `source`: a preset ('gpt2-small|medium|large|xl', 'gpt2', '124M'...) or a GPT-2-architecture hub repo
    ('distilbert/distilgpt2'), from the Hugging Face cache or downloaded into it (`download_gpt2`); a local
    directory with model.safetensors (+ config.json, or a sharded model.safetensors.index.json); a
    .safetensors file; or a PyTorch state dict (.pth: the book's model.pth / model_and_optimizer.pth, needs
    torch). OpenAI/HF and book namings are detected. `dtype` is the params' storage dtype (compute in it with Options(dtype=...)).
    `n_heads` is only needed for a head size other than 64 without a config.json.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    path = Path(source).expanduser()
    repo = None if path.exists() else hub_repo(source)
    files, config_path = _checkpoint_files(download_gpt2(repo, cache_dir) if repo else path)
    where = str(files[0]) if len(files) == 1 else str(files[0].parent)
    reader = _TorchReader(files[0]) if files[0].suffix in TORCH_SUFFIXES else _Reader(files)
    naming = _naming(reader, where)
    kw = _resolve_config(reader, naming, config_path, n_heads, where, file_given=path.is_file())
    cfg = GPTConfig(**kw, drop_rate=drop_rate)
    rules = rename_rules(cfg, naming)
    _check_checkpoint(reader, rules, naming, cfg, where)
    # one tensor on the host at a time: each numpy copy dies as soon as its jax array exists
    params = {p: jnp.asarray(_to_flax(kind, [reader.get(n) for n in names]), dtype=dtype)
              for p, names, kind, _ in rules}
    return traverse_util.unflatten_dict(params), cfg
