"""Batched decoding loops: autoregressive, chain speculation, tree speculation.

Every step has the same shape. Each running request has committed tokens (prompt +
output); all but the last are in the target's KV cache, and the last — the *root* — is
where this step starts:

1. draft: a drafter proposes a chain or a tree after the root (autoregressive: nothing);
2. verify: one target forward over root + draft, one tree per request (``tree_attention``);
3. sample: ``rejection_sample`` (chains; autoregressive = a chain of zero drafts) or
   ``tree_rejection_sample`` (trees) turns the target's logits into 1 + accepted tokens,
   distributed exactly as sampling the target one token at a time. Randomness is keyed
   by (seed, position), so a request's output does not depend on the batch it runs in;
4. commit: append the tokens; the cache keeps root + accepted drafts (trees: moved into
   place by ``compact_kv``) and the last emitted token becomes the next root.

Randomness: the drafter's and the verifier's draws are keyed by (seed, draw position), a
per-request counter that advances past every position a step drew at (its drafts plus
one) — not by the sequence position. Block verification decides with draws at every
draft position, including those past the tokens it accepts; keyed by sequence position,
the next step would reuse them at the same positions and no longer be lossless.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .. import ops
from ..models import Step, chain_parents, cu_from_counts
from .drafters import Draft, ModelDrafter, NgramDrafter, layerskip, record_step_time, step_cost
from .heads import KINDS as HEAD_DRAFTERS, Eagle3Drafter, MedusaDrafter, is_head_checkpoint, load_head_drafter
from .selfspec import KVPolicy, SelfSpecDrafter

METHODS = ("ar", "chain", "tree", "selfspec")


@dataclass
class GenerationStats:
    new_tokens: int = 0          # tokens generated, all requests
    steps: int = 0               # target forwards after the prompt
    seconds: float = 0.0         # wall time of the whole call
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0        # target forwards of the steps
    sample_s: float = 0.0        # rejection sampling + cache compaction
    accepted: list[list[int]] = field(default_factory=list)  # per request: drafts accepted at each step

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def mean_accepted(self) -> float:
        """Drafts accepted per request-step (τ − 1, τ = tokens per target forward)."""
        n = sum(len(a) for a in self.accepted)
        return sum(sum(a) for a in self.accepted) / n if n else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.mean_accepted + 1.0

    def shares(self) -> dict[str, float]:
        """Share of the wall time in prefill, draft, verify and sample."""
        t = self.seconds or 1.0
        return {k: getattr(self, f"{k}_s") / t for k in ("prefill", "draft", "verify", "sample")}

    def as_dict(self) -> dict:
        return {"new_tokens": self.new_tokens, "steps": self.steps, "seconds": self.seconds,
                "tokens_per_s": self.tokens_per_s, "mean_accepted": self.mean_accepted,
                "tokens_per_step": self.tokens_per_step, **{f"{k}_share": v for k, v in self.shares().items()}}


@dataclass
class GenerationResult:
    tokens: list[list[int]]      # generated ids per prompt, prompt excluded
    texts: list[str]
    stats: GenerationStats
    prompt_tokens: list[list[int]]


class Run:
    """The state of one batched generation: committed tokens, target cache, sampling
    parameters (``[B]`` tensors) and which requests still run."""

    def __init__(self, model, prompts: list[list[int]], *, max_new_tokens: int, temperature, top_k, top_p, seed,
                 stop_ids, headroom: int, page_size: int = 16):
        B = len(prompts)
        dev = model.device
        self.model = model
        self.tokens = [list(p) for p in prompts]
        self.prompt_lens = [len(p) for p in prompts]
        self.max_new_tokens = max_new_tokens
        self.max_len = max(self.prompt_lens) + max_new_tokens + headroom
        if self.max_len > model.config.max_seq_len:
            raise ValueError(f"the longest prompt ({max(self.prompt_lens)} tokens) + max_new_tokens "
                             f"({max_new_tokens}) + draft headroom ({headroom}) exceeds the model's context of "
                             f"{model.config.max_seq_len} tokens")
        self.cache = model.new_cache(B, self.max_len, page_size=page_size)
        self.cache_len = [0] * B
        self.done = [False] * B
        self.stop_ids = set(stop_ids)
        self.temperature = _per_request(temperature, B, torch.float32, dev, "temperature")
        self.top_k = _per_request(top_k, B, torch.int32, dev, "top_k")
        self.top_p = _per_request(top_p, B, torch.float32, dev, "top_p")
        self.seed = _per_request(seed, B, torch.int64, dev, "seed")
        if not bool(torch.isfinite(self.temperature).all()) or bool((self.temperature < 0).any()):
            raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {self.temperature.tolist()}")
        if bool((self.top_k < 0).any()):
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k.tolist()}")
        if not bool(((self.top_p > 0) & (self.top_p <= 1)).all()):
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p.tolist()}")
        self.seed_base = int(self.seed[0])
        # the next unused draw position of each request (see the module docstring)
        self.draws = [0] * B
        self.filter_k = bool((self.top_k > 0).any())
        self.filter_p = bool((self.top_p < 1).any())
        self.stats = GenerationStats(accepted=[[] for _ in range(B)])
        self.draft_length: DraftLength | None = None  # set for free (n-gram) chain drafts
        self.adaptive = True   # drafters size their drafts by the cost model (generate's `adaptive`)
        # target states a drafter reads (EAGLE-3, Medusa): the layer ids it asks the target to
        # capture (None: nothing kept), and per request the (final-norm h, captured features)
        # of the committed tokens the drafter has not taken yet, in position order
        self.capture: tuple[int, ...] | None = None
        self.states: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(B)]

    def take_states(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The target states of request b's committed tokens not taken yet: (h [n, d], feats [n, F])."""
        parts, self.states[b] = self.states[b], []
        if not parts:
            dev, d = self.model.device, self.model.config.dim
            return torch.zeros(0, d, device=dev), torch.zeros(0, d * len(self.capture or ()), device=dev)
        return torch.cat([h for h, _ in parts]), torch.cat([f for _, f in parts])

    def draw_positions(self, reqs: list[int]) -> torch.Tensor:
        """[len(reqs)] int64: the draw position of each request's first draft this step."""
        return torch.tensor([self.draws[b] for b in reqs], dtype=torch.int64, device=self.model.device)

    def running(self) -> list[int]:
        return [b for b in range(len(self.tokens)) if not self.done[b]]

    def sampling(self, reqs: list[int]) -> dict:
        idx = torch.tensor(reqs, device=self.model.device)
        return dict(temperature=self.temperature[idx], top_k=self.top_k[idx] if self.filter_k else None,
                    top_p=self.top_p[idx] if self.filter_p else None, seed=self.seed[idx])

    def emit(self, b: int, new: list[int]) -> list[int]:
        """Append a step's tokens, cut at a stop token or the token budget; returns those kept."""
        room = self.prompt_lens[b] + self.max_new_tokens - len(self.tokens[b])
        kept = []
        for t in new[:room]:
            kept.append(t)
            if t in self.stop_ids:
                break
        self.tokens[b] += kept
        if len(kept) == room or (kept and kept[-1] in self.stop_ids):
            self.done[b] = True
        return kept


def _per_request(value, B: int, dtype, device, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        t = value.to(device=device, dtype=dtype).flatten()
    elif isinstance(value, (list, tuple)):
        t = torch.tensor(value, dtype=dtype, device=device)
    else:
        t = torch.full((B,), value, dtype=dtype, device=device)
    if t.numel() != B:
        raise ValueError(f"{name} must be a scalar or one value per prompt ({B}), got {t.numel()} values")
    return t


PREFILL_CHUNK = 512  # tokens per request per prefill forward: bounds the [nodes, keys] attention scores


def prefill(run: Run) -> None:
    """Put every prompt but its last token (the first root) into the cache, as one chain
    per request, ``PREFILL_CHUNK`` tokens at a time."""
    dev = run.model.device
    no_logits = torch.zeros(0, dtype=torch.long, device=dev)
    while True:
        reqs = [b for b in range(len(run.tokens)) if run.cache_len[b] < run.prompt_lens[b] - 1]
        if not reqs:
            return
        feed = [run.tokens[b][run.cache_len[b]:run.prompt_lens[b] - 1][:PREFILL_CHUNK] for b in reqs]
        cu = cu_from_counts([len(f) for f in feed], dev)
        step = Step.build(run.cache, torch.tensor(reqs, device=dev), chain_parents(cu), cu,
                          torch.tensor([run.cache_len[b] for b in reqs], dtype=torch.int32, device=dev))
        tokens = torch.tensor([t for f in feed for t in f], device=dev)
        if run.capture is None:
            run.model(tokens, step, run.cache, logit_rows=no_logits)
        else:
            h, feats = run.model.hidden(tokens, step, run.cache, capture=run.capture)
            for b, lo, hi in zip(reqs, cu[:-1].tolist(), cu[1:].tolist()):
                run.states[b].append((h[lo:hi], feats[lo:hi]))
        for b, f in zip(reqs, feed):
            run.cache_len[b] += len(f)


class DraftLength:
    """Cost-aware length of free (n-gram) chain drafts.

    Verifying k drafts costs a target forward over k + 1 tokens per request, and on a
    CPU that grows with k (2 rows ≈ 1.1×, 8 rows ≈ 2.5× one row for SmolLM2 on 2 cores).
    With α_j the measured rate at which the j-th draft is accepted given the ones before
    it, k drafts yield E(k) = 1 + Σ_{j≤k} Π_{i≤j} α_i tokens per step; the step keeps the
    k ≤ k_max that maximises E(k) / t(B·(k + 1)), t measured per total token count
    (before a count is measured: t(1)·(1 + 0.25·(tokens − 1))). Forward times are a
    property of the model on its machine, so they carry over from run to run
    (``seconds``, kept on the model); acceptance rates belong to one run's text."""

    def __init__(self, k_max: int, seconds: dict[int, float] | None = None):
        self.k_max = k_max
        self.tried = [0.0] * (k_max + 1)   # drafts at depth j that were checked (decayed counts)
        self.taken = [0.0] * (k_max + 1)   # ... and accepted
        self.seconds = {} if seconds is None else seconds

    def accept_rate(self, j: int) -> float:
        # prior 0.8 (worth 5 drafts): an n-gram match is evidence that copying has begun
        return (self.taken[j] + 4) / (self.tried[j] + 5)

    def cost(self, tokens: int) -> float:
        return step_cost(self.seconds, tokens)

    def choose(self, batch: int) -> int:
        # forget slowly, so that a run that stopped drafting (k = 0) tries again later
        self.tried = [0.97 * t for t in self.tried]
        self.taken = [0.97 * t for t in self.taken]
        best, best_rate, expected, p = 0, 1.0 / self.cost(batch), 1.0, 1.0
        for k in range(1, self.k_max + 1):
            p *= self.accept_rate(k)
            expected += p
            rate = expected / self.cost(batch * (k + 1))
            if rate > best_rate:
                best, best_rate = k, rate
        return best

    def record(self, drafted: list[int], accepted: list[int]) -> None:
        for k, a in zip(drafted, accepted):
            for j in range(1, min(a + 1, k) + 1):
                self.tried[j] += 1
                self.taken[j] += j <= a


def verify_step(run: Run, reqs: list[int], draft: Draft, tree: bool, rule: Rule | None = None) -> list[list[int]]:
    """One target forward over root + draft of each running request, then sampling by the
    verification ``rule`` (default: the op's). Returns the tokens each request emits (1 + accepted)."""
    rule = rule or Rule()
    model, dev = run.model, run.model.device
    stats = run.stats
    roots = [run.tokens[b][-1] for b in reqs]
    counts = [1 + len(t) for t in draft.tokens]
    cu = cu_from_counts(counts, dev)
    tokens = torch.tensor([t for r, d in zip(roots, draft.tokens) for t in [r] + d], device=dev)
    parents = torch.tensor([p for ps in draft.parents for p in [-1] + ps], device=dev)
    prefix = torch.tensor([run.cache_len[b] for b in reqs], dtype=torch.int32, device=dev)
    idx = torch.tensor(reqs, device=dev)

    t0 = time.perf_counter()
    step = Step.build(run.cache, idx, parents, cu, prefix)
    if run.capture is None:
        logits = model(tokens, step, run.cache)                       # [T, V]
    else:                                                             # the drafter reads target states
        h, feats = model.hidden(tokens, step, run.cache, capture=run.capture)
        logits = model.lm_head(h)
    t1 = time.perf_counter()
    stats.verify_s += t1 - t0
    verify_seconds = t1 - t0

    positions = run.draw_positions(reqs)                             # keys the draws (module docstring)
    max_len = max(counts) - 1
    depth = _depths(draft.parents)
    if tree:
        accepted_nodes, out, num = ops.tree_rejection_sample(
            logits, tokens, parents, cu, draft_probs=draft.probs, positions=positions, max_depth=max(depth),
            verify=rule.tree, **run.sampling(reqs))
        run.cache.compact(idx, prefix, accepted_nodes, num)
    else:
        out, num = ops.rejection_sample(
            logits, tokens[_draft_rows(counts, dev)], cu_from_counts([c - 1 for c in counts], dev),
            draft_probs=draft.probs, positions=positions, max_draft_len=max_len, **rule.chain_kwargs(),
            **run.sampling(reqs))
    if run.capture is not None:
        # keep the states of root + accepted drafts (the rows of the accepted path)
        first = cu[:-1].long()
        if tree:
            rows = first[:, None] + accepted_nodes.long()
        else:
            rows = first[:, None] + torch.arange(max_len + 1, device=dev)
        for i, (b, n) in enumerate(zip(reqs, num.tolist())):
            r = rows[i, :n + 1]
            run.states[b].append((h[r], feats[r]))
    out, num = out.tolist(), num.tolist()
    stats.sample_s += time.perf_counter() - t1
    emitted = []
    for i, b in enumerate(reqs):
        run.cache_len[b] += 1 + num[i]                                # root + accepted drafts
        run.draws[b] += depth[i] + 1                                  # every position this step drew at
        stats.accepted[b].append(num[i])
        emitted.append(out[i][:num[i] + 1])
    stats.steps += 1
    record_step_time(model.step_seconds, sum(counts), verify_seconds)
    if run.draft_length is not None:
        run.draft_length.record([c - 1 for c in counts], num)
    return emitted


def _draft_rows(counts: list[int], device) -> torch.Tensor:
    """Rows of the flattened root + draft tokens that are drafts (every row but each root)."""
    is_root = torch.zeros(sum(counts), dtype=torch.bool, device=device)
    is_root[cu_from_counts(counts, device)[:-1].long()] = True
    return (~is_root).nonzero()[:, 0]


def _depths(parents: list[list[int]]) -> list[int]:
    """Depth of the deepest node of each draft tree (the root has depth 0)."""
    out = []
    for ps in parents:
        d = [0]
        for p in ps:
            d.append(d[p] + 1)
        out.append(max(d))
    return out


# generate()'s drafter options beyond its own keyword arguments, with their defaults
OPTIONS = dict(draft_layers=None, ngram_max=3, ngram_min=1, ngram_branches=4, frspec_vocab=None, frspec_ranking=None,
               kv_policy="topk", kv_budget=256, kv_chunk=16, kv_sink=1, kv_recent=1, kv_refresh=8,
               typical_eps=ops.TYPICAL_EPS, typical_delta=ops.TYPICAL_DELTA)

# generate()'s default verification rules (verify=None), chosen from the measurements in
# docs/decoding.md (perf/verify_rules_exact.py, perf/verify_rules_e2e.py on SmolLM2):
# block verification accepted +0.004 to +0.095 tokens per forward more than the token rule
# on the same steps (never fewer) for one more pass over the draft rows; over n i.i.d. paths
# multi-path block verification beat SpecInfer's recursive rejection on the same drafts at
# every n and temperature measured, and i.i.d. paths drafted faster than paths drawn without
# replacement (stochastic beam search) for similar tokens per forward.
DEFAULT_CHAIN_RULE = "block"
DEFAULT_PATHS_RULE = "block"


@dataclass
class Rule:
    """The verification rule of a run: ``chain`` for rejection_sample, ``tree`` for
    tree_rejection_sample (typical's ε, δ with it)."""

    chain: str = "token"
    tree: str = "specinfer"
    typical_eps: float = ops.TYPICAL_EPS
    typical_delta: float = ops.TYPICAL_DELTA

    def chain_kwargs(self) -> dict:
        kw = dict(verify=self.chain)
        if self.chain == "typical":
            kw.update(typical_eps=self.typical_eps, typical_delta=self.typical_delta)
        return kw

    @property
    def lossy(self) -> bool:
        return self.chain in ops.LOSSY_RULES


def resolve_rule(method: str, verify: str | None, tree_paths: int | None, draft_obj, eps: float,
                 delta: float) -> Rule:
    """The Rule of generate()'s arguments, with errors that name them."""
    if method == "tree":
        if tree_paths is None:
            if verify not in (None, "specinfer"):
                raise ValueError(f"verify={verify!r} on trees verifies multi-path drafts: pass tree_paths=n (n paths "
                                 "of tree_depth tokens with their draft probabilities); the default trees (EAGLE-style "
                                 "top-k expansion, n-gram tries) carry none and are verified by 'specinfer'")
            return Rule(tree="specinfer")
        if verify is None:
            verify = DEFAULT_PATHS_RULE
        if verify not in ops.TREE_RULES:
            raise ValueError(f"verify must be one of {', '.join(map(repr, ops.TREE_RULES))} for method='tree', "
                             f"got {verify!r}")
        return Rule(tree=verify)
    if verify is None:
        verify = DEFAULT_CHAIN_RULE
    if verify not in ops.CHAIN_RULES:
        raise ValueError(f"verify must be one of {', '.join(map(repr, ops.CHAIN_RULES))} for method={method!r}, "
                         f"got {verify!r}")
    if tree_paths is not None:
        raise ValueError(f"tree_paths applies to method='tree', not method={method!r}")
    return Rule(chain=verify, typical_eps=eps, typical_delta=delta)


def make_drafter(model, drafter, **options):
    """``None``/"layerskip"/"ngram"/a model/a drafter object -> a drafter. A model drafter
    gets a frequency-ranked head of ``frspec_vocab`` tokens when that option is set."""
    options = {**OPTIONS, **options}
    if drafter == "ngram":
        if options["frspec_vocab"]:
            raise ValueError("frspec_vocab needs a model drafter (layerskip or a model); the n-gram drafter has no head")
        return NgramDrafter(max_ngram=options["ngram_max"], min_ngram=options["ngram_min"],
                            branches=options["ngram_branches"])
    if isinstance(drafter, (NgramDrafter, ModelDrafter, Eagle3Drafter, MedusaDrafter)):
        return drafter
    if isinstance(drafter, str) and (drafter in HEAD_DRAFTERS or is_head_checkpoint(drafter)):
        if options["frspec_vocab"]:
            raise ValueError(f"frspec_vocab applies to model drafters; {drafter!r} drafts over its own vocabulary")
        return load_head_drafter(model, drafter)
    if drafter is None or drafter == "layerskip":
        return layerskip(model, options["draft_layers"], head=ranked_head(model, model, **options))
    if isinstance(drafter, torch.nn.Module):
        return ModelDrafter(drafter, head=ranked_head(model, drafter, **options))
    raise ValueError(f"drafter must be None, 'layerskip', 'ngram', 'eagle3', 'medusa', a checkpoint folder, a model "
                     f"or a drafter object, got {drafter!r}")


def ranked_head(target, draft_model, *, frspec_vocab: int | None = None, frspec_ranking=None, **_):
    """The drafter's frequency-ranked head of the ``frspec_vocab`` most frequent tokens of
    ``frspec_ranking`` (a :class:`fastverify.frspec.Ranking`, e.g.
    ``fastverify.frspec.default_ranking(target)``); None when ``frspec_vocab`` is unset.
    Decoding only reads the ranking it is given: building one (from text the target
    generates, or a corpus) is :mod:`fastverify.frspec`'s, one layer up."""
    if not frspec_vocab:
        return None
    if frspec_ranking is None or not hasattr(frspec_ranking, "ranked_head"):
        raise ValueError("frspec_vocab needs frspec_ranking: a fastverify.frspec.Ranking, e.g. "
                         "fastverify.frspec.default_ranking(model) or fastverify.frspec.Ranking.load(path, tokenizer)")
    return frspec_ranking.ranked_head(draft_model, frspec_vocab)


def encode_prompts(model, prompts, chat: bool = True) -> list[list[int]]:
    """Strings (chat template applied when the tokenizer has one and ``chat``) or id lists."""
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings or of token-id lists")
    tok = model.tokenizer
    V = model.config.vocab_size
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tok is None:
                raise ValueError("string prompts need a model with a tokenizer; pass token-id lists instead")
            if chat and tok.has_chat_template:
                p = tok.apply_chat_template(p)
                ids = tok.encode(p, add_bos=False)
            else:
                ids = tok.encode(p)
        else:
            ids = [int(t) for t in p]
        if not ids:
            raise ValueError(f"prompt {i} is empty")
        if min(ids) < 0 or max(ids) >= V:
            raise ValueError(f"prompt {i} holds a token id outside [0, {V})")
        out.append(ids)
    return out


@torch.no_grad()
def generate(model, prompts, *, method: str = "ar", drafter=None, max_new_tokens: int = 64, temperature=0.0,
             top_k=0, top_p=1.0, seed=0, chat: bool = True, num_draft: int | None = None, tree_depth: int = 5,
             tree_topk: int = 4, tree_nodes: int = 32, tree_paths: int | None = None, verify: str | None = None,
             stop_at_eos: bool = True, on_tokens=None, page_size: int = 16, adaptive: bool = True,
             **options) -> GenerationResult:
    """Generate continuations of ``prompts`` with ``model``, batched and lossless.

    Args:
        method: "ar" (one token per forward), "chain" (up to ``num_draft`` drafted tokens
            verified per forward; default 10 for n-gram drafts, 4 for model drafts), "tree" (a
            draft tree of at most ``tree_nodes`` nodes, ``tree_depth`` levels, ``tree_topk``
            children per expanded node) or "selfspec" (the target drafts ``num_draft`` tokens
            for itself over ``kv_budget`` tokens of its own cache, ``kv_policy`` "topk" or
            "streaming", ``kv_chunk`` tokens per chunk, re-selected every ``kv_refresh`` drafts;
            see :mod:`fastverify.decoding.selfspec`; ``method="tree", drafter="selfspec"``
            verifies a tree of its top ``tree_topk`` tokens at each of ``tree_depth`` levels).
        drafter: "layerskip" (default; the target on a subset of its layers,
            ``draft_layers=[...]``), "ngram" (prompt lookup), "eagle3" / "medusa" (the
            drafters trained for the model and shipped with fastverify, see
            :mod:`fastverify.decoding.heads`), an EAGLE-3 (speculators) or Medusa checkpoint
            folder, or a model sharing the target's tokenizer. A model drafter takes
            ``frspec_vocab=N`` (draft over the N most frequent tokens of ``frspec_ranking``
            only: FR-Spec, see :func:`ranked_head`); verification still sees the full vocabulary.
        temperature, top_k, top_p, seed: scalars or one value per prompt; temperature 0
            is greedy.
        on_tokens: ``callback(request, new_ids)`` after every step (streaming).
        adaptive: n-gram chains draft up to ``num_draft`` tokens, as many as pay for
            their verification (:class:`DraftLength`); EAGLE-3 / Medusa chains stop, and their
            trees keep the best nodes, where the drafter's own probabilities say further
            drafts no longer pay (:func:`fastverify.decoding.heads.best_nodes`). False always
            drafts ``num_draft`` / verifies ``tree_nodes``.
        tree_paths: with ``method="tree"`` and a model drafter, draft ``tree_paths`` paths of
            ``tree_depth`` tokens (with their draft probabilities) instead of a top-k tree:
            drawn without replacement (Gumbel-top-n) for ``verify="block_wor"``, i.i.d. for
            "block" and "specinfer" (see :meth:`ModelDrafter.paths`).
        verify: the verification rule. Chains: "token", "block" or "typical" (Medusa's typical
            acceptance: **lossy**, with options ``typical_eps`` / ``typical_delta``); default
            ``DEFAULT_CHAIN_RULE``. Trees: "specinfer" (the default for top-k / n-gram trees),
            "block" or "block_wor" (multi-path block verification of ``tree_paths`` paths;
            default ``DEFAULT_PATHS_RULE``). Every rule but "typical" emits the target's law.

    Returns:
        :class:`GenerationResult` with ``.tokens`` (new ids per prompt), ``.texts`` and ``.stats``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}; generate() takes {', '.join(OPTIONS)} besides its "
                         "keyword arguments")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    ids = encode_prompts(model, prompts, chat)
    tree = method == "tree"
    if method == "selfspec" or (drafter == "selfspec" and method in ("chain", "tree")):
        if drafter not in (None, "selfspec"):
            raise ValueError(f"method 'selfspec' drafts with the target itself; drafter must be None, got {drafter!r}")
        o = {**OPTIONS, **options}
        draft_obj = SelfSpecDrafter(model, KVPolicy(o["kv_policy"], o["kv_budget"], o["kv_chunk"], o["kv_sink"],
                                                    o["kv_recent"], o["kv_refresh"]),
                                    head=ranked_head(model, model, **o))
    else:
        draft_obj = make_drafter(model, drafter, **options) if method != "ar" else None
    o = {**OPTIONS, **options}
    rule = resolve_rule(method, verify, tree_paths, draft_obj, o["typical_eps"], o["typical_delta"])
    if tree_paths is not None:
        if isinstance(tree_paths, bool) or not isinstance(tree_paths, int) or not 1 <= tree_paths <= 16:
            raise ValueError(f"tree_paths must be an int in [1, 16], got {tree_paths!r}")
        if not isinstance(draft_obj, ModelDrafter):
            raise ValueError("tree_paths needs a model drafter (layerskip, selfspec or a model): multi-path "
                             "verification weighs each path by the drafter's probabilities, which n-gram drafts lack")
    if num_draft is None:
        num_draft = 10 if isinstance(draft_obj, NgramDrafter) else 4
    if tree and not 1 <= tree_nodes <= 256:
        raise ValueError(f"tree_nodes must be in [1, 256], got {tree_nodes}")
    headroom = (1 + (num_draft if method in ("chain", "selfspec") else 0)
                + (tree_depth * tree_topk * tree_topk + tree_nodes if tree else 0)
                + (tree_depth * tree_paths if tree_paths else 0))
    stop_ids = set(model.config.eos_ids) if stop_at_eos else set()
    t_start = time.perf_counter()
    run = Run(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
              seed=seed, stop_ids=stop_ids, headroom=headroom, page_size=page_size)
    if draft_obj is not None:
        draft_obj.start(run)
        run.capture = getattr(draft_obj, "capture", None)
    run.adaptive = adaptive
    if method == "chain" and isinstance(draft_obj, NgramDrafter) and adaptive:
        run.draft_length = DraftLength(num_draft, model.step_seconds)
    stats = run.stats
    prefill(run)
    stats.prefill_s = time.perf_counter() - t_start
    while True:
        reqs = run.running()
        if not reqs:
            break
        t0 = time.perf_counter()
        if method == "ar":
            draft = Draft([[] for _ in reqs], [[] for _ in reqs])
        elif tree and tree_paths:
            draft = draft_obj.paths(run, reqs, tree_paths, tree_depth, without_replacement=rule.tree == "block_wor",
                                    repeat_leaves=rule.tree == "block")
        elif tree:
            draft = draft_obj.tree(run, reqs, tree_depth, tree_topk, tree_nodes)
        else:
            k = run.draft_length.choose(len(reqs)) if run.draft_length is not None else num_draft
            draft = draft_obj.chain(run, reqs, k) if k else Draft([[] for _ in reqs], [[] for _ in reqs])
        stats.draft_s += time.perf_counter() - t0
        emitted = verify_step(run, reqs, draft, tree, rule)
        for b, new in zip(reqs, emitted):
            kept = run.emit(b, new)
            stats.new_tokens += len(kept)
            if on_tokens is not None and kept:
                on_tokens(b, kept)
        if draft_obj is not None:
            draft_obj.commit(run, reqs)
    stats.seconds = time.perf_counter() - t_start
    new = [run.tokens[b][run.prompt_lens[b]:] for b in range(len(ids))]
    tok = model.tokenizer
    texts = [tok.decode(t) if tok is not None else "" for t in new]
    return GenerationResult(new, texts, stats, ids)
