"""The benchmark's peer baselines (fastverify.bench.integrations.peer_impls): where a peer
is installed (a GPU machine with sgl-kernel, vLLM or FlashInfer) its own function is timed
on the very arguments the adapter gets. None is installed here, so a stand-in module
plays sgl-kernel."""

import sys
import types

import pytest
import torch

from fastverify.bench import integrations as bench
from fastverify.integrations import sglang

pytestmark = pytest.mark.family("integrations")


def test_a_peer_that_is_not_installed_adds_no_baseline():
    assert "vllm" not in sys.modules
    assert bench.peer_impls("vllm.rejection_sample") == []
    assert not any(i.name.endswith("(peer)") for c in bench.cases("smoke", "cpu") for i in c.impls)


def test_an_installed_peer_runs_on_the_adapters_arguments(monkeypatch):
    calls = []
    fake = types.ModuleType("sgl_kernel")

    def verify_tree_greedy(**kw):
        calls.append(sorted(kw))
        sglang.verify_tree_greedy(**kw)

    fake.verify_tree_greedy = verify_tree_greedy
    monkeypatch.setitem(sys.modules, "sgl_kernel", fake)
    (impl,) = bench.peer_impls("sglang.verify_tree_greedy")
    assert impl.name == "sgl_kernel (peer)" and impl.kind == "baseline" and not impl.checked

    x = bench.tree_inputs(2, 6, 50, "fp32", "cpu")
    impl.make(x)()
    peer_out = [x["greedy"][k].clone() for k in ("predicts", "accept_index", "accept_token_num")]
    x = bench.tree_inputs(2, 6, 50, "fp32", "cpu")
    sglang.verify_tree_greedy(**x["greedy"])
    assert calls == [sorted(x["greedy"])]
    for got, want in zip(peer_out, (x["greedy"][k] for k in ("predicts", "accept_index", "accept_token_num"))):
        assert torch.equal(got, want)
    assert (peer_out[2] >= 0).all()
