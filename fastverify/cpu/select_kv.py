"""cpu backend of ``select_kv_chunks`` (``csrc/cpu/select_kv.cpp``), with the Triton
launcher's signature (:mod:`fastverify.triton.sparse_kv`): chunk scores from one pass over
the keys (or over ``chunk_means`` when given), then an exact top-k per (request, KV head)
by selection. Arguments arrive checked by the public op; no copy of the cache is made.
"""

from __future__ import annotations

import torch

from . import DTYPE_CODES, function, i32, i64, ptr



def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def select_kv_chunks(q, k_cache, block_table, seq_lens, chunk_size, num_chunks, num_sink_chunks,
                     num_recent_chunks, chunk_means):
    """cpu backend of :func:`fastverify.select_kv_chunks` (unchecked): ``chunk_ids
    [B, Hkv, num_chunks]`` int32."""
    B, Hq, D = q.shape
    P, page, Hkv = k_cache.shape[0], k_cache.shape[1], k_cache.shape[2]
    ids = torch.empty((B, Hkv, num_chunks), dtype=torch.int32)
    if B == 0 or num_chunks == 0:
        return ids
    if k_cache.stride(-1) != 1 or k_cache.dtype not in DTYPE_CODES:
        raise ValueError("select_kv_chunks (cpu): k_cache must be fp32/bf16/fp16 with stride(-1) == 1")
    q = _unit_stride(q.to(k_cache.dtype))
    block_table = _unit_stride(block_table.to(torch.int32))
    lens = seq_lens.to(torch.int32).contiguous()
    if chunk_means is not None:
        means = _unit_stride(chunk_means.to(torch.float32))
        NC, ms = means.shape[1], means.stride()[:3]
    else:
        means, NC, ms = None, block_table.shape[1] * page // chunk_size, (0, 0, 0)
    function("fastverify_select_kv_chunks", None, i32, ptr, i64, i64, ptr, i64, i64, i64, i64, i64, ptr, i64, i64,
             i64, ptr, i64, i64, ptr, i64, i64, i64, i64, i64, i64, i64, i64, i64, ptr, i32)(
        DTYPE_CODES[k_cache.dtype], q.data_ptr(), q.stride(0), q.stride(1), k_cache.data_ptr(), *k_cache.stride()[:3],
        P, page, None if means is None else means.data_ptr(), *ms, block_table.data_ptr(), block_table.stride(0),
        block_table.stride(1), lens.data_ptr(), B, Hq, Hkv, D, chunk_size, NC, num_chunks, num_sink_chunks,
        num_recent_chunks, ids.data_ptr(), torch.get_num_threads())
    return ids
