"""Benchmark of ``tree_attention``: B requests, each a prefix of P tokens followed by its
own draft tree of n nodes, over a paged cache.

Inputs: EAGLE-like random trees (depth ``round(log2 n) + 2``, at most 10 children of the
root, wider levels near the root, top-ranked nodes expanded most; each request its own
tree); a paged cache ``[pages, 16, Hkv, D]`` with every request's pages shuffled; q/K/V
``randn`` in the dtype; ``tree_mask`` from ``fastverify.build_tree``.

Baselines, measured in the same run:

* ``sdpa`` — an engine without a tree kernel: gather each request's K/V from its pages
  into a contiguous ``[B, Hkv, P+n, D]`` buffer, unpack the ancestor bits into a dense
  boolean mask ``[B, 1, n, P+n]`` (prefix all true) and call
  ``F.scaled_dot_product_attention`` (GQA by ``enable_gqa``). Gather and mask are timed.
* ``flex`` — FlexAttention compiled with ``torch.compile(dynamic=False)`` over the same
  gathered K/V (gather timed), ``mask_mod`` = prefix or ancestor bit; the block mask is
  built once outside the timing, and ``create_block_mask`` is timed apart (row
  ``flex.create_block_mask``, a setup cost).

Bytes (the bound): each request's prefix K and V read once, ``B·P·Hkv·D·2·bytes``.
"""

from __future__ import annotations

import math
import random

import torch

import fastverify

from .core import DTYPES, Case, Impl, close, generator, kernel_impls

FAMILY = "tree_attention"
PAGE = 16
TOP_K = 10                         # most children of the root (EAGLE-2's top-k)
TARGETS = {"pct_of_bound": 70.0, "speedup": {"flex": 2.0}}
# on CPU (issue 18; compute-bound at the goal shape: GFLOP/s reported beside)
CPU_TARGETS = {(8, 8192, 64, 32, 8, 128, "bf16"): {"speedup": {"sdpa": 1.0, "flex": 1.0}},
               (1, 1024, 8, 32, 8, 128, "bf16"): {"speedup": {"sdpa": 1.5, "flex": 1.5}}}
TOLERANCE = {"bf16": (1e-2, 2e-2), "fp16": (2e-3, 5e-3), "fp32": (1e-4, 2e-3)}    # (atol, rtol·max|ref|)
# (B, P, n, Hq, Hkv, D, dtype)
SHAPES = {
    "smoke": [(2, 40, 6, 4, 2, 64, "fp32")],
    "goal": [(8, 8192, 64, 32, 8, 128, "bf16"), (1, 1024, 8, 32, 8, 128, "bf16")],
    "grid": [(B, P, n, 32, 8, 128, "bf16") for B in (1, 8, 32) for P in (1024, 8192, 32768) for n in (8, 32, 64, 128)],
    "cpu": [(B, P, n, 32, 8, 128, "fp32") for B in (1, 4) for P in (512, 2048) for n in (8, 32)],
}
GOAL = (8, 8192, 64, 32, 8, 128, "bf16")


# =========================================================================== inputs


def eagle_parents(n: int, rng: random.Random) -> list[int]:
    """Tree-local parents of an EAGLE-like tree of n nodes numbered level by level
    (parents precede children): depth ``round(log2 n) + 2``, at most TOP_K root children,
    deeper level sizes proportional to (depth − d + 1), each node's parent drawn from the
    previous level with weight 1 / (rank + 1)."""
    depth = 0 if n <= 1 else max(1, min(n - 1, round(math.log2(n)) + 2))
    if depth == 0:
        return [-1]
    w = [depth - d + 1 for d in range(1, depth + 1)]
    first = min(TOP_K, max(1, round((n - 1) * w[0] / sum(w))), n - depth)
    rest = n - 1 - first
    sizes = [first] + [max(1, round(rest * x / sum(w[1:]))) for x in w[1:]]
    while sum(sizes) > n - 1:                       # rounding: trim the widest deeper level ...
        sizes[max(range(1, depth), key=lambda k: sizes[k])] -= 1
    while sum(sizes) < n - 1:                       # ... or grow the second level
        sizes[min(1, depth - 1)] += 1
    parents, prev = [-1], [0]
    for size in sizes:
        chosen = sorted(rng.choices(range(len(prev)), weights=[1 / (r + 1) for r in range(len(prev))], k=size))
        parents += [prev[c] for c in chosen]           # siblings adjacent, in their parent's rank order
        prev = list(range(len(parents) - size, len(parents)))
    return parents


def inputs(B: int, P: int, n: int, Hq: int, Hkv: int, D: int, dtype: str, device, seed: int = 0) -> dict:
    """The op's arguments and what the baselines need (``P``, ``n``, bit tables)."""
    rng = random.Random(1_000_003 * seed + 7)
    parents = sum((eagle_parents(n, rng) for _ in range(B)), [])
    L = P + n
    per_req = -(-L // PAGE)
    pages = B * per_req + 1                                            # one spare page nobody owns
    block_table = torch.randperm(pages, generator=torch.Generator().manual_seed(seed))[:B * per_req]
    gen = generator(device, seed)
    dt = DTYPES[dtype]
    k_cache = torch.randn(pages, PAGE, Hkv, D, generator=gen, device=device, dtype=dt)
    v_cache = torch.randn(pages, PAGE, Hkv, D, generator=gen, device=device, dtype=dt)
    q = torch.randn(B * n, Hq, D, generator=gen, device=device, dtype=dt)
    cu = torch.arange(B + 1, dtype=torch.int32) * n
    with fastverify.use_backend("torch"):                              # on the host: exact and checked
        tree_mask, _, _ = fastverify.build_tree(torch.tensor(parents, dtype=torch.int32), cu,
                                                torch.full((B,), P, dtype=torch.int64), max_nodes=n)
    j = torch.arange(n, device=device)
    return dict(args=(q, k_cache, v_cache, block_table.view(B, per_req).to(torch.int32).to(device),
                      torch.full((B,), L, dtype=torch.int32, device=device), cu.to(device), tree_mask.to(device)),
                P=P, n=n, word=j // 64, shift=j % 64)


# =========================================================================== baselines


def gather_kv(k_cache, v_cache, block_table, L: int):
    """Every request's K and V, one ``index_select`` of its pages: [B, Hkv, L, D] views."""
    B, per_req = block_table.shape
    page, Hkv, D = k_cache.shape[1:]
    idx = block_table.reshape(-1)
    k = k_cache.index_select(0, idx).view(B, per_req * page, Hkv, D)[:, :L].transpose(1, 2)
    v = v_cache.index_select(0, idx).view(B, per_req * page, Hkv, D)[:, :L].transpose(1, 2)
    return k, v


def ancestor_bits(tree_mask, word, shift, B: int, n: int):
    """[B, n, n] bool: [b, i, j] = node j is node i or one of its ancestors."""
    return ((tree_mask[:, word] >> shift) & 1).bool().view(B, n, n)


def sdpa_tree_attention(x: dict):
    """The sdpa baseline (module docstring)."""
    q, k_cache, v_cache, block_table, _, _, tree_mask = x["args"]
    P, n = x["P"], x["n"]
    T, Hq, D = q.shape
    B = block_table.shape[0]
    k, v = gather_kv(k_cache, v_cache, block_table, P + n)                       # [B, Hkv, L, D]
    mask = torch.ones(B, 1, n, P + n, dtype=torch.bool, device=q.device)
    mask[:, 0, :, P:] = ancestor_bits(tree_mask, x["word"], x["shift"], B, n)
    o = torch.nn.functional.scaled_dot_product_attention(q.view(B, n, Hq, D).transpose(1, 2), k, v, attn_mask=mask,
                                                         enable_gqa=True)
    return o.transpose(1, 2).reshape(T, Hq, D)


_FLEX: dict = {}


def compiled_flex():
    """torch.compile(flex_attention, dynamic=False), once per process (one static compile
    per shape; hitting the recompile limit raises rather than running eagerly)."""
    if "fn" not in _FLEX:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention
        cfg = torch._dynamo.config
        name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
        setattr(cfg, name, max(getattr(cfg, name), 256))
        if hasattr(cfg, "fail_on_recompile_limit_hit"):
            cfg.fail_on_recompile_limit_hit = True
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


def flex_block_mask(x: dict):
    """The FlexAttention block mask of the trees: key < P, or the ancestor bit of key − P."""
    from torch.nn.attention.flex_attention import create_block_mask
    q, _, _, block_table, _, _, tree_mask = x["args"]
    B, P, n = block_table.shape[0], x["P"], x["n"]
    anc = ancestor_bits(tree_mask, x["word"], x["shift"], B, n)                  # [B, n, n]
    prefix, last = torch.tensor(P, device=q.device), n - 1

    def mask_mod(b, h, q_idx, kv_idx):          # indices clamped: padded blocks never read out of bounds
        return (kv_idx < prefix) | anc[b, q_idx.clamp(0, last), (kv_idx - prefix).clamp(0, last)]

    return create_block_mask(mask_mod, B, None, n, P + n, device=str(q.device))


def flex_call(x: dict):
    q, k_cache, v_cache, block_table = x["args"][:4]
    T, Hq, D = q.shape
    B, n = block_table.shape[0], x["n"]
    fn, block_mask = compiled_flex(), flex_block_mask(x)

    def call():
        k, v = gather_kv(k_cache, v_cache, block_table, x["P"] + n)
        o = fn(q.view(B, n, Hq, D).transpose(1, 2), k, v, block_mask=block_mask, enable_gqa=True)
        return o.transpose(1, 2).reshape(T, Hq, D)
    return call


# =========================================================================== cases


def cases(size: str, device) -> list[Case]:
    shapes = SHAPES["cpu" if size == "grid" and torch.device(device).type != "cuda" else size]
    out = []
    for B, P, n, Hq, Hkv, D, dt in shapes:
        impls = kernel_impls(lambda x: fastverify.tree_attention(*x["args"]))
        impls += [Impl("sdpa", lambda x: (lambda: sdpa_tree_attention(x)), kind="baseline"),
                  Impl("flex", flex_call, kind="baseline"),
                  Impl("flex.create_block_mask", lambda x: (lambda: flex_block_mask(x)), kind="setup",
                       checked=False)]
        out.append(Case(FAMILY, "tree_attention", dict(B=B, P=P, n=n, Hq=Hq, Hkv=Hkv, D=D, dtype=dt),
                        B * P * Hkv * D * 2 * DTYPES[dt].itemsize,
                        lambda a=(B, P, n, Hq, Hkv, D, dt): inputs(*a, device), impls,
                        check=close(*TOLERANCE[dt]), targets=TARGETS if (B, P, n, Hq, Hkv, D, dt) == GOAL else {},
                        cpu_targets=CPU_TARGETS.get((B, P, n, Hq, Hkv, D, dt), {}),
                        # q·k and p·v of every node over the prefix (the tree part is small)
                        flops=4 * B * n * Hq * P * D))
    return out
