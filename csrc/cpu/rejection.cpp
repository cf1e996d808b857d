// cpu backend of fastverify::rejection_sample and fastverify::tree_rejection_sample.
//
// The algorithm of the CUDA kernels (csrc/cuda/rejection.cu; the spec is
// fastverify/ops/rejection.py and ops/sampling.py), with one request per OpenMP task
// instead of one thread block, and rows read lazily: a request's target rows are
// processed only when its walk reaches them (a chain that rejects its first draft reads
// one row, not K + 1). Per visited row:
//
//   l      = logits with NaN -> -inf,  z = min(l / T, FLT_MAX)  (T = 1 for greedy rows)
//   keep   = {v : l_v >= thr}: thr from top-k / top-p (exact selection over the
//            order-preserving float keys; only rows whose request uses a filter)
//   chunk c of `chunk` tokens: m_c = max_keep z, s_c = sum_keep exp(z - m_c),
//            a_c = max l (the argmax, greedy's answer, ignores filters)
//   M = max_c m_c,  S = sum_c s_c exp(m_c - M)   =>   p(v) = exp(z_v - M) / S on keep
//
// one streaming pass over the row (each chunk read from memory once, then again from
// L1), so a visited row costs about one read of its logits. Greedy rows need only the
// argmax (no exp). Draws are inverse CDFs in vocabulary order: over the chunk masses
// s_c exp(m_c - M) first, then inside one chunk, with float64 running sums (the torch
// spec sums in float64). The uniforms are the Philox lanes of every backend (philox.h).
//
// Top-k: one streaming pass keeps the keys above a rising lower bound (nth_element when
// the buffer fills); top-p: the candidates' masses e^(z - max z), then the crossing key by
// sorting (few candidates) or a 16-bit histogram and the crossing bin sorted. Rules with
// draft_probs add one pass over a row and its draft-probs row per residual (the token
// rule's rejected row, the block rule's draft rows, each child recursive rejection
// rejects, multi-path's Z per inner node); typical adds the entropy sums to the row pass.
//
// Determinism: every sum runs in a fixed order over a fixed chunking that depends only on
// V and chunk_size, and each request is computed by one thread, so the outputs do not
// depend on the number of threads (nor on the batch around a request).
//
// Memory safety: unchecked prefix sums, ids and parents (a CUDA caller without
// FASTVERIFY_CHECKS) never move a read outside the tensors: ids outside [0, V) count as
// rejected drafts, parents that are no tree end walks at the root.
#include <omp.h>

#include <algorithm>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"
#include "philox.h"

namespace {

constexpr float FLT_MAX_F = std::numeric_limits<float>::max();
constexpr int MAX_CHUNK = 4096;  // fastverify._layout.MAX_CHUNK

// rule codes (fastverify._layout.CHAIN_RULES / TREE_RULES)
constexpr int RULE_TOKEN = 0, RULE_BLOCK = 1, RULE_TYPICAL = 2;
constexpr int TREE_SPECINFER = 0, TREE_BLOCK = 1, TREE_BLOCK_WOR = 2;

// ------------------------------------------------------------------------------ helpers

inline float sanitize(float l) { return l == l ? l : NEG_INF; }
// z = min(l / t, FLT_MAX)
inline float scale(float l, float t) {
  const float z = l / t;
  return z < FLT_MAX_F ? z : FLT_MAX_F;
}


#if defined(__AVX512F__)
// AVX-512 pieces of the row passes. Lanes past a row's end load as NaN, which every use
// drops: max_ps(x, acc) returns acc for a NaN x, and NaN fails every mask comparison.
template <typename T>
inline __m512 load16(const T* p);
template <>
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
template <>
inline __m512 load16(const bf16* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
template <>
inline __m512 load16(const fp16* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
// n (< 16) elements, the other lanes NaN
template <typename T>
inline __m512 load_tail(const T* p, int n) {
  alignas(64) float buf[16];
  for (int i = 0; i < 16; ++i) buf[i] = i < n ? to_float(p[i]) : std::numeric_limits<float>::quiet_NaN();
  return _mm512_load_ps(buf);
}
template <typename T>
inline __m512 load_n(const T* p, int n) { return n >= 16 ? load16(p) : load_tail(p, n); }

// e^d = 2^n e^r for d <= 0: n = round(d log2 e), r = d - n ln2 with ln2 split in two
// (Cody-Waite: r is exact to ~1 ulp, where rounding d log2 e itself would cost ~|d| ulp),
// e^r by a degree-6 polynomial on |r| <= ln2/2 (relative error 1.7e-8), 2^n by vscalefps
// (which also takes very negative n to 0)
inline __m512 exp_v(__m512 d) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(d, _mm512_set1_ps(1.4426950408889634f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), d);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.4286068202862268e-06f), r);
  __m512 p = _mm512_set1_ps(0.0013836845755577087f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.008374815806746483f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.04166822507977486f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.16666419804096222f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.49999991059303284f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}
// e^(z - m) on the lanes of `keep` with z >= m - 87, else 0 (below, exp_nonpositive would
// saturate at ~1e-38 where fp32 expf is denormal: a token that far below the maximum has no mass)
inline __m512 exp_shift_v(__m512 z, float m, __mmask16 keep) {
  const __mmask16 live = _mm512_mask_cmp_ps_mask(keep, z, _mm512_set1_ps(m - 87.f), _CMP_GE_OQ);
  return _mm512_maskz_mov_ps(live, exp_v(_mm512_sub_ps(z, _mm512_set1_ps(m))));
}
#endif

// e^(z - m) for z <= m, 0 below m - 87: the vector code's arithmetic where there is one,
// so single probabilities agree with the row passes bit for bit
inline float exp_shift(float z, float m) {
#if defined(__AVX512F__)
  return _mm512_cvtss_f32(exp_shift_v(_mm512_set1_ps(z), m, 0xFFFF));
#else
  // the same algorithm in plain C++ (n ln2_hi is exact, so r loses nothing to rounding d log2 e)
  if (!(z >= m - 87.f)) return 0.f;
  const float d = z - m;
  const float n = std::floor(d * 1.4426950408889634f + 0.5f);
  float r = d - n * 0.693145751953125f;
  r = r - n * 1.4286068202862268e-06f;
  float p = 0.0013836845755577087f;
  p = p * r + 0.008374815806746483f;
  p = p * r + 0.04166822507977486f;
  p = p * r + 0.16666419804096222f;
  p = p * r + 0.49999991059303284f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (int32_t(n) + 127) << 23;  // n >= -126 for d >= -87
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
#endif
}

// Order-preserving float32 -> uint32 key (sampling.float_key: key32 + 2^31 as uint32)
inline uint32_t float_key(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const int32_t key32 = bits ^ ((bits >> 31) & 0x7FFFFFFF);
  return uint32_t(key32) ^ 0x80000000u;
}
inline float key_float(uint32_t key) {
  const int32_t key32 = int32_t(key ^ 0x80000000u);
  const int32_t bits = key32 ^ ((key32 >> 31) & 0x7FFFFFFF);
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// int32 or int64 token ids / parents
struct Ids {
  const void* p;
  bool is64;
  int64_t operator[](int64_t i) const {
    return is64 ? static_cast<const int64_t*>(p)[i] : int64_t(static_cast<const int32_t*>(p)[i]);
  }
};

// draft_probs [rows, V] (fp32 / bf16 / fp16, row stride in elements)
struct QMat {
  const void* base;
  int64_t stride;
  int kind;
  float at(int64_t row, int64_t i) const {
    const int64_t k = row * stride + i;
    if (kind == DTYPE_BF16) return to_float(static_cast<const bf16*>(base)[k]);
    if (kind == DTYPE_F16) return to_float(static_cast<const fp16*>(base)[k]);
    return static_cast<const float*>(base)[k];
  }
  // the row as fp32: the tensor's own row, or a copy in `buf` [V]
  const float* row(int64_t r, int64_t V, float* buf) const {
    if (kind == DTYPE_F32) return static_cast<const float*>(base) + r * stride;
    if (kind == DTYPE_BF16) {
      const bf16* s = static_cast<const bf16*>(base) + r * stride;
#pragma omp simd
      for (int64_t i = 0; i < V; ++i) buf[i] = to_float(s[i]);
    } else {
      const fp16* s = static_cast<const fp16*>(base) + r * stride;
      for (int64_t i = 0; i < V; ++i) buf[i] = to_float(s[i]);
    }
    return buf;
  }
};

// p_i = min(p_{i-1} P(x_i) / Q(x_i), 1) without 0/0 (block_ratio of the torch spec)
inline float block_ratio(float prev, float px, float qx) {
  const float num = prev * px;
  if (num >= qx && num > 0.f) return 1.f;
  return qx > 0.f ? num / qx : 0.f;
}

// The first i with running sum of w(0..n-1) > target; else the last i with w > 0; else -1.
// rest = target - sum_{j < i} w_j (float64 sums, fixed order).
struct Pick {
  int64_t i;
  double rest;
};
template <typename WF>
Pick inverse_cdf(int64_t n, double target, const WF& w) {
  double cum = 0.0;
  int64_t last = -1;
  double last_before = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const float wi = w(i);
    const double before = cum;
    cum += double(wi);
    if (cum > target) return {i, target - before};
    if (wi > 0.f) {
      last = i;
      last_before = before;
    }
  }
  return {last, last >= 0 ? target - last_before : target};
}

// ------------------------------------------------------------------------------ rows

// Per-thread scratch: chunk values, a row of probabilities / residuals, filter buffers.
struct Work {
  std::vector<float> stats;           // [rows of the request, 3, NC]: m_c, s_c, e_c (entropy)
  std::vector<float> rbuf[2];         // [V] residuals (recursive rejection, multi-path)
  std::vector<float> wbuf[2];         // [NC] chunk masses of rbuf
  std::vector<float> qbuf;            // [V] a draft-probs row widened to fp32
  std::vector<uint32_t> keys;         // filters: candidate keys
  std::vector<float> weights;         // filters: their top-p masses
  std::vector<uint32_t> order;        // filters: index scratch
  std::vector<double> hist;           // filters: top-p histogram
  std::vector<float> rm;              // multi-path: (token, mass) of earlier paths
  std::vector<signed char> loaded;    // rows of the request whose stats are in `stats`
  std::vector<float> row_M, row_S, row_H, row_thr;
  std::vector<int> row_g;
};

// The processed target distribution of one row (after its stats pass).
template <typename T>
struct Row {
  const T* l;
  float t;
  float thr;
  bool has_thr;
  int64_t V;
  int NC, chunk;
  const float* m;  // [NC] chunk maxima of z over kept tokens
  const float* s;  // [NC] chunk sums exp(z - m_c)
  float M, S, H;
  int g;  // first argmax of the row's sanitized logits

  float z_kept(int64_t i) const {  // z of token i if kept, else -inf
    const float lv = sanitize(to_float(l[i]));
    const float z = scale(lv, t);
    return (z > NEG_INF && (!has_thr || lv >= thr)) ? z : NEG_INF;
  }
  // mass of chunk c relative to exp(M)
  float mass(int c) const { return m[c] > NEG_INF ? s[c] * exp_shift(m[c], M) : 0.f; }
  // p(x) with the given normalizer; x a valid id or -1 (then 0)
  float prob_at(int64_t x, float norm) const {
    if (x < 0) return 0.f;
    const float z = z_kept(x);
    return (z > NEG_INF && norm > 0.f) ? exp_shift(z, M) / norm : 0.f;
  }
  // exp(z - M) / norm at token off if kept, else 0
  float chunk_prob(int64_t off, float norm) const {
    const float z = z_kept(off);
    return z > NEG_INF ? exp_shift(z, M) / norm : 0.f;
  }
  // p of every token of chunk c (normalized by norm) into out[0, chunk); returns the count
  int64_t chunk_probs(int c, float norm, float* out) const {
    const int64_t first = int64_t(c) * chunk;
    const int64_t n = std::min<int64_t>(chunk, V - first);
#if defined(__AVX512F__)
    const T* ch = l + first;
    const __m512 vt = _mm512_set1_ps(t), vthr = _mm512_set1_ps(thr), vmax = _mm512_set1_ps(FLT_MAX_F),
                 vnorm = _mm512_set1_ps(norm);
    for (int64_t e = 0; e < n; e += 16) {
      const int rem = int(std::min<int64_t>(16, n - e));
      const __m512 x = load_n(ch + e, rem);
      const __m512 z = _mm512_min_ps(vmax, _mm512_div_ps(x, vt));  // NaN stays NaN
      const __mmask16 keep = has_thr ? _mm512_cmp_ps_mask(x, vthr, _CMP_GE_OQ) : __mmask16(0xFFFF);
      const __m512 p = _mm512_div_ps(exp_shift_v(z, M, keep), vnorm);
      _mm512_mask_storeu_ps(out + e, rem >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << rem) - 1u), p);
    }
#else
    for (int64_t e = 0; e < n; ++e) out[e] = chunk_prob(first + e, norm);
#endif
    return n;
  }
};

// The first index of the row's maximum (sanitized), given the chunk maxima a[NC]: the
// first chunk holding the maximum, then its first token equal to it.
template <typename T>
int argmax_from_chunks(const T* l, int64_t V, int chunk, int NC, const float* a) {
  int best = 0;
  for (int c = 1; c < NC; ++c) {
    if (a[c] > a[best]) best = c;
  }
  const int64_t first = int64_t(best) * chunk;
  const int64_t n = std::min<int64_t>(chunk, V - first);
  for (int64_t e = 0; e < n; ++e) {
    if (sanitize(to_float(l[first + e])) == a[best]) return int(first + e);
  }
  return int(first);
}

// Greedy rows: only the first argmax of the sanitized logits.
template <typename T>
int row_argmax(const T* l, int64_t V, int chunk, int NC, float* a) {
  for (int c = 0; c < NC; ++c) {
    const int64_t first = int64_t(c) * chunk;
    const int64_t n = std::min<int64_t>(chunk, V - first);
    const T* ch = l + first;
    float mx = NEG_INF;
#pragma omp simd reduction(max : mx)
    for (int64_t e = 0; e < n; ++e) {
      const float v = sanitize(to_float(ch[e]));
      mx = v > mx ? v : mx;
    }
    a[c] = mx;
  }
  return argmax_from_chunks(l, V, chunk, NC, a);
}

// Chunk stats of one row: m_c, s_c (and e_c = sum exp(z - m_c)(z - m_c) for the entropy),
// the chunk maxima of l in a[NC]. One read of the row from memory: a chunk's z values are
// kept in zbuf (L1) for the exp pass.
template <typename T, bool UNIT_T, bool HAS_THR>
void chunk_stats(const T* l, int64_t V, int chunk, int c0, int c1, float t, float thr, bool entropy, float* m,
                 float* s, float* e, float* a) {
#if defined(__AVX512F__)
  // pass 1: max l and max kept l (max z = scale(max kept l): scaling is monotone);
  // pass 2 (the chunk again, from L1): sum of e^(z - m_c) over kept tokens
  const __m512 vt = _mm512_set1_ps(t), vthr = _mm512_set1_ps(thr), vmax = _mm512_set1_ps(FLT_MAX_F),
               ninf = _mm512_set1_ps(NEG_INF);
  for (int c = c0; c < c1; ++c) {
    const int64_t first = int64_t(c) * chunk;
    const int n = int(std::min<int64_t>(chunk, V - first));
    const T* ch = l + first;
    __m512 amx = ninf, kmx = ninf;
    for (int i = 0; i < n; i += 16) {
      const __m512 x = load_n(ch + i, n - i);
      amx = _mm512_max_ps(x, amx);
      if (HAS_THR) kmx = _mm512_mask_max_ps(kmx, _mm512_cmp_ps_mask(x, vthr, _CMP_GE_OQ), x, kmx);
    }
    const float amax = _mm512_reduce_max_ps(amx);
    const float lk = HAS_THR ? _mm512_reduce_max_ps(kmx) : amax;
    const float zmax = lk > NEG_INF ? scale(lk, t) : NEG_INF;
    float sum = 0.f, ent = 0.f;
    if (zmax > NEG_INF) {
      // fp32 lanes over 256 tokens, then float64: the chunk masses place the draws, whose
      // CDF must be good to ~1e-7 of the row's mass (the torch spec sums in float64)
      __m512d dacc = _mm512_setzero_pd();
      __m512 eacc = _mm512_setzero_ps();
      const __m512 vz = _mm512_set1_ps(zmax);
      for (int i0 = 0; i0 < n; i0 += 256) {
        __m512 acc = _mm512_setzero_ps();
        const int i1 = std::min(n, i0 + 256);
        for (int i = i0; i < i1; i += 16) {
          const __m512 x = load_n(ch + i, i1 - i);
          const __m512 z = UNIT_T ? _mm512_min_ps(vmax, x) : _mm512_min_ps(vmax, _mm512_div_ps(x, vt));
          const __mmask16 keep = HAS_THR ? _mm512_cmp_ps_mask(x, vthr, _CMP_GE_OQ) : __mmask16(0xFFFF);
          const __m512 w = exp_shift_v(z, zmax, keep);
          acc = _mm512_add_ps(acc, w);
          if (entropy) {
            const __mmask16 pos = _mm512_cmp_ps_mask(w, _mm512_setzero_ps(), _CMP_GT_OQ);
            eacc = _mm512_mask_add_ps(eacc, pos, eacc, _mm512_mul_ps(w, _mm512_sub_ps(z, vz)));
          }
        }
        dacc = _mm512_add_pd(dacc, _mm512_cvtps_pd(_mm512_castps512_ps256(acc)));
        dacc = _mm512_add_pd(dacc, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1))));
      }
      sum = float(_mm512_reduce_add_pd(dacc));
      ent = _mm512_reduce_add_ps(eacc);
    }
    m[c] = zmax;
    s[c] = sum;
    if (entropy) e[c] = ent;
    a[c] = amax;
  }
#else
  alignas(64) float zbuf[MAX_CHUNK];
  for (int c = c0; c < c1; ++c) {
    const int64_t first = int64_t(c) * chunk;
    const int n = int(std::min<int64_t>(chunk, V - first));
    const T* ch = l + first;
    float amax = NEG_INF, zmax = NEG_INF;
#pragma omp simd reduction(max : amax, zmax)
    for (int i = 0; i < n; ++i) {
      const float lv = sanitize(to_float(ch[i]));
      amax = lv > amax ? lv : amax;
      float z = UNIT_T ? (lv < FLT_MAX_F ? lv : FLT_MAX_F) : scale(lv, t);  // l / 1 == l
      if (HAS_THR) z = lv >= thr ? z : NEG_INF;
      zbuf[i] = z;
      zmax = z > zmax ? z : zmax;
    }
    double dsum = 0.0;
    float ent = 0.f;
    if (zmax > NEG_INF) {
      for (int i0 = 0; i0 < n; i0 += 256) {  // fp32 over 256 tokens, then float64 (as above)
        const int i1 = std::min(n, i0 + 256);
        float part = 0.f;
#pragma omp simd reduction(+ : part, ent)
        for (int i = i0; i < i1; ++i) {
          const float x = exp_shift(zbuf[i], zmax);
          part += x;
          ent += x > 0.f ? x * (zbuf[i] - zmax) : 0.f;
        }
        dsum += double(part);
      }
    }
    const float sum = float(dsum);
    m[c] = zmax;
    s[c] = sum;
    if (entropy) e[c] = ent;
    a[c] = amax;
  }
#endif
}

// ------------------------------------------------------------------------------ top-k / top-p

// k-th largest key of the row (ties counted): one streaming pass keeping the keys above a
// running lower bound tau, with the invariant #{key >= tau} >= k once tau is set.
// Also returns the row's maximum (sanitized) in *lmax.
template <typename T>
uint32_t kth_largest_key(const T* l, int64_t V, int64_t k, Work& w, float* lmax) {
  std::vector<uint32_t>& buf = w.keys;
  buf.clear();
  const size_t cap = size_t(std::max<int64_t>(2 * k, 2048));
  buf.reserve(cap + 64);
  uint32_t tau = 0;  // every sanitized key is > 0
  float mx = NEG_INF;
  constexpr int BLK = 64;
  uint32_t kb[BLK];
  for (int64_t i0 = 0; i0 < V; i0 += BLK) {
    const int n = int(std::min<int64_t>(BLK, V - i0));
    int hits = 0;
#pragma omp simd reduction(+ : hits) reduction(max : mx)
    for (int i = 0; i < n; ++i) {
      const float v = sanitize(to_float(l[i0 + i]));
      mx = v > mx ? v : mx;
      kb[i] = float_key(v);
      hits += kb[i] > tau;
    }
    if (hits == 0) continue;
    for (int i = 0; i < n; ++i) {
      if (kb[i] > tau) buf.push_back(kb[i]);
    }
    if (buf.size() >= cap) {
      std::nth_element(buf.begin(), buf.begin() + (k - 1), buf.end(), std::greater<uint32_t>());
      tau = buf[k - 1];
      buf.erase(std::remove_if(buf.begin(), buf.end(), [tau](uint32_t x) { return x <= tau; }), buf.end());
    }
  }
  *lmax = mx;
  if (int64_t(buf.size()) >= k) {
    std::nth_element(buf.begin(), buf.begin() + (k - 1), buf.end(), std::greater<uint32_t>());
    return buf[k - 1];
  }
  return tau;
}

// The largest key t (of a candidate) with sum_{key >= t} w >= goal over candidates (keys[i],
// w[i]); float64 sums. The smallest candidate key if rounding leaves the goal unreached.
uint32_t mass_select(std::vector<uint32_t>& keys, std::vector<float>& wts, double goal, Work& w) {
  const size_t n = keys.size();
  std::vector<uint32_t>& idx = w.order;
  auto scan = [&](double above) -> int64_t {  // idx sorted by key descending
    double cum = above;
    for (size_t j = 0; j < idx.size(); ++j) {
      cum += double(wts[idx[j]]);
      const bool group_end = j + 1 == idx.size() || keys[idx[j + 1]] != keys[idx[j]];
      if (group_end && cum >= goal) return int64_t(keys[idx[j]]);
    }
    return -1;
  };
  auto by_key_desc = [&](uint32_t x, uint32_t y) { return keys[x] > keys[y]; };
  uint32_t min_key = UINT32_MAX;
  for (size_t i = 0; i < n; ++i) min_key = std::min(min_key, keys[i]);
  if (n <= 8192) {
    idx.resize(n);
    for (size_t i = 0; i < n; ++i) idx[i] = uint32_t(i);
    std::sort(idx.begin(), idx.end(), by_key_desc);
    const int64_t t = scan(0.0);
    return t >= 0 ? uint32_t(t) : min_key;
  }
  // 65536 bins of the top 16 key bits, then the candidates of the crossing bin sorted
  std::vector<double>& hist = w.hist;
  hist.assign(65536, 0.0);
  for (size_t i = 0; i < n; ++i) hist[keys[i] >> 16] += double(wts[i]);
  double cum = 0.0;
  int bin = -1;
  for (int b = 65535; b >= 0; --b) {
    if (cum + hist[b] >= goal && hist[b] > 0.0) {
      bin = b;
      break;
    }
    cum += hist[b];
  }
  if (bin < 0) return min_key;
  idx.clear();
  for (size_t i = 0; i < n; ++i) {
    if (int(keys[i] >> 16) == bin) idx.push_back(uint32_t(i));
  }
  std::sort(idx.begin(), idx.end(), by_key_desc);
  const int64_t t = scan(cum);
  return t >= 0 ? uint32_t(t) : keys[idx.back()];
}

// thr of a random row: keep token v iff l_v >= thr (top-k, then top-p of the renormalized
// rest); -inf where no filter applies (sampling.filter_threshold).
template <typename T>
float filter_threshold(const T* l, int64_t V, float t, int64_t k, float top_p, bool use_k, bool use_p, Work& w) {
  if (!use_k && !use_p) return NEG_INF;
  uint32_t key = 0;
  float lmax = NEG_INF;
  if (use_k) key = kth_largest_key(l, V, k, w, &lmax);
  if (!use_p) return key_float(key);
  if (!use_k) {
    float mx = NEG_INF;
#pragma omp simd reduction(max : mx)
    for (int64_t i = 0; i < V; ++i) {
      const float v = sanitize(to_float(l[i]));
      mx = v > mx ? v : mx;
    }
    lmax = mx;
  }
  // masses exp(z - m), m = max z = scale(max l) (scaling is monotone)
  const float m = scale(lmax, t);
  if (!(m > NEG_INF)) return key_float(0);  // no finite logit: the spec's NaN mass keeps nothing
  std::vector<uint32_t>& keys = w.keys;
  std::vector<float>& wts = w.weights;
  keys.clear();
  wts.clear();
  double total = 0.0;
  for (int64_t i = 0; i < V; ++i) {
    const float v = sanitize(to_float(l[i]));
    const uint32_t kk = float_key(v);
    if (kk < key) continue;
    const float x = exp_shift(scale(v, t), m);
    keys.push_back(kk);
    wts.push_back(x);
    total += double(x);
  }
  return key_float(mass_select(keys, wts, double(top_p) * total, w));
}

// ------------------------------------------------------------------------------ a request's rows

// Common arguments of both ops.
template <typename T>
struct Common {
  const T* logits;
  int64_t stride_l;
  int64_t R;  // rows of target_logits
  int64_t V;
  int NC, chunk;
  QMat q;
  bool has_q;
  const int32_t* cu;
  const float* temp;
  const int32_t* top_k;  // nullptr: off
  const float* top_p;    // nullptr: off
  const int64_t* seed;
  const int64_t* pos;
};

// Lazily computed rows of one request: row r (request-local index) is processed on its
// first use; its stats stay in the thread's Work until the request ends.
template <typename T>
struct Rows {
  const Common<T>& a;
  Work& w;
  int64_t first_row;  // global row of local row 0
  int64_t count;
  float t;
  bool random;
  int64_t k;
  float top_p;
  bool use_k, use_p;
  bool entropy;
  float* amax;  // [NC] scratch

  Rows(const Common<T>& a_, Work& w_, int b, int64_t first, int64_t n, bool entropy_, float* amax_)
      : a(a_), w(w_), first_row(first), count(n), entropy(entropy_), amax(amax_) {
    const float tb = a.temp[b];
    random = tb > 0.f;
    t = random ? tb : 1.f;
    k = a.top_k ? a.top_k[b] : 0;
    top_p = a.top_p ? a.top_p[b] : 1.f;
    use_k = random && a.top_k && k > 0 && k < a.V;
    use_p = random && a.top_p && top_p < 1.f;
    const size_t per = size_t(3) * a.NC;
    if (w.stats.size() < per * size_t(n)) w.stats.resize(per * size_t(n));
    w.loaded.assign(size_t(n), 0);
    w.row_M.resize(size_t(n));
    w.row_S.resize(size_t(n));
    w.row_H.resize(size_t(n));
    w.row_thr.resize(size_t(n));
    w.row_g.resize(size_t(n));
  }

  const T* logits_row(int64_t r) const { return a.logits + (first_row + r) * a.stride_l; }

  // argmax only (greedy requests)
  int argmax(int64_t r) const { return row_argmax(logits_row(r), a.V, a.chunk, a.NC, amax); }

  Row<T> row(int64_t r) {
    const T* l = logits_row(r);
    float* m = w.stats.data() + size_t(3) * a.NC * size_t(r);
    float* s = m + a.NC;
    float* e = s + a.NC;
    Row<T> out{l, t, NEG_INF, false, a.V, a.NC, a.chunk, m, s, 0.f, 0.f, 0.f, 0};
    if (!w.loaded[size_t(r)]) {
      const float thr = filter_threshold(l, a.V, t, k, top_p, use_k, use_p, w);
      const bool has_thr = use_k || use_p;
      auto stats = [&](int c0, int c1) {
        if (t == 1.f) {
          if (has_thr) chunk_stats<T, true, true>(l, a.V, a.chunk, c0, c1, t, thr, entropy, m, s, e, amax);
          else chunk_stats<T, true, false>(l, a.V, a.chunk, c0, c1, t, thr, entropy, m, s, e, amax);
        } else {
          if (has_thr) chunk_stats<T, false, true>(l, a.V, a.chunk, c0, c1, t, thr, entropy, m, s, e, amax);
          else chunk_stats<T, false, false>(l, a.V, a.chunk, c0, c1, t, thr, entropy, m, s, e, amax);
        }
      };
      stats(0, a.NC);
      float M = NEG_INF;
      for (int c = 0; c < a.NC; ++c) M = m[c] > M ? m[c] : M;
      double Sd = 0.0;
      for (int c = 0; c < a.NC; ++c) Sd += m[c] > NEG_INF ? double(s[c]) * double(exp_shift(m[c], M)) : 0.0;
      const float S = float(Sd);
      float H = 0.f;
      if (entropy) {
        // H = log S - (1/S) sum_c e^{m_c - M} (e_c + (m_c - M) s_c)
        float tsum = 0.f;
        for (int c = 0; c < a.NC; ++c) {
          if (m[c] > NEG_INF) tsum += exp_shift(m[c], M) * (e[c] + (m[c] - M) * s[c]);
        }
        H = S > 0.f ? std::log(S) - tsum / S : 0.f;
      }
      w.row_M[size_t(r)] = M;
      w.row_S[size_t(r)] = S;
      w.row_H[size_t(r)] = H;
      w.row_thr[size_t(r)] = thr;
      w.row_g[size_t(r)] = argmax_from_chunks(l, a.V, a.chunk, a.NC, amax);
      w.loaded[size_t(r)] = 1;
    }
    out.M = w.row_M[size_t(r)];
    out.S = w.row_S[size_t(r)];
    out.H = w.row_H[size_t(r)];
    out.thr = w.row_thr[size_t(r)];
    out.has_thr = use_k || use_p;
    out.g = w.row_g[size_t(r)];
    return out;
  }
};

// ------------------------------------------------------------------------------ draws

// Token ~ p with token excl left out (-1: none), from the chunk masses. The chunk holding
// excl is summed again without it: subtracting excl's mass (often most of the row's: a
// rejected draft the target liked) from the chunk's would cancel away the rest's precision.
template <typename T>
int sample_p(const Row<T>& r, int64_t excl, float u, float* cbuf) {
  const int ex_chunk = excl >= 0 ? int(excl / r.chunk) : -1;
  float ex_mass = 0.f;
  if (ex_chunk >= 0) {
    const int64_t n = r.chunk_probs(ex_chunk, 1.f, cbuf);
    double acc = 0.0;
    for (int64_t e = 0; e < n; ++e) acc += e == excl - int64_t(ex_chunk) * r.chunk ? 0.0 : double(cbuf[e]);
    ex_mass = float(acc);
  }
  auto wf = [&](int64_t c) { return c == ex_chunk ? ex_mass : r.mass(int(c)); };
  double tot = 0.0;
  for (int c = 0; c < r.NC; ++c) tot += double(wf(c));
  const Pick pc = inverse_cdf(r.NC, double(u) * tot, wf);
  if (pc.i < 0) return r.g;
  const int64_t first = pc.i * r.chunk;
  const int64_t n = r.chunk_probs(int(pc.i), 1.f, cbuf);
  if (excl >= first && excl < first + n) cbuf[excl - first] = 0.f;
  const Pick pt = inverse_cdf(n, pc.rest, [&](int64_t e) { return cbuf[e]; });
  return pt.i >= 0 ? int(first + pt.i) : r.g;
}

// Token ~ the unnormalized weights vals[0, V) given their chunk masses wc[NC]; -1 if none.
inline int sample_values(const float* vals, const float* wc, int64_t V, int NC, int chunk, float u) {
  double tot = 0.0;
  for (int c = 0; c < NC; ++c) tot += double(wc[c]);
  const Pick pc = inverse_cdf(NC, double(u) * tot, [&](int64_t c) { return wc[c]; });
  if (pc.i < 0) return -1;
  const int64_t first = pc.i * chunk;
  const int64_t n = std::min<int64_t>(chunk, V - first);
  const Pick pt = inverse_cdf(n, pc.rest, [&](int64_t e) { return vals[first + e]; });
  return pt.i >= 0 ? int(first + pt.i) : -1;
}

// Chunk sums of vals[0, V) into wc[NC] (fixed order); returns their float sum.
inline float chunk_sums(const float* vals, int64_t V, int NC, int chunk, float* wc) {
  double tot = 0.0;
  for (int c = 0; c < NC; ++c) {
    const int64_t first = int64_t(c) * chunk;
    const int64_t n = std::min<int64_t>(chunk, V - first);
    double acc = 0.0;
    for (int64_t e0 = 0; e0 < n; e0 += 256) {  // fp32 over 256 values, then float64
      const int64_t e1 = std::min<int64_t>(n, e0 + 256);
      float part = 0.f;
#pragma omp simd reduction(+ : part)
      for (int64_t e = e0; e < e1; ++e) part += vals[first + e];
      acc += double(part);
    }
    wc[c] = float(acc);
    tot += acc;
  }
  return float(tot);
}

// vals = max(a p - q, 0) over the row (p normalized by S) and its chunk masses.
template <typename T>
float scaled_residual(const Row<T>& r, const float* q, float a, float* vals, float* wc) {
  for (int c = 0; c < r.NC; ++c) {
    const int64_t first = int64_t(c) * r.chunk;
    const int64_t n = r.chunk_probs(c, r.S, vals + first);
#pragma omp simd
    for (int64_t e = 0; e < n; ++e) vals[first + e] = std::max(a * vals[first + e] - q[first + e], 0.f);
  }
  return chunk_sums(vals, r.V, r.NC, r.chunk, wc);
}

// Token ~ p truncated to p >= cut (typical acceptance's next token); the argmax if nothing is left.
template <typename T>
int sample_typical(const Row<T>& r, float cut, float u, float* vals, float* wc) {
  for (int c = 0; c < r.NC; ++c) {
    const int64_t first = int64_t(c) * r.chunk;
    const int64_t n = r.chunk_probs(c, r.S, vals + first);
#pragma omp simd
    for (int64_t e = 0; e < n; ++e) vals[first + e] = vals[first + e] >= cut ? vals[first + e] : 0.f;
  }
  chunk_sums(vals, r.V, r.NC, r.chunk, wc);
  const int y = sample_values(vals, wc, r.V, r.NC, r.chunk, u);
  return y >= 0 ? y : r.g;
}

// ------------------------------------------------------------------------------ chains

template <typename T>
struct ChainArgs : Common<T> {
  Ids draft;
  int64_t N;
  int max_draft_len;
  int rule;
  const float* eps;
  const float* delta;
  int32_t* out;
  int32_t* num;
};

template <typename T>
void chain_request(const ChainArgs<T>& a, int b, Work& w) {
  const int64_t W = int64_t(a.max_draft_len) + 1;
  int32_t* out = a.out + b * W;
  for (int64_t c = 0; c < W; ++c) out[c] = -1;
  // first draft, first row and drafts of the request, clamped inside the tensors
  int64_t start = a.cu[b];
  int64_t row0 = start + b;
  const bool ok = start >= 0 && start <= a.N && row0 < a.R;
  int64_t K = int64_t(a.cu[b + 1]) - start;
  K = std::min(std::min(K, int64_t(a.max_draft_len)), std::min(a.N - start, a.R - 1 - row0));
  if (!ok) start = row0 = K = 0;
  K = std::max<int64_t>(K, 0);

  std::vector<float>& vals = w.rbuf[0];
  std::vector<float>& wc = w.wbuf[0];
  vals.resize(size_t(a.V));
  wc.resize(size_t(a.NC));
  std::vector<float> amax(size_t(a.NC));
  Rows<T> rows(a, w, b, row0, K + 1, a.rule == RULE_TYPICAL, amax.data());
  const int64_t seed = a.seed[b];
  const int64_t pos = a.pos[b];
  auto draft_id = [&](int64_t j) -> int64_t {  // draft j, -1 outside the vocabulary
    const int64_t x = a.draft[start + j];
    return (x >= 0 && x < a.V) ? x : -1;
  };

  if (!rows.random) {  // greedy: accept while draft == argmax, emit the argmax
    int64_t n_acc = 0;
    int g = rows.argmax(0);
    while (n_acc < K && draft_id(n_acc) == g) {
      out[n_acc] = int32_t(g);
      ++n_acc;
      g = rows.argmax(n_acc);
    }
    out[n_acc] = g;
    a.num[b] = int32_t(n_acc);
    return;
  }

  const float* qrow = nullptr;  // fp32 draft-probs row of the sampled draft
  auto q_row = [&](int64_t j) { return a.q.row(start + j, a.V, w.qbuf.data()); };
  if (a.has_q && a.q.kind != DTYPE_F32) w.qbuf.resize(size_t(a.V));

  int64_t n_acc = 0;
  float scale_tau = 1.f;  // block: p_tau, which scales the residual
  int64_t resid_row = -1;  // block: vals / wc hold max(p_j P_j - Q_j, 0) of this row j
  if (a.rule == RULE_BLOCK) {
    // h_j = Z_j / (Z_j + 1 - p_j) (1 <= j < K), h_K = p_K; tau = the last j with eta_j < h_j,
    // eta_j = the token rule's u of draft j (position pos + j - 1)
    float p = 1.f;
    for (int64_t j = 0; j <= K; ++j) {
      float h = p;
      float px = 0.f, qx = 1.f;
      if (j < K) {
        const Row<T> r = rows.row(j);
        const int64_t x = draft_id(j);
        px = r.prob_at(x, r.S);
        qx = a.has_q ? (x >= 0 ? a.q.at(start + j, x) : 0.f) : 1.f;
        if (j >= 1) {
          float Z = p * (1.f - px);  // Q_j a point mass at x_{j+1}
          if (a.has_q) {
            Z = scaled_residual(r, q_row(j), p, vals.data(), wc.data());
            resid_row = j;
          }
          const float den = Z + 1.f - p;
          h = den > 0.f ? Z / den : 1.f;
        }
      }
      if (j >= 1 && uniform_at(seed, pos + j - 1, 0, 0) < h) {
        n_acc = j;
        scale_tau = p;
      }
      if (j < K) p = block_ratio(p, px, qx);
    }
    for (int64_t j = 0; j < n_acc; ++j) out[j] = int32_t(a.draft[start + j]);
  } else {
    for (int64_t j = 0; j < K; ++j) {
      const Row<T> r = rows.row(j);
      const int64_t x = draft_id(j);
      const float px = r.prob_at(x, r.S);
      bool accept;
      if (a.rule == RULE_TYPICAL) {
        accept = px > std::min(a.eps[b], a.delta[b] * std::exp(-r.H));
      } else {
        const float u = uniform_at(seed, pos + j, 0, 0);
        const float qx = a.has_q ? (x >= 0 ? a.q.at(start + j, x) : 0.f) : 1.f;
        accept = a.has_q ? u * qx < px : u < px;
      }
      if (!(x >= 0 && accept)) break;
      out[j] = int32_t(x);
      ++n_acc;
    }
  }

  const Row<T> r = rows.row(n_acc);
  const float u = uniform_at(seed, pos + n_acc, 0, 1);
  const int64_t excl = n_acc < K ? draft_id(n_acc) : -1;
  int token = -1;
  if (a.rule == RULE_TYPICAL) {
    token = sample_typical(r, std::min(a.eps[b], a.delta[b] * std::exp(-r.H)), u, vals.data(), wc.data());
  } else if (a.has_q && excl >= 0) {
    // residual max(a p - q, 0) (a = p_tau for block, 1 for token), then one chunk to place u
    if (resid_row != n_acc) {
      qrow = q_row(n_acc);
      scaled_residual(r, qrow, scale_tau, vals.data(), wc.data());
    }
    token = sample_values(vals.data(), wc.data(), a.V, a.NC, a.chunk, u);
  }
  if (token < 0) token = sample_p(r, excl, u, w.rbuf[1].data());
  out[n_acc] = token;
  a.num[b] = int32_t(n_acc);
}

// ------------------------------------------------------------------------------ trees

template <typename T>
struct TreeArgs : Common<T> {
  Ids tok;
  Ids par;
  int max_depth;
  int rule;
  int32_t* acc;
  int32_t* out;
  int32_t* num;
};

// Tree-local index of node's child carrying token y, or -1.
inline int find_child(Ids tok, Ids par, int64_t n0, int64_t n, int node, int64_t y) {
  for (int64_t j = node + 1; j < n; ++j) {
    if (par[n0 + j] == node && tok[n0 + j] == y) return int(j);
  }
  return -1;
}

// Tree-local ancestor `up` levels above node; parents that are no tree end the walk at the root.
inline int ancestor(Ids par, int64_t n0, int node, int up) {
  int cur = node;
  for (int k = 0; k < up && cur > 0; ++k) {
    const int64_t p = par[n0 + cur];
    cur = (p >= 0 && p < cur) ? int(p) : 0;
  }
  return cur;
}

inline int node_depth(Ids par, int64_t n0, int node, int max_depth) {
  int cur = node, d = 0;
  for (int k = 0; k < max_depth && cur > 0; ++k) {
    const int64_t p = par[n0 + cur];
    cur = (p >= 0 && p < cur) ? int(p) : 0;
    ++d;
  }
  return d;
}

// Recursive rejection over node's children in node order (SpecInfer): r_0 = p; child k
// (token x) is accepted iff u_k q(x)/sigma_k < r_k(x), else r_{k+1} = max(r_k - q/sigma_k, 0)
// / rho_{k+1}, sigma_{k+1} = sigma_k - q(x). All rejected: y ~ the last unnormalized residual.
// vals holds the unnormalized residual, rho its mass (the CUDA kernel's rrs_value order).
template <typename T>
void recursive_rejection(const TreeArgs<T>& a, const Row<T>& r, int64_t row, int64_t n0, int64_t n, int node,
                         int64_t seed, int64_t tpos, float u_sample, Work& w, int* nxt_out, int* y_out) {
  float* vals = w.rbuf[0].data();
  float* wc = w.wbuf[0].data();
  const float* q = nullptr;
  int nxt = -1, k = 0;
  float sigma = 1.f, rho = 0.f;
  for (int64_t j = node + 1; j < n; ++j) {
    const int64_t x = a.tok[n0 + j];
    if (!(a.par[n0 + j] == node && x >= 0 && x < a.V)) continue;
    const float qx = a.q.at(row, x);
    float rx;
    if (k == 0) {
      rx = r.prob_at(x, r.S);
    } else {
      rx = vals[x];
      if (rho > 0.f) rx = rx / rho;
    }
    const float u = uniform_at(seed, tpos, uint32_t(k), 0);
    const float s_k = std::max(sigma, 1e-30f);
    if (u * (qx / s_k) < rx) {
      nxt = int(j);
      break;
    }
    if (q == nullptr) q = a.q.row(row, a.V, w.qbuf.data());
    // vals <- max(r_k - q / s_k, 0), r_k = p (k = 0) or vals / rho
    for (int c = 0; c < r.NC; ++c) {
      const int64_t first = int64_t(c) * r.chunk;
      const int64_t cnt = std::min<int64_t>(r.chunk, r.V - first);
      if (k == 0) r.chunk_probs(c, r.S, vals + first);
      float* v = vals + first;
      const float* qc = q + first;
      if (k > 0 && rho > 0.f) {
#pragma omp simd
        for (int64_t e = 0; e < cnt; ++e) v[e] = std::max(v[e] / rho - qc[e] / s_k, 0.f);
      } else {
#pragma omp simd
        for (int64_t e = 0; e < cnt; ++e) v[e] = std::max(v[e] - qc[e] / s_k, 0.f);
      }
    }
    rho = chunk_sums(vals, r.V, r.NC, r.chunk, wc);
    sigma = sigma - qx;
    ++k;
  }
  int y = -1;
  if (nxt >= 0) {
    y = int(a.tok[n0 + nxt]);
  } else {
    if (k > 0) y = sample_values(vals, wc, r.V, r.NC, r.chunk, u_sample);
    if (y < 0) y = sample_p(r, -1, u_sample, w.rbuf[1].data());
  }
  *nxt_out = nxt;
  *y_out = y;
}

struct TreeRequest {
  int64_t n0, n;
  bool ok;
};

template <typename T>
TreeRequest tree_request(const TreeArgs<T>& a, int b) {
  const int64_t D = int64_t(a.max_depth) + 1;
  for (int64_t c = 0; c < D; ++c) {
    a.acc[b * D + c] = -1;
    a.out[b * D + c] = -1;
  }
  const int64_t n0 = a.cu[b];
  const int64_t n = int64_t(a.cu[b + 1]) - n0;
  const bool ok = n0 >= 0 && n >= 1 && n0 + n <= a.R;
  return {ok ? n0 : 0, ok ? n : 0, ok};
}

// One request: walk the tree from the root, one target row per visited node.
template <typename T>
void tree_request_specinfer(const TreeArgs<T>& a, int b, Work& w) {
  const int64_t D = int64_t(a.max_depth) + 1;
  int32_t* acc = a.acc + b * D;
  int32_t* out = a.out + b * D;
  const TreeRequest req = tree_request(a, b);
  int depth = 0;
  if (req.ok) {
    acc[0] = 0;
    std::vector<float> amax(size_t(a.NC));
    w.rbuf[0].resize(size_t(a.V));
    w.wbuf[0].resize(size_t(a.NC));
    if (a.has_q && a.q.kind != DTYPE_F32) w.qbuf.resize(size_t(a.V));
    Rows<T> rows(a, w, b, req.n0, req.n, false, amax.data());
    const int64_t seed = a.seed[b];
    const int64_t pos = a.pos[b];
    int node = 0;
    for (int step = 0; step <= a.max_depth; ++step) {
      int y, nxt = -1;
      if (!rows.random) {
        y = rows.argmax(node);
        nxt = find_child(a.tok, a.par, req.n0, req.n, node, y);
      } else {
        const Row<T> r = rows.row(node);
        const float u_sample = uniform_at(seed, pos + depth, 0, 1);
        if (a.has_q) {
          recursive_rejection(a, r, req.n0 + node, req.n0, req.n, node, seed, pos + depth, u_sample, w, &nxt, &y);
        } else {
          y = sample_p(r, -1, u_sample, w.rbuf[1].data());
          nxt = find_child(a.tok, a.par, req.n0, req.n, node, y);
        }
      }
      out[depth] = y;
      if (nxt >= 0 && depth < a.max_depth) {
        node = nxt;
        ++depth;
        acc[depth] = node;
      } else {
        break;
      }
    }
  }
  a.num[b] = depth;
}

// The draft law of path lj at node u (depth du): Q(u), and for paths drawn without
// replacement, minus the Q-mass below u of every earlier path through u, renormalized.
struct DraftRow {
  QMat q;
  int64_t row;
  const float* rm;
  int count;
  float left;  // 1 - the removed mass
  float operator()(int64_t x) const {
    float rem = 0.f;
    for (int k = 0; k < count; ++k) {
      if (int64_t(rm[2 * k]) == x) rem += rm[2 * k + 1];
    }
    const float qx = q.at(row, x);
    if (count == 0) return qx;
    return left > 0.f ? (qx - rem) / left : 0.f;
  }
};

template <typename T>
DraftRow draft_row(const TreeArgs<T>& a, int64_t n0, int u, int du, int lj, int height, Work& w) {
  DraftRow d{a.q, n0 + u, nullptr, 0, 1.f};
  if (a.rule != TREE_BLOCK_WOR) return d;
  std::vector<float>& rm = w.rm;
  rm.clear();
  int count = 0;
  float tot = 0.f;
  for (int l = 1; l < lj; ++l) {
    if (node_depth(a.par, n0, l, a.max_depth) != height) continue;
    int cur = l;
    float m = 1.f;
    for (int k = 0; k < height - du - 1; ++k) {  // from the leaf up to depth du + 1
      const int p = ancestor(a.par, n0, cur, 1);
      const int64_t x = a.tok[n0 + cur];
      m *= (x >= 0 && x < a.V) ? a.q.at(n0 + p, x) : 0.f;
      cur = p;
    }
    if (ancestor(a.par, n0, cur, 1) != u) continue;
    const int64_t x = a.tok[n0 + cur];
    m *= (x >= 0 && x < a.V) ? a.q.at(n0 + u, x) : 0.f;
    rm.push_back(float(x));
    rm.push_back(m);
    tot += m;
    ++count;
  }
  d.rm = rm.data();
  d.count = count;
  d.left = 1.f - tot;
  return d;
}

// One request, greedy multi-path block verification (the torch spec is
// _multi_path_block_torch; the CUDA kernel multi_path_kernel): block verification along
// one path per attempt; the residual target R at the current node lives in rbuf[buf]
// (unnormalized, mass rho; chunk masses in wbuf[buf]), or is the node's own P (r_is_p).
template <typename T>
void tree_request_multi_path(const TreeArgs<T>& a, int b, Work& w) {
  const int64_t D = int64_t(a.max_depth) + 1;
  int32_t* acc = a.acc + b * D;
  int32_t* out = a.out + b * D;
  const TreeRequest req = tree_request(a, b);
  const int64_t n0 = req.n0, n = req.n;
  const int64_t V = a.V;
  std::vector<float> amax(size_t(a.NC));
  Rows<T> rows(a, w, b, n0, std::max<int64_t>(n, 1), false, amax.data());
  const int64_t seed = a.seed[b];
  const int64_t pos = a.pos[b];
  for (int i = 0; i < 2; ++i) {
    w.rbuf[i].resize(size_t(V));
    w.wbuf[i].resize(size_t(a.NC));
  }
  std::vector<float> cbuf(size_t(a.chunk));
  int v = 0, dv = 0, y = 0;
  if (req.ok && rows.random) {
    int height = 0;
    for (int64_t j = 0; j < n; ++j) height = std::max(height, node_depth(a.par, n0, int(j), a.max_depth));
    int last = 0;  // leaf of the last path used: later ones come after it
    bool r_is_p = true;
    float rho = 1.f;
    int buf = 0;
    int attempt = 0;
    int state = 0;  // 0 verifying, 1 a whole path accepted, 2 no path left through v
    for (int64_t it = 0; it < n && state == 0; ++it) {
      // the first path (leaf) after `last` through v
      int j = -1;
      if (dv < height) {
        for (int64_t jj = last + 1; jj < n; ++jj) {
          if (node_depth(a.par, n0, int(jj), a.max_depth) == height && ancestor(a.par, n0, int(jj), height - dv) == v) {
            j = int(jj);
            break;
          }
        }
      }
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
        const int64_t xi = xv ? x : 0;
        // T_{i-1}(x_i): R at v for i = 1, else the target row of u_{i-1}
        const Row<T> r_prev = rows.row(u_prev);
        float Tx = r_prev.prob_at(xi, r_prev.S);
        if (i == 1 && !r_is_p) Tx = w.rbuf[buf][size_t(xi)] / rho;
        const DraftRow dr = draft_row(a, n0, u_prev, dv + i - 1, j, height, w);
        Tx = xv ? Tx : 0.f;
        const float Dx = xv ? dr(xi) : 0.f;
        p = block_ratio(p, Tx, Dx);
        float h = p;
        if (i < L) {
          // Z_i = sum_x max(p_i P(u_i)(x) - D(u_i)(x), 0): one pass over u_i's row
          const Row<T> ri = rows.row(u_i);
          const DraftRow di = draft_row(a, n0, u_i, dv + i, j, height, w);
          double z = 0.0;
          for (int c = 0; c < ri.NC; ++c) {
            const int64_t first = int64_t(c) * ri.chunk;
            const int64_t cnt = ri.chunk_probs(c, ri.S, cbuf.data());
            float zc = 0.f;
            if (di.count == 0) {
              const float* qr = nullptr;
              if (a.q.kind == DTYPE_F32) qr = static_cast<const float*>(a.q.base) + di.row * a.q.stride + first;
              if (qr) {
#pragma omp simd reduction(+ : zc)
                for (int64_t e = 0; e < cnt; ++e) zc += std::max(p * cbuf[e] - qr[e], 0.f);
              } else {
                for (int64_t e = 0; e < cnt; ++e) zc += std::max(p * cbuf[e] - di(first + e), 0.f);
              }
            } else {
              for (int64_t e = 0; e < cnt; ++e) zc += std::max(p * cbuf[e] - di(first + e), 0.f);
            }
            z += double(zc);
          }
          const float Z = float(z);
          const float den = Z + 1.f - p;
          h = den > 0.f ? Z / den : 1.f;
        }
        if (uniform_at(seed, pos + dv + i - 1, uint32_t(attempt), 0) < h) {
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
      const Row<T> ru = rows.row(u_tau);
      const DraftRow du = draft_row(a, n0, u_tau, dv + tau, j, height, w);
      const float* src = w.rbuf[buf].data();
      float* dst = w.rbuf[1 - buf].data();
      float* wdst = w.wbuf[1 - buf].data();
      const bool from_r = tau == 0 && !r_is_p;
      for (int c = 0; c < a.NC; ++c) {
        const int64_t first = int64_t(c) * a.chunk;
        const int64_t cnt = from_r ? std::min<int64_t>(a.chunk, V - first) : ru.chunk_probs(c, ru.S, cbuf.data());
        for (int64_t e = 0; e < cnt; ++e) {
          const int64_t off = first + e;
          const float P = from_r ? src[off] / rho : cbuf[e];
          dst[off] = std::max(p_tau * P - du(off), 0.f);
        }
      }
      const float mass = chunk_sums(dst, V, a.NC, a.chunk, wdst);
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
    const Row<T> r = rows.row(v);
    const float u_s = uniform_at(seed, pos + dv, 0, 1);
    if (state == 1 || r_is_p) {
      y = sample_p(r, -1, u_s, cbuf.data());
    } else {
      const int t = sample_values(w.rbuf[buf].data(), w.wbuf[buf].data(), V, a.NC, a.chunk, u_s);
      y = t >= 0 ? t : r.g;
    }
  } else if (req.ok) {
    // greedy: move to the first child carrying the argmax while there is one
    for (int step = 0; step <= a.max_depth; ++step) {
      y = rows.argmax(v);
      const int nxt = find_child(a.tok, a.par, n0, n, v, y);
      if (nxt < 0 || dv >= a.max_depth) break;
      v = nxt;
      ++dv;
    }
  }
  if (req.ok) {
    // the accepted path: root .. v, its tokens after the root, then y
    for (int d = 0; d <= dv; ++d) {
      const int anc = ancestor(a.par, n0, v, dv - d);
      acc[d] = anc;
      if (d >= 1) out[d - 1] = int32_t(a.tok[n0 + anc]);
    }
    out[dv] = y;
  }
  a.num[b] = dv;
}

template <typename T>
void fill_common(Common<T>& c, const void* logits, int64_t stride_l, int64_t R, int64_t V, int chunk,
                 const void* q, int64_t stride_q, int q_dtype, const int32_t* cu, const float* temp,
                 const int32_t* top_k, const float* top_p, const int64_t* seed, const int64_t* pos) {
  c.logits = static_cast<const T*>(logits);
  c.stride_l = stride_l;
  c.R = R;
  c.V = V;
  c.chunk = chunk;
  c.NC = int((V + chunk - 1) / chunk);
  c.q = QMat{q, stride_q, q_dtype};
  c.has_q = q != nullptr;
  c.cu = cu;
  c.temp = temp;
  c.top_k = top_k;
  c.top_p = top_p;
  c.seed = seed;
  c.pos = pos;
}

// Requests in parallel (dynamic: rows are read lazily, so requests differ in cost), on at
// most one thread per request; a single thread runs them in turn without a parallel region
// (a fork / join costs milliseconds when the machine is oversubscribed).
template <typename Args, typename F>
void run_requests(Args& a, int B, int threads, F&& one) {
  threads = std::min(threads, B);
  if (threads <= 1) {
    Work w;
    for (int b = 0; b < B; ++b) one(a, b, w);
    return;
  }
#pragma omp parallel num_threads(threads)
  {
    Work w;
#pragma omp for schedule(dynamic, 1)
    for (int b = 0; b < B; ++b) one(a, b, w);
  }
}

template <typename T>
void run_chain(ChainArgs<T>& a, int B, int threads) {
  run_requests(a, B, threads, [](const ChainArgs<T>& a, int b, Work& w) {
    w.rbuf[1].resize(size_t(std::max(a.chunk, 1)));
    chain_request(a, b, w);
  });
}

template <typename T>
void run_tree(TreeArgs<T>& a, int B, int threads) {
  run_requests(a, B, threads, [](const TreeArgs<T>& a, int b, Work& w) {
    w.rbuf[1].resize(size_t(std::max(a.chunk, 1)));
    if (a.rule == TREE_SPECINFER) tree_request_specinfer(a, b, w);
    else tree_request_multi_path(a, b, w);
  });
}

}  // namespace

extern "C" {

// rejection_sample of B requests: out [B, max_draft_len + 1], num [B] (int32). Logits rows
// of stride_l elements (dtype code logits_dtype), draft_probs rows of stride_q elements (or
// null), ids int32 / int64 (draft_is64). Returns 0, or -1 for an unknown dtype / rule.
int fastverify_rejection_sample(const void* logits, int logits_dtype, int64_t stride_l, int64_t R, int64_t V,
                                const void* drafts, int draft_is64, int64_t N, const int32_t* cu, int B,
                                const void* q, int q_dtype, int64_t stride_q, const float* temp,
                                const int32_t* top_k, const float* top_p, const int64_t* seed, const int64_t* pos,
                                int max_draft_len, int rule, const float* eps, const float* delta, int chunk,
                                int32_t* out, int32_t* num, int threads) {
  if (chunk < 1 || chunk > MAX_CHUNK || rule < 0 || rule > 2) return -1;
  auto go = [&](auto tag) {
    using T = decltype(tag);
    ChainArgs<T> a;
    fill_common<T>(a, logits, stride_l, R, V, chunk, q, stride_q, q_dtype, cu, temp, top_k, top_p, seed, pos);
    a.draft = Ids{drafts, draft_is64 != 0};
    a.N = N;
    a.max_draft_len = max_draft_len;
    a.rule = rule;
    a.eps = eps;
    a.delta = delta;
    a.out = out;
    a.num = num;
    run_chain(a, B, std::max(threads, 1));
  };
  switch (logits_dtype) {
    case DTYPE_F32: go(float{}); break;
    case DTYPE_BF16: go(bf16{}); break;
    case DTYPE_F16: go(fp16{}); break;
    default: return -1;
  }
  return 0;
}

// tree_rejection_sample of B requests: acc, out [B, max_depth + 1], num [B] (int32).
int fastverify_tree_rejection_sample(const void* logits, int logits_dtype, int64_t stride_l, int64_t T_rows,
                                     int64_t V, const void* tokens, int tok_is64, const void* parents, int par_is64,
                                     const int32_t* cu, int B, const void* q, int q_dtype, int64_t stride_q,
                                     const float* temp, const int32_t* top_k, const float* top_p,
                                     const int64_t* seed, const int64_t* pos, int max_depth, int rule, int chunk,
                                     int32_t* acc, int32_t* out, int32_t* num, int threads) {
  if (chunk < 1 || chunk > MAX_CHUNK || rule < 0 || rule > 2) return -1;
  if (rule != TREE_SPECINFER && q == nullptr) return -1;
  auto go = [&](auto tag) {
    using T = decltype(tag);
    TreeArgs<T> a;
    fill_common<T>(a, logits, stride_l, T_rows, V, chunk, q, stride_q, q_dtype, cu, temp, top_k, top_p, seed, pos);
    a.tok = Ids{tokens, tok_is64 != 0};
    a.par = Ids{parents, par_is64 != 0};
    a.max_depth = max_depth;
    a.rule = rule;
    a.acc = acc;
    a.out = out;
    a.num = num;
    run_tree(a, B, std::max(threads, 1));
  };
  switch (logits_dtype) {
    case DTYPE_F32: go(float{}); break;
    case DTYPE_BF16: go(bf16{}); break;
    case DTYPE_F16: go(fp16{}); break;
    default: return -1;
  }
  return 0;
}

}  // extern "C"
