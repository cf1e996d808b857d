"""Model-level check: a small random Llama / Qwen2 (Hugging Face transformers weights)
scoring a whole draft tree in one pass through build_tree + tree_attention over a
paged cache gives the same logits as Hugging Face running each root-to-node path on
its own, as a plain sequence."""

import math

import pytest
import torch

from attention_problems import ancestors, tree_parents
from conftest import BACKEND_DEVICES

import fastverify

import transformers  # noqa: E402
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # noqa: E402

pytestmark = pytest.mark.family("tree_attention")


def tiny(arch: str):
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**common)
        model = transformers.Qwen2ForCausalLM(cfg)
    return model.eval().float()


class PagedLM:
    """A Hugging Face decoder run layer by layer with fastverify's ops for attention."""

    def __init__(self, hf, max_len, page=4):
        self.hf = hf
        dev = hf.device
        cfg = hf.config
        self.Hq, self.Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.D = cfg.hidden_size // self.Hq
        pages = math.ceil(max_len / page)
        shape = (pages + 2, page, self.Hkv, self.D)
        self.k = [torch.zeros(shape, device=dev) for _ in hf.model.layers]
        self.v = [torch.zeros(shape, device=dev) for _ in hf.model.layers]
        g = torch.Generator().manual_seed(1)
        self.table = torch.randperm(pages + 2, generator=g)[:pages].view(1, pages).int().to(dev)   # any page order
        self.page = page

    @torch.no_grad()
    def forward(self, ids, parents, prefix):
        """Score tree tokens ``ids`` (tree-local ``parents``) after ``prefix`` cached tokens."""
        n = len(ids)
        dev = self.hf.device
        cu = torch.tensor([0, n], dtype=torch.int32, device=dev)
        mask, positions, _ = fastverify.build_tree(torch.tensor(parents, device=dev), cu,
                                                   torch.tensor([prefix], device=dev), max_nodes=n)
        seq_lens = torch.tensor([prefix + n], dtype=torch.int32, device=dev)
        slots = prefix + torch.arange(n, device=dev)
        page_ids, offs = self.table[0, slots // self.page].long(), slots % self.page
        x = self.hf.model.embed_tokens(torch.tensor(ids, device=dev))
        cos, sin = self.hf.model.rotary_emb(x[None], positions[None])
        for li, layer in enumerate(self.hf.model.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(n, self.Hq, self.D).transpose(0, 1)[None]
            k = attn.k_proj(h).view(n, self.Hkv, self.D).transpose(0, 1)[None]
            v = attn.v_proj(h).view(n, self.Hkv, self.D)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            self.k[li][page_ids, offs] = k[0].transpose(0, 1)
            self.v[li][page_ids, offs] = v
            o = fastverify.tree_attention(q[0].transpose(0, 1).contiguous(), self.k[li], self.v[li], self.table,
                                          seq_lens, cu, mask)
            x = x + attn.o_proj(o.reshape(n, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.hf.lm_head(self.hf.model.norm(x))


@pytest.mark.parametrize("backend", list(BACKEND_DEVICES))
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tree_pass_equals_each_path_alone(arch, backend):
    dev = BACKEND_DEVICES[backend]
    hf = tiny(arch).to(dev)
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, 97, (11,), generator=g).tolist()
    parents = tree_parents("random", 14, g)
    tokens = torch.randint(0, 97, (14,), generator=g).tolist()
    lm = PagedLM(hf, len(prompt) + len(tokens))
    with fastverify.use_backend(backend):
        lm.forward(prompt, list(range(-1, len(prompt) - 1)), 0)            # prefill: the prompt is a chain
        tree_logits = lm.forward(tokens, parents, len(prompt))
    leaves = [i for i in range(14) if i not in parents]
    checked = set()
    with torch.no_grad():
        for leaf in leaves:
            path = ancestors(parents, leaf)
            ids = torch.tensor([prompt + [tokens[j] for j in path]], device=dev)
            ref = hf(ids).logits[0, len(prompt):]                             # logits after each path node
            for row, node in enumerate(path):
                assert torch.allclose(tree_logits[node], ref[row], atol=1e-4, rtol=1e-4), (leaf, node)
                checked.add(node)
    assert checked == set(range(14))
