"""Small @triton.jit helpers shared by the kernel families."""

import triton
import triton.language as tl


@triton.jit
def request_of_row(cu_ptr, row, B, ROW_EXTRA: tl.constexpr):
    """Largest b in [0, B) with cu[b] + b·ROW_EXTRA <= row (binary search over the
    exclusive prefix sum cu of a ragged batch)."""
    lo = tl.zeros([], tl.int32)
    hi = tl.zeros([], tl.int32) + B
    while hi - lo > 1:
        mid = (lo + hi) // 2
        first = tl.load(cu_ptr + mid) + mid * ROW_EXTRA
        right = first <= row
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    return lo
