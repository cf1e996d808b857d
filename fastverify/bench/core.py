"""What every op family's benchmark shares: the case model, timing, the bound and the runner.

A family module (``rejection``, ``tree_attention``, ``lm_head``, ``sparse_kv``) turns a
size (``smoke``, ``goal``, ``grid``) into :class:`Case` objects: one op at one shape, the
bytes it must move, how to build its inputs, and the implementations to time on them —
the kernel backends (``torch``, ``cpu``, ``triton``, ``cuda``) through the public op, and named
baselines (what an engine runs without fastverify). :func:`run` measures every case:

* correctness first: each kernel backend (and each baseline that computes the same
  thing) is compared with the reference implementation on the same inputs; a wrong row
  gets no speed numbers;
* timing — CUDA: a CUDA event pair around each call, the L2 flushed before each call
  (a write of twice its size, outside the pair), calls issued back to back with one
  synchronisation at the end, the median of many; CPU: ``time.perf_counter`` per call,
  median. ``wall_us`` adds the host's view (three back-to-back calls and a sync, no
  flush): it includes the launch overhead the events may hide;
* the bound: the bytes that must move divided by the device's peak bandwidth, from
  :data:`PEAK_BANDWIDTH` by device name; the bandwidth of a plain device copy measured
  in the same run is reported beside it. On CPU there is no datasheet bound
  (``pct_of_bound`` is None) and ``pct_of_copy`` compares with the measured copy;
* speedups: each row against each baseline of the same case, measured in the same run.

Speed is reported, never asserted.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

import fastverify

KERNEL_BACKENDS = ("torch", "cpu", "triton", "cuda")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SIZES = ("smoke", "goal", "grid")

# Peak HBM bandwidth by device name (bytes/s), datasheet figures. First match wins.
PEAK_BANDWIDTH = (
    ("H200", 4.8e12),
    ("H100 PCIE", 2.0e12),
    ("H100 NVL", 3.9e12),
    ("H100", 3.35e12),          # SXM
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIE", 1.935e12),
    ("A100", 1.555e12),         # 40 GB
)
DEFAULT_L2_BYTES = 50 * 2**20


# =========================================================================== the case model


@dataclass
class Impl:
    """One way to compute a case: a kernel backend through the public op, a named
    baseline, or a ``setup`` cost timed beside them (e.g. building a FlexAttention
    block mask). ``make(inputs)`` returns the zero-argument call that is timed."""

    name: str
    make: Callable[[Any], Callable[[], Any]]
    kind: str = "kernel"             # kernel | baseline | setup
    checked: bool = True             # compared with the reference output before timing
    note: str = ""


@dataclass
class Case:
    """One op at one shape. ``shape`` lists what defines it (``{"B": 64, "K": 4, ...,
    "dtype": "bf16"}``); ``bytes`` is what the op must move at least (the bound);
    ``build()`` makes the inputs on ``device``; ``check(out, ref) -> (ok, max_err)``
    compares an output with the reference implementation's (``reference``)."""

    family: str
    op: str
    shape: dict
    bytes: int
    build: Callable[[], Any]
    impls: list
    check: Optional[Callable[[Any, Any], tuple]] = None
    reference: str = "torch"
    targets: dict = field(default_factory=dict)   # {"pct_of_bound": 70, "speedup": {"eager": 5}} (GPU)
    note: str = ""
    # CPU targets (judged on CPU runs instead of ``targets``): {"pct_of_copy": 50,
    # "pct_of_peak_flops": 50, "speedup": {"eager": 20}}
    cpu_targets: dict = field(default_factory=dict)
    flops: int = 0                   # floating-point operations of a compute-bound case (0: memory-bound)

    @property
    def shape_str(self) -> str:
        return " ".join(f"{k}={v}" if k != "dtype" else str(v) for k, v in self.shape.items())


@dataclass
class Row:
    """One measured (case, implementation)."""

    family: str
    op: str
    shape: str
    backend: str                     # a kernel backend, or the baseline's name
    kind: str                        # kernel | baseline | setup
    status: str = "ok"               # ok | n/a | wrong | error
    reason: str = ""
    median_us: Optional[float] = None
    p10_us: Optional[float] = None
    p90_us: Optional[float] = None
    reps: int = 0
    wall_us: Optional[float] = None
    first_call_s: Optional[float] = None
    bytes: int = 0
    gbps: Optional[float] = None
    pct_of_bound: Optional[float] = None
    pct_of_copy: Optional[float] = None
    gflops: Optional[float] = None             # compute-bound cases: achieved GFLOP/s
    pct_of_peak_flops: Optional[float] = None  # ... against the machine's measured peak
    max_err: Optional[float] = None
    speedup: dict = field(default_factory=dict)    # baseline name -> baseline µs / this row's µs
    target_met: Optional[bool] = None
    target: str = ""


# =========================================================================== the machine


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    name = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {name or platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def device_slug(device) -> str:
    """A short file-name form of the device: ``nvidia-h100-80gb-hbm3``, ``cpu``."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(dev).lower()).strip("-")
    return slug[:48].strip("-") or "cuda"


def peak_bandwidth(device) -> tuple[Optional[float], str]:
    """(bytes/s, source) of the device's datasheet bandwidth; (None, why) on CPU or an
    unknown GPU."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return None, "no datasheet bound on CPU"
    name = torch.cuda.get_device_name(dev).upper()
    for key, bw in PEAK_BANDWIDTH:
        if key.upper() in name:
            return bw, f"{key} datasheet, {bw / 1e12:.2f} TB/s"
    return None, f"no datasheet figure for {name!r}"


def l2_bytes(device) -> int:
    dev = torch.device(device)
    if dev.type != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0) or DEFAULT_L2_BYTES)


def copy_bandwidth(device, nbytes: int = 512 * 2**20) -> float:
    """Measured bandwidth of a plain device copy (bytes read + written per second)."""
    dev = torch.device(device)
    nbytes = nbytes if dev.type == "cuda" else nbytes // 4
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    times, _ = time_call(lambda: dst.copy_(src), dev, target_s=0.05, min_reps=5, max_reps=20, flush=False)
    return 2 * nbytes / statistics.median(times)


def peak_flops(device) -> Optional[float]:
    """CPU: the measured peak of this machine's floating-point throughput — the faster of
    torch's fp32 and bf16 GEMMs (oneDNN / MKL, 2048³: near the cores' FMA peak) at the
    current thread count, FLOP/s. None on a GPU (its compute-bound rows are judged against
    their baselines)."""
    dev = torch.device(device)
    if dev.type != "cpu":
        return None
    best = 0.0
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(2048, 2048).to(dtype)
        b = torch.randn(2048, 2048).to(dtype)
        times, _ = time_call(lambda: a @ b, dev, target_s=0.3, min_reps=3, max_reps=10, flush=False)
        best = max(best, 2 * 2048**3 / min(times))
    return best


def git_revision() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10)
        if rev.returncode != 0:
            return "n/a"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "n/a"


def versions() -> dict:
    v = {"python": platform.python_version(), "torch": torch.__version__, "fastverify": fastverify.__version__}
    try:
        import triton
        v["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001
        v["triton"] = "n/a (" + first_line(e, 80) + ")"
    if torch.version.cuda:
        v["cuda"] = torch.version.cuda
    return v


def first_line(e: BaseException, limit: int = 300) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    line = text[0] if text else type(e).__name__
    return line if len(line) <= limit else line[:limit - 1] + "…"


def _cpu_kernels_state() -> Optional[str]:
    from fastverify import cpu
    if not cpu.available():
        return None
    return f"FASTVERIFY_CPU_ISA={cpu.isa()}: {', '.join(cpu.features()) or 'portable C++'}"


def machine(device) -> dict:
    """What the report header says about where it ran."""
    dev = torch.device(device)
    peak, source = peak_bandwidth(dev)
    return {
        "device": device_name(dev),
        "device_type": dev.type,
        "peak_bytes_per_s": peak,
        "peak_source": source,
        "copy_bytes_per_s": copy_bandwidth(dev),
        "peak_flops_per_s": peak_flops(dev),
        "cpu_kernels": _cpu_kernels_state() if dev.type == "cpu" else None,
        "l2_bytes": l2_bytes(dev) or None,
        "versions": versions(),
        "git": git_revision(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch_threads": torch.get_num_threads(),
        "env": {k: os.environ[k] for k in ("FASTVERIFY_BACKEND", "FASTVERIFY_CHECKS", "TRITON_INTERPRET")
                if k in os.environ},
    }


# =========================================================================== backends


def backend_unavailable(name: str, device) -> Optional[str]:
    """Why kernel backend ``name`` cannot run on ``device`` here (None: it can)."""
    dev = torch.device(device)
    if name == "torch":
        return None
    if name == "cpu":
        if dev.type != "cpu":
            return "the cpu backend runs CPU tensors"
        from fastverify import cpu
        return None if cpu.available() else "the C++ CPU kernels could not be built (no compiler?)"
    if name == "triton":
        if dev.type == "cuda":
            try:
                import triton  # noqa: F401
            except Exception as e:  # noqa: BLE001
                return "triton does not import: " + first_line(e)
            return None
        if fastverify._backend.triton_interpreting():
            return None
        return "triton on CPU tensors runs only under the Triton interpreter (TRITON_INTERPRET=1)"
    if name == "cuda":
        if dev.type == "cuda":
            try:
                from fastverify import _cuda
                _cuda.library()
            except Exception as e:  # noqa: BLE001 - a failed build is reported, never hidden
                return "the CUDA extension did not build/load: " + first_line(e)
            return None
        if fastverify._backend.cpu_cuda_kernels is not None:
            return None
        return "the cuda backend needs a CUDA device (or the tests' CPU emulator)"
    return f"unknown backend {name!r}"


def backend_context(impl: Impl):
    return fastverify.use_backend(impl.name) if impl.kind == "kernel" else contextlib.nullcontext()


def kernel_impls(op_call: Callable[[Any], Any]) -> list[Impl]:
    """The three kernel backends of an op: ``op_call(inputs)`` calls the public op."""
    return [Impl(b, lambda x: (lambda: op_call(x))) for b in KERNEL_BACKENDS]


# =========================================================================== timing


def time_call(fn: Callable[[], Any], device, *, target_s: float = 0.2, min_reps: int = 5, max_reps: int = 300,
              flush: bool = True) -> tuple[list[float], float]:
    """(seconds per timed call, host wall seconds per call). ``fn`` must have run once
    (compiled, autotuned) before."""
    dev = torch.device(device)
    fn()
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(3):
        fn()
    sync(dev)
    wall = max((time.perf_counter() - t0) / 3, 1e-7)
    reps = int(min(max_reps, max(min_reps, target_s / wall)))
    if dev.type == "cuda":
        scratch = torch.empty(2 * l2_bytes(dev), dtype=torch.uint8, device=dev) if flush else None
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            if scratch is not None:
                scratch.zero_()                  # evicts the inputs from L2, outside the event pair
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize(dev)              # the only sync: stops the clock
        return [s.elapsed_time(e) * 1e-3 for s, e in zip(starts, ends)], wall
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times, wall


# =========================================================================== running


def _ordered(case: Case) -> list[Impl]:
    """Reference first (the others are checked against it), then baselines, setups, kernels."""
    rank = {"baseline": 1, "setup": 2, "kernel": 3}
    return sorted(case.impls, key=lambda i: (i.name != case.reference, rank.get(i.kind, 9)))


def run(cases: list[Case], device, *, backends=KERNEL_BACKENDS, baselines: bool = True, target_s: float = 0.2,
        min_reps: int = 5, machine_info: Optional[dict] = None, log: Callable[[str], None] = print,
        on_row: Optional[Callable[[Row], None]] = None) -> list[Row]:
    """Measure every case on ``device``: the kernel backends in ``backends`` and, with
    ``baselines``, every baseline and setup. ``on_row`` sees each row as soon as it is
    measured (speedups are filled when the case ends)."""
    dev = torch.device(device)
    info = machine_info or {}
    peak, copy = info.get("peak_bytes_per_s"), info.get("copy_bytes_per_s")
    peak_fl = info.get("peak_flops_per_s")
    unavailable = {b: backend_unavailable(b, dev) for b in backends}
    rows: list[Row] = []
    for case in cases:
        impls = [i for i in _ordered(case)
                 if (i.kind == "kernel" and i.name in backends) or (i.kind != "kernel" and baselines)
                 or i.name == case.reference]
        case_rows: list[Row] = []
        try:
            inputs = case.build()
        except Exception as e:  # noqa: BLE001 - e.g. out of memory at a shape: report, go on
            for impl in impls:
                row = Row(case.family, case.op, case.shape_str, impl.name, impl.kind, status="error",
                          reason="building the inputs failed: " + first_line(e), bytes=case.bytes)
                case_rows.append(row)
                on_row and on_row(row)
            rows += case_rows
            continue
        ref = None
        for impl in impls:
            row = Row(case.family, case.op, case.shape_str, impl.name, impl.kind, bytes=case.bytes)
            if impl.kind == "kernel" and impl.name not in unavailable:
                unavailable[impl.name] = backend_unavailable(impl.name, dev)
            why = unavailable[impl.name] if impl.kind == "kernel" else None
            if why is not None:
                row.status, row.reason = "n/a", why
            else:
                out = _measure(case, impl, inputs, row, dev, target_s, min_reps, peak, copy, ref, peak_fl)
                if impl.name == case.reference and row.status == "ok":
                    ref = out
            case_rows.append(row)
            if on_row is not None and impl.kind != "kernel":
                on_row(row)
        _fill_speedups(case, case_rows, dev.type)
        if on_row is not None:
            for row in case_rows:
                if row.kind == "kernel":
                    on_row(row)
        rows += case_rows
        del inputs, ref
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _measure(case: Case, impl: Impl, inputs, row: Row, dev, target_s, min_reps, peak, copy, ref, peak_fl=None):
    """Check and time one implementation into ``row``; returns its first output when it is
    the case's reference (None otherwise)."""
    with backend_context(impl):
        try:
            fn = impl.make(inputs)
            t0 = time.perf_counter()
            out = fn()                           # first call: compiles, builds, autotunes
            sync(dev)
            row.first_call_s = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - report, never fake numbers
            row.status, row.reason = "error", first_line(e)
            return None
        if impl.name != case.reference and impl.checked and case.check is not None and ref is not None:
            ok, row.max_err = case.check(out, ref)
            if not ok:
                row.status, row.reason = "wrong", f"differs from the {case.reference} backend (max err {row.max_err})"
                return None
        try:
            times, wall = time_call(fn, dev, target_s=target_s, min_reps=min_reps)
        except Exception as e:  # noqa: BLE001
            row.status, row.reason = "error", first_line(e)
            return None
    times.sort()
    med = statistics.median(times)
    row.reps = len(times)
    row.median_us, row.wall_us = med * 1e6, wall * 1e6
    row.p10_us = times[int(0.1 * (len(times) - 1))] * 1e6
    row.p90_us = times[int(0.9 * (len(times) - 1))] * 1e6
    if impl.kind != "setup" and case.bytes:
        row.gbps = case.bytes / med / 1e9
        row.pct_of_bound = None if not peak else 100.0 * case.bytes / peak / med
        row.pct_of_copy = None if not copy else 100.0 * case.bytes / copy / med
    if impl.kind != "setup" and case.flops:
        row.gflops = case.flops / med / 1e9
        row.pct_of_peak_flops = None if not peak_fl else 100.0 * case.flops / peak_fl / med
    return out if impl.name == case.reference else None


def _fill_speedups(case: Case, rows: list[Row], device_type: str = "cuda") -> None:
    """Speedups against every baseline of the case, and each kernel row against the
    case's targets: ``cpu_targets`` on CPU runs, ``targets`` (the GPU's) elsewhere."""
    base = {r.backend: r.median_us for r in rows if r.kind == "baseline" and r.status == "ok"}
    targets = case.cpu_targets if device_type == "cpu" else case.targets
    pcts = [(key, label) for key, label in (("pct_of_bound", "of bound"), ("pct_of_copy", "of copy"),
                                            ("pct_of_peak_flops", "of peak FLOP/s")) if targets.get(key)]
    goal_x = targets.get("speedup", {})
    for r in rows:
        if r.status != "ok" or r.kind == "setup":
            continue
        r.speedup = {b: us / r.median_us for b, us in base.items() if b != r.backend}
        if r.kind == "kernel" and targets:
            r.target = ", ".join([f"≥{targets[k]:g}% {label}" for k, label in pcts]
                                 + [f"≥{x:g}× {b}" for b, x in goal_x.items()])
            checks = [None if getattr(r, k) is None else getattr(r, k) >= targets[k] for k, _ in pcts]
            checks += [None if b not in r.speedup else r.speedup[b] >= x for b, x in goal_x.items()]
            r.target_met = None if any(c is None for c in checks) else all(checks)


# =========================================================================== shared input helpers


def generator(device, seed: int) -> torch.Generator:
    return torch.Generator(device=torch.device(device)).manual_seed(seed)


def close(atol: float, rtol: float) -> Callable[[Any, Any], tuple]:
    """A check for float outputs: |out − ref| ≤ atol + rtol·max|ref| everywhere, all finite."""
    def check(out, ref):
        o, r = (out[0] if isinstance(out, tuple) else out).float(), (ref[0] if isinstance(ref, tuple) else ref).float()
        err = float((o - r).abs().max()) if o.numel() else 0.0
        ok = bool(torch.isfinite(o).all()) and err <= atol + rtol * float(r.abs().max() if r.numel() else 0.0)
        return ok, err
    return check


def exact(out, ref) -> tuple:
    """A check for integer outputs (token ids, counts): equal."""
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    same = all(torch.equal(o.cpu(), r.cpu()) for o, r in zip(outs, refs))
    return same, 0.0 if same else float("nan")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def nbytes(dtype: str) -> int:
    return DTYPES[dtype].itemsize

