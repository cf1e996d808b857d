"""Self-speculation with a sparse KV cache on the real model: acceptance and speed
against the KV budget and policy at long context, with the cost model's prediction:

    python perf/selfspec_e2e.py [--contexts 1024,4096,8000] [--budgets 64,256,1024,2048]
                                [--policies streaming,topk] [--batch 1] [--gamma 4] [--new 32]
                                [--tree-topk K] [--tag NAME]

For each context length a prompt of that many tokens (text of the built-in FR-Spec
corpus — Python's reference documentation — then a request to continue) is decoded greedily, autoregressively and with
``method="selfspec"`` for every (budget, policy). Reported per run: tokens/s, tokens per
target forward τ = 1 + mean accepted, the per-draft acceptance rate α (solved from τ
for a chain of γ drafts), the measured draft/verify step times, and MagicDec's cost
model T_SD/T_AR = (γ·T_D/T_T + T_V/T_T) / Ω, Ω = (1 − α^(γ+1)) / (1 − α), beside the
measured ratio. With ``--tree-topk K`` each (budget, policy) also runs as a tree
(``method="tree", drafter="selfspec"``: the draft's top K tokens at each of γ levels
along the sparse chain, at most 16 nodes), reported by τ and tokens/s (the chain cost
model does not apply). Writes perf/results/selfspec-b<batch>-<device>[-<tag>].{md,json,png} (stable names: the latest run replaces the last).
"""

import argparse
import json
import os
import sys
import time

import torch

from fastverify import bench, compare, frspec
from fastverify.decoding import generate
from fastverify.models import load



def decode_tokens_per_s(stats) -> float:
    """Tokens per second of the decoding steps (prefill excluded: it is the same for every method)."""
    t = stats.seconds - stats.prefill_s
    return stats.new_tokens / t if t > 0 else 0.0


def alpha_from_tau(tau: float, gamma: int) -> float:
    """α with 1 + α + … + α^γ = τ (bisection)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if sum(mid ** i for i in range(gamma + 1)) < tau:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--contexts", default="1024,4096,8000")
    p.add_argument("--budgets", default="64,256,1024,2048")
    p.add_argument("--policies", default="streaming,topk")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--tree-topk", type=int, default=0, help="also verify trees of the top K drafts per level")
    p.add_argument("--tag", default="", help="suffix of the results file name")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load(args.model)
    tok = model.tokenizer
    document: list[int] = []
    for text in frspec.builtin_corpus():
        document += tok.encode(text, add_bos=False)
        if len(document) > 10000:
            break
    rows = []
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    for ctx in (int(c) for c in args.contexts.split(",")):
        ids = (document[:ctx - 8] + tok.encode("\n\nContinue:", add_bos=False))[:ctx]
        prompts = [ids] * args.batch
        t0 = time.perf_counter()
        ar = generate(model, prompts, max_new_tokens=args.new, stop_at_eos=False)
        ar_step = (ar.stats.verify_s + ar.stats.sample_s) / max(ar.stats.steps, 1)
        ar_tps = decode_tokens_per_s(ar.stats)
        log(f"context {ctx}: ar {ar_tps:.1f} tok/s, step {ar_step * 1e3:.1f} ms "
            f"({time.perf_counter() - t0:.0f}s with prefill)")
        rows.append(dict(context=ctx, policy="ar", budget=None, tokens_per_s=ar_tps, tau=1.0,
                         alpha=None, step_ms=ar_step * 1e3, same=True))
        for policy in args.policies.split(","):
            for budget in (int(b) for b in args.budgets.split(",")):
                if budget >= ctx:
                    continue
                r = generate(model, prompts, method="selfspec", num_draft=args.gamma, kv_policy=policy,
                             kv_budget=budget, max_new_tokens=args.new, stop_at_eos=False)
                s = r.stats
                tau = s.tokens_per_step
                alpha = alpha_from_tau(tau, args.gamma)
                t_draft = s.draft_s / max(s.steps * args.gamma, 1)           # one draft forward
                t_verify = (s.verify_s + s.sample_s) / max(s.steps, 1)       # one verification
                omega = sum(alpha ** i for i in range(args.gamma + 1))
                predicted = (args.gamma * t_draft / ar_step + t_verify / ar_step) / omega
                tps = decode_tokens_per_s(s)
                measured = ar_tps / tps if tps else float("nan")
                rows.append(dict(context=ctx, policy=policy, budget=budget, tokens_per_s=tps, tau=tau,
                                 alpha=alpha, draft_ms=t_draft * 1e3, verify_ms=t_verify * 1e3,
                                 predicted_time_ratio=predicted, measured_time_ratio=measured,
                                 same=r.tokens == ar.tokens))
                log(f"  {policy:9s} budget {budget:5d}: {tps:5.1f} tok/s  τ {tau:.2f}  α {alpha:.2f}  "
                    f"draft {t_draft * 1e3:.1f} ms verify {t_verify * 1e3:.1f} ms  T_SD/T_AR predicted "
                    f"{predicted:.2f} measured {measured:.2f}  same tokens: {r.tokens == ar.tokens}")
                if args.tree_topk:
                    r = generate(model, prompts, method="tree", drafter="selfspec", tree_depth=args.gamma,
                                 tree_topk=args.tree_topk, tree_nodes=min(16, args.gamma * args.tree_topk + 1),
                                 kv_policy=policy, kv_budget=budget, max_new_tokens=args.new, stop_at_eos=False)
                    s = r.stats
                    tps = decode_tokens_per_s(s)
                    rows.append(dict(context=ctx, policy=f"{policy} tree", budget=budget, tokens_per_s=tps,
                                     tau=s.tokens_per_step, alpha=None,
                                     draft_ms=s.draft_s / max(s.steps * args.gamma, 1) * 1e3,
                                     verify_ms=(s.verify_s + s.sample_s) / max(s.steps, 1) * 1e3,
                                     predicted_time_ratio=None, measured_time_ratio=ar_tps / tps if tps else None,
                                     same=r.tokens == ar.tokens))
                    log(f"  {policy:9s} budget {budget:5d} tree (top {args.tree_topk}): {tps:5.1f} tok/s  "
                        f"τ {s.tokens_per_step:.2f}  same tokens: {r.tokens == ar.tokens}")
    device = bench.device_name(model.device)
    lines = [f"# Self-speculation with a sparse KV cache — {args.model}, fp32, {device}", "",
             f"command: `python perf/selfspec_e2e.py {' '.join(sys.argv[1:])}`  ", f"git: {bench.git_revision()}  ",
             f"greedy, batch {args.batch}, γ = {args.gamma} drafts per step, {args.new} new tokens, chunk 16, "
             f"{torch.get_num_threads()} threads; tokens/s of the decoding steps (prefill excluded)", "",
             "| context | policy | KV budget | tokens/s | τ (tokens/forward) | α | draft ms | verify ms "
             "| T_SD/T_AR predicted | measured | same tokens as ar |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r["policy"] == "ar":
            lines.append(f"| {r['context']} | ar | – | {r['tokens_per_s']:.1f} | 1.00 | – | – | {r['step_ms']:.1f} "
                         "| 1.00 | 1.00 | – |")
        elif r["alpha"] is None:  # a tree: no chain cost model
            lines.append(f"| {r['context']} | {r['policy']} | {r['budget']} | {r['tokens_per_s']:.1f} | {r['tau']:.2f} "
                         f"| – | {r['draft_ms']:.1f} | {r['verify_ms']:.1f} | – | {r['measured_time_ratio']:.2f} "
                         f"| {r['same']} |")
        else:
            lines.append(f"| {r['context']} | {r['policy']} | {r['budget']} | {r['tokens_per_s']:.1f} | {r['tau']:.2f} "
                         f"| {r['alpha']:.2f} | {r['draft_ms']:.1f} | {r['verify_ms']:.1f} "
                         f"| {r['predicted_time_ratio']:.2f} | {r['measured_time_ratio']:.2f} | {r['same']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    slug = bench.core.device_slug(model.device)
    stem = os.path.join(args.out, f"selfspec-b{args.batch}-{slug}" + (f"-{args.tag}" if args.tag else ""))
    os.makedirs(args.out, exist_ok=True)
    compare._atomic_write(stem + ".md", text.encode())
    compare._atomic_write(stem + ".json", json.dumps(rows, indent=2).encode())
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for ctx in sorted({r["context"] for r in rows}):
            for policy, style in (("streaming", "--"), ("topk", "-")):
                pts = [(r["budget"], r["alpha"]) for r in rows if r["context"] == ctx and r["policy"] == policy]
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", label=f"{ctx} tokens, {policy}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("KV budget (tokens)")
        ax.set_ylabel("acceptance rate α")
        ax.legend(fontsize=7)
        ax.set_title("self-speculation acceptance vs KV budget", fontsize=9)
        fig.tight_layout()
        fig.savefig(stem + ".png.tmp", format="png", dpi=120)
        os.replace(stem + ".png.tmp", stem + ".png")
    except ImportError:
        pass
    print("wrote " + stem + ".{md,json,png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
