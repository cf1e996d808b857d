// Paged attention over a tree per request or over selected chunks: the attention of the
// models' fused decode step (step.cpp) and of the tree_attention / sparse_kv_attention ops.
#pragma once

#include "common.h"

namespace {

constexpr int BLOCK = 32;    // keys scored at once inside a work unit

// acc[D] += Σ_j p[j] · rows[j][D] over the n rows with rows[j] != null (hidden[j] == null
// skips row j). Columns outer, rows inner: each 16 columns of acc stay in one register
// across all rows instead of a load-add-store chain per row.
inline void weighted_rows(float* __restrict__ acc, const float* p, const float* const* rows, const float* const* live,
                          int n, int D) {
  int i0 = 0;
#if defined(__AVX512F__)
  for (; i0 + 16 <= D; i0 += 16) {
    __m512 a = _mm512_loadu_ps(acc + i0);
    for (int j = 0; j < n; ++j)
      if (live[j]) a = _mm512_fmadd_ps(_mm512_set1_ps(p[j]), _mm512_loadu_ps(rows[j] + i0), a);
    _mm512_storeu_ps(acc + i0, a);
  }
#endif
  for (int j = 0; j < n; ++j) {
    if (!live[j]) continue;
    const float pj = p[j];
    const float* __restrict__ r = rows[j];
#pragma omp simd
    for (int i = i0; i < D; ++i) acc[i] += pj * r[i];
  }
}

// Online-softmax accumulation of nq query vectors q[i] (pre-scaled, D floats each) over
// n <= BLOCK keys whose rows are kp[j] / vp[j]; query i sees key j when kp[j] != null and
// (vis == null or vis[(i / G) · BLOCK + j]): the G query heads of a token share its
// visibility. Each key row is loaded once for all nq queries; m, l, acc hold each query's
// running max, sum and Σ p·V.
inline void attend_block(const float* const* q, int nq, int G, int D, const float* const* kp, const float* const* vp,
                         const uint8_t* vis, int n, float* __restrict__ m, float* __restrict__ l,
                         float* __restrict__ acc, float* __restrict__ s /* [nq][BLOCK] scratch */) {
  for (int j = 0; j < n; ++j)
    for (int i = 0; i < nq; ++i)
      s[i * BLOCK + j] = kp[j] && (!vis || vis[(i / G) * BLOCK + j]) ? dot(q[i], kp[j], D) : NEG_INF;
  const float* live[BLOCK];
  for (int i = 0; i < nq; ++i) {
    float* __restrict__ si = s + i * BLOCK;
    float mx = m[i];
    for (int j = 0; j < n; ++j) mx = si[j] > mx ? si[j] : mx;
    if (mx == NEG_INF) continue;  // nothing visible yet
    const float rescale = std::exp(m[i] - mx);  // 0 on the first visible block (m = -inf)
    float* __restrict__ ai = acc + int64_t(i) * D;
#pragma omp simd
    for (int d = 0; d < D; ++d) ai[d] *= rescale;
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int j = 0; j < n; ++j) {
      const float e = exp_nonpositive(si[j] - mx);
      si[j] = si[j] == NEG_INF ? 0.f : e;
      sum += si[j];
    }
    for (int j = 0; j < n; ++j) live[j] = si[j] != 0.f ? vp[j] : nullptr;
    weighted_rows(ai, si, vp, live, n, D);
    m[i] = mx;
    l[i] = l[i] * rescale + sum;
  }
}


// out[N, Hq, D] = Σ_p softmax_p(sm_scale · q·K[p]) · V[p] over each token's keys in the paged
// cache (k/v_cache as above; request b's pages are block_table[b·bt_stride + ...]).
//
// Tree mode (chunk_ids == null): token t is tree node rows[t] (rows == null: node t) of
// request b (cu_nodes[b] <= node < cu_nodes[b+1], n_b nodes); it sees the request's first
// seq_lens[b] − n_b keys and the tree keys seq_lens[b] − n_b + j whose bit j is set in its
// row of tree_mask[·, mask_words] (itself and its ancestors). The tokens of a request are
// scored together, so its keys are read once per KV head whatever the tree's size.
// Sparse mode (chunk_ids [B, Hkv, n_ids] int32, one token per request, N == B): token b sees,
// per KV head, the chunks c of its row with 0 <= c < F_b = seq_lens[b] / chunk_size (others
// and -1 skipped) and the tail F_b·chunk_size .. seq_lens[b] − 1; no key at all gives 0.
// Work units are (request, KV head, 64..512 keys of its list), merged by log-sum-exp.
// G = Hq / Hkv <= 32, at most 16 tokens per request.
inline void paged_attention_f32(const float* q, int64_t N, int Hq, int Hkv, int D, const float* k_cache,
                               const float* v_cache, int64_t slot_stride, const int32_t* block_table,
                               int64_t bt_stride, int page_size, const int32_t* seq_lens, const int32_t* cu_nodes,
                               int64_t B, const int64_t* tree_mask, int64_t mask_words, const int64_t* rows,
                               const int32_t* chunk_ids, int64_t n_ids, int chunk_size, float sm_scale,
                               float* out, int threads) {
  const int G = Hq / Hkv;
  const bool sparse = chunk_ids != nullptr;
  // groups: the tokens of one request (their key list is the request's), as (request, tokens)
  std::vector<int64_t> node(N), group_req, group_first(1, 0), group_tok;
  {
    std::vector<std::vector<int64_t>> of_req(B);
    for (int64_t t = 0; t < N; ++t) {
      int64_t b = t, nd = 0;
      if (!sparse) {
        nd = rows ? rows[t] : t;
        int64_t lo = 0, hi = B - 1;  // the request whose node range holds nd
        while (lo < hi) {
          const int64_t mid = (lo + hi + 1) / 2;
          if (cu_nodes[mid] <= nd) lo = mid; else hi = mid - 1;
        }
        b = lo;
      }
      node[t] = nd;
      of_req[b].push_back(t);
    }
    for (int64_t b = 0; b < B; ++b)
      if (!of_req[b].empty()) {
        group_req.push_back(b);
        group_tok.insert(group_tok.end(), of_req[b].begin(), of_req[b].end());
        group_first.push_back(int64_t(group_tok.size()));
      }
  }
  const int64_t n_groups = int64_t(group_req.size());
  // key list length per (group, KV head); sparse: the usable chunk ids
  std::vector<int64_t> n_keys(n_groups * Hkv), n_valid(n_groups * Hkv, 0);
  std::vector<int32_t> valid(sparse ? n_groups * Hkv * std::max<int64_t>(n_ids, 1) : 0);
  for (int64_t gi = 0; gi < n_groups; ++gi) {
    const int64_t b = group_req[gi], L = seq_lens[b];
    for (int h = 0; h < Hkv; ++h) {
      int64_t keys = L;
      if (sparse) {
        const int64_t full = L / chunk_size;
        const int32_t* ids = chunk_ids + (b * Hkv + h) * n_ids;
        int32_t* keep = valid.data() + (gi * Hkv + h) * n_ids;
        int64_t nv = 0;
        for (int64_t i = 0; i < n_ids; ++i)
          if (ids[i] >= 0 && ids[i] < full) keep[nv++] = ids[i];
        n_valid[gi * Hkv + h] = nv;
        keys = nv * chunk_size + (L - full * chunk_size);
      }
      n_keys[gi * Hkv + h] = keys;
    }
  }
  // keys per work unit: about 8 units per thread, 64..512 keys each (a multiple of BLOCK)
  int64_t total = 0;
  for (int64_t keys : n_keys) total += keys;
  const int64_t split = std::min<int64_t>(512, std::max<int64_t>(64, (total / (8 * threads) + BLOCK - 1) / BLOCK * BLOCK));
  std::vector<int64_t> first_unit(n_groups * Hkv + 1, 0), first_q(n_groups * Hkv + 1, 0);
  for (int64_t i = 0; i < n_groups * Hkv; ++i) {
    const int64_t gi = i / Hkv, nq = (group_first[gi + 1] - group_first[gi]) * G;
    const int64_t units = (n_keys[i] + split - 1) / split;
    first_unit[i + 1] = first_unit[i] + units;
    first_q[i + 1] = first_q[i] + units * nq;  // each unit keeps state for every query of its group
  }
  const int64_t units = first_unit[n_groups * Hkv];
  const int64_t states = first_q[n_groups * Hkv];
  std::vector<float> part_m(states, NEG_INF), part_l(states, 0.f), part_acc(states * D, 0.f);
  std::vector<float> qs(N * Hq * D);
  for (int64_t i = 0; i < N * Hq * D; ++i) qs[i] = q[i] * sm_scale;

#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int64_t u = 0; u < units; ++u) {
    int64_t lo = 0, hi = n_groups * Hkv - 1;  // which (group, KV head)
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (first_unit[mid] <= u) lo = mid; else hi = mid - 1;
    }
    const int64_t gi = lo / Hkv;
    const int h = int(lo % Hkv);
    const int64_t b = group_req[gi], L = seq_lens[b];
    const int64_t* toks = group_tok.data() + group_first[gi];
    const int nt = int(group_first[gi + 1] - group_first[gi]);
    const int nq = nt * G;
    const int64_t k0 = (u - first_unit[lo]) * split;
    const int64_t k1 = std::min<int64_t>(k0 + split, n_keys[lo]);
    const int64_t state = first_q[lo] + (u - first_unit[lo]) * nq;
    const int32_t* pages = block_table + b * bt_stride;
    const int64_t prefix = sparse ? L : L - (cu_nodes[b + 1] - cu_nodes[b]);
    const int64_t nv = n_valid[lo];
    const int32_t* keep = sparse ? valid.data() + lo * n_ids : nullptr;
    const int64_t full = sparse ? L / chunk_size : 0;
    std::vector<const float*> qv(nq);
    for (int ti = 0; ti < nt; ++ti)
      for (int g = 0; g < G; ++g) qv[ti * G + g] = qs.data() + (toks[ti] * Hq + int64_t(h) * G + g) * D;
    std::vector<float> scores(int64_t(nq) * BLOCK);
    std::vector<uint8_t> vis(int64_t(nt) * BLOCK);
    // rows of the keys k .. k+n-1 of the list into kp / vp; true when a tree key is among them
    auto locate = [&](int64_t k, int n, const float** kp, const float** vp) {
      for (int j = 0; j < n; ++j) {
        const int64_t i = k + j;  // the i-th key of the list, at position p
        const int64_t p = !sparse ? i
                          : i < nv * chunk_size ? int64_t(keep[i / chunk_size]) * chunk_size + i % chunk_size
                                           : full * chunk_size + (i - nv * chunk_size);
        const int64_t off = (int64_t(pages[p / page_size]) * page_size + p % page_size) * slot_stride + int64_t(h) * D;
        kp[j] = k_cache + off;
        vp[j] = v_cache + off;
      }
    };
    // Keys are rows of D floats far apart (a model's cache keeps all layers of a slot
    // together), so each is a cache miss: the next block's rows are located and prefetched
    // while this one is scored.
    const float* kp[2][BLOCK];
    const float* vp[2][BLOCK];
    int cur = 0;
    locate(k0, int(std::min<int64_t>(BLOCK, k1 - k0)), kp[0], vp[0]);
    for (int64_t k = k0; k < k1; k += BLOCK) {
      const int n = int(std::min<int64_t>(BLOCK, k1 - k));
      if (k + BLOCK < k1) {
        const int nn = int(std::min<int64_t>(BLOCK, k1 - k - BLOCK));
        locate(k + BLOCK, nn, kp[cur ^ 1], vp[cur ^ 1]);
        for (int j = 0; j < nn; ++j)
          for (int i = 0; i < D; i += 16) {
            __builtin_prefetch(kp[cur ^ 1][j] + i);
            __builtin_prefetch(vp[cur ^ 1][j] + i);
          }
      }
      const uint8_t* block_vis = nullptr;
      if (!sparse && k + n > prefix) {  // tree keys: each token sees itself and its ancestors
        for (int ti = 0; ti < nt; ++ti) {
          const int64_t* mask = tree_mask + node[toks[ti]] * mask_words;
          for (int j = 0; j < n; ++j) {
            const int64_t jt = k + j - prefix;
            vis[ti * BLOCK + j] = jt < 0 || ((mask[jt >> 6] >> (jt & 63)) & 1);
          }
        }
        block_vis = vis.data();
      }
      attend_block(qv.data(), nq, G, D, kp[cur], vp[cur], block_vis, n, part_m.data() + state,
                   part_l.data() + state, part_acc.data() + state * D, scores.data());
      cur ^= 1;
    }
  }

  // log-sum-exp merge of each (token, query head)'s units
  for (int64_t gi = 0; gi < n_groups; ++gi) {
    const int nt = int(group_first[gi + 1] - group_first[gi]);
    for (int ti = 0; ti < nt; ++ti) {
      const int64_t t = group_tok[group_first[gi] + ti];
      for (int hq = 0; hq < Hq; ++hq) {
        const int64_t lo = gi * Hkv + hq / G;
        const int64_t nq = int64_t(nt) * G, qi = int64_t(ti) * G + hq % G;
        float* o = out + (t * Hq + hq) * D;
        std::memset(o, 0, sizeof(float) * D);
        float mx = NEG_INF;
        for (int64_t u = 0; u < first_unit[lo + 1] - first_unit[lo]; ++u)
          mx = std::max(mx, part_m[first_q[lo] + u * nq + qi]);
        if (mx == NEG_INF) continue;
        float sum = 0.f;
        for (int64_t u = 0; u < first_unit[lo + 1] - first_unit[lo]; ++u) {
          const int64_t st = first_q[lo] + u * nq + qi;
          if (part_m[st] == NEG_INF) continue;
          const float w = std::exp(part_m[st] - mx);
          sum += w * part_l[st];
          const float* a = part_acc.data() + st * D;
          for (int i = 0; i < D; ++i) o[i] += w * a[i];
        }
        const float inv = 1.f / sum;
        for (int i = 0; i < D; ++i) o[i] *= inv;
      }
    }
  }
}

}  // namespace
