"""XLA:CPU flags gptjax sets before JAX starts its backend (`gptjax.runtime.setup` calls `set_cpu_flags`)."""
from __future__ import annotations

import os
import warnings

# XLA:CPU (jaxlib 0.10-0.12) hands dots and reductions to YNNPACK by default, and its reduce is slow (the
# grad-norm sum of squares over the LM head's gradient). "individual_dot" keeps YNNPACK for matmuls only,
# which makes train steps much faster and is the only setting that runs bfloat16 products on AMX
# (experiments/cpu_train_flags.py, cpu_matmul_flags.py, cpu_bf16_train.py).
CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=individual_dot",)


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge
        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # private API moved: assume the worst
        return True


def _jaxlib_knows_cpu_flags() -> bool:
    # an unknown flag in XLA_FLAGS aborts the process: only set what the pinned jaxlib range has
    import jaxlib.version
    major, minor = (int(x) for x in jaxlib.version.__version__.split(".")[:2])
    return (0, 10) <= (major, minor) < (0, 13)


def set_cpu_flags(flags: tuple[str, ...] = CPU_XLA_FLAGS) -> list[str]:
    """Append XLA:CPU flags to XLA_FLAGS unless the user set the same flag; returns the flags added.

    Has no effect once a JAX backend has started (warns then).
    """
    if os.environ.get("GPTJAX_NO_XLA_FLAGS") or not _jaxlib_knows_cpu_flags():
        return []
    current = os.environ.get("XLA_FLAGS", "")
    added = [f for f in flags if f.split("=")[0] not in current]
    if not added:
        return []
    if _backend_started():
        warnings.warn(f"JAX already started its backend; XLA flags {added} not applied (call "
                      "gptjax.runtime.setup() before the first JAX computation)", stacklevel=2)
        return []
    os.environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added
