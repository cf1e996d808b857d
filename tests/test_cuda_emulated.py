"""The CUDA backend's comparisons (tests/test_cuda.py) with its kernels executed on the
CPU by the emulator of tests/cuda_emu, so CPU CI runs the CUDA code, not only compiles it.

Status of the CUDA kernels this establishes: compiled with nvcc for sm_90
(tests/test_build.py) and executed on CPU through an emulator (tests/cuda_emu); never
run on a GPU.

The emulator compiles the unmodified csrc/cuda sources as host C++ and runs their host
launchers on CPU tensors; each block's threads are fibers with real barrier semantics
(a missing __syncthreads/__syncwarp reads stale data here too), wmma tiles are computed
exactly in fp32 with a scrambled fragment layout. It cannot show GPU timing, memory
coalescing, bank conflicts, register limits, races between blocks, or how the real
tensor cores round: tests/test_cuda.py on a GPU still decides those.

Every comparison of tests/test_cuda.py that needs no CUDA runtime (streams, graphs,
torch.compile) runs here, on a representative subset of its grid so CPU CI stays within
a few minutes: every kernel, dtype, head dim, page size, GQA ratio and tree shape
appears, and the Triton interpreter joins a few of them (the sparse-KV kernels are
cheap to emulate: their whole grid runs). Set
FASTVERIFY_EMULATE_FULL=1 to run test_cuda.py's whole grid (over an hour: the
128256-token vocabularies dominate).
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

import cuda_emu
import test_cuda as tc

DEV = "cpu"
FULL = os.environ.get("FASTVERIFY_EMULATE_FULL", "0") not in ("", "0")
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


@pytest.fixture(scope="module")
def kern():
    """fastverify._cuda's entry points over the emulated kernels (built on first use)."""
    try:
        cuda_emu.load()
    except cuda_emu.Unavailable as e:
        pytest.skip(f"the CUDA emulator cannot be built here: {e}")
    return cuda_emu.kernels()


def grid(full, subset):
    return full if FULL else subset


# ----------------------------------------------------------------------------- rejection

SAMPLING_FLAGS = list(itertools.product(tc.DTYPES, (False, True), (False, True)))  # dtype, q, filt

CHAIN = grid(
    [(V, chunk, tri, *flags) for (V, chunk, tri), flags in itertools.product(tc.CHAIN_CASES, SAMPLING_FLAGS)],
    [  # (V, chunk, with_triton, dtype, q, filt)
        (111, None, True, F32, False, False),
        (111, 16, False, BF16, True, True),
        (111, None, False, F16, True, False),
        (111, 16, False, F32, False, True),
        (4099, 512, False, BF16, False, True),  # a partial last chunk, several chunks per row
    ])

TREE = grid(
    [(V, chunk, tri, *flags) for (V, chunk, tri), flags in itertools.product(tc.TREE_CASES, SAMPLING_FLAGS)],
    [
        (37, None, True, F32, False, False),
        (37, 16, False, F16, True, True),
        (37, None, False, BF16, True, False),
        (37, 16, False, F32, False, True),
    ])


@pytest.mark.parametrize("V,chunk,with_triton,dtype,q,filt", CHAIN, ids=str)
def test_chain_matches_torch_and_triton(kern, V, chunk, with_triton, dtype, q, filt):
    tc.check_chain(kern, DEV, V, chunk, with_triton, dtype, q, filt)


@pytest.mark.parametrize("V,chunk,with_triton,dtype,q,filt", TREE, ids=str)
def test_tree_matches_torch_and_triton(kern, V, chunk, with_triton, dtype, q, filt):
    tc.check_tree(kern, DEV, V, chunk, with_triton, dtype, q, filt)


@pytest.mark.parametrize("dtype,filt", grid(list(itertools.product(tc.DTYPES, (False, True))),
                                            [(F32, False), (BF16, True), (F16, True)]), ids=str)
def test_nan_and_inf_logits(kern, dtype, filt):
    tc.check_nan_and_inf_logits(kern, DEV, dtype, filt)


def test_chain_strided_logits_and_mixed_dtypes(kern):
    tc.check_chain_strided_logits_and_mixed_dtypes(kern, DEV)


# ----------------------------------------------------------------------------- tree attention

# Every case of the grid in one dtype, the dtypes taking turns; Triton on a few.
_ROTATION = [F32, BF16, F16]
ATTENTION = grid(
    [(case, dtype, True) for case, dtype in itertools.product(tc.ATTENTION_CASES, tc.DTYPES)],
    [(case, _ROTATION[i % 3], case in ("random_trees", "gqa_8", "head_dim_80"))
     for i, case in enumerate(tc.ATTENTION_CASES)]
    + [("full_64_node_tree_gqa_4", BF16, False), ("long_prefixes_many_splits", BF16, False),
       ("head_dim_128", F16, False)])


@pytest.mark.parametrize("case,dtype,with_triton", ATTENTION, ids=str)
def test_tree_attention_matches_oracle_torch_and_triton(kern, case, dtype, with_triton):
    tc.check_tree_attention(kern, DEV, case, dtype, with_triton=with_triton)


@pytest.mark.parametrize("dtype", tc.DTYPES, ids=str)
def test_tree_attention_scale_and_splits(kern, dtype):
    tc.check_tree_attention_scale_and_splits(kern, DEV, dtype)


@pytest.mark.parametrize("dtype", tc.DTYPES, ids=str)
def test_tree_attention_strided_layouts(kern, dtype):
    tc.check_tree_attention_strided_layouts(kern, DEV, dtype)


def test_tree_attention_garbage_is_memory_safe(kern):
    tc.check_tree_attention_garbage_is_memory_safe(kern, DEV)


def test_build_tree_matches_oracle_and_torch(kern):
    tc.check_build_tree(kern, DEV)


def test_build_tree_garbage_is_memory_safe(kern):
    tc.check_build_tree_garbage_is_memory_safe(kern, DEV)


@pytest.mark.parametrize("layout", list(tc.COMPACT_LAYOUTS))
def test_compact_kv_matches_torch(kern, layout):
    tc.check_compact_kv(kern, DEV, layout)


def test_compact_kv_garbage_is_memory_safe(kern):
    tc.check_compact_kv_garbage_is_memory_safe(kern, DEV)


# ----------------------------------------------------------------------------- frequency-ranked LM head

# Every path (M <= 2: GEMV; 3..16: 16-row tensor-core tiles, fp32: 8-row GEMV; more: 64-row
# tiles), every top-k mode (k = 1, <= 8, <= 16: thread lists; > 16: bitonic), several
# tiles per split, element loads (d = 33), a 49152-row head.
LM_HEAD_TOPK = grid(
    [(M, V, d, k, dtype, None) for (M, V, d), k, dtype in itertools.product(tc.LM_HEAD_SHAPES, tc.LM_HEAD_KS,
                                                                           tc.DTYPES) if k <= V],
    [  # (M, V_sub, d, k, dtype, num_splits)
        (1, 1, 8, 1, F32, None),
        (3, 37, 80, 5, BF16, None),
        (2, 1000, 80, 64, F16, None),
        (1, 1000, 576, 8, BF16, 2),
        (5, 1000, 80, 12, F32, 3),
        (20, 300, 80, 16, BF16, None),
        (70, 1000, 48, 20, F16, 2),
        (7, 1000, 48, 64, BF16, 1),
        (300, 37, 33, 5, F32, None),
        (40, 37, 33, 37, F16, None),
        (300, 1000, 80, 64, F16, None),
        (64, 4097, 256, 8, BF16, None),
        (3, 49152, 8, 5, BF16, None),
        (1, 49152, 576, 64, BF16, None),
        (1, 49152, 8, 1, F32, None),
        (2, 300, 80, 20, F16, 1),  # 64-row GEMV tiles (few 128-row tiles), several per split
        (1, 300, 80, 8, BF16, None),
    ])

LM_HEAD_SAMPLE = grid(
    [(M, V, d, dtype) for (M, V, d), dtype in itertools.product(tc.LM_HEAD_SHAPES, tc.DTYPES)],
    [(1, 1, 8, F32), (3, 37, 80, BF16), (2, 1000, 80, F16), (12, 1000, 48, F32), (70, 700, 33, BF16),
     (300, 1000, 80, F16), (1, 49152, 80, BF16), (2, 300, 40, F32)])


@pytest.mark.parametrize("M,V,d,k,dtype,num_splits", LM_HEAD_TOPK, ids=str)
def test_lm_head_topk_matches_oracle_and_torch(kern, M, V, d, k, dtype, num_splits):
    tc.check_lm_head_topk(kern, DEV, M, V, d, k, dtype, num_splits=num_splits,
                          map_dtype=torch.int32 if k == 5 else torch.int64, with_temperature=k != 1)


@pytest.mark.parametrize("M,V,d,dtype", LM_HEAD_SAMPLE, ids=str)
def test_lm_head_sample_matches_oracle_and_torch(kern, M, V, d, dtype):
    tc.check_lm_head_sample(kern, DEV, M, V, d, dtype)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_lm_head_splits_agree(kern, dtype):
    tc.check_lm_head_splits_agree(kern, DEV, dtype)


@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
def test_lm_head_special_values(kern, dtype):
    tc.check_lm_head_special_values(kern, DEV, dtype)


def test_lm_head_strided_hidden(kern):
    tc.check_lm_head_strided_hidden(kern, DEV, BF16)


def test_lm_head_empty(kern):
    tc.check_lm_head_empty(kern, DEV)


def test_lm_head_triton_agrees(kern):
    """The Triton interpreter joins one small case of each op."""
    pytest.importorskip("triton")
    tc.check_lm_head_topk(kern, DEV, 3, 150, 16, 5, F32, with_triton=True)
    tc.check_lm_head_sample(kern, DEV, 3, 150, 16, F32, with_triton=True)


# ----------------------------------------------------------------------------- sparse-KV self-speculation

# The emulated sparse kernels are cheap, so the whole grid runs: every case in every
# dtype, the number of splits cycling through the launcher's choice (one split, a single
# launch, on the 2 emulated SMs) and forced splits (the merge kernel); Triton on a few.
_SPLITS = [None, 3, 1, 7]
SPARSE = [(case, dtype, _SPLITS[i % 4], dtype == F32 and case in ("cs8_page16_gqa4_d80", "gqa3_masked_heads"))
          for i, (case, dtype) in enumerate(itertools.product(tc.SPARSE_CASES, tc.DTYPES))]
SELECT = list(itertools.product(tc.SELECT_CASES, tc.DTYPES, (False, True)))


@pytest.mark.parametrize("case,dtype,num_splits,with_triton", SPARSE, ids=str)
def test_sparse_attention_matches_oracle_and_torch(kern, case, dtype, num_splits, with_triton):
    if with_triton:
        pytest.importorskip("triton")
    tc.check_sparse_attention(kern, DEV, case, dtype, num_splits=num_splits, with_triton=with_triton)


@pytest.mark.parametrize("dtype", tc.DTYPES, ids=str)
def test_sparse_attention_scale_and_splits(kern, dtype):
    tc.check_sparse_attention_splits(kern, DEV, dtype)


@pytest.mark.parametrize("dtype", tc.DTYPES, ids=str)
def test_sparse_attention_strided_layouts(kern, dtype):
    tc.check_sparse_attention_strided_layouts(kern, DEV, dtype)


def test_sparse_garbage_is_memory_safe(kern):
    tc.check_sparse_garbage_is_memory_safe(kern, DEV)


def test_sparse_random_shapes(kern):
    tc.check_sparse_random_shapes(kern, DEV, range(300) if FULL else range(40))


@pytest.mark.parametrize("case,dtype,with_means", SELECT, ids=str)
def test_sparse_select_kv_chunks_matches_oracle_and_torch(kern, case, dtype, with_means):
    tc.check_select(kern, DEV, case, dtype, with_means=with_means)


def test_sparse_select_kv_chunks_ties_and_nan(kern):
    tc.check_select_ties_and_nan(kern, DEV)


def test_sparse_select_kv_chunks_many_chunks(kern):
    tc.check_select_many_chunks(kern, DEV)


# ----------------------------------------------------------------------------- the emulator itself


def test_emulated_ops_are_the_extension_schemas(kern):
    """The emulated library registers the extension's own schemas (same bindings file)."""
    ops = kern.ops()
    assert "cuda_stream" in str(ops.tree_attention._schema) and "num_splits" in str(ops.tree_attention._schema)
    assert "Tensor(a!) k_cache" in str(ops.compact_kv._schema)
    assert "num_splits" in str(ops.lm_head_topk._schema) and "cuda_stream" in str(ops.lm_head_sample._schema)
    assert "chunk_means" in str(ops.select_kv_chunks._schema) and "num_splits" in str(ops.sparse_kv_attention._schema)


def test_emulator_catches_missing_barriers_and_misaligned_wmma(kern):
    """The deliberately broken kernels of tests/cuda_emu/self_test.cpp."""
    selftest = torch.ops.fastverify_cuda_emu_selftest
    t = torch.arange(64, dtype=torch.int32)
    assert torch.equal(selftest.neighbours(1000, True), 1000 + (t + 1) % 64)
    assert not torch.equal(selftest.neighbours(2000, False), 2000 + (t + 1) % 64), "read before the writes"
    assert torch.equal(selftest.wmma_store(1.0, True), torch.full((32,), 256.0))
    assert not torch.equal(selftest.wmma_store(2.0, False), torch.full((32,), 512.0)), "other lanes' shares read"
    with pytest.raises(RuntimeError, match="barrier not reached by every thread"):
        selftest.divergent_barrier()
    with pytest.raises(RuntimeError, match="not 256-bit aligned"):
        selftest.misaligned_wmma()


def test_emulator_rejects_non_cpu_tensors(kern):
    meta = torch.empty(3, dtype=torch.int64, device="meta")
    with pytest.raises((RuntimeError, NotImplementedError)):
        kern.build_tree(meta, torch.tensor([0, 3], dtype=torch.int32), torch.tensor([0]), None)
