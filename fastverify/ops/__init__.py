"""Op families, one module each: schema + fake kernel + torch (CPU) kernel + dispatch."""

from .rejection import rejection_sample, tree_rejection_sample

__all__ = ["rejection_sample", "tree_rejection_sample"]
