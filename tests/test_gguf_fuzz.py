"""Corrupted GGUF files (fastverify issue 19, item 5).

Every corrupted copy of a tiny model's GGUF either raises ValueError (naming the field or tensor
at fault, asserted for the targeted corruptions) or loads exactly the original's tensors (a byte
that does not matter, e.g. inside a metadata string); never another exception, a hang, or
different weights. Each case runs through every loader in ``LOADERS``.

The header is walked here by ``header_fields`` (an oracle independent of fastverify's reader) to
find each field's byte position.
"""

from __future__ import annotations

import contextlib
import inspect
import random
import re
import signal
import struct

import numpy as np
import pytest
import torch

import fastverify.models
from fastverify.models import gguf as fv_gguf
from fastverify.models.tokenizer import Tokenizer
from model_fixtures import head_dim, tiny_model, write_gguf

gguf = pytest.importorskip("gguf")

SECONDS_PER_CASE = 10  # a generous bound: a case takes milliseconds; this catches hangs


# --------------------------------------------------------------------------- loaders

def _state(model) -> dict[str, torch.Tensor]:
    return dict(model.state_dict())


def _read_gguf(path: str) -> dict[str, torch.Tensor]:
    """fastverify.models.gguf's reader, then the tokenizer built from what it returns."""
    _, state_dict, tokenizer_spec = fv_gguf.read_gguf(path)
    if tokenizer_spec is not None:
        Tokenizer.from_spec(tokenizer_spec)
    return state_dict


LOADERS = {
    "read_gguf": _read_gguf,
    "load": lambda path: _state(fastverify.models.load(path)),  # the default path
}
if "weights" in inspect.signature(fastverify.models.load).parameters:  # the native-weights loader, where it exists
    LOADERS["load_native"] = lambda path: _state(fastverify.models.load(path, weights="native"))


# --------------------------------------------------------------------------- the original file

# a byte-level BPE vocabulary of the tiny models' 96 tokens: printable ASCII, a few merges, two control tokens
TOKENS = [chr(c) for c in range(33, 123)] + ["Ġ", "ab", "abc", "Ġa", "<|im_start|>", "<|im_end|>"]
MERGES = ["a b", "ab c", "Ġ a"]
TOKEN_TYPES = [1] * 94 + [3, 3]
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                 "<|im_end|>\n{% endfor %}")


def write_model_with_vocabulary(path: str, model, **kwargs):
    """write_gguf, plus the tokenizer fields and rope.dimension_count that llama.cpp's converter writes."""
    base = gguf.GGUFWriter
    rotary_dim = head_dim(model.config)

    class WriterWithVocabulary(base):
        def write_header_to_file(self, *args, **kw):
            self.add_rope_dimension_count(rotary_dim)
            self.add_tokenizer_model("gpt2")
            self.add_tokenizer_pre("gpt2")
            self.add_token_list(TOKENS)
            self.add_token_merges(MERGES)
            self.add_token_types(TOKEN_TYPES)
            self.add_add_bos_token(False)
            self.add_chat_template(CHAT_TEMPLATE)
            super().write_header_to_file(*args, **kw)

    gguf.GGUFWriter = WriterWithVocabulary
    try:
        return write_gguf(path, model, **kwargs)
    finally:
        gguf.GGUFWriter = base


_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def header_fields(data: bytes) -> dict:
    """Byte positions of a GGUF header's fields:
    {"kv": {key: {"key": length pos, "type": pos, "value": pos, "count": array count pos}},
     "tensors": {name: {"name": length pos, "n_dims": pos, "ne": [pos...], "type": pos, "offset": pos}},
     "tensor_order": [names], "infos_end": pos}."""
    pos = 24
    fields = {"kv": {}, "tensors": {}, "tensor_order": []}

    def string():
        nonlocal pos
        (length,) = struct.unpack_from("<Q", data, pos)
        text = data[pos + 8:pos + 8 + length].decode()
        pos += 8 + length
        return text

    def skip_value(value_type, entry=None):
        nonlocal pos
        if value_type == 8:
            string()
        elif value_type == 9:
            element_type, count = struct.unpack_from("<IQ", data, pos)
            if entry is not None:
                entry["count"] = pos + 4
            pos += 12
            for _ in range(count):
                skip_value(element_type)
        else:
            pos += _SCALAR_SIZES[value_type]

    tensor_count, kv_count = struct.unpack_from("<QQ", data, 8)
    for _ in range(kv_count):
        entry = {"key": pos}
        key = string()
        entry["type"] = pos
        (value_type,) = struct.unpack_from("<I", data, pos)
        pos += 4
        entry["value"] = pos
        skip_value(value_type, entry)
        fields["kv"][key] = entry
    for _ in range(tensor_count):
        entry = {"name": pos}
        name = string()
        entry["n_dims"] = pos
        (n_dims,) = struct.unpack_from("<I", data, pos)
        entry["ne"] = [pos + 4 + 8 * i for i in range(n_dims)]
        pos += 4 + 8 * n_dims
        entry["type"], entry["offset"] = pos, pos + 4
        pos += 12
        fields["tensors"][name] = entry
        fields["tensor_order"].append(name)
    fields["infos_end"] = pos
    return fields


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """(path, bytes, header fields) of a tiny llama GGUF with a vocabulary: Q8_0 projections (one
    block type for all, as the native-weights loader keeps fused projections in one kind of
    blocks), an F16 embedding, a BF16 output, F32 norms."""
    path = str(tmp_path_factory.mktemp("gguf_fuzz") / "tiny.gguf")
    write_model_with_vocabulary(path, tiny_model("llama", seed=19), matrix_types=("Q8_0",),
                                tensor_types={"token_embd.weight": "F16", "output.weight": "BF16"})
    with open(path, "rb") as f:
        data = f.read()
    return path, data, header_fields(data)


@pytest.fixture(scope="module")
def expected_states(original):
    """Each loader's tensors for the uncorrupted file."""
    return {name: loader(original[0]) for name, loader in LOADERS.items()}


# --------------------------------------------------------------------------- running a case

@contextlib.contextmanager
def time_limit(seconds: float):
    def expire(signum, frame):
        raise TimeoutError(f"took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def load_corrupted(loader_name: str, data: bytes, path, expected: dict, case: str) -> str | None:
    """Load ``data`` (written to ``path``) with the loader: the ValueError's message, or None when
    it loaded tensors identical to ``expected``. Fails the test on anything else."""
    path.write_bytes(data)
    try:
        with time_limit(SECONDS_PER_CASE):
            state = LOADERS[loader_name](str(path))
    except ValueError as error:
        return str(error)
    except Exception as error:  # noqa: BLE001 - exactly what the test is about
        pytest.fail(f"{case}: {loader_name} raised {type(error).__name__}, not ValueError: {error}")
    assert state.keys() == expected.keys(), f"{case}: {loader_name} loaded other tensors without an error"
    different = [name for name in state if not torch.equal(state[name], expected[name])]
    assert not different, f"{case}: {loader_name} loaded different weights without an error: {different[:3]}"
    return None


def put(data: bytes, pos: int, fmt: str, value) -> bytes:
    packed = struct.pack(fmt, value)
    return data[:pos] + packed + data[pos + len(packed):]


def get(data: bytes, pos: int, fmt: str):
    return struct.unpack_from(fmt, data, pos)[0]


# --------------------------------------------------------------------------- truncations and byte flips

def truncation_points(data: bytes, fields: dict) -> list[int]:
    """Cuts inside every header region: the fixed header, each metadata entry's key, type and
    value, each tensor info's fields, the padding, the data."""
    points = {0, 3, 4, 7, 8, 15, 16, 23, 24}
    for entry in fields["kv"].values():
        points |= {entry["key"] + 3, entry["key"] + 9, entry["type"] + 1, entry["value"] + 1}
    for entry in fields["tensors"].values():
        points |= {entry["name"] + 2, entry["name"] + 9, entry["n_dims"] + 1, entry["ne"][0] + 4,
                   entry["type"] + 2, entry["offset"] + 5}
    data_start = fields["infos_end"] + (-fields["infos_end"] % 32)
    points |= {fields["infos_end"], data_start - 1, data_start, data_start + 1, (data_start + len(data)) // 2,
               len(data) - 1}
    return sorted(point for point in points if point < len(data))


@pytest.mark.parametrize("loader_name", list(LOADERS))
def test_truncated_files(loader_name, original, expected_states, tmp_path):
    _, data, fields = original
    for cut in truncation_points(data, fields):
        message = load_corrupted(loader_name, data[:cut], tmp_path / "cut.gguf", expected_states[loader_name],
                                 f"cut at byte {cut}")
        # only the padding after the last tensor's data may go unnoticed
        assert message is not None or cut >= len(data) - 32, f"cut at byte {cut} loaded"


# An F16 tensor's type byte turned into BF16's (1 -> 30) keeps every size: no check can see it.
# The fixed seeds below do not hit it; a change of seeds that does would have to allow it.
@pytest.mark.parametrize("loader_name", list(LOADERS))
def test_random_byte_flips_in_the_header(loader_name, original, expected_states, tmp_path):
    _, data, fields = original
    rng = random.Random(19)
    outcomes = {"error": 0, "same weights": 0}
    for case in range(200):
        pos = rng.randrange(fields["infos_end"])
        flipped = data[:pos] + bytes([data[pos] ^ rng.randrange(1, 256)]) + data[pos + 1:]
        message = load_corrupted(loader_name, flipped, tmp_path / "flip.gguf", expected_states[loader_name],
                                 f"flip {case} at byte {pos}")
        outcomes["error" if message is not None else "same weights"] += 1
    assert outcomes["error"] > 100, outcomes  # most header bytes matter


# --------------------------------------------------------------------------- targeted corruptions

def _first_of_type(fields: dict, data: bytes, ggml_type: int) -> str:
    tensors = fields["tensors"]
    return next(name for name in fields["tensor_order"] if get(data, tensors[name]["type"], "<I") == ggml_type)


def targeted_cases(data: bytes, fields: dict) -> list[tuple[str, bytes, str]]:
    """(case, corrupted bytes, regex the error message must match)."""
    kv, tensors, order = fields["kv"], fields["tensors"], fields["tensor_order"]
    first, second, last = tensors[order[0]], tensors[order[1]], tensors[order[-1]]
    second_offset = get(data, second["offset"], "<Q")
    layer1 = next(name for name in order if name.startswith("blk.1."))
    cases = [
        ("version 1", put(data, 4, "<I", 1), "version 1 is not supported"),
        ("version 4", put(data, 4, "<I", 4), "version 4 is not supported"),
        ("tensor count huge", put(data, 8, "<Q", 2**62), "tensor count"),
        ("tensor count +1", put(data, 8, "<Q", len(order) + 1), "tensor"),
        ("tensor count -1", put(data, 8, "<Q", len(order) - 1), "tensors' data ends"),
        ("kv count huge", put(data, 16, "<Q", 2**62), "metadata entry count"),
        ("kv count 0", put(data, 16, "<Q", 0), ""),
        ("key length huge", put(data, kv["general.architecture"]["key"], "<Q", 2**62), "metadata entry 0"),
        ("string value length huge", put(data, kv["general.architecture"]["value"], "<Q", 2**40),
         "metadata 'general.architecture'"),
        ("tensor name length huge", put(data, first["name"], "<Q", 2**63), "the name of tensor 0"),
        ("array count huge", put(data, kv["tokenizer.ggml.tokens"]["count"], "<Q", 2**50),
         "metadata 'tokenizer.ggml.tokens' claims"),
        ("numeric array count huge", put(data, kv["tokenizer.ggml.token_type"]["count"], "<Q", 2**61),
         "metadata 'tokenizer.ggml.token_type' claims"),
        ("value type unknown", put(data, kv["llama.block_count"]["type"], "<I", 99),
         "'llama.block_count' has unknown value type 99"),
        ("array element type unknown", put(data, kv["tokenizer.ggml.merges"]["count"] - 4, "<I", 13),
         "'tokenizer.ggml.merges' is an array of unknown value type 13"),
        ("block_count a float", put(data, kv["llama.block_count"]["type"], "<I", 6),
         "'llama.block_count' must be an integer"),
        ("n_dims 0", put(data, first["n_dims"], "<I", 0), f"{order[0]}' has 0 dimensions"),
        ("n_dims 5", put(data, first["n_dims"], "<I", 5), f"{order[0]}' has 5 dimensions"),
        ("ne huge", put(data, first["ne"][-1], "<Q", 2**40), f"{order[0]}' .* needs .* more than the whole file"),
        ("ne 0", put(data, first["ne"][0], "<Q", 0), f"{order[0]}' has shape .* at least 1"),
        ("type unknown", put(data, first["type"], "<I", 99), f"{order[0]}' has unknown ggml type 99"),
        ("offset misaligned", put(data, second["offset"], "<Q", second_offset + 1),
         f"{order[1]}' has data offset .* not a multiple of the alignment 32"),
        ("offset overlapping", put(data, second["offset"], "<Q", 0), f"{order[1]}' .* overlaps"),
        ("offset leaving a gap", put(data, second["offset"], "<Q", second_offset + 32), f"{order[1]}' .* gap"),
        ("offset past the end", put(data, last["offset"], "<Q", 2**40), f"{order[-1]}' .* gap"),
        ("offsets out of order", put(put(data, second["offset"], "<Q", get(data, tensors[order[2]]["offset"], "<Q")),
                                     tensors[order[2]]["offset"], "<Q", second_offset), f"{order[1]}' .* gap"),
        ("data past the end", data[:-40], f"{order[-1]}' ends at byte .* past the end of the file"),
        ("bytes after the data", data + bytes(64), "tensors' data ends"),
        ("duplicate tensor name", put(data, tensors["blk.0.attn_k.weight"]["name"] + 8 + len("blk.0.attn_"), "<c",
                                      b"q"), "tensor name 'blk.0.attn_q.weight' appears twice"),
        ("duplicate metadata key", put(data, kv["tokenizer.ggml.eos_token_id"]["key"] + 8 + len("tokenizer.ggml."),
                                       "<c", b"b"), "metadata key 'tokenizer.ggml.bos_token_id' appears twice"),
        ("tensor name not UTF-8", put(data, first["name"] + 8, "<B", 0xFF), "the name of tensor 0 .* not valid UTF-8"),
        ("token not UTF-8", put(data, kv["tokenizer.ggml.tokens"]["count"] + 8 + 3 * 9 + 8, "<B", 0xC3),
         r"'tokenizer.ggml.tokens'\[3\] .* not valid UTF-8"),
        ("unsupported type of the same size", put(data, tensors[_first_of_type(fields, data, 1)]["type"], "<I", 25),
         "I16, which fastverify cannot dequantize"),
        ("block_count 3", put(data, kv["llama.block_count"]["value"], "<I", 3), "layer 2 of block_count 3 lacks"),
        ("block_count 1", put(data, kv["llama.block_count"]["value"], "<I", 1),
         f"{layer1}' names layer '1', but block_count is 1"),
        ("block_count 0", put(data, kv["llama.block_count"]["value"], "<I", 0), "'llama.block_count' must be"),
        ("embedding_length 32", put(data, kv["llama.embedding_length"]["value"], "<I", 32),
         "head size is 8 .*embedding_length"),
        ("feed_forward_length 64", put(data, kv["llama.feed_forward_length"]["value"], "<I", 64),
         "ffn_.*' has shape .* metadata"),
        ("head_count 8", put(data, kv["llama.attention.head_count"]["value"], "<I", 8), "rope.dimension_count"),
        ("head_count_kv 3", put(data, kv["llama.attention.head_count_kv"]["value"], "<I", 3), "head_count_kv"),
        ("head_count 0", put(data, kv["llama.attention.head_count"]["value"], "<I", 0), "head_count' must be"),
        ("rms eps negative", put(data, kv["llama.attention.layer_norm_rms_epsilon"]["value"], "<f", -1.0),
         "layer_norm_rms_epsilon' must be a finite positive number"),
        ("bos id past the vocabulary", put(data, kv["tokenizer.ggml.bos_token_id"]["value"], "<I", 96),
         "'tokenizer.ggml.bos_token_id' must be an integer from 0 to 95"),
        ("merge not two tokens", put(data, kv["tokenizer.ggml.merges"]["count"] + 8 + 8 + 1, "<c", b"_"),
         r"'tokenizer.ggml.merges'\[0\] is 'a_b'"),
        ("chat template does not parse", put(data, kv["tokenizer.chat_template"]["value"] + 8 + 1, "<c", b"{"),
         "chat template does not parse"),
        ("architecture unknown", put(data, kv["general.architecture"]["value"] + 8, "<c", b"m"),
         "architecture 'mlama' is not supported"),
    ]
    return cases


@pytest.mark.parametrize("loader_name", list(LOADERS))
def test_targeted_corruptions(loader_name, original, expected_states, tmp_path):
    _, data, fields = original
    for case, corrupted, pattern in targeted_cases(data, fields):
        message = load_corrupted(loader_name, corrupted, tmp_path / "bad.gguf", expected_states[loader_name], case)
        assert message is not None, f"{case}: loaded without an error"
        assert re.search(pattern, message), f"{case}: {message!r} does not match {pattern!r}"


# --------------------------------------------------------------------------- alignment

@pytest.mark.parametrize("alignment", [0, 3, 2**20, 48])
def test_bad_alignment(alignment, tmp_path):
    path = tmp_path / "aligned.gguf"
    write_gguf(str(path), tiny_model("qwen2", seed=20), matrix_types=("F32",), alignment=64)
    data = path.read_bytes()
    position = header_fields(data)["kv"]["general.alignment"]["value"]
    path.write_bytes(put(data, position, "<I", alignment))
    with pytest.raises(ValueError, match="'general.alignment' must be a uint32 power of two"):
        fv_gguf.read_gguf(str(path))


def test_alignment_of_another_type(tmp_path):
    path = tmp_path / "aligned.gguf"
    write_gguf(str(path), tiny_model("qwen2", seed=20), matrix_types=("F32",), alignment=64)
    data = path.read_bytes()
    position = header_fields(data)["kv"]["general.alignment"]["type"]
    path.write_bytes(put(data, position, "<I", 5))  # int32
    with pytest.raises(ValueError, match="'general.alignment' must be a uint32"):
        fv_gguf.read_gguf(str(path))


# --------------------------------------------------------------------------- checks of the pieces

def test_block_layouts_match_the_gguf_package():
    """Every ggml type's block size and bytes, as the gguf package lists them (Q8_1: ggml's block_q8_1
    is 36 bytes, two float16 and 32 int8; the package says 40)."""
    for qtype, (block_size, block_bytes) in gguf.GGML_QUANT_SIZES.items():
        if qtype.name == "Q8_1":
            continue
        assert fv_gguf._BLOCK_LAYOUTS[int(qtype)] == (block_size, block_bytes), qtype.name
        assert fv_gguf.ggml_type_name(int(qtype)) == qtype.name


def test_dequantize_checks_its_arguments():
    q8 = int(gguf.GGMLQuantizationType.Q8_0)
    with pytest.raises(ValueError, match="innermost a multiple of 32"):
        fv_gguf.dequantize(np.zeros(34, np.uint8), q8, (2, 16))
    with pytest.raises(ValueError, match="uint8"):
        fv_gguf.dequantize(np.zeros(34, np.int8), q8, (1, 32))
    with pytest.raises(ValueError, match="do not hold"):
        fv_gguf.dequantize(np.zeros(35, np.uint8), q8, (1, 32))


def test_deeply_nested_array_is_rejected(tmp_path):
    # arrays of arrays, 10 deep: each level an element type 9 and a count of 1
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"k" + struct.pack("<I", 9)
    data += struct.pack("<IQ", 9, 1) * 10 + struct.pack("<IQ", 0, 0)
    path = tmp_path / "nested.gguf"
    path.write_bytes(data)
    with pytest.raises(ValueError, match="nests arrays more than"):
        fv_gguf.open_gguf(str(path))


def test_empty_and_tiny_files(tmp_path):
    for content in (b"", b"GG", b"GGUF", b"GGUF\x03\x00\x00\x00"):
        path = tmp_path / "small.gguf"
        path.write_bytes(content)
        with pytest.raises(ValueError, match="not a GGUF file|the version|the tensor count"):
            fv_gguf.read_gguf(str(path))
