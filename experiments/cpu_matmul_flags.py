"""XLA:CPU matrix products on this machine under different XLA flags, each in a fresh process.

Per setting: GFLOP/s of a float32 and a bfloat16 (float32 accumulation) 512x768 @ 768x3072 product
(a gpt2-small MLP matmul at 512 tokens); of the bfloat16 weight-gradient product of the same size
(768x512 @ 512x3072, contracting the token axis of both operands) as the backward pass writes it,
with the transpose spelled out in the jitted function, with the transpose disguised as a 3-D
swap of axes (which XLA does not fold back into the product), and with only the output gradient
so transposed, (3072 x 512) @ (512 x 768), the form model.bf16_product uses for (out, in) kernels; and the bytes/s a 1 x 768 @ 768 x 50,304 matrix-vector
product (one decoded token through the LM head) reads from float32, bfloat16 and int8 weights
(int8: converted to float32 inside the jitted function, then scaled). Medians of 15 calls.

    python experiments/cpu_matmul_flags.py
"""
import os
import subprocess
import sys

SETTINGS = ["--xla_cpu_experimental_ynn_fusion_type=dot",  # what gptjax.runtime sets
            "--xla_cpu_experimental_ynn_fusion_type=individual_dot",
            ""]                                             # XLA's defaults

PROBE = r'''
import time, jax, jax.numpy as jnp, numpy as np
def med(f, *a, n=15):
    f(*a).block_until_ready()
    ts = []
    for _ in range(n):
        t = time.perf_counter(); f(*a).block_until_ready(); ts.append(time.perf_counter() - t)
    return float(np.median(ts))
k1, k2 = jax.random.split(jax.random.key(0))
A, B = jax.random.normal(k1, (512, 768)), jax.random.normal(k2, (768, 3072))
mm = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
flops = 2 * 512 * 768 * 3072
f32 = flops / med(mm, A, B) / 1e9
bf16 = flops / med(mm, A.astype(jnp.bfloat16), B.astype(jnp.bfloat16)) / 1e9
G = jax.random.normal(k2, (512, 3072), jnp.bfloat16)
Ab = A.astype(jnp.bfloat16)
wg = lambda a, g: jax.lax.dot_general(a, g, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
wgrad = flops / med(jax.jit(wg), Ab, G) / 1e9
wgrad_t = flops / med(jax.jit(lambda a, g: mm(a.T, g)), Ab, G) / 1e9
swap = lambda a: jnp.swapaxes(a.reshape(*a.shape, 1), 0, 2)[0]  # a.T, as a reshape and a swap of axes
wgrad_s = flops / med(jax.jit(lambda a, g: mm(swap(a), g)), Ab, G) / 1e9
wgrad_1 = flops / med(jax.jit(lambda a, g: mm(swap(g), a)), Ab, G) / 1e9
x, W = jax.random.normal(k1, (1, 768)), jax.random.normal(k2, (768, 50304)) * 0.02
s = jnp.max(jnp.abs(W), axis=0) / 127
Wq = jnp.round(W / s).astype(jnp.int8)
n = 768 * 50304
gv32 = 4 * n / med(mm, x, W) / 1e9
gv16 = 2 * n / med(mm, x.astype(jnp.bfloat16), W.astype(jnp.bfloat16)) / 1e9
gv8 = n / med(jax.jit(lambda x, w, s: (x @ w.astype(jnp.float32)) * s), x, Wq, s) / 1e9
print(f"{f32:9.1f} {bf16:9.1f} {wgrad:9.1f} {wgrad_t:9.1f} {wgrad_s:9.1f} {wgrad_1:9.1f} {gv32:10.1f} {gv16:10.1f} {gv8:10.1f}")
'''


def main() -> None:
    print(f"{'XLA_FLAGS':56s} {'f32 GF/s':>9s} {'bf16 GF/s':>9s} {'wgrad':>9s} {'wgrad a.T':>9s} {'wgrad swp':>9s} {'wgrad gT':>9s} "
          f"{'gemv f32':>10s} {'gemv bf16':>10s} {'gemv int8':>10s}   (wgrad: bf16 GF/s; gemv: GB/s of weights)")
    for flags in SETTINGS:
        env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
        out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True)
        line = out.stdout.strip().splitlines()[-1] if out.returncode == 0 else f"failed: {out.stderr.strip()[-200:]}"
        print(f"{flags or '(XLA defaults)':56s} {line}")


if __name__ == "__main__":
    main()
