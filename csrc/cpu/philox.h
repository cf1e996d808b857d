// Philox4x32-10 (Salmon et al., SC'11) on the host: the same bits as
// fastverify/ops/philox.py (the specification), fastverify/triton/philox.py and
// csrc/cuda/philox.cuh.
//
//   key     = (seed mod 2^32, seed div 2^32)
//   counter = (position mod 2^32, position div 2^32, attempt or subset row, stream)
//   per round:  (c0, c1, c2, c3) <- (hi(B*c2) ^ c1 ^ k0,  lo(B*c2),  hi(A*c0) ^ c3 ^ k1,  lo(A*c0))
//               (k0, k1) += (0x9E3779B9, 0xBB67AE85)
//
// Lane o0 decides acceptance, lane o1 draws the emitted token; a uint32 x becomes the
// float32 uniform (x >> 8) * 2^-24 in [0, 1), exact everywhere.
#pragma once

#include <cmath>
#include <cstdint>

namespace {

struct Philox4 {
  uint32_t o[4];
};

inline Philox4 philox4x32_10(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3) {
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t pb = uint64_t(0xCD9E8D57u) * c2, pa = uint64_t(0xD2511F53u) * c0;
    const uint32_t n0 = uint32_t(pb >> 32) ^ c1 ^ k0, n2 = uint32_t(pa >> 32) ^ c3 ^ k1;
    c1 = uint32_t(pb);
    c3 = uint32_t(pa);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {{c0, c1, c2, c3}};
}

// uint32 -> float32 uniform in [0, 1): the top 24 bits times 2^-24 (exact)
inline float philox_to_uniform(uint32_t x) { return float(x >> 8) * 5.9604644775390625e-08f; }

// Philox of counter (position lo, position hi, c2, stream) under key seed
inline Philox4 philox_at(int64_t seed, int64_t position, uint32_t c2, uint32_t stream) {
  const uint64_t pos = uint64_t(position);
  return philox4x32_10(uint64_t(seed), uint32_t(pos), uint32_t(pos >> 32), c2, stream);
}

// the verification ops' uniform of `lane` (0 accept, 1 sample) at (seed, position, attempt)
inline float uniform_at(int64_t seed, int64_t position, uint32_t attempt, int lane, uint32_t stream = 0) {
  return philox_to_uniform(philox_at(seed, position, attempt, stream).o[lane]);
}

}  // namespace
