"""The cpu backend of build_tree, compact_kv and select_kv_chunks (csrc/cpu/tree_structure.cpp,
csrc/cpu/select_kv.cpp) at shapes large enough for their multi-threaded paths (several
score units per request, thread teams in build_tree / compact_kv): the torch backend's
exact outputs for every cache dtype, the same bits for 1 and 2 threads, and memory safety
on unchecked garbage. The family modules (test_tree_attention.py, test_sparse_kv.py) test
the same ops against the naive oracles on small shapes."""

from __future__ import annotations

import pytest
import torch

import fastverify
import fastverify.cpu
from attention_problems import tree_parents
from fastverify.cpu.select_kv import select_kv_chunks as cpu_select
from fastverify.cpu.tree_structure import build_tree as cpu_build_tree, compact_kv as cpu_compact_kv

pytestmark = pytest.mark.skipif(not fastverify.cpu.available(), reason="no C++ compiler for csrc/cpu")

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
DTYPES = (F32, BF16, F16)


def with_threads(n: int, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def on_backend(backend: str, fn):
    with fastverify.use_backend(backend):
        return fn()


def same_bits(a, b) -> bool:
    a = a if isinstance(a, tuple) else (a,)
    b = b if isinstance(b, tuple) else (b,)
    return all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b))


# ----------------------------------------------------------------------------- select_kv_chunks


def select_problem(lens, *, Hq=8, Hkv=2, D=64, page=16, dtype=F32, integer=False, seed=0):
    """(q [B, Hq, D], k_cache [P, page, Hkv, D], block_table [B, max_pages] shuffled,
    seq_lens [B]). ``integer``: small-integer keys and queries, so that chunk means (chunk
    sizes are powers of two) and scores are exact in fp32 in any summation order."""
    g = torch.Generator().manual_seed(seed)
    B = len(lens)
    per = -(-max(lens) // page) + 1
    table = torch.randperm(B * per, generator=g).view(B, per).to(torch.int32)
    if integer:
        k = torch.randint(-3, 4, (B * per, page, Hkv, D), generator=g).to(dtype)
        q = torch.randint(-2, 3, (B, Hq, D), generator=g).to(dtype)
    else:
        k = torch.randn(B * per, page, Hkv, D, generator=g).to(dtype)
        q = torch.randn(B, Hq, D, generator=g).to(dtype)
    return q, k, table, torch.tensor(lens, dtype=torch.int32)


def chunk_means(k, table, lens, cs: int) -> torch.Tensor:
    """[B, max F, Hkv, D] fp32 mean of each full chunk (NaN past F_b: never read)."""
    B, page, Hkv, D = len(lens), k.shape[1], k.shape[2], k.shape[3]
    F = [int(x) // cs for x in lens]
    out = torch.full((B, max(F), Hkv, D), float("nan"))
    for b in range(B):
        rows = k[table[b].long()].flatten(0, 1)[:F[b] * cs].float()
        out[b, :F[b]] = rows.view(F[b], cs, Hkv, D).sum(1) / cs
    return out


def run_select(backend, q, k, table, lens, cs, C, ns, nr, means):
    return on_backend(backend, lambda: fastverify.select_kv_chunks(
        q, k, table, lens, chunk_size=cs, num_chunks=C, num_sink_chunks=ns, num_recent_chunks=nr,
        chunk_means=means))


SELECT_SHAPES = {
    # name: (lens, problem kwargs, chunk_size, num_chunks, sinks, recent)
    "cs8_several_units": ([3000, 1500, 700, 20], dict(Hq=8, Hkv=2, D=64), 8, 20, 1, 2),
    "cs32_spans_pages_d128": ([5000, 900], dict(Hq=4, Hkv=1, D=128, page=8), 32, 12, 2, 1),
    "cs4_d80_gqa1": ([2100, 64], dict(Hq=3, Hkv=3, D=80, page=16), 4, 40, 1, 1),
    "cs16_d256_no_forced": ([4000], dict(Hq=4, Hkv=2, D=256), 16, 9, 0, 0),
    "d33_element_loads": ([1800, 300], dict(Hq=4, Hkv=2, D=33), 8, 10, 1, 1),
}


@pytest.mark.parametrize("with_means", [False, True], ids=["keys", "means"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("case", SELECT_SHAPES)
def test_select_equals_torch_with_exact_scores(case, dtype, with_means):
    """Integer data: every score exact, many exact ties (which go to the lower chunk):
    the torch backend's ids bit for bit, for 1 and 2 threads."""
    lens, kw, cs, C, ns, nr = SELECT_SHAPES[case]
    q, k, table, seq = select_problem(lens, dtype=dtype, integer=True, seed=len(case), **kw)
    means = chunk_means(k, table, seq, cs) if with_means else None
    want = run_select("torch", q, k, table, seq, cs, C, ns, nr, means)
    one = with_threads(1, lambda: run_select("cpu", q, k, table, seq, cs, C, ns, nr, means))
    two = with_threads(2, lambda: run_select("cpu", q, k, table, seq, cs, C, ns, nr, means))
    assert torch.equal(one, want)
    assert torch.equal(two, one)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16", "f16"])
def test_select_random_scores_same_bits_for_any_thread_count(dtype):
    """Random data from the cache and from the means: 1 and 2 threads give the same ids,
    and they agree with the torch backend (random scores: no fp32 near-tie at this size)."""
    lens, cs, C = [4100, 2000, 999], 16, 24
    q, k, table, seq = select_problem(lens, Hq=8, Hkv=2, D=128, dtype=dtype, seed=3)
    for means in (None, chunk_means(k, table, seq, cs)):
        one = with_threads(1, lambda: run_select("cpu", q, k, table, seq, cs, C, 1, 1, means))
        two = with_threads(2, lambda: run_select("cpu", q, k, table, seq, cs, C, 1, 1, means))
        assert torch.equal(one, two)
        assert torch.equal(one, run_select("torch", q, k, table, seq, cs, C, 1, 1, means))


def test_select_strided_q_and_cache_views():
    """q and the cache as strided views (padded heads, padded slots): no copy, same ids."""
    lens, cs, C = [1200, 333], 8, 16
    q, k, table, seq = select_problem(lens, Hq=4, Hkv=2, D=48, dtype=BF16, seed=4)
    want = run_select("cpu", q, k, table, seq, cs, C, 1, 1, None)
    big = torch.zeros(k.shape[0], k.shape[1] + 1, k.shape[2] + 1, 64, dtype=BF16)
    big[:, :k.shape[1], :k.shape[2], :48] = k
    kv = big[:, :k.shape[1], :k.shape[2], :48]
    qv = torch.zeros(2, 6, 50, dtype=BF16)[:, 1:5, 2:50]
    qv.copy_(q)
    assert not kv.is_contiguous() and not qv.is_contiguous()
    assert torch.equal(run_select("cpu", qv, kv, table, seq, cs, C, 1, 1, None), want)


def test_select_unchecked_garbage_is_memory_safe():
    """Unchecked entry point: page ids outside the cache (rows count as zero), negative and
    too long seq_lens, counts that overfill the row: no crash, ids inside [−1, F_b)."""
    q, k, table, seq = select_problem([600, 600, 600], Hq=4, Hkv=2, D=32, seed=5)
    table = table.clone()
    table[0, 3] = -7
    table[1, 5] = 10**6
    seq = torch.tensor([600, -40, 10**6], dtype=torch.int32)
    cap = table.shape[1] * k.shape[1] // 8
    for ns, nr, C in ((1, 1, 10), (0, 0, 4), (3, 2, 5)):
        ids = cpu_select(q, k, table, seq, 8, C, ns, nr, None)
        assert ids.shape == (3, 2, C)
        full = [75, 0, cap]
        for b in range(3):
            row = ids[b].flatten()
            assert ((row >= -1) & (row < max(full[b], 1))).all(), ids[b]
    assert (cpu_select(q, k, table, seq, 8, 10, 1, 1, None)[1] == -1).all()


# ----------------------------------------------------------------------------- build_tree


@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_build_tree_large_batch_equals_torch(id_dtype):
    """80 trees of up to 200 nodes in 8-word masks (the threaded path: T·W >= 32768), int32
    and int64 parents and prefixes: the torch backend's outputs, same bits for 1 and 2 threads."""
    g = torch.Generator().manual_seed(6)
    kinds = ["random", "chain", "star", "full"]
    sizes = [int(x) for x in torch.randint(1, 201, (80,), generator=g)]
    parents = sum((tree_parents(kinds[i % 4], n, g) for i, n in enumerate(sizes)), [])
    cu = torch.tensor([0] + torch.tensor(sizes).cumsum(0).tolist(), dtype=torch.int32)
    par = torch.tensor(parents, dtype=id_dtype)
    prefix = torch.randint(0, 2**30, (80,), generator=g).to(id_dtype)
    call = lambda: fastverify.build_tree(par, cu, prefix, max_nodes=512)  # noqa: E731
    want = on_backend("torch", call)
    one = with_threads(1, lambda: on_backend("cpu", call))
    two = with_threads(2, lambda: on_backend("cpu", call))
    assert same_bits(one, want)
    assert same_bits(two, one)


def test_build_tree_unchecked_garbage_cu_is_memory_safe():
    """A non-monotone cu_num_nodes and parents past their tree: every row written, depths
    bounded by the tree sizes, no crash."""
    par = torch.tensor([-1, 0, 5, 1, 99, -3, 2, 0], dtype=torch.int64)
    cu = torch.tensor([0, 6, 2, 8], dtype=torch.int32)
    mask, pos, depth = cpu_build_tree(par, cu, torch.tensor([10, -4, 7]), 8)
    assert mask.shape == (8, 1) and (depth >= 0).all() and (depth <= 8).all()


# ----------------------------------------------------------------------------- compact_kv


def compact_problem(B, Hkv, D, page, dtype, columns, seed):
    g = torch.Generator().manual_seed(seed)
    per = -(-(8 + 2 * columns + 8) // page) + 1
    table = torch.randperm(B * per, generator=g).view(B, per).to(torch.int32)
    k = torch.randn(B * per, page, Hkv, D, generator=g).to(dtype)
    v = torch.randn(B * per, page, Hkv, D, generator=g).to(dtype)
    prefix = torch.randint(0, 8, (B,), generator=g, dtype=torch.int32)
    acc = torch.full((B, columns), -1, dtype=torch.int32)
    num = torch.randint(0, columns, (B,), generator=g, dtype=torch.int32)
    for b in range(B):
        steps = torch.randint(1, 3, (int(num[b]),), generator=g).cumsum(0)   # increasing, overlapping steps
        acc[b, 0] = 0
        acc[b, 1:1 + int(num[b])] = steps.to(torch.int32)
    return k, v, table, prefix, acc, num


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16", "f16"])
def test_compact_kv_large_batch_equals_torch(dtype):
    """64 requests x 8 KV heads x D 128 (the threaded path: >= 1 MiB of moves): the torch
    backend's caches bit for bit, same for 1 and 2 threads."""
    k, v, table, prefix, acc, num = compact_problem(64, 8, 128, 16, dtype, 9, seed=7)
    results = []
    for backend, threads in (("torch", 1), ("cpu", 1), ("cpu", 2)):
        kc, vc = k.clone(), v.clone()
        with_threads(threads, lambda: on_backend(backend, lambda: fastverify.compact_kv(
            kc, vc, table, prefix, acc, num)))
        results.append((kc, vc))
    assert not torch.equal(results[0][0], k), "something moved"
    for kc, vc in results[1:]:
        assert torch.equal(kc, results[0][0]) and torch.equal(vc, results[0][1])


def test_compact_kv_strided_metadata():
    """block_table and accepted_nodes as strided views: read in place, same result."""
    k, v, table, prefix, acc, num = compact_problem(5, 2, 16, 4, F32, 6, seed=8)
    want_k, want_v = k.clone(), v.clone()
    on_backend("torch", lambda: fastverify.compact_kv(want_k, want_v, table, prefix, acc, num))
    wide_t = torch.zeros(5, 2 * table.shape[1], dtype=torch.int32)
    wide_t[:, ::2] = table
    wide_a = torch.zeros(5, 12, dtype=torch.int32)
    wide_a[:, ::2] = acc
    kc, vc = k.clone(), v.clone()
    cpu_compact_kv(kc, vc, wide_t[:, ::2], prefix, wide_a[:, ::2], num)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)


def test_select_unchecked_chunks_that_straddle_pages():
    """chunk_size 3 over pages of 4 (refused by the public op): each chunk's rows are read
    page by page, inside the cache, as the torch backend reads them."""
    from fastverify.ops.sparse_kv import select_kv_chunks_torch
    q, k, table, seq = select_problem([301, 150], Hq=4, Hkv=2, D=32, page=4, seed=9)
    want = select_kv_chunks_torch(q, k, table, seq, 3, 12, 1, 1, None)
    assert torch.equal(cpu_select(q, k, table, seq, 3, 12, 1, 1, None), want)
