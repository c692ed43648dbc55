"""GPT-2 in Flax Linen, parameters named as OpenAI's checkpoint.

Shape letters: the one legend for tensor names in all of gptjax (x_BTD is (B, T, D); a digit is a
literal size, as in x_2BT or losses_N4), each letter with one meaning:
B batch, T time, S key/cache positions, L layers, D emb_dim (the model width; the book's attention
classes' d_in), E the book's attention classes' d_out, H heads, K head dim, V vocab, F MLP width (4 D),
C classes (classifier head), N items of a dataset (examples, windows, records, HellaSwag items),
G generated (new) tokens, M rows of a flattened batch (B*T tokens, or B*H rows of the KV cache),
I in features, O out features, R LoRA rank.

What the model is comes from `GPTConfig`; how it runs from `Options` (gptjax.options): compute
dtype, attention implementation, scan/remat, vocab padding, kernel layout. Params have one
canonical layout (OpenAI's: per-layer h_0.., kernels (in, out), vocab unpadded), which checkpoints
hold; gptjax.layout converts to and from the layout an `Options` builds, and `init_params` draws
canonical params and converts them. The projections, the token table, the tied
head and the gradient barrier come from gptjax.cpu, which keeps the CPU speed paths. Decoding with a
KV cache passes the "cache" collection (`init_cache`) and the rows' position `pos_B`.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptjax import cpu
from gptjax.attention import cache_attention, causal_attention, dropout
from gptjax.config import GPTConfig
from gptjax.layout import to_layout
from gptjax.options import Options

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block
    "dots": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs, recompute the cheap elementwise ops
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # ... but not attention's
}


def _inits(cfg: GPTConfig, std: float, fan_in: int | None = None) -> dict:
    if cfg.init == "book":  # the book's GPTModel keeps PyTorch's nn.Linear defaults: U(+-1/sqrt(fan_in))
        bound = 1.0 / math.sqrt(fan_in or cfg.emb_dim)
        uniform = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)  # noqa: E731
        return dict(kernel_init=uniform, bias_init=uniform)
    return dict(kernel_init=nn.initializers.normal(stddev=std))


def _dropout(module: nn.Module, x: jax.Array, rate: float, deterministic: bool) -> jax.Array:
    # attention.dropout, not nn.Dropout: its mask is drawn once instead of re-derived in the backward pass
    if deterministic or rate == 0.0:
        return x
    return dropout(x, rate, module.make_rng("dropout"))


def dropout_rngs(key: jax.Array | None) -> dict | None:
    """The `rngs` for `GPT.apply` in training: {"dropout": key}, or None (deterministic) for no key.

    The key is re-seeded as an "unsafe_rbg" key, so Flax's per-layer fold-ins and each dropout's bits come
    from XLA's RngBitGenerator (threefry fold-ins are rolled loops on XLA:CPU; experiments/cpu_step_profile.py).
    """
    if key is None:
        return None
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and jax.random.key_impl(key) == "unsafe_rbg":
        return {"dropout": key}
    return {"dropout": jax.random.wrap_key_data(jax.random.bits(key, (4,), jnp.uint32), impl="unsafe_rbg")}


def _layer_norm(name: str) -> nn.LayerNorm:
    # float32 statistics whatever the compute dtype; GPT-2's eps
    return nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32, use_fast_variance=False, name=name)


class CausalSelfAttention(nn.Module):
    cfg: GPTConfig
    opts: Options = Options()

    @nn.compact
    def __call__(self, x_BTD: jax.Array, deterministic: bool = True, pos_B: jax.Array | None = None) -> jax.Array:
        cfg, opts = self.cfg, self.opts
        B, T, D = x_BTD.shape
        H, K = cfg.n_heads, cfg.head_dim
        qkv_BT3D = cpu.dense(opts, 3 * D, "c_attn", use_bias=cfg.qkv_bias, **_inits(cfg, 0.02))(x_BTD)
        q_BTHK, k_BTHK, v_BTHK = (a.reshape(B, T, H, K) for a in jnp.split(qkv_BT3D, 3, axis=-1))
        if pos_B is not None:
            # KV cache (layout and positions: see cache_attention)
            y_BTHK, k_MKS, v_MSK = cache_attention(q_BTHK, k_BTHK, v_BTHK, self.get_variable("cache", "k"),
                                                   self.get_variable("cache", "v"), pos_B)
            self.put_variable("cache", "k", k_MKS)
            self.put_variable("cache", "v", v_MSK)
        else:
            dropping = cfg.drop_rate > 0.0 and not deterministic
            y_BTHK = causal_attention(q_BTHK, k_BTHK, v_BTHK, impl=opts.attn_impl,
                                      dropout_rate=cfg.drop_rate if dropping else 0.0,
                                      dropout_rng=self.make_rng("dropout") if dropping else None)
        # GPT-2's scaled init of residual projections (std / sqrt(2 * n_layers))
        c_proj = cpu.dense(opts, D, "c_proj", **_inits(cfg, 0.02 / math.sqrt(2 * cfg.n_layers)))
        return _dropout(self, c_proj(y_BTHK.reshape(B, T, D)), cfg.drop_rate, deterministic)


class MLP(nn.Module):
    cfg: GPTConfig
    opts: Options = Options()

    @nn.compact
    def __call__(self, x_BTD: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg, opts, D = self.cfg, self.opts, self.cfg.emb_dim
        h_BTF = nn.gelu(cpu.dense(opts, 4 * D, "c_fc", **_inits(cfg, 0.02))(x_BTD), approximate=True)
        c_proj = cpu.dense(opts, D, "c_proj", **_inits(cfg, 0.02 / math.sqrt(2 * cfg.n_layers), fan_in=4 * D))
        return _dropout(self, c_proj(h_BTF), cfg.drop_rate, deterministic)


class Block(nn.Module):
    """Pre-LN block. `(x, pos_B) -> (x, None)`: the carry/output shape nn.scan wants; `deterministic`
    is a field so remat and scan need no static arguments."""
    cfg: GPTConfig
    opts: Options = Options()
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BTD: jax.Array, pos_B: jax.Array | None = None) -> tuple[jax.Array, None]:
        cfg, opts, det, dt = self.cfg, self.opts, self.deterministic, jnp.dtype(self.opts.dtype)
        x_BTD = cpu.block_input(x_BTD, opts)
        x_BTD = x_BTD + CausalSelfAttention(cfg, opts, name="attn")(_layer_norm("ln_1")(x_BTD).astype(dt), det, pos_B)
        x_BTD = x_BTD + MLP(cfg, opts, name="mlp")(_layer_norm("ln_2")(x_BTD).astype(dt), det)
        return x_BTD, None


def _block_class(opts: Options) -> type[nn.Module]:
    if opts.remat == "none":
        return Block
    # inside scan the loop already keeps XLA from merging the recomputation back (prevent_cse costs speed)
    return nn.remat(Block, policy=REMAT_POLICIES[opts.remat], prevent_cse=not opts.scan_layers)


class GPT(nn.Module):
    cfg: GPTConfig
    opts: Options = Options()

    @nn.compact
    def __call__(self, idx_BT: jax.Array, deterministic: bool = True, *, pos_B: jax.Array | None = None,
                 last_B: jax.Array | None = None, targets_BT: jax.Array | None = None) -> jax.Array:
        """Token ids (B, T) -> float32 logits (B, T, V), or (B, T, n_classes) for a classifier.

        targets_BT (a language model under opts.loss_chunk > 0): the mean cross-entropy against them instead
        (-100 ignored), the head computed chunk by chunk (`chunked_cross_entropy`).

        pos_B: decode with a KV cache (apply with the "cache" collection from `init_cache`, mutable):
        row b's tokens sit at positions pos_B[b].. ; a scalar when all rows share one position
        (faster: the cache is then written in place). last_B: only the logits at index last_B[b] of
        each row are computed, shape (B, 1, V) (prefill needs one position, not T).
        """
        cfg, opts = self.cfg, self.opts
        B, T = idx_BT.shape
        if T > cfg.context_length:
            raise ValueError(f"input has {T} tokens but context_length is {cfg.context_length}; crop the input "
                             f"to its last {cfg.context_length} tokens")
        book = cfg.init == "book"  # the book's nn.Embedding: N(0, 1)
        wte = cpu.Embed(opts.padded_vocab_size(cfg.vocab_size), cfg.emb_dim, nn.initializers.normal(1.0 if book else 0.02),
                        name="wte")
        wpe = nn.Embed(cfg.context_length, cfg.emb_dim, embedding_init=nn.initializers.normal(1.0 if book else 0.01),
                       dtype=jnp.float32, param_dtype=jnp.float32, name="wpe")
        pos_BT = jnp.arange(T)[None, :] if pos_B is None else jnp.reshape(pos_B, (-1, 1)) + jnp.arange(T)[None, :]
        x_BTD = _dropout(self, wte(idx_BT) + wpe(pos_BT), cfg.drop_rate, deterministic)
        # the residual stream stays float32; blocks compute in opts.dtype
        block = _block_class(opts)
        if opts.scan_layers:
            if pos_B is not None:
                raise ValueError("KV-cache decoding runs on per-layer params: convert with unstack_layers and "
                                 "opts.replace(scan_layers=False) (gptjax.generate does this for you)")
            # no broadcast variables or outputs to check: skip flax's constancy check (and its extra trace
            # of the block), which flax 0.12.12 runs through a DCE that refuses effectful ops in the body
            blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                             in_axes=nn.broadcast, length=cfg.n_layers, unroll=opts.scan_unroll,
                             check_constancy_invariants=False)
            x_BTD, _ = blocks(cfg, opts, deterministic, name="h")(x_BTD, None)
        else:
            for i in range(cfg.n_layers):
                x_BTD, _ = block(cfg, opts, deterministic, name=f"h_{i}")(x_BTD, pos_B)
        if last_B is not None:
            x_BTD = x_BTD[jnp.arange(B), last_B][:, None]  # (B, 1, D)
        x_BTD = _layer_norm("ln_f")(x_BTD)
        if cfg.n_classes:
            if cfg.init == "book":
                head = cpu.dense(opts.replace(linear_layout="in_out"), cfg.n_classes, "cls_head", dtype=jnp.float32,
                                 **_inits(cfg, 0.02))
                return head(x_BTD)
            return nn.Dense(cfg.n_classes, dtype=jnp.float32, param_dtype=jnp.float32, name="cls_head")(x_BTD)
        if cfg.tie_embeddings:
            def head(x):
                return cpu.tied_head(x, wte, opts)
        else:
            # the head multiplies in the compute dtype (a quarter of the FLOPs) but returns float32 logits
            head = cpu.dense(opts, opts.padded_vocab_size(cfg.vocab_size), "lm_head", use_bias=False, f32_out=True,
                             **_inits(cfg, 0.02))
        if targets_BT is not None and opts.loss_chunk:
            head(x_BTD[:1, :1])  # creates the head's params at init; their arrays feed the chunked loss
            w = wte.embedding if cfg.tie_embeddings else head.variables["params"]["kernel"]
            w_VD = w if cfg.tie_embeddings or opts.linear_layout == "out_in" else w.T
            return chunked_cross_entropy(x_BTD, w_VD, targets_BT, opts.loss_chunk, cfg.vocab_size, opts.dtype)
        # padded vocab rows exist only to give the head matmul a round shape: drop their logits
        return head(x_BTD)[..., :cfg.vocab_size].astype(jnp.float32)


def chunked_cross_entropy(x_BTD: jax.Array, w_VD: jax.Array, targets_BT: jax.Array, chunk: int, vocab_size: int,
                          dtype: str = "float32") -> jax.Array:
    """Mean cross-entropy of the logits x @ w.T against targets (-100 ignored), `chunk` positions at a time:
    each chunk's (B, chunk, V) float32 logits are made, reduced to sums and dropped, and made again in the
    backward pass (jax.checkpoint), so (B, T, V) never exists. Rows of w past `vocab_size` (padding) are
    left out."""
    B, T, D = x_BTD.shape
    chunk = min(chunk, T)
    pad = -T % chunk
    # the chunks stacked on a leading axis for scan: (n_chunks, B, chunk, D) and (n_chunks, B, chunk)
    x_chunks = jnp.pad(x_BTD, ((0, 0), (0, pad), (0, 0))).reshape(B, -1, chunk, D).swapaxes(0, 1)
    y_chunks = jnp.pad(targets_BT, ((0, 0), (0, pad)), constant_values=-100).reshape(B, -1, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def chunk_sums(xc_BTD, yc_BT):  # one chunk: its T is `chunk` positions
        logits_BTV = jnp.einsum("btd,vd->btv", xc_BTD.astype(dtype), w_VD.astype(dtype),
                                preferred_element_type=jnp.float32)[..., :vocab_size]
        valid_BT = yc_BT != -100
        yc_BT = jnp.where(valid_BT, yc_BT, 0)
        nll_BT = jax.nn.logsumexp(logits_BTV, axis=-1) - jnp.take_along_axis(logits_BTV, yc_BT[..., None], -1)[..., 0]
        return jnp.sum(nll_BT * valid_BT), jnp.sum(valid_BT)

    def body(carry, xy):
        total, count = chunk_sums(*xy)
        return (carry[0] + total, carry[1] + count), None

    (total, count), _ = jax.lax.scan(body, (jnp.float32(0), jnp.int32(0)), (x_chunks, y_chunks))
    return total / jnp.maximum(count, 1)


# --- params: init, shapes, counts ----------------------------------------------------------

def init_params(cfg: GPTConfig, key: jax.Array, opts: Options = Options()) -> dict:
    """Random params for `cfg` in the layout `opts` builds, made once, on device: drawn in the canonical
    layout and converted (`to_layout`), so every layout starts from the same values (padded vocab
    rows are zeros)."""
    return _init_params(cfg, opts, key)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _init_params(cfg: GPTConfig, opts: Options, key: jax.Array) -> dict:
    params = GPT(cfg).init(key, jnp.zeros((1, min(cfg.context_length, 8)), jnp.int32))["params"]
    return to_layout(params, cfg, opts)


def abstract_params(cfg: GPTConfig, opts: Options = Options()) -> dict:
    """Param shapes/dtypes in the layout `opts` builds, without allocating them."""
    return jax.eval_shape(lambda k: _init_params(cfg, opts, k), jax.random.key(0))


def count_params(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


def num_params(cfg: GPTConfig, exclude_embeddings: bool = False, opts: Options = Options()) -> int:
    """Parameter count from shapes alone (no allocation). `exclude_embeddings` drops wpe (nanoGPT's N for FLOPs).

    Counts the model as `opts` lays it out: with vocab_multiple > 1 the padded rows are included.
    """
    shapes = abstract_params(cfg, opts)
    return count_params(shapes) - (count_params(shapes["wpe"]) if exclude_embeddings else 0)


# --- KV cache -----------------------------------------------------------------------------

def init_cache(cfg: GPTConfig, batch: int, max_len: int, dtype: Any = jnp.float32) -> dict:
    """The "cache" collection for decoding, zeros: per layer keys "k" (B*H, K, S) and values "v"
    (B*H, S, K) for S = max_len slots (the layout `attention.cache_attention` explains).

    Static shapes: one compile serves every step; `dtype`: the compute dtype (Options.dtype).
    """
    if max_len > cfg.context_length:
        raise ValueError(f"a KV cache of {max_len} slots exceeds context_length={cfg.context_length}")
    dtype = jnp.dtype(dtype)
    M, S, K = batch * cfg.n_heads, max_len, cfg.head_dim
    return {f"h_{i}": {"attn": {"k": jnp.zeros((M, K, S), dtype), "v": jnp.zeros((M, S, K), dtype)}}
            for i in range(cfg.n_layers)}
