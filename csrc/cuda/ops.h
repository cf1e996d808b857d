// Host launchers of the CUDA backend (csrc/cuda/rejection.cu, csrc/cuda/tree_attention.cu,
// csrc/cuda/frspec.cu, csrc/cuda/sparse_kv.cu).
// Schemas live in torch_bindings.cpp (torch.ops.fastverify_cuda.*); arguments as the
// Triton launchers in fastverify/triton/, plus what Python resolves (chunk width, mask
// width, softmax scale, number of prefix / vocabulary splits) and the stream to launch on.
#pragma once

#include <cstdint>
#include <optional>
#include <tuple>

#include <ATen/ATen.h>

namespace fastverify {

// rule: 0 token, 1 block, 2 typical (typical_eps / typical_delta [B] fp32 given)
// -> (output_tokens [B, max_draft_len + 1] int32, num_accepted [B] int32)
std::tuple<at::Tensor, at::Tensor> rejection_sample_cuda(
    const at::Tensor& target_logits, const at::Tensor& draft_tokens, const at::Tensor& cu_num_draft,
    const std::optional<at::Tensor>& draft_probs, const at::Tensor& temperature, const std::optional<at::Tensor>& top_k,
    const std::optional<at::Tensor>& top_p, const at::Tensor& seed, const at::Tensor& positions, int64_t max_draft_len,
    int64_t rule, const std::optional<at::Tensor>& typical_eps, const std::optional<at::Tensor>& typical_delta,
    int64_t chunk_size, int64_t cuda_stream);

// rule: 0 specinfer, 1 multi-path block (i.i.d. paths), 2 multi-path block (paths without replacement)
// -> (accepted_nodes [B, max_depth + 1], output_tokens [B, max_depth + 1], num_accepted [B]), all int32
std::tuple<at::Tensor, at::Tensor, at::Tensor> tree_rejection_sample_cuda(
    const at::Tensor& target_logits, const at::Tensor& tree_tokens, const at::Tensor& parents,
    const at::Tensor& cu_num_nodes, const std::optional<at::Tensor>& draft_probs, const at::Tensor& temperature,
    const std::optional<at::Tensor>& top_k, const std::optional<at::Tensor>& top_p, const at::Tensor& seed,
    const at::Tensor& positions, int64_t max_depth, int64_t rule, int64_t chunk_size, int64_t cuda_stream);

// parents [T] int32/int64, cu_num_nodes [B + 1] int32, prefix_lens [B] int32/int64
// -> (tree_mask [T, num_words] int64, positions [T] int64, depth [T] int32)
std::tuple<at::Tensor, at::Tensor, at::Tensor> build_tree_cuda(const at::Tensor& parents,
                                                               const at::Tensor& cu_num_nodes,
                                                               const at::Tensor& prefix_lens, int64_t num_words,
                                                               int64_t cuda_stream);

// q [T, Hq, D], k_cache / v_cache [num_pages, page_size, Hkv, D] (fp16 / bf16 / fp32, D <= 256),
// block_table [B, max_pages] int32, seq_lens [B] int32, cu_num_nodes [B + 1] int32,
// tree_mask [T, W] int64; num_splits 0 lets the launcher choose -> out [T, Hq, D]
at::Tensor tree_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& block_table, const at::Tensor& seq_lens,
                               const at::Tensor& cu_num_nodes, const at::Tensor& tree_mask, double sm_scale,
                               int64_t num_splits, int64_t cuda_stream);

// Moves the accepted path's K/V to contiguous slots, in place (fastverify.compact_kv).
// block_table [B, max_pages], prefix_lens [B], accepted_nodes [B, max_depth + 1], num_accepted [B]: int32
void compact_kv_cuda(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& block_table,
                     const at::Tensor& prefix_lens, const at::Tensor& accepted_nodes, const at::Tensor& num_accepted,
                     int64_t cuda_stream);

// hidden [M, d] (last dim contiguous), weight [V_sub, d] contiguous, one dtype (fp32 / bf16 / fp16);
// token_map [V_sub] int32/int64 or none (ids are subset rows); temperature [M] fp32 or none
// (1; <= 0 scores at 1); 1 <= k <= min(V_sub, 64); num_splits 0 lets the launcher choose
// -> (topk_ids [M, k] int64, topk_logprobs [M, k] fp32, lse [M] fp32)
std::tuple<at::Tensor, at::Tensor, at::Tensor> lm_head_topk_cuda(const at::Tensor& hidden, const at::Tensor& weight,
                                                                 int64_t k, const std::optional<at::Tensor>& token_map,
                                                                 const std::optional<at::Tensor>& temperature,
                                                                 int64_t num_splits, int64_t cuda_stream);

// temperature [M] fp32 (<= 0: greedy), seed [M] int64, positions [M] int64, the rest as
// lm_head_topk_cuda -> (token_ids [M] int64, logprobs [M] fp32, lse [M] fp32)
std::tuple<at::Tensor, at::Tensor, at::Tensor> lm_head_sample_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& temperature, const at::Tensor& seed,
    const at::Tensor& positions, const std::optional<at::Tensor>& token_map, int64_t num_splits,
    int64_t cuda_stream);

// q [B, Hq, D], k_cache [num_pages, page_size, Hkv, D] (q's dtype: fp32 / bf16 / fp16, D <= 256,
// head_dim contiguous), block_table [B, max_pages] int32, seq_lens [B] int32; chunk_size divides
// page_size or is a multiple of it; num_chunks >= num_sink_chunks + num_recent_chunks >= 0;
// chunk_means [B, max_chunks, Hkv, D] fp32 or none (means computed from k_cache)
// -> chunk_ids [B, Hkv, num_chunks] int32 (ascending, -1 padded)
at::Tensor select_kv_chunks_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& block_table,
                                 const at::Tensor& seq_lens, int64_t chunk_size, int64_t num_chunks,
                                 int64_t num_sink_chunks, int64_t num_recent_chunks,
                                 const std::optional<at::Tensor>& chunk_means, int64_t cuda_stream);

// q [B, Hq, D], k_cache / v_cache as select_kv_chunks_cuda, chunk_ids [B, Hkv, C >= 1] int32
// (ids outside [0, seq_lens[b] / chunk_size) are skipped); num_splits 0 lets the launcher
// choose (at most 64) -> out [B, Hq, D] in q's dtype
at::Tensor sparse_kv_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                    const at::Tensor& block_table, const at::Tensor& seq_lens,
                                    const at::Tensor& chunk_ids, int64_t chunk_size, double sm_scale,
                                    int64_t num_splits, int64_t cuda_stream);

}  // namespace fastverify
