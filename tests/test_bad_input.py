"""Bad input gets a clear error naming the argument, before any kernel runs; with
checks off, kernels stay memory-safe and emit in-vocabulary tokens."""

import pytest
import torch

from conftest import BACKEND_DEVICES
from problems import chain_problem, tree_problem

import fastverify
from fastverify.ops.rejection import rejection_sample_torch, tree_rejection_sample_torch
from fastverify.triton import rejection as triton_rejection


def call_chain(p, **over):
    args = dict(target_logits=p.logits, draft_tokens=p.drafts, cu_num_draft=p.cu, max_draft_len=p.max_draft_len,
                **p.kwargs())
    args.update(over)
    return torch.ops.fastverify.rejection_sample(
        args.pop("target_logits"), args.pop("draft_tokens"), args.pop("cu_num_draft"), **args)


def call_tree(p, **over):
    args = dict(target_logits=p.logits, tree_tokens=p.drafts, parents=p.parents, cu_num_nodes=p.cu,
                max_depth=p.max_draft_len, **p.kwargs())
    args.update(over)
    return torch.ops.fastverify.tree_rejection_sample(
        args.pop("target_logits"), args.pop("tree_tokens"), args.pop("parents"), args.pop("cu_num_nodes"), **args)


@pytest.fixture
def chain():
    return chain_problem(B=3, V=20, max_k=3, q=True, filters=True, seed=1, zero_drafts=False)


@pytest.fixture
def tree():
    return tree_problem(B=3, V=20, max_nodes=6, q=True, filters=True, seed=1, sizes=[3, 5, 4])


CHAIN_CASES = {
    # name: (override builder, expected message fragment)
    "logits_1d": (lambda p: dict(target_logits=p.logits[0]), "target_logits must have 2 dimension"),
    "logits_int": (lambda p: dict(target_logits=p.logits.long()), "target_logits must be float32/bfloat16/float16"),
    "logits_rows": (lambda p: dict(target_logits=p.logits[:-1]), "target_logits must have shape"),
    "logits_strided": (lambda p: dict(target_logits=p.logits.t().contiguous().t()), "contiguous in the vocabulary"),
    "drafts_float": (lambda p: dict(draft_tokens=p.drafts.float()), "draft_tokens must be int32/int64"),
    "drafts_2d": (lambda p: dict(draft_tokens=p.drafts[None]), "draft_tokens must have 1 dimension"),
    "draft_out_of_vocab": (lambda p: dict(draft_tokens=torch.where(torch.arange(len(p.drafts)) == 1, 20, p.drafts)),
                           r"draft_tokens\[1\] = 20 is outside the vocabulary \[0, 20\)"),
    "draft_negative": (lambda p: dict(draft_tokens=torch.where(torch.arange(len(p.drafts)) == 0, -3, p.drafts)),
                       r"draft_tokens\[0\] = -3 is outside the vocabulary"),
    "cu_int64": (lambda p: dict(cu_num_draft=p.cu.long()), "cu_num_draft must be int32"),
    "cu_not_zero": (lambda p: dict(cu_num_draft=p.cu + 1), "cu_num_draft must start at 0"),
    "cu_decreasing": (lambda p: dict(cu_num_draft=torch.tensor([0, 3, 2, int(p.cu[-1])], dtype=torch.int32)),
                      "cu_num_draft must be non-decreasing"),
    "cu_total": (lambda p: dict(cu_num_draft=torch.cat([p.cu[:-1], p.cu[-1:] - 1])), "must equal draft_tokens.numel()"),
    "cu_too_short": (lambda p: dict(cu_num_draft=p.cu[:1]), "cu_num_draft must have B \\+ 1 >= 2"),
    "max_draft_len_small": (lambda p: dict(max_draft_len=0), "but max_draft_len is 0"),
    "max_draft_len_negative": (lambda p: dict(max_draft_len=-1), "max_draft_len must be an int >= 0"),
    "draft_probs_shape": (lambda p: dict(draft_probs=p.draft_probs[:, :-1]), "draft_probs must have shape"),
    "draft_probs_dtype": (lambda p: dict(draft_probs=p.draft_probs.double()), "draft_probs must be float32"),
    "temperature_negative": (lambda p: dict(temperature=torch.tensor([1.0, -0.5, 1.0])), "temperature must be finite and >= 0"),
    "temperature_nan": (lambda p: dict(temperature=torch.tensor([1.0, float("nan"), 1.0])), "temperature must be finite"),
    "temperature_shape": (lambda p: dict(temperature=torch.ones(4)), "temperature must have shape"),
    "temperature_dtype": (lambda p: dict(temperature=torch.ones(3, dtype=torch.float64)), "temperature must be float32"),
    "top_k_negative": (lambda p: dict(top_k=torch.tensor([1, -1, 0], dtype=torch.int32)), "top_k must be >= 0"),
    "top_k_dtype": (lambda p: dict(top_k=torch.tensor([1, 1, 0])), "top_k must be int32"),
    "top_p_zero": (lambda p: dict(top_p=torch.tensor([0.5, 0.0, 1.0])), r"top_p must be in \(0, 1\]"),
    "top_p_above_one": (lambda p: dict(top_p=torch.tensor([0.5, 1.5, 1.0])), r"top_p must be in \(0, 1\]"),
    "seed_dtype": (lambda p: dict(seed=p.seed.int()), "seed must be int64"),
    "positions_negative": (lambda p: dict(positions=torch.tensor([0, -1, 2])), "positions must be >= 0"),
    "positions_shape": (lambda p: dict(positions=torch.zeros(2, dtype=torch.long)), "positions must have shape"),
}


@pytest.mark.parametrize("case", list(CHAIN_CASES))
def test_rejection_sample_bad_input(chain, case):
    build, msg = CHAIN_CASES[case]
    with pytest.raises((ValueError, TypeError), match=msg):
        call_chain(chain, **build(chain))


def bad_parents(p, j, value):
    par = p.parents.clone()
    par[j] = value
    return dict(parents=par)


TREE_CASES = {
    "root_has_parent": (lambda p: bad_parents(p, 3, 0), r"parents\[3\] = 0: node 0 of request 1 is its root"),
    "parent_after_child": (lambda p: bad_parents(p, 4, 2), r"parents\[4\] = 2: node 1 of request 1 needs a parent in \[0, 1\)"),
    "parent_self": (lambda p: bad_parents(p, 2, 2), "parents do not form a tree"),
    "parent_out_of_tree": (lambda p: bad_parents(p, 1, -1), "parents do not form a tree"),
    "parents_shape": (lambda p: dict(parents=p.parents[:-1]), "parents must have shape"),
    "parents_float": (lambda p: dict(parents=p.parents.float()), "parents must be int32/int64"),
    "empty_tree": (lambda p: dict(cu_num_nodes=torch.tensor([0, 0, 8, 12], dtype=torch.int32)),
                   "strictly increasing"),
    "cu_total": (lambda p: dict(cu_num_nodes=torch.tensor([0, 3, 8, 11], dtype=torch.int32)),
                 "must equal tree_tokens.numel()"),
    "token_out_of_vocab": (lambda p: dict(tree_tokens=torch.where(torch.arange(12) == 5, 99, p.drafts)),
                           r"tree_tokens\[5\] = 99 is outside the vocabulary"),
    "too_deep": (lambda p: dict(max_depth=0), "> max_depth = 0"),
    "logits_rows": (lambda p: dict(target_logits=p.logits[:-1]), "target_logits must have shape"),
    "draft_probs_rows": (lambda p: dict(draft_probs=p.draft_probs[:-1]), "draft_probs must have shape"),
    "top_p": (lambda p: dict(top_p=torch.tensor([0.5, 2.0, 1.0])), r"top_p must be in \(0, 1\]"),
}


@pytest.mark.parametrize("case", list(TREE_CASES))
def test_tree_rejection_sample_bad_input(tree, case):
    build, msg = TREE_CASES[case]
    with pytest.raises((ValueError, TypeError), match=msg):
        call_tree(tree, **build(tree))


def test_sibling_tokens_must_be_distinct():
    p = tree_problem(B=1, V=20, sizes=[3], seed=0)
    p.parents = torch.tensor([-1, 0, 0])
    p.drafts = torch.tensor([5, 7, 7])
    with pytest.raises(ValueError, match="repeats a sibling's token under node 0"):
        call_tree(p)


def test_tensor_on_another_device_is_named(chain):
    meta = torch.empty(3, device="meta")
    with pytest.raises(ValueError, match="temperature is on meta but the op's other tensors are on cpu"):
        call_chain(chain, temperature=meta)


def test_non_tensor_argument_is_named(chain):
    with pytest.raises(TypeError, match="temperature must be a \\[B\\] tensor or a Python number"):
        fastverify.rejection_sample(chain.logits, chain.drafts, chain.cu, temperature="hot", seed=0, positions=0,
                                    max_draft_len=3)


def kernel_module(backend):
    if backend == "triton":
        return triton_rejection
    import fastverify._cuda
    return fastverify._cuda


# The torch backend indexes with torch ops, which raise on out-of-range ids by themselves.
@pytest.mark.parametrize("backend", [b for b in BACKEND_DEVICES if b != "torch"])
def test_unchecked_garbage_stays_in_vocabulary(backend):
    """What a CUDA caller without FASTVERIFY_CHECKS could pass: drafts and tree tokens
    outside the vocabulary, parents that are no tree. Kernels called directly (no
    checks) must not crash and must emit only ids in [0, V) or -1 padding."""
    dev = BACKEND_DEVICES[backend]
    kernels = kernel_module(backend)
    chain = chain_problem(B=4, V=30, max_k=3, q=True, filters=True, seed=3).to(dev)
    chain.drafts = torch.tensor([-5, 30, 2**40, 7, 1, -1, 99, 3, 2, 5, 6, 7][:chain.drafts.numel()], device=dev)
    out, num = kernels.rejection_sample(chain.logits, chain.drafts, chain.cu, chain.draft_probs,
                                                 chain.temperature, chain.top_k, chain.top_p, chain.seed,
                                                 chain.positions, chain.max_draft_len)
    assert (((out >= 0) & (out < 30)) | (out == -1)).all()
    tree = tree_problem(B=3, V=30, sizes=[4, 5, 3], q=True, seed=3).to(dev)
    tree.drafts[1] = 1000
    tree.drafts[5] = -7
    tree.parents[6] = 9    # points forward: not a tree
    tree.parents[7] = -4
    acc, out, num = kernels.tree_rejection_sample(tree.logits, tree.drafts, tree.parents, tree.cu,
                                                           tree.draft_probs, tree.temperature, None, None, tree.seed,
                                                           tree.positions, tree.max_draft_len)
    assert (((out >= 0) & (out < 30)) | (out == -1)).all()
    assert ((acc >= -1) & (acc < 5)).all()


def test_torch_backend_functions_are_the_cpu_kernels():
    # direct calls (how tests compare backends) take the op's positional layout
    p = chain_problem(B=2, V=15, max_k=2, seed=2)
    out, num = rejection_sample_torch(p.logits, p.drafts, p.cu, None, p.temperature, None, None, p.seed, p.positions, 2)
    assert out.shape == (2, 3)
    t = tree_problem(B=2, V=15, sizes=[2, 3], seed=2)
    acc, out, num = tree_rejection_sample_torch(t.logits, t.drafts, t.parents, t.cu, None, t.temperature, None, None,
                                                t.seed, t.positions, t.max_draft_len)
    assert acc.shape == (2, t.max_draft_len + 1)
