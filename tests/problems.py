"""Random inputs for the verification ops, and a runner that calls the public op on
a chosen backend."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

import fastverify

from conftest import BACKEND_DEVICES


@dataclass
class Chain:
    logits: torch.Tensor          # [N + B, V]
    drafts: torch.Tensor          # [N]
    cu: torch.Tensor              # [B + 1] int32
    temperature: torch.Tensor     # [B]
    seed: torch.Tensor            # [B]
    positions: torch.Tensor       # [B]
    max_draft_len: int
    draft_probs: torch.Tensor | None = None
    top_k: torch.Tensor | None = None
    top_p: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)
    verify: str | None = None     # None: the op's default rule
    typical_eps: torch.Tensor | None = None
    typical_delta: torch.Tensor | None = None

    @property
    def B(self):
        return self.cu.numel() - 1

    def to(self, device):
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, logits=mv(self.logits), drafts=mv(self.drafts), cu=mv(self.cu),
                       temperature=mv(self.temperature), seed=mv(self.seed), positions=mv(self.positions),
                       draft_probs=mv(self.draft_probs), top_k=mv(self.top_k), top_p=mv(self.top_p),
                typical_eps=mv(self.typical_eps), typical_delta=mv(self.typical_delta))

    def kwargs(self):
        kw = dict(draft_probs=self.draft_probs, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                  seed=self.seed, positions=self.positions)
        return {**kw, **self.rule_kwargs()}

    def rule_kwargs(self):
        """verify= (and typical's ε, δ) where the problem sets them."""
        kw = {} if self.verify is None else dict(verify=self.verify)
        if self.typical_eps is not None:
            kw["typical_eps"] = self.typical_eps
        if self.typical_delta is not None:
            kw["typical_delta"] = self.typical_delta
        return kw

    def oracle_args(self):
        tl = lambda t: None if t is None else t.tolist()  # noqa: E731
        return (self.logits.float().tolist(), self.drafts.tolist(), self.cu.tolist(),
                None if self.draft_probs is None else self.draft_probs.double().tolist(),
                self.temperature.tolist(), tl(self.top_k), tl(self.top_p), self.seed.tolist(),
                self.positions.tolist(), self.max_draft_len)

    def oracle_kwargs(self):
        tl = lambda t: None if t is None else t.tolist()  # noqa: E731
        kw = {} if self.verify is None else dict(verify=self.verify)
        if self.verify == "typical":
            kw.update(typical_eps=tl(self.typical_eps), typical_delta=tl(self.typical_delta))
        return kw


@dataclass
class Tree(Chain):
    parents: torch.Tensor | None = None   # [T]

    def to(self, device):
        return replace(super().to(device), parents=self.parents.to(device))

    def oracle_args(self):
        a = list(super().oracle_args())
        return (a[0], a[1], self.parents.tolist(), *a[2:])


def sampling_params(B, g, *, greedy_share=0.3, filters=False, device="cpu"):
    temperature = torch.rand(B, generator=g) * 1.2 + 0.3
    temperature[torch.rand(B, generator=g) < greedy_share] = 0.0
    out = dict(temperature=temperature,
               seed=torch.randint(-2**62, 2**62, (B,), generator=g),
               positions=torch.randint(0, 2**33, (B,), generator=g))
    if filters:
        out["top_k"] = torch.randint(0, 12, (B,), generator=g, dtype=torch.int32)
        out["top_p"] = torch.where(torch.rand(B, generator=g) < 0.3, 1.0, torch.rand(B, generator=g) * 0.9 + 0.05)
    return out


def chain_problem(B=6, V=111, max_k=4, *, dtype=torch.float32, q=False, filters=False, greedy_share=0.3,
                  seed=0, hit_rate=0.6, zero_drafts=True) -> Chain:
    """Ragged chain batch. Drafts equal the row argmax with probability ``hit_rate`` so
    that acceptance runs of several tokens happen."""
    g = torch.Generator().manual_seed(seed)
    K = torch.randint(0 if zero_drafts else 1, max_k + 1, (B,), generator=g)
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = K.cumsum(0)
    N = int(cu[-1])
    logits = torch.randn(N + B, V, generator=g) * 2.5
    rows = torch.cat([torch.arange(int(cu[b]) + b, int(cu[b + 1]) + b) for b in range(B)]).long()
    drafts = torch.randint(0, V, (N,), generator=g)
    hit = torch.rand(N, generator=g) < hit_rate
    drafts = torch.where(hit, logits[rows].argmax(1), drafts)
    draft_probs = torch.softmax(torch.randn(N, V, generator=g) + 2 * torch.nn.functional.one_hot(drafts, V), 1) \
        if q else None
    return Chain(logits=logits.to(dtype), drafts=drafts, cu=cu, max_draft_len=max_k, draft_probs=draft_probs,
                 **sampling_params(B, g, greedy_share=greedy_share, filters=filters))


def random_tree(n: int, V: int, g: torch.Generator, narrow: int = 6,
                likely: list[int] | None = None) -> tuple[list[int], list[int]]:
    """Random tree of n nodes: parents precede children, siblings carry distinct tokens
    drawn from ``likely`` (default: the first ``narrow`` ids), so that target samples
    often match a child."""
    likely = list(range(min(narrow, V))) if likely is None else likely
    parents, tokens, used = [-1], [int(torch.randint(0, V, (1,), generator=g))], set()
    for j in range(1, n):
        while True:
            p = int(torch.randint(0, j, (1,), generator=g))
            t = likely[int(torch.randint(0, len(likely), (1,), generator=g))]
            if (p, t) not in used:
                break
        used.add((p, t))
        parents.append(p)
        tokens.append(t)
    return parents, tokens


def tree_depth(parents: list[int]) -> int:
    d = [0] * len(parents)
    for j in range(1, len(parents)):
        d[j] = d[parents[j]] + 1
    return max(d)


def tree_problem(B=5, V=37, max_nodes=12, *, dtype=torch.float32, q=False, filters=False, greedy_share=0.3,
                 seed=0, sizes=None) -> Tree:
    g = torch.Generator().manual_seed(seed)
    par, tok, cu, depth = [], [], [0], 0
    for b in range(B):
        n = sizes[b] if sizes is not None else int(torch.randint(1, max_nodes + 1, (1,), generator=g))
        p, t = random_tree(n, V, g)
        par += p
        tok += t
        cu.append(cu[-1] + n)
        depth = max(depth, tree_depth(p))
    T = cu[-1]
    boost = torch.zeros(V)
    boost[:6] = 3.0  # the tree's tokens are likely under the target
    logits = torch.randn(T, V, generator=g) * 2 + boost
    draft_probs = torch.softmax(torch.randn(T, V, generator=g) + boost, 1) if q else None
    return Tree(logits=logits.to(dtype), drafts=torch.tensor(tok), parents=torch.tensor(par),
                cu=torch.tensor(cu, dtype=torch.int32), max_draft_len=depth, draft_probs=draft_probs,
                **sampling_params(B, g, greedy_share=greedy_share, filters=filters))


def path_trie(paths: list[tuple], repeat_leaves: bool) -> tuple[list[int], list[int]]:
    """(parents, tokens) of the trie of draft paths of one depth, in the order given: a path
    adds the nodes it does not share with an earlier one, so the leaves come in path order;
    with ``repeat_leaves`` a path drawn again adds a repeated leaf (i.i.d. drafts). Node 0
    is the root (its token, -1 here, is the caller's)."""
    parents, tokens, node_of = [-1], [-1], {(): 0}
    for path in paths:
        node = 0
        for d, t in enumerate(path):
            key = tuple(path[:d + 1])
            if key in node_of and not (repeat_leaves and d == len(path) - 1):
                node = node_of[key]
                continue
            parents.append(node)
            tokens.append(t)
            node = len(parents) - 1
            node_of.setdefault(key, node)
    return parents, tokens


def multi_path_problem(B=4, V=23, n=3, depth=3, *, wor: bool, filters=False, greedy_share=0.25, seed=0,
                       dtype=torch.float32) -> Tree:
    """B tries of n draft paths of ``depth`` tokens (verify 'block' or 'block_wor'); tokens from
    a few likely ones so that paths share prefixes, i.i.d. paths sometimes repeat; draft
    probabilities on every node."""
    g = torch.Generator().manual_seed(seed)
    par, tok, cu = [], [], [0]
    for b in range(B):
        nb = 1 + (b * 2 + seed) % n
        paths = []
        while len(paths) < nb:
            path = tuple(int(t) for t in torch.randint(0, 4, (depth,), generator=g))
            if wor and path in paths:
                continue
            paths.append(path)
        p, t = path_trie(paths, repeat_leaves=not wor)
        t[0] = int(torch.randint(0, V, (1,), generator=g))
        par += p
        tok += t
        cu.append(cu[-1] + len(p))
    T = cu[-1]
    boost = torch.zeros(V)
    boost[:4] = 2.5
    logits = torch.randn(T, V, generator=g) * 2 + boost
    draft_probs = torch.softmax(torch.randn(T, V, generator=g) + 1.6 * boost, 1)  # paths carry much of q
    return Tree(logits=logits.to(dtype), drafts=torch.tensor(tok), parents=torch.tensor(par),
                cu=torch.tensor(cu, dtype=torch.int32), max_draft_len=depth, draft_probs=draft_probs,
                verify="block_wor" if wor else "block",
                **sampling_params(B, g, greedy_share=greedy_share, filters=filters))


def run_chain(p: Chain, backend: str):
    """fastverify.rejection_sample on ``backend``; outputs on CPU."""
    dev = BACKEND_DEVICES[backend]
    x = p.to(dev)
    with fastverify.use_backend(backend):
        out, num = fastverify.rejection_sample(x.logits, x.drafts, x.cu, max_draft_len=x.max_draft_len, **x.kwargs())
    return out.cpu(), num.cpu()


def run_tree(p: Tree, backend: str):
    dev = BACKEND_DEVICES[backend]
    x = p.to(dev)
    with fastverify.use_backend(backend):
        res = fastverify.tree_rejection_sample(x.logits, x.drafts, x.parents, x.cu, max_depth=x.max_draft_len,
                                               **x.kwargs())
    return tuple(t.cpu() for t in res)
