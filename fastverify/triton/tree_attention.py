"""Triton kernels for ``build_tree``, ``tree_attention`` and ``compact_kv``.

Tree attention runs in two launches. Rows of a program are the (node, query head)
pairs of one request and one KV head — r ↔ (node r // G, head h·G + r % G) — so each
K/V block is loaded once for every node and every query head of the GQA group:

1. ``_prefix_partial_kernel``, grid (q tiles, prefix splits, B·Hkv): flash attention
   of the tile's rows over one split of the request's prefix (keys < seq_len - n),
   unmasked; writes the unnormalized output o_s, the running max m_s (log2 units)
   and the sum l_s to a workspace. q tiles of one split are adjacent in the launch,
   so after the first tile the split's K/V come from L2.
2. ``_tree_merge_kernel``, grid (q tiles, B·Hkv): attention over the request's n tree
   keys with the ancestor bitmask, then the log-sum-exp merge with every prefix split:

       m = max(m_t, m_s...),  out = (o_t·2^(m_t-m) + Σ_s o_s·2^(m_s-m)) / (l_t·2^(m_t-m) + Σ_s l_s·2^(m_s-m))
"""


import torch
import triton
import triton.language as tl

from .._layout import mask_words
from .common import request_of_row

LOG2E = 1.4426950408889634


@triton.jit
def _build_tree_kernel(par_ptr, cu_ptr, prefix_ptr, mask_ptr, pos_ptr, depth_ptr, B, W, W_P2: tl.constexpr):
    """One node: walk up its parents, setting one bit per ancestor (and itself)."""
    i = tl.program_id(0)
    b = request_of_row(cu_ptr, i, B, 0)
    n0 = tl.load(cu_ptr + b)
    n = tl.load(cu_ptr + b + 1) - n0
    wid = tl.arange(0, W_P2)
    words = tl.zeros([W_P2], tl.int64)
    node = i - n0
    depth = tl.zeros([], tl.int32)
    steps = tl.zeros([], tl.int32)
    while (node >= 0) & (steps < n):
        bit = tl.full([], 1, tl.int64) << (node % 64).to(tl.int64)
        words = tl.where(wid == node // 64, words | bit, words)
        parent = tl.load(par_ptr + n0 + node, mask=node > 0, other=-1).to(tl.int32)
        parent = tl.where((parent >= 0) & (parent < node), parent, -1)  # only earlier nodes: no cycles
        depth += tl.where(parent >= 0, 1, 0)
        node = parent
        steps += 1
    tl.store(mask_ptr + i.to(tl.int64) * W + wid, words, mask=wid < W)
    tl.store(pos_ptr + i, tl.load(prefix_ptr + b).to(tl.int64) + depth)
    tl.store(depth_ptr + i, depth)


@triton.jit
def _tile_rows(q_ptr, stride_qt, stride_qh, cu_ptr, b, h, pid_m, G, D,
               BLOCK_M: tl.constexpr, D_P2: tl.constexpr):
    """The tile's (node, head) rows of request b, KV head h: (n0, n, node, head, ok, q)."""
    n0 = tl.load(cu_ptr + b)
    n = tl.load(cu_ptr + b + 1) - n0
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = r < n * G
    node = tl.where(ok, r // G, 0)
    head = h * G + r % G
    d = tl.arange(0, D_P2)
    q = tl.load(q_ptr + (n0 + node).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=ok[:, None] & (d[None, :] < D), other=0.0)
    return n0, n, node, head, ok, q


@triton.jit
def _load_kv(k_ptr, v_ptr, bt_row_ptr, pos, ok, h, stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
             PAGE, NUM_PAGES, CAPACITY, D, D_P2: tl.constexpr):
    """K, V [BLOCK_N, D_P2] of key positions pos of one request (paged), and which of them
    exist: a position past the block table's capacity or on a page id outside the cache
    (unchecked garbage) is never read and counts as no key."""
    ok = ok & (pos >= 0) & (pos < CAPACITY)
    page = tl.load(bt_row_ptr + pos // PAGE, mask=ok, other=0).to(tl.int64)
    ok = ok & (page >= 0) & (page < NUM_PAGES)
    slot = (pos % PAGE).to(tl.int64)
    d = tl.arange(0, D_P2)
    m = ok[:, None] & (d[None, :] < D)
    k = tl.load(k_ptr + (page * stride_kp + slot * stride_ks + h * stride_kh)[:, None] + d[None, :], mask=m, other=0.0)
    v = tl.load(v_ptr + (page * stride_vp + slot * stride_vs + h * stride_vh)[:, None] + d[None, :], mask=m, other=0.0)
    return k, v, ok


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation. UPCAST computes on fp32 copies of the operands —
    the same products — for the Triton interpreter, whose bf16 dot is broken."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="ieee")   # fp32 caches keep fp32 accuracy (no tf32)
    return tl.dot(a, b)


@triton.jit
def _online_softmax_step(m_i, l_i, acc, s, v, UPCAST: tl.constexpr):
    """Fold a block of scores s [M, N] (log2 units, -inf = masked) and values v into
    the running (max, sum, unnormalized output)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)       # rows with nothing visible yet
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST)
    return m_new, l_i, acc


@triton.jit
def _prefix_partial_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, seq_ptr, cu_ptr, ws_o_ptr, ws_ml_ptr,
                           stride_qt, stride_qh, stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
                           stride_bt, T, Hq, Hkv, G, D, PAGE, NUM_PAGES, CAPACITY, SPLIT, scale_log2,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_P2: tl.constexpr,
                           UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // Hkv
    h = pid_bh % Hkv
    n0, n, node, head, ok, q = _tile_rows(q_ptr, stride_qt, stride_qh, cu_ptr, b, h, pid_m, G, D, BLOCK_M, D_P2)
    prefix = tl.load(seq_ptr + b) - n
    s0 = pid_s * SPLIT
    s1 = tl.minimum(tl.minimum(s0 + SPLIT, prefix), CAPACITY)
    if (pid_m * BLOCK_M < n * G) & (s0 < s1):
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D_P2], tl.float32)
        bt_row = bt_ptr + b.to(tl.int64) * stride_bt
        for start in range(s0, s1, BLOCK_N):
            pos = start + tl.arange(0, BLOCK_N)
            k, v, kv_ok = _load_kv(k_ptr, v_ptr, bt_row, pos, pos < s1, h, stride_kp, stride_ks, stride_kh,
                                   stride_vp, stride_vs, stride_vh, PAGE, NUM_PAGES, CAPACITY, D, D_P2)
            s = _dot(q, tl.trans(k), UPCAST) * scale_log2
            s = tl.where(kv_ok[None, :], s, float("-inf"))
            m_i, l_i, acc = _online_softmax_step(m_i, l_i, acc, s, v, UPCAST)
        row = ((n0 + node) * Hq + head).to(tl.int64) + pid_s.to(tl.int64) * T * Hq   # [split, t, head]
        d = tl.arange(0, D_P2)
        tl.store(ws_o_ptr + row[:, None] * D_P2 + d[None, :], acc, mask=ok[:, None])
        tl.store(ws_ml_ptr + row * 2, m_i, mask=ok)
        tl.store(ws_ml_ptr + row * 2 + 1, l_i, mask=ok)


@triton.jit
def _tree_merge_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, seq_ptr, cu_ptr, mask_ptr, ws_o_ptr, ws_ml_ptr, out_ptr,
                       stride_qt, stride_qh, stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
                       stride_bt, stride_mt, stride_ot, stride_oh, T, Hq, Hkv, G, D, PAGE, NUM_PAGES, CAPACITY,
                       SPLIT, NUM_SPLITS, scale_log2, W,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_P2: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    h = pid_bh % Hkv
    n0, n, node, head, ok, q = _tile_rows(q_ptr, stride_qt, stride_qh, cu_ptr, b, h, pid_m, G, D, BLOCK_M, D_P2)
    if pid_m * BLOCK_M < n * G:
        L = tl.load(seq_ptr + b)
        prefix = L - n
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D_P2], tl.float32)
        bt_row = bt_ptr + b.to(tl.int64) * stride_bt
        mask_rows = mask_ptr + (n0 + node).to(tl.int64) * stride_mt
        # the tree keys: node j of the tree sits at position prefix + j
        for start in range(0, n, BLOCK_N):
            j = start + tl.arange(0, BLOCK_N)
            k, v, kv_ok = _load_kv(k_ptr, v_ptr, bt_row, prefix + j, j < n, h, stride_kp, stride_ks, stride_kh,
                                   stride_vp, stride_vs, stride_vh, PAGE, NUM_PAGES, CAPACITY, D, D_P2)
            word = tl.load(mask_rows[:, None] + (j // 64)[None, :],
                           mask=ok[:, None] & kv_ok[None, :] & (j // 64 < W)[None, :], other=0)
            allowed = ((word >> (j % 64).to(tl.int64)[None, :]) & 1) != 0
            s = _dot(q, tl.trans(k), UPCAST) * scale_log2
            s = tl.where(allowed, s, float("-inf"))
            m_i, l_i, acc = _online_softmax_step(m_i, l_i, acc, s, v, UPCAST)
        # merge the prefix splits by log-sum-exp
        row = ((n0 + node) * Hq + head).to(tl.int64)
        d = tl.arange(0, D_P2)
        for sp in range(0, tl.minimum(tl.cdiv(tl.minimum(tl.maximum(prefix, 0), CAPACITY), SPLIT), NUM_SPLITS)):
            r = row + sp * T * Hq
            m_s = tl.load(ws_ml_ptr + r * 2, mask=ok, other=float("-inf"))
            l_s = tl.load(ws_ml_ptr + r * 2 + 1, mask=ok, other=0.0)
            o_s = tl.load(ws_o_ptr + r[:, None] * D_P2 + d[None, :], mask=ok[:, None], other=0.0)
            m_new = tl.maximum(m_i, m_s)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            a_t = tl.exp2(m_i - m_safe)
            a_s = tl.exp2(m_s - m_safe)
            acc = acc * a_t[:, None] + o_s * a_s[:, None]
            l_i = l_i * a_t + l_s * a_s
            m_i = m_new
        o = tl.where(l_i[:, None] > 0, acc / l_i[:, None], 0.0)
        tl.store(out_ptr + (n0 + node).to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=ok[:, None] & (d[None, :] < D))


@triton.jit
def _compact_kv_kernel(k_ptr, v_ptr, bt_ptr, prefix_ptr, acc_ptr, num_ptr,
                       stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh, stride_bt, stride_a,
                       PAGE, CAPACITY, D, D_P2: tl.constexpr):
    """Request b, KV head h: copy slot prefix + node_i to slot prefix + i for i = 1..num
    in increasing order. A later step may overwrite an earlier step's source (path
    0, 2, 3: step 2 writes prefix + 2, which step 1 reads), so the steps run in order;
    each thread reads and writes the same elements, which keeps the order."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    num = tl.load(num_ptr + b)
    base = tl.load(prefix_ptr + b)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    d = tl.arange(0, D_P2)
    m = d < D
    for i in range(1, num + 1):
        node = tl.load(acc_ptr + b * stride_a + i)
        src = base + node
        dst = base + i
        if (node > i) & (base >= 0) & (src < CAPACITY):
            sp = tl.load(bt_row + src // PAGE).to(tl.int64)
            dp = tl.load(bt_row + dst // PAGE).to(tl.int64)
            so = (src % PAGE).to(tl.int64)
            do = (dst % PAGE).to(tl.int64)
            k = tl.load(k_ptr + sp * stride_kp + so * stride_ks + h * stride_kh + d, mask=m)
            v = tl.load(v_ptr + sp * stride_vp + so * stride_vs + h * stride_vh + d, mask=m)
            tl.store(k_ptr + dp * stride_kp + do * stride_ks + h * stride_kh + d, k, mask=m)
            tl.store(v_ptr + dp * stride_vp + do * stride_vs + h * stride_vh + d, v, mask=m)


# ---------------------------------------------------------------------------- launchers


def build_tree(parents, cu_num_nodes, prefix_lens, max_nodes):
    """Triton backend of :func:`fastverify.build_tree` (unchecked)."""

    T = parents.numel()
    B = cu_num_nodes.numel() - 1
    W = mask_words(max_nodes if max_nodes is not None else T)
    dev = parents.device
    mask = torch.empty((T, W), dtype=torch.int64, device=dev)
    pos = torch.empty(T, dtype=torch.int64, device=dev)
    depth = torch.empty(T, dtype=torch.int32, device=dev)
    if T:
        _build_tree_kernel[(T,)](parents, cu_num_nodes, prefix_lens, mask, pos, depth, B, W,
                                 W_P2=triton.next_power_of_2(W), num_warps=1)
    return mask, pos, depth


def _num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def plan(q, k_cache, block_table, tree_mask, num_splits=None):
    """Tile and split sizes from shapes only: (BLOCK_M, BLOCK_N, q tiles, splits, SPLIT)."""
    T, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    G = Hq // Hkv
    B = block_table.shape[0]
    BLOCK_M = 64 if D <= 128 else 32
    BLOCK_N = 64 if D <= 128 else 32
    max_nodes = min(T, 64 * tree_mask.shape[1])
    tiles = triton.cdiv(max_nodes * G, BLOCK_M)
    capacity = block_table.shape[1] * k_cache.shape[1]
    if num_splits is None:
        # enough programs to fill the device twice, but few splits: each one adds a
        # workspace round trip of T·Hq·D floats
        num_splits = max(1, min(triton.cdiv(2 * _num_sms(q.device), B * Hkv * tiles), 16,
                                triton.cdiv(capacity, 4 * BLOCK_N)))
    split = max(BLOCK_N, triton.cdiv(triton.cdiv(capacity, num_splits), BLOCK_N) * BLOCK_N)
    num_splits = max(1, triton.cdiv(capacity, split))
    return BLOCK_M, BLOCK_N, tiles, num_splits, split


def tree_attention(q, k_cache, v_cache, block_table, seq_lens, cu_num_nodes, tree_mask, sm_scale, *,
                   num_splits=None):
    """Triton backend of :func:`fastverify.tree_attention` (unchecked). ``num_splits``
    overrides the number of prefix splits."""
    T, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    G = Hq // Hkv
    B = cu_num_nodes.numel() - 1
    scale = (D ** -0.5 if sm_scale is None else sm_scale) * LOG2E
    BLOCK_M, BLOCK_N, tiles, splits, split = plan(q, k_cache, block_table, tree_mask, num_splits)
    D_P2 = max(16, triton.next_power_of_2(D))
    out = torch.empty_like(q)
    ws_o = torch.empty((splits, T, Hq, D_P2), dtype=torch.float32, device=q.device)
    ws_ml = torch.empty((splits, T, Hq, 2), dtype=torch.float32, device=q.device)
    common = (q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], block_table.stride(0))
    pages = (k_cache.shape[1], k_cache.shape[0], block_table.shape[1] * k_cache.shape[1])   # PAGE, NUM_PAGES, CAPACITY
    warps = 4 if D <= 64 else 8
    upcast = q.device.type == "cpu" and q.dtype == torch.bfloat16
    _prefix_partial_kernel[(tiles, splits, B * Hkv)](
        q, k_cache, v_cache, block_table, seq_lens, cu_num_nodes, ws_o, ws_ml, *common,
        T, Hq, Hkv, G, D, *pages, split, scale,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, D_P2=D_P2, UPCAST=upcast, num_warps=warps)
    _tree_merge_kernel[(tiles, B * Hkv)](
        q, k_cache, v_cache, block_table, seq_lens, cu_num_nodes, tree_mask, ws_o, ws_ml, out, *common,
        tree_mask.stride(0), out.stride(0), out.stride(1), T, Hq, Hkv, G, D, *pages, split, splits, scale,
        tree_mask.shape[1], BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, D_P2=D_P2, UPCAST=upcast, num_warps=warps)
    return out


def compact_kv(k_cache, v_cache, block_table, prefix_lens, accepted_nodes, num_accepted):
    """Triton backend of :func:`fastverify.compact_kv` (unchecked): one launch, one
    program per (request, KV head)."""
    B = accepted_nodes.shape[0]
    if B == 0:
        return
    Hkv, D = k_cache.shape[2], k_cache.shape[3]
    _compact_kv_kernel[(B, Hkv)](
        k_cache, v_cache, block_table, prefix_lens, accepted_nodes, num_accepted,
        *k_cache.stride()[:3], *v_cache.stride()[:3], block_table.stride(0), accepted_nodes.stride(0),
        k_cache.shape[1], block_table.shape[1] * k_cache.shape[1], D, D_P2=triton.next_power_of_2(D), num_warps=1)
