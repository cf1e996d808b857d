"""Shared pieces of the target distribution, in torch: the readable specification that
the Triton and CUDA kernels implement.

The processed target distribution of one logits row ``l`` (length V) for a request
with temperature ``T``, ``top_k`` and ``top_p``:

    l      ← l with NaN replaced by -inf
    z      = min(l / T, FLT_MAX)                                  (T = 0: greedy, argmax of l)
    keep   = {v : l_v >= thr}, thr = max(thr_k, thr_p), where
      thr_k = the k-th largest l (ties at it kept)                 (top_k = 0 or >= V: -inf)
      thr_p = the largest value t with  Σ_{v kept by top-k, l_v >= t} softmax(z)_v >= top_p · Z_k
              i.e. the token whose cumulative mass crosses top_p is kept, ties kept
    p_v    = exp(z_v - lse) on keep, 0 elsewhere;  lse = logsumexp of z over keep

Thresholds are found without sorting: a radix select over the 32-bit order-preserving
key of each float, four bits (16 bins) per pass, counting tokens (top-k) or summing
probability mass (top-p). The kernels run the same select over the row in blocks.

A categorical sample from weights ``w`` (unnormalized) with uniform ``u`` is the
inverse CDF in vocabulary order: the first index whose running sum exceeds
``u · Σw``; if rounding leaves no such index, the last index with ``w > 0``; if no
weight is positive (a row with no finite logit), the row's argmax.
"""

from __future__ import annotations

import torch

FLT_MAX = torch.finfo(torch.float32).max
NEG_INF = float("-inf")
_KEY_BIAS = 2**31
RADIX_BITS = 4
RADIX_BINS = 1 << RADIX_BITS


def sanitize(logits: torch.Tensor) -> torch.Tensor:
    """fp32 copy with NaN → -inf (a NaN logit is a token the model gives no mass)."""
    l = logits.float()
    return torch.where(torch.isnan(l), NEG_INF, l)


def scale(l: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """z = min(l / t, FLT_MAX), rows scaled by their temperature (t > 0)."""
    return (l / t[:, None]).clamp(max=FLT_MAX)


def float_key(x: torch.Tensor) -> torch.Tensor:
    """Order-preserving map float32 → int64 in [0, 2^32): x < y ⇔ key(x) < key(y)."""
    bits = x.contiguous().view(torch.int32).to(torch.int64)
    key32 = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return key32 + _KEY_BIAS


def key_float(key: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`float_key`."""
    key32 = key - _KEY_BIAS
    bits = key32 ^ ((key32 >> 31) & 0x7FFFFFFF)
    return bits.to(torch.int32).view(torch.float32)


def radix_select(key: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row, the largest key t (of an element) with Σ_{key >= t} weight >= target.

    key [R, V] int64 in [0, 2^32), weight [R, V] >= 0, target [R] → [R] int64.
    Eight passes of 16 bins fix the key four bits at a time, most significant first.
    """
    R = key.shape[0]
    prefix = torch.zeros(R, dtype=torch.int64, device=key.device)
    above = torch.zeros(R, dtype=weight.dtype, device=key.device)  # weight of keys above the prefix range
    bins = torch.arange(RADIX_BINS, device=key.device)
    for shift in range(32 - RADIX_BITS, -1, -RADIX_BITS):
        in_range = (key >> (shift + RADIX_BITS)) == prefix[:, None]
        digit = (key >> shift) & (RADIX_BINS - 1)
        hist = torch.zeros(R, RADIX_BINS, dtype=weight.dtype, device=key.device)
        hist.scatter_add_(1, digit, torch.where(in_range, weight, 0))
        at_or_above = hist.sum(1, keepdim=True) - hist.cumsum(1) + hist  # Σ_{d' >= d}
        ok = above[:, None] + at_or_above >= target[:, None]
        d = torch.where(ok, bins, 0).amax(1)
        above = above + torch.where(bins > d[:, None], hist, 0).sum(1)
        prefix = prefix * RADIX_BINS + d
    return prefix


def filter_threshold(l: torch.Tensor, z: torch.Tensor, top_k, top_p, active: torch.Tensor) -> torch.Tensor:
    """thr [R]: keep token v of row r iff l[r, v] >= thr[r] (-inf: keep all).

    l, z [R, V] (sanitized and scaled logits); top_k [R] int or None; top_p [R] or None;
    active [R] bool marks random (non-greedy) rows.
    """
    R, V = l.shape
    key = float_key(l)
    thr_key = torch.zeros(R, dtype=torch.int64, device=l.device)
    use = torch.zeros(R, dtype=torch.bool, device=l.device)
    if top_k is not None:
        use_k = active & (top_k > 0) & (top_k < V)
        k_key = radix_select(key, torch.ones_like(l), top_k.to(torch.float32))
        thr_key = torch.where(use_k, k_key, thr_key)
        use = use | use_k
    if top_p is not None:
        use_p = active & (top_p < 1)
        m = z.amax(1, keepdim=True)
        mass = torch.where(key >= thr_key[:, None], torch.exp(z - m), 0)
        p_key = radix_select(key, mass, top_p * mass.sum(1))
        thr_key = torch.where(use_p, p_key, thr_key)
        use = use | use_p
    return torch.where(use, key_float(thr_key), NEG_INF)


def inverse_cdf(w: torch.Tensor, u: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Per row of w [B, V] (>= 0, unnormalized), the first index whose running sum
    exceeds u·Σw (u [B] in [0, 1)); see the module docstring for the fallbacks."""
    V = w.shape[1]
    c = w.double().cumsum(1)
    crossed = c > (u.double() * c[:, -1])[:, None]
    first = crossed.int().argmax(1)
    positive = w > 0
    last = V - 1 - positive.flip(1).int().argmax(1)
    idx = torch.where(positive.any(1), last, fallback)
    return torch.where(crossed.any(1), first, idx)
