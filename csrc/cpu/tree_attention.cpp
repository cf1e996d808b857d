// tree_attention on CPU tensors (fastverify/cpu/tree_attention.py wraps it): the paged
// attention of attention.h in tree mode, for q / caches of one element type (fp32, bf16,
// fp16; fp32 accumulation, output in q's type).
//
//   out[i, h] = Σ_p softmax_p(sm_scale · q[i, h] · K[p, h / G]) · V[p, h / G]
//   over the prefix keys p < seq_lens[b] − n_b and the tree keys seq_lens[b] − n_b + j whose
//   bit j is set in tree_mask[i] (node i of request b, n_b = cu_num_nodes[b+1] − cu_num_nodes[b]).
//
// Each request's keys are read once per KV head for all its nodes and the G query heads
// of the group (split into work units merged by log-sum-exp). Positions past the block
// table and page ids outside the cache are no key: never read.
#include "attention.h"

extern "C" {

// Strides in elements; returns 1 for an unknown dtype code.
int fastverify_tree_attention(int dtype, const void* q, int64_t N, int Hq, int64_t q_tok, int64_t q_head, int Hkv,
                              int D, const void* k_cache, int64_t k_page, int64_t k_slot, int64_t k_head,
                              const void* v_cache, int64_t v_page, int64_t v_slot, int64_t v_head, int64_t num_pages,
                              int page_size, const int32_t* block_table, int64_t bt_stride, int64_t bt_cols,
                              const int32_t* seq_lens, const int32_t* cu_num_nodes, int64_t B,
                              const int64_t* tree_mask, int64_t mask_words, float sm_scale, int num_splits, void* out,
                              int threads) {
  PagedAttention a;
  a.N = N;
  a.Hq = Hq;
  a.Hkv = Hkv;
  a.D = D;
  a.q_tok = q_tok;
  a.q_head = q_head;
  a.k_page = k_page;
  a.k_slot = k_slot;
  a.k_head = k_head;
  a.v_page = v_page;
  a.v_slot = v_slot;
  a.v_head = v_head;
  a.num_pages = num_pages;
  a.page_size = page_size;
  a.block_table = block_table;
  a.bt_stride = bt_stride;
  a.bt_cols = bt_cols;
  a.seq_lens = seq_lens;
  a.B = B;
  a.cu_nodes = cu_num_nodes;
  a.tree_mask = tree_mask;
  a.mask_words = mask_words;
  a.sm_scale = sm_scale;
  a.num_splits = num_splits;
  a.threads = threads;
  return paged_attention_dtype(dtype, a, q, k_cache, v_cache, out);
}

}  // extern "C"
