"""fastverify.integrations.vllm against vLLM 0.33.0's own tests and meaning.

- Ports of vLLM's ``tests/v1/sample/test_rejection_sampler.py`` (same names, same expected
  values), through both entry points: ``rejection_sample`` (bonus tokens given, as vLLM's
  tests mock its sampler) and ``RejectionSampler.forward`` (vLLM's logits layout with the
  bonus rows; in the greedy cases the bonus row's argmax is the token vLLM's mock returns).
  The logits-processor cases (penalties, bad words, allowed token ids) go through
  ``rejection_sample`` with the processors' effect written into the logits, which is how
  vLLM hands them over; ``forward`` leaves them to its ``fallback``.
- Goodness of fit (chi-squared, fixed seeds) of every sampling path; a plain-Python greedy
  oracle; generator reproducibility; no host reads on the hot path (meta tensors and
  patched host-read methods); bad input; ``forward`` == ``rejection_sample``; the plugin.
- Opt-in (``FASTVERIFY_VLLM_SRC`` = an extracted vLLM 0.33.0 wheel): vLLM's own Triton
  rejection sampler under the Triton interpreter side by side with the adapter.

Backends: every test runs on ``BACKENDS`` unless marked. The Triton interpreter costs about
0.1 s per request here and the CUDA emulator's top-k / top-p selects about 0.1 s per row,
so their batches stay small; the distribution tests, which need thousands of requests,
run on torch (and on the emulated cuda backend at a smaller count), and
``test_backends_agree`` proves triton and cuda emit torch's very tokens on the same seeds.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import itertools
import os
import sys
import types
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chi2_contingency

import naive
from conftest import BACKEND_DEVICES, BACKENDS, backend_params
from law import assert_law

import fastverify
from fastverify import _backend
from fastverify.integrations import vllm as fv
from fastverify.integrations.vllm import PLACEHOLDER_TOKEN_ID, RejectionSampler, rejection_sample

pytestmark = pytest.mark.family("integrations")

ENTRIES = ("rejection_sample", "forward")
SMALL = [b for b in BACKENDS if b != "triton"]     # backends fast enough for thousands of requests


# ----------------------------------------------------------------------------- vLLM's test fixtures


def sampling_metadata(all_greedy: bool, temperature=None, top_k=None, top_p=None, generators=None, **extra):
    """vLLM's ``create_sampling_metadata``: the fields the adapters read (and any ``extra``)."""
    fields = dict(temperature=None if all_greedy else temperature, all_greedy=all_greedy, all_random=not all_greedy,
                  top_k=top_k, top_p=top_p, generators=generators or {}, max_num_logprobs=None, no_penalties=True,
                  bad_words_token_ids={}, allowed_token_ids_mask=None)
    fields.update(extra)
    return SimpleNamespace(**fields)


@dataclass
class SpecDecodeMetadata:
    """The fields of vLLM's ``SpecDecodeMetadata`` (``vllm/v1/spec_decode/metadata.py``)."""

    draft_token_ids: torch.Tensor           # [N]
    num_draft_tokens: list
    cu_num_draft_tokens: torch.Tensor       # [B] inclusive
    cu_num_sampled_tokens: torch.Tensor     # [B] inclusive
    target_logits_indices: torch.Tensor     # [N]
    bonus_logits_indices: torch.Tensor      # [B]
    logits_indices: torch.Tensor            # [N + B]

    def __post_init__(self):
        self.max_spec_len = max(self.num_draft_tokens)


def spec_decode_metadata(spec_tokens: list[list[int]], device) -> SpecDecodeMetadata:
    """As vLLM's model runner lays them out: request b's K_b draft rows, then its bonus row."""
    num = [len(t) for t in spec_tokens]
    rows = [range(s + b, s + b + k + 1) for b, (s, k) in enumerate(zip([0, *itertools.accumulate(num)], num))]
    i32 = dict(dtype=torch.int32, device=device)
    flat = itertools.chain.from_iterable
    return SpecDecodeMetadata(
        draft_token_ids=torch.tensor(list(flat(spec_tokens)), **i32),
        num_draft_tokens=num,
        cu_num_draft_tokens=torch.tensor(list(itertools.accumulate(num)), **i32),
        cu_num_sampled_tokens=torch.tensor(list(itertools.accumulate(k + 1 for k in num)), **i32),
        target_logits_indices=torch.tensor(list(flat(r[:-1] for r in rows)), **i32),
        bonus_logits_indices=torch.tensor([r[-1] for r in rows], **i32),
        logits_indices=torch.arange(sum(num) + len(num), **i32))


def create_logits_tensor(output_tokens: list[list[int]], vocab_size: int = 100, token_idx_to_override=None,
                         device="cpu", bonus_rows: bool = False) -> torch.Tensor:
    """vLLM's helper: logits whose argmax are ``output_tokens`` (100 at the token, -100
    elsewhere, 99 at ``token_idx_to_override``). Without bonus rows (vLLM's) the last token
    of each request has no row; with them it is the argmax of the request's bonus row."""
    tokens = [t if bonus_rows else t[:-1] for t in output_tokens]
    logits = torch.full((sum(map(len, tokens)), vocab_size), -100.0)
    for r, t in enumerate(itertools.chain(*tokens)):
        logits[r, t] = 100.0
    if token_idx_to_override:
        logits[:, token_idx_to_override] = 99.0
    return logits.to(device)


def run_sampler(entry: str, backend: str, spec_tokens, logits_fn, bonus, sm, draft_probs=None) -> torch.Tensor:
    """One step through ``entry``: ``logits_fn(bonus_rows)`` builds the logits on the backend's
    device; ``bonus`` [B] are the tokens vLLM's mocked sampler returns (rejection_sample)."""
    dev = BACKEND_DEVICES[backend]
    md = spec_decode_metadata(spec_tokens, dev)
    with fastverify.use_backend(backend):
        if entry == "rejection_sample":
            return rejection_sample(md.draft_token_ids, md.num_draft_tokens, md.max_spec_len, md.cu_num_draft_tokens,
                                    draft_probs, logits_fn(False), torch.as_tensor(bonus, device=dev)[:, None], sm)
        return RejectionSampler()(md, draft_probs, logits_fn(True), sm).sampled_token_ids


def greedy_case(entry, backend, spec_tokens, output_tokens, expected, vocab_size=100, override=None):
    dev = BACKEND_DEVICES[backend]
    out = run_sampler(entry, backend, spec_tokens,
                      lambda bonus_rows: create_logits_tensor(output_tokens, vocab_size, override, dev, bonus_rows),
                      [t[-1] for t in output_tokens], sampling_metadata(all_greedy=True))
    assert out.dtype == torch.int32 and out.device.type == torch.device(dev).type
    assert torch.equal(out.cpu(), torch.tensor(expected, dtype=torch.int32)), out


backends_and_entries = pytest.mark.parametrize("backend,entry", list(itertools.product(BACKENDS, ENTRIES)))


# ----------------------------------------------------------------------------- greedy (vLLM's cases)


@backends_and_entries
def test_perfect_match(backend, entry):
    greedy_case(entry, backend, [[1, 2, 3]], [[1, 2, 3, 4]], [[1, 2, 3, 4]])


@backends_and_entries
def test_early_mismatch(backend, entry):
    greedy_case(entry, backend, [[1, 2, 3]], [[1, 5, 3, 4]], [[1, 5, PLACEHOLDER_TOKEN_ID, PLACEHOLDER_TOKEN_ID]])


@backends_and_entries
def test_multiple_sequences(backend, entry):
    greedy_case(entry, backend, [[1, 2], [3]], [[1, 2, 5], [3, 4]], [[1, 2, 5], [3, 4, PLACEHOLDER_TOKEN_ID]])


@backends_and_entries
def test_single_token_sequence(backend, entry):
    greedy_case(entry, backend, [[1]], [[1, 2]], [[1, 2]])


@backends_and_entries
def test_empty_sequence(backend, entry):
    greedy_case(entry, backend, [[]], [[5]], [[5]])


@backends_and_entries
def test_multiple_mismatches(backend, entry):
    greedy_case(entry, backend, [[1, 2, 3], [4, 5, 6]], [[1, 2, 7, 6], [4, 8, 6, 9]],
                [[1, 2, 7, PLACEHOLDER_TOKEN_ID], [4, 8, PLACEHOLDER_TOKEN_ID, PLACEHOLDER_TOKEN_ID]])


@backends_and_entries
@pytest.mark.parametrize("spec_tokens,output_tokens,expected", [
    ([[1, 2]], [[1, 2, 3]], [[1, 2, 3]]),                                           # perfect match with bonus
    ([[1]], [[2, 3]], [[2, PLACEHOLDER_TOKEN_ID]]),                                 # first mismatch
    ([[1, 2], [3, 4]], [[1, 5, 6], [3, 4, 7]], [[1, 5, PLACEHOLDER_TOKEN_ID], [3, 4, 7]]),   # mixed matches
])
def test_parametrized_cases(backend, entry, spec_tokens, output_tokens, expected):
    greedy_case(entry, backend, spec_tokens, output_tokens, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_sequence_in_a_batch(backend):
    """Requests without drafts next to requests with drafts (vLLM's zero-draft case in a batch)."""
    for entry in ENTRIES:
        greedy_case(entry, backend, [[], [1, 2], []], [[5], [1, 3, 8], [6]],
                    [[5, -1, -1], [1, 3, -1], [6, -1, -1]])


# ----------------------------------------------------------------------------- logits processors (vLLM's cases)


def frequency_penalized(logits, spec_tokens, output_token_ids, penalties):
    """vLLM's frequency penalty on the draft rows: each row's logit of token t drops by
    penalty x (times t occurs in the request's output so far, drafts before the row included)."""
    logits = logits.clone()
    r = 0
    for b, spec in enumerate(spec_tokens):
        for j in range(len(spec)):
            for t in output_token_ids[b] + spec[:j]:
                logits[r, t] -= penalties[b]
            r += 1
    return logits


@pytest.mark.parametrize("backend", BACKENDS)
def test_frequency_penalties(backend):
    spec_tokens = [[1, 1, 1], [], [1, 1, 1]]
    output_tokens = [[1, 1, 1, 1], [7], [1, 1, 1, 1]]      # 1, 7 and 1 are the bonus tokens
    dev = BACKEND_DEVICES[backend]
    logits = frequency_penalized(create_logits_tensor(output_tokens, token_idx_to_override=15), spec_tokens,
                                 [[2], [3], [4]], [1.5, 1.5, 0.7]).to(dev)
    out = run_sampler("rejection_sample", backend, spec_tokens, lambda _: logits, [1, 7, 1],
                      sampling_metadata(all_greedy=True))
    assert out.tolist() == [[1, 15, -1, -1], [7, -1, -1, -1], [1, 1, 15, -1]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_words(backend):
    """Bad word [2] of requests 0 and 2 (not 1): vLLM masks token 2 in their rows."""
    spec_tokens = [[1, 2, 3], [1, 15, 3], [1, 2, 3]]
    output_tokens = [[1, 2, 3, 4], [1, 15, 3, 4], [1, 2, 3, 4]]
    logits = create_logits_tensor(output_tokens, token_idx_to_override=15)
    logits[0:3, 2] = logits[6:9, 2] = float("-inf")
    dev = BACKEND_DEVICES[backend]
    out = run_sampler("rejection_sample", backend, spec_tokens, lambda _: logits.to(dev), [4, 4, 4],
                      sampling_metadata(all_greedy=True))
    assert out.tolist() == [[1, 15, -1, -1], [1, 15, 3, 4], [1, 15, -1, -1]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_allowed_token_ids(backend):
    """vLLM's create_allowed_token_ids: even requests i may not emit tokens i .. i + 4."""
    spec_tokens = [[1, 2, 10], [10, 5, 3], [7, 10, 12]]
    output_tokens = [[1, 2, 10, 5], [10, 5, 10, 5], [7, 10, 12, 5]]
    logits = create_logits_tensor(output_tokens, token_idx_to_override=15)
    for b in (0, 2):
        logits[3 * b:3 * b + 3, b:b + 5] = float("-inf")
    dev = BACKEND_DEVICES[backend]
    out = run_sampler("rejection_sample", backend, spec_tokens, lambda _: logits.to(dev), [5, 5, 5],
                      sampling_metadata(all_greedy=True))
    assert out.tolist() == [[15, -1, -1, -1], [10, 5, 10, -1], [7, 10, 12, 5]]


def test_logits_processors_go_to_the_fallback():
    """forward maps no logits processor: it hands the batch to ``fallback`` (vLLM's own
    sampler under the plugin) and refuses without one."""
    md = spec_decode_metadata([[1, 2]], "cpu")
    logits = create_logits_tensor([[1, 2, 3]], bonus_rows=True)
    calls = []

    class Fallback(torch.nn.Module):
        def forward(self, *args):
            calls.append(args)
            return "vllm's output"

    idle_min_p = type("MinPLogitsProcessor", (), {"min_p_count": 0})()
    fine = sampling_metadata(True, logitsprocs=SimpleNamespace(argmax_invariant=[idle_min_p], non_argmax_invariant=[]))
    assert RejectionSampler()(md, None, logits, fine).sampled_token_ids.tolist() == [[1, 2, 3]]
    for extra in (dict(no_penalties=False), dict(bad_words_token_ids={0: [[2]]}),
                  dict(allowed_token_ids_mask=torch.zeros(1, 100, dtype=torch.bool)), dict(max_num_logprobs=0),
                  dict(logitsprocs=SimpleNamespace(argmax_invariant=[type("MinPLogitsProcessor", (), {
                      "min_p_count": 1})()], non_argmax_invariant=[]))):
        sm = sampling_metadata(True, **extra)
        with pytest.raises(NotImplementedError, match="does not map"):
            RejectionSampler()(md, None, logits, sm)
        assert RejectionSampler(fallback=Fallback())(md, None, logits, sm) == "vllm's output"
    assert len(calls) == 5
    with pytest.raises(NotImplementedError, match="rejection_sample_method='fly'"):
        RejectionSampler(None, SimpleNamespace(rejection_sample_method="fly"))
    fly = RejectionSampler(None, SimpleNamespace(rejection_sample_method="fly"), fallback=Fallback())
    assert fly(md, None, logits, sampling_metadata(True)) == "vllm's output"


# ----------------------------------------------------------------------------- random sampling (vLLM's cases)


# the Triton interpreter runs one shape, top_k and top_p (~0.1 s per request); a GPU all
@pytest.mark.parametrize("frac_seeded", [0.0, 0.5])
@pytest.mark.parametrize("backend,k,batch_size", backend_params([(1, 1), (3, 4), (5, 8)],
                                                                lambda b, row: b != "triton" or row == (3, 4)))
def test_deterministic_when_seeded(backend, k, batch_size, frac_seeded):
    """vLLM: seeded requests emit the same tokens every repetition (fresh generators with the
    same seeds), whatever the unseeded requests draw. Through forward: logits with bonus rows."""
    n_rep = 20 if backend == "torch" else 3
    vocab_size = 1000
    dev = BACKEND_DEVICES[backend]
    g = torch.Generator().manual_seed(k * 100 + batch_size)
    num_tokens = batch_size * k
    target_logits = torch.rand(num_tokens + batch_size, vocab_size, generator=g).to(dev)
    draft_token_ids = torch.randint(0, vocab_size, (batch_size, k), generator=g)
    seeded_mask = torch.rand(batch_size, generator=g) <= frac_seeded
    md = spec_decode_metadata(draft_token_ids.tolist(), dev)
    results = []
    with fastverify.use_backend(backend):
        for _ in range(n_rep):
            seeded = {i: torch.Generator(device=dev).manual_seed(i) for i in range(batch_size) if seeded_mask[i]}
            sm = sampling_metadata(False, temperature=torch.ones(batch_size, device=dev), generators=seeded)
            results.append(RejectionSampler()(md, None, target_logits, sm).sampled_token_ids.cpu())
    for i in range(batch_size):
        if seeded_mask[i]:
            assert all(torch.equal(r[i], results[0][i]) for r in results[1:])


def estimate_rejection_sampling_pdf(draft_probs, target_logits, k, vocab_size, num_samples, backend, seed):
    """vLLM's helper: histogram (density) of the tokens emitted at the draft positions of
    ``num_samples`` requests whose rows all hold ``target_logits`` and whose drafts were
    drawn from ``draft_probs``."""
    dev = BACKEND_DEVICES[backend]
    g = torch.Generator().manual_seed(seed)
    num_tokens = num_samples * k
    draft_token_ids = torch.multinomial(draft_probs.expand(num_samples, -1), k, replacement=True, generator=g)
    md = spec_decode_metadata(draft_token_ids.tolist(), dev)
    sm = sampling_metadata(False, temperature=torch.ones(num_samples, device=dev))
    with fastverify.use_backend(backend):
        out = rejection_sample(md.draft_token_ids, md.num_draft_tokens, md.max_spec_len, md.cu_num_draft_tokens,
                               draft_probs.expand(num_tokens, -1).contiguous().to(dev),
                               target_logits.expand(num_tokens, -1).contiguous().to(dev),
                               torch.zeros(num_samples, 1, dtype=torch.int64, device=dev), sm)
    tokens = out[:, :-1].flatten().float().cpu()
    return torch.histogram(tokens, bins=vocab_size, range=(0, vocab_size), density=True).hist


def test_rejection_sampling_approximates_target_distribution():
    """vLLM's convergence test with its sample sizes (torch backend: 111,110 requests): the
    distance to the target shrinks at least 20x faster than the distance to random laws."""
    torch.manual_seed(0)
    vocab_size, k = 10, 2
    g = torch.Generator().manual_seed(1)
    draft_probs = F.softmax(torch.rand(vocab_size, generator=g), -1)
    target_logits = torch.rand(vocab_size, generator=g)
    target_probs = F.softmax(target_logits, -1)
    reference_probs = F.softmax(torch.rand(100, vocab_size, generator=g), -1)
    d_ref, d_tgt = [], []
    for i, n in enumerate([10, 100, 1_000, 10_000, 100_000]):
        pdf = estimate_rejection_sampling_pdf(draft_probs, target_logits, k, vocab_size, n, "torch", seed=i)
        d_ref.append(torch.dist(reference_probs, pdf).item() / reference_probs.shape[0])
        d_tgt.append(torch.dist(target_probs, pdf).item())
    assert d_tgt[0] / d_tgt[-1] > 20 * d_ref[0] / d_ref[-1], (d_tgt, d_ref)


def masked_case_sizes(backend):
    """(vocab_size, num_draft_tokens, batch_size, target rows) of the top-k / top-p cases:
    vLLM's batch of 100 on torch, 4 requests on the interpreter and the emulator."""
    vocab_size, num_draft_tokens = 100, 3
    batch_size = 100 if backend == "torch" else 4
    return vocab_size, num_draft_tokens, batch_size, batch_size * (num_draft_tokens + 1)


def masked_logits_case(backend, target_logits, unmasked, sm, batch_size, num_draft_tokens, vocab_size):
    """vLLM's _test_masked_logits through forward: every emitted token lies in its row's
    unmasked set (here the bonus tokens too: the bonus rows carry their own sets)."""
    dev = BACKEND_DEVICES[backend]
    g = torch.Generator().manual_seed(2)
    num_tokens = batch_size * num_draft_tokens
    draft_probs = F.softmax(torch.rand(num_tokens, vocab_size, generator=g), -1)
    draft_token_ids = torch.multinomial(draft_probs, 1, generator=g).reshape(batch_size, num_draft_tokens)
    md = spec_decode_metadata(draft_token_ids.tolist(), dev)
    with fastverify.use_backend(backend):
        out = RejectionSampler()(md, draft_probs.to(dev), target_logits.to(dev), sm).sampled_token_ids.cpu()
    rows = md.target_logits_indices.tolist()
    bonus = md.bonus_logits_indices.tolist()
    for b in range(batch_size):
        for j, t in enumerate(out[b].tolist()):
            if t == PLACEHOLDER_TOKEN_ID:
                continue
            row = rows[b * num_draft_tokens + j] if j < num_draft_tokens else bonus[b]
            assert t in unmasked[row], (b, j, t)


@pytest.mark.parametrize("backend,top_k", backend_params([1, 5, 99], lambda b, row: b != "triton" or row == (5,)))
def test_top_k(backend, top_k):
    vocab_size, num_draft_tokens, batch_size, rows = masked_case_sizes(backend)
    g = torch.Generator().manual_seed(top_k)
    top_k_indices = torch.stack([torch.randperm(vocab_size, generator=g)[:top_k] for _ in range(rows)])
    target_logits = torch.zeros(rows, vocab_size)
    target_logits.scatter_add_(1, top_k_indices, torch.full(top_k_indices.shape, 0.1))
    dev = BACKEND_DEVICES[backend]
    sm = sampling_metadata(False, temperature=torch.ones(batch_size, device=dev),
                           top_k=torch.full((batch_size,), top_k, dtype=torch.int64, device=dev))
    masked_logits_case(backend, target_logits, [set(r) for r in top_k_indices.tolist()], sm, batch_size,
                       num_draft_tokens, vocab_size)


@pytest.mark.parametrize("backend,top_p", backend_params([0.5, 0.9, 0.99],
                                                         lambda b, row: b != "triton" or row == (0.9,)))
def test_top_p(backend, top_p):
    vocab_size, num_draft_tokens, batch_size, rows = masked_case_sizes(backend)
    target_logits = torch.randn(rows, vocab_size, generator=torch.Generator().manual_seed(int(top_p * 100)))
    logits_sort, logits_idx = target_logits.sort(dim=-1, descending=False)
    top_p_mask = logits_sort.softmax(-1).cumsum(-1) <= 1 - top_p
    top_p_mask[:, -1] = False
    unmasked = [set(logits_idx[i][~top_p_mask[i]].tolist()) for i in range(rows)]
    dev = BACKEND_DEVICES[backend]
    sm = sampling_metadata(False, temperature=torch.ones(batch_size, device=dev),
                           top_p=torch.full((batch_size,), top_p, dtype=torch.float32, device=dev))
    masked_logits_case(backend, target_logits, unmasked, sm, batch_size, num_draft_tokens, vocab_size)


@backends_and_entries
def test_placeholder_draft_token_rejected_random(backend, entry):
    """vLLM: a placeholder draft (-1) is rejected in random sampling and a valid token is
    emitted in its place."""
    vocab_size = 100
    spec_tokens = [[1, vocab_size - 1, PLACEHOLDER_TOKEN_ID]]
    output_tokens = [[1, vocab_size - 1, 7, 9]]
    dev = BACKEND_DEVICES[backend]
    sm = sampling_metadata(False, temperature=torch.ones(1, device=dev),
                           generators={0: torch.Generator(device=dev).manual_seed(0)})
    out = run_sampler(entry, backend, spec_tokens,
                      lambda bonus_rows: create_logits_tensor(output_tokens, vocab_size, None, dev, bonus_rows),
                      [9], sm)
    assert out[0, 0] == 1 and out[0, 1] == vocab_size - 1
    assert 0 <= int(out[0, 2]) < vocab_size and out[0, 3] == PLACEHOLDER_TOKEN_ID


@pytest.mark.parametrize("backend", BACKENDS)
def test_placeholder_draft_token_rejected_greedy(backend):
    """Greedy: a placeholder never equals the argmax: the argmax is emitted there."""
    for entry in ENTRIES:
        greedy_case(entry, backend, [[1, PLACEHOLDER_TOKEN_ID, 3]], [[1, 4, 3, 8]], [[1, 4, -1, -1]])


def test_placeholder_unchecked_path_matches():
    """Where value checks do not run (CUDA without FASTVERIFY_CHECKS) the op itself rejects
    the placeholder: the same tokens as the checked path's widened vocabulary."""
    p = random_batch(B=6, V=50, K=3, seed=5, placeholders=True)
    sm = sampling_metadata(False, temperature=torch.tensor([0.0, 1, 1, 0, 1, 1]), generators={
        i: torch.Generator().manual_seed(i) for i in range(6)})
    sm.all_random = False
    checked = call_rs(p, sm)
    sm.generators = {i: torch.Generator().manual_seed(i) for i in range(6)}
    with _unchecked():
        unchecked = call_rs(p, sm)
    assert torch.equal(checked, unchecked)


# ----------------------------------------------------------------------------- random batches and oracles


def random_batch(B=5, V=64, K=4, seed=0, hit_rate=0.6, placeholders=False, q=False, device="cpu"):
    """A ragged batch (some requests without drafts), drafts equal to the row argmax with
    probability ``hit_rate``, as vLLM hands it to rejection_sample."""
    g = torch.Generator().manual_seed(seed)
    num = torch.randint(0, K + 1, (B,), generator=g).tolist()
    num[0] = K
    N = sum(num)
    logits = torch.randn(N, V, generator=g) * 2
    drafts = torch.where(torch.rand(N, generator=g) < hit_rate, logits.argmax(1),
                         torch.randint(0, V, (N,), generator=g))
    if placeholders:
        drafts[torch.rand(N, generator=g) < 0.2] = PLACEHOLDER_TOKEN_ID
    return SimpleNamespace(
        drafts=drafts.to(device), num=num, K=K, cu=torch.tensor(list(itertools.accumulate(num)), dtype=torch.int32,
                                                                device=device),
        logits=logits.to(device), bonus=torch.randint(0, V, (B, 1), generator=g).to(device),
        draft_probs=F.softmax(torch.randn(N, V, generator=g), -1).to(device) if q else None,
        bonus_logits=(torch.randn(B, V, generator=g) * 2).to(device))


def call_rs(p, sm):
    return rejection_sample(p.drafts, p.num, p.K, p.cu, p.draft_probs, p.logits, p.bonus, sm)


def greedy_oracle(drafts, num, K, logits, bonus):
    """Plain Python: accept while the draft is the argmax, emit the argmax at the first
    mismatch or the bonus token after a full match; -1 padding."""
    rows, d, b = logits.tolist(), drafts.tolist(), bonus.flatten().tolist()
    out, r = [], 0
    for i, k in enumerate(num):
        row = []
        for j in range(k):
            a = max(range(len(rows[r + j])), key=lambda v: (rows[r + j][v], -v))
            row.append(a)
            if d[r + j] != a:
                break
        else:
            row.append(b[i])
        out.append(row + [-1] * (K + 1 - len(row)))
        r += k
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_matches_oracle(backend, seed):
    """All greedy, and greedy requests inside a mixed batch, equal the Python oracle."""
    dev = BACKEND_DEVICES[backend]
    p = random_batch(B=5, V=64, K=4, seed=seed, placeholders=seed == 2, q=seed == 1, device=dev)
    want = greedy_oracle(p.drafts.cpu(), p.num, p.K, p.logits.cpu(), p.bonus.cpu())
    with fastverify.use_backend(backend):
        assert call_rs(p, sampling_metadata(True)).tolist() == want
        temp = torch.tensor([0.0, 1.0, 0.0, 0.7, 0.0], device=dev)
        sm = sampling_metadata(False, temperature=temp)
        sm.all_random = False
        mixed = call_rs(p, sm).cpu()
    for b in (0, 2, 4):
        assert mixed[b].tolist() == want[b]


def per_row(logits, num_requests: int):
    """``logits [V]`` repeated for every row of ``num_requests`` requests."""
    return logits[None].expand(num_requests, -1).contiguous()


def first_token_counts(out, V):
    return np.bincount(out[:, 0].cpu().numpy(), minlength=V)


@pytest.mark.parametrize("backend", SMALL)
@pytest.mark.parametrize("with_draft_probs", [False, True])
def test_rejection_sample_goodness_of_fit(backend, with_draft_probs):
    """rejection_sample on vLLM-processed logits (temperature 0.6 divided in, top-k 5
    masked, as apply_sampling_constraints leaves them): the first emitted token follows the
    processed target law, with and without draft probabilities."""
    n = 4000 if backend == "torch" else 600
    V, K, T, top_k = 12, 2, 0.6, 5
    g = torch.Generator().manual_seed(11 + with_draft_probs)
    raw = torch.randn(V, generator=g) * 1.5
    law = np.array(naive.target_probs(raw.tolist(), T, top_k, 1.0))
    processed = raw / T
    processed[torch.argsort(raw, descending=True)[top_k:]] = float("-inf")
    q = F.softmax(torch.randn(V, generator=g), -1)
    drafts = torch.multinomial(q.expand(n, -1), K, replacement=True, generator=g).flatten()
    if not with_draft_probs:     # a deterministic drafter: often the mode, sometimes a masked token
        drafts = torch.where(torch.rand(n * K, generator=g) < 0.7, int(raw.argmax()), drafts)
    dev = BACKEND_DEVICES[backend]
    sm = sampling_metadata(False, temperature=torch.full((n,), T, device=dev))
    with fastverify.use_backend(backend):
        out = rejection_sample(drafts.to(dev), [K] * n, K, torch.arange(1, n + 1, dtype=torch.int32, device=dev) * K,
                               per_row(q, n * K).to(dev) if with_draft_probs else None,
                               per_row(processed, n * K).to(dev), torch.zeros(n, 1, dtype=torch.int64, device=dev), sm)
    assert_law(first_token_counts(out, V), law, f"first token ({backend}, draft_probs={with_draft_probs})")


@pytest.mark.parametrize("backend", SMALL)
@pytest.mark.parametrize("with_draft_probs", [False, True])
def test_forward_goodness_of_fit(backend, with_draft_probs):
    """RejectionSampler.forward on raw logits with temperature, top-k and top-p in the
    metadata: the first emitted token follows the processed law; requests whose drafts are
    certain to be accepted (target point mass) emit a bonus token that follows the bonus
    row's law. (The emulated cuda backend runs the temperature only: its top-k / top-p
    selects take minutes per thousand rows under the emulator; test_backends_agree covers
    them there.)"""
    n = 3000 if backend == "torch" else 500
    V, T = 12, 0.8
    top_k, top_p = (8, 0.9) if backend == "torch" else (0, 1.0)
    g = torch.Generator().manual_seed(21 + with_draft_probs)
    raw = torch.randn(V, generator=g) * 1.5
    law = np.array(naive.target_probs(raw.tolist(), T, top_k, top_p))
    q = F.softmax(torch.randn(V, generator=g), -1)
    sure = torch.full((V,), -1e4)
    sure[3] = 0.0                               # draft rows of the bonus half: token 3 for sure
    half = n // 2
    drafts = torch.cat([torch.multinomial(q.expand(half, -1), 1, generator=g).flatten(), torch.full((n - half,), 3)])
    # vLLM's layout: request b's draft row, then its bonus row
    logits = torch.stack([torch.cat([raw if b < half else sure, raw]) for b in range(n)]).view(2 * n, V)
    dev = BACKEND_DEVICES[backend]
    md = spec_decode_metadata(drafts[:, None].tolist(), dev)
    sm = sampling_metadata(False, temperature=torch.full((n,), T, device=dev),
                           top_k=torch.full((n,), top_k, dtype=torch.int32, device=dev) if top_k else None,
                           top_p=torch.full((n,), top_p, device=dev) if top_p < 1 else None)
    with fastverify.use_backend(backend):
        out = RejectionSampler()(md, per_row(q, n).to(dev) if with_draft_probs else None, logits.to(dev),
                                 sm).sampled_token_ids.cpu()
    assert_law(first_token_counts(out[:half], V), law, f"first token ({backend})")
    assert (out[half:, 0] == 3).all()
    assert_law(np.bincount(out[half:, 1].numpy(), minlength=V), law, f"bonus token ({backend})")


# ----------------------------------------------------------------------------- seeds and backends


@pytest.mark.parametrize("backend", BACKENDS)
def test_generator_reproducibility(backend):
    """Same generator seed -> same tokens; another seed -> other tokens; a generator
    advances once per call; requests without drafts and all-greedy calls leave theirs alone."""
    dev = BACKEND_DEVICES[backend]
    B = 3 if backend == "triton" else 8
    p = random_batch(B=B, V=200, K=3, seed=3, hit_rate=0.5, q=True, device=dev)
    p.num[1] = 0
    p.num[0] += len(p.drafts) - sum(p.num)          # keep N: request 0 takes request 1's drafts
    p.K = max(p.num)
    p.cu = torch.tensor(list(itertools.accumulate(p.num)), dtype=torch.int32, device=dev)
    temp = torch.ones(B, device=dev)

    def run(seeds):
        gens = {i: torch.Generator(device=dev).manual_seed(s) for i, s in enumerate(seeds)}
        with fastverify.use_backend(backend):
            return call_rs(p, sampling_metadata(False, temperature=temp, generators=gens)).cpu(), gens

    a, ga = run(range(B))
    b, _ = run(range(B))
    assert torch.equal(a, b)
    c, _ = run(range(100, 100 + B))
    assert not torch.equal(a, c)
    fresh = torch.Generator(device=dev).manual_seed(1)
    assert torch.equal(ga[1].get_state(), fresh.get_state())          # request 1 has no drafts
    assert not torch.equal(ga[0].get_state(), torch.Generator(device=dev).manual_seed(0).get_state())
    with fastverify.use_backend(backend):
        gens = {0: torch.Generator(device=dev).manual_seed(0)}
        call_rs(p, sampling_metadata(True, generators=gens))
    assert torch.equal(gens[0].get_state(), torch.Generator(device=dev).manual_seed(0).get_state())


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_backends_agree(backend):
    """Seeded requests emit the same tokens on every backend (same Philox bits), through
    both entry points, with draft probabilities, top-k and top-p."""
    dev = BACKEND_DEVICES[backend]
    p = random_batch(B=4, V=40, K=3, seed=9, q=True, placeholders=True)
    temp = torch.tensor([0.0, 1.0, 0.7, 1.3])
    outs = []
    for be, d in (("torch", "cpu"), (backend, dev)):
        def sm(**kw):
            return sampling_metadata(False, generators={i: torch.Generator(device=d).manual_seed(i) for i in range(4)},
                                     **kw)
        with fastverify.use_backend(be):
            rs = rejection_sample(p.drafts.to(d), p.num, p.K, p.cu.to(d), p.draft_probs.to(d), p.logits.to(d),
                                  p.bonus.to(d), sm(temperature=temp.to(d)))
            md = spec_decode_metadata_from(p, d)
            fw = RejectionSampler()(md, p.draft_probs.to(d), layout_with_bonus(p).to(d), sm(
                temperature=temp.to(d), top_k=torch.tensor([0, 5, 40, 3], dtype=torch.int32, device=d),
                top_p=torch.tensor([1.0, 0.8, 0.9, 1.0], device=d))).sampled_token_ids
        outs.append((rs.cpu(), fw.cpu()))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def spec_decode_metadata_from(p, device) -> SpecDecodeMetadata:
    spec, r = [], 0
    for k in p.num:
        spec.append(p.drafts[r:r + k].tolist())
        r += k
    return spec_decode_metadata(spec, device)


def layout_with_bonus(p) -> torch.Tensor:
    """vLLM's logits layout of a random_batch: each request's draft rows, then its bonus row."""
    rows, r = [], 0
    for b, k in enumerate(p.num):
        rows += [p.logits[r:r + k].cpu(), p.bonus_logits[b:b + 1].cpu()]
        r += k
    return torch.cat(rows)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("greedy", [True, False])
def test_forward_equals_rejection_sample(backend, greedy):
    """forward(raw logits with bonus rows; temperature and top-k in the metadata) ==
    rejection_sample(the same draft rows as apply_sampling_constraints leaves them, bonus
    tokens = forward's own bonus samples), with generators of the same seeds."""
    dev = BACKEND_DEVICES[backend]
    V = 48
    num = [3, 0, 1] if backend == "triton" else [3, 1, 0, 2, 3, 2]
    B, N = len(num), sum(num)
    g = torch.Generator().manual_seed(4)
    raw = torch.randn(N, V, generator=g) * 2
    drafts = torch.where(torch.rand(N, generator=g) < 0.6, raw.argmax(1), torch.randint(0, V, (N,), generator=g))
    dp = None if greedy else F.softmax(torch.randn(N, V, generator=g), -1)
    p = SimpleNamespace(num=num, drafts=drafts, logits=raw, bonus_logits=torch.randn(B, V, generator=g) * 2)
    temp = torch.zeros(B) if greedy else torch.linspace(0.5, 1.5, B)
    top_k = torch.tensor([0, 5, 10, 48, 2, 7][:B], dtype=torch.int32)
    req = torch.repeat_interleave(torch.arange(B), torch.tensor(num))            # [N]
    # apply_sampling_constraints: divide by the temperature, mask below the k-th largest
    k_eff = torch.where((top_k > 0) & (top_k < V), top_k, V)[req]
    kth = raw.sort(1, descending=True).values.gather(1, (k_eff - 1)[:, None].long())
    processed = raw if greedy else torch.where(raw >= kth, raw / temp[req][:, None], float("-inf"))

    def sm():
        return sampling_metadata(greedy, temperature=temp.to(dev), top_k=top_k.to(dev),
                                 generators={i: torch.Generator(device=dev).manual_seed(10 + i) for i in range(B)})

    md = spec_decode_metadata_from(p, dev)
    q = None if dp is None else dp.to(dev)
    with fastverify.use_backend(backend):
        fw = RejectionSampler()(md, q, layout_with_bonus(p).to(dev), sm()).sampled_token_ids.cpu()
        bonus = fw.gather(1, torch.tensor(num)[:, None])                         # what forward drew there
        rs = rejection_sample(md.draft_token_ids, md.num_draft_tokens, md.max_spec_len, md.cu_num_draft_tokens, q,
                              processed.to(dev), bonus.to(dev), sm()).cpu()
    assert torch.equal(fw, rs)


# ----------------------------------------------------------------------------- block verification (verify_method)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("greedy", [True, False])
def test_block_verify_method_is_the_ops_block_rule(backend, greedy):
    """spec_config.verify_method = "block" (vLLM PR 40819's knob) runs the op's block rule:
    forward and rejection_sample agree with each other as for the standard rule, and differ
    from it on random requests with draft probabilities."""
    dev = BACKEND_DEVICES[backend]
    V = 48
    num = [3, 0, 2] if backend == "triton" else [3, 1, 0, 2, 3, 2]
    B, N = len(num), sum(num)
    g = torch.Generator().manual_seed(5)
    raw = torch.randn(N, V, generator=g) * 2
    drafts = torch.where(torch.rand(N, generator=g) < 0.6, raw.argmax(1), torch.randint(0, V, (N,), generator=g))
    dp = F.softmax(torch.randn(N, V, generator=g), -1)
    p = SimpleNamespace(num=num, drafts=drafts, logits=raw, bonus_logits=torch.randn(B, V, generator=g) * 2)
    temp = torch.zeros(B) if greedy else torch.linspace(0.6, 1.4, B)
    req = torch.repeat_interleave(torch.arange(B), torch.tensor(num))

    def sm():
        return sampling_metadata(greedy, temperature=temp.to(dev),
                                 generators={i: torch.Generator(device=dev).manual_seed(30 + i) for i in range(B)})

    md = spec_decode_metadata_from(p, dev)
    block = SimpleNamespace(verify_method="block", rejection_sample_method="standard")
    with fastverify.use_backend(backend):
        fw = RejectionSampler(spec_config=block)(md, dp.to(dev), layout_with_bonus(p).to(dev), sm()).sampled_token_ids
        bonus = fw.cpu().gather(1, torch.tensor(num)[:, None])
        processed = raw if greedy else raw / temp[req][:, None]
        rs = rejection_sample(md.draft_token_ids, md.num_draft_tokens, md.max_spec_len, md.cu_num_draft_tokens,
                              dp.to(dev), processed.to(dev), bonus.to(dev), sm(), verify_method="block")
        # the same draws through fastverify's op with verify="block" (the seeds each generator gives)
        seed = torch.stack([torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64,
                                          generator=torch.Generator(device=dev).manual_seed(30 + i), device=dev)[0]
                            for i in range(B)])
        op_out, _ = fastverify.rejection_sample(
            layout_with_bonus(p).to(dev), md.draft_token_ids, fv._exclusive(md.cu_num_draft_tokens),
            draft_probs=dp.to(dev), temperature=temp.to(dev), seed=seed, positions=0,
            max_draft_len=md.max_spec_len, verify="block")
    assert torch.equal(fw.cpu(), rs.cpu())
    assert torch.equal(fw.cpu(), op_out.cpu())


@pytest.mark.parametrize("backend", SMALL)
def test_block_verify_method_goodness_of_fit(backend):
    """rejection_sample(verify_method="block") on vLLM-processed logits: the first emitted
    token follows the processed target law."""
    n = 4000 if backend == "torch" else 600
    V, K, T = 12, 3, 0.7
    g = torch.Generator().manual_seed(17)
    raw = torch.randn(V, generator=g) * 1.5
    law = np.array(naive.target_probs(raw.tolist(), T, 0, 1.0))
    q = F.softmax(raw / T + torch.randn(V, generator=g), -1)
    drafts = torch.multinomial(q.expand(n, -1), K, replacement=True, generator=g).flatten()
    dev = BACKEND_DEVICES[backend]
    sm = sampling_metadata(False, temperature=torch.full((n,), T, device=dev))
    with fastverify.use_backend(backend):
        out = rejection_sample(drafts.to(dev), [K] * n, K, torch.arange(1, n + 1, dtype=torch.int32, device=dev) * K,
                               per_row(q, n * K).to(dev), per_row(raw / T, n * K).to(dev),
                               torch.zeros(n, 1, dtype=torch.int64, device=dev), sm, verify_method="block")
    assert_law(first_token_counts(out, V), law, f"first token ({backend}, block)")


def test_unknown_verify_method_is_named():
    with pytest.raises(ValueError, match="spec_config.verify_method must be one of 'standard', 'block'"):
        RejectionSampler(spec_config=SimpleNamespace(verify_method="tree"))
    with pytest.raises(ValueError, match="verify_method must be one of"):
        rejection_sample(**_rs_args(), verify_method="typical")


# ----------------------------------------------------------------------------- no host synchronisation

_HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero")


@contextlib.contextmanager
def _no_host_reads():
    """Every Tensor method that reads data back to the host raises inside the block."""
    saved = {name: getattr(torch.Tensor, name) for name in _HOST_READS}

    def forbid(name):
        def raiser(*args, **kwargs):
            raise AssertionError(f"host read on the hot path: Tensor.{name}")
        return raiser

    try:
        for name in _HOST_READS:
            setattr(torch.Tensor, name, forbid(name))
        yield saved
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


@contextlib.contextmanager
def _unchecked():
    """The CUDA hot path on CPU tensors: value checks off (as on CUDA without
    FASTVERIFY_CHECKS), in the adapter and in the op."""
    real_checks, real_op = _backend.value_checks_enabled, fastverify.rejection_sample
    _backend.value_checks_enabled = lambda t: False
    try:
        yield
    finally:
        _backend.value_checks_enabled = real_checks
        fastverify.rejection_sample = real_op


def _hot_path_calls(device):
    """Calls through both entry points covering every branch: greedy, random, mixed,
    draft_probs, top-k / top-p, seeded and unseeded requests, a request without drafts."""
    V, B = 32, 3
    spec = [[1, 2, 3], [], [4, 5]]
    md = spec_decode_metadata(spec, device)
    N = 5
    logits = torch.randn(N + B, V).to(device)
    dp = F.softmax(torch.randn(N, V), -1).to(device)
    gens = {0: torch.Generator().manual_seed(0), 2: torch.Generator().manual_seed(2)}
    temp = torch.tensor([0.0, 0.8, 1.0]).to(device)
    sms = [sampling_metadata(True),
           sampling_metadata(False, temperature=temp, generators=gens,
                             top_k=torch.tensor([0, 4, 9], dtype=torch.int32).to(device),
                             top_p=torch.tensor([1.0, 0.9, 0.5]).to(device))]
    sms[1].all_random = False
    calls = []
    for sm, q in itertools.product(sms, (None, dp)):
        calls.append(lambda sm=sm, q=q: rejection_sample(md.draft_token_ids, md.num_draft_tokens, md.max_spec_len,
                                                         md.cu_num_draft_tokens, q, logits[:N], torch.zeros(
                                                             B, 1, dtype=torch.int64, device=device), sm))
        calls.append(lambda sm=sm, q=q: RejectionSampler()(md, q, logits, sm).sampled_token_ids)
    return calls


def test_no_host_sync_meta():
    """On meta tensors (no data: any host read, nonzero, boolean-mask indexing or
    data-dependent shape raises) both entry points run to the op's fake kernel and return
    the right shapes."""
    with _no_host_reads():
        for call in _hot_path_calls("meta"):
            out = call()
            assert out.shape == (3, 4) and out.dtype == torch.int32 and out.device.type == "meta"


def test_no_host_sync_cpu():
    """On CPU tensors, with value checks off as on the CUDA hot path, the adapters read
    nothing back to the host outside the op (patched Tensor methods raise)."""
    with _unchecked():
        real_op = fastverify.rejection_sample

        def op_with_host_reads_allowed(*args, **kwargs):
            for name, fn in saved.items():
                setattr(torch.Tensor, name, fn)
            try:
                return real_op(*args, **kwargs)
            finally:
                for name in _HOST_READS:
                    setattr(torch.Tensor, name, forbidden[name])

        fastverify.rejection_sample = op_with_host_reads_allowed
        with _no_host_reads() as saved:
            forbidden = {name: getattr(torch.Tensor, name) for name in _HOST_READS}
            for call in _hot_path_calls("cpu"):
                assert call().shape == (3, 4)


# ----------------------------------------------------------------------------- bad input


def _rs_args(**change):
    md = spec_decode_metadata([[1, 2], [3]], "cpu")
    args = dict(draft_token_ids=md.draft_token_ids, num_draft_tokens=md.num_draft_tokens, max_spec_len=2,
                cu_num_draft_tokens=md.cu_num_draft_tokens, draft_probs=None, target_logits=torch.randn(3, 10),
                bonus_token_ids=torch.zeros(2, 1, dtype=torch.int64), sampling_metadata=sampling_metadata(
                    False, temperature=torch.ones(2)))
    args.update(change)
    return args


@pytest.mark.parametrize("change,error,match", [
    (dict(draft_token_ids=torch.tensor([[1, 2, 3]])), ValueError, "draft_token_ids must have 1 dimension"),
    (dict(draft_token_ids=torch.tensor([1.0, 2, 3])), ValueError, "draft_token_ids must be int32/int64"),
    (dict(draft_token_ids=torch.tensor([1, 2, 10])), ValueError, r"draft_token_ids\[2\] = 10 is outside"),
    (dict(draft_token_ids=torch.tensor([1, -1, 10])), ValueError, r"draft_token_ids\[2\] = 10 is outside"),
    (dict(num_draft_tokens=torch.tensor([2, 1])), TypeError, "num_draft_tokens must be a list"),
    (dict(num_draft_tokens=[2, 2]), ValueError, "num_draft_tokens sums to 4 but draft_token_ids holds 3"),
    (dict(num_draft_tokens=[3, 0], max_spec_len=3), ValueError,
     "cu_num_draft_tokens = \\[2, 3\\] must be the inclusive"),
    (dict(max_spec_len=1), ValueError, "a request has 2 drafts .* max_spec_len is 1"),
    (dict(max_spec_len=-1), ValueError, "max_spec_len must be an int >= 0"),
    (dict(cu_num_draft_tokens=torch.tensor([0, 2, 3], dtype=torch.int32)), ValueError,
     r"cu_num_draft_tokens must have shape \[2\]"),
    (dict(cu_num_draft_tokens=torch.tensor([2.0, 3.0])), ValueError, "cu_num_draft_tokens must be int32/int64"),
    (dict(cu_num_draft_tokens=torch.tensor([1, 3], dtype=torch.int32)), ValueError,
     "must be the inclusive cumulative sum"),
    (dict(target_logits=torch.randn(5, 10)), ValueError, "target_logits must have one row per draft token"),
    (dict(target_logits=torch.zeros(3, 10, dtype=torch.int64)), ValueError, "target_logits must be float32"),
    (dict(target_logits=torch.randn(3, 10, 2)), ValueError, "target_logits must have 2 dimension"),
    (dict(draft_probs=torch.rand(3, 11)), ValueError, r"draft_probs must have shape \[3, 10\]"),
    (dict(draft_probs=torch.full((3, 10), 0.5)), ValueError, r"draft_probs\[0\] sums to 5"),
    (dict(bonus_token_ids=torch.zeros(2, 2, dtype=torch.int64)), ValueError,
     r"bonus_token_ids must have shape \[2, 1\]"),
    (dict(bonus_token_ids=torch.zeros(2, 1)), ValueError, "bonus_token_ids must be int32/int64"),
    (dict(bonus_token_ids=torch.zeros(2, 1, dtype=torch.int64, device="meta")), ValueError,
     "bonus_token_ids is on meta"),
    (dict(sampling_metadata=SimpleNamespace(all_greedy=True)), TypeError, "sampling_metadata has no attribute"),
    (dict(sampling_metadata=sampling_metadata(False)), ValueError, "sampling_metadata.temperature is None"),
    (dict(sampling_metadata=sampling_metadata(False, temperature=torch.ones(3))), ValueError,
     r"sampling_metadata.temperature must have shape \[2\]"),
    (dict(sampling_metadata=sampling_metadata(False, temperature=torch.ones(2), generators={5: torch.Generator()})),
     ValueError, "sampling_metadata.generators has key 5"),
])
def test_rejection_sample_bad_input(change, error, match):
    with pytest.raises(error, match=match):
        rejection_sample(**_rs_args(**change))


def _fw_call(md_change=(), sm=None, logits=None, draft_probs=None):
    md = spec_decode_metadata([[1, 2], [3]], "cpu")
    for k, v in dict(md_change).items():
        setattr(md, k, v)
    sm = sm or sampling_metadata(False, temperature=torch.ones(2))
    return RejectionSampler()(md, draft_probs, torch.randn(5, 10) if logits is None else logits, sm)


@pytest.mark.parametrize("kw,error,match", [
    (dict(md_change={"target_logits_indices": torch.tensor([0, 1])}), ValueError,
     r"metadata.target_logits_indices must have shape \[3\]"),
    (dict(md_change={"bonus_logits_indices": torch.tensor([2, 9])}), ValueError,
     r"metadata.bonus_logits_indices = \[2, 9\] must index rows of logits \[0, 5\)"),
    (dict(md_change={"draft_token_ids": torch.tensor([1, 2, 30])}), ValueError,
     r"metadata.draft_token_ids\[2\] = 30 is outside"),
    (dict(md_change={"cu_num_draft_tokens": torch.tensor([3, 3], dtype=torch.int32)}), ValueError,
     "metadata.cu_num_draft_tokens = \\[3, 3\\] must be the inclusive"),
    (dict(md_change={"max_spec_len": 1}), ValueError, "metadata.max_spec_len is 1"),
    (dict(logits=torch.randn(5)), ValueError, "logits must have 2 dimension"),
    (dict(draft_probs=torch.rand(2, 10)), ValueError, r"draft_probs must have shape \[3, 10\]"),
    (dict(sm=sampling_metadata(False, temperature=torch.tensor([1.0, -1.0]))), ValueError,
     "sampling_metadata.temperature must be finite and >= 0"),
    (dict(sm=sampling_metadata(False, temperature=torch.ones(2), top_k=torch.ones(2))), ValueError,
     "sampling_metadata.top_k must be int32/int64"),
    (dict(sm=sampling_metadata(False, temperature=torch.ones(2), top_p=torch.zeros(2))), ValueError,
     r"sampling_metadata.top_p must be in \(0, 1\]"),
    (dict(sm=sampling_metadata(False, temperature=torch.ones(2), top_k=torch.tensor([-1, 3]))), ValueError,
     "sampling_metadata.top_k must be >= 0"),
])
def test_forward_bad_input(kw, error, match):
    with pytest.raises(error, match=match):
        _fw_call(**kw)


def test_forward_bad_metadata_object():
    with pytest.raises(TypeError, match="metadata has no attribute 'bonus_logits_indices'"):
        RejectionSampler()(SimpleNamespace(draft_token_ids=torch.tensor([1]), num_draft_tokens=[1], max_spec_len=1,
                                           cu_num_draft_tokens=torch.tensor([1], dtype=torch.int32),
                                           target_logits_indices=torch.tensor([0])),
                           None, torch.randn(2, 10), sampling_metadata(True))


# ----------------------------------------------------------------------------- parse_output and the plugin


def test_parse_output():
    """vLLM's parse_output: -1 and ids >= vocab_size dropped, discarded rows empty."""
    out = torch.tensor([[1, 5, -1], [3, 4, 7], [2, 120, -1]], dtype=torch.int32)
    assert RejectionSampler.parse_output(out, 100) == ([[1, 5], [3, 4, 7], [2]], None)
    assert RejectionSampler.parse_output(out, 100, [1]) == ([[1, 5], [], [2]], None)

    class Logprobs:             # vLLM's LogprobsTensors: filter by the flat mask, then tolists
        def filter(self, mask):
            self.mask = mask.tolist()
            return self

        def tolists(self, cu):
            return ("lists", cu)

    lp = Logprobs()
    assert RejectionSampler.parse_output(out, 100, (), lp)[1] == ("lists", [0, 2, 5, 6])
    assert lp.mask == [True, True, False, True, True, True, True, False, False]


def test_register_without_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)        # import vllm raises ImportError
    assert fv.register() is False


def test_register_with_vllm(monkeypatch):
    """register() swaps vLLM's RejectionSampler where the model runner finds it, builds
    vLLM's own as the fallback, and returns vLLM's SamplerOutput."""
    class VllmRejectionSampler(torch.nn.Module):
        def __init__(self, sampler, spec_config=None, device=None):
            super().__init__()
            self.args = (sampler, spec_config, device)

        def forward(self, *args):
            return "vllm's output"

    @dataclass
    class VllmSamplerOutput:
        sampled_token_ids: torch.Tensor
        logprobs_tensors: object

    mods = {name: types.ModuleType(name) for name in (
        "vllm", "vllm.v1", "vllm.v1.sample", "vllm.v1.sample.rejection_sampler", "vllm.v1.outputs",
        "vllm.v1.worker", "vllm.v1.worker.gpu_model_runner")}
    mods["vllm.v1.sample.rejection_sampler"].RejectionSampler = VllmRejectionSampler
    mods["vllm.v1.worker.gpu_model_runner"].RejectionSampler = VllmRejectionSampler
    mods["vllm.v1.outputs"].SamplerOutput = VllmSamplerOutput
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(mods[parent], child, mod)
    monkeypatch.setattr(fv, "_output_cls", fv._output_cls)
    assert fv.register() is True and fv.register() is True
    cls = mods["vllm.v1.worker.gpu_model_runner"].RejectionSampler
    assert cls is mods["vllm.v1.sample.rejection_sampler"].RejectionSampler and cls is not VllmRejectionSampler
    assert issubclass(cls, RejectionSampler)
    sampler = cls("the sampler", None, torch.device("cpu"))       # as the model runner builds it
    assert isinstance(sampler.fallback, VllmRejectionSampler) and sampler.fallback.args[0] == "the sampler"
    md = spec_decode_metadata([[1, 2]], "cpu")
    logits = create_logits_tensor([[1, 2, 3]], bonus_rows=True)
    out = sampler(md, None, logits, sampling_metadata(True))
    assert isinstance(out, VllmSamplerOutput) and out.sampled_token_ids.tolist() == [[1, 2, 3]]
    assert sampler(md, None, logits, sampling_metadata(True, no_penalties=False)) == "vllm's output"


# ----------------------------------------------------------------------------- opt-in: vLLM's own kernels

VLLM_SRC = os.environ.get("FASTVERIFY_VLLM_SRC")


def _stub_module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    mod.__getattr__ = lambda attr: SimpleNamespace(name=f"{name}.{attr}")   # anything else: an inert stand-in
    return mod


def _launcher(*, warmup_inputs, kernel=None):
    """vLLM's triton_kernel_dispatcher_with_warmup without the warmup: the dispatch function
    returns (grid, constexprs); arguments bind to the kernel by name (x or x_ptr)."""
    def decorate(dispatch):
        sig = inspect.signature(dispatch)

        def launch(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            grid, consts = dispatch(*args, **kwargs)[:2]
            kw = {}
            for name, value in bound.arguments.items():
                for k in (name, name + "_ptr"):
                    if k in kernel.arg_names:
                        kw[k] = value
            kernel[grid](**kw, **consts)
        launch.register_warmup = lambda **kw: None
        return launch
    return decorate


@pytest.fixture
def vllm_rejection_sampler(monkeypatch):
    """vLLM 0.33.0's vllm/v1/sample/rejection_sampler.py from FASTVERIFY_VLLM_SRC, with stubs
    for the imports its rejection_sample does not use."""
    path = os.path.join(VLLM_SRC, "vllm", "v1", "sample", "rejection_sampler.py")
    if not os.path.exists(path):
        pytest.skip(f"FASTVERIFY_VLLM_SRC={VLLM_SRC} holds no vllm/v1/sample/rejection_sampler.py")
    import triton
    import triton.language as tl
    stubs = {
        "vllm.config.model": dict(PROCESSED_LOGPROBS_MODES=("processed_logprobs", "processed_logits")),
        "vllm.logger": dict(init_logger=lambda name: SimpleNamespace(info=print, warning=print, debug=print)),
        "vllm.model_executor.warmup.jit_warmup_triton_helper": dict(triton_kernel_dispatcher_with_warmup=_launcher),
        "vllm.triton_utils": dict(triton=triton, tl=tl),
    }
    for name in ("vllm", "vllm.config", "vllm.model_executor", "vllm.model_executor.warmup",
                 "vllm.model_executor.warmup.jit_warmup", "vllm.utils", "vllm.utils.torch_utils", "vllm.v1",
                 "vllm.v1.outputs", "vllm.v1.sample", "vllm.v1.sample.logits_processor",
                 "vllm.v1.sample.logits_processor.builtin", "vllm.v1.sample.metadata", "vllm.v1.sample.ops",
                 "vllm.v1.sample.ops.bad_words", "vllm.v1.sample.ops.penalties", "vllm.v1.sample.ops.topk_topp_sampler",
                 "vllm.v1.sample.sampler", "vllm.v1.spec_decode", "vllm.v1.spec_decode.fly",
                 "vllm.v1.spec_decode.metadata", "vllm.v1.spec_decode.utils", *stubs):
        monkeypatch.setitem(sys.modules, name, _stub_module(name, **stubs.get(name, {})))
    spec = importlib.util.spec_from_file_location("vllm.v1.sample.rejection_sampler", path)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)
    spec.loader.exec_module(mod)
    return mod


def _vllm_call(fn, p, sm):
    return fn(p.drafts, p.num, p.K, p.cu, p.draft_probs, p.logits, p.bonus, sm)


@pytest.mark.skipif(not VLLM_SRC or torch.cuda.is_available(),
                    reason="opt-in: FASTVERIFY_VLLM_SRC=<extracted vLLM 0.33.0 wheel>, CPU (Triton interpreter)")
def test_side_by_side_with_vllm_kernels(vllm_rejection_sampler):
    """vLLM's own Triton rejection sampler (interpreted) and the adapter on identical inputs:
    greedy outputs identical; sampled first tokens follow the same law (each against the
    target law, and against each other)."""
    vllm_rs = vllm_rejection_sampler.rejection_sample
    for seed in range(4):        # greedy: identical, placeholders and draft-less requests included
        p = random_batch(B=6, V=50, K=3, seed=seed, placeholders=seed % 2 == 1)
        sm = sampling_metadata(True)
        assert torch.equal(_vllm_call(vllm_rs, p, sm), call_rs(p, sm))
        temp = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0])
        sm = sampling_metadata(False, temperature=temp)
        sm.all_random = False
        mixed_v, mixed_f = _vllm_call(vllm_rs, p, sm), call_rs(p, sm)
        assert torch.equal(mixed_v[::2], mixed_f[::2])
    n, V, K = 1500, 8, 2
    g = torch.Generator().manual_seed(7)
    raw = torch.randn(V, generator=g) * 1.5
    law = np.array(naive.target_probs(raw.tolist(), 1.0))
    q = F.softmax(torch.randn(V, generator=g), -1)
    for with_q in (False, True):
        drafts = torch.multinomial(q.expand(n, -1), K, replacement=True, generator=g).flatten()
        p = SimpleNamespace(drafts=drafts, num=[K] * n, K=K, cu=torch.arange(1, n + 1, dtype=torch.int32) * K,
                            draft_probs=per_row(q, n * K) if with_q else None, logits=per_row(raw, n * K),
                            bonus=torch.zeros(n, 1, dtype=torch.int64))
        sm = sampling_metadata(False, temperature=torch.ones(n))
        torch.manual_seed(with_q)
        counts = [first_token_counts(_vllm_call(vllm_rs, p, sm), V), first_token_counts(call_rs(p, sm), V)]
        for c, who in zip(counts, ("vLLM", "fastverify")):
            assert_law(c, law, f"{who} first token (draft_probs={with_q})")
        table = np.array(counts)
        assert chi2_contingency(table[:, table.sum(0) > 0]).pvalue > 1e-3
