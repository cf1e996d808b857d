// Projections of a few rows: y[M, N] = prologue(x)[M, K] · W[N, K]ᵀ (+ bias) (+ residual),
// M = 1..16, streaming each weight row once for all M rows. Shared by the models' fused
// decode step (step.cpp) and the LM-head ops.
#pragma once

#include "common.h"

namespace {

// ---------------------------------------------------------------------------- projections

// Output rows n0 .. n0+R-1 against the M input rows, in 16-float steps with M (or R·M)
// independent accumulators. Up to 4 inputs the R rows are streamed one after the other
// (each weight vector feeds M FMAs; measured 15–20% faster than interleaving rows, which
// splits the prefetchers over more streams). Beyond, loads per FMA bound the speed (the two
// hardware threads of a core share its load ports and FMA units), so the R rows are
// streamed together: each step loads R weight vectors and M inputs for R·M FMAs.
template <int M, int R>
inline void rows_block(const float* __restrict__ x, int64_t ldx, const float* __restrict__ w, int64_t K,
                       float* __restrict__ y, int64_t ldy, const float* __restrict__ bias,
                       const float* __restrict__ res, int64_t ldr, int64_t n0) {
  const int64_t K16 = K - K % V;
  const float* __restrict__ wr = w + n0 * K;
  auto store = [&](int r, const float (&acc)[M][V]) {
    for (int m = 0; m < M; ++m) {
      float s = 0.f;
      for (int j = 0; j < V; ++j) s += acc[m][j];
      for (int64_t k = K16; k < K; ++k) s += wr[r * K + k] * x[m * ldx + k];
      if (bias) s += bias[n0 + r];
      if (res) s = res[m * ldr + n0 + r] + s;
      y[m * ldy + n0 + r] = s;
    }
  };
  if constexpr (M <= 4) {
    for (int r = 0; r < R; ++r) {
      float acc[M][V] = {};
      for (int64_t k = 0; k < K16; k += V)
        for (int m = 0; m < M; ++m) {
          const float* __restrict__ xm = x + m * ldx + k;
#pragma omp simd
          for (int j = 0; j < V; ++j) acc[m][j] += wr[r * K + k + j] * xm[j];
        }
      store(r, acc);
    }
  } else {
    float acc[R][M][V] = {};
    for (int64_t k = 0; k < K16; k += V)
#pragma GCC unroll 16
      for (int m = 0; m < M; ++m) {
        const float* __restrict__ xm = x + m * ldx + k;
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
#pragma omp simd
          for (int j = 0; j < V; ++j) acc[r][m][j] += wr[r * K + k + j] * xm[j];
        }
      }
    for (int r = 0; r < R; ++r) store(r, acc[r]);
  }
}

// weight rows per scheduling unit: 4 one after the other up to 4 inputs; beyond, R·M
// accumulators and R weight vectors within the 32 vector registers
constexpr int rows_per_block(int M) { return M <= 4 ? 4 : std::max(1, 28 / (M + 1)); }

template <int M>
void linear_rows(const float* x, int64_t ldx, const float* w, const float* bias, const float* res, int64_t ldr,
                 float* y, int64_t ldy, int64_t N, int64_t K, int threads) {
  constexpr int R = rows_per_block(M);
  const int64_t blocks = N / R;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t b = 0; b < blocks; ++b) rows_block<M, R>(x, ldx, w, K, y, ldy, bias, res, ldr, b * R);
  for (int64_t n = blocks * R; n < N; ++n) rows_block<M, 1>(x, ldx, w, K, y, ldy, bias, res, ldr, n);
}

constexpr int MAX_ROWS = 16;
using LinearRows = void (*)(const float*, int64_t, const float*, const float*, const float*, int64_t, float*, int64_t,
                            int64_t, int64_t, int);
template <std::size_t... I>
constexpr std::array<LinearRows, sizeof...(I)> linear_table(std::index_sequence<I...>) {
  return {&linear_rows<int(I) + 1>...};
}
constexpr auto LINEAR_ROWS = linear_table(std::make_index_sequence<MAX_ROWS>{});

// y[M, N] = prologue(x)[M, K] · W[N, K]ᵀ (+ bias[N]) (+ residual[M, N]) for M in 1..16.
// prologue: none; RMSNorm with weight norm_w (norm_w != null); or SwiGLU (swiglu != 0), where x
// is [M, 2K] = [gate | up] and the input is silu(gate) · up.
// Returns 0 on success, 1 when M is outside 1..16.
inline int linear_f32(const float* x, int64_t ldx, const float* w, const float* bias, const float* residual,
                      int64_t ldr, float* y, int64_t ldy, int64_t M, int64_t N, int64_t K, const float* norm_w,
                      float eps, int swiglu, int threads) {
  if (M < 1 || M > MAX_ROWS) return 1;
  std::vector<float> pre;
  if (norm_w || swiglu) {
    pre.resize(M * K);
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * ldx;
      float* pm = pre.data() + m * K;
      if (norm_w) {
        rms_norm_row(xm, norm_w, eps, K, pm);
      } else {
        for (int64_t k = 0; k < K; ++k) {
          const float g = xm[k];
          pm[k] = g / (1.f + std::exp(-g)) * xm[K + k];
        }
      }
    }
    x = pre.data();
    ldx = K;
  }
  LINEAR_ROWS[M - 1](x, ldx, w, bias, residual, ldr, y, ldy, N, K, threads);
  return 0;
}

}  // namespace
