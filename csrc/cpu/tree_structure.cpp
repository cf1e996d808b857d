// cpu backend of fastverify::build_tree and fastverify::compact_kv (DESIGN.md §2.3);
// fastverify/ops/attention.py (build_tree_torch, compact_kv_torch) is the spec and
// csrc/cuda/tree_attention.cu the kernels these port. fastverify/cpu/tree_structure.py
// allocates the outputs and calls them.
//
// Both ops run once per decoding step on small inputs (a tree of tens of nodes, a path of
// a few slots per KV head), so the point is a low fixed cost: one plain loop, OpenMP only
// when the shapes say there is enough work to pay for waking the thread pool (a decision
// from shapes alone; every output element is computed by one thread in one fixed order,
// so results do not depend on the number of threads).
//
// Memory safety with unchecked input (the public op checks values on CPU, the unchecked
// entry points do not): garbage parents end a build_tree walk (only a parent before its
// child counts), rows of a garbage cu_num_nodes stay inside [0, T); compact_kv skips a
// step whose slot lies past the block table or on a page id outside the cache.
#include "common.h"

namespace {

constexpr int kMaskBits = 64;  // bits per tree_mask word

// Largest b in [0, B) with cu[b] <= row (binary search; any cu gives a b in range).
inline int64_t request_of_row(const int32_t* cu, int64_t row, int64_t B) {
  int64_t lo = 0, hi = B;
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (int64_t(cu[mid]) <= row) lo = mid; else hi = mid;
  }
  return lo;
}

// Well-formed trees (cu_num_nodes from 0 to T, nondecreasing), request by request, node
// by node: a parent precedes its child, so
//   tree_mask[n0 + j] = tree_mask[n0 + parent] | 2^(j mod 64) in word j / 64
//   depth[n0 + j] = depth[n0 + parent] + 1,   positions = prefix_lens[b] + depth
// (O(W) per node). A parent outside [0, j) counts as none (row = own bit, depth 0), as the
// walk below gives; bits of nodes past the W words are dropped.
template <typename Id, typename Prefix>
void build_tree_requests(const Id* parents, const int32_t* cu, const Prefix* prefix_lens, int64_t B, int W,
                         int64_t* mask, int64_t* positions, int32_t* depth_out, int team) {
#pragma omp parallel for num_threads(team) schedule(static) if (team > 1)
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n0 = cu[b], n = int64_t(cu[b + 1]) - n0;
    const int64_t prefix = prefix_lens[b];
    for (int64_t j = 0; j < n; ++j) {
      int64_t* row = mask + (n0 + j) * W;
      const int64_t parent = j > 0 ? int64_t(parents[n0 + j]) : -1;
      int32_t depth = 0;
      if (parent >= 0 && parent < j) {
        const int64_t* up = mask + (n0 + parent) * W;
        for (int w = 0; w < W; ++w) row[w] = up[w];
        depth = depth_out[n0 + parent] + 1;
      } else {
        for (int w = 0; w < W; ++w) row[w] = 0;
      }
      if (j / kMaskBits < W) row[j / kMaskBits] |= int64_t(uint64_t{1} << (j % kMaskBits));
      depth_out[n0 + j] = depth;
      positions[n0 + j] = prefix + depth;
    }
  }
}

// Any cu_num_nodes (the unchecked garbage case), one row at a time as the CUDA kernel: row
// i of request b (the largest b with cu[b] <= i; first node n0 = cu[b], n = cu[b+1] - n0
// nodes), node = i - n0, walks node -> parents[n0 + node] up to the root, setting bit
// j % 64 of word j / 64 for itself and every ancestor j; depth = steps up. Only a parent
// before its child counts, so garbage parents end the walk; ancestors come in decreasing
// order, so each word is complete when the walk leaves it.
template <typename Id, typename Prefix>
void build_tree_rows(const Id* parents, const int32_t* cu, const Prefix* prefix_lens, int64_t T, int64_t B, int W,
                     int64_t* mask, int64_t* positions, int32_t* depth_out, int team) {
#pragma omp parallel for num_threads(team) schedule(static) if (team > 1)
  for (int64_t i = 0; i < T; ++i) {
    const int64_t b = request_of_row(cu, i, B);
    const int64_t n0 = cu[b];
    const int64_t n = int64_t(cu[b + 1]) - n0;
    int64_t* row = mask + i * W;
    for (int w = 0; w < W; ++w) row[w] = 0;
    int64_t node = i - n0;
    int depth = 0;
    int64_t word = -1;
    uint64_t bits = 0;
    for (int64_t steps = 0; node >= 0 && steps < n; ++steps) {
      if (node / kMaskBits != word) {
        if (word >= 0 && word < W) row[word] = int64_t(bits);
        word = node / kMaskBits;
        bits = 0;
      }
      bits |= uint64_t{1} << (node % kMaskBits);
      int64_t parent = (node > 0 && n0 + node >= 0 && n0 + node < T) ? int64_t(parents[n0 + node]) : -1;
      if (parent >= node) parent = -1;  // a garbage parent (a cycle, a later node) ends the walk
      depth += parent >= 0;
      node = parent;
    }
    if (word >= 0 && word < W) row[word] = int64_t(bits);
    positions[i] = int64_t(prefix_lens[b]) + depth;
    depth_out[i] = depth;
  }
}

template <typename Id, typename Prefix>
void build_tree(const Id* parents, const int32_t* cu, const Prefix* prefix_lens, int64_t T, int64_t B, int W,
                int64_t* mask, int64_t* positions, int32_t* depth, int threads) {
  bool well_formed = cu[0] == 0 && cu[B] == T;
  for (int64_t b = 0; b < B && well_formed; ++b) well_formed = cu[b] <= cu[b + 1];
  // a thread team pays for itself only from tens of thousands of mask words
  const int team = T * W >= 32768 ? threads : 1;
  if (well_formed)
    build_tree_requests(parents, cu, prefix_lens, B, W, mask, positions, depth, team);
  else
    build_tree_rows(parents, cu, prefix_lens, T, B, W, mask, positions, depth, team);
}

template <typename Id>
void build_tree_dispatch_prefix(const Id* parents, const int32_t* cu, const void* prefix_lens, int prefix_is_64,
                                int64_t T, int64_t B, int W, int64_t* mask, int64_t* positions, int32_t* depth,
                                int threads) {
  if (prefix_is_64)
    build_tree(parents, cu, static_cast<const int64_t*>(prefix_lens), T, B, W, mask, positions, depth, threads);
  else
    build_tree(parents, cu, static_cast<const int32_t*>(prefix_lens), T, B, W, mask, positions, depth, threads);
}

}  // namespace

extern "C" {

// build_tree over T nodes of B >= 1 trees: parents [T] (int64 when parents_is_64, else
// int32), cu_num_nodes [B + 1] int32, prefix_lens [B] (int64 / int32), all contiguous;
// writes tree_mask [T, W] int64, positions [T] int64, depth [T] int32.
void fastverify_build_tree(const void* parents, int parents_is_64, const int32_t* cu_num_nodes,
                           const void* prefix_lens, int prefix_is_64, int64_t T, int64_t B, int W, int64_t* tree_mask,
                           int64_t* positions, int32_t* depth, int threads) {
  if (T <= 0 || B <= 0 || W <= 0) return;
  if (parents_is_64)
    build_tree_dispatch_prefix(static_cast<const int64_t*>(parents), cu_num_nodes, prefix_lens, prefix_is_64, T, B, W,
                               tree_mask, positions, depth, threads);
  else
    build_tree_dispatch_prefix(static_cast<const int32_t*>(parents), cu_num_nodes, prefix_lens, prefix_is_64, T, B, W,
                               tree_mask, positions, depth, threads);
}

// compact_kv: for request b and KV head h, for i = 1 .. min(num_accepted[b], columns - 1)
// in increasing order, with node = accepted[b, i] and base = prefix_lens[b]:
//   K[slot(base + i), h] = K[slot(base + node), h],  V likewise   (row_bytes bytes each)
// where slot(p) = (block_table[b, p / page_size], p % page_size). A later step may
// overwrite an earlier step's source (path 0, 2, 3: step 2 writes base + 2, which step 1
// reads) but never a later step's (a later source is base + node with node > its step >
// every earlier destination), so the steps in order equal the spec's gather-then-scatter.
// node == i is already in place. Strides are in bytes (caches) and elements (int tables).
void fastverify_compact_kv(char* k, char* v, int64_t k_page, int64_t k_slot, int64_t k_head, int64_t v_page,
                           int64_t v_slot, int64_t v_head, int64_t row_bytes, int64_t num_pages, int64_t page_size,
                           int64_t Hkv, const int32_t* block_table, int64_t bt_stride0, int64_t bt_stride1,
                           int64_t max_pages, const int32_t* prefix_lens, int64_t prefix_stride,
                           const int32_t* accepted, int64_t acc_stride0, int64_t acc_stride1, int64_t columns,
                           const int32_t* num_accepted, int64_t num_stride, int64_t B, int threads) {
  if (B <= 0 || Hkv <= 0 || row_bytes <= 0 || columns <= 0 || page_size <= 0) return;
  const int64_t capacity = max_pages * page_size;
  // a step moves 2·row_bytes per head: a thread team pays only for a large batch
  const int team = B * Hkv * columns * row_bytes >= (int64_t{1} << 20) ? threads : 1;
#pragma omp parallel for num_threads(team) schedule(static) if (team > 1)
  for (int64_t bh = 0; bh < B * Hkv; ++bh) {
    const int64_t b = bh / Hkv, h = bh % Hkv;
    const int64_t base = prefix_lens[b * prefix_stride];
    const int64_t last = std::min<int64_t>(num_accepted[b * num_stride], columns - 1);
    const int32_t* bt = block_table + b * bt_stride0;
    for (int64_t i = 1; i <= last; ++i) {
      const int64_t node = accepted[b * acc_stride0 + i * acc_stride1];
      const int64_t src = base + node, dst = base + i;
      if (!(node > i && base >= 0 && src < capacity)) continue;  // dst < src < capacity
      const int64_t sp = bt[(src / page_size) * bt_stride1], dp = bt[(dst / page_size) * bt_stride1];
      if (sp < 0 || sp >= num_pages || dp < 0 || dp >= num_pages) continue;
      const int64_t so = src % page_size, dso = dst % page_size;
      std::memmove(k + dp * k_page + dso * k_slot + h * k_head, k + sp * k_page + so * k_slot + h * k_head,
                   size_t(row_bytes));
      std::memmove(v + dp * v_page + dso * v_slot + h * v_head, v + sp * v_page + so * v_slot + h * v_head,
                   size_t(row_bytes));
    }
  }
}

}  // extern "C"
