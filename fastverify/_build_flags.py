"""Compiler flags of the CUDA extension, shared by setup.py (ahead of time), the JIT
loader (fastverify/_cuda.py) and the compile-only test. No imports: setup.py runs it
without importing the package."""

CXX_FLAGS = ["-O3", "-std=c++20"]
NVCC_FLAGS = [
    "-O3",
    "-std=c++20",
    "--expt-relaxed-constexpr",
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
    "-diag-suppress=3306",  # torch headers: default bit-field initializers under nvcc's C++20 front end
]
