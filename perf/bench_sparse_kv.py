"""Microbenchmarks of ``sparse_kv_attention`` and ``select_kv_chunks`` (sparse-KV
self-speculation): pytest-benchmark suite, and a report when run as a script.

    python perf/bench_sparse_kv.py [--quick] [--backends triton,cuda,torch] [--out DIR]
                                   # → perf/results/<device>-<date>-sparse-kv.{md,json}
    python -m pytest perf/bench_sparse_kv.py --benchmark-only     # FASTVERIFY_BENCH_QUICK=1: quick grid

Problem, per (B, context, dtype): B requests of ``context`` keys each (a multiple of the
chunk size: no tail), Hq = 32, Hkv = 8, D = 128, a paged cache ``[num_pages, 16, Hkv, D]``
with the pages of all requests shuffled, q/K/V ``randn`` in the dtype. Per budget (tokens),
C = budget / 16 chunks of 16 tokens per (request, KV head): distinct random full chunks,
ascending (what select_kv_chunks returns; every slot filled). Two chunk-id sets are rotated
through the timing.

Rows, all on the same data in the same run:

* ``sparse_kv_attention`` through the public op on each kernel backend of the device:
  ``triton``, ``cuda`` (when ``fastverify._cuda`` has the op and it runs) and ``torch``
  (on CPU: the torch backend only; the Triton interpreter is far too slow to time);
* ``gather+sdpa`` — an engine without a sparse kernel: gather the selected chunks' K/V
  from the pages into contiguous ``[B, Hkv, C·16, D]`` tensors (one advanced-index copy
  each, positions from chunk_ids and block_table), then
  ``F.scaled_dot_product_attention(..., enable_gqa=True)`` (no mask: every slot holds a
  chunk and there is no tail — the baseline's best case). Gather inside the timing.
* ``full`` — full decode attention over all ``context`` keys: ``fastverify.tree_attention``
  with one node per request on the device's default backend (triton on CUDA, torch on
  CPU), what the target model's decode step pays. Once per (B, context).
* ``select_kv_chunks`` on the kernel backends (on CUDA: triton and cuda; on CPU: torch):
  ``means`` — with ``chunk_means`` given (the decode-loop path: means maintained
  incrementally), ``recompute`` — means computed from the cache (reads every full chunk).
  1 sink, 1 recent chunk.

Bytes: sparse rows: the selected K and V, ``B·Hkv·C·16·D·2·bytes`` (the physical bound; q
and out left out); full: ``B·context·Hkv·D·2·bytes``; select means: ``B·F·Hkv·D·4``
(fp32 means), recompute: ``B·context·Hkv·D·bytes`` (K only). % of bound = (bytes / peak
bandwidth) / time, peak as in ``fastverify/bench.py`` (datasheet HBM figure on
H100/H200/A100, else measured copy bandwidth; on CPU the measured CPU copy bandwidth).
×full and ×gather: that row's time over the sparse row's, measured in the same run.

Timing: ``fastverify.bench.time_calls`` (CUDA events per call, median; the L2 is flushed
between calls on CUDA, since a sparse call touches few bytes; perf_counter on CPU).
Correctness: each sparse row's output on the first id set is compared with the torch
backend's (fp32 math); a row off by more than the tolerance is marked WRONG.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import math
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
from fastverify.bench import _first_line, _fmt, _fmt_us, _fmt_x

HQ, HKV, HEAD_DIM, PAGE, CHUNK = 32, 8, 128, 16, 16
GPU_GRID = {"B": (1, 8, 32), "ctx": (8192, 32768, 131072), "budget": (256, 1024, 4096), "dtype": ("bf16",)}
GPU_QUICK_GRID = {"B": (1, 32), "ctx": (32768,), "budget": (1024,), "dtype": ("bf16",)}
CPU_GRID = {"B": (1, 4), "ctx": (2048, 8192), "budget": (256, 1024), "dtype": ("fp32",)}
CPU_QUICK_GRID = {"B": (1,), "ctx": (4096,), "budget": (256,), "dtype": ("fp32",)}
KERNEL_BACKENDS = ("triton", "cuda", "torch")
GATHER = "gather+sdpa"
TOLERANCE = {"bf16": (2e-2, 2e-2), "fp16": (2e-3, 2e-3), "fp32": (1e-4, 1e-4)}   # (atol, rtol) vs torch backend
ID_SETS = 2
TARGET_S = 0.25


def default_grid(device, quick: bool = False) -> dict:
    gpu = torch.device(device).type == "cuda"
    return dict((GPU_QUICK_GRID if quick else GPU_GRID) if gpu else (CPU_QUICK_GRID if quick else CPU_GRID))


def default_backends(device) -> list[str]:
    return list(KERNEL_BACKENDS) if torch.device(device).type == "cuda" else ["torch"]


_CUDA_STATUS: dict = {}


def unsupported_reason(backend: str, device) -> Optional[str]:
    """Why a kernel backend is not timed on ``device`` (None: it is)."""
    dev = torch.device(device)
    if backend == "torch":
        return None
    if dev.type != "cuda":
        return bench.unsupported_reason(backend, dev)
    if backend == "cuda":
        if "x" not in _CUDA_STATUS:
            try:
                from fastverify import _cuda
                if not callable(getattr(_cuda, "sparse_kv_attention", None)):
                    _CUDA_STATUS["x"] = "fastverify._cuda has no sparse_kv_attention"
                else:
                    c = build_cache(1, 256, "bf16", dev)
                    with fastverify.use_backend("cuda"):
                        run_sparse(c, chunk_id_sets(c, 4)[0])
                    torch.cuda.synchronize(dev)
                    _CUDA_STATUS["x"] = None
            except Exception as e:  # noqa: BLE001 - any failure to import/build/run means "unavailable"
                _CUDA_STATUS["x"] = "build/load/run failed: " + _first_line(e)
        return _CUDA_STATUS["x"]
    return None


# =========================================================================== problems


@dataclass
class Cache:
    """One (B, context, dtype) problem: the paged cache, queries and chunk means."""
    B: int
    ctx: int
    dtype: str
    q: torch.Tensor                # [B, Hq, D]
    k_cache: torch.Tensor          # [B·pages, PAGE, Hkv, D], pages shuffled
    v_cache: torch.Tensor
    block_table: torch.Tensor      # [B, pages] int32
    seq_lens: torch.Tensor         # [B] int32 (= ctx)
    cu_num_nodes: torch.Tensor     # [B + 1] int32: one node per request (full decode attention)
    tree_mask: torch.Tensor        # [B, 1] int64
    chunk_means: torch.Tensor      # [B, F, Hkv, D] fp32

    @property
    def elem(self) -> int:
        return self.k_cache.element_size()

    @property
    def full_chunks(self) -> int:
        return self.ctx // CHUNK


def build_cache(B: int, ctx: int, dtype: str, device, seed: int = 0) -> Cache:
    dev = torch.device(device)
    dt = bench.DTYPES[dtype]
    g = torch.Generator(device=dev).manual_seed(seed)
    pages = -(-ctx // PAGE)
    P = B * pages
    table = torch.randperm(P, generator=g, device=dev).view(B, pages).to(torch.int32)
    k = torch.randn(P, PAGE, HKV, HEAD_DIM, generator=g, device=dev, dtype=dt)
    v = torch.randn(P, PAGE, HKV, HEAD_DIM, generator=g, device=dev, dtype=dt)
    q = torch.randn(B, HQ, HEAD_DIM, generator=g, device=dev, dtype=dt)
    F = ctx // CHUNK
    means = torch.stack([k[table[b].long()].flatten(0, 1)[:F * CHUNK].view(F, CHUNK, HKV, HEAD_DIM)
                         .float().mean(1) for b in range(B)])
    return Cache(B, ctx, dtype, q, k, v, table, torch.full((B,), ctx, dtype=torch.int32, device=dev),
                 torch.arange(B + 1, dtype=torch.int32, device=dev), torch.ones(B, 1, dtype=torch.int64, device=dev),
                 means)


def chunk_id_sets(c: Cache, C: int) -> list[torch.Tensor]:
    """ID_SETS sets of [B, Hkv, C] int32 distinct random full chunks, ascending."""
    out = []
    for s in range(ID_SETS):
        g = torch.Generator(device=c.q.device).manual_seed(100 + s)
        r = torch.rand(c.B, HKV, c.full_chunks, generator=g, device=c.q.device)
        out.append(r.topk(C, dim=2).indices.sort(2).values.to(torch.int32))
    return out


def sparse_bytes(c: Cache, C: int) -> int:
    return c.B * HKV * C * CHUNK * HEAD_DIM * 2 * c.elem


def full_bytes(c: Cache) -> int:
    return c.B * c.ctx * HKV * HEAD_DIM * 2 * c.elem


def run_sparse(c: Cache, ids: torch.Tensor) -> torch.Tensor:
    return fastverify.sparse_kv_attention(c.q, c.k_cache, c.v_cache, c.block_table, c.seq_lens, ids,
                                          chunk_size=CHUNK)


def run_full(c: Cache) -> torch.Tensor:
    return fastverify.tree_attention(c.q, c.k_cache, c.v_cache, c.block_table, c.seq_lens, c.cu_num_nodes,
                                     c.tree_mask)


def run_select(c: Cache, C: int, means: bool) -> torch.Tensor:
    return fastverify.select_kv_chunks(c.q, c.k_cache, c.block_table, c.seq_lens, chunk_size=CHUNK, num_chunks=C,
                                       chunk_means=c.chunk_means if means else None)


def gather_sdpa(q, k_cache, v_cache, block_table, chunk_ids):
    """Baseline ``gather+sdpa``: the selected chunks' K/V copied out of the pages into
    [B, Hkv, C·CHUNK, D], then SDPA with GQA (every slot a chunk, no tail: no mask)."""
    B, Hkv, C = chunk_ids.shape
    pos = (chunk_ids.long()[..., None] * CHUNK + torch.arange(CHUNK, device=q.device)).flatten(2)   # [B, Hkv, N]
    page = block_table.gather(1, (pos // PAGE).view(B, -1)).view(pos.shape).long()
    slot = pos % PAGE
    h = torch.arange(Hkv, device=q.device)[None, :, None]
    k, v = k_cache[page, slot, h], v_cache[page, slot, h]                                          # [B, Hkv, N, D]
    o = torch.nn.functional.scaled_dot_product_attention(q[:, :, None, :], k, v, enable_gqa=True)
    return o[:, :, 0, :]


def backend_context(backend: str):
    return fastverify.use_backend(backend) if backend in KERNEL_BACKENDS else contextlib.nullcontext()


def check_output(out: torch.Tensor, ref: torch.Tensor, dtype: str) -> tuple[float, bool]:
    atol, rtol = TOLERANCE[dtype]
    err = float((out.float() - ref).abs().max())
    return err, math.isfinite(err) and err <= atol + rtol * float(ref.abs().max())


# =========================================================================== pytest-benchmark

DEVICE = bench.default_device()
QUICK = os.environ.get("FASTVERIFY_BENCH_QUICK", "0") not in ("", "0")
GRID = default_grid(DEVICE, QUICK)
CASES = [pytest.param(B, ctx, budget, dt, backend, id=f"sparse-kv-B{B}-ctx{ctx}-budget{budget}-{dt}-{backend}")
         for dt in GRID["dtype"] for B in GRID["B"] for ctx in GRID["ctx"] for budget in GRID["budget"]
         for backend in default_backends(DEVICE) + [GATHER]]


class _Config:
    """The (B, context, dtype) problem being benchmarked; one at a time (GPU caches reach GBs)."""

    key = cache = None

    @classmethod
    def get(cls, B, ctx, dtype, device) -> Cache:
        if (B, ctx, dtype) != cls.key:
            cls.key = cls.cache = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            cls.cache = build_cache(B, ctx, dtype, device)
            cls.key = (B, ctx, dtype)
        return cls.cache


@pytest.mark.parametrize("B,ctx,budget,dtype,backend", CASES)
def test_sparse_kv_attention(benchmark, B, ctx, budget, dtype, backend):
    device = DEVICE
    why = unsupported_reason(backend, device) if backend != GATHER else None
    if why is not None:
        pytest.skip(why)
    c = _Config.get(B, ctx, dtype, device)
    C = budget // CHUNK
    id_sets = chunk_id_sets(c, C)
    benchmark.group = f"sparse_kv_attention B={B} ctx={ctx} budget={budget} {dtype}"
    benchmark.extra_info.update(B=B, ctx=ctx, budget=budget, dtype=dtype, backend=backend, bytes=sparse_bytes(c, C))
    with fastverify.use_backend("torch"):
        ref = run_sparse(c, id_sets[0]).float()
    with backend_context(backend):
        if backend == GATHER:
            calls = [lambda ids=ids: gather_sdpa(c.q, c.k_cache, c.v_cache, c.block_table, ids) for ids in id_sets]
        else:
            calls = [lambda ids=ids: run_sparse(c, ids) for ids in id_sets]
        err, ok = check_output(calls[0](), ref, dtype)
        benchmark.extra_info["max_abs_err"] = err
        if not ok:
            pytest.fail(f"WRONG: {backend} output off by {err:.3g}")
        scratch = torch.empty(2 * bench.l2_bytes(device), dtype=torch.uint8, device=device) \
            if device.type == "cuda" else None
        rotation = itertools.cycle(calls)

        def target():
            next(rotation)()
            bench._sync(device)

        def setup():
            if scratch is not None:
                scratch.zero_()
            bench._sync(device)

        t0 = time.perf_counter()
        target()
        rounds = int(min(300, max(3, TARGET_S / max(time.perf_counter() - t0, 1e-6))))
        benchmark.pedantic(target, setup=setup if scratch is not None else None, rounds=rounds, warmup_rounds=1,
                           iterations=1)
    if benchmark.stats is not None:
        benchmark.extra_info["GB/s"] = round(sparse_bytes(c, C) / benchmark.stats.stats.median / 1e9, 2)


# =========================================================================== report


@dataclass
class Row:
    op: str                       # sparse | full | select_means | select_recompute
    B: int
    ctx: int
    budget: Optional[int]
    dtype: str
    backend: str
    status: str = "ok"            # ok | n/a | WRONG
    reason: str = ""
    median_us: Optional[float] = None
    bytes: int = 0
    gbps: Optional[float] = None
    pct_of_bound: Optional[float] = None
    vs_full: Optional[float] = None
    vs_gather: Optional[float] = None
    kernels_per_call: Optional[float] = None
    extra: dict = field(default_factory=dict)


def _time(row: Row, calls: list[Callable], dev, target_s: float, bw: dict, count: bool = False) -> Row:
    """Fill ``row`` with the median time of ``calls`` (rotated) and the derived numbers."""
    try:
        times = bench.time_calls(calls, dev, target_s=target_s, flush=dev.type == "cuda")
    except Exception as e:  # noqa: BLE001 - an unsupported shape is a row, not a crash
        row.status, row.reason = "n/a", _first_line(e)
        return row
    row.median_us = statistics.median(times) * 1e6
    row.gbps = row.bytes / (row.median_us * 1e-6) / 1e9
    row.pct_of_bound = 100 * (row.bytes / bw["peak"]) / (row.median_us * 1e-6)
    if count and dev.type == "cuda":
        row.kernels_per_call, _, _ = bench.count_launches(calls[0], dev)
    return row


def configs(grid: dict):
    return [(dt, B, ctx) for dt in grid["dtype"] for B in grid["B"] for ctx in grid["ctx"]]


def measure(grid: dict, backends: list[str], device, log=print) -> tuple[dict, list[Row]]:
    dev = torch.device(device)
    busy = bench.cores_busy_elsewhere() if dev.type == "cpu" else None
    if busy is not None and busy > 0.3:
        log(f"note: other processes keep {busy:.1f} of {os.cpu_count()} cores busy; CPU numbers will be noisy "
            "(try --threads 1)")
    log("measuring copy bandwidth ...")
    bw = bench.peak_bandwidth(dev)
    skipped = {b: unsupported_reason(b, dev) for b in backends}
    backends = [b for b in KERNEL_BACKENDS if b in backends and skipped[b] is None]
    select_backends = [b for b in backends if b != "torch"] if dev.type == "cuda" else ["torch"]
    full_backend = fastverify.get_backend(dev)
    meta = {"device": bench.device_name(dev), "device_type": dev.type, "peak_bytes_per_s": bw["peak"],
            "peak_source": bw["source"], "l2_bytes": bench.l2_bytes(dev) or None, "versions": bench.versions(),
            "git": bench.git_revision(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "grid": grid, "backends": backends, "select_backends": select_backends, "full_backend": full_backend,
            "not_measured": {b: w for b, w in skipped.items() if w},
            "shape": {"Hq": HQ, "Hkv": HKV, "D": HEAD_DIM, "page": PAGE, "chunk": CHUNK},
            "command": " ".join(["python", "perf/bench_sparse_kv.py", *sys.argv[1:]]),
            "torch_threads": torch.get_num_threads(), "cores_busy_elsewhere_at_start": busy}
    rows: list[Row] = []
    target_s = 0.2 if dev.type == "cuda" else 0.3
    t_start = time.perf_counter()
    for dt, B, ctx in configs(grid):
        c = build_cache(B, ctx, dt, dev)
        full = Row("full", B, ctx, None, dt, f"tree_attention ({full_backend})", bytes=full_bytes(c))
        with fastverify.use_backend(full_backend):
            _time(full, [lambda c=c: run_full(c)], dev, target_s, bw)
        rows.append(full)
        log(f"B={B} ctx={ctx} {dt} full: {_fmt_us(full.median_us)} µs {_fmt(full.pct_of_bound, '.0f')}% of bound")
        for budget in grid["budget"]:
            C = budget // CHUNK
            if C > c.full_chunks:
                continue
            id_sets = chunk_id_sets(c, C)
            with fastverify.use_backend("torch"):
                ref = run_sparse(c, id_sets[0]).float()
            per: dict[str, Row] = {}
            for backend in [GATHER] + backends:
                r = Row("sparse", B, ctx, budget, dt, backend, bytes=sparse_bytes(c, C))
                with backend_context(backend):
                    if backend == GATHER:
                        calls = [lambda c=c, ids=ids: gather_sdpa(c.q, c.k_cache, c.v_cache, c.block_table, ids)
                                 for ids in id_sets]
                    else:
                        calls = [lambda c=c, ids=ids: run_sparse(c, ids) for ids in id_sets]
                    try:
                        err, ok = check_output(calls[0](), ref, dt)
                    except Exception as e:  # noqa: BLE001
                        r.status, r.reason = "n/a", _first_line(e)
                        rows.append(r)
                        continue
                    r.extra["max_abs_err"] = err
                    if not ok:
                        r.status, r.reason = "WRONG", f"output off by {err:.3g} vs the torch backend"
                    _time(r, calls, dev, target_s, bw, count=backend in KERNEL_BACKENDS and B == 1)
                per[backend] = r
                rows.append(r)
            for r in per.values():
                if r.median_us:
                    r.vs_full = full.median_us / r.median_us if full.median_us else None
                    g = per.get(GATHER)
                    r.vs_gather = g.median_us / r.median_us if g is not None and g.median_us else None
            for backend in select_backends:
                for means in (True, False):
                    op = "select_means" if means else "select_recompute"
                    nbytes = (B * c.full_chunks * HKV * HEAD_DIM * 4) if means else (B * ctx * HKV * HEAD_DIM * c.elem)
                    r = Row(op, B, ctx, budget, dt, backend, bytes=nbytes)
                    with backend_context(backend):
                        _time(r, [lambda c=c, C=C, means=means: run_select(c, C, means)], dev, target_s, bw,
                              count=B == 1 and means)
                    rows.append(r)
            log("  ".join(f"B={B} ctx={ctx} budget={budget} {r.backend}: {_fmt_us(r.median_us)} µs "
                          f"{_fmt(r.pct_of_bound, '.0f')}% ×{_fmt_x(r.vs_full)} full ×{_fmt_x(r.vs_gather)} gather"
                          for r in per.values()))
        c = None                                  # free the cache before the next configuration
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    meta["elapsed_s"] = time.perf_counter() - t_start
    return meta, rows


def render_markdown(meta: dict, rows: list[Row]) -> str:
    v = meta["versions"]
    s = meta["shape"]
    lines = [f"# sparse_kv_attention / select_kv_chunks microbenchmarks — {meta['device']}", "",
             f"{meta['date']}, git {meta['git']}, torch {v.get('torch')}, triton {v.get('triton')}"
             + (f", CUDA {v['cuda']}" if "cuda" in v else ""), "",
             f"Command: `{meta['command']}`", "",
             f"Hq = {s['Hq']}, Hkv = {s['Hkv']}, D = {s['D']}, page {s['page']}, chunk {s['chunk']}; every request "
             f"holds `context` keys (pages shuffled); budget = selected chunks × {s['chunk']} tokens (random distinct "
             "chunks per KV head, no tail). Bytes of a sparse row = the selected K/V; % of bound against "
             f"{meta['peak_bytes_per_s'] / 1e9:,.0f} GB/s ({meta['peak_source']}). ×full: full decode attention "
             f"(tree_attention, one node, {meta['full_backend']} backend) time over the row's; ×gather: the "
             "gather+sdpa baseline (K/V of the selected chunks copied out of the pages, then SDPA with GQA) over "
             "the row's; all measured in the same run. "
             + ("CUDA events, L2 flushed between calls." if meta["device_type"] == "cuda" else
                f"CPU: perf_counter per call (torch backends include the CPU value checks); "
                f"{meta['torch_threads']} torch threads, other processes kept "
                f"{_fmt(meta['cores_busy_elsewhere_at_start'], '.1f')} cores busy at start."), ""]
    for b, why in meta["not_measured"].items():
        lines.append(f"- {b}: not measured ({why})")
    lines += ["", "## sparse_kv_attention", "",
              "| B | context | budget | dtype | backend | median µs | GB/s | % of bound | ×full | ×gather | kernels |",
              "|--:|--:|--:|:--|:--|--:|--:|--:|--:|--:|--:|"]
    for r in (r for r in rows if r.op == "sparse"):
        if r.status == "n/a":
            lines.append(f"| {r.B} | {r.ctx} | {r.budget} | {r.dtype} | {r.backend} | n/a ({r.reason}) | | | | | |")
            continue
        flag = " WRONG" if r.status == "WRONG" else ""
        lines.append(f"| {r.B} | {r.ctx} | {r.budget} | {r.dtype} | {r.backend}{flag} | {_fmt_us(r.median_us)} | "
                     f"{_fmt(r.gbps, '.1f')} | {_fmt(r.pct_of_bound, '.1f')} | {_fmt_x(r.vs_full)} | "
                     f"{_fmt_x(r.vs_gather)} | {_fmt(r.kernels_per_call, 'g', '')} |")
    lines += ["", "## full decode attention (the baseline of ×full)", "",
              "| B | context | dtype | backend | median µs | GB/s | % of bound |", "|--:|--:|:--|:--|--:|--:|--:|"]
    for r in (r for r in rows if r.op == "full"):
        lines.append(f"| {r.B} | {r.ctx} | {r.dtype} | {r.backend} | {_fmt_us(r.median_us)} | {_fmt(r.gbps, '.1f')} | "
                     f"{_fmt(r.pct_of_bound, '.1f')} |")
    lines += ["", "## select_kv_chunks (1 sink, 1 recent chunk)", "",
              "means: chunk_means given (bytes = the fp32 means); recompute: means from the cache (bytes = all K).", "",
              "| B | context | budget | dtype | backend | means µs | means GB/s | recompute µs | recompute GB/s | "
              "recompute % of bound | kernels |", "|--:|--:|--:|:--|:--|--:|--:|--:|--:|--:|--:|"]
    sel = {}
    for r in rows:
        if r.op.startswith("select"):
            sel.setdefault((r.B, r.ctx, r.budget, r.dtype, r.backend), {})[r.op] = r
    for (B, ctx, budget, dt, backend), d in sel.items():
        m, rc = d.get("select_means"), d.get("select_recompute")
        lines.append(f"| {B} | {ctx} | {budget} | {dt} | {backend} | {_fmt_us(m and m.median_us)} | "
                     f"{_fmt(m and m.gbps, '.1f')} | {_fmt_us(rc and rc.median_us)} | {_fmt(rc and rc.gbps, '.1f')} | "
                     f"{_fmt(rc and rc.pct_of_bound, '.1f')} | {_fmt(m and m.kernels_per_call, 'g', '')} |")
    lines.append(f"\nElapsed: {meta.get('elapsed_s', 0):.0f} s.")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="sparse_kv_attention / select_kv_chunks microbenchmarks → perf/results")
    ap.add_argument("--quick", action="store_true", help="the quick grid")
    ap.add_argument("--backends", default=None, help="comma-separated subset of " + ",".join(KERNEL_BACKENDS))
    ap.add_argument("--out", default=None, help="output folder (default perf/results)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = bench.default_device()
    backends = args.backends.split(",") if args.backends else default_backends(dev)
    meta, rows = measure(default_grid(dev, args.quick), backends, dev)
    stem = bench.write_rows_report(meta, rows, render_markdown(meta, rows), "sparse-kv",
                                   lambda r: f"{r.op}/{r.backend} B={r.B} ctx={r.ctx} budget={r.budget}", out_dir=args.out, device=dev)
    print(f"wrote {stem}.md, .json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
