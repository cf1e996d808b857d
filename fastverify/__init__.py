"""fastverify: fast kernels for the verification side of speculative decoding.

Ops are registered as ``torch.ops.fastverify.*`` on import; the functions here are
thin keyword-friendly wrappers around them.
"""

from ._backend import get_backend, set_backend, use_backend
from .ops import (build_tree, compact_kv, lm_head_sample, lm_head_topk, rejection_sample, select_kv_chunks,
                  sparse_kv_attention, streaming_kv_chunks, tree_attention, tree_rejection_sample)
from . import models  # noqa: E402  (reference models; loaders import their dependencies lazily)
from .decoding import generate
from . import frspec  # noqa: E402  (frequency-ranked LM head: rankings and the ranked head)

__version__ = "0.1.0"

__all__ = ["rejection_sample", "tree_rejection_sample", "build_tree", "tree_attention", "compact_kv", "lm_head_topk", "lm_head_sample", "select_kv_chunks", "sparse_kv_attention", "streaming_kv_chunks", "generate", "models", "frspec", "get_backend", "set_backend", "use_backend", "__version__"]
