"""The matrix-vector product of decoding on CPU (float32 or bfloat16 weights), faster than XLA's dot:
a C++ XLA FFI kernel.

Decoding one token reads every weight once, so its speed is memory bandwidth. XLA:CPU's dot streams
gpt2-small's (out, in) kernels at 0.80-0.84 of this machine's bandwidth roofline; this kernel
(`cpu_matvec.cc`: four weight rows at a time, row blocks shared over XLA's intra-op thread pool)
at 0.95 (experiments/cpu_matvec_chain.py). From bfloat16 weights it streams half the bytes, where
XLA:CPU's bfloat16 dot is slower than its float32 one. `matvec` is used by the model for products
of at most `MAX_ROWS` rows when `GPTConfig.matvec == "kernel"`, which `generate.decoding_model`
sets on CPU.

The kernel is compiled on first use with the system's C++ compiler ($CXX, else c++/g++/clang++;
-O3 -march=native) against the installed jaxlib's FFI headers, and cached under
$GPTJAX_KERNEL_DIR (default ~/.cache/gptjax/kernels), keyed by the source, the compiler, jaxlib and
the CPU. Without a compiler, or with GPTJAX_CPU_KERNEL=0, `available()` is False (with the reason in
`status()`) and decoding uses XLA's dot: the same tokens, about 15% slower on two cores.

Letters: R rows (batch), I in features, O out features.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

from gptjax.runtime import user_cache_dir

SOURCE = Path(__file__).with_suffix(".cc")
TARGET = "gptjax_matvec"  # float32 weights
TARGET_BF16 = "gptjax_matvec_bf16"  # bfloat16 weights: half the bytes to stream
SYMBOLS = {TARGET: "GptjaxMatVec", TARGET_BF16: "GptjaxMatVecBf16"}
MAX_ROWS = 8  # measured faster than XLA's dot at 1 and 8 rows (batch-1 and batch-8 decoding)
FLAGS = ("-O3", "-march=native", "-std=c++17", "-ffp-contract=fast", "-shared", "-fPIC", "-w")

_state: dict = {}
_lock = threading.Lock()


class KernelBuildError(RuntimeError):
    pass


def kernel_dir() -> Path:
    env = os.environ.get("GPTJAX_KERNEL_DIR")
    return Path(env).expanduser() if env else user_cache_dir("kernels")


def find_compiler() -> str | None:
    """$CXX if set (even when it is missing: the error then names it), else the first C++ compiler on PATH."""
    if os.environ.get("CXX"):
        return os.environ["CXX"]
    for name in ("c++", "g++", "clang++"):
        if shutil.which(name):
            return name
    return None


def _cpu_id() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return platform.processor() or platform.machine()


def build(compiler: str | None = None, out_dir: str | Path | None = None) -> Path:
    """Compile the kernel (or find it already compiled); returns the shared library's path.

    Raises KernelBuildError naming the compiler and its first error lines.
    """
    import jaxlib

    compiler = compiler or find_compiler()
    if compiler is None:
        raise KernelBuildError("no C++ compiler found (tried $CXX, c++, g++, clang++); install one (e.g. "
                               "apt install g++) or set CXX to a C++17 compiler")
    include = jax.ffi.include_dir()
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, " ".join(FLAGS), jaxlib.__version__,
                                    platform.machine(), _cpu_id()]).encode()).hexdigest()[:16]
    out_dir = Path(out_dir) if out_dir is not None else kernel_dir()
    lib = out_dir / f"matvec-{key}.so"
    if lib.exists():
        return lib
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KernelBuildError(f"cannot create {str(out_dir)!r} ({e.strerror}); set GPTJAX_KERNEL_DIR to a "
                               "writable directory") from None
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    cmd = [compiler, *FLAGS, f"-I{include}", str(SOURCE), "-o", tmp]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        os.unlink(tmp)
        raise KernelBuildError(f"cannot run the C++ compiler {compiler!r}: {e}; set CXX to a C++17 compiler") from None
    if done.returncode:
        os.unlink(tmp)
        first = "\n".join((done.stderr or done.stdout).strip().splitlines()[:5])
        raise KernelBuildError(f"{compiler} failed to compile {SOURCE.name} (exit {done.returncode}):\n{first}")
    os.replace(tmp, lib)  # atomic: a process building at the same time finds a whole file
    return lib


def available() -> bool:
    """Whether the kernel is built and registered with XLA in this process (built on the first call).

    False when GPTJAX_CPU_KERNEL=0, or when the build fails (warned once, reason in `status()`).
    """
    with _lock:  # one build and one registration per process, whichever thread asks first
        return _available()


def _available() -> bool:
    if "ok" not in _state:
        _state.update(ok=False, library=None, reason=None)
        if os.environ.get("GPTJAX_CPU_KERNEL", "1") == "0":
            _state["reason"] = "turned off by GPTJAX_CPU_KERNEL=0"
            return False
        try:
            lib = build()
            handle = ctypes.cdll.LoadLibrary(str(lib))
            for target, symbol in SYMBOLS.items():
                jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(handle, symbol)), platform="cpu")
        except (KernelBuildError, OSError, AttributeError) as e:
            _state["reason"] = str(e)
            warnings.warn(f"gptjax's CPU decoding kernel is unavailable, decoding uses XLA's dot (the same "
                          f"tokens, slower): {e}", stacklevel=3)
            return False
        _state.update(ok=True, library=str(lib))
    return _state["ok"]


def status() -> dict:
    """{"available": bool, "library": path or None, "reason": why not, or None}."""
    ok = available()
    return {"available": ok, "library": _state.get("library"), "reason": _state.get("reason")}


def applies(x: jax.Array, w_OI: jax.Array) -> bool:
    """Whether `matvec` runs the kernel for these operands (static: shapes and dtypes only)."""
    rows = x.size // max(x.shape[-1], 1)
    return (0 < rows <= MAX_ROWS and x.dtype in _DTYPES and w_OI.dtype in _DTYPES and w_OI.ndim == 2
            and x.shape[-1] == w_OI.shape[1] > 0 and w_OI.shape[0] > 0 and available())


_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def _xla(x: jax.Array, w_OI: jax.Array) -> jax.Array:
    return jnp.einsum("...i,oi->...o", x, w_OI, preferred_element_type=jnp.float32)


def _kernel(x: jax.Array, w_OI: jax.Array) -> jax.Array:
    out = jax.ShapeDtypeStruct((*x.shape[:-1], w_OI.shape[0]), jnp.float32)
    target = TARGET if w_OI.dtype == jnp.float32 else TARGET_BF16
    return jax.ffi.ffi_call(target, out, vmap_method="sequential")(x.astype(jnp.float32), w_OI)


@jax.custom_vjp
def _matvec(x: jax.Array, w_OI: jax.Array) -> jax.Array:
    # the kernel on CPU; on any other platform this lowers to XLA's dot
    return jax.lax.platform_dependent(x, w_OI, cpu=_kernel, default=_xla)


def _fwd(x, w_OI):
    return _matvec(x, w_OI), (x, w_OI)


def _bwd(res, g):
    x, w_OI = res
    g2 = g.reshape(-1, g.shape[-1])
    dx = jnp.einsum("...o,oi->...i", g, w_OI.astype(g.dtype))
    dw = g2.T @ x.reshape(-1, x.shape[-1]).astype(g.dtype)
    return dx.astype(x.dtype), dw.astype(w_OI.dtype)


_matvec.defvjp(_fwd, _bwd)


def matvec(x: jax.Array, w_OI: jax.Array) -> jax.Array:
    """x (..., I) times w (O, I) transposed -> float32 (..., O), accumulated in float32: the kernel
    where it `applies` (float32 or bfloat16 operands, at most MAX_ROWS rows), else XLA's dot.

    Differentiable (the backward pass is XLA's), and on non-CPU platforms always XLA's dot.
    """
    return _matvec(x, w_OI) if applies(x, w_OI) else _xla(x, w_OI)
