// CUDA backend of fastverify::rejection_sample and fastverify::tree_rejection_sample.
//
// The same algorithm as the Triton backend (fastverify/triton/rejection.py), kernel for
// kernel; see there and fastverify/ops/rejection.py (the spec) for the math. The
// vocabulary of each target row is cut into chunks of `chunk` tokens (a power of two
// <= 4096 that depends on V alone: fastverify.ops.sampling.default_chunk):
//
// 1. filter_threshold_kernel (only with top_k / top_p), one block per row: radix
//    select of the keep-threshold on the raw logits (8 levels of 16 bins; counts for
//    top-k, probability mass for top-p).            <- _filter_threshold_kernel
// 2. chunk_stats_kernel, one block per (row, chunk): m_c = max z, s_c = sum exp(z - m_c)
//    over kept tokens, and the first argmax of the raw logits.   <- _chunk_stats_kernel
// 3. block_residual_kernel (verify="block" with draft_probs), one block per (draft row,
//    chunk): the residual masses sum_chunk max(p_j P_j - Q_j, 0).  <- _block_residual_kernel
// 4. chain_finalize_kernel / tree_finalize_kernel, one block per request: merge the
//    chunk stats of a row, run the acceptance tests of the rule, draw the emitted token by
//    inverse CDF over chunk masses, then inside one chunk.
//                                     <- _chain_finalize_kernel / _tree_finalize_kernel
//
// Float math is fp32 with IEEE division and the precise expf (no fast math). All
// block-wide reductions and scans have a fixed order, so results are deterministic
// (also under CUDA-graph replay). No host synchronisation, no data-dependent shapes.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include <cfloat>
#include <climits>
#include <cstdint>
#include <optional>
#include <tuple>

#include "common.cuh"
#include "ops.h"
#include "philox.cuh"

namespace fastverify {
namespace {

constexpr float kFltMax = FLT_MAX;
constexpr int kMaxChunk = 4096;  // fastverify.ops.sampling.MAX_CHUNK

// kernel 1: one block per row
constexpr int kThrThreads = 512;
constexpr int kThrWarps = kThrThreads / kWarp;
constexpr int kRadixBins = 16;
constexpr int kRadixLevels = 8;

// kernel 2: one block per (row, chunk); each thread keeps up to kStatsItems values
constexpr int kStatsThreads = 256;
constexpr int kStatsItems = kMaxChunk / kStatsThreads;

// kernel 3: one block per request; scans run over tiles of kScanTile weights
constexpr int kFinThreads = 256;
constexpr int kFinWarps = kFinThreads / kWarp;
constexpr int kScanItems = 16;
constexpr int kScanTile = kFinThreads * kScanItems;

// Draft probability dtypes (runtime: draft_probs may differ from the logits' dtype).
constexpr int kProbsF32 = 0;
constexpr int kProbsBF16 = 1;
constexpr int kProbsF16 = 2;

// ------------------------------------------------------------------------------ helpers

// fp32 logit with NaN -> -inf (_load_logits).
__device__ __forceinline__ float sanitize(float l) { return l == l ? l : -kInf; }

template <typename T>
__device__ __forceinline__ float load_logit(const T* row, int64_t i) {
  return sanitize(to_float(row[i]));
}

// z = min(l / t, FLT_MAX) (_scale).
__device__ __forceinline__ float scale(float l, float t) { return fminf(l / t, kFltMax); }

// Order-preserving float32 -> uint32 key (_float_key: the int64 key in [0, 2^32) is
// key32 + 2^31, which as uint32 is key32 ^ 0x80000000).
__device__ __forceinline__ uint32_t float_key(float x) {
  const int32_t bits = __float_as_int(x);
  const int32_t key32 = bits ^ ((bits >> 31) & 0x7FFFFFFF);
  return static_cast<uint32_t>(key32) ^ 0x80000000u;
}

// Inverse of float_key (_key_float).
__device__ __forceinline__ float key_float(uint32_t key) {
  const int32_t key32 = static_cast<int32_t>(key ^ 0x80000000u);
  const int32_t bits = key32 ^ ((key32 >> 31) & 0x7FFFFFFF);
  return __int_as_float(bits);
}

// int32 or int64 token ids / parents.
struct Ids {
  const void* p;
  bool is64;
  __device__ __forceinline__ int64_t operator[](int64_t i) const {
    return is64 ? static_cast<const int64_t*>(p)[i] : static_cast<int64_t>(static_cast<const int32_t*>(p)[i]);
  }
};

// One row of draft_probs (fp32 / bf16 / fp16).
struct QRow {
  const char* p;
  int kind;
  __device__ __forceinline__ float operator[](int64_t i) const {
    if (kind == kProbsBF16) return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(p)[i]);
    if (kind == kProbsF16) return __half2float(reinterpret_cast<const __half*>(p)[i]);
    return reinterpret_cast<const float*>(p)[i];
  }
};

struct QMat {
  const char* base;
  int64_t row_bytes;
  int kind;
  __device__ __forceinline__ QRow row(int64_t r) const { return QRow{base + r * row_bytes, kind}; }
};

struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct MinIntOp {
  __device__ __forceinline__ int operator()(int a, int b) const { return a < b ? a : b; }
};
struct MaxIntOp {
  __device__ __forceinline__ int operator()(int a, int b) const { return a > b ? a : b; }
};

// Calls f(l) with the sanitized logit of every token of row[0, n), the block's threads
// striding over it; 16-byte loads where `vec_ok` (row 16-byte aligned).
template <typename T, typename F>
__device__ __forceinline__ void for_each_logit(const T* row, int64_t n, bool vec_ok, F&& f) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  int64_t tail = 0;
  if (vec_ok) {
    const int64_t groups = n / kVec;
    const uint4* rv = reinterpret_cast<const uint4*>(row);
    for (int64_t gi = threadIdx.x; gi < groups; gi += blockDim.x) {
      union {
        uint4 raw;
        T v[kVec];
      } u;
      u.raw = rv[gi];
#pragma unroll
      for (int j = 0; j < kVec; ++j) f(sanitize(to_float(u.v[j])));
    }
    tail = groups * kVec;
  }
  for (int64_t i = tail + threadIdx.x; i < n; i += blockDim.x) f(sanitize(to_float(row[i])));
}

// ------------------------------------------------------------- kernel 1: top-k / top-p threshold

struct ThrSmem {
  cub::BlockReduce<float, kThrThreads>::TempStorage reduce;
  float hist[kThrWarps][kRadixBins];
  uint32_t prefix;
  float bcast;
};

// Largest key k* (of a token) with sum_{key >= k*, key >= min_key} w >= target, where
// w = 1 (count) or exp(z - m) (kMass; target is then a fraction of the total). Eight
// passes over the row, each fixing four more bits of k* from a 16-bin histogram
// (_radix_select).
template <bool kMass, typename T>
__device__ uint32_t radix_select(const T* row, int V, bool vec_ok, float t, float m, uint32_t min_key, float target,
                                 ThrSmem& sm) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  uint32_t prefix = 0;
  float above = 0.f;  // used by thread 0 only
  float goal = target;
  for (int level = 0; level < kRadixLevels; ++level) {
    const int shift = 28 - 4 * level;
    float h[kRadixBins];
#pragma unroll
    for (int d = 0; d < kRadixBins; ++d) h[d] = 0.f;
    for_each_logit(row, V, vec_ok, [&](float l) {
      const uint32_t key = float_key(l);
      // level 0 shifts by 32: done on 64 bits (key >> 32 == 0 == prefix)
      if (key >= min_key && (static_cast<uint64_t>(key) >> (shift + 4)) == static_cast<uint64_t>(prefix)) {
        const float w = kMass ? expf(scale(l, t) - m) : 1.f;
        const uint32_t digit = (key >> shift) & 15u;
#pragma unroll
        for (int d = 0; d < kRadixBins; ++d) h[d] += (digit == static_cast<uint32_t>(d)) ? w : 0.f;
      }
    });
#pragma unroll
    for (int d = 0; d < kRadixBins; ++d) {
#pragma unroll
      for (int off = kWarp / 2; off > 0; off /= 2) h[d] += __shfl_xor_sync(kFullMask, h[d], off);
    }
    if (lane == 0) {
#pragma unroll
      for (int d = 0; d < kRadixBins; ++d) sm.hist[warp][d] = h[d];
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      float hist[kRadixBins];
      float total = 0.f;
#pragma unroll
      for (int d = 0; d < kRadixBins; ++d) {
        float s = 0.f;
        for (int w = 0; w < kThrWarps; ++w) s += sm.hist[w][d];
        hist[d] = s;
        total += s;
      }
      if (kMass && level == 0) goal = target * total;
      // d* = the largest digit with above + sum_{d' >= d} hist >= goal, else 0
      int dsel = 0;
      float cum = 0.f;
#pragma unroll
      for (int d = 0; d < kRadixBins; ++d) {
        cum += hist[d];
        const float at_or_above = total - cum + hist[d];
        if (above + at_or_above >= goal) dsel = d;
      }
      float higher = 0.f;
#pragma unroll
      for (int d = 0; d < kRadixBins; ++d) {
        if (d > dsel) higher += hist[d];
      }
      above += higher;
      sm.prefix = prefix * kRadixBins + static_cast<uint32_t>(dsel);
    }
    __syncthreads();
    prefix = sm.prefix;
    // sm.hist / sm.prefix are next written after every thread has passed the barrier
    // above and read them.
  }
  return prefix;
}

// thr[row]: keep token v iff l_v >= thr (top-k, then top-p of the renormalized rest);
// -inf where no filter applies (_filter_threshold_kernel).
template <typename T>
__global__ void __launch_bounds__(kThrThreads)
    filter_threshold_kernel(const T* __restrict__ logits, int64_t stride_l, bool vec_ok, const int32_t* cu,
                            const float* temp, const int32_t* top_k, const float* top_p, float* thr, int B, int V,
                            int row_extra) {
  __shared__ ThrSmem sm;
  const int64_t row = blockIdx.x;
  const int b = request_of_row(cu, row, B, row_extra);
  const T* l_row = logits + row * stride_l;
  float t = temp[b];
  const bool random = t > 0.f;
  t = random ? t : 1.f;
  uint32_t key = 0;
  bool use = false;
  if (top_k != nullptr) {
    const int k = top_k[b];
    const bool use_k = random && k > 0 && k < V;
    if (use_k) key = radix_select<false>(l_row, V, vec_ok, t, 0.f, key, static_cast<float>(k), sm);
    use = use || use_k;
  }
  if (top_p != nullptr) {
    const float p = top_p[b];
    const bool use_p = random && p < 1.f;
    if (use_p) {
      float m = -kInf;
      for_each_logit(l_row, V, vec_ok, [&](float l) { m = fmaxf(m, scale(l, t)); });
      m = cub::BlockReduce<float, kThrThreads>(sm.reduce).Reduce(m, MaxOp{});
      if (threadIdx.x == 0) sm.bcast = m;
      __syncthreads();
      m = sm.bcast;
      key = radix_select<true>(l_row, V, vec_ok, t, m, key, p, sm);
    }
    use = use || use_p;
  }
  if (threadIdx.x == 0) thr[row] = use ? key_float(key) : -kInf;
}

// ------------------------------------------------------------------ kernel 2: chunk stats

// (first argmax of the raw logits, max z) of a set of tokens
struct ArgMaxZ {
  float av;
  int ai;
  float zm;
};

struct ArgMaxZOp {
  __device__ __forceinline__ ArgMaxZ operator()(const ArgMaxZ& x, const ArgMaxZ& y) const {
    const bool take_y = y.av > x.av || (y.av == x.av && y.ai < x.ai);
    return ArgMaxZ{take_y ? y.av : x.av, take_y ? y.ai : x.ai, fmaxf(x.zm, y.zm)};
  }
};

// Per (row, chunk c): m_c = max z, s_c = sum exp(z - m_c) over kept tokens, and the first
// argmax of the raw logits (greedy ignores temperature and filters) (_chunk_stats_kernel).
// stats is [3, R, NC] (m, s, max logit), amax [R, NC] (token id of the chunk's argmax).
template <typename T>
__global__ void __launch_bounds__(kStatsThreads)
    chunk_stats_kernel(const T* __restrict__ logits, int64_t stride_l, bool vec_ok, const int32_t* cu,
                       const float* temp, const float* thr, float* stats, int32_t* amax, int B, int64_t R, int V,
                       int NC, int chunk, int row_extra, bool entropy) {
  using Reduce1 = cub::BlockReduce<ArgMaxZ, kStatsThreads>;
  using Reduce2 = cub::BlockReduce<float, kStatsThreads>;
  __shared__ union {
    typename Reduce1::TempStorage r1;
    typename Reduce2::TempStorage r2;
  } tmp;
  __shared__ float zmax_bcast;

  const int64_t row = blockIdx.x;
  const int b = request_of_row(cu, row, B, row_extra);
  float t = temp[b];
  t = t > 0.f ? t : 1.f;
  const bool has_thr = thr != nullptr;
  const float th = has_thr ? thr[row] : -kInf;
  const T* l_row = logits + row * stride_l;
  const int64_t RNC = R * NC;

  for (int c = blockIdx.y; c < NC; c += gridDim.y) {
    const int64_t first = static_cast<int64_t>(c) * chunk;
    const int nvalid = static_cast<int>(min(static_cast<int64_t>(chunk), static_cast<int64_t>(V) - first));
    const T* ch = l_row + first;
    float z[kStatsItems];
    ArgMaxZ loc{-kInf, INT_MAX, -kInf};
    // token e of the chunk with raw value `raw`; e >= nvalid is off the row
    auto visit = [&](int e, float raw, float& z_out) {
      float zz = -kInf;
      if (e < nvalid) {
        const float l = sanitize(raw);
        if (l > loc.av || (l == loc.av && e < loc.ai)) {
          loc.av = l;
          loc.ai = e;
        }
        zz = scale(l, t);
        if (has_thr && !(l >= th)) zz = -kInf;
      }
      z_out = zz;
      loc.zm = fmaxf(loc.zm, zz);
    };
    if (vec_ok) {
      constexpr int kVec = 16 / static_cast<int>(sizeof(T));
      constexpr int kGroups = kStatsItems / kVec;
#pragma unroll
      for (int k = 0; k < kGroups; ++k) {
        const int e0 = (static_cast<int>(threadIdx.x) + k * kStatsThreads) * kVec;
        union {
          uint4 raw;
          T v[kVec];
        } u;
        u.raw = make_uint4(0u, 0u, 0u, 0u);
        if (e0 + kVec <= nvalid) {
          u.raw = *reinterpret_cast<const uint4*>(ch + e0);
        } else {
#pragma unroll
          for (int j = 0; j < kVec; ++j) {
            if (e0 + j < nvalid) u.v[j] = ch[e0 + j];
          }
        }
#pragma unroll
        for (int j = 0; j < kVec; ++j) visit(e0 + j, to_float(u.v[j]), z[k * kVec + j]);
      }
    } else {
#pragma unroll
      for (int k = 0; k < kStatsItems; ++k) {
        const int e = static_cast<int>(threadIdx.x) + k * kStatsThreads;
        visit(e, e < nvalid ? to_float(ch[e]) : 0.f, z[k]);
      }
    }

    const ArgMaxZ red = Reduce1(tmp.r1).Reduce(loc, ArgMaxZOp{});  // valid in thread 0
    if (threadIdx.x == 0) zmax_bcast = red.zm;
    __syncthreads();
    const float m = zmax_bcast;
    float s = 0.f;
    float e = 0.f;  // sum exp(z - m) (z - m): the row's entropy follows from it (load_row)
#pragma unroll
    for (int k = 0; k < kStatsItems; ++k) {
      if (z[k] > -kInf) {
        const float x = expf(z[k] - m);
        s += x;
        e += x * (z[k] - m);
      }
    }
    s = Reduce2(tmp.r2).Sum(s);
    if (entropy) {
      __syncthreads();  // tmp.r2 is reused
      e = Reduce2(tmp.r2).Sum(e);
    }
    if (threadIdx.x == 0) {
      const int64_t i = row * NC + c;
      stats[i] = m;
      stats[RNC + i] = s;
      stats[2 * RNC + i] = red.av;
      amax[i] = c * chunk + red.ai;
      if (entropy) stats[3 * RNC + i] = e;
    }
    __syncthreads();  // tmp and zmax_bcast are reused by the next chunk
  }
}

// ------------------------------------------------------------- kernel 3: block-wide pieces

struct RowMax {
  float m;  // max of the chunk maxima m_c
  float a;  // max of the chunk max logits
  int c;    // first chunk holding a
};

struct RowMaxOp {
  __device__ __forceinline__ RowMax operator()(const RowMax& x, const RowMax& y) const {
    const bool take_y = y.a > x.a || (y.a == x.a && y.c < x.c);
    return RowMax{fmaxf(x.m, y.m), take_y ? y.a : x.a, take_y ? y.c : x.c};
  }
};

using FinReduceF = cub::BlockReduce<float, kFinThreads>;
using FinReduceI = cub::BlockReduce<int, kFinThreads>;
using FinReduceRM = cub::BlockReduce<RowMax, kFinThreads>;
using FinScan = cub::BlockScan<float, kFinThreads>;

struct FinSmem {
  union {
    FinReduceF::TempStorage rf;
    FinReduceI::TempStorage ri;
    FinReduceRM::TempStorage rm;
    FinScan::TempStorage scan;
  } tmp;
  RowMax rm;
  float f;
  int i;
};

// The value of the one thread with `mine` set, broadcast to every thread through `slot`.
// Ends with a barrier, so the slot, and the temp storage of a reduction that fed it, are
// free again when it returns.
template <typename V>
__device__ __forceinline__ V block_broadcast(bool mine, V value, V& slot) {
  if (mine) slot = value;
  __syncthreads();
  const V out = slot;
  __syncthreads();
  return out;
}

// Block-wide reductions (valid in thread 0), result broadcast to every thread.
__device__ __forceinline__ float block_sum(float x, FinSmem& sm) {
  return block_broadcast(threadIdx.x == 0, FinReduceF(sm.tmp.rf).Sum(x), sm.f);
}

__device__ __forceinline__ int block_min(int x, FinSmem& sm) {
  return block_broadcast(threadIdx.x == 0, FinReduceI(sm.tmp.ri).Reduce(x, MinIntOp{}), sm.i);
}

__device__ __forceinline__ int block_max(int x, FinSmem& sm) {
  return block_broadcast(threadIdx.x == 0, FinReduceI(sm.tmp.ri).Reduce(x, MaxIntOp{}), sm.i);
}

// One target row in a finalize kernel: its processed distribution p (block-uniform).
template <typename T>
struct Row {
  const T* l;       // logits row
  const float* m;   // chunk maxima m_c of the row
  const float* s;   // chunk sums s_c of the row
  float t;          // temperature (1 for greedy)
  float thr;        // keep-threshold (-inf: none)
  bool has_thr;
  int V, NC, chunk;
  float M;  // max_c m_c
  float S;  // sum of the chunk masses: lse = M + log S
  int g;    // first argmax of the row's raw logits
  float H;  // entropy -sum p log p (with the entropy stats; else 0)

  // mass of chunk c relative to exp(M)
  __device__ __forceinline__ float mass(int c) const {
    const float mc = m[c];
    return mc > -kInf ? s[c] * expf(mc - M) : 0.f;
  }

  // p(x) with the given normalizer (_prob_at); x is a valid id or -1 (then 0).
  __device__ __forceinline__ float prob_at(int x, float norm) const {
    const float lx = x >= 0 ? load_logit(l, x) : -kInf;
    const float zx = scale(lx, t);
    const bool kept = zx > -kInf && (!has_thr || lx >= thr);
    return (kept && norm > 0.f) ? expf(zx - M) / norm : 0.f;
  }

  // exp(z - M) / norm at token `off` if kept, else 0; 0 off the row (_chunk_probs).
  __device__ __forceinline__ float chunk_prob(int64_t off, float norm) const {
    if (off < 0 || off >= V) return 0.f;
    const float lv = load_logit(l, off);
    const float z = scale(lv, t);
    const bool kept = z > -kInf && (!has_thr || lv >= thr);
    return kept ? expf(z - M) / norm : 0.f;
  }
};

// Merge a row's chunk stats (_row_stats / _chain_rows); with `entropy`, stats has the
// fourth plane e_c and the row's entropy is H = log S - (1/S) sum_c e^{m_c - M} (e_c + (m_c - M) s_c).
template <typename T>
__device__ Row<T> load_row(const T* logits, int64_t stride_l, const float* thr, const float* stats,
                           const int32_t* amax, int64_t row, int64_t R, int V, int NC, int chunk, float t,
                           FinSmem& sm, bool entropy = false) {
  Row<T> r;
  const int64_t base = row * NC;
  const int64_t RNC = R * NC;
  r.l = logits + row * stride_l;
  r.m = stats + base;
  r.s = stats + RNC + base;
  const float* a = stats + 2 * RNC + base;
  r.t = t;
  r.has_thr = thr != nullptr;
  r.thr = r.has_thr ? thr[row] : -kInf;
  r.V = V;
  r.NC = NC;
  r.chunk = chunk;

  RowMax loc{-kInf, -kInf, INT_MAX};
  for (int c = threadIdx.x; c < NC; c += kFinThreads) loc = RowMaxOp{}(loc, RowMax{r.m[c], a[c], c});
  const RowMax all = block_broadcast(threadIdx.x == 0, FinReduceRM(sm.tmp.rm).Reduce(loc, RowMaxOp{}), sm.rm);
  r.M = all.m;
  float w = 0.f;
  for (int c = threadIdx.x; c < NC; c += kFinThreads) w += r.mass(c);
  r.S = block_sum(w, sm);
  r.g = amax[base + all.c];  // all.c < NC: chunk 0 always takes part
  r.H = 0.f;
  if (entropy) {
    const float* e = stats + 3 * RNC + base;
    float tsum = 0.f;
    for (int c = threadIdx.x; c < NC; c += kFinThreads) {
      const float mc = r.m[c];
      if (mc > -kInf) tsum += expf(mc - r.M) * (e[c] + (mc - r.M) * r.s[c]);
    }
    tsum = block_sum(tsum, sm);
    r.H = r.S > 0.f ? logf(r.S) - tsum / r.S : 0.f;
  }
  return r;
}

struct Pick {
  int i;       // index, or -1
  float rest;  // target - sum_{j < i} w_j
};

// Inverse CDF over weights wf(0..N-1) >= 0 (_inverse_cdf): the first i with running sum
// > target; else the last i with w > 0; else -1. Returns (i, target - sum_{j<i} w_j),
// the latter as target - (cum_i - w_i) like the Triton kernel. Tiles of kScanTile
// weights, blocked over the threads, carried from tile to tile.
template <typename WF>
__device__ Pick block_inverse_cdf(int N, float target, const WF& wf, FinSmem& sm) {
  float carry = 0.f;
  int last = -1;
  float last_before = 0.f;
  for (int tile = 0; tile < N; tile += kScanTile) {
    const int first = tile + static_cast<int>(threadIdx.x) * kScanItems;
    float w[kScanItems];
    float cum[kScanItems];
#pragma unroll
    for (int j = 0; j < kScanItems; ++j) w[j] = (first + j < N) ? wf(first + j) : 0.f;
    float aggregate;
    FinScan(sm.tmp.scan).InclusiveSum(w, cum, aggregate);
    __syncthreads();  // the scan's storage is reused below
    int my_first = INT_MAX;
    int my_last = -1;
#pragma unroll
    for (int j = 0; j < kScanItems; ++j) {
      cum[j] += carry;
      const int idx = first + j;
      if (idx < N) {
        if (my_first == INT_MAX && cum[j] > target) my_first = idx;
        if (w[j] > 0.f) my_last = idx;
      }
    }
    // sum_{j < i} w_j for an index i of the tile, from the thread that holds it
    auto sum_before = [&](int i) {
      bool mine = false;
      float before = 0.f;
#pragma unroll
      for (int j = 0; j < kScanItems; ++j) {
        if (first + j == i) {
          mine = true;
          before = cum[j] - w[j];
        }
      }
      return block_broadcast(mine, before, sm.f);
    };
    const int hit = block_min(my_first, sm);
    if (hit != INT_MAX) return Pick{hit, target - sum_before(hit)};
    const int pos = block_max(my_last, sm);
    if (pos >= 0) {
      last = pos;
      last_before = sum_before(pos);
    }
    carry += aggregate;
  }
  return Pick{last, last >= 0 ? target - last_before : target};
}

// Token ~ p with token `excl` left out (-1: none), from the chunk masses (_sample_p).
template <typename T>
__device__ int sample_p(const Row<T>& r, int excl, float u, FinSmem& sm) {
  const float ex = r.prob_at(excl, 1.f);  // mass of excl relative to exp(M)
  const int ex_chunk = excl >= 0 ? excl / r.chunk : -1;
  auto wf = [&](int c) {
    const float w = r.mass(c);
    return c == ex_chunk ? fmaxf(w - ex, 0.f) : w;
  };
  float tot = 0.f;
  for (int c = threadIdx.x; c < r.NC; c += kFinThreads) tot += wf(c);
  tot = block_sum(tot, sm);
  const Pick pc = block_inverse_cdf(r.NC, u * tot, wf, sm);
  if (pc.i < 0) return r.g;
  const int64_t first = static_cast<int64_t>(pc.i) * r.chunk;
  const Pick pt = block_inverse_cdf(
      r.chunk, pc.rest,
      [&](int e) {
        const int64_t off = first + e;
        return off == excl ? 0.f : r.chunk_prob(off, 1.f);
      },
      sm);
  return pt.i >= 0 ? static_cast<int>(first + pt.i) : r.g;
}

// r_k at a token with target prob p and draft prob q after k recorded rejections:
// r <- max(r - q / sigma_i, 0) / rho_{i+1} for i < k, (sigma_i, rho_{i+1}) = ws[2i], ws[2i+1],
// from r = a p (a = 1 but for the block rule's p_tau) (_rrs_value). ws is written by this
// block (no read-only cache path).
__device__ __forceinline__ float rrs_value(float p, float q, const float* ws, int k, float a = 1.f) {
  float r = a * p;
  for (int i = 0; i < k; ++i) {
    const float sigma = ws[2 * i];
    const float rho = ws[2 * i + 1];
    r = fmaxf(r - q / sigma, 0.f);
    if (rho > 0.f) r = r / rho;
  }
  return r;
}

// max(r_k - q / sigma, 0) at token `off`, 0 off the row (_residual_chunk).
template <typename T>
__device__ __forceinline__ float residual_at(const Row<T>& r, QRow q, int64_t off, const float* ws, int k,
                                             float sigma, float a = 1.f) {
  if (off < 0 || off >= r.V) return 0.f;
  const float p = r.chunk_prob(off, r.S);
  const float qv = q[off];
  return fmaxf(rrs_value(p, qv, ws, k, a) - qv / sigma, 0.f);
}

// Per-chunk masses of the unnormalized residual max(r_k - q / sigma, 0) into wbuf[0, NC)
// (one pass over the row, a warp per chunk); returns their sum (_residual_masses).
template <typename T>
__device__ float residual_masses(const Row<T>& r, QRow q, const float* ws, int k, float sigma, float* wbuf,
                                 FinSmem& sm) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  for (int c = warp; c < r.NC; c += kFinWarps) {
    const int64_t first = static_cast<int64_t>(c) * r.chunk;
    float acc = 0.f;
    for (int e = lane; e < r.chunk; e += kWarp) acc += residual_at(r, q, first + e, ws, k, sigma);
#pragma unroll
    for (int off = kWarp / 2; off > 0; off /= 2) acc += __shfl_xor_sync(kFullMask, acc, off);
    if (lane == 0) wbuf[c] = acc;
  }
  __syncthreads();
  float tot = 0.f;
  for (int c = threadIdx.x; c < r.NC; c += kFinThreads) tot += wbuf[c];
  return block_sum(tot, sm);
}

// Token ~ max(r_k - q / sigma, 0) given its chunk masses in wbuf; -1 if they have no mass
// (_sample_residual).
template <typename T>
__device__ int sample_residual(const Row<T>& r, QRow q, const float* wbuf, float u, const float* ws, int k,
                               float sigma, FinSmem& sm, float a = 1.f) {
  float tot = 0.f;
  for (int c = threadIdx.x; c < r.NC; c += kFinThreads) tot += wbuf[c];
  tot = block_sum(tot, sm);
  const Pick pc = block_inverse_cdf(r.NC, u * tot, [&](int c) { return wbuf[c]; }, sm);
  if (pc.i < 0) return -1;
  const int64_t first = static_cast<int64_t>(pc.i) * r.chunk;
  const Pick pt = block_inverse_cdf(
      r.chunk, pc.rest, [&](int e) { return residual_at(r, q, first + e, ws, k, sigma, a); }, sm);
  return pt.i >= 0 ? static_cast<int>(first + pt.i) : -1;
}

// Token ~ p truncated to p >= cut (typical acceptance's next token, _sample_typical):
// chunk masses into wbuf (a warp per chunk), then one chunk to place u; the argmax if
// nothing is left (cannot happen: max p >= e^{-H} > cut).
template <typename T>
__device__ int sample_typical(const Row<T>& r, float cut, float u, float* wbuf, FinSmem& sm) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  auto kept = [&](int64_t off) {
    const float p = r.chunk_prob(off, r.S);
    return p >= cut ? p : 0.f;
  };
  for (int c = warp; c < r.NC; c += kFinWarps) {
    const int64_t first = static_cast<int64_t>(c) * r.chunk;
    float acc = 0.f;
    for (int e = lane; e < r.chunk; e += kWarp) acc += kept(first + e);
#pragma unroll
    for (int off = kWarp / 2; off > 0; off /= 2) acc += __shfl_xor_sync(kFullMask, acc, off);
    if (lane == 0) wbuf[c] = acc;
  }
  __syncthreads();
  float tot = 0.f;
  for (int c = threadIdx.x; c < r.NC; c += kFinThreads) tot += wbuf[c];
  tot = block_sum(tot, sm);
  const Pick pc = block_inverse_cdf(r.NC, u * tot, [&](int c) { return wbuf[c]; }, sm);
  if (pc.i < 0) return r.g;
  const int64_t first = static_cast<int64_t>(pc.i) * r.chunk;
  const Pick pt = block_inverse_cdf(r.chunk, pc.rest, [&](int e) { return kept(first + e); }, sm);
  return pt.i >= 0 ? static_cast<int>(first + pt.i) : r.g;
}

// p_i = min(p_{i-1} P(x_i) / Q(x_i), 1) without 0/0 (block_ratio of the torch spec).
__device__ __forceinline__ float block_ratio(float prev, float px, float qx) {
  const float num = prev * px;
  if (num >= qx && num > 0.f) return 1.f;
  return qx > 0.f ? num / qx : 0.f;
}

// ---------------------------------------------------------------- kernels 3-4: chains

// Verification rules of the chain op (fastverify.triton.rejection.CHAIN_RULES).
constexpr int kRuleToken = 0;
constexpr int kRuleBlock = 1;
constexpr int kRuleTypical = 2;
// ... and of the tree op (fastverify._layout.TREE_RULES).
constexpr int kTreeSpecInfer = 0;
constexpr int kTreeBlock = 1;
constexpr int kTreeBlockWor = 2;

template <typename T>
struct ChainArgs {
  const T* logits;
  int64_t stride_l;
  QMat q;
  bool has_q;  // draft_probs given
  Ids draft;
  const int32_t* cu;
  const float* temp;
  const int64_t* seed;
  const int64_t* pos;
  const float* thr;  // nullptr: no top-k / top-p
  const float* stats;
  const int32_t* amax;
  float* wbuf;        // [B, NC] chunk masses of the sampled row (draft_probs or typical)
  float* wres;        // [R, NC] block rule: residual masses of every draft row (with draft_probs)
  const float* eps;   // [B] typical's epsilon and delta
  const float* delta;
  int32_t* out;
  int32_t* num;
  int64_t R;
  int64_t N;
  int V;
  int NC;
  int chunk;
  int max_draft_len;
  int rule;
  int B;
};

// First draft, first row and number of drafts of a request (_chain_request): unchecked
// prefix sums must not move a read outside [0, N) drafts or [0, R) rows.
struct ChainRequest {
  int64_t start;
  int64_t row0;
  int64_t K;
};

template <typename T>
__device__ __forceinline__ ChainRequest chain_request(const ChainArgs<T>& a, int b) {
  int64_t start = a.cu[b];
  int64_t row0 = start + b;
  const bool ok = start >= 0 && start <= a.N && row0 < a.R;
  int64_t K = static_cast<int64_t>(a.cu[b + 1]) - start;
  K = min(min(K, static_cast<int64_t>(a.max_draft_len)), min(a.N - start, a.R - 1 - row0));
  return ChainRequest{ok ? start : 0, ok ? row0 : 0, ok ? max(K, static_cast<int64_t>(0)) : 0};
}

// Draft j of a request: (id or -1 if out of the vocabulary, P_j(x), Q_j(x): 1 for a point mass).
struct Draft {
  int x;
  float px;
  float qx;
};

template <typename T>
__device__ __forceinline__ Draft draft_at(const ChainArgs<T>& a, const Row<T>& r, int64_t start, int64_t j) {
  const int64_t x = a.draft[start + j];
  const bool valid = x >= 0 && x < a.V;
  const int xi = valid ? static_cast<int>(x) : -1;
  const float qx = a.has_q ? (valid ? a.q.row(start + j)[xi] : 0.f) : 1.f;
  return Draft{xi, r.prob_at(xi, r.S), qx};
}

template <typename T>
__device__ __forceinline__ Row<T> chain_row(const ChainArgs<T>& a, int64_t row, float t, FinSmem& sm) {
  return load_row(a.logits, a.stride_l, a.thr, a.stats, a.amax, row, a.R, a.V, a.NC, a.chunk, t, sm,
                  a.rule == kRuleTypical);
}

// Block rule, one block per (row, chunk): wres[row, c] = sum_{x in c} max(p_j P_j(x) - Q_j(x), 0)
// for a draft row j of a sampling request, else 0 (_block_residual_kernel). p_j is computed
// as the finalize kernel computes it (the same rows, the same order of operations).
template <typename T>
__global__ void __launch_bounds__(kFinThreads) block_residual_kernel(const ChainArgs<T> a) {
  __shared__ FinSmem sm;
  const int64_t row = blockIdx.x;
  const int b = request_of_row(a.cu, row, a.B, 1);
  const ChainRequest req = chain_request(a, b);
  float t = a.temp[b];
  const bool random = t > 0.f;
  t = random ? t : 1.f;
  const int64_t j_row = row - req.row0;
  float* w = a.wres + row * a.NC;
  if (!random || j_row < 0 || j_row >= req.K) {
    for (int c = blockIdx.y; c < a.NC; c += gridDim.y) {
      if (threadIdx.x == 0) w[c] = 0.f;
    }
    return;
  }
  float p = 1.f;  // p_{j_row}
  for (int64_t j = 0; j < j_row; ++j) {
    const Row<T> r = chain_row(a, req.row0 + j, t, sm);
    const Draft d = draft_at(a, r, req.start, j);
    p = block_ratio(p, d.px, d.qx);
  }
  const Row<T> r = chain_row(a, row, t, sm);
  const QRow q = a.q.row(req.start + j_row);
  for (int c = blockIdx.y; c < a.NC; c += gridDim.y) {
    const int64_t first = static_cast<int64_t>(c) * a.chunk;
    float acc = 0.f;
    for (int e = threadIdx.x; e < a.chunk; e += kFinThreads) {
      const int64_t off = first + e;
      if (off < a.V) acc += fmaxf(p * r.chunk_prob(off, r.S) - q[off], 0.f);
    }
    acc = block_sum(acc, sm);
    if (threadIdx.x == 0) w[c] = acc;
  }
}

// One request: the accepted length tau of the rule, then the recovered or bonus token
// (_chain_finalize_kernel).
template <typename T>
__global__ void __launch_bounds__(kFinThreads) chain_finalize_kernel(const ChainArgs<T> a) {
  __shared__ FinSmem sm;
  const int b = blockIdx.x;
  const bool has_q = a.has_q;
  const int64_t W = static_cast<int64_t>(a.max_draft_len) + 1;
  int32_t* out = a.out + b * W;
  for (int64_t col = threadIdx.x; col < W; col += kFinThreads) out[col] = -1;
  __syncthreads();  // thread 0 overwrites some of these below

  const ChainRequest req = chain_request(a, b);
  const int64_t start = req.start;
  const int64_t row0 = req.row0;
  const int64_t K = req.K;
  float t = a.temp[b];
  const bool random = t > 0.f;
  t = random ? t : 1.f;
  const int64_t seed = a.seed[b];
  const int64_t pos = a.pos[b];

  int n_acc = 0;
  float scale = 1.f;  // block: p_tau, which scales the residual
  if (a.rule == kRuleBlock && random) {
    // h_j = Z_j / (Z_j + 1 - p_j) (1 <= j < K), h_K = p_K; tau = the last j with eta_j < h_j,
    // eta_j = the token rule's u of draft j (position pos + j - 1)
    float p = 1.f;  // p_j
    for (int64_t j = 0; j <= K; ++j) {
      float h = p;
      Draft d{-1, 0.f, 1.f};
      if (j < K) {
        const Row<T> r = chain_row(a, row0 + j, t, sm);
        d = draft_at(a, r, start, j);
        if (j >= 1) {
          float Z = p * (1.f - d.px);  // Q_j a point mass at x_{j+1}
          if (has_q) {
            const float* wr = a.wres + (row0 + j) * a.NC;
            float z = 0.f;
            for (int c = threadIdx.x; c < a.NC; c += kFinThreads) z += wr[c];
            Z = block_sum(z, sm);
          }
          const float den = Z + 1.f - p;
          h = den > 0.f ? Z / den : 1.f;
        }
      }
      if (j >= 1 && uniform_pair(seed, pos + j - 1, 0u).x < h) {
        n_acc = static_cast<int>(j);
        scale = p;
      }
      if (j < K) p = block_ratio(p, d.px, d.qx);
    }
    if (threadIdx.x == 0) {
      for (int j = 0; j < n_acc; ++j) {
        const int64_t x = a.draft[start + j];
        out[j] = static_cast<int>(x);  // accepted drafts are in the vocabulary (p_j > 0)
      }
    }
  } else {
    for (int64_t j = 0; j < K; ++j) {
      const Row<T> r = chain_row(a, row0 + j, t, sm);
      const Draft d = draft_at(a, r, start, j);
      bool accept;
      if (a.rule == kRuleTypical) {
        accept = d.px > fminf(a.eps[b], a.delta[b] * expf(-r.H));
      } else {
        const float u = uniform_pair(seed, pos + j, 0u).x;
        accept = has_q ? u * d.qx < d.px : u < d.px;
      }
      accept = d.x >= 0 && (random ? accept : d.x == r.g);
      if (!accept) break;
      if (threadIdx.x == 0) out[j] = d.x;
      ++n_acc;
    }
  }

  const int64_t row = row0 + n_acc;
  const Row<T> r = chain_row(a, row, t, sm);
  int token = r.g;
  if (random) {
    const float u = uniform_pair(seed, pos + n_acc, 0u).y;
    int excl = -1;
    if (n_acc < K) {
      const int64_t x = a.draft[start + n_acc];
      excl = (x >= 0 && x < a.V) ? static_cast<int>(x) : -1;
    }
    token = -1;
    float* wbuf = a.wbuf + static_cast<int64_t>(b) * a.NC;
    if (a.rule == kRuleTypical) {
      token = sample_typical(r, fminf(a.eps[b], a.delta[b] * expf(-r.H)), u, wbuf, sm);
    } else if (has_q && excl >= 0) {
      // residual max(a p - q, 0) (a = p_tau for block, 1 for token): its chunk masses (block:
      // from block_residual_kernel), then one chunk to place u
      const QRow q = a.q.row(start + n_acc);
      const float* masses = wbuf;
      if (a.rule == kRuleBlock) {
        masses = a.wres + row * a.NC;
      } else {
        residual_masses(r, q, nullptr, 0, 1.f, wbuf, sm);
      }
      token = sample_residual(r, q, masses, u, nullptr, 0, 1.f, sm, scale);
    }
    if (token < 0) token = sample_p(r, excl, u, sm);
  }
  if (threadIdx.x == 0) {
    out[n_acc] = token;
    a.num[b] = n_acc;
  }
}

// ----------------------------------------------------------------- kernel 3: tree finalize

template <typename T>
struct TreeArgs {
  const T* logits;
  int64_t stride_l;
  QMat q;
  bool has_q;  // draft_probs given (else sample-then-match)
  Ids tok;
  Ids par;
  const int32_t* cu;
  const float* temp;
  const int64_t* seed;
  const int64_t* pos;
  const float* thr;
  const float* stats;
  const int32_t* amax;
  float* ws;    // [T + 1, 2] (sigma, rho) of each rejected child, per visit (with draft_probs)
  float* wbuf;  // [B, NC] residual chunk masses (with draft_probs); multi-path: [2, B, NC]
  int32_t* acc;
  int32_t* out;
  int32_t* num;
  int64_t num_rows;  // T: rows of target_logits = nodes
  int V;
  int NC;
  int chunk;
  int max_depth;
  // multi-path block verification
  bool wor;      // paths drawn without replacement
  int B;
  float* rbuf;   // [2, B, V] the residual target R, unnormalized
  float* rm;     // [T, 2] (token, mass) of the earlier paths through a node, per request rows n0 ..
};

// Request b's first node and node count (_tree_request): unchecked prefix sums must not
// move a read outside [0, T), such a request gets no nodes. Its output rows are set to -1
// first (thread 0 overwrites some of them later: the barrier orders the writes).
struct TreeRequest {
  int64_t n0;
  int64_t n;
  bool ok;
};

template <typename T>
__device__ __forceinline__ TreeRequest tree_request(const TreeArgs<T>& a, int b) {
  const int64_t D = static_cast<int64_t>(a.max_depth) + 1;
  for (int64_t col = threadIdx.x; col < D; col += kFinThreads) {
    a.acc[b * D + col] = -1;
    a.out[b * D + col] = -1;
  }
  __syncthreads();
  const int64_t n0 = a.cu[b];
  const int64_t n = static_cast<int64_t>(a.cu[b + 1]) - n0;
  const bool ok = n0 >= 0 && n >= 1 && n0 + n <= a.num_rows;
  return TreeRequest{ok ? n0 : 0, ok ? n : 0, ok};
}

// Tree-local index of node's child carrying token y, or -1 (_find_child).
__device__ int find_child(Ids tok, Ids par, int64_t n0, int64_t n, int node, int y, FinSmem& sm) {
  int best = INT_MAX;
  for (int64_t j = node + 1 + static_cast<int64_t>(threadIdx.x); j < n; j += kFinThreads) {
    if (par[n0 + j] == node && tok[n0 + j] == y) {
      best = min(best, static_cast<int>(j));
    }
  }
  best = block_min(best, sm);
  return best < n ? best : -1;
}

struct Step {
  int nxt;  // accepted child (tree-local), or -1
  int y;    // token to emit at this depth
};

// Recursive rejection over node's children in node order (SpecInfer, without
// replacement). ws holds (sigma_k, rho_{k+1}) of each rejected child k
// (_recursive_rejection).
template <typename T>
__device__ Step recursive_rejection(const Row<T>& r, QRow q, Ids tok, Ids par, float* ws, float* wbuf, int64_t n0,
                                    int64_t n, int node, int64_t seed, int64_t tpos, float u_sample, FinSmem& sm) {
  int nxt = -1;
  int k = 0;
  float sigma = 1.f;
  for (int64_t j = node + 1; j < n; ++j) {
    const int64_t x = tok[n0 + j];
    const bool kid = par[n0 + j] == node && x >= 0 && x < r.V;
    if (!kid) continue;
    const int xi = static_cast<int>(x);
    const float qx = q[xi];
    const float rx = rrs_value(r.prob_at(xi, r.S), qx, ws, k);
    const float u = uniform_pair(seed, tpos, static_cast<uint32_t>(k)).x;
    const float s_k = fmaxf(sigma, 1e-30f);
    if (u * (qx / s_k) < rx) {
      nxt = static_cast<int>(j);
      break;
    }
    const float rho = residual_masses(r, q, ws, k, s_k, wbuf, sm);
    if (threadIdx.x == 0) {
      ws[2 * k] = s_k;
      ws[2 * k + 1] = rho;
    }
    __syncthreads();  // every thread reads ws[0, 2k + 2) from here on
    sigma = sigma - qx;
    ++k;
  }
  int y = -1;
  if (nxt >= 0) {
    y = static_cast<int>(tok[n0 + nxt]);
  } else {
    if (k > 0) {
      const float s_last = ws[2 * (k - 1)];
      y = sample_residual(r, q, wbuf, u_sample, ws, k - 1, s_last, sm);
    }
    if (y < 0) y = sample_p(r, -1, u_sample, sm);
  }
  return Step{nxt, y};
}

// One request: walk the tree from the root, one target row per visited node
// (_tree_finalize_kernel).
template <typename T>
__global__ void __launch_bounds__(kFinThreads) tree_finalize_kernel(const TreeArgs<T> a) {
  __shared__ FinSmem sm;
  const int b = blockIdx.x;
  const bool has_q = a.has_q;
  const int64_t D = static_cast<int64_t>(a.max_depth) + 1;
  int32_t* acc = a.acc + b * D;
  int32_t* out = a.out + b * D;
  const TreeRequest req = tree_request(a, b);
  const int64_t n0 = req.n0;
  const int64_t n = req.n;
  const bool ok = req.ok;
  float t = a.temp[b];
  const bool random = t > 0.f;
  t = random ? t : 1.f;
  const int64_t seed = a.seed[b];
  const int64_t pos = a.pos[b];
  if (ok && threadIdx.x == 0) acc[0] = 0;

  int node = 0;
  int depth = 0;
  bool done = !ok;
  for (int step = 0; step <= a.max_depth && !done; ++step) {
    const int64_t row = n0 + node;
    const Row<T> r = load_row(a.logits, a.stride_l, a.thr, a.stats, a.amax, row, a.num_rows, a.V, a.NC, a.chunk, t, sm);
    const float u_sample = uniform_pair(seed, pos + depth, 0u).y;
    int y = r.g;
    int nxt = -1;
    if (has_q) {
      if (random) {
        // slot k of this visit's workspace: row + 1 + k < n0 + n (k < number of children)
        const Step s = recursive_rejection(r, a.q.row(row), a.tok, a.par, a.ws + 2 * (row + 1),
                                           a.wbuf + static_cast<int64_t>(b) * a.NC, n0, n, node, seed, pos + depth,
                                           u_sample, sm);
        nxt = s.nxt;
        y = s.y;
      } else {
        nxt = find_child(a.tok, a.par, n0, n, node, y, sm);
      }
    } else {
      // sample-then-match
      if (random) y = sample_p(r, -1, u_sample, sm);
      nxt = find_child(a.tok, a.par, n0, n, node, y, sm);
    }
    if (threadIdx.x == 0) out[depth] = y;
    if (nxt >= 0 && depth < a.max_depth) {
      node = nxt;
      ++depth;
      if (threadIdx.x == 0) acc[depth] = node;
    } else {
      done = true;
    }
  }
  if (threadIdx.x == 0) a.num[b] = depth;
}

// ------------------------------------------------------------- kernel 3: multi-path block verification

// Tree-local ancestor `up` levels above node; parents that are no tree (unchecked input)
// end the walk at the root, so reads stay inside the tree (_ancestor).
__device__ __forceinline__ int ancestor(Ids par, int64_t n0, int node, int up) {
  int cur = node;
  for (int k = 0; k < up && cur > 0; ++k) {
    const int64_t p = par[n0 + cur];
    cur = (p >= 0 && p < cur) ? static_cast<int>(p) : 0;
  }
  return cur;
}

// Depth of tree-local node (_node_depth).
__device__ __forceinline__ int node_depth(Ids par, int64_t n0, int node, int max_depth) {
  int cur = node;
  int d = 0;
  for (int k = 0; k < max_depth && cur > 0; ++k) {
    const int64_t p = par[n0 + cur];
    cur = (p >= 0 && p < cur) ? static_cast<int>(p) : 0;
    ++d;
  }
  return d;
}

// The first path (leaf, tree-local) after leaf `last` through node v at depth dv, or -1
// (_next_path); every leaf sits at depth `height`.
__device__ __forceinline__ int next_path(Ids par, int64_t n0, int64_t n, int last, int v, int dv, int height, int max_depth,
                         FinSmem& sm) {
  int best = INT_MAX;
  if (dv < height) {
    for (int64_t j = last + 1 + static_cast<int64_t>(threadIdx.x); j < n; j += kFinThreads) {
      const int jj = static_cast<int>(j);
      if (node_depth(par, n0, jj, max_depth) == height && ancestor(par, n0, jj, height - dv) == v) {
        best = min(best, jj);
      }
    }
  }
  best = block_min(best, sm);
  return best < n ? best : -1;
}

// The draft law of path lj at node u (depth du): Q(u), and for paths drawn without
// replacement, minus the Q-mass below u of every earlier path through u, renormalized.
// Thread 0 lists those paths' (token after u, mass) in rm; every thread then reads them.
struct DraftRow {
  QRow q;
  const float* rm;
  int count;
  float left;  // 1 - the removed mass
  __device__ __forceinline__ float operator()(int64_t x) const {
    float rem = 0.f;
    for (int k = 0; k < count; ++k) {
      if (static_cast<int64_t>(rm[2 * k]) == x) rem += rm[2 * k + 1];
    }
    const float qx = q[x];
    if (count == 0) return qx;
    return left > 0.f ? (qx - rem) / left : 0.f;
  }
};

template <typename T>
__device__ __forceinline__ DraftRow draft_row(const TreeArgs<T>& a, int64_t n0, int u, int du, int lj, int height, float* rm,
                              FinSmem& sm) {
  DraftRow d{a.q.row(n0 + u), rm, 0, 1.f};
  if (!a.wor) return d;
  if (threadIdx.x == 0) {
    int count = 0;
    float tot = 0.f;
    for (int l = 1; l < lj; ++l) {
      if (node_depth(a.par, n0, l, a.max_depth) != height) continue;
      int cur = l;
      float m = 1.f;
      for (int k = 0; k < height - du - 1; ++k) {  // from the leaf up to depth du + 1
        const int p = ancestor(a.par, n0, cur, 1);
        const int64_t x = a.tok[n0 + cur];
        m *= (x >= 0 && x < a.V) ? a.q.row(n0 + p)[x] : 0.f;
        cur = p;
      }
      if (ancestor(a.par, n0, cur, 1) != u) continue;
      const int64_t x = a.tok[n0 + cur];
      m *= (x >= 0 && x < a.V) ? a.q.row(n0 + u)[x] : 0.f;
      rm[2 * count] = static_cast<float>(x);
      rm[2 * count + 1] = m;
      tot += m;
      ++count;
    }
    sm.i = count;
    sm.f = tot;
  }
  __syncthreads();
  d.count = sm.i;
  d.left = 1.f - sm.f;
  __syncthreads();  // sm.i / sm.f are reused
  return d;
}

template <typename T>
__device__ __forceinline__ Row<T> tree_row(const TreeArgs<T>& a, int64_t row, float t, FinSmem& sm) {
  return load_row(a.logits, a.stride_l, a.thr, a.stats, a.amax, row, a.num_rows, a.V, a.NC, a.chunk, t, sm);
}

// One request, greedy multi-path block verification (_multi_path_kernel; the torch spec is
// _multi_path_block_torch): block verification along one path per attempt; the residual
// target R at the current node lives in rbuf[buf, b] (unnormalized, mass rho; chunk masses
// in wbuf[buf, b]), or is the node's own P (r_is_p). Greedy requests walk the argmax.
template <typename T>
__global__ void __launch_bounds__(kFinThreads) multi_path_kernel(const TreeArgs<T> a) {
  __shared__ FinSmem sm;
  const int b = blockIdx.x;
  const int64_t D = static_cast<int64_t>(a.max_depth) + 1;
  int32_t* acc = a.acc + b * D;
  int32_t* out = a.out + b * D;
  const TreeRequest req = tree_request(a, b);
  const int64_t n0 = req.n0;
  const int64_t n = req.n;
  const bool ok = req.ok;
  float t = a.temp[b];
  const bool random = t > 0.f;
  t = random ? t : 1.f;
  const int64_t seed = a.seed[b];
  const int64_t pos = a.pos[b];
  const int64_t V = a.V;
  float* rm = a.rm + 2 * n0;
  // the two halves of this request's residual scratch: values [V] and chunk masses [NC]
  float* const rbuf[2] = {a.rbuf + static_cast<int64_t>(b) * V, a.rbuf + (static_cast<int64_t>(a.B) + b) * V};
  float* const wbuf[2] = {a.wbuf + static_cast<int64_t>(b) * a.NC,
                          a.wbuf + (static_cast<int64_t>(a.B) + b) * a.NC};

  int v = 0;  // current node (tree-local) and its depth
  int dv = 0;
  int y = 0;
  if (ok && random) {
    int height = 0;
    for (int64_t j = threadIdx.x; j < n; j += kFinThreads) {
      height = max(height, node_depth(a.par, n0, static_cast<int>(j), a.max_depth));
    }
    height = block_max(height, sm);
    int last = 0;  // leaf of the last path used: later ones come after it
    bool r_is_p = true;
    float rho = 1.f;
    int buf = 0;
    int attempt = 0;
    int state = 0;  // 0 verifying, 1 a whole path accepted, 2 no path left through v
    for (int64_t it = 0; it < n && state == 0; ++it) {
      const int j = next_path(a.par, n0, n, last, v, dv, height, a.max_depth, sm);
      if (j < 0) {
        state = 2;
        break;
      }
      last = j;
      const int L = height - dv;
      float p = 1.f;
      int tau = 0;
      float p_tau = 1.f;
      int u_tau = v;
      int u_prev = v;
      for (int i = 1; i <= L; ++i) {
        const int u_i = ancestor(a.par, n0, j, L - i);
        const int64_t x = a.tok[n0 + u_i];
        const bool xv = x >= 0 && x < V;
        const int xi = xv ? static_cast<int>(x) : 0;
        // T_{i-1}(x_i): R at v for i = 1, else the target row of u_{i-1}
        const Row<T> r_prev = tree_row(a, n0 + u_prev, t, sm);
        float Tx = r_prev.prob_at(xi, r_prev.S);
        if (i == 1 && !r_is_p) Tx = rbuf[buf][xi] / rho;
        const DraftRow dr = draft_row(a, n0, u_prev, dv + i - 1, j, height, rm, sm);
        Tx = xv ? Tx : 0.f;
        const float Dx = xv ? dr(xi) : 0.f;
        p = block_ratio(p, Tx, Dx);
        float h = p;
        if (i < L) {
          // Z_i = sum_x max(p_i P(u_i)(x) - D(u_i)(x), 0): one pass over u_i's row
          const Row<T> ri = tree_row(a, n0 + u_i, t, sm);
          const DraftRow di = draft_row(a, n0, u_i, dv + i, j, height, rm, sm);
          float z = 0.f;
          for (int64_t off = threadIdx.x; off < V; off += kFinThreads) {
            z += fmaxf(p * ri.chunk_prob(off, ri.S) - di(off), 0.f);
          }
          const float Z = block_sum(z, sm);
          const float den = Z + 1.f - p;
          h = den > 0.f ? Z / den : 1.f;
        }
        if (uniform_pair(seed, pos + dv + i - 1, static_cast<uint32_t>(attempt)).x < h) {
          tau = i;
          p_tau = p;
          u_tau = u_i;
        }
        u_prev = u_i;
      }
      ++attempt;
      if (tau == L) {
        state = 1;
        v = u_tau;
        dv = height;
        break;
      }
      // R at u_tau: max(p_tau T_tau - D(u_tau), 0), T_tau = R (tau = 0) or P(u_tau)
      const Row<T> ru = tree_row(a, n0 + u_tau, t, sm);
      const DraftRow du = draft_row(a, n0, u_tau, dv + tau, j, height, rm, sm);
      const float* src = rbuf[buf];
      float* dst = rbuf[1 - buf];
      float* wdst = wbuf[1 - buf];
      const bool from_r = tau == 0 && !r_is_p;
      const int lane = threadIdx.x % kWarp;
      const int warp = threadIdx.x / kWarp;
      for (int c = warp; c < a.NC; c += kFinWarps) {
        const int64_t first = static_cast<int64_t>(c) * a.chunk;
        float acc_c = 0.f;
        for (int e = lane; e < a.chunk; e += kWarp) {
          const int64_t off = first + e;
          if (off >= V) continue;
          const float P = from_r ? src[off] / rho : ru.chunk_prob(off, ru.S);
          const float rv = fmaxf(p_tau * P - du(off), 0.f);
          dst[off] = rv;
          acc_c += rv;
        }
#pragma unroll
        for (int o = kWarp / 2; o > 0; o /= 2) acc_c += __shfl_xor_sync(kFullMask, acc_c, o);
        if (lane == 0) wdst[c] = acc_c;
      }
      __syncthreads();
      float mass = 0.f;
      for (int c = threadIdx.x; c < a.NC; c += kFinThreads) mass += wdst[c];
      mass = block_sum(mass, sm);
      if (mass > 0.f) {
        buf = 1 - buf;
        rho = mass;
        r_is_p = false;
      } else if (tau > 0) {
        r_is_p = true;  // R = P(u_tau): the torch spec's fallback
      }
      v = u_tau;
      dv += tau;
    }
    // the emitted token: y ~ P(leaf) after a whole path, else y ~ R at v
    const Row<T> r = tree_row(a, n0 + v, t, sm);
    const float u_s = uniform_pair(seed, pos + dv, 0u).y;
    if (state == 1 || r_is_p) {
      y = sample_p(r, -1, u_s, sm);
    } else {
      const float* w = wbuf[buf];
      const float* rv = rbuf[buf];
      float tot = 0.f;
      for (int c = threadIdx.x; c < a.NC; c += kFinThreads) tot += w[c];
      tot = block_sum(tot, sm);
      const Pick pc = block_inverse_cdf(a.NC, u_s * tot, [&](int c) { return w[c]; }, sm);
      y = r.g;
      if (pc.i >= 0) {
        const int64_t first = static_cast<int64_t>(pc.i) * a.chunk;
        const Pick pt = block_inverse_cdf(
            a.chunk, pc.rest, [&](int e) { return first + e < V ? rv[first + e] : 0.f; }, sm);
        if (pt.i >= 0) y = static_cast<int>(first + pt.i);
      }
    }
  } else if (ok) {
    // greedy: move to the first child carrying the argmax while there is one
    for (int step = 0; step <= a.max_depth; ++step) {
      const Row<T> r = tree_row(a, n0 + v, t, sm);
      y = r.g;
      const int nxt = find_child(a.tok, a.par, n0, n, v, y, sm);
      if (nxt < 0 || dv >= a.max_depth) break;
      v = nxt;
      ++dv;
    }
  }
  if (threadIdx.x == 0) {
    if (ok) {
      // the accepted path: root .. v, its tokens after the root, then y
      for (int d = 0; d <= dv; ++d) {
        const int anc = ancestor(a.par, n0, v, dv - d);
        acc[d] = anc;
        if (d >= 1) out[d - 1] = static_cast<int32_t>(a.tok[n0 + anc]);
      }
      out[dv] = y;
    }
    a.num[b] = dv;
  }
}

// ------------------------------------------------------------------------------ launchers

int probs_kind(at::ScalarType st) {
  switch (st) {
    case at::kFloat:
      return kProbsF32;
    case at::kBFloat16:
      return kProbsBF16;
    case at::kHalf:
      return kProbsF16;
    default:
      TORCH_CHECK(false, "fastverify_cuda: draft_probs must be float32, bfloat16 or float16, got ", st);
  }
  return kProbsF32;
}

void check_vector(const at::Tensor& x, const char* name, at::ScalarType dtype, int64_t numel,
                  const at::Tensor& logits) {
  TORCH_CHECK(x.dim() == 1, "fastverify_cuda: ", name, " must be 1-D, got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == dtype, "fastverify_cuda: ", name, " must be ", dtype, ", got ", x.scalar_type());
  TORCH_CHECK(x.device() == logits.device(), "fastverify_cuda: ", name, " is on ", x.device(),
              " but target_logits is on ", logits.device());
  TORCH_CHECK(numel < 0 || x.numel() == numel, "fastverify_cuda: ", name, " must have ", numel, " entries, got ",
              x.numel());
}

void check_ids(const at::Tensor& x, const char* name, const at::Tensor& logits) {
  TORCH_CHECK(x.dim() == 1, "fastverify_cuda: ", name, " must be 1-D, got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kInt || x.scalar_type() == at::kLong, "fastverify_cuda: ", name,
              " must be int32 or int64, got ", x.scalar_type());
  TORCH_CHECK(x.device() == logits.device(), "fastverify_cuda: ", name, " is on ", x.device(),
              " but target_logits is on ", logits.device());
}

void check_probs(const at::Tensor& q, int64_t rows, int64_t V, const at::Tensor& logits) {
  TORCH_CHECK(q.dim() == 2 && q.size(0) == rows && q.size(1) == V, "fastverify_cuda: draft_probs must have shape [",
              rows, ", ", V, "], got ", q.sizes());
  TORCH_CHECK(q.device() == logits.device(), "fastverify_cuda: draft_probs is on ", q.device(),
              " but target_logits is on ", logits.device());
  TORCH_CHECK(V <= 1 || q.stride(1) == 1, "fastverify_cuda: draft_probs must be contiguous in the vocabulary");
  (void)probs_kind(q.scalar_type());
}

QMat make_qmat(const std::optional<at::Tensor>& q) {
  if (!q.has_value()) return QMat{nullptr, 0, kProbsF32};
  return QMat{static_cast<const char*>(q->data_ptr()), q->stride(0) * static_cast<int64_t>(q->element_size()),
              probs_kind(q->scalar_type())};
}

struct Common {
  int64_t R;
  int64_t V;
  int64_t B;
  int NC;
  at::Tensor cu, temp, top_k, top_p, seed, pos;
};

// Argument checks (metadata only: no sync) and contiguous 1-D inputs.
Common prepare(const at::Tensor& logits, const at::Tensor& cu, const char* cu_name, const at::Tensor& temperature,
               const std::optional<at::Tensor>& top_k, const std::optional<at::Tensor>& top_p, const at::Tensor& seed,
               const at::Tensor& positions, int64_t chunk) {
  TORCH_CHECK(logits.device().type() == kKernelDevice, "fastverify_cuda: target_logits must be a ", kKernelDevice,
              " tensor, got one on ", logits.device());
  TORCH_CHECK(logits.dim() == 2, "fastverify_cuda: target_logits must be 2-D, got shape ", logits.sizes());
  Common c;
  c.R = logits.size(0);
  c.V = logits.size(1);
  TORCH_CHECK(c.V >= 1 && c.V < (int64_t{1} << 31), "fastverify_cuda: vocabulary size ", c.V, " out of range");
  TORCH_CHECK(c.R < (int64_t{1} << 31), "fastverify_cuda: too many target rows: ", c.R);
  TORCH_CHECK(c.V == 1 || logits.stride(1) == 1,
              "fastverify_cuda: target_logits must be contiguous in the vocabulary dimension");
  TORCH_CHECK(chunk >= 1 && chunk <= kMaxChunk && (chunk & (chunk - 1)) == 0,
              "fastverify_cuda: chunk_size must be a power of two in [1, ", kMaxChunk, "], got ", chunk);
  TORCH_CHECK(cu.dim() == 1 && cu.numel() >= 2, "fastverify_cuda: ", cu_name, " must be 1-D with B + 1 >= 2 entries");
  c.B = cu.numel() - 1;
  TORCH_CHECK(c.B < (int64_t{1} << 31), "fastverify_cuda: too many requests: ", c.B);
  check_vector(cu, cu_name, at::kInt, -1, logits);
  check_vector(temperature, "temperature", at::kFloat, c.B, logits);
  check_vector(seed, "seed", at::kLong, c.B, logits);
  check_vector(positions, "positions", at::kLong, c.B, logits);
  if (top_k.has_value()) check_vector(*top_k, "top_k", at::kInt, c.B, logits);
  if (top_p.has_value()) check_vector(*top_p, "top_p", at::kFloat, c.B, logits);
  c.NC = static_cast<int>((c.V + chunk - 1) / chunk);
  c.cu = cu.contiguous();
  c.temp = temperature.contiguous();
  c.seed = seed.contiguous();
  c.pos = positions.contiguous();
  if (top_k.has_value()) c.top_k = top_k->contiguous();
  if (top_p.has_value()) c.top_p = top_p->contiguous();
  return c;
}

struct RowStats {
  at::Tensor thr;  // undefined without top-k / top-p
  at::Tensor stats;
  at::Tensor amax;
};

// Kernels 1 (if filtering) and 2 for all rows (_row_stats_pass).
template <typename T>
RowStats row_stats_pass(const at::Tensor& logits, const Common& c, int row_extra, int chunk, cudaStream_t stream,
                        bool entropy = false) {
  RowStats rs;
  const auto f32 = logits.options().dtype(at::kFloat);
  rs.stats = at::empty({entropy ? 4 : 3, c.R, c.NC}, f32);
  rs.amax = at::empty({c.R, c.NC}, logits.options().dtype(at::kInt));
  if (c.R == 0) return rs;
  const T* l = static_cast<const T*>(logits.data_ptr());
  const int64_t stride_l = logits.stride(0);
  const int64_t elem = static_cast<int64_t>(sizeof(T));
  const bool row_vec = aligned16(l) && (stride_l * elem) % 16 == 0;
  const int B = static_cast<int>(c.B);
  const int V = static_cast<int>(c.V);
  if (c.top_k.defined() || c.top_p.defined()) {
    rs.thr = at::empty({c.R}, f32);
    launch_kernel("filter_threshold_kernel", filter_threshold_kernel<T>, dim3(static_cast<unsigned>(c.R)),
                  dim3(kThrThreads), stream, l, stride_l, row_vec, c.cu.data_ptr<int32_t>(),
                  c.temp.data_ptr<float>(), c.top_k.defined() ? c.top_k.data_ptr<int32_t>() : nullptr,
                  c.top_p.defined() ? c.top_p.data_ptr<float>() : nullptr, rs.thr.data_ptr<float>(), B, V,
                  row_extra);
  }
  const bool chunk_vec = row_vec && (chunk * elem) % 16 == 0;
  const dim3 grid(static_cast<unsigned>(c.R), static_cast<unsigned>(std::min(c.NC, 65535)));
  launch_kernel("chunk_stats_kernel", chunk_stats_kernel<T>, grid, dim3(kStatsThreads), stream, l, stride_l, chunk_vec,
                c.cu.data_ptr<int32_t>(), c.temp.data_ptr<float>(),
                rs.thr.defined() ? rs.thr.data_ptr<float>() : nullptr, rs.stats.data_ptr<float>(),
                rs.amax.data_ptr<int32_t>(), B, c.R, V, c.NC, chunk, row_extra, entropy);
  return rs;
}

// The fields of the kernel 3 arguments (ChainArgs<T> / TreeArgs<T>) that both ops fill alike.
template <typename T, typename Args>
void fill_finalize_args(Args& a, const at::Tensor& logits, const std::optional<at::Tensor>& draft_probs,
                        const Common& c, const RowStats& rs, const at::Tensor& wbuf, const at::Tensor& out,
                        const at::Tensor& num, int chunk) {
  a.logits = static_cast<const T*>(logits.data_ptr());
  a.stride_l = logits.stride(0);
  a.q = make_qmat(draft_probs);
  a.has_q = draft_probs.has_value();
  a.cu = c.cu.data_ptr<int32_t>();
  a.temp = c.temp.data_ptr<float>();
  a.seed = c.seed.data_ptr<int64_t>();
  a.pos = c.pos.data_ptr<int64_t>();
  a.thr = rs.thr.defined() ? rs.thr.data_ptr<float>() : nullptr;
  a.stats = rs.stats.data_ptr<float>();
  a.amax = rs.amax.data_ptr<int32_t>();
  a.wbuf = wbuf.defined() ? wbuf.data_ptr<float>() : nullptr;
  a.out = out.data_ptr<int32_t>();
  a.num = num.data_ptr<int32_t>();
  a.V = static_cast<int>(c.V);
  a.NC = c.NC;
  a.chunk = chunk;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rejection_sample_cuda(
    const at::Tensor& target_logits, const at::Tensor& draft_tokens, const at::Tensor& cu_num_draft,
    const std::optional<at::Tensor>& draft_probs, const at::Tensor& temperature, const std::optional<at::Tensor>& top_k,
    const std::optional<at::Tensor>& top_p, const at::Tensor& seed, const at::Tensor& positions, int64_t max_draft_len,
    int64_t rule, const std::optional<at::Tensor>& typical_eps, const std::optional<at::Tensor>& typical_delta,
    int64_t chunk_size, int64_t cuda_stream) {
  TORCH_CHECK(target_logits.device().type() == kKernelDevice, "fastverify_cuda: target_logits must be a ",
              kKernelDevice, " tensor, got one on ", target_logits.device());
  const c10::DeviceGuard guard(target_logits.device());
  const Common c = prepare(target_logits, cu_num_draft, "cu_num_draft", temperature, top_k, top_p, seed, positions, chunk_size);
  TORCH_CHECK(c.R >= 1, "fastverify_cuda: target_logits needs a row per draft plus one per request");
  check_ids(draft_tokens, "draft_tokens", target_logits);
  TORCH_CHECK(max_draft_len >= 0 && max_draft_len < (int64_t{1} << 30),
              "fastverify_cuda: max_draft_len out of range: ", max_draft_len);
  const at::Tensor drafts = draft_tokens.contiguous();
  const int64_t N = drafts.numel();
  if (draft_probs.has_value()) check_probs(*draft_probs, N, c.V, target_logits);
  TORCH_CHECK(rule == kRuleToken || rule == kRuleBlock || rule == kRuleTypical,
              "fastverify_cuda: unknown verification rule ", rule);
  at::Tensor eps, delta;
  if (rule == kRuleTypical) {
    TORCH_CHECK(typical_eps.has_value() && typical_delta.has_value(),
                "fastverify_cuda: verify='typical' needs typical_eps and typical_delta");
    check_vector(*typical_eps, "typical_eps", at::kFloat, c.B, target_logits);
    check_vector(*typical_delta, "typical_delta", at::kFloat, c.B, target_logits);
    eps = typical_eps->contiguous();
    delta = typical_delta->contiguous();
  }

  const cudaStream_t stream = as_stream(cuda_stream);
  const auto i32 = target_logits.options().dtype(at::kInt);
  at::Tensor out = at::empty({c.B, max_draft_len + 1}, i32);
  at::Tensor num = at::empty({c.B}, i32);
  const int chunk = static_cast<int>(chunk_size);

  dispatch_float(target_logits.scalar_type(), "target_logits", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const RowStats rs = row_stats_pass<T>(target_logits, c, 1, chunk, stream, rule == kRuleTypical);
    const auto f32 = target_logits.options().dtype(at::kFloat);
    at::Tensor wbuf;
    if (draft_probs.has_value() || rule == kRuleTypical) wbuf = at::empty({c.B, c.NC}, f32);
    at::Tensor wres;
    if (rule == kRuleBlock && draft_probs.has_value()) wres = at::empty({c.R, c.NC}, f32);
    ChainArgs<T> a;
    fill_finalize_args<T>(a, target_logits, draft_probs, c, rs, wbuf, out, num, chunk);
    a.draft = Ids{drafts.data_ptr(), drafts.scalar_type() == at::kLong};
    a.R = c.R;
    a.N = N;
    a.max_draft_len = static_cast<int>(max_draft_len);
    a.rule = static_cast<int>(rule);
    a.B = static_cast<int>(c.B);
    a.wres = wres.defined() ? wres.data_ptr<float>() : nullptr;
    a.eps = eps.defined() ? eps.data_ptr<float>() : nullptr;
    a.delta = delta.defined() ? delta.data_ptr<float>() : nullptr;
    if (wres.defined()) {
      const dim3 grid(static_cast<unsigned>(c.R), static_cast<unsigned>(std::min(c.NC, 65535)));
      launch_kernel("block_residual_kernel", block_residual_kernel<T>, grid, dim3(kFinThreads), stream, a);
    }
    launch_kernel("chain_finalize_kernel", chain_finalize_kernel<T>, dim3(static_cast<unsigned>(c.B)),
                  dim3(kFinThreads), stream, a);
  });
  return {out, num};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tree_rejection_sample_cuda(
    const at::Tensor& target_logits, const at::Tensor& tree_tokens, const at::Tensor& parents,
    const at::Tensor& cu_num_nodes, const std::optional<at::Tensor>& draft_probs, const at::Tensor& temperature,
    const std::optional<at::Tensor>& top_k, const std::optional<at::Tensor>& top_p, const at::Tensor& seed,
    const at::Tensor& positions, int64_t max_depth, int64_t rule, int64_t chunk_size, int64_t cuda_stream) {
  TORCH_CHECK(target_logits.device().type() == kKernelDevice, "fastverify_cuda: target_logits must be a ",
              kKernelDevice, " tensor, got one on ", target_logits.device());
  const c10::DeviceGuard guard(target_logits.device());
  const Common c = prepare(target_logits, cu_num_nodes, "cu_num_nodes", temperature, top_k, top_p, seed, positions, chunk_size);
  check_ids(tree_tokens, "tree_tokens", target_logits);
  check_ids(parents, "parents", target_logits);
  const int64_t T_rows = c.R;
  TORCH_CHECK(tree_tokens.numel() == T_rows && parents.numel() == T_rows,
              "fastverify_cuda: tree_tokens and parents must have one entry per target_logits row (", T_rows,
              "), got ", tree_tokens.numel(), " and ", parents.numel());
  TORCH_CHECK(max_depth >= 0 && max_depth < (int64_t{1} << 30), "fastverify_cuda: max_depth out of range: ",
              max_depth);
  if (draft_probs.has_value()) check_probs(*draft_probs, T_rows, c.V, target_logits);
  TORCH_CHECK(rule == kTreeSpecInfer || rule == kTreeBlock || rule == kTreeBlockWor,
              "fastverify_cuda: unknown tree verification rule ", rule);
  const bool multi_path = rule != kTreeSpecInfer;
  TORCH_CHECK(!multi_path || draft_probs.has_value(),
              "fastverify_cuda: multi-path block verification needs draft_probs");
  const at::Tensor tok = tree_tokens.contiguous();
  const at::Tensor par = parents.contiguous();

  const cudaStream_t stream = as_stream(cuda_stream);
  const auto i32 = target_logits.options().dtype(at::kInt);
  const int64_t D = max_depth + 1;
  at::Tensor accepted = at::empty({c.B, D}, i32);
  at::Tensor out = at::empty({c.B, D}, i32);
  at::Tensor num = at::empty({c.B}, i32);
  const int chunk = static_cast<int>(chunk_size);

  dispatch_float(target_logits.scalar_type(), "target_logits", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const RowStats rs = row_stats_pass<T>(target_logits, c, 0, chunk, stream);
    at::Tensor ws;
    at::Tensor wbuf;
    if (draft_probs.has_value()) {
      const auto f32 = target_logits.options().dtype(at::kFloat);
      ws = at::empty({T_rows + 1, 2}, f32);
      wbuf = at::empty({c.B, c.NC}, f32);
    }
    at::Tensor rbuf, rm;
    if (multi_path) {
      const auto f32 = target_logits.options().dtype(at::kFloat);
      wbuf = at::empty({2, c.B, c.NC}, f32);
      rbuf = at::empty({2, c.B, c.V}, f32);
      rm = at::empty({T_rows, 2}, f32);
    }
    TreeArgs<T> a;
    fill_finalize_args<T>(a, target_logits, draft_probs, c, rs, wbuf, out, num, chunk);
    a.tok = Ids{tok.data_ptr(), tok.scalar_type() == at::kLong};
    a.par = Ids{par.data_ptr(), par.scalar_type() == at::kLong};
    a.ws = ws.defined() ? ws.data_ptr<float>() : nullptr;
    a.acc = accepted.data_ptr<int32_t>();
    a.num_rows = T_rows;
    a.max_depth = static_cast<int>(max_depth);
    a.wor = rule == kTreeBlockWor;
    a.B = static_cast<int>(c.B);
    a.rbuf = rbuf.defined() ? rbuf.data_ptr<float>() : nullptr;
    a.rm = rm.defined() ? rm.data_ptr<float>() : nullptr;
    if (multi_path) {
      launch_kernel("multi_path_kernel", multi_path_kernel<T>, dim3(static_cast<unsigned>(c.B)), dim3(kFinThreads),
                    stream, a);
    } else {
      launch_kernel("tree_finalize_kernel", tree_finalize_kernel<T>, dim3(static_cast<unsigned>(c.B)),
                    dim3(kFinThreads), stream, a);
    }
  });
  return {accepted, out, num};
}

}  // namespace fastverify
