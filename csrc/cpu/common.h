// Shared pieces of the CPU kernels (csrc/cpu/*.cpp): vector width, fast exp, dot
// product, element loads of fp32 / bf16 / fp16 and the RMSNorm row. Every kernel file
// includes it; each keeps its own copy (an anonymous namespace), so no symbol of these
// helpers crosses a translation unit.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int V = 16;  // floats per step: one AVX-512 register (two AVX2 ones)
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// Element types of the ops' tensors (the Python side passes DTYPE_* codes): 16-bit
// floats are stored as their bits and widened to fp32 on load (fp32 accumulation).
enum Dtype { DTYPE_F32 = 0, DTYPE_BF16 = 1, DTYPE_F16 = 2 };
struct bf16 { uint16_t bits; };
struct fp16 { uint16_t bits; };

inline float to_float(float x) { return x; }
inline float to_float(bf16 x) {
  const uint32_t u = uint32_t(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline float to_float(fp16 x) {
#if defined(__F16C__)
  return _cvtsh_ss(x.bits);
#else
  const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16, exp = (x.bits >> 10) & 0x1Fu, man = x.bits & 0x3FFu;
  uint32_t u;
  if (exp == 0x1F) {
    u = sign | 0x7F800000u | (man << 13);  // inf / NaN
  } else if (exp != 0) {
    u = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal: value = man · 2^-24, exact in fp32
    float f = float(man) * 5.9604644775390625e-08f;
    std::memcpy(&u, &f, sizeof u);
    u |= sign;
  }
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// w · x · rsqrt(mean(x²) + eps) of one row of K floats (the order of operations of the torch model)
inline void rms_norm_row(const float* __restrict__ x, const float* __restrict__ w, float eps, int64_t K,
                         float* __restrict__ out) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t k = 0; k < K; ++k) ss += x[k] * x[k];
  const float r = 1.f / std::sqrt(ss / float(K) + eps);
#pragma omp simd
  for (int64_t k = 0; k < K; ++k) out[k] = w[k] * (x[k] * r);
}

// e^x for x <= 0 in a form GCC vectorizes (std::exp is a scalar libm call: ~15 ns, which
// made it the cost of attention): e^x = 2^n · 2^f, n = round(x·log2 e), |f| <= 1/2, 2^f by its
// degree-7 Taylor series (relative error < 2e-8 + rounding). x below -87 gives ~1e-38, not 0.
inline float exp_nonpositive(float x) {
  float y = x * 1.4426950408889634f;
  y = y < -126.f ? -126.f : y;
  const float n = std::floor(y + 0.5f);
  const float f = (y - n) * 0.6931471805599453f;  // 2^(y-n) = e^f
  float p = 1.f / 5040.f;
  p = p * f + 1.f / 720.f;
  p = p * f + 1.f / 120.f;
  p = p * f + 1.f / 24.f;
  p = p * f + 1.f / 6.f;
  p = p * f + 0.5f;
  p = p * f + 1.f;
  p = p * f + 1.f;
  const int32_t bits = (int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// a · b over D floats. With AVX-512 (D a multiple of 16) one register accumulates and a
// shuffle tree reduces it: GCC's own reduction of a runtime-length loop spills to the stack.
inline float dot(const float* __restrict__ a, const float* __restrict__ b, int D) {
#if defined(__AVX512F__)
  if (D % 16 == 0) {
    __m512 acc = _mm512_setzero_ps();
    for (int i = 0; i < D; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    return _mm512_reduce_add_ps(acc);
  }
#endif
  float d = 0.f;
#pragma omp simd reduction(+ : d)
  for (int i = 0; i < D; ++i) d += a[i] * b[i];
  return d;
}

}  // namespace
