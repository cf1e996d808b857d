"""EAGLE-3 and Medusa drafters: checkpoint formats, the drafter's forward against a naive
float64 reference, training's unrolled steps against inference, the dynamic tree builder
against a brute-force oracle, lossless decoding (greedy exact, sampling by goodness of fit)
and training that lowers the loss."""

from __future__ import annotations

import importlib
import json
import math
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from law import assert_law
from test_decoding import SAMPLES, V_SMALL, exact_pair_law, tiny

from fastverify import training
from fastverify.decoding import generate
from fastverify.decoding.drafters import dynamic_tree
from fastverify.decoding.heads import Eagle3Drafter, MedusaDrafter
from fastverify.models import KVCache, Step, chain_parents, cu_from_counts
from fastverify.models.eagle3 import Eagle3, load_eagle3, save_eagle3
from fastverify.models.medusa import Medusa, MedusaConfig, save_medusa


def random_eagle3(target, vocab: int, draft_vocab: int, seed: int = 0, scale: float = 0.3) -> Eagle3:
    """An EAGLE-3 drafter for ``target`` with every parameter random (norms around 1)."""
    token_map = torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))[:draft_vocab].sort().values
    L = target.config.n_layers
    d = Eagle3.for_target(target, token_map=token_map, aux_layer_ids=(0, L // 2, L), seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in d.named_parameters():
            if name.startswith("embed_tokens."):
                continue
            if p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]) * 3)
    return d.eval().requires_grad_(False)


def random_medusa(target, vocab: int, draft_vocab: int, heads: int = 3, seed: int = 0) -> Medusa:
    token_map = torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))[:draft_vocab].sort().values
    m = Medusa(MedusaConfig(hidden_size=target.config.dim, vocab_size=vocab, num_heads=heads), token_map=token_map)
    gen = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return m.eval().requires_grad_(False)


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def target(request):
    return tiny(request.param, vocab=64, layers=4)[1]


# --------------------------------------------------------------------------- checkpoint formats


def test_eagle3_round_trip(tmp_path, target):
    d = random_eagle3(target, 64, 40)
    save_eagle3(d, str(tmp_path), dtype=torch.float32)
    cfg = json.load(open(tmp_path / "config.json"))
    assert cfg["speculators_model_type"] == "eagle3" and cfg["architectures"] == ["Eagle3Speculator"]
    assert cfg["draft_vocab_size"] == 40 and cfg["eagle_aux_hidden_state_layer_ids"] == [0, 2, 4]
    assert cfg["transformer_layer_config"]["num_hidden_layers"] == 1
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert {"fc.weight", "layers.0.self_attn.q_proj.weight", "layers.0.hidden_norm.weight", "layers.0.mlp.up_proj.weight",
            "norm.weight", "lm_head.weight", "d2t", "t2d"} <= set(tensors)
    assert "embed_tokens.weight" not in tensors                    # shared with the target
    # vLLM's map: target id = draft id + d2t[draft id]; t2d marks the target ids drafted
    assert torch.equal(torch.arange(40) + tensors["d2t"], d.token_map)
    assert tensors["t2d"].dtype == torch.bool and int(tensors["t2d"].sum()) == 40
    e = load_eagle3(str(tmp_path)).share_embedding(target.model.embed_tokens)
    for (n1, p1), (n2, p2) in zip(sorted(d.state_dict().items()), sorted(e.state_dict().items())):
        assert n1 == n2 and torch.equal(p1, p2), n1
    # the default fp16 file holds the fp16-rounded weights
    save_eagle3(d, str(tmp_path / "half"))
    h = load_eagle3(str(tmp_path / "half"))
    assert torch.equal(h.fc.weight, d.fc.weight.half().float())
    assert load_file(str(tmp_path / "half" / "model.safetensors"))["fc.weight"].dtype == torch.float16


def test_eagle3_loads_a_checkpoint_with_its_own_embedding(tmp_path, target):
    d = random_eagle3(target, 64, 40)
    save_eagle3(d, str(tmp_path), dtype=torch.float32, include_embedding=True)
    e = load_eagle3(str(tmp_path))
    assert torch.equal(e.embed_tokens.weight, target.model.embed_tokens.weight)


@pytest.mark.parametrize("corrupt,message", [
    (lambda c, t: t.pop("layers.0.self_attn.k_proj.weight"), "layers.0.self_attn.k_proj.weight"),
    (lambda c, t: t.update({"fc.weight": torch.zeros(3, 3)}), "fc.weight"),
    (lambda c, t: t.update({"extra.weight": torch.zeros(1)}), "extra.weight"),
    (lambda c, t: t.update({"d2t": torch.full((40,), 10_000)}), "d2t"),
    (lambda c, t: c.update({"speculators_model_type": "eagle"}), "speculators_model_type"),
    (lambda c, t: c["transformer_layer_config"].update({"num_hidden_layers": 2}), "num_hidden_layers"),
    (lambda c, t: c.pop("draft_vocab_size"), "draft_vocab_size"),
    (lambda c, t: c.update({"norm_before_fc": True, "fc_norm": True}), "mutually exclusive"),
])
def test_eagle3_bad_checkpoints_name_what_is_wrong(tmp_path, target, corrupt, message):
    save_eagle3(random_eagle3(target, 64, 40), str(tmp_path))
    cfg = json.load(open(tmp_path / "config.json"))
    tensors = load_file(str(tmp_path / "model.safetensors"))
    corrupt(cfg, tensors)
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=message):
        load_eagle3(str(tmp_path))


def test_head_drafters_load_by_path(tmp_path, target):
    save_eagle3(random_eagle3(target, 64, 40), str(tmp_path / "e"))
    save_medusa(random_medusa(target, 64, 40), str(tmp_path / "m"))
    r = generate(target, [[1, 2, 3]], method="chain", drafter=str(tmp_path / "e"), max_new_tokens=4)
    assert len(r.tokens[0]) == 4
    r = generate(target, [[1, 2, 3]], method="tree", drafter=str(tmp_path / "m"), max_new_tokens=4)
    assert len(r.tokens[0]) == 4
    with pytest.raises(ValueError, match="no committed eagle3 drafter"):
        generate(target, [[1, 2, 3]], method="chain", drafter="eagle3", max_new_tokens=4)


# --------------------------------------------------------------------------- forward vs a naive reference


def _rms(x, w, eps):
    return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def naive_eagle3(d: Eagle3, tokens: list[int], g: torch.Tensor, positions: list[int], visible) -> torch.Tensor:
    """float64 EAGLE-3 layer outputs y [n, d_model] for rows (token, feature g, position), row i
    attending to rows ``visible(i)`` — written from the formulas, no fastverify code."""
    a = d.config.layer
    sd = {k: v.double() for k, v in d.state_dict().items() if v.is_floating_point()}
    E = d.embed_tokens.weight.double()
    pre = "layers.0."
    Hq, Hkv, D = a.n_heads, a.n_kv_heads, a.head_dim
    wq, wk, wv = sd[pre + "self_attn.wqkv.weight"].split([Hq * D, Hkv * D, Hkv * D])
    inv = 1.0 / (a.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    n = len(tokens)
    q, k, v, res = [], [], [], []
    for i in range(n):
        e = _rms(E[tokens[i]], sd[pre + "input_layernorm.weight"], a.norm_eps)
        gn = _rms(g[i].double(), sd[pre + "hidden_norm.weight"], a.norm_eps)
        z = torch.cat([e, gn])
        qi, ki, vi = (wq @ z).view(Hq, D), (wk @ z).view(Hkv, D), (wv @ z).view(Hkv, D)
        if a.qk_norm:
            qi = _rms(qi, sd[pre + "self_attn.q_norm.weight"], a.norm_eps)
            ki = _rms(ki, sd[pre + "self_attn.k_norm.weight"], a.norm_eps)
        ang = positions[i] * inv
        cos, sin = torch.cat([ang.cos(), ang.cos()]), torch.cat([ang.sin(), ang.sin()])

        def rot(x):
            x1, x2 = x[..., :D // 2], x[..., D // 2:]
            return x * cos + torch.cat([-x2, x1], -1) * sin
        q.append(rot(qi))
        k.append(rot(ki))
        v.append(vi)
        res.append(gn if d.config.norm_before_residual else g[i].double())
    out = []
    G = Hq // Hkv
    for i in range(n):
        keys = visible(i)
        heads = []
        for h in range(Hq):
            s = torch.stack([q[i][h] @ k[j][h // G] for j in keys]) / math.sqrt(D)
            w = torch.softmax(s, 0)
            heads.append(sum(w[t] * v[j][h // G] for t, j in enumerate(keys)))
        y = res[i] + sd[pre + "self_attn.o_proj.weight"] @ torch.cat(heads)
        x2 = _rms(y, sd[pre + "post_attention_layernorm.weight"], a.norm_eps)
        gate, up = (sd[pre + "mlp.w13.weight"] @ x2).chunk(2)
        out.append(y + sd[pre + "mlp.down_proj.weight"] @ (torch.nn.functional.silu(gate) * up))
    return torch.stack(out)


def test_eagle3_forward_matches_naive_reference(target):
    d = random_eagle3(target, 64, 40)
    n = 9
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, 64, (n,), generator=gen).tolist()
    aux = torch.randn(n, 3 * target.config.dim, generator=gen)
    g = d.fuse(aux)
    assert torch.allclose(g.double(), aux.double() @ d.fc.weight.double().t(), atol=1e-5)
    # paged: one chain of n entries over an empty cache, as the drafter's catch-up runs it
    cache = d.new_cache(1, 32, page_size=4, shuffle_pages=True)
    cu = cu_from_counts([n])
    step = Step.build(cache, torch.tensor([0]), chain_parents(cu), cu, torch.tensor([0], dtype=torch.int32))
    y = d(torch.tensor(tokens), g, step, cache)
    ref = naive_eagle3(d, tokens, g, list(range(n)), lambda i: range(i + 1))
    assert torch.allclose(y.double(), ref, atol=1e-4, rtol=1e-4)
    # the CPU decode kernels (draft steps of <= 16 rows) compute the same rows
    d.use_cpu_kernels()
    try:
        y_cpu = d(torch.tensor(tokens), g, step, cache)
    finally:
        d.use_cpu_kernels(False)
    assert torch.allclose(y_cpu.double(), ref, atol=1e-4, rtol=1e-4)
    # training's dense step 0 computes the same rows
    cos, sin = d.rope(torch.arange(n))
    y_dense, _ = d.layers[0].forward_dense(d.embed(torch.tensor(tokens))[None], g[None], cos, sin, [],
                                           training._ttt_mask(n, 1, "cpu"))
    assert torch.allclose(y_dense[0].double(), ref, atol=1e-4, rtol=1e-4)


def test_q8_0_drafter_weights():
    """quantize_q8_0 writes ggml's Q8_0 (read back by the GGUF reference dequantizer): each
    value within half a step of its block's scale; the quantized drafter stays close."""
    from fastverify.models.quantized import quantize_q8_0

    w = torch.randn(40, 96, generator=torch.Generator().manual_seed(1)) * torch.logspace(-3, 1, 96)
    w[3] = 0.0
    q = quantize_q8_0(w)
    assert q.blocks.shape == (40, 3 * 34) and q.ggml_type == 8
    back = q.dequantize()
    step = w.view(40, 3, 32).abs().amax(-1, keepdim=True) / 127
    assert bool(((back - w).view(40, 3, 32).abs() <= step * (0.5 + 127 * 2 ** -11) + 1e-7).all())   # d is fp16
    assert bool((back[3] == 0).all())
    with pytest.raises(ValueError, match="divisible by 32"):
        quantize_q8_0(torch.zeros(2, 40))


def test_weight_rows_dequantize_only_the_rows_asked():
    from fastverify.models.quantized import QuantizedLinear, quantize_q8_0, weight_rows

    w = torch.randn(70, 64, generator=torch.Generator().manual_seed(3))
    lin = QuantizedLinear([quantize_q8_0(w[:30]), quantize_q8_0(w[30:])])      # two row ranges
    index = torch.tensor([69, 0, 31, 29, 30, 5])
    assert torch.equal(weight_rows(lin, index), lin.weight[index])
    assert lin._dense is not None   # (.weight above built the dense copy; weight_rows never does)
    fresh = QuantizedLinear([quantize_q8_0(w[:30]), quantize_q8_0(w[30:])])
    weight_rows(fresh, index)
    assert fresh._dense is None
    plain = torch.nn.Linear(64, 70, bias=False)
    assert torch.equal(weight_rows(plain, index), plain.weight.detach()[index])


def test_quantized_drafter_is_close_to_fp32(target):
    d = random_eagle3(target, 64, 40)
    q = random_eagle3(target, 64, 40).quantize().use_cpu_kernels()
    n = 5
    tokens = torch.tensor([3, 9, 4, 1, 7])
    aux = torch.randn(n, 3 * target.config.dim, generator=torch.Generator().manual_seed(2))
    outs = []
    for m in (d, q):
        cache = m.new_cache(1, 16)
        cu = cu_from_counts([n])
        step = Step.build(cache, torch.tensor([0]), chain_parents(cu), cu, torch.tensor([0], dtype=torch.int32))
        outs.append(m(tokens, m.fuse(aux), step, cache))
    err = (outs[0] - outs[1]).norm() / outs[0].norm()
    assert 0 < float(err) < 0.05


def test_training_unrolled_steps_are_what_inference_computes(target):
    """Unrolled step k at base row t (training) = the drafter at depth k after t + 1 context
    entries (inference): a draft node reads its parent's output and sees the context plus its path."""
    d = random_eagle3(target, 64, 40, seed=2)
    L = 8
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 64, (L,), generator=gen)
    aux = torch.randn(L, 3 * target.config.dim, generator=gen)
    outs = [y[0] for y in training.unrolled_steps(d, ids[None], aux[None], 3)]
    for base in (0, 3, 4):
        cache = d.new_cache(1, 32, page_size=4)
        cu = cu_from_counts([base + 1])
        step = Step.build(cache, torch.tensor([0]), chain_parents(cu), cu, torch.tensor([0], dtype=torch.int32))
        y = d(ids[1:base + 2], d.fuse(aux[:base + 1]), step, cache)[-1:]
        assert torch.allclose(y, outs[0][base:base + 1], atol=1e-4)
        for k in (1, 2):
            one = cu_from_counts([1])
            step = Step.build(cache, torch.tensor([0]), torch.tensor([-1]), one,
                              torch.tensor([base + k], dtype=torch.int32))
            y = d(ids[base + 1 + k:base + 2 + k], d.next_feature(y), step, cache)
            assert torch.allclose(y, outs[k][base:base + 1], atol=1e-4), (base, k)


def test_target_capture_is_each_layers_input(target):
    """hidden(capture=...) returns the residual stream entering the asked layers and the
    same final state as without capture, fused CPU step and torch layers alike."""
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    x = target.model.embed_tokens(ids[0])
    cos, sin = target.rope(torch.arange(8))
    ref = [x]
    for layer in target.model.layers:
        x = x + layer.self_attn.forward_dense(layer.input_layernorm(x)[None], cos, sin)[0]
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        ref.append(x)
    for kernels in (True, False):
        target.use_cpu_kernels(kernels)
        for n in (8, 3):   # a prefill, and a short chain through the fused step
            cache = target.new_cache(1, 16)
            cu = cu_from_counts([n])
            step = Step.build(cache, torch.tensor([0]), chain_parents(cu), cu, torch.tensor([0], dtype=torch.int32))
            h, f = target.hidden(ids[0, :n], step, cache, capture=(4, 0, 2))
            assert torch.allclose(f, torch.cat([ref[4][:n], ref[0][:n], ref[2][:n]], -1), atol=1e-4)
            cache2 = target.new_cache(1, 16)
            assert torch.equal(h, target.hidden(ids[0, :n], step, cache2))
    target.use_cpu_kernels(True)
    with pytest.raises(ValueError, match="capture"):
        target.hidden(ids[0], step, cache, capture=(5,))


# --------------------------------------------------------------------------- the dynamic tree


def brute_force_tree(child_lp, depth: int, topk: int, budget: int):
    """EAGLE-2's tree by plain lists and full sorts: ``child_lp(path) -> [(logprob, token)]``."""
    pool = [((), 0.0, -1)]                                 # (path, score, parent)
    frontier = [0]
    for _ in range(depth):
        cand = []
        for node in frontier:
            path, score, _ = pool[node]
            for lp, tok in child_lp(path):
                cand.append((path + (tok,), score + lp, node))
        start = len(pool)
        pool += cand
        ranked = sorted(range(len(cand)), key=lambda i: (-cand[i][1], i))
        frontier = [start + i for i in ranked[:topk]]
    ranked = sorted(range(1, len(pool)), key=lambda i: (-pool[i][1], i))[:budget - 1]
    keep = sorted(ranked)
    local = {0: 0, **{n: i + 1 for i, n in enumerate(keep)}}
    return [pool[n][0][-1] for n in keep], [local[pool[n][2]] for n in keep], [pool[n][1] for n in keep]


@pytest.mark.parametrize("depth,topk,budget", [(1, 3, 4), (3, 2, 6), (4, 3, 12), (5, 4, 32), (3, 4, 100)])
def test_dynamic_tree_matches_brute_force(depth, topk, budget):
    V = 11

    def child_lp(path, b=0):
        g = torch.Generator().manual_seed(hash((b,) + path) % (2 ** 31))
        logits = torch.randn(V, generator=g, dtype=torch.float64) * 2
        if len(path) == 2:
            logits[:] = 0.0                                 # ties: the lower index wins
        lp = torch.log_softmax(logits, 0)
        top = torch.sort(-lp, stable=True).indices[:topk]
        return [(float(lp[i]), int(i)) for i in top]

    B = 3

    def expand(level, frontier, pool):
        lps, toks = [], []
        for b in range(B):
            row_lp, row_tok = [], []
            for node in frontier[b].tolist():
                path = []
                while node > 0:
                    path.append(int(pool["tokens"][b, node]))
                    node = int(pool["parents"][b, node])
                kids = child_lp(tuple(path[::-1]), b)
                row_lp.append([lp for lp, _ in kids])
                row_tok.append([t for _, t in kids])
            lps.append(row_lp)
            toks.append(row_tok)
        return torch.tensor(lps, dtype=torch.float64), torch.tensor(toks)

    tokens, parents, scores = dynamic_tree(expand, B, depth, topk, budget)
    # an expand that declines level `depth - 1` grows the tree of depth - 1 levels
    stopped = dynamic_tree(lambda level, f, pool: None if level == depth - 1 else expand(level, f, pool), B, depth,
                           topk, budget)
    for b in range(B):
        if depth > 1:
            short = brute_force_tree(lambda p: child_lp(p, b), depth - 1, topk, budget)
            assert stopped[0][b].tolist() == short[0] and stopped[1][b].tolist() == short[1]
        want_tok, want_par, want_score = brute_force_tree(lambda p: child_lp(p, b), depth, topk, budget)
        assert tokens[b].tolist() == want_tok
        assert parents[b].tolist() == want_par
        assert np.allclose(scores[b].tolist(), want_score)
        assert all(p < i + 1 for i, p in enumerate(want_par))   # parents come first


def test_best_nodes_keeps_the_count_that_pays():
    """best_nodes keeps, per request, the n best-scored nodes (parents included, re-indexed)
    for the n maximising (B + Σ exp(score of the kept)) / t(B·(n + 1))."""
    from types import SimpleNamespace

    from fastverify.decoding.heads import best_nodes

    tokens = torch.tensor([[10, 11, 12, 13, 14], [20, 21, 22, 23, 24]])
    parents = torch.tensor([[0, 0, 1, 3, 2], [0, 1, 2, 3, 4]])                   # tree-local, 0 = root
    scores = torch.tensor([[-0.1, -2.0, -0.3, -0.35, -5.0], [-0.2, -0.4, -0.6, -3.0, -3.5]], dtype=torch.float64)
    seconds = {2 * (n + 1): 1.0 + 0.3 * n for n in range(6)}
    run = SimpleNamespace(adaptive=True, model=SimpleNamespace(step_seconds=seconds))
    t, p, s = best_nodes(run, tokens, parents, scores)
    rates = []
    for n in range(6):
        kept = [sorted(range(5), key=lambda i: (-scores[b, i], i))[:n] for b in range(2)]
        rates.append((2 + sum(float(scores[b, i].exp()) for b in range(2) for i in kept[b])) / seconds[2 * (n + 1)])
    n = max(range(6), key=lambda k: (rates[k], -k))
    assert t.shape == (2, n) and 0 < n < 5
    for b in range(2):
        keep = sorted(sorted(range(5), key=lambda i: (-scores[b, i], i))[:n])
        assert t[b].tolist() == [int(tokens[b, i]) for i in keep]
        local = {0: 0, **{i + 1: j + 1 for j, i in enumerate(keep)}}
        assert p[b].tolist() == [local[int(parents[b, i])] for i in keep]
    run.adaptive = False
    assert best_nodes(run, tokens, parents, scores)[0] is tokens


# --------------------------------------------------------------------------- lossless decoding

PROMPTS = [[1, 2, 3, 4, 5, 1, 2, 3], [7], [9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9], [3, 1, 4, 1, 5, 9, 2, 6]]


def head_drafter(kind, target, vocab=64, draft_vocab=40):
    if kind == "eagle3":
        return Eagle3Drafter(random_eagle3(target, vocab, draft_vocab))
    return MedusaDrafter(random_medusa(target, vocab, draft_vocab))


@pytest.mark.parametrize("kind", ["eagle3", "medusa"])
@pytest.mark.parametrize("method", ["chain", "tree"])
@pytest.mark.parametrize("adaptive", [True, False])
def test_head_drafters_greedy_equals_autoregressive(target, kind, method, adaptive):
    ref = generate(target, PROMPTS, method="ar", max_new_tokens=20, stop_at_eos=False)
    r = generate(target, PROMPTS, method=method, drafter=head_drafter(kind, target), max_new_tokens=20,
                 stop_at_eos=False, tree_depth=4, tree_topk=3, tree_nodes=12, adaptive=adaptive)
    assert r.tokens == ref.tokens
    # one request at a time gives the same tokens as the batch
    for i, p in enumerate(PROMPTS[:2]):
        one = generate(target, [p], method=method, drafter=head_drafter(kind, target), max_new_tokens=20,
                       stop_at_eos=False)
        assert one.tokens[0] == ref.tokens[i]


@pytest.mark.parametrize("kind,method", [("medusa", "chain"), ("eagle3", "tree"), ("eagle3", "chain")])
def test_drafters_get_the_states_of_the_committed_tokens(target, kind, method, monkeypatch):
    """What the run hands a drafter, over a whole generation, is the target's states of every
    committed token but the root, in order: the prompt's from prefill, then root + accepted
    drafts of each verification (tree paths included)."""
    gen_module = importlib.import_module("fastverify.decoding.generate")
    record: dict[int, list] = {}
    take = gen_module.Run.take_states

    def recording_take(self, b):
        h, f = take(self, b)
        record.setdefault(b, []).append((h, f))
        return h, f

    monkeypatch.setattr(gen_module.Run, "take_states", recording_take)
    drafter = head_drafter(kind, target)
    if method == "chain":   # draft the target's own greedy tokens, so that drafts get accepted
        real_chain = drafter.chain

        def chain(run, reqs, k):
            draft = real_chain(run, reqs, k)
            for j, b in enumerate(reqs):
                ctx = list(run.tokens[b])
                for _ in draft.tokens[j]:
                    ctx.append(int(target.score(torch.tensor([ctx]))[0, -1].argmax()))
                draft.tokens[j] = ctx[len(run.tokens[b]):]
            return draft
        drafter.chain = chain
    r = generate(target, PROMPTS, method=method, drafter=drafter, max_new_tokens=16, stop_at_eos=False,
                 tree_depth=3, tree_topk=3, tree_nodes=10, adaptive=False)
    assert sum(map(sum, r.stats.accepted)) > 0   # accepted drafts were handed over too
    for b, parts in record.items():
        h = torch.cat([p[0] for p in parts])
        f = torch.cat([p[1] for p in parts])
        ids = PROMPTS[b] + r.tokens[b]
        ref_h, ref_f = training.target_states(target, ids[:h.shape[0]], drafter.capture)
        assert h.shape[0] >= len(PROMPTS[b]) - 1
        assert torch.allclose(h, ref_h, atol=1e-4), b
        assert torch.allclose(f, ref_f, atol=1e-4), b


@pytest.fixture(scope="module")
def small():
    hf, model = tiny("llama", vocab=V_SMALL, layers=2, sharpen=1.5, seed=3)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["eagle3", "medusa"])
@pytest.mark.parametrize("method", ["chain", "tree"])
def test_head_drafters_sampling_follows_the_target_law(small, kind, method):
    prompt = [1, 2, 1, 2, 1]
    law = exact_pair_law(small, prompt, 1.0, 0, 1.0)
    drafter = head_drafter(kind, small, V_SMALL, draft_vocab=V_SMALL * 5 // 8)
    r = generate(small, [prompt] * SAMPLES, method=method, drafter=drafter, max_new_tokens=2, stop_at_eos=False,
                 temperature=1.0, seed=list(range(SAMPLES)), num_draft=2, tree_depth=2, tree_topk=3, tree_nodes=8,
                 adaptive=False)   # full drafts: how many are drafted must not depend on measured times
    pairs = np.zeros((V_SMALL, V_SMALL))
    for t in r.tokens:
        pairs[t[0], t[1]] += 1
    assert_law(pairs, law, f"{method}/{kind} token pairs")
    assert r.stats.mean_accepted > 0.05   # the drafts were verified, not skipped


# --------------------------------------------------------------------------- training


def tiny_samples(model, n: int = 24, length: int = 24, seed: int = 0) -> list[dict]:
    """The tiny target's greedy continuations of random prompts, with its states (build_data's layout)."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 64, (6,), generator=gen).tolist() for _ in range(n)]
    r = generate(model, prompts, max_new_tokens=length, stop_at_eos=False)
    out = []
    for p, t in zip(prompts, r.tokens):
        ids = p + t
        h, f = training.target_states(model, ids, training.default_aux_layers(model))
        out.append({"ids": ids, "prompt_len": len(p), "h": h.half(), "aux": f.half()})
    return out


@pytest.mark.parametrize("kind", ["eagle3", "medusa"])
def test_training_lowers_the_loss(tmp_path, kind):
    model = tiny("llama", vocab=64, layers=4, seed=7)[1]
    with torch.no_grad():
        model.lm_head.weight.mul_(6)   # peaked next-token laws: something to learn
    data = tiny_samples(model)
    train = training.train_eagle3 if kind == "eagle3" else training.train_medusa
    summary = train(model, data, str(tmp_path), steps=40, lr=3e-3, draft_vocab=48, batch_tokens=256, progress=False)
    assert summary["final_train_loss"] < 0.7 * summary["first_train_loss"]
    assert os.path.isfile(tmp_path / "config.json")
    # the written checkpoint drafts losslessly
    drafter = str(tmp_path)
    ref = generate(model, PROMPTS, max_new_tokens=8, stop_at_eos=False)
    assert generate(model, PROMPTS, method="tree", drafter=drafter, max_new_tokens=8, stop_at_eos=False).tokens == ref.tokens
    # resuming a finished run trains no further and gives the same drafter
    again = train(model, data, str(tmp_path), steps=40, lr=3e-3, draft_vocab=48, batch_tokens=256, progress=False)
    assert again["final_train_loss"] == summary["final_train_loss"]


def test_training_prompts_leave_out_the_compare_prompts(monkeypatch):
    """Evaluation (fastverify compare) never sees a training prompt: the compare prompts are
    removed from the built-in prompts, whatever the corpus holds."""
    from fastverify import compare, frspec

    leaked = compare.PROMPTS["summarize"]
    monkeypatch.setattr(frspec, "builtin_corpus", lambda: iter(["A paragraph about tides and the moon. " * 8,
                                                                  leaked]))
    monkeypatch.setattr(training, "_stdlib_functions", lambda: [("def f(total):\n    return total + 1", ["total"])])
    prompts = training.training_prompts(300, seed=1)
    assert len(prompts) == 300
    texts = {p.strip() for p in compare.PROMPTS.values()}
    assert compare.PROMPTS["explain"] in frspec.DEFAULT_PROMPTS          # the reason for the filter
    assert not texts & {p.strip() for p in prompts}
    council = leaked.split("\n\n")[1]                                  # a paragraph the corpus shares with it
    assert len(council) >= 200 and not any(council in p for p in prompts)


def test_warm_start_carries_weights_and_head_rows_by_token(target):
    trained = random_eagle3(target, 64, 40, seed=3)
    vocab = torch.arange(10, 50)                                          # overlaps trained's vocabulary in part
    fresh = Eagle3.for_target(target, token_map=vocab)
    training._warm_start(fresh, trained)
    assert torch.equal(fresh.fc.weight, trained.fc.weight)
    assert torch.equal(fresh.layers[0].mlp.w13.weight, trained.layers[0].mlp.w13.weight)
    row_of = {int(t): i for i, t in enumerate(trained.token_map)}
    for j, t in enumerate(vocab.tolist()):
        want = trained.lm_head.weight[row_of[t]] if t in row_of else target.lm_head.weight[t]
        assert torch.equal(fresh.lm_head.weight[j], want), t
