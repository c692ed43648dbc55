"""Decoding speed of the two kernel layouts on this machine's default JAX device (CPU by default).

gpt2-small shape (random weights), batch 1, 8-token prompt, 100 greedy tokens with the KV cache:
kernels stored (in, out) as Flax and OpenAI keep them, and (out, in) as `decoding_model` stores them
on CPU. Medians of 5 calls, 2 rounds.

    python experiments/decode_layout_cpu.py
"""
import time

import jax
import numpy as np

from gptjax.runtime import setup

setup(compilation_cache=False)

from gptjax.config import get_config  # noqa: E402
from gptjax.generate import decoding_model, generate  # noqa: E402
from gptjax.model import init_params  # noqa: E402


def median_s(fn, n: int = 5) -> float:
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    cfg = get_config("gpt2-small").replace(context_length=256, drop_rate=0.0)
    params = init_params(cfg, jax.random.key(0))
    prompt = np.array([[1, 2, 3, 4, 5, 6, 7, 8]])
    new = 100
    models = {layout: decoding_model(params, cfg, linear_layout=layout) for layout in ("in_out", "out_in")}
    times: dict[str, list[float]] = {}
    for _ in range(2):
        for layout, (p, o) in models.items():
            times.setdefault(f"kernels {layout}", []).append(median_s(lambda: generate(p, cfg, prompt, new, opts=o)))
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}: greedy tokens/s, batch 1, {new} new tokens")
    for name, t in times.items():
        print(f"  {name:16s} {new / np.median(t):6.1f}")


if __name__ == "__main__":
    main()
