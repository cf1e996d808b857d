// CPU emulator of the CUDA features the kernels of csrc/cuda use, for testing them
// without a GPU. A wrapper translation unit includes this header, then one .cu file,
// compiled as host C++ with FASTVERIFY_CUDA_EMULATOR defined (see build.py); the .cu
// file's host launchers then run unchanged on CPU tensors, through the seam of
// csrc/cuda/common.cuh that this header supplies (launch_kernel, multiprocessor_count,
// kKernelDevice).
//
// Execution model. Blocks run one after another. The threads of a block are fibers
// (ucontext stacks, switched with _setjmp/_longjmp) on one OS thread: a fiber runs
// until it reaches a barrier (__syncthreads, __syncwarp, a warp shuffle), then the
// next one runs. Rounds alternate between ascending and descending thread order, so a
// thread that reads what another wrote without a barrier in between sees stale data in
// one of the two orders. Errors (a barrier some threads never reach, a misaligned wmma
// pointer) make the launch throw.
//
// Emulated: threadIdx/blockIdx/blockDim/gridDim, __shared__ (a static per kernel
// instantiation: blocks run one at a time), __syncthreads, __syncwarp, __shfl_xor_sync,
// __shfl_sync, __float_as_int, __int_as_float, cub::BlockReduce (cub's warp-tree
// order) and cub::BlockScan::InclusiveSum, and nvcuda::wmma 16x16x16: every lane holds
// the whole tile and computes it; its elements are in a scrambled order (the hardware's
// order is unspecified, so code must not assume one); store_matrix_sync writes only a
// lane's share, so reading another lane's part needs the __syncwarp hardware needs too.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <algorithm>
#include <cfloat>
#include <climits>
#include <cmath>
#include <csetjmp>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

using std::max;
using std::min;

namespace cuda_emu {

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 1024;
constexpr size_t kStackBytes = 256 * 1024;

enum class State { kReady, kAtBlockBarrier, kAtWarpBarrier, kDone };

struct Fiber {
  ucontext_t start;
  jmp_buf resume;
  State state = State::kReady;
  bool started = false;
};

// The block being run.
struct Block {
  std::vector<Fiber> fibers;
  int current = 0;
  jmp_buf scheduler;
  uint64_t exchange[kMaxThreads / kWarpSize][kWarpSize];  // warp shuffles
  const std::function<void()>* body = nullptr;
};

inline Block* g_block = nullptr;
inline uint3 g_thread_idx;
inline uint3 g_block_idx;
inline dim3 g_block_dim;
inline dim3 g_grid_dim;
inline std::string g_error;  // first error of the current launch

inline void fail(const std::string& msg) {
  if (g_error.empty()) g_error = msg;
}

// Stacks are kept between launches: allocating them is the costly part of a launch.
inline char* stack(int t) {
  static std::vector<std::unique_ptr<char[]>> pool;
  while (static_cast<int>(pool.size()) <= t) pool.emplace_back(new char[kStackBytes]);
  return pool[t].get();
}

// The calling fiber waits in `state` until the scheduler releases it.
inline void wait(State state) {
  Fiber& f = g_block->fibers[g_block->current];
  f.state = state;
  if (!_setjmp(f.resume)) _longjmp(g_block->scheduler, 1);
}

inline void fiber_main() {
  (*g_block->body)();
  g_block->fibers[g_block->current].state = State::kDone;
  _longjmp(g_block->scheduler, 1);
}

inline void run_thread(int t) {
  Block& b = *g_block;
  b.current = t;
  g_thread_idx = make_uint3(static_cast<unsigned>(t), 0u, 0u);
  Fiber& f = b.fibers[t];
  if (_setjmp(b.scheduler)) return;  // back from the fiber
  if (f.started) _longjmp(f.resume, 1);
  f.started = true;
  setcontext(&f.start);
}

// Runs one block; false (with g_error set) if its threads cannot all finish.
inline bool run_block(int threads, const std::function<void()>& body) {
  Block& b = *g_block;
  b.body = &body;
  b.fibers.assign(threads, Fiber{});
  for (int t = 0; t < threads; ++t) {
    Fiber& f = b.fibers[t];
    getcontext(&f.start);
    f.start.uc_stack.ss_sp = stack(t);
    f.start.uc_stack.ss_size = kStackBytes;
    f.start.uc_link = nullptr;
    makecontext(&f.start, fiber_main, 0);
  }
  for (int round = 0;; ++round) {
    for (int i = 0; i < threads; ++i) {
      const int t = round % 2 == 0 ? i : threads - 1 - i;
      if (b.fibers[t].state == State::kReady) run_thread(t);
    }
    // every thread now waits at a barrier or is done
    int done = 0;
    int at_block = 0;
    for (const Fiber& f : b.fibers) {
      done += f.state == State::kDone;
      at_block += f.state == State::kAtBlockBarrier;
    }
    if (done == threads) return true;
    if (at_block == threads) {
      for (Fiber& f : b.fibers) f.state = State::kReady;
      continue;
    }
    bool released = false;
    for (int w = 0; w < threads / kWarpSize; ++w) {
      int waiting = 0;
      for (int l = 0; l < kWarpSize; ++l) waiting += b.fibers[w * kWarpSize + l].state == State::kAtWarpBarrier;
      if (waiting == kWarpSize) {
        for (int l = 0; l < kWarpSize; ++l) b.fibers[w * kWarpSize + l].state = State::kReady;
        released = true;
      }
    }
    if (released) continue;
    fail("block (" + std::to_string(g_block_idx.x) + "," + std::to_string(g_block_idx.y) + "," +
         std::to_string(g_block_idx.z) + "): barrier not reached by every thread (" + std::to_string(done) +
         " exited, " + std::to_string(at_block) + " at __syncthreads, the others at a warp barrier)");
    return false;
  }
}

// Runs body() as every thread of every block of the grid; throws on an emulation error.
inline void run_grid(const char* name, dim3 grid, dim3 block, const std::function<void()>& body) {
  const int threads = static_cast<int>(block.x);
  TORCH_CHECK(block.y == 1 && block.z == 1, "cuda_emu: only 1-D blocks are emulated (", name, ")");
  TORCH_CHECK(threads >= 1 && threads <= kMaxThreads && threads % kWarpSize == 0, "cuda_emu: ", name,
              ": block of ", threads, " threads (a multiple of 32 up to 1024 is emulated)");
  Block b;
  g_block = &b;
  g_error.clear();
  g_grid_dim = grid;
  g_block_dim = block;
  const uint64_t blocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  for (uint64_t i = 0; i < blocks; ++i) {
    g_block_idx = make_uint3(static_cast<unsigned>(i % grid.x), static_cast<unsigned>(i / grid.x % grid.y),
                             static_cast<unsigned>(i / grid.x / grid.y));
    if (!run_block(threads, body)) break;  // its fibers are abandoned mid-kernel
  }
  g_block = nullptr;
  TORCH_CHECK(g_error.empty(), "cuda_emu: ", name, ": ", g_error);
}

inline int lane() { return static_cast<int>(g_thread_idx.x) % kWarpSize; }
inline int warp() { return static_cast<int>(g_thread_idx.x) / kWarpSize; }

template <typename T>
T shuffle(T v, int src_lane) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>);
  uint64_t* slots = g_block->exchange[warp()];
  std::memcpy(&slots[lane()], &v, sizeof(T));
  wait(State::kAtWarpBarrier);
  T out;
  std::memcpy(&out, &slots[src_lane % kWarpSize], sizeof(T));
  wait(State::kAtWarpBarrier);  // the slots are free again
  return out;
}

}  // namespace cuda_emu

// ------------------------------------------------------------------ CUDA C++ keywords

#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)

#define threadIdx cuda_emu::g_thread_idx
#define blockIdx cuda_emu::g_block_idx
#define blockDim cuda_emu::g_block_dim
#define gridDim cuda_emu::g_grid_dim

inline void __syncthreads() { cuda_emu::wait(cuda_emu::State::kAtBlockBarrier); }
inline void __syncwarp(unsigned = 0xFFFFFFFFu) { cuda_emu::wait(cuda_emu::State::kAtWarpBarrier); }

template <typename T>
T __shfl_xor_sync(unsigned, T v, int lane_mask, int = cuda_emu::kWarpSize) {
  return cuda_emu::shuffle(v, cuda_emu::lane() ^ lane_mask);
}

template <typename T>
T __shfl_sync(unsigned, T v, int src_lane, int = cuda_emu::kWarpSize) {
  return cuda_emu::shuffle(v, src_lane);
}

inline int __float_as_int(float x) {
  int i;
  std::memcpy(&i, &x, sizeof i);
  return i;
}

inline float __int_as_float(int i) {
  float x;
  std::memcpy(&x, &i, sizeof x);
  return x;
}

// --------------------------------------------------------------------------------- cub

namespace cub {

// BLOCK_REDUCE_WARP_REDUCTIONS, cub's default: a shuffle-down tree inside each warp
// (lane i combines lane i + 1, 2, 4, 8, 16), then thread 0 folds the warp results in
// warp order. The result is valid in thread 0 only, as in cub.
template <typename T, int kThreads>
class BlockReduce {
  static_assert(kThreads % cuda_emu::kWarpSize == 0, "whole warps only");

 public:
  struct TempStorage {
    T items[kThreads];
  };

  explicit BlockReduce(TempStorage& storage) : storage_(storage) {}

  template <typename Op>
  T Reduce(T x, Op op) {
    storage_.items[threadIdx.x] = x;
    __syncthreads();
    if (threadIdx.x != 0) return x;
    T total{};
    for (int w = 0; w < kThreads / cuda_emu::kWarpSize; ++w) {
      T v[cuda_emu::kWarpSize];
      for (int l = 0; l < cuda_emu::kWarpSize; ++l) v[l] = storage_.items[w * cuda_emu::kWarpSize + l];
      for (int offset = 1; offset < cuda_emu::kWarpSize; offset *= 2) {
        for (int l = 0; l + offset < cuda_emu::kWarpSize; l += 2 * offset) v[l] = op(v[l], v[l + offset]);
      }
      total = w == 0 ? v[0] : op(total, v[0]);
    }
    return total;
  }

  T Sum(T x) {
    return Reduce(x, [](const T& a, const T& b) { return a + b; });
  }

 private:
  TempStorage& storage_;
};

// InclusiveSum over kItems consecutive items per thread, threads in order: each thread's
// running sum starts from the sum of all earlier threads' items.
template <typename T, int kThreads>
class BlockScan {
 public:
  struct TempStorage {
    T totals[kThreads];
  };

  explicit BlockScan(TempStorage& storage) : storage_(storage) {}

  template <int kItems>
  void InclusiveSum(T (&in)[kItems], T (&out)[kItems], T& aggregate) {
    T own = in[0];
    for (int i = 1; i < kItems; ++i) own = own + in[i];
    storage_.totals[threadIdx.x] = own;
    __syncthreads();
    T before = T(0);
    T all = T(0);
    for (int t = 0; t < kThreads; ++t) {
      if (t < static_cast<int>(threadIdx.x)) before = before + storage_.totals[t];
      all = all + storage_.totals[t];
    }
    aggregate = all;
    out[0] = before + in[0];
    for (int i = 1; i < kItems; ++i) out[i] = out[i - 1] + in[i];
  }

 private:
  TempStorage& storage_;
};

}  // namespace cub

// -------------------------------------------------------------------------------- wmma

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

// The whole logical tile in every lane: element (r, c) is x[slot(r * cols + c)], a fixed
// permutation, so code that assumed a row-major order would fail here.
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "cuda_emu: only the 16x16x16 wmma shape is emulated");
  static constexpr int kRows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int kCols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = kRows * kCols;
  static constexpr int slot(int rc) { return (rc * 37 + 11) % num_elements; }  // 37 is odd: a bijection
  T x[num_elements];
  T& at(int r, int c) { return x[slot(r * kCols + c)]; }
  const T& at(int r, int c) const { return x[slot(r * kCols + c)]; }
};

inline void check_pointer(const void* p, unsigned ldm, size_t elem, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) cuda_emu::fail(std::string(what) + ": pointer not 256-bit aligned");
  if ((ldm * elem) % 16 != 0) cuda_emu::fail(std::string(what) + ": ldm is not a multiple of 16 bytes");
}

template <typename Use, int M, int N, int K, typename T, typename Layout, typename V>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, const V& v) {
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = static_cast<T>(v);
}

// matrix_a / matrix_b: the layout is part of the fragment type.
template <typename Use, int M, int N, int K, typename T, typename Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(std::is_same_v<Layout, row_major> || std::is_same_v<Layout, col_major>);
  check_pointer(p, ldm, sizeof(T), "wmma::load_matrix_sync");
  using F = fragment<Use, M, N, K, T, Layout>;
  for (int r = 0; r < F::kRows; ++r) {
    for (int c = 0; c < F::kCols; ++c) f.at(r, c) = std::is_same_v<Layout, row_major> ? p[r * ldm + c] : p[c * ldm + r];
  }
}

template <int M, int N, int K>
void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* p, unsigned ldm, layout_t layout) {
  check_pointer(p, ldm, sizeof(float), "wmma::load_matrix_sync");
  for (int r = 0; r < M; ++r) {
    for (int c = 0; c < N; ++c) f.at(r, c) = layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
  }
}

// Each lane writes its own share of the tile (elements rc with rc % 32 == lane).
template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  check_pointer(p, ldm, sizeof(float), "wmma::store_matrix_sync");
  for (int rc = cuda_emu::lane(); rc < M * N; rc += cuda_emu::kWarpSize) {
    const int r = rc / N;
    const int c = rc % N;
    (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.at(r, c);
  }
}

inline float operand(float x) { return x; }
inline float operand(__half x) { return __half2float(x); }
inline float operand(__nv_bfloat16 x) { return __bfloat162float(x); }

// d = a b + c with fp32 products and accumulation (half and bfloat16 products are exact in fp32).
template <int M, int N, int K, typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  float fa[M][K];
  float fb[K][N];
  for (int r = 0; r < M; ++r) {
    for (int k = 0; k < K; ++k) fa[r][k] = operand(a.at(r, k));
  }
  for (int k = 0; k < K; ++k) {
    for (int col = 0; col < N; ++col) fb[k][col] = operand(b.at(k, col));
  }
  float out[M][N];
  for (int r = 0; r < M; ++r) {
    for (int col = 0; col < N; ++col) {
      float s = c.at(r, col);
      for (int k = 0; k < K; ++k) s += fa[r][k] * fb[k][col];
      out[r][col] = s;
    }
  }
  for (int r = 0; r < M; ++r) {
    for (int col = 0; col < N; ++col) d.at(r, col) = out[r][col];
  }
}

}  // namespace wmma
}  // namespace nvcuda

// ------------------------------------------------------------- the seam of common.cuh

namespace fastverify {

inline constexpr c10::DeviceType kKernelDevice = c10::DeviceType::CPU;

// Converts the arguments to the kernel's parameter types once, as a launch does, then
// runs the grid.
template <typename... Params, typename... Args>
void launch_kernel(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t,
                   Args&&... args) {
  std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  cuda_emu::run_grid(name, grid, block, [&] { std::apply(kernel, params); });
}

// As fastverify/triton's plan() assumes on CPU.
inline int multiprocessor_count() { return 2; }

}  // namespace fastverify
