"""EAGLE-3 drafter (Li et al. 2025) in plain PyTorch, in the checkpoint format vLLM loads.

The drafter reads three of the target's hidden states (the residual stream entering
target layers ``aux_layer_ids``, e.g. 2, L/2 and L−3), fuses them into one feature and
runs one decoder layer over [embedding of the next token, feature]. Shapes: N rows,
d = drafter hidden size, d_t = the target's, Vd = draft vocabulary.

    g = fc([a_1, a_2, a_3])                          a_i [N, d_t]  -> g [N, d]
    z = [n_in(embed(x)), n_h(g)]                     [N, 2d]: q, k and v read both halves
    y = g + o(attn(rope(q z), rope(k z), v z))       (n_h(g) instead of g: norm_before_residual)
    y = y + down(silu(gate(n2 y)) · up(n2 y))
    p = softmax(lm_head(norm(y)))                    [N, Vd]; draft id j is target id j + d2t[j]

The next draft step feeds y itself (norm(y) with ``norm_output``) back as its g: the drafter
runs on its own features after the first step, which is why it is trained with several
unrolled steps (:mod:`fastverify.training`). Its KV cache holds one entry per position:
the entry of position p + 1 comes from the target's features at p and token p + 1.

Checkpoints are the ``speculators`` format (vLLM's ``Eagle3Speculator``): ``config.json``
with ``speculators_model_type: "eagle3"``, ``transformer_layer_config`` (a Hugging Face
Llama/Qwen3 config of the one layer), ``draft_vocab_size``,
``eagle_aux_hidden_state_layer_ids`` and the norm flags; ``model.safetensors`` with
``fc``, ``layers.0.*`` (q/k/v/o, gate/up/down, ``input_layernorm``, ``hidden_norm``,
``post_attention_layernorm``), ``norm``, ``lm_head`` and the ``d2t`` / ``t2d`` maps.
``embed_tokens`` is optional: without it the drafter shares the target's embedding.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..cpu import step as cpu_kernels
from .model import MLP, Attention, KVCache, Linear, ModelArgs, RMSNorm, Step, rope_frequencies, rope_tables
from .quantized import weight_rows

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
SPECULATORS_VERSION = "0.9.0"  # the speculators release whose format this writes


@dataclass
class Eagle3Config:
    layer: ModelArgs                 # the drafter's decoder layer (n_layers = 1; vocab_size = the target's)
    draft_vocab_size: int
    aux_layer_ids: tuple[int, ...]
    target_hidden_size: int | None = None   # None: the layer's hidden size
    norm_before_residual: bool = False
    norm_before_fc: bool = False
    fc_norm: bool = False
    norm_output: bool = False
    verifier: str | None = None              # name or path of the target it was trained for

    @property
    def d_target(self) -> int:
        return self.target_hidden_size or self.layer.dim

    def to_speculators(self, speculative_tokens: int = 5) -> dict:
        a = self.layer
        layer = {"model_type": a.arch, "architectures": [f"{_HF_NAMES[a.arch]}ForCausalLM"],
                 "hidden_size": a.dim, "intermediate_size": a.intermediate_size,
                 "num_attention_heads": a.n_heads, "num_key_value_heads": a.n_kv_heads, "head_dim": a.head_dim,
                 "num_hidden_layers": 1, "rms_norm_eps": a.norm_eps, "rope_theta": a.rope_theta,
                 "rope_scaling": a.rope_scaling, "max_position_embeddings": a.max_seq_len,
                 "vocab_size": a.vocab_size, "hidden_act": "silu", "attention_bias": False,
                 "tie_word_embeddings": False}
        return {
            "architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3",
            "speculators_version": SPECULATORS_VERSION,
            "speculators_config": {
                "algorithm": "eagle3", "default_proposal_method": "greedy",
                "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": speculative_tokens}],
                "verifier": {"name_or_path": self.verifier, "architectures": [f"{_HF_NAMES[a.arch]}ForCausalLM"]}},
            "transformer_layer_config": layer, "draft_vocab_size": self.draft_vocab_size,
            "target_hidden_size": self.target_hidden_size,
            "eagle_aux_hidden_state_layer_ids": list(self.aux_layer_ids),
            "norm_before_residual": self.norm_before_residual, "norm_before_fc": self.norm_before_fc,
            "fc_norm": self.fc_norm, "norm_output": self.norm_output, "embed_requires_grad": False,
            "torch_dtype": "float16"}

    @classmethod
    def from_speculators(cls, cfg: dict, where: str = "config") -> "Eagle3Config":
        if cfg.get("speculators_model_type") != "eagle3":
            raise ValueError(f"{where}: speculators_model_type must be 'eagle3', got "
                             f"{cfg.get('speculators_model_type')!r}")
        for key in ("transformer_layer_config", "draft_vocab_size"):
            if key not in cfg:
                raise ValueError(f"{where}: missing {key!r}")
        layer_cfg = dict(cfg["transformer_layer_config"])
        layer_cfg.setdefault("model_type", "qwen3")  # speculators' default layer config is Qwen3's
        if layer_cfg["model_type"] not in _HF_NAMES:
            raise ValueError(f"{where}: transformer_layer_config.model_type must be one of {sorted(_HF_NAMES)}, "
                             f"got {layer_cfg['model_type']!r}")
        if layer_cfg.get("num_hidden_layers", 1) != 1:
            raise ValueError(f"{where}: fastverify runs one-layer EAGLE-3 drafters, transformer_layer_config has "
                             f"num_hidden_layers={layer_cfg['num_hidden_layers']}")
        if cfg.get("norm_before_fc") and cfg.get("fc_norm"):
            raise ValueError(f"{where}: norm_before_fc and fc_norm are mutually exclusive")
        layer = ModelArgs.from_hf_config({**layer_cfg, "num_hidden_layers": 1})
        aux = cfg.get("eagle_aux_hidden_state_layer_ids")
        if aux is None:
            raise ValueError(f"{where}: eagle_aux_hidden_state_layer_ids is unset; fastverify needs the target "
                             f"layers explicitly (speculators' default is [2, L // 2, L - 3] of an L-layer target)")
        verifier = (cfg.get("speculators_config") or {}).get("verifier") or {}
        return cls(layer=layer, draft_vocab_size=int(cfg["draft_vocab_size"]), aux_layer_ids=tuple(int(i) for i in aux),
                   target_hidden_size=cfg.get("target_hidden_size"),
                   norm_before_residual=bool(cfg.get("norm_before_residual", False)),
                   norm_before_fc=bool(cfg.get("norm_before_fc", False)), fc_norm=bool(cfg.get("fc_norm", False)),
                   norm_output=bool(cfg.get("norm_output", False)), verifier=verifier.get("name_or_path"))


_HF_NAMES = {"llama": "Llama", "qwen3": "Qwen3", "qwen2": "Qwen2"}


def default_aux_layers(n_layers: int) -> tuple[int, ...]:
    """EAGLE-3's usual target layers of an n-layer target: 2, n // 2 and n − 3 (speculators'
    and vLLM's default)."""
    return (2, n_layers // 2, n_layers - 3)


class Eagle3Layer(nn.Module):
    """The drafter's decoder layer: a Llama/Qwen3 layer whose q, k and v read [e, g] (2d)."""

    def __init__(self, args: ModelArgs, norm_before_residual: bool):
        super().__init__()
        self.self_attn = Attention(args)
        Hq, Hkv, D = args.n_heads, args.n_kv_heads, args.head_dim
        self.self_attn.wqkv = Linear(2 * args.dim, (Hq + 2 * Hkv) * D, bias=args.qkv_bias)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.hidden_norm = RMSNorm(args.dim, args.norm_eps)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.norm_before_residual = norm_before_residual

    def _inputs(self, e: torch.Tensor, g: torch.Tensor):
        """(z = [n_in e, n_h g] [..., 2d], residual [..., d])."""
        gn = self.hidden_norm(g)
        return torch.cat([self.input_layernorm(e), gn], -1), (gn if self.norm_before_residual else g)

    def forward(self, e, g, cos, sin, cache: KVCache, step: Step) -> torch.Tensor:
        """e, g [N, d] at the step's rows; K/V written to and read from ``cache`` (layer 0)."""
        z, r = self._inputs(e, g)
        attn = self.self_attn
        if (attn.cpu_kernel and cache.k.dtype == torch.float32 and step.sparse is None
                and cpu_kernels.usable(z) and z.shape[0] <= cpu_kernels.MAX_ROWS):
            return self.forward_cpu(z, r, cos, sin, cache, step)
        y = r + attn(z, cos, sin, cache, 0, step)
        return y + self.mlp(self.post_attention_layernorm(y))

    def forward_cpu(self, z, r, cos, sin, cache: KVCache, step: Step) -> torch.Tensor:
        """The same layer as five calls of the CPU decode kernels (1–16 fp32 rows, a draft
        step): as :meth:`fastverify.models.DecoderLayer.forward_cpu`, with the projection of
        z = [n_in e, n_h g] and the residual r passed in."""
        attn, mlp, a = self.self_attn, self.mlp, self.self_attn.args
        N = z.shape[0]
        k_cache, v_cache = cache.k[:, :, 0], cache.v[:, :, 0]
        q = cpu_kernels.qkv_rope(attn.wqkv.project(z), cos.view(N, -1), sin.view(N, -1), k_cache, v_cache,
                                 step.slots, a.n_heads, q_norm=attn.q_norm.weight if a.qk_norm else None,
                                 k_norm=attn.k_norm.weight if a.qk_norm else None, eps=a.norm_eps)
        out = cpu_kernels.paged_attention(q, k_cache, v_cache, step.block_table, step.seq_lens,
                                          cu_num_nodes=step.cu_num_nodes, tree_mask=step.tree_mask, rows=step.rows)
        y = attn.o_proj.project(out.view(N, -1), residual=r.contiguous())
        n2 = self.post_attention_layernorm
        h = mlp.w13.project(y, norm=n2.weight, eps=n2.eps)
        return mlp.down_proj.project(h, swiglu=True, residual=y)

    def forward_dense(self, e, g, cos, sin, past: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor):
        """Training's unrolled step over whole sequences: e, g [B, L, d], cos/sin [L, 1, D];
        attends over the K/V of the earlier unrolled steps ``past`` and its own, with
        ``mask [L, (len(past) + 1) · L]`` (True = attend). Returns (y [B, L, d], (k, v))."""
        attn = self.self_attn
        z, r = self._inputs(e, g)
        q, k, v = (t.transpose(1, 2) for t in attn.qkv(z, cos, sin))     # [B, H, L, D]
        keys = torch.cat([pk for pk, _ in past] + [k], 2)
        values = torch.cat([pv for _, pv in past] + [v], 2)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
        y = r + attn.o_proj(out.transpose(1, 2).flatten(-2))
        return y + self.mlp(self.post_attention_layernorm(y)), (k, v)


class Eagle3(nn.Module):
    """The EAGLE-3 drafter. ``embed_tokens`` is None until :meth:`share_embedding` lends it
    the target's (checkpoints without ``embed_tokens.weight``)."""

    def __init__(self, config: Eagle3Config):
        super().__init__()
        self.config = config
        a, n_aux = config.layer, len(config.aux_layer_ids)
        self.embed_tokens: nn.Embedding | None = None
        self.fc = nn.Linear(n_aux * config.d_target, a.dim, bias=False)
        self.input_norm = RMSNorm(n_aux * config.d_target, a.norm_eps) if config.norm_before_fc else None
        self.fc_norm = (nn.ModuleList(RMSNorm(config.d_target, a.norm_eps) for _ in range(n_aux))
                        if config.fc_norm else None)
        self.layers = nn.ModuleList([Eagle3Layer(a, config.norm_before_residual)])
        self.norm = RMSNorm(a.dim, a.norm_eps)
        self.lm_head = nn.Linear(a.dim, config.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.int64))
        self.register_buffer("t2d", torch.zeros(a.vocab_size, dtype=torch.bool))
        self.register_buffer("inv_freq", rope_frequencies(a), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @property
    def token_map(self) -> torch.Tensor:
        """[Vd] int64: the target id of each draft id (j + d2t[j])."""
        return torch.arange(self.config.draft_vocab_size, device=self.d2t.device) + self.d2t

    def set_vocabulary(self, token_map: torch.Tensor) -> None:
        """Draft over the target ids ``token_map [Vd]`` (distinct, ascending as vLLM assumes)."""
        token_map = token_map.to(torch.int64).cpu()
        Vd, V = self.config.draft_vocab_size, self.config.layer.vocab_size
        if token_map.shape != (Vd,) or int(token_map.min()) < 0 or int(token_map.max()) >= V:
            raise ValueError(f"token_map must hold {Vd} ids in [0, {V})")
        if not bool((token_map[1:] > token_map[:-1]).all()):
            raise ValueError("token_map must be strictly ascending (vLLM maps draft ids by d2t offsets)")
        self.d2t.copy_(token_map - torch.arange(Vd))
        self.t2d.zero_()
        self.t2d[token_map] = True

    def use_cpu_kernels(self, on: bool = True) -> "Eagle3":
        """Draft steps of 1–16 fp32 rows through the CPU decode kernels, as the target's
        (:meth:`fastverify.models.Transformer.use_cpu_kernels`); training keeps torch ops."""
        on = on and cpu_kernels.available()
        for m in self.modules():
            if isinstance(m, (Linear, Attention)):
                m.cpu_kernel = on
        return self

    def quantize(self) -> "Eagle3":
        """Keep ``fc`` and the layer's projections as Q8_0 blocks (the CPU block kernels):
        a draft step then reads 4 MB instead of 16 MB of fp32 weights. Drafts change a
        little, never the output (verification decides); for inference on the CPU only."""
        from .quantized import QuantizedLinear, quantize_q8_0

        layer = self.layers[0]
        for owner, name in ((self, "fc"), (layer.self_attn, "wqkv"), (layer.self_attn, "o_proj"), (layer.mlp, "w13"),
                            (layer.mlp, "down_proj")):
            lin = getattr(owner, name)
            if not isinstance(lin, QuantizedLinear):
                setattr(owner, name, QuantizedLinear([quantize_q8_0(lin.weight)], None if lin.bias is None
                                                     else lin.bias.detach().float()))
        return self

    def share_embedding(self, embedding: nn.Module) -> "Eagle3":
        """Use the target's token embedding (checkpoints that store none)."""
        if self.embed_tokens is None:
            self.embed_tokens = embedding
        return self

    def rope(self, positions: torch.Tensor):
        """cos, sin [..., 1, D] at integer positions [...]."""
        return rope_tables(self.inv_freq, positions, self.norm.weight.dtype)

    def fuse(self, aux: torch.Tensor) -> torch.Tensor:
        """The target's auxiliary states ``aux [..., n_aux · d_t]`` -> the feature g ``[..., d]``."""
        if self.input_norm is not None:
            aux = self.input_norm(aux)
        if self.fc_norm is not None:
            aux = torch.cat([norm(a) for norm, a in zip(self.fc_norm, aux.chunk(len(self.fc_norm), -1))], -1)
        return self.fc(aux)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.embed_tokens is None:
            raise ValueError("this EAGLE-3 checkpoint has no embed_tokens: call share_embedding(target embedding)")
        return self.embed_tokens(tokens).to(self.norm.weight.dtype)

    def forward(self, tokens: torch.Tensor, g: torch.Tensor, step: Step, cache: KVCache) -> torch.Tensor:
        """One draft step: tokens [N] (the token at each row's position) with features g [N, d]
        -> y [N, d], the state the next step reads (:meth:`next_feature`) and the head reads
        (:meth:`head_input`)."""
        cos, sin = self.rope(step.positions)
        return self.layers[0](self.embed(tokens), g, cos, sin, cache, step)

    def next_feature(self, y: torch.Tensor) -> torch.Tensor:
        return self.norm(y) if self.config.norm_output else y

    def head_input(self, y: torch.Tensor) -> torch.Tensor:
        """What ``lm_head`` reads: norm(y) (y itself when norm_output already normed it)."""
        return y if self.config.norm_output else self.norm(y)

    def new_cache(self, batch_size: int, max_len: int, **kw) -> KVCache:
        kw.setdefault("dtype", self.norm.weight.dtype)
        kw.setdefault("device", self.device)
        return KVCache(self.config.layer, batch_size, max_len, n_layers=1, **kw)

    @classmethod
    def for_target(cls, target, *, token_map: torch.Tensor, aux_layer_ids=None, verifier: str | None = None,
                   seed: int = 0) -> "Eagle3":
        """A fresh drafter for ``target`` (a fastverify Transformer): its layer shaped like the
        target's; the head and final norm are the target's rows of ``token_map``; ``fc`` passes
        the last auxiliary state through and the residual branches (o, down) start at zero, so
        the untrained drafter reads out what the target's late layer already predicts — a
        sensible start that CPU-sized training refines instead of first unlearning noise."""
        t = target.config
        aux = tuple(aux_layer_ids) if aux_layer_ids is not None else default_aux_layers(t.n_layers)
        layer = ModelArgs(arch=t.arch, vocab_size=t.vocab_size, dim=t.dim, n_layers=1, n_heads=t.n_heads,
                          n_kv_heads=t.n_kv_heads, head_dim=t.head_dim, intermediate_size=t.intermediate_size,
                          norm_eps=t.norm_eps, rope_theta=t.rope_theta, rope_scaling=t.rope_scaling,
                          max_seq_len=t.max_seq_len)
        model = cls(Eagle3Config(layer=layer, draft_vocab_size=len(token_map), aux_layer_ids=aux, verifier=verifier))
        gen = torch.Generator().manual_seed(seed)
        d = t.dim
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim == 2:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            model.fc.weight.zero_()
            model.fc.weight[:, -d:] = torch.eye(d)
            layer0 = model.layers[0]
            layer0.self_attn.o_proj.weight.zero_()
            layer0.mlp.down_proj.weight.zero_()
            model.set_vocabulary(token_map)
            model.lm_head.weight.copy_(weight_rows(target.lm_head, model.token_map))
            model.norm.weight.copy_(target.model.norm.weight.detach().float())
        return model.share_embedding(target.model.embed_tokens)


# --------------------------------------------------------------------------- checkpoints

def _checkpoint_weights(model: Eagle3, dtype=torch.float16, include_embedding: bool = False) -> dict:
    """The speculators weights of ``model`` (q/k/v and gate/up split as Hugging Face stores
    them), the d2t / t2d maps aside."""
    a = model.config.layer
    out = {}
    for name, p in model.named_parameters():
        if name.startswith("embed_tokens.") and not include_embedding:
            continue
        p = p.detach()
        if name.endswith("self_attn.wqkv.weight"):
            pre = name[: -len("wqkv.weight")]
            for part, t in zip(("q_proj", "k_proj", "v_proj"),
                               p.split([a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim,
                                        a.n_kv_heads * a.head_dim])):
                out[f"{pre}{part}.weight"] = t
        elif name.endswith("mlp.w13.weight"):
            pre = name[: -len("w13.weight")]
            gate, up = p.chunk(2)
            out[f"{pre}gate_proj.weight"], out[f"{pre}up_proj.weight"] = gate, up
        else:
            out[name] = p
    return {k: v.to(dtype).contiguous() for k, v in out.items()}


def save_eagle3(model: Eagle3, path: str, *, dtype=torch.float16, include_embedding: bool = False,
                speculative_tokens: int = 5) -> None:
    """Write ``path/config.json`` and ``path/model.safetensors`` in the speculators format."""
    os.makedirs(path, exist_ok=True)
    tensors = {k: v.cpu() for k, v in _checkpoint_weights(model, dtype, include_embedding).items()}
    tensors["d2t"] = model.d2t.detach().cpu().to(torch.int64)
    tensors["t2d"] = model.t2d.detach().cpu().to(torch.bool)
    save_file(tensors, os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(model.config.to_speculators(speculative_tokens), f, indent=2)
        f.write("\n")


def load_eagle3(path: str, *, dtype=torch.float32, device="cpu") -> Eagle3:
    """An EAGLE-3 drafter from a speculators checkpoint folder (config.json + model.safetensors).
    Without ``embed_tokens.weight`` it needs :meth:`Eagle3.share_embedding` before drafting."""
    config_path = os.path.join(path, CONFIG_FILE)
    weights_path = os.path.join(path, WEIGHTS_FILE)
    for p in (config_path, weights_path):
        if not os.path.isfile(p):
            raise ValueError(f"{path} is not an EAGLE-3 checkpoint folder: {os.path.basename(p)} is missing")
    with open(config_path, encoding="utf-8") as f:
        config = Eagle3Config.from_speculators(json.load(f), config_path)
    tensors = load_file(weights_path)
    with torch.device("meta"):
        model = Eagle3(config)
    a = config.layer
    expected = {k: tuple(v.shape) for k, v in _checkpoint_weights(model, dtype=torch.float32).items()}
    expected_maps = {"d2t": (config.draft_vocab_size,), "t2d": (a.vocab_size,)}
    names = set(tensors)
    ignored = {n for n in names if n.startswith(("verifier_", "embed_tokens."))}
    missing = sorted(set(expected) - names)
    unexpected = sorted(names - set(expected) - set(expected_maps) - ignored)
    if missing or unexpected:
        raise ValueError(f"{weights_path}: does not fit the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, shape in {**expected, **expected_maps}.items():
        if name in tensors and tuple(tensors[name].shape) != shape:
            raise ValueError(f"{weights_path}: tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                             f"the config implies {shape}")
    state = {}
    for name in expected:
        if name.endswith("self_attn.q_proj.weight"):
            pre = name[: -len("q_proj.weight")]
            state[f"{pre}wqkv.weight"] = torch.cat([tensors[f"{pre}{p}.weight"] for p in ("q_proj", "k_proj",
                                                                                           "v_proj")])
        elif name.endswith("mlp.gate_proj.weight"):
            pre = name[: -len("gate_proj.weight")]
            state[f"{pre}w13.weight"] = torch.cat([tensors[f"{pre}gate_proj.weight"], tensors[f"{pre}up_proj.weight"]])
        elif not name.endswith(("k_proj.weight", "v_proj.weight", "up_proj.weight")):
            state[name] = tensors[name]
    state = {k: v.to(dtype) for k, v in state.items()}
    Vd = config.draft_vocab_size
    if "d2t" in tensors:
        d2t = tensors["d2t"].to(torch.int64)
    else:   # no map: the draft vocabulary is the target's first Vd ids
        d2t = torch.zeros(Vd, dtype=torch.int64)
    token_map = torch.arange(Vd) + d2t
    if int(token_map.min()) < 0 or int(token_map.max()) >= a.vocab_size:
        raise ValueError(f"{weights_path}: d2t maps draft ids outside the target vocabulary [0, {a.vocab_size})")
    state["d2t"] = d2t
    t2d = torch.zeros(a.vocab_size, dtype=torch.bool)
    t2d[token_map] = True
    state["t2d"] = t2d
    missing_keys, unexpected_keys = model.load_state_dict(state, strict=False, assign=True)
    missing_keys = [k for k in missing_keys if not k.startswith("embed_tokens")]
    if missing_keys or unexpected_keys:
        raise ValueError(f"{weights_path}: missing {missing_keys[:5]}, unexpected {unexpected_keys[:5]}")
    model.register_buffer("inv_freq", rope_frequencies(a), persistent=False)
    if "embed_tokens.weight" in tensors:
        w = tensors["embed_tokens.weight"]
        if tuple(w.shape) != (a.vocab_size, a.dim):
            raise ValueError(f"{weights_path}: embed_tokens.weight has shape {tuple(w.shape)}, "
                             f"expected {(a.vocab_size, a.dim)}")
        model.embed_tokens = nn.Embedding.from_pretrained(w.to(dtype), freeze=True)
    model = model.to(device=device).eval().requires_grad_(False)
    model.d2t, model.t2d = model.d2t.to(device), model.t2d.to(device)
    return model
