"""The stages of scripts/gpu_check.sh (DESIGN §6), one subcommand each:

    python scripts/gpu_check.py {env,build,tests,bench,static,report} --out DIR [--smoke]

Each stage writes its results under DIR as soon as it ends (``<stage>.json``; the tests
and bench stages also stream ``tests.jsonl`` / ``bench.jsonl`` line by line), so a stage cut
off by its time box still leaves data and ``report`` assembles whatever exists:
``gpu_check.json`` (the schema of DESIGN §6), ``gpu_check.md``, ``gpu_check.png`` and a
one-screen summary.

GPU mode: the CUDA extension is built (parallel JIT), the family tests run on the
``cuda`` and ``triton`` backends and on the ``torch`` backend with CUDA tensors, the
benchmarks run at the goal shapes against their baselines, and the Triton kernels
compiled by those runs report their registers, spills, shared memory and warps.
Smoke mode (``--smoke``, CPU): the same stages with the CUDA kernels built for the CPU
emulator of tests/cuda_emu, Triton under its interpreter, tiny shapes and a subset of the
tests, so CI proves the pipeline itself. The ``static`` stage compiles the CUDA sources for
sm_90 with ``-Xptxas -v`` (and the Triton kernels, where no GPU compiled them) and names
kernels that spill or cannot keep two blocks resident per SM (smoke: rejection only).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
FAMILIES = ("rejection", "tree_attention", "lm_head", "sparse_kv")

# The family tests run by the tests stage, most valuable first (GPU: whole modules;
# smoke: a representative test of each family on every backend).
GPU_TESTS = ["tests/test_rejection.py", "tests/test_tree_attention.py", "tests/test_lm_head.py",
             "tests/test_sparse_kv.py", "tests/integrations", "tests/test_ops.py", "tests/test_lossless.py"]
SMOKE_TESTS = ["tests/test_rejection.py::test_matches_oracle",
               "tests/test_tree_attention.py::test_tree_attention_matches_oracle",
               "tests/test_lm_head.py::test_topk_matches_oracle",
               "tests/test_lm_head.py::test_sample_matches_oracle",
               "tests/test_sparse_kv.py::test_attention_matches_oracle",
               "tests/test_sparse_kv.py::test_select_matches_oracle"]

# sm_90 (H100/H200) per-SM limits for the residency estimate.
SM90 = dict(threads=2048, regs=65536, smem=233472, blocks=32, smem_reserved=1024, reg_unit=256)


def write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path, default=None):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def read_jsonl(path: Path) -> list:
    out = []
    try:
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass                         # a line cut by the time box
    except OSError:
        pass
    return out


def use_emulator() -> None:
    """Serve the cuda backend on CPU tensors with the tests' emulated kernels."""
    sys.path.insert(0, str(TESTS))
    import cuda_emu

    import fastverify
    fastverify._backend.emulate_cuda_on_cpu(cuda_emu.kernels())


# =========================================================================== stages


def stage_env(out: Path, smoke: bool) -> int:
    import torch

    from fastverify.bench import core
    device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
    info = {"mode": "smoke" if smoke else "gpu", "device": core.device_name(device), "device_type": device,
            "versions": core.versions(), "git": core.git_revision(), "cpu_count": os.cpu_count()}
    nvcc = shutil.which("nvcc")
    if nvcc:
        v = subprocess.run([nvcc, "--version"], capture_output=True, text=True)
        info["versions"]["nvcc"] = (re.findall(r"release ([\d.]+)", v.stdout) or ["?"])[0]
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": p.name, "sm": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                       "memory_gib": round(p.total_memory / 2**30, 1)}
        smi = shutil.which("nvidia-smi")
        if smi:
            q = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                               text=True)
            info["versions"]["driver"] = q.stdout.strip()
    write_json(out / "env.json", info)
    print(f"device: {info['device']}; " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    return 0


def stage_build(out: Path, smoke: bool) -> int:
    t0 = time.perf_counter()
    result = {"what": "CPU emulator of the CUDA kernels (tests/cuda_emu, g++)" if smoke else
              "CUDA extension (JIT, ninja, nvcc)", "ok": False}
    try:
        if smoke:
            sys.path.insert(0, str(TESTS))
            import cuda_emu
            cuda_emu.load()
        else:
            os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
            from fastverify import _cuda
            _cuda.library()
        result["ok"] = True
    except Exception as e:  # noqa: BLE001 - recorded; the next stages still run
        result["error"] = f"{type(e).__name__}: {e}"[-4000:]
    result["build_s"] = round(time.perf_counter() - t0, 1)
    write_json(out / "build.json", result)
    print(f"build: {'ok' if result['ok'] else 'FAILED'} in {result['build_s']} s ({result['what']})"
          + ("" if result["ok"] else f"\n{result['error']}"))
    return 0 if result["ok"] else 1


def stage_tests(out: Path, smoke: bool) -> int:
    env = dict(os.environ, FASTVERIFY_TEST_REPORT=str(out / "tests.jsonl"), PYTHONUNBUFFERED="1")
    if not smoke:
        env["FASTVERIFY_TEST_TORCH_DEVICE"] = "cuda"      # the torch backend on CUDA tensors too
        env.setdefault("FASTVERIFY_CHECKS", "1")          # value checks run on CUDA tensors as on CPU
    (out / "tests.jsonl").unlink(missing_ok=True)
    # smoke: engine-sized shapes (their float64 oracles take seconds each on CPU) stay out
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-rf",
           "--durations=15", *(["-m", "not gpu_sized", *SMOKE_TESTS] if smoke else GPU_TESTS)]
    print("tests: " + " ".join(cmd[1:]), flush=True)
    rc = subprocess.call(cmd, cwd=ROOT, env=env)
    write_json(out / "tests.json", summarize_tests(read_jsonl(out / "tests.jsonl")))
    return rc


def summarize_tests(lines: list) -> dict:
    """tests.jsonl → {"tests": [{family, backend, passed, failed, skipped, seconds}], "failures": [...]}."""
    groups: dict = {}
    failures = []
    for t in lines:
        key = (t.get("family") or "other", t.get("backend") or "torch")
        g = groups.setdefault(key, {"family": key[0], "backend": key[1], "passed": 0, "failed": 0, "skipped": 0,
                                    "seconds": 0.0})
        outcome = t.get("outcome")
        g[{"passed": "passed", "failed": "failed", "skipped": "skipped"}.get(outcome, "failed")] += 1
        g["seconds"] = round(g["seconds"] + float(t.get("duration") or 0), 2)
        if outcome not in ("passed", "skipped"):
            failures.append({"test": t.get("nodeid"), "message": t.get("message", "")})
    order = {f: i for i, f in enumerate(FAMILIES)}
    tests = sorted(groups.values(), key=lambda g: (order.get(g["family"], 9), g["family"], g["backend"]))
    return {"tests": tests, "failures": failures}


def stage_bench(out: Path, smoke: bool) -> int:
    import torch

    from fastverify import bench
    from fastverify.cli import row_line
    if smoke:
        use_emulator()
    device = "cpu" if smoke or not torch.cuda.is_available() else "cuda"
    meta = bench.machine(device)
    meta.update(size="smoke" if smoke else "goal", command="scripts/gpu_check.sh" + (" --smoke" if smoke else ""))
    write_json(out / "bench_meta.json", meta)
    (out / "bench.jsonl").unlink(missing_ok=True)
    t0 = time.perf_counter()

    def on_row(r) -> None:
        from dataclasses import asdict
        with open(out / "bench.jsonl", "a") as f:
            f.write(json.dumps(asdict(r), default=str) + "\n")
        print(f"{time.perf_counter() - t0:6.0f}s  {row_line(r)}", flush=True)

    rows = bench.run(bench.FAMILIES + (bench.ADAPTERS,), meta["size"], device, machine_info=meta, on_row=on_row,
                     target_s=0.02 if smoke else 0.1, min_reps=3 if smoke else 10)
    if device == "cuda":
        try:
            write_json(out / "triton_kernels.json", triton_jit_kernels())
        except Exception as e:  # noqa: BLE001 - Triton's cache layout differs between versions
            print(f"Triton kernel metadata not read: {type(e).__name__}: {e}")
    failed = sum(r.status in ("wrong", "error") for r in rows)
    print(f"bench: {len(rows)} rows, {failed} wrong or failed, {time.perf_counter() - t0:.0f} s")
    return 1 if failed else 0


def triton_jit_kernels() -> list:
    """Every Triton kernel this process compiled (the bench's goal shapes): registers,
    spills, shared memory and warps, with the residency estimate."""
    import triton

    rows = []
    for mod_name in ("rejection", "tree_attention", "frspec", "sparse_kv"):
        mod = __import__(f"fastverify.triton.{mod_name}", fromlist=["x"])
        for name, fn in vars(mod).items():
            if not isinstance(fn, triton.runtime.jit.JITFunction):
                continue
            caches = getattr(fn, "device_caches", None) or {}
            for dev_cache in caches.values():
                kernels = dev_cache[0] if isinstance(dev_cache, tuple) else dev_cache
                for key, k in kernels.items():
                    try:
                        k._init_handles()
                    except Exception:  # noqa: BLE001 - already initialised, or not loadable
                        pass
                    threads = 32 * k.metadata.num_warps
                    rows.append(residency(dict(family=_family_of(mod_name), kernel=name, variant=str(key)[:160],
                                               regs=getattr(k, "n_regs", None), spills=getattr(k, "n_spills", None),
                                               smem=k.metadata.shared, threads=threads,
                                               warps=k.metadata.num_warps)))
    return rows


def _family_of(module: str) -> str:
    return {"frspec": "lm_head"}.get(module, module)


def residency(k: dict) -> dict:
    """Blocks of kernel ``k`` (regs per thread, smem bytes, threads) resident per sm_90 SM."""
    regs, smem, threads = k.get("regs"), k.get("smem") or 0, k.get("threads")
    if regs is None or not threads:
        k["blocks_per_sm"] = None
        return k
    warps = math.ceil(threads / 32)
    per_warp = math.ceil(regs * 32 / SM90["reg_unit"]) * SM90["reg_unit"]
    by_regs = (SM90["regs"] // per_warp) // warps if per_warp else SM90["blocks"]
    by_smem = SM90["smem"] // (smem + SM90["smem_reserved"])
    k["blocks_per_sm"] = int(min(SM90["threads"] // threads, by_regs, by_smem, SM90["blocks"]))
    return k


# --------------------------------------------------------------------------- static


def stage_static(out: Path, smoke: bool) -> int:
    """sm_90 resources of every CUDA kernel (nvcc -Xptxas -v) and, where this process has
    no GPU to compile them on, of the Triton kernels (compiled for sm_90, ptxas -v)."""
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    if smoke:
        sources = [s for s in sources if s.stem == "rejection"]
    result = {"arch": "sm_90", "cuda": [], "triton": [], "errors": []}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(len(sources), os.cpu_count() or 1))) as pool:
        for src, (kernels, err) in zip(sources, pool.map(cuda_resources, sources)):
            result["cuda"] += kernels
            if err:
                result["errors"].append(f"{src.name}: {err}")
    try:
        import torch
        if smoke or not torch.cuda.is_available():
            result["triton"] = triton_static(["rejection"] if smoke else list(FAMILIES))
    except Exception as e:  # noqa: BLE001
        result["errors"].append(f"triton: {type(e).__name__}: {e}"[:2000])
    from fastverify.bench.core import git_revision, versions
    result.update(git=git_revision(), versions=versions(),
                  command="python scripts/gpu_check.py static --out DIR" + (" --smoke" if smoke else ""))
    write_json(out / "static.json", result)
    flagged = [k for k in result["cuda"] + result["triton"] if k.get("flag")]
    head = ["# sm_90 kernel resources, known before a GPU is seen", "",
            f"- command: `{result['command']}`; git {result['git']}",
            "- versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
            f"- {len(result['cuda'])} CUDA kernels, {len(result['triton'])} Triton variants; {len(flagged)} flagged:", ""]
    head += [f"  - {k['family']} `{k['kernel']}` {k.get('variant', '')}: {k['flag']}" for k in flagged] + [""]
    (out / "static.md").write_text("\n".join(head + render_static(result, [])[1:]) + "\n")
    print(f"static: {len(result['cuda'])} CUDA kernels, {len(result['triton'])} Triton variants, "
          f"{len(flagged)} flagged, {len(result['errors'])} errors")
    for k in flagged:
        print(f"  {k['family']:14s} {k['kernel']}: {k['flag']}")
    return 1 if result["errors"] else 0


def _nvcc_command(src: Path, cubin: Path, keep: Path) -> list:
    import sysconfig

    import torch
    from torch.utils import cpp_extension

    from fastverify._build_flags import NVCC_FLAGS
    flags = [f for f in NVCC_FLAGS if not f.startswith("-gencode")]
    inc = [f"-I{d}" for d in list(cpp_extension.include_paths()) + [sysconfig.get_paths()["include"]]]
    return (["nvcc", "-cubin", "-arch=sm_90", str(src), "-o", str(cubin), "-Xptxas", "-v", "--keep",
             "--keep-dir", str(keep)] + flags + inc
            + [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
               "-DTORCH_EXTENSION_NAME=fastverify_cuda", "-DTORCH_API_INCLUDE_EXTENSION_H"])


def cuda_resources(src: Path) -> tuple[list, str]:
    """(kernels, error) of one .cu: registers, spills, static shared memory from ptxas -v,
    threads per block from the PTX's ``.maxntid`` (the kernels' __launch_bounds__)."""
    if shutil.which("nvcc") is None:
        return [], "nvcc not on PATH"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        proc = subprocess.run(_nvcc_command(src, tmp / "k.cubin", tmp), capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            return [], (proc.stdout + proc.stderr)[-2000:]
        ptx = "\n".join(p.read_text() for p in tmp.glob("*.ptx"))
    maxntid = {m.group(1): int(m.group(2))
               for m in re.finditer(r"\.entry\s+(\S+)\s*\((?:.|\n)*?\)\s*\.maxntid\s+(\d+)", ptx)}
    kernels = parse_ptxas(proc.stdout + proc.stderr)
    for k in kernels:
        k.update(family=_family_of(src.stem), source=src.name, threads=maxntid.get(k.pop("mangled")))
        residency(k)
        k["flag"] = flag(k)
    return kernels, ""


def parse_ptxas(text: str) -> list:
    """ptxas -v lines → [{mangled, kernel, regs, spills, smem}] per compiled entry."""
    kernels, cur = [], None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            cur = {"mangled": m.group(1), "kernel": demangle(m.group(1)), "regs": None, "spills": 0, "smem": 0}
            kernels.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur["spills"] = int(m.group(1)) + int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur["smem"] = int(s.group(1)) if s else 0
    return kernels


def demangle(name: str) -> str:
    filt = shutil.which("c++filt")
    if filt is None:
        return name
    text = subprocess.run([filt, name], capture_output=True, text=True).stdout.strip() or name
    return re.sub(r"\(anonymous namespace\)::|fastverify::", "", text)


def flag(k: dict) -> str:
    why = []
    if k.get("spills"):
        why.append(f"spills {k['spills']} bytes")
    if k.get("blocks_per_sm") is not None and k["blocks_per_sm"] < 2:
        why.append(f"{k['blocks_per_sm']} resident block(s) per SM (regs {k['regs']}, smem {k['smem']}, "
                   f"threads {k['threads']})")
    return "; ".join(why)


def triton_static(families: list) -> list:
    """Triton kernels compiled for sm_90 without a GPU (tests/triton_sm90_compile.py's
    variants): registers, local memory (spills) and static shared memory from
    ``cuobjdump --dump-resource-usage`` of their cubin, plus the dynamic shared memory
    Triton asks for at launch."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import base64, json, sys; sys.path.insert(0, %r); import triton_sm90_compile as t\n"
            "rows = [dict(family=f, kernel=n, variant=f'logits={lt} ids={it}', warps=w, dynamic_smem=k.metadata.shared,"
            " cubin=base64.b64encode(k.asm['cubin']).decode()) for f, n, lt, it, w, k in t.compiled_variants(True, %r)]\n"
            "print(json.dumps(rows))" % (str(TESTS), tuple(families)))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    import base64
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    cuobjdump = _triton_tool("cuobjdump")
    for r in rows:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(base64.b64decode(r.pop("cubin")))
            f.flush()
            out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        usage = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}
        r.update(regs=usage.get("REG"), spills=usage.get("LOCAL", 0) + usage.get("STACK", 0) if usage else None,
                 smem=r.pop("dynamic_smem") + usage.get("SHARED", 0), threads=32 * r["warps"])
        residency(r)
        r["flag"] = flag(r)
    return rows


def _triton_tool(name: str) -> str:
    """A CUDA binary tool Triton ships (cuobjdump), else the one on PATH."""
    import triton
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(bundled) if bundled.exists() else (shutil.which(name) or name)


# --------------------------------------------------------------------------- report


def stage_report(out: Path, smoke: bool) -> int:
    from fastverify.bench import report as bench_report
    from fastverify.bench.core import Row

    env = read_json(out / "env.json", {})
    build = read_json(out / "build.json", {})
    tests = summarize_tests(read_jsonl(out / "tests.jsonl"))
    rows = [Row(**r) for r in read_jsonl(out / "bench.jsonl")]
    meta = read_json(out / "bench_meta.json", {}) or {"device": env.get("device"), "device_type": "cpu"}
    static = read_json(out / "static.json", {"cuda": [], "triton": [], "errors": ["static stage did not run"]})
    triton_jit = read_json(out / "triton_kernels.json", [])
    stages = read_jsonl(out / "stages.jsonl")
    data = {"device": env.get("device", meta.get("device")), "mode": env.get("mode"),
            "versions": env.get("versions", meta.get("versions", {})), "git": env.get("git"),
            "build_s": build.get("build_s"), "build_ok": build.get("ok"), "build_error": build.get("error"),
            "tests": tests["tests"], "failures": tests["failures"],
            "bench": bench_report.bench_entries(rows), "baselines": bench_report.baseline_entries(rows),
            "adapters": bench_report.adapter_entries(rows),
            "bench_meta": meta, "static": static, "triton_jit": triton_jit, "stages": stages}
    write_json(out / "gpu_check.json", data)
    (out / "gpu_check.md").write_text(render(data, rows) + "\n")
    png = None
    try:
        png = bench_report.plot(meta, rows, out / "gpu_check.png")
    except Exception as e:  # noqa: BLE001
        print(f"plot not written: {e}")
    print(summary(data, rows))
    print(f"wrote {out / 'gpu_check.md'}, {out / 'gpu_check.json'}" + (f", {png}" if png else ""))
    return 0


def _test_table(tests: list) -> list:
    lines = ["| family | backend | passed | failed | skipped | seconds |", "|:--|:--|--:|--:|--:|--:|"]
    lines += [f"| {t['family']} | {t['backend']} | {t['passed']} | {t['failed']} | {t['skipped']} | {t['seconds']:.0f} |"
              for t in tests]
    return lines


def _kernel_table(kernels: list, title: str) -> list:
    if not kernels:
        return []
    lines = [f"### {title}", "", "| family | kernel | variant | threads | regs | spills (B) | smem (B) | blocks/SM | flag |",
             "|:--|:--|:--|--:|--:|--:|--:|--:|:--|"]
    for k in kernels:
        lines.append(f"| {k.get('family')} | `{k.get('kernel')}` | {k.get('variant', k.get('source', ''))} | "
                     f"{k.get('threads')} | {k.get('regs')} | {k.get('spills')} | {k.get('smem')} | "
                     f"{k.get('blocks_per_sm')} | {k.get('flag') or ''} |")
    return lines + [""]


def render(data: dict, rows: list) -> str:
    from fastverify.bench import report as bench_report

    mode = "smoke (CPU: Triton interpreter, CUDA emulator, tiny shapes)" if data.get("mode") == "smoke" else "GPU"
    lines = [f"# gpu_check — {data.get('device')}", "", f"- mode: {mode}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in (data.get("versions") or {}).items()),
             f"- git: {data.get('git')}",
             f"- build: {'ok' if data.get('build_ok') else 'FAILED'} in {data.get('build_s')} s"]
    for s in data.get("stages", []):
        lines.append(f"- stage {s.get('stage')}: exit {s.get('rc')} in {s.get('seconds')} s"
                     + (" (**cut off by its time box**)" if s.get("timed_out") else ""))
    lines += ["", "## Tests", ""] + _test_table(data["tests"]) + [""]
    if data["failures"]:
        lines += ["Failures:", ""] + [f"- `{f['test']}`: {f['message'][:300]}" for f in data["failures"][:50]] + [""]
    lines += ["## Benchmarks", ""]
    if rows:
        lines += bench_report.header_lines(data["bench_meta"]) + [""]
        for fam in dict.fromkeys(r.family for r in rows):
            lines += bench_report.family_table(fam, rows)
    else:
        lines += ["(no benchmark row was written)", ""]
    lines += render_static(data["static"], data.get("triton_jit", []))
    return "\n".join(lines)


def render_static(st: dict, triton_jit: list) -> list:
    lines = ["## Kernel resources (sm_90)", "",
             "Registers, spills and static shared memory from `ptxas -v`; threads per block from the kernels' "
             "launch bounds (CUDA) or warps (Triton); blocks/SM = resident blocks per SM on sm_90 by threads, "
             "registers and shared memory. Flagged: spills, or fewer than two resident blocks.", ""]
    lines += _kernel_table(st.get("cuda", []), "CUDA kernels (nvcc, csrc/cuda)")
    lines += _kernel_table(triton_jit, "Triton kernels compiled by the benchmarks (goal shapes)")
    lines += _kernel_table(st.get("triton", []), "Triton kernels compiled for sm_90 without a GPU (representative "
                                                 "variants)")
    if st.get("errors"):
        lines += ["Errors:", ""] + [f"- {e[:500]}" for e in st["errors"]] + [""]
    return lines


def summary(data: dict, rows: list) -> str:
    from fastverify.bench.report import fmt_us, fmt_x

    passed = sum(t["passed"] for t in data["tests"])
    failed = sum(t["failed"] for t in data["tests"])
    lines = ["", "=" * 100, f"gpu_check — {data.get('device')} ({data.get('mode')})",
             f"build: {'ok' if data.get('build_ok') else 'FAILED'} in {data.get('build_s')} s"
             f"   tests: {passed} passed, {failed} failed"]
    for t in data["tests"]:
        lines.append(f"  {t['family']:15s} {t['backend']:7s} {t['passed']:5d} passed {t['failed']:4d} failed "
                     f"{t['skipped']:4d} skipped {t['seconds']:6.0f} s")
    goal = [r for r in rows if r.kind == "kernel" and r.family != "integrations"]
    lines.append(f"bench: {len(rows)} rows")
    for r in goal:
        if r.status != "ok":
            lines.append(f"  {r.op:22s} {r.shape:40s} {r.backend:7s} {r.status}: {r.reason[:60]}")
            continue
        pct = "" if r.pct_of_bound is None else f"{r.pct_of_bound:5.1f}% bound"
        x = " ".join(f"{fmt_x(v)} {b}" for b, v in r.speedup.items())
        met = "" if r.target_met is None else ("  target met" if r.target_met else "  target NOT met")
        lines.append(f"  {r.op:22s} {r.shape:40s} {r.backend:7s} {fmt_us(r.median_us):>9s} µs {pct} {x}{met}")
    for a in data.get("adapters", []):
        if a["median_us"] is not None:
            extra = "" if a["overhead_us"] is None else f" (raw op {a['raw_op_us']:.0f} µs, +{a['overhead_us']:.0f})"
            lines.append(f"  adapter {a['adapter']:45s} {a['backend']:7s} {a['median_us']:9.0f} µs{extra}")
    flagged = [k for k in data["static"].get("cuda", []) + data.get("triton_jit", []) + data["static"].get("triton", [])
               if k.get("flag")]
    lines.append(f"static: {len(flagged)} kernels flagged (spills or < 2 blocks/SM)")
    lines.append("=" * 100)
    return "\n".join(lines)


STAGES = {"env": stage_env, "build": stage_build, "tests": stage_tests, "bench": stage_bench,
          "static": stage_static, "report": stage_report}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=list(STAGES))
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    return STAGES[args.stage](args.out, args.smoke)


if __name__ == "__main__":
    sys.exit(main())
