"""Op families, one module each: schema + fake kernel + torch (CPU) kernel + dispatch."""

from .rejection import (CHAIN_RULES, LOSSY_RULES, TREE_RULES, TYPICAL_DELTA, TYPICAL_EPS, rejection_sample,
                        tree_rejection_sample)
from .attention import build_tree, compact_kv, tree_attention
from .frspec import lm_head_sample, lm_head_topk
from .sparse_kv import select_kv_chunks, sparse_kv_attention, streaming_kv_chunks

__all__ = ["rejection_sample", "tree_rejection_sample", "build_tree", "tree_attention", "compact_kv", "lm_head_topk",
           "lm_head_sample", "select_kv_chunks", "sparse_kv_attention", "streaming_kv_chunks", "CHAIN_RULES",
           "TREE_RULES", "LOSSY_RULES", "TYPICAL_EPS", "TYPICAL_DELTA"]
