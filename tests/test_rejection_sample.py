"""fastverify.rejection_sample: every backend against the naive float64 oracle, exact
cases, cross-backend agreement, batch invariance and degenerate logits."""

import pytest
import torch

import naive
from conftest import BACKEND_DEVICES
from problems import Chain, chain_problem, run_chain

import fastverify
from fastverify.triton import rejection as triton_rejection

pytestmark = pytest.mark.family("rejection")

BACKENDS = list(BACKEND_DEVICES)


def oracle(p: Chain):
    rows, nums = naive.rejection_sample(*p.oracle_args())
    return torch.tensor(rows, dtype=torch.int32), torch.tensor(nums, dtype=torch.int32)


def assert_same(got, want):
    out, num = got
    w_out, w_num = want
    assert torch.equal(num, w_num), f"num_accepted {num.tolist()} != {w_num.tolist()}"
    assert torch.equal(out, w_out), f"output_tokens\n{out}\n!=\n{w_out}"


MODES = {
    "greedy": dict(greedy_share=1.0),
    "random": dict(greedy_share=0.0),
    "mixed": dict(greedy_share=0.4),
    "draft_probs": dict(q=True),
    "top_k_top_p": dict(filters=True),
    "draft_probs_top_k_top_p": dict(q=True, filters=True),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("V", [111, 600])
def test_matches_oracle(backend, mode, V):
    p = chain_problem(B=7, V=V, max_k=4, seed=V + len(mode), **MODES[mode])
    assert_same(run_chain(p, backend), oracle(p))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_match_oracle(backend, dtype):
    # the oracle reads the same rounded values, so the results stay exact
    p = chain_problem(B=6, V=97, max_k=3, dtype=dtype, q=True, filters=True, seed=3)
    p.draft_probs = p.draft_probs.to(dtype)
    assert_same(run_chain(p, backend), oracle(p))


def one_hot_logits(tokens, V):
    l = torch.full((len(tokens), V), -30.0)
    l[torch.arange(len(tokens)), torch.tensor(tokens)] = 30.0
    return l


def make(logits, drafts, cu, temperature, max_draft_len, **kw):
    B = len(cu) - 1
    return Chain(logits=logits, drafts=torch.tensor(drafts, dtype=torch.long), cu=torch.tensor(cu, dtype=torch.int32),
                 temperature=torch.tensor(temperature, dtype=torch.float32),
                 seed=torch.arange(B, dtype=torch.long) + 7, positions=torch.arange(B, dtype=torch.long) * 100,
                 max_draft_len=max_draft_len, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_all_drafts_accepted_then_bonus(backend, temperature):
    # target rows are one-hot at the drafts, the bonus row at 9
    p = make(one_hot_logits([3, 1, 4, 9], 16), [3, 1, 4], [0, 3], [temperature], 3)
    out, num = run_chain(p, backend)
    assert out.tolist() == [[3, 1, 4, 9]] and num.tolist() == [3]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.0, 1.3])
def test_first_draft_rejected(backend, temperature):
    # the target gives the first draft zero probability: it is rejected and the
    # recovered token is the target's only token
    logits = one_hot_logits([5, 2, 2], 16)
    p = make(logits, [2, 2], [0, 2], [temperature], 2)
    out, num = run_chain(p, backend)
    assert out.tolist() == [[5, -1, -1]] and num.tolist() == [0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_rejected_point_mass_draft_is_never_the_recovered_token(backend):
    # p puts 0.9 on the draft: when it is rejected the recovered token must be another one
    V, B = 8, 64
    row = torch.full((V,), -2.0)
    row[3] = 2.0
    logits = row.repeat(2 * B, 1)
    p = make(logits, [3] * B, list(range(B + 1)), [1.0] * B, 1)
    out, num = run_chain(p, backend)
    rejected = num == 0
    assert rejected.any() and (~rejected).any()
    assert (out[rejected, 0] != 3).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_drafts_emit_one_token(backend):
    logits = one_hot_logits([6, 1], 10)
    p = make(logits, [], [0, 0, 0], [0.0, 0.9], 0)
    out, num = run_chain(p, backend)
    assert out.tolist() == [[6], [1]] and num.tolist() == [0, 0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_ragged_batch_exact(backend):
    # request 0 (3 drafts): 2 match the argmax, third does not; request 1: no drafts;
    # request 2 (1 draft): matches, then bonus
    V = 12
    argmaxes = [4, 7, 1, 9,   2,   5, 8]
    logits = one_hot_logits(argmaxes, V) + torch.randn(7, V) * 0.1
    p = make(logits, [4, 7, 3, 5], [0, 3, 3, 4], [0.0, 0.0, 0.0], 3)
    out, num = run_chain(p, backend)
    assert out.tolist() == [[4, 7, 1, -1], [2, -1, -1, -1], [5, 8, -1, -1]]
    assert num.tolist() == [2, 0, 1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_degenerate_logits_give_in_range_tokens(backend):
    V = 50
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(14, V, generator=g)      # 7 requests × (1 draft row + bonus row)
    logits[0] = float("nan")                      # all NaN
    logits[2] = float("-inf")                     # all -inf
    logits[4, ::2] = float("nan")                 # half NaN
    logits[6, 7] = float("inf")                   # one +inf, at the draft
    logits[8, [3, 9]] = float("inf")              # two +inf
    logits[10] = float("inf")                     # all +inf
    logits[12, :] = float("-inf")
    logits[12, 11] = 0.0                          # a single finite logit
    logits[1::2] = float("nan")                   # every bonus row NaN
    for temperature in (0.0, 0.01, 1.0):
        for filters in (False, True):
            kw = dict(top_k=torch.full((7,), 3, dtype=torch.int32), top_p=torch.full((7,), 0.5)) if filters else {}
            p = make(logits, [7] * 7, list(range(8)), [temperature] * 7, 1, **kw)
            out, num = run_chain(p, backend)
            emitted = out[out >= 0]
            assert ((emitted >= 0) & (emitted < V)).all()
            assert (out[torch.arange(7), num.long()] >= 0).all()
            if temperature > 0:
                assert out[3, 0] == 7 and num[3] == 1        # the +inf token has all the mass
                assert out[4, 0] in (3, 9) and num[4] == 0   # split between the two +inf tokens
                assert out[6, 0] == 11 and num[6] == 0       # the only finite logit


def test_backends_agree_on_large_vocab_many_chunks():
    # V spanning many chunks (chunk 16 → 94 chunks), top-k/top-p and draft probs
    p = chain_problem(B=5, V=1500, max_k=3, q=True, filters=True, seed=11)
    want = run_chain(p, "torch")
    for backend in BACKENDS[1:]:
        assert_same(run_chain(p, backend), want)
    dev = BACKEND_DEVICES["triton"]
    x = p.to(dev)
    got = triton_rejection.rejection_sample(x.logits, x.drafts, x.cu, x.draft_probs, x.temperature, x.top_k, x.top_p,
                                            x.seed, x.positions, x.max_draft_len, chunk_size=16)
    assert_same(tuple(t.cpu() for t in got), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_invariance(backend):
    """A request's tokens depend only on its own rows, seed and position."""
    big = chain_problem(B=8, V=200, max_k=3, filters=True, q=True, greedy_share=0.2, seed=5)
    out_all, num_all = run_chain(big, backend)
    for b in (0, 3, 7):
        s, e = int(big.cu[b]), int(big.cu[b + 1])
        single = Chain(logits=big.logits[s + b:e + b + 1], drafts=big.drafts[s:e],
                       cu=torch.tensor([0, e - s], dtype=torch.int32), temperature=big.temperature[b:b + 1],
                       seed=big.seed[b:b + 1], positions=big.positions[b:b + 1], max_draft_len=big.max_draft_len,
                       draft_probs=big.draft_probs[s:e], top_k=big.top_k[b:b + 1], top_p=big.top_p[b:b + 1])
        out, num = run_chain(single, backend)
        assert torch.equal(out[0], out_all[b]) and num[0] == num_all[b]


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_and_position_key_the_randomness(backend):
    p = chain_problem(B=6, V=64, max_k=2, greedy_share=0.0, seed=2)
    a = run_chain(p, backend)
    assert_same(run_chain(p, backend), a)  # same seeds: same tokens, call after call
    p.seed = p.seed + 1
    b = run_chain(p, backend)
    assert not torch.equal(a[0], b[0])      # new seeds: new tokens


def test_python_numbers_broadcast():
    p = chain_problem(B=3, V=40, max_k=2, greedy_share=1.0, seed=4)
    out, num = fastverify.rejection_sample(p.logits, p.drafts, p.cu, temperature=0.0, seed=0, positions=5,
                                           max_draft_len=2)
    p.temperature = torch.zeros(3)
    assert_same((out, num), oracle(p))
