"""cpu backend of the sparse-KV family: ``sparse_kv_attention`` (csrc/cpu/attention.h,
sparse_kv.cpp) and ``select_kv_chunks`` (:mod:`fastverify.cpu.select_kv`). Entry points
with the Triton launchers' signatures."""

from __future__ import annotations

import torch

from . import DTYPE_CODES, f32, function, i32, i64, ptr
from .select_kv import select_kv_chunks  # noqa: F401
from .tree_attention import cache_args, rows_unit_stride


def sparse_kv_attention(q, k_cache, v_cache, block_table, seq_lens, chunk_ids, chunk_size, sm_scale, *,
                        num_splits=None):
    """cpu backend of :func:`fastverify.sparse_kv_attention` (unchecked): ``out [B, Hq, D]``
    in q's dtype. ``num_splits`` sets the work units per (request, KV head) (default: from
    the shapes, never the thread count)."""
    B, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    out = torch.empty((B, Hq, D), dtype=q.dtype)
    if B == 0:
        return out
    scale = D ** -0.5 if sm_scale is None else float(sm_scale)
    block_table = rows_unit_stride(block_table)
    seq_lens, chunk_ids = seq_lens.contiguous(), chunk_ids.contiguous()
    rc = function("fastverify_sparse_kv_attention", i32, i32, ptr, i64, i32, i64, i64, i32, i32, ptr, i64, i64, i64,
                  ptr, i64, i64, i64, i64, i32, ptr, i64, i64, ptr, ptr, i64, i32, f32, i32, ptr, i32)(
        DTYPE_CODES[q.dtype], q.data_ptr(), B, Hq, q.stride(0), q.stride(1), Hkv, D, *cache_args(k_cache, v_cache),
        block_table.data_ptr(), block_table.stride(0), block_table.shape[1], seq_lens.data_ptr(),
        chunk_ids.data_ptr(), chunk_ids.shape[2], chunk_size, scale, int(num_splits or 0), out.data_ptr(),
        torch.get_num_threads())
    if rc:
        raise ValueError(f"sparse_kv_attention (cpu): unsupported dtype {q.dtype}")
    return out
