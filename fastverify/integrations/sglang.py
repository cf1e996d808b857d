"""SGLang entry points: sgl-kernel 0.3.21's tree verification and tree building.

Drop-in stand-ins for ``sgl_kernel.verify_tree_greedy``,
``sgl_kernel.tree_speculative_sampling_target_only`` and
``sgl_kernel.build_tree_kernel_efficient`` (``sgl_kernel/speculative.py`` of
sgl-kernel 0.3.21, kernels ``csrc/speculative/eagle_utils.cu`` and
``speculative_sampling.cuh``): same argument order, same dtypes and layouts, same
in-place outputs, nothing returned. sgl-kernel 0.3.21 spells the tree arguments
``retrive_*``; later releases spell them ``retrieve_*``: both keyword spellings are
accepted (positional callers are unaffected)::

    from fastverify.integrations.sglang import (build_tree_kernel_efficient,
        tree_speculative_sampling_target_only, verify_tree_greedy)

Layouts (B requests, N = draft_token_num nodes per tree, node 0 the root, K =
``accept_index.shape[1]`` = the most tokens a step accepts + 1, V vocabulary):

- ``candidates [B, N]`` int64: each node's token (the root's is the last verified one).
- ``retrive_index [B, N]`` int64: each node's flat index ``b·N + i`` into ``predicts``
  and ``target_predict``; ``retrive_next_token [B, N]`` the first child of each node,
  ``retrive_next_sibling [B, N]`` its next sibling (-1: none). Tree-local indices.
- ``predicts [B·N]`` int32: at ``retrive_index`` of each accepted node, the token that
  follows it (the next accepted draft, or the final sampled/argmax token); other entries
  are left as they were. ``accept_index [B, K]`` int32: ``retrive_index`` of the root and
  the accepted nodes (later entries left as they were). ``accept_token_num [B]`` int32:
  accepted non-root nodes.

Semantics mapped (per request; what the sgl-kernel CUDA thread does, vectorized):

- ``verify_tree_greedy``: from the root, for up to K - 1 steps, take the first child (in
  ``next_token`` / ``next_sibling`` order) whose token equals
  ``target_predict.flatten()[retrive_index[b, cur]]``; stop when none does.
- ``tree_speculative_sampling_target_only`` (coin u_p = ``uniform_samples[b, p]`` for the
  children of node p, target row ``target_probs[b, p]``): walk the children in order
  accumulating ``acc += target(x_child)`` in float32; accept the first child with
  ``u_p <= acc / max(threshold_acc, 1e-9)`` or ``target(x_child) >= threshold_single``;
  each rejected child writes ``draft_probs[b, p, x] = target_probs[b, p, x]`` (in place,
  as sgl-kernel does). The last accepted node r then emits ``inverse CDF of
  relu(target_probs[b, r] - draft_probs[b, r])`` (``draft_probs`` taken as 0 when K - 1
  drafts were accepted, the bonus token) at ``uniform_samples_for_final_sampling[b]``:
  the first token x with ``relu(x) > 0`` and ``cdf(x) > u · total``, V - 1 when none
  (0.3.21's fallback). With thresholds 1 and ``draft_probs`` zero this is lossless: every
  emitted token follows the target distribution.
- ``build_tree_kernel_efficient``: node t >= 1 is ``selected_index[b, t - 1]``; its parent
  is the root when ``selected_index // topk == 0``, else the node whose
  ``selected_index`` equals ``parent_list[b, selected_index // topk]``. Children are
  linked in ascending node order (``next_token`` = smallest child, ``next_sibling`` = next
  larger one); ``retrive_index[b, i] = b·N + i``; ``positions = verified_seq_len[b] +
  depth``; ``tree_mask`` marks each node's ancestors and itself, in the layout of
  ``tree_mask_mode`` (:class:`TreeMaskMode`).

What runs where: the ancestor masks, depths and positions of
``build_tree_kernel_efficient`` come from the fastverify op :func:`fastverify.build_tree`
(torch on CPU, Triton or CUDA on GPU, the same integers on every backend); everything else
(parent search, child lists, the coin-driven walks, the residual inverse CDF and the
in-place writes) is vectorized torch here, because no fastverify op takes caller-supplied
coins or precomputed argmax ids. No Python loop runs over the batch: loops run over the
tree (at most N - 1 siblings, K - 1 steps). Nothing reads tensor data back to the host
(no ``.item()``, ``.tolist()``, ``nonzero``, boolean indexing) except the value checks,
which run on CPU tensors always and on CUDA only with ``FASTVERIFY_CHECKS=1`` (never
during graph capture), so the calls are CUDA-graph capturable.

Differences from sgl-kernel 0.3.21, all on input the kernel does not define or only
asserts on:

- Shapes, dtypes and devices are checked on the host and raise ``ValueError`` naming the
  argument (sgl-kernel asserts or checks nothing). Value checks (ids in range) raise
  ``ValueError`` on CPU; without them an out-of-range id is never used as an address: a
  link outside [0, N) ends the sibling chain, a candidate outside [0, V) is rejected with
  target probability 0, indices into ``predicts`` / ``target_predict`` are clamped.
- Floating-point sums (the residual's total and CDF) are taken in a different order than
  the CUDA block reduction, so a coin within a few ulp of a CDF boundary may pick the
  neighbouring token; the acceptance sums are float32 in sibling order, as in the kernel.
- ``build_tree_kernel_efficient``: a node whose parent is missing, or listed after it
  (sglang sorts ``selected_index``, so parents always come first), is left out of the
  child lists (the kernel's "invalid eagle tree" case) and attends to the root and itself
  at depth 1 (the kernel's result is undefined there). ``tree_mask_mode`` must be 0, 1 or
  2, and bit packing needs ``draft_token_num <= 32`` (more overflows into the next row in
  the kernel).
"""

from __future__ import annotations

import enum
import struct

import torch

from .. import _backend
from ..ops import build_tree
from ..ops._checks import check_tensor

__all__ = ["TreeMaskMode", "build_tree_kernel_efficient", "tree_speculative_sampling_target_only",
           "verify_tree_greedy"]

I32, I64, F32 = torch.int32, torch.int64, torch.float32


class TreeMaskMode(enum.IntEnum):
    """``tree_mask_mode`` of :func:`build_tree_kernel_efficient` (sglang's enum)."""

    FULL_MASK = 0             # bool, per request N rows of (verified_seq_len + N): prefix untouched, then the tree
    QLEN_ONLY = 1             # bool [B·N·N]: the tree columns only
    QLEN_ONLY_BITPACKING = 2  # bytes: N ≤ 8 / 16 / 32 → 1 / 2 / 4 little-endian bytes per row, bit j = node j


# --------------------------------------------------------------------------- argument handling


def _pick(name: str, old, new_name: str, new):
    """The one of sgl-kernel 0.3.21's ``retrive_*`` and the later ``retrieve_*`` spelling given."""
    if old is not None and new is not None:
        raise TypeError(f"got both {name} and {new_name} (two spellings of one argument)")
    if old is None and new is None:
        raise TypeError(f"missing required argument {name} (or {new_name})")
    return old if old is not None else new


def _required(name: str, value):
    if value is None:
        raise TypeError(f"missing required argument {name}")
    return value


def _f32(x: float) -> float:
    """x rounded to float32, as the kernel's float parameters are."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _threshold(name: str, x) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0.0 <= float(x) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1] (sgl-kernel checks 0 <= {name} <= 1), got {x!r}")
    return float(x)


def _check_range(t: torch.Tensor, name: str, lo: int, hi: int, why: str) -> None:
    """Value check: lo <= t < hi (CPU always, CUDA with FASTVERIFY_CHECKS=1)."""
    if t.numel() == 0 or not _backend.value_checks_enabled(t):
        return
    bad = ((t < lo) | (t >= hi)).flatten()
    if bool(bad.any()):
        i = int(bad.to(torch.uint8).argmax())
        raise ValueError(f"{name} must hold values in [{lo}, {hi}) ({why}); got {int(t.flatten()[i])} at flat "
                         f"index {i}")


def _check_tree_args(predicts, accept_index, accept_token_num, candidates, ri, nt, ns, B, dev):
    """Host-side checks shared by the two verification entry points; returns (N, K)."""
    check_tensor(candidates, "candidates", ndim=2, dtypes=(I64,), device=dev, shape=(B, None))
    N = candidates.shape[1]
    for name, t in (("retrive_index", ri), ("retrive_next_token", nt), ("retrive_next_sibling", ns)):
        check_tensor(t, name, ndim=2, dtypes=(I64,), device=dev, shape=(B, N))
    check_tensor(predicts, "predicts", ndim=1, dtypes=(I32,), device=dev)
    check_tensor(accept_index, "accept_index", ndim=2, dtypes=(I32,), device=dev, shape=(B, None))
    check_tensor(accept_token_num, "accept_token_num", ndim=1, dtypes=(I32,), device=dev, shape=(B,))
    K = accept_index.shape[1]
    if B and K < 1:
        raise ValueError("accept_index must have at least one column (the root), got shape "
                         f"{tuple(accept_index.shape)}")
    if B and N < 1:
        raise ValueError(f"candidates must have at least one node (the root) per request, got shape "
                         f"{tuple(candidates.shape)}")
    if B and predicts.numel() < 1:
        raise ValueError("predicts is empty but retrive_index addresses it")
    return N, K


# --------------------------------------------------------------------------- tree walks (shared)
# Node N stands for "none": every list, walk and table is padded with it, so that a step of
# a walk is one gather (no masking), and a missing link or child can never be an address.


def _links(x: torch.Tensor, N: int) -> torch.Tensor:
    """``[B, N + 1]``: tree-local links with -1 (and anything outside [0, N)) read as the
    sentinel N, and the sentinel's own link pointing to itself."""
    return torch.cat([torch.where((x >= 0) & (x < N), x, N), x.new_full((x.shape[0], 1), N)], 1)


def _children(next_token: torch.Tensor, next_sibling: torch.Tensor, S: int) -> torch.Tensor:
    """``[B, N, S]``: the children of every node in sibling order, N padded (a node has at
    most N - 1 children, so S = N - 1 steps cover every well-formed list)."""
    N = next_token.shape[1]
    nt, ns = _links(next_token, N), _links(next_sibling, N)
    cols = [nt[:, :N]]
    for _ in range(S - 1):
        cols.append(ns.gather(1, cols[-1]))
    return torch.stack(cols, -1)


def _first(ok: torch.Tensor, ch: torch.Tensor):
    """The first child with ``ok`` per node: (its node index or N, its rank or S)."""
    found = ok.any(-1)
    rank = torch.where(found, ok.to(torch.uint8).argmax(-1), ok.shape[-1])    # argmax: the first True
    ch = torch.cat([ch, torch.full_like(ch[..., :1], ch.shape[1])], -1)        # rank S → the sentinel
    return ch.gather(-1, rank[..., None])[..., 0], rank


def _walk(chosen: torch.Tensor, K: int) -> torch.Tensor:
    """``path [B, K]``: each node's accepted child followed from the root for up to K - 1
    steps (tree-local nodes, root first, the sentinel N after the last accepted one)."""
    B, N = chosen.shape
    chosen = torch.cat([chosen, chosen.new_full((B, 1), N)], 1)                # the sentinel stays put
    nodes = [chosen.new_zeros(B, 1)]
    for _ in range(K - 1):
        nodes.append(chosen.gather(1, nodes[-1]))
    return torch.cat(nodes, 1)


def _write_outputs(predicts, accept_index, accept_token_num, ri, path, vals) -> None:
    """In-place outputs of both verifiers: ``predicts[ri[path_k]] = vals_k`` and
    ``accept_index[b, k] = ri[path_k]`` for the accepted path, ``accept_token_num``."""
    N = ri.shape[1]
    on = path < N                                                              # [B, K]
    ri_path = ri.gather(1, path.clamp(max=N - 1))                              # [B, K]
    accept_index.copy_(torch.where(on, ri_path.to(I32), accept_index))
    accept_token_num.copy_(on[:, 1:].sum(1))
    # Entries past the path repeat the root's (address, value): duplicates carry equal values,
    # so the unordered scatter is deterministic without a boolean-indexed (host-synced) select.
    addr = torch.where(on, ri_path, ri_path[:, :1]).clamp_(0, predicts.numel() - 1)
    predicts.index_put_((addr.flatten(),), torch.where(on, vals, vals[:, :1]).flatten().to(I32))


# --------------------------------------------------------------------------- verify_tree_greedy


def verify_tree_greedy(predicts, accept_index, accept_token_num, candidates, retrive_index=None,
                       retrive_next_token=None, retrive_next_sibling=None, target_predict=None, *,
                       retrieve_index=None, retrieve_next_token=None, retrieve_next_sibling=None) -> None:
    """Greedy tree verification against the target's argmax ids (sgl-kernel 0.3.21).

    Args:
        predicts: ``[B·N]`` int32, written at ``retrive_index`` of each accepted node.
        accept_index: ``[B, K]`` int32, written for the root and the accepted nodes.
        accept_token_num: ``[B]`` int32, written: accepted non-root nodes.
        candidates: ``[B, N]`` int64 tokens of the tree nodes (node 0 the root).
        retrive_index, retrive_next_token, retrive_next_sibling: ``[B, N]`` int64 (also
            accepted as ``retrieve_*``).
        target_predict: ``[B, N]`` int64 target argmax after each node, addressed by
            ``retrive_index``.

    Example::

        >>> cand = torch.tensor([[0, 1, 2, 3, 4, 5]])
        >>> ri = torch.arange(6)[None]
        >>> nt = torch.tensor([[1, 2, -1, 4, 5, -1]]); ns = torch.tensor([[-1, 3, -1, -1, -1, -1]])
        >>> predicts = torch.full((6,), -1, dtype=torch.int32)
        >>> acc = torch.full((1, 4), -1, dtype=torch.int32); num = torch.zeros(1, dtype=torch.int32)
        >>> verify_tree_greedy(predicts, acc, num, cand, ri, nt, ns, torch.tensor([[3, 0, 0, 4, 5, 18]]))
        >>> predicts.tolist(), acc.tolist(), num.tolist()
        ([3, -1, -1, 4, 5, 18], [[0, 3, 4, 5]], [3])
    """
    ri = _pick("retrive_index", retrive_index, "retrieve_index", retrieve_index)
    nt = _pick("retrive_next_token", retrive_next_token, "retrieve_next_token", retrieve_next_token)
    ns = _pick("retrive_next_sibling", retrive_next_sibling, "retrieve_next_sibling", retrieve_next_sibling)
    target_predict = _required("target_predict", target_predict)
    check_tensor(candidates, "candidates", ndim=2, dtypes=(I64,), device=getattr(candidates, "device", None))
    B, dev = candidates.shape[0], candidates.device
    N, K = _check_tree_args(predicts, accept_index, accept_token_num, candidates, ri, nt, ns, B, dev)
    check_tensor(target_predict, "target_predict", ndim=2, dtypes=(I64,), device=dev, shape=(B, N))
    if B == 0:
        return
    _check_range(ri, "retrive_index", 0, min(predicts.numel(), B * N),
                 "flat indices into predicts and target_predict")
    _check_range(nt, "retrive_next_token", -1, N, "tree-local node or -1")
    _check_range(ns, "retrive_next_sibling", -1, N, "tree-local node or -1")

    ch = _children(nt, ns, max(N - 1, 1))                                      # [B, N, S]
    tok = candidates.gather(1, ch.clamp(max=N - 1).flatten(1)).view_as(ch)     # [B, N, S]
    # the target's argmax after node p, addressed (as in the kernel) by p's retrive_index
    want = target_predict.reshape(-1)[ri.clamp(0, B * N - 1)]                  # [B, N]
    chosen, _ = _first((ch < N) & (tok == want[..., None]), ch)               # [B, N]
    path = _walk(chosen, K)                                                    # [B, K]
    # each accepted node's successor is the target's argmax after it (the next draft, or the last)
    vals = want.gather(1, path.clamp(max=N - 1))
    _write_outputs(predicts, accept_index, accept_token_num, ri, path, vals)


# --------------------------------------------------------------------------- sampling


def tree_speculative_sampling_target_only(predicts, accept_index, accept_token_num, candidates, retrive_index=None,
                                          retrive_next_token=None, retrive_next_sibling=None, uniform_samples=None,
                                          uniform_samples_for_final_sampling=None, target_probs=None,
                                          draft_probs=None, threshold_single=1.0, threshold_acc=1.0,
                                          deterministic=True, *, retrieve_index=None, retrieve_next_token=None,
                                          retrieve_next_sibling=None) -> None:
    """Tree speculative sampling driven by the caller's coins (sgl-kernel 0.3.21): given the
    same coins, the same outputs as sgl-kernel.

    Args:
        predicts, accept_index, accept_token_num: outputs, as in :func:`verify_tree_greedy`.
        candidates: ``[B, N]`` int64. retrive_index, retrive_next_token,
            retrive_next_sibling: ``[B, N]`` int64 (also accepted as ``retrieve_*``).
        uniform_samples: ``[B, N]`` float32 coin for the children of each node.
        uniform_samples_for_final_sampling: ``[B]`` float32 coin of the emitted token.
        target_probs: ``[B, N, V]`` float32 target distribution after each node.
        draft_probs: ``[B, N, V]`` float32 (sglang passes zeros); the target probability of
            every rejected child is written into it, in place, as sgl-kernel does.
        threshold_single, threshold_acc: in [0, 1]; 1 and 1 (the default) is lossless.
        deterministic: accepted for compatibility; results never depend on it here.

    Example::

        >>> probs = torch.softmax(torch.randn(1, 3, 10), -1)
        >>> cand = torch.tensor([[5, 2, 7]]); ri = torch.arange(3)[None]
        >>> nt = torch.tensor([[1, -1, -1]]); ns = torch.tensor([[-1, 2, -1]])   # root → 1, 2
        >>> predicts = torch.full((3,), -1, dtype=torch.int32)
        >>> acc = torch.full((1, 2), -1, dtype=torch.int32); num = torch.zeros(1, dtype=torch.int32)
        >>> tree_speculative_sampling_target_only(predicts, acc, num, cand, ri, nt, ns, torch.rand(1, 3),
        ...     torch.rand(1), probs, torch.zeros_like(probs))
    """
    ri = _pick("retrive_index", retrive_index, "retrieve_index", retrieve_index)
    nt = _pick("retrive_next_token", retrive_next_token, "retrieve_next_token", retrieve_next_token)
    ns = _pick("retrive_next_sibling", retrive_next_sibling, "retrieve_next_sibling", retrieve_next_sibling)
    coins = _required("uniform_samples", uniform_samples)
    final_coin = _required("uniform_samples_for_final_sampling", uniform_samples_for_final_sampling)
    target_probs = _required("target_probs", target_probs)
    draft_probs = _required("draft_probs", draft_probs)
    t_single = _threshold("threshold_single", threshold_single)
    t_acc = _threshold("threshold_acc", threshold_acc)

    check_tensor(target_probs, "target_probs", ndim=3, dtypes=(F32,), device=getattr(target_probs, "device", None))
    dev = target_probs.device
    check_tensor(coins, "uniform_samples", ndim=2, dtypes=(F32,), device=dev)
    B = coins.shape[0]       # the kernel's batch size comes from uniform_samples
    N, K = _check_tree_args(predicts, accept_index, accept_token_num, candidates, ri, nt, ns, B, dev)
    V = target_probs.shape[2]
    check_tensor(coins, "uniform_samples", ndim=2, dtypes=(F32,), device=dev, shape=(B, N))
    if not isinstance(final_coin, torch.Tensor):
        raise TypeError(f"uniform_samples_for_final_sampling must be a torch.Tensor, got {type(final_coin).__name__}")
    check_tensor(final_coin, "uniform_samples_for_final_sampling", ndim=final_coin.dim(), dtypes=(F32,), device=dev)
    if final_coin.numel() != B:
        raise ValueError(f"uniform_samples_for_final_sampling must hold one coin per request ({B}), got shape "
                         f"{tuple(final_coin.shape)}")
    check_tensor(target_probs, "target_probs", ndim=3, dtypes=(F32,), device=dev, shape=(B, N, None))
    check_tensor(draft_probs, "draft_probs", ndim=3, dtypes=(F32,), device=dev, shape=(B, N, V))
    if B == 0:
        return
    if V < 1:
        raise ValueError(f"target_probs has an empty vocabulary, shape {tuple(target_probs.shape)}")
    _check_range(ri, "retrive_index", 0, predicts.numel(), "flat indices into predicts")
    _check_range(nt, "retrive_next_token", -1, N, "tree-local node or -1")
    _check_range(ns, "retrive_next_sibling", -1, N, "tree-local node or -1")
    _check_range(candidates, "candidates", 0, V, "token ids of target_probs' vocabulary")

    S = max(N - 1, 1)
    ch = _children(nt, ns, S)                                                  # [B, N, S]
    tok = candidates.gather(1, ch.clamp(max=N - 1).flatten(1)).view_as(ch)     # [B, N, S]
    tok_ok = (ch < N) & (tok >= 0) & (tok < V)
    tok = torch.where(tok_ok, tok, 0)
    prob = torch.where(tok_ok, target_probs.gather(2, tok), 0.0)               # target[b, p, x_child]
    # the kernel's running sum over the siblings, in float32 and in sibling order
    cols = [prob[..., 0]]
    for s in range(1, S):
        cols.append(cols[-1] + prob[..., s])
    acc = torch.stack(cols, -1)                                                # [B, N, S]
    # device tensors (not Python floats): a CPU scalar divisor turns into a reciprocal multiply on CUDA
    t_acc_t = torch.full((1,), max(_f32(t_acc), _f32(1e-9)), dtype=F32, device=dev)
    t_single_t = torch.full((1,), _f32(t_single), dtype=F32, device=dev)
    ok = tok_ok & ((coins[..., None] <= acc / t_acc_t) | (prob >= t_single_t))
    chosen, rank = _first(ok, ch)                                              # [B, N]
    path = _walk(chosen, K)                                                    # [B, K]
    num = (path[:, 1:] < N).sum(1)
    last = path.gather(1, num[:, None])[:, 0]                                  # the last accepted node

    # draft_probs[b, p, x] = target for every child rejected at a node the walk examined: the
    # nodes of the path, but not the last one when the walk stopped at K - 1 accepted drafts.
    visited = torch.zeros(B, N + 1, dtype=torch.bool, device=dev).scatter_(1, path[:, :K - 1], True)
    w = visited[:, :N, None] & tok_ok & (torch.arange(S, device=dev) < rank[..., None])   # [B, N, S]
    # unwritten entries repeat one written entry of their row (or rewrite the row's current
    # value at token 0): duplicates then carry equal values and the scatter stays deterministic
    any_w = w.any(-1, keepdim=True)
    fw = w.to(torch.uint8).argmax(-1, keepdim=True)
    ref_tok = torch.where(any_w, tok.gather(2, fw), 0)
    ref_val = torch.where(any_w, prob.gather(2, fw), draft_probs[:, :, :1])
    bi = torch.arange(B, device=dev)
    draft_probs.index_put_((bi[:, None, None], torch.arange(N, device=dev)[None, :, None],
                            torch.where(w, tok, ref_tok)), torch.where(w, prob, ref_val))

    # the emitted token: inverse CDF of relu(target - draft) at the last accepted node
    q = target_probs[bi, last]                                                 # [B, V]
    p = torch.where((num == K - 1)[:, None], 0.0, draft_probs[bi, last])        # no draft row for the bonus
    res = torch.fmax(q - p, torch.zeros((), dtype=F32, device=dev))            # CUDA max(): NaN → 0
    cdf = res.cumsum(-1)
    hit = (res > 0) & (cdf > final_coin.reshape(B, 1) * cdf[:, -1:])
    sampled = torch.where(hit.any(-1), hit.to(torch.uint8).argmax(-1), V - 1)  # 0.3.21 falls back to V - 1

    nxt = path[:, 1:].clamp(max=N - 1)                                         # each node's successor on the path
    vals = torch.cat([torch.where(path[:, 1:] < N, candidates.gather(1, nxt), sampled[:, None]), sampled[:, None]], 1)
    _write_outputs(predicts, accept_index, accept_token_num, ri, path, vals)


# --------------------------------------------------------------------------- tree building


def build_tree_kernel_efficient(parent_list, selected_index, verified_seq_len, tree_mask, positions,
                                retrive_index=None, retrive_next_token=None, retrive_next_sibling=None, topk=None,
                                depth=None, draft_token_num=None, tree_mask_mode=None, *, retrieve_index=None,
                                retrieve_next_token=None, retrieve_next_sibling=None) -> None:
    """The EAGLE draft tree of each request from its top-k expansion (sgl-kernel 0.3.21):
    tree mask, positions and child lists, all written in place.

    Args:
        parent_list: ``[B, topk·(depth-1) + 1]`` int64 (``[B, 0]`` of any dtype when
            depth == 1): the ``selected_index`` value of each expanded parent.
        selected_index: ``[B, N - 1]`` int64, sorted per row: node t's index in the
            flattened top-k score list (its parent slot is ``selected_index // topk``).
        verified_seq_len: ``[B]`` int64/int32 tokens before the tree.
        tree_mask: written per ``tree_mask_mode``: FULL_MASK bool with at least
            ``N·sum(verified_seq_len) + B·N·N`` entries (prefix columns left untouched);
            QLEN_ONLY bool ``[B·N·N]``; QLEN_ONLY_BITPACKING a contiguous integer buffer of
            ``B·N`` rows of 1, 2 or 4 bytes (N ≤ 8, 16, 32): byte 0 is overwritten, the
            other bytes are OR-ed into (sglang zero-fills the buffer).
        positions: ``[B·N]`` int64, written: ``verified_seq_len + depth``.
        retrive_index, retrive_next_token, retrive_next_sibling: ``[B, N]`` int64 (also
            accepted as ``retrieve_*``); sglang fills them with -1 first: the kernel only
            writes links that exist (a largest child's sibling slot takes over a first-child
            link already present in ``retrive_next_token``).
        topk, depth, draft_token_num (N), tree_mask_mode (:class:`TreeMaskMode`): ints.

    Example::

        >>> # topk 2, depth 2: the root's children are slots 0 and 1, slot 2 // topk = 1 expands
        >>> # parent_list[1] = 0, i.e. the node of slot 0
        >>> pl = torch.tensor([[-1, 0, 1]]); sel = torch.tensor([[0, 1, 2]])
        >>> mask = torch.ones(16, dtype=torch.bool); pos = torch.empty(4, dtype=torch.long)
        >>> ri, nt, ns = torch.full((3, 1, 4), -1)
        >>> build_tree_kernel_efficient(pl, sel, torch.tensor([7]), mask, pos, ri, nt, ns, 2, 2, 4,
        ...                             TreeMaskMode.QLEN_ONLY)
        >>> pos.tolist(), nt.tolist(), ns.tolist()
        ([7, 8, 8, 9], [[1, 3, -1, -1]], [[-1, 2, -1, -1]])
    """
    ri = _pick("retrive_index", retrive_index, "retrieve_index", retrieve_index)
    nt = _pick("retrive_next_token", retrive_next_token, "retrieve_next_token", retrieve_next_token)
    ns = _pick("retrive_next_sibling", retrive_next_sibling, "retrieve_next_sibling", retrieve_next_sibling)
    topk, depth = _required("topk", topk), _required("depth", depth)
    N, mode = _required("draft_token_num", draft_token_num), _required("tree_mask_mode", tree_mask_mode)
    for name, v, lo in (("topk", topk, 1), ("depth", depth, 1), ("draft_token_num", N, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if isinstance(mode, bool) or not isinstance(mode, int) or mode not in (0, 1, 2):
        raise ValueError(f"tree_mask_mode must be 0 (FULL_MASK), 1 (QLEN_ONLY) or 2 (QLEN_ONLY_BITPACKING), got "
                         f"{mode!r}")
    mode = TreeMaskMode(mode)
    if not isinstance(parent_list, torch.Tensor):
        raise TypeError(f"parent_list must be a torch.Tensor, got {type(parent_list).__name__}")
    dev, B = parent_list.device, parent_list.shape[0] if parent_list.dim() else 0
    width = topk * (depth - 1) + 1
    if parent_list.dim() != 2 or parent_list.shape[1] not in ((width, 0) if depth == 1 else (width,)):
        raise ValueError(f"parent_list must have shape [B, topk * (depth - 1) + 1] = [B, {width}]"
                         f"{' (or [B, 0])' if depth == 1 else ''}, got {tuple(parent_list.shape)}")
    if parent_list.shape[1] and parent_list.dtype not in (I64, I32):
        raise ValueError(f"parent_list must be int64, got {str(parent_list.dtype).replace('torch.', '')}")
    check_tensor(selected_index, "selected_index", ndim=2, dtypes=(I64, I32), device=dev, shape=(B, N - 1))
    check_tensor(verified_seq_len, "verified_seq_len", ndim=1, dtypes=(I64, I32), device=dev, shape=(B,))
    for name, t in (("retrive_index", ri), ("retrive_next_token", nt), ("retrive_next_sibling", ns)):
        check_tensor(t, name, ndim=2, dtypes=(I64,), device=dev, shape=(B, N))
    check_tensor(positions, "positions", ndim=1, dtypes=(I64,), device=dev)
    if positions.numel() < B * N:
        raise ValueError(f"positions must hold B * draft_token_num = {B * N} entries, got {positions.numel()}")
    nbytes = 1 if N <= 8 else 2 if N <= 16 else 4
    if mode == TreeMaskMode.QLEN_ONLY_BITPACKING:
        if N > 32:
            raise ValueError(f"tree_mask_mode QLEN_ONLY_BITPACKING packs at most 32 nodes per row, got "
                             f"draft_token_num = {N}")
        check_tensor(tree_mask, "tree_mask", ndim=tree_mask.dim() if isinstance(tree_mask, torch.Tensor) else 1,
                     dtypes=(torch.uint8, torch.int8, torch.uint16, torch.int16, torch.uint32, torch.int32),
                     device=dev)
        need, have = B * N * nbytes, tree_mask.numel() * tree_mask.element_size()
        what = f"B * draft_token_num rows of {nbytes} byte(s) = {need} bytes"
    else:
        check_tensor(tree_mask, "tree_mask", ndim=tree_mask.dim() if isinstance(tree_mask, torch.Tensor) else 1,
                     dtypes=(torch.bool,), device=dev)
        need, have = B * N * N, tree_mask.numel()
        what = f"B * draft_token_num^2 = {need} entries" + (" plus the prefix columns" if mode == 0 else "")
    if have < need:
        raise ValueError(f"tree_mask must hold {what}, got {have}")
    if not tree_mask.is_contiguous():
        raise ValueError("tree_mask must be contiguous (sgl-kernel writes it as a flat buffer)")
    if B == 0:
        return
    L = verified_seq_len.long()
    if _backend.value_checks_enabled(L):
        if bool((L < 0).any()):
            raise ValueError(f"verified_seq_len must be >= 0, got {L.tolist()}")
        if mode == TreeMaskMode.FULL_MASK and N * int(L.sum()) + need > tree_mask.numel():
            raise ValueError(f"tree_mask holds {tree_mask.numel()} entries but FULL_MASK needs draft_token_num * "
                             f"(sum(verified_seq_len) + B * draft_token_num) = {N * int(L.sum()) + need}")

    # parent of node t = 1..N-1 (tree-local; -1: none found, the kernel's "invalid eagle tree")
    sel = selected_index.long()                                                # [B, N-1]
    slot = torch.div(sel, topk, rounding_mode="trunc")                         # C++ integer division
    if parent_list.shape[1]:
        has = (slot > 0) & (slot < parent_list.shape[1])
        want = torch.where(has, parent_list.long().gather(1, torch.where(has, slot, 0)), -1)
    else:
        has = torch.zeros_like(slot, dtype=torch.bool)
        want = torch.full_like(slot, -1)
    match = (sel[:, None, :] == want[:, :, None]) & has[..., None]            # [B, N-1 (child), N-1]
    node = match.to(torch.uint8).argmax(-1) + 1                                # first match, as a node index
    t = torch.arange(1, N, device=dev)
    parent = torch.where(slot <= 0, 0, torch.where(match.any(-1) & (node < t), node, -1))   # [B, N-1]
    par = torch.cat([parent.new_full((B, 1), -1), parent], 1)                  # [B, N], root -1

    # child lists: next_token = smallest child, next_sibling = next larger sibling; the largest
    # child's sibling slot takes a first-child link already present (the kernel's insert order)
    nodes = torch.arange(N, device=dev)
    is_child = (par[:, None, :] == nodes[None, :, None]) & (nodes > 0)         # [B, p, t]
    first = is_child.to(torch.uint8).argmax(-1)
    nt_old, ns_old = nt.clone(), ns.clone()
    nt.copy_(torch.where(is_child.any(-1), first, nt_old))
    later = (par[:, None, :] == par[:, :, None]) & (nodes[None, None, :] > nodes[None, :, None])   # [B, t, t']
    sib = later.to(torch.uint8).argmax(-1)
    inherited = nt_old.gather(1, par.clamp(min=0))
    last_sib = torch.where((par >= 0) & (inherited != -1), inherited, ns_old)
    ns.copy_(torch.where(later.any(-1) & (par >= 0), sib, last_sib))
    ri.copy_(torch.arange(B * N, device=dev).view(B, N))

    # ancestor masks and depths: fastverify's build_tree (orphans hang under the root)
    cu = torch.arange(0, B * N + 1, N, device=dev, dtype=I32)
    words, pos, _ = build_tree(torch.where(par == -1, 0, par).index_fill_(1, nodes[:1], -1).flatten(), cu, L,
                               max_nodes=N)
    positions[:B * N].copy_(pos)
    if mode == TreeMaskMode.QLEN_ONLY_BITPACKING:
        rows = tree_mask.view(-1).view(torch.uint8)[:B * N * nbytes].view(B * N, nbytes)
        packed = torch.stack([(words[:, 0] >> (8 * i)) & 0xFF for i in range(nbytes)], 1).to(torch.uint8)
        rows.copy_(torch.cat([packed[:, :1], rows[:, 1:] | packed[:, 1:]], 1))   # byte 0 assigned, others OR-ed
        return
    bits = ((words[:, nodes // 64] >> (nodes % 64)) & 1).bool().view(B, N, N)  # [B, t, c]: c is t or an ancestor
    flat = tree_mask.view(-1)
    if mode == TreeMaskMode.QLEN_ONLY:
        flat[:B * N * N].view(B, N, N).copy_(bits)
        return
    # FULL_MASK: request b's N rows of (L_b + N) start after the rows of the requests before it
    start = N * N * torch.arange(B, device=dev) + N * (L.cumsum(0) - L)        # [B]
    idx = start[:, None, None] + nodes[None, :, None] * (L + N)[:, None, None] + L[:, None, None] + nodes
    # too small a mask (only possible unchecked, on CUDA): write nothing rather than out of bounds
    fits = (L >= 0).all() & (N * L.sum() + B * N * N <= flat.numel())
    flat.index_put_((torch.where(fits, idx, 0).flatten(),), torch.where(fits, bits, flat[:1]).flatten())
