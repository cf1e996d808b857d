// Projections on GGUF quantized weights kept in their ggml blocks (Q4_0, Q4_1, Q8_0, Q4_K,
// Q6_K): y[M, N] = prologue(x)[M, K] · W[N, K]ᵀ (+ bias) (+ residual), the semantics of
// linear.h's linear_f32, and the dequantization of selected rows (embedding lookups).
//
// Technique (llama.cpp's): each input row is quantized once per call to int8 per block of
// 32 values (d_x = max|x| / 127, q = round(x / d_x)), so a weight block meets the input in an
// exact integer dot product (AVX-512 VNNI vpdpbusd: unsigned weight bytes × signed input
// bytes; AVX2 vpmaddubsw + vpmaddwd; plain C++ otherwise). The weight's zero point enters
// through the input's block sums: as an integer bias for Q4_0 (−8), Q6_K (−32) and Q8_0 on
// VNNI (its bytes + 128), as a float term min · d_x · Σq for Q4_1 and Q4_K.
//
// Layout: a row is cut into chunks of 64 values (two 32-value blocks; a quarter of a
// K-quant superblock). A chunk of weights unpacks to 64 bytes in the natural value order,
// 16 lanes of scales (lane l covers values 4l .. 4l+3) and, for formats with a min, 16 lanes
// of mins; the input chunk holds its 64 int8 values and lane vectors of the same shape.
// Lane l of an output's 16-lane float accumulator sums, chunk after chunk,
//     float(Σ_{4 values of lane l} w·q + bias_l) · (w_scale_l · d_x,l)   (+ w_min_l · xs_l)
// by fused multiply-adds, then one fixed pairwise tree (lanes j + 8, + 4, + 2, + 1) reduces
// the lanes. Every output is computed this way whatever M is, whichever rows share its tile,
// whichever thread runs it: a row's result has the same bits alone or among many rows. The
// integer dots are exact and the AVX2 path does the same float operations as the AVX-512
// one (same bits); the portable path has no FMA (its own bits).
#pragma once

#include "common.h"

namespace {

enum QuantType { QUANT_Q4_0 = 2, QUANT_Q4_1 = 3, QUANT_Q8_0 = 8, QUANT_Q4_K = 12, QUANT_Q6_K = 14 };

struct QuantFormat {
  int block_size;   // values per block
  int block_bytes;  // bytes per block
};

// false for a type without kernels here
inline bool quant_format(int wtype, QuantFormat& f) {
  switch (wtype) {
    case QUANT_Q4_0: f = {32, 18}; return true;
    case QUANT_Q4_1: f = {32, 20}; return true;
    case QUANT_Q8_0: f = {32, 34}; return true;
    case QUANT_Q4_K: f = {256, 144}; return true;
    case QUANT_Q6_K: f = {256, 210}; return true;
    default: return false;
  }
}

inline float f16_at(const uint8_t* p) {
  fp16 h;
  std::memcpy(&h.bits, p, 2);
  return to_float(h);
}

// x, with the compiler barred from fusing the product that made it into a following add
// (GCC contracts a·b + c into an FMA in C++ at -O3): the dequantizers must round as numpy.
inline float rounded(float x) {
#if defined(__x86_64__) || defined(__i386__)
  asm("" : "+x"(x));
#else
  volatile float v = x;
  x = v;
#endif
  return x;
}

// Q4_K's 6-bit scale and min of sub-block j (0..7) from the 12 packed bytes
inline void q4_k_scale_min(const uint8_t* s, int j, int& sc, int& m) {
  if (j < 4) {
    sc = s[j] & 63;
    m = s[j + 4] & 63;
  } else {
    sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
    m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// ---------------------------------------------------------------------------- dequantization

// out[0 .. K) = the K values of one weight row, in the float operations of ggml's reference
// dequantizers (and of fastverify/models/gguf.py): d·q, d·(q − 8), d·q + m, (d·sc)·q − (dmin·m),
// (q − 32)·(d·s).
inline void dequantize_row(const uint8_t* row, int wtype, int64_t K, float* out) {
  QuantFormat f{};
  quant_format(wtype, f);
  const int64_t blocks = K / f.block_size;
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* blk = row + b * f.block_bytes;
    float* o = out + b * f.block_size;
    switch (wtype) {
      case QUANT_Q4_0: {
        const float d = f16_at(blk);
        for (int i = 0; i < 16; ++i) {
          o[i] = (float(blk[2 + i] & 15) - 8.f) * d;
          o[i + 16] = (float(blk[2 + i] >> 4) - 8.f) * d;
        }
        break;
      }
      case QUANT_Q4_1: {
        const float d = f16_at(blk), m = f16_at(blk + 2);
        for (int i = 0; i < 16; ++i) {
          o[i] = rounded(float(blk[4 + i] & 15) * d) + m;
          o[i + 16] = rounded(float(blk[4 + i] >> 4) * d) + m;
        }
        break;
      }
      case QUANT_Q8_0: {
        const float d = f16_at(blk);
        for (int i = 0; i < 32; ++i) o[i] = float(int8_t(blk[2 + i])) * d;
        break;
      }
      case QUANT_Q4_K: {
        const float d = f16_at(blk), dmin = f16_at(blk + 2);
        for (int j = 0; j < 8; ++j) {
          int sc, m;
          q4_k_scale_min(blk + 4, j, sc, m);
          const float scale = d * float(sc), min = dmin * float(m);
          const uint8_t* qs = blk + 16 + 32 * (j / 2);
          const int shift = 4 * (j % 2);
          for (int i = 0; i < 32; ++i) o[32 * j + i] = rounded(float((qs[i] >> shift) & 15) * scale) - min;
        }
        break;
      }
      case QUANT_Q6_K: {
        const float d = f16_at(blk + 208);
        const int8_t* scales = reinterpret_cast<const int8_t*>(blk + 192);
        for (int h = 0; h < 2; ++h) {
          const uint8_t* ql = blk + 64 * h;
          const uint8_t* qh = blk + 128 + 32 * h;
          for (int l = 0; l < 32; ++l) {
            const int q[4] = {(ql[l] & 15) | ((qh[l] >> 0) & 3) << 4, (ql[l + 32] & 15) | ((qh[l] >> 2) & 3) << 4,
                              (ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4, (ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4};
            for (int p = 0; p < 4; ++p) {
              const int idx = 128 * h + 32 * p + l;
              o[idx] = (float(q[p]) - 32.f) * (d * float(scales[idx / 16]));
            }
          }
        }
        break;
      }
    }
  }
}

// ---------------------------------------------------------------------------- quantized inputs

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define FASTVERIFY_QUANT_VNNI 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define FASTVERIFY_QUANT_AVX2 1
#endif

constexpr int QCHUNK = 64;  // values per chunk

// One chunk of 64 input values quantized for the dot products (lanes of 4 values).
struct alignas(64) InputChunk {
  int8_t q[QCHUNK];  // round(x / d_x) of the block's scale, in [-127, 127]
  int32_t bias[16];  // lane 4j: −zero_point · Σ q over values 16j .. 16j+15; other lanes 0
  float dx[16];      // lane l: d_x of the 32-value block holding values 4l .. 4l+3
  float xs[16];      // lane 8h: d_x · Σ q of block h (the min term's input); other lanes 0
};

// The integer zero point the dot products subtract (times the input sums) for each format:
// its unsigned weight bytes are q + zero_point.
constexpr int zero_point(int wtype) {
#if defined(FASTVERIFY_QUANT_VNNI)
  return wtype == QUANT_Q4_0 ? 8 : wtype == QUANT_Q6_K ? 32 : wtype == QUANT_Q8_0 ? 128 : 0;
#else  // AVX2 and plain C++ multiply Q8_0's signed bytes as they are
  return wtype == QUANT_Q4_0 ? 8 : wtype == QUANT_Q6_K ? 32 : 0;
#endif
}

// The chunks of one input row of K values (K a multiple of 32; a last half chunk is zero
// padded, scales 0).
inline void quantize_row(const float* __restrict__ x, int64_t K, int zp, InputChunk* __restrict__ out) {
  const int64_t chunks = (K + QCHUNK - 1) / QCHUNK;
  for (int64_t c = 0; c < chunks; ++c) {
    InputChunk& ch = out[c];
    std::memset(&ch, 0, sizeof ch);
    for (int h = 0; h < 2; ++h) {
      const int64_t k0 = c * QCHUNK + 32 * h;
      if (k0 >= K) break;
      const float* xb = x + k0;
      int8_t* q = ch.q + 32 * h;
      float amax = 0.f;
      for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(xb[i]));
      const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
#if defined(__AVX2__)
      for (int i = 0; i < 32; i += 8) {  // round half to even, as nearbyint
        const __m256i r = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + i), _mm256_set1_ps(id)));
        const __m256i c127 = _mm256_min_epi32(_mm256_max_epi32(r, _mm256_set1_epi32(-127)), _mm256_set1_epi32(127));
        alignas(32) int32_t v[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(v), c127);
        for (int j = 0; j < 8; ++j) q[i + j] = int8_t(v[j]);
      }
#else
      for (int i = 0; i < 32; ++i) q[i] = int8_t(std::min(127.f, std::max(-127.f, std::nearbyint(xb[i] * id))));
#endif
      int sum32 = 0;
      for (int j = 0; j < 2; ++j) {
        int s = 0;
        for (int i = 0; i < 16; ++i) s += q[16 * j + i];
        ch.bias[8 * h + 4 * j] = -zp * s;
        sum32 += s;
      }
      for (int l = 0; l < 8; ++l) ch.dx[8 * h + l] = d;
      ch.xs[8 * h] = d * float(sum32);
    }
  }
}

// ---------------------------------------------------------------------------- weight chunks
//
// unpack<wtype>(row, c, half): chunk c of a weight row as 64 bytes in value order, scales and
// mins per lane (half: only the first 32-value block of the chunk exists; the rest is zero).

template <int wtype>
constexpr bool has_min() {
  return wtype == QUANT_Q4_1 || wtype == QUANT_Q4_K;
}

#if defined(FASTVERIFY_QUANT_VNNI)
struct WeightChunk {
  __m512i w;
  __m512 scale, min;
};

// [a ×8 | b ×8]
inline __m512 halves(float a, float b) {
  return _mm512_insertf32x8(_mm512_set1_ps(a), _mm256_set1_ps(b), 1);
}

template <int wtype>
inline WeightChunk unpack(const uint8_t* __restrict__ row, int64_t c, bool half) {
  WeightChunk wc;
  if constexpr (wtype == QUANT_Q4_0 || wtype == QUANT_Q4_1) {
    constexpr int bytes = wtype == QUANT_Q4_0 ? 18 : 20, qoff = wtype == QUANT_Q4_0 ? 2 : 4;
    const uint8_t* b0 = row + 2 * c * bytes;
    const uint8_t* b1 = b0 + bytes;
    const __m128i q0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b0 + qoff));
    const __m128i q1 = half ? _mm_setzero_si128() : _mm_loadu_si128(reinterpret_cast<const __m128i*>(b1 + qoff));
    // [q0 | q0 | q1 | q1], the second and fourth quarters shifted to their high nibbles
    __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set_m128i(q0, q0)), _mm256_set_m128i(q1, q1), 1);
    v = _mm512_mask_srli_epi16(v, __mmask32(0xFF00FF00u), v, 4);
    wc.w = _mm512_and_si512(v, _mm512_set1_epi8(15));
    const float d0 = f16_at(b0), d1 = half ? 0.f : f16_at(b1);
    wc.scale = halves(d0, d1);
    if constexpr (wtype == QUANT_Q4_1) wc.min = halves(f16_at(b0 + 2), half ? 0.f : f16_at(b1 + 2));
  } else if constexpr (wtype == QUANT_Q8_0) {
    const uint8_t* b0 = row + 2 * c * 34;
    const uint8_t* b1 = b0 + 34;
    const __m256i q0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b0 + 2));
    const __m256i q1 = half ? _mm256_setzero_si256() : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b1 + 2));
    // signed bytes + 128 as unsigned (the input sums take the 128 back)
    wc.w = _mm512_xor_si512(_mm512_inserti64x4(_mm512_castsi256_si512(q0), q1, 1), _mm512_set1_epi8(char(0x80)));
    wc.scale = halves(f16_at(b0), half ? 0.f : f16_at(b1));
  } else if constexpr (wtype == QUANT_Q4_K) {
    const uint8_t* blk = row + (c / 4) * 144;
    const int cc = int(c % 4);
    const __m256i qs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16 + 32 * cc));
    const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(qs), _mm256_srli_epi16(qs, 4), 1);
    wc.w = _mm512_and_si512(v, _mm512_set1_epi8(15));
    const float d = f16_at(blk), dmin = f16_at(blk + 2);
    int sc0, m0, sc1, m1;
    q4_k_scale_min(blk + 4, 2 * cc, sc0, m0);
    q4_k_scale_min(blk + 4, 2 * cc + 1, sc1, m1);
    wc.scale = halves(d * float(sc0), d * float(sc1));
    wc.min = halves(-(dmin * float(m0)), -(dmin * float(m1)));
  } else {  // Q6_K
    const uint8_t* blk = row + (c / 4) * 210;
    const int h = int(c % 4) / 2, p = int(c % 2);
    const __m512i ql = _mm512_loadu_si512(blk + 64 * h);
    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 128 + 32 * h));
    // [qh | qh >> 2]: bits 0-1 (p = 0) or 4-5 (p = 1) are the high bits of values 0-31 | 32-63
    const __m512i qh2 = _mm512_inserti64x4(_mm512_castsi256_si512(qh), _mm256_srli_epi16(qh, 2), 1);
    const __m512i lo = p ? _mm512_srli_epi16(ql, 4) : ql;
    const __m512i hi = p ? _mm512_srli_epi16(qh2, 4) : qh2;
    wc.w = _mm512_or_si512(_mm512_and_si512(lo, _mm512_set1_epi8(15)),
                           _mm512_slli_epi16(_mm512_and_si512(hi, _mm512_set1_epi8(3)), 4));
    const float d = f16_at(blk + 208);
    int32_t s4;
    std::memcpy(&s4, blk + 192 + 8 * h + 4 * p, 4);
    const __m128 s = _mm_mul_ps(_mm_cvtepi32_ps(_mm_cvtepi8_epi32(_mm_cvtsi32_si128(s4))), _mm_set1_ps(d));
    const __m512i quarter = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    wc.scale = _mm512_permutexvar_ps(quarter, _mm512_castps128_ps512(s));
  }
  return wc;
}

// acc += the chunk's terms against one input chunk
template <int wtype>
inline __m512 chunk_dot(const WeightChunk& wc, const InputChunk& x, __m512 acc) {
  const __m512i dot = _mm512_dpbusd_epi32(_mm512_load_si512(x.bias), wc.w, _mm512_load_si512(x.q));
  acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(wc.scale, _mm512_load_ps(x.dx)), acc);
  if constexpr (has_min<wtype>()) acc = _mm512_fmadd_ps(wc.min, _mm512_load_ps(x.xs), acc);
  return acc;
}

using Acc = __m512;
inline Acc acc_zero() { return _mm512_setzero_ps(); }
// the fixed tree: lanes j + 8, then + 4, + 2, + 1
inline float acc_sum(Acc a) {
  const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  const __m128 s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
  return _mm_cvtss_f32(s1);
}

#elif defined(FASTVERIFY_QUANT_AVX2)
// the chunk as two 32-value halves
struct WeightChunk {
  __m256i w[2];
  __m256 scale[2], min[2];
};

template <int wtype>
inline WeightChunk unpack(const uint8_t* __restrict__ row, int64_t c, bool half) {
  WeightChunk wc;
  const __m256i nib = _mm256_set1_epi8(15);
  if constexpr (wtype == QUANT_Q4_0 || wtype == QUANT_Q4_1) {
    constexpr int bytes = wtype == QUANT_Q4_0 ? 18 : 20, qoff = wtype == QUANT_Q4_0 ? 2 : 4;
    const uint8_t* b[2] = {row + 2 * c * bytes, row + (2 * c + 1) * bytes};
    for (int h = 0; h < 2; ++h) {
      const bool there = h == 0 || !half;
      const __m128i q = there ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(b[h] + qoff)) : _mm_setzero_si128();
      wc.w[h] = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), nib);
      wc.scale[h] = _mm256_set1_ps(there ? f16_at(b[h]) : 0.f);
      if constexpr (wtype == QUANT_Q4_1) wc.min[h] = _mm256_set1_ps(there ? f16_at(b[h] + 2) : 0.f);
    }
  } else if constexpr (wtype == QUANT_Q8_0) {
    for (int h = 0; h < 2; ++h) {
      const uint8_t* b = row + (2 * c + h) * 34;
      const bool there = h == 0 || !half;
      wc.w[h] = there ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 2)) : _mm256_setzero_si256();
      wc.scale[h] = _mm256_set1_ps(there ? f16_at(b) : 0.f);
    }
  } else if constexpr (wtype == QUANT_Q4_K) {
    const uint8_t* blk = row + (c / 4) * 144;
    const int cc = int(c % 4);
    const __m256i qs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16 + 32 * cc));
    wc.w[0] = _mm256_and_si256(qs, nib);
    wc.w[1] = _mm256_and_si256(_mm256_srli_epi16(qs, 4), nib);
    const float d = f16_at(blk), dmin = f16_at(blk + 2);
    for (int h = 0; h < 2; ++h) {
      int sc, m;
      q4_k_scale_min(blk + 4, 2 * cc + h, sc, m);
      wc.scale[h] = _mm256_set1_ps(d * float(sc));
      wc.min[h] = _mm256_set1_ps(-(dmin * float(m)));
    }
  } else {  // Q6_K
    const uint8_t* blk = row + (c / 4) * 210;
    const int h = int(c % 4) / 2, p = int(c % 2);
    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 128 + 32 * h));
    const float d = f16_at(blk + 208);
    const int8_t* scales = reinterpret_cast<const int8_t*>(blk + 192 + 8 * h + 4 * p);
    for (int g = 0; g < 2; ++g) {  // values 32g .. 32g+31 of the chunk
      const __m256i ql = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 64 * h + 32 * g));
      const __m256i lo = _mm256_and_si256(p ? _mm256_srli_epi16(ql, 4) : ql, nib);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(qh, 4 * p + 2 * g), _mm256_set1_epi8(3));
      wc.w[g] = _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));
      wc.scale[g] = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_set1_ps(d * float(scales[2 * g]))),
                                         _mm_set1_ps(d * float(scales[2 * g + 1])), 1);
    }
  }
  return wc;
}

struct Acc {
  __m256 h[2];
};
inline Acc acc_zero() { return {{_mm256_setzero_ps(), _mm256_setzero_ps()}}; }

template <int wtype>
inline Acc chunk_dot(const WeightChunk& wc, const InputChunk& x, Acc acc) {
  const __m256i ones = _mm256_set1_epi16(1);
  for (int h = 0; h < 2; ++h) {
    const __m256i xq = _mm256_load_si256(reinterpret_cast<const __m256i*>(x.q + 32 * h));
    __m256i prod;
    if constexpr (wtype == QUANT_Q8_0) {  // |w| · (x · sign w): unsigned × signed without saturation
      prod = _mm256_maddubs_epi16(_mm256_sign_epi8(wc.w[h], wc.w[h]), _mm256_sign_epi8(xq, wc.w[h]));
    } else {
      prod = _mm256_maddubs_epi16(wc.w[h], xq);
    }
    const __m256i dot = _mm256_add_epi32(_mm256_madd_epi16(prod, ones),
                                         _mm256_load_si256(reinterpret_cast<const __m256i*>(x.bias + 8 * h)));
    acc.h[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(wc.scale[h], _mm256_load_ps(x.dx + 8 * h)),
                               acc.h[h]);
    if constexpr (has_min<wtype>()) acc.h[h] = _mm256_fmadd_ps(wc.min[h], _mm256_load_ps(x.xs + 8 * h), acc.h[h]);
  }
  return acc;
}

inline float acc_sum(Acc a) {
  const __m256 s8 = _mm256_add_ps(a.h[0], a.h[1]);
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  const __m128 s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
  return _mm_cvtss_f32(s1);
}

#else  // plain C++ (not inlined into the tiles: 80 unrolled copies took half a minute to compile)
#define FASTVERIFY_QUANT_PLAIN_INLINE __attribute__((noinline))
struct WeightChunk {
  int16_t w[QCHUNK];  // signed for Q8_0
  float scale[16], min[16];
};

template <int wtype>
FASTVERIFY_QUANT_PLAIN_INLINE WeightChunk unpack(const uint8_t* __restrict__ row, int64_t c, bool half) {
  WeightChunk wc{};
  if constexpr (wtype == QUANT_Q4_0 || wtype == QUANT_Q4_1 || wtype == QUANT_Q8_0) {
    constexpr int bytes = wtype == QUANT_Q4_0 ? 18 : wtype == QUANT_Q4_1 ? 20 : 34;
    for (int h = 0; h < (half ? 1 : 2); ++h) {
      const uint8_t* b = row + (2 * c + h) * bytes;
      int16_t* w = wc.w + 32 * h;
      if constexpr (wtype == QUANT_Q8_0) {
        for (int i = 0; i < 32; ++i) w[i] = int8_t(b[2 + i]);
      } else {
        const uint8_t* qs = b + (wtype == QUANT_Q4_0 ? 2 : 4);
        for (int i = 0; i < 16; ++i) {
          w[i] = qs[i] & 15;
          w[i + 16] = qs[i] >> 4;
        }
      }
      for (int l = 0; l < 8; ++l) {
        wc.scale[8 * h + l] = f16_at(b);
        if constexpr (wtype == QUANT_Q4_1) wc.min[8 * h + l] = f16_at(b + 2);
      }
    }
  } else if constexpr (wtype == QUANT_Q4_K) {
    const uint8_t* blk = row + (c / 4) * 144;
    const int cc = int(c % 4);
    const uint8_t* qs = blk + 16 + 32 * cc;
    const float d = f16_at(blk), dmin = f16_at(blk + 2);
    for (int h = 0; h < 2; ++h) {
      int sc, m;
      q4_k_scale_min(blk + 4, 2 * cc + h, sc, m);
      for (int i = 0; i < 32; ++i) wc.w[32 * h + i] = (qs[i] >> (4 * h)) & 15;
      for (int l = 0; l < 8; ++l) {
        wc.scale[8 * h + l] = d * float(sc);
        wc.min[8 * h + l] = -(dmin * float(m));
      }
    }
  } else {  // Q6_K
    const uint8_t* blk = row + (c / 4) * 210;
    const int h = int(c % 4) / 2, p = int(c % 2);
    const uint8_t* ql = blk + 64 * h;
    const uint8_t* qh = blk + 128 + 32 * h;
    const float d = f16_at(blk + 208);
    const int8_t* scales = reinterpret_cast<const int8_t*>(blk + 192 + 8 * h + 4 * p);
    for (int i = 0; i < QCHUNK; ++i) {
      const int g = i / 32, l = i % 32;  // value 64p + 32g + l of the half
      wc.w[i] = int16_t(((ql[32 * g + l] >> (4 * p)) & 15) | ((qh[l] >> (4 * p + 2 * g)) & 3) << 4);
    }
    for (int l = 0; l < 16; ++l) wc.scale[l] = d * float(scales[l / 4]);
  }
  return wc;
}

struct Acc {
  float v[16];
};
inline Acc acc_zero() { return Acc{}; }

template <int wtype>
FASTVERIFY_QUANT_PLAIN_INLINE Acc chunk_dot(const WeightChunk& wc, const InputChunk& x, Acc acc) {
  for (int l = 0; l < 16; ++l) {
    int32_t dot = x.bias[l];
    for (int j = 0; j < 4; ++j) dot += int32_t(wc.w[4 * l + j]) * int32_t(x.q[4 * l + j]);
    const float scale = wc.scale[l] * x.dx[l];
    acc.v[l] = acc.v[l] + float(dot) * scale;
    if constexpr (has_min<wtype>()) acc.v[l] = acc.v[l] + wc.min[l] * x.xs[l];
  }
  return acc;
}

inline float acc_sum(Acc a) {
  for (int h = 8; h > 0; h /= 2)
    for (int j = 0; j < h; ++j) a.v[j] += a.v[j + h];
  return a.v[0];
}
#endif

// ---------------------------------------------------------------------------- the projection

constexpr int QUANT_MT = 16;  // input rows per tile

// Weight rows interleaved per step for MT input rows: several independent accumulator
// chains hide the FMA latency when the tile has few rows.
constexpr int quant_rows_per_step(int MT) { return MT <= 2 ? 4 : MT <= 6 ? 2 : 1; }

// Outputs y[m, n0 .. n0+R-1] for the MT input rows of x (chunks per row: chunks) against R
// weight rows starting at w (row_bytes apart): every weight chunk is unpacked once for all
// MT rows.
template <int wtype, int MT, int R>
inline void qtile(const InputChunk* __restrict__ x, int64_t chunks, bool half_last, const uint8_t* __restrict__ w,
                  int64_t row_bytes, float* __restrict__ y, int64_t ldy, const float* __restrict__ bias,
                  const float* __restrict__ res, int64_t ldr) {
  Acc acc[R][MT];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) acc[r][m] = acc_zero();
  for (int64_t c = 0; c < chunks; ++c) {
    const bool half = half_last && c == chunks - 1;
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const WeightChunk wc = unpack<wtype>(w + r * row_bytes, c, half);
#pragma GCC unroll 16
      for (int m = 0; m < MT; ++m) acc[r][m] = chunk_dot<wtype>(wc, x[m * chunks + c], acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) {
      float s = acc_sum(acc[r][m]);
      if (bias) s += bias[r];
      if (res) s = res[m * ldr + r] + s;
      y[m * ldy + r] = s;
    }
}

using QTile = void (*)(const InputChunk*, int64_t, bool, const uint8_t*, int64_t, float*, int64_t, const float*,
                       const float*, int64_t);

// y[m0 .. m0+MT, n0 .. n1) for one tile of input rows
template <int wtype, int MT>
void qtile_rows(const InputChunk* x, int64_t chunks, bool half_last, const uint8_t* w, int64_t row_bytes, float* y,
                int64_t ldy, const float* bias, const float* res, int64_t ldr, int64_t n0, int64_t n1) {
  constexpr int R = quant_rows_per_step(MT);
  int64_t n = n0;
  for (; n + R <= n1; n += R)
    qtile<wtype, MT, R>(x, chunks, half_last, w + n * row_bytes, row_bytes, y + n, ldy, bias ? bias + n : nullptr,
                        res ? res + n : nullptr, ldr);
  for (; n < n1; ++n)
    qtile<wtype, MT, 1>(x, chunks, half_last, w + n * row_bytes, row_bytes, y + n, ldy, bias ? bias + n : nullptr,
                        res ? res + n : nullptr, ldr);
}

using QTileRows = void (*)(const InputChunk*, int64_t, bool, const uint8_t*, int64_t, float*, int64_t, const float*,
                           const float*, int64_t, int64_t, int64_t);
template <int wtype, std::size_t... I>
constexpr std::array<QTileRows, sizeof...(I)> qtile_table(std::index_sequence<I...>) {
  return {&qtile_rows<wtype, int(I) + 1>...};
}
template <int wtype>
constexpr auto QTILES = qtile_table<wtype>(std::make_index_sequence<QUANT_MT>{});

inline const std::array<QTileRows, QUANT_MT>* qtiles(int wtype) {
  switch (wtype) {
    case QUANT_Q4_0: return &QTILES<QUANT_Q4_0>;
    case QUANT_Q4_1: return &QTILES<QUANT_Q4_1>;
    case QUANT_Q8_0: return &QTILES<QUANT_Q8_0>;
    case QUANT_Q4_K: return &QTILES<QUANT_Q4_K>;
    case QUANT_Q6_K: return &QTILES<QUANT_Q6_K>;
    default: return nullptr;
  }
}

constexpr int64_t QUANT_ROWS_PER_TASK = 16;  // weight rows per scheduling unit (its tiles reuse them from L1)

// y[M, N] = prologue(x)[M, K] · W[N, K]ᵀ (+ bias[N]) (+ residual[M, N]), W given as the raw
// blocks of ggml type wtype (row n at w + n · (K / block_size) · block_bytes). prologue: none;
// RMSNorm with weight norm_w (norm_w != null); or SwiGLU (swiglu != 0: x is [M, 2K] = [gate | up],
// the input silu(gate) · up) — linear_f32's semantics for any M >= 1.
// Returns 0 on success, 1 for an unknown wtype, 2 for K not a multiple of the block size, 3 for M < 1.
inline int qlinear(const float* x, int64_t ldx, const uint8_t* w, int wtype, const float* bias, const float* residual,
                   int64_t ldr, float* y, int64_t ldy, int64_t M, int64_t N, int64_t K, const float* norm_w, float eps,
                   int swiglu, int threads) {
  QuantFormat f{};
  if (!quant_format(wtype, f)) return 1;
  if (K < 1 || K % f.block_size) return 2;
  if (M < 1) return 3;
  if (N < 1) return 0;
  const int64_t chunks = (K + QCHUNK - 1) / QCHUNK, row_bytes = K / f.block_size * f.block_bytes;
  const bool half_last = K % QCHUNK != 0;
  const int zp = zero_point(wtype);
  std::vector<InputChunk> xq(size_t(M * chunks));
  const auto& tiles = *qtiles(wtype);
  const int64_t tasks = (N + QUANT_ROWS_PER_TASK - 1) / QUANT_ROWS_PER_TASK;
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> pre((norm_w || swiglu) ? K : 0);
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * ldx;
      if (norm_w) {
        rms_norm_row(xm, norm_w, eps, K, pre.data());
        xm = pre.data();
      } else if (swiglu) {
        for (int64_t k = 0; k < K; ++k) {
          const float g = xm[k];
          pre[k] = g / (1.f + std::exp(-g)) * xm[K + k];
        }
        xm = pre.data();
      }
      quantize_row(xm, K, zp, xq.data() + m * chunks);
    }
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t n0 = t * QUANT_ROWS_PER_TASK, n1 = std::min(N, n0 + QUANT_ROWS_PER_TASK);
      for (int64_t m0 = 0; m0 < M; m0 += QUANT_MT) {
        const int mt = int(std::min<int64_t>(QUANT_MT, M - m0));
        tiles[mt - 1](xq.data() + m0 * chunks, chunks, half_last, w, row_bytes, y + m0 * ldy, ldy, bias,
                      residual ? residual + m0 * ldr : nullptr, ldr, n0, n1);
      }
    }
  }
  return 0;
}

}  // namespace
