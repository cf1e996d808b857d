"""The CPU emulator of the CUDA kernels (tests/cuda_emu) catches what it claims to: its
deliberately broken kernels (tests/cuda_emu/self_test.cpp) misbehave here as they would on a
GPU — a missing barrier reads stale data, a wrong wmma layout assumption gives wrong
numbers, a divergent barrier and a misaligned wmma pointer raise — and it runs only on CPU
tensors. The family modules then trust it to run csrc/cuda on CPU."""

import pytest
import torch

from conftest import EMULATE_CUDA

pytestmark = pytest.mark.skipif(not EMULATE_CUDA, reason="the CUDA emulator is off (a GPU, or FASTVERIFY_EMULATE_CUDA=0)")


@pytest.fixture(scope="module")
def kern():
    import cuda_emu

    try:
        cuda_emu.load()
    except cuda_emu.Unavailable as e:
        pytest.skip(f"the CUDA emulator cannot be built here: {e}")
    return cuda_emu.kernels()


def test_emulator_catches_missing_barriers_and_misaligned_wmma(kern):
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
