"""Drafters that read the target's own hidden states: EAGLE-3 and Medusa.

Both cost a few percent of a target step per draft because the target has already done
the work: its verification forward returns, for every token it commits, the states these
drafters read (``Run.capture``; :meth:`fastverify.models.Transformer.hidden`).

- :class:`Eagle3Drafter` runs the EAGLE-3 layer (:mod:`fastverify.models.eagle3`) with a
  paged cache of its own: one entry per committed position, computed from the target's
  states, then draft entries computed from its own.
- :class:`MedusaDrafter` runs the Medusa heads (:mod:`fastverify.models.medusa`) on the
  final-norm state of the last committed token: head i proposes the token i + 1 places
  after the root.

Chains are sampled from the drafter's temperature-scaled distribution q (greedy: argmax)
and come with q, so any chain rule verifies them. Trees are EAGLE-2 dynamic trees
(:func:`dynamic_tree`): expand the ``topk`` best nodes of each level by cumulative log q,
keep the ``budget − 1`` best nodes; they carry no q and are verified by sample-then-match.
Either way drafts are proposals: verification with the target's full vocabulary decides,
so the output is the target's.
"""

from __future__ import annotations

import os
import time

import torch

from .. import ops
from ..cpu import available as quant_available
from ..models.quantized import weight_rows
from ..models import Step, chain_parents, cu_from_counts
from .drafters import Draft, chain_draft, draft_probs, dynamic_tree, step_cost


def best_nodes(run, tokens: torch.Tensor, parents: torch.Tensor, scores: torch.Tensor):
    """With ``run.adaptive``: the n best-scored nodes of each request's tree (ancestor-closed,
    see :func:`dynamic_tree`), n chosen as the count that pays for its verification: a
    node's score is the drafter's log-probability of its path, exp(score) its guess that the
    target accepts the whole path, so n nodes yield E(n) = 1 + Σ exp(score) tokens per
    forward over B requests at t(B·(n + 1)) (measured forward times); n maximises
    Σ_b E_b(n) / t(B·(n + 1)). Returns (tokens, parents, scores) of the kept nodes."""
    B, N = tokens.shape
    if not run.adaptive or N == 0:
        return tokens, parents, scores
    order = torch.sort(-scores, dim=1, stable=True).indices                        # best first
    gain = scores.gather(1, order).exp().sum(0)                                   # [N] over requests
    expected = B + torch.cat([gain.new_zeros(1), gain.cumsum(0)])                 # [N + 1]
    cost = torch.tensor([step_cost(run.model.step_seconds, B * (n + 1)) for n in range(N + 1)],
                        dtype=expected.dtype)
    n = int((expected.cpu() / cost).argmax())
    if n == N:
        return tokens, parents, scores
    chosen = order[:, :n].sort(dim=1).values                                       # [B, n] tree order
    new_index = torch.zeros(B, N + 1, dtype=torch.long, device=tokens.device)
    new_index.scatter_(1, chosen + 1, torch.arange(1, n + 1, device=tokens.device).expand(B, n))
    return (tokens.gather(1, chosen), new_index.gather(1, parents.gather(1, chosen)), scores.gather(1, chosen))


def _as_draft(tokens: torch.Tensor, parents: torch.Tensor) -> Draft:
    """Tree-local parents (0 = root) -> Draft's convention (node i + 1 hangs off parents[i])."""
    return Draft(tokens.tolist(), parents.tolist())


class _HeadDrafter:
    """What EAGLE-3 and Medusa share: a head over a draft vocabulary (weight [Vd, d] and the
    target id of each row), q for sampled chains, and the target states the run hands over."""

    capture: tuple[int, ...] = ()
    name = "head"

    def chain(self, run, reqs: list[int], k: int) -> Draft:
        return self._for_ready(reqs, lambda act: self._chain(run, act, k))

    def tree(self, run, reqs: list[int], depth: int, topk: int, budget: int) -> Draft:
        return self._for_ready(reqs, lambda act: self._tree(run, act, depth, topk, budget))

    def _for_ready(self, reqs: list[int], draft) -> Draft:
        """``draft(ready requests)``, with empty drafts for the requests that cannot draft yet."""
        act = self._ready(reqs)
        if len(act) == len(reqs):
            return draft(act)
        out = Draft([[] for _ in reqs], [[] for _ in reqs])
        if not act:
            return out
        d = draft(act)
        pos = {b: i for i, b in enumerate(act)}
        for j, b in enumerate(reqs):
            if b in pos:
                out.tokens[j], out.parents[j] = d.tokens[pos[b]], d.parents[pos[b]]
        out.probs = d.probs            # rows of the drafted tokens only, request-major: unchanged
        return out

    def _sample(self, run, reqs: list[int], heads: list[torch.Tensor], next_head) -> Draft:
        """A chain: draft i ~ q at head input ``heads[i]`` (``next_head(i, x)`` computes input
        i + 1 from draft i), keyed by (seed, draw position) like every draw of the run.

        With ``run.adaptive`` the chain stops once a further draft no longer pays for its
        verification: with q_j the drafter's probability of draft j (its guess that the target
        accepts it), i drafts yield E(i) = 1 + Σ_{j≤i} Π_{l≤j} q_l tokens per forward, and
        drafting goes on while E(i) / t(B·(i + 1)) grows (t: measured forward times)."""
        dev = self.weight.device
        idx = torch.tensor(reqs, device=dev)
        temperature, seed = run.temperature[idx], run.seed[idx]
        draws = run.draw_positions(reqs)
        drafts = []
        B = len(reqs)
        expected, path_p = float(B), torch.ones(B, dtype=torch.float64, device=dev)
        rate = expected / step_cost(run.model.step_seconds, B)
        i = 0
        while True:
            x, lp, _ = ops.lm_head_sample(heads[i], self.weight, temperature=temperature, seed=seed,
                                          positions=draws + i, token_map=self.token_map)
            drafts.append(x)
            if run.adaptive:
                path_p = path_p * lp.double().exp()
                expected += float(path_p.sum())
                new_rate = expected / step_cost(run.model.step_seconds, B * (i + 2))
                if new_rate < rate and i > 0:
                    drafts.pop()
                    break
                rate = new_rate
            nxt = next_head(i, x)
            if nxt is None:
                break
            heads.append(nxt)
            i += 1
        k = len(drafts)
        x = torch.stack(drafts, 1)                                         # [B, k]
        q = None
        if bool((temperature > 0).any()):
            q = draft_probs(torch.stack(heads[:k], 1).flatten(0, 1), self.weight, self.token_map, x.flatten(),
                            temperature.repeat_interleave(k), run.model.config.vocab_size)
        return chain_draft(x.tolist(), q)

    def _topk(self, h: torch.Tensor, k: int):
        """(log q [R, k], target ids [R, k]) of the k most likely drafts at head inputs h [R, d]."""
        ids, lp, _ = ops.lm_head_topk(h, self.weight, k, token_map=self.token_map)
        return lp, ids.long()

    def commit(self, run, reqs: list[int]) -> None:
        pass


class Eagle3Drafter(_HeadDrafter):
    """EAGLE-3 drafts from the target's states at three layers (``model.config.aux_layer_ids``).

    The drafter's cache entry at position p is computed from the target's states at p and
    token p + 1; entries for every committed position but the root's come from the target
    (``length[b]`` of them). A draft at depth j sits at position root + j − 1 and reads its
    parent's output as its feature."""

    def __init__(self, model, name: str = "eagle3", quantize: bool = True):
        self.model = model
        self.name = name
        self.quantize = quantize   # on CPU: run the layer on Q8_0 blocks (Eagle3.quantize; modifies model)
        self.capture = tuple(model.config.aux_layer_ids)
        self.level_seconds: float | None = None   # measured time of a tree level past the first (moving average)

    def start(self, run) -> None:
        target, c = run.model, self.model.config
        if c.layer.vocab_size != target.config.vocab_size:
            raise ValueError(f"EAGLE-3 drafter {self.name!r} maps into a vocabulary of {c.layer.vocab_size} "
                             f"tokens; the target has {target.config.vocab_size}")
        if c.d_target != target.config.dim:
            raise ValueError(f"EAGLE-3 drafter {self.name!r} reads target states of size {c.d_target}; the "
                             f"target's hidden size is {target.config.dim}")
        if max(self.capture) > target.config.n_layers:
            raise ValueError(f"EAGLE-3 drafter {self.name!r} reads target layers {self.capture}; the target has "
                             f"{target.config.n_layers}")
        self.model.share_embedding(target.model.embed_tokens)
        if self.model.device.type == "cpu" and self.model.norm.weight.dtype == torch.float32:
            # draft steps on the CPU decode kernels, the layer's weights as Q8_0 blocks
            self.model.use_cpu_kernels()
            if self.quantize and quant_available():
                self.model.quantize()
        self.cache = self.model.new_cache(len(run.tokens), run.max_len + 1, page_size=run.cache.page_size)
        self.length = [0] * len(run.tokens)
        self.weight = self.model.lm_head.weight
        self.token_map = self.model.token_map
        self.run = run

    def _catch_up(self, reqs: list[int]) -> torch.Tensor:
        """Entries for the positions the target committed since the last call; the layer's
        output y at each request's last entry (the root's token) [B, d]. Every request of
        ``reqs`` must have new states (:meth:`_ready`)."""
        run, dev = self.run, self.model.device
        feats, tokens, counts = [], [], []
        for b in reqs:
            f = self.pending.pop(b)
            n = f.shape[0]
            start = self.length[b]
            feats.append(f)
            tokens += run.tokens[b][start + 1:start + 1 + n]
            counts.append(n)
        cu = cu_from_counts(counts, dev)
        idx = torch.tensor(reqs, device=dev)
        prefix = torch.tensor([self.length[b] for b in reqs], dtype=torch.int32, device=dev)
        step = Step.build(self.cache, idx, chain_parents(cu), cu, prefix)
        g = self.model.fuse(torch.cat(feats).to(self.weight.dtype))
        y = self.model(torch.tensor(tokens, device=dev), g, step, self.cache)
        for b, n in zip(reqs, counts):
            self.length[b] += n
        return y[(cu[1:] - 1).long()]

    def _worth_growing(self, run, pool, frontier, budget: int, spent: float) -> bool:
        """Whether another tree level can pay for itself: its nodes add at most the frontier's
        probability mass Σ exp(score) expected tokens (children never outscore their parent)
        for one more level of drafting, so grow while mass / t_level beats the tree's current
        rate E / (t_verify + t_draft) (E, t_verify of the best ``budget − 1`` nodes so far)."""
        if self.level_seconds is None:
            return True
        B, P = frontier.shape[0], pool["size"]
        best = pool["scores"][:, 1:P].topk(min(budget - 1, P - 1), dim=1).values
        expected = B + float(best.exp().sum())
        seconds = step_cost(run.model.step_seconds, B * (best.shape[1] + 1)) + spent
        mass = float(pool["scores"].gather(1, frontier).exp().sum())
        return mass / self.level_seconds > expected / seconds

    def _ready(self, reqs: list[int]) -> list[int]:
        """The requests that can draft: those with target states to start from (a one-token
        prompt has none before its first verification)."""
        self.pending = {}
        for b in reqs:
            _, f = self.run.take_states(b)
            if f.shape[0]:
                self.pending[b] = f
        return [b for b in reqs if b in self.pending]

    def _chain(self, run, reqs: list[int], k: int) -> Draft:
        dev = self.model.device
        idx = torch.tensor(reqs, device=dev)
        y = [self._catch_up(reqs)]
        pos = torch.tensor([self.length[b] for b in reqs], dtype=torch.int32, device=dev)   # d_1's entry
        one = torch.arange(len(reqs) + 1, dtype=torch.int32, device=dev)
        m = self.model

        def next_head(i, x):
            if i + 1 == k:
                return None
            step = Step.build(self.cache, idx, torch.full((len(reqs),), -1, device=dev), one, pos + i)
            y.append(m(x, m.next_feature(y[-1]), step, self.cache))
            return m.head_input(y[-1])

        return self._sample(run, reqs, [m.head_input(y[0])], next_head)

    def _tree(self, run, reqs: list[int], depth: int, topk: int, budget: int) -> Draft:
        dev, m = self.model.device, self.model
        B = len(reqs)
        y_root = self._catch_up(reqs)
        idx = torch.tensor(reqs, device=dev)
        prefix = torch.tensor([self.length[b] - 1 for b in reqs], dtype=torch.int32, device=dev)  # root entry
        ys = y_root.new_zeros(B, 1 + depth * topk * topk, y_root.shape[-1])   # layer output of each run node
        ys[:, 0] = y_root

        started = time.perf_counter()

        def expand(level, frontier, pool):
            F = frontier.shape[1]
            if level > 0:
                if run.adaptive and not self._worth_growing(run, pool, frontier, budget, time.perf_counter() - started):
                    return None
                t0 = time.perf_counter()
                # run the frontier: entries at prefix + pool index, masked to their ancestors
                P = pool["size"]
                cu = torch.arange(B + 1, device=dev, dtype=torch.int32) * P
                parents = pool["parents"][:, :P].flatten()
                rows = (torch.arange(B, device=dev)[:, None] * P + frontier).flatten()
                step = Step.build(self.cache, idx, parents, cu, prefix, rows=rows)
                par = pool["parents"].gather(1, frontier)                               # [B, F]
                feat = m.next_feature(ys.gather(1, par[:, :, None].expand(B, F, ys.shape[-1])))
                tok = pool["tokens"].gather(1, frontier)
                out = m(tok.flatten(), feat.flatten(0, 1), step, self.cache).view(B, F, -1)
                ys.scatter_(1, frontier[:, :, None].expand(B, F, ys.shape[-1]), out)
            h = m.head_input(ys.gather(1, frontier[:, :, None].expand(B, F, ys.shape[-1])))
            lp, tok = self._topk(h.flatten(0, 1), topk)
            if level > 0:
                elapsed = time.perf_counter() - t0
                self.level_seconds = elapsed if self.level_seconds is None else 0.8 * self.level_seconds + 0.2 * elapsed
            return lp.view(B, F, topk), tok.view(B, F, topk)

        tokens, parents, _ = best_nodes(run, *dynamic_tree(expand, B, depth, topk, budget, dev))
        return _as_draft(tokens, parents)


class MedusaDrafter(_HeadDrafter):
    """Medusa heads on the final-norm state of the last committed token; projections through
    the target's LM head rows ``model.token_map`` (all of it when None)."""

    def __init__(self, model, name: str = "medusa"):
        self.model = model
        self.name = name
        self.capture = ()

    def start(self, run) -> None:
        target, c = run.model, self.model.config
        if c.hidden_size != target.config.dim or c.vocab_size != target.config.vocab_size:
            raise ValueError(f"Medusa drafter {self.name!r} is for hidden size {c.hidden_size} and vocabulary "
                             f"{c.vocab_size}; the target has {target.config.dim} and {target.config.vocab_size}")
        V = target.config.vocab_size
        tm = self.model.token_map
        self.token_map = (torch.arange(V) if tm is None else tm).to(target.device)
        if c.shared_head:
            self.weight = weight_rows(target.lm_head, self.token_map).contiguous()
        else:
            raise ValueError("fastverify drafts with shared-head Medusa checkpoints (medusa_shared_head); "
                             "heads with their own vocabulary projection are not wired into decoding")
        self.last = [None] * len(run.tokens)
        self.run = run

    def _ready(self, reqs: list[int]) -> list[int]:
        for b in reqs:
            h, _ = self.run.take_states(b)
            if h.shape[0]:
                self.last[b] = h[-1]
        return [b for b in reqs if self.last[b] is not None]

    def _states(self, reqs: list[int]) -> torch.Tensor:
        """Head states [B, n_heads, d] at each request's last committed token."""
        return self.model(torch.stack([self.last[b] for b in reqs]).float())

    def _chain(self, run, reqs: list[int], k: int) -> Draft:
        s = self._states(reqs)
        k = min(k, s.shape[1])
        return self._sample(run, reqs, [s[:, 0]], lambda i, x: s[:, i + 1] if i + 1 < k else None)

    def _tree(self, run, reqs: list[int], depth: int, topk: int, budget: int) -> Draft:
        s = self._states(reqs)
        B, n = s.shape[:2]
        lp, tok = self._topk(s.flatten(0, 1), topk)
        lp, tok = lp.view(B, n, topk), tok.view(B, n, topk)

        def expand(level, frontier, pool):   # head `level`'s candidates under every frontier node
            F = frontier.shape[1]
            return lp[:, level, None].expand(B, F, topk), tok[:, level, None].expand(B, F, topk)

        tokens, parents, _ = best_nodes(run, *dynamic_tree(expand, B, min(depth, n), topk, budget, s.device))
        return _as_draft(tokens, parents)


# --------------------------------------------------------------------------- checkpoints by name

CHECKPOINTS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "checkpoints")
KINDS = ("eagle3", "medusa")


def _model_name(model) -> str | None:
    """The embedded model's name ("smollm2") when ``model`` was loaded from it, else None."""
    from ..models.loaders import EMBEDDED_MODELS, resolve_source

    source = getattr(model, "source", None)
    for name in EMBEDDED_MODELS:
        try:
            if source is not None and os.path.realpath(resolve_source(name)) == os.path.realpath(source):
                return name
        except FileNotFoundError:
            continue
    return None


def has_committed(model, kind: str) -> bool:
    """Whether fastverify ships a ``kind`` drafter for ``model``."""
    name = _model_name(model)
    return name is not None and os.path.isdir(os.path.join(CHECKPOINTS, f"{name}-{kind}"))


def load_head_drafter(model, drafter: str):
    """``"eagle3"`` / ``"medusa"`` (the committed drafter of ``model``) or a checkpoint folder
    (speculators EAGLE-3, or Medusa in either layout) -> a drafter object."""
    import json

    from ..models.eagle3 import load_eagle3
    from ..models.medusa import load_medusa

    if drafter in KINDS:
        name = _model_name(model)
        path = os.path.join(CHECKPOINTS, f"{name}-{drafter}") if name else None
        if path is None or not os.path.isdir(path):
            raise ValueError(f"no committed {drafter} drafter for this model (fastverify ships them for "
                             f"{', '.join(sorted(n for n in _committed()))}); train one with "
                             f"`fastverify train-drafter --kind {drafter} --out DIR` and pass drafter=DIR")
        label = drafter
    else:
        path, label = os.path.expanduser(drafter), None
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"drafter {drafter!r} is neither a drafter name nor a checkpoint folder with a config.json")
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    if cfg.get("speculators_model_type") == "eagle3":
        return Eagle3Drafter(load_eagle3(path, device=model.device), name=label or "eagle3")
    if "medusa_num_heads" in cfg or cfg.get("model_type") == "medusa":
        return MedusaDrafter(load_medusa(path, device=model.device), name=label or "medusa")
    raise ValueError(f"{path}/config.json is neither an EAGLE-3 (speculators) nor a Medusa checkpoint")


def _committed() -> list[str]:
    if not os.path.isdir(CHECKPOINTS):
        return []
    return sorted(d for d in os.listdir(CHECKPOINTS) if os.path.isdir(os.path.join(CHECKPOINTS, d)))


def is_head_checkpoint(path: str) -> bool:
    """Whether ``path`` is a folder holding an EAGLE-3 (speculators) or Medusa config.json."""
    import json

    config = os.path.join(os.path.expanduser(path), "config.json")
    if not os.path.isfile(config):
        return False
    try:
        with open(config, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return False
    return cfg.get("speculators_model_type") == "eagle3" or "medusa_num_heads" in cfg or cfg.get("model_type") == "medusa"
