"""Philox4x32-10 in Triton: the same bits as ``fastverify/ops/philox.py`` (see there
for how (seed, position, attempt) map to key and counter)."""

import triton
import triton.language as tl


@triton.jit
def philox4x32(seed, c0, c1, c2, c3):
    """Philox4x32-10 of counter (c0, c1, c2, c3) (uint32) under key = int64 ``seed``.

        per round:  (c0, c1, c2, c3) ← (hi(B·c2) ^ c1 ^ k0,  lo(B·c2),  hi(A·c0) ^ c3 ^ k1,  lo(A·c0))
                    (k0, k1) += (0x9E3779B9, 0xBB67AE85)
    with A = 0xD2511F53, B = 0xCD9E8D57 (Salmon et al., SC'11).
    """
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    for _ in tl.static_range(10):
        a = tl.full(c0.shape, 0xD2511F53, tl.uint32)
        b = tl.full(c2.shape, 0xCD9E8D57, tl.uint32)
        n0 = tl.umulhi(b, c2) ^ c1 ^ k0
        n2 = tl.umulhi(a, c0) ^ c3 ^ k1
        c1 = b * c2
        c3 = a * c0
        c0 = n0
        c2 = n2
        k0 = k0 + tl.full(k0.shape, 0x9E3779B9, tl.uint32)
        k1 = k1 + tl.full(k1.shape, 0xBB67AE85, tl.uint32)
    return c0, c1, c2, c3


@triton.jit
def to_uniform(x):
    """uint32 → float32 uniform in [0, 1): the top 24 bits times 2^-24 (exact)."""
    return (x >> 8).to(tl.float32) * 5.9604644775390625e-08


@triton.jit
def uniform_pair(seed, position, attempt):
    """(acceptance uniform, sampling uniform) keyed by (seed, position, attempt):
    lanes o0 and o1 of one Philox call with counter (position lo, position hi, attempt, 0)."""
    c0 = (position & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((position >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c3 = tl.zeros(c0.shape, tl.uint32)
    c2 = c3 + attempt
    o0, o1, _, _ = philox4x32(seed, c0, c1, c2, c3)
    return to_uniform(o0), to_uniform(o1)
