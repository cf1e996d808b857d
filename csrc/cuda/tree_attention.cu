// CUDA backend of fastverify::build_tree, fastverify::tree_attention and fastverify::compact_kv.
//
// The same design and launch structure as the Triton backend
// (fastverify/triton/tree_attention.py); fastverify/ops/attention.py is the spec.
//
// Tree attention, for node i of request b (n nodes, prefix = seq_len - n) and query head
// h (KV head h / G, G = Hq / Hkv), with s_p = sm_scale · q[i, h] · K[p, h / G]:
//
//     out[i, h] = Σ_p softmax_p(s_p) · V[p, h / G]   over p < prefix and p = prefix + j, j ∈ tree_mask[i]
//
// Rows of a block are the (node, query head) pairs of one request and one KV head,
// r ↔ (node r / G, head h·G + r % G), so each K/V block is read once for every node and
// every query head of the GQA group. Two launches:
//
// 1. prefix_partial_kernel, one block per (q tile, prefix split, request · KV head),
//    q tiles of one split adjacent in the launch (its K/V then come from L2): flash
//    attention of the tile's rows over one split of the prefix, unmasked. Writes the
//    unnormalized output o_s, the running max m_s (log2 units) and the sum l_s.
//                                                              <- _prefix_partial_kernel
// 2. tree_merge_kernel, one block per (q tile, request · KV head): the same over the n
//    tree keys with the ancestor bitmask, then the log-sum-exp merge with every split:
//
//       m = max(m_t, m_s...),  out = (o_t·2^(m_t-m) + Σ_s o_s·2^(m_s-m)) / (l_t·2^(m_t-m) + Σ_s l_s·2^(m_s-m))
//                                                                  <- _tree_merge_kernel
//
// Inside a block each warp owns 16 rows. Per block of kBlockN keys: K and V are staged
// in shared memory; S = Q·Kᵀ goes on tensor cores for fp16/bf16 (wmma 16x16x16, fp32
// accumulation) and by FMA for fp32 (IEEE fp32 like the Triton kernel: no tf32); S is
// staged through shared memory, where two lanes per row run the online softmax and write
// p (rounded to the cache dtype, as Triton's p.to(v.dtype)) over it; then O ← α·O + P·V
// (wmma again for fp16/bf16). O stays in registers: the wmma accumulator layout is
// opaque, so each lane learns once which tile row each of its elements holds.
//
// Tiles (AttnTile; each fits the 48 KiB of static shared memory), warps × 16 rows, keys per step:
//   fp16/bf16  D <= 64: 4 warps, 64 keys   D <= 128: 4 warps, 32 keys   D <= 256: 2 warps, 16 keys
//   fp32       D <= 64: 4 warps, 32 keys   D <= 96: 2 warps, 32 keys    D <= 128: 2 warps, 16 keys
//              D <= 256: 1 warp, 8 keys
// Prefix splits as the Triton plan(): enough blocks for two waves, at most 16 splits of
// at least 256 keys, all from shapes (block_table width) without reading seq_lens.
//
// Head dims up to 256 run on the next of 64, 80, 96, 128, 256 (zero padded). Memory
// safety with unchecked input: keys at or past the block table's capacity, or on a page
// id outside the cache, are masked out; garbage parents end the walk of build_tree;
// compact_kv skips steps whose slots fall outside the cache.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "common.cuh"
#include "ops.h"

namespace fastverify {
namespace {

constexpr int kMaskBits = 64;        // bits per tree_mask word
constexpr int kMaxHeadDim = 256;
constexpr int kMaxSplits = 16;       // prefix splits (fastverify.triton.tree_attention.plan)
constexpr int kMinSplitKeys = 256;   // fewest prefix keys per split (Triton: 4 blocks of 64 keys)
constexpr int kStaticSmemBytes = 48 * 1024;

// ------------------------------------------------------------------------------ build_tree

constexpr int kBuildThreads = 128;

// One thread per node i of request b (<- _build_tree_kernel): walk up the parents,
// setting bit j % 64 of word j / 64 for itself and every ancestor j; depth = steps up.
// Only a parent before its child counts, so garbage parents end the walk; bits of
// nodes past the W words are dropped. Ancestors come in decreasing order, so each word
// is complete when the walk leaves it.
template <typename Id, typename Prefix>
__global__ void __launch_bounds__(kBuildThreads)
    build_tree_kernel(const Id* __restrict__ parents, const int32_t* __restrict__ cu,
                      const Prefix* __restrict__ prefix_lens, int64_t* __restrict__ tree_mask,
                      int64_t* __restrict__ positions, int32_t* __restrict__ depth_out, int64_t T, int B, int W) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kBuildThreads + threadIdx.x;
  if (i >= T) return;
  const int b = request_of_row(cu, i, B, 0);
  const int64_t n0 = cu[b];
  const int64_t n = cu[b + 1] - n0;
  int64_t* row = tree_mask + i * W;
  for (int w = 0; w < W; ++w) row[w] = 0;
  int64_t node = i - n0;
  int depth = 0;
  int64_t word = -1;
  uint64_t bits = 0;
  for (int64_t steps = 0; node >= 0 && steps < n; ++steps) {
    if (node / kMaskBits != word) {
      if (word >= 0 && word < W) row[word] = static_cast<int64_t>(bits);
      word = node / kMaskBits;
      bits = 0;
    }
    bits |= uint64_t{1} << (node % kMaskBits);
    int64_t parent = (node > 0 && n0 + node < T) ? static_cast<int64_t>(parents[n0 + node]) : -1;
    if (parent >= node) parent = -1;
    depth += parent >= 0;
    node = parent;
  }
  if (word >= 0 && word < W) row[word] = static_cast<int64_t>(bits);
  positions[i] = static_cast<int64_t>(prefix_lens[b]) + depth;
  depth_out[i] = depth;
}

// ------------------------------------------------------------------------------ compact_kv

constexpr int kCompactThreads = 32;

struct CompactArgs {
  char* k;  // [num_pages, page_size, Hkv, D]
  char* v;
  const int32_t* block_table;
  const int32_t* prefix_lens;
  const int32_t* accepted;  // [B, columns]
  const int32_t* num_accepted;
  int64_t k_page_bytes, k_slot_bytes, k_head_bytes;  // strides in bytes
  int64_t v_page_bytes, v_slot_bytes, v_head_bytes;
  int64_t stride_bt, stride_acc;
  int64_t capacity;  // max_pages * page_size
  int64_t num_pages;
  int page_size;
  int columns;
  int units;  // Units per head row
};

// Request b, KV head h (<- _compact_kv_kernel): for i = 1 .. num_accepted[b] in
// increasing order, copy slot prefix + accepted[b, i] to slot prefix + i (K and V).
// A later step may overwrite an earlier step's source (path 0, 2, 3: step 2 writes
// prefix + 2, which step 1 reads) but never a later step's (a later source is
// prefix + node with node > its own step > every earlier destination), so running the
// steps in order equals the torch spec's gather-then-scatter. Each thread copies the
// same Units of every row, so its program order is all the ordering needed.
template <typename Unit>
__global__ void __launch_bounds__(kCompactThreads) compact_kv_kernel(const CompactArgs a) {
  const int64_t b = blockIdx.x;
  const int64_t h = blockIdx.y;
  const int64_t base = a.prefix_lens[b];
  const int last = min(a.num_accepted[b], a.columns - 1);
  const int32_t* bt_row = a.block_table + b * a.stride_bt;
  for (int i = 1; i <= last; ++i) {
    const int64_t node = a.accepted[b * a.stride_acc + i];
    const int64_t src = base + node;
    const int64_t dst = base + i;
    if (!(node > i && base >= 0 && src < a.capacity)) continue;  // node == i: already in place
    const int64_t sp = bt_row[src / a.page_size];
    const int64_t dp = bt_row[dst / a.page_size];
    if (sp < 0 || sp >= a.num_pages || dp < 0 || dp >= a.num_pages) continue;
    const int64_t so = src % a.page_size;
    const int64_t dO = dst % a.page_size;
    const int64_t k_src = sp * a.k_page_bytes + so * a.k_slot_bytes + h * a.k_head_bytes;
    const int64_t v_src = sp * a.v_page_bytes + so * a.v_slot_bytes + h * a.v_head_bytes;
    const int64_t k_dst = dp * a.k_page_bytes + dO * a.k_slot_bytes + h * a.k_head_bytes;
    const int64_t v_dst = dp * a.v_page_bytes + dO * a.v_slot_bytes + h * a.v_head_bytes;
    const Unit* ks = reinterpret_cast<const Unit*>(a.k + k_src);
    const Unit* vs = reinterpret_cast<const Unit*>(a.v + v_src);
    Unit* kd = reinterpret_cast<Unit*>(a.k + k_dst);
    Unit* vd = reinterpret_cast<Unit*>(a.v + v_dst);
    for (int u = threadIdx.x; u < a.units; u += kCompactThreads) {
      kd[u] = ks[u];
      vd[u] = vs[u];
    }
  }
}

// -------------------------------------------------------------------------- tree_attention

// Tile shape for element type T and padded head dim kDp: as large as fits the 48 KiB
// of static shared memory (AttnSmem) with 16 rows per warp.
template <typename T, int kDp>
struct AttnTile {
  static constexpr bool kTensorCores = sizeof(T) == 2;
  static constexpr int kWarps = kTensorCores ? (kDp <= 128 ? 4 : 2) : (kDp <= 64 ? 4 : kDp <= 128 ? 2 : 1);
  static constexpr int kThreads = kWarps * kWarp;
  static constexpr int kBlockM = 16 * kWarps;  // rows (node, query head) per block
  static constexpr int kBlockN = kTensorCores ? (kDp <= 64 ? 64 : kDp <= 128 ? 32 : 16)
                                              : (kDp <= 96 ? 32 : kDp <= 128 ? 16 : 8);  // keys per step
  static constexpr int kKeysPerLane = kBlockN / 2;       // two lanes per row in the softmax
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte load
  static constexpr int kLd = kDp + kVec;       // q/k/v row stride; the 16-byte skew spreads banks
  static constexpr int kLdS = kBlockN + 4;     // fp32 score row stride
  static constexpr int kLdP = kLdS * static_cast<int>(sizeof(float) / sizeof(T));  // p (as T) over the scores
  static constexpr int kLdO = kDp + 4;         // fp32 output row stride
  static_assert(kDp % 16 == 0 && kBlockN % 8 == 0 && kMaskBits % kBlockN == 0, "a key block lies in one mask word");
};

template <typename T, int kDp>
struct AttnSmem {
  using Tile = AttnTile<T, kDp>;
  struct Main {
    alignas(32) T q[Tile::kBlockM][Tile::kLd];
    alignas(32) T k[Tile::kBlockN][Tile::kLd];
    alignas(32) T v[Tile::kBlockN][Tile::kLd];
    alignas(32) float s[Tile::kBlockM][Tile::kLdS];  // scores, then p as T in place
  };
  struct Epilogue {
    alignas(32) float o[Tile::kBlockM][Tile::kLdO];  // unnormalized output of the block
    float w[Tile::kBlockM][kMaxSplits + 1];          // merge weights: tree part, then each split
  };
  union {
    Main main;
    Epilogue epi;  // once every warp is done with main
  };
  int32_t key_page[Tile::kBlockN];  // page of each key of the step; -1: masked out
  int32_t key_slot[Tile::kBlockN];
  float alpha[Tile::kBlockM];  // this step's rescale factor 2^(m_old - m_new) of each row
  float row_m[Tile::kBlockM];
  float row_l[Tile::kBlockM];
};

template <typename T>
struct AttnArgs {
  const T* q;  // [T, Hq, D]
  const T* k;  // [num_pages, page_size, Hkv, D]
  const T* v;
  T* out;  // [T, Hq, D]
  const int32_t* block_table;  // [B, max_pages]
  const int32_t* seq_lens;     // [B]
  const int32_t* cu;           // [B + 1]
  const int64_t* tree_mask;    // [T, W]
  float* ws_o;                 // [num_splits, T, Hq, D] unnormalized prefix outputs
  float* ws_ml;                // [num_splits, T, Hq, 2] (running max in log2 units, sum)
  int64_t stride_qt, stride_qh;
  int64_t stride_kp, stride_ks, stride_kh;
  int64_t stride_vp, stride_vs, stride_vh;
  int64_t stride_bt, stride_mt, stride_ot, stride_oh;
  int64_t total_nodes;  // T: rows of q
  int Hq, Hkv, G, D;
  int page_size;
  int64_t num_pages;
  int64_t capacity;  // max_pages * page_size: positions at or past it are masked out
  int W;
  int tiles;
  int num_splits;
  int64_t split;  // prefix keys per split, a multiple of kBlockN
  float scale_log2;  // sm_scale · log2(e)
  bool vec_q, vec_kv;  // 16-byte loads allowed
};

// The rows of q tile `tile` of request b, KV head h.
struct TileRows {
  int64_t n0;     // first node of the request
  int64_t n;      // its nodes
  int64_t first;  // first row of the tile (row r ↔ node r / G, query head h·G + r % G)
  int64_t count;  // rows of the tile that exist (<= kBlockM)
};

// Rows whose node would lie outside q (a garbage cu_num_nodes) are left out.
template <int kBlockM>
__device__ __forceinline__ TileRows tile_rows(const int32_t* cu, int b, int tile, int G, int64_t T) {
  TileRows t;
  t.n0 = cu[b];
  t.n = cu[b + 1] - t.n0;
  t.first = static_cast<int64_t>(tile) * kBlockM;
  t.count = t.n0 < 0 ? 0 : min(static_cast<int64_t>(kBlockM), min(t.n, T - t.n0) * G - t.first);
  return t;
}

// The [kRows, kDp] tile of T, the block's threads striding over it: wide(r, d0) for each
// 16-byte piece (d0 a multiple of kVec) where `vec`, else narrow(r, d) for each element.
template <typename T, int kDp, int kRows, typename Wide, typename Narrow>
__device__ __forceinline__ void for_each_tile_piece(bool vec, Wide&& wide, Narrow&& narrow) {
  using Tile = AttnTile<T, kDp>;
  if (vec) {
    constexpr int kChunks = kDp / Tile::kVec;
    for (int c = threadIdx.x; c < kRows * kChunks; c += Tile::kThreads) wide(c / kChunks, (c % kChunks) * Tile::kVec);
  } else {
    for (int e = threadIdx.x; e < kRows * kDp; e += Tile::kThreads) narrow(e / kDp, e % kDp);
  }
}

// q rows of the tile -> sm.q [kBlockM, kDp], zero past the tile's rows and past D.
template <typename T, int kDp>
__device__ void load_q_tile(AttnSmem<T, kDp>& sm, const AttnArgs<T>& a, const TileRows& rows, int h) {
  auto row_ptr = [&](int r) -> const T* {
    const int64_t row = rows.first + r;
    const int64_t node = row / a.G;
    const int64_t head = static_cast<int64_t>(h) * a.G + row % a.G;
    return a.q + (rows.n0 + node) * a.stride_qt + head * a.stride_qh;
  };
  for_each_tile_piece<T, kDp, AttnTile<T, kDp>::kBlockM>(
      a.vec_q,
      [&](int r, int d0) {
        uint4 x = make_uint4(0u, 0u, 0u, 0u);
        if (r < rows.count && d0 < a.D) x = *reinterpret_cast<const uint4*>(row_ptr(r) + d0);
        *reinterpret_cast<uint4*>(&sm.main.q[r][d0]) = x;
      },
      [&](int r, int d) { sm.main.q[r][d] = (r < rows.count && d < a.D) ? row_ptr(r)[d] : from_float<T>(0.f); });
}

// Page and slot of each key of a step (-1: masked). position(j) is the cache position of
// the step's j-th key, or -1 if the key is not part of this pass.
template <typename T, int kDp, typename Position>
__device__ void locate_keys(AttnSmem<T, kDp>& sm, const AttnArgs<T>& a, const int32_t* bt_row, Position position) {
  const int j = threadIdx.x;
  if (j < AttnTile<T, kDp>::kBlockN) {
    const int64_t pos = position(j);
    int64_t page = -1;
    if (pos >= 0 && pos < a.capacity) {
      page = bt_row[pos / a.page_size];
      if (page >= a.num_pages) page = -1;
    }
    sm.key_page[j] = page >= 0 ? static_cast<int32_t>(page) : -1;
    sm.key_slot[j] = page >= 0 ? static_cast<int32_t>(pos % a.page_size) : 0;
  }
}

// K, V rows of the step's keys -> sm.k, sm.v [kBlockN, kDp], zero where masked and past D.
template <typename T, int kDp>
__device__ void load_kv_block(AttnSmem<T, kDp>& sm, const AttnArgs<T>& a, int h) {
  auto k_row = [&](int j) {
    return a.k + sm.key_page[j] * a.stride_kp + sm.key_slot[j] * a.stride_ks + h * a.stride_kh;
  };
  auto v_row = [&](int j) {
    return a.v + sm.key_page[j] * a.stride_vp + sm.key_slot[j] * a.stride_vs + h * a.stride_vh;
  };
  for_each_tile_piece<T, kDp, AttnTile<T, kDp>::kBlockN>(
      a.vec_kv,
      [&](int j, int d0) {
        uint4 kx = make_uint4(0u, 0u, 0u, 0u);
        uint4 vx = kx;
        if (sm.key_page[j] >= 0 && d0 < a.D) {
          kx = *reinterpret_cast<const uint4*>(k_row(j) + d0);
          vx = *reinterpret_cast<const uint4*>(v_row(j) + d0);
        }
        *reinterpret_cast<uint4*>(&sm.main.k[j][d0]) = kx;
        *reinterpret_cast<uint4*>(&sm.main.v[j][d0]) = vx;
      },
      [&](int j, int d) {
        const bool ok = sm.key_page[j] >= 0 && d < a.D;
        sm.main.k[j][d] = ok ? k_row(j)[d] : from_float<T>(0.f);
        sm.main.v[j][d] = ok ? v_row(j)[d] : from_float<T>(0.f);
      });
}

// O [16 rows of a warp, kDp] in fp32 on tensor cores: kDp / 16 wmma accumulator tiles.
template <typename T, int kDp>
struct TensorCoreAcc {
  using Tile = AttnTile<T, kDp>;
  using AccFrag = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
  using AFrag = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, nvcuda::wmma::row_major>;
  using BRowFrag = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, nvcuda::wmma::row_major>;
  using BColFrag = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, nvcuda::wmma::col_major>;

  AccFrag o[kDp / 16];
  int row_of[AccFrag::num_elements];  // tile row of each accumulator element this lane holds

  // scratch: a free [16, >= 16] fp32 tile of the warp with row stride kLdS. Loading the
  // matrix M[r][c] = r tells each lane the row of each of its elements: every
  // accumulator fragment of this type maps its elements alike.
  __device__ void init(float* scratch) {
    for (int e = threadIdx.x % kWarp; e < 256; e += kWarp) scratch[(e / 16) * Tile::kLdS + e % 16] = e / 16;
    __syncwarp();
    AccFrag rows;
    nvcuda::wmma::load_matrix_sync(rows, scratch, Tile::kLdS, nvcuda::wmma::mem_row_major);
#pragma unroll
    for (int i = 0; i < AccFrag::num_elements; ++i) row_of[i] = static_cast<int>(rows.x[i]);
#pragma unroll
    for (int f = 0; f < kDp / 16; ++f) nvcuda::wmma::fill_fragment(o[f], 0.f);
    __syncwarp();  // the scratch tile is overwritten next
  }

  // s [16, kBlockN] (row stride kLdS) = q [16, kDp] · kᵀ, q and k row-major with stride kLd.
  __device__ static void scores(const T* q, const T* k, float* s) {
    constexpr int kTiles = Tile::kBlockN / 16;
    AccFrag acc[kTiles];
#pragma unroll
    for (int j = 0; j < kTiles; ++j) nvcuda::wmma::fill_fragment(acc[j], 0.f);
#pragma unroll
    for (int kk = 0; kk < kDp / 16; ++kk) {
      AFrag qa;
      nvcuda::wmma::load_matrix_sync(qa, q + kk * 16, Tile::kLd);
#pragma unroll
      for (int j = 0; j < kTiles; ++j) {
        BColFrag kb;  // kᵀ as a column-major [kDp, kBlockN] matrix is k row-major
        nvcuda::wmma::load_matrix_sync(kb, k + j * 16 * Tile::kLd + kk * 16, Tile::kLd);
        nvcuda::wmma::mma_sync(acc[j], qa, kb, acc[j]);
      }
    }
#pragma unroll
    for (int j = 0; j < kTiles; ++j) {
      nvcuda::wmma::store_matrix_sync(s + j * 16, acc[j], Tile::kLdS, nvcuda::wmma::mem_row_major);
    }
  }

  // O ← diag(alpha) O + p v: alpha [16] fp32, p [16, kBlockN] (stride kLdP), v [kBlockN, kDp] (stride kLd).
  __device__ void update(const float* alpha, const T* p, const T* v) {
    float scale[AccFrag::num_elements];
#pragma unroll
    for (int i = 0; i < AccFrag::num_elements; ++i) scale[i] = alpha[row_of[i]];
#pragma unroll
    for (int f = 0; f < kDp / 16; ++f) {
#pragma unroll
      for (int i = 0; i < AccFrag::num_elements; ++i) o[f].x[i] *= scale[i];
    }
#pragma unroll
    for (int kk = 0; kk < Tile::kBlockN / 16; ++kk) {
      AFrag pa;
      nvcuda::wmma::load_matrix_sync(pa, p + kk * 16, Tile::kLdP);
#pragma unroll
      for (int f = 0; f < kDp / 16; ++f) {
        BRowFrag vb;
        nvcuda::wmma::load_matrix_sync(vb, v + kk * 16 * Tile::kLd + f * 16, Tile::kLd);
        nvcuda::wmma::mma_sync(o[f], pa, vb, o[f]);
      }
    }
  }

  // o_smem [16, kDp] (stride kLdO) = O
  __device__ void store(float* o_smem) const {
#pragma unroll
    for (int f = 0; f < kDp / 16; ++f) {
      nvcuda::wmma::store_matrix_sync(o_smem + f * 16, o[f], Tile::kLdO, nvcuda::wmma::mem_row_major);
    }
  }
};

// O [16 rows of a warp, kDp] in fp32 by FMA (fp32 caches): the lane pair of row
// lane / 2 holds its columns 2c + lane % 2.
template <int kDp>
struct FmaAcc {
  using Tile = AttnTile<float, kDp>;
  float o[kDp / 2];

  __device__ void init(float*) {
#pragma unroll
    for (int c = 0; c < kDp / 2; ++c) o[c] = 0.f;
  }

  // s [16, kBlockN] = q [16, kDp] · kᵀ; lane (row, half) computes keys 2i + half of its row.
  __device__ static void scores(const float* q, const float* k, float* s) {
    const int row = (threadIdx.x % kWarp) / 2;
    const int half = threadIdx.x % 2;
    float acc[Tile::kKeysPerLane];
#pragma unroll
    for (int i = 0; i < Tile::kKeysPerLane; ++i) acc[i] = 0.f;
    for (int d = 0; d < kDp; ++d) {
      const float qd = q[row * Tile::kLd + d];
#pragma unroll
      for (int i = 0; i < Tile::kKeysPerLane; ++i) acc[i] += qd * k[(2 * i + half) * Tile::kLd + d];
    }
#pragma unroll
    for (int i = 0; i < Tile::kKeysPerLane; ++i) s[row * Tile::kLdS + 2 * i + half] = acc[i];
  }

  __device__ void update(const float* alpha, const float* p, const float* v) {
    const int row = (threadIdx.x % kWarp) / 2;
    const int half = threadIdx.x % 2;
    const float a = alpha[row];
#pragma unroll
    for (int c = 0; c < kDp / 2; ++c) o[c] *= a;
    for (int j = 0; j < Tile::kBlockN; ++j) {
      const float pj = p[row * Tile::kLdP + j];
#pragma unroll
      for (int c = 0; c < kDp / 2; ++c) o[c] += pj * v[j * Tile::kLd + 2 * c + half];
    }
  }

  __device__ void store(float* o_smem) const {
    const int row = (threadIdx.x % kWarp) / 2;
    const int half = threadIdx.x % 2;
#pragma unroll
    for (int c = 0; c < kDp / 2; ++c) o_smem[row * Tile::kLdO + 2 * c + half] = o[c];
  }
};

template <typename T, int kDp>
using RowAcc = std::conditional_t<AttnTile<T, kDp>::kTensorCores, TensorCoreAcc<T, kDp>, FmaAcc<kDp>>;

// Online softmax state of one row, kept by both lanes of its pair.
struct RowState {
  float m = -kInf;  // running max (log2 units)
  float l = 0.f;    // running sum of 2^(s - m)
};

// One step of the online softmax over the warp's scores s [16, kBlockN] (<- _online_softmax_step):
// s ← s · scale_log2, -inf where !allowed(row, j); m' = max(m, max_j s); α = 2^(m - m');
// p = 2^(s - m'); l ← α·l + Σ p. Writes p (as T) over the scores and α to alpha[row].
template <typename T, int kDp, typename Allowed>
__device__ __forceinline__ void softmax_step(float* s, float* alpha, float scale_log2, Allowed allowed,
                                             RowState& st) {
  using Tile = AttnTile<T, kDp>;
  const int row = (threadIdx.x % kWarp) / 2;
  const int half = threadIdx.x % 2;
  float x[Tile::kKeysPerLane];
  float mx = -kInf;
#pragma unroll
  for (int i = 0; i < Tile::kKeysPerLane; ++i) {
    const int j = 2 * i + half;
    x[i] = allowed(row, j) ? s[row * Tile::kLdS + j] * scale_log2 : -kInf;
    mx = fmaxf(mx, x[i]);
  }
  mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 1));
  const float m_new = fmaxf(st.m, mx);
  const float m_safe = m_new == -kInf ? 0.f : m_new;  // rows with nothing visible yet
  const float a = exp2f(st.m - m_safe);
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < Tile::kKeysPerLane; ++i) {
    x[i] = exp2f(x[i] - m_safe);
    sum += x[i];
  }
  sum += __shfl_xor_sync(kFullMask, sum, 1);
  st.l = st.l * a + sum;
  st.m = m_new;
  __syncwarp();  // every lane has read its scores before p overwrites them
  T* p = reinterpret_cast<T*>(s) + row * Tile::kLdP;
#pragma unroll
  for (int i = 0; i < Tile::kKeysPerLane; ++i) p[2 * i + half] = from_float<T>(x[i]);
  if (half == 0) alpha[row] = a;
  __syncwarp();
}

// Attention of the tile's rows over keys first .. end - 1 of a pass, kBlockN at a time,
// folded into (acc, st). position(j) maps a key index to its cache position (-1: not
// part of the pass); allowed(step_first_key, row, j) masks scores of the step.
template <typename T, int kDp, typename Position, typename Allowed>
__device__ void attend(AttnSmem<T, kDp>& sm, RowAcc<T, kDp>& acc, RowState& st, const AttnArgs<T>& a,
                       const int32_t* bt_row, int h, int64_t first, int64_t end, Position position,
                       Allowed allowed) {
  using Tile = AttnTile<T, kDp>;
  const int warp = threadIdx.x / kWarp;
  float* s = &sm.main.s[16 * warp][0];
  for (int64_t start = first; start < end; start += Tile::kBlockN) {
    locate_keys(sm, a, bt_row, [&](int j) { return start + j < end ? position(start + j) : int64_t{-1}; });
    __syncthreads();
    load_kv_block(sm, a, h);
    __syncthreads();
    RowAcc<T, kDp>::scores(&sm.main.q[16 * warp][0], &sm.main.k[0][0], s);
    __syncwarp();
    softmax_step<T, kDp>(
        s, &sm.alpha[16 * warp], a.scale_log2,
        [&](int row, int j) { return sm.key_page[j] >= 0 && allowed(start, 16 * warp + row, j); }, st);
    acc.update(&sm.alpha[16 * warp], reinterpret_cast<const T*>(s), &sm.main.v[0][0]);
    __syncthreads();  // k, v and the key pages are overwritten by the next step
  }
}

// The warp's O and (m, l) -> sm.epi.o, sm.row_m, sm.row_l (after every warp is done with sm.main).
template <typename T, int kDp>
__device__ void stage_rows(AttnSmem<T, kDp>& sm, const RowAcc<T, kDp>& acc, const RowState& st) {
  const int warp = threadIdx.x / kWarp;
  __syncthreads();
  acc.store(&sm.epi.o[16 * warp][0]);
  if (threadIdx.x % 2 == 0) {
    const int r = 16 * warp + (threadIdx.x % kWarp) / 2;
    sm.row_m[r] = st.m;
    sm.row_l[r] = st.l;
  }
  __syncthreads();
}

// The start of a kernel's pass over keys: the tile's q rows in shared memory, the warp's
// accumulator empty (its init may use the warp's score tile as scratch).
template <typename T, int kDp>
__device__ __forceinline__ void begin_pass(AttnSmem<T, kDp>& sm, RowAcc<T, kDp>& acc, const AttnArgs<T>& a,
                                           const TileRows& rows, int h) {
  load_q_tile(sm, a, rows, h);
  __syncthreads();
  acc.init(&sm.main.s[16 * (threadIdx.x / kWarp)][0]);
}

template <typename T, int kDp>
__global__ void __launch_bounds__(AttnTile<T, kDp>::kThreads) prefix_partial_kernel(const AttnArgs<T> a) {
  using Tile = AttnTile<T, kDp>;
  __shared__ AttnSmem<T, kDp> sm;
  const int64_t block = blockIdx.x;
  const int tile = static_cast<int>(block % a.tiles);
  const int split = static_cast<int>(block / a.tiles % a.num_splits);
  const int64_t bh = block / (static_cast<int64_t>(a.tiles) * a.num_splits);
  const int b = static_cast<int>(bh / a.Hkv);
  const int h = static_cast<int>(bh % a.Hkv);
  const TileRows rows = tile_rows<Tile::kBlockM>(a.cu, b, tile, a.G, a.total_nodes);
  const int64_t prefix_end = min(static_cast<int64_t>(a.seq_lens[b]) - rows.n, a.capacity);
  const int64_t s0 = split * a.split;
  const int64_t s1 = min(s0 + a.split, prefix_end);
  if (rows.count <= 0 || s0 >= s1) return;  // block-uniform

  RowAcc<T, kDp> acc;
  begin_pass(sm, acc, a, rows, h);
  RowState st;
  const int32_t* bt_row = a.block_table + b * a.stride_bt;
  attend(sm, acc, st, a, bt_row, h, s0, s1, [](int64_t key) { return key; },
         [](int64_t, int, int) { return true; });

  stage_rows(sm, acc, st);
  const int64_t ws_rows = a.total_nodes * a.Hq;
  for (int64_t e = threadIdx.x; e < rows.count * a.D; e += Tile::kThreads) {
    const int r = static_cast<int>(e / a.D);
    const int d = static_cast<int>(e % a.D);
    const int64_t row = rows.first + r;
    const int64_t t = rows.n0 + row / a.G;
    const int64_t head = static_cast<int64_t>(h) * a.G + row % a.G;
    a.ws_o[((split * ws_rows) + t * a.Hq + head) * a.D + d] = sm.epi.o[r][d];
  }
  for (int r = threadIdx.x; r < rows.count; r += Tile::kThreads) {
    const int64_t row = rows.first + r;
    const int64_t t = rows.n0 + row / a.G;
    const int64_t head = static_cast<int64_t>(h) * a.G + row % a.G;
    float* ml = a.ws_ml + ((split * ws_rows) + t * a.Hq + head) * 2;
    ml[0] = sm.row_m[r];
    ml[1] = sm.row_l[r];
  }
}

template <typename T, int kDp>
__global__ void __launch_bounds__(AttnTile<T, kDp>::kThreads) tree_merge_kernel(const AttnArgs<T> a) {
  using Tile = AttnTile<T, kDp>;
  __shared__ AttnSmem<T, kDp> sm;
  const int64_t block = blockIdx.x;
  const int tile = static_cast<int>(block % a.tiles);
  const int64_t bh = block / a.tiles;
  const int b = static_cast<int>(bh / a.Hkv);
  const int h = static_cast<int>(bh % a.Hkv);
  const TileRows rows = tile_rows<Tile::kBlockM>(a.cu, b, tile, a.G, a.total_nodes);
  if (rows.count <= 0) return;  // block-uniform
  const int64_t prefix = static_cast<int64_t>(a.seq_lens[b]) - rows.n;

  RowAcc<T, kDp> acc;
  begin_pass(sm, acc, a, rows, h);
  RowState st;
  const int32_t* bt_row = a.block_table + b * a.stride_bt;
  // The tree keys: node j sits at position prefix + j. Each lane reads its row's mask
  // word of the step once (a step never straddles two words).
  const int warp = threadIdx.x / kWarp;
  const int64_t my_row = rows.first + 16 * warp + (threadIdx.x % kWarp) / 2;
  const bool my_row_exists = my_row - rows.first < rows.count;
  uint64_t word = 0;
  int64_t word_start = -1;
  attend(sm, acc, st, a, bt_row, h, 0, rows.n,
         [&](int64_t j) { return prefix + j >= 0 ? prefix + j : int64_t{-1}; },
         [&](int64_t start, int, int j) {
           if (start != word_start) {
             word_start = start;
             const int64_t w = start / kMaskBits;
             word = (my_row_exists && w < a.W)
                        ? static_cast<uint64_t>(a.tree_mask[(rows.n0 + my_row / a.G) * a.stride_mt + w])
                        : 0;
           }
           return ((word >> (start % kMaskBits + j)) & 1) != 0;
         });

  // merge the prefix splits by log-sum-exp
  stage_rows(sm, acc, st);
  const int64_t prefix_end = min(prefix, a.capacity);
  const int splits =
      prefix_end > 0 ? static_cast<int>(min((prefix_end + a.split - 1) / a.split, static_cast<int64_t>(a.num_splits)))
                     : 0;
  const int64_t ws_rows = a.total_nodes * a.Hq;
  auto ws_row = [&](int r) {
    const int64_t row = rows.first + r;
    return (rows.n0 + row / a.G) * a.Hq + static_cast<int64_t>(h) * a.G + row % a.G;
  };
  for (int r = threadIdx.x; r < rows.count; r += Tile::kThreads) {
    const int64_t wr = ws_row(r);
    const float m_t = sm.row_m[r];
    float m = m_t;
    for (int sp = 0; sp < splits; ++sp) m = fmaxf(m, a.ws_ml[(sp * ws_rows + wr) * 2]);
    const float m_safe = m == -kInf ? 0.f : m;
    float* w = sm.epi.w[r];
    w[0] = exp2f(m_t - m_safe);
    float l = sm.row_l[r] * w[0];
    for (int sp = 0; sp < splits; ++sp) {
      const float* ml = a.ws_ml + (sp * ws_rows + wr) * 2;
      w[1 + sp] = exp2f(ml[0] - m_safe);
      l += ml[1] * w[1 + sp];
    }
    const float inv_l = l > 0.f ? 1.f / l : 0.f;  // a row that sees nothing gives 0
    for (int sp = 0; sp <= splits; ++sp) w[sp] *= inv_l;
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < rows.count * a.D; e += Tile::kThreads) {
    const int r = static_cast<int>(e / a.D);
    const int d = static_cast<int>(e % a.D);
    const int64_t wr = ws_row(r);
    const float* w = sm.epi.w[r];
    float o = sm.epi.o[r][d] * w[0];
    for (int sp = 0; sp < splits; ++sp) o += a.ws_o[(sp * ws_rows + wr) * a.D + d] * w[1 + sp];
    const int64_t row = rows.first + r;
    const int64_t head = static_cast<int64_t>(h) * a.G + row % a.G;
    a.out[(rows.n0 + row / a.G) * a.stride_ot + head * a.stride_oh + d] = from_float<T>(o);
  }
}

template <typename T, int kDp>
constexpr void check_smem() {
  static_assert(sizeof(AttnSmem<T, kDp>) <= kStaticSmemBytes, "attention tile exceeds static shared memory");
}

// ------------------------------------------------------------------------------ launchers

// f(Tag<int32_t or int64_t>{}) for an id tensor.
template <typename F>
void dispatch_id(at::ScalarType st, F&& f) {
  if (st == at::kLong) {
    f(Tag<int64_t>{});
  } else {
    f(Tag<int32_t>{});
  }
}

// f(std::integral_constant<int, kDp>{}) with kDp the padded head dim of D.
template <typename F>
void dispatch_head_dim(int64_t D, F&& f) {
  TORCH_CHECK(D >= 1 && D <= kMaxHeadDim, "fastverify_cuda: tree_attention supports head_dim 1 .. ", kMaxHeadDim,
              ", got ", D);
  if (D <= 64) {
    f(std::integral_constant<int, 64>{});
  } else if (D <= 80) {
    f(std::integral_constant<int, 80>{});
  } else if (D <= 96) {
    f(std::integral_constant<int, 96>{});
  } else if (D <= 128) {
    f(std::integral_constant<int, 128>{});
  } else {
    f(std::integral_constant<int, 256>{});
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> build_tree_cuda(const at::Tensor& parents,
                                                               const at::Tensor& cu_num_nodes,
                                                               const at::Tensor& prefix_lens, int64_t num_words,
                                                               int64_t cuda_stream) {
  check_int(parents, "parents", 1, true, parents);
  check_int(cu_num_nodes, "cu_num_nodes", 1, false, parents);
  check_int(prefix_lens, "prefix_lens", 1, true, parents);
  TORCH_CHECK(cu_num_nodes.numel() >= 2, "fastverify_cuda: cu_num_nodes must have B + 1 >= 2 entries");
  const int64_t B = cu_num_nodes.numel() - 1;
  TORCH_CHECK(prefix_lens.numel() == B, "fastverify_cuda: prefix_lens must have ", B, " entries, got ",
              prefix_lens.numel());
  TORCH_CHECK(num_words >= 1 && num_words < (int64_t{1} << 24), "fastverify_cuda: num_words out of range: ", num_words);
  TORCH_CHECK(B < (int64_t{1} << 31), "fastverify_cuda: too many requests: ", B);
  const c10::DeviceGuard guard(parents.device());
  const int64_t T = parents.numel();
  const auto opts = parents.options();
  at::Tensor mask = at::empty({T, num_words}, opts.dtype(at::kLong));
  at::Tensor positions = at::empty({T}, opts.dtype(at::kLong));
  at::Tensor depth = at::empty({T}, opts.dtype(at::kInt));
  if (T == 0) return {mask, positions, depth};
  const at::Tensor par = parents.contiguous();
  const at::Tensor cu = cu_num_nodes.contiguous();
  const at::Tensor prefix = prefix_lens.contiguous();
  const dim3 grid(static_cast<unsigned>(ceil_div(T, kBuildThreads)));
  dispatch_id(par.scalar_type(), [&](auto id_tag) {
    using Id = typename decltype(id_tag)::type;
    dispatch_id(prefix.scalar_type(), [&](auto prefix_tag) {
      using Prefix = typename decltype(prefix_tag)::type;
      launch_kernel("build_tree_kernel", build_tree_kernel<Id, Prefix>, grid, dim3(kBuildThreads),
                    as_stream(cuda_stream), par.data_ptr<Id>(), cu.data_ptr<int32_t>(), prefix.data_ptr<Prefix>(),
                    mask.data_ptr<int64_t>(), positions.data_ptr<int64_t>(), depth.data_ptr<int32_t>(), T,
                    static_cast<int>(B), static_cast<int>(num_words));
    });
  });
  return {mask, positions, depth};
}

at::Tensor tree_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& block_table, const at::Tensor& seq_lens,
                               const at::Tensor& cu_num_nodes, const at::Tensor& tree_mask, double sm_scale,
                               int64_t num_splits, int64_t cuda_stream) {
  check_device(q, "q", q);
  check_device(k_cache, "k_cache", q);
  check_device(v_cache, "v_cache", q);
  check_int(block_table, "block_table", 2, false, q);
  check_int(seq_lens, "seq_lens", 1, false, q);
  check_int(cu_num_nodes, "cu_num_nodes", 1, false, q);
  check_device(tree_mask, "tree_mask", q);
  TORCH_CHECK(q.dim() == 3, "fastverify_cuda: q must be [T, Hq, D], got shape ", q.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "fastverify_cuda: k_cache and v_cache must both be [num_pages, page_size, Hkv, D], got ",
              k_cache.sizes(), " and ", v_cache.sizes());
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "fastverify_cuda: q, k_cache and v_cache must have one dtype, got ", q.scalar_type(), ", ",
              k_cache.scalar_type(), ", ", v_cache.scalar_type());
  TORCH_CHECK(q.stride(2) == 1 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "fastverify_cuda: q, k_cache and v_cache must be contiguous in head_dim");
  const int64_t T = q.size(0);
  const int64_t Hq = q.size(1);
  const int64_t D = q.size(2);
  const int64_t Hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D, "fastverify_cuda: k_cache head_dim ", k_cache.size(3), " != q head_dim ", D);
  TORCH_CHECK(Hkv >= 1 && Hq % Hkv == 0, "fastverify_cuda: q has ", Hq, " heads, not a multiple of the ", Hkv,
              " KV heads");
  TORCH_CHECK(cu_num_nodes.numel() >= 2, "fastverify_cuda: cu_num_nodes must have B + 1 >= 2 entries");
  const int64_t B = cu_num_nodes.numel() - 1;
  TORCH_CHECK(block_table.size(0) == B && seq_lens.numel() == B, "fastverify_cuda: block_table must have ", B,
              " rows and seq_lens ", B, " entries");
  TORCH_CHECK(tree_mask.dim() == 2 && tree_mask.size(0) == T && tree_mask.size(1) >= 1 &&
                  tree_mask.scalar_type() == at::kLong,
              "fastverify_cuda: tree_mask must be int64 [T, W >= 1], got ", tree_mask.scalar_type(), " ",
              tree_mask.sizes());
  TORCH_CHECK(std::isfinite(sm_scale), "fastverify_cuda: sm_scale must be finite, got ", sm_scale);
  TORCH_CHECK(num_splits >= 0 && num_splits <= kMaxSplits, "fastverify_cuda: num_splits must be in [0, ",
              kMaxSplits, "] (0: choose), got ", num_splits);
  const c10::DeviceGuard guard(q.device());
  at::Tensor out = at::empty_like(q);
  if (T == 0 || Hq == 0) return out;
  const at::Tensor cu = cu_num_nodes.contiguous();
  const at::Tensor lens = seq_lens.contiguous();
  const at::Tensor table = block_table.stride(1) == 1 ? block_table : block_table.contiguous();
  const at::Tensor mask = tree_mask.stride(1) == 1 ? tree_mask : tree_mask.contiguous();
  const int64_t G = Hq / Hkv;
  const int64_t page_size = k_cache.size(1);
  const int64_t capacity = table.size(1) * page_size;
  const int64_t max_nodes = std::min(T, kMaskBits * mask.size(1));
  const cudaStream_t stream = as_stream(cuda_stream);

  dispatch_float(q.scalar_type(), "q", [&](auto tag) {
    using Scalar = typename decltype(tag)::type;
    dispatch_head_dim(D, [&](auto dp) {
      constexpr int kDp = decltype(dp)::value;
      using Tile = AttnTile<Scalar, kDp>;
      check_smem<Scalar, kDp>();
      // tile and split sizes from shapes only, as fastverify.triton.tree_attention.plan
      const int64_t tiles = ceil_div(max_nodes * G, Tile::kBlockM);
      int64_t splits = num_splits;
      if (splits == 0) {
        splits = std::max<int64_t>(1, std::min({ceil_div(2 * multiprocessor_count(), B * Hkv * tiles),
                                                int64_t{kMaxSplits}, ceil_div(capacity, kMinSplitKeys)}));
      }
      const int64_t split =
          std::max<int64_t>(Tile::kBlockN, ceil_div(ceil_div(capacity, splits), Tile::kBlockN) * Tile::kBlockN);
      splits = std::max<int64_t>(1, ceil_div(capacity, split));
      TORCH_CHECK(tiles * splits * B * Hkv < (int64_t{1} << 31), "fastverify_cuda: tree_attention grid too large");

      const auto f32 = q.options().dtype(at::kFloat);
      at::Tensor ws_o = at::empty({splits, T, Hq, D}, f32);
      at::Tensor ws_ml = at::empty({splits, T, Hq, 2}, f32);
      AttnArgs<Scalar> a;
      fill_paged_attention<Scalar>(a, q, out, k_cache, v_cache, table, lens, ws_o, ws_ml, sm_scale);
      a.cu = cu.data_ptr<int32_t>();
      a.tree_mask = mask.data_ptr<int64_t>();
      a.stride_qt = q.stride(0);
      a.stride_qh = q.stride(1);
      a.stride_mt = mask.stride(0);
      a.stride_ot = out.stride(0);
      a.stride_oh = out.stride(1);
      a.total_nodes = T;
      a.W = static_cast<int>(mask.size(1));
      a.tiles = static_cast<int>(tiles);
      a.num_splits = static_cast<int>(splits);
      a.split = split;
      a.vec_q = rows_vectorizable(q, {q.stride(0), q.stride(1)}, D);
      launch_kernel("prefix_partial_kernel", prefix_partial_kernel<Scalar, kDp>,
                    dim3(static_cast<unsigned>(tiles * splits * B * Hkv)), dim3(Tile::kThreads), stream, a);
      launch_kernel("tree_merge_kernel", tree_merge_kernel<Scalar, kDp>, dim3(static_cast<unsigned>(tiles * B * Hkv)),
                    dim3(Tile::kThreads), stream, a);
    });
  });
  return out;
}

void compact_kv_cuda(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& block_table,
                     const at::Tensor& prefix_lens, const at::Tensor& accepted_nodes, const at::Tensor& num_accepted,
                     int64_t cuda_stream) {
  check_device(k_cache, "k_cache", k_cache);
  check_device(v_cache, "v_cache", k_cache);
  check_int(block_table, "block_table", 2, false, k_cache);
  check_int(prefix_lens, "prefix_lens", 1, false, k_cache);
  check_int(accepted_nodes, "accepted_nodes", 2, false, k_cache);
  check_int(num_accepted, "num_accepted", 1, false, k_cache);
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() &&
                  v_cache.scalar_type() == k_cache.scalar_type(),
              "fastverify_cuda: k_cache and v_cache must be [num_pages, page_size, Hkv, D] of one dtype, got ",
              k_cache.sizes(), " and ", v_cache.sizes());
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "fastverify_cuda: k_cache and v_cache must be contiguous in head_dim");
  dispatch_float(k_cache.scalar_type(), "k_cache", [](auto) {});
  const int64_t B = accepted_nodes.size(0);
  TORCH_CHECK(block_table.size(0) == B && prefix_lens.numel() == B && num_accepted.numel() == B,
              "fastverify_cuda: block_table, prefix_lens and num_accepted must have ", B, " rows");
  const int64_t Hkv = k_cache.size(2);
  const int64_t D = k_cache.size(3);
  if (B == 0 || Hkv == 0 || D == 0 || accepted_nodes.size(1) == 0) return;
  TORCH_CHECK(Hkv <= 65535, "fastverify_cuda: compact_kv supports up to 65535 KV heads, got ", Hkv);
  const c10::DeviceGuard guard(k_cache.device());
  const at::Tensor table = block_table.stride(1) == 1 ? block_table : block_table.contiguous();
  const at::Tensor acc = accepted_nodes.stride(1) == 1 ? accepted_nodes : accepted_nodes.contiguous();
  const at::Tensor prefix = prefix_lens.contiguous();
  const at::Tensor num = num_accepted.contiguous();
  const int64_t elem = static_cast<int64_t>(k_cache.element_size());
  CompactArgs a;
  a.k = static_cast<char*>(k_cache.data_ptr());
  a.v = static_cast<char*>(v_cache.data_ptr());
  a.block_table = table.data_ptr<int32_t>();
  a.prefix_lens = prefix.data_ptr<int32_t>();
  a.accepted = acc.data_ptr<int32_t>();
  a.num_accepted = num.data_ptr<int32_t>();
  a.k_page_bytes = k_cache.stride(0) * elem;
  a.k_slot_bytes = k_cache.stride(1) * elem;
  a.k_head_bytes = k_cache.stride(2) * elem;
  a.v_page_bytes = v_cache.stride(0) * elem;
  a.v_slot_bytes = v_cache.stride(1) * elem;
  a.v_head_bytes = v_cache.stride(2) * elem;
  a.stride_bt = table.stride(0);
  a.stride_acc = acc.stride(0);
  a.capacity = table.size(1) * k_cache.size(1);
  a.num_pages = k_cache.size(0);
  a.page_size = static_cast<int>(k_cache.size(1));
  a.columns = static_cast<int>(acc.size(1));
  const int64_t row_bytes = D * elem;
  const dim3 grid(static_cast<unsigned>(B), static_cast<unsigned>(Hkv));
  const cudaStream_t stream = as_stream(cuda_stream);
  const bool vec = cache_rows_vectorizable(k_cache, D) && cache_rows_vectorizable(v_cache, D);
  if (vec) {
    a.units = static_cast<int>(row_bytes / 16);
    launch_kernel("compact_kv_kernel", compact_kv_kernel<uint4>, grid, dim3(kCompactThreads), stream, a);
  } else if (elem == 4) {
    a.units = static_cast<int>(D);
    launch_kernel("compact_kv_kernel", compact_kv_kernel<uint32_t>, grid, dim3(kCompactThreads), stream, a);
  } else {
    a.units = static_cast<int>(D);
    launch_kernel("compact_kv_kernel", compact_kv_kernel<uint16_t>, grid, dim3(kCompactThreads), stream, a);
  }
}

}  // namespace fastverify
