"""Drafters: propose the tokens a target model then verifies.

A drafter sees the committed tokens of each running request (prompt + output so far;
the last one, the *root*, is not yet in the target's cache) and proposes either a
chain of up to ``k`` tokens after the root or a tree hanging off the root.

- :class:`NgramDrafter` — prompt lookup: continue the latest earlier occurrence of the
  context's last n-gram (deterministic, so ``draft_probs`` is None: a point mass).
- :class:`ModelDrafter` — any causal model sharing the target's tokenizer, with its own
  paged cache; the layer-skipping self-drafter is the target itself restricted to a
  subset of its layers (:func:`layerskip`). Chains are sampled from the drafter's
  temperature-scaled softmax q (greedy requests take its argmax) and come with q, so
  chain verification is standard speculative sampling; trees are grown EAGLE-2 style
  from the drafter's most probable nodes and verified by sample-then-match.

A model drafter's head is its own LM head, or a frequency-ranked head
(:class:`fastverify.frspec.RankedHead`: the rows of the most frequent tokens). Either
way the drafter reads it only through ``lm_head_topk`` / ``lm_head_sample``, which never
write the logits; with a ranked head, q is zero outside the subset. Verification
always uses the target's full vocabulary, so the output is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..models import Step, chain_parents, cu_from_counts
from ..ops import philox
from ..ops.sampling import inverse_cdf


@dataclass
class Draft:
    """Per running request: the draft's tokens and tree-local parents (root excluded:
    token i hangs off node parents[i], where node 0 is the root and draft token i is node
    i + 1). A chain has parents [0, 1, 2, ...]. ``probs [sum K_b, V]`` (chains from a
    sampling drafter) is the distribution each token was drawn from."""

    tokens: list[list[int]]
    parents: list[list[int]]
    probs: torch.Tensor | None = None


def draft_probs(h: torch.Tensor, weight: torch.Tensor, token_map: torch.Tensor | None, x: torch.Tensor,
                temperature: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """q [R, V] each draft x [R] was drawn from, at head inputs h [R, d] with a head ``weight
    [V_sub, d]`` over target ids ``token_map`` (None: all V): softmax(logits / T) over the
    head's tokens (zero elsewhere); a point mass at x for greedy rows (T = 0). One matmul for
    a whole chain, after drafting (the draws themselves never wrote logits)."""
    t = temperature[:, None]
    q_sub = torch.softmax((h.float() @ weight.float().t()) / torch.where(t > 0, t, 1.0), -1)   # [R, V_sub]
    q = q_sub if token_map is None else q_sub.new_zeros(len(x), vocab_size).index_copy_(1, token_map, q_sub)
    onehot = torch.zeros_like(q).scatter_(1, x[:, None], 1.0)
    return torch.where(t > 0, q, onehot)


def chain_draft(tokens: list[list[int]], probs=None) -> Draft:
    return Draft(tokens, [list(range(len(t))) for t in tokens], probs)


def step_cost(seconds: dict[int, float], tokens: int) -> float:
    """The target forward time over ``tokens`` tokens: measured (``model.step_seconds``), or
    before that t(1)·(1 + 0.25·(tokens − 1))."""
    if tokens in seconds:
        return seconds[tokens]
    one = seconds.get(1) or min(seconds.values(), default=1.0)
    return one * (1 + 0.25 * (tokens - 1))


def record_step_time(seconds: dict[int, float], tokens: int, elapsed: float) -> None:
    """Fold one measured forward into ``seconds`` (a moving average per token count)."""
    old = seconds.get(tokens)
    seconds[tokens] = elapsed if old is None else 0.7 * old + 0.3 * elapsed


def dynamic_tree(expand, batch: int, depth: int, topk: int, budget: int, device=None):
    """EAGLE-2's dynamic draft tree, for ``batch`` requests at once, on tensors.

    Node 0 of each request's pool is the root (score 0). Level l (l = 0 … depth − 1):
    ``expand(level, frontier [B, F] pool nodes, pool) -> (logprobs [B, F, k], tokens [B, F, k])``
    proposes k children per frontier node (or returns None: the tree stops growing there); all F·k join the pool with score = parent's
    score + log-prob, and the ``topk`` best of them (ties: lower index) are the next
    frontier. The draft is the ``budget − 1`` best pool nodes but the root (ties: lower
    index); since a child never scores above its parent and comes after it, the kept set
    holds every kept node's parent.

    ``pool``: dict of ``tokens [B, P]``, ``parents [B, P]`` (pool index, root −1),
    ``scores [B, P]`` and ``size`` (P so far) — what ``expand`` needs to run its frontier.
    Returns ``(tokens [B, n], parents [B, n], scores [B, n])`` of the kept nodes in pool order
    (parents as tree-local indices: 0 = the root, i = kept node i − 1), n = min(budget − 1, P − 1).
    """
    P_max = 1 + depth * topk * topk
    tokens = torch.zeros(batch, P_max, dtype=torch.long, device=device)
    parents = torch.full((batch, P_max), -1, dtype=torch.long, device=device)
    scores = torch.full((batch, P_max), float("-inf"), dtype=torch.float64, device=device)
    scores[:, 0] = 0.0
    pool = {"tokens": tokens, "parents": parents, "scores": scores, "size": 1}
    frontier = torch.zeros(batch, 1, dtype=torch.long, device=device)
    for level in range(depth):
        grown = expand(level, frontier, pool)
        if grown is None:
            break
        lp, tok = grown                                                      # [B, F, k]
        B, F, k = lp.shape
        n = pool["size"]
        cand = (scores.gather(1, frontier)[:, :, None] + lp.double()).reshape(B, F * k)
        tokens[:, n:n + F * k] = tok.reshape(B, F * k)
        parents[:, n:n + F * k] = frontier[:, :, None].expand(B, F, k).reshape(B, F * k)
        scores[:, n:n + F * k] = cand
        pool["size"] = n + F * k
        # stable sort: among equal scores the lower pool index first
        order = torch.sort(-cand, dim=1, stable=True).indices[:, :min(topk, F * k)]
        frontier = n + order
    P = pool["size"]
    keep = min(budget - 1, P - 1)
    rest = scores[:, 1:P]
    chosen = torch.sort(-rest, dim=1, stable=True).indices[:, :keep] + 1     # pool indices
    chosen = chosen.sort(dim=1).values                                       # pool order: parents first
    # tree-local index of every pool node: 0 for the root, 1 + rank among the kept
    local = torch.full((batch, P), -1, dtype=torch.long, device=device)
    local[:, 0] = 0
    local.scatter_(1, chosen, torch.arange(1, keep + 1, device=device).expand(batch, keep))
    kept_parents = local.gather(1, parents[:, :P].gather(1, chosen))
    if bool((kept_parents < 0).any()):
        raise AssertionError("dynamic_tree kept a node without its parent")
    return tokens[:, :P].gather(1, chosen), kept_parents, scores[:, :P].gather(1, chosen)



class NgramDrafter:
    """Prompt lookup: find the latest earlier occurrence of the context's last n tokens
    (n from ``max_ngram`` down to ``min_ngram``) and propose what followed it. For a
    tree, up to ``branches`` distinct continuations (from the latest matches) are merged
    into a trie, so siblings always carry distinct tokens."""

    name = "ngram"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, branches: int = 4):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram, self.branches = max_ngram, min_ngram, branches

    def start(self, run) -> None:
        pass

    def continuations(self, ctx: list[int], k: int, limit: int) -> list[list[int]]:
        """Up to ``limit`` distinct continuations of length <= k, latest match first."""
        found: list[list[int]] = []
        L = len(ctx)
        for n in range(min(self.max_ngram, L - 1), self.min_ngram - 1, -1):
            tail = ctx[L - n:]
            for start in range(L - n - 1, -1, -1):  # latest occurrence first, excluding the tail itself
                if ctx[start:start + n] == tail:
                    cont = ctx[start + n:start + n + k]
                    if cont and cont not in found:
                        found.append(cont)
                        if len(found) == limit:
                            return found
            if found:
                return found
        return found

    def chain(self, run, reqs: list[int], k: int) -> Draft:
        out = []
        for b in reqs:
            conts = self.continuations(run.tokens[b], k, 1)
            out.append(conts[0] if conts else [])
        return chain_draft(out)

    def tree(self, run, reqs: list[int], depth: int, topk: int, budget: int) -> Draft:
        tokens, parents = [], []
        for b in reqs:
            trie: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
            tok, par = [], []
            for cont in self.continuations(run.tokens[b], depth, self.branches):
                node = 0
                for t in cont:
                    if (node, t) not in trie:
                        if len(tok) == budget - 1:
                            break
                        tok.append(t)
                        par.append(node)
                        trie[(node, t)] = len(tok)
                    node = trie[(node, t)]
            tokens.append(tok)
            parents.append(par)
        return Draft(tokens, parents)

    def commit(self, run, reqs: list[int]) -> None:
        pass


class ModelDrafter:
    """A causal model with its own paged cache proposes drafts.

    The drafter's cache holds the K/V of the first ``length[b]`` committed tokens of each
    request; every proposal first feeds it the committed tokens it has not seen yet
    (the root included), as one chain per request."""

    def __init__(self, model, name: str = "model", head=None):
        self.model = model
        self.name = name if head is None else f"{name}+frspec[{head.n}]"
        self.head = head  # a fastverify.frspec.RankedHead, or None: the model's own LM head
        self.sparse = None  # a KV policy: draft steps attend to part of the cache (selfspec)

    def start(self, run) -> None:
        target_tok, tok = run.model.tokenizer, self.model.tokenizer
        if target_tok is not None and tok is not None and target_tok.identity() != tok.identity():
            raise ValueError(f"drafter {self.name!r} does not share the target's tokenizer "
                             f"({tok.identity()} != {target_tok.identity()})")
        V = run.model.config.vocab_size
        if self.model.config.vocab_size != V:
            raise ValueError(f"drafter vocabulary ({self.model.config.vocab_size}) differs from the target's ({V})")
        if self.head is not None and self.head.vocab_size != V:
            raise ValueError(f"the ranked head maps into a vocabulary of {self.head.vocab_size}, the target has {V}")
        self.cache = self.model.new_cache(len(run.tokens), run.max_len, page_size=run.cache.page_size)
        self.length = [0] * len(run.tokens)
        self.run = run

    def _head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(head weight [V_sub, d], token_map [V_sub] or None for the full head)."""
        if self.head is None:
            return self.model.lm_head.weight, None
        return self.head.weight, self.head.token_map

    def _catch_up(self, reqs: list[int]) -> torch.Tensor:
        """Feed each request's unseen committed tokens (root included); hidden states at the roots [B, d]."""
        run = self.run
        feed = [run.tokens[b][self.length[b]:] for b in reqs]
        dev = self.model.device
        tokens = torch.tensor([t for f in feed for t in f], device=dev)
        cu = cu_from_counts([len(f) for f in feed], dev)
        last = cu[1:] - 1
        idx = torch.tensor(reqs, device=dev)
        step = Step.build(self.cache, idx, chain_parents(cu), cu, torch.tensor([self.length[b] for b in reqs], device=dev))
        h = self.model.hidden(tokens, step, self.cache, rows=last.long())
        for b, f in zip(reqs, feed):
            self.length[b] += len(f)
        return h

    def _forward_one(self, idx: torch.Tensor, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, d] after feeding one token per request (x [B] at positions pos [B])."""
        B = len(idx)
        one = torch.arange(B + 1, device=x.device, dtype=torch.int32)
        step = Step.build(self.cache, idx, torch.full((B,), -1, device=x.device), one, pos)
        step.sparse = self.sparse
        return self.model.hidden(x, step, self.cache)

    def _fed(self, reqs: list[int], n: int) -> None:
        for b in reqs:
            self.length[b] += n

    def _draft_probs(self, h: torch.Tensor, x: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        weight, token_map = self._head()
        return draft_probs(h, weight, token_map, x, temperature, self.run.model.config.vocab_size)

    def chain(self, run, reqs: list[int], k: int) -> Draft:
        """Draft d_1 .. d_k ~ q by Gumbel-max inside ``lm_head_sample``, keyed by (seed,
        draw position of d_i) on a stream of its own, so draws never depend on the batch."""
        dev = self.model.device
        idx = torch.tensor(reqs, device=dev)
        temperature, seed = run.temperature[idx], run.seed[idx]
        weight, token_map = self._head()
        h = self._catch_up(reqs)
        first = torch.tensor([len(run.tokens[b]) for b in reqs], device=dev)   # position of d_1 (the root's + 1)
        draws = run.draw_positions(reqs)                                   # keys of the draws (generate.py)
        drafts, hiddens = [], []
        for i in range(k):
            x, _, _ = ops.lm_head_sample(h, weight, temperature=temperature, seed=seed, positions=draws + i,
                                         token_map=token_map)
            drafts.append(x)
            hiddens.append(h)
            if i + 1 == k:
                break
            h = self._forward_one(idx, x, first + i)
        self._fed(reqs, k - 1)                                          # root, then d_1 .. d_{k-1} were fed
        x = torch.stack(drafts, 1)                                      # [B, k]
        q = None
        if bool((temperature > 0).any()):                               # all greedy: drafts are point masses
            q = self._draft_probs(torch.stack(hiddens, 1).flatten(0, 1), x.flatten(),
                                  temperature.repeat_interleave(k))     # [B·k, V], request-major
        return chain_draft(x.tolist(), q)

    def tree(self, run, reqs: list[int], depth: int, topk: int, budget: int) -> Draft:
        """EAGLE-2 style dynamic tree (:func:`dynamic_tree`): each node scores the drafter's
        log-probability of its path; level by level the ``topk`` best new nodes run through
        the drafter and propose their ``topk`` most likely children; the ``budget − 1``
        best nodes form the draft."""
        dev = self.model.device
        weight, token_map = self._head()
        h = self._catch_up(reqs)
        B = len(reqs)
        idx = torch.tensor(reqs, device=dev)
        prefix = torch.tensor([self.length[b] - 1 for b in reqs], device=dev)  # roots sit at prefix

        def expand(level, frontier, pool):
            nonlocal h
            if level > 0:
                # run the frontier: its K/V go to slots prefix + pool index, the rest of the pool is masked off
                P = pool["size"]
                cu = torch.arange(B + 1, device=dev, dtype=torch.int32) * P
                rows = (torch.arange(B, device=dev)[:, None] * P + frontier).flatten()
                step = Step.build(self.cache, idx, pool["parents"][:, :P].flatten(), cu, prefix, rows=rows)
                h = self.model.hidden(pool["tokens"].gather(1, frontier).flatten(), step, self.cache)
            ids, lp, _ = ops.lm_head_topk(h, weight, topk, token_map=token_map)   # [rows of frontier, topk]
            F = frontier.shape[1]
            return lp.view(B, F, topk), ids.long().view(B, F, topk)

        tokens, parents, _ = dynamic_tree(expand, B, depth, topk, budget, dev)
        return Draft(tokens.tolist(), parents.tolist())

    def paths(self, run, reqs: list[int], n: int, depth: int, *, without_replacement: bool,
              repeat_leaves: bool = False) -> Draft:
        """n draft paths of ``depth`` tokens per request, as the trie multi-path verification
        reads (:func:`fastverify.tree_rejection_sample` with ``verify="block"`` /
        ``"block_wor"``): leaves in the order the paths were drawn, ``probs`` a row per node
        (root first) holding the law its children were drawn from (zeros at the leaves).

        - i.i.d. (``without_replacement=False``): path p draws its next token from q at its
          node with the uniform of counter (seed, position, path_stream(p)); paths through one
          node share its drafter forward. ``repeat_leaves`` keeps a path drawn twice as a
          repeated leaf (the i.i.d. block rule counts it); else it is merged (SpecInfer's
          recursive rejection reads the children as de-duplicated i.i.d. draws).
        - without replacement: Gumbel-top-n over whole paths by stochastic beam search (Kool
          et al. 2019): each beam's children get Gumbel-perturbed path log-probabilities
          conditioned on their maximum being the beam's own; the n best survive; the final
          order (by perturbed score) is the order of sampling without replacement.
        Greedy requests (temperature 0) take the n most likely paths (beam search)."""
        dev = self.model.device
        weight, token_map = self._head()
        h = self._catch_up(reqs)
        B = len(reqs)
        idx = torch.tensor(reqs, device=dev)
        prefix = torch.tensor([self.length[b] - 1 for b in reqs], device=dev)   # roots sit at prefix
        temperature, seed = run.temperature[idx], run.seed[idx]
        greedy = (temperature == 0).tolist()
        first = run.draw_positions(reqs).tolist()                              # draw position of the first draft
        V = run.model.config.vocab_size
        tok = [[run.tokens[b][-1]] for b in reqs]                              # the pool: root is node 0
        par = [[-1] for _ in reqs]
        q_of: list[dict[int, torch.Tensor]] = [{} for _ in reqs]               # node -> the law of its children
        frontier = [[0] for _ in reqs]
        at = [[0] * n for _ in reqs]                                           # i.i.d.: the node of each path
        beams = [[(0, 0.0, 0.0)] for _ in reqs]                                # (node, log q of path, score)
        for level in range(depth):
            rows = [r for r in range(B) for _ in frontier[r]]
            t = temperature[torch.tensor(rows, device=dev)][:, None]
            logits = h.float() @ weight.float().t()                             # [F, V_sub]
            q_sub = torch.softmax(logits / torch.where(t > 0, t, 1.0), -1)
            q = q_sub if token_map is None else q_sub.new_zeros(len(rows), V).index_copy_(1, token_map, q_sub)
            i = 0
            for r in range(B):
                for node in frontier[r]:
                    q_of[r][node] = q[i]
                    i += 1
            pos = [first[r] + level for r in range(B)]
            new_frontier = []
            i = 0
            for r in range(B):
                qr = q[i:i + len(frontier[r])]
                i += len(frontier[r])
                last = level + 1 == depth
                if without_replacement or greedy[r]:
                    beams[r] = self._beam_step(beams[r], qr, frontier[r], int(seed[r]), pos[r], n, greedy[r])
                    kids = [self._child(tok[r], par[r], node, x, False) for node, x in
                            ((b_[0], b_[3]) for b_ in beams[r])]
                    beams[r] = [(k, lp, g) for k, (_, lp, g, _) in zip(kids, beams[r])]
                    new_frontier.append(kids)
                else:
                    u = philox.uniform(seed[r], pos[r], 0, stream=philox.path_stream(torch.arange(n, device=dev)))
                    row_of = {node: k for k, node in enumerate(frontier[r])}
                    x = inverse_cdf(qr[[row_of[a] for a in at[r]]], u, qr[[row_of[a] for a in at[r]]].argmax(1))
                    at[r] = [self._child(tok[r], par[r], a, int(xi), last and repeat_leaves)
                             for a, xi in zip(at[r], x.tolist())]
                    new_frontier.append(list(dict.fromkeys(at[r])))
            frontier = new_frontier
            if level + 1 == depth:
                break
            counts = [len(t_) for t_ in tok]
            cu = cu_from_counts(counts, dev)
            parents = torch.tensor([p_ for ps in par for p_ in ps], device=dev)
            rows_t = torch.tensor([int(cu[r]) + node for r in range(B) for node in frontier[r]], device=dev)
            tokens = torch.tensor([tok[r][node] for r in range(B) for node in frontier[r]], device=dev)
            step = Step.build(self.cache, idx, parents, cu, prefix, rows=rows_t)
            h = self.model.hidden(tokens, step, self.cache)
        # the paths, in draw order (without replacement: by decreasing perturbed score)
        tokens_out, parents_out, probs = [], [], []
        for r in range(B):
            leaves = [b_[0] for b_ in beams[r]] if (without_replacement or greedy[r]) else at[r]
            paths = [self._path(par[r], leaf) for leaf in leaves]
            t_r, p_r, rows_r = [], [], [q_of[r][0]]
            index = {(): 0}
            for nodes in paths:
                node_out = 0
                for d, node in enumerate(nodes):
                    key = tuple(tok[r][x] for x in nodes[:d + 1])
                    is_leaf = d == len(nodes) - 1
                    if key in index and not (repeat_leaves and is_leaf and not without_replacement):
                        node_out = index[key]
                        continue
                    t_r.append(tok[r][node])
                    p_r.append(node_out)
                    node_out = len(t_r)
                    index.setdefault(key, node_out)
                    rows_r.append(q_of[r][node] if node in q_of[r] and not is_leaf else q.new_zeros(V))
            tokens_out.append(t_r)
            parents_out.append(p_r)
            probs += rows_r
        return Draft(tokens_out, parents_out, torch.stack(probs))

    @staticmethod
    def _child(tok: list[int], par: list[int], node: int, x: int, repeat: bool) -> int:
        """The pool node of token x under ``node``, added if new (always, with ``repeat``)."""
        if not repeat:
            for j in range(node + 1, len(tok)):
                if par[j] == node and tok[j] == x:
                    return j
        tok.append(x)
        par.append(node)
        return len(tok) - 1

    @staticmethod
    def _path(par: list[int], leaf: int) -> list[int]:
        """Pool nodes from the root's child to ``leaf``."""
        out = []
        while leaf != 0:
            out.append(leaf)
            leaf = par[leaf]
        return out[::-1]

    @staticmethod
    def _beam_step(beams, q, frontier, seed: int, position: int, n: int, greedy: bool):
        """One level of stochastic beam search: [(parent node, log q of path, perturbed
        score, token)] of the n best children (plain beam search when greedy)."""
        node_row = {node: k for k, node in enumerate(frontier)}
        V = q.shape[1]
        nodes = torch.tensor([b[0] for b in beams], device=q.device)
        lp = torch.tensor([b[1] for b in beams], dtype=torch.float64, device=q.device)
        g = torch.tensor([b[2] for b in beams], dtype=torch.float64, device=q.device)
        phi = lp[:, None] + torch.log(q[[node_row[b[0]] for b in beams]].double())        # [beams, V]
        score = phi
        if not greedy:
            ids = torch.arange(V, device=q.device)
            G = phi + philox.gumbel(seed, position, ids[None, :], philox.path_stream(nodes[:, None]))
            Z = G.max(1, keepdim=True).values
            # G conditioned on its maximum being the beam's own score g (Kool et al. 2019, appendix B)
            v = g[:, None] - G + torch.log(-torch.expm1((G - Z).clamp(max=0)))
            score = g[:, None] - v.clamp(min=0) - torch.log1p(torch.exp(-v.abs()))
            score = torch.where(torch.isfinite(phi), score, float("-inf"))
        flat = score.flatten()
        top = flat.topk(min(n, int(torch.isfinite(flat).sum()))).indices.tolist()
        return [(beams[k // V][0], float(phi.flatten()[k]), float(flat[k]), k % V) for k in top]

    def commit(self, run, reqs: list[int]) -> None:
        """After verification: the cache stays valid for the committed tokens it computed
        in place — the root and the accepted drafts it was fed (chains), the root only
        (trees, whose nodes sit out of place) — never the new root."""
        for b in reqs:
            self.length[b] = min(self.length[b], len(run.tokens[b]) - 1)


def layerskip(model, layers=None, head=None) -> ModelDrafter:
    """The target run with a subset of its layers as a drafter (shared weights, own cache).

    Default: skip every third layer of the middle half. The first and last layers carry
    most of what a small untrained-for-early-exit model needs — on SmolLM2-135M, dropping
    its last 5 layers leaves 0% top-1 agreement with the full model, dropping 5 middle
    ones about 45%."""
    L = model.config.n_layers
    if layers is None:
        layers = [i for i in range(L) if not (L // 4 <= i < 3 * L // 4 and i % 3 == 0)]
    return ModelDrafter(model.with_layers(layers), name=f"layerskip[{len(set(layers))}/{L}]", head=head)
