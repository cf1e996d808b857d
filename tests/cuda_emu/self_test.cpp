// Kernels with deliberate bugs, registered as torch.ops.fastverify_cuda_emu_selftest.*,
// so tests/test_cuda_emulator.py can check that the emulator catches what it claims to:
// a read of another thread's shared-memory write without a barrier, a barrier only some
// threads reach, a misaligned wmma pointer, another lane's share of a wmma store read
// without __syncwarp.
#include <torch/library.h>

#include "emulator.h"

namespace {

constexpr int kThreads = 64;

// Each thread writes tag + its index, then reads its right neighbour's slot; without
// the barrier the first threads to run read the previous launch's tags.
__global__ void neighbour_kernel(int32_t* out, int32_t tag, bool barrier) {
  __shared__ int32_t slots[kThreads];
  slots[threadIdx.x] = tag + static_cast<int32_t>(threadIdx.x);
  if (barrier) __syncthreads();
  out[threadIdx.x] = slots[(threadIdx.x + 1) % kThreads];
}

// The first warp waits at a __syncthreads the second never reaches.
__global__ void divergent_barrier_kernel() {
  if (threadIdx.x < 32) __syncthreads();
}

__global__ void misaligned_wmma_kernel(float* tile) {
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> f;
  nvcuda::wmma::load_matrix_sync(f, tile + 1, 16, nvcuda::wmma::mem_row_major);
}

// A warp stores a tile of tag values and every lane reads all of it back: a lane sees
// the others' shares only after __syncwarp.
__global__ void wmma_store_kernel(float* out, float tag, bool barrier) {
  __shared__ __align__(32) float tile[256];
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> f;
  nvcuda::wmma::fill_fragment(f, tag);
  nvcuda::wmma::store_matrix_sync(tile, f, 16, nvcuda::wmma::mem_row_major);
  if (barrier) __syncwarp();
  float sum = 0.f;
  for (int i = 0; i < 256; ++i) sum += tile[i];
  out[threadIdx.x] = sum;
}

at::Tensor neighbours(int64_t tag, bool barrier) {
  at::Tensor out = at::full({kThreads}, -1, at::kInt);
  fastverify::launch_kernel("neighbour_kernel", neighbour_kernel, dim3(1), dim3(kThreads), nullptr,
                            out.data_ptr<int32_t>(), static_cast<int32_t>(tag), barrier);
  return out;
}

void divergent_barrier() {
  fastverify::launch_kernel("divergent_barrier_kernel", divergent_barrier_kernel, dim3(1), dim3(kThreads), nullptr);
}

void misaligned_wmma() {
  at::Tensor tile = at::zeros({512}, at::kFloat);
  fastverify::launch_kernel("misaligned_wmma_kernel", misaligned_wmma_kernel, dim3(1), dim3(32), nullptr,
                            tile.data_ptr<float>());
}

at::Tensor wmma_store(double tag, bool barrier) {
  at::Tensor out = at::zeros({32}, at::kFloat);
  fastverify::launch_kernel("wmma_store_kernel", wmma_store_kernel, dim3(1), dim3(32), nullptr,
                            out.data_ptr<float>(), static_cast<float>(tag), barrier);
  return out;
}

}  // namespace

TORCH_LIBRARY(fastverify_cuda_emu_selftest, m) {
  m.def("neighbours(int tag, bool barrier) -> Tensor", &neighbours);
  m.def("divergent_barrier() -> ()", &divergent_barrier);
  m.def("misaligned_wmma() -> ()", &misaligned_wmma);
  m.def("wmma_store(float tag, bool barrier) -> Tensor", &wmma_store);
}
