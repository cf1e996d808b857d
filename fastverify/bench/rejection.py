"""Benchmark of the rejection-sampling ops: ``rejection_sample`` (chains) and
``tree_rejection_sample``.

Inputs: logits ``randn × 2`` whose row argmax is raised to hold a probability drawn from
U(0.5, 0.95) (the peaked rows of a real LM; plain ``randn × 2`` puts ~1% on the top token
at V = 32000 and nothing would be accepted); temperature 1 (random) for every request.
Chain drafts are their row's argmax with probability 0.9, else a uniform token. Trees: per
request ``n = 1 + 2K`` nodes, a main path of depth K (tokens chosen like chain drafts)
plus one sibling with another token at each level.

Baselines, measured in the same run:

* ``eager`` — the pipeline engines write without a fused kernel (vLLM v1 style), chain:
  softmax into an fp32 probs tensor ``[N + B, V]``; p(x) gathered; ``u = torch.rand``;
  accept iff ``u < p(x)/q(x)`` (q ≡ 1 without draft probs); first rejection by a cumprod
  over the padded ``[B, K + 1]`` accept matrix; the residual ``max(p − q, 0)`` of every
  draft row, renormalised, and ``torch.multinomial`` for the recovered token of every
  draft row and for the bonus rows. Index tensors that depend only on the batch layout
  are built once outside the timing, as engines build them on the host. Tree: softmax
  probs of all rows, then every request walks its tree with one ``torch.multinomial`` per
  visited node, vectorised over the requests and unrolled over depth.
* ``compiled`` — ``torch.compile`` (default mode) of the same function.

Bytes (the bound): every target logits row read once, ``rows · V · bytes_per_logit``.

The verification rules (``verify=``) are timed on the same shapes with draft
probabilities (fp32 softmax of the logits plus noise; drafts drawn from them):
``rejection_sample`` with ``verify="block"`` and ``"typical"`` beside the token rule on
the same inputs (baseline ``token``), and ``tree_rejection_sample`` with ``"block_wor"``
over n = 3 disjoint paths of depth K beside ``specinfer`` (recursive rejection) on the same
tree (baseline ``specinfer``). Their bound adds every draft-probs row read once.
"""

from __future__ import annotations

from typing import Callable

import torch

import fastverify

from .core import DTYPES, Case, Impl, generator, kernel_impls

FAMILY = "rejection"
TARGETS = {"pct_of_bound": 70.0, "speedup": {"eager": 5.0}}
# on CPU (issue 18): the cpu backend near the copy bandwidth, far ahead of the eager pipeline
CPU_TARGETS = {"rejection_sample": {"pct_of_copy": 50.0, "speedup": {"eager": 20.0}},
               "tree_rejection_sample": {"pct_of_copy": 50.0}}
SHAPES = {
    "smoke": [(2, 2, 1000, "fp32")],
    "goal": [(64, 4, 128256, "bf16"), (1, 4, 128256, "bf16")],
    "grid": [(B, K, V, dt) for dt in ("bf16", "fp32") for V in (32000, 128256, 151936) for K in (1, 4, 8)
             for B in (1, 8, 64)],
    "cpu": [(B, K, V, "fp32") for V in (32000, 128256) for K in (1, 4) for B in (1, 8)],
}
GOAL = (64, 4, 128256, "bf16")
DRAFT_MATCH = 0.9
PEAK_RANGE = (0.5, 0.95)


# =========================================================================== inputs


def peaked_logits(R: int, V: int, gen: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits [R, V] whose argmax holds a probability in PEAK_RANGE; (logits, argmax [R])."""
    logits = torch.randn(R, V, generator=gen, device=device) * 2
    top = logits.argmax(1)
    rest = logits.scatter(1, top[:, None], float("-inf")).logsumexp(1)        # log Σ_{v≠top} e^l
    peak = torch.empty(R, device=device).uniform_(*PEAK_RANGE, generator=gen)
    logits.scatter_(1, top[:, None], (rest + torch.log(peak / (1 - peak)))[:, None])
    return logits, top


def chain_inputs(B: int, K: int, V: int, dtype: str, device, seed: int = 0) -> dict:
    """The op's arguments (``op``) and the eager baseline's (``eager``) for B requests of
    K drafts: logits [B·(K+1), V], request b owning rows b·(K+1) … b·(K+1)+K."""
    gen = generator(device, seed)
    logits, top = peaked_logits(B * (K + 1), V, gen, device)
    b = torch.arange(B, device=device)
    draft_rows = (b[:, None] * (K + 1) + torch.arange(K, device=device)).reshape(-1)       # [N]
    keep = torch.rand(B * K, generator=gen, device=device) < DRAFT_MATCH
    drafts = torch.where(keep, top[draft_rows], torch.randint(0, V, (B * K,), generator=gen, device=device))
    target = logits.to(DTYPES[dtype])
    cu = (torch.arange(B + 1, device=device) * K).to(torch.int32)
    temperature = torch.ones(B, device=device)
    op = dict(args=(target, drafts, cu), kwargs=dict(temperature=temperature, seed=b + 1000 * seed,
                                                     positions=torch.randint(0, 4096, (B,), generator=gen,
                                                                             device=device), max_draft_len=K))
    eager = dict(logits=target, draft_tokens=drafts, temperature=temperature, draft_rows=draft_rows,
                 bonus_rows=b * (K + 1) + K, row_req=b.repeat_interleave(K + 1), draft_req=b.repeat_interleave(K),
                 draft_col=torch.arange(K, device=device).repeat(B), first_draft=cu[:-1].long(), K=K)
    return dict(op=op, eager=eager)


def tree_inputs(B: int, K: int, V: int, dtype: str, device, seed: int = 0) -> dict:
    """B trees of n = 1 + 2K nodes: node 0 the root, nodes 1..K the main path, node K+d
    the sibling at depth d; logits [B·n, V]."""
    gen = generator(device, seed)
    n = 1 + 2 * K
    logits, top = peaked_logits(B * n, V, gen, device)
    parents = [-1] + list(range(K)) + list(range(K))
    children = [[-1, -1] for _ in range(n)]
    for d in range(1, K + 1):
        children[d - 1] = [d, K + d]
    start = torch.arange(B, device=device) * n                                                  # [B]
    keep = torch.rand(B, K, generator=gen, device=device) < DRAFT_MATCH
    main = torch.where(keep, top[start[:, None] + torch.arange(K, device=device)],
                       torch.randint(0, V, (B, K), generator=gen, device=device))
    sib = (main + 1 + torch.randint(0, V - 1, (B, K), generator=gen, device=device)) % V        # != main
    tokens = torch.cat([torch.randint(0, V, (B, 1), generator=gen, device=device), main, sib], 1).reshape(-1)
    row_req = torch.arange(B, device=device).repeat_interleave(n)
    child_idx = torch.tensor(children, device=device).repeat(B, 1)                              # [T, 2]
    child_tok = torch.where(child_idx >= 0, tokens[start[row_req][:, None] + child_idx.clamp(min=0)], -1)
    target = logits.to(DTYPES[dtype])
    temperature = torch.ones(B, device=device)
    op = dict(args=(target, tokens, torch.tensor(parents, dtype=torch.int32, device=device).repeat(B),
                    (torch.arange(B + 1, device=device) * n).to(torch.int32)),
              kwargs=dict(temperature=temperature, seed=torch.arange(B, device=device) + 1000 * seed,
                          positions=torch.randint(0, 4096, (B,), generator=gen, device=device), max_depth=K))
    eager = dict(logits=target, temperature=temperature, tree_start=start, row_req=row_req, child_idx=child_idx,
                 child_tok=child_tok, max_depth=K)
    return dict(op=op, eager=eager)


def with_draft_probs(x: dict, rows: torch.Tensor, seed: int = 1) -> dict:
    """x's op arguments plus draft_probs: for each of ``rows`` (the logits rows whose
    drafts it gives) a softmax of the row + N(0, 1) noise, fp32."""
    logits = x["op"]["args"][0]
    gen = generator(logits.device, seed)
    noisy = logits.float()[rows] + torch.randn(len(rows), logits.shape[1], generator=gen, device=logits.device)
    return dict(args=x["op"]["args"], kwargs=dict(x["op"]["kwargs"], draft_probs=torch.softmax(noisy, -1)))


def chain_rule_inputs(B: int, K: int, V: int, dtype: str, device, seed: int = 0) -> dict:
    x = chain_inputs(B, K, V, dtype, device, seed)
    return dict(op=with_draft_probs(x, x["eager"]["draft_rows"]))


def paths_inputs(B: int, K: int, V: int, dtype: str, device, seed: int = 0, n: int = 3) -> dict:
    """B tries of n disjoint paths of depth K (node 0 the root, path p the nodes 1 + pK ..
    (p + 1)K, the first path's tokens chosen like chain drafts), with draft probabilities."""
    gen = generator(device, seed)
    T = 1 + n * K
    logits, top = peaked_logits(B * T, V, gen, device)
    parents = [-1] + [0 if d == 0 else 1 + p * K + d - 1 for p in range(n) for d in range(K)]
    start = torch.arange(B, device=device) * T
    first_rows = start[:, None] + torch.cat([torch.zeros(1, dtype=torch.long, device=device),
                                             torch.arange(1, K, device=device)])[None]             # root, then path 0
    first = torch.where(torch.rand(B, K, generator=gen, device=device) < DRAFT_MATCH, top[first_rows],
                        torch.randint(0, V, (B, K), generator=gen, device=device))
    # the other paths: distinct first tokens (siblings under the root), then random tokens
    heads = (first[:, :1] + 1 + torch.arange(n - 1, device=device)[None]) % V                  # [B, n - 1]
    others = torch.cat([heads[..., None], torch.randint(0, V, (B, n - 1, K - 1), generator=gen, device=device)], 2)
    tokens = torch.cat([torch.randint(0, V, (B, 1), generator=gen, device=device), first,
                        others.reshape(B, -1)], 1).reshape(-1)
    temperature = torch.ones(B, device=device)
    x = dict(op=dict(args=(logits.to(DTYPES[dtype]), tokens,
                           torch.tensor(parents, dtype=torch.int32, device=device).repeat(B),
                           (torch.arange(B + 1, device=device) * T).to(torch.int32)),
                     kwargs=dict(temperature=temperature, seed=torch.arange(B, device=device) + 1000 * seed,
                                 positions=torch.randint(0, 4096, (B,), generator=gen, device=device),
                                 max_depth=K)))
    return dict(op=with_draft_probs(x, torch.arange(B * T, device=device)))


# =========================================================================== baselines


def eager_chain(logits, draft_tokens, temperature, draft_rows, bonus_rows, row_req, draft_req, draft_col,
                first_draft, K: int):
    """The chain baseline (module docstring), random requests."""
    N, B = draft_tokens.numel(), bonus_rows.numel()
    x = draft_tokens.long()
    probs = torch.softmax(logits.float() / temperature[row_req][:, None], dim=-1)             # [N + B, V] fp32
    p_draft = probs[draft_rows]                                                               # [N, V]
    accept = torch.rand(N, device=logits.device) < p_draft.gather(1, x[:, None]).squeeze(1)
    resid = p_draft.scatter(1, x[:, None], 0.0)                                               # max(p − onehot(x), 0)
    resid = resid / resid.sum(-1, keepdim=True).clamp_min(1e-30)
    recovered = torch.multinomial(resid, 1).squeeze(1)                                        # [N]
    bonus = torch.multinomial(probs[bonus_rows], 1).squeeze(1)                                # [B]
    acc = torch.zeros(B, K + 1, dtype=torch.long, device=logits.device)
    acc[draft_req, draft_col] = accept.long()
    n_acc = acc.cumprod(1).sum(1)                                                             # leading accepts
    token = torch.where(n_acc < K, recovered[(first_draft + n_acc).clamp(max=N - 1)], bonus)
    drafts = torch.full((B, K + 1), -1, dtype=torch.long, device=logits.device)
    drafts[draft_req, draft_col] = x
    cols = torch.arange(K + 1, device=logits.device)[None]
    out = torch.where(cols < n_acc[:, None], drafts, -1)
    out = torch.where(cols == n_acc[:, None], token[:, None], out)
    return out.to(torch.int32), n_acc.to(torch.int32)


def eager_tree(logits, temperature, tree_start, row_req, child_idx, child_tok, max_depth: int):
    """The tree baseline (module docstring), random requests."""
    B, D = tree_start.numel(), max_depth + 1
    dev = logits.device
    probs = torch.softmax(logits.float() / temperature[row_req][:, None], dim=-1)             # [T, V] fp32
    node = torch.zeros(B, dtype=torch.long, device=dev)
    alive = torch.ones(B, dtype=torch.bool, device=dev)
    accepted = torch.full((B, D), -1, dtype=torch.long, device=dev)
    accepted[:, 0] = 0
    out = torch.full((B, D), -1, dtype=torch.long, device=dev)
    for d in range(D):
        row = tree_start + node
        y = torch.multinomial(probs[row], 1).squeeze(1)
        out[:, d] = torch.where(alive, y, -1)
        match = child_tok[row] == y[:, None]                                                  # [B, 2]
        nxt = torch.where(match, child_idx[row], 0).sum(1)                                    # siblings differ
        advance = alive & match.any(1)
        if d + 1 < D:
            accepted[:, d + 1] = torch.where(advance, nxt, -1)
        node = torch.where(advance, nxt, node)
        alive = advance
    return accepted.to(torch.int32), out.to(torch.int32), (accepted[:, 1:] >= 0).sum(1).to(torch.int32)


_COMPILED: dict = {}


def compiled(fn: Callable) -> Callable:
    """torch.compile (default mode) of a baseline, once per process; hitting the recompile
    limit raises, so a row labelled compiled never runs eagerly."""
    if fn not in _COMPILED:
        import torch._dynamo
        cfg = torch._dynamo.config
        name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
        setattr(cfg, name, max(getattr(cfg, name), 64))
        if hasattr(cfg, "fail_on_recompile_limit_hit"):
            cfg.fail_on_recompile_limit_hit = True
        _COMPILED[fn] = torch.compile(fn)
    return _COMPILED[fn]


# =========================================================================== cases


def same_draws(out, ref) -> tuple:
    """Kernel backends draw from the same Philox bits as the torch backend, so their
    outputs match, except that a draw landing within float32 rounding of a CDF step (the
    kernels sum in fp32, the torch backend in fp64) can pick the neighbouring token:
    accepted counts must be equal, and at most max(1, 2%) of the emitted tokens may differ."""
    *outs, num = out
    *refs, ref_num = ref
    if not torch.equal(num.cpu(), ref_num.cpu()):
        return False, float("nan")
    o, r = outs[-1].cpu(), refs[-1].cpu()
    emitted = int((r >= 0).sum())
    differ = int((o != r).sum())
    return differ <= max(1, emitted // 50), float(differ)



def cases(size: str, device) -> list[Case]:
    shapes = SHAPES["cpu" if size == "grid" and torch.device(device).type != "cuda" else size]
    out = []
    for B, K, V, dt in shapes:
        shape = dict(B=B, K=K, V=V, dtype=dt)
        targets = TARGETS if (B, K, V, dt) == GOAL else {}
        for op, build, eager, rows in (("rejection_sample", chain_inputs, eager_chain, B * (K + 1)),
                                       ("tree_rejection_sample", tree_inputs, eager_tree, B * (1 + 2 * K))):
            run_op = getattr(fastverify, op)
            impls = kernel_impls(lambda x, run_op=run_op: run_op(*x["op"]["args"], **x["op"]["kwargs"]))
            impls += [Impl("eager", lambda x, f=eager: (lambda: f(**x["eager"])), kind="baseline", checked=False),
                      Impl("compiled", lambda x, f=eager: (lambda: compiled(f)(**x["eager"])), kind="baseline",
                           checked=False)]
            out.append(Case(FAMILY, op, shape, rows * V * DTYPES[dt].itemsize,
                            lambda build=build, B=B, K=K, V=V, dt=dt: build(B, K, V, dt, device),
                            impls, check=same_draws, targets=targets if op == "rejection_sample" else {},
                            cpu_targets=CPU_TARGETS[op] if (B, K, V, dt) == GOAL else {}))
        out += rule_cases(B, K, V, dt, device)
    return out


def rule_cases(B: int, K: int, V: int, dt: str, device) -> list[Case]:
    """The verification rules beside the default rule of each op, on the same inputs."""
    shape = dict(B=B, K=K, V=V, dtype=dt)
    out = []
    chain_bytes = B * (K + 1) * V * DTYPES[dt].itemsize + B * K * V * 4
    paths_rows = B * (1 + 3 * K)
    for op, rule, base, build, nbytes in (
            ("rejection_sample", "block", "token", chain_rule_inputs, chain_bytes),
            ("rejection_sample", "typical", "token", chain_rule_inputs, chain_bytes),
            ("tree_rejection_sample", "block_wor", "specinfer", paths_inputs,
             paths_rows * V * (DTYPES[dt].itemsize + 4))):
        run_op = getattr(fastverify, op)

        def call(x, rule, run_op=run_op):
            return run_op(*x["op"]["args"], **x["op"]["kwargs"], verify=rule)

        impls = kernel_impls(lambda x, rule=rule, call=call: call(x, rule))
        impls.append(Impl(base, lambda x, base=base, call=call: (lambda: call(x, base)), kind="baseline",
                          checked=False))
        out.append(Case(FAMILY, f"{op} verify={rule}", shape, nbytes,
                        lambda build=build, B=B, K=K, V=V, dt=dt: build(B, K, V, dt, device), impls,
                        check=same_draws))
    return out
