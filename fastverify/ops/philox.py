"""Counter-based randomness: Philox4x32-10 (Salmon et al., SC'11), as ``tl.rand`` uses.

Every random number fastverify draws is a pure function of ``(seed, position,
attempt)``:

    key     = (seed mod 2^32, seed div 2^32)
    counter = (position mod 2^32, position div 2^32, attempt, 0)
    (o0, o1, o2, o3) = Philox4x32-10(counter, key)

``o0`` decides acceptance (the attempt-th draft scored at that position), ``o1``
draws the emitted token at that position (attempt 0). The frequency-ranked LM head's
draft draws (``ops/frspec.py``) use their own stream, counter word ``c3 =
LM_HEAD_STREAM = 1``, with the subset row in ``c2``: :func:`gumbel`. A uint32 ``x`` becomes the
float32 uniform ``(x >> 8) * 2^-24`` in [0, 1), which is exact in every backend.
The Triton (``fastverify/triton/philox.py``) and CUDA (``csrc/cuda/philox.cuh``)
versions compute the same bits.

This module is the torch version: int64 tensors holding uint32 values, vectorized
over any shape — or plain Python ints, for the scalar draws of a sequential walk.
"""

from __future__ import annotations

import torch

ROUND_A = 0xD2511F53
ROUND_B = 0xCD9E8D57
KEY_A = 0x9E3779B9
KEY_B = 0xBB67AE85
MASK32 = 0xFFFFFFFF
ROUNDS = 10

# o0 decides acceptance, o1 draws the emitted token.
ACCEPT_LANE = 0
SAMPLE_LANE = 1
# counter word c3 of the LM-head draft draws (the verification ops use 0)
LM_HEAD_STREAM = 1
# ... and, in its low byte, of the multi-path drafters' draws (the path or tree node above it)
PATH_STREAM = 2


def _mulhilo(a: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product a * x, without int64 overflow."""
    x_hi, x_lo = x >> 16, x & 0xFFFF
    p_hi, p_lo = a * x_hi, a * x_lo  # each < 2^48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & MASK32
    return hi, lo


def philox4x32(seed, c0, c1, c2, c3):
    """Philox4x32-10 of counter (c0, c1, c2, c3) under key ``seed`` (int64).

    Counters hold values in [0, 2^32). With any tensor input, all inputs become int64
    tensors and broadcast, and four int64 tensors of uint32 values come back; with
    Python ints only, four ints (the same bits, without tensor overhead).
    """
    if any(isinstance(v, torch.Tensor) for v in (seed, c0, c1, c2, c3)):
        seed = torch.as_tensor(seed, dtype=torch.int64)
        c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64, device=seed.device) for c in (c0, c1, c2, c3))
    k0 = seed & MASK32
    k1 = (seed >> 32) & MASK32
    c0, c1, c2, c3 = (c & MASK32 for c in (c0, c1, c2, c3))
    for _ in range(ROUNDS):
        hi_b, lo_b = _mulhilo(ROUND_B, c2)
        hi_a, lo_a = _mulhilo(ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + KEY_A) & MASK32
        k1 = (k1 + KEY_B) & MASK32
    return c0, c1, c2, c3


def to_uniform(x):
    """uint32 → uniform in [0, 1): the top 24 bits times 2^-24 (float32 tensor, or a
    Python float holding the same exactly representable value)."""
    if isinstance(x, torch.Tensor):
        return (x >> 8).to(torch.float32) * (2.0**-24)
    return (x >> 8) * (2.0**-24)


def uniform(seed, position, lane: int, attempt=0, stream=0):
    """The ``lane``-th uniform keyed by (seed, position, attempt), in [0, 1); ``stream`` (c3)
    is 0 for the verification ops, ``path_stream(p)`` for a multi-path drafter's path p."""
    out = philox4x32(seed, position & MASK32, (position >> 32) & MASK32, attempt, stream)
    return to_uniform(out[lane])


def gumbel(seed, position, index, stream: int = LM_HEAD_STREAM) -> torch.Tensor:
    """Gumbel noise of subset row ``index`` for the LM-head draw at ``(seed, position)``
    (tensors, broadcast; float64):

        o = Philox4x32-10(key = seed, counter = (position lo, position hi, index, stream))
        u = ((o0 >> 8) + 0.5) · 2^-24  in (0, 1),   g = -log(-log u)

    ``stream`` (c3) is LM_HEAD_STREAM for the LM-head draws, ``path_stream(node)`` for the
    multi-path drafters' (every node of a draft tree its own)."""
    o0 = philox4x32(seed, position & MASK32, (position >> 32) & MASK32, index, stream)[0]
    u = ((o0 >> 8).to(torch.float64) + 0.5) * 2.0**-24
    return -torch.log(-torch.log(u))


def path_stream(node):
    """Counter word c3 of the draws a multi-path drafter makes at tree node (or path)
    ``node``: PATH_STREAM in the low byte, so no other draw of fastverify shares a counter."""
    return PATH_STREAM + 256 * node
