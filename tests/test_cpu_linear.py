"""The CPU decode kernel (csrc/cpu/linear.cpp) against a float64 matmul, and the model
with it against the model without it."""

import pytest
import torch

from fastverify.models import cpu_linear

pytestmark = pytest.mark.skipif(not cpu_linear.available(), reason="no C++ compiler to build csrc/cpu/linear.cpp")


def oracle(x, w, b):
    y = x.double() @ w.double().t()
    return (y if b is None else y + b.double()).float()


@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("N,K", [(1, 1), (5, 15), (7, 17), (1001, 576), (64, 1000)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_matches_float64(M, N, K, bias, threads):
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert cpu_linear.supports(x, w)
        y = cpu_linear.linear(x, w, b)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(y, oracle(x, w, b), rtol=1e-5, atol=1e-5 * K ** 0.5)


def test_strided_rows_and_leading_dims():
    x = torch.randn(2, 3, 40)[:, :, :33]           # rows strided (stride 40), last dim contiguous
    w = torch.randn(9, 33)
    y = cpu_linear.linear(x, w)
    assert y.shape == (2, 3, 9)
    torch.testing.assert_close(y, oracle(x.reshape(-1, 33), w, None).view(2, 3, 9), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["rows", "dtype", "weight_layout", "grad"])
def test_unsupported_operands_fall_back(case):
    x, w = torch.randn(2, 16), torch.randn(4, 16)
    if case == "rows":
        x = torch.randn(9, 16)
    elif case == "dtype":
        x, w = x.bfloat16(), w.bfloat16()
    elif case == "weight_layout":
        w = torch.randn(16, 4).t()
    else:
        w.requires_grad_(True)
    assert not cpu_linear.supports(x, w)


def test_model_logits_same_with_and_without_kernel():
    from fastverify.models import Step, chain_parents
    from test_decoding import tiny

    _, model = tiny("qwen2", vocab=101, sharpen=1.0)  # qwen2: the q/k/v projection has a bias
    tokens = torch.randint(0, model.config.vocab_size, (5,), generator=torch.Generator().manual_seed(0))
    outs = []
    for on in (True, False):
        model.use_cpu_kernels(on)
        cache = model.new_cache(1, 32)
        cu = torch.tensor([0, 4], dtype=torch.int32)
        model(tokens[:4], Step.build(cache, torch.tensor([0]), chain_parents(cu), cu, torch.zeros(1, dtype=torch.int32)),
              cache)
        cu = torch.tensor([0, 1], dtype=torch.int32)
        step = Step.build(cache, torch.tensor([0]), chain_parents(cu), cu, torch.tensor([4], dtype=torch.int32))
        outs.append(model(tokens[4:], step, cache))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
