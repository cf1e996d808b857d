"""Exact laws of the verification rules, by enumeration (float64, plain Python).

A *toy world* gives the processed target distribution P(· | context) and the drafter's
Q(· | context) for every context of up to a few tokens over a small vocabulary. For a
rule, :func:`chain_law` enumerates every draft the drafter can propose (with its
probability), and for each one the law of what the rule does with it — the accepted
length τ and the emitted token y — from the rule's formulas (the acceptance events' exact
probabilities, not samples). The result is the exact law of the emitted sequence
``(x_1, .., x_τ, y)``. :func:`tree_law` does the same for multi-path trees.

What the tests do with these laws:
- lossless: continuing each emitted sequence with the target one token at a time gives
  exactly the target's autoregressive law of the first m tokens (:func:`continued`);
- never worse: the expected accepted length of one rule against another (:func:`mean_accepted`);
- the ops follow them: the emitted sequences of many replicas pass a chi-squared test
  against the exact law (tests/law.py).

Written from the rules' definitions in docs/ops.md, sharing no code with fastverify.
"""

from __future__ import annotations

import itertools
import math


def normalize(w):
    s = sum(w)
    return [x / s for x in w] if s > 0 else None


def entropy(p) -> float:
    return -sum(x * math.log(x) for x in p if x > 0)


class World:
    """P(ctx) and Q(ctx) for contexts (tuples of tokens) over V tokens."""

    def __init__(self, V: int, P, Q):
        self.V, self.P, self.Q = V, P, Q

    def ar_law(self, m: int) -> dict:
        """The target's law of its first m tokens, sampled one at a time."""
        law = {(): 1.0}
        for _ in range(m):
            law = {seq + (y,): w * py for seq, w in law.items() for y, py in enumerate(self.P(seq)) if w * py > 0}
        return law

    def paths(self, depth: int, ctx=()):
        """Every draft path of ``depth`` tokens after ctx with its probability under Q."""
        out = [((), 1.0)]
        for _ in range(depth):
            out = [(seq + (x,), w * qx) for seq, w in out for x, qx in enumerate(self.Q(ctx + seq)) if w * qx > 0]
        return out


def continued(world: World, law: dict, m: int) -> dict:
    """Law of the first m tokens when every emitted sequence is continued by the target
    one token at a time (a verification step followed by autoregressive decoding)."""
    out: dict = {}
    stack = [(seq, w) for seq, w in law.items()]
    while stack:
        seq, w = stack.pop()
        if len(seq) >= m:
            key = tuple(seq[:m])
            out[key] = out.get(key, 0.0) + w
            continue
        for y, py in enumerate(world.P(tuple(seq))):
            if py > 0:
                stack.append((seq + (y,), w * py))
    return out


def max_gap(a: dict, b: dict) -> float:
    return max(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))


def mean_accepted(law: dict) -> float:
    """E[τ]: every emitted sequence is τ accepted drafts + one token."""
    return sum(w * (len(seq) - 1) for seq, w in law.items())


def _add(law: dict, prefix: tuple, dist, weight: float) -> None:
    if weight <= 0:
        return
    assert dist is not None, "an outcome of positive probability needs a distribution to sample"
    for y, py in enumerate(dist):
        if weight * py > 0:
            law[prefix + (y,)] = law.get(prefix + (y,), 0.0) + weight * py


# ----------------------------------------------------------------------------- chains


def _block_ratios(P, xs, qx):
    p = [1.0]
    for i, x in enumerate(xs):
        num = p[-1] * P[i][x]
        p.append(1.0 if num > 0 and num >= qx[i] else (num / qx[i] if qx[i] > 0 else 0.0))
    return p


def chain_step_law(rule: str, P, Q, xs, *, eps=0.09, delta=0.3) -> list[tuple[int, list[float], float]]:
    """What ``rule`` does with drafts xs (K tokens): [(τ, law of y, probability)].
    P[j] = target after j drafts (j = 0..K); Q[j] = the law x_{j+1} was drawn from, or
    None for a point-mass (deterministic) draft."""
    K = len(xs)
    qx = [1.0 if Q[j] is None else Q[j][xs[j]] for j in range(K)]

    def without(j):
        return normalize([0.0 if v == xs[j] else pv for v, pv in enumerate(P[j])])

    out = []
    if rule == "token":
        reach = 1.0
        for j in range(K):
            a = min(1.0, P[j][xs[j]] / qx[j]) if qx[j] > 0 else (1.0 if P[j][xs[j]] > 0 else 0.0)
            resid = without(j) if Q[j] is None else (normalize([max(p - q, 0.0) for p, q in zip(P[j], Q[j])])
                                                     or without(j))
            out.append((j, resid, reach * (1 - a)))
            reach *= a
        out.append((K, P[K], reach))
    elif rule == "block":
        p = _block_ratios(P, xs, qx)
        h = [None]
        for i in range(1, K):
            z = (p[i] * (1 - P[i][xs[i]]) if Q[i] is None
                 else sum(max(p[i] * a - c, 0.0) for a, c in zip(P[i], Q[i])))
            den = z + 1 - p[i]
            h.append(z / den if den > 0 else 1.0)
        if K:
            h.append(p[K])
        for tau in range(K + 1):
            prob = (h[tau] if tau else 1.0) * math.prod(1 - h[k] for k in range(tau + 1, K + 1))
            if tau == K:
                y = P[K]
            elif Q[tau] is None:
                y = without(tau)
            else:
                y = normalize([max(p[tau] * a - c, 0.0) for a, c in zip(P[tau], Q[tau])]) or without(tau)
            out.append((tau, y, prob))
    elif rule == "typical":
        thr = [min(eps, delta * math.exp(-entropy(row))) for row in P]
        tau = 0
        while tau < K and P[tau][xs[tau]] > thr[tau]:
            tau += 1
        out.append((tau, normalize([pv if pv >= thr[tau] else 0.0 for pv in P[tau]]), 1.0))
    else:
        raise ValueError(rule)
    return out


def chain_law(world: World, rule: str, K: int, *, point_mass_drafts=None, **rule_args) -> dict:
    """Exact law of the emitted sequence of one chain step. Drafts are drawn from Q, or,
    with ``point_mass_drafts`` (a function ctx -> token), are that deterministic token and
    verified as point masses (draft_probs=None)."""
    if point_mass_drafts is not None:
        xs = ()
        for _ in range(K):
            xs += (point_mass_drafts(xs),)
        drafts = [(xs, 1.0)]
    else:
        drafts = world.paths(K)
    law: dict = {}
    for xs, wx in drafts:
        P = [world.P(xs[:j]) for j in range(K + 1)]
        Q = [None if point_mass_drafts is not None else world.Q(xs[:j]) for j in range(K)]
        for tau, y, prob in chain_step_law(rule, P, Q, xs, **rule_args):
            _add(law, tuple(xs[:tau]), y, wx * prob)
    return law


# ----------------------------------------------------------------------------- multi-path trees


def _path_sets(world: World, n: int, depth: int, wor: bool):
    """Every ordered n-tuple of draft paths with its probability: i.i.d. from Q, or drawn
    one after the other without replacement (each from Q restricted to the paths not yet
    drawn: the law of Gumbel-top-n in score order)."""
    paths = world.paths(depth)
    for combo in itertools.product(range(len(paths)), repeat=n):
        if wor and len(set(combo)) < n:
            continue
        w, used = 1.0, 0.0
        for i in combo:
            qi = paths[i][1]
            w *= qi / (1 - used) if wor else qi
            used += qi
        if w > 0:
            yield [paths[i][0] for i in combo], w


def gbv_step_law(world: World, paths: list[tuple], wor: bool) -> dict:
    """Law of the emitted sequence of greedy multi-path block verification over the given
    paths (in order), from the rule's definition (docs/ops.md):

    at node v with residual target R: take the first unused path through v; run block
    verification along it from v with first-row target R, deeper rows P, draft rows D (Q,
    or for paths drawn without replacement Q with the mass of every earlier path removed and
    renormalized); τ = its accepted length; τ = L: accept the whole path, y ~ P(leaf); else
    move to the node after τ accepted tokens with R ← normalize(max(p_τ T_τ − D_τ, 0)).
    No path left through v: y ~ R."""
    V = world.V
    law: dict = {}

    def draft_row(u: tuple, j: int):
        """D at node u for path j: Q(· | u), minus the earlier paths' mass below u if wor."""
        q = list(world.Q(u))
        if not wor:
            return q
        rem, total = [0.0] * V, 0.0
        for i in range(j):
            if paths[i][:len(u)] == u:
                m = math.prod(world.Q(paths[i][:k])[paths[i][k]] for k in range(len(u), len(paths[i])))
                rem[paths[i][len(u)]] += m
                total += m
        return [(a - r) / (1 - total) if total < 1 else 0.0 for a, r in zip(q, rem)]

    def explore(v: tuple, R, used: frozenset, weight: float):
        j = next((i for i in range(len(paths)) if i not in used and paths[i][:len(v)] == v), None)
        if j is None:
            _add(law, v, R, weight)
            return
        xs = paths[j][len(v):]
        L = len(xs)
        T = [R] + [world.P(v + xs[:i]) for i in range(1, L + 1)]
        D = [draft_row(v + xs[:i], j) for i in range(L)]
        p = _block_ratios(T, xs, [D[i][xs[i]] for i in range(L)])
        h = [None] + [None] * L
        for i in range(1, L):
            z = sum(max(p[i] * a - c, 0.0) for a, c in zip(T[i], D[i]))
            den = z + 1 - p[i]
            h[i] = z / den if den > 0 else 1.0
        h[L] = p[L]
        for tau in range(L + 1):
            prob = (h[tau] if tau else 1.0) * math.prod(1 - h[k] for k in range(tau + 1, L + 1))
            if prob <= 0:
                continue
            if tau == L:
                _add(law, paths[j], world.P(paths[j]), weight * prob)
                continue
            u = v + xs[:tau]
            nxt = normalize([max(p[tau] * a - c, 0.0) for a, c in zip(T[tau], D[tau])]) or T[tau]
            explore(u, nxt, used | {j}, weight * prob)

    explore((), world.P(()), frozenset(), 1.0)
    return law


def tree_law(world: World, n: int, depth: int, *, wor: bool) -> dict:
    """Exact law of the emitted sequence of one multi-path block step over n paths of
    ``depth`` tokens drawn from Q (i.i.d., or without replacement)."""
    law: dict = {}
    for paths, w in _path_sets(world, n, depth, wor):
        for seq, pr in gbv_step_law(world, paths, wor).items():
            law[seq] = law.get(seq, 0.0) + w * pr
    return law


def single_path_block_law(world: World, depth: int) -> dict:
    """Block verification of the first path alone (the multi-path rule's baseline)."""
    return chain_law(world, "block", depth)
