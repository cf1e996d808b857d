"""Which implementation an op runs, and whether value checks run.

Every op has implementations that agree: ``torch`` (vectorized PyTorch, the readable
specification), ``cpu`` (fused C++, ``csrc/cpu``), ``triton`` and ``cuda``. On CUDA
tensors the default is the fastest backend; on CPU tensors it is ``cpu`` (``torch`` where
its C++ kernels cannot be built). ``FASTVERIFY_BACKEND`` or :func:`set_backend` override
both. Choosing ``triton`` for CPU tensors runs the
Triton kernels under the Triton interpreter, which needs ``TRITON_INTERPRET=1``
in the environment before anything imports Triton.
"""

from __future__ import annotations

import contextlib
import os

import torch

BACKENDS = ("torch", "cpu", "triton", "cuda")

# Default on CUDA tensors. Triton until perf/ measurements on a GPU say otherwise.
CUDA_DEFAULT = "triton"

_chosen: str | None = None

# Entry points (a ``fastverify._cuda.Kernels``) serving the cuda backend on CPU tensors:
# the tests install the CUDA kernels built for the CPU by their emulator (tests/cuda_emu),
# so the public ops run the unmodified .cu kernels on a machine without a GPU.
cpu_cuda_kernels = None


def _parse(name: str | None) -> str | None:
    if name is None or name == "" or name == "auto":
        return None
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or 'auto', got {name!r}")
    return name


_chosen = _parse(os.environ.get("FASTVERIFY_BACKEND"))


def set_backend(name: str | None) -> None:
    """Force every op onto one backend (``"torch"``, ``"cpu"``, ``"triton"``, ``"cuda"``), or
    restore the per-device default with ``None`` / ``"auto"``."""
    global _chosen
    _chosen = _parse(name)


def get_backend(device: torch.device | str | None = None) -> str:
    """The backend an op runs for tensors on ``device`` (on CPU tensors the default ``cpu``
    stands for ``torch`` where the C++ kernels cannot be built: see :func:`chosen`)."""
    if _chosen is not None:
        return _chosen
    device_type = torch.device(device).type if device is not None else "cpu"
    return CUDA_DEFAULT if device_type == "cuda" else "cpu"


def chosen() -> bool:
    """Whether a backend was chosen explicitly (then an unavailable one is an error)."""
    return _chosen is not None


@contextlib.contextmanager
def use_backend(name: str | None):
    """``with fastverify.use_backend("triton"): ...`` — set the backend for a block."""
    global _chosen
    before = _chosen
    set_backend(name)
    try:
        yield
    finally:
        _chosen = before


def emulate_cuda_on_cpu(kernels) -> None:
    """Serve ``backend="cuda"`` on CPU tensors with ``kernels`` (entry points with the
    signatures of :class:`fastverify._cuda.Kernels`, e.g. the tests' CPU emulation of the
    CUDA kernels); ``None`` restores the default (the cuda backend refuses CPU tensors)."""
    global cpu_cuda_kernels
    cpu_cuda_kernels = kernels


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def value_checks_enabled(t: torch.Tensor) -> bool:
    """Value checks (ids in range, prefix sums consistent, ...) read tensor data.

    On CPU that is free and always done. On CUDA it is a device-to-host copy, so it
    runs only with ``FASTVERIFY_CHECKS=1`` and never while a CUDA graph is captured.
    """
    if t.device.type == "cpu":
        return True
    if t.device.type == "meta" or os.environ.get("FASTVERIFY_CHECKS", "0") in ("", "0"):
        return False
    return not (t.device.type == "cuda" and torch.cuda.is_current_stream_capturing())
