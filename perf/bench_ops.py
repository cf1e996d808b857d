"""pytest-benchmark: every case of fastverify.bench at FASTVERIFY_BENCH_SIZE (default: goal
on a GPU, grid on CPU), one benchmark per (case, implementation), grouped by case. On CUDA
the timed function ends with a synchronize (pytest-benchmark's clock is the host's) and the
L2 is flushed in the untimed setup; ``fastverify bench`` times the same cases with CUDA
events and writes the report with % of the bound and speedups.
"""

import os

import pytest
import torch

from fastverify import bench
from fastverify.bench import core

DEVICE = bench.default_device()
SIZE = os.environ.get("FASTVERIFY_BENCH_SIZE") or ("goal" if DEVICE.type == "cuda" else "grid")
BACKENDS = bench.KERNEL_BACKENDS if DEVICE.type == "cuda" or SIZE == "smoke" else ("torch",)
CASES = bench.cases(bench.FAMILIES, SIZE, DEVICE)
PARAMS = [pytest.param(i, impl.name, id=f"{c.op}-{c.shape_str.replace(' ', '-')}-{impl.name}")
          for i, c in enumerate(CASES) for impl in c.impls
          if impl.kind != "kernel" or impl.name in BACKENDS]
_inputs: dict = {}


def inputs_of(i: int):
    """The inputs of case i, one case kept at a time (GPU inputs reach a GB)."""
    if i not in _inputs:
        _inputs.clear()
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
        _inputs[i] = CASES[i].build()
    return _inputs[i]


@pytest.mark.parametrize("case_index,impl_name", PARAMS)
def test_op(benchmark, case_index, impl_name):
    case = CASES[case_index]
    impl = next(i for i in case.impls if i.name == impl_name)
    if impl.kind == "kernel":
        why = core.backend_unavailable(impl.name, DEVICE)
        if why:
            pytest.skip(why)
    benchmark.group = f"{case.op} {case.shape_str}"
    benchmark.extra_info.update(family=case.family, op=case.op, shape=case.shape, impl=impl.name, bytes=case.bytes)
    with core.backend_context(impl):
        fn = impl.make(inputs_of(case_index))
        fn()                                     # compile, build, autotune
        core.sync(DEVICE)
        scratch = torch.empty(2 * core.l2_bytes(DEVICE), dtype=torch.uint8, device=DEVICE) \
            if DEVICE.type == "cuda" else None

        def setup():
            if scratch is not None:
                scratch.zero_()
                torch.cuda.synchronize()

        def target():
            fn()
            core.sync(DEVICE)

        benchmark.pedantic(target, setup=setup, rounds=20, warmup_rounds=1, iterations=1)
    if case.bytes and impl.kind != "setup":
        benchmark.extra_info["GB/s"] = round(case.bytes / benchmark.stats.stats.median / 1e9, 2)
