"""gptjax's one cache root: $GPTJAX_CACHE, else $XDG_CACHE_HOME/gptjax, else ~/.cache/gptjax.

Downloads (corpora, the SMS and instruction data, HellaSwag) go in it; the persistent compilation cache
in jax/ (gptjax.runtime; $GPTJAX_CACHE_DIR moves or, empty, disables just that) and the CPU kernel in
kernels/ (gptjax.cpu.matvec; $GPTJAX_KERNEL_DIR moves just that).
"""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir(name: str | None = None) -> Path:
    """The cache root, or its sub-directory `name`."""
    env = os.environ.get("GPTJAX_CACHE")
    root = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gptjax"
    root = root.expanduser()
    return root / name if name else root
