"""cpu backend of the tree-attention family: ``tree_attention`` (csrc/cpu/attention.h,
tree_attention.cpp) and the tree-structure ops ``build_tree`` / ``compact_kv``
(:mod:`fastverify.cpu.tree_structure`). Entry points with the Triton launchers' signatures."""

from __future__ import annotations

import torch

from . import DTYPE_CODES, f32, function, i32, i64, ptr
from .tree_structure import build_tree, compact_kv  # noqa: F401


def rows_unit_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` with a unit last stride (the C code walks rows of the last dim)."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def cache_args(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple:
    """The caches' pointers and strides (elements) as the C entry points take them:
    k, k strides (page, slot, head), v, v strides, num_pages, page_size. Any strides of
    dims 0..2 (views of a bigger cache), head_dim contiguous (checked by the op)."""
    return (k_cache.data_ptr(), *k_cache.stride()[:3], v_cache.data_ptr(), *v_cache.stride()[:3], k_cache.shape[0],
            k_cache.shape[1])


def tree_attention(q, k_cache, v_cache, block_table, seq_lens, cu_num_nodes, tree_mask, sm_scale, *,
                   num_splits=None):
    """cpu backend of :func:`fastverify.tree_attention` (unchecked): ``out [T, Hq, D]`` in
    q's dtype. ``num_splits`` sets the work units per request and KV head (default: from
    the shapes, never the thread count)."""
    T, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    B = cu_num_nodes.numel() - 1
    out = torch.empty((T, Hq, D), dtype=q.dtype)
    if T == 0:
        return out
    scale = D ** -0.5 if sm_scale is None else float(sm_scale)
    block_table = rows_unit_stride(block_table)
    seq_lens, cu_num_nodes = seq_lens.contiguous(), cu_num_nodes.contiguous()
    tree_mask = tree_mask.contiguous()
    rc = function("fastverify_tree_attention", i32, i32, ptr, i64, i32, i64, i64, i32, i32, ptr, i64, i64, i64, ptr,
                  i64, i64, i64, i64, i32, ptr, i64, i64, ptr, ptr, i64, ptr, i64, f32, i32, ptr, i32)(
        DTYPE_CODES[q.dtype], q.data_ptr(), T, Hq, q.stride(0), q.stride(1), Hkv, D, *cache_args(k_cache, v_cache),
        block_table.data_ptr(), block_table.stride(0), block_table.shape[1], seq_lens.data_ptr(),
        cu_num_nodes.data_ptr(), B, tree_mask.data_ptr(), tree_mask.shape[1], scale, int(num_splits or 0),
        out.data_ptr(), torch.get_num_threads())
    if rc:
        raise ValueError(f"tree_attention (cpu): unsupported dtype {q.dtype}")
    return out
