"""Triton kernels for ``select_kv_chunks`` and ``sparse_kv_attention``.

sparse_kv_attention, at most two launches. The keys of (request b, KV head h) form a
flat token range x = 0 .. (C+1)·chunk_size - 1: slot j = x // chunk_size of chunk_ids[b, h]
(slot C is the tail, chunk F_b), offset x % chunk_size inside the chunk. Skipped slots
(ids outside [0, F_b), -1 included) and tail positions past seq_lens are masked out.

1. ``_sparse_partial_kernel``, grid (splits, B·Hkv): one program takes one split of that
   token range (a whole number of BLOCK_N-token blocks) for all G query heads of its KV
   head at once (rows of the tile = the G heads, so each K/V block is loaded once per
   group), finds each key's page in block_table (a chunk covers whole pages or lies
   inside one, so a block reads runs of consecutive slots), and runs the online softmax;
   writes the
   unnormalized output o_s, the running max m_s (log2 units) and the sum l_s of its split
   to a workspace — or, with a single split, the normalized output directly (one launch).
2. ``_sparse_merge_kernel``, grid (B·Hq,): the log-sum-exp merge of the splits,

       m = max_s m_s,  out = Σ_s o_s·2^(m_s - m) / Σ_s l_s·2^(m_s - m)   (0 where no key at all).

The number of splits depends only on shapes (:func:`attention_plan`): about two programs
per SM in all, so one request still fills a GPU (on the CPU interpreter, which counts 2
"SMs", one to four).

select_kv_chunks, two launches:

1. ``_chunk_scores_kernel``, grid (chunk blocks, B·Hkv): for chunks c < F_b the mean key
   (summed in fp32 from the cache, chunk by chunk, or read from chunk_means) and the
   score q_sum · mean, q_sum = Σ_g q[b, h·G + g]; written to an fp32 workspace
   [B·Hkv, NC] (NC: chunk_means.shape[1] or the block table's capacity in chunks).
2. ``_select_kernel``, grid (B·Hkv,): if F_b <= num_chunks every chunk is kept;
   otherwise sinks and recent chunks are kept and the top ``need`` = num_chunks - S - R
   of the middle chunks S .. F_b - R - 1 are found by a radix search on the scores'
   order-preserving int32 keys (NaN → -inf): 8 passes over the row, each splitting the
   remaining key range into 16 and counting the chunks above each boundary, give the
   need-th largest key T, and a ninth counts the keys above T; the kept middle chunks
   are those above T plus, in ascending c,
   the first (need - count(> T)) equal to T (ties → lower c). A last pass writes the kept
   ids ascending with a prefix sum, then the -1 padding.
"""

import torch
import triton
import triton.language as tl

from .tree_attention import LOG2E, _dot, _num_sms, _online_softmax_step

MAX_SPLITS = 64
RADIX = 16                  # key range split per pass of the selection's radix search
PASSES = 8                  # 16^8 = 2^32: the int32 key range


# ---------------------------------------------------------------------------- sparse_kv_attention


@triton.jit
def _page_slot(bt_row, pos, ok, PAGE, NUM_PAGES):
    """(page, slot, ok) of cache positions pos of one request, int64; ok is cleared where
    the block table names no page of the cache (garbage or -1 entries are never read)."""
    page = tl.load(bt_row + pos // PAGE, mask=ok, other=0).to(tl.int64)
    ok = ok & (page >= 0) & (page < NUM_PAGES)
    return page, (pos % PAGE).to(tl.int64), ok


@triton.jit
def _sparse_partial_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, seq_ptr, ids_ptr, ws_o_ptr, ws_ml_ptr, out_ptr,
                           stride_qb, stride_qh, stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
                           stride_bt, stride_ib, stride_ih, stride_ob, stride_oh,
                           B, Hq, Hkv, G, D, PAGE, NUM_PAGES, CAPACITY, CS, C, TOKENS_PER_SPLIT, scale_log2,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_P2: tl.constexpr,
                           UPCAST: tl.constexpr, DIRECT: tl.constexpr):
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    h = pid_bh % Hkv
    r = tl.arange(0, BLOCK_M)
    r_ok = r < G
    head = h * G + r
    d = tl.arange(0, D_P2)
    d_ok = d < D
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + head[:, None] * stride_qh + d[None, :],
                mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    L = tl.load(seq_ptr + b)
    F = L // CS
    total = (C + 1) * CS
    x0 = pid_s * TOKENS_PER_SPLIT
    x1 = tl.minimum(x0 + TOKENS_PER_SPLIT, total)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    ids_row = ids_ptr + b.to(tl.int64) * stride_ib + h * stride_ih
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_P2], tl.float32)
    for start in range(x0, x1, BLOCK_N):
        x = start + tl.arange(0, BLOCK_N)
        x_ok = x < x1
        j = x // CS
        cid = tl.load(ids_row + j, mask=x_ok & (j < C), other=-1)
        cid = tl.where(j == C, F, cid)                                  # slot C: the tail
        pos = cid * CS + x % CS
        ok = x_ok & (cid >= 0) & ((cid < F) | (j == C)) & (pos < L) & (pos < CAPACITY)
        if tl.max(ok.to(tl.int32), 0) > 0:                              # skip blocks of empty slots
            page, slot, ok = _page_slot(bt_row, pos, ok, PAGE, NUM_PAGES)
            m2 = ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + (page * stride_kp + slot * stride_ks + h * stride_kh)[:, None] + d[None, :],
                        mask=m2, other=0.0)
            v = tl.load(v_ptr + (page * stride_vp + slot * stride_vs + h * stride_vh)[:, None] + d[None, :],
                        mask=m2, other=0.0)
            s = _dot(q, tl.trans(k), UPCAST) * scale_log2
            s = tl.where(ok[None, :], s, float("-inf"))
            m_i, l_i, acc = _online_softmax_step(m_i, l_i, acc, s, v, UPCAST)
    if DIRECT:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]                     # no key at all: acc = 0, out 0
        tl.store(out_ptr + b.to(tl.int64) * stride_ob + head[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :])
    else:
        row = pid_s.to(tl.int64) * B * Hq + b * Hq + head                  # ws [split, b, hq]
        tl.store(ws_o_ptr + row[:, None] * D_P2 + d[None, :], acc, mask=r_ok[:, None])
        tl.store(ws_ml_ptr + row * 2, m_i, mask=r_ok)
        tl.store(ws_ml_ptr + row * 2 + 1, l_i, mask=r_ok)


@triton.jit
def _sparse_merge_kernel(ws_o_ptr, ws_ml_ptr, out_ptr, stride_ob, stride_oh, B, Hq, D, NUM_SPLITS,
                         S_P2: tl.constexpr, D_P2: tl.constexpr):
    pid = tl.program_id(0)                                             # b·Hq + hq
    b = pid // Hq
    hq = pid % Hq
    sp = tl.arange(0, S_P2)
    s_ok = sp < NUM_SPLITS
    d = tl.arange(0, D_P2)
    row = sp.to(tl.int64) * B * Hq + pid
    m_s = tl.load(ws_ml_ptr + row * 2, mask=s_ok, other=float("-inf"))
    l_s = tl.load(ws_ml_ptr + row * 2 + 1, mask=s_ok, other=0.0)
    o_s = tl.load(ws_o_ptr + row[:, None] * D_P2 + d[None, :], mask=s_ok[:, None], other=0.0)
    m = tl.max(m_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.where(m_s == float("-inf"), 0.0, tl.exp2(m_s - m_safe))
    l = tl.sum(l_s * w, 0)
    o = tl.sum(o_s * w[:, None], 0)
    o = o / tl.where(l > 0, l, 1.0)                                    # no key at all: o = 0, out 0
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + hq * stride_oh + d, o.to(out_ptr.dtype.element_ty), mask=d < D)


# ---------------------------------------------------------------------------- select_kv_chunks


@triton.jit
def _chunk_scores_kernel(q_ptr, k_ptr, bt_ptr, seq_ptr, means_ptr, score_ptr,
                         stride_qb, stride_qh, stride_kp, stride_ks, stride_kh, stride_bt,
                         stride_mb, stride_mc, stride_mh,
                         Hkv, G, D, PAGE, NUM_PAGES, CS, NC,
                         HAS_MEANS: tl.constexpr, BLOCK_C: tl.constexpr, CS_BLK: tl.constexpr,
                         G_P2: tl.constexpr, D_P2: tl.constexpr):
    """score[b·Hkv + h, c] = (Σ_g q[b, h·G + g]) · mean[b, c, h] for the block's chunks c < F_b."""
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    h = pid_bh % Hkv
    F = tl.minimum(tl.load(seq_ptr + b) // CS, NC)
    c0 = pid_c * BLOCK_C
    if c0 < F:
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < F
        d = tl.arange(0, D_P2)
        d_ok = d < D
        g = tl.arange(0, G_P2)
        qg = tl.load(q_ptr + b.to(tl.int64) * stride_qb + (h * G + g)[:, None] * stride_qh + d[None, :],
                     mask=(g < G)[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        qs = tl.sum(qg, 0)                                                   # [D_P2]
        if HAS_MEANS:
            mean = tl.load(means_ptr + b.to(tl.int64) * stride_mb + c.to(tl.int64)[:, None] * stride_mc
                           + h * stride_mh + d[None, :], mask=c_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            bt_row = bt_ptr + b.to(tl.int64) * stride_bt
            acc = tl.zeros([BLOCK_C, D_P2], tl.float32)
            for t0 in range(0, CS, CS_BLK):
                t = t0 + tl.arange(0, CS_BLK)
                pos = c[:, None] * CS + t[None, :]                                # [BLOCK_C, CS_BLK]
                ok = c_ok[:, None] & (t < CS)[None, :]
                page, slot, ok = _page_slot(bt_row, pos, ok, PAGE, NUM_PAGES)
                off = page * stride_kp + slot * stride_ks + h * stride_kh
                k = tl.load(k_ptr + off[:, :, None] + d[None, None, :], mask=ok[:, :, None] & d_ok[None, None, :],
                            other=0.0)
                acc += tl.sum(k.to(tl.float32), 1)
            mean = acc / CS
        s = tl.sum(mean * qs[None, :], 1)
        tl.store(score_ptr + pid_bh.to(tl.int64) * NC + c, s, mask=c_ok)


@triton.jit
def _order_key(s):
    """int32 keys in the order of the fp32 scores s (NaN → -inf; -0.0 == +0.0)."""
    s = tl.where(s == s, s, float("-inf")) + 0.0
    bits = s.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _select_kernel(score_ptr, seq_ptr, ids_ptr, Hkv, NC, CS, N, SINKS, RECENT,
                   BLOCK: tl.constexpr, RADIX: tl.constexpr, PASSES: tl.constexpr):
    pid = tl.program_id(0)                                              # b·Hkv + h
    b = pid // Hkv
    F = tl.minimum(tl.maximum(tl.load(seq_ptr + b), 0) // CS, NC)
    srow = score_ptr + pid.to(tl.int64) * NC
    out = ids_ptr + pid.to(tl.int64) * N
    full = F > N                                                        # else: every chunk is kept
    need = N - SINKS - RECENT
    mid_lo = SINKS
    mid_hi = tl.where(full & (need > 0), F - RECENT, SINKS)              # the middle chunks to rank
    # radix search for T = the largest key with count(key >= T) >= need among the middle
    jr = tl.arange(0, RADIX).to(tl.int64)
    lo = tl.full([], -2147483648, tl.int64)
    hi = tl.full([], 2147483647, tl.int64)
    for _ in tl.static_range(PASSES):
        width = (hi - lo + RADIX) // RADIX
        thr = lo + jr * width                                           # [RADIX] boundaries; thr[0] = lo
        counts = tl.zeros([RADIX], tl.int32)
        for c0 in range(mid_lo, mid_hi, BLOCK):
            c = c0 + tl.arange(0, BLOCK)
            ok = c < mid_hi
            key = _order_key(tl.load(srow + c, mask=ok, other=0.0)).to(tl.int64)
            counts += tl.sum(((key[:, None] >= thr[None, :]) & ok[:, None]).to(tl.int32), 0)
        pick = tl.max(tl.where((counts >= need) & (thr <= hi), jr, 0), 0)
        lo = lo + pick * width
        hi = tl.minimum(lo + width - 1, hi)
    T = lo.to(tl.int32)
    n_gt = tl.zeros([], tl.int32)
    for c0 in range(mid_lo, mid_hi, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        ok = c < mid_hi
        key = _order_key(tl.load(srow + c, mask=ok, other=0.0))
        n_gt += tl.sum((ok & (key > T)).to(tl.int32), 0)
    take_eq = need - n_gt                                               # keys equal to T to keep, lowest c first
    # write the kept ids ascending, then the padding
    base = tl.zeros([], tl.int32)
    seen_eq = tl.zeros([], tl.int32)
    for c0 in range(0, F, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        ok = c < F
        mid = (c >= mid_lo) & (c < mid_hi)
        key = _order_key(tl.load(srow + c, mask=ok & mid, other=0.0))
        eq = mid & ok & (key == T)
        eq_rank = seen_eq + tl.cumsum(eq.to(tl.int32), 0) - 1
        # a middle chunk, kept only if picked (a vector comparison: the interpreter mis-types scalar & vector)
        ranked = (c >= SINKS) & (c < F - RECENT) & (c * 0 + F > N)
        keep = ok & (~ranked | (mid & (key > T)) | (eq & (eq_rank < take_eq)))
        seen_eq += tl.sum(eq.to(tl.int32), 0)
        at = base + tl.cumsum(keep.to(tl.int32), 0) - 1
        tl.store(out + at, c, mask=keep & (at < N))
        base += tl.sum(keep.to(tl.int32), 0)
    for p0 in range(0, N, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        tl.store(out + p, tl.full([BLOCK], -1, tl.int32), mask=(p >= base) & (p < N))


# ---------------------------------------------------------------------------- launchers


def attention_plan(B: int, Hkv: int, C: int, chunk_size: int, D: int, device, num_splits=None):
    """(BLOCK_N, splits, tokens per split) from shapes only: enough programs to fill the
    device about twice (B·Hkv·splits ≈ 2·SMs), at most one per BLOCK_N-token block of
    the (C + 1)·chunk_size keys, at most MAX_SPLITS."""
    BLOCK_N = 64 if D <= 128 else 32
    total = (C + 1) * chunk_size
    blocks = triton.cdiv(total, BLOCK_N)
    if num_splits is None:
        num_splits = triton.cdiv(2 * _num_sms(device), max(1, B * Hkv))
    num_splits = max(1, min(num_splits, blocks, MAX_SPLITS))
    per_split = triton.cdiv(blocks, num_splits) * BLOCK_N
    return BLOCK_N, triton.cdiv(total, per_split), per_split


def _upcast(q) -> bool:
    """The interpreter's bf16 dot is broken: CPU bf16 computes on fp32 copies (the same products)."""
    return q.device.type == "cpu" and q.dtype == torch.bfloat16


def sparse_kv_attention(q, k_cache, v_cache, block_table, seq_lens, chunk_ids, chunk_size, sm_scale, *,
                        num_splits=None):
    """Triton backend of :func:`fastverify.sparse_kv_attention` (unchecked; sm_scale a
    float). ``num_splits`` overrides the number of splits."""
    B, Hq, D = q.shape
    P, page, Hkv = k_cache.shape[0], k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    C = chunk_ids.shape[2]
    BLOCK_N, splits, per_split = attention_plan(B, Hkv, C, chunk_size, D, q.device, num_splits)
    D_P2 = max(16, triton.next_power_of_2(D))
    BLOCK_M = max(16, triton.next_power_of_2(G))
    out = torch.empty((B, Hq, D), dtype=q.dtype, device=q.device)
    direct = splits == 1
    if direct:
        ws_o = ws_ml = out                                  # unused
    else:
        ws_o = torch.empty((splits, B, Hq, D_P2), dtype=torch.float32, device=q.device)
        ws_ml = torch.empty((splits, B, Hq, 2), dtype=torch.float32, device=q.device)
    warps = 4 if D_P2 <= 64 else 8
    _sparse_partial_kernel[(splits, B * Hkv)](
        q, k_cache, v_cache, block_table, seq_lens, chunk_ids, ws_o, ws_ml, out,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], block_table.stride(0),
        chunk_ids.stride(0), chunk_ids.stride(1), out.stride(0), out.stride(1),
        B, Hq, Hkv, G, D, page, P, block_table.shape[1] * page, chunk_size, C, per_split, sm_scale * LOG2E,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, D_P2=D_P2, UPCAST=_upcast(q), DIRECT=direct, num_warps=warps)
    if not direct:
        _sparse_merge_kernel[(B * Hq,)](ws_o, ws_ml, out, out.stride(0), out.stride(1), B, Hq, D, splits,
                                        S_P2=triton.next_power_of_2(splits), D_P2=D_P2, num_warps=4)
    return out


def select_kv_chunks(q, k_cache, block_table, seq_lens, chunk_size, num_chunks, num_sink_chunks,
                     num_recent_chunks, chunk_means):
    """Triton backend of :func:`fastverify.select_kv_chunks` (unchecked): the scores
    kernel, then the selection kernel; no host sync."""
    B, Hq, D = q.shape
    P, page, Hkv = k_cache.shape[0], k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    dev = q.device
    has_means = chunk_means is not None
    NC = chunk_means.shape[1] if has_means else block_table.shape[1] * page // chunk_size
    scores = torch.empty((B * Hkv, max(NC, 1)), dtype=torch.float32, device=dev)
    D_P2 = max(16, triton.next_power_of_2(D))
    if NC > 0:
        cs_blk = min(triton.next_power_of_2(chunk_size), 32)
        block_c = 64 if has_means else max(2, 32 // cs_blk)
        m = chunk_means if has_means else scores
        _chunk_scores_kernel[(triton.cdiv(NC, block_c), B * Hkv)](
            q, k_cache, block_table, seq_lens, m, scores,
            q.stride(0), q.stride(1), *k_cache.stride()[:3], block_table.stride(0),
            *(chunk_means.stride()[:3] if has_means else (0, 0, 0)),
            Hkv, G, D, page, P, chunk_size, NC,
            HAS_MEANS=has_means, BLOCK_C=block_c, CS_BLK=cs_blk, G_P2=triton.next_power_of_2(G), D_P2=D_P2,
            num_warps=4)
    ids = torch.empty((B, Hkv, num_chunks), dtype=torch.int32, device=dev)
    block = 1024 if dev.type == "cuda" else min(1024, max(16, triton.next_power_of_2(max(NC, num_chunks))))
    _select_kernel[(B * Hkv,)](scores, seq_lens, ids, Hkv, max(NC, 0), chunk_size, num_chunks, num_sink_chunks,
                               num_recent_chunks, BLOCK=block, RADIX=RADIX, PASSES=PASSES, num_warps=4)
    return ids
