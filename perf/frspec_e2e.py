"""FR-Spec end to end on the real model: layer-skip drafting with the full LM head and with
ranked heads of 4k / 8k / 16k tokens, the ranking counted from text the model generated
itself and from the built-in corpus; greedy, batch 1, the prompts of ``fastverify compare``:

    python perf/frspec_e2e.py [--method chain|tree] [--sizes 4096,8192,16384] [--max-new-tokens 64] [--threads N]

Prints a markdown table (tokens/s, tokens per target forward, speedup against the full
head, same tokens as AR) and writes perf/results/frspec-<method>-<device>.{md,json,png} (a stable name: the latest run replaces the last).
The rankings are built once and cached (``fastverify.frspec.default_ranking``).
"""

import argparse
import os
import sys
import time

import torch

from fastverify import bench, compare, frspec
from fastverify.models import load


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--method", default="chain", choices=("chain", "tree"))
    p.add_argument("--sizes", default="4096,8192,16384")
    p.add_argument("--sources", default="generated,corpus")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load(args.model)
    rankings = {}
    for source in args.sources.split(","):
        t0 = time.perf_counter()
        rankings[source] = frspec.default_ranking(model, source)
        print(f"ranking from {source}: {rankings[source].num_tokens} tokens counted, "
              f"{time.perf_counter() - t0:.0f}s (cached after the first run)", file=sys.stderr, flush=True)
    m = args.method
    methods = [("ar", "ar", None), (f"{m}/layerskip full head", m, "layerskip")]
    coverage = {}
    for source, ranking in rankings.items():
        for n in (int(s) for s in args.sizes.split(",")):
            label = f"{m}/layerskip {n // 1024}k {source}"
            methods.append((label, m, "layerskip", {"frspec_vocab": n, "frspec_ranking": ranking}))
            coverage[label] = ranking.coverage(n)
    report = compare.run(model, methods=methods, hf_methods=[], max_new_tokens=args.max_new_tokens,
                         log=lambda s: print(s, file=sys.stderr, flush=True))
    device = bench.device_name(model.device)
    report["title"] = f"FR-Spec ranked drafter head — {args.model}, fp32, {device}"
    report["coverage"] = coverage
    report["header"] = (f"# {report['title']}\n\ncommand: `python perf/frspec_e2e.py {' '.join(sys.argv[1:])}`  \n"
                        f"git: {bench.git_revision()}  \ngreedy, batch 1, up to {args.max_new_tokens} new tokens per "
                        f"prompt, {torch.get_num_threads()} threads. Coverage = share of the ranking's counted "
                        "tokens inside the subset: "
                        + ", ".join(f"{k.split(' ', 1)[1]} {v:.1%}" for k, v in coverage.items()) + "\n\n")
    slug = bench.core.device_slug(model.device)
    paths = compare.write_report(report, os.path.join(args.out, f"frspec-{m}-{slug}"))
    print(compare.render_markdown(report))
    print("wrote " + ", ".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
