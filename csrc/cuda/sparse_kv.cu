// CUDA backend of fastverify::select_kv_chunks and fastverify::sparse_kv_attention
// (sparse-KV self-speculation, DESIGN.md §2.6); fastverify/ops/sparse_kv.py is the spec.
//
// The paged cache is the one tree_attention reads: k_cache, v_cache [num_pages, page_size,
// Hkv, D] (any strides in dims 0..2, head_dim contiguous), key position p of request b at
// page block_table[b, p / page_size], slot p % page_size. Query head hq reads KV head
// hq / G. Chunk c of request b is keys c·cs .. c·cs + cs - 1 (cs = chunk_size); its full
// chunks are c < F_b = seq_lens[b] / cs, the tail F_b·cs .. seq_lens[b] - 1 is never a chunk.
//
// sparse_kv_attention, two launches (one when a single split suffices):
//
// 1. sparse_partial_kernel, one block per (request, KV head, split, head tile). The units
//    of a (request, KV head) are its C chunk slots chunk_ids[b, h, :] and the tail (unit
//    C); a split takes a contiguous run of units. A block compacts the valid units of its
//    run (ids in [0, F_b); -1 and anything else is skipped and never used as an address;
//    an empty tail is skipped) into shared memory with a block scan, which gives a flat
//    key space of its selected keys; its warps take interleaved steps of that key space.
//    A block holds all query heads of its head tile (G heads of the KV head, at most 8
//    per tile) so each K/V row is read once for the whole GQA group.
//    Warp layout: a key row is kL lanes wide, each lane holding kE = 16 bytes (two
//    16-byte vectors for fp32 with D > 128) of it, so a warp works on 32 / kL keys at
//    once and on kT of them per lane group per step (kT · 2 16-byte loads in flight per
//    lane). Per step one lane per key finds the key's page and slot (unit and offset in
//    the compacted list, then the block table; that read is issued a step ahead) and the
//    group's lanes receive it by a shuffle. q (prescaled by sm_scale·log2 e) sits in
//    shared memory, the kL lane-partial dot products are summed by an xor butterfly, and
//    each lane group runs its own online softmax (fp32, log2 units) over its keys: running
//    max m, sum l and the unnormalized output o of its dims in registers. At the end the
//    groups of a warp merge by shuffles, the warps of the block through shared memory
//    (log-sum-exp weights), and the block writes (m, l, o) of each head to the workspace,
//    or out = o / l when there is one split.
// 2. sparse_merge_kernel, one warp per (request, query head): m = max_s m_s,
//    out = Σ_s 2^(m_s - m) o_s / Σ_s 2^(m_s - m) l_s (splits that saw no key are skipped),
//    written in q's dtype. A row that sees no key at all gives 0.
//
// Splits come from shapes only: as many as fill kMinBlocks resident blocks per SM (one
// wave), at most kMaxSplits and at most one unit each. No host synchronisation; the
// workspace comes from the caching allocator, so the op is CUDA-graph capturable.
//
// select_kv_chunks, two launches:
//
// 1. chunk_score_kernel, one block per (request, KV head, tile of chunks): the score of
//    each chunk that can be chosen (not a sink or recent chunk, and only when F_b >
//    num_chunks) is qsum · mean(K_chunk) with qsum = Σ_g q[b, h·G + g] in fp32: one warp
//    per chunk sums qsum · K_row over the chunk's rows (runs of contiguous slots within a
//    page) and divides by cs; with chunk_means one lane group per chunk reads its mean
//    row. Scores are stored as order-preserving uint32 keys (NaN as -inf, -0 as +0).
// 2. chunk_select_kernel, one block per (request, KV head): F_b <= num_chunks takes every
//    chunk; otherwise the sinks 0 .. ns - 1 and the recent chunks F_b - nr .. F_b - 1 are
//    kept and the M = num_chunks - ns - nr best of the others are chosen exactly: the M-th
//    largest key T is found bit by bit (32 block-wide counts of keys >= candidate, stopping
//    as soon as exactly M keys qualify), then one ordered pass takes every key > T and the
//    lowest ids among keys == T (block scans), which also gives each chosen id its slot
//    in the ascending output.
//
// Head dims up to 256 run on the next of 64, 128, 256 (lanes past D load nothing); rows
// are read with 16-byte loads when every row start is 16-byte aligned, else element by
// element. Memory safety with unchecked input: positions at or past the block table's
// capacity and page ids outside the cache are never read (such keys are skipped, such
// chunk rows count as zero), negative seq_lens count as 0, selection sees at most the
// chunks the block table (or chunk_means) holds.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>

#include "common.cuh"
#include "ops.h"

namespace fastverify {
namespace {

constexpr int kMaxHeadDim = 256;
constexpr int kMaxSplits = 64;
constexpr int64_t kMaxChunkSize = int64_t{1} << 22;  // so the keys of a round (<= 256 units) fit an int

// ------------------------------------------------------------------------------ row loads

// kV 16-byte vectors of a row of S starting at element d0: zero where !ok or past D.
// vec: the row start and d0 are 16-byte aligned and D is a multiple of 16 bytes.
template <typename S, int kV>
__device__ __forceinline__ void load_row(uint4 (&raw)[kV], const S* row, int d0, int D, bool ok, bool vec) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(S));
#pragma unroll
  for (int v = 0; v < kV; ++v) {
    const int d = d0 + v * kVec;
    raw[v] = make_uint4(0u, 0u, 0u, 0u);
    if (ok && d < D) {
      if (vec) {
        raw[v] = *reinterpret_cast<const uint4*>(row + d);
      } else {
        S* x = reinterpret_cast<S*>(&raw[v]);
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          if (d + e < D) x[e] = row[d + e];
        }
      }
    }
  }
}

// Element e of the kV vectors of a row as fp32.
template <typename S, int kV>
__device__ __forceinline__ float elem(const uint4 (&raw)[kV], int e) {
  return to_float(reinterpret_cast<const S*>(&raw[0])[e]);
}

// How a warp reads rows of kDp elements of S (the kernels' tiles derive from it): lane
// group g = lane / kL reads a row, lane l = lane % kL its elements d0 = l·kE .. d0 + kE.
template <typename S, int kDp>
struct RowLanes {
  static constexpr int kVec = 16 / static_cast<int>(sizeof(S));            // elements per 16-byte vector
  static constexpr int kV = kDp / kVec > kWarp ? kDp / (kVec * kWarp) : 1;  // vectors per lane and row
  static constexpr int kE = kVec * kV;                                      // elements per lane and row
  static constexpr int kL = kDp / kE;                                       // lanes per row
  static constexpr int kRows = kWarp / kL;                                  // rows a warp reads at once
};

// ---------------------------------------------------------------------- sparse attention

template <typename T, int kDp, int kGT>
struct SparseTile : RowLanes<T, kDp> {
  using Lanes = RowLanes<T, kDp>;
  static constexpr int kGroups = Lanes::kRows;                              // keys a warp reads at once
  static constexpr int kT = std::max(1, (kGT >= 8 ? 2 : 4) / Lanes::kV);   // keys per lane group per step
  static constexpr int kKW = kGroups * kT;                                  // keys per warp step
  static constexpr int kWarps = kGT >= 8 ? 4 : 8;
  static constexpr int kThreads = kWarps * kWarp;
  static constexpr int kMinBlocks = kGT >= 8 ? 4 : 2;  // resident blocks per SM (<= 128 registers a thread)
  static_assert(Lanes::kL >= 1 && Lanes::kL <= kWarp && kWarp % Lanes::kL == 0 && kKW <= kWarp && Lanes::kE % 4 == 0,
                "lane layout");
};

template <typename T, int kDp, int kGT>
struct SparseSmem {
  using Tile = SparseTile<T, kDp, kGT>;
  using Scan = cub::BlockScan<int, Tile::kThreads>;
  typename Scan::TempStorage scan;
  alignas(16) float q[kGT][kDp];        // q of the tile's heads · sm_scale · log2(e), zero padded
  int32_t unit_start[Tile::kThreads];  // first key position of each valid unit of the round
  alignas(16) float red_o[Tile::kWarps][kGT][kDp];  // each warp's unnormalized output
  float red_m[Tile::kWarps][kGT];
  float red_l[Tile::kWarps][kGT];
  float weight[Tile::kWarps][kGT];  // 2^(m_warp - m_block)
  float fin_m[kGT];
  float fin_l[kGT];
};

template <typename T>
struct SparseArgs {
  const T* q;  // [B, Hq, D]
  const T* k;  // [num_pages, page_size, Hkv, D]
  const T* v;
  T* out;                      // [B, Hq, D] contiguous
  const int32_t* block_table;  // [B, max_pages]
  const int32_t* seq_lens;     // [B]
  const int32_t* chunk_ids;    // [B, Hkv, C]
  float* ws_o;                 // [B, Hq, num_splits, D] unnormalized outputs
  float* ws_ml;                // [B, Hq, num_splits, 2] (running max in log2 units, sum)
  int64_t stride_qb, stride_qh;
  int64_t stride_kp, stride_ks, stride_kh;
  int64_t stride_vp, stride_vs, stride_vh;
  int64_t stride_bt, stride_cb, stride_ch;
  int64_t num_pages;
  int B, Hq, Hkv, G, D, C;
  int chunk_size, page_size;
  int capacity;  // max_pages * page_size: positions at or past it are never read
  int head_tiles, num_splits, units_per_split;
  float scale_log2;  // sm_scale · log2(e)
  bool vec_kv;       // 16-byte loads allowed
};

template <typename T, int kDp, int kGT>
__global__ void __launch_bounds__(SparseTile<T, kDp, kGT>::kThreads, SparseTile<T, kDp, kGT>::kMinBlocks)
    sparse_partial_kernel(const SparseArgs<T> a) {
  using Tile = SparseTile<T, kDp, kGT>;
  using Scan = typename SparseSmem<T, kDp, kGT>::Scan;
  constexpr int kE = Tile::kE;
  constexpr int kV = Tile::kV;
  constexpr int kT = Tile::kT;
  __shared__ SparseSmem<T, kDp, kGT> sm;
  const int warp = static_cast<int>(threadIdx.x) / kWarp;
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const int group = lane / Tile::kL;
  const int d0 = (lane % Tile::kL) * kE;

  int64_t block = blockIdx.x;
  const int ht = static_cast<int>(block % a.head_tiles);
  block /= a.head_tiles;
  const int split = static_cast<int>(block % a.num_splits);
  block /= a.num_splits;
  const int h = static_cast<int>(block % a.Hkv);
  const int b = static_cast<int>(block / a.Hkv);
  const int head0 = h * a.G + ht * kGT;  // first query head of the tile
  const int heads = min(kGT, a.G - ht * kGT);

  const int seq = max(a.seq_lens[b], 0);
  const int F = seq / a.chunk_size;  // full chunks
  const int tail0 = F * a.chunk_size;
  const int tail_len = seq - tail0;
  const int units = a.C + 1;  // chunk slots, then the tail
  const int u0 = split * a.units_per_split;
  const int u1 = min(units, u0 + a.units_per_split);
  const int32_t* bt_row = a.block_table + static_cast<int64_t>(b) * a.stride_bt;
  const int32_t* ids = a.chunk_ids + static_cast<int64_t>(b) * a.stride_cb + static_cast<int64_t>(h) * a.stride_ch;

  float m[kGT];
  float l[kGT];
  float o[kGT][kE];
#pragma unroll
  for (int g = 0; g < kGT; ++g) {
    m[g] = -kInf;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < kE; ++e) o[g][e] = 0.f;
  }

  for (int base = u0; base < u1; base += Tile::kThreads) {  // block-uniform rounds of units
    const int u = base + static_cast<int>(threadIdx.x);
    int valid[1] = {0};
    int start = 0;
    if (u < u1) {
      if (u < a.C) {
        const int32_t id = ids[u];
        if (id >= 0 && id < F) {
          valid[0] = 1;
          start = id * a.chunk_size;
        }
      } else if (tail_len > 0) {
        valid[0] = 1;
        start = tail0;
      }
    }
    if (base == u0) {  // q of the tile's heads, prescaled to log2 units (its loads overlap the ids')
      for (int i = static_cast<int>(threadIdx.x); i < kGT * kDp; i += Tile::kThreads) {
        const int g = i / kDp;
        const int d = i % kDp;
        float x = 0.f;
        if (g < heads && d < a.D) {
          x = to_float(a.q[static_cast<int64_t>(b) * a.stride_qb + static_cast<int64_t>(head0 + g) * a.stride_qh + d]);
        }
        sm.q[g][d] = x * a.scale_log2;
      }
    }
    int incl[1];
    int n = 0;
    Scan(sm.scan).InclusiveSum(valid, incl, n);
    if (valid[0]) sm.unit_start[incl[0] - 1] = start;
    // the tail is the last unit, so it is the last entry of the list when in this round
    const bool has_tail = tail_len > 0 && a.C >= base && a.C < u1 && a.C < base + Tile::kThreads;
    const int keys = has_tail ? (n - 1) * a.chunk_size + tail_len : n * a.chunk_size;
    __syncthreads();

    // One lane per key of a warp step finds its page and slot. The block-table read of
    // the next step is issued before the current step's K/V loads and used one step
    // later, so its latency overlaps them.
    int next_page = -1;
    int next_slot = 0;
    auto locate = [&](int kb) {
      next_page = -1;
      const int key = kb + lane;
      if (lane < Tile::kKW && key < keys) {
        const int unit = key / a.chunk_size;
        const int pos = sm.unit_start[unit] + (key - unit * a.chunk_size);
        if (pos < a.capacity) {
          next_page = bt_row[pos / a.page_size];
          next_slot = pos % a.page_size;
        }
      }
    };
    constexpr int kStride = Tile::kWarps * Tile::kKW;
    locate(warp * Tile::kKW);
    for (int kb = warp * Tile::kKW; kb < keys; kb += kStride) {  // warp-uniform
      const int page_now = next_page;
      const int slot_now = next_slot;
      locate(kb + kStride);
      const int64_t packed = page_now >= 0 && page_now < a.num_pages
                                 ? (static_cast<int64_t>(page_now) << 32) | static_cast<int64_t>(slot_now)
                                 : int64_t{-1};
      uint4 kr[kT][kV];
      uint4 vr[kT][kV];
      bool ok[kT];
#pragma unroll
      for (int t = 0; t < kT; ++t) {
        const int64_t p = __shfl_sync(kFullMask, packed, t * Tile::kGroups + group);
        ok[t] = p >= 0;
        const int64_t page = ok[t] ? (p >> 32) : 0;
        const int64_t slot = ok[t] ? (p & 0xFFFFFFFF) : 0;
        load_row<T, kV>(kr[t], a.k + page * a.stride_kp + slot * a.stride_ks + h * a.stride_kh, d0, a.D, ok[t],
                        a.vec_kv);
        load_row<T, kV>(vr[t], a.v + page * a.stride_vp + slot * a.stride_vs + h * a.stride_vh, d0, a.D, ok[t],
                        a.vec_kv);
      }
      // scores of the group's kT keys for every head: lane-partial dots, then the butterfly
      float s[kT][kGT];
#pragma unroll
      for (int g = 0; g < kGT; ++g) {
        float qg[kE];
#pragma unroll
        for (int e = 0; e < kE; e += 4) {
          const float4 x = *reinterpret_cast<const float4*>(&sm.q[g][d0 + e]);
          qg[e] = x.x;
          qg[e + 1] = x.y;
          qg[e + 2] = x.z;
          qg[e + 3] = x.w;
        }
#pragma unroll
        for (int t = 0; t < kT; ++t) {
          float acc = 0.f;
#pragma unroll
          for (int e = 0; e < kE; ++e) acc = fmaf(qg[e], elem<T, kV>(kr[t], e), acc);
          s[t][g] = acc;
        }
      }
#pragma unroll
      for (int off = Tile::kL / 2; off >= 1; off /= 2) {
#pragma unroll
        for (int t = 0; t < kT; ++t) {
#pragma unroll
          for (int g = 0; g < kGT; ++g) s[t][g] += __shfl_xor_sync(kFullMask, s[t][g], off);
        }
      }
      // online softmax of the group's keys: s becomes p = 2^(s - m_new)
      float alpha[kGT];
#pragma unroll
      for (int g = 0; g < kGT; ++g) {
        float mx = -kInf;
#pragma unroll
        for (int t = 0; t < kT; ++t) {
          if (!ok[t]) s[t][g] = -kInf;
          mx = fmaxf(mx, s[t][g]);
        }
        const float m_new = fmaxf(m[g], mx);
        const float m_safe = m_new == -kInf ? 0.f : m_new;
        alpha[g] = exp2f(m[g] - m_safe);
        float sum = 0.f;
#pragma unroll
        for (int t = 0; t < kT; ++t) {
          s[t][g] = exp2f(s[t][g] - m_safe);
          sum += s[t][g];
        }
        l[g] = l[g] * alpha[g] + sum;
        m[g] = m_new;
      }
#pragma unroll
      for (int e = 0; e < kE; ++e) {
#pragma unroll
        for (int g = 0; g < kGT; ++g) o[g][e] *= alpha[g];
#pragma unroll
        for (int t = 0; t < kT; ++t) {
          const float ve = elem<T, kV>(vr[t], e);
#pragma unroll
          for (int g = 0; g < kGT; ++g) o[g][e] = fmaf(s[t][g], ve, o[g][e]);
        }
      }
    }
    __syncthreads();  // the unit list is rewritten by the next round
  }

  // merge the lane groups of the warp
#pragma unroll
  for (int g = 0; g < kGT; ++g) {
    float mw = m[g];
#pragma unroll
    for (int off = Tile::kL; off < kWarp; off *= 2) mw = fmaxf(mw, __shfl_xor_sync(kFullMask, mw, off));
    const float f = exp2f(m[g] - (mw == -kInf ? 0.f : mw));
    float lw = l[g] * f;
#pragma unroll
    for (int e = 0; e < kE; ++e) o[g][e] *= f;
#pragma unroll
    for (int off = Tile::kL; off < kWarp; off *= 2) {
      lw += __shfl_xor_sync(kFullMask, lw, off);
#pragma unroll
      for (int e = 0; e < kE; ++e) o[g][e] += __shfl_xor_sync(kFullMask, o[g][e], off);
    }
    if (group == 0) {
#pragma unroll
      for (int e = 0; e < kE; ++e) sm.red_o[warp][g][d0 + e] = o[g][e];
    }
    if (lane == 0) {
      sm.red_m[warp][g] = mw;
      sm.red_l[warp][g] = lw;
    }
  }
  __syncthreads();
  // merge the warps of the block
  if (threadIdx.x < kGT) {
    const int g = static_cast<int>(threadIdx.x);
    float mb = -kInf;
    for (int w = 0; w < Tile::kWarps; ++w) mb = fmaxf(mb, sm.red_m[w][g]);
    const float m_safe = mb == -kInf ? 0.f : mb;
    float lb = 0.f;
    for (int w = 0; w < Tile::kWarps; ++w) {
      const float f = exp2f(sm.red_m[w][g] - m_safe);
      sm.weight[w][g] = f;
      lb += sm.red_l[w][g] * f;
    }
    sm.fin_m[g] = mb;
    sm.fin_l[g] = lb;
  }
  __syncthreads();
  const bool direct = a.num_splits == 1;
  for (int i = static_cast<int>(threadIdx.x); i < heads * a.D; i += Tile::kThreads) {
    const int g = i / a.D;
    const int d = i % a.D;
    float acc = 0.f;
    for (int w = 0; w < Tile::kWarps; ++w) acc += sm.red_o[w][g][d] * sm.weight[w][g];
    const int64_t row = static_cast<int64_t>(b) * a.Hq + head0 + g;
    if (direct) {
      const float lb = sm.fin_l[g];
      a.out[row * a.D + d] = from_float<T>(lb > 0.f ? acc * (1.f / lb) : 0.f);
    } else if (sm.fin_m[g] != -kInf) {  // the merge reads o only of splits that saw a key
      a.ws_o[(row * a.num_splits + split) * a.D + d] = acc;
    }
  }
  if (!direct && static_cast<int>(threadIdx.x) < heads) {
    const int g = static_cast<int>(threadIdx.x);
    const int64_t row = static_cast<int64_t>(b) * a.Hq + head0 + g;
    float* ml = a.ws_ml + (row * a.num_splits + split) * 2;
    ml[0] = sm.fin_m[g];
    ml[1] = sm.fin_l[g];
  }
}

constexpr int kMergeWarps = 4;
constexpr int kMergeThreads = kMergeWarps * kWarp;

// One warp per (request, query head): the log-sum-exp merge of the splits.
template <typename T>
__global__ void __launch_bounds__(kMergeThreads) sparse_merge_kernel(const SparseArgs<T> a) {
  __shared__ float weight[kMergeWarps][kMaxSplits];
  const int warp = static_cast<int>(threadIdx.x) / kWarp;
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kMergeWarps + warp;  // b · Hq + hq
  if (row >= static_cast<int64_t>(a.B) * a.Hq) return;  // warp-uniform
  const int S = a.num_splits;
  const float* ml = a.ws_ml + row * S * 2;
  float mx = -kInf;
  for (int s = lane; s < S; s += kWarp) mx = fmaxf(mx, ml[2 * s]);
#pragma unroll
  for (int off = kWarp / 2; off >= 1; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, off));
  const float m_safe = mx == -kInf ? 0.f : mx;
  float l = 0.f;
  for (int s = lane; s < S; s += kWarp) {
    const float w = exp2f(ml[2 * s] - m_safe);  // 0 for a split that saw no key
    weight[warp][s] = w;
    l += ml[2 * s + 1] * w;
  }
#pragma unroll
  for (int off = kWarp / 2; off >= 1; off /= 2) l += __shfl_xor_sync(kFullMask, l, off);
  __syncwarp();
  const float inv_l = l > 0.f ? 1.f / l : 0.f;
  const float* ws = a.ws_o + row * S * a.D;
  for (int d = lane; d < a.D; d += kWarp) {
    float acc = 0.f;
    for (int s = 0; s < S; ++s) {
      const float w = weight[warp][s];
      if (w != 0.f) acc += ws[static_cast<int64_t>(s) * a.D + d] * w;
    }
    a.out[row * a.D + d] = from_float<T>(acc * inv_l);
  }
}

template <typename T, int kDp, int kGT>
constexpr void check_sparse_smem() {
  static_assert(sizeof(SparseSmem<T, kDp, kGT>) <= 48 * 1024, "sparse attention exceeds static shared memory");
}

// --------------------------------------------------------------------- chunk selection

// Order-preserving key of a score: greater score <-> greater key; NaN as -inf, -0 as +0.
__device__ __forceinline__ uint32_t order_key(float s) {
  s = s != s ? -kInf : (s == 0.f ? 0.f : s);
  const int32_t bits = __float_as_int(s);
  return static_cast<uint32_t>(bits ^ ((bits >> 31) & 0x7FFFFFFF)) ^ 0x80000000u;
}

// Rows of the scores: the chunk means (fp32) or the cache rows (T).
template <typename T, bool kMeans>
using ScoreRow = std::conditional_t<kMeans, float, T>;

template <typename T, int kDp, bool kMeans>
struct ScoreTile : RowLanes<ScoreRow<T, kMeans>, kDp> {
  using Row = ScoreRow<T, kMeans>;
  static constexpr int kU = 4;  // rows in flight per lane: a warp reads kU rounds of kRows rows
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * kWarp;
  // chunks per block: a warp per chunk of the cache, a lane group per mean row
  static constexpr int kChunks = kMeans ? kWarps * RowLanes<Row, kDp>::kRows * kU : kWarps * 4;
};

template <typename T>
struct ScoreArgs {
  const T* q;          // [B, Hq, D]
  const T* k;          // [num_pages, page_size, Hkv, D]
  const float* means;  // [B, max_chunks, Hkv, D] or null
  uint32_t* keys;      // [B, Hkv, max_f]
  const int32_t* block_table;
  const int32_t* seq_lens;
  int64_t stride_qb, stride_qh;
  int64_t stride_kp, stride_ks, stride_kh;
  int64_t stride_mb, stride_mc, stride_mh;
  int64_t stride_bt;
  int64_t num_pages;
  int64_t max_f;  // chunks a request can have: capacity / chunk_size, or max_chunks
  int Hkv, G, D, C;
  int chunk_size, page_size;
  int num_sink, num_recent;
  int tiles;
  bool vec_rows;
};

// Full chunks of request b that selection sees (memory-safe for any seq_lens).
__device__ __forceinline__ int64_t full_chunks(const int32_t* seq_lens, int b, int chunk_size, int64_t max_f) {
  return min(static_cast<int64_t>(max(seq_lens[b], 0) / chunk_size), max_f);
}

template <typename T, int kDp, bool kMeans>
__global__ void __launch_bounds__(ScoreTile<T, kDp, kMeans>::kThreads) chunk_score_kernel(const ScoreArgs<T> a) {
  using Tile = ScoreTile<T, kDp, kMeans>;
  using Row = typename Tile::Row;
  constexpr int kE = Tile::kE;
  constexpr int kV = Tile::kV;
  const int warp = static_cast<int>(threadIdx.x) / kWarp;
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const int group = lane / Tile::kL;
  const int d0 = (lane % Tile::kL) * kE;
  int64_t block = blockIdx.x;
  const int tile = static_cast<int>(block % a.tiles);
  block /= a.tiles;
  const int h = static_cast<int>(block % a.Hkv);
  const int b = static_cast<int>(block / a.Hkv);
  const int64_t F = full_chunks(a.seq_lens, b, a.chunk_size, a.max_f);
  const int64_t first = static_cast<int64_t>(tile) * Tile::kChunks;
  // scores are needed only when there is a choice, and only for the chunks not kept anyway
  const int64_t lo = max(first, static_cast<int64_t>(a.num_sink));
  const int64_t hi = min(first + Tile::kChunks, F - a.num_recent);
  if (F <= a.C || lo >= hi) return;  // block-uniform

  float qs[kE];  // Σ_g q[b, h·G + g] over the lane's dims
#pragma unroll
  for (int e = 0; e < kE; ++e) qs[e] = 0.f;
  for (int g = 0; g < a.G; ++g) {
    const T* q_row = a.q + static_cast<int64_t>(b) * a.stride_qb + static_cast<int64_t>(h * a.G + g) * a.stride_qh;
#pragma unroll
    for (int e = 0; e < kE; ++e) {
      if (d0 + e < a.D) qs[e] += to_float(q_row[d0 + e]);
    }
  }
  uint32_t* keys = a.keys + (static_cast<int64_t>(b) * a.Hkv + h) * a.max_f;

  if constexpr (kMeans) {
    // a lane group per chunk: kU rows per lane in flight
    const float* base = a.means + static_cast<int64_t>(b) * a.stride_mb + static_cast<int64_t>(h) * a.stride_mh;
    uint4 raw[Tile::kU][kV];
#pragma unroll
    for (int u = 0; u < Tile::kU; ++u) {
      const int64_t c = first + (static_cast<int64_t>(warp) * Tile::kU + u) * Tile::kRows + group;
      load_row<float, kV>(raw[u], base + c * a.stride_mc, d0, a.D, c >= lo && c < hi, a.vec_rows);
    }
#pragma unroll
    for (int u = 0; u < Tile::kU; ++u) {
      float acc = 0.f;
#pragma unroll
      for (int e = 0; e < kE; ++e) acc = fmaf(qs[e], elem<float, kV>(raw[u], e), acc);
#pragma unroll
      for (int off = Tile::kL / 2; off >= 1; off /= 2) acc += __shfl_xor_sync(kFullMask, acc, off);
      const int64_t c = first + (static_cast<int64_t>(warp) * Tile::kU + u) * Tile::kRows + group;
      if (lane % Tile::kL == 0 && c >= lo && c < hi) keys[c] = order_key(acc);
    }
  } else {
    // a warp per chunk; the chunk's rows are runs of contiguous slots within one page
    // (chunk_size divides page_size or page_size divides chunk_size)
    const int run = min(a.chunk_size, a.page_size);
    const int runs = a.chunk_size / run;
    const int32_t* bt_row = a.block_table + static_cast<int64_t>(b) * a.stride_bt;
    for (int64_t c = first + warp; c < first + Tile::kChunks; c += Tile::kWarps) {  // warp-uniform
      if (c < lo || c >= hi) continue;
      const int64_t pos0 = c * a.chunk_size;  // < capacity: c < F <= capacity / chunk_size
      float acc = 0.f;
      for (int r = 0; r < runs; ++r) {
        const int64_t pos = pos0 + static_cast<int64_t>(r) * run;
        const int32_t page = bt_row[pos / a.page_size];
        if (page < 0 || page >= a.num_pages) continue;  // warp-uniform
        const int slot0 = static_cast<int>(pos % a.page_size);
        const T* base = a.k + page * a.stride_kp + h * a.stride_kh;
        for (int i0 = 0; i0 < run; i0 += Tile::kRows * Tile::kU) {
          uint4 raw[Tile::kU][kV];
#pragma unroll
          for (int u = 0; u < Tile::kU; ++u) {
            const int i = i0 + u * Tile::kRows + group;
            load_row<T, kV>(raw[u], base + static_cast<int64_t>(slot0 + i) * a.stride_ks, d0, a.D, i < run,
                            a.vec_rows);
          }
#pragma unroll
          for (int u = 0; u < Tile::kU; ++u) {
#pragma unroll
            for (int e = 0; e < kE; ++e) acc = fmaf(qs[e], elem<T, kV>(raw[u], e), acc);
          }
        }
      }
#pragma unroll
      for (int off = kWarp / 2; off >= 1; off /= 2) acc += __shfl_xor_sync(kFullMask, acc, off);
      if (lane == 0) keys[c] = order_key(acc / static_cast<float>(a.chunk_size));
    }
  }
}

constexpr int kSelectWarps = 8;
constexpr int kSelectThreads = kSelectWarps * kWarp;
constexpr int kSelectItems = 8;      // candidates per thread in a scan tile
constexpr int kSelectCache = 8192;   // candidates' keys kept in shared memory (else read from the workspace)

struct SelectArgs {
  const uint32_t* keys;  // [B, Hkv, max_f]
  int32_t* out;          // [B, Hkv, C] contiguous
  const int32_t* seq_lens;
  int64_t max_f;       // chunks a request can have (may be 0)
  int64_t key_stride;  // max(max_f, 1)
  int Hkv, C, chunk_size, num_sink, num_recent;
};

__global__ void __launch_bounds__(kSelectThreads) chunk_select_kernel(const SelectArgs a) {
  using Scan = cub::BlockScan<int, kSelectThreads>;
  __shared__ uint32_t cache[kSelectCache];
  __shared__ int partial[2][kSelectWarps];
  __shared__ typename Scan::TempStorage scan;
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t bh = blockIdx.x;
  const int b = static_cast<int>(bh / a.Hkv);
  int32_t* out = a.out + bh * a.C;
  const int64_t F = full_chunks(a.seq_lens, b, a.chunk_size, a.max_f);
  if (F <= a.C) {  // every chunk, then -1
    for (int i = tid; i < a.C; i += kSelectThreads) out[i] = i < F ? i : -1;
    return;
  }
  const int ns = a.num_sink;
  const int nr = a.num_recent;
  const int M = a.C - ns - nr;        // chosen by score
  const int64_t N = F - ns - nr;      // candidates ns .. F - nr - 1 (N > M)
  for (int i = tid; i < ns; i += kSelectThreads) out[i] = i;
  for (int i = tid; i < nr; i += kSelectThreads) out[ns + M + i] = static_cast<int32_t>(F - nr + i);
  if (M == 0) return;
  const uint32_t* src = a.keys + bh * a.key_stride + ns;
  if (N <= kSelectCache) {
    for (int i = tid; i < N; i += kSelectThreads) cache[i] = src[i];
    __syncthreads();
    src = cache;
  }
  int round = 0;
  // number of candidates whose key is >= x (every thread gets it)
  auto count_ge = [&](uint32_t x) {
    int n = 0;
    for (int64_t i = tid; i < N; i += kSelectThreads) n += src[i] >= x;
#pragma unroll
    for (int off = kWarp / 2; off >= 1; off /= 2) n += __shfl_xor_sync(kFullMask, n, off);
    int* slot = partial[round++ & 1];  // alternate buffers: a slow reader of the last round is not overwritten
    if (tid % kWarp == 0) slot[tid / kWarp] = n;
    __syncthreads();
    int total = 0;
#pragma unroll
    for (int w = 0; w < kSelectWarps; ++w) total += slot[w];
    return total;
  };
  // T: the largest value with count(key >= T) >= M, i.e. the M-th largest key (or any
  // value with exactly M keys at or above it)
  uint32_t T = 0;
  for (int bit = 31; bit >= 0; --bit) {
    const uint32_t cand = T | (1u << bit);
    const int n = count_ge(cand);
    if (n >= M) T = cand;
    if (n == M) break;  // block-uniform
  }
  const int need_eq = M - (T == 0xFFFFFFFFu ? 0 : count_ge(T + 1));  // keys == T to take, lowest ids first
  int carry_eq = 0;
  int carry_sel = 0;
  for (int64_t t0 = 0; t0 < N; t0 += kSelectThreads * kSelectItems) {
    int eq[kSelectItems];
    int sel[kSelectItems];
    int incl[kSelectItems];
    uint32_t key[kSelectItems];
#pragma unroll
    for (int i = 0; i < kSelectItems; ++i) {
      const int64_t idx = t0 + static_cast<int64_t>(tid) * kSelectItems + i;
      key[i] = idx < N ? src[idx] : 0u;
      eq[i] = idx < N && key[i] == T;
    }
    int agg = 0;
    Scan(scan).InclusiveSum(eq, incl, agg);
#pragma unroll
    for (int i = 0; i < kSelectItems; ++i) {
      const int64_t idx = t0 + static_cast<int64_t>(tid) * kSelectItems + i;
      sel[i] = idx < N && (key[i] > T || (eq[i] && carry_eq + incl[i] - 1 < need_eq));
    }
    carry_eq += agg;
    __syncthreads();
    Scan(scan).InclusiveSum(sel, incl, agg);
#pragma unroll
    for (int i = 0; i < kSelectItems; ++i) {
      const int64_t idx = t0 + static_cast<int64_t>(tid) * kSelectItems + i;
      if (sel[i]) out[ns + carry_sel + incl[i] - 1] = static_cast<int32_t>(ns + idx);
    }
    carry_sel += agg;
    __syncthreads();
  }
}

// ------------------------------------------------------------------------------ launchers

// q [B, Hq, D], a cache [num_pages, page_size, Hkv, D] of q's dtype, block_table, seq_lens.
void check_paged(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& block_table,
                 const at::Tensor& seq_lens, int64_t chunk_size) {
  check_device(q, "q", q);
  check_device(k_cache, "k_cache", q);
  check_int(block_table, "block_table", 2, false, q);
  check_int(seq_lens, "seq_lens", 1, false, q);
  TORCH_CHECK(q.dim() == 3, "fastverify_cuda: q must be [B, Hq, D], got shape ", q.sizes());
  TORCH_CHECK(k_cache.dim() == 4, "fastverify_cuda: k_cache must be [num_pages, page_size, Hkv, D], got shape ",
              k_cache.sizes());
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type(), "fastverify_cuda: q and k_cache must have one dtype, got ",
              q.scalar_type(), " and ", k_cache.scalar_type());
  dispatch_float(q.scalar_type(), "q", [](auto) {});
  const int64_t B = q.size(0);
  const int64_t Hq = q.size(1);
  const int64_t D = q.size(2);
  const int64_t Hkv = k_cache.size(2);
  TORCH_CHECK(D >= 1 && D <= kMaxHeadDim && k_cache.size(3) == D, "fastverify_cuda: head_dim must be 1 .. ",
              kMaxHeadDim, " and equal in q and the cache, got ", D, " and ", k_cache.size(3));
  TORCH_CHECK(Hkv >= 1 && Hq % Hkv == 0, "fastverify_cuda: q has ", Hq, " heads, not a multiple of the ", Hkv,
              " KV heads");
  TORCH_CHECK(k_cache.stride(3) == 1, "fastverify_cuda: the caches must be contiguous in head_dim");
  TORCH_CHECK(block_table.size(0) == B && seq_lens.numel() == B, "fastverify_cuda: block_table must have ", B,
              " rows and seq_lens ", B, " entries");
  TORCH_CHECK(chunk_size >= 1 && chunk_size < (int64_t{1} << 30), "fastverify_cuda: chunk_size must be >= 1, got ",
              chunk_size);
  TORCH_CHECK(k_cache.size(1) >= 1 && block_table.size(1) * k_cache.size(1) < (int64_t{1} << 31),
              "fastverify_cuda: block table capacity (max_pages * page_size) must be below 2^31");
  TORCH_CHECK(k_cache.size(0) < (int64_t{1} << 31) && B < (int64_t{1} << 31),
              "fastverify_cuda: too many pages or requests");
}

// f(std::integral_constant<int, kDp>{}) with kDp the padded head dim of D.
template <typename F>
void dispatch_head_dim(int64_t D, F&& f) {
  if (D <= 64) {
    f(std::integral_constant<int, 64>{});
  } else if (D <= 128) {
    f(std::integral_constant<int, 128>{});
  } else {
    f(std::integral_constant<int, 256>{});
  }
}

// f(std::integral_constant<int, kGT>{}) with kGT the query heads per block for group size G.
template <typename F>
void dispatch_heads(int64_t G, F&& f) {
  if (G == 1) {
    f(std::integral_constant<int, 1>{});
  } else if (G == 2) {
    f(std::integral_constant<int, 2>{});
  } else if (G <= 4) {
    f(std::integral_constant<int, 4>{});
  } else {
    f(std::integral_constant<int, 8>{});
  }
}

}  // namespace

at::Tensor sparse_kv_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                    const at::Tensor& block_table, const at::Tensor& seq_lens,
                                    const at::Tensor& chunk_ids, int64_t chunk_size, double sm_scale,
                                    int64_t num_splits, int64_t cuda_stream) {
  check_paged(q, k_cache, block_table, seq_lens, chunk_size);
  check_device(v_cache, "v_cache", q);
  check_int(chunk_ids, "chunk_ids", 3, false, q);
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == k_cache.scalar_type() &&
                  v_cache.stride(3) == 1,
              "fastverify_cuda: v_cache must be like k_cache (", k_cache.sizes(), ", ", k_cache.scalar_type(),
              ", contiguous in head_dim), got ", v_cache.sizes(), ", ", v_cache.scalar_type());
  const int64_t B = q.size(0);
  const int64_t Hq = q.size(1);
  const int64_t D = q.size(2);
  const int64_t Hkv = k_cache.size(2);
  TORCH_CHECK(chunk_ids.size(0) == B && chunk_ids.size(1) == Hkv && chunk_ids.size(2) >= 1 &&
                  chunk_ids.size(2) < (int64_t{1} << 30),
              "fastverify_cuda: chunk_ids must be [B, Hkv, C >= 1] = [", B, ", ", Hkv, ", C], got ",
              chunk_ids.sizes());
  TORCH_CHECK(std::isfinite(sm_scale), "fastverify_cuda: sm_scale must be finite, got ", sm_scale);
  TORCH_CHECK(num_splits >= 0 && num_splits <= kMaxSplits, "fastverify_cuda: num_splits must be in [0, ", kMaxSplits,
              "] (0: choose), got ", num_splits);
  TORCH_CHECK(chunk_size <= kMaxChunkSize, "fastverify_cuda: sparse_kv_attention supports chunk_size up to ",
              kMaxChunkSize, ", got ", chunk_size);
  const c10::DeviceGuard guard(q.device());
  at::Tensor out = at::empty({B, Hq, D}, q.options());
  if (B == 0 || Hq == 0) return out;
  const at::Tensor qc = q.stride(2) == 1 ? q : q.contiguous();
  const at::Tensor table = block_table.stride(1) == 1 ? block_table : block_table.contiguous();
  const at::Tensor lens = seq_lens.contiguous();
  const at::Tensor ids = chunk_ids.stride(2) == 1 ? chunk_ids : chunk_ids.contiguous();
  const int64_t G = Hq / Hkv;
  const int64_t C = ids.size(2);
  const cudaStream_t stream = as_stream(cuda_stream);

  dispatch_float(q.scalar_type(), "q", [&](auto tag) {
    using Scalar = typename decltype(tag)::type;
    dispatch_head_dim(D, [&](auto dp) {
      constexpr int kDp = decltype(dp)::value;
      dispatch_heads(G, [&](auto gt) {
        constexpr int kGT = decltype(gt)::value;
        using Tile = SparseTile<Scalar, kDp, kGT>;
        check_sparse_smem<Scalar, kDp, kGT>();
        // splits from shapes only: one wave of kMinBlocks blocks per SM, one unit at least each
        const int64_t head_tiles = ceil_div(G, kGT);
        const int64_t rows = B * Hkv * head_tiles;
        const int64_t units = C + 1;
        int64_t splits = num_splits;
        if (splits == 0) splits = std::max<int64_t>(1, Tile::kMinBlocks * multiprocessor_count() / rows);
        splits = std::min<int64_t>({splits, int64_t{kMaxSplits}, units});
        const int64_t per = ceil_div(units, splits);
        splits = ceil_div(units, per);
        TORCH_CHECK(rows * splits < (int64_t{1} << 31), "fastverify_cuda: sparse_kv_attention grid too large");

        const auto f32 = q.options().dtype(at::kFloat);
        at::Tensor ws_o = splits > 1 ? at::empty({B, Hq, splits, D}, f32) : at::empty({0}, f32);
        at::Tensor ws_ml = splits > 1 ? at::empty({B, Hq, splits, 2}, f32) : at::empty({0}, f32);
        SparseArgs<Scalar> a;
        fill_paged_attention<Scalar>(a, qc, out, k_cache, v_cache, table, lens, ws_o, ws_ml, sm_scale);
        a.chunk_ids = ids.data_ptr<int32_t>();
        a.stride_qb = qc.stride(0);
        a.stride_qh = qc.stride(1);
        a.stride_cb = ids.stride(0);
        a.stride_ch = ids.stride(1);
        a.B = static_cast<int>(B);
        a.C = static_cast<int>(C);
        a.chunk_size = static_cast<int>(chunk_size);
        a.head_tiles = static_cast<int>(head_tiles);
        a.num_splits = static_cast<int>(splits);
        a.units_per_split = static_cast<int>(per);
        launch_kernel("sparse_partial_kernel", sparse_partial_kernel<Scalar, kDp, kGT>,
                      dim3(static_cast<unsigned>(rows * splits)), dim3(Tile::kThreads), stream, a);
        if (splits > 1) {
          launch_kernel("sparse_merge_kernel", sparse_merge_kernel<Scalar>,
                        dim3(static_cast<unsigned>(ceil_div(B * Hq, kMergeWarps))), dim3(kMergeThreads), stream, a);
        }
      });
    });
  });
  return out;
}

at::Tensor select_kv_chunks_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& block_table,
                                 const at::Tensor& seq_lens, int64_t chunk_size, int64_t num_chunks,
                                 int64_t num_sink_chunks, int64_t num_recent_chunks,
                                 const std::optional<at::Tensor>& chunk_means, int64_t cuda_stream) {
  check_paged(q, k_cache, block_table, seq_lens, chunk_size);
  const int64_t B = q.size(0);
  const int64_t Hq = q.size(1);
  const int64_t D = q.size(2);
  const int64_t Hkv = k_cache.size(2);
  const int64_t page_size = k_cache.size(1);
  TORCH_CHECK(page_size % chunk_size == 0 || chunk_size % page_size == 0, "fastverify_cuda: chunk_size (", chunk_size,
              ") must divide page_size (", page_size, ") or be a multiple of it");
  TORCH_CHECK(num_sink_chunks >= 0 && num_recent_chunks >= 0 && num_chunks >= num_sink_chunks + num_recent_chunks &&
                  num_chunks < (int64_t{1} << 30),
              "fastverify_cuda: need num_chunks >= num_sink_chunks + num_recent_chunks >= 0, got ", num_chunks, ", ",
              num_sink_chunks, ", ", num_recent_chunks);
  int64_t max_f = block_table.size(1) * page_size / chunk_size;
  if (chunk_means.has_value()) {
    const at::Tensor& cm = *chunk_means;
    check_device(cm, "chunk_means", q);
    TORCH_CHECK(cm.scalar_type() == at::kFloat && cm.dim() == 4 && cm.size(0) == B && cm.size(2) == Hkv &&
                    cm.size(3) == D,
                "fastverify_cuda: chunk_means must be float32 [B, max_chunks, Hkv, D] = [", B, ", max_chunks, ", Hkv,
                ", ", D, "], got ", cm.scalar_type(), " ", cm.sizes());
    max_f = cm.size(1);
  }
  const c10::DeviceGuard guard(q.device());
  at::Tensor out = at::empty({B, Hkv, num_chunks}, q.options().dtype(at::kInt));
  if (B == 0 || num_chunks == 0) return out;
  const at::Tensor qc = q.stride(2) == 1 ? q : q.contiguous();
  const at::Tensor table = block_table.stride(1) == 1 ? block_table : block_table.contiguous();
  const at::Tensor lens = seq_lens.contiguous();
  std::optional<at::Tensor> means;
  if (chunk_means.has_value()) means = chunk_means->stride(3) == 1 ? *chunk_means : chunk_means->contiguous();
  const int64_t G = Hq / Hkv;
  at::Tensor keys = at::empty({B, Hkv, std::max<int64_t>(max_f, 1)}, q.options().dtype(at::kInt));
  const cudaStream_t stream = as_stream(cuda_stream);

  if (max_f > num_chunks) {  // else every request takes all its chunks: nothing to score
    dispatch_float(q.scalar_type(), "q", [&](auto tag) {
      using Scalar = typename decltype(tag)::type;
      dispatch_head_dim(D, [&](auto dp) {
        constexpr int kDp = decltype(dp)::value;
        auto launch = [&](auto means_tag) {
          constexpr bool kMeans = decltype(means_tag)::value;
          using Tile = ScoreTile<Scalar, kDp, kMeans>;
          const int64_t tiles = ceil_div(max_f, Tile::kChunks);
          TORCH_CHECK(B * Hkv * tiles < (int64_t{1} << 31), "fastverify_cuda: select_kv_chunks grid too large");
          ScoreArgs<Scalar> a;
          fill_paged_keys<Scalar>(a, k_cache, table, lens, G);
          a.q = static_cast<const Scalar*>(qc.data_ptr());
          a.means = kMeans ? means->data_ptr<float>() : nullptr;
          a.keys = reinterpret_cast<uint32_t*>(keys.data_ptr<int32_t>());
          a.stride_qb = qc.stride(0);
          a.stride_qh = qc.stride(1);
          a.stride_mb = kMeans ? means->stride(0) : 0;
          a.stride_mc = kMeans ? means->stride(1) : 0;
          a.stride_mh = kMeans ? means->stride(2) : 0;
          a.max_f = max_f;
          a.C = static_cast<int>(num_chunks);
          a.chunk_size = static_cast<int>(chunk_size);
          a.num_sink = static_cast<int>(num_sink_chunks);
          a.num_recent = static_cast<int>(num_recent_chunks);
          a.tiles = static_cast<int>(tiles);
          a.vec_rows = cache_rows_vectorizable(kMeans ? *means : k_cache, D);
          launch_kernel("chunk_score_kernel", chunk_score_kernel<Scalar, kDp, kMeans>,
                        dim3(static_cast<unsigned>(B * Hkv * tiles)), dim3(Tile::kThreads), stream, a);
        };
        if (means.has_value()) {
          launch(std::true_type{});
        } else {
          launch(std::false_type{});
        }
      });
    });
  }
  SelectArgs s;
  s.keys = reinterpret_cast<const uint32_t*>(keys.data_ptr<int32_t>());
  s.out = out.data_ptr<int32_t>();
  s.seq_lens = lens.data_ptr<int32_t>();
  s.max_f = max_f;
  s.key_stride = std::max<int64_t>(max_f, 1);
  s.Hkv = static_cast<int>(Hkv);
  s.C = static_cast<int>(num_chunks);
  s.chunk_size = static_cast<int>(chunk_size);
  s.num_sink = static_cast<int>(num_sink_chunks);
  s.num_recent = static_cast<int>(num_recent_chunks);
  TORCH_CHECK(B * Hkv < (int64_t{1} << 31), "fastverify_cuda: select_kv_chunks grid too large");
  launch_kernel("chunk_select_kernel", chunk_select_kernel, dim3(static_cast<unsigned>(B * Hkv)),
                dim3(kSelectThreads), stream, s);
  return out;
}

}  // namespace fastverify
