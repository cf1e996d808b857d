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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models import Step, chain_parents, cu_from_counts


@dataclass
class Draft:
    """Per running request: the draft's tokens and tree-local parents (root excluded:
    token i hangs off node parents[i], where node 0 is the root and draft token i is node
    i + 1). A chain has parents [0, 1, 2, ...]. ``probs [sum K_b, V]`` (chains from a
    sampling drafter) is the distribution each token was drawn from."""

    tokens: list[list[int]]
    parents: list[list[int]]
    probs: torch.Tensor | None = None


def chain_draft(tokens: list[list[int]], probs=None) -> Draft:
    return Draft(tokens, [list(range(len(t))) for t in tokens], probs)


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

    def __init__(self, model, name: str = "model"):
        self.model = model
        self.name = name

    def start(self, run) -> None:
        target_tok, tok = run.model.tokenizer, self.model.tokenizer
        if target_tok is not None and tok is not None and target_tok.identity() != tok.identity():
            raise ValueError(f"drafter {self.name!r} does not share the target's tokenizer "
                             f"({tok.identity()} != {target_tok.identity()})")
        if self.model.config.vocab_size != run.model.config.vocab_size:
            raise ValueError(f"drafter vocabulary ({self.model.config.vocab_size}) differs from the target's "
                             f"({run.model.config.vocab_size})")
        self.cache = self.model.new_cache(len(run.tokens), run.max_len, page_size=run.cache.page_size)
        self.length = [0] * len(run.tokens)
        self.generator = torch.Generator(device=self.model.device).manual_seed(run.seed_base + 1)
        self.run = run

    def _catch_up(self, reqs: list[int]) -> torch.Tensor:
        """Feed each request's unseen committed tokens (root included); logits at the roots [B, V]."""
        run = self.run
        feed = [run.tokens[b][self.length[b]:] for b in reqs]
        dev = self.model.device
        tokens = torch.tensor([t for f in feed for t in f], device=dev)
        cu = cu_from_counts([len(f) for f in feed], dev)
        last = cu[1:] - 1
        idx = torch.tensor(reqs, device=dev)
        step = Step.build(self.cache, idx, chain_parents(cu), cu, torch.tensor([self.length[b] for b in reqs], device=dev))
        logits = self.model(tokens, step, self.cache, logit_rows=last.long())
        for b, f in zip(reqs, feed):
            self.length[b] += len(f)
        return logits.float()

    def _probs(self, logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        """q = softmax(logits / T) per request; greedy rows (T = 0) a point mass at the argmax."""
        t = temperature.to(logits.device)[:, None]
        q = torch.softmax(logits / torch.where(t > 0, t, 1.0), -1)
        onehot = torch.zeros_like(q).scatter_(1, logits.argmax(-1, keepdim=True), 1.0)
        return torch.where(t > 0, q, onehot)

    def chain(self, run, reqs: list[int], k: int) -> Draft:
        dev = self.model.device
        temperature = run.temperature[reqs]
        logits = self._catch_up(reqs)
        idx = torch.tensor(reqs, device=dev)
        B = len(reqs)
        drafts, probs = [], []
        for i in range(k):
            q = self._probs(logits, temperature)
            x = torch.multinomial(q, 1, generator=self.generator)[:, 0]
            drafts.append(x)
            probs.append(q)
            if i + 1 == k:
                break
            one = torch.arange(B + 1, device=dev, dtype=torch.int32)
            pos = torch.tensor([self.length[b] + i for b in reqs], device=dev)
            step = Step.build(self.cache, idx, torch.full((B,), -1, device=dev), one, pos)
            logits = self.model(x, step, self.cache).float()
        for b in reqs:
            self.length[b] += k - 1                                     # root, then d_1 .. d_{k-1} were fed
        tokens = torch.stack(drafts, 1).tolist()                        # [B, k]
        q = torch.stack(probs, 1).flatten(0, 1)                         # [B·k, V], request-major
        return chain_draft(tokens, q)

    def tree(self, run, reqs: list[int], depth: int, topk: int, budget: int) -> Draft:
        """EAGLE-2 style dynamic tree. Each node's score is the drafter's log-probability
        of its path. Level by level, the ``topk`` best-scoring new nodes (the frontier)
        are run through the drafter and each proposes its ``topk`` most likely children;
        at the end the ``budget − 1`` best-scoring nodes form the draft (a child scores
        at most its parent, so the best nodes are ancestor-closed)."""
        dev = self.model.device
        logits = self._catch_up(reqs)
        B = len(reqs)
        idx = torch.tensor(reqs, device=dev)
        prefix = torch.tensor([self.length[b] - 1 for b in reqs], device=dev)  # roots sit at prefix
        # the pool of every request: tokens, parents (tree-local; root is node 0), scores
        tok = [[run.tokens[b][-1]] for b in reqs]
        par = [[-1] for _ in reqs]
        score = [[0.0] for _ in reqs]
        frontier = [[0] for _ in reqs]
        for level in range(depth):
            logp = torch.log_softmax(logits, -1)                          # [rows of frontier, V]
            top_lp, top_id = logp.topk(topk, -1)
            top_lp, top_id = top_lp.tolist(), top_id.tolist()
            row, new_frontier = 0, []
            for r in range(B):
                cand = []
                for node in frontier[r]:
                    cand += [(score[r][node] + lp, node, t) for lp, t in zip(top_lp[row], top_id[row])]
                    row += 1
                cand.sort(key=lambda c: -c[0])
                added = []
                for s, node, t in cand:
                    par[r].append(node)
                    tok[r].append(t)
                    score[r].append(s)
                    added.append(len(tok[r]) - 1)
                new_frontier.append(added[:topk])
            frontier = new_frontier
            if level + 1 == depth:
                break
            # run the frontier: its K/V go to slots prefix + node index, the rest of the pool is masked off
            counts = [len(t) for t in tok]
            cu = cu_from_counts(counts, dev)
            parents = torch.tensor([p for ps in par for p in ps], device=dev)
            rows = torch.tensor([int(cu[r]) + n for r in range(B) for n in frontier[r]], device=dev)
            tokens = torch.tensor([tok[r][n] for r in range(B) for n in frontier[r]], device=dev)
            step = Step.build(self.cache, idx, parents, cu, prefix, rows=rows)
            logits = self.model(tokens, step, self.cache).float()
        tokens, parents = [], []
        for r in range(B):
            keep = sorted(range(1, len(tok[r])), key=lambda n: (-score[r][n], n))[:budget - 1]
            keep.sort()
            new_index = {0: 0, **{n: i + 1 for i, n in enumerate(keep)}}
            tokens.append([tok[r][n] for n in keep])
            parents.append([new_index[par[r][n]] for n in keep])
        return Draft(tokens, parents)

    def commit(self, run, reqs: list[int]) -> None:
        """After verification: the cache stays valid for the committed tokens it computed
        in place — the root and the accepted drafts it was fed (chains), the root only
        (trees, whose nodes sit out of place) — never the new root."""
        for b in reqs:
            self.length[b] = min(self.length[b], len(run.tokens[b]) - 1)


def layerskip(model, layers=None) -> ModelDrafter:
    """The target run with a subset of its layers as a drafter (shared weights, own cache).

    Default: skip every third layer of the middle half. The first and last layers carry
    most of what a small untrained-for-early-exit model needs — on SmolLM2-135M, dropping
    its last 5 layers leaves 0% top-1 agreement with the full model, dropping 5 middle
    ones about 45%."""
    L = model.config.n_layers
    if layers is None:
        layers = [i for i in range(L) if not (L // 4 <= i < 3 * L // 4 and i % 3 == 0)]
    return ModelDrafter(model.with_layers(layers), name=f"layerskip[{len(set(layers))}/{L}]")
