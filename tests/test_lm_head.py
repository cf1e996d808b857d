"""lm_head_topk / lm_head_sample (frequency-ranked LM head): every backend against the naive
float64 oracle of naive.py over odd sizes and every kernel path, exact ties, NaN scores,
strided hidden rows, forced V_sub splits, the sampled law (chi-squared), greedy rows,
draws fixed by (seed, position), as torch ops (opcheck, fake tensors, torch.compile) and
bad input.

The oracle reads the same rounded inputs (fp16/bf16 values are exact in float64) and the
ops accumulate in fp32, so scores, logprobs and lse agree to fp32 accuracy in every dtype
(TOL relative to the largest |score|, at most LM_TOL); ids agree exactly but between
scores closer than that (near-ties). Draws use the same Philox bits everywhere: they are
the loop oracle's exactly where its loops run, and the kernels' are the torch backend's.

CPU / GPU: tests run over ``BACKENDS`` (torch; triton under the Triton interpreter and
cuda through the CPU emulator here; triton and cuda on CUDA tensors on a GPU). The CPU
cases run on every backend and together reach every kernel path (CUDA: M <= 2 GEMV,
3..16 16-row tiles, more 64-row tiles; k = 1, <= 8, <= 16, > 16; several tiles per
split; element loads. Triton: 16/32/64-row blocks, k lists up to 64, splits). A case
a backend's CPU stand-in takes seconds over is ``gpu_sized`` on that backend only
(``params``), smaller cases reaching its paths. The grids over M paths, vocabularies,
head dims and dtypes (``TOPK_GRID``, ``SAMPLE_GRID``) are ``gpu_sized`` on the kernel
backends, joined by the torch backend where its tensors are on a GPU (on CPU a 300 x
49152 head takes it seconds; its CPU cases cover it). Forced split counts are a knob of
the triton and cuda entry points (``entry_points``). CUDA graphs and torch.compile on
CUDA tensors are ``cuda`` tests over the GPU backends."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

import naive
from conftest import BACKENDS, BACKEND_DEVICES, capture_graph, entry_points
from law import assert_law

import fastverify
from fastverify.ops import frspec as frspec_ops
from fastverify.ops import philox
from fastverify.triton import frspec as triton_frspec

pytestmark = pytest.mark.family("lm_head")

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
I32, I64 = torch.int32, torch.int64
DTYPES = (F32, BF16, F16)
KERNEL_BACKENDS = [b for b in BACKENDS if b != "torch"]
GRID_BACKENDS = [b for b in BACKENDS if b != "torch" or BACKEND_DEVICES[b] != "cpu"]
GPU_BACKENDS = ("torch", "triton", "cuda")
TOL = {F32: 2e-5, BF16: 1e-4, F16: 1e-4}   # relative to max(1, |score|)
LM_TOL = 5e-4                               # absolute: fp32 accumulation over d <= 576
LOOP_ORACLE_MAX = 20000                     # multiply-adds the oracle's Python loops take


# ----------------------------------------------------------------------------- inputs


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

    def rows(self, sl: slice) -> "Head":
        """The head of hidden rows ``sl`` (same weight and token_map)."""
        cut = lambda t: None if t is None else t[sl]  # noqa: E731
        return replace(self, hidden=self.hidden[sl], temperature=cut(self.temperature), seed=self.seed[sl],
                       positions=self.positions[sl])


def make_head(M, V, d, dtype=F32, *, seed, token_map=I64, temperature=True, scale=1.0) -> Head:
    """Scores of O(2 scale) whatever d, a scattered ``token_map`` (dtype, or None: identity),
    temperatures with greedy (0) and negative rows (both scored at 1), 64-bit seeds and
    positions."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(M, d, generator=g) * scale).to(dtype)
    weight = (torch.randn(V, d, generator=g) * (2.0 / d ** 0.5)).to(dtype)
    tm = None if token_map is None else torch.randperm(3 * V + 5, generator=g)[:V].to(token_map)
    t = None
    if temperature:
        t = torch.rand(M, generator=g) * 1.5 + 0.2
        t[::4] = 0.0
        t[2::7] = -1.0
    return Head(hidden, weight, tm, t, torch.randint(-2**62, 2**62, (M,), generator=g),
                torch.randint(0, 2**40, (M,), generator=g))


def tie_head(M, V, d, distinct, seed, dtype=F32) -> Head:
    """Small-integer weights (exact sums in every dtype) with only ``distinct`` different
    rows: most scores tie exactly."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(-3, 4, (distinct, d), generator=g).float()
    weight = rows[torch.randint(0, distinct, (V,), generator=g)].contiguous()
    hidden = torch.randint(-3, 4, (M, d), generator=g).float()
    t = torch.tensor([1.0, 0.5, 0.0, 3.0] * M)[:M]
    return Head(hidden.to(dtype), weight.to(dtype), torch.randperm(2 * V, generator=g)[:V], t, torch.arange(M),
                torch.arange(M) * 3)


@dataclass(frozen=True)
class Case:
    """One input of an op: make_head's arguments, k (top-k), a forced split count."""
    M: int
    V: int
    d: int
    dtype: torch.dtype
    k: int = 0                        # 0: a sample case
    token_map: torch.dtype | None = I64
    temperature: bool = True
    scale: float = 1.0
    num_splits: int | None = None

    def head(self) -> Head:
        return make_head(self.M, self.V, self.d, self.dtype, seed=self.M * 131 + self.V + self.d + self.k,
                         token_map=self.token_map, temperature=self.temperature, scale=self.scale)

    def __str__(self):
        s = f"M{self.M}_V{self.V}_d{self.d}" + (f"_k{self.k}" if self.k else "") + f"_{str(self.dtype)[6:]}"
        s += {I64: "", I32: "_map32", None: "_nomap"}[self.token_map]
        s += ("" if self.temperature else "_notemp") + (f"_h{self.scale}" if self.scale != 1 else "")
        return s + (f"_splits{self.num_splits}" if self.num_splits else "")


def grid_topk(M, V, d, k, dtype, num_splits=None) -> Case:
    """A case of the grids: an int32 token_map at k = 5, no temperature at k = 1."""
    return Case(M, V, d, dtype, k, token_map=I32 if k == 5 else I64, temperature=k != 1, num_splits=num_splits)


def case_id(c) -> str:
    parts = c if isinstance(c, tuple) else (c,)
    return "-".join(str(v).replace("torch.", "") for v in parts)


def params(cases, gpu_cases=(), *, slow_on=None, backends=BACKENDS, grid_backends=GRID_BACKENDS) -> list:
    """(backend, case) params: ``cases`` on every backend, but those in ``slow_on[backend]``
    (seconds for that backend's CPU stand-in: the interpreter, the emulator, the torch
    backend's float64 noise) go there as ``gpu_cases`` do: ``gpu_sized``, on GRID_BACKENDS."""
    slow_on = slow_on or {}
    out = []
    for c in dict.fromkeys(cases):
        for b in backends:
            if c not in slow_on.get(b, ()):
                out.append(pytest.param(b, c, id=f"{case_id(c)}-{b}"))
            elif b in grid_backends:
                out.append(pytest.param(b, c, id=f"{case_id(c)}-{b}", marks=pytest.mark.gpu_sized))
    out += [pytest.param(b, c, id=f"{case_id(c)}-{b}", marks=pytest.mark.gpu_sized)
            for c in dict.fromkeys(gpu_cases) if c not in cases for b in backends if b in grid_backends]
    return out


# ----------------------------------------------------------------------------- running


def run_topk(x: Head, k, backend, *, num_splits=None, **kw):
    """lm_head_topk of ``x`` (on the backend's device): the public op, or the backend's
    entry point when a split count is forced (the torch backend has no splits)."""
    if num_splits is not None and backend != "torch":
        return entry_points(backend, "lm_head").lm_head_topk(x.hidden, x.weight, k, x.token_map, x.temperature,
                                                             num_splits=num_splits)
    with fastverify.use_backend(backend):
        return fastverify.lm_head_topk(x.hidden, x.weight, k, token_map=x.token_map, temperature=x.temperature, **kw)


def run_sample(x: Head, backend, *, num_splits=None):
    if num_splits is not None and backend != "torch":
        return entry_points(backend, "lm_head").lm_head_sample(x.hidden, x.weight, x.temperature, x.seed,
                                                               x.positions, x.token_map, num_splits=num_splits)
    with fastverify.use_backend(backend):
        return fastverify.lm_head_sample(x.hidden, x.weight, temperature=x.temperature, seed=x.seed,
                                         positions=x.positions, token_map=x.token_map)


# ----------------------------------------------------------------------------- the oracle


def oracle_scores(x: Head) -> torch.Tensor:
    """float64 s [M, V] = hidden[m] · weight[v] / t_m (t <= 0 or none: 1), NaN -> -inf, on
    x's device: naive.py's loops up to LOOP_ORACLE_MAX multiply-adds, a float64 matmul above."""
    (M, d), V = x.hidden.shape, x.weight.shape[0]
    t = torch.ones(M) if x.temperature is None else x.temperature.cpu()
    if M * V * d <= LOOP_ORACLE_MAX:
        w = x.weight.double().tolist()
        s = torch.tensor([naive.subset_scores(h, w, tm) for h, tm in zip(x.hidden.double().tolist(), t.tolist())],
                         dtype=torch.float64).reshape(M, V).to(x.hidden.device)
    else:
        t64 = torch.where(t > 0, t, 1.0).double().to(x.hidden.device)
        s = (x.hidden.double() @ x.weight.double().T) / t64[:, None]
    return torch.where(torch.isnan(s), float("-inf"), s)


def oracle_noisy(x: Head, s: torch.Tensor) -> torch.Tensor:
    """s + Gumbel noise of (seed, position, row) on rows with temperature > 0, s on the others
    (philox.gumbel is naive.gumbel vectorized: test_gumbel_helper_matches_oracle)."""
    V, dev = s.shape[1], s.device
    g = philox.gumbel(x.seed[:, None], x.positions[:, None], torch.arange(V, device=dev)[None, :])
    return torch.where((x.temperature > 0)[:, None], s + g, s)


def tolerance(dtype, s: torch.Tensor, times: float = 1.0) -> float:
    """``times`` TOL[dtype] relative to the largest finite |score|, at most LM_TOL: the
    tighter of the two tolerances the family's tests had (times = 2 for a difference of
    two computed values: a logprob, a gap of noisy scores)."""
    finite = s[torch.isfinite(s)]
    top = finite.abs().max().item() if finite.numel() else 1.0
    return min(LM_TOL, times * TOL[dtype] * max(1.0, top))


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b|, equal infinities counting as 0."""
    d = torch.where(a == b, 0.0, (a.double() - b.double()).abs())
    return d.max().item() if d.numel() else 0.0


def subset_rows(ids: torch.Tensor, token_map) -> torch.Tensor:
    """The subset rows of full-vocabulary ids (-1 for an id token_map does not hold)."""
    ids = ids.long()
    if token_map is None:
        return ids
    tm = token_map.to(ids.device).long()
    inverse = torch.full((int(tm.max()) + 1,), -1, dtype=torch.long, device=ids.device)
    inverse[tm] = torch.arange(tm.numel(), device=ids.device)
    ok = (ids >= 0) & (ids < inverse.numel())
    return torch.where(ok, inverse[ids.clamp(0, inverse.numel() - 1)], -1)


def oracle_topk_rows(s: torch.Tensor, k: int) -> torch.Tensor:
    """The oracle's top-k subset rows: higher score first, ties to the lower row."""
    return s.sort(dim=1, descending=True, stable=True).indices[:, :k]


def assert_topk(got, x: Head, k: int, what: str = "") -> None:
    """got = (ids, logprobs, lse): at every rank j the returned id's oracle score is the
    j-th best (so ids differ from the oracle's only between near-ties), ids distinct and in
    token_map, logprobs = score - lse, and lse."""
    ids, lp, lse = got
    M, V = x.hidden.shape[0], x.weight.shape[0]
    assert ids.shape == (M, k) and lp.shape == (M, k) and lse.shape == (M,), what
    assert ids.dtype == torch.int64 and lp.dtype == torch.float32 and lse.dtype == torch.float32, what
    s = oracle_scores(x)
    lse64 = torch.logsumexp(s, 1)
    rows = subset_rows(ids.to(s.device), x.token_map)
    assert ((rows >= 0) & (rows < V)).all(), f"{what}: ids outside token_map: {ids.tolist()}"
    assert k == 1 or (rows.sort(1).values.diff(dim=1) > 0).all(), f"{what}: repeated ids {ids.tolist()}"
    got_s = s.gather(1, rows)
    tol, tol2 = tolerance(x.hidden.dtype, s), tolerance(x.hidden.dtype, s, 2)
    err = max_err(got_s, s.topk(k, 1).values)
    assert err <= tol, f"{what}: returned ids are not the top-{k} (score error {err:.3g}, tol {tol:.3g})"
    err = max_err(lse.to(s.device), lse64)
    assert err <= tol, f"{what}: lse error {err:.3g} > {tol:.3g}"
    err = max_err(lp.to(s.device), got_s - lse64[:, None])
    assert err <= tol2, f"{what}: logprob error {err:.3g} > {tol2:.3g}"


def assert_sample(got, x: Head, what: str = "") -> None:
    """got = (ids, logprobs, lse): the drawn row is the argmax of the oracle's s + g (ties
    within tolerance aside; exactly naive.lm_head_sample's draw where the loops are cheap),
    its logprob, and lse."""
    ids, lp, lse = got
    (M, d), V = x.hidden.shape, x.weight.shape[0]
    assert ids.shape == lp.shape == lse.shape == (M,) and ids.dtype == torch.int64, what
    assert lp.dtype == lse.dtype == torch.float32, what
    s = oracle_scores(x)
    noisy = oracle_noisy(x, s)
    rows = subset_rows(ids.to(s.device), x.token_map)
    assert ((rows >= 0) & (rows < V)).all(), f"{what}: ids outside token_map: {ids.tolist()}"
    tol, tol2 = tolerance(x.hidden.dtype, s), tolerance(x.hidden.dtype, s, 2)
    want = noisy.argmax(1)
    gap = (noisy.gather(1, rows[:, None]) - noisy.gather(1, want[:, None]))[:, 0].abs()
    assert (torch.eq(rows, want) | (gap <= tol2)).all(), f"{what}: drawn rows {rows.tolist()}, want {want.tolist()}"
    lse64 = torch.logsumexp(s, 1)
    err = max_err(lse.to(s.device), lse64)
    assert err <= tol, f"{what}: lse error {err:.3g} > {tol:.3g}"
    err = max_err(lp.to(s.device), s.gather(1, rows[:, None])[:, 0] - lse64)
    assert err <= tol2, f"{what}: logprob error {err:.3g} > {tol2:.3g}"
    if M * V * d <= LOOP_ORACLE_MAX:
        tl_ = lambda t: None if t is None else t.tolist()  # noqa: E731
        want_ids, _, _ = naive.lm_head_sample(x.hidden.double().tolist(), x.weight.double().tolist(),
                                              x.temperature.tolist(), x.seed.tolist(), x.positions.tolist(),
                                              tl_(x.token_map))
        assert ids.tolist() == want_ids, f"{what}: not naive.lm_head_sample's draw"


# ----------------------------------------------------------------------------- lm_head_topk vs oracle

TOPK_CPU = [
    # the torch / Triton cases: odd sizes, every dtype, identity and int64 maps
    Case(1, 1, 8, F32, 1, token_map=None, temperature=False),
    Case(3, 37, 8, F32, 5),
    Case(3, 37, 80, BF16, 1),
    Case(1, 37, 80, F16, 37, temperature=False),
    Case(1, 300, 80, F32, 64, temperature=False),
    Case(3, 300, 8, F16, 5, token_map=None),
    Case(300, 37, 8, F32, 5),
    Case(300, 300, 8, BF16, 64),
    Case(3, 1000, 80, F32, 64),
    Case(1, 1000, 8, F16, 1, token_map=None, temperature=False),
    Case(3, 1000, 80, BF16, 5),
    # every CUDA path (M <= 2: GEMV; 3..16: 16-row tensor-core tiles, fp32: 8-row GEMV;
    # more: 64-row tiles), every top-k mode (k = 1, <= 8, <= 16: thread lists; > 16:
    # bitonic), several tiles per split, element loads (d = 33), a 49152-row head
    grid_topk(1, 1, 8, 1, F32),
    grid_topk(3, 37, 80, 5, BF16),
    grid_topk(2, 1000, 80, 64, F16),
    grid_topk(1, 1000, 576, 8, BF16, 2),
    grid_topk(5, 1000, 80, 12, F32, 3),
    grid_topk(20, 300, 80, 16, BF16),
    grid_topk(70, 1000, 48, 20, F16, 2),
    grid_topk(7, 1000, 48, 64, BF16, 1),
    grid_topk(300, 37, 33, 5, F32),
    grid_topk(40, 37, 33, 37, F16),
    grid_topk(300, 1000, 80, 64, F16),
    grid_topk(64, 4097, 256, 8, BF16),
    grid_topk(3, 49152, 8, 5, BF16),
    grid_topk(1, 49152, 576, 64, BF16),
    grid_topk(1, 49152, 8, 1, F32),
    grid_topk(2, 300, 80, 20, F16, 1),       # 64-row GEMV tiles (few 128-row tiles), several per split
    grid_topk(1, 300, 80, 8, BF16),
    grid_topk(3, 150, 16, 5, F32),
]
# (M, V_sub, d): V_sub never a multiple of the 128-row tile but for the 1-row case; M on each path
LM_HEAD_SHAPES = [(M, V, d) for M in (1, 3, 300) for V in (1, 37, 1000, 49152) for d in (8, 80, 576)]
TOPK_GRID = [grid_topk(M, V, d, k, dtype)
             for (M, V, d), k, dtype in itertools.product(LM_HEAD_SHAPES, (1, 5, 64), DTYPES) if k <= V]
TOPK_GRID += [grid_topk(M, V, d, k, dtype) for (M, V, d, k), dtype in itertools.product(
    [(16, 5000, 128, 8), (17, 5000, 128, 12), (64, 32768, 256, 8), (64, 32768, 256, 16), (64, 4097, 4096, 8),
     (8, 3000, 96, 33)], DTYPES)]
# Seconds under the Triton interpreter (a k = 64 list over many tiles, 49152-row heads);
# smaller cases reach the same Triton paths
TOPK_SLOW = {"triton": {Case(300, 300, 8, BF16, 64), Case(3, 1000, 80, F32, 64), grid_topk(2, 1000, 80, 64, F16),
                        grid_topk(70, 1000, 48, 20, F16, 2), grid_topk(7, 1000, 48, 64, BF16, 1),
                        grid_topk(40, 37, 33, 37, F16), grid_topk(300, 1000, 80, 64, F16),
                        grid_topk(64, 4097, 256, 8, BF16), grid_topk(3, 49152, 8, 5, BF16),
                        grid_topk(1, 49152, 576, 64, BF16), grid_topk(1, 49152, 8, 1, F32)}}


@pytest.mark.parametrize("backend,case", params(TOPK_CPU, TOPK_GRID, slow_on=TOPK_SLOW))
def test_topk_matches_oracle(backend, case):
    x = case.head().to(BACKEND_DEVICES[backend])
    assert_topk(run_topk(x, case.k, backend, num_splits=case.num_splits), x, case.k, f"{case} on {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("V,k", [(37, 5), (300, 64), (300, 8)])
def test_topk_ties_go_to_the_lower_subset_row(backend, V, k):
    p = tie_head(4, V, 8, 6, seed=V + k)
    ids, _, _ = run_topk(p.to(BACKEND_DEVICES[backend]), k, backend)
    want, _, _ = naive.lm_head_topk(p.hidden.tolist(), p.weight.tolist(), k, p.token_map.tolist(),
                                    p.temperature.tolist())
    assert ids.tolist() == want


NAN_ROWS = [0, *range(20, 30), 299]


def special_head(dtype) -> Head:
    """Exact ties (duplicated weight rows), NaN weight rows (first, middle, last), a zero
    weight row, an all-zero hidden row (every finite score 0) and a row whose every score
    is NaN (hidden row 1)."""
    p = make_head(5, 300, 40, F32, seed=17, token_map=I32)
    w, h = p.weight, p.hidden
    w[10] = w[3]
    w[200] = w[3]
    w[50] = w[7]
    w[NAN_ROWS] = float("nan")
    w[40] = 0.0
    h[0] = 0.0
    h[1, 5] = float("nan")
    return replace(p, hidden=h.to(dtype), weight=w.to(dtype))


@pytest.mark.parametrize("backend,dtype", params([F32, F16, BF16], slow_on={"triton": {F16, BF16}, "cuda": {BF16}}))
def test_special_values(backend, dtype):
    """NaN scores count as -inf (never ahead of a finite one), ties go to the lower subset
    row, all-equal scores give the lowest rows at -log(n), an all-NaN row still returns the
    lowest rows (lse -inf), and nothing leaves token_map; the sample op draws the oracle's
    row on every row."""
    x = special_head(dtype).to(BACKEND_DEVICES[backend])
    finite = [v for v in range(300) if v not in NAN_ROWS]
    s = oracle_scores(x)
    for k in (1, 8, 16, 40):
        ids, lp, lse = run_topk(x, k, backend)
        rows = subset_rows(ids, x.token_map).cpu()
        assert rows[0].tolist() == finite[:k], "equal scores -> the lowest finite rows"
        assert torch.allclose(lp[0].cpu(), torch.full((k,), -math.log(len(finite))))
        assert lse[0].item() == pytest.approx(math.log(len(finite)), abs=1e-5)
        assert rows[1].tolist() == list(range(k)) and lse[1].item() == float("-inf"), "all scores NaN"
        assert rows[2:].tolist() == oracle_topk_rows(s[2:], k).tolist(), "ties -> the lower row; NaN last"
        assert_topk((ids[2:], lp[2:], lse[2:]), x.rows(slice(2, None)), k, f"k={k}")
    ids, _, _ = run_sample(x, backend)
    rows = subset_rows(ids, x.token_map)
    assert rows.tolist() == oracle_noisy(x, s).argmax(1).tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_int32_token_map_and_number_temperature(backend):
    x = make_head(3, 37, 8, seed=3, token_map=I32, temperature=False).to(BACKEND_DEVICES[backend])
    assert_topk(run_topk(x, 4, backend, vocab_size=200), x, 4)
    with fastverify.use_backend(backend):
        got = fastverify.lm_head_topk(x.hidden, x.weight, 4, token_map=x.token_map, temperature=0.7)
    assert_topk(got, replace(x, temperature=torch.full((3,), 0.7, device=x.hidden.device)), 4)


# (M, dtype, layout): "aligned" rows of a (d + 8)-wide buffer (16-byte aligned: vector
# loads), "odd_stride" columns 3.. of a (d + 3)-wide one (rows off the 16-byte grid:
# element loads), "offset5" columns 5.. of a (d + 24)-wide one
STRIDED = [(M, BF16, layout) for M in (2, 5, 40) for layout in ("aligned", "odd_stride")] + [(3, F32, "offset5")]
STRIDED_GPU = [(M, dtype, layout) for M in (2, 5, 40) for dtype in (F32, F16) for layout in ("aligned", "odd_stride")]
LAYOUTS = {"aligned": (8, 0), "odd_stride": (3, 3), "offset5": (24, 5)}


# one row layout of each kind is enough for Triton (no vector loads to choose)
STRIDED_SLOW = {"triton": {c for c in STRIDED if c[1] == BF16 and c[:1] != (5,)}}


@pytest.mark.parametrize("backend,case", params(STRIDED, STRIDED_GPU, slow_on=STRIDED_SLOW))
def test_topk_strided_hidden_rows(backend, case):
    (M, dtype, layout), d = case, 64
    x = make_head(M, 700, d, dtype, seed=23 + M).to(BACKEND_DEVICES[backend])
    pad, offset = LAYOUTS[layout]
    buf = torch.zeros(M, d + pad, dtype=dtype, device=x.hidden.device)
    view = buf[:, offset:offset + d]
    view.copy_(x.hidden)
    assert_topk(run_topk(replace(x, hidden=view), 8, backend), x, 8, f"M={M}, {layout}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_map", [True, False])
def test_zero_rows(backend, with_map):
    x = make_head(0, 37, 8, seed=5, token_map=I64 if with_map else None).to(BACKEND_DEVICES[backend])
    ids, lps, lse = run_topk(x if with_map else replace(x, temperature=None), 3, backend)
    assert ids.shape == (0, 3) and lps.shape == (0, 3) and lse.shape == (0,)
    ids, lps, lse = run_sample(x, backend)
    assert ids.shape == lps.shape == lse.shape == (0,)


# ----------------------------------------------------------------------------- lm_head_sample vs oracle

SAMPLE_CPU = [
    Case(1, 1, 8, F32, token_map=None, scale=0.3),
    Case(5, 37, 8, F32, scale=0.3),
    Case(3, 300, 80, BF16, scale=0.3),
    Case(3, 1000, 8, F16, token_map=None, scale=0.3),
    Case(300, 37, 8, F32, scale=0.3),
    # the CUDA paths, as for top-k
    Case(1, 1, 8, F32),
    Case(3, 37, 80, BF16),
    Case(2, 1000, 80, F16),
    Case(12, 1000, 48, F32),
    Case(70, 700, 33, BF16),
    Case(300, 1000, 80, F16),
    Case(1, 49152, 80, BF16),
    Case(2, 300, 40, F32),
    Case(3, 150, 16, F32),
]
SAMPLE_GRID = [Case(M, V, d, dtype) for (M, V, d), dtype in itertools.product(
    LM_HEAD_SHAPES + [(5, 1000, 80), (2, 49152, 80), (64, 49152, 576)], DTYPES)]
# seconds under the interpreter, and for the torch backend, whose noise is float64
SAMPLE_SLOW = {"triton": {Case(300, 1000, 80, F16), Case(1, 49152, 80, BF16), Case(70, 700, 33, BF16)},
               "torch": {Case(300, 1000, 80, F16), Case(1, 49152, 80, BF16)}}


# the sampling oracle is a float64 loop (~10 s per grid case on CPU): the grid runs on GPU
# backends only; on CPU the cpu backend's paths are checked against it in the cpu tests below
# and against the torch backend's draws (test_sample_kernels_draw_the_torch_backends_tokens)
SAMPLE_GRID_BACKENDS = [b for b in GRID_BACKENDS if BACKEND_DEVICES[b] != "cpu"]


@pytest.mark.parametrize("backend,case", params(SAMPLE_CPU, SAMPLE_GRID, slow_on=SAMPLE_SLOW,
                                                grid_backends=SAMPLE_GRID_BACKENDS))
def test_sample_matches_oracle(backend, case):
    x = case.head().to(BACKEND_DEVICES[backend])
    assert_sample(run_sample(x, backend), x, f"{case} on {backend}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", [Case(3, 150, 16, F32)] + [
    pytest.param(Case(M, 1000, 80, dtype), marks=pytest.mark.gpu_sized) for M in (5, 300) for dtype in DTYPES],
    ids=str)
def test_sample_kernels_draw_the_torch_backends_tokens(backend, case):
    """Same Philox bits, same draws: the kernels' tokens equal the spec's (the torch backend)
    exactly, where the loop oracle would take too long to say so."""
    p = case.head()
    want, _, _ = run_sample(p.to(BACKEND_DEVICES["torch"]), "torch")
    got, _, _ = run_sample(p.to(BACKEND_DEVICES[backend]), backend)
    assert got.tolist() == want.tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_greedy_rows_take_the_argmax(backend):
    p = tie_head(8, 300, 8, 5, seed=6)
    p.temperature = torch.tensor([0.0, -1.0, 0.0, 0.0, -0.5, 0.0, 0.0, 0.0])
    ids, lps, lse = run_sample(p.to(BACKEND_DEVICES[backend]), backend)
    top, top_lp, _ = naive.lm_head_topk(p.hidden.tolist(), p.weight.tolist(), 1, p.token_map.tolist(), None)
    assert ids.tolist() == [t[0] for t in top]                          # ties: the lower row
    assert torch.allclose(lps.cpu().double(), torch.tensor([t[0] for t in top_lp], dtype=torch.float64), atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.6, 1.7])
def test_sample_law(backend, temperature):
    """One hidden state drawn at N positions: the tokens follow softmax(scores / T)."""
    N, V, d = 2000, 12, 8
    p = make_head(1, V, d, seed=7, token_map=None, temperature=False, scale=0.7)
    law = torch.softmax(oracle_scores(p)[0] / temperature, 0).numpy()
    rep = Head(p.hidden.expand(N, d).contiguous(), p.weight, None, torch.full((N,), temperature),
               torch.full((N,), 123), torch.arange(N) + 2**32 - 100)       # positions cross 2^32
    ids, _, _ = run_sample(rep.to(BACKEND_DEVICES[backend]), backend)
    assert_law(np.bincount(ids.cpu().numpy(), minlength=V).astype(np.float64), law, f"lm_head_sample T={temperature}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,rows", [(Case(6, 300, 8, F32, scale=0.2), (0, 3, 5)),
                                       pytest.param(Case(12, 3000, 128, BF16), (0, 5, 11),
                                                    marks=pytest.mark.gpu_sized)], ids=case_id)
def test_sample_depends_only_on_seed_and_position(backend, case, rows):
    """The same (seed, position) draws the same token on every call, batch composition
    aside: row m alone gives what it gives inside the batch."""
    x = case.head().to(BACKEND_DEVICES[backend])
    ids, lps, _ = run_sample(x, backend)
    for m in rows:
        i1, lp1, _ = run_sample(x.rows(slice(m, m + 1)), backend)
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


# ----------------------------------------------------------------------------- V_sub splits


@pytest.mark.parametrize("backend,dtype", params([F32, BF16], [F16], slow_on={"triton": {BF16}},
                                                 backends=KERNEL_BACKENDS))
def test_splits_keep_exact_ties_and_draws(backend, dtype):
    """Exact ties across splits keep the lower row, and draws stay the oracle's, at every
    split count."""
    dev = BACKEND_DEVICES[backend]
    t = tie_head(3, 700, 8, 9, seed=9, dtype=dtype).to(dev)
    want, _, _ = naive.lm_head_topk(t.hidden.double().tolist(), t.weight.double().tolist(), 8,
                                    t.token_map.tolist(), t.temperature.tolist())
    q = make_head(3, 700, 8, dtype, seed=10, scale=0.2).to(dev)
    for num_splits in (1, 2, 5):
        got = run_topk(t, 8, backend, num_splits=num_splits)
        assert got[0].tolist() == want, f"{num_splits} splits"
        assert_topk(got, t, 8, f"{num_splits} splits")
        assert_sample(run_sample(q, backend, num_splits=num_splits), q, f"{num_splits} splits")


@pytest.mark.parametrize("backend,dtype", params([F32, BF16], [F16], slow_on={"triton": {F32, BF16}},  # 20 s each
                                                 backends=KERNEL_BACKENDS))                # in the interpreter
def test_every_split_count_gives_the_same_result(backend, dtype):
    """Every split count (and both merge widths) gives the same ids and close logprobs."""
    x = make_head(6, 1430, 64, dtype, seed=5).to(BACKEND_DEVICES[backend])    # the last tile: 22 rows
    for k in (1, 8, 16, 40):
        first = run_topk(x, k, backend, num_splits=1)
        for num_splits in (2, 5, 12, None):               # None: the launcher's choice
            got = run_topk(x, k, backend, num_splits=num_splits)
            assert torch.equal(got[0], first[0]), f"k={k}: ids with {num_splits} splits"
            assert torch.allclose(got[1], first[1], atol=1e-5) and torch.allclose(got[2], first[2], atol=1e-5)
    first = run_sample(x, backend, num_splits=1)
    for num_splits in (3, 12, None):
        got = run_sample(x, backend, num_splits=num_splits)
        assert torch.equal(got[0], first[0]) and torch.allclose(got[2], first[2], atol=1e-5)


def test_torch_backend_merges_its_chunks(monkeypatch):
    """The torch backend scores V_sub in chunks (of at least 1024 rows here): the running
    top-k, lse and argmax carry across chunks, ties across chunks to the lower row."""
    monkeypatch.setattr(frspec_ops, "CHUNK_ELEMENTS", 1)
    x = make_head(3, 3000, 16, seed=18, scale=0.3)
    assert_topk(run_topk(x, 64, "torch"), x, 64)
    assert_sample(run_sample(x, "torch"), x)
    t = tie_head(3, 3000, 8, 9, seed=19)
    want, _, _ = naive.lm_head_topk(t.hidden.tolist(), t.weight.tolist(), 64, t.token_map.tolist(),
                                    t.temperature.tolist())
    assert run_topk(t, 64, "torch")[0].tolist() == want


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


@pytest.mark.skipif("cuda" not in BACKENDS, reason="no cuda backend here (FASTVERIFY_EMULATE_CUDA=0)")
def test_cuda_library_schemas_take_splits_and_stream():
    """The CUDA extension's ops (emulated on CPU: the same bindings file) take the split
    count and the stream explicitly."""
    ops = entry_points("cuda", "lm_head").lm_head_topk.__self__.ops()   # the entry points' Kernels
    assert "num_splits" in str(ops.lm_head_topk._schema) and "cuda_stream" in str(ops.lm_head_topk._schema)
    assert "num_splits" in str(ops.lm_head_sample._schema) and "cuda_stream" in str(ops.lm_head_sample._schema)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", [Case(4, 100, 16, BF16), pytest.param(Case(10, 4000, 256, BF16),
                                                                         marks=pytest.mark.gpu_sized)], ids=str)
def test_public_ops_run_the_backends_kernels(backend, case):
    x = case.head().to(BACKEND_DEVICES[backend])
    kern = entry_points(backend, "lm_head")
    got = run_topk(x, 8, backend)
    direct = kern.lm_head_topk(x.hidden, x.weight, 8, x.token_map, x.temperature)
    assert all(torch.equal(a, b) for a, b in zip(got, direct))
    got = run_sample(x, backend)
    direct = kern.lm_head_sample(x.hidden, x.weight, x.temperature, x.seed, x.positions, x.token_map)
    assert all(torch.equal(a, b) for a, b in zip(got, direct))


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

    p = make_head(5, 37, 16, BF16, seed=12)
    with FakeTensorMode() as mode:
        f = mode.from_tensor
        ids, lps, lse = torch.ops.fastverify.lm_head_topk(f(p.hidden), f(p.weight), 6, token_map=f(p.token_map))
        assert ids.shape == (5, 6) and ids.dtype == torch.int64 and lps.dtype == torch.float32 and lse.shape == (5,)
        ids, lps, lse = torch.ops.fastverify.lm_head_sample(f(p.hidden), f(p.weight), temperature=f(p.temperature),
                                                            seed=f(p.seed), positions=f(p.positions))
        assert ids.shape == lps.shape == lse.shape == (5,) and ids.dtype == torch.int64


def draft_step(hidden, weight, token_map, temperature, seed, positions):
    """A drafter's step through both ops, with ops around them for the compiler to fuse."""
    ids, lps, lse = torch.ops.fastverify.lm_head_topk(hidden * 1.0, weight, 5, token_map=token_map,
                                                      temperature=temperature)
    tok, lp, _ = torch.ops.fastverify.lm_head_sample(hidden, weight, temperature=temperature, seed=seed,
                                                     positions=positions + 1, token_map=token_map)
    return ids, lps.exp(), lse, tok, lp


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    x = make_head(4, 300, 16, seed=13).to(BACKEND_DEVICES[backend])
    args = (x.hidden, x.weight, x.token_map, x.temperature, x.seed, x.positions)
    with fastverify.use_backend(backend):
        want = draft_step(*args)
        got = torch.compile(draft_step, fullgraph=True, backend="aot_eager")(*args)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


# ----------------------------------------------------------------------------- on a GPU


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_replay_follows_new_inputs(backend):
    x = make_head(20, 6000, 512, BF16, seed=31).to("cuda")
    calls = (lambda: run_topk(x, 8, backend), lambda: run_topk(replace(x, temperature=None), 40, backend),
             lambda: run_sample(x, backend))
    for fn in calls:
        graph, outs = capture_graph(fn)
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(outs, fn())), "replay vs eager"
        before = [o.clone() for o in outs]
        x.hidden.copy_(torch.randn_like(x.hidden))
        x.seed.add_(1)
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(outs, fn())), "the replay follows new inputs"
        assert not torch.equal(outs[0], before[0])


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_torch_compile_fullgraph_on_gpu(backend):
    x = make_head(20, 6000, 512, BF16, seed=31).to("cuda")
    args = (x.hidden, x.weight, x.token_map, x.temperature, x.seed, x.positions)
    with fastverify.use_backend(backend):
        got = torch.compile(draft_step, fullgraph=True)(*args)
        want = draft_step(*args)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


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


BAD_SAMPLE = {
    "seed_dtype": (lambda p: dict(seed=p.seed.int()), "seed must be int64"),
    "seed_shape": (lambda p: dict(seed=p.seed[:1]), "seed must have shape \\[3\\]"),
    "positions_dtype": (lambda p: dict(positions=p.positions.float()), "positions must be int64"),
    "positions_negative": (lambda p: dict(positions=torch.tensor([0, -1, 2])), "positions must be >= 0"),
    "temperature_2d": (lambda p: dict(temperature=p.temperature[None]), "temperature must have 1 dimension"),
    "token_map_negative": (lambda p: dict(token_map=-1 - p.token_map), "token_map\\[0\\] = -\\d+ is outside"),
    "d_mismatch": (lambda p: dict(hidden=p.hidden[:, :4].contiguous()), "weight has d = 16 columns but hidden has d = 4"),
}

BAD_INPUT = {**{f"topk_{name}": (topk_args, *c) for name, c in BAD_TOPK.items()},
             **{f"sample_{name}": (sample_args, *c) for name, c in BAD_SAMPLE.items()}}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_named(case):
    call, make, msg = BAD_INPUT[case]
    p = make_head(3, 37, 16, seed=14)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=msg):
        call(p, **make(p))


def test_non_tensor_arguments_are_named():
    p = make_head(3, 37, 16, seed=16)
    with pytest.raises(TypeError, match="temperature must be a \\[B\\] tensor or a Python number"):
        fastverify.lm_head_sample(p.hidden, p.weight, temperature="hot", seed=0, positions=0)
    with pytest.raises(TypeError, match="hidden must be a torch.Tensor"):
        frspec_ops.check_lm_head_topk([[1.0]], p.weight, 1, None, None, None)


# ----------------------------------------------------------------------------- the cpu backend


CPU_ONLY = pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is unavailable here")
# each cpu path: dot-product blocks (M < 32, fp32/fp16 always), packed bf16 blocks (M >= 32 with
# AVX512-BF16), several row chunks (M > 64), a last tile of V_sub % 96 rows, odd d (masked tails)
CPU_PATHS = [Case(M, V, d, dtype, k) for (M, V, d, k), dtype in itertools.product(
    [(1, 1000, 257, 8), (5, 97, 96, 5), (31, 700, 33, 16), (32, 700, 64, 1), (70, 500, 129, 40)], DTYPES)]


@CPU_ONLY
@pytest.mark.parametrize("case", CPU_PATHS, ids=str)
def test_cpu_every_path_and_dtype_matches_oracle(case):
    x = case.head()
    assert_topk(run_topk(x, case.k, "cpu"), x, case.k, f"{case} on cpu")
    assert_sample(run_sample(x, "cpu"), x, f"{case} on cpu")


@CPU_ONLY
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_one_and_two_threads_give_the_same_bits(dtype):
    """Tiles and merge orders depend on the shapes only: 1 and 2 threads agree bit for bit."""
    heads = [make_head(M, V, d, dtype, seed=40 + M) for M, V, d in ((1, 2000, 64), (40, 1000, 80), (70, 300, 33))]
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append([(*run_topk(x, 8, "cpu"), *run_sample(x, "cpu")) for x in heads])
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        assert all(torch.equal(a, b) for a, b in zip(one, two))


@CPU_ONLY
@pytest.mark.parametrize("M,dtype", [(1, BF16), (20, BF16), (64, BF16), (100, BF16), (40, F16), (40, F32)], ids=case_id)
def test_cpu_draws_the_torch_backends_tokens_for_many_seeds(M, dtype):
    """The same seeds give the same tokens as the torch backend (the Gumbel noise has the
    same fp32 bits), on both bf16 paths, for several seeds per row."""
    x = make_head(M, 3000, 128, dtype, seed=M, scale=0.5)
    x.temperature[x.temperature <= 0] = 0.7                    # noise on every row
    for step in range(3):
        y = replace(x, seed=x.seed + 1000 * step, positions=x.positions + step)
        want = run_sample(y, "torch")
        got = run_sample(y, "cpu")
        assert got[0].tolist() == want[0].tolist(), f"step {step}"
        assert torch.allclose(got[1], want[1], atol=tolerance(dtype, oracle_scores(y), 2))


@CPU_ONLY
def test_cpu_gumbel_noise_is_the_torch_backends():
    """The kernel's fp32 noise (Philox, then float64 -log(-log u) rounded) equals
    philox.gumbel(...).float(): the drawn rows of a sweep of counters, and chosen bits up
    to the extremes x = 0 and x = 2^24 - 1."""
    from fastverify.cpu import frspec as cpu_frspec

    for seed, pos, v0 in ((0, 0, 0), (-1, 2**32 + 7, 1000), (2**62 + 5, 17, 2**31 - 20000)):
        got = cpu_frspec.gumbel(seed, pos, v0, 20000)
        want = philox.gumbel(torch.tensor(seed), torch.tensor(pos), torch.arange(v0, v0 + 20000)).float()
        assert torch.equal(got, want), (seed, pos, v0)
    xs = [0, 1, 2, 2**22, 2**23 - 1, 2**23, 2**23 + 1, 2**24 - 1000, 2**24 - 3, 2**24 - 2, 2**24 - 1]
    xs += list(range(0, 2**24, 4099))
    o0 = torch.tensor([(x << 8) | 0x5A for x in xs], dtype=torch.int64)
    u = (torch.tensor(xs, dtype=torch.float64) + 0.5) * 2.0**-24
    assert torch.equal(cpu_frspec.gumbel_of_bits(o0), (-torch.log(-torch.log(u))).float())


@CPU_ONLY
def test_cpu_gumbel_filter_bound_holds_for_every_bits():
    """The sample kernel skips the logarithms of rows whose s + bound(x) cannot reach the best
    so far: the bound is above the noise for every one of the 2^24 values of x = o0 >> 8."""
    from fastverify.cpu import frspec as cpu_frspec

    o0 = torch.arange(2**24, dtype=torch.int64) << 8
    g, bound = cpu_frspec.gumbel_of_bits(o0, bound=True)
    assert bool((bound >= g).all()) or bool((bound == float("-inf")).all())    # -inf: no filter in this build

