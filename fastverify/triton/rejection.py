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

from .._layout import default_chunk
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
                        ROW_EXTRA: tl.constexpr, HAS_THR: tl.constexpr, CHUNK: tl.constexpr):
    """Per (row, chunk c): m_c = max z, s_c = Σ exp(z - m_c) over kept tokens, and the
    first argmax of the raw logits (greedy ignores temperature and filters)."""
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
    s = tl.sum(tl.where(z > float("-inf"), tl.exp(z - m), 0.0), 0)
    i = row.to(tl.int64) * NC + c
    tl.store(stats_ptr + i, m)
    tl.store(stats_ptr + R * NC + i, s)
    tl.store(stats_ptr + 2 * R * NC + i, a_v)
    tl.store(amax_ptr + i, c * CHUNK + a_i.to(tl.int32))


@triton.jit
def _chain_finalize_kernel(logits_ptr, stride_l, q_ptr, stride_q, draft_ptr, cu_ptr, temp_ptr, seed_ptr, pos_ptr,
                           thr_ptr, stats_ptr, amax_ptr, out_ptr, num_ptr, R, N, V, NC, max_draft_len,
                           HAS_Q: tl.constexpr, HAS_THR: tl.constexpr, CHUNK: tl.constexpr,
                           NC_P2: tl.constexpr, W_P2: tl.constexpr):
    """One request. All K+1 rows are tested at once (their loads in flight together):
    accept_j for every draft, n = the first rejected j (or K), then the token of row n."""
    b = tl.program_id(0)
    W = max_draft_len + 1
    start = tl.load(cu_ptr + b)
    row0 = start + b
    # Unchecked prefix sums must not move a read outside [0, N) drafts or [0, R) rows.
    ok = (start >= 0) & (start <= N) & (row0 < R)
    K = tl.load(cu_ptr + b + 1) - start
    K = tl.minimum(tl.minimum(K, max_draft_len), tl.minimum(N - start, R - 1 - row0))
    K = tl.where(ok, tl.maximum(K, 0), 0)
    row0 = tl.where(ok, row0, 0)
    start = tl.where(ok, start, 0)
    t, random = _temperature(temp_ptr, b)
    seed = tl.load(seed_ptr + b)
    pos = tl.load(pos_ptr + b)

    # rows j = 0..K of the request: merged stats [W_P2] and chunk masses [W_P2, NC_P2]
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
    w = tl.where(m > float("-inf"), s * tl.exp(m - M[:, None]), 0.0)
    S = tl.sum(w, 1)
    g = tl.sum(tl.where(c[None, :] == tl.argmax(a, 1)[:, None], ai, 0), 1)
    if HAS_THR:
        thr = tl.load(thr_ptr + rows, mask=has_row, other=float("-inf"))
    else:
        thr = tl.full([W_P2], float("-inf"), tl.float32)

    # acceptance of every draft: u_j · q_j(x_j) < p_j(x_j)  (greedy: x_j == argmax_j)
    is_draft = j < K
    x = tl.load(draft_ptr + start + j, mask=is_draft, other=-1)
    valid = is_draft & (x >= 0) & (x < V)
    xi = tl.where(valid, x, -1).to(tl.int32)
    l_rows = logits_ptr + rows.to(tl.int64) * stride_l
    lx = _load_logits(l_rows, xi, valid)
    zx = _scale(lx, t)
    px = tl.where(valid & (zx > float("-inf")) & (lx >= thr) & (S > 0), tl.exp(zx - M) / S, 0.0)
    u, _rows_u1 = uniform_pair(seed, pos + j, j * 0)
    if HAS_Q:
        qx = tl.load(q_ptr + (start + j).to(tl.int64) * stride_q + xi, mask=valid, other=0.0).to(tl.float32)
        accept = u * qx < px
    else:
        accept = u < px
    accept = valid & tl.where(random, accept, xi == g)
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
        if HAS_Q:
            if excl >= 0:
                # residual max(p - q, 0): one pass for chunk masses, one chunk to place u
                q_row = q_ptr + (start + n_acc).to(tl.int64) * stride_q
                wr = _residual_masses(l_row, q_row, V, NC, t, thr_n, M_n, S_n, q_row, 0, 1.0, HAS_THR, CHUNK, NC_P2)
                token = _sample_residual(l_row, q_row, wr, u_s, V, t, thr_n, M_n, S_n, q_row, 0, 1.0,
                                         HAS_THR, CHUNK, NC_P2)
        if token < 0:
            token = _sample_p(l_row, V, t, thr_n, M_n, w_n, excl, u_s, g_n, HAS_THR, CHUNK, NC_P2)
    out = tl.where(j < n_acc, xi, tl.where(pick, token, -1))
    tl.store(out_ptr + b * W + j, out, mask=j < W)
    tl.store(num_ptr + b, n_acc)


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
    tl.store(acc_ptr + b * D + cols, -1, mask=cols < D)
    tl.store(out_ptr + b * D + cols, -1, mask=cols < D)
    n0 = tl.load(cu_ptr + b)
    n = tl.load(cu_ptr + b + 1) - n0
    ok = (n0 >= 0) & (n >= 1) & (n0 + n <= T)
    n0 = tl.where(ok, n0, 0)
    n = tl.where(ok, n, 0)
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


# ---------------------------------------------------------------------------- launchers


def _row_stats_pass(target_logits, cu, extra, temperature, top_k, top_p, chunk):
    """Launch kernels 1 (if filtering) and 2 for all rows; returns (thr, stats, amax, NC)."""
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
    stats = torch.empty((3, R, NC), dtype=torch.float32, device=dev)
    amax = torch.empty((R, NC), dtype=torch.int32, device=dev)
    _chunk_stats_kernel[(R, NC)](
        target_logits, target_logits.stride(0), cu, temperature, thr if thr is not None else temperature,
        stats, amax, B, R, V, NC,
        ROW_EXTRA=extra, HAS_THR=thr is not None, CHUNK=chunk, num_warps=8 if chunk >= 2048 else 4)
    return thr, stats, amax, NC


def rejection_sample(target_logits, draft_tokens, cu_num_draft, draft_probs, temperature, top_k, top_p, seed,
                     positions, max_draft_len, *, chunk_size=None):
    """Triton backend of :func:`fastverify.rejection_sample` (arguments as there;
    unchecked — call through the op). ``chunk_size`` overrides the chunk width."""
    R, V = target_logits.shape
    B = cu_num_draft.numel() - 1
    chunk = chunk_size or default_chunk(V)
    thr, stats, amax, NC = _row_stats_pass(target_logits, cu_num_draft, 1, temperature, top_k, top_p, chunk)
    out = torch.empty((B, max_draft_len + 1), dtype=torch.int32, device=target_logits.device)
    num = torch.empty(B, dtype=torch.int32, device=target_logits.device)
    q = draft_probs if draft_probs is not None else target_logits
    _chain_finalize_kernel[(B,)](
        target_logits, target_logits.stride(0), q, q.stride(0), draft_tokens, cu_num_draft, temperature, seed,
        positions, thr if thr is not None else temperature, stats, amax, out, num, R, draft_tokens.numel(), V, NC,
        max_draft_len,
        HAS_Q=draft_probs is not None, HAS_THR=thr is not None, CHUNK=chunk,
        NC_P2=triton.next_power_of_2(NC), W_P2=triton.next_power_of_2(max_draft_len + 1), num_warps=4)
    return out, num


def tree_rejection_sample(target_logits, tree_tokens, parents, cu_num_nodes, draft_probs, temperature, top_k, top_p,
                          seed, positions, max_depth, *, chunk_size=None):
    """Triton backend of :func:`fastverify.tree_rejection_sample` (unchecked)."""
    T, V = target_logits.shape
    B = cu_num_nodes.numel() - 1
    dev = target_logits.device
    chunk = chunk_size or default_chunk(V)
    thr, stats, amax, NC = _row_stats_pass(target_logits, cu_num_nodes, 0, temperature, top_k, top_p, chunk)
    D = max_depth + 1
    accepted = torch.empty((B, D), dtype=torch.int32, device=dev)
    out = torch.empty((B, D), dtype=torch.int32, device=dev)
    num = torch.empty(B, dtype=torch.int32, device=dev)
    ws = torch.empty((T + 1, 2), dtype=torch.float32, device=dev) if draft_probs is not None else stats
    q = draft_probs if draft_probs is not None else target_logits
    _tree_finalize_kernel[(B,)](
        target_logits, target_logits.stride(0), q, q.stride(0), tree_tokens, parents, cu_num_nodes, temperature,
        seed, positions, thr if thr is not None else temperature, stats, amax, ws, accepted, out, num,
        T, V, NC, max_depth,
        HAS_Q=draft_probs is not None, HAS_THR=thr is not None, CHUNK=chunk,
        NC_P2=triton.next_power_of_2(NC), D_P2=triton.next_power_of_2(D), NODE_BLOCK=64, num_warps=4)
    return accepted, out, num
