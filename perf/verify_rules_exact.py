"""Every verification rule on the same recorded draft steps of the real model, by exact
expectation — a paired comparison without sampling noise:

    python perf/verify_rules_exact.py [--temperatures 0.7,1.0] [--chain 4,8] [--paths 2,3,4] [--depth 4]
                                      [--seeds 0,1] [--new 64] [--tag NAME]

An end-to-end run (perf/verify_rules_e2e.py) measures each rule on its own trajectory, so
two rules see different drafts after their first different step, and 500 tokens give
tokens-per-forward to about ±0.05: too coarse for gains of a few hundredths. Here one
generation per draft kind (SmolLM2-135M, layer-skip drafter with its draft probabilities,
the four compare prompts, each seed) records every verification step's target
distributions (processed exactly as the ops process them), drafts and draft
probabilities; then each rule's *expected* accepted drafts on that step are computed
exactly (float64, from the rules' formulas in docs/ops.md):

- chains of K drafts: ``token`` (Σ_i Π_{j≤i} min(1, P/Q)), ``block`` (Σ_i 1 − Π_{k≥i}(1 − h_k)),
  ``typical`` (deterministic, lossy);
- n i.i.d. paths: ``specinfer`` (recursive rejection over the trie, children in order of
  first appearance), ``block`` (multi-path block verification, by recursion over each
  attempt's accepted length), and ``block`` of the first path alone;
- n paths drawn without replacement: ``block_wor``, and block verification of the first path alone.

Reported: the mean over steps of the exact expected tokens per target forward (1 + E[accepted])
and its standard error, and the mean paired difference to the group's first rule with its
standard error. Writes perf/results/verify-rules-exact-<device>[-<tag>].{md,json}.
"""

import argparse
import json
import math
import os
import sys
import time
from importlib import import_module

import torch

from fastverify import bench, compare
from fastverify.decoding import encode_prompts, generate
from fastverify.models import load
from fastverify.ops.rejection import _Target
from fastverify.ops._common import row_requests

gen_module = import_module("fastverify.decoding.generate")


# --------------------------------------------------------------------------- recording


def processed(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The target distributions the ops verify against (float64 rows)."""
    R = logits.shape[0]
    row_req = torch.zeros(R, dtype=torch.long)
    t = torch.tensor([temperature])
    return _Target(logits.float().cpu(), row_req, t, None, None).probs(torch.arange(R)).double()


def record(model, prompts, seeds, temperature, options) -> list[dict]:
    """Every verification step of the runs: chains {P [K+1, V], Q [K, V], x [K]}; trees
    {P [T, V], Q [T, V], tokens [T], parents [T]} (batch 1)."""
    steps = []
    chain_op, tree_op = gen_module.ops.rejection_sample, gen_module.ops.tree_rejection_sample

    def chain_spy(logits, drafts, cu, **kw):
        if drafts.numel() and kw.get("draft_probs") is not None:
            steps.append(dict(P=processed(logits, temperature), Q=kw["draft_probs"].double().cpu(),
                              x=drafts.long().cpu()))
        return chain_op(logits, drafts, cu, **kw)

    def tree_spy(logits, tokens, parents, cu, **kw):
        if tokens.numel() > 1:
            steps.append(dict(P=processed(logits, temperature), Q=kw["draft_probs"].double().cpu(),
                              tokens=tokens.long().cpu(), parents=parents.long().cpu()))
        return tree_op(logits, tokens, parents, cu, **kw)

    gen_module.ops.rejection_sample, gen_module.ops.tree_rejection_sample = chain_spy, tree_spy
    try:
        for prompt in prompts:
            for seed in seeds:
                generate(model, [prompt], temperature=temperature, seed=seed, **options)
    finally:
        gen_module.ops.rejection_sample, gen_module.ops.tree_rejection_sample = chain_op, tree_op
    return steps


# --------------------------------------------------------------------------- exact expectations


def ratio(prev: float, px: float, qx: float) -> float:
    num = prev * px
    if num > 0 and num >= qx:
        return 1.0
    return num / qx if qx > 0 else 0.0


def chain_expect(step: dict, rule: str, eps=0.09, delta=0.3) -> float:
    P, Q, x = step["P"], step["Q"], step["x"].tolist()
    K = len(x)
    px = [float(P[j, x[j]]) for j in range(K)]
    qx = [float(Q[j, x[j]]) for j in range(K)]
    if rule == "token":
        e, reach = 0.0, 1.0
        for j in range(K):
            reach *= min(1.0, px[j] / qx[j]) if qx[j] > 0 else float(px[j] > 0)
            e += reach
        return e
    if rule == "typical":
        tau = 0
        while tau < K:
            row = P[tau]
            H = -float(torch.where(row > 0, row * torch.log(row), 0.0).sum())
            if not px[tau] > min(eps, delta * math.exp(-H)):
                break
            tau += 1
        return float(tau)
    p = [1.0]
    for j in range(K):
        p.append(ratio(p[-1], px[j], qx[j]))
    h = [None]
    for i in range(1, K):
        z = float((p[i] * P[i] - Q[i]).clamp(min=0).sum())
        den = z + 1 - p[i]
        h.append(z / den if den > 0 else 1.0)
    h.append(p[K])
    return sum(1 - math.prod(1 - h[k] for k in range(i, K + 1)) for i in range(1, K + 1))


class Trie:
    """A recorded tree: depth, children in node order, root-to-leaf paths (leaves in order)."""

    def __init__(self, step: dict):
        self.P, self.Q = step["P"], step["Q"]
        self.tok = step["tokens"].tolist()
        par = step["parents"].tolist()
        n = len(par)
        self.par = par
        self.depth = [0] * n
        self.kids = [[] for _ in range(n)]
        for j in range(1, n):
            self.depth[j] = self.depth[par[j]] + 1
            self.kids[par[j]].append(j)
        self.paths = []
        for leaf in (j for j in range(n) if not self.kids[j]):
            path = [leaf]
            while path[-1] != 0:
                path.append(par[path[-1]])
            self.paths.append(path[::-1])

    def edge(self, node: int) -> float:
        return float(self.Q[self.par[node], self.tok[node]])


def specinfer_expect(t: Trie) -> float:
    """E[accepted depth] of recursive rejection: children tried in node order (a repeated
    leaf — a path drawn twice — counts once: the op reads de-duplicated children)."""
    def walk(node: int, r: torch.Tensor) -> float:
        q = t.Q[node]
        sigma, reach, e, seen = 1.0, 1.0, 0.0, set()
        for c in t.kids[node]:
            x = t.tok[c]
            if x in seen:
                continue
            seen.add(x)
            qx = float(q[x])
            acc = min(1.0, float(r[x]) * sigma / qx) if qx > 0 else float(r[x] > 0)
            if acc > 0:
                e += reach * acc * walk(c, t.P[c])
            reach *= 1 - acc
            if reach <= 1e-12:
                return e
            nxt = (r - q / max(sigma, 1e-30)).clamp(min=0)
            r = nxt / nxt.sum() if nxt.sum() > 0 else nxt
            sigma -= qx
        return e + reach * t.depth[node]
    return walk(0, t.P[0])


def gbv_expect(t: Trie, wor: bool, first_only: bool = False) -> float:
    """E[accepted depth] of greedy multi-path block verification over the recorded paths
    (``first_only``: block verification of the first path alone)."""
    paths = t.paths[:1] if first_only else t.paths

    def draft_row(u: int, j: int) -> torch.Tensor:
        row = t.Q[u]
        if not wor:
            return row
        du = t.depth[u]
        rem = torch.zeros_like(row)
        total = 0.0
        for path in paths[:j]:
            if len(path) > du + 1 and path[du] == u:
                m = math.prod(t.edge(path[k]) for k in range(du + 1, len(path)))
                rem[t.tok[path[du + 1]]] += m
                total += m
        return (row - rem) / (1 - total) if total < 1 else torch.zeros_like(row)

    def explore(v: int, R: torch.Tensor, used: frozenset, weight: float) -> float:
        j = next((i for i, path in enumerate(paths) if i not in used and len(path) > t.depth[v] + 1
                  and path[t.depth[v]] == v), None)
        if j is None:
            return weight * t.depth[v]
        u = paths[j][t.depth[v]:]
        L = len(u) - 1
        T = [R] + [t.P[x] for x in u[1:]]
        D = [draft_row(x, j) for x in u]
        p = [1.0]
        for i in range(1, L + 1):
            p.append(ratio(p[-1], float(T[i - 1][t.tok[u[i]]]), float(D[i - 1][t.tok[u[i]]])))
        h = [None] * (L + 1)
        for i in range(1, L):
            z = float((p[i] * T[i] - D[i]).clamp(min=0).sum())
            den = z + 1 - p[i]
            h[i] = z / den if den > 0 else 1.0
        h[L] = p[L]
        e = 0.0
        for tau in range(L + 1):
            prob = (h[tau] if tau else 1.0) * math.prod(1 - h[k] for k in range(tau + 1, L + 1))
            if prob * weight <= 1e-12:
                continue
            if tau == L:
                e += weight * prob * t.depth[u[L]]
                continue
            resid = (p[tau] * T[tau] - D[tau]).clamp(min=0)
            nxt = resid / resid.sum() if resid.sum() > 0 else T[tau]
            e += explore(u[tau], nxt, used | {j}, weight * prob)
        return e

    return explore(0, t.P[0], frozenset(), 1.0)


# --------------------------------------------------------------------------- report


def summarize(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / max(n - 1, 1)
    return mean, math.sqrt(var / n)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--temperatures", default="0.7,1.0")
    p.add_argument("--chain", default="4,8")
    p.add_argument("--paths", default="2,3,4")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--tag", default="")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load(args.model)
    prompts = encode_prompts(model, list(compare.PROMPTS.values()))
    seeds = [int(s) for s in args.seeds.split(",")]
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    started = time.perf_counter()
    groups = []
    for temperature in (float(t) for t in args.temperatures.split(",")):
        plan = [(f"chain K={k}", dict(method="chain", drafter="layerskip", num_draft=k, verify="block",
                                      adaptive=False, max_new_tokens=args.new),
                 [("token", lambda s: chain_expect(s, "token")), ("block", lambda s: chain_expect(s, "block")),
                  ("typical (LOSSY)", lambda s: chain_expect(s, "typical"))])
                for k in (int(k) for k in args.chain.split(","))]
        for n in (int(n) for n in args.paths.split(",")):
            tree = dict(method="tree", drafter="layerskip", tree_paths=n, tree_depth=args.depth,
                        max_new_tokens=args.new)
            plan.append((f"{n} i.i.d. paths x {args.depth}", dict(tree, verify="block"),
                         [("block, first path only", lambda s: gbv_expect(Trie(s), False, True)),
                          ("specinfer", lambda s: specinfer_expect(Trie(s))),
                          ("block", lambda s: gbv_expect(Trie(s), False))]))
            plan.append((f"{n} paths w/o replacement x {args.depth}", dict(tree, verify="block_wor"),
                         [("block, first path only", lambda s: gbv_expect(Trie(s), True, True)),
                          ("block_wor", lambda s: gbv_expect(Trie(s), True))]))
        for group, options, rules in plan:
            steps = record(model, prompts, seeds, temperature, options)
            values = {name: [1 + f(s) for s in steps] for name, f in rules}
            base = values[rules[0][0]]
            rows = []
            for name, _ in rules:
                mean, se = summarize(values[name])
                dmean, dse = summarize([a - b for a, b in zip(values[name], base)])
                rows.append(dict(rule=name, mean=mean, se=se, diff=dmean, diff_se=dse))
                log(f"T={temperature:<4} {group:<28} {name:<24} {mean:5.3f} ± {se:.3f} tokens/forward  "
                    f"({dmean:+.3f} ± {dse:.3f} vs {rules[0][0]})  [{time.perf_counter() - started:.0f}s]")
            groups.append(dict(temperature=temperature, group=group, steps=len(steps), rows=rows))
    report = dict(groups=groups, model=args.model, seeds=seeds, new_tokens=args.new, depth=args.depth,
                  device=bench.device_name(model.device), git=bench.git_revision(),
                  command="python " + " ".join(sys.argv), elapsed_s=time.perf_counter() - started)
    stem = os.path.join(args.out, f"verify-rules-exact-{bench.core.device_slug(model.device)}"
                        + (f"-{args.tag}" if args.tag else ""))
    os.makedirs(args.out, exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=2)
    md = render(report)
    with open(stem + ".md", "w") as f:
        f.write(md + "\n")
    print(md)
    return 0


def render(report: dict) -> str:
    lines = [f"# Verification rules on recorded steps of {report['model']}: exact expected tokens per forward",
             "", f"command: `{report['command']}`  ", f"git: {report['git']}  ",
             f"{report['device']}; the four compare prompts x seeds {report['seeds']}, up to {report['new_tokens']} "
             "new tokens each, batch 1; layer-skip drafter with its draft probabilities. Each value is the mean over "
             "the recorded steps of the rule's exact expected tokens per target forward on that step (1 + E[accepted "
             "drafts]), ± its standard error; the difference column is paired (the same steps).", "",
             "| temperature | drafts | steps | rule | tokens per target forward | vs the group's first rule |",
             "|---:|---|---:|---|---:|---:|"]
    for g in report["groups"]:
        for i, r in enumerate(g["rows"]):
            diff = "–" if i == 0 else f"{r['diff']:+.3f} ± {r['diff_se']:.3f}"
            lines.append(f"| {g['temperature']} | {g['group']} | {g['steps']} | {r['rule']} | "
                         f"{r['mean']:.3f} ± {r['se']:.3f} | {diff} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
