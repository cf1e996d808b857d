"""pytest-benchmark suite of fastverify's ops (perf/bench_ops.py):

    python -m pytest perf/ --benchmark-only            # FASTVERIFY_BENCH_SIZE=goal|grid|smoke

The cases are fastverify.bench's (one module per op family), so this suite, ``fastverify
bench`` and ``scripts/gpu_check.sh`` time the same things. pyproject's ``testpaths`` is
``tests``, so perf/ runs only when named. Speed is reported, never asserted.
"""

import pytest

from fastverify import bench


def pytest_collect_file(file_path, parent):
    if parent.session.isinitpath(file_path):
        return None                      # named on the command line: pytest collects it already
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session")
def device():
    return bench.default_device()
