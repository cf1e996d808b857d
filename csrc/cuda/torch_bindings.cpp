// The schemas of torch.ops.fastverify_cuda.* and their CUDA kernels. Loaded with
// torch.ops.load_library (fastverify/_cuda.py); no Python module.
//
// tests/cuda_emu compiles this file with FASTVERIFY_CUDA_EMULATOR: the same launchers,
// kernels emulated on the CPU, registered as torch.ops.fastverify_cuda_emu.* for CPU
// tensors, so both libraries can live in one process.
#include <torch/library.h>

#include "ops.h"

#ifdef FASTVERIFY_CUDA_EMULATOR
#define FASTVERIFY_CUDA_NAMESPACE fastverify_cuda_emu
#define FASTVERIFY_CUDA_KEY CPU
#else
#define FASTVERIFY_CUDA_NAMESPACE fastverify_cuda
#define FASTVERIFY_CUDA_KEY CUDA
#endif

TORCH_LIBRARY_FRAGMENT(FASTVERIFY_CUDA_NAMESPACE, m) {
  m.def(
      "rejection_sample(Tensor target_logits, Tensor draft_tokens, Tensor cu_num_draft, Tensor? draft_probs, "
      "Tensor temperature, Tensor? top_k, Tensor? top_p, Tensor seed, Tensor positions, int max_draft_len, "
      "int rule, Tensor? typical_eps, Tensor? typical_delta, int chunk_size, int cuda_stream) -> (Tensor, Tensor)");
  m.def(
      "tree_rejection_sample(Tensor target_logits, Tensor tree_tokens, Tensor parents, Tensor cu_num_nodes, "
      "Tensor? draft_probs, Tensor temperature, Tensor? top_k, Tensor? top_p, Tensor seed, Tensor positions, "
      "int max_depth, int rule, int chunk_size, int cuda_stream) -> (Tensor, Tensor, Tensor)");
  m.def(
      "build_tree(Tensor parents, Tensor cu_num_nodes, Tensor prefix_lens, int num_words, int cuda_stream) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "tree_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor seq_lens, "
      "Tensor cu_num_nodes, Tensor tree_mask, float sm_scale, int num_splits, int cuda_stream) -> Tensor");
  m.def(
      "compact_kv(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor block_table, Tensor prefix_lens, "
      "Tensor accepted_nodes, Tensor num_accepted, int cuda_stream) -> ()");
  m.def(
      "lm_head_topk(Tensor hidden, Tensor weight, int k, Tensor? token_map, Tensor? temperature, int num_splits, "
      "int cuda_stream) -> (Tensor, Tensor, Tensor)");
  m.def(
      "lm_head_sample(Tensor hidden, Tensor weight, Tensor temperature, Tensor seed, Tensor positions, "
      "Tensor? token_map, int num_splits, int cuda_stream) -> (Tensor, Tensor, Tensor)");
  m.def(
      "select_kv_chunks(Tensor q, Tensor k_cache, Tensor block_table, Tensor seq_lens, int chunk_size, "
      "int num_chunks, int num_sink_chunks, int num_recent_chunks, Tensor? chunk_means, int cuda_stream) -> Tensor");
  m.def(
      "sparse_kv_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor seq_lens, "
      "Tensor chunk_ids, int chunk_size, float sm_scale, int num_splits, int cuda_stream) -> Tensor");
}

TORCH_LIBRARY_IMPL(FASTVERIFY_CUDA_NAMESPACE, FASTVERIFY_CUDA_KEY, m) {
  m.impl("rejection_sample", &fastverify::rejection_sample_cuda);
  m.impl("tree_rejection_sample", &fastverify::tree_rejection_sample_cuda);
  m.impl("build_tree", &fastverify::build_tree_cuda);
  m.impl("tree_attention", &fastverify::tree_attention_cuda);
  m.impl("compact_kv", &fastverify::compact_kv_cuda);
  m.impl("lm_head_topk", &fastverify::lm_head_topk_cuda);
  m.impl("lm_head_sample", &fastverify::lm_head_sample_cuda);
  m.impl("select_kv_chunks", &fastverify::select_kv_chunks_cuda);
  m.impl("sparse_kv_attention", &fastverify::sparse_kv_attention_cuda);
}
