"""Triton kernels for ``rejection_sample`` and ``tree_rejection_sample``.

The vocabulary of each target row is cut into chunks of ``CHUNK`` tokens (a function
of V only, so results never depend on the batch). Three kernels:

1. ``_filter_threshold_kernel`` (only when top_k/top_p are given), one program per
   row: radix select of the top-k / top-p threshold on the raw logits.
2. ``_chunk_stats_kernel``, one program per (row, chunk): the chunk's max m_c and
   sum s_c = Σ exp(z - m_c) over kept tokens, and its argmax. This is the one full
   read of the logits.
3. ``_chain_finalize_kernel`` / ``_tree_finalize_kernel``, one program per request:
   merges chunk stats into lse and argmax per row, runs the acceptance tests (the
   chain: all rows at once; the tree: node by node down the walk), and draws the
   emitted token by inverse CDF — first over the chunk masses, then inside one chunk
   — so a sample reads CHUNK logits, not V.

No probability tensor is written; the logits row of a draft is read once in (2),
plus single elements and one chunk in (3). Without top-k/top-p: two launches.
The math is the torch backend's (``fastverify/ops/rejection.py``).
"""

import torch
import triton
import triton.language as tl

from .._layout import CHAIN_RULES, default_chunk
from .common import request_of_row
from .philox import uniform_pair

FLT_MAX = tl.constexpr(3.4028234663852886e38)


# ---------------------------------------------------------------------------- helpers


@triton.jit
def _load_logits(ptr, offs, mask):
    """fp32 logits with NaN → -inf; -inf where masked off."""
    l = tl.load(ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
    return tl.where(l == l, l, float("-inf"))


@triton.jit
def _scale(l, t):
    """z = min(l / t, FLT_MAX)."""
    return tl.minimum(l / t, FLT_MAX)


@triton.jit
def _temperature(temp_ptr, b):
    """(t, random) of request b: random iff temperature[b] > 0; t = 1 where greedy."""
    t = tl.load(temp_ptr + b)
    random = t > 0
    return tl.where(random, t, 1.0), random


@triton.jit
def _float_key(x):
    """Order-preserving float32 → int64 key in [0, 2^32)."""
    bits = x.to(tl.int32, bitcast=True)
    key32 = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return key32.to(tl.int64) + 2147483648


@triton.jit
def _key_float(key):
    key32 = (key - 2147483648).to(tl.int32)
    bits = key32 ^ ((key32 >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _inverse_cdf(w, target, N: tl.constexpr):
    """First i with cumsum(w)[i] > target; else the last i with w > 0; else -1.
    Returns (i, target - Σ_{j<i} w_j)."""
    idx = tl.arange(0, N)
    cum = tl.cumsum(w, 0)
    i = tl.min(tl.where(cum > target, idx, N), 0)
    i = tl.where(i == N, tl.max(tl.where(w > 0, idx, -1), 0), i)
    rest = target - tl.sum(tl.where(idx == i, cum - w, 0.0), 0)
    return i, rest


@triton.jit
def _row_stats(stats_ptr, amax_ptr, row, R, NC, NC_P2: tl.constexpr):
    """Merge a row's chunk stats: (M, S, w, g) with lse = M + log S, w[c] the mass of
    chunk c relative to exp(M), g the first argmax of the row's logits."""
    c = tl.arange(0, NC_P2)
    mask = c < NC
    base = row.to(tl.int64) * NC + c
    m = tl.load(stats_ptr + base, mask=mask, other=float("-inf"))
    s = tl.load(stats_ptr + R * NC + base, mask=mask, other=0.0)
    a = tl.load(stats_ptr + 2 * R * NC + base, mask=mask, other=float("-inf"))
    ai = tl.load(amax_ptr + base, mask=mask, other=0)
    M = tl.max(m, 0)
    w = tl.where(m > float("-inf"), s * tl.exp(m - M), 0.0)
    g = tl.sum(tl.where(c == tl.argmax(a, 0), ai, 0), 0)
    return M, tl.sum(w, 0), w, g


@triton.jit
def _prob_at(l_row, x, t, thr, M, S, HAS_THR: tl.constexpr):
    """p(x) of the processed target distribution; x must be a valid id."""
    lx = _load_logits(l_row, x, x >= 0)
    zx = _scale(lx, t)
    kept = zx > float("-inf")
    if HAS_THR:
        kept = kept & (lx >= thr)
    return tl.where(kept & (S > 0), tl.exp(zx - M) / S, 0.0)


@triton.jit
def _chunk_probs(l_row, c, V, t, thr, M, S, HAS_THR: tl.constexpr, CHUNK: tl.constexpr):
    """(offsets, p) of chunk c; p normalized when S is the row's sum, else relative to exp(M)."""
    offs = c * CHUNK + tl.arange(0, CHUNK)
    mask = (offs >= 0) & (offs < V)  # c = -1 gives negative offsets
    l = _load_logits(l_row, offs, mask)
    z = _scale(l, t)
    kept = z > float("-inf")
    if HAS_THR:
        kept = kept & (l >= thr)
    return offs, tl.where(kept, tl.exp(z - M) / S, 0.0)


@triton.jit
def _sample_p(l_row, V, t, thr, M, w, excl, u, g, HAS_THR: tl.constexpr, CHUNK: tl.constexpr,
              NC_P2: tl.constexpr):
    """Token ~ p with token ``excl`` left out (-1: none), from chunk masses w."""
    ex = _prob_at(l_row, excl, t, thr, M, 1.0, HAS_THR)  # mass of excl relative to exp(M)
    cid = tl.arange(0, NC_P2)
    w = tl.where((cid == excl // CHUNK) & (excl >= 0), tl.maximum(w - ex, 0.0), w)
    c, rest = _inverse_cdf(w, u * tl.sum(w, 0), NC_P2)
    offs, wt = _chunk_probs(l_row, c, V, t, thr, M, 1.0, HAS_THR, CHUNK)
    wt = tl.where(offs == excl, 0.0, wt)
    i, _ = _inverse_cdf(wt, rest, CHUNK)
    return tl.where((c >= 0) & (i >= 0), c * CHUNK + i, g)


@triton.jit
def _rrs_value(p, q, ws_ptr, k):
    """r_k at tokens with target prob p and draft prob q, after k recorded rejections:
    r ← max(r - q/σ_i, 0) / ρ_{i+1} for i < k, with (σ_i, ρ_{i+1}) in ws[2i], ws[2i+1]."""
    r = p
    for i in range(0, k):
        sigma = tl.load(ws_ptr + 2 * i)
        rho = tl.load(ws_ptr + 2 * i + 1)
        r = tl.maximum(r - q / sigma, 0.0)
        r = tl.where(rho > 0, r / rho, r)
    return r


@triton.jit
def _residual_chunk(l_row, q_row, c, V, t, thr, M, S, ws_ptr, k, sigma,
                    HAS_THR: tl.constexpr, CHUNK: tl.constexpr):
    """(offsets, max(r_k - q/σ, 0)) over chunk c: the unnormalized next residual."""
    offs, p = _chunk_probs(l_row, c, V, t, thr, M, S, HAS_THR, CHUNK)
    q = tl.load(q_row + offs, mask=(offs >= 0) & (offs < V), other=0.0).to(tl.float32)
    return offs, tl.maximum(_rrs_value(p, q, ws_ptr, k) - q / sigma, 0.0)


@triton.jit
def _residual_masses(l_row, q_row, V, NC, t, thr, M, S, ws_ptr, k, sigma,
                     HAS_THR: tl.constexpr, CHUNK: tl.constexpr, NC_P2: tl.constexpr):
    """Per-chunk masses of the unnormalized residual max(r_k - q/σ, 0): one pass over the row."""
    cid = tl.arange(0, NC_P2)
    w = tl.zeros([NC_P2], tl.float32)
    for c in range(0, NC):
        _, r = _residual_chunk(l_row, q_row, c, V, t, thr, M, S, ws_ptr, k, sigma, HAS_THR, CHUNK)
        w = tl.where(cid == c, tl.sum(r, 0), w)
    return w


@triton.jit
def _sample_residual(l_row, q_row, w, u, V, t, thr, M, S, ws_ptr, k, sigma,
                     HAS_THR: tl.constexpr, CHUNK: tl.constexpr, NC_P2: tl.constexpr):
    """Token ~ max(r_k - q/σ, 0) given its chunk masses w; -1 if w has no mass."""
    c, rest = _inverse_cdf(w, u * tl.sum(w, 0), NC_P2)
    _, r = _residual_chunk(l_row, q_row, c, V, t, thr, M, S, ws_ptr, k, sigma, HAS_THR, CHUNK)
    i, _ = _inverse_cdf(r, rest, CHUNK)
    return tl.where((c >= 0) & (i >= 0), c * CHUNK + i, -1)


# ---------------------------------------------------------------------------- kernels


@triton.jit
def _radix_select(l_row, V, t, m, min_key, target, MASS: tl.constexpr, BLOCK: tl.constexpr):
    """Largest key k* (of a token) with Σ_{key >= k*, key >= min_key} w >= target, where
    w = 1 (count) or exp(z - m) (MASS); for MASS, target is a fraction of the total.
    Eight passes over the row, each fixing four more bits of k* from a 16-bin histogram."""
    bins = tl.arange(0, 16)
    prefix = tl.zeros([], tl.int64)
    above = tl.zeros([], tl.float32)
    goal = target
    for level in tl.static_range(8):
        shift = 28 - 4 * level
        hist = tl.zeros([16], tl.float32)
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            l = _load_logits(l_row, offs, offs < V)
            key = _float_key(l)
            if MASS:
                w = tl.exp(_scale(l, t) - m)
            else:
                w = tl.full([BLOCK], 1.0, tl.float32)
            w = tl.where((offs < V) & (key >= min_key) & ((key >> (shift + 4)) == prefix), w, 0.0)
            digit = (key >> shift) & 15
            hist += tl.sum(tl.where(digit[:, None] == bins[None, :], w[:, None], 0.0), 0)
        total = tl.sum(hist, 0)
        if MASS:
            if level == 0:
                goal = target * total
        at_or_above = total - tl.cumsum(hist, 0) + hist
        d = tl.max(tl.where(above + at_or_above >= goal, bins, 0), 0)
        above += tl.sum(tl.where(bins > d, hist, 0.0), 0)
        prefix = prefix * 16 + d
    return prefix


@triton.jit
def _filter_threshold_kernel(logits_ptr, stride_l, cu_ptr, temp_ptr, topk_ptr, topp_ptr, thr_ptr, B, V,
                             ROW_EXTRA: tl.constexpr, HAS_TOPK: tl.constexpr, HAS_TOPP: tl.constexpr,
                             BLOCK: tl.constexpr):
    """thr[row]: keep token v iff l_v >= thr (top-k, then top-p of the renormalized rest)."""
    row = tl.program_id(0)
    b = request_of_row(cu_ptr, row, B, ROW_EXTRA)
    l_row = logits_ptr + row.to(tl.int64) * stride_l
    t, random = _temperature(temp_ptr, b)
    key = tl.zeros([], tl.int64)
    use = tl.zeros([], tl.int1)
    if HAS_TOPK:
        k = tl.load(topk_ptr + b)
        use_k = random & (k > 0) & (k < V)
        if use_k:
            key = _radix_select(l_row, V, t, 0.0, key, k.to(tl.float32), False, BLOCK)
        use = use | use_k
    if HAS_TOPP:
        p = tl.load(topp_ptr + b)
        use_p = random & (p < 1.0)
        if use_p:
            m = tl.full([], float("-inf"), tl.float32)
            for start in range(0, V, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                m = tl.maximum(m, tl.max(_scale(_load_logits(l_row, offs, offs < V), t), 0))
            key = _radix_select(l_row, V, t, m, key, p, True, BLOCK)
        use = use | use_p
    tl.store(thr_ptr + row, tl.where(use, _key_float(key), float("-inf")))


@triton.jit
def _chunk_stats_kernel(logits_ptr, stride_l, cu_ptr, temp_ptr, thr_ptr, stats_ptr, amax_ptr, B, R, V, NC,
                        ROW_EXTRA: tl.constexpr, HAS_THR: tl.constexpr, ENTROPY: tl.constexpr,
                        CHUNK: tl.constexpr):
    """Per (row, chunk c): m_c = max z, s_c = Σ exp(z - m_c) over kept tokens, and the
    first argmax of the raw logits (greedy ignores temperature and filters); with ENTROPY
    also e_c = Σ exp(z - m_c)·(z - m_c), from which the row's entropy follows (_entropy)."""
    row = tl.program_id(0)
    c = tl.program_id(1)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    l = _load_logits(logits_ptr + row.to(tl.int64) * stride_l, offs, offs < V)  # in flight during the search
    b = request_of_row(cu_ptr, row, B, ROW_EXTRA)
    t, _ = _temperature(temp_ptr, b)
    a_i = tl.argmax(l, 0)
    a_v = tl.max(l, 0)
    z = _scale(l, t)
    if HAS_THR:
        z = tl.where(l >= tl.load(thr_ptr + row), z, float("-inf"))
    m = tl.max(z, 0)
    e = tl.where(z > float("-inf"), tl.exp(z - m), 0.0)
    s = tl.sum(e, 0)
    i = row.to(tl.int64) * NC + c
    tl.store(stats_ptr + i, m)
    tl.store(stats_ptr + R * NC + i, s)
    tl.store(stats_ptr + 2 * R * NC + i, a_v)
    tl.store(amax_ptr + i, c * CHUNK + a_i.to(tl.int32))
    if ENTROPY:
        tl.store(stats_ptr + 3 * R * NC + i, tl.sum(tl.where(z > float("-inf"), e * (z - m), 0.0), 0))


@triton.jit
def _chain_request(cu_ptr, b, R, N, max_draft_len):
    """(first draft, first row, K) of request b. Unchecked prefix sums must not move a read
    outside [0, N) drafts or [0, R) rows: such a request gets K = 0 at row 0."""
    start = tl.load(cu_ptr + b)
    row0 = start + b
    ok = (start >= 0) & (start <= N) & (row0 < R)
    K = tl.load(cu_ptr + b + 1) - start
    K = tl.minimum(tl.minimum(K, max_draft_len), tl.minimum(N - start, R - 1 - row0))
    K = tl.where(ok, tl.maximum(K, 0), 0)
    return tl.where(ok, start, 0), tl.where(ok, row0, 0), K


@triton.jit
def _chain_rows(logits_ptr, stride_l, q_ptr, stride_q, draft_ptr, thr_ptr, stats_ptr, amax_ptr, start, row0, K,
                R, V, NC, t, HAS_Q: tl.constexpr, HAS_THR: tl.constexpr, ENTROPY: tl.constexpr,
                NC_P2: tl.constexpr, W_P2: tl.constexpr):
    """The K + 1 rows of a request at once (their loads in flight together), indexed by
    j = 0..W_P2-1: merged stats M, S, chunk masses w [W_P2, NC_P2], argmax g, threshold,
    entropy H (ENTROPY; else 0), and of each draft row its draft x_{j+1} (-1 if invalid),
    P_j(x_{j+1}) and Q_j(x_{j+1}) (1: a point mass)."""
    j = tl.arange(0, W_P2)
    has_row = j <= K
    rows = row0 + tl.where(has_row, j, 0)
    c = tl.arange(0, NC_P2)
    idx = rows.to(tl.int64)[:, None] * NC + c[None, :]
    cm = has_row[:, None] & (c[None, :] < NC)
    m = tl.load(stats_ptr + idx, mask=cm, other=float("-inf"))
    s = tl.load(stats_ptr + R * NC + idx, mask=cm, other=0.0)
    a = tl.load(stats_ptr + 2 * R * NC + idx, mask=cm, other=float("-inf"))
    ai = tl.load(amax_ptr + idx, mask=cm, other=0)
    M = tl.max(m, 1)
    scale = tl.where(m > float("-inf"), tl.exp(m - M[:, None]), 0.0)
    w = s * scale
    S = tl.sum(w, 1)
    g = tl.sum(tl.where(c[None, :] == tl.argmax(a, 1)[:, None], ai, 0), 1)
    H = tl.zeros([W_P2], tl.float32)
    if ENTROPY:
        # H = log S - (1/S) Σ_c e^{m_c - M} (e_c + (m_c - M) s_c): -Σ p log p from the chunk sums
        e = tl.load(stats_ptr + 3 * R * NC + idx, mask=cm, other=0.0)
        T = tl.sum(tl.where(m > float("-inf"), scale * (e + (m - M[:, None]) * s), 0.0), 1)
        H = tl.where(S > 0, tl.log(S) - T / S, 0.0)
    if HAS_THR:
        thr = tl.load(thr_ptr + rows, mask=has_row, other=float("-inf"))
    else:
        thr = tl.full([W_P2], float("-inf"), tl.float32)
    is_draft = j < K
    x = tl.load(draft_ptr + start + j, mask=is_draft, other=-1)
    valid = is_draft & (x >= 0) & (x < V)
    xi = tl.where(valid, x, -1).to(tl.int32)
    l_rows = logits_ptr + rows.to(tl.int64) * stride_l
    lx = _load_logits(l_rows, xi, valid)
    zx = _scale(lx, t)
    px = tl.where(valid & (zx > float("-inf")) & (lx >= thr) & (S > 0), tl.exp(zx - M) / S, 0.0)
    if HAS_Q:
        qx = tl.load(q_ptr + (start + j).to(tl.int64) * stride_q + xi, mask=valid, other=0.0).to(tl.float32)
    else:
        qx = tl.full([W_P2], 1.0, tl.float32)
    return j, rows, M, S, w, g, thr, H, xi, valid, px, qx


@triton.jit
def _block_ratios(px, qx, j, W_P2: tl.constexpr):
    """p [W_P2]: p_0 = 1, p_i = min(p_{i-1} · px_{i-1} / qx_{i-1}, 1) (0 where the target gives
    the draft no mass; 1 where the drafter gave it none), the torch spec's block_ratio."""
    p = tl.where(j == 0, 1.0, 0.0)
    prev = tl.full([], 1.0, tl.float32)
    for i in tl.static_range(1, W_P2):
        a = tl.sum(tl.where(j == i - 1, px, 0.0), 0)
        b = tl.sum(tl.where(j == i - 1, qx, 0.0), 0)
        num = prev * a
        prev = tl.where((num >= b) & (num > 0), 1.0, tl.where(b > 0, num / tl.where(b > 0, b, 1.0), 0.0))
        p = tl.where(j == i, prev, p)
    return p


@triton.jit
def _block_residual_kernel(logits_ptr, stride_l, q_ptr, stride_q, draft_ptr, cu_ptr, temp_ptr, thr_ptr, stats_ptr,
                           amax_ptr, wres_ptr, B, R, N, V, NC, max_draft_len,
                           HAS_THR: tl.constexpr, CHUNK: tl.constexpr, NC_P2: tl.constexpr, W_P2: tl.constexpr):
    """Block rule, one program per (row, chunk c) of a draft row j: the residual mass
    Σ_{x in c} max(p_j P_j(x) − Q_j(x), 0) into wres[row, c] (0 for bonus rows and greedy
    requests). Z_j is the row's sum; the residual sample reads it back."""
    row = tl.program_id(0)
    c = tl.program_id(1)
    b = request_of_row(cu_ptr, row, B, 1)
    start, row0, K = _chain_request(cu_ptr, b, R, N, max_draft_len)
    t, random = _temperature(temp_ptr, b)
    j_row = row - row0
    mass = tl.zeros([], tl.float32)
    if random & (j_row >= 0) & (j_row < K):
        j, rows, M, S, w, g, thr, H, xi, valid, px, qx = _chain_rows(
            logits_ptr, stride_l, q_ptr, stride_q, draft_ptr, thr_ptr, stats_ptr, amax_ptr, start, row0, K, R, V, NC,
            t, True, HAS_THR, False, NC_P2, W_P2)
        pick = j == j_row
        p = tl.sum(tl.where(pick, _block_ratios(px, qx, j, W_P2), 0.0), 0)
        offs, P = _chunk_probs(logits_ptr + row.to(tl.int64) * stride_l, c, V, t,
                               tl.max(tl.where(pick, thr, float("-inf")), 0), tl.sum(tl.where(pick, M, 0.0), 0),
                               tl.sum(tl.where(pick, S, 0.0), 0), HAS_THR, CHUNK)
        q = tl.load(q_ptr + (start + j_row).to(tl.int64) * stride_q + offs, mask=offs < V, other=0.0).to(tl.float32)
        mass = tl.sum(tl.maximum(p * P - q, 0.0), 0)
    tl.store(wres_ptr + row.to(tl.int64) * NC + c, mass)


@triton.jit
def _chain_finalize_kernel(logits_ptr, stride_l, q_ptr, stride_q, draft_ptr, cu_ptr, temp_ptr, seed_ptr, pos_ptr,
                           thr_ptr, stats_ptr, amax_ptr, wres_ptr, eps_ptr, delta_ptr, out_ptr, num_ptr,
                           R, N, V, NC, max_draft_len,
                           RULE: tl.constexpr, HAS_Q: tl.constexpr, HAS_THR: tl.constexpr, CHUNK: tl.constexpr,
                           NC_P2: tl.constexpr, W_P2: tl.constexpr):
    """One request. All K+1 rows are tested at once: the accepted length τ of the rule
    (RULE 0 token, 1 block, 2 typical), then the token of row τ."""
    b = tl.program_id(0)
    W = max_draft_len + 1
    start, row0, K = _chain_request(cu_ptr, b, R, N, max_draft_len)
    t, random = _temperature(temp_ptr, b)
    seed = tl.load(seed_ptr + b)
    pos = tl.load(pos_ptr + b)
    j, rows, M, S, w, g, thr, H, xi, valid, px, qx = _chain_rows(
        logits_ptr, stride_l, q_ptr, stride_q, draft_ptr, thr_ptr, stats_ptr, amax_ptr, start, row0, K, R, V, NC, t,
        HAS_Q, HAS_THR, RULE == 2, NC_P2, W_P2)
    is_draft = j < K
    u, _rows_u1 = uniform_pair(seed, pos + j, j * 0)   # the token rule's u_j = the block rule's η_{j+1}
    greedy_hit = valid & (xi == g)
    scale = 1.0                                         # block: p_τ scales the residual
    if RULE == 1:
        p = _block_ratios(px, qx, j, W_P2)
        if HAS_Q:
            c = tl.arange(0, NC_P2)
            Z = tl.sum(tl.load(wres_ptr + rows.to(tl.int64)[:, None] * NC + c[None, :],
                               mask=is_draft[:, None] & (c[None, :] < NC), other=0.0), 1)
        else:
            Z = p * (1 - px)                            # Q_j a point mass at x_{j+1}
        den = Z + 1 - p
        h = tl.where(j == K, p, tl.where(den > 0, Z / tl.where(den > 0, den, 1.0), 1.0))
        # column j holds h_j; η_i (i = j) sits at column j - 1: shift η right by one
        eta = tl.sum(tl.where(j[:, None] - 1 == j[None, :], u[None, :], 0.0), 1)
        acc = (j >= 1) & (j <= K) & (eta < h)
        n_acc = tl.max(tl.where(acc, j, 0), 0)
        if not random:
            n_acc = tl.min(tl.where(is_draft & ~greedy_hit, j, K), 0)
        scale = tl.sum(tl.where(j == n_acc, p, 0.0), 0)
    else:
        if RULE == 2:
            thr_t = tl.minimum(tl.load(eps_ptr + b), tl.load(delta_ptr + b) * tl.exp(-H))
            accept = px > thr_t
        elif HAS_Q:
            accept = u * qx < px
        else:
            accept = u < px
        accept = valid & tl.where(random, accept, greedy_hit)
        n_acc = tl.min(tl.where(is_draft & ~accept, j, K), 0)

    # the emitted token at row n_acc: recovered (n_acc < K) or bonus
    pick = j == n_acc
    row = row0 + n_acc
    l_row = logits_ptr + row.to(tl.int64) * stride_l
    M_n = tl.sum(tl.where(pick, M, 0.0), 0)
    S_n = tl.sum(tl.where(pick, S, 0.0), 0)
    g_n = tl.sum(tl.where(pick, g, 0), 0)
    thr_n = tl.max(tl.where(pick, thr, float("-inf")), 0)
    w_n = tl.sum(tl.where(pick[:, None], w, 0.0), 0)
    excl = tl.max(tl.where(pick, xi, -1), 0)     # the rejected draft, -1 for the bonus row
    token = g_n
    if random:
        _u0, u_s = uniform_pair(seed, pos + n_acc, 0)
        token = tl.full([], -1, tl.int32)
        if RULE == 2:
            cut = tl.sum(tl.where(pick, thr_t, 0.0), 0)
            token = _sample_typical(l_row, V, NC, t, thr_n, M_n, S_n, cut, u_s, g_n, HAS_THR, CHUNK, NC_P2)
        elif HAS_Q:
            if excl >= 0:
                # residual max(a·p - q, 0) (a = p_τ for block, 1 for token): chunk masses
                # (block: written by _block_residual_kernel), then one chunk to place u
                q_row = q_ptr + (start + n_acc).to(tl.int64) * stride_q
                if RULE == 1:
                    cn = tl.arange(0, NC_P2)
                    wr = tl.load(wres_ptr + row.to(tl.int64) * NC + cn, mask=cn < NC, other=0.0)
                else:
                    wr = _residual_masses(l_row, q_row, V, NC, t, thr_n, M_n, S_n, q_row, 0, 1.0, HAS_THR, CHUNK,
                                          NC_P2)
                token = _sample_scaled_residual(l_row, q_row, wr, u_s, V, t, thr_n, M_n, S_n, scale, HAS_THR,
                                                CHUNK, NC_P2)
        if token < 0:
            token = _sample_p(l_row, V, t, thr_n, M_n, w_n, excl, u_s, g_n, HAS_THR, CHUNK, NC_P2)
    out = tl.where(j < n_acc, xi, tl.where(pick, token, -1))
    tl.store(out_ptr + b * W + j, out, mask=j < W)
    tl.store(num_ptr + b, n_acc)


@triton.jit
def _sample_scaled_residual(l_row, q_row, w, u, V, t, thr, M, S, a, HAS_THR: tl.constexpr, CHUNK: tl.constexpr,
                            NC_P2: tl.constexpr):
    """Token ~ max(a·p - q, 0) given its chunk masses w; -1 if w has no mass."""
    c, rest = _inverse_cdf(w, u * tl.sum(w, 0), NC_P2)
    offs, p = _chunk_probs(l_row, c, V, t, thr, M, S, HAS_THR, CHUNK)
    q = tl.load(q_row + offs, mask=(offs >= 0) & (offs < V), other=0.0).to(tl.float32)
    i, _ = _inverse_cdf(tl.maximum(a * p - q, 0.0), rest, CHUNK)
    return tl.where((c >= 0) & (i >= 0), c * CHUNK + i, -1)


@triton.jit
def _sample_typical(l_row, V, NC, t, thr, M, S, cut, u, g, HAS_THR: tl.constexpr, CHUNK: tl.constexpr,
                    NC_P2: tl.constexpr):
    """Token ~ p truncated to p >= cut (Medusa's next token): one pass for the chunk masses,
    one chunk to place u; the argmax if nothing is left (cannot happen: max p >= e^{-H} > cut)."""
    cid = tl.arange(0, NC_P2)
    wc = tl.zeros([NC_P2], tl.float32)
    for c in range(0, NC):
        _, p = _chunk_probs(l_row, c, V, t, thr, M, S, HAS_THR, CHUNK)
        wc = tl.where(cid == c, tl.sum(tl.where(p >= cut, p, 0.0), 0), wc)
    c, rest = _inverse_cdf(wc, u * tl.sum(wc, 0), NC_P2)
    offs, p = _chunk_probs(l_row, c, V, t, thr, M, S, HAS_THR, CHUNK)
    i, _ = _inverse_cdf(tl.where(p >= cut, p, 0.0), rest, CHUNK)
    return tl.where((c >= 0) & (i >= 0), c * CHUNK + i, g)


@triton.jit
def _tree_request(cu_ptr, acc_ptr, out_ptr, b, D, T, D_P2: tl.constexpr):
    """(first node, nodes, ok) of request b's tree, its output rows set to -1. Unchecked
    prefix sums must not move a read outside [0, T): such a request gets no nodes."""
    cols = tl.arange(0, D_P2)
    tl.store(acc_ptr + b * D + cols, -1, mask=cols < D)
    tl.store(out_ptr + b * D + cols, -1, mask=cols < D)
    n0 = tl.load(cu_ptr + b)
    n = tl.load(cu_ptr + b + 1) - n0
    ok = (n0 >= 0) & (n >= 1) & (n0 + n <= T)
    return tl.where(ok, n0, 0), tl.where(ok, n, 0), ok


@triton.jit
def _find_child(tok_ptr, par_ptr, n0, n, node, y, NODE_BLOCK: tl.constexpr):
    """Tree-local index of node's child carrying token y, or -1."""
    best = n
    for s in range(node + 1, n, NODE_BLOCK):
        j = s + tl.arange(0, NODE_BLOCK)
        m = j < n
        par = tl.load(par_ptr + n0 + j, mask=m, other=-1)
        tok = tl.load(tok_ptr + n0 + j, mask=m, other=-1)
        best = tl.minimum(best, tl.min(tl.where(m & (par == node) & (tok == y), j, n), 0))
    return tl.where(best < n, best, -1)


@triton.jit
def _recursive_rejection(l_row, q_row, tok_ptr, par_ptr, ws, n0, n, node, V, NC, t, thr, M, S, w, g, seed, tpos,
                         u_sample, HAS_THR: tl.constexpr, CHUNK: tl.constexpr, NC_P2: tl.constexpr):
    """Recursive rejection over node's children in node order (SpecInfer, without
    replacement). ws holds (σ_k, ρ_{k+1}) of each rejected child k. Returns
    (accepted child or -1, token to emit at this depth)."""
    nxt = tl.full([], -1, tl.int32)
    k = tl.zeros([], tl.int32)
    sigma = tl.full([], 1.0, tl.float32)
    wr = tl.zeros([NC_P2], tl.float32)
    for j in range(node + 1, n):
        x = tl.load(tok_ptr + n0 + j)
        kid = (tl.load(par_ptr + n0 + j) == node) & (x >= 0) & (x < V) & (nxt < 0)
        if kid:
            xi = x.to(tl.int32)
            qx = tl.load(q_row + xi).to(tl.float32)
            rx = _rrs_value(_prob_at(l_row, xi, t, thr, M, S, HAS_THR), qx, ws, k)
            u, _ = uniform_pair(seed, tpos, k)
            s_k = tl.maximum(sigma, 1e-30)
            if u * (qx / s_k) < rx:
                nxt = j
            else:
                wr = _residual_masses(l_row, q_row, V, NC, t, thr, M, S, ws, k, s_k, HAS_THR, CHUNK, NC_P2)
                tl.store(ws + 2 * k, s_k)
                tl.store(ws + 2 * k + 1, tl.sum(wr, 0))
                tl.debug_barrier()
                sigma = sigma - qx
                k += 1
    y = tl.full([], -1, tl.int32)
    if nxt >= 0:
        y = tl.load(tok_ptr + n0 + nxt).to(tl.int32)
    else:
        if k > 0:
            s_last = tl.load(ws + 2 * (k - 1))
            y = _sample_residual(l_row, q_row, wr, u_sample, V, t, thr, M, S, ws, k - 1, s_last,
                                 HAS_THR, CHUNK, NC_P2)
        if y < 0:
            y = _sample_p(l_row, V, t, thr, M, w, -1, u_sample, g, HAS_THR, CHUNK, NC_P2)
    return nxt, y


@triton.jit
def _tree_finalize_kernel(logits_ptr, stride_l, q_ptr, stride_q, tok_ptr, par_ptr, cu_ptr, temp_ptr, seed_ptr,
                          pos_ptr, thr_ptr, stats_ptr, amax_ptr, ws_ptr, acc_ptr, out_ptr, num_ptr,
                          T, V, NC, max_depth,
                          HAS_Q: tl.constexpr, HAS_THR: tl.constexpr, CHUNK: tl.constexpr,
                          NC_P2: tl.constexpr, D_P2: tl.constexpr, NODE_BLOCK: tl.constexpr):
    """One request: walk the tree from the root, one target row per visited node."""
    b = tl.program_id(0)
    D = max_depth + 1
    cols = tl.arange(0, D_P2)
    n0, n, ok = _tree_request(cu_ptr, acc_ptr, out_ptr, b, D, T, D_P2)
    t, random = _temperature(temp_ptr, b)
    seed = tl.load(seed_ptr + b)
    pos = tl.load(pos_ptr + b)
    thr = tl.full([], float("-inf"), tl.float32)
    if ok:
        tl.store(acc_ptr + b * D, 0)

    node = tl.zeros([], tl.int32)
    depth = tl.zeros([], tl.int32)
    done = tl.where(ok, 0, 1)
    for step in range(0, max_depth + 1):
        if done == 0:
            row = n0 + node
            l_row = logits_ptr + row.to(tl.int64) * stride_l
            if HAS_THR:
                thr = tl.load(thr_ptr + row)
            M, S, w, g = _row_stats(stats_ptr, amax_ptr, row, T, NC, NC_P2)
            _, u_sample = uniform_pair(seed, pos + depth, 0)
            y = g
            nxt = tl.full([], -1, tl.int32)
            if HAS_Q:
                if random:
                    # slot k of this visit's workspace: row + 1 + k < n0 + n (k < number of children)
                    nxt, y = _recursive_rejection(
                        l_row, q_ptr + row.to(tl.int64) * stride_q, tok_ptr, par_ptr,
                        ws_ptr + 2 * (row + 1).to(tl.int64), n0, n, node, V, NC, t, thr, M, S, w, g, seed,
                        pos + depth, u_sample, HAS_THR, CHUNK, NC_P2)
                else:
                    nxt = _find_child(tok_ptr, par_ptr, n0, n, node, y, NODE_BLOCK)
            else:
                # sample-then-match
                if random:
                    y = _sample_p(l_row, V, t, thr, M, w, -1, u_sample, g, HAS_THR, CHUNK, NC_P2)
                nxt = _find_child(tok_ptr, par_ptr, n0, n, node, y, NODE_BLOCK)
            tl.store(out_ptr + b * D + depth, y)
            if (nxt >= 0) & (depth < max_depth):
                node = nxt
                depth += 1
                tl.store(acc_ptr + b * D + depth, node)
            else:
                done = 1
    tl.store(num_ptr + b, depth)


# ---------------------------------------------------------------------------- multi-path block verification


@triton.jit
def _ancestor(par_ptr, n0, node, up, max_depth):
    """Tree-local ancestor ``up`` levels above ``node`` (scalars or vectors). Parents that
    are no tree (unchecked input) end the walk at the root: reads stay inside the tree."""
    cur = node
    for k in range(0, max_depth):
        live = (cur > 0) & (cur * 0 + k < up)     # (k < up) shaped like cur: the interpreter wants one mask dtype
        p = tl.load(par_ptr + n0 + cur, mask=live, other=0).to(tl.int32)
        cur = tl.where(live, tl.where((p >= 0) & (p < cur), p, 0), cur)
    return cur


@triton.jit
def _node_depth(par_ptr, n0, node, max_depth):
    """Depth of tree-local ``node`` (scalar or vector), walking up to the root."""
    cur = node
    d = tl.zeros_like(node)
    for _ in range(0, max_depth):
        live = cur > 0
        p = tl.load(par_ptr + n0 + cur, mask=live, other=0).to(tl.int32)
        cur = tl.where(live & (p >= 0) & (p < cur), p, 0)
        d += live.to(node.dtype)
    return d


@triton.jit
def _tree_height(par_ptr, n0, n, max_depth, NODE_BLOCK: tl.constexpr):
    """The deepest node's depth: every path's leaf sits there."""
    h = tl.zeros([], tl.int32)
    for s in range(0, n, NODE_BLOCK):
        j = s + tl.arange(0, NODE_BLOCK)
        d = _node_depth(par_ptr, n0, tl.where(j < n, j, 0), max_depth)
        h = tl.maximum(h, tl.max(tl.where(j < n, d, 0), 0))
    return h


@triton.jit
def _next_path(par_ptr, n0, n, last, v, dv, height, max_depth, NODE_BLOCK: tl.constexpr):
    """The first path (leaf, tree-local) after leaf ``last`` that runs through node v at
    depth dv, or -1."""
    best = n
    if dv < height:
        for s in range(last + 1, n, NODE_BLOCK):
            j = s + tl.arange(0, NODE_BLOCK)
            m = j < n
            jj = tl.where(m, j, 0)
            hit = m & (_node_depth(par_ptr, n0, jj, max_depth) == height) & \
                (_ancestor(par_ptr, n0, jj, height - dv, max_depth) == v)
            best = tl.minimum(best, tl.min(tl.where(hit, j, n), 0))
    return tl.where(best < n, best, -1)


@triton.jit
def _removed(offs, par_ptr, tok_ptr, q_ptr, stride_q, n0, u, du, lj, height, V, max_depth, WOR: tl.constexpr):
    """(rem at offs, total): paths drawn without replacement — the Q-mass below node u
    (depth du) of every path before path lj that runs through u, at its token after u.
    Zero for i.i.d. paths."""
    rem = tl.zeros(offs.shape, tl.float32)
    tot = tl.zeros([], tl.float32)
    if WOR:
        for k in range(1, lj):
            l = u * 0 + k                                        # a tensor, as u (the loop index may be an int)
            if _node_depth(par_ptr, n0, l, max_depth) == height:
                cur = l
                m = tl.full([], 1.0, tl.float32)
                for _ in range(0, height - du - 1):           # from the leaf up to depth du + 1
                    p = _ancestor(par_ptr, n0, cur, 1, max_depth)
                    x = tl.load(tok_ptr + n0 + cur)
                    xv = (x >= 0) & (x < V)
                    m = m * tl.load(q_ptr + (n0 + p).to(tl.int64) * stride_q + tl.where(xv, x, 0), mask=xv,
                                    other=0.0).to(tl.float32)
                    cur = p
                if _ancestor(par_ptr, n0, cur, 1, max_depth) == u:
                    x = tl.load(tok_ptr + n0 + cur)
                    xv = (x >= 0) & (x < V)
                    m = m * tl.load(q_ptr + (n0 + u).to(tl.int64) * stride_q + tl.where(xv, x, 0), mask=xv,
                                    other=0.0).to(tl.float32)
                    rem += tl.where(offs == x, m, 0.0)
                    tot += m
    return rem, tot


@triton.jit
def _draft_at(q_row, offs, mask, par_ptr, tok_ptr, q_ptr, stride_q, n0, u, du, lj, height, V, max_depth,
              WOR: tl.constexpr):
    """D at offs: the law path lj's token after node u was drawn from — Q(u), without
    replacement minus the earlier paths' mass below u, renormalized."""
    q = tl.load(q_row + offs, mask=mask, other=0.0).to(tl.float32)
    if WOR:
        rem, tot = _removed(offs, par_ptr, tok_ptr, q_ptr, stride_q, n0, u, du, lj, height, V, max_depth, WOR)
        left = 1.0 - tot
        q = tl.where(left > 0, (q - rem) / tl.where(left > 0, left, 1.0), 0.0)
    return q


@triton.jit
def _multi_path_kernel(logits_ptr, stride_l, q_ptr, stride_q, tok_ptr, par_ptr, cu_ptr, temp_ptr, seed_ptr, pos_ptr,
                       thr_ptr, stats_ptr, amax_ptr, rbuf_ptr, wbuf_ptr, acc_ptr, out_ptr, num_ptr,
                       B, T, V, NC, max_depth,
                       WOR: tl.constexpr, HAS_THR: tl.constexpr, CHUNK: tl.constexpr, NC_P2: tl.constexpr,
                       D_P2: tl.constexpr, NODE_BLOCK: tl.constexpr):
    """One request, greedy multi-path block verification (the torch spec's
    _multi_path_block_torch): block verification along one path per attempt; the residual
    target R at the current node lives in rbuf[buf, b] (unnormalized, mass rho; chunk masses
    in wbuf[buf, b]), or is the node's own P (r_is_p). Greedy requests walk the argmax."""
    b = tl.program_id(0)
    D = max_depth + 1
    cols = tl.arange(0, D_P2)
    n0, n, ok = _tree_request(cu_ptr, acc_ptr, out_ptr, b, D, T, D_P2)
    t, random = _temperature(temp_ptr, b)
    seed = tl.load(seed_ptr + b)
    pos = tl.load(pos_ptr + b)
    thr = tl.full([], float("-inf"), tl.float32)
    cid = tl.arange(0, NC_P2)

    v = tl.zeros([], tl.int32)          # current node (tree-local) and its depth
    dv = tl.zeros([], tl.int32)
    y = tl.zeros([], tl.int32)
    if ok & random:
        height = _tree_height(par_ptr, n0, n, max_depth, NODE_BLOCK)
        last = tl.zeros([], tl.int32)   # leaf of the last path used: later ones come after it
        r_is_p = tl.full([], 1, tl.int32)
        rho = tl.full([], 1.0, tl.float32)
        buf = tl.zeros([], tl.int32)
        attempt = tl.zeros([], tl.int32)
        state = tl.zeros([], tl.int32)  # 0 verifying, 1 a whole path accepted, 2 no path left through v
        for _ in range(0, n):
            if state == 0:
                j = _next_path(par_ptr, n0, n, last, v, dv, height, max_depth, NODE_BLOCK)
                if j < 0:
                    state = 2
                else:
                    last = j
                    L = height - dv
                    p = tl.full([], 1.0, tl.float32)
                    tau = tl.zeros([], tl.int32)
                    p_tau = tl.full([], 1.0, tl.float32)
                    u_tau = v
                    u_prev = v
                    for i in range(1, L + 1):
                        u_i = _ancestor(par_ptr, n0, j, L - i, max_depth)
                        x = tl.load(tok_ptr + n0 + u_i)
                        xv = (x >= 0) & (x < V)
                        xi = tl.where(xv, x, 0).to(tl.int32)
                        row_prev = n0 + u_prev
                        # T_{i-1}(x_i): R at v for i = 1, else the target row of u_{i-1}
                        if HAS_THR:
                            thr = tl.load(thr_ptr + row_prev)
                        M, S, _w, _g = _row_stats(stats_ptr, amax_ptr, row_prev, T, NC, NC_P2)
                        Tx = _prob_at(logits_ptr + row_prev.to(tl.int64) * stride_l, xi, t, thr, M, S, HAS_THR)
                        if (i == 1) & (r_is_p == 0):
                            Tx = tl.load(rbuf_ptr + (buf * B + b).to(tl.int64) * V + xi) / rho
                        Dx = _draft_at(q_ptr + row_prev.to(tl.int64) * stride_q, xi, xv, par_ptr, tok_ptr, q_ptr,
                                       stride_q, n0, u_prev, dv + i - 1, j, height, V, max_depth, WOR)
                        Tx = tl.where(xv, Tx, 0.0)
                        num = p * Tx
                        p = tl.where((num >= Dx) & (num > 0), 1.0, tl.where(Dx > 0, num / tl.where(Dx > 0, Dx, 1.0),
                                                                             0.0))
                        h = p
                        if i < L:
                            # Z_i = Σ_x max(p_i P(u_i)(x) − D(u_i)(x), 0): one pass over u_i's row
                            row_i = n0 + u_i
                            if HAS_THR:
                                thr = tl.load(thr_ptr + row_i)
                            Mi, Si, _wi, _gi = _row_stats(stats_ptr, amax_ptr, row_i, T, NC, NC_P2)
                            Z = tl.zeros([], tl.float32)
                            for c in range(0, NC):
                                offs, P = _chunk_probs(logits_ptr + row_i.to(tl.int64) * stride_l, c, V, t, thr,
                                                       Mi, Si, HAS_THR, CHUNK)
                                Dv = _draft_at(q_ptr + row_i.to(tl.int64) * stride_q, offs, offs < V, par_ptr,
                                               tok_ptr, q_ptr, stride_q, n0, u_i, dv + i, j, height, V, max_depth,
                                               WOR)
                                Z += tl.sum(tl.where(offs < V, tl.maximum(p * P - Dv, 0.0), 0.0), 0)
                            den = Z + 1 - p
                            h = tl.where(den > 0, Z / tl.where(den > 0, den, 1.0), 1.0)
                        eta, _u1 = uniform_pair(seed, pos + dv + i - 1, attempt)
                        if eta < h:
                            tau = i
                            p_tau = p
                            u_tau = u_i
                        u_prev = u_i
                    attempt += 1
                    if tau == L:
                        state = 1
                        v = u_tau
                        dv = height
                    else:
                        # R at u_tau: max(p_tau T_tau − D(u_tau), 0), T_tau = R (tau = 0) or P(u_tau)
                        row_u = n0 + u_tau
                        if HAS_THR:
                            thr = tl.load(thr_ptr + row_u)
                        Mu, Su, _wu, _gu = _row_stats(stats_ptr, amax_ptr, row_u, T, NC, NC_P2)
                        src = rbuf_ptr + (buf * B + b).to(tl.int64) * V
                        dst = rbuf_ptr + ((1 - buf) * B + b).to(tl.int64) * V
                        wdst = wbuf_ptr + ((1 - buf) * B + b).to(tl.int64) * NC
                        mass = tl.zeros([], tl.float32)
                        for c in range(0, NC):
                            offs, P = _chunk_probs(logits_ptr + row_u.to(tl.int64) * stride_l, c, V, t, thr, Mu, Su,
                                                   HAS_THR, CHUNK)
                            if (tau == 0) & (r_is_p == 0):
                                P = tl.load(src + offs, mask=offs < V, other=0.0) / rho
                            Dv = _draft_at(q_ptr + row_u.to(tl.int64) * stride_q, offs, offs < V, par_ptr, tok_ptr,
                                           q_ptr, stride_q, n0, u_tau, dv + tau, j, height, V, max_depth, WOR)
                            r = tl.where(offs < V, tl.maximum(p_tau * P - Dv, 0.0), 0.0)
                            tl.store(dst + offs, r, mask=offs < V)
                            rc = tl.sum(r, 0)
                            tl.store(wdst + c, rc)
                            mass += rc
                        tl.debug_barrier()
                        if mass > 0:
                            buf = 1 - buf
                            rho = mass
                            r_is_p = 0
                        elif tau > 0:
                            r_is_p = 1        # R = P(u_tau): the torch spec's fallback
                        v = u_tau
                        dv = dv + tau
        # the emitted token: y ~ P(leaf) after a whole path, else y ~ R at v
        row = n0 + v
        if HAS_THR:
            thr = tl.load(thr_ptr + row)
        M, S, w, g = _row_stats(stats_ptr, amax_ptr, row, T, NC, NC_P2)
        _, u_s = uniform_pair(seed, pos + dv, 0)
        if (state == 1) | (r_is_p == 1):
            y = _sample_p(logits_ptr + row.to(tl.int64) * stride_l, V, t, thr, M, w, -1, u_s, g, HAS_THR, CHUNK,
                          NC_P2)
        else:
            wr = tl.load(wbuf_ptr + (buf * B + b).to(tl.int64) * NC + cid, mask=cid < NC, other=0.0)
            c, rest = _inverse_cdf(wr, u_s * tl.sum(wr, 0), NC_P2)
            offs = c * CHUNK + tl.arange(0, CHUNK)
            vals = tl.load(rbuf_ptr + (buf * B + b).to(tl.int64) * V + offs, mask=(offs >= 0) & (offs < V), other=0.0)
            i, _ = _inverse_cdf(vals, rest, CHUNK)
            y = tl.where((c >= 0) & (i >= 0), c * CHUNK + i, g)
    elif ok:
        # greedy: move to the first child carrying the argmax while there is one
        walking = tl.full([], 1, tl.int32)
        for _ in range(0, max_depth + 1):
            if walking == 1:
                row = n0 + v
                M, S, w, g = _row_stats(stats_ptr, amax_ptr, row, T, NC, NC_P2)
                y = g
                nxt = _find_child(tok_ptr, par_ptr, n0, n, v, g, NODE_BLOCK)
                if (nxt >= 0) & (dv < max_depth):
                    v = nxt
                    dv += 1
                else:
                    walking = 0
    if ok:
        # the accepted path: root .. v, its tokens after the root, then y
        anc = _ancestor(par_ptr, n0, v + cols * 0, dv - cols, max_depth)
        tl.store(acc_ptr + b * D + cols, anc, mask=cols <= dv)
        tok = tl.load(tok_ptr + n0 + anc, mask=cols <= dv, other=-1)
        tl.store(out_ptr + b * D + cols - 1, tok.to(tl.int32), mask=(cols >= 1) & (cols <= dv))
        tl.store(out_ptr + b * D + dv, y)
    tl.store(num_ptr + b, dv)


# ---------------------------------------------------------------------------- launchers


def _row_stats_pass(target_logits, cu, extra, temperature, top_k, top_p, chunk, entropy=False):
    """Launch kernels 1 (if filtering) and 2 for all rows; returns (thr, stats, amax, NC).
    stats is [3, R, NC] (m, s, max logit), [4, R, NC] with the entropy sums."""
    R, V = target_logits.shape
    B = cu.numel() - 1
    NC = triton.cdiv(V, chunk)
    dev = target_logits.device
    thr = None
    if top_k is not None or top_p is not None:
        thr = torch.empty(R, dtype=torch.float32, device=dev)
        _filter_threshold_kernel[(R,)](
            target_logits, target_logits.stride(0), cu, temperature,
            top_k if top_k is not None else temperature, top_p if top_p is not None else temperature, thr, B, V,
            ROW_EXTRA=extra, HAS_TOPK=top_k is not None, HAS_TOPP=top_p is not None,
            BLOCK=min(1024, triton.next_power_of_2(V)), num_warps=8)
    stats = torch.empty((4 if entropy else 3, R, NC), dtype=torch.float32, device=dev)
    amax = torch.empty((R, NC), dtype=torch.int32, device=dev)
    _chunk_stats_kernel[(R, NC)](
        target_logits, target_logits.stride(0), cu, temperature, thr if thr is not None else temperature,
        stats, amax, B, R, V, NC,
        ROW_EXTRA=extra, HAS_THR=thr is not None, ENTROPY=entropy, CHUNK=chunk, num_warps=8 if chunk >= 2048 else 4)
    return thr, stats, amax, NC


def rejection_sample(target_logits, draft_tokens, cu_num_draft, draft_probs, temperature, top_k, top_p, seed,
                     positions, max_draft_len, verify="token", typical_eps=None, typical_delta=None, *,
                     chunk_size=None):
    """Triton backend of :func:`fastverify.rejection_sample` (arguments as there;
    unchecked — call through the op, which fills in typical's ε, δ). ``chunk_size``
    overrides the chunk width.

    Launches: [threshold,] chunk stats, [block with draft_probs: residual masses,] finalize.
    Reads of each logits row: one full pass (stats), plus single elements and one chunk;
    the token rule's rejected row and typical's sampled row one more pass; the block rule
    one more pass of every draft row (its residual masses) and none at sampling. Each
    draft-probs row: single elements, plus one pass (token: the rejected row; block: every
    row) and one chunk."""
    R, V = target_logits.shape
    B = cu_num_draft.numel() - 1
    N = draft_tokens.numel()
    rule = CHAIN_RULES[verify]
    chunk = chunk_size or default_chunk(V)
    thr, stats, amax, NC = _row_stats_pass(target_logits, cu_num_draft, 1, temperature, top_k, top_p, chunk,
                                           entropy=rule == 2)
    dev = target_logits.device
    out = torch.empty((B, max_draft_len + 1), dtype=torch.int32, device=dev)
    num = torch.empty(B, dtype=torch.int32, device=dev)
    q = draft_probs if draft_probs is not None else target_logits
    thr_arg = thr if thr is not None else temperature
    NC_P2, W_P2 = triton.next_power_of_2(NC), triton.next_power_of_2(max_draft_len + 1)
    wres = stats
    if rule == 1 and draft_probs is not None:
        wres = torch.empty((R, NC), dtype=torch.float32, device=dev)
        _block_residual_kernel[(R, NC)](
            target_logits, target_logits.stride(0), q, q.stride(0), draft_tokens, cu_num_draft, temperature, thr_arg,
            stats, amax, wres, B, R, N, V, NC, max_draft_len,
            HAS_THR=thr is not None, CHUNK=chunk, NC_P2=NC_P2, W_P2=W_P2, num_warps=4)
    _chain_finalize_kernel[(B,)](
        target_logits, target_logits.stride(0), q, q.stride(0), draft_tokens, cu_num_draft, temperature, seed,
        positions, thr_arg, stats, amax, wres, typical_eps if rule == 2 else temperature,
        typical_delta if rule == 2 else temperature, out, num, R, N, V, NC, max_draft_len,
        RULE=rule, HAS_Q=draft_probs is not None, HAS_THR=thr is not None, CHUNK=chunk, NC_P2=NC_P2, W_P2=W_P2,
        num_warps=4)
    return out, num


def tree_rejection_sample(target_logits, tree_tokens, parents, cu_num_nodes, draft_probs, temperature, top_k, top_p,
                          seed, positions, max_depth, verify="specinfer", *, chunk_size=None):
    """Triton backend of :func:`fastverify.tree_rejection_sample` (unchecked).

    Multi-path block rules: chunk stats, then one program per request that walks its
    paths; each block-verification attempt reads single elements of its path's rows and
    one pass over each inner node's logits and draft-probs rows (Z), plus one pass over
    the row it stops at (the residual, written to a [2, B, V] fp32 scratch)."""
    T, V = target_logits.shape
    B = cu_num_nodes.numel() - 1
    dev = target_logits.device
    chunk = chunk_size or default_chunk(V)
    thr, stats, amax, NC = _row_stats_pass(target_logits, cu_num_nodes, 0, temperature, top_k, top_p, chunk)
    D = max_depth + 1
    accepted = torch.empty((B, D), dtype=torch.int32, device=dev)
    out = torch.empty((B, D), dtype=torch.int32, device=dev)
    num = torch.empty(B, dtype=torch.int32, device=dev)
    if verify in ("block", "block_wor"):
        rbuf = torch.empty((2, B, V), dtype=torch.float32, device=dev)
        wbuf = torch.empty((2, B, NC), dtype=torch.float32, device=dev)
        _multi_path_kernel[(B,)](
            target_logits, target_logits.stride(0), draft_probs, draft_probs.stride(0), tree_tokens, parents,
            cu_num_nodes, temperature, seed, positions, thr if thr is not None else temperature, stats, amax, rbuf,
            wbuf, accepted, out, num, B, T, V, NC, max_depth,
            WOR=verify == "block_wor", HAS_THR=thr is not None, CHUNK=chunk, NC_P2=triton.next_power_of_2(NC),
            D_P2=triton.next_power_of_2(D), NODE_BLOCK=64, num_warps=4)
        return accepted, out, num
    ws = torch.empty((T + 1, 2), dtype=torch.float32, device=dev) if draft_probs is not None else stats
    q = draft_probs if draft_probs is not None else target_logits
    _tree_finalize_kernel[(B,)](
        target_logits, target_logits.stride(0), q, q.stride(0), tree_tokens, parents, cu_num_nodes, temperature,
        seed, positions, thr if thr is not None else temperature, stats, amax, ws, accepted, out, num,
        T, V, NC, max_depth,
        HAS_Q=draft_probs is not None, HAS_THR=thr is not None, CHUNK=chunk,
        NC_P2=triton.next_power_of_2(NC), D_P2=triton.next_power_of_2(D), NODE_BLOCK=64, num_warps=4)
    return accepted, out, num
