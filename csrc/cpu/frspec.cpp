// cpu backend of fastverify::lm_head_topk and fastverify::lm_head_sample (FR-Spec drafting).
//
// fastverify/ops/frspec.py is the spec. For hidden row m and subset row v (t_m the row
// temperature, 1 where it is <= 0 or absent):
//
//     s[m, v] = (hidden[m] · weight[v]) / t_m        fp32 accumulation, NaN -> -inf
//     lse[m]  = log Σ_v exp(s[m, v])
//     topk:   the k best (s, v) pairs, better = higher s, then lower v
//     sample: v* = argmax_v (s[m, v] + g[m, v]) (ties -> lower v), no noise where t_m <= 0,
//             g = -log(-log u) in float64 rounded to fp32, u = ((o0 >> 8) + 0.5) · 2^-24,
//             o = Philox4x32-10(seed[m], (pos lo, pos hi, v, 1))
//
// One pass over the weight; the [M, V_sub] logits never reach memory. Tasks are
// (tile of TILE_V subset rows) x (chunk of TILE_M hidden rows), tile-major, OpenMP
// dynamic over tasks. A task computes its [rows, TILE_V] logits with linear.h's register
// blocks (the decode step's projection code: AVX512-BF16 vdpbf16ps for bf16 — packed
// inputs from 32 rows, dot products below —, FMA on fp32 otherwise), then folds each row
// of them into
//   - the tile's (max, Σ exp(s - max)), stored per (tile, row);
//   - topk: the running top-k of the thread (a sorted list of keys per row); scores below
//     the list's k-th never reach the list (one compare each);
//   - sample: the running best key of s + g of the thread. The Gumbel noise (Philox and two
//     float64 logs, 16 lanes at a time) is drawn only for 16-row groups whose best score
//     plus the largest possible g (17.33) could still beat the best key.
// A deterministic merge follows: lse folds the tiles' (max, sum) in tile order; the top-k
// of the threads' lists / the best of their keys. Keys are unique per subset row, so the
// k best of the union do not depend on how tiles were shared out: every result depends on
// the shapes only, never on the number of threads.
//
// Keys: a (s, v) pair is the uint64 (order-preserving bits of s) << 32 | ~v, so "better"
// is "greater key"; key 0 is a sentinel worse than every real pair (s = -inf included).
// -0 is keyed as +0 (they compare equal). Ids come from the rows the loops visit, always
// inside [0, V_sub).
#include <omp.h>

#include <functional>

#include "common.h"
#include "linear.h"
#include "philox.h"

namespace {

constexpr int64_t TILE_V = 16 * DOT_NR;  // subset rows per task: 16 weight blocks, a multiple of 16 lanes
constexpr int64_t TILE_M = 64;           // hidden rows per task: the chunk the weight blocks are reused over
constexpr uint32_t LM_HEAD_STREAM = 1;   // Philox counter word c3 of the draft draws
constexpr float GUMBEL_MAX = 17.5f;      // above every g: x = 2^24 - 1 gives g = 17.33
constexpr int MAX_K = 64;                // fastverify.ops.frspec.MAX_K

using Key = uint64_t;

// ------------------------------------------------------------------------------ keys

inline Key make_key(float s, uint32_t v) {
  int32_t bits;
  std::memcpy(&bits, &s, sizeof bits);
  const uint32_t ord = uint32_t(bits ^ ((bits >> 31) & 0x7FFFFFFF)) ^ 0x80000000u;
  return (Key(ord) << 32) | Key(~v);
}

inline float key_score(Key key) {
  const int32_t k32 = int32_t(uint32_t(key >> 32) ^ 0x80000000u);
  const int32_t bits = k32 ^ ((k32 >> 31) & 0x7FFFFFFF);
  float s;
  std::memcpy(&s, &bits, sizeof s);
  return s;
}

inline int64_t key_row(Key key, int64_t V) {
  const int64_t r = int64_t(~uint32_t(key & 0xFFFFFFFFu));
  return r < V ? r : V - 1;  // the sentinel (never selected: V_sub >= k) stays an in-range row
}

// ------------------------------------------------------------------------------ noise

// g of subset row v for the draw at (seed, pos): float64 as fastverify.ops.philox.gumbel,
// then rounded to fp32 (the torch backend's .float()).
[[maybe_unused]] inline float gumbel_scalar(uint64_t seed, uint64_t pos, uint32_t v) {
  const Philox4 o = philox4x32_10(seed, uint32_t(pos), uint32_t(pos >> 32), v, LM_HEAD_STREAM);
  const double u = (double(o.o[0] >> 8) + 0.5) * 5.9604644775390625e-08;
  return float(-std::log(-std::log(u)));
}

#if defined(__AVX512F__)
// (hi, lo) 32-bit halves of c · x in each of the 16 lanes: vpmuludq multiplies the even
// lanes, and the odd ones shifted down.
inline __m512i mulhilo(__m512i x, __m512i c, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(x, c);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), c);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  return _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

// o0 of Philox4x32-10 (philox.h) for 16 counters that differ in c2.
inline __m512i philox_o0_x16(uint64_t seed, uint32_t c0, uint32_t c1, __m512i c2, uint32_t c3) {
  const __m512i A = _mm512_set1_epi32(int(0xD2511F53u)), B = _mm512_set1_epi32(int(0xCD9E8D57u));
  __m512i x0 = _mm512_set1_epi32(int(c0)), x1 = _mm512_set1_epi32(int(c1)), x2 = c2, x3 = _mm512_set1_epi32(int(c3));
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    __m512i lo_b, lo_a;
    const __m512i hi_b = mulhilo(x2, B, lo_b);
    const __m512i hi_a = mulhilo(x0, A, lo_a);
    x0 = _mm512_xor_si512(_mm512_xor_si512(hi_b, x1), _mm512_set1_epi32(int(k0)));
    x2 = _mm512_xor_si512(_mm512_xor_si512(hi_a, x3), _mm512_set1_epi32(int(k1)));
    x1 = lo_b;
    x3 = lo_a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return x0;
}

// log x for positive normal x, 8 lanes, within an ulp (fdlibm's e_log.c without the special
// cases): x = 2^k · m, m in [√2/2, √2), f = m - 1, s = f / (2 + f),
// log x = k·ln2 + f - s·(f - R(s²)) written as fdlibm does to keep the rounding small.
inline __m512d log_pd(__m512d x) {
  const __m512i bits = _mm512_castpd_si512(x);
  __m512i e = _mm512_srli_epi64(bits, 52);
  __m512d m = _mm512_castsi512_pd(_mm512_or_si512(_mm512_and_si512(bits, _mm512_set1_epi64(0x000FFFFFFFFFFFFFLL)),
                                                  _mm512_set1_epi64(0x3FF0000000000000LL)));
  const __mmask8 big = _mm512_cmp_pd_mask(m, _mm512_set1_pd(1.4142135623730951), _CMP_GT_OQ);
  m = _mm512_mask_mul_pd(m, big, m, _mm512_set1_pd(0.5));
  e = _mm512_mask_add_epi64(e, big, e, _mm512_set1_epi64(1));
  const __m512d k = _mm512_cvtepi32_pd(_mm512_cvtepi64_epi32(_mm512_sub_epi64(e, _mm512_set1_epi64(1023))));
  const __m512d one = _mm512_set1_pd(1.0);
  const __m512d f = _mm512_sub_pd(m, one);
  const __m512d s = _mm512_div_pd(f, _mm512_add_pd(_mm512_set1_pd(2.0), f));
  const __m512d z = _mm512_mul_pd(s, s);
  const __m512d w = _mm512_mul_pd(z, z);
  auto madd = [](__m512d a, __m512d b, double c) { return _mm512_add_pd(_mm512_mul_pd(a, b), _mm512_set1_pd(c)); };
  // t1 = w(Lg2 + w(Lg4 + w Lg6)), t2 = z(Lg1 + w(Lg3 + w(Lg5 + w Lg7)))
  __m512d t1 = madd(w, _mm512_set1_pd(1.531383769920937332e-01), 2.222219843214978396e-01);
  t1 = _mm512_mul_pd(w, madd(w, t1, 3.999999999940941908e-01));
  __m512d t2 = madd(w, _mm512_set1_pd(1.479819860511658591e-01), 1.818357216161805012e-01);
  t2 = madd(w, t2, 2.857142874366239149e-01);
  t2 = _mm512_mul_pd(z, madd(w, t2, 6.666666666666735130e-01));
  const __m512d R = _mm512_add_pd(t2, t1);
  const __m512d hfsq = _mm512_mul_pd(_mm512_set1_pd(0.5), _mm512_mul_pd(f, f));
  // k·ln2_hi - ((hfsq - (s·(hfsq + R) + k·ln2_lo)) - f)
  const __m512d inner = _mm512_add_pd(_mm512_mul_pd(s, _mm512_add_pd(hfsq, R)),
                                      _mm512_mul_pd(k, _mm512_set1_pd(1.90821492927058770002e-10)));
  return _mm512_sub_pd(_mm512_mul_pd(k, _mm512_set1_pd(6.93147180369123816490e-01)),
                       _mm512_sub_pd(_mm512_sub_pd(hfsq, inner), f));
}

inline __m256 gumbel_of_x(__m512d x) {  // x = o0 >> 8 as float64
  const __m512d u = _mm512_mul_pd(_mm512_add_pd(x, _mm512_set1_pd(0.5)), _mm512_set1_pd(5.9604644775390625e-08));
  const __m512d e = _mm512_sub_pd(_mm512_setzero_pd(), log_pd(u));
  return _mm512_cvtpd_ps(_mm512_sub_pd(_mm512_setzero_pd(), log_pd(e)));
}

// x = o0 >> 8 of subset rows v0 .. v0 + 15
inline __m512i gumbel_bits_x16(uint64_t seed, uint64_t pos, uint32_t v0) {
  const __m512i v = _mm512_add_epi32(_mm512_set1_epi32(int(v0)),
                                     _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  return _mm512_srli_epi32(philox_o0_x16(seed, uint32_t(pos), uint32_t(pos >> 32), v, LM_HEAD_STREAM), 8);
}

// g of 16 lanes of x
inline __m512 gumbel_of_bits_x16(__m512i x) {
  const __m256 lo = gumbel_of_x(_mm512_cvtepi32_pd(_mm512_castsi512_si256(x)));
  const __m256 hi = gumbel_of_x(_mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(x, 1)));
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(lo)), _mm256_castps_pd(hi), 1));
}

// g of subset rows v0 .. v0 + 15
inline __m512 gumbel_x16(uint64_t seed, uint64_t pos, uint32_t v0) {
  return gumbel_of_bits_x16(gumbel_bits_x16(seed, pos, v0));
}

#if defined(__AVX512CD__)
// An upper bound of g from the bits alone, without logarithms: -log u >= 1 - u, so
// g = -log(-log u) <= -log(1 - u) = -log(z · 2^-25) with z = 2^25 - 2x - 1 >= 1, and
// z >= 2^floor(log2 z) gives g <= (25 - floor(log2 z)) · ln 2. The margin covers the fp32
// rounding of g (an ulp: < 2e-6).
inline __m512 gumbel_bound_x16(__m512i x) {
  const __m512i z = _mm512_sub_epi32(_mm512_set1_epi32((1 << 25) - 1), _mm512_slli_epi32(x, 1));
  // 25 - floor(log2 z) = 25 - (31 - lzcnt z)
  const __m512i e = _mm512_sub_epi32(_mm512_lzcnt_epi32(z), _mm512_set1_epi32(6));
  return _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(e), _mm512_set1_ps(0.6931472f)), _mm512_set1_ps(1e-3f));
}
#endif
#endif

// g of subset rows v0 .. v0 + n - 1 (n <= 16) into g
inline void gumbel_group(uint64_t seed, uint64_t pos, uint32_t v0, int n, float* g) {
#if defined(__AVX512F__)
  _mm512_mask_storeu_ps(g, __mmask16((1u << n) - 1), gumbel_x16(seed, pos, v0));
#else
  for (int j = 0; j < n; ++j) g[j] = gumbel_scalar(seed, pos, v0 + uint32_t(j));
#endif
}

// ------------------------------------------------------------------------------ per-row folds

// s[0 .. n) /= t with NaN -> -inf and -0 -> +0 (IEEE division, as the torch backend);
// returns the tile's (max, Σ exp(s - max)): (-inf, 0) when every score is -inf, (+inf, +inf)
// when one is +inf.
inline void scale_and_softmax(float* __restrict__ s, int n, float t, float& mx, float& sum) {
  float m = NEG_INF;
#pragma omp simd reduction(max : m)
  for (int j = 0; j < n; ++j) {
    const float x = s[j] / t;
    const float c = x != x ? NEG_INF : x + 0.f;
    s[j] = c;
    m = std::max(m, c);
  }
  mx = m;
  if (m == NEG_INF) {
    sum = 0.f;
  } else if (m == -NEG_INF) {
    sum = -NEG_INF;
  } else {
    float l = 0.f;
#pragma omp simd reduction(+ : l)
    for (int j = 0; j < n; ++j) l += exp_nonpositive(s[j] - m);
    sum = l;
  }
}

// Fold the row's scores s[0 .. n) of subset rows v0.. into the sorted (descending) list of
// k keys; scores below the list's k-th are rejected by one compare.
inline void topk_fold(const float* __restrict__ s, int n, uint32_t v0, Key* __restrict__ list, int k) {
  float floor_s = list[k - 1] ? key_score(list[k - 1]) : NEG_INF;
  for (int j = 0; j < n; ++j) {
    if (!(s[j] >= floor_s)) continue;
    const Key key = make_key(s[j], v0 + uint32_t(j));
    if (key <= list[k - 1]) continue;
    int i = k - 1;
    for (; i > 0 && list[i - 1] < key; --i) list[i] = list[i - 1];
    list[i] = key;
    if (list[k - 1]) floor_s = key_score(list[k - 1]);
  }
}

struct Best {
  Key key;     // of s + g (s on greedy rows); 0: none yet
  float s;     // the score of that row
};

// Fold the row's scores into the running best key of s + g (16-row groups whose best score
// cannot reach the best key draw no noise).
inline void sample_fold(const float* __restrict__ s, int n, uint32_t v0, bool greedy, uint64_t seed, uint64_t pos,
                        Best& best) {
  for (int j0 = 0; j0 < n; j0 += V) {
    const int len = std::min(V, n - j0);
    float noisy[V];
    if (greedy) {
      for (int j = 0; j < len; ++j) noisy[j] = s[j0 + j];
    } else {
#if defined(__AVX512CD__)
      // the logarithms (most of the cost) only where some row's s + bound(g) reaches the best
      const __mmask16 lanes = __mmask16((1u << len) - 1);
      const __m512i x = gumbel_bits_x16(seed, pos, v0 + uint32_t(j0));
      if (best.key) {
        const __m512 reach = _mm512_add_ps(_mm512_maskz_loadu_ps(lanes, s + j0), gumbel_bound_x16(x));
        if (!_mm512_mask_cmp_ps_mask(lanes, reach, _mm512_set1_ps(key_score(best.key)), _CMP_GE_OQ)) continue;
      }
      _mm512_mask_storeu_ps(noisy, lanes, gumbel_of_bits_x16(x));
#else
      if (best.key) {
        float top = NEG_INF;
        for (int j = 0; j < len; ++j) top = std::max(top, s[j0 + j]);
        if (top + GUMBEL_MAX < key_score(best.key)) continue;  // then s + g < the best for all of them
      }
      gumbel_group(seed, pos, v0 + uint32_t(j0), len, noisy);
#endif
      for (int j = 0; j < len; ++j) noisy[j] += s[j0 + j];
    }
    for (int j = 0; j < len; ++j) {
      const Key key = make_key(noisy[j] + 0.f, v0 + uint32_t(j0 + j));
      if (key > best.key) best = {key, s[j0 + j]};
    }
  }
}

// lse of a row from its tiles' (max, sum), folded in tile order
inline float merge_lse(const float* mx, const float* sm, int64_t tiles, int64_t stride) {
  float m = NEG_INF, l = 0.f;
  for (int64_t i = 0; i < tiles; ++i) {
    const float ms = mx[i * stride], ls = sm[i * stride];
    if (ms == NEG_INF) continue;
    if (ms > m) {
      l = (m == NEG_INF ? 0.f : l * std::exp(m - ms)) + ls;
      m = ms;
    } else {
      l += ls * std::exp(ms - m);
    }
  }
  return m == NEG_INF ? NEG_INF : m + std::log(l);
}

inline int64_t map_id(const void* token_map, int map64, int64_t row) {
  if (!token_map) return row;
  return map64 ? static_cast<const int64_t*>(token_map)[row] : static_cast<const int32_t*>(token_map)[row];
}

// ------------------------------------------------------------------------------ the pass

struct Problem {
  int64_t M, V, d;
  const float* temperature;  // [M] or null (1)
  int threads;
  int64_t tiles;
  std::vector<float> tile_max, tile_sum;  // [tiles, M]
};

// Whether the bf16 inputs go packed (linear.h's packed blocks, from 32 rows: fewer rows
// leave too few accumulators per block) rather than through the dot-product blocks.
template <typename T>
constexpr bool packable() {
#if defined(__AVX512BF16__)
  return std::is_same_v<T, bf16>;
#else
  return false;
#endif
}
constexpr int64_t PACK_MIN_ROWS = 32;

// Every task's logits tile, handed row by row to fold(thread, m, v0, n, s, greedy).
template <typename T, typename Fold>
void score_pass(const T* hidden, int64_t ldh, const T* weight, Problem& p, Fold&& fold) {
  using X = DotInput<T>;
  const X* x = nullptr;
  int64_t ldx = p.d;
  std::vector<float> widened;
  std::vector<uint32_t> packed;
  const bool pack = packable<T>() && p.M >= PACK_MIN_ROWS;
  if (pack) {
#if defined(__AVX512BF16__)
    if constexpr (packable<T>()) {
      static_assert(TILE_M == PACK_ROWS, "a task's rows are one packed chunk");
      packed.resize(size_t((p.M + PACK_ROWS - 1) / PACK_ROWS) * ((p.d + 1) / 2) * PACK_ROWS);
      pack_pairs_bf16(hidden, ldh, p.M, p.d, packed.data());
    }
#endif
  } else if constexpr (std::is_same_v<X, T>) {
    x = hidden;
    ldx = ldh;
  } else {  // fp32 inputs of the dot blocks: widened once
    widened.resize(p.M * p.d);
    for (int64_t m = 0; m < p.M; ++m)
      for (int64_t c = 0; c < p.d; ++c) widened[m * p.d + c] = to_float(hidden[m * ldh + c]);
    x = widened.data();
  }
  const int64_t chunks = (p.M + TILE_M - 1) / TILE_M;
  p.tiles = (p.V + TILE_V - 1) / TILE_V;
  p.tile_max.assign(p.tiles * p.M, NEG_INF);
  p.tile_sum.assign(p.tiles * p.M, 0.f);
  const int64_t tasks = p.tiles * chunks;
#pragma omp parallel num_threads(p.threads)
  {
    std::vector<float> s(TILE_M * TILE_V);
    std::vector<float> acc(pack ? TILE_V * TILE_M : 0);
    const int tid = omp_get_thread_num();
    // dynamic: a thread another process delays leaves its tiles to the other (which thread
    // runs a tile changes no result)
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t tile = task / chunks, chunk = task % chunks, m0 = chunk * TILE_M;
      const int64_t v0 = tile * TILE_V;
      const int nv = int(std::min(TILE_V, p.V - v0)), nm = int(std::min(TILE_M, p.M - m0));
      if (pack) {
#if defined(__AVX512BF16__)
        if constexpr (packable<T>())
          linear_tile_packed_bf16(packed.data() + chunk * ((p.d + 1) / 2) * PACK_ROWS, nm, weight + v0 * p.d, p.d, nv,
                                  p.d, s.data(), TILE_V, acc.data());
#endif
      } else {
        linear_tile<T>(x + m0 * ldx, ldx, nm, weight + v0 * p.d, p.d, nv, p.d, s.data(), TILE_V);
      }
      for (int i = 0; i < nm; ++i) {
        const int64_t m = m0 + i;
        const float raw = p.temperature ? p.temperature[m] : 1.f;
        const bool greedy = !(raw > 0.f);
        float* row = s.data() + i * TILE_V;
        scale_and_softmax(row, nv, greedy ? 1.f : raw, p.tile_max[tile * p.M + m], p.tile_sum[tile * p.M + m]);
        fold(tid, m, uint32_t(v0), nv, row, greedy);
      }
    }
  }
}

template <typename T>
void topk(const void* hidden, int64_t ldh, const void* weight, Problem& p, int k, const void* token_map, int map64,
          int64_t* ids, float* logprobs, float* lse) {
  const int threads = p.threads;
  std::vector<Key> lists(size_t(threads) * p.M * k, Key{0});
  score_pass<T>(static_cast<const T*>(hidden), ldh, static_cast<const T*>(weight), p,
                [&](int tid, int64_t m, uint32_t v0, int n, const float* s, bool) {
                  topk_fold(s, n, v0, lists.data() + (size_t(tid) * p.M + m) * k, k);
                });
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t m = 0; m < p.M; ++m) {
    Key cand[MAX_K * 2];
    Key run[MAX_K];
    std::copy_n(lists.data() + size_t(m) * k, k, run);
    for (int t = 1; t < threads; ++t) {  // union of sorted lists, k best kept (keys are unique)
      const Key* other = lists.data() + (size_t(t) * p.M + m) * k;
      std::merge(run, run + k, other, other + k, cand, std::greater<Key>());
      std::copy_n(cand, k, run);
    }
    const float l = merge_lse(p.tile_max.data() + m, p.tile_sum.data() + m, p.tiles, p.M);
    lse[m] = l;
    for (int j = 0; j < k; ++j) {
      ids[m * k + j] = map_id(token_map, map64, key_row(run[j], p.V));
      logprobs[m * k + j] = key_score(run[j]) - l;
    }
  }
}

template <typename T>
void sample(const void* hidden, int64_t ldh, const void* weight, Problem& p, const int64_t* seed,
            const int64_t* positions, const void* token_map, int map64, int64_t* ids, float* logprobs, float* lse) {
  const int threads = p.threads;
  std::vector<Best> best(size_t(threads) * p.M, Best{0, NEG_INF});
  score_pass<T>(static_cast<const T*>(hidden), ldh, static_cast<const T*>(weight), p,
                [&](int tid, int64_t m, uint32_t v0, int n, const float* s, bool greedy) {
                  sample_fold(s, n, v0, greedy, uint64_t(seed[m]), uint64_t(positions[m]), best[size_t(tid) * p.M + m]);
                });
  for (int64_t m = 0; m < p.M; ++m) {
    Best b = best[m];
    for (int t = 1; t < threads; ++t)
      if (best[size_t(t) * p.M + m].key > b.key) b = best[size_t(t) * p.M + m];
    const float l = merge_lse(p.tile_max.data() + m, p.tile_sum.data() + m, p.tiles, p.M);
    lse[m] = l;
    ids[m] = map_id(token_map, map64, key_row(b.key, p.V));
    logprobs[m] = (b.key ? b.s : NEG_INF) - l;
  }
}

template <typename Fn>
int dispatch(int dtype, Fn&& fn) {
  switch (dtype) {
    case DTYPE_F32: fn(float{}); return 0;
    case DTYPE_BF16: fn(bf16{}); return 0;
    case DTYPE_F16: fn(fp16{}); return 0;
    default: return 2;
  }
}

}  // namespace

extern "C" {

// lm_head_topk: ids [M, k] int64, logprobs [M, k], lse [M] (see the top of the file).
// hidden [M, d] with row stride ldh, weight [V, d] contiguous, both of dtype (Dtype code);
// token_map [V] int32 (map64 = 0) / int64 or null; temperature [M] or null.
// Returns 0, or 1 for k outside [1, min(V, 64)] or bad sizes, 2 for an unknown dtype.
int fastverify_lm_head_topk(const void* hidden, int64_t ldh, const void* weight, int32_t dtype, int64_t M, int64_t V,
                            int64_t d, int32_t k, const void* token_map, int32_t map64, const float* temperature,
                            int64_t* ids, float* logprobs, float* lse, int32_t threads) {
  if (M < 0 || V < 1 || V >= (int64_t{1} << 31) || d < 1 || k < 1 || k > MAX_K || k > V) return 1;
  if (M == 0) return 0;
  Problem p{M, V, d, temperature, std::max(1, int(threads)), 0, {}, {}};
  return dispatch(dtype, [&](auto tag) {
    topk<decltype(tag)>(hidden, ldh, weight, p, k, token_map, map64, ids, logprobs, lse);
  });
}

// lm_head_sample: ids [M] int64, logprobs [M], lse [M]; temperature, seed, positions [M].
int fastverify_lm_head_sample(const void* hidden, int64_t ldh, const void* weight, int32_t dtype, int64_t M, int64_t V,
                              int64_t d, const void* token_map, int32_t map64, const float* temperature,
                              const int64_t* seed, const int64_t* positions, int64_t* ids, float* logprobs,
                              float* lse, int32_t threads) {
  if (M < 0 || V < 1 || V >= (int64_t{1} << 31) || d < 1 || !temperature) return 1;
  if (M == 0) return 0;
  Problem p{M, V, d, temperature, std::max(1, int(threads)), 0, {}, {}};
  return dispatch(dtype, [&](auto tag) {
    sample<decltype(tag)>(hidden, ldh, weight, p, seed, positions, token_map, map64, ids, logprobs, lse);
  });
}

// The fp32 Gumbel noise the sample kernel adds for subset rows v0 .. v0 + n - 1 at (seed,
// position) (for tests: it equals fastverify.ops.philox.gumbel(...).float()).
void fastverify_lm_head_gumbel(int64_t seed, int64_t position, int64_t v0, int64_t n, float* out) {
  for (int64_t i = 0; i < n; i += V)
    gumbel_group(uint64_t(seed), uint64_t(position), uint32_t(v0 + i), int(std::min<int64_t>(V, n - i)), out + i);
}

// The fp32 noise of Philox outputs o0[0 .. n) (for tests: every x = o0 >> 8, the extremes
// included, against the float64 formula), and with bound != null the upper bound the sample
// kernel's filter uses (-inf where this build has no filter).
void fastverify_lm_head_gumbel_of_bits(const int64_t* o0, int64_t n, float* out, float* bound) {
  for (int64_t i = 0; i < n; ++i) {
    if (bound) {
#if defined(__AVX512CD__)
      bound[i] = _mm512_cvtss_f32(gumbel_bound_x16(_mm512_set1_epi32(int(uint32_t(o0[i]) >> 8))));
#else
      bound[i] = NEG_INF;
#endif
    }
#if defined(__AVX512F__)
    const __m512d x = _mm512_set1_pd(double(uint32_t(o0[i]) >> 8));
    out[i] = _mm_cvtss_f32(_mm256_castps256_ps128(gumbel_of_x(x)));
#else
    const double u = (double(uint32_t(o0[i]) >> 8) + 0.5) * 5.9604644775390625e-08;
    out[i] = float(-std::log(-std::log(u)));
#endif
  }
}

}  // extern "C"
