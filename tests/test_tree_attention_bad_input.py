"""Bad input to build_tree / tree_attention / compact_kv: a clear error naming the
argument, before any kernel runs; with checks off, kernels never read out of bounds."""

import pytest
import torch

from attention_problems import paged_problem
from conftest import BACKEND_DEVICES

from fastverify.triton import tree_attention as triton_attention

pytestmark = pytest.mark.family("tree_attention")


@pytest.fixture
def p():
    return paged_problem([3, 4], [5, 9], Hq=4, Hkv=2, D=16, page=4, seed=0)


def attn(p, **over):
    a = dict(q=p.q, k_cache=p.k_cache, v_cache=p.v_cache, block_table=p.block_table, seq_lens=p.seq_lens,
             cu_num_nodes=p.cu, tree_mask=p.tree_mask)
    a.update(over)
    sm = a.pop("sm_scale", None)
    return torch.ops.fastverify.tree_attention(*a.values(), sm_scale=sm)


def with_bits(p, row, word):
    m = p.tree_mask.clone()
    m[row, 0] = word
    return dict(tree_mask=m)


ATTN_CASES = {
    "q_2d": (lambda p: dict(q=p.q[0]), "q must have 3 dimension"),
    "q_int": (lambda p: dict(q=p.q.long()), "q must be float16/bfloat16/float32"),
    "cache_dtype": (lambda p: dict(k_cache=p.k_cache.double()), "k_cache must be float32"),
    "v_shape": (lambda p: dict(v_cache=p.v_cache[:, :2]), "v_cache must have shape"),
    "head_dim": (lambda p: dict(q=p.q[..., :8].contiguous()), "does not match q head_dim"),
    "gqa": (lambda p: dict(q=torch.randn(7, 3, 16)), "not a multiple of the 2 KV heads"),
    "q_rows": (lambda p: dict(q=p.q[:-1], tree_mask=p.tree_mask[:-1]), "must equal q.shape\\[0\\]"),
    "block_table_dtype": (lambda p: dict(block_table=p.block_table.long()), "block_table must be int32"),
    "block_table_rows": (lambda p: dict(block_table=p.block_table[:1]), "block_table must have shape"),
    "block_table_short": (lambda p: dict(block_table=p.block_table[:, :2]), "block_table is too short"),
    "page_out_of_range": (lambda p: dict(block_table=torch.where(p.block_table == p.block_table[1, 0], 999,
                                                                 p.block_table)), "page id outside"),
    "seq_lens_dtype": (lambda p: dict(seq_lens=p.seq_lens.long()), "seq_lens must be int32"),
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
    "device_mismatch": (lambda p: dict(seq_lens=torch.empty(2, dtype=torch.int32, device="meta")),
                        "seq_lens is on meta"),
    "sm_scale": (lambda p: dict(sm_scale=float("nan")), "sm_scale must be a finite float"),
}


@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_tree_attention_bad_input(p, case):
    build, msg = ATTN_CASES[case]
    with pytest.raises((ValueError, TypeError), match=msg):
        attn(p, **build(p))


def test_mask_row_wider_than_tree_capacity():
    p = paged_problem([70], [3], Hq=2, Hkv=1, D=16, page=8, seed=1, kind="chain", words=2)
    with pytest.raises(ValueError, match="rows hold 64 bits"):
        attn(p, tree_mask=p.tree_mask[:, :1].contiguous())


BUILD_CASES = {
    "root_parent": (dict(parents=torch.tensor([0, 0, 1])), "is its root and must have parent -1"),
    "forward_parent": (dict(parents=torch.tensor([-1, 2, 0])), "parents do not form a tree"),
    "cu_total": (dict(cu_num_nodes=torch.tensor([0, 2], dtype=torch.int32)), "must equal parents.numel()"),
    "prefix_shape": (dict(prefix_lens=torch.tensor([1, 2])), "prefix_lens must have shape"),
    "prefix_negative": (dict(prefix_lens=torch.tensor([-1])), "prefix_lens must be >= 0"),
    "too_many_nodes": (dict(max_nodes=2), "but max_nodes is 2"),
    "parents_float": (dict(parents=torch.tensor([-1.0, 0.0, 0.0])), "parents must be int32/int64"),
}


@pytest.mark.parametrize("case", list(BUILD_CASES))
def test_build_tree_bad_input(case):
    a = dict(parents=torch.tensor([-1, 0, 1]), cu_num_nodes=torch.tensor([0, 3], dtype=torch.int32),
             prefix_lens=torch.tensor([4]), max_nodes=None)
    over, msg = BUILD_CASES[case]
    a.update(over)
    with pytest.raises((ValueError, TypeError), match=msg):
        torch.ops.fastverify.build_tree(a["parents"], a["cu_num_nodes"], a["prefix_lens"], max_nodes=a["max_nodes"])


def compact_args(p, **over):
    a = dict(k_cache=p.k_cache, v_cache=p.v_cache, block_table=p.block_table,
             prefix_lens=torch.tensor([5, 9], dtype=torch.int32),
             accepted_nodes=torch.tensor([[0, 1, 2], [0, 2, -1]], dtype=torch.int32),
             num_accepted=torch.tensor([2, 1], dtype=torch.int32))
    a.update(over)
    return list(a.values())


COMPACT_CASES = {
    "num_too_big": (dict(num_accepted=torch.tensor([3, 1], dtype=torch.int32)), r"num_accepted must be in \[0, 2\]"),
    "not_from_root": (dict(accepted_nodes=torch.tensor([[1, 2, 3], [0, 2, -1]], dtype=torch.int32)),
                      "must be 0: the accepted path starts at the root"),
    "not_increasing": (dict(accepted_nodes=torch.tensor([[0, 2, 1], [0, 2, -1]], dtype=torch.int32)),
                       "must increase along the path"),
    "beyond_pages": (dict(prefix_lens=torch.tensor([5, 30], dtype=torch.int32)), "block_table is too short"),
    "dtype": (dict(num_accepted=torch.tensor([2, 1])), "num_accepted must be int32"),
    "rows": (dict(prefix_lens=torch.tensor([5], dtype=torch.int32)), "prefix_lens must have shape"),
}


@pytest.mark.parametrize("case", list(COMPACT_CASES))
def test_compact_kv_bad_input(p, case):
    over, msg = COMPACT_CASES[case]
    with pytest.raises((ValueError, TypeError), match=msg):
        torch.ops.fastverify.compact_kv(*compact_args(p, **over))


@pytest.mark.parametrize("backend", [b for b in BACKEND_DEVICES if b != "torch"])
def test_unchecked_garbage_is_memory_safe(backend):
    """With checks off (CUDA without FASTVERIFY_CHECKS), the kernels clamp: a parent
    cycle, seq_lens beyond the block table and paths past the cache stay in bounds."""
    dev = BACKEND_DEVICES[backend]
    kernels = triton_attention
    if backend == "cuda":
        import fastverify._cuda as kernels
    mask, pos, depth = kernels.build_tree(torch.tensor([-1, 2, 1, 7], device=dev),
                                          torch.tensor([0, 4], dtype=torch.int32, device=dev),
                                          torch.tensor([0], device=dev), 4)
    assert (depth.cpu() >= 0).all() and (depth.cpu() <= 4).all()
    p = paged_problem([2], [3], Hq=2, Hkv=1, D=16, page=4, seed=2).to(dev)
    acc = torch.tensor([[0, 3, 1000]], dtype=torch.int32, device=dev)
    kernels.compact_kv(p.k_cache, p.v_cache, p.block_table, torch.tensor([3], dtype=torch.int32, device=dev), acc,
                       torch.tensor([2], dtype=torch.int32, device=dev))
