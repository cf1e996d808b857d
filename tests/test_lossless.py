"""Lossless, measured: the tokens the verification ops emit are distributed exactly as
sampling the target one token at a time.

A small fake target model gives next-token logits for every context of up to two
tokens (V = 10). Each test verifies 100,000 independent replicas (distinct seeds) of
one speculative step, continues every replica autoregressively to two tokens where
it emitted only one, and compares the counts of the first token and of the
(first, second) pair with the exact law p(a)·p(b | a) of the processed target
(naive float64 oracle) by a chi-squared goodness-of-fit test at fixed seeds.
Zero-probability cells (filtered by top-k/top-p) must stay empty.
"""

import numpy as np
import pytest
import torch

import naive
from law import assert_law
from conftest import BACKEND_DEVICES, HAS_CUDA

import fastverify

pytestmark = pytest.mark.family("rejection")

V = 10
SAMPLES = 100_000
# Statistical runs: the torch backend everywhere; Triton and CUDA where a GPU runs
# them at this size (the CPU interpreter is exact-tested against the oracle instead).
BACKENDS = ["torch"] + (["triton", "cuda"] if HAS_CUDA else [])


class FakeTarget:
    """Random logits for contexts (), (a,), (a, b) and their processed distributions."""

    def __init__(self, seed, temperature=1.0, top_k=0, top_p=1.0, scale=1.6):
        g = torch.Generator().manual_seed(seed)
        self.l0 = torch.randn(V, generator=g) * scale
        self.l1 = torch.randn(V, V, generator=g) * scale
        self.l2 = torch.randn(V, V, V, generator=g) * scale
        self.params = (temperature, top_k, top_p)
        self.p0 = np.array(self.probs(self.l0))
        self.p1 = np.array([self.probs(self.l1[a]) for a in range(V)])

    def probs(self, row):
        T, k, p = self.params
        return naive.target_probs(row.tolist(), T, k, p) if T > 0 else np.eye(V)[naive.argmax(row.tolist())].tolist()

    def pair_law(self):
        return self.p0[:, None] * self.p1                                  # [V, V]

    def sampling_args(self, B, device):
        T, k, p = self.params
        return dict(temperature=torch.full((B,), T, device=device),
                    top_k=torch.full((B,), k, dtype=torch.int32, device=device) if k else None,
                    top_p=torch.full((B,), p, device=device) if p < 1 else None,
                    seed=torch.arange(B, dtype=torch.long, device=device) * 7919 + 13,
                    positions=torch.full((B,), 1000, dtype=torch.long, device=device))


def continue_to_pairs(target, out, num, seed):
    """First two tokens of each replica: emitted, or the second drawn from p(· | first)."""
    y0 = out[:, 0].long().numpy()
    y1 = out[:, 1].long().numpy() if out.shape[1] > 1 else np.full(len(y0), -1)
    need = num.numpy() == 0
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(target.p1[y0[need]], 1)
    y1 = y1.copy()
    y1[need] = (rng.random(need.sum())[:, None] < cdf).argmax(1)
    return y0, y1


def check(target, out, num, seed=0):
    y0, y1 = continue_to_pairs(target, out, num, seed)
    first = np.bincount(y0, minlength=V)
    pairs = np.zeros((V, V))
    np.add.at(pairs, (y0, y1), 1)
    return assert_law(first, target.p0, "first token"), assert_law(pairs, target.pair_law(), "token pairs")


# ----------------------------------------------------------------------------- chain


def draft_model(target, g):
    """A drafter that roughly agrees with the target: q(·|ctx) = softmax(l(ctx) + noise)."""
    q0 = torch.softmax(target.l0 + torch.randn(V, generator=g), 0)
    q1 = torch.softmax(target.l1 + torch.randn(V, V, generator=g), 1)
    return q0, q1


def chain_replicas(target, K, draft_probs: bool, seed):
    """B replicas of one request with K = 2 drafts. Without draft_probs the drafts are
    random but ignored as a distribution (point masses); with it, x0 ~ q0, x1 ~ q1(·|x0)."""
    g = torch.Generator().manual_seed(seed)
    B = SAMPLES
    q0, q1 = draft_model(target, g)
    x0 = torch.multinomial(q0, B, replacement=True, generator=g)
    x1 = torch.multinomial(q1[x0], 1, generator=g)[:, 0]
    drafts = torch.stack([x0, x1], 1)[:, :K]
    rows = [target.l0.expand(B, V), target.l1[x0], target.l2[x0, x1]][:K + 1]
    logits = torch.stack(rows, 1).reshape(B * (K + 1), V)
    q = torch.stack([q0.expand(B, V), q1[x0]], 1)[:, :K].reshape(B * K, V) if draft_probs else None
    cu = torch.arange(B + 1, dtype=torch.int32) * K
    return logits, drafts.reshape(-1), cu, q


CASES = {
    "random": dict(),
    "top_k": dict(top_k=4),
    "top_p": dict(top_p=0.75),
    "top_k_top_p_cold": dict(temperature=0.7, top_k=6, top_p=0.85),
    "hot": dict(temperature=1.8),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("draft_probs", [False, True], ids=["point_mass", "draft_probs"])
@pytest.mark.parametrize("case", list(CASES))
def test_chain_is_lossless(backend, draft_probs, case):
    target = FakeTarget(seed=len(case) * 3 + draft_probs, **CASES[case])
    logits, drafts, cu, q = chain_replicas(target, 2, draft_probs, seed=len(case))
    dev = BACKEND_DEVICES[backend]
    with fastverify.use_backend(backend):
        out, num = fastverify.rejection_sample(
            logits.to(dev), drafts.to(dev), cu.to(dev), draft_probs=None if q is None else q.to(dev),
            max_draft_len=2, **target.sampling_args(SAMPLES, dev))
    out, num = out.cpu(), num.cpu()
    # the drafts are accepted often enough for the test to exercise both paths
    assert 0.05 < (num > 0).float().mean() < 0.95
    check(target, out, num)


# ----------------------------------------------------------------------------- tree


def tree_replicas(target, draft_probs: bool, seed):
    """B replicas of one tree: root with up to 3 children; the first child with up to
    2 children. Without draft_probs the children are fixed distinct tokens; with it,
    they are 3 (resp. 2) i.i.d. draws from q(·|context), de-duplicated in order."""
    g = torch.Generator().manual_seed(seed)
    B = SAMPLES
    q0, q1 = draft_model(target, g)
    if draft_probs:
        kids = torch.multinomial(q0, 3 * B, replacement=True, generator=g).view(B, 3).tolist()
        grand = torch.multinomial(q1[torch.tensor([k[0] for k in kids])], 2, replacement=True, generator=g).tolist()
    else:
        kids = [[int(t) for t in torch.randperm(V, generator=g)[:3]]] * B
        grand = [[int(t) for t in torch.randperm(V, generator=g)[:2]]] * B
    dedup = lambda xs: list(dict.fromkeys(xs))  # noqa: E731
    tokens, parents, rows, cu = [], [], [], [0]
    for b in range(B):
        c, gc = dedup(kids[b]), dedup(grand[b])
        tokens += [0] + c + gc
        parents += [-1] + [0] * len(c) + [1] * len(gc)
        rows += [("r",)] + [("c", t) for t in c] + [("g", c[0], t) for t in gc]
        cu.append(cu[-1] + 1 + len(c) + len(gc))
    lookup = {"r": lambda: target.l0, "c": lambda a: target.l1[a], "g": lambda a, b: target.l2[a, b]}
    logits = torch.stack([lookup[r[0]](*r[1:]) for r in rows])
    q = None
    if draft_probs:
        qlook = {"r": lambda: q0, "c": lambda a: q1[a], "g": lambda a, b: q0}
        q = torch.stack([qlook[r[0]](*r[1:]) for r in rows])
    return (logits, torch.tensor(tokens), torch.tensor(parents), torch.tensor(cu, dtype=torch.int32), q)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("draft_probs", [False, True], ids=["sample_then_match", "recursive_rejection"])
@pytest.mark.parametrize("case", ["random", "top_k_top_p_cold"])
def test_tree_is_lossless(backend, draft_probs, case):
    target = FakeTarget(seed=100 + len(case) + draft_probs, **CASES[case])
    logits, tokens, parents, cu, q = tree_replicas(target, draft_probs, seed=len(case))
    dev = BACKEND_DEVICES[backend]
    with fastverify.use_backend(backend):
        acc, out, num = fastverify.tree_rejection_sample(
            logits.to(dev), tokens.to(dev), parents.to(dev), cu.to(dev), draft_probs=None if q is None else q.to(dev),
            max_depth=2, **target.sampling_args(SAMPLES, dev))
    out, num = out.cpu(), num.cpu()
    assert 0.05 < (num > 0).float().mean() < 0.95
    check(target, out, num)


# ----------------------------------------------------------------------------- the test can fail


def test_chi_squared_detects_a_wrong_law():
    """Negative control: samples of the target at temperature 1.15 fail the test for
    temperature 1.0, and a verifier that accepts every draft fails it too."""
    target = FakeTarget(seed=5)
    logits, drafts, cu, _ = chain_replicas(target, 2, False, seed=5)
    hot = FakeTarget(seed=5, temperature=1.15)
    out, num = fastverify.rejection_sample(logits, drafts, cu, max_draft_len=2, **hot.sampling_args(SAMPLES, "cpu"))
    with pytest.raises(AssertionError, match="chi-squared"):
        check(target, out, num)
    accept_all = torch.cat([drafts.view(-1, 2), torch.zeros(SAMPLES, 1, dtype=torch.long)], 1).int()
    with pytest.raises(AssertionError, match="chi-squared"):
        check(target, accept_all, torch.full((SAMPLES,), 2, dtype=torch.int32))
