"""cpu backend of the rejection family: ``rejection_sample`` and ``tree_rejection_sample``
(csrc/cpu/rejection.cpp), entry points with the Triton launchers' signatures.

One request per OpenMP task; a request's target rows are read only when its walk reaches
them, each once from memory (chunk maxima, chunk sums of exp, argmax in one pass; top-k /
top-p thresholds first, only for rows that use them). Same Philox draws as every backend;
outputs do not depend on the number of threads.
"""

from __future__ import annotations

import torch

from .._layout import CHAIN_RULES, MAX_CHUNK, TREE_RULES, default_chunk
from . import DTYPE_CODES, function, i32, i64, ptr



def _chain_fn():
    return function("fastverify_rejection_sample", i32,
                    ptr, i32, i64, i64, i64,          # logits, dtype, row stride, R, V
                    ptr, i32, i64, ptr, i32,          # drafts, is64, N, cu, B
                    ptr, i32, i64,                    # draft_probs, dtype, row stride
                    ptr, ptr, ptr, ptr, ptr,          # temperature, top_k, top_p, seed, positions
                    i32, i32, ptr, ptr, i32,          # max_draft_len, rule, eps, delta, chunk
                    ptr, ptr, i32)                    # out, num, threads


def _tree_fn():
    return function("fastverify_tree_rejection_sample", i32,
                    ptr, i32, i64, i64, i64,          # logits, dtype, row stride, T, V
                    ptr, i32, ptr, i32, ptr, i32,     # tokens, is64, parents, is64, cu, B
                    ptr, i32, i64,                    # draft_probs, dtype, row stride
                    ptr, ptr, ptr, ptr, ptr,          # temperature, top_k, top_p, seed, positions
                    i32, i32, i32,                    # max_depth, rule, chunk
                    ptr, ptr, ptr, i32)               # accepted, out, num, threads


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A [rows, V] tensor contiguous in V (any row stride)."""
    return t if t.shape[1] <= 1 or t.stride(1) == 1 else t.contiguous()


def _ids(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t if t.dtype in (torch.int32, torch.int64) else t.long()


def _addr(t):
    return None if t is None else t.data_ptr()


def _opt(t, dtype):
    return None if t is None else t.to(dtype).contiguous()


def _chunk(chunk_size, V: int) -> int:
    chunk = chunk_size or default_chunk(V)
    if not 1 <= chunk <= MAX_CHUNK:
        raise ValueError(f"chunk_size must be in [1, {MAX_CHUNK}], got {chunk}")
    return chunk


def _common(target_logits, draft_probs, temperature, top_k, top_p, seed, positions):
    logits = _rows(target_logits)
    q = None if draft_probs is None else _rows(draft_probs)
    if q is not None and q.dtype not in DTYPE_CODES:
        q = q.float()
    params = (temperature.float().contiguous(), _opt(top_k, torch.int32), _opt(top_p, torch.float32),
              seed.long().contiguous(), positions.long().contiguous())
    return logits, q, params


def rejection_sample(target_logits, draft_tokens, cu_num_draft, draft_probs, temperature, top_k, top_p, seed,
                     positions, max_draft_len, verify="token", typical_eps=None, typical_delta=None, *,
                     chunk_size=None):
    """cpu backend of :func:`fastverify.rejection_sample` (arguments as there; unchecked —
    call through the op, which fills in typical's ε, δ). ``chunk_size``: the vocabulary
    chunk width of the draws (default: the other kernels' ``default_chunk(V)``)."""
    R, V = target_logits.shape
    B = cu_num_draft.numel() - 1
    rule = CHAIN_RULES[verify]
    logits, q, (temp, tk, tp, sd, ps) = _common(target_logits, draft_probs, temperature, top_k, top_p, seed,
                                                positions)
    drafts = _ids(draft_tokens)
    cu = cu_num_draft.to(torch.int32).contiguous()
    eps = delta = None
    if rule == CHAIN_RULES["typical"]:
        eps = torch.full((B,), 0.09) if typical_eps is None else typical_eps.float().contiguous()
        delta = torch.full((B,), 0.3) if typical_delta is None else typical_delta.float().contiguous()
    out = torch.empty((B, max_draft_len + 1), dtype=torch.int32)
    num = torch.empty(B, dtype=torch.int32)
    if B == 0:
        return out, num
    rc = _chain_fn()(logits.data_ptr(), DTYPE_CODES[logits.dtype], logits.stride(0), R, V,
                     drafts.data_ptr(), int(drafts.dtype == torch.int64), drafts.numel(), cu.data_ptr(), B,
                     _addr(q), DTYPE_CODES[q.dtype] if q is not None else 0, q.stride(0) if q is not None else 0,
                     temp.data_ptr(), _addr(tk), _addr(tp), sd.data_ptr(), ps.data_ptr(),
                     max_draft_len, rule, _addr(eps), _addr(delta), _chunk(chunk_size, V),
                     out.data_ptr(), num.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"fastverify_rejection_sample failed ({rc})")
    return out, num


def tree_rejection_sample(target_logits, tree_tokens, parents, cu_num_nodes, draft_probs, temperature, top_k, top_p,
                          seed, positions, max_depth, verify="specinfer", *, chunk_size=None):
    """cpu backend of :func:`fastverify.tree_rejection_sample` (unchecked)."""
    T, V = target_logits.shape
    B = cu_num_nodes.numel() - 1
    rule = TREE_RULES[verify]
    if rule != TREE_RULES["specinfer"] and draft_probs is None:
        raise ValueError(f"verify={verify!r} needs draft_probs")
    logits, q, (temp, tk, tp, sd, ps) = _common(target_logits, draft_probs, temperature, top_k, top_p, seed,
                                                positions)
    tok, par = _ids(tree_tokens), _ids(parents)
    cu = cu_num_nodes.to(torch.int32).contiguous()
    D = max_depth + 1
    acc = torch.empty((B, D), dtype=torch.int32)
    out = torch.empty((B, D), dtype=torch.int32)
    num = torch.empty(B, dtype=torch.int32)
    if B == 0:
        return acc, out, num
    rc = _tree_fn()(logits.data_ptr(), DTYPE_CODES[logits.dtype], logits.stride(0), T, V,
                    tok.data_ptr(), int(tok.dtype == torch.int64), par.data_ptr(), int(par.dtype == torch.int64),
                    cu.data_ptr(), B,
                    _addr(q), DTYPE_CODES[q.dtype] if q is not None else 0, q.stride(0) if q is not None else 0,
                    temp.data_ptr(), _addr(tk), _addr(tp), sd.data_ptr(), ps.data_ptr(),
                    max_depth, rule, _chunk(chunk_size, V), acc.data_ptr(), out.data_ptr(), num.data_ptr(),
                    torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"fastverify_tree_rejection_sample failed ({rc})")
    return acc, out, num
