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

Verification rules (``verify=``; docs/ops.md has the derivations and the proofs' tests):

chain "token": the rule above (Leviathan et al. / Chen et al. 2023).
chain "block" (Sun et al., ICLR 2025), drafts x_1..x_K, P_i / Q_i = row i (after i drafts):
    p_0 = 1,  p_i = min(p_{i-1} · P_{i-1}(x_i) / Q_{i-1}(x_i), 1)
    Z_i = Σ_x max(p_i P_i(x) − Q_i(x), 0)          h_i = Z_i / (Z_i + 1 − p_i)  (1 ≤ i < K; 1 if 0/0)
    h_K = p_K;  η_i = uniform(seed, t_{i-1}, lane 0) (the token rule's u);  τ = max{i : η_i < h_i} ∪ {0}
    τ = K: y ~ P_K;  else y ~ normalize(max(p_τ P_τ − Q_τ, 0))
    point-mass drafts (no draft_probs, Q_{i-1} = δ_{x_i}): p_i = Π_{j≤i} P_{j-1}(x_j), Z_i = p_i (1 − P_i(x_{i+1})),
    and the residual is P_τ without x_{τ+1} — the accepted length has the token rule's law.
chain "typical" (Medusa-2, lossy): ε, δ per request (typical_eps, typical_delta)
    thr_j = min(ε, δ · exp(−H(P_j))), H the entropy of the processed P_j
    accept x_{j+1} while P_j(x_{j+1}) > thr_j;  y ~ normalize(P_τ · 1[P_τ ≥ thr_τ])
every rule, greedy requests (T = 0): accept while x_j == argmax P_{j-1}, emit the argmax (the
    rules' common limit).
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
    "Tensor seed, Tensor positions, int max_draft_len, str verify=\"token\", Tensor? typical_eps=None, "
    "Tensor? typical_delta=None) -> (Tensor output_tokens, Tensor num_accepted)"
)
lib.define(
    "tree_rejection_sample(Tensor target_logits, Tensor tree_tokens, Tensor parents, Tensor cu_num_nodes, *, "
    "Tensor? draft_probs=None, Tensor temperature, Tensor? top_k=None, Tensor? top_p=None, "
    "Tensor seed, Tensor positions, int max_depth, str verify=\"specinfer\") "
    "-> (Tensor accepted_nodes, Tensor output_tokens, Tensor num_accepted)"
)


# chain rules (rejection_sample) and tree rules (tree_rejection_sample)
CHAIN_RULES = ("token", "block", "typical")
TREE_RULES = ("specinfer", "block", "block_wor")
MULTI_PATH_RULES = ("block", "block_wor")
LOSSY_RULES = ("typical",)
# Medusa's typical-acceptance defaults (posterior_threshold ε, posterior_alpha δ = √ε)
TYPICAL_EPS = 0.09
TYPICAL_DELTA = 0.3


# --------------------------------------------------------------------------- checks


def check_rule(verify, rules: tuple, op: str) -> None:
    if not isinstance(verify, str) or verify not in rules:
        raise ValueError(f"verify must be one of {', '.join(map(repr, rules))} for {op}, got {verify!r}")


def _check_typical(verify, typical_eps, typical_delta, B: int, dev, values: bool) -> None:
    """typical_eps / typical_delta: [B] float32 in [0, 1], only with verify="typical"."""
    for name, t in (("typical_eps", typical_eps), ("typical_delta", typical_delta)):
        if t is None:
            continue
        if verify != "typical":
            raise ValueError(f"{name} applies to verify='typical' only (got verify={verify!r})")
        check_tensor(t, name, ndim=1, dtypes=(torch.float32,), device=dev, shape=(B,))
        if values and not bool(((t >= 0) & (t <= 1)).all()):
            raise ValueError(f"{name} must be in [0, 1], got {t.tolist()}")


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
                           seed, positions, max_draft_len, verify="token", typical_eps=None, typical_delta=None,
                           values: bool = True) -> None:
    """Raise a ValueError naming the first bad argument. ``values=False`` (fake
    kernels) checks only metadata."""
    check_rule(verify, CHAIN_RULES, "rejection_sample")
    dev, B = _check_batch(target_logits, cu_num_draft, "cu_num_draft")
    check_tensor(draft_tokens, "draft_tokens", ndim=1, dtypes=ID_DTYPES, device=dev)
    N = draft_tokens.numel()
    V = _check_target(target_logits, N + B, draft_probs, N, temperature, top_k, top_p, seed, positions, B, dev,
                      max_draft_len, "max_draft_len")
    values = values and _backend.value_checks_enabled(target_logits)
    _check_typical(verify, typical_eps, typical_delta, B, dev, values)
    if not values:
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
                                top_k, top_p, seed, positions, max_depth, verify="specinfer",
                                values: bool = True) -> None:
    """As :func:`check_rejection_sample`, for the tree op."""
    check_rule(verify, TREE_RULES, "tree_rejection_sample")
    dev, B = _check_batch(target_logits, cu_num_nodes, "cu_num_nodes")
    check_tensor(tree_tokens, "tree_tokens", ndim=1, dtypes=ID_DTYPES, device=dev)
    T = tree_tokens.numel()
    check_tensor(parents, "parents", ndim=1, dtypes=ID_DTYPES, device=dev, shape=(T,))
    V = _check_target(target_logits, T, draft_probs, T, temperature, top_k, top_p, seed, positions, B, dev,
                      max_depth, "max_depth")
    multi_path = verify in MULTI_PATH_RULES
    if multi_path and draft_probs is None:
        raise ValueError(f"verify={verify!r} needs draft_probs: row i is the distribution node i's children were "
                         "drawn from (multi-path block verification weighs each path by it); trees without draft "
                         "probabilities (top-k / n-gram trees) are verified by verify='specinfer'")
    if not (values and _backend.value_checks_enabled(target_logits)):
        return
    check_cu(cu_num_nodes, "cu_num_nodes", T, "tree_tokens.numel()", min_step=1)
    check_ids_in_vocab(tree_tokens, "tree_tokens", V)
    # i.i.d. paths may repeat a whole path: its leaf then repeats a sibling leaf's token
    check_tree(parents, cu_num_nodes, tokens=tree_tokens, max_depth=max_depth,
               duplicate_leaves=verify == "block", equal_depth_leaves=multi_path)
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
                           seed, positions, max_draft_len, verify="token", typical_eps=None, typical_delta=None):
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
        # emit the argmax — every rule's greedy limit: no probabilities, no random draws
        argmax = sanitize(target_logits).argmax(1)                   # [R]
        n_acc = _leading_accepts(is_draft & valid & (x == argmax), row_req, row_j, B, W)
        return _chain_output(x, row_req, row_j, n_acc, argmax[cu[:-1] + b + n_acc], B, W)

    tgt = _Target(target_logits, row_req, temperature, top_k, top_p)
    all_rows = torch.arange(R, device=dev)
    p_x = torch.where(valid, tgt.prob_at(all_rows, xc), 0.0)      # P_j(x_{j+1}) of each draft row
    q = draft_probs.float() if draft_probs is not None and N > 0 else None
    q_x = q[draft_idx, xc] if q is not None else torch.ones_like(p_x)   # point mass: Q_j(x_{j+1}) = 1
    u = philox.uniform(seed[row_req], positions[row_req] + row_j, philox.ACCEPT_LANE)
    greedy_hit = is_draft & valid & (x == tgt.argmax)
    scale = None                                                   # p_τ of the block rule's residual
    keep = None                                                    # typical: P(y) >= thr at the sampled row
    if verify == "block":
        n_acc, scale = _block_accept(tgt, q, draft_idx, p_x, q_x, u, is_draft, valid, row_req, row_j, num_draft,
                                     B, W)
        n_acc = torch.where(temperature == 0, _leading_accepts(greedy_hit, row_req, row_j, B, W), n_acc)
    elif verify == "typical":
        thr = _typical_threshold(tgt, row_req, typical_eps, typical_delta)      # [R]
        accept = is_draft & valid & torch.where(tgt.greedy, x == tgt.argmax, p_x > thr)
        n_acc = _leading_accepts(accept, row_req, row_j, B, W)
    else:
        accept = is_draft & valid & torch.where(tgt.greedy, x == tgt.argmax, u * q_x < p_x)
        n_acc = _leading_accepts(accept, row_req, row_j, B, W)

    # the emitted token at row τ = n_acc: recovered at a rejection, or the bonus row
    srow = cu[:-1] + b + n_acc                                     # [B]
    p = tgt.probs(srow)                                            # [B, V]
    excl = is_draft[srow] & valid[srow]                            # drop the rejected point-mass draft
    w = torch.where(excl[:, None] & (torch.arange(V, device=dev) == xc[srow][:, None]), 0.0, p)
    if verify == "typical":
        w = torch.where(p >= thr[srow][:, None], p, 0.0)           # Medusa: sample the truncated target
    elif q is not None:
        a = 1.0 if scale is None else scale[:, None]
        resid = (a * p - q[draft_idx[srow]]).clamp(min=0)          # max(p_τ P_τ − Q_τ, 0) (token rule: p_τ = 1)
        use_resid = excl & (resid.sum(1) > 0)
        w = torch.where(use_resid[:, None], resid, w)
    u_s = philox.uniform(seed, positions + n_acc, philox.SAMPLE_LANE)
    token = inverse_cdf(w, u_s, tgt.argmax[srow])
    token = torch.where(tgt.greedy[srow], tgt.argmax[srow], token)
    return _chain_output(x, row_req, row_j, n_acc, token, B, W)


def _padded(values, row_req, row_j, B: int, W: int, fill=0.0) -> torch.Tensor:
    """[B, W] layout of per-row values: column j holds row j of request b."""
    out = torch.full((B, W), fill, dtype=values.dtype, device=values.device)
    out[row_req, row_j] = values
    return out


def block_ratio(prev, px, qx):
    """p_i = min(p_{i-1} · P(x_i) / Q(x_i), 1), written without dividing 0 by 0: a draft the
    target gives no mass has ratio 0, one the drafter gave no mass (garbage) ratio 1."""
    num = prev * px
    return torch.where((num >= qx) & (num > 0), 1.0, torch.where(qx > 0, num / qx, 0.0))


def _block_accept(tgt, q, draft_idx, p_x, q_x, u, is_draft, valid, row_req, row_j, num_draft, B: int, W: int):
    """(τ [B], p_τ [B]) of the block rule for every request (greedy rows are the caller's)."""
    dev = p_x.device
    px = _padded(torch.where(is_draft & valid, p_x, 0.0), row_req, row_j, B, W)   # [B, W]: P_j(x_{j+1})
    qx = _padded(q_x, row_req, row_j, B, W, 1.0)
    ratio = torch.ones(B, W, device=dev)                            # column i: p_i
    for i in range(1, W):
        ratio[:, i] = block_ratio(ratio[:, i - 1], px[:, i - 1], qx[:, i - 1])
    p_row = ratio[row_req, row_j]                                   # [R]: p_j of row j
    if q is not None:
        # Z_j = Σ_x max(p_j P_j(x) − Q_j(x), 0) for the draft rows
        resid = (p_row[:, None] * tgt.probs(torch.arange(len(row_req), device=dev)) - q[draft_idx]).clamp(min=0)
        Z = torch.where(is_draft, resid.sum(1), 0.0)
    else:
        Z = p_row * (1 - p_x)                                       # point mass at x_{j+1}
    den = Z + 1 - p_row
    h_row = torch.where(den > 0, Z / den, 1.0)
    K = num_draft[:, None]
    cols = torch.arange(W, device=dev)[None, :]
    h = torch.where(cols == K, ratio, _padded(h_row, row_req, row_j, B, W))       # h_K = p_K
    eta = _padded(u, row_req, row_j, B, W, 1.0)                     # η_i at column i - 1
    acc = (eta[:, :-1] < h[:, 1:]) & (cols[:, 1:] <= K)             # [B, W - 1]: η_i < h_i, i = 1..K
    tau = (acc.long() * cols[:, 1:]).amax(1) if W > 1 else torch.zeros(B, dtype=torch.long, device=dev)
    return tau, ratio.gather(1, tau[:, None])[:, 0]


def _typical_threshold(tgt, row_req, typical_eps, typical_delta) -> torch.Tensor:
    """thr [R] = min(ε, δ · exp(−H(P))) of every row, H the entropy of the processed target."""
    P = tgt.probs(torch.arange(len(row_req), device=row_req.device))
    H = -torch.where(P > 0, P * torch.log(P), 0.0).sum(1)
    eps = TYPICAL_EPS if typical_eps is None else typical_eps[row_req]
    delta = TYPICAL_DELTA if typical_delta is None else typical_delta[row_req]
    return torch.minimum(torch.as_tensor(eps, device=P.device), delta * torch.exp(-H))


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
                                top_k, top_p, seed, positions, max_depth, verify="specinfer"):
    """torch backend of :func:`fastverify.tree_rejection_sample`: all trees walk in
    lockstep, one depth per step; recursive rejection tries the c-th child of every
    request at once. Multi-path block rules: :func:`_multi_path_block_torch`."""
    if verify in MULTI_PATH_RULES and not (target_logits.device.type == "cpu" and not bool((temperature > 0).any())):
        return _multi_path_block_torch(target_logits, tree_tokens, parents, cu_num_nodes, draft_probs, temperature,
                                       top_k, top_p, seed, positions, max_depth, wor=verify == "block_wor")
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


def _tree_paths(cu, row_req, local, parents, D: int):
    """The draft paths of every request — its root-to-leaf paths, leaves in node order:
    (leaf [B, L] global ids (-1 pad), nodes [B, L, D] the path's node at each depth (-1 below
    the leaf), depth [T] of every node). L, the most leaves of a request, is read on the host,
    or is T while a CUDA graph is captured."""
    T = row_req.numel()
    B = cu.numel() - 1
    dev = cu.device
    par = parents.long()
    is_child = (local > 0) & (par >= 0) & (par < local)
    gpar = torch.where(is_child, cu[:-1][row_req] + par, T)                   # T: none
    depth = torch.zeros(T, dtype=torch.long, device=dev)
    for _ in range(D):
        depth = torch.where(is_child, torch.cat([depth, depth.new_zeros(1)])[gpar] + 1, 0)
    depth = depth.clamp(max=D - 1)
    leaf = torch.bincount(gpar, minlength=T + 1)[:T] == 0                   # [T]
    leaves_per = torch.zeros(B, dtype=torch.long, device=dev).index_add_(0, row_req, leaf.long())
    L = max(int(leaves_per.max()) if B else 1, 1) if host_read_ok(leaves_per) else max(T, 1)
    rank = torch.cumsum(leaf.long(), 0) - 1                                 # global leaf rank
    first = torch.cumsum(leaves_per, 0) - leaves_per                        # [B]
    slot = rank - first[row_req]
    ids = torch.full((B, L), -1, dtype=torch.long, device=dev)
    keep = leaf & (slot < L)
    ids[row_req[keep], slot[keep]] = torch.arange(T, device=dev)[keep]
    nodes = torch.full((B, L, D), -1, dtype=torch.long, device=dev)
    cur = ids.clone()
    gpar_ext = torch.cat([gpar, gpar.new_full((1,), T)])
    depth_ext = torch.cat([depth, depth.new_zeros(1)])
    for _ in range(D):                                                      # walk each leaf up to its root
        ok = cur >= 0
        d = depth_ext[torch.where(ok, cur, T)]
        nodes.scatter_(2, d[..., None], torch.where(ok, cur, nodes.gather(2, d[..., None])[..., 0])[..., None])
        up = gpar_ext[torch.where(ok, cur, T)]
        cur = torch.where(ok & (up < T), up, -1)
    return ids, nodes, depth


def _multi_path_block_torch(target_logits, tree_tokens, parents, cu_num_nodes, draft_probs, temperature, top_k,
                            top_p, seed, positions, max_depth, wor: bool):
    """Greedy multi-path block verification (docs/ops.md), all requests in lockstep, one
    block-verification attempt (one draft path) per step:

        v = root, R = P_root
        attempt k: j = the first unused path through v (none: y ~ R, stop)
            along j from v: x_1..x_L, T_0 = R, T_i = P(u_i), D_i = the law j's next token was
            drawn from at u_i (Q(u_i); without replacement: Q(u_i) minus every earlier path's
            mass below u_i, renormalized); block verification with η_i = uniform(seed,
            pos + depth(u_{i-1}), lane 0, attempt k) gives τ
            τ = L: accept the whole path, y ~ P(leaf), stop
            else:  v = u_τ, R = normalize(max(p_τ T_τ − D_τ, 0))
        y is drawn with uniform(seed, pos + depth(v), lane 1).
    Greedy requests walk the argmax children (every rule's limit at temperature 0)."""
    dev = target_logits.device
    T, V = target_logits.shape
    B = cu_num_nodes.numel() - 1
    D = max_depth + 1
    cu = cu_num_nodes.long()
    row_req, local = row_requests(cu, T, 0)
    tgt = _Target(target_logits, row_req, temperature, top_k, top_p)
    P = tgt.probs(torch.arange(T, device=dev))                              # [T, V]
    q = draft_probs.float()
    tokens = tree_tokens.long().clamp(0, V - 1)
    leaf, nodes, depth = _tree_paths(cu, row_req, local, parents, D)
    L = leaf.shape[1]
    has_leaf = leaf >= 0
    leaf_depth = torch.where(has_leaf, depth[leaf.clamp(min=0)], -1)        # [B, L]
    ar = torch.arange(B, device=dev)
    node_safe = nodes.clamp(min=0)
    # mass under Q of each path below each of its nodes: below[b, l, d] = Π_{d' > d} Q(x_{d'} | u_{d'-1})
    edge = torch.ones(B, L, D, device=dev)
    edge[..., 1:] = torch.where(nodes[..., 1:] >= 0, q[node_safe[..., :-1], tokens[node_safe[..., 1:]]], 1.0)
    below = torch.flip(torch.cumprod(torch.flip(edge, [2]), 2), [2])
    below = torch.cat([below[..., 1:], torch.ones(B, L, 1, device=dev)], 2)

    def at_depth(t, d):  # t [B, L, D] at depth d [B] -> [B, L]
        return t.gather(2, d[:, None, None].expand(B, L, 1))[..., 0]

    def draft_row(u, du, j):
        """D [B, V]: the law path j's token after node u (depth du) was drawn from."""
        row = q[u]
        if not wor:
            return row
        earlier = has_leaf & (torch.arange(L, device=dev)[None] < j[:, None]) & (at_depth(nodes, du) == u[:, None]) \
            & (leaf_depth > du[:, None])
        m = torch.where(earlier, at_depth(below, du), 0.0)                 # [B, L]
        nxt = tokens[at_depth(node_safe, (du + 1).clamp(max=D - 1))]       # their tokens after u
        rem = torch.zeros(B, V, device=dev).scatter_add_(1, nxt, m)
        left = 1 - m.sum(1, keepdim=True)
        return torch.where(left > 0, (row - rem) / left.clamp(min=1e-30), 0.0)

    v = cu[:-1].clone()                                                     # [B] current node
    R = P[v].clone()                                                        # [B, V] residual target at v
    used = torch.zeros(B, L, dtype=torch.bool, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)                     # the path was accepted to its leaf
    stop = temperature == 0                                                 # greedy: walked below
    for attempt in range(L):
        dv = depth[v]
        through = has_leaf & ~used & (at_depth(nodes, dv) == v[:, None]) & (leaf_depth > dv[:, None])
        act = through.any(1) & ~stop & ~done
        stop = stop | (~through.any(1) & ~done)
        if host_read_ok(act) and not bool(act.any()):
            break
        j = through.long().argmax(1)                                        # first path through v
        used[ar, j] = used[ar, j] | act
        Lj = (leaf_depth[ar, j] - dv).clamp(min=0)                          # its tokens below v
        p = torch.ones(B, device=dev)                                       # p_i
        ps, Ts, Ds, us = [p], [R], [], [v]                                  # per i: p_i, T_i, D_i, u_i
        h = torch.zeros(B, D, device=dev)
        u_prev, T_prev = v, R
        for i in range(1, D):
            live = act & (i <= Lj)
            di = (dv + i).clamp(max=D - 1)
            u_i = torch.where(live, nodes[ar, j, di], u_prev).clamp(min=0)
            D_prev = draft_row(u_prev, depth[u_prev], j)
            Ds.append(D_prev)
            x = tokens[u_i]
            p = torch.where(live, block_ratio(p, T_prev.gather(1, x[:, None])[:, 0],
                                              D_prev.gather(1, x[:, None])[:, 0]), p)
            T_i = P[u_i]
            if i < D - 1:
                Z = (p[:, None] * T_i - draft_row(u_i, depth[u_i], j)).clamp(min=0).sum(1)
            else:
                Z = torch.zeros(B, device=dev)
            den = Z + 1 - p
            h_i = torch.where(i == Lj, p, torch.where(den > 0, Z / den, 1.0))
            eta = philox.uniform(seed, positions + dv + i - 1, philox.ACCEPT_LANE, attempt)
            h[:, i] = torch.where(live & (eta < h_i), 1.0, 0.0)
            ps.append(p)
            Ts.append(T_i)
            us.append(u_i)
            u_prev, T_prev = u_i, T_i
        cols = torch.arange(D, device=dev)
        tau = (h.long() * cols).amax(1)                                     # [B]
        full = act & (tau == Lj)
        done = done | full
        v_new = torch.stack(us, 1).gather(1, tau[:, None])[:, 0]
        p_tau = torch.stack(ps, 1).gather(1, tau[:, None])[:, 0]
        T_tau = torch.stack(Ts, 1).gather(1, tau[:, None, None].expand(B, 1, V))[:, 0]
        D_tau = torch.stack(Ds + [Ds[-1]], 1).gather(1, tau[:, None, None].expand(B, 1, V))[:, 0]
        resid = (p_tau[:, None] * T_tau - D_tau).clamp(min=0)
        mass = resid.sum(1, keepdim=True)
        resid = torch.where(mass > 0, resid / mass.clamp(min=1e-30), T_tau)
        move = act & ~full
        R = torch.where(move[:, None], resid, R)
        v = torch.where(act, v_new, v)
    # the emitted token: y ~ R at v, or y ~ P(leaf) after a whole path
    w = torch.where(done[:, None], P[v], R)
    u_s = philox.uniform(seed, positions + depth[v], philox.SAMPLE_LANE)
    y = inverse_cdf(w, u_s, tgt.argmax[v])
    fin, y = _greedy_walk(v, y, temperature, tgt.argmax, tree_tokens, parents, cu, row_req, local, D)
    return _path_outputs(fin, y, tree_tokens.long(), gpar_of(parents, cu, row_req, local), depth, cu, D)


def gpar_of(parents, cu, row_req, local):
    """Global parent of every node, T for a root (or a parent outside its tree)."""
    T = row_req.numel()
    par = parents.long()
    is_child = (local > 0) & (par >= 0) & (par < local)
    return torch.where(is_child, cu[:-1][row_req] + par, T)


def _greedy_walk(fin, y, temperature, argmax, tree_tokens, parents, cu, row_req, local, D: int):
    """For greedy requests, replace (final node, token) by the argmax walk's: at each node
    move to the first child carrying the argmax, else emit it."""
    greedy = temperature == 0
    kids = _children_table(cu, row_req, local, parents)                   # [T + 1, C]
    tokens = tree_tokens.long()
    node = cu[:-1].clone()
    for _ in range(D - 1):
        kid = kids[node]
        hit = (kid >= 0) & (tokens[kid.clamp(min=0)] == argmax[node][:, None])
        nxt = kid.gather(1, hit.long().argmax(1, keepdim=True))[:, 0]
        node = torch.where(hit.any(1), nxt, node)
    return torch.where(greedy, node, fin), torch.where(greedy, argmax[node], y)


def _path_outputs(fin, y, tokens, gpar, depth, cu, D: int):
    """(accepted_nodes [B, D]: root-to-fin tree-local indices, output_tokens [B, D]: the
    accepted nodes' tokens then y, num_accepted [B] = depth of fin), all int32."""
    B = fin.numel()
    T = gpar.numel()
    dev = fin.device
    acc = torch.full((B, D), -1, dtype=torch.long, device=dev)
    out = torch.full((B, D), -1, dtype=torch.long, device=dev)
    num = depth[fin]
    cols = torch.arange(D, device=dev)
    node = fin.clone()
    gpar_ext = torch.cat([gpar, gpar.new_full((1,), T)])
    for _ in range(D):                                                   # walk up from fin to the root
        ok = node < T
        d = torch.where(ok, depth[node.clamp(max=T - 1)], 0)
        acc = torch.where(ok[:, None] & (cols == d[:, None]), (node - cu[:-1])[:, None], acc)
        out = torch.where(ok[:, None] & (d[:, None] >= 1) & (cols == d[:, None] - 1),
                          tokens[node.clamp(max=T - 1)][:, None], out)
        node = torch.where(ok, gpar_ext[node.clamp(max=T)], T)
    out = torch.where(cols == num[:, None], y[:, None], out)
    return acc.to(torch.int32), out.to(torch.int32), num.to(torch.int32)


# --------------------------------------------------------------------------- fake kernels


@torch.library.register_fake("fastverify::rejection_sample", lib=lib)
def _rejection_sample_fake(target_logits, draft_tokens, cu_num_draft, *, draft_probs=None, temperature, top_k=None,
                           top_p=None, seed, positions, max_draft_len, verify="token", typical_eps=None,
                           typical_delta=None):
    check_rejection_sample(target_logits, draft_tokens, cu_num_draft, draft_probs, temperature, top_k, top_p,
                           seed, positions, max_draft_len, verify, typical_eps, typical_delta, values=False)
    B = cu_num_draft.shape[0] - 1
    out = target_logits.new_empty((B, max_draft_len + 1), dtype=torch.int32)
    return out, target_logits.new_empty((B,), dtype=torch.int32)


@torch.library.register_fake("fastverify::tree_rejection_sample", lib=lib)
def _tree_rejection_sample_fake(target_logits, tree_tokens, parents, cu_num_nodes, *, draft_probs=None, temperature,
                                top_k=None, top_p=None, seed, positions, max_depth, verify="specinfer"):
    check_tree_rejection_sample(target_logits, tree_tokens, parents, cu_num_nodes, draft_probs, temperature,
                                top_k, top_p, seed, positions, max_depth, verify, values=False)
    B = cu_num_nodes.shape[0] - 1
    shape = (B, max_depth + 1)
    return (target_logits.new_empty(shape, dtype=torch.int32), target_logits.new_empty(shape, dtype=torch.int32),
            target_logits.new_empty((B,), dtype=torch.int32))


# --------------------------------------------------------------------------- dispatch


def _rejection_sample_impl(target_logits, draft_tokens, cu_num_draft, *, draft_probs=None, temperature, top_k=None,
                           top_p=None, seed, positions, max_draft_len, verify="token", typical_eps=None,
                           typical_delta=None):
    check_rejection_sample(target_logits, draft_tokens, cu_num_draft, draft_probs, temperature, top_k, top_p,
                           seed, positions, max_draft_len, verify, typical_eps, typical_delta)
    if cu_num_draft.numel() == 1:        # an empty batch: empty outputs, no launch
        return tuple(t.fill_(-1) for t in _rejection_sample_fake(
            target_logits, draft_tokens, cu_num_draft, draft_probs=draft_probs, temperature=temperature, top_k=top_k,
            top_p=top_p, seed=seed, positions=positions, max_draft_len=max_draft_len))
    if verify == "typical":              # the kernels read one (ε, δ) per request
        B = cu_num_draft.numel() - 1
        if typical_eps is None:
            typical_eps = temperature.new_full((B,), TYPICAL_EPS)
        if typical_delta is None:
            typical_delta = temperature.new_full((B,), TYPICAL_DELTA)
    fn = implementation(target_logits.device, "rejection", "rejection_sample", rejection_sample_torch)
    return fn(target_logits, draft_tokens, cu_num_draft, draft_probs, temperature, top_k, top_p, seed, positions,
              max_draft_len, verify, typical_eps, typical_delta)


def _tree_rejection_sample_impl(target_logits, tree_tokens, parents, cu_num_nodes, *, draft_probs=None, temperature,
                                top_k=None, top_p=None, seed, positions, max_depth, verify="specinfer"):
    check_tree_rejection_sample(target_logits, tree_tokens, parents, cu_num_nodes, draft_probs, temperature,
                                top_k, top_p, seed, positions, max_depth, verify)
    if cu_num_nodes.numel() == 1:        # an empty batch: empty outputs, no launch
        return _tree_rejection_sample_fake(
            target_logits, tree_tokens, parents, cu_num_nodes, draft_probs=draft_probs, temperature=temperature,
            top_k=top_k, top_p=top_p, seed=seed, positions=positions, max_depth=max_depth, verify=verify)
    fn = implementation(target_logits.device, "rejection", "tree_rejection_sample", tree_rejection_sample_torch)
    return fn(target_logits, tree_tokens, parents, cu_num_nodes, draft_probs, temperature, top_k, top_p, seed,
              positions, max_depth, verify)


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
                     top_p=None, seed, positions, max_draft_len, verify="token", typical_eps=None, typical_delta=None):
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
        verify: the verification rule. ``"token"`` (default): the token-wise rule above.
            ``"block"``: block verification (Sun et al., ICLR 2025) — lossless, never accepts
            fewer drafts on average than "token", the same at temperature 0.
            ``"typical"``: Medusa's typical acceptance — **lossy** (the output does not follow
            the target's law): accept while P(x) > min(ε, δ·exp(−H(P))), then sample P
            truncated to P >= that threshold.
        typical_eps, typical_delta: ``[B]`` fp32 in [0, 1] or Python numbers, ε and δ of
            ``"typical"`` (default Medusa's 0.09 and 0.3).

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
    dev = target_logits.device if isinstance(target_logits, torch.Tensor) else None
    return torch.ops.fastverify.rejection_sample(
        target_logits, draft_tokens, cu_num_draft, draft_probs=draft_probs, max_draft_len=max_draft_len,
        verify=verify, typical_eps=_per_request(typical_eps, "typical_eps", B, torch.float32, dev),
        typical_delta=_per_request(typical_delta, "typical_delta", B, torch.float32, dev),
        **_sampling_args(target_logits, B, temperature, top_k, top_p, seed, positions))


def tree_rejection_sample(target_logits, tree_tokens, parents, cu_num_nodes, *, draft_probs=None, temperature,
                          top_k=None, top_p=None, seed, positions, max_depth, verify="specinfer"):
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
        verify: ``"specinfer"`` (default): sample-then-match, or recursive rejection with
            ``draft_probs``. ``"block"``: greedy multi-path block verification — the tree is
            the trie of n draft paths drawn i.i.d. from the drafter (every leaf ends one path,
            leaves in the order the paths were drawn; a path drawn twice is a repeated leaf),
            each verified by block verification against what the paths before it left.
            ``"block_wor"``: the same for paths drawn without replacement (Gumbel-top-n in
            score order, or i.i.d. paths with repeats dropped). Both need ``draft_probs``
            and every leaf of a tree at one depth; both are lossless.

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
        verify=verify, **_sampling_args(target_logits, B, temperature, top_k, top_p, seed, positions))
