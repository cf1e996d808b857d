"""Argument checks shared by the ops: each error names the argument at fault.

Metadata checks (shape, dtype, device) are free and always run. Value checks read
tensor data; the ops run them when :func:`fastverify._backend.value_checks_enabled`
says so (always on CPU, on CUDA only with ``FASTVERIFY_CHECKS=1``).
"""

from __future__ import annotations

import torch

from .. import cpu

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ID_DTYPES = (torch.int32, torch.int64)


def _dtype_names(dtypes) -> str:
    return "/".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(t, name: str, *, ndim: int, dtypes, device: torch.device, shape=None) -> None:
    """``t`` is a tensor with ``ndim`` dims, one of ``dtypes``, on ``device``, and of
    ``shape`` where given (``None`` entries are free)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must be {_dtype_names(dtypes)}, got {str(t.dtype).replace('torch.', '')}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the op's other tensors are on {device}")
    if shape is not None:
        for dim, (got, want) in enumerate(zip(t.shape, shape)):
            if want is not None and got != want:
                raise ValueError(f"{name} must have shape {_shape_str(shape)}, got {tuple(t.shape)} (dimension {dim})")


_last_passed: dict[str, tuple] = {}


def passed_before(op: str, tensors: tuple, meta: tuple) -> bool:
    """Whether ``op``'s value checks last passed for these very tensor objects, unmodified
    since (same version counters), and the same metadata. A model calls tree_attention
    once per layer with one step's block table, lengths and mask: it pays for the value
    checks once per step instead of once per layer."""
    last = _last_passed.get(op)
    if last is None or last[1] != meta or len(last[0]) != len(tensors):
        return False
    try:
        return all(a is b and v == b._version for (a, v), b in zip(last[0], tensors))
    except RuntimeError:  # inference tensors have no version counter
        return False


def remember_passed(op: str, tensors: tuple, meta: tuple) -> None:
    try:
        _last_passed[op] = (tuple((t, t._version) for t in tensors), meta)
    except RuntimeError:
        _last_passed.pop(op, None)


def _shape_str(shape) -> str:
    return "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"


def check_logits(t, name: str, device: torch.device, rows=None, vocab=None) -> None:
    check_tensor(t, name, ndim=2, dtypes=LOGIT_DTYPES, device=device, shape=(rows, vocab))
    if t.shape[1] > 0 and t.stride(1) != 1:
        raise ValueError(f"{name} must be contiguous in the vocabulary dimension (stride(1) == 1), got strides {t.stride()}")
    if t.shape[1] >= 2**31:
        raise ValueError(f"{name} has a vocabulary of {t.shape[1]}, more than fits in int32")


def check_cu(cu: torch.Tensor, name: str, total: int, total_name: str, *, min_step: int) -> None:
    """Value check of an exclusive prefix sum: cu[0] == 0, steps >= min_step, cu[-1] == total."""
    c = cu.tolist()
    if c[0] != 0:
        raise ValueError(f"{name} must start at 0, got {c[0]}")
    steps = [b - a for a, b in zip(c, c[1:])]
    bad = [i for i, s in enumerate(steps) if s < min_step]
    if bad:
        what = "non-decreasing" if min_step == 0 else "strictly increasing (every request owns at least one node)"
        raise ValueError(f"{name} must be {what}; entry {bad[0]} -> {bad[0] + 1} steps by {steps[bad[0]]}")
    if c[-1] != total:
        raise ValueError(f"{name}[-1] = {c[-1]} must equal {total_name} = {total}")


def check_sampling_params(temperature, top_k, top_p, seed, positions, B: int, device, values: bool) -> None:
    check_tensor(temperature, "temperature", ndim=1, dtypes=(torch.float32,), device=device, shape=(B,))
    if top_k is not None:
        check_tensor(top_k, "top_k", ndim=1, dtypes=(torch.int32,), device=device, shape=(B,))
    if top_p is not None:
        check_tensor(top_p, "top_p", ndim=1, dtypes=(torch.float32,), device=device, shape=(B,))
    check_tensor(seed, "seed", ndim=1, dtypes=(torch.int64,), device=device, shape=(B,))
    check_tensor(positions, "positions", ndim=1, dtypes=(torch.int64,), device=device, shape=(B,))
    if not values:
        return
    if not bool(torch.isfinite(temperature).all()) or bool((temperature < 0).any()):
        raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {temperature.tolist()}")
    if top_k is not None and bool((top_k < 0).any()):
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k.tolist()}")
    if top_p is not None and not bool(((top_p > 0) & (top_p <= 1)).all()):
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p.tolist()}")
    if bool((positions < 0).any()):
        raise ValueError(f"positions must be >= 0, got {positions.tolist()}")


def check_probs(p: torch.Tensor, name: str) -> None:
    """Value check of a distribution per row: finite, >= 0, each row summing to at most
    1 + tolerance (rounding of the stored dtype: 1e-3 in fp32, 1e-2 in fp16/bf16). Rows
    may sum to less than 1 (a drafter over a subset)."""
    if p.numel() == 0:
        return
    tol = 1e-3 if p.dtype == torch.float32 else 1e-2
    if (p.device.type == "cpu" and p.dim() == 2 and p.stride(1) == 1 and p.dtype in cpu.DTYPE_CODES
            and cpu.available()):
        first_bad, sums = cpu.probs_rows(p)   # one pass: five torch passes cost more than the op
        bad_rows = (first_bad >= 0).nonzero()
        if bad_rows.numel():
            i = int(bad_rows[0, 0])
            j = int(first_bad[i])
            raise ValueError(f"{name}[{i}, {j}] = {float(p[i, j])}: probabilities must be finite and >= 0")
    else:
        bad = ~torch.isfinite(p) | (p < 0)
        if bool(bad.any()):
            i, j = (int(x) for x in bad.nonzero()[0])
            raise ValueError(f"{name}[{i}, {j}] = {float(p[i, j])}: probabilities must be finite and >= 0")
        sums = p.sum(1, dtype=torch.float64)
    over = sums > 1 + tol
    if bool(over.any()):
        i = int(over.nonzero()[0, 0])
        raise ValueError(f"{name}[{i}] sums to {float(sums[i]):.6g} > 1 + {tol:g}: each row must be a probability "
                         "distribution (the one its draft was drawn from)")


def check_ids_in_vocab(ids: torch.Tensor, name: str, vocab: int) -> None:
    bad = (ids < 0) | (ids >= vocab)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name}[{i}] = {int(ids[i])} is outside the vocabulary [0, {vocab})")


def check_tree(parents: torch.Tensor, cu_num_nodes: torch.Tensor, *, tokens: torch.Tensor | None = None,
               max_depth: int | None = None, max_nodes: int | None = None, duplicate_leaves: bool = False,
               equal_depth_leaves: bool = False) -> None:
    """Each request's parents form a tree rooted at its node 0 (parent -1) whose every
    parent precedes its child; where given: siblings carry distinct tokens (with
    ``duplicate_leaves``, leaves may repeat a sibling leaf's token: a draft path drawn
    twice), depth <= max_depth, nodes per tree <= max_nodes, every leaf at one depth
    (``equal_depth_leaves``: n paths of depth d)."""
    par, cu = parents.tolist(), cu_num_nodes.tolist()
    tok = tokens.tolist() if tokens is not None else None
    for b in range(len(cu) - 1):
        _check_one_tree(b, par, tok, cu[b], cu[b + 1], max_depth, max_nodes, duplicate_leaves, equal_depth_leaves)


def _check_one_tree(b, par, tok, n0, n1, max_depth, max_nodes, duplicate_leaves, equal_depth_leaves) -> None:
    """check_tree for request b, nodes n0 .. n1 - 1."""
    if max_nodes is not None and n1 - n0 > max_nodes:
        raise ValueError(f"request {b} has {n1 - n0} nodes (cu_num_nodes) but max_nodes is {max_nodes}")
    if par[n0] != -1:
        raise ValueError(f"parents[{n0}] = {par[n0]}: node 0 of request {b} is its root and must have parent -1")
    depth = [0] * (n1 - n0)
    first_with: dict[tuple[int, int], int] = {}
    repeats = []
    for j in range(1, n1 - n0):
        p = par[n0 + j]
        if not 0 <= p < j:
            raise ValueError(
                f"parents[{n0 + j}] = {p}: node {j} of request {b} needs a parent in [0, {j}) "
                "(tree-local index of an earlier node); parents do not form a tree")
        if tok is not None:
            if (p, tok[n0 + j]) in first_with:
                repeats.append((j, first_with[(p, tok[n0 + j])]))
            first_with.setdefault((p, tok[n0 + j]), j)
        depth[j] = depth[p] + 1
        if max_depth is not None and depth[j] > max_depth:
            raise ValueError(f"node {j} of request {b} is at depth {depth[j]} > max_depth = {max_depth}")
    has_child = set(par[n0 + 1:n1])
    for j, first in repeats:
        if not (duplicate_leaves and j not in has_child and first not in has_child):
            raise ValueError(
                f"tree_tokens[{n0 + j}] = {tok[n0 + j]} repeats a sibling's token under node {par[n0 + j]} of "
                f"request {b}; children of a node must carry distinct tokens"
                + (" (only leaves may repeat: a path drawn twice)" if duplicate_leaves else ""))
    if equal_depth_leaves:
        leaf_depths = {depth[j] for j in range(n1 - n0) if j not in has_child}
        if len(leaf_depths) > 1:
            raise ValueError(f"the leaves of request {b} are at depths {sorted(leaf_depths)}: multi-path block "
                             "verification takes n draft paths of one depth (every leaf at the same depth)")
