"""Op families, one module each: schema + fake kernel + torch (CPU) kernel + dispatch."""

from .rejection import rejection_sample, tree_rejection_sample
from .attention import build_tree, compact_kv, tree_attention

__all__ = ["rejection_sample", "tree_rejection_sample", "build_tree", "tree_attention", "compact_kv"]
