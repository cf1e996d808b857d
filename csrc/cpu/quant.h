// Projections on GGUF quantized weights kept in their ggml blocks (Q4_0, Q4_1, Q8_0, Q4_K,
// Q6_K): y[M, N] = prologue(x)[M, K] · W[N, K]ᵀ (+ bias) (+ residual), the semantics of
// linear.h's linear_f32 for any M, and the dequantization of selected rows (embedding lookups).
//
// Technique (llama.cpp's): each input row is quantized once per call to int8 per block of
// 32 values (d_x = max|x| / 127, q = round(x / d_x)), so a weight block meets the input in an
// exact integer dot product (AVX-512 VNNI vpdpbusd: unsigned weight codes × signed input
// bytes; AVX2 vpmaddubsw + vpmaddwd; plain C++ otherwise); the weight's zero point enters
// through the input's block sums (an integer for Q4_0's 8, Q6_K's 32 and, on VNNI, Q8_0's
// bytes + 128; a float min · d_x · Σq for Q4_1 and Q4_K). Then one multiply-add per block in
// fp32 — see "layout" below for the order, which makes a row's result independent of the other
// rows of the call and of the thread count.
//
// Measured on the 2-core Zen 4 (one thread, M = 1): Q4_1 3072×576 70 µs (16 GB/s of weights),
// Q8_0 49152×576 1.3-1.7 ms (17-23 GB/s); M = 16 at 576×1536: ~150 GOP/s, 8 vpdpbusd per
// block row and group against ~4 other vector instructions.
#pragma once

#include <memory>

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

// ---------------------------------------------------------------------------- layout
//
// A "dot block" is the unit with one weight scale: 32 values (Q6_K: its 16-value
// sub-blocks). Its integer dot product with the quantized input is exact:
//     D_j = Σ_i w_i · q_i − zero_point · Σ_i q_i          (w_i the unsigned weight codes)
// Dot blocks go in groups of 16, one per lane of an output's 16-lane fp32 accumulator, which
// adds, group after group, by fused multiply-adds
//     float(D_j) · (w_scale_j · d_x,j)        then, for formats with a min,   w_min_j · (d_x,j · Σ q)
// and one fixed pairwise tree (lanes j + 8, + 4, + 2, + 1) reduces the 16 lanes. Every
// output is computed this way whatever M is, whichever rows share its tile and whichever
// thread runs it, so a row's result has the same bits alone or among many rows (tested).
// The integer dots are exact in every path and the AVX-512 and AVX2 builds make the same float
// operations (the same bits, tested); the portable build has no FMA (its own bits).
//
// AVX-512 VNNI: the 16 dot blocks of a group are rearranged (loads and dword permutes or
// transposes, once per weight row and tile of up to 16 input rows) so that vector k holds
// dword k (values 4k .. 4k+3) of every block, one lane per block; the inputs are stored the
// same way once per call, so one vpdpbusd per dword adds 4 products to each block's lane and
// D_j needs no horizontal sum: a group of 16 blocks costs 8 vpdpbusd and 4 other vector
// instructions per input row. A last group of 1-4 blocks of 32 (K = 576 has 18) is done in
// pairs of blocks instead, in every build (ShortGroup). Other builds take one block at a time
// (AVX2: vpmaddubsw, vpmaddwd and a horizontal sum; plain C++ loops).

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define FASTVERIFY_QUANT_VNNI 1
#endif

constexpr int QLANES = 16;  // dot blocks per group, one per accumulator lane

// values per dot block (a name of its own: linear.h has function templates dot_block)
constexpr int dot_values(int wtype) { return wtype == QUANT_Q6_K ? 16 : 32; }

// The weight codes are q + zero_point (unsigned): the dot products take zero_point · Σ q back.
constexpr int zero_point(int wtype) {
#if defined(FASTVERIFY_QUANT_VNNI)
  return wtype == QUANT_Q4_0 ? 8 : wtype == QUANT_Q6_K ? 32 : wtype == QUANT_Q8_0 ? 128 : 0;  // Q8_0: its bytes + 128
#else
  return wtype == QUANT_Q4_0 ? 8 : wtype == QUANT_Q6_K ? 32 : 0;  // Q8_0's signed bytes multiply as they are
#endif
}

constexpr bool has_min(int wtype) { return wtype == QUANT_Q4_1 || wtype == QUANT_Q4_K; }

// Bytes of one row's group of quantized inputs: the 16·BV int8 values, then 16 lanes each of
//     int32 bias = −zero_point · Σ q,   float d_x,   float d_x · Σ q.
// Values: VNNI [BV/4 dwords][16 blocks][4]; other builds [16 blocks][BV]. (A last group of 1-4
// blocks of 32 holds pairs of blocks instead, 256 bytes each: see ShortGroup.)
constexpr int64_t group_bytes(int BV) { return 16 * BV + 3 * 64; }

struct alignas(64) Line64 {
  uint8_t b[64];
};

// The groups of one input row of K values (K a multiple of the dot block and of 32): int8 per
// 32 values, d_x = max|x| / 127, q = round(x / d_x) (half to even). Missing blocks of a last
// partial group stay zero.
inline void quantize_row(const float* __restrict__ x, int64_t K, int wtype, uint8_t* __restrict__ out) {
  const int BV = dot_values(wtype), zp = zero_point(wtype);
  const int64_t nb = K / BV, groups = (nb + QLANES - 1) / QLANES, gb = group_bytes(BV);
  std::memset(out, 0, size_t(groups * gb));
#if defined(FASTVERIFY_QUANT_VNNI)
  constexpr bool transposed = true;
#else
  constexpr bool transposed = false;
#endif
  // a last group of 1-4 dot blocks of 32: pairs of blocks in value order (see ShortGroup)
  const int64_t short_group = BV == 32 && nb % QLANES && nb % QLANES <= 4 ? nb / QLANES : -1;
  alignas(32) int8_t q[32];
  for (int64_t b32 = 0; b32 < K / 32; ++b32) {
    const float* xb = x + 32 * b32;
    float amax = 0.f;
    for (int i = 0; i < 32; ++i) {  // a NaN sticks (then d_x, and the row's outputs, are NaN)
      const float a = std::fabs(xb[i]);
      amax = a > amax || a != a ? a : amax;
    }
    const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;  // an inf makes d_x inf: outputs inf / NaN
    const bool divide = id > std::numeric_limits<float>::max();  // d_x subnormal: 1 / d_x overflows
#if defined(__AVX2__)
    for (int i = 0; i < 32; i += 8) {  // cvtps rounds half to even, as nearbyint
      const __m256 xv = _mm256_loadu_ps(xb + i);
      __m256i r = _mm256_cvtps_epi32(divide ? _mm256_div_ps(xv, _mm256_set1_ps(d)) : _mm256_mul_ps(xv, _mm256_set1_ps(id)));
      r = _mm256_min_epi32(_mm256_max_epi32(r, _mm256_set1_epi32(-127)), _mm256_set1_epi32(127));
      alignas(32) int32_t v[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(v), r);
      for (int j = 0; j < 8; ++j) q[i + j] = int8_t(v[j]);
    }
#else
    for (int i = 0; i < 32; ++i)
      q[i] = int8_t(std::min(127.f, std::max(-127.f, std::nearbyint(divide ? xb[i] / d : xb[i] * id))));
#endif
    for (int h = 0; h < 32 / BV; ++h) {  // the dot blocks of these 32 values
      const int64_t j = b32 * (32 / BV) + h;
      const int lane = int(j % QLANES);
      uint8_t* grp = out + (j / QLANES) * gb;
      int8_t* gq = reinterpret_cast<int8_t*>(grp);
      int s = 0;
      for (int i = 0; i < BV; ++i) {
        const int8_t v = q[h * BV + i];
        s += v;
        if (j / QLANES == short_group)
          gq[256 * (lane / 2) + 32 * (lane % 2) + i] = v;
        else if (transposed)
          gq[((i / 4) * QLANES + lane) * 4 + i % 4] = v;
        else
          gq[lane * BV + i] = v;
      }
      if (j / QLANES == short_group) {  // pair lane / 2: lanes 0-7 for its first block, 8-15 the second
        uint8_t* pair = grp + 256 * (lane / 2);
        const int half = 8 * (lane % 2);
        for (int l = 0; l < 8; ++l) {  // each lane's own zero-point term: lane sums the same in every build
          const int8_t* ql = q + h * BV + 4 * l;
          reinterpret_cast<int32_t*>(pair + 64)[half + l] = -zp * (ql[0] + ql[1] + ql[2] + ql[3]);
          reinterpret_cast<float*>(pair + 128)[half + l] = d;
        }
        reinterpret_cast<float*>(pair + 192)[half] = d * float(s);
        continue;
      }
      reinterpret_cast<int32_t*>(grp + 16 * BV)[lane] = -zp * s;
      reinterpret_cast<float*>(grp + 16 * BV + 64)[lane] = d;
      reinterpret_cast<float*>(grp + 16 * BV + 128)[lane] = d * float(s);
    }
  }
}

// ---------------------------------------------------------------------------- weight groups

#if defined(FASTVERIFY_QUANT_VNNI)
// One group of a weight row: w[k] = dword k of the 16 dot blocks (unsigned codes, lane j for
// block j; BV/4 of them), their scales and mins (0 in lanes past the row's last block).
struct WeightGroup {
  __m512i w[8];
  __m512 scale, min;
};

// [a ×8 | b ×8]
inline __m512 halves(float a, float b) { return _mm512_insertf32x8(_mm512_set1_ps(a), _mm256_set1_ps(b), 1); }

// lane j: stride · j + add
inline __m512i lane_offsets(int stride, int add) {
  const int s = stride, a = add;
  return _mm512_setr_epi32(a, s + a, 2 * s + a, 3 * s + a, 4 * s + a, 5 * s + a, 6 * s + a, 7 * s + a, 8 * s + a,
                           9 * s + a, 10 * s + a, 11 * s + a, 12 * s + a, 13 * s + a, 14 * s + a, 15 * s + a);
}

// fp16 in the low (high = false) or high 16 bits of each dword, as floats
inline __m512 f16_lanes(__m512i v, bool high) {
  return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(high ? _mm512_srli_epi32(v, 16) : v));
}

// z[i] lane 4L + c = dword c of row i + 4L  ->  z[k] lane 4L + i = dword k of row i + 4L
// (a 4x4 transpose of dwords within each 128-bit lane)
inline void transpose_4x4(__m512i (&z)[4]) {
  const __m512i a = _mm512_unpacklo_epi32(z[0], z[1]), b = _mm512_unpackhi_epi32(z[0], z[1]);
  const __m512i c = _mm512_unpacklo_epi32(z[2], z[3]), d = _mm512_unpackhi_epi32(z[2], z[3]);
  z[0] = _mm512_unpacklo_epi64(a, c);
  z[1] = _mm512_unpackhi_epi64(a, c);
  z[2] = _mm512_unpacklo_epi64(b, d);
  z[3] = _mm512_unpackhi_epi64(b, d);
}

// z[i] = [row i (8 dwords) | row i + 8]  ->  z[k] lane j = dword k of row j (an 8x8 transpose
// of dwords within each 256-bit half)
inline void transpose_8x8(__m512i (&z)[8]) {
  __m512i a[8], b[8];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    a[2 * i] = _mm512_unpacklo_epi32(z[2 * i], z[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_epi32(z[2 * i], z[2 * i + 1]);
  }
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i) {
    b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
    b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
  }
  // b[c] (c < 4), 128-bit lane 2h + e: dword 4e + c of rows 8h + 0..3; b[4 + c]: of rows 8h + 4..7
  const __m512i lo = _mm512_set_epi64(13, 12, 5, 4, 9, 8, 1, 0), hi = _mm512_set_epi64(15, 14, 7, 6, 11, 10, 3, 2);
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) {
    z[c] = _mm512_permutex2var_epi64(b[c], lo, b[4 + c]);
    z[c + 4] = _mm512_permutex2var_epi64(b[c], hi, b[4 + c]);
  }
}

// Dword idx[j] (< 32·NP) of the group's first nbytes bytes in lane j (0 past nbytes): loads and
// dword permutes (Zen 4's gathers cost ~15 cycles each: a fifth of a one-row projection)
template <int NP>
inline __m512i dwords_at(const uint8_t* base, int64_t nbytes, __m512i idx) {
  __m512i out = _mm512_setzero_si512();
#pragma GCC unroll 4
  for (int p = 0; p < NP; ++p) {
    __m512i r[2];
    for (int h = 0; h < 2; ++h) {
      const int64_t valid = std::max<int64_t>(0, std::min<int64_t>(64, nbytes - 64 * (2 * p + h)));
      r[h] = _mm512_maskz_loadu_epi8(valid == 64 ? ~__mmask64(0) : (__mmask64(1) << valid) - 1, base + 64 * (2 * p + h));
    }
    const __mmask16 lanes = _mm512_cmpeq_epi32_mask(_mm512_srli_epi32(idx, 5), _mm512_set1_epi32(p));
    out = _mm512_mask_blend_epi32(lanes, out, _mm512_permutex2var_epi32(r[0], idx, r[1]));
  }
  return out;
}

// group g (count blocks, 1..16) of a weight row
template <int wtype, bool FULL>
inline void unpack_group(const uint8_t* __restrict__ row, int64_t g, int count_, WeightGroup& wg) {
  const int count = FULL ? QLANES : count_;  // FULL: a constant, the masks fold away
  const __m512i nib = _mm512_set1_epi32(0x0F0F0F0F);
  if constexpr (wtype == QUANT_Q4_1) {
    // 16 blocks of 5 dwords (d | m, then qs): dword c of block j is dword 5j + c of the group,
    // picked from the 5 vectors of its 320 bytes by permutes (fewer shuffles than transposing)
    const uint8_t* base = row + g * QLANES * 20;
    __m512i r[5];
#pragma GCC unroll 5
    for (int i = 0; i < 5; ++i) {
      const int valid = std::max(0, std::min(16, 5 * count - 16 * i));  // dwords inside the row's blocks
      r[i] = _mm512_maskz_loadu_epi32(__mmask16((1u << valid) - 1), base + 64 * i);
    }
    __m512i dw[5];
#pragma GCC unroll 5
    for (int c = 0; c < 5; ++c) {
      const __m512i idx = lane_offsets(5, c);  // lane j: 5j + c (permutes use its low 5 / 4 bits)
      __mmask16 second = 0, third = 0;  // lanes whose dword lies in r[2..3] / r[4]
      for (int j = 0; j < QLANES; ++j) {
        second |= __mmask16((5 * j + c >= 32 && 5 * j + c < 64) << j);
        third |= __mmask16((5 * j + c >= 64) << j);
      }
      __m512i v = _mm512_permutex2var_epi32(r[0], idx, r[1]);
      v = _mm512_mask_blend_epi32(second, v, _mm512_permutex2var_epi32(r[2], idx, r[3]));
      dw[c] = _mm512_mask_permutexvar_epi32(v, third, idx, r[4]);
    }
    for (int k = 0; k < 4; ++k) {
      wg.w[k] = _mm512_and_si512(dw[k + 1], nib);
      wg.w[k + 4] = _mm512_and_si512(_mm512_srli_epi32(dw[k + 1], 4), nib);
    }
    wg.scale = f16_lanes(dw[0], false);
    wg.min = f16_lanes(dw[0], true);
  } else if constexpr (wtype == QUANT_Q4_0) {
    // z[i], 128-bit lane L: the 16 qs bytes of block i + 4L; transposed, w[k] holds dword k of
    // every block (lane j for block j): its low nibbles are values 4k.., the high ones 16 + 4k..
    constexpr int bytes = 18, qoff = 2;
    const uint8_t* base = row + g * QLANES * bytes;
    __m512i z[4];
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      auto block = [&](int b) { return _mm_maskz_loadu_epi32(__mmask8(b < count ? 0xF : 0), base + b * bytes + qoff); };
      z[i] = _mm512_inserti32x4(_mm512_inserti32x4(_mm512_inserti32x4(_mm512_castsi128_si512(block(i)), block(i + 4), 1),
                                                   block(i + 8), 2),
                                block(i + 12), 3);
    }
    transpose_4x4(z);
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) {
      wg.w[k] = _mm512_and_si512(z[k], nib);
      wg.w[k + 4] = _mm512_and_si512(_mm512_srli_epi32(z[k], 4), nib);
    }
    // block j's d: the low half of dword 9·(j / 2) for even j, the high half of 9·(j / 2) + 4 for odd j
    const __m512i head = dwords_at<3>(base, count * 18, _mm512_set_epi32(67, 63, 58, 54, 49, 45, 40, 36, 31, 27, 22,
                                                                          18, 13, 9, 4, 0));
    wg.scale = f16_lanes(_mm512_mask_srli_epi32(head, 0xAAAA, head, 16), false);
  } else if constexpr (wtype == QUANT_Q8_0) {
    // z[i]: the 32 bytes of blocks i | i + 8, transposed to w[k] = dword k of every block
    const uint8_t* base = row + g * QLANES * 34;
    __m512i z[8];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      auto block = [&](int b) { return _mm256_maskz_loadu_epi32(__mmask8(b < count ? 0xFF : 0), base + b * 34 + 2); };
      z[i] = _mm512_inserti64x4(_mm512_castsi256_si512(block(i)), block(i + 8), 1);
    }
    transpose_8x8(z);
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) wg.w[k] = _mm512_xor_si512(z[k], _mm512_set1_epi32(int(0x80808080u)));  // + 128: unsigned
    // block j's d: the low half of dword 17·(j / 2) for even j, the high half of 17·(j / 2) + 8 for odd j
    const __m512i head = dwords_at<4>(base, count * 34, _mm512_set_epi32(127, 119, 110, 102, 93, 85, 76, 68, 59, 51, 42,
                                                                          34, 25, 17, 8, 0));
    wg.scale = f16_lanes(_mm512_mask_srli_epi32(head, 0xAAAA, head, 16), false);
  } else if constexpr (wtype == QUANT_Q4_K) {
    // lane j: superblock j / 8, sub-block s = j % 8 in the low (s even) or high nibbles of qs
    // bytes 32·(s / 2) ..; a group is two superblocks (one for a last group of 8). The 128 qs
    // bytes of a superblock are two vectors; dword k of sub-block s is their dword 8·(s / 2) + k.
    const uint8_t* base = row + g * 2 * 144;
    const __m512i q0 = _mm512_loadu_si512(base + 16), q1 = _mm512_loadu_si512(base + 80);
    const __m512i q2 = count > 8 ? _mm512_loadu_si512(base + 144 + 16) : _mm512_setzero_si512();
    const __m512i q3 = count > 8 ? _mm512_loadu_si512(base + 144 + 80) : _mm512_setzero_si512();
    const __m512i at = _mm512_set_epi32(24, 24, 16, 16, 8, 8, 0, 0, 24, 24, 16, 16, 8, 8, 0, 0);
    const __m512i shift = _mm512_set_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) {
      const __m512i idx = _mm512_add_epi32(at, _mm512_set1_epi32(k));
      const __m512i v = _mm512_mask_blend_epi32(__mmask16(0xFF00), _mm512_permutex2var_epi32(q0, idx, q1),
                                                _mm512_permutex2var_epi32(q2, idx, q3));
      wg.w[k] = _mm512_and_si512(_mm512_srlv_epi32(v, shift), nib);
    }
    // the 6-bit scales and mins (q4_k_scale_min, all lanes at once): each 128-bit lane holds a
    // superblock's first 16 bytes (scales at bytes 4..15); lane j gets, for s = j % 8 < 4, the
    // bytes [scales[s], scales[s + 4]], else [scales[s + 4], scales[s - 4], scales[s]]
    const bool two = count > 8;
    const __m128i h0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(base));
    const __m128i h1 = two ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(base + 144)) : _mm_setzero_si128();
    const __m512i heads = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set_m128i(h0, h0)), _mm256_set_m128i(h1, h1), 1);
    const __m128i lo4 = _mm_setr_epi8(4, 8, -1, -1, 5, 9, -1, -1, 6, 10, -1, -1, 7, 11, -1, -1);
    const __m128i hi4 = _mm_setr_epi8(12, 4, 8, -1, 13, 5, 9, -1, 14, 6, 10, -1, 15, 7, 11, -1);
    const __m512i ctrl = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set_m128i(hi4, lo4)), _mm256_set_m128i(hi4, lo4), 1);
    const __m512i b = _mm512_shuffle_epi8(heads, ctrl);
    const __m512i six = _mm512_set1_epi32(63), four = _mm512_set1_epi32(15), two_bits = _mm512_set1_epi32(3);
    const __mmask16 upper = 0xF0F0;  // s >= 4
    __m512i sc = _mm512_and_si512(b, six), mn = _mm512_and_si512(_mm512_srli_epi32(b, 8), six);
    sc = _mm512_mask_or_epi32(sc, upper, _mm512_and_si512(b, four),
                              _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(b, 14), two_bits), 4));
    mn = _mm512_mask_or_epi32(mn, upper, _mm512_and_si512(_mm512_srli_epi32(b, 4), four),
                              _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(b, 22), two_bits), 4));
    wg.scale = _mm512_mul_ps(_mm512_cvtepi32_ps(sc), halves(f16_at(base), two ? f16_at(base + 144) : 0.f));
    wg.min = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(_mm512_cvtepi32_ps(mn),
                                                                halves(f16_at(base + 2), two ? f16_at(base + 146) : 0.f)));
  } else {  // Q6_K: a group is one superblock; lane j = 16-value sub-block j
    // sub-block j: half h = j / 8, t = (j % 8) / 2, values l0 = 16·(j % 2) .. of 32·t .. in the
    // half: low bits from ql[64h + 32·(t % 2) + l] >> 4·(t / 2), high bits qh[32h + l] >> 2t
    const uint8_t* base = row + g * 210;
    const __m512i at_l = _mm512_set_epi32(64 + 48, 64 + 32, 64 + 16, 64, 64 + 48, 64 + 32, 64 + 16, 64, 48, 32, 16,
                                          0, 48, 32, 16, 0);
    const __m512i shift_l = _mm512_set_epi32(4, 4, 4, 4, 0, 0, 0, 0, 4, 4, 4, 4, 0, 0, 0, 0);
    const __m512i at_h = _mm512_set_epi32(160 + 16, 160, 160 + 16, 160, 160 + 16, 160, 160 + 16, 160, 128 + 16, 128,
                                          128 + 16, 128, 128 + 16, 128, 128 + 16, 128);
    const __m512i shift_h = _mm512_set_epi32(6, 6, 4, 4, 2, 2, 0, 0, 6, 6, 4, 4, 2, 2, 0, 0);
    // ql (two vectors) and qh (one): the dwords at_l / 4 + k and (at_h − 128) / 4 + k
    const __m512i ql0 = _mm512_loadu_si512(base), ql1 = _mm512_loadu_si512(base + 64);
    const __m512i qh = _mm512_loadu_si512(base + 128);
    const __m512i dl = _mm512_srli_epi32(at_l, 2), dh = _mm512_srli_epi32(_mm512_sub_epi32(at_h, _mm512_set1_epi32(128)), 2);
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) {
      const __m512i kk = _mm512_set1_epi32(k);
      const __m512i vl = _mm512_permutex2var_epi32(ql0, _mm512_add_epi32(dl, kk), ql1);
      const __m512i vh = _mm512_permutexvar_epi32(_mm512_add_epi32(dh, kk), qh);
      const __m512i lo = _mm512_and_si512(_mm512_srlv_epi32(vl, shift_l), nib);
      const __m512i hi = _mm512_and_si512(_mm512_srlv_epi32(vh, shift_h),
                                          _mm512_set1_epi32(0x03030303));
      wg.w[k] = _mm512_or_si512(lo, _mm512_slli_epi32(hi, 4));
    }
    const __m128i s = _mm_loadu_si128(reinterpret_cast<const __m128i*>(base + 192));
    wg.scale = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(s)), _mm512_set1_ps(f16_at(base + 208)));
  }
}

// A last group of 1-4 dot blocks of 32 (K = 576 has 18): 16 lanes of dot products for so few
// blocks would cost as much as a full group. Instead each pair of blocks fills one 64-byte
// vector in value order (inputs too: per pair 64 int8, then 16 lanes each of bias, d_x, d_x·Σq
// with lanes 0-7 for the first block, 8-15 the second), and lane l of the accumulator adds
//     float(Σ_4 (w − zero_point)·q over its 4 values) · (w_scale · d_x)   (+ w_min · d_x·Σq in lanes 0, 8)
// — a fixed split of these blocks' terms over the lanes, the same for every M and in every build.
struct ShortGroup {
  __m512i w[2];  // pair p: the codes of blocks 2p | 2p + 1
  __m512 scale[2], min[2];
  int pairs;
};

template <int wtype>
inline void unpack_short(const uint8_t* __restrict__ row, int64_t g, int count, ShortGroup& t) {
  t.pairs = (count + 1) / 2;
  for (int p = 0; p < t.pairs; ++p) {
    const int64_t b0 = g * QLANES + 2 * p;
    const bool second = 2 * p + 1 < count;
    if constexpr (wtype == QUANT_Q4_0 || wtype == QUANT_Q4_1) {
      constexpr int bytes = wtype == QUANT_Q4_0 ? 18 : 20, qoff = wtype == QUANT_Q4_0 ? 2 : 4;
      const uint8_t* blk = row + b0 * bytes;
      const __m128i q0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + qoff));
      const __m128i q1 = _mm_maskz_loadu_epi32(__mmask8(second ? 0xF : 0), blk + bytes + qoff);
      // [q0 | q0 | q1 | q1], the second and fourth quarters shifted to their high nibbles
      __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set_m128i(q0, q0)), _mm256_set_m128i(q1, q1), 1);
      v = _mm512_mask_srli_epi16(v, __mmask32(0xFF00FF00u), v, 4);
      t.w[p] = _mm512_and_si512(v, _mm512_set1_epi8(15));
      t.scale[p] = halves(f16_at(blk), second ? f16_at(blk + bytes) : 0.f);
      if constexpr (wtype == QUANT_Q4_1) t.min[p] = halves(f16_at(blk + 2), second ? f16_at(blk + bytes + 2) : 0.f);
    } else if constexpr (wtype == QUANT_Q8_0) {
      const uint8_t* blk = row + b0 * 34;
      const __m256i q0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
      const __m256i q1 = _mm256_maskz_loadu_epi32(__mmask8(second ? 0xFF : 0), blk + 34 + 2);
      t.w[p] = _mm512_xor_si512(_mm512_inserti64x4(_mm512_castsi256_si512(q0), q1, 1), _mm512_set1_epi8(char(0x80)));
      t.scale[p] = halves(f16_at(blk), second ? f16_at(blk + 34) : 0.f);
    }
  }
}

using Acc = __m512;
inline Acc acc_zero() { return _mm512_setzero_ps(); }

// acc += the group's terms for one input row (its group of quantized inputs at xg)
template <int wtype, bool SPLIT>
inline Acc group_dot(const WeightGroup& wg, const uint8_t* __restrict__ xg, Acc acc) {
  constexpr int BV = dot_values(wtype), NQ = BV / 4;
  const __m512i bias = zero_point(wtype) ? _mm512_load_si512(xg + 16 * BV) : _mm512_setzero_si512();
  __m512i dot;
  if constexpr (SPLIT) {  // two dependency chains (integer sums: the same result)
    __m512i even = bias, odd = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int k = 0; k < NQ; k += 2) {
      even = _mm512_dpbusd_epi32(even, wg.w[k], _mm512_load_si512(xg + 64 * k));
      odd = _mm512_dpbusd_epi32(odd, wg.w[k + 1], _mm512_load_si512(xg + 64 * (k + 1)));
    }
    dot = _mm512_add_epi32(even, odd);
  } else {
    dot = bias;
#pragma GCC unroll 8
    for (int k = 0; k < NQ; ++k) dot = _mm512_dpbusd_epi32(dot, wg.w[k], _mm512_load_si512(xg + 64 * k));
  }
  const __m512 dx = _mm512_load_ps(reinterpret_cast<const float*>(xg + 16 * BV + 64));
  acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(wg.scale, dx), acc);
  if constexpr (has_min(wtype))
    acc = _mm512_fmadd_ps(wg.min, _mm512_load_ps(reinterpret_cast<const float*>(xg + 16 * BV + 128)), acc);
  return acc;
}

template <int wtype>
inline Acc short_dot(const ShortGroup& t, const uint8_t* __restrict__ xg, Acc acc) {
  for (int p = 0; p < t.pairs; ++p) {
    const uint8_t* xp = xg + 256 * p;
    const __m512i bias = zero_point(wtype) ? _mm512_load_si512(xp + 64) : _mm512_setzero_si512();
    const __m512i dot = _mm512_dpbusd_epi32(bias, t.w[p], _mm512_load_si512(xp));
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(t.scale[p], _mm512_load_ps(xp + 128)), acc);
    if constexpr (has_min(wtype)) acc = _mm512_fmadd_ps(t.min[p], _mm512_load_ps(xp + 192), acc);
  }
  return acc;
}

// the fixed tree: lanes j + 8, then + 4, + 2, + 1
inline float acc_sum(Acc a) {
  const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  const __m128 s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
  return _mm_cvtss_f32(s1);
}

#else  // AVX2 or plain C++: one dot block at a time
struct WeightGroup {
  alignas(32) uint8_t w[QLANES][32];  // codes (Q8_0: its signed bytes)
  float scale[QLANES], min[QLANES];
};

// dot block j of a weight row: codes, scale, min
template <int wtype>
inline void unpack_block(const uint8_t* __restrict__ row, int64_t j, uint8_t* __restrict__ w, float& scale,
                         float& min) {
  if constexpr (wtype == QUANT_Q4_0 || wtype == QUANT_Q4_1) {
    const uint8_t* blk = row + j * (wtype == QUANT_Q4_0 ? 18 : 20);
    const uint8_t* qs = blk + (wtype == QUANT_Q4_0 ? 2 : 4);
    for (int i = 0; i < 16; ++i) {
      w[i] = qs[i] & 15;
      w[i + 16] = qs[i] >> 4;
    }
    scale = f16_at(blk);
    min = wtype == QUANT_Q4_1 ? f16_at(blk + 2) : 0.f;
  } else if constexpr (wtype == QUANT_Q8_0) {
    const uint8_t* blk = row + j * 34;
    std::memcpy(w, blk + 2, 32);
    scale = f16_at(blk);
    min = 0.f;
  } else if constexpr (wtype == QUANT_Q4_K) {
    const uint8_t* blk = row + (j / 8) * 144;
    const int s = int(j % 8);
    const uint8_t* qs = blk + 16 + 32 * (s / 2);
    for (int i = 0; i < 32; ++i) w[i] = (qs[i] >> (4 * (s % 2))) & 15;
    int sc, m;
    q4_k_scale_min(blk + 4, s, sc, m);
    scale = f16_at(blk) * float(sc);
    min = -(f16_at(blk + 2) * float(m));
  } else {  // Q6_K
    const uint8_t* blk = row + (j / 16) * 210;
    const int s = int(j % 16), h = s / 8, t = (s % 8) / 2, l0 = 16 * (s % 2);
    for (int i = 0; i < 16; ++i) {
      const int l = l0 + i;
      w[i] = uint8_t(((blk[64 * h + 32 * (t % 2) + l] >> (4 * (t / 2))) & 15) | ((blk[128 + 32 * h + l] >> (2 * t)) & 3) << 4);
    }
    scale = f16_at(blk + 208) * float(int8_t(blk[192 + s]));
    min = 0.f;
  }
}

template <int wtype, bool FULL>
inline void unpack_group(const uint8_t* __restrict__ row, int64_t g, int count, WeightGroup& wg) {
  std::memset(&wg, 0, sizeof wg);
  for (int j = 0; j < count; ++j) unpack_block<wtype>(row, g * QLANES + j, wg.w[j], wg.scale[j], wg.min[j]);
}

// Σ w_i · q_i over a dot block (unsigned codes, or Q8_0's signed bytes)
template <int wtype>
inline int32_t block_dot(const uint8_t* __restrict__ w, const int8_t* __restrict__ q) {
  constexpr int BV = dot_values(wtype);
#if defined(__AVX2__)
  if constexpr (BV == 32) {
    const __m256i wv = _mm256_load_si256(reinterpret_cast<const __m256i*>(w));
    const __m256i qv = _mm256_load_si256(reinterpret_cast<const __m256i*>(q));
    const __m256i prod = wtype == QUANT_Q8_0  // |w| · (q · sign w): unsigned × signed without saturation
                             ? _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(qv, wv))
                             : _mm256_maddubs_epi16(wv, qv);
    const __m256i s = _mm256_madd_epi16(prod, _mm256_set1_epi16(1));
    __m128i r = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    r = _mm_add_epi32(r, _mm_shuffle_epi32(r, 0x4E));
    r = _mm_add_epi32(r, _mm_shuffle_epi32(r, 0xB1));
    return _mm_cvtsi128_si32(r);
  } else {
    const __m128i s = _mm_madd_epi16(_mm_maddubs_epi16(_mm_load_si128(reinterpret_cast<const __m128i*>(w)),
                                                       _mm_load_si128(reinterpret_cast<const __m128i*>(q))),
                                     _mm_set1_epi16(1));
    __m128i r = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    r = _mm_add_epi32(r, _mm_shuffle_epi32(r, 0xB1));
    return _mm_cvtsi128_si32(r);
  }
#else
  int32_t s = 0;
  for (int i = 0; i < BV; ++i) s += (wtype == QUANT_Q8_0 ? int32_t(int8_t(w[i])) : int32_t(w[i])) * int32_t(q[i]);
  return s;
#endif
}

struct Acc {
  float v[QLANES];
};
inline Acc acc_zero() { return Acc{}; }

inline float fused(float a, float b, float c) {
#if defined(__FMA__)
  return std::fma(a, b, c);
#else
  return a * b + c;  // no FMA instruction: two roundings
#endif
}

// (the portable build keeps it out of line: inlined into 16 tile sizes it took half a minute to compile)
template <int wtype, bool SPLIT>
#if defined(__AVX2__)
inline
#else
__attribute__((noinline))
#endif
Acc group_dot(const WeightGroup& wg, const uint8_t* __restrict__ xg, Acc acc) {
  constexpr int BV = dot_values(wtype);
  const int8_t* q = reinterpret_cast<const int8_t*>(xg);
  const int32_t* bias = reinterpret_cast<const int32_t*>(xg + 16 * BV);
  const float* dx = reinterpret_cast<const float*>(xg + 16 * BV + 64);
  const float* xs = reinterpret_cast<const float*>(xg + 16 * BV + 128);
  for (int j = 0; j < QLANES; ++j) {
    const int32_t dot = block_dot<wtype>(wg.w[j], q + j * BV) + bias[j];
    const float scale = wg.scale[j] * dx[j];
    acc.v[j] = fused(float(dot), scale, acc.v[j]);
    if constexpr (has_min(wtype)) acc.v[j] = fused(wg.min[j], xs[j], acc.v[j]);
  }
  return acc;
}

// The short last group (see the AVX-512 ShortGroup): pairs of blocks, lane l = 4 values
struct ShortGroup {
  alignas(32) uint8_t w[2][64];  // codes of blocks 2p | 2p + 1 in value order (Q8_0: signed bytes)
  float scale[2][QLANES], min[2][QLANES];
  int pairs;
};

template <int wtype>
inline void unpack_short(const uint8_t* __restrict__ row, int64_t g, int count, ShortGroup& t) {
  std::memset(&t, 0, sizeof t);
  t.pairs = (count + 1) / 2;
  for (int b = 0; b < count; ++b) {
    float scale, min;
    unpack_block<wtype>(row, g * QLANES + b, t.w[b / 2] + 32 * (b % 2), scale, min);
    for (int l = 0; l < 8; ++l) {
      t.scale[b / 2][8 * (b % 2) + l] = scale;
      t.min[b / 2][8 * (b % 2) + l] = min;
    }
  }
}

template <int wtype>
#if defined(__AVX2__)
inline
#else
__attribute__((noinline))
#endif
Acc short_dot(const ShortGroup& t, const uint8_t* __restrict__ xg, Acc acc) {
  for (int p = 0; p < t.pairs; ++p) {
    const uint8_t* xp = xg + 256 * p;
    const int8_t* q = reinterpret_cast<const int8_t*>(xp);
    const int32_t* bias = reinterpret_cast<const int32_t*>(xp + 64);
    const float* dx = reinterpret_cast<const float*>(xp + 128);
    const float* xs = reinterpret_cast<const float*>(xp + 192);
    for (int l = 0; l < QLANES; ++l) {
      int32_t dot = bias[l];
      for (int i = 4 * l; i < 4 * l + 4; ++i)
        dot += (wtype == QUANT_Q8_0 ? int32_t(int8_t(t.w[p][i])) : int32_t(t.w[p][i])) * int32_t(q[i]);
      acc.v[l] = fused(float(dot), t.scale[p][l] * dx[l], acc.v[l]);
      if constexpr (has_min(wtype)) acc.v[l] = fused(t.min[p][l], xs[l], acc.v[l]);
    }
  }
  return acc;
}

inline float acc_sum(Acc a) {
  for (int h = QLANES / 2; h > 0; h /= 2)
    for (int j = 0; j < h; ++j) a.v[j] += a.v[j + h];
  return a.v[0];
}
#endif

// ---------------------------------------------------------------------------- the projection

constexpr int QUANT_MT = 16;  // input rows per tile

// y[m, n0 .. n1) for the MT input rows of a tile (their groups at x, groups · gb bytes a row)
// against weight rows n0 .. n1: each weight group is unpacked once for the MT rows.
template <int wtype, int MT>
void qtile_rows(const uint8_t* __restrict__ x, int64_t groups, int last_count, const uint8_t* __restrict__ w,
                int64_t row_bytes, float* __restrict__ y, int64_t ldy, const float* __restrict__ bias,
                const float* __restrict__ res, int64_t ldr, int64_t n0, int64_t n1) {
  constexpr int64_t gb = group_bytes(dot_values(wtype));
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wrow = w + n * row_bytes;
    Acc acc[MT];
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) acc[m] = acc_zero();
    for (int64_t g = 0; g < groups; ++g) {
      if constexpr (dot_values(wtype) == 32 && wtype != QUANT_Q4_K) {  // (Q4_K's short groups have 8 blocks)
        if (g == groups - 1 && last_count <= 4) {
          ShortGroup t;
          unpack_short<wtype>(wrow, g, last_count, t);
#pragma GCC unroll 16
          for (int m = 0; m < MT; ++m) acc[m] = short_dot<wtype>(t, x + (m * groups + g) * gb, acc[m]);
          continue;
        }
      }
      WeightGroup wg;
      if (g < groups - 1 || last_count == QLANES)
        unpack_group<wtype, true>(wrow, g, QLANES, wg);
      else
        unpack_group<wtype, false>(wrow, g, last_count, wg);
#pragma GCC unroll 16
      for (int m = 0; m < MT; ++m) acc[m] = group_dot<wtype, (MT <= 1)>(wg, x + (m * groups + g) * gb, acc[m]);
    }
    for (int m = 0; m < MT; ++m) {
      float s = acc_sum(acc[m]);
      if (bias) s += bias[n];
      if (res) s = res[m * ldr + n] + s;
      y[m * ldy + n] = s;
    }
  }
}

using QTileRows = void (*)(const uint8_t*, int64_t, int, const uint8_t*, int64_t, float*, int64_t, const float*,
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
  const int BV = dot_values(wtype);
  const int64_t nb = K / BV, groups = (nb + QLANES - 1) / QLANES, gb = group_bytes(BV);
  const int last_count = int(nb - (groups - 1) * QLANES);
  const int64_t row_bytes = K / f.block_size * f.block_bytes, x_row_bytes = groups * gb;
  std::unique_ptr<Line64[]> xq(new Line64[size_t(M * x_row_bytes / 64)]);  // (quantize_row writes every byte)
  uint8_t* xqb = xq[0].b;
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
      quantize_row(xm, K, wtype, xqb + m * x_row_bytes);
    }
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t n0 = t * QUANT_ROWS_PER_TASK, n1 = std::min(N, n0 + QUANT_ROWS_PER_TASK);
      for (int64_t m0 = 0; m0 < M; m0 += QUANT_MT) {
        const int mt = int(std::min<int64_t>(QUANT_MT, M - m0));
        tiles[mt - 1](xqb + m0 * x_row_bytes, groups, last_count, w, row_bytes, y + m0 * ldy, ldy, bias,
                      residual ? residual + m0 * ldr : nullptr, ldr, n0, n1);
      }
    }
  }
  return 0;
}

}  // namespace
