"""Op microbenchmarks: one runner (``core``), one report writer (``report``) and one module
per op family (``rejection``, ``tree_attention``, ``lm_head``, ``sparse_kv``) plus
``integrations`` (the engine entry points' cost over the raw ops), used by
``fastverify bench``, the pytest-benchmark suite in ``perf/`` and ``scripts/gpu_check.sh``.

Sizes: ``goal`` — the shapes the project's targets are stated at (GPU), ``grid`` — a sweep
(a smaller CPU sweep on CPU), ``smoke`` — tiny shapes that run every backend on CPU
(Triton interpreter, CUDA emulator) in seconds, to rehearse the pipeline.

Example::

    >>> from fastverify import bench
    >>> meta = bench.core.machine("cuda")
    >>> rows = bench.run(["rejection"], "goal", "cuda", machine_info=meta)
    >>> bench.report.write(meta, rows, "perf/results", "bench-h100")
"""

from __future__ import annotations

import importlib

from . import core, report
from .core import KERNEL_BACKENDS, SIZES, Case, Impl, Row, default_device, device_name, git_revision, machine, versions

FAMILIES = ("rejection", "tree_attention", "lm_head", "sparse_kv")
ADAPTERS = "integrations"           # the engine entry points' cost over the raw ops
CPU_FAMILIES = ("quant",)           # CPU-only kernels (GGUF quantized projections), on request


def family(name: str):
    """The benchmark module of an op family."""
    if name not in FAMILIES + (ADAPTERS,) + CPU_FAMILIES:
        raise ValueError(f"unknown family {name!r}; expected one of {FAMILIES + (ADAPTERS,) + CPU_FAMILIES}")
    return importlib.import_module(f"{__name__}.{name}")


def cases(families, size: str, device) -> list[Case]:
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    return [c for name in families for c in family(name).cases(size, device)]


def run(families, size: str, device, **kwargs) -> list[Row]:
    """Measure the cases of ``families`` at ``size`` on ``device`` (``core.run``'s options)."""
    return core.run(cases(families, size, device), device, **kwargs)


__all__ = ["ADAPTERS", "CPU_FAMILIES", "FAMILIES", "KERNEL_BACKENDS", "SIZES", "Case", "Impl", "Row", "cases", "core",
           "default_device", "device_name", "family", "git_revision", "machine", "report", "run", "versions"]
