"""Counter-based RNG: Philox4x32-10 known-answer vectors (Random123), and the same
bits from torch (tensors and ints), Triton and the independent oracle."""

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from scipy.stats import chisquare

import naive
from conftest import BACKEND_DEVICES

from fastverify.ops import philox
from fastverify.triton.philox import philox4x32 as tl_philox
from fastverify.triton.philox import uniform_pair

# Random123 kat_vectors: (counter, key) -> output
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def as_seed(key):
    v = key[0] | (key[1] << 32)
    return v - 2**64 if v >= 2**63 else v


@pytest.mark.parametrize("counter,key,want", KAT)
def test_known_answers(counter, key, want):
    assert naive.philox(as_seed(key) & (2**64 - 1), counter) == want
    assert philox.philox4x32(as_seed(key), *counter) == want
    got = philox.philox4x32(torch.tensor([as_seed(key)]), *(torch.tensor([c]) for c in counter))
    assert tuple(int(x) for x in got) == want


@triton.jit
def _philox_kernel(seed_ptr, c0_ptr, c1_ptr, c2_ptr, out_ptr, u_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    m = i < n
    seed = tl.load(seed_ptr + i, mask=m, other=0)
    c0 = tl.load(c0_ptr + i, mask=m, other=0).to(tl.uint32)
    c1 = tl.load(c1_ptr + i, mask=m, other=0).to(tl.uint32)
    c2 = tl.load(c2_ptr + i, mask=m, other=0).to(tl.uint32)
    o0, o1, o2, o3 = tl_philox(seed, c0, c1, c2, tl.zeros([BLOCK], tl.uint32))
    for k, o in enumerate((o0, o1, o2, o3)):
        tl.store(out_ptr + k * n + i, o.to(tl.int64), mask=m)
    position = c0.to(tl.int64) + (c1.to(tl.int64) << 32)
    ua, us = uniform_pair(seed, position, c2)
    tl.store(u_ptr + i, ua, mask=m)
    tl.store(u_ptr + n + i, us, mask=m)


def test_torch_triton_and_oracle_agree_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    n = 64
    seed = torch.randint(-2**63, 2**63 - 1, (n,), generator=g)
    c = [torch.randint(0, 2**32, (n,), generator=g) for _ in range(3)]
    want = philox.philox4x32(seed, c[0], c[1], c[2], 0)
    dev = BACKEND_DEVICES["triton"]
    out = torch.empty(4, n, dtype=torch.int64, device=dev)
    u = torch.empty(2, n, dtype=torch.float32, device=dev)
    _philox_kernel[(1,)](seed.to(dev), *(x.to(torch.int32).to(dev) for x in c), out, u, n, BLOCK=64)
    assert torch.equal(out.cpu() & 0xFFFFFFFF, torch.stack(want))
    position = c[0] + (c[1] << 32)
    assert torch.equal(u[0].cpu(), philox.uniform(seed, position, philox.ACCEPT_LANE, c[2]))
    assert torch.equal(u[1].cpu(), philox.uniform(seed, position, philox.SAMPLE_LANE, c[2]))
    for i in range(0, n, 7):
        s, p, a = int(seed[i]), int(position[i]), int(c[2][i])
        assert naive.uniforms(s, p, a) == (float(u[0, i]), float(u[1, i]))
        assert (philox.uniform(s, p, 0, a), philox.uniform(s, p, 1, a)) == naive.uniforms(s, p, a)


def test_uniforms_are_uniform_and_in_range():
    positions = torch.arange(200_000)
    u = philox.uniform(torch.tensor(1234), positions, philox.SAMPLE_LANE)
    assert u.dtype == torch.float32 and 0.0 <= float(u.min()) and float(u.max()) < 1.0
    counts = np.bincount((u.numpy() * 50).astype(int), minlength=50)
    assert chisquare(counts).pvalue > 1e-3
    # consecutive positions and the two lanes are uncorrelated
    v = philox.uniform(torch.tensor(1234), positions, philox.ACCEPT_LANE)
    assert abs(np.corrcoef(u.numpy()[:-1], u.numpy()[1:])[0, 1]) < 0.01
    assert abs(np.corrcoef(u.numpy(), v.numpy())[0, 1]) < 0.01
