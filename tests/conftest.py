"""Test setup: every op family is tested on every backend, through the public ops.

- GPU machine: ``torch`` and ``cpu`` on CPU tensors (the spec and the C++ kernels),
  ``triton`` and ``cuda`` on CUDA tensors.
- CPU machine: ``triton`` runs under the Triton interpreter (switched on here, before
  anything imports Triton) and ``cuda`` runs the unmodified csrc/cuda kernels through
  the CPU emulator of tests/cuda_emu (installed here as the cuda backend of CPU
  tensors; built on first use). ``FASTVERIFY_EMULATE_CUDA=0`` leaves the cuda backend
  out on CPU.

Conventions of the family modules (test_rejection.py, test_tree_attention.py,
test_lm_head.py, test_sparse_kv.py): parametrize over ``BACKENDS`` and put tensors on
``BACKEND_DEVICES[backend]``; compare with the naive oracles of naive.py. Tests that need a
backend's own knobs (chunk width, split counts) call ``entry_points(backend, family)``.

Markers:
- ``cuda``: needs a real GPU (streams, CUDA graphs, the device's own compile) — skipped
  without one.
- ``gpu_sized``: a shape too large for the Triton interpreter or the CUDA emulator (a
  128k vocabulary, an 8K prefix): it runs on every backend on a GPU, and on CPU only on
  the torch and cpu backends unless ``FASTVERIFY_EMULATE_FULL=1``."""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastverify  # noqa: E402,F401  (registers torch.ops.fastverify.*)
import fastverify.cpu  # noqa: E402

KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"
EMULATE_CUDA = not HAS_CUDA and os.environ.get("FASTVERIFY_EMULATE_CUDA", "1") not in ("", "0")
if EMULATE_CUDA:
    import cuda_emu  # noqa: E402

    fastverify._backend.emulate_cuda_on_cpu(cuda_emu.kernels())

# Where each backend's kernels run in this session (scripts/gpu_check.sh puts the torch
# backend on CUDA tensors too, with FASTVERIFY_TEST_TORCH_DEVICE=cuda).
BACKEND_DEVICES = {"torch": os.environ.get("FASTVERIFY_TEST_TORCH_DEVICE", "cpu")}
if fastverify.cpu.available():  # the C++ kernels of csrc/cpu (a compiler is all they need)
    BACKEND_DEVICES["cpu"] = "cpu"
BACKEND_DEVICES["triton"] = KERNEL_DEVICE
if HAS_CUDA or EMULATE_CUDA:
    BACKEND_DEVICES["cuda"] = KERNEL_DEVICE


BACKENDS = list(BACKEND_DEVICES)
EMULATE_FULL = os.environ.get("FASTVERIFY_EMULATE_FULL", "0") not in ("", "0")
FAMILIES = ("rejection", "tree_attention", "lm_head", "sparse_kv")
_TRITON_MODULES = {"rejection": "rejection", "tree_attention": "tree_attention", "lm_head": "frspec",
                   "sparse_kv": "sparse_kv"}


def entry_points(backend: str, family: str):
    """The kernel backend's own entry points for a family (the Triton launchers, the C++ CPU
    kernels', or the CUDA extension's — emulated on CPU — which share their signatures and knobs such as
    ``chunk_size`` / ``num_splits``). Unchecked: the public ops check arguments."""
    import importlib

    if backend == "triton":
        return importlib.import_module(f"fastverify.triton.{_TRITON_MODULES[family]}")
    if backend == "cpu":
        return importlib.import_module(f"fastverify.cpu.{_TRITON_MODULES[family]}")
    if backend == "cuda":
        return fastverify._backend.cpu_cuda_kernels if not HAS_CUDA else importlib.import_module("fastverify._cuda")
    raise ValueError(f"the {backend} backend has no kernel entry points")


def pytest_configure(config):
    config.addinivalue_line("markers", "family(name): the op family a test module covers (rejection, "
                                       "tree_attention, lm_head, sparse_kv; integrations: the engine entry points)")
    config.addinivalue_line("markers", "gpu_sized: too large for the interpreter / emulator: on CPU only the torch "
                                       "backend runs it (FASTVERIFY_EMULATE_FULL=1: all)")


def family_of(item) -> str:
    """The op family of a test: its module's ``family`` marker; tests of modules that cover
    every family (ops, bad input) are told apart by their names."""
    marker = item.get_closest_marker("family")
    if marker is not None:
        return marker.args[0]
    name = item.name.lower()
    for family, words in (("lm_head", ("lm_head",)), ("sparse_kv", ("sparse", "select_kv")),
                          ("tree_attention", ("tree_attention", "attention", "build_tree", "compact"))):
        if any(w in name for w in words):
            return family
    return "rejection" if any(w in name for w in ("chain", "tree", "rejection", "sample", "nan")) else "other"


def backend_of(item) -> str:
    params = getattr(item, "callspec", None)
    if params is not None and "backend" in params.params:
        return params.params["backend"]
    return getattr(item.module, "BACKEND", "torch")


def backend_params(rows, kernel_runs=lambda backend, row: True, backends=None) -> list:
    """pytest params (backend, *row) for every backend and row. A row that ``kernel_runs``
    refuses for a kernel backend is marked ``gpu_sized``: too slow for the Triton
    interpreter / CUDA emulator, it runs on a GPU (or with FASTVERIFY_EMULATE_FULL=1)."""
    params = []
    for row in rows:
        row = row if isinstance(row, tuple) else (row,)
        for b in backends or BACKENDS:
            marks = () if b in ("torch", "cpu") or kernel_runs(b, row) else pytest.mark.gpu_sized
            params.append(pytest.param(b, *row, marks=marks, id="-".join(map(str, (b, *row)))))
    return params


def capture_graph(fn):
    """(CUDA graph, its static outputs) of ``fn``, warmed up twice on a side stream first
    (the tests marked ``cuda`` replay it after changing the inputs in place)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = fn()
    return graph, outs


_report_path = os.environ.get("FASTVERIFY_TEST_REPORT")


def pytest_runtest_logreport(report):
    """With FASTVERIFY_TEST_REPORT=path, one JSON line per test as it ends (scripts/gpu_check.sh
    counts them per family and backend; a run cut off still leaves its lines)."""
    if not _report_path or not (report.when == "call" or (report.when == "setup" and not report.passed)):
        return
    item = _items.get(report.nodeid)
    import json
    line = {"nodeid": report.nodeid, "outcome": report.outcome, "duration": round(report.duration, 3),
            "family": family_of(item) if item else "other", "backend": backend_of(item) if item else "torch"}
    if report.failed:
        line["message"] = str(report.longrepr).strip().splitlines()[-1][:500] if report.longrepr else ""
    with open(_report_path, "a") as f:
        f.write(json.dumps(line) + "\n")


_items: dict = {}


def pytest_collection_modifyitems(config, items):
    _items.update({item.nodeid: item for item in items})
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    too_big = pytest.mark.skip(reason="GPU-sized shape: runs on the GPU; on CPU only the torch and cpu backends run it "
                                      "(FASTVERIFY_EMULATE_FULL=1 runs it under the interpreter / emulator)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
        elif item.get_closest_marker("gpu_sized") is not None and not EMULATE_FULL and backend_of(item) not in ("torch", "cpu"):
            item.add_marker(too_big)


@pytest.fixture(autouse=True)
def _restore_backend():
    yield
    fastverify.set_backend(None)
