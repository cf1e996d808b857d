"""Tree attention ops: ``fastverify::build_tree``, ``fastverify::tree_attention`` and
``fastverify::compact_kv`` over a paged KV cache.

Schemas, argument checks, fake kernels, the ``torch`` backend (the CPU kernel and
readable specification) and dispatch to ``triton`` (``fastverify/triton/tree_attention.py``)
and ``cuda`` (``csrc/cuda/tree_attention.cu``).

Layout (per request b; n_b = cu_num_nodes[b+1] - cu_num_nodes[b] tree nodes):

    k_cache, v_cache   [num_pages, page_size, Hkv, D]; key position p of request b lives
                       at page block_table[b, p // page_size], slot p % page_size
    seq_lens[b]        keys in the cache, tree included: the tree's K/V are the last n_b
                       keys, at positions prefix_b ... seq_lens[b] - 1, prefix_b = seq_lens[b] - n_b
    tree_mask [T, W]   int64 words; bit j of row i (word j // 64, bit j % 64) set iff node j
                       of the same tree is node i or an ancestor of it

Math, for node i of request b and query head h (KV head h // G, G = Hq / Hkv):

    out[i, h] = Σ_p softmax_p(s_p) · V[p, h // G],   s_p = sm_scale · q[i, h] · K[p, h // G]
    over the keys p < prefix_b (the whole prefix) and p = prefix_b + j for every j whose
    bit is set in tree_mask[i].
"""

from __future__ import annotations

import math

import torch

from .. import _backend
from .._layout import WORD, mask_words
from ._checks import ID_DTYPES, check_cu, check_tensor, check_tree, passed_before, remember_passed
from ._common import host_read_ok, implementation, row_requests

lib = torch.library.Library("fastverify", "FRAGMENT")
lib.define("build_tree(Tensor parents, Tensor cu_num_nodes, Tensor prefix_lens, *, int? max_nodes=None) "
           "-> (Tensor tree_mask, Tensor positions, Tensor depth)")
lib.define("tree_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor seq_lens, "
           "Tensor cu_num_nodes, Tensor tree_mask, *, float? sm_scale=None) -> Tensor")
lib.define("compact_kv(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor block_table, Tensor prefix_lens, "
           "Tensor accepted_nodes, Tensor num_accepted) -> ()")

ATTN_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# --------------------------------------------------------------------------- checks


def _check_cu_nodes(cu_num_nodes, dev):
    check_tensor(cu_num_nodes, "cu_num_nodes", ndim=1, dtypes=(torch.int32,), device=dev)
    if cu_num_nodes.numel() < 1:
        raise ValueError("cu_num_nodes must have B + 1 >= 1 entries (an empty batch is [0]), got none")
    return cu_num_nodes.numel() - 1


def check_build_tree(parents, cu_num_nodes, prefix_lens, max_nodes, values: bool = True) -> None:
    if not isinstance(parents, torch.Tensor):
        raise TypeError(f"parents must be a torch.Tensor, got {type(parents).__name__}")
    dev = parents.device
    check_tensor(parents, "parents", ndim=1, dtypes=ID_DTYPES, device=dev)
    B = _check_cu_nodes(cu_num_nodes, dev)
    check_tensor(prefix_lens, "prefix_lens", ndim=1, dtypes=(torch.int32, torch.int64), device=dev, shape=(B,))
    if max_nodes is not None and (not isinstance(max_nodes, int) or max_nodes < 1):
        raise ValueError(f"max_nodes must be an int >= 1 or None, got {max_nodes!r}")
    if not (values and _backend.value_checks_enabled(parents)):
        return
    check_cu(cu_num_nodes, "cu_num_nodes", parents.numel(), "parents.numel()", min_step=1)
    check_tree(parents, cu_num_nodes, max_nodes=max_nodes)
    if bool((prefix_lens < 0).any()):
        raise ValueError(f"prefix_lens must be >= 0, got {prefix_lens.tolist()}")


def _check_cache(q, k_cache, v_cache, block_table, B):
    dev = q.device
    check_tensor(k_cache, "k_cache", ndim=4, dtypes=(q.dtype,), device=dev)
    check_tensor(v_cache, "v_cache", ndim=4, dtypes=(q.dtype,), device=dev, shape=tuple(k_cache.shape))
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim (stride(-1) == 1), got strides {t.stride()}")
    check_tensor(block_table, "block_table", ndim=2, dtypes=(torch.int32,), device=dev, shape=(B, None))


def check_tree_attention(q, k_cache, v_cache, block_table, seq_lens, cu_num_nodes, tree_mask, sm_scale,
                         values: bool = True) -> None:
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    dev = q.device
    check_tensor(q, "q", ndim=3, dtypes=ATTN_DTYPES, device=dev)
    if q.stride(-1) != 1:
        raise ValueError(f"q must be contiguous in head_dim (stride(-1) == 1), got strides {q.stride()}")
    T, Hq, D = q.shape
    B = _check_cu_nodes(cu_num_nodes, dev)
    _check_cache(q, k_cache, v_cache, block_table, B)
    if k_cache.shape[3] != D:
        raise ValueError(f"k_cache head_dim {k_cache.shape[3]} does not match q head_dim {D}")
    Hkv = k_cache.shape[2]
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(f"q has {Hq} heads, not a multiple of the {Hkv} KV heads of k_cache")
    check_tensor(seq_lens, "seq_lens", ndim=1, dtypes=(torch.int32,), device=dev, shape=(B,))
    check_tensor(tree_mask, "tree_mask", ndim=2, dtypes=(torch.int64,), device=dev, shape=(T, None))
    if tree_mask.shape[1] < 1:
        raise ValueError("tree_mask needs at least one int64 word per row")
    if sm_scale is not None and not (isinstance(sm_scale, (int, float)) and math.isfinite(sm_scale)):
        raise ValueError(f"sm_scale must be a finite float or None, got {sm_scale!r}")
    if not (values and _backend.value_checks_enabled(q)):
        return
    checked = (block_table, seq_lens, cu_num_nodes, tree_mask)
    if passed_before("tree_attention", checked, (T, k_cache.shape[:2])):
        return
    check_cu(cu_num_nodes, "cu_num_nodes", T, "q.shape[0]", min_step=1)
    n = (cu_num_nodes[1:] - cu_num_nodes[:-1]).long()
    if B and int(n.max()) > WORD * tree_mask.shape[1]:
        raise ValueError(f"a tree has {int(n.max())} nodes but tree_mask rows hold {WORD * tree_mask.shape[1]} bits")
    bad = seq_lens.long() < n
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        raise ValueError(f"seq_lens[{b}] = {int(seq_lens[b])} is shorter than the {int(n[b])} tree nodes of request "
                         f"{b} (cu_num_nodes): the tree's own K/V must be the last keys in the cache")
    _check_pages(seq_lens.long(), block_table, k_cache, "seq_lens")
    _check_ancestor_closed(tree_mask, cu_num_nodes)
    remember_passed("tree_attention", checked, (T, k_cache.shape[:2]))


def _check_pages(lengths, block_table, k_cache, name):
    page = k_cache.shape[1]
    capacity = block_table.shape[1] * page
    bad = lengths > capacity
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name}[{b}] = {int(lengths[b])} needs {-(-int(lengths[b]) // page)} pages but block_table "
                         f"has {block_table.shape[1]} columns (page_size {page}): block_table is too short")
    used = torch.arange(block_table.shape[1], device=lengths.device)[None, :] * page < lengths[:, None]
    pages = block_table[used]
    if bool(((pages < 0) | (pages >= k_cache.shape[0])).any()):
        raise ValueError(f"block_table holds a page id outside [0, {k_cache.shape[0]}) for a position below {name}")


def unpack_mask(tree_mask: torch.Tensor, n: int) -> torch.Tensor:
    """Bits 0..n-1 of each row as bool [rows, n]."""
    j = torch.arange(n, device=tree_mask.device)
    return ((tree_mask[:, j // WORD] >> (j % WORD)) & 1).bool()


def _check_ancestor_closed(tree_mask, cu_num_nodes):
    """The rows of each tree are the ancestor-or-self sets of a tree rooted at node 0:
    row 0 is {0}; for i > 0, row i is {i} plus the row of its parent, the largest other
    node it allows (which precedes i)."""
    cu = cu_num_nodes.tolist()
    for b in range(len(cu) - 1):
        n0, n = cu[b], cu[b + 1] - cu[b]
        A = unpack_mask(tree_mask[n0:n0 + n], WORD * tree_mask.shape[1])
        if bool(A[:, n:].any()):
            i = int(A[:, n:].any(1).nonzero()[0, 0])
            raise ValueError(f"tree_mask[{n0 + i}] sets a bit beyond the {n} nodes of request {b}")
        A = A[:, :n]
        eye = torch.eye(n, dtype=torch.bool, device=A.device)
        if not bool(A[eye].all()):
            i = int((~A[eye]).nonzero()[0, 0])
            raise ValueError(f"tree_mask[{n0 + i}] does not set its own bit {i} (request {b})")
        if bool(torch.triu(A, 1).any()):
            i = int(torch.triu(A, 1).any(1).nonzero()[0, 0])
            raise ValueError(f"tree_mask[{n0 + i}] allows a later node of request {b}; ancestors precede their nodes")
        others = A & ~eye
        if n > 1 and not bool(others[1:].any(1).all()):
            i = 1 + int((~others[1:].any(1)).nonzero()[0, 0])
            raise ValueError(f"tree_mask[{n0 + i}] allows no ancestor: only node 0 of request {b} may be a root")
        parent = (others.long() * torch.arange(n, device=A.device)).amax(1)
        bad = (others != A[parent]).any(1)
        bad[0] = False
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"tree_mask[{n0 + i}] is not ancestor-closed (request {b}): the nodes it allows besides "
                             f"itself must be exactly the row of its parent, node {int(parent[i])}")


def check_compact_kv(k_cache, v_cache, block_table, prefix_lens, accepted_nodes, num_accepted,
                     values: bool = True) -> None:
    if not isinstance(k_cache, torch.Tensor):
        raise TypeError(f"k_cache must be a torch.Tensor, got {type(k_cache).__name__}")
    dev = k_cache.device
    check_tensor(k_cache, "k_cache", ndim=4, dtypes=ATTN_DTYPES, device=dev)
    check_tensor(accepted_nodes, "accepted_nodes", ndim=2, dtypes=(torch.int32,), device=dev)
    B = accepted_nodes.shape[0]
    _check_cache(k_cache, k_cache, v_cache, block_table, B)
    check_tensor(prefix_lens, "prefix_lens", ndim=1, dtypes=(torch.int32,), device=dev, shape=(B,))
    check_tensor(num_accepted, "num_accepted", ndim=1, dtypes=(torch.int32,), device=dev, shape=(B,))
    if not (values and _backend.value_checks_enabled(k_cache)):
        return
    D = accepted_nodes.shape[1]
    num = num_accepted.long()
    if bool(((num < 0) | (num >= D)).any()):
        raise ValueError(f"num_accepted must be in [0, {D - 1}] (accepted_nodes has {D} columns), got {num.tolist()}")
    cols = torch.arange(D, device=dev)[None, :]
    used = cols <= num[:, None]
    nodes = accepted_nodes.long()
    if bool((nodes[:, 0] != 0).any()):
        raise ValueError("accepted_nodes[:, 0] must be 0: the accepted path starts at the root")
    step = nodes[:, 1:] - nodes[:, :-1]
    if bool(((step <= 0) & used[:, 1:]).any()):
        b = int(((step <= 0) & used[:, 1:]).any(1).nonzero()[0, 0])
        raise ValueError(f"accepted_nodes[{b}] must increase along the path (a parent precedes its child), "
                         f"got {accepted_nodes[b].tolist()}")
    if bool((prefix_lens < 0).any()):
        raise ValueError(f"prefix_lens must be >= 0, got {prefix_lens.tolist()}")
    last = prefix_lens.long() + torch.where(used, nodes, 0).amax(1) + 1
    _check_pages(last, block_table, k_cache, "prefix_lens + accepted_nodes")


# --------------------------------------------------------------------------- torch backend


def build_tree_torch(parents, cu_num_nodes, prefix_lens, max_nodes):
    """torch backend of :func:`fastverify.build_tree`: since a parent precedes its
    child, one pass over the tree-local index j = 1, 2, ... fills all trees at once:
    mask[node] = mask[parent] | bit(j), depth[node] = depth[parent] + 1."""
    dev = parents.device
    T = parents.numel()
    cu = cu_num_nodes.long()
    W = mask_words(max_nodes if max_nodes is not None else T)
    row_req, local = row_requests(cu, T, 0)
    first = cu[:-1]
    gpar = torch.where(local > 0, first[row_req] + parents.long(), 0)
    word = local // WORD
    mask = torch.zeros(T, W, dtype=torch.int64, device=dev)
    mask.scatter_(1, word[:, None].clamp(max=W - 1), torch.bitwise_left_shift(torch.ones_like(local), local % WORD)[:, None])
    mask = torch.cat([mask, mask.new_zeros(1, W)])       # row T: where finished trees write
    depth = torch.zeros(T + 1, dtype=torch.int64, device=dev)
    sizes = cu[1:] - first
    # a tree has at most min(T, 64·W) nodes: the static bound while a CUDA graph is captured
    steps = (int(sizes.max()) if T else 0) if host_read_ok(sizes) else min(T, WORD * W)
    for j in range(1, steps):
        has = sizes > j
        idx = torch.where(has, first + j, T)
        p = torch.where(has, gpar[idx.clamp(max=T - 1)], T)
        mask[idx] = mask[idx] | mask[p]
        depth[idx] = depth[p] + 1
    mask, depth = mask[:T], depth[:T]
    return mask, prefix_lens.long()[row_req] + depth, depth.to(torch.int32)


_last_plan: list = [None, None]  # [key, plan]: a model's layers share one step's plan


def _attention_plan(block_table, seq_lens, cu_num_nodes, page):
    """Requests grouped by (nodes n, keys L), each group as (n, L, query rows, key pages),
    the rows a slice and the pages a page range where the group is one request with
    consecutive pages (then its keys are a view of the cache, not a gathered copy).
    Remembered for the same step tensors (identity and version), so a model's layers
    build it once per step."""
    tensors = (block_table, seq_lens, cu_num_nodes)
    try:
        key = (page,) + tuple((t, t._version) for t in tensors)
    except RuntimeError:  # inference tensors have no version counter: nothing to remember by
        key = None
    last = _last_plan[0]
    if key is not None and last is not None and last[0] == page and all(
            a is t and v == t._version for (a, v), t in zip(last[1:], tensors)):
        return _last_plan[1]
    cu, lens = cu_num_nodes.tolist(), seq_lens.tolist()
    groups: dict[tuple[int, int], list[int]] = {}
    for b in range(len(cu) - 1):
        groups.setdefault((cu[b + 1] - cu[b], lens[b]), []).append(b)
    plan = []
    for (n, L), reqs in groups.items():
        P = -(-L // page)
        if len(reqs) == 1:
            b = reqs[0]
            ids = block_table[b, :P].tolist()
            consecutive = ids == list(range(ids[0], ids[0] + P)) if P else False
            pages = slice(ids[0], ids[0] + P) if consecutive else block_table[b:b + 1, :P]
            plan.append((n, L, slice(cu[b], cu[b] + n), pages))
        else:
            idx = torch.tensor(reqs, device=block_table.device)
            rows = (cu_num_nodes[idx].long()[:, None] + torch.arange(n, device=idx.device)).flatten()  # [g·n]
            plan.append((n, L, rows, block_table[idx, :P]))                   # pages [g, P]
    _last_plan[:] = [key, plan]
    return plan


def tree_attention_torch(q, k_cache, v_cache, block_table, seq_lens, cu_num_nodes, tree_mask, sm_scale):
    """torch backend of :func:`fastverify.tree_attention` (fp32 math). Requests with the
    same (nodes, keys) run together: their keys [g, L, Hkv, D] from the pages, scores of
    the G query heads of each KV head as rows [G·n] against [L], the tree part masked,
    softmax, weighted sum. Off the CPU: :func:`_tree_attention_padded` (no host read)."""
    if q.device.type != "cpu":
        return _tree_attention_padded(q, k_cache, v_cache, block_table, seq_lens, cu_num_nodes, tree_mask, sm_scale)
    T, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    G = Hq // Hkv
    scale = D ** -0.5 if sm_scale is None else sm_scale
    out = torch.empty_like(q)
    for n, L, rows, pages in _attention_plan(block_table, seq_lens, cu_num_nodes, k_cache.shape[1]):
        if isinstance(pages, slice):  # one request, consecutive pages: no gather
            k = k_cache[pages].flatten(0, 1)[None, :L]                           # [1, L, Hkv, D]
            v = v_cache[pages].flatten(0, 1)[None, :L]
        else:
            k = k_cache[pages].flatten(1, 2)[:, :L]                              # [g, L, Hkv, D]
            v = v_cache[pages].flatten(1, 2)[:, :L]
        # [g, Hkv, L, D] contiguous: strided operands send bmm down a slow path on CPU
        k, v = (t.transpose(1, 2).float().contiguous() for t in (k, v))
        g = k.shape[0]
        qb = (q[rows].float() * scale).view(g, n, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(g, Hkv, G * n, D)
        s = qb @ k.transpose(-1, -2)                                            # [g, Hkv, G·n, L]
        if n > 1:  # a single node sees all its keys; otherwise mask the tree part
            allow = unpack_mask(tree_mask[rows], n).view(g, 1, 1, n, n)
            s.view(g, Hkv, G, n, L)[..., L - n:].masked_fill_(~allow, float("-inf"))
        o = torch.softmax(s, -1) @ v                                            # [g, Hkv, G·n, D]
        out[rows] = o.view(g, Hkv, G, n, D).permute(0, 3, 1, 2, 4).reshape(g * n, Hq, D).to(q.dtype)
    return out


def _tree_attention_padded(q, k_cache, v_cache, block_table, seq_lens, cu_num_nodes, tree_mask, sm_scale):
    """:func:`tree_attention_torch` with static shapes and no host read, so that a CUDA graph
    can capture it: each request's nodes padded to N = min(T, 64·W), all keys its block
    table can hold (C = max_pages · page_size) gathered, the invisible ones masked. With
    prefix_b = seq_lens[b] − n_b and r = j − prefix_b, node i of request b sees key j iff

        j < min(seq_lens[b], C)  and  (r < 0  or  (r < n_b and bit r of tree_mask[i] is set)).

    Page ids outside the cache are clamped, never read out of bounds."""
    T, Hq, D = q.shape
    if T == 0:
        return torch.empty_like(q)
    B, P = block_table.shape
    num_pages, page, Hkv = k_cache.shape[:3]
    G, W = Hq // Hkv, tree_mask.shape[1]
    N, C = min(T, WORD * W), P * page
    scale = D ** -0.5 if sm_scale is None else sm_scale
    cu = cu_num_nodes.long()
    row_req, local = row_requests(cu, T, 0)
    slot = local.clamp(max=N - 1)
    n = cu[1:] - cu[:-1]                                                    # [B]
    prefix = seq_lens.long() - n
    pages = block_table.long().clamp(0, num_pages - 1)                      # [B, P]
    k, v = (c[pages].flatten(1, 2).transpose(1, 2).float() for c in (k_cache, v_cache))   # [B, Hkv, C, D]
    qp = q.new_zeros((B, N, Hq, D), dtype=torch.float32)
    qp[row_req, slot] = q.float() * scale
    qp = qp.view(B, N, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * N, D)
    s = (qp @ k.transpose(-1, -2)).view(B, Hkv, G, N, C)                   # [B, Hkv, G, N, C]
    j = torch.arange(C, device=q.device)
    r = j[None, :] - prefix[:, None]                                        # [B, C]
    rc = r.clamp(0, WORD * W - 1)
    mp = tree_mask.new_zeros((B, N, W))
    mp[row_req, slot] = tree_mask
    bit = (mp.gather(2, (rc // WORD)[:, None, :].expand(B, N, C)) >> (rc % WORD)[:, None, :]) & 1   # [B, N, C]
    allow = ((r < 0)[:, None, :] | ((r < n[:, None])[:, None, :] & (bit == 1))) & \
        (j[None, :] < seq_lens.long()[:, None])[:, None, :]
    allow |= ~allow.any(-1, keepdim=True) & (j == 0)                        # rows that see nothing: no NaN
    s = s.masked_fill(~allow[:, None, None], float("-inf"))
    o = torch.softmax(s, -1).view(B, Hkv, G * N, C) @ v                     # [B, Hkv, G·N, D]
    o = o.view(B, Hkv, G, N, D).permute(0, 3, 1, 2, 4).reshape(B, N, Hq, D)
    return o[row_req, slot].to(q.dtype)


def _slots(block_table, pos, page):
    """(page id, slot) of positions pos [B, D] of each request."""
    return block_table.gather(1, (pos // page)).long(), pos % page


def compact_kv_torch(k_cache, v_cache, block_table, prefix_lens, accepted_nodes, num_accepted):
    """torch backend of :func:`fastverify.compact_kv`. A later step's destination can
    be an earlier step's source (path 0, 2, 3: prefix + 2 is read by step 1 and written
    by step 2), so every source is gathered before any destination is written; no two
    steps share a destination. Unused columns copy the root onto itself."""
    page = k_cache.shape[1]
    D = accepted_nodes.shape[1]
    cols = torch.arange(D, device=k_cache.device)[None, :]
    used = cols <= num_accepted.long()[:, None]
    base = prefix_lens.long()[:, None]
    src = base + torch.where(used, accepted_nodes.long(), 0)
    dst = base + torch.where(used, cols, 0)
    sp, so = _slots(block_table, src, page)
    dp, do = _slots(block_table, dst, page)
    for cache in (k_cache, v_cache):
        cache[dp, do] = cache[sp, so]


# --------------------------------------------------------------------------- fake kernels


@torch.library.register_fake("fastverify::build_tree", lib=lib)
def _build_tree_fake(parents, cu_num_nodes, prefix_lens, *, max_nodes=None):
    check_build_tree(parents, cu_num_nodes, prefix_lens, max_nodes, values=False)
    T = parents.shape[0]
    W = mask_words(max_nodes if max_nodes is not None else T)
    return (parents.new_empty((T, W), dtype=torch.int64), parents.new_empty((T,), dtype=torch.int64),
            parents.new_empty((T,), dtype=torch.int32))


@torch.library.register_fake("fastverify::tree_attention", lib=lib)
def _tree_attention_fake(q, k_cache, v_cache, block_table, seq_lens, cu_num_nodes, tree_mask, *, sm_scale=None):
    check_tree_attention(q, k_cache, v_cache, block_table, seq_lens, cu_num_nodes, tree_mask, sm_scale, values=False)
    return torch.empty_like(q)


@torch.library.register_fake("fastverify::compact_kv", lib=lib)
def _compact_kv_fake(k_cache, v_cache, block_table, prefix_lens, accepted_nodes, num_accepted):
    check_compact_kv(k_cache, v_cache, block_table, prefix_lens, accepted_nodes, num_accepted, values=False)


# --------------------------------------------------------------------------- dispatch


def _build_tree_impl(parents, cu_num_nodes, prefix_lens, *, max_nodes=None):
    check_build_tree(parents, cu_num_nodes, prefix_lens, max_nodes)
    if cu_num_nodes.numel() == 1:        # an empty batch: empty outputs, no launch
        return _build_tree_fake(parents, cu_num_nodes, prefix_lens, max_nodes=max_nodes)
    fn = implementation(parents.device, "tree_attention", "build_tree", build_tree_torch)
    return fn(parents, cu_num_nodes, prefix_lens, max_nodes)


def _tree_attention_impl(q, k_cache, v_cache, block_table, seq_lens, cu_num_nodes, tree_mask, *, sm_scale=None):
    check_tree_attention(q, k_cache, v_cache, block_table, seq_lens, cu_num_nodes, tree_mask, sm_scale)
    if cu_num_nodes.numel() == 1:        # an empty batch: empty outputs, no launch
        return q.new_empty(q.shape)
    fn = implementation(q.device, "tree_attention", "tree_attention", tree_attention_torch)
    return fn(q, k_cache, v_cache, block_table, seq_lens, cu_num_nodes, tree_mask, sm_scale)


def _compact_kv_impl(k_cache, v_cache, block_table, prefix_lens, accepted_nodes, num_accepted):
    check_compact_kv(k_cache, v_cache, block_table, prefix_lens, accepted_nodes, num_accepted)
    if block_table.shape[0] == 0:        # an empty batch: nothing moves
        return
    fn = implementation(k_cache.device, "tree_attention", "compact_kv", compact_kv_torch)
    fn(k_cache, v_cache, block_table, prefix_lens, accepted_nodes, num_accepted)


for _key in ("CPU", "CUDA"):
    lib.impl("build_tree", _build_tree_impl, _key)
    lib.impl("tree_attention", _tree_attention_impl, _key)
    lib.impl("compact_kv", _compact_kv_impl, _key)


# --------------------------------------------------------------------------- public API


def build_tree(parents, cu_num_nodes, prefix_lens, *, max_nodes=None):
    """Ancestor masks, RoPE positions and depths of one draft tree per request, on the
    device, without a host sync.

    Args:
        parents: ``[T]`` int32/int64 tree-local parent of each node (-1 for each root,
            node 0 of its tree); a parent precedes its children.
        cu_num_nodes: ``[B + 1]`` int32 exclusive prefix sum of nodes per request.
        prefix_lens: ``[B]`` int32/int64 position of each root.
        max_nodes: most nodes in any tree; sets the mask width ``ceil(max_nodes / 64)``
            (default: T, always enough).

    Returns:
        ``tree_mask [T, W]`` int64 (bit j of row i: node j is node i or an ancestor),
        ``positions [T]`` int64 = prefix_len + depth, ``depth [T]`` int32.

    Example::

        >>> mask, pos, depth = fastverify.build_tree(torch.tensor([-1, 0, 0, 1]),
        ...     torch.tensor([0, 4], dtype=torch.int32), torch.tensor([10]), max_nodes=4)
        >>> mask[:, 0].tolist(), pos.tolist()
        ([1, 3, 5, 11], [10, 11, 11, 12])
    """
    return torch.ops.fastverify.build_tree(parents, cu_num_nodes, prefix_lens, max_nodes=max_nodes)


def tree_attention(q, k_cache, v_cache, block_table, seq_lens, cu_num_nodes, tree_mask, *, sm_scale=None):
    """Attention of every draft-tree node over its request's prefix and its own
    ancestors, from a paged KV cache, in one call for the whole batch.

    Args:
        q: ``[T, Hq, D]`` fp16/bf16/fp32 queries of all tree nodes.
        k_cache, v_cache: ``[num_pages, page_size, Hkv, D]``; Hq a multiple of Hkv. The
            tree nodes' own K/V are already written as the last n_b keys of request b.
        block_table: ``[B, max_pages]`` int32 page of each request's p-th page.
        seq_lens: ``[B]`` int32 keys of each request, tree included.
        cu_num_nodes: ``[B + 1]`` int32. tree_mask: ``[T, W]`` int64 from :func:`build_tree`.
        sm_scale: softmax scale, default ``1 / sqrt(D)``.

    Returns:
        ``out [T, Hq, D]`` in q's dtype.

    Example::

        >>> # one request: a 5-token prefix and a chain of 2 nodes, page size 4
        >>> k = torch.randn(2, 4, 1, 64); v = torch.randn(2, 4, 1, 64)
        >>> out = fastverify.tree_attention(torch.randn(2, 4, 64), k, v, torch.tensor([[1, 0]], dtype=torch.int32),
        ...     torch.tensor([7], dtype=torch.int32), torch.tensor([0, 2], dtype=torch.int32),
        ...     torch.tensor([[1], [3]]))
    """
    return torch.ops.fastverify.tree_attention(q, k_cache, v_cache, block_table, seq_lens, cu_num_nodes, tree_mask,
                                               sm_scale=sm_scale)


def compact_kv(k_cache, v_cache, block_table, prefix_lens, accepted_nodes, num_accepted):
    """After verification, move the accepted path's K/V to contiguous positions, in place.

    For each request b, node ``accepted_nodes[b, i]`` (i = 0 .. num_accepted[b], root
    first), stored at cache position ``prefix_lens[b] + node``, moves to position
    ``prefix_lens[b] + i``. Other slots are left as they are. One launch for the batch.

    Args:
        k_cache, v_cache: ``[num_pages, page_size, Hkv, D]`` (mutated).
        block_table: ``[B, max_pages]`` int32. prefix_lens: ``[B]`` int32 position of each root.
        accepted_nodes: ``[B, max_depth + 1]`` int32, num_accepted: ``[B]`` int32, as
            returned by :func:`fastverify.tree_rejection_sample`.
    """
    torch.ops.fastverify.compact_kv(k_cache, v_cache, block_table, prefix_lens, accepted_nodes, num_accepted)
