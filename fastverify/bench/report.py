"""The benchmark report: markdown, JSON and one PNG, written atomically.

JSON: ``{"meta": {...}, "rows": [Row, ...], "bench": [...], "baselines": [...]}`` where
``bench`` is the flat schema of ``scripts/gpu_check.sh`` (DESIGN §6): one entry per kernel
row and baseline, ``{"family", "op", "shape", "backend", "median_us", "gbps",
"pct_of_bound", "baseline", "speedup"}`` (``baseline``/``speedup`` None where the case has
no baseline), and ``baselines`` the baselines' and setup costs' own timings.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional

from .core import Row

FAMILY_TITLES = {"rejection": "Rejection sampling", "tree_attention": "Tree attention",
                 "lm_head": "Frequency-ranked LM head", "sparse_kv": "Sparse-KV attention",
                 "integrations": "Engine entry points (cost over the raw op)"}


def bench_entries(rows: list[Row]) -> list[dict]:
    """The op families' kernel rows in the flat schema: one entry per (row, baseline) pair."""
    out = []
    for r in rows:
        if r.kind != "kernel" or r.family == "integrations":
            continue
        base = dict(family=r.family, op=r.op, shape=r.shape, backend=r.backend, status=r.status,
                    median_us=r.median_us, gbps=r.gbps, pct_of_bound=r.pct_of_bound)
        pairs = list(r.speedup.items()) or [(None, None)]
        out += [dict(base, baseline=b, speedup=x) for b, x in pairs]
    return out


def adapter_entries(rows: list[Row]) -> list[dict]:
    """The engine entry points: µs per call and, where the adapter wraps one op, that raw
    op's µs (the device's default backend) and the difference."""
    raw = {(r.op, r.shape): r.median_us for r in rows if r.family == "integrations" and r.kind == "baseline"}
    out = []
    for r in rows:
        if r.family != "integrations" or r.kind != "kernel":
            continue
        base = raw.get((r.op, r.shape))
        out.append(dict(adapter=r.op, shape=r.shape, backend=r.backend, status=r.status, median_us=r.median_us,
                        raw_op_us=base, overhead_us=None if base is None or r.median_us is None
                        else r.median_us - base))
    return out


def baseline_entries(rows: list[Row]) -> list[dict]:
    return [dict(family=r.family, op=r.op, shape=r.shape, name=r.backend, kind=r.kind, status=r.status,
                 median_us=r.median_us, gbps=r.gbps, pct_of_bound=r.pct_of_bound, reason=r.reason)
            for r in rows if r.kind != "kernel"]


def to_json(meta: dict, rows: list[Row]) -> dict:
    return {"meta": meta, "rows": [dataclasses.asdict(r) for r in rows], "bench": bench_entries(rows),
            "baselines": baseline_entries(rows), "adapters": adapter_entries(rows)}


def rows_from_json(data: dict) -> list[Row]:
    return [Row(**r) for r in data.get("rows", [])]


def fmt(v, spec: str = ".1f", na: str = "–") -> str:
    return na if v is None else format(v, spec)


def fmt_us(v) -> str:
    return "–" if v is None else (f"{v:.1f}" if v < 1e4 else f"{v:,.0f}")


def fmt_x(v) -> str:
    return "–" if v is None else (f"{v:.1f}×" if v >= 10 else f"{v:.2f}×")


def header_lines(meta: dict) -> list[str]:
    peak, copy = meta.get("peak_bytes_per_s"), meta.get("copy_bytes_per_s")
    cuda = meta.get("device_type") == "cuda"
    lines = [f"- device: {meta.get('device')}" + (f" (L2 {meta['l2_bytes'] / 2**20:.0f} MiB)"
                                                   if meta.get("l2_bytes") else ""),
             "- bound: " + (f"{peak / 1e9:,.0f} GB/s ({meta.get('peak_source')})" if peak else
                            f"none ({meta.get('peak_source')}); % of copy uses the measured copy bandwidth"),
             f"- measured copy bandwidth (read + write): {fmt(copy and copy / 1e9, ',.0f')} GB/s",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items()),
             f"- git: {meta.get('git')}; date: {meta.get('date')}",
             f"- command: `{meta.get('command') or '(programmatic)'}`",
             "- timing: " + ("CUDA events around each call, L2 flushed before each call (outside the events), "
                             "median; wall µs (JSON) = host time per call of back-to-back calls"
                             if cuda else "time.perf_counter per call, median (CPU: compare ratios within one run)")]
    if meta.get("peak_flops_per_s"):
        lines.append(f"- measured peak: {meta['peak_flops_per_s'] / 1e9:,.0f} GFLOP/s (the faster of torch's fp32 and "
                     "bf16 2048³ GEMMs at this thread count; compute-bound rows report % of it)")
    if meta.get("cpu_kernels"):
        lines.append(f"- cpu backend (csrc/cpu): {meta['cpu_kernels']}")
    if meta.get("env"):
        lines.append("- environment: " + ", ".join(f"{k}={v}" for k, v in meta["env"].items()))
    return lines


def family_table(family: str, rows: list[Row]) -> list[str]:
    mine = [r for r in rows if r.family == family]
    if not mine:
        return []
    bases = [b for b in dict.fromkeys(r.backend for r in mine if r.kind == "baseline")]
    flops = any(r.gflops is not None for r in mine)   # a compute-bound case: GFLOP/s columns
    lines = [f"## {FAMILY_TITLES.get(family, family)}", "",
             "| op | shape | impl | median µs | GB/s | % of bound | % of copy | "
             + ("GFLOP/s | % of peak FLOP/s | " if flops else "")
             + " | ".join(f"× vs {b}" for b in bases) + (" | " if bases else "") + "target |",
             "|:--|:--|:--|--:|--:|--:|--:|" + ("--:|--:|" if flops else "") + "--:|" * len(bases) + ":--|"]
    notes = []
    for r in mine:
        if r.status == "ok":
            cells = [fmt_us(r.median_us), fmt(r.gbps), fmt(r.pct_of_bound), fmt(r.pct_of_copy)]
            cells += [fmt(r.gflops), fmt(r.pct_of_peak_flops)] if flops else []
            cells += [fmt_x(r.speedup.get(b)) if b != r.backend else "" for b in bases]
            met = "" if r.target_met is None else ("met" if r.target_met else "**not met**")
            cells.append(f"{r.target}: {met}" if r.target and met else r.target)
        else:
            cells = [r.status.upper()] + [""] * (4 + 2 * flops + len(bases))
            notes.append(f"- {r.op} {r.shape} {r.backend}: {r.status} — {r.reason}")
        name = r.backend if r.kind == "kernel" else f"*{r.backend}*"
        lines.append(f"| {r.op} | {r.shape} | {name} | " + " | ".join(cells) + " |")
    return lines + [""] + notes + ([""] if notes else [])


def render_markdown(meta: dict, rows: list[Row], title: str = "fastverify op benchmarks") -> str:
    lines = [f"# {title} — {meta.get('device')}", ""] + header_lines(meta) + [""]
    lines.append("Kernel backends in plain text, baselines and setup costs in *italics*; speedups are the "
                 "baseline's median over the row's, same run.")
    lines.append("")
    for fam in dict.fromkeys(r.family for r in rows):
        lines += family_table(fam, rows)
    return "\n".join(lines)


def plot(meta: dict, rows: list[Row], path) -> Optional[Path]:
    """One PNG: per family, a bar per measured row — % of the bound on a GPU, median µs
    (log) on CPU — coloured by implementation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.status == "ok" and r.median_us is not None]
    fams = list(dict.fromkeys(r.family for r in ok))
    if not fams:
        return None
    bound = meta.get("device_type") == "cuda" and any(r.pct_of_bound is not None for r in ok)
    impls = list(dict.fromkeys(r.backend for r in ok))
    colour = {b: plt.cm.tab10(i % 10) for i, b in enumerate(impls)}
    heights = [max(1.5, 0.2 * sum(r.family == f for r in ok) + 1.0) for f in fams]
    fig, axes = plt.subplots(len(fams), 1, figsize=(10, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, fam in zip(axes[:, 0], fams):
        mine = [r for r in ok if r.family == fam][::-1]
        vals = [(r.pct_of_bound or 0.0) if bound else r.median_us for r in mine]
        ax.barh(range(len(mine)), vals, color=[colour[r.backend] for r in mine])
        ax.set_yticks(range(len(mine)))
        ax.set_yticklabels([f"{r.op} {r.shape} · {r.backend}" for r in mine], fontsize=6)
        ax.set_title(FAMILY_TITLES.get(fam, fam), fontsize=9)
        if bound:
            ax.set_xlabel("% of the memory bound")
        else:
            ax.set_xscale("log")
            ax.set_xlabel("median µs (log)")
        ax.grid(True, axis="x", alpha=0.3)
    fig.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=colour[b]) for b in impls], labels=impls, fontsize=7,
               loc="upper right")
    fig.suptitle(meta.get("device", ""), fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.88, 0.98))
    tmp = f"{path}.tmp"
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return Path(path)


def write_text(path, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write(meta: dict, rows: list[Row], out_dir, stem: str, png: bool = True) -> dict:
    """``<out_dir>/<stem>.{md,json,png}``; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / f"{stem}.md", "json": out / f"{stem}.json", "png": None}
    write_text(paths["md"], render_markdown(meta, rows) + "\n")
    write_text(paths["json"], json.dumps(to_json(meta, rows), indent=1, default=str) + "\n")
    if png:
        try:
            paths["png"] = plot(meta, rows, out / f"{stem}.png")
        except ImportError:
            pass                                 # matplotlib missing: the numbers are written
    return paths
