"""Frequency-ranked LM head (FR-Spec) ops: ``fastverify::lm_head_topk`` and
``fastverify::lm_head_sample``.

Schemas, argument checks, fake kernels, the ``torch`` backend (the CPU kernel and
readable specification) and dispatch to ``triton`` (``fastverify/triton/frspec.py``)
and ``cuda`` (``csrc/cuda/frspec.cu``).

A drafter scores only the V_sub most frequent tokens: ``weight [V_sub, d]`` holds
their LM-head rows in rank order and ``token_map [V_sub]`` their full-vocabulary ids.
Math, for hidden row m (fp32 accumulation; t_m = temperature[m], 1 where t_m <= 0
or temperature is None):

    s[m, v]   = (hidden[m] · weight[v]) / t_m          NaN counts as -inf
    lse[m]    = log Σ_v exp(s[m, v])

lm_head_topk: the k largest s[m, v] in descending order, ties broken by the lower
subset row v; ids = token_map[v] (int64), logprobs = s[m, v] - lse[m].

lm_head_sample: a Gumbel-max draw from softmax_v(s[m, v]),

    v* = argmax_v (s[m, v] + g[m, v]), ties -> lower v      (t_m <= 0: argmax_v s[m, v])
    g[m, v] = gumbel(seed[m], positions[m], v)               (``ops/philox.py``, stream 1)

token_ids = token_map[v*], logprobs = s[m, v*] - lse[m]. Draws depend only on
(seed, position): the same on every backend and batch composition, and independent of
the verification ops' draws (those use Philox stream 0).
"""

from __future__ import annotations

import torch

from .. import _backend
from ..cpu import step as cpu_kernels
from . import philox
from ._checks import ID_DTYPES, LOGIT_DTYPES, check_tensor, passed_before, remember_passed
from ._common import implementation
from .rejection import _per_request

lib = torch.library.Library("fastverify", "FRAGMENT")
lib.define("lm_head_topk(Tensor hidden, Tensor weight, int k, *, Tensor? token_map=None, "
           "Tensor? temperature=None, int? vocab_size=None) "
           "-> (Tensor topk_ids, Tensor topk_logprobs, Tensor lse)")
lib.define("lm_head_sample(Tensor hidden, Tensor weight, *, Tensor temperature, Tensor seed, Tensor positions, "
           "Tensor? token_map=None, int? vocab_size=None) "
           "-> (Tensor token_ids, Tensor logprobs, Tensor lse)")

MAX_K = 64


# --------------------------------------------------------------------------- checks


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_lm_head(hidden, weight, token_map, temperature, vocab_size, values: bool = True) -> tuple[int, int]:
    """Checks shared by both ops; returns (M, V_sub). Raises a ValueError naming the
    first bad argument (TypeError for a non-tensor)."""
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    dev = hidden.device
    check_tensor(hidden, "hidden", ndim=2, dtypes=LOGIT_DTYPES, device=dev)
    check_tensor(weight, "weight", ndim=2, dtypes=LOGIT_DTYPES, device=dev)
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight is {str(weight.dtype).replace('torch.', '')} but hidden is "
                         f"{str(hidden.dtype).replace('torch.', '')}: they must have the same dtype")
    M, d = hidden.shape
    V = weight.shape[0]
    if d < 1:
        raise ValueError(f"hidden must have a hidden size d >= 1, got shape {tuple(hidden.shape)}")
    if weight.shape[1] != d:
        raise ValueError(f"weight has d = {weight.shape[1]} columns but hidden has d = {d}")
    if V < 1:
        raise ValueError("weight must have at least one subset row (V_sub >= 1)")
    if V >= 2**31:
        raise ValueError(f"weight has V_sub = {V} rows, more than fits in int32")
    if not weight.is_contiguous():
        raise ValueError(f"weight must be contiguous, got strides {weight.stride()} for shape {tuple(weight.shape)}")
    if M > 0 and hidden.stride(1) != 1:
        raise ValueError(f"hidden must be contiguous in its last dimension (stride(1) == 1), got strides "
                         f"{hidden.stride()}")
    if vocab_size is not None and (not _is_int(vocab_size) or vocab_size < 1):
        raise ValueError(f"vocab_size must be an int >= 1 or None, got {vocab_size!r}")
    if token_map is not None:
        check_tensor(token_map, "token_map", ndim=1, dtypes=ID_DTYPES, device=dev, shape=(V,))
    elif vocab_size is not None and V > vocab_size:
        raise ValueError(f"without token_map the ids are subset rows, but weight has V_sub = {V} rows > "
                         f"vocab_size = {vocab_size}")
    if temperature is not None:
        check_tensor(temperature, "temperature", ndim=1, dtypes=(torch.float32,), device=dev, shape=(M,))
    if not (values and _backend.value_checks_enabled(hidden)):
        return M, V
    if temperature is not None and not bool(torch.isfinite(temperature).all()):
        raise ValueError(f"temperature must be finite (<= 0 scores at 1), got {temperature.tolist()}")
    if token_map is not None and not passed_before("lm_head", (token_map,), (vocab_size,)):
        bad = token_map < 0
        if vocab_size is not None:
            bad |= token_map >= vocab_size
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            where = f"[0, {vocab_size})" if vocab_size is not None else "[0, vocab_size) (ids must be >= 0)"
            raise ValueError(f"token_map[{i}] = {int(token_map[i])} is outside the vocabulary {where}")
        remember_passed("lm_head", (token_map,), (vocab_size,))
    return M, V


def check_lm_head_topk(hidden, weight, k, token_map, temperature, vocab_size, values: bool = True) -> None:
    M, V = check_lm_head(hidden, weight, token_map, temperature, vocab_size, values)
    if not _is_int(k) or not 1 <= k <= min(V, MAX_K):
        raise ValueError(f"k must be an int in [1, min(V_sub, {MAX_K})] = [1, {min(V, MAX_K)}] "
                         f"(V_sub = {V}), got {k!r}")


def check_lm_head_sample(hidden, weight, temperature, seed, positions, token_map, vocab_size,
                         values: bool = True) -> None:
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if temperature is None:
        raise ValueError("temperature is required: a [M] fp32 tensor (<= 0 = greedy)")
    M, _ = check_lm_head(hidden, weight, token_map, temperature, vocab_size, values)
    check_tensor(seed, "seed", ndim=1, dtypes=(torch.int64,), device=hidden.device, shape=(M,))
    check_tensor(positions, "positions", ndim=1, dtypes=(torch.int64,), device=hidden.device, shape=(M,))
    if values and _backend.value_checks_enabled(hidden) and bool((positions < 0).any()):
        raise ValueError(f"positions must be >= 0, got {positions.tolist()}")


# --------------------------------------------------------------------------- torch backend

CHUNK_ELEMENTS = 1 << 22     # logits per chunk of the torch backend (16 MB of fp32)


def _row_temperature(temperature, M, device):
    """t_m, with 1 where temperature is None or t_m <= 0."""
    if temperature is None:
        return torch.ones(M, dtype=torch.float32, device=device)
    return torch.where(temperature > 0, temperature, 1.0)


def _score_chunks(hidden, weight, t):
    """(v0, s) for consecutive chunks of subset rows: s [M, c] = hidden · weight[v0:v0+c]ᵀ / t
    in fp32, NaN -> -inf. Chunks bound the memory to CHUNK_ELEMENTS logits."""
    M, V = hidden.shape[0], weight.shape[0]
    h = hidden.float()
    step = max(1024, CHUNK_ELEMENTS // max(M, 1))
    for v0 in range(0, V, step):
        w = weight[v0:v0 + step]
        # a few fp32 rows on CPU: the streaming GEMV of csrc/cpu (about 2x torch's here)
        s = cpu_kernels.linear(h, w) if cpu_kernels.supports(h, w) else h @ w.float().T
        s = s / t[:, None]
        yield v0, torch.where(torch.isnan(s), float("-inf"), s)


def _subset_ids(rows, token_map):
    return rows if token_map is None else token_map.long()[rows]


def rank_key(s: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered as the ranking of (score, subset row): a higher score first, then
    the lower row. High 32 bits: the fp32 score's bits mapped to a signed int of the same
    order (negative floats have their magnitude bits flipped; -0.0 is made +0.0 first, as
    the two compare equal); low 32 bits: 2^32 - 1 - row. Keys are unique per row."""
    bits = (s + 0.0).view(torch.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.long() << 32) | (0xFFFFFFFF - rows)


def unrank_key(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(score fp32, row int64) of keys made by :func:`rank_key`."""
    ordered = (key >> 32).to(torch.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    return bits.view(torch.float32), 0xFFFFFFFF - (key & 0xFFFFFFFF)


def lm_head_topk_torch(hidden, weight, k, token_map, temperature):
    """torch backend of :func:`fastverify.lm_head_topk` (vectorized, no host sync).
    Chunk by chunk: lse by logaddexp, and the top-k of the running top-k plus the chunk
    by ``torch.topk`` over :func:`rank_key` keys, which are unique, so ties go to the
    lower row whatever order topk visits them in."""
    M, dev = hidden.shape[0], hidden.device
    t = _row_temperature(temperature, M, dev)
    lse = torch.full((M,), float("-inf"), device=dev)
    top = torch.empty((M, 0), dtype=torch.long, device=dev)
    for v0, s in _score_chunks(hidden, weight, t):
        lse = torch.logaddexp(lse, torch.logsumexp(s, 1))
        keys = rank_key(s, torch.arange(v0, v0 + s.shape[1], device=dev))
        top = torch.cat([top, keys], 1).topk(k, dim=1).values                  # sorted, best first
    top_s, top_v = unrank_key(top)
    return _subset_ids(top_v, token_map), top_s - lse[:, None], lse


def lm_head_sample_torch(hidden, weight, temperature, seed, positions, token_map):
    """torch backend of :func:`fastverify.lm_head_sample`: per chunk, the first argmax
    of s + g (of s on greedy rows); a later chunk (higher rows) wins only when strictly
    greater. The noise is computed in float64 from the exact u and rounded to fp32."""
    M, dev = hidden.shape[0], hidden.device
    t = _row_temperature(temperature, M, dev)
    greedy = ~(temperature > 0)
    lse = torch.full((M,), float("-inf"), device=dev)
    best = torch.full((M,), float("-inf"), device=dev)     # s + g of the best row so far
    best_s = torch.full((M,), float("-inf"), device=dev)
    best_v = torch.full((M,), -1, dtype=torch.long, device=dev)
    all_greedy = dev.type == "cpu" and not bool((temperature > 0).any())   # no noise to draw (a sync elsewhere)
    for v0, s in _score_chunks(hidden, weight, t):
        lse = torch.logaddexp(lse, torch.logsumexp(s, 1))
        if all_greedy:
            noisy = s
        else:
            rows = torch.arange(v0, v0 + s.shape[1], device=dev)
            g = philox.gumbel(seed[:, None], positions[:, None], rows[None, :]).float()
            noisy = torch.where(greedy[:, None], s, s + g)
        i = noisy.argmax(1, keepdim=True)                    # first maximum: the lower row
        val = noisy.gather(1, i)[:, 0]
        take = (val > best) | (best_v < 0)
        best = torch.where(take, val, best)
        best_s = torch.where(take, s.gather(1, i)[:, 0], best_s)
        best_v = torch.where(take, v0 + i[:, 0], best_v)
    return _subset_ids(best_v, token_map), best_s - lse, lse


# --------------------------------------------------------------------------- fake kernels


@torch.library.register_fake("fastverify::lm_head_topk", lib=lib)
def _lm_head_topk_fake(hidden, weight, k, *, token_map=None, temperature=None, vocab_size=None):
    check_lm_head_topk(hidden, weight, k, token_map, temperature, vocab_size, values=False)
    M = hidden.shape[0]
    return (hidden.new_empty((M, k), dtype=torch.int64), hidden.new_empty((M, k), dtype=torch.float32),
            hidden.new_empty((M,), dtype=torch.float32))


@torch.library.register_fake("fastverify::lm_head_sample", lib=lib)
def _lm_head_sample_fake(hidden, weight, *, temperature, seed, positions, token_map=None, vocab_size=None):
    check_lm_head_sample(hidden, weight, temperature, seed, positions, token_map, vocab_size, values=False)
    M = hidden.shape[0]
    return (hidden.new_empty((M,), dtype=torch.int64), hidden.new_empty((M,), dtype=torch.float32),
            hidden.new_empty((M,), dtype=torch.float32))


# --------------------------------------------------------------------------- dispatch


def _contiguous(t):
    return None if t is None else t.contiguous()


def _lm_head_topk_impl(hidden, weight, k, *, token_map=None, temperature=None, vocab_size=None):
    check_lm_head_topk(hidden, weight, k, token_map, temperature, vocab_size)
    M = hidden.shape[0]
    if M == 0:
        return (hidden.new_empty((0, k), dtype=torch.int64), hidden.new_empty((0, k), dtype=torch.float32),
                hidden.new_empty((0,), dtype=torch.float32))
    fn = implementation(hidden.device, "frspec", "lm_head_topk", lm_head_topk_torch)
    return fn(hidden, weight, k, _contiguous(token_map), _contiguous(temperature))


def _lm_head_sample_impl(hidden, weight, *, temperature, seed, positions, token_map=None, vocab_size=None):
    check_lm_head_sample(hidden, weight, temperature, seed, positions, token_map, vocab_size)
    if hidden.shape[0] == 0:
        return (hidden.new_empty((0,), dtype=torch.int64), hidden.new_empty((0,), dtype=torch.float32),
                hidden.new_empty((0,), dtype=torch.float32))
    fn = implementation(hidden.device, "frspec", "lm_head_sample", lm_head_sample_torch)
    return fn(hidden, weight, temperature.contiguous(), seed.contiguous(), positions.contiguous(),
              _contiguous(token_map))


for _key in ("CPU", "CUDA"):
    lib.impl("lm_head_topk", _lm_head_topk_impl, _key)
    lib.impl("lm_head_sample", _lm_head_sample_impl, _key)


# --------------------------------------------------------------------------- public API


def _rows(hidden) -> int:
    return hidden.shape[0] if isinstance(hidden, torch.Tensor) and hidden.dim() >= 1 else 0


def _device(hidden):
    return hidden.device if isinstance(hidden, torch.Tensor) else None


def lm_head_topk(hidden, weight, k, *, token_map=None, temperature=None, vocab_size=None):
    """Top-k tokens of a frequency-ranked LM head (FR-Spec drafting), fused: one pass
    over ``weight`` computing the logits, their log-sum-exp and the top-k without ever
    writing the ``[M, V_sub]`` logits to memory.

    Args:
        hidden: ``[M, d]`` fp32/bf16/fp16 final hidden states (contiguous in d).
        weight: ``[V_sub, d]`` contiguous, hidden's dtype: the LM-head rows of the V_sub
            most frequent tokens, in rank order.
        k: tokens per row, ``1 <= k <= min(V_sub, 64)``.
        token_map: ``[V_sub]`` int32/int64 full-vocabulary id of each subset row, or None
            (ids are subset rows).
        temperature: ``[M]`` fp32 (or a Python number) dividing the logits; None = 1;
            rows with temperature <= 0 are scored at 1.
        vocab_size: if given, token_map values are checked to lie in ``[0, vocab_size)``.

    Returns:
        ``topk_ids [M, k]`` int64 (full-vocabulary ids, descending logits, ties to the
        lower subset row), ``topk_logprobs [M, k]`` fp32 (log-softmax over the subset)
        and ``lse [M]`` fp32 (log-sum-exp of the scaled subset logits).

    Example::

        >>> head = torch.randn(32000, 64)                 # full LM head
        >>> ranked = torch.randperm(32000)[:4096]         # the 4096 most frequent tokens
        >>> ids, logprobs, lse = fastverify.lm_head_topk(torch.randn(3, 64), head[ranked].contiguous(), 8,
        ...                                             token_map=ranked)
        >>> ids.shape, logprobs.shape, lse.shape
        (torch.Size([3, 8]), torch.Size([3, 8]), torch.Size([3]))
    """
    return torch.ops.fastverify.lm_head_topk(
        hidden, weight, k, token_map=token_map, vocab_size=vocab_size,
        temperature=_per_request(temperature, "temperature", _rows(hidden), torch.float32, _device(hidden)))


def lm_head_sample(hidden, weight, *, temperature, seed, positions, token_map=None, vocab_size=None):
    """One token per row drawn from the softmax of a frequency-ranked LM head (Gumbel-max
    with counter-based noise), fused like :func:`lm_head_topk`.

    Args:
        hidden: ``[M, d]``, weight: ``[V_sub, d]``, token_map, vocab_size: as in :func:`lm_head_topk`.
        temperature: ``[M]`` fp32; rows with temperature <= 0 take the argmax (greedy).
        seed: ``[M]`` int64. positions: ``[M]`` int64 sequence position of the token drawn;
            the draw depends only on (seed, position) (Philox stream 1, independent of the
            verification ops' draws). Python numbers broadcast.

    Returns:
        ``token_ids [M]`` int64 (full-vocabulary), ``logprobs [M]`` fp32 (log-softmax of
        the drawn token over the subset at that temperature) and ``lse [M]`` fp32.

    Example::

        >>> w = torch.randn(4096, 64)
        >>> ids, logprobs, lse = fastverify.lm_head_sample(torch.randn(2, 64), w, temperature=torch.tensor([0.0, 0.8]),
        ...                                               seed=torch.tensor([1, 2]), positions=torch.tensor([17, 40]))
        >>> ids.shape
        torch.Size([2])
    """
    M, dev = _rows(hidden), _device(hidden)
    return torch.ops.fastverify.lm_head_sample(
        hidden, weight, token_map=token_map, vocab_size=vocab_size,
        temperature=_per_request(temperature, "temperature", M, torch.float32, dev),
        seed=_per_request(seed, "seed", M, torch.int64, dev),
        positions=_per_request(positions, "positions", M, torch.int64, dev))
