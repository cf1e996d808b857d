"""build_tree, tree_attention and compact_kv: every backend against the naive float64
oracles of attention_problems.py (ancestor bits from parent walks, per-node attention over
the root-to-node path, dense-mask SDPA, hand-moved cache slots), over paged caches in any
page order — every tree shape, page size, GQA ratio, head dim, dtype and prefix split
count, strided views, the garbage the unchecked kernels must survive — as torch ops
(opcheck, torch.compile) and with bad input.

CPU / GPU: tests run over ``BACKENDS`` (torch; triton under the Triton interpreter and
cuda through the CPU emulator here; triton and cuda on CUDA tensors on a GPU). The case
grid is every case in every dtype. Here torch runs all of it, the emulator every case in
float32 plus each case in one more dtype, the interpreter (~1 s a case) the CPU cases in float32 plus a bf16 and an f16
row; their other rows, and the interpreter's slowest build_tree inputs, are
``gpu_sized``. Split counts are a knob of the triton / cuda entry points
(``entry_points``). CUDA graphs and torch.compile on CUDA tensors are ``cuda`` tests over
the GPU backends.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import pytest
import torch

from attention_problems import (PAGED_KV_BAD, Paged, ancestors, build_tree_cases, dense_sdpa_oracle,
                                mask_words_oracle, paged_problem, path_attention_oracle, tree_parents)
from conftest import BACKENDS, BACKEND_DEVICES, capture_graph, entry_points

import fastverify
from fastverify.ops import attention as ops_attention

pytestmark = pytest.mark.family("tree_attention")

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
DTYPES = (F32, BF16, F16)
DTYPE_NAMES = {F32: "f32", BF16: "bf16", F16: "f16"}
TOL = {F32: 2e-5, BF16: 3e-2, F16: 4e-3}
KERNEL_BACKENDS = [b for b in BACKENDS if b != "torch"]   # backends with entry points (num_splits, unchecked)
GPU_BACKENDS = ("torch", "triton", "cuda")
GPU = "cuda"


# ----------------------------------------------------------------------------- running and comparing


def run_attention(p: Paged, backend: str, **kw) -> torch.Tensor:
    """tree_attention of ``p`` through the public op on ``backend``; output on CPU."""
    x = p.to(BACKEND_DEVICES[backend])
    with fastverify.use_backend(backend):
        out = fastverify.tree_attention(*x.args(), **kw)
    assert out.dtype == p.q.dtype and out.shape == p.q.shape
    return out.cpu()


def assert_close(got, want, dtype, what: str = "") -> None:
    tol = TOL[dtype]
    err = (got.double() - want.double()).abs().max().item()
    assert err <= tol * max(1.0, want.abs().max().item()), f"{what}: max abs error {err:.3g} > {tol}"


def with_scale(p: Paged, scale: float) -> Paged:
    """SDPA scales by 1/sqrt(D): a different sm_scale folded into q, for the dense oracle."""
    return replace(p, q=p.q.double() * (scale * p.q.shape[-1] ** 0.5))


def over_backends(rows, *, triton=lambda row: True, cuda=lambda row: True, backends=BACKENDS) -> list:
    """pytest params (backend, *row), row by row (the cached inputs and oracle of a row
    serve every backend); on CPU the Triton interpreter and the CUDA emulator run only
    the rows their predicate keeps, the others are ``gpu_sized`` for them."""
    keep = {"torch": lambda row: True, "cpu": lambda row: True, "triton": triton, "cuda": cuda}
    name = lambda x: DTYPE_NAMES.get(x, str(x).replace("torch.", ""))  # noqa: E731
    return [pytest.param(b, *row, id="-".join([b, *map(name, row)]),
                         marks=() if keep[b](row) else pytest.mark.gpu_sized)
            for row in rows for b in backends]


# ----------------------------------------------------------------------------- build_tree


@functools.lru_cache(maxsize=1)
def build_tree_problem():
    """build_tree_cases(seed 0) with its expected mask words, depths and request of each node."""
    parents, prefixes, cu = build_tree_cases(torch.Generator().manual_seed(0))
    sizes = [len(p) for p in parents]
    mask = torch.tensor(sum((mask_words_oracle(p, 2) for p in parents), []), dtype=torch.int64)
    depth = [len(ancestors(p, i)) - 1 for p in parents for i in range(len(p))]
    request = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return parents, prefixes, cu, mask, depth, request


@pytest.mark.parametrize("backend,index_dtype", over_backends([(torch.int64,), (torch.int32,)],
                                                             triton=lambda row: row[0] == torch.int64))
def test_build_tree_matches_oracle(backend, index_dtype):
    """A single node, a random tree, a full 64-node tree, one wider than a mask word, a
    chain; int64 ids with a prefix past 2**32, int32 ids (prefixes taken mod 2**31)."""
    parents, prefixes, cu, want_mask, want_depth, request = build_tree_problem()
    if index_dtype == torch.int32:
        prefixes = [x % 2**31 for x in prefixes]
    par = torch.tensor(sum(parents, []), dtype=index_dtype)
    prefix = torch.tensor(prefixes, dtype=index_dtype)
    dev = BACKEND_DEVICES[backend]
    with fastverify.use_backend(backend):
        out = fastverify.build_tree(par.to(dev), cu.to(dev), prefix.to(dev), max_nodes=128)
    mask, pos, depth = (t.cpu() for t in out)
    assert mask.dtype == torch.int64 and pos.dtype == torch.int64 and depth.dtype == torch.int32
    assert torch.equal(mask, want_mask)
    assert depth.tolist() == want_depth
    assert torch.equal(pos, prefix.long()[request] + depth)


@pytest.mark.parametrize("backend", over_backends([()], triton=lambda row: False))
def test_build_tree_default_width_and_256_nodes(backend):
    """max_nodes=None: T bits, here 256 nodes in 4 words."""
    parents = tree_parents("random", 256, torch.Generator().manual_seed(1))
    dev = BACKEND_DEVICES[backend]
    with fastverify.use_backend(backend):
        mask, _, _ = fastverify.build_tree(torch.tensor(parents, device=dev),
                                           torch.tensor([0, 256], dtype=torch.int32, device=dev),
                                           torch.tensor([0], device=dev))
    assert mask.shape == (256, 4)
    assert torch.equal(mask.cpu(), torch.tensor(mask_words_oracle(parents, 4)))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_build_tree_garbage_is_memory_safe(backend):
    """Unchecked (CUDA without FASTVERIFY_CHECKS): a parent cycle and a parent past the
    tree stay in bounds; node 1's parent 2 comes after it, so its walk stops there."""
    dev = BACKEND_DEVICES[backend]
    mask, _, depth = entry_points(backend, "tree_attention").build_tree(
        torch.tensor([-1, 2, 1, 7], device=dev), torch.tensor([0, 4], dtype=torch.int32, device=dev),
        torch.tensor([0], device=dev), 4)
    assert (depth.cpu() >= 0).all() and (depth.cpu() <= 4).all()
    assert mask.cpu()[:, 0].tolist()[:2] == [1, 2]


# ----------------------------------------------------------------------------- tree_attention

CASES = {
    # name: (sizes, prefixes, paged_problem kwargs)
    "random_trees": ([6, 11, 3], [20, 37, 5], dict(kind="random")),
    "chain": ([9], [30], dict(kind="chain")),
    "single_node_decode": ([1, 1, 1], [17, 1, 40], dict(kind="single")),
    "full_64_node_tree": ([64], [24], dict(kind="full")),
    "one_node_beside_many": ([1, 40, 1], [9, 16, 0], dict(kind="random")),
    "prefix_zero": ([5, 4], [0, 0], dict(kind="random")),
    "page_size_1": ([4, 6], [3, 8], dict(kind="random", page=1)),
    "page_size_256_contiguous": ([7, 3], [100, 20], dict(kind="random", page=256, shuffle=False)),
    "gqa_1": ([5, 8], [13, 29], dict(Hq=3, Hkv=3)),
    "gqa_8": ([5, 8], [13, 29], dict(Hq=8, Hkv=1)),
    "head_dim_80": ([5, 7], [19, 10], dict(D=80)),
    "head_dim_96": ([6], [33], dict(D=96, Hq=4, Hkv=1)),
    "head_dim_128": ([4, 3], [21, 40], dict(D=128)),
    "head_dim_256": ([3], [18], dict(D=256, Hq=2, Hkv=1)),
}
# shapes that matter for the kernels' tiles: several q tiles and prefix splits, a head dim
# off the 16-byte grid, one past 128
TILE_CASES = {
    "full_64_node_tree_gqa_4": ([64, 3], [100, 7], dict(Hq=8, Hkv=2, kind="full")),
    "long_prefixes_many_splits": ([3, 64, 1], [700, 1500, 33], dict(Hq=4, Hkv=1, page=32)),
    "mixed_sizes_page_7": ([1, 17, 64, 2], [50, 0, 13, 290], dict(Hq=6, Hkv=3, page=7)),
    "head_dim_33_unaligned": ([5, 2], [19, 7], dict(D=33)),
    "head_dim_200": ([4, 9], [40, 18], dict(D=200, Hq=2, Hkv=1)),
}
ATTENTION_CASES = {**CASES, **TILE_CASES}
# On CPU the emulator runs every case in float32 and a subset in half precision (every
# case in one dtype, the dtypes taking turns, and three more); the interpreter runs the CPU
# cases in float32 and a bf16 and an f16 row (its tile shapes only depend on the head dim,
# which those cases span).
EMULATED_ROWS = {(case, DTYPES[i % 3]) for i, case in enumerate(ATTENTION_CASES)} | {
    ("full_64_node_tree_gqa_4", BF16), ("long_prefixes_many_splits", BF16), ("head_dim_128", F16)}
INTERPRETED_ROWS = {(case, F32) for case in CASES} | {
    ("random_trees", F16), ("head_dim_80", BF16)}


@functools.lru_cache(maxsize=2)
def attention_case(case: str, dtype) -> tuple[Paged, torch.Tensor]:
    """(problem, oracle output) of an ATTENTION_CASES row, shared by the backends."""
    sizes, prefixes, kw = ATTENTION_CASES[case]
    p = paged_problem(sizes, prefixes, seed=len(case), dtype=dtype, **kw)
    # the dense oracle gathers each request's keys once: cheaper for long prefixes and big trees
    return p, dense_sdpa_oracle(p) if max(p.prefixes) > 200 or max(sizes) >= 64 else path_attention_oracle(p)


@pytest.mark.parametrize("backend,case,dtype", over_backends(
    [(case, dtype) for case in ATTENTION_CASES for dtype in DTYPES], triton=INTERPRETED_ROWS.__contains__,
    cuda=lambda row: row[1] == F32 or row in EMULATED_ROWS))
def test_tree_attention_matches_oracle(backend, case, dtype):
    p, want = attention_case(case, dtype)
    assert_close(run_attention(p, backend), want, dtype, f"{backend} {case}")


# The torch backend off the CPU runs the padded path (static shapes, no host read: a CUDA
# graph can capture it); here it runs on CPU against the same oracles.
@pytest.mark.parametrize("case,dtype", [(case, F32) for case in ATTENTION_CASES]
                         + [("random_trees", BF16), ("head_dim_80", F16), ("mixed_sizes_page_7", BF16)])
def test_padded_torch_path_matches_oracle(case, dtype):
    p, want = attention_case(case, dtype)
    assert_close(ops_attention._tree_attention_padded(*p.args(), None), want, dtype, f"padded {case}")


def test_padded_torch_path_sm_scale_and_garbage():
    p = paged_problem([7, 12, 1], [45, 3, 20], Hq=8, Hkv=2, D=64, page=8, seed=3)
    assert_close(ops_attention._tree_attention_padded(*p.args(), 0.3), dense_sdpa_oracle(with_scale(p, 0.3)), F32)
    p = paged_problem([3, 4], [5, 9], Hq=4, Hkv=2, D=64, page=4, seed=13)
    p.block_table[1, 1] = 10**6
    p.block_table[0, 0] = -5
    p.seq_lens[0] = 10**6
    assert torch.isfinite(ops_attention._tree_attention_padded(*p.args(), None)).all()


def test_build_tree_static_bound_while_capturing(monkeypatch):
    """While a CUDA graph is captured build_tree reads no tree size back: it walks
    min(T, 64·W) levels, with the same result."""
    parents, prefixes, cu, want_mask, want_depth, request = build_tree_problem()
    monkeypatch.setattr(ops_attention, "host_read_ok", lambda t: False)
    mask, pos, depth = ops_attention.build_tree_torch(torch.tensor(sum(parents, [])), cu, torch.tensor(prefixes), 128)
    assert torch.equal(mask, want_mask)
    assert depth.tolist() == want_depth


def test_oracles_agree():
    p = paged_problem([5, 9], [12, 4], Hq=4, Hkv=2, D=32, page=4, seed=9)
    assert (path_attention_oracle(p) - dense_sdpa_oracle(p)).abs().max() < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_sm_scale_matches_dense_sdpa(backend):
    p = paged_problem([7, 12, 1], [45, 3, 20], Hq=8, Hkv=2, D=64, page=8, seed=3)
    assert_close(run_attention(p, backend, sm_scale=0.3), dense_sdpa_oracle(with_scale(p, 0.3)), F32)


@pytest.mark.parametrize("backend,dtype", over_backends([(d,) for d in DTYPES], triton=lambda row: row[0] == F32,
                                                        backends=KERNEL_BACKENDS))
def test_prefix_splits_merge_to_the_same_result(backend, dtype):
    """sm_scale, and every number of prefix splits (the launcher's choice, 1 .. 16) merging
    to the dense oracle; spare block-table columns past the prefixes."""
    p = paged_problem([4, 2, 7], [150, 61, 300], Hq=4, Hkv=2, D=64, page=16, seed=6, spare_columns=3, dtype=dtype)
    want = dense_sdpa_oracle(with_scale(p, 0.3))
    x = p.to(BACKEND_DEVICES[backend])
    for splits in (None, 1, 2, 5, 16):
        got = entry_points(backend, "tree_attention").tree_attention(*x.args(), 0.3, num_splits=splits).cpu()
        assert_close(got, want, dtype, f"num_splits={splits}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_chain_is_causal_attention(backend):
    """A chain's mask is lower-triangular: the same as causal attention of prefix + chain."""
    p = paged_problem([6], [10], Hq=2, Hkv=1, D=32, page=4, kind="chain", seed=4)
    L = 16
    K = torch.stack([p.k_cache[int(p.block_table[0, x // 4]), x % 4] for x in range(L)]).double()
    V = torch.stack([p.v_cache[int(p.block_table[0, x // 4]), x % 4] for x in range(L)]).double()
    allow = torch.ones(6, L, dtype=torch.bool).tril(L - 6)
    want = torch.nn.functional.scaled_dot_product_attention(
        p.q.double().transpose(0, 1)[None], K.transpose(0, 1).repeat_interleave(2, 0)[None],
        V.transpose(0, 1).repeat_interleave(2, 0)[None], attn_mask=allow)[0].transpose(0, 1)
    assert_close(run_attention(p, backend), want, F32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_width_larger_than_needed(backend):
    """A 2-word mask for trees of <= 64 nodes: the extra zero word changes nothing."""
    p = paged_problem([5, 3], [9, 12], seed=7, words=2)
    assert_close(run_attention(p, backend), path_attention_oracle(p), F32)


@pytest.mark.parametrize("backend,dtype,pad", over_backends([(d, pad) for d in DTYPES for pad in (8, 3)],
                                                            triton=lambda row: row[0] == F32))
def test_strided_q_and_caches(backend, dtype, pad):
    """q and the caches as views with padded head rows: strides off the dense layout,
    by 8 (16-byte rows stay possible for 16-bit types) or 3 (element loads)."""
    p, want = attention_case("random_trees", dtype)
    dev = BACKEND_DEVICES[backend]

    def padded(t):
        big = torch.zeros(*t.shape[:-1], t.shape[-1] + pad, dtype=dtype, device=dev)[..., :t.shape[-1]]
        big.copy_(t)
        return big

    x = replace(p.to(dev), q=padded(p.q), k_cache=padded(p.k_cache), v_cache=padded(p.v_cache))
    assert not x.q.is_contiguous() and not x.k_cache.is_contiguous()
    assert_close(run_attention(x, backend), want, dtype, f"rows padded by {pad}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_tree_attention_garbage_is_memory_safe(backend):
    """Unchecked garbage (CUDA without FASTVERIFY_CHECKS): seq_lens beyond the block table
    and page ids outside the cache are masked out, never read."""
    p = paged_problem([3, 4], [5, 9], Hq=4, Hkv=2, D=64, page=4, seed=13)
    p.block_table[1, 1] = 10**6
    p.block_table[0, 0] = -5
    p.seq_lens[0] = 10**6
    x = p.to(BACKEND_DEVICES[backend])
    out = entry_points(backend, "tree_attention").tree_attention(*x.args(), None).cpu()
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_public_ops_route_to_the_backend(backend):
    """build_tree and tree_attention under use_backend run that backend's kernels (int32
    parents and prefixes, bf16, head dim 128)."""
    p = paged_problem([5, 9], [21, 14], Hq=4, Hkv=2, D=128, page=16, dtype=BF16, seed=5)
    x = p.to(BACKEND_DEVICES[backend])
    parents = torch.tensor(sum(p.parents, []), dtype=torch.int32, device=x.q.device)
    prefix = torch.tensor(p.prefixes, dtype=torch.int32, device=x.q.device)
    with fastverify.use_backend(backend):
        mask, pos, _ = fastverify.build_tree(parents, x.cu, prefix, max_nodes=64)
        out = fastverify.tree_attention(x.q, x.k_cache, x.v_cache, x.block_table, x.seq_lens, x.cu, mask)
    assert torch.equal(mask.cpu(), p.tree_mask)
    assert pos.cpu().tolist() == [p.prefixes[b] + len(ancestors(par, i)) - 1
                                  for b, par in enumerate(p.parents) for i in range(len(par))]
    assert torch.equal(out, entry_points(backend, "tree_attention").tree_attention(*x.args(), None))
    assert_close(out.cpu(), path_attention_oracle(p), BF16, "public op vs oracle")


# ----------------------------------------------------------------------------- the cpu backend's kernel

cpu_only = pytest.mark.skipif("cpu" not in BACKEND_DEVICES, reason="the cpu backend's C++ library is not built")


def run_cpu(p: Paged, threads: int, sm_scale=None, num_splits=None) -> torch.Tensor:
    """The cpu entry point on ``threads`` OpenMP threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return entry_points("cpu", "tree_attention").tree_attention(*p.args(), sm_scale, num_splits=num_splits)
    finally:
        torch.set_num_threads(before)


@cpu_only
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES.get)
def test_cpu_big_trees_wide_gqa(dtype):
    """Trees of 128 and 97 nodes (two mask words) with GQA 32: 4096 query rows per KV head,
    register tiles with row tails, tree parts spanning several key blocks; every cache dtype."""
    p = paged_problem([128, 97], [70, 300], Hq=32, Hkv=1, D=64, page=16, dtype=dtype, seed=31)
    assert_close(run_cpu(p, 2), dense_sdpa_oracle(p), dtype, "cpu")


@cpu_only
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES.get)
def test_cpu_same_bits_for_any_thread_count(dtype):
    """Work units and their merge order depend on the shapes only: 1, 2 and 3 threads give
    bit-identical outputs (default split and forced splits)."""
    p = paged_problem([64, 7, 1], [900, 40, 2000], Hq=8, Hkv=2, D=128, dtype=dtype, seed=8)
    for splits in (None, 4):
        outs = [run_cpu(p, threads, num_splits=splits) for threads in (1, 2, 3)]
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2]), f"num_splits={splits}"
    assert_close(outs[0], dense_sdpa_oracle(p), dtype, "cpu")


PORTABLE_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
import fastverify.cpu
from attention_problems import paged_problem
from fastverify.cpu import tree_attention as cpu_tree
assert fastverify.cpu.isa() == "portable" and fastverify.cpu.available()
outs = []
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    p = paged_problem([9, 70], [45, 130], Hq=8, Hkv=2, D=80, page=8, dtype=dtype, seed=12)
    outs.append(cpu_tree.tree_attention(*p.args(), None))
torch.save(outs, {out!r})
"""


@cpu_only
def test_cpu_portable_build(tmp_path):
    """FASTVERIFY_CPU_ISA=portable (-march=x86-64: the plain C++ loops, no AVX-512 or
    vdpbf16ps) builds and matches the oracle in every dtype."""
    import os
    import subprocess
    import sys

    out = tmp_path / "outs.pt"
    script = PORTABLE_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)), out=str(out))
    env = dict(os.environ, FASTVERIFY_CPU_ISA="portable")
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=600)
    for dtype, got in zip(DTYPES, torch.load(out)):
        p = paged_problem([9, 70], [45, 130], Hq=8, Hkv=2, D=80, page=8, dtype=dtype, seed=12)
        assert got.dtype == dtype
        assert_close(got, dense_sdpa_oracle(p), dtype, f"portable {DTYPE_NAMES[dtype]}")


# ----------------------------------------------------------------------------- compact_kv

COMPACT_LAYOUTS = {
    # name: (dtype, head_dim, padded head row): 16-byte units, 4-byte and 2-byte elements
    "fp32_d16": (F32, 16, 16),
    "bf16_d64": (BF16, 64, 64),
    "fp16_d80_padded": (F16, 80, 88),
    "fp16_d33": (F16, 33, 33),
    "fp32_d5_padded": (F32, 5, 7),
}
# accepted paths: request 0 walks root -> 2 -> 5 (step 2 reads prefix + 5 after step 1
# wrote prefix + 1: gather before scatter), request 1 accepts nothing, request 2 is a
# lone root, request 3 walks a 3-step path
COMPACT_PATHS = [[0, 2, 5], [0], [0], [0, 1, 3, 8]]


def compact_oracle(p: Paged, paths) -> tuple[torch.Tensor, torch.Tensor]:
    """The caches after compaction, slot by slot: step i of a path copies key prefix + node
    (as it was before the op) to prefix + i; every other slot unchanged."""
    k_want, v_want = p.k_cache.clone(), p.v_cache.clone()
    page = p.k_cache.shape[1]
    for b, path in enumerate(paths):
        for i, node in enumerate(path):
            src, dst = p.prefixes[b] + node, p.prefixes[b] + i
            for want, cache in ((k_want, p.k_cache), (v_want, p.v_cache)):
                want[int(p.block_table[b, dst // page]), dst % page] = \
                    cache[int(p.block_table[b, src // page]), src % page]
    return k_want, v_want


def accepted_of(paths, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(accepted_nodes [B, width] int32 -1 padded, num_accepted [B] int32) of the paths."""
    accepted = torch.full((len(paths), width), -1, dtype=torch.int32)
    for b, path in enumerate(paths):
        accepted[b, :len(path)] = torch.tensor(path)
    return accepted, torch.tensor([len(x) - 1 for x in paths], dtype=torch.int32)


@pytest.mark.parametrize("backend,layout", over_backends([(x,) for x in COMPACT_LAYOUTS]))
def test_compact_kv_moves_the_accepted_path_only(backend, layout):
    """Overlapping source/destination steps, empty paths, lone roots, over caches whose
    head rows may be padded: the oracle's bytes, other slots and the padding untouched."""
    dtype, D, row = COMPACT_LAYOUTS[layout]
    p = paged_problem([7, 5, 1, 9], [13, 0, 30, 6], Hq=2, Hkv=2, D=D, page=4, seed=8, dtype=dtype)
    k_want, v_want = compact_oracle(p, COMPACT_PATHS)
    accepted, num = accepted_of(COMPACT_PATHS, 5)
    dev = BACKEND_DEVICES[backend]
    caches = []
    for c in (p.k_cache, p.v_cache):
        big = torch.zeros(*c.shape[:3], row, dtype=dtype, device=dev)
        big[..., :D] = c
        caches.append(big)
    k, v = (c[..., :D] for c in caches)
    with fastverify.use_backend(backend):
        fastverify.compact_kv(k, v, p.block_table.to(dev), torch.tensor(p.prefixes, dtype=torch.int32, device=dev),
                              accepted.to(dev), num.to(dev))
    assert torch.equal(k.cpu(), k_want) and torch.equal(v.cpu(), v_want)
    assert all((c[..., D:] == 0).all() for c in caches), "bytes past head_dim untouched"


@pytest.mark.parametrize("backend", BACKENDS)
def test_compact_then_attend_equals_the_path_alone(backend):
    """After compaction the accepted path is a plain contiguous sequence: attending from
    its last node over positions < prefix + len(path) gives the tree result."""
    p = paged_problem([8], [11], Hq=4, Hkv=2, D=32, page=4, kind="random", seed=10)
    leaf = 7
    path = ancestors(p.parents[0], leaf)
    tree_out = run_attention(p, backend)[leaf]
    accepted, num = accepted_of([path], 8)
    x = p.to(BACKEND_DEVICES[backend])
    dev = x.q.device
    with fastverify.use_backend(backend):
        fastverify.compact_kv(x.k_cache, x.v_cache, x.block_table, torch.tensor([11], dtype=torch.int32, device=dev),
                              accepted.to(dev), num.to(dev))
    chain = replace(x, q=x.q[leaf:leaf + 1], seq_lens=torch.tensor([11 + len(path)], dtype=torch.int32),
                    cu=torch.tensor([0, 1], dtype=torch.int32), tree_mask=torch.tensor([[1]]))
    assert_close(run_attention(chain, backend)[0], tree_out, F32)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_compact_kv_garbage_is_memory_safe(backend):
    """Unchecked: step 1 (node 3, slot 6) is past the request's 5 keys but inside its
    pages, so it is copied; step 2 (node 1000) is past the block table: skipped."""
    p = paged_problem([2], [3], Hq=2, Hkv=1, D=16, page=4, seed=2)
    k_want = p.k_cache.clone()
    page = p.k_cache.shape[1]
    src, dst = 3 + 3, 3 + 1
    k_want[int(p.block_table[0, dst // page]), dst % page] = p.k_cache[int(p.block_table[0, src // page]), src % page]
    x = p.to(BACKEND_DEVICES[backend])
    dev = x.q.device
    entry_points(backend, "tree_attention").compact_kv(
        x.k_cache, x.v_cache, x.block_table, torch.tensor([3], dtype=torch.int32, device=dev),
        torch.tensor([[0, 3, 1000]], dtype=torch.int32, device=dev), torch.tensor([2], dtype=torch.int32, device=dev))
    assert torch.equal(x.k_cache.cpu(), k_want)


# ----------------------------------------------------------------------------- on the GPU only


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_and_compile(backend):
    """A verify step's attention (two trees, 6 and 64 nodes, fp16, head dim 128) captured
    and replayed, the replay following new q; torch.compile(fullgraph=True) around it."""
    p = paged_problem([6, 64], [300, 40], Hq=8, Hkv=2, D=128, page=16, dtype=F16, seed=14).to(GPU)
    fn = functools.partial(fastverify.tree_attention, *p.args())
    with fastverify.use_backend(backend):
        graph, out = capture_graph(fn)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, fn())
        p.q.copy_(torch.randn_like(p.q))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, fn()), "the replay follows new q"

        def f(q, k, v, table, lens, cu, mask):
            return torch.ops.fastverify.tree_attention(q * 1.0, k, v, table, lens, cu, mask) * 2

        got = torch.compile(f, fullgraph=True)(*p.args())
        want = f(*p.args())
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------- as torch ops


@pytest.fixture
def small() -> Paged:
    """A small problem for the torch-op and bad-input tests (the bad masks name its trees' nodes)."""
    return paged_problem([3, 4], [5, 9], Hq=4, Hkv=2, D=16, page=4, seed=0)


@pytest.mark.skipif("cuda" not in BACKENDS, reason="no cuda backend in this session")
def test_cuda_library_registers_the_extension_schemas():
    """The CUDA extension's own schemas (on CPU: the emulated library, same bindings file)."""
    kern = entry_points("cuda", "tree_attention")
    ops = kern.ops() if hasattr(kern, "ops") else kern._extension.ops()
    assert "cuda_stream" in str(ops.tree_attention._schema) and "num_splits" in str(ops.tree_attention._schema)
    assert "Tensor(a!) k_cache" in str(ops.compact_kv._schema)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, small):
    dev = BACKEND_DEVICES[backend]
    p = small.to(dev)
    parents = torch.tensor(sum(small.parents, []), device=dev)
    prefix = torch.tensor(small.prefixes, dtype=torch.int32, device=dev)
    accepted = torch.tensor([[0, 1, -1, -1], [0, -1, -1, -1]], dtype=torch.int32, device=dev)
    with fastverify.use_backend(backend):
        torch.library.opcheck(torch.ops.fastverify.build_tree.default, (parents, p.cu, prefix.long()),
                              {"max_nodes": 4})
        torch.library.opcheck(torch.ops.fastverify.tree_attention.default, p.args(), {"sm_scale": 0.2})
        torch.library.opcheck(torch.ops.fastverify.compact_kv.default,
                              (p.k_cache, p.v_cache, p.block_table, prefix, accepted,
                               torch.tensor([1, 0], dtype=torch.int32, device=dev)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    dev = BACKEND_DEVICES[backend]
    p = paged_problem([3, 5], [6, 2], Hq=4, Hkv=2, D=16, page=4, seed=12).to(dev)
    parents = torch.tensor(sum(p.parents, []), device=dev)
    prefix = torch.tensor(p.prefixes, device=dev)

    def step(parents, cu, prefix, q, k, v, table, lens):
        mask, pos, depth = torch.ops.fastverify.build_tree(parents, cu, prefix, max_nodes=8)
        return torch.ops.fastverify.tree_attention(q * 1.0, k, v, table, lens, cu, mask) * 2, pos

    with fastverify.use_backend(backend):
        args = (parents, p.cu, prefix, p.q, p.k_cache, p.v_cache, p.block_table, p.seq_lens)
        want = step(*args)
        got = torch.compile(step, fullgraph=True, backend="aot_eager")(*args)
    assert torch.allclose(got[0], want[0]) and torch.equal(got[1], want[1])


# ----------------------------------------------------------------------------- bad input
# A clear error naming the argument, before any kernel runs (the checks are the same for
# every backend; on CPU tensors they always run).


def attention_args(p: Paged, **over) -> dict:
    a = dict(q=p.q, k_cache=p.k_cache, v_cache=p.v_cache, block_table=p.block_table, seq_lens=p.seq_lens,
             cu_num_nodes=p.cu, tree_mask=p.tree_mask)
    a.update(over)
    return a


def with_bits(p: Paged, row: int, word: int) -> dict:
    m = p.tree_mask.clone()
    m[row, 0] = word
    return dict(tree_mask=m)


ATTENTION_BAD = {
    **PAGED_KV_BAD,
    "v_shape": (lambda p: dict(v_cache=p.v_cache[:, :2]), "v_cache must have shape"),
    "q_rows": (lambda p: dict(q=p.q[:-1], tree_mask=p.tree_mask[:-1]), "must equal q.shape\\[0\\]"),
    "seq_lens_shorter_than_tree": (lambda p: dict(seq_lens=torch.tensor([2, 13], dtype=torch.int32)),
                                   r"seq_lens\[0\] = 2 is shorter than the 3 tree nodes"),
    "cu_not_increasing": (lambda p: dict(cu_num_nodes=torch.tensor([0, 0, 7], dtype=torch.int32)),
                          "strictly increasing"),
    "cu_dtype": (lambda p: dict(cu_num_nodes=p.cu.long()), "cu_num_nodes must be int32"),
    "mask_dtype": (lambda p: dict(tree_mask=p.tree_mask.int()), "tree_mask must be int64"),
    "mask_rows": (lambda p: dict(tree_mask=p.tree_mask[:-1]), "tree_mask must have shape"),
    "mask_missing_self": (lambda p: with_bits(p, 1, 0b001), r"tree_mask\[1\] does not set its own bit 1"),
    "mask_later_node": (lambda p: with_bits(p, 1, 0b111), "allows a later node"),
    "mask_second_root": (lambda p: with_bits(p, 5, 0b100), "only node 0 of request 1 may be a root"),
    "mask_not_ancestor_closed": (lambda p: with_bits(p, 6, 0b1101), "not ancestor-closed"),
    "mask_beyond_tree": (lambda p: with_bits(p, 0, 0b1001), "beyond the 3 nodes"),
    "sm_scale": (lambda p: dict(sm_scale=float("nan")), "sm_scale must be a finite float"),
}


@pytest.mark.parametrize("case", list(ATTENTION_BAD))
def test_tree_attention_bad_input(small, case):
    build, msg = ATTENTION_BAD[case]
    a = attention_args(small, **build(small))
    sm_scale = a.pop("sm_scale", None)
    with pytest.raises((ValueError, TypeError), match=msg):
        torch.ops.fastverify.tree_attention(*a.values(), sm_scale=sm_scale)


def test_tree_attention_mask_row_wider_than_tree_capacity():
    p = paged_problem([70], [3], Hq=2, Hkv=1, D=16, page=8, seed=1, kind="chain", words=2)
    with pytest.raises(ValueError, match="rows hold 64 bits"):
        torch.ops.fastverify.tree_attention(*attention_args(p, tree_mask=p.tree_mask[:, :1].contiguous()).values())


BUILD_TREE_BAD = {
    "root_parent": (dict(parents=torch.tensor([0, 0, 1])), "is its root and must have parent -1"),
    "forward_parent": (dict(parents=torch.tensor([-1, 2, 0])), "parents do not form a tree"),
    "cu_total": (dict(cu_num_nodes=torch.tensor([0, 2], dtype=torch.int32)), "must equal parents.numel()"),
    "prefix_shape": (dict(prefix_lens=torch.tensor([1, 2])), "prefix_lens must have shape"),
    "prefix_negative": (dict(prefix_lens=torch.tensor([-1])), "prefix_lens must be >= 0"),
    "too_many_nodes": (dict(max_nodes=2), "but max_nodes is 2"),
    "parents_float": (dict(parents=torch.tensor([-1.0, 0.0, 0.0])), "parents must be int32/int64"),
}


@pytest.mark.parametrize("case", list(BUILD_TREE_BAD))
def test_build_tree_bad_input(case):
    a = dict(parents=torch.tensor([-1, 0, 1]), cu_num_nodes=torch.tensor([0, 3], dtype=torch.int32),
             prefix_lens=torch.tensor([4]), max_nodes=None)
    over, msg = BUILD_TREE_BAD[case]
    a.update(over)
    with pytest.raises((ValueError, TypeError), match=msg):
        torch.ops.fastverify.build_tree(a["parents"], a["cu_num_nodes"], a["prefix_lens"], max_nodes=a["max_nodes"])


COMPACT_KV_BAD = {
    "num_too_big": (dict(num_accepted=torch.tensor([3, 1], dtype=torch.int32)), r"num_accepted must be in \[0, 2\]"),
    "not_from_root": (dict(accepted_nodes=torch.tensor([[1, 2, 3], [0, 2, -1]], dtype=torch.int32)),
                      "must be 0: the accepted path starts at the root"),
    "not_increasing": (dict(accepted_nodes=torch.tensor([[0, 2, 1], [0, 2, -1]], dtype=torch.int32)),
                       "must increase along the path"),
    "beyond_pages": (dict(prefix_lens=torch.tensor([5, 30], dtype=torch.int32)), "block_table is too short"),
    "dtype": (dict(num_accepted=torch.tensor([2, 1])), "num_accepted must be int32"),
    "rows": (dict(prefix_lens=torch.tensor([5], dtype=torch.int32)), "prefix_lens must have shape"),
}


@pytest.mark.parametrize("case", list(COMPACT_KV_BAD))
def test_compact_kv_bad_input(small, case):
    p = small
    a = dict(k_cache=p.k_cache, v_cache=p.v_cache, block_table=p.block_table,
             prefix_lens=torch.tensor([5, 9], dtype=torch.int32),
             accepted_nodes=torch.tensor([[0, 1, 2], [0, 2, -1]], dtype=torch.int32),
             num_accepted=torch.tensor([2, 1], dtype=torch.int32))
    over, msg = COMPACT_KV_BAD[case]
    a.update(over)
    with pytest.raises((ValueError, TypeError), match=msg):
        torch.ops.fastverify.compact_kv(*a.values())
