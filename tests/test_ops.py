"""The ops as torch ops: schemas, opcheck, fake tensors, torch.compile(fullgraph=True)
and backend selection."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import BACKEND_DEVICES
from problems import chain_problem, multi_path_problem, run_tree, tree_problem

import fastverify

BACKENDS = list(BACKEND_DEVICES)


def chain_call(p):
    return (p.logits, p.drafts, p.cu), dict(max_draft_len=p.max_draft_len, **p.kwargs())


def tree_call(p):
    return (p.logits, p.drafts, p.parents, p.cu), dict(max_depth=p.max_draft_len, **p.kwargs())


def test_schemas_name_the_contract_arguments():
    chain = torch.ops.fastverify.rejection_sample.default._schema
    tree = torch.ops.fastverify.tree_rejection_sample.default._schema
    assert [a.name for a in chain.arguments] == [
        "target_logits", "draft_tokens", "cu_num_draft", "draft_probs", "temperature", "top_k", "top_p", "seed",
        "positions", "max_draft_len", "verify", "typical_eps", "typical_delta"]
    assert [a.name for a in tree.arguments] == [
        "target_logits", "tree_tokens", "parents", "cu_num_nodes", "draft_probs", "temperature", "top_k", "top_p",
        "seed", "positions", "max_depth", "verify"]
    # the rule is a keyword whose default is the rule of DESIGN §2
    assert [a.default_value for a in chain.arguments if a.name == "verify"] == ["token"]
    assert [a.default_value for a in tree.arguments if a.name == "verify"] == ["specinfer"]
    assert not any(a.is_write for s in (chain, tree) for a in s.arguments if a.alias_info is not None)


def with_rule(p, rule):
    p.verify = rule
    return p


OPCHECK_REJECTION = {  # case -> (op, a small problem with or without draft_probs and filters, its call)
    "rejection_sample": ("rejection_sample", lambda q, filters: chain_problem(
        B=3, V=33, max_k=2, q=q, filters=filters, seed=1), chain_call),
    "rejection_sample-block": ("rejection_sample", lambda q, filters: with_rule(chain_problem(
        B=3, V=33, max_k=2, q=q, filters=filters, seed=1), "block"), chain_call),
    "rejection_sample-typical": ("rejection_sample", lambda q, filters: with_rule(chain_problem(
        B=3, V=33, max_k=2, q=q, filters=filters, seed=1), "typical"), chain_call),
    "tree_rejection_sample": ("tree_rejection_sample", lambda q, filters: tree_problem(
        B=3, V=21, max_nodes=6, q=q, filters=filters, seed=2), tree_call),
    "tree_rejection_sample-block_wor": ("tree_rejection_sample", lambda q, filters: multi_path_problem(
        B=3, V=21, n=3, depth=2, wor=True, filters=filters, seed=2), tree_call),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("q,filters", [(False, False), (True, True)])
@pytest.mark.parametrize("case", list(OPCHECK_REJECTION))
def test_opcheck_rejection(backend, q, filters, case):
    op, make_problem, make_call = OPCHECK_REJECTION[case]
    args, kwargs = make_call(make_problem(q, filters).to(BACKEND_DEVICES[backend]))
    with fastverify.use_backend(backend):
        torch.library.opcheck(getattr(torch.ops.fastverify, op).default, args, kwargs)


def test_fake_tensors_give_output_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    p = chain_problem(B=4, V=50, max_k=3, q=True, filters=True, seed=3)
    t = tree_problem(B=2, V=20, max_nodes=5, seed=3)
    with FakeTensorMode() as mode:
        fp = p.to("cpu")
        fake = lambda x: None if x is None else mode.from_tensor(x)  # noqa: E731
        args, kwargs = chain_call(fp)
        out, num = torch.ops.fastverify.rejection_sample(*map(fake, args), **{k: fake(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
        assert out.shape == (4, 4) and out.dtype == torch.int32 and num.shape == (4,)
        args, kwargs = tree_call(t)
        acc, out, num = torch.ops.fastverify.tree_rejection_sample(*map(fake, args), **{k: fake(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
        assert acc.shape == out.shape == (2, t.max_draft_len + 1) and num.shape == (2,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    """The ops compose inside a compiled graph with surrounding torch code."""
    p = chain_problem(B=4, V=64, max_k=3, filters=True, seed=6).to(BACKEND_DEVICES[backend])
    t = tree_problem(B=3, V=30, max_nodes=7, q=True, seed=6).to(BACKEND_DEVICES[backend])

    def step(logits, drafts, cu, temperature, top_k, top_p, seed, positions):
        out, num = torch.ops.fastverify.rejection_sample(
            logits * 1.0, drafts, cu, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
            positions=positions, max_draft_len=3)
        return out, num + 1

    def tree_step(logits, tokens, parents, cu, q, temperature, seed, positions):
        return torch.ops.fastverify.tree_rejection_sample(
            logits, tokens, parents, cu, draft_probs=q, temperature=temperature, seed=seed, positions=positions,
            max_depth=t.max_draft_len)

    with fastverify.use_backend(backend):
        args = (p.logits, p.drafts, p.cu, p.temperature, p.top_k, p.top_p, p.seed, p.positions)
        want = step(*args)
        got = torch.compile(step, fullgraph=True, backend="inductor")(*args)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        targs = (t.logits, t.drafts, t.parents, t.cu, t.draft_probs, t.temperature, t.seed, t.positions)
        want = tree_step(*targs)
        got = torch.compile(tree_step, fullgraph=True, backend="aot_eager")(*targs)
        assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_with_verification_rules(backend):
    """verify= (a str of the schema) and typical's tensors go through the fake kernels: every
    rule compiles with fullgraph=True and gives the eager tokens."""
    dev = BACKEND_DEVICES[backend]
    p = chain_problem(B=3, V=40, max_k=3, q=True, seed=7).to(dev)
    t = multi_path_problem(B=3, V=30, n=2, depth=2, wor=True, seed=7).to(dev)

    def chain(logits, drafts, cu, q, temperature, seed, positions, eps, delta):
        block = torch.ops.fastverify.rejection_sample(logits, drafts, cu, draft_probs=q, temperature=temperature,
                                                      seed=seed, positions=positions, max_draft_len=3, verify="block")
        typical = torch.ops.fastverify.rejection_sample(logits, drafts, cu, temperature=temperature, seed=seed,
                                                        positions=positions, max_draft_len=3, verify="typical",
                                                        typical_eps=eps, typical_delta=delta)
        return (*block, *typical)

    def tree(logits, tokens, parents, cu, q, temperature, seed, positions):
        return torch.ops.fastverify.tree_rejection_sample(
            logits, tokens, parents, cu, draft_probs=q, temperature=temperature, seed=seed, positions=positions,
            max_depth=2, verify="block_wor")

    eps, delta = torch.full((3,), 0.09, device=dev), torch.full((3,), 0.3, device=dev)
    with fastverify.use_backend(backend):
        args = (p.logits, p.drafts, p.cu, p.draft_probs, p.temperature, p.seed, p.positions, eps, delta)
        assert all(torch.equal(a, b) for a, b in zip(torch.compile(chain, fullgraph=True, backend="aot_eager")(*args),
                                                    chain(*args)))
        targs = (t.logits, t.drafts, t.parents, t.cu, t.draft_probs, t.temperature, t.seed, t.positions)
        assert all(torch.equal(a, b) for a, b in zip(torch.compile(tree, fullgraph=True, backend="aot_eager")(*targs),
                                                    tree(*targs)))


def test_backend_selection(monkeypatch):
    assert fastverify.get_backend("cpu") == "cpu"   # the C++ kernels (torch stands in where they cannot build)
    assert fastverify.get_backend("cuda") in ("triton", "cuda")
    with fastverify.use_backend("triton"):
        assert fastverify.get_backend("cpu") == "triton"
    assert fastverify.get_backend("cpu") == "cpu"
    with pytest.raises(ValueError, match="backend must be one of"):
        fastverify.set_backend("tpu")
    p = chain_problem(B=2, V=20, max_k=1)
    monkeypatch.setattr(fastverify._backend, "cpu_cuda_kernels", None)   # the tests' CPU emulation off
    with fastverify.use_backend("cuda"), pytest.raises(RuntimeError, match="cuda backend needs CUDA tensors"):
        fastverify.rejection_sample(p.logits, p.drafts, p.cu, max_draft_len=1, **p.kwargs())


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    code = (
        "import torch, fastverify\n"
        "fastverify.set_backend('triton')\n"
        "l = torch.randn(2, 8); d = torch.tensor([1]); cu = torch.tensor([0, 1], dtype=torch.int32)\n"
        "try:\n"
        "    fastverify.rejection_sample(l, d, cu, temperature=0.0, seed=0, positions=0, max_draft_len=1)\n"
        "except RuntimeError as e:\n"
        "    print('ERR', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "ERR" in res.stdout and "TRITON_INTERPRET=1" in res.stdout, res.stdout + res.stderr


def test_env_var_picks_the_backend():
    code = "import fastverify; print(fastverify.get_backend('cpu'), fastverify.get_backend('cuda'))"
    env = dict(os.environ, FASTVERIFY_BACKEND="triton")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.stdout.split() == ["triton", "triton"], res.stderr


def test_import_never_builds_cuda_or_imports_triton():
    code = "import sys, fastverify; print('triton' in sys.modules, 'fastverify._cuda' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.stdout.split() == ["False", "False"], res.stdout + res.stderr


def test_tree_and_chain_run_through_public_wrappers():
    p = tree_problem(B=2, V=20, max_nodes=4, seed=7)
    acc, out, num = run_tree(p, "torch")
    assert acc.shape == out.shape == (2, p.max_draft_len + 1)


# --------------------------------------------------------------------------- empty batches and draft_probs


def empty_batch_calls(dev):
    """Every op on a batch of zero requests (B = 0, cu_* = [0]), with the outputs it must give."""
    i32 = dict(dtype=torch.int32, device=dev)
    ids = torch.zeros(0, dtype=torch.long, device=dev)
    cu0 = torch.zeros(1, **i32)
    logits = torch.zeros(0, 50, device=dev)
    cache = torch.randn(3, 4, 2, 16, device=dev)
    q0 = torch.zeros(0, 4, 16, device=dev)
    table0 = torch.zeros(0, 3, **i32)
    lens0 = torch.zeros(0, **i32)
    sampling = dict(temperature=1.0, seed=0, positions=0)
    return {
        "rejection_sample": (lambda: fastverify.rejection_sample(logits, ids, cu0, max_draft_len=3, **sampling),
                             [(0, 4), (0,)]),
        "tree_rejection_sample": (lambda: fastverify.tree_rejection_sample(logits, ids, ids, cu0, max_depth=2,
                                                                           **sampling), [(0, 3), (0, 3), (0,)]),
        "build_tree": (lambda: fastverify.build_tree(ids, cu0, ids), [(0, 1), (0,), (0,)]),
        "tree_attention": (lambda: fastverify.tree_attention(q0, cache, cache, table0, lens0, cu0,
                                                             torch.zeros(0, 1, dtype=torch.long, device=dev)),
                           [(0, 4, 16)]),
        "compact_kv": (lambda: fastverify.compact_kv(cache, cache.clone(), table0, lens0,
                                                     torch.zeros(0, 3, **i32), lens0), []),
        "lm_head_topk": (lambda: fastverify.lm_head_topk(torch.zeros(0, 16, device=dev), torch.randn(30, 16, device=dev),
                                                         4), [(0, 4), (0, 4), (0,)]),
        "lm_head_sample": (lambda: fastverify.lm_head_sample(
            torch.zeros(0, 16, device=dev), torch.randn(30, 16, device=dev),
            temperature=torch.zeros(0, device=dev), seed=torch.zeros(0, dtype=torch.long, device=dev),
            positions=torch.zeros(0, dtype=torch.long, device=dev)), [(0,), (0,), (0,)]),
        "select_kv_chunks": (lambda: fastverify.select_kv_chunks(q0, cache, table0, lens0, chunk_size=4, num_chunks=2),
                             [(0, 2, 2)]),
        "sparse_kv_attention": (lambda: fastverify.sparse_kv_attention(q0, cache, cache, table0, lens0,
                                                                       torch.zeros(0, 2, 2, **i32), chunk_size=4),
                                [(0, 4, 16)]),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(empty_batch_calls("cpu")))
def test_an_empty_batch_gives_empty_outputs(backend, op):
    call, shapes = empty_batch_calls(BACKEND_DEVICES[backend])[op]
    with fastverify.use_backend(backend):
        out = call()
    outs = [] if out is None else list(out) if isinstance(out, tuple) else [out]
    assert [tuple(t.shape) for t in outs] == shapes


@pytest.mark.parametrize("op", ["chain", "tree"])
@pytest.mark.parametrize("bad,message", [
    ("nan", r"draft_probs\[0, 3\] = nan: probabilities must be finite and >= 0"),
    ("negative", r"draft_probs\[0, 3\] = -0.5: probabilities must be finite and >= 0"),
    ("sum", r"draft_probs\[0\] sums to 1.5 > 1 \+ 0.001"),
])
def test_draft_probs_values_are_checked(op, bad, message):
    p = chain_problem(B=2, V=20, max_k=2, q=True, seed=4) if op == "chain" else tree_problem(B=2, V=20, q=True, seed=4)
    q = p.draft_probs.clone()
    assert q.shape[0] >= 1
    q[0, 3] = {"nan": float("nan"), "negative": -0.5, "sum": q[0, 3]}[bad]
    if bad == "sum":
        q[0] *= 1.5 / q[0].sum()
    args, kwargs = chain_call(p) if op == "chain" else tree_call(p)
    kwargs["draft_probs"] = q
    fn = fastverify.rejection_sample if op == "chain" else fastverify.tree_rejection_sample
    with pytest.raises(ValueError, match=message):
        fn(*args, **kwargs)


def test_draft_probs_rows_may_sum_below_one_and_round_in_half_precision():
    p = chain_problem(B=3, V=200, max_k=2, q=True, seed=5)
    args, kwargs = chain_call(p)
    kwargs["draft_probs"] = (p.draft_probs * 0.5).contiguous()           # a drafter over a token subset
    fastverify.rejection_sample(*args, **kwargs)
    kwargs["draft_probs"] = (p.draft_probs * 1.004).to(torch.bfloat16)  # bf16 rounding above 1
    fastverify.rejection_sample(args[0].to(torch.bfloat16), *args[1:], **kwargs)
