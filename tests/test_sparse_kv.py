"""select_kv_chunks, sparse_kv_attention and streaming_kv_chunks on every backend equal the
naive float64 oracles of naive.py (selections exactly, up to fp32 near-ties; attention within
per-dtype tolerances) over shuffled paged caches: every chunk / page pairing, GQA ratio, head
dim, dtype, split count and budget, ties, NaN scores, strided views, unchecked garbage; plus
the torch-op contract (opcheck, fake tensors, torch.compile) and bad input.

CPU / GPU: tests run over ``BACKENDS`` (torch; triton under the interpreter and cuda through
the emulator here; triton and cuda on CUDA tensors on a GPU). torch and cuda run the whole case
grids; the interpreter runs a subset
meeting every path once, the other rows being ``gpu_sized`` for it. Random shapes: 40 seeds on
CPU, 300 on a GPU; there and at the decode shape the oracles are vectorized in float64
(``attention64``, ``select64``). ``cuda`` tests (graphs, streams, torch.compile on CUDA
tensors, the decode shape) run over the GPU backends.
"""

from __future__ import annotations

import functools
import random
from dataclasses import replace

import pytest
import torch

import naive
from attention_problems import PAGED_KV_BAD, paged_problem
from conftest import BACKENDS, BACKEND_DEVICES, EMULATE_FULL, HAS_CUDA, capture_graph, entry_points

import fastverify
from fastverify.ops import sparse_kv as ops_sparse
from fastverify.ops.sparse_kv import select_kv_chunks_torch, sparse_kv_attention_torch
from fastverify.triton import sparse_kv as triton_sparse

pytestmark = pytest.mark.family("sparse_kv")

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
DTYPES = (F32, BF16, F16)
TOL = {F32: 2e-5, BF16: 3e-2, F16: 4e-3}
KERNEL_BACKENDS = [b for b in BACKENDS if b != "torch"]   # backends with entry points (num_splits)
GPU_BACKENDS = ("torch", "triton", "cuda")
GPU = "cuda"
NAN = float("nan")


@pytest.fixture(autouse=True, scope="module")
def one_intra_op_thread():
    """One torch intra-op thread while this module runs: its tensors are small, and on a
    shared 2-core machine a second thread costs every op a wake-up (a float64 softmax of
    4 x 300 takes ~0.7 ms with two threads under load, ~5 us with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- inputs


def problem(lens, *, Hq=4, Hkv=2, D=64, page=16, dtype=F32, seed=0):
    """One decode query per request (q [B, Hq, D]) over a paged cache of ``lens`` keys, pages shuffled."""
    return paged_problem([1] * len(lens), [L - 1 for L in lens], Hq=Hq, Hkv=Hkv, D=D, page=page, dtype=dtype,
                         seed=seed, kind="single")


def chunk_ids(lens, Hkv: int, C: int, cs: int, seed: int, *, invalid: bool = False) -> torch.Tensor:
    """[B, Hkv, C] int32: distinct full chunks in random slots and random order (KV head 0
    as many as fit), -1 elsewhere; with ``invalid`` one more slot per row holds an id
    outside [-1, F_b) when there is room (what the unchecked paths must skip)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lens), Hkv, C), -1, dtype=torch.int32)
    for b, L in enumerate(lens):
        F = L // cs
        for h in range(Hkv):
            k = min(F, C) if h == 0 else (int(torch.randint(0, min(F, C) + 1, (1,), generator=g)) if F else 0)
            slots = torch.randperm(C, generator=g)
            ids[b, h, slots[:k]] = torch.randperm(F, generator=g)[:k].to(torch.int32)
            if invalid and k < C:
                ids[b, h, slots[k]] = (F, F + 3, -2, -7, 10**6, -2**31)[int(torch.randint(0, 6, (1,), generator=g))]
    return ids


def request_keys(cache, block_table, b: int, n: int) -> torch.Tensor:
    """[n, Hkv, D] float64: the cache rows of key positions 0 .. n - 1 of request b."""
    page = cache.shape[1]
    return cache[block_table[b, :-(-n // page)].long()].flatten(0, 1)[:n].double()


def chunk_means_of(p, cs: int, max_chunks: int, fill=NAN) -> torch.Tensor:
    """[B, max_chunks, Hkv, D] fp32 mean key of each full chunk; ``fill`` past F_b (never read)."""
    B, Hkv, D = p.q.shape[0], p.k_cache.shape[2], p.k_cache.shape[3]
    means = torch.full((B, max_chunks, Hkv, D), fill)
    for b, L in enumerate(p.seq_lens.tolist()):
        F = L // cs
        means[b, :F] = request_keys(p.k_cache, p.block_table, b, F * cs).view(F, cs, Hkv, D).mean(1).float()
    return means


def tie_problem(seed: int):
    """Keys from three small-integer chunk patterns and an integer query: chunk means and
    scores are exact in fp32 (any summation order), and most scores tie exactly."""
    p = problem([130, 97], Hq=4, Hkv=2, D=16, page=16, seed=seed)
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randint(-2, 3, (3, 8, 2, 16), generator=g).float()
    for b, L in enumerate(p.seq_lens.tolist()):
        for c in range(-(-L // 8)):
            pat = patterns[int(torch.randint(0, 3, (1,), generator=g))]
            for t in range(8):
                x = c * 8 + t
                p.k_cache[int(p.block_table[b, x // 16]), x % 16] = pat[t]
    return replace(p, q=torch.randint(-2, 3, p.q.shape, generator=g).float())


# ----------------------------------------------------------------------------- running


def select(backend, p, cs: int, C: int, ns: int = 1, nr: int = 1, means=None) -> torch.Tensor:
    """select_kv_chunks through the public op on ``backend``; ids on CPU."""
    dev = BACKEND_DEVICES[backend]
    x = p.to(dev)
    with fastverify.use_backend(backend):
        ids = fastverify.select_kv_chunks(x.q, x.k_cache, x.block_table, x.seq_lens, chunk_size=cs, num_chunks=C,
                                          num_sink_chunks=ns, num_recent_chunks=nr,
                                          chunk_means=None if means is None else means.to(dev))
    assert ids.dtype == torch.int32 and ids.shape == (p.q.shape[0], p.k_cache.shape[2], C)
    return ids.cpu()


def attend(backend, p, ids, cs: int, sm_scale=None) -> torch.Tensor:
    """sparse_kv_attention through the public op on ``backend``; output on CPU."""
    dev = BACKEND_DEVICES[backend]
    x = p.to(dev)
    with fastverify.use_backend(backend):
        out = fastverify.sparse_kv_attention(x.q, x.k_cache, x.v_cache, x.block_table, x.seq_lens, ids.to(dev),
                                             chunk_size=cs, sm_scale=sm_scale)
    assert out.dtype == p.q.dtype and out.shape == p.q.shape
    return out.cpu()


class TorchSpec:
    """The torch backend's functions in the entry points' signatures (unchecked like them)."""
    select_kv_chunks = staticmethod(select_kv_chunks_torch)

    @staticmethod
    def sparse_kv_attention(q, k_cache, v_cache, block_table, seq_lens, ids, cs, sm_scale, *, num_splits=None):
        return sparse_kv_attention_torch(q, k_cache, v_cache, block_table, seq_lens, ids, cs, sm_scale)


def unchecked(backend):
    """What runs without the value checks (CUDA tensors without FASTVERIFY_CHECKS): the
    backend's entry points, which take ids outside [0, F_b), garbage and ``num_splits``."""
    return TorchSpec if backend == "torch" else entry_points(backend, "sparse_kv")


def attend_unchecked(backend, p, ids, cs: int, sm_scale=None, num_splits=None) -> torch.Tensor:
    """sparse_kv_attention through ``unchecked(backend)``; output on CPU."""
    x = p.to(BACKEND_DEVICES[backend])
    scale = p.q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    out = unchecked(backend).sparse_kv_attention(x.q, x.k_cache, x.v_cache, x.block_table, x.seq_lens,
                                                 ids.to(x.q.device), cs, scale, num_splits=num_splits)
    assert out.dtype == p.q.dtype and out.shape == p.q.shape
    return out.cpu()


def select_unchecked(backend, p, cs: int, C: int, ns: int = 1, nr: int = 1, means=None) -> torch.Tensor:
    """select_kv_chunks through ``unchecked(backend)``; ids on CPU."""
    x = p.to(BACKEND_DEVICES[backend])
    return unchecked(backend).select_kv_chunks(x.q, x.k_cache, x.block_table, x.seq_lens, cs, C, ns, nr,
                                               None if means is None else means.to(x.q.device)).cpu()


# ----------------------------------------------------------------------------- oracles and comparisons


def oracle_attention(p, ids, cs: int, sm_scale=None) -> torch.Tensor:
    return torch.tensor(naive.sparse_kv_attention(p.q.double(), p.k_cache.double(), p.v_cache.double(),
                                                  p.block_table, p.seq_lens, ids, cs, sm_scale), dtype=torch.float64)


def oracle_select(p, cs: int, C: int, ns: int = 1, nr: int = 1, means=None) -> list:
    return naive.select_kv_chunks(p.q.double(), p.k_cache.double(), p.block_table, p.seq_lens, cs, C, ns, nr, means)


def attention64(p, ids, cs: int, sm_scale=None) -> torch.Tensor:
    """naive.sparse_kv_attention's semantics vectorized per (request, KV head), in float64
    on p's device (for shapes where the loops take seconds)."""
    B, Hq, D = p.q.shape
    Hkv = p.k_cache.shape[2]
    G = Hq // Hkv
    dev = p.q.device
    scale = D ** -0.5 if sm_scale is None else sm_scale
    out = torch.zeros(B, Hq, D, dtype=torch.float64, device=dev)
    for b, L in enumerate(p.seq_lens.tolist()):
        F = L // cs
        k, v = request_keys(p.k_cache, p.block_table, b, L), request_keys(p.v_cache, p.block_table, b, L)
        for h in range(Hkv):
            row = ids[b, h].to(dev).long()
            row = row[(row >= 0) & (row < F)]
            pos = torch.cat([(row[:, None] * cs + torch.arange(cs, device=dev)).flatten(),
                             torch.arange(F * cs, L, device=dev)])
            if len(pos):
                w = torch.softmax(p.q[b, h * G:(h + 1) * G].double() @ k[pos, h].T * scale, -1)   # [G, N]
                out[b, h * G:(h + 1) * G] = w @ v[pos, h]
    return out


def chunk_scores64(p, cs: int, means=None) -> list:
    """[B][Hkv][F_b] float64 scores Σ_g q · mean(K_chunk) (NaN as -inf)."""
    B, Hq, D = p.q.shape
    Hkv = p.k_cache.shape[2]
    G = Hq // Hkv
    out = []
    for b, L in enumerate(p.seq_lens.tolist()):
        F = max(L, 0) // cs
        if means is not None:
            m = means[b, :F].to(p.q.device).double()                                   # [F, Hkv, D]
        else:
            m = request_keys(p.k_cache, p.block_table, b, F * cs).view(F, cs, Hkv, D).mean(1)
        qs = p.q[b].double().view(Hkv, G, D).sum(1)                                    # [Hkv, D]
        s = torch.einsum("hd,fhd->hf", qs, m)
        out.append(torch.where(torch.isnan(s), float("-inf"), s).tolist())
    return out


def select64(p, cs: int, C: int, ns: int, nr: int, means=None) -> list:
    """naive.select_kv_chunks's rule over the float64 scores of chunk_scores64 (its own loops
    over keys take seconds at the random shapes): a query of one head of value 1 per KV
    head, whose one-dimensional chunk "means" are the scores."""
    scores = chunk_scores64(p, cs, means)
    B, Hkv = len(scores), p.k_cache.shape[2]
    F = max(len(s) for row in scores for s in row)
    m = torch.full((B, max(F, 1), Hkv, 1), NAN, dtype=torch.float64)
    for b, row in enumerate(scores):
        for h, s in enumerate(row):
            m[b, :len(s), h, 0] = torch.tensor(s, dtype=torch.float64)
    lens = p.seq_lens.cpu().clamp(min=0)
    return naive.select_kv_chunks(torch.ones(B, Hkv, 1, dtype=torch.float64), torch.empty(1, 1, Hkv, 1),
                                  p.block_table.cpu(), lens, cs, C, ns, nr, m)


def assert_close(got, want, dtype, what: str = "") -> None:
    want = want.double().cpu()
    err = (got.double().cpu() - want).abs().max().item()
    assert err <= TOL[dtype] * max(1.0, want.abs().max().item()), f"{what}: max abs error {err:.3g} > {TOL[dtype]}"


def assert_selection(got: torch.Tensor, want: list, p, cs: int, C: int, ns: int, nr: int, means=None,
                     what: str = "") -> None:
    """got equals the oracle's selection, or differs only where scores tie within fp32
    rounding: forced chunks kept, ascending, and no chosen chunk scores below an unchosen one."""
    got = got.tolist()
    scores = None
    for b, L in enumerate(p.seq_lens.tolist()):
        F = max(L, 0) // cs
        for h, (row, ref) in enumerate(zip(got[b], want[b])):
            if row == ref:
                continue
            assert F > C, f"{what}: [{b}, {h}] {row} != {ref} although every chunk fits"
            assert row == sorted(set(row)) and min(row) >= 0 and max(row) < F, f"{what}: [{b}, {h}] bad row {row}"
            forced = set(range(min(ns, F))) | set(range(max(F - nr, 0), F))
            assert forced <= set(row), f"{what}: [{b}, {h}] {row} misses a forced chunk"
            scores = scores or chunk_scores64(p, cs, means)
            s = scores[b][h]
            chosen = [c for c in row if c not in forced]
            others = [c for c in range(F) if c not in forced and c not in row]
            tol = 1e-4 * (1 + max((abs(x) for x in s if x != float("-inf")), default=0.0))
            assert min(s[c] for c in chosen) >= max(s[c] for c in others) - tol, \
                f"{what}: [{b}, {h}] {row} != {ref} beyond rounding"


# ----------------------------------------------------------------------------- grids

DTYPE_NAMES = {F32: "f32", BF16: "bf16", F16: "f16"}


def over_backends(rows, on_interpreter, backends=BACKENDS) -> list:
    """pytest params (backend, *row): every row on every backend (row by row, so the
    cached inputs and references of a row serve all backends), except that on CPU the
    Triton interpreter runs only the rows ``on_interpreter`` keeps (the others are
    ``gpu_sized`` for it: they run on a GPU, or with FASTVERIFY_EMULATE_FULL=1)."""
    name = lambda x: DTYPE_NAMES.get(x, str(x))  # noqa: E731
    return [pytest.param(b, *row, id="-".join([b, *map(name, row)]),
                         marks=pytest.mark.gpu_sized if b == "triton" and not on_interpreter(row) else ())
            for row in rows for b in backends]


# ----------------------------------------------------------------------------- select_kv_chunks

SELECT_CASES = {
    # name: (lens, problem kwargs, chunk_size, num_chunks, num_sink_chunks, num_recent_chunks)
    "cs8_gqa4_d80": ([99, 40, 5, 300], dict(Hq=8, Hkv=2, D=80), 8, 5, 1, 2),
    "cs16_gqa1_two_sinks": ([130, 64, 17], dict(Hq=2, Hkv=2), 16, 5, 2, 1),
    "cs16_gqa4_one_kv_head": ([130, 64, 17], dict(Hq=4, Hkv=1), 16, 4, 1, 1),
    "gqa1_two_sinks_two_recent": ([77, 150], dict(Hq=2, Hkv=2), 8, 6, 2, 2),
    "cs32_spans_pages_gqa8_d128": ([400, 33], dict(Hq=8, Hkv=1, D=128), 32, 4, 1, 1),
    "cs32_spans_pages_gqa8_d64": ([200, 33], dict(Hq=8, Hkv=1), 32, 3, 1, 1),
    "cs4_d256": ([300, 61], dict(Hq=4, Hkv=2, D=256), 4, 9, 1, 1),
    "page8_cs4": ([45, 29], dict(page=8, D=32), 4, 4, 1, 1),
    "gqa3_d33_element_loads": ([150, 90], dict(Hq=6, Hkv=2, D=33), 8, 6, 1, 1),
    "no_forced_chunks": ([200], dict(), 8, 4, 0, 0),
    "forced_fill_the_budget": ([120], dict(), 8, 3, 2, 1),
    "budget_larger_than_sequence": ([40, 70], dict(), 8, 16, 1, 1),
    "shorter_than_one_chunk": ([5, 3, 100], dict(Hkv=1, Hq=2), 16, 3, 1, 1),
}
# under the interpreter (~0.5 s a case): every chunk / page pairing, head dim, dtype, budget
# and forced-chunk split of the grid once, from the cache or from chunk_means
# (two sinks: test_streaming_policy; every chunk kept: test_select_then_attend)
_SELECT_TRITON = {("cs8_gqa4_d80", F32, False), ("cs4_d256", BF16, True), ("gqa3_d33_element_loads", F16, False),
                  ("cs32_spans_pages_gqa8_d128", F32, True), ("page8_cs4", BF16, False),
                  ("no_forced_chunks", F16, True), ("forced_fill_the_budget", F32, True),
                  ("shorter_than_one_chunk", F16, False)}


@functools.lru_cache(maxsize=8)
def select_case(case: str, dtype, with_means: bool):
    """(problem, chunk_means or None, the oracle's selection) of a SELECT_CASES row, shared by the backends."""
    lens, kw, cs, C, ns, nr = SELECT_CASES[case]
    p = problem(lens, dtype=dtype, seed=len(case) + 100, **kw)
    means = chunk_means_of(p, cs, max(lens) // cs + 2) if with_means else None   # NaN past F_b: never read
    return p, means, oracle_select(p, cs, C, ns, nr, means)


@pytest.mark.parametrize("backend,case,dtype,with_means",
                         over_backends([(c, d, m) for c in SELECT_CASES for d in DTYPES for m in (False, True)],
                                       lambda row: row in _SELECT_TRITON))
def test_select_matches_oracle(backend, case, dtype, with_means):
    """From the cache or from chunk_means, over every chunk / page size pairing, GQA ratio,
    head dim (element loads at 33), budget and forced-chunk split."""
    _, _, cs, C, ns, nr = SELECT_CASES[case]
    p, means, want = select_case(case, dtype, with_means)
    got = select(backend, p, cs, C, ns, nr, means)
    assert_selection(got, want, p, cs, C, ns, nr, means, f"{backend} vs oracle")


@pytest.mark.parametrize("backend", BACKENDS)
def test_select_from_chunk_means_equals_recompute(backend):
    p = problem([99, 40, 7], Hq=8, Hkv=2, seed=4)
    means = chunk_means_of(p, 8, 15)
    got = select(backend, p, 8, 5, 1, 2, means)
    assert torch.equal(got, select(backend, p, 8, 5, 1, 2))
    assert got.tolist() == oracle_select(p, 8, 5, 1, 2, means)


@pytest.mark.parametrize("backend", BACKENDS)
def test_select_ties_go_to_the_lower_chunk(backend):
    p = tie_problem(5)
    for ns, nr in ((1, 1), (0, 2)):
        assert select(backend, p, 8, 6, ns, nr).tolist() == oracle_select(p, 8, 6, ns, nr)
    got = select(backend, replace(p, q=torch.zeros_like(p.q)), 8, 6)   # every score 0: the lowest middle chunks
    assert got[0, 0].tolist() == [0, 1, 2, 3, 4, 15] and got[1, 1].tolist() == [0, 1, 2, 3, 4, 11]


@pytest.mark.parametrize("backend", BACKENDS)
def test_select_nan_scores_count_as_minus_inf(backend):
    p = problem([120, 64], Hq=4, Hkv=2, D=32, seed=6)
    page = p.k_cache.shape[1]
    for b, x in ((0, 3 * 8 + 2), (0, 5 * 8), (1, 2 * 8 + 7)):     # a NaN key in chunks 3, 5 (req 0), 2 (req 1)
        p.k_cache[int(p.block_table[b, x // page]), x % page, 0] = NAN
    got = select(backend, p, 8, 5)
    assert got.tolist() == oracle_select(p, 8, 5)
    assert 3 not in got[0, 0].tolist() and 5 not in got[0, 0].tolist()
    got = select(backend, replace(p, q=torch.full_like(p.q, NAN)), 8, 5)   # all -inf: the lowest, never out of range
    assert got[0, 0].tolist() == [0, 1, 2, 3, 14]


MANY_CANDIDATES = {"past_cuda_shared_memory": ((9500, 5000), 3000), "past_one_interpreter_tile": ((1500, 700), 500)}


@pytest.mark.parametrize("backend,case", over_backends([(c,) for c in MANY_CANDIDATES],
                                                      lambda row: row[0] == "past_one_interpreter_tile"))
def test_select_many_candidates(backend, case):
    """More candidates (F_b full chunks) than the CUDA selection keeps in shared memory
    (8192) and than one scan tile (2048) — or than one tile of the interpreter's selection
    (1024) — from chunk_means whose scores take 4 values: the threshold falls inside a
    large group of exact ties, which go to the lowest ids."""
    F, C = MANY_CANDIDATES[case]
    p = replace(problem([2 * F[0], 2 * F[1] + 1], Hq=2, Hkv=1, D=16, seed=24), q=torch.ones(2, 2, 16))
    g = torch.Generator().manual_seed(24)
    means = torch.zeros(2, F[0] + 100, 1, 16)
    means[:, :, 0, 0] = torch.randint(0, 4, (2, F[0] + 100), generator=g).float()
    means[0, F[0]:] = NAN
    means[1, F[1]:] = NAN
    got = select(backend, p, 2, C, 1, 1, means)
    assert got.tolist() == naive.select_kv_chunks(p.q, p.k_cache, p.block_table, p.seq_lens, 2, C, 1, 1, means)


@pytest.mark.parametrize("backend", BACKENDS)
def test_streaming_policy(backend):
    lens = torch.tensor([200, 40, 9, 64], dtype=torch.int32)
    dev = BACKEND_DEVICES[backend]
    got = fastverify.streaming_kv_chunks(lens.to(dev), chunk_size=8, num_chunks=6, num_sink_chunks=2, num_hkv=3)
    assert got.dtype == torch.int32 and got.shape == (4, 3, 6)
    assert got.cpu().tolist() == naive.streaming_kv_chunks(lens, 8, 6, 2, 3)
    assert got[0, 0].tolist() == [0, 1, 21, 22, 23, 24] and got[2, 1].tolist() == [0, -1, -1, -1, -1, -1]
    # the select op with every non-sink slot given to recent chunks picks the same
    p = problem(lens.tolist(), Hq=6, Hkv=3, D=16, seed=7)
    assert torch.equal(select(backend, p, 8, 6, 2, 4), got.cpu())


# ----------------------------------------------------------------------------- sparse_kv_attention

ATTENTION_CASES = {
    # name: (lens, problem kwargs, chunk_size, C)
    "cs8_page16_gqa4_d80": ([99, 40, 5, 300], dict(Hq=8, Hkv=2, D=80), 8, 6),
    "cs16_gqa1_d64": ([130, 17, 64], dict(Hq=2, Hkv=2, D=64), 16, 3),
    "cs32_spans_pages_gqa8_d128": ([200, 70, 31], dict(Hq=8, Hkv=1, D=128), 32, 4),
    "cs32_spans_pages_gqa8_d64": ([200, 70], dict(Hq=8, Hkv=1, D=64), 32, 4),
    "gqa3_masked_heads": ([150, 45], dict(Hq=6, Hkv=2, D=64), 16, 5),
    "gqa6_d128": ([120, 77], dict(Hq=12, Hkv=2, D=128), 16, 4),
    "gqa16_two_head_tiles": ([90, 33], dict(Hq=16, Hkv=1, D=64), 8, 5),
    "head_dim_256": ([70, 140], dict(Hq=4, Hkv=2, D=256), 16, 4),
    "head_dim_33_scalar_loads": ([61, 20], dict(Hq=4, Hkv=2, D=33), 8, 4),
    "shorter_than_one_chunk": ([5, 3, 12], dict(), 16, 2),
    "no_tail": ([64, 32], dict(), 16, 2),
    "budget_larger_than_sequence": ([40, 23], dict(), 8, 10),
    "page4_cs8": ([37, 50], dict(page=4, D=32), 8, 3),
    "page8_cs32": ([130, 50], dict(page=8, D=32), 32, 3),
    "page16_cs4": ([45, 29], dict(D=32), 4, 5),
    "several_unit_rounds": ([2100], dict(Hq=4, Hkv=1, D=64), 8, 260),  # 261 units > 256 threads of a block
}
# the number of splits cycles through the launchers' choice, one split (one launch) and
# forced splits (the merge); the torch backend has no splits
_SPLITS = [None, 3, 1, 7]
ATTENTION_ROWS = [(case, dtype, _SPLITS[i % 4]) for i, (case, dtype) in
                  enumerate((c, d) for c in ATTENTION_CASES for d in DTYPES)]
# under the interpreter (~0.3 s a case): every head dim, GQA ratio, page / chunk pairing,
# dtype and tail shape once, with one launch and the merge (the split counts above)
_ATTENTION_TRITON = {("cs8_page16_gqa4_d80", F32), ("cs16_gqa1_d64", BF16), ("cs32_spans_pages_gqa8_d128", F16),
                     ("gqa3_masked_heads", BF16), ("gqa16_two_head_tiles", F32), ("head_dim_256", BF16),
                     ("head_dim_33_scalar_loads", F32), ("shorter_than_one_chunk", F32), ("no_tail", BF16),
                     ("budget_larger_than_sequence", F16), ("page4_cs8", BF16)}


@functools.lru_cache(maxsize=8)
def attention_case(case: str, dtype):
    """(problem, chunk_ids with out-of-range ids, the oracle's output) of an ATTENTION_CASES
    row, shared by the backends."""
    lens, kw, cs, C = ATTENTION_CASES[case]
    p = problem(lens, dtype=dtype, seed=len(case), **kw)
    ids = chunk_ids(lens, p.k_cache.shape[2], C, cs, seed=len(case), invalid=True)
    return p, ids, oracle_attention(p, ids, cs)


@pytest.mark.parametrize("backend,case,dtype,num_splits",
                         over_backends(ATTENTION_ROWS, lambda row: row[:2] in _ATTENTION_TRITON))
def test_attention_matches_oracle(backend, case, dtype, num_splits):
    """The unchecked path (what runs on CUDA): ids outside [0, F_b) in every row are skipped."""
    cs = ATTENTION_CASES[case][2]
    p, ids, want = attention_case(case, dtype)
    assert_close(attend_unchecked(backend, p, ids, cs, num_splits=num_splits), want, dtype, f"{backend} vs oracle")


@pytest.mark.parametrize("backend,dtype", over_backends([(d,) for d in DTYPES], lambda row: False, KERNEL_BACKENDS))
def test_attention_scale_and_splits(backend, dtype):
    """sm_scale, and every number of splits (one launch at 1, the merge otherwise; more
    splits than units clamp) giving the same result; a row that sees no key gives 0.
    (The interpreter meets one launch and the merge in test_attention_matches_oracle's
    rows and the garbage test.)"""
    lens = [300, 41, 129, 32]
    p = problem(lens, Hq=8, Hkv=2, D=128, dtype=dtype, seed=21)
    ids = chunk_ids(lens, 2, 12, 16, seed=21, invalid=True)
    ids[3, 1] = -1                                  # request 3 (no tail) KV head 1: no key at all
    want = oracle_attention(p, ids, 16, 0.3)
    assert not want[3, 4:].any()
    for splits in (None, 1, 2, 3, 5, 13, 64):
        got = attend_unchecked(backend, p, ids, 16, 0.3, num_splits=splits)
        assert_close(got, want, dtype, f"num_splits={splits}")
        assert not got[3, 4:].any(), "no key: zeros"


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_paths_skip_out_of_range_ids(backend):
    """ids outside [0, F_b) are skipped, never used as addresses; a repeated id counts
    twice (in the oracle too)."""
    p = problem([70, 20], seed=14)
    ids = torch.tensor([[[8, 2, 1_000_000, -7], [-2**31, 3, 9, 0]], [[2, 1, 0, -1], [5, 1, 1, -1]]],
                       dtype=torch.int32)
    assert_close(attend_unchecked(backend, p, ids, 8), oracle_attention(p, ids, 8), F32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_garbage_is_memory_safe(backend):
    """Unchecked garbage (CUDA without FASTVERIFY_CHECKS): page ids outside the cache,
    seq_lens past the block table or negative, ids of every kind, repeated ids: never an
    address outside the tensors, finite outputs, selected ids inside the table."""
    p = problem([40, 70, 20], Hq=4, Hkv=2, D=64, page=16, seed=23)
    p.block_table[1, 1] = 10**6
    p.block_table[0, 0] = -5
    p.seq_lens[0] = 10**6
    p.seq_lens[2] = -3
    ids = torch.tensor([[[0, 5, 10**6, 20_000], [-9, 2, 2, 1]],
                        [[0, 1, 2, 3], [4, -2**31, 2**31 - 1, 0]],
                        [[0, 1, -1, -1], [2, 3, 4, 5]]], dtype=torch.int32)
    cap = p.block_table.shape[1] * p.k_cache.shape[1]
    for cs, C in ((8, 4), (16, 2), (4, 100)):
        sel = select_unchecked(backend, p, cs, C)
        assert ((sel >= -1) & (sel < cap // cs)).all()
        assert (sel[2] == -1).all()
    for splits in (None, 1, 3):
        out = attend_unchecked(backend, p, ids, 8, num_splits=splits)
        assert torch.isfinite(out.float()).all()
        assert not out[2].any(), "a negative length attends to nothing"


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_key_at_all_gives_zeros(backend):
    p = problem([32, 40], seed=9)                   # request 0: two full chunks, no tail
    ids = torch.full((2, 2, 2), -1, dtype=torch.int32)
    out = attend(backend, p, ids, 16)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert_close(out, oracle_attention(p, ids, 16), F32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_chunks_selected_is_full_attention(backend):
    lens = [100, 48, 7]
    p = problem(lens, Hq=8, Hkv=2, D=80, seed=10)
    cs = 8
    ids = torch.full((3, 2, max(lens) // cs), -1, dtype=torch.int32)
    for b, L in enumerate(lens):
        ids[b, :, :L // cs] = torch.arange(L // cs, dtype=torch.int32).flip(0)     # unsorted
    with fastverify.use_backend(backend):
        full = fastverify.tree_attention(*p.to(BACKEND_DEVICES[backend]).args()).cpu()
    assert_close(attend(backend, p, ids, cs), full, F32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_order_of_ids_does_not_matter(backend):
    p = problem([120], seed=13)
    ids = torch.tensor([[[3, -1, 0, 9, 5], [-1, -1, 14, 1, 2]]], dtype=torch.int32)
    assert torch.allclose(attend(backend, p, ids, 8), attend(backend, p, ids.sort(2).values, 8), atol=1e-6)


@pytest.mark.skipif("cpu" not in BACKEND_DEVICES, reason="the cpu backend's C++ library is not built")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES.get)
def test_cpu_attention_same_bits_for_any_thread_count(dtype):
    """The cpu kernel's work units and merge order depend on the shapes only: 1, 2 and 3
    threads give bit-identical outputs (default split and forced splits); GQA 32."""
    lens = [3000, 41, 700]
    p = problem(lens, Hq=32, Hkv=1, D=128, dtype=dtype, seed=17)
    ids = chunk_ids(lens, 1, 40, 16, seed=17, invalid=True)
    before = torch.get_num_threads()
    try:
        for splits in (None, 5):
            outs = []
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                outs.append(attend_unchecked("cpu", p, ids, 16, num_splits=splits))
            assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2]), f"num_splits={splits}"
    finally:
        torch.set_num_threads(before)
    assert_close(outs[0], oracle_attention(p, ids, 16), dtype, "cpu")


PORTABLE_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
import fastverify.cpu
from test_sparse_kv import ATTENTION_CASES, attention_case, attend_unchecked
assert fastverify.cpu.isa() == "portable" and fastverify.cpu.available()
outs = {{}}
for case in ("cs8_page16_gqa4_d80", "head_dim_33_scalar_loads", "gqa16_two_head_tiles"):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        p, ids, _ = attention_case(case, dtype)
        outs[case, str(dtype)] = attend_unchecked("cpu", p, ids, ATTENTION_CASES[case][2], num_splits=3)
torch.save(outs, {out!r})
"""


@pytest.mark.skipif("cpu" not in BACKEND_DEVICES, reason="the cpu backend's C++ library is not built")
def test_cpu_attention_portable_build(tmp_path):
    """FASTVERIFY_CPU_ISA=portable (-march=x86-64: the plain C++ loops, no AVX-512 or
    vdpbf16ps) builds and matches the oracle in every dtype."""
    import os
    import subprocess
    import sys

    out = tmp_path / "outs.pt"
    script = PORTABLE_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)), out=str(out))
    subprocess.run([sys.executable, "-c", script], env=dict(os.environ, FASTVERIFY_CPU_ISA="portable"), check=True,
                   timeout=600)
    got = torch.load(out)
    for case in ("cs8_page16_gqa4_d80", "head_dim_33_scalar_loads", "gqa16_two_head_tiles"):
        for dtype in DTYPES:
            _, _, want = attention_case(case, dtype)
            assert_close(got[case, str(dtype)], want, dtype, f"portable {case} {DTYPE_NAMES[dtype]}")


# ----------------------------------------------------------------------------- both ops


@pytest.mark.parametrize("backend,dtype", over_backends([(d,) for d in DTYPES], lambda row: row[0] == BF16))
def test_select_then_attend(backend, dtype):
    """The public ops in every dtype (sm_scale given for the 16-bit ones; the kernels'
    dtypes are test_select_matches_oracle's and test_attention_matches_oracle's)."""
    p = problem([150, 61, 90], Hq=8, Hkv=2, D=32, dtype=dtype, seed=11)
    scale = None if dtype == F32 else 0.2
    ids = select(backend, p, 16, 4)
    assert_selection(ids, oracle_select(p, 16, 4), p, 16, 4, 1, 1, what=f"{backend} select")
    assert_close(attend(backend, p, ids, 16, scale), oracle_attention(p, ids, 16, scale), dtype, f"{backend} attend")


@pytest.mark.parametrize("backend,dtype,pad", over_backends([(d, pad) for d in DTYPES for pad in (8, 3)],
                                                            lambda row: row == (F32, 3)))
def test_strided_cache_views(backend, dtype, pad):
    """Per-layer views of one cache (strided pages, slots and heads; K and V with different
    strides), head rows padded by 8 (16-byte loads stay possible for 16-bit types) or 3
    (element loads), q strided: no copies, same results; select too."""
    lens = [90, 33, 150]
    p = problem(lens, Hq=4, Hkv=2, D=64, dtype=dtype, seed=22)
    ids = chunk_ids(lens, 2, 5, 8, seed=22)
    want = oracle_attention(p, ids, 8)
    want_sel = select(backend, p, 8, 4)
    dev = BACKEND_DEVICES[backend]
    P, page, Hkv, D = p.k_cache.shape
    big = torch.zeros(P, page, 2, 3, Hkv, D + pad, dtype=dtype, device=dev)  # [page, slot, K/V, layer, head, D]
    k, v = big[:, :, 0, 1, :, :D], big[:, :, 1, 2, :, :D]
    k.copy_(p.k_cache)
    v.copy_(p.v_cache)
    q = torch.zeros(*p.q.shape[:2], D + pad, dtype=dtype, device=dev)[..., :D]
    q.copy_(p.q)
    x = replace(p.to(dev), q=q, k_cache=k, v_cache=v)
    assert not k.is_contiguous() and not q.is_contiguous()
    assert_close(attend(backend, x, ids, 8), want, dtype, "padded rows")
    x.v_cache = v.contiguous()
    assert_close(attend(backend, x, ids, 8), want, dtype, "padded rows, contiguous V")
    assert torch.equal(select(backend, x, 8, 4), want_sel), "select over padded rows"


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_metadata(backend):
    """block_table, seq_lens and chunk_ids with a strided last dimension."""
    lens = [70, 33]
    p = problem(lens, seed=21)
    ids = chunk_ids(lens, 2, 4, 8, seed=21)
    want = attend(backend, p, ids, 8)
    want_ids = select(backend, p, 8, 4)
    p.block_table = torch.stack([p.block_table, p.block_table], 2)[..., 0]
    p.seq_lens = torch.stack([p.seq_lens, p.seq_lens], 1)[:, 1]
    assert p.block_table.stride(1) == 2 and p.seq_lens.stride(0) == 2
    assert torch.equal(attend(backend, p, ids.transpose(1, 2).contiguous().transpose(1, 2), 8), want)
    assert torch.equal(select(backend, p, 8, 4), want_ids)


RANDOM_SEEDS = range(300 if HAS_CUDA or EMULATE_FULL else 40)
# under the interpreter (~1 s a seed, up to 5): three seeds, chunks within a page and
# spanning two, head dims 8 / 64 / 200, fp32 and fp16, budgets from 2 slots to 50
INTERPRETER_SEEDS = (8, 24, 32)


def test_vectorized_oracles_equal_the_naive_ones():
    """attention64 and select64 (the references of the random and decode shapes) against naive.py."""
    lens = [150, 61, 9]
    p = problem(lens, Hq=6, Hkv=2, D=24, page=8, seed=26)
    ids = chunk_ids(lens, 2, 5, 8, seed=26, invalid=True)
    assert torch.allclose(attention64(p, ids, 8, 0.3), oracle_attention(p, ids, 8, 0.3), rtol=0, atol=1e-12)
    means = chunk_means_of(p, 8, 20)
    for ns, nr, m in ((1, 1, None), (0, 2, means), (2, 0, None)):
        assert select64(p, 8, 6, ns, nr, m) == oracle_select(p, 8, 6, ns, nr, m)


@functools.lru_cache(maxsize=2)
def random_case(seed: int):
    """A random shape and its float64 references: page and chunk sizes (chunk spanning
    pages or not), GQA 1 .. 16, head dims 8 .. 256, ragged lengths from 1 key, budgets
    from 0 / 1 slot to more than the sequence, forced splits, chunk_means or not."""
    rng = random.Random(seed)
    dtype = rng.choice(DTYPES)
    page = rng.choice([4, 8, 16, 32])
    cs = rng.choice([d for d in (1, 2, 4, 8, 16, 32, 64) if page % d == 0 or d % page == 0])
    Hkv, G = rng.choice([1, 2, 3]), rng.choice([1, 2, 3, 4, 5, 7, 8, 9, 16])
    D = rng.choice([8, 24, 33, 64, 80, 96, 128, 200, 256])
    lens = [rng.choice([1, rng.randint(1, 40), rng.randint(1, 600)]) for _ in range(rng.randint(1, 4))]
    p = problem(lens, Hq=G * Hkv, Hkv=Hkv, D=D, page=page, dtype=dtype, seed=seed)
    C = rng.choice([1, 2, 5, 17, 40, 300])
    ids = chunk_ids(lens, Hkv, C, cs, seed=seed, invalid=True)
    scale = 0.05 + 0.2 * rng.random()
    splits = rng.choice([None, 1, 2, 5, 64])
    nc = rng.choice([0, 1, 3, 8, 50])
    ns = rng.randint(0, min(2, nc))
    nr = rng.randint(0, nc - ns)
    means = chunk_means_of(p, cs, max(lens) // cs + 1) if rng.random() < 0.3 else None
    what = f"seed {seed}: {dtype} page {page} cs {cs} Hkv {Hkv} G {G} D {D} lens {lens}"
    return dict(p=p, cs=cs, ids=ids, scale=scale, splits=splits, select=(nc, ns, nr), means=means, what=what,
                attention=attention64(p, ids, cs, scale), selection=select64(p, cs, nc, ns, nr, means))


@pytest.mark.parametrize("backend,seed",
                         over_backends([(s,) for s in RANDOM_SEEDS], lambda row: row[0] in INTERPRETER_SEEDS))
def test_random_shapes(backend, seed):
    """The unchecked paths (out-of-range ids, forced split counts) and both selection
    sources at random_case's shapes, against the float64 references."""
    r = random_case(seed)
    p, cs, (nc, ns, nr) = r["p"], r["cs"], r["select"]
    got = attend_unchecked(backend, p, r["ids"], cs, r["scale"], num_splits=r["splits"])
    assert_close(got, r["attention"], p.q.dtype, f"attention, {r['what']}, C {r['ids'].shape[2]}")
    sel = select_unchecked(backend, p, cs, nc, ns, nr, r["means"])
    assert_selection(sel, r["selection"], p, cs, nc, ns, nr, r["means"],
                     f"select, {r['what']}, {nc} chunks ({ns} sinks, {nr} recent)")


@pytest.mark.parametrize("lens,D", [([90, 33, 130], 32),
                                   pytest.param([300, 77, 1000], 128, marks=pytest.mark.gpu_sized)],
                         ids=["cpu_sized", "gpu_sized"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_public_ops_route_to_the_backend(backend, lens, D):
    """The public ops on a kernel backend return exactly its entry points' outputs, which
    agree with the torch backend and the oracle."""
    p = problem(lens, Hq=8, Hkv=2, D=D, dtype=BF16, seed=31)
    x = p.to(BACKEND_DEVICES[backend])
    kern = entry_points(backend, "sparse_kv")
    ids = select(backend, p, 16, 6)
    out = attend(backend, p, ids, 16)
    assert torch.equal(ids, kern.select_kv_chunks(x.q, x.k_cache, x.block_table, x.seq_lens, 16, 6, 1, 1, None).cpu())
    assert torch.equal(out, kern.sparse_kv_attention(x.q, x.k_cache, x.v_cache, x.block_table, x.seq_lens,
                                                     ids.to(x.q.device), 16, D ** -0.5).cpu())
    assert_close(out, attend("torch", p, ids, 16), BF16, "public op vs torch backend")
    assert_close(out, oracle_attention(p, ids, 16), BF16, "public op vs oracle")


# ----------------------------------------------------------------------------- on the GPU only


def draft_layer(cs: int, C: int):
    """Both ops as a model's draft layer calls them (q * 1.0: an op before them in the graph)."""
    def layer(q, k, v, table, lens):
        ids = torch.ops.fastverify.select_kv_chunks(q * 1.0, k, table, lens, chunk_size=cs, num_chunks=C)
        return ids, torch.ops.fastverify.sparse_kv_attention(q, k, v, table, lens, ids, chunk_size=cs) * 2
    return layer


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_compile_and_stream(backend):
    p = problem([2000, 300, 45], Hq=8, Hkv=2, D=128, dtype=F16, seed=32).to(GPU)
    args = (p.q, p.k_cache, p.v_cache, p.block_table, p.seq_lens)
    layer = draft_layer(16, 8)
    fn = functools.partial(layer, *args)
    with fastverify.use_backend(backend):
        graph, outs = capture_graph(fn)
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(outs, fn())), "replay vs eager"
        before = outs[0].clone()
        p.q.copy_(torch.randn_like(p.q))
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(outs, fn())), "the replay follows new q"
        assert not torch.equal(outs[0], before), "new q, new selection"

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            again = fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(again, fn())), "deterministic, on the current stream"

        got = torch.compile(layer, fullgraph=True)(*args)
    assert all(torch.equal(a, b) for a, b in zip(got, fn()))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_decode_shape_matches_oracle(backend):
    """The performance target's shape (B = 8, 32K keys, budget 1024 = 64 chunks of 16,
    Hq / Hkv = 32 / 8, D = 128, bf16) against the float64 references on the GPU; prints
    the attention's bandwidth under a CUDA graph."""
    B, L, cs, C, Hkv, D = 8, 32763, 16, 64, 8, 128
    p = problem([L] * B, Hq=32, Hkv=Hkv, D=D, dtype=BF16, seed=33).to(GPU)
    with fastverify.use_backend(backend):
        ids = fastverify.select_kv_chunks(p.q, p.k_cache, p.block_table, p.seq_lens, chunk_size=cs, num_chunks=C)
        fn = functools.partial(fastverify.sparse_kv_attention, p.q, p.k_cache, p.v_cache, p.block_table, p.seq_lens,
                               ids, chunk_size=cs)
        out = fn()
        graph, _ = capture_graph(fn)
    want = torch.tensor(select64(p, cs, C, 1, 1), dtype=torch.int32)
    assert (ids.cpu() == want).all(-1).float().mean() >= 0.9      # rows equal, fp32 near-ties aside
    assert_close(out, attention64(p, ids, cs), BF16, "decode shape")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 50
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    us = start.elapsed_time(end) * 1000 / reps
    kv_bytes = 2 * B * Hkv * (C * cs + L % cs) * D * p.k_cache.element_size()
    print(f"\n{backend} sparse_kv_attention B={B} L={L} budget={C * cs}: {us:.1f} us, "
          f"{kv_bytes / us / 1e3:.0f} GB/s of selected K/V")


# ----------------------------------------------------------------------------- backend internals


def test_triton_plan_fills_the_device_for_one_request(monkeypatch):
    monkeypatch.setattr(triton_sparse, "_num_sms", lambda device: 132)
    _, splits, _ = triton_sparse.attention_plan(1, 8, 256, 16, 128, torch.device("cuda"))
    assert splits * 8 >= 2 * 132 - 8
    _, splits, _ = triton_sparse.attention_plan(64, 8, 256, 16, 128, torch.device("cuda"))
    assert splits == 1


@pytest.mark.skipif("cuda" not in BACKENDS, reason="no cuda backend in this session")
def test_cuda_library_registers_the_extension_schemas():
    """The CUDA extension's own schemas (on CPU: the emulated library, same bindings file)."""
    kern = entry_points("cuda", "sparse_kv")
    ops = kern.ops() if hasattr(kern, "ops") else kern._extension.ops()
    assert "num_splits" in str(ops.sparse_kv_attention._schema)
    assert "chunk_means" in str(ops.select_kv_chunks._schema)
    assert "cuda_stream" in str(ops.select_kv_chunks._schema)


def test_selected_ids_skip_the_id_checks_until_modified():
    p = problem([100], seed=16)
    ids = fastverify.select_kv_chunks(p.q, p.k_cache, p.block_table, p.seq_lens, chunk_size=8, num_chunks=4)
    assert ops_sparse._ids_known_valid(ids, p.seq_lens, 8)
    fastverify.sparse_kv_attention(p.q, p.k_cache, p.v_cache, p.block_table, p.seq_lens, ids, chunk_size=8)
    ids[0, 0, 0] = 50                                    # in place: the version changes, checks run again
    with pytest.raises(ValueError, match=r"chunk_ids\[0, 0, 0\] = 50 is outside \[-1, 12\)"):
        fastverify.sparse_kv_attention(p.q, p.k_cache, p.v_cache, p.block_table, p.seq_lens, ids, chunk_size=8)


# ----------------------------------------------------------------------------- as torch ops


def test_schemas_name_the_contract_arguments():
    s = torch.ops.fastverify.select_kv_chunks.default._schema
    assert [a.name for a in s.arguments] == ["q", "k_cache", "block_table", "seq_lens", "chunk_size", "num_chunks",
                                             "num_sink_chunks", "num_recent_chunks", "chunk_means"]
    s = torch.ops.fastverify.sparse_kv_attention.default._schema
    assert [a.name for a in s.arguments] == ["q", "k_cache", "v_cache", "block_table", "seq_lens", "chunk_ids",
                                             "chunk_size", "sm_scale"]


@pytest.fixture
def small():
    """A small problem for the torch-op and bad-input tests."""
    return problem([40, 21], Hq=4, Hkv=2, D=16, page=8, seed=20)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, small):
    dev = BACKEND_DEVICES[backend]
    p = small.to(dev)
    ids = chunk_ids([40, 21], 2, 3, 8, seed=17).to(dev)
    means = chunk_means_of(small, 8, 6, fill=0.0).to(dev)
    with fastverify.use_backend(backend):
        torch.library.opcheck(torch.ops.fastverify.select_kv_chunks.default,
                              (p.q, p.k_cache, p.block_table, p.seq_lens),
                              dict(chunk_size=8, num_chunks=3, num_sink_chunks=1, num_recent_chunks=1))
        torch.library.opcheck(torch.ops.fastverify.select_kv_chunks.default,
                              (p.q, p.k_cache, p.block_table, p.seq_lens),
                              dict(chunk_size=8, num_chunks=3, chunk_means=means))
        torch.library.opcheck(torch.ops.fastverify.sparse_kv_attention.default,
                              (p.q, p.k_cache, p.v_cache, p.block_table, p.seq_lens, ids),
                              dict(chunk_size=8, sm_scale=0.3))


def test_fake_tensors_give_output_shapes(small):
    from torch._subclasses.fake_tensor import FakeTensorMode

    p = replace(small, q=small.q.bfloat16(), k_cache=small.k_cache.bfloat16(), v_cache=small.v_cache.bfloat16())
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        f = [mode.from_tensor(t) for t in (p.q, p.k_cache, p.v_cache, p.block_table, p.seq_lens)]
        ids = torch.ops.fastverify.select_kv_chunks(f[0], f[1], f[3], f[4], chunk_size=8, num_chunks=3)
        out = torch.ops.fastverify.sparse_kv_attention(*f, ids, chunk_size=8)
    assert ids.shape == (2, 2, 3) and ids.dtype == torch.int32
    assert out.shape == (2, 4, 16) and out.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    p = problem([90, 33], Hq=4, Hkv=2, D=16, page=8, seed=19).to(BACKEND_DEVICES[backend])
    args = (p.q, p.k_cache, p.v_cache, p.block_table, p.seq_lens)
    fn = draft_layer(8, 4)
    with fastverify.use_backend(backend):
        want = fn(*args)
        got = torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)
    assert torch.equal(got[0], want[0]) and torch.allclose(got[1], want[1])


# ----------------------------------------------------------------------------- bad input


def select_args(p, **over):
    a = dict(q=p.q, k_cache=p.k_cache, block_table=p.block_table, seq_lens=p.seq_lens, chunk_size=8, num_chunks=3,
             num_sink_chunks=1, num_recent_chunks=1, chunk_means=None)
    a.update(over)
    return torch.ops.fastverify.select_kv_chunks(a.pop("q"), a.pop("k_cache"), a.pop("block_table"),
                                                 a.pop("seq_lens"), **a)


def attention_args(p, **over):
    a = dict(q=p.q, k_cache=p.k_cache, v_cache=p.v_cache, block_table=p.block_table, seq_lens=p.seq_lens,
             chunk_ids=torch.tensor([[[0, 2, -1], [4, -1, 1]], [[1, -1, -1], [0, 1, -1]]], dtype=torch.int32),
             chunk_size=8, sm_scale=None)
    a.update(over)
    return torch.ops.fastverify.sparse_kv_attention(*[a.pop(k) for k in ("q", "k_cache", "v_cache", "block_table",
                                                                         "seq_lens", "chunk_ids")], **a)


def ids_with(b, h, j, value):
    """The valid chunk_ids of attention_args with one entry changed."""
    ids = torch.tensor([[[0, 2, -1], [4, -1, 1]], [[1, -1, -1], [0, 1, -1]]], dtype=torch.int32)
    ids[b, h, j] = value
    return ids


COMMON_BAD = {
    **PAGED_KV_BAD,
    "q_head_dim_stride": (lambda p: dict(q=torch.randn(2, 16, 4).transpose(1, 2)), "q must be contiguous in head_dim"),
    "head_dim_too_big": (lambda p: dict(q=torch.randn(2, 4, 288)), "head_dim in \\[1, 256\\]"),
    "cache_head_dim_stride": (lambda p: dict(k_cache=p.k_cache.transpose(1, 3).contiguous().transpose(1, 3)),
                              "k_cache must be contiguous in head_dim"),
    "seq_lens_shape": (lambda p: dict(seq_lens=p.seq_lens[:1]), "seq_lens must have shape"),
    "seq_lens_zero": (lambda p: dict(seq_lens=torch.tensor([40, 0], dtype=torch.int32)),
                      r"seq_lens\[1\] = 0: every request needs at least one key"),
    "chunk_size_zero": (lambda p: dict(chunk_size=0), "chunk_size must be an int >= 1"),
    "chunk_size_vs_page": (lambda p: dict(chunk_size=12), "chunk_size 12 and page_size 8"),
}

SELECT_BAD = {
    "num_chunks_below_forced": (lambda p: dict(num_chunks=3, num_sink_chunks=2, num_recent_chunks=2),
                                "num_chunks = 3 must be >= num_sink_chunks \\+ num_recent_chunks"),
    "negative_sinks": (lambda p: dict(num_sink_chunks=-1), "num_sink_chunks must be an int >= 0"),
    "num_chunks_float": (lambda p: dict(num_chunks=3.0), "num_chunks"),
    "means_dtype": (lambda p: dict(chunk_means=torch.zeros(2, 5, 2, 16, dtype=torch.float64)),
                    "chunk_means must be float32"),
    "means_shape": (lambda p: dict(chunk_means=torch.zeros(2, 5, 1, 16)), "chunk_means must have shape"),
    "means_too_few_chunks": (lambda p: dict(chunk_means=torch.zeros(2, 4, 2, 16)),
                             "chunk_means holds 4 chunks per request but request 0 has F = seq_lens\\[0\\] // "
                             "chunk_size = 5"),
}

ATTN_BAD = {
    "ids_dtype": (lambda p: dict(chunk_ids=torch.zeros(2, 2, 3, dtype=torch.int64)), "chunk_ids must be int32"),
    "ids_shape": (lambda p: dict(chunk_ids=torch.zeros(2, 1, 3, dtype=torch.int32)), "chunk_ids must have shape"),
    "ids_empty": (lambda p: dict(chunk_ids=torch.zeros(2, 2, 0, dtype=torch.int32)), "at least one slot"),
    "id_past_full_chunks": (lambda p: dict(chunk_ids=ids_with(1, 0, 0, 2)),
                            r"chunk_ids\[1, 0, 0\] = 2 is outside \[-1, 2\)"),
    "id_below_minus_one": (lambda p: dict(chunk_ids=ids_with(0, 0, 1, -2)), r"chunk_ids\[0, 0, 1\] = -2 is outside"),
    "duplicate_id": (lambda p: dict(chunk_ids=ids_with(0, 1, 2, 4)), r"chunk_ids\[0, 1\] lists chunk 4 twice"),
    "v_shape": (lambda p: dict(v_cache=p.v_cache[:, :4]), "v_cache must have shape"),
    "v_dtype": (lambda p: dict(v_cache=p.v_cache.half()), "v_cache must be float32"),
    "sm_scale_nan": (lambda p: dict(sm_scale=NAN), "sm_scale must be a finite float"),
}


@pytest.mark.parametrize("case", list(COMMON_BAD) + list(SELECT_BAD))
def test_select_bad_input(small, case):
    make, msg = {**COMMON_BAD, **SELECT_BAD}[case]
    with pytest.raises((ValueError, TypeError, RuntimeError), match=msg):
        select_args(small, **make(small))


@pytest.mark.parametrize("case", list(COMMON_BAD) + list(ATTN_BAD))
def test_attention_bad_input(small, case):
    make, msg = {**COMMON_BAD, **ATTN_BAD}[case]
    with pytest.raises((ValueError, TypeError, RuntimeError), match=msg):
        attention_args(small, **make(small))


def test_streaming_bad_input():
    lens = torch.tensor([40], dtype=torch.int32)
    with pytest.raises(ValueError, match="num_sink_chunks = 5 must be <= num_chunks = 4"):
        fastverify.streaming_kv_chunks(lens, chunk_size=8, num_chunks=4, num_sink_chunks=5, num_hkv=1)
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1"):
        fastverify.streaming_kv_chunks(lens, chunk_size=0, num_chunks=4, num_hkv=1)
    with pytest.raises(ValueError, match="num_hkv must be an int >= 1"):
        fastverify.streaming_kv_chunks(lens, chunk_size=8, num_chunks=4, num_hkv=0)
