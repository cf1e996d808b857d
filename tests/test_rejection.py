"""fastverify.rejection_sample and tree_rejection_sample on every backend: the emitted
tokens equal the naive float64 oracles' (naive.py) exactly (same Philox bits, no
tolerance) on random batches over every dtype, draft_probs / top-k / top-p setting, chunk
width and tree shape, on hand-made exact cases, NaN/inf and strided logits; bad input is
refused with the argument named.

CPU / GPU: tests run over ``BACKENDS`` (here torch, triton under the Triton interpreter,
cuda through the CPU emulator; on a GPU triton and cuda on CUDA tensors). The dtype x
draft_probs x filter grids run whole on a GPU; on CPU the emulator runs the subset that
reaches every kernel path, the interpreter its plain points, and the rest is
``gpu_sized`` (torch only; FASTVERIFY_EMULATE_FULL=1 runs all). Beyond 2048 tokens the
oracle's loops would take minutes, so the torch spec on CPU is the reference there and
the torch backend joins only on CUDA tensors. Chunk widths are an entry-point knob (triton
and cuda). CUDA graphs, streams and torch.compile on CUDA tensors are ``cuda`` tests over
the GPU backends.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch

import naive
from conftest import BACKENDS, BACKEND_DEVICES, capture_graph, entry_points
from problems import (Chain, Tree, chain_problem, multi_path_problem, random_tree, run_chain, run_tree, tree_depth,
                      tree_problem)

import fastverify
from fastverify.ops import rejection as ops_rejection
from fastverify.ops.rejection import rejection_sample_torch, tree_rejection_sample_torch

pytestmark = pytest.mark.family("rejection")

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
DTYPES = (F32, BF16, F16)
BIG_V = 128256
ORACLE_MAX_V = 2048
ALL = tuple(BACKENDS)
KERNEL_BACKENDS = [b for b in BACKENDS if b != "torch"]   # backends with entry points (chunk_size)
GPU_BACKENDS = ("torch", "triton", "cuda")
GPU = "cuda"


# ----------------------------------------------------------------------------- running and comparing


def positional(p: Chain) -> tuple:
    """The op's arguments in the entry points' positional order (the rule's only where set)."""
    ids = (p.logits, p.drafts, p.parents, p.cu) if isinstance(p, Tree) else (p.logits, p.drafts, p.cu)
    args = (*ids, p.draft_probs, p.temperature, p.top_k, p.top_p, p.seed, p.positions, p.max_draft_len)
    if p.verify is None:
        return args
    if isinstance(p, Tree):
        return (*args, p.verify)
    B = p.cu.numel() - 1
    eps, delta = p.typical_eps, p.typical_delta
    if p.verify == "typical":     # the entry points take (ε, δ) tensors, as the op hands them over
        eps = torch.full((B,), 0.09, device=p.logits.device) if eps is None else eps
        delta = torch.full((B,), 0.3, device=p.logits.device) if delta is None else delta
    return (*args, p.verify, eps, delta)


def run(p: Chain, backend: str, chunk: int | None = None) -> tuple:
    """The op of ``p`` (a Chain or a Tree) on ``backend``: the public op, or the backend's
    entry point when a chunk width is forced. Outputs on CPU."""
    tree = isinstance(p, Tree)
    if chunk is None:
        return run_tree(p, backend) if tree else run_chain(p, backend)
    kern = entry_points(backend, "rejection")
    fn = kern.tree_rejection_sample if tree else kern.rejection_sample
    return tuple(t.cpu() for t in fn(*positional(p.to(BACKEND_DEVICES[backend])), chunk_size=chunk))


def public_op(p: Chain):
    """The public op of p on p's tensors, outputs where they are."""
    if isinstance(p, Tree):
        return fastverify.tree_rejection_sample(p.logits, p.drafts, p.parents, p.cu, max_depth=p.max_draft_len,
                                                **p.kwargs())
    return fastverify.rejection_sample(p.logits, p.drafts, p.cu, max_draft_len=p.max_draft_len, **p.kwargs())


def reference(p: Chain) -> tuple:
    """The naive oracle's outputs as int32 tensors; beyond ORACLE_MAX_V tokens the torch
    spec on CPU (the loops would take minutes)."""
    tree = isinstance(p, Tree)
    if p.logits.shape[1] <= ORACLE_MAX_V:
        res = (naive.tree_rejection_sample if tree else naive.rejection_sample)(*p.oracle_args(), **p.oracle_kwargs())
        return tuple(torch.tensor(x, dtype=torch.int32) for x in res)
    spec = tree_rejection_sample_torch if tree else rejection_sample_torch
    return spec(*positional(p.to("cpu")))


_CASES: dict = {}


def once(key, build):
    """``build()`` once per key, shared by the tests of every backend (only the last few
    kept: the grids' 128k-token problems are large)."""
    if key not in _CASES:
        if len(_CASES) >= 8:
            _CASES.pop(next(iter(_CASES)))
        _CASES[key] = build()
    return _CASES[key]


def with_reference(p: Chain) -> tuple:
    return p, reference(p)


def assert_same(got, want, what: str = "") -> None:
    names = ("accepted_nodes", "output_tokens", "num_accepted")[-len(want):]
    for name, x, y in zip(names, got, want):
        assert x.dtype == y.dtype == torch.int32, f"{what} {name}: dtypes {x.dtype} / {y.dtype}"
        assert torch.equal(x, y), f"{what} {name}\n got {x.tolist()}\nwant {y.tolist()}"


def assert_in_vocabulary(out, num, V: int) -> None:
    """Ids in [0, V) or -1 padding, and every request emits a token."""
    assert ((out >= -1) & (out < V)).all()
    emitted = out[torch.arange(len(num)), num.long()]
    assert ((emitted >= 0) & (emitted < V)).all(), "every request emits a token"


def cpu_split(points, on_cpu: dict, backends_of=lambda *point: BACKENDS, name=lambda *point: ""):
    """pytest params ``(*point, backend)``, a point's backends next to each other; those
    not listed in ``on_cpu`` (point -> backends that run it on CPU) are ``gpu_sized``: the
    GPU runs them all, the interpreter / emulator the listed subset."""
    return [pytest.param(*point, b, id="-".join(filter(None, (name(*point), b))),
                         marks=() if b in on_cpu.get(point, ()) else pytest.mark.gpu_sized)
            for point in points for b in backends_of(*point)]


# ----------------------------------------------------------------------------- inputs of the GPU grids


def likely_boost(V: int) -> float:
    """Logit boost of a few "likely" tokens at random positions of the vocabulary.

    The kernels build CDFs in float32, the torch spec in float64; they differ by about
    1e-7 relative, which moves a draw to the neighbouring token when the draw lands
    that close to a CDF step. Over a flat distribution of 128k tokens that happens in
    about 1 draw of 200 (any float32 backend), so large vocabularies get most of the
    mass on the likely tokens (scattered, so chunk selection is still exercised) and a
    tail too light to matter. Small vocabularies keep a flat-ish mix."""
    return 4.0 if V <= 4096 else 30.0


def boosted(rows: int, V: int, likely: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    l = torch.randn(rows, V, generator=g) * 2
    l[:, likely] += likely_boost(V) + torch.randn(rows, len(likely), generator=g)
    return l


def grid_sampling(B: int, g: torch.Generator, filt: bool, q_rows: int | None, V: int, likely: torch.Tensor,
                  q_dtype) -> dict:
    """Every third request greedy; draft probs for ``q_rows`` rows (None: none); top-k up to
    29 and top-p in [0.2, 1) with ``filt``."""
    temperature = torch.rand(B, generator=g) + 0.3
    temperature[::3] = 0.0
    q = None if q_rows is None else torch.softmax(boosted(q_rows, V, likely, g), 1).to(q_dtype)
    return dict(temperature=temperature, draft_probs=q,
                top_k=torch.randint(0, 30, (B,), dtype=torch.int32, generator=g) if filt else None,
                top_p=(torch.rand(B, generator=g) * 0.8 + 0.2) if filt else None,
                seed=torch.randint(0, 2**40, (B,), generator=g), positions=torch.randint(0, 10**6, (B,), generator=g))


def likely_chain(seed: int, B: int, V: int, max_k: int, *, q: bool, filt: bool, dtype=F32, q_dtype=F32,
                 id_dtype=torch.int64) -> Chain:
    """Ragged drafts (request 1 has none, request 2 the most), drafts often the target's
    argmax, target and draft mass on a few likely tokens (``likely_boost``)."""
    g = torch.Generator().manual_seed(seed)
    likely = torch.randperm(V, generator=g)[:4]
    K = torch.randint(0, max_k + 1, (B,), generator=g)
    K[1 % B] = 0
    K[2 % B] = max_k
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = K.cumsum(0)
    N = int(cu[-1])
    logits = boosted(N + B, V, likely, g)
    rows = torch.cat([torch.arange(int(cu[b]) + b, int(cu[b + 1]) + b) for b in range(B)]).long()
    top = logits[rows].argmax(1) if N else torch.zeros(0, dtype=torch.long)
    drafts = torch.where(torch.rand(N, generator=g) < 0.6, top, torch.randint(0, V, (N,), generator=g))
    return Chain(logits=logits.to(dtype), drafts=drafts.to(id_dtype), cu=cu, max_draft_len=max_k,
                 **grid_sampling(B, g, filt, N if q else None, V, likely, q_dtype))


def likely_tree(seed: int, B: int, V: int, *, q: bool, filt: bool, dtype=F32, q_dtype=F32, tok_dtype=torch.int64,
                par_dtype=torch.int64, max_nodes: int = 12) -> Tree:
    """B random trees (request 1: a root only) whose tokens come from 6 likely tokens, so
    that children match the target's draws."""
    g = torch.Generator().manual_seed(seed)
    likely = torch.randperm(V, generator=g)[:6]
    par, tok, cu, depth = [], [], [0], 0
    for b in range(B):
        n = 1 if b == 1 else int(torch.randint(2, max_nodes + 1, (1,), generator=g))
        p, t = random_tree(n, V, g, likely=likely.tolist())
        par, tok, depth = par + p, tok + t, max(depth, tree_depth(p))
        cu.append(cu[-1] + n)
    logits = boosted(cu[-1], V, likely, g)
    return Tree(logits=logits.to(dtype), drafts=torch.tensor(tok, dtype=tok_dtype),
                parents=torch.tensor(par, dtype=par_dtype), cu=torch.tensor(cu, dtype=torch.int32),
                max_draft_len=depth, **grid_sampling(B, g, filt, cu[-1] if q else None, V, likely, q_dtype))


# ----------------------------------------------------------------------------- random batches vs the oracle

CHAIN_MODES = {
    "greedy": dict(greedy_share=1.0),
    "random": dict(greedy_share=0.0),
    "mixed": dict(greedy_share=0.4),
    "draft_probs": dict(q=True),
    "top_k_top_p": dict(filters=True),
    "draft_probs_top_k_top_p": dict(q=True, filters=True),
}
TREE_MODES = dict(CHAIN_MODES, draft_probs=dict(q=True, greedy_share=0.2))


def mode_problem(op: str, mode: str, V: int) -> Chain:
    if op == "chain":
        return chain_problem(B=7, V=V, max_k=4, seed=V + len(mode), **CHAIN_MODES[mode])
    return tree_problem(B=6, V=V, max_nodes=12, seed=len(mode), **TREE_MODES[mode])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,mode,V", [("chain", m, V) for V in (111, 600) for m in CHAIN_MODES]
                         + [("tree", m, 37) for m in TREE_MODES])
def test_matches_oracle(op, mode, V, backend):
    p, want = once((op, mode, V), lambda: with_reference(mode_problem(op, mode, V)))
    assert_same(run(p, backend), want)


@pytest.mark.parametrize("mode", list(TREE_MODES))
def test_tree_torch_static_children_bound_while_capturing(mode, monkeypatch):
    """While a CUDA graph is captured the torch tree op reads no fan-out back: its children
    table is T wide, with the same tokens."""
    p, want = once(("tree", mode, 37), lambda: with_reference(mode_problem("tree", mode, 37)))
    monkeypatch.setattr(ops_rejection, "host_read_ok", lambda t: False)
    assert_same(run(p, "torch"), want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [BF16, F16], ids=str)
@pytest.mark.parametrize("op", ["chain", "tree"])
def test_half_precision_logits_and_draft_probs_match_oracle(op, dtype, backend):
    # the oracle reads the same rounded values, so the results stay exact
    def build():
        if op == "chain":
            p = chain_problem(B=6, V=97, max_k=3, dtype=dtype, q=True, filters=True, seed=3)
        else:
            p = tree_problem(B=5, V=53, max_nodes=9, q=True, filters=True, seed=9, dtype=dtype)
        return with_reference(replace(p, draft_probs=p.draft_probs.to(dtype)))

    p, want = once(("half", op, dtype), build)
    assert_same(run(p, backend), want)


def request_slice(p: Chain, b: int) -> Chain:
    """Request b of p as a batch of one."""
    s, e = int(p.cu[b]), int(p.cu[b + 1])
    rows = slice(s, e) if isinstance(p, Tree) else slice(s + b, e + b + 1)   # chains own a bonus row each
    one = slice(b, b + 1)
    single = replace(p, logits=p.logits[rows], drafts=p.drafts[s:e], cu=torch.tensor([0, e - s], dtype=torch.int32),
                     temperature=p.temperature[one], seed=p.seed[one], positions=p.positions[one],
                     draft_probs=p.draft_probs[s:e], top_k=p.top_k[one], top_p=p.top_p[one])
    return replace(single, parents=p.parents[s:e]) if isinstance(p, Tree) else single


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["chain", "tree"])
def test_batch_invariance(op, backend):
    """A request's tokens depend only on its own rows, seed and position."""
    if op == "chain":
        big, picks = chain_problem(B=8, V=200, max_k=3, filters=True, q=True, greedy_share=0.2, seed=5), (0, 3, 7)
    else:
        big, picks = tree_problem(B=6, V=41, max_nodes=10, q=True, filters=True, greedy_share=0.2, seed=8), (0, 2, 5)
    whole = run(big, backend)
    for b in picks:
        alone = run(request_slice(big, b), backend)
        for x, y in zip(alone, whole):
            assert torch.equal(x[0], y[b]), f"request {b}"


MANY_CHUNKS = {
    "chain": lambda: chain_problem(B=5, V=1500, max_k=3, q=True, filters=True, seed=11),
    "tree": lambda: tree_problem(B=4, V=900, max_nodes=10, q=True, filters=True, seed=21),
}


@pytest.mark.parametrize("backend,chunk", [(b, None) for b in BACKENDS] + [(b, 16) for b in KERNEL_BACKENDS])
@pytest.mark.parametrize("op", list(MANY_CHUNKS))
def test_many_chunks_match_reference(op, backend, chunk):
    # chunk 16 over 1500 / 900 tokens: 94 / 57 chunks per row; top-k/top-p and draft probs
    p, want = once(("many_chunks", op), lambda: with_reference(MANY_CHUNKS[op]()))
    assert_same(run(p, backend, chunk), want)


# ----------------------------------------------------------------------------- exact cases


def one_hot_logits(tokens, V: int) -> torch.Tensor:
    l = torch.full((len(tokens), V), -30.0)
    l[torch.arange(len(tokens)), torch.tensor(tokens)] = 30.0
    return l


def chain_of(logits, drafts, cu, temperature, max_draft_len: int, **kw) -> Chain:
    B = len(cu) - 1
    return Chain(logits=logits, drafts=torch.tensor(drafts, dtype=torch.long), cu=torch.tensor(cu, dtype=torch.int32),
                 temperature=torch.tensor(temperature, dtype=torch.float32),
                 seed=torch.arange(B, dtype=torch.long) + 7, positions=torch.arange(B, dtype=torch.long) * 100,
                 max_draft_len=max_draft_len, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_chain_all_drafts_accepted_then_bonus(temperature, backend):
    # target rows are one-hot at the drafts, the bonus row at 9
    out, num = run(chain_of(one_hot_logits([3, 1, 4, 9], 16), [3, 1, 4], [0, 3], [temperature], 3), backend)
    assert out.tolist() == [[3, 1, 4, 9]] and num.tolist() == [3]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.0, 1.3])
def test_chain_first_draft_rejected(temperature, backend):
    # the target gives the first draft zero probability: it is rejected and the
    # recovered token is the target's only token
    out, num = run(chain_of(one_hot_logits([5, 2, 2], 16), [2, 2], [0, 2], [temperature], 2), backend)
    assert out.tolist() == [[5, -1, -1]] and num.tolist() == [0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_chain_rejected_point_mass_draft_is_never_the_recovered_token(backend):
    # p puts 0.9 on the draft: when it is rejected the recovered token must be another one
    V, B = 8, 64
    row = torch.full((V,), -2.0)
    row[3] = 2.0
    out, num = run(chain_of(row.repeat(2 * B, 1), [3] * B, list(range(B + 1)), [1.0] * B, 1), backend)
    rejected = num == 0
    assert rejected.any() and (~rejected).any()
    assert (out[rejected, 0] != 3).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_chain_zero_drafts_emit_one_token(backend):
    out, num = run(chain_of(one_hot_logits([6, 1], 10), [], [0, 0, 0], [0.0, 0.9], 0), backend)
    assert out.tolist() == [[6], [1]] and num.tolist() == [0, 0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_chain_greedy_ragged_batch_exact(backend):
    # request 0 (3 drafts): 2 match the argmax, third does not; request 1: no drafts;
    # request 2 (1 draft): matches, then bonus
    V = 12
    argmaxes = [4, 7, 1, 9,   2,   5, 8]
    logits = one_hot_logits(argmaxes, V) + torch.randn(7, V, generator=torch.Generator().manual_seed(0)) * 0.1
    out, num = run(chain_of(logits, [4, 7, 3, 5], [0, 3, 3, 4], [0.0, 0.0, 0.0], 3), backend)
    assert out.tolist() == [[4, 7, 1, -1], [2, -1, -1, -1], [5, 8, -1, -1]]
    assert num.tolist() == [2, 0, 1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_chain_seed_and_position_key_the_randomness(backend):
    p = chain_problem(B=6, V=64, max_k=2, greedy_share=0.0, seed=2)
    a = run(p, backend)
    assert_same(run(p, backend), a)  # same seeds: same tokens, call after call
    b = run(replace(p, seed=p.seed + 1), backend)
    assert not torch.equal(a[0], b[0])      # new seeds: new tokens


@pytest.mark.parametrize("backend", BACKENDS)
def test_chain_python_numbers_broadcast(backend):
    p = chain_problem(B=3, V=40, max_k=2, greedy_share=1.0, seed=4)
    x = p.to(BACKEND_DEVICES[backend])
    with fastverify.use_backend(backend):
        got = fastverify.rejection_sample(x.logits, x.drafts, x.cu, temperature=0.0, seed=0, positions=5,
                                          max_draft_len=2)
    assert_same(tuple(t.cpu() for t in got), reference(replace(p, temperature=torch.zeros(3))))


@pytest.mark.parametrize("backend", BACKENDS)
def test_tree_single_node_trees_beside_big_trees(backend):
    # a 64-node tree next to single-node trees (plain decoding: one sampled token)
    p = tree_problem(B=4, V=29, sizes=[1, 64, 1, 20], q=True, greedy_share=0.0, seed=4)
    got = run(p, backend)
    assert_same(got, reference(p))
    assert got[2][0] == 0 and got[2][2] == 0 and got[0][0, 0] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_tree_greedy_walk_exact(backend):
    # root ─┬─ 5 ── 9 ── 2        target argmax: root→5, node(5)→9, node(9)→4 (not 2)
    #       └─ 6
    V = 12
    logits = torch.full((5, V), -5.0)
    for row, tok in enumerate([5, 9, 0, 4, 1]):
        logits[row, tok] = 5.0
    p = Tree(logits=logits, drafts=torch.tensor([3, 5, 6, 9, 2]), parents=torch.tensor([-1, 0, 0, 1, 3]),
             cu=torch.tensor([0, 5], dtype=torch.int32), temperature=torch.zeros(1),
             seed=torch.zeros(1, dtype=torch.long), positions=torch.zeros(1, dtype=torch.long), max_draft_len=3)
    acc, out, num = run(p, backend)
    assert acc.tolist() == [[0, 1, 3, -1]]
    assert out.tolist() == [[5, 9, 4, -1]]
    assert num.tolist() == [2]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_q", [False, True])
def test_tree_chain_shaped_with_one_hot_target_accepts_everything(with_q, backend):
    V, n = 20, 6
    tokens = torch.tensor([1, 4, 8, 15, 16, 3])
    logits = torch.full((n, V), -40.0)
    for row in range(n - 1):
        logits[row, tokens[row + 1]] = 40.0
    logits[n - 1, 7] = 40.0
    q = torch.softmax(torch.randn(n, V, generator=torch.Generator().manual_seed(1)), 1) if with_q else None
    p = Tree(logits=logits, drafts=tokens, parents=torch.arange(-1, n - 1), cu=torch.tensor([0, n], dtype=torch.int32),
             temperature=torch.tensor([0.8]), seed=torch.tensor([3]), positions=torch.tensor([50]), max_draft_len=n - 1,
             draft_probs=q)
    acc, out, num = run(p, backend)
    assert acc.tolist() == [[0, 1, 2, 3, 4, 5]]
    assert out.tolist() == [[4, 8, 15, 16, 3, 7]]
    assert num.tolist() == [5]


# ----------------------------------------------------------------------------- NaN and inf logits


@pytest.mark.parametrize("backend", BACKENDS)
def test_chain_degenerate_logits_give_in_range_tokens(backend):
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
            out, num = run(chain_of(logits, [7] * 7, list(range(8)), [temperature] * 7, 1, **kw), backend)
            assert_in_vocabulary(out, num, V)
            if temperature > 0:
                assert out[3, 0] == 7 and num[3] == 1        # the +inf token has all the mass
                assert out[4, 0] in (3, 9) and num[4] == 0   # split between the two +inf tokens
                assert out[6, 0] == 11 and num[6] == 0       # the only finite logit


@pytest.mark.parametrize("backend", BACKENDS)
def test_tree_degenerate_logits_give_in_range_tokens(backend):
    p = tree_problem(B=4, V=23, max_nodes=8, q=True, greedy_share=0.3, seed=13)
    p.logits[0] = float("nan")
    p.logits[1, ::3] = float("inf")
    p.logits[2] = float("-inf")
    _, out, num = run(p, backend)
    assert_in_vocabulary(out, num, 23)


def nan_inf_problems(dtype, filt: bool) -> tuple[Chain, Tree, Chain]:
    """(chain, tree) with NaN / ±inf patterns the reference handles exactly, and a chain
    with runs of +inf where the torch spec's logsumexp saturates at FLT_MAX (range only)."""
    a = likely_chain(3, 6, 300, 3, q=True, filt=filt)
    l = a.logits
    l[0] = float("nan")              # no finite logit: falls back to the argmax (0)
    l[1] = float("-inf")
    l[2, ::7] = float("nan")
    l[3, 5] = float("inf")           # +inf becomes FLT_MAX after scaling
    l[4, 10] = float("inf")
    l[4, 20:40] = float("nan")
    l[5, ::3] = float("-inf")
    l[-1] = float("nan")
    t = likely_tree(3, 5, 300, q=True, filt=filt)
    t.logits[0] = float("nan")
    t.logits[1:3, ::2] = float("-inf")
    t.logits[3, 7] = float("inf")
    runs = l.clone()
    runs[2:5, 10:20] = float("inf")
    return replace(a, logits=l.to(dtype)), replace(t, logits=t.logits.to(dtype)), replace(a, logits=runs.to(dtype))


# the emulator's subset on cuda, the torch and triton backends on its unfiltered
# point (NaN with filters on triton: test_chain_degenerate_logits_give_in_range_tokens)
NAN_INF_ON_CPU = {(F32, False): ALL, (BF16, True): ("torch", "cuda"), (F16, True): ("torch", "cuda")}


@pytest.mark.parametrize("dtype,filt,backend", cpu_split([(d, f) for d in DTYPES for f in (False, True)],
                                                          NAN_INF_ON_CPU, name=lambda d, f: f"{str(d)[6:]}-filt{f:d}"))
def test_nan_and_inf_logits_match_reference(dtype, filt, backend):
    chain, tree, inf_runs = nan_inf_problems(dtype, filt)
    for p in (chain, tree):
        got = run(p, backend)
        assert_in_vocabulary(*got[-2:], 300)
        assert_same(got, reference(p), type(p).__name__)
    assert_in_vocabulary(*run(inf_runs, backend), 300)


# ----------------------------------------------------------------------------- the dtype x draft_probs x filter grids

FLAGS = list(itertools.product((False, True), repeat=2))   # (draft_probs, top-k/top-p)
# (op, V, chunk width; None: the default). Chunks of 512 / 16 over 128256 tokens: 251
# chunks (every warp of the CUDA finalize kernel gets several) / 8016 chunks (its
# chunk-level scans span two tiles): CUDA-kernel paths, on the cuda backend only.
GRID_VOCABS = [("chain", 111, None), ("chain", 111, 16), ("chain", BIG_V, None), ("chain", BIG_V, 512),
               ("chain", BIG_V, 16),
               ("tree", 37, None), ("tree", 37, 16), ("tree", BIG_V, None), ("tree", BIG_V, 16)]
CUDA_ONLY = {("chain", BIG_V, 512), ("chain", BIG_V, 16), ("tree", BIG_V, 16)}
# test_cuda_emulated.py's subset, with the backends that run it on CPU too: every dtype,
# draft_probs and filter setting, default and 16-wide chunks, 512-wide chunks with a
# partial last one. Triton joins on the plain points (as before): its draft_probs,
# half-precision, filter and chunk-16 paths take seconds per point under the interpreter and
# run there in test_matches_oracle, test_half_precision_* and test_many_chunks_*.
GRID_ON_CPU = {
    ("chain", 111, None, F32, False, False): ALL, ("chain", 111, 16, BF16, True, True): ("cuda",),
    ("chain", 111, None, F16, True, False): ("torch", "cuda"), ("chain", 111, 16, F32, False, True): ("cuda",),
    ("chain", 4099, 512, BF16, False, True): ("cuda",),
    ("tree", 37, None, F32, False, False): ALL, ("tree", 37, 16, F16, True, True): ("cuda",),
    ("tree", 37, None, BF16, True, False): ("torch", "cuda"), ("tree", 37, 16, F32, False, True): ("cuda",),
}


def grid_backends(op: str, V: int, chunk: int | None) -> list[str]:
    """Chunk widths are an entry-point knob (triton, cuda); beyond ORACLE_MAX_V the torch
    spec on CPU is the reference, so the torch backend joins only on CUDA tensors."""
    if (op, V, chunk) in CUDA_ONLY:
        return [b for b in ("cuda",) if b in BACKENDS]
    if chunk is not None or (V > ORACLE_MAX_V and BACKEND_DEVICES["torch"] == "cpu"):
        return KERNEL_BACKENDS
    return BACKENDS


def grid_params():
    points = [(op, V, chunk, d, q, f) for op, V, chunk in GRID_VOCABS for d in DTYPES for q, f in FLAGS]
    points += [pt for pt in GRID_ON_CPU if pt not in points]
    return cpu_split(points, GRID_ON_CPU, lambda op, V, chunk, *_: grid_backends(op, V, chunk),
                     lambda op, V, chunk, dtype, q, filt: f"{op}-V{V}-chunk{chunk or 'default'}-{str(dtype)[6:]}"
                     + "-draft_probs" * q + "-top_k_top_p" * filt)


def grid_problem(op: str, seed: int, V: int, dtype, q: bool, filt: bool) -> Chain:
    """test_cuda.py's grid inputs: seed 0 with int64 ids, seed 1 with int32 ids (tree
    parents the other way round); fp16 logits come with fp32 draft probs."""
    q_dtype = F32 if dtype == F16 else dtype
    if op == "chain":
        return likely_chain(seed * 1000 + V, 12, V, 4, q=q, filt=filt, dtype=dtype, q_dtype=q_dtype,
                            id_dtype=torch.int32 if seed else torch.int64)
    return likely_tree(seed * 1000 + V, 10, V, q=q, filt=filt, dtype=dtype, q_dtype=q_dtype,
                       tok_dtype=torch.int32 if seed else torch.int64, par_dtype=torch.int64 if seed else torch.int32)


@pytest.mark.parametrize("op,V,chunk,dtype,q,filt,backend", grid_params())
def test_grid_matches_reference(op, V, chunk, dtype, q, filt, backend):
    for seed in (0, 1):
        p, want = once((op, seed, V, dtype, q, filt), lambda: with_reference(grid_problem(op, seed, V, dtype, q, filt)))
        got = run(p, backend, chunk)
        assert_same(got, want, f"seed {seed}")
        assert_in_vocabulary(*got[-2:], V)


# triton reads every row through its stride alike (6 s under the interpreter): GPU only
@pytest.mark.parametrize("backend", cpu_split([()], {(): ("torch", "cuda")}))
def test_chain_strided_logits_and_mixed_dtypes_match_reference(backend):
    """Rows whose stride or start is off 16 bytes take the CUDA kernels' scalar load path;
    draft_probs may have another dtype than the logits."""
    p = likely_chain(11, 8, 1001, 3, q=True, filt=True, dtype=BF16, q_dtype=F16)
    want = reference(p)
    dev, R = BACKEND_DEVICES[backend], p.logits.shape[0]
    aligned = torch.zeros(R, 1008, dtype=BF16, device=dev)  # 2016-byte rows: 16-byte loads, partial last
    odd = torch.zeros(R + 1, 1004, dtype=BF16, device=dev)   # 2008-byte rows: scalar loads
    for view in (aligned[:, :1001], odd[:R, :1001], odd[1:, 1:1002]):  # the last one also starts off alignment
        view.copy_(p.logits)
        assert_same(run(replace(p.to(dev), logits=view), backend), want,
                    f"strided logits (stride {view.stride(0)}, offset {view.storage_offset()})")


# ----------------------------------------------------------------------------- the kernel backends' entry points


# triton: 7 s under the interpreter, GPU only
@pytest.mark.parametrize("backend", cpu_split([()], {(): ("cuda",)}, lambda: KERNEL_BACKENDS))
def test_public_op_runs_the_backend_entry_points(backend, monkeypatch):
    """Under use_backend, the public ops call the backend's entry points (the ones the
    chunk-width tests call directly) and return their outputs, which equal the spec's."""
    kern = entry_points(backend, "rejection")
    chain = likely_chain(7, 9, 1000, 5, q=True, filt=True)
    tree = likely_tree(5, 6, 500, q=True, filt=False)
    for p, name, spec in ((chain, "rejection_sample", rejection_sample_torch),
                          (tree, "tree_rejection_sample", tree_rejection_sample_torch)):
        returned, direct = [], getattr(kern, name)
        monkeypatch.setattr(kern, name, lambda *a, **kw: returned.append(direct(*a, **kw)) or returned[-1])
        x = p.to(BACKEND_DEVICES[backend])
        with fastverify.use_backend(backend):
            via_op = public_op(x)
        assert len(returned) == 1, f"{name} did not run the {backend} entry point"
        assert all(a is b for a, b in zip(via_op, returned[0])), f"{name}: outputs other than the entry point's"
        assert_same(tuple(t.cpu() for t in via_op), spec(*positional(p)), f"{name}: public op vs the torch spec")


@pytest.mark.parametrize("backend", [b for b in ("cuda",) if b in BACKENDS])
def test_cuda_rejects_a_chunk_width_off_its_grid(backend):
    p = likely_chain(61, 3, 100, 2, q=False, filt=False)
    with pytest.raises(RuntimeError, match="chunk_size"):
        run(p, backend, chunk=24)


@pytest.mark.parametrize("backend", [b for b in ("cuda",) if b in BACKENDS])
def test_cuda_schemas_take_chunk_width_and_stream(backend):
    from fastverify import _cuda

    kern = entry_points(backend, "rejection")
    ops = (kern if isinstance(kern, _cuda.Kernels) else _cuda.Kernels(_cuda.library)).ops()
    assert "chunk_size" in str(ops.rejection_sample._schema)
    assert "cuda_stream" in str(ops.tree_rejection_sample._schema)


# ----------------------------------------------------------------------------- the cpu backend's own

CPU_BACKEND = [b for b in ("cpu",) if b in BACKENDS]


@pytest.mark.parametrize("backend", CPU_BACKEND)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("q,filt", FLAGS, ids=lambda f: str(int(f)))
def test_cpu_every_logit_dtype_matches_the_torch_spec(q, filt, dtype, backend):
    """fp32, bf16 and fp16 logits over a 32k vocabulary (draft probs in fp32 or the logits'
    dtype): the cpu backend's tokens are the torch spec's, chains (token and block rules)
    and trees (sample-then-match or recursive rejection)."""
    q_dtype = F32 if dtype == F16 else dtype
    chain = likely_chain(71, 9, 32000, 4, q=q, filt=filt, dtype=dtype, q_dtype=q_dtype)
    tree = likely_tree(72, 7, 32000, q=q, filt=filt, dtype=dtype, q_dtype=q_dtype)
    for p in (chain, replace(chain, verify="block"), tree):
        spec = tree_rejection_sample_torch if isinstance(p, Tree) else rejection_sample_torch
        assert_same(run(p, backend), spec(*positional(p)), f"{type(p).__name__} verify={p.verify}")


@pytest.mark.parametrize("backend", CPU_BACKEND)
@pytest.mark.parametrize("seed,temperature", [(0, 0.8), (1, 1.0), (1, 1.3)])
def test_cpu_draws_match_the_torch_spec_on_peaked_128k_rows(seed, temperature, backend):
    """The benchmark's inputs (64 requests, 128k bf16 logits whose argmax holds 50-95% of the
    mass, drafts mostly the argmax): every token equals the torch spec's. These seeds once
    placed a draw within 1.5e-7 of a CDF step, which float32 chunk sums (or subtracting a
    rejected draft's mass from its chunk's) moved to a neighbouring token."""
    from fastverify.bench.rejection import chain_inputs

    x = chain_inputs(64, 4, BIG_V, "bf16", "cpu", seed=seed)
    (logits, drafts, cu), kw = x["op"]["args"], x["op"]["kwargs"]
    args = (logits, drafts, cu, None, kw["temperature"] * temperature, None, None, kw["seed"], kw["positions"], 4)
    assert_same(entry_points(backend, "rejection").rejection_sample(*args), rejection_sample_torch(*args))


def _with_threads(n: int, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


THREAD_CASES = {
    # fewer requests than threads: one request at a time, its rows' chunks in parallel
    "chain_one_request": lambda: likely_chain(81, 1, 9000, 4, q=True, filt=True, dtype=BF16),
    "chain_token": lambda: likely_chain(82, 11, 9000, 4, q=True, filt=True, dtype=F16),
    "chain_block": lambda: replace(likely_chain(83, 11, 9000, 4, q=True, filt=False, dtype=BF16), verify="block"),
    "chain_typical": lambda: replace(likely_chain(84, 11, 9000, 4, q=False, filt=True), verify="typical",
                                     typical_eps=torch.full((11,), 0.2), typical_delta=torch.full((11,), 0.5)),
    "tree_one_request": lambda: likely_tree(85, 1, 9000, q=True, filt=True, dtype=BF16),
    "tree": lambda: likely_tree(86, 9, 9000, q=True, filt=True, dtype=F16),
    "paths_block_wor": lambda: multi_path_problem(B=5, V=3000, n=3, depth=3, wor=True, filters=True, seed=87),
}


@pytest.mark.parametrize("backend", CPU_BACKEND)
@pytest.mark.parametrize("case", list(THREAD_CASES))
def test_cpu_outputs_do_not_depend_on_the_thread_count(case, backend):
    p = THREAD_CASES[case]()
    one = _with_threads(1, lambda: run(p, backend))
    for n in (2, 3):
        assert_same(_with_threads(n, lambda: run(p, backend)), one, f"{n} threads vs 1")


@pytest.mark.parametrize("backend", CPU_BACKEND)
def test_cpu_entry_points_take_any_chunk_width_up_to_the_maximum(backend):
    p, want = once(("many_chunks", "chain"), lambda: with_reference(MANY_CHUNKS["chain"]()))
    for chunk in (1, 7, 300, 4096):
        assert_same(run(p, backend, chunk), want, f"chunk {chunk}")
    with pytest.raises(ValueError, match="chunk_size"):
        run(p, backend, 8192)


# ----------------------------------------------------------------------------- GPU only: graphs, compile, streams


def refill(p: Chain, seed: int) -> None:
    """New contents for a graph's static inputs (same shapes, same drafts)."""
    g = torch.Generator(device=GPU).manual_seed(seed)
    p.logits.copy_((torch.randn(p.logits.shape, generator=g, device=GPU) * 2).to(p.logits.dtype))
    if p.draft_probs is not None:
        q = torch.softmax(torch.randn(p.draft_probs.shape, generator=g, device=GPU) * 2, 1)
        p.draft_probs.copy_(q.to(p.draft_probs.dtype))
    p.seed.add_(12345)
    p.positions.add_(17)
    p.temperature.copy_(p.temperature.flip(0))


GRAPH_CASES = {
    "chain_bf16": lambda: likely_chain(21, 8, 4000, 4, q=False, filt=False, dtype=BF16, q_dtype=BF16),
    "chain_bf16_draft_probs_top_k_top_p": lambda: likely_chain(21, 8, 4000, 4, q=True, filt=True, dtype=BF16,
                                                               q_dtype=BF16),
    "chain_fp32_draft_probs_top_k_top_p": lambda: likely_chain(31, 8, 2048, 3, q=True, filt=True),
    "tree": lambda: likely_tree(22, 6, 4000, q=False, filt=False),
    "tree_draft_probs_top_k_top_p": lambda: likely_tree(22, 6, 4000, q=True, filt=True),
}


@pytest.mark.cuda
@pytest.mark.parametrize("backend,case", [(b, c) for b in GPU_BACKENDS for c in GRAPH_CASES])
def test_cuda_graph_replay_follows_new_inputs(backend, case):
    p = GRAPH_CASES[case]().to(GPU)
    with fastverify.use_backend(backend):
        graph, outs = capture_graph(lambda: public_op(p))
        graph.replay()
        torch.cuda.synchronize()
        assert_same(outs, public_op(p), "replay vs eager")
        refill(p, 99)   # new contents, same shapes: the replay follows the inputs
        graph.replay()
        torch.cuda.synchronize()
        assert_same(outs, public_op(p), "replay vs eager after new inputs")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_torch_compile_fullgraph_on_cuda_tensors(backend):
    p = likely_chain(41, 8, 3000, 4, q=True, filt=True)
    x = p.to(GPU)

    def f(logits, drafts, cu, q, temperature, top_k, top_p, seed, positions):
        out, num = torch.ops.fastverify.rejection_sample(
            logits, drafts, cu, draft_probs=q, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
            positions=positions, max_draft_len=4)
        return out, num + 0

    args = positional(x)[:-1]
    with fastverify.use_backend(backend):
        got = torch.compile(f, fullgraph=True)(*args)
        want = f(*args)
    assert_same(got, want, "torch.compile vs eager")
    assert_same(got, rejection_sample_torch(*positional(p)), "torch.compile vs the torch spec")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_deterministic_and_on_the_current_stream(backend):
    p = likely_chain(51, 16, 5000, 4, q=True, filt=True, dtype=F16, q_dtype=F16).to(GPU)
    with fastverify.use_backend(backend):
        first = public_op(p)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            second = public_op(p)
        torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert_same(first, second, "two runs")


# ----------------------------------------------------------------------------- bad input
# The checks run in the op before any backend (values on CPU tensors always, on CUDA
# only with FASTVERIFY_CHECKS=1), so these run on CPU tensors with the default backend.


def call_op(p: Chain, **over):
    """torch.ops.fastverify.* on p with some arguments replaced (by their op names)."""
    tree = isinstance(p, Tree)
    names = ("target_logits", "tree_tokens", "parents", "cu_num_nodes") if tree else \
        ("target_logits", "draft_tokens", "cu_num_draft")
    args = dict(zip(names, positional(p)), **p.kwargs(), **{"max_depth" if tree else "max_draft_len": p.max_draft_len})
    args.update(over)
    op = torch.ops.fastverify.tree_rejection_sample if tree else torch.ops.fastverify.rejection_sample
    tensors = [args.pop(n) for n in names]
    return op(*tensors, **args)


@pytest.fixture
def chain():
    return chain_problem(B=3, V=20, max_k=3, q=True, filters=True, seed=1, zero_drafts=False)


@pytest.fixture
def tree():
    return tree_problem(B=3, V=20, max_nodes=6, q=True, filters=True, seed=1, sizes=[3, 5, 4])


def replaced_at(t: torch.Tensor, i: int, value) -> torch.Tensor:
    return torch.where(torch.arange(len(t)) == i, value, t)


CHAIN_CASES = {
    # name: (override builder, expected message fragment)
    "logits_1d": (lambda p: dict(target_logits=p.logits[0]), "target_logits must have 2 dimension"),
    "logits_int": (lambda p: dict(target_logits=p.logits.long()), "target_logits must be float32/bfloat16/float16"),
    "logits_rows": (lambda p: dict(target_logits=p.logits[:-1]), "target_logits must have shape"),
    "logits_strided": (lambda p: dict(target_logits=p.logits.t().contiguous().t()), "contiguous in the vocabulary"),
    "drafts_float": (lambda p: dict(draft_tokens=p.drafts.float()), "draft_tokens must be int32/int64"),
    "drafts_2d": (lambda p: dict(draft_tokens=p.drafts[None]), "draft_tokens must have 1 dimension"),
    "draft_out_of_vocab": (lambda p: dict(draft_tokens=replaced_at(p.drafts, 1, 20)),
                           r"draft_tokens\[1\] = 20 is outside the vocabulary \[0, 20\)"),
    "draft_negative": (lambda p: dict(draft_tokens=replaced_at(p.drafts, 0, -3)),
                       r"draft_tokens\[0\] = -3 is outside the vocabulary"),
    "cu_int64": (lambda p: dict(cu_num_draft=p.cu.long()), "cu_num_draft must be int32"),
    "cu_not_zero": (lambda p: dict(cu_num_draft=p.cu + 1), "cu_num_draft must start at 0"),
    "cu_decreasing": (lambda p: dict(cu_num_draft=torch.tensor([0, 3, 2, int(p.cu[-1])], dtype=torch.int32)),
                      "cu_num_draft must be non-decreasing"),
    "cu_total": (lambda p: dict(cu_num_draft=torch.cat([p.cu[:-1], p.cu[-1:] - 1])), "must equal draft_tokens.numel()"),
    # [0] is an empty batch (B = 0); no entry at all is the error
    "cu_empty": (lambda p: dict(cu_num_draft=p.cu[:0]), r"cu_num_draft must have B \+ 1 >= 1 entries"),
    "max_draft_len_small": (lambda p: dict(max_draft_len=0), "but max_draft_len is 0"),
    "max_draft_len_negative": (lambda p: dict(max_draft_len=-1), "max_draft_len must be an int >= 0"),
    "draft_probs_shape": (lambda p: dict(draft_probs=p.draft_probs[:, :-1]), "draft_probs must have shape"),
    "draft_probs_dtype": (lambda p: dict(draft_probs=p.draft_probs.double()), "draft_probs must be float32"),
    "temperature_negative": (lambda p: dict(temperature=torch.tensor([1.0, -0.5, 1.0])),
                             "temperature must be finite and >= 0"),
    "temperature_nan": (lambda p: dict(temperature=torch.tensor([1.0, float("nan"), 1.0])),
                        "temperature must be finite"),
    "temperature_shape": (lambda p: dict(temperature=torch.ones(4)), "temperature must have shape"),
    "temperature_dtype": (lambda p: dict(temperature=torch.ones(3, dtype=torch.float64)),
                          "temperature must be float32"),
    "top_k_negative": (lambda p: dict(top_k=torch.tensor([1, -1, 0], dtype=torch.int32)), "top_k must be >= 0"),
    "top_k_dtype": (lambda p: dict(top_k=torch.tensor([1, 1, 0])), "top_k must be int32"),
    "top_p_zero": (lambda p: dict(top_p=torch.tensor([0.5, 0.0, 1.0])), r"top_p must be in \(0, 1\]"),
    "top_p_above_one": (lambda p: dict(top_p=torch.tensor([0.5, 1.5, 1.0])), r"top_p must be in \(0, 1\]"),
    "seed_dtype": (lambda p: dict(seed=p.seed.int()), "seed must be int64"),
    "positions_negative": (lambda p: dict(positions=torch.tensor([0, -1, 2])), "positions must be >= 0"),
    "positions_shape": (lambda p: dict(positions=torch.zeros(2, dtype=torch.long)), "positions must have shape"),
    "verify_unknown": (lambda p: dict(verify="blockwise"),
                       "verify must be one of 'token', 'block', 'typical' for rejection_sample, got 'blockwise'"),
    "verify_tree_rule": (lambda p: dict(verify="specinfer"), "verify must be one of 'token', 'block', 'typical'"),
    "typical_eps_with_token": (lambda p: dict(typical_eps=torch.full((3,), 0.1)),
                               "typical_eps applies to verify='typical' only"),
    "typical_eps_range": (lambda p: dict(verify="typical", typical_eps=torch.tensor([0.1, 1.5, 0.1])),
                          r"typical_eps must be in \[0, 1\]"),
    "typical_delta_shape": (lambda p: dict(verify="typical", typical_delta=torch.ones(2)),
                            "typical_delta must have shape"),
    "typical_delta_dtype": (lambda p: dict(verify="typical", typical_delta=torch.ones(3, dtype=torch.float64)),
                            "typical_delta must be float32"),
}


def bad_parents(p: Tree, j: int, value: int) -> dict:
    return dict(parents=replaced_at(p.parents, j, value))


TREE_CASES = {
    "root_has_parent": (lambda p: bad_parents(p, 3, 0), r"parents\[3\] = 0: node 0 of request 1 is its root"),
    "parent_after_child": (lambda p: bad_parents(p, 4, 2),
                           r"parents\[4\] = 2: node 1 of request 1 needs a parent in \[0, 1\)"),
    "parent_self": (lambda p: bad_parents(p, 2, 2), "parents do not form a tree"),
    "parent_out_of_tree": (lambda p: bad_parents(p, 1, -1), "parents do not form a tree"),
    "parents_shape": (lambda p: dict(parents=p.parents[:-1]), "parents must have shape"),
    "parents_float": (lambda p: dict(parents=p.parents.float()), "parents must be int32/int64"),
    "empty_tree": (lambda p: dict(cu_num_nodes=torch.tensor([0, 0, 8, 12], dtype=torch.int32)),
                   "strictly increasing"),
    "cu_total": (lambda p: dict(cu_num_nodes=torch.tensor([0, 3, 8, 11], dtype=torch.int32)),
                 "must equal tree_tokens.numel()"),
    "token_out_of_vocab": (lambda p: dict(tree_tokens=replaced_at(p.drafts, 5, 99)),
                           r"tree_tokens\[5\] = 99 is outside the vocabulary"),
    "too_deep": (lambda p: dict(max_depth=0), "> max_depth = 0"),
    "logits_rows": (lambda p: dict(target_logits=p.logits[:-1]), "target_logits must have shape"),
    "draft_probs_rows": (lambda p: dict(draft_probs=p.draft_probs[:-1]), "draft_probs must have shape"),
    "top_p": (lambda p: dict(top_p=torch.tensor([0.5, 2.0, 1.0])), r"top_p must be in \(0, 1\]"),
    "verify_unknown": (lambda p: dict(verify="token"),
                       "verify must be one of 'specinfer', 'block', 'block_wor' for tree_rejection_sample"),
    "block_without_draft_probs": (lambda p: dict(verify="block", draft_probs=None), "verify='block' needs draft_probs"),
    # request 1 (nodes 3..7): root ─┬─ 1 ─┬─ 3        leaves at depths 1 and 2
    #                               └─ 2   └─ 4
    "block_wor_ragged_leaves": (lambda p: dict(verify="block_wor", parents=torch.tensor([-1, 0, 1, -1, 0, 0, 1, 1,
                                                                                         -1, 0, 1, 2]),
                                               tree_tokens=torch.tensor([5, 1, 2, 7, 1, 2, 3, 4, 0, 1, 2, 3])),
                                "the leaves of request 1 are at depths \\[1, 2\\]: multi-path block verification"),
}


BAD_INPUT = {**{("chain", case): v for case, v in CHAIN_CASES.items()},
             **{("tree", case): v for case, v in TREE_CASES.items()}}


@pytest.mark.parametrize("op,case", list(BAD_INPUT), ids="-".join)
def test_bad_input_names_the_argument(op, case, chain, tree):
    p = chain if op == "chain" else tree
    build, msg = BAD_INPUT[op, case]
    with pytest.raises((ValueError, TypeError), match=msg):
        call_op(p, **build(p))


def test_multi_path_rules_take_repeated_leaves_only_from_iid_paths():
    """A path drawn twice (i.i.d.) is a repeated leaf: accepted under verify="block", refused
    under "block_wor" and "specinfer"; repeated inner siblings are refused under every rule."""
    #   root ─ 4 ─┬─ 1          two identical paths (4, 1) and one (4, 2)
    #             ├─ 1
    #             └─ 2
    p = replace(tree_problem(B=1, V=20, sizes=[5], q=True, seed=0), parents=torch.tensor([-1, 0, 1, 1, 1]),
                drafts=torch.tensor([9, 4, 1, 1, 2]), max_draft_len=2)
    call_op(p, verify="block")
    for rule in ("block_wor", "specinfer"):
        with pytest.raises(ValueError, match="repeats a sibling's token"):
            call_op(p, verify=rule)
    #   root ─┬─ 4 ─ 1          the prefix (4) not merged: two inner siblings carry 4
    #         └─ 4 ─ 2
    q = replace(p, parents=torch.tensor([-1, 0, 1, 0, 3]), drafts=torch.tensor([9, 4, 1, 4, 2]))
    with pytest.raises(ValueError, match="only leaves may repeat"):
        call_op(q, verify="block")


def test_sibling_tokens_must_be_distinct():
    p = replace(tree_problem(B=1, V=20, sizes=[3], seed=0), parents=torch.tensor([-1, 0, 0]),
                drafts=torch.tensor([5, 7, 7]))
    with pytest.raises(ValueError, match="repeats a sibling's token under node 0"):
        call_op(p)


def test_tensor_on_another_device_is_named(chain):
    with pytest.raises(ValueError, match="temperature is on meta but the op's other tensors are on cpu"):
        call_op(chain, temperature=torch.empty(3, device="meta"))


def test_non_tensor_argument_is_named(chain):
    with pytest.raises(TypeError, match="temperature must be a \\[B\\] tensor or a Python number"):
        fastverify.rejection_sample(chain.logits, chain.drafts, chain.cu, temperature="hot", seed=0, positions=0,
                                    max_draft_len=3)


# The torch backend indexes with torch ops, which raise on out-of-range ids by themselves.
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_unchecked_garbage_stays_in_vocabulary(backend):
    """What a CUDA caller without FASTVERIFY_CHECKS could pass: drafts and tree tokens
    outside the vocabulary, parents that are no tree. Kernels called directly (no
    checks) must not crash and must emit only ids in [0, V) or -1 padding."""
    dev = BACKEND_DEVICES[backend]
    kern = entry_points(backend, "rejection")
    chain = chain_problem(B=4, V=30, max_k=3, q=True, filters=True, seed=3)
    chain.drafts = torch.tensor([-5, 30, 2**40, 7, 1, -1, 99, 3, 2, 5, 6, 7][:chain.drafts.numel()])
    out, num = kern.rejection_sample(*positional(chain.to(dev)))
    assert (((out >= 0) & (out < 30)) | (out == -1)).all()
    tree = tree_problem(B=3, V=30, sizes=[4, 5, 3], q=True, seed=3)
    tree.drafts[1] = 1000
    tree.drafts[5] = -7
    tree.parents[6] = 9    # points forward: not a tree
    tree.parents[7] = -4
    acc, out, num = kern.tree_rejection_sample(*positional(tree.to(dev)))
    assert (((out >= 0) & (out < 30)) | (out == -1)).all()
    assert ((acc >= -1) & (acc < 5)).all()


def test_torch_backend_functions_are_the_cpu_kernels():
    # direct calls (how tests compare backends) take the op's positional layout
    out, num = rejection_sample_torch(*positional(chain_problem(B=2, V=15, max_k=2, seed=2)))
    assert out.shape == (2, 3)
    t = tree_problem(B=2, V=15, sizes=[2, 3], seed=2)
    acc, out, num = tree_rejection_sample_torch(*positional(t))
    assert acc.shape == (2, t.max_draft_len + 1)
