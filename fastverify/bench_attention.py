"""Microbenchmark of tree attention (``fastverify.tree_attention``) and the report it
produces. Used by ``fastverify bench --family attention`` (``fastverify/cli.py``) and the
pytest-benchmark suite ``perf/bench_attention.py``. Speed is reported, never asserted.
Timing, bandwidth and report helpers come from :mod:`fastverify.bench`.

Problem, per (B, P, n, dtype): B requests, each a prefix of P tokens followed by its
own draft tree of n nodes (EAGLE-like random tree: max depth ``round(log2 n) + 2``,
every level non-empty, wider levels near the root, top-ranked nodes of a level more
likely to be expanded; parents precede children; each request its own tree). Hq = 32,
Hkv = 8, D = 128, a paged cache ``[num_pages, 16, Hkv, D]`` with the pages of all
requests shuffled, q/K/V ``randn`` in the dtype, ``tree_mask`` from
``fastverify.build_tree`` (run on the host with the torch backend, then copied to the
device), q ``[B·n, Hq, D]``. The input sets rotated through the timing
share the trees (so one FlexAttention block mask serves them all) and differ in
q/K/V and page order.

What is timed (all on the same data, in the same run):

* ``sdpa`` — an engine without a tree kernel: gather each request's K/V from the
  pages (one ``index_select`` of the request's pages into a contiguous buffer
  ``[B, P+n, Hkv, D]``, viewed as ``[B, Hkv, P+n, D]``), unpack the ancestor bits of
  ``tree_mask`` into the dense boolean mask ``[B, 1, n, P+n]`` (prefix all True),
  ``F.scaled_dot_product_attention(..., attn_mask=mask, enable_gqa=True)`` (or
  ``repeat_interleave`` of the KV heads without ``enable_gqa``), and the output back to
  ``[B·n, Hq, D]``. Gather and mask building are inside the timing.
* ``flex`` — FlexAttention (``torch.nn.attention.flex_attention``) compiled with
  ``torch.compile(dynamic=False)`` (one static compile per configuration, the fastest
  kernels it makes), over the same gathered K/V (the gather is inside the timing, as
  for sdpa; the gather alone is reported as "gather µs"), ``mask_mod`` = prefix or
  ancestor bit. ``create_block_mask`` (unpacking the bits included) is timed apart —
  median of 3 after a warm-up, once per configuration — and is not in the flex time.
* ``torch`` — fastverify's torch backend through the public op (on CPU tensors the op
  also runs its value checks; on CUDA it reads ``cu_num_nodes`` back to loop over the
  requests), the reference of the correctness check;
* ``triton`` and ``cuda`` — the kernel backends, on CUDA only (Triton on CPU runs only
  under its interpreter; a missing ``fastverify._cuda.tree_attention`` or a failing
  build is reported as not measured, with the reason).

Correctness: on the first input set every backend's output is compared with the torch
backend's: max abs error, and a row whose error exceeds ``atol + rtol·max|ref|`` (per
dtype, :data:`TOLERANCE`) or is not finite is marked WRONG and given no speed numbers
in the report (the JSON keeps them).

Bytes = B·P·Hkv·D·2·bytes_per_elem: each request's prefix K and V read once (the
physical bound; the tree's own K/V, q and out are left out). % of bound as in
:mod:`fastverify.bench`. On CUDA, a baseline whose estimated GPU working set
(:func:`baseline_bytes_estimate`; for sdpa with SDPA's math path unless a fused SDPA
kernel accepts the layout) exceeds :data:`BASELINE_MEM_LIMIT` is skipped, and the
report says so; the kernel backends are still measured there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib
import json
import math
import os
import random
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

import fastverify
from fastverify import bench
from fastverify.bench import _first_line, _fmt, _fmt_us, _fmt_x, _sync

FAMILY = "attention"
HQ, HKV, HEAD_DIM, PAGE = 32, 8, 128, 16

BASELINES = ("sdpa", "flex")
KERNEL_BACKENDS = ("torch", "triton", "cuda")
ALL_BACKENDS = BASELINES + KERNEL_BACKENDS          # measuring order: speedups need sdpa, flex, torch first
DTYPES = bench.DTYPES

GPU_GRID = {"B": (1, 8, 32), "P": (1024, 8192, 32768), "n": (8, 32, 64, 128), "dtype": ("bf16",)}
GPU_QUICK_GRID = {"B": (8,), "P": (8192,), "n": (64,), "dtype": ("bf16",), "extra": ((1, 1024, 8, "bf16"),)}
CPU_GRID = {"B": (1, 4), "P": (512, 2048), "n": (8, 32), "dtype": ("fp32",)}
CPU_QUICK_GRID = {"B": (1, 4), "P": (512,), "n": (8,), "dtype": ("fp32",)}

TARGET_CONFIG = {"B": 8, "P": 8192, "n": 64, "dtype": "bf16"}
TARGET_PCT_OF_BOUND = 70.0
TARGET_VS_FLEX = 2.0
TARGET_VS_SDPA = 5.0
TARGET_BACKENDS = ("triton", "cuda")

BASELINE_MEM_LIMIT = 40e9        # bytes; sdpa/flex are skipped above this estimated working set (CUDA)
TOLERANCE = {"bf16": (1e-2, 2e-2), "fp16": (2e-3, 5e-3), "fp32": (1e-4, 2e-3)}    # (atol, rtol · max|ref|)
BLOCK_MASK_REPS = 3
FLEX_MAX_FAILURES = 3            # flex is no longer tried after this many failed configs (compiles are slow)
TOP_K = 10                       # most children of the root in the benchmark trees (EAGLE-2's top-k)


# =========================================================================== inputs


def tree_depth_for(n: int) -> int:
    """Max depth of the benchmark tree of n nodes: round(log2 n) + 2, at most n - 1."""
    if n <= 1:
        return 0
    return max(1, min(n - 1, round(math.log2(n)) + 2))


def eagle_parents(n: int, rng: random.Random) -> list[int]:
    """Tree-local parents of an EAGLE-like draft tree of n nodes, numbered level by
    level (so parents precede children): depth :func:`tree_depth_for`, at most
    :data:`TOP_K` children of the root, deeper level sizes proportional to
    (depth - d + 1) with at least one node each, and each node's parent
    drawn from the previous level with weight 1 / (rank + 1) (the top-ranked drafts
    are expanded most)."""
    if n < 1:
        raise ValueError("a tree needs n >= 1 nodes")
    depth = tree_depth_for(n)
    if depth == 0:
        return [-1]
    w = [depth - d + 1 for d in range(1, depth + 1)]
    first = min(TOP_K, max(1, round((n - 1) * w[0] / sum(w))), n - depth)
    rest = n - 1 - first
    sizes = [first] + [max(1, round(rest * x / sum(w[1:]))) for x in w[1:]]
    while sum(sizes) > n - 1:                       # fix the rounding: trim the widest deeper level ...
        i = max(range(1, depth), key=lambda k: sizes[k])
        sizes[i] -= 1
    while sum(sizes) < n - 1:                       # ... or grow the second level (the first when alone)
        sizes[min(1, depth - 1)] += 1
    parents = [-1]
    prev = [0]
    for size in sizes:
        weights = [1.0 / (r + 1) for r in range(len(prev))]
        chosen = sorted(rng.choices(range(len(prev)), weights=weights, k=size))
        level = []
        for c in chosen:                             # siblings adjacent, in their parent's rank order
            parents.append(prev[c])
            level.append(len(parents) - 1)
        prev = level
    assert len(parents) == n
    return parents


def max_depth(parents: list[int]) -> int:
    d = [0] * len(parents)
    for j in range(1, len(parents)):
        d[j] = d[parents[j]] + 1
    return max(d)


@dataclass
class AttnProblem:
    """One input set of tree attention."""

    B: int
    P: int
    n: int
    dtype: str
    q: torch.Tensor                  # [B·n, Hq, D]
    k_cache: torch.Tensor            # [num_pages, PAGE, Hkv, D]
    v_cache: torch.Tensor
    block_table: torch.Tensor        # [B, pages per request] int32
    seq_lens: torch.Tensor           # [B] int32 = P + n
    cu: torch.Tensor                 # [B + 1] int32
    tree_mask: torch.Tensor          # [B·n, W] int64
    parents: list                    # per request, tree-local parents (host)
    nbytes: int                      # B·P·Hkv·D·2·elt: prefix K/V read once

    @property
    def L(self) -> int:
        return self.P + self.n

    def args(self) -> tuple:
        return (self.q, self.k_cache, self.v_cache, self.block_table, self.seq_lens, self.cu, self.tree_mask)

    def run_op(self):
        return fastverify.tree_attention(*self.args())

    def input_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.args())


def bound_bytes(B: int, P: int, dtype: str) -> int:
    return B * P * HKV * HEAD_DIM * 2 * DTYPES[dtype].itemsize


def build_problem(B: int, P: int, n: int, dtype: str = "fp32", device="cpu", *, seed: int = 0,
                  tree_seed: int = 0) -> AttnProblem:
    """Input set ``seed`` of configuration (B, P, n, dtype); the trees depend on
    ``tree_seed`` only, so all input sets of a configuration share them."""
    if B < 1 or P < 0 or n < 1:
        raise ValueError(f"need B >= 1, P >= 0, n >= 1; got B={B}, P={P}, n={n}")
    dev = torch.device(device)
    dt = DTYPES[dtype]
    rng = random.Random(1_000_003 * tree_seed + 7)
    parents = [eagle_parents(n, rng) for _ in range(B)]
    L = P + n
    per_req = -(-L // PAGE)
    num_pages = B * per_req + 1                                     # one spare page nobody owns
    cpu_gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_pages, generator=cpu_gen)[:B * per_req]
    block_table = perm.view(B, per_req).to(torch.int32).to(dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    k_cache = torch.randn(num_pages, PAGE, HKV, HEAD_DIM, generator=gen, device=dev, dtype=dt)
    v_cache = torch.randn(num_pages, PAGE, HKV, HEAD_DIM, generator=gen, device=dev, dtype=dt)
    q = torch.randn(B * n, HQ, HEAD_DIM, generator=gen, device=dev, dtype=dt)
    cu = torch.arange(B + 1, dtype=torch.int32) * n
    par = torch.tensor(sum(parents, []), dtype=torch.int32)
    with fastverify.use_backend("torch"):                           # on the host: exact, checked
        tree_mask, _, _ = fastverify.build_tree(par, cu, torch.full((B,), P, dtype=torch.int64), max_nodes=n)
    return AttnProblem(B, P, n, dtype, q, k_cache, v_cache, block_table,
                       torch.full((B,), L, dtype=torch.int32, device=dev), cu.to(dev), tree_mask.to(dev),
                       parents, bound_bytes(B, P, dtype))


def build_sets(B: int, P: int, n: int, dtype: str, device) -> list[AttnProblem]:
    """The input sets to rotate over (bench.input_sets_for: enough to exceed L2)."""
    first = build_problem(B, P, n, dtype, device, seed=0)
    count, _ = bench.input_sets_for(first.input_bytes(), device)
    return [first] + [build_problem(B, P, n, dtype, device, seed=s) for s in range(1, count)]


def set_bytes_estimate(B: int, P: int, n: int, dtype: str) -> int:
    """Bytes of one input set (caches, q, index tensors, tree_mask), without building it."""
    e = DTYPES[dtype].itemsize
    pages = B * -(-(P + n) // PAGE) + 1
    words = max(1, -(-n // 64))
    caches, q = 2 * pages * PAGE * HKV * HEAD_DIM * e, B * n * HQ * HEAD_DIM * e
    return caches + q + B * n * words * 8 + (pages - 1) * 4 + 8 * B + 4     # + tree_mask, block_table, seq_lens, cu


def baseline_bytes_estimate(backend: str, B: int, P: int, n: int, dtype: str, n_sets: int,
                            sdpa_math: bool = True) -> int:
    """Upper estimate of the GPU memory held while baseline ``backend`` runs: the input
    sets' caches and the gathered K/V, plus for ``flex`` the intermediates of
    create_block_mask ([B, 1, n, L] int64 index grids), for ``sdpa`` the bool and the
    additive masks and, when SDPA may take its math path (``sdpa_math``), fp32 copies of
    K/V, the KV heads expanded to Hq in fp32 and fp32 scores/probabilities [B, Hq, n, L]."""
    e = DTYPES[dtype].itemsize
    L = P + n
    Lp = -(-L // PAGE) * PAGE
    total = n_sets * set_bytes_estimate(B, P, n, dtype) + 2 * B * Lp * HKV * HEAD_DIM * e
    if backend == "flex":
        return total + 4 * B * n * L * 8
    total += B * n * L * (1 + e)
    if sdpa_math:
        total += 2 * B * L * HKV * HEAD_DIM * 4 + 2 * B * HQ * L * HEAD_DIM * 4 + 3 * B * HQ * n * L * 4
    return total


# =========================================================================== baselines


def gather_kv(k_cache, v_cache, block_table, L: int):
    """K, V of every request, each one ``index_select`` of the request's pages into a
    contiguous [B, pages·PAGE, Hkv, D] buffer, returned as [B, Hkv, L, D] views."""
    B, per_req = block_table.shape
    page, Hkv, D = k_cache.shape[1:]
    idx = block_table.reshape(-1)
    k = k_cache.index_select(0, idx).view(B, per_req * page, Hkv, D)[:, :L].transpose(1, 2)
    v = v_cache.index_select(0, idx).view(B, per_req * page, Hkv, D)[:, :L].transpose(1, 2)
    return k, v


def ancestor_bits(tree_mask, word, shift, B: int, n: int):
    """[B, n, n] bool from the bit-packed tree_mask: [b, i, j] = node j is node i or an ancestor."""
    return ((tree_mask[:, word] >> shift) & 1).bool().view(B, n, n)


_SDPA_GQA: Optional[bool] = None


def sdpa_has_gqa() -> bool:
    """Whether F.scaled_dot_product_attention takes ``enable_gqa`` (torch >= 2.5)."""
    global _SDPA_GQA
    if _SDPA_GQA is None:
        try:
            x = torch.zeros(1, 2, 1, 8)
            torch.nn.functional.scaled_dot_product_attention(x, x[:, :1], x[:, :1], enable_gqa=True)
            _SDPA_GQA = True
        except TypeError:
            _SDPA_GQA = False
    return _SDPA_GQA


def sdpa_tree_attention(q, k_cache, v_cache, block_table, tree_mask, word, shift, P: int, n: int, gqa: bool):
    """The sdpa baseline (module docstring). ``word``/``shift`` [n]: where bit j of a
    tree_mask row lives (depend only on n, built once, as engines build such tables)."""
    T, Hq, D = q.shape
    B = block_table.shape[0]
    L = P + n
    k, v = gather_kv(k_cache, v_cache, block_table, L)                     # [B, Hkv, L, D]
    mask = torch.empty(B, 1, n, L, dtype=torch.bool, device=q.device)
    mask[:, :, :, :P] = True
    mask[:, 0, :, P:] = ancestor_bits(tree_mask, word, shift, B, n)
    qb = q.view(B, n, Hq, D).transpose(1, 2)                                  # [B, Hq, n, D]
    if gqa:
        o = torch.nn.functional.scaled_dot_product_attention(qb, k, v, attn_mask=mask, enable_gqa=True)
    else:
        G = Hq // k.shape[1]
        o = torch.nn.functional.scaled_dot_product_attention(qb, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1),
                                                             attn_mask=mask)
    return o.transpose(1, 2).reshape(T, Hq, D)


_FUSED = (("flash", "FLASH_ATTENTION"), ("efficient", "EFFICIENT_ATTENTION"), ("cudnn", "CUDNN_ATTENTION"))


def sdpa_fused_kernels(call: Callable, device) -> Optional[list]:
    """The fused SDPA kernels (flash, efficient, cudnn) that accept the inputs of
    ``call`` (an sdpa-baseline call), each tried alone, outside the timing; an empty
    list means SDPA takes its math path. None where torch cannot say (no sdpa_kernel)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return None
    ok = []
    for short, attr in _FUSED:
        be = getattr(SDPBackend, attr, None)
        if be is None:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with sdpa_kernel([be]):
                    call()
                    _sync(torch.device(device))
            ok.append(short)
        except Exception:  # noqa: BLE001 - "no available kernel" is a RuntimeError; anything else too
            pass
    return ok


_SDPA_MATH: dict = {}


def sdpa_may_use_math(n: int, dtype: str, device) -> bool:
    """Whether SDPA may take its math path for the sdpa baseline at tree size n: True
    unless a fused kernel accepts a small problem of the same layout (B=1, P=64)."""
    key = (n, dtype, str(device))
    if key not in _SDPA_MATH:
        try:
            p = build_problem(1, 64, n, dtype, device)
            j = torch.arange(n, device=p.q.device)
            gqa = sdpa_has_gqa()
            fused = sdpa_fused_kernels(lambda: sdpa_tree_attention(p.q, p.k_cache, p.v_cache, p.block_table,
                                                                   p.tree_mask, j // 64, j % 64, p.P, n, gqa), device)
            _SDPA_MATH[key] = not fused
        except Exception:  # noqa: BLE001 - assume the worst
            _SDPA_MATH[key] = True
    return _SDPA_MATH[key]


_FLEX: dict = {}


def compiled_flex() -> Callable:
    """torch.compile(flex_attention, dynamic=False), one per process; the recompile
    limit is raised (one static compile per configuration) and hitting it raises, so
    flex can never silently run eagerly."""
    if "fn" not in _FLEX:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention
        cfg = torch._dynamo.config
        limit_name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
        setattr(cfg, limit_name, max(getattr(cfg, limit_name), 256))
        if hasattr(cfg, "accumulated_recompile_limit"):           # all frames of the process together
            cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 1024)
        if hasattr(cfg, "fail_on_recompile_limit_hit"):
            cfg.fail_on_recompile_limit_hit = True
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


def flex_block_mask(p: AttnProblem):
    """(mask_mod, BlockMask) of a problem: kv < P, or the tree bit of node kv - P. The
    prefix length is a 0-d tensor, so a new configuration changes no guard on it."""
    from torch.nn.attention.flex_attention import create_block_mask
    B, P, n = p.B, p.P, p.n
    j = torch.arange(n, device=p.q.device)
    anc = ancestor_bits(p.tree_mask, j // 64, j % 64, B, n)                  # [B, n, n]
    prefix = torch.tensor(P, device=p.q.device)
    last = n - 1

    def mask_mod(b, h, q_idx, kv_idx):      # indices clamped: padded rows/columns never read out of bounds
        t = (kv_idx - prefix).clamp(0, last)
        return (kv_idx < prefix) | anc[b, q_idx.clamp(0, last), t]

    return mask_mod, create_block_mask(mask_mod, B, None, n, p.L, device=str(p.q.device))


def flex_tree_attention(fn, q, k_cache, v_cache, block_table, block_mask, L: int):
    T, Hq, D = q.shape
    B = block_table.shape[0]
    n = T // B
    k, v = gather_kv(k_cache, v_cache, block_table, L)
    o = fn(q.view(B, n, Hq, D).transpose(1, 2), k, v, block_mask=block_mask, enable_gqa=True)
    return o.transpose(1, 2).reshape(T, Hq, D)


# =========================================================================== backends


def default_device() -> torch.device:
    return bench.default_device()


def default_backends(device) -> list[str]:
    if torch.device(device).type == "cuda":
        return list(ALL_BACKENDS)
    return ["sdpa", "flex", "torch"]


def default_grid(device, quick: bool = False) -> dict:
    gpu = torch.device(device).type == "cuda"
    g = (GPU_QUICK_GRID if gpu else CPU_QUICK_GRID) if quick else (GPU_GRID if gpu else CPU_GRID)
    return {k: tuple(v) for k, v in g.items()}


def configs(grid: dict) -> list[tuple[int, int, int, str]]:
    """(B, P, n, dtype) of the grid: the product of its axes plus its ``extra`` configs,
    in report order (dtype, B, P, n)."""
    out = {(B, P, n, dt) for dt in grid["dtype"] for B in grid["B"] for P in grid["P"] for n in grid["n"]}
    out |= {tuple(c) for c in grid.get("extra", ())}
    order = {dt: i for i, dt in enumerate(DTYPES)}
    return sorted(out, key=lambda c: (order.get(c[3], 9), c[0], c[1], c[2]))


_CUDA_STATUS: dict = {}


def cuda_backend_status(device) -> tuple[bool, str]:
    """(available, reason) of the cuda backend of tree_attention: the loader imports,
    has ``tree_attention``, and runs a tiny problem."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return False, "the cuda backend needs a CUDA device"
    key = str(dev)
    if key not in _CUDA_STATUS:
        try:
            mod = importlib.import_module("fastverify._cuda")
        except Exception as e:  # noqa: BLE001
            _CUDA_STATUS[key] = (False, "import of fastverify._cuda failed: " + _first_line(e))
            return _CUDA_STATUS[key]
        if not callable(getattr(mod, "tree_attention", None)):
            _CUDA_STATUS[key] = (False, "fastverify._cuda has no tree_attention (no CUDA tree-attention kernel yet)")
            return _CUDA_STATUS[key]
        try:
            p = build_problem(2, 40, 5, "bf16", dev)
            with fastverify.use_backend("cuda"):
                p.run_op()
            torch.cuda.synchronize(dev)
            _CUDA_STATUS[key] = (True, "")
        except Exception as e:  # noqa: BLE001
            _CUDA_STATUS[key] = (False, "build/load/run failed: " + _first_line(e))
    return _CUDA_STATUS[key]


def unsupported_reason(backend: str, device) -> Optional[str]:
    """Why ``backend`` is not timed on ``device`` (None: it is)."""
    dev = torch.device(device)
    if backend not in ALL_BACKENDS:
        return f"unknown backend {backend!r}"
    if backend == "flex":
        try:
            importlib.import_module("torch.nn.attention.flex_attention")
        except Exception as e:  # noqa: BLE001
            return "torch.nn.attention.flex_attention unavailable: " + _first_line(e)
    if dev.type != "cuda":
        if backend == "triton":
            return "triton on CPU runs only under the Triton interpreter, far too slow to time"
        if backend == "cuda":
            return "the cuda backend needs a CUDA device"
    elif backend == "cuda":
        ok, why = cuda_backend_status(dev)
        return None if ok else why
    return None


def backend_context(backend: str):
    return fastverify.use_backend(backend) if backend in KERNEL_BACKENDS else contextlib.nullcontext()


class Prepared:
    """Per-configuration state of the baselines that is not timed: bit-position tables
    (depend on n only), the FlexAttention block mask (its build time measured)."""

    def __init__(self, sets: list[AttnProblem]):
        p = sets[0]
        self.sets = sets
        dev = p.q.device
        j = torch.arange(p.n, device=dev)
        self.word, self.shift = j // 64, j % 64
        self.gqa = sdpa_has_gqa()
        self.block_mask = None
        self.block_mask_us: Optional[float] = None
        self.block_mask_error: Optional[str] = None
        self.gather_us: Optional[float] = None

    def build_block_mask(self) -> None:
        """Build the block mask once for the timing and time its build (warm-up + median
        of BLOCK_MASK_REPS, host clock around a synchronize)."""
        if self.block_mask is not None or self.block_mask_error is not None:
            return
        dev = self.sets[0].q.device
        try:
            _, bm = flex_block_mask(self.sets[0])
            _sync(dev)
            times = []
            for _ in range(BLOCK_MASK_REPS):
                t0 = time.perf_counter()
                flex_block_mask(self.sets[0])
                _sync(dev)
                times.append(time.perf_counter() - t0)
            self.block_mask = bm
            self.block_mask_us = statistics.median(times) * 1e6
        except Exception as e:  # noqa: BLE001
            self.block_mask_error = "create_block_mask failed: " + _first_line(e)

    def time_gather(self, target_s: float) -> None:
        """Median µs of the K/V gather alone (part of the sdpa and flex times)."""
        if self.gather_us is not None:
            return
        calls = [(lambda p=p: gather_kv(p.k_cache, p.v_cache, p.block_table, p.L)) for p in self.sets]
        dev = self.sets[0].q.device
        _, flush = bench.input_sets_for(self.sets[0].input_bytes(), dev)
        try:
            times = bench.time_calls(calls, dev, target_s=target_s, flush=flush)
            self.gather_us = statistics.median(times) * 1e6
        except Exception:  # noqa: BLE001 - informational only
            self.gather_us = None


def make_call(p: AttnProblem, backend: str, prep: Prepared) -> Callable:
    """Zero-argument callable running ``p`` on ``backend``; run the kernel backends inside
    :func:`backend_context`."""
    if backend == "sdpa":
        word, shift, gqa = prep.word, prep.shift, prep.gqa
        return lambda: sdpa_tree_attention(p.q, p.k_cache, p.v_cache, p.block_table, p.tree_mask, word, shift,
                                           p.P, p.n, gqa)
    if backend == "flex":
        prep.build_block_mask()
        if prep.block_mask is None:
            raise RuntimeError(prep.block_mask_error or "no block mask")
        fn, bm = compiled_flex(), prep.block_mask
        return lambda: flex_tree_attention(fn, p.q, p.k_cache, p.v_cache, p.block_table, bm, p.L)
    if backend in KERNEL_BACKENDS:
        return p.run_op
    raise ValueError(f"unknown backend {backend!r}; expected one of {ALL_BACKENDS}")


def reference(p: AttnProblem) -> torch.Tensor:
    """The torch backend's output on ``p`` (the correctness reference), fp32."""
    with fastverify.use_backend("torch"):
        return p.run_op().float()


def check_output(out: torch.Tensor, ref: torch.Tensor, dtype: str) -> tuple[float, float, bool]:
    """(max abs error, tolerance, ok)."""
    atol, rtol = TOLERANCE[dtype]
    err_t = (out.float() - ref).abs().max()
    err = float(err_t)
    tol = atol + rtol * float(ref.abs().max())
    ok = math.isfinite(err) and bool(torch.isfinite(out).all()) and err <= tol
    return err, tol, ok


# =========================================================================== running


@dataclass
class AttnResult:
    B: int
    P: int
    n: int
    dtype: str
    backend: str
    status: str = "ok"                     # ok | wrong | n/a
    reason: str = ""
    median_us: Optional[float] = None
    p10_us: Optional[float] = None
    p90_us: Optional[float] = None
    reps: int = 0
    n_sets: int = 0
    l2_flush: bool = False
    bytes: int = 0
    gbps: Optional[float] = None
    pct_of_bound: Optional[float] = None
    pct_of_copy: Optional[float] = None
    vs_sdpa: Optional[float] = None
    vs_flex: Optional[float] = None
    vs_torch: Optional[float] = None
    max_abs_err: Optional[float] = None    # vs the torch backend, first input set
    tol: Optional[float] = None
    block_mask_us: Optional[float] = None  # flex: create_block_mask, not in median_us
    gather_us: Optional[float] = None      # sdpa/flex: the K/V gather alone, included in median_us
    sdpa_kernels: Optional[list] = None    # sdpa: fused SDPA kernels that accept the inputs ([]: math path)
    warmup_s: Optional[float] = None
    wall_us: Optional[float] = None        # host wall time per call incl. launch overhead (3 calls + sync)
    family: str = FAMILY

    def key(self):
        return (self.B, self.P, self.n, self.dtype)


@dataclass
class AttnOptions:
    device: torch.device = field(default_factory=default_device)
    backends: Optional[list] = None        # None: default_backends(device)
    grid: Optional[dict] = None            # None: default_grid(device, quick)
    quick: bool = False
    target_s: float = 0.0                  # 0: 0.2 on CUDA, 0.3 on CPU
    threads: int = 0
    mem_limit: float = BASELINE_MEM_LIMIT


def plan(opts: AttnOptions, log: Callable[[str], None] = print) -> tuple[list, list, dict]:
    """(configs, backends to time, {backend: why not measured}) of a run."""
    dev = torch.device(opts.device)
    grid = opts.grid or default_grid(dev, opts.quick)
    wanted = list(opts.backends or default_backends(dev))
    wanted = [b for b in ALL_BACKENDS if b in wanted]
    backends, skipped = [], {}
    for b in wanted:
        if b == "cuda" and dev.type == "cuda":
            log("checking the cuda backend of tree_attention (may build the extension) ...")
        why = unsupported_reason(b, dev)
        if why is None:
            backends.append(b)
        else:
            skipped[b] = why
            log(f"{b}: not measured ({why})")
    return configs(grid), backends, skipped


def run(opts: AttnOptions, command: str = "", log: Callable[[str], None] = print,
        on_result: Optional[Callable[[int, int, AttnResult, float], None]] = None,
        bw: Optional[dict] = None) -> bench.Report:
    """Measure every (config, backend) of ``opts``; ``on_result(done, total, result,
    elapsed_s)`` after each measurement. ``bw``: a :func:`bench.peak_bandwidth` result
    to reuse (measured here otherwise)."""
    dev = torch.device(opts.device)
    grid = opts.grid or default_grid(dev, opts.quick)
    target_s = opts.target_s or (0.2 if dev.type == "cuda" else 0.3)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    cfgs, backends, skipped = plan(dataclasses.replace(opts, grid=grid), log)
    busy = bench.cores_busy_elsewhere() if dev.type == "cpu" else None
    if busy is not None and busy > 0.3:
        free = max(1, int((os.cpu_count() or 1) - busy + 0.5))
        log(f"note: other processes keep {busy:.1f} of {os.cpu_count()} cores busy; CPU numbers will be noisy"
            + (f" (with {torch.get_num_threads()} torch threads, try --threads {free})"
               if torch.get_num_threads() > free else ""))
    if bw is None:
        log("measuring copy bandwidth ...")
        bw = bench.peak_bandwidth(dev)
    meta = {
        "family": FAMILY,
        "device": bench.device_name(dev),
        "device_type": dev.type,
        "peak_bytes_per_s": bw["peak"],
        "peak_source": bw["source"],
        "copy_bytes_per_s": bw["copy"],
        "l2_bytes": bench.l2_bytes(dev) or None,
        "versions": bench.versions(),
        "git": bench.git_revision(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "grid": {k: list(v) for k, v in grid.items()},
        "backends": backends,
        "not_measured": skipped,
        "target_s": target_s,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg_1min_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "cores_busy_elsewhere_at_start": busy,
        "shape": {"Hq": HQ, "Hkv": HKV, "D": HEAD_DIM, "page_size": PAGE},
        "sdpa_enable_gqa": sdpa_has_gqa(),
        "baseline_mem_limit_bytes": opts.mem_limit if dev.type == "cuda" else None,
        "tolerance": {k: {"atol": a, "rtol_of_max_ref": r} for k, (a, r) in TOLERANCE.items()},
        "inputs": (f"q/K/V randn in the dtype; Hq={HQ}, Hkv={HKV}, D={HEAD_DIM}; paged cache, page size {PAGE}, pages "
                   "of all requests shuffled; per request a prefix of P tokens + its own EAGLE-like random tree of n "
                   "nodes (max depth round(log2 n)+2, wider levels near the root); tree_mask from "
                   "fastverify.build_tree; the rotated input sets share the trees"),
        "env": {k: os.environ[k] for k in ("FASTVERIFY_BACKEND", "FASTVERIFY_CHECKS", "TRITON_INTERPRET")
                if k in os.environ},
        "tree_depths": {},
    }
    total = len(cfgs) * len(backends)
    results: list[AttnResult] = []
    done = 0
    t_start = time.perf_counter()
    flex_broken: list = []
    for (B, P, n, dt) in cfgs:
        try:
            sets = build_sets(B, P, n, dt, dev)
            ref = reference(sets[0])
            setup_error = None
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: report the config as n/a
            sets, ref, setup_error = None, None, "building the inputs / torch reference failed: " + _first_line(e)
        if sets is not None:
            meta["tree_depths"][f"n={n}"] = sorted({max_depth(pp) for pp in sets[0].parents})
        prep = Prepared(sets) if sets is not None else None
        per_cfg: dict = {}
        for backend in backends:
            if setup_error is not None:
                r = AttnResult(B, P, n, dt, backend, status="n/a", reason=setup_error, bytes=bound_bytes(B, P, dt))
            else:
                r = _measure(backend, sets, prep, ref, dev, opts, target_s, bw, per_cfg, flex_broken)
            per_cfg[backend] = r
            results.append(r)
            done += 1
            if on_result is not None:
                on_result(done, total, r, time.perf_counter() - t_start)
        _fill_speedups(per_cfg)
        del sets, prep, ref
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    meta["elapsed_s"] = time.perf_counter() - t_start
    if dev.type == "cpu":
        meta["cores_busy_elsewhere_at_end"] = bench.cores_busy_elsewhere()
    return bench.Report(meta, results)


def _fill_speedups(per_cfg: dict) -> None:
    for base, attr in (("sdpa", "vs_sdpa"), ("flex", "vs_flex"), ("torch", "vs_torch")):
        b = per_cfg.get(base)
        ok = b is not None and b.status == "ok" and b.median_us
        for r in per_cfg.values():
            setattr(r, attr, b.median_us / r.median_us if ok and r.status == "ok" and r.median_us else None)


def baseline_too_big(backend, B, P, n, dt, n_sets, device, limit) -> str:
    """Why baseline ``backend`` is skipped for memory at this configuration ('' if it is not)."""
    math_path = backend == "sdpa" and sdpa_may_use_math(n, dt, device)
    est = baseline_bytes_estimate(backend, B, P, n, dt, n_sets, sdpa_math=math_path)
    if est <= limit:
        return ""
    what = ("input sets, gathered K/V, masks" + (" and SDPA's math path (fp32 K/V expanded to Hq heads, fp32 scores)"
                                                 if math_path else "") if backend == "sdpa"
            else "input sets, gathered K/V, create_block_mask intermediates")
    return f"skipped: estimated GPU working set {est / 1e9:.0f} GB > {limit / 1e9:.0f} GB ({what})"


def _measure(backend, sets, prep, ref, dev, opts, target_s, bw, per_cfg, flex_broken) -> AttnResult:
    p0 = sets[0]
    B, P, n, dt = p0.B, p0.P, p0.n, p0.dtype
    r = AttnResult(B, P, n, dt, backend, bytes=p0.nbytes, n_sets=len(sets))
    if backend in BASELINES and dev.type == "cuda":
        why = baseline_too_big(backend, B, P, n, dt, len(sets), dev, opts.mem_limit)
        if why:
            r.status, r.reason = "n/a", why
            return r
    if backend == "flex" and len(flex_broken) >= FLEX_MAX_FAILURES:
        r.status, r.reason = "n/a", f"FlexAttention failed on {len(flex_broken)} configs earlier in this run: " \
                                    + flex_broken[-1]
        return r
    _, r.l2_flush = bench.input_sets_for(p0.input_bytes(), dev)
    with backend_context(backend):
        try:
            calls = [make_call(p, backend, prep) for p in sets]
            t0 = time.perf_counter()
            out = calls[0]()                  # first call: compiles (flex, triton), builds (cuda)
            _sync(dev)
            r.warmup_s = time.perf_counter() - t0
            r.max_abs_err, r.tol, ok = check_output(out, ref, dt)
            del out
            if backend == "sdpa":
                r.sdpa_kernels = sdpa_fused_kernels(calls[0], dev)
            wall: list = []
            times = bench.time_calls(calls, dev, target_s=target_s, flush=r.l2_flush, wall=wall)
            r.wall_us = wall[0] * 1e6
        except Exception as e:  # noqa: BLE001 - report, never fake numbers
            r.status = "n/a"
            if backend == "flex":
                r.reason = "FlexAttention failed: " + _first_line(e)
                if not isinstance(e, torch.cuda.OutOfMemoryError):
                    flex_broken.append(_first_line(e))
            else:
                r.reason = "failed: " + _first_line(e)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            return r
    if backend == "flex":
        r.block_mask_us = prep.block_mask_us
    if backend in BASELINES:
        prep.time_gather(min(target_s, 0.1))
        r.gather_us = prep.gather_us
    times.sort()
    med = statistics.median(times)
    r.reps = len(times)
    r.median_us = med * 1e6
    r.p10_us = times[int(0.1 * (len(times) - 1))] * 1e6
    r.p90_us = times[int(0.9 * (len(times) - 1))] * 1e6
    r.gbps = r.bytes / med / 1e9
    r.pct_of_bound = 100.0 * (r.bytes / bw["peak"]) / med
    r.pct_of_copy = 100.0 * (r.bytes / bw["copy"]) / med
    if not ok:
        r.status = "wrong"
        r.reason = f"max abs error {r.max_abs_err:.3g} vs the torch backend > tolerance {r.tol:.3g}"
        return r
    for base, attr in (("sdpa", "vs_sdpa"), ("flex", "vs_flex"), ("torch", "vs_torch")):
        b = per_cfg.get(base) if base != backend else r
        if b is not None and b.status == "ok" and b.median_us:
            setattr(r, attr, b.median_us / r.median_us)
    return r


# =========================================================================== report


def _cfg_str(r) -> str:
    return f"B={r.B:<3d} P={r.P:<6d} n={r.n:<4d} {r.dtype:4s}"


def result_line(r: AttnResult) -> str:
    """One line describing a measurement (streamed by the CLI)."""
    head = f"attn  {_cfg_str(r)} {r.backend:6s}"
    if r.status == "n/a":
        return f"{head} n/a  ({r.reason})"
    if r.status == "wrong":
        return f"{head} WRONG ({r.reason}; {_fmt_us(r.median_us)} µs not reported)"
    s = (f"{head} {_fmt_us(r.median_us):>9s} µs {r.gbps:8.1f} GB/s {r.pct_of_bound:6.1f}% of bound"
         f"  ×{_fmt_x(r.vs_sdpa)} sdpa  ×{_fmt_x(r.vs_flex)} flex  ×{_fmt_x(r.vs_torch)} torch"
         f"  err {_fmt(r.max_abs_err, '.1e')}")
    if r.block_mask_us is not None:
        s += f"  block mask {_fmt_us(r.block_mask_us)} µs"
    if r.gather_us is not None:
        s += f"  gather {_fmt_us(r.gather_us)} µs"
    return s


def target_line(report: bench.Report) -> str:
    tc = TARGET_CONFIG
    key = (tc["B"], tc["P"], tc["n"], tc["dtype"])
    rows = {r.backend: r for r in report.results if r.key() == key}
    meta = report.meta
    parts = []
    for b in TARGET_BACKENDS:
        if b in meta.get("not_measured", {}):
            if meta["device_type"] == "cuda":
                parts.append(f"{b}: not measured ({meta['not_measured'][b]})")
            continue
        r = rows.get(b)
        if r is None:
            continue
        if r.status == "wrong":
            parts.append(f"{b}: not met (WRONG: {r.reason})")
            continue
        if r.status != "ok":
            parts.append(f"{b}: not measured ({r.reason})")
            continue
        checks = [r.pct_of_bound >= TARGET_PCT_OF_BOUND]
        missing = []
        for attr, need, name in (("vs_flex", TARGET_VS_FLEX, "flex"), ("vs_sdpa", TARGET_VS_SDPA, "sdpa")):
            v = getattr(r, attr)
            if v is None:
                missing.append(name)
            else:
                checks.append(v >= need)
        verdict = ("not met" if not all(checks) else
                   f"not measured (no {' / '.join(missing)} baseline)" if missing else "met")
        parts.append(f"{b}: {r.pct_of_bound:.0f}% of bound, ×{_fmt_x(r.vs_flex)} vs flex, ×{_fmt_x(r.vs_sdpa)} vs "
                     f"sdpa → {verdict}")
    if not parts:
        return "not measured (configuration not in this run)"
    if meta["device_type"] != "cuda":
        return "not measured (targets are GPU targets; this run is on CPU): " + "; ".join(parts)
    return "; ".join(parts)


def render_markdown(report: bench.Report) -> str:
    m = report.meta
    v = m["versions"]
    gqa = "enable_gqa=True" if m.get("sdpa_enable_gqa") else "repeat_interleave of the KV heads"
    lines = [
        f"# fastverify tree-attention microbenchmark — {m['device']}",
        "",
        f"- device: {m['device']}" + (f" (L2 {m['l2_bytes'] / 2**20:.0f} MiB)" if m.get("l2_bytes") else ""),
        f"- bound: {m['peak_bytes_per_s'] / 1e9:,.0f} GB/s — {m['peak_source']}"
        + ("" if m["copy_bytes_per_s"] == m["peak_bytes_per_s"] else
           f"; measured copy bandwidth {m['copy_bytes_per_s'] / 1e9:,.0f} GB/s (read + write)"),
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- git: {m['git']}",
        f"- date: {m['date']}",
        f"- command: `{m['command']}`" if m.get("command") else "- command: (programmatic)",
        f"- inputs: {m['inputs']}"
        + ("; tree depths " + ", ".join(f"{k}: {'/'.join(map(str, d))}" for k, d in m.get("tree_depths", {}).items())
           if m.get("tree_depths") else ""),
        "- timing: " + ("CUDA events per call, back to back, median; inputs rotated over sets exceeding L2 "
                        "(where rotation cannot exceed it the L2 is flushed between calls)"
                        if m["device_type"] == "cuda" else "time.perf_counter per call, median")
        + f"; ~{m['target_s']:g} s of timed calls per row",
        "- baselines, same data and run: sdpa = gather each request's pages into contiguous K/V "
        "(index_select → [B, P+n, Hkv, D], viewed [B, Hkv, P+n, D]) + dense bool mask [B, 1, n, P+n] unpacked from "
        f"tree_mask + F.scaled_dot_product_attention ({gqa}), all timed; flex = the same gather (timed) + "
        "torch.compile'd flex_attention (dynamic=False) with a prefix-or-ancestor-bit mask_mod; its "
        "create_block_mask is timed apart (\"block mask µs\", median of 3, not in its time); \"gather µs\" = the "
        "gather alone, included in the sdpa and flex times; torch = fastverify's torch backend (the correctness "
        "reference)",
        "- bytes: B·P·Hkv·D·2·bytes_per_elem (each request's prefix K/V read once); % of bound = "
        "(bytes / bound bandwidth) / time",
        "- correctness: every row's output on the first input set vs the torch backend's; \"max err\" = max abs "
        "error; above " + ", ".join(f"{k}: {a:g} + {r:g}·max|ref|" for k, (a, r) in TOLERANCE.items())
        + " the row is WRONG and shows no speed",
    ]
    if m.get("env"):
        lines.append("- environment: " + ", ".join(f"{k}={val}" for k, val in m["env"].items()))
        if m["env"].get("FASTVERIFY_CHECKS", "0") not in ("", "0"):
            lines.append("- **FASTVERIFY_CHECKS is on: value checks read data back to the host; op numbers are "
                         "pessimistic**")
    for b, why in m.get("not_measured", {}).items():
        lines.append(f"- {b}: not measured — {why}")
    busy = m.get("cores_busy_elsewhere_at_start")
    busy_end = m.get("cores_busy_elsewhere_at_end")
    if m["device_type"] != "cuda":
        shared = any(x is not None and x > 0.3 for x in (busy, busy_end))
        lines.append(f"- CPU: {m.get('torch_threads')} torch threads, {m.get('cpu_count')} cores; other processes "
                     f"kept {_fmt(busy, '.1f')} cores busy at start, {_fmt(busy_end, '.1f')} at the end"
                     + (" — **the CPU was shared: numbers are noisy**" if shared else ""))
        lines.append("- CPU caveat: on CPU tensors the torch backend also runs the op's value checks (host loops "
                     "over the requests); sdpa/flex have none")
    lines.append(f"- elapsed: {m.get('elapsed_s', 0):.0f} s")
    lines += ["", "## tree_attention (prefix P + draft tree of n nodes per request)", "",
              "| B | P | n | dtype | backend | median µs | GB/s | % of bound | × vs sdpa | × vs flex | × vs torch "
              "| max err | block mask µs | gather µs |",
              "|--:|--:|--:|:--|:--|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    order = {b: i for i, b in enumerate(ALL_BACKENDS)}
    reasons: dict = {}
    wrong = []
    kernels = {}
    for r in sorted(report.results, key=lambda r: (r.dtype, r.B, r.P, r.n, order.get(r.backend, 9))):
        extra = [_fmt_us(r.block_mask_us) if r.block_mask_us is not None else "—",
                 _fmt_us(r.gather_us) if r.gather_us is not None else "—"]
        if r.status == "ok":
            cells = [_fmt_us(r.median_us), f"{r.gbps:.1f}", f"{r.pct_of_bound:.1f}", _fmt_x(r.vs_sdpa),
                     _fmt_x(r.vs_flex), _fmt_x(r.vs_torch), _fmt(r.max_abs_err, ".1e")]
        elif r.status == "wrong":
            cells = ["**WRONG**"] + ["—"] * 5 + [f"**{r.max_abs_err:.1e}**"]
            wrong.append(r)
        else:
            cells = ["n/a"] * 7
            reasons.setdefault((r.backend, r.reason), []).append(f"B={r.B} P={r.P} n={r.n}")
        if r.sdpa_kernels is not None:
            kernels.setdefault(", ".join(r.sdpa_kernels) or "none (math path)", []).append(f"B={r.B} P={r.P} n={r.n}")
        lines.append(f"| {r.B} | {r.P} | {r.n} | {r.dtype} | {r.backend} | " + " | ".join(cells + extra) + " |")
    lines.append("")
    for (b, why), where in reasons.items():
        lines.append(f"- {b}: n/a — {why} ({_where(where)})")
    for r in wrong:
        lines.append(f"- **WRONG**: {r.backend} at B={r.B} P={r.P} n={r.n} {r.dtype}: {r.reason}")
    if reasons or wrong:
        lines.append("")
    if kernels:
        lines.append("Fused SDPA kernels that accept the sdpa baseline's inputs (each tried alone, untimed; the "
                     "dispatcher picks among them, else the math path): "
                     + "; ".join(f"{k} ({_where(w)})" for k, w in kernels.items()) + ".")
        lines.append("")
    tc = TARGET_CONFIG
    lines.append(f"**Targets** (B={tc['B']}, P={tc['P']}, n={tc['n']}, {tc['dtype']}: ≥{TARGET_PCT_OF_BOUND:.0f}% of "
                 f"bound, ≥{TARGET_VS_FLEX:g}× vs flex, ≥{TARGET_VS_SDPA:g}× vs sdpa): {target_line(report)}")
    lines.append("")
    return "\n".join(lines)


def _where(cfgs: list) -> str:
    return "all configs of this run" if len(cfgs) > 4 else ", ".join(cfgs)


def report_to_json(report: bench.Report) -> dict:
    return {"meta": report.meta, "results": [dataclasses.asdict(r) for r in report.results]}


def plot(report: bench.Report, path) -> None:
    """PNG: % of bound per config and backend (top), speedup vs sdpa and vs flex (below)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ok = [r for r in report.results if r.status == "ok"]
    if not ok:
        return
    keys = configs({"B": (), "P": (), "n": (), "dtype": (), "extra": sorted({r.key() for r in report.results})})
    xs = list(range(len(keys)))
    labels = [f"B{B} P{P // 1024}k n{n}" if P >= 1024 and P % 1024 == 0 else f"B{B} P{P} n{n}"
              for (B, P, n, dt) in keys]
    if len({k[3] for k in keys}) > 1:
        labels = [f"{lab} {k[3]}" for lab, k in zip(labels, keys)]
    present = [b for b in ALL_BACKENDS if any(r.backend == b for r in ok)]
    colors = {"sdpa": "tab:gray", "flex": "tab:orange", "torch": "tab:green", "triton": "tab:blue", "cuda": "tab:red"}
    markers = {"sdpa": "x", "flex": "P", "torch": "s", "triton": "o", "cuda": "^"}
    w = 0.8 / max(len(present), 1)
    fig, axes = plt.subplots(3, 1, figsize=(max(8.0, 0.35 * len(keys) + 3), 10.5))
    ax_b, ax_s, ax_f = axes
    cuda = report.meta["device_type"] == "cuda"
    for j, b in enumerate(present):
        by_key = {r.key(): r for r in ok if r.backend == b}
        off = [x + (j - (len(present) - 1) / 2) * w for x in xs]
        ax_b.bar(off, [by_key[k].pct_of_bound if k in by_key else float("nan") for k in keys], width=w, label=b,
                 color=colors.get(b))
        for ax, attr, base in ((ax_s, "vs_sdpa", "sdpa"), (ax_f, "vs_flex", "flex")):
            if b == base:
                continue
            ys = [getattr(by_key[k], attr) if k in by_key and getattr(by_key[k], attr) else float("nan") for k in keys]
            ax.plot(off, ys, marker=markers.get(b, "."), linestyle="none", markersize=7, label=b, color=colors.get(b))
    bound = "CPU copy bw" if not cuda else f"{report.meta['peak_bytes_per_s'] / 1e12:.2f} TB/s"
    ax_b.set_ylabel(f"% of bound ({bound})")
    ax_b.set_title(f"tree_attention: % of the memory bound (prefix K/V read once) — {report.meta['device']}",
                   fontsize=10)
    if cuda:
        ax_b.axhline(TARGET_PCT_OF_BOUND, color="gray", linestyle=":", linewidth=1)
        ax_s.axhline(TARGET_VS_SDPA, color="gray", linestyle=":", linewidth=1)
        ax_f.axhline(TARGET_VS_FLEX, color="gray", linestyle=":", linewidth=1)
    for ax, attr, name in ((ax_s, "vs_sdpa", "sdpa (gather + dense mask + SDPA)"),
                           (ax_f, "vs_flex", "flex (gather + compiled FlexAttention)")):
        ax.axhline(1.0, color="black", linewidth=0.6)
        vals = [getattr(r, attr) for r in ok if getattr(r, attr)] + [1.0]
        if max(vals) / min(vals) >= 4:
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_ylabel("speedup (×, log)")
        else:
            ax.set_ylabel("speedup (×)")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}×"))
        ax.set_title(f"speedup vs {name}, same run", fontsize=10)
    for ax in axes:
        ax.set_xticks(xs)
        rot = len(keys) > 6
        ax.set_xticklabels(labels, rotation=60 if rot else 0, ha="right" if rot else "center", fontsize=7 if rot else 9)
        ax.set_xlim(-0.6, len(keys) - 0.4)
        ax.grid(True, axis="y", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def default_stem(device) -> str:
    return bench.default_stem(device) + "-attention"


def write_report(report: bench.Report, out_dir=None, stem: Optional[str] = None, device=None,
                 png: bool = True) -> dict:
    """Write <out_dir>/<stem>.{md,json,png} (stem default <device-slug>-<yyyymmdd>-attention)."""
    out = Path(out_dir) if out_dir else bench.default_out_dir()
    out.mkdir(parents=True, exist_ok=True)
    stem = stem or default_stem(device if device is not None else report.meta.get("device_type", "cpu"))
    paths = {"md": out / f"{stem}.md", "json": out / f"{stem}.json", "png": None}
    paths["md"].write_text(render_markdown(report) + "\n")
    tmp = out / f"{stem}.json.tmp"
    tmp.write_text(json.dumps(report_to_json(report), indent=1, default=str) + "\n")
    tmp.replace(paths["json"])
    if png:
        try:
            plot(report, out / f"{stem}.png")
            paths["png"] = out / f"{stem}.png"
        except Exception as e:  # noqa: BLE001 - a missing matplotlib must not lose the numbers
            print(f"plot not written: {_first_line(e)}", file=sys.stderr)
    return paths


__all__ = ["AttnProblem", "AttnResult", "AttnOptions", "build_problem", "build_sets", "eagle_parents", "configs",
           "default_grid", "default_backends", "run", "render_markdown", "write_report", "result_line",
           "sdpa_tree_attention", "flex_tree_attention", "gather_kv", "make_call", "Prepared", "reference",
           "check_output", "unsupported_reason", "backend_context"]
