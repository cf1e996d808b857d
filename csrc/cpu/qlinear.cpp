// Entry points of the projections on GGUF quantized weight blocks (quant.h), wrapped by
// fastverify/cpu/quant.py, which checks the shapes, types and bounds these functions trust.
#include "quant.h"

extern "C" {

// y[M, N] = prologue(x) · Wᵀ (+ bias) (+ residual) with W as raw blocks of ggml type wtype
// (quant.h's qlinear: 0 on success, nonzero for an unknown type or K not a multiple of the block).
int fastverify_qlinear(const float* x, int64_t ldx, const uint8_t* w, int wtype, const float* bias,
                       const float* residual, int64_t ldr, float* y, int64_t ldy, int64_t M, int64_t N, int64_t K,
                       const float* norm_w, float eps, int swiglu, int threads) {
  return qlinear(x, ldx, w, wtype, bias, residual, ldr, y, ldy, M, N, K, norm_w, eps, swiglu, threads);
}

// out[i, :] = row rows[i] of W (ggml type wtype, K values a row) as float32, i < n.
// Returns 0, or 1 for an unknown type, 2 for K not a multiple of the block size.
int fastverify_dequantize_rows(const uint8_t* w, int wtype, int64_t K, const int64_t* rows, int64_t n, float* out,
                               int threads) {
  QuantFormat f{};
  if (!quant_format(wtype, f)) return 1;
  if (K < 1 || K % f.block_size) return 2;
  const int64_t row_bytes = K / f.block_size * f.block_bytes;
#pragma omp parallel for num_threads(threads) schedule(static) if (n > 1)
  for (int64_t i = 0; i < n; ++i) dequantize_row(w + rows[i] * row_bytes, wtype, K, out + i * K);
  return 0;
}

}  // extern "C"
