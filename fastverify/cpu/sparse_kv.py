"""cpu backend of the sparse-KV family: ``sparse_kv_attention`` (csrc/cpu/attention.h,
sparse_kv.cpp) and ``select_kv_chunks`` (:mod:`fastverify.cpu.select_kv`). Entry points
with the Triton launchers' signatures."""

from __future__ import annotations

from .select_kv import select_kv_chunks  # noqa: F401
