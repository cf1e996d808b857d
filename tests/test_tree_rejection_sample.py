"""fastverify.tree_rejection_sample: every backend against the naive oracle, exact
greedy walks, chains as trees, big trees, batch invariance."""

import pytest
import torch

import naive
from conftest import BACKEND_DEVICES
from problems import Tree, run_tree, tree_problem

from fastverify.triton import rejection as triton_rejection

pytestmark = pytest.mark.family("rejection")

BACKENDS = list(BACKEND_DEVICES)


def oracle(p: Tree):
    return tuple(torch.tensor(x, dtype=torch.int32) for x in naive.tree_rejection_sample(*p.oracle_args()))


def assert_same(got, want):
    names = ("accepted_nodes", "output_tokens", "num_accepted")
    for name, a, b in zip(names, got, want):
        assert torch.equal(a, b), f"{name}\n{a}\n!=\n{b}"


MODES = {
    "greedy": dict(greedy_share=1.0),
    "random": dict(greedy_share=0.0),
    "mixed": dict(greedy_share=0.4),
    "draft_probs": dict(q=True, greedy_share=0.2),
    "top_k_top_p": dict(filters=True),
    "draft_probs_top_k_top_p": dict(q=True, filters=True),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", list(MODES))
def test_matches_oracle(backend, mode):
    p = tree_problem(B=6, V=37, max_nodes=12, seed=len(mode), **MODES[mode])
    assert_same(run_tree(p, backend), oracle(p))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_oracle(backend, dtype):
    p = tree_problem(B=5, V=53, max_nodes=9, q=True, filters=True, seed=9, dtype=dtype)
    p.draft_probs = p.draft_probs.to(dtype)
    assert_same(run_tree(p, backend), oracle(p))


@pytest.mark.parametrize("backend", BACKENDS)
def test_trees_of_one_node_beside_big_trees(backend):
    # a 64-node tree next to single-node trees (plain decoding: one sampled token)
    p = tree_problem(B=4, V=29, sizes=[1, 64, 1, 20], q=True, greedy_share=0.0, seed=4)
    got = run_tree(p, backend)
    assert_same(got, oracle(p))
    assert got[2][0] == 0 and got[2][2] == 0 and got[0][0, 0] == 0


def test_greedy_walk_exact():
    # root ─┬─ 5 ── 9 ── 2        target argmax: root→5, node(5)→9, node(9)→4 (not 2)
    #       └─ 6
    V = 12
    tokens = torch.tensor([3, 5, 6, 9, 2])
    parents = torch.tensor([-1, 0, 0, 1, 3])
    logits = torch.full((5, V), -5.0)
    for row, tok in enumerate([5, 9, 0, 4, 1]):
        logits[row, tok] = 5.0
    p = Tree(logits=logits, drafts=tokens, parents=parents, cu=torch.tensor([0, 5], dtype=torch.int32),
             temperature=torch.zeros(1), seed=torch.zeros(1, dtype=torch.long), positions=torch.zeros(1, dtype=torch.long),
             max_draft_len=3)
    for backend in BACKENDS:
        acc, out, num = run_tree(p, backend)
        assert acc.tolist() == [[0, 1, 3, -1]]
        assert out.tolist() == [[5, 9, 4, -1]]
        assert num.tolist() == [2]


@pytest.mark.parametrize("backend", BACKENDS)
def test_chain_as_tree_with_one_hot_target_accepts_everything(backend):
    V, n = 20, 6
    tokens = torch.tensor([1, 4, 8, 15, 16, 3])
    parents = torch.tensor([-1, 0, 1, 2, 3, 4])
    logits = torch.full((n, V), -40.0)
    for row in range(n - 1):
        logits[row, tokens[row + 1]] = 40.0
    logits[n - 1, 7] = 40.0
    p = Tree(logits=logits, drafts=tokens, parents=parents, cu=torch.tensor([0, n], dtype=torch.int32),
             temperature=torch.tensor([0.8]), seed=torch.tensor([3]), positions=torch.tensor([50]), max_draft_len=n - 1,
             draft_probs=torch.softmax(torch.randn(n, V), 1))
    for with_q in (False, True):
        if not with_q:
            p.draft_probs = None
        acc, out, num = run_tree(p, backend)
        assert acc.tolist() == [[0, 1, 2, 3, 4, 5]]
        assert out.tolist() == [[4, 8, 15, 16, 3, 7]]
        assert num.tolist() == [5]


def test_backends_agree_with_many_chunks():
    p = tree_problem(B=4, V=900, max_nodes=10, q=True, filters=True, seed=21)
    want = run_tree(p, "torch")
    for backend in BACKENDS[1:]:
        assert_same(run_tree(p, backend), want)
    x = p.to(BACKEND_DEVICES["triton"])
    got = triton_rejection.tree_rejection_sample(x.logits, x.drafts, x.parents, x.cu, x.draft_probs, x.temperature,
                                                 x.top_k, x.top_p, x.seed, x.positions, x.max_draft_len, chunk_size=16)
    assert_same(tuple(t.cpu() for t in got), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_invariance(backend):
    big = tree_problem(B=6, V=41, max_nodes=10, q=True, filters=True, greedy_share=0.2, seed=8)
    acc_all, out_all, num_all = run_tree(big, backend)
    for b in (0, 2, 5):
        s, e = int(big.cu[b]), int(big.cu[b + 1])
        single = Tree(logits=big.logits[s:e], drafts=big.drafts[s:e], parents=big.parents[s:e],
                      cu=torch.tensor([0, e - s], dtype=torch.int32), temperature=big.temperature[b:b + 1],
                      seed=big.seed[b:b + 1], positions=big.positions[b:b + 1], max_draft_len=big.max_draft_len,
                      draft_probs=big.draft_probs[s:e], top_k=big.top_k[b:b + 1], top_p=big.top_p[b:b + 1])
        acc, out, num = run_tree(single, backend)
        assert torch.equal(acc[0], acc_all[b]) and torch.equal(out[0], out_all[b]) and num[0] == num_all[b]


@pytest.mark.parametrize("backend", BACKENDS)
def test_degenerate_logits_give_in_range_tokens(backend):
    p = tree_problem(B=4, V=23, max_nodes=8, q=True, greedy_share=0.3, seed=13)
    p.logits[0] = float("nan")
    p.logits[1, ::3] = float("inf")
    p.logits[2] = float("-inf")
    _, out, num = run_tree(p, backend)
    emitted = out[out >= 0]
    assert ((emitted >= 0) & (emitted < 23)).all()
    assert (out[torch.arange(4), num.long()] >= 0).all()
