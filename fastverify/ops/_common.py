"""Helpers shared by the op families: ragged-batch layout and backend dispatch."""

from __future__ import annotations

import importlib

import torch

from .. import _backend


def row_requests(cu: torch.Tensor, rows: int, extra: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Request of each row and the row's index inside its request, without a host sync.

    Request b owns rows cu[b] + b*extra ... cu[b+1] + b*extra + extra - 1.
    """
    B = cu.numel() - 1
    b = torch.arange(B, device=cu.device)
    counts = cu[1:] - cu[:-1] + extra
    row_req = torch.repeat_interleave(b, counts, output_size=rows)
    first = cu[:-1] + b * extra
    return row_req, torch.arange(rows, device=cu.device) - first[row_req]


def host_read_ok(t: torch.Tensor) -> bool:
    """Whether a torch kernel may read a small value of ``t`` back to the host (a loop
    bound, a table width): not while a CUDA graph is being captured, where a sync would
    break the capture; there the kernel takes the static bound its shapes give."""
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def implementation(device: torch.device, family: str, name: str, torch_fn):
    """The backend function of op ``name`` (family module ``family``) for tensors on ``device``."""
    backend = _backend.get_backend(device)
    if backend == "torch":
        return torch_fn
    if backend == "cpu":
        if device.type != "cpu":
            raise RuntimeError(f"the cpu backend needs CPU tensors, got tensors on {device}")
        from .. import cpu
        if cpu.available():
            return getattr(importlib.import_module(f"fastverify.cpu.{family}"), name)
        if _backend.chosen():
            raise RuntimeError("the cpu backend was chosen but its C++ kernels could not be built "
                               "(see the warning above); use the torch backend")
        return torch_fn
    if backend == "triton":
        if device.type == "cpu" and not _backend.triton_interpreting():
            raise RuntimeError(
                "the triton backend runs CPU tensors only under the Triton interpreter: "
                "set TRITON_INTERPRET=1 before importing fastverify (or use CUDA tensors)")
        return getattr(importlib.import_module(f"fastverify.triton.{family}"), name)
    if device.type == "cpu" and _backend.cpu_cuda_kernels is not None:
        return getattr(_backend.cpu_cuda_kernels, name)
    if device.type != "cuda":
        raise RuntimeError(f"the cuda backend needs CUDA tensors, got tensors on {device}")
    from .. import _cuda
    return getattr(_cuda, name)
