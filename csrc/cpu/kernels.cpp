// The CPU decode-step kernels of fastverify.models, in fp32, for a few rows (1..16 tokens:
// a decode step, a short draft chain or tree). fastverify/cpu_kernels.py loads them.
//
// Why: on CPU a decode step of a small model is bound by streaming its weights, plus a
// fixed cost per torch op (a few µs each, ~40 ops per layer). torch's BLAS paths reach
// about half of two cores' bandwidth for one-row products, and a layer's norms, RoPE,
// cache writes and paged attention cost more than its matmuls. Here a layer is six
// calls: two projections with the RMSNorm fused in front, q/k/v post-processing with the
// cache write, paged attention, and two projections with the residual add (and SwiGLU)
// fused. Every loop is plain C++ that GCC vectorizes (-O3 -march=native), split across
// the OpenMP threads torch already runs.
//
// Plain C ABI (loaded with ctypes): no torch headers, so it builds in about a second. It
// links the libgomp torch already loaded (same soname), so both share one thread pool.
// The Python side checks shapes, dtypes and strides; these functions trust them.
#include <algorithm>
#include <array>
#include <utility>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int V = 16;  // floats per step: one AVX-512 register (two AVX2 ones)

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

// ---------------------------------------------------------------------------- attention

constexpr int BLOCK = 32;    // keys scored at once inside a work unit
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

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

// acc[D] += Σ_j p[j] · rows[j][D] over the n rows with rows[j] != null (hidden[j] == null
// skips row j). Columns outer, rows inner: each 16 columns of acc stay in one register
// across all rows instead of a load-add-store chain per row.
inline void weighted_rows(float* __restrict__ acc, const float* p, const float* const* rows, const float* const* live,
                          int n, int D) {
  int i0 = 0;
#if defined(__AVX512F__)
  for (; i0 + 16 <= D; i0 += 16) {
    __m512 a = _mm512_loadu_ps(acc + i0);
    for (int j = 0; j < n; ++j)
      if (live[j]) a = _mm512_fmadd_ps(_mm512_set1_ps(p[j]), _mm512_loadu_ps(rows[j] + i0), a);
    _mm512_storeu_ps(acc + i0, a);
  }
#endif
  for (int j = 0; j < n; ++j) {
    if (!live[j]) continue;
    const float pj = p[j];
    const float* __restrict__ r = rows[j];
#pragma omp simd
    for (int i = i0; i < D; ++i) acc[i] += pj * r[i];
  }
}

// Online-softmax accumulation of nq query vectors q[i] (pre-scaled, D floats each) over
// n <= BLOCK keys whose rows are kp[j] / vp[j]; query i sees key j when kp[j] != null and
// (vis == null or vis[(i / G) · BLOCK + j]): the G query heads of a token share its
// visibility. Each key row is loaded once for all nq queries; m, l, acc hold each query's
// running max, sum and Σ p·V.
inline void attend_block(const float* const* q, int nq, int G, int D, const float* const* kp, const float* const* vp,
                         const uint8_t* vis, int n, float* __restrict__ m, float* __restrict__ l,
                         float* __restrict__ acc, float* __restrict__ s /* [nq][BLOCK] scratch */) {
  for (int j = 0; j < n; ++j)
    for (int i = 0; i < nq; ++i)
      s[i * BLOCK + j] = kp[j] && (!vis || vis[(i / G) * BLOCK + j]) ? dot(q[i], kp[j], D) : NEG_INF;
  const float* live[BLOCK];
  for (int i = 0; i < nq; ++i) {
    float* __restrict__ si = s + i * BLOCK;
    float mx = m[i];
    for (int j = 0; j < n; ++j) mx = si[j] > mx ? si[j] : mx;
    if (mx == NEG_INF) continue;  // nothing visible yet
    const float rescale = std::exp(m[i] - mx);  // 0 on the first visible block (m = -inf)
    float* __restrict__ ai = acc + int64_t(i) * D;
#pragma omp simd
    for (int d = 0; d < D; ++d) ai[d] *= rescale;
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int j = 0; j < n; ++j) {
      const float e = exp_nonpositive(si[j] - mx);
      si[j] = si[j] == NEG_INF ? 0.f : e;
      sum += si[j];
    }
    for (int j = 0; j < n; ++j) live[j] = si[j] != 0.f ? vp[j] : nullptr;
    weighted_rows(ai, si, vp, live, n, D);
    m[i] = mx;
    l[i] = l[i] * rescale + sum;
  }
}

}  // namespace

extern "C" {

// y[M, N] = prologue(x)[M, K] · W[N, K]ᵀ (+ bias[N]) (+ residual[M, N]) for M in 1..16.
// prologue: none; RMSNorm with weight norm_w (norm_w != null); or SwiGLU (swiglu != 0), where x
// is [M, 2K] = [gate | up] and the input is silu(gate) · up.
// Returns 0 on success, 1 when M is outside 1..16.
int fastverify_linear_f32(const float* x, int64_t ldx, const float* w, const float* bias, const float* residual,
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

// The attention input of N tokens from their fused projection qkv[N, (Hq + 2·Hkv)·D]
// (q heads, then k heads, then v heads): q/k RMSNorm over D when q_norm_w / k_norm_w are
// given, RoPE (x·cos + rotate_half(x)·sin, cos/sin [N, D]) on q and k, q into q_out[N, Hq, D],
// k and v into the cache at flat slot slots[t] (slot s, head h at k_cache + s·slot_stride + h·D).
void fastverify_qkv_rope_f32(const float* qkv, int64_t ldqkv, int64_t N, int Hq, int Hkv, int D, const float* cos,
                             const float* sin, const float* q_norm_w, const float* k_norm_w, float eps, float* q_out,
                             float* k_cache, float* v_cache, int64_t slot_stride, const int64_t* slots) {
  const int half = D / 2;
  std::vector<float> tmp(D);
  for (int64_t t = 0; t < N; ++t) {
    const float* row = qkv + t * ldqkv;
    const float* c = cos + t * D;
    const float* s = sin + t * D;
    for (int h = 0; h < Hq + Hkv; ++h) {
      const bool is_q = h < Hq;
      const float* x = row + int64_t(h) * D;
      const float* nw = is_q ? q_norm_w : k_norm_w;
      if (nw) {
        rms_norm_row(x, nw, eps, D, tmp.data());
        x = tmp.data();
      }
      float* dst = is_q ? q_out + (t * Hq + h) * D : k_cache + slots[t] * slot_stride + int64_t(h - Hq) * D;
      for (int i = 0; i < half; ++i) {
        dst[i] = x[i] * c[i] - x[i + half] * s[i];
        dst[i + half] = x[i + half] * c[i + half] + x[i] * s[i + half];
      }
    }
    for (int h = 0; h < Hkv; ++h)
      std::memcpy(v_cache + slots[t] * slot_stride + int64_t(h) * D, row + int64_t(Hq + Hkv + h) * D,
                  sizeof(float) * D);
  }
}

// out[N, Hq, D] = Σ_p softmax_p(sm_scale · q·K[p]) · V[p] over each token's keys in the paged
// cache (k/v_cache as above; request b's pages are block_table[b·bt_stride + ...]).
//
// Tree mode (chunk_ids == null): token t is tree node rows[t] (rows == null: node t) of
// request b (cu_nodes[b] <= node < cu_nodes[b+1], n_b nodes); it sees the request's first
// seq_lens[b] − n_b keys and the tree keys seq_lens[b] − n_b + j whose bit j is set in its
// row of tree_mask[·, mask_words] (itself and its ancestors). The tokens of a request are
// scored together, so its keys are read once per KV head whatever the tree's size.
// Sparse mode (chunk_ids [B, Hkv, n_ids] int32, one token per request, N == B): token b sees,
// per KV head, the chunks c of its row with 0 <= c < F_b = seq_lens[b] / chunk_size (others
// and -1 skipped) and the tail F_b·chunk_size .. seq_lens[b] − 1; no key at all gives 0.
// Work units are (request, KV head, 64..512 keys of its list), merged by log-sum-exp.
// G = Hq / Hkv <= 32, at most 16 tokens per request.
void fastverify_paged_attention_f32(const float* q, int64_t N, int Hq, int Hkv, int D, const float* k_cache,
                                    const float* v_cache, int64_t slot_stride, const int32_t* block_table,
                                    int64_t bt_stride, int page_size, const int32_t* seq_lens, const int32_t* cu_nodes,
                                    int64_t B, const int64_t* tree_mask, int64_t mask_words, const int64_t* rows,
                                    const int32_t* chunk_ids, int64_t n_ids, int chunk_size, float sm_scale,
                                    float* out, int threads) {
  const int G = Hq / Hkv;
  const bool sparse = chunk_ids != nullptr;
  // groups: the tokens of one request (their key list is the request's), as (request, tokens)
  std::vector<int64_t> node(N), group_req, group_first(1, 0), group_tok;
  {
    std::vector<std::vector<int64_t>> of_req(B);
    for (int64_t t = 0; t < N; ++t) {
      int64_t b = t, nd = 0;
      if (!sparse) {
        nd = rows ? rows[t] : t;
        int64_t lo = 0, hi = B - 1;  // the request whose node range holds nd
        while (lo < hi) {
          const int64_t mid = (lo + hi + 1) / 2;
          if (cu_nodes[mid] <= nd) lo = mid; else hi = mid - 1;
        }
        b = lo;
      }
      node[t] = nd;
      of_req[b].push_back(t);
    }
    for (int64_t b = 0; b < B; ++b)
      if (!of_req[b].empty()) {
        group_req.push_back(b);
        group_tok.insert(group_tok.end(), of_req[b].begin(), of_req[b].end());
        group_first.push_back(int64_t(group_tok.size()));
      }
  }
  const int64_t n_groups = int64_t(group_req.size());
  // key list length per (group, KV head); sparse: the usable chunk ids
  std::vector<int64_t> n_keys(n_groups * Hkv), n_valid(n_groups * Hkv, 0);
  std::vector<int32_t> valid(sparse ? n_groups * Hkv * std::max<int64_t>(n_ids, 1) : 0);
  for (int64_t gi = 0; gi < n_groups; ++gi) {
    const int64_t b = group_req[gi], L = seq_lens[b];
    for (int h = 0; h < Hkv; ++h) {
      int64_t keys = L;
      if (sparse) {
        const int64_t full = L / chunk_size;
        const int32_t* ids = chunk_ids + (b * Hkv + h) * n_ids;
        int32_t* keep = valid.data() + (gi * Hkv + h) * n_ids;
        int64_t nv = 0;
        for (int64_t i = 0; i < n_ids; ++i)
          if (ids[i] >= 0 && ids[i] < full) keep[nv++] = ids[i];
        n_valid[gi * Hkv + h] = nv;
        keys = nv * chunk_size + (L - full * chunk_size);
      }
      n_keys[gi * Hkv + h] = keys;
    }
  }
  // keys per work unit: about 8 units per thread, 64..512 keys each (a multiple of BLOCK)
  int64_t total = 0;
  for (int64_t keys : n_keys) total += keys;
  const int64_t split = std::min<int64_t>(512, std::max<int64_t>(64, (total / (8 * threads) + BLOCK - 1) / BLOCK * BLOCK));
  std::vector<int64_t> first_unit(n_groups * Hkv + 1, 0), first_q(n_groups * Hkv + 1, 0);
  for (int64_t i = 0; i < n_groups * Hkv; ++i) {
    const int64_t gi = i / Hkv, nq = (group_first[gi + 1] - group_first[gi]) * G;
    const int64_t units = (n_keys[i] + split - 1) / split;
    first_unit[i + 1] = first_unit[i] + units;
    first_q[i + 1] = first_q[i] + units * nq;  // each unit keeps state for every query of its group
  }
  const int64_t units = first_unit[n_groups * Hkv];
  const int64_t states = first_q[n_groups * Hkv];
  std::vector<float> part_m(states, NEG_INF), part_l(states, 0.f), part_acc(states * D, 0.f);
  std::vector<float> qs(N * Hq * D);
  for (int64_t i = 0; i < N * Hq * D; ++i) qs[i] = q[i] * sm_scale;

#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int64_t u = 0; u < units; ++u) {
    int64_t lo = 0, hi = n_groups * Hkv - 1;  // which (group, KV head)
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (first_unit[mid] <= u) lo = mid; else hi = mid - 1;
    }
    const int64_t gi = lo / Hkv;
    const int h = int(lo % Hkv);
    const int64_t b = group_req[gi], L = seq_lens[b];
    const int64_t* toks = group_tok.data() + group_first[gi];
    const int nt = int(group_first[gi + 1] - group_first[gi]);
    const int nq = nt * G;
    const int64_t k0 = (u - first_unit[lo]) * split;
    const int64_t k1 = std::min<int64_t>(k0 + split, n_keys[lo]);
    const int64_t state = first_q[lo] + (u - first_unit[lo]) * nq;
    const int32_t* pages = block_table + b * bt_stride;
    const int64_t prefix = sparse ? L : L - (cu_nodes[b + 1] - cu_nodes[b]);
    const int64_t nv = n_valid[lo];
    const int32_t* keep = sparse ? valid.data() + lo * n_ids : nullptr;
    const int64_t full = sparse ? L / chunk_size : 0;
    std::vector<const float*> qv(nq);
    for (int ti = 0; ti < nt; ++ti)
      for (int g = 0; g < G; ++g) qv[ti * G + g] = qs.data() + (toks[ti] * Hq + int64_t(h) * G + g) * D;
    std::vector<float> scores(int64_t(nq) * BLOCK);
    std::vector<uint8_t> vis(int64_t(nt) * BLOCK);
    // rows of the keys k .. k+n-1 of the list into kp / vp; true when a tree key is among them
    auto locate = [&](int64_t k, int n, const float** kp, const float** vp) {
      for (int j = 0; j < n; ++j) {
        const int64_t i = k + j;  // the i-th key of the list, at position p
        const int64_t p = !sparse ? i
                          : i < nv * chunk_size ? int64_t(keep[i / chunk_size]) * chunk_size + i % chunk_size
                                                : full * chunk_size + (i - nv * chunk_size);
        const int64_t off = (int64_t(pages[p / page_size]) * page_size + p % page_size) * slot_stride + int64_t(h) * D;
        kp[j] = k_cache + off;
        vp[j] = v_cache + off;
      }
    };
    // Keys are rows of D floats far apart (a model's cache keeps all layers of a slot
    // together), so each is a cache miss: the next block's rows are located and prefetched
    // while this one is scored.
    const float* kp[2][BLOCK];
    const float* vp[2][BLOCK];
    int cur = 0;
    locate(k0, int(std::min<int64_t>(BLOCK, k1 - k0)), kp[0], vp[0]);
    for (int64_t k = k0; k < k1; k += BLOCK) {
      const int n = int(std::min<int64_t>(BLOCK, k1 - k));
      if (k + BLOCK < k1) {
        const int nn = int(std::min<int64_t>(BLOCK, k1 - k - BLOCK));
        locate(k + BLOCK, nn, kp[cur ^ 1], vp[cur ^ 1]);
        for (int j = 0; j < nn; ++j)
          for (int i = 0; i < D; i += 16) {
            __builtin_prefetch(kp[cur ^ 1][j] + i);
            __builtin_prefetch(vp[cur ^ 1][j] + i);
          }
      }
      const uint8_t* block_vis = nullptr;
      if (!sparse && k + n > prefix) {  // tree keys: each token sees itself and its ancestors
        for (int ti = 0; ti < nt; ++ti) {
          const int64_t* mask = tree_mask + node[toks[ti]] * mask_words;
          for (int j = 0; j < n; ++j) {
            const int64_t jt = k + j - prefix;
            vis[ti * BLOCK + j] = jt < 0 || ((mask[jt >> 6] >> (jt & 63)) & 1);
          }
        }
        block_vis = vis.data();
      }
      attend_block(qv.data(), nq, G, D, kp[cur], vp[cur], block_vis, n, part_m.data() + state,
                   part_l.data() + state, part_acc.data() + state * D, scores.data());
      cur ^= 1;
    }
  }

  // log-sum-exp merge of each (token, query head)'s units
  for (int64_t gi = 0; gi < n_groups; ++gi) {
    const int nt = int(group_first[gi + 1] - group_first[gi]);
    for (int ti = 0; ti < nt; ++ti) {
      const int64_t t = group_tok[group_first[gi] + ti];
      for (int hq = 0; hq < Hq; ++hq) {
        const int64_t lo = gi * Hkv + hq / G;
        const int64_t nq = int64_t(nt) * G, qi = int64_t(ti) * G + hq % G;
        float* o = out + (t * Hq + hq) * D;
        std::memset(o, 0, sizeof(float) * D);
        float mx = NEG_INF;
        for (int64_t u = 0; u < first_unit[lo + 1] - first_unit[lo]; ++u)
          mx = std::max(mx, part_m[first_q[lo] + u * nq + qi]);
        if (mx == NEG_INF) continue;
        float sum = 0.f;
        for (int64_t u = 0; u < first_unit[lo + 1] - first_unit[lo]; ++u) {
          const int64_t st = first_q[lo] + u * nq + qi;
          if (part_m[st] == NEG_INF) continue;
          const float w = std::exp(part_m[st] - mx);
          sum += w * part_l[st];
          const float* a = part_acc.data() + st * D;
          for (int i = 0; i < D; ++i) o[i] += w * a[i];
        }
        const float inv = 1.f / sum;
        for (int i = 0; i < D; ++i) o[i] *= inv;
      }
    }
  }
}

// Decoder layers over N tokens in one call: per layer the six calls of the model's
// DecoderLayer.forward_cpu (projections, q/k/v + cache write, paged attention in tree mode),
// so a decode step crosses from Python once instead of six times per layer. x [N, d] is
// updated in place. Per layer l, ptrs[l·11 + i] holds the addresses of: 0 Wqkv [(Hq+2Hkv)·D, d],
// 1 its bias or 0, 2 Wo [d, Hq·D], 3 W13 [2·I, d], 4 Wdown [d, I], 5 input norm [d],
// 6 post-attention norm [d], 7 q norm [D] or 0, 8 k norm or 0, 9 / 10 the layer's K / V cache
// views (slots slot_stride apart). Returns 1 when N is outside 1..16.
int fastverify_decoder_layers_f32(float* x, int64_t N, int64_t n_layers, const int64_t* ptrs, int64_t d, int64_t I,
                                  int Hq, int Hkv, int D, float eps, const float* cos, const float* sin,
                                  int64_t slot_stride, const int64_t* slots, const int32_t* block_table,
                                  int64_t bt_stride, int page_size, const int32_t* seq_lens, const int32_t* cu_nodes,
                                  int64_t B, const int64_t* tree_mask, int64_t mask_words, const int64_t* rows,
                                  float sm_scale, int threads) {
  if (N < 1 || N > MAX_ROWS) return 1;
  const int64_t QKV = int64_t(Hq + 2 * Hkv) * D, HD = int64_t(Hq) * D;
  std::vector<float> qkv(N * QKV), q(N * HD), attn(N * HD), x2(N * d), h(N * 2 * I);
  auto f = [](int64_t a) { return reinterpret_cast<float*>(a); };
  for (int64_t l = 0; l < n_layers; ++l) {
    const int64_t* w = ptrs + l * 11;
    fastverify_linear_f32(x, d, f(w[0]), f(w[1]), nullptr, 0, qkv.data(), QKV, N, QKV, d, f(w[5]), eps, 0, threads);
    fastverify_qkv_rope_f32(qkv.data(), QKV, N, Hq, Hkv, D, cos, sin, f(w[7]), f(w[8]), eps, q.data(), f(w[9]),
                            f(w[10]), slot_stride, slots);
    fastverify_paged_attention_f32(q.data(), N, Hq, Hkv, D, f(w[9]), f(w[10]), slot_stride, block_table, bt_stride,
                                   page_size, seq_lens, cu_nodes, B, tree_mask, mask_words, rows, nullptr, 0, 0,
                                   sm_scale, attn.data(), threads);
    fastverify_linear_f32(attn.data(), HD, f(w[2]), nullptr, x, d, x2.data(), d, N, d, HD, nullptr, 0.f, 0, threads);
    fastverify_linear_f32(x2.data(), d, f(w[3]), nullptr, nullptr, 0, h.data(), 2 * I, N, 2 * I, d, f(w[6]), eps, 0,
                          threads);
    fastverify_linear_f32(h.data(), 2 * I, f(w[4]), nullptr, x2.data(), d, x, d, N, d, I, nullptr, 0.f, 1, threads);
  }
  return 0;
}

}  // extern "C"
