"""Frequency-ranked LM head (FR-Spec): token rankings and the ranked draft head.

A drafter that scores only the ``n`` most frequent tokens reads ``n/V`` of the LM head.
This module builds the ranking, stores it, and cuts the ranked head out of a model:

    counts = frspec.count_corpus(tokenizer, ["some text", pathlib.Path("corpus.jsonl")])
    counts = frspec.count_generated(model, prompts, max_new_tokens=128)   # text the target writes
    ranking = frspec.Ranking.from_counts(counts, tokenizer, source="my corpus")
    ranking.save("smollm2.frspec");  ranking = frspec.Ranking.load("smollm2.frspec", tokenizer)
    head = frspec.ranked_head(model, ranking, 8192)       # head.weight [n, d], head.token_map [n]

    ranking = frspec.default_ranking(model)               # built once, cached under ~/.cache/fastverify/frspec

Every special token of the tokenizer (BOS, EOS and the other stop ids, chat-template and
other added tokens) is put at the front of the ranking, so every subset keeps them: a
draft can always propose the end of a turn. Subsets are nested: ``subset(8192)`` is a
prefix of ``subset(16384)``. Verification stays lossless whatever the subset: the
target's full-vocabulary logits are what the verification ops see; the draft law is
zero outside the subset.
"""

from __future__ import annotations

import ast
import hashlib
import json
import operator
import os
import pathlib
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from typing import Iterable

import torch
from tqdm.auto import tqdm

from .ops import lm_head_topk

FORMAT = "fastverify.frspec"
FORMAT_VERSION = 1
SOURCES = ("generated", "corpus")

# --------------------------------------------------------------------------- counting


def count_corpus(tokenizer, texts, *, vocab_size: int | None = None, batch_chars: int = 1 << 20) -> torch.Tensor:
    """Token counts ``[V]`` int64 of a corpus encoded by ``tokenizer`` (no BOS added).

    ``texts``: an iterable whose items are strings (text) or ``os.PathLike`` paths
    (``pathlib.Path``) of text files (read whole, UTF-8) or ``.jsonl`` files (one JSON value
    a line: a string, or an object with ``"text"``, ``"content"``, ``"messages"``
    [{"content": ...}] or ``"conversations"`` [{"value": ...}]). A single path is taken as
    ``[path]``; a bare string is refused (it would be read character by character).
    ``vocab_size``: length of the result (default: the tokenizer's; give the model's when
    its LM head has more rows than the tokenizer has tokens).
    """
    if isinstance(texts, str):
        raise ValueError("texts must be an iterable of strings or paths, not one string: "
                         "wrap a text in a list, or pass a file as pathlib.Path")
    if isinstance(texts, os.PathLike):
        texts = [texts]
    V = int(vocab_size if vocab_size is not None else tokenizer.vocab_size)
    if V < 1:
        raise ValueError(f"vocab_size must be >= 1, got {V}")
    counts = torch.zeros(V, dtype=torch.int64)
    batch: list[str] = []
    size = 0

    def flush():
        nonlocal size
        if batch:
            _add_counts(counts, _encode_many(tokenizer, batch))
        batch.clear()
        size = 0

    for text in _corpus_texts(texts):
        if not text:
            continue
        batch.append(text)
        size += len(text)
        if size >= batch_chars:
            flush()
    flush()
    return counts


def _corpus_texts(items: Iterable) -> Iterable[str]:
    for i, item in enumerate(items):
        if isinstance(item, str):
            yield item
        elif isinstance(item, os.PathLike):
            yield from _file_texts(pathlib.Path(item))
        else:
            raise ValueError(f"texts[{i}] must be a string or an os.PathLike path, got {type(item).__name__}")


def _file_texts(path: pathlib.Path) -> Iterable[str]:
    if not path.is_file():
        raise ValueError(f"corpus file {str(path)!r} does not exist")
    if path.suffix.lower() != ".jsonl":
        with open(path, encoding="utf-8") as f:
            # paragraphs, so that huge files are never held whole
            chunk: list[str] = []
            for line in f:
                chunk.append(line)
                if (len(chunk) >= 4096 and not line.strip()) or len(chunk) >= 65536:
                    yield "".join(chunk)
                    chunk = []
            if chunk:
                yield "".join(chunk)
        return
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not a JSON line ({e.msg})") from None
            text = _json_text(value)
            if text is None:
                raise ValueError(f"{path}:{number}: a line must be a string or an object with 'text', 'content', "
                                 f"'messages' or 'conversations'")
            yield text


def _json_text(value) -> str | None:
    if isinstance(value, str):
        return value
    if not isinstance(value, dict):
        return None
    for key in ("text", "content"):
        if isinstance(value.get(key), str):
            return value[key]
    for key, field in (("messages", "content"), ("conversations", "value")):
        turns = value.get(key)
        if isinstance(turns, list):
            return "\n".join(t[field] for t in turns if isinstance(t, dict) and isinstance(t.get(field), str))
    return None


def _encode_many(tokenizer, texts: list[str]) -> list[list[int]]:
    backend = getattr(tokenizer, "backend", None)
    if backend is not None and hasattr(backend, "encode_batch"):
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return [tokenizer.encode(t, add_bos=False) for t in texts]


def _add_counts(counts: torch.Tensor, id_lists) -> None:
    ids = torch.tensor([t for ids in id_lists for t in ids], dtype=torch.int64)
    if ids.numel() == 0:
        return
    if int(ids.min()) < 0 or int(ids.max()) >= counts.numel():
        raise ValueError(f"token id {int(ids.max())} is outside the vocabulary [0, {counts.numel()}): "
                         f"pass the model's vocab_size")
    counts += torch.bincount(ids, minlength=counts.numel())


def count_generated(model, prompts, *, max_new_tokens: int = 128, batch_size: int = 16, temperature: float = 0.7,
                    seed: int = 0, chat: bool = True, progress: bool = True, **generate_options) -> torch.Tensor:
    """Token counts ``[V]`` int64 of the text ``model`` itself generates for ``prompts``
    (VocabTrim: the target's own text ranks its draft vocabulary best).

    Runs :func:`fastverify.generate` over ``batch_size`` prompts at a time (prompt ``i``
    sampled with seed ``seed + i``, so counts do not depend on ``batch_size``) and counts
    the generated tokens (prompts excluded, a final stop token included). ``progress``
    draws a bar on stderr.
    """
    from .decoding import generate

    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings or of token-id lists")
    for name, value in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    V = model.config.vocab_size
    counts = torch.zeros(V, dtype=torch.int64)
    # a request that stops early accounts for its whole budget when its batch ends
    bar = tqdm(total=len(prompts) * max_new_tokens, unit="tok", file=sys.stderr, dynamic_ncols=True,
               disable=not progress, desc="counting generated tokens")
    batches = -(-len(prompts) // batch_size)
    try:
        for index, start in enumerate(range(0, len(prompts), batch_size), 1):
            chunk = list(prompts[start:start + batch_size])
            bar.set_postfix_str(f"batch {index}/{batches}")
            before = bar.n
            result = generate(model, chunk, max_new_tokens=max_new_tokens, temperature=temperature,
                              seed=[seed + start + i for i in range(len(chunk))], chat=chat,
                              on_tokens=(lambda b, new: bar.update(len(new))) if progress else None,
                              **generate_options)
            _add_counts(counts, result.tokens)
            bar.update(before + len(chunk) * max_new_tokens - bar.n)
    finally:
        bar.close()
    return counts


# --------------------------------------------------------------------------- ranking


def always_kept_ids(tokenizer=None, extra=()) -> list[int]:
    """The ids every subset keeps: the tokenizer's BOS, EOS and other stop ids, and every
    added token (chat-template markers such as ``<|im_start|>``, ``<think>``, ...), plus ``extra``."""
    ids = {int(i) for i in extra if i is not None}
    if tokenizer is not None:
        for name in ("bos_id", "eos_id"):
            if getattr(tokenizer, name, None) is not None:
                ids.add(int(getattr(tokenizer, name)))
        ids.update(int(i) for i in getattr(tokenizer, "eos_ids", ()) or ())
        backend = getattr(tokenizer, "backend", None)
        if backend is not None and hasattr(backend, "get_added_tokens_decoder"):
            ids.update(int(i) for i in backend.get_added_tokens_decoder())
    return sorted(ids)


def _identity(tokenizer) -> str | None:
    if tokenizer is None:
        return None
    identity = getattr(tokenizer, "identity", None)
    if identity is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no identity(): cannot tie a ranking to it")
    return str(identity() if callable(identity) else identity)


@dataclass
class Ranking:
    """Token ids ranked for a frequency-ranked draft head.

    ``order [V]`` int64: every id once; the ``num_kept`` always-kept (special) ids first,
    then the rest, most frequent first, ties by lower id. ``counts [V]`` int64: what was
    counted. ``tokenizer_identity``: :meth:`Tokenizer.identity` of the tokenizer the counts
    were made with (None: unknown). ``source``: what was counted, in words.
    """

    order: torch.Tensor
    counts: torch.Tensor
    num_kept: int
    tokenizer_identity: str | None = None
    source: str = ""
    format_version: int = FORMAT_VERSION


    def ranked_head(self, model, n: int) -> "RankedHead":
        """The ranked head of ``model`` over this ranking's ``n`` first tokens (what
        ``fastverify.generate(..., frspec_vocab=n, frspec_ranking=self)`` drafts with)."""
        return ranked_head(model, self, n)

    def __post_init__(self):
        order, counts = self.order, self.counts
        if not isinstance(order, torch.Tensor) or order.dim() != 1 or order.dtype != torch.int64 or order.numel() < 1:
            raise ValueError("order must be a non-empty 1-D int64 tensor")
        if not isinstance(counts, torch.Tensor) or counts.shape != order.shape or counts.dtype != torch.int64:
            raise ValueError(f"counts must be an int64 tensor shaped like order {tuple(order.shape)}")
        V = order.numel()
        if int(order.min()) < 0 or int(order.max()) >= V or not bool((torch.bincount(order, minlength=V) == 1).all()):
            raise ValueError(f"order must hold every id of [0, {V}) exactly once")
        if bool((counts < 0).any()):
            raise ValueError("counts must be >= 0")
        if not 0 <= self.num_kept <= V:
            raise ValueError(f"num_kept must be in [0, {V}], got {self.num_kept}")

    # ---- building

    @classmethod
    def from_counts(cls, counts, tokenizer=None, *, source: str = "", keep=()) -> "Ranking":
        """Rank ``counts [V]`` (most frequent first, ties by lower id), with the tokenizer's
        special tokens (:func:`always_kept_ids`) and the ids in ``keep`` in front."""
        counts = torch.as_tensor(counts)
        if counts.dim() != 1 or counts.numel() < 1 or counts.dtype.is_floating_point or counts.dtype == torch.bool:
            raise ValueError("counts must be a non-empty 1-D integer tensor [V]")
        counts = counts.to(device="cpu", dtype=torch.int64).clone()
        if bool((counts < 0).any()):
            raise ValueError("counts must be >= 0")
        V = counts.numel()
        kept = always_kept_ids(tokenizer, keep)
        if kept and (kept[0] < 0 or kept[-1] >= V):
            bad = [i for i in kept if not 0 <= i < V]
            raise ValueError(f"always-kept token ids {bad[:5]} are outside the vocabulary [0, {V}) of the counts: "
                             f"count with the model's vocab_size")
        by_count = torch.sort(counts, descending=True, stable=True).indices          # ties: lower id first
        is_kept = torch.zeros(V, dtype=torch.bool)
        is_kept[torch.tensor(kept, dtype=torch.int64)] = True
        front = torch.sort(is_kept[by_count].to(torch.int8), descending=True, stable=True).indices
        return cls(order=by_count[front], counts=counts, num_kept=len(kept),
                   tokenizer_identity=_identity(tokenizer), source=source)

    # ---- use

    @property
    def vocab_size(self) -> int:
        return self.order.numel()

    @property
    def num_tokens(self) -> int:
        """Tokens counted."""
        return int(self.counts.sum())

    @property
    def kept_ids(self) -> torch.Tensor:
        """The always-kept ids (the front of every subset)."""
        return self.order[:self.num_kept].clone()

    def _check_n(self, n) -> int:
        if isinstance(n, bool):
            raise ValueError(f"n must be an integer, got {n!r}")
        try:
            n = operator.index(n)
        except TypeError:
            raise ValueError(f"n must be an integer, got {n!r}") from None
        if n > self.vocab_size:
            raise ValueError(f"n ({n}) is larger than the vocabulary ({self.vocab_size} tokens)")
        if n < max(1, self.num_kept):
            raise ValueError(f"n ({n}) must be at least the number of always-kept special tokens "
                             f"({self.num_kept}) and >= 1")
        return n

    def subset(self, n: int) -> torch.Tensor:
        """``token_map [n]`` int64: the ``n`` first ids of the ranking (a copy). Nested:
        ``subset(m)`` is a prefix of ``subset(n)`` for m <= n; the special tokens are in all."""
        return self.order[:self._check_n(n)].clone()

    def coverage(self, n: int) -> float:
        """Share of the counted tokens that ``subset(n)`` holds."""
        total = self.num_tokens
        return float(self.counts[self.order[:self._check_n(n)]].sum()) / total if total else 0.0

    def __repr__(self) -> str:
        return (f"Ranking(vocab_size={self.vocab_size}, num_tokens={self.num_tokens}, num_kept={self.num_kept}, "
                f"tokenizer_identity={self.tokenizer_identity!r}, source={self.source!r})")

    def __eq__(self, other) -> bool:
        if not isinstance(other, Ranking):
            return NotImplemented
        return (torch.equal(self.order, other.order) and torch.equal(self.counts, other.counts)
                and (self.num_kept, self.tokenizer_identity, self.source, self.format_version)
                == (other.num_kept, other.tokenizer_identity, other.source, other.format_version))

    # ---- files

    def save(self, path) -> None:
        """Write a safetensors file (tensors ``order``, ``counts``; JSON-able metadata),
        atomically: a temporary file in the same folder, then ``os.replace``."""
        from safetensors.torch import save

        metadata = {"format": FORMAT, "format_version": str(self.format_version),
                    "tokenizer_identity": self.tokenizer_identity or "", "vocab_size": str(self.vocab_size),
                    "num_tokens": str(self.num_tokens), "num_kept": str(self.num_kept), "source": self.source}
        data = save({"order": self.order.contiguous(), "counts": self.counts.contiguous()}, metadata=metadata)
        _atomic_write(os.fspath(path), data)

    @classmethod
    def load(cls, path, tokenizer=None) -> "Ranking":
        """Read a file written by :meth:`save`. With ``tokenizer``, refuse a ranking made for
        another vocabulary (or one whose tokenizer is unknown)."""
        from safetensors import SafetensorError
        from safetensors.torch import load

        path = os.fspath(path)
        with open(path, "rb") as f:
            data = f.read()
        try:
            tensors = load(data)
            metadata = _safetensors_metadata(data)
        except (SafetensorError, ValueError, KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a frspec ranking file ({e})") from None
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path} is not a frspec ranking file (format {metadata.get('format')!r})")
        version = metadata.get("format_version")
        if version != str(FORMAT_VERSION):
            raise ValueError(f"{path} has frspec format version {version!r}; this fastverify reads version "
                             f"{FORMAT_VERSION}: rebuild the ranking")
        identity = metadata.get("tokenizer_identity") or None
        if tokenizer is not None:
            expected = _identity(tokenizer)
            if identity is None:
                raise ValueError(f"{path} was made without a tokenizer, so it cannot be checked against this one "
                                 f"(identity {expected}); load it without tokenizer= if you know it fits")
            if identity != expected:
                raise ValueError(f"{path} was made for another tokenizer (identity {identity}, this tokenizer's is "
                                 f"{expected}): its token ids would mean other tokens")
        if set(tensors) != {"order", "counts"}:
            raise ValueError(f"{path} holds tensors {sorted(tensors)}, expected order and counts")
        try:
            ranking = cls(order=tensors["order"], counts=tensors["counts"], num_kept=int(metadata["num_kept"]),
                          tokenizer_identity=identity, source=metadata.get("source", ""))
        except (KeyError, ValueError) as e:
            raise ValueError(f"{path} is not a valid frspec ranking ({e})") from None
        if metadata.get("vocab_size") != str(ranking.vocab_size) or metadata.get("num_tokens") != str(ranking.num_tokens):
            raise ValueError(f"{path}: its metadata does not match its tensors")
        return ranking


def _safetensors_metadata(data: bytes) -> dict:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]).get("__metadata__") or {}


def _write_all(f, data: bytes, chunk: int = 1 << 20) -> None:
    for start in range(0, len(data), chunk):
        f.write(data[start:start + chunk])


def _atomic_write(path: str, data: bytes) -> None:
    """``path`` holds either its old content or all of ``data``, never a part."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            _write_all(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


# --------------------------------------------------------------------------- ranked head


@dataclass
class RankedHead:
    """The LM-head rows of a token subset, in rank order.

    ``weight [n, d]``: a contiguous copy (never a view of the model's head or embedding);
    ``token_map [n]`` int64: row -> full-vocabulary id; ``vocab_size``: the full V.
    """

    weight: torch.Tensor
    token_map: torch.Tensor
    vocab_size: int

    @property
    def n(self) -> int:
        return self.weight.shape[0]

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    def to(self, device=None, dtype=None) -> "RankedHead":
        """A head on ``device`` / in ``dtype`` (token_map stays int64)."""
        return RankedHead(self.weight.to(device=device, dtype=dtype).contiguous(),
                          self.token_map.to(device=device), self.vocab_size)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Subset logits ``[..., n]`` of ``hidden [..., d]`` (column j is token ``token_map[j]``)."""
        return hidden.to(self.weight.dtype) @ self.weight.t()

    def full_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``[..., V]``: the subset's, −inf for every token outside it."""
        sub = self.logits(hidden)
        out = sub.new_full((*sub.shape[:-1], self.vocab_size), float("-inf"))
        out[..., self.token_map] = sub
        return out

    def topk(self, hidden: torch.Tensor, k: int, *, temperature=None):
        """``fastverify.lm_head_topk`` on this head: (full-vocabulary ids, log-probabilities, lse)."""
        return lm_head_topk(hidden, self.weight, k, token_map=self.token_map, temperature=temperature,
                            vocab_size=self.vocab_size)


def _head_weight(model) -> torch.Tensor:
    if isinstance(model, torch.Tensor):
        return model
    for name in ("lm_head", "output"):
        head = getattr(model, name, None)
        if head is not None and isinstance(getattr(head, "weight", None), torch.Tensor):
            return head.weight
    raise ValueError(f"{type(model).__name__} has no LM head (an lm_head or output module with a weight)")


def ranked_head(model, ranking_or_token_map, n: int | None = None, *, device=None, dtype=None) -> RankedHead:
    """The ranked head of ``model`` (tied embeddings included: the rows are copied).

    ``ranking_or_token_map``: a :class:`Ranking` (``n`` required: its ``subset(n)``) or a
    1-D integer tensor / list of distinct full-vocabulary ids in rank order (``n``, if given,
    keeps its first ``n``). ``model``: a model with ``lm_head`` (or ``output``), or the
    head weight ``[V, d]`` itself.
    """
    from .models.quantized import QuantizedLinear, weight_rows

    blocks = getattr(model, "lm_head", None)
    if isinstance(blocks, QuantizedLinear):   # GGUF blocks: dequantize the subset's rows only
        weight, V = None, blocks.out_features
    else:
        blocks, weight = None, _head_weight(model)
        if weight.dim() != 2:
            raise ValueError(f"the LM head weight must be [V, d], got {tuple(weight.shape)}")
        V = weight.shape[0]
    if isinstance(ranking_or_token_map, Ranking):
        ranking = ranking_or_token_map
        if n is None:
            raise ValueError("n (the subset size) is required with a Ranking")
        if ranking.vocab_size != V:
            raise ValueError(f"the ranking covers {ranking.vocab_size} tokens but the model's LM head has {V} rows")
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is not None and ranking.tokenizer_identity is not None:
            if _identity(tokenizer) != ranking.tokenizer_identity:
                raise ValueError(f"the ranking was made for another tokenizer (identity {ranking.tokenizer_identity}, "
                                 f"the model's is {_identity(tokenizer)})")
        token_map = ranking.subset(n)
    else:
        token_map = torch.as_tensor(ranking_or_token_map)
        if token_map.dim() != 1 or token_map.numel() < 1 or token_map.dtype.is_floating_point \
                or token_map.dtype == torch.bool or token_map.is_complex():
            raise ValueError("token_map must be a non-empty 1-D integer tensor of token ids")
        token_map = token_map.to(device="cpu", dtype=torch.int64)
        if n is not None:
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= token_map.numel():
                raise ValueError(f"n must be an integer in [1, {token_map.numel()}] (the token_map's length), got {n!r}")
            token_map = token_map[:n]
        token_map = token_map.clone()
        if int(token_map.min()) < 0 or int(token_map.max()) >= V:
            raise ValueError(f"token_map holds ids outside the vocabulary [0, {V})")
        if torch.unique(token_map).numel() != token_map.numel():
            raise ValueError("token_map holds an id more than once")
    if blocks is not None:
        rows = weight_rows(blocks, token_map)
    else:
        rows = weight.detach().index_select(0, token_map.to(weight.device))   # a new tensor, never a view
    rows = rows.to(device=device, dtype=dtype).contiguous()
    return RankedHead(rows, token_map.to(device=rows.device), V)


# --------------------------------------------------------------------------- defaults

# Prompts whose answers the default "generated" ranking counts: the everyday kinds of
# request a small chat model gets (explaining, writing, code, arithmetic, editing, lists).
DEFAULT_PROMPTS = [
    "Explain in a few sentences why the sky is blue.",
    "What causes the seasons on Earth?",
    "How does a vaccine train the immune system?",
    "Explain how a refrigerator keeps food cold.",
    "What is the difference between weather and climate?",
    "Why do we have leap years?",
    "Explain photosynthesis to a ten-year-old.",
    "How do airplanes stay in the air?",
    "What is inflation and why does it happen?",
    "Give three tips for getting better sleep.",
    "What are the main causes of the French Revolution?",
    "Describe the water cycle step by step.",
    "Write a short poem about the sea.",
    "Write a short story about a robot who learns to paint.",
    "Write a polite email asking my manager for a day off next Friday.",
    "Write a product description for a reusable water bottle.",
    "Write a haiku about autumn leaves.",
    "Write a thank-you note to a teacher.",
    "Write a short speech for a friend's wedding.",
    "Describe a busy market in the morning.",
    "Write a Python function that checks whether a string is a palindrome.",
    "Write a Python function that returns the n-th Fibonacci number, with a docstring.",
    "Explain what a hash table is and give a Python example.",
    "Write a SQL query that returns the ten customers with the highest total orders.",
    "Write a JavaScript function that removes duplicates from an array.",
    "What is the difference between a list and a tuple in Python?",
    "Explain recursion with a simple example.",
    "How do I read a CSV file in Python and compute the average of a column?",
    "Write a bash command that counts the lines of every .txt file in a folder.",
    "Explain what a REST API is.",
    "What is 17 times 23? Show your work.",
    "A train travels 180 km in 2 hours. What is its average speed?",
    "Solve for x: 3x + 7 = 22.",
    "What is the area of a circle with a radius of 5 cm?",
    "If I save 50 dollars a month, how much will I have after three years?",
    "Give me a recipe for pancakes.",
    "Suggest a three-day itinerary for a trip to Rome.",
    "What should I pack for a weekend hiking trip?",
    "How can I stay motivated while learning a new language?",
    "Give me five ideas for a birthday party for a seven-year-old.",
    "List the planets of the solar system in order from the sun.",
    "List five healthy breakfast ideas.",
    "What are the pros and cons of working from home?",
    "Compare cats and dogs as pets.",
    "Summarize the plot of Romeo and Juliet in three sentences.",
    "Translate 'Good morning, how are you?' into French and Spanish.",
    "Correct the grammar in this sentence: 'She don't like going to school on mondays.'",
    "Rewrite this sentence to sound more formal: 'We gotta finish this stuff by tomorrow.'",
]


def cache_dir() -> str:
    """``$FASTVERIFY_CACHE/frspec`` (default ``~/.cache/fastverify/frspec``)."""
    root = os.environ.get("FASTVERIFY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastverify")
    return os.path.join(root, "frspec")


_SKIPPED_STDLIB = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo",
                   "ensurepip", "pydoc_data", "__pycache__", "tkinter", "venv"}


def builtin_corpus_description() -> str:
    return (f"Python {sys.version_info.major}.{sys.version_info.minor} standard library text: "
            f"the pydoc topics (language reference) and the docstrings of its modules")


def builtin_corpus() -> Iterable[str]:
    """A corpus every machine has without a download: the English prose and code examples
    of the running Python's standard library — the language reference topics that ``pydoc``
    ships (``pydoc_data.topics``) and the docstrings of the library's modules, classes and
    functions (read with ``ast``, nothing is imported; tests, IDLE, tkinter left out).
    About 2 MB of text for CPython 3.11."""
    try:
        from pydoc_data import topics
        for key in sorted(topics.topics):
            yield topics.topics[key]
    except ImportError:
        pass
    root = sysconfig.get_paths()["stdlib"]
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in _SKIPPED_STDLIB and not d.startswith("."))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc:
                        yield doc


def _model_fingerprint(model) -> str:
    """Tells models apart cheaply: config, running layers and a sample of the head rows."""
    weight = _head_weight(model).detach()
    sample = weight[::max(1, weight.shape[0] // 64)].float().cpu().contiguous()
    h = hashlib.sha256(repr((model.config, getattr(model, "layer_ids", None))).encode())
    h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def default_ranking(model, source: str = "generated", *, prompts=None, max_new_tokens: int = 128,
                    batch_size: int = 16, temperature: float = 0.7, seed: int = 0, cache: str | None = None,
                    refresh: bool = False, progress: bool = True) -> Ranking:
    """The ranking of ``model``'s vocabulary, built once and cached.

    ``source="generated"`` (default): the tokens ``model`` generates for ``prompts`` (default
    :data:`DEFAULT_PROMPTS`, ``max_new_tokens`` each, sampled at ``temperature``);
    ``"corpus"``: the tokens of :func:`builtin_corpus` (the Python standard library's docs).
    Cached as ``<cache>/<tokenizer identity>-<source>-<settings hash>.frspec`` (``cache``
    default :func:`cache_dir`); ``refresh`` rebuilds it.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("default_ranking needs a model with a tokenizer (model.tokenizer)")
    identity = _identity(tokenizer)
    V = model.config.vocab_size
    keep = [model.config.bos_id, *model.config.eos_ids]
    if source == "corpus":
        description = builtin_corpus_description()
        settings = [FORMAT_VERSION, description, V]
    else:
        prompts = list(DEFAULT_PROMPTS if prompts is None else prompts)
        description = (f"generated by the model ({len(prompts)} prompts, up to {max_new_tokens} tokens each, "
                       f"temperature {temperature}, seed {seed})")
        settings = [FORMAT_VERSION, _model_fingerprint(model), prompts, max_new_tokens, temperature, seed, V]
    key = hashlib.sha256(json.dumps(settings, default=str).encode()).hexdigest()[:12]
    path = os.path.join(cache or cache_dir(), f"{identity}-{source}-{key}.frspec")
    if not refresh and os.path.exists(path):
        try:
            return Ranking.load(path, tokenizer)
        except ValueError:
            pass  # another format version or a damaged file: build it anew
    if source == "corpus":
        counts = count_corpus(tokenizer, builtin_corpus(), vocab_size=V)
    else:
        counts = count_generated(model, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 temperature=temperature, seed=seed, progress=progress)
    ranking = Ranking.from_counts(counts, tokenizer, source=description, keep=keep)
    ranking.save(path)
    return ranking


__all__ = ["DEFAULT_PROMPTS", "FORMAT_VERSION", "RankedHead", "Ranking", "always_kept_ids", "builtin_corpus",
           "cache_dir", "count_corpus", "count_generated", "default_ranking", "ranked_head"]
