"""The ``cpu`` backend: fused C++ kernels under ``csrc/cpu/`` for CPU tensors.

One shared library holds every CPU kernel: the models' fused decode step
(``step.cpp``, wrapped by :mod:`fastverify.cpu.step`) and one file per op family, whose
entry points (:mod:`fastverify.cpu.rejection`, :mod:`~fastverify.cpu.tree_attention`,
:mod:`~fastverify.cpu.frspec`, :mod:`~fastverify.cpu.sparse_kv`) have the Triton
launchers' signatures. The families share ``common.h``, ``linear.h`` (the projections)
and ``attention.h`` (paged attention over trees and chunk lists) with the decode step.

Why a plain C library loaded with ctypes rather than ``TORCH_LIBRARY_IMPL(fastverify,
CPU, ...)``: the ops are registered once in Python (schemas, fake kernels, checks) and
dispatch by backend there, so a second registration path would duplicate them; and without
torch headers the library builds in seconds with the system compiler, where a torch
extension takes about a minute. Nothing is built at import: the first :func:`library`
call compiles each ``*.cpp`` (in parallel) and links them into ``$FASTVERIFY_CACHE``
(default ``~/.cache/fastverify``) under ``cpu-<isa>-<hash>``; the hash covers the sources,
the compiler, the flags and this CPU's instruction-set flags.

``FASTVERIFY_CPU_ISA`` picks the instruction set the library is compiled for:
``native`` (default: ``-march=native``, AVX-512 / AVX-512-BF16 / AVX2 paths chosen by
the compiler's macros), ``avx2`` (``-march=haswell``) or ``portable`` (``-march=x86-64``:
plain C++ loops, the path every kernel falls back to). ``FASTVERIFY_CPU_KERNELS=0``
disables the library: the ``cpu`` backend is then unavailable and CPU tensors run the
``torch`` backend.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings

import torch

ISA_FLAGS = {"native": ("-march=native",), "avx2": ("-march=haswell",), "portable": ("-march=x86-64", "-mtune=generic")}
FLAGS = ("-O3", "-fopenmp", "-fPIC", "-std=c++17")
_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
_lock = threading.Lock()
_lib = None
_tried = False
_bound: dict = {}


def source_dir() -> str:
    """``csrc/cpu`` of a checkout, else the copy shipped in the wheel."""
    for cand in (os.path.join(_PKG_DIR, os.pardir, os.pardir, "csrc", "cpu"),
                 os.path.join(_PKG_DIR, os.pardir, "_csrc", "cpu")):
        if os.path.isfile(os.path.join(cand, "step.cpp")):
            return os.path.normpath(cand)
    raise RuntimeError("fastverify: csrc/cpu was not found next to the package")


def isa() -> str:
    """The instruction set the library is built for (``FASTVERIFY_CPU_ISA``)."""
    name = os.environ.get("FASTVERIFY_CPU_ISA", "native") or "native"
    if name not in ISA_FLAGS:
        raise ValueError(f"FASTVERIFY_CPU_ISA must be one of {tuple(ISA_FLAGS)}, got {name!r}")
    return name


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def _build(folder_src: str) -> str:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (set CXX)")
    flags = FLAGS + ISA_FLAGS[isa()]
    files = sorted(glob.glob(os.path.join(folder_src, "*.cpp")) + glob.glob(os.path.join(folder_src, "*.h")))
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    h = hashlib.sha256()
    for path in files:
        h.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    for part in (version, _cpu_flags(), repr(flags)):
        h.update(part.encode())
    cache = os.environ.get("FASTVERIFY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastverify")
    folder = os.path.join(cache, f"cpu-{isa()}-{h.hexdigest()[:16]}")
    lib = os.path.join(folder, "libfastverify_cpu.so")
    if os.path.exists(lib):
        return lib
    os.makedirs(folder, exist_ok=True)
    # objects and library in a private folder, then one rename: a concurrent or
    # interrupted build never leaves a partial library
    work = tempfile.mkdtemp(dir=folder)
    try:
        sources = [p for p in files if p.endswith(".cpp")]
        objects = [os.path.join(work, os.path.basename(p) + ".o") for p in sources]
        jobs = [subprocess.Popen([cxx, *flags, "-c", "-o", o, s], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for s, o in zip(sources, objects)]
        for job in jobs:
            _, err = job.communicate()
            if job.returncode:
                raise RuntimeError(f"{cxx} failed:\n{err[-3000:]}")
        tmp = os.path.join(work, "lib.so")
        subprocess.run([cxx, *flags, "-shared", "-o", tmp, *objects], capture_output=True, text=True, check=True)
        os.replace(tmp, lib)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"{cxx} failed:\n{e.stderr[-3000:]}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return lib


def library():
    """The loaded library (built on the first call), or None when it cannot be built
    (no compiler; a warning says why) or ``FASTVERIFY_CPU_KERNELS=0``."""
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        if os.environ.get("FASTVERIFY_CPU_KERNELS", "1") in ("0", ""):
            _tried = True
            return None
        try:
            _lib = ctypes.CDLL(_build(source_dir()))
        except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
            warnings.warn(f"fastverify: the CPU kernels could not be built ({e}); using the torch backend",
                          RuntimeWarning, stacklevel=3)
        _tried = True
        return _lib


def available() -> bool:
    """Whether the CPU kernels are built and loaded (builds them on the first call)."""
    return library() is not None


def function(name: str, restype, *argtypes):
    """The C function ``name`` of the library with its ctypes signature set (once)."""
    fn = _bound.get(name)
    if fn is None:
        lib = library()
        if lib is None:
            raise RuntimeError("the cpu backend is unavailable: its C++ kernels could not be built "
                               "(see the warning above) or FASTVERIFY_CPU_KERNELS=0")
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = list(argtypes)
        _bound[name] = fn
    return fn


FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512bf16", "avx512vnni")


def features() -> tuple:
    """The instruction-set paths the loaded library was compiled with (e.g. ``("avx2",
    "fma", "f16c", "avx512f", "avx512bf16", "avx512vnni")`` natively here; ``()`` for the
    portable build)."""
    bits = function("fastverify_cpu_features", ctypes.c_int64)()
    return tuple(name for i, name in enumerate(FEATURES) if bits >> i & 1)


# element-type codes of csrc/cpu/common.h's Dtype
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def dtype_code(t) -> int:
    """The ``Dtype`` code of tensor ``t``'s element type (fp32, bf16, fp16)."""
    return DTYPE_CODES[t.dtype]


def probs_rows(p):
    """(first_bad [R] int64: the first column of each row of ``p [R, C]`` (fp32/bf16/fp16, CPU,
    unit column stride) that is not finite or is negative, -1 if none; sums [R] float64), in
    one pass (``csrc/cpu/checks.cpp``)."""
    R, C = p.shape
    first_bad = torch.empty(R, dtype=torch.int64)
    sums = torch.empty(R, dtype=torch.float64)
    function("fastverify_check_probs", None, ptr, i32, i64, i64, i64, ptr, ptr, i32)(
        p.data_ptr(), dtype_code(p), R, C, p.stride(0), first_bad.data_ptr(), sums.data_ptr(),
        torch.get_num_threads())
    return first_bad, sums


# ctypes shorthands for the family modules' signatures
i32, i64, f32, ptr = ctypes.c_int, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
