"""Self-speculation with a sparse KV cache (MagicDec, TriForce): the target drafts for
itself, attending to only ``kv_budget`` tokens of its own cache, then verifies the chain
(``method="selfspec"``) or a tree of the draft's top-k tokens along that chain
(``method="tree", drafter="selfspec"``) with full attention.

At long context a decode step is dominated by reading the KV cache; a draft step that
reads ``kv_budget`` keys instead of all of them is cheap, and because it runs the
target's own weights its drafts are usually right. The draft writes its (approximate)
K/V into the target's cache at the draft positions; the verification forward over root
+ drafts overwrites exactly those slots with the target's K/V, and the cache length
only ever advances over verified tokens, so a partial acceptance needs no copy to roll
back. Cost model (MagicDec): T_SD / T_AR = (γ·T_D/T_T + T_V/T_T) / Ω with
Ω = (1 − α^(γ+1)) / (1 − α).

Policies (:class:`KVPolicy`), both through ``fastverify.sparse_kv_attention``:

- ``streaming`` (StreamingLLM): the first ``sink`` chunks and the most recent ones;
- ``topk`` (TriForce): per layer and KV head, chunks scored by q · mean(K_chunk)
  (``fastverify.select_kv_chunks``), re-selected every ``refresh`` drafts; in between
  the selection is kept and the newest chunks are added. Chunk means are maintained
  incrementally as verified chunks fill, never recomputed over the whole cache.
"""

from __future__ import annotations

import torch

from .. import ops
from .drafters import Draft, ModelDrafter
from ..models import Step

POLICIES = ("streaming", "topk")


class KVPolicy:
    """Which chunks of the cache a draft step attends to (the tail after the last full
    chunk always). ``budget`` tokens = ``budget // chunk_size`` chunks, of which
    ``sink`` first and ``recent`` last chunks are always kept."""

    def __init__(self, kind: str = "topk", budget: int = 256, chunk_size: int = 16, sink: int = 1,
                 recent: int = 1, refresh: int = 8):
        if kind not in POLICIES:
            raise ValueError(f"kv policy must be one of {POLICIES}, got {kind!r}")
        if chunk_size < 1 or budget < chunk_size * (sink + recent):
            raise ValueError(f"kv_budget ({budget}) must hold the {sink} sink and {recent} recent chunks of "
                             f"{chunk_size} tokens")
        if refresh < 1:
            raise ValueError(f"refresh must be >= 1, got {refresh}")
        self.kind, self.chunk_size, self.sink, self.recent, self.refresh = kind, chunk_size, sink, recent, refresh
        self.num_chunks = budget // chunk_size
        self.means: list[torch.Tensor] = []     # per layer [B_all, max_chunks, Hkv, D] fp32 (topk)
        self.done: list[int] = []               # per request: chunks whose mean is in `means`
        self.selected: dict[int, torch.Tensor] = {}
        self.reqs: list[int] | None = None
        self.rounds = 0
        self._step_ids = None                   # (step, ids) of the streaming policy, shared by all layers
        self._step_new = None                   # (step, ids of the chunks completed since the selection)
        self.selected_full = None

    def start(self, cache, batch: int) -> None:
        if self.kind == "topk":
            n_layers, Hkv, D = cache.k.shape[2], cache.k.shape[3], cache.k.shape[4]
            chunks = cache.max_len // self.chunk_size
            self.means = [torch.zeros(batch, chunks, Hkv, D, device=cache.k.device) for _ in range(n_layers)]
            self.done = [0] * batch

    def begin_round(self, reqs: list[int]) -> None:
        """A new draft chain: re-select (topk) every ``refresh`` rounds or when the batch changed."""
        if reqs != self.reqs or self.rounds % self.refresh == 0:
            self.selected = {}
        self.reqs = list(reqs)
        self.rounds += 1

    def update_means(self, cache, reqs: list[int], committed: list[int]) -> None:
        """Means of the chunks that verified tokens completed since the last call."""
        if self.kind != "topk":
            return
        cs, page = self.chunk_size, cache.page_size
        for b, n in zip(reqs, committed):
            full = n // cs
            if full <= self.done[b]:
                continue
            pos = torch.arange(self.done[b] * cs, full * cs, device=cache.k.device)
            slots = cache.block_table[b, pos // page].long() * page + pos % page
            k = cache.k.view(-1, *cache.k.shape[2:])[slots].float()            # [n·cs, L, Hkv, D]
            means = k.view(-1, cs, *k.shape[1:]).mean(1)                        # [n, L, Hkv, D]
            for layer, m in enumerate(self.means):
                m[b, self.done[b]:full] = means[:, layer]
            self.done[b] = full

    def _streaming(self, step: Step, hkv: int) -> torch.Tensor:
        if self._step_ids is None or self._step_ids[0] is not step:
            ids = ops.streaming_kv_chunks(step.seq_lens, chunk_size=self.chunk_size, num_chunks=self.num_chunks,
                                          num_sink_chunks=self.sink, num_hkv=hkv)
            self._step_ids = (step, ids)
        return self._step_ids[1]

    def chunk_ids(self, layer: int, q: torch.Tensor, k_cache: torch.Tensor, step: Step) -> torch.Tensor:
        """chunk_ids [B, Hkv, C] for this layer of a draft step (q [B, Hq, D])."""
        hkv = k_cache.shape[2]
        if self.kind == "streaming":
            return self._streaming(step, hkv)
        if layer not in self.selected:
            if not self.selected:  # chunks complete at the selection, the same for every layer
                self.selected_full = step.seq_lens.div(self.chunk_size, rounding_mode="floor")
            idx = torch.tensor(self.reqs, device=q.device)
            self.selected[layer] = ops.select_kv_chunks(
                q, k_cache, step.block_table, step.seq_lens, chunk_size=self.chunk_size, num_chunks=self.num_chunks,
                num_sink_chunks=self.sink, num_recent_chunks=self.recent, chunk_means=self.means[layer][idx])
            return self.selected[layer]
        # between re-selections: the kept chunks plus those completed since (at most
        # refresh · (γ + 1) / chunk_size of them: the recent window grows until the next selection)
        return torch.cat([self.selected[layer], self._completed_since(step, hkv)], -1)

    def _completed_since(self, step: Step, hkv: int) -> torch.Tensor:
        if self._step_new is None or self._step_new[0] is not step:
            full = step.seq_lens.div(self.chunk_size, rounding_mode="floor")
            width = max(int((full - self.selected_full).max()), 1)
            new = self.selected_full[:, None] + torch.arange(width, device=full.device)            # [B, width]
            new = torch.where(new < full[:, None], new, -1).to(torch.int32)
            self._step_new = (step, new[:, None, :].expand(-1, hkv, -1))
        return self._step_new[1]


class SelfSpecDrafter(ModelDrafter):
    """The target drafts for itself over a sparse view of its own cache (no second cache,
    no catch-up: the root is the only token the cache does not hold)."""

    def __init__(self, model, policy: KVPolicy, head=None):
        super().__init__(model, name=f"selfspec[{policy.kind}, {policy.num_chunks * policy.chunk_size}]", head=head)
        self.policy = policy

    def start(self, run) -> None:
        if run.model is not self.model:
            raise ValueError("the self-speculative drafter must draft with the target model itself")
        self.run = run
        self.cache = run.cache        # draft steps write into the target's own cache ...
        self.sparse = self.policy     # ... and attend to the part of it the policy picks
        self.policy.start(run.cache, len(run.tokens))

    def _catch_up(self, reqs: list[int]) -> torch.Tensor:
        run = self.run
        self.policy.update_means(run.cache, reqs, [run.cache_len[b] for b in reqs])
        self.policy.begin_round(reqs)
        dev = self.model.device
        idx = torch.tensor(reqs, device=dev)
        roots = torch.tensor([run.tokens[b][-1] for b in reqs], device=dev)
        return self._forward_one(idx, roots, torch.tensor([run.cache_len[b] for b in reqs], device=dev))

    def _fed(self, reqs: list[int], n: int) -> None:
        pass  # the draft K/V sit in the target's cache until verification overwrites them

    def tree(self, run, reqs: list[int], depth: int, topk: int, budget: int) -> Draft:
        """A tree from one sparse chain: at each of ``depth`` levels the draft's ``topk`` most
        likely tokens hang off the previous level's most likely one, and only that one is
        run on (one sparse forward per level, as for a chain). At most ``budget − 1`` nodes:
        deeper levels keep fewer siblings. Verification (``tree_rejection_sample``) accepts
        whichever sibling the target picks, so a level whose top-1 draft is wrong can still
        be accepted; sampling is sample-then-match, lossless for any tree."""
        dev = self.model.device
        idx = torch.tensor(reqs, device=dev)
        weight, token_map = self._head()
        h = self._catch_up(reqs)
        first = torch.tensor([len(run.tokens[b]) for b in reqs], device=dev)   # position of level 1
        tokens, parents = [[] for _ in reqs], [[] for _ in reqs]
        tip = [0] * len(reqs)                                                # the main branch's last node
        for level in range(depth):
            room = budget - 1 - len(tokens[0]) - (depth - level - 1)         # one node for each later level
            k = max(1, min(topk, room))
            if budget - 1 - len(tokens[0]) < 1:
                break
            ids, _, _ = ops.lm_head_topk(h, weight, k, token_map=token_map)   # [B, k], most likely first
            for r, row in enumerate(ids.tolist()):
                parents[r] += [tip[r]] * k
                tip[r] = len(tokens[r]) + 1
                tokens[r] += row
            if level + 1 == depth:
                break
            h = self._forward_one(idx, ids[:, 0], first + level)
        return Draft(tokens, parents)

    def commit(self, run, reqs: list[int]) -> None:
        pass
