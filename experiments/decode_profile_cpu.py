"""Where a gptjax decode step spends its time on this machine: a jax.profiler trace of greedy decoding.

gpt2-small shape with its own output head (the book's chapter-5 model, random weights), laid out by
`decoding_model`, batch 1, 8-token prompt, 200 new tokens with the KV cache (the benchmark's decode
setting). Prints tokens/s (median of 3 calls), then the traced call's time per token by XLA op kind,
the matrix-vector products grouped by output shape with their read bandwidth, and the bytes one
token must read. XLA:CPU reports per-op events with --xla_cpu_enable_xprof_traceme.

    python experiments/decode_profile_cpu.py [--new-tokens 200] [--batch 1]
"""
import argparse
import collections
import os
import re
import time

from gptjax.measure import XPROF_OPS_FLAG, by_op_kind, decode_bytes_per_step, trace_xla_ops  # noqa: E402

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + XPROF_OPS_FLAG).strip()

from gptjax.runtime import setup  # noqa: E402

setup(compilation_cache=False)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gptjax import generate as gen  # noqa: E402
from gptjax.config import get_config  # noqa: E402
from gptjax.model import init_params  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()
    N, B = args.new_tokens, args.batch
    cfg = get_config("gpt2-small").replace(context_length=256, drop_rate=0.0, tie_embeddings=False, qkv_bias=True)
    params, opts = gen.decoding_model(init_params(cfg, jax.random.key(0)), cfg)
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, 8))
    gen.generate(params, cfg, prompt, N, opts=opts)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        gen.generate(params, cfg, prompt, N, opts=opts)
        times.append(time.perf_counter() - t0)
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}: batch {B}, {N} new tokens: "
          f"{B * N / np.median(times):.1f} tokens/s ({np.median(times) / N * 1e3:.2f} ms per step)")
    ops, calls = trace_xla_ops(lambda: gen.generate(params, cfg, prompt, N, opts=opts))
    by_kind = by_op_kind(ops)
    print(f"traced call: {sum(ops.values()) / N:.2f} ms of XLA ops per step")
    for kind, ms in by_kind.most_common(8):
        print(f"  {ms / N:7.3f} ms  {kind}")
    # matrix-vector products by output shape: which weights they read, how fast
    hlo = gen._generate_cached.lower(params, jnp.asarray(prompt), jnp.int32(8), jax.random.key(0), cfg=cfg,
                                     opts=opts, max_new_tokens=N, temperature=0.0, top_k=None, top_p=None,
                                     eos_id=None).compile().as_text()
    shapes = dict(re.findall(r"%(dot\.\d+) = (f32\[[\d,]+\])", hlo))
    groups = collections.defaultdict(lambda: [0, 0.0, 0.0])  # ops, ms per step, ms per call summed
    for name, ms in ops.items():
        if name in shapes and calls[name] >= N - 1:  # in the decode loop (not the prefill)
            groups[shapes[name]][0] += 1
            groups[shapes[name]][1] += ms / N
            groups[shapes[name]][2] += ms / calls[name]
    out_to_in = {cfg.vocab_size: cfg.emb_dim, 3 * cfg.emb_dim: cfg.emb_dim, 4 * cfg.emb_dim: cfg.emb_dim}
    print("dots in the decode loop by output shape (GB/s: the weight matrix read per call):")
    for shape, (n, ms, per_call) in sorted(groups.items(), key=lambda kv: -kv[1][1]):
        out = int(shape.split("[")[1].rstrip("]").split(",")[-1])
        rate = ""
        if B == 1 and out in out_to_in:
            rate = f"  {n * out * out_to_in[out] * 4 / (per_call * 1e-3) / 1e9:5.1f} GB/s"
        print(f"  {ms:7.3f} ms  {n:3d} x {shape}{rate}")
    need = decode_bytes_per_step(cfg, B, 8 + N, 4, 4)
    print(f"one step reads {need / 1e6:.0f} MB (matmul weights + the static KV cache)")


if __name__ == "__main__":
    main()
