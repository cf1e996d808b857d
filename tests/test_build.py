"""Build checks that need no GPU (run in CPU CI).

* Every translation unit of the CUDA extension (csrc/cuda/*.cu, *.cpp) compiles with
  the flags of fastverify/_build_flags.py against the installed torch's headers, and
  the compiler reports no warning from our own sources.
* Every Triton kernel compiles for an H100 (sm_90) with the real Triton compiler
  (tests/triton_sm90_compile.py), which is stricter than the interpreter CI runs.
"""

from __future__ import annotations

import os
import runpy
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc", "cuda")
FLAGS = runpy.run_path(os.path.join(ROOT, "fastverify", "_build_flags.py"))
SOURCES = sorted(f for f in os.listdir(CSRC) if f.endswith((".cu", ".cpp")))
COMPILE_TIMEOUT_S = 900


def _include_flags() -> list[str]:
    from torch.utils import cpp_extension

    dirs = list(cpp_extension.include_paths()) + [sysconfig.get_paths()["include"]]
    return [f"-I{d}" for d in dirs]


def _defines() -> list[str]:
    return [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            "-DTORCH_EXTENSION_NAME=fastverify_cuda", "-DTORCH_API_INCLUDE_EXTENSION_H"]


def _compile_command(src: str, out: str) -> list[str]:
    path = os.path.join(CSRC, src)
    if src.endswith(".cu"):
        from torch.utils import cpp_extension

        # torch's own nvcc flags (half/bf16 operator macros) as a real build adds them
        common = [f for f in cpp_extension.COMMON_NVCC_FLAGS if f not in FLAGS["NVCC_FLAGS"]]
        # --threads: the three -gencode targets compile in parallel (CI time)
        return (["nvcc", "-c", path, "-o", out, "--threads", str(os.cpu_count() or 1)] + FLAGS["NVCC_FLAGS"] + common
                + ["-Xcompiler", "-fPIC,-Wall"] + _include_flags() + _defines())
    cuda_include = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include")
    return (["g++", "-c", path, "-o", out] + FLAGS["CXX_FLAGS"] + ["-fPIC", "-Wall", f"-I{cuda_include}"]
            + _include_flags() + _defines())


def _ours(line: str) -> bool:
    names = os.listdir(CSRC)
    return CSRC in line or any(line.startswith(os.path.join("csrc", "cuda", n)) for n in names)


@pytest.mark.parametrize("src", SOURCES)
def test_cuda_source_compiles(src, tmp_path):
    compiler = "nvcc" if src.endswith(".cu") else "g++"
    if shutil.which(compiler) is None:
        pytest.skip(f"{compiler} is not on PATH")
    cmd = _compile_command(src, str(tmp_path / (src + ".o")))
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)}\nexit {proc.returncode}\n{output}"
    # warnings from torch's headers are theirs; none may point into our sources
    ours = [line for line in output.splitlines() if "warning" in line.lower() and _ours(line)]
    assert not ours, f"{' '.join(cmd)}\nwarnings in our sources:\n{output}"


def test_sources_found():
    assert any(s.endswith(".cu") for s in SOURCES) and "torch_bindings.cpp" in SOURCES


def test_triton_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "triton_sm90_compile.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
