"""The cuda backend (csrc/cuda, loaded by fastverify/_cuda.py) against the torch backend
(the spec, run on CPU copies), the Triton backend and the naive oracles. Needs a CUDA GPU.

Sampling comparisons are exact: the three backends run the same algorithm on the same
Philox bits, so they emit the same tokens. Attention is compared with float tolerances
per dtype. Inputs come from fixed seeds.

The comparisons are ``check_*`` functions taking the backend's entry points (``kern``,
``fastverify._cuda`` here) and the device of its tensors: tests/test_cuda_emulated.py
runs a subset of them with the same kernels emulated on the CPU (tests/cuda_emu).
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

import naive
from attention_problems import (ancestors, build_tree_cases, dense_sdpa_oracle, mask_words_oracle, paged_problem,
                                path_attention_oracle, tree_parents)
from problems import random_tree
from test_tree_attention import CASES as CPU_ATTENTION_CASES

import fastverify
from fastverify import _cuda
from fastverify.ops.attention import build_tree_torch, compact_kv_torch, tree_attention_torch
from fastverify.ops.rejection import rejection_sample_torch, tree_rejection_sample_torch
from fastverify.ops.sparse_kv import select_kv_chunks_torch, sparse_kv_attention_torch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEV = "cuda"
BACKEND = "cuda"   # the backend every test here runs (gpu_check counts tests per backend)
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


def make_tree(seed: int, B: int, V: int, *, q: bool, filt: bool, dtype=torch.float32, q_dtype=torch.float32,
              tok_dtype=torch.int64, par_dtype=torch.int64, max_nodes: int = 12) -> dict:
    """CPU inputs of tree_rejection_sample: B random trees whose tokens come from a
    small likely set (so children match), greedy and random requests mixed."""
    g = torch.Generator().manual_seed(seed)
    likely = torch.randperm(V, generator=g)[:6]
    par, tok, cu, max_depth = [], [], [0], 0
    for b in range(B):
        n = 1 if b == 1 else int(torch.randint(2, max_nodes + 1, (1,), generator=g))  # request 1: root only
        p, t = random_tree(n, V, g, likely=likely.tolist())
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


def triton_backend(family: str = "rejection"):
    pytest.importorskip("triton")
    import importlib
    return importlib.import_module(f"fastverify.triton.{family}")


# ----------------------------------------------------------------------------- chain


CHAIN_CASES = [
    # (V, chunk_size, compare with Triton too)
    (111, None, True),
    (111, 16, True),
    (BIG_V, None, True),
    (BIG_V, 512, False),  # 251 chunks: every warp of the finalize kernel gets several
    (BIG_V, 16, False),   # 8016 chunks: the chunk-level scans span two tiles
]


def check_chain(kern, dev, V, chunk, with_triton, dtype, q, filt):
    for seed in (0, 1):
        a = make_chain(seed * 1000 + V, 12, V, 4, q=q, filt=filt, dtype=dtype,
                       q_dtype=torch.float32 if dtype == torch.float16 else dtype,
                       id_dtype=torch.int32 if seed else torch.int64)
        want = rejection_sample_torch(*chain_positional(a))
        ca = to(a, dev)
        got = kern.rejection_sample(*chain_positional(ca), chunk_size=chunk)
        assert_same(got, want, f"cuda vs torch (seed {seed})")
        if with_triton:
            tri = triton_backend().rejection_sample(*chain_positional(ca), chunk_size=chunk)
            assert_same(got, tri, f"cuda vs triton (seed {seed})")
        out, num = (t.cpu() for t in got)
        assert ((out >= -1) & (out < V)).all()
        assert (out[torch.arange(len(num)), num.long()] >= 0).all(), "every request emits a token"


@pytest.mark.parametrize("V,chunk,with_triton", CHAIN_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("q,filt", list(itertools.product((False, True), repeat=2)), ids=lambda x: str(x))
def test_chain_matches_torch_and_triton(V, chunk, with_triton, dtype, q, filt):
    check_chain(_cuda, DEV, V, chunk, with_triton, dtype, q, filt)


def test_chain_public_op_uses_cuda_backend():
    a = to(make_chain(7, 9, 1000, 5, q=True, filt=True), DEV)
    direct = _cuda.rejection_sample(*chain_positional(a))
    with fastverify.use_backend("cuda"):
        via_op = fastverify.rejection_sample(a["target_logits"], a["draft_tokens"], a["cu_num_draft"],
                                             **public_kwargs(a, ("target_logits", "draft_tokens", "cu_num_draft")))
    assert_same(via_op, direct, "public op vs _cuda")
    assert_same(via_op, rejection_sample_torch(*chain_positional(to(a, "cpu"))), "public op vs torch")


def check_chain_strided_logits_and_mixed_dtypes(kern, dev):
    """Rows whose stride or start is off 16 bytes take the scalar load path;
    draft_probs may have another dtype than the logits."""
    a = make_chain(11, 8, 1001, 3, q=True, filt=True, dtype=torch.bfloat16, q_dtype=torch.float16)
    want = rejection_sample_torch(*chain_positional(a))
    R = a["target_logits"].shape[0]
    aligned = torch.zeros(R, 1008, dtype=torch.bfloat16, device=dev)  # 2016-byte rows: 16-byte loads, partial last
    odd = torch.zeros(R + 1, 1004, dtype=torch.bfloat16, device=dev)   # 2008-byte rows: scalar loads
    for view in (aligned[:, :1001], odd[:R, :1001], odd[1:, 1:1002]):  # the last one also starts off alignment
        view.copy_(a["target_logits"].to(dev))
        ca = to(a, dev)
        ca["target_logits"] = view
        assert_same(kern.rejection_sample(*chain_positional(ca)), want,
                    f"strided logits (stride {view.stride(0)}, offset {view.storage_offset()})")


def test_chain_strided_logits_and_mixed_dtypes():
    check_chain_strided_logits_and_mixed_dtypes(_cuda, DEV)


# ----------------------------------------------------------------------------- tree


TREE_CASES = [(37, None, True), (37, 16, True), (BIG_V, None, True), (BIG_V, 16, False)]


def check_tree(kern, dev, V, chunk, with_triton, dtype, q, filt):
    for seed in (0, 1):
        a = make_tree(seed * 1000 + V, 10, V, q=q, filt=filt, dtype=dtype,
                      q_dtype=torch.float32 if dtype == torch.float16 else dtype,
                      tok_dtype=torch.int32 if seed else torch.int64, par_dtype=torch.int64 if seed else torch.int32)
        want = tree_rejection_sample_torch(*tree_positional(a))
        ca = to(a, dev)
        got = kern.tree_rejection_sample(*tree_positional(ca), chunk_size=chunk)
        assert_same(got, want, f"cuda vs torch (seed {seed})")
        if with_triton:
            tri = triton_backend().tree_rejection_sample(*tree_positional(ca), chunk_size=chunk)
            assert_same(got, tri, f"cuda vs triton (seed {seed})")
        _, out, num = (t.cpu() for t in got)
        assert ((out >= -1) & (out < V)).all()
        assert (out[torch.arange(len(num)), num.long()] >= 0).all()


@pytest.mark.parametrize("V,chunk,with_triton", TREE_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("q,filt", list(itertools.product((False, True), repeat=2)), ids=lambda x: str(x))
def test_tree_matches_torch_and_triton(V, chunk, with_triton, dtype, q, filt):
    check_tree(_cuda, DEV, V, chunk, with_triton, dtype, q, filt)


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


def check_nan_and_inf_logits(kern, dev, dtype, filt):
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
    got = kern.rejection_sample(*chain_positional(to(a, dev)))
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
    acc, out, num = (x.cpu() for x in kern.tree_rejection_sample(*tree_positional(to(t, dev))))
    assert ((out >= -1) & (out < V)).all()
    assert (out[torch.arange(len(num)), num.long()] >= 0).all()
    assert_same((acc, out, num), tree_rejection_sample_torch(*tree_positional(t)), "nan/inf tree")

    # several +inf in a row: the torch spec's logsumexp saturates at FLT_MAX there, so
    # only the range is checked
    l = a["target_logits"].float()
    l[2:5, 10:20] = float("inf")
    a["target_logits"] = l.to(dtype)
    out, num = (x.cpu() for x in kern.rejection_sample(*chain_positional(to(a, dev))))
    assert ((out >= -1) & (out < V)).all()
    emitted = out[torch.arange(len(num)), num.long()]
    assert ((emitted >= 0) & (emitted < V)).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("filt", (False, True))
def test_nan_and_inf_logits(dtype, filt):
    check_nan_and_inf_logits(_cuda, DEV, dtype, filt)


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


# ============================================================================ tree attention

ATTN_TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}

# The CPU suite's grid (tests/test_tree_attention.py) plus shapes that only matter for
# the CUDA tiles: several q tiles and prefix splits, a head dim off the 16-byte grid.
ATTENTION_CASES = dict(CPU_ATTENTION_CASES)
ATTENTION_CASES.update({
    "full_64_node_tree_gqa_4": ([64, 3], [100, 7], dict(Hq=8, Hkv=2, kind="full")),
    "long_prefixes_many_splits": ([3, 64, 1], [700, 1500, 33], dict(Hq=4, Hkv=1, page=32)),
    "mixed_sizes_page_7": ([1, 17, 64, 2], [50, 0, 13, 290], dict(Hq=6, Hkv=3, page=7)),
    "head_dim_33_unaligned": ([5, 2], [19, 7], dict(D=33)),
    "head_dim_200": ([4, 9], [40, 18], dict(D=200, Hq=2, Hkv=1)),
})


def assert_close(got, want, dtype, what=""):
    tol = ATTN_TOL[dtype]
    err = (got.double() - want.double()).abs().max().item()
    assert err <= tol * max(1.0, want.abs().max().item()), f"{what}: max abs error {err:.3g} > {tol}"


def attention_problem(case: str, dtype):
    sizes, prefixes, kw = ATTENTION_CASES[case]
    return paged_problem(sizes, prefixes, seed=len(case), dtype=dtype, **kw)


def attention_oracle(p):
    # the dense oracle gathers each request's keys once: cheaper for long prefixes
    return dense_sdpa_oracle(p) if max(p.prefixes) > 200 else path_attention_oracle(p)


def check_tree_attention(kern, dev, case, dtype, *, with_triton=True, num_splits=None):
    """The cuda backend against the oracle, the torch backend and (on dev) Triton."""
    p = attention_problem(case, dtype)
    x = p.to(dev)
    got = kern.tree_attention(*x.args(), None, num_splits=num_splits).cpu()
    assert got.dtype == dtype and got.shape == p.q.shape
    assert_close(got, attention_oracle(p), dtype, "cuda vs oracle")
    assert_close(got, tree_attention_torch(*p.args(), None), dtype, "cuda vs torch")
    if with_triton:
        tri = triton_backend("tree_attention").tree_attention(*x.args(), None).cpu()
        assert_close(got, tri, dtype, "cuda vs triton")


def check_tree_attention_scale_and_splits(kern, dev, dtype):
    """sm_scale, and every number of prefix splits merging to the same result."""
    p = paged_problem([4, 2, 7], [150, 61, 300], Hq=4, Hkv=2, D=64, page=16, seed=6, spare_columns=3, dtype=dtype)
    from dataclasses import replace
    want = dense_sdpa_oracle(replace(p, q=p.q.double() * (0.3 * p.q.shape[-1] ** 0.5)))
    x = p.to(dev)
    for splits in (None, 1, 2, 5, 16):
        got = kern.tree_attention(*x.args(), 0.3, num_splits=splits).cpu()
        assert_close(got, want, dtype, f"num_splits={splits}")


def check_tree_attention_strided_layouts(kern, dev, dtype):
    """q, out and the caches as views with padded rows: strides off the dense layout
    (16-byte aligned and not), handled without copies."""
    p = attention_problem("random_trees", dtype)
    want = path_attention_oracle(p)
    T, Hq, D = p.q.shape
    for pad in (8, 3):  # 8 keeps 16-byte rows for 16-bit types, 3 forces scalar loads
        q = torch.zeros(T, Hq, D + pad, dtype=dtype, device=dev)[..., :D]
        q.copy_(p.q)
        caches = []
        for c in (p.k_cache, p.v_cache):
            big = torch.zeros(*c.shape[:3], D + pad, dtype=dtype, device=dev)[..., :D]
            big.copy_(c)
            caches.append(big)
        x = p.to(dev)
        got = kern.tree_attention(q, caches[0], caches[1], *x.args()[3:], None).cpu()
        assert_close(got, want, dtype, f"rows padded by {pad}")


def check_tree_attention_garbage_is_memory_safe(kern, dev):
    """Unchecked garbage (CUDA without FASTVERIFY_CHECKS): seq_lens beyond the block
    table and page ids outside the cache are masked out, never read."""
    p = paged_problem([3, 4], [5, 9], Hq=4, Hkv=2, D=64, page=4, seed=13)
    table = p.block_table.clone()
    table[1, 1] = 10**6
    table[0, 0] = -5
    lens = p.seq_lens.clone()
    lens[0] = 10**6
    x = p.to(dev)
    out = kern.tree_attention(x.q, x.k_cache, x.v_cache, table.to(dev), lens.to(dev), x.cu, x.tree_mask,
                              None).cpu()
    assert torch.isfinite(out.float()).all()


def check_build_tree(kern, dev):
    g = torch.Generator().manual_seed(0)
    parents, prefixes, cu = build_tree_cases(g)
    sizes = [len(p) for p in parents]
    want_mask = torch.tensor(sum((mask_words_oracle(p, 2) for p in parents), []), dtype=torch.int64)
    want_depth = [len(ancestors(p, i)) - 1 for p in parents for i in range(len(p))]
    request = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    for par_dtype, prefix_dtype in ((torch.int64, torch.int64), (torch.int32, torch.int32)):
        par = torch.tensor(sum(parents, []), dtype=par_dtype)
        prefix = torch.tensor(prefixes if prefix_dtype == torch.int64 else [x % 2**31 for x in prefixes],
                              dtype=prefix_dtype)
        mask, pos, depth = (t.cpu() for t in kern.build_tree(par.to(dev), cu.to(dev), prefix.to(dev), 128))
        assert mask.dtype == torch.int64 and pos.dtype == torch.int64 and depth.dtype == torch.int32
        assert torch.equal(mask, want_mask)
        assert depth.tolist() == want_depth
        assert torch.equal(pos, prefix.long()[request] + depth)
        for got, want in zip((mask, pos, depth), build_tree_torch(par, cu, prefix, 128)):
            assert torch.equal(got, want)
    # default width (max_nodes=None: T bits), 256 nodes in 4 words
    p256 = tree_parents("random", 256, g)
    mask, _, _ = kern.build_tree(torch.tensor(p256, device=dev), torch.tensor([0, 256], dtype=torch.int32, device=dev),
                                 torch.tensor([0], device=dev), None)
    assert torch.equal(mask.cpu(), torch.tensor(mask_words_oracle(p256, 4)))


def check_build_tree_garbage_is_memory_safe(kern, dev):
    mask, pos, depth = kern.build_tree(torch.tensor([-1, 2, 1, 7], device=dev),
                                       torch.tensor([0, 4], dtype=torch.int32, device=dev),
                                       torch.tensor([0], device=dev), 4)
    assert (depth.cpu() >= 0).all() and (depth.cpu() <= 4).all()
    # node 1's parent 2 comes after it: the walk stops there
    assert mask.cpu()[:, 0].tolist()[:2] == [1, 2]


COMPACT_LAYOUTS = {
    # name: (dtype, head_dim, padded head row): 16-byte units, 4-byte and 2-byte elements
    "fp32_d16": (torch.float32, 16, 16),
    "bf16_d64": (torch.bfloat16, 64, 64),
    "fp16_d80_padded": (torch.float16, 80, 88),
    "fp16_d33": (torch.float16, 33, 33),
    "fp32_d5_padded": (torch.float32, 5, 7),
}


def check_compact_kv(kern, dev, layout):
    """Paths with overlapping source/destination steps, empty paths, lone roots: the same
    bytes as the torch spec (gather before scatter), other slots untouched."""
    dtype, D, row = COMPACT_LAYOUTS[layout]
    p = paged_problem([7, 5, 1, 9], [13, 0, 30, 6], Hq=2, Hkv=2, D=D, page=4, seed=8, dtype=dtype)
    paths = [[0, 2, 5], [0], [0], [0, 1, 3, 8]]
    accepted = torch.full((4, 5), -1, dtype=torch.int32)
    for b, path in enumerate(paths):
        accepted[b, :len(path)] = torch.tensor(path)
    num = torch.tensor([len(x) - 1 for x in paths], dtype=torch.int32)
    prefix = torch.tensor(p.prefixes, dtype=torch.int32)
    k_want, v_want = p.k_cache.clone(), p.v_cache.clone()
    compact_kv_torch(k_want, v_want, p.block_table, prefix, accepted, num)
    caches = []
    for c in (p.k_cache, p.v_cache):
        big = torch.zeros(*c.shape[:3], row, dtype=dtype, device=dev)
        big[..., :D] = c
        caches.append(big)
    k, v = (c[..., :D] for c in caches)
    kern.compact_kv(k, v, p.block_table.to(dev), prefix.to(dev), accepted.to(dev), num.to(dev))
    assert torch.equal(k.cpu(), k_want) and torch.equal(v.cpu(), v_want)
    assert all((c[..., D:] == 0).all() for c in caches), "bytes past head_dim untouched"


def check_compact_kv_garbage_is_memory_safe(kern, dev):
    p = paged_problem([2], [3], Hq=2, Hkv=1, D=16, page=4, seed=2).to(dev)
    k_before = p.k_cache.clone()
    acc = torch.tensor([[0, 3, 1000]], dtype=torch.int32, device=dev)
    kern.compact_kv(p.k_cache, p.v_cache, p.block_table, torch.tensor([3], dtype=torch.int32, device=dev), acc,
                    torch.tensor([2], dtype=torch.int32, device=dev))
    # step 1 (node 3, slot 6) is past the request's 5 keys but inside its pages: copied;
    # step 2 (node 1000) is past the block table: skipped
    page = p.k_cache.shape[1]
    src, dst = 3 + 3, 3 + 1
    t = p.block_table.cpu()
    k_before[int(t[0, dst // page]), dst % page] = k_before[int(t[0, src // page]), src % page]
    assert torch.equal(p.k_cache.cpu(), k_before.cpu())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_tree_attention_matches_oracle_torch_and_triton(case, dtype):
    check_tree_attention(_cuda, DEV, case, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tree_attention_scale_and_splits(dtype):
    check_tree_attention_scale_and_splits(_cuda, DEV, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tree_attention_strided_layouts(dtype):
    check_tree_attention_strided_layouts(_cuda, DEV, dtype)


def test_tree_attention_garbage_is_memory_safe():
    check_tree_attention_garbage_is_memory_safe(_cuda, DEV)


def test_build_tree_matches_oracle_and_torch():
    check_build_tree(_cuda, DEV)


def test_build_tree_garbage_is_memory_safe():
    check_build_tree_garbage_is_memory_safe(_cuda, DEV)


@pytest.mark.parametrize("layout", list(COMPACT_LAYOUTS))
def test_compact_kv_matches_torch(layout):
    check_compact_kv(_cuda, DEV, layout)


def test_compact_kv_garbage_is_memory_safe():
    check_compact_kv_garbage_is_memory_safe(_cuda, DEV)


def test_attention_public_ops_use_cuda_backend():
    p = paged_problem([5, 9], [21, 14], Hq=4, Hkv=2, D=128, page=16, dtype=torch.bfloat16, seed=5).to(DEV)
    parents = torch.tensor(sum(p.parents, []), device=DEV)
    prefix = torch.tensor(p.prefixes, device=DEV)
    with fastverify.use_backend("cuda"):
        mask, pos, depth = fastverify.build_tree(parents, p.cu, prefix, max_nodes=64)
        out = fastverify.tree_attention(p.q, p.k_cache, p.v_cache, p.block_table, p.seq_lens, p.cu, mask)
    assert torch.equal(mask, p.tree_mask)
    assert torch.equal(out, _cuda.tree_attention(*p.args(), None))
    assert_close(out.cpu(), path_attention_oracle(p.to("cpu")), torch.bfloat16, "public op vs oracle")


def test_attention_cuda_graph_and_compile():
    p = paged_problem([6, 64], [300, 40], Hq=8, Hkv=2, D=128, page=16, dtype=torch.float16, seed=14).to(DEV)
    fn = lambda: _cuda.tree_attention(*p.args(), None)  # noqa: E731
    graph, out = _capture(fn)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, fn())
    p.q.copy_(torch.randn_like(p.q))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, fn()), "the replay follows new q"

    def f(q, k, v, table, lens, cu, mask):
        return torch.ops.fastverify.tree_attention(q * 1.0, k, v, table, lens, cu, mask) * 2

    with fastverify.use_backend("cuda"):
        got = torch.compile(f, fullgraph=True)(*p.args())
        want = f(*p.args())
    assert torch.equal(got, want)


# ============================================================================ frequency-ranked LM head

LM_TOL = 5e-4  # |score| error allowed against the float64 reference: fp32 accumulation over d <= 576


def make_lm_head(seed: int, M: int, V: int, d: int, dtype, *, map_dtype=torch.int64, with_temperature=True) -> dict:
    """CPU inputs of lm_head_topk / lm_head_sample: logits of O(3), a scattered token_map,
    temperatures with greedy (0) and negative rows (scored at 1), 64-bit seeds and positions."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(M, d, generator=g)
    weight = torch.randn(V, d, generator=g) * (2.0 / d ** 0.5)
    temperature = None
    if with_temperature:
        temperature = torch.rand(M, generator=g) + 0.5
        temperature[::4] = 0.0
        temperature[2::7] = -1.0
    return dict(hidden=hidden.to(dtype), weight=weight.to(dtype),
                token_map=None if map_dtype is None else torch.randperm(3 * V + 5, generator=g)[:V].to(map_dtype),
                temperature=temperature, seed=torch.randint(-2**62, 2**62, (M,), generator=g),
                positions=torch.randint(0, 2**40, (M,), generator=g))


def lm_head_scores64(a: dict, dev) -> torch.Tensor:
    """float64 s[m, v] = hidden[m] · weight[v] / t_m (t <= 0 or None: 1), NaN -> -inf, on dev;
    tests/naive.py's loops for tiny problems."""
    import naive

    h, w, t = a["hidden"], a["weight"], a["temperature"]
    M, V = h.shape[0], w.shape[0]
    if M * V * h.shape[1] <= 20000:
        temps = [1.0] * M if t is None else t.tolist()
        s = torch.tensor([naive.subset_scores(hr, w.double().tolist(), tm) for hr, tm in
                          zip(h.double().tolist(), temps)], dtype=torch.float64).reshape(M, V).to(dev)
    else:
        t64 = torch.ones(M, dtype=torch.float64) if t is None else torch.where(t > 0, t, 1.0).double()
        s = (h.to(dev).double() @ w.to(dev).double().T) / t64.to(dev)[:, None]
    return torch.where(torch.isnan(s), float("-inf"), s)


def subset_rows(ids: torch.Tensor, token_map, V: int) -> torch.Tensor:
    """The subset rows of full-vocabulary ids (-1 for an id token_map does not hold)."""
    ids = ids.long()
    if token_map is None:
        return torch.where((ids >= 0) & (ids < V), ids, -1)
    tm = token_map.to(ids.device).long()
    inverse = torch.full((int(tm.max()) + 1,), -1, dtype=torch.long, device=ids.device)
    inverse[tm] = torch.arange(V, device=ids.device)
    ok = (ids >= 0) & (ids < inverse.numel())
    return torch.where(ok, inverse[ids.clamp(0, inverse.numel() - 1)], -1)


def assert_lm_head_topk(got, s64: torch.Tensor, token_map, k: int, what: str) -> None:
    """got = (ids, logprobs, lse) against the float64 scores: lse, and at every rank j the
    returned id's true score equals the j-th best score (so ids differ from the reference
    only between scores tied within LM_TOL), ids distinct, logprobs = score - lse."""
    ids, lp, lse = (x.to(s64.device) for x in got)
    M, V = s64.shape
    assert ids.dtype == torch.int64 and lp.dtype == torch.float32 and lse.dtype == torch.float32, what
    assert ids.shape == (M, k) and lp.shape == (M, k) and lse.shape == (M,), what
    lse64 = torch.logsumexp(s64, 1)
    want_vals = s64.sort(dim=1, descending=True, stable=True).values[:, :k]
    rows = subset_rows(ids, token_map, V)
    assert (rows >= 0).all(), f"{what}: ids outside token_map: {ids.tolist()}"
    assert (rows.sort(1).values.diff(dim=1) > 0).all() if k > 1 else True, f"{what}: repeated ids"
    got_vals = s64.gather(1, rows)
    err = (got_vals - want_vals).abs().max().item()
    assert err <= LM_TOL, f"{what}: returned ids are not the top-{k} (score error {err:.3g})"
    err = (lse.double() - lse64).abs().max().item()
    assert err <= LM_TOL, f"{what}: lse error {err:.3g}"
    err = (lp.double() - (got_vals - lse64[:, None])).abs().max().item()
    assert err <= LM_TOL, f"{what}: logprob error {err:.3g}"


def assert_same_topk(got, want, s64: torch.Tensor, token_map, what: str) -> None:
    """Two backends' top-k: the same ids except between scores tied within LM_TOL, close logprobs."""
    gi, gl, gs = (x.to(s64.device) for x in got)
    wi, wl, ws = (x.to(s64.device) for x in want)
    V = s64.shape[1]
    gap = (s64.gather(1, subset_rows(gi, token_map, V)) - s64.gather(1, subset_rows(wi, token_map, V))).abs()
    assert (torch.eq(gi, wi) | (gap <= LM_TOL)).all(), f"{what}: ids differ\n got {gi.tolist()}\nwant {wi.tolist()}"
    assert torch.allclose(gl, wl, atol=LM_TOL, rtol=0, equal_nan=True), f"{what}: logprobs differ"
    assert torch.allclose(gs, ws, atol=LM_TOL, rtol=0, equal_nan=True), f"{what}: lse differs"


def lm_head_noisy64(a: dict, s64: torch.Tensor) -> torch.Tensor:
    """s + g (float64) on rows with temperature > 0, s on the others."""
    from fastverify.ops import philox

    M, V = s64.shape
    dev = s64.device
    g = philox.gumbel(a["seed"].to(dev)[:, None], a["positions"].to(dev)[:, None], torch.arange(V, device=dev)[None, :])
    return torch.where((a["temperature"].to(dev) > 0)[:, None], s64 + g, s64)


def assert_lm_head_sample(got, a: dict, s64: torch.Tensor, what: str) -> None:
    """The drawn id is the argmax of s + g (ties within LM_TOL aside); logprob and lse."""
    ids, lp, lse = (x.to(s64.device) for x in got)
    M, V = s64.shape
    assert ids.dtype == torch.int64 and ids.shape == (M,) and lp.shape == (M,) and lse.shape == (M,), what
    noisy = lm_head_noisy64(a, s64)
    rows = subset_rows(ids, a["token_map"], V)
    assert (rows >= 0).all(), f"{what}: ids outside token_map: {ids.tolist()}"
    want = noisy.argmax(1)
    gap = (noisy.gather(1, rows[:, None])[:, 0] - noisy.gather(1, want[:, None])[:, 0]).abs()
    assert (torch.eq(rows, want) | (gap <= LM_TOL)).all(), \
        f"{what}: drawn rows {rows.tolist()}, want {want.tolist()}"
    lse64 = torch.logsumexp(s64, 1)
    assert (lse.double() - lse64).abs().max().item() <= LM_TOL, f"{what}: lse"
    assert (lp.double() - (s64.gather(1, rows[:, None])[:, 0] - lse64)).abs().max().item() <= LM_TOL, f"{what}: logprob"


def lm_head_torch_backend():
    return pytest.importorskip("fastverify.ops.frspec")


def check_lm_head_topk(kern, dev, M, V, d, k, dtype, *, num_splits=None, map_dtype=torch.int64,
                       with_temperature=True, with_triton=False):
    """The cuda backend's lm_head_topk against the float64 oracle, the torch backend and (on dev) Triton."""
    a = make_lm_head(M * 131 + V + d + k, M, V, d, dtype, map_dtype=map_dtype, with_temperature=with_temperature)
    x = to(a, dev)
    args = (x["hidden"], x["weight"], k, x["token_map"], x["temperature"])
    got = kern.lm_head_topk(*args, num_splits=num_splits)
    s64 = lm_head_scores64(a, dev)
    assert_lm_head_topk(got, s64, a["token_map"], k, "cuda vs oracle")
    assert_same_topk(got, lm_head_torch_backend().lm_head_topk_torch(*args), s64, a["token_map"], "cuda vs torch")
    if with_triton:
        tri = triton_backend("frspec").lm_head_topk(*args)
        assert_same_topk(got, tri, s64, a["token_map"], "cuda vs triton")


def check_lm_head_sample(kern, dev, M, V, d, dtype, *, num_splits=None, map_dtype=torch.int64, with_triton=False):
    a = make_lm_head(M * 71 + V + d, M, V, d, dtype, map_dtype=map_dtype)
    x = to(a, dev)
    args = (x["hidden"], x["weight"], x["temperature"], x["seed"], x["positions"], x["token_map"])
    got = kern.lm_head_sample(*args, num_splits=num_splits)
    s64 = lm_head_scores64(a, dev)
    assert_lm_head_sample(got, a, s64, "cuda vs oracle")
    want = lm_head_torch_backend().lm_head_sample_torch(*args)
    assert_same_topk(tuple(t[:, None] for t in got[:2]) + (got[2],), tuple(t[:, None] for t in want[:2]) + (want[2],),
                     lm_head_noisy64(a, s64), a["token_map"], "cuda vs torch")
    if M * V * d <= 20000:  # the loop oracle's own draw
        import naive
        n_ids, _, _ = naive.lm_head_sample(a["hidden"].double().tolist(), a["weight"].double().tolist(),
                                           a["temperature"].tolist(), a["seed"].tolist(), a["positions"].tolist(),
                                           a["token_map"].tolist() if a["token_map"] is not None else None)
        assert got[0].cpu().tolist() == n_ids, "cuda vs naive.lm_head_sample"
    if with_triton:
        tri = triton_backend("frspec").lm_head_sample(*args)
        assert torch.equal(got[0].cpu(), tri[0].cpu()), "cuda vs triton"


def check_lm_head_splits_agree(kern, dev, dtype):
    """Every number of splits (and both merge widths) gives the same ids and close logprobs."""
    a = to(make_lm_head(5, 6, 1430, 64, dtype), dev)  # the last tile: 22 rows
    for k in (1, 8, 16, 40):
        args = (a["hidden"], a["weight"], k, a["token_map"], a["temperature"])
        first = kern.lm_head_topk(*args, num_splits=1)
        for splits in (2, 5, 12, None):
            got = kern.lm_head_topk(*args, num_splits=splits)
            assert torch.equal(got[0], first[0]), f"k={k}: ids with {splits} splits"
            assert torch.allclose(got[1], first[1], atol=1e-5) and torch.allclose(got[2], first[2], atol=1e-5)
    sargs = (a["hidden"], a["weight"], a["temperature"], a["seed"], a["positions"], a["token_map"])
    first = kern.lm_head_sample(*sargs, num_splits=1)
    for splits in (3, 12, None):
        got = kern.lm_head_sample(*sargs, num_splits=splits)
        assert torch.equal(got[0], first[0]) and torch.allclose(got[2], first[2], atol=1e-5)


def check_lm_head_special_values(kern, dev, dtype):
    """NaN scores count as -inf (never ahead of a finite one), ties go to the lower subset
    row (duplicated weight rows, an all-zero hidden row), an all-NaN row still returns the
    lowest rows, and nothing leaves token_map."""
    M, V, d = 5, 300, 40
    a = make_lm_head(17, M, V, d, torch.float32, map_dtype=torch.int32)
    h, w = a["hidden"], a["weight"]
    w[10] = w[3]
    w[200] = w[3]
    w[50] = w[7]
    w[20:30] = float("nan")
    w[40] = 0.0
    h[0] = 0.0                      # every finite score 0: the top-k are the lowest finite rows
    h[1, 5] = float("nan")          # every score NaN
    a["hidden"], a["weight"] = h.to(dtype), w.to(dtype)
    x = to(a, dev)
    frs = lm_head_torch_backend()
    for k in (1, 8, 16, 40):
        args = (x["hidden"], x["weight"], k, x["token_map"], x["temperature"])
        ids, lp, lse = (t.cpu() for t in kern.lm_head_topk(*args))
        rows = subset_rows(ids, a["token_map"], V)
        finite_rows = [v for v in range(V) if not 20 <= v < 30]  # 0 · NaN is NaN
        assert rows[0].tolist() == finite_rows[:k], "ties -> lower rows"
        assert rows[1].tolist() == list(range(k)), "all scores NaN: the lowest rows"
        assert not ((rows[2:] >= 20) & (rows[2:] < 30)).any(), "a NaN row ranked ahead of finite scores"
        wi, wl, ws = (t.cpu() for t in frs.lm_head_topk_torch(*args))
        assert torch.equal(ids, wi), f"k={k}: ids vs torch\n got {ids.tolist()}\nwant {wi.tolist()}"
        assert torch.allclose(lp, wl, atol=LM_TOL, equal_nan=True) and torch.allclose(lse, ws, atol=LM_TOL,
                                                                                        equal_nan=True)
    sargs = (x["hidden"], x["weight"], x["temperature"], x["seed"], x["positions"], x["token_map"])
    ids, lp, lse = (t.cpu() for t in kern.lm_head_sample(*sargs))
    wi, wl, ws = (t.cpu() for t in frs.lm_head_sample_torch(*sargs))
    assert torch.equal(ids, wi), f"sample ids vs torch\n got {ids.tolist()}\nwant {wi.tolist()}"
    assert (subset_rows(ids, a["token_map"], V) >= 0).all()


def check_lm_head_strided_hidden(kern, dev, dtype):
    """hidden as a row view of a wider buffer: 16-byte aligned rows (vector loads) and
    rows off the 16-byte grid (element loads), on every path."""
    V, d = 700, 64
    for M in (2, 5, 40):
        a = make_lm_head(23 + M, M, V, d, dtype)
        s64 = lm_head_scores64(a, dev)
        for pad in (8, 3):
            buf = torch.zeros(M, d + pad, dtype=dtype, device=dev)
            view = buf[:, pad:] if pad == 3 else buf[:, :d]
            view.copy_(a["hidden"])
            got = kern.lm_head_topk(view, a["weight"].to(dev), 8, a["token_map"].to(dev), a["temperature"].to(dev))
            assert_lm_head_topk(got, s64, a["token_map"], 8, f"M={M}, rows padded by {pad}")


def check_lm_head_empty(kern, dev):
    ids, lp, lse = kern.lm_head_topk(torch.zeros(0, 8, device=dev), torch.randn(5, 8, device=dev), 3, None, None)
    assert ids.shape == (0, 3) and lp.shape == (0, 3) and lse.shape == (0,)
    z = torch.zeros(0, dtype=torch.long, device=dev)
    ids, lp, lse = kern.lm_head_sample(torch.zeros(0, 8, device=dev), torch.randn(5, 8, device=dev),
                                       torch.zeros(0, device=dev), z, z, None)
    assert ids.shape == (0,) and lse.shape == (0,)


# (M, V_sub, d): V_sub never a multiple of the 128-row tile but for the 1-row case; M on
# each path (M <= 2: GEMV, 3..16: 16-row tensor-core tiles (fp32: 8-row GEMV), more: 64-row tiles)
LM_HEAD_SHAPES = [(M, V, d) for M in (1, 3, 300) for V in (1, 37, 1000, 49152) for d in (8, 80, 576)]
LM_HEAD_KS = (1, 5, 64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,V,d", LM_HEAD_SHAPES, ids=str)
def test_lm_head_topk_matches_oracle_and_torch(M, V, d, dtype):
    for k in LM_HEAD_KS:
        if k <= V:
            check_lm_head_topk(_cuda, DEV, M, V, d, k, dtype, with_triton=(V == 1000 and d == 80),
                               map_dtype=torch.int32 if k == 5 else torch.int64, with_temperature=k != 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,V,d,k", [(16, 5000, 128, 8), (17, 5000, 128, 12), (64, 32768, 256, 8),
                                     (64, 32768, 256, 16), (64, 4097, 4096, 8), (8, 3000, 96, 33)], ids=str)
def test_lm_head_topk_more_shapes(M, V, d, k, dtype):
    check_lm_head_topk(_cuda, DEV, M, V, d, k, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,V,d", [(1, 1, 8), (3, 37, 80), (1, 1000, 576), (5, 1000, 80), (300, 1000, 80),
                                   (2, 49152, 80), (64, 49152, 576)], ids=str)
def test_lm_head_sample_matches_oracle_and_torch(M, V, d, dtype):
    check_lm_head_sample(_cuda, DEV, M, V, d, dtype, with_triton=(V == 1000 and d == 80))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lm_head_splits_agree(dtype):
    check_lm_head_splits_agree(_cuda, DEV, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lm_head_special_values(dtype):
    check_lm_head_special_values(_cuda, DEV, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lm_head_strided_hidden(dtype):
    check_lm_head_strided_hidden(_cuda, DEV, dtype)


def test_lm_head_empty():
    check_lm_head_empty(_cuda, DEV)


def test_lm_head_fixed_seed_draws_are_stable():
    """The same (seed, position) draws the same token on every call, batch composition
    aside: row m alone gives what it gives inside the batch."""
    a = to(make_lm_head(77, 12, 3000, 128, torch.bfloat16), DEV)
    full = _cuda.lm_head_sample(a["hidden"], a["weight"], a["temperature"], a["seed"], a["positions"], a["token_map"])
    for m in (0, 5, 11):
        one = _cuda.lm_head_sample(a["hidden"][m:m + 1], a["weight"], a["temperature"][m:m + 1], a["seed"][m:m + 1],
                                   a["positions"][m:m + 1], a["token_map"])
        assert int(one[0]) == int(full[0][m])


def test_lm_head_public_ops_use_cuda_backend():
    if not hasattr(fastverify, "lm_head_topk"):
        pytest.skip("fastverify.lm_head_topk is not there yet")
    a = to(make_lm_head(9, 10, 4000, 256, torch.bfloat16), DEV)
    with fastverify.use_backend("cuda"):
        got = fastverify.lm_head_topk(a["hidden"], a["weight"], 8, token_map=a["token_map"],
                                      temperature=a["temperature"])
        drawn = fastverify.lm_head_sample(a["hidden"], a["weight"], temperature=a["temperature"], seed=a["seed"],
                                          positions=a["positions"], token_map=a["token_map"])
    direct = _cuda.lm_head_topk(a["hidden"], a["weight"], 8, a["token_map"], a["temperature"])
    assert all(torch.equal(x, y) for x, y in zip(got, direct))
    direct = _cuda.lm_head_sample(a["hidden"], a["weight"], a["temperature"], a["seed"], a["positions"],
                                  a["token_map"])
    assert all(torch.equal(x, y) for x, y in zip(drawn, direct))


def test_lm_head_cuda_graph_and_compile():
    a = to(make_lm_head(31, 20, 6000, 512, torch.bfloat16), DEV)
    for fn in (lambda: _cuda.lm_head_topk(a["hidden"], a["weight"], 8, a["token_map"], a["temperature"]),
               lambda: _cuda.lm_head_topk(a["hidden"], a["weight"], 40, a["token_map"], None),
               lambda: _cuda.lm_head_sample(a["hidden"], a["weight"], a["temperature"], a["seed"], a["positions"],
                                            a["token_map"])):
        graph, outs = _capture(fn)
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(x, y) for x, y in zip(outs, fn())), "replay vs eager"
        before = [x.clone() for x in outs]
        a["hidden"].copy_(torch.randn_like(a["hidden"]))
        a["seed"].add_(1)
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(x, y) for x, y in zip(outs, fn())), "the replay follows new inputs"
        assert not torch.equal(outs[0], before[0])
    if not hasattr(fastverify, "lm_head_topk"):
        return

    def f(h, w, tmap, t):
        ids, lp, lse = torch.ops.fastverify.lm_head_topk(h * 1.0, w, 8, token_map=tmap, temperature=t)
        return ids, lp + 0, lse

    with fastverify.use_backend("cuda"):
        got = torch.compile(f, fullgraph=True)(a["hidden"], a["weight"], a["token_map"], a["temperature"])
        want = f(a["hidden"], a["weight"], a["token_map"], a["temperature"])
    assert all(torch.equal(x, y) for x, y in zip(got, want))


def test_lm_head_library_schemas():
    ns = _cuda.library()
    assert "num_splits" in str(ns.lm_head_topk.default._schema)
    assert "cuda_stream" in str(ns.lm_head_sample.default._schema)


# ============================================================================ sparse-KV self-speculation


def sparse_problem(lens, *, Hq=4, Hkv=2, D=64, page=16, dtype=torch.float32, seed=0, spare_columns=1):
    """One decode query per request ([B, Hq, D]) over a paged cache of ``lens`` keys, pages shuffled."""
    return paged_problem([1] * len(lens), [L - 1 for L in lens], Hq=Hq, Hkv=Hkv, D=D, page=page, dtype=dtype,
                         seed=seed, kind="single", spare_columns=spare_columns)


def sparse_ids(lens, Hkv: int, C: int, cs: int, seed: int, *, invalid: bool = True) -> torch.Tensor:
    """chunk_ids [B, Hkv, C] int32: distinct full chunks in random slots and random order
    (KV head 0 as many as fit), -1 elsewhere; with ``invalid`` one more slot per row holds
    an id outside [-1, F_b) when there is room (what the unchecked CUDA path must skip)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lens), Hkv, C), -1, dtype=torch.int32)
    for b, L in enumerate(lens):
        F = L // cs
        for h in range(Hkv):
            k = min(F, C) if h == 0 else (int(torch.randint(0, min(F, C) + 1, (1,), generator=g)) if F else 0)
            slots = torch.randperm(C, generator=g)
            ids[b, h, slots[:k]] = torch.randperm(F, generator=g)[:k].to(torch.int32)
            if invalid and k < C:
                bad = (F, F + 3, -2, -7, 10**6, -2**31)[int(torch.randint(0, 6, (1,), generator=g))]
                ids[b, h, slots[k]] = bad
    return ids


def sparse_oracle(p, ids, cs: int, sm_scale=None) -> torch.Tensor:
    return torch.tensor(naive.sparse_kv_attention(p.q.double(), p.k_cache.double(), p.v_cache.double(),
                                                  p.block_table, p.seq_lens, ids, cs, sm_scale), dtype=torch.float64)


def sparse_torch(p, ids, cs: int, sm_scale=None) -> torch.Tensor:
    """The torch backend's entry point (unchecked, like the CUDA one: invalid ids are skipped)."""
    scale = p.q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    return sparse_kv_attention_torch(p.q, p.k_cache, p.v_cache, p.block_table, p.seq_lens, ids, cs, scale)


def run_sparse(kern, dev, p, ids, cs: int, sm_scale=None, num_splits=None) -> torch.Tensor:
    x = p.to(dev)
    out = kern.sparse_kv_attention(x.q, x.k_cache, x.v_cache, x.block_table, x.seq_lens, ids.to(dev), cs, sm_scale,
                                   num_splits=num_splits)
    assert out.dtype == p.q.dtype and out.shape == p.q.shape
    return out.cpu()


SPARSE_CASES = {
    # name: (lens, problem kwargs, chunk_size, C)
    "cs8_page16_gqa4_d80": ([99, 40, 5, 300], dict(Hq=8, Hkv=2, D=80), 8, 6),
    "cs16_gqa1_d64": ([130, 17, 64], dict(Hq=2, Hkv=2, D=64), 16, 3),
    "cs32_spans_pages_gqa8_d128": ([200, 70, 31], dict(Hq=8, Hkv=1, D=128), 32, 4),
    "gqa3_masked_heads": ([150, 45], dict(Hq=6, Hkv=2, D=64), 16, 5),
    "gqa6_d128": ([120, 77], dict(Hq=12, Hkv=2, D=128), 16, 4),
    "gqa16_two_head_tiles": ([90, 33], dict(Hq=16, Hkv=1, D=64), 8, 5),
    "head_dim_256": ([70, 140], dict(Hq=4, Hkv=2, D=256), 16, 4),
    "head_dim_33_scalar_loads": ([61, 20], dict(Hq=4, Hkv=2, D=33), 8, 4),
    "shorter_than_one_chunk": ([5, 3, 12], dict(), 16, 2),
    "no_tail": ([64, 32], dict(), 16, 2),
    "budget_larger_than_sequence": ([40, 23], dict(), 8, 10),
    "page8_cs32": ([130, 50], dict(page=8, D=32), 32, 3),
    "page16_cs4": ([45, 29], dict(D=32), 4, 5),
    "several_unit_rounds": ([2100], dict(Hq=4, Hkv=1, D=64), 8, 260),  # 261 units > 256 threads of a block
}


def check_sparse_attention(kern, dev, case, dtype, *, num_splits=None, with_triton=False):
    """The cuda backend against the float64 oracle and the torch backend (and Triton)."""
    lens, kw, cs, C = SPARSE_CASES[case]
    p = sparse_problem(lens, dtype=dtype, seed=len(case), **kw)
    ids = sparse_ids(lens, p.k_cache.shape[2], C, cs, seed=len(case))
    got = run_sparse(kern, dev, p, ids, cs, num_splits=num_splits)
    assert_close(got, sparse_oracle(p, ids, cs), dtype, "cuda vs oracle")
    assert_close(got, sparse_torch(p, ids, cs), dtype, "cuda vs torch")
    if with_triton:
        x = p.to(dev)
        tri = triton_backend("sparse_kv").sparse_kv_attention(x.q, x.k_cache, x.v_cache, x.block_table, x.seq_lens,
                                                              ids.to(dev), cs, p.q.shape[-1] ** -0.5).cpu()
        assert_close(got, tri, dtype, "cuda vs triton")


def check_sparse_attention_splits(kern, dev, dtype):
    """sm_scale, and every number of splits (one launch at 1, the merge otherwise; more
    splits than units clamp) giving the same result; a row that sees no key gives 0."""
    lens = [300, 41, 129, 32]
    p = sparse_problem(lens, Hq=8, Hkv=2, D=128, dtype=dtype, seed=21)
    ids = sparse_ids(lens, 2, 12, 16, seed=21)
    ids[3, 1] = -1  # request 3 (no tail) KV head 1: no key at all
    want = sparse_oracle(p, ids, 16, 0.3)
    assert not want[3, 4:].any()
    for splits in (None, 1, 2, 3, 5, 13, 64):
        got = run_sparse(kern, dev, p, ids, 16, 0.3, num_splits=splits)
        assert_close(got, want, dtype, f"num_splits={splits}")
        assert not got[3, 4:].any(), "no key: zeros"


def check_sparse_attention_strided_layouts(kern, dev, dtype):
    """Per-layer views of one cache (strided pages, slots and heads; K and V with
    different strides), head rows padded by 8 (16-byte loads stay possible for 16-bit
    types) or 3 (element loads), q strided: no copies, same results; select too."""
    lens = [90, 33, 150]
    p = sparse_problem(lens, Hq=4, Hkv=2, D=64, dtype=dtype, seed=22)
    ids = sparse_ids(lens, 2, 5, 8, seed=22)
    want = sparse_oracle(p, ids, 8)
    x = p.to(dev)
    want_sel = kern.select_kv_chunks(x.q, x.k_cache, x.block_table, x.seq_lens, 8, 4, 1, 1, None).cpu()
    P, page, Hkv, D = p.k_cache.shape
    B, Hq, _ = p.q.shape
    for pad in (8, 3):
        big = torch.zeros(P, page, 2, 3, Hkv, D + pad, dtype=dtype, device=dev)  # [page, slot, K/V, layer, head, D]
        k, v = big[:, :, 0, 1, :, :D], big[:, :, 1, 2, :, :D]
        k.copy_(p.k_cache)
        v.copy_(p.v_cache)
        q = torch.zeros(B, Hq, D + pad, dtype=dtype, device=dev)[..., :D]
        q.copy_(p.q)
        got = kern.sparse_kv_attention(q, k, v, x.block_table, x.seq_lens, ids.to(dev), 8, None).cpu()
        assert_close(got, want, dtype, f"rows padded by {pad}")
        v2 = v.contiguous()  # K and V with different strides
        got = kern.sparse_kv_attention(q, k, v2, x.block_table, x.seq_lens, ids.to(dev), 8, None).cpu()
        assert_close(got, want, dtype, f"rows padded by {pad}, contiguous V")
        sel = kern.select_kv_chunks(q, k, x.block_table, x.seq_lens, 8, 4, 1, 1, None).cpu()
        assert torch.equal(sel, want_sel), f"select over rows padded by {pad}"


def check_sparse_garbage_is_memory_safe(kern, dev):
    """Unchecked garbage (CUDA without FASTVERIFY_CHECKS): page ids outside the cache,
    seq_lens past the block table or negative, ids of every kind, repeated ids: never an
    address outside the tensors, finite outputs, selected ids inside the table."""
    p = sparse_problem([40, 70, 20], Hq=4, Hkv=2, D=64, page=16, seed=23)
    table = p.block_table.clone()
    table[1, 1] = 10**6
    table[0, 0] = -5
    lens = p.seq_lens.clone()
    lens[0] = 10**6
    lens[2] = -3
    ids = torch.tensor([[[0, 5, 10**6, 20_000], [-9, 2, 2, 1]],
                        [[0, 1, 2, 3], [4, -2**31, 2**31 - 1, 0]],
                        [[0, 1, -1, -1], [2, 3, 4, 5]]], dtype=torch.int32)
    x = p.to(dev)
    t, n = table.to(dev), lens.to(dev)
    for splits in (None, 1, 3):
        out = kern.sparse_kv_attention(x.q, x.k_cache, x.v_cache, t, n, ids.to(dev), 8, None,
                                       num_splits=splits).cpu()
        assert torch.isfinite(out.float()).all()
        assert not out[2].any(), "a negative length attends to nothing"
    cap = table.shape[1] * p.k_cache.shape[1]
    for cs, C in ((8, 4), (16, 2), (4, 100)):
        sel = kern.select_kv_chunks(x.q, x.k_cache, t, n, cs, C, 1, 1, None).cpu()
        assert ((sel >= -1) & (sel < cap // cs)).all()
        assert (sel[2] == -1).all()


def chunk_means_of(p, cs: int, max_chunks: int, fill=float("nan")) -> torch.Tensor:
    """[B, max_chunks, Hkv, D] fp32 mean key of each full chunk; ``fill`` past F_b (never read)."""
    B, Hkv, D = p.q.shape[0], p.k_cache.shape[2], p.k_cache.shape[3]
    page = p.k_cache.shape[1]
    means = torch.full((B, max_chunks, Hkv, D), fill)
    for b, L in enumerate(p.seq_lens.tolist()):
        for c in range(L // cs):
            keys = torch.stack([p.k_cache[int(p.block_table[b, x // page]), x % page]
                                for x in range(c * cs, c * cs + cs)]).double()
            means[b, c] = keys.mean(0).float()
    return means


def chunk_scores64(p, cs: int, means=None) -> list:
    """[B][Hkv][F_b] float64 scores Σ_g q · mean(K_chunk) (NaN as -inf)."""
    B, Hq, D = p.q.shape
    Hkv, page = p.k_cache.shape[2], p.k_cache.shape[1]
    G = Hq // Hkv
    out = []
    for b, L in enumerate(p.seq_lens.tolist()):
        F = L // cs
        if means is not None:
            m = means[b, :F].double()                                                  # [F, Hkv, D]
        else:
            pos = torch.arange(F * cs)
            k = p.k_cache[p.block_table[b, pos // page].long(), pos % page].double()  # [F·cs, Hkv, D]
            m = k.view(F, cs, Hkv, D).mean(1)
        qs = p.q[b].double().view(Hkv, G, D).sum(1)                                    # [Hkv, D]
        s = torch.einsum("hd,fhd->hf", qs, m)
        out.append(torch.where(torch.isnan(s), float("-inf"), s).tolist())
    return out


def assert_selection(got: torch.Tensor, want: list, scores: list, lens, cs: int, C: int, ns: int, nr: int,
                     what: str) -> None:
    """got equals the oracle's selection, or differs only where scores tie within fp32
    rounding: forced chunks kept, ascending, and no chosen chunk scores below an unchosen one."""
    got = got.tolist()
    for b, L in enumerate(lens):
        F = max(L, 0) // cs
        for h, (row, ref) in enumerate(zip(got[b], want[b])):
            if row == ref:
                continue
            assert F > C, f"{what}: [{b}, {h}] {row} != {ref} although every chunk fits"
            assert row == sorted(set(row)) and min(row) >= 0 and max(row) < F, f"{what}: [{b}, {h}] bad row {row}"
            forced = set(range(min(ns, F))) | set(range(max(F - nr, 0), F))
            assert forced <= set(row), f"{what}: [{b}, {h}] {row} misses a forced chunk"
            s = scores[b][h]
            chosen = [c for c in row if c not in forced]
            others = [c for c in range(F) if c not in forced and c not in row]
            tol = 1e-4 * (1 + max((abs(x) for x in s if x != float("-inf")), default=0.0))
            assert min(s[c] for c in chosen) >= max(s[c] for c in others) - tol, \
                f"{what}: [{b}, {h}] {row} != {ref} beyond rounding"


SELECT_CASES = {
    # name: (lens, problem kwargs, chunk_size, num_chunks, num_sink_chunks, num_recent_chunks)
    "cs8_gqa4_d80": ([99, 40, 5, 300], dict(Hq=8, Hkv=2, D=80), 8, 5, 1, 2),
    "cs16_gqa1_two_sinks": ([130, 64, 17], dict(Hq=2, Hkv=2), 16, 5, 2, 1),
    "cs32_spans_pages_gqa8_d128": ([400, 33], dict(Hq=8, Hkv=1, D=128), 32, 4, 1, 1),
    "cs4_d256": ([300, 61], dict(Hq=4, Hkv=2, D=256), 4, 9, 1, 1),
    "gqa3_d33_element_loads": ([150, 90], dict(Hq=6, Hkv=2, D=33), 8, 6, 1, 1),
    "no_forced_chunks": ([200], dict(), 8, 4, 0, 0),
    "forced_fill_the_budget": ([120], dict(), 8, 3, 2, 1),
    "budget_larger_than_sequence": ([40, 70], dict(), 8, 16, 1, 1),
    "shorter_than_one_chunk": ([5, 3, 100], dict(Hkv=1, Hq=2), 16, 3, 1, 1),
}


def check_select(kern, dev, case, dtype, *, with_means=False):
    """select_kv_chunks against the oracle and the torch backend (from the cache, or
    from chunk_means with NaN past F_b, which must never be read)."""
    lens, kw, cs, C, ns, nr = SELECT_CASES[case]
    p = sparse_problem(lens, dtype=dtype, seed=len(case) + 100, **kw)
    means = chunk_means_of(p, cs, max(lens) // cs + 2) if with_means else None
    x = p.to(dev)
    got = kern.select_kv_chunks(x.q, x.k_cache, x.block_table, x.seq_lens, cs, C, ns, nr,
                                None if means is None else means.to(dev)).cpu()
    assert got.dtype == torch.int32 and got.shape == (len(lens), p.k_cache.shape[2], C)
    scores = chunk_scores64(p, cs, means)
    want = naive.select_kv_chunks(p.q.double(), p.k_cache.double(), p.block_table, p.seq_lens, cs, C, ns, nr, means)
    assert_selection(got, want, scores, lens, cs, C, ns, nr, "cuda vs oracle")
    ref = select_kv_chunks_torch(p.q, p.k_cache, p.block_table, p.seq_lens, cs, C, ns, nr, means).tolist()
    assert_selection(got, ref, scores, lens, cs, C, ns, nr, "cuda vs torch")


def tie_problem(seed: int):
    """Keys from three small-integer chunk patterns and an integer query: chunk means and
    scores are exact in fp32 (any summation order), and most scores tie exactly."""
    p = sparse_problem([130, 97], Hq=4, Hkv=2, D=16, page=16, seed=seed)
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randint(-2, 3, (3, 8, 2, 16), generator=g).float()
    for b, L in enumerate(p.seq_lens.tolist()):
        for c in range(-(-L // 8)):
            pat = patterns[int(torch.randint(0, 3, (1,), generator=g))]
            for t in range(8):
                x = c * 8 + t
                p.k_cache[int(p.block_table[b, x // 16]), x % 16] = pat[t]
    p.q = torch.randint(-2, 3, p.q.shape, generator=g).float()
    return p


def check_select_ties_and_nan(kern, dev):
    """Exact ties go to the lower chunk; NaN scores count as -inf."""
    p = tie_problem(5)
    for ns, nr in ((1, 1), (0, 2)):
        got = kern.select_kv_chunks(*(t.to(dev) for t in (p.q, p.k_cache, p.block_table, p.seq_lens)), 8, 6, ns, nr,
                                    None).cpu()
        assert got.tolist() == naive.select_kv_chunks(p.q, p.k_cache, p.block_table, p.seq_lens, 8, 6, ns, nr)
    p.q.zero_()  # every score 0: the lowest middle chunks win
    got = kern.select_kv_chunks(*(t.to(dev) for t in (p.q, p.k_cache, p.block_table, p.seq_lens)), 8, 6, 1, 1,
                                None).cpu()
    assert got[0, 0].tolist() == [0, 1, 2, 3, 4, 15] and got[1, 1].tolist() == [0, 1, 2, 3, 4, 11]
    p = sparse_problem([120, 64], Hq=4, Hkv=2, D=32, seed=6)
    page = p.k_cache.shape[1]
    for b, x in ((0, 3 * 8 + 2), (0, 5 * 8), (1, 2 * 8 + 7)):  # a NaN key in chunks 3, 5 (request 0), 2 (request 1)
        p.k_cache[int(p.block_table[b, x // page]), x % page, 0] = float("nan")
    args = lambda: tuple(t.to(dev) for t in (p.q, p.k_cache, p.block_table, p.seq_lens))  # noqa: E731
    got = kern.select_kv_chunks(*args(), 8, 5, 1, 1, None).cpu()
    assert got.tolist() == naive.select_kv_chunks(p.q, p.k_cache, p.block_table, p.seq_lens, 8, 5, 1, 1)
    assert 3 not in got[0, 0].tolist() and 5 not in got[0, 0].tolist()
    p.q.fill_(float("nan"))  # every score NaN: the lowest chunks, never an out-of-range id
    got = kern.select_kv_chunks(*args(), 8, 5, 1, 1, None).cpu()
    assert got[0, 0].tolist() == [0, 1, 2, 3, 14]


def check_select_many_chunks(kern, dev):
    """More candidates than the selection keeps in shared memory (8192) and than one scan
    tile (2048), from chunk_means whose scores take 4 values: the threshold falls inside a
    large group of exact ties, which go to the lowest ids."""
    cs, C = 2, 3000
    lens = [2 * 9500, 2 * 5000 + 1]
    p = sparse_problem(lens, Hq=2, Hkv=1, D=16, seed=24)
    g = torch.Generator().manual_seed(24)
    means = torch.full((2, 9600, 1, 16), float("nan"))
    means[:, :, 0, 0] = torch.randint(0, 4, (2, 9600), generator=g).float()
    means[:, :, 0, 1:] = 0.0
    means[0, 9500:] = float("nan")
    means[1, 5000:] = float("nan")
    p.q = torch.ones_like(p.q)
    got = kern.select_kv_chunks(*(t.to(dev) for t in (p.q, p.k_cache, p.block_table, p.seq_lens)), cs, C, 1, 1,
                                means.to(dev)).cpu()
    assert got.tolist() == naive.select_kv_chunks(p.q, p.k_cache, p.block_table, p.seq_lens, cs, C, 1, 1, means)


def check_sparse_random_shapes(kern, dev, seeds):
    """Random shapes against the torch backend: page and chunk sizes (chunk spanning
    pages or not), GQA 1 .. 16, head dims 8 .. 256, ragged lengths from 1 key, budgets
    from 0 / 1 slot to more than the sequence, forced splits, chunk_means or not."""
    for seed in seeds:
        rng = random.Random(seed)
        dtype = rng.choice(DTYPES)
        page = rng.choice([4, 8, 16, 32])
        cs = rng.choice([d for d in (1, 2, 4, 8, 16, 32, 64) if page % d == 0 or d % page == 0])
        Hkv, G = rng.choice([1, 2, 3]), rng.choice([1, 2, 3, 4, 5, 7, 8, 9, 16])
        D = rng.choice([8, 24, 33, 64, 80, 96, 128, 200, 256])
        lens = [rng.choice([1, rng.randint(1, 40), rng.randint(1, 600)]) for _ in range(rng.randint(1, 4))]
        what = f"seed {seed}: {dtype} page {page} cs {cs} Hkv {Hkv} G {G} D {D} lens {lens}"
        p = sparse_problem(lens, Hq=G * Hkv, Hkv=Hkv, D=D, page=page, dtype=dtype, seed=seed)
        C = rng.choice([1, 2, 5, 17, 40, 300])
        ids = sparse_ids(lens, Hkv, C, cs, seed=seed)
        scale = 0.05 + 0.2 * rng.random()
        got = run_sparse(kern, dev, p, ids, cs, scale, num_splits=rng.choice([None, 1, 2, 5, 64]))
        assert_close(got, sparse_torch(p, ids, cs, scale), dtype, f"attention, {what}, C {C}")
        nc = rng.choice([0, 1, 3, 8, 50])
        ns = rng.randint(0, min(2, nc))
        nr = rng.randint(0, nc - ns)
        means = chunk_means_of(p, cs, max(lens) // cs + 1) if rng.random() < 0.3 else None
        x = p.to(dev)
        sel = kern.select_kv_chunks(x.q, x.k_cache, x.block_table, x.seq_lens, cs, nc, ns, nr,
                                    None if means is None else means.to(dev)).cpu()
        ref = select_kv_chunks_torch(p.q, p.k_cache, p.block_table, p.seq_lens, cs, nc, ns, nr, means)
        assert_selection(sel, ref.tolist(), chunk_scores64(p, cs, means), lens, cs, nc, ns, nr,
                         f"select, {what}, {nc} chunks ({ns} sinks, {nr} recent)")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(SPARSE_CASES))
def test_sparse_attention_matches_oracle_and_torch(case, dtype):
    check_sparse_attention(_cuda, DEV, case, dtype, with_triton=dtype == torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse_attention_scale_and_splits(dtype):
    check_sparse_attention_splits(_cuda, DEV, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse_attention_strided_layouts(dtype):
    check_sparse_attention_strided_layouts(_cuda, DEV, dtype)


def test_sparse_garbage_is_memory_safe():
    check_sparse_garbage_is_memory_safe(_cuda, DEV)


def test_sparse_random_shapes():
    check_sparse_random_shapes(_cuda, DEV, range(300))


@pytest.mark.parametrize("with_means", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(SELECT_CASES))
def test_sparse_select_kv_chunks_matches_oracle_and_torch(case, dtype, with_means):
    check_select(_cuda, DEV, case, dtype, with_means=with_means)


def test_sparse_select_kv_chunks_ties_and_nan():
    check_select_ties_and_nan(_cuda, DEV)


def test_sparse_select_kv_chunks_many_chunks():
    check_select_many_chunks(_cuda, DEV)


def test_sparse_kv_public_ops_use_cuda_backend():
    p = sparse_problem([300, 77, 1000], Hq=8, Hkv=2, D=128, dtype=torch.bfloat16, seed=31)
    x = p.to(DEV)
    with fastverify.use_backend("cuda"):
        ids = fastverify.select_kv_chunks(x.q, x.k_cache, x.block_table, x.seq_lens, chunk_size=16, num_chunks=6)
        out = fastverify.sparse_kv_attention(x.q, x.k_cache, x.v_cache, x.block_table, x.seq_lens, ids,
                                             chunk_size=16)
    assert torch.equal(ids, _cuda.select_kv_chunks(x.q, x.k_cache, x.block_table, x.seq_lens, 16, 6, 1, 1, None))
    assert torch.equal(out, _cuda.sparse_kv_attention(x.q, x.k_cache, x.v_cache, x.block_table, x.seq_lens, ids, 16,
                                                      None))
    with fastverify.use_backend("torch"):
        ref = fastverify.sparse_kv_attention(p.q, p.k_cache, p.v_cache, p.block_table, p.seq_lens, ids.cpu(),
                                             chunk_size=16)
    assert_close(out.cpu(), ref, torch.bfloat16, "public op vs torch backend")
    assert_close(out.cpu(), sparse_oracle(p, ids.cpu(), 16), torch.bfloat16, "public op vs oracle")


def test_sparse_kv_cuda_graph_compile_and_stream():
    p = sparse_problem([2000, 300, 45], Hq=8, Hkv=2, D=128, dtype=torch.float16, seed=32).to(DEV)

    def fn():
        ids = _cuda.select_kv_chunks(p.q, p.k_cache, p.block_table, p.seq_lens, 16, 8, 1, 1, None)
        return ids, _cuda.sparse_kv_attention(p.q, p.k_cache, p.v_cache, p.block_table, p.seq_lens, ids, 16, None)

    graph, outs = _capture(fn)
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(outs, fn())), "replay vs eager"
    before = outs[0].clone()
    p.q.copy_(torch.randn_like(p.q))
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(outs, fn())), "the replay follows new q"
    assert not torch.equal(outs[0], before), "new q, new selection"

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        again = fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(again, fn())), "deterministic, on the current stream"

    def f(q, k, v, table, lens):
        ids = torch.ops.fastverify.select_kv_chunks(q * 1.0, k, table, lens, chunk_size=16, num_chunks=8)
        return ids, torch.ops.fastverify.sparse_kv_attention(q, k, v, table, lens, ids, chunk_size=16) * 2

    args = (p.q, p.k_cache, p.v_cache, p.block_table, p.seq_lens)
    with fastverify.use_backend("cuda"):
        got = torch.compile(f, fullgraph=True)(*args)
        want = f(*args)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_sparse_kv_decode_shape_matches_torch():
    """The performance target's shape (B = 8, 32K keys, budget 1024 = 64 chunks of 16,
    Hq / Hkv = 32 / 8, D = 128, bf16) against the torch backend on the GPU; prints the
    attention's bandwidth."""
    B, L, cs, C, Hq, Hkv, D, page = 8, 32768, 16, 64, 32, 8, 128, 16
    g = torch.Generator(device=DEV).manual_seed(33)
    pages = L // page
    perm = torch.randperm(B * pages, generator=g, device=DEV)
    table = perm.view(B, pages).to(torch.int32)
    k = torch.randn(B * pages, page, Hkv, D, generator=g, device=DEV, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(B, Hq, D, generator=g, device=DEV, dtype=torch.bfloat16)
    lens = torch.full((B,), L - 5, dtype=torch.int32, device=DEV)
    ids = _cuda.select_kv_chunks(q, k, table, lens, cs, C, 1, 1, None)
    ref_ids = select_kv_chunks_torch(q, k, table, lens, cs, C, 1, 1, None)
    assert (ids == ref_ids).all(-1).float().mean() >= 0.9  # rows equal, fp32 near-ties aside
    out = _cuda.sparse_kv_attention(q, k, v, table, lens, ids, cs, None)
    want = sparse_kv_attention_torch(q, k, v, table, lens, ids, cs, D ** -0.5)
    assert_close(out.float().cpu(), want.float().cpu(), torch.bfloat16, "decode shape")
    fn = lambda: _cuda.sparse_kv_attention(q, k, v, table, lens, ids, cs, None)  # noqa: E731
    graph, _ = _capture(fn)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 50
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    us = start.elapsed_time(end) * 1000 / reps
    kv_bytes = 2 * B * Hkv * (C * cs + (L - 5) % cs) * D * k.element_size()
    print(f"\nsparse_kv_attention B={B} L={L} budget={C * cs}: {us:.1f} us, "
          f"{kv_bytes / us / 1e3:.0f} GB/s of selected K/V")


def test_sparse_kv_library_schemas():
    ns = _cuda.library()
    assert "num_splits" in str(ns.sparse_kv_attention.default._schema)
    assert "chunk_means" in str(ns.select_kv_chunks.default._schema)
    assert "cuda_stream" in str(ns.select_kv_chunks.default._schema)
