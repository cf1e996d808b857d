"""The CPU kernel of the decode-step projections: ``y = x · Wᵀ (+ b)`` for 1–8 rows in fp32.

A decode step multiplies one row (or a few: a short draft chain) by every weight
matrix, so on CPU it is bound by streaming the weights. Torch's BLAS paths reach
about half of two cores' bandwidth there; ``csrc/cpu/linear.cpp`` reaches it
(``python perf/decode_step.py``).

Built on first use with the system C++ compiler (``$CXX``, else ``c++``) into
``$FASTVERIFY_CACHE`` (default ``~/.cache/fastverify``) under ``cpu-<hash>``; the hash
covers the source, the compiler and this CPU's instruction-set flags, because the
library is compiled for the host CPU (``-march=native``). It is a plain C library
loaded with ctypes: no torch headers, about a second to build. When it cannot be
built (no compiler), or with ``FASTVERIFY_CPU_KERNELS=0``, :func:`available` is False
and callers use torch's own matmul.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings

import torch

MAX_ROWS = 8
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_lock = threading.Lock()
_fn = None
_tried = False


def source_path() -> str:
    """``csrc/cpu/linear.cpp`` of a checkout, else the copy shipped in the wheel."""
    for cand in (os.path.join(_PKG_DIR, os.pardir, "csrc", "cpu", "linear.cpp"),
                 os.path.join(_PKG_DIR, "_csrc", "cpu", "linear.cpp")):
        if os.path.isfile(cand):
            return os.path.normpath(cand)
    raise RuntimeError("fastverify: csrc/cpu/linear.cpp was not found next to the package")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def _build(src: str) -> str:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (set CXX)")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    h = hashlib.sha256()
    for part in (open(src, "rb").read(), version.encode(), _cpu_flags().encode(), repr(FLAGS).encode()):
        h.update(part)
    cache = os.environ.get("FASTVERIFY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastverify")
    folder = os.path.join(cache, "cpu-" + h.hexdigest()[:16])
    lib = os.path.join(folder, "libfastverify_cpu.so")
    if os.path.exists(lib):
        return lib
    os.makedirs(folder, exist_ok=True)
    # build beside, then rename: a concurrent or interrupted build never leaves a partial library
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    try:
        subprocess.run([cxx, *FLAGS, "-o", tmp, src], capture_output=True, text=True, check=True)
        os.replace(tmp, lib)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"{cxx} failed:\n{e.stderr[-2000:]}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return lib


def _load():
    global _fn, _tried
    with _lock:
        if _tried:
            return _fn
        _tried = True
        if os.environ.get("FASTVERIFY_CPU_KERNELS", "1") in ("0", ""):
            return None
        try:
            fn = ctypes.CDLL(_build(source_path())).fastverify_linear_f32
        except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
            warnings.warn(f"fastverify: the CPU linear kernel could not be built ({e}); "
                          "using torch's matmul", RuntimeWarning, stacklevel=3)
            return None
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        fn.argtypes = [ptr, i64, ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_int]
        fn.restype = ctypes.c_int
        _fn = fn
        return fn


def available() -> bool:
    """Whether the kernel is built and loaded (builds it on the first call)."""
    return (_fn if _tried else _load()) is not None


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`linear` takes these operands: fp32 CPU tensors, 1–8 rows, the
    weight contiguous and the rows' last dim contiguous, outside torch.compile tracing."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (x.dtype == torch.float32 and weight.dtype == torch.float32 and x.device.type == "cpu"
            and 1 <= rows <= MAX_ROWS and weight.is_contiguous() and not x.requires_grad
            and not weight.requires_grad and not torch.compiler.is_compiling() and available())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] · weight[N, K]ᵀ + bias [N]`` for 1–8 rows of fp32 (check :func:`supports` first)."""
    N, K = weight.shape
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    y = torch.empty(x2.shape[0], N, dtype=torch.float32)
    _fn(x2.data_ptr(), x2.stride(0), weight.data_ptr(), bias.data_ptr() if bias is not None else None,
        y.data_ptr(), N, x2.shape[0], N, K, torch.get_num_threads())
    return y.view(*x.shape[:-1], N)
