"""pytest-benchmark suite of fastverify's ops.

    python -m pytest perf/ --benchmark-only

Benchmarks live in ``perf/bench_*.py`` (collected by the hook below; pyproject's
``testpaths`` is ``tests``, so perf/ runs only when named). The grid is the GPU grid of
``fastverify.bench`` when CUDA is available, else the CPU grid;
``FASTVERIFY_BENCH_QUICK=1`` picks the quick grid. Speed is reported, never asserted:
``fastverify bench`` (fastverify/cli.py) writes the report with % of bound and speedups.
"""

import pytest
import torch

from fastverify import bench


def pytest_collect_file(file_path, parent):
    if parent.session.isinitpath(file_path):
        return None                      # named on the command line: pytest collects it already
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


class InputSets:
    """Input sets of the configuration being benchmarked; keeps one configuration at a
    time (GPU configurations reach hundreds of MB per set)."""

    def __init__(self, device):
        self.device = device
        self.key = None
        self.sets = None

    def get(self, op, B, K, V, dtype):
        key = (op, B, K, V, dtype)
        if key != self.key:
            self.key, self.sets = None, None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            first = bench.build_problem(op, B, K, V, dtype, self.device, seed=0)
            n, _ = bench.input_sets_for(first.input_bytes(), self.device)
            self.sets = [first] + [bench.build_problem(op, B, K, V, dtype, self.device, seed=s) for s in range(1, n)]
            self.key = key
        return self.sets


@pytest.fixture(scope="session")
def device():
    return bench.default_device()


@pytest.fixture(scope="session")
def input_sets(device):
    return InputSets(device)
