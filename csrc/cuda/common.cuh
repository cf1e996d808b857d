// What the kernel files share: the CUDA library headers, the seam between the kernels
// and the CUDA runtime, dtype helpers, the ragged-batch row search, host argument checks
// and the paged-KV launch arguments.
//
// The seam (launch_kernel, multiprocessor_count, kKernelDevice) is the only place the
// host launchers touch the CUDA runtime. tests/cuda_emu compiles the same .cu files as
// host C++ with FASTVERIFY_CUDA_EMULATOR defined and supplies its own seam, which runs
// every block's threads as fibers on the CPU, on CPU tensors.
#pragma once

#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <utility>

#ifndef FASTVERIFY_CUDA_EMULATOR
#include <mma.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#endif

namespace fastverify {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xFFFFFFFFu;
constexpr float kInf = __builtin_huge_valf();
constexpr double kLog2e = 1.4426950408889634;

#ifndef FASTVERIFY_CUDA_EMULATOR
// Device type of the tensors the kernels read and write.
inline constexpr c10::DeviceType kKernelDevice = c10::DeviceType::CUDA;

// kernel<<<grid, block, 0, stream>>>(args...), then a check that the launch was accepted.
template <typename... Params, typename... Args>
void launch_kernel(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream,
                   Args&&... args) {
  kernel<<<grid, block, 0, stream>>>(std::forward<Args>(args)...);
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "fastverify_cuda: launch of ", name, " failed: ", cudaGetErrorString(err));
}

// Streaming multiprocessors of the current device (cached per device: a host query
// on every call would cost more than some of the kernels).
inline int multiprocessor_count() {
  constexpr int kMaxDevices = 64;
  static int cached[kMaxDevices] = {};
  int device = 0;
  TORCH_CHECK(cudaGetDevice(&device) == cudaSuccess, "fastverify_cuda: cudaGetDevice failed");
  if (device < 0 || device >= kMaxDevices) device = 0;
  if (cached[device] == 0) {
    int count = 0;
    TORCH_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) == cudaSuccess,
                "fastverify_cuda: cudaDeviceGetAttribute(MultiProcessorCount) failed");
    cached[device] = count > 0 ? count : 1;
  }
  return cached[device];
}
#endif

template <typename T>
struct Tag {
  using type = T;
};

// f(Tag<device type>{}) for a float32 / bfloat16 / float16 tensor; `what` names it in the error.
template <typename F>
void dispatch_float(at::ScalarType st, const char* what, F&& f) {
  switch (st) {
    case at::kFloat:
      f(Tag<float>{});
      break;
    case at::kBFloat16:
      f(Tag<__nv_bfloat16>{});
      break;
    case at::kHalf:
      f(Tag<__half>{});
      break;
    default:
      TORCH_CHECK(false, "fastverify_cuda: ", what, " must be float32, bfloat16 or float16, got ", st);
  }
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

// Round to nearest even, as torch's .to(dtype).
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}

// Largest b in [0, B) with cu[b] + b * extra <= row (_request_of_row).
__device__ __forceinline__ int request_of_row(const int32_t* cu, int64_t row, int B, int extra) {
  int lo = 0;
  int hi = B;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    const int64_t first = static_cast<int64_t>(cu[mid]) + static_cast<int64_t>(mid) * extra;
    if (first <= row) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline cudaStream_t as_stream(int64_t cuda_stream) {
  return reinterpret_cast<cudaStream_t>(static_cast<intptr_t>(cuda_stream));
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ------------------------------------------------- host checks (metadata only: no sync)

// x is a kernel-device tensor on first's device.
inline void check_device(const at::Tensor& x, const char* name, const at::Tensor& first) {
  TORCH_CHECK(x.device().type() == kKernelDevice, "fastverify_cuda: ", name, " must be a ", kKernelDevice,
              " tensor, got one on ", x.device());
  TORCH_CHECK(x.device() == first.device(), "fastverify_cuda: ", name, " is on ", x.device(),
              " but the other inputs on ", first.device());
}

// ... and an int32 (or, with allow_int64, int64) tensor of `dim` dimensions.
inline void check_int(const at::Tensor& x, const char* name, int dim, bool allow_int64, const at::Tensor& first) {
  check_device(x, name, first);
  TORCH_CHECK(x.dim() == dim, "fastverify_cuda: ", name, " must have ", dim, " dimension(s), got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kInt || (allow_int64 && x.scalar_type() == at::kLong), "fastverify_cuda: ",
              name, allow_int64 ? " must be int32 or int64" : " must be int32", ", got ", x.scalar_type());
}

// --------------------------------------------- paged KV caches (tree_attention, sparse_kv)

// 16-byte loads of rows of D elements at base + i·strides[k]: every address 16-byte aligned.
inline bool rows_vectorizable(const at::Tensor& t, std::initializer_list<int64_t> strides, int64_t D) {
  const int64_t elem = static_cast<int64_t>(t.element_size());
  if (!aligned16(t.data_ptr()) || (D * elem) % 16 != 0) return false;
  for (const int64_t s : strides) {
    if ((s * elem) % 16 != 0) return false;
  }
  return true;
}

// ... for every row of a cache [num_pages, page_size, Hkv, D] (or any 4-D tensor of rows).
inline bool cache_rows_vectorizable(const at::Tensor& cache, int64_t D) {
  return rows_vectorizable(cache, {cache.stride(0), cache.stride(1), cache.stride(2)}, D);
}

// The key-side fields that the paged launch arguments share (Args: AttnArgs, SparseArgs,
// ScoreArgs): the K cache [num_pages, page_size, Hkv, D] of element type Scalar, its
// strides, the block table [B, max_pages], seq_lens [B] and the head counts.
template <typename Scalar, typename Args>
void fill_paged_keys(Args& a, const at::Tensor& k_cache, const at::Tensor& table, const at::Tensor& lens,
                     int64_t G) {
  a.k = static_cast<const Scalar*>(k_cache.data_ptr());
  a.block_table = table.data_ptr<int32_t>();
  a.seq_lens = lens.data_ptr<int32_t>();
  a.stride_kp = k_cache.stride(0);
  a.stride_ks = k_cache.stride(1);
  a.stride_kh = k_cache.stride(2);
  a.stride_bt = table.stride(0);
  a.num_pages = k_cache.size(0);
  a.page_size = static_cast<int>(k_cache.size(1));
  a.Hkv = static_cast<int>(k_cache.size(2));
  a.G = static_cast<int>(G);
  a.D = static_cast<int>(k_cache.size(3));
}

// The fields that the two paged-attention launches share (Args: AttnArgs, SparseArgs):
// those of fill_paged_keys (G = Hq / Hkv), the V cache (like K), the capacity
// max_pages · page_size, whether 16-byte loads suit every K and V row, q [rows, Hq, D]
// (its row strides are the launcher's), out, the split workspaces and sm_scale · log2(e).
template <typename Scalar, typename Args>
void fill_paged_attention(Args& a, const at::Tensor& q, const at::Tensor& out, const at::Tensor& k_cache,
                          const at::Tensor& v_cache, const at::Tensor& table, const at::Tensor& lens,
                          const at::Tensor& ws_o, const at::Tensor& ws_ml, double sm_scale) {
  fill_paged_keys<Scalar>(a, k_cache, table, lens, q.size(1) / k_cache.size(2));
  a.v = static_cast<const Scalar*>(v_cache.data_ptr());
  a.stride_vp = v_cache.stride(0);
  a.stride_vs = v_cache.stride(1);
  a.stride_vh = v_cache.stride(2);
  a.capacity = static_cast<decltype(a.capacity)>(table.size(1) * k_cache.size(1));
  a.vec_kv = cache_rows_vectorizable(k_cache, k_cache.size(3)) && cache_rows_vectorizable(v_cache, k_cache.size(3));
  a.q = static_cast<const Scalar*>(q.data_ptr());
  a.out = static_cast<Scalar*>(out.data_ptr());
  a.ws_o = ws_o.data_ptr<float>();
  a.ws_ml = ws_ml.data_ptr<float>();
  a.Hq = static_cast<int>(q.size(1));
  a.scale_log2 = static_cast<float>(sm_scale * kLog2e);
}

}  // namespace fastverify
