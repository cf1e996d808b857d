"""The models' fused CPU decode step (``csrc/cpu/step.cpp``) for fp32 steps of 1–16 tokens.

A decode step of a small model on CPU is bound by streaming its weights plus a fixed
cost per torch op. Torch's BLAS paths reach about half of two cores' bandwidth for
one-row products, and a layer's ~40 small ops (norms, RoPE, cache writes, paged
attention) cost more than its matmuls. These kernels run one layer in six calls:

- :func:`linear` — ``y = prologue(x) · Wᵀ (+ b) (+ residual)``, prologue RMSNorm or SwiGLU;
- :func:`qkv_rope` — split the fused q/k/v projection, q/k-norm, RoPE, write K/V to the cache;
- :func:`paged_attention` — attention over the paged cache: a tree per request (the
  ``tree_attention`` layout) or the selected chunks of a sparse draft (the
  ``sparse_kv_attention`` layout), split over keys and merged by log-sum-exp;
- :func:`decoder_layers` — those six calls for every layer of a step in one call from
  Python (the per-call cost of ctypes and torch, times six per layer, is ~20% of a step).

``python perf/decode_step.py`` times a forward with and without them. They live in the
library of the ``cpu`` backend (:mod:`fastverify.cpu`: built on first use, cached); when it
cannot be built, or with ``FASTVERIFY_CPU_KERNELS=0``, :func:`available` is False and the
model runs its torch code. The functions here check what the C code trusts (dtypes,
devices, strides).
"""

from __future__ import annotations

import torch

from . import available, f32, function, i32, i64, ptr

MAX_ROWS = 16


def _bind():
    """The step's C functions, signatures set on first use."""
    return (function("fastverify_linear_f32", i32, ptr, i64, ptr, ptr, ptr, i64, ptr, i64, i64, i64, i64, ptr, f32,
                     i32, i32),
            function("fastverify_qkv_rope_f32", None, ptr, i64, i64, i32, i32, i32, ptr, ptr, ptr, ptr, f32, ptr,
                     ptr, ptr, i64, ptr),
            function("fastverify_paged_attention_f32", None, ptr, i64, i32, i32, i32, ptr, ptr, i64, ptr, i64, i32,
                     ptr, ptr, i64, ptr, i64, ptr, ptr, i64, i32, f32, ptr, i32),
            function("fastverify_decoder_layers", i32, ptr, i64, i64, ptr, i64, i64, i32, i32, i32, f32, ptr, ptr,
                     i64, ptr, ptr, i64, i32, ptr, ptr, i64, ptr, i64, ptr, f32, i32))


def usable(x: torch.Tensor) -> bool:
    """Whether the kernels take ``x``: an fp32 CPU tensor without autograd, outside
    torch.compile tracing, with the library built."""
    return (x.dtype == torch.float32 and x.device.type == "cpu" and not x.requires_grad
            and not torch.compiler.is_compiling() and available())


def supports(x: torch.Tensor, weight: torch.Tensor | None = None) -> bool:
    """Whether the decode-step kernels take these operands: :func:`usable` ``x`` of
    1–16 rows, a contiguous fp32 weight without autograd."""
    rows = x.numel() // x.shape[-1] if x.ndim and x.shape[-1] else 0
    ok = 1 <= rows <= MAX_ROWS and usable(x)
    if weight is not None:
        ok = ok and weight.dtype == torch.float32 and weight.is_contiguous() and not weight.requires_grad
    return ok


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _rows2d(x: torch.Tensor, K: int) -> torch.Tensor:
    x2 = x.reshape(-1, K)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           norm: torch.Tensor | None = None, eps: float = 0.0, swiglu: bool = False,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """``y [..., N] = residual + prologue(x) · weight[N, K]ᵀ + bias`` for 1–16 rows of fp32
    (check :func:`supports` first).

    prologue: ``norm [K]`` given — RMSNorm ``norm · x · rsqrt(mean(x²) + eps)``;
    ``swiglu`` — x is ``[..., 2K]`` = [gate | up] and the input is ``silu(gate) · up``.
    """
    N, K = weight.shape
    x2 = _rows2d(x, 2 * K if swiglu else K)
    M = x2.shape[0]
    bias = None if bias is None else bias.contiguous()
    norm = None if norm is None else norm.contiguous()
    res = None if residual is None else _rows2d(residual, N)
    y = torch.empty(M, N, dtype=torch.float32)
    _bind()[0](x2.data_ptr(), x2.stride(0), weight.data_ptr(), _ptr(bias), _ptr(res),
                               res.stride(0) if res is not None else 0, y.data_ptr(), N, M, N, K, _ptr(norm),
                               eps, int(swiglu), torch.get_num_threads())
    return y.view(*x.shape[:-1], N)


def _slot_stride(k_cache: torch.Tensor, v_cache: torch.Tensor) -> int:
    """Floats between cache slots of a layer view ``[pages, page_size, Hkv, D]``: both views
    must share one layout with contiguous pages, slots of a page adjacent, heads packed."""
    s = k_cache.stride()
    if v_cache.stride() != s or s[3] != 1 or s[2] != k_cache.shape[3] or s[0] != s[1] * k_cache.shape[1]:
        raise ValueError(f"k/v cache views need strides (page_size·S, S, D, 1), got {s} and {v_cache.stride()}")
    return s[1]


def qkv_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
             v_cache: torch.Tensor, slots: torch.Tensor, n_heads: int, *, q_norm: torch.Tensor | None = None,
             k_norm: torch.Tensor | None = None, eps: float = 0.0) -> torch.Tensor:
    """q ``[N, Hq, D]`` from the fused projection ``qkv [N, (Hq + 2·Hkv)·D]`` (q/k RMSNorm
    over D when ``q_norm``/``k_norm [D]`` are given, RoPE with ``cos``/``sin [N, D]``); k and
    v go to the cache views ``[pages, page_size, Hkv, D]`` at flat ``slots [N]`` int64."""
    _, _, Hkv, D = k_cache.shape
    N = qkv.shape[0]
    if qkv.shape[1] != (n_heads + 2 * Hkv) * D or qkv.stride(1) != 1:
        raise ValueError(f"qkv must be [N, {(n_heads + 2 * Hkv) * D}] with contiguous rows, got {tuple(qkv.shape)}")
    if D % 2 or cos.shape != (N, D) or sin.shape != (N, D) or not (cos.is_contiguous() and sin.is_contiguous()):
        raise ValueError(f"cos/sin must be contiguous [{N}, {D}] (even D), got {tuple(cos.shape)}")
    slots = slots.to(torch.int64).contiguous()
    q = torch.empty(N, n_heads, D, dtype=torch.float32)
    _bind()[1](qkv.data_ptr(), qkv.stride(0), N, n_heads, Hkv, D, cos.data_ptr(), sin.data_ptr(),
                                 _ptr(q_norm), _ptr(k_norm), eps, q.data_ptr(), k_cache.data_ptr(),
                                 v_cache.data_ptr(), _slot_stride(k_cache, v_cache), slots.data_ptr())
    return q


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                    seq_lens: torch.Tensor, *, cu_num_nodes: torch.Tensor | None = None,
                    tree_mask: torch.Tensor | None = None, rows: torch.Tensor | None = None,
                    chunk_ids: torch.Tensor | None = None, chunk_size: int = 0,
                    sm_scale: float | None = None) -> torch.Tensor:
    """``out [N, Hq, D]``: attention of ``q [N, Hq, D]`` over the paged cache.

    Tree mode (``cu_num_nodes``, ``tree_mask``, optional ``rows``): as
    ``fastverify.tree_attention``, for the tree nodes ``rows [N]`` (default all).
    Sparse mode (``chunk_ids [B, Hkv, C]``, ``chunk_size``; N == B): as
    ``fastverify.sparse_kv_attention``.
    """
    N, Hq, D = q.shape
    B = block_table.shape[0]
    q = q.contiguous()
    i32 = (torch.int32,)
    for name, t in (("block_table", block_table), ("seq_lens", seq_lens)):
        if t.dtype not in i32 or t.device.type != "cpu":
            raise ValueError(f"{name} must be an int32 CPU tensor")
    block_table, seq_lens = block_table.contiguous(), seq_lens.contiguous()
    if chunk_ids is not None:
        if N != B or chunk_ids.dtype != torch.int32 or chunk_ids.shape[:2] != (B, k_cache.shape[2]) or chunk_size < 1:
            raise ValueError("sparse mode needs one token per request, chunk_ids [B, Hkv, C] int32 and chunk_size >= 1")
        chunk_ids = chunk_ids.contiguous()
        cu_num_nodes = tree_mask = rows = None
    else:
        if cu_num_nodes is None or tree_mask is None or tree_mask.dtype != torch.int64:
            raise ValueError("tree mode needs cu_num_nodes [B+1] int32 and tree_mask [T, W] int64")
        cu_num_nodes, tree_mask = cu_num_nodes.contiguous(), tree_mask.contiguous()
        rows = None if rows is None else rows.to(torch.int64).contiguous()
    out = torch.empty(N, Hq, D, dtype=torch.float32)
    scale = D ** -0.5 if sm_scale is None else sm_scale
    _bind()[2](
        q.data_ptr(), N, Hq, k_cache.shape[2], D, k_cache.data_ptr(), v_cache.data_ptr(),
        _slot_stride(k_cache, v_cache), block_table.data_ptr(), block_table.stride(0), k_cache.shape[1],
        seq_lens.data_ptr(), _ptr(cu_num_nodes), B, _ptr(tree_mask), tree_mask.shape[1] if tree_mask is not None else 0,
        _ptr(rows), _ptr(chunk_ids), chunk_ids.shape[2] if chunk_ids is not None else 0, chunk_size, scale,
        out.data_ptr(), torch.get_num_threads())
    return out


def _step_tensors(step):
    """The step's index tensors as the C code reads them (contiguous, int32/int64)."""
    rows = None if step.rows is None else step.rows.to(torch.int64).contiguous()
    return (step.slots.to(torch.int64).contiguous(), step.block_table.contiguous(), step.seq_lens.contiguous(),
            step.cu_num_nodes.contiguous(), step.tree_mask.contiguous(), rows)


# Per layer, the int64 record fastverify_decoder_layers reads (step.cpp): 7 addresses, then per
# projection (qkv, o, w13, down) a part count and up to 3 parts of (address, ggml type, rows).
MAX_PARTS = 3
LAYER_RECORD = 7 + 4 * (1 + 3 * MAX_PARTS)


def _projection_record(proj) -> list[int]:
    """A projection's parts: ``(address, ggml type, rows)`` each; an fp32 ``Linear`` is one part
    of type 0 (ggml's F32), a ``QuantizedLinear`` its row ranges of GGUF blocks."""
    if hasattr(proj, "parts"):
        parts = [(p.blocks.data_ptr(), p.ggml_type, p.shape[0]) for p in proj.parts()]
    else:
        parts = [(proj.weight.data_ptr(), 0, proj.weight.shape[0])]
    if len(parts) > MAX_PARTS:
        raise ValueError(f"a projection of more than {MAX_PARTS} row blocks of different types")
    record = [len(parts)]
    for part in parts + [(0, 0, 0)] * (MAX_PARTS - len(parts)):
        record += part
    return record


class LayerPlan:
    """What :func:`decoder_layers` hands the C code for a list of layers over one cache: the
    per-layer records (addresses of weights, norms and cache views) and the cache layout.
    Built once per (layers, cache): addresses do not move, and rebuilding the records from
    the modules costs ~3 ms per step in Python."""

    def __init__(self, layers, k_caches, v_caches):
        a = layers[0].self_attn.args
        records = []
        for layer, kc, vc in zip(layers, k_caches, v_caches):
            attn, mlp = layer.self_attn, layer.mlp
            records += [layer.input_layernorm.weight.data_ptr(), layer.post_attention_layernorm.weight.data_ptr(),
                        attn.q_norm.weight.data_ptr() if a.qk_norm else 0,
                        attn.k_norm.weight.data_ptr() if a.qk_norm else 0,
                        kc.data_ptr(), vc.data_ptr(), _ptr(attn.wqkv.bias) or 0]
            for proj in (attn.wqkv, attn.o_proj, mlp.w13, mlp.down_proj):
                records += _projection_record(proj)
        self.args = a
        self.n_layers = len(layers)
        self.records = torch.tensor(records, dtype=torch.int64)
        self.slot_stride = _slot_stride(k_caches[0], v_caches[0])
        self.page_size = k_caches[0].shape[1]


def decoder_layers(plan: LayerPlan, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step) -> torch.Tensor:
    """``x [N, d]`` through the decoder layers of ``plan`` (fastverify.models.DecoderLayer
    with fp32 or GGUF-block projections, each writing and reading its cache view) for one
    step (``step``: a fastverify.models.Step without a sparse draft); the same math as each
    layer's ``forward_cpu``. ``cos``/``sin [N, D]``. fp32 projections take 1–16 rows, GGUF
    blocks any number."""
    a = plan.args
    N, d = x.shape
    slots, table, lens, cu, mask, rows = _step_tensors(step)
    x = x.contiguous().clone()
    rc = _bind()[3](
        x.data_ptr(), N, plan.n_layers, plan.records.data_ptr(), d, a.intermediate_size, a.n_heads, a.n_kv_heads,
        a.head_dim, a.norm_eps, cos.contiguous().data_ptr(), sin.contiguous().data_ptr(), plan.slot_stride,
        slots.data_ptr(), table.data_ptr(), table.stride(0), plan.page_size, lens.data_ptr(), cu.data_ptr(),
        table.shape[0], mask.data_ptr(), mask.shape[1], _ptr(rows), a.head_dim ** -0.5, torch.get_num_threads())
    if rc:
        raise ValueError(f"decoder_layers: {N} tokens through fp32 weights (1..{MAX_ROWS}) or an unsupported "
                         f"weight type (code {rc})")
    return x
