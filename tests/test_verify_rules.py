"""The verification rules (``verify=``) proven on exact laws, and every backend held to them.

1. The rules themselves (tests/exact_law.py: float64 enumeration over small vocabularies and
   depths, from the rules' definitions): "token" and "block" on chains, greedy multi-path
   block verification on trees (paths i.i.d. or without replacement) emit sequences that,
   continued by the target one token at a time, have exactly the target's autoregressive
   law (temperature, top-k and top-p included); "typical" does not (lossy, as labelled);
   "block" never accepts fewer tokens on average than "token", multi-path never fewer than
   block verification of its first path, and all of them coincide at temperature 0.
2. The ops follow those laws: the emitted sequences of many replicas of one step (fixed
   seeds) pass a chi-squared goodness-of-fit test against the exact law, on every backend
   (torch and cpu with 60,000 replicas; the Triton interpreter and the CUDA emulator with fewer).
3. Exact tokens: each rule on each backend equals the naive per-seed oracle (naive.py) on
   random ragged batches (tests/test_rejection.py holds the token rule's grid).
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

import exact_law as E
import naive
from conftest import BACKENDS, BACKEND_DEVICES, backend_params
from law import assert_law
from problems import Tree, chain_problem, multi_path_problem, path_trie
from test_rejection import GPU, GPU_BACKENDS, assert_same, capture_graph, reference, refill, run

import fastverify

pytestmark = pytest.mark.family("rejection")


# ----------------------------------------------------------------------------- toy worlds


class Toy:
    """A target and a drafter over V tokens for every context up to ``depth`` tokens:
    raw target logits L(ctx) (processed with temperature / top-k / top-p into P, exactly as
    the ops do) and a drafter Q(ctx) = softmax(L(ctx) / T + noise) that roughly agrees."""

    def __init__(self, V: int, seed: int, *, temperature=1.0, top_k=0, top_p=1.0, noise=1.0, scale=1.6):
        self.V, self.seed = V, seed
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.noise, self.scale = noise, scale
        self._l, self._q = {}, {}
        self.world = E.World(V, self.P, self.Q)

    def logits(self, ctx: tuple) -> list[float]:
        if ctx not in self._l:
            r = random.Random(f"{self.seed}/p/{ctx}")
            self._l[ctx] = [r.gauss(0, self.scale) for _ in range(self.V)]
        return self._l[ctx]

    def P(self, ctx: tuple) -> list[float]:
        l = self.logits(ctx)
        if self.temperature == 0:
            return [1.0 if i == naive.argmax(l) else 0.0 for i in range(self.V)]
        return naive.target_probs(l, self.temperature, self.top_k, self.top_p)

    def Q(self, ctx: tuple) -> list[float]:
        if ctx not in self._q:
            r = random.Random(f"{self.seed}/q/{ctx}")
            t = self.temperature or 1.0
            z = [a / t + self.noise * r.gauss(0, 1) for a in self.logits(ctx)]
            m = max(z)
            e = [math.exp(v - m) for v in z]
            self._q[ctx] = [v / sum(e) for v in e]
        return self._q[ctx]

    def sampling(self, B: int, device) -> dict:
        return dict(temperature=torch.full((B,), float(self.temperature), device=device),
                    top_k=torch.full((B,), self.top_k, dtype=torch.int32, device=device) if self.top_k else None,
                    top_p=torch.full((B,), float(self.top_p), device=device) if self.top_p < 1 else None,
                    seed=torch.arange(B, dtype=torch.long, device=device) * 7919 + 11,
                    positions=torch.full((B,), 5000, dtype=torch.long, device=device))


SAMPLING = {
    "t1": dict(),
    "t07_topk3": dict(temperature=0.7, top_k=3),
    "t13_topp": dict(temperature=1.3, top_p=0.8),
}


def lossless_gap(toy: Toy, law: dict, m: int = 3) -> float:
    """Largest difference between the law of the first m tokens (the step, then the target
    token by token) and the target's autoregressive law."""
    return max(E.max_gap(E.continued(toy.world, law, k), toy.world.ar_law(k)) for k in range(1, m + 1))


def point_mass(toy: Toy):
    """A deterministic drafter: the drafter's most likely token (draft_probs=None)."""
    return lambda xs: max(range(toy.V), key=lambda v: toy.Q(xs)[v])


# ----------------------------------------------------------------------------- 1. the rules, exactly


@pytest.mark.parametrize("sampling", list(SAMPLING))
@pytest.mark.parametrize("drafts", ["draft_probs", "point_mass"])
@pytest.mark.parametrize("rule", ["token", "block"])
def test_chain_rule_is_lossless(rule, drafts, sampling):
    for seed in range(3):
        toy = Toy(4, seed, **SAMPLING[sampling])
        pm = point_mass(toy) if drafts == "point_mass" else None
        law = E.chain_law(toy.world, rule, 3, point_mass_drafts=pm)
        assert abs(sum(law.values()) - 1) < 1e-12
        assert lossless_gap(toy, law) < 1e-12, f"{rule} is not lossless (seed {seed})"


def test_typical_is_lossy():
    """Medusa's typical acceptance trades exactness for acceptance: labelled lossy."""
    toy = Toy(4, 0)
    law = E.chain_law(toy.world, "typical", 3)
    assert lossless_gap(toy, law) > 0.05
    assert E.mean_accepted(law) > E.mean_accepted(E.chain_law(toy.world, "token", 3))


@pytest.mark.parametrize("wor", [False, True], ids=["iid", "without_replacement"])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_multi_path_block_is_lossless(n, wor):
    for seed, (V, sampling) in enumerate([(3, "t1"), (4, "t07_topk3"), (3, "t13_topp")]):
        toy = Toy(V, 10 + seed, **SAMPLING[sampling])
        law = E.tree_law(toy.world, n, 2, wor=wor)
        assert abs(sum(law.values()) - 1) < 1e-12
        assert lossless_gap(toy, law) < 1e-12, f"n={n} wor={wor} is not lossless (seed {seed})"


def test_multi_path_rules_need_their_own_path_law():
    """Negative control: verifying paths drawn without replacement as if i.i.d. (or the
    reverse) is not lossless, so the two rules are not interchangeable."""
    toy = Toy(4, 0)
    for drawn_wor, rule_wor in ((True, False), (False, True)):
        law: dict = {}
        for paths, w in E._path_sets(toy.world, 3, 2, drawn_wor):
            for seq, pr in E.gbv_step_law(toy.world, paths, rule_wor).items():
                law[seq] = law.get(seq, 0.0) + w * pr
        assert lossless_gap(toy, law, 2) > 1e-3


def random_toys(count: int, V: int = 4):
    rng = random.Random(7)
    for i in range(count):
        yield Toy(V, 100 + i, temperature=rng.choice([0.5, 1.0, 1.5]), noise=rng.choice([0.3, 1.0, 2.0]),
                  top_k=rng.choice([0, 0, 3]))


def test_block_never_accepts_fewer_than_token():
    gains = []
    for toy in random_toys(12):
        token = E.mean_accepted(E.chain_law(toy.world, "token", 3))
        block = E.mean_accepted(E.chain_law(toy.world, "block", 3))
        assert block >= token - 1e-12
        gains.append(block - token)
    assert max(gains) > 0.02, "block verification should gain somewhere on these families"


def test_multi_path_never_accepts_fewer_than_block_on_its_first_path():
    for toy in random_toys(4, V=3):
        single = E.mean_accepted(E.single_path_block_law(toy.world, 2))
        for wor in (False, True):
            for n in (2, 3):
                assert E.mean_accepted(E.tree_law(toy.world, n, 2, wor=wor)) >= single - 1e-12


def test_rules_coincide_at_temperature_zero():
    """Greedy target (one-hot P): block verification accepts exactly what the token rule
    does — the longest run of drafts equal to the argmax — and emits the argmax."""
    for seed in range(4):
        toy = Toy(4, seed, temperature=0)
        for pm in (None, point_mass(toy)):
            token = E.chain_law(toy.world, "token", 3, point_mass_drafts=pm)
            block = E.chain_law(toy.world, "block", 3, point_mass_drafts=pm)
            assert E.max_gap(token, block) < 1e-12


# ----------------------------------------------------------------------------- 2. the ops follow the laws


def chain_replicas(toy: Toy, K: int, n: int, draft_probs: bool, seed: int):
    """n replicas of one chain step: drafts drawn from Q (or the drafter's argmax, as point
    masses), target rows L(x_{<j}) for j = 0..K, draft rows Q(x_{<j})."""
    g = torch.Generator().manual_seed(seed)
    if draft_probs:
        paths = toy.world.paths(K)
        pick = torch.multinomial(torch.tensor([w for _, w in paths], dtype=torch.float64), n, replacement=True,
                                 generator=g)
        xs = [paths[i][0] for i in pick.tolist()]
    else:
        fixed, pm = (), point_mass(toy)
        for _ in range(K):
            fixed += (pm(fixed),)
        xs = [fixed] * n
    ctx_rows = {}
    rows = [ctx_rows.setdefault(x[:j], len(ctx_rows)) for x in xs for j in range(K + 1)]
    table = torch.tensor([toy.logits(c) for c in ctx_rows], dtype=torch.float32)
    logits = table[torch.tensor(rows)]
    q = None
    if draft_probs:
        qtable = torch.tensor([toy.Q(c) for c in ctx_rows], dtype=torch.float32)
        q = qtable[torch.tensor([ctx_rows[x[:j]] for x in xs for j in range(K)])]
    drafts = torch.tensor([t for x in xs for t in x])
    cu = torch.arange(n + 1, dtype=torch.int32) * K
    return logits, drafts, cu, q


def emitted_counts(out: torch.Tensor, num: torch.Tensor, law: dict):
    """(counts, law) aligned over every sequence the law or the op produced."""
    seqs = [tuple(r[:k + 1]) for r, k in zip(out.tolist(), num.tolist())]
    keys = sorted(set(law) | set(seqs))
    index = {k: i for i, k in enumerate(keys)}
    counts = np.zeros(len(keys))
    np.add.at(counts, [index[s] for s in seqs], 1)
    return counts, np.array([law.get(k, 0.0) for k in keys])


REPLICAS = 60_000
# On CPU the Triton interpreter takes 50-150 ms per request and the CUDA emulator 2-3 ms
# (100 ms with top-k / top-p): too slow for 60,000 replicas. There both reproduce the torch
# backend's tokens, bit for bit, on the first SAME_AS_TORCH replicas of every case (the
# torch backend's law being tested on all of them); the emulator also runs the
# goodness-of-fit test itself on EMULATED_REPLICAS replicas of the unfiltered cases; the rest
# is gpu_sized (the GPU runs every backend on all the replicas).
SAME_AS_TORCH = 48
EMULATED_REPLICAS = 4_000
ON_CPU = {b for b in BACKENDS if b not in ("torch", "cpu") and BACKEND_DEVICES[b] != "cuda"}
# the C++ cpu backend runs every replica (like the GPU backends) and also repeats the torch
# backend's tokens on the first SAME_AS_TORCH replicas (the same draws, bit for bit)
SAME_AS_TORCH_BACKENDS = sorted(ON_CPU | ({"cpu"} & set(BACKENDS)))


def replicas(backend: str) -> int:
    return EMULATED_REPLICAS if backend in ON_CPU else REPLICAS


def law_params(cases: dict, unfiltered):
    """(backend, case) params: the emulator runs the unfiltered cases on CPU."""
    return backend_params(list(cases), kernel_runs=lambda backend, row: backend not in ON_CPU or (
        backend == "cuda" and unfiltered(cases[row[0]])))


CHAIN_LAW_CASES = {
    # name: (rule, draft_probs, sampling, K)
    "block_draft_probs": ("block", True, "t1", 3),
    "block_draft_probs_topk": ("block", True, "t07_topk3", 2),
    "block_point_mass": ("block", False, "t13_topp", 3),
    "typical": ("typical", True, "t1", 3),
    "token_draft_probs": ("token", True, "t1", 3),
}


def chain_law_case(case: str, n: int):
    """(toy, exact law, replicas) of a CHAIN_LAW_CASES entry."""
    rule, with_q, sampling, K = CHAIN_LAW_CASES[case]
    toy = Toy(4, 21 + len(case), **SAMPLING[sampling])
    law = E.chain_law(toy.world, rule, K, point_mass_drafts=None if with_q else point_mass(toy))
    return toy, law, chain_replicas(toy, K, n, with_q, seed=len(case))


def run_chain_replicas(case: str, toy: Toy, replicas, backend: str, n: int):
    rule, _, _, K = CHAIN_LAW_CASES[case]
    logits, drafts, cu, q = replicas
    dev = BACKEND_DEVICES[backend]
    with fastverify.use_backend(backend):
        out, num = fastverify.rejection_sample(
            logits[:n * (K + 1)].to(dev), drafts[:n * K].to(dev), cu[:n + 1].to(dev),
            draft_probs=None if q is None else q[:n * K].to(dev), max_draft_len=K, verify=rule,
            **toy.sampling(n, dev))
    return out.cpu(), num.cpu()


@pytest.mark.parametrize("backend,case", law_params(CHAIN_LAW_CASES, lambda c: c[2] == "t1"))
def test_chain_op_follows_the_exact_law(case, backend):
    n = replicas(backend)
    toy, law, reps = chain_law_case(case, n)
    out, num = run_chain_replicas(case, toy, reps, backend, n)
    counts, expected = emitted_counts(out, num, law)
    assert_law(counts, expected, f"{CHAIN_LAW_CASES[case][0]} emitted sequences")


@pytest.mark.parametrize("backend", SAME_AS_TORCH_BACKENDS)
@pytest.mark.parametrize("case", list(CHAIN_LAW_CASES))
def test_chain_law_replicas_same_as_torch(case, backend):
    toy, _, replicas = chain_law_case(case, SAME_AS_TORCH)
    want = run_chain_replicas(case, toy, replicas, "torch", SAME_AS_TORCH)
    assert_same(run_chain_replicas(case, toy, replicas, backend, SAME_AS_TORCH), want)


# ----------------------------------------------------------------------------- 3. exact tokens vs the naive oracle

RULE_MODES = {
    "random": dict(greedy_share=0.0),
    "mixed": dict(greedy_share=0.4),
    "draft_probs": dict(q=True, greedy_share=0.2),
    "draft_probs_top_k_top_p": dict(q=True, filters=True),
}


def rule_problem(rule: str, mode: str, V: int):
    p = chain_problem(B=7, V=V, max_k=4, seed=V + len(mode) + 3 * len(rule), **RULE_MODES[mode])
    p.verify = rule
    if rule == "typical":
        g = torch.Generator().manual_seed(len(mode))
        p.typical_eps = torch.rand(p.B, generator=g) * 0.3
        p.typical_delta = torch.rand(p.B, generator=g) * 0.6
    return p


_cases: dict = {}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule,mode,V", [(r, m, V) for r in ("block", "typical") for m in RULE_MODES
                                         for V in (53, 600)])
def test_chain_rule_matches_naive_oracle(rule, mode, V, backend):
    key = (rule, mode, V)
    if key not in _cases:
        p = rule_problem(rule, mode, V)
        _cases[key] = (p, reference(p))
    p, want = _cases[key]
    assert_same(run(p, backend), want)


# ----------------------------------------------------------------------------- trees: multi-path block


def tree_replicas(toy: Toy, n_paths: int, depth: int, count: int, wor: bool, seed: int):
    """``count`` replicas of one multi-path step: n paths of ``depth`` tokens drawn from Q
    (i.i.d. or without replacement, exact_law._path_sets), as tries (leaves in path order)
    with target logits and draft probabilities on every node."""
    g = torch.Generator().manual_seed(seed)
    sets = list(E._path_sets(toy.world, n_paths, depth, wor))
    pick = torch.multinomial(torch.tensor([w for _, w in sets], dtype=torch.float64), count, replacement=True,
                             generator=g)
    tokens, parents, ctxs, cu = [], [], [], [0]
    for i in pick.tolist():
        par, tok = path_trie(sets[i][0], repeat_leaves=not wor)
        node_ctx = [()]
        for j in range(1, len(par)):
            node_ctx.append(node_ctx[par[j]] + (tok[j],))
        tokens += [0] + tok[1:]
        parents += par
        ctxs += node_ctx
        cu.append(cu[-1] + len(par))
    rows = {}
    idx = torch.tensor([rows.setdefault(c, len(rows)) for c in ctxs])
    logits = torch.tensor([toy.logits(c) for c in rows], dtype=torch.float32)[idx]
    q = torch.tensor([toy.Q(c) for c in rows], dtype=torch.float32)[idx]
    return Tree(logits=logits, drafts=torch.tensor(tokens), parents=torch.tensor(parents),
                cu=torch.tensor(cu, dtype=torch.int32), max_draft_len=depth, draft_probs=q,
                verify="block_wor" if wor else "block", **toy.sampling(count, "cpu"))


TREE_LAW_CASES = {
    # name: (V, paths, depth, without replacement, sampling)
    "iid_3x2": (4, 3, 2, False, "t1"),
    "wor_3x2": (4, 3, 2, True, "t1"),
    "wor_2x2_topp": (3, 2, 2, True, "t13_topp"),
    "iid_2x3_topk": (3, 2, 3, False, "t07_topk3"),
}


def tree_law_case(case: str, count: int):
    V, n_paths, depth, wor, sampling = TREE_LAW_CASES[case]
    toy = Toy(V, 40 + len(case), **SAMPLING[sampling])
    return E.tree_law(toy.world, n_paths, depth, wor=wor), tree_replicas(toy, n_paths, depth, count, wor, len(case))


def first(p: Tree, count: int) -> Tree:
    """The first ``count`` replicas of p."""
    cu = p.cu[:count + 1]
    T = int(cu[-1])
    keep = slice(0, count)
    return Tree(logits=p.logits[:T], drafts=p.drafts[:T], parents=p.parents[:T], cu=cu, max_draft_len=p.max_draft_len,
                draft_probs=p.draft_probs[:T], verify=p.verify, temperature=p.temperature[keep], seed=p.seed[keep],
                positions=p.positions[keep], top_k=None if p.top_k is None else p.top_k[keep],
                top_p=None if p.top_p is None else p.top_p[keep])


@pytest.mark.parametrize("backend,case", law_params(TREE_LAW_CASES, lambda c: c[4] == "t1"))
def test_multi_path_op_follows_the_exact_law(case, backend):
    law, reps = tree_law_case(case, REPLICAS)
    _, out, num = run(first(reps, replicas(backend)), backend)
    counts, expected = emitted_counts(out, num, law)
    assert_law(counts, expected, f"{reps.verify} emitted sequences")


@pytest.mark.parametrize("backend", SAME_AS_TORCH_BACKENDS)
@pytest.mark.parametrize("case", list(TREE_LAW_CASES))
def test_multi_path_law_replicas_same_as_torch(case, backend):
    _, reps = tree_law_case(case, SAME_AS_TORCH)
    assert_same(run(reps, backend), run(reps, "torch"))


TREE_RULE_MODES = {
    "random": dict(greedy_share=0.0),
    "mixed": dict(greedy_share=0.4),
    "top_k_top_p": dict(filters=True),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("wor,mode,depth", [(w, m, d) for w in (False, True) for m in TREE_RULE_MODES
                                            for d in (1, 3)])
def test_multi_path_matches_naive_oracle(wor, mode, depth, backend):
    key = ("tree", wor, mode, depth)
    if key not in _cases:
        p = multi_path_problem(B=5, V=29, n=3, depth=depth, wor=wor, seed=depth + len(mode),
                               **TREE_RULE_MODES[mode])
        _cases[key] = (p, reference(p))
    p, want = _cases[key]
    assert_same(run(p, backend), want)


def test_single_path_tree_is_the_chain_rule():
    """A tree of one path under "block" gives the chain op's "block" tokens: the same
    formulas and the same Philox draws (attempt 0)."""
    toy = Toy(5, 3)
    chain_toy_logits, drafts, cu, q = chain_replicas(toy, 3, 400, True, seed=1)
    out_c, num_c = fastverify.rejection_sample(chain_toy_logits, drafts, cu, draft_probs=q, max_draft_len=3,
                                               verify="block", **toy.sampling(400, "cpu"))
    reps = tree_replicas(toy, 1, 3, 400, False, seed=1)
    _, out_t, num_t = run(reps, "torch")
    # the same replicas? (both draw from the same Q with different generators) -> compare the laws' samples
    # through the rule instead: rebuild the chain from each tree replica
    T_logits = reps.logits.view(400, 4, -1)
    ch_logits = T_logits.reshape(400 * 4, -1)
    ch_drafts = reps.drafts.view(400, 4)[:, 1:].reshape(-1)
    ch_q = reps.draft_probs.view(400, 4, -1)[:, :3].reshape(400 * 3, -1)
    out_c, num_c = fastverify.rejection_sample(ch_logits, ch_drafts, cu, draft_probs=ch_q, max_draft_len=3,
                                               verify="block", **toy.sampling(400, "cpu"))
    assert torch.equal(out_c, out_t) and torch.equal(num_c, num_t)


# ----------------------------------------------------------------------------- GPU only: graphs and compile

GRAPH_RULE_CASES = {
    "chain_block_bf16": lambda: replace_rule(chain_problem(B=8, V=3000, max_k=4, q=True, filters=True, seed=31,
                                                           dtype=torch.bfloat16), "block"),
    "chain_block_point_mass": lambda: replace_rule(chain_problem(B=8, V=3000, max_k=4, seed=32), "block"),
    "chain_typical": lambda: replace_rule(chain_problem(B=8, V=3000, max_k=4, filters=True, seed=33), "typical"),
    "paths_block": lambda: multi_path_problem(B=6, V=3000, n=3, depth=3, wor=False, filters=True, seed=34),
    "paths_block_wor": lambda: multi_path_problem(B=6, V=3000, n=3, depth=3, wor=True, seed=35),
}


def replace_rule(p, rule: str):
    p.verify = rule
    if rule == "typical":
        p.typical_eps = torch.full((p.B,), 0.09)
        p.typical_delta = torch.full((p.B,), 0.3)
    return p


def public(p):
    if isinstance(p, Tree):
        return fastverify.tree_rejection_sample(p.logits, p.drafts, p.parents, p.cu, max_depth=p.max_draft_len,
                                                **p.kwargs())
    return fastverify.rejection_sample(p.logits, p.drafts, p.cu, max_draft_len=p.max_draft_len, **p.kwargs())


@pytest.mark.cuda
@pytest.mark.parametrize("backend,case", [(b, c) for b in GPU_BACKENDS for c in GRAPH_RULE_CASES])
def test_rules_replay_in_cuda_graphs(backend, case):
    p = GRAPH_RULE_CASES[case]().to(GPU)
    with fastverify.use_backend(backend):
        graph, outs = capture_graph(lambda: public(p))
        graph.replay()
        torch.cuda.synchronize()
        assert_same(outs, public(p), "replay vs eager")
        refill(p, 7)
        graph.replay()
        torch.cuda.synchronize()
        assert_same(outs, public(p), "replay vs eager after new inputs")
        assert_same(tuple(t.cpu() for t in outs), run(p.to("cpu"), "torch"), "replay vs the torch spec on CPU")


@pytest.mark.cuda
@pytest.mark.parametrize("backend,case", [(b, c) for b in GPU_BACKENDS for c in GRAPH_RULE_CASES])
def test_rules_compile_fullgraph_on_cuda_tensors(backend, case):
    p = GRAPH_RULE_CASES[case]().to(GPU)
    with fastverify.use_backend(backend):
        got = torch.compile(lambda: public(p), fullgraph=True)()
        assert_same(got, public(p), "torch.compile vs eager")
