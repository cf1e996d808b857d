"""scripts/gpu_check.sh rehearsed on CPU (``--smoke``: Triton interpreter, CUDA emulator, tiny
shapes), so the one-command GPU proof cannot rot between GPU leases; and its parsers."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import gpu_check  # noqa: E402

FAMILIES = ("rejection", "tree_attention", "lm_head", "sparse_kv")
BACKENDS = ("torch", "triton", "cuda")
OPS = {"rejection": {"rejection_sample", "tree_rejection_sample", "rejection_sample verify=block",
                     "rejection_sample verify=typical", "tree_rejection_sample verify=block_wor"},
       "tree_attention": {"tree_attention"},
       "lm_head": {"lm_head_topk", "lm_head_sample"}, "sparse_kv": {"sparse_kv_attention", "select_kv_chunks"}}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTVERIFY_TEST_REPORT")}
    proc = subprocess.run([os.path.join(ROOT, "scripts", "gpu_check.sh"), "--smoke", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    return proc, out


def test_smoke_run_passes_every_stage(smoke):
    proc, out = smoke
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    stages = [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines()]
    assert [s["stage"] for s in stages] == ["env", "build", "tests", "bench", "static", "report"]
    assert all(s["rc"] == 0 and not s["timed_out"] for s in stages), stages
    assert "gpu_check — " in proc.stdout                    # the one-screen summary


def test_report_has_the_schema_and_covers_every_family_and_backend(smoke):
    _, out = smoke
    data = json.loads((out / "gpu_check.json").read_text())
    assert {"device", "versions", "build_s", "tests", "bench"} <= set(data)
    assert data["build_s"] is not None and data["versions"]["torch"]
    for t in data["tests"]:
        assert set(t) == {"family", "backend", "passed", "failed", "skipped", "seconds"}
    tests = {(t["family"], t["backend"]): t for t in data["tests"]}
    for fam in FAMILIES:
        for backend in BACKENDS:
            t = tests[(fam, backend)]
            assert t["passed"] > 0 and t["failed"] == 0, t
    keys = {"family", "op", "shape", "backend", "median_us", "gbps", "pct_of_bound", "baseline", "speedup"}
    assert all(keys <= set(b) for b in data["bench"])
    for fam in FAMILIES:
        for backend in BACKENDS:
            rows = [b for b in data["bench"] if b["family"] == fam and b["backend"] == backend]
            assert {b["op"] for b in rows} == OPS[fam], (fam, backend)
            assert all(b["status"] == "ok" and b["median_us"] > 0 for b in rows), rows
    assert {b["name"] for b in data["baselines"]} >= {"eager", "compiled", "sdpa", "flex", "subset", "full",
                                                     "gather+sdpa"}
    with_baseline = [b for b in data["bench"] if b["baseline"] is not None]
    assert with_baseline and all(b["speedup"] > 0 for b in with_baseline)
    assert data["static"]["cuda"] and data["static"]["triton"] and not data["static"]["errors"]
    for name in ("gpu_check.md", "gpu_check.png"):
        assert (out / name).stat().st_size > 0


PTXAS = """ptxas info    : Compiling entry function '_Z6kernelPf' for 'sm_90'
ptxas info    : Function properties for _Z6kernelPf
    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 50000 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function '_Z5smallv' for 'sm_90'
ptxas info    : Function properties for _Z5smallv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers, 400 bytes cmem[0]
"""


def test_ptxas_lines_are_parsed():
    a, b = gpu_check.parse_ptxas(PTXAS)
    assert (a["regs"], a["spills"], a["smem"]) == (168, 20, 50000)
    assert (b["regs"], b["spills"], b["smem"]) == (32, 0, 0)


@pytest.mark.parametrize("regs,smem,threads,blocks", [
    (32, 0, 256, 8),            # threads bound: 2048 / 256
    (128, 0, 256, 2),           # registers: 65536 / (128·256)
    (168, 0, 256, 1),           # 168 → 168 per thread → 43008 per block
    (64, 120_000, 128, 1),      # shared memory: 233472 / (120000 + 1024)
    (255, 0, 1024, 0),          # does not fit at all
])
def test_residency_on_sm90(regs, smem, threads, blocks):
    k = gpu_check.residency(dict(regs=regs, smem=smem, threads=threads))
    assert k["blocks_per_sm"] == blocks
    assert bool(gpu_check.flag(k)) == (blocks < 2)
