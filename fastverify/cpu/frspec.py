"""cpu backend of the frequency-ranked LM head: ``lm_head_topk`` and ``lm_head_sample``
(``csrc/cpu/frspec.cpp`` on the register-blocked dot products of ``csrc/cpu/linear.h``,
the code the models' decode step projects with). Entry points with the Triton launchers'
signatures; the public ops (``fastverify/ops/frspec.py``) check the arguments first.

One pass over ``weight`` in tiles of 96 subset rows x 64 hidden rows, OpenMP over the
tiles, the top-k / Gumbel-max and the softmax statistics folded per tile, then merged in
a fixed order: the results depend on the shapes only, not on the thread count. The draws
use the torch backend's noise bits (Philox stream 1, float64 Gumbel rounded to fp32).
"""

from __future__ import annotations

import torch

from . import DTYPE_CODES, function, i32, i64, ptr



def _head_args(hidden, weight, token_map):
    """(hidden, ldh, weight, dtype code, M, V, d, token_map, map64) as the C functions take
    them: rows of hidden contiguous, weight contiguous, token_map contiguous int32/int64."""
    if hidden.shape[0] > 0 and hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    weight = weight.contiguous()
    if token_map is not None:
        if token_map.dtype not in (torch.int32, torch.int64):
            token_map = token_map.long()
        token_map = token_map.contiguous()
    M, d = hidden.shape
    ldh = hidden.stride(0) if M > 1 else d
    return (hidden, ldh, weight, DTYPE_CODES[hidden.dtype], M, weight.shape[0], d, token_map,
            int(token_map is not None and token_map.dtype == torch.int64))


def _ptr(t):
    return None if t is None else t.data_ptr()


def lm_head_topk(hidden, weight, k, token_map, temperature, *, num_splits=None):
    """cpu backend of :func:`fastverify.lm_head_topk` (unchecked). ``num_splits`` is
    accepted for the Triton signature and ignored: the V_sub tiles are fixed by the shapes."""
    hidden, ldh, weight, code, M, V, d, token_map, map64 = _head_args(hidden, weight, token_map)
    ids = torch.empty((M, k), dtype=torch.int64)
    logprobs = torch.empty((M, k), dtype=torch.float32)
    lse = torch.empty((M,), dtype=torch.float32)
    if M == 0:
        return ids, logprobs, lse
    temperature = None if temperature is None else temperature.float().contiguous()
    fn = function("fastverify_lm_head_topk", i32, ptr, i64, ptr, i32, i64, i64, i64, i32, ptr, i32, ptr, ptr, ptr,
                  ptr, i32)
    rc = fn(hidden.data_ptr(), ldh, weight.data_ptr(), code, M, V, d, k, _ptr(token_map), map64, _ptr(temperature),
            ids.data_ptr(), logprobs.data_ptr(), lse.data_ptr(), torch.get_num_threads())
    if rc:
        raise RuntimeError(f"fastverify_lm_head_topk: bad arguments (code {rc})")
    return ids, logprobs, lse


def lm_head_sample(hidden, weight, temperature, seed, positions, token_map, *, num_splits=None):
    """cpu backend of :func:`fastverify.lm_head_sample` (unchecked; ``num_splits`` ignored,
    as in :func:`lm_head_topk`)."""
    hidden, ldh, weight, code, M, V, d, token_map, map64 = _head_args(hidden, weight, token_map)
    ids = torch.empty((M,), dtype=torch.int64)
    logprobs = torch.empty((M,), dtype=torch.float32)
    lse = torch.empty((M,), dtype=torch.float32)
    if M == 0:
        return ids, logprobs, lse
    temperature = temperature.float().contiguous()
    seed = seed.long().contiguous()
    positions = positions.long().contiguous()
    fn = function("fastverify_lm_head_sample", i32, ptr, i64, ptr, i32, i64, i64, i64, ptr, i32, ptr, ptr, ptr, ptr,
                  ptr, ptr, i32)
    rc = fn(hidden.data_ptr(), ldh, weight.data_ptr(), code, M, V, d, _ptr(token_map), map64, temperature.data_ptr(),
            seed.data_ptr(), positions.data_ptr(), ids.data_ptr(), logprobs.data_ptr(), lse.data_ptr(),
            torch.get_num_threads())
    if rc:
        raise RuntimeError(f"fastverify_lm_head_sample: bad arguments (code {rc})")
    return ids, logprobs, lse


def gumbel(seed: int, position: int, v0: int, n: int) -> torch.Tensor:
    """The fp32 noise the sample kernel adds to subset rows ``v0 .. v0 + n - 1`` at
    ``(seed, position)`` (for tests: ``fastverify.ops.philox.gumbel(...).float()``)."""
    out = torch.empty(n, dtype=torch.float32)
    function("fastverify_lm_head_gumbel", None, i64, i64, i64, i64, ptr)(seed, position, v0, n, out.data_ptr())
    return out


def gumbel_of_bits(o0: torch.Tensor, *, bound: bool = False):
    """The fp32 noise of Philox outputs ``o0`` (int64 holding uint32 values): the kernel's
    formula on chosen bits (for tests); with ``bound``, (noise, the upper bound the sample
    kernel's filter uses — -inf in builds without the filter)."""
    o0 = o0.long().contiguous()
    out = torch.empty(o0.numel(), dtype=torch.float32)
    up = torch.empty(o0.numel(), dtype=torch.float32) if bound else None
    function("fastverify_lm_head_gumbel_of_bits", None, ptr, i64, ptr, ptr)(o0.data_ptr(), o0.numel(), out.data_ptr(),
                                                                         _ptr(up))
    return (out, up) if bound else out
