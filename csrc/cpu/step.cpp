// The CPU decode-step kernels of fastverify.models, in fp32, for a few rows (1..16 tokens:
// a decode step, a short draft chain or tree). fastverify/cpu/step.py wraps them.
//
// Why: on CPU a decode step of a small model is bound by streaming its weights, plus a
// fixed cost per torch op (a few µs each, ~40 ops per layer). torch's BLAS paths reach
// about half of two cores' bandwidth for one-row products, and a layer's norms, RoPE,
// cache writes and paged attention cost more than its matmuls. Here a layer is six
// calls: two projections with the RMSNorm fused in front, q/k/v post-processing with the
// cache write, paged attention, and two projections with the residual add (and SwiGLU)
// fused. Every loop is plain C++ that GCC vectorizes (-O3 -march=native), split across
// the OpenMP threads torch already runs.
//
// Plain C ABI (loaded with ctypes, like every file of csrc/cpu): no torch headers, so the
// library builds in seconds. It
// links the libgomp torch already loaded (same soname), so both share one thread pool.
// The Python side checks shapes, dtypes and strides; these functions trust them.
#include "attention.h"
#include "common.h"
#include "linear.h"
#include "quant.h"

namespace {

// The step's attention (attention.h) on fp32 layer views of the model's cache: slots
// slot_stride floats apart, pages of page_size slots, heads packed (D floats apart).
// The step's block table names only pages of the cache (checked in Python).
PagedAttention step_attention(int64_t N, int Hq, int Hkv, int D, int64_t slot_stride, const int32_t* block_table,
                              int64_t bt_stride, int page_size, const int32_t* seq_lens, const int32_t* cu_nodes,
                              int64_t B, const int64_t* tree_mask, int64_t mask_words, const int64_t* rows,
                              const int32_t* chunk_ids, int64_t n_ids, int chunk_size, float sm_scale, int threads) {
  PagedAttention a;
  a.N = N;
  a.Hq = Hq;
  a.Hkv = Hkv;
  a.D = D;
  a.q_tok = int64_t(Hq) * D;
  a.q_head = D;
  a.k_page = a.v_page = slot_stride * page_size;
  a.k_slot = a.v_slot = slot_stride;
  a.k_head = a.v_head = D;
  a.num_pages = std::numeric_limits<int32_t>::max();
  a.page_size = page_size;
  a.block_table = block_table;
  a.bt_stride = bt_stride;
  a.bt_cols = std::numeric_limits<int32_t>::max() / std::max(page_size, 1);  // seq_lens fit the table
  a.seq_lens = seq_lens;
  a.B = B;
  a.cu_nodes = cu_nodes;
  a.tree_mask = tree_mask;
  a.mask_words = mask_words;
  a.rows = rows;
  a.chunk_ids = chunk_ids;
  a.n_ids = n_ids;
  a.chunk_size = chunk_size;
  a.sm_scale = sm_scale;
  a.threads = threads;
  return a;
}

// Attention of the step's tokens, each row computed exactly as a one-token decode step at its
// position computes it. A row's visible keys are its request's prefix and then its own tree
// ancestors (itself included) in node order, which is the order of their positions on its
// path: the keys a decode step at that position sees, with the same K/V bits (the projections'
// arithmetic does not depend on the row count). They are taken as a sequence: chunks of
// EXACT_CHUNK keys of the sequence (units of parallel work), each an online softmax over
// blocks of EXACT_BLOCK keys, the chunks merged in order. So a row's arithmetic depends on its
// own key sequence only — not on the other rows, the tree around it, where its ancestors sit in
// the cache or the thread count — and a verification step, a chain or a prefill reproduces
// one-token steps bit for bit (attention.h's shared kernel splits by the step's total work and
// reads tree keys by cache position, which is faster for wide trees but not exact).
// q [N, Hq, D], out [N, Hq, D]; the step's layout as in step_attention.
constexpr int64_t EXACT_CHUNK = 256;
constexpr int EXACT_BLOCK = 16;
constexpr int EXACT_MAX_D = 256, EXACT_MAX_G = 16;  // head_dim and query heads per KV head it takes

void exact_step_attention(const PagedAttention& a, const float* q, const float* k_cache, const float* v_cache,
                          float* out) {
  const int64_t N = a.N;
  const int Hq = a.Hq, Hkv = a.Hkv, D = a.D, G = Hq / Hkv;
  // per row: request, prefix length, the cache positions of its tree keys
  std::vector<int64_t> req(N), prefix(N), first_key(N + 1, 0), tree_pos;
  for (int64_t t = 0; t < N; ++t) {
    const int64_t nd = a.rows ? a.rows[t] : t;
    int64_t lo = 0, hi = a.B - 1;
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (a.cu_nodes[mid] <= nd) lo = mid; else hi = mid - 1;
    }
    const int64_t n_b = a.cu_nodes[lo + 1] - a.cu_nodes[lo], local = nd - a.cu_nodes[lo];
    req[t] = lo;
    prefix[t] = a.seq_lens[lo] - n_b;
    const int64_t* mask = a.tree_mask + nd * a.mask_words;
    for (int64_t j = 0; j <= local && j < 64 * a.mask_words; ++j)
      if ((mask[j >> 6] >> (j & 63)) & 1) tree_pos.push_back(prefix[t] + j);
    first_key[t + 1] = int64_t(tree_pos.size());
  }
  // units (row, KV head, chunk of its key sequence); partial softmax states per query head
  std::vector<int64_t> first_unit(N + 1, 0);
  for (int64_t t = 0; t < N; ++t) {
    const int64_t n_vis = prefix[t] + first_key[t + 1] - first_key[t];
    first_unit[t + 1] = first_unit[t] + Hkv * std::max<int64_t>(1, (n_vis + EXACT_CHUNK - 1) / EXACT_CHUNK);
  }
  const int64_t units = first_unit[N];
  const int DA = D + 2;  // per query head: acc[D], m, l
  std::vector<float> state(units * G * DA);

#pragma omp parallel for num_threads(a.threads) schedule(dynamic, 1)
  for (int64_t u = 0; u < units; ++u) {
    int64_t lo = 0, hi = N - 1;  // the row of unit u
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (first_unit[mid] <= u) lo = mid; else hi = mid - 1;
    }
    const int64_t t = lo, b = req[t], P = prefix[t];
    const int64_t chunks = (first_unit[t + 1] - first_unit[t]) / Hkv;
    const int h = int((u - first_unit[t]) / chunks);
    const int64_t c = (u - first_unit[t]) % chunks;
    const int64_t* tp = tree_pos.data() + first_key[t];
    const int64_t n_vis = P + first_key[t + 1] - first_key[t];
    const int32_t* pages = a.block_table + b * a.bt_stride;
    float qs[EXACT_MAX_G][EXACT_MAX_D];  // the G query heads of KV head h, pre-scaled
    for (int g = 0; g < G; ++g)
      for (int i = 0; i < D; ++i) qs[g][i] = q[(t * Hq + h * G + g) * int64_t(D) + i] * a.sm_scale;
    float* st = state.data() + u * G * DA;
    for (int g = 0; g < G; ++g) {
      std::fill(st + g * DA, st + g * DA + D, 0.f);
      st[g * DA + D] = NEG_INF;
      st[g * DA + D + 1] = 0.f;
    }
    const int64_t k_end = std::min(n_vis, (c + 1) * EXACT_CHUNK);
    for (int64_t k0 = c * EXACT_CHUNK; k0 < k_end; k0 += EXACT_BLOCK) {
      const int n = int(std::min<int64_t>(EXACT_BLOCK, k_end - k0));
      const float* kp[EXACT_BLOCK];
      const float* vp[EXACT_BLOCK];
      for (int j = 0; j < n; ++j) {
        const int64_t i = k0 + j, p = i < P ? i : tp[i - P];
        const int64_t slot = int64_t(pages[p / a.page_size]) * a.page_size + p % a.page_size;
        kp[j] = k_cache + slot * a.k_slot + h * a.k_head;
        vp[j] = v_cache + slot * a.v_slot + h * a.v_head;
      }
      for (int g = 0; g < G; ++g) {
        float* acc = st + g * DA;
        float& m = acc[D];
        float& l = acc[D + 1];
        float sc[EXACT_BLOCK], mx = m;
        for (int j = 0; j < n; ++j) {
          sc[j] = dot(qs[g], kp[j], D);
          mx = sc[j] > mx ? sc[j] : mx;
        }
        const float alpha = exp_nonpositive(m - mx);  // m = −inf at the first block: 0
        l *= alpha;
#pragma omp simd
        for (int i = 0; i < D; ++i) acc[i] *= alpha;
        for (int j = 0; j < n; ++j) {
          const float pj = exp_nonpositive(sc[j] - mx);
          l += pj;
          const float* v = vp[j];
#pragma omp simd
          for (int i = 0; i < D; ++i) acc[i] += pj * v[i];
        }
        m = mx;
      }
    }
  }
  // merge each row's chunks in order
#pragma omp parallel for num_threads(a.threads) schedule(static)
  for (int64_t t = 0; t < N; ++t) {
    const int64_t chunks = (first_unit[t + 1] - first_unit[t]) / Hkv;
    for (int h = 0; h < Hkv; ++h)
      for (int g = 0; g < G; ++g) {
        const float* s0 = state.data() + ((first_unit[t] + h * chunks) * G + g) * DA;
        float acc[EXACT_MAX_D], m = s0[D], l = s0[D + 1];
        std::copy(s0, s0 + D, acc);
        for (int64_t c = 1; c < chunks; ++c) {
          const float* sc = s0 + c * G * DA;
          const float mx = std::max(m, sc[D]);
          const float ea = exp_nonpositive(m - mx), eb = exp_nonpositive(sc[D] - mx);
          l = l * ea + sc[D + 1] * eb;
          for (int i = 0; i < D; ++i) acc[i] = acc[i] * ea + sc[i] * eb;
          m = mx;
        }
        float* o = out + (t * Hq + h * G + g) * int64_t(D);
        const float inv = l > 0.f ? 1.f / l : 0.f;
        for (int i = 0; i < D; ++i) o[i] = acc[i] * inv;
      }
  }
}

// A projection of the decode step: row blocks ("parts") of one weight matrix, each fp32
// (ggml type 0) or GGUF blocks (quant.h), stacked in order. Mirrors fastverify/cpu/step.py.
constexpr int MAX_PARTS = 3;
struct Projection {
  int64_t n_parts;
  struct {
    int64_t address, ggml_type, rows;
  } part[MAX_PARTS];
};
constexpr int64_t LAYER_RECORD = 7 + 4 * (sizeof(Projection) / sizeof(int64_t));
static_assert(sizeof(Projection) == (1 + 3 * MAX_PARTS) * sizeof(int64_t), "Projection is read from int64 records");

// y[M, :] = residual + prologue(x) · Wᵀ + bias over the parts of p (K inputs). fp32 parts take
// up to 16 rows (linear_f32); GGUF blocks any number, each row computed alike.
int project(const Projection& p, const float* x, int64_t ldx, const float* bias, const float* res, int64_t ldr,
            float* y, int64_t ldy, int64_t M, int64_t K, const float* norm_w, float eps, int swiglu, int threads) {
  int64_t n0 = 0;
  for (int64_t i = 0; i < p.n_parts; ++i) {
    const auto& part = p.part[i];
    const float* b = bias ? bias + n0 : nullptr;
    const float* r = res ? res + n0 : nullptr;
    if (part.ggml_type == 0) {
      if (M > MAX_ROWS) return 1;
      linear_f32(x, ldx, reinterpret_cast<const float*>(part.address), b, r, ldr, y + n0, ldy, M, part.rows, K, norm_w,
                 eps, swiglu, threads);
    } else if (qlinear(x, ldx, reinterpret_cast<const uint8_t*>(part.address), int(part.ggml_type), b, r, ldr, y + n0,
                       ldy, M, part.rows, K, norm_w, eps, swiglu, threads)) {
      return 2;
    }
    n0 += part.rows;
  }
  return 0;
}

}  // namespace

extern "C" {

int fastverify_linear_f32(const float* x, int64_t ldx, const float* w, const float* bias, const float* residual,
                          int64_t ldr, float* y, int64_t ldy, int64_t M, int64_t N, int64_t K, const float* norm_w,
                          float eps, int swiglu, int threads) {
  return linear_f32(x, ldx, w, bias, residual, ldr, y, ldy, M, N, K, norm_w, eps, swiglu, threads);
}

// The attention input of N tokens from their fused projection qkv[N, (Hq + 2·Hkv)·D]
// (q heads, then k heads, then v heads): q/k RMSNorm over D when q_norm_w / k_norm_w are
// given, RoPE (x·cos + rotate_half(x)·sin, cos/sin [N, D]) on q and k, q into q_out[N, Hq, D],
// k and v into the cache at flat slot slots[t] (slot s, head h at k_cache + s·slot_stride + h·D).
void fastverify_qkv_rope_f32(const float* qkv, int64_t ldqkv, int64_t N, int Hq, int Hkv, int D, const float* cos,
                             const float* sin, const float* q_norm_w, const float* k_norm_w, float eps, float* q_out,
                             float* k_cache, float* v_cache, int64_t slot_stride, const int64_t* slots) {
  const int half = D / 2;
  std::vector<float> tmp(D);
  for (int64_t t = 0; t < N; ++t) {
    const float* row = qkv + t * ldqkv;
    const float* c = cos + t * D;
    const float* s = sin + t * D;
    for (int h = 0; h < Hq + Hkv; ++h) {
      const bool is_q = h < Hq;
      const float* x = row + int64_t(h) * D;
      const float* nw = is_q ? q_norm_w : k_norm_w;
      if (nw) {
        rms_norm_row(x, nw, eps, D, tmp.data());
        x = tmp.data();
      }
      float* dst = is_q ? q_out + (t * Hq + h) * D : k_cache + slots[t] * slot_stride + int64_t(h - Hq) * D;
      for (int i = 0; i < half; ++i) {
        dst[i] = x[i] * c[i] - x[i + half] * s[i];
        dst[i + half] = x[i + half] * c[i + half] + x[i] * s[i + half];
      }
    }
    for (int h = 0; h < Hkv; ++h)
      std::memcpy(v_cache + slots[t] * slot_stride + int64_t(h) * D, row + int64_t(Hq + Hkv + h) * D,
                  sizeof(float) * D);
  }
}

void fastverify_paged_attention_f32(const float* q, int64_t N, int Hq, int Hkv, int D, const float* k_cache,
                                    const float* v_cache, int64_t slot_stride, const int32_t* block_table,
                                    int64_t bt_stride, int page_size, const int32_t* seq_lens, const int32_t* cu_nodes,
                                    int64_t B, const int64_t* tree_mask, int64_t mask_words, const int64_t* rows,
                                    const int32_t* chunk_ids, int64_t n_ids, int chunk_size, float sm_scale,
                                    float* out, int threads) {
  const PagedAttention a = step_attention(N, Hq, Hkv, D, slot_stride, block_table, bt_stride, page_size, seq_lens,
                                          cu_nodes, B, tree_mask, mask_words, rows, chunk_ids, n_ids, chunk_size,
                                          sm_scale, threads);
  if (chunk_ids || D > EXACT_MAX_D || Hq / Hkv > EXACT_MAX_G)
    paged_attention<float>(a, q, k_cache, v_cache, out);
  else
    exact_step_attention(a, q, k_cache, v_cache, out);
}

// Decoder layers over N tokens in one call: per layer the six calls of the model's
// DecoderLayer.forward_cpu (projections, q/k/v + cache write, paged attention in tree mode),
// so a decode step crosses from Python once instead of six times per layer. x [N, d] is
// updated in place. Per layer l, the LAYER_RECORD int64s at records + l·LAYER_RECORD hold
// the addresses of: 0 input norm [d], 1 post-attention norm [d], 2 q norm [D] or 0, 3 k norm
// or 0, 4 / 5 the layer's K / V cache views (slots slot_stride apart), 6 the qkv bias or 0;
// then the projections Wqkv [(Hq+2Hkv)·D, d], Wo [d, Hq·D], W13 [2·I, d], Wdown [d, I] as
// Projection records. Returns 1 when fp32 weights get more than 16 tokens, 2 for an
// unsupported weight type.
int fastverify_decoder_layers(float* x, int64_t N, int64_t n_layers, const int64_t* records, int64_t d, int64_t I,
                              int Hq, int Hkv, int D, float eps, const float* cos, const float* sin,
                              int64_t slot_stride, const int64_t* slots, const int32_t* block_table, int64_t bt_stride,
                              int page_size, const int32_t* seq_lens, const int32_t* cu_nodes, int64_t B,
                              const int64_t* tree_mask, int64_t mask_words, const int64_t* rows, float sm_scale,
                              int threads) {
  if (N < 1) return 1;
  const int64_t QKV = int64_t(Hq + 2 * Hkv) * D, HD = int64_t(Hq) * D;
  std::vector<float> qkv(N * QKV), q(N * HD), attn(N * HD), x2(N * d), h(N * 2 * I);
  auto f = [](int64_t a) { return reinterpret_cast<float*>(a); };
  for (int64_t l = 0; l < n_layers; ++l) {
    const int64_t* r = records + l * LAYER_RECORD;
    const Projection* proj = reinterpret_cast<const Projection*>(r + 7);
    int rc = project(proj[0], x, d, f(r[6]), nullptr, 0, qkv.data(), QKV, N, d, f(r[0]), eps, 0, threads);
    if (rc) return rc;
    fastverify_qkv_rope_f32(qkv.data(), QKV, N, Hq, Hkv, D, cos, sin, f(r[2]), f(r[3]), eps, q.data(), f(r[4]),
                            f(r[5]), slot_stride, slots);
    fastverify_paged_attention_f32(q.data(), N, Hq, Hkv, D, f(r[4]), f(r[5]), slot_stride, block_table, bt_stride,
                                   page_size, seq_lens, cu_nodes, B, tree_mask, mask_words, rows, nullptr, 0, 0,
                                   sm_scale, attn.data(), threads);
    if ((rc = project(proj[1], attn.data(), HD, nullptr, x, d, x2.data(), d, N, HD, nullptr, 0.f, 0, threads))) return rc;
    if ((rc = project(proj[2], x2.data(), d, nullptr, nullptr, 0, h.data(), 2 * I, N, d, f(r[1]), eps, 0, threads)))
      return rc;
    if ((rc = project(proj[3], h.data(), 2 * I, nullptr, x2.data(), d, x, d, N, I, nullptr, 0.f, 1, threads))) return rc;
  }
  return 0;
}

}  // extern "C"
