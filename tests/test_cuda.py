"""The cuda backend (csrc/cuda, loaded by fastverify/_cuda.py) against the torch backend
(the spec, run on CPU copies) and the Triton backend. Needs a CUDA GPU.

Every comparison is exact: the three backends run the same algorithm on the same
Philox bits, so they emit the same tokens. Inputs come from fixed seeds.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import fastverify
from fastverify import _cuda
from fastverify.ops.rejection import rejection_sample_torch, tree_rejection_sample_torch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEV = "cuda"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BIG_V = 128256


# ----------------------------------------------------------------------------- inputs


def likely_boost(V: int) -> float:
    """Logit boost of a few "likely" tokens at random positions of the vocabulary.

    The kernels build CDFs in float32, the torch spec in float64; they differ by about
    1e-7 relative, which moves a draw to the neighbouring token when the draw lands
    that close to a CDF step. Over a flat distribution of 128k tokens that happens in
    about 1 draw of 200 (any float32 backend, Triton too), so large vocabularies get
    most of the mass on the likely tokens (scattered, so chunk selection is still
    exercised) and a tail too light to matter. Small vocabularies keep a flat-ish mix."""
    return 4.0 if V <= 4096 else 30.0


def make_chain(seed: int, B: int, V: int, max_k: int, *, q: bool, filt: bool, dtype=torch.float32,
               q_dtype=torch.float32, id_dtype=torch.int64) -> dict:
    """CPU inputs of rejection_sample: ragged drafts (some requests without any),
    greedy and random requests mixed, drafts often equal to the target's argmax."""
    g = torch.Generator().manual_seed(seed)
    likely = torch.randperm(V, generator=g)[:4]
    K = torch.randint(0, max_k + 1, (B,), generator=g)
    K[1 % B] = 0
    K[2 % B] = max_k
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = K.cumsum(0)
    N = int(cu[-1])
    logits = torch.randn(N + B, V, generator=g) * 2
    logits[:, likely] += likely_boost(V) + torch.randn(N + B, len(likely), generator=g)  # so drafts get accepted
    rows = torch.cat([torch.arange(int(cu[b]) + b, int(cu[b + 1]) + b) for b in range(B)]).long()
    top = logits[rows].argmax(1) if N else torch.zeros(0, dtype=torch.long)
    drafts = torch.where(torch.rand(N, generator=g) < 0.6, top, torch.randint(0, V, (N,), generator=g))
    temperature = torch.rand(B, generator=g) + 0.3
    temperature[::3] = 0.0  # greedy requests
    draft_probs = None
    if q:
        q_logits = torch.randn(N, V, generator=g) * 2
        q_logits[:, likely] += likely_boost(V) + torch.randn(N, len(likely), generator=g)
        draft_probs = torch.softmax(q_logits, 1).to(q_dtype)
    return dict(
        target_logits=logits.to(dtype), draft_tokens=drafts.to(id_dtype), cu_num_draft=cu, draft_probs=draft_probs,
        temperature=temperature,
        top_k=torch.randint(0, 30, (B,), dtype=torch.int32, generator=g) if filt else None,
        top_p=(torch.rand(B, generator=g) * 0.8 + 0.2) if filt else None,
        seed=torch.randint(0, 2**40, (B,), generator=g), positions=torch.randint(0, 10**6, (B,), generator=g),
        max_draft_len=max_k)


def _random_tree(n: int, V: int, g: torch.Generator, likely: list[int]):
    """Parents (each before its children) and tokens (from `likely`, distinct among siblings)."""
    parents, tokens, used = [-1], [int(torch.randint(0, V, (1,), generator=g))], set()
    for j in range(1, n):
        while True:
            p = int(torch.randint(0, j, (1,), generator=g))
            t = likely[int(torch.randint(0, len(likely), (1,), generator=g))]
            if (p, t) not in used:
                break
        used.add((p, t))
        parents.append(p)
        tokens.append(t)
    return parents, tokens


def make_tree(seed: int, B: int, V: int, *, q: bool, filt: bool, dtype=torch.float32, q_dtype=torch.float32,
              tok_dtype=torch.int64, par_dtype=torch.int64, max_nodes: int = 12) -> dict:
    """CPU inputs of tree_rejection_sample: B random trees whose tokens come from a
    small likely set (so children match), greedy and random requests mixed."""
    g = torch.Generator().manual_seed(seed)
    likely = torch.randperm(V, generator=g)[:6]
    par, tok, cu, max_depth = [], [], [0], 0
    for b in range(B):
        n = 1 if b == 1 else int(torch.randint(2, max_nodes + 1, (1,), generator=g))  # request 1: root only
        p, t = _random_tree(n, V, g, likely.tolist())
        par += p
        tok += t
        cu.append(cu[-1] + n)
        depth = [0] * n
        for j in range(1, n):
            depth[j] = depth[p[j]] + 1
        max_depth = max(max_depth, max(depth))
    T = cu[-1]
    logits = torch.randn(T, V, generator=g) * 2
    logits[:, likely] += likely_boost(V) + torch.randn(T, len(likely), generator=g)
    temperature = torch.rand(B, generator=g) + 0.3
    temperature[::3] = 0.0
    draft_probs = None
    if q:
        q_logits = torch.randn(T, V, generator=g) * 2
        q_logits[:, likely] += likely_boost(V) + torch.randn(T, len(likely), generator=g)
        draft_probs = torch.softmax(q_logits, 1).to(q_dtype)
    return dict(
        target_logits=logits.to(dtype), tree_tokens=torch.tensor(tok, dtype=tok_dtype),
        parents=torch.tensor(par, dtype=par_dtype), cu_num_nodes=torch.tensor(cu, dtype=torch.int32),
        draft_probs=draft_probs, temperature=temperature,
        top_k=torch.randint(0, 30, (B,), dtype=torch.int32, generator=g) if filt else None,
        top_p=(torch.rand(B, generator=g) * 0.8 + 0.2) if filt else None,
        seed=torch.randint(0, 2**40, (B,), generator=g), positions=torch.randint(0, 10**6, (B,), generator=g),
        max_depth=max_depth)


def to(args: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


def chain_positional(a: dict) -> tuple:
    return (a["target_logits"], a["draft_tokens"], a["cu_num_draft"], a["draft_probs"], a["temperature"], a["top_k"],
            a["top_p"], a["seed"], a["positions"], a["max_draft_len"])


def tree_positional(a: dict) -> tuple:
    return (a["target_logits"], a["tree_tokens"], a["parents"], a["cu_num_nodes"], a["draft_probs"], a["temperature"],
            a["top_k"], a["top_p"], a["seed"], a["positions"], a["max_depth"])


def public_kwargs(a: dict, exclude: tuple) -> dict:
    return {k: v for k, v in a.items() if k not in exclude}


def assert_same(got, want, what: str) -> None:
    for i, (x, y) in enumerate(zip(got, want)):
        x, y = x.cpu(), y.cpu()
        assert x.dtype == y.dtype == torch.int32, f"{what}: output {i} dtypes {x.dtype} / {y.dtype}"
        assert torch.equal(x, y), f"{what}: output {i} differs\n got {x.tolist()}\nwant {y.tolist()}"


def triton_backend():
    pytest.importorskip("triton")
    from fastverify.triton import rejection as triton_rejection
    return triton_rejection


# ----------------------------------------------------------------------------- chain


CHAIN_CASES = [
    # (V, chunk_size, compare with Triton too)
    (111, None, True),
    (111, 16, True),
    (BIG_V, None, True),
    (BIG_V, 512, False),  # 251 chunks: every warp of the finalize kernel gets several
    (BIG_V, 16, False),   # 8016 chunks: the chunk-level scans span two tiles
]


@pytest.mark.parametrize("V,chunk,with_triton", CHAIN_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("q,filt", list(itertools.product((False, True), repeat=2)), ids=lambda x: str(x))
def test_chain_matches_torch_and_triton(V, chunk, with_triton, dtype, q, filt):
    for seed in (0, 1):
        a = make_chain(seed * 1000 + V, 12, V, 4, q=q, filt=filt, dtype=dtype,
                       q_dtype=torch.float32 if dtype == torch.float16 else dtype,
                       id_dtype=torch.int32 if seed else torch.int64)
        want = rejection_sample_torch(*chain_positional(a))
        ca = to(a, DEV)
        got = _cuda.rejection_sample(*chain_positional(ca), chunk_size=chunk)
        assert_same(got, want, f"cuda vs torch (seed {seed})")
        if with_triton:
            tri = triton_backend().rejection_sample(*chain_positional(ca), chunk_size=chunk)
            assert_same(got, tri, f"cuda vs triton (seed {seed})")
        out, num = (t.cpu() for t in got)
        assert ((out >= -1) & (out < V)).all()
        assert (out[torch.arange(len(num)), num.long()] >= 0).all(), "every request emits a token"


def test_chain_public_op_uses_cuda_backend():
    a = to(make_chain(7, 9, 1000, 5, q=True, filt=True), DEV)
    direct = _cuda.rejection_sample(*chain_positional(a))
    with fastverify.use_backend("cuda"):
        via_op = fastverify.rejection_sample(a["target_logits"], a["draft_tokens"], a["cu_num_draft"],
                                             **public_kwargs(a, ("target_logits", "draft_tokens", "cu_num_draft")))
    assert_same(via_op, direct, "public op vs _cuda")
    assert_same(via_op, rejection_sample_torch(*chain_positional(to(a, "cpu"))), "public op vs torch")


def test_chain_strided_logits_and_mixed_dtypes():
    """Rows whose stride or start is off 16 bytes take the scalar load path;
    draft_probs may have another dtype than the logits."""
    a = make_chain(11, 8, 1001, 3, q=True, filt=True, dtype=torch.bfloat16, q_dtype=torch.float16)
    want = rejection_sample_torch(*chain_positional(a))
    R = a["target_logits"].shape[0]
    aligned = torch.zeros(R, 1008, dtype=torch.bfloat16, device=DEV)  # 2016-byte rows: 16-byte loads, partial last
    odd = torch.zeros(R + 1, 1004, dtype=torch.bfloat16, device=DEV)   # 2008-byte rows: scalar loads
    for view in (aligned[:, :1001], odd[:R, :1001], odd[1:, 1:1002]):  # the last one also starts off alignment
        view.copy_(a["target_logits"].to(DEV))
        ca = to(a, DEV)
        ca["target_logits"] = view
        assert_same(_cuda.rejection_sample(*chain_positional(ca)), want,
                    f"strided logits (stride {view.stride(0)}, offset {view.storage_offset()})")


# ----------------------------------------------------------------------------- tree


TREE_CASES = [(37, None, True), (37, 16, True), (BIG_V, None, True), (BIG_V, 16, False)]


@pytest.mark.parametrize("V,chunk,with_triton", TREE_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("q,filt", list(itertools.product((False, True), repeat=2)), ids=lambda x: str(x))
def test_tree_matches_torch_and_triton(V, chunk, with_triton, dtype, q, filt):
    for seed in (0, 1):
        a = make_tree(seed * 1000 + V, 10, V, q=q, filt=filt, dtype=dtype,
                      q_dtype=torch.float32 if dtype == torch.float16 else dtype,
                      tok_dtype=torch.int32 if seed else torch.int64, par_dtype=torch.int64 if seed else torch.int32)
        want = tree_rejection_sample_torch(*tree_positional(a))
        ca = to(a, DEV)
        got = _cuda.tree_rejection_sample(*tree_positional(ca), chunk_size=chunk)
        assert_same(got, want, f"cuda vs torch (seed {seed})")
        if with_triton:
            tri = triton_backend().tree_rejection_sample(*tree_positional(ca), chunk_size=chunk)
            assert_same(got, tri, f"cuda vs triton (seed {seed})")
        _, out, num = (t.cpu() for t in got)
        assert ((out >= -1) & (out < V)).all()
        assert (out[torch.arange(len(num)), num.long()] >= 0).all()


def test_tree_public_op_uses_cuda_backend():
    a = to(make_tree(5, 6, 500, q=True, filt=False), DEV)
    direct = _cuda.tree_rejection_sample(*tree_positional(a))
    with fastverify.use_backend("cuda"):
        via_op = fastverify.tree_rejection_sample(
            a["target_logits"], a["tree_tokens"], a["parents"], a["cu_num_nodes"],
            **public_kwargs(a, ("target_logits", "tree_tokens", "parents", "cu_num_nodes")))
    assert_same(via_op, direct, "public op vs _cuda")
    assert_same(via_op, tree_rejection_sample_torch(*tree_positional(to(a, "cpu"))), "public op vs torch")


# ----------------------------------------------------------------------------- special values


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("filt", (False, True))
def test_nan_and_inf_logits(dtype, filt):
    V = 300
    a = make_chain(3, 6, V, 3, q=True, filt=filt, dtype=torch.float32)
    l = a["target_logits"]
    l[0] = float("nan")              # no finite logit: falls back to the argmax (0)
    l[1] = float("-inf")
    l[2, ::7] = float("nan")
    l[3, 5] = float("inf")           # +inf becomes FLT_MAX after scaling
    l[4, 10] = float("inf")
    l[4, 20:40] = float("nan")
    l[5, ::3] = float("-inf")
    l[-1] = float("nan")
    a["target_logits"] = l.to(dtype)
    want = rejection_sample_torch(*chain_positional(a))
    got = _cuda.rejection_sample(*chain_positional(to(a, DEV)))
    out, num = (t.cpu() for t in got)
    assert ((out >= -1) & (out < V)).all()
    emitted = out[torch.arange(len(num)), num.long()]
    assert ((emitted >= 0) & (emitted < V)).all()
    assert_same(got, want, "nan/inf logits")

    t = make_tree(3, 5, V, q=True, filt=filt)
    lt = t["target_logits"]
    lt[0] = float("nan")
    lt[1:3, ::2] = float("-inf")
    lt[3, 7] = float("inf")
    t["target_logits"] = lt.to(dtype)
    acc, out, num = (x.cpu() for x in _cuda.tree_rejection_sample(*tree_positional(to(t, DEV))))
    assert ((out >= -1) & (out < V)).all()
    assert (out[torch.arange(len(num)), num.long()] >= 0).all()
    assert_same((acc, out, num), tree_rejection_sample_torch(*tree_positional(t)), "nan/inf tree")

    # several +inf in a row: the torch spec's logsumexp saturates at FLT_MAX there, so
    # only the range is checked
    l = a["target_logits"].float()
    l[2:5, 10:20] = float("inf")
    a["target_logits"] = l.to(dtype)
    out, num = (x.cpu() for x in _cuda.rejection_sample(*chain_positional(to(a, DEV))))
    assert ((out >= -1) & (out < V)).all()
    emitted = out[torch.arange(len(num)), num.long()]
    assert ((emitted >= 0) & (emitted < V)).all()


# ----------------------------------------------------------------------------- graphs, compile


def _capture(fn):
    """(graph, static outputs) of fn after a warm-up on a side stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = fn()
    return graph, outs


def _refill(static: dict, seed: int) -> None:
    """New contents for the graph's static inputs (same shapes, same drafts)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    logits = static["target_logits"]
    logits.copy_((torch.randn(logits.shape, generator=g, device=DEV) * 2).to(logits.dtype))
    if static.get("draft_probs") is not None:
        q = static["draft_probs"]
        q.copy_(torch.softmax(torch.randn(q.shape, generator=g, device=DEV) * 2, 1).to(q.dtype))
    static["seed"].add_(12345)
    static["positions"].add_(17)
    static["temperature"].copy_(static["temperature"].flip(0))


@pytest.mark.parametrize("q,filt", [(False, False), (True, True)])
def test_cuda_graph_capture_and_replay(q, filt):
    a = to(make_chain(21, 8, 4000, 4, q=q, filt=filt, dtype=torch.bfloat16, q_dtype=torch.bfloat16), DEV)
    t = to(make_tree(22, 6, 4000, q=q, filt=filt), DEV)
    for static, fn in ((a, lambda: _cuda.rejection_sample(*chain_positional(a))),
                       (t, lambda: _cuda.tree_rejection_sample(*tree_positional(t)))):
        graph, outs = _capture(fn)
        graph.replay()
        torch.cuda.synchronize()
        assert_same(outs, fn(), "replay vs eager")
        # new contents, same shapes: the replay follows the inputs
        _refill(static, 99)
        graph.replay()
        torch.cuda.synchronize()
        assert_same(outs, fn(), "replay vs eager after new inputs")


def test_cuda_graph_through_public_op():
    a = to(make_chain(31, 8, 2048, 3, q=True, filt=True), DEV)
    kw = public_kwargs(a, ("target_logits", "draft_tokens", "cu_num_draft"))
    with fastverify.use_backend("cuda"):
        fn = lambda: fastverify.rejection_sample(a["target_logits"], a["draft_tokens"], a["cu_num_draft"], **kw)  # noqa: E731
        graph, outs = _capture(fn)
        graph.replay()
        torch.cuda.synchronize()
        assert_same(outs, fn(), "graph replay of the public op")


def test_torch_compile_fullgraph():
    a = to(make_chain(41, 8, 3000, 4, q=True, filt=True), DEV)

    def f(logits, drafts, cu, q, temperature, top_k, top_p, seed, positions):
        out, num = torch.ops.fastverify.rejection_sample(
            logits, drafts, cu, draft_probs=q, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
            positions=positions, max_draft_len=4)
        return out, num + 0

    args = (a["target_logits"], a["draft_tokens"], a["cu_num_draft"], a["draft_probs"], a["temperature"], a["top_k"],
            a["top_p"], a["seed"], a["positions"])
    with fastverify.use_backend("cuda"):
        compiled = torch.compile(f, fullgraph=True)
        got = compiled(*args)
        want = f(*args)
    assert_same(got, want, "torch.compile vs eager")
    assert_same(got, rejection_sample_torch(*chain_positional(to(a, "cpu"))), "torch.compile vs torch")


# ----------------------------------------------------------------------------- misc


def test_deterministic_and_on_the_current_stream():
    a = to(make_chain(51, 16, 5000, 4, q=True, filt=True, dtype=torch.float16, q_dtype=torch.float16), DEV)
    first = _cuda.rejection_sample(*chain_positional(a))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        second = _cuda.rejection_sample(*chain_positional(a))
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert_same(first, second, "two runs")


def test_library_loads_the_ops():
    ns = _cuda.library()
    assert "chunk_size" in str(ns.rejection_sample.default._schema)
    assert "cuda_stream" in str(ns.tree_rejection_sample.default._schema)


def test_bad_chunk_size_is_rejected():
    a = to(make_chain(61, 3, 100, 2, q=False, filt=False), DEV)
    with pytest.raises(RuntimeError, match="chunk_size"):
        _cuda.rejection_sample(*chain_positional(a), chunk_size=24)
