"""GPT-2 in Flax Linen, parameters named as OpenAI's checkpoint.

Letters: B batch, T time, S cache slots, L layers, D emb_dim, H heads, K head dim, V vocab.

Speed options live in GPTConfig and leave the math alone: `scan_layers` (params stacked under
"h"; `stack_layers`/`unstack_layers` convert), `remat`, `vocab_multiple` (padded rows, logits
sliced back to vocab_size here), `attn_impl`; `dtype` and `matmul_precision` (`bf16_product`) set
the precision. Decoding with a KV cache passes the
"cache" collection (`init_cache`) and the rows' position `pos_B` (one per row, or one for all).
For decoding, `quantize_weights` makes the matmul weights int8 with a scale per out row.
"""
from __future__ import annotations

import functools
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptjax import cpu_matvec
from gptjax.attention import cache_attention, causal_attention, dropout
from gptjax.config import GPTConfig

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block
    "dots": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs, recompute the cheap elementwise ops
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # ... but not attention's
}


def _dtype(cfg: GPTConfig):
    return jnp.dtype(cfg.dtype)


def _torch_uniform(fan_in: int):
    """PyTorch's nn.Linear default for weight and bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _dense(cfg: GPTConfig, features: int, name: str, use_bias: bool = True, std: float = 0.02,
           fan_in: int | None = None, dtype: Any = None, f32_out: bool = False) -> nn.Module:
    if cfg.init == "book":  # the book's GPTModel keeps PyTorch's defaults
        inits = dict(kernel_init=_torch_uniform(fan_in or cfg.emb_dim), bias_init=_torch_uniform(fan_in or cfg.emb_dim))
    else:
        inits = dict(kernel_init=nn.initializers.normal(stddev=std))
    dtype = dtype or _dtype(cfg)
    if cfg.linear_layout == "out_in":
        return LinearOutIn(features, use_bias=use_bias, dtype=dtype, f32_out=f32_out, name=name,
                           matvec=cfg.matvec, matmul_precision=cfg.matmul_precision, **inits)
    # f32_out: multiply in the compute dtype (bfloat16 tensor cores on a GPU), accumulate and return float32
    dot_general = functools.partial(jax.lax.dot_general, preferred_element_type=jnp.float32) if f32_out else None
    if cfg.matmul_precision == "bfloat16":
        dot_general = _bf16_dot_general_in_out
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name,
                    dot_general=dot_general, **inits)


def _transposed(a_NC: jax.Array) -> jax.Array:
    """a.T, written so that XLA makes the copy instead of folding the transpose into the next dot.

    Why: XLA:CPU (with YNNPACK) runs a bfloat16 product that contracts the leading axis of both
    operands (a weight gradient, x.T @ g) at 230-250 GFLOP/s, on the same path as float32; with one
    operand transposed first it takes the AMX path: 1,070-1,390 GFLOP/s with the copy for a
    (512, 768) x (512, 3072) weight gradient (experiments/cpu_matmul_flags.py, individual_dot).
    """
    return jnp.swapaxes(a_NC.reshape(*a_NC.shape, 1), 0, 2)[0]


def _bf16_dot(a: jax.Array, b: jax.Array, a_axis: int, b_axis: int) -> jax.Array:
    bf16 = jnp.bfloat16
    return jax.lax.dot_general(a.astype(bf16), b.astype(bf16), (((a_axis,), (b_axis,)), ((), ())),
                               preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def bf16_product(x_NI: jax.Array, w: jax.Array, w_in_axis: int) -> jax.Array:
    """x (..., in) @ w with both rounded to bfloat16, accumulated and returned in float32
    (GPTConfig.matmul_precision="bfloat16"). w is (in, out) for w_in_axis=0, (out, in) for 1.

    The backward pass rounds the output gradient to bfloat16 too and returns float32 gradients.
    """
    return _bf16_dot(x_NI, w, x_NI.ndim - 1, w_in_axis)


def _bf16_product_fwd(x_NI, w, w_in_axis):
    xb, wb = x_NI.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    # the bfloat16 copies are the residuals: half the bytes of float32 activations
    dtypes = jnp.zeros((0,), x_NI.dtype), jnp.zeros((0,), w.dtype)  # the gradients' dtypes, as arrays
    return _bf16_dot(xb, wb, x_NI.ndim - 1, w_in_axis), (xb, wb, dtypes)


def _bf16_product_bwd(w_in_axis, res, g_NO):
    xb, wb, (x_like, w_like) = res
    gb = g_NO.astype(jnp.bfloat16)
    dx_NI = _bf16_dot(gb, wb, gb.ndim - 1, 1 - w_in_axis).astype(x_like.dtype)
    g_MO, x_MI = gb.reshape(-1, gb.shape[-1]), xb.reshape(-1, xb.shape[-1])  # M: every token
    # one operand transposed, so the product is a plain (rows, M) @ (M, cols) whose result is already
    # in the kernel's layout (no transpose of the weight-sized gradient)
    if w_in_axis == 1:
        dw = _bf16_dot(_transposed(g_MO), x_MI, 1, 0)  # (O, M) @ (M, I)
    else:
        dw = _bf16_dot(_transposed(x_MI), g_MO, 1, 0)  # (I, M) @ (M, O)
    return dx_NI, dw.astype(w_like.dtype)


bf16_product.defvjp(_bf16_product_fwd, _bf16_product_bwd)


def _bf16_dot_general_in_out(x, w_IO, dimension_numbers, precision=None, preferred_element_type=None):
    # nn.Dense's dot_general hook: it always contracts x's last axis with the kernel's first
    assert dimension_numbers == (((x.ndim - 1,), (0,)), ((), ())), dimension_numbers
    return bf16_product(x, w_IO, 0)


def product_out_in(x_BTI: jax.Array, w_OI: jax.Array, dtype: Any, f32_out: bool, matvec: str,
                   scale_O: jax.Array | None = None, matmul_precision: str = "float32") -> jax.Array:
    """x (..., in) times an (out, in) kernel in the compute `dtype` (float32 result with `f32_out`).

    matvec="kernel": few-row products (decoding) go to gptjax.cpu_matvec with the weights as stored
    (bfloat16 ones are widened inside the kernel, exactly as astype would), accumulated in float32.
    int8 weights (`quantize_weights`) come with `scale_O`, one scale per out row: y = (x @ w.T) * scale.
    matmul_precision="bfloat16": `bf16_product` (float32 weights only).
    """
    x_BTI = x_BTI.astype(dtype)
    if matvec == "kernel" and cpu_matvec.applies(x_BTI, w_OI):
        y_BTO = cpu_matvec.matvec(x_BTI, w_OI, scale_O)
        return y_BTO if f32_out else y_BTO.astype(dtype)
    if matmul_precision == "bfloat16" and scale_O is None:
        y_BTO = bf16_product(x_BTI, w_OI, 1)
        return y_BTO if f32_out else y_BTO.astype(dtype)
    y_BTO = jnp.einsum("...i,oi->...o", x_BTI, w_OI.astype(dtype), preferred_element_type=jnp.float32 if f32_out else None)
    return y_BTO if scale_O is None else y_BTO * scale_O.astype(y_BTO.dtype)


class LinearOutIn(nn.Module):
    """nn.Dense with its kernel stored (out, in), PyTorch's Linear layout (same init, same math).

    Why: XLA:CPU's matrix-vector product (decoding one token) reads an (out, in) kernel's rows
    contiguously: 38.0 vs 35.1 tokens/s decoding gpt2-small on two cores (experiments/decode_layout_cpu.py).
    """
    features: int
    use_bias: bool = True
    dtype: Any = jnp.float32
    f32_out: bool = False
    matvec: str = "xla"  # "kernel": few-row products through gptjax.cpu_matvec (GPTConfig.matvec)
    matmul_precision: str = "float32"  # GPTConfig.matmul_precision
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self, x_BTI: jax.Array) -> jax.Array:
        init = self.kernel_init
        w_OI = self.param("kernel", lambda key, shape: init(key, shape[::-1], jnp.float32).T,
                          (self.features, x_BTI.shape[-1]))
        scale_O = self.get_variable("params", "kernel_scale") if self.has_variable("params", "kernel_scale") else None
        y_BTO = product_out_in(x_BTI, w_OI, self.dtype, self.f32_out, self.matvec, scale_O, self.matmul_precision)
        if self.use_bias:
            y_BTO = y_BTO + self.param("bias", self.bias_init, (self.features,), jnp.float32).astype(y_BTO.dtype)
        return y_BTO


class Embed(nn.Module):
    """nn.Embed's float32 table and lookup (same param, same init), which may also be weight-only int8:
    an int8 "embedding" with a float32 "embedding_scale" per row (`quantize_weights`), for the tied head."""
    num_embeddings: int
    features: int
    embedding_init: Any = nn.initializers.normal(1.0)

    def setup(self):
        self.embedding = self.param("embedding", self.embedding_init, (self.num_embeddings, self.features), jnp.float32)
        self.scale = self.get_variable("params", "embedding_scale") if self.has_variable("params", "embedding_scale") else None

    def __call__(self, idx: jax.Array) -> jax.Array:
        x = jnp.take(self.embedding, idx, axis=0).astype(jnp.float32)
        return x if self.scale is None else x * jnp.take(self.scale, idx, axis=0)[..., None]


def _embed_init(cfg: GPTConfig, std: float):
    return nn.initializers.normal(1.0) if cfg.init == "book" else nn.initializers.normal(std)


def _dropout(module: nn.Module, x: jax.Array, rate: float, deterministic: bool) -> jax.Array:
    # attention.dropout, not nn.Dropout: its mask is drawn once instead of re-derived in the backward pass
    if deterministic or rate == 0.0:
        return x
    return dropout(x, rate, module.make_rng("dropout"))


def dropout_rngs(key: jax.Array | None) -> dict | None:
    """The `rngs` for `GPT.apply` in training: {"dropout": key}, or None (deterministic) for no key.

    The key is re-seeded as an "unsafe_rbg" key, so Flax's per-layer fold-ins and each dropout's
    bits come from XLA's RngBitGenerator. From threefry keys, every fold-in is a rolled while loop on
    XLA:CPU: 112 of them took 0.2 s of a 3.1 s gpt2-small train step (experiments/cpu_step_profile.py).
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

    @nn.compact
    def __call__(self, x_BTD: jax.Array, deterministic: bool = True, pos_B: jax.Array | None = None) -> jax.Array:
        cfg = self.cfg
        B, T, D = x_BTD.shape
        H, K = cfg.n_heads, cfg.head_dim
        qkv_BT3D = _dense(cfg, 3 * D, "c_attn", use_bias=cfg.qkv_bias)(x_BTD)
        q_BTHK, k_BTHK, v_BTHK = (a.reshape(B, T, H, K) for a in jnp.split(qkv_BT3D, 3, axis=-1))
        if pos_B is not None:
            # KV cache (layout and positions: see cache_attention)
            y_BTHK, k_NKS, v_NSK = cache_attention(q_BTHK, k_BTHK, v_BTHK, self.get_variable("cache", "k"),
                                                   self.get_variable("cache", "v"), pos_B)
            self.put_variable("cache", "k", k_NKS)
            self.put_variable("cache", "v", v_NSK)
        else:
            dropping = cfg.drop_rate > 0.0 and not deterministic
            y_BTHK = causal_attention(
                q_BTHK, k_BTHK, v_BTHK, impl=cfg.attn_impl,
                dropout_rate=cfg.drop_rate if dropping else 0.0,
                dropout_rng=self.make_rng("dropout") if dropping else None,
            )
        # GPT-2's scaled init of residual projections (std / sqrt(2 * n_layers))
        y_BTD = _dense(cfg, D, "c_proj", std=0.02 / math.sqrt(2 * cfg.n_layers))(y_BTHK.reshape(B, T, D))
        return _dropout(self, y_BTD, cfg.drop_rate, deterministic)


class MLP(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg = self.cfg
        h_BTF = _dense(cfg, 4 * cfg.emb_dim, "c_fc")(x_BTD)
        h_BTF = nn.gelu(h_BTF, approximate=True)
        y_BTD = _dense(cfg, cfg.emb_dim, "c_proj", std=0.02 / math.sqrt(2 * cfg.n_layers), fan_in=4 * cfg.emb_dim)(h_BTF)
        return _dropout(self, y_BTD, cfg.drop_rate, deterministic)


@jax.custom_vjp
def grad_barrier(x: jax.Array) -> jax.Array:
    """Identity whose gradient XLA must materialise: no backward-pass fusion reaches across it.

    Why: XLA:CPU otherwise fuses the residual stream's gradient through every later block's
    layer-norm and dropout backward into each earlier block's weight-gradient operand, recomputing
    the whole chain once per block (quadratic in depth, with transposed reads): 1.15 s of a 4.3 s
    gpt2-small step on two cores (experiments/cpu_step_profile.py). Optimization barriers do not stop it (XLA:CPU removes them before
    fusing), so the gradient goes through a while loop whose trip count XLA cannot know (0 unless
    the first element is NaN) and whose body it cannot prove is the identity (it is).
    """
    return x


def _materialise(g: jax.Array) -> jax.Array:
    n = jnp.isnan(g.reshape(-1)[0]).astype(jnp.int32)
    body = lambda c: (c[0] + 1, jnp.where(c[0] >= 0, c[1], -c[1]))  # noqa: E731  (c[0] >= 0 always)
    return jax.lax.while_loop(lambda c: c[0] < n, body, (jnp.int32(0), g))[1]


grad_barrier.defvjp(lambda x: (x, None), lambda _, g: (_materialise(g),))


def _barrier_gradients() -> bool:
    # CPU only: on a GPU the loop's predicate would be a device-to-host sync per block
    return jax.default_backend() == "cpu"


class Block(nn.Module):
    """Pre-LN block. `(x, pos_B) -> (x, None)`: the carry/output shape nn.scan wants; `deterministic`
    is a field so remat and scan need no static arguments."""
    cfg: GPTConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BTD: jax.Array, pos_B: jax.Array | None = None) -> tuple[jax.Array, None]:
        dt, det = _dtype(self.cfg), self.deterministic
        if _barrier_gradients():
            x_BTD = grad_barrier(x_BTD)
        x_BTD = x_BTD + CausalSelfAttention(self.cfg, name="attn")(_layer_norm("ln_1")(x_BTD).astype(dt), det, pos_B)
        x_BTD = x_BTD + MLP(self.cfg, name="mlp")(_layer_norm("ln_2")(x_BTD).astype(dt), det)
        return x_BTD, None


def _block_class(cfg: GPTConfig) -> type[nn.Module]:
    if cfg.remat == "none":
        return Block
    # inside scan the loop already keeps XLA from merging the recomputation back (prevent_cse costs speed)
    return nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)


class GPT(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, idx_BT: jax.Array, deterministic: bool = True, *, pos_B: jax.Array | None = None,
                 last_B: jax.Array | None = None) -> jax.Array:
        """Token ids (B, T) -> float32 logits (B, T, V), or (B, T, n_classes) for a classifier.

        pos_B: decode with a KV cache (apply with the "cache" collection from `init_cache`, mutable):
        row b's tokens sit at positions pos_B[b].. ; a scalar when all rows share one position
        (faster: the cache is then written in place). last_B: only the logits at index last_B[b] of
        each row are computed, shape (B, 1, V) (prefill needs one position, not T).
        """
        cfg = self.cfg
        B, T = idx_BT.shape
        if T > cfg.context_length:
            raise ValueError(f"input has {T} tokens but context_length is {cfg.context_length}; crop the input "
                             f"to its last {cfg.context_length} tokens")
        V = cfg.padded_vocab_size
        wte = Embed(V, cfg.emb_dim, embedding_init=_embed_init(cfg, 0.02), name="wte")
        wpe = nn.Embed(cfg.context_length, cfg.emb_dim, embedding_init=_embed_init(cfg, 0.01),
                       dtype=jnp.float32, param_dtype=jnp.float32, name="wpe")
        pos_BT = jnp.arange(T)[None, :] if pos_B is None else jnp.reshape(pos_B, (-1, 1)) + jnp.arange(T)[None, :]
        x_BTD = wte(idx_BT) + wpe(pos_BT)
        x_BTD = _dropout(self, x_BTD, cfg.drop_rate, deterministic)
        # the residual stream stays float32; blocks compute in cfg.dtype
        block = _block_class(cfg)
        if cfg.scan_layers:
            if pos_B is not None:
                raise ValueError("KV-cache decoding runs on per-layer params: convert with unstack_layers and "
                                 "cfg.replace(scan_layers=False) (gptjax.generate does this for you)")
            # check_constancy_invariants=False: no broadcast variables or outputs to check, so no extra trace
            # of the block. Flax 0.12.12 (not 0.12.8) runs that check through DCE, which keeps effectful ops (a
            # jax.debug.print / callback in a block) and then refuses them as "broadcasted variable has a
            # data dependency on the scan body".
            blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                             in_axes=nn.broadcast, length=cfg.n_layers, unroll=cfg.scan_unroll,
                             check_constancy_invariants=False)
            x_BTD, _ = blocks(cfg, deterministic, name="h")(x_BTD, None)
        else:
            for i in range(cfg.n_layers):
                x_BTD, _ = block(cfg, deterministic, name=f"h_{i}")(x_BTD, pos_B)
        if last_B is not None:
            x_BTD = x_BTD[jnp.arange(B), last_B][:, None]  # (B, 1, D)
        x_BTD = _layer_norm("ln_f")(x_BTD)
        if cfg.n_classes:
            if cfg.init == "book":
                return _dense(cfg.replace(linear_layout="in_out"), cfg.n_classes, "cls_head", dtype=jnp.float32)(x_BTD)
            return nn.Dense(cfg.n_classes, dtype=jnp.float32, param_dtype=jnp.float32, name="cls_head")(x_BTD)
        dt = _dtype(cfg)
        if cfg.tie_embeddings:
            logits_BTV = product_out_in(x_BTD, wte.embedding, dt, f32_out=True, matvec=cfg.matvec, scale_O=wte.scale,
                                        matmul_precision=cfg.matmul_precision)
        else:
            # the head multiplies in the compute dtype (a quarter of the FLOPs) but returns float32 logits
            logits_BTV = _dense(cfg, V, "lm_head", use_bias=False, f32_out=True)(x_BTD)
        # padded vocab rows exist only to give the head matmul a round shape: drop their logits
        return logits_BTV[..., :cfg.vocab_size].astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def init_params(cfg: GPTConfig, key: jax.Array) -> dict:
    """Random params for `cfg`, made once, on device."""
    return GPT(cfg).init(key, jnp.zeros((1, min(cfg.context_length, 8)), jnp.int32))["params"]


def abstract_params(cfg: GPTConfig) -> dict:
    """Param shapes/dtypes without allocating them."""
    model = GPT(cfg)
    dummy = jax.ShapeDtypeStruct((1, min(cfg.context_length, 8)), jnp.int32)
    return jax.eval_shape(lambda k, x: model.init(k, x)["params"], jax.random.key(0), dummy)


def count_params(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


def num_params(cfg: GPTConfig, exclude_embeddings: bool = False) -> int:
    """Parameter count from shapes alone (no allocation). `exclude_embeddings` drops wpe (nanoGPT's N for FLOPs).

    Counts the model as configured: with vocab_multiple > 1 the padded rows are included.
    """
    shapes = abstract_params(cfg)
    n = count_params(shapes)
    if exclude_embeddings:
        n -= count_params(shapes["wpe"])
    return n


# --- KV cache -----------------------------------------------------------------------------

def init_cache(cfg: GPTConfig, batch: int, max_len: int, dtype: Any = None) -> dict:
    """The "cache" collection for decoding, zeros: per layer keys "k" (B*H, K, S) and values "v"
    (B*H, S, K) for S = max_len slots (the layout `attention.cache_attention` explains).

    Static shapes: one compile serves every step; `dtype` defaults to the compute dtype.
    """
    if max_len > cfg.context_length:
        raise ValueError(f"a KV cache of {max_len} slots exceeds context_length={cfg.context_length}")
    dtype = jnp.dtype(dtype or cfg.dtype)
    N, S, K = batch * cfg.n_heads, max_len, cfg.head_dim
    return {f"h_{i}": {"attn": {"k": jnp.zeros((N, K, S), dtype), "v": jnp.zeros((N, S, K), dtype)}}
            for i in range(cfg.n_layers)}


# --- param layouts: per-layer (OpenAI's names) <-> stacked for scan; vocab padding ----------

_LAYER = re.compile(r"h_(\d+)")


def is_stacked(params: dict) -> bool:
    return "h" in params


def stack_layers(params: dict) -> dict:
    """{"h_0": tree, "h_1": tree, ...} -> {"h": tree with a leading (L,) axis}: the layout of scan_layers."""
    if is_stacked(params):
        return params
    idx = sorted(int(m.group(1)) for k in params if (m := _LAYER.fullmatch(k)))
    if idx != list(range(len(idx))) or not idx:
        raise ValueError(f"expected per-layer params h_0..h_{{L-1}}, got keys {sorted(params)}")
    rest = {k: v for k, v in params.items() if not _LAYER.fullmatch(k)}
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(params[f"h_{i}"] for i in idx))
    return {**rest, "h": stacked}


def unstack_layers(params: dict) -> dict:
    """Inverse of `stack_layers`: OpenAI's per-layer names again (for weights export, KV-cache decoding)."""
    if not is_stacked(params):
        return params
    rest = {k: v for k, v in params.items() if k != "h"}
    L = jax.tree_util.tree_leaves(params["h"])[0].shape[0]
    return {**rest, **{f"h_{i}": jax.tree.map(lambda a, i=i: a[i], params["h"]) for i in range(L)}}


def pad_vocab(params: dict, cfg: GPTConfig) -> dict:
    """Resize wte rows / lm_head columns to cfg.padded_vocab_size (zero rows added, or padding dropped)."""
    V, Vp = cfg.vocab_size, cfg.padded_vocab_size

    def fit(a: jax.Array, axis: int) -> jax.Array:
        n = a.shape[axis]
        if n == Vp:
            return a
        if n < Vp:
            if n < V:
                raise ValueError(f"params hold {n} vocab rows but cfg.vocab_size is {V}")
            widths = [(0, 0)] * a.ndim
            widths[axis] = (0, Vp - n)
            return jnp.pad(a, widths)
        return jax.lax.slice_in_dim(a, 0, Vp, axis=axis)

    out = dict(params)
    if "wte" in out:
        out["wte"] = {**out["wte"], "embedding": fit(out["wte"]["embedding"], 0)}
    if "lm_head" in out:
        out["lm_head"] = {**out["lm_head"], "kernel": fit(out["lm_head"]["kernel"], 1)}
    return out


def fastest_linear_layout() -> str:
    """The kernel layout that runs faster on JAX's backend: "out_in" on CPU, where it made gpt2-small
    decoding 8% and its train step 12-15% faster on two cores (experiments/decode_layout_cpu.py,
    experiments/cpu_train_apart.py); "in_out" elsewhere."""
    return "out_in" if jax.default_backend() == "cpu" else "in_out"


def set_linear_layout(params: dict, src: str, dst: str) -> dict:
    """Block and LM-head kernels from layout `src` to `dst` ("in_out" <-> "out_in"): a transpose.

    Explicit, since a square kernel (attn/c_proj) cannot tell its layout by its shape.
    """
    if src == dst:
        return params

    def swap(path, v):
        names = [getattr(k, "key", None) for k in path]
        if names[-1] == "kernel" and names[0] != "cls_head":
            return jnp.swapaxes(v, -1, -2)  # the last two axes: stacked (L, in, out) kernels too
        return v

    return jax.tree_util.tree_map_with_path(swap, params)


def quantize_weights(params: dict, cfg: GPTConfig) -> dict:
    """Weight-only int8 for decoding: every matmul weight (block kernels, the LM head or the tied
    embedding) becomes int8 with a float32 scale per out row (`cpu_matvec.quantize_int8`), stored
    beside it as "kernel_scale" / "embedding_scale"; biases, layer norms and wpe stay as they are.

    Needs (out, in) kernels (cfg.linear_layout == "out_in": the scales are per out row). A quarter of
    float32's bytes per decoded token; the model computes in cfg.dtype (float32 on CPU) and the
    C++ kernel (cfg.matvec == "kernel") reads the int8 rows itself. Not for training.
    """
    if cfg.linear_layout != "out_in":
        raise ValueError(f"int8 weights need (out, in) kernels, the config has linear_layout={cfg.linear_layout!r}: "
                         f"convert first with set_linear_layout(params, {cfg.linear_layout!r}, 'out_in') and "
                         f"cfg.replace(linear_layout='out_in') (generate.decoding_weights does this)")

    def walk(tree: dict, path: tuple) -> dict:
        out = {}
        for k, v in tree.items():
            if isinstance(v, dict):
                out[k] = walk(v, (*path, k))
            elif v.dtype == jnp.int8 or (f"{k}_scale" in tree):
                out[k] = v  # already quantized
            elif (k == "kernel" and path[:1] != ("cls_head",)) or (k == "embedding" and path == ("wte",) and
                                                                    cfg.tie_embeddings and not cfg.n_classes):
                out[k], out[f"{k}_scale"] = cpu_matvec.quantize_int8(v)
            else:
                out[k] = v
        return out

    return walk(params, ())


def convert_params(params: dict, cfg: GPTConfig) -> dict:
    """Any layout (per-layer or stacked, padded vocab or not) -> the layout `cfg` builds.

    Use it on loaded GPT-2 weights or a checkpoint trained with other speed options. Kernels keep
    their linear_layout (see `set_linear_layout`).
    """
    params = stack_layers(params) if cfg.scan_layers else unstack_layers(params)
    return pad_vocab(params, cfg)
