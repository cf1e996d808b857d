// y[M, N] = x[M, K] · W[N, K]ᵀ (+ bias[N]) in fp32 for a few rows M (1..8): the decode-step
// projections of fastverify.models on CPU.
//
// Why: a decode step multiplies one (or a few) rows by every weight matrix, so it is bound
// by streaming the weights from memory. MKL's sgemv/sgemm reach about half the bandwidth
// of two cores for these shapes (perf/decode_step.py); this loop, split over output rows
// across the OpenMP threads torch already runs, reaches it: every weight row is read once,
// in 16-float vectors, against all M input rows, with R·M independent accumulators so the
// FMA latency stays hidden.
//
// Plain C ABI (loaded with ctypes by fastverify/models/cpu_linear.py): no torch headers,
// so it builds in about a second. It links the libgomp torch already loaded (same soname),
// so both share one thread pool.
#include <cstdint>
#include <cstring>

namespace {

constexpr int V = 16;  // floats per step: one AVX-512 register (two AVX2 ones)

// Output rows n0 .. n0+R-1 against the M input rows. Plain loops over 16-float steps
// that GCC vectorizes (-O3 -march=native); each weight row is streamed front to back.
template <int M, int R>
inline void rows_block(const float* __restrict__ x, int64_t ldx, const float* __restrict__ w, int64_t K,
                       float* __restrict__ y, int64_t ldy, const float* __restrict__ bias, int64_t n0) {
  const int64_t K16 = K - K % V;
  for (int r = 0; r < R; ++r) {
    const float* __restrict__ wr = w + (n0 + r) * K;
    float acc[M][V] = {};
    for (int64_t k = 0; k < K16; k += V)
      for (int m = 0; m < M; ++m) {
        const float* __restrict__ xm = x + m * ldx + k;
#pragma omp simd
        for (int j = 0; j < V; ++j) acc[m][j] += wr[k + j] * xm[j];
      }
    for (int m = 0; m < M; ++m) {
      float s = 0.f;
      for (int j = 0; j < V; ++j) s += acc[m][j];
      for (int64_t k = K16; k < K; ++k) s += wr[k] * x[m * ldx + k];
      if (bias) s += bias[n0 + r];
      y[m * ldy + n0 + r] = s;
    }
  }
}

template <int M>
void linear_rows(const float* x, int64_t ldx, const float* w, const float* bias, float* y, int64_t ldy, int64_t N,
                 int64_t K, int threads) {
  // enough independent accumulators per weight pass, within the 32 vector registers
  constexpr int R = 4;  // rows per scheduling unit
  const int64_t blocks = N / R;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t b = 0; b < blocks; ++b) rows_block<M, R>(x, ldx, w, K, y, ldy, bias, b * R);
  for (int64_t n = blocks * R; n < N; ++n) rows_block<M, 1>(x, ldx, w, K, y, ldy, bias, n);
}

}  // namespace

extern "C" {

// Returns 0 on success, 1 when M is outside 1..8 (the caller checks shapes and strides).
int fastverify_linear_f32(const float* x, int64_t ldx, const float* w, const float* bias, float* y, int64_t ldy,
                          int64_t M, int64_t N, int64_t K, int threads) {
  switch (M) {
    case 1: linear_rows<1>(x, ldx, w, bias, y, ldy, N, K, threads); return 0;
    case 2: linear_rows<2>(x, ldx, w, bias, y, ldy, N, K, threads); return 0;
    case 3: linear_rows<3>(x, ldx, w, bias, y, ldy, N, K, threads); return 0;
    case 4: linear_rows<4>(x, ldx, w, bias, y, ldy, N, K, threads); return 0;
    case 5: linear_rows<5>(x, ldx, w, bias, y, ldy, N, K, threads); return 0;
    case 6: linear_rows<6>(x, ldx, w, bias, y, ldy, N, K, threads); return 0;
    case 7: linear_rows<7>(x, ldx, w, bias, y, ldy, N, K, threads); return 0;
    case 8: linear_rows<8>(x, ldx, w, bias, y, ldy, N, K, threads); return 0;
    default: return 1;
  }
}

}  // extern "C"
