"""pytest-benchmark: tree_attention on every backend of this device, and the sdpa
(gather + dense mask + SDPA) and flex (gather + compiled FlexAttention) baselines
(fastverify/bench_attention.py says what each is). One benchmark group per
(B, P, n, dtype); compare the rows of a group. Before timing, each row's output on the
first input set is checked against the torch backend's: a wrong row fails instead of
reporting a fast wrong answer (speed itself is never asserted). On CUDA the timed
function ends with torch.cuda.synchronize (needed to stop the clock) and the L2 is
flushed in the untimed setup when the rotated input sets would fit in it. The flex
block mask is built outside the timing (``extra_info["block_mask_us"]``).

    python -m pytest perf/bench_attention.py --benchmark-only      # FASTVERIFY_BENCH_QUICK=1: quick grid
"""

import itertools
import os
import time

import pytest
import torch

from fastverify import bench
from fastverify import bench_attention as ba

DEVICE = ba.default_device()
QUICK = os.environ.get("FASTVERIFY_BENCH_QUICK", "0") not in ("", "0")
GRID = ba.default_grid(DEVICE, QUICK)
BACKENDS = ba.default_backends(DEVICE)
TARGET_S = 0.25          # seconds of timed rounds per benchmark

CASES = [pytest.param(B, P, n, dt, backend, id=f"attn-B{B}-P{P}-n{n}-{dt}-{backend}")
         for (B, P, n, dt) in ba.configs(GRID) for backend in BACKENDS]


class _Config:
    """Input sets, torch reference and baseline state of the configuration being
    benchmarked; one configuration at a time (GPU sets reach GBs)."""

    key = None
    sets = ref = prep = None

    @classmethod
    def get(cls, B, P, n, dtype, device):
        key = (B, P, n, dtype)
        if key != cls.key:
            cls.key = cls.sets = cls.ref = cls.prep = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            cls.sets = ba.build_sets(B, P, n, dtype, device)
            cls.ref = ba.reference(cls.sets[0])
            cls.prep = ba.Prepared(cls.sets)
            cls.key = key
        return cls.sets, cls.ref, cls.prep


@pytest.mark.parametrize("B,P,n,dtype,backend", CASES)
def test_tree_attention(benchmark, B, P, n, dtype, backend):
    device = DEVICE
    why = ba.unsupported_reason(backend, device)
    if why is not None:
        pytest.skip(why)
    cuda = device.type == "cuda"
    if cuda and backend in ba.BASELINES:
        count, _ = bench.input_sets_for(ba.set_bytes_estimate(B, P, n, dtype), device)
        why = ba.baseline_too_big(backend, B, P, n, dtype, count, device, ba.BASELINE_MEM_LIMIT)
        if why:
            pytest.skip(why)
    sets, ref, prep = _Config.get(B, P, n, dtype, device)
    _, flush = bench.input_sets_for(sets[0].input_bytes(), device)
    scratch = torch.empty(2 * bench.l2_bytes(device), dtype=torch.uint8, device=device) if cuda and flush else None
    benchmark.group = f"tree_attention B={B} P={P} n={n} {dtype}"
    benchmark.extra_info.update(B=B, P=P, n=n, dtype=dtype, backend=backend, bytes=sets[0].nbytes,
                                input_sets=len(sets), l2_flush=scratch is not None)
    with ba.backend_context(backend):
        try:
            calls = [ba.make_call(p, backend, prep) for p in sets]
            out = calls[0]()                     # warm-up (compile, build, autotune) + correctness
            if cuda:
                torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001
            if backend == "flex":
                pytest.skip(f"FlexAttention failed: {type(e).__name__}: {e}".splitlines()[0][:300])
            raise
        err, tol, ok = ba.check_output(out, ref, dtype)
        del out
        benchmark.extra_info.update(max_abs_err=err, tol=tol)
        if backend == "flex":
            benchmark.extra_info["block_mask_us"] = prep.block_mask_us
        if not ok:
            pytest.fail(f"WRONG: {backend} max abs error {err:.3g} vs the torch backend > tolerance {tol:.3g}")
        for c in calls[1:]:
            c()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()                 # one more warm call, to size the rounds
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
    if benchmark.stats is not None:              # None under --benchmark-disable
        benchmark.extra_info["GB/s"] = round(sets[0].nbytes / benchmark.stats.stats.median / 1e9, 2)
