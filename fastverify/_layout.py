"""Sizes the ops and their kernels (torch, Triton, CUDA) must agree on, in one module that
imports nothing of fastverify, so ops/ → triton/ | _cuda stays one-way.

- A tree_mask row holds one bit per node of its tree in int64 words: ``mask_words``.
- The rejection kernels walk the vocabulary in chunks whose width depends on V alone
  (so results never depend on the batch): ``default_chunk``; they number the verification
  rules: ``CHAIN_RULES``.
"""

WORD = 64               # bits per tree_mask word
# rule codes of rejection_sample's kernels (verify= of the op)
CHAIN_RULES = {"token": 0, "block": 1, "typical": 2}
TREE_RULES = {"specinfer": 0, "block": 1, "block_wor": 2}
MAX_CHUNK = 4096        # widest vocabulary chunk of the rejection kernels


def mask_words(max_nodes: int) -> int:
    """int64 words per tree_mask row for trees of up to ``max_nodes`` nodes."""
    return max(1, -(-max_nodes // WORD))


def default_chunk(V: int) -> int:
    """Vocabulary chunk width of the Triton and CUDA kernels: a power of two in
    [16, MAX_CHUNK] that depends on V alone, so results never depend on the batch."""
    return max(16, min(MAX_CHUNK, 1 << max(0, V - 1).bit_length()))
