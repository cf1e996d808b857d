"""lm_head_topk / lm_head_sample (frequency-ranked LM head): every backend against the
naive float64 oracle over odd sizes, exact ties, NaN scores, the sampled law
(chi-squared), greedy rows, split merging, as torch ops (opcheck, fake tensors,
torch.compile) and bad input.

The oracle reads the same rounded inputs (fp16/bf16 values are exact in float64) and
the ops accumulate in fp32, so logprobs agree to fp32 accuracy for every dtype; ids
agree exactly except between scores closer than that accuracy (near-ties)."""

from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

import naive
from conftest import BACKEND_DEVICES
from law import assert_law

import fastverify
from fastverify.ops import philox
from fastverify.ops.frspec import check_lm_head_topk, lm_head_sample_torch, lm_head_topk_torch
from fastverify.triton import frspec as triton_frspec

pytestmark = pytest.mark.family("lm_head")

BACKENDS = list(BACKEND_DEVICES)
TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}   # relative to max(1, |score|)


@dataclass
class Head:
    hidden: torch.Tensor               # [M, d]
    weight: torch.Tensor               # [V, d]
    token_map: torch.Tensor | None     # [V]
    temperature: torch.Tensor | None   # [M]
    seed: torch.Tensor                 # [M]
    positions: torch.Tensor            # [M]

    def to(self, device):
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Head(*(mv(getattr(self, f)) for f in self.__dataclass_fields__))

    def scores(self):
        """Oracle scores [M][V] (float64) at the rows' temperatures."""
        t = self.temperature.tolist() if self.temperature is not None else [1.0] * self.hidden.shape[0]
        w = self.weight.double().tolist()
        return [naive.subset_scores(h, w, tm) for h, tm in zip(self.hidden.double().tolist(), t)]

    def tmap(self):
        return None if self.token_map is None else self.token_map.tolist()


def make_head(M, V, d, dtype=torch.float32, *, token_map=True, temperature=True, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(M, d, generator=g) * scale).to(dtype)
    weight = (torch.randn(V, d, generator=g) / d ** 0.25).to(dtype)
    tm = torch.randperm(4 * V + 7, generator=g)[:V] if token_map else None
    t = None
    if temperature:
        t = torch.rand(M, generator=g) * 1.5 + 0.2
        t[::4] = 0.0                          # scored at 1
    return Head(hidden, weight, tm, t, torch.randint(-2**62, 2**62, (M,), generator=g),
                torch.randint(0, 2**40, (M,), generator=g))


def tol_of(p: Head, scores) -> float:
    top = max((abs(x) for row in scores for x in row if abs(x) != float("inf")), default=1.0)
    return TOL[p.hidden.dtype] * max(1.0, top)


def run_topk(p: Head, k, backend, **kw):
    x = p.to(BACKEND_DEVICES[backend])
    with fastverify.use_backend(backend):
        out = fastverify.lm_head_topk(x.hidden, x.weight, k, token_map=x.token_map, temperature=x.temperature, **kw)
    return tuple(o.cpu() for o in out)


def run_sample(p: Head, backend):
    x = p.to(BACKEND_DEVICES[backend])
    t = x.temperature if x.temperature is not None else torch.ones(x.hidden.shape[0], device=x.hidden.device)
    with fastverify.use_backend(backend):
        out = fastverify.lm_head_sample(x.hidden, x.weight, temperature=t, seed=x.seed, positions=x.positions,
                                        token_map=x.token_map)
    return tuple(o.cpu() for o in out)


def assert_topk(got, p: Head, k):
    """ids equal to the oracle's but for near-ties (then their scores agree within tol);
    logprobs and lse within tol."""
    ids, lps, lse = got
    M = p.hidden.shape[0]
    assert ids.shape == (M, k) and lps.shape == (M, k) and lse.shape == (M,)
    assert ids.dtype == torch.int64 and lps.dtype == torch.float32 and lse.dtype == torch.float32
    want_ids, want_lps, want_lse = naive.lm_head_topk(p.hidden.double().tolist(), p.weight.double().tolist(), k,
                                                      p.tmap(), None if p.temperature is None else p.temperature.tolist())
    scores = p.scores()
    tol = tol_of(p, scores)
    row_of = {tid: v for v, tid in enumerate(p.tmap() or range(p.weight.shape[0]))}
    for m in range(M):
        got_rows = [row_of[i] for i in ids[m].tolist()]
        assert len(set(got_rows)) == k, f"row {m}: repeated ids {ids[m].tolist()}"
        for j, (i, w) in enumerate(zip(ids[m].tolist(), want_ids[m])):
            if i != w:
                gap = abs(scores[m][row_of[i]] - scores[m][row_of[w]])
                assert gap <= tol, f"row {m} rank {j}: id {i} != oracle {w}, scores {gap:.3g} apart (tol {tol:.3g})"
    err = (lps.double() - torch.tensor(want_lps, dtype=torch.float64)).abs().max().item()
    assert err <= 2 * tol, f"topk_logprobs max error {err:.3g} > {2 * tol:.3g}"
    err = (lse.double() - torch.tensor(want_lse, dtype=torch.float64)).abs().max().item()
    assert err <= tol, f"lse max error {err:.3g} > {tol:.3g}"


# ----------------------------------------------------------------------------- lm_head_topk vs oracle

# name: (M, V, d, k, dtype, kwargs of make_head); small enough for the Triton interpreter
TOPK_CASES = {
    "V1": (1, 1, 8, 1, torch.float32, dict(token_map=False, temperature=False)),
    "V37_k5": (3, 37, 8, 5, torch.float32, dict()),
    "V37_d80_bf16": (3, 37, 80, 1, torch.bfloat16, dict()),
    "V37_k37_fp16": (1, 37, 80, 37, torch.float16, dict(temperature=False)),
    "V300_k64": (1, 300, 80, 64, torch.float32, dict(temperature=False)),
    "V300_fp16": (3, 300, 8, 5, torch.float16, dict(token_map=False)),
    "M300_V37": (300, 37, 8, 5, torch.float32, dict()),
    "M300_V300_bf16_k64": (300, 300, 8, 64, torch.bfloat16, dict()),
    "V1000_k64": (3, 1000, 80, 64, torch.float32, dict()),
    "V1000_k1_fp16": (1, 1000, 8, 1, torch.float16, dict(token_map=False, temperature=False)),
    "V1000_bf16": (3, 1000, 80, 5, torch.bfloat16, dict()),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(TOPK_CASES))
def test_topk_matches_oracle(backend, case):
    M, V, d, k, dtype, kw = TOPK_CASES[case]
    p = make_head(M, V, d, dtype, seed=V + d + k, **kw)
    assert_topk(run_topk(p, k, backend), p, k)


def tie_head(M, V, d, distinct, seed):
    """Small-integer weights (exact fp32 sums) with only ``distinct`` different rows:
    most scores tie exactly."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(-3, 4, (distinct, d), generator=g).float()
    weight = rows[torch.randint(0, distinct, (V,), generator=g)].contiguous()
    hidden = torch.randint(-3, 4, (M, d), generator=g).float()
    t = torch.tensor([1.0, 0.5, 0.0, 3.0] * M)[:M]
    return Head(hidden, weight, torch.randperm(2 * V, generator=g)[:V], t, torch.arange(M), torch.arange(M) * 3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("V,k", [(37, 5), (300, 64), (300, 8)])
def test_topk_ties_go_to_the_lower_subset_row(backend, V, k):
    p = tie_head(4, V, 8, 6, seed=V + k)
    ids, _, _ = run_topk(p, k, backend)
    want, _, _ = naive.lm_head_topk(p.hidden.tolist(), p.weight.tolist(), k, p.tmap(), p.temperature.tolist())
    assert ids.tolist() == want


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_all_equal_scores(backend):
    # a zero hidden row: every score is 0, the top-k are the first k subset rows
    p = make_head(2, 300, 16, seed=1)
    p.hidden[0] = 0
    ids, lps, lse = run_topk(p, 6, backend)
    assert ids[0].tolist() == p.token_map[:6].tolist()
    assert torch.allclose(lps[0], torch.full((6,), -np.log(300.0), dtype=torch.float32))
    assert torch.allclose(lse[0], torch.tensor(np.log(300.0), dtype=torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_scores_count_as_minus_inf(backend):
    p = make_head(3, 300, 8, seed=2)
    nan_rows = [0, 5, 130, 299]
    p.weight[nan_rows] = float("nan")
    p.hidden[2] = float("nan")                        # a row whose every score is NaN
    k = 7
    ids, lps, lse = run_topk(p, k, backend)
    keep = [v for v in range(300) if v not in nan_rows]
    clean = replace(p, hidden=p.hidden[:2], weight=p.weight[keep], token_map=p.token_map[keep],
                    temperature=p.temperature[:2])
    assert_topk((ids[:2], lps[:2], lse[:2]), clean, k)   # NaN rows never beat a finite score
    assert ids[2].tolist() == p.token_map[:k].tolist()    # all -inf: the lowest rows, ids in range
    assert lse[2].item() == float("-inf")


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_int32_token_map_and_number_temperature(backend):
    p = make_head(3, 37, 8, seed=3, temperature=False)
    p.token_map = p.token_map.to(torch.int32)
    assert_topk(run_topk(p, 4, backend, vocab_size=200), p, 4)
    x = p.to(BACKEND_DEVICES[backend])
    with fastverify.use_backend(backend):
        out = fastverify.lm_head_topk(x.hidden, x.weight, 4, token_map=x.token_map, temperature=0.7)
    assert_topk(tuple(o.cpu() for o in out), replace(p, temperature=torch.full((3,), 0.7)), 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_strided_hidden_rows(backend):
    p = make_head(3, 100, 16, seed=4)
    wide = torch.randn(3, 40)
    wide[:, 5:21] = p.hidden
    got = run_topk(replace(p, hidden=wide[:, 5:21]), 5, backend)
    assert_topk(got, p, 5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_rows(backend):
    p = make_head(0, 37, 8, seed=5)
    ids, lps, lse = run_topk(p, 3, backend)
    assert ids.shape == (0, 3) and lps.shape == (0, 3) and lse.shape == (0,)
    ids, lps, lse = run_sample(p, backend)
    assert ids.shape == lps.shape == lse.shape == (0,)


# ----------------------------------------------------------------------------- lm_head_sample


def noisy_scores(p: Head, scores, m):
    t = p.temperature[m].item()
    if not t > 0:
        return scores[m]
    return [s + naive.gumbel(int(p.seed[m]), int(p.positions[m]), v) for v, s in enumerate(scores[m])]


def assert_sample(got, p: Head):
    ids, lps, lse = got
    M = p.hidden.shape[0]
    assert ids.shape == lps.shape == lse.shape == (M,) and ids.dtype == torch.int64
    want_ids, want_lps, want_lse = naive.lm_head_sample(p.hidden.double().tolist(), p.weight.double().tolist(),
                                                        p.temperature.tolist(), p.seed.tolist(), p.positions.tolist(),
                                                        p.tmap())
    scores = p.scores()
    tol = tol_of(p, scores)
    row_of = {tid: v for v, tid in enumerate(p.tmap() or range(p.weight.shape[0]))}
    for m in range(M):
        i, w = int(ids[m]), want_ids[m]
        if i != w:
            noisy = noisy_scores(p, scores, m)
            gap = abs(noisy[row_of[i]] - noisy[row_of[w]])
            assert gap <= 2 * tol, f"row {m}: id {i} != oracle {w}, noisy scores {gap:.3g} apart"
        else:
            assert abs(lps[m].item() - want_lps[m]) <= 2 * tol, f"row {m}: logprob {lps[m].item()} != {want_lps[m]}"
    err = (lse.double() - torch.tensor(want_lse, dtype=torch.float64)).abs().max().item()
    assert err <= tol, f"lse max error {err:.3g} > {tol:.3g}"


SAMPLE_CASES = {
    "V1": (1, 1, 8, torch.float32, dict(token_map=False)),
    "V37": (5, 37, 8, torch.float32, dict()),
    "V300_bf16": (3, 300, 80, torch.bfloat16, dict()),
    "V1000_fp16": (3, 1000, 8, torch.float16, dict(token_map=False)),
    "M300_V37": (300, 37, 8, torch.float32, dict()),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(SAMPLE_CASES))
def test_sample_matches_oracle(backend, case):
    M, V, d, dtype, kw = SAMPLE_CASES[case]
    p = make_head(M, V, d, dtype, seed=V + d + 1, scale=0.3, **kw)
    assert_sample(run_sample(p, backend), p)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_greedy_rows_take_the_argmax(backend):
    p = tie_head(8, 300, 8, 5, seed=6)
    p.temperature = torch.tensor([0.0, -1.0, 0.0, 0.0, -0.5, 0.0, 0.0, 0.0])
    ids, lps, lse = run_sample(p, backend)
    top, top_lp, _ = naive.lm_head_topk(p.hidden.tolist(), p.weight.tolist(), 1, p.tmap(), None)
    assert ids.tolist() == [t[0] for t in top]                          # ties: the lower row
    assert torch.allclose(lps.double(), torch.tensor([t[0] for t in top_lp], dtype=torch.float64), atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.6, 1.7])
def test_sample_law(backend, temperature):
    """One hidden state drawn at N positions: the tokens follow softmax(scores / T)."""
    N, V, d = 2000, 12, 8
    p = make_head(1, V, d, seed=7, token_map=False, scale=0.7)
    law = torch.softmax(torch.tensor(p.scores()[0], dtype=torch.float64) / temperature, 0).numpy()
    rep = Head(p.hidden.expand(N, d).contiguous(), p.weight, None, torch.full((N,), temperature),
               torch.full((N,), 123), torch.arange(N) + 2**32 - 100)       # positions cross 2^32
    ids, _, _ = run_sample(rep, backend)
    assert_law(np.bincount(ids.numpy(), minlength=V).astype(np.float64), law, f"lm_head_sample T={temperature}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_depends_only_on_seed_and_position(backend):
    p = make_head(6, 300, 8, seed=8, scale=0.2)
    ids, lps, _ = run_sample(p, backend)
    for m in (0, 3, 5):
        one = replace(p, hidden=p.hidden[m:m + 1], temperature=p.temperature[m:m + 1], seed=p.seed[m:m + 1],
                      positions=p.positions[m:m + 1])
        i1, lp1, _ = run_sample(one, backend)
        assert i1.item() == ids[m].item() and torch.allclose(lp1, lps[m:m + 1], atol=1e-5)


def test_gumbel_helper_matches_oracle():
    seed = torch.tensor([0, -1, 2**62 + 5, -2**63])[:, None]
    pos = torch.tensor([0, 7, 2**32 + 1, 2**40])[:, None]
    v = torch.arange(50)[None, :]
    got = philox.gumbel(seed, pos, v)
    want = [[naive.gumbel(int(s), int(q), j) for j in range(50)] for s, q in zip(seed[:, 0], pos[:, 0])]
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-12)


@triton.jit
def _gumbel_bits_kernel(o_ptr, g_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(g_ptr + i, triton_frspec._gumbel_of_bits(tl.load(o_ptr + i).to(tl.uint32)))


def test_triton_gumbel_never_rounds_u_to_one():
    """u = (x + 0.5)·2^-24 with x = o0 >> 8 up to 2^24 - 1, where fp32 x + 0.5 would
    round to 2^24 (u = 1, g = -inf): the kernel's g stays within fp32 accuracy of the
    float64 value everywhere, the extremes included."""
    xs = [0, 1, 2**22, 2**23 - 1, 2**23, 2**23 + 1, 2**24 - 1000, 2**24 - 3, 2**24 - 2, 2**24 - 1]
    xs += list(range(0, 2**24, 2**24 // 54 + 1))[:54]
    o0 = torch.tensor([(x << 8) | 0x5A for x in xs], dtype=torch.int64)
    dev = BACKEND_DEVICES["triton"]
    g = torch.empty(len(xs), dtype=torch.float32, device=dev)
    _gumbel_bits_kernel[(1,)](o0.to(dev), g, N=len(xs))
    u = (torch.tensor(xs, dtype=torch.float64) + 0.5) * 2.0**-24
    want = -torch.log(-torch.log(u))
    assert torch.isfinite(g).all()
    assert torch.allclose(g.cpu().double(), want, rtol=2e-6, atol=2e-6)


# ----------------------------------------------------------------------------- triton splits


@pytest.mark.parametrize("num_splits", [1, 2, 5])
def test_triton_splits_merge_exactly(num_splits):
    dev = BACKEND_DEVICES["triton"]
    p = tie_head(3, 700, 8, 9, seed=9).to(dev)                   # ties across splits
    ids, lps, lse = triton_frspec.lm_head_topk(p.hidden, p.weight, 8, p.token_map, p.temperature,
                                               num_splits=num_splits)
    want = lm_head_topk_torch(p.hidden.cpu(), p.weight.cpu(), 8, p.token_map.cpu(), p.temperature.cpu())
    assert ids.cpu().tolist() == want[0].tolist()
    assert torch.allclose(lps.cpu(), want[1], atol=1e-5) and torch.allclose(lse.cpu(), want[2], atol=1e-5)
    q = make_head(3, 700, 8, seed=10, scale=0.2).to(dev)
    got = triton_frspec.lm_head_sample(q.hidden, q.weight, q.temperature, q.seed, q.positions, q.token_map,
                                       num_splits=num_splits)
    want = lm_head_sample_torch(*(t.cpu() for t in (q.hidden, q.weight, q.temperature, q.seed, q.positions,
                                                    q.token_map)))
    assert got[0].cpu().tolist() == want[0].tolist()
    assert torch.allclose(got[1].cpu(), want[1], atol=1e-5) and torch.allclose(got[2].cpu(), want[2], atol=1e-5)


def test_triton_plan_fills_the_device_for_one_row(monkeypatch):
    """A single row still streams the weight with ~2 programs per SM (132 SMs), within the
    merge's candidate budget; CPU (interpreter) grids stay small."""
    monkeypatch.setattr(triton_frspec, "_num_sms", lambda device: 132)
    for k_p2, want in ((2, 256), (8, 256), (64, 32)):
        _, block_v, _, m_blocks, splits, per_split = triton_frspec.plan(1, 32768, 4096, k_p2, None)
        assert m_blocks == 1 and splits == want and (splits - 1) * per_split * block_v < 32768
    _, _, _, m_blocks, splits, _ = triton_frspec.plan(256, 128256, 4096, 8, None)
    assert m_blocks * splits >= 132
    monkeypatch.undo()
    assert triton_frspec.plan(1, 32768, 64, 8, torch.device("cpu"))[4] <= 4


# ----------------------------------------------------------------------------- as torch ops


def test_schemas_name_the_contract_arguments():
    topk = torch.ops.fastverify.lm_head_topk.default._schema
    sample = torch.ops.fastverify.lm_head_sample.default._schema
    assert [a.name for a in topk.arguments] == ["hidden", "weight", "k", "token_map", "temperature", "vocab_size"]
    assert [a.name for a in sample.arguments] == ["hidden", "weight", "temperature", "seed", "positions",
                                                  "token_map", "vocab_size"]
    assert [r.name for r in topk.returns] == ["topk_ids", "topk_logprobs", "lse"]
    assert [r.name for r in sample.returns] == ["token_ids", "logprobs", "lse"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x = make_head(3, 37, 16, seed=11).to(BACKEND_DEVICES[backend])
    with fastverify.use_backend(backend):
        torch.library.opcheck(torch.ops.fastverify.lm_head_topk.default, (x.hidden, x.weight, 4),
                              dict(token_map=x.token_map, temperature=x.temperature, vocab_size=200))
        torch.library.opcheck(torch.ops.fastverify.lm_head_sample.default, (x.hidden, x.weight),
                              dict(temperature=x.temperature, seed=x.seed, positions=x.positions,
                                   token_map=x.token_map))


def test_fake_tensors_give_output_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    p = make_head(5, 37, 16, dtype=torch.bfloat16, seed=12)
    with FakeTensorMode() as mode:
        f = mode.from_tensor
        ids, lps, lse = torch.ops.fastverify.lm_head_topk(f(p.hidden), f(p.weight), 6, token_map=f(p.token_map))
        assert ids.shape == (5, 6) and ids.dtype == torch.int64 and lps.dtype == torch.float32 and lse.shape == (5,)
        ids, lps, lse = torch.ops.fastverify.lm_head_sample(f(p.hidden), f(p.weight), temperature=f(p.temperature),
                                                            seed=f(p.seed), positions=f(p.positions))
        assert ids.shape == lps.shape == lse.shape == (5,) and ids.dtype == torch.int64


def test_torch_compile_fullgraph():
    p = make_head(4, 300, 16, seed=13)

    def draft(hidden, weight, token_map, temperature, seed, positions):
        ids, lps, lse = torch.ops.fastverify.lm_head_topk(hidden * 1.0, weight, 5, token_map=token_map,
                                                          temperature=temperature)
        tok, lp, _ = torch.ops.fastverify.lm_head_sample(hidden, weight, temperature=temperature, seed=seed,
                                                         positions=positions + 1, token_map=token_map)
        return ids, lps.exp(), lse, tok, lp

    args = (p.hidden, p.weight, p.token_map, p.temperature, p.seed, p.positions)
    want = draft(*args)
    got = torch.compile(draft, fullgraph=True, backend="aot_eager")(*args)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- bad input


def topk_args(p, **over):
    a = dict(hidden=p.hidden, weight=p.weight, k=4, token_map=p.token_map, temperature=p.temperature,
             vocab_size=None)
    a.update(over)
    return torch.ops.fastverify.lm_head_topk(a.pop("hidden"), a.pop("weight"), a.pop("k"), **a)


def sample_args(p, **over):
    a = dict(hidden=p.hidden, weight=p.weight, temperature=p.temperature, seed=p.seed, positions=p.positions,
             token_map=p.token_map, vocab_size=None)
    a.update(over)
    return torch.ops.fastverify.lm_head_sample(a.pop("hidden"), a.pop("weight"), **a)


BAD_TOPK = {
    "k_too_big_for_subset": (lambda p: dict(k=38), "k must be an int in \\[1, min\\(V_sub, 64\\)\\] = \\[1, 37\\]"),
    "k_above_64": (lambda p: dict(weight=torch.randn(100, 16), token_map=None, k=65), "k must be an int in"),
    "k_zero": (lambda p: dict(k=0), "k must be"),
    "hidden_1d": (lambda p: dict(hidden=p.hidden[0]), "hidden must have 2 dimension"),
    "hidden_int": (lambda p: dict(hidden=p.hidden.long()), "hidden must be float32/bfloat16/float16"),
    "weight_3d": (lambda p: dict(weight=p.weight[None]), "weight must have 2 dimension"),
    "dtype_mismatch": (lambda p: dict(weight=p.weight.bfloat16()), "weight is bfloat16 but hidden is float32"),
    "d_mismatch": (lambda p: dict(weight=p.weight[:, :8].contiguous()), "weight has d = 8 columns but hidden has d = 16"),
    "weight_not_contiguous": (lambda p: dict(weight=torch.randn(16, 37).T), "weight must be contiguous"),
    "hidden_column_stride": (lambda p: dict(hidden=torch.randn(16, 3).T), "hidden must be contiguous in its last"),
    "token_map_shape": (lambda p: dict(token_map=p.token_map[:-1]), "token_map must have shape \\[37\\]"),
    "token_map_dtype": (lambda p: dict(token_map=p.token_map.float()), "token_map must be int32/int64"),
    "token_map_negative": (lambda p: dict(token_map=p.token_map - 200), "token_map\\[\\d+\\] = -\\d+ is outside"),
    "token_map_above_vocab": (lambda p: dict(vocab_size=50), "token_map\\[\\d+\\] = \\d+ is outside the vocabulary \\[0, 50\\)"),
    "identity_map_above_vocab": (lambda p: dict(token_map=None, vocab_size=20), "V_sub = 37 rows > vocab_size = 20"),
    "vocab_size_zero": (lambda p: dict(vocab_size=0), "vocab_size must be an int >= 1"),
    "temperature_shape": (lambda p: dict(temperature=p.temperature[:2]), "temperature must have shape \\[3\\]"),
    "temperature_dtype": (lambda p: dict(temperature=p.temperature.double()), "temperature must be float32"),
    "temperature_nan": (lambda p: dict(temperature=torch.tensor([1.0, float("nan"), 0.0])), "temperature must be finite"),
    "device": (lambda p: dict(token_map=p.token_map.to("meta")), "token_map is on meta but the op's other tensors are on cpu"),
}


@pytest.mark.parametrize("case", list(BAD_TOPK))
def test_topk_bad_input(case):
    p = make_head(3, 37, 16, seed=14)
    make, msg = BAD_TOPK[case]
    with pytest.raises((ValueError, TypeError, RuntimeError), match=msg):
        topk_args(p, **make(p))


BAD_SAMPLE = {
    "seed_dtype": (lambda p: dict(seed=p.seed.int()), "seed must be int64"),
    "seed_shape": (lambda p: dict(seed=p.seed[:1]), "seed must have shape \\[3\\]"),
    "positions_dtype": (lambda p: dict(positions=p.positions.float()), "positions must be int64"),
    "positions_negative": (lambda p: dict(positions=torch.tensor([0, -1, 2])), "positions must be >= 0"),
    "temperature_2d": (lambda p: dict(temperature=p.temperature[None]), "temperature must have 1 dimension"),
    "token_map_negative": (lambda p: dict(token_map=-1 - p.token_map), "token_map\\[0\\] = -\\d+ is outside"),
    "d_mismatch": (lambda p: dict(hidden=p.hidden[:, :4].contiguous()), "weight has d = 16 columns but hidden has d = 4"),
}


@pytest.mark.parametrize("case", list(BAD_SAMPLE))
def test_sample_bad_input(case):
    p = make_head(3, 37, 16, seed=15)
    make, msg = BAD_SAMPLE[case]
    with pytest.raises((ValueError, TypeError, RuntimeError), match=msg):
        sample_args(p, **make(p))


def test_non_tensor_arguments_are_named():
    p = make_head(3, 37, 16, seed=16)
    with pytest.raises(TypeError, match="temperature must be a \\[B\\] tensor or a Python number"):
        fastverify.lm_head_sample(p.hidden, p.weight, temperature="hot", seed=0, positions=0)
    with pytest.raises(TypeError, match="hidden must be a torch.Tensor"):
        check_lm_head_topk([[1.0]], p.weight, 1, None, None, None)
