"""The cpu backend as a whole: it is the default on CPU tensors, every op gives the same
bits for any thread count and every element type, the torch backend takes over where the
C++ kernels cannot be built, and the portable (-march=x86-64) build passes the family
tests too. The family modules (test_rejection.py, ...) test each op on cpu against the
naive oracles like every other backend."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

import fastverify
import fastverify.cpu
from fastverify.ops import _common
from problems import chain_problem, multi_path_problem, run_chain, run_tree, tree_problem
from attention_problems import paged_problem

needs_library = pytest.mark.skipif(not fastverify.cpu.available(), reason="no C++ compiler for csrc/cpu")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = {"rejection": ("rejection_sample", "tree_rejection_sample"),
       "tree_attention": ("build_tree", "tree_attention", "compact_kv"),
       "frspec": ("lm_head_topk", "lm_head_sample"),
       "sparse_kv": ("select_kv_chunks", "sparse_kv_attention")}


def test_library_builds_wherever_there_is_a_compiler():
    # otherwise conftest leaves the cpu backend out and its tests would vanish silently
    if shutil.which(os.environ.get("CXX") or "c++") or shutil.which("g++"):
        assert fastverify.cpu.available(), "csrc/cpu did not build: see the RuntimeWarning"


@needs_library
def test_library_is_built_for_the_requested_isa():
    assert f"cpu-{fastverify.cpu.isa()}-" in fastverify.cpu.library()._name
    feats = fastverify.cpu.features()
    if fastverify.cpu.isa() == "portable":
        assert feats == (), feats
    elif fastverify.cpu.isa() == "native" and "avx512f" in open("/proc/cpuinfo").read():
        assert "avx512f" in feats, feats


@needs_library
@pytest.mark.parametrize("family,name", [(f, n) for f, names in OPS.items() for n in names])
def test_cpu_is_the_default_on_cpu_tensors(family, name):
    fn = _common.implementation(torch.device("cpu"), family, name, torch_fn=None)
    assert fn is not None and fn.__module__.startswith("fastverify.cpu."), fn


def _threads(n, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with fastverify.use_backend("cpu"):
            return fn()
    finally:
        torch.set_num_threads(before)


def _same_for_thread_counts(fn):
    one, two = _threads(1, fn), _threads(2, fn)
    one = one if isinstance(one, tuple) else (one,)
    two = two if isinstance(two, tuple) else (two,)
    for a, b in zip(one, two):
        assert a.dtype == b.dtype and torch.equal(a, b)


DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@needs_library
@pytest.mark.parametrize("dtype", DTYPES)
def test_rejection_same_bits_for_any_thread_count(dtype):
    chain = chain_problem(B=9, V=3001, max_k=5, dtype=dtype, q=True, filters=True, seed=3)
    _same_for_thread_counts(lambda: run_chain(chain, "cpu"))
    tree = tree_problem(B=5, V=2003, max_nodes=14, dtype=dtype, q=True, filters=True, seed=4)
    _same_for_thread_counts(lambda: run_tree(tree, "cpu"))
    paths = multi_path_problem(B=4, V=523, n=3, depth=3, wor=True, filters=True, seed=5)
    _same_for_thread_counts(lambda: run_tree(paths, "cpu"))


@needs_library
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_same_bits_for_any_thread_count(dtype):
    p = paged_problem([9, 33, 1], [700, 90, 2000], Hq=8, Hkv=2, D=64, dtype=dtype, seed=6)
    _same_for_thread_counts(lambda: fastverify.tree_attention(*p.args()))
    # full chunks of 64 keys: request 0 has 11, request 1 has 1, request 2 has 31
    ids = torch.tensor([[[0, 3, 5], [1, 2, -1]], [[0, -1, -1], [-1, 0, -1]], [[30, 3, 17], [1, 29, -1]]],
                       dtype=torch.int32)
    q = p.q[:3].contiguous()
    _same_for_thread_counts(lambda: fastverify.sparse_kv_attention(q, p.k_cache, p.v_cache, p.block_table,
                                                                   p.seq_lens, ids, chunk_size=64))
    _same_for_thread_counts(lambda: fastverify.select_kv_chunks(q, p.k_cache, p.block_table, p.seq_lens,
                                                                chunk_size=32, num_chunks=6))
    parents = torch.tensor(sum(p.parents, []), dtype=torch.int64)
    _same_for_thread_counts(lambda: fastverify.build_tree(parents, p.cu, torch.tensor(p.prefixes,
                                                                                       dtype=torch.int32)))


@needs_library
@pytest.mark.parametrize("dtype", DTYPES)
def test_lm_head_same_bits_for_any_thread_count(dtype):
    g = torch.Generator().manual_seed(7)
    h = torch.randn(5, 256, generator=g).to(dtype)
    w = (torch.randn(3000, 256, generator=g) / 16).to(dtype)
    token_map = torch.randperm(40000, generator=g)[:3000]
    _same_for_thread_counts(lambda: fastverify.lm_head_topk(h, w, 7, token_map=token_map))
    t = torch.tensor([0.0, 0.7, 1.0, 1.3, 0.5])
    seed, pos = torch.arange(5) * 31 + 1, torch.arange(5) + 100
    _same_for_thread_counts(lambda: fastverify.lm_head_sample(h, w, temperature=t, seed=seed, positions=pos,
                                                              token_map=token_map))


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, **env})


def test_without_the_cpp_kernels_cpu_tensors_run_the_torch_backend():
    code = """
import torch, fastverify
from fastverify.ops import _common
fn = _common.implementation(torch.device("cpu"), "rejection", "rejection_sample", torch_fn="torch")
assert fn == "torch", fn
fastverify.set_backend("cpu")
try:
    _common.implementation(torch.device("cpu"), "rejection", "rejection_sample", torch_fn="torch")
except RuntimeError as e:
    print("refused:", e)
"""
    r = _python(code, FASTVERIFY_CPU_KERNELS="0")
    assert r.returncode == 0, r.stderr
    assert "refused: the cpu backend was chosen but its C++ kernels could not be built" in r.stdout


@needs_library
def test_portable_build_passes_the_family_tests():
    """The plain C++ paths (-march=x86-64: no AVX2, no AVX-512) against the same oracles."""
    selection = ("tests/test_rejection.py::test_matches_oracle tests/test_rejection.py::"
                 "test_half_precision_logits_and_draft_probs_match_oracle tests/test_tree_attention.py "
                 "tests/test_lm_head.py tests/test_sparse_kv.py tests/test_cpu_backend.py").split()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *selection,
                        "-k", "cpu and not portable"], capture_output=True, text=True, cwd=ROOT, timeout=1200,
                       env={**os.environ, "FASTVERIFY_CPU_ISA": "portable", "FASTVERIFY_EMULATE_CUDA": "0"})
    tail = r.stdout[-3000:] + r.stderr[-2000:]
    assert r.returncode == 0, tail
    assert " passed" in r.stdout and " failed" not in r.stdout, tail
