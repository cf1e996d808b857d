"""Reading GGUF files (llama.cpp's checkpoint format) into a Hugging Face-style config,
a float32 state dict with Hugging Face parameter names, and a tokenizer spec.

File layout (GGUF v2/v3, little-endian):

    magic "GGUF" | version u32 | tensor_count u64 | kv_count u64
    kv_count × (key: string, value_type: u32, value)        metadata
    tensor_count × (name: string, n_dims: u32, ne: u64 × n_dims, ggml_type: u32, offset: u64)
    padding to `general.alignment` (default 32)
    tensor data; each tensor at data_start + offset

    string = length u64 + UTF-8 bytes;  array = element_type u32 + count u64 + elements

A tensor's ``ne`` lists dimensions innermost first, so a torch shape is ``ne`` reversed;
quantized types pack the innermost dimension in blocks of ``block_size`` values.

Only this module reads the format: the ``gguf`` package serves as an oracle in the tests.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# llama.cpp architecture name -> Hugging Face class; model_type is the architecture name itself.
SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# --------------------------------------------------------------------------- metadata values

_STRING, _ARRAY = 8, 9
# value type -> (struct format, numpy dtype) for the fixed-size types
_SCALAR_TYPES = {
    0: ("<B", np.dtype("<u1")), 1: ("<b", np.dtype("<i1")), 2: ("<H", np.dtype("<u2")), 3: ("<h", np.dtype("<i2")),
    4: ("<I", np.dtype("<u4")), 5: ("<i", np.dtype("<i4")), 6: ("<f", np.dtype("<f4")), 7: ("<?", np.dtype("?")),
    10: ("<Q", np.dtype("<u8")), 11: ("<q", np.dtype("<i8")), 12: ("<d", np.dtype("<f8")),
}
_FLOAT32 = 6


class _Cursor:
    """Sequential little-endian reads from a buffer (the mapped file)."""

    def __init__(self, buffer, offset: int = 0):
        self.buffer = buffer
        self.offset = offset

    def scalar(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.buffer, self.offset)
        self.offset += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.scalar("<Q")
        raw = self.buffer[self.offset:self.offset + length]
        self.offset += length
        return raw.decode("utf-8", errors="replace")

    def value(self, value_type: int) -> Any:
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            element_type, count = self.scalar("<I"), self.scalar("<Q")
            if element_type in _SCALAR_TYPES:
                dtype = _SCALAR_TYPES[element_type][1]
                values = np.frombuffer(self.buffer, dtype=dtype, count=count, offset=self.offset)
                self.offset += count * dtype.itemsize
                return values.tolist()
            return [self.value(element_type) for _ in range(count)]
        if value_type not in _SCALAR_TYPES:
            raise ValueError(f"GGUF metadata value of unknown type {value_type} at byte {self.offset}")
        value = self.scalar(_SCALAR_TYPES[value_type][0])
        if value_type == _FLOAT32:
            # The shortest decimal that is this float32 (1e-05, not 9.999999747378752e-06): the value
            # the writer meant, as in the config.json it came from.
            value = float(str(np.float32(value)))
        return value


# --------------------------------------------------------------------------- dequantization
#
# numpy, one thread: torch's elementwise ops would use all cores, but on a shared machine their
# many short parallel regions (a few per tensor) slow down tenfold when another process holds a
# core, while this runs the 135M model in about a second either way. Each function maps raw
# blocks, uint8 [n_blocks, block_bytes], to float32 [n_blocks, block_size], in the same order of
# float operations as ggml's reference code (so results are bit-exact).

def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 at bytes [start, start + 2) of every block, as float32 [n_blocks, 1]."""
    return np.ascontiguousarray(blocks[:, start:start + 2]).view(np.float16).astype(np.float32)


def _nibbles(packed: np.ndarray, group: int) -> np.ndarray:
    """uint8 [n, G·group] -> float32 [n, G·2·group]: per group of ``group`` bytes, the low nibbles, then the high ones."""
    n = packed.shape[0]
    grouped = packed.reshape(n, -1, group)
    # written straight into the float32 result: a pass less than stacking, then converting
    values = np.empty((n, grouped.shape[1], 2, group), dtype=np.float32)
    np.bitwise_and(grouped, 0x0F, out=values[:, :, 0], casting="unsafe")
    np.right_shift(grouped, 4, out=values[:, :, 1], casting="unsafe")
    return values.reshape(n, -1)


def _dequantize_f32(blocks):
    return blocks.view(np.float32).copy()  # a copy, not a view of the mapped file


def _dequantize_f16(blocks):
    return blocks.view(np.float16).astype(np.float32)


def _dequantize_bf16(blocks):
    # bfloat16 is the high half of a float32
    return (blocks.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def _dequantize_q8_0(blocks):
    # d f16 | 32 × int8
    values = blocks[:, 2:].view(np.int8).astype(np.float32)
    values *= _f16(blocks, 0)
    return values


def _dequantize_q4_0(blocks):
    # d f16 | 16 bytes: values 0-15 in the low nibbles, 16-31 in the high ones, offset by 8
    values = _nibbles(blocks[:, 2:], 16)
    values -= 8.0
    values *= _f16(blocks, 0)
    return values


def _dequantize_q4_1(blocks):
    # d f16 | m f16 | 16 bytes of nibbles as in Q4_0, unsigned: x = d·q + m
    values = _nibbles(blocks[:, 4:], 16)
    values *= _f16(blocks, 0)
    values += _f16(blocks, 2)
    return values


def _q4_k_scales_and_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 bytes [n, 12] -> eight 6-bit scales and eight 6-bit mins, each uint8 [n, 8].

    Bytes 0-3 hold scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7; bytes 4-7 the
    same for the mins; bytes 8-11 the low 4 bits of scale 4+j (low nibble) and min 4+j (high).
    """
    scales_lo, mins_lo, low_bits_4_7 = (packed.reshape(-1, 3, 4)[:, row] for row in range(3))
    scales = np.concatenate([scales_lo & 0x3F, (low_bits_4_7 & 0x0F) | ((scales_lo >> 2) & 0x30)], axis=1)
    mins = np.concatenate([mins_lo & 0x3F, (low_bits_4_7 >> 4) | ((mins_lo >> 2) & 0x30)], axis=1)
    return scales, mins


def _dequantize_q4_k(blocks):
    # d f16 | dmin f16 | 12 bytes of scales/mins | 128 bytes of nibbles; 8 sub-blocks of 32 values,
    # x = d·scale_j·q − dmin·min_j. Each 32-byte group gives a sub-block of low nibbles, then one of high.
    n = blocks.shape[0]
    scales, mins = _q4_k_scales_and_mins(blocks[:, 4:16])
    values = _nibbles(blocks[:, 16:], 32).reshape(n, 8, 32)
    values *= (_f16(blocks, 0) * scales.astype(np.float32)).reshape(n, 8, 1)
    values -= (_f16(blocks, 2) * mins.astype(np.float32)).reshape(n, 8, 1)
    return values.reshape(n, 256)


def _dequantize_q6_k(blocks):
    # ql 128 bytes (low 4 bits) | qh 64 bytes (high 2 bits) | 16 × int8 scales | d f16;
    # 16 sub-blocks of 16 values, x = d·scale_j·(q − 32). Per half of 128 values: 64 bytes of ql
    # give values 0-63 in their low nibbles and 64-127 in the high; 32 bytes of qh give bits 4-5
    # of values 0-31, 32-63, 64-95, 96-127 at bit offsets 0, 2, 4, 6.
    n = blocks.shape[0]
    ql = blocks[:, :128].reshape(n, 2, 1, 64)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2).reshape(n, 8, 32)
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32)
    high = np.concatenate([(qh >> shift) & 0x03 for shift in (0, 2, 4, 6)], axis=2).reshape(n, 8, 32)
    values = (low | (high << 4)).astype(np.float32).reshape(n, 16, 16)
    values -= 32.0
    values *= (_f16(blocks, 208) * blocks[:, 192:208].view(np.int8).astype(np.float32)).reshape(n, 16, 1)
    return values.reshape(n, 256)


@dataclass(frozen=True)
class GGMLType:
    name: str
    block_size: int   # values per block
    block_bytes: int  # bytes per block
    dequantize: Callable[[np.ndarray], np.ndarray]  # uint8 [n_blocks, block_bytes] -> float32 [n_blocks, block_size]


GGML_TYPES = {
    0: GGMLType("F32", 1, 4, _dequantize_f32),
    1: GGMLType("F16", 1, 2, _dequantize_f16),
    2: GGMLType("Q4_0", 32, 18, _dequantize_q4_0),
    3: GGMLType("Q4_1", 32, 20, _dequantize_q4_1),
    8: GGMLType("Q8_0", 32, 34, _dequantize_q8_0),
    12: GGMLType("Q4_K", 256, 144, _dequantize_q4_k),
    14: GGMLType("Q6_K", 256, 210, _dequantize_q6_k),
    30: GGMLType("BF16", 1, 2, _dequantize_bf16),
}

# Names of the ggml types this reader cannot dequantize, for error messages.
_UNSUPPORTED_TYPE_NAMES = {
    6: "Q5_0", 7: "Q5_1", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 13: "Q5_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS",
    24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}


def ggml_type_name(ggml_type: int) -> str:
    if ggml_type in GGML_TYPES:
        return GGML_TYPES[ggml_type].name
    return _UNSUPPORTED_TYPE_NAMES.get(ggml_type, f"type {ggml_type}")


def dequantize(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw tensor bytes (uint8 numpy array, any shape) of ``ggml_type`` -> float32 tensor of
    ``shape`` (torch order: innermost dimension last, a multiple of the block size)."""
    if ggml_type not in GGML_TYPES:
        raise ValueError(f"cannot dequantize ggml type {ggml_type_name(ggml_type)}; "
                         f"supported: {', '.join(t.name for t in GGML_TYPES.values())}")
    kind = GGML_TYPES[ggml_type]
    blocks = raw.reshape(-1, kind.block_bytes)
    if blocks.shape[0] * kind.block_size != math.prod(shape):
        raise ValueError(f"{blocks.shape[0]} {kind.name} blocks do not hold a tensor of shape {tuple(shape)}")
    return torch.from_numpy(kind.dequantize(blocks).reshape(shape))


# --------------------------------------------------------------------------- file

@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (GGUF's ne reversed)
    ggml_type: int
    offset: int             # absolute byte offset in the file

    @property
    def num_bytes(self) -> int:
        kind = GGML_TYPES[self.ggml_type]
        return math.prod(self.shape) // kind.block_size * kind.block_bytes


@dataclass
class GGUFFile:
    """A parsed GGUF header over the memory-mapped file; tensor data is read on demand."""
    path: str
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    buffer: mmap.mmap

    def raw(self, info: TensorInfo) -> np.ndarray:
        """The tensor's bytes (uint8 [num_bytes]), a view of the mapped file."""
        return np.frombuffer(self.buffer, dtype=np.uint8, count=info.num_bytes, offset=info.offset)

    def tensor(self, name: str) -> torch.Tensor:
        """Tensor ``name`` dequantized to float32, in torch shape."""
        info = self.tensors[name]
        return dequantize(self.raw(info), info.ggml_type, info.shape)


def open_gguf(path: str) -> GGUFFile:
    """Parse the header (metadata and tensor infos) of the GGUF file at ``path``."""
    with open(path, "rb") as f:
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if buffer[:4] != GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file (magic {bytes(buffer[:4])!r}, expected {GGUF_MAGIC!r})")
    cursor = _Cursor(buffer, 4)
    version = cursor.scalar("<I")
    if version not in SUPPORTED_VERSIONS:
        if version & 0xFFFF == 0 and struct.unpack(">I", struct.pack("<I", version))[0] in SUPPORTED_VERSIONS:
            raise ValueError(f"{path} is a big-endian GGUF; only little-endian files are supported")
        raise ValueError(f"{path}: GGUF version {version} is not supported (supported: {SUPPORTED_VERSIONS})")
    tensor_count, kv_count = cursor.scalar("<Q"), cursor.scalar("<Q")

    metadata = {}
    for _ in range(kv_count):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.scalar("<I"))

    infos = []
    for _ in range(tensor_count):
        name = cursor.string()
        ne = [cursor.scalar("<Q") for _ in range(cursor.scalar("<I"))]
        infos.append((name, tuple(reversed(ne)), cursor.scalar("<I"), cursor.scalar("<Q")))
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    data_start = -(-cursor.offset // alignment) * alignment
    tensors = {name: TensorInfo(name, shape, ggml_type, data_start + offset) for name, shape, ggml_type, offset in infos}
    return GGUFFile(path, version, metadata, tensors, buffer)


# --------------------------------------------------------------------------- Hugging Face names and config

_GLOBAL_TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSOR_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# llama.cpp's precomputed Llama-3 rotary divisors; they become config["rope_scaling"], not a weight
_ROPE_FREQS = "rope_freqs.weight"


def hf_tensor_name(gguf_name: str) -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight' (ValueError when unknown)."""
    if gguf_name in _GLOBAL_TENSOR_NAMES:
        return _GLOBAL_TENSOR_NAMES[gguf_name]
    prefix, _, rest = gguf_name.partition(".")
    layer, _, suffix = rest.partition(".")
    if prefix == "blk" and layer.isdigit() and suffix in _LAYER_TENSOR_NAMES:
        return f"model.layers.{layer}.{_LAYER_TENSOR_NAMES[suffix]}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face counterpart in fastverify's models")


def unpermute_rotary(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (llama arch) for a weight [H·D, in] or bias [H·D].

    Hugging Face rotates the two halves of each head (rows i and i + D/2 pair up); llama.cpp's
    converter reorders each head's rows to interleaved pairs (2j, 2j+1), i.e. views the head as
    [2, D/2] and transposes it to [D/2, 2]. Here the head is viewed as [D/2, 2] and transposed back.
    """
    rows = weight.shape[0]
    half = rows // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape).contiguous()


def _llama3_rope_scaling(rope_factors: torch.Tensor, rope_theta: float, head_dim: int) -> dict:
    """Hugging Face's llama3 ``rope_scaling`` from llama.cpp's per-frequency divisors [head_dim / 2].

    For each rotary frequency with wavelength w, the divisor is 1 when w < old_ctx / high,
    ``factor`` when w > old_ctx / low, and 1 / ((1 − s) / factor + s) between, with
    s = (old_ctx / w − low) / (high − low), a line in 1 / w. Only that line is recoverable, so
    low_freq_factor is taken as 1 (as in every Llama 3.x); any choice on the line gives the same
    frequencies.
    """
    divisors = rope_factors.double()
    factor = divisors.max().item()
    inv_freq = 1.0 / rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    inv_wavelen = inv_freq / (2 * math.pi)
    between = (divisors > 1 + 1e-6) & (divisors < factor * (1 - 1e-6))
    if between.sum() < 2:
        raise ValueError("cannot recover the llama3 rope scaling from rope_freqs.weight: "
                         "it has fewer than two frequencies in the interpolated band")
    smooth = (1 / divisors[between] - 1 / factor) / (1 - 1 / factor)
    x = inv_wavelen[between]
    slope = ((x - x.mean()) * (smooth - smooth.mean())).sum() / ((x - x.mean()) ** 2).sum()
    intercept = smooth.mean() - slope * x.mean()  # = −low / (high − low)
    band = -1 / intercept.item()                  # high − low, with low = 1

    def significant(value: float) -> float:  # float32 divisors carry about 6 significant digits
        return float(f"{value:.6g}")

    return {
        "rope_type": "llama3", "factor": significant(factor), "low_freq_factor": 1.0,
        "high_freq_factor": significant(1.0 + band), "original_max_position_embeddings": round(slope.item() * band),
    }


def _rope_scaling(arch: str, metadata: dict, gguf_file: GGUFFile, rope_theta: float, head_dim: int) -> dict | None:
    if _ROPE_FREQS in gguf_file.tensors:
        return _llama3_rope_scaling(gguf_file.tensor(_ROPE_FREQS), rope_theta, head_dim)
    kind = metadata.get(f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    scaling = {"rope_type": kind, "factor": metadata.get(f"{arch}.rope.scaling.factor", 1.0)}
    if f"{arch}.rope.scaling.original_context_length" in metadata:
        scaling["original_max_position_embeddings"] = metadata[f"{arch}.rope.scaling.original_context_length"]
    return scaling


def _config(arch: str, gguf_file: GGUFFile) -> dict:
    """The Hugging Face config.json dict the metadata describes."""
    metadata = gguf_file.metadata
    tensors = gguf_file.tensors

    def key(name: str, default: Any = None) -> Any:
        full = f"{arch}.{name}"
        if full not in metadata and default is None:
            raise ValueError(f"{gguf_file.path}: GGUF metadata lacks {full!r}")
        return metadata.get(full, default)

    num_heads = key("attention.head_count")
    # key_length is written when head_dim is not hidden_size / num_heads (Qwen3); Q's rows say it always
    head_dim = key("attention.key_length", tensors["blk.0.attn_q.weight"].shape[0] // num_heads)
    rope_theta = key("rope.freq_base", 10000.0)
    config = {
        "architectures": [SUPPORTED_ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": key("embedding_length"),
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": key("attention.head_count_kv", num_heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon"),
        "rope_theta": rope_theta,
        "rope_scaling": _rope_scaling(arch, metadata, gguf_file, rope_theta, head_dim),
        "vocab_size": tensors["token_embd.weight"].shape[0],
        "max_position_embeddings": key("context_length"),
        # llama.cpp writes the output projection only when it is not the embedding matrix
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
    }
    if "tokenizer.ggml.padding_token_id" in metadata:
        config["pad_token_id"] = metadata["tokenizer.ggml.padding_token_id"]
    return config


def _check_supported(gguf_file: GGUFFile) -> str:
    """The architecture, after checking that every tensor can be read; raises ValueError otherwise."""
    arch = gguf_file.metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{gguf_file.path}: GGUF architecture {arch!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    for info in gguf_file.tensors.values():
        if info.ggml_type not in GGML_TYPES:
            raise ValueError(f"{gguf_file.path}: tensor {info.name!r} has ggml type {ggml_type_name(info.ggml_type)}, "
                             f"which fastverify cannot dequantize (supported: "
                             f"{', '.join(t.name for t in GGML_TYPES.values())})")
        if info.name != _ROPE_FREQS:
            hf_tensor_name(info.name)
        if info.offset + info.num_bytes > len(gguf_file.buffer):
            raise ValueError(f"{gguf_file.path}: tensor {info.name!r} ends past the end of the file (truncated?)")
    for required in ("token_embd.weight", "blk.0.attn_q.weight"):
        if required not in gguf_file.tensors:
            raise ValueError(f"{gguf_file.path}: GGUF has no {required!r} tensor")
    return arch


def read_gguf(path: str) -> tuple[dict, dict[str, torch.Tensor], dict | None]:
    """Read a llama / qwen2 / qwen3 GGUF file.

    Returns ``(config, state_dict, tokenizer_spec)``: a Hugging Face config.json dict; float32
    tensors under Hugging Face names and shapes ([out, in] weights), Q/K rows of llama-arch
    files put back in Hugging Face's rotary layout, no ``lm_head.weight`` when the embeddings
    are tied; and ``{"format": "gguf", "metadata": {every tokenizer.* key}}`` for
    ``Tokenizer.from_spec`` (None when the file holds no vocabulary). Unsupported
    architectures, tensor types or tensor names raise ``ValueError`` before anything is
    dequantized.
    """
    gguf_file = open_gguf(path)
    arch = _check_supported(gguf_file)
    config = _config(arch, gguf_file)

    heads = rotary_heads(arch, config)
    state_dict = {}
    for name in gguf_file.tensors:
        if name == _ROPE_FREQS:
            continue
        tensor = gguf_file.tensor(name)
        role = name.split(".")[2] if name.startswith("blk.") else None  # blk.{i}.{role}.{weight|bias}
        if role in heads:
            tensor = unpermute_rotary(tensor, heads[role])
        state_dict[hf_tensor_name(name)] = tensor
    return config, state_dict, tokenizer_spec(gguf_file)


def rotary_heads(arch: str, config: dict) -> dict[str, int]:
    """{tensor role: heads} of the tensors stored in llama.cpp's rotary row order: Q and K of
    llama-arch files (qwen2 / qwen3 files keep Hugging Face's order)."""
    if arch != "llama":
        return {}
    return {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}


def tokenizer_spec(gguf_file: GGUFFile) -> dict | None:
    """``{"format": "gguf", "metadata": {every tokenizer.* key}}`` for ``Tokenizer.from_spec``,
    None when the file holds no vocabulary."""
    metadata = {k: v for k, v in gguf_file.metadata.items() if k.startswith("tokenizer.")}
    return {"format": "gguf", "metadata": metadata} if "tokenizer.ggml.tokens" in metadata else None
