"""The ``fastverify`` command.

    fastverify bench [--quick] [--family rejection,attention] [--ops chain,tree] [--backends ...]
                     [--prefix ...] [--nodes ...] [--dtype ...] [--out DIR]
    fastverify info

Each subcommand is a ``_cmd_<name>(args) -> int`` registered in :func:`build_parser`;
more (``generate``, ``compare``) plug in the same way.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from typing import Optional, Sequence


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


FAMILIES = ("rejection", "attention")


def _add_bench(sub) -> None:
    from . import bench, bench_attention
    p = sub.add_parser(
        "bench", help="time the ops against the torch baselines and write a report",
        description="Time the ops of each selected family on every backend of this device against the torch "
                    "baselines, stream one line per measurement and write one report per family. rejection: "
                    "rejection_sample / tree_rejection_sample vs the eager and torch.compile'd torch pipelines → "
                    "<out>/<device>-<yyyymmdd>.{md,json,png}; attention: tree_attention vs gather + dense-mask SDPA "
                    "and compiled FlexAttention → <out>/<device>-<yyyymmdd>-attention.{md,json,png}. Speed is "
                    "reported, never asserted.")
    p.add_argument("--family", type=_csv(str, FAMILIES), default=list(FAMILIES),
                   help="rejection,attention (default: both, in that order)")
    p.add_argument("--quick", action="store_true",
                   help="small grid (rejection — CPU: B 1,8 K 4 V 32000 fp32; GPU: B 1,64 K 4 V 128256 bf16; "
                        "attention — CPU: B 1,4 P 512 n 8 fp32; GPU: B 8 P 8192 n 64 + B 1 P 1024 n 8, bf16)")
    p.add_argument("--ops", type=_csv(str, bench.OPS), default=list(bench.OPS),
                   help="rejection family: chain,tree (default: both)")
    p.add_argument("--backends", type=_csv(str, bench.ALL_BACKENDS), default=None,
                   help="rejection family: subset of eager,compiled,torch,triton,cuda (default: all that run on the "
                        "device)")
    p.add_argument("--attn-backends", type=_csv(str, bench_attention.ALL_BACKENDS), default=None,
                   help="attention family: subset of sdpa,flex,torch,triton,cuda (default: all that run on the device)")
    p.add_argument("--dtype", type=_csv(str, tuple(bench.DTYPES)), default=None,
                   help="dtypes of the logits (rejection) and of q/K/V (attention), e.g. bf16,fp32 (default: the "
                        "grid's)")
    p.add_argument("-B", "--batch", type=_csv(int), default=None,
                   help="override the grid's batch sizes (both families), e.g. 1,64")
    p.add_argument("-K", "--drafts", type=_csv(int), default=None,
                   help="rejection family: override the grid's draft lengths / depths")
    p.add_argument("-V", "--vocab", type=_csv(int), default=None,
                   help="rejection family: override the grid's vocabulary sizes")
    p.add_argument("--prefix", type=_csv(int), default=None,
                   help="attention family: override the grid's prefix lengths P, e.g. 1024,8192")
    p.add_argument("--nodes", type=_csv(int), default=None,
                   help="attention family: override the grid's tree sizes n, e.g. 8,64")
    p.add_argument("--greedy", action="store_true", help="rejection family: temperature 0 for every request "
                                                         "(default 1.0)")
    p.add_argument("--draft-probs", action="store_true", help="chain op with draft_probs [N, V] (default: without)")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    p.add_argument("--target-time", type=float, default=0.0,
                   help="seconds of timed calls per measurement (default 0.2 on CUDA, 0.3 on CPU)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch.set_num_threads(N) before measuring (CPU; default: torch's choice)")
    p.add_argument("--no-launches", action="store_true",
                   help="rejection family: skip counting kernel launches at B=1 (CUDA)")
    p.add_argument("--out", default=None, help="output folder (default: perf/results of the checkout)")
    p.add_argument("--name", default=None,
                   help="file stem of the outputs (default: <device-slug>-<yyyymmdd>; the attention report adds "
                        "-attention)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    p.set_defaults(func=_cmd_bench)


def _progress(result_line):
    """on_result callback: [i/N] line elapsed ETA, streamed."""
    def on_result(done: int, total: int, r, elapsed: float) -> None:
        eta = elapsed / done * (total - done)
        width = len(str(total))
        print(f"[{done:>{width}}/{total}] {result_line(r)}   elapsed {_hms(elapsed)} ETA {_hms(eta)}", flush=True)
    return on_result


def _log(msg: str) -> None:
    print(msg, flush=True)


def _cmd_bench(args) -> int:
    import torch

    from . import bench

    device = torch.device(args.device) if args.device else bench.default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    families = [f for f in FAMILIES if f in args.family]
    if "rejection" not in families:
        given = [flag for flag, val in (("-K", args.drafts), ("-V", args.vocab), ("--backends", args.backends),
                                        ("--greedy", args.greedy), ("--draft-probs", args.draft_probs))
                 if val]
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            print(f"note: {', '.join(given)} {verb} to the rejection family only, which is not selected", flush=True)
    if "attention" not in families and (args.prefix or args.nodes or args.attn_backends):
        print("note: --prefix / --nodes / --attn-backends apply to the attention family only, which is not "
              "selected", flush=True)
    finished = []                        # (render_markdown, report, paths) printed at the end
    bw = None
    if "rejection" in families:
        finished.append(_bench_rejection(args, device))
        m = finished[-1][1].meta         # one bound for both reports of the run
        bw = {"peak": m["peak_bytes_per_s"], "source": m["peak_source"], "copy": m["copy_bytes_per_s"]}
    if "attention" in families:
        if finished:
            print(flush=True)
        finished.append(_bench_attention(args, device, bw))
    for render, report, paths in finished:
        print()
        print(render(report), flush=True)
        print("wrote " + ", ".join(str(p) for p in paths.values() if p is not None), flush=True)
    return 0


def _bench_rejection(args, device):
    from . import bench

    grid = bench.default_grid(device, args.quick)
    for key, val in (("B", args.batch), ("K", args.drafts), ("V", args.vocab), ("dtype", args.dtype)):
        if val:
            grid[key] = tuple(val)
    opts = bench.Options(device=device, ops=tuple(args.ops), backends=args.backends, grid=grid, quick=args.quick,
                         greedy=args.greedy, draft_probs=args.draft_probs, target_s=args.target_time,
                         launches=not args.no_launches, threads=args.threads)
    if args.draft_probs and "tree" in opts.ops:
        print("note: --draft-probs applies to the chain op only; the tree op is timed without", flush=True)
    n_cfg = len(bench.configs(grid))
    _log(f"fastverify bench on {bench.device_name(device)}: ops {','.join(opts.ops)}, {n_cfg} configs per op "
         f"(B {grid['B']}, K {grid['K']}, V {grid['V']}, {','.join(grid['dtype'])})")
    report = bench.run(opts, command=args.command, log=_log, on_result=_progress(bench.result_line))
    paths = bench.write_report(report, args.out, args.name, device=device, png=not args.no_plot)
    return bench.render_markdown, report, paths


def _bench_attention(args, device, bw=None):
    from . import bench, bench_attention as ba

    grid = ba.default_grid(device, args.quick)
    overrides = (("B", args.batch), ("P", args.prefix), ("n", args.nodes), ("dtype", args.dtype))
    if any(val for _, val in overrides):
        grid.pop("extra", None)          # extra configs belong to the default grid only
    for key, val in overrides:
        if val:
            grid[key] = tuple(val)
    opts = ba.AttnOptions(device=device, backends=args.attn_backends, grid=grid, quick=args.quick,
                          target_s=args.target_time, threads=args.threads)
    n_cfg = len(ba.configs(grid))
    extra = f" + {', '.join(f'B{b} P{p} n{n} {d}' for b, p, n, d in grid['extra'])}" if grid.get("extra") else ""
    _log(f"fastverify bench on {bench.device_name(device)}: tree_attention, {n_cfg} configs "
         f"(B {grid['B']}, P {grid['P']}, n {grid['n']}, {','.join(grid['dtype'])}{extra})")
    report = ba.run(opts, command=args.command, log=_log, on_result=_progress(ba.result_line), bw=bw)
    stem = f"{args.name}-attention" if args.name else None
    paths = ba.write_report(report, args.out, stem, device=device, png=not args.no_plot)
    return ba.render_markdown, report, paths


# --------------------------------------------------------------------------- info


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="versions, device, backends and the CUDA extension's state",
                       description="Print versions, the device, the backend each op would use and whether the "
                                   "CUDA extension is built / loadable (never builds it).")
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
            mod = importlib.import_module("fastverify._cuda")   # importing never compiles (DESIGN.md)
            fn = getattr(mod, "is_built", None)      # a no-build query, if the loader offers one
            if callable(fn):
                try:
                    lines.append(f"fastverify._cuda.is_built(): {fn()}")
                except Exception as e:  # noqa: BLE001
                    lines.append(f"fastverify._cuda.is_built(): raised {type(e).__name__}: {e}"[:200])
            else:
                lines.append("JIT build state: unknown without building (fastverify._cuda has no is_built())")
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
    for line in _cuda_extension_state():
        print(line)
    return 0


# --------------------------------------------------------------------------- main


def build_parser(prog: str = "fastverify") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="fastverify: kernels for speculative-decoding "
                                                            "verification.")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND")
    sub.required = True
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
    except KeyboardInterrupt:
        print(f"\ninterrupted after {_hms(time.perf_counter() - started)}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
