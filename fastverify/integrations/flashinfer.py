"""FlashInfer entry point: ``flashinfer.sampling.chain_speculative_sampling`` of FlashInfer 0.7.x.

A drop-in stand-in for ``flashinfer.sampling.chain_speculative_sampling`` (Python wrapper
``flashinfer/sampling.py`` and CUDA kernel ``ChainSpeculativeSampling`` of
``include/flashinfer/sampling.cuh``, flashinfer-python 0.7.2.post1): same argument order and
defaults, same outputs, same in-place accumulation, built on :func:`fastverify.rejection_sample`
(so the torch, Triton and CUDA backends all serve it) and importing no FlashInfer::

    from fastverify.integrations.flashinfer import chain_speculative_sampling

Layouts (B requests, K = ``num_speculate_tokens`` drafts each, V vocabulary):

- ``draft_probs [B, K, V]``: the distribution draft j was drawn from (fp32/fp16/bf16/fp64).
- ``draft_token_ids [B, K]``: int32/int64 drafts.
- ``target_probs [B, K + 1, V]``: the target's distribution at each draft position, plus
  the bonus position. Probabilities, not logits.
- returns ``output_token_ids [B, K + 1]`` int32 (accepted drafts, the recovered or bonus
  token, then -1), ``output_accepted_token_num [B]`` and ``output_emitted_draft_token_num
  [B]`` (int32, or the ``maybe_`` tensors after the in-place add).

Semantics mapped (per request b, u_j the acceptance uniform of position j):

- draft j is accepted iff ``u_j · draft_probs[b, j, x_j] < target_probs[b, j, x_j]``; the
  chain stops at the first rejection n and emits a token drawn from
  ``relu(target_probs[b, n] - draft_probs[b, n])`` (from ``target_probs[b, K]``, the bonus
  row, when all K are accepted). Lossless: the emitted tokens follow the target.
- ``output_emitted_draft_token_num`` = n, the leading run of accepted drafts.
- ``output_accepted_token_num`` = the number of positions whose OWN test passes,
  counted independently of the stop (FlashInfer's alignment metric: the leading run
  plus the accepted positions after the first rejection). Always >= the emitted count.
- ``maybe_output_*`` given: the counts are ADDED to them in place and those tensors are
  returned (FlashInfer accumulates across calls this way).

How it maps onto :func:`fastverify.rejection_sample`:

- ``target_probs`` become the op's logits as ``log(p)`` (0 → -inf) at temperature 1, so
  the op's softmax gives ``p`` back: one extra elementwise pass over ``[B, K + 1, V]``
  (two for non-fp32 input, which is first widened: a bf16 log loses the probabilities'
  precision). A row is renormalised by that softmax; for rows summing to 1 this is
  FlashInfer's ``p`` up to fp32 rounding. ``draft_probs`` are passed as they are (a view).
- Randomness: FlashInfer runs Philox with key ``seed`` and the row index as subsequence.
  Here request b draws from the op's Philox stream keyed by
  ``seed_b = seed ^ (mix(b) << 32)`` (mix: an odd-constant multiply modulo 2^31, a
  bijection, so the rows' keys differ and row 0 keeps ``seed``) at positions
  ``offset + j``. Rows are independent, and a call is reproducible for the same
  ``(seed, offset)``; like FlashInfer's, moving a request to another row changes its
  stream. Calls must use offsets at least K + 1 apart to draw fresh numbers (the generator
  path advances by ``B·(K + 1)`` rounded up to 4, as FlashInfer does).
- The independent acceptance count needs every position's test, but the op stops at the
  first rejection. The leading run comes from the op; positions after it are tested
  here with the SAME uniforms (:func:`fastverify.ops.philox.uniform`, lane 0 at
  ``(seed_b, offset + j)``) against the raw probabilities, as FlashInfer's kernel tests them.
  This is ~300 small elementwise torch ops over ``[B, K]`` (Philox in int64 arithmetic):
  negligible data, but launch-bound on a GPU outside CUDA graphs / ``torch.compile``.

Divergences from FlashInfer 0.7.2.post1, on purpose:

- Draft ids outside ``[0, V)`` (FlashInfer's ``-1`` padding for shorter chains): FlashInfer
  reads ``draft_probs`` / ``target_probs`` at that id, out of bounds. Here such a draft is
  never used as an address: it counts as rejected (in neither count), the chain stops
  there and the token at that slot is drawn from ``target_probs[b, j]`` alone (no draft was
  proposed there, so the residual is the target itself). A request padded with -1 after
  its k drafts thus behaves exactly like a k-draft request: lossless. Because the op
  refuses such ids, every call carries B extra zero-draft requests (one target row each,
  the row at the first invalid slot, drawn with the op's lane-1 uniform at that position);
  their token replaces the op's where a chain reaches an invalid slot. Cost: B more rows
  of the op's work (1/(K + 1) of it) and a ``[B, V]`` gather.
- ``maybe_output_*`` tensors of dtype int64 are accumulated (FlashInfer casts them with
  ``.int()`` and adds into that copy, so an int64 tensor comes back unchanged).
- Degenerate rows (``relu(p - q)`` all zero at the rejected position) draw from ``p``
  without the rejected draft instead of FlashInfer's last-valid-index fallback.
- ``deterministic`` is accepted and ignored: every backend is deterministic.
- Bad input raises ``ValueError`` / ``TypeError`` naming FlashInfer's argument (FlashInfer
  mostly fails inside the kernel launch or reads out of bounds).

As FlashInfer: ``seed`` and ``offset`` are both Python ints or both 1-D int64/uint64
tensors of length 1 or B on the inputs' device (a tensor is needed for CUDA-graph
capture); if either is None, both are drawn from ``generator`` (or the device's default
generator), which is advanced. With tensors given nothing reads data back to the host
(no ``.item()``, ``.tolist()``, ``nonzero``, boolean indexing), so the call is CUDA-graph
capturable; the generator path reads the generator's state on the host, as FlashInfer does.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .. import rejection_sample
from ..ops import philox

__all__ = ["chain_speculative_sampling"]

_PROB_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_COUNT_DTYPES = (torch.int32, torch.int64)
_SEED_DTYPES = (torch.int64, torch.uint64)
# mix(b) = b · _ROW_MIX mod 2^31: odd, so a bijection on [0, 2^31); the product of b < 2^31
# and a 32-bit constant stays below 2^63, so int64 never overflows
_ROW_MIX = 0x9E3779B1
_MASK31 = 0x7FFFFFFF
# offsets are masked to 62 bits so that offset + K stays a valid int64 position
_POS_MASK = (1 << 62) - 1


def chain_speculative_sampling(
    draft_probs: torch.Tensor,
    draft_token_ids: torch.Tensor,
    target_probs: torch.Tensor,
    maybe_output_accepted_token_num: Optional[torch.Tensor] = None,
    maybe_output_emitted_draft_token_num: Optional[torch.Tensor] = None,
    deterministic: bool = True,
    generator: Optional[torch.Generator] = None,
    seed: Optional[Union[int, torch.Tensor]] = None,
    offset: Optional[Union[int, torch.Tensor]] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chain speculative sampling with FlashInfer 0.7's arguments and results.

    Args:
        draft_probs: ``[B, K, V]`` the draft model's distribution at each draft position.
        draft_token_ids: ``[B, K]`` int32/int64 drafts; ids outside ``[0, V)`` (-1 padding)
            end the chain there (module docstring).
        target_probs: ``[B, K + 1, V]`` the target model's distributions (probabilities).
        maybe_output_accepted_token_num: ``[B]`` int32/int64 or None; the independent
            acceptance count is added to it in place.
        maybe_output_emitted_draft_token_num: ``[B]`` int32/int64 or None; the emitted
            draft count is added to it in place.
        deterministic: accepted for compatibility (results are deterministic anyway).
        generator: draws ``seed``/``offset`` when either is None (advanced, as FlashInfer).
        seed, offset: both Python ints, or both ``[1]``/``[B]`` int64/uint64 tensors.

    Returns:
        ``(output_token_ids [B, K + 1] int32 -1 padded, output_accepted_token_num [B],
        output_emitted_draft_token_num [B])``.

    Example::

        >>> draft_probs = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.2, 0.3, 0.4, 0.1]]])
        >>> draft_token_ids = torch.tensor([[2, 1]], dtype=torch.int32)
        >>> target_probs = torch.tensor([[[0.0, 0.1, 0.6, 0.3], [1.0, 0.0, 0.0, 0.0],
        ...                               [0.7, 0.1, 0.1, 0.1]]])
        >>> out, accepted, emitted = chain_speculative_sampling(draft_probs, draft_token_ids,
        ...                                                     target_probs, seed=0, offset=0)
        >>> out          # draft 2 accepted (0.3 < 0.6 always), draft 1 rejected (p = 0), then 0
        tensor([[ 2,  0, -1]], dtype=torch.int32)
        >>> accepted, emitted
        (tensor([1], dtype=torch.int32), tensor([1], dtype=torch.int32))
    """
    B, K, V = _check(draft_probs, draft_token_ids, target_probs, maybe_output_accepted_token_num,
                     maybe_output_emitted_draft_token_num, deterministic, generator)
    dev = draft_probs.device
    if seed is None or offset is None:
        # as FlashInfer: one missing value means both come from the generator
        seed, offset = _seed_offset_from_generator(generator, B * (K + 1), dev)
    key, pos = _row_streams(seed, offset, B, dev)                          # [B], [B] int64

    x = draft_token_ids if draft_token_ids.dtype in _COUNT_DTYPES else draft_token_ids.long()
    valid = (x >= 0) & (x < V)                                             # [B, K]
    xs = torch.where(valid, x, 0)                                          # never an address
    first_bad = valid.int().cumprod(1).sum(1)                              # [B] first invalid slot, K if none
    q = draft_probs if draft_probs.dtype != torch.float64 else draft_probs.float()

    # the op's logits: log p for B·(K+1) rows, then B tail rows (the row at each first
    # invalid slot) for the zero-draft requests that draw the token there
    R = B * (K + 1)
    tail = K > 0
    logits = torch.empty(R + (B if tail else 0), V, dtype=torch.float32, device=dev)
    p = target_probs if target_probs.dtype == torch.float32 else target_probs.float()
    torch.log(p.reshape(R, V), out=logits[:R])
    rows = torch.arange(B, device=dev)
    if tail:
        torch.index_select(logits[:R], 0, rows * (K + 1) + first_bad, out=logits[R:])

    nb = 2 * B if tail else B
    cu = (torch.arange(nb + 1, device=dev).clamp(max=B) * K).to(torch.int32)  # [nb + 1]
    out, n_op = rejection_sample(
        logits, xs.reshape(B * K), cu, draft_probs=q.reshape(B * K, V), temperature=1.0,
        seed=torch.cat([key, key]) if tail else key,
        positions=torch.cat([pos, pos + first_bad]) if tail else pos,
        max_draft_len=K)
    out_main, n_op = out[:B], n_op[:B].long()                              # [B, K+1], [B]

    # a chain that reaches its first invalid slot stops there with the tail token
    hit = (first_bad < K) & (n_op >= first_bad)                            # [B]
    n = torch.where(hit, first_bad, n_op)                                  # [B] emitted drafts
    token = out_main.gather(1, n[:, None])[:, 0]
    if tail:
        token = torch.where(hit, out[B:, 0], token)
    cols = torch.arange(K + 1, device=dev)
    output_token_ids = torch.where(cols < n[:, None], out_main, -1)
    output_token_ids = torch.where(cols == n[:, None], token[:, None], output_token_ids).to(torch.int32)

    # independent count: the op's leading run, plus the positions after the stop that
    # pass their own test with the op's uniforms
    acc = _accepts(q, xs, valid, target_probs, key, pos)                   # [B, K]
    after = cols[:K] > n[:, None]
    accepted = (n + (acc & after).sum(1)).to(torch.int32)
    emitted = n.to(torch.int32)

    if maybe_output_accepted_token_num is not None:
        accepted = maybe_output_accepted_token_num.add_(accepted)
    if maybe_output_emitted_draft_token_num is not None:
        emitted = maybe_output_emitted_draft_token_num.add_(emitted)
    return output_token_ids, accepted, emitted


# --------------------------------------------------------------------------- randomness


def _row_streams(seed, offset, B: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(key [B], first position [B]) of each row's Philox stream in the op:
    ``key_b = seed_b ^ (mix(b) << 32)``, ``position_b = offset_b`` (module docstring)."""
    if isinstance(seed, torch.Tensor) != isinstance(offset, torch.Tensor):
        raise ValueError("seed and offset must both be tensors or both be Python ints")
    rows = torch.arange(B, dtype=torch.int64, device=dev)
    mix = ((rows * _ROW_MIX) & _MASK31) << 32                              # [B]
    if isinstance(seed, torch.Tensor):
        s = _seed_tensor(seed, "seed", B, dev)
        o = _seed_tensor(offset, "offset", B, dev)
        return s ^ mix, o & _POS_MASK
    for v, name in ((seed, "seed"), (offset, "offset")):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be a Python int or a torch.Tensor, got {type(v).__name__}")
    s = seed & 0xFFFFFFFFFFFFFFFF                                          # uint64 bits as int64
    s = s - (1 << 64) if s >= 1 << 63 else s
    return mix ^ s, torch.full((B,), offset & _POS_MASK, dtype=torch.int64, device=dev)


def _seed_tensor(t: torch.Tensor, name: str, B: int, dev: torch.device) -> torch.Tensor:
    """A ``[1]`` or ``[B]`` int64/uint64 tensor as ``[B]`` int64 (same bits; no copy)."""
    if t.device != dev:
        raise ValueError(f"{name} tensor must be on {dev} (the device of draft_probs), got {t.device}")
    if t.dtype not in _SEED_DTYPES:
        raise ValueError(f"{name} tensor must be int64/uint64, got {str(t.dtype).replace('torch.', '')}")
    if t.dim() != 1:
        raise ValueError(f"{name} tensor must be 1D, got shape {tuple(t.shape)}")
    if t.shape[0] not in (1, B):
        raise ValueError(f"{name} tensor length must be 1 or {B} (the batch size), got {t.shape[0]}")
    t = t.view(torch.int64) if t.dtype != torch.int64 else t
    return t.expand(B)


def _seed_offset_from_generator(generator: Optional[torch.Generator], increment: int,
                                dev: torch.device) -> tuple[int, int]:
    """(seed, offset) for a call consuming ``increment`` draws, advancing the generator.

    A CUDA (Philox) generator's state is ``(seed, offset)``: as FlashInfer, the offset is
    advanced by ``increment`` rounded up to 4 and the advanced pair is used. A CPU
    (Mersenne Twister) generator has no such state; two 62-bit ints are drawn from it."""
    g = generator
    if g is None:
        if dev.type == "cuda":
            g = torch.cuda.default_generators[dev.index if dev.index is not None else torch.cuda.current_device()]
        else:
            g = torch.default_generator
    if g.device.type == "cuda":
        state = g.get_state()                                             # host bytes, no device sync
        s, o = state.view(torch.int64).tolist()
        o += (increment + 3) // 4 * 4
        g.set_state(torch.tensor([s, o], dtype=torch.int64).view(torch.uint8))
        return s, o
    s, o = torch.randint(0, 1 << 62, (2,), generator=g, device=g.device).tolist()
    return s, o


def _accepts(q: torch.Tensor, xs: torch.Tensor, valid: torch.Tensor, target_probs: torch.Tensor,
             key: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """[B, K] bool: each position's own acceptance test, ``u_j · q_j(x_j) < p_j(x_j)``, with
    the op's uniform u_j (lane 0 at ``(key_b, pos_b + j)``); invalid drafts fail it."""
    B, K = xs.shape
    j = torch.arange(K, device=xs.device)
    u = philox.uniform(key[:, None], pos[:, None] + j, philox.ACCEPT_LANE)            # [B, K]
    idx = xs.long()[:, :, None]
    px = target_probs[:, :K].gather(2, idx)[:, :, 0].float()                          # [B, K]
    qx = q.gather(2, idx)[:, :, 0].float()                                            # [B, K]
    return valid & (u * qx < px)


# --------------------------------------------------------------------------- checks


def _check(draft_probs, draft_token_ids, target_probs, acc_out, emit_out, deterministic, generator):
    """Metadata checks (free: no tensor data is read); returns (B, K, V)."""
    for t, name in ((draft_probs, "draft_probs"), (draft_token_ids, "draft_token_ids"),
                    (target_probs, "target_probs")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if draft_probs.dim() != 3:
        raise ValueError(f"draft_probs must be [batch_size, num_speculate_tokens, vocab_size], "
                         f"got shape {tuple(draft_probs.shape)}")
    B, K, V = draft_probs.shape
    dev = draft_probs.device
    if V < 1:
        raise ValueError("draft_probs must have a vocabulary of at least 1 token")
    for t, name in ((draft_probs, "draft_probs"), (target_probs, "target_probs")):
        if t.dtype not in _PROB_DTYPES:
            raise ValueError(f"{name} must be float32/float16/bfloat16/float64 probabilities, "
                             f"got {str(t.dtype).replace('torch.', '')}")
    if draft_token_ids.dim() != 2 or tuple(draft_token_ids.shape) != (B, K):
        raise ValueError(f"draft_token_ids must be [batch_size, num_speculate_tokens] = [{B}, {K}] "
                         f"(as draft_probs), got shape {tuple(draft_token_ids.shape)}")
    if draft_token_ids.dtype.is_floating_point or draft_token_ids.dtype.is_complex or \
            draft_token_ids.dtype == torch.bool:
        raise ValueError(f"draft_token_ids must be an integer tensor (int32/int64), "
                         f"got {str(draft_token_ids.dtype).replace('torch.', '')}")
    if target_probs.dim() != 3 or tuple(target_probs.shape) != (B, K + 1, V):
        raise ValueError(f"target_probs must be [batch_size, num_speculate_tokens + 1, vocab_size] = "
                         f"[{B}, {K + 1}, {V}] (one more position than draft_probs), "
                         f"got shape {tuple(target_probs.shape)}")
    for t, name in ((draft_token_ids, "draft_token_ids"), (target_probs, "target_probs")):
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device} but draft_probs is on {dev}")
    for t, name in ((acc_out, "maybe_output_accepted_token_num"),
                    (emit_out, "maybe_output_emitted_draft_token_num")):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.dim() != 1 or t.shape[0] != B:
            raise ValueError(f"{name} must be [batch_size] = [{B}], got shape {tuple(t.shape)}")
        if t.dtype not in _COUNT_DTYPES:
            raise ValueError(f"{name} must be int32/int64, got {str(t.dtype).replace('torch.', '')}")
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device} but draft_probs is on {dev}")
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return B, K, V
