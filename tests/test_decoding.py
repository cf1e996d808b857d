"""Decoding loops on tiny random models: lossless, measured.

- greedy: every method and drafter emits exactly the autoregressive baseline's tokens,
  and the baseline emits exactly Hugging Face transformers' greedy ``generate``;
- sampling: over thousands of seeds, the first two generated tokens follow the exact
  law p(a | prompt) · p(b | prompt, a) of the processed target (chi-squared), for every
  method and drafter, with and without top-k/top-p;
- a request's sampled tokens do not depend on the batch it runs in (autoregressive);
- bad input fails before any work.
"""

import importlib

import numpy as np
import pytest
import torch
import transformers

import naive
from law import assert_law

from fastverify import frspec
from fastverify.decoding import ModelDrafter, NgramDrafter, generate, layerskip
from fastverify.models import from_state_dict

CONFIGS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {"tie_word_embeddings": True}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {}),
}


def tiny(arch="llama", vocab=64, layers=4, seed=0, sharpen=3.0):
    """A random model whose weights are scaled up so its next-token laws are peaked
    (a drafter then agrees with it often enough to exercise acceptance)."""
    cfg_cls, model_cls, extra = CONFIGS[arch]
    cfg = cfg_cls(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256, **extra)
    torch.manual_seed(seed)
    hf = model_cls(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or "bias" in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.2)
            else:
                p.mul_(sharpen)
    return hf, from_state_dict(cfg.to_dict(), hf.state_dict())


PROMPTS = [[1, 2, 3, 4, 5, 1, 2, 3], [7], [9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9], [3, 1, 4, 1, 5, 9, 2, 6]]
METHODS = [("chain", "layerskip"), ("chain", "ngram"), ("chain", "model"), ("tree", "layerskip"), ("tree", "ngram"),
           ("tree", "model"), ("chain", "model+frspec"), ("tree", "layerskip+frspec")]


def ranked(model, vocab):
    """A frequency-ranked head over 5/8 of the vocabulary, in a shuffled order (the subset
    misses tokens the target emits, so verification must repair the drafts)."""
    order = torch.randperm(vocab, generator=torch.Generator().manual_seed(5))[: vocab * 5 // 8]
    return frspec.ranked_head(model, order)


def drafter_of(name, target, vocab=64):
    if name in ("model", "model+frspec"):
        draft = tiny("llama", vocab=vocab, layers=2, seed=1)[1]
        return ModelDrafter(draft, head=ranked(draft, vocab) if name.endswith("frspec") else None)
    if name == "layerskip+frspec":
        return layerskip(target, head=ranked(target, vocab))
    return name


@pytest.fixture(scope="module", params=list(CONFIGS))
def model_pair(request):
    return tiny(request.param)


def test_ar_greedy_equals_transformers(model_pair):
    hf, model = model_pair
    ours = generate(model, PROMPTS, max_new_tokens=24, stop_at_eos=False).tokens
    for prompt, got in zip(PROMPTS, ours):
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, len(prompt):].tolist()
        assert got == want


@pytest.mark.parametrize("method,drafter", METHODS)
def test_speculative_greedy_equals_autoregressive(model_pair, method, drafter):
    _, model = model_pair
    base = generate(model, PROMPTS, max_new_tokens=24, stop_at_eos=False)
    spec = generate(model, PROMPTS, method=method, drafter=drafter_of(drafter, model), max_new_tokens=24,
                    stop_at_eos=False, num_draft=3, tree_depth=3, tree_topk=3, tree_nodes=12)
    assert spec.tokens == base.tokens
    assert spec.stats.steps <= base.stats.steps
    assert all(a <= (3 if method == "chain" else 11) for acc in spec.stats.accepted for a in acc)


PATH_RULES = ["specinfer", "block", "block_wor"]


@pytest.mark.parametrize("drafter", ["layerskip", "model"])
@pytest.mark.parametrize("verify", PATH_RULES)
def test_multi_path_greedy_equals_autoregressive(model_pair, drafter, verify):
    """n paths of depth d (beam search for greedy requests), verified by every tree rule."""
    _, model = model_pair
    base = generate(model, PROMPTS, max_new_tokens=24, stop_at_eos=False)
    spec = generate(model, PROMPTS, method="tree", drafter=drafter_of(drafter, model), tree_paths=3, tree_depth=3,
                    verify=verify, max_new_tokens=24, stop_at_eos=False)
    assert spec.tokens == base.tokens
    assert all(a <= 3 for acc in spec.stats.accepted for a in acc)


@pytest.mark.parametrize("verify", ["token", "block", "typical"])
def test_chain_rules_greedy_equal_autoregressive(model_pair, verify):
    """At temperature 0 every chain rule accepts the drafts equal to the argmax."""
    _, model = model_pair
    base = generate(model, PROMPTS, max_new_tokens=16, stop_at_eos=False)
    spec = generate(model, PROMPTS, method="chain", drafter="layerskip", verify=verify, num_draft=3,
                    max_new_tokens=16, stop_at_eos=False)
    assert spec.tokens == base.tokens


def test_multi_path_drafts_are_the_paths_drawn():
    """ModelDrafter.paths: n paths of depth d per request, every leaf at depth d, leaves in
    draw order; draft probabilities on every inner node (a distribution), zeros at leaves;
    i.i.d. repeats kept as repeated leaves only when asked; without replacement: n distinct
    paths."""
    from fastverify.decoding.generate import Run
    _, model = tiny("llama", vocab=16, layers=2, sharpen=0.7, seed=5)
    for wor, repeat in ((False, True), (False, False), (True, False)):
        run = Run(model, [[1, 2, 3], [4, 5]], max_new_tokens=8, temperature=[1.0, 1.0], top_k=0, top_p=1.0,
                  seed=[7, 8], stop_ids=(), headroom=40)
        drafter = layerskip(model, [0])
        drafter.start(run)
        d = drafter.paths(run, [0, 1], 4, 3, without_replacement=wor, repeat_leaves=repeat)
        offset = 0
        for toks, pars in zip(d.tokens, d.parents):
            nodes = len(toks) + 1
            depth = [0] * nodes
            for j, p in enumerate(pars, 1):
                depth[j] = depth[p] + 1
            leaves = [j for j in range(nodes) if j not in pars]
            assert {depth[j] for j in leaves} == {3}
            assert len(leaves) == 4 if (wor or repeat) else 1 <= len(leaves) <= 4
            rows = d.probs[offset:offset + nodes]
            inner = [j for j in range(nodes) if j in pars]
            assert torch.allclose(rows[inner].sum(1), torch.ones(len(inner)), atol=1e-4)
            assert (rows[leaves] == 0).all()
            paths = set()
            for leaf in leaves:
                path, j = [], leaf
                while j:
                    path.append(toks[j - 1])
                    j = pars[j - 1]
                paths.add(tuple(path))
            if wor:
                assert len(paths) == 4
            offset += nodes


def test_layerskip_drafts_get_accepted():
    """A drafter sharing most of the target's computation must actually be accepted:
    otherwise the greedy-equality tests would pass with a drafter that never helps."""
    _, model = tiny("llama", layers=4, sharpen=2.0)
    r = generate(model, PROMPTS, method="chain", drafter="layerskip", draft_layers=[0, 1, 3], max_new_tokens=24,
                 stop_at_eos=False, num_draft=3)
    assert r.stats.mean_accepted > 0.3


def test_stop_tokens_and_budget():
    _, model = tiny("llama")
    base = generate(model, PROMPTS, max_new_tokens=16, stop_at_eos=False).tokens
    stop = base[0][5]
    model.config.eos_ids = (stop,)
    try:
        for method, drafter in [("ar", None), ("chain", "layerskip"), ("tree", "layerskip")]:
            r = generate(model, PROMPTS, method=method, drafter=drafter, max_new_tokens=16)
            for full, got in zip(base, r.tokens):
                cut = full.index(stop) + 1 if stop in full else len(full)
                assert got == full[:cut]
    finally:
        model.config.eos_ids = ()


# ----------------------------------------------------------------------------- sampling

V_SMALL = 8
SAMPLES = 4000


@pytest.fixture(scope="module")
def small():
    hf, model = tiny("llama", vocab=V_SMALL, layers=2, sharpen=1.5, seed=3)
    return model


def exact_pair_law(model, prompt, temperature, top_k, top_p):
    """law[a, b] = p(a | prompt) p(b | prompt, a), target processed (float64 oracle)."""
    with torch.no_grad():
        ctx = torch.tensor([prompt + [a] for a in range(V_SMALL)])
        logits = model.score(ctx).double()                      # [V, L+1, V]
    p1 = np.array(naive.target_probs(logits[0, -2].tolist(), temperature, top_k, top_p))
    p2 = np.array([naive.target_probs(logits[a, -1].tolist(), temperature, top_k, top_p) for a in range(V_SMALL)])
    return p1[:, None] * p2


RULE_RUNS = [("chain", "layerskip", False, dict(verify="token")), ("chain", "model", True, dict(verify="block")),
             ("tree", "layerskip", False, dict(tree_paths=3, verify="specinfer")),
             ("tree", "layerskip", False, dict(tree_paths=3, verify="block")),
             ("tree", "model", True, dict(tree_paths=2, verify="block_wor"))]


@pytest.mark.slow
@pytest.mark.parametrize("method,drafter,filters,extra", [("ar", None, False, {}), ("ar", None, True, {})] +
                         [(m, d, False, {}) for m, d in METHODS] + [("chain", "model", True, {}),
                                                                    ("tree", "layerskip", True, {})] + RULE_RUNS)
def test_sampling_follows_the_target_law(small, method, drafter, filters, extra):
    prompt = [1, 2, 1, 2, 1]
    temperature, top_k, top_p = (0.9, 5, 0.9) if filters else (1.0, 0, 1.0)
    law = exact_pair_law(small, prompt, temperature, top_k, top_p)
    r = generate(small, [prompt] * SAMPLES, method=method, drafter=drafter_of(drafter, small, V_SMALL), max_new_tokens=2,
                 stop_at_eos=False, temperature=temperature, top_k=top_k, top_p=top_p,
                 seed=list(range(SAMPLES)), num_draft=2, tree_depth=2, tree_topk=3, tree_nodes=8, **extra)
    pairs = np.zeros((V_SMALL, V_SMALL))
    for t in r.tokens:
        pairs[t[0], t[1]] += 1
    assert_law(pairs, law, f"{method}/{drafter} token pairs")
    assert_law(pairs.sum(1), law.sum(1), f"{method}/{drafter} first token")


class LyingDrafter(ModelDrafter):
    """Samples drafts from its model but reports a flattened q to the verifier."""

    def chain(self, run, reqs, k):
        draft = super().chain(run, reqs, k)
        draft.probs = (draft.probs + 0.5).softmax(-1)
        return draft


@pytest.mark.slow
def test_sampling_law_test_catches_a_wrong_draft_distribution(small):
    """Negative control: with q misreported, chain verification is no longer lossless and
    the test above must notice."""
    prompt = [1, 2, 1, 2, 1]
    law = exact_pair_law(small, prompt, 1.0, 0, 1.0)
    r = generate(small, [prompt] * SAMPLES, method="chain", drafter=LyingDrafter(tiny("llama", V_SMALL, 2, 1)[1]),
                 max_new_tokens=2, stop_at_eos=False, temperature=1.0, seed=list(range(SAMPLES)), num_draft=2)
    pairs = np.zeros((V_SMALL, V_SMALL))
    for t in r.tokens:
        pairs[t[0], t[1]] += 1
    with pytest.raises(AssertionError, match="chi-squared"):
        assert_law(pairs, law, "lying drafter")


@pytest.mark.slow
def test_block_verification_needs_fresh_draws_every_step(small, monkeypatch):
    """Negative control: block verification decides with the draws at every draft position,
    also past the tokens it accepts. Keyed by sequence position (as the token rule can be),
    the next step reuses those draws and the loop is no longer lossless; generate() keys
    them by a per-request draw counter instead (test_sampling_follows_the_target_law)."""
    gen_module = importlib.import_module("fastverify.decoding.generate")
    monkeypatch.setattr(gen_module.Run, "draw_positions", lambda run, reqs: torch.tensor(
        [len(run.tokens[b]) for b in reqs], dtype=torch.int64))
    prompt = [1, 2, 1, 2, 1]
    law = exact_pair_law(small, prompt, 1.0, 0, 1.0)
    r = generate(small, [prompt] * SAMPLES, method="chain", drafter=drafter_of("model+frspec", small, V_SMALL),
                 max_new_tokens=2, stop_at_eos=False, temperature=1.0, seed=list(range(SAMPLES)), num_draft=2,
                 verify="block")
    pairs = np.zeros((V_SMALL, V_SMALL))
    for t in r.tokens:
        pairs[t[0], t[1]] += 1
    with pytest.raises(AssertionError, match="chi-squared"):
        assert_law(pairs, law, "block verification keyed by sequence position")


def test_sampling_is_batch_invariant(small):
    kw = dict(max_new_tokens=6, stop_at_eos=False, temperature=1.0, top_p=0.95)
    alone = generate(small, [[1, 2, 3]], seed=[11], **kw).tokens[0]
    batch = generate(small, [[5, 5], [1, 2, 3], [4]], seed=[3, 11, 4], **kw).tokens
    assert batch[1] == alone


# ----------------------------------------------------------------------------- bad input


def test_bad_input_fails_before_work(small):
    with pytest.raises(ValueError, match="method"):
        generate(small, [[1]], method="beam")
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate(small, [[1] * 250], max_new_tokens=10)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(small, [[1], []])
    with pytest.raises(ValueError, match="outside"):
        generate(small, [[1, V_SMALL]])
    with pytest.raises(ValueError, match="vocabulary"):
        generate(small, [[1]], method="chain", drafter=ModelDrafter(tiny("llama", vocab=16, layers=1)[1]))
    with pytest.raises(ValueError, match="temperature"):
        generate(small, [[1], [2]], temperature=[1.0])
    with pytest.raises(ValueError, match="temperature must be finite and >= 0"):
        generate(small, [[1]], temperature=-0.5)
    with pytest.raises(ValueError, match="top_p"):
        generate(small, [[1]], temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        generate(small, [[1]], temperature=1.0, top_k=-1)
    with pytest.raises(ValueError, match="drafter"):
        generate(small, [[1]], method="chain", drafter="oracle")
    with pytest.raises(ValueError, match="min_ngram"):
        NgramDrafter(max_ngram=1, min_ngram=2)
    with pytest.raises(ValueError, match="unknown option.*kv_budgett"):
        generate(small, [[1]], method="selfspec", kv_budgett=3)
    with pytest.raises(ValueError, match="frspec_vocab needs frspec_ranking"):
        generate(small, [[1]], method="chain", drafter="layerskip", frspec_vocab=8)
    with pytest.raises(ValueError, match="verify must be one of 'token', 'block', 'typical'"):
        generate(small, [[1]], method="chain", drafter="layerskip", verify="specinfer")
    with pytest.raises(ValueError, match="verify must be one of 'specinfer', 'block', 'block_wor'"):
        generate(small, [[1]], method="tree", drafter="layerskip", tree_paths=2, verify="typical")
    with pytest.raises(ValueError, match="pass tree_paths=n"):
        generate(small, [[1]], method="tree", drafter="layerskip", verify="block")
    with pytest.raises(ValueError, match="tree_paths needs a model drafter"):
        generate(small, [[1]], method="tree", drafter="ngram", tree_paths=2)
    with pytest.raises(ValueError, match="tree_paths applies to method='tree'"):
        generate(small, [[1]], method="chain", drafter="layerskip", tree_paths=2)
    with pytest.raises(ValueError, match=r"tree_paths must be an int in \[1, 16\]"):
        generate(small, [[1]], method="tree", drafter="layerskip", tree_paths=0)


def test_chunked_prefill_gives_the_same_tokens(monkeypatch):
    """Long prompts are prefilled PREFILL_CHUNK tokens at a time; the chunking must not
    change anything."""
    gen_module = importlib.import_module("fastverify.decoding.generate")  # the module, not the function
    _, model = tiny("qwen3")
    whole = generate(model, PROMPTS, max_new_tokens=8, stop_at_eos=False).tokens
    monkeypatch.setattr(gen_module, "PREFILL_CHUNK", 3)
    assert generate(model, PROMPTS, max_new_tokens=8, stop_at_eos=False).tokens == whole
