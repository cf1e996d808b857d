"""Tokenizers for fastverify's models, built with the ``tokenizers`` library from a Hugging Face
folder (tokenizer.json + tokenizer_config.json) or from a GGUF file's ``tokenizer.*`` metadata.

    tokenizer = Tokenizer.from_spec(tokenizer_spec)      # spec from read_gguf / read_hf_folder
    ids = tokenizer.encode(tokenizer.apply_chat_template("Hello!"))
    stream = tokenizer.stream_decoder()
    for step_ids in generated_chunks:
        print(stream.push(step_ids), end="")
    print(stream.flush())
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

# Tokens that end a turn or a document in the chat formats fastverify's models use; any that the
# vocabulary holds as a special token stops generation, besides the configured eos ids.
END_MARKERS = ("<|endoftext|>", "<|im_end|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>")

# --------------------------------------------------------------------------- GGUF vocabularies

# llama.cpp token types (tokenizer.ggml.token_type)
_CONTROL, _USER_DEFINED = 3, 4

# Split patterns of the Hugging Face tokenizer.json files these llama.cpp pre-tokenizer names
# stand for (llama.cpp's src/llama-vocab.cpp uses the same expressions).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level_after_split(pattern: str):
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _gguf_text_pipeline(pre: str):
    """(normalizer, pre_tokenizer, ignore_merges) of the Hugging Face tokenizer behind ``tokenizer.ggml.pre``."""
    if pre == "gpt2":
        return None, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False
    if pre == "smollm":
        # SmolLM / SmolLM2's tokenizer.json: every digit on its own, then GPT-2's split
        return None, pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]), False
    if pre in ("llama-bpe", "llama3", "llama-v3"):
        # Llama 3's tokenizer.json uses a word that is in the vocabulary whole, merges or not
        return None, _byte_level_after_split(_LLAMA3_SPLIT), True
    if pre == "qwen2":
        return normalizers.NFC(), _byte_level_after_split(_QWEN2_SPLIT), False
    raise ValueError(f"GGUF tokenizer pre-tokenizer {pre!r} is not supported "
                     f"(supported: gpt2, smollm, llama-bpe, qwen2)")


def _backend_from_gguf(metadata: dict) -> BackendTokenizer:
    model = metadata.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"GGUF tokenizer model {model!r} is not supported: only byte-level BPE ('gpt2') vocabularies "
                         f"are; for a sentencepiece ('llama') vocabulary load the Hugging Face folder instead")
    tokens = metadata["tokenizer.ggml.tokens"]
    normalizer, pre_tokenizer, ignore_merges = _gguf_text_pipeline(metadata.get("tokenizer.ggml.pre", "gpt2"))
    # GGUF stores byte-level tokens spelled in GPT-2's byte alphabet, as tokenizer.json does
    vocab = {token: token_id for token_id, token in enumerate(tokens)}
    merges = [tuple(merge.split(" ", 1)) for merge in metadata["tokenizer.ggml.merges"]]
    try:
        bpe = models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges)
    except Exception as error:  # the tokenizers library raises a bare Exception
        raise ValueError(f"GGUF tokenizer metadata 'tokenizer.ggml.tokens' / 'tokenizer.ggml.merges' do not form a "
                         f"BPE vocabulary: {error}") from None
    backend = BackendTokenizer(bpe)
    if normalizer is not None:
        backend.normalizer = normalizer
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>) and user-defined ones (<think>) are matched whole in the text, as
    # llama.cpp does; only control tokens are dropped by skip_special_tokens.
    token_types = metadata.get("tokenizer.ggml.token_type") or []
    backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                for i, kind in enumerate(token_types) if kind == _CONTROL])
    backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                        for i, kind in enumerate(token_types) if kind == _USER_DEFINED])
    return backend


# --------------------------------------------------------------------------- chat templates

def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # like transformers: no HTML escaping (jinja's own tojson escapes <, >, &, ')
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _compile_chat_template(template: str) -> jinja2.Template:
    """The template in a sandbox set up as transformers sets it up, so both render the same text."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as error:
        raise ValueError(f"the chat template does not parse: {error} (line {error.lineno})") from None


# --------------------------------------------------------------------------- Hugging Face folders

def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_content(token) -> str | None:
    """tokenizer_config.json writes a special token as a string or as an AddedToken dict."""
    return token.get("content") if isinstance(token, dict) else token


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _folder_chat_template(folder: str, tokenizer_config: dict) -> str | None:
    jinja_file = os.path.join(folder, "chat_template.jinja")  # where recent transformers versions save it
    if os.path.exists(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read()
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = {entry["name"]: entry["template"] for entry in template}.get("default")
    return template


# --------------------------------------------------------------------------- tokenizer

class Tokenizer:
    """Text <-> token ids, chat templates and streaming decode for one model.

    ``bos_id`` and ``eos_id`` (the configured EOS, the template's ``eos_token``) may be None;
    ``eos_ids`` is every id that ends generation; ``add_bos`` is whether ``encode`` prepends BOS
    unless told otherwise.
    """

    def __init__(self, backend: BackendTokenizer, *, bos_id: int | None, eos_id: int | None, eos_ids: set[int],
                 add_bos: bool, chat_template: str | None):
        self.backend = backend
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.eos_ids = set(eos_ids) | ({eos_id} if eos_id is not None else set())
        self.add_bos = add_bos
        self.chat_template = chat_template
        self._compiled_template = _compile_chat_template(chat_template) if chat_template else None

    # ---- construction

    @classmethod
    def from_spec(cls, spec: dict) -> "Tokenizer":
        """From the ``tokenizer_spec`` of ``read_gguf`` ({"format": "gguf", "metadata": ...}) or
        ``read_hf_folder`` ({"format": "hf", "folder": ...})."""
        if spec["format"] == "gguf":
            return cls.from_gguf_metadata(spec["metadata"])
        if spec["format"] == "hf":
            return cls.from_hf_folder(spec["folder"])
        raise ValueError(f"unknown tokenizer spec format {spec['format']!r}")

    @classmethod
    def from_gguf_metadata(cls, metadata: dict) -> "Tokenizer":
        """From a GGUF file's ``tokenizer.*`` metadata (byte-level BPE vocabularies)."""
        backend = _backend_from_gguf(metadata)
        end_of_turn_ids = {metadata[key] for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
                           if key in metadata}
        return cls(backend, bos_id=metadata.get("tokenizer.ggml.bos_token_id"),
                   eos_id=metadata.get("tokenizer.ggml.eos_token_id"),
                   eos_ids=end_of_turn_ids | _end_marker_ids(backend),
                   add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
                   chat_template=metadata.get("tokenizer.chat_template"))

    @classmethod
    def from_hf_folder(cls, folder: str) -> "Tokenizer":
        """From tokenizer.json (+ tokenizer_config.json, config.json, generation_config.json)."""
        tokenizer_file = os.path.join(folder, "tokenizer.json")
        if not os.path.exists(tokenizer_file):
            raise ValueError(f"{folder} has no tokenizer.json (a sentencepiece tokenizer.model alone is not supported)")
        backend = BackendTokenizer.from_file(tokenizer_file)
        tokenizer_config = _read_json(os.path.join(folder, "tokenizer_config.json"))
        config = _read_json(os.path.join(folder, "config.json"))
        generation_config = _read_json(os.path.join(folder, "generation_config.json"))

        def token_id(name: str) -> int | None:
            content = _token_content(tokenizer_config.get(name))
            return backend.token_to_id(content) if content is not None else None

        bos_id = token_id("bos_token")
        if bos_id is None:
            bos_id = config.get("bos_token_id")
        configured_eos = _as_id_list(config.get("eos_token_id")) + _as_id_list(generation_config.get("eos_token_id"))
        eos_id = token_id("eos_token")
        if eos_id is None and configured_eos:
            eos_id = configured_eos[0]
        add_bos = tokenizer_config.get("add_bos_token")
        if add_bos is None:
            # a tokenizer.json whose post-processor inserts BOS (Llama 3) adds it by default
            add_bos = bos_id is not None and bos_id in backend.encode("", add_special_tokens=True).ids
        return cls(backend, bos_id=bos_id, eos_id=eos_id, eos_ids=set(configured_eos) | _end_marker_ids(backend),
                   add_bos=bool(add_bos),
                   chat_template=_folder_chat_template(folder, tokenizer_config))

    # ---- text <-> ids

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; special tokens written in it (``<|im_start|>``) become their ids.
        BOS is prepended when ``add_bos`` (default: the tokenizer's own convention)."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def stream_decoder(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    # ---- chat

    def apply_chat_template(self, messages: list[dict] | str, add_generation_prompt: bool = True,
                            **template_kwargs) -> str:
        """The prompt text for ``messages`` ([{"role": ..., "content": ...}], or one user message as
        a string), rendered as transformers' ``apply_chat_template(..., tokenize=False)`` does."""
        if self._compiled_template is None:
            raise ValueError("this tokenizer has no chat template")
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        special_tokens = {"bos_token": self._token_text(self.bos_id), "eos_token": self._token_text(self.eos_id)}
        return self._compiled_template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                              **special_tokens, **template_kwargs)

    def _token_text(self, token_id: int | None) -> str:
        return self.backend.id_to_token(token_id) if token_id is not None else ""

    # ---- identity

    def identity(self) -> str:
        """A short hash of the vocabulary (tokens and their ids) and the merges: equal for two
        tokenizers that split text the same way into the same ids, wherever they were read from."""
        vocab = sorted(self.backend.get_vocab(with_added_tokens=True).items(), key=lambda item: item[1])
        merges = json.loads(self.backend.to_str())["model"].get("merges", [])
        # tokenizer.json writes a merge as "a b" (older files) or ["a", "b"]
        merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in merges]
        digest = hashlib.sha256(json.dumps([vocab, merges], ensure_ascii=False).encode("utf-8"))
        return digest.hexdigest()[:16]


def _end_marker_ids(backend: BackendTokenizer) -> set[int]:
    specials = {token.content for token in backend.get_added_tokens_decoder().values() if token.special}
    return {backend.token_to_id(marker) for marker in END_MARKERS if marker in specials}


class StreamDecoder:
    """Text deltas of a growing sequence of ids that never split a multi-byte UTF-8 character.

    ``push(new_ids)`` returns the text those ids complete; bytes of an unfinished character are
    held back until a later id completes it (a decode ending in U+FFFD means unfinished).
    ``flush()`` returns what is held back, as replacement characters if it never completed.
    Each decode starts one emitted chunk back, so decoders that treat a sequence's first token
    specially (leading-space stripping) see the same context as a full decode.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix_start = 0  # ids[_prefix_start:_emitted_end] is context, already emitted
        self._emitted_end = 0

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self.ids[start:end], skip_special_tokens=self.skip_special_tokens)

    def push(self, new_ids) -> str:
        self.ids.extend(int(i) for i in new_ids)
        prefix = self._decode(self._prefix_start, self._emitted_end)
        text = self._decode(self._prefix_start, len(self.ids))
        if len(text) <= len(prefix) or text.endswith("\ufffd"):
            return ""
        self._prefix_start, self._emitted_end = self._emitted_end, len(self.ids)
        return text[len(prefix):]

    def flush(self) -> str:
        prefix = self._decode(self._prefix_start, self._emitted_end)
        text = self._decode(self._prefix_start, len(self.ids))
        self._prefix_start = self._emitted_end = len(self.ids)
        return text[len(prefix):]
