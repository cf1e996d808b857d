// Projections of a few rows: y[M, N] = prologue(x)[M, K] · W[N, K]ᵀ (+ bias) (+ residual),
// M = 1..16, streaming each weight row once for all M rows. Shared by the models' fused
// decode step (step.cpp) and the LM-head ops.
#pragma once

#include <type_traits>

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

// ---------------------------------------------------------------------------- blocks of dot products
//
// y[m, n] = Σ_k x[m, k] · w[n, k] for a block of MR input rows and NR weight rows, fp32
// accumulation, weights fp32 / bf16 / fp16 (the LM-head ops' tiles; the decode step keeps
// linear_f32 above). Register blocking: MR·NR accumulators of 16 lanes; each step loads MR
// input vectors and NR weight vectors for MR·NR multiply-adds, so a weight vector read from
// memory feeds MR rows and an input vector NR rows.
//
// Every (m, n) has its own 16-lane accumulator, fed in the same k order by every block shape,
// then reduced by one fixed tree: a dot product has the same bits whatever MR, NR (how many
// rows a call has, which thread runs it). Lane j holds the terms k ≡ j (mod 16) (mod 32
// pairs with AVX512-BF16); the K % 16 tail enters by zero-masked loads (AVX-512) or as
// lanes 0.. of one last step (portable).

constexpr int DOT_MR = 4;  // input rows per block: 4·6 accumulators + 4 inputs + 1 weight vector of 32 registers
constexpr int DOT_NR = 6;  // weight rows per block

#if defined(__AVX512F__)
inline __m512 load16_f32(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16_f32(const fp16* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}
inline __m512 load16_f32(const bf16* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

// fp32 inputs x against weights TW (converted to fp32 on load): acc += x · w by FMA.
template <typename TW, int MR, int NR>
inline void dot_block(const float* __restrict__ x, int64_t ldx, const TW* __restrict__ w, int64_t ldw, int64_t K,
                      float* __restrict__ y, int64_t ldy) {
  __m512 acc[MR][NR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) acc[m][n] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += V) {
    const __mmask16 mask = K - k >= V ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1);
    __m512 xv[MR];
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) xv[m] = load16_f32(x + m * ldx + k, mask);
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) {
      const __m512 wv = load16_f32(w + n * ldw + k, mask);
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) acc[m][n] = _mm512_fmadd_ps(xv[m], wv, acc[m][n]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) y[m * ldy + n] = _mm512_reduce_add_ps(acc[m][n]);
}
#else
// one step of 16 k: acc[m][n][j] += x[m, j] · w[n, j]
template <typename TW, int MR, int NR>
inline void dot_step(float (&acc)[MR][NR][V], const float* __restrict__ x, int64_t ldx, const TW* __restrict__ w,
                     int64_t ldw) {
  for (int n = 0; n < NR; ++n) {
    float wv[V];
#pragma omp simd
    for (int j = 0; j < V; ++j) wv[j] = to_float(w[n * ldw + j]);
    for (int m = 0; m < MR; ++m) {
#pragma omp simd
      for (int j = 0; j < V; ++j) acc[m][n][j] += x[m * ldx + j] * wv[j];
    }
  }
}

template <typename TW, int MR, int NR>
inline void dot_block(const float* __restrict__ x, int64_t ldx, const TW* __restrict__ w, int64_t ldw, int64_t K,
                      float* __restrict__ y, int64_t ldy) {
  float acc[MR][NR][V] = {};
  const int64_t K16 = K - K % V;
  for (int64_t k = 0; k < K16; k += V) dot_step<TW, MR, NR>(acc, x + k, ldx, w + k, ldw);
  if (K16 < K) {  // the tail, zero-padded to one step (as the masked loads of AVX-512)
    float xt[MR * V] = {};
    TW wt[NR * V] = {};
    for (int64_t j = 0; j < K - K16; ++j) {
      for (int m = 0; m < MR; ++m) xt[m * V + j] = x[m * ldx + K16 + j];
      for (int n = 0; n < NR; ++n) wt[n * V + j] = w[n * ldw + K16 + j];
    }
    dot_step<TW, MR, NR>(acc, xt, V, wt, V);
  }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) {
      float s[V];
      for (int j = 0; j < V; ++j) s[j] = acc[m][n][j];
      for (int h = V / 2; h > 0; h /= 2)  // a fixed pairwise tree
        for (int j = 0; j < h; ++j) s[j] += s[j + h];
      y[m * ldy + n] = s[0];
    }
}
#endif

#if defined(__AVX512BF16__)
// bf16 inputs against bf16 weights with AVX512-BF16: each vdpbf16ps multiplies 32 pairs
// (exact bf16 products) and adds them to the 16 fp32 lanes, k pairs (2j, 2j+1) in lane j.
template <int MR, int NR>
inline void dot_block_bf16(const bf16* __restrict__ x, int64_t ldx, const bf16* __restrict__ w, int64_t ldw,
                           int64_t K, float* __restrict__ y, int64_t ldy) {
  __m512 acc[MR][NR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) acc[m][n] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 2 * V) {
    const __mmask32 mask = K - k >= 2 * V ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << (K - k)) - 1);
    __m512bh xv[MR];
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) xv[m] = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * ldx + k);
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) {
      const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + n * ldw + k);
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) acc[m][n] = _mm512_dpbf16_ps(acc[m][n], xv[m], wv);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) y[m * ldy + n] = _mm512_reduce_add_ps(acc[m][n]);
}

// Many input rows against bf16 weights (AVX512-BF16): the inputs are the vector operand.
// They are packed once per call as 32-bit (even k, odd k) pairs, 64 rows per chunk,
//     xp[chunk][p][r] = (x[64·chunk + r, 2p], x[64·chunk + r, 2p + 1])     (zero padded),
// so that one vdpbf16ps multiplies 16 rows' pair p by one weight pair broadcast from its row:
// MV·16 rows x NR weight rows per block, MV·NR accumulators, MV vector loads and NR 4-byte
// broadcasts per step (the dot-product blocks above load MR + NR full vectors, twice the
// cache traffic). The k loop is blocked by PACK_KC pairs so the packed block (MV·4 KB) stays
// in L1 while the tile's weight blocks stream past it; the accumulators go through a
// buffer between blocks. Lane r of an accumulator sums row r's pairs in k order: a row's
// scores do not depend on the other rows of the call (but differ in rounding from the
// dot-product blocks, which split k over 16 lanes).
constexpr int64_t PACK_ROWS = 64;  // rows per packed chunk (MV <= 4 vectors)
constexpr int64_t PACK_KC = 128;   // k pairs per step of the blocked loop (measured: 64 -> 128 is +4%)

// xp of the M x K bf16 inputs: ceil(M / 64) chunks of [ceil(K / 2)][64] pairs
inline void pack_pairs_bf16(const bf16* x, int64_t ldx, int64_t M, int64_t K, uint32_t* xp) {
  const int64_t P = (K + 1) / 2, chunks = (M + PACK_ROWS - 1) / PACK_ROWS;
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t p = 0; p < P; ++p)
      for (int64_t r = 0; r < PACK_ROWS; ++r) {
        const int64_t m = c * PACK_ROWS + r;
        const uint32_t lo = m < M ? x[m * ldx + 2 * p].bits : 0u;
        const uint32_t hi = m < M && 2 * p + 1 < K ? x[m * ldx + 2 * p + 1].bits : 0u;
        xp[(c * P + p) * PACK_ROWS + r] = lo | (hi << 16);
      }
}

// acc[n][r] (+)= Σ_{p0 <= p < p1} xp[p][r] · w[n, 2p .. 2p+1] for NR weight rows, MV·16 rows r
template <int MV, int NR>
inline void packed_block_bf16(const uint32_t* __restrict__ xp, const bf16* __restrict__ w, int64_t ldw, int64_t K,
                              int64_t p0, int64_t p1, float* __restrict__ acc_buf, bool first) {
  __m512 acc[MV][NR];
#pragma GCC unroll 8
  for (int n = 0; n < NR; ++n)
#pragma GCC unroll 4
    for (int v = 0; v < MV; ++v)
      acc[v][n] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(acc_buf + n * PACK_ROWS + v * V);
  const int64_t full = std::min(p1, K / 2);  // pairs with both elements inside the row
#pragma GCC unroll 8
  for (int n = 0; n < NR; ++n)  // the next block's weight lines
    for (int64_t b = 0; b < 4 * PACK_KC; b += 64)
      _mm_prefetch(reinterpret_cast<const char*>(w + n * ldw) + 4 * p1 + b, _MM_HINT_T0);
  for (int64_t p = p0; p < full; ++p) {
    __m512bh xv[MV];
#pragma GCC unroll 4
    for (int v = 0; v < MV; ++v) xv[v] = (__m512bh)_mm512_loadu_si512(xp + p * PACK_ROWS + v * V);
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) {
      int32_t pair;
      std::memcpy(&pair, w + n * ldw + 2 * p, sizeof pair);
      const __m512bh wb = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
      for (int v = 0; v < MV; ++v) acc[v][n] = _mm512_dpbf16_ps(acc[v][n], xv[v], wb);
    }
  }
  if (full < p1) {  // odd K: the last pair holds one element (never read past the row)
    __m512bh xv[MV];
    for (int v = 0; v < MV; ++v) xv[v] = (__m512bh)_mm512_loadu_si512(xp + full * PACK_ROWS + v * V);
    for (int n = 0; n < NR; ++n) {
      const __m512bh wb = (__m512bh)_mm512_set1_epi32(int32_t(w[n * ldw + 2 * full].bits));
      for (int v = 0; v < MV; ++v) acc[v][n] = _mm512_dpbf16_ps(acc[v][n], xv[v], wb);
    }
  }
#pragma GCC unroll 8
  for (int n = 0; n < NR; ++n)
#pragma GCC unroll 4
    for (int v = 0; v < MV; ++v) _mm512_storeu_ps(acc_buf + n * PACK_ROWS + v * V, acc[v][n]);
}

using PackedBlock = void (*)(const uint32_t*, const bf16*, int64_t, int64_t, int64_t, int64_t, float*, bool);
template <int MV, std::size_t... N>
constexpr std::array<PackedBlock, sizeof...(N)> packed_row_table(std::index_sequence<N...>) {
  return {&packed_block_bf16<MV, int(N) + 1>...};
}
template <std::size_t... M>
constexpr std::array<std::array<PackedBlock, DOT_NR>, sizeof...(M)> packed_table(std::index_sequence<M...>) {
  return {packed_row_table<int(M) + 1>(std::make_index_sequence<DOT_NR>{})...};
}
constexpr auto PACKED_BLOCKS = packed_table(std::make_index_sequence<PACK_ROWS / V>{});

// y[m, n] = Σ_k x[m, k] · w[n, k] for the M <= 64 rows of one packed chunk xp and N weight
// rows (one thread); acc_buf: N·64 floats of scratch.
inline void linear_tile_packed_bf16(const uint32_t* xp, int64_t M, const bf16* w, int64_t ldw, int64_t N, int64_t K,
                                    float* y, int64_t ldy, float* acc_buf) {
  const int mv = int((M + V - 1) / V);
  const int64_t P = (K + 1) / 2;
  for (int64_t p0 = 0; p0 < P; p0 += PACK_KC) {
    const int64_t p1 = std::min(P, p0 + PACK_KC);
    for (int64_t n0 = 0; n0 < N; n0 += DOT_NR) {
      const int nr = int(std::min<int64_t>(DOT_NR, N - n0));
      PACKED_BLOCKS[mv - 1][nr - 1](xp, w + n0 * ldw, ldw, K, p0, p1, acc_buf + n0 * PACK_ROWS, p0 == 0);
    }
  }
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) y[m * ldy + n] = acc_buf[n * PACK_ROWS + m];
}
#endif

// Whether inputs of weight type TW stay in TW (bf16 with AVX512-BF16) rather than being
// widened to fp32 once per call (the caller converts x).
template <typename TW>
constexpr bool dot_native_input() {
#if defined(__AVX512BF16__)
  return std::is_same_v<TW, bf16>;
#else
  return false;
#endif
}
template <typename TW>
using DotInput = std::conditional_t<dot_native_input<TW>(), TW, float>;

template <typename TW, int MR, int NR>
inline void dot_block_any(const DotInput<TW>* x, int64_t ldx, const TW* w, int64_t ldw, int64_t K, float* y,
                          int64_t ldy) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<TW, bf16>) {
    dot_block_bf16<MR, NR>(x, ldx, w, ldw, K, y, ldy);
    return;
  } else
#endif
  {
    dot_block<TW, MR, NR>(x, ldx, w, ldw, K, y, ldy);
  }
}

template <typename TW>
using DotBlock = void (*)(const DotInput<TW>*, int64_t, const TW*, int64_t, int64_t, float*, int64_t);
template <typename TW, int MR, std::size_t... N>
constexpr std::array<DotBlock<TW>, sizeof...(N)> dot_row_table(std::index_sequence<N...>) {
  return {&dot_block_any<TW, MR, int(N) + 1>...};
}
template <typename TW, std::size_t... M>
constexpr std::array<std::array<DotBlock<TW>, DOT_NR>, sizeof...(M)> dot_table(std::index_sequence<M...>) {
  return {dot_row_table<TW, int(M) + 1>(std::make_index_sequence<DOT_NR>{})...};
}
template <typename TW>
constexpr auto DOT_BLOCKS = dot_table<TW>(std::make_index_sequence<DOT_MR>{});

// y[m, n] = Σ_k x[m, k] · w[n, k] for M input rows and N weight rows (one thread): weight
// blocks of DOT_NR rows outside, input blocks of DOT_MR rows inside, so a weight block is
// read from memory once and from cache by the other input blocks.
template <typename TW>
inline void linear_tile(const DotInput<TW>* x, int64_t ldx, int64_t M, const TW* w, int64_t ldw, int64_t N, int64_t K,
                        float* y, int64_t ldy) {
  for (int64_t n0 = 0; n0 < N; n0 += DOT_NR) {
    const int nr = int(std::min<int64_t>(DOT_NR, N - n0));
    for (int64_t m0 = 0; m0 < M; m0 += DOT_MR) {
      const int mr = int(std::min<int64_t>(DOT_MR, M - m0));
      DOT_BLOCKS<TW>[mr - 1][nr - 1](x + m0 * ldx, ldx, w + n0 * ldw, ldw, K, y + m0 * ldy + n0, ldy);
    }
  }
}

}  // namespace
