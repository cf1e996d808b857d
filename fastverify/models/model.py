"""Reference Llama / Qwen2 / Qwen3 decoder in plain PyTorch, with a paged KV cache.

One forward serves every step of every decoding method: the tokens of a step form
one *tree* per request (a single node for autoregressive decoding, a chain for a
prompt or chain speculation, a tree for tree speculation), their K/V are written into
the paged cache and attention runs through ``fastverify.tree_attention``.

Shapes: T = tokens of the step (all requests, flattened), B = requests, d = hidden
size, Hq / Hkv = query / KV heads, D = head_dim, V = vocabulary.

    Llama   x = x + o(attn(rope(q(n1 x)), rope(k(n1 x)), v(n1 x)));  x = x + down(silu(gate(n2 x)) · up(n2 x))
    Qwen2   as Llama, with biases on q, k, v
    Qwen3   as Llama, with RMSNorm over head_dim on q and k before RoPE
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops._common import row_requests
from ..cpu import step as cpu_kernels

ARCHITECTURES = ("llama", "qwen2", "qwen3")


@dataclass
class ModelArgs:
    arch: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = field(default_factory=tuple)

    @property
    def qkv_bias(self) -> bool:
        return self.arch == "qwen2"

    @property
    def qk_norm(self) -> bool:
        return self.arch == "qwen3"

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        """From a Hugging Face ``config.json`` dict (model_type llama / qwen2 / qwen3)."""
        arch = cfg.get("model_type")
        if arch not in ARCHITECTURES:
            raise ValueError(f"unsupported model_type {arch!r}: fastverify.models supports {', '.join(ARCHITECTURES)}")
        n_heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        # transformers >= 5 writes `rope_parameters` (theta included); older files `rope_theta` + `rope_scaling`
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        return cls(
            arch=arch, vocab_size=cfg["vocab_size"], dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads, n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
            intermediate_size=cfg["intermediate_size"], norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=theta, rope_scaling=rope or None,
            max_seq_len=cfg.get("max_position_embeddings", 4096),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), bos_id=cfg.get("bos_token_id"),
            eos_ids=eos)


# --------------------------------------------------------------------------- cache and step layout


class KVCache:
    """Paged K/V of all layers.

    ``k, v [num_pages, page_size, n_layers, Hkv, D]``; position p of request b lives at
    page ``block_table[b, p // page_size]``, slot ``p % page_size``. Layer i's cache is the
    strided view ``k[:, :, i]``; keeping the layers of a slot together lets one
    ``compact_kv`` call move every layer at once (``k.flatten(2, 3)``). Pages are handed
    out in a shuffled order when ``shuffle_pages`` (nothing may assume they are contiguous).
    """

    def __init__(self, args: ModelArgs, batch_size: int, max_len: int, *, page_size: int = 16,
                 n_layers: int | None = None, dtype=torch.float32, device="cpu", shuffle_pages: bool = False):
        self.page_size = page_size
        pages_per_seq = -(-max_len // page_size)
        self.max_len = pages_per_seq * page_size
        n_pages = batch_size * pages_per_seq
        shape = (n_pages, page_size, n_layers or args.n_layers, args.n_kv_heads, args.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        order = torch.randperm(n_pages) if shuffle_pages else torch.arange(n_pages)
        self.block_table = order.view(batch_size, pages_per_seq).to(device=device, dtype=torch.int32)

    def slots(self, b: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Flat slot (page · page_size + offset) of position ``pos`` of request ``b``."""
        page = self.block_table[b, pos // self.page_size].long()
        return page * self.page_size + pos % self.page_size

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """K/V ``[N, Hkv, D]`` of layer ``layer`` into flat ``slots [N]``."""
        self.k.view(-1, *self.k.shape[2:])[slots, layer] = k.to(self.k.dtype)
        self.v.view(-1, *self.v.shape[2:])[slots, layer] = v.to(self.v.dtype)

    def compact(self, reqs: torch.Tensor, prefix_lens: torch.Tensor, accepted_nodes: torch.Tensor,
                num_accepted: torch.Tensor) -> None:
        """Move each request's accepted tree path to contiguous positions, all layers in one call."""
        ops.compact_kv(self.k.flatten(2, 3), self.v.flatten(2, 3), self.block_table[reqs], prefix_lens,
                       accepted_nodes, num_accepted)


@dataclass
class Step:
    """The tokens one forward computes, as one tree per request.

    Request ``reqs[b]``'s tree has n_b = cu_num_nodes[b+1] − cu_num_nodes[b] nodes, stored
    at cache positions ``seq_lens[b] − n_b … seq_lens[b] − 1`` in node order. ``rows``
    (when set) says which tree nodes this forward computes — the others already have
    their K/V in the cache, as when a drafter grows a tree one level at a time.
    """

    positions: torch.Tensor     # [N] int64 RoPE position of each computed token
    slots: torch.Tensor         # [N] int64 flat cache slot its K/V go to
    block_table: torch.Tensor   # [B, max_pages] int32 pages of the requests in this step
    cu_num_nodes: torch.Tensor  # [B+1] int32
    seq_lens: torch.Tensor      # [B] int32, tree included
    tree_mask: torch.Tensor     # [T, W] int64 ancestor bits of every tree node
    rows: torch.Tensor | None = None  # [N] int64 tree node of each computed token (None: N == T, all)
    max_nodes: int = 0                # nodes of the largest tree (0: unknown)
    sparse: object | None = None      # a draft over part of the cache (decoding.selfspec.KVPolicy): one token
                                      # per request, attention through sparse_kv_attention

    @classmethod
    def build(cls, cache: KVCache, reqs: torch.Tensor, parents: torch.Tensor, cu_num_nodes: torch.Tensor,
              prefix_lens: torch.Tensor, rows: torch.Tensor | None = None) -> "Step":
        """Layout of a step over requests ``reqs [B]`` (rows of the cache's block table)
        whose trees (tree-local ``parents [T]``, ``cu_num_nodes [B+1]``) hang off
        ``prefix_lens [B]`` tokens already in the cache."""
        n = cu_num_nodes[1:] - cu_num_nodes[:-1]
        max_nodes = int(n.max())
        tree_mask, positions, _ = ops.build_tree(parents, cu_num_nodes, prefix_lens, max_nodes=max_nodes)
        req, local = row_requests(cu_num_nodes, parents.numel(), 0)
        slots = cache.slots(reqs[req], prefix_lens.long()[req] + local)
        if rows is not None:
            positions, slots = positions[rows], slots[rows]
        return cls(positions, slots, cache.block_table[reqs], cu_num_nodes, (prefix_lens + n).to(torch.int32),
                   tree_mask, rows, max_nodes=max_nodes)


def cu_from_counts(counts: list[int], device=None) -> torch.Tensor:
    """Exclusive prefix sum ``[B+1]`` int32 of per-request counts (the ``cu_*`` layout)."""
    cu = [0]
    for c in counts:
        cu.append(cu[-1] + c)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def chain_parents(cu: torch.Tensor) -> torch.Tensor:
    """Parents of one chain per request (node i's parent is i − 1): ``[cu[-1]]``."""
    _, local = row_requests(cu, int(cu[-1]), 0)
    return local - 1


# --------------------------------------------------------------------------- layers


class Linear(nn.Linear):
    """``nn.Linear`` whose CPU decode steps can run ``csrc/cpu/step.cpp``.

    Once :meth:`Transformer.use_cpu_kernels` set ``cpu_kernel``, fp32 inputs of 1–16 rows
    (a decode step, a short chain) go through :func:`fastverify.cpu.step.linear`,
    which streams the weight at the memory bandwidth of the cores; torch's BLAS paths
    reach about half of it for these shapes (``python perf/decode_step.py``). Everything
    else is ``F.linear``.
    """

    cpu_kernel = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpu_kernel and cpu_kernels.supports(x, self.weight):
            return cpu_kernels.linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def project(self, x: torch.Tensor, *, norm: torch.Tensor | None = None, eps: float = 0.0, swiglu: bool = False,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """The decode step's fused projection (:func:`fastverify.cpu.step.linear`), 1–16 rows of fp32."""
        return cpu_kernels.linear(x, self.weight, self.bias, norm=norm, eps=eps, swiglu=swiglu, residual=residual)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # w · x · rsqrt(mean(x²) + eps), normalised in fp32 as Hugging Face does (F.rms_norm
        # is slower on CPU for one row: it dispatches to a composite of more ops)
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """inv_freq [D/2] = θ^(−2i/D), with Llama-3 style long-context rescaling when configured."""
    D = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    scaling = args.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "llama3":
        factor, lo, hi = scaling["factor"], scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        # long wavelengths are divided by factor, short ones kept, the band between interpolated
        smooth = ((old_len / wavelen) - lo) / (hi - lo)
        mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_len / lo, inv_freq / factor,
                               torch.where(wavelen < old_len / hi, inv_freq, mid))
    elif kind not in (None, "default"):
        raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, llama3)")
    return inv_freq.float()


def rope_tables(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin [..., 1, D] in ``dtype`` at integer positions [...] (inv_freq [D/2])."""
    angles = positions.to(inv_freq.dtype)[..., None] * inv_freq   # [..., D/2]
    angles = torch.cat((angles, angles), -1)[..., None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate halves: x·cos + rotate_half(x)·sin.  x [T, H, D], cos/sin [T, 1, D]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    cpu_kernel = False  # set by Transformer.use_cpu_kernels

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        Hq, Hkv, D = args.n_heads, args.n_kv_heads, args.head_dim
        self.wqkv = Linear(args.dim, (Hq + 2 * Hkv) * D, bias=args.qkv_bias)  # q, k, v rows stacked
        self.o_proj = Linear(Hq * D, args.dim, bias=False)
        if args.qk_norm:
            self.q_norm = RMSNorm(D, args.norm_eps)
            self.k_norm = RMSNorm(D, args.norm_eps)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [..., d] -> q [..., Hq, D], k, v [..., Hkv, D] with q/k-norm and RoPE applied."""
        a = self.args
        q, k, v = self.wqkv(x).unflatten(-1, (-1, a.head_dim)).split([a.n_heads, a.n_kv_heads, a.n_kv_heads], -2)
        if a.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin, cache: KVCache, layer: int, step: Step):
        """x [N, d] computed tokens; writes their K/V at ``step.slots`` and attends
        over each request's prefix and tree ancestors."""
        q, k, v = self.qkv(x, cos, sin)
        cache.write(layer, step.slots, k, v)
        k_cache, v_cache = cache.k[:, :, layer], cache.v[:, :, layer]
        if step.sparse is not None:  # self-speculative draft: attend to the chunks the policy picks
            ids = step.sparse.chunk_ids(layer, q, k_cache, step)
            out = ops.sparse_kv_attention(q, k_cache, v_cache, step.block_table, step.seq_lens, ids,
                                          chunk_size=step.sparse.chunk_size)
            return self.o_proj(out.flatten(-2))
        if (self.cpu_kernel and k_cache.dtype == torch.float32 and 0 < step.max_nodes <= cpu_kernels.MAX_ROWS
                and cpu_kernels.usable(q)):
            # a batch of small trees (verification) beyond the fused layer's 16 tokens: the
            # projections stay torch GEMMs, attention reads each request's keys once in C
            out = cpu_kernels.paged_attention(q, k_cache, v_cache, step.block_table, step.seq_lens,
                                              cu_num_nodes=step.cu_num_nodes, tree_mask=step.tree_mask, rows=step.rows)
            return self.o_proj(out.flatten(-2))
        if step.rows is not None:
            # nodes outside `rows` need no output: give them zero queries and drop their rows
            q = q.new_zeros(step.tree_mask.shape[0], *q.shape[1:]).index_copy_(0, step.rows, q)
        out = ops.tree_attention(q, k_cache, v_cache, step.block_table, step.seq_lens, step.cu_num_nodes,
                                 step.tree_mask)
        if step.rows is not None:
            out = out[step.rows]
        return self.o_proj(out.flatten(-2))

    def forward_dense(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Plain causal attention without a cache: x [B, L, d]."""
        q, k, v = (t.transpose(1, 2) for t in self.qkv(x, cos, sin))  # [B, H, L, D]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).flatten(-2))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w13 = Linear(args.dim, 2 * args.intermediate_size, bias=False)  # gate rows, then up rows
        self.down_proj = Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, -1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    cpu_kernel = False  # set by Transformer.use_cpu_kernels

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, cache: KVCache, layer: int, step: Step) -> torch.Tensor:
        """x [N, d] -> x + attn(n1 x), then + mlp(n2 x); cache layer ``layer``."""
        if self.cpu_kernel and cache.k.dtype == torch.float32 and self.fused_rows(x):
            return self.forward_cpu(x, cos, sin, cache, layer, step)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, step)
        return x + self.mlp(self.post_attention_layernorm(x))

    def fused_rows(self, x: torch.Tensor) -> bool:
        """Whether :meth:`forward_cpu` takes ``x``: fp32 rows on the CPU kernels, 1–16 of them
        with fp32 weights, any number with GGUF blocks (their kernels tile the rows, each row
        computed alike, so a prefill is the same arithmetic as a decode step)."""
        if any(isinstance(p, Linear) for p in (self.self_attn.wqkv, self.self_attn.o_proj, self.mlp.w13,
                                               self.mlp.down_proj)):
            return cpu_kernels.supports(x)
        return x.shape[0] >= 1 and cpu_kernels.usable(x)

    def forward_cpu(self, x, cos, sin, cache: KVCache, layer: int, step: Step) -> torch.Tensor:
        """The same layer as six calls of the CPU decode kernels (fp32 activations): a
        torch layer is ~40 small ops whose fixed costs outweigh its matmuls on CPU."""
        attn, mlp, a = self.self_attn, self.mlp, self.self_attn.args
        N = x.shape[0]
        n1, n2 = self.input_layernorm, self.post_attention_layernorm
        k_cache, v_cache = cache.k[:, :, layer], cache.v[:, :, layer]
        qkv = attn.wqkv.project(x, norm=n1.weight, eps=n1.eps)
        q = cpu_kernels.qkv_rope(qkv, cos.view(N, -1), sin.view(N, -1), k_cache, v_cache, step.slots, a.n_heads,
                                 q_norm=attn.q_norm.weight if a.qk_norm else None,
                                 k_norm=attn.k_norm.weight if a.qk_norm else None, eps=a.norm_eps)
        if step.sparse is not None:
            ids = step.sparse.chunk_ids(layer, q, k_cache, step)
            out = cpu_kernels.paged_attention(q, k_cache, v_cache, step.block_table, step.seq_lens, chunk_ids=ids,
                                              chunk_size=step.sparse.chunk_size)
        else:
            out = cpu_kernels.paged_attention(q, k_cache, v_cache, step.block_table, step.seq_lens,
                                              cu_num_nodes=step.cu_num_nodes, tree_mask=step.tree_mask, rows=step.rows)
        x = attn.o_proj.project(out.view(N, -1), residual=x)
        h = mlp.w13.project(x, norm=n2.weight, eps=n2.eps)
        return mlp.down_proj.project(h, swiglu=True, residual=x)


class Transformer(nn.Module):
    """Parameter names follow Hugging Face (``model.layers.{i}.self_attn.o_proj.weight``…)
    except the two fused projections (``self_attn.wqkv`` = q, k, v and ``mlp.w13`` = gate,
    up: one matmul each instead of three and two); :func:`fuse_hf` and :func:`unfuse_hf`
    convert state dicts."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.config = args
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.model.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.n_layers))
        self.model.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_frequencies(args), persistent=False)
        self.tokenizer = None
        self.hf_config: dict | None = None
        self.step_seconds: dict[int, float] = {}  # measured forward time per token count (decoding's cost model)
        self.layer_ids = list(range(args.n_layers))  # which layers run; a layer-skipping drafter takes a subset

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of activations and of the KV cache (GGUF blocks keep their own)."""
        return self.model.norm.weight.dtype

    def rope(self, positions: torch.Tensor):
        """cos, sin [..., 1, D] at integer positions [...]."""
        return rope_tables(self.inv_freq, positions, self.dtype)

    def use_cpu_kernels(self, on: bool = True) -> "Transformer":
        """Run fp32 CPU steps of 1–16 tokens through the decode kernels
        (:mod:`fastverify.cpu.step`: all layers in one call, and the LM head);
        builds them on first use. A no-op where they cannot be built."""
        on = on and cpu_kernels.available()
        for m in self.modules():
            if isinstance(m, (Linear, Attention, DecoderLayer)):
                m.cpu_kernel = on
        return self

    def new_cache(self, batch_size: int, max_len: int, **kw) -> KVCache:
        kw.setdefault("dtype", self.dtype)
        kw.setdefault("device", self.device)
        return KVCache(self.config, batch_size, max_len, n_layers=len(self.layer_ids), **kw)

    def forward(self, tokens: torch.Tensor, step: Step, cache: KVCache,
                logit_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[N, V]`` (or ``[len(logit_rows), V]``) of the step's computed tokens ``[N]``.

        ``cache`` holds one K/V pair per running layer (``len(self.layer_ids)``)."""
        return self.lm_head(self.hidden(tokens, step, cache, logit_rows))

    def hidden(self, tokens: torch.Tensor, step: Step, cache: KVCache, rows: torch.Tensor | None = None,
               capture: tuple[int, ...] | None = None):
        """The final-norm hidden states ``[N, d]`` (or ``[len(rows), d]``) that the LM head
        turns into logits: what a drafter with its own head (``fastverify.lm_head_topk``) needs.

        ``capture``: layer ids whose *input* (the residual stream after that many layers;
        ``n_layers``: after the last one, before the final norm — vLLM's and speculators'
        numbering of EAGLE-3's auxiliary states) to return as well: then the result is
        ``(h, feats [N or len(rows), len(capture) · d])``, in the order given. A step asked
        for nothing runs exactly as before (one fused call for all layers)."""
        x = self.model.embed_tokens(tokens)
        cos, sin = self.rope(step.positions)
        n = len(self.layer_ids)
        if capture is not None and (self.layer_ids != list(range(self.config.n_layers))
                                    or any(not 0 <= c <= n for c in capture)):
            raise ValueError(f"capture must hold layer ids in [0, {n}] of a model running all its layers, "
                             f"got {capture}")
        ends = sorted(set(capture or ())) + [n]
        feats, start = {}, 0
        for end in ends:
            if end > start:
                x = self._run_layers(start, end, x, cos, sin, cache, step)
            feats[end] = x
            start = end
        if rows is not None:
            x = x[rows]
        h = self.model.norm(x)
        if capture is None:
            return h
        f = torch.cat([feats[c] for c in capture], -1) if capture else x.new_zeros(x.shape[0], 0)
        return h, (f if rows is None else f[rows])

    def _run_layers(self, start: int, end: int, x, cos, sin, cache: KVCache, step: Step) -> torch.Tensor:
        """``x`` through running layers ``start .. end − 1`` (positions in ``layer_ids``)."""
        layers = [self.model.layers[i] for i in self.layer_ids[start:end]]
        if layers[0].cpu_kernel and step.sparse is None and cache.k.dtype == torch.float32 and layers[0].fused_rows(x):
            # the layers' forward_cpu in one call (nothing in Python between the layers)
            N = x.shape[0]
            return cpu_kernels.decoder_layers(self._layer_plan(start, end, cache), x, cos.view(N, -1),
                                              sin.view(N, -1), step)
        for i, layer in enumerate(layers, start):
            x = layer(x, cos, sin, cache, i, step)
        return x

    def _layer_plan(self, start: int, end: int, cache: KVCache) -> "cpu_kernels.LayerPlan":
        """The fused step's records of running layers ``start .. end − 1`` over ``cache``, kept
        per (layers, cache addresses): a record holds only addresses, so equal keys give
        equal records."""
        key = (tuple(self.layer_ids[start:end]), start, cache.k.data_ptr(), cache.v.data_ptr(), cache.k.stride(),
               cache.k.shape[1])
        plans = self.__dict__.setdefault("_layer_plans", {})
        plan = plans.get(key)
        if plan is None:
            if len(plans) >= 16:  # caches come and go: keep the latest few
                plans.pop(next(iter(plans)))
            layers = [self.model.layers[i] for i in self.layer_ids[start:end]]
            plan = plans[key] = cpu_kernels.LayerPlan(layers, [cache.k[:, :, i] for i in range(start, end)],
                                                      [cache.v[:, :, i] for i in range(start, end)])
        return plan

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, L, V]`` of a plain causal forward over ``input_ids [B, L]`` (no
        cache, positions 0..L−1), for checking against other implementations."""
        x = self.model.embed_tokens(input_ids.to(self.device))
        cos, sin = self.rope(torch.arange(input_ids.shape[1], device=self.device))
        for layer_id in self.layer_ids:
            layer = self.model.layers[layer_id]
            x = x + layer.self_attn.forward_dense(layer.input_layernorm(x), cos, sin)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.lm_head(self.model.norm(x))

    def with_layers(self, layer_ids) -> "Transformer":
        """A view of this model that runs only ``layer_ids`` (shared weights): the
        layer-skipping self-drafter."""
        layer_ids = sorted(set(int(i) for i in layer_ids))
        if not layer_ids or layer_ids[0] < 0 or layer_ids[-1] >= self.config.n_layers:
            raise ValueError(f"layer_ids must be a non-empty subset of 0..{self.config.n_layers - 1}, got {layer_ids}")
        view = copy.copy(self)  # shares parameters and modules
        view.layer_ids = layer_ids
        return view


FUSED = {"self_attn.wqkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.w13": ("mlp.gate_proj", "mlp.up_proj")}


def fuse_hf(state_dict: dict) -> dict:
    """Hugging Face names -> this model's: stack q/k/v (weights and biases) and gate/up."""
    out = dict(state_dict)
    layers = {k.split(".")[2] for k in state_dict if k.startswith("model.layers.")}
    for i in layers:
        pre = f"model.layers.{i}."
        for fused, parts in FUSED.items():
            for kind in ("weight", "bias"):
                names = [f"{pre}{p}.{kind}" for p in parts]
                if all(n in out for n in names):
                    out[f"{pre}{fused}.{kind}"] = torch.cat([out.pop(n) for n in names])
    return out


def unfuse_hf(state_dict: dict, args: ModelArgs) -> dict:
    """This model's names -> Hugging Face's (the inverse of :func:`fuse_hf`)."""
    sizes = {"self_attn.wqkv": [args.n_heads * args.head_dim] + [args.n_kv_heads * args.head_dim] * 2,
             "mlp.w13": [args.intermediate_size] * 2}
    out = {}
    for name, t in state_dict.items():
        fused = next((f for f in FUSED if f".{f}." in name), None)
        if fused is None:
            out[name] = t
            continue
        pre, kind = name.split(f".{fused}.")
        for part, piece in zip(FUSED[fused], t.split(sizes[fused])):
            out[f"{pre}.{part}.{kind}"] = piece
    return out
