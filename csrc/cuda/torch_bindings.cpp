// The schemas of torch.ops.fastverify_cuda.* and their CUDA kernels. Loaded with
// torch.ops.load_library (fastverify/_cuda.py); no Python module.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY_FRAGMENT(fastverify_cuda, m) {
  m.def(
      "rejection_sample(Tensor target_logits, Tensor draft_tokens, Tensor cu_num_draft, Tensor? draft_probs, "
      "Tensor temperature, Tensor? top_k, Tensor? top_p, Tensor seed, Tensor positions, int max_draft_len, "
      "int chunk_size, int cuda_stream) -> (Tensor, Tensor)");
  m.def(
      "tree_rejection_sample(Tensor target_logits, Tensor tree_tokens, Tensor parents, Tensor cu_num_nodes, "
      "Tensor? draft_probs, Tensor temperature, Tensor? top_k, Tensor? top_p, Tensor seed, Tensor positions, "
      "int max_depth, int chunk_size, int cuda_stream) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastverify_cuda, CUDA, m) {
  m.impl("rejection_sample", &fastverify::rejection_sample_cuda);
  m.impl("tree_rejection_sample", &fastverify::tree_rejection_sample_cuda);
}
