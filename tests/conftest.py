"""Test setup: without a GPU the Triton kernels run under the Triton interpreter,
which must be switched on before anything imports Triton; tests marked `cuda` are
skipped (they need a GPU)."""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastverify  # noqa: E402,F401  (registers torch.ops.fastverify.*)

# Where each backend's kernels run in this session.
BACKEND_DEVICES = {"torch": "cpu", "triton": "cuda" if HAS_CUDA else "cpu"}
if HAS_CUDA:
    BACKEND_DEVICES["cuda"] = "cuda"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_backend():
    yield
    fastverify.set_backend(None)
