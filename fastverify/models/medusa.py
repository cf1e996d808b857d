"""Medusa heads (Cai et al. 2024): extra decoding heads over the target's last hidden state.

The target's LM head reads ``h`` (the final-norm output) at a position and predicts the next
token (+1). Medusa head ``i`` (0-based) reads the same ``h`` and predicts the token ``i + 2``
positions after the one ``h`` was computed for:

    x = h;  for each of num_layers blocks:  x = x + silu(W x + b)        (W [d, d], b [d])
    logits_i = P_i x

``P_i`` is either the head's own ``Linear(d, V, bias=False)`` (the Medusa-1 layout) or, with
``shared_head``, the target's LM head rows ``[V_sub, d]`` given at call time (optionally a ranked
vocabulary subset with its ``token_map``, as FR-Spec uses): then nothing vocabulary-sized is stored.

    medusa = load_medusa("path/to/medusa")                         # either checkpoint layout
    states = medusa(h)                                             # [N, num_heads, d]
    logits = medusa.logits(h, target.lm_head.weight)               # shared head: [N, num_heads, V]
    loss, accuracy = medusa_loss(medusa, h, tokens, target.lm_head.weight)

Checkpoint layouts (folders) that :func:`load_medusa` reads:

1. FasterDecoding/Medusa: ``config.json`` with ``medusa_num_heads``, ``medusa_num_layers``,
   ``base_model_name_or_path``, ``hidden_size``, ``vocab_size`` (and our ``medusa_shared_head``;
   absent means false), and ``medusa_lm_head.safetensors`` (or the older ``medusa_lm_head.pt``)
   holding the state dict of a ``ModuleList`` of ``Sequential(ResBlock * num_layers, Linear)``:
   ``{i}.{j}.linear.weight/bias`` and ``{i}.{num_layers}.weight``. :func:`save_medusa` writes it
   (plus a ``token_map`` tensor when the heads cover a vocabulary subset).
2. vLLM's converted layout: ``config.json`` with ``model_type: "medusa"``, ``num_heads``,
   ``num_hidden_layers``, ``hidden_size``, ``vocab_size``, ``truncated_vocab_size`` (and optional
   ``medusa_fc_bias``, ``original_lm_head``, ``logit_scale``), and ``model.safetensors`` holding
   ``blocks.{i}.layers.{j}.weight`` (``.bias`` when ``medusa_fc_bias``), ``lm_heads.{i}.weight``
   and, when ``truncated_vocab_size < vocab_size``, ``token_map`` [truncated_vocab_size] (the
   vocabulary ids of the heads' rows). Names may carry a ``medusa_heads.`` prefix.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "medusa_lm_head.safetensors"
LEGACY_WEIGHTS_FILE = "medusa_lm_head.pt"       # what FasterDecoding/Medusa wrote before safetensors
TOKEN_MAP = "token_map"                         # vLLM's tensor name; also ours for a vocabulary subset


@dataclass
class MedusaConfig:
    hidden_size: int
    vocab_size: int                 # the target's vocabulary
    num_heads: int = 4              # medusa_num_heads
    num_layers: int = 1             # medusa_num_layers (residual blocks per head)
    shared_head: bool = True        # True: project with the target's LM head (no lm_head per head stored)
    base_model_name_or_path: str | None = None

    def __post_init__(self):
        for name, low in (("hidden_size", 1), ("vocab_size", 1), ("num_heads", 1), ("num_layers", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"MedusaConfig.{name} must be an integer >= {low}, got {value!r}")


class ResBlock(nn.Module):
    """``x + silu(linear(x))``; named as in FasterDecoding/Medusa so the state dict is the file's."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        # Medusa's initialization: the block starts as x + silu(b), close to the identity
        nn.init.zeros_(self.linear.weight)

    def forward(self, x: Tensor) -> Tensor:
        return x + F.silu(self.linear(x))


class Medusa(nn.Module):
    """``num_heads`` Medusa heads. ``self.heads[i]`` is ``Sequential(ResBlock * num_layers[, Linear])``:
    its state dict is the FasterDecoding/Medusa file's.

    ``token_map`` [V_sub] int64: the heads' rows are these vocabulary ids (a truncated
    vocabulary, as in vLLM's checkpoints); with ``shared_head``, the rows of the target's LM
    head the heads project with (a frequency-ranked subset, FR-Spec style). ``self.token_map``
    is it or None.
    """

    def __init__(self, config: MedusaConfig, *, token_map: Tensor | None = None):
        super().__init__()
        self.config = config
        if token_map is not None:
            token_map = _checked_token_map(token_map, config.vocab_size, "token_map")
        self.register_buffer("token_map", token_map)
        out_rows = config.vocab_size if token_map is None else token_map.numel()
        d = config.hidden_size
        self.heads = nn.ModuleList(
            nn.Sequential(*[ResBlock(d) for _ in range(config.num_layers)],
                          *([] if config.shared_head else [nn.Linear(d, out_rows, bias=False)]))
            for _ in range(config.num_heads))

    def forward(self, h: Tensor) -> Tensor:
        """``h`` [N, d] (any leading dims) -> states [N, num_heads, d] after each head's residual blocks."""
        self._check_hidden(h, "h")
        layers = self.config.num_layers
        return torch.stack([head[:layers](h) for head in self.heads], dim=-2)

    def logits(self, h: Tensor, head_weight: Tensor | None = None) -> Tensor:
        """``h`` [N, d] -> logits [N, num_heads, V_out].

        Own heads (``shared_head`` False): V_out = vocab_size, or len(token_map) when the heads
        cover a subset. Shared head: ``head_weight`` [V_sub, d] (the target's LM head, or its
        rows of a vocabulary subset) and V_out = V_sub.
        """
        states = self(h)
        if not self.config.shared_head:
            if head_weight is not None:
                raise ValueError("head_weight is only for shared_head Medusa; these heads have their own projection")
            layers = self.config.num_layers
            return torch.stack([head[layers](states[..., i, :]) for i, head in enumerate(self.heads)], dim=-2)
        self._check_head_weight(head_weight, states.dtype)
        return states @ head_weight.T

    def _check_hidden(self, h: Tensor, name: str) -> None:
        if not isinstance(h, Tensor) or h.dim() < 1 or h.shape[-1] != self.config.hidden_size:
            shape = tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__
            raise ValueError(f"{name} must be [N, {self.config.hidden_size}] (hidden_size), got {shape}")

    def _check_head_weight(self, head_weight: Tensor | None, dtype: torch.dtype) -> None:
        if head_weight is None:
            raise ValueError("head_weight [V_sub, d] (the target's LM head rows) is required: "
                             "this Medusa has shared_head=True")
        if head_weight.dim() != 2 or head_weight.shape[1] != self.config.hidden_size:
            raise ValueError(f"head_weight must be [V_sub, {self.config.hidden_size}], got {tuple(head_weight.shape)}")
        if head_weight.dtype != dtype:
            raise ValueError(f"head_weight is {head_weight.dtype} but the Medusa states are {dtype}")


def _checked_token_map(token_map: Tensor, vocab_size: int, name: str) -> Tensor:
    """``token_map`` as int64 [V_sub] after checking it holds distinct ids in [0, vocab_size)."""
    if not isinstance(token_map, Tensor) or token_map.dim() != 1 or token_map.is_floating_point() \
            or token_map.dtype == torch.bool:
        raise ValueError(f"{name} must be a 1-D integer tensor of vocabulary ids")
    token_map = token_map.long()
    if token_map.numel() and (int(token_map.min()) < 0 or int(token_map.max()) >= vocab_size):
        raise ValueError(f"{name} holds ids outside [0, {vocab_size}) (vocab_size)")
    if torch.unique(token_map).numel() != token_map.numel():
        raise ValueError(f"{name} holds a vocabulary id twice")
    return token_map


# --------------------------------------------------------------------------- training


def medusa_loss(model: Medusa, h: Tensor, tokens: Tensor, head_weight: Tensor | None = None,
                mask: Tensor | None = None, token_map: Tensor | None = None) -> tuple[Tensor, list[float]]:
    """Medusa-1 training loss over one sequence.

    ``h`` [L, d]: the target's hidden states (h[t] computed after reading tokens[t]);
    ``tokens`` [L]: the sequence's token ids; head ``i`` at row ``t`` is trained with cross-entropy
    to predict ``tokens[t + i + 2]``. ``head_weight`` [V_sub, d]: the target's LM head rows (shared
    head only). ``mask`` [L] bool: rows to train on (default all). ``token_map`` [V_sub]: the
    vocabulary ids of the projection's rows (default ``model.token_map``); targets outside it are
    skipped.

    Returns ``(loss, accuracy)``: the sum over heads of each head's mean CE over its valid rows
    (a scalar with grad), and each head's top-1 accuracy over those rows (nan for a head with none).
    """
    L = tokens.shape[0] if isinstance(tokens, Tensor) and tokens.dim() == 1 else None
    if L is None or tokens.is_floating_point() or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must be a 1-D integer tensor [L], got "
                         f"{tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__}")
    model._check_hidden(h, "h")
    if h.dim() != 2 or h.shape[0] != L:
        raise ValueError(f"h must be [L, d] with L = len(tokens) = {L}, got {tuple(h.shape)}")
    vocab_size = model.config.vocab_size
    if L and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise ValueError(f"tokens hold ids outside [0, {vocab_size}) (vocab_size)")
    if mask is None:
        mask = torch.ones(L, dtype=torch.bool, device=h.device)
    elif not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (L,):
        raise ValueError(f"mask must be a bool tensor [L] = [{L}]")
    if model.config.shared_head:
        model._check_head_weight(head_weight, h.dtype)
        out_rows = head_weight.shape[0]
    elif head_weight is not None:
        raise ValueError("head_weight is only for shared_head Medusa; these heads have their own projection")
    else:
        out_rows = model.heads[0][-1].out_features
    if token_map is None:
        token_map = model.token_map
    if token_map is not None:
        token_map = _checked_token_map(token_map, vocab_size, "token_map")
        if token_map.numel() != out_rows:
            raise ValueError(f"token_map has {token_map.numel()} ids but the projection has {out_rows} rows")
        # vocabulary id -> row of the projection, -1 outside the map
        row_of_id = torch.full((vocab_size,), -1, dtype=torch.long, device=tokens.device)
        row_of_id[token_map.to(tokens.device)] = torch.arange(out_rows, device=tokens.device)
        targets_all = row_of_id[tokens.long()]
    else:
        if out_rows != vocab_size:
            raise ValueError(f"the projection has {out_rows} rows, not vocab_size = {vocab_size}: give its token_map")
        targets_all = tokens.long()

    states = model(h)                                                  # [L, num_heads, d]
    layers = model.config.num_layers
    total = states.sum() * 0      # keeps a graph, so backward() works when no row has a target
    accuracy = []
    for i in range(model.config.num_heads):
        shift = i + 2
        rows = torch.nonzero(mask[:max(L - shift, 0)]).squeeze(1)
        targets = targets_all[rows + shift]
        keep = targets >= 0
        rows, targets = rows[keep], targets[keep]
        if rows.numel() == 0:
            accuracy.append(float("nan"))
            continue
        x = states[rows, i]                                            # [R, d]
        logits = x @ head_weight.T if model.config.shared_head else model.heads[i][layers](x)
        total = total + F.cross_entropy(logits.float(), targets)
        accuracy.append((logits.argmax(-1) == targets).float().mean().item())
    return total, accuracy


# --------------------------------------------------------------------------- checkpoints


def save_medusa(model: Medusa, path: str, *, dtype=torch.float16) -> None:
    """Write ``model`` as a FasterDecoding/Medusa folder: ``config.json`` + ``medusa_lm_head.safetensors``
    (weights in ``dtype``; a ``token_map`` tensor when the heads cover a vocabulary subset)."""
    config = model.config
    os.makedirs(path, exist_ok=True)
    tensors = {name: t.detach().to(device="cpu", dtype=dtype).contiguous()
               for name, t in model.heads.state_dict().items()}
    if model.token_map is not None:
        tensors[TOKEN_MAP] = model.token_map.detach().to("cpu", torch.int64).contiguous()
    save_file(tensors, os.path.join(path, WEIGHTS_FILE))
    with open(os.path.join(path, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump({"medusa_num_heads": config.num_heads, "medusa_num_layers": config.num_layers,
                   "base_model_name_or_path": config.base_model_name_or_path,
                   "hidden_size": config.hidden_size, "vocab_size": config.vocab_size,
                   "medusa_shared_head": config.shared_head}, f, indent=2)


def load_medusa(path: str, *, dtype=torch.float32, device="cpu") -> Medusa:
    """A :class:`Medusa` from a checkpoint folder in either layout (see the module docstring),
    weights as ``dtype`` on ``device``. Bad checkpoints raise ValueError naming the file and the
    config field or tensor."""
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise ValueError(f"{path} is not a Medusa checkpoint folder: it has no {CONFIG_FILE}")
    with open(config_path, encoding="utf-8") as f:
        raw = json.load(f)
    if raw.get("model_type") == "medusa":
        model = _load_vllm(path, config_path, raw)
    elif "medusa_num_heads" in raw:
        model = _load_original(path, config_path, raw)
    else:
        raise ValueError(f"{config_path}: neither a Medusa config (medusa_num_heads) "
                         f"nor a vLLM Medusa config (model_type 'medusa')")
    return model.to(device=device, dtype=dtype).eval()


def _config_int(raw: dict, key: str, config_path: str, *, low: int = 1, default=None) -> int:
    value = raw.get(key, default)
    if value is None:
        raise ValueError(f"{config_path}: missing field {key!r}")
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{config_path}: field {key!r} must be an integer >= {low}, got {value!r}")
    return value


def _load_original(path: str, config_path: str, raw: dict) -> Medusa:
    num_heads = _config_int(raw, "medusa_num_heads", config_path)
    num_layers = _config_int(raw, "medusa_num_layers", config_path, low=0)
    shared = raw.get("medusa_shared_head", False)
    if not isinstance(shared, bool):
        raise ValueError(f"{config_path}: field 'medusa_shared_head' must be true or false, got {shared!r}")
    weights_path = os.path.join(path, WEIGHTS_FILE)
    if os.path.isfile(weights_path):
        tensors = load_file(weights_path)
    elif os.path.isfile(os.path.join(path, LEGACY_WEIGHTS_FILE)):
        weights_path = os.path.join(path, LEGACY_WEIGHTS_FILE)
        tensors = torch.load(weights_path, map_location="cpu", weights_only=True)
        if not isinstance(tensors, dict):
            raise ValueError(f"{weights_path} does not hold a state dict")
    else:
        raise ValueError(f"{path} has no {WEIGHTS_FILE} (nor {LEGACY_WEIGHTS_FILE})")
    token_map = tensors.pop(TOKEN_MAP, None)

    # FasterDecoding/Medusa's own config.json has no hidden_size / vocab_size: read them off the tensors
    hidden_size, vocab_size = raw.get("hidden_size"), raw.get("vocab_size")
    if hidden_size is None:
        probe = "0.0.linear.weight" if num_layers else f"0.{num_layers}.weight"
        if probe not in tensors:
            raise ValueError(f"{config_path}: missing field 'hidden_size' (and {weights_path} has no {probe!r})")
        hidden_size = tensors[probe].shape[-1]
    if vocab_size is None:
        if shared or token_map is not None or f"0.{num_layers}.weight" not in tensors:
            raise ValueError(f"{config_path}: missing field 'vocab_size'")
        vocab_size = tensors[f"0.{num_layers}.weight"].shape[0]
    hidden_size = _config_int({"hidden_size": hidden_size}, "hidden_size", config_path)
    vocab_size = _config_int({"vocab_size": vocab_size}, "vocab_size", config_path)

    config = MedusaConfig(hidden_size=hidden_size, vocab_size=vocab_size, num_heads=num_heads,
                          num_layers=num_layers, shared_head=shared,
                          base_model_name_or_path=raw.get("base_model_name_or_path"))
    try:
        model = Medusa(config, token_map=token_map)
    except ValueError as e:
        raise ValueError(f"{weights_path}: tensor {TOKEN_MAP!r}: {e}") from None
    _install(model.heads, tensors, weights_path)
    return model


def _load_vllm(path: str, config_path: str, raw: dict) -> Medusa:
    """vLLM's Medusa (vllm/model_executor/models/medusa.py): the same blocks with the bias only when
    ``medusa_fc_bias``; own LM heads, one for all heads when ``original_lm_head``; logits scaled
    by ``logit_scale``; a truncated vocabulary given by the ``token_map`` tensor."""
    from .loaders import _safetensors_files

    # vLLM's MedusaConfig.from_pretrained also takes any "*num*heads*" / "*num*layers*" key
    num_heads = _config_int(raw, "num_heads", config_path)
    num_layers = _config_int(raw, "num_hidden_layers", config_path, low=0)
    hidden_size = _config_int(raw, "hidden_size", config_path)
    vocab_size = _config_int(raw, "vocab_size", config_path)
    truncated = _config_int(raw, "truncated_vocab_size", config_path, default=vocab_size)
    if truncated > vocab_size:
        raise ValueError(f"{config_path}: field 'truncated_vocab_size' ({truncated}) exceeds vocab_size ({vocab_size})")
    bias = raw.get("medusa_fc_bias", False)
    one_lm_head = raw.get("original_lm_head", False)
    scale = raw.get("logit_scale", 1.0)
    for key, value in (("medusa_fc_bias", bias), ("original_lm_head", one_lm_head)):
        if not isinstance(value, bool):
            raise ValueError(f"{config_path}: field {key!r} must be true or false, got {value!r}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise ValueError(f"{config_path}: field 'logit_scale' must be a number, got {scale!r}")

    files = _safetensors_files(path)
    weights_path = files[0] if len(files) == 1 else path
    tensors = {}
    for file in files:
        for name, tensor in load_file(file).items():
            tensors[name.removeprefix("medusa_heads.")] = tensor

    token_map = tensors.pop(TOKEN_MAP, None)
    if truncated < vocab_size and token_map is None:
        raise ValueError(f"{weights_path}: missing tensor {TOKEN_MAP!r} "
                         f"(truncated_vocab_size {truncated} < vocab_size {vocab_size})")
    if truncated == vocab_size and token_map is not None:
        raise ValueError(f"{weights_path}: unexpected tensor {TOKEN_MAP!r} "
                         f"(truncated_vocab_size equals vocab_size in {config_path})")
    if token_map is not None and tuple(token_map.shape) != (truncated,):
        raise ValueError(f"{weights_path}: tensor {TOKEN_MAP!r} has shape {tuple(token_map.shape)}, "
                         f"expected ({truncated},) (truncated_vocab_size)")

    config = MedusaConfig(hidden_size=hidden_size, vocab_size=vocab_size, num_heads=num_heads,
                          num_layers=num_layers, shared_head=False,
                          base_model_name_or_path=raw.get("base_model_name_or_path"))
    try:
        model = Medusa(config, token_map=token_map)
    except ValueError as e:
        raise ValueError(f"{weights_path}: tensor {TOKEN_MAP!r}: {e}") from None

    # rename to our state dict, then check it as for the original layout
    lm_head_name = ("lm_heads.0.weight" if "lm_heads.0.weight" in tensors or "lm_head.weight" not in tensors
                    else "lm_head.weight")
    renamed, vllm_names = {}, {}
    for i in range(num_heads):
        for j in range(num_layers):
            for part in ("weight", "bias") if bias else ("weight",):
                vllm_names[f"{i}.{j}.linear.{part}"] = name = f"blocks.{i}.layers.{j}.{part}"
                if name in tensors:
                    renamed[f"{i}.{j}.linear.{part}"] = tensors.pop(name)
            if not bias:     # vLLM builds these Linears without a bias
                renamed[f"{i}.{j}.linear.bias"] = torch.zeros(hidden_size)
        # original_lm_head: one head, every Medusa head reads it
        vllm_names[f"{i}.{num_layers}.weight"] = lm_head_name if one_lm_head else f"lm_heads.{i}.weight"
    for i in range(1 if one_lm_head else num_heads):
        name = vllm_names[f"{i}.{num_layers}.weight"]
        if name not in tensors:
            continue
        weight = tensors.pop(name)
        # vLLM cuts a full-vocabulary head down to the token map's rows
        if token_map is not None and weight.dim() == 2 and weight.shape[0] == vocab_size:
            weight = weight[token_map.long()]
        if scale != 1.0:       # vLLM multiplies the logits by logit_scale: fold it into the head
            weight = weight * scale
        for head in range(num_heads) if one_lm_head else [i]:
            renamed[f"{head}.{num_layers}.weight"] = weight
    if tensors:                # what no rename consumed
        raise ValueError(f"{weights_path}: unexpected tensor {next(iter(tensors))!r}")
    _install(model.heads, renamed, weights_path, names=vllm_names.get)
    return model


def _install(heads: nn.ModuleList, tensors: dict[str, Tensor], weights_path: str, names=lambda name: name) -> None:
    """Load ``tensors`` into ``heads`` (float32), refusing missing, unexpected and misshapen tensors."""
    expected = heads.state_dict()
    for name in tensors:
        if name not in expected:
            raise ValueError(f"{weights_path}: unexpected tensor {names(name)!r}")
    for name, target in expected.items():
        if name not in tensors:
            raise ValueError(f"{weights_path}: missing tensor {names(name)!r}")
        if tensors[name].shape != target.shape:
            raise ValueError(f"{weights_path}: tensor {names(name)!r} has shape {tuple(tensors[name].shape)}, "
                             f"expected {tuple(target.shape)}")
        if not tensors[name].is_floating_point():
            raise ValueError(f"{weights_path}: tensor {names(name)!r} is {tensors[name].dtype}, not floating point")
    heads.load_state_dict({name: t.float() for name, t in tensors.items()})


__all__ = ["MedusaConfig", "Medusa", "ResBlock", "load_medusa", "save_medusa", "medusa_loss"]
