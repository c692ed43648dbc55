import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.config import get_config
from gptjax.lora import (LoRAConfig, dense_layers, init_lora, load_adapters, lora_param_count, merge, save_adapters,
                         target_layers)
from gptjax.model import GPT, abstract_params, count_params, init_params


@pytest.fixture
def cls_cfg(tiny_cfg):
    return tiny_cfg.replace(n_classes=2, qkv_bias=True)


def test_book_trainable_count_gpt2_small():
    # the book's appendix E: LoRA r=16 on every Linear of the 124M classifier (q, k, v separate) -> 2,666,528
    shapes = abstract_params(get_config("gpt2-small", qkv_bias=True, tie_embeddings=True, n_classes=2))
    assert count_params(shapes) == 124_441_346  # the book's "Total trainable parameters before"
    lcfg = LoRAConfig(rank=16, alpha=16)
    assert lora_param_count(shapes, lcfg) == 2_666_528
    lora_shapes = jax.eval_shape(lambda k: init_lora(shapes, lcfg, k), jax.random.key(0))
    assert count_params(lora_shapes) == 2_666_528
    assert lora_shapes["h_0"]["attn"]["c_attn"]["A"].shape == (3, 768, 16)
    assert lora_shapes["h_0"]["attn"]["c_attn"]["B"].shape == (3, 16, 768)
    assert lora_shapes["cls_head"]["B"].shape == (1, 16, 2)


def test_init_like_torch_and_identity_at_init(cls_cfg):
    params = init_params(cls_cfg, jax.random.key(0))
    lcfg = LoRAConfig(rank=4, alpha=8)
    lora = init_lora(params, lcfg, jax.random.key(1))
    a = lora["h_1"]["mlp"]["c_fc"]["A"]
    assert float(jnp.max(jnp.abs(a))) <= 1 / np.sqrt(4) and float(jnp.std(a)) > 0.2  # U(+-1/sqrt(r))
    assert all(float(jnp.abs(leaf).max()) == 0 for path, leaf in
               jax.tree_util.tree_leaves_with_path(lora) if path[-1].key == "B")
    x = jnp.arange(24, dtype=jnp.int32).reshape(2, 12) % cls_cfg.vocab_size
    fwd = jax.jit(lambda p, x: GPT(cls_cfg).apply({"params": p}, x))
    out, out_lora = fwd(params, x), fwd(merge(params, lora, lcfg.scale), x)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(out_lora))


def test_merge_equals_unmerged_adapters(cls_cfg):
    """x @ (W + s A B) == x @ W + s x A B per layer, with c_attn's q/k/v adapters on their own thirds."""
    params = init_params(cls_cfg, jax.random.key(0))
    lcfg = LoRAConfig(rank=2, alpha=3)
    lora = init_lora(params, lcfg, jax.random.key(1))
    leaves, treedef = jax.tree_util.tree_flatten(lora)
    lora = jax.tree_util.tree_unflatten(treedef, [jax.random.normal(jax.random.key(i), v.shape)
                                                  for i, v in enumerate(leaves)])  # B != 0
    merged = merge(params, lora, lcfg.scale)
    D = cls_cfg.emb_dim
    x_ND = jax.random.normal(jax.random.key(2), (5, D))
    w = params["h_0"]["attn"]["c_attn"]["kernel"]
    a, b = lora["h_0"]["attn"]["c_attn"]["A"], lora["h_0"]["attn"]["c_attn"]["B"]
    unmerged = x_ND @ w + lcfg.scale * jnp.concatenate([x_ND @ a[s] @ b[s] for s in range(3)], axis=-1)
    np.testing.assert_allclose(x_ND @ merged["h_0"]["attn"]["c_attn"]["kernel"], unmerged, rtol=1e-5, atol=1e-5)
    # the v adapter alone leaves q and k untouched
    only_v = jax.tree_util.tree_map(jnp.zeros_like, lora)
    only_v["h_0"]["attn"]["c_attn"] = {"A": a, "B": b.at[:2].set(0)}
    delta = merge(params, only_v, 1.0)["h_0"]["attn"]["c_attn"]["kernel"] - w
    assert float(jnp.abs(delta[:, :2 * D]).max()) == 0 and float(jnp.abs(delta[:, 2 * D:]).max()) > 0
    # biases, norms and embeddings are never touched
    assert merged["h_0"]["attn"]["c_attn"]["bias"] is params["h_0"]["attn"]["c_attn"]["bias"]
    # merging inside the jitted forward (training) == merging once for inference
    idx_BT = jnp.array([[1, 2, 3, 4]], jnp.int32)
    fwd = jax.jit(lambda p, l, x: GPT(cls_cfg).apply({"params": merge(p, l, lcfg.scale)}, x))
    no_lora = jax.tree_util.tree_map(jnp.zeros_like, lora)
    np.testing.assert_allclose(fwd(params, lora, idx_BT), fwd(merged, no_lora, idx_BT), rtol=1e-5, atol=1e-5)


def test_stacked_layers_get_per_layer_adapters(cls_cfg):
    """The scan_layers layout (blocks stacked under "h") merges exactly as the per-layer one."""
    params = init_params(cls_cfg, jax.random.key(0))
    lcfg = LoRAConfig(rank=2, alpha=4)
    lora = init_lora(params, lcfg, jax.random.key(1))
    lora = jax.tree_util.tree_map(lambda x: x + 0.1, lora)  # B != 0

    def stack(tree):
        rest = {k: v for k, v in tree.items() if not k.startswith("h_")}
        return {**rest, "h": jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), tree["h_0"], tree["h_1"])}

    stacked = stack(params)
    assert lora_param_count(stacked, lcfg) == lora_param_count(params, lcfg)
    assert jax.eval_shape(lambda k: init_lora(stacked, lcfg, k), jax.random.key(0))["h"]["attn"]["c_attn"][
        "A"].shape == (2, 3, cls_cfg.emb_dim, 2)
    merged = merge(stacked, stack(lora), lcfg.scale)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
                           merged, stack(merge(params, lora, lcfg.scale)))


def test_targets_subset_and_errors(cls_cfg):
    shapes = abstract_params(cls_cfg)
    assert len(dense_layers(shapes)) == 4 * cls_cfg.n_layers + 1
    chosen = target_layers(shapes, LoRAConfig(targets=("*/attn/*", "cls_head")))
    assert sorted(chosen) == ["cls_head", "h_0/attn/c_attn", "h_0/attn/c_proj", "h_1/attn/c_attn", "h_1/attn/c_proj"]
    with pytest.raises(ValueError, match="match no Dense layer"):
        target_layers(shapes, LoRAConfig(targets=("nope",)))
    for bad in (dict(rank=0), dict(rank=2.5), dict(alpha=0), dict(alpha=float("nan"))):
        with pytest.raises(ValueError, match="LoRA"):
            LoRAConfig(**bad)


def test_save_and_load_adapters(tmp_path, cls_cfg):
    params = init_params(cls_cfg, jax.random.key(0))
    lcfg = LoRAConfig(rank=2, alpha=4, targets=("*/mlp/*",))
    lora = init_lora(params, lcfg, jax.random.key(1))
    path = save_adapters(tmp_path / "a.safetensors", lora, lcfg, {"cls_head": params["cls_head"]},
                         metadata={"base_model": "gpt2-small"})
    lora2, extra, lcfg2, meta = load_adapters(path)
    assert lcfg2 == lcfg and meta == {"base_model": "gpt2-small"}
    jax.tree_util.tree_map(np.testing.assert_array_equal, lora2, lora)
    np.testing.assert_array_equal(extra["cls_head"]["kernel"], params["cls_head"]["kernel"])
    assert path.stat().st_size < count_params(params) * 4 / 2  # adapters alone, not the model
    with pytest.raises(FileNotFoundError, match="adapter"):
        load_adapters(tmp_path / "missing.safetensors")
