"""A GGUF's weights kept in their own quantized blocks (``models.load(..., weights="native")``).

A CPU decode step streams every weight once, so its speed is the bytes of the weights:
SmolLM2-135M is 98 MB in its GGUF's Q4_1 / Q8_0 blocks and 540 MB dequantized to fp32.
Here each projection keeps the file's bytes, ``blocks`` uint8 ``[N, K / block_size ·
block_bytes]`` (row n of W [N, K] is its K / block_size blocks, as in the file), and runs
on the block kernels of ``csrc/cpu/quant.h`` (:mod:`fastverify.cpu.quant`): activations
quantized to int8 per 32 values, integer dot products per weight block, each block read
once for all rows of a step. Every row is computed with the same arithmetic whatever the
number of rows, so a verification step reproduces the one-row decode step bit for bit.

Types kept as blocks: Q4_0, Q4_1, Q8_0, Q4_K, Q6_K (:data:`BLOCK_TYPES`); F32 / F16 /
BF16 tensors (norms, and matrices some files keep in float) become fp32 parameters.
Without the ``cpu`` library (no compiler, ``FASTVERIFY_CPU_KERNELS=0``) a projection
dequantizes its blocks once, on first use, and runs ``F.linear`` (correct, not fast).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import gguf

BLOCK_TYPES = {2: "Q4_0", 3: "Q4_1", 8: "Q8_0", 12: "Q4_K", 14: "Q6_K"}


def _kernels():
    """:mod:`fastverify.cpu.quant` when its library is built, else None (dense fallback)."""
    from .. import cpu
    from ..cpu import quant
    return quant if cpu.available() else None


@dataclass
class QuantizedTensor:
    """The raw blocks of a matrix ``[N, K]`` of ggml type ``ggml_type``."""
    blocks: torch.Tensor  # uint8 [N, K / block_size · block_bytes]
    ggml_type: int
    shape: tuple[int, int]

    def rows(self, index: torch.Tensor) -> "QuantizedTensor":
        """The rows ``index`` (a permutation or subset), as a new tensor."""
        return QuantizedTensor(self.blocks[index].contiguous(), self.ggml_type, (int(index.numel()), self.shape[1]))

    def dequantize(self) -> torch.Tensor:
        """float32 ``[N, K]``, bit-exact with ggml's reference dequantization."""
        return gguf.dequantize(self.blocks.numpy().reshape(-1), self.ggml_type, self.shape)


def quantize_q8_0(w: torch.Tensor) -> QuantizedTensor:
    """float ``w [N, K]`` (K a multiple of 32) as Q8_0 blocks, ggml's layout and rounding: per
    32 values d = max|w| / 127 (fp16) and q = round(w / d) (int8), 34 bytes a block."""
    N, K = w.shape
    if K % 32:
        raise ValueError(f"Q8_0 needs K divisible by 32, got {K}")
    v = w.detach().float().cpu().reshape(N, K // 32, 32)
    d = v.abs().amax(-1, keepdim=True) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(v * inv).clamp(-127, 127).to(torch.int8)
    blocks = torch.cat([d.half().view(torch.uint8), q.view(torch.uint8)], -1)   # [N, K/32, 2 + 32]
    return QuantizedTensor(blocks.reshape(N, K // 32 * 34).contiguous(), 8, (N, K))


def weight_rows(linear: nn.Module, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` of a projection's weight as float32 ``[len(index), K]`` (an ``nn.Linear``
    or a :class:`QuantizedLinear`, which dequantizes only those rows)."""
    if isinstance(linear, QuantizedLinear):
        return linear.weight_rows(index).to(index.device)
    return linear.weight.detach()[index.to(linear.weight.device)].float()


def stack_rows(parts: list[QuantizedTensor]) -> list[QuantizedTensor]:
    """Row blocks of one fused projection (q, k, v or gate, up), consecutive ones of the same
    type merged: one kernel call per run of equal types (a file may mix types: Q4_K_M keeps
    some attn_v in Q6_K)."""
    merged = [parts[0]]
    for p in parts[1:]:
        last = merged[-1]
        if p.ggml_type == last.ggml_type and p.shape[1] == last.shape[1]:
            merged[-1] = QuantizedTensor(torch.cat([last.blocks, p.blocks]), p.ggml_type,
                                         (last.shape[0] + p.shape[0], p.shape[1]))
        else:
            merged.append(p)
    return merged


class QuantizedLinear(nn.Module):
    """``y [..., N] = x [..., K] · Wᵀ (+ bias)`` with W kept as GGUF blocks.

    W is one or more row ranges (``parts``, stacked in order), each of one ggml type.
    :meth:`project` adds the fused prologue (RMSNorm or SwiGLU) and residual of the
    decode step.
    """

    def __init__(self, parts: list[QuantizedTensor], bias: torch.Tensor | None = None):
        super().__init__()
        K = parts[0].shape[1]
        if any(p.shape[1] != K for p in parts):
            raise ValueError(f"the parts of a projection must share K, got {[p.shape for p in parts]}")
        self.in_features = K
        self.out_features = sum(p.shape[0] for p in parts)
        self.part_types = [p.ggml_type for p in parts]
        self.part_rows = [p.shape[0] for p in parts]
        for i, p in enumerate(parts):
            self.register_buffer(f"blocks{i}", p.blocks)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._dense: torch.Tensor | None = None

    def parts(self) -> list[QuantizedTensor]:
        return [QuantizedTensor(getattr(self, f"blocks{i}"), t, (n, self.in_features))
                for i, (t, n) in enumerate(zip(self.part_types, self.part_rows))]

    @property
    def weight(self) -> torch.Tensor:
        """W dequantized to float32 ``[N, K]`` (computed once and kept: for code that needs the
        whole dense matrix, such as a layer-skip drafter's own head; a subset of rows is
        :meth:`weight_rows`; the model's own steps never call it)."""
        if self._dense is None:
            self._dense = torch.cat([p.dequantize() for p in self.parts()])
        return self._dense

    def weight_rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` of W dequantized to float32 ``[len(index), K]``, reading only those
        rows' blocks (a head subset costs its rows, not the dense copy :attr:`weight` keeps)."""
        index = index.long().cpu()
        out = torch.empty(len(index), self.in_features)
        start = 0
        for p in self.parts():
            n = p.shape[0]
            inside = ((index >= start) & (index < start + n)).nonzero()[:, 0]
            if len(inside):
                out[inside] = p.rows(index[inside] - start).dequantize()
            start += n
        return out

    def project(self, x: torch.Tensor, *, norm: torch.Tensor | None = None, eps: float = 0.0, swiglu: bool = False,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """``residual + prologue(x) · Wᵀ + bias``: prologue RMSNorm with ``norm [K]``, or
        ``swiglu`` (x is ``[..., 2K]`` = [gate | up], the input silu(gate) · up)."""
        quant_kernels = _kernels()
        if quant_kernels is None:
            return self._project_dense(x, norm, eps, swiglu, residual)
        if x.numel() == 0:  # a prefill that wants no logits
            return x.new_empty(*x.shape[:-1], self.out_features, dtype=torch.float32)
        outs, start = [], 0
        for p in self.parts():
            n = p.shape[0]
            bias = None if self.bias is None else self.bias[start:start + n]
            res = None if residual is None else residual[..., start:start + n]
            outs.append(quant_kernels.linear(x, p.blocks, p.ggml_type, self.in_features, bias, norm=norm, eps=eps,
                                             swiglu=swiglu, residual=res))
            start += n
        return outs[0] if len(outs) == 1 else torch.cat(outs, -1)

    def _project_dense(self, x, norm, eps, swiglu, residual):
        x = x.float()
        if norm is not None:
            x = norm * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
        if swiglu:
            gate, up = x.chunk(2, -1)
            x = F.silu(gate) * up
        y = F.linear(x, self.weight, self.bias)
        return y if residual is None else residual + y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(x)

    def extra_repr(self) -> str:
        types = "+".join(f"{BLOCK_TYPES[t]}[{n}]" for t, n in zip(self.part_types, self.part_rows))
        return f"in_features={self.in_features}, out_features={self.out_features}, blocks={types}"


class QuantizedEmbedding(nn.Module):
    """Token embeddings ``[V, d]`` kept as GGUF blocks; a lookup dequantizes the rows it reads."""

    def __init__(self, table: QuantizedTensor):
        super().__init__()
        self.num_embeddings, self.embedding_dim = table.shape
        self.ggml_type = table.ggml_type
        self.register_buffer("blocks", table.blocks)

    def table(self) -> QuantizedTensor:
        return QuantizedTensor(self.blocks, self.ggml_type, (self.num_embeddings, self.embedding_dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        ids = tokens.reshape(-1)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings):
            raise ValueError(f"token ids must be in [0, {self.num_embeddings}), got {int(ids.min())}..{int(ids.max())}")
        quant_kernels = _kernels()
        if quant_kernels is not None:
            rows = quant_kernels.dequantize_rows(self.blocks, self.ggml_type, self.embedding_dim, ids)
        else:
            rows = self.table().rows(ids.cpu()).dequantize()
        return rows.view(*tokens.shape, self.embedding_dim)


# --------------------------------------------------------------------------- reading


def read_gguf_native(path: str) -> tuple[dict, dict, dict | None]:
    """As :func:`fastverify.models.gguf.read_gguf`, with every 2-D tensor of a block type
    (:data:`BLOCK_TYPES`) kept as a :class:`QuantizedTensor` (its bytes copied out of the
    mapped file; Q/K rows of llama-arch files put back in Hugging Face's rotary order by
    moving whole rows, which is exact). Other tensors are dequantized to float32."""
    return gguf.read_gguf(path, keep=_blocks_of)


def _blocks_of(gguf_file, info) -> QuantizedTensor | None:
    if info.ggml_type not in BLOCK_TYPES or len(info.shape) != 2:
        return None
    N, K = info.shape
    blocks = torch.from_numpy(np.array(gguf_file.raw(info)).reshape(N, -1))  # np.array: a copy
    return QuantizedTensor(blocks, info.ggml_type, (N, K))


# Hugging Face names -> this model's modules and the Hugging Face tensors stacked into them
_PROJECTIONS = {"self_attn.wqkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                "self_attn.o_proj": ("self_attn.o_proj",),
                "mlp.w13": ("mlp.gate_proj", "mlp.up_proj"),
                "mlp.down_proj": ("mlp.down_proj",)}


def install_quantized(model: nn.Module, state_dict: dict) -> dict:
    """Swap ``model``'s projections, embedding and head for block-kept ones wherever
    ``state_dict`` (Hugging Face names) holds :class:`QuantizedTensor` s; returns the rest of
    the state dict (float tensors) with the consumed entries removed."""
    rest = dict(state_dict)
    n_layers = len(model.model.layers)
    for i in range(n_layers):
        layer, pre = model.model.layers[i], f"model.layers.{i}."
        for target, sources in _PROJECTIONS.items():
            names = [f"{pre}{s}.weight" for s in sources]
            found = [rest.get(n) for n in names]
            if not any(isinstance(t, QuantizedTensor) for t in found):
                continue
            if not all(isinstance(t, QuantizedTensor) for t in found):
                # a float part among block ones (rare): the fused projection runs dense, in fp32
                for n, t in zip(names, found):
                    if isinstance(t, QuantizedTensor):
                        rest[n] = t.dequantize()
                continue
            biases = [rest.pop(f"{pre}{s}.bias", None) for s in sources]
            bias = torch.cat(biases).float() if all(b is not None for b in biases) else None
            for n in names:
                rest.pop(n)
            parent_name, attr = target.split(".")
            setattr(getattr(layer, parent_name), attr, QuantizedLinear(stack_rows(found), bias))
    embed = rest.get("model.embed_tokens.weight")
    head = rest.get("lm_head.weight", embed if model.config.tie_embeddings else None)
    if isinstance(embed, QuantizedTensor):
        model.model.embed_tokens = QuantizedEmbedding(rest.pop("model.embed_tokens.weight"))
    if isinstance(head, QuantizedTensor):
        rest.pop("lm_head.weight", None)
        model.lm_head = QuantizedLinear([head])
    return rest


def is_native(model: nn.Module) -> bool:
    """Whether ``model`` runs any projection on GGUF blocks."""
    return any(isinstance(m, (QuantizedLinear, QuantizedEmbedding)) for m in model.modules())


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights a decode step reads (blocks and float parameters, shared ones once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen and t.dtype in (torch.uint8, torch.float32, torch.float16, torch.bfloat16):
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
