"""Projections on GGUF quantized weights kept in their ggml blocks (``csrc/cpu/quant.h``).

A GGUF file's Q4_0 / Q4_1 / Q8_0 / Q4_K / Q6_K weights stay in their blocks (a fraction of
fp32's bytes, which is what a CPU decode step streams); :func:`linear` computes
``y = residual + prologue(x) · Wᵀ + bias`` on them with the semantics of
:func:`fastverify.cpu.step.linear` (RMSNorm or SwiGLU prologue), for any number of rows.
The inputs are quantized to int8 per 32 values (as llama.cpp does), so the result differs
from the fp32 product of the dequantized weights by at most
``Σ_blocks (d_x/2)·Σ|w|`` per output (d_x = max|x_block| / 127) plus fp32 rounding. Each
row's result has the same bits whatever the other rows of the call and the thread count.

:func:`dequantize_rows` gives selected rows in float32, bit-exact with
:func:`fastverify.models.gguf.dequantize` (embedding lookups, fallbacks).
"""

from __future__ import annotations

import operator

import torch

from . import f32, function, i32, i64, ptr

# ggml type id -> (name, values per block, bytes per block)
QUANT_TYPES = {2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 8: ("Q8_0", 32, 34), 12: ("Q4_K", 256, 144),
               14: ("Q6_K", 256, 210)}


_bound = None


def _bind():
    global _bound
    if _bound is None:
        _bound = (function("fastverify_qlinear", i32, ptr, i64, ptr, i32, ptr, ptr, i64, ptr, i64, i64, i64, i64, ptr,
                           f32, i32, i32),
                  function("fastverify_dequantize_rows", i32, ptr, i32, i64, ptr, i64, ptr, i32))
    return _bound


def row_bytes(ggml_type: int, K: int) -> int:
    """Bytes of one weight row of ``K`` values of ``ggml_type``."""
    _, bs, bb = QUANT_TYPES[ggml_type]
    return K // bs * bb


def _check_weight(weight_blocks: torch.Tensor, ggml_type: int, K: int) -> int:
    """Checks the type, K and the blocks ``[N, K/bs·block_bytes]``; returns N."""
    if not isinstance(ggml_type, int) or ggml_type not in QUANT_TYPES:
        raise ValueError(f"ggml_type must be one of {sorted(QUANT_TYPES)} "
                         f"({', '.join(n for n, _, _ in QUANT_TYPES.values())}), got {ggml_type!r}")
    name, bs, _ = QUANT_TYPES[ggml_type]
    if not isinstance(K, int) or K < 1 or K % bs:
        raise ValueError(f"K must be a positive multiple of {name}'s block size {bs}, got {K!r}")
    if not isinstance(weight_blocks, torch.Tensor) or weight_blocks.dtype != torch.uint8:
        raise ValueError(f"weight_blocks must be a uint8 tensor, got "
                         f"{getattr(weight_blocks, 'dtype', type(weight_blocks).__name__)}")
    if not weight_blocks.is_cpu or not weight_blocks.is_contiguous():
        raise ValueError("weight_blocks must be a contiguous CPU tensor")
    nb = row_bytes(ggml_type, K)
    if weight_blocks.ndim != 2 or weight_blocks.shape[1] != nb:
        raise ValueError(f"weight_blocks must be [N, {nb}] ({K // bs} {name} blocks of {K} values a row), "
                         f"got {tuple(weight_blocks.shape)}")
    return weight_blocks.shape[0]


def _check_f32(name: str, t: torch.Tensor, shape: tuple) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or not t.is_cpu:
        raise ValueError(f"{name} must be a float32 CPU tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.requires_grad:
        raise ValueError(f"{name} must not require grad")
    return t


def linear(x: torch.Tensor, weight_blocks: torch.Tensor, ggml_type: int, K: int, bias: torch.Tensor | None = None, *,
           norm: torch.Tensor | None = None, eps: float = 0.0, swiglu: bool = False,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """``y [..., N] = residual + prologue(x) · W[N, K]ᵀ + bias`` with W given as its ggml blocks.

    x: float32 ``[..., K]`` (``[..., 2K]`` = [gate | up] with ``swiglu``), at least one row;
    weight_blocks: contiguous uint8 ``[N, K / block_size · block_bytes]`` of ``ggml_type``
    (a key of :data:`QUANT_TYPES`); bias ``[N]``; norm ``[K]`` (RMSNorm prologue
    ``norm · x · rsqrt(mean(x²) + eps)``); residual ``[..., N]``, all float32.
    """
    N = _check_weight(weight_blocks, ggml_type, K)
    if swiglu and norm is not None:
        raise ValueError("norm and swiglu are exclusive prologues")
    width = 2 * K if swiglu else K
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or not x.is_cpu:
        raise ValueError(f"x must be a float32 CPU tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.ndim < 1 or x.shape[-1] != width or x.numel() == 0:
        raise ValueError(f"x must be [..., {width}] with at least one row, got {tuple(x.shape)}")
    if x.requires_grad:
        raise ValueError("x must not require grad")
    x2 = x if x.ndim == 2 else x.reshape(-1, width)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    bias = None if bias is None else _check_f32("bias", bias, (N,)).contiguous()
    norm = None if norm is None else _check_f32("norm", norm, (K,)).contiguous()
    res = None
    if residual is not None:
        res = _check_f32("residual", residual, (*x.shape[:-1], N)).reshape(M, N)
        if res.stride(-1) != 1:
            res = res.contiguous()
    y = torch.empty(M, N, dtype=torch.float32)
    if N:
        rc = _bind()[0](x2.data_ptr(), x2.stride(0), weight_blocks.data_ptr(), ggml_type,
                        None if bias is None else bias.data_ptr(), None if res is None else res.data_ptr(),
                        0 if res is None else res.stride(0), y.data_ptr(), N, M, N, K,
                        None if norm is None else norm.data_ptr(), float(eps), int(bool(swiglu)),
                        torch.get_num_threads())
        if rc:
            raise RuntimeError(f"fastverify_qlinear failed with code {rc}")
    return y if x.ndim == 2 else y.view(*x.shape[:-1], N)


def dequantize_rows(weight_blocks: torch.Tensor, ggml_type: int, K: int, rows) -> torch.Tensor:
    """float32 ``[len(rows), K]``: the rows ``rows`` (int sequence or integer tensor, each in
    ``[0, N)``) of the ggml blocks ``weight_blocks [N, K / block_size · block_bytes]``,
    bit-exact with :func:`fastverify.models.gguf.dequantize`."""
    N = _check_weight(weight_blocks, ggml_type, K)
    if isinstance(rows, torch.Tensor):
        if rows.dtype.is_floating_point or rows.dtype.is_complex or rows.dtype == torch.bool or rows.ndim > 1:
            raise ValueError(f"rows must be a 1-D integer tensor or sequence, got {rows.dtype} {tuple(rows.shape)}")
        idx = rows.to(device="cpu", dtype=torch.int64).reshape(-1).contiguous()
    else:
        try:
            idx = torch.tensor([operator.index(r) for r in rows], dtype=torch.int64)
        except TypeError as e:
            raise ValueError(f"rows must be a sequence of integers ({e})") from None
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= N):
        raise ValueError(f"rows must lie in [0, {N}), got values in [{int(idx.min())}, {int(idx.max())}]")
    out = torch.empty(idx.numel(), K, dtype=torch.float32)
    if idx.numel():
        rc = _bind()[1](weight_blocks.data_ptr(), ggml_type, K, idx.data_ptr(), idx.numel(), out.data_ptr(),
                        torch.get_num_threads())
        if rc:
            raise RuntimeError(f"fastverify_dequantize_rows failed with code {rc}")
    return out
