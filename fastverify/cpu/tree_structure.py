"""cpu backend of the tree-structure ops ``build_tree`` and ``compact_kv``
(``csrc/cpu/tree_structure.cpp``), with the Triton launchers' signatures
(:mod:`fastverify.triton.tree_attention`).

Both run every decoding step on small inputs, so these launchers stay thin: allocate the
outputs, pass pointers and strides (no copies of the inputs unless a dtype or a stride
needs one), call the C function once. Arguments arrive checked by the public op.
"""

from __future__ import annotations

import torch

from .._layout import mask_words
from . import function, i32, i64, ptr


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _ids(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(t contiguous, 1 if int64 else 0); other integer dtypes become int64."""
    if t.dtype not in (torch.int32, torch.int64):
        t = t.to(torch.int64)
    return _contiguous(t), int(t.dtype == torch.int64)


def build_tree(parents, cu_num_nodes, prefix_lens, max_nodes):
    """cpu backend of :func:`fastverify.build_tree` (unchecked): tree_mask [T, W] int64,
    positions [T] int64, depth [T] int32."""
    T = parents.numel()
    B = cu_num_nodes.numel() - 1
    W = mask_words(max_nodes if max_nodes is not None else T)
    mask = torch.empty((T, W), dtype=torch.int64)
    pos = torch.empty(T, dtype=torch.int64)
    depth = torch.empty(T, dtype=torch.int32)
    if T and B > 0:
        par, par64 = _ids(parents)
        pre, pre64 = _ids(prefix_lens)
        cu = _contiguous(cu_num_nodes if cu_num_nodes.dtype == torch.int32 else cu_num_nodes.to(torch.int32))
        function("fastverify_build_tree", None, ptr, i32, ptr, ptr, i32, i64, i64, i32, ptr, ptr, ptr, i32)(
            par.data_ptr(), par64, cu.data_ptr(), pre.data_ptr(), pre64, T, B, W, mask.data_ptr(), pos.data_ptr(),
            depth.data_ptr(), torch.get_num_threads())
    return mask, pos, depth


def compact_kv(k_cache, v_cache, block_table, prefix_lens, accepted_nodes, num_accepted):
    """cpu backend of :func:`fastverify.compact_kv` (unchecked, in place): each (request,
    KV head) copies its accepted path's rows down to prefix + 0, 1, ... in order."""
    B = accepted_nodes.shape[0]
    if B == 0 or accepted_nodes.shape[1] == 0:
        return
    P, page, Hkv, D = k_cache.shape
    e = k_cache.element_size()
    ks, vs = k_cache.stride(), v_cache.stride()
    if D > 1 and (ks[3] != 1 or vs[3] != 1):  # the kernel moves whole head rows of D·e bytes
        raise ValueError(f"compact_kv (cpu): k_cache and v_cache must be contiguous in head_dim, got strides "
                         f"{ks} and {vs}")
    bt, pre, acc, num = (t if t.dtype == torch.int32 else t.to(torch.int32)
                         for t in (block_table, prefix_lens, accepted_nodes, num_accepted))
    function("fastverify_compact_kv", None, ptr, ptr, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, ptr, i64,
             i64, i64, ptr, i64, ptr, i64, i64, i64, ptr, i64, i64, i32)(
        k_cache.data_ptr(), v_cache.data_ptr(), ks[0] * e, ks[1] * e, ks[2] * e, vs[0] * e, vs[1] * e, vs[2] * e,
        D * e, P, page, Hkv, bt.data_ptr(), bt.stride(0), bt.stride(1), bt.shape[1], pre.data_ptr(), pre.stride(0),
        acc.data_ptr(), acc.stride(0), acc.stride(1), acc.shape[1], num.data_ptr(), num.stride(0), B,
        torch.get_num_threads())
