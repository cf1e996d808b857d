"""Sparse-KV self-speculation ops: ``fastverify::select_kv_chunks`` and
``fastverify::sparse_kv_attention`` over the paged KV cache of :mod:`.attention`.

Schemas, argument checks, fake kernels, the ``torch`` backend (the CPU kernel and
readable specification) and dispatch to ``triton`` (``fastverify/triton/sparse_kv.py``)
and ``cuda`` (``csrc/cuda/sparse_kv.cu``). :func:`streaming_kv_chunks` (StreamingLLM:
sinks + recent window, no scoring) is plain vectorized torch, not an op.

Layout (as tree_attention; per request b, KV head h, G = Hq / Hkv query heads per KV head):

    k_cache, v_cache   [num_pages, page_size, Hkv, D], any strides of dims 0..2, stride(-1) == 1;
                       key position p of request b lives at page block_table[b, p // page_size],
                       slot p % page_size
    seq_lens[b]        keys in the cache (>= 1)
    chunks             c = 0 .. F_b - 1, F_b = seq_lens[b] // chunk_size: positions
                       c·chunk_size .. c·chunk_size + chunk_size - 1; the tail F_b·chunk_size ..
                       seq_lens[b] - 1 is never a chunk and always attended

select_kv_chunks, for every (b, h):

    mean[c]  = mean of K[p, h] over the chunk's keys (fp32), or chunk_means[b, c, h]
    score[c] = Σ_{g < G} q[b, h·G + g] · mean[c]                 (fp32; NaN counts as -inf)
    kept     = sinks 0 .. min(S, F_b) - 1 and recent max(F_b - R, 0) .. F_b - 1, then the
               highest-scoring other chunks up to num_chunks (ties: lower c first); every
               chunk when F_b <= num_chunks
    chunk_ids[b, h] = the kept ids ascending, then -1 padding          [B, Hkv, num_chunks] int32

sparse_kv_attention, for query head hq (h = hq // G):

    keys  = the chunks c of chunk_ids[b, h] with 0 <= c < F_b (others, -1 included, skipped)
            plus the tail
    out[b, hq] = Σ_p softmax_p(sm_scale · q[b, hq] · K[p, h]) · V[p, h]
    (a row with no key at all — every id -1 and an empty tail — is 0)
"""

from __future__ import annotations

import math
import weakref

import torch

from .. import _backend
from ._checks import check_tensor, passed_before, remember_passed
from ._common import implementation
from .attention import ATTN_DTYPES, _check_pages
from .frspec import rank_key

lib = torch.library.Library("fastverify", "FRAGMENT")
lib.define("select_kv_chunks(Tensor q, Tensor k_cache, Tensor block_table, Tensor seq_lens, *, int chunk_size, "
           "int num_chunks, int num_sink_chunks=1, int num_recent_chunks=1, Tensor? chunk_means=None) -> Tensor")
lib.define("sparse_kv_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor seq_lens, "
           "Tensor chunk_ids, *, int chunk_size, float? sm_scale=None) -> Tensor")

MAX_HEAD_DIM = 256


# --------------------------------------------------------------------------- checks


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_q_and_cache(q, k_cache, v_cache, block_table, seq_lens, chunk_size):
    """Metadata checks shared by both ops; returns (B, Hq, Hkv, D)."""
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    dev = q.device
    check_tensor(q, "q", ndim=3, dtypes=ATTN_DTYPES, device=dev)
    B, Hq, D = q.shape
    if q.stride(-1) != 1:
        raise ValueError(f"q must be contiguous in head_dim (stride(-1) == 1), got strides {q.stride()}")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"q must have a head_dim in [1, {MAX_HEAD_DIM}], got {D}")
    check_tensor(k_cache, "k_cache", ndim=4, dtypes=(q.dtype,), device=dev)
    if v_cache is not None:
        check_tensor(v_cache, "v_cache", ndim=4, dtypes=(q.dtype,), device=dev, shape=tuple(k_cache.shape))
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim (stride(-1) == 1), got strides {t.stride()}")
    if k_cache.shape[3] != D:
        raise ValueError(f"k_cache head_dim {k_cache.shape[3]} does not match q head_dim {D}")
    Hkv, page = k_cache.shape[2], k_cache.shape[1]
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(f"q has {Hq} heads, not a multiple of the {Hkv} KV heads of k_cache")
    if page < 1:
        raise ValueError(f"k_cache must have a page_size >= 1, got shape {tuple(k_cache.shape)}")
    check_tensor(block_table, "block_table", ndim=2, dtypes=(torch.int32,), device=dev, shape=(B, None))
    check_tensor(seq_lens, "seq_lens", ndim=1, dtypes=(torch.int32,), device=dev, shape=(B,))
    if not _is_int(chunk_size) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if page % chunk_size != 0 and chunk_size % page != 0:
        raise ValueError(f"chunk_size {chunk_size} and page_size {page} (k_cache.shape[1]) must divide one another: "
                         "a chunk must cover whole pages or a whole number of chunks must fill a page")
    return B, Hq, Hkv, D


def _check_lengths(block_table, seq_lens, k_cache):
    """Value checks of seq_lens and the pages below them, once per (block_table, seq_lens)
    pair (a model's layers share one step's tensors)."""
    meta = (tuple(k_cache.shape[:2]),)
    if passed_before("sparse_kv_lengths", (block_table, seq_lens), meta):
        return
    lens = seq_lens.long()
    bad = lens < 1
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        raise ValueError(f"seq_lens[{b}] = {int(seq_lens[b])}: every request needs at least one key (seq_lens >= 1)")
    _check_pages(lens, block_table, k_cache, "seq_lens")
    remember_passed("sparse_kv_lengths", (block_table, seq_lens), meta)


def check_select_kv_chunks(q, k_cache, block_table, seq_lens, chunk_size, num_chunks, num_sink_chunks,
                           num_recent_chunks, chunk_means, values: bool = True) -> None:
    B, Hq, Hkv, D = _check_q_and_cache(q, k_cache, None, block_table, seq_lens, chunk_size)
    for name, x in (("num_sink_chunks", num_sink_chunks), ("num_recent_chunks", num_recent_chunks),
                    ("num_chunks", num_chunks)):
        if not _is_int(x) or x < 0:
            raise ValueError(f"{name} must be an int >= 0, got {x!r}")
    if num_chunks < num_sink_chunks + num_recent_chunks:
        raise ValueError(f"num_chunks = {num_chunks} must be >= num_sink_chunks + num_recent_chunks = "
                         f"{num_sink_chunks} + {num_recent_chunks} (the chunks always kept)")
    if chunk_means is not None:
        check_tensor(chunk_means, "chunk_means", ndim=4, dtypes=(torch.float32,), device=q.device,
                     shape=(B, None, Hkv, D))
        if chunk_means.stride(-1) != 1:
            raise ValueError(f"chunk_means must be contiguous in head_dim (stride(-1) == 1), got strides "
                             f"{chunk_means.stride()}")
    if not (values and _backend.value_checks_enabled(q)):
        return
    _check_lengths(block_table, seq_lens, k_cache)
    if chunk_means is not None and B > 0:
        full = seq_lens.long() // chunk_size
        b = int(full.argmax())
        if int(full[b]) > chunk_means.shape[1]:
            raise ValueError(f"chunk_means holds {chunk_means.shape[1]} chunks per request but request {b} has "
                             f"F = seq_lens[{b}] // chunk_size = {int(full[b])} full chunks: "
                             "chunk_means.shape[1] must be >= max_b F_b")


# chunk_ids tensors known to be valid for (seq_lens, chunk_size): select_kv_chunks outputs
# and chunk_ids that passed the checks. id -> (weakref, version, chunk_size, seq_lens weakref,
# seq_lens version). A model's layers each select their own ids, then attend with them.
_valid_ids: dict[int, tuple] = {}
_VALID_IDS_MAX = 512


def _remember_ids(chunk_ids, seq_lens, chunk_size) -> None:
    try:
        entry = (weakref.ref(chunk_ids), chunk_ids._version, chunk_size, weakref.ref(seq_lens), seq_lens._version)
    except (RuntimeError, TypeError):  # inference tensors have no version counter
        return
    if len(_valid_ids) >= _VALID_IDS_MAX:
        _valid_ids.clear()
    _valid_ids[id(chunk_ids)] = entry


def _ids_known_valid(chunk_ids, seq_lens, chunk_size) -> bool:
    entry = _valid_ids.get(id(chunk_ids))
    if entry is None:
        return False
    ids_ref, ids_ver, cs, lens_ref, lens_ver = entry
    try:
        return (ids_ref() is chunk_ids and ids_ver == chunk_ids._version and cs == chunk_size
                and lens_ref() is seq_lens and lens_ver == seq_lens._version)
    except RuntimeError:
        return False


def check_sparse_kv_attention(q, k_cache, v_cache, block_table, seq_lens, chunk_ids, chunk_size, sm_scale,
                              values: bool = True) -> None:
    B, Hq, Hkv, D = _check_q_and_cache(q, k_cache, v_cache, block_table, seq_lens, chunk_size)
    check_tensor(chunk_ids, "chunk_ids", ndim=3, dtypes=(torch.int32,), device=q.device, shape=(B, Hkv, None))
    if chunk_ids.shape[2] < 1:
        raise ValueError(f"chunk_ids must have at least one slot per (request, KV head), got shape "
                         f"{tuple(chunk_ids.shape)}")
    if sm_scale is not None and not (isinstance(sm_scale, (int, float)) and math.isfinite(sm_scale)):
        raise ValueError(f"sm_scale must be a finite float or None, got {sm_scale!r}")
    if not (values and _backend.value_checks_enabled(q)):
        return
    _check_lengths(block_table, seq_lens, k_cache)
    if B == 0 or _ids_known_valid(chunk_ids, seq_lens, chunk_size):
        return
    ids = chunk_ids.long()
    full = (seq_lens.long() // chunk_size)[:, None, None]
    bad = (ids < -1) | (ids >= full)
    if bool(bad.any()):
        b, h, j = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"chunk_ids[{b}, {h}, {j}] = {int(ids[b, h, j])} is outside [-1, {int(full[b, 0, 0])}): "
                         f"request {b} has F = seq_lens[{b}] // chunk_size = {int(full[b, 0, 0])} full chunks "
                         "(-1 marks an empty slot)")
    if ids.shape[2] > 1:
        srt = ids.sort(-1).values
        dup = (srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)
        if bool(dup.any()):
            b, h, j = (int(x) for x in dup.nonzero()[0])
            raise ValueError(f"chunk_ids[{b}, {h}] lists chunk {int(srt[b, h, j])} twice: ids within a (request, "
                             "KV head) row must be distinct")
    _remember_ids(chunk_ids, seq_lens, chunk_size)


# --------------------------------------------------------------------------- torch backend


def _rows(cache, all_heads: bool):
    """An overlapping view of the cache's storage whose row i starts at element i: [M, D]
    (one head) or [M, Hkv, D] (all heads of a slot). ``index_select`` of element offsets
    page·stride(0) + slot·stride(1) (+ head·stride(2)) then gathers whole rows — any
    strides of dims 0..2, no per-element index arithmetic (several times faster on CPU
    than advanced indexing with page, slot and head index tensors)."""
    P, page, H, D = cache.shape
    s0, s1, s2, _ = cache.stride()
    if all_heads:
        return cache.as_strided(((P - 1) * s0 + (page - 1) * s1 + 1, H, D), (1, s2, 1), cache.storage_offset())
    return cache.as_strided(((P - 1) * s0 + (page - 1) * s1 + (H - 1) * s2 + 1, D), (1, 1), cache.storage_offset())


def _slot_offsets(cache, block_table, pos):
    """Element offsets page·stride(0) + slot·stride(1) of key positions pos [B, ...] (int64;
    clamped into the block table and the cache, so any pos is safe to read)."""
    P, page = cache.shape[0], cache.shape[1]
    B = pos.shape[0]
    pos = pos.clamp(0, block_table.shape[1] * page - 1)
    pg = block_table.gather(1, (pos // page).reshape(B, -1)).view(pos.shape).long().clamp_(0, P - 1)
    return pg * cache.stride(0) + (pos % page) * cache.stride(1)


def sparse_kv_attention_torch(q, k_cache, v_cache, block_table, seq_lens, chunk_ids, chunk_size, sm_scale):
    """torch backend of :func:`fastverify.sparse_kv_attention` (fp32 math, no host sync).
    The keys of each (request, KV head) row of chunk_ids plus one tail chunk (id F_b),
    [B, Hkv, (C + 1)·chunk_size], are gathered row by row (:func:`_rows`); keys of skipped
    ids and past seq_lens are masked; then the G query heads' scores, softmax and
    weighted sum."""
    B, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    G = Hq // Hkv
    cs = chunk_size
    dev = q.device
    lens = seq_lens.long().clamp_min(0)             # unchecked garbage (CUDA): a negative length has no key
    full = lens // cs                                                              # F_b
    ids = chunk_ids.long()
    ok = (ids >= 0) & (ids < full[:, None, None])                                  # [B, Hkv, C]
    ids = torch.cat([torch.where(ok, ids, 0), full[:, None, None].expand(B, Hkv, 1)], 2)   # + the tail
    ok = torch.cat([ok, ok.new_ones(B, Hkv, 1)], 2)
    pos = (ids[..., None] * cs + torch.arange(cs, device=dev)).flatten(2)           # [B, Hkv, N], N = (C+1)·cs
    keep = ok.repeat_interleave(cs, 2) & (pos < lens[:, None, None])
    head = torch.arange(Hkv, device=dev)[None, :, None]
    off = (_slot_offsets(k_cache, block_table, pos) + head * k_cache.stride(2)).flatten()
    k = _rows(k_cache, False).index_select(0, off).view(B, Hkv, -1, D).float()
    if v_cache.stride() != k_cache.stride():      # a model's K and V views normally share their strides
        off = (_slot_offsets(v_cache, block_table, pos) + head * v_cache.stride(2)).flatten()
    v = _rows(v_cache, False).index_select(0, off).view(B, Hkv, -1, D).float()
    qh = q.float().view(B, Hkv, G, D) * sm_scale
    s = (qh @ k.transpose(-1, -2)).masked_fill_(~keep[:, :, None], float("-inf"))  # [B, Hkv, G, N]
    p = torch.softmax(s, -1).nan_to_num_(0.0)                                      # no key at all: 0
    return (p @ v).view(B, Hq, D).to(q.dtype)


def _never_picked(shape, device):
    return torch.full(shape, torch.iinfo(torch.int64).min, dtype=torch.int64, device=device)


def select_kv_chunks_torch(q, k_cache, block_table, seq_lens, chunk_size, num_chunks, num_sink_chunks,
                           num_recent_chunks, chunk_means):
    """torch backend of :func:`fastverify.select_kv_chunks` (fp32 math). Scores of chunks
    c < NC (NC: chunk_means.shape[1], or the block table's capacity in chunks; on CPU
    also at most max_b F_b, read without a sync), then one ``topk`` over int64 keys
    (:func:`~fastverify.ops.frspec.rank_key`: higher score first, then lower c; sinks and
    recent chunks get a key above every score, chunks c >= F_b one below all), then the
    picks sorted ascending."""
    B, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    G = Hq // Hkv
    cs = chunk_size
    dev = q.device
    full = (seq_lens.long() // cs)                                                  # F_b
    NC = chunk_means.shape[1] if chunk_means is not None else block_table.shape[1] * k_cache.shape[1] // cs
    if dev.type == "cpu" and B > 0:
        NC = min(NC, int(full.max()))
    c = torch.arange(NC, device=dev)
    if chunk_means is not None:
        mean = chunk_means[:, :NC]                                                  # [B, NC, Hkv, D]
    else:
        pos = (c[:, None] * cs + torch.arange(cs, device=dev)).flatten().expand(B, NC * cs)
        keys = _rows(k_cache, True).index_select(0, _slot_offsets(k_cache, block_table, pos).flatten())
        mean = keys.view(B, NC, cs, Hkv, D).sum(2, dtype=torch.float32) / cs
    qs = q.float().view(B, Hkv, G, D).sum(2)                                        # Σ_g q[h·G + g]
    score = torch.einsum("bhd,bchd->bhc", qs, mean.float())                        # [B, Hkv, NC]
    score = torch.where(torch.isnan(score), float("-inf"), score)
    F = full[:, None, None]
    valid = c < F
    forced = valid & ((c < num_sink_chunks) | (c >= F - num_recent_chunks))
    key = rank_key(score, c)
    key = torch.where(forced, (0x7FFFFFFF << 32) | (0xFFFFFFFF - c), key)          # above every score
    key = torch.where(valid, key, _never_picked((), dev))
    if NC < num_chunks:
        key = torch.cat([key, _never_picked((B, Hkv, num_chunks - NC), dev)], 2)
    top = key.topk(num_chunks, dim=2).values
    picked = torch.where(top == torch.iinfo(torch.int64).min, NC + num_chunks, 0xFFFFFFFF - (top & 0xFFFFFFFF))
    picked = picked.sort(2).values
    return torch.where(picked >= NC + num_chunks, -1, picked).to(torch.int32)


def streaming_kv_chunks(seq_lens, *, chunk_size, num_chunks, num_sink_chunks=1, num_hkv):
    """StreamingLLM chunk selection (attention sinks + the most recent window), in the
    layout of :func:`select_kv_chunks`, without scoring: for each request, chunks
    ``0 .. num_sink_chunks - 1`` and the ``num_chunks - num_sink_chunks`` most recent full
    chunks, ascending, ``-1`` padded; every full chunk when F_b <= num_chunks. The same for
    every KV head.

    Plain vectorized torch on any device, no host sync; not a torch op (no backends).

    Args:
        seq_lens: ``[B]`` int32/int64 keys in the cache per request.
        chunk_size: tokens per chunk; F_b = seq_lens[b] // chunk_size full chunks.
        num_chunks: chunk slots per row (the budget is num_chunks·chunk_size tokens
            plus the tail, as attended by :func:`sparse_kv_attention`).
        num_sink_chunks: leading chunks always kept, ``<= num_chunks``.
        num_hkv: KV heads (the output's second dimension).

    Returns:
        ``chunk_ids [B, num_hkv, num_chunks]`` int32.

    Example::

        >>> fastverify.streaming_kv_chunks(torch.tensor([100, 30], dtype=torch.int32), chunk_size=16,
        ...                                num_chunks=4, num_sink_chunks=1, num_hkv=1).tolist()
        [[[0, 3, 4, 5]], [[0, -1, -1, -1]]]
    """
    if not isinstance(seq_lens, torch.Tensor) or seq_lens.dim() != 1:
        raise ValueError(f"seq_lens must be a 1-D tensor, got {seq_lens!r}" if not isinstance(seq_lens, torch.Tensor)
                         else f"seq_lens must have 1 dimension, got shape {tuple(seq_lens.shape)}")
    if not _is_int(chunk_size) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    for name, x in (("num_chunks", num_chunks), ("num_sink_chunks", num_sink_chunks)):
        if not _is_int(x) or x < 0:
            raise ValueError(f"{name} must be an int >= 0, got {x!r}")
    if num_sink_chunks > num_chunks:
        raise ValueError(f"num_sink_chunks = {num_sink_chunks} must be <= num_chunks = {num_chunks}")
    if not _is_int(num_hkv) or num_hkv < 1:
        raise ValueError(f"num_hkv must be an int >= 1, got {num_hkv!r}")
    full = (seq_lens.long() // chunk_size)[:, None]                              # [B, 1]
    j = torch.arange(num_chunks, device=seq_lens.device)
    ids = torch.where(full > num_chunks, torch.where(j < num_sink_chunks, j, full - num_chunks + j),
                      torch.where(j < full, j, -1))
    return ids.to(torch.int32)[:, None, :].expand(-1, num_hkv, -1).contiguous()


# --------------------------------------------------------------------------- fake kernels


@torch.library.register_fake("fastverify::select_kv_chunks", lib=lib)
def _select_kv_chunks_fake(q, k_cache, block_table, seq_lens, *, chunk_size, num_chunks, num_sink_chunks=1,
                           num_recent_chunks=1, chunk_means=None):
    check_select_kv_chunks(q, k_cache, block_table, seq_lens, chunk_size, num_chunks, num_sink_chunks,
                           num_recent_chunks, chunk_means, values=False)
    return q.new_empty((q.shape[0], k_cache.shape[2], num_chunks), dtype=torch.int32)


@torch.library.register_fake("fastverify::sparse_kv_attention", lib=lib)
def _sparse_kv_attention_fake(q, k_cache, v_cache, block_table, seq_lens, chunk_ids, *, chunk_size, sm_scale=None):
    check_sparse_kv_attention(q, k_cache, v_cache, block_table, seq_lens, chunk_ids, chunk_size, sm_scale,
                              values=False)
    return q.new_empty(q.shape)


# --------------------------------------------------------------------------- dispatch


def _unit_stride(t):
    """t, copied only if its last dimension is strided (the kernels index it with stride 1)."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _select_kv_chunks_impl(q, k_cache, block_table, seq_lens, *, chunk_size, num_chunks, num_sink_chunks=1,
                           num_recent_chunks=1, chunk_means=None):
    check_select_kv_chunks(q, k_cache, block_table, seq_lens, chunk_size, num_chunks, num_sink_chunks,
                           num_recent_chunks, chunk_means)
    B, Hkv = q.shape[0], k_cache.shape[2]
    if B == 0 or num_chunks == 0:
        return torch.full((B, Hkv, num_chunks), -1, dtype=torch.int32, device=q.device)
    fn = implementation(q.device, "sparse_kv", "select_kv_chunks", select_kv_chunks_torch)
    ids = fn(q, k_cache, _unit_stride(block_table), _unit_stride(seq_lens), chunk_size, num_chunks, num_sink_chunks,
             num_recent_chunks, chunk_means)
    if _backend.value_checks_enabled(q):
        _remember_ids(ids, seq_lens, chunk_size)
    return ids


def _sparse_kv_attention_impl(q, k_cache, v_cache, block_table, seq_lens, chunk_ids, *, chunk_size, sm_scale=None):
    check_sparse_kv_attention(q, k_cache, v_cache, block_table, seq_lens, chunk_ids, chunk_size, sm_scale)
    if q.shape[0] == 0:
        return q.new_empty(q.shape)
    scale = q.shape[2] ** -0.5 if sm_scale is None else float(sm_scale)
    fn = implementation(q.device, "sparse_kv", "sparse_kv_attention", sparse_kv_attention_torch)
    return fn(q, k_cache, v_cache, _unit_stride(block_table), _unit_stride(seq_lens), _unit_stride(chunk_ids),
              chunk_size, scale)


for _key in ("CPU", "CUDA"):
    lib.impl("select_kv_chunks", _select_kv_chunks_impl, _key)
    lib.impl("sparse_kv_attention", _sparse_kv_attention_impl, _key)


# --------------------------------------------------------------------------- public API


def select_kv_chunks(q, k_cache, block_table, seq_lens, *, chunk_size, num_chunks, num_sink_chunks=1,
                     num_recent_chunks=1, chunk_means=None):
    """Pick, per request and KV head, the ``num_chunks`` cache chunks a sparse draft
    attends to (TriForce / Quest style): each full ``chunk_size``-token chunk is scored by
    the decode query against the chunk's mean key, summed over the GQA group's query
    heads; sink and recent chunks are always kept.

    Args:
        q: ``[B, Hq, D]`` fp32/bf16/fp16 decode query of each request (stride(-1) == 1).
        k_cache: ``[num_pages, page_size, Hkv, D]``, q's dtype (any strides but the last).
        block_table: ``[B, max_pages]`` int32. seq_lens: ``[B]`` int32 keys per request (>= 1).
        chunk_size: tokens per chunk; page_size % chunk_size == 0 or chunk_size % page_size == 0.
            Request b has F_b = seq_lens[b] // chunk_size full chunks; its tail (the last
            seq_lens[b] - F_b·chunk_size keys) is never selected and always attended.
        num_chunks: chunk slots per row, >= num_sink_chunks + num_recent_chunks.
        num_sink_chunks: leading chunks always kept. num_recent_chunks: last full chunks
            always kept.
        chunk_means: optional ``[B, max_chunks, Hkv, D]`` fp32 mean key of each full chunk,
            maintained by the caller as chunks fill (max_chunks >= max_b F_b); without it
            the means are computed from k_cache (reading every full chunk).

    Returns:
        ``chunk_ids [B, Hkv, num_chunks]`` int32: the kept chunk ids ascending, then ``-1``
        (every full chunk when F_b <= num_chunks). Ties in score go to the lower chunk id;
        NaN scores count as -inf.

    Example::

        >>> k = torch.randn(64, 16, 2, 64); v = torch.randn(64, 16, 2, 64)
        >>> table = torch.arange(64, dtype=torch.int32)[None]; lens = torch.tensor([1000], dtype=torch.int32)
        >>> q = torch.randn(1, 8, 64)
        >>> ids = fastverify.select_kv_chunks(q, k, table, lens, chunk_size=16, num_chunks=8)
        >>> ids.shape                                   # 8 of the 62 full chunks per KV head
        torch.Size([1, 2, 8])
        >>> out = fastverify.sparse_kv_attention(q, k, v, table, lens, ids, chunk_size=16)
    """
    return torch.ops.fastverify.select_kv_chunks(q, k_cache, block_table, seq_lens, chunk_size=chunk_size,
                                                 num_chunks=num_chunks, num_sink_chunks=num_sink_chunks,
                                                 num_recent_chunks=num_recent_chunks, chunk_means=chunk_means)


def sparse_kv_attention(q, k_cache, v_cache, block_table, seq_lens, chunk_ids, *, chunk_size, sm_scale=None):
    """Decode attention over only the selected chunks of each KV head plus the tail after
    the last full chunk, read in place from the paged cache (zero copy: keys keep their
    original positions and RoPE). Reads only the selected K/V bytes; a single request is
    split over the chunks and merged by log-sum-exp, so it still fills a GPU.

    Args:
        q: ``[B, Hq, D]`` fp32/bf16/fp16 (D <= 256, stride(-1) == 1).
        k_cache, v_cache: ``[num_pages, page_size, Hkv, D]``, q's dtype; Hq a multiple of Hkv.
        block_table: ``[B, max_pages]`` int32. seq_lens: ``[B]`` int32 keys per request (>= 1).
        chunk_ids: ``[B, Hkv, C]`` int32, C >= 1: chunks of each (request, KV head) to
            attend, in any order, ``-1`` for an empty slot; ids must lie in [-1, F_b) and be
            distinct within a row (checked on CPU; on CUDA with FASTVERIFY_CHECKS=1;
            kernels skip ids outside [0, F_b) whatever the checks).
        chunk_size: tokens per chunk, as given to :func:`select_kv_chunks`.
        sm_scale: softmax scale, default ``1 / sqrt(D)``.

    Returns:
        ``out [B, Hq, D]`` in q's dtype (fp32 math): attention of q[b, hq] over the keys of
        the chunks of chunk_ids[b, hq // G] and positions F_b·chunk_size .. seq_lens[b] - 1.

    Example::

        >>> k = torch.randn(8, 16, 1, 64); v = torch.randn(8, 16, 1, 64)
        >>> table = torch.arange(8, dtype=torch.int32)[None]; lens = torch.tensor([100], dtype=torch.int32)
        >>> ids = fastverify.streaming_kv_chunks(lens, chunk_size=16, num_chunks=3, num_hkv=1)   # [[[0, 4, 5]]]
        >>> out = fastverify.sparse_kv_attention(torch.randn(1, 4, 64), k, v, table, lens, ids, chunk_size=16)
        >>> out.shape                                   # keys 0-15, 64-95 and the tail 96-99
        torch.Size([1, 4, 64])
    """
    return torch.ops.fastverify.sparse_kv_attention(q, k_cache, v_cache, block_table, seq_lens, chunk_ids,
                                                    chunk_size=chunk_size, sm_scale=sm_scale)
