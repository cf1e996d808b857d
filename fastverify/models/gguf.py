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

``open_gguf`` checks the layout as ggml's gguf.cpp does (and ``_config`` the metadata and tensor
shapes a model needs) before anything is allocated or read: a malformed file raises ``GGUFError``,
a ValueError naming the field or tensor at fault.

Only this module reads the format: the ``gguf`` package serves as an oracle in the tests.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_ALIGNMENT = 1 << 16  # writers pad to 32 (or a page at most); a larger general.alignment is corruption
GGML_MAX_DIMS = 4        # ggml's limit on a tensor's dimensions
GGML_MAX_NAME = 64       # ggml's tensor name buffer, terminating NUL included
_MAX_ARRAY_NESTING = 4   # arrays of arrays of ... (no writer nests deeper; bounds the recursion)

# llama.cpp architecture name -> Hugging Face class; model_type is the architecture name itself.
SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


class GGUFError(ValueError):
    """A malformed GGUF file, or one whose contents do not describe a model fastverify can load.
    The message names the file and the field or tensor at fault."""


def _short(value: Any) -> str:
    """repr of a metadata value for an error message, long lists and strings cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------- metadata values

_UINT32, _STRING, _ARRAY = 4, 8, 9
# value type -> (struct format, numpy dtype) for the fixed-size types
_SCALAR_TYPES = {
    0: ("<B", np.dtype("<u1")), 1: ("<b", np.dtype("<i1")), 2: ("<H", np.dtype("<u2")), 3: ("<h", np.dtype("<i2")),
    4: ("<I", np.dtype("<u4")), 5: ("<i", np.dtype("<i4")), 6: ("<f", np.dtype("<f4")), 7: ("<?", np.dtype("?")),
    10: ("<Q", np.dtype("<u8")), 11: ("<q", np.dtype("<i8")), 12: ("<d", np.dtype("<f8")),
}
_FLOAT32 = 6
# the fewest bytes an array element of a variable-size type takes: a string's length; a nested
# array's element type and count
_MIN_ELEMENT_BYTES = {_STRING: 8, _ARRAY: 4 + 8}


def _label(what: str, index: int | None) -> str:
    return what if index is None else f"{what}[{index}]"


class _Cursor:
    """Sequential little-endian reads from a buffer (the mapped file), each checked against the
    buffer's end before it happens. ``what`` names the field read, for the error message."""

    def __init__(self, buffer, path: str, offset: int = 0):
        self.buffer = buffer
        self.path = path
        self.offset = offset

    @property
    def remaining(self) -> int:
        return len(self.buffer) - self.offset

    def error(self, message: str) -> GGUFError:
        return GGUFError(f"{self.path}: {message}")

    def need(self, num_bytes: int, what: str) -> None:
        if num_bytes > self.remaining:
            raise self.error(f"{what} at byte {self.offset} needs {num_bytes} bytes, but the file ends "
                             f"{self.remaining} bytes later (truncated?)")

    def scalar(self, fmt: str, what: str):
        size = struct.calcsize(fmt)
        self.need(size, what)
        (value,) = struct.unpack_from(fmt, self.buffer, self.offset)
        self.offset += size
        return value

    def string(self, what: str, index: int | None = None) -> str:
        """A string (u64 length + UTF-8 bytes). ``index``, an array element's, joins ``what`` in
        error messages only: labelling every token of a vocabulary would cost more than reading it."""
        if self.remaining < 8:
            self.need(8, f"the length of {_label(what, index)}")  # raises
        length = struct.unpack_from("<Q", self.buffer, self.offset)[0]
        start = self.offset + 8
        if length > len(self.buffer) - start:
            raise self.error(f"{_label(what, index)} at byte {start} claims {length} bytes, but the file ends "
                             f"{len(self.buffer) - start} bytes later (truncated?)")
        try:
            text = self.buffer[start:start + length].decode("utf-8")
        except UnicodeDecodeError as error:
            raise self.error(f"{_label(what, index)} at byte {start} is not valid UTF-8 "
                             f"({error.reason} at its byte {error.start})") from None
        self.offset = start + length
        return text

    def value(self, value_type: int, what: str, depth: int = 0) -> Any:
        if value_type == _STRING:
            return self.string(what)
        if value_type == _ARRAY:
            return self.array(what, depth)
        if value_type not in _SCALAR_TYPES:
            raise self.error(f"{what} has unknown value type {value_type}")
        value = self.scalar(_SCALAR_TYPES[value_type][0], what)
        if value_type == _FLOAT32:
            # The shortest decimal that is this float32 (1e-05, not 9.999999747378752e-06): the value
            # the writer meant, as in the config.json it came from.
            value = float(str(np.float32(value)))
        return value

    def array(self, what: str, depth: int = 0) -> list:
        element_type = self.scalar("<I", f"the element type of {what}")
        count = self.scalar("<Q", f"the element count of {what}")
        if element_type in _SCALAR_TYPES:
            element_bytes = _SCALAR_TYPES[element_type][1].itemsize
        elif element_type in _MIN_ELEMENT_BYTES:
            element_bytes = _MIN_ELEMENT_BYTES[element_type]
        else:
            raise self.error(f"{what} is an array of unknown value type {element_type}")
        if count * element_bytes > self.remaining:
            raise self.error(f"{what} claims {count} elements, at least {count * element_bytes} bytes, but the "
                             f"file ends {self.remaining} bytes later")
        if element_type in _SCALAR_TYPES:
            values = np.frombuffer(self.buffer, dtype=_SCALAR_TYPES[element_type][1], count=count, offset=self.offset)
            self.offset += count * element_bytes
            return values.tolist()
        if element_type == _STRING:
            return [self.string(what, index) for index in range(count)]
        if depth + 1 >= _MAX_ARRAY_NESTING:
            raise self.error(f"{what} nests arrays more than {_MAX_ARRAY_NESTING} deep")
        return [self.array(f"{what}[{index}]", depth + 1) for index in range(count)]


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

# The ggml types this reader cannot dequantize: name, values per block, bytes per block (ggml's
# type traits), so that a file holding them still has its layout checked and its error names the type.
_UNSUPPORTED_TYPES = {
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 9: ("Q8_1", 32, 36), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    13: ("Q5_K", 256, 176), 15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4),
    27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}
# Names of the ggml types this reader cannot dequantize, for error messages.
_UNSUPPORTED_TYPE_NAMES = {ggml_type: name for ggml_type, (name, _, _) in _UNSUPPORTED_TYPES.items()}
# every ggml type a file may hold -> (values per block, bytes per block)
_BLOCK_LAYOUTS = {**{t: (k.block_size, k.block_bytes) for t, k in GGML_TYPES.items()},
                  **{t: (size, nbytes) for t, (_, size, nbytes) in _UNSUPPORTED_TYPES.items()}}


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
    shape = tuple(shape)
    if raw.dtype != np.uint8:
        raise ValueError(f"dequantize: raw must be uint8 bytes, not {raw.dtype}")
    if not shape or min(shape) < 1 or shape[-1] % kind.block_size:
        raise ValueError(f"dequantize: shape {shape} is not a {kind.name} tensor's: every dimension must be ≥ 1 and "
                         f"the innermost a multiple of {kind.block_size}")
    if raw.size != math.prod(shape) // kind.block_size * kind.block_bytes:
        raise ValueError(f"{raw.size} bytes ({raw.size / kind.block_bytes:g} {kind.name} blocks) do not hold a "
                         f"tensor of shape {shape}")
    blocks = raw.reshape(-1, kind.block_bytes)
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
        block_size, block_bytes = _BLOCK_LAYOUTS[self.ggml_type]
        return math.prod(self.shape) // block_size * block_bytes


@dataclass
class GGUFFile:
    """A parsed GGUF header over the memory-mapped file; tensor data is read on demand.

    ``open_gguf`` has checked that every tensor's data lies inside the file, so ``raw`` and
    ``tensor`` read only the file's bytes."""
    path: str
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    buffer: mmap.mmap

    def raw(self, info: TensorInfo) -> np.ndarray:
        """The tensor's bytes (uint8 [num_bytes]), a view of the mapped file."""
        if info.offset < 0 or info.offset + info.num_bytes > len(self.buffer):
            raise GGUFError(f"{self.path}: tensor {info.name!r} lies outside the file")
        return np.frombuffer(self.buffer, dtype=np.uint8, count=info.num_bytes, offset=info.offset)

    def tensor(self, name: str) -> torch.Tensor:
        """Tensor ``name`` dequantized to float32, in torch shape."""
        info = self.tensors[name]
        return dequantize(self.raw(info), info.ggml_type, info.shape)


def _padded(size: int, alignment: int) -> int:
    return -(-size // alignment) * alignment


# The fewest bytes a metadata entry (an empty key, a one-byte value) and a tensor info (an empty
# name, one dimension) take: a count that would need more than the file holds is rejected up front.
_MIN_ENTRY_BYTES = 8 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8


def open_gguf(path: str) -> GGUFFile:
    """Parse and check the header (metadata and tensor infos) of the GGUF file at ``path``.

    Raises ``GGUFError`` (a ValueError) naming the field or tensor when the file is truncated or
    malformed, before allocating anything a field's size asks for. Checked, as ggml's gguf.cpp
    checks them: the magic and version; counts and string / array lengths against the bytes left;
    metadata value types; no key or tensor name twice; ``general.alignment`` a uint32 power of two
    (at most 65536); 1 to 4 dimensions per tensor, each ≥ 1, the innermost a multiple of the type's
    block size; known ggml types; every tensor's data offset equal to the previous tensors' sizes,
    each padded to the alignment (aligned, in order, no overlap or gap) and its data inside the file.
    Stricter than ggml: nothing may follow the last tensor's padded data, so that a corrupted
    count, type or shape of the last tensor cannot shift or shrink what is read.
    """
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size < len(GGUF_MAGIC):
            raise GGUFError(f"{path} is not a GGUF file (it has fewer than {len(GGUF_MAGIC)} bytes)")
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if buffer[:4] != GGUF_MAGIC:
        raise GGUFError(f"{path} is not a GGUF file (magic {bytes(buffer[:4])!r}, expected {GGUF_MAGIC!r})")
    cursor = _Cursor(buffer, path, 4)
    version = cursor.scalar("<I", "the version")
    if version not in SUPPORTED_VERSIONS:
        if version & 0xFFFF == 0 and struct.unpack(">I", struct.pack("<I", version))[0] in SUPPORTED_VERSIONS:
            raise GGUFError(f"{path} is a big-endian GGUF; only little-endian files are supported")
        raise GGUFError(f"{path}: GGUF version {version} is not supported (supported: {SUPPORTED_VERSIONS})")
    tensor_count = cursor.scalar("<Q", "the tensor count")
    kv_count = cursor.scalar("<Q", "the metadata entry count")
    if kv_count * _MIN_ENTRY_BYTES > cursor.remaining:
        raise cursor.error(f"the metadata entry count {kv_count} needs at least {kv_count * _MIN_ENTRY_BYTES} "
                           f"bytes, but the file has {cursor.remaining} left")
    if kv_count * _MIN_ENTRY_BYTES + tensor_count * _MIN_TENSOR_INFO_BYTES > cursor.remaining:
        raise cursor.error(f"the tensor count {tensor_count} needs at least "
                           f"{tensor_count * _MIN_TENSOR_INFO_BYTES} bytes of tensor infos, but the file has "
                           f"{cursor.remaining - kv_count * _MIN_ENTRY_BYTES} left after the metadata")

    metadata: dict[str, Any] = {}
    alignment_type = None
    for index in range(kv_count):
        key = cursor.string(f"the key of metadata entry {index}")
        if key in metadata:
            raise cursor.error(f"metadata key {key!r} appears twice")
        value_type = cursor.scalar("<I", f"the value type of metadata {key!r}")
        metadata[key] = cursor.value(value_type, f"metadata {key!r}")
        if key == "general.alignment":
            alignment_type = value_type
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if alignment_type not in (None, _UINT32) or not 1 <= alignment <= MAX_ALIGNMENT or alignment & (alignment - 1):
        raise GGUFError(f"{path}: metadata 'general.alignment' must be a uint32 power of two from 1 to "
                        f"{MAX_ALIGNMENT}, not {_short(alignment)} (value type {alignment_type})")

    tensors: dict[str, TensorInfo] = {}
    data_size = 0  # the padded size of the tensors so far: where the next one's data must start
    for index in range(tensor_count):
        name = cursor.string(f"the name of tensor {index}")
        label = f"tensor {name!r}"
        if name in tensors:
            raise cursor.error(f"tensor name {name!r} appears twice")
        if len(name.encode()) >= GGML_MAX_NAME:
            raise cursor.error(f"{label}: its name is longer than ggml's {GGML_MAX_NAME - 1} bytes")
        n_dims = cursor.scalar("<I", f"the dimension count of {label}")
        if not 1 <= n_dims <= GGML_MAX_DIMS:
            raise cursor.error(f"{label} has {n_dims} dimensions (ggml allows 1 to {GGML_MAX_DIMS})")
        ne = [cursor.scalar("<Q", f"dimension {dim} of {label}") for dim in range(n_dims)]
        ggml_type = cursor.scalar("<I", f"the ggml type of {label}")
        offset = cursor.scalar("<Q", f"the data offset of {label}")
        shape = tuple(reversed(ne))
        if min(ne) < 1:
            raise cursor.error(f"{label} has shape {shape}: every dimension must be at least 1")
        if ggml_type not in _BLOCK_LAYOUTS:
            raise cursor.error(f"{label} has unknown ggml type {ggml_type}")
        block_size, block_bytes = _BLOCK_LAYOUTS[ggml_type]
        if ne[0] % block_size:
            raise cursor.error(f"{label} has shape {shape}: its innermost dimension is not a multiple of the "
                               f"{ggml_type_name(ggml_type)} block size {block_size}")
        num_bytes = math.prod(ne) // block_size * block_bytes
        if num_bytes > len(buffer):
            raise cursor.error(f"{label} of shape {shape} and type {ggml_type_name(ggml_type)} needs {num_bytes} "
                               f"bytes, more than the whole file ({len(buffer)} bytes)")
        if offset != data_size:
            after = f"the data of tensor {list(tensors)[-1]!r}" if tensors else "the start of the data section"
            if offset % alignment:
                why = f"it is not a multiple of the alignment {alignment}"
            elif offset < data_size:
                why = f"it overlaps {after} (offsets must increase in the order of the tensor infos)"
            else:
                why = f"it leaves a gap after {after}"
            raise cursor.error(f"{label} has data offset {offset}, expected {data_size} (the previous tensors' "
                               f"sizes, each padded to the alignment {alignment}): {why}")
        tensors[name] = TensorInfo(name, shape, ggml_type, offset)  # relative to the data section, for now
        data_size += _padded(num_bytes, alignment)

    data_start = _padded(cursor.offset, alignment)
    tensors = {name: TensorInfo(name, info.shape, info.ggml_type, data_start + info.offset)
               for name, info in tensors.items()}
    data_end = cursor.offset
    for info in tensors.values():
        data_end = info.offset + info.num_bytes
        if data_end > len(buffer):
            raise GGUFError(f"{path}: tensor {info.name!r} ends at byte {data_end}, past the end of the file "
                            f"({len(buffer)} bytes; truncated?)")
    if len(buffer) > data_start + data_size:
        raise GGUFError(f"{path}: the file has {len(buffer)} bytes, but its tensors' data ends at byte {data_end} "
                        f"(padded: {data_start + data_size}); the tensor count or a tensor's shape or type is wrong")
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


# --------------------------------------------------------------------------- checked metadata reads

_REQUIRED = object()  # default of a metadata read whose key must be present


def _metadata_value(gguf_file: GGUFFile, key: str, default: Any) -> Any:
    if key in gguf_file.metadata:
        return gguf_file.metadata[key]
    if default is _REQUIRED:
        raise GGUFError(f"{gguf_file.path}: GGUF metadata lacks {key!r}")
    return default


def _metadata_int(gguf_file: GGUFFile, key: str, default: Any = _REQUIRED, minimum: int = 1,
                  maximum: int | None = None) -> Any:
    """An integer field within [minimum, maximum] (``default``, unchecked, when absent and not required)."""
    value = _metadata_value(gguf_file, key, default)
    if key not in gguf_file.metadata:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (maximum is not None
                                                                                    and value > maximum):
        bounds = f"from {minimum} to {maximum}" if maximum is not None else f"≥ {minimum}"
        raise GGUFError(f"{gguf_file.path}: GGUF metadata {key!r} must be an integer {bounds}, not {_short(value)}")
    return value


def _metadata_float(gguf_file: GGUFFile, key: str, default: Any = _REQUIRED) -> Any:
    """A finite positive number (``default`` when absent and not required)."""
    value = _metadata_value(gguf_file, key, default)
    if key not in gguf_file.metadata:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise GGUFError(f"{gguf_file.path}: GGUF metadata {key!r} must be a finite positive number, "
                        f"not {_short(value)}")
    return value


def _metadata_str(gguf_file: GGUFFile, key: str, default: Any = _REQUIRED) -> Any:
    value = _metadata_value(gguf_file, key, default)
    if key in gguf_file.metadata and not isinstance(value, str):
        raise GGUFError(f"{gguf_file.path}: GGUF metadata {key!r} must be a string, not {_short(value)}")
    return value


# --------------------------------------------------------------------------- tensor shapes against the metadata

# every layer's tensors in each architecture, as the models in model.py hold them
_LAYER_ROLES = {"attn_norm.weight", "ffn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
                "attn_output.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"}
_ARCHITECTURE_LAYER_ROLES = {
    "llama": _LAYER_ROLES,
    "qwen2": _LAYER_ROLES | {"attn_q.bias", "attn_k.bias", "attn_v.bias"},
    "qwen3": _LAYER_ROLES | {"attn_q_norm.weight", "attn_k_norm.weight"},
}
_REQUIRED_GLOBAL_TENSORS = ("token_embd.weight", "output_norm.weight")


def _check_tensor_shapes(arch: str, gguf_file: GGUFFile, hidden: int, heads: int, kv_heads: int, head_dim: int,
                         intermediate: int, layers: int) -> int:
    """The vocabulary size (token_embd's rows), after checking every tensor's shape against the
    metadata, and that layers 0 .. block_count − 1 each hold exactly their architecture's tensors."""
    path, tensors = gguf_file.path, gguf_file.tensors
    for required in _REQUIRED_GLOBAL_TENSORS:
        if required not in tensors:
            raise GGUFError(f"{path}: GGUF has no {required!r} tensor")
    embedding = tensors["token_embd.weight"]
    if len(embedding.shape) != 2:
        raise GGUFError(f"{path}: tensor 'token_embd.weight' has shape {embedding.shape}, not [vocab, {hidden}]")
    vocab = embedding.shape[0]
    q_rows, kv_rows = heads * head_dim, kv_heads * head_dim
    global_shapes = {"token_embd.weight": (vocab, hidden), "output.weight": (vocab, hidden),
                     "output_norm.weight": (hidden,), _ROPE_FREQS: (head_dim // 2,)}
    layer_shapes = {
        "attn_norm.weight": (hidden,), "ffn_norm.weight": (hidden,),
        "attn_q.weight": (q_rows, hidden), "attn_k.weight": (kv_rows, hidden), "attn_v.weight": (kv_rows, hidden),
        "attn_q.bias": (q_rows,), "attn_k.bias": (kv_rows,), "attn_v.bias": (kv_rows,),
        "attn_output.weight": (hidden, q_rows), "attn_q_norm.weight": (head_dim,), "attn_k_norm.weight": (head_dim,),
        "ffn_gate.weight": (intermediate, hidden), "ffn_up.weight": (intermediate, hidden),
        "ffn_down.weight": (hidden, intermediate),
    }
    roles = _ARCHITECTURE_LAYER_ROLES[arch]
    roles_by_layer: dict[int, set[str]] = {}
    for name, info in tensors.items():
        if name.startswith("blk."):
            _, index, role = name.split(".", 2)
            if not index.isdigit() or index != str(int(index)) or int(index) >= layers:
                raise GGUFError(f"{path}: tensor {name!r} names layer {index!r}, but block_count is {layers}")
            if role not in roles:
                raise GGUFError(f"{path}: tensor {name!r} has no place in a {arch} model")
            roles_by_layer.setdefault(int(index), set()).add(role)
            expected = layer_shapes[role]
        elif name in global_shapes:
            expected = global_shapes[name]
        else:
            raise GGUFError(f"{path}: tensor {name!r} has no place in a {arch} model")
        if info.shape != expected:
            raise GGUFError(f"{path}: tensor {name!r} has shape {list(info.shape)} (torch order), but the metadata "
                            f"make it {list(expected)} (hidden {hidden}, heads {heads}, kv heads {kv_heads}, "
                            f"head_dim {head_dim}, feed_forward {intermediate}, vocab {vocab})")
    for layer in range(layers):
        missing = sorted(roles - roles_by_layer.get(layer, set()))
        if missing:
            raise GGUFError(f"{path}: layer {layer} of block_count {layers} lacks tensors "
                            f"{', '.join(f'blk.{layer}.{role}' for role in missing[:4])}"
                            f"{' and more' if len(missing) > 4 else ''}")
    return vocab


# --------------------------------------------------------------------------- config

def _rope_scaling(arch: str, metadata: dict, gguf_file: GGUFFile, rope_theta: float, head_dim: int) -> dict | None:
    if _ROPE_FREQS in gguf_file.tensors:
        return _llama3_rope_scaling(gguf_file.tensor(_ROPE_FREQS), rope_theta, head_dim)
    kind = _metadata_str(gguf_file, f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    scaling = {"rope_type": kind, "factor": _metadata_float(gguf_file, f"{arch}.rope.scaling.factor", 1.0)}
    if f"{arch}.rope.scaling.original_context_length" in metadata:
        scaling["original_max_position_embeddings"] = _metadata_int(
            gguf_file, f"{arch}.rope.scaling.original_context_length")
    return scaling


def _config(arch: str, gguf_file: GGUFFile) -> dict:
    """The Hugging Face config.json dict the metadata describes, after checking each field's type
    and value and every tensor's shape against them (GGUFError naming the field or tensor)."""
    metadata = gguf_file.metadata
    tensors = gguf_file.tensors
    path = gguf_file.path

    def int_key(name: str, default: Any = _REQUIRED, **bounds) -> Any:
        return _metadata_int(gguf_file, f"{arch}.{name}", default, **bounds)

    hidden = int_key("embedding_length")
    num_heads = int_key("attention.head_count")
    num_kv_heads = int_key("attention.head_count_kv", num_heads)
    if num_heads % num_kv_heads:
        raise GGUFError(f"{path}: GGUF metadata '{arch}.attention.head_count' ({num_heads}) is not a multiple of "
                        f"'{arch}.attention.head_count_kv' ({num_kv_heads})")
    # key_length is written when head_dim is not hidden_size / num_heads (Qwen3); llama.cpp's default otherwise
    if f"{arch}.attention.key_length" in metadata:
        head_dim = int_key("attention.key_length")
        head_dim_source = f"'{arch}.attention.key_length'"
    elif hidden % num_heads:
        raise GGUFError(f"{path}: GGUF metadata '{arch}.embedding_length' ({hidden}) is not a multiple of "
                        f"'{arch}.attention.head_count' ({num_heads}), and no '{arch}.attention.key_length' "
                        f"gives the head size")
    else:
        head_dim = hidden // num_heads
        head_dim_source = f"'{arch}.embedding_length' / '{arch}.attention.head_count'"
    # the models rotate every dimension of a head, in halves, and give V the head size of K
    for name in ("attention.value_length", "rope.dimension_count"):
        if int_key(name, head_dim) != head_dim:
            raise GGUFError(f"{path}: GGUF metadata '{arch}.{name}' is {metadata[f'{arch}.{name}']}, but the head "
                            f"size is {head_dim} ({head_dim_source}): fastverify's models need them equal")
    if head_dim % 2:
        raise GGUFError(f"{path}: the head size {head_dim} is odd; rotary embeddings need it even")
    intermediate = int_key("feed_forward_length")
    layers = int_key("block_count")
    vocab = _check_tensor_shapes(arch, gguf_file, hidden, num_heads, num_kv_heads, head_dim, intermediate, layers)

    rope_theta = _metadata_float(gguf_file, f"{arch}.rope.freq_base", 10000.0)

    def token_id(key: str) -> int | None:
        return _metadata_int(gguf_file, key, None, minimum=0, maximum=vocab - 1)

    config = {
        "architectures": [SUPPORTED_ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _metadata_float(gguf_file, f"{arch}.attention.layer_norm_rms_epsilon"),
        "rope_theta": rope_theta,
        "rope_scaling": _rope_scaling(arch, metadata, gguf_file, rope_theta, head_dim),
        "vocab_size": vocab,
        "max_position_embeddings": int_key("context_length"),
        # llama.cpp writes the output projection only when it is not the embedding matrix
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "bos_token_id": token_id("tokenizer.ggml.bos_token_id"),
        "eos_token_id": token_id("tokenizer.ggml.eos_token_id"),
    }
    if "tokenizer.ggml.padding_token_id" in metadata:
        config["pad_token_id"] = token_id("tokenizer.ggml.padding_token_id")
    return config


def _check_supported(gguf_file: GGUFFile) -> str:
    """The architecture, after checking that every tensor can be read; raises ValueError otherwise."""
    arch = gguf_file.metadata.get("general.architecture")
    if not isinstance(arch, str) or arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"{gguf_file.path}: GGUF architecture {_short(arch)} is not supported "
                        f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    for info in gguf_file.tensors.values():
        if info.ggml_type not in GGML_TYPES:
            raise GGUFError(f"{gguf_file.path}: tensor {info.name!r} has ggml type {ggml_type_name(info.ggml_type)}, "
                            f"which fastverify cannot dequantize (supported: "
                            f"{', '.join(t.name for t in GGML_TYPES.values())})")
        if info.name != _ROPE_FREQS:
            try:
                hf_tensor_name(info.name)
            except ValueError as error:
                raise GGUFError(f"{gguf_file.path}: {error}") from None
        if info.offset + info.num_bytes > len(gguf_file.buffer):
            raise GGUFError(f"{gguf_file.path}: tensor {info.name!r} ends past the end of the file (truncated?)")
    for required in ("token_embd.weight", "blk.0.attn_q.weight"):
        if required not in gguf_file.tensors:
            raise GGUFError(f"{gguf_file.path}: GGUF has no {required!r} tensor")
    return arch


def read_gguf(path: str, keep: Callable[["GGUFFile", TensorInfo], Any] | None = None
              ) -> tuple[dict, dict[str, torch.Tensor], dict | None]:
    """Read a llama / qwen2 / qwen3 GGUF file.

    Returns ``(config, state_dict, tokenizer_spec)``: a Hugging Face config.json dict; float32
    tensors under Hugging Face names and shapes ([out, in] weights), Q/K rows of llama-arch
    files put back in Hugging Face's rotary layout, no ``lm_head.weight`` when the embeddings
    are tied; and ``{"format": "gguf", "metadata": {every tokenizer.* key}}`` for
    ``Tokenizer.from_spec`` (None when the file holds no vocabulary). Unsupported
    architectures, tensor types or tensor names raise ``ValueError`` before anything is
    dequantized.

    ``keep(gguf_file, info)``, when given, may return what to store instead of the dequantized
    tensor (e.g. its raw blocks: fastverify.models.quantized); such an object has ``shape``
    and ``rows(index)``, which the rotary un-permutation uses. None: dequantize as usual.
    """
    gguf_file = open_gguf(path)
    arch = _check_supported(gguf_file)
    config = _config(arch, gguf_file)

    heads = rotary_heads(arch, config)
    state_dict = {}
    for name, info in gguf_file.tensors.items():
        if name == _ROPE_FREQS:
            continue
        tensor = keep(gguf_file, info) if keep is not None else None
        if tensor is None:
            tensor = gguf_file.tensor(name)
        role = name.split(".")[2] if name.startswith("blk.") else None  # blk.{i}.{role}.{weight|bias}
        if role in heads:
            if isinstance(tensor, torch.Tensor):
                tensor = unpermute_rotary(tensor, heads[role])
            else:  # the same permutation, as whole rows
                tensor = tensor.rows(unpermute_rotary(torch.arange(tensor.shape[0]), heads[role]))
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
    None when the file holds no vocabulary. GGUFError names a tokenizer field of the wrong type
    or size, a merge that is not two tokens, or a special token id outside the vocabulary."""
    metadata = {k: v for k, v in gguf_file.metadata.items() if k.startswith("tokenizer.")}
    if "tokenizer.ggml.tokens" not in metadata:
        return None
    path = gguf_file.path
    tokens = metadata["tokenizer.ggml.tokens"]
    if not isinstance(tokens, list) or not tokens or not all(isinstance(token, str) for token in tokens):
        raise GGUFError(f"{path}: GGUF metadata 'tokenizer.ggml.tokens' must be a non-empty array of strings")
    embedding = gguf_file.tensors.get("token_embd.weight")
    if embedding is not None and embedding.shape[0] != len(tokens):
        # llama.cpp sizes token_embd by the vocabulary too
        raise GGUFError(f"{path}: GGUF metadata 'tokenizer.ggml.tokens' has {len(tokens)} tokens, but "
                        f"'token_embd.weight' has {embedding.shape[0]} rows")
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.chat_template"):
        _metadata_str(gguf_file, key, None)
    if metadata.get("tokenizer.ggml.model") == "gpt2" and "tokenizer.ggml.merges" not in metadata:
        raise GGUFError(f"{path}: GGUF metadata lacks 'tokenizer.ggml.merges', which a 'gpt2' (BPE) vocabulary needs")
    merges = metadata.get("tokenizer.ggml.merges", [])
    if not isinstance(merges, list):
        raise GGUFError(f"{path}: GGUF metadata 'tokenizer.ggml.merges' must be an array of strings")
    for index, merge in enumerate(merges):
        if not isinstance(merge, str) or len(merge.split(" ")) != 2:
            raise GGUFError(f"{path}: GGUF metadata 'tokenizer.ggml.merges'[{index}] is {_short(merge)}, not two "
                            f"tokens separated by a space")
    token_types = metadata.get("tokenizer.ggml.token_type", [])
    if "tokenizer.ggml.token_type" in metadata and (
            not isinstance(token_types, list) or len(token_types) != len(tokens)
            or not all(isinstance(kind, int) and not isinstance(kind, bool) for kind in token_types)):
        raise GGUFError(f"{path}: GGUF metadata 'tokenizer.ggml.token_type' must be an array of {len(tokens)} "
                        f"integers, one per token")
    for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                "tokenizer.ggml.eom_token_id", "tokenizer.ggml.padding_token_id"):
        _metadata_int(gguf_file, key, None, minimum=0, maximum=len(tokens) - 1)
    add_bos = metadata.get("tokenizer.ggml.add_bos_token", False)
    if not isinstance(add_bos, bool):
        raise GGUFError(f"{path}: GGUF metadata 'tokenizer.ggml.add_bos_token' must be a bool, not {_short(add_bos)}")
    return {"format": "gguf", "metadata": metadata}
