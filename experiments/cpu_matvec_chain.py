"""How fast XLA:CPU's float32 matrix-vector products stream gpt2-small's weights, with nothing else.

One jitted chain of exactly the products one batch-1 decode step makes: 12 blocks of 2304x768,
768x768, 3072x768 and 768x3072 kernels stored (out, in), as `decoding_model` stores them on CPU,
then the 50,257x768 head (124M weights, 494 MB). Each product feeds the next; there is no attention,
layer norm or sampling. Its time per call bounds any decoder built on XLA's dot at batch 1. Timed
side by side, round after round: the chain, the same chain on gptjax's C++ kernel
(gptjax.cpu.matvec, when it builds) from float32, bfloat16 and int8 weights, the same chain in eager
PyTorch (when torch is installed), and gptjax's KV-cache decode of 200 tokens (the benchmark's
decode row) with the kernel and with XLA's dot, all against the benchmark's bandwidth roofline (half
the best in-place copy of 1 GiB, measured before and after). Medians.

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python experiments/cpu_matvec_chain.py [--rounds 7]
"""
import argparse
import statistics

from gptjax.runtime import setup

setup(compilation_cache=False)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gptjax.cpu import matvec as cpu_matvec  # noqa: E402
from gptjax import generate as gen  # noqa: E402
from gptjax.measure import alternate, memory_bandwidth, roofline_bandwidth  # noqa: E402
from gptjax.config import get_config  # noqa: E402
from gptjax.model import init_params  # noqa: E402

SHAPES = [(2304, 768), (768, 768), (3072, 768), (768, 3072)]  # (out, in) per block, in call order
CALLS = 5  # chain calls per round (one decode call is 200 steps)
NEW_TOKENS = 200


def torch_chain(blocks, head):
    """The chain in eager PyTorch (its oneDNN/MKL matrix-vector products), or None without torch."""
    try:
        import torch
    except ImportError:
        return None
    F = torch.nn.functional
    tb = [[torch.from_numpy(np.array(w)) for w in ws] for ws in blocks]
    th = torch.from_numpy(np.array(head))

    def run():
        with torch.no_grad():
            x = torch.ones(1, 768)
            for w_qkv, w_o, w_fc, w_proj in tb:
                a = F.linear(F.linear(x, w_qkv)[:, :768], w_o)
                x = x + F.linear(F.linear(x + a, w_fc), w_proj) * 1e-3
            return F.linear(x, th)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    key = jax.random.key(0)
    blocks = [[jax.random.normal(jax.random.fold_in(key, 4 * i + j), s) * 0.02 for j, s in enumerate(SHAPES)]
              for i in range(12)]
    head = jax.random.normal(jax.random.fold_in(key, 99), (50257, 768)) * 0.02
    nbytes = 4 * (sum(w.size for ws in blocks for w in ws) + head.size)

    def mv(v, w):  # (1, in) x (out, in) -> (1, out)
        return jax.lax.dot_general(v, w, (((1,), (1,)), ((), ())))

    def make_chain(mv):
        @jax.jit
        def chain(x_1D, blocks, head):
            for w_qkv, w_o, w_fc, w_proj in blocks:
                a = mv(mv(x_1D, w_qkv)[:, :768], w_o)
                x_1D = x_1D + mv(mv(x_1D + a, w_fc), w_proj) * 1e-3
            return mv(x_1D, head)
        return chain

    chain = make_chain(mv)
    kernel_chain = make_chain(cpu_matvec.matvec) if cpu_matvec.available() else None

    cfg = get_config("gpt2-small").replace(context_length=256, drop_rate=0.0, tie_embeddings=False, qkv_bias=True)
    params, opts = gen.decoding_model(init_params(cfg, jax.random.key(1)), cfg)
    prompt = jnp.zeros((1, 8), jnp.int32)
    x = jnp.ones((1, 768))

    def xla_chain():
        for _ in range(CALLS):
            chain(x, blocks, head).block_until_ready()

    fns = {"XLA matrix-vector chain": xla_chain}
    if kernel_chain is not None:
        fns["gptjax kernel matrix-vector chain"] = lambda: [kernel_chain(x, blocks, head).block_until_ready()
                                                           for _ in range(CALLS)]
        # the same products from bfloat16 weights (half the bytes; this row's byte columns count 2 per weight)
        bf_blocks, bf_head = jax.tree.map(lambda a: a.astype(jnp.bfloat16), (blocks, head))
        fns["gptjax kernel chain, bfloat16 weights"] = lambda: [
            kernel_chain(x, bf_blocks, bf_head).block_until_ready() for _ in range(CALLS)]
        # and from int8 weights with a float32 scale per row (a quarter of the bytes; scales 0.1 % more)
        int8_chain = make_chain(lambda v, w: cpu_matvec.matvec(v, *w))
        q_blocks = [[cpu_matvec.quantize_int8(w) for w in ws] for ws in blocks]
        q_head = cpu_matvec.quantize_int8(head)
        fns["gptjax kernel chain, int8 weights"] = lambda: [
            int8_chain(x, q_blocks, q_head).block_until_ready() for _ in range(CALLS)]
    run_torch = torch_chain(blocks, head)
    if run_torch is not None:
        fns["PyTorch matrix-vector chain"] = lambda: [run_torch() for _ in range(CALLS)]
    # prefill included
    fns[f"gptjax decode (KV cache), matvec={opts.matvec}"] = lambda: gen.generate(params, cfg, prompt, NEW_TOKENS,
                                                                                  opts=opts)
    if opts.matvec != "xla":
        xla = opts.replace(matvec="xla")
        fns["gptjax decode (KV cache), matvec=xla"] = lambda: gen.generate(params, cfg, prompt, NEW_TOKENS, opts=xla)

    bws = [memory_bandwidth()]
    times = alternate(fns, rounds=args.rounds)
    bws.append(memory_bandwidth())  # again after: other load on a shared machine only ever lowers it
    roof = roofline_bandwidth(*bws)
    per_step = {k: statistics.median(v) / (NEW_TOKENS if "decode" in k else CALLS) for k, v in times.items()}
    chain_s = per_step["XLA matrix-vector chain"]
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; roofline {roof:.1f} GB/s (half the best 1 GiB "
          f"in-place copy, measured before and after); {args.rounds} rounds, medians")
    print(f"| per decode step ({nbytes / 1e6:.0f} MB of weights) | ms | steps/s | weights GB/s | of the roofline "
          f"| of the XLA chain's speed |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, s in per_step.items():
        b = nbytes / 2 if "bfloat16" in name else nbytes / 4 if "int8" in name else nbytes
        print(f"| {name} | {1e3 * s:.2f} | {1 / s:.1f} | {b / s / 1e9:.1f} | {b / s / 1e9 / roof:.2f} "
              f"| {chain_s / s:.2f} |")


if __name__ == "__main__":
    main()
