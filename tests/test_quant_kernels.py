"""The CPU projections on GGUF quantized blocks (csrc/cpu/quant.h, fastverify.cpu.quant).

Oracle: the weights dequantized in float64 from the block specifications below (written here
independently of fastverify.models.gguf and of the C++), multiplied in float64.

Error bound of an output (derived in :func:`error_bound`): the kernel quantizes each
32-value block of the input to int8 with scale d_x = max|x_block| / 127, so x_i = d_x·q_i + e_i
with |e_i| <= d_x/2; the integer dot products are exact, so before fp32 rounding the result is
Σ w_i·x_i − Σ w_i·e_i, off by at most Σ_blocks (d_x/2)·Σ_i |w_i|. fp32 rounding adds at most
γ_n·Σ_i a_i·(|x_i| + d_x) (standard summation bound, γ_n = n·u/(1 − n·u), u = 2^-24), where a_i
is the magnitude of the terms the kernel adds (|w_i|; |d·q_i| + |min| for formats with a min,
whose two parts are separate terms) and n counts the roundings on a term's way: the
product of the scales, the FMA chain over the chunks (two per chunk with a min), the four
levels of the lane tree, the bias and the residual adds.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastverify.cpu
from fastverify.bench.quant import random_blocks
from fastverify.models import gguf

needs_library = pytest.mark.skipif(not fastverify.cpu.available(), reason="no C++ compiler for csrc/cpu")

if fastverify.cpu.available():
    from fastverify.cpu import quant, step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TYPES = {2: "Q4_0", 3: "Q4_1", 8: "Q8_0", 12: "Q4_K", 14: "Q6_K"}
BLOCK = {2: (32, 18), 3: (32, 20), 8: (32, 34), 12: (256, 144), 14: (256, 210)}
U = 2.0 ** -24


# --------------------------------------------------------------------------- data and oracle

def _f16(b, at):
    return b[:, at:at + 2].copy().view(np.float16).astype(np.float64)[:, 0]


def oracle_weights(blocks: torch.Tensor, ggml_type: int, K: int):
    """(w, a): float64 [N, K] values from the spec, and a [N, K] the magnitudes of the terms the
    kernel sums (|w|, or |d·q| + |min| for Q4_1 / Q4_K)."""
    bs, bb = BLOCK[ggml_type]
    N = blocks.shape[0]
    b = blocks.numpy().reshape(-1, bb)
    n = b.shape[0]
    if ggml_type in (2, 3):
        d = _f16(b, 0)[:, None]
        qs = b[:, 2:18] if ggml_type == 2 else b[:, 4:20]
        q = np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.float64)      # value i<16: low nibble of qs[i]
        if ggml_type == 2:
            w = d * (q - 8)
            a = np.abs(w)
        else:
            m = _f16(b, 2)[:, None]
            w = d * q + m
            a = np.abs(d * q) + np.abs(m)
    elif ggml_type == 8:
        w = _f16(b, 0)[:, None] * b[:, 2:34].view(np.int8).astype(np.float64)
        a = np.abs(w)
    elif ggml_type == 12:
        d, dmin = _f16(b, 0), _f16(b, 2)
        s = b[:, 4:16].astype(np.int64)
        sc = np.zeros((n, 8))
        mn = np.zeros((n, 8))
        for j in range(8):
            if j < 4:
                sc[:, j], mn[:, j] = s[:, j] & 63, s[:, j + 4] & 63
            else:
                sc[:, j] = (s[:, j + 4] & 0xF) | ((s[:, j - 4] >> 6) << 4)
                mn[:, j] = (s[:, j + 4] >> 4) | ((s[:, j] >> 6) << 4)
        w = np.zeros((n, 256))
        a = np.zeros((n, 256))
        for j in range(8):
            chunk = b[:, 16 + 32 * (j // 2):16 + 32 * (j // 2) + 32]
            q = (chunk & 15) if j % 2 == 0 else (chunk >> 4)
            scaled = (d * sc[:, j])[:, None] * q
            mins = (dmin * mn[:, j])[:, None]
            w[:, 32 * j:32 * j + 32] = scaled - mins
            a[:, 32 * j:32 * j + 32] = np.abs(scaled) + np.abs(mins)
    else:
        ql, qh = b[:, :128].astype(np.int64), b[:, 128:192].astype(np.int64)
        scales = b[:, 192:208].view(np.int8).astype(np.float64)
        d = _f16(b, 208)
        q = np.zeros((n, 256), dtype=np.int64)
        for h in range(2):
            for l in range(32):
                L, H = ql[:, 64 * h:64 * h + 64], qh[:, 32 * h:32 * h + 32]
                q[:, 128 * h + l] = (L[:, l] & 15) | ((H[:, l] >> 0) & 3) << 4
                q[:, 128 * h + l + 32] = (L[:, l + 32] & 15) | ((H[:, l] >> 2) & 3) << 4
                q[:, 128 * h + l + 64] = (L[:, l] >> 4) | ((H[:, l] >> 4) & 3) << 4
                q[:, 128 * h + l + 96] = (L[:, l + 32] >> 4) | ((H[:, l] >> 6) & 3) << 4
        w = d[:, None] * np.repeat(scales, 16, axis=1) * (q - 32)
        a = np.abs(w)
    return w.reshape(N, K), a.reshape(N, K)


def error_bound(p: np.ndarray, a: np.ndarray, K: int, extra: np.ndarray | None = None) -> np.ndarray:
    """[M, N] bound of |y − p·wᵀ| for inputs p [M, K] (float64, what the kernel quantizes) and
    term magnitudes a [N, K] (see the module docstring). ``extra`` [M, N]: magnitudes added
    after the reduction (bias, residual), one rounding each. d_x is taken 1e-6 larger than
    max|x|/127 (its fp32 rounding), the rounding error 1e-4 larger than d_x/2 (q = round(x·(1/d_x))
    with two fp32 roundings of |x / d_x| <= 127)."""
    M = p.shape[0]
    dx = np.abs(p.reshape(M, -1, 32)).max(axis=2) / 127 * (1 + 1e-6)                   # [M, K/32]
    dx_k = np.repeat(dx, 32, axis=1)                                                     # [M, K]
    quant = (dx_k * 0.5 * (1 + 1e-4)) @ a.T
    n = 2 * (K + 63) // 64 + 8
    gamma = n * U / (1 - n * U)
    bound = quant + gamma * ((np.abs(p) + dx_k) @ a.T)
    if extra is not None:
        bound = bound + 4 * U * (extra + np.abs(p) @ np.abs(a).T)
    return bound * (1 + 1e-9) + (n + 4) * 2.0 ** -149      # + subnormal results' absolute rounding


def check_against_oracle(y: torch.Tensor, p: np.ndarray, blocks, ggml_type, K, bias=None, residual=None):
    w, a = oracle_weights(blocks, ggml_type, K)
    ref = p @ w.T
    extra = None
    if bias is not None:
        ref = ref + bias.double().numpy()[None]
    if residual is not None:
        ref = ref + residual.double().numpy()
    if bias is not None or residual is not None:
        extra = np.abs(ref) + (0 if bias is None else np.abs(bias.double().numpy())[None]) + \
            (0 if residual is None else np.abs(residual.double().numpy()))
    err = np.abs(y.double().numpy() - ref)
    bound = error_bound(p, a, K, extra)
    worst = np.unravel_index(np.argmax(err / bound), err.shape)
    assert np.isfinite(y.numpy()).all()
    assert (err <= bound).all(), (TYPES[ggml_type], K, worst, err[worst], bound[worst])
    return float((err / bound).max())


def check_all_types(seed: int = 0) -> None:
    """Every type at small odd shapes against the oracle, rows alone == rows together, and
    dequantize_rows bit-exact (also run by the other ISA builds in a subprocess)."""
    for t in TYPES:
        bs = BLOCK[t][0]
        for nblocks in (1, 3):
            K = nblocks * bs
            blocks = random_blocks(t, 7, K, seed=seed + t)
            x = torch.randn(19, K, generator=torch.Generator().manual_seed(seed))
            y = quant.linear(x, blocks, t, K)
            check_against_oracle(y, x.double().numpy(), blocks, t, K)
            for m in (0, 17, 18):
                assert torch.equal(quant.linear(x[m:m + 1], blocks, t, K), y[m:m + 1]), (t, K, m)
            ref = gguf.dequantize(blocks.numpy(), t, (7, K))
            got = quant.dequantize_rows(blocks, t, K, [6, 0, 3, 3])
            assert torch.equal(got.view(torch.int32), ref[[6, 0, 3, 3]].contiguous().view(torch.int32)), (t, K)


# --------------------------------------------------------------------------- tests

@needs_library
@pytest.mark.parametrize("ggml_type", TYPES)
def test_odd_sizes_match_oracle_and_rows_are_independent(ggml_type):
    """K = 1, 2, 3 blocks (and 10, 21 blocks of 32: the kernels' groups of 16 blocks, partial),
    N = 1, 7, 33, M = 1..16 and 37: within the bound, and each M-row call the first M rows of
    the 37-row one, bit for bit (tiles of 16 rows, remainders)."""
    bs = BLOCK[ggml_type][0]
    gen = torch.Generator().manual_seed(ggml_type)
    for nblocks in (1, 2, 3) + ((10, 21) if bs == 32 else ()):
        K = nblocks * bs
        for N in (1, 7, 33):
            blocks = random_blocks(ggml_type, N, K, seed=100 * nblocks + N)
            x = torch.randn(37, K, generator=gen) * 3
            y = quant.linear(x, blocks, ggml_type, K)
            assert y.shape == (37, N)
            check_against_oracle(y, x.double().numpy(), blocks, ggml_type, K)
            for M in range(1, 17):
                assert torch.equal(quant.linear(x[:M], blocks, ggml_type, K), y[:M]), (K, N, M)


@needs_library
@pytest.mark.parametrize("ggml_type", TYPES)
def test_model_shape_rows_alone_equal_rows_together(ggml_type):
    """At a SmolLM2 shape (K = 576, or 768 for the K-quants): every row of a 40-row call equals
    that row alone, and a middle slice of rows, bitwise; inputs with zeros and outliers."""
    K = 576 if BLOCK[ggml_type][0] == 32 else 768
    N = 67
    blocks = random_blocks(ggml_type, N, K, seed=7)
    x = torch.randn(40, K, generator=torch.Generator().manual_seed(1))
    x[3, :64] = 0                                   # an all-zero block (d_x = 0)
    x[5, 10] = 1e4                                  # an outlier
    y = quant.linear(x, blocks, ggml_type, K)
    check_against_oracle(y, x.double().numpy(), blocks, ggml_type, K)
    for m in range(40):
        assert torch.equal(quant.linear(x[m], blocks, ggml_type, K), y[m]), m
    assert torch.equal(quant.linear(x[7:30], blocks, ggml_type, K), y[7:30])


@needs_library
def test_strided_rows_and_batch_shapes():
    """x and residual with a row stride other than their width, and a [B, T, K] batch: the same bits
    as contiguous [M, K] inputs."""
    K, N = 96, 21
    blocks = random_blocks(3, N, K, seed=8)
    gen = torch.Generator().manual_seed(8)
    wide, res_wide = torch.randn(6, K + 7, generator=gen), torch.randn(6, N + 3, generator=gen)
    x, res = wide[:, :K], res_wide[:, :N]
    y = quant.linear(x, blocks, 3, K, residual=res)
    assert torch.equal(y, quant.linear(x.contiguous(), blocks, 3, K, residual=res.contiguous()))
    y3 = quant.linear(x.contiguous().view(2, 3, K), blocks, 3, K, residual=res.contiguous().view(2, 3, N))
    assert y3.shape == (2, 3, N) and torch.equal(y3.reshape(6, N), y)


@needs_library
@pytest.mark.parametrize("ggml_type", TYPES)
def test_non_finite_inputs_propagate(ggml_type):
    """A NaN in a row makes that row's outputs NaN, an inf non-finite (as the fp32 product would),
    and leaves the other rows alone."""
    K = 256 if BLOCK[ggml_type][0] == 256 else 96
    blocks = random_blocks(ggml_type, 9, K, seed=4)
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(3))
    clean = quant.linear(x, blocks, ggml_type, K)
    x[0, 5], x[2, K - 1] = float("nan"), float("inf")
    y = quant.linear(x, blocks, ggml_type, K)
    assert torch.isnan(y[0]).all() and not torch.isfinite(y[2]).any()
    assert torch.equal(y[1], clean[1])
    tiny = x[1:2] * 1e-40                           # subnormal blocks (1 / d_x would overflow)
    y_tiny = quant.linear(tiny, blocks, ggml_type, K)
    check_against_oracle(y_tiny, tiny.double().numpy(), blocks, ggml_type, K)


@needs_library
@pytest.mark.parametrize("ggml_type", TYPES)
def test_thread_counts_give_the_same_bits(ggml_type):
    K = 512 if BLOCK[ggml_type][0] == 256 else 576
    blocks = random_blocks(ggml_type, 101, K, seed=3)
    x = torch.randn(21, K, generator=torch.Generator().manual_seed(2))
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append((quant.linear(x, blocks, ggml_type, K), quant.linear(x[:1], blocks, ggml_type, K)))
    finally:
        torch.set_num_threads(before)
    for many, one in outs[1:]:
        assert torch.equal(many, outs[0][0]) and torch.equal(one, outs[0][1])


@needs_library
@pytest.mark.parametrize("ggml_type", TYPES)
@pytest.mark.parametrize("prologue", ["none", "norm", "swiglu"])
def test_prologue_and_epilogue_match_fp32_linear(ggml_type, prologue):
    """RMSNorm / SwiGLU prologue, bias and residual against fastverify.cpu.step.linear on the
    dequantized weight (fp32), within the activation-quantisation bound plus both sides'
    fp32 rounding (the prologue's output p is recomputed here in float64)."""
    K = 256 if BLOCK[ggml_type][0] == 256 else 96
    N, M = 45, 6
    gen = torch.Generator().manual_seed(ggml_type)
    blocks = random_blocks(ggml_type, N, K, seed=11)
    w32 = gguf.dequantize(blocks.numpy(), ggml_type, (N, K))
    x = torch.randn(M, 2 * K if prologue == "swiglu" else K, generator=gen) * 2
    bias = torch.randn(N, generator=gen)
    residual = torch.randn(M, N, generator=gen) * 5
    norm = torch.rand(K, generator=gen) + 0.5 if prologue == "norm" else None
    kwargs = dict(norm=norm, eps=1e-5, swiglu=prologue == "swiglu", residual=residual)
    y = quant.linear(x, blocks, ggml_type, K, bias, **kwargs)
    y32 = step.linear(x, w32, bias, **kwargs)
    xd = x.double()
    if prologue == "norm":
        p = norm.double() * xd / torch.sqrt((xd * xd).mean(-1, keepdim=True) + 1e-5)
    elif prologue == "swiglu":
        p = torch.nn.functional.silu(xd[:, :K]) * xd[:, K:]
    else:
        p = xd
    p = p.numpy()
    w, a = oracle_weights(blocks, ggml_type, K)
    ref = np.abs(p @ w.T) + np.abs(bias.double().numpy())[None] + np.abs(residual.double().numpy())
    # the fp32 linear's own error (γ_{K+2} over |p|·|w|) and the prologue's (p computed in fp32
    # by both kernels: a few ulps relative, 1e-6 allowed) on top of the quantised kernel's bound
    fp32_side = (K + 4) * U * (np.abs(p) @ np.abs(w).T + ref) + 1e-6 * (np.abs(p) @ a.T)
    bound = error_bound(p, a, K, ref) + fp32_side
    err = np.abs(y.double().numpy() - y32.double().numpy())
    assert (err <= bound).all(), float((err / bound).max())


@needs_library
@pytest.mark.parametrize("ggml_type", TYPES)
def test_dequantize_rows_bit_exact(ggml_type):
    K = 512 if BLOCK[ggml_type][0] == 256 else 576
    N = 50
    blocks = random_blocks(ggml_type, N, K, seed=5)
    ref = gguf.dequantize(blocks.numpy(), ggml_type, (N, K))
    rows = [49, 0, 17, 17, 3]
    got = quant.dequantize_rows(blocks, ggml_type, K, rows)
    assert got.shape == (5, K) and got.dtype == torch.float32
    assert torch.equal(got.view(torch.int32), ref[rows].contiguous().view(torch.int32))
    assert torch.equal(quant.dequantize_rows(blocks, ggml_type, K, torch.arange(N)).view(torch.int32),
                       ref.view(torch.int32))
    w, _ = oracle_weights(blocks, ggml_type, K)  # the independent spec agrees (float32 rounding)
    np.testing.assert_allclose(ref.double().numpy(), w, rtol=2 ** -23, atol=0)
    assert quant.dequantize_rows(blocks, ggml_type, K, []).shape == (0, K)


@needs_library
def test_bad_input_names_the_argument():
    blocks = random_blocks(3, 4, 64)
    x = torch.randn(2, 64)
    cases = [
        (lambda: quant.linear(x, blocks, 5, 64), "ggml_type"),
        (lambda: quant.linear(x, blocks, 3, 48), "K"),
        (lambda: quant.linear(x, blocks, 3, 0), "K"),
        (lambda: quant.linear(x, blocks.view(torch.int8), 3, 64), "weight_blocks"),
        (lambda: quant.linear(x, blocks[:, :20], 3, 64), "weight_blocks"),
        (lambda: quant.linear(x, blocks.reshape(-1), 3, 64), "weight_blocks"),
        (lambda: quant.linear(x, blocks.t(), 3, 64), "weight_blocks"),
        (lambda: quant.linear(x.double(), blocks, 3, 64), "x"),
        (lambda: quant.linear(torch.randn(2, 65), blocks, 3, 64), "x"),
        (lambda: quant.linear(torch.randn(0, 64), blocks, 3, 64), "x"),
        (lambda: quant.linear(x, blocks, 3, 64, swiglu=True), "x"),
        (lambda: quant.linear(x, blocks, 3, 64, torch.randn(5)), "bias"),
        (lambda: quant.linear(x, blocks, 3, 64, norm=torch.randn(63)), "norm"),
        (lambda: quant.linear(x, blocks, 3, 64, residual=torch.randn(2, 3)), "residual"),
        (lambda: quant.linear(x, blocks, 3, 64, residual=torch.randn(2, 4).double()), "residual"),
        (lambda: quant.dequantize_rows(blocks, 3, 64, [4]), "rows"),
        (lambda: quant.dequantize_rows(blocks, 3, 64, [-1]), "rows"),
        (lambda: quant.dequantize_rows(blocks, 3, 64, [0.5]), "rows"),
        (lambda: quant.dequantize_rows(blocks, 3, 64, torch.tensor([1.0])), "rows"),
        (lambda: quant.dequantize_rows(blocks, 99, 64, [0]), "ggml_type"),
    ]
    for fn, name in cases:
        with pytest.raises(ValueError, match=name):
            fn()


def _build_one(isa: str, folder) -> str:
    """qlinear.cpp alone (it holds every quant kernel) built for ``isa``: seconds, where the
    whole library takes most of a minute."""
    return _start_build(isa, folder)()


def _start_build(isa: str, folder):
    """Starts the build of :func:`_build_one`; returns the call that waits for it (-> path)."""
    cxx = os.environ.get("CXX") or "c++"
    out = os.path.join(folder, f"quant-{isa}.so")
    job = subprocess.Popen([cxx, *fastverify.cpu.FLAGS, *fastverify.cpu.ISA_FLAGS[isa], "-shared", "-o", out,
                            os.path.join(fastverify.cpu.source_dir(), "qlinear.cpp")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait():
        _, err = job.communicate(timeout=600)
        assert job.returncode == 0, err[-3000:]
        return out
    return wait


@pytest.fixture(scope="module")
def isa_builds(tmp_path_factory):
    """The portable and AVX2 builds, compiled side by side."""
    folder = str(tmp_path_factory.mktemp("quant-isa"))
    waits = {isa: _start_build(isa, folder) for isa in ("portable", "avx2")}
    return {isa: wait() for isa, wait in waits.items()}


def isa_outputs() -> dict:
    """Outputs at a few shapes (full groups of 16 blocks, a short last group, partial groups), to
    compare builds."""
    out = {}
    for t in TYPES:
        for K in ((512, 576, 672, 1536) if BLOCK[t][0] == 32 else (512, 768)):
            x = torch.randn(5, K, generator=torch.Generator().manual_seed(K))
            out[f"{t}-{K}"] = quant.linear(x, random_blocks(t, 19, K, seed=t), t, K)
    return out


@needs_library
@pytest.mark.parametrize("isa", ["portable", "avx2"])
def test_other_isa_builds(isa, isa_builds, tmp_path):
    """The plain C++ path (-march=x86-64) and the AVX2 path (-march=haswell) pass the oracle,
    row-independence and dequantization checks (in a subprocess that loads that build); the AVX2
    build gives the native build's bits (the same integer sums and float operations)."""
    lib = isa_builds[isa]
    saved = str(tmp_path / "outputs.pt")
    script = (f"import ctypes, sys, torch; sys.path.insert(0, {os.path.join(ROOT, 'tests')!r}); "
              f"import fastverify.cpu as c; c._lib = ctypes.CDLL({lib!r}); c._tried = True; "
              f"import test_quant_kernels as t; t.check_all_types(); torch.save(t.isa_outputs(), {saved!r}); "
              "print('ok')")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]
    if isa == "avx2" and "avx2" in fastverify.cpu.features() and "fma" in fastverify.cpu.features():
        theirs, ours = torch.load(saved), isa_outputs()
        for key in ours:
            assert torch.equal(theirs[key], ours[key]), key


@needs_library
def test_native_build_check_all_types():
    check_all_types(seed=1)
