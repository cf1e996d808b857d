"""Naive oracles: plain Python loops over float64 lists, written from the design
contract without reusing any fastverify code.

They implement the same contract as the ops — including the counter-based RNG, so
for the same seeds they emit the same tokens (up to float32-vs-float64 rounding at a
boundary, which the tests' random inputs make vanishingly unlikely).
"""

from __future__ import annotations

import math

# ----------------------------------------------------------------------------- RNG

_M = 0xFFFFFFFF


def philox(key: int, counter: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """Philox4x32-10 with Python integers (Random123 reference algorithm)."""
    k0, k1 = key & _M, (key >> 32) & _M
    c0, c1, c2, c3 = counter
    for _ in range(10):
        p0 = 0xD2511F53 * c0
        p1 = 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & _M, p1 & _M, ((p0 >> 32) ^ c3 ^ k1) & _M, p0 & _M
        k0, k1 = (k0 + 0x9E3779B9) & _M, (k1 + 0xBB67AE85) & _M
    return c0, c1, c2, c3


def uniforms(seed: int, position: int, attempt: int = 0) -> tuple[float, float]:
    """(acceptance uniform, sampling uniform) at (seed, position, attempt)."""
    seed &= (1 << 64) - 1
    o = philox(seed, (position & _M, (position >> 32) & _M, attempt & _M, 0))
    return (o[0] >> 8) / 2.0**24, (o[1] >> 8) / 2.0**24


# ----------------------------------------------------------------------------- target distribution


def clean(row) -> list[float]:
    return [float("-inf") if math.isnan(x) else float(x) for x in row]


def argmax(row) -> int:
    row = clean(row)
    best = 0
    for i, x in enumerate(row):
        if x > row[best]:
            best = i
    return best


def target_probs(row, temperature: float, top_k: int = 0, top_p: float = 1.0) -> list[float]:
    """Processed target distribution (float64): softmax(l / T) restricted to the
    top_k largest logits (ties at the k-th kept), then to the tokens v whose
    renormalized mass strictly above them is < top_p (the crossing token and ties kept).
    A row with no finite logit gives all zeros."""
    l = clean(row)
    V = len(l)
    z = [min(x / temperature, 3.4028234663852886e38) if x > float("-inf") else x for x in l]
    keep = [True] * V
    if 0 < top_k < V:
        kth = sorted(l, reverse=True)[top_k - 1]
        keep = [x >= kth for x in l]
    finite = [zi for zi, k in zip(z, keep) if k and zi > float("-inf")]
    if not finite:
        return [0.0] * V
    m = max(finite)
    e = [math.exp(zi - m) if k and zi > float("-inf") else 0.0 for zi, k in zip(z, keep)]
    s = sum(e)
    p = [x / s for x in e]
    if top_p < 1.0:
        keep_p = [pi > 0 and sum(pj for pj in p if pj > pi) < top_p for pi in p]
        p = [pi if k else 0.0 for pi, k in zip(p, keep_p)]
        s = sum(p)
        p = [x / s for x in p]
    return p


def draw(w, u: float, fallback: int) -> int:
    """Inverse CDF in vocabulary order: first index whose running sum exceeds u·Σw."""
    total = sum(w)
    run = 0.0
    for i, x in enumerate(w):
        run += x
        if run > u * total:
            return i
    positive = [i for i, x in enumerate(w) if x > 0]
    return positive[-1] if positive else fallback


# ----------------------------------------------------------------------------- chain


def entropy(p) -> float:
    return -sum(x * math.log(x) for x in p if x > 0)


def block_ratio(prev: float, px: float, qx: float) -> float:
    """p_i = min(p_{i-1} P(x) / Q(x), 1); 0 when the target gives x no mass."""
    num = prev * px
    if num > 0 and num >= qx:
        return 1.0
    return num / qx if qx > 0 else 0.0


def block_h(p_i: float, z_i: float) -> float:
    den = z_i + 1 - p_i
    return z_i / den if den > 0 else 1.0


def rejection_sample(logits, drafts, cu, draft_probs, temperature, top_k, top_p, seed, positions, max_draft_len,
                     verify="token", typical_eps=None, typical_delta=None):
    """Oracle of fastverify.rejection_sample on Python lists; returns (rows, num_accepted)."""
    B = len(cu) - 1
    outs, nums = [], []
    for b in range(B):
        s, K = cu[b], cu[b + 1] - cu[b]
        T = temperature[b]
        kk = top_k[b] if top_k is not None else 0
        pp = top_p[b] if top_p is not None else 1.0
        rows = [logits[s + b + j] for j in range(K + 1)]
        xs = drafts[s:s + K]
        qs = draft_probs[s:s + K] if draft_probs is not None else None
        if T == 0:
            out = []
            for j in range(K + 1):
                g = argmax(rows[j])
                out.append(g)
                if j == K or xs[j] != g:
                    break
        else:
            P = [target_probs(r, T, kk, pp) for r in rows]
            if verify == "block":
                out = _block_chain(P, xs, qs, seed[b], positions[b], [argmax(r) for r in rows])
            elif verify == "typical":
                eps = 0.09 if typical_eps is None else typical_eps[b]
                delta = 0.3 if typical_delta is None else typical_delta[b]
                out = _typical_chain(P, xs, eps, delta, seed[b], positions[b], [argmax(r) for r in rows])
            else:
                out = _token_chain(P, xs, qs, seed[b], positions[b], [argmax(r) for r in rows])
        nums.append(len(out) - 1)
        outs.append(out + [-1] * (max_draft_len + 1 - len(out)))
    return outs, nums


def _without(p, x):
    return [0.0 if i == x else pi for i, pi in enumerate(p)]


def _token_chain(P, xs, qs, seed, pos, g):
    K = len(xs)
    out = []
    for j in range(K + 1):
        u_acc, u_smp = uniforms(seed, pos + j)
        if j == K:
            return out + [draw(P[j], u_smp, g[j])]
        x = xs[j]
        qx = qs[j][x] if qs is not None else 1.0
        if u_acc * qx < P[j][x]:
            out.append(x)
            continue
        w = _without(P[j], x)
        if qs is not None:
            resid = [max(pi - qi, 0.0) for pi, qi in zip(P[j], qs[j])]
            w = resid if sum(resid) > 0 else w
        return out + [draw(w, u_smp, g[j])]


def _block_chain(P, xs, qs, seed, pos, g):
    """Sun et al.'s block verification, as written in the design (docs/ops.md)."""
    K = len(xs)
    p = [1.0]
    for i in range(1, K + 1):
        x = xs[i - 1]
        p.append(block_ratio(p[-1], P[i - 1][x], qs[i - 1][x] if qs is not None else 1.0))
    h = [None]
    for i in range(1, K):
        if qs is not None:
            z = sum(max(p[i] * a - c, 0.0) for a, c in zip(P[i], qs[i]))
        else:
            z = p[i] * (1 - P[i][xs[i]])
        h.append(block_h(p[i], z))
    if K:
        h.append(p[K])
    tau = 0
    for i in range(1, K + 1):
        if uniforms(seed, pos + i - 1)[0] < h[i]:
            tau = i
    u_smp = uniforms(seed, pos + tau)[1]
    if tau == K:
        w = P[K]
    else:
        w = _without(P[tau], xs[tau])
        if qs is not None:
            resid = [max(p[tau] * a - c, 0.0) for a, c in zip(P[tau], qs[tau])]
            w = resid if sum(resid) > 0 else w
    return list(xs[:tau]) + [draw(w, u_smp, g[tau])]


def _typical_chain(P, xs, eps, delta, seed, pos, g):
    """Medusa's typical acceptance (lossy)."""
    thr = [min(eps, delta * math.exp(-entropy(row))) for row in P]
    tau = 0
    while tau < len(xs) and P[tau][xs[tau]] > thr[tau]:
        tau += 1
    w = [pi if pi >= thr[tau] else 0.0 for pi in P[tau]]
    return list(xs[:tau]) + [draw(w, uniforms(seed, pos + tau)[1], g[tau])]


# ----------------------------------------------------------------------------- tree


def tree_rejection_sample(logits, tokens, parents, cu, draft_probs, temperature, top_k, top_p, seed, positions,
                          max_depth, verify="specinfer"):
    """Oracle of fastverify.tree_rejection_sample; returns (accepted_nodes, output_tokens, num_accepted)."""
    B = len(cu) - 1
    accs, outs, nums = [], [], []
    for b in range(B):
        n0, n1 = cu[b], cu[b + 1]
        T = temperature[b]
        kk = top_k[b] if top_k is not None else 0
        pp = top_p[b] if top_p is not None else 1.0
        kids = {i: [j for j in range(i + 1, n1 - n0) if parents[n0 + j] == i] for i in range(n1 - n0)}
        if verify in ("block", "block_wor") and T > 0:
            P = [target_probs(logits[n0 + i], T, kk, pp) for i in range(n1 - n0)]
            acc, out = _multi_path_block(P, draft_probs[n0:n1], tokens[n0:n1], parents[n0:n1], seed[b],
                                         positions[b], verify == "block_wor", [argmax(logits[n0 + i])
                                                                              for i in range(n1 - n0)])
            nums.append(len(out) - 1)
            accs.append(acc + [-1] * (max_depth + 1 - len(acc)))
            outs.append(out + [-1] * (max_depth + 1 - len(out)))
            continue
        node, acc, out = 0, [0], []
        for depth in range(max_depth + 1):
            row = logits[n0 + node]
            _, u_smp = uniforms(seed[b], positions[b] + depth)
            nxt = None
            if T == 0:
                y = argmax(row)
                nxt = next((j for j in kids[node] if tokens[n0 + j] == y), None)
            elif draft_probs is None:
                y = draw(target_probs(row, T, kk, pp), u_smp, argmax(row))
                nxt = next((j for j in kids[node] if tokens[n0 + j] == y), None)
            else:
                r = target_probs(row, T, kk, pp)
                q = draft_probs[n0 + node]
                sigma = 1.0
                for attempt, j in enumerate(kids[node]):
                    x = tokens[n0 + j]
                    u_acc, _ = uniforms(seed[b], positions[b] + depth, attempt)
                    if u_acc * q[x] / sigma < r[x]:
                        nxt = j
                        break
                    r = [max(ri - qi / sigma, 0.0) for ri, qi in zip(r, q)]
                    total = sum(r)
                    r = [ri / total for ri in r] if total > 0 else r
                    sigma -= q[x]
                if nxt is not None:
                    y = tokens[n0 + nxt]
                else:
                    w = r if sum(r) > 0 else target_probs(row, T, kk, pp)
                    y = draw(w, u_smp, argmax(row))
            out.append(y)
            if nxt is None or depth == max_depth:
                break
            node = nxt
            acc.append(node)
        nums.append(len(out) - 1)
        accs.append(acc + [-1] * (max_depth + 1 - len(acc)))
        outs.append(out + [-1] * (max_depth + 1 - len(out)))
    return accs, outs, nums


def _multi_path_block(P, q, tok, par, seed, pos, wor, g):
    """Greedy multi-path block verification of one tree (local lists; P and q per node),
    as the design states it (docs/ops.md). Returns (accepted nodes, emitted tokens)."""
    n = len(par)
    depth = [0] * n
    for i in range(1, n):
        depth[i] = depth[par[i]] + 1
    has_child = set(par[1:])
    paths = []
    for leaf in (i for i in range(n) if i not in has_child):
        path = [leaf]
        while path[-1] != 0:
            path.append(par[path[-1]])
        paths.append(path[::-1])

    def below(path, d):  # Q-mass of the path's tokens after its node at depth d
        return math.prod(q[path[k - 1]][tok[path[k]]] for k in range(d + 1, len(path)))

    def draft_row(u, j):
        row = list(q[u])
        if not wor:
            return row
        rem, total = [0.0] * len(row), 0.0
        for path in paths[:j]:
            if len(path) > depth[u] + 1 and path[depth[u]] == u:
                m = below(path, depth[u])
                rem[tok[path[depth[u] + 1]]] += m
                total += m
        return [(a - r) / (1 - total) if total < 1 else 0.0 for a, r in zip(row, rem)]

    v, R, used, attempt = 0, P[0], set(), 0
    while True:
        j = next((l for l, path in enumerate(paths) if l not in used and len(path) > depth[v] + 1
                  and path[depth[v]] == v), None)
        if j is None:
            return paths_to(v, par), [tok[x] for x in paths_to(v, par)[1:]] + [
                draw(R, uniforms(seed, pos + depth[v])[1], g[v])]
        used.add(j)
        u = paths[j][depth[v]:]
        L = len(u) - 1
        Tr = [R] + [P[x] for x in u[1:]]
        Dr = [draft_row(x, j) for x in u]
        p = [1.0]
        for i in range(1, L + 1):
            x = tok[u[i]]
            p.append(block_ratio(p[-1], Tr[i - 1][x], Dr[i - 1][x]))
        tau = 0
        for i in range(1, L + 1):
            if i < L:
                h = block_h(p[i], sum(max(p[i] * a - c, 0.0) for a, c in zip(Tr[i], Dr[i])))
            else:
                h = p[L]
            if uniforms(seed, pos + depth[v] + i - 1, attempt)[0] < h:
                tau = i
        attempt += 1
        if tau == L:
            leaf = u[L]
            nodes = paths_to(leaf, par)
            return nodes, [tok[x] for x in nodes[1:]] + [draw(P[leaf], uniforms(seed, pos + depth[leaf])[1], g[leaf])]
        resid = [max(p[tau] * a - c, 0.0) for a, c in zip(Tr[tau], Dr[tau])]
        R = [x / sum(resid) for x in resid] if sum(resid) > 0 else Tr[tau]
        v = u[tau]


def paths_to(node, par):
    """Tree-local nodes from the root to ``node``."""
    out = [node]
    while out[-1] != 0:
        out.append(par[out[-1]])
    return out[::-1]


# ----------------------------------------------------------------------------- frequency-ranked LM head

LM_HEAD_STREAM = 1  # counter word c3 of the draft draws; the verification ops use 0


def gumbel(seed: int, position: int, row: int) -> float:
    """Gumbel noise of subset row ``row`` for the draw at (seed, position):
    u = ((o0 >> 8) + 0.5) / 2^24 in (0, 1), g = -log(-log u)."""
    seed &= (1 << 64) - 1
    o = philox(seed, (position & _M, (position >> 32) & _M, row & _M, LM_HEAD_STREAM))
    u = ((o[0] >> 8) + 0.5) / 2.0**24
    return -math.log(-math.log(u))


def subset_scores(h, w, temperature: float) -> list[float]:
    """logits of one hidden row against every subset row, divided by the temperature
    (temperature <= 0 scores at 1: greedy needs only the order)."""
    t = temperature if temperature > 0 else 1.0
    return [sum(a * b for a, b in zip(h, wr)) / t for wr in w]


def logsumexp(xs) -> float:
    top = max(xs)
    if top == -math.inf:
        return -math.inf
    return top + math.log(sum(math.exp(x - top) for x in xs))


def lm_head_topk(hidden, weight, k: int, token_map=None, temperature=None):
    """-> (ids [M][k] full-vocabulary, logprobs [M][k], lse [M]); ties: lower subset row first."""
    ids, lps, lses = [], [], []
    for m, h in enumerate(hidden):
        s = subset_scores(h, weight, float(temperature[m]) if temperature is not None else 1.0)
        lse = logsumexp(s)
        order = sorted(range(len(s)), key=lambda v: (-s[v], v))[:k]
        ids.append([int(token_map[v]) if token_map is not None else v for v in order])
        lps.append([s[v] - lse for v in order])
        lses.append(lse)
    return ids, lps, lses


def lm_head_sample(hidden, weight, temperature, seed, positions, token_map=None):
    """Gumbel-max draw from softmax(subset logits / T) keyed by (seed[m], positions[m]);
    greedy (argmax, no noise) where T <= 0. -> (ids [M], logprobs [M] of the drawn ids, lse [M])."""
    ids, lps, lses = [], [], []
    for m, h in enumerate(hidden):
        t = float(temperature[m])
        s = subset_scores(h, weight, t)
        lse = logsumexp(s)
        if t > 0:
            noisy = [x + gumbel(int(seed[m]), int(positions[m]), v) for v, x in enumerate(s)]
        else:
            noisy = s
        v = max(range(len(s)), key=lambda j: (noisy[j], -j))
        ids.append(int(token_map[v]) if token_map is not None else v)
        lps.append(s[v] - lse)
        lses.append(lse)
    return ids, lps, lses


# ----------------------------------------------------------------------------- sparse-KV self-speculation
# Inputs may be tensors or nested lists; everything is read into Python floats/ints.


def _py(x):
    return x.tolist() if hasattr(x, "tolist") else x


def _key(cache, table, b: int, p: int, h: int) -> list[float]:
    """K (or V) of KV head h at key position p of request b: page table[b][p // page], slot p % page."""
    page = len(cache[0])
    return cache[table[b][p // page]][p % page][h]


def select_kv_chunks(q, k_cache, block_table, seq_lens, chunk_size: int, num_chunks: int, num_sink_chunks: int = 1,
                     num_recent_chunks: int = 1, chunk_means=None) -> list[list[list[int]]]:
    """-> chunk_ids [B][Hkv][num_chunks]: per (request, KV head), the sinks, the recent
    chunks and the best-scoring others (score = Σ over the group's query heads of q · mean
    key of the chunk; NaN = -inf; ties → lower chunk id), ascending, -1 padded."""
    q, k_cache, table, lens = _py(q), _py(k_cache), _py(block_table), _py(seq_lens)
    means_in = _py(chunk_means) if chunk_means is not None else None
    Hq, Hkv = len(q[0]), len(k_cache[0][0])
    G = Hq // Hkv
    out = []
    for b in range(len(lens)):
        F = lens[b] // chunk_size
        rows = []
        for h in range(Hkv):
            scores = []
            for c in range(F):
                if means_in is not None:
                    mean = means_in[b][c][h]
                else:
                    keys = [_key(k_cache, table, b, c * chunk_size + t, h) for t in range(chunk_size)]
                    mean = [sum(col) / chunk_size for col in zip(*keys)]
                s = sum(sum(a * m for a, m in zip(q[b][h * G + g], mean)) for g in range(G))
                scores.append(-math.inf if math.isnan(s) else s)
            if F <= num_chunks:
                kept = list(range(F))
            else:
                forced = set(range(num_sink_chunks)) | set(range(F - num_recent_chunks, F))
                others = sorted((c for c in range(F) if c not in forced), key=lambda c: (-scores[c], c))
                kept = sorted(forced | set(others[:num_chunks - len(forced)]))
            rows.append(kept + [-1] * (num_chunks - len(kept)))
        out.append(rows)
    return out


def streaming_kv_chunks(seq_lens, chunk_size: int, num_chunks: int, num_sink_chunks: int, num_hkv: int):
    """-> chunk_ids [B][num_hkv][num_chunks]: the first num_sink_chunks chunks and the most
    recent full chunks filling the rest of the budget (all chunks if they fit), -1 padded."""
    out = []
    for L in _py(seq_lens):
        F = L // chunk_size
        if F <= num_chunks:
            kept = list(range(F))
        else:
            kept = list(range(num_sink_chunks)) + list(range(F - (num_chunks - num_sink_chunks), F))
        out.append([kept + [-1] * (num_chunks - len(kept)) for _ in range(num_hkv)])
    return out


def sparse_kv_attention(q, k_cache, v_cache, block_table, seq_lens, chunk_ids, chunk_size: int, sm_scale=None):
    """-> out [B][Hq][D] (float64): query head hq of request b attends to the keys of the
    chunks c in chunk_ids[b][hq // G] with 0 <= c < F_b (others skipped) and to the tail
    F_b·chunk_size .. seq_lens[b] - 1; no key at all gives zeros."""
    q, k_cache, v_cache = _py(q), _py(k_cache), _py(v_cache)
    table, lens, ids = _py(block_table), _py(seq_lens), _py(chunk_ids)
    Hq, D, Hkv = len(q[0]), len(q[0][0]), len(k_cache[0][0])
    G = Hq // Hkv
    scale = D ** -0.5 if sm_scale is None else sm_scale
    out = []
    for b in range(len(lens)):
        F = lens[b] // chunk_size
        rows = []
        for hq in range(Hq):
            h = hq // G
            positions = [c * chunk_size + t for c in ids[b][h] if 0 <= c < F for t in range(chunk_size)]
            positions += list(range(F * chunk_size, lens[b]))
            if not positions:
                rows.append([0.0] * D)
                continue
            s = [scale * sum(a * k for a, k in zip(q[b][hq], _key(k_cache, table, b, p, h))) for p in positions]
            top = max(s)
            w = [math.exp(x - top) for x in s]
            total = sum(w)
            vs = [_key(v_cache, table, b, p, h) for p in positions]
            rows.append([sum(wi * v[d] for wi, v in zip(w, vs)) / total for d in range(D)])
        out.append(rows)
    return out
