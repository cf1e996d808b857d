// Host launchers of the CUDA backend (csrc/cuda/rejection.cu). Schemas live in
// torch_bindings.cpp (torch.ops.fastverify_cuda.*); arguments as the Triton launchers
// in fastverify/triton/rejection.py, plus the chunk width and the stream to launch on.
#pragma once

#include <cstdint>
#include <optional>
#include <tuple>

#include <ATen/ATen.h>

namespace fastverify {

// -> (output_tokens [B, max_draft_len + 1] int32, num_accepted [B] int32)
std::tuple<at::Tensor, at::Tensor> rejection_sample_cuda(
    const at::Tensor& target_logits, const at::Tensor& draft_tokens, const at::Tensor& cu_num_draft,
    const std::optional<at::Tensor>& draft_probs, const at::Tensor& temperature, const std::optional<at::Tensor>& top_k,
    const std::optional<at::Tensor>& top_p, const at::Tensor& seed, const at::Tensor& positions, int64_t max_draft_len,
    int64_t chunk_size, int64_t cuda_stream);

// -> (accepted_nodes [B, max_depth + 1], output_tokens [B, max_depth + 1], num_accepted [B]), all int32
std::tuple<at::Tensor, at::Tensor, at::Tensor> tree_rejection_sample_cuda(
    const at::Tensor& target_logits, const at::Tensor& tree_tokens, const at::Tensor& parents,
    const at::Tensor& cu_num_nodes, const std::optional<at::Tensor>& draft_probs, const at::Tensor& temperature,
    const std::optional<at::Tensor>& top_k, const std::optional<at::Tensor>& top_p, const at::Tensor& seed,
    const at::Tensor& positions, int64_t max_depth, int64_t chunk_size, int64_t cuda_stream);

}  // namespace fastverify
