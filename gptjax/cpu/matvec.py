"""The matrix-vector product of decoding on CPU (float32, bfloat16 or int8 weights): a C++ XLA FFI kernel
(`matvec.cc`: four weight rows at a time, row blocks shared over XLA's intra-op thread pool) that
streams the weights closer to the memory bandwidth roofline than XLA's dot (experiments/cpu_matvec_chain.py),
and reads bfloat16 or int8 weights (`quantize_int8`) directly. The model uses it for products of at most
`MAX_ROWS` rows when `Options.matvec == "kernel"`, which `generate.decoding_model` sets on CPU.

The kernel is compiled on first use with the system's C++ compiler ($CXX, else c++/g++/clang++) against
the installed jaxlib's FFI headers, and cached in kernels/ of the cache root (gptjax.cache;
$GPTJAX_KERNEL_DIR moves it), keyed by the source, the compiler, jaxlib and the CPU. Without a compiler,
or with GPTJAX_CPU_KERNEL=0, `available()` is False (the reason in `status()`) and decoding uses XLA's
dot: the same tokens, somewhat slower (docs/performance.md).
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
import numpy as np

from gptjax.cache import cache_dir

SOURCE = Path(__file__).with_suffix(".cc")
TARGET = "gptjax_matvec"  # float32 weights
TARGET_BF16 = "gptjax_matvec_bf16"  # bfloat16 weights: half the bytes to stream
TARGET_INT8 = "gptjax_matvec_int8"  # int8 weights and a float32 scale per out row: a quarter of the bytes
SYMBOLS = {TARGET: "GptjaxMatVec", TARGET_BF16: "GptjaxMatVecBf16", TARGET_INT8: "GptjaxMatVecInt8"}
MAX_ROWS = 8  # measured faster than XLA's dot at 1 and 8 rows (batch-1 and batch-8 decoding)
FLAGS = ("-O3", "-march=native", "-std=c++17", "-ffp-contract=fast", "-shared", "-fPIC", "-w")

_state: dict = {}
_lock = threading.Lock()


class KernelBuildError(RuntimeError):
    pass


def kernel_dir() -> Path:
    env = os.environ.get("GPTJAX_KERNEL_DIR")
    return Path(env).expanduser() if env else cache_dir("kernels")


def find_compiler() -> str | None:
    """$CXX if set (even when it is missing: the error then names it), else the first C++ compiler on PATH."""
    return os.environ.get("CXX") or next((name for name in ("c++", "g++", "clang++") if shutil.which(name)), None)


def _cpu_id() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return platform.processor() or platform.machine()


def build(compiler: str | None = None, out_dir: str | Path | None = None) -> Path:
    """Compile the kernel (or find it already compiled); returns the shared library's path. Raises
    KernelBuildError naming the compiler and its first error lines."""
    import jaxlib

    compiler = compiler or find_compiler()
    if compiler is None:
        raise KernelBuildError("no C++ compiler found (tried $CXX, c++, g++, clang++); install one (e.g. "
                               "apt install g++) or set CXX to a C++17 compiler")
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
    cmd = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
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
    """Whether the kernel is built and registered with XLA in this process (built on the first call); False
    when GPTJAX_CPU_KERNEL=0 or when the build fails (warned once, reason in `status()`)."""
    with _lock:  # one build and one registration per process, whichever thread asks first
        if "ok" in _state:
            return _state["ok"]
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
                          f"tokens, slower): {e}", stacklevel=2)
            return False
        _state.update(ok=True, library=str(lib))
        return True


def status() -> dict:
    """{"available": bool, "library": path or None, "reason": why not, or None}."""
    return {"available": available(), "library": _state.get("library"), "reason": _state.get("reason")}


def applies(x: jax.Array, w_OI: jax.Array) -> bool:
    """Whether `matvec` runs the kernel for these operands (static: shapes and dtypes only)."""
    rows = x.size // max(x.shape[-1], 1)
    return (0 < rows <= MAX_ROWS and x.dtype in _X_DTYPES and w_OI.dtype in _W_DTYPES and w_OI.ndim == 2
            and x.shape[-1] == w_OI.shape[1] > 0 and w_OI.shape[0] > 0 and available())


_X_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_W_DTYPES = (*_X_DTYPES, jnp.dtype(jnp.int8))


def _xla(x: jax.Array, w_OI: jax.Array) -> jax.Array:
    return jnp.einsum("...i,oi->...o", x, w_OI, preferred_element_type=jnp.float32)


def _kernel(x: jax.Array, w_OI: jax.Array, *scale_O: jax.Array) -> jax.Array:
    out = jax.ShapeDtypeStruct((*x.shape[:-1], w_OI.shape[0]), jnp.float32)
    target = {jnp.dtype(jnp.float32): TARGET, jnp.dtype(jnp.bfloat16): TARGET_BF16, jnp.dtype(jnp.int8): TARGET_INT8}
    return jax.ffi.ffi_call(target[w_OI.dtype], out, vmap_method="sequential")(x.astype(jnp.float32), w_OI, *scale_O)


def _xla_int8(x: jax.Array, w_OI: jax.Array, scale_O: jax.Array) -> jax.Array:
    return _xla(x.astype(jnp.float32), w_OI.astype(jnp.float32)) * scale_O


@jax.custom_vjp
def _matvec(x: jax.Array, w_OI: jax.Array) -> jax.Array:
    # the kernel on CPU; on any other platform this lowers to XLA's dot
    return jax.lax.platform_dependent(x, w_OI, cpu=_kernel, default=_xla)


def _bwd(res, g):
    x, w_OI = res
    g2 = g.reshape(-1, g.shape[-1])
    dx = jnp.einsum("...o,oi->...i", g, w_OI.astype(g.dtype))
    dw = g2.T @ x.reshape(-1, x.shape[-1]).astype(g.dtype)
    return dx.astype(x.dtype), dw.astype(w_OI.dtype)


_matvec.defvjp(lambda *args: (_matvec(*args), args), _bwd)  # the residuals: the arguments


@jax.custom_vjp
def _matvec_int8(x: jax.Array, w_OI: jax.Array, scale_O: jax.Array) -> jax.Array:
    return jax.lax.platform_dependent(x, w_OI, scale_O, cpu=_kernel, default=_xla_int8)


def _bwd_int8(res, g):
    # int8 weights are frozen (their cotangent is float0); x and the scales get XLA's gradients
    x, w_OI, scale_O = res
    w = w_OI.astype(jnp.float32)
    dx = jnp.einsum("...o,oi->...i", g * scale_O, w)
    dscale = jnp.sum((g * _xla(x.astype(jnp.float32), w)).reshape(-1, g.shape[-1]), axis=0)
    return dx.astype(x.dtype), np.zeros(w_OI.shape, jax.dtypes.float0), dscale


_matvec_int8.defvjp(lambda *args: (_matvec_int8(*args), args), _bwd_int8)


def matvec(x: jax.Array, w_OI: jax.Array, scale_O: jax.Array | None = None) -> jax.Array:
    """x (..., I) times w (O, I) transposed -> float32 (..., O), accumulated in float32: the kernel
    where it `applies` (float32, bfloat16 or int8 weights, at most MAX_ROWS rows; CPU only), else XLA's dot.
    int8 weights need `scale_O`, a float32 scale per out row (`quantize_int8`): y = (x @ w.T) * scale.
    Differentiable (the backward pass is XLA's; int8 weights are constants).
    """
    if w_OI.dtype == jnp.int8 or scale_O is not None:
        if w_OI.dtype != jnp.int8 or scale_O is None or scale_O.shape != w_OI.shape[:1]:
            raise ValueError(f"a scale goes with int8 weights: one float32 per out row, shape ({w_OI.shape[0]},); "
                             f"got weights {w_OI.dtype} {w_OI.shape} and scale "
                             f"{None if scale_O is None else (scale_O.dtype, scale_O.shape)} (see quantize_int8)")
        scale_O = scale_O.astype(jnp.float32)
        return _matvec_int8(x, w_OI, scale_O) if applies(x, w_OI) else _xla_int8(x, w_OI, scale_O)
    return _matvec(x, w_OI) if applies(x, w_OI) else _xla(x, w_OI)


def quantize_int8(w_OI: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 per out row: (q int8 (..., O, I), scale float32 (..., O)) with w ~ q * scale[..., None];
    scale = max |w| of the row / 127 (1 for an all-zero row), q = round(w / scale)."""
    w = jnp.asarray(w_OI, jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=-1)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(w / scale[..., None]), -127, 127).astype(jnp.int8)
    return q, scale
