"""pytest-benchmark: rejection_sample (chain) and tree_rejection_sample on every backend
of this device, and the eager / torch.compile'd torch baselines (fastverify/bench.py
says what each is). One benchmark group per (op, B, K, V, dtype); compare the rows of a
group. On CUDA the timed function ends with torch.cuda.synchronize (needed to stop the
clock) and the L2 is flushed in the untimed setup when the rotated input sets would
fit in it.
"""

import itertools
import os
import time

import pytest
import torch

from fastverify import bench

DEVICE = bench.default_device()
QUICK = os.environ.get("FASTVERIFY_BENCH_QUICK", "0") not in ("", "0")
GRID = bench.default_grid(DEVICE, QUICK)
BACKENDS = bench.default_backends(DEVICE)
TARGET_S = 0.25          # seconds of timed rounds per benchmark

CASES = [pytest.param(op, B, K, V, dt, backend, id=f"{op}-B{B}-K{K}-V{V}-{dt}-{backend}")
         for op in bench.OPS for (B, K, V, dt) in bench.configs(GRID) for backend in BACKENDS]


@pytest.mark.parametrize("op,B,K,V,dtype,backend", CASES)
def test_rejection(benchmark, input_sets, device, op, B, K, V, dtype, backend):
    why = bench.unsupported_reason(backend, device)
    if why is not None:
        pytest.skip(why)
    sets = input_sets.get(op, B, K, V, dtype)
    calls = [bench.make_call(p, backend) for p in sets]
    cuda = device.type == "cuda"
    _, flush = bench.input_sets_for(sets[0].input_bytes(), device)
    scratch = torch.empty(2 * bench.l2_bytes(device), dtype=torch.uint8, device=device) if cuda and flush else None
    benchmark.group = f"{op} B={B} K={K} V={V} {dtype}"
    benchmark.extra_info.update(op=op, B=B, K=K, V=V, dtype=dtype, backend=backend, bytes=sets[0].nbytes,
                                input_sets=len(sets), l2_flush=scratch is not None)
    with bench.backend_context(backend):
        try:
            for c in calls:                       # warm-up: compile, build, autotune
                c()
            if cuda:
                torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001
            if backend == "compiled":
                pytest.skip(f"torch.compile failed: {type(e).__name__}: {e}".splitlines()[0][:300])
            raise
        t0 = time.perf_counter()                  # one more warm call, to size the rounds
        calls[0]()
        if cuda:
            torch.cuda.synchronize()
        est = max(time.perf_counter() - t0, 1e-6)
        rotation = itertools.cycle(calls)

        if cuda:
            def target():
                next(rotation)()
                torch.cuda.synchronize()

            def setup():
                if scratch is not None:
                    scratch.zero_()
                torch.cuda.synchronize()
        else:
            def target():
                next(rotation)()
            setup = None

        rounds = int(min(300, max(3, TARGET_S / est)))
        benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=0, iterations=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info["GB/s"] = round(sets[0].nbytes / median / 1e9, 2)
