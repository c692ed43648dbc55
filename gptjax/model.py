"""GPT-2 in Flax Linen, parameters named as OpenAI's checkpoint.

Letters: B batch, T time, D emb_dim, H heads, K head dim, V vocab.
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptjax.attention import causal_attention
from gptjax.config import GPTConfig

_init = nn.initializers.normal(stddev=0.02)


def _dtype(cfg: GPTConfig):
    return jnp.dtype(cfg.dtype)


def _dense(cfg: GPTConfig, features: int, name: str, use_bias: bool = True, std: float = 0.02) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=_dtype(cfg), param_dtype=jnp.float32,
                    kernel_init=nn.initializers.normal(stddev=std), name=name)


def _layer_norm(name: str) -> nn.LayerNorm:
    # float32 statistics whatever the compute dtype; GPT-2's eps
    return nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32, use_fast_variance=False, name=name)


class CausalSelfAttention(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg = self.cfg
        B, T, D = x_BTD.shape
        H, K = cfg.n_heads, cfg.head_dim
        qkv_BT3D = _dense(cfg, 3 * D, "c_attn", use_bias=cfg.qkv_bias)(x_BTD)
        q_BTHK, k_BTHK, v_BTHK = (a.reshape(B, T, H, K) for a in jnp.split(qkv_BT3D, 3, axis=-1))
        dropping = cfg.drop_rate > 0.0 and not deterministic
        y_BTHK = causal_attention(
            q_BTHK, k_BTHK, v_BTHK, impl=cfg.attn_impl,
            dropout_rate=cfg.drop_rate if dropping else 0.0,
            dropout_rng=self.make_rng("dropout") if dropping else None,
        )
        # GPT-2's scaled init of residual projections (std / sqrt(2 * n_layers))
        y_BTD = _dense(cfg, D, "c_proj", std=0.02 / math.sqrt(2 * cfg.n_layers))(y_BTHK.reshape(B, T, D))
        return nn.Dropout(cfg.drop_rate)(y_BTD, deterministic=deterministic)


class MLP(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg = self.cfg
        h_BTF = _dense(cfg, 4 * cfg.emb_dim, "c_fc")(x_BTD)
        h_BTF = nn.gelu(h_BTF, approximate=True)
        y_BTD = _dense(cfg, cfg.emb_dim, "c_proj", std=0.02 / math.sqrt(2 * cfg.n_layers))(h_BTF)
        return nn.Dropout(cfg.drop_rate)(y_BTD, deterministic=deterministic)


class Block(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array, deterministic: bool = True) -> jax.Array:
        dt = _dtype(self.cfg)
        x_BTD = x_BTD + CausalSelfAttention(self.cfg, name="attn")(_layer_norm("ln_1")(x_BTD).astype(dt), deterministic)
        x_BTD = x_BTD + MLP(self.cfg, name="mlp")(_layer_norm("ln_2")(x_BTD).astype(dt), deterministic)
        return x_BTD


class GPT(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, idx_BT: jax.Array, deterministic: bool = True) -> jax.Array:
        """Token ids (B, T) -> float32 logits (B, T, V), or (B, T, n_classes) for a classifier."""
        cfg = self.cfg
        T = idx_BT.shape[1]
        if T > cfg.context_length:
            raise ValueError(f"input has {T} tokens but context_length is {cfg.context_length}; crop the input "
                             f"to its last {cfg.context_length} tokens")
        wte = nn.Embed(cfg.vocab_size, cfg.emb_dim, embedding_init=_init, param_dtype=jnp.float32, name="wte")
        wpe = nn.Embed(cfg.context_length, cfg.emb_dim, embedding_init=nn.initializers.normal(0.01),
                       param_dtype=jnp.float32, name="wpe")
        x_BTD = wte(idx_BT) + wpe(jnp.arange(T))[None]
        x_BTD = nn.Dropout(cfg.drop_rate)(x_BTD, deterministic=deterministic)
        # the residual stream stays float32; blocks compute in cfg.dtype
        for i in range(cfg.n_layers):
            x_BTD = Block(cfg, name=f"h_{i}")(x_BTD, deterministic)
        x_BTD = _layer_norm("ln_f")(x_BTD)
        if cfg.n_classes:
            logits_BTV = nn.Dense(cfg.n_classes, dtype=jnp.float32, param_dtype=jnp.float32, name="cls_head")(x_BTD)
        elif cfg.tie_embeddings:
            logits_BTV = wte.attend(x_BTD.astype(jnp.float32))
        else:
            logits_BTV = nn.Dense(cfg.vocab_size, use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32,
                                  kernel_init=_init, name="lm_head")(x_BTD)
        return logits_BTV.astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def init_params(cfg: GPTConfig, key: jax.Array) -> dict:
    """Random params for `cfg` (GPT-2's or the book's PyTorch init, see GPTConfig.init), made on device."""
    params = GPT(cfg).init(key, jnp.zeros((1, min(cfg.context_length, 8)), jnp.int32))["params"]
    if cfg.init == "book":
        params = torch_default_init(params, jax.random.fold_in(key, 1))
    return params


def abstract_params(cfg: GPTConfig) -> dict:
    """Param shapes/dtypes without allocating them."""
    model = GPT(cfg)
    dummy = jax.ShapeDtypeStruct((1, min(cfg.context_length, 8)), jnp.int32)
    return jax.eval_shape(lambda k, x: model.init(k, x)["params"], jax.random.key(0), dummy)


def count_params(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


def num_params(cfg: GPTConfig, exclude_embeddings: bool = False) -> int:
    """Parameter count from shapes alone (no allocation). `exclude_embeddings` drops wpe (nanoGPT's N for FLOPs)."""
    shapes = abstract_params(cfg)
    n = count_params(shapes)
    if exclude_embeddings:
        n -= count_params(shapes["wpe"])
    return n


def torch_default_init(params: dict, key: jax.Array) -> dict:
    """Re-draw params the way the book's PyTorch GPTModel starts: nn.Embedding N(0, 1), nn.Linear
    U(+-1/sqrt(fan_in)) for weight and bias, LayerNorm ones/zeros. With GPT-2's small init (std 0.02)
    the book's 10-epoch run on a 5k-token corpus plateaus near the unigram loss instead of memorising it."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(key, len(leaves))
    fan_in = {}
    for path, leaf in leaves:
        if getattr(path[-1], "key", None) == "kernel":
            fan_in[tuple(str(getattr(p, "key", p)) for p in path[:-1])] = leaf.shape[0]
    out = []
    for (path, leaf), k in zip(leaves, keys):
        names = tuple(str(getattr(p, "key", p)) for p in path)
        if names[-1] == "embedding":
            new = jax.random.normal(k, leaf.shape, leaf.dtype)
        elif names[-1] in ("kernel", "bias") and names[:-1] in fan_in:
            bound = 1.0 / math.sqrt(fan_in[names[:-1]])
            new = jax.random.uniform(k, leaf.shape, leaf.dtype, -bound, bound)
        elif names[-1] == "scale":
            new = jnp.ones_like(leaf)
        else:  # LayerNorm bias
            new = jnp.zeros_like(leaf)
        out.append(new)
    return jax.tree_util.tree_unflatten(treedef, out)
