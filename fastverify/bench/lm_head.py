"""Benchmark of the frequency-ranked LM head: ``lm_head_topk`` and ``lm_head_sample``.

Inputs: a full head ``[V_full, d]`` (``randn / √d``), the ranked subset a contiguous copy
of ``V_sub`` of its rows (a random ``token_map``), hidden states ``randn × 2`` ``[M, d]``,
temperature 0.8 per row, k = 8.

Baselines, measured in the same run (what a drafter runs without a fused head):

* ``subset`` — FR-Spec unfused: ``hidden @ weight.T`` over the V_sub rows, fp32
  ``log_softmax``, ``topk``, ``token_map`` of the winners (the logits go to memory and
  back); for ``lm_head_sample``: softmax and ``torch.multinomial``;
* ``full`` — no FR-Spec: the same over the full head (V_full = 128256 at d = 4096).

Bytes (the bound): the subset head and the hidden states, ``(V_sub + M)·d·bytes``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

import fastverify

from .core import DTYPES, Case, Impl, close, exact, generator, kernel_impls

FAMILY = "lm_head"
K = 8
TARGETS = {"pct_of_bound": 75.0, "speedup": {"full": 3.5}}
# unit roundoff of each input dtype's significand (8, 11, 24 bits)
UNIT_ROUNDOFF = {"bf16": 2.0 ** -8, "fp16": 2.0 ** -11, "fp32": 2.0 ** -24}
# (d, V_sub, M, V_full, dtype)
SHAPES = {
    "smoke": [(64, 1000, 4, 3000, "fp32")],
    "goal": [(4096, 32768, 64, 128256, "bf16"), (4096, 32768, 1, 128256, "bf16")],
    "grid": [(d, V, M, Vf, "bf16") for d, Vf in ((576, 49152), (2048, 128256), (4096, 128256))
             for V in (8192, 16384, 32768, 65536) for M in (1, 8, 64, 256) if V <= Vf],
    "cpu": [(64, V, M, 32000, "fp32") for V in (4096, 16384) for M in (1, 8)],
}
GOAL = (4096, 32768, 64, 128256, "bf16")
# on CPU (issue 18): compute-bound at M=64 (against the heads), bandwidth-bound at M=1
CPU_TARGETS = {(4096, 32768, 64, 128256, "bf16"): {"lm_head_topk": {"speedup": {"full": 3.0, "subset": 0.9}}},
               (4096, 32768, 1, 128256, "bf16"): {"lm_head_topk": {"pct_of_copy": 60.0},
                                                  "lm_head_sample": {"pct_of_copy": 60.0}}}


def inputs(d: int, V: int, M: int, Vf: int, dtype: str, device, seed: int = 0) -> dict:
    gen = generator(device, seed)
    dt = DTYPES[dtype]
    head = (torch.randn(Vf, d, generator=gen, device=device) / d ** 0.5).to(dt)                 # [V_full, d]
    token_map = torch.randperm(Vf, generator=gen, device=device)[:V]                             # [V_sub]
    return dict(hidden=(torch.randn(M, d, generator=gen, device=device) * 2).to(dt), weight=head[token_map].contiguous(),
                token_map=token_map, temperature=torch.full((M,), 0.8, device=device), head=head,
                seed=torch.arange(M, device=device), positions=torch.full((M,), 17, device=device))


def topk_baseline(x: dict, full: bool):
    w = x["head"] if full else x["weight"]
    lp = ((x["hidden"] @ w.T).float() / x["temperature"][:, None]).log_softmax(-1)               # [M, V]
    vals, rows = lp.topk(K, dim=-1)
    return (rows if full else x["token_map"][rows]), vals


def sample_baseline(x: dict, full: bool):
    w = x["head"] if full else x["weight"]
    p = ((x["hidden"] @ w.T).float() / x["temperature"][:, None]).softmax(-1)
    rows = torch.multinomial(p, 1).squeeze(1)
    return rows if full else x["token_map"][rows]


def logprob_check(dtype: str, d: int) -> Callable[[Any, Any], tuple]:
    """Check of top-k log-probabilities against the reference's (ids, logprobs, lse).

    Why this tolerance: the unfused heads multiply in the input dtype, and torch's bf16/fp16
    matmul returns its logits rounded to that dtype: each logit s is off by up to u·|s| (u
    the dtype's unit roundoff, 2^-8 for bf16 — a 4096-long bf16 dot product of logits ~10
    is legitimately 0.04 away), and so is lse, so a log-probability s - lse is off by up to
    2u·max|s|. The fp32 accumulation over d adds about √d·2^-24 relative (random rounding
    errors; x4 for safety), the same for every dtype. max|s| comes from the reference:
    s = logprob + lse."""
    rel = 2 * (UNIT_ROUNDOFF[dtype] + 4 * d ** 0.5 * UNIT_ROUNDOFF["fp32"])

    def check(out, ref):
        scale = float((ref[1].float() + ref[2].float()[:, None]).abs().max()) if ref[1].numel() else 0.0
        return close(rel * max(scale, 1.0), 0.0)(out[1], ref[1])
    return check


def cases(size: str, device) -> list[Case]:
    shapes = SHAPES["cpu" if size == "grid" and torch.device(device).type != "cuda" else size]
    out = []
    for d, V, M, Vf, dt in shapes:
        shape = dict(d=d, V_sub=V, M=M, V_full=Vf, dtype=dt)
        nbytes = (V + M) * d * DTYPES[dt].itemsize
        build = lambda a=(d, V, M, Vf, dt): inputs(*a, device)   # noqa: E731
        topk = kernel_impls(lambda x: fastverify.lm_head_topk(x["hidden"], x["weight"], K, token_map=x["token_map"],
                                                              temperature=x["temperature"]))
        topk += [Impl("subset", lambda x: (lambda: topk_baseline(x, False)), kind="baseline"),
                 Impl("full", lambda x: (lambda: topk_baseline(x, True)), kind="baseline", checked=False)]
        cpu_targets = CPU_TARGETS.get((d, V, M, Vf, dt), {})
        flops = 2 * M * V * d if M >= 16 else 0       # few rows: bandwidth-bound, no GFLOP/s column
        out.append(Case(FAMILY, "lm_head_topk", shape, nbytes, build, topk, check=logprob_check(dt, d),
                        targets=TARGETS if (d, V, M, Vf, dt) == GOAL else {},
                        cpu_targets=cpu_targets.get("lm_head_topk", {}), flops=flops))
        sample = kernel_impls(lambda x: fastverify.lm_head_sample(
            x["hidden"], x["weight"], temperature=x["temperature"], seed=x["seed"], positions=x["positions"],
            token_map=x["token_map"]))
        sample += [Impl("subset", lambda x: (lambda: sample_baseline(x, False)), kind="baseline", checked=False),
                   Impl("full", lambda x: (lambda: sample_baseline(x, True)), kind="baseline", checked=False)]
        out.append(Case(FAMILY, "lm_head_sample", shape, nbytes, build, sample, check=lambda o, r: exact(o[0], r[0]),
                        cpu_targets=cpu_targets.get("lm_head_sample", {}), flops=flops))
    return out
