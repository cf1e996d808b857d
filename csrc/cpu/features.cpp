// Which instruction-set paths this build of the CPU kernels compiled in (the compiler's
// macros under FASTVERIFY_CPU_ISA's -march): reported by fastverify.cpu.features() and
// by the benchmark reports, and checked by the tests of the portable build.
#include <cstdint>

extern "C" int64_t fastverify_cpu_features() {
  int64_t f = 0;
#if defined(__AVX2__)
  f |= 1;
#endif
#if defined(__FMA__)
  f |= 2;
#endif
#if defined(__F16C__)
  f |= 4;
#endif
#if defined(__AVX512F__)
  f |= 8;
#endif
#if defined(__AVX512BF16__)
  f |= 16;
#endif
#if defined(__AVX512VNNI__)
  f |= 32;
#endif
  return f;
}
