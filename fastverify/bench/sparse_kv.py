"""Benchmark of sparse-KV self-speculation: ``sparse_kv_attention`` with
``select_kv_chunks`` timed alongside.

Inputs: B requests of ``ctx`` tokens in a paged cache ``[pages, 16, Hkv, D]`` (pages
shuffled), q ``[B, Hq, D]``, chunks of 16 tokens; the budget ``C·16`` tokens per (request,
KV head) is C distinct random full chunks (ascending), plus the tail the op always adds.

Baselines of ``sparse_kv_attention``, measured in the same run:

* ``full`` — full decode attention, what the target step reads: SDPA over the whole cache
  held contiguous ``[B, Hkv, ctx, D]`` (no gather; the best a dense engine does);
* ``gather+sdpa`` — the selected chunks' K/V copied out of the pages into
  ``[B, Hkv, C·16, D]``, then SDPA (a sparse draft without an in-place kernel).

Bytes (the bound): the selected K and V, ``B·Hkv·C·16·D·2·bytes``. ``select_kv_chunks``
(given incrementally maintained chunk means, as the decoder keeps them) must read the
means and q: ``B·Hkv·(ctx/16)·D·4 + B·Hq·D·bytes``.
"""

from __future__ import annotations

import torch

import fastverify

from .core import DTYPES, Case, Impl, close, exact, generator, kernel_impls

FAMILY = "sparse_kv"
CHUNK, PAGE = 16, 16
TARGETS = {"pct_of_bound": 60.0}
CPU_TARGETS = {"pct_of_copy": 50.0}   # on CPU (issue 18), both ops
TOLERANCE = {"bf16": (2e-2, 2e-2), "fp16": (2e-3, 2e-3), "fp32": (1e-4, 1e-4)}
# (B, ctx, budget, Hq, Hkv, D, dtype)
SHAPES = {
    "smoke": [(2, 200, 64, 4, 2, 64, "fp32")],
    "goal": [(8, 32768, 1024, 32, 8, 128, "bf16"), (1, 32768, 1024, 32, 8, 128, "bf16")],
    "grid": [(B, ctx, bud, 32, 8, 128, "bf16") for B in (1, 8, 32) for ctx in (8192, 32768, 131072)
             for bud in (256, 1024, 4096)],
    "cpu": [(B, ctx, bud, 32, 8, 128, "fp32") for B in (1, 4) for ctx in (2048, 8192) for bud in (256, 1024)],
}
GOAL = (8, 32768, 1024, 32, 8, 128, "bf16")


def inputs(B: int, ctx: int, budget: int, Hq: int, Hkv: int, D: int, dtype: str, device, seed: int = 0) -> dict:
    gen = generator(device, seed)
    dt = DTYPES[dtype]
    pages = -(-ctx // PAGE)
    table = torch.randperm(B * pages, generator=gen, device=device).view(B, pages).to(torch.int32)
    k = torch.randn(B * pages, PAGE, Hkv, D, generator=gen, device=device, dtype=dt)
    v = torch.randn(B * pages, PAGE, Hkv, D, generator=gen, device=device, dtype=dt)
    F, C = ctx // CHUNK, budget // CHUNK
    k_req = k[table.long()].flatten(1, 2)[:, :ctx]                                        # [B, ctx, Hkv, D]
    v_req = v[table.long()].flatten(1, 2)[:, :ctx]
    chunk_ids = torch.rand(B, Hkv, F, generator=gen, device=device).topk(C, dim=2).indices.sort(2).values
    return dict(q=torch.randn(B, Hq, D, generator=gen, device=device, dtype=dt), k_cache=k, v_cache=v,
                block_table=table, seq_lens=torch.full((B,), ctx, dtype=torch.int32, device=device),
                chunk_ids=chunk_ids.to(torch.int32), C=C,
                chunk_means=k_req[:, :F * CHUNK].reshape(B, F, CHUNK, Hkv, D).float().mean(2),   # [B, F, Hkv, D]
                k_full=k_req.transpose(1, 2).contiguous(), v_full=v_req.transpose(1, 2).contiguous())


def sparse(x: dict):
    return fastverify.sparse_kv_attention(x["q"], x["k_cache"], x["v_cache"], x["block_table"], x["seq_lens"],
                                          x["chunk_ids"], chunk_size=CHUNK)


def select(x: dict):
    return fastverify.select_kv_chunks(x["q"], x["k_cache"], x["block_table"], x["seq_lens"], chunk_size=CHUNK,
                                       num_chunks=x["C"], chunk_means=x["chunk_means"])


def full_decode(x: dict):
    """Baseline ``full``: SDPA over the whole contiguous cache."""
    return torch.nn.functional.scaled_dot_product_attention(x["q"][:, :, None], x["k_full"], x["v_full"],
                                                            enable_gqa=True)[:, :, 0]


def gather_sdpa(x: dict):
    """Baseline ``gather+sdpa``: the selected chunks copied out of the pages, then SDPA."""
    q, ids, table = x["q"], x["chunk_ids"], x["block_table"]
    B, Hkv, C = ids.shape
    pos = (ids.long()[..., None] * CHUNK + torch.arange(CHUNK, device=q.device)).flatten(2)   # [B, Hkv, C·16]
    page = table.gather(1, (pos // PAGE).view(B, -1)).view(pos.shape).long()
    h = torch.arange(Hkv, device=q.device)[None, :, None]
    k, v = x["k_cache"][page, pos % PAGE, h], x["v_cache"][page, pos % PAGE, h]               # [B, Hkv, C·16, D]
    return torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0]


def cases(size: str, device) -> list[Case]:
    shapes = SHAPES["cpu" if size == "grid" and torch.device(device).type != "cuda" else size]
    out = []
    for B, ctx, budget, Hq, Hkv, D, dt in shapes:
        shape = dict(B=B, ctx=ctx, budget=budget, Hq=Hq, Hkv=Hkv, D=D, dtype=dt)
        build = lambda a=(B, ctx, budget, Hq, Hkv, D, dt): inputs(*a, device)   # noqa: E731
        e = DTYPES[dt].itemsize
        impls = kernel_impls(sparse) + [
            Impl("full", lambda x: (lambda: full_decode(x)), kind="baseline", checked=False),
            Impl("gather+sdpa", lambda x: (lambda: gather_sdpa(x)), kind="baseline", checked=False)]
        out.append(Case(FAMILY, "sparse_kv_attention", shape, B * Hkv * budget * D * 2 * e, build, impls,
                        check=close(*TOLERANCE[dt]), targets=TARGETS if (B, ctx, budget, Hq, Hkv, D, dt) == GOAL else {},
                        cpu_targets=CPU_TARGETS if (B, ctx, budget, Hq, Hkv, D, dt) == GOAL else {}))
        out.append(Case(FAMILY, "select_kv_chunks", shape, B * Hkv * (ctx // CHUNK) * D * 4 + B * Hq * D * e, build,
                        kernel_impls(select), check=exact,
                        cpu_targets=CPU_TARGETS if (B, ctx, budget, Hq, Hkv, D, dt) == GOAL else {}))
    return out
