// cpu backend of fastverify::select_kv_chunks (sparse-KV self-speculation, DESIGN.md §2.6);
// fastverify/ops/sparse_kv.py (select_kv_chunks_torch) is the spec, csrc/cuda/sparse_kv.cu
// the kernels this ports. fastverify/cpu/select_kv.py allocates the output and calls it.
//
// For request b, KV head h (G = Hq / Hkv query heads per KV head, cs = chunk_size):
//
//   F_b      = min(max(seq_lens[b], 0) / cs, NC)        full chunks selection sees
//   qsum     = Σ_{g < G} q[b, h·G + g]                   fp32, D floats
//   mean[c]  = (Σ_{r < cs} K[c·cs + r, h]) / cs          fp32 (or chunk_means[b, c, h])
//   score[c] = qsum · mean[c]                            fp32; NaN counts as -inf
//   F_b <= C: chunk_ids[b, h] = 0 .. F_b - 1, then -1
//   else:     sinks 0 .. ns - 1, recent F_b - nr .. F_b - 1 and the M = C - ns - nr
//             highest-scoring chunks of ns .. F_b - nr - 1 (ties: lower c first), ascending
//
// Two phases, one OpenMP team:
// 1. scores: work units of (request, tile of chunks), the tile size fixed by chunk_size
//    alone. Only the chunks that can be chosen are scored (not sinks or recent ones, and
//    only when F_b > C). A unit streams its chunks' K rows once, slot by slot in memory
//    order (all KV heads of a slot are adjacent: one stretch of Hkv·D elements), adding
//    them into fp32 sums that stay in L1, then dots each head's mean with its qsum. Going
//    head by head instead would stride through each page Hkv times and leave the
//    hardware prefetchers less busy (measured ~20% slower). With chunk_means it streams the
//    mean rows. Each score is an order-preserving uint32 key (higher score <-> higher
//    key, NaN as -inf, -0 as +0), as the CUDA kernel.
// 2. selection of each (request, KV head) row by the thread that scored the request's last
//    unit (no barrier between the phases): the M-th largest key found bit by bit with
//    vectorized counts, then one ascending pass (select_row; a selection, not a sort).
// Units are handed out dynamically (a core shared with other work does not hold the
// other back); which thread computes a unit never changes what it computes.
//
// Every score is computed by one thread in a fixed order and the selection is exact, so
// the output does not depend on the number of threads. Memory safety with unchecked
// input: negative seq_lens count as 0; chunks past the block table (or chunk_means) are
// never scored; rows on a page id outside the cache count as zero.
#include <atomic>
#include <memory>
#include <type_traits>

#include "common.h"

namespace {

// ---------------------------------------------------------------- vector loads (fp32 out)

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16* p) {  // bf16 bits are the high half of the fp32 bits
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline __m512 load16(const fp16* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#elif defined(__AVX2__)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
#if defined(__F16C__)
inline __m256 load8(const fp16* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
#define FASTVERIFY_LOAD8_FP16 1
#endif
#endif

// acc[n] += row[n] (fp32; 16-bit rows widened on load). Every path adds element by element
// in the same order, so the ISA changes the speed, not the sums.
template <typename T>
inline void add_row(float* __restrict__ acc, const T* __restrict__ row, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(acc + i, _mm512_add_ps(_mm512_loadu_ps(acc + i), load16(row + i)));
#elif defined(__AVX2__)
#if !defined(FASTVERIFY_LOAD8_FP16)
  if constexpr (!std::is_same_v<T, fp16>)
#endif
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(acc + i, _mm256_add_ps(_mm256_loadu_ps(acc + i), load8(row + i)));
#endif
  for (; i < n; ++i) acc[i] += to_float(row[i]);
}

// Order-preserving key of a score: greater score <-> greater key; NaN as -inf, -0 as +0.
inline uint32_t order_key(float s) {
  s = s != s ? NEG_INF : (s == 0.f ? 0.f : s);
  int32_t bits;
  std::memcpy(&bits, &s, sizeof bits);
  return uint32_t(bits ^ ((bits >> 31) & 0x7FFFFFFF)) ^ 0x80000000u;
}

struct SelectArgs {
  const void* q;  // [B, Hq, D] of the cache's dtype
  int64_t q_sb, q_sh;
  const void* k;  // [num_pages, page_size, Hkv, D]
  int64_t k_sp, k_ss, k_sh;  // element strides
  int64_t num_pages, page_size;
  const float* means;  // [B, NC, Hkv, D] or null
  int64_t m_sb, m_sc, m_sh;
  const int32_t* block_table;  // [B, max_pages]
  int64_t bt_s0, bt_s1;
  const int32_t* seq_lens;  // [B] contiguous
  int64_t B, Hkv, G, D;
  int64_t chunk_size, NC, C, ns, nr;
  int32_t* out;  // [B, Hkv, C] contiguous
  int threads;
};

// Candidates among key[0 .. n) at or above x (a loop GCC vectorizes).
inline int64_t count_at_least(const uint32_t* __restrict__ key, int64_t n, uint32_t x) {
  uint32_t count = 0;
  for (int64_t i = 0; i < n; ++i) count += key[i] >= x;
  return count;
}

// chunk_ids row of (b, h) from the keys of its chunks (see the formula above), as the CUDA
// chunk_select_kernel: the M-th largest key kth of the N candidates ns .. Fb - nr - 1 is
// found bit by bit (the largest value with at least M candidates at or above it: 32
// vectorized counts at most, stopping as soon as exactly M qualify), then one ascending
// pass takes every key > kth and the lowest ids among keys == kth, which writes the
// chosen ids already sorted. Linear in N, no sort, no data-dependent memory traffic.
inline void select_row(const uint32_t* key, int64_t Fb, int64_t C, int64_t ns, int64_t nr, int32_t* out) {
  if (Fb <= C) {
    for (int64_t i = 0; i < C; ++i) out[i] = i < Fb ? int32_t(i) : -1;
    return;
  }
  const int64_t M = C - ns - nr;
  for (int64_t i = 0; i < ns; ++i) out[i] = int32_t(i);
  for (int64_t i = 0; i < nr; ++i) out[ns + M + i] = int32_t(Fb - nr + i);
  if (M == 0) return;
  const uint32_t* cand = key + ns;
  const int64_t N = Fb - nr - ns;  // > M
  uint32_t kth = 0;
  for (int bit = 31; bit >= 0; --bit) {
    const uint32_t x = kth | (uint32_t{1} << bit);
    const int64_t n = count_at_least(cand, N, x);
    if (n >= M) kth = x;
    if (n == M) break;
  }
  int64_t take_equal = M - (kth == 0xFFFFFFFFu ? 0 : count_at_least(cand, N, kth + 1));
  int32_t* chosen = out + ns;
  for (int64_t i = 0, j = 0; i < N && j < M; ++i) {
    const bool take = cand[i] > kth || (cand[i] == kth && take_equal-- > 0);
    if (take) chosen[j++] = int32_t(ns + i);
  }
}

template <typename T>
void select_kv_chunks(const SelectArgs& a) {
  const int64_t B = a.B, Hkv = a.Hkv, D = a.D, cs = a.chunk_size, C = a.C;
  const int64_t M = C - a.ns - a.nr;  // chosen by score when F_b > C
  std::vector<int64_t> F(B);
  int64_t F_max = 0;
  for (int64_t b = 0; b < B; ++b) {
    F[b] = std::min<int64_t>(std::max<int32_t>(a.seq_lens[b], 0) / cs, a.NC);
    if (F[b] > C && M > 0) F_max = std::max(F_max, F[b]);
  }

  // qsum[b, h, :] = Σ_g q[b, h·G + g, :]
  std::vector<float> qsum(size_t(B * Hkv * D), 0.f);
  const T* q = static_cast<const T*>(a.q);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hkv; ++h) {
      float* qs = qsum.data() + (b * Hkv + h) * D;
      for (int64_t g = 0; g < a.G; ++g) {
        const T* row = q + b * a.q_sb + (h * a.G + g) * a.q_sh;
        for (int64_t d = 0; d < D; ++d) qs[d] += to_float(row[d]);
      }
    }

  // phase 1 units: (b, first chunk) of tiles of the candidates ns .. F_b - nr - 1
  const int64_t tile = a.means ? 64 : std::max<int64_t>(1, 1024 / cs);  // ~1K keys or 64 mean rows per unit
  std::vector<std::pair<int64_t, int64_t>> units;
  std::vector<int64_t> units_of(size_t(B), 0);
  int64_t stream_bytes = 0;
  const int64_t chunk_bytes = a.means ? Hkv * D * int64_t(sizeof(float)) : cs * Hkv * D * int64_t(sizeof(T));
  for (int64_t b = 0; b < B; ++b)
    if (F[b] > C && M > 0) {
      for (int64_t c = a.ns; c < F[b] - a.nr; c += tile, ++units_of[b]) units.emplace_back(b, c);
      stream_bytes += (F[b] - a.nr - a.ns) * chunk_bytes;
    }
  const int64_t key_stride = std::max<int64_t>(F_max, 1);
  std::unique_ptr<uint32_t[]> keys(new uint32_t[size_t(B * Hkv * key_stride)]);
  const int64_t n_units = int64_t(units.size());
  const T* k = static_cast<const T*>(a.k);

  // requests without a choice (F_b <= C, or no chunk left to score) are written here;
  // the others by the thread that completes their scores
  std::unique_ptr<std::atomic<int64_t>[]> remaining(new std::atomic<int64_t>[size_t(B)]);
  for (int64_t b = 0; b < B; ++b) {
    remaining[b].store(units_of[b], std::memory_order_relaxed);
    if (units_of[b] == 0)
      for (int64_t h = 0; h < Hkv; ++h)
        select_row(keys.get() + (b * Hkv + h) * key_stride, F[b], C, a.ns, a.nr, a.out + (b * Hkv + h) * C);
  }
  // a thread team only for enough bytes to stream (~1 MiB): waking one costs more on small inputs
  const int team = stream_bytes >= (int64_t{1} << 20) ? a.threads : 1;
#pragma omp parallel num_threads(team) if (team > 1)
  {
    std::vector<float> sum(size_t(Hkv * D));
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < n_units; ++u) {
      const int64_t b = units[u].first;
      const int64_t c_end = std::min(units[u].second + tile, F[b] - a.nr);
      uint32_t* key_b = keys.get() + b * Hkv * key_stride;
      const float* qs_b = qsum.data() + b * Hkv * D;
      for (int64_t c = units[u].second; c < c_end; ++c) {
        if (a.means) {
          const float* mrow = a.means + b * a.m_sb + c * a.m_sc;
          for (int64_t h = 0; h < Hkv; ++h)
            key_b[h * key_stride + c] = order_key(dot(qs_b + h * D, mrow + h * a.m_sh, int(D)));
          continue;
        }
        // Σ of the chunk's rows, slot by slot in memory order (all heads of a slot are one
        // stretch when packed); rows on a page id outside the cache count as zero
        std::fill(sum.begin(), sum.end(), 0.f);
        // runs of slots inside one page (a chunk covers whole pages or a page whole chunks
        // when the sizes divide one another, as checked; any other pair still stays in bounds)
        for (int64_t p0 = c * cs, run = 0; p0 < (c + 1) * cs; p0 += run) {  // c < F_b <= capacity / cs
          run = std::min((c + 1) * cs - p0, a.page_size - p0 % a.page_size);
          const int64_t page = a.block_table[b * a.bt_s0 + (p0 / a.page_size) * a.bt_s1];
          if (page < 0 || page >= a.num_pages) continue;
          const T* slot = k + page * a.k_sp + (p0 % a.page_size) * a.k_ss;
          for (int64_t r = 0; r < run; ++r, slot += a.k_ss) {
            if (a.k_sh == D) {
              add_row(sum.data(), slot, Hkv * D);
            } else {
              for (int64_t h = 0; h < Hkv; ++h) add_row(sum.data() + h * D, slot + h * a.k_sh, D);
            }
          }
        }
        for (int64_t h = 0; h < Hkv; ++h) {
          float* s = sum.data() + h * D;
          for (int64_t d = 0; d < D; ++d) s[d] = s[d] / float(cs);  // the mean, as the spec's sum / cs
          key_b[h * key_stride + c] = order_key(dot(qs_b + h * D, s, int(D)));
        }
      }
      // the thread that scores the last unit of request b selects its rows (acq_rel: it
      // sees the keys the other units wrote)
      if (remaining[b].fetch_sub(1, std::memory_order_acq_rel) == 1)
        for (int64_t h = 0; h < Hkv; ++h)
          select_row(key_b + h * key_stride, F[b], C, a.ns, a.nr, a.out + (b * Hkv + h) * C);
    }

  }
}

}  // namespace

extern "C" {

// select_kv_chunks over a cache of dtype code `dtype` (DTYPE_F32 / BF16 / F16; q has the
// same): see the formula above. Strides in elements; chunk_means (fp32) may be null;
// NC = chunk_means.shape[1] when given, else the block table's capacity / chunk_size.
void fastverify_select_kv_chunks(int dtype, const void* q, int64_t q_sb, int64_t q_sh, const void* k_cache,
                                 int64_t k_sp, int64_t k_ss, int64_t k_sh, int64_t num_pages, int64_t page_size,
                                 const float* chunk_means, int64_t m_sb, int64_t m_sc, int64_t m_sh,
                                 const int32_t* block_table, int64_t bt_s0, int64_t bt_s1, const int32_t* seq_lens,
                                 int64_t B, int64_t Hq, int64_t Hkv, int64_t D, int64_t chunk_size, int64_t NC,
                                 int64_t num_chunks, int64_t num_sink, int64_t num_recent, int32_t* chunk_ids,
                                 int threads) {
  if (B <= 0 || Hkv <= 0 || num_chunks <= 0 || chunk_size <= 0 || page_size <= 0) return;
  // the kept chunks fit the row whatever the (unchecked) counts
  num_sink = std::min(std::max<int64_t>(num_sink, 0), num_chunks);
  num_recent = std::min(std::max<int64_t>(num_recent, 0), num_chunks - num_sink);
  SelectArgs a{q,          q_sb,     q_sh,     k_cache,  k_sp,  k_ss,       k_sh,     num_pages, page_size,
               chunk_means, m_sb,    m_sc,     m_sh,     block_table, bt_s0, bt_s1,   seq_lens,  B,
               Hkv,        Hq / Hkv, D,        chunk_size, std::max<int64_t>(NC, 0), num_chunks, num_sink,
               num_recent, chunk_ids, std::max(threads, 1)};
  switch (dtype) {
    case DTYPE_BF16: select_kv_chunks<bf16>(a); break;
    case DTYPE_F16: select_kv_chunks<fp16>(a); break;
    default: select_kv_chunks<float>(a); break;
  }
}

}  // extern "C"
