// What the kernel files share: the CUDA library headers, the seam between the kernels
// and the CUDA runtime, dtype helpers and the ragged-batch row search.
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
#include <utility>

#ifndef FASTVERIFY_CUDA_EMULATOR
#include <mma.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#endif

namespace fastverify {

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

}  // namespace fastverify
