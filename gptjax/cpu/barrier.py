"""The gradient barrier XLA:CPU's train step needs between blocks (Options.grad_barrier)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def grad_barrier(x: jax.Array) -> jax.Array:
    """Identity whose gradient XLA must materialise: no backward-pass fusion reaches across it.

    Why: XLA:CPU otherwise fuses the residual stream's gradient through every later block's layer-norm
    and dropout backward into each earlier block's weight-gradient operand, recomputing the whole chain
    once per block (quadratic in depth; experiments/cpu_step_profile.py). Optimization barriers do not
    stop it (XLA:CPU removes them before fusing), so the gradient goes through a while loop whose trip
    count XLA cannot know (0 unless the first element is NaN) and whose body it cannot prove is the identity.
    """
    return x


def _materialise(g: jax.Array) -> jax.Array:
    n = jnp.isnan(g.reshape(-1)[0]).astype(jnp.int32)
    body = lambda c: (c[0] + 1, jnp.where(c[0] >= 0, c[1], -c[1]))  # noqa: E731  (c[0] >= 0 always)
    return jax.lax.while_loop(lambda c: c[0] < n, body, (jnp.int32(0), g))[1]


grad_barrier.defvjp(lambda x: (x, None), lambda _, g: (_materialise(g),))

