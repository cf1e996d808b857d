"""select_kv_chunks, sparse_kv_attention and streaming_kv_chunks: every backend against
the naive oracles (tests/naive.py, float64 loops), over paged caches with shuffled pages,
as torch ops (opcheck, fake tensors, torch.compile) and with bad input."""

import pytest
import torch

import naive
from attention_problems import paged_problem
from conftest import BACKEND_DEVICES

import fastverify
from fastverify.ops import sparse_kv as ops_sparse
from fastverify.triton import sparse_kv as triton_sparse

pytestmark = pytest.mark.family("sparse_kv")

BACKENDS = list(BACKEND_DEVICES)
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def problem(lens, *, Hq=4, Hkv=2, D=64, page=16, dtype=torch.float32, seed=0, spare_columns=1):
    """One decode query per request over a paged cache of ``lens`` keys, pages shuffled."""
    return paged_problem([1] * len(lens), [L - 1 for L in lens], Hq=Hq, Hkv=Hkv, D=D, page=page, dtype=dtype,
                         seed=seed, kind="single", spare_columns=spare_columns)


def random_ids(lens, Hkv, C, cs, seed):
    """[B, Hkv, C] int32: up to C distinct full chunks per row, in random slots, -1 elsewhere."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lens), Hkv, C), -1, dtype=torch.int32)
    for b, L in enumerate(lens):
        F = L // cs
        for h in range(Hkv):
            k = int(torch.randint(0, min(F, C) + 1, (1,), generator=g)) if F else 0
            chosen = torch.randperm(F, generator=g)[:k]
            slots = torch.randperm(C, generator=g)[:k]
            ids[b, h, slots] = chosen.to(torch.int32)
    return ids


def assert_close(got, want, dtype):
    want = torch.as_tensor(want, dtype=torch.float64)
    err = (got.double().cpu() - want).abs().max().item()
    assert err <= TOL[dtype] * max(1.0, want.abs().max().item()), f"max abs error {err:.3g} > {TOL[dtype]}"


def run_select(p, backend, **kw):
    dev = BACKEND_DEVICES[backend]
    means = kw.pop("chunk_means", None)
    with fastverify.use_backend(backend):
        ids = fastverify.select_kv_chunks(p.q.to(dev), p.k_cache.to(dev), p.block_table.to(dev), p.seq_lens.to(dev),
                                          chunk_means=None if means is None else means.to(dev), **kw)
    assert ids.dtype == torch.int32
    return ids.cpu()


def run_attention(p, ids, backend, **kw):
    dev = BACKEND_DEVICES[backend]
    with fastverify.use_backend(backend):
        out = fastverify.sparse_kv_attention(p.q.to(dev), p.k_cache.to(dev), p.v_cache.to(dev), p.block_table.to(dev),
                                             p.seq_lens.to(dev), ids.to(dev), **kw)
    assert out.dtype == p.q.dtype and out.shape == p.q.shape
    return out.cpu()


def oracle_select(p, **kw):
    return naive.select_kv_chunks(p.q.double(), p.k_cache.double(), p.block_table, p.seq_lens, kw["chunk_size"],
                                  kw["num_chunks"], kw.get("num_sink_chunks", 1), kw.get("num_recent_chunks", 1),
                                  kw.get("chunk_means"))


def oracle_attention(p, ids, chunk_size, sm_scale=None):
    return naive.sparse_kv_attention(p.q.double(), p.k_cache.double(), p.v_cache.double(), p.block_table, p.seq_lens,
                                     ids, chunk_size, sm_scale)


# ----------------------------------------------------------------------------- select_kv_chunks

SELECT_CASES = {
    # name: (lens, problem kwargs, op kwargs)
    "cs8_page16_gqa4_d80": ([99, 40, 5], dict(Hq=8, Hkv=2, D=80), dict(chunk_size=8, num_chunks=5,
                                                                      num_recent_chunks=2)),
    "cs16_gqa4_one_kv_head": ([130, 64, 17], dict(Hq=4, Hkv=1), dict(chunk_size=16, num_chunks=4)),
    "cs32_spans_two_pages_gqa8": ([200, 33], dict(Hq=8, Hkv=1), dict(chunk_size=32, num_chunks=3)),
    "gqa1_two_sinks": ([77, 150], dict(Hq=2, Hkv=2), dict(chunk_size=8, num_chunks=6, num_sink_chunks=2,
                                                           num_recent_chunks=2)),
    "budget_larger_than_sequence": ([40, 70], dict(), dict(chunk_size=8, num_chunks=16)),
    "shorter_than_one_chunk": ([5, 3, 100], dict(Hkv=1, Hq=2), dict(chunk_size=16, num_chunks=3)),
    "no_forced_chunks": ([120], dict(), dict(chunk_size=8, num_chunks=4, num_sink_chunks=0, num_recent_chunks=0)),
    "forced_fill_the_budget": ([120], dict(), dict(chunk_size=8, num_chunks=3, num_sink_chunks=2)),
    "page8_cs4": ([45, 29], dict(page=8, D=32), dict(chunk_size=4, num_chunks=4)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(SELECT_CASES))
def test_select_matches_oracle(backend, case):
    lens, pkw, kw = SELECT_CASES[case]
    p = problem(lens, seed=len(case), **pkw)
    assert run_select(p, backend, **kw).tolist() == oracle_select(p, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_select_half_precision(backend, dtype):
    p = problem([90, 51], Hq=8, Hkv=2, dtype=dtype, seed=3)
    kw = dict(chunk_size=8, num_chunks=4)
    assert run_select(p, backend, **kw).tolist() == oracle_select(p, **kw)


def exact_means(p, cs, max_chunks, fill=float("nan")):
    """[B, max_chunks, Hkv, D] fp32 mean key of each full chunk; ``fill`` beyond F_b
    (never read)."""
    B, Hkv, D = p.q.shape[0], p.k_cache.shape[2], p.k_cache.shape[3]
    page = p.k_cache.shape[1]
    means = torch.full((B, max_chunks, Hkv, D), fill)
    for b, L in enumerate(p.seq_lens.tolist()):
        for c in range(L // cs):
            keys = torch.stack([p.k_cache[int(p.block_table[b, x // page]), x % page]
                                for x in range(c * cs, c * cs + cs)]).double()
            means[b, c] = keys.mean(0).float()
    return means


@pytest.mark.parametrize("backend", BACKENDS)
def test_select_chunk_means_path_equals_recompute(backend):
    p = problem([99, 40, 7], Hq=8, Hkv=2, seed=4)
    kw = dict(chunk_size=8, num_chunks=5, num_recent_chunks=2)
    means = exact_means(p, 8, 15)
    got = run_select(p, backend, chunk_means=means, **kw)
    assert torch.equal(got, run_select(p, backend, **kw))
    assert got.tolist() == oracle_select(p, chunk_means=means, **kw)


def tie_problem(seed):
    """Keys of a few distinct small-integer chunk patterns and an integer query: chunk means
    and scores are exact in fp32, and most scores tie exactly."""
    p = problem([130, 97], Hq=4, Hkv=2, D=16, page=16, seed=seed)
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_select_ties_go_to_the_lower_chunk(backend):
    p = tie_problem(5)
    kw = dict(chunk_size=8, num_chunks=6, num_sink_chunks=1, num_recent_chunks=1)
    got = run_select(p, backend, **kw)
    assert got.tolist() == oracle_select(p, **kw)
    p.q.zero_()                                   # every score 0: the lowest middle chunks win
    got = run_select(p, backend, **kw)
    assert got[0, 0].tolist() == [0, 1, 2, 3, 4, 15] and got[1, 1].tolist() == [0, 1, 2, 3, 4, 11]


@pytest.mark.parametrize("backend", BACKENDS)
def test_select_nan_scores_count_as_minus_inf(backend):
    p = problem([120, 64], Hq=4, Hkv=2, D=32, seed=6)
    page = p.k_cache.shape[1]
    for b, x in ((0, 3 * 8 + 2), (0, 5 * 8), (1, 2 * 8 + 7)):     # a NaN key in chunks 3, 5 (req 0), 2 (req 1)
        p.k_cache[int(p.block_table[b, x // page]), x % page, 0] = float("nan")
    kw = dict(chunk_size=8, num_chunks=5)
    got = run_select(p, backend, **kw)
    assert got.tolist() == oracle_select(p, **kw)
    assert 3 not in got[0, 0].tolist() and 5 not in got[0, 0].tolist()
    # all scores NaN (-inf): the lowest chunks are taken, never an out-of-range id
    p.q.fill_(float("nan"))
    got = run_select(p, backend, **kw)
    assert got[0, 0].tolist() == [0, 1, 2, 3, 14]


@pytest.mark.parametrize("backend", BACKENDS)
def test_streaming_policy(backend):
    lens = torch.tensor([200, 40, 9, 64], dtype=torch.int32)
    dev = BACKEND_DEVICES[backend]
    got = fastverify.streaming_kv_chunks(lens.to(dev), chunk_size=8, num_chunks=6, num_sink_chunks=2, num_hkv=3)
    assert got.dtype == torch.int32 and got.shape == (4, 3, 6)
    assert got.cpu().tolist() == naive.streaming_kv_chunks(lens, 8, 6, 2, 3)
    assert got[0, 0].tolist() == [0, 1, 21, 22, 23, 24] and got[2, 1].tolist() == [0, -1, -1, -1, -1, -1]
    # the select op with every non-sink slot given to recent chunks picks the same
    p = problem(lens.tolist(), Hq=6, Hkv=3, D=16, seed=7)
    sel = run_select(p, backend, chunk_size=8, num_chunks=6, num_sink_chunks=2, num_recent_chunks=4)
    assert torch.equal(sel, got.cpu())


# ----------------------------------------------------------------------------- sparse_kv_attention

ATTN_CASES = {
    # name: (lens, problem kwargs, chunk_size, C)
    "cs8_page16_gqa4_d80": ([99, 40, 5], dict(Hq=8, Hkv=2, D=80), 8, 6),
    "cs16_gqa1": ([130, 17], dict(Hq=2, Hkv=2), 16, 3),
    "cs32_gqa8": ([200, 70], dict(Hq=8, Hkv=1), 32, 4),
    "tail_only_shorter_than_one_chunk": ([5, 12], dict(), 16, 2),
    "no_tail": ([64, 32], dict(), 16, 2),
    "budget_larger_than_sequence": ([40, 23], dict(), 8, 10),
    "page4_cs8": ([37, 50], dict(page=4, D=32), 8, 3),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_attention_matches_oracle(backend, case):
    lens, pkw, cs, C = ATTN_CASES[case]
    p = problem(lens, seed=len(case), **pkw)
    ids = random_ids(lens, p.k_cache.shape[2], C, cs, seed=len(case))
    assert_close(run_attention(p, ids, backend, chunk_size=cs), oracle_attention(p, ids, cs), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_half_precision(backend, dtype):
    lens = [99, 30]
    p = problem(lens, Hq=8, Hkv=2, D=64, dtype=dtype, seed=8)
    ids = random_ids(lens, 2, 5, 8, seed=8)
    assert_close(run_attention(p, ids, backend, chunk_size=8, sm_scale=0.2), oracle_attention(p, ids, 8, 0.2), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_key_at_all_gives_zeros(backend):
    p = problem([32, 40], seed=9)                   # request 0: two full chunks, no tail
    ids = torch.full((2, 2, 2), -1, dtype=torch.int32)
    out = run_attention(p, ids, backend, chunk_size=16)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert_close(out, oracle_attention(p, ids, 16), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_chunks_selected_is_full_attention(backend):
    lens = [100, 48, 7]
    p = problem(lens, Hq=8, Hkv=2, D=80, seed=10)
    cs = 8
    C = max(lens) // cs
    ids = torch.full((3, 2, C), -1, dtype=torch.int32)
    for b, L in enumerate(lens):
        ids[b, :, :L // cs] = torch.arange(L // cs, dtype=torch.int32).flip(0)     # unsorted
    dev = BACKEND_DEVICES[backend]
    x = p.to(dev)
    with fastverify.use_backend(backend):
        full = fastverify.tree_attention(*x.args()).cpu()
    assert_close(run_attention(p, ids, backend, chunk_size=cs), full.double(), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_select_then_attend(backend):
    lens = [150, 61]
    p = problem(lens, Hq=4, Hkv=2, D=32, seed=11)
    kw = dict(chunk_size=16, num_chunks=4)
    ids = run_select(p, backend, **kw)
    assert_close(run_attention(p, ids, backend, chunk_size=16), oracle_attention(p, oracle_select(p, **kw), 16),
                 torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_cache_views(backend):
    """A model passes per-layer views of one cache: strided pages, slots and heads."""
    lens = [90, 33]
    p = problem(lens, Hq=4, Hkv=2, D=32, seed=12)
    big_k = torch.randn(p.k_cache.shape[0], 16, 3, 2, 32)
    big_v = torch.randn_like(big_k)
    big_k[:, :, 1], big_v[:, :, 1] = p.k_cache, p.v_cache
    ids = random_ids(lens, 2, 4, 8, seed=12)
    want_ids = run_select(p, backend, chunk_size=8, num_chunks=4)
    want_out = run_attention(p, ids, backend, chunk_size=8)
    p.k_cache, p.v_cache = big_k[:, :, 1], big_v[:, :, 1]
    assert not p.k_cache.is_contiguous()
    assert torch.equal(run_select(p, backend, chunk_size=8, num_chunks=4), want_ids)
    assert torch.allclose(run_attention(p, ids, backend, chunk_size=8), want_out, atol=1e-6)
    p.v_cache = p.v_cache.contiguous()            # K and V with different strides
    assert torch.allclose(run_attention(p, ids, backend, chunk_size=8), want_out, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_metadata(backend):
    """block_table, seq_lens and chunk_ids with a strided last dimension."""
    lens = [70, 33]
    p = problem(lens, seed=21)
    ids = random_ids(lens, 2, 4, 8, seed=21)
    want = run_attention(p, ids, backend, chunk_size=8)
    want_ids = run_select(p, backend, chunk_size=8, num_chunks=4)
    p.block_table = torch.stack([p.block_table, p.block_table], 2)[..., 0]
    p.seq_lens = torch.stack([p.seq_lens, p.seq_lens], 1)[:, 1]
    assert p.block_table.stride(1) == 2 and p.seq_lens.stride(0) == 2
    assert torch.equal(run_attention(p, ids.transpose(1, 2).contiguous().transpose(1, 2), backend, chunk_size=8), want)
    assert torch.equal(run_select(p, backend, chunk_size=8, num_chunks=4), want_ids)


@pytest.mark.parametrize("backend", BACKENDS)
def test_order_of_ids_does_not_matter(backend):
    lens = [120]
    p = problem(lens, seed=13)
    ids = torch.tensor([[[3, -1, 0, 9, 5], [-1, -1, 14, 1, 2]]], dtype=torch.int32)
    a = run_attention(p, ids, backend, chunk_size=8)
    b = run_attention(p, ids.sort(2).values, backend, chunk_size=8)
    assert torch.allclose(a, b, atol=1e-6)


def test_backends_skip_out_of_range_ids():
    """Unchecked entry points (what runs on CUDA without FASTVERIFY_CHECKS): ids outside
    [0, F_b) are skipped, never used as addresses."""
    lens = [70, 20]
    p = problem(lens, seed=14)
    ids = torch.tensor([[[8, 2, 1_000_000, -7], [-2**31, 3, 9, 0]], [[2, 1, 0, -1], [5, 1, 1, -1]]],
                       dtype=torch.int32)
    want = oracle_attention(p, ids, 8)            # skips them too (and, like the kernels, counts a repeated id twice)
    args = (p.q, p.k_cache, p.v_cache, p.block_table, p.seq_lens, ids, 8, 64 ** -0.5)
    assert_close(ops_sparse.sparse_kv_attention_torch(*args), want, torch.float32)
    x = [a.to(BACKEND_DEVICES["triton"]) if isinstance(a, torch.Tensor) else a for a in args]
    assert_close(triton_sparse.sparse_kv_attention(*x).cpu(), want, torch.float32)


@pytest.mark.parametrize("num_splits", [1, 2, 5])
def test_triton_splits_merge_exactly(num_splits):
    lens = [150, 61]
    p = problem(lens, Hq=4, Hkv=2, D=32, seed=15)
    ids = random_ids(lens, 2, 6, 8, seed=15)
    x = p.to(BACKEND_DEVICES["triton"])
    got = triton_sparse.sparse_kv_attention(x.q, x.k_cache, x.v_cache, x.block_table, x.seq_lens,
                                            ids.to(x.q.device), 8, 0.25, num_splits=num_splits).cpu()
    assert_close(got, oracle_attention(p, ids, 8, 0.25), torch.float32)


def test_triton_plan_fills_the_device_for_one_request(monkeypatch):
    monkeypatch.setattr(triton_sparse, "_num_sms", lambda device: 132)
    _, splits, _ = triton_sparse.attention_plan(1, 8, 256, 16, 128, torch.device("cuda"))
    assert splits * 8 >= 2 * 132 - 8
    _, splits, _ = triton_sparse.attention_plan(64, 8, 256, 16, 128, torch.device("cuda"))
    assert splits == 1


# ----------------------------------------------------------------------------- value-check memo


def test_selected_ids_skip_the_id_checks_until_modified():
    p = problem([100], seed=16)
    ids = fastverify.select_kv_chunks(p.q, p.k_cache, p.block_table, p.seq_lens, chunk_size=8, num_chunks=4)
    assert ops_sparse._ids_known_valid(ids, p.seq_lens, 8)
    fastverify.sparse_kv_attention(p.q, p.k_cache, p.v_cache, p.block_table, p.seq_lens, ids, chunk_size=8)
    ids[0, 0, 0] = 50                                    # in place: the version changes, checks run again
    with pytest.raises(ValueError, match=r"chunk_ids\[0, 0, 0\] = 50 is outside \[-1, 12\)"):
        fastverify.sparse_kv_attention(p.q, p.k_cache, p.v_cache, p.block_table, p.seq_lens, ids, chunk_size=8)


# ----------------------------------------------------------------------------- as torch ops


def test_schemas_name_the_contract_arguments():
    s = torch.ops.fastverify.select_kv_chunks.default._schema
    assert [a.name for a in s.arguments] == ["q", "k_cache", "block_table", "seq_lens", "chunk_size", "num_chunks",
                                             "num_sink_chunks", "num_recent_chunks", "chunk_means"]
    s = torch.ops.fastverify.sparse_kv_attention.default._schema
    assert [a.name for a in s.arguments] == ["q", "k_cache", "v_cache", "block_table", "seq_lens", "chunk_ids",
                                             "chunk_size", "sm_scale"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    dev = BACKEND_DEVICES[backend]
    p = problem([40, 21], Hq=4, Hkv=2, D=16, page=8, seed=17).to(dev)
    ids = random_ids([40, 21], 2, 3, 8, seed=17).to(dev)
    means = exact_means(p.to("cpu"), 8, 6, fill=0.0).to(dev)
    with fastverify.use_backend(backend):
        torch.library.opcheck(torch.ops.fastverify.select_kv_chunks.default,
                              (p.q, p.k_cache, p.block_table, p.seq_lens),
                              dict(chunk_size=8, num_chunks=3, num_sink_chunks=1, num_recent_chunks=1))
        torch.library.opcheck(torch.ops.fastverify.select_kv_chunks.default,
                              (p.q, p.k_cache, p.block_table, p.seq_lens),
                              dict(chunk_size=8, num_chunks=3, chunk_means=means))
        torch.library.opcheck(torch.ops.fastverify.sparse_kv_attention.default,
                              (p.q, p.k_cache, p.v_cache, p.block_table, p.seq_lens, ids),
                              dict(chunk_size=8, sm_scale=0.3))


def test_fake_tensors_give_output_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    p = problem([40, 21], Hq=4, Hkv=2, D=16, page=8, dtype=torch.bfloat16, seed=18)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        f = [mode.from_tensor(t) for t in (p.q, p.k_cache, p.v_cache, p.block_table, p.seq_lens)]
        ids = torch.ops.fastverify.select_kv_chunks(f[0], f[1], f[3], f[4], chunk_size=8, num_chunks=3)
        out = torch.ops.fastverify.sparse_kv_attention(*f, ids, chunk_size=8)
    assert ids.shape == (2, 2, 3) and ids.dtype == torch.int32
    assert out.shape == (2, 4, 16) and out.dtype == torch.bfloat16


def test_torch_compile_fullgraph():
    p = problem([90, 33], Hq=4, Hkv=2, D=16, page=8, seed=19)

    def draft_attention(q, k, v, table, lens):
        ids = torch.ops.fastverify.select_kv_chunks(q * 1.0, k, table, lens, chunk_size=8, num_chunks=4)
        return torch.ops.fastverify.sparse_kv_attention(q, k, v, table, lens, ids, chunk_size=8) * 2, ids

    args = (p.q, p.k_cache, p.v_cache, p.block_table, p.seq_lens)
    with fastverify.use_backend("torch"):
        want = draft_attention(*args)
        got = torch.compile(draft_attention, fullgraph=True, backend="aot_eager")(*args)
    assert torch.allclose(got[0], want[0]) and torch.equal(got[1], want[1])


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def bad():
    return problem([40, 21], Hq=4, Hkv=2, D=16, page=8, seed=20)


def select_args(p, **over):
    a = dict(q=p.q, k_cache=p.k_cache, block_table=p.block_table, seq_lens=p.seq_lens, chunk_size=8, num_chunks=3,
             num_sink_chunks=1, num_recent_chunks=1, chunk_means=None)
    a.update(over)
    return torch.ops.fastverify.select_kv_chunks(a.pop("q"), a.pop("k_cache"), a.pop("block_table"),
                                                 a.pop("seq_lens"), **a)


def attention_args(p, **over):
    a = dict(q=p.q, k_cache=p.k_cache, v_cache=p.v_cache, block_table=p.block_table, seq_lens=p.seq_lens,
             chunk_ids=torch.tensor([[[0, 2, -1], [4, -1, 1]], [[1, -1, -1], [0, 1, -1]]], dtype=torch.int32),
             chunk_size=8, sm_scale=None)
    a.update(over)
    return torch.ops.fastverify.sparse_kv_attention(*[a.pop(k) for k in ("q", "k_cache", "v_cache", "block_table",
                                                                         "seq_lens", "chunk_ids")], **a)


COMMON_BAD = {
    "q_2d": (lambda p: dict(q=p.q[0]), "q must have 3 dimension"),
    "q_int": (lambda p: dict(q=p.q.long()), "q must be float16/bfloat16/float32"),
    "q_head_dim_stride": (lambda p: dict(q=torch.randn(2, 16, 4).transpose(1, 2)), "q must be contiguous in head_dim"),
    "head_dim_too_big": (lambda p: dict(q=torch.randn(2, 4, 288)), "head_dim in \\[1, 256\\]"),
    "cache_dtype": (lambda p: dict(k_cache=p.k_cache.double()), "k_cache must be float32"),
    "cache_head_dim_stride": (lambda p: dict(k_cache=p.k_cache.transpose(1, 3).contiguous().transpose(1, 3)),
                              "k_cache must be contiguous in head_dim"),
    "head_dim_mismatch": (lambda p: dict(q=p.q[..., :8].contiguous()), "does not match q head_dim"),
    "gqa": (lambda p: dict(q=torch.randn(2, 3, 16)), "not a multiple of the 2 KV heads"),
    "block_table_dtype": (lambda p: dict(block_table=p.block_table.long()), "block_table must be int32"),
    "block_table_rows": (lambda p: dict(block_table=p.block_table[:1]), "block_table must have shape"),
    "block_table_short": (lambda p: dict(block_table=p.block_table[:, :2]), "block_table is too short"),
    "page_out_of_range": (lambda p: dict(block_table=torch.where(p.block_table == p.block_table[1, 0], 999,
                                                                 p.block_table)), "page id outside"),
    "seq_lens_dtype": (lambda p: dict(seq_lens=p.seq_lens.long()), "seq_lens must be int32"),
    "seq_lens_shape": (lambda p: dict(seq_lens=p.seq_lens[:1]), "seq_lens must have shape"),
    "seq_lens_zero": (lambda p: dict(seq_lens=torch.tensor([40, 0], dtype=torch.int32)),
                      r"seq_lens\[1\] = 0: every request needs at least one key"),
    "chunk_size_zero": (lambda p: dict(chunk_size=0), "chunk_size must be an int >= 1"),
    "chunk_size_vs_page": (lambda p: dict(chunk_size=12), "chunk_size 12 and page_size 8"),
    "device_mismatch": (lambda p: dict(seq_lens=torch.empty(2, dtype=torch.int32, device="meta")),
                        "seq_lens is on meta"),
}

SELECT_BAD = {
    "num_chunks_below_forced": (lambda p: dict(num_chunks=3, num_sink_chunks=2, num_recent_chunks=2),
                                "num_chunks = 3 must be >= num_sink_chunks \\+ num_recent_chunks"),
    "negative_sinks": (lambda p: dict(num_sink_chunks=-1), "num_sink_chunks must be an int >= 0"),
    "num_chunks_float": (lambda p: dict(num_chunks=3.0), "num_chunks"),
    "means_dtype": (lambda p: dict(chunk_means=torch.zeros(2, 5, 2, 16, dtype=torch.float64)),
                    "chunk_means must be float32"),
    "means_shape": (lambda p: dict(chunk_means=torch.zeros(2, 5, 1, 16)), "chunk_means must have shape"),
    "means_too_few_chunks": (lambda p: dict(chunk_means=torch.zeros(2, 4, 2, 16)),
                             "chunk_means holds 4 chunks per request but request 0 has F = seq_lens\\[0\\] // "
                             "chunk_size = 5"),
}

ATTN_BAD = {
    "ids_dtype": (lambda p: dict(chunk_ids=torch.zeros(2, 2, 3, dtype=torch.int64)), "chunk_ids must be int32"),
    "ids_shape": (lambda p: dict(chunk_ids=torch.zeros(2, 1, 3, dtype=torch.int32)), "chunk_ids must have shape"),
    "ids_empty": (lambda p: dict(chunk_ids=torch.zeros(2, 2, 0, dtype=torch.int32)), "at least one slot"),
    "id_past_full_chunks": (lambda p: dict(chunk_ids=torch.tensor([[[0, 2, -1], [4, -1, 1]], [[2, -1, -1],
                                                                                             [0, 1, -1]]],
                                                                  dtype=torch.int32)),
                            r"chunk_ids\[1, 0, 0\] = 2 is outside \[-1, 2\)"),
    "id_below_minus_one": (lambda p: dict(chunk_ids=torch.tensor([[[0, -2, -1], [4, -1, 1]], [[1, -1, -1],
                                                                                             [0, 1, -1]]],
                                                                 dtype=torch.int32)),
                           r"chunk_ids\[0, 0, 1\] = -2 is outside"),
    "duplicate_id": (lambda p: dict(chunk_ids=torch.tensor([[[0, 2, -1], [4, -1, 4]], [[1, -1, -1], [0, 1, -1]]],
                                                           dtype=torch.int32)),
                     r"chunk_ids\[0, 1\] lists chunk 4 twice"),
    "v_shape": (lambda p: dict(v_cache=p.v_cache[:, :4]), "v_cache must have shape"),
    "v_dtype": (lambda p: dict(v_cache=p.v_cache.half()), "v_cache must be float32"),
    "sm_scale_nan": (lambda p: dict(sm_scale=float("nan")), "sm_scale must be a finite float"),
}


@pytest.mark.parametrize("case", list(COMMON_BAD) + list(SELECT_BAD))
def test_select_bad_input(bad, case):
    make, msg = {**COMMON_BAD, **SELECT_BAD}[case]
    with pytest.raises((ValueError, TypeError, RuntimeError), match=msg):
        select_args(bad, **make(bad))


@pytest.mark.parametrize("case", list(COMMON_BAD) + list(ATTN_BAD))
def test_attention_bad_input(bad, case):
    make, msg = {**COMMON_BAD, **ATTN_BAD}[case]
    with pytest.raises((ValueError, TypeError, RuntimeError), match=msg):
        attention_args(bad, **make(bad))


def test_streaming_bad_input():
    lens = torch.tensor([40], dtype=torch.int32)
    with pytest.raises(ValueError, match="num_sink_chunks = 5 must be <= num_chunks = 4"):
        fastverify.streaming_kv_chunks(lens, chunk_size=8, num_chunks=4, num_sink_chunks=5, num_hkv=1)
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1"):
        fastverify.streaming_kv_chunks(lens, chunk_size=0, num_chunks=4, num_hkv=1)
    with pytest.raises(ValueError, match="num_hkv must be an int >= 1"):
        fastverify.streaming_kv_chunks(lens, chunk_size=8, num_chunks=4, num_hkv=0)
