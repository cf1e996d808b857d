"""Medusa heads: outputs against a naive float64 reference, both checkpoint layouts, bad checkpoints,
the training loss."""

import json
import math
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastverify.models.medusa import Medusa, MedusaConfig, load_medusa, medusa_loss, save_medusa

D, V = 12, 40


def random_medusa(num_layers=1, shared=False, token_map=None, num_heads=3, seed=0) -> Medusa:
    """A Medusa with every weight random (Medusa's own init zeroes the blocks, which would hide bugs)."""
    torch.manual_seed(seed)
    model = Medusa(MedusaConfig(hidden_size=D, vocab_size=V, num_heads=num_heads, num_layers=num_layers,
                                shared_head=shared, base_model_name_or_path="tiny/target"), token_map=token_map)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return model


def naive_logits(blocks, projections, h):
    """Reference in float64 with plain loops. ``blocks[i][j] = (W [d, d], b [d])``, ``projections[i]``
    [V_out, d]; ``h`` [N, d] -> [N, num_heads, V_out]."""
    h = h.double()
    out = torch.zeros(h.shape[0], len(blocks), projections[0].shape[0], dtype=torch.float64)
    for t in range(h.shape[0]):
        for i, head in enumerate(blocks):
            x = h[t].clone()
            for weight, bias in head:
                pre = [sum(weight[r, c].item() * x[c].item() for c in range(D)) + bias[r].item() for r in range(D)]
                x = x + torch.tensor([p / (1.0 + math.exp(-p)) for p in pre], dtype=torch.float64)
            out[t, i] = projections[i].double() @ x
    return out


def blocks_of(model: Medusa):
    """The residual blocks' (W, b) of each head, float64."""
    L = model.config.num_layers
    return [[(head[j].linear.weight.detach().double(), head[j].linear.bias.detach().double()) for j in range(L)]
            for head in model.heads]


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("projection", ["own", "shared", "shared_token_map", "own_token_map"])
def test_logits_match_naive_reference(num_layers, projection):
    token_map = torch.randperm(V)[:17]
    model = random_medusa(num_layers, shared=projection.startswith("shared"),
                          token_map=token_map if projection == "own_token_map" else None)
    h = torch.randn(4, D)
    states = model(h)
    assert states.shape == (4, 3, D)
    if projection.startswith("shared"):
        lm_head = torch.randn(V, D)
        head_weight = lm_head[token_map] if projection == "shared_token_map" else lm_head
        logits = model.logits(h, head_weight)
        projections = [head_weight] * 3
    else:
        logits = model.logits(h)
        projections = [head[num_layers].weight.detach() for head in model.heads]
    expected_rows = 17 if "token_map" in projection else V
    assert logits.shape == (4, 3, expected_rows)
    torch.testing.assert_close(logits.double(), naive_logits(blocks_of(model), projections, h), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_original_layout_round_trip(tmp_path, shared, num_layers):
    model = random_medusa(num_layers, shared=shared)
    save_medusa(model, str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["medusa_num_heads"] == 3 and config["medusa_num_layers"] == num_layers
    assert config["medusa_shared_head"] is shared and config["base_model_name_or_path"] == "tiny/target"
    tensors = load_file(str(tmp_path / "medusa_lm_head.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    assert ("0.%d.weight" % num_layers in tensors) is not shared
    assert "2.%d.linear.bias" % (num_layers - 1) in tensors

    loaded = load_medusa(str(tmp_path))
    assert loaded.config == model.config and loaded.token_map is None
    # fp16 on disk: the loaded model equals the original with its weights rounded to fp16
    rounded = random_medusa(num_layers, shared=shared)
    rounded.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    h = torch.randn(5, D)
    head_weight = torch.randn(V, D) if shared else None
    assert torch.equal(loaded.logits(h, head_weight), rounded.logits(h, head_weight))

    save_medusa(model, str(tmp_path / "fp32"), dtype=torch.float32)
    exact = load_medusa(str(tmp_path / "fp32"), dtype=torch.float64)
    assert exact.heads[0][0].linear.weight.dtype == torch.float64
    assert torch.equal(exact.to(torch.float32).logits(h, head_weight), model.logits(h, head_weight))


def test_original_layout_with_token_map_round_trip(tmp_path):
    token_map = torch.tensor([5, 0, 39, 7, 11])
    model = random_medusa(1, token_map=token_map)
    save_medusa(model, str(tmp_path), dtype=torch.float32)
    loaded = load_medusa(str(tmp_path))
    assert torch.equal(loaded.token_map, token_map)
    h = torch.randn(3, D)
    assert torch.equal(loaded.logits(h), model.logits(h))


def test_faster_decoding_pt_file_without_sizes_in_config(tmp_path):
    """FasterDecoding/Medusa's own folders: medusa_lm_head.pt and a config without hidden/vocab size."""
    model = random_medusa(2)
    torch.save(model.heads.state_dict(), tmp_path / "medusa_lm_head.pt")
    (tmp_path / "config.json").write_text(json.dumps(
        {"medusa_num_heads": 3, "medusa_num_layers": 2, "base_model_name_or_path": "lmsys/vicuna-7b-v1.3"}))
    loaded = load_medusa(str(tmp_path))
    assert (loaded.config.hidden_size, loaded.config.vocab_size) == (D, V)
    h = torch.randn(2, D)
    assert torch.equal(loaded.logits(h), model.logits(h))


def write_vllm(folder, tensors, **config):
    folder.mkdir(exist_ok=True)
    config = {"model_type": "medusa", "architectures": ["MedusaModel"], "hidden_size": D, "vocab_size": V,
              "num_heads": 3, "num_hidden_layers": 2, "truncated_vocab_size": V, **config}
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))


def vllm_tensors(num_heads=3, num_layers=2, bias=False, lm_rows=V, prefix="", one_lm_head=False):
    torch.manual_seed(1)
    tensors = {}
    for i in range(num_heads):
        for j in range(num_layers):
            tensors[f"{prefix}blocks.{i}.layers.{j}.weight"] = torch.randn(D, D) * 0.5
            if bias:
                tensors[f"{prefix}blocks.{i}.layers.{j}.bias"] = torch.randn(D) * 0.5
        if i == 0 or not one_lm_head:
            tensors[f"{prefix}lm_heads.{i}.weight"] = torch.randn(lm_rows, D)
    return tensors


VLLM_CASES = {
    "plain": ({}, {}),
    "bias": ({"bias": True}, {"medusa_fc_bias": True}),
    "prefixed": ({"prefix": "medusa_heads."}, {}),
    "truncated": ({"lm_rows": 9}, {"truncated_vocab_size": 9}),
    "truncated_full_heads": ({}, {"truncated_vocab_size": 9}),
    "original_lm_head_scaled": ({"one_lm_head": True}, {"original_lm_head": True, "logit_scale": 0.5}),
}


@pytest.mark.parametrize("case", list(VLLM_CASES))
def test_vllm_layout_matches_reference(tmp_path, case):
    make, config = VLLM_CASES[case]
    tensors = vllm_tensors(**make)
    prefix = make.get("prefix", "")
    token_map = None
    if "truncated_vocab_size" in config:
        token_map = torch.tensor([3, 38, 0, 17, 5, 9, 21, 30, 2])
        tensors["token_map"] = token_map
    write_vllm(tmp_path, tensors, **config)
    model = load_medusa(str(tmp_path))
    assert model.config.shared_head is False and model.config.vocab_size == V
    assert (model.token_map is None) == (token_map is None)
    if token_map is not None:
        assert torch.equal(model.token_map, token_map)

    # vLLM's semantics, written out: x + silu(W x [+ b]) per layer, then logit_scale * lm_head[token_map] x
    blocks = [[(tensors[f"{prefix}blocks.{i}.layers.{j}.weight"].double(),
                tensors[f"{prefix}blocks.{i}.layers.{j}.bias"].double() if make.get("bias") else torch.zeros(D))
               for j in range(2)] for i in range(3)]
    projections = []
    for i in range(3):
        weight = tensors[f"{prefix}lm_heads.{0 if make.get('one_lm_head') else i}.weight"].double()
        if token_map is not None and weight.shape[0] == V:
            weight = weight[token_map]
        projections.append(weight * config.get("logit_scale", 1.0))
    h = torch.randn(3, D)
    expected = naive_logits(blocks, projections, h)
    assert model.logits(h).shape == expected.shape
    torch.testing.assert_close(model.logits(h).double(), expected, rtol=1e-5, atol=1e-4)

    # and it saves to the original layout and loads back the same
    save_medusa(model, str(tmp_path / "converted"), dtype=torch.float32)
    again = load_medusa(str(tmp_path / "converted"))
    assert torch.equal(again.logits(h), model.logits(h))


def original_folder(tmp_path, edit=None, config_edit=None):
    save_medusa(random_medusa(1), str(tmp_path))
    weights = str(tmp_path / "medusa_lm_head.safetensors")
    tensors = load_file(weights)
    if edit:
        edit(tensors)
        save_file(tensors, weights)
    if config_edit:
        config = json.loads((tmp_path / "config.json").read_text())
        config_edit(config)
        (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


BAD_ORIGINAL = {
    "missing tensor '1.0.linear.bias'": lambda t: t.pop("1.0.linear.bias"),
    "tensor '2.1.weight' has shape (39, 12)": lambda t: t.update({"2.1.weight": t["2.1.weight"][:39]}),
    "unexpected tensor '3.0.linear.weight'": lambda t: t.update({"3.0.linear.weight": torch.zeros(D, D)}),
    "tensor 'token_map'": lambda t: t.update({"token_map": torch.tensor([1, 1])}),
}


@pytest.mark.parametrize("message", list(BAD_ORIGINAL))
def test_bad_original_checkpoint_names_the_tensor(tmp_path, message):
    path = original_folder(tmp_path, edit=BAD_ORIGINAL[message])
    with pytest.raises(ValueError, match=re.escape(message)):
        load_medusa(path)


def test_bad_original_config_names_the_field(tmp_path):
    path = original_folder(tmp_path, config_edit=lambda c: c.pop("medusa_num_layers"))
    with pytest.raises(ValueError, match=r"config\.json: missing field 'medusa_num_layers'"):
        load_medusa(path)
    path = original_folder(tmp_path / "b", config_edit=lambda c: c.update(medusa_num_heads="4"))
    with pytest.raises(ValueError, match="'medusa_num_heads' must be an integer"):
        load_medusa(path)
    with pytest.raises(ValueError, match="no config.json"):
        load_medusa(str(tmp_path / "nowhere"))


BAD_VLLM = {
    "missing tensor 'lm_heads.1.weight'": (lambda t: t.pop("lm_heads.1.weight"), {}),
    "missing tensor 'blocks.0.layers.1.bias'": (lambda t: t.pop("blocks.0.layers.1.bias"), {"medusa_fc_bias": True}),
    # vLLM builds the blocks without a bias unless medusa_fc_bias: a bias tensor would be dropped there
    "unexpected tensor 'blocks.0.layers.0.bias'": (lambda t: t.update({"blocks.0.layers.0.bias": torch.zeros(D)}), {}),
    "tensor 'blocks.2.layers.0.weight' has shape (12, 11)":
        (lambda t: t.update({"blocks.2.layers.0.weight": torch.zeros(D, D - 1)}), {}),
    "missing tensor 'token_map'": (lambda t: None, {"truncated_vocab_size": 9}),
    "unexpected tensor 'token_map'": (lambda t: t.update({"token_map": torch.arange(V)}), {}),
    "unexpected tensor 'lm_head.weight'": (lambda t: t.update({"lm_head.weight": torch.zeros(V, D)}), {}),
}


@pytest.mark.parametrize("message", list(BAD_VLLM))
def test_bad_vllm_checkpoint_names_the_tensor(tmp_path, message):
    edit, config = BAD_VLLM[message]
    tensors = vllm_tensors(bias=config.get("medusa_fc_bias", False))
    edit(tensors)
    write_vllm(tmp_path, tensors, **config)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_medusa(str(tmp_path))


def test_bad_inputs_are_named():
    shared, own = random_medusa(1, shared=True), random_medusa(1)
    with pytest.raises(ValueError, match=r"h must be \[N, 12\]"):
        own(torch.randn(3, D + 1))
    with pytest.raises(ValueError, match="head_weight .* is required"):
        shared.logits(torch.randn(3, D))
    with pytest.raises(ValueError, match="head_weight is only for shared_head"):
        own.logits(torch.randn(3, D), torch.randn(V, D))
    with pytest.raises(ValueError, match=r"head_weight must be \[V_sub, 12\]"):
        shared.logits(torch.randn(3, D), torch.randn(V, D + 1))
    with pytest.raises(ValueError, match="tokens must be a 1-D integer tensor"):
        medusa_loss(own, torch.randn(5, D), torch.randn(5))
    with pytest.raises(ValueError, match="h must be"):
        medusa_loss(own, torch.randn(4, D), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        medusa_loss(own, torch.randn(5, D), torch.zeros(5, dtype=torch.long), mask=torch.ones(5))
    with pytest.raises(ValueError, match="token_map has 3 ids but the projection has 40 rows"):
        medusa_loss(shared, torch.randn(5, D), torch.zeros(5, dtype=torch.long), torch.randn(V, D),
                    token_map=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="tokens hold ids outside"):
        medusa_loss(own, torch.randn(5, D), torch.full((5,), V))
    with pytest.raises(ValueError, match="num_layers must be an integer >= 0"):
        MedusaConfig(hidden_size=D, vocab_size=V, num_layers=-1)


def test_loss_matches_a_naive_loss():
    """Head i at row t targets tokens[t + i + 2]; mask picks rows; targets outside token_map are skipped."""
    model = random_medusa(2, shared=True)
    L = 11
    h, tokens = torch.randn(L, D), torch.randint(0, V, (L,))
    token_map = torch.randperm(V)[:25]
    lm_head = torch.randn(V, D)
    mask = torch.rand(L) > 0.3
    loss, accuracy = medusa_loss(model, h, tokens, lm_head[token_map], mask=mask, token_map=token_map)

    row_of = {int(v): j for j, v in enumerate(token_map)}
    logits = model.logits(h, lm_head[token_map]).detach()
    expected, expected_accuracy = 0.0, []
    for i in range(3):
        losses, hits = [], []
        for t in range(L):
            if t + i + 2 < L and mask[t] and int(tokens[t + i + 2]) in row_of:
                target = row_of[int(tokens[t + i + 2])]
                losses.append(torch.logsumexp(logits[t, i], 0).item() - logits[t, i, target].item())
                hits.append(float(logits[t, i].argmax().item() == target))
        expected += sum(losses) / len(losses) if losses else 0.0
        expected_accuracy.append(sum(hits) / len(hits) if hits else float("nan"))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert accuracy == pytest.approx(expected_accuracy, nan_ok=True)


@pytest.mark.parametrize("shared", [False, True])
def test_training_lowers_the_loss(shared):
    """A target whose hidden states follow h[t+1] = A h[t] (A a rotation) and whose tokens are
    argmax(R h[t-1]): every future token is a function of h[t], so every head can learn it."""
    torch.manual_seed(3)
    d, vocab, L = 16, 24, 192
    rotation, _ = torch.linalg.qr(torch.randn(d, d))
    readout = torch.randn(vocab, d) * 3
    h = torch.empty(L, d)
    h[0] = torch.randn(d)
    for t in range(1, L):
        h[t] = rotation @ h[t - 1] + 0.05 * torch.randn(d)
    tokens = torch.zeros(L, dtype=torch.long)
    tokens[1:] = (h[:-1] @ readout.T).argmax(-1)

    model = Medusa(MedusaConfig(hidden_size=d, vocab_size=vocab, num_heads=3, num_layers=1, shared_head=shared))
    head_weight = readout if shared else None   # a shared head: the target's own LM head
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    first, _ = medusa_loss(model, h, tokens, head_weight)
    for _ in range(30):
        loss, accuracy = medusa_loss(model, h, tokens, head_weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    last, accuracy = medusa_loss(model, h, tokens, head_weight)
    assert last.item() < 0.6 * first.item(), (first.item(), last.item())
    assert len(accuracy) == 3 and all(0.0 <= a <= 1.0 for a in accuracy)


def test_loss_of_a_sequence_too_short_for_any_head():
    model = random_medusa(1)
    loss, accuracy = medusa_loss(model, torch.randn(2, D), torch.tensor([1, 2]))
    loss.backward()
    assert loss.item() == 0.0 and all(math.isnan(a) for a in accuracy)
