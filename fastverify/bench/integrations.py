"""Benchmark of the engine entry points (``fastverify.integrations``): each adapter's
cost over the raw op it wraps, on the same requests.

* ``vllm.rejection_sample`` — vLLM's layout (inclusive ``cu_num_draft_tokens``, no bonus
  rows, ``bonus_token_ids``): against ``fastverify.rejection_sample`` on inputs already in
  its own layout (``raw op``). The adapter's extra work: one copy of the logits into the
  op's layout, seeds from the requests' generators, the bonus tokens written in.
* ``flashinfer.chain_speculative_sampling`` — probabilities in, FlashInfer's counts out:
  against the raw op on log-probabilities prepared beforehand. Extra: the log pass over
  ``[B, K+1, V]`` and the per-position acceptance re-test.
* ``sglang.verify_tree_greedy``, ``sglang.tree_speculative_sampling_target_only`` — the
  caller's argmax ids / coins drive a torch walk of the tree (no fastverify op takes them):
  absolute times, no baseline.

On a GPU where the peer is installed (vLLM, FlashInfer, sgl-kernel) its own function runs
on the same arguments as a baseline too (``<peer> (peer)``, unchecked: other random streams).

The ``raw op`` baseline runs on the device's default backend (``torch`` on CPU, the CUDA
default on a GPU): compare it with the adapter row of that backend. Correctness is the
business of tests/integrations (the peers' own cases), not of these rows.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import SimpleNamespace

import torch

import fastverify

from .core import DTYPES, Case, Impl, generator, kernel_impls
from .rejection import peaked_logits

FAMILY = "integrations"
# (B, K, V, dtype) for the chain adapters; (B, N, V, dtype) for SGLang's trees
SHAPES = {
    "smoke": [(4, 3, 1000, "fp32")],
    "goal": [(64, 4, 128256, "bf16"), (4, 3, 1000, "fp32")],
    "grid": [(B, 4, V, "bf16") for B in (1, 8, 64) for V in (32000, 128256)],
    "cpu": [(4, 3, 1000, "fp32"), (8, 4, 32000, "fp32")],
}


def chain_inputs(B: int, K: int, V: int, dtype: str, device) -> dict:
    """The same B requests of K drafts in vLLM's, FlashInfer's and the op's layouts."""
    gen = generator(device, 0)
    logits, top = peaked_logits(B * (K + 1), V, gen, device)                     # [B·(K+1), V], op layout
    lg = logits.view(B, K + 1, V).to(DTYPES[dtype])
    drafts = top.view(B, K + 1)[:, :K].contiguous()                               # [B, K] drafts = argmax
    seed = torch.arange(B, device=device)
    positions = torch.zeros(B, dtype=torch.int64, device=device)
    temperature = torch.ones(B, device=device)
    probs = torch.softmax(lg.float(), -1)                                         # [B, K+1, V]
    q = torch.softmax(lg[:, :K].float() + torch.randn(B, K, V, generator=gen, device=device), -1)
    cu = (torch.arange(B + 1, device=device) * K).to(torch.int32)
    return dict(
        op=dict(args=(lg.reshape(B * (K + 1), V), drafts.reshape(-1), cu),
                kwargs=dict(temperature=temperature, seed=seed, positions=positions, max_draft_len=K)),
        vllm=dict(draft_token_ids=drafts.reshape(-1), num_draft_tokens=[K] * B, max_spec_len=K,
                  cu_num_draft_tokens=cu[1:].contiguous(), draft_probs=None,
                  target_logits=lg[:, :K].reshape(B * K, V), bonus_token_ids=top.view(B, K + 1)[:, K:].contiguous(),
                  sampling_metadata=SimpleNamespace(temperature=temperature, all_greedy=False, all_random=True,
                                                    top_k=None, top_p=None, generators={})),
        flashinfer=dict(draft_probs=q, draft_token_ids=drafts, target_probs=probs, seed=0, offset=0),
        flashinfer_op=dict(args=(probs.clamp_min(1e-30).log().reshape(B * (K + 1), V), drafts.reshape(-1), cu),
                           kwargs=dict(draft_probs=q.reshape(B * K, V), temperature=temperature, seed=seed,
                                       positions=positions, max_draft_len=K)))


def tree_inputs(B: int, N: int, V: int, dtype: str, device) -> dict:
    """B trees of N nodes in SGLang's layout: node 0 the root; children in ``next_token`` /
    ``next_sibling`` lists (node i's children are 2i+1 and 2i+2 while < N); distinct
    sibling tokens; target argmax ids, probabilities and the caller's coins."""
    gen = generator(device, 1)
    nt = torch.full((N,), -1, dtype=torch.int64)
    ns = torch.full((N,), -1, dtype=torch.int64)
    for i in range(N):
        if 2 * i + 1 < N:
            nt[i] = 2 * i + 1
        if 2 * i + 2 < N:
            ns[2 * i + 1] = 2 * i + 2
    logits, _ = peaked_logits(B * N, V, gen, device)
    probs = torch.softmax(logits.view(B, N, V).float(), -1)                        # [B, N, V]
    cand = torch.randint(0, V, (B, N), generator=gen, device=device)
    cand[:, 1:] = torch.argsort(torch.rand(B, V, generator=gen, device=device), -1)[:, :N - 1]  # distinct tokens
    K = N                                                                         # accept_index width
    out = dict(predicts=torch.full((B * N,), -1, dtype=torch.int32, device=device),
               accept_index=torch.full((B, K), -1, dtype=torch.int32, device=device),
               accept_token_num=torch.zeros(B, dtype=torch.int32, device=device), candidates=cand,
               retrive_index=(torch.arange(B, device=device)[:, None] * N + torch.arange(N, device=device)),
               retrive_next_token=nt.to(device).expand(B, N).contiguous(),
               retrive_next_sibling=ns.to(device).expand(B, N).contiguous())
    return dict(greedy=dict(out, target_predict=probs.argmax(-1)),
                sampling=dict(out, uniform_samples=torch.rand(B, N, generator=gen, device=device),
                              uniform_samples_for_final_sampling=torch.rand(B, generator=gen, device=device),
                              target_probs=probs, draft_probs=torch.zeros_like(probs)))


# adapter -> (the peer's package, the module holding its function, the function, the inputs' key)
PEERS = {
    "vllm.rejection_sample": ("vllm", "vllm.v1.sample.rejection_sampler", "rejection_sample", "vllm"),
    "flashinfer.chain_speculative_sampling": ("flashinfer", "flashinfer.sampling", "chain_speculative_sampling",
                                              "flashinfer"),
    "sglang.verify_tree_greedy": ("sgl_kernel", "sgl_kernel", "verify_tree_greedy", "greedy"),
    "sglang.tree_speculative_sampling_target_only": ("sgl_kernel", "sgl_kernel", "tree_speculative_sampling_target_only",
                                                     "sampling"),
}


def peer_impls(op: str) -> list[Impl]:
    """The peer's own function behind adapter ``op`` as a baseline, when the peer is installed."""
    package, module, name, key = PEERS[op]
    if package not in sys.modules and importlib.util.find_spec(package) is None:
        return []

    def make(x):
        fn = getattr(importlib.import_module(module), name)
        return lambda: fn(**x[key])

    return [Impl(f"{package} (peer)", make, kind="baseline", checked=False)]


def cases(size: str, device) -> list[Case]:
    from ..integrations import flashinfer, sglang, vllm

    shapes = SHAPES["cpu" if size == "grid" and torch.device(device).type != "cuda" else size]
    raw = lambda key: Impl("raw op", lambda x, key=key: (lambda: fastverify.rejection_sample(   # noqa: E731
        *x[key]["args"], **x[key]["kwargs"])), kind="baseline", checked=False)
    # the peers' kernels need a GPU (and are never installed into the CPU environment)
    peers = peer_impls if torch.device(device).type == "cuda" else (lambda op: [])
    out = []
    for B, K, V, dt in shapes:
        shape = dict(B=B, K=K, V=V, dtype=dt)
        build = lambda a=(B, K, V, dt): chain_inputs(*a, device)   # noqa: E731
        nbytes = B * (K + 1) * V * DTYPES[dt].itemsize
        out.append(Case(FAMILY, "vllm.rejection_sample", shape, nbytes, build,
                        kernel_impls(lambda x: vllm.rejection_sample(**x["vllm"])) + [raw("op")]
                        + peers("vllm.rejection_sample")))
        out.append(Case(FAMILY, "flashinfer.chain_speculative_sampling", shape, 4 * nbytes // DTYPES[dt].itemsize,
                        build, kernel_impls(lambda x: flashinfer.chain_speculative_sampling(**x["flashinfer"]))
                        + [raw("flashinfer_op")] + peers("flashinfer.chain_speculative_sampling")))
        N = 2 * K
        tshape = dict(B=B, N=N, V=V, dtype=dt)
        tbuild = lambda a=(B, N, V, dt): tree_inputs(*a, device)   # noqa: E731
        out.append(Case(FAMILY, "sglang.verify_tree_greedy", tshape, 0, tbuild,
                        kernel_impls(lambda x: sglang.verify_tree_greedy(**x["greedy"]))
                        + peers("sglang.verify_tree_greedy")))
        out.append(Case(FAMILY, "sglang.tree_speculative_sampling_target_only", tshape, B * N * V * 4, tbuild,
                        kernel_impls(lambda x: sglang.tree_speculative_sampling_target_only(**x["sampling"]))
                        + peers("sglang.tree_speculative_sampling_target_only")))
    if size == "smoke":      # seconds per call under the Triton interpreter: the op's own smoke rows cover triton
        for c in out:
            c.impls = [i for i in c.impls if i.name != "triton"]
    return out
