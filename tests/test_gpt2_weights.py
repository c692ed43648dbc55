"""GPT-2 weights: HF and book checkpoints load into gptjax with transformers' logits, greedy text and
gradients; export loads back into transformers (and the book's GPTModel); round trips; clear errors."""
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import gptjax.gpt2_export as gw
import gptjax.hub as hub
from gptjax.book_torch import book_gpt_model
from gptjax.config import GPTConfig
from gptjax.generate import generate
from gptjax.gpt2_export import export_book, export_hf
from gptjax.gpt2_weights import load_gpt2
from gptjax.model import GPT, abstract_params
from gptjax.options import Options

TINY = dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=97)
N_NEW = 20


def _logits(params: dict, cfg: GPTConfig, ids_BT: np.ndarray, opts: Options = Options()) -> np.ndarray:
    return np.asarray(GPT(cfg, opts).apply({"params": params}, jnp.asarray(ids_BT)))


def _assert_same_tree(a: dict, b: dict) -> None:
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _read(path: Path) -> dict[str, np.ndarray]:
    with safe_open(str(path), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _gptjax_params(cfg: GPTConfig, seed: int = 0) -> dict:
    """Random params of `cfg`'s shapes (numpy, no init compile); biases and LayerNorm params not 0 / 1."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(0.0, 0.2, s.shape).astype(np.float32)),
                                  abstract_params(cfg))


# ----------------------------------------------------------------------------- transformers fixtures

def _hf_model(seed: int, std: float, **config):
    """A random GPT2LMHeadModel in eval mode. GPT-2's init (std 0.02, zero biases, unit LayerNorm) would
    hide bias/LayerNorm mix-ups and give near-tied logits, so every parameter is redrawn."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    hf_cfg = transformers.GPT2Config(**config, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
                                     bos_token_id=None, eos_token_id=None)
    model = transformers.GPT2LMHeadModel(hf_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
    return model


def _hf_logits(model, ids_BT: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(ids_BT)).logits.numpy()


def _hf_greedy(model, ids_BT: np.ndarray, n: int) -> tuple[np.ndarray, float]:
    """Plain argmax loop in torch (no generate() settings to get wrong); also the smallest top-1/top-2 gap."""
    import torch

    ids, gap = torch.as_tensor(ids_BT), math.inf
    with torch.no_grad():
        for _ in range(n):
            logits_BV = model.lm_head(model.transformer(ids).last_hidden_state[:, -1])  # last position only
            top2 = logits_BV.topk(2, dim=-1).values
            gap = min(gap, (top2[:, 0] - top2[:, 1]).min().item())
            ids = torch.cat([ids, logits_BV.argmax(-1, keepdim=True)], dim=1)
    return ids.numpy(), gap


@pytest.fixture(scope="module", autouse=True)
def _torch_one_thread():
    """These torch ops are small: on a busy 2-core machine OpenMP's thread hand-offs made them ~20x slower."""
    try:
        import torch
    except ImportError:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory):
    """(model, save_pretrained directory) of a tiny random GPT-2; its tensors carry a `transformer.` prefix."""
    model = _hf_model(0, 0.1, **TINY)
    out = tmp_path_factory.mktemp("hf_tiny")
    model.save_pretrained(out)
    assert (out / "model.safetensors").exists()
    return model, out


@pytest.fixture(scope="module")
def tiny_ids() -> np.ndarray:
    return np.random.default_rng(0).integers(0, TINY["vocab_size"], size=(2, 12))


def _check_against_hf(model, params, cfg, ids_BT) -> None:
    logits = _logits(params, cfg, ids_BT)
    ref = _hf_logits(model, ids_BT)
    assert np.abs(logits - ref).max() <= 1e-4, np.abs(logits - ref).max()
    prompt = ids_BT[:1, :6]
    ours = generate(params, cfg, prompt, N_NEW, temperature=0.0)
    theirs, gap = _hf_greedy(model, prompt, N_NEW)
    # a real comparison: no near-ties for float noise to flip, and not a single repeated token
    assert gap > 1e-3 and len(set(theirs[0, 6:].tolist())) > 1
    np.testing.assert_array_equal(ours, theirs)


# ----------------------------------------------------------------------------- parity with transformers

def test_hf_checkpoint_matches_transformers(hf_tiny, tiny_ids):
    model, path = hf_tiny
    params, cfg = load_gpt2(path)
    assert cfg == GPTConfig(vocab_size=97, context_length=64, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0,
                            qkv_bias=True, tie_embeddings=True)
    assert "lm_head" not in params and params["h_1"]["attn"]["c_attn"]["kernel"].shape == (32, 96)
    _check_against_hf(model, params, cfg, tiny_ids)
    # the file path works as well as its directory
    _assert_same_tree(load_gpt2(path / "model.safetensors")[0], params)


def test_gpt2_small_shape_matches_transformers(tmp_path):
    model = _hf_model(1, 0.03, n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257)
    model.save_pretrained(tmp_path)
    params, cfg = load_gpt2(tmp_path)
    assert (cfg.emb_dim, cfg.n_layers, cfg.n_heads, cfg.context_length, cfg.vocab_size) == (768, 12, 12, 1024, 50257)
    assert sum(x.size for x in jax.tree_util.tree_leaves(params)) == 124_439_808  # GPT-2 small, tied head
    _check_against_hf(model, params, cfg, np.random.default_rng(1).integers(0, 50257, size=(1, 16)))


def test_gradients_match_torch(hf_tiny, tiny_ids):
    import torch

    model, path = hf_tiny
    params, cfg = load_gpt2(path)
    x, y = tiny_ids[:, :-1], tiny_ids[:, 1:]

    def loss_fn(p):
        logp_BTV = jax.nn.log_softmax(GPT(cfg).apply({"params": p}, jnp.asarray(x)))
        return -jnp.take_along_axis(logp_BTV, jnp.asarray(y)[..., None], axis=-1).mean()

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    model.zero_grad()
    ref_loss = torch.nn.functional.cross_entropy(model(torch.as_tensor(x)).logits.reshape(-1, cfg.vocab_size),
                                                 torch.as_tensor(y).reshape(-1))
    ref_loss.backward()
    np.testing.assert_allclose(float(loss), ref_loss.item(), rtol=1e-5)
    named = dict(model.named_parameters())
    pairs = {  # gptjax leaf -> torch parameter (wte's gradient includes the tied head's)
        ("wte", "embedding"): "transformer.wte.weight",
        ("wpe", "embedding"): "transformer.wpe.weight",
        ("h_0", "attn", "c_attn", "kernel"): "transformer.h.0.attn.c_attn.weight",
        ("h_0", "attn", "c_attn", "bias"): "transformer.h.0.attn.c_attn.bias",
        ("h_1", "mlp", "c_proj", "kernel"): "transformer.h.1.mlp.c_proj.weight",
        ("h_1", "ln_2", "scale"): "transformer.h.1.ln_2.weight",
        ("ln_f", "scale"): "transformer.ln_f.weight",
        ("ln_f", "bias"): "transformer.ln_f.bias",
    }
    for path_, name in pairs.items():
        g = grads
        for k in path_:
            g = g[k]
        np.testing.assert_allclose(np.asarray(g), named[name].grad.numpy(), rtol=1e-3, atol=1e-5, err_msg=name)


# ----------------------------------------------------------------------------- the book's naming

def _book_state_from_hf(model, with_bias: bool = True) -> dict:
    """The book's GPTModel state dict, renamed by hand from an HF GPT-2 (as the book's load_weights_into_gpt)."""
    import torch

    sd = {k.removeprefix("transformer."): v.detach().clone() for k, v in model.state_dict().items()}
    D, C = sd["wte.weight"].shape[1], sd["wpe.weight"].shape[0]
    out = {"tok_emb.weight": sd["wte.weight"], "pos_emb.weight": sd["wpe.weight"],
           "final_norm.scale": sd["ln_f.weight"], "final_norm.shift": sd["ln_f.bias"],
           "out_head.weight": sd["wte.weight"].clone()}
    for i in range(model.config.n_layer):
        h, b = f"h.{i}.", f"trf_blocks.{i}."
        q, k, v = sd[h + "attn.c_attn.weight"].split(D, dim=1)  # Conv1D (in, out) -> Linear (out, in)
        qb, kb, vb = sd[h + "attn.c_attn.bias"].split(D)
        out |= {b + "att.W_query.weight": q.T, b + "att.W_key.weight": k.T, b + "att.W_value.weight": v.T,
                b + "att.out_proj.weight": sd[h + "attn.c_proj.weight"].T,
                b + "att.out_proj.bias": sd[h + "attn.c_proj.bias"],
                b + "norm1.scale": sd[h + "ln_1.weight"], b + "norm1.shift": sd[h + "ln_1.bias"],
                b + "norm2.scale": sd[h + "ln_2.weight"], b + "norm2.shift": sd[h + "ln_2.bias"],
                b + "ff.layers.0.weight": sd[h + "mlp.c_fc.weight"].T, b + "ff.layers.0.bias": sd[h + "mlp.c_fc.bias"],
                b + "ff.layers.2.weight": sd[h + "mlp.c_proj.weight"].T, b + "ff.layers.2.bias": sd[h + "mlp.c_proj.bias"],
                b + "att.mask": torch.triu(torch.ones(C, C), diagonal=1)}
        if with_bias:
            out |= {b + "att.W_query.bias": qb, b + "att.W_key.bias": kb, b + "att.W_value.bias": vb}
    return {k: v.contiguous() for k, v in out.items()}


def test_book_checkpoint_matches_transformers(hf_tiny, tiny_ids, tmp_path):
    from safetensors.torch import save_file as torch_save_file

    model, _ = hf_tiny
    torch_save_file(_book_state_from_hf(model), str(tmp_path / "book.safetensors"))
    params, cfg = load_gpt2(tmp_path / "book.safetensors", n_heads=4)  # no config: heads can't be read off shapes
    assert cfg.qkv_bias and not cfg.tie_embeddings and params["lm_head"]["kernel"].shape == (32, 97)
    _check_against_hf(model, params, cfg, tiny_ids)


def test_export_book_loads_strictly_into_the_books_gptmodel(tmp_path, tiny_ids):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    for qkv_bias in (False, True):
        cfg = GPTConfig(vocab_size=97, context_length=64, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0,
                        qkv_bias=qkv_bias, tie_embeddings=False)
        params = _gptjax_params(cfg)
        path = export_book(params, cfg, tmp_path / f"book_{qkv_bias}.safetensors")
        book = book_gpt_model(gw.book_config(cfg)).eval()
        book.load_state_dict(load_file(str(path)), strict=True)
        with torch.no_grad():
            ref = book(torch.as_tensor(tiny_ids)).numpy()
        np.testing.assert_allclose(_logits(params, cfg, tiny_ids), ref, atol=1e-4)
        # the config rides in the metadata: loading needs no n_heads and gives the same params back
        back, back_cfg = load_gpt2(path)
        assert back_cfg == cfg
        _assert_same_tree(back, params)


# ----------------------------------------------------------------------------- export

def test_export_hf_loads_into_transformers(hf_tiny, tiny_ids, tmp_path):
    transformers = pytest.importorskip("transformers")
    model, path = hf_tiny
    params, cfg = load_gpt2(path)
    out = export_hf(params, cfg, tmp_path / "exported")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    sizes = (config["n_embd"], config["n_layer"], config["n_head"], config["n_positions"], config["vocab_size"])
    assert sizes == (32, 2, 4, 64, 97)
    assert config["layer_norm_epsilon"] == 1e-5 and config["activation_function"] == "gelu_new"
    back, info = transformers.GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    np.testing.assert_allclose(_hf_logits(back.eval(), tiny_ids), _hf_logits(model, tiny_ids), atol=1e-6)
    # load -> export -> load is the identity
    params2, cfg2 = load_gpt2(out)
    assert cfg2 == cfg
    _assert_same_tree(params2, params)


def test_export_hf_untied_without_qkv_bias(tmp_path, tiny_ids):
    pytest.importorskip("torch")  # transformers' models need it (transformers alone imports without torch)
    transformers = pytest.importorskip("transformers")
    cfg = GPTConfig(vocab_size=97, context_length=64, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
    assert not cfg.qkv_bias and not cfg.tie_embeddings  # the book's own model
    params = _gptjax_params(cfg)
    out = export_hf(params, cfg, tmp_path / "untied")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    tensors = _read(out / "model.safetensors")
    assert not tensors["h.0.attn.c_attn.bias"].any()  # GPT-2 always has a qkv bias: zeros are the same model
    hf, info = transformers.GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    np.testing.assert_allclose(_hf_logits(hf.eval(), tiny_ids), _logits(params, cfg, tiny_ids), atol=1e-4)
    back, back_cfg = load_gpt2(out)
    assert back_cfg == cfg.replace(qkv_bias=True) and not back_cfg.tie_embeddings
    np.testing.assert_array_equal(np.asarray(back["lm_head"]["kernel"]), np.asarray(params["lm_head"]["kernel"]))


def test_round_trip_without_torch(tmp_path):
    cfg = GPTConfig(vocab_size=97, context_length=64, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0,
                    qkv_bias=True, tie_embeddings=True)
    params = _gptjax_params(cfg)
    back, back_cfg = load_gpt2(export_hf(params, cfg, tmp_path / "a"))
    assert back_cfg == cfg
    _assert_same_tree(back, params)
    # exporting again over the same directory replaces the files and keeps unrelated ones
    (tmp_path / "a" / "tokenizer.json").write_text("{}")
    export_hf(back, back_cfg, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    # the book's file from a tied model carries the head as its own tensor: an untied model, same logits
    book, book_cfg = load_gpt2(export_book(params, cfg, tmp_path / "b.safetensors"))
    assert not book_cfg.tie_embeddings
    np.testing.assert_array_equal(np.asarray(book["lm_head"]["kernel"]), np.asarray(params["wte"]["embedding"]).T)


def test_bfloat16_loading(hf_tiny, tiny_ids):
    _, path = hf_tiny
    params32, cfg32 = load_gpt2(path)
    params16, cfg16 = load_gpt2(path, dtype="bfloat16", drop_rate=0.1)
    assert cfg16 == cfg32.replace(drop_rate=0.1)
    assert {x.dtype for x in jax.tree_util.tree_leaves(params16)} == {jnp.dtype(jnp.bfloat16)}
    np.testing.assert_array_equal(np.asarray(params16["wte"]["embedding"]),
                                  np.asarray(params32["wte"]["embedding"]).astype(jnp.bfloat16))
    l32, l16 = _logits(params32, cfg32, tiny_ids), _logits(params16, cfg16, tiny_ids, Options(dtype="bfloat16"))
    assert l16.dtype == np.float32 and np.abs(l16 - l32).max() < 0.1 * np.abs(l32).max()


def test_classifier_round_trips_through_the_books_naming(tmp_path):
    cfg = GPTConfig(vocab_size=97, context_length=64, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0,
                    qkv_bias=True, n_classes=2)
    params = _gptjax_params(cfg)
    path = export_book(params, cfg, tmp_path / "clf.safetensors")
    assert _read(path)["out_head.weight"].shape == (2, 32)  # the book's chapter-6 Linear(emb_dim, 2)
    back, back_cfg = load_gpt2(path)
    assert back_cfg == cfg
    _assert_same_tree(back, params)
    # without the metadata, the head's bias marks a classifier
    tensors = _read(path)
    save_file(tensors, str(tmp_path / "bare.safetensors"))
    assert load_gpt2(tmp_path / "bare.safetensors", n_heads=4)[1] == cfg
    with pytest.raises(ValueError, match="classifier head .n_classes=2.; use export_book"):
        export_hf(params, cfg, tmp_path / "hf")


# ----------------------------------------------------------------------------- other layouts

def _hub_style(tmp_path: Path, tied: bool = True) -> tuple[dict, GPTConfig, Path]:
    """A hub-style directory: no `transformer.` prefix, plus the causal-mask buffers old checkpoints carry."""
    cfg = GPTConfig(vocab_size=97, context_length=64, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0,
                    qkv_bias=True, tie_embeddings=tied)
    params = _gptjax_params(cfg)
    out = export_hf(params, cfg, tmp_path / "hub")
    tensors = _read(out / "model.safetensors")
    for i in range(cfg.n_layers):
        tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
        tensors[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    save_file(tensors, str(out / "model.safetensors"))
    return params, cfg, out


def test_hub_layout_buffers_and_config_inference(tmp_path):
    params, cfg, out = _hub_style(tmp_path)
    _assert_same_tree(load_gpt2(out)[0], params)
    # without config.json the sizes come from the shapes; the head count needs n_heads unless emb_dim % 64 == 0
    (out / "config.json").unlink()
    with pytest.raises(ValueError, match="pass n_heads="):
        load_gpt2(out)
    back, back_cfg = load_gpt2(out, n_heads=4)
    assert back_cfg == cfg
    _assert_same_tree(back, params)


def test_untied_head_detected_without_config(tmp_path):
    params, cfg, out = _hub_style(tmp_path, tied=False)
    (out / "config.json").unlink()
    back, back_cfg = load_gpt2(out, n_heads=4)
    assert back_cfg == cfg and "lm_head" in back
    _assert_same_tree(back, params)


def test_sharded_checkpoint(tmp_path):
    params, cfg, out = _hub_style(tmp_path)
    tensors = _read(out / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(out / shard))
    (out / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    _assert_same_tree(load_gpt2(out)[0], params)


# ----------------------------------------------------------------------------- errors

@pytest.fixture
def tiny_export(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    cfg = GPTConfig(vocab_size=97, context_length=64, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0,
                    qkv_bias=True, tie_embeddings=True)
    out = export_hf(_gptjax_params(cfg), cfg, tmp_path / "ckpt")
    return out, _read(out / "model.safetensors")


def test_missing_tensor(tiny_export):
    out, tensors = tiny_export
    del tensors["h.1.mlp.c_fc.bias"]
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensor 'h\.1\.mlp\.c_fc\.bias' \(expected shape \(128,\)\)"):
        load_gpt2(out)


def test_unexpected_tensor(tiny_export):
    out, tensors = tiny_export
    tensors["h.0.attn.extra.weight"] = np.zeros((3, 5), np.float32)
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected tensor 'h\.0\.attn\.extra\.weight' \(shape \(3, 5\)\)"):
        load_gpt2(out)


def test_shape_mismatch_lists_every_problem(tiny_export):
    out, tensors = tiny_export
    tensors["h.0.attn.c_attn.weight"] = np.zeros((32, 64), np.float32)
    tensors["wpe.weight"] = np.zeros((128, 32), np.float32)  # config.json says 64 positions
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(ValueError) as e:
        load_gpt2(out)
    msg = str(e.value)
    assert "2 problem(s)" in msg and "n_layers=2" in msg
    assert "tensor 'h.0.attn.c_attn.weight': expected shape (32, 96), found (32, 64)" in msg
    assert "tensor 'wpe.weight': expected shape (64, 32), found (128, 32)" in msg


def test_book_errors_use_the_files_names(hf_tiny, tmp_path):
    from safetensors.torch import save_file as torch_save_file

    state = _book_state_from_hf(hf_tiny[0])
    del state["trf_blocks.1.att.W_key.weight"]
    torch_save_file(state, str(tmp_path / "book.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensor 'trf_blocks\.1\.att\.W_key\.weight' \(expected shape \(32, 32\)"):
        load_gpt2(tmp_path / "book.safetensors", n_heads=4)


def test_prefixed_names_in_errors(hf_tiny, tmp_path):
    _, path = hf_tiny
    tensors = _read(path / "model.safetensors")
    del tensors["transformer.ln_f.bias"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(ValueError, match=r"missing tensor 'transformer\.ln_f\.bias'"):
        load_gpt2(tmp_path)


def _hub_cache(cache: Path, repo: str, files: dict[str, Path | str]) -> Path:
    """`files` (a source path, or a file's text) laid out as huggingface_hub's cache holds a download of `repo`."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, src in files.items():
        (snapshot / name).write_bytes(src.read_bytes() if isinstance(src, Path) else src.encode())
    return snapshot


def test_offline_download_is_fast_and_names_the_local_option(tmp_path, monkeypatch):
    assert os.environ.get("GPTJAX_OFFLINE")  # conftest
    for offline in ("GPTJAX_OFFLINE", "HF_HUB_OFFLINE"):  # gptjax's switch, then only the hub's own
        monkeypatch.delenv("GPTJAX_OFFLINE", raising=False)
        monkeypatch.setenv(offline, "1")
        start = time.perf_counter()
        with pytest.raises(ConnectionError) as e:
            load_gpt2("gpt2-small", cache_dir=tmp_path)
        assert time.perf_counter() - start < 3
        assert str(e.value) == (f"openai-community/gpt2 is not in the Hugging Face cache {tmp_path}, and "
                                f"HF_HUB_OFFLINE=1 (or GPTJAX_OFFLINE) forbids downloading it: {hub.LOAD_HINT}")
        assert "--model /path/to/dir" in str(e.value)


@pytest.mark.slow
def test_without_network_the_hf_cache_loads_and_a_download_fails_fast(tmp_path, tiny_export):
    """A fresh process with no offline switch set and a hub that refuses connections: a model in the HF cache
    ($HF_HOME) loads without any request; one that is not fails in one probe (not ~25 s of the hub client's
    retries) with the advice."""
    out, _ = tiny_export
    _hub_cache(tmp_path / "home" / "hub", "someone/tiny-gpt2", {n: out / n for n in ("config.json", "model.safetensors")})
    env = {k: v for k, v in os.environ.items() if k not in ("GPTJAX_OFFLINE", "HF_HUB_OFFLINE", "HF_HUB_CACHE")}
    env.update(HF_HOME=str(tmp_path / "home"), HF_ENDPOINT="http://127.0.0.1:9")  # the discard port: refused
    script = """if True:
        import json, time
        from gptjax.gpt2_weights import load_gpt2
        params, cfg = load_gpt2("someone/tiny-gpt2")
        start = time.perf_counter()
        try:
            load_gpt2("someone/absent")
        except ConnectionError as e:
            print(json.dumps({"n_layers": cfg.n_layers, "error": str(e), "seconds": time.perf_counter() - start}))
        """
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["n_layers"] == 2 and result["seconds"] < 3
    assert result["error"].startswith("could not download someone/absent from the Hugging Face hub (ConnectError")
    assert f"not in the Hugging Face cache {tmp_path / 'home' / 'hub'}" in result["error"]
    assert "HF_HUB_OFFLINE=1" in result["error"] and "--model /path/to/dir" in result["error"]


def test_hub_repo_ids_load_from_the_hf_cache(tmp_path, monkeypatch, tiny_export, capsys):
    from huggingface_hub import constants

    from gptjax.model_io import load_model
    from gptjax.cli import main

    out, tensors = tiny_export
    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # huggingface_hub's default, from $HF_HOME
    _hub_cache(cache, "someone/tiny-gpt2", {n: out / n for n in ("config.json", "model.safetensors")})
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:5], "model-00002-of-00002.safetensors": names[5:]}
    sharded = _hub_cache(cache, "someone/sharded-gpt2", {"config.json": out / "config.json", "model.safetensors.index.json":
                         json.dumps({"weight_map": {k: s for s, keys in shards.items() for k in keys}})})
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(sharded / shard))
    _hub_cache(tmp_path / "elsewhere", "openai-community/gpt2", {n: out / n for n in ("config.json", "model.safetensors")})

    want, want_cfg = load_gpt2(out)
    for params, cfg in (load_gpt2("someone/tiny-gpt2"), load_model("someone/sharded-gpt2"),
                        load_gpt2("gpt2", cache_dir=tmp_path / "elsewhere")):  # a preset, in an explicit cache
        assert cfg == want_cfg
        _assert_same_tree(params, want)
    assert main(["export", "--model", "someone/tiny-gpt2", "--out", str(tmp_path / "exported")]) == 0
    _assert_same_tree(load_gpt2(tmp_path / "exported")[0], want)
    assert main(["download", "someone/sharded-gpt2"]) == 0
    assert capsys.readouterr().out.strip().endswith(str(sharded))
    assert (hub.hub_repo("someone/tiny-gpt2"), hub.hub_repo("124M"), hub.hub_repo(out), hub.hub_repo("run/model.pth")) == \
        ("someone/tiny-gpt2", "openai-community/gpt2", None, None)


def test_only_gpt2_architecture_models_load(tmp_path, monkeypatch, tiny_export):
    out, _ = tiny_export
    llama = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 32, "num_hidden_layers": 2}
    # refused from config.json alone: the weights are never fetched (this cache holds none)
    _hub_cache(tmp_path / "hub", "someone/tiny-llama", {"config.json": json.dumps(llama)})
    with pytest.raises(ValueError, match=r"someone/tiny-llama/config.json: model_type 'llama' \(architectures "
                                         r"\['LlamaForCausalLM'\]\): only GPT-2-architecture models load"):
        load_gpt2("someone/tiny-llama", cache_dir=tmp_path / "hub")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2ForSequenceClassification"]}))
    with pytest.raises(ValueError, match=r"model_type 'gpt2' \(architectures \['GPT2ForSequenceClassification'\]\): "
                                         r"only GPT-2-architecture models load"):
        load_gpt2(out)


def test_presets_download_through_the_hub_client(tmp_path, monkeypatch, tiny_export):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    out, _ = tiny_export
    calls = []

    def fake_download(repo_id, filename, *, cache_dir=None, local_files_only=False, **_):
        calls.append((repo_id, filename, cache_dir, local_files_only))
        return str(out / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    for name, repo in [("gpt2", "openai-community/gpt2"), ("124M", "openai-community/gpt2"),
                       ("gpt2-medium", "openai-community/gpt2-medium"), ("774M", "openai-community/gpt2-large"),
                       ("gpt2-xl", "openai-community/gpt2-xl")]:
        calls.clear()
        params, cfg = load_gpt2(name, cache_dir=tmp_path / "hf")
        assert calls == [(repo, "config.json", str(tmp_path / "hf"), True),  # the cache first, no network
                         (repo, "model.safetensors", str(tmp_path / "hf"), True)]
    calls.clear()
    load_gpt2("gpt2")
    assert calls[0][2] is None  # the hub client's own default cache ($HF_HUB_CACHE, $HF_HOME/hub)


def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no such file or directory: '.*nope'.*gpt2-small"):
        load_gpt2(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no model.safetensors"):
        load_gpt2(tmp_path / "empty")
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_gpt2(tmp_path, dtype="int8")


def test_export_refuses_unwritable_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    cfg = GPTConfig(vocab_size=97, context_length=64, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
    params = _gptjax_params(cfg)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(PermissionError, match="not a writable directory"):
        export_hf(params, cfg, tmp_path / "a_file" / "out")
    with pytest.raises(NotADirectoryError):
        export_hf(params, cfg, tmp_path / "a_file")
    with pytest.raises(ValueError, match=r"param 'h_0/attn/c_attn/kernel': expected shape \(32, 96\), found \(32, 95\)"):
        bad = jax.tree_util.tree_map(lambda x: x, params)
        bad["h_0"]["attn"]["c_attn"]["kernel"] = bad["h_0"]["attn"]["c_attn"]["kernel"][:, :95]
        export_hf(bad, cfg, tmp_path / "bad")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gw, "save_file", boom)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(OSError, match="disk full"):
        export_hf(params, cfg, tmp_path / "new" / "model")
    with pytest.raises(OSError, match="disk full"):
        export_book(params, cfg, tmp_path / "book.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("damage", ["truncated", "text", "empty"])
def test_a_damaged_model_safetensors_is_one_clear_error(tiny_export, damage):
    from gptjax.model_io import load_model

    out, _ = tiny_export
    weights = out / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes({"truncated": whole[:len(whole) // 2], "text": b"<html>Not Found</html>", "empty": b""}[damage])
    for load in (load_gpt2, load_model):  # the API and what every command calls
        with pytest.raises(ValueError, match=rf"^{weights} is damaged or not a safetensors file \(Error while "
                                             rf"deserializing header: .*\); replace it with a complete copy"):
            load(out)


@pytest.mark.parametrize("text, why", [("", "it is empty"), ("{'n_embd': 32", "not JSON"),
                                       ('[{"n_embd": 32}]', "a JSON list, not an object")])
def test_a_damaged_config_json_names_the_file_not_a_missing_model_safetensors(tiny_export, tmp_path, text, why):
    from gptjax.model_io import load_model, save_run

    out, _ = tiny_export
    run = save_run(tmp_path / "run", *load_gpt2(out))  # a gptjax run directory: params/ + config.json
    for directory in (out, run):
        (directory / "config.json").write_text(text)
        for load in (load_gpt2, load_model) if directory == out else (load_model,):
            with pytest.raises(ValueError, match=rf"^{directory / 'config.json'} is damaged \({why}"):
                load(directory)


def test_exports_are_readable_by_others(tmp_path):
    """safetensors writes its files 0o600 and a staging directory is 0o700: the exports are 0o644 / 0o755."""
    cfg = GPTConfig(vocab_size=97, context_length=64, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
    params = _gptjax_params(cfg)
    hf, book = export_hf(params, cfg, tmp_path / "hf"), export_book(params, cfg, tmp_path / "book.safetensors")
    modes = {p.name: p.stat().st_mode & 0o777 for p in (hf, hf / "model.safetensors", book)}
    assert modes == {"hf": 0o755, "model.safetensors": 0o644, "book.safetensors": 0o644}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["book.safetensors", "hf"]  # no temporary left


# ----------------------------------------------------------------------------- tokenizer files, the book's .pth

def _shared_bpe_dir(tmp_path: Path) -> Path:
    """OpenAI's encoder.json + vocab.bpe from the project's shared data folder, copied into tmp (else skip)."""
    for d in (os.environ.get("GPTJAX_SHARED_DATA"), Path(__file__).parents[1] / "shared" / "data", "/work/shared/data"):
        if d and (Path(d) / "gpt2-encoder.json").is_file() and (Path(d) / "gpt2-vocab.bpe").is_file():
            (tmp_path / "bpe").mkdir()
            (tmp_path / "bpe" / "encoder.json").write_bytes((Path(d) / "gpt2-encoder.json").read_bytes())
            (tmp_path / "bpe" / "vocab.bpe").write_bytes((Path(d) / "gpt2-vocab.bpe").read_bytes())
            return tmp_path / "bpe"
    pytest.skip("gpt2-encoder.json / gpt2-vocab.bpe not available on this machine")


def test_export_hf_writes_a_tokenizer_transformers_pipelines_use(tmp_path, monkeypatch):
    pytest.importorskip("torch")  # transformers' pipelines run on torch
    transformers = pytest.importorskip("transformers")
    from gptjax import tokenizer as tk

    bpe = _shared_bpe_dir(tmp_path)
    monkeypatch.setenv("GPTJAX_BPE_DIR", str(bpe))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))
    monkeypatch.setattr(tk, "_packaged_bpe_files", lambda: None)  # the files come from GPTJAX_BPE_DIR
    tk._load_gpt2.cache_clear()
    cfg = GPTConfig(vocab_size=50257, context_length=32, emb_dim=16, n_heads=2, n_layers=2, drop_rate=0.0)
    params = _gptjax_params(cfg)
    out = export_hf(params, cfg, tmp_path / "hf")
    assert (out / "vocab.json").read_bytes() == (bpe / "encoder.json").read_bytes()
    assert (out / "merges.txt").read_bytes() == (bpe / "vocab.bpe").read_bytes()

    tok = tk.get_gpt2_tokenizer()
    text = "Hello, world! Every effort moves you<|endoftext|> naïve café 123  spaces\n\ttabs"
    assert transformers.AutoTokenizer.from_pretrained(str(out))(text)["input_ids"] == \
        tok.encode(text, allowed_special={"<|endoftext|>"})
    prompt = tok.encode("Every effort moves you")
    pipe = transformers.pipeline("text-generation", model=str(out), device="cpu")
    theirs = pipe("Every effort moves you", max_new_tokens=10, do_sample=False, return_tensors=True)
    mine = generate(params, cfg, np.array([prompt]), 10)[0].tolist()
    assert theirs[0]["generated_token_ids"] == mine and len(mine) == len(prompt) + 10
    tk._load_gpt2.cache_clear()


def test_export_hf_without_bpe_files_skips_the_tokenizer_with_a_note(tmp_path, monkeypatch):
    from gptjax import tokenizer as tk

    monkeypatch.delenv("GPTJAX_BPE_DIR", raising=False)
    monkeypatch.setattr(tk, "_packaged_bpe_files", lambda: None)
    cfg = GPTConfig(vocab_size=50257, context_length=8, emb_dim=8, n_heads=2, n_layers=1, drop_rate=0.0)
    with pytest.warns(UserWarning, match="no GPT-2 BPE files.*no tokenizer was written"):
        out = export_hf(_gptjax_params(cfg), cfg, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("layout", ["model.pth", "model_and_optimizer.pth"])
def test_the_books_pth_loads_with_torchs_logits(tmp_path, layout, tiny_ids):
    torch = pytest.importorskip("torch")
    from gptjax.model_io import load_model

    book = dict(vocab_size=97, context_length=16, emb_dim=128, n_heads=2, n_layers=2, drop_rate=0.0, qkv_bias=True)
    torch.manual_seed(0)
    model = book_gpt_model(book).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # LayerNorm scales off 1, shifts off 0
    path = tmp_path / layout
    if layout == "model.pth":
        torch.save(model.state_dict(), path)
    else:  # chapter 5's "model_and_optimizer.pth", after one AdamW step (so the optimizer holds tensors)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model(torch.as_tensor(tiny_ids[:, :8])).sum().backward()
        optimizer.step()
        torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict()}, path)
    ids = tiny_ids[:, :16]
    with torch.no_grad():
        want = model(torch.as_tensor(ids)).numpy()
    for params, cfg in (load_gpt2(path), load_model(path)):  # n_heads from 64-wide heads, as for the book's files
        assert (cfg.emb_dim, cfg.n_heads, cfg.n_layers, cfg.tie_embeddings) == (128, 2, 2, False)
        np.testing.assert_allclose(_logits(params, cfg, ids), want, atol=1e-5, rtol=0)


def test_a_pth_without_torch_says_pip_install_torch(tmp_path, monkeypatch):
    (tmp_path / "model.pth").write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(ImportError, match=r"model.pth is a PyTorch checkpoint: reading it needs torch \(pip install torch\)"):
        load_gpt2(tmp_path / "model.pth")
