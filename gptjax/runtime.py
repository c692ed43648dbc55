"""Process-wide JAX settings: the persistent compilation cache and XLA:CPU flags (gptjax.cpu.flags).

`setup()` runs at the start of the `gptjax` command; scripts and notebooks call it themselves,
before their first JAX computation (XLA reads its flags once, when the backend starts).
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import jax

from gptjax.cache import cache_dir as gptjax_cache_dir
from gptjax.cpu.flags import set_cpu_flags

_CACHE_KEYS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
               "jax_persistent_cache_min_entry_size_bytes")


def default_cache_dir() -> Path:
    """The persistent compilation cache's default: jax/ in gptjax's cache root (gptjax.cache)."""
    return gptjax_cache_dir("jax")


def enable_compilation_cache(cache_dir: str | Path | None = None, min_compile_time_s: float = 0.5) -> Path | None:
    """Persist compiled programs across processes (a re-run skips XLA compilation). `cache_dir` defaults to
    $GPTJAX_CACHE_DIR or jax/ in the cache root; GPTJAX_CACHE_DIR="" turns it off."""
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
    for key, value in zip(_CACHE_KEYS, (str(path), min_compile_time_s, 0)):
        jax.config.update(key, value)
    return path


def _reset_opened_cache() -> None:
    # a cache already opened in this process keeps its directory until reset (errors: the private API moved)
    with contextlib.suppress(ImportError, AttributeError):
        from jax._src import compilation_cache
        compilation_cache.reset_cache()


@contextlib.contextmanager
def compilation_cache_at(cache_dir: str | Path, min_compile_time_s: float = 0.5) -> Iterator[Path | None]:
    """The persistent cache in `cache_dir` for the block; the process's own settings come back after."""
    before = {k: jax.config.values[k] for k in _CACHE_KEYS}
    try:
        yield enable_compilation_cache(cache_dir, min_compile_time_s)
    finally:
        for k, v in before.items():
            jax.config.update(k, v)
        _reset_opened_cache()


def setup(compilation_cache: bool = True, cpu_flags: bool = True) -> dict:
    """What the `gptjax` command does first: XLA:CPU flags (gptjax.cpu.flags), then the persistent
    compilation cache."""
    added = set_cpu_flags() if cpu_flags else []
    cache = enable_compilation_cache() if compilation_cache else None
    return {"xla_flags_added": added, "compilation_cache_dir": None if cache is None else str(cache)}


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_free_memory() -> None:
    """Hand the memory the allocator holds free back to the OS (glibc's malloc_trim; elsewhere nothing):
    after a phase that freed large buffers, so the next one does not stack its peak on top of them."""
    if (libc := _libc()) is not None:
        libc.malloc_trim(0)
