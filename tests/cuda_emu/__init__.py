"""The CUDA kernels of csrc/cuda, executed on the CPU by an emulator.

``emulator.h`` emulates the CUDA features the kernels use (threads as fibers, shared
memory, barriers, warp shuffles, cub block reductions, wmma); ``build.py`` compiles the
unmodified .cu files against it into ``torch.ops.fastverify_cuda_emu``; :func:`kernels`
returns fastverify._cuda's entry points over those ops, to be called with CPU tensors.
tests/conftest.py installs them as the cuda backend of CPU tensors, so every family's
tests run the CUDA kernels on CPU; tests/test_cuda_emulator.py proves the emulator catches
what it claims to.
"""

from .build import Unavailable, load


def kernels():
    """``fastverify._cuda.Kernels`` over the emulated ops (builds them on first use)."""
    from fastverify import _cuda

    return _cuda.Kernels(load)


__all__ = ["Unavailable", "kernels", "load"]
