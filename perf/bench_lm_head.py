"""Microbenchmarks of ``lm_head_topk`` (frequency-ranked LM head): pytest-benchmark suite,
and a report when run as a script.

    python -m pytest perf/bench_lm_head.py --benchmark-only     # FASTVERIFY_BENCH_QUICK=1: quick grid
    python perf/bench_lm_head.py [--quick] [--out DIR]           # → perf/results/<device>-<date>-lm-head.{md,json}

Per configuration (d, V_sub, M, k, dtype) the rows are:

* the op through its public entry point (``fastverify.lm_head_topk``, token_map and
  per-row temperature given) on each kernel backend of the device: ``triton``, ``cuda``
  (when the extension builds and has the op) and ``torch``; ``torch`` only on CPU (the
  Triton interpreter is far too slow to time);
* ``full`` — what a drafter without FR-Spec does: ``hidden @ head.T`` over the full
  vocabulary head (the model's vocabulary for that d: FULL_VOCAB), ``log_softmax`` in
  fp32, ``topk``;
* ``subset`` — the unfused FR-Spec path: the same on the V_sub-row slice, then
  ``token_map`` of the top-k rows (the logits are written to and read back from memory).

Bytes, the same for every row of a configuration: the subset weight plus the hidden
states (``(V_sub + M)·d·bytes``), what a fused kernel must read. % of bound =
(bytes / peak bandwidth) / time, peak as in ``fastverify/bench.py`` (datasheet HBM
figure on H100/H200/A100, else measured copy bandwidth). Speedups are ``full`` and
``subset`` time over the row's time, measured in the same run. Timing, input-set
rotation and L2 flushing are ``fastverify/bench.py``'s (``time_calls``,
``input_sets_for``). Before timing, each op row's top-k log-probabilities are checked
against an fp32 reference on the first input set: a wrong row fails (pytest) or is
marked WRONG (report) instead of reporting a fast wrong answer.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import pytest
import torch

import fastverify
from fastverify import bench

GPU_GRID = {"d": (576, 2048, 4096), "V": (8192, 16384, 32768, 65536, 128256), "M": (1, 8, 64, 256), "k": (1, 8),
            "dtype": ("bf16",)}
GPU_QUICK_GRID = {"d": (4096,), "V": (32768,), "M": (1, 64), "k": (8,), "dtype": ("bf16",)}
CPU_GRID = {"d": (64,), "V": (4096, 16384), "M": (1, 8), "k": (1, 8), "dtype": ("fp32",)}
CPU_QUICK_GRID = {"d": (64,), "V": (4096,), "M": (1,), "k": (8,), "dtype": ("fp32",)}
# the model vocabulary of each hidden size: SmolLM2-135M, Llama-3.2-1B, Llama-3-8B (64: the CPU stand-in)
FULL_VOCAB = {64: 32000, 576: 49152, 2048: 128256, 4096: 128256}
BASELINES = ("full", "subset")
KERNEL_BACKENDS = ("triton", "cuda", "torch")
TOLERANCE = {"bf16": 3e-2, "fp16": 1e-2, "fp32": 1e-3}   # top-k logprobs vs the fp32 reference (abs, sorted)
TARGET_S = 0.25


def full_vocab(d: int, V: int) -> int:
    return FULL_VOCAB.get(d, max(V, 128256))


def default_grid(device, quick: bool = False) -> dict:
    gpu = torch.device(device).type == "cuda"
    return dict((GPU_QUICK_GRID if quick else GPU_GRID) if gpu else (CPU_QUICK_GRID if quick else CPU_GRID))


def configs(grid: dict) -> list[tuple[int, int, int, int, str]]:
    return [(d, V, M, k, dt) for dt in grid["dtype"] for d in grid["d"] for V in grid["V"] for M in grid["M"]
            for k in grid["k"] if V <= full_vocab(d, V)]   # a subset of the model's vocabulary


def default_backends(device) -> list[str]:
    if torch.device(device).type == "cuda":
        return list(BASELINES + KERNEL_BACKENDS)
    return list(BASELINES) + ["torch"]


def unsupported_reason(backend: str, device) -> Optional[str]:
    dev = torch.device(device)
    if backend in BASELINES or backend == "torch":
        return None
    if dev.type != "cuda":
        return bench.unsupported_reason(backend, dev)
    if backend == "cuda":
        try:
            from fastverify import _cuda
        except Exception as e:  # noqa: BLE001
            return "import of fastverify._cuda failed: " + bench._first_line(e)
        if not hasattr(_cuda, "lm_head_topk"):
            return "fastverify._cuda has no lm_head_topk"
    return None


# =========================================================================== problems


@dataclass
class HeadSet:
    """One input set: hidden states, the ranked subset head and the full head it came from."""
    hidden: torch.Tensor          # [M, d]
    weight: torch.Tensor          # [V, d] contiguous subset
    token_map: torch.Tensor       # [V] int64
    temperature: torch.Tensor     # [M] fp32
    head: torch.Tensor            # [V_full, d]

    @property
    def nbytes(self) -> int:
        return (self.weight.numel() + self.hidden.numel()) * self.weight.element_size()

    def input_bytes(self) -> int:
        return self.nbytes + self.head.numel() * self.head.element_size()


def build_set(d: int, V: int, M: int, dtype: str, device, seed: int) -> HeadSet:
    g = torch.Generator(device=device).manual_seed(seed)
    dt = bench.DTYPES[dtype]
    Vf = full_vocab(d, V)
    head = (torch.randn(Vf, d, generator=g, device=device) / d ** 0.5).to(dt)
    token_map = torch.randperm(Vf, generator=g, device=device)[:V]
    hidden = (torch.randn(M, d, generator=g, device=device) * 2).to(dt)
    temperature = torch.full((M,), 0.8, device=device)
    return HeadSet(hidden, head[token_map].contiguous(), token_map, temperature, head)


def build_sets(d, V, M, dtype, device) -> list[HeadSet]:
    first = build_set(d, V, M, dtype, device, 0)
    n, _ = bench.input_sets_for(first.input_bytes(), device)
    return [first] + [build_set(d, V, M, dtype, device, s) for s in range(1, n)]


def full_topk(hidden, head, k, temperature):
    """Baseline ``full``: logits over the whole vocabulary, fp32 log_softmax, topk."""
    lp = ((hidden @ head.T).float() / temperature[:, None]).log_softmax(-1)
    return lp.topk(k, dim=-1)


def subset_topk(hidden, weight, token_map, k, temperature):
    """Baseline ``subset``: the same on the ranked rows, then their full-vocabulary ids."""
    lp = ((hidden @ weight.T).float() / temperature[:, None]).log_softmax(-1)
    vals, rows = lp.topk(k, dim=-1)
    return token_map[rows], vals


def make_call(p: HeadSet, k: int, backend: str) -> Callable:
    if backend == "full":
        return lambda: full_topk(p.hidden, p.head, k, p.temperature)
    if backend == "subset":
        return lambda: subset_topk(p.hidden, p.weight, p.token_map, k, p.temperature)
    return lambda: fastverify.lm_head_topk(p.hidden, p.weight, k, token_map=p.token_map, temperature=p.temperature)


def reference_logprobs(p: HeadSet, k: int) -> torch.Tensor:
    """fp32 top-k log-probabilities (sorted) of the subset, for the correctness check."""
    lp = ((p.hidden.float() @ p.weight.float().T) / p.temperature[:, None]).log_softmax(-1)
    return lp.topk(k, dim=-1).values


def check_output(out, ref: torch.Tensor, dtype: str) -> tuple[float, bool]:
    err = (out[1].float() - ref).abs().max().item() if ref.numel() else 0.0
    return err, err <= TOLERANCE[dtype]


def backend_context(backend: str):
    return fastverify.use_backend(backend) if backend in KERNEL_BACKENDS else contextlib.nullcontext()


# =========================================================================== pytest-benchmark

DEVICE = bench.default_device()
QUICK = os.environ.get("FASTVERIFY_BENCH_QUICK", "0") not in ("", "0")
GRID = default_grid(DEVICE, QUICK)
CASES = [pytest.param(d, V, M, k, dt, backend, id=f"lm_head-d{d}-V{V}-M{M}-k{k}-{dt}-{backend}")
         for (d, V, M, k, dt) in configs(GRID) for backend in default_backends(DEVICE)]


class _Config:
    """Input sets of the configuration being benchmarked; one at a time (GPU sets reach GBs)."""

    key = sets = None

    @classmethod
    def get(cls, d, V, M, dtype, device):
        if (d, V, M, dtype) != cls.key:
            cls.key = cls.sets = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            cls.sets = build_sets(d, V, M, dtype, device)
            cls.key = (d, V, M, dtype)
        return cls.sets


@pytest.mark.parametrize("d,V,M,k,dtype,backend", CASES)
def test_lm_head_topk(benchmark, d, V, M, k, dtype, backend):
    device = DEVICE
    why = unsupported_reason(backend, device)
    if why is not None:
        pytest.skip(why)
    sets = _Config.get(d, V, M, dtype, device)
    cuda = device.type == "cuda"
    _, flush = bench.input_sets_for(sets[0].input_bytes(), device)
    scratch = torch.empty(2 * bench.l2_bytes(device), dtype=torch.uint8, device=device) if cuda and flush else None
    benchmark.group = f"lm_head_topk d={d} V={V} M={M} k={k} {dtype}"
    benchmark.extra_info.update(d=d, V=V, M=M, k=k, dtype=dtype, backend=backend, bytes=sets[0].nbytes,
                                input_sets=len(sets), l2_flush=scratch is not None)
    with backend_context(backend):
        calls = [make_call(p, k, backend) for p in sets]
        out = calls[0]()                                  # warm-up (compile, build) + correctness
        if backend != "full":
            err, ok = check_output(out, reference_logprobs(sets[0], k), dtype)
            benchmark.extra_info["max_abs_err"] = err
            if not ok:
                pytest.fail(f"WRONG: {backend} top-k logprobs off by {err:.3g} > {TOLERANCE[dtype]}")
        for c in calls[1:]:
            c()
        bench._sync(device)
        t0 = time.perf_counter()
        calls[0]()
        bench._sync(device)
        est = max(time.perf_counter() - t0, 1e-6)
        rotation = itertools.cycle(calls)

        def target():
            next(rotation)()
            bench._sync(device)

        def setup():
            if scratch is not None:
                scratch.zero_()
            bench._sync(device)

        rounds = int(min(300, max(3, TARGET_S / est)))
        benchmark.pedantic(target, setup=setup if cuda else None, rounds=rounds, warmup_rounds=0, iterations=1)
    if benchmark.stats is not None:                        # None under --benchmark-disable
        benchmark.extra_info["GB/s"] = round(sets[0].nbytes / benchmark.stats.stats.median / 1e9, 2)


# =========================================================================== report


@dataclass
class Row:
    d: int
    V: int
    M: int
    k: int
    dtype: str
    backend: str
    status: str = "ok"            # ok | n/a | WRONG
    reason: str = ""
    median_us: Optional[float] = None
    bytes: int = 0
    gbps: Optional[float] = None
    pct_of_bound: Optional[float] = None
    vs_full: Optional[float] = None
    vs_subset: Optional[float] = None
    kernels_per_call: Optional[float] = None
    extra: dict = field(default_factory=dict)


def measure(grid: dict, backends: list[str], device, log=print) -> tuple[dict, list[Row]]:
    dev = torch.device(device)
    log("measuring copy bandwidth ...")
    bw = bench.peak_bandwidth(dev)
    skipped = {b: unsupported_reason(b, dev) for b in backends}
    backends = [b for b in backends if skipped[b] is None]
    meta = {"device": bench.device_name(dev), "device_type": dev.type, "peak_bytes_per_s": bw["peak"],
            "peak_source": bw["source"], "versions": bench.versions(), "git": bench.git_revision(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "grid": grid, "backends": backends, "not_measured": {b: w for b, w in skipped.items() if w},
            "command": " ".join(["python", "perf/bench_lm_head.py", *sys.argv[1:]])}
    rows: list[Row] = []
    target_s = 0.2 if dev.type == "cuda" else 0.3
    for (d, V, M, k, dt) in configs(grid):
        sets = build_sets(d, V, M, dt, dev)
        _, flush = bench.input_sets_for(sets[0].input_bytes(), dev)
        ref = reference_logprobs(sets[0], k)
        per: dict[str, Row] = {}
        for backend in backends:
            r = Row(d, V, M, k, dt, backend, bytes=sets[0].nbytes)
            with backend_context(backend):
                calls = [make_call(p, k, backend) for p in sets]
                try:
                    out = calls[0]()
                except Exception as e:  # noqa: BLE001 - an unsupported shape is a row, not a crash
                    r.status, r.reason = "n/a", bench._first_line(e)
                    rows.append(r)
                    continue
                if backend != "full":
                    err, ok = check_output(out, ref, dt)
                    r.extra["max_abs_err"] = err
                    if not ok:
                        r.status, r.reason = "WRONG", f"top-k logprobs off by {err:.3g}"
                times = bench.time_calls(calls, dev, target_s=target_s, flush=flush)
                if backend in KERNEL_BACKENDS and M == 1 and dev.type == "cuda":
                    r.kernels_per_call, _, _ = bench.count_launches(calls[0], dev)
            r.median_us = statistics.median(times) * 1e6
            r.gbps = r.bytes / (r.median_us * 1e-6) / 1e9
            r.pct_of_bound = 100 * (r.bytes / bw["peak"]) / (r.median_us * 1e-6)
            per[backend] = r
            rows.append(r)
        for r in per.values():
            for base, attr in (("full", "vs_full"), ("subset", "vs_subset")):
                if base in per and r.median_us:
                    setattr(r, attr, per[base].median_us / r.median_us)
        log("  ".join(f"d={d} V={V} M={M} k={k} {dt} {r.backend}: {bench._fmt_us(r.median_us)} µs "
                      f"{bench._fmt(r.pct_of_bound, '.0f')}% ×{bench._fmt_x(r.vs_full)} full"
                      for r in per.values()))
        del sets
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return meta, rows


def render_markdown(meta: dict, rows: list[Row]) -> str:
    v = meta["versions"]
    lines = [f"# lm_head_topk microbenchmarks — {meta['device']}", "",
             f"{meta['date']}, git {meta['git']}, torch {v.get('torch')}, triton {v.get('triton')}"
             + (f", CUDA {v['cuda']}" if "cuda" in v else ""), "",
             f"Command: `{meta['command']}`", "",
             f"Bytes = subset weight + hidden ((V_sub + M)·d·bytes); % of bound against "
             f"{meta['peak_bytes_per_s'] / 1e9:.0f} GB/s ({meta['peak_source']}). "
             "×full / ×subset: speedup over the full-vocabulary torch path (matmul over the whole head, "
             "log_softmax, topk) and over the unfused subset path (matmul on the slice, log_softmax, topk), "
             "measured in the same run. Temperature 0.8 on every row; token_map given.", ""]
    for b, why in meta["not_measured"].items():
        lines.append(f"- {b}: not measured ({why})")
    lines += ["", "| d | V_sub | M | k | dtype | backend | median µs | GB/s | % of bound | ×full | ×subset | kernels |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.status == "n/a":
            lines.append(f"| {r.d} | {r.V} | {r.M} | {r.k} | {r.dtype} | {r.backend} | n/a ({r.reason}) |"
                         " | | | | |")
            continue
        flag = " WRONG" if r.status == "WRONG" else ""
        lines.append(f"| {r.d} | {r.V} | {r.M} | {r.k} | {r.dtype} | {r.backend}{flag} | {bench._fmt_us(r.median_us)} "
                     f"| {bench._fmt(r.gbps, '.0f')} | {bench._fmt(r.pct_of_bound, '.1f')} | {bench._fmt_x(r.vs_full)} "
                     f"| {bench._fmt_x(r.vs_subset)} | {bench._fmt(r.kernels_per_call, 'g', '')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="lm_head_topk microbenchmarks → perf/results")
    ap.add_argument("--quick", action="store_true", help="the quick grid")
    ap.add_argument("--backends", default=None, help="comma-separated subset of " + ",".join(BASELINES + KERNEL_BACKENDS))
    ap.add_argument("--out", default=None, help="output folder (default perf/results)")
    args = ap.parse_args(argv)
    dev = bench.default_device()
    backends = args.backends.split(",") if args.backends else default_backends(dev)
    meta, rows = measure(default_grid(dev, args.quick), backends, dev)
    stem = bench.write_rows_report(meta, rows, render_markdown(meta, rows), "lm-head",
                                   lambda r: f"{r.backend} d={r.d} V={r.V} M={r.M} k={r.k}", out_dir=args.out, device=dev)
    print(f"wrote {stem}.md, .json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
