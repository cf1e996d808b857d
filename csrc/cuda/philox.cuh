// Philox4x32-10 (Salmon et al., SC'11): the same bits as fastverify/ops/philox.py and
// fastverify/triton/philox.py.
//
//   key     = (seed mod 2^32, seed div 2^32)
//   counter = (position mod 2^32, position div 2^32, attempt, 0)
//   per round:  (c0, c1, c2, c3) <- (hi(B*c2) ^ c1 ^ k0,  lo(B*c2),  hi(A*c0) ^ c3 ^ k1,  lo(A*c0))
//               (k0, k1) += (0x9E3779B9, 0xBB67AE85)
//
// Lane o0 decides acceptance, lane o1 draws the emitted token; a uint32 x becomes the
// float32 uniform (x >> 8) * 2^-24 in [0, 1), exact in every backend.
//
// Host-callable too (the high half of the product then comes from a 64-bit multiply),
// so the bits can be checked without a GPU.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace fastverify {

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

__host__ __device__ __forceinline__ uint32_t philox_mulhi(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * static_cast<uint64_t>(b)) >> 32);
#endif
}

// Philox4x32-10 of counter (c0, c1, c2, c3) under the 64-bit key `seed`.
__host__ __device__ __forceinline__ uint4 philox4x32_10(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2,
                                                        uint32_t c3) {
  uint32_t k0 = static_cast<uint32_t>(seed & 0xFFFFFFFFull);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint32_t n0 = philox_mulhi(kPhiloxRoundB, c2) ^ c1 ^ k0;
    const uint32_t n2 = philox_mulhi(kPhiloxRoundA, c0) ^ c3 ^ k1;
    c1 = kPhiloxRoundB * c2;
    c3 = kPhiloxRoundA * c0;
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return make_uint4(c0, c1, c2, c3);
}

// uint32 -> float32 uniform in [0, 1): the top 24 bits times 2^-24 (exact).
__host__ __device__ __forceinline__ float philox_to_uniform(uint32_t x) {
  return static_cast<float>(x >> 8) * 5.9604644775390625e-08f;
}

// (acceptance uniform, sampling uniform) keyed by (seed, position, attempt): lanes o0
// and o1 of one Philox call with counter (position lo, position hi, attempt, 0).
__host__ __device__ __forceinline__ float2 uniform_pair(int64_t seed, int64_t position, uint32_t attempt) {
  const uint64_t pos = static_cast<uint64_t>(position);
  const uint4 o = philox4x32_10(static_cast<uint64_t>(seed), static_cast<uint32_t>(pos & 0xFFFFFFFFull),
                                static_cast<uint32_t>(pos >> 32), attempt, 0u);
  return make_float2(philox_to_uniform(o.x), philox_to_uniform(o.y));
}

}  // namespace fastverify
