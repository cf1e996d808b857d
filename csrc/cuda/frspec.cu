// CUDA backend of fastverify::lm_head_topk and fastverify::lm_head_sample (FR-Spec drafting).
//
// fastverify/ops/frspec.py is the spec. For hidden row m and subset row v (t_m the row
// temperature, 1 where it is <= 0 or absent):
//
//     s[m, v] = (hidden[m] · weight[v]) / t_m        fp32 accumulation, NaN -> -inf
//     lse[m]  = log Σ_v exp(s[m, v])
//     topk:   the k best (s, v) pairs, better = higher s, then lower v
//     sample: v* = argmax_v (s[m, v] + g[m, v]) (ties -> lower v), no noise where t_m <= 0,
//             g = -log(-log u), u = ((o0 >> 8) + 0.5) · 2^-24,
//             o = Philox4x32-10(seed[m], (pos lo, pos hi, v, 1))
//
// Two launches; the [M, V_sub] logits never reach global memory.
//
// 1. lm_head_partial_kernel, one block of 256 threads per (row block, split of V_sub),
//    row blocks of one split adjacent in the launch (a weight tile then comes from HBM
//    once and from L2 for the other row blocks). The block walks its split in tiles of
//    128 weight rows (64 on the M <= 2 GEMV path where 128 would leave SMs idle); each
//    tile's logits [rows, tile] are computed over the whole of d into shared memory by
//    one of two paths:
//      GEMV (M <= 2, and fp32 with 8 rows per block): each warp owns 1/8 of the tile's
//              weight rows, 4 at a time, its lanes striding over d with 16-byte loads straight from
//              global memory (the next step's weight vectors in flight while the current
//              ones are used; weights bypass L1, hidden rows come from it); the 4·rows
//              lane-partial dot products are summed by a transposing butterfly (31
//              shuffles for 32 sums).
//      tensor cores (fp16/bf16, M > 2; 16 rows per block up to M = 16, else 64):
//              chunks of 64 columns of hidden [rows, 64] and weight [128, 64] are staged
//              in shared memory with 16-byte loads (the next chunk's loads are issued
//              before the current chunk's MMAs); each warp owns a 16x16 (16 rows) or
//              32x32 (64 rows) block of the tile: wmma 16x16x16, fp32 accumulation.
//    Each tile's logits are then folded into per-row state in shared memory: the online
//    softmax (max, sum of exp), and
//      topk, k <= 16: thread lists. The lanes of a row (4, 16 or 32 of them) each insert
//              their columns that beat the row's running k-th key into a sorted list of
//              1, 8 or 16 keys in registers; then k rounds of "best head of the group,
//              popped by its owner" rebuild the row's running top-k (its first lane
//              starts from it). Tiles where no key beats the k-th cost one compare per
//              score.
//      topk, k > 16: one warp per row bitonic-sorts the tile row (4 keys per lane) when a
//              key beats the running k-th and merges it into the split's running list in
//              the workspace (top-64 merge: max(A[i], B[63-i]), then a half-cleaner cascade).
//      sample: each lane's best (s + g, v) with the s it came with, then the group's.
//    Writes per (split, row): (max, sum) and the split's top-k keys (best key and its s).
// 2. topk_merge_kernel (one block of 16 warps per row: each warp merges a share of the
//    splits' sorted lists by bitonic top-k merges, then a tree over the warps) /
//    sample_merge_kernel (one warp per row): lse from the (max, sum) pairs, the result
//    from the candidates; ids through token_map.
//
// Keys: a (s, v) pair is the uint64 (order-preserving bits of s) << 32 | ~v, so "better"
// is "greater key"; key 0 is a sentinel worse than every real pair (s = -inf included).
// -0 is keyed as +0 (they compare equal). Ids always come from an in-range subset row.
//
// Splits: enough blocks for two per SM (at most one split per tile), from shapes only.
// No host synchronisation, no data-dependent shapes; launches on the given stream.
// IEEE fp32 division by the temperature and expf/logf, as the torch backend.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

#include "common.cuh"
#include "ops.h"
#include "philox.cuh"

namespace fastverify {
namespace {

using Key = unsigned long long;

constexpr int kMaxK = 64;                    // fastverify.ops.frspec.MAX_K
constexpr int kMaxListK = 16;                // k up to this: thread-list top-k; above: bitonic
constexpr uint32_t kLmHeadStream = 1;        // Philox counter word c3 of the draft draws

constexpr int kThreads = 256;                // partial kernel
constexpr int kWarps = kThreads / kWarp;
constexpr int kBlockN = 128;                 // weight rows per tile (tensor cores; GEMV: 128 or 64)
constexpr int kSmallTileN = 64;              // GEMV tiles when 128-row tiles give too few blocks

constexpr int kGemvMaxRows = 8;              // rows per block of the fp32 GEMV path with M > 2
constexpr int kGemvGroup = 4;                // weight rows a warp works on at once

constexpr int kTcRows = 64;                  // hidden rows per block on tensor cores (M > 16)
constexpr int kTcSmallRows = 16;             // and for 2 < M <= 16
constexpr int kTcK = 64;                     // columns of d per staged chunk
constexpr int kTcLd = kTcK + 8;              // staged row stride (16-byte skew)

constexpr int kMergeWarps = 16;
constexpr int kMergeThreads = kMergeWarps * kWarp;
constexpr int kMergeBatch = 8;               // lists a warp loads at once
constexpr int kSampleMergeThreads = 256;

// ------------------------------------------------------------------------------ keys

// NaN -> -inf, -0 -> +0.
__device__ __forceinline__ float canonical(float x) { return x != x ? -kInf : (x == 0.f ? 0.f : x); }

__device__ __forceinline__ Key make_key(float s, int64_t v) {
  const int32_t bits = __float_as_int(s);
  const uint32_t ord = static_cast<uint32_t>(bits ^ ((bits >> 31) & 0x7FFFFFFF)) ^ 0x80000000u;
  return (static_cast<Key>(ord) << 32) | static_cast<Key>(~static_cast<uint32_t>(v));
}

__device__ __forceinline__ float key_score(Key key) {
  const int32_t k32 = static_cast<int32_t>(static_cast<uint32_t>(key >> 32) ^ 0x80000000u);
  return __int_as_float(k32 ^ ((k32 >> 31) & 0x7FFFFFFF));
}

__device__ __forceinline__ int64_t key_row(Key key) {
  return static_cast<int64_t>(~static_cast<uint32_t>(key & 0xFFFFFFFFull));
}

__device__ __forceinline__ Key kmax(Key a, Key b) { return a > b ? a : b; }
__device__ __forceinline__ Key kmin(Key a, Key b) { return a > b ? b : a; }

// ------------------------------------------------------------------------------ warp helpers

__device__ __forceinline__ bool warp_any(bool x) {
  int v = x ? 1 : 0;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v |= __shfl_xor_sync(kFullMask, v, o);
  return v != 0;
}

// Online softmax (max m, sum l of exp(x - m)) of a lane: fold in x.
__device__ __forceinline__ void softmax_fold(float& m, float& l, float x) {
  if (x == -kInf) return;
  if (x > m) {
    l = (m == -kInf ? 0.f : l * expf(m - x)) + 1.f;
    m = x;
  } else {
    l += expf(x - m);
  }
}

// (max, sum) over the warp's lanes; every lane gets the result.
__device__ __forceinline__ void softmax_reduce(float& m, float& l) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(kFullMask, m, o);
    const float l2 = __shfl_xor_sync(kFullMask, l, o);
    const float mx = fmaxf(m, m2);
    if (mx == -kInf) {
      l = 0.f;
    } else {
      l = (m == -kInf ? 0.f : l * expf(m - mx)) + (m2 == -kInf ? 0.f : l2 * expf(m2 - mx));
    }
    m = mx;
  }
}

// One compare-exchange stage of a bitonic network over the warp's 32·N keys, key i held
// by lane i % 32 in slot i / 32: partners i, i ^ kD; blocks of kSize with (i & kSize) == 0
// end up descending, the others ascending.
template <int N, int kSize, int kD>
__device__ __forceinline__ void bitonic_stage(Key (&x)[N]) {
  const int lane = threadIdx.x % kWarp;
  if constexpr (kD >= kWarp) {
    constexpr int dp = kD / kWarp;
#pragma unroll
    for (int p = 0; p < N; ++p) {
      if ((p & dp) == 0) {
        const int q = p | dp;
        const bool desc = ((p * kWarp + lane) & kSize) == 0;
        const Key hi = kmax(x[p], x[q]);
        const Key lo = kmin(x[p], x[q]);
        x[p] = desc ? hi : lo;
        x[q] = desc ? lo : hi;
      }
    }
  } else {
    const bool lower = (lane & kD) == 0;
#pragma unroll
    for (int p = 0; p < N; ++p) {
      const bool desc = ((p * kWarp + lane) & kSize) == 0;
      const Key y = __shfl_xor_sync(kFullMask, x[p], kD);
      x[p] = (lower == desc) ? kmax(x[p], y) : kmin(x[p], y);
    }
  }
}

// Stages kD, kD / 2, ..., 1 of blocks of kSize.
template <int N, int kSize, int kD>
__device__ __forceinline__ void bitonic_stages(Key (&x)[N]) {
  bitonic_stage<N, kSize, kD>(x);
  if constexpr (kD > 1) bitonic_stages<N, kSize, kD / 2>(x);
}

template <int N, int kSize>
__device__ __forceinline__ void bitonic_sort_from(Key (&x)[N]) {
  bitonic_stages<N, kSize, kSize / 2>(x);
  if constexpr (kSize < kWarp * N) bitonic_sort_from<N, kSize * 2>(x);
}

// Sorts the warp's 32·N keys descending.
template <int N>
__device__ __forceinline__ void bitonic_sort(Key (&x)[N]) {
  bitonic_sort_from<N, 2>(x);
}

// Sorts a bitonic sequence of 32·N keys descending.
template <int N>
__device__ __forceinline__ void bitonic_merge(Key (&x)[N]) {
  bitonic_stages<N, 2 * kWarp * N, kWarp * N / 2>(x);
}

// Key i = k - 1 of a warp list, in every lane.
template <int N>
__device__ __forceinline__ Key kth_key(const Key (&x)[N], int k) {
  const int i = k - 1;
  Key sel = x[0];
#pragma unroll
  for (int p = 1; p < N; ++p) {
    if (p == i / kWarp) sel = x[p];
  }
  return __shfl_sync(kFullMask, sel, i % kWarp);
}

// ------------------------------------------------------------------------------ noise

// g = -log(-log u), u = ((o0 >> 8) + 0.5) · 2^-24, in fp32 without rounding u: for
// x = o0 >> 8 < 2^23, u is exact; above, 1 - u is exact and -log u = -log1p(-(1 - u)).
// Within an ulp or two of fastverify.ops.philox.gumbel (float64, then rounded).
__device__ __forceinline__ float gumbel(uint64_t seed, uint64_t pos, uint32_t v) {
  const uint4 o = philox4x32_10(seed, static_cast<uint32_t>(pos & 0xFFFFFFFFull), static_cast<uint32_t>(pos >> 32),
                                v, kLmHeadStream);
  const uint32_t x = o.x >> 8;
  const float e = x < (1u << 23) ? -logf((static_cast<float>(x) + 0.5f) * 5.9604644775390625e-08f)
                                 : -log1pf(-((static_cast<float>((1u << 24) - x) - 0.5f) * 5.9604644775390625e-08f));
  return -logf(e);
}

// ------------------------------------------------------------------------------ partial kernel

template <typename T>
struct PartialArgs {
  const T* hidden;            // [M, d], row stride stride_h
  const T* weight;            // [V, d] contiguous
  const float* temperature;   // [M] or nullptr (1)
  const int64_t* seed;        // [M] (sample)
  const int64_t* positions;   // [M] (sample)
  Key* ws_keys;               // topk: [splits, M, k] sorted lists; sample: [splits, M] best keys
  float* ws_stats;            // [splits, M, kStats]: (max, sum[, s of the best key])
  int64_t M, V, d, stride_h;
  int64_t tiles;              // ceil(V / tile rows)
  int tiles_per_split;
  int row_blocks;
  int k;
  bool vec;                   // 16-byte loads of hidden and weight rows
};

// A 16-byte load of weight data, read once per block: not kept in L1 (the hidden rows
// are), L2 as usual (other row blocks of the split read the same tile).
__device__ __forceinline__ uint4 load_weight16(const void* p) {
#ifdef FASTVERIFY_CUDA_EMULATOR
  return *reinterpret_cast<const uint4*>(p);
#else
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p));
  return r;
#endif
}

// fp32 elements of a 16-byte vector of T.
template <typename T>
__device__ __forceinline__ void unpack(const uint4& raw, float (&out)[16 / sizeof(T)]) {
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int j = 0; j < static_cast<int>(16 / sizeof(T)); ++j) out[j] = to_float(e[j]);
}

// Sum over the warp of each of N values (N a power of two <= 32) by a transposing
// butterfly: returns the sum of value (lane >> (5 - log2 N)) in every lane. kO: the
// lane bit of this level.
template <int N, int kO = 16>
__device__ __forceinline__ float transpose_reduce(float* a) {
  static_assert(N >= 1 && N <= kWarp && (N & (N - 1)) == 0, "N: a power of two <= 32");
  if constexpr (N == 1) {
    float v = a[0];
#pragma unroll
    for (int o = kO; o > 0; o /= 2) v += __shfl_xor_sync(kFullMask, v, o);
    return v;
  } else {
    constexpr int half = N / 2;
    const bool upper = (threadIdx.x & kO) != 0;
#pragma unroll
    for (int i = 0; i < half; ++i) {
      const float send = upper ? a[i] : a[i + half];
      const float keep = upper ? a[i + half] : a[i];
      a[i] = keep + __shfl_xor_sync(kFullMask, send, kO);
    }
    return transpose_reduce<half, kO / 2>(a);
  }
}

constexpr int log2_int(int n) {
  int l = 0;
  for (; n > 1; n /= 2) ++l;
  return l;
}

// Per-row state of the block, in shared memory (each row owned by one warp).
template <int kRows>
struct RowState {
  float temp[kRows];   // scoring temperature (1 where <= 0)
  bool noisy[kRows];   // sample: temperature > 0
  uint64_t seed[kRows];
  uint64_t pos[kRows];
  float m[kRows];      // softmax of the tiles so far: max, sum of exp(s - max)
  float l[kRows];
  Key key[kRows];      // topk: the running k-th key; sample: the best key
  float best_s[kRows]; // sample: s of the best key
};

// The running top-k of each row (thread-list top-k: k <= kWidth), sorted, 0-padded.
template <int kRows, int kWidth>
struct RowLists {
  Key list[kRows][kWidth];
};

template <int kRows, int kTileN, int kListWidth>
struct GemvSmem {
  alignas(16) float s[kRows][kTileN + 4];
  RowState<kRows> row;
  RowLists<kRows, kListWidth> lists;
};

template <typename T, int kRows, int kListWidth>
struct TcSmem {
  struct Stage {
    alignas(32) T h[kRows][kTcLd];
    alignas(32) T w[kBlockN][kTcLd];
  };
  union {
    Stage st;
    alignas(32) float s[kRows][kBlockN + 4];  // the tile's logits once every warp is done with st
  };
  RowState<kRows> row;
  RowLists<kRows, kListWidth> lists;
};

// GEMV path: sm.s[m][j] = hidden[m0 + m] · weight[n0 + j] for the kRows rows and the
// tile's 128 weight rows (rows past M / V are clamped: computed, never used).
template <typename T, int kRows, int kTileN, typename Smem>
__device__ void gemv_tile(Smem& sm, const PartialArgs<T>& a, int64_t m0, int64_t n0) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  constexpr int kSums = kGemvGroup * kRows;
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const T* hidden = a.hidden + min(m0, a.M - 1) * a.stride_h;
  const int64_t last_row = a.M - 1 - min(m0, a.M - 1);  // rows of this block past it are clamped to it
  constexpr int kRowsPerWarp = kTileN / kWarps;
#pragma unroll 1
  for (int g = 0; g < kRowsPerWarp / kGemvGroup; ++g) {
    const int j0 = warp * kRowsPerWarp + g * kGemvGroup;
    const T* wrow[kGemvGroup];
#pragma unroll
    for (int r = 0; r < kGemvGroup; ++r) wrow[r] = a.weight + min(n0 + j0 + r, a.V - 1) * a.d;
    float acc[kSums];
#pragma unroll
    for (int i = 0; i < kSums; ++i) acc[i] = 0.f;
    if (a.vec) {
      constexpr int kStep = kWarp * kVec;
      int64_t e = static_cast<int64_t>(lane) * kVec;
      uint4 wv[kGemvGroup];
      if (e < a.d) {
#pragma unroll
        for (int r = 0; r < kGemvGroup; ++r) wv[r] = load_weight16(wrow[r] + e);
      }
      for (; e < a.d; e += kStep) {
        // the next step's weight vectors go in flight before this step's math
        uint4 next[kGemvGroup];
        const bool more = e + kStep < a.d;
        if (more) {
#pragma unroll
          for (int r = 0; r < kGemvGroup; ++r) next[r] = load_weight16(wrow[r] + e + kStep);
        }
        float wf[kGemvGroup][kVec];
#pragma unroll
        for (int r = 0; r < kGemvGroup; ++r) unpack<T>(wv[r], wf[r]);
#pragma unroll
        for (int m = 0; m < kRows; ++m) {
          float hf[kVec];
          unpack<T>(*reinterpret_cast<const uint4*>(hidden + min(static_cast<int64_t>(m), last_row) * a.stride_h + e),
                    hf);
#pragma unroll
          for (int r = 0; r < kGemvGroup; ++r) {
#pragma unroll
            for (int j = 0; j < kVec; ++j) acc[r * kRows + m] = fmaf(wf[r][j], hf[j], acc[r * kRows + m]);
          }
        }
        if (more) {
#pragma unroll
          for (int r = 0; r < kGemvGroup; ++r) wv[r] = next[r];
        }
      }
    } else {
      for (int64_t e = lane; e < a.d; e += kWarp) {
        float wf[kGemvGroup];
#pragma unroll
        for (int r = 0; r < kGemvGroup; ++r) wf[r] = to_float(wrow[r][e]);
#pragma unroll
        for (int m = 0; m < kRows; ++m) {
          const float h = to_float(hidden[min(static_cast<int64_t>(m), last_row) * a.stride_h + e]);
#pragma unroll
          for (int r = 0; r < kGemvGroup; ++r) acc[r * kRows + m] = fmaf(wf[r], h, acc[r * kRows + m]);
        }
      }
    }
    const float sum = transpose_reduce<kSums>(acc);
    constexpr int kShift = 5 - log2_int(kSums);
    if ((lane & ((1 << kShift) - 1)) == 0) {
      const int idx = lane >> kShift;
      sm.s[idx % kRows][j0 + idx / kRows] = sum;
    }
  }
}

// Tensor-core tiles: kRows = 16 (8 warps side by side, one 16x16 fragment each) or
// 64 (2 x 4 warps, 2 x 2 fragments each).
template <int kRows>
struct TcShape {
  static constexpr int kFragsM = kRows >= 64 ? 2 : 1;
  static constexpr int kWarpsM = kRows / (16 * kFragsM);
  static constexpr int kWarpsN = kWarps / kWarpsM;
  static constexpr int kFragsN = kBlockN / (16 * kWarpsN);
  static_assert(kWarpsM * kWarpsN == kWarps && kFragsN >= 1, "tile shape");
};

// 16-byte chunk loads of hidden [kRows, 64] and weight [128, 64] into registers.
template <typename T, int kRows>
struct TcChunk {
  static constexpr int kVec = 8;  // 16-byte vectors of fp16/bf16
  static constexpr int kPerRow = kTcK / kVec;
  static constexpr int kHVecs = kRows * kPerRow;
  static constexpr int kHLoads = (kHVecs + kThreads - 1) / kThreads;
  static constexpr int kWLoads = kBlockN * kPerRow / kThreads;
  uint4 h[kHLoads];
  uint4 w[kWLoads];

  __device__ void load(const PartialArgs<T>& a, int64_t m0, int64_t n0, int64_t c0) {
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
    for (int i = 0; i < kHLoads; ++i) {
      const int c = threadIdx.x + i * kThreads;
      const int row = c / kPerRow;
      const int64_t col = c0 + (c % kPerRow) * kVec;
      h[i] = (c < kHVecs && m0 + row < a.M && col < a.d)
                 ? *reinterpret_cast<const uint4*>(a.hidden + (m0 + row) * a.stride_h + col)
                 : zero;
    }
#pragma unroll
    for (int i = 0; i < kWLoads; ++i) {
      const int c = threadIdx.x + i * kThreads;
      const int row = c / kPerRow;
      const int64_t col = c0 + (c % kPerRow) * kVec;
      w[i] = (n0 + row < a.V && col < a.d) ? load_weight16(a.weight + (n0 + row) * a.d + col) : zero;
    }
  }

  template <typename Smem>
  __device__ void store(Smem& sm) const {
#pragma unroll
    for (int i = 0; i < kHLoads; ++i) {
      const int c = threadIdx.x + i * kThreads;
      if (c < kHVecs) *reinterpret_cast<uint4*>(&sm.st.h[c / kPerRow][(c % kPerRow) * kVec]) = h[i];
    }
#pragma unroll
    for (int i = 0; i < kWLoads; ++i) {
      const int c = threadIdx.x + i * kThreads;
      *reinterpret_cast<uint4*>(&sm.st.w[c / kPerRow][(c % kPerRow) * kVec]) = w[i];
    }
  }
};

// Element-wise staging of a chunk (rows not 16-byte aligned).
template <typename T, int kRows, typename Smem>
__device__ void tc_stage_scalar(Smem& sm, const PartialArgs<T>& a, int64_t m0, int64_t n0, int64_t c0) {
  for (int e = threadIdx.x; e < kRows * kTcK; e += kThreads) {
    const int row = e / kTcK;
    const int64_t col = c0 + e % kTcK;
    sm.st.h[row][e % kTcK] =
        (m0 + row < a.M && col < a.d) ? a.hidden[(m0 + row) * a.stride_h + col] : from_float<T>(0.f);
  }
  for (int e = threadIdx.x; e < kBlockN * kTcK; e += kThreads) {
    const int row = e / kTcK;
    const int64_t col = c0 + e % kTcK;
    sm.st.w[row][e % kTcK] =
        (n0 + row < a.V && col < a.d) ? a.weight[(n0 + row) * a.d + col] : from_float<T>(0.f);
  }
}

// sm.s[m][j] = hidden[m0 + m] · weight[n0 + j] for kRows x 128 (zero past M / V), on tensor cores.
template <typename T, int kRows, typename Smem>
__device__ void tc_tile(Smem& sm, const PartialArgs<T>& a, int64_t m0, int64_t n0) {
  namespace wmma = nvcuda::wmma;
  using Shape = TcShape<kRows>;
  using AccFrag = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  using AFrag = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
  using BFrag = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major>;  // weightᵀ: weight row-major
  const int warp = threadIdx.x / kWarp;
  const int r0 = (warp / Shape::kWarpsN) * 16 * Shape::kFragsM;  // the warp's rows
  const int c0 = (warp % Shape::kWarpsN) * 16 * Shape::kFragsN;  // and columns
  AccFrag acc[Shape::kFragsM][Shape::kFragsN];
#pragma unroll
  for (int i = 0; i < Shape::kFragsM; ++i) {
#pragma unroll
    for (int j = 0; j < Shape::kFragsN; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  }
  const int64_t chunks = (a.d + kTcK - 1) / kTcK;
  TcChunk<T, kRows> regs;
  if (a.vec) regs.load(a, m0, n0, 0);
  for (int64_t c = 0; c < chunks; ++c) {
    __syncthreads();  // every warp is done with the previous chunk (or tile)
    if (a.vec) {
      regs.store(sm);
    } else {
      tc_stage_scalar<T, kRows>(sm, a, m0, n0, c * kTcK);
    }
    __syncthreads();
    if (a.vec && c + 1 < chunks) regs.load(a, m0, n0, (c + 1) * kTcK);  // in flight during the MMAs
#pragma unroll
    for (int kk = 0; kk < kTcK / 16; ++kk) {
      AFrag fa[Shape::kFragsM];
      BFrag fb[Shape::kFragsN];
#pragma unroll
      for (int i = 0; i < Shape::kFragsM; ++i) wmma::load_matrix_sync(fa[i], &sm.st.h[r0 + 16 * i][16 * kk], kTcLd);
#pragma unroll
      for (int j = 0; j < Shape::kFragsN; ++j) wmma::load_matrix_sync(fb[j], &sm.st.w[c0 + 16 * j][16 * kk], kTcLd);
#pragma unroll
      for (int i = 0; i < Shape::kFragsM; ++i) {
#pragma unroll
        for (int j = 0; j < Shape::kFragsN; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
    }
  }
  __syncthreads();  // st is dead: s overlays it
#pragma unroll
  for (int i = 0; i < Shape::kFragsM; ++i) {
#pragma unroll
    for (int j = 0; j < Shape::kFragsN; ++j) {
      wmma::store_matrix_sync(&sm.s[r0 + 16 * i][c0 + 16 * j], acc[i][j], kBlockN + 4, wmma::mem_row_major);
    }
  }
}

// (m, l) <- the softmax of both (m, l) and (m2, l2).
__device__ __forceinline__ void softmax_merge(float& m, float& l, float m2, float l2) {
  const float mx = fmaxf(m, m2);
  if (mx == -kInf) return;
  l = (m == -kInf ? 0.f : l * expf(m - mx)) + (m2 == -kInf ? 0.f : l2 * expf(m2 - mx));
  m = mx;
}

// The epilogue modes: top-k by thread lists (k <= kWidth <= 16), top-k by warp bitonic
// sorts (k <= 32 · kWidth), Gumbel-max sampling.
constexpr int kTopkList = 0;
constexpr int kTopkSort = 1;
constexpr int kSample = 2;

// Width of the shared-memory row lists of a mode.
constexpr int list_width(int mode, int width) { return mode == kTopkList ? width : 1; }

// ---- group epilogue (kTopkList, kSample): row r of the tile is folded by the kGroup
// consecutive lanes t / kGroup == r, lane q = t % kGroup taking columns q + kGroup·j.

// max and sum over the lanes of a group (xor offsets below kGroup stay inside it).
template <int kGroup>
__device__ __forceinline__ void group_softmax_reduce(float& m, float& l) {
#pragma unroll
  for (int o = kGroup / 2; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(kFullMask, m, o);
    const float l2 = __shfl_xor_sync(kFullMask, l, o);
    softmax_merge(m, l, m2, l2);
  }
}

template <int kGroup>
__device__ __forceinline__ Key group_max(Key x) {
#pragma unroll
  for (int o = kGroup / 2; o > 0; o >>= 1) x = kmax(x, __shfl_xor_sync(kFullMask, x, o));
  return x;
}

// The lane's columns c = q + kGroup·j < nvalid of tile row srow (none unless `active`):
// f(x, c) with the row's score x of column c (scaled by 1 / t, canonical), folded into
// the lane's softmax state (m, l) on the way; then (m, l) reduced over the group.
template <int kGroup, int kTileN, typename F>
__device__ __forceinline__ void group_fold_columns(const float* srow, float t, bool active, int q, int nvalid,
                                                   float& m, float& l, F&& f) {
  constexpr int kCols = kTileN / kGroup;
  if (active) {
    for (int j = 0; j < kCols; ++j) {
      const int c = q + kGroup * j;
      if (c >= nvalid) break;
      const float x = canonical(srow[c] / t);
      softmax_fold(m, l, x);
      f(x, c);
    }
  }
  group_softmax_reduce<kGroup>(m, l);
}

// Inserts key into the descending list L (dropping its last key) if it beats that.
template <int KL>
__device__ __forceinline__ void list_insert(Key (&L)[KL], Key key) {
#pragma unroll
  for (int i = KL - 1; i > 0; --i) L[i] = key > L[i - 1] ? L[i - 1] : kmax(L[i], key);
  L[0] = kmax(L[0], key);
}

// Top-k of a tile row by thread lists: each lane inserts its columns that beat the row's
// running k-th key into a sorted list of KL keys in registers (group lane 0 starts from
// the row's running top-k), then k rounds of "the group's best head, popped by its
// owner" rebuild the row's top-k in shared memory.
template <int KL, int kGroup, int kTileN, int kRows>
__device__ void topk_list_fold(const float* srow, RowState<kRows>& rs, Key (&row_list)[KL], int r, bool active,
                               int q, int64_t n0, int nvalid, int k) {
  const float t = rs.temp[r];
  const Key thr = rs.key[r];
  Key L[KL];
#pragma unroll
  for (int i = 0; i < KL; ++i) L[i] = (q == 0 && active) ? row_list[i] : Key{0};
  float m = -kInf;
  float l = 0.f;
  bool inserted = false;
  group_fold_columns<kGroup, kTileN>(srow, t, active, q, nvalid, m, l, [&](float x, int c) {
    const Key key = make_key(x, n0 + c);
    if (key > thr && key > L[KL - 1]) {
      list_insert<KL>(L, key);
      inserted = true;
    }
  });
  if (q == 0 && active) softmax_merge(rs.m[r], rs.l[r], m, l);
  if (!warp_any(inserted)) return;  // no row of the warp changed
  Key best = 0;
  for (int j = 0; j < k; ++j) {
    best = group_max<kGroup>(L[0]);
    if (L[0] == best) {  // the owner (keys are unique; 0: every list is empty)
#pragma unroll
      for (int i = 0; i < KL - 1; ++i) L[i] = L[i + 1];
      L[KL - 1] = 0;
    }
    if (q == 0 && active) row_list[j] = best;
  }
  if (q == 0 && active) rs.key[r] = best;  // the k-th
}

template <int kGroup, int kTileN, int kRows>
__device__ void sample_fold(const float* srow, RowState<kRows>& rs, int r, bool active, int q, int64_t n0,
                            int nvalid) {
  const float t = rs.temp[r];
  const bool noisy = rs.noisy[r];
  const uint64_t seed = rs.seed[r];
  const uint64_t pos = rs.pos[r];
  float m = -kInf;
  float l = 0.f;
  Key best = 0;
  float best_s = -kInf;
  group_fold_columns<kGroup, kTileN>(srow, t, active, q, nvalid, m, l, [&](float x, int c) {
    const int64_t v = n0 + c;
    const float y = noisy ? canonical(x + gumbel(seed, pos, static_cast<uint32_t>(v))) : x;
    const Key key = make_key(y, v);
    if (key > best) {
      best = key;
      best_s = x;
    }
  });
#pragma unroll
  for (int o = kGroup / 2; o > 0; o >>= 1) {
    const Key other = __shfl_xor_sync(kFullMask, best, o);
    const float other_s = __shfl_xor_sync(kFullMask, best_s, o);
    if (other > best) {
      best = other;
      best_s = other_s;
    }
  }
  if (q == 0 && active) {
    softmax_merge(rs.m[r], rs.l[r], m, l);
    if (best > rs.key[r]) {
      rs.key[r] = best;
      rs.best_s[r] = best_s;
    }
  }
}

// ---- warp epilogue (kTopkSort): one warp per row, 4 columns per lane.

// The row's scores of the tile (scaled, canonical; -inf past nvalid), their softmax
// folded into the row state.
template <int kSlots, int kRows>
__device__ __forceinline__ void warp_tile_scores(const float* srow, RowState<kRows>& rs, int r, int nvalid,
                                                 float (&x)[kSlots]) {
  const int lane = threadIdx.x % kWarp;
  const float t = rs.temp[r];
  float m = -kInf;
  float l = 0.f;
#pragma unroll
  for (int p = 0; p < kSlots; ++p) {
    const int j = p * kWarp + lane;
    x[p] = j < nvalid ? canonical(srow[j] / t) : -kInf;
    softmax_fold(m, l, x[p]);
  }
  softmax_reduce(m, l);
  if (lane == 0) softmax_merge(rs.m[r], rs.l[r], m, l);
}

// Folds row r of the tile into its top-k by a bitonic sort of the tile row (4 keys per
// lane) merged into `list`, the split's running top-k of the row (global memory),
// written by the first tile; only when a key beats the running k-th.
template <int P, int kTileN, int kRows>
__device__ void topk_sort_fold(const float* srow, RowState<kRows>& rs, int r, int64_t n0, int nvalid, int k,
                               Key* list, bool first) {
  constexpr int W = kWarp * P;
  const int lane = threadIdx.x % kWarp;
  constexpr int kSlots = kTileN / kWarp;  // keys of the tile row per lane
  static_assert(P <= kSlots, "the tile holds at least the list width");
  float x[kSlots];
  warp_tile_scores<kSlots>(srow, rs, r, nvalid, x);
  const Key thr = rs.key[r];
  Key key[kSlots];
  bool cand = false;
#pragma unroll
  for (int p = 0; p < kSlots; ++p) {
    const int j = p * kWarp + lane;
    key[p] = j < nvalid ? make_key(x[p], n0 + j) : Key{0};
    cand |= key[p] > thr;
  }
  if (!first && !warp_any(cand)) return;  // nothing beats the running k-th
  bitonic_sort<kSlots>(key);
  Key c[P];
#pragma unroll
  for (int p = 0; p < P; ++p) c[p] = key[p];  // the tile's best W, sorted
  if (!first) {
    __syncwarp();  // the list's last writes (other lanes) are visible
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int j = W - 1 - (p * kWarp + lane);
      c[p] = kmax(c[p], j < k ? list[j] : Key{0});
    }
    bitonic_merge<P>(c);
    __syncwarp();  // every lane read the old list
  }
#pragma unroll
  for (int p = 0; p < P; ++p) {
    const int j = p * kWarp + lane;
    if (j < k) list[j] = c[p];
  }
  const Key kth = kth_key<P>(c, k);
  if (lane == 0) rs.key[r] = kth;
}

// kTileN: weight rows per tile (kBlockN on tensor cores); kMode / kWidth: kTopkList / KL,
// kTopkSort / P, kSample / 1.
template <typename T, int kRows, bool kTensorCores, int kTileN, int kMode, int kWidth>
__global__ void __launch_bounds__(kThreads, 2) lm_head_partial_kernel(const PartialArgs<T> a) {
  static_assert(!kTensorCores || kTileN == kBlockN, "tensor-core tiles are kBlockN rows");
  constexpr int kListWidth = list_width(kMode, kWidth);
  using Smem = std::conditional_t<kTensorCores, TcSmem<T, kRows, kListWidth>, GemvSmem<kRows, kTileN, kListWidth>>;
  constexpr int kStats = kMode == kSample ? 3 : 2;
  constexpr int kGroup = kThreads / kRows < kWarp ? kThreads / kRows : kWarp;  // lanes per row (group epilogue)
  __shared__ Smem sm;
  const int warp = threadIdx.x / kWarp;
  const int rb = static_cast<int>(blockIdx.x % a.row_blocks);
  const int64_t split = blockIdx.x / a.row_blocks;
  const int64_t m0 = static_cast<int64_t>(rb) * kRows;
  const int rows = static_cast<int>(min(static_cast<int64_t>(kRows), a.M - m0));
  const int64_t t0 = split * a.tiles_per_split;
  const int64_t t1 = min(t0 + a.tiles_per_split, a.tiles);
  RowState<kRows>& rs = sm.row;

  for (int r = threadIdx.x; r < kRows; r += kThreads) {
    float t = 1.f;
    if (r < rows && a.temperature != nullptr) t = a.temperature[m0 + r];
    rs.noisy[r] = t > 0.f;
    rs.temp[r] = t > 0.f ? t : 1.f;
    rs.seed[r] = (kMode == kSample && r < rows) ? static_cast<uint64_t>(a.seed[m0 + r]) : 0;
    rs.pos[r] = (kMode == kSample && r < rows) ? static_cast<uint64_t>(a.positions[m0 + r]) : 0;
    rs.m[r] = -kInf;
    rs.l[r] = 0.f;
    rs.key[r] = 0;
    rs.best_s[r] = -kInf;
#pragma unroll
    for (int i = 0; i < kListWidth; ++i) sm.lists.list[r][i] = 0;
  }

  // group epilogue: this thread's row and lane in the group; warps past the rows skip
  const int g_row = min(static_cast<int>(threadIdx.x) / kGroup, kRows - 1);
  const bool g_active = static_cast<int>(threadIdx.x) / kGroup < rows;
  const int g_lane = threadIdx.x % kGroup;
  const bool g_warp = warp * (kWarp / kGroup) < rows;  // warp-uniform

  for (int64_t tile = t0; tile < t1; ++tile) {
    const int64_t n0 = tile * kTileN;
    const int nvalid = static_cast<int>(min(static_cast<int64_t>(kTileN), a.V - n0));
    __syncthreads();  // the previous tile's logits are consumed (and the row state is written)
    if constexpr (kTensorCores) {
      tc_tile<T, kRows>(sm, a, m0, n0);
    } else {
      gemv_tile<T, kRows, kTileN>(sm, a, m0, n0);
    }
    __syncthreads();
    if constexpr (kMode == kTopkSort) {
#pragma unroll 1
      for (int r = warp; r < rows; r += kWarps) {  // warp-uniform
        topk_sort_fold<kWidth, kTileN>(&sm.s[r][0], rs, r, n0, nvalid, a.k, a.ws_keys + (split * a.M + m0 + r) * a.k,
                               tile == t0);
      }
    } else if (g_warp) {
      if constexpr (kMode == kTopkList) {
        topk_list_fold<kWidth, kGroup, kTileN>(&sm.s[g_row][0], rs, sm.lists.list[g_row], g_row, g_active, g_lane, n0,
                                       nvalid, a.k);
      } else {
        sample_fold<kGroup, kTileN>(&sm.s[g_row][0], rs, g_row, g_active, g_lane, n0, nvalid);
      }
    }
  }
  __syncthreads();
  for (int r = threadIdx.x; r < rows; r += kThreads) {
    float* stats = a.ws_stats + (split * a.M + m0 + r) * kStats;
    stats[0] = rs.m[r];
    stats[1] = rs.l[r];
    if constexpr (kMode == kSample) {
      stats[2] = rs.best_s[r];
      a.ws_keys[split * a.M + m0 + r] = rs.key[r];
    }
  }
  if constexpr (kMode == kTopkList) {
    for (int e = threadIdx.x; e < rows * a.k; e += kThreads) {
      a.ws_keys[(split * a.M + m0) * a.k + e] = sm.lists.list[e / a.k][e % a.k];
    }
  }
}

// ------------------------------------------------------------------------------ merge kernels

struct MergeArgs {
  const Key* ws_keys;
  const float* ws_stats;
  const void* token_map;  // [V] int32 / int64, or nullptr (ids are subset rows)
  bool map64;
  int64_t* ids;
  float* logprobs;
  float* lse;
  int64_t M, V;
  int k;
  int splits;
};

__device__ __forceinline__ int64_t map_id(const MergeArgs& a, Key key) {
  const int64_t v = min(max(key_row(key), int64_t{0}), a.V - 1);  // always an in-range row
  if (a.token_map == nullptr) return v;
  return a.map64 ? static_cast<const int64_t*>(a.token_map)[v]
                 : static_cast<int64_t>(static_cast<const int32_t*>(a.token_map)[v]);
}

// One block of 16 warps per row: lse from the splits' (max, sum); the top-k of the
// splits' sorted lists, each warp merging a share of them, then a tree over the warps.
template <int P>
__global__ void __launch_bounds__(kMergeThreads) topk_merge_kernel(const MergeArgs a) {
  constexpr int W = kWarp * P;
  __shared__ Key lists[kMergeWarps][W];
  __shared__ float red[kMergeWarps];
  const int64_t row = blockIdx.x;
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;

  // lse: max, then the rescaled sum, in a fixed order
  float m = -kInf;
  for (int s = threadIdx.x; s < a.splits; s += kMergeThreads) m = fmaxf(m, a.ws_stats[(s * a.M + row) * 2]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(kFullMask, m, o));
  if (lane == 0) red[warp] = m;
  __syncthreads();
  m = red[0];
  for (int w = 1; w < kMergeWarps; ++w) m = fmaxf(m, red[w]);
  __syncthreads();
  float l = 0.f;
  if (m != -kInf) {
    for (int s = threadIdx.x; s < a.splits; s += kMergeThreads) {
      const float ms = a.ws_stats[(s * a.M + row) * 2];
      if (ms != -kInf) l += a.ws_stats[(s * a.M + row) * 2 + 1] * expf(ms - m);
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) l += __shfl_xor_sync(kFullMask, l, o);
  if (lane == 0) red[warp] = l;
  __syncthreads();
  l = 0.f;
  for (int w = 0; w < kMergeWarps; ++w) l += red[w];
  const float lse = m == -kInf ? -kInf : m + logf(l);

  // this warp's share of the lists: batches of kMergeBatch, loaded reversed
  Key run[P];
#pragma unroll
  for (int p = 0; p < P; ++p) run[p] = 0;
  Key thr = 0;
  for (int base = warp * kMergeBatch; base < a.splits; base += kMergeWarps * kMergeBatch) {
    Key b[kMergeBatch][P];
#pragma unroll
    for (int j = 0; j < kMergeBatch; ++j) {
      const int s = base + j;
#pragma unroll
      for (int p = 0; p < P; ++p) {
        const int idx = W - 1 - (p * kWarp + lane);
        b[j][p] = (s < a.splits && idx < a.k) ? a.ws_keys[(s * a.M + row) * a.k + idx] : Key{0};
      }
    }
#pragma unroll
    for (int j = 0; j < kMergeBatch; ++j) {
      const Key head = __shfl_sync(kFullMask, b[j][P - 1], kWarp - 1);  // the list's best
      if (head > thr) {  // warp-uniform
#pragma unroll
        for (int p = 0; p < P; ++p) run[p] = kmax(run[p], b[j][p]);
        bitonic_merge<P>(run);
        thr = kth_key<P>(run, a.k);
      }
    }
  }
#pragma unroll
  for (int p = 0; p < P; ++p) lists[warp][p * kWarp + lane] = run[p];
  __syncthreads();
  for (int span = 1; span < kMergeWarps; span *= 2) {
    if (warp % (2 * span) == 0) {
#pragma unroll
      for (int p = 0; p < P; ++p) run[p] = kmax(run[p], lists[warp + span][W - 1 - (p * kWarp + lane)]);
      bitonic_merge<P>(run);
    }
    __syncthreads();  // every read of this level is done
    if (warp % (2 * span) == 0) {
#pragma unroll
      for (int p = 0; p < P; ++p) lists[warp][p * kWarp + lane] = run[p];
    }
    __syncthreads();
  }
  if (warp == 0) {
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int j = p * kWarp + lane;
      if (j < a.k) {
        a.ids[row * a.k + j] = map_id(a, run[p]);
        a.logprobs[row * a.k + j] = key_score(run[p]) - lse;
      }
    }
    if (lane == 0) a.lse[row] = lse;
  }
}

// One warp per row: the best key over the splits, and lse.
__global__ void __launch_bounds__(kSampleMergeThreads) sample_merge_kernel(const MergeArgs a) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kSampleMergeThreads / kWarp) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= a.M) return;  // warp-uniform; no block barrier follows
  float m = -kInf;
  float l = 0.f;
  Key best = 0;
  float best_s = -kInf;
  for (int s = lane; s < a.splits; s += kWarp) {
    const float* st = a.ws_stats + (s * a.M + row) * 3;
    const float ms = st[0];
    const float ls = st[1];
    if (ms != -kInf) {
      if (ms > m) {
        l = (m == -kInf ? 0.f : l * expf(m - ms)) + ls;
        m = ms;
      } else {
        l += ls * expf(ms - m);
      }
    }
    const Key key = a.ws_keys[s * a.M + row];
    if (key > best) {
      best = key;
      best_s = st[2];
    }
  }
  softmax_reduce(m, l);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const Key other = __shfl_xor_sync(kFullMask, best, o);
    const float other_s = __shfl_xor_sync(kFullMask, best_s, o);
    if (other > best) {
      best = other;
      best_s = other_s;
    }
  }
  if (lane == 0) {
    const float lse = m == -kInf ? -kInf : m + logf(l);
    a.ids[row] = map_id(a, best);
    a.logprobs[row] = best_s - lse;
    a.lse[row] = lse;
  }
}

// ------------------------------------------------------------------------------ launchers

struct Plan {
  int rows;            // hidden rows per block
  bool tensor_cores;
  int tile_n;          // weight rows per tile
  int64_t row_blocks;
  int64_t tiles;
  int64_t tiles_per_split;
  int64_t splits;
};

// Path, rows per block and splits from shapes only (num_splits 0: two blocks per SM).
Plan make_plan(int64_t M, int64_t V, at::ScalarType dtype, int64_t num_splits) {
  Plan p;
  p.tensor_cores = dtype != at::kFloat && M > 2;
  p.rows = M <= 2 ? 2 : p.tensor_cores ? (M <= kTcSmallRows ? kTcSmallRows : kTcRows) : kGemvMaxRows;
  p.row_blocks = ceil_div(M, p.rows);
  const int64_t target = 2 * static_cast<int64_t>(multiprocessor_count());  // blocks
  // the M <= 2 GEMV takes 64-row tiles where 128-row ones would leave SMs idle
  p.tile_n = (p.rows == 2 && p.row_blocks * ceil_div(V, kBlockN) < target) ? kSmallTileN : kBlockN;
  p.tiles = ceil_div(V, p.tile_n);
  int64_t splits = num_splits;
  if (splits == 0) splits = ceil_div(target, p.row_blocks);
  splits = std::max<int64_t>(1, std::min(splits, p.tiles));
  p.tiles_per_split = ceil_div(p.tiles, splits);
  p.splits = ceil_div(p.tiles, p.tiles_per_split);
  TORCH_CHECK(p.splits * p.row_blocks < (int64_t{1} << 31), "fastverify_cuda: lm_head grid too large");
  return p;
}

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& token_map,
                  const std::optional<at::Tensor>& temperature, int64_t num_splits) {
  TORCH_CHECK(hidden.device().type() == kKernelDevice, "fastverify_cuda: hidden must be a ", kKernelDevice,
              " tensor, got one on ", hidden.device());
  TORCH_CHECK(weight.device() == hidden.device(), "fastverify_cuda: weight is on ", weight.device(),
              " but hidden on ", hidden.device());
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2, "fastverify_cuda: hidden must be [M, d] and weight [V_sub, d], "
              "got shapes ", hidden.sizes(), " and ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), "fastverify_cuda: weight and hidden must have one dtype, "
              "got ", weight.scalar_type(), " and ", hidden.scalar_type());
  dispatch_float(hidden.scalar_type(), "hidden", [](auto) {});
  const int64_t d = hidden.size(1);
  const int64_t V = weight.size(0);
  TORCH_CHECK(d >= 1 && weight.size(1) == d, "fastverify_cuda: weight must be [V_sub, ", d, "] with d >= 1, got ",
              weight.sizes());
  TORCH_CHECK(V >= 1 && V < (int64_t{1} << 31) - 1, "fastverify_cuda: V_sub = ", V, " out of range");
  TORCH_CHECK(hidden.size(0) < (int64_t{1} << 31), "fastverify_cuda: too many hidden rows: ", hidden.size(0));
  TORCH_CHECK(weight.is_contiguous(), "fastverify_cuda: weight must be contiguous");
  TORCH_CHECK(hidden.size(0) == 0 || d == 1 || hidden.stride(1) == 1,
              "fastverify_cuda: hidden must be contiguous in its last dimension");
  if (token_map.has_value()) {
    TORCH_CHECK(token_map->device() == hidden.device() && token_map->dim() == 1 && token_map->numel() == V &&
                    (token_map->scalar_type() == at::kInt || token_map->scalar_type() == at::kLong),
                "fastverify_cuda: token_map must be int32/int64 [", V, "] on ", hidden.device(), ", got ",
                token_map->scalar_type(), " ", token_map->sizes(), " on ", token_map->device());
  }
  if (temperature.has_value()) {
    TORCH_CHECK(temperature->device() == hidden.device() && temperature->dim() == 1 &&
                    temperature->numel() == hidden.size(0) && temperature->scalar_type() == at::kFloat,
                "fastverify_cuda: temperature must be float32 [", hidden.size(0), "] on ", hidden.device());
  }
  TORCH_CHECK(num_splits >= 0, "fastverify_cuda: num_splits must be >= 0 (0: choose), got ", num_splits);
}

void check_vector(const at::Tensor& x, const char* name, const at::Tensor& hidden) {
  TORCH_CHECK(x.device() == hidden.device() && x.dim() == 1 && x.numel() == hidden.size(0) &&
                  x.scalar_type() == at::kLong,
              "fastverify_cuda: ", name, " must be int64 [", hidden.size(0), "] on ", hidden.device(), ", got ",
              x.scalar_type(), " ", x.sizes(), " on ", x.device());
}

template <typename T>
PartialArgs<T> partial_args(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& temp,
                            const Plan& p) {
  PartialArgs<T> a{};
  a.hidden = static_cast<const T*>(hidden.data_ptr());
  a.weight = static_cast<const T*>(weight.data_ptr());
  a.temperature = temp.defined() ? temp.data_ptr<float>() : nullptr;
  a.M = hidden.size(0);
  a.V = weight.size(0);
  a.d = hidden.size(1);
  a.stride_h = hidden.stride(0);
  a.tiles = p.tiles;
  a.tiles_per_split = static_cast<int>(p.tiles_per_split);
  a.row_blocks = static_cast<int>(p.row_blocks);
  const int64_t elem = static_cast<int64_t>(sizeof(T));
  a.vec = aligned16(a.hidden) && aligned16(a.weight) && (a.d * elem) % 16 == 0 && (a.stride_h * elem) % 16 == 0;
  return a;
}

// lm_head_partial_kernel<T, rows, tensor cores, mode, width> for the plan's path.
template <typename T, int kMode, int kWidth>
void launch_partial(const PartialArgs<T>& a, const Plan& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.row_blocks * p.splits));
  const char* name = "lm_head_partial_kernel";
  if (p.rows == 2 && p.tile_n == kSmallTileN) {
    launch_kernel(name, lm_head_partial_kernel<T, 2, false, kSmallTileN, kMode, kWidth>, grid, dim3(kThreads), stream,
                  a);
  } else if (p.rows == 2) {
    launch_kernel(name, lm_head_partial_kernel<T, 2, false, kBlockN, kMode, kWidth>, grid, dim3(kThreads), stream, a);
  } else if constexpr (std::is_same_v<T, float>) {
    launch_kernel(name, lm_head_partial_kernel<T, kGemvMaxRows, false, kBlockN, kMode, kWidth>, grid, dim3(kThreads),
                  stream, a);
  } else if (p.rows == kTcSmallRows) {
    launch_kernel(name, lm_head_partial_kernel<T, kTcSmallRows, true, kBlockN, kMode, kWidth>, grid, dim3(kThreads),
                  stream, a);
  } else {
    launch_kernel(name, lm_head_partial_kernel<T, kTcRows, true, kBlockN, kMode, kWidth>, grid, dim3(kThreads), stream,
                  a);
  }
}

MergeArgs merge_args(const at::Tensor& ws_keys, const at::Tensor& ws_stats, const std::optional<at::Tensor>& map,
                     const at::Tensor& ids, const at::Tensor& logprobs, const at::Tensor& lse, int64_t M, int64_t V,
                     int k, int64_t splits) {
  MergeArgs m{};
  m.ws_keys = reinterpret_cast<const Key*>(ws_keys.data_ptr<int64_t>());
  m.ws_stats = ws_stats.data_ptr<float>();
  m.token_map = map.has_value() ? map->data_ptr() : nullptr;
  m.map64 = map.has_value() && map->scalar_type() == at::kLong;
  m.ids = ids.data_ptr<int64_t>();
  m.logprobs = logprobs.data_ptr<float>();
  m.lse = lse.data_ptr<float>();
  m.M = M;
  m.V = V;
  m.k = k;
  m.splits = static_cast<int>(splits);
  return m;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> lm_head_topk_cuda(const at::Tensor& hidden, const at::Tensor& weight,
                                                                 int64_t k, const std::optional<at::Tensor>& token_map,
                                                                 const std::optional<at::Tensor>& temperature,
                                                                 int64_t num_splits, int64_t cuda_stream) {
  check_inputs(hidden, weight, token_map, temperature, num_splits);
  const int64_t M = hidden.size(0);
  const int64_t V = weight.size(0);
  TORCH_CHECK(k >= 1 && k <= std::min<int64_t>(V, kMaxK), "fastverify_cuda: k must be in [1, min(V_sub, ", kMaxK,
              ")] = [1, ", std::min<int64_t>(V, kMaxK), "], got ", k);
  const c10::DeviceGuard guard(hidden.device());
  const auto opts = hidden.options();
  at::Tensor ids = at::empty({M, k}, opts.dtype(at::kLong));
  at::Tensor logprobs = at::empty({M, k}, opts.dtype(at::kFloat));
  at::Tensor lse = at::empty({M}, opts.dtype(at::kFloat));
  if (M == 0) return {ids, logprobs, lse};
  const Plan p = make_plan(M, V, hidden.scalar_type(), num_splits);
  const at::Tensor temp = temperature.has_value() ? temperature->contiguous() : at::Tensor();
  const std::optional<at::Tensor> map =
      token_map.has_value() ? std::optional<at::Tensor>(token_map->contiguous()) : std::nullopt;
  at::Tensor ws_keys = at::empty({p.splits, M, k}, opts.dtype(at::kLong));
  at::Tensor ws_stats = at::empty({p.splits, M, 2}, opts.dtype(at::kFloat));
  const cudaStream_t stream = as_stream(cuda_stream);
  dispatch_float(hidden.scalar_type(), "hidden", [&](auto tag) {
    using T = typename decltype(tag)::type;
    PartialArgs<T> a = partial_args<T>(hidden, weight, temp, p);
    a.ws_keys = reinterpret_cast<Key*>(ws_keys.data_ptr<int64_t>());
    a.ws_stats = ws_stats.data_ptr<float>();
    a.k = static_cast<int>(k);
    if (k == 1) {
      launch_partial<T, kTopkList, 1>(a, p, stream);
    } else if (k <= 8) {
      launch_partial<T, kTopkList, 8>(a, p, stream);
    } else if (k <= kMaxListK) {
      launch_partial<T, kTopkList, kMaxListK>(a, p, stream);
    } else {
      launch_partial<T, kTopkSort, 2>(a, p, stream);
    }
  });
  const MergeArgs m = merge_args(ws_keys, ws_stats, map, ids, logprobs, lse, M, V, static_cast<int>(k), p.splits);
  if (k <= kWarp) {
    launch_kernel("topk_merge_kernel", topk_merge_kernel<1>, dim3(static_cast<unsigned>(M)), dim3(kMergeThreads),
                  stream, m);
  } else {
    launch_kernel("topk_merge_kernel", topk_merge_kernel<2>, dim3(static_cast<unsigned>(M)), dim3(kMergeThreads),
                  stream, m);
  }
  return {ids, logprobs, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lm_head_sample_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& temperature, const at::Tensor& seed,
    const at::Tensor& positions, const std::optional<at::Tensor>& token_map, int64_t num_splits,
    int64_t cuda_stream) {
  check_inputs(hidden, weight, token_map, temperature, num_splits);
  check_vector(seed, "seed", hidden);
  check_vector(positions, "positions", hidden);
  const int64_t M = hidden.size(0);
  const int64_t V = weight.size(0);
  const c10::DeviceGuard guard(hidden.device());
  const auto opts = hidden.options();
  at::Tensor ids = at::empty({M}, opts.dtype(at::kLong));
  at::Tensor logprobs = at::empty({M}, opts.dtype(at::kFloat));
  at::Tensor lse = at::empty({M}, opts.dtype(at::kFloat));
  if (M == 0) return {ids, logprobs, lse};
  const Plan p = make_plan(M, V, hidden.scalar_type(), num_splits);
  const at::Tensor temp = temperature.contiguous();
  const at::Tensor sd = seed.contiguous();
  const at::Tensor pos = positions.contiguous();
  const std::optional<at::Tensor> map =
      token_map.has_value() ? std::optional<at::Tensor>(token_map->contiguous()) : std::nullopt;
  at::Tensor ws_keys = at::empty({p.splits, M}, opts.dtype(at::kLong));
  at::Tensor ws_stats = at::empty({p.splits, M, 3}, opts.dtype(at::kFloat));
  const cudaStream_t stream = as_stream(cuda_stream);
  dispatch_float(hidden.scalar_type(), "hidden", [&](auto tag) {
    using T = typename decltype(tag)::type;
    PartialArgs<T> a = partial_args<T>(hidden, weight, temp, p);
    a.seed = sd.data_ptr<int64_t>();
    a.positions = pos.data_ptr<int64_t>();
    a.ws_keys = reinterpret_cast<Key*>(ws_keys.data_ptr<int64_t>());
    a.ws_stats = ws_stats.data_ptr<float>();
    a.k = 1;
    launch_partial<T, kSample, 1>(a, p, stream);
  });
  const MergeArgs m = merge_args(ws_keys, ws_stats, map, ids, logprobs, lse, M, V, 1, p.splits);
  launch_kernel("sample_merge_kernel", sample_merge_kernel,
                dim3(static_cast<unsigned>(ceil_div(M, kSampleMergeThreads / kWarp))), dim3(kSampleMergeThreads),
                stream, m);
  return {ids, logprobs, lse};
}

}  // namespace fastverify
