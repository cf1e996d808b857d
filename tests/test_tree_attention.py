"""build_tree, tree_attention and compact_kv: every backend against the naive oracles
(per-node path attention and dense-mask SDPA), over paged caches in any page order."""

import pytest
import torch

from attention_problems import (Paged, ancestors, build_tree_cases, dense_sdpa_oracle, mask_words_oracle,
                                paged_problem, path_attention_oracle, tree_parents)
from conftest import BACKEND_DEVICES

import fastverify
from fastverify.triton import tree_attention as triton_attention

pytestmark = pytest.mark.family("tree_attention")

BACKENDS = list(BACKEND_DEVICES)


def run_attention(p: Paged, backend: str, **kw):
    x = p.to(BACKEND_DEVICES[backend])
    with fastverify.use_backend(backend):
        return fastverify.tree_attention(*x.args(), **kw).cpu()


def assert_close(got, want, dtype):
    tol = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}[dtype]
    err = (got.double() - want).abs().max().item()
    assert err <= tol * max(1.0, want.abs().max().item()), f"max abs error {err:.3g} > {tol}"


# ----------------------------------------------------------------------------- build_tree


@pytest.mark.parametrize("backend", BACKENDS)
def test_build_tree_matches_oracle(backend):
    g = torch.Generator().manual_seed(0)
    parents, prefixes, cu = build_tree_cases(g)
    dev = BACKEND_DEVICES[backend]
    with fastverify.use_backend(backend):
        mask, pos, depth = fastverify.build_tree(torch.tensor(sum(parents, [])).to(dev), cu.to(dev),
                                                 torch.tensor(prefixes).to(dev), max_nodes=128)
    want = torch.tensor(sum((mask_words_oracle(p, 2) for p in parents), []), dtype=torch.int64)
    assert torch.equal(mask.cpu(), want)
    want_depth = [len(ancestors(p, i)) - 1 for p in parents for i in range(len(p))]
    assert depth.cpu().tolist() == want_depth
    want_pos = [prefixes[b] + len(ancestors(p, i)) - 1 for b, p in enumerate(parents) for i in range(len(p))]
    assert pos.cpu().tolist() == want_pos
    assert mask.dtype == torch.int64 and pos.dtype == torch.int64 and depth.dtype == torch.int32


def test_build_tree_default_width_and_256_nodes():
    g = torch.Generator().manual_seed(1)
    parents = tree_parents("random", 256, g)
    mask, _, _ = fastverify.build_tree(torch.tensor(parents), torch.tensor([0, 256], dtype=torch.int32),
                                       torch.tensor([0]))
    assert mask.shape == (256, 4)
    assert torch.equal(mask, torch.tensor(mask_words_oracle(parents, 4)))


# ----------------------------------------------------------------------------- tree_attention

CASES = {
    # name: (sizes, prefixes, kwargs)
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_tree_attention_matches_path_oracle(backend, case):
    sizes, prefixes, kw = CASES[case]
    p = paged_problem(sizes, prefixes, seed=len(case), **kw)
    assert_close(run_attention(p, backend), path_attention_oracle(p), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tree_attention_matches_dense_sdpa(backend):
    p = paged_problem([7, 12, 1], [45, 3, 20], Hq=8, Hkv=2, D=64, page=8, seed=3)
    got = run_attention(p, backend, sm_scale=0.3)
    want = dense_sdpa_oracle(replace_scale(p, 0.3))
    assert_close(got, want, torch.float32)


def replace_scale(p, scale):
    """SDPA scales by 1/sqrt(D): fold a different sm_scale into q."""
    from dataclasses import replace
    return replace(p, q=p.q * (scale * p.q.shape[-1] ** 0.5))


def test_oracles_agree():
    p = paged_problem([5, 9], [12, 4], Hq=4, Hkv=2, D=32, page=4, seed=9)
    assert (path_attention_oracle(p) - dense_sdpa_oracle(p)).abs().max() < 1e-12


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
    assert_close(run_attention(p, backend), want, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_half_precision(dtype):
    p = paged_problem([5, 9], [21, 14], Hq=4, Hkv=2, D=64, page=16, dtype=dtype, seed=5)
    assert_close(run_attention(p, "triton"), path_attention_oracle(p), dtype)


@pytest.mark.parametrize("num_splits", [1, 2, 5])
def test_triton_prefix_splits_merge_exactly(num_splits):
    p = paged_problem([4, 2], [150, 61], Hq=4, Hkv=2, D=32, page=16, seed=6, spare_columns=3)
    x = p.to(BACKEND_DEVICES["triton"])
    got = triton_attention.tree_attention(*x.args(), None, num_splits=num_splits).cpu()
    assert_close(got, path_attention_oracle(p), torch.float32)


def test_mask_width_larger_than_needed():
    # a 2-word mask for trees of <= 64 nodes: the extra zero word changes nothing
    p = paged_problem([5, 3], [9, 12], seed=7, words=2)
    for backend in BACKENDS:
        assert_close(run_attention(p, backend), path_attention_oracle(p), torch.float32)


# ----------------------------------------------------------------------------- compact_kv


@pytest.mark.parametrize("backend", BACKENDS)
def test_compact_kv_moves_the_accepted_path_only(backend):
    g = torch.Generator().manual_seed(8)
    p = paged_problem([7, 5, 1, 9], [13, 0, 30, 6], Hq=2, Hkv=2, D=16, page=4, seed=8)
    # accepted paths: request 0 walks root -> 2 -> 5 (needs an overlap-safe order), request 1
    # accepts nothing, request 2 is a lone root, request 3 walks a 3-step path
    paths = [[0, 2, 5], [0], [0], [0, 1, 3, 8]]
    for b, path in enumerate(paths):
        for a, c in zip(path, path[1:]):
            p.parents[b][c] = a
    D = 5
    accepted = torch.full((4, D), -1, dtype=torch.int32)
    for b, path in enumerate(paths):
        accepted[b, :len(path)] = torch.tensor(path)
    num = torch.tensor([len(x) - 1 for x in paths], dtype=torch.int32)
    prefix = torch.tensor(p.prefixes, dtype=torch.int32)
    k_want, v_want = p.k_cache.clone(), p.v_cache.clone()
    page = p.k_cache.shape[1]
    for b, path in enumerate(paths):
        for i, node in enumerate(path):
            src, dst = p.prefixes[b] + node, p.prefixes[b] + i
            for want, cache in ((k_want, p.k_cache), (v_want, p.v_cache)):
                want[int(p.block_table[b, dst // page]), dst % page] = \
                    cache[int(p.block_table[b, src // page]), src % page]
    x = p.to(BACKEND_DEVICES[backend])
    with fastverify.use_backend(backend):
        fastverify.compact_kv(x.k_cache, x.v_cache, x.block_table, prefix.to(x.q.device),
                              accepted.to(x.q.device), num.to(x.q.device))
    assert torch.equal(x.k_cache.cpu(), k_want)
    assert torch.equal(x.v_cache.cpu(), v_want)
    del g


def test_compact_then_attend_equals_the_path_alone():
    """After compaction the accepted path is a plain contiguous sequence: attending from
    its last node over positions < prefix + len(path) gives the tree result."""
    p = paged_problem([8], [11], Hq=4, Hkv=2, D=32, page=4, kind="random", seed=10)
    leaf = 7
    path = ancestors(p.parents[0], leaf)
    tree_out = run_attention(p, "torch")[leaf]
    accepted = torch.full((1, 8), -1, dtype=torch.int32)
    accepted[0, :len(path)] = torch.tensor(path)
    fastverify.compact_kv(p.k_cache, p.v_cache, p.block_table, torch.tensor([11], dtype=torch.int32), accepted,
                          torch.tensor([len(path) - 1], dtype=torch.int32))
    chain = paged_problem([1], [0], Hq=4, Hkv=2, D=32, page=4)  # reuse the dataclass shape only
    chain.q = p.q[leaf:leaf + 1]
    chain.k_cache, chain.v_cache, chain.block_table = p.k_cache, p.v_cache, p.block_table
    chain.seq_lens = torch.tensor([11 + len(path)], dtype=torch.int32)
    chain.cu = torch.tensor([0, 1], dtype=torch.int32)
    chain.tree_mask = torch.tensor([[1]])
    assert_close(run_attention(chain, "torch")[0], tree_out.double(), torch.float32)


# ----------------------------------------------------------------------------- as torch ops


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    dev = BACKEND_DEVICES[backend]
    p = paged_problem([3, 4], [5, 9], Hq=4, Hkv=2, D=16, page=4, seed=11).to(dev)
    parents = torch.tensor(sum(p.parents, []), device=dev)
    accepted = torch.tensor([[0, 1, -1, -1], [0, -1, -1, -1]], dtype=torch.int32, device=dev)
    with fastverify.use_backend(backend):
        torch.library.opcheck(torch.ops.fastverify.build_tree.default,
                              (parents, p.cu, torch.tensor([5, 9], device=dev)), {"max_nodes": 4})
        torch.library.opcheck(torch.ops.fastverify.tree_attention.default, p.args(), {"sm_scale": 0.2})
        torch.library.opcheck(torch.ops.fastverify.compact_kv.default,
                              (p.k_cache, p.v_cache, p.block_table, torch.tensor([5, 9], dtype=torch.int32, device=dev),
                               accepted, torch.tensor([1, 0], dtype=torch.int32, device=dev)))


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
