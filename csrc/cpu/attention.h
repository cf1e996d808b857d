// Paged attention over a tree per request or over selected chunks: the one CPU attention
// of the tree_attention op (tree_attention.cpp), the sparse_kv_attention op (sparse_kv.cpp)
// and the models' fused decode step (step.cpp). fp32, bf16 and fp16 q / caches, fp32
// accumulation; the output has q's element type.
//
// Two inner loops over the same plan (work units, key lists, masks, log-sum-exp merge):
// - bf16 with AVX-512-BF16: a block of 64 keys is packed into the operand layout of
//   vdpbf16ps (pairs of bf16 in 32-bit words: K as [D/2][64 keys], V as [32 key pairs][D]),
//   then each tile of 8 queries gets S = Q·Kᵀ and O += P·V from register-blocked
//   microkernels. A tree's n nodes × G heads share every packed block, so a request's
//   keys are read once per KV head and the work is small GEMMs (compute-bound for trees).
// - everything else (fp32, fp16, bf16 without the instruction, the portable build): rows
//   of 32 keys (widened to fp32) scored one key at a time for all queries of the group.
#pragma once

#include <type_traits>

#include "common.h"

namespace {

constexpr int BLOCK = 32;  // keys scored at once by the row-wise path
constexpr int PACK = 64;   // keys packed and scored at once by the bf16 path
constexpr int QTILE = 8;   // queries per register tile of the bf16 path

// ---------------------------------------------------------------------------- element stores

// fp32 → element type, round to nearest even (NaN stays NaN)
template <typename T> inline T from_float(float x);
template <> inline float from_float<float>(float x) { return x; }
template <> inline bf16 from_float<bf16>(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return bf16{uint16_t((u >> 16) | 0x40u)};
  u += 0x7FFFu + ((u >> 16) & 1u);
  return bf16{uint16_t(u >> 16)};
}
template <> inline fp16 from_float<fp16>(float x) {
#if defined(__F16C__)
  return fp16{uint16_t(_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT))};
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  u &= 0x7FFFFFFFu;
  if (u > 0x7F800000u) return fp16{uint16_t(sign | 0x7E00u)};            // NaN
  if (u >= 0x477FF000u) return fp16{uint16_t(sign | 0x7C00u)};           // rounds to inf (>= 65520)
  if (u < 0x38800000u) {                                                 // below 2^-14: subnormal or 0
    float a;
    std::memcpy(&a, &u, sizeof a);
    return fp16{uint16_t(sign | uint16_t(std::nearbyint(a * 16777216.f)))};  // units of 2^-24, ties even
  }
  u += 0xFFFu + ((u >> 13) & 1u);                                        // 23 → 10 mantissa bits, ties even
  return fp16{uint16_t(sign | ((u - (112u << 23)) >> 13))};
#endif
}

// ---------------------------------------------------------------------------- the problem

// Arguments of paged_attention (strides in elements). Key position p of request b is at
// page block_table[b·bt_stride + p / page_size], slot p % page_size; a position past the
// block table (bt_cols pages) or on a page id outside [0, num_pages) is no key (never read).
struct PagedAttention {
  int64_t N = 0;                       // query tokens
  int Hq = 0, Hkv = 0, D = 0;
  int64_t q_tok = 0, q_head = 0;       // q strides
  int64_t k_page = 0, k_slot = 0, k_head = 0, v_page = 0, v_slot = 0, v_head = 0;
  int64_t num_pages = 0;
  int page_size = 1;
  const int32_t* block_table = nullptr;
  int64_t bt_stride = 0, bt_cols = 0;
  const int32_t* seq_lens = nullptr;
  int64_t B = 0;
  // tree mode
  const int32_t* cu_nodes = nullptr;
  const int64_t* tree_mask = nullptr;
  int64_t mask_words = 0;
  const int64_t* rows = nullptr;       // node of each query token (null: token t is node t)
  // sparse mode (chunk_ids [B, Hkv, n_ids], contiguous)
  const int32_t* chunk_ids = nullptr;
  int64_t n_ids = 0;
  int chunk_size = 0;
  float sm_scale = 1.f;
  int num_splits = 0;                  // work units per longest key list (0: from the shapes)
  int threads = 1;
};

// ---------------------------------------------------------------------------- row-wise path (fp32 rows)

// acc[D] += Σ_j p[j] · rows[j][D] over the rows with live[j] != null. Columns outer, rows
// inner: each 16 columns of acc stay in one register across all rows instead of a
// load-add-store chain per row.
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
// n <= 64 keys whose rows are kp[j] / vp[j]: query i sees key j when bit j of
// vis[i / G] is set (the G query heads of a token share its visibility). Each key row is
// loaded once for all nq queries; m, l, acc ([nq][lda]) hold each query's running max,
// sum and Σ p·V.
inline void attend_rows(const float* const* q, int nq, int G, int D, const float* const* kp, const float* const* vp,
                        const uint64_t* vis, int n, float* __restrict__ m, float* __restrict__ l,
                        float* __restrict__ acc, int64_t lda, float* __restrict__ s /* [nq][64] scratch */) {
  const uint64_t all = n == 64 ? ~uint64_t(0) : (uint64_t(1) << n) - 1;
  bool every = true;  // every query sees every key (prefix blocks): no visibility test
  for (int t = 0; t < (nq + G - 1) / G; ++t) every = every && (vis[t] & all) == all;
  if (every) {
    for (int j = 0; j < n; ++j)
      for (int i = 0; i < nq; ++i) s[i * 64 + j] = dot(q[i], kp[j], D);
  }
  uint64_t row_vis[64];  // vis of query i's token, per group of 64 queries
  for (int i0 = 0; i0 < nq && !every; i0 += 64) {
    const int ni = std::min(64, nq - i0);
    for (int i = 0; i < ni; ++i) row_vis[i] = vis[(i0 + i) / G];
    for (int j = 0; j < n; ++j)
      for (int i = 0; i < ni; ++i)
        s[(i0 + i) * 64 + j] = (row_vis[i] >> j) & 1 ? dot(q[i0 + i], kp[j], D) : NEG_INF;
  }
  const float* live[64];
  for (int i = 0; i < nq; ++i) {
    float* __restrict__ si = s + i * 64;
    float mx = m[i];
    for (int j = 0; j < n; ++j) mx = si[j] > mx ? si[j] : mx;
    if (mx == NEG_INF) continue;  // nothing visible yet
    const float rescale = std::exp(m[i] - mx);  // 0 on the first visible block (m = -inf)
    float* __restrict__ ai = acc + int64_t(i) * lda;
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

// ---------------------------------------------------------------------------- bf16 path (vdpbf16ps)

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define FASTVERIFY_BF16_DOT 1

inline __m512bh as_bh(__m512i x) { return (__m512bh)x; }

// exp_nonpositive (common.h) on 16 lanes: 2^n · 2^f, the same polynomial
inline __m512 exp_nonpositive_ps(__m512 x) {
  const __m512 y = _mm512_max_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f)), _mm512_set1_ps(-126.f));
  const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(y, n), _mm512_set1_ps(0.6931471805599453f));
  __m512 p = _mm512_set1_ps(1.f / 5040.f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 720.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}

// 16×16 transpose of 32-bit words: r[k] becomes column k of the input rows
inline void transpose16x16_epi32(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
      t[8 * i + 4 + j] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + 4 + j], 0xDD);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0xDD);
  }
}

// kp[p·PACK + j] = (K[j][2p], K[j][2p+1]) for the PACK keys of a block (null rows: zeros),
// P = ⌈D/2⌉ pairs (an odd D pads with 0): 16 keys × 16 pairs at a time, one transpose each.
inline void pack_k_bf16(const bf16* const* rows, int D, uint32_t* __restrict__ kp) {
  const int P = (D + 1) / 2;
  for (int j0 = 0; j0 < PACK; j0 += 16)
    for (int p0 = 0; p0 < P; p0 += 16) {
      const int n = std::min(32, D - 2 * p0);  // bf16 elements of these 16 pairs
      const __mmask32 mk = n == 32 ? ~__mmask32(0) : (__mmask32(1) << n) - 1;
      __m512i r[16];
      for (int j = 0; j < 16; ++j)
        r[j] = rows[j0 + j] ? _mm512_maskz_loadu_epi16(mk, rows[j0 + j] + 2 * p0) : _mm512_setzero_si512();
      transpose16x16_epi32(r);
      for (int k = 0; k < 16 && p0 + k < P; ++k) _mm512_storeu_si512(kp + (p0 + k) * PACK + j0, r[k]);
    }
}

// vp[i·DA + d] = (V[2i][d], V[2i+1][d]) for the PACK/2 key pairs of a block, d < DA
// (columns past D and null rows: zeros). Two rows of 32 columns interleave into two
// vectors of 16 pairs with one permute each.
inline void pack_v_bf16(const bf16* const* rows, int D, int DA, uint32_t* __restrict__ vp) {
  alignas(64) static const uint16_t lo_idx[32] = {0,  32, 1,  33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
                                                  8,  40, 9,  41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static const uint16_t hi_idx[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                                  24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i lo = _mm512_load_si512(lo_idx), hi = _mm512_load_si512(hi_idx);
  for (int i = 0; i < PACK / 2; ++i) {
    const bf16* a = rows[2 * i];
    const bf16* b = rows[2 * i + 1];
    uint32_t* out = vp + int64_t(i) * DA;
    for (int d = 0; d < DA; d += 32) {  // d < D for every step (DA = D rounded up to 16)
      const int n = std::min(32, D - d);
      const __mmask32 mk = n == 32 ? ~__mmask32(0) : (__mmask32(1) << n) - 1;
      const __m512i x = a ? _mm512_maskz_loadu_epi16(mk, a + d) : _mm512_setzero_si512();
      const __m512i y = b ? _mm512_maskz_loadu_epi16(mk, b + d) : _mm512_setzero_si512();
      _mm512_storeu_si512(out + d, _mm512_permutex2var_epi16(x, lo, y));
      if (d + 16 < DA) _mm512_storeu_si512(out + d + 16, _mm512_permutex2var_epi16(x, hi, y));
    }
  }
}

// s[r][j] = Σ_p q2[r][p] · kp[p][j] for r < MT, j < PACK: bf16 products summed in fp32.
// 2·MT accumulators; per pair p two K loads and MT broadcasts feed 2·MT vdpbf16ps.
template <int MT>
inline void qk_tile_bf16(const uint32_t* __restrict__ q2, int64_t ldq, const uint32_t* __restrict__ kp, int P,
                         float* __restrict__ s) {
  for (int j0 = 0; j0 < PACK; j0 += 32) {
    __m512 acc[MT][2];
    for (int r = 0; r < MT; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int p = 0; p < P; ++p) {
      const __m512bh k0 = as_bh(_mm512_loadu_si512(kp + p * PACK + j0));
      const __m512bh k1 = as_bh(_mm512_loadu_si512(kp + p * PACK + j0 + 16));
      for (int r = 0; r < MT; ++r) {
        const __m512bh b = as_bh(_mm512_set1_epi32(int(q2[r * ldq + p])));
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], b, k0);
        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], b, k1);
      }
    }
    for (int r = 0; r < MT; ++r) {
      _mm512_storeu_ps(s + r * PACK + j0, acc[r][0]);
      _mm512_storeu_ps(s + r * PACK + j0 + 16, acc[r][1]);
    }
  }
}

// o[r][d..d+16·NZ) = o·alpha[r] + Σ_i p2[r][i] · vp[i][d..]: MT·NZ accumulators.
template <int MT, int NZ>
inline void pv_cols_bf16(const uint32_t* __restrict__ p2, const float* alpha, const uint32_t* __restrict__ vp, int DA,
                         float* __restrict__ o, int64_t ldo, int d) {
  __m512 acc[MT][NZ];
  for (int r = 0; r < MT; ++r) {
    const __m512 a = _mm512_set1_ps(alpha[r]);
    for (int z = 0; z < NZ; ++z) acc[r][z] = _mm512_mul_ps(_mm512_loadu_ps(o + r * ldo + d + 16 * z), a);
  }
  for (int i = 0; i < PACK / 2; ++i) {
    __m512bh v[NZ];
    for (int z = 0; z < NZ; ++z) v[z] = as_bh(_mm512_loadu_si512(vp + int64_t(i) * DA + d + 16 * z));
    for (int r = 0; r < MT; ++r) {
      const __m512bh b = as_bh(_mm512_set1_epi32(int(p2[r * (PACK / 2) + i])));
      for (int z = 0; z < NZ; ++z) acc[r][z] = _mm512_dpbf16_ps(acc[r][z], b, v[z]);
    }
  }
  for (int r = 0; r < MT; ++r)
    for (int z = 0; z < NZ; ++z) _mm512_storeu_ps(o + r * ldo + d + 16 * z, acc[r][z]);
}

// O[r] = O[r]·alpha[r] + P[r]·V over one packed block, rows r < MT <= 4, all DA columns
template <int MT>
inline void pv_tile_bf16(const uint32_t* p2, const float* alpha, const uint32_t* vp, int DA, float* o, int64_t ldo) {
  int d = 0;
  for (; d + 64 <= DA; d += 64) pv_cols_bf16<MT, 4>(p2, alpha, vp, DA, o, ldo, d);
  for (; d < DA; d += 16) pv_cols_bf16<MT, 1>(p2, alpha, vp, DA, o, ldo, d);
}

inline void qk_tile_any(int mt, const uint32_t* q2, int64_t ldq, const uint32_t* kp, int P, float* s) {
  switch (mt) {
    case 8: qk_tile_bf16<8>(q2, ldq, kp, P, s); break;
    case 7: qk_tile_bf16<7>(q2, ldq, kp, P, s); break;
    case 6: qk_tile_bf16<6>(q2, ldq, kp, P, s); break;
    case 5: qk_tile_bf16<5>(q2, ldq, kp, P, s); break;
    case 4: qk_tile_bf16<4>(q2, ldq, kp, P, s); break;
    case 3: qk_tile_bf16<3>(q2, ldq, kp, P, s); break;
    case 2: qk_tile_bf16<2>(q2, ldq, kp, P, s); break;
    default: qk_tile_bf16<1>(q2, ldq, kp, P, s); break;
  }
}

inline void pv_tile_any(int mt, const uint32_t* p2, const float* alpha, const uint32_t* vp, int DA, float* o,
                        int64_t ldo) {
  for (int r = 0; r < mt; r += 4) {
    const int n = std::min(4, mt - r);
    const uint32_t* p = p2 + r * (PACK / 2);
    switch (n) {
      case 4: pv_tile_bf16<4>(p, alpha + r, vp, DA, o + r * ldo, ldo); break;
      case 3: pv_tile_bf16<3>(p, alpha + r, vp, DA, o + r * ldo, ldo); break;
      case 2: pv_tile_bf16<2>(p, alpha + r, vp, DA, o + r * ldo, ldo); break;
      default: pv_tile_bf16<1>(p, alpha + r, vp, DA, o + r * ldo, ldo); break;
    }
  }
}

// One tile of mt <= QTILE queries over a packed block: s = scale·Q·Kᵀ where bit j of
// allow[r] is set (else -inf), the online-softmax update of m, l, and
// O = O·e^(m_old − m_new) + P·V with P rounded to bf16 (as the GPU kernels' p.to(v.dtype)).
inline void attend_packed_tile(int mt, const uint32_t* q2, int64_t ldq, int P, const uint32_t* kp,
                               const uint32_t* vp, int DA, const uint64_t* allow, float scale, float* m, float* l,
                               float* o, int64_t ldo) {
  alignas(64) float s[QTILE * PACK];
  alignas(64) uint32_t p2[QTILE * PACK / 2];
  float alpha[QTILE];
  qk_tile_any(mt, q2, ldq, kp, P, s);
  const __m512 vscale = _mm512_set1_ps(scale), vneg = _mm512_set1_ps(NEG_INF);
  for (int r = 0; r < mt; ++r) {
    const float* sr = s + r * PACK;
    __m512 x[PACK / 16];
    __mmask16 k[PACK / 16];
    __m512 mx = _mm512_set1_ps(m[r]);
    for (int c = 0; c < PACK / 16; ++c) {
      k[c] = __mmask16(allow[r] >> (16 * c));
      x[c] = _mm512_mask_mul_ps(vneg, k[c], _mm512_loadu_ps(sr + 16 * c), vscale);
      mx = _mm512_max_ps(mx, x[c]);
    }
    const float mnew = _mm512_reduce_max_ps(mx);
    if (mnew == NEG_INF) {  // nothing visible yet: O, l stay 0
      alpha[r] = 1.f;
      std::memset(p2 + r * (PACK / 2), 0, sizeof(uint32_t) * (PACK / 2));
      continue;
    }
    alpha[r] = m[r] == NEG_INF ? 0.f : exp_nonpositive(m[r] - mnew);
    const __m512 vm = _mm512_set1_ps(mnew);
    __m512 sum = _mm512_setzero_ps();
    for (int c = 0; c < PACK / 16; ++c) {
      x[c] = _mm512_maskz_mov_ps(k[c], exp_nonpositive_ps(_mm512_sub_ps(x[c], vm)));  // masked keys: 0
      sum = _mm512_add_ps(sum, x[c]);
    }
    for (int c = 0; c < PACK / 16; c += 2)
      _mm512_storeu_si512(p2 + r * (PACK / 2) + 8 * c, (__m512i)_mm512_cvtne2ps_pbh(x[c + 1], x[c]));
    l[r] = l[r] * alpha[r] + _mm512_reduce_add_ps(sum);
    m[r] = mnew;
  }
  pv_tile_any(mt, p2, alpha, vp, DA, o, ldo);
}
#endif  // AVX512BF16

// ---------------------------------------------------------------------------- plan, units, merge

// out[N, Hq, D] = Σ_p softmax_p(sm_scale · q·K[p]) · V[p] over each token's keys in the paged
// cache; out contiguous.
//
// Tree mode (chunk_ids == null): token t is tree node rows[t] (rows == null: node t) of
// request b (cu_nodes[b] <= node < cu_nodes[b+1], n_b nodes); it sees the request's first
// seq_lens[b] − n_b keys and the tree keys seq_lens[b] − n_b + j whose bit j is set in its
// row of tree_mask[·, mask_words] (itself and its ancestors). The tokens of a request are
// scored together, so its keys are read once per KV head whatever the tree's size.
// Sparse mode (chunk_ids [B, Hkv, n_ids] int32, one token per request, N == B): token b sees,
// per KV head, the chunks c of its row with 0 <= c < F_b = seq_lens[b] / chunk_size (others
// and -1 skipped; a repeated id counts twice) and the tail F_b·chunk_size .. seq_lens[b] − 1;
// no key at all gives 0.
// Work units are (request, KV head, a range of its key list), merged by log-sum-exp. The
// ranges depend only on the shapes and lengths (never on the thread count), and each unit
// is summed in key order by one thread: the result is the same for any number of threads.
template <typename T>
void paged_attention(const PagedAttention& a, const T* q, const T* k_cache, const T* v_cache, T* out) {
  const int Hq = a.Hq, Hkv = a.Hkv, D = a.D;
  const int64_t N = a.N, B = a.B;
  if (N <= 0 || Hkv <= 0 || D <= 0) return;
  const int G = Hq / Hkv;
  const int DA = (D + 15) / 16 * 16;  // row length of the fp32 accumulators
  const bool sparse = a.chunk_ids != nullptr;
  const int64_t capacity = a.bt_cols * a.page_size;  // positions the block table can name
#if defined(FASTVERIFY_BF16_DOT)
  constexpr bool packed = std::is_same<T, bf16>::value;
#else
  constexpr bool packed = false;
#endif
  const int KB = packed ? PACK : BLOCK;  // keys per block
  const int cs = a.chunk_size;

  // groups: the tokens of one request (their key list is the request's), as (request, tokens)
  std::vector<int64_t> node(N), group_req, group_first(1, 0), group_tok;
  if (B <= 0) {
    std::memset(out, 0, sizeof(T) * N * Hq * D);
    return;
  }
  {
    std::vector<std::vector<int64_t>> of_req(B);
    for (int64_t t = 0; t < N; ++t) {
      int64_t b = std::min<int64_t>(t, B - 1), nd = 0;
      if (!sparse) {
        nd = a.rows ? a.rows[t] : t;
        int64_t lo = 0, hi = B - 1;  // the request whose node range holds nd
        while (lo < hi) {
          const int64_t mid = (lo + hi + 1) / 2;
          if (a.cu_nodes[mid] <= nd) lo = mid; else hi = mid - 1;
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
  const int64_t n_groups = int64_t(group_req.size()), n_lists = n_groups * Hkv;
  // key list length per (group, KV head); sparse: its usable chunk ids, then the tail
  std::vector<int64_t> n_keys(n_lists), n_valid(n_lists, 0);
  std::vector<int32_t> valid(sparse ? n_lists * std::max<int64_t>(a.n_ids, 1) : 0);
  int64_t longest = 0;
  for (int64_t gi = 0; gi < n_groups; ++gi) {
    const int64_t b = group_req[gi], L = std::min<int64_t>(a.seq_lens[b], capacity);
    for (int h = 0; h < Hkv; ++h) {
      int64_t keys = std::max<int64_t>(L, 0);
      if (sparse) {
        const int64_t full = a.seq_lens[b] > 0 ? a.seq_lens[b] / cs : 0;
        const int32_t* ids = a.chunk_ids + (b * Hkv + h) * a.n_ids;
        int32_t* keep = valid.data() + (gi * Hkv + h) * a.n_ids;
        int64_t nv = 0;
        for (int64_t i = 0; i < a.n_ids; ++i)
          if (ids[i] >= 0 && ids[i] < full && int64_t(ids[i]) * cs < capacity) keep[nv++] = ids[i];
        n_valid[gi * Hkv + h] = nv;
        keys = nv * cs + std::max<int64_t>(0, L - full * cs);
      }
      n_keys[gi * Hkv + h] = keys;
      longest = std::max(longest, keys);
    }
  }
  // keys per work unit (a multiple of 64): about 16 units in all (enough to balance the
  // threads of a small CPU; each unit costs its setup and a merge), 64 .. 16384 keys each;
  // num_splits: that many per longest list
  int64_t split;
  if (a.num_splits > 0) {
    split = std::max<int64_t>(1, (longest + a.num_splits - 1) / a.num_splits);
  } else {
    int64_t total = 0;
    for (int64_t keys : n_keys) total += keys;
    split = std::min<int64_t>(16384, std::max<int64_t>(64, (total + 15) / 16));
  }
  split = (split + PACK - 1) / PACK * PACK;
  std::vector<int64_t> first_unit(n_lists + 1, 0), first_q(n_lists + 1, 0);
  for (int64_t i = 0; i < n_lists; ++i) {
    const int64_t gi = i / Hkv, nq = (group_first[gi + 1] - group_first[gi]) * G;
    const int64_t units = std::max<int64_t>(1, (n_keys[i] + split - 1) / split);
    first_unit[i + 1] = first_unit[i] + units;
    first_q[i + 1] = first_q[i] + units * nq;  // each unit keeps state for every query of its group
  }
  const int64_t units = first_unit[n_lists];
  const int64_t states = first_q[n_lists];
  std::vector<float> part_m(states, NEG_INF), part_l(states, 0.f), part_acc(states * DA, 0.f);
  // queries: fp32, pre-scaled (row-wise path) or bf16 pairs, unscaled (packed path)
  const int P = (D + 1) / 2;
  std::vector<float> qs(packed ? 0 : N * Hq * int64_t(D));
  std::vector<uint32_t> q2(packed ? N * Hq * int64_t(P) : 0);
  for (int64_t t = 0; t < N; ++t)
    for (int hq = 0; hq < Hq; ++hq) {
      const T* src = q + t * a.q_tok + hq * a.q_head;
      if (packed) {
        uint16_t* dst = reinterpret_cast<uint16_t*>(q2.data() + (t * Hq + hq) * P);
        std::memcpy(dst, src, sizeof(T) * D);
        if (D & 1) dst[D] = 0;
      } else {
        float* dst = qs.data() + (t * Hq + hq) * D;
        for (int i = 0; i < D; ++i) dst[i] = to_float(src[i]) * a.sm_scale;
      }
    }

#pragma omp parallel for num_threads(a.threads) schedule(dynamic, 1)
  for (int64_t u = 0; u < units; ++u) {
    int64_t lo = 0, hi = n_lists - 1;  // which (group, KV head)
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (first_unit[mid] <= u) lo = mid; else hi = mid - 1;
    }
    const int64_t gi = lo / Hkv;
    const int h = int(lo % Hkv);
    const int64_t b = group_req[gi], L = a.seq_lens[b];
    const int64_t* toks = group_tok.data() + group_first[gi];
    const int nt = int(group_first[gi + 1] - group_first[gi]);
    const int nq = nt * G;
    const int64_t k0 = (u - first_unit[lo]) * split;
    const int64_t k1 = std::min<int64_t>(k0 + split, n_keys[lo]);
    const int64_t state = first_q[lo] + (u - first_unit[lo]) * nq;
    float* m = part_m.data() + state;
    float* l = part_l.data() + state;
    float* acc = part_acc.data() + state * DA;
    const int32_t* pages = a.block_table + b * a.bt_stride;
    const int64_t prefix = sparse ? L : L - (a.cu_nodes[b + 1] - a.cu_nodes[b]);
    const int64_t nv = n_valid[lo];
    const int32_t* keep = sparse ? valid.data() + lo * a.n_ids : nullptr;
    const int64_t tail = sparse ? (L > 0 ? L / cs : 0) * cs : 0;
    // rows of the keys k .. k+n-1 of the list (null: no key)
    auto locate = [&](int64_t k, int n, const T** kp, const T** vp) {
      for (int j = 0; j < KB; ++j) {
        kp[j] = vp[j] = nullptr;
        if (j >= n) continue;
        const int64_t i = k + j;  // the i-th key of the list, at position p
        const int64_t p = !sparse ? i : i < nv * cs ? int64_t(keep[i / cs]) * cs + i % cs : tail + (i - nv * cs);
        if (p < 0 || p >= capacity) continue;
        const int64_t page = pages[p / a.page_size], slot = p % a.page_size;
        if (page < 0 || page >= a.num_pages) continue;
        kp[j] = k_cache + page * a.k_page + slot * a.k_slot + h * a.k_head;
        vp[j] = v_cache + page * a.v_page + slot * a.v_slot + h * a.v_head;
      }
    };
    // bit j of vis[ti]: token ti sees key k + j (prefix keys: every token; tree keys: its
    // mask bits; no key: none)
    std::vector<uint64_t> vis(nt);
    auto visibility = [&](int64_t k, int n, const T* const* kp) {
      uint64_t there = 0;
      for (int j = 0; j < n; ++j) there |= uint64_t(kp[j] != nullptr) << j;
      for (int ti = 0; ti < nt; ++ti) vis[ti] = there;
      if (sparse || k + n <= prefix) return;
      for (int ti = 0; ti < nt; ++ti) {
        const int64_t* mask = a.tree_mask + node[toks[ti]] * a.mask_words;
        uint64_t bits = 0;
        for (int j = 0; j < n; ++j) {
          const int64_t jt = k + j - prefix;
          const bool see = jt < 0 || (jt < 64 * a.mask_words && ((mask[jt >> 6] >> (jt & 63)) & 1));
          bits |= uint64_t(see) << j;
        }
        vis[ti] &= bits;
      }
    };
    // bf16 path: the first line of each row is loaded, not prefetched: rows of a sparse list
    // sit on scattered 4 KiB pages, and a load (unlike a prefetch) also fills the TLB
    // (measured: 7% on the sparse goal shape; not worth it for the fp32 decode step)
    auto prefetch = [&](const T* const* kp, const T* const* vp, int n) {
      unsigned sink = 0;
      for (int j = 0; j < n; ++j)
        if (kp[j]) {
          int i = 0;
          if constexpr (packed) {
            sink += *reinterpret_cast<const volatile unsigned char*>(kp[j]);
            sink += *reinterpret_cast<const volatile unsigned char*>(vp[j]);
            i = 64;
          }
          for (; i < D * int(sizeof(T)); i += 64) {
            __builtin_prefetch(reinterpret_cast<const char*>(kp[j]) + i);
            __builtin_prefetch(reinterpret_cast<const char*>(vp[j]) + i);
          }
        }
      asm volatile("" : : "r"(sink));
    };
    // Keys are rows far apart (a model's cache keeps all layers of a slot together), so
    // each is a cache miss: the next block's rows are located and prefetched while this
    // one is scored.
    const T* kp[2][PACK];
    const T* vp[2][PACK];
    int cur = 0;
    locate(k0, int(std::min<int64_t>(KB, k1 - k0)), kp[0], vp[0]);
    if constexpr (packed) {
#if defined(FASTVERIFY_BF16_DOT)
      std::vector<uint32_t> qu(int64_t(nq) * P), kpk(int64_t(P) * PACK), vpk(int64_t(PACK / 2) * DA);
      for (int ti = 0; ti < nt; ++ti)
        for (int g = 0; g < G; ++g)
          std::memcpy(qu.data() + int64_t(ti * G + g) * P, q2.data() + (toks[ti] * Hq + int64_t(h) * G + g) * P,
                      sizeof(uint32_t) * P);
      std::vector<uint64_t> allow(nq);
      for (int64_t k = k0; k < k1; k += KB) {
        const int n = int(std::min<int64_t>(KB, k1 - k));
        if (k + KB < k1) {
          locate(k + KB, int(std::min<int64_t>(KB, k1 - k - KB)), kp[cur ^ 1], vp[cur ^ 1]);
          prefetch(kp[cur ^ 1], vp[cur ^ 1], KB);
        }
        visibility(k, n, kp[cur]);
        pack_k_bf16(reinterpret_cast<const bf16* const*>(kp[cur]), D, kpk.data());
        pack_v_bf16(reinterpret_cast<const bf16* const*>(vp[cur]), D, DA, vpk.data());
        for (int r = 0; r < nq; ++r) allow[r] = vis[r / G];
        for (int r0 = 0; r0 < nq; r0 += QTILE) {
          const int mt = std::min(QTILE, nq - r0);
          attend_packed_tile(mt, qu.data() + int64_t(r0) * P, P, P, kpk.data(), vpk.data(), DA, allow.data() + r0,
                             a.sm_scale, m + r0, l + r0, acc + int64_t(r0) * DA, DA);
        }
        cur ^= 1;
      }
#endif
    } else {
      std::vector<const float*> qv(nq);
      for (int ti = 0; ti < nt; ++ti)
        for (int g = 0; g < G; ++g) qv[ti * G + g] = qs.data() + (toks[ti] * Hq + int64_t(h) * G + g) * D;
      std::vector<float> scores(int64_t(nq) * 64);
      // 16-bit rows are widened into these before scoring
      std::vector<float> kf(std::is_same<T, float>::value ? 0 : BLOCK * D), vf(kf.size());
      const float* kr[BLOCK];
      const float* vr[BLOCK];
      for (int64_t k = k0; k < k1; k += KB) {
        const int n = int(std::min<int64_t>(KB, k1 - k));
        if (k + KB < k1) {
          locate(k + KB, int(std::min<int64_t>(KB, k1 - k - KB)), kp[cur ^ 1], vp[cur ^ 1]);
          prefetch(kp[cur ^ 1], vp[cur ^ 1], KB);
        }
        visibility(k, n, kp[cur]);
        for (int j = 0; j < n; ++j) {
          if constexpr (std::is_same<T, float>::value) {
            kr[j] = kp[cur][j];
            vr[j] = vp[cur][j];
          } else {
            kr[j] = vr[j] = nullptr;
            if (!kp[cur][j]) continue;
            float* kd = kf.data() + j * D;
            float* vd = vf.data() + j * D;
            for (int i = 0; i < D; ++i) kd[i] = to_float(kp[cur][j][i]);
            for (int i = 0; i < D; ++i) vd[i] = to_float(vp[cur][j][i]);
            kr[j] = kd;
            vr[j] = vd;
          }
        }
        attend_rows(qv.data(), nq, G, D, kr, vr, vis.data(), n, m, l, acc, DA, scores.data());
        cur ^= 1;
      }
    }
  }

  // log-sum-exp merge of each (token, query head)'s units:
  //   M = max_u m_u,  out = Σ_u e^(m_u − M)·acc_u / Σ_u e^(m_u − M)·l_u   (0 where no key at all)
  // (in parallel only when there is enough to merge: a fork costs more than a small merge)
#pragma omp parallel for num_threads(a.threads) schedule(static) if (states * DA > (1 << 16))
  for (int64_t gi = 0; gi < n_groups; ++gi) {
    const int nt = int(group_first[gi + 1] - group_first[gi]);
    std::vector<float> o(D);
    for (int ti = 0; ti < nt; ++ti) {
      const int64_t t = group_tok[group_first[gi] + ti];
      for (int hq = 0; hq < Hq; ++hq) {
        const int64_t lo = gi * Hkv + hq / G;
        const int64_t nq = int64_t(nt) * G, qi = int64_t(ti) * G + hq % G;
        T* dst = out + (t * Hq + hq) * D;
        std::fill(o.begin(), o.end(), 0.f);
        float mx = NEG_INF;
        for (int64_t u = 0; u < first_unit[lo + 1] - first_unit[lo]; ++u)
          mx = std::max(mx, part_m[first_q[lo] + u * nq + qi]);
        if (mx != NEG_INF) {
          float sum = 0.f;
          for (int64_t u = 0; u < first_unit[lo + 1] - first_unit[lo]; ++u) {
            const int64_t st = first_q[lo] + u * nq + qi;
            if (part_m[st] == NEG_INF) continue;
            const float w = std::exp(part_m[st] - mx);
            sum += w * part_l[st];
            const float* pa = part_acc.data() + st * DA;
            for (int i = 0; i < D; ++i) o[i] += w * pa[i];
          }
          const float inv = 1.f / sum;
          for (int i = 0; i < D; ++i) o[i] *= inv;
        }
        for (int i = 0; i < D; ++i) dst[i] = from_float<T>(o[i]);
      }
    }
  }
}

// Runs paged_attention on the element type named by a Dtype code (q, caches and out share it)
inline int paged_attention_dtype(int dtype, const PagedAttention& a, const void* q, const void* k, const void* v,
                                 void* out) {
  switch (dtype) {
    case DTYPE_F32:
      paged_attention<float>(a, static_cast<const float*>(q), static_cast<const float*>(k),
                             static_cast<const float*>(v), static_cast<float*>(out));
      return 0;
    case DTYPE_BF16:
      paged_attention<bf16>(a, static_cast<const bf16*>(q), static_cast<const bf16*>(k), static_cast<const bf16*>(v),
                            static_cast<bf16*>(out));
      return 0;
    case DTYPE_F16:
      paged_attention<fp16>(a, static_cast<const fp16*>(q), static_cast<const fp16*>(k), static_cast<const fp16*>(v),
                            static_cast<fp16*>(out));
      return 0;
  }
  return 1;
}

}  // namespace
