// Skinny matrix product y = x W^T (+ b) for a few rows of x, reading every weight row once.
//
// Decoding with P streams multiplies each weight matrix by P*B rows (a handful). The stock
// CPU GEMMs pack and block for large M, so with 2-16 rows their time grows with M although
// the step is bound by reading the weights. Here each weight row is streamed once from memory
// and dotted with every row of x while it sits in L1 (x itself is small and stays cached).
// The row count is a compile-time constant (1..8) so that the accumulators live in registers;
// more rows are done in chunks of 8 over the same, now cached, weight rows.
// Three instruction paths, chosen by the compiler flags (-march=native): AVX-512 (16 lanes, 32
// registers), AVX2/FMA (8 lanes, 16 registers), and plain C++ the compiler vectorises. bfloat16
// weights are widened to float32 in registers (a 16-bit shift), so half the bytes are read;
// where the CPU has AVX512-BF16, bfloat16 activations are not widened at all (vdpbf16ps).
// Accumulation is float32 throughout, rounding once at the end.
//
// No torch header is included (the extension headers take minutes to compile on a small
// machine, this file a second): Python calls the C functions at the end through ctypes and
// passes torch's thread count; OpenMP is the runtime torch itself uses.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define PARSCALE_AVX512 1  // 16 float32 lanes and 32 registers: more rows and accumulators per pass
#endif
#ifdef PARSCALE_AVX2
// A block streams only R weight rows at once, each a page or so long: too few, too short
// streams for the hardware prefetcher to keep enough loads in flight. Asking for the same
// offset in the next R rows, one pass ahead, lets the loads overlap (measured on the 48
// matrices of benchmarks/decode.py: M = 8 float32 55 -> 43 ms, bfloat16 M = 4 27 -> 19 ms).
#define PARSCALE_PREFETCH(w, r, R, K, k) \
  _mm_prefetch(reinterpret_cast<const char*>((w) + ((r) + (R)) * (K) + (k)), _MM_HINT_T0)
#endif
#if defined(PARSCALE_AVX2) && !defined(PARSCALE_AVX512)
// bfloat16 weights widened by one unpack against zero per 8 values instead of a widening load
// and a shift: the unpack takes 16 weights and leaves them in the order 0-3, 8-11 | 4-7, 12-15,
// so x is staged once per call in that order (`stage_x`). One row of the benchmark's 48
// matrices: 10.5 -> 9.7 ms, 8 rows 20.0 -> 19.0 (2 threads, best of 7).
#define PARSCALE_UNPACK 1
#endif
#if defined(PARSCALE_AVX512) && defined(__AVX512BF16__)
#define PARSCALE_BF16DOT 1  // vdpbf16ps: bfloat16 pairs multiplied exactly, summed in float32
#endif
#if defined(PARSCALE_BF16DOT) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#define PARSCALE_AMX 1  // tile matrix units: bfloat16 products at no cost beside the weight reads
#ifndef PARSCALE_AMX_AHEAD
#define PARSCALE_AMX_AHEAD 256  // bfloat16 values ahead that the AMX path prefetches in each row
#endif
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

// Rows of x per pass over a block of weight rows; later passes re-read the block from cache.
constexpr int64_t CHUNK_M = 8;
// Weight rows per block of the parallel loop. With AVX-512, 32: on the 113 matrices of the
// benchmark's 16-layer model (Zen 5, 2 threads, best of 5 interleaved rounds) 8 rows of x took
// 9.6 against 10.4 ms in bfloat16 and 14.5 against 16.2 in float32, 1-4 rows 3-6% less, than
// with blocks of 16 (64: no better). AVX2 keeps the 16 it was measured with.
#ifdef PARSCALE_AVX512
constexpr int64_t BLOCK_N = 32;
#else
constexpr int64_t BLOCK_N = 16;
#endif

#ifdef PARSCALE_AVX2
using parscale::hsum;
using parscale::load8;
#ifdef PARSCALE_AVX512
using parscale::load16;
#ifdef PARSCALE_BF16DOT
inline __m512bh bf16x32(const uint16_t* p, __mmask32 mask) {  // 32 bfloat16 values (masked lanes 0)
  const __m512i v = _mm512_maskz_loadu_epi16(mask, p);
  return reinterpret_cast<const __m512bh&>(v);
}
#endif

// out[m * ldy] (+)= dot(x[m], w) for MC rows of x and one weight row, read straight through
// (rows_per_step says when and why): U steps unrolled, so MC * U independent accumulators hide
// the multiply-add latency. From two rows of x on, the weights `row_ahead` bytes ahead are asked
// for (a block's rows lie one after another, so near the end of a row this reaches into the
// next): with that much arithmetic per line the hardware prefetcher alone fell behind
// (bfloat16, 2 rows 9.0 -> 7.6 ms, 4 rows 9.7 -> 8.1 on the 48 matrices of 2816 x 1024, Zen 5,
// 2 threads, 2 KB ahead). float32 weights ask 3 KB ahead: on the 113 matrices of the decode
// benchmark's model at 4 rows (Zen 5, 2 threads, memory at 77 GB/s, medians of 7 interleaved
// rounds) 14.48 ms with 2 KB, 13.92 with 3 KB, 14.28 with 4 KB (3 rows: 13.73, 13.50, 13.26; 2
// rows the same); on its 16 down projections (K = 2816, passes of 2048 + 768 columns) 4.10,
// 3.59, 3.58 ms (6 and 8 KB: 4.03, 4.07); in the model float32 P = 4 16.73 -> 16.16 ms/token
// (faster in 7 of 7 rounds), P = 1 the same.
template <typename WT>
constexpr int64_t row_ahead() { return sizeof(WT) == 4 ? 3072 : 2048; }
template <int MC, typename XT, typename WT>
inline void row_at_a_time(const XT* x, int64_t len, int64_t ld, const WT* w, float* out, int64_t ldy, bool add) {
  constexpr bool dot = sizeof(XT) == 2;  // bfloat16 x and weights: vdpbf16ps, 32 columns a step
  constexpr int64_t S = dot ? 32 : 16;
  // 12 accumulators for 2-4 rows (16 columns' float32 FMAs have 4 cycles of latency, two a
  // cycle): on the 113 matrices of the decode benchmark's model (Zen 5, 2 threads, best of 11
  // interleaved rounds) float32 2 rows 10.6 against 11.6 ms with 8, 3 rows 12.4 against 12.9, 4
  // rows 13.3 against 15.6 (16 accumulators: 10.9, 11.9, 14.8); bfloat16 the same or better.
  constexpr int U = MC == 1 ? 4 : (MC <= 4 ? 12 / MC : (MC <= 8 ? 8 / MC : 1));
  __m512 acc[U][MC];
  PARSCALE_UNROLL for (int u = 0; u < U; ++u)
    PARSCALE_UNROLL for (int m = 0; m < MC; ++m) acc[u][m] = _mm512_setzero_ps();
  auto step = [&](__m512* a, int64_t k, int64_t n) {  // columns k .. k + n (n <= S) into a[0 .. MC)
    if constexpr (MC > 1) _mm_prefetch(reinterpret_cast<const char*>(w + k) + row_ahead<WT>(), _MM_HINT_T0);
#ifdef PARSCALE_BF16DOT
    if constexpr (dot) {
      const __mmask32 mask = parscale::first32(n);
      const __m512bh wv = bf16x32(w + k, mask);
      PARSCALE_UNROLL for (int m = 0; m < MC; ++m) a[m] = _mm512_dpbf16_ps(a[m], wv, bf16x32(x + m * ld + k, mask));
      return;
    }
#endif
    if constexpr (!dot) {
      const __mmask16 mask = parscale::first16(n);
      const __m512 wv = load16(w + k, mask);
      PARSCALE_UNROLL for (int m = 0; m < MC; ++m)
        a[m] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mask, reinterpret_cast<const float*>(x) + m * ld + k), a[m]);
    }
  };
  int64_t k = 0;
  for (; k + U * S <= len; k += U * S)
    PARSCALE_UNROLL for (int u = 0; u < U; ++u) step(acc[u], k + u * S, S);
  for (; k < len; k += S) step(acc[0], k, len - k);
  PARSCALE_UNROLL for (int m = 0; m < MC; ++m) {
    __m512 total = acc[0][m];
    PARSCALE_UNROLL for (int u = 1; u < U; ++u) total = _mm512_add_ps(total, acc[u][m]);
    const float sum = _mm512_reduce_add_ps(total);
    out[m * ldy] = add ? out[m * ldy] + sum : sum;
  }
}
#endif
#endif

using parscale::store;
using parscale::to_float;

// y[m, n] += bias[n] for every row m (bias may be null).
template <typename B>
void add_bias(float* y, const B* bias, int64_t M, int64_t N) {
  if (!bias) return;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) y[m * N + n] += to_float(bias[n]);
}

// out[m * ldy + r] (+)= dot(x[m], w[r]) over `len` columns, for m < MC rows of x and r < R weight rows;
// x and w rows are `ld` apart (a block of columns of longer rows); `add` accumulates onto out.
template <int MC, int R, typename WT>
inline void block(const float* x, int64_t len, int64_t ld, const WT* w, float* out, int64_t ldy, bool add) {
  int64_t k = 0;
  float acc_s[R][MC] = {};
#if defined(PARSCALE_AVX512)
  if constexpr (R == 1) return row_at_a_time<MC>(x, len, ld, w, out, ldy, add);
  // 16 lanes; the tail is a masked load (zeros add nothing), so no scalar loop runs.
  __m512 acc[R][MC];
  PARSCALE_UNROLL for (int r = 0; r < R; ++r)
    PARSCALE_UNROLL for (int m = 0; m < MC; ++m) acc[r][m] = _mm512_setzero_ps();
  for (; k < len; k += 16) {
    const __mmask16 mask = parscale::first16(len - k);
    __m512 wv[R];
    PARSCALE_UNROLL for (int r = 0; r < R; ++r) {
      PARSCALE_PREFETCH(w, r, R, ld, k);
      wv[r] = load16(w + r * ld + k, mask);
    }
    PARSCALE_UNROLL for (int m = 0; m < MC; ++m) {
      __m512 xv = _mm512_maskz_loadu_ps(mask, x + m * ld + k);
      PARSCALE_UNROLL for (int r = 0; r < R; ++r) acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  PARSCALE_UNROLL for (int r = 0; r < R; ++r)
    PARSCALE_UNROLL for (int m = 0; m < MC; ++m) acc_s[r][m] = _mm512_reduce_add_ps(acc[r][m]);
#elif defined(PARSCALE_AVX2)
  __m256 acc[R][MC];
  PARSCALE_UNROLL for (int r = 0; r < R; ++r)
    PARSCALE_UNROLL for (int m = 0; m < MC; ++m) acc[r][m] = _mm256_setzero_ps();
#ifdef PARSCALE_UNPACK
  if constexpr (sizeof(WT) == 2) {  // bfloat16 weights, 16 at a time (x is staged by stage_x)
    const __m256i zero = _mm256_setzero_si256();
    for (; k + 16 <= len; k += 16) {
      __m256 lo[R], hi[R];
      PARSCALE_UNROLL for (int r = 0; r < R; ++r) {
        PARSCALE_PREFETCH(w, r, R, ld, k);
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * ld + k));
        lo[r] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, raw));  // w[0-3, 8-11] << 16
        hi[r] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, raw));  // w[4-7, 12-15] << 16
      }
      PARSCALE_UNROLL for (int m = 0; m < MC; ++m) {
        const __m256 x0 = _mm256_loadu_ps(x + m * ld + k), x1 = _mm256_loadu_ps(x + m * ld + k + 8);
        PARSCALE_UNROLL for (int r = 0; r < R; ++r) {
          acc[r][m] = _mm256_fmadd_ps(lo[r], x0, acc[r][m]);
          acc[r][m] = _mm256_fmadd_ps(hi[r], x1, acc[r][m]);
        }
      }
    }
  }
#endif
  for (; k + 8 <= len; k += 8) {
    __m256 wv[R];
    PARSCALE_UNROLL for (int r = 0; r < R; ++r) {
      if (k % 16 == 0) PARSCALE_PREFETCH(w, r, R, ld, k);  // one line of float32 per two steps
      wv[r] = load8(w + r * ld + k);
    }
    PARSCALE_UNROLL for (int m = 0; m < MC; ++m) {
      __m256 xv = _mm256_loadu_ps(x + m * ld + k);
      PARSCALE_UNROLL for (int r = 0; r < R; ++r) acc[r][m] = _mm256_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  PARSCALE_UNROLL for (int r = 0; r < R; ++r)
    PARSCALE_UNROLL for (int m = 0; m < MC; ++m) acc_s[r][m] = hsum(acc[r][m]);
#endif
  for (; k < len; ++k)  // the tail, or everything without AVX2 (vectorised by the compiler)
    PARSCALE_UNROLL for (int r = 0; r < R; ++r) {
      float wk = to_float(w[r * ld + k]);
      PARSCALE_UNROLL for (int m = 0; m < MC; ++m) acc_s[r][m] += wk * x[m * ld + k];
    }
  PARSCALE_UNROLL for (int r = 0; r < R; ++r)
    PARSCALE_UNROLL for (int m = 0; m < MC; ++m) out[m * ldy + r] = add ? out[m * ldy + r] + acc_s[r][m] : acc_s[r][m];
}

#ifdef PARSCALE_BF16DOT
// Bytes of weights ahead that the side-by-side bfloat16 rows below ask for. With 5-8 rows of x
// each weight line takes 8 `vdpbf16ps` per row pair, long enough that lines asked for only the
// next R rows ahead (4 KB at K = 1024) arrived late, and the step took about the sum of its
// arithmetic and its memory time. The 113 matrices of the decode benchmark's model at 8 rows
// (Zen 5, 2 threads, 10 interleaved rounds with the memory fast, 73-90 GB/s): 11.28 -> 9.47 ms
// (faster in every round; 8 KB 9.64, 16 KB 9.61); with the memory slow (45-55 GB/s, shared) the
// same within the noise.
constexpr int64_t DOT_AHEAD = 12288;

// The same with bfloat16 activations: vdpbf16ps multiplies 32 bfloat16 pairs exactly and adds
// them into 16 float32 sums, so nothing is widened in registers (the widening made the AVX2
// path core-bound at half the bytes). The inputs are exactly those the stock kernels see.
template <int MC, int R>
inline void block(const uint16_t* x, int64_t len, int64_t ld, const uint16_t* w, float* out, int64_t ldy,
                  bool add) {
  if constexpr (R == 1) return row_at_a_time<MC>(x, len, ld, w, out, ldy, add);
  __m512 acc[R][MC];
  PARSCALE_UNROLL for (int r = 0; r < R; ++r)
    PARSCALE_UNROLL for (int m = 0; m < MC; ++m) acc[r][m] = _mm512_setzero_ps();
  // The lines asked for lie DOT_AHEAD bytes of this pass's reads ahead: whole groups of R rows
  // ahead at the same columns (a block's rows lie one after another).
  const int64_t group = R * len * int64_t(sizeof(uint16_t));
  const uint16_t* next = w + (DOT_AHEAD + group - 1) / group * R * ld;
  for (int64_t k = 0; k < len; k += 32) {
    const __mmask32 mask = parscale::first32(len - k);
    __m512i wv[R];
    PARSCALE_UNROLL for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(next + r * ld + k), _MM_HINT_T0);
      wv[r] = _mm512_maskz_loadu_epi16(mask, w + r * ld + k);
    }
    PARSCALE_UNROLL for (int m = 0; m < MC; ++m) {
      __m512i xv = _mm512_maskz_loadu_epi16(mask, x + m * ld + k);
      PARSCALE_UNROLL for (int r = 0; r < R; ++r)
        acc[r][m] = _mm512_dpbf16_ps(acc[r][m], reinterpret_cast<__m512bh&>(wv[r]), reinterpret_cast<__m512bh&>(xv));
    }
  }
  PARSCALE_UNROLL for (int r = 0; r < R; ++r)
    PARSCALE_UNROLL for (int m = 0; m < MC; ++m) out[m * ldy + r] = (add ? out[m * ldy + r] : 0.0f) + _mm512_reduce_add_ps(acc[r][m]);
}
#endif

// Weight rows per step: enough independent accumulators to hide the FMA latency, and all of
// them in registers (AVX2 has 16 vector registers, AVX-512 32). With AVX-512, up to 4 rows of
// x take one weight row at a time, straight through (`row_at_a_time`): a single stream that the
// hardware prefetcher follows. On an AVX-512 EPYC (Zen 5), bfloat16, 2 threads, interleaved
// with the earlier scheme (several weight rows side by side, each row's next lines prefetched
// R rows ahead): 1 row of x over the 113 matrices of the benchmark's 16-layer model 65 against
// 52-54 GB/s (torch's sum read 69-85 then); 2 and 4 rows over 48 matrices of 2816 x 1024 7.6
// against 9.0 ms and 8.1 against 9.7. With 8 rows the side-by-side rows stay faster (9.3
// against 9.9 ms one at a time), so 5-8 rows keep them.
#ifdef PARSCALE_AVX512
template <int MC> constexpr int rows_per_step() { return MC <= 4 ? 1 : 2; }
#else
template <int MC> constexpr int rows_per_step() { return MC <= 2 ? 4 : (MC <= 4 ? 2 : 1); }
#endif

template <int MC, typename XT, typename WT>
void rows_range(const XT* x, int64_t len, int64_t ld, const WT* w, float* y, int64_t N, int64_t n0, int64_t n1,
                bool add) {
  constexpr int R = rows_per_step<MC>();
  int64_t n = n0;
  for (; n + R <= n1; n += R) block<MC, R>(x, len, ld, w + n * ld, y + n, N, add);
  for (; n < n1; ++n) block<MC, 1>(x, len, ld, w + n * ld, y + n, N, add);
}

template <typename XT, typename WT>
void chunk(int64_t mc, const XT* x, int64_t len, int64_t ld, const WT* w, float* y, int64_t N, int64_t n0,
           int64_t n1, bool add) {
  switch (mc) {
    case 1: return rows_range<1, XT, WT>(x, len, ld, w, y, N, n0, n1, add);
    case 2: return rows_range<2, XT, WT>(x, len, ld, w, y, N, n0, n1, add);
    case 3: return rows_range<3, XT, WT>(x, len, ld, w, y, N, n0, n1, add);
    case 4: return rows_range<4, XT, WT>(x, len, ld, w, y, N, n0, n1, add);
    case 5: return rows_range<5, XT, WT>(x, len, ld, w, y, N, n0, n1, add);
    case 6: return rows_range<6, XT, WT>(x, len, ld, w, y, N, n0, n1, add);
    case 7: return rows_range<7, XT, WT>(x, len, ld, w, y, N, n0, n1, add);
    default: return rows_range<8, XT, WT>(x, len, ld, w, y, N, n0, n1, add);
  }
}

using parscale::k_step;  // columns of x per pass (common.h)

// Columns per pass for mc rows of x: k_step's, except that where the rows go side by side (5-8
// rows with AVX-512, rows_per_step) the passes are made equal (rounded up to 32 columns). k_step
// alone cuts K = 2816 (a down projection) at 8 bfloat16 rows into 2048 + 768 columns and at 6
// rows into 2720 + 96: a short last pass reads a few lines of each weight row, 5.6 KB apart, which
// neither the hardware prefetcher nor the rows asked for ahead keep in flight. Two passes of 1408
// columns instead, on 16 matrices of 1024 x 2816 (Zen 5, 2 threads, read bandwidth about 80
// GB/s, medians of 10 interleaved rounds): bfloat16 8 rows 46 -> 54 GB/s, 7 rows 50 -> 67, 6
// rows 40 -> 59; float32 8 rows 52 -> 54, 6 rows 50 -> 58. Up to 4 rows a row is read straight
// through (row_at_a_time), and there a long first pass is nearly one stream: equal passes were
// no faster (float32 3 rows 60 against 54, 4 rows 49 against 48).
inline int64_t pass_columns(int64_t mc, int64_t x_size, int64_t K) {
  const int64_t step = k_step(mc, x_size, K);
#ifdef PARSCALE_AVX512
  if (mc > 4 && step < K) {
    const int64_t passes = (K + step - 1) / step;
    return ((K + passes - 1) / passes + 31) / 32 * 32;  // at most step (a multiple of 32)
  }
#endif
  return step;
}

using parscale::Group;

// The group's products of the same x (a layer's q, k and v, or its gate and up): y_g = x W_g^T,
// y_g at group.offset[g] in y. Their blocks of weight rows go through one parallel loop, so one
// fork and join serve them all. `finish(g, n0, n1)` runs once the outputs of W_g's rows n0..n1
// are complete, in the parallel loop. Each output is computed as by a call of its own.
template <typename XT, typename WT, typename Finish>
void run_group(const XT* x, int64_t M, int64_t K, const Group& group, const WT* const* w, float* y, int threads,
               Finish finish) {
  // Blocks of weight rows handed out as the threads ask (`schedule(guided)`): on a shared machine
  // a thread that loses its core does fewer blocks instead of making the others wait at the end
  // of a static split; and the first blocks each thread takes are long runs of consecutive rows,
  // one long stream through the weights. On the 113 matrices of the decode benchmark's model
  // (Zen 5, 2 threads, best of 7 interleaved rounds) against runs of 4 blocks (`dynamic, 4`):
  // bfloat16 1 row 5.52 against 5.87 ms, 8 rows 8.39 against 8.97; float32 1 row 9.74 against
  // 10.1 (a static split: 5.65 and 8.65 in bfloat16).
  const int64_t blocks = group.blocks();
#pragma omp parallel for schedule(guided) num_threads(threads)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t g = group.product(b), n = group.N[g];
    const int64_t n0 = (b - group.start[g]) * BLOCK_N, n1 = std::min(n, n0 + BLOCK_N);
    float* yg = y + group.offset[g];
    for (int64_t m0 = 0; m0 < M; m0 += CHUNK_M) {  // later chunks re-read the weight block from cache
      const int64_t mc = std::min<int64_t>(CHUNK_M, M - m0), step = pass_columns(mc, sizeof(XT), K);
      for (int64_t k0 = 0; k0 < K; k0 += step)
        chunk<XT, WT>(mc, x + m0 * K + k0, std::min(step, K - k0), K, w[g] + k0, yg + m0 * n, n, n0, n1, k0 > 0);
    }
    finish(g, n0, n1);
  }
}

// One product (`run_group` of one).
template <typename XT, typename WT>
void run(const XT* x, int64_t M, int64_t K, const WT* w, float* y, int64_t N, int threads) {
  run_group<XT, WT>(x, M, K, Group(M, 1, &N, BLOCK_N), &w, y, threads, [](int64_t, int64_t, int64_t) {});
}

#ifdef PARSCALE_AMX
// Above 8 rows the vdpbf16ps path makes a second pass over each cached weight block and becomes
// core-bound. AMX does a 16 x M x 32 block per instruction, so its time hardly grows with M:
// on the 48 matrices of the benchmark (one thread, CPU time, best of 5), 12 rows took 61 ms
// against 83-95 ms and 16 rows 64 against 108. Below 9 rows it was no faster (8 rows: 59
// against 56; 2 rows: 52 against 37), its 16-row strided tile loads streaming the weights more
// slowly than plain vector loads; the caller takes it from 9 rows. The roles are swapped so that the weights need
// no repacking: y^T = W x^T, with W's rows as the A tiles (16 rows x 32 bfloat16, read straight
// from the row-major weights) and x^T as the B tile, which AMX wants pair-interleaved ("VNNI"):
// B[k/2][2m + k%2] = x[m][k], packed once per call (K*M values, a few KB). Four accumulator
// tiles take turns over the K chunks of one 16-row block, so consecutive products do not wait
// on each other and each thread streams only 16 weight rows at a time.
struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

bool amx_permitted() {  // Linux hands out the tile state only on request (once per process)
  constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
  static const bool ok = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  return ok;
}

// Tiles 0-3: C (16 weight rows x M float32), 4-5: A (16 weight rows x 32 bfloat16), 6-7: B (16 pairs x M).
void configure_tiles(int64_t M) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = static_cast<uint16_t>(t == 4 || t == 5 ? 64 : M * 4);
  }
  _tile_loadconfig(&cfg);
}

// One block of 16 weight rows: out[m * ldy + r] = dot(x[m], w[r]). K is a multiple of 32.
inline void amx_block(const uint16_t* xp, int64_t M, int64_t K, const uint16_t* w, float* out, int64_t ldy,
                      float* scratch) {
  const int64_t lda = K * 2, ldb = M * 4;
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  int64_t k = 0;
  for (; k + 128 <= K; k += 128) {
    if (k + 128 + PARSCALE_AMX_AHEAD <= K)  // the 16 rows' next lines, so their loads overlap
      for (int r = 0; r < 16; ++r) {
        const char* line = reinterpret_cast<const char*>(w + r * K + k + PARSCALE_AMX_AHEAD);
        _mm_prefetch(line, _MM_HINT_T0); _mm_prefetch(line + 64, _MM_HINT_T0);
        _mm_prefetch(line + 128, _MM_HINT_T0); _mm_prefetch(line + 192, _MM_HINT_T0);
      }
    _tile_loadd(4, w + k, lda);        _tile_loadd(6, xp + k * M, ldb);        _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(5, w + k + 32, lda);   _tile_loadd(7, xp + (k + 32) * M, ldb); _tile_dpbf16ps(1, 5, 7);
    _tile_loadd(4, w + k + 64, lda);   _tile_loadd(6, xp + (k + 64) * M, ldb); _tile_dpbf16ps(2, 4, 6);
    _tile_loadd(5, w + k + 96, lda);   _tile_loadd(7, xp + (k + 96) * M, ldb); _tile_dpbf16ps(3, 5, 7);
  }
  for (; k < K; k += 32) {
    _tile_loadd(4, w + k, lda); _tile_loadd(6, xp + k * M, ldb); _tile_dpbf16ps(0, 4, 6);
  }
  _tile_stored(0, scratch, ldb); _tile_stored(1, scratch + 16 * M, ldb);
  _tile_stored(2, scratch + 32 * M, ldb); _tile_stored(3, scratch + 48 * M, ldb);
  for (int r = 0; r < 16; ++r)
    for (int64_t m = 0; m < M; ++m) {
      const float* c = scratch + r * M + m;
      out[m * ldy + r] = (c[0] + c[16 * M]) + (c[32 * M] + c[48 * M]);
    }
}

void run_amx(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, float* y, int64_t N, int threads) {
  uint16_t* xp = new uint16_t[K * M];  // x^T, pair-interleaved: xp[(k/2)*2M + 2m + k%2] = x[m][k]
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xp[(k / 2) * 2 * M + 2 * m + (k % 2)] = x[m * K + k];
  const int64_t blocks = N / 16;
#pragma omp parallel num_threads(threads)
  {
    configure_tiles(M);  // the tile configuration is per thread
    float scratch[4 * 16 * 16];
#pragma omp for schedule(dynamic, 4)
    for (int64_t b = 0; b < blocks; ++b) amx_block(xp, M, K, w + b * 16 * K, y + b * 16, N, scratch);
    _tile_release();
  }
  delete[] xp;
}
#endif

// x as float32 for bfloat16 weights: widened, and with PARSCALE_UNPACK each whole group of 16
// columns in the order the unpacked weights come in (0-3, 8-11, 4-7, 12-15); the last K % 16
// columns stay in place (the 8-wide and scalar loops take them). Column passes (pass_columns) start
// at multiples of 32, so they cut no group.
template <typename XT>
void stage_x(const XT* x, int64_t M, int64_t K, float* out) {
  for (int64_t m = 0; m < M; ++m) {
    const XT* row = x + m * K;
    float* o = out + m * K;
    int64_t k = 0;
#ifdef PARSCALE_UNPACK
    for (; k + 16 <= K; k += 16)
      for (int i = 0; i < 4; ++i) {
        o[k + i] = to_float(row[k + i]);
        o[k + 4 + i] = to_float(row[k + 8 + i]);
        o[k + 8 + i] = to_float(row[k + 4 + i]);
        o[k + 12 + i] = to_float(row[k + 12 + i]);
      }
#endif
    for (; k < K; ++k) o[k] = to_float(row[k]);
  }
}

}  // namespace

// x: [M, K] float32; w: [N, K] float32 or bfloat16 bits; bias: [N] of the weight type or null;
// y: [M, N] float32. All row-major and contiguous (checked by the Python caller).
extern "C" void parscale_skinny_f32(const float* x, int64_t M, int64_t K, const float* w, const float* bias,
                                    float* y, int64_t N, int threads) {
  run<float, float>(x, M, K, w, y, N, threads);
  add_bias(y, bias, M, N);
}

// G products of one float32 x (`run_group`): w[g] [N[g], K], bias[g] [N[g]] or null, y_g [M, N[g]]
// one after another in y. Each y_g equals parscale_skinny_f32's bit for bit.
extern "C" void parscale_skinny_group_f32(const float* x, int64_t M, int64_t K, int64_t G, const float* const* w,
                                          const float* const* bias, float* y, const int64_t* N, int threads) {
  const Group group(M, G, N, BLOCK_N);
  run_group<float, float>(x, M, K, group, w, y, threads, [=, &group](int64_t g, int64_t n0, int64_t n1) {
    if (!bias[g]) return;
    float* yg = y + group.offset[g];
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = n0; n < n1; ++n) yg[m * N[g] + n] += bias[g][n];
  });
}

extern "C" void parscale_skinny_bf16(const float* x, int64_t M, int64_t K, const uint16_t* w, const uint16_t* bias,
                                     float* y, int64_t N, int threads) {
  parscale::Buffer<float> x32(M * K);
  stage_x(x, M, K, x32.data());
  run<float, uint16_t>(x32.data(), M, K, w, y, N, threads);
  add_bias(y, bias, M, N);
}

// bfloat16 x and y on the widening path (no AVX512-BF16): x widened and y rounded here, not in
// two torch calls around the kernel (a few microseconds each, twice per Linear, 7 Linears per
// layer and decode step). The result is the float32 path's, rounded once as torch rounds it,
// block by block in the parallel loop (a rounding pass after it, on one thread, made 8 rows slower).
extern "C" void parscale_skinny_group_bf16_io(const uint16_t* x, int64_t M, int64_t K, int64_t G,
                                              const uint16_t* const* w, const uint16_t* const* bias, uint16_t* y,
                                              const int64_t* N, int threads);

extern "C" void parscale_skinny_bf16_io(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w,
                                        const uint16_t* bias, uint16_t* y, int64_t N, int threads) {
  parscale_skinny_group_bf16_io(x, M, K, 1, &w, &bias, y, &N, threads);
}

// The rounding of each finished block of a group's float32 outputs (out) into bfloat16 y (the
// same offsets), the bias added in float32 first, as torch adds and rounds.
struct RoundInto {
  const Group& group;
  const float* out;
  uint16_t* y;
  const uint16_t* const* bias;
  int64_t M;
  void operator()(int64_t g, int64_t n0, int64_t n1) const {
    const int64_t n = group.N[g], offset = group.offset[g];
    const uint16_t* b = bias[g];
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = n0; j < n1; ++j)
        store(y + offset + m * n + j, out[offset + m * n + j] + (b ? to_float(b[j]) : 0.0f));
  }
};

// G products of one bfloat16 x on the widening path, as parscale_skinny_bf16_io each.
extern "C" void parscale_skinny_group_bf16_io(const uint16_t* x, int64_t M, int64_t K, int64_t G,
                                              const uint16_t* const* w, const uint16_t* const* bias, uint16_t* y,
                                              const int64_t* N, int threads) {
  const Group group(M, G, N, BLOCK_N);
  parscale::Buffer<float> x32(M * K), y32(group.values(M));
  stage_x(x, M, K, x32.data());
  run_group<float, uint16_t>(x32.data(), M, K, group, w, y32.data(), threads, RoundInto{group, y32.data(), y, bias, M});
}

extern "C" int parscale_skinny_has_avx2() {
#ifdef PARSCALE_AVX2
  return 1;
#else
  return 0;
#endif
}

// x: [M, K] bfloat16 bits (not widened); otherwise as parscale_skinny_bf16. Only built where the
// CPU has AVX512-BF16 (parscale_skinny_has_bf16_dot() says so); never called otherwise.
extern "C" void parscale_skinny_bf16_dot(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w,
                                         const uint16_t* bias, float* y, int64_t N, int threads) {
#ifdef PARSCALE_BF16DOT
  run<uint16_t, uint16_t>(x, M, K, w, y, N, threads);
  add_bias(y, bias, M, N);
#else
  (void)x, (void)M, (void)K, (void)w, (void)bias, (void)y, (void)N, (void)threads;
#endif
}

// G products of one bfloat16 x by vdpbf16ps, y_g rounded to bfloat16 here, block by block in the
// parallel loop (as parscale_skinny_bf16_io does): the float32 output and torch's rounding call
// after it cost 2-3 us per product, about a hundred times per decode step. Each y_g is the
// float32 entry's result (bias added in float32) rounded as torch rounds it, bit for bit.
extern "C" void parscale_skinny_group_bf16_dot_io(const uint16_t* x, int64_t M, int64_t K, int64_t G,
                                                  const uint16_t* const* w, const uint16_t* const* bias, uint16_t* y,
                                                  const int64_t* N, int threads) {
#ifdef PARSCALE_BF16DOT
  const Group group(M, G, N, BLOCK_N);
  parscale::Buffer<float> y32(group.values(M));
  run_group<uint16_t, uint16_t>(x, M, K, group, w, y32.data(), threads, RoundInto{group, y32.data(), y, bias, M});
#else
  (void)x, (void)M, (void)K, (void)G, (void)w, (void)bias, (void)y, (void)N, (void)threads;
#endif
}

extern "C" void parscale_skinny_bf16_dot_io(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w,
                                            const uint16_t* bias, uint16_t* y, int64_t N, int threads) {
  parscale_skinny_group_bf16_dot_io(x, M, K, 1, &w, &bias, y, &N, threads);
}

// As parscale_skinny_bf16_dot, on the AMX tiles; needs 1 <= M <= 16, K % 32 == 0, N % 16 == 0
// (the caller checks) and parscale_skinny_has_amx() (which also asks Linux for the tile state).
extern "C" void parscale_skinny_bf16_amx(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w,
                                         const uint16_t* bias, float* y, int64_t N, int threads) {
#ifdef PARSCALE_AMX
  run_amx(x, M, K, w, y, N, threads);
  add_bias(y, bias, M, N);
#else
  (void)x, (void)M, (void)K, (void)w, (void)bias, (void)y, (void)N, (void)threads;
#endif
}

extern "C" int parscale_skinny_has_amx() {
#ifdef PARSCALE_AMX
  return amx_permitted() ? 1 : 0;
#else
  return 0;
#endif
}

extern "C" int parscale_skinny_has_bf16_dot() {
#ifdef PARSCALE_BF16DOT
  return 1;
#else
  return 0;
#endif
}
