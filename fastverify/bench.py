"""Microbenchmarks of the rejection-sampling ops, and the report they produce.

Used by ``fastverify bench`` (``fastverify/cli.py``), ``perf/report.py`` and the
pytest-benchmark suite in ``perf/``. Speed is only ever reported, never asserted.

What is timed, per (op, B, K, V, dtype):

* the op through its public entry point (``fastverify.rejection_sample`` /
  ``fastverify.tree_rejection_sample``) on each backend: ``triton``, ``cuda`` (when the
  extension builds and loads) and ``torch`` on CUDA tensors; ``torch`` only on CPU (the
  Triton interpreter is far too slow to time);
* two baselines, measured in the same run:

  - ``eager`` — the torch pipeline engines write today (vLLM v1 style), chain op:
    temperature-scaled softmax into an fp32 probs tensor ``[N + B, V]``; gather p(x);
    ``u = torch.rand``; accept iff ``u < p(x) / q(x)`` (q ≡ 1 without draft probs); the
    first rejection by a cumprod over the padded ``[B, K + 1]`` accept matrix; the
    residual ``clamp(p − q, 0)`` for *every* draft row (a point-mass q: p with x zeroed),
    renormalized; ``torch.multinomial`` for the recovered token of every draft row and
    for the bonus rows; the same output format as the op. Index tensors that depend
    only on the batch layout (row of each draft, bonus rows, …) are built once outside
    the timing, as engines build them on the host (vLLM's ``SpecDecodeMetadata``).
    Tree op: softmax probs of all ``T`` rows, then a walk down every request's tree,
    vectorized over the requests and unrolled over depth: at each depth one
    ``torch.multinomial`` over the rows of the nodes the requests stand on, match the
    sample against the node's children (a ``[T, 2]`` child table built on the host)
    and move or stop. It never reads data back to the host (``torch.multinomial``
    itself may, for its input check).
  - ``compiled`` — ``torch.compile`` (default mode) of the same functions; one compiled
    function per op shared across the grid (torch.compile's default automatic dynamic
    shapes), warmed up on every configuration outside the timing. The recompile limit
    is raised and hitting it raises, so it can never silently fall back to eager.

Inputs (``build_chain`` / ``build_tree``): logits are ``randn × 2``; then each row's
argmax is raised so that it holds a probability drawn from U(0.5, 0.95) (the peaked
rows of a real LM; with plain ``randn × 2`` the top token holds ~1% at V = 32000 and
nothing would be accepted). Chain drafts are the argmax of their row with probability
0.9, else a uniform random token. Trees: per request ``n = 1 + 2K`` nodes, a main path
of depth K (its tokens chosen like chain drafts, from the parent's row) plus one
sibling with a different token at each level. Temperature 1.0 (random) by default,
0.0 with ``greedy=True``.

Timing: on CUDA, one CUDA event pair around every call, calls issued back to back with
no host synchronization until the last (the clock stops there), median over the
calls, after warm-up; calls rotate over several input sets so that together they
exceed the L2 cache (when that would take too many sets, the L2 is flushed by a write
of twice its size between calls, outside the event pairs). On CPU, ``time.perf_counter``
around each call, median.

Bytes: chain ``B·(K+1)·V·bytes_per_logit`` (+ ``B·K·V·bytes`` of draft probs when
given); tree ``T·V·bytes``. % of bound = (bytes / peak bandwidth) / time, where peak
is a datasheet figure matched on the device name (H100 SXM, H200, A100 80GB), else the
measured device-to-device copy bandwidth; on CPU the measured copy bandwidth of the CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

import fastverify

OPS = ("chain", "tree")
BASELINES = ("eager", "compiled")
KERNEL_BACKENDS = ("triton", "cuda", "torch")
ALL_BACKENDS = BASELINES + KERNEL_BACKENDS
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

GPU_GRID = {"B": (1, 8, 64), "K": (1, 4, 8), "V": (32000, 128256, 151936), "dtype": ("bf16", "fp32")}
GPU_QUICK_GRID = {"B": (1, 64), "K": (4,), "V": (128256,), "dtype": ("bf16",)}
CPU_GRID = {"B": (1, 8), "K": (1, 4), "V": (32000, 128256), "dtype": ("fp32",)}
CPU_QUICK_GRID = {"B": (1, 8), "K": (4,), "V": (32000,), "dtype": ("fp32",)}

# The configuration the project's targets are stated for, and the targets.
TARGET_CONFIG = {"B": 64, "K": 4, "V": 128256, "dtype": "bf16"}
TARGET_PCT_OF_BOUND = 70.0
TARGET_VS_EAGER = 5.0
TARGET_LAUNCHES = 2

DRAFT_MATCH = 0.9           # probability that a draft is its row's argmax
PEAK_RANGE = (0.5, 0.95)     # probability held by each row's argmax

DEFAULT_L2_BYTES = 50 * 2**20
MAX_INPUT_SETS = 32


# =========================================================================== inputs


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _peaked_logits(R: int, V: int, gen: torch.Generator, device: torch.device):
    """fp32 ``randn × 2`` logits [R, V] whose argmax holds a probability in PEAK_RANGE;
    returns (logits, argmax)."""
    logits = torch.randn(R, V, generator=gen, device=device) * 2
    top = logits.argmax(1)
    rest = logits.scatter(1, top[:, None], float("-inf")).logsumexp(1)      # log Σ_{v≠top} e^l
    peak = torch.empty(R, device=device).uniform_(*PEAK_RANGE, generator=gen)
    logits.scatter_(1, top[:, None], (rest + torch.log(peak / (1 - peak)))[:, None])
    return logits, top


@dataclass
class Problem:
    """One input set: arguments of the op and of the baseline."""

    op: str
    B: int
    K: int
    V: int
    dtype: str
    op_args: tuple
    op_kwargs: dict
    baseline_kwargs: dict
    nbytes: int                       # bytes the op must read at least (the physical bound)

    def run_op(self):
        fn = fastverify.rejection_sample if self.op == "chain" else fastverify.tree_rejection_sample
        return fn(*self.op_args, **self.op_kwargs)

    def input_bytes(self) -> int:
        """Bytes of the tensors of this set (for sizing the rotation against L2)."""
        seen, total = set(), 0
        for t in list(self.op_args) + list(self.op_kwargs.values()) + list(self.baseline_kwargs.values()):
            if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total


def _mode(greedy: bool) -> str:
    return "greedy" if greedy else "random"


def build_chain(B: int, K: int, V: int, dtype: str = "fp32", device="cpu", *, seed: int = 0, greedy: bool = False,
                draft_probs: bool = False) -> Problem:
    """Chain problem: B requests with K drafts each, flattened as the op expects.

    ``target_logits [B·(K+1), V]`` (request b owns rows b·(K+1) … b·(K+1)+K, the last its
    bonus row), ``draft_tokens [B·K]`` int64, ``cu_num_draft [B+1]`` int32. With
    ``draft_probs`` the draft rows are ``softmax(target logits + N(0, 1))`` and the
    drafts are sampled from them (stored in the logits dtype).
    """
    if K < 1:
        raise ValueError("the chain benchmark needs K >= 1")
    dev = torch.device(device)
    gen = _generator(dev, seed)
    R, N = B * (K + 1), B * K
    logits, top = _peaked_logits(R, V, gen, dev)
    ar_b = torch.arange(B, device=dev)
    draft_rows = (ar_b[:, None] * (K + 1) + torch.arange(K, device=dev)[None]).reshape(-1)    # [N]
    bonus_rows = ar_b * (K + 1) + K                                                              # [B]
    q = None
    if draft_probs:
        qf = torch.softmax(logits[draft_rows] + torch.randn(N, V, generator=gen, device=dev), -1)
        drafts = torch.multinomial(qf, 1, generator=gen).squeeze(1)
        q = qf.to(DTYPES[dtype])
    else:
        noise = torch.randint(0, V, (N,), generator=gen, device=dev)
        keep = torch.rand(N, generator=gen, device=dev) < DRAFT_MATCH
        drafts = torch.where(keep, top[draft_rows], noise)
    target = logits.to(DTYPES[dtype])
    del logits
    cu = (torch.arange(B + 1, device=dev) * K).to(torch.int32)
    temperature = torch.full((B,), 0.0 if greedy else 1.0, device=dev)
    seeds = torch.arange(B, device=dev, dtype=torch.int64) + 1000 * seed
    positions = torch.randint(0, 4096, (B,), generator=gen, device=dev)
    op_kwargs = dict(draft_probs=q, temperature=temperature, seed=seeds, positions=positions, max_draft_len=K)
    baseline = dict(
        logits=target, draft_tokens=drafts, draft_probs=q, temperature=temperature,
        draft_rows=draft_rows, bonus_rows=bonus_rows,
        row_req=ar_b.repeat_interleave(K + 1), draft_req=ar_b.repeat_interleave(K),
        draft_col=torch.arange(K, device=dev).repeat(B),
        first_draft=cu[:-1].long(), num_draft=(cu[1:] - cu[:-1]).long(), W=K + 1, mode=_mode(greedy))
    elt = target.element_size()
    nbytes = R * V * elt + (N * V * q.element_size() if q is not None else 0)
    return Problem("chain", B, K, V, dtype, (target, drafts, cu), op_kwargs, baseline, nbytes)


def tree_layout(K: int):
    """Tree-local (parents, children [n, 2]) of the benchmark tree: node 0 the root,
    nodes 1..K the main path (node i at depth i), node K+d the sibling at depth d."""
    parents = [-1] + list(range(0, K)) + list(range(0, K))
    children = [[-1, -1] for _ in range(1 + 2 * K)]
    for d in range(1, K + 1):
        children[d - 1] = [d, K + d]
    return parents, children


def build_tree(B: int, K: int, V: int, dtype: str = "fp32", device="cpu", *, seed: int = 0,
               greedy: bool = False) -> Problem:
    """Tree problem: per request a tree of n = 1 + 2K nodes (a main path of depth K plus
    one sibling at each level, siblings carrying distinct tokens); ``target_logits [B·n, V]``."""
    if K < 1 or V < 2:
        raise ValueError("the tree benchmark needs K >= 1 and V >= 2")
    dev = torch.device(device)
    gen = _generator(dev, seed)
    n = 1 + 2 * K
    T = B * n
    logits, top = _peaked_logits(T, V, gen, dev)
    par_local, child_local = tree_layout(K)
    start = torch.arange(B, device=dev) * n                                                    # [B]
    main_parent_rows = start[:, None] + torch.arange(K, device=dev)[None]                      # [B, K]
    noise = torch.randint(0, V, (B, K), generator=gen, device=dev)
    keep = torch.rand(B, K, generator=gen, device=dev) < DRAFT_MATCH
    main = torch.where(keep, top[main_parent_rows], noise)
    sib = (main + 1 + torch.randint(0, V - 1, (B, K), generator=gen, device=dev)) % V           # != main
    root = torch.randint(0, V, (B, 1), generator=gen, device=dev)
    tokens = torch.cat([root, main, sib], 1).reshape(-1)                                       # [T] int64
    parents = torch.tensor(par_local, dtype=torch.int32, device=dev).repeat(B)
    cu = (torch.arange(B + 1, device=dev) * n).to(torch.int32)
    row_req = torch.arange(B, device=dev).repeat_interleave(n)
    child_idx = torch.tensor(child_local, dtype=torch.long, device=dev).repeat(B, 1)           # [T, 2]
    child_tok = torch.where(child_idx >= 0, tokens[start[row_req][:, None] + child_idx.clamp(min=0)], -1)
    target = logits.to(DTYPES[dtype])
    del logits
    temperature = torch.full((B,), 0.0 if greedy else 1.0, device=dev)
    seeds = torch.arange(B, device=dev, dtype=torch.int64) + 1000 * seed
    positions = torch.randint(0, 4096, (B,), generator=gen, device=dev)
    op_kwargs = dict(draft_probs=None, temperature=temperature, seed=seeds, positions=positions, max_depth=K)
    baseline = dict(logits=target, temperature=temperature, tree_start=start, row_req=row_req,
                    child_idx=child_idx, child_tok=child_tok, max_depth=K, mode=_mode(greedy))
    return Problem("tree", B, K, V, dtype, (target, tokens, parents, cu), op_kwargs, baseline,
                   T * V * target.element_size())


def build_problem(op: str, B: int, K: int, V: int, dtype: str, device, *, seed: int = 0, greedy: bool = False,
                  draft_probs: bool = False) -> Problem:
    if op == "chain":
        return build_chain(B, K, V, dtype, device, seed=seed, greedy=greedy, draft_probs=draft_probs)
    if op == "tree":
        if draft_probs:
            raise ValueError("the tree benchmark has no draft-probs variant")
        return build_tree(B, K, V, dtype, device, seed=seed, greedy=greedy)
    raise ValueError(f"unknown op {op!r}; expected one of {OPS}")


# =========================================================================== baselines


def eager_chain(logits, draft_tokens, draft_probs, temperature, draft_rows, bonus_rows, row_req, draft_req,
                draft_col, first_draft, num_draft, W: int, mode: str):
    """The chain baseline (module docstring): the rejection-sampling pipeline in plain
    torch ops, vLLM v1 style. ``mode``: "random", "greedy" or "mixed" (known on the host,
    as engines know whether a batch is all-greedy / all-random)."""
    N = draft_tokens.numel()
    B = bonus_rows.numel()
    dev = logits.device
    x = draft_tokens.long()
    if mode != "greedy":
        t = temperature[row_req]
        t = torch.where(t == 0, torch.ones_like(t), t)
        probs = torch.softmax(logits.float() / t[:, None], dim=-1)              # [N + B, V] fp32
        p_draft = probs[draft_rows]                                              # [N, V]
        p_x = p_draft.gather(1, x[:, None]).squeeze(1)
        u = torch.rand(N, device=dev)
        if draft_probs is None:
            accept_r = u < p_x
            resid = p_draft.scatter(1, x[:, None], 0.0)                          # clamp(p - onehot(x), 0)
        else:
            q = draft_probs.float()
            accept_r = u < p_x / q.gather(1, x[:, None]).squeeze(1)
            resid = (p_draft - q).clamp_min(0)
        resid = resid / resid.sum(-1, keepdim=True).clamp_min(1e-30)
        recovered_r = torch.multinomial(resid, 1).squeeze(1)                     # [N]
        bonus_r = torch.multinomial(probs[bonus_rows], 1).squeeze(1)             # [B]
    if mode != "random":
        amax = logits.argmax(-1)                                                 # [N + B]
        accept_g = x == amax[draft_rows]
        recovered_g, bonus_g = amax[draft_rows], amax[bonus_rows]
    if mode == "random":
        accept, recovered, bonus = accept_r, recovered_r, bonus_r
    elif mode == "greedy":
        accept, recovered, bonus = accept_g, recovered_g, bonus_g
    else:
        g_draft, g_req = temperature[draft_req] == 0, temperature == 0
        accept = torch.where(g_draft, accept_g, accept_r)
        recovered = torch.where(g_draft, recovered_g, recovered_r)
        bonus = torch.where(g_req, bonus_g, bonus_r)
    acc_pad = torch.zeros(B, W, dtype=torch.long, device=dev)
    acc_pad[draft_req, draft_col] = accept.long()
    n_acc = acc_pad.cumprod(1).sum(1)                                            # [B] leading accepts
    stop = (first_draft + n_acc).clamp(max=max(N - 1, 0))
    token = torch.where(n_acc < num_draft, recovered[stop], bonus)
    drafts_pad = torch.full((B, W), -1, dtype=torch.long, device=dev)
    drafts_pad[draft_req, draft_col] = x
    cols = torch.arange(W, device=dev)[None]
    out = torch.where(cols < n_acc[:, None], drafts_pad, -1)
    out = torch.where(cols == n_acc[:, None], token[:, None], out)
    return out.to(torch.int32), n_acc.to(torch.int32)


def eager_tree(logits, temperature, tree_start, row_req, child_idx, child_tok, max_depth: int, mode: str):
    """The tree baseline (module docstring): softmax probs of all rows, then every
    request walks its tree with one multinomial per visited node, vectorized over the
    requests and unrolled over depth; no host read-back."""
    B = tree_start.numel()
    D = max_depth + 1
    dev = logits.device
    if mode != "greedy":
        t = temperature[row_req]
        t = torch.where(t == 0, torch.ones_like(t), t)
        probs = torch.softmax(logits.float() / t[:, None], dim=-1)              # [T, V] fp32
    if mode != "random":
        amax = logits.argmax(-1)
        greedy_req = temperature == 0
    node = torch.zeros(B, dtype=torch.long, device=dev)                          # tree-local index
    alive = torch.ones(B, dtype=torch.bool, device=dev)
    accepted = torch.full((B, D), -1, dtype=torch.long, device=dev)
    accepted[:, 0] = 0
    out = torch.full((B, D), -1, dtype=torch.long, device=dev)
    num = torch.zeros(B, dtype=torch.long, device=dev)
    for d in range(D):
        row = tree_start + node
        if mode == "greedy":
            y = amax[row]
        else:
            y = torch.multinomial(probs[row], 1).squeeze(1)
            if mode == "mixed":
                y = torch.where(greedy_req, amax[row], y)
        out[:, d] = torch.where(alive, y, -1)
        match = child_tok[row] == y[:, None]                                     # [B, 2]
        nxt = torch.where(match, child_idx[row], 0).sum(1)                       # siblings' tokens are distinct
        advance = alive & match.any(1)
        if d + 1 < D:
            accepted[:, d + 1] = torch.where(advance, nxt, -1)
        node = torch.where(advance, nxt, node)
        num = num + advance.long()
        alive = advance
    return accepted.to(torch.int32), out.to(torch.int32), num.to(torch.int32)


EAGER = {"chain": eager_chain, "tree": eager_tree}
_COMPILED: dict[str, Callable] = {}


def compiled_baseline(op: str) -> Callable:
    """torch.compile (default mode) of the op's eager baseline, one per op and process."""
    if op not in _COMPILED:
        import torch._dynamo
        cfg = torch._dynamo.config
        limit_name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
        setattr(cfg, limit_name, max(getattr(cfg, limit_name), 64))
        if hasattr(cfg, "fail_on_recompile_limit_hit"):
            cfg.fail_on_recompile_limit_hit = True       # never run eager while labelled "compiled"
        _COMPILED[op] = torch.compile(EAGER[op])
    return _COMPILED[op]


# =========================================================================== backends


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_backends(device) -> list[str]:
    if torch.device(device).type == "cuda":
        return list(ALL_BACKENDS)
    return ["eager", "compiled", "torch"]


def default_grid(device, quick: bool = False) -> dict:
    gpu = torch.device(device).type == "cuda"
    if quick:
        return dict(GPU_QUICK_GRID if gpu else CPU_QUICK_GRID)
    return dict(GPU_GRID if gpu else CPU_GRID)


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    line = text[0] if text else type(e).__name__
    return line if len(line) <= limit else line[:limit - 1] + "…"


_CUDA_STATUS: dict[str, tuple[bool, str]] = {}


def cuda_backend_status(device) -> tuple[bool, str]:
    """(available, reason): import ``fastverify._cuda`` (which may build the extension)
    and run each op once on a tiny problem; available when at least one op runs."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return False, "the cuda backend needs a CUDA device"
    key = str(dev)
    if key not in _CUDA_STATUS:
        try:
            import importlib
            importlib.import_module("fastverify._cuda")
        except Exception as e:  # noqa: BLE001 - any failure to import/build means "unavailable"
            _CUDA_STATUS[key] = (False, "import of fastverify._cuda failed: " + _first_line(e))
            return _CUDA_STATUS[key]
        failures = []
        for op in OPS:       # an op that fails here shows up again, with its reason, in its rows
            try:
                with fastverify.use_backend("cuda"):
                    build_problem(op, 2, 2, 64, "fp32", dev).run_op()
                torch.cuda.synchronize(dev)
            except Exception as e:  # noqa: BLE001
                failures.append(f"{op}: {_first_line(e)}")
        ok = len(failures) < len(OPS)
        _CUDA_STATUS[key] = (ok, "build/load/run failed: " + "; ".join(failures) if failures else "")
    return _CUDA_STATUS[key]


def make_call(problem: Problem, backend: str) -> Callable:
    """Zero-argument callable running ``problem`` on ``backend``. For the kernel backends
    run it inside :func:`backend_context` (the backend is chosen outside the call)."""
    if backend == "eager":
        fn, kw = EAGER[problem.op], problem.baseline_kwargs
        return lambda: fn(**kw)
    if backend == "compiled":
        fn, kw = compiled_baseline(problem.op), problem.baseline_kwargs
        return lambda: fn(**kw)
    if backend in KERNEL_BACKENDS:
        return problem.run_op
    raise ValueError(f"unknown backend {backend!r}; expected one of {ALL_BACKENDS}")


def backend_context(backend: str):
    return fastverify.use_backend(backend) if backend in KERNEL_BACKENDS else contextlib.nullcontext()


def unsupported_reason(backend: str, device) -> Optional[str]:
    """Why ``backend`` is not timed on ``device`` (None: it is)."""
    dev = torch.device(device)
    if backend not in ALL_BACKENDS:
        return f"unknown backend {backend!r}"
    if dev.type != "cuda":
        if backend == "triton":
            return "triton on CPU runs only under the Triton interpreter, far too slow to time"
        if backend == "cuda":
            return "the cuda backend needs a CUDA device"
    elif backend == "cuda":
        ok, why = cuda_backend_status(dev)
        return None if ok else why
    return None


# =========================================================================== timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def l2_bytes(device) -> int:
    dev = torch.device(device)
    if dev.type != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0) or DEFAULT_L2_BYTES)


def input_sets_for(set_bytes: int, device) -> tuple[int, bool]:
    """(number of input sets to rotate over, whether to flush L2 between calls)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return 2, False
    l2 = l2_bytes(dev)
    n = max(2, min(MAX_INPUT_SETS, math.ceil(3 * l2 / max(set_bytes, 1))))
    return n, n * set_bytes < 2 * l2


def time_calls(calls: list[Callable], device, *, target_s: float = 0.2, min_reps: int = 5, max_reps: int = 300,
               flush: bool = False, wall: Optional[list] = None) -> list[float]:
    """Seconds per call (one entry per timed call), rotating over ``calls``; warm-up
    and the choice of the repeat count happen before the timed calls. ``wall``, if
    given, receives the host wall time per call of three back-to-back calls ending in
    a synchronize (host launch overhead included; on CUDA the per-call events can hide
    it when the device is busy, e.g. with the L2 flush)."""
    dev = torch.device(device)
    n = len(calls)
    for i in range(max(2, n)):
        calls[i % n]()
    _sync(dev)
    t0 = time.perf_counter()
    for i in range(3):
        calls[i % n]()
    _sync(dev)
    est = max((time.perf_counter() - t0) / 3, 1e-7)
    if wall is not None:
        wall.append(est)
    reps = int(min(max_reps, max(min_reps, target_s / est)))
    if dev.type == "cuda":
        scratch = torch.empty(2 * l2_bytes(dev), dtype=torch.uint8, device=dev) if flush else None
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            if scratch is not None:
                scratch.zero_()                       # outside the event pair
            starts[i].record()
            calls[i % n]()
            ends[i].record()
        torch.cuda.synchronize(dev)                   # the only sync: stops the clock
        return [s.elapsed_time(e) * 1e-3 for s, e in zip(starts, ends)]
    times = []
    for i in range(reps):
        t = time.perf_counter()
        calls[i % n]()
        times.append(time.perf_counter() - t)
    return times


def count_launches(call: Callable, device, calls: int = 3) -> tuple[Optional[float], Optional[float], str]:
    """(kernels per call, memcpy/memset per call, note) from torch.profiler's CUDA
    activity; (None, None, reason) where it cannot be read."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return None, None, "CPU"
    try:
        from torch.profiler import ProfilerActivity, profile
        call()
        torch.cuda.synchronize(dev)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                call()
            torch.cuda.synchronize(dev)
        kernels = memops = 0
        for e in prof.events():
            if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
                continue
            name = (e.name or "").lower()
            if "sync" in name:                   # CUPTI synchronization records, not launches
                continue
            if name.startswith("memcpy") or name.startswith("memset"):
                memops += 1
            else:
                kernels += 1
        if kernels == 0 and memops == 0:
            return None, None, "the profiler recorded no CUDA activity"
        return kernels / calls, memops / calls, ""
    except Exception as e:  # noqa: BLE001
        return None, None, "profiler failed: " + _first_line(e)


def datasheet_peak(name: str) -> tuple[Optional[float], str]:
    n = name.upper()
    if "H200" in n:
        return 4.8e12, "H200 datasheet, 4.8 TB/s"
    if "H100" in n and "PCIE" not in n and "NVL" not in n:
        return 3.35e12, "H100 SXM datasheet, 3.35 TB/s"
    if "A100" in n and "80GB" in n:
        return 2.0e12, "A100 80GB datasheet, 2.0 TB/s"
    return None, ""


def copy_bandwidth(device, nbytes: int = 256 * 2**20, reps: int = 10) -> float:
    """Measured copy bandwidth in bytes/s, counting bytes read plus bytes written:
    a copy of ``nbytes`` into a preallocated tensor, median of ``reps``."""
    dev = torch.device(device)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = time_calls([lambda: dst.copy_(src)], dev, target_s=0.0, min_reps=reps, max_reps=reps)
    return 2 * nbytes / statistics.median(times)


def device_name(device) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    name = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {name or platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def device_slug(device) -> str:
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu-" + device_name(dev)[4:].split(" (")[0]
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug[:48].strip("-") or dev.type


def peak_bandwidth(device) -> dict:
    """{'peak': bytes/s used for the bound, 'source': where it came from, 'copy': measured copy bytes/s}."""
    dev = torch.device(device)
    copy = copy_bandwidth(dev)
    if dev.type == "cuda":
        peak, source = datasheet_peak(torch.cuda.get_device_name(dev))
        if peak is None:
            return {"peak": copy, "source": "measured device-to-device copy (read + write)", "copy": copy}
        return {"peak": peak, "source": source, "copy": copy}
    return {"peak": copy, "source": "measured CPU memcpy: copy of a 256 MB tensor into a preallocated one, "
                                    "read + write counted (a CPU, not a GPU bound)", "copy": copy}


# =========================================================================== running


@dataclass
class Result:
    op: str
    B: int
    K: int
    V: int
    dtype: str
    backend: str
    status: str = "ok"                     # ok | n/a
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
    vs_eager: Optional[float] = None
    vs_compiled: Optional[float] = None
    kernels_per_call: Optional[float] = None
    memops_per_call: Optional[float] = None
    mean_accepted: Optional[float] = None
    warmup_s: Optional[float] = None
    wall_us: Optional[float] = None        # host wall time per call incl. launch overhead (3 calls + sync)

    def key(self):
        return (self.op, self.B, self.K, self.V, self.dtype)


@dataclass
class Options:
    device: torch.device = field(default_factory=default_device)
    ops: tuple = OPS
    backends: Optional[list] = None        # None: default_backends(device)
    grid: Optional[dict] = None            # None: default_grid(device, quick)
    quick: bool = False
    greedy: bool = False
    draft_probs: bool = False
    target_s: float = 0.0                  # seconds of timed calls per measurement; 0: 0.2 on CUDA, 0.3 on CPU
    launches: bool = True                  # count kernel launches at B = 1 (CUDA)
    threads: int = 0                       # torch.set_num_threads before measuring (0: leave as is)


@dataclass
class Report:
    meta: dict
    results: list


def configs(grid: dict) -> list[tuple[int, int, int, str]]:
    return [(B, K, V, dt) for dt in grid["dtype"] for V in grid["V"] for K in grid["K"] for B in grid["B"]]


def _mean_accepted(out, op: str) -> float:
    num = out[1] if op == "chain" else out[2]
    return float(num.float().mean())


def cores_busy_elsewhere(seconds: float = 0.5) -> Optional[float]:
    """Cores kept busy by other processes, from /proc/stat over ``seconds`` while this
    one sleeps (Linux; None elsewhere)."""
    def sample():
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return sum(vals[:8]), idle
    try:
        t0, i0 = sample()
        time.sleep(seconds)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if t1 <= t0:
        return None
    return (1 - (i1 - i0) / (t1 - t0)) * (os.cpu_count() or 1)


def git_revision() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10)
        if rev.returncode != 0:
            return "n/a"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "n/a"


def versions() -> dict:
    v = {"python": platform.python_version(), "torch": torch.__version__, "fastverify": fastverify.__version__}
    try:
        import triton
        v["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001
        v["triton"] = "n/a (" + _first_line(e, 80) + ")"
    if torch.version.cuda:
        v["cuda"] = torch.version.cuda
    return v


def run(opts: Options, command: str = "", log: Callable[[str], None] = print,
        on_result: Optional[Callable[[int, int, Result, float], None]] = None) -> Report:
    """Measure every (op, config, backend) of ``opts``; ``on_result(done, total, result,
    elapsed_s)`` is called after each measurement."""
    dev = torch.device(opts.device)
    grid = opts.grid or default_grid(dev, opts.quick)
    target_s = opts.target_s or (0.2 if dev.type == "cuda" else 0.3)
    wanted = list(opts.backends or default_backends(dev))
    wanted = [b for b in ALL_BACKENDS if b in wanted]           # baselines first: speedups need them
    skipped = {}
    backends = []
    for b in wanted:
        if b == "cuda" and dev.type == "cuda":
            log("checking the cuda backend (may build the extension) ...")
        why = unsupported_reason(b, dev)
        if why is None:
            backends.append(b)
        else:
            skipped[b] = why
            log(f"{b}: not measured ({why})")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    busy = cores_busy_elsewhere() if dev.type == "cpu" else None
    if busy is not None and busy > 0.3:
        free = max(1, int((os.cpu_count() or 1) - busy + 0.5))
        log(f"note: other processes keep {busy:.1f} of {os.cpu_count()} cores busy; CPU numbers will be noisy"
            + (f" (with {torch.get_num_threads()} torch threads, try --threads {free})"
               if torch.get_num_threads() > free else ""))
    log("measuring copy bandwidth ...")
    bw = peak_bandwidth(dev)
    meta = {
        "device": device_name(dev),
        "device_type": dev.type,
        "peak_bytes_per_s": bw["peak"],
        "peak_source": bw["source"],
        "copy_bytes_per_s": bw["copy"],
        "l2_bytes": l2_bytes(dev) or None,
        "versions": versions(),
        "git": git_revision(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "grid": grid,
        "ops": list(opts.ops),
        "backends": backends,
        "not_measured": skipped,
        "greedy": opts.greedy,
        "draft_probs": opts.draft_probs,
        "target_s": target_s,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg_1min_at_start": load,
        "cores_busy_elsewhere_at_start": busy,
        "inputs": (f"logits randn×2 with each row's argmax raised to a probability in U{PEAK_RANGE}; drafts = "
                   f"argmax w.p. {DRAFT_MATCH}, else uniform; temperature "
                   f"{'0 (greedy)' if opts.greedy else '1.0 (random)'}"
                   + ("; chain with draft_probs" if opts.draft_probs else "; chain without draft_probs")),
        "env": {k: os.environ[k] for k in ("FASTVERIFY_BACKEND", "FASTVERIFY_CHECKS", "TRITON_INTERPRET")
                if k in os.environ},
    }
    cfgs = configs(grid)
    total = len(opts.ops) * len(cfgs) * len(backends)
    results: list[Result] = []
    done = 0
    t_start = time.perf_counter()
    compile_broken: dict[str, str] = {}
    for op in opts.ops:
        for (B, K, V, dt) in cfgs:
            sets = _build_sets(op, B, K, V, dt, dev, opts)
            per_cfg: dict[str, Result] = {}
            for backend in backends:
                r = _measure(op, B, K, V, dt, backend, sets, dev, opts, target_s, bw, per_cfg, compile_broken)
                per_cfg[backend] = r
                results.append(r)
                done += 1
                if on_result is not None:
                    on_result(done, total, r, time.perf_counter() - t_start)
            _fill_speedups(per_cfg)            # eager's "× vs compiled" is known only now
            del sets
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    meta["elapsed_s"] = time.perf_counter() - t_start
    return Report(meta, results)


def _fill_speedups(per_cfg: dict) -> None:
    for base, attr in (("eager", "vs_eager"), ("compiled", "vs_compiled")):
        b = per_cfg.get(base)
        if b is None or not b.median_us:
            continue
        for r in per_cfg.values():
            if r.median_us:
                setattr(r, attr, b.median_us / r.median_us)


def _build_sets(op, B, K, V, dt, dev, opts) -> list[Problem]:
    dp = opts.draft_probs and op == "chain"          # the tree benchmark has no draft-probs variant
    first = build_problem(op, B, K, V, dt, dev, seed=0, greedy=opts.greedy, draft_probs=dp)
    n, _ = input_sets_for(first.input_bytes(), dev)
    return [first] + [build_problem(op, B, K, V, dt, dev, seed=s, greedy=opts.greedy, draft_probs=dp)
                      for s in range(1, n)]


def _measure(op, B, K, V, dt, backend, sets, dev, opts, target_s, bw, per_cfg, compile_broken) -> Result:
    r = Result(op, B, K, V, dt, backend, bytes=sets[0].nbytes, n_sets=len(sets))
    if backend == "compiled" and op in compile_broken:
        r.status, r.reason = "n/a", "torch.compile failed earlier in this run: " + compile_broken[op]
        return r
    _, r.l2_flush = input_sets_for(sets[0].input_bytes(), dev)
    calls = [make_call(p, backend) for p in sets]
    with backend_context(backend):
        try:
            t0 = time.perf_counter()
            out = calls[0]()                 # first call: compiles (compiled, triton), builds, autotunes
            _sync(dev)
            r.warmup_s = time.perf_counter() - t0
            r.mean_accepted = _mean_accepted(out, op)
            wall: list = []
            times = time_calls(calls, dev, target_s=target_s, flush=r.l2_flush, wall=wall)
            r.wall_us = wall[0] * 1e6
        except Exception as e:  # noqa: BLE001 - report, never fake numbers
            r.status = "n/a"
            r.reason = ("torch.compile failed: " if backend == "compiled" else "failed: ") + _first_line(e)
            if backend == "compiled":
                compile_broken[op] = _first_line(e)
            return r
        if opts.launches and dev.type == "cuda" and B == 1:
            r.kernels_per_call, r.memops_per_call, _ = count_launches(calls[0], dev)
    times.sort()
    med = statistics.median(times)
    r.reps = len(times)
    r.median_us = med * 1e6
    r.p10_us = times[int(0.1 * (len(times) - 1))] * 1e6
    r.p90_us = times[int(0.9 * (len(times) - 1))] * 1e6
    r.gbps = r.bytes / med / 1e9
    r.pct_of_bound = 100.0 * (r.bytes / bw["peak"]) / med
    r.pct_of_copy = 100.0 * (r.bytes / bw["copy"]) / med
    for base, attr in (("eager", "vs_eager"), ("compiled", "vs_compiled")):
        b = per_cfg.get(base) if base != backend else r
        if b is not None and b.median_us:
            setattr(r, attr, b.median_us / r.median_us)
    return r


# =========================================================================== report


def _fmt(v, spec: str, na: str = "n/a") -> str:
    return na if v is None else format(v, spec)


def _fmt_us(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:.1f}" if v < 1e4 else f"{v:,.0f}"


def _fmt_x(v) -> str:
    """A speedup: 12.3, 1.23, 0.123 (never a bare 0.00)."""
    if v is None:
        return "n/a"
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}" if v >= 0.1 else f"{v:.2g}"


def result_line(r: Result) -> str:
    """One line describing a measurement (streamed by the CLI)."""
    head = f"{r.op:5s} B={r.B:<3d} K={r.K:<2d} V={r.V:<6d} {r.dtype:4s} {r.backend:8s}"
    if r.status != "ok":
        return f"{head} n/a  ({r.reason})"
    s = (f"{head} {_fmt_us(r.median_us):>9s} µs {r.gbps:8.1f} GB/s {r.pct_of_bound:6.1f}% of bound"
         f"  ×{_fmt_x(r.vs_eager)} eager  ×{_fmt_x(r.vs_compiled)} compiled")
    if r.kernels_per_call is not None:
        s += f"  {r.kernels_per_call:g} kernels/call"
    return s


def target_line(report: Report, op: str) -> str:
    tc = TARGET_CONFIG
    rows = [r for r in report.results if r.op == op and (r.B, r.K, r.V, r.dtype) ==
            (tc["B"], tc["K"], tc["V"], tc["dtype"]) and r.backend in KERNEL_BACKENDS]
    parts = []
    for b in KERNEL_BACKENDS:
        rr = [r for r in rows if r.backend == b]
        if b in report.meta.get("not_measured", {}):
            if report.meta["device_type"] == "cuda":
                parts.append(f"{b}: not measured ({report.meta['not_measured'][b]})")
            continue
        if not rr:
            continue
        r = rr[0]
        if r.status != "ok":
            parts.append(f"{b}: not measured ({r.reason})")
            continue
        met = (r.pct_of_bound >= TARGET_PCT_OF_BOUND and r.vs_eager is not None and r.vs_eager >= TARGET_VS_EAGER)
        parts.append(f"{b}: {r.pct_of_bound:.0f}% of bound, ×{_fmt_x(r.vs_eager)} vs eager → "
                     f"{'met' if met else 'not met'}")
    if not parts:
        return "not measured (configuration not in this run)"
    if report.meta["device_type"] != "cuda":
        return "not measured (targets are GPU targets; this run is on CPU): " + "; ".join(parts)
    return "; ".join(parts)


def render_markdown(report: Report) -> str:
    m = report.meta
    v = m["versions"]
    lines = [
        f"# fastverify microbenchmarks — {m['device']}",
        "",
        f"- device: {m['device']}" + (f" (L2 {m['l2_bytes'] / 2**20:.0f} MiB)" if m.get("l2_bytes") else ""),
        f"- bound: {m['peak_bytes_per_s'] / 1e9:,.0f} GB/s — {m['peak_source']}"
        + ("" if m["copy_bytes_per_s"] == m["peak_bytes_per_s"] else
           f"; measured copy bandwidth {m['copy_bytes_per_s'] / 1e9:,.0f} GB/s (read + write)"),
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- git: {m['git']}",
        f"- date: {m['date']}",
        f"- command: `{m['command']}`" if m.get("command") else "- command: (programmatic)",
        f"- inputs: {m['inputs']}",
        "- timing: " + ("CUDA events per call, back to back, median; inputs rotated over sets exceeding L2 "
                        "(where rotation cannot exceed it the L2 is flushed between calls, which also lets the "
                        "host run ahead: such rows show device time; the JSON's wall_us includes the host)"
                        if m["device_type"] == "cuda" else "time.perf_counter per call, median")
        + f"; ~{m['target_s']:g} s of timed calls per row",
        "- baselines: eager = torch pipeline (softmax → fp32 probs, p/q test, cumprod, residual + "
        "torch.multinomial for every draft row and the bonus rows); compiled = torch.compile of it "
        "(default mode); tree: eager walk, one multinomial per visited node, vectorized over requests",
        "- bytes: chain B·(K+1)·V·bytes_per_logit" + (" + B·K·V·bytes of draft_probs" if m.get("draft_probs") else "")
        + "; tree B·(1+2K)·V·bytes_per_logit; % of bound = (bytes / bound bandwidth) / time",
    ]
    if m.get("env"):
        lines.append("- environment: " + ", ".join(f"{k}={val}" for k, val in m["env"].items()))
        if m["env"].get("FASTVERIFY_CHECKS", "0") not in ("", "0"):
            lines.append("- **FASTVERIFY_CHECKS is on: value checks read data back to the host; op numbers are "
                         "pessimistic**")
    for b, why in m.get("not_measured", {}).items():
        lines.append(f"- {b}: not measured — {why}")
    busy = m.get("cores_busy_elsewhere_at_start")
    if m["device_type"] != "cuda":
        lines.append(f"- CPU: {m.get('torch_threads')} torch threads, {m.get('cpu_count')} cores; other processes "
                     f"kept {_fmt(busy, '.1f')} cores busy at start"
                     + (" — **the CPU was shared: numbers are noisy**" if busy is not None and busy > 0.3 else ""))
    lines.append(f"- elapsed: {m.get('elapsed_s', 0):.0f} s")
    lines.append("")
    names = {"chain": "rejection_sample (chain drafts)", "tree": "tree_rejection_sample (1 + 2K nodes per request)"}
    for op in m["ops"]:
        rows = [r for r in report.results if r.op == op]
        if not rows:
            continue
        lines += [f"## {names.get(op, op)}", "",
                  "| B | K | V | dtype | backend | median µs | GB/s | % of bound | × vs eager | × vs compiled |",
                  "|--:|--:|--:|:--|:--|--:|--:|--:|--:|--:|"]
        order = {b: i for i, b in enumerate(ALL_BACKENDS)}
        reasons = {}
        for r in sorted(rows, key=lambda r: (r.dtype, r.V, r.K, r.B, order.get(r.backend, 9))):
            if r.status == "ok":
                cells = [_fmt_us(r.median_us), f"{r.gbps:.1f}", f"{r.pct_of_bound:.1f}",
                         _fmt_x(r.vs_eager), _fmt_x(r.vs_compiled)]
            else:
                cells = ["n/a"] * 5
                reasons.setdefault(r.backend, r.reason)
            lines.append(f"| {r.B} | {r.K} | {r.V} | {r.dtype} | {r.backend} | " + " | ".join(cells) + " |")
        lines.append("")
        for b, why in reasons.items():
            lines.append(f"- {b}: n/a — {why}")
        if reasons:
            lines.append("")
        tc = TARGET_CONFIG
        lines.append(f"**Targets** (B={tc['B']}, K={tc['K']}, V={tc['V']}, {tc['dtype']}: ≥{TARGET_PCT_OF_BOUND:.0f}% "
                     f"of bound and ≥{TARGET_VS_EAGER:.0f}× vs eager): {target_line(report, op)}")
        acc = [r.mean_accepted for r in rows if r.mean_accepted is not None and r.backend == "eager"]
        if acc:
            span = f"{min(acc):.2f}" if min(acc) == max(acc) else f"{min(acc):.2f}–{max(acc):.2f}"
            lines.append(f"\nMean accepted drafts per request (eager, first input set of each row): {span}.")
        launches = [r for r in rows if r.kernels_per_call is not None]
        if launches:
            lines += ["", f"Kernel launches per call at B=1 (torch.profiler; target ≤ {TARGET_LAUNCHES} for the "
                          "kernel backends):", "",
                      "| backend | kernels per call | memcpy/memset per call | target met |", "|:--|--:|--:|:--|"]
            for b in ALL_BACKENDS:
                ks = [r.kernels_per_call for r in launches if r.backend == b]
                ms = [r.memops_per_call or 0 for r in launches if r.backend == b]
                if ks:
                    rng = lambda xs: f"{min(xs):g}" if min(xs) == max(xs) else f"{min(xs):g}–{max(xs):g}"  # noqa: E731
                    met = ("yes" if max(ks) + max(ms) <= TARGET_LAUNCHES else "no") if b in KERNEL_BACKENDS else "—"
                    lines.append(f"| {b} | {rng(ks)} | {rng(ms)} | {met} |")
        lines.append("")
    return "\n".join(lines)


def report_to_json(report: Report) -> dict:
    return {"meta": report.meta, "results": [dataclasses.asdict(r) for r in report.results]}


def plot(report: Report, path) -> None:
    """PNG: per op, % of bound per config and backend (top) and speedup vs eager (bottom)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = [op for op in report.meta["ops"] if any(r.op == op and r.status == "ok" for r in report.results)]
    if not ops:
        return
    keys = sorted({r.key()[1:] for r in report.results}, key=lambda k: (k[3], k[2], k[1], k[0]))
    width = max(8.0, 0.3 * len(keys) + 3)
    fig, axes = plt.subplots(2 * len(ops), 1, figsize=(width, 3.4 * 2 * len(ops)), squeeze=False)
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    markers = {"eager": "x", "compiled": "P", "torch": "s", "triton": "o", "cuda": "^"}
    colors = {"eager": "tab:gray", "compiled": "tab:orange", "torch": "tab:green", "triton": "tab:blue",
              "cuda": "tab:red"}
    labels = [f"B{B} K{K} V{V // 1000}k {dt}" for (B, K, V, dt) in keys]
    xs = list(range(len(keys)))
    bound_label = "% of bound (" + ("CPU copy bw" if report.meta["device_type"] != "cuda" else
                                   f"{report.meta['peak_bytes_per_s'] / 1e12:.2f} TB/s") + ")"
    present = [b for b in ALL_BACKENDS if any(r.backend == b and r.status == "ok" for r in report.results)]
    w = 0.8 / max(len(present), 1)
    for i, op in enumerate(ops):
        ax_b, ax_s = axes[2 * i][0], axes[2 * i + 1][0]
        for j, b in enumerate(present):
            by_key = {r.key()[1:]: r for r in report.results if r.op == op and r.backend == b and r.status == "ok"}
            pct = [by_key[k].pct_of_bound if k in by_key else float("nan") for k in keys]
            spd = [by_key[k].vs_eager if k in by_key and by_key[k].vs_eager else float("nan") for k in keys]
            off = [x + (j - (len(present) - 1) / 2) * w for x in xs]
            ax_b.bar(off, pct, width=w, label=b, color=colors.get(b))
            if b != "eager":
                ax_s.plot(off, spd, marker=markers.get(b, "."), linestyle="none", markersize=7, label=b,
                          color=colors.get(b))
        if report.meta["device_type"] == "cuda":
            ax_b.axhline(TARGET_PCT_OF_BOUND, color="gray", linestyle=":", linewidth=1)
            ax_s.axhline(TARGET_VS_EAGER, color="gray", linestyle=":", linewidth=1)
        ax_s.axhline(1.0, color="black", linewidth=0.6)
        ax_b.set_ylabel(bound_label)
        ax_b.set_title(f"{op}: % of the memory bound — {report.meta['device']}", fontsize=10)
        spds = [r.vs_eager for r in report.results if r.op == op and r.vs_eager and r.backend != "eager"] + [1.0]
        if max(spds) / min(spds) >= 4:
            ax_s.set_ylabel("speedup vs eager (×, log)")
            ax_s.set_yscale("log")
            ax_s.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax_s.yaxis.set_minor_formatter(NullFormatter())
        else:
            ax_s.set_ylabel("speedup vs eager (×)")
        ax_s.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}×"))
        ax_s.set_title(f"{op}: speedup vs the eager torch pipeline (same run)", fontsize=10)
        for ax in (ax_b, ax_s):
            ax.set_xticks(xs)
            ax.set_xticklabels(labels, rotation=60 if len(keys) > 6 else 0, ha="right" if len(keys) > 6 else "center",
                               fontsize=7 if len(keys) > 6 else 9)
            ax.set_xlim(-0.6, len(keys) - 0.4)
            ax.grid(True, axis="y", alpha=0.3)
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def default_out_dir() -> Path:
    """perf/results of the source checkout when fastverify runs from one, else ./perf/results."""
    repo = Path(__file__).resolve().parents[1]
    if (repo / "perf").is_dir() and (repo / "fastverify").is_dir():
        return repo / "perf" / "results"
    return Path.cwd() / "perf" / "results"


def default_stem(device) -> str:
    return f"{device_slug(device)}-{datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%d')}"


def write_report(report: Report, out_dir=None, stem: Optional[str] = None, device=None,
                 png: bool = True) -> dict:
    """Write <out_dir>/<stem>.{md,json,png}; returns {"md": path, "json": path, "png": path or None}."""
    out = Path(out_dir) if out_dir else default_out_dir()
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


def write_rows_report(meta: dict, rows: list, markdown: str, name: str, label: Callable, out_dir=None,
                      device=None) -> Path:
    """<out>/<device>-<date>-<name>.{md,json,png} for a family whose rows carry ``backend``,
    ``status``, ``median_us`` and ``pct_of_bound`` (perf/bench_lm_head.py,
    perf/bench_sparse_kv.py); the plot shows % of the bound per row (median µs where no
    bound applies, as on CPU), one colour per backend. Returns the path stem."""
    out = Path(out_dir) if out_dir else default_out_dir()
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{default_stem(device if device is not None else meta.get('device_type', 'cpu'))}-{name}"
    for ext, text in ((".md", markdown + "\n"),
                      (".json", json.dumps({"meta": meta, "results": [dataclasses.asdict(r) for r in rows]},
                                           indent=1, default=str) + "\n")):
        tmp = Path(f"{stem}{ext}.tmp")
        tmp.write_text(text)
        os.replace(tmp, f"{stem}{ext}")
    ok = [r for r in rows if r.status == "ok" and r.median_us is not None]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return stem
    if ok:
        use_bound = any(r.pct_of_bound is not None for r in ok) and meta.get("device_type") == "cuda"
        values = [(r.pct_of_bound or 0.0) if use_bound else r.median_us for r in ok]
        backends = sorted({r.backend for r in ok})
        colours = {b: plt.cm.tab10(i % 10) for i, b in enumerate(backends)}
        fig, ax = plt.subplots(figsize=(8, 0.22 * len(ok) + 1.5))
        ax.barh([label(r) for r in ok][::-1], values[::-1], color=[colours[r.backend] for r in ok][::-1])
        ax.set_xlabel("% of the memory bound" if use_bound else "median µs")
        if not use_bound:
            ax.set_xscale("log")
        ax.tick_params(axis="y", labelsize=6)
        ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=colours[b]) for b in backends], labels=backends,
                  fontsize=7)
        ax.set_title(f"{name} — {meta.get('device', '')}", fontsize=9)
        fig.tight_layout()
        fig.savefig(f"{stem}.png.tmp", format="png", dpi=110)
        plt.close(fig)
        os.replace(f"{stem}.png.tmp", f"{stem}.png")
    return stem
