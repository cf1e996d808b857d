"""The ``fastverify`` command.

    fastverify bench [--family rejection,tree_attention,lm_head,sparse_kv] [--size goal|grid|smoke]
                     [--backends torch,triton,cuda] [--no-baselines] [--out DIR]
    fastverify generate [--model smollm2|FOLDER|FILE.gguf] [--weights native|dequant] --prompt TEXT [--prompt ...]
                        [--method ar|chain|tree|selfspec] [--drafter layerskip|ngram|MODEL] [--temperature T]
                        [--max-new-tokens N] ...
    fastverify compare [--model ...] [--weights native|dequant] [--quick] [--max-new-tokens N] [--methods ...]
                       [--temperature T] [--no-hf] [--no-llama-cpp] [--no-memory] [--out DIR]
    fastverify info

Each subcommand is a ``_cmd_<name>(args) -> int`` registered in :func:`build_parser`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from typing import Optional, Sequence

from tqdm.auto import tqdm


def _csv(kind, allowed: Optional[Sequence] = None):
    """argparse type: comma-separated list of ``kind`` values, each in ``allowed``."""
    def parse(text: str):
        items = [kind(s.strip()) for s in text.split(",") if s.strip()]
        if not items:
            raise argparse.ArgumentTypeError("empty list")
        if allowed is not None:
            bad = [i for i in items if i not in allowed]
            if bad:
                raise argparse.ArgumentTypeError(f"{', '.join(map(str, bad))} not in {{{', '.join(allowed)}}}")
        return items
    return parse


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


# --------------------------------------------------------------------------- bench


def _add_bench(sub) -> None:
    from .bench import ADAPTERS, CPU_FAMILIES, FAMILIES, KERNEL_BACKENDS, SIZES
    p = sub.add_parser(
        "bench", help="time the ops against their baselines and write a report",
        description="Time each selected op family on the kernel backends of this device against its baselines "
                    "(rejection: eager and torch.compile'd torch pipelines; tree_attention: dense-mask SDPA and "
                    "FlexAttention; lm_head: unfused subset and full-vocabulary heads; sparse_kv: full decode "
                    "attention and gather-then-SDPA), stream one line per measurement and write "
                    "<out>/<name>.{md,json,png}. Speed is reported, never asserted.")
    p.add_argument("--family", type=_csv(str, FAMILIES + (ADAPTERS,) + CPU_FAMILIES), default=list(FAMILIES),
                   help=f"subset of {','.join(FAMILIES + (ADAPTERS,) + CPU_FAMILIES)} (default: the four op families; "
                        f"{ADAPTERS}: the engine entry points' cost over the raw ops; quant: the CPU projections "
                        "on GGUF quantized blocks)")
    p.add_argument("--size", choices=SIZES, default=None,
                   help="goal: the target shapes (default on a GPU); grid: a sweep (default on CPU: a CPU sweep); "
                        "smoke: tiny shapes, every backend (on CPU: Triton interpreter, CUDA emulator)")
    p.add_argument("--backends", type=_csv(str, KERNEL_BACKENDS), default=None,
                   help="kernel backends to time (default: torch, triton, cuda on a GPU; torch and cpu on CPU; "
                        "every backend with --size smoke)")
    p.add_argument("--no-baselines", action="store_true", help="time the kernel backends only")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    p.add_argument("--target-time", type=float, default=0.2, help="seconds of timed calls per row (default 0.2)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads(N) before measuring (CPU)")
    p.add_argument("--out", default=None, help="output folder (default: perf/results of the checkout)")
    p.add_argument("--name", default=None, help="file stem (default: bench-<device>)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    p.set_defaults(func=_cmd_bench)


def _log(msg: str) -> None:
    print(msg, flush=True)


def row_line(r) -> str:
    """One streamed line per measured row."""
    from .bench.report import fmt_us, fmt_x

    head = f"{r.family:14s} {r.op:22s} {r.shape:38s} {r.backend:24s}"
    if r.status != "ok":
        return f"{head} {r.status}: {r.reason}"
    s = f"{head} {fmt_us(r.median_us):>9s} µs"
    if r.gbps is not None:
        s += f" {r.gbps:8.1f} GB/s"
    if r.pct_of_bound is not None:
        s += f" {r.pct_of_bound:5.1f}% of bound"
    return s + "".join(f"  {fmt_x(x)} {b}" for b, x in r.speedup.items())


def default_results_dir():
    """perf/results of the source checkout when fastverify runs from one, else ./perf/results."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    if (repo / "perf").is_dir() and (repo / "fastverify").is_dir():
        return repo / "perf" / "results"
    return Path.cwd() / "perf" / "results"


def _cmd_bench(args) -> int:
    import torch

    from . import bench

    device = torch.device(args.device) if args.device else bench.default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    size = args.size or ("goal" if device.type == "cuda" else "grid")
    backends = args.backends or (list(bench.KERNEL_BACKENDS) if size == "smoke"
                                 else [b for b in bench.KERNEL_BACKENDS if b != "cpu"] if device.type == "cuda"
                                 else ["torch", "cpu"])
    cases = bench.cases(args.family, size, device)
    total = sum(1 for c in cases for i in c.impls
                if (i.kind == "kernel" and i.name in backends) or (i.kind != "kernel" and not args.no_baselines)
                or i.name == c.reference)
    _log(f"fastverify bench on {bench.core.device_name(device)}: {', '.join(args.family)} at size {size}, "
         f"{len(cases)} cases, {total} rows; backends {','.join(backends)}"
         + ("" if args.no_baselines else " + baselines"))
    meta = bench.machine(device)
    meta.update(command=args.command, size=size)
    t0 = time.perf_counter()
    bar = tqdm(total=total, unit="row", file=sys.stderr, dynamic_ncols=True)

    def on_row(r) -> None:
        bar.update(1)
        bar.write(row_line(r))

    rows = bench.core.run(cases, device, backends=backends, baselines=not args.no_baselines,
                          target_s=args.target_time, machine_info=meta, log=_log, on_row=on_row)
    bar.close()
    meta["elapsed_s"] = time.perf_counter() - t0
    paths = bench.report.write(meta, rows, args.out or default_results_dir(),
                               args.name or f"bench-{bench.core.device_slug(device)}", png=not args.no_plot)
    print()
    print(bench.report.render_markdown(meta, rows), flush=True)
    print("wrote " + ", ".join(str(p) for p in paths.values() if p is not None), flush=True)
    return 0


# --------------------------------------------------------------------------- generate / compare


def _add_model_args(p) -> None:
    p.add_argument("--model", default="smollm2",
                   help="smollm2 (the embedded SmolLM2-135M-Instruct, default), a Hugging Face checkpoint folder or "
                        "a .gguf file")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="weights and activations")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads(N) (CPU)")
    p.add_argument("--weights", default=None, choices=("native", "dequant"),
                   help="GGUF models: native keeps the file's quantized blocks and runs every projection on them "
                        "(CPU, fp32 activations; the default there), dequant expands them to --dtype (the default "
                        "on cuda or with --dtype bf16/fp16; Hugging Face folders are always dequant)")


def _add_decoding_args(p) -> None:
    p.add_argument("--num-draft", type=int, default=None,
                   help="chain: most drafted tokens per step (default 10 for ngram — as many as pay off, measured as "
                        "it runs — and 4 for model drafters)")
    p.add_argument("--tree-depth", type=int, default=None, help="tree: levels of the draft tree (default 5)")
    p.add_argument("--tree-topk", type=int, default=None, help="tree: children per expanded node (default 4)")
    p.add_argument("--tree-nodes", type=int, default=None, help="tree: node budget, root included (default 32)")
    p.add_argument("--tree-paths", type=int, default=None, metavar="N",
                   help="tree with a model drafter: N draft paths of --tree-depth tokens with their draft probabilities "
                        "(drawn without replacement for --verify block_wor, i.i.d. otherwise) instead of a top-k tree")
    p.add_argument("--verify", default=None, choices=("token", "block", "typical", "specinfer", "block_wor"),
                   help="verification rule. Chains: token, block (block verification; the default) or typical "
                        "(Medusa's typical acceptance: LOSSY). Trees: specinfer (default for top-k / n-gram trees), "
                        "block or block_wor (multi-path block verification of --tree-paths drafts; default "
                        "block)")
    p.add_argument("--typical-eps", type=float, default=None, help="typical: epsilon (default 0.09)")
    p.add_argument("--typical-delta", type=float, default=None, help="typical: delta (default 0.3)")
    p.add_argument("--draft-layers", type=_layer_list, default=None,
                   help="layerskip: layers the drafter runs, e.g. 0-9,11-29 (default: all but every third layer of "
                        "the middle half)")
    p.add_argument("--frspec-vocab", type=int, default=None, metavar="N",
                   help="model drafters: draft over the N most frequent tokens only (FR-Spec ranked head); "
                        "verification keeps the full vocabulary, so the output is unchanged")
    p.add_argument("--frspec-source", default=None, choices=("generated", "corpus"),
                   help="ranking for --frspec-vocab: token counts of text the model generates itself (default; "
                        "built once, a few minutes, then cached) or of the built-in corpus")
    p.add_argument("--frspec-ranking", default=None, metavar="PATH",
                   help="a saved ranking (fastverify.frspec.Ranking.save) instead of the default one")
    p.add_argument("--kv-budget", type=int, default=None, metavar="TOKENS",
                   help="selfspec: cache tokens a draft step attends to (default 256)")
    p.add_argument("--kv-policy", default=None, choices=("topk", "streaming"),
                   help="selfspec: chunks scored by q·mean(K) per KV head, re-selected every --kv-refresh drafts "
                        "(topk, default) or sinks + most recent (streaming)")
    p.add_argument("--kv-chunk", type=int, default=None, help="selfspec: tokens per chunk (default 16)")
    p.add_argument("--kv-refresh", type=int, default=None, help="selfspec topk: re-select every N drafts (default 8)")


def _layer_list(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b or a) + 1))
    return out


def _decoding_options(args, model=None) -> dict:
    """generate()'s options from the flags; ``--frspec-vocab`` resolves its ranking here
    (a saved one, or the model's cached default ranking from ``--frspec-source``)."""
    names = ("num_draft", "tree_depth", "tree_topk", "tree_nodes", "tree_paths", "verify", "typical_eps",
             "typical_delta", "draft_layers", "frspec_vocab", "kv_budget", "kv_policy", "kv_chunk", "kv_refresh")
    options = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    if options.get("frspec_vocab") and model is not None:
        from . import frspec
        options["frspec_ranking"] = (frspec.Ranking.load(args.frspec_ranking, model.tokenizer) if args.frspec_ranking
                                     else frspec.default_ranking(model, args.frspec_source or "generated"))
    return options


_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _device(args) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _check_weights(args) -> None:
    """``--weights native`` needs a GGUF file on the CPU in fp32: a clear error otherwise."""
    if args.weights != "native":
        return
    from .models.loaders import resolve_source

    source = resolve_source(args.model)
    if not str(source).endswith(".gguf"):
        raise ValueError(f"--weights native needs a .gguf model (its quantized blocks), got {args.model!r}; "
                         f"use --weights dequant or leave --weights out")
    device = _device(args)
    if not device.startswith("cpu"):
        raise ValueError(f"--weights native runs on the CPU only, got --device {device}; use --weights dequant")
    if args.dtype != "fp32":
        raise ValueError(f"--weights native runs with fp32 activations, got --dtype {args.dtype}; "
                         f"use --weights dequant")


def _weights(args) -> str:
    """The weights ``--model`` will load with: ``--weights``, else load()'s default (native for a
    GGUF on the CPU in fp32)."""
    if args.weights:
        return args.weights
    from .models.loaders import resolve_source

    gguf = args.model == "smollm2" or str(resolve_source(args.model)).endswith(".gguf")
    return "native" if gguf and args.dtype == "fp32" and _device(args).startswith("cpu") else "dequant"


def _load_model(args, weights: str | None = None):
    """The model of ``--model`` with ``weights`` (default: ``--weights``, else load()'s default)."""
    import torch

    from . import models

    _check_weights(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args)
    weights = weights or args.weights
    t0 = time.perf_counter()
    _log(f"loading {args.model} ({args.dtype}, {device}{f', {weights} weights' if weights else ''}) ...")
    model = models.load(args.model, weights=weights, dtype=getattr(torch, _DTYPES[args.dtype]), device=device)
    model.load_s = time.perf_counter() - t0
    c = model.config
    _log(f"loaded {c.arch}: {c.n_layers} layers, d={c.dim}, heads {c.n_heads}/{c.n_kv_heads}, vocab {c.vocab_size} "
         f"in {model.load_s:.1f}s")
    return model


def _drafter(args, model):
    if args.drafter in (None, "layerskip", "ngram", "selfspec", "eagle3", "medusa"):
        return args.drafter
    from . import models
    from .decoding.heads import is_head_checkpoint

    if is_head_checkpoint(args.drafter):
        return args.drafter   # an EAGLE-3 / Medusa folder: generate() loads it

    _log(f"loading drafter {args.drafter} ...")
    return models.load(args.drafter, dtype=model.dtype, device=model.device)  # generate() wraps it (and its head)


# `fastverify generate`'s method and drafter when --method is not given: the fastest
# fastverify method of the measured compare table on CPU (perf/results/compare-*-cpu.md:
# chain/ngram ahead of ar, tree/ngram and the layer-skip rows); revisit with new measurements.
DEFAULT_GENERATE_METHOD = ("chain", "ngram")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text with a decoding method, streaming it, then print statistics",
                       description="Generate continuations of the prompts (batched) with autoregressive, chain or "
                                   "tree speculative decoding. The first prompt's text streams as it is verified; "
                                   "the others print at the end, then a statistics table.")
    _add_model_args(p)
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    p.add_argument("--method", default=None, choices=("ar", "chain", "tree", "selfspec"),
                   help=f"default {DEFAULT_GENERATE_METHOD[0]} with {DEFAULT_GENERATE_METHOD[1]} drafts (the fastest "
                        f"measured method on CPU)")
    p.add_argument("--drafter", default=None,
                   help=f"layerskip (the default with an explicit --method), ngram (the default without --method: "
                        f"{DEFAULT_GENERATE_METHOD[0]}/{DEFAULT_GENERATE_METHOD[1]}), selfspec (with --method tree: "
                        f"a tree along the sparse-KV self-draft), eagle3 / medusa (the drafters trained for the model "
                        f"and shipped with fastverify; `fastverify train-drafter` makes them), an EAGLE-3 "
                        f"(speculators) or Medusa checkpoint folder, or a model (folder / .gguf) sharing the tokenizer")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="request b uses seed + b")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    _add_decoding_args(p)
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args) -> int:
    from .compare import describe_weights, model_info
    from .decoding import generate

    if args.method is None:
        args.method = DEFAULT_GENERATE_METHOD[0]
        args.drafter = args.drafter or DEFAULT_GENERATE_METHOD[1]
    model = _load_model(args)
    _log(f"weights: {describe_weights(model_info(model))}")
    drafter = _drafter(args, model)
    tok = model.tokenizer
    stream = tok.stream_decoder() if tok is not None else None
    n = len(args.prompt)
    bar = None if n == 1 else tqdm(total=n * args.max_new_tokens, unit="tok", file=sys.stderr, dynamic_ncols=True)

    def on_tokens(b, new):
        if bar is None:  # one prompt: stream its text as it is verified
            print(stream.push(new) if stream is not None else " ".join(map(str, new)), end="", flush=True)
        else:            # a batch: a progress bar, the texts at the end
            bar.update(len(new))

    what = args.method + (f" with {drafter or 'layerskip'} drafts" if args.method in ("chain", "tree") else "")
    if args.method == "selfspec" or drafter == "selfspec":
        what += f" over a {args.kv_budget or 256}-token {args.kv_policy or 'topk'} KV budget"
    if args.method != "ar" and args.frspec_vocab:
        what += f" over the {args.frspec_vocab} most frequent tokens"
    if args.method == "tree" and args.tree_paths:
        what += f" ({args.tree_paths} paths of {args.tree_depth or 5} tokens)"
    if args.method != "ar" and args.verify:
        what += f", verified by the {args.verify} rule" + (" (LOSSY: typical acceptance does not keep the target's "
                                                          "distribution)" if args.verify == "typical" else "")
    _log(f"generating up to {args.max_new_tokens} tokens for {n} prompt(s), {what}, temperature {args.temperature}\n")
    r = generate(model, args.prompt, method=args.method, drafter=drafter, max_new_tokens=args.max_new_tokens,
                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                 seed=[args.seed + b for b in range(n)], chat=not args.no_chat,
                 on_tokens=on_tokens, **_decoding_options(args, model))
    if bar is None:
        print(stream.flush() if stream is not None else "", flush=True)
    else:
        bar.close()
        for b, text in enumerate(r.texts):
            print(f"\n[prompt {b}] {args.prompt[b]}\n{text}", flush=True)
    s = r.stats
    sh = s.shares()
    print()
    print("| tokens | seconds | tokens/s | target forwards | tokens per forward | prefill | draft | verify | sample |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {s.new_tokens} | {s.seconds:.2f} | {s.tokens_per_s:.1f} | {s.steps} | {s.tokens_per_step:.2f} | "
          f"{sh['prefill']:.0%} | {sh['draft']:.0%} | {sh['verify']:.0%} | {sh['sample']:.0%} |", flush=True)
    if args.method != "ar":
        hist: dict[int, int] = {}
        for per_request in s.accepted:
            for a in per_request:
                hist[a] = hist.get(a, 0) + 1
        print("accepted drafts per step (count×steps): " + "  ".join(f"{a}×{hist[a]}" for a in sorted(hist)),
              flush=True)
    return 0


def _add_train_drafter(sub) -> None:
    p = sub.add_parser("train-drafter", help="train an EAGLE-3 or Medusa drafter for a model on this machine",
                       description="Train a drafter from the model's own answers: prompts built from the Python "
                                   "standard library's text (none of them a compare prompt), the model's answers "
                                   "and hidden states as data (kept under DIR/data, resumable), then EAGLE-3 with "
                                   "training-time test or Medusa heads (checkpoints every 5 minutes, resumable). "
                                   "Writes the drafter in the format engines load (speculators EAGLE-3 / Medusa) "
                                   "and DIR/training.json. The commands that made the committed SmolLM2 drafters "
                                   "are in docs/decoding.md (about 45 minutes of data, 55 of EAGLE-3 and 6 of "
                                   "Medusa training on 2 cores).")
    _add_model_args(p)
    p.add_argument("--kind", required=True, choices=("eagle3", "medusa"))
    p.add_argument("--out", required=True, metavar="DIR", help="where the drafter (and its data, state) go")
    p.add_argument("--samples", type=int, default=1600, help="prompts built from the library's text the model answers")
    p.add_argument("--self-instruct", type=int, default=640, metavar="N",
                   help="prompts the model writes itself (everyday requests) and then answers, besides --samples")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 1200 eagle3, 1000 medusa)")
    p.add_argument("--data", default=None, metavar="DIR", help="data folder (default DIR/data; share it between kinds)")
    p.add_argument("--draft-vocab", type=int, default=4096, help="tokens the drafter proposes (most frequent first)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--init", default=None, metavar="DIR", help="eagle3: start from this trained drafter (fine-tuning)")
    p.set_defaults(func=_cmd_train_drafter)


def _cmd_train_drafter(args) -> int:
    from .training import train_drafter

    model = _load_model(args)
    _log(f"training a {args.kind} drafter for {args.model} into {args.out}")
    summary = train_drafter(model, args.kind, args.out, samples=args.samples, self_instruct=args.self_instruct,
                            steps=args.steps, data_dir=args.data,
                            draft_vocab=args.draft_vocab, lr=args.lr, verifier=args.model, log=_log,
                            **({"init": args.init} if args.init else {}))
    print()
    print("| kind | samples | tokens | steps | data (s) | training (s) | held-out loss | agreement per depth |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    acc = summary.get("held_out_agreement") or summary.get("held_out_accuracy")
    print(f"| {summary['kind']} | {summary['samples']} | {summary['tokens']} | {summary['steps']} | "
          f"{summary['data_seconds']:.0f} | {summary['train_seconds']:.0f} | {summary['held_out_loss']:.3f} | "
          f"{' / '.join(f'{a:.2f}' for a in acc)} |")
    print(f"\nwrote {args.out} (load it with generate(..., drafter={args.out!r}) or --drafter {args.out})")
    return 0


def _add_compare(sub) -> None:
    from . import compare

    labels = [m[0] for m in compare.METHODS + compare.RULE_METHODS + compare.FP32_METHODS]
    p = sub.add_parser("compare", help="every decoding method vs transformers' generate (and llama.cpp) on the same "
                                       "prompts",
                       description="Run each decoding method (greedy, batch 1), Hugging Face transformers' generate "
                                   "(plain, prompt lookup, early-exit assisted) and, when llama-cpp-python is "
                                   "installed, llama.cpp on the same GGUF (plain and prompt lookup) on built-in "
                                   "summarising, code-editing, extraction and open prompts, same model, threads and "
                                   "machine; check every run's tokens against the autoregressive baseline; print a "
                                   "table and the winner and write <out>/compare-<device>.{md,json,png}. With a "
                                   "GGUF on the CPU in fp32, fastverify runs on the file's blocks (--weights "
                                   "native) and again, for ar and chain/ngram, on the file dequantized to fp32, "
                                   "the weights transformers runs on. The report adds the agreement of "
                                   "fastverify's greedy tokens with llama.cpp's and each engine's load time and "
                                   "memory (fresh processes). The full run takes about 10 minutes on 2 CPU cores; "
                                   "--quick about 2.")
    _add_model_args(p)
    p.add_argument("--quick", action="store_true",
                   help="only ar, chain/ngram (the best n-gram method), ar (fp32) with native weights, transformers' "
                        "generate and prompt lookup (and llama.cpp's two runs when installed)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0: greedy, every run checked token for token against ar (default). > 0: sampled runs of every "
                        "verification rule (chains: token, block, typical; multi-path trees: specinfer, block, "
                        "block_wor) beside sampled ar, transformers and llama.cpp; typical is marked LOSSY")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature)")
    p.add_argument("--methods", type=_csv(str, labels), default=None, help=",".join(labels))
    p.add_argument("--hf", type=_csv(str, compare.HF_METHODS), default=None, help=",".join(compare.HF_METHODS))
    p.add_argument("--no-hf", action="store_true", help="skip transformers' runs")
    p.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp's runs even when it is installed")
    p.add_argument("--no-memory", action="store_true",
                   help="skip the load time and memory table (one fresh process per engine, ~10 s each)")
    p.add_argument("--prompts", type=_csv(str, tuple(compare.PROMPTS)), default=list(compare.PROMPTS),
                   help=",".join(compare.PROMPTS))
    p.add_argument("--out", default=None, help="output folder (default: perf/results of the checkout)")
    p.add_argument("--name", default=None, help="file stem (default: compare-<device>, compare-quick-<device>)")
    _add_decoding_args(p)
    p.set_defaults(func=_cmd_compare)


def _cmd_compare(args) -> int:
    import torch

    from . import bench, compare

    native = _weights(args) == "native"
    sampled = args.temperature > 0
    catalog = compare.RULE_METHODS if sampled else compare.METHODS
    default = (compare.QUICK_RULE_METHODS if sampled else compare.QUICK_METHODS) if args.quick else \
        [m[0] for m in catalog]
    if native and not sampled:
        default = default + (compare.QUICK_FP32_METHODS if args.quick else [m[0] for m in compare.FP32_METHODS])
    chosen = list(dict.fromkeys(args.methods or default))
    fp32_labels = {m[0]: m for m in compare.FP32_METHODS}
    if not native and any(label in fp32_labels for label in chosen):
        raise ValueError(f"--methods {', '.join(lab for lab in chosen if lab in fp32_labels)}: fp32 rows run beside "
                         f"native weights only (a GGUF with --weights native); here every row is {args.dtype}")
    known = {m[0]: m for m in compare.METHODS + compare.RULE_METHODS}
    methods = [known[label] for label in chosen if label in known]
    fp32_methods = [fp32_labels[label] for label in chosen if label in fp32_labels]
    if not methods or methods[0][0] != "ar":
        methods = [compare.METHODS[0]] + methods  # the baseline every check refers to
    model = _load_model(args)
    if native and model.weights != "native":   # a GGUF without block-typed matrices (all F32 / F16)
        if args.methods and fp32_methods:
            raise ValueError(f"--methods {', '.join(m[0] for m in fp32_methods)}: {args.model} holds no quantized "
                             f"blocks, so every row already runs on float weights")
        native, fp32_methods = False, []
    methods, drafter_notes = compare.drafter_rows(model, methods)
    hf = [] if args.no_hf else (args.hf or (compare.QUICK_HF_METHODS if args.quick else compare.HF_METHODS))
    # the dequantized twin of a native model: fp32 rows and transformers' weights
    fp32_model = _load_model(args, weights="dequant") if native and (fp32_methods or hf) else None
    why_no_llama = "skipped (--no-llama-cpp)" if args.no_llama_cpp else compare.llama_cpp_available(model)
    llama = [] if why_no_llama else compare.LLAMA_CPP_METHODS
    prompts = {k: compare.PROMPTS[k] for k in args.prompts}
    device = bench.device_name(model.device)
    how = f"temperature {args.temperature}, seed {args.seed}" if sampled else "greedy"
    _log(f"compare on {device}: {len(methods)} fastverify methods ({model.weights} weights)"
         + (f" + {len(fp32_methods)} on fp32 weights" if fp32_methods else "")
         + f" + {len(hf)} transformers + {len(llama)} llama.cpp runs x {len(prompts)} prompts, {how}, "
           f"{args.max_new_tokens} new tokens, {torch.get_num_threads()} threads"
         + (f"\nllama.cpp: {why_no_llama}" if why_no_llama else ""))
    report = compare.run(model, prompts=prompts, methods=methods, hf_methods=hf, llama_methods=llama,
                         fp32_model=fp32_model, fp32_methods=fp32_methods,
                         max_new_tokens=args.max_new_tokens, options=_decoding_options(args, model),
                         temperature=args.temperature, seed=args.seed)
    for m in (model, fp32_model):
        if m is not None and m.weights in report["models"]:
            report["models"][m.weights]["load_s"] = m.load_s   # in this process, library already loaded
    del fp32_model
    if not args.no_memory:
        kinds = [k for k in compare.MEMORY_KINDS if k != "llama.cpp" or llama] if report["file"] else None
        _log(f"measuring load time and memory: {', '.join(kinds or ['fastverify fp32'])}, one fresh process each ...")
        report["memory"] = compare.measure_memory(model.source, torch.get_num_threads(), kinds)
        report["memory_threads"] = torch.get_num_threads()
    report["notes"] = drafter_notes + ([f"llama.cpp rows: not run — {why_no_llama}."] if why_no_llama else [])
    report["title"] = f"fastverify compare — {args.model}, {args.dtype}, {model.weights} weights, {device}"
    report["header"] = (f"# {report['title']}\n\ncommand: `{args.command}`  \nversions: "
                        + ", ".join(f"{k} {v}" for k, v in bench.versions().items())
                        + f"  \ngit: {bench.git_revision()}  \nmachine: {device}; "
                          f"{how}, batch 1, up to {args.max_new_tokens} new tokens per prompt\n\n")
    slug = bench.core.device_slug(model.device) + (f"-t{args.temperature:g}" if sampled else "")
    stem = args.name or (f"compare-quick-{slug}" if args.quick else f"compare-{slug}")
    paths = compare.write_report(report, os.path.join(args.out or default_results_dir(), stem))
    print()
    print(compare.render_markdown(report), flush=True)
    for r in report["rows"]:
        if r["label"].startswith("llama.cpp"):
            continue
        for name, pos, margin in r["divergences"]:
            print(f"DIVERGED: {r['label']} on {name} at token {pos} (ar top-2 margin {margin:.3g})", flush=True)
        for name, pos, margin in r["ties"]:
            print(f"near-tie: {r['label']} on {name} at token {pos} (ar top-2 margin {margin:.3g})", flush=True)
    print("wrote " + ", ".join(paths), flush=True)
    checked = [r for r in report["rows"] if not r["label"].startswith("llama.cpp")]   # llama.cpp: its own weights
    return 1 if any(r["divergences"] for r in checked) else 0


# --------------------------------------------------------------------------- info


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="versions, device, backends and the CUDA extension's state",
                       description="Print versions, the device, the backend each op would use, the CPU kernels' "
                                   "build (built if needed: seconds) and whether the CUDA extension is built / "
                                   "loadable (never builds it).")
    p.set_defaults(func=_cmd_info)


def _cuda_extension_state() -> list[str]:
    """Lines on the CUDA extension without building it: the loader module, an
    ahead-of-time build (fastverify._C) and whether it imports."""
    import importlib
    import importlib.util

    lines = []
    loader = importlib.util.find_spec("fastverify._cuda")
    lines.append(f"cuda loader (fastverify/_cuda.py): {'present' if loader else 'missing'}")
    aot = importlib.util.find_spec("fastverify._C")
    if aot is None:
        lines.append("cuda extension, ahead-of-time build (fastverify._C): not built "
                     "(JIT-built with ninja on first use on a CUDA machine)")
    else:
        try:
            importlib.import_module("fastverify._C")
            lines.append(f"cuda extension, ahead-of-time build (fastverify._C): built and loadable ({aot.origin})")
        except Exception as e:  # noqa: BLE001
            msg = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            lines.append(f"cuda extension, ahead-of-time build (fastverify._C): built, NOT loadable ({msg})")
    if loader is not None:
        try:
            importlib.import_module("fastverify._cuda")   # importing never compiles (DESIGN.md)
        except Exception as e:  # noqa: BLE001
            lines.append(f"fastverify._cuda: import failed ({type(e).__name__}: {e})"[:240])
    return lines


def _cmd_info(args) -> int:
    import torch

    import fastverify
    from . import _backend, bench

    v = bench.versions()
    print("fastverify " + v.pop("fastverify"))
    print("versions: " + ", ".join(f"{k} {val}" for k, val in v.items()))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            print(f"device cuda:{i}: {props.name}, sm_{props.major}{props.minor}, "
                  f"{props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs")
    else:
        print("device: no CUDA device; " + bench.device_name("cpu"))
    print(f"backend on CUDA tensors: {fastverify.get_backend('cuda')}; on CPU tensors: {fastverify.get_backend('cpu')}"
          + (f" (FASTVERIFY_BACKEND={os.environ['FASTVERIFY_BACKEND']})" if os.environ.get("FASTVERIFY_BACKEND")
             else ""))
    print(f"value checks on CUDA tensors: {'on' if os.environ.get('FASTVERIFY_CHECKS', '0') not in ('', '0') else 'off'}"
          f"; Triton interpreter: {'on' if _backend.triton_interpreting() else 'off'}")
    print(_cpu_library_state())
    for line in _cuda_extension_state():
        print(line)
    return 0


def _cpu_library_state() -> str:
    """One line on the cpu backend's C++ library (builds it on first use: seconds)."""
    from . import cpu

    if not cpu.available():
        return "cpu kernels (csrc/cpu): NOT available — CPU tensors run the torch backend"
    return (f"cpu kernels (csrc/cpu): built for FASTVERIFY_CPU_ISA={cpu.isa()}, paths "
            f"{', '.join(cpu.features()) or 'portable C++'} ({cpu.library()._name})")


# --------------------------------------------------------------------------- main


def build_parser(prog: str = "fastverify") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="fastverify: kernels for speculative-decoding "
                                                            "verification.")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND")
    sub.required = True
    _add_generate(sub)
    _add_compare(sub)
    _add_train_drafter(sub)
    _add_bench(sub)
    _add_info(sub)
    return parser


def _invocation() -> str:
    arg0 = sys.argv[0] if sys.argv else ""
    if arg0.endswith("__main__.py"):
        return "python -m fastverify"
    if os.path.basename(arg0) == "fastverify":
        return "fastverify"
    return "python " + arg0 if arg0.endswith(".py") else "fastverify"


def main(argv: Optional[Sequence[str]] = None, command: Optional[str] = None) -> int:
    """Entry point of the ``fastverify`` console script and ``python -m fastverify``.
    ``command``: the command line to record in reports (default: rebuilt from sys.argv)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command = command or " ".join([_invocation()] + [shlex.quote(a) for a in argv])
    started = time.perf_counter()
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # bad input: the message names it; no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted after {_hms(time.perf_counter() - started)}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
