"""vLLM entry points: vLLM 0.33.0's rejection sampler on fastverify's fused op.

Drop-in stand-ins for ``rejection_sample`` and ``RejectionSampler`` of
``vllm/v1/sample/rejection_sampler.py`` (vLLM 0.33.0; layouts of ``SpecDecodeMetadata``,
``vllm/v1/spec_decode/metadata.py``, and ``SamplingMetadata``, ``vllm/v1/sample/metadata.py``)::

    # in place of: from vllm.v1.sample.rejection_sampler import rejection_sample
    from fastverify.integrations.vllm import rejection_sample

or, for a whole vLLM server, the general plugin :func:`register` (entry point group
``vllm.general_plugins``), which puts :class:`RejectionSampler` where vLLM's model runner
looks for its own.

Layouts (B requests, request b with K_b = ``num_draft_tokens[b]`` drafts, N = Σ K_b, V vocab):

- ``draft_token_ids [N]`` int32/int64, flattened; ``cu_num_draft_tokens [B]`` int32, vLLM's
  *inclusive* cumulative sum (request b owns drafts ``cu[b-1] .. cu[b] - 1``).
- ``rejection_sample``: ``target_logits [N, V]``, no bonus rows; ``bonus_token_ids [B, 1]``.
- ``RejectionSampler.forward``: ``logits [N + B, V]`` with the bonus rows, found through
  ``metadata.target_logits_indices [N]`` and ``metadata.bonus_logits_indices [B]``.
- Output ``[B, max_spec_len + 1]`` int32: accepted drafts, then the recovered or bonus
  token, then ``PLACEHOLDER_TOKEN_ID`` (-1).

Semantics mapped (what vLLM's Triton kernels compute, on fastverify's op):

- vLLM calls ``rejection_sample`` with logits that ``apply_sampling_constraints`` has
  already processed: rows of random requests divided by their temperature, top-k and top-p
  applied (masked to -inf); greedy rows untouched. vLLM then takes their plain softmax
  (random) or argmax (greedy). So ``rejection_sample`` runs the op with temperature 1 for
  random requests, 0 for greedy ones (``sampling_metadata.temperature == 0``), and no
  top-k / top-p: the same target distributions, without the fp32 probabilities tensor vLLM
  writes. ``RejectionSampler.forward`` passes the raw logits with the requests' own
  temperature, top-k and top-p: the op applies them in its fused pass (vLLM's order:
  temperature, top-k, top-p; top-k of V or more and top-p of 1 are off).
- Random requests: accept draft x with probability min(1, p(x) / q(x)) (q ≡ 1 at x without
  ``draft_probs``); at the first rejection emit a token from normalize(max(p - q, 0)) (without
  ``draft_probs``: p with x left out); if all are accepted, the bonus token. Greedy requests
  accept iff the draft is the argmax and emit the argmax at the first mismatch. vLLM draws
  the recovered token by an exponential race and fastverify by an inverse CDF: the same
  distribution, not the same tokens.
- Bonus: ``rejection_sample`` writes ``bonus_token_ids`` after a request whose drafts were all
  accepted (the op's own bonus sample, from a stand-in row, is discarded); ``forward``
  emits the op's sample from the bonus row, which is what vLLM's ``Sampler`` draws there
  (same temperature, top-k, top-p).
- Randomness: fastverify's counter RNG is keyed by a per-request int64 seed. A request with
  its own ``torch.Generator`` (``sampling_metadata.generators[b]``) gets one int64 drawn
  from that generator per call (on the generator's device, no host read), so a seeded
  request is reproducible and its generator advances once per call. As in vLLM,
  ``rejection_sample`` draws nothing for a request without drafts, and nothing at all when
  every request is greedy. Other requests get seeds from the device's default generator.
  Positions are 0: the seed is fresh every call.
- Placeholder drafts (id < 0, vLLM's -1 padding) are rejected and the token is drawn from p.
  Where value checks run (CPU tensors, or ``FASTVERIFY_CHECKS=1``) they are found on the
  host and verified against a vocabulary widened by one masked column (so the op's checks
  accept them); on the unchecked CUDA hot path the op itself treats an out-of-range id as a
  rejected draft. With ``draft_probs``, vLLM draws the token at a placeholder from
  max(p - q, 0) of the padding row; here from p.

No host synchronisation on the hot path (no ``.item()``, ``.tolist()``, ``nonzero``,
boolean indexing or data-dependent shapes): the bonus-row layout is one ``index_select``
and every output shape follows from ``num_draft_tokens`` (a host list in vLLM) and tensor
shapes. Host-side checks (shapes, dtypes, devices, the host lists) always run and raise
``ValueError`` naming vLLM's argument; value checks (ids in range, ``cu_num_draft_tokens``
consistent with ``num_draft_tokens``) run where fastverify's value checks run.

- Block verification: the verification rule of vLLM's speculative config
  (``SpeculativeConfig.verify_method``, "standard" or "block": vLLM PR 40819 for V1, merged
  as block verification in Model Runner V2) maps to the op's ``verify="token"`` /
  ``"block"`` (``RejectionSampler`` reads it from ``spec_config``; ``rejection_sample``
  takes it as the keyword ``verify_method``). Drafts without ``draft_probs`` are verified
  by block verification's point-mass limit (whose accepted length has the token rule's
  law) where vLLM falls back to the standard rule: the same output distribution.

Not mapped: vLLM's FLy and synthetic rejection modes, logits processors (penalties, bad
words, allowed-token masks, min-p, logit bias, min-tokens, thinking budget) and logprobs.
``RejectionSampler`` hands such batches to ``fallback`` (vLLM's own sampler, when installed
by :func:`register`) and raises ``NotImplementedError`` without one. ``rejection_sample``
needs none of them: it receives logits vLLM has processed already.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

import fastverify
from fastverify import _backend

__all__ = ["rejection_sample", "RejectionSampler", "SamplerOutput", "register", "PLACEHOLDER_TOKEN_ID"]

PLACEHOLDER_TOKEN_ID = -1
GREEDY_TEMPERATURE = 0
_SEED_HIGH = 2**63 - 1            # seeds drawn in [0, 2^63 - 1)
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_INTS = (torch.int32, torch.int64)


@dataclasses.dataclass
class SamplerOutput:
    """vLLM's ``SamplerOutput`` (``vllm/v1/outputs.py``) where vLLM is absent; :func:`register`
    makes :class:`RejectionSampler` return vLLM's own class."""

    sampled_token_ids: torch.Tensor      # [B, max_spec_len + 1] int32, -1 padded
    logprobs_tensors: Any = None


_output_cls: type = SamplerOutput


# --------------------------------------------------------------------------- host-side checks


def _check_tensor(t, name: str, *, ndim: int, dtypes, device=None, shape=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        names = "/".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must be {names}, got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, but the logits are on {device}")
    if shape is not None and any(w is not None and g != w for g, w in zip(t.shape, shape)):
        want = "[" + ", ".join("*" if w is None else str(w) for w in shape) + "]"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")


def _check_drafts(draft_token_ids, num_draft_tokens, max_spec_len, cu_num_draft_tokens, draft_probs, V, dev,
                  p: str = "") -> tuple[int, int]:
    """(B, N) after the checks of the draft arguments; ``p`` prefixes the names ("metadata.")."""
    if isinstance(num_draft_tokens, torch.Tensor) or not isinstance(num_draft_tokens, Sequence):
        raise TypeError(f"{p}num_draft_tokens must be a list of ints (vLLM keeps it on the host), got "
                        f"{type(num_draft_tokens).__name__}")
    B = len(num_draft_tokens)
    if isinstance(max_spec_len, bool) or not isinstance(max_spec_len, int) or max_spec_len < 0:
        raise ValueError(f"{p}max_spec_len must be an int >= 0, got {max_spec_len!r}")
    _check_tensor(draft_token_ids, f"{p}draft_token_ids", ndim=1, dtypes=_INTS, device=dev)
    N = draft_token_ids.shape[0]
    if any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in num_draft_tokens):
        raise ValueError(f"{p}num_draft_tokens must hold ints >= 0, got {list(num_draft_tokens)}")
    if sum(num_draft_tokens) != N:
        raise ValueError(f"{p}num_draft_tokens sums to {sum(num_draft_tokens)} but {p}draft_token_ids holds {N} "
                         "tokens")
    if B and max(num_draft_tokens) > max_spec_len:
        raise ValueError(f"a request has {max(num_draft_tokens)} drafts ({p}num_draft_tokens) but "
                         f"{p}max_spec_len is {max_spec_len}")
    _check_tensor(cu_num_draft_tokens, f"{p}cu_num_draft_tokens", ndim=1, dtypes=_INTS, device=dev, shape=(B,))
    if draft_probs is not None:
        _check_tensor(draft_probs, "draft_probs", ndim=2, dtypes=_FLOATS, device=dev, shape=(N, V))
    return B, N


def _check_sampling(sm, B: int, dev, forward: bool) -> None:
    """``sampling_metadata`` read by attribute: all_greedy, all_random, temperature, top_k,
    top_p, generators."""
    for attr in ("all_greedy", "all_random", "temperature", "generators") + (("top_k", "top_p") if forward else ()):
        if not hasattr(sm, attr):
            raise TypeError(f"sampling_metadata has no attribute {attr!r} (vLLM's SamplingMetadata has)")
    if not sm.all_greedy:
        if sm.temperature is None:
            raise ValueError("sampling_metadata.temperature is None but sampling_metadata.all_greedy is False")
        _check_tensor(sm.temperature, "sampling_metadata.temperature", ndim=1, dtypes=_FLOATS, device=dev,
                      shape=(B,))
    if forward:
        if sm.top_k is not None:
            _check_tensor(sm.top_k, "sampling_metadata.top_k", ndim=1, dtypes=_INTS, device=dev, shape=(B,))
        if sm.top_p is not None:
            _check_tensor(sm.top_p, "sampling_metadata.top_p", ndim=1, dtypes=_FLOATS, device=dev, shape=(B,))
    for i, g in (sm.generators or {}).items():
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < B:
            raise ValueError(f"sampling_metadata.generators has key {i!r}: keys are request indices in [0, {B})")
        if not isinstance(g, torch.Generator):
            raise TypeError(f"sampling_metadata.generators[{i}] must be a torch.Generator, got {type(g).__name__}")


def _check_cu_values(cu_num_draft_tokens, num_draft_tokens, name: str) -> None:
    """Value check (a host read; runs where fastverify's value checks run): the inclusive
    cumulative sum of ``num_draft_tokens``."""
    want = list(itertools.accumulate(num_draft_tokens))
    got = cu_num_draft_tokens.tolist()
    if got != want:
        raise ValueError(f"{name} = {got} must be the inclusive cumulative sum of num_draft_tokens = {want}")


# --------------------------------------------------------------------------- the shared core

# fastverify's argument names -> vLLM's, for the op's own (value) errors
_NAMES = {"draft_tokens": "draft_token_ids", "cu_num_draft": "cu_num_draft_tokens (with a leading 0)",
          "max_draft_len": "max_spec_len", "temperature": "sampling_metadata.temperature",
          "top_k": "sampling_metadata.top_k", "top_p": "sampling_metadata.top_p"}
_NAME_RE = re.compile(r"\b(" + "|".join(_NAMES) + r")\b")


def _exclusive(cu_inclusive: torch.Tensor) -> torch.Tensor:
    """vLLM's inclusive [B] -> fastverify's exclusive [B + 1] int32."""
    return torch.nn.functional.pad(cu_inclusive.to(torch.int32), (1, 0))


def _seeds(sm, num_draft_tokens, B: int, dev, skip_empty: bool) -> torch.Tensor:
    """[B] int64 Philox seeds: one draw from each request's own generator, the device's
    default generator for the rest."""
    seed = torch.randint(0, _SEED_HIGH, (B,), dtype=torch.int64, device=dev)
    for i, g in (sm.generators or {}).items():
        if skip_empty and num_draft_tokens[i] == 0:
            continue    # as vLLM: a request without drafts leaves its generator as it was
        seed[i:i + 1].copy_(torch.randint(0, _SEED_HIGH, (1,), dtype=torch.int64, device=g.device, generator=g),
                            non_blocking=True)
    return seed


# vLLM's SpeculativeConfig.verify_method -> fastverify's verify=
VERIFY_METHODS = {"standard": "token", "block": "block"}


def _rule(verify_method, name: str) -> str:
    if verify_method is None:
        return "token"
    if verify_method not in VERIFY_METHODS:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, VERIFY_METHODS))}, got {verify_method!r}")
    return VERIFY_METHODS[verify_method]


def _verify(rows, draft, cu, draft_probs, temperature, top_k, top_p, seed, max_spec_len, prefix: str,
            verify: str = "token"):
    """fastverify.rejection_sample on the op layout ``rows [N + B, V]``, with placeholder
    drafts made safe where value checks run and the op's errors in vLLM's names."""
    if draft.numel() and _backend.value_checks_enabled(rows):
        # host reads, only where fastverify's value checks read anyway
        V = rows.shape[1]
        over = draft >= V
        if bool(over.any()):
            i = int(over.int().argmax())
            raise ValueError(f"{prefix}draft_token_ids[{i}] = {int(draft[i])} is outside the vocabulary [0, {V}) "
                             f"(negative ids are placeholders)")
        ph = draft < 0                                         # [N]
        if bool(ph.any()):
            # a column no draft can be accepted at (p = 0, q = 0) stands for the placeholder
            rows = torch.nn.functional.pad(rows, (0, 1), value=float("-inf"))      # [N + B, V + 1]
            draft = torch.where(ph, V, draft)
            if draft_probs is not None:
                draft_probs = torch.where(ph[:, None], 0.0, torch.nn.functional.pad(draft_probs, (0, 1)))
    try:
        return fastverify.rejection_sample(rows, draft, cu, draft_probs=draft_probs, temperature=temperature,
                                           top_k=top_k, top_p=top_p, seed=seed, positions=0,
                                           max_draft_len=max_spec_len, verify=verify)
    except ValueError as e:
        names = {k: (prefix + v if k in ("draft_tokens", "cu_num_draft") else v) for k, v in _NAMES.items()}
        raise ValueError(_NAME_RE.sub(lambda m: names[m.group(1)], str(e))) from e


# --------------------------------------------------------------------------- rejection_sample


def rejection_sample(
    draft_token_ids: torch.Tensor,              # [N]
    num_draft_tokens: list[int],                # [B], host
    max_spec_len: int,
    cu_num_draft_tokens: torch.Tensor,          # [B] inclusive
    draft_probs: torch.Tensor | None,           # [N, V]
    target_logits: torch.Tensor,                # [N, V], processed by vLLM
    bonus_token_ids: torch.Tensor,              # [B, 1]
    sampling_metadata,
    *,
    verify_method: str = "standard",
) -> torch.Tensor:
    """vLLM 0.33's ``rejection_sample``: verify every request's drafts in one call.

    Args:
        draft_token_ids: ``[N]`` int32/int64, all requests' drafts flattened (-1: a
            placeholder, always rejected).
        num_draft_tokens: ``[B]`` Python ints, drafts per request (0 allowed).
        max_spec_len: output width - 1, at least ``max(num_draft_tokens)``.
        cu_num_draft_tokens: ``[B]`` int32, inclusive cumulative sum of ``num_draft_tokens``.
        draft_probs: ``[N, V]`` distribution each draft was drawn from, or None (n-gram,
            EAGLE without probabilities: point-mass drafts).
        target_logits: ``[N, V]`` fp32/bf16/fp16, the target's logits at each draft position
            as vLLM passes them: after ``apply_sampling_constraints`` (temperature, top-k,
            top-p already applied to random requests). No bonus rows.
        bonus_token_ids: ``[B, 1]`` (or ``[B]``) int32/int64, written after a request whose
            drafts were all accepted.
        sampling_metadata: read by attribute: ``all_greedy``, ``all_random``,
            ``temperature [B]`` (0 = greedy; None when all greedy), ``generators`` (request
            index -> ``torch.Generator``). ``top_k`` / ``top_p`` are already in the logits.
        verify_method: vLLM's ``SpeculativeConfig.verify_method``: ``"standard"`` (the
            token-wise rule) or ``"block"`` (block verification).

    Returns:
        ``[B, max_spec_len + 1]`` int32: accepted drafts, the recovered or bonus token, then -1.

    Example::

        >>> from types import SimpleNamespace
        >>> logits = torch.full((3, 100), -100.0); logits[0, 1] = logits[1, 5] = logits[2, 3] = 100.0
        >>> sm = SimpleNamespace(all_greedy=True, all_random=False, temperature=None, top_k=None,
        ...                      top_p=None, generators={})
        >>> rejection_sample(torch.tensor([1, 2, 3]), [2, 1], 2, torch.tensor([2, 3], dtype=torch.int32),
        ...                  None, logits, torch.tensor([[7], [9]]), sm)
        tensor([[ 1,  5, -1],
                [ 3,  9, -1]], dtype=torch.int32)
    """
    if not isinstance(target_logits, torch.Tensor):
        raise TypeError(f"target_logits must be a torch.Tensor, got {type(target_logits).__name__}")
    rule = _rule(verify_method, "verify_method")
    dev = target_logits.device
    _check_tensor(target_logits, "target_logits", ndim=2, dtypes=_FLOATS)
    V = target_logits.shape[1]
    B, N = _check_drafts(draft_token_ids, num_draft_tokens, max_spec_len, cu_num_draft_tokens, draft_probs, V, dev)
    if target_logits.shape[0] != N:
        raise ValueError(f"target_logits must have one row per draft token, [{N}, V] (no bonus rows), got "
                         f"{tuple(target_logits.shape)}")
    if V < 1:
        raise ValueError("target_logits must have a vocabulary of at least 1 token")
    # vLLM's sampler gives [B, 1]; its tests mock it with [B]: both read the same
    flat = isinstance(bonus_token_ids, torch.Tensor) and bonus_token_ids.dim() == 1
    _check_tensor(bonus_token_ids, "bonus_token_ids", ndim=1 if flat else 2, dtypes=_INTS, device=dev,
                  shape=(B,) if flat else (B, 1))
    _check_sampling(sampling_metadata, B, dev, forward=False)
    W = max_spec_len + 1
    bonus = bonus_token_ids.reshape(B, 1).to(torch.int32)                  # [B, 1]
    if N == 0:      # no drafts anywhere: every request emits its bonus token
        out = torch.full((B, W), PLACEHOLDER_TOKEN_ID, dtype=torch.int32, device=dev)
        out[:, :1] = bonus
        return out
    if _backend.value_checks_enabled(target_logits):
        _check_cu_values(cu_num_draft_tokens, num_draft_tokens, "cu_num_draft_tokens")

    cu = _exclusive(cu_num_draft_tokens)                                   # [B + 1]
    k = cu[1:] - cu[:-1]                                                   # [B]
    b = torch.arange(B, device=dev)
    # the op's layout: request b's K_b rows, then a stand-in bonus row (its sample is replaced)
    row_req = torch.repeat_interleave(b, k + 1, output_size=N + B)         # [N + B]
    src = (torch.arange(N + B, device=dev) - row_req).clamp_(max=N - 1)
    rows = target_logits.index_select(0, src)                              # [N + B, V]

    sm = sampling_metadata
    if sm.all_greedy:
        temperature, seed = 0.0, 0      # nothing random: no draws, as vLLM
    else:
        # the logits are already divided by the temperature: 1 for random requests, 0 greedy
        temperature = 1.0 if sm.all_random else (sm.temperature != GREEDY_TEMPERATURE).to(torch.float32)
        seed = _seeds(sm, num_draft_tokens, B, dev, skip_empty=True)
    out, n_acc = _verify(rows, draft_token_ids, cu, draft_probs, temperature, None, None, seed, max_spec_len, "",
                         rule)
    cols = torch.arange(W, device=dev)
    all_accepted = (n_acc == k)[:, None] & (cols == k[:, None])            # [B, W]
    return torch.where(all_accepted, bonus, out)


# --------------------------------------------------------------------------- RejectionSampler

# built-in vLLM logits processors and the attribute that is empty while they do nothing
_IDLE_WHEN_EMPTY = {"MinPLogitsProcessor": "min_p_count", "LogitBiasLogitsProcessor": "biases",
                    "MinTokensLogitsProcessor": "min_toks"}


def _unsupported(sm) -> str | None:
    """What in ``sampling_metadata`` fastverify does not map, or None (read with defaults, so
    an object with only the six fields of :func:`rejection_sample` is fine)."""
    if getattr(sm, "max_num_logprobs", None) is not None or getattr(sm, "logprob_token_ids", None):
        return "logprobs (sampling_metadata.max_num_logprobs / logprob_token_ids)"
    if not getattr(sm, "no_penalties", True):
        return "penalties (sampling_metadata.no_penalties is False)"
    if getattr(sm, "bad_words_token_ids", None):
        return "bad words (sampling_metadata.bad_words_token_ids)"
    if getattr(sm, "allowed_token_ids_mask", None) is not None:
        return "allowed token ids (sampling_metadata.allowed_token_ids_mask)"
    procs = getattr(sm, "logitsprocs", None)
    for proc in itertools.chain(getattr(procs, "argmax_invariant", ()), getattr(procs, "non_argmax_invariant", ())):
        attr = _IDLE_WHEN_EMPTY.get(type(proc).__name__)
        if attr is None or getattr(proc, attr, True):
            return f"logits processor {type(proc).__name__} (sampling_metadata.logitsprocs)"
    holder = getattr(sm, "thinking_budget_state_holder", None)
    if holder is not None and holder.has_tracked_requests():
        return "thinking budget (sampling_metadata.thinking_budget_state_holder)"
    return None


class RejectionSampler(nn.Module):
    """vLLM 0.33's ``RejectionSampler`` (``vllm/v1/sample/rejection_sampler.py``) on
    fastverify's op: ``forward(metadata, draft_probs, logits, sampling_metadata)`` returns a
    ``SamplerOutput`` whose ``sampled_token_ids [B, max_spec_len + 1]`` int32 are vLLM's
    (accepted drafts, recovered or bonus token, -1).

    Unlike vLLM's module it does not sample the bonus token with ``sampler`` in a separate
    pass: the op samples it from the bonus row with the same temperature / top-k / top-p,
    and applies those to the raw draft rows itself (no fp32 copy, no probabilities tensor).

    Args:
        sampler: vLLM's ``Sampler`` (kept for the fallback; not called).
        spec_config: vLLM's ``SpeculativeConfig`` or None; its ``verify_method``
            ("standard" / "block") picks the op's rule; its ``rejection_sample_method``
            "fly" / "synthetic" is not mapped (handed to ``fallback``).
        device: unused (vLLM's signature).
        fallback: a module with the same ``forward`` (vLLM's own ``RejectionSampler``) for
            the batches this one does not map: logprobs, penalties, bad words, allowed-token
            masks, active logits processors, thinking budgets, FLy / synthetic modes.
            Without one those raise ``NotImplementedError``.

    Example::

        >>> sampler = RejectionSampler()
        >>> out = sampler(spec_decode_metadata, None, logits, sampling_metadata)
        >>> out.sampled_token_ids.shape        # [B, max_spec_len + 1]
    """

    def __init__(self, sampler=None, spec_config=None, device: torch.device | None = None, *, fallback=None):
        super().__init__()
        self.sampler = sampler
        self.fallback = fallback
        method = getattr(spec_config, "rejection_sample_method", None) if spec_config is not None else None
        self.unmapped_method = method if method in ("fly", "synthetic") else None
        self.verify = _rule(getattr(spec_config, "verify_method", None), "spec_config.verify_method")
        if self.unmapped_method is not None and fallback is None:
            raise NotImplementedError(f"fastverify's RejectionSampler does not implement vLLM's "
                                      f"rejection_sample_method={method!r}; pass fallback=vLLM's RejectionSampler")

    def forward(self, metadata, draft_probs: torch.Tensor | None, logits: torch.Tensor, sampling_metadata):
        """Args:
            metadata: vLLM's ``SpecDecodeMetadata`` (read by attribute): ``draft_token_ids [N]``,
                ``num_draft_tokens`` (host list), ``max_spec_len``, ``cu_num_draft_tokens [B]``
                inclusive, ``target_logits_indices [N]``, ``bonus_logits_indices [B]``.
            draft_probs: ``[N, V]`` or None.
            logits: ``[N + B, V]`` (any number of rows: the two index tensors pick them) raw
                target logits, bonus rows included.
            sampling_metadata: as in :func:`rejection_sample`, plus ``top_k [B]`` int
                (>= V: off) and ``top_p [B]`` (1: off), or None.

        Returns:
            ``SamplerOutput(sampled_token_ids [B, max_spec_len + 1] int32, logprobs_tensors=None)``.
        """
        why = self.unmapped_method and f"rejection_sample_method={self.unmapped_method!r}"
        why = why or _unsupported(sampling_metadata)
        if why is not None:
            if self.fallback is not None:
                return self.fallback(metadata, draft_probs, logits, sampling_metadata)
            raise NotImplementedError(f"fastverify's RejectionSampler does not map {why}; construct it with "
                                      "fallback=vLLM's RejectionSampler (register() does)")
        return _output_cls(sampled_token_ids=_forward_tokens(metadata, draft_probs, logits, sampling_metadata,
                                                             self.verify),
                           logprobs_tensors=None)

    @staticmethod
    def parse_output(output_token_ids: torch.Tensor, vocab_size: int, discard_req_indices: Sequence[int] = (),
                     logprobs_tensors=None):
        """vLLM's ``parse_output``: the valid tokens of each row as Python lists (a host read
        by design), dropping -1 and ids >= ``vocab_size``; rows in ``discard_req_indices``
        come back empty. ``logprobs_tensors`` (vLLM's ``LogprobsTensors``) is filtered the
        same way and returned as its ``tolists``.

        Example::

            >>> RejectionSampler.parse_output(torch.tensor([[1, 5, -1], [3, 4, 7]]), 100, [1])
            ([[1, 5], []], None)
        """
        x = output_token_ids.cpu()
        valid = (x != PLACEHOLDER_TOKEN_ID) & (x < vocab_size)             # [B, W]
        lists = None
        if logprobs_tensors is not None:
            cu = [0, *itertools.accumulate(valid.sum(1).tolist())]
            lists = logprobs_tensors.filter(valid.flatten()).tolists(cu)
        if len(discard_req_indices) > 0:
            valid[list(discard_req_indices)] = False
        return [row[m].tolist() for row, m in zip(x, valid)], lists


def _forward_tokens(metadata, draft_probs, logits, sm, verify: str = "token") -> torch.Tensor:
    for attr in ("draft_token_ids", "num_draft_tokens", "max_spec_len", "cu_num_draft_tokens",
                 "target_logits_indices", "bonus_logits_indices"):
        if not hasattr(metadata, attr):
            raise TypeError(f"metadata has no attribute {attr!r} (vLLM's SpecDecodeMetadata has)")
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    dev = logits.device
    _check_tensor(logits, "logits", ndim=2, dtypes=_FLOATS)
    R, V = logits.shape
    if V < 1:
        raise ValueError("logits must have a vocabulary of at least 1 token")
    B, N = _check_drafts(metadata.draft_token_ids, metadata.num_draft_tokens, metadata.max_spec_len,
                         metadata.cu_num_draft_tokens, draft_probs, V, dev, p="metadata.")
    _check_tensor(metadata.target_logits_indices, "metadata.target_logits_indices", ndim=1, dtypes=_INTS,
                  device=dev, shape=(N,))
    _check_tensor(metadata.bonus_logits_indices, "metadata.bonus_logits_indices", ndim=1, dtypes=_INTS,
                  device=dev, shape=(B,))
    _check_sampling(sm, B, dev, forward=True)
    W = metadata.max_spec_len + 1
    if B == 0:
        return torch.full((0, W), PLACEHOLDER_TOKEN_ID, dtype=torch.int32, device=dev)
    if _backend.value_checks_enabled(logits):
        _check_cu_values(metadata.cu_num_draft_tokens, metadata.num_draft_tokens, "metadata.cu_num_draft_tokens")
        for name in ("target_logits_indices", "bonus_logits_indices"):
            idx = getattr(metadata, name)
            if idx.numel() and bool(((idx < 0) | (idx >= R)).any()):
                raise ValueError(f"metadata.{name} = {idx.tolist()} must index rows of logits [0, {R})")

    cu = _exclusive(metadata.cu_num_draft_tokens)                          # [B + 1]
    b = torch.arange(B, device=dev)
    # the op's layout: request b's draft rows at cu[b] + b .., its bonus row at cu[b + 1] + b
    src = torch.empty(N + B, dtype=torch.int64, device=dev)
    req = torch.repeat_interleave(b, cu[1:] - cu[:-1], output_size=N)      # [N]
    src[torch.arange(N, device=dev) + req] = metadata.target_logits_indices.long()
    src[cu[1:] + b] = metadata.bonus_logits_indices.long()
    rows = logits.index_select(0, src)                                     # [N + B, V]

    if sm.all_greedy:
        temperature, top_k, top_p = 0.0, None, None
    else:
        temperature = sm.temperature.to(torch.float32)
        top_k = None if sm.top_k is None else sm.top_k.to(torch.int32)
        top_p = None if sm.top_p is None else sm.top_p.to(torch.float32)
    # the op samples every request's bonus token: seeded requests draw even without drafts
    seed = 0 if sm.all_greedy else _seeds(sm, metadata.num_draft_tokens, B, dev, skip_empty=False)
    out, _ = _verify(rows, metadata.draft_token_ids, cu, draft_probs, temperature, top_k, top_p, seed,
                     metadata.max_spec_len, "metadata.", verify)
    return out


# --------------------------------------------------------------------------- vLLM plugin


def register() -> bool:
    """vLLM general plugin: make vLLM's model runner build fastverify's
    :class:`RejectionSampler` (with vLLM's own as the fallback for what it does not map).

    Replaces ``RejectionSampler`` in ``vllm.v1.sample.rejection_sampler`` and in every loaded
    ``vllm`` module that imported it (the v1 ``gpu_model_runner``); modules imported later
    pick up the replacement. Returns True once installed, False when vLLM is not installed.
    Register it in a package's ``pyproject.toml``::

        [project.entry-points."vllm.general_plugins"]
        fastverify_rejection_sampler = "fastverify.integrations.vllm:register"
    """
    global _output_cls
    try:
        import vllm.v1.sample.rejection_sampler as vrs
        from vllm.v1.outputs import SamplerOutput as vllm_output
    except ImportError:
        return False
    original = vrs.RejectionSampler
    if getattr(original, "_fastverify", False):
        return True

    class FastverifyRejectionSampler(RejectionSampler):
        _fastverify = True

        def __init__(self, sampler, spec_config=None, device=None):
            super().__init__(sampler, spec_config, device, fallback=original(sampler, spec_config, device))

    FastverifyRejectionSampler.__name__ = FastverifyRejectionSampler.__qualname__ = "RejectionSampler"
    _output_cls = vllm_output
    for name, module in list(sys.modules.items()):
        if (name == "vllm" or name.startswith("vllm.")) and getattr(module, "RejectionSampler", None) is original:
            setattr(module, "RejectionSampler", FastverifyRejectionSampler)
    return True
