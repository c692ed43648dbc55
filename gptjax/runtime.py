"""Process-wide JAX settings: the persistent compilation cache and XLA:CPU flags.

`setup()` runs at the start of the `gptjax` command; scripts and notebooks call it themselves,
before their first JAX computation (XLA reads its flags once, when the backend starts).
"""
from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

# XLA:CPU (jaxlib 0.10-0.12) hands dots and reductions to YNNPACK by default. Its reduce took ~4 s of
# a ~9 s gpt2-small train step on two cores (the grad-norm sum of squares over the (768, 50257) head
# gradient); "individual_dot" keeps YNNPACK for matmuls and drops the reduce: measured 2x faster
# train steps than the default. It ties with "dot" (matmuls fused with their elementwise neighbours)
# in float32 (experiments/cpu_train_flags.py), and only it runs bfloat16 products on AMX: 5x faster
# than "dot" on a (512, 768) x (768, 3072) product (experiments/cpu_matmul_flags.py), 2.5x on a train
# step with matmul_precision="bfloat16" (experiments/cpu_bf16_train.py).
CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=individual_dot",)


def user_cache_dir(name: str | None = None) -> Path:
    """$XDG_CACHE_HOME/gptjax[/<name>], else ~/.cache/gptjax[/<name>]."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "gptjax"
    return root / name if name else root


def default_cache_dir() -> Path:
    return user_cache_dir("jax")


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


def enable_compilation_cache(cache_dir: str | Path | None = None, min_compile_time_s: float = 0.5) -> Path | None:
    """Persist compiled programs across processes (a re-run skips XLA compilation).

    `cache_dir` defaults to $GPTJAX_CACHE_DIR or ~/.cache/gptjax/jax; GPTJAX_CACHE_DIR="" turns it off.
    """
    import jax

    if cache_dir is None:
        env = os.environ.get("GPTJAX_CACHE_DIR")
        if env == "":
            return None
        cache_dir = env or default_cache_dir()
    path = Path(cache_dir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        warnings.warn(f"compilation cache disabled: cannot create {str(path)!r} ({e.strerror}); "
                      f"set GPTJAX_CACHE_DIR to a writable directory", stacklevel=2)
        return None
    _reset_opened_cache()
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_s)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


_CACHE_KEYS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
               "jax_persistent_cache_min_entry_size_bytes")


def _reset_opened_cache() -> None:
    try:  # a cache already opened in this process keeps its directory until reset
        from jax._src import compilation_cache
        compilation_cache.reset_cache()
    except (ImportError, AttributeError):  # private API moved
        pass


@contextlib.contextmanager
def compilation_cache_at(cache_dir: str | Path, min_compile_time_s: float = 0.5) -> Iterator[Path | None]:
    """The persistent cache in `cache_dir` for the block; the process's own settings come back after."""
    import jax

    before = {k: jax.config.values[k] for k in _CACHE_KEYS}
    try:
        yield enable_compilation_cache(cache_dir, min_compile_time_s)
    finally:
        for k, v in before.items():
            jax.config.update(k, v)
        _reset_opened_cache()


def setup(compilation_cache: bool = True, cpu_flags: bool = True) -> dict:
    """What the `gptjax` command does first: XLA:CPU flags, then the persistent compilation cache."""
    added = set_cpu_flags() if cpu_flags else []
    cache = enable_compilation_cache() if compilation_cache else None
    return {"xla_flags_added": added, "compilation_cache_dir": None if cache is None else str(cache)}
