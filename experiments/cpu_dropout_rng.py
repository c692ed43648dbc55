"""Dropout-mask cost of XLA's random bit generators on this machine: one attention-sized mask
(batch 2, 12 heads, 256 x 256, the chapter-5 setting), ThreeFry vs Philox (XLA:CPU's default) vs the
backend default, and a plain multiply of the same array for scale. Medians of 20 calls.

    python experiments/cpu_dropout_rng.py
"""
import time

from gptjax.runtime import setup

setup(compilation_cache=False)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

ALGORITHMS = {"ThreeFry (gptjax's dropout)": jax.lax.RandomAlgorithm.RNG_THREE_FRY,
              "Philox": jax.lax.RandomAlgorithm.RNG_PHILOX, "backend default": jax.lax.RandomAlgorithm.RNG_DEFAULT}


def median_ms(fn, *args, n: int = 20) -> float:
    fn(*args).block_until_ready()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def main() -> None:
    x = jnp.ones((2, 12, 256, 256), jnp.float32)
    seed = jnp.array([1, 2, 3, 4], jnp.uint32)
    threshold = jnp.uint32(round(0.1 * 2**32))
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}: dropout mask of {x.shape}, ms per call")
    for name, alg in ALGORITHMS.items():
        def masked(x, seed, alg=alg):
            _, bits = jax.lax.rng_bit_generator(seed, x.shape, dtype=jnp.uint32, algorithm=alg)
            return jnp.where(bits >= threshold, x / 0.9, 0.0)
        print(f"  {name:28s} {median_ms(jax.jit(masked), x, seed):6.2f}")
    print(f"  {'multiply (no random bits)':28s} {median_ms(jax.jit(lambda x: x * 1.1), x):6.2f}")


if __name__ == "__main__":
    main()
