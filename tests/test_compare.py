"""``fastverify compare`` on a tiny GGUF: native rows beside fp32 rows, each checked against
the ar of its own weights, the report's weights / agreement / memory sections, and
``measure_memory`` in fresh processes (fastverify only: the tiny file has no tokenizer,
which llama.cpp needs)."""

import json

import pytest

from model_fixtures import tiny_model, write_gguf

from fastverify import compare, models

gguf = pytest.importorskip("gguf")

PROMPTS = {"short": [1, 5, 9, 12, 5, 9], "longer": [3, 4, 5, 6, 7, 3, 4, 5, 6, 7, 3, 4]}


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A tiny llama GGUF whose matrices are all Q8_0 / Q4_1 / Q4_0 blocks."""
    path = str(tmp_path_factory.mktemp("compare") / "tiny.gguf")
    write_gguf(path, tiny_model("llama", seed=3), matrix_types=("Q8_0", "Q4_1", "Q4_0"))
    return path


@pytest.fixture(scope="module")
def native_report(tiny_gguf):
    native = models.load(tiny_gguf, weights="native")
    fp32 = models.load(tiny_gguf, weights="dequant")
    methods = [compare.METHODS[0], compare.METHODS[1]]            # ar, chain/ngram on the blocks
    return compare.run(native, prompts=PROMPTS, methods=methods, fp32_model=fp32, fp32_methods=compare.FP32_METHODS,
                       hf_methods=["hf"], max_new_tokens=8, progress_bar=False)


def test_native_and_fp32_rows_each_against_their_own_ar(native_report):
    rows = {r["label"]: r for r in native_report["rows"]}
    assert list(rows) == ["ar", "chain/ngram", "ar (fp32)", "chain/ngram (fp32)", "hf"]
    assert [rows[k]["weights"] for k in rows] == ["native", "native", "dequant", "dequant", "dequant"]
    for r in rows.values():   # greedy: every row emits its own baseline's tokens
        assert r["same_as_ar"] + len(r["ties"]) == len(PROMPTS) and not r["divergences"], r
    assert native_report["weights"] == "native"
    info = native_report["models"]
    assert info["native"]["block_types"] == ["Q4_0", "Q4_1", "Q8_0"]
    assert info["dequant"]["block_types"] == [] and info["dequant"]["dtype"] == "float32"
    assert info["native"]["weight_bytes"] < info["dequant"]["weight_bytes"]
    assert native_report["file"]["tensor_types"]["F32"] == 5       # norms: 2 per layer + the final one


def test_report_renders_weights_models_agreement_and_memory(native_report, tmp_path):
    report = dict(native_report, agreement={"native": {"short": compare.agreement([1, 2, 3, 4], [1, 2, 9, 4])}},
                  memory=[{"kind": "fastverify native", "load_s": 0.5, "rss_imports": 300e6, "rss_load": 310e6,
                           "rss_generate": 312e6, "above_imports": 10e6, "file_load": 0},
                          {"kind": "llama.cpp", "error": "no tokenizer"}], memory_threads=2)
    text = compare.render_markdown(report)
    assert "| ar | Q4_0/Q4_1/Q8_0 blocks |" in text and "| ar (fp32) | float32 |" in text
    assert "| native | float32 | Q4_0, Q4_1, Q8_0 | " in text and "tensors " in text
    assert "| short | prefix 2, equal 3 / 4 |" in text
    assert "| fastverify native | 0.50 s | 300 MB | 310 MB | 10 MB | 0 MB | 312 MB |" in text
    assert "| llama.cpp | failed: no tokenizer |" in text and "RSS after 4 tokens" in text
    paths = compare.write_report(report, str(tmp_path / "r"))
    assert json.loads((tmp_path / "r.json").read_text())["rows"][2]["weights"] == "dequant"
    assert len(paths) in (2, 3)


def test_agreement_counts_prefix_and_equal_positions():
    assert compare.agreement([1, 2, 3], [1, 2, 3]) == {"prefix": 3, "equal": 3, "length": 3}
    assert compare.agreement([1, 2, 3, 4], [1, 7, 3]) == {"prefix": 1, "equal": 2, "length": 4}
    assert compare.agreement([], [5]) == {"prefix": 0, "equal": 0, "length": 1}


def test_run_refuses_native_without_its_fp32_twin(tiny_gguf):
    native = models.load(tiny_gguf, weights="native")
    with pytest.raises(ValueError, match="fp32_model"):
        compare.run(native, prompts=PROMPTS, methods=[compare.METHODS[0]], hf_methods=["hf"], progress_bar=False)
    fp32 = models.load(tiny_gguf, weights="dequant")
    with pytest.raises(ValueError, match="fp32_methods"):
        compare.run(fp32, prompts=PROMPTS, methods=[compare.METHODS[0]], hf_methods=[],
                    fp32_methods=compare.FP32_METHODS, progress_bar=False)


def test_measure_memory_in_fresh_processes(tiny_gguf):
    rows = compare.measure_memory(tiny_gguf, threads=1, kinds=["fastverify native", "fastverify fp32"])
    assert [r["kind"] for r in rows] == ["fastverify native", "fastverify fp32"]
    for r in rows:
        assert "error" not in r, r
        assert r["load_s"] > 0 and r["rss_imports"] > 50e6   # torch alone is more than 50 MB
        assert r["rss_load"] >= r["rss_imports"] - 5e6 and r["above_imports"] == r["rss_load"] - r["rss_imports"]
    with pytest.raises(ValueError, match="kinds"):
        compare.measure_memory(tiny_gguf, threads=1, kinds=["vllm"])


def test_dequant_weights_give_one_kind_of_rows(tiny_gguf):
    fp32 = models.load(tiny_gguf, weights="dequant")
    report = compare.run(fp32, prompts=PROMPTS, methods=[compare.METHODS[0], compare.METHODS[1]], hf_methods=["hf"],
                         max_new_tokens=6, progress_bar=False)
    assert [(r["label"], r["weights"], r["same_as_ar"] + len(r["ties"])) for r in report["rows"]] == \
        [("ar", "dequant", 2), ("chain/ngram", "dequant", 2), ("hf", "dequant", 2)]
    assert report["weights"] == "dequant" and list(report["models"]) == ["dequant"]
    assert "| ar | float32 |" in compare.render_markdown(report)
