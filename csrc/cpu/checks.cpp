// Value checks of the ops' inputs on CPU tensors, in one pass: the checks run on every
// call (DESIGN: always on CPU tensors), and torch's version of the draft-probability check
// (isfinite, < 0, any, float64 row sums: five passes and temporaries over [N, V]) cost
// more than the fused rejection kernel it guards.
#include "common.h"

namespace {

// per row r of p [rows, cols] (row stride ld): first_bad[r] = the first column whose value
// is not finite or negative (-1 when none), sums[r] = Σ_j p[r, j] in float64
template <typename T>
void probs_rows(const T* p, int64_t rows, int64_t cols, int64_t ld, int64_t* first_bad, double* sums, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * cols >= (1 << 18))
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = p + r * ld;
    int64_t bad = -1;
    double sum = 0.0;
    for (int64_t j0 = 0; j0 < cols && bad < 0; j0 += 1024) {  // blocks: float partial sums, exact enough
      const int64_t j1 = std::min(cols, j0 + 1024);
      float part = 0.f;
      bool ok = true;
#pragma omp simd reduction(+ : part) reduction(&& : ok)
      for (int64_t j = j0; j < j1; ++j) {
        const float x = to_float(row[j]);
        ok = ok && (x >= 0.f && x <= std::numeric_limits<float>::max());  // false for NaN, inf, < 0
        part += x;
      }
      if (!ok) {
        for (int64_t j = j0; j < j1; ++j) {
          const float x = to_float(row[j]);
          if (!(x >= 0.f && x <= std::numeric_limits<float>::max())) {
            bad = j;
            break;
          }
        }
      }
      sum += double(part);
    }
    first_bad[r] = bad;
    sums[r] = sum;
  }
}

}  // namespace

extern "C" void fastverify_check_probs(const void* p, int dtype, int64_t rows, int64_t cols, int64_t ld,
                                       int64_t* first_bad, double* sums, int threads) {
  switch (dtype) {
    case DTYPE_BF16: probs_rows(static_cast<const bf16*>(p), rows, cols, ld, first_bad, sums, threads); break;
    case DTYPE_F16: probs_rows(static_cast<const fp16*>(p), rows, cols, ld, first_bad, sums, threads); break;
    default: probs_rows(static_cast<const float*>(p), rows, cols, ld, first_bad, sums, threads); break;
  }
}
