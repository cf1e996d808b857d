"""Triton kernels for ``lm_head_topk`` and ``lm_head_sample`` (frequency-ranked LM head).

Two launches per op; the ``[M, V_sub]`` logits are never written to memory:

1. ``_topk_partial_kernel`` / ``_sample_partial_kernel``, grid (row blocks of M, splits
   of V_sub): each program streams its split of ``weight`` tile by tile, computes the
   ``[BLOCK_M, BLOCK_V]`` logits tile with ``tl.dot`` over d (fp32 accumulation),
   divides by the temperature and folds the tile into per-row running state: the
   online-softmax (max, sum) and either a running top-k of (score, row) pairs or the
   running argmax of score + Gumbel noise (Philox in-kernel). Row blocks of one split
   are adjacent in the launch, so a weight tile is read from HBM once and from L2 by
   the other row blocks.
2. ``_topk_merge_kernel`` / ``_sample_merge_kernel`` (one row per program on a GPU,
   blocks of rows under the interpreter): merges the splits' (max, sum) into lse and
   their S·k candidates into the final top-k, best first (argmax for the sample op).
   The number of splits S is capped so that S·k_p2 <= MAX_CANDIDATES.

Running top-k (``_insert_topk``): a list of k (score, row) slots per row; a tile's
candidates that beat the list's worst slot replace it one at a time, best first, so
after the first tile of a split most tiles cost one comparison pass.

Order of candidates everywhere: (score, row) is better than (score', row') iff
score > score' or (score == score' and row < row'); ties go to the lower subset row.
Padding (rows past V_sub, rows past M) is (-inf, BIG), worse than every real row.
The math is the torch backend's (``fastverify/ops/frspec.py``).
"""

import torch
import triton
import triton.language as tl

from .philox import philox4x32
from .tree_attention import _dot, _num_sms

BIG = tl.constexpr(2147483647)          # row of padding entries
MAX_CANDIDATES = 2048                    # splits x k_p2 candidates the merge kernel holds per row
PARTIAL_WARPS = 8                        # sm_90: ~250 registers per thread and no spills at every tile shape used


# ---------------------------------------------------------------------------- helpers


@triton.jit
def _better(a_s, a_r, b_s, b_r):
    """(a_s, a_r) ranks before (b_s, b_r): higher score, then lower row."""
    return (a_s > b_s) | ((a_s == b_s) & (a_r < b_r))


@triton.jit
def _temperature(temp_ptr, m, m_ok, HAS_TEMP: tl.constexpr):
    """(t, greedy) per row: t = temperature, 1 where it is <= 0 (or absent)."""
    if HAS_TEMP:
        raw = tl.load(temp_ptr + m, mask=m_ok, other=1.0)
    else:
        raw = tl.full(m.shape, 1.0, tl.float32)
    greedy = ~(raw > 0)
    return tl.where(greedy, 1.0, raw), greedy


@triton.jit
def _scores(h_ptr, stride_h, w_ptr, m, m_ok, v, v_ok, t, D,
            BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    """s [BLOCK_M, BLOCK_V] = (hidden[m] · weight[v]) / t with fp32 accumulation;
    NaN → -inf, and -inf outside the tile's valid (m, v)."""
    acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
    h_row = h_ptr + m.to(tl.int64)[:, None] * stride_h
    w_row = w_ptr + v.to(tl.int64)[:, None] * D
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        h = tl.load(h_row + d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_row + d[None, :], mask=v_ok[:, None] & d_ok[None, :], other=0.0)
        acc += _dot(h, tl.trans(w), UPCAST)
    s = acc / t[:, None]
    ok = m_ok[:, None] & v_ok[None, :]
    return tl.where(ok & (s == s), s, float("-inf")), ok


@triton.jit
def _online_lse(mx, sm, s):
    """Fold scores s [BM, BV] into the running max mx and sum sm = Σ exp(s - ref(mx)),
    where ref(x) = x, or 0 for x = ±inf (so all -inf sums to 0 and +inf to inf, not NaN)."""
    m_new = tl.maximum(mx, tl.max(s, 1))
    ref = tl.where(tl.abs(m_new) == float("inf"), 0.0, m_new)
    ref_old = tl.where(tl.abs(mx) == float("inf"), 0.0, mx)
    alpha = tl.where(mx == float("-inf"), 0.0, tl.exp(ref_old - ref))
    return m_new, sm * alpha + tl.sum(tl.exp(s - ref[:, None]), 1)


@triton.jit
def _insert_topk(ls, lr, s, r, K_P2: tl.constexpr):
    """Fold a tile of candidates (s, r) [BM, BV] into the running top-k lists (ls, lr)
    [BM, K_P2]. Each pass moves, per row, the best candidate that beats the list's
    worst entry (lowest score, then highest row) into that entry's slot; candidates must
    also rank after the previous pass's pick (the ceiling), so nothing is taken twice.
    Passes stop when no row has a candidate left: k passes on the first tile, then as
    many as the tile improves the list. (Comparisons are written out, not calls of
    _better: nested calls are slow in the Triton interpreter.)"""
    slot = tl.arange(0, K_P2)[None, :]
    ws = tl.min(ls, 1)
    wr = tl.max(tl.where(ls == ws[:, None], lr, -1), 1)
    cs = tl.full(ws.shape, float("inf"), tl.float32)
    cr = tl.full(wr.shape, -1, tl.int32)
    c = (s > ws[:, None]) | ((s == ws[:, None]) & (r < wr[:, None]))
    n = tl.sum(tl.sum(c.to(tl.int32), 1), 0)
    while n > 0:
        bs = tl.max(tl.where(c, s, float("-inf")), 1)
        br = tl.min(tl.where(c & (s == bs[:, None]), r, BIG), 1)
        has = br < BIG
        pos = tl.min(tl.where((ls == ws[:, None]) & (lr == wr[:, None]), slot, K_P2), 1)
        upd = (slot == pos[:, None]) & has[:, None]
        ls = tl.where(upd, bs[:, None], ls)
        lr = tl.where(upd, br[:, None], lr)
        cs = tl.where(has, bs, cs)
        cr = tl.where(has, br, cr)
        ws = tl.min(ls, 1)
        wr = tl.max(tl.where(ls == ws[:, None], lr, -1), 1)
        c = (((s > ws[:, None]) | ((s == ws[:, None]) & (r < wr[:, None])))
             & ((cs[:, None] > s) | ((cs[:, None] == s) & (cr[:, None] < r))))
        n = tl.sum(tl.sum(c.to(tl.int32), 1), 0)
    return ls, lr


@triton.jit
def _gumbel_of_bits(o0):
    """g = -log(-log u), u = ((o0 >> 8) + 0.5) · 2^-24, in fp32 without rounding u to 1:
    for x = o0 >> 8 < 2^23, u is exact; above, 1 - u is exact and -log u = -log1p(-(1 - u))
    (log1p by the Goldberg identity log1p(z) = log(1 + z) · z / ((1 + z) - 1))."""
    x = (o0 >> 8).to(tl.int32)
    u = (x.to(tl.float32) + 0.5) * 5.9604644775390625e-08                  # exact for x < 2^23
    w = ((16777216 - x).to(tl.float32) - 0.5) * 5.9604644775390625e-08     # 1 - u, exact for x >= 2^23
    y = tl.maximum(1.0 - w, 0.5)                    # >= 0.5 where used; no log(0) in the unused lane
    y1 = tl.where(y == 1.0, 0.5, y - 1.0)           # no 0/0 in the unused lane
    log1p = tl.where(y == 1.0, -w, tl.log(y) * (-w) / y1)
    e = tl.where(x < 8388608, -tl.log(u), -log1p)
    return -tl.log(e)


@triton.jit
def _gumbel(seed, pos, v, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
    """g [BLOCK_M, BLOCK_V] for rows with (seed, pos) [BLOCK_M] and subset rows v [BLOCK_V]:
    o = Philox4x32-10(key = seed, counter = (pos lo, pos hi, v, 1)), g = _gumbel_of_bits(o0)."""
    zero = tl.zeros([BLOCK_M, BLOCK_V], tl.uint32)
    c0 = (pos & 0xFFFFFFFF).to(tl.uint32)[:, None] + zero
    c1 = ((pos >> 32) & 0xFFFFFFFF).to(tl.uint32)[:, None] + zero
    c2 = v.to(tl.uint32)[None, :] + zero
    o0, _, _, _ = philox4x32(seed[:, None], c0, c1, c2, zero + 1)
    return _gumbel_of_bits(o0)


@triton.jit
def _split_start(pid_s, V, TILES_PER_SPLIT, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
    """Split s's subset rows [v_begin, v_end) and the empty running (max, sum) of BLOCK_M rows."""
    v_begin = pid_s * TILES_PER_SPLIT * BLOCK_V
    v_end = tl.minimum(v_begin + TILES_PER_SPLIT * BLOCK_V, V)
    return v_begin, v_end, tl.full([BLOCK_M], float("-inf"), tl.float32), tl.zeros([BLOCK_M], tl.float32)


@triton.jit
def _split_tile(h_ptr, stride_h, w_ptr, m, m_ok, v0, v_end, t, mx, sm, D,
                BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    """The tile of subset rows v = v0 .. v0 + BLOCK_V (< v_end) of a split: (v, s, ok) as
    _scores, and the running (mx, sm) with s folded in (_online_lse)."""
    v = v0 + tl.arange(0, BLOCK_V)
    s, ok = _scores(h_ptr, stride_h, w_ptr, m, m_ok, v, v < v_end, t, D, BLOCK_M, BLOCK_V, BLOCK_D, UPCAST)
    mx, sm = _online_lse(mx, sm, s)
    return v, s, ok, mx, sm


@triton.jit
def _store_split_lse(ws_ml_ptr, row, mx, sm, m_ok):
    """The split's (max, sum) of rows m to ws_ml [M·S, 2] at row = m·S + s."""
    tl.store(ws_ml_ptr + row * 2, mx, mask=m_ok)
    tl.store(ws_ml_ptr + row * 2 + 1, sm, mask=m_ok)


# ---------------------------------------------------------------------------- kernels


@triton.jit
def _topk_partial_kernel(h_ptr, w_ptr, temp_ptr, ws_s_ptr, ws_r_ptr, ws_ml_ptr, stride_h, M, V, D, K,
                         TILES_PER_SPLIT, NUM_SPLITS,
                         HAS_TEMP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                         BLOCK_D: tl.constexpr, K_P2: tl.constexpr, UPCAST: tl.constexpr):
    """Rows m of this block, subset rows of split s: the split's top-k (score, row) per row
    (unordered; empty slots (-inf, BIG)) and its (max, Σ exp(score - max)).

        score[m, v] = (hidden[m] · weight[v]) / t_m,   t_m = temperature[m] > 0 ? temperature[m] : 1
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    t, _ = _temperature(temp_ptr, m, m_ok, HAS_TEMP)
    slot = tl.arange(0, K_P2)[None, :] + tl.zeros([BLOCK_M, 1], tl.int32)
    # slots j < K start empty; slots j >= K (padding to a power of 2) are never the worst
    ls = tl.where(slot < K, float("-inf"), float("inf"))
    lr = tl.where(slot < K, BIG, -1)
    v_begin, v_end, mx, sm = _split_start(pid_s, V, TILES_PER_SPLIT, BLOCK_M, BLOCK_V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        v, s, ok, mx, sm = _split_tile(h_ptr, stride_h, w_ptr, m, m_ok, v0, v_end, t, mx, sm, D,
                                       BLOCK_M, BLOCK_V, BLOCK_D, UPCAST)
        ls, lr = _insert_topk(ls, lr, s, tl.where(ok, v[None, :], BIG), K_P2)
    row = m.to(tl.int64) * NUM_SPLITS + pid_s
    off = row[:, None] * K + slot
    keep = m_ok[:, None] & (slot < K)
    tl.store(ws_s_ptr + off, ls, mask=keep)
    tl.store(ws_r_ptr + off, lr, mask=keep)
    _store_split_lse(ws_ml_ptr, row, mx, sm, m_ok)


@triton.jit
def _merge_lse(ws_ml_ptr, rows, r_ok, NUM_SPLITS, S_P2: tl.constexpr):
    """lse of rows [BLOCK_R] from the splits' (max_s, sum_s):
    ref + log Σ_s sum_s · exp(ref(max_s) - ref),  ref = ref(max_s max_s) (as _online_lse)."""
    si = tl.arange(0, S_P2)[None, :]
    ok = r_ok[:, None] & (si < NUM_SPLITS)
    off = (rows.to(tl.int64)[:, None] * NUM_SPLITS + si) * 2
    mx = tl.load(ws_ml_ptr + off, mask=ok, other=float("-inf"))
    sm = tl.load(ws_ml_ptr + off + 1, mask=ok, other=0.0)
    top = tl.max(mx, 1)
    ref = tl.where(tl.abs(top) == float("inf"), 0.0, top)
    ref_s = tl.where(tl.abs(mx) == float("inf"), 0.0, mx)
    total = tl.sum(tl.where(mx == float("-inf"), 0.0, sm * tl.exp(ref_s - ref[:, None])), 1)
    return ref + tl.log(total)


@triton.jit
def _topk_merge_kernel(ws_s_ptr, ws_r_ptr, ws_ml_ptr, map_ptr, ids_ptr, lp_ptr, lse_ptr, M, V, K, NUM_SPLITS,
                       HAS_MAP: tl.constexpr, BLOCK_R: tl.constexpr, C_P2: tl.constexpr, S_P2: tl.constexpr,
                       K_P2: tl.constexpr):
    """Rows of this block: the k best of each row's S·k split candidates, best first (pick
    i is the best candidate ranking after pick i-1), their ids and log-probabilities
    score - lse."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < M
    lse = _merge_lse(ws_ml_ptr, rows, r_ok, NUM_SPLITS, S_P2)
    c = tl.arange(0, C_P2)[None, :]
    ok = r_ok[:, None] & (c < NUM_SPLITS * K)
    off = rows.to(tl.int64)[:, None] * (NUM_SPLITS * K) + c        # the row's candidates are contiguous
    s = tl.load(ws_s_ptr + off, mask=ok, other=float("-inf"))
    r = tl.load(ws_r_ptr + off, mask=ok, other=BIG)
    j = tl.arange(0, K_P2)[None, :]
    out_s = tl.full([BLOCK_R, K_P2], float("-inf"), tl.float32)
    out_r = tl.zeros([BLOCK_R, K_P2], tl.int32)
    cs = tl.full([BLOCK_R], float("inf"), tl.float32)
    cr = tl.full([BLOCK_R], -1, tl.int32)
    for i in range(0, K):
        after = (cs[:, None] > s) | ((cs[:, None] == s) & (cr[:, None] < r))
        bs = tl.max(tl.where(after, s, float("-inf")), 1)
        br = tl.min(tl.where(after & (s == bs[:, None]), r, BIG), 1)
        out_s = tl.where(j == i, bs[:, None], out_s)
        out_r = tl.where(j == i, br[:, None], out_r)
        cs = bs
        cr = br
    out_r = tl.minimum(out_r, V - 1)            # never an out-of-range row (cannot happen: >= k real candidates)
    keep = r_ok[:, None] & (j < K)
    if HAS_MAP:
        ids = tl.load(map_ptr + out_r, mask=keep, other=0).to(tl.int64)
    else:
        ids = out_r.to(tl.int64)
    dst = rows.to(tl.int64)[:, None] * K + j
    tl.store(ids_ptr + dst, ids, mask=keep)
    tl.store(lp_ptr + dst, out_s - lse[:, None], mask=keep)
    tl.store(lse_ptr + rows, lse, mask=r_ok)


@triton.jit
def _sample_partial_kernel(h_ptr, w_ptr, temp_ptr, seed_ptr, pos_ptr, ws_n_ptr, ws_s_ptr, ws_r_ptr, ws_ml_ptr,
                           stride_h, M, V, D, TILES_PER_SPLIT, NUM_SPLITS,
                           BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                           UPCAST: tl.constexpr):
    """Rows m of this block, subset rows of split s: the best (score + g, row) of the split
    (score alone on greedy rows), the score there, and the split's (max, sum)."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    t, greedy = _temperature(temp_ptr, m, m_ok, True)
    seed = tl.load(seed_ptr + m, mask=m_ok, other=0)
    pos = tl.load(pos_ptr + m, mask=m_ok, other=0)
    bn = tl.full([BLOCK_M], float("-inf"), tl.float32)
    bs = tl.full([BLOCK_M], float("-inf"), tl.float32)
    br = tl.full([BLOCK_M], BIG, tl.int32)
    v_begin, v_end, mx, sm = _split_start(pid_s, V, TILES_PER_SPLIT, BLOCK_M, BLOCK_V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        v, s, ok, mx, sm = _split_tile(h_ptr, stride_h, w_ptr, m, m_ok, v0, v_end, t, mx, sm, D,
                                       BLOCK_M, BLOCK_V, BLOCK_D, UPCAST)
        noisy = tl.where(greedy[:, None], s, s + _gumbel(seed, pos, v, BLOCK_M, BLOCK_V))
        r = tl.where(ok, v[None, :], BIG)
        tn = tl.max(noisy, 1)
        tr = tl.min(tl.where(ok & (noisy == tn[:, None]), r, BIG), 1)
        ts = tl.max(tl.where(r == tr[:, None], s, float("-inf")), 1)
        take = _better(tn, tr, bn, br)
        bn = tl.where(take, tn, bn)
        br = tl.where(take, tr, br)
        bs = tl.where(take, ts, bs)
    row = m.to(tl.int64) * NUM_SPLITS + pid_s
    tl.store(ws_n_ptr + row, bn, mask=m_ok)
    tl.store(ws_s_ptr + row, bs, mask=m_ok)
    tl.store(ws_r_ptr + row, br, mask=m_ok)
    _store_split_lse(ws_ml_ptr, row, mx, sm, m_ok)


@triton.jit
def _sample_merge_kernel(ws_n_ptr, ws_s_ptr, ws_r_ptr, ws_ml_ptr, map_ptr, ids_ptr, lp_ptr, lse_ptr, M, V,
                         NUM_SPLITS, HAS_MAP: tl.constexpr, BLOCK_R: tl.constexpr, S_P2: tl.constexpr):
    """Rows of this block: the best (score + g, row) over the splits, its id and
    log-probability."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < M
    lse = _merge_lse(ws_ml_ptr, rows, r_ok, NUM_SPLITS, S_P2)
    si = tl.arange(0, S_P2)[None, :]
    ok = r_ok[:, None] & (si < NUM_SPLITS)
    off = rows.to(tl.int64)[:, None] * NUM_SPLITS + si
    n = tl.load(ws_n_ptr + off, mask=ok, other=float("-inf"))
    r = tl.load(ws_r_ptr + off, mask=ok, other=BIG)
    s = tl.load(ws_s_ptr + off, mask=ok, other=float("-inf"))
    bn = tl.max(n, 1)
    br = tl.min(tl.where(n == bn[:, None], r, BIG), 1)
    bs = tl.max(tl.where(r == br[:, None], s, float("-inf")), 1)
    br = tl.minimum(br, V - 1)                  # never an out-of-range row (every split has a real row)
    if HAS_MAP:
        tid = tl.load(map_ptr + br, mask=r_ok, other=0).to(tl.int64)
    else:
        tid = br.to(tl.int64)
    tl.store(ids_ptr + rows, tid, mask=r_ok)
    tl.store(lp_ptr + rows, bs - lse, mask=r_ok)
    tl.store(lse_ptr + rows, lse, mask=r_ok)


# ---------------------------------------------------------------------------- launchers


def plan(M: int, V: int, D: int, k_p2: int, device, num_splits=None, *, sample: bool = False):
    """Tile sizes and the V_sub split, from shapes only:
    (BLOCK_M, BLOCK_V, BLOCK_D, row blocks, splits, tiles per split). Splits fill the
    device about twice (a single row still streams the weight with many programs), but
    at most MAX_CANDIDATES // k_p2 of them, the candidates one merge row holds. The
    sample kernel's 64-row tiles are 64 wide (its in-register Philox would spill)."""
    BLOCK_M = 16 if M <= 16 else 32 if (M <= 32 or k_p2 > 16) else 64
    BLOCK_V = min(64 if (sample and BLOCK_M == 64) else 128, max(16, triton.next_power_of_2(V)))
    BLOCK_D = min(64, max(16, triton.next_power_of_2(D)))
    m_blocks = triton.cdiv(M, BLOCK_M)
    tiles = triton.cdiv(V, BLOCK_V)
    if num_splits is None:
        num_splits = triton.cdiv(2 * _num_sms(device), m_blocks)
    num_splits = max(1, min(num_splits, tiles, MAX_CANDIDATES // k_p2))
    per_split = triton.cdiv(tiles, num_splits)
    return BLOCK_M, BLOCK_V, BLOCK_D, m_blocks, triton.cdiv(tiles, per_split), per_split


def _options(hidden):
    """(UPCAST, merge rows per program). The interpreter's bf16 dot is broken, so CPU
    bf16 computes on fp32 copies (the same products); and each interpreted program costs
    milliseconds, so on CPU one merge program takes many rows (on a GPU: one row each)."""
    cpu = hidden.device.type == "cpu"
    block_r = min(64, triton.next_power_of_2(hidden.shape[0])) if cpu else 1
    return cpu and hidden.dtype == torch.bfloat16, block_r


def lm_head_topk(hidden, weight, k, token_map, temperature, *, num_splits=None):
    """Triton backend of :func:`fastverify.lm_head_topk` (unchecked; weight contiguous,
    hidden.stride(1) == 1). ``num_splits`` overrides the number of V_sub splits."""
    M, D = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    k_p2 = max(2, triton.next_power_of_2(k))
    BLOCK_M, BLOCK_V, BLOCK_D, m_blocks, S, per_split = plan(M, V, D, k_p2, dev, num_splits)
    ws_s = torch.empty((M, S, k), dtype=torch.float32, device=dev)
    ws_r = torch.empty((M, S, k), dtype=torch.int32, device=dev)
    ws_ml = torch.empty((M, S, 2), dtype=torch.float32, device=dev)
    upcast, block_r = _options(hidden)
    _topk_partial_kernel[(m_blocks, S)](
        hidden, weight, temperature if temperature is not None else ws_ml, ws_s, ws_r, ws_ml, hidden.stride(0),
        M, V, D, k, per_split, S,
        HAS_TEMP=temperature is not None, BLOCK_M=BLOCK_M, BLOCK_V=BLOCK_V, BLOCK_D=BLOCK_D, K_P2=k_p2,
        UPCAST=upcast, num_warps=PARTIAL_WARPS)
    ids = torch.empty((M, k), dtype=torch.int64, device=dev)
    logprobs = torch.empty((M, k), dtype=torch.float32, device=dev)
    lse = torch.empty((M,), dtype=torch.float32, device=dev)
    _topk_merge_kernel[(triton.cdiv(M, block_r),)](
        ws_s, ws_r, ws_ml, token_map if token_map is not None else ws_r, ids, logprobs, lse, M, V, k, S,
        HAS_MAP=token_map is not None, BLOCK_R=block_r, C_P2=triton.next_power_of_2(S * k),
        S_P2=triton.next_power_of_2(S), K_P2=k_p2, num_warps=4)
    return ids, logprobs, lse


def lm_head_sample(hidden, weight, temperature, seed, positions, token_map, *, num_splits=None):
    """Triton backend of :func:`fastverify.lm_head_sample` (unchecked, as :func:`lm_head_topk`)."""
    M, D = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    BLOCK_M, BLOCK_V, BLOCK_D, m_blocks, S, per_split = plan(M, V, D, 2, dev, num_splits, sample=True)
    ws_n = torch.empty((M, S), dtype=torch.float32, device=dev)
    ws_s = torch.empty((M, S), dtype=torch.float32, device=dev)
    ws_r = torch.empty((M, S), dtype=torch.int32, device=dev)
    ws_ml = torch.empty((M, S, 2), dtype=torch.float32, device=dev)
    upcast, block_r = _options(hidden)
    _sample_partial_kernel[(m_blocks, S)](
        hidden, weight, temperature, seed, positions, ws_n, ws_s, ws_r, ws_ml, hidden.stride(0),
        M, V, D, per_split, S,
        BLOCK_M=BLOCK_M, BLOCK_V=BLOCK_V, BLOCK_D=BLOCK_D, UPCAST=upcast, num_warps=PARTIAL_WARPS)
    ids = torch.empty((M,), dtype=torch.int64, device=dev)
    logprobs = torch.empty((M,), dtype=torch.float32, device=dev)
    lse = torch.empty((M,), dtype=torch.float32, device=dev)
    _sample_merge_kernel[(triton.cdiv(M, block_r),)](
        ws_n, ws_s, ws_r, ws_ml, token_map if token_map is not None else ws_r, ids, logprobs, lse, M, V, S,
        HAS_MAP=token_map is not None, BLOCK_R=block_r, S_P2=triton.next_power_of_2(S), num_warps=4)
    return ids, logprobs, lse
