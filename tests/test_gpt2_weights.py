"""GPT-2 weights: HF and book checkpoints load into gptjax with transformers' logits, greedy text and
gradients; export loads back into transformers (and the book's GPTModel); round trips; clear errors."""
import json
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import gptjax.gpt2_weights as gw
from gptjax.book_torch import book_gpt_model
from gptjax.config import GPTConfig
from gptjax.generate import generate
from gptjax.gpt2_weights import export_book, export_hf, load_gpt2
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


def test_offline_download_names_the_local_option(tmp_path, monkeypatch):
    assert os.environ.get("GPTJAX_OFFLINE")  # conftest
    with pytest.raises(ConnectionError) as e:
        load_gpt2("gpt2-small", cache_dir=tmp_path)
    assert "load_gpt2('/path/to/gpt2')" in str(e.value) and "--model PATH" in str(e.value)
    assert "openai-community/gpt2" in str(e.value)
    # with only the hub's own offline switch, the hub client itself refuses: same advice
    monkeypatch.delenv("GPTJAX_OFFLINE")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConnectionError, match=r"--model PATH"):
        load_gpt2("gpt2-xl", cache_dir=tmp_path)


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
        assert [c[:3] for c in calls] == [(repo, "config.json", str(tmp_path / "hf")),
                                          (repo, "model.safetensors", str(tmp_path / "hf"))]
        assert calls[0][3] is True  # GPTJAX_OFFLINE: cache only
    assert gw.DEFAULT_CACHE_DIR == Path("checkpoints") / "hf"


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
