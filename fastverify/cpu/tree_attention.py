"""cpu backend of the tree-attention family: ``tree_attention`` (csrc/cpu/attention.h,
tree_attention.cpp) and the tree-structure ops ``build_tree`` / ``compact_kv``
(:mod:`fastverify.cpu.tree_structure`). Entry points with the Triton launchers' signatures."""

from __future__ import annotations

from .tree_structure import build_tree, compact_kv  # noqa: F401
