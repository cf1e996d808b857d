"""The verification rules on the real model: tokens per target forward and tokens/s of each
rule on the same drafts, prompts and seeds:

    python perf/verify_rules_e2e.py [--temperatures 0.7,1.0] [--chain 4,8] [--paths 2,3,4] [--depth 4]
                                    [--seeds 0,1] [--new 64] [--tag NAME]

SmolLM2-135M (the embedded GGUF, fp32), the layer-skip drafter with its real draft
probabilities, the four prompts of ``fastverify compare``, batch 1, each prompt with every
seed. Per temperature:

- ``ar``: one token per target forward (the baseline of tokens/s);
- chains of K drafts verified by ``token``, ``block`` and ``typical`` (lossy: Medusa's
  typical acceptance, ε = 0.09, δ = 0.3);
- n paths of ``--depth`` tokens verified by ``specinfer`` (recursive rejection over the
  trie of n i.i.d. paths), ``block`` (greedy multi-path block verification of the same
  kind of drafts: i.i.d. paths) and ``block_wor`` (paths drawn without replacement by
  stochastic beam search).

Rules of one row group see drafts from the same drafter, prompts and seeds; the drafts
themselves differ once an earlier step accepted differently. Writes
perf/results/verify-rules-<device>[-<tag>].{md,json,png}.
"""

import argparse
import json
import os
import sys
import time

import torch

from fastverify import bench, compare
from fastverify.decoding import encode_prompts, generate
from fastverify.models import load


def runs(chain_ks, paths_ns, depth):
    """(group, label, generate() options) of every run at one temperature."""
    out = [("ar", "ar", dict(method="ar"))]
    for k in chain_ks:
        for rule in ("token", "block", "typical"):
            out.append((f"chain K={k}", rule, dict(method="chain", drafter="layerskip", num_draft=k, verify=rule,
                                                    adaptive=False)))
    for n in paths_ns:
        for rule in ("specinfer", "block", "block_wor"):
            out.append((f"{n} paths x {depth}", rule, dict(method="tree", drafter="layerskip", tree_paths=n,
                                                          tree_depth=depth, verify=rule)))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--temperatures", default="0.7,1.0")
    p.add_argument("--chain", default="4,8", help="draft lengths K of the chain runs")
    p.add_argument("--paths", default="2,3,4", help="numbers of paths n of the multi-path runs")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--tag", default="")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load(args.model)
    prompts = encode_prompts(model, list(compare.PROMPTS.values()))
    seeds = [int(s) for s in args.seeds.split(",")]
    plan = runs([int(k) for k in args.chain.split(",")], [int(n) for n in args.paths.split(",")], args.depth)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    generate(model, [prompts[0]], max_new_tokens=4)                  # warm up kernels and allocator
    rows = []
    started = time.perf_counter()
    for temperature in (float(t) for t in args.temperatures.split(",")):
        for group, rule, options in plan:
            tokens = steps = accepted = 0
            seconds = draft_s = verify_s = sample_s = prefill_s = 0.0
            for prompt in prompts:
                for seed in seeds:
                    r = generate(model, [prompt], max_new_tokens=args.new, temperature=temperature, seed=seed,
                                 **options)
                    s = r.stats
                    tokens += s.new_tokens
                    steps += s.steps
                    accepted += sum(s.accepted[0])
                    seconds += s.seconds
                    draft_s += s.draft_s
                    verify_s += s.verify_s
                    sample_s += s.sample_s
                    prefill_s += s.prefill_s
            decode_s = seconds - prefill_s
            row = dict(temperature=temperature, group=group, rule=rule, tokens=tokens, steps=steps,
                       tokens_per_step=tokens / steps if steps else float("nan"),
                       tokens_per_s=tokens / decode_s if decode_s > 0 else 0.0, seconds=seconds, prefill_s=prefill_s,
                       draft_share=draft_s / decode_s, verify_share=verify_s / decode_s,
                       sample_share=sample_s / decode_s, lossy=rule == "typical")
            rows.append(row)
            log(f"T={temperature:<4} {group:<14} {rule:<10} {row['tokens_per_step']:5.2f} tokens/forward "
                f"{row['tokens_per_s']:6.1f} tok/s  (draft {row['draft_share']:.0%}, sample "
                f"{row['sample_share']:.0%})  [{time.perf_counter() - started:.0f}s]")
    report = dict(rows=rows, model=args.model, prompts=list(compare.PROMPTS), seeds=seeds, new_tokens=args.new,
                  depth=args.depth, threads=torch.get_num_threads(), device=bench.device_name(model.device),
                  versions=bench.versions(), git=bench.git_revision(), command="python " + " ".join(sys.argv),
                  elapsed_s=time.perf_counter() - started)
    stem = os.path.join(args.out, f"verify-rules-{bench.core.device_slug(model.device)}"
                        + (f"-{args.tag}" if args.tag else ""))
    os.makedirs(args.out, exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=2)
    md = render(report)
    with open(stem + ".md", "w") as f:
        f.write(md + "\n")
    plot(report, stem + ".png")
    print(md)
    return 0


def render(report: dict) -> str:
    lines = [f"# Verification rules on {report['model']} — {report['device']}", "",
             f"command: `{report['command']}`  ", f"git: {report['git']}  ",
             f"{len(report['prompts'])} prompts x seeds {report['seeds']}, {report['new_tokens']} new tokens each, "
             f"batch 1, {report['threads']} threads, layer-skip drafter with its draft probabilities; tokens/s "
             "excludes prefill (the same for every rule). `typical` is LOSSY (Medusa's typical acceptance, "
             "ε 0.09, δ 0.3); every other rule emits the target's law.", ""]
    for temperature in sorted({r["temperature"] for r in report["rows"]}):
        rows = [r for r in report["rows"] if r["temperature"] == temperature]
        ar = next(r for r in rows if r["rule"] == "ar")
        lines += [f"## temperature {temperature}", "",
                  "| drafts | rule | tokens per target forward | vs first rule of the group | tokens/s | vs ar "
                  "| draft / verify / sample share |", "|---|---|---:|---:|---:|---:|---|"]
        first: dict = {}
        for r in rows:
            base = first.setdefault(r["group"], r)
            gain = (f"{r['tokens_per_step'] - base['tokens_per_step']:+.2f}" if r is not base else "–")
            rule = r["rule"] + (" (LOSSY)" if r["lossy"] else "")
            lines.append(f"| {r['group']} | {rule} | {r['tokens_per_step']:.2f} | {gain} | {r['tokens_per_s']:.1f} | "
                         f"{r['tokens_per_s'] / ar['tokens_per_s']:.2f}× | {r['draft_share']:.0%} / "
                         f"{r['verify_share']:.0%} / {r['sample_share']:.0%} |")
        lines.append("")
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    temps = sorted({r["temperature"] for r in report["rows"]})
    fig, axes = plt.subplots(1, len(temps), figsize=(6 * len(temps), 4.5), squeeze=False)
    colors = {"token": "tab:blue", "block": "tab:green", "typical": "tab:red", "specinfer": "tab:blue",
              "block_wor": "tab:olive", "ar": "tab:gray"}
    for ax, temperature in zip(axes[0], temps):
        rows = [r for r in report["rows"] if r["temperature"] == temperature]
        labels = [f"{r['group']} {r['rule']}" for r in rows]
        ax.barh(labels[::-1], [r["tokens_per_step"] for r in rows][::-1],
                color=[colors.get(r["rule"], "tab:gray") for r in rows][::-1])
        ax.set_xlabel("tokens per target forward")
        ax.set_title(f"temperature {temperature} (red: typical, lossy)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
