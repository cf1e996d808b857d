"""Installing is pure Python. The CUDA extension is compiled on first use on a CUDA
machine (JIT with ninja, cached), or here ahead of time with FASTVERIFY_BUILD_CUDA=1:

    FASTVERIFY_BUILD_CUDA=1 pip install --no-build-isolation -e .

(--no-build-isolation so the build sees the installed torch).
"""

import glob
import os

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
CUDA_SOURCES = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))


class BuildPyWithSources(build_py):
    """Ship csrc/cuda and csrc/cpu inside the wheel (as fastverify/_csrc/...) so JIT builds
    work from an install."""

    def run(self):
        super().run()
        for kind in ("cuda", "cpu"):
            dest = os.path.join(self.build_lib, "fastverify", "_csrc", kind)
            os.makedirs(dest, exist_ok=True)
            for path in glob.glob(os.path.join(ROOT, "csrc", kind, "*")):
                self.copy_file(path, os.path.join(dest, os.path.basename(path)))


kwargs = {"cmdclass": {"build_py": BuildPyWithSources}}

if os.environ.get("FASTVERIFY_BUILD_CUDA", "0") == "1":
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    import runpy

    flags = runpy.run_path(os.path.join(ROOT, "fastverify", "_build_flags.py"))  # shared with the JIT loader
    kwargs["ext_modules"] = [
        CUDAExtension("fastverify._C", CUDA_SOURCES,
                      extra_compile_args={"cxx": flags["CXX_FLAGS"], "nvcc": flags["NVCC_FLAGS"]})
    ]
    kwargs["cmdclass"]["build_ext"] = BuildExtension

setup(**kwargs)
