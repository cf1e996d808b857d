// sparse_kv_attention on CPU tensors (fastverify/cpu/sparse_kv.py wraps it): the paged
// attention of attention.h in sparse mode, for q / caches of one element type (fp32,
// bf16, fp16; fp32 accumulation, output in q's type).
//
//   out[b, hq] = Σ_p softmax_p(sm_scale · q[b, hq] · K[p, h]) · V[p, h],  h = hq / G,
//   over the chunks c of chunk_ids[b, h] with 0 <= c < F_b = seq_lens[b] / chunk_size (other
//   ids, -1 included, skipped) and the tail F_b·chunk_size .. seq_lens[b] − 1; 0 with no key.
//
// Only the selected rows are read, each once for the G query heads of its KV head; work
// units (request, KV head, a range of its keys) are merged by log-sum-exp. Positions past
// the block table and page ids outside the cache are no key: never read.
#include "attention.h"

extern "C" {

// Strides in elements; chunk_ids [B, Hkv, n_ids] contiguous; returns 1 for an unknown dtype code.
int fastverify_sparse_kv_attention(int dtype, const void* q, int64_t B, int Hq, int64_t q_tok, int64_t q_head, int Hkv,
                                   int D, const void* k_cache, int64_t k_page, int64_t k_slot, int64_t k_head,
                                   const void* v_cache, int64_t v_page, int64_t v_slot, int64_t v_head,
                                   int64_t num_pages, int page_size, const int32_t* block_table, int64_t bt_stride,
                                   int64_t bt_cols, const int32_t* seq_lens, const int32_t* chunk_ids, int64_t n_ids,
                                   int chunk_size, float sm_scale, int num_splits, void* out, int threads) {
  PagedAttention a;
  a.N = B;
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
  a.chunk_ids = chunk_ids;
  a.n_ids = n_ids;
  a.chunk_size = chunk_size;
  a.sm_scale = sm_scale;
  a.num_splits = num_splits;
  a.threads = threads;
  return paged_attention_dtype(dtype, a, q, k_cache, v_cache, out);
}

}  // extern "C"
