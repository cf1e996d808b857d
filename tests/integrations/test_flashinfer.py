"""fastverify.integrations.flashinfer: FlashInfer 0.7's ``chain_speculative_sampling``.

Ported from FlashInfer's own suite (flashinfer-ai/flashinfer): ``tests/utils/test_sampling.py``
``test_chain_speculative_sampling`` (one-hot target → exact tokens; random → valid,
contiguous, -1 padded outputs, ``emitted + 1 == non-pad count``), the seed/offset tests of the
same file (``test_sampling_from_probs_seed_offset_reproducibility``,
``test_sampling_different_seed_offset_produces_different_results``, applied here to the chain
sampler), ``tests/trace/test_chain_speculative_sampling_reference_correctness.py`` (one-hot
draft and target → every draft accepted, the bonus token exact) and the docstring example of
``flashinfer.sampling.chain_speculative_sampling``. Plus: goodness of fit (chi-squared), the
accepted-count definition, in-place accumulation, reproducibility and row independence, -1
padded drafts, no host reads, bad input, and the same results on every backend.

The Triton interpreter runs a request in ~0.2-0.4 s here and the CUDA emulator slows down
with the grid (1000 requests: ~2 min): shapes are tiny, and the distribution tests draw their
large samples on the torch backend and on real GPUs (identical outputs across backends are
checked separately).
"""

import sys

import pytest
import torch
from scipy import stats

import fastverify
from fastverify.integrations import flashinfer as fi
from fastverify.integrations.flashinfer import chain_speculative_sampling



from conftest import BACKEND_DEVICES, backend_params  # noqa: E402  (tests/conftest.py)

pytestmark = pytest.mark.family("integrations")

BACKENDS = list(BACKEND_DEVICES)
# backends running on CPU tensors through the Triton interpreter / the CUDA emulator
EMULATED = {b for b, d in BACKEND_DEVICES.items() if b != "torch" and d == "cpu"}


def normalized(shape, gen):
    """Random distributions over the last dim, as FlashInfer's test draws them."""
    p = torch.rand(shape, generator=gen)
    return p / p.sum(-1, keepdim=True)


def onehot(ids, V):
    return torch.zeros(*ids.shape, V).scatter_(-1, ids.long().unsqueeze(-1), 1.0)


def run(backend, draft_probs, draft_token_ids, target_probs, *args, **kw):
    """The adapter on ``backend``'s device; outputs come back on CPU."""
    dev = BACKEND_DEVICES[backend]
    to = lambda t: t.to(dev) if isinstance(t, torch.Tensor) else t  # noqa: E731
    with fastverify.use_backend(backend):
        out = chain_speculative_sampling(to(draft_probs), to(draft_token_ids), to(target_probs),
                                         *[to(a) for a in args], **{k: to(v) for k, v in kw.items()})
    return tuple(t.cpu() for t in out)


# ----------------------------------------------------------------------------- FlashInfer's cases


@pytest.mark.parametrize("backend", BACKENDS)
def test_chain_speculative_sampling_docstring_example(backend):
    """FlashInfer's docstring: draft 2 accepted (q 0.3 < p 0.6), draft 1 rejected (p = 0), the
    residual relu(p - q) is all on token 0."""
    draft_probs = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.2, 0.3, 0.4, 0.1]]])
    draft_token_ids = torch.tensor([[2, 1]], dtype=torch.int32)
    target_probs = torch.tensor([[[0.0, 0.1, 0.6, 0.3], [1.0, 0.0, 0.0, 0.0], [0.7, 0.1, 0.1, 0.1]]])
    out, accepted, emitted = run(backend, draft_probs, draft_token_ids, target_probs, seed=42, offset=0)
    assert out.tolist() == [[2, 0, -1]] and out.dtype == torch.int32
    assert accepted.tolist() == [1] and emitted.tolist() == [1]


# K = 5 costs ~1 s per trial under the Triton interpreter (K = 1, 3 cover the logic there)
@pytest.mark.parametrize("onehot_target", [False, True])
@pytest.mark.parametrize("backend,num_speculate_tokens", backend_params([1, 3, 5],
                                                                        lambda b, row: b != "triton" or row != (5,)))
def test_chain_speculative_sampling(backend, num_speculate_tokens, onehot_target):
    """FlashInfer's test_chain_speculative_sampling (batch 1/99/989 and vocab 111/32000/128256
    there; a batch of 2 at vocab 111 here, fewer trials on emulated backends)."""
    B, K, V = 2, num_speculate_tokens, 111
    gen = torch.Generator().manual_seed(42)
    draft_probs = normalized((B, K, V), gen)
    draft_token_ids = torch.randint(V, (B, K), generator=gen, dtype=torch.int32)
    if onehot_target:
        target_token_ids = torch.randint(V, (B, K + 1), generator=gen)
        target_token_ids[:, :K] = draft_token_ids
        target_probs = onehot(target_token_ids, V)
    else:
        target_probs = normalized((B, K + 1, V), gen)
    for trial in range(1 if backend in EMULATED else 10):
        accepted_num = torch.zeros(B, dtype=torch.int32)
        emitted_num = torch.zeros(B, dtype=torch.int32)
        out, accepted_num, emitted_num = run(backend, draft_probs, draft_token_ids, target_probs, accepted_num,
                                             emitted_num, seed=trial, offset=trial * B * (K + 1))
        assert out.shape == (B, K + 1) and out.dtype == torch.int32
        if onehot_target:
            assert torch.equal(out, target_token_ids.int())
            assert accepted_num.tolist() == emitted_num.tolist() == [K] * B
        else:
            assert bool(((out >= -1) & (out < V)).all())
            mismatch = out[:, :-1] != draft_token_ids
            for row in range(B):
                idx = mismatch[row].nonzero()[:, 0]
                if len(idx):
                    assert bool((idx[1:] == idx[:-1] + 1).all())        # one contiguous run ...
                    assert bool((out[row, idx[0] + 1:] == -1).all())   # ... of -1 after the first
        assert torch.equal(emitted_num + 1, (out != -1).sum(1).int())
        assert bool((accepted_num >= emitted_num).all())


def reference_chain(draft_probs, draft_token_ids, target_probs):
    """FlashInfer's trace reference (deterministic cases only): accept draft j iff
    p_j(x) >= q_j(x); emit the argmax of the stopping row."""
    B, K = draft_token_ids.shape
    out = torch.full((B, K + 1), -1, dtype=torch.int32)
    for b in range(B):
        for j in range(K + 1):
            x = int(draft_token_ids[b, j]) if j < K else -1
            if j < K and target_probs[b, j, x] >= draft_probs[b, j, x]:
                out[b, j] = x
                continue
            out[b, j] = int(target_probs[b, j].argmax())
            break
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_size, num_speculative, vocab_size", [(3, 4, 128), (2, 3, 96)])
def test_chain_speculative_sampling_reference_correctness(backend, batch_size, num_speculative, vocab_size):
    """FlashInfer's trace test: one-hot draft and target agreeing on every draft → all
    accepted; the one-hot bonus row fixes the last token."""
    B, K, V = batch_size, num_speculative, vocab_size
    gen = torch.Generator().manual_seed(0)
    draft_ids = torch.randint(0, V, (B, K), generator=gen, dtype=torch.int32)
    bonus_ids = torch.randint(0, V, (B,), generator=gen)
    draft_probs = onehot(draft_ids, V)
    target_probs = onehot(torch.cat([draft_ids.long(), bonus_ids[:, None]], 1), V)
    out, accepted, emitted = run(backend, draft_probs, draft_ids, target_probs,
                                 torch.zeros(B, dtype=torch.int32), torch.zeros(B, dtype=torch.int32),
                                 deterministic=True, seed=7, offset=0)
    assert torch.equal(out, reference_chain(draft_probs, draft_ids, target_probs))
    assert accepted.tolist() == emitted.tolist() == [K] * B


# ----------------------------------------------------------------------------- accepted-count definition


@pytest.mark.parametrize("backend", BACKENDS)
def test_accepted_count_is_independent_per_position(backend):
    """Deterministic constructions: row 0 accepts everything (counts equal, K); row 1 rejects
    draft 0 (target 0 there) but every later draft passes its own test: emitted 0, accepted
    K - 1; row 2 rejects every draft: both 0. The rejected rows emit the target's token."""
    V = 16
    ids = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    draft_probs = onehot(ids, V)
    tgt = torch.tensor([[1, 2, 3, 10], [11, 5, 6, 12], [13, 14, 15, 0]])
    out, accepted, emitted = run(backend, draft_probs, ids, onehot(tgt, V), seed=3, offset=5)
    assert out.tolist() == [[1, 2, 3, 10], [11, -1, -1, -1], [13, -1, -1, -1]]
    assert emitted.tolist() == [3, 0, 0]
    assert accepted.tolist() == [3, 2, 0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_run_of_own_decisions_is_the_ops_count(backend):
    """The per-position decisions made here (the op's uniforms, lane 0 at (key_b, offset_b + j))
    agree with the op: their leading run is the emitted count, their total the accepted count."""
    B, K, V = (4, 3, 32) if backend in EMULATED else (256, 4, 32)
    gen = torch.Generator().manual_seed(11)
    q = normalized((B, K, V), gen)
    p = normalized((B, K + 1, V), gen)
    ids = torch.multinomial(q.reshape(-1, V), 1, generator=gen).reshape(B, K)
    seed, offset = torch.randint(0, 2**40, (B,), generator=gen), torch.randint(0, 2**40, (B,), generator=gen)
    out, accepted, emitted = run(backend, q, ids, p, seed=seed, offset=offset)
    key, pos = fi._row_streams(seed, offset, B, torch.device("cpu"))
    acc = fi._accepts(q, ids, torch.ones(B, K, dtype=torch.bool), p, key, pos)
    assert torch.equal(acc.int().cumprod(1).sum(1).int(), emitted)
    assert torch.equal(acc.sum(1).int(), accepted)
    assert bool((accepted >= emitted).all())
    if backend not in EMULATED:
        assert bool((accepted > emitted).any())   # the definitions differ in practice


@pytest.mark.parametrize("backend", BACKENDS)
def test_maybe_outputs_accumulate_in_place(backend):
    """FlashInfer adds the counts to the maybe_ tensors in place and returns those tensors."""
    B, K, V = 2, 3, 24
    gen = torch.Generator().manual_seed(5)
    q, p = normalized((B, K, V), gen), normalized((B, K + 1, V), gen)
    ids = torch.multinomial(q.reshape(-1, V), 1, generator=gen).reshape(B, K)
    dev = BACKEND_DEVICES[backend]
    acc_buf = torch.tensor([10, 20], dtype=torch.int32, device=dev)
    emit_buf = torch.tensor([1, 2], dtype=torch.int64, device=dev)   # int64 accumulates too (FlashInfer: silently not)
    want_acc, want_emit = acc_buf.cpu().clone(), emit_buf.cpu().clone()
    for call in range(2):
        _, a, e = run(backend, q, ids, p, seed=9, offset=call * 100)
        want_acc += a
        want_emit += e
        with fastverify.use_backend(backend):
            _, ra, re = chain_speculative_sampling(q.to(dev), ids.to(dev), p.to(dev), acc_buf, emit_buf,
                                                   seed=9, offset=call * 100)
        assert ra is acc_buf and re is emit_buf
    assert acc_buf.cpu().tolist() == want_acc.tolist() and emit_buf.dtype == torch.int64
    assert emit_buf.cpu().tolist() == want_emit.tolist()


# ----------------------------------------------------------------------------- -1 padded drafts


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_drafts_end_the_chain(backend):
    """A request padded with -1 after its k drafts gives exactly what the k-draft request
    gives (the same uniforms: acceptance at offset + j, the token at the pad slot drawn from
    the target row there). -1 is never read as an address."""
    B, K, V = 3, 3, 20
    gen = torch.Generator().manual_seed(21)
    q, p = normalized((B, K, V), gen), normalized((B, K + 1, V), gen)
    ids = torch.multinomial(q.reshape(-1, V), 1, generator=gen).reshape(B, K)
    ids[0, 1:] = -1              # k = 1
    ids[1, :] = -1               # k = 0: the token comes from the first target row
    q[0, 1:] = 0.0               # FlashInfer callers pad the rows too; never read here
    q[1] = 0.0
    out, accepted, emitted = run(backend, q, ids, p, seed=4, offset=40)
    one, a1, e1 = run(backend, q[:1, :1], ids[:1, :1], p[:1, :2], seed=4, offset=40)
    assert out[0, :2].tolist() == one[0].tolist() and out[0, 2:].tolist() == [-1, -1]
    assert emitted[0] == e1[0] and accepted[0] == a1[0]
    # row 1 (k = 0): the op's bonus draw from row 0 at (key_1, offset); compare with the op
    key, pos = fi._row_streams(4, 40, B, torch.device("cpu"))
    with fastverify.use_backend(backend):
        dev = BACKEND_DEVICES[backend]
        tok, n = fastverify.rejection_sample(p[1, :1].log().to(dev), torch.zeros(0, dtype=torch.long, device=dev),
                                             torch.zeros(2, dtype=torch.int32, device=dev), temperature=1.0,
                                             seed=key[1:2].to(dev), positions=pos[1:2].to(dev), max_draft_len=0)
    assert out[1].tolist() == [int(tok[0, 0])] + [-1] * K
    assert emitted[1] == 0 and accepted[1] == 0


# ----------------------------------------------------------------------------- randomness


@pytest.mark.parametrize("backend", BACKENDS)
def test_chain_speculative_sampling_seed_offset_reproducibility(backend):
    """FlashInfer's seed/offset reproducibility test, for the chain sampler: the same (seed,
    offset) gives the same outputs, as ints, [1] tensors or [B] tensors (int64 or uint64)."""
    B, K, V = 3, 2, 40
    gen = torch.Generator().manual_seed(1)
    q, p = normalized((B, K, V), gen), normalized((B, K + 1, V), gen)
    ids = torch.multinomial(q.reshape(-1, V), 1, generator=gen).reshape(B, K)
    want = run(backend, q, ids, p, seed=12345, offset=0)
    forms = [dict(seed=12345, offset=0),
             dict(seed=torch.tensor([12345]), offset=torch.tensor([0])),
             dict(seed=torch.full((B,), 12345), offset=torch.zeros(B, dtype=torch.int64))]
    if backend == "torch":
        forms.append(dict(seed=torch.tensor([12345], dtype=torch.uint64), offset=torch.tensor([0], dtype=torch.uint64)))
    for kw in forms:
        got = run(backend, q, ids, p, **kw)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), kw


def test_chain_speculative_sampling_different_seed_offset_produces_different_results():
    """FlashInfer's different-seed/offset test: other seeds or offsets give other samples.
    Many rows of one distribution: the rows' streams are independent, so their first tokens
    are not all equal either."""
    B, K, V = 512, 2, 50
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(V, (1, K), generator=gen).expand(B, K)
    q, p = onehot(ids, V), normalized((1, K + 1, V), gen).expand(B, K + 1, V)   # drafts mostly rejected
    base = run("torch", q, ids, p, seed=12345, offset=0)[0]
    other_seed = run("torch", q, ids, p, seed=67890, offset=0)[0]
    other_offset = run("torch", q, ids, p, seed=12345, offset=1000)[0]
    assert (base == other_seed).all(1).float().mean() < 0.9
    assert (base == other_offset).all(1).float().mean() < 0.9
    assert len(set(base[:, 0].tolist())) > 10          # rows are not copies of each other


def test_row_streams_are_distinct_and_row_zero_keeps_the_seed():
    B = 1 << 16
    for seed in (0, 12345, -1, 2**63 - 1, 2**64 - 1):
        key, pos = fi._row_streams(seed, 77, B, torch.device("cpu"))
        assert key.unique().numel() == B
        assert int(key[0]) == (seed if seed < 2**63 else seed - 2**64) and bool((pos == 77).all())
    s = torch.arange(4) * 1000
    key, pos = fi._row_streams(s, torch.tensor([5]), 4, torch.device("cpu"))
    assert int(key[0]) == 0 and pos.tolist() == [5] * 4 and key.unique().numel() == 4


def test_generator_draws_seed_and_offset():
    """No seed/offset: drawn from the generator, which advances (same state → same result;
    next call → another draw). One of seed/offset alone is ignored, as in FlashInfer."""
    B, K, V = 64, 2, 30
    gen = torch.Generator().manual_seed(3)
    q, p = normalized((B, K, V), gen), normalized((B, K + 1, V), gen)
    ids = torch.multinomial(q.reshape(-1, V), 1, generator=gen).reshape(B, K)
    g1, g2 = torch.Generator().manual_seed(99), torch.Generator().manual_seed(99)
    a = chain_speculative_sampling(q, ids, p, generator=g1)
    b = chain_speculative_sampling(q, ids, p, generator=g2, seed=5)   # seed without offset: ignored
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = chain_speculative_sampling(q, ids, p, generator=g1)
    assert not torch.equal(a[0], c[0])
    torch.manual_seed(0)
    d = chain_speculative_sampling(q, ids, p)
    torch.manual_seed(0)
    assert torch.equal(d[0], chain_speculative_sampling(q, ids, p)[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA generator")
def test_cuda_generator_advances_like_flashinfer():
    """FlashInfer reads the CUDA generator's (seed, offset) state and advances the offset by
    B·(K + 1) rounded up to 4, using the advanced value."""
    B, K, V = 3, 2, 40
    g = torch.Generator("cuda").manual_seed(5)
    seed0, off0 = g.get_state().view(torch.int64).tolist()
    q = normalized((B, K, V), torch.Generator().manual_seed(0)).cuda()
    p = normalized((B, K + 1, V), torch.Generator().manual_seed(1)).cuda()
    ids = torch.zeros(B, K, dtype=torch.int64, device="cuda")
    got = chain_speculative_sampling(q, ids, p, generator=g)
    inc = (B * (K + 1) + 3) // 4 * 4
    assert g.get_state().view(torch.int64).tolist() == [seed0, off0 + inc]
    want = chain_speculative_sampling(q, ids, p, seed=seed0, offset=off0 + inc)
    assert all(torch.equal(x, y) for x, y in zip(got, want))


# ----------------------------------------------------------------------------- goodness of fit


# 20000 samples: too slow under the Triton interpreter / CUDA emulator (identical outputs to
# the torch backend are checked there in test_same_results_on_every_backend)
@pytest.mark.parametrize("backend", backend_params([()], lambda b, row: False))
def test_emitted_tokens_follow_the_target(backend):
    """Drafts drawn from q, one request per sample (rows are independent streams), K = 2:
    the first token ~ p_0; the first two slots (a, b) follow
        P(a, b)    = min(p_0(a), q_0(a)) · p_1(b | a)      (draft a accepted, then b)
        P(a, stop) = p_0(a) - min(p_0(a), q_0(a))          (a recovered after a rejection)
    where p_1(· | a) is row 1 of a request whose draft 0 is a (as a target model computes it)."""
    N = 20000
    V = 5
    gen = torch.Generator().manual_seed(1234)
    q0, p0 = normalized((V,), gen), normalized((V,), gen)
    q1, p1_given = normalized((V,), gen), normalized((V, V), gen)     # p1_given[a] = p_1(· | a)
    x0 = torch.multinomial(q0, N, replacement=True, generator=gen)
    x1 = torch.multinomial(q1, N, replacement=True, generator=gen)
    draft_probs = torch.stack([q0.expand(N, V), q1.expand(N, V)], 1)
    target_probs = torch.stack([p0.expand(N, V), p1_given[x0], normalized((V,), gen).expand(N, V)], 1)
    out, accepted, emitted = run(backend, draft_probs, torch.stack([x0, x1], 1), target_probs, seed=2024, offset=0)

    first = torch.bincount(out[:, 0].long(), minlength=V).double()
    assert stats.chisquare(first, p0.double() * N).pvalue > 1e-3

    m = torch.minimum(p0, q0).double()
    want = torch.cat([(m[:, None] * p1_given.double()).reshape(-1), p0.double() - m])   # V·V pairs, V stops
    cell = torch.where(out[:, 1] >= 0, out[:, 0] * V + out[:, 1], V * V + out[:, 0]).long()
    got = torch.bincount(cell, minlength=V * V + V).double()
    keep = want > 0
    assert got[~keep].sum() == 0
    assert stats.chisquare(got[keep], want[keep] / want[keep].sum() * N).pvalue > 1e-3


# ----------------------------------------------------------------------------- host reads


def test_no_host_reads_under_fake_tensors():
    """With tensor seed/offset the whole call (adapter + op) runs on fake tensors: any
    .item(), .tolist(), nonzero or boolean mask would raise a data-dependent error."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    B, K, V = 3, 2, 16
    gen = torch.Generator().manual_seed(0)
    args = (normalized((B, K, V), gen), torch.randint(V, (B, K), generator=gen), normalized((B, K + 1, V), gen),
            torch.zeros(B, dtype=torch.int32), torch.zeros(B, dtype=torch.int32))
    seed, offset = torch.arange(B), torch.zeros(B, dtype=torch.int64)
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        f = [mode.from_tensor(t) for t in (*args, seed, offset)]
        out, acc, emit = chain_speculative_sampling(*f[:5], seed=f[5], offset=f[6])
        assert out.shape == (B, K + 1) and out.dtype == torch.int32 and acc.shape == emit.shape == (B,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_host_reads_in_the_adapter(backend, monkeypatch):
    """A real call with every host-reading Tensor method patched to raise when the adapter's
    own code calls it (the op's CPU-only value checks may read; the adapter may not)."""
    here = fi.__file__

    def guard(name, orig):
        def wrapped(*a, **kw):
            if sys._getframe(1).f_code.co_filename == here:
                raise AssertionError(f"the adapter called {name}")
            return orig(*a, **kw)
        return wrapped

    B, K, V = 2, 2, 16
    gen = torch.Generator().manual_seed(0)
    dev = BACKEND_DEVICES[backend]
    args = [t.to(dev) for t in (normalized((B, K, V), gen), torch.randint(V, (B, K), generator=gen),
                                normalized((B, K + 1, V), gen))]
    seed, offset = torch.arange(B, device=dev), torch.zeros(1, dtype=torch.int64, device=dev)
    for name in ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, guard(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch, "nonzero", guard("torch.nonzero", torch.nonzero))
    orig_getitem = torch.Tensor.__getitem__

    def getitem(self, idx):
        if sys._getframe(1).f_code.co_filename == here:
            for i in idx if isinstance(idx, tuple) else (idx,):
                assert not (isinstance(i, torch.Tensor) and i.dtype == torch.bool), "boolean mask indexing"
        return orig_getitem(self, idx)

    monkeypatch.setattr(torch.Tensor, "__getitem__", getitem)
    with fastverify.use_backend(backend):
        out, acc, emit = chain_speculative_sampling(*args, seed=seed, offset=offset)
    monkeypatch.undo()
    assert out.shape == (B, K + 1)


# ----------------------------------------------------------------------------- backends


def test_same_results_on_every_backend():
    """A mixed batch (random drafts, a -1 padded row, a one-hot row) gives the same tokens and
    counts on every backend."""
    B, K, V = 3, 3, 48
    gen = torch.Generator().manual_seed(8)
    q, p = normalized((B, K, V), gen), normalized((B, K + 1, V), gen)
    ids = torch.multinomial(q.reshape(-1, V), 1, generator=gen).reshape(B, K)
    ids[1, 2] = -1
    p[2, :K] = onehot(ids[2], V)
    seed, offset = torch.tensor([1, 2, 3]), torch.tensor([10, 20, 30])
    want = run("torch", q, ids, p, seed=seed, offset=offset)
    for backend in BACKENDS[1:]:
        got = run(backend, q, ids, p, seed=seed, offset=offset)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), backend


def test_input_dtypes():
    """fp16/bf16/fp64 probabilities and int32/int64/int16 ids are taken as FlashInfer takes them."""
    V = 12
    q, p = onehot(torch.tensor([[1, 2], [3, 4]]), V), onehot(torch.tensor([[1, 2, 5], [3, 0, 6]]), V)
    ids = torch.tensor([[1, 2], [3, 4]])
    for dt in (torch.float16, torch.bfloat16, torch.float64):
        for it in (torch.int32, torch.int64, torch.int16):
            out, acc, emit = chain_speculative_sampling(q.to(dt), ids.to(it), p.to(dt), seed=1, offset=0)
            assert out.tolist() == [[1, 2, 5], [3, 0, -1]] and acc.tolist() == [2, 1] and emit.tolist() == [2, 1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B, K, V", [(0, 2, 8), (2, 0, 8), (2, 2, 1)])
def test_edge_shapes(backend, B, K, V):
    """An empty batch, no drafts (the bonus token only) and a one-token vocabulary."""
    gen = torch.Generator().manual_seed(0)
    q, p = normalized((B, K, V), gen), normalized((B, K + 1, V), gen)
    ids = torch.zeros(B, K, dtype=torch.int64)
    out, acc, emit = run(backend, q, ids, p, seed=1, offset=0)
    assert out.shape == (B, K + 1) and acc.shape == emit.shape == (B,)
    if V == 1:
        assert out.tolist() == [[0] * (K + 1)] * B and acc.tolist() == emit.tolist() == [K] * B
    if K == 0:
        assert bool((out[:, 0] >= 0).all()) and acc.tolist() == emit.tolist() == [0] * B


# ----------------------------------------------------------------------------- bad input


def _good():
    B, K, V = 2, 3, 10
    gen = torch.Generator().manual_seed(0)
    return dict(draft_probs=normalized((B, K, V), gen), draft_token_ids=torch.randint(V, (B, K), generator=gen),
                target_probs=normalized((B, K + 1, V), gen))


BAD = {
    "draft_probs 2-D": (lambda a: a.update(draft_probs=a["draft_probs"][0]), ValueError, "draft_probs must be"),
    "draft_probs int": (lambda a: a.update(draft_probs=a["draft_probs"].int()), ValueError,
                        "draft_probs must be float"),
    "draft_probs list": (lambda a: a.update(draft_probs=[0.5]), TypeError, "draft_probs must be a torch.Tensor"),
    "target K rows": (lambda a: a.update(target_probs=a["target_probs"][:, :3]), ValueError,
                      r"target_probs must be \[batch_size, num_speculate_tokens \+ 1, vocab_size\] = \[2, 4, 10\]"),
    "target vocab": (lambda a: a.update(target_probs=a["target_probs"][..., :9]), ValueError, "target_probs must be"),
    "target dtype": (lambda a: a.update(target_probs=a["target_probs"].long()), ValueError,
                     "target_probs must be float"),
    "ids shape": (lambda a: a.update(draft_token_ids=a["draft_token_ids"][:, :2]), ValueError,
                  r"draft_token_ids must be \[batch_size, num_speculate_tokens\] = \[2, 3\]"),
    "ids float": (lambda a: a.update(draft_token_ids=a["draft_token_ids"].float()), ValueError,
                  "draft_token_ids must be an integer tensor"),
    "ids device": (lambda a: a.update(draft_token_ids=a["draft_token_ids"].to("meta")), ValueError,
                   "draft_token_ids is on meta but draft_probs is on cpu"),
    "acc shape": (lambda a: a.update(maybe_output_accepted_token_num=torch.zeros(3, dtype=torch.int32)), ValueError,
                  r"maybe_output_accepted_token_num must be \[batch_size\] = \[2\]"),
    "acc dtype": (lambda a: a.update(maybe_output_accepted_token_num=torch.zeros(2)), ValueError,
                  "maybe_output_accepted_token_num must be int32/int64"),
    "emit dtype": (lambda a: a.update(maybe_output_emitted_draft_token_num=torch.zeros(2, dtype=torch.int16)),
                   ValueError, "maybe_output_emitted_draft_token_num must be int32/int64"),
    "emit device": (lambda a: a.update(maybe_output_emitted_draft_token_num=torch.zeros(2, dtype=torch.int32,
                                                                                        device="meta")),
                    ValueError, "maybe_output_emitted_draft_token_num is on meta"),
    "mixed seed": (lambda a: a.update(seed=torch.tensor([1]), offset=0), ValueError,
                   "seed and offset must both be tensors or both be Python ints"),
    "seed dtype": (lambda a: a.update(seed=torch.tensor([1], dtype=torch.int32), offset=torch.tensor([0])), ValueError,
                   "seed tensor must be int64/uint64"),
    "seed 0-d": (lambda a: a.update(seed=torch.tensor(1), offset=torch.tensor([0])), ValueError,
                 "seed tensor must be 1D"),
    "offset length": (lambda a: a.update(seed=torch.tensor([1]), offset=torch.zeros(3, dtype=torch.int64)), ValueError,
                      "offset tensor length must be 1 or 2"),
    "offset device": (lambda a: a.update(seed=torch.tensor([1]), offset=torch.zeros(1, dtype=torch.int64,
                                                                                      device="meta")),
                      ValueError, "offset tensor must be on cpu"),
    "seed float": (lambda a: a.update(seed=1.5, offset=0), TypeError, "seed must be a Python int"),
    "generator": (lambda a: a.update(generator=3), TypeError, "generator must be a torch.Generator"),
    "deterministic": (lambda a: a.update(deterministic="yes"), TypeError, "deterministic must be a bool"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_names_the_argument(case):
    edit, exc, msg = BAD[case]
    a = _good()
    edit(a)
    with pytest.raises(exc, match=msg):
        chain_speculative_sampling(**a)


def test_bad_probability_values_name_the_argument():
    """Value checks are the op's (on CPU always, on CUDA with FASTVERIFY_CHECKS=1)."""
    a = _good()
    a["draft_probs"][0, 1, 2] = -0.5
    with pytest.raises(ValueError, match="draft_probs"):
        chain_speculative_sampling(**a, seed=0, offset=0)
