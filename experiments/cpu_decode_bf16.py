"""bfloat16 weights for CPU decoding: which compute dtype, and what gptjax's C++ kernel gives.

gpt2-small laid out by `decoding_model` (on CPU: (out, in) kernels, the C++ matvec kernel), greedy
decoding of 200 tokens after an 8-token prompt, batch 1, timed side by side round after round:
float32 weights; bfloat16 weights with bfloat16 compute (what `--weight-dtype` did before the kernel);
bfloat16 weights with float32 compute (weight-only: the kernel reads the stored bfloat16 weights), and
the same on XLA's dot (which widens every weight each step). Medians; prints a Markdown table.

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python experiments/cpu_decode_bf16.py [--rounds 5]
"""
import argparse
import statistics

from gptjax.runtime import setup

setup(compilation_cache=False)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gptjax import generate as gen  # noqa: E402
from gptjax.bench import BenchConfig  # noqa: E402
from gptjax.measure import alternate  # noqa: E402
from gptjax.model import init_params  # noqa: E402

NEW_TOKENS = 200


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    cfg = BenchConfig(preset="gpt2-small", context_length=256).model_config(drop_rate=0.0)
    params, opts = gen.decoding_model(init_params(cfg, jax.random.key(0)), cfg)
    bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    prompt = np.zeros((1, 8), np.int32)
    runs = {
        f"float32 weights (matvec={opts.matvec})": (params, opts),
        "bfloat16 weights, bfloat16 compute": (bf16, opts.replace(dtype="bfloat16")),
        f"bfloat16 weights, float32 compute (matvec={opts.matvec})": (bf16, opts),
        "bfloat16 weights, float32 compute (matvec=xla)": (bf16, opts.replace(matvec="xla")),
    }
    times = alternate({k: lambda p=p, o=o: gen.generate(p, cfg, prompt, NEW_TOKENS, opts=o)
                       for k, (p, o) in runs.items()},
                      rounds=args.rounds)
    base = statistics.median(next(iter(times.values())))
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; gpt2-small with its own head, batch 1, "
          f"{NEW_TOKENS} new tokens; {args.rounds} rounds, medians")
    print("| weights, compute | tokens/s | vs float32 weights |")
    print("|---|---:|---:|")
    for name, ts in times.items():
        s = statistics.median(ts)
        print(f"| {name} | {NEW_TOKENS / s:.1f} | {base / s:.2f} |")


if __name__ == "__main__":
    main()
