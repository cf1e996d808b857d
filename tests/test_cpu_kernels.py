"""The CPU decode kernels (csrc/cpu): each against a float64 oracle (the
projections against a matmul, attention against the path/chunk oracles of the op
tests), and the model and every decoding method with them against the torch model."""

import pytest
import torch

import naive
from attention_problems import path_attention_oracle, paged_problem
from test_sparse_kv import chunk_ids, problem as sparse_problem

from fastverify.cpu import step as cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler to build csrc/cpu")


def oracle(x, w, b):
    y = x.double() @ w.double().t()
    return (y if b is None else y + b.double()).float()


@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 8, 11, 16])
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
        assert cpu_kernels.supports(x, w)
        y = cpu_kernels.linear(x, w, b)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(y, oracle(x, w, b), rtol=1e-5, atol=1e-5 * K ** 0.5)


def test_strided_rows_and_leading_dims():
    x = torch.randn(2, 3, 40)[:, :, :33]           # rows strided (stride 40), last dim contiguous
    w = torch.randn(9, 33)
    y = cpu_kernels.linear(x, w)
    assert y.shape == (2, 3, 9)
    torch.testing.assert_close(y, oracle(x.reshape(-1, 33), w, None).view(2, 3, 9), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["rows", "dtype", "weight_layout", "grad"])
def test_unsupported_operands_fall_back(case):
    x, w = torch.randn(2, 16), torch.randn(4, 16)
    if case == "rows":
        x = torch.randn(17, 16)
    elif case == "dtype":
        x, w = x.bfloat16(), w.bfloat16()
    elif case == "weight_layout":
        w = torch.randn(16, 4).t()
    else:
        w.requires_grad_(True)
    assert not cpu_kernels.supports(x, w)


@pytest.mark.parametrize("prologue", ["norm", "swiglu"])
@pytest.mark.parametrize("M", [1, 3, 8, 16])
@pytest.mark.parametrize("residual", [False, True])
def test_linear_prologues_and_residual(prologue, M, residual):
    g = torch.Generator().manual_seed(M)
    N, K = 37, 72
    w = torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g)
    res = torch.randn(M, N, generator=g) if residual else None
    if prologue == "norm":
        x, nw = torch.randn(M, K, generator=g), torch.randn(K, generator=g)
        y = cpu_kernels.linear(x, w, b, norm=nw, eps=1e-5, residual=res)
        xd = x.double()
        h = nw.double() * xd / (xd.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
    else:
        x = torch.randn(M, 2 * K, generator=g)
        y = cpu_kernels.linear(x, w, b, swiglu=True, residual=res)
        gate, up = x.double().chunk(2, -1)
        h = gate * torch.sigmoid(gate) * up
    want = h @ w.double().t() + b.double() + (0 if res is None else res.double())
    torch.testing.assert_close(y, want.float(), rtol=1e-5, atol=1e-4)


def rope_oracle(x, cos, sin):
    x1, x2 = x.double().chunk(2, -1)
    return x.double() * cos.double()[:, None] + torch.cat((-x2, x1), -1) * sin.double()[:, None]


@pytest.mark.parametrize("qk_norm", [False, True])
def test_qkv_rope_writes_cache_and_returns_q(qk_norm):
    g = torch.Generator().manual_seed(1)
    N, Hq, Hkv, D, page, layers = 3, 6, 2, 16, 4, 3
    qkv = torch.randn(N, (Hq + 2 * Hkv) * D, generator=g)
    angles = torch.rand(N, D // 2, generator=g) * 10
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    k_all, v_all = torch.zeros(5, page, layers, Hkv, D), torch.zeros(5, page, layers, Hkv, D)
    layer = 1
    k_cache, v_cache = k_all[:, :, layer], v_all[:, :, layer]
    slots = torch.tensor([17, 2, 9])
    qn, kn = (torch.randn(D, generator=g), torch.randn(D, generator=g)) if qk_norm else (None, None)
    q = cpu_kernels.qkv_rope(qkv, cos, sin, k_cache, v_cache, slots, Hq, q_norm=qn, k_norm=kn, eps=1e-6)
    qs, ks, vs = qkv.view(N, -1, D).split([Hq, Hkv, Hkv], 1)

    def norm(x, w):
        return x if w is None else w.double() * x.double() / (x.double().pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()

    torch.testing.assert_close(q.double(), rope_oracle(norm(qs, qn), cos, sin), rtol=1e-5, atol=1e-5)
    flat_k, flat_v = k_all.view(-1, layers, Hkv, D), v_all.view(-1, layers, Hkv, D)
    torch.testing.assert_close(flat_k[slots, layer].double(), rope_oracle(norm(ks, kn), cos, sin), rtol=1e-5,
                               atol=1e-5)
    assert torch.equal(flat_v[slots, layer], vs)
    untouched = torch.ones(flat_k.shape[0], dtype=torch.bool)
    untouched[slots] = False
    assert flat_k[untouched].abs().sum() == 0 and flat_k[:, [0, 2]].abs().sum() == 0   # other slots, other layers


TREE_CASES = {
    # name: (nodes per request, prefixes, problem kwargs)
    "decode_batch": ([1, 1, 1], [0, 300, 17], dict(Hq=9, Hkv=3, D=64)),
    "chains": ([5, 1, 3], [40, 600, 2], dict(Hq=8, Hkv=2, D=80, kind="chain")),
    "trees_gqa8": ([8, 6], [100, 33], dict(Hq=8, Hkv=1, D=32, kind="random")),
    "mha_wide_tree": ([70], [5], dict(Hq=2, Hkv=2, D=16, kind="random")),
}


@pytest.mark.parametrize("case", list(TREE_CASES))
@pytest.mark.parametrize("threads", [1, 2])
def test_paged_attention_tree_mode(case, threads):
    sizes, prefixes, kw = TREE_CASES[case]
    p = paged_problem(sizes, prefixes, seed=3, **kw)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = cpu_kernels.paged_attention(p.q, p.k_cache, p.v_cache, p.block_table, p.seq_lens, cu_num_nodes=p.cu,
                                          tree_mask=p.tree_mask)
    finally:
        torch.set_num_threads(before)
    want = path_attention_oracle(p)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=2e-5)
    # a subset of the nodes (a drafter computing one tree level): same rows
    rows = torch.arange(p.q.shape[0] - 1, -1, -2)
    sub = cpu_kernels.paged_attention(p.q[rows], p.k_cache, p.v_cache, p.block_table, p.seq_lens, cu_num_nodes=p.cu,
                                      tree_mask=p.tree_mask, rows=rows)
    torch.testing.assert_close(sub.double(), want[rows], rtol=1e-5, atol=2e-5)


def test_paged_attention_same_bits_for_any_thread_count():
    """The step's attention splits keys by shapes only: 1, 2 and 3 threads, same bits
    (long prefixes: several work units per request and KV head, merged)."""
    p = paged_problem([5, 1, 16], [3000, 900, 40], Hq=8, Hkv=2, D=64, seed=5)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(cpu_kernels.paged_attention(p.q, p.k_cache, p.v_cache, p.block_table, p.seq_lens,
                                                    cu_num_nodes=p.cu, tree_mask=p.tree_mask))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("prefix", [37, 700, 3000])
def test_paged_attention_tree_node_equals_its_path_as_a_chain(prefix):
    """A tree node's output is, bit for bit, what the same keys give as the last token of a
    plain chain (its path written at consecutive positions): the step's attention reads a
    node's keys as the sequence prefix + path, not by cache position, so where the path's
    nodes sit in the tree, how many nodes the step has and the thread count do not matter."""
    parents = [-1, 0, 0, 1, 1, 2, 3, 3, 6, 0, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 4, 20]
    n = len(parents)
    gen = torch.Generator().manual_seed(prefix)
    Hq, Hkv, D, page = 6, 2, 64, 16
    pages = -(-(prefix + 2 * n) // page)
    k = torch.randn(pages, page, Hkv, D, generator=gen) * 2
    v = torch.randn(pages, page, Hkv, D, generator=gen)
    table = torch.randperm(pages, generator=gen).to(torch.int32)[None]
    q = torch.randn(n, Hq, D, generator=gen)
    from fastverify import build_tree
    cu = torch.tensor([0, n], dtype=torch.int32)
    mask, _, _ = build_tree(torch.tensor(parents), cu, torch.tensor([prefix], dtype=torch.int32), max_nodes=n)
    tree = cpu_kernels.paged_attention(q, k, v, table, torch.tensor([prefix + n], dtype=torch.int32), cu_num_nodes=cu,
                                       tree_mask=mask)
    flat_k, flat_v = k.view(-1, Hkv, D), v.view(-1, Hkv, D)
    slot = lambda p: int(table[0, p // page]) * page + p % page  # noqa: E731
    for node in (1, 5, 8, 19, 21):
        path = [node]
        while parents[path[-1]] >= 0:
            path.append(parents[path[-1]])
        path.reverse()
        k2, v2 = k.clone(), v.clone()  # the path at positions prefix, prefix + 1, ...: a chain ending in node
        for depth, nd in enumerate(path):
            k2.view(-1, Hkv, D)[slot(prefix + depth)] = flat_k[slot(prefix + nd)]
            v2.view(-1, Hkv, D)[slot(prefix + depth)] = flat_v[slot(prefix + nd)]
        L = prefix + len(path)
        one = cpu_kernels.paged_attention(q[node:node + 1], k2, v2, table, torch.tensor([L], dtype=torch.int32),
                                          cu_num_nodes=torch.tensor([0, 1], dtype=torch.int32),
                                          tree_mask=torch.ones(1, 1, dtype=torch.int64))
        assert torch.equal(tree[node], one[0]), node


@pytest.mark.parametrize("lens,chunk,Hkv,C", [([300, 40, 7], 16, 2, 5), ([1000, 64], 8, 1, 40), ([17], 32, 4, 3)])
def test_paged_attention_sparse_mode(lens, chunk, Hkv, C):
    p = sparse_problem(lens, Hq=2 * Hkv, Hkv=Hkv, D=64, seed=4)
    ids = chunk_ids(lens, Hkv, C, chunk, seed=5)
    ids[0, 0, 0] = -1                                   # padding and an id past F_b are skipped
    ids[-1, -1, -1] = lens[-1] // chunk + 3
    out = cpu_kernels.paged_attention(p.q, p.k_cache, p.v_cache, p.block_table, p.seq_lens, chunk_ids=ids,
                                      chunk_size=chunk)
    want = torch.tensor(naive.sparse_kv_attention(p.q.double(), p.k_cache.double(), p.v_cache.double(),
                                                  p.block_table, p.seq_lens, ids, chunk), dtype=torch.float64)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=2e-5)


def test_bad_operands_are_refused():
    p = paged_problem([2], [5], Hq=4, Hkv=2, D=16)
    with pytest.raises(ValueError, match="block_table"):
        cpu_kernels.paged_attention(p.q, p.k_cache, p.v_cache, p.block_table.long(), p.seq_lens, cu_num_nodes=p.cu,
                                    tree_mask=p.tree_mask)
    with pytest.raises(ValueError, match="strides"):
        cpu_kernels.paged_attention(p.q, p.k_cache, p.v_cache.transpose(2, 3).contiguous().transpose(2, 3),
                                    p.block_table, p.seq_lens, cu_num_nodes=p.cu, tree_mask=p.tree_mask)
    with pytest.raises(ValueError, match="sparse mode"):
        cpu_kernels.paged_attention(p.q, p.k_cache, p.v_cache, p.block_table, p.seq_lens,
                                    chunk_ids=torch.zeros(1, 2, 1, dtype=torch.int32), chunk_size=4)
    with pytest.raises(ValueError, match="qkv"):
        cpu_kernels.qkv_rope(torch.randn(1, 7), torch.ones(1, 16), torch.zeros(1, 16), p.k_cache, p.v_cache,
                             torch.tensor([0]), 4)


# ----------------------------------------------------------------------------- the model and decoding with them

ARCHS = ["llama", "qwen2", "qwen3"]  # qwen2: biases on q/k/v; qwen3: q/k RMSNorm


def forward_steps(model, shuffle):
    """Logits of a prefill (torch path: > 16 tokens), a decode step of 2 requests, a chain,
    a tree and a tree computed in part (``rows``) — every step shape the decoders use."""
    from fastverify.models import Step, chain_parents, cu_from_counts

    g = torch.Generator().manual_seed(0)
    V = model.config.vocab_size
    cache = model.new_cache(2, 64, shuffle_pages=shuffle)
    reqs = torch.tensor([0, 1])
    outs = []

    def run(counts, parents, prefix, rows=None):
        cu = cu_from_counts(counts)
        step = Step.build(cache, reqs, parents, cu, torch.tensor(prefix, dtype=torch.int32), rows)
        n = int(cu[-1]) if rows is None else len(rows)
        outs.append(model(torch.randint(0, V, (n,), generator=g), step, cache))

    run([12, 9], chain_parents(cu_from_counts([12, 9])), [0, 0])
    run([1, 1], torch.tensor([-1, -1]), [12, 9])
    run([3, 10], chain_parents(cu_from_counts([3, 10])), [13, 10])     # 13 tokens: the 9..16-row kernels
    tree = torch.tensor([-1, 0, 0, 1, -1, 0, 1])
    run([4, 3], tree, [16, 20])
    run([4, 3], tree, [16, 20], rows=torch.tensor([2, 3, 6]))
    return outs


@pytest.mark.parametrize("arch", ARCHS)
def test_model_logits_same_with_and_without_kernels(arch):
    from test_decoding import tiny

    _, model = tiny(arch, vocab=101, sharpen=1.0)
    on = forward_steps(model.use_cpu_kernels(True), shuffle=True)
    off = forward_steps(model.use_cpu_kernels(False), shuffle=True)
    for a, b in zip(on, off):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_method_with_kernels_equals_torch_autoregressive(arch):
    """Greedy: each method on the kernels emits the torch model's autoregressive tokens;
    sampling: the same seeds draw the same tokens on both paths."""
    from test_decoding import PROMPTS, tiny

    from fastverify.decoding import generate

    _, model = tiny(arch)
    base = generate(model.use_cpu_kernels(False), PROMPTS, max_new_tokens=16, stop_at_eos=False).tokens
    sampled = generate(model, PROMPTS, max_new_tokens=16, stop_at_eos=False, temperature=0.8, seed=[1, 2, 3, 4])
    model.use_cpu_kernels(True)
    runs = {("ar", None): {}, ("chain", "layerskip"): {}, ("tree", "ngram"): dict(tree_nodes=8),
            ("selfspec", None): dict(kv_budget=32, kv_chunk=4, kv_policy="topk", kv_refresh=2),
            ("selfspec", None, "streaming"): dict(kv_budget=32, kv_chunk=4, kv_policy="streaming")}
    try:
        for key, kw in runs.items():
            r = generate(model, PROMPTS, method=key[0], drafter=key[1], max_new_tokens=16, stop_at_eos=False, **kw)
            assert r.tokens == base, key
        again = generate(model, PROMPTS, max_new_tokens=16, stop_at_eos=False, temperature=0.8, seed=[1, 2, 3, 4])
        assert again.tokens == sampled.tokens
    finally:
        model.use_cpu_kernels(False)


@pytest.mark.parametrize("arch", ARCHS)
def test_one_layer_on_kernels_equals_torch_layer(arch):
    """DecoderLayer.forward_cpu alone (the per-layer path sparse drafts take) on a tree step."""
    from fastverify.models import Step, cu_from_counts
    from test_decoding import tiny

    _, model = tiny(arch, vocab=101, sharpen=1.0)
    layer = model.model.layers[1]
    cu = cu_from_counts([3, 2])
    outs = []
    for fused in (True, False):
        torch.manual_seed(3)  # the same shuffled pages both times
        cache = model.new_cache(2, 32, shuffle_pages=True)
        cache.k.normal_(generator=torch.Generator().manual_seed(0))
        cache.v.normal_(generator=torch.Generator().manual_seed(1))
        step = Step.build(cache, torch.tensor([1, 0]), torch.tensor([-1, 0, 0, -1, 0]), cu,
                          torch.tensor([7, 20], dtype=torch.int32))
        x = torch.randn(5, model.config.dim, generator=torch.Generator().manual_seed(2))
        cos, sin = model.rope(step.positions)
        layer.cpu_kernel = fused
        outs.append((layer(x, cos, sin, cache, 1, step), cache.k.clone(), cache.v.clone()))
    layer.cpu_kernel = False
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
