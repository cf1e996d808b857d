"""Benchmark of the projections on GGUF quantized blocks (``fastverify.cpu.quant.linear``), CPU only.

Shapes: SmolLM2-135M's (d = 576, intermediate 1536): the layer projections in Q4_1 — q/o
576×576, k/v 192×576, gate|up 3072×576, down 576×1536 — and the tied LM head 49152×576 in
Q8_0; Q4_0, Q8_0, Q4_K and Q6_K also at 576×1536 (the K-quants need K a multiple of 256).
M = 1, 4, 16 rows. Weights: random blocks with fp16 scales in [1e-3, 2e-2], inputs ``randn``.

Baseline ``fp32``: :func:`fastverify.cpu.step.linear` (the decode step's fp32 projection) on
the dequantized weight — what the model runs without these kernels (4–7× the weight bytes).
It is the reference; the kernel differs from it by its int8 input quantisation (about 1% of
the output's scale), so the check allows 5% of max|y|.

Bytes (the bound): the weight blocks (``GB/s`` is weight bytes per second); FLOPs 2·M·N·K.
"""

from __future__ import annotations

import numpy as np
import torch

from fastverify.cpu.quant import QUANT_TYPES, row_bytes

from .core import Case, Impl, close

FAMILY = "quant"
TYPES = {2: "Q4_0", 3: "Q4_1", 8: "Q8_0", 12: "Q4_K", 14: "Q6_K"}
# (ggml type, N, K)
LAYERS = [(3, 576, 576), (3, 192, 576), (3, 3072, 576), (3, 576, 1536), (8, 49152, 576),
          (2, 576, 1536), (8, 576, 1536), (12, 576, 1536), (14, 576, 1536)]
SHAPES = {"goal": [(t, N, K, M) for t, N, K in LAYERS for M in (1, 4, 16)],
          "smoke": [(t, 64, 256, M) for t in TYPES for M in (1, 5)]}
SHAPES["grid"] = SHAPES["goal"]
# decode (M = 1) streams the weights: half of the measured copy bandwidth at the two big shapes
CPU_TARGETS = {(3, 3072, 576, 1): {"pct_of_copy": 50.0}, (8, 49152, 576, 1): {"pct_of_copy": 50.0}}


def random_blocks(ggml_type: int, N: int, K: int, seed: int = 0) -> torch.Tensor:
    """uint8 [N, K/bs·bb] of random blocks, fp16 scales (and Q4_1 mins, Q4_K dmins) in [1e-3, 2e-2]."""
    _, bs, bb = QUANT_TYPES[ggml_type]
    rng = np.random.default_rng(seed)
    n = N * (K // bs)
    b = rng.integers(0, 256, size=(n, bb), dtype=np.uint8)

    def f16():
        return rng.uniform(1e-3, 2e-2, size=n).astype(np.float16).view(np.uint8).reshape(n, 2)
    if ggml_type in (2, 8):
        b[:, 0:2] = f16()
    elif ggml_type in (3, 12):
        b[:, 0:2], b[:, 2:4] = f16(), f16()
    else:
        b[:, 208:210] = f16()
    return torch.from_numpy(b.reshape(N, -1))


def inputs(ggml_type: int, N: int, K: int, M: int) -> dict:
    from fastverify.models import gguf
    blocks = random_blocks(ggml_type, N, K)
    weight = gguf.dequantize(blocks.numpy(), ggml_type, (N, K))
    return dict(x=torch.randn(M, K, generator=torch.Generator().manual_seed(1)), blocks=blocks, weight=weight,
                ggml_type=ggml_type, K=K)


def quantized(x: dict):
    from fastverify.cpu import quant
    return lambda: quant.linear(x["x"], x["blocks"], x["ggml_type"], x["K"])


def fp32(x: dict):
    from fastverify.cpu import step
    return lambda: step.linear(x["x"], x["weight"])


def cases(size: str, device) -> list[Case]:
    if torch.device(device).type != "cpu":
        return []                       # CPU kernels only
    out = []
    for t, N, K, M in SHAPES[size]:
        shape = dict(type=TYPES[t], N=N, K=K, M=M)
        nbytes = N * row_bytes(t, K)
        impls = [Impl("fp32", fp32, kind="baseline"), Impl("cpu", quantized)]
        out.append(Case(FAMILY, "qlinear", shape, nbytes, lambda a=(t, N, K, M): inputs(*a), impls,
                        check=close(0.0, 0.05), reference="fp32", cpu_targets=CPU_TARGETS.get((t, N, K, M), {}),
                        flops=2 * M * N * K))
    return out
