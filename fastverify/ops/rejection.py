"""Rejection sampling ops: ``fastverify::rejection_sample`` (chain drafts) and
``fastverify::tree_rejection_sample`` (one draft tree per request).

This module holds the schemas, the argument checks, the fake (meta) kernels, the
``torch`` backend (the CPU kernel and readable specification) and the dispatch to
the ``triton`` (``fastverify/triton/rejection.py``) and ``cuda``
(``csrc/cuda/rejection.cu``) backends.

Math, per request (``p`` = processed target distribution, see ``ops/sampling.py``):

chain, drafts x_0..x_{K-1} at positions t_0 = positions[b], t_j = t_0 + j:
    accept x_j  iff  u_j · q_j(x_j) < p_j(x_j)        u_j = uniform(seed, t_j, lane 0)
                    (q_j ≡ 1 at x_j when draft_probs is None: a point-mass draft)
    first rejection at j:  emit y ~ normalize(max(p_j − q_j, 0))   (uniform lane 1 at t_j)
    all K accepted:        emit y ~ p_K (the bonus row)
    greedy (T = 0):        accept iff x_j == argmax p_j; emit argmax of the stopping row

tree (sample-then-match, lossless when siblings carry distinct tokens):
    at node i, depth d: y ~ p_i (lane 1 at positions[b] + d); move to the child whose
    token is y, else emit y and stop.
tree with draft_probs (recursive rejection, SpecInfer; children of node i drawn from
q = draft_probs[i], i.i.d. and de-duplicated in order of first appearance, which is
sampling without replacement):
    r_0 = p_i, σ_0 = 1;  for the k-th child x_k (node order):
      accept iff u · q(x_k)/σ_k < r_k(x_k)          u = uniform(seed, t, lane 0, attempt k)
      else r_{k+1} = normalize(max(r_k − q/σ_k, 0)), σ_{k+1} = σ_k − q(x_k)
    all rejected: emit y ~ r_k (lane 1) and stop.
"""

from __future__ import annotations

import torch

from .. import _backend
from . import philox
from ._checks import (ID_DTYPES, check_cu, check_ids_in_vocab, check_logits, check_probs, check_sampling_params,
                      check_tensor, check_tree)
from ._common import host_read_ok, implementation, row_requests
from .sampling import NEG_INF, filter_threshold, inverse_cdf, sanitize, scale

lib = torch.library.Library("fastverify", "FRAGMENT")

lib.define(
    "rejection_sample(Tensor target_logits, Tensor draft_tokens, Tensor cu_num_draft, *, "
    "Tensor? draft_probs=None, Tensor temperature, Tensor? top_k=None, Tensor? top_p=None, "
    "Tensor seed, Tensor positions, int max_draft_len) -> (Tensor output_tokens, Tensor num_accepted)"
)
lib.define(
    "tree_rejection_sample(Tensor target_logits, Tensor tree_tokens, Tensor parents, Tensor cu_num_nodes, *, "
    "Tensor? draft_probs=None, Tensor temperature, Tensor? top_k=None, Tensor? top_p=None, "
    "Tensor seed, Tensor positions, int max_depth) "
    "-> (Tensor accepted_nodes, Tensor output_tokens, Tensor num_accepted)"
)


# --------------------------------------------------------------------------- checks


def _check_batch(target_logits, cu, cu_name):
    """(device, B) of a call whose requests are delimited by ``cu`` [B + 1] int32, on the
    device of ``target_logits``. The first checks of both ops."""
    if not isinstance(target_logits, torch.Tensor):
        raise TypeError(f"target_logits must be a torch.Tensor, got {type(target_logits).__name__}")
    dev = target_logits.device
    check_tensor(cu, cu_name, ndim=1, dtypes=(torch.int32,), device=dev)
    if cu.numel() < 1:
        raise ValueError(f"{cu_name} must have B + 1 >= 1 entries (an empty batch is [0]), got none")
    return dev, cu.numel() - 1


def _check_target(target_logits, rows, draft_probs, draft_rows, temperature, top_k, top_p, seed, positions, B, dev,
                  bound, bound_name) -> int:
    """Metadata checks both ops make after their token arguments: target_logits [rows, V]
    with V >= 1, draft_probs [draft_rows, V], the sampling parameters of B requests, and
    the depth bound (``max_draft_len`` / ``max_depth``) an int >= 0. Returns V."""
    check_logits(target_logits, "target_logits", dev, rows=rows)
    V = target_logits.shape[1]
    if V < 1:
        raise ValueError("target_logits must have a vocabulary of at least 1 token")
    if draft_probs is not None:
        check_logits(draft_probs, "draft_probs", dev, rows=draft_rows, vocab=V)
    check_sampling_params(temperature, top_k, top_p, seed, positions, B, dev, False)
    if not isinstance(bound, int) or bound < 0:
        raise ValueError(f"{bound_name} must be an int >= 0, got {bound!r}")
    return V


def check_rejection_sample(target_logits, draft_tokens, cu_num_draft, draft_probs, temperature, top_k, top_p,
                           seed, positions, max_draft_len, values: bool = True) -> None:
    """Raise a ValueError naming the first bad argument. ``values=False`` (fake
    kernels) checks only metadata."""
    dev, B = _check_batch(target_logits, cu_num_draft, "cu_num_draft")
    check_tensor(draft_tokens, "draft_tokens", ndim=1, dtypes=ID_DTYPES, device=dev)
    N = draft_tokens.numel()
    V = _check_target(target_logits, N + B, draft_probs, N, temperature, top_k, top_p, seed, positions, B, dev,
                      max_draft_len, "max_draft_len")
    if not (values and _backend.value_checks_enabled(target_logits)):
        return
    check_cu(cu_num_draft, "cu_num_draft", N, "draft_tokens.numel()", min_step=0)
    longest = int((cu_num_draft[1:] - cu_num_draft[:-1]).max()) if B else 0
    if longest > max_draft_len:
        raise ValueError(f"a request has {longest} drafts (cu_num_draft) but max_draft_len is {max_draft_len}")
    check_ids_in_vocab(draft_tokens, "draft_tokens", V)
    if draft_probs is not None:
        check_probs(draft_probs, "draft_probs")
    check_sampling_params(temperature, top_k, top_p, seed, positions, B, dev, True)


def check_tree_rejection_sample(target_logits, tree_tokens, parents, cu_num_nodes, draft_probs, temperature,
                                top_k, top_p, seed, positions, max_depth, values: bool = True) -> None:
    """As :func:`check_rejection_sample`, for the tree op."""
    dev, B = _check_batch(target_logits, cu_num_nodes, "cu_num_nodes")
    check_tensor(tree_tokens, "tree_tokens", ndim=1, dtypes=ID_DTYPES, device=dev)
    T = tree_tokens.numel()
    check_tensor(parents, "parents", ndim=1, dtypes=ID_DTYPES, device=dev, shape=(T,))
    V = _check_target(target_logits, T, draft_probs, T, temperature, top_k, top_p, seed, positions, B, dev,
                      max_depth, "max_depth")
    if not (values and _backend.value_checks_enabled(target_logits)):
        return
    check_cu(cu_num_nodes, "cu_num_nodes", T, "tree_tokens.numel()", min_step=1)
    check_ids_in_vocab(tree_tokens, "tree_tokens", V)
    check_tree(parents, cu_num_nodes, tokens=tree_tokens, max_depth=max_depth)
    if draft_probs is not None:
        check_probs(draft_probs, "draft_probs")
    check_sampling_params(temperature, top_k, top_p, seed, positions, B, dev, True)


# --------------------------------------------------------------------------- torch backend


class _Target:
    """Processed target distributions of all rows (module docstring of ``sampling``)."""

    def __init__(self, logits, row_req, temperature, top_k, top_p):
        self.l = sanitize(logits)                                  # [R, V]
        t_req = temperature[row_req]                               # [R]
        self.greedy = t_req == 0                                   # [R]
        z = scale(self.l, torch.where(self.greedy, 1.0, t_req))     # [R, V]
        thr = None
        if top_k is not None or top_p is not None:
            thr = filter_threshold(
                self.l, z,
                None if top_k is None else top_k[row_req],
                None if top_p is None else top_p[row_req],
                ~self.greedy)
        self.z = z if thr is None else torch.where(self.l >= thr[:, None], z, NEG_INF)  # -inf off the kept set
        self.lse = torch.logsumexp(self.z, 1)                      # [R]
        self.argmax = self.l.argmax(1)                             # [R]

    def probs(self, rows: torch.Tensor) -> torch.Tensor:
        """p for the given rows, [len(rows), V]; all zero for a row with no finite logit."""
        lse = self.lse[rows]
        return torch.where(torch.isfinite(lse)[:, None], torch.exp(self.z[rows] - lse[:, None]), 0.0)

    def prob_at(self, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """p[rows, ids] for ids in [0, V); 0 where the row has no finite logit."""
        lse = self.lse[rows]
        zx = self.z[rows, ids]
        return torch.where(torch.isfinite(lse), torch.exp(zx - lse), 0.0)


def rejection_sample_torch(target_logits, draft_tokens, cu_num_draft, draft_probs, temperature, top_k, top_p,
                           seed, positions, max_draft_len):
    """torch backend of :func:`fastverify.rejection_sample` (vectorized, no host sync)."""
    dev = target_logits.device
    R, V = target_logits.shape
    B = cu_num_draft.numel() - 1
    N = draft_tokens.numel()
    W = max_draft_len + 1
    cu = cu_num_draft.long()
    num_draft = cu[1:] - cu[:-1]                                   # [B]
    row_req, row_j = row_requests(cu, R, 1)                       # [R], [R]
    is_draft = row_j < num_draft[row_req]                          # [R]: row j scores draft j; else bonus row
    draft_idx = (cu[:-1][row_req] + row_j).clamp(0, max(N - 1, 0))
    x = torch.full((R,), -1, dtype=torch.long, device=dev)
    if N > 0:
        x = torch.where(is_draft, draft_tokens[draft_idx].long(), -1)
    valid = (x >= 0) & (x < V)
    xc = x.clamp(0, V - 1)

    b = torch.arange(B, device=dev)
    if dev.type == "cpu" and not bool((temperature > 0).any()):
        # every request greedy (a host read, free on CPU): accept while draft == argmax, then
        # emit the argmax: no probabilities, no random draws
        argmax = sanitize(target_logits).argmax(1)                   # [R]
        n_acc = _leading_accepts(is_draft & valid & (x == argmax), row_req, row_j, B, W)
        return _chain_output(x, row_req, row_j, n_acc, argmax[cu[:-1] + b + n_acc], B, W)

    tgt = _Target(target_logits, row_req, temperature, top_k, top_p)
    all_rows = torch.arange(R, device=dev)
    p_x = torch.where(valid, tgt.prob_at(all_rows, xc), 0.0)
    u = philox.uniform(seed[row_req], positions[row_req] + row_j, philox.ACCEPT_LANE)
    if draft_probs is not None:
        q_x = draft_probs.float()[draft_idx, xc] if N > 0 else torch.zeros_like(p_x)
        accept_random = u * q_x < p_x
    else:
        accept_random = u < p_x
    accept = is_draft & valid & torch.where(tgt.greedy, x == tgt.argmax, accept_random)

    n_acc = _leading_accepts(accept, row_req, row_j, B, W)

    # the emitted token: recovered at the first rejected row, or the bonus row
    srow = cu[:-1] + b + n_acc                                     # [B]
    p = tgt.probs(srow)                                            # [B, V]
    excl = is_draft[srow] & valid[srow]                            # drop the rejected point-mass draft
    w = torch.where(excl[:, None] & (torch.arange(V, device=dev) == xc[srow][:, None]), 0.0, p)
    if draft_probs is not None and N > 0:
        resid = (p - draft_probs.float()[draft_idx[srow]]).clamp(min=0)
        use_resid = excl & (resid.sum(1) > 0)
        w = torch.where(use_resid[:, None], resid, w)
    u_s = philox.uniform(seed, positions + n_acc, philox.SAMPLE_LANE)
    token = inverse_cdf(w, u_s, tgt.argmax[srow])
    token = torch.where(tgt.greedy[srow], tgt.argmax[srow], token)
    return _chain_output(x, row_req, row_j, n_acc, token, B, W)


def _leading_accepts(accept, row_req, row_j, B: int, W: int) -> torch.Tensor:
    """Accepted drafts per request [B]: the leading run of accepts of its rows."""
    padded = torch.zeros(B, W, dtype=torch.long, device=accept.device)
    padded[row_req, row_j] = accept.long()
    return padded.cumprod(1).sum(1)


def _chain_output(x, row_req, row_j, n_acc, token, B: int, W: int):
    """(output_tokens [B, W]: accepted drafts, the emitted token, -1 padding; num_accepted [B]), int32."""
    drafts = torch.full((B, W), -1, dtype=torch.long, device=x.device)
    drafts[row_req, row_j] = x
    cols = torch.arange(W, device=x.device)
    out = torch.where(cols < n_acc[:, None], drafts, -1)
    out = torch.where(cols == n_acc[:, None], token[:, None], out)
    return out.to(torch.int32), n_acc.to(torch.int32)


def _children_table(cu: torch.Tensor, row_req: torch.Tensor, local: torch.Tensor, parents: torch.Tensor):
    """kids [T + 1, C]: global ids of each node's children in node order, -1 padded
    (row T is an empty dummy). C, the most children of any node, is read on the host, or
    is T while a CUDA graph is captured (the extra columns stay empty)."""
    T = row_req.numel()
    par = parents.long()
    is_child = (local > 0) & (par >= 0) & (par < local)
    gpar = torch.where(is_child, cu[:-1][row_req] + par, T)                 # global parent, T = none
    order = torch.argsort(gpar * (T + 1) + torch.arange(T, device=cu.device))
    counts = torch.bincount(gpar, minlength=T + 1)[:T]
    C = max(int(counts.max()) if T > 0 else 0, 1) if host_read_ok(counts) else max(T, 1)
    sp = gpar[order]
    first = torch.cat([counts.cumsum(0) - counts, counts.new_zeros(1)])    # first slot of each parent in `order`
    rank = torch.arange(T, device=cu.device) - first[sp]
    kids = torch.full((T + 1, C), -1, dtype=torch.long, device=cu.device)
    kids[sp, rank.clamp(max=C - 1)] = order                                  # the roots land in row T ...
    kids[T] = -1                                                            # ... which stays empty
    return kids


def tree_rejection_sample_torch(target_logits, tree_tokens, parents, cu_num_nodes, draft_probs, temperature,
                                top_k, top_p, seed, positions, max_depth):
    """torch backend of :func:`fastverify.tree_rejection_sample`: all trees walk in
    lockstep, one depth per step; recursive rejection tries the c-th child of every
    request at once."""
    dev = target_logits.device
    T, V = target_logits.shape
    B = cu_num_nodes.numel() - 1
    D = max_depth + 1
    cu = cu_num_nodes.long()
    row_req, local = row_requests(cu, T, 0)
    # every request greedy (a host read, free on CPU): the walk needs only each row's argmax
    all_greedy = dev.type == "cpu" and not bool((temperature > 0).any())
    tgt = None if all_greedy else _Target(target_logits, row_req, temperature, top_k, top_p)
    argmax = sanitize(target_logits).argmax(1) if all_greedy else tgt.argmax    # [T]
    tokens = tree_tokens.long()
    kids = _children_table(cu, row_req, local, parents)                    # [T + 1, C]
    q_all = None if draft_probs is None else draft_probs.float()
    rrs = (temperature > 0) & (q_all is not None)                           # [B] recursive rejection
    greedy = temperature == 0

    cols = torch.arange(D, device=dev)
    acc = torch.where(cols == 0, 0, -1).repeat(B, 1)                       # [B, D] root accepted
    out = torch.full((B, D), -1, dtype=torch.long, device=dev)
    num = torch.zeros(B, dtype=torch.long, device=dev)
    node = cu[:-1].clone()                                                 # [B] current node (global)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    for d in range(D):
        kid = kids[node]                                                   # [B, C]
        kid_tok = torch.where(kid >= 0, tokens[kid.clamp(min=0)], -1)
        g = argmax[node]
        y = g
        if not all_greedy:
            p = tgt.probs(node)                                            # [B, V]
            u_s = philox.uniform(seed, positions + d, philox.SAMPLE_LANE)
            # sample-then-match: y ~ p (argmax if greedy), move to the child carrying y
            y = torch.where(greedy, g, inverse_cdf(p, u_s, g))
        hit = (kid_tok == y[:, None]) & (kid >= 0)
        nxt = torch.where(hit.any(1), kid.gather(1, hit.long().argmax(1, keepdim=True))[:, 0], -1)
        if q_all is not None and not all_greedy:
            # recursive rejection: children in node order against the running residual r
            q = q_all[node]                                                # [B, V]
            r = p
            sigma = torch.ones(B, device=dev)
            attempt = torch.zeros(B, dtype=torch.long, device=dev)
            chosen = torch.full((B,), -1, dtype=torch.long, device=dev)
            for c in range(kids.shape[1]):
                x = kid_tok[:, c]
                try_ = (kid[:, c] >= 0) & (x >= 0) & (x < V) & (chosen < 0)
                xc = x.clamp(0, V - 1)[:, None]
                s = sigma.clamp(min=1e-30)
                qx = q.gather(1, xc)[:, 0]
                u = philox.uniform(seed, positions + d, philox.ACCEPT_LANE, attempt)
                ok = try_ & (u * (qx / s) < r.gather(1, xc)[:, 0])
                chosen = torch.where(ok, kid[:, c], chosen)
                rejected = try_ & ~ok
                r_next = (r - q / s[:, None]).clamp(min=0)
                rho = r_next.sum(1, keepdim=True)
                r_next = torch.where(rho > 0, r_next / rho, r_next)
                r = torch.where(rejected[:, None], r_next, r)
                sigma = torch.where(rejected, sigma - qx, sigma)
                attempt = attempt + rejected.long()
            w = torch.where((r > 0).any(1, keepdim=True), r, p)
            y_rrs = torch.where(chosen >= 0, tokens[chosen.clamp(min=0)], inverse_cdf(w, u_s, g))
            y = torch.where(rrs, y_rrs, y)
            nxt = torch.where(rrs, chosen, nxt)
        out[:, d] = torch.where(done, out[:, d], y)
        move = ~done & (nxt >= 0) & (d < max_depth)
        node = torch.where(move, nxt, node)
        if d + 1 < D:
            acc[:, d + 1] = torch.where(move, nxt - cu[:-1], -1)
        num += move.long()
        done |= ~move
    return acc.to(torch.int32), out.to(torch.int32), num.to(torch.int32)


# --------------------------------------------------------------------------- fake kernels


@torch.library.register_fake("fastverify::rejection_sample", lib=lib)
def _rejection_sample_fake(target_logits, draft_tokens, cu_num_draft, *, draft_probs=None, temperature, top_k=None,
                           top_p=None, seed, positions, max_draft_len):
    check_rejection_sample(target_logits, draft_tokens, cu_num_draft, draft_probs, temperature, top_k, top_p,
                           seed, positions, max_draft_len, values=False)
    B = cu_num_draft.shape[0] - 1
    out = target_logits.new_empty((B, max_draft_len + 1), dtype=torch.int32)
    return out, target_logits.new_empty((B,), dtype=torch.int32)


@torch.library.register_fake("fastverify::tree_rejection_sample", lib=lib)
def _tree_rejection_sample_fake(target_logits, tree_tokens, parents, cu_num_nodes, *, draft_probs=None, temperature,
                                top_k=None, top_p=None, seed, positions, max_depth):
    check_tree_rejection_sample(target_logits, tree_tokens, parents, cu_num_nodes, draft_probs, temperature,
                                top_k, top_p, seed, positions, max_depth, values=False)
    B = cu_num_nodes.shape[0] - 1
    shape = (B, max_depth + 1)
    return (target_logits.new_empty(shape, dtype=torch.int32), target_logits.new_empty(shape, dtype=torch.int32),
            target_logits.new_empty((B,), dtype=torch.int32))


# --------------------------------------------------------------------------- dispatch


def _rejection_sample_impl(target_logits, draft_tokens, cu_num_draft, *, draft_probs=None, temperature, top_k=None,
                           top_p=None, seed, positions, max_draft_len):
    check_rejection_sample(target_logits, draft_tokens, cu_num_draft, draft_probs, temperature, top_k, top_p,
                           seed, positions, max_draft_len)
    if cu_num_draft.numel() == 1:        # an empty batch: empty outputs, no launch
        return tuple(t.fill_(-1) for t in _rejection_sample_fake(
            target_logits, draft_tokens, cu_num_draft, draft_probs=draft_probs, temperature=temperature, top_k=top_k,
            top_p=top_p, seed=seed, positions=positions, max_draft_len=max_draft_len))
    fn = implementation(target_logits.device, "rejection", "rejection_sample", rejection_sample_torch)
    return fn(target_logits, draft_tokens, cu_num_draft, draft_probs, temperature, top_k, top_p, seed, positions,
              max_draft_len)


def _tree_rejection_sample_impl(target_logits, tree_tokens, parents, cu_num_nodes, *, draft_probs=None, temperature,
                                top_k=None, top_p=None, seed, positions, max_depth):
    check_tree_rejection_sample(target_logits, tree_tokens, parents, cu_num_nodes, draft_probs, temperature,
                                top_k, top_p, seed, positions, max_depth)
    if cu_num_nodes.numel() == 1:        # an empty batch: empty outputs, no launch
        return _tree_rejection_sample_fake(
            target_logits, tree_tokens, parents, cu_num_nodes, draft_probs=draft_probs, temperature=temperature,
            top_k=top_k, top_p=top_p, seed=seed, positions=positions, max_depth=max_depth)
    fn = implementation(target_logits.device, "rejection", "tree_rejection_sample", tree_rejection_sample_torch)
    return fn(target_logits, tree_tokens, parents, cu_num_nodes, draft_probs, temperature, top_k, top_p, seed,
              positions, max_depth)


for _key in ("CPU", "CUDA"):
    lib.impl("rejection_sample", _rejection_sample_impl, _key)
    lib.impl("tree_rejection_sample", _tree_rejection_sample_impl, _key)


# --------------------------------------------------------------------------- public API


def _per_request(value, name: str, B: int, dtype: torch.dtype, device: torch.device):
    """Python numbers are broadcast to a [B] tensor; tensors pass through unchanged."""
    if value is None or isinstance(value, torch.Tensor):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a [B] tensor or a Python number, got {type(value).__name__}")
    return torch.full((B,), value, dtype=dtype, device=device)


def _sampling_args(target_logits, B, temperature, top_k, top_p, seed, positions):
    dev = target_logits.device if isinstance(target_logits, torch.Tensor) else None
    return dict(
        temperature=_per_request(temperature, "temperature", B, torch.float32, dev),
        top_k=_per_request(top_k, "top_k", B, torch.int32, dev),
        top_p=_per_request(top_p, "top_p", B, torch.float32, dev),
        seed=_per_request(seed, "seed", B, torch.int64, dev),
        positions=_per_request(positions, "positions", B, torch.int64, dev),
    )


def rejection_sample(target_logits, draft_tokens, cu_num_draft, *, draft_probs=None, temperature, top_k=None,
                     top_p=None, seed, positions, max_draft_len):
    """Verify chain drafts against the target model with speculative (rejection) sampling.

    Lossless: the emitted tokens are distributed exactly as sampling the target one
    token at a time with the given temperature / top-k / top-p. Greedy requests
    (temperature 0) accept a draft iff it is the target's argmax.

    Args:
        target_logits: ``[N + B, V]`` fp32/bf16/fp16. Request b owns rows
            ``cu_num_draft[b] + b ... cu_num_draft[b+1] + b``: one row per draft
            (the target's distribution for that draft's position) plus a bonus row.
        draft_tokens: ``[N]`` int32/int64, all requests' drafts flattened.
        cu_num_draft: ``[B + 1]`` int32 exclusive prefix sum of drafts per request
            (a request may have 0 drafts).
        draft_probs: ``[N, V]`` or None. The distribution each draft was drawn from;
            None treats drafts as deterministic (greedy drafter, n-gram, top-k tree).
        temperature: ``[B]`` fp32, 0 = greedy. top_k: ``[B]`` int32 or None (0 = off).
            top_p: ``[B]`` fp32 or None (1 = off). Python numbers broadcast.
        seed: ``[B]`` int64. positions: ``[B]`` int64, sequence position of each
            request's first draft; randomness is keyed by (seed, position) only.
        max_draft_len: width of the output, at least the longest request's drafts.

    Returns:
        ``output_tokens [B, max_draft_len + 1]`` int32 (accepted drafts, then the
        recovered or bonus token, then -1) and ``num_accepted [B]`` int32.

    Example::

        >>> logits = torch.randn(3 + 2, 32000)            # 2 requests with 2 and 1 drafts
        >>> drafts = torch.tensor([11, 42, 7])
        >>> cu = torch.tensor([0, 2, 3], dtype=torch.int32)
        >>> out, n = fastverify.rejection_sample(logits, drafts, cu, temperature=torch.tensor([0.0, 0.8]),
        ...                                      seed=torch.tensor([1, 2]), positions=torch.tensor([10, 20]),
        ...                                      max_draft_len=2)
        >>> out.shape, n.shape
        (torch.Size([2, 3]), torch.Size([2]))
    """
    B = cu_num_draft.shape[0] - 1 if isinstance(cu_num_draft, torch.Tensor) else 0
    return torch.ops.fastverify.rejection_sample(
        target_logits, draft_tokens, cu_num_draft, draft_probs=draft_probs, max_draft_len=max_draft_len,
        **_sampling_args(target_logits, B, temperature, top_k, top_p, seed, positions))


def tree_rejection_sample(target_logits, tree_tokens, parents, cu_num_nodes, *, draft_probs=None, temperature,
                          top_k=None, top_p=None, seed, positions, max_depth):
    """Verify one draft tree per request in one call; lossless for any tree whose
    siblings carry distinct tokens.

    Args:
        target_logits: ``[T, V]``; row i is the target's next-token distribution after node i.
        tree_tokens: ``[T]`` int32/int64 token of each node (node 0 of a tree, its root,
            is the last accepted token). parents: ``[T]`` tree-local parent index, -1 for
            the root; a parent precedes its children.
        cu_num_nodes: ``[B + 1]`` int32 exclusive prefix sum of nodes per request (each >= 1).
        draft_probs: ``[T, V]`` or None. Row i is the distribution node i's children were
            drawn from (i.i.d., de-duplicated in order of first appearance). Given, the
            children are verified by recursive rejection; None: sample-then-match.
        temperature, top_k, top_p, seed, positions: as in :func:`rejection_sample`;
            positions[b] is the position of the root's children.
        max_depth: deepest node depth of any tree (output width is max_depth + 1).

    Returns:
        ``accepted_nodes [B, max_depth + 1]`` (tree-local indices of the accepted path,
        root first, -1 padded), ``output_tokens [B, max_depth + 1]`` (tokens to append:
        accepted non-root nodes then the final sampled token, -1 padded) and
        ``num_accepted [B]`` (accepted non-root nodes), all int32.

    Example::

        >>> #   root ─┬─ 5 ── 9          tree of 4 nodes, max depth 2
        >>> #         └─ 6
        >>> tokens = torch.tensor([3, 5, 6, 9]); parents = torch.tensor([-1, 0, 0, 1])
        >>> cu = torch.tensor([0, 4], dtype=torch.int32)
        >>> acc, out, n = fastverify.tree_rejection_sample(torch.randn(4, 100), tokens, parents, cu,
        ...     temperature=0.0, seed=0, positions=7, max_depth=2)
    """
    B = cu_num_nodes.shape[0] - 1 if isinstance(cu_num_nodes, torch.Tensor) else 0
    return torch.ops.fastverify.tree_rejection_sample(
        target_logits, tree_tokens, parents, cu_num_nodes, draft_probs=draft_probs, max_depth=max_depth,
        **_sampling_args(target_logits, B, temperature, top_k, top_p, seed, positions))
