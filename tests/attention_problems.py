"""Paged-KV tree-attention inputs and the naive oracles: ancestor masks from parent
walks, per-node attention over the root-to-node path (float64 loops), and dense SDPA
with the full boolean mask."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from problems import random_tree


def tree_parents(kind: str, n: int, g: torch.Generator) -> list[int]:
    if n == 1 or kind == "single":
        return [-1]
    if kind == "chain":
        return [-1] + list(range(n - 1))
    if kind == "star":
        return [-1] + [0] * (n - 1)
    if kind == "full":                       # complete binary tree
        return [-1] + [(j - 1) // 2 for j in range(1, n)]
    return random_tree(n, 1000, g)[0]



def build_tree_cases(g: torch.Generator):
    """Trees of every kind for build_tree — a single node, random, a full 64-node tree,
    one wider than a mask word, a chain — with their prefix lengths (one past 2**32) and
    cu_num_nodes: (parents per tree, prefix_lens, cu_num_nodes [B+1] int32)."""
    sizes = [1, 5, 64, 100, 3]
    kinds = ["single", "random", "full", "random", "chain"]
    parents = [tree_parents(k, n, g) for k, n in zip(kinds, sizes)]
    prefixes = [0, 7, 1000, 3, 2**33]
    cu = torch.tensor([0] + list(torch.tensor(sizes).cumsum(0)), dtype=torch.int32)
    return parents, prefixes, cu

def ancestors(parents: list[int], i: int) -> list[int]:
    """Root-to-node path of tree-local node i."""
    path = [i]
    while parents[path[-1]] >= 0:
        path.append(parents[path[-1]])
    return path[::-1]


def mask_words_oracle(parents: list[int], words: int) -> list[list[int]]:
    rows = []
    for i in range(len(parents)):
        bits = 0
        for j in ancestors(parents, i):
            bits |= 1 << j
        row = [(bits >> (64 * w)) & (2**64 - 1) for w in range(words)]
        rows.append([x - 2**64 if x >= 2**63 else x for x in row])
    return rows


@dataclass
class Paged:
    q: torch.Tensor               # [T, Hq, D]
    k_cache: torch.Tensor         # [P, page, Hkv, D]
    v_cache: torch.Tensor
    block_table: torch.Tensor     # [B, max_pages] int32
    seq_lens: torch.Tensor        # [B] int32
    cu: torch.Tensor              # [B + 1] int32
    tree_mask: torch.Tensor       # [T, W] int64
    parents: list[list[int]]      # tree-local parents per request
    prefixes: list[int]

    def to(self, device):
        return replace(self, **{k: getattr(self, k).to(device) for k in
                                ("q", "k_cache", "v_cache", "block_table", "seq_lens", "cu", "tree_mask")})

    def args(self):
        return (self.q, self.k_cache, self.v_cache, self.block_table, self.seq_lens, self.cu, self.tree_mask)


def paged_problem(sizes, prefixes, *, Hq=4, Hkv=2, D=64, page=16, dtype=torch.float32, kind="random", seed=0,
                  shuffle=True, spare_columns=1, words=None) -> Paged:
    g = torch.Generator().manual_seed(seed)
    B = len(sizes)
    parents = [tree_parents(kind, n, g) for n in sizes]
    lens = [p + n for p, n in zip(prefixes, sizes)]
    pages = [max(1, math.ceil(L / page)) for L in lens]
    width = max(pages) + spare_columns
    P = sum(pages) + 3
    ids = torch.randperm(P, generator=g) if shuffle else torch.arange(P)
    table = torch.zeros(B, width, dtype=torch.int32)
    used = 0
    for b in range(B):
        table[b, :pages[b]] = ids[used:used + pages[b]]
        table[b, pages[b]:] = ids[(used + pages[b]) % P]     # unused columns point at some real page
        used += pages[b]
    W = words or max(1, math.ceil(max(sizes) / 64))
    mask = torch.tensor(sum((mask_words_oracle(p, W) for p in parents), []), dtype=torch.int64)
    T = sum(sizes)
    return Paged(q=torch.randn(T, Hq, D, generator=g).to(dtype),
                 k_cache=torch.randn(P, page, Hkv, D, generator=g).to(dtype),
                 v_cache=torch.randn(P, page, Hkv, D, generator=g).to(dtype),
                 block_table=table, seq_lens=torch.tensor(lens, dtype=torch.int32),
                 cu=torch.tensor([0] + list(torch.tensor(sizes).cumsum(0)), dtype=torch.int32),
                 tree_mask=mask, parents=parents, prefixes=list(prefixes))


def key_at(cache, table, b, pos):
    page = cache.shape[1]
    return cache[int(table[b, pos // page]), pos % page]       # [H, D]


def path_attention_oracle(p: Paged, sm_scale=None) -> torch.Tensor:
    """For each node: plain attention (float64) over the prefix followed by the node's
    own root-to-node path — causal attention of that path as a sequence."""
    T, Hq, D = p.q.shape
    Hkv = p.k_cache.shape[2]
    G = Hq // Hkv
    scale = D ** -0.5 if sm_scale is None else sm_scale
    out = torch.zeros(T, Hq, D, dtype=torch.float64)
    cu = p.cu.tolist()
    for b, parents in enumerate(p.parents):
        prefix = p.prefixes[b]
        for i in range(len(parents)):
            positions = list(range(prefix)) + [prefix + j for j in ancestors(parents, i)]
            K = torch.stack([key_at(p.k_cache, p.block_table, b, x) for x in positions]).double()  # [L, Hkv, D]
            V = torch.stack([key_at(p.v_cache, p.block_table, b, x) for x in positions]).double()
            qi = p.q[cu[b] + i].double()                                                          # [Hq, D]
            for h in range(Hq):
                w = torch.softmax(K[:, h // G] @ qi[h] * scale, 0)
                out[cu[b] + i, h] = w @ V[:, h // G]
    return out


def dense_sdpa_oracle(p: Paged) -> torch.Tensor:
    """Per request: SDPA (float64) over all its keys with the dense boolean mask
    [prefix: all True | tree part: ancestor-or-self]."""
    T, Hq, D = p.q.shape
    Hkv = p.k_cache.shape[2]
    out = torch.zeros(T, Hq, D, dtype=torch.float64)
    cu = p.cu.tolist()
    for b, parents in enumerate(p.parents):
        n, prefix = len(parents), p.prefixes[b]
        L = prefix + n
        K = torch.stack([key_at(p.k_cache, p.block_table, b, x) for x in range(L)]).double()
        V = torch.stack([key_at(p.v_cache, p.block_table, b, x) for x in range(L)]).double()
        allow = torch.zeros(n, L, dtype=torch.bool)
        allow[:, :prefix] = True
        for i in range(n):
            for j in ancestors(parents, i):
                allow[i, prefix + j] = True
        q = p.q[cu[b]:cu[b] + n].double().transpose(0, 1)[None]                       # [1, Hq, n, D]
        k = K.transpose(0, 1).repeat_interleave(Hq // Hkv, 0)[None]                   # [1, Hq, L, D]
        v = V.transpose(0, 1).repeat_interleave(Hq // Hkv, 0)[None]
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allow)
        out[cu[b]:cu[b] + n] = o[0].transpose(0, 1)
    return out


# Bad paged-KV arguments both attention ops refuse with the same message: name ->
# (overrides of a valid call built from a problem p with 2 KV heads of head_dim 16, message).
PAGED_KV_BAD = {
    "q_2d": (lambda p: dict(q=p.q[0]), "q must have 3 dimension"),
    "q_int": (lambda p: dict(q=p.q.long()), "q must be float16/bfloat16/float32"),
    "cache_dtype": (lambda p: dict(k_cache=p.k_cache.double()), "k_cache must be float32"),
    "head_dim_mismatch": (lambda p: dict(q=p.q[..., :8].contiguous()), "does not match q head_dim"),
    "gqa": (lambda p: dict(q=torch.randn(p.q.shape[0], 3, 16)), "not a multiple of the 2 KV heads"),
    "block_table_dtype": (lambda p: dict(block_table=p.block_table.long()), "block_table must be int32"),
    "block_table_rows": (lambda p: dict(block_table=p.block_table[:1]), "block_table must have shape"),
    "block_table_short": (lambda p: dict(block_table=p.block_table[:, :2]), "block_table is too short"),
    "page_out_of_range": (lambda p: dict(block_table=torch.where(p.block_table == p.block_table[1, 0], 999,
                                                                 p.block_table)), "page id outside"),
    "seq_lens_dtype": (lambda p: dict(seq_lens=p.seq_lens.long()), "seq_lens must be int32"),
    "device_mismatch": (lambda p: dict(seq_lens=torch.empty(2, dtype=torch.int32, device="meta")),
                        "seq_lens is on meta"),
}
