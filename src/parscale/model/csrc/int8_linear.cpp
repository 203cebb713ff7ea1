// Skinny product with weight-only int8: y = (x Q^T) * s (+ b) for a few rows of x.
//
// Q: [N, K] int8 (symmetric, per output row), s: [N] float32 scales, x: [M, K] float32. The
// same scheme as skinny_linear.cpp (each weight row streamed once and dotted with every row of
// x while it sits in L1), reading a quarter of the float32 bytes. Three instruction paths chosen
// by the compiler flags:
// - Integer products, on AVX2 and on AVX-512 (BW). Each row of x is quantised once per call to
//   int16 (scale max|x_row| / 32767: a relative error of 1.5e-5 of the row's largest value, 250
//   times finer than the weights' int8 step), the weights are sign-extended to int16 in
//   registers and multiplied pairwise, summed exactly into int32: vpmaddwd (16 multiply-adds
//   per AVX2 instruction), or with AVX-512 VNNI vpdpwssd (32 multiply-adds and the add in one
//   instruction; vpmaddwd and an add where AVX-512 has no VNNI). The float32 path below widens
//   every 8 or 16 weights in two steps and does one multiply-add per lane, so 8 rows of x made it
//   compute-bound. Measured (benchmarks/README.md, 48 matrices of 2816 x 1024, 2 threads): on
//   an AVX2-only EPYC 8 rows 17.4 -> 12.4 ms, 1 row 7.3 -> 6.4 ms; on an AVX-512 EPYC with
//   VNNI (Zen 5), against the earlier float32 path in the same run (int8_product.py --against),
//   8 rows 6.1 -> 5.7 ms, 1 row 3.8 -> 3.4 ms (with one weight row at a time, below): the gain
//   at 8 rows is small there, as its FMAs were not far behind. Rows with a NaN or an infinity
//   take the float32 path, so they propagate as in F.linear. Both paths give the same integers
//   (the same rounding of x, exact sums), so their outputs differ by float32 rounding only.
// - int8 activations (`bits` 8, `quantize_int8(activation_bits=8)`): x rounded to int8 per row
//   instead (step max|x_row| / 127) on every path; on AVX-512 VNNI, vpdpbusd multiplies the
//   int8 weights as they lie with x + 128 (64 multiply-adds per instruction; the section below
//   says more), elsewhere the int16 kernels take the int8 values: the same integers.
// - AVX-512 and AVX2 when the integer path cannot run (a NaN or an infinity in x): int8
//   widened to float32 in registers (sign-extend, convert), float32 sums of exact integers times x.
// - plain C++ (the compiler vectorises it).
// The scales are applied once per output at the end. The weights come as rows [N, K] or, where
// AVX-512 VNNI multiplies them so, in tiles of 16 rows (the section "weights in tiles" below).
//
// Why not torch's own CPU kernel, torch._weight_int8pack_mm (torch 2.13): on the 48 matrices of
// 2816 x 1024 (benchmarks/int8_product.py, one thread, best of 5) it took 35/43/44/81 ms for
// M = 1/2/4/8 rows with bfloat16 activations and 308-2419 ms with float32 ones; the float32
// path of this kernel 29/32/35/60 ms (and the bfloat16 kernel path 60/52/52/67 ms).
//
// No torch header (see skinny_linear.cpp): Python calls the C functions at the end by ctypes.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common.h"
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define PARSCALE_AVX512 1
#endif
#ifdef PARSCALE_AVX2
#define PARSCALE_INT16 1  // integer products (the header says why)
#endif
#if defined(PARSCALE_AVX512) && defined(__AVX512VNNI__)
#define PARSCALE_VNNI 1  // vpdpwssd: the pairwise int16 products and their sum in one instruction
#endif
#ifdef PARSCALE_AVX2
// One 64-byte line of int8 weights per 64 elements: ask for the same offset in the next R rows,
// one pass ahead, so that the loads of a block overlap (as in skinny_linear.cpp).
#define PARSCALE_PREFETCH(w, r, R, K, k) \
  _mm_prefetch(reinterpret_cast<const char*>((w) + ((r) + (R)) * (K) + (k)), _MM_HINT_T0)
#endif

namespace {

#ifdef PARSCALE_AVX2
using parscale::hsum;
#endif

constexpr int64_t CHUNK_M = 8;  // rows of x per pass over a block of weight rows
// Bytes ahead in a thread's stream of weight rows that the one-row-at-a-time loops below ask for
// (into the next rows: a block's rows lie one after another; 1 KB rows are too short a stream
// for the hardware prefetcher alone). On the 113 int8 matrices of the decode benchmark's model
// (Zen 5, 2 threads, with the guided schedule, best of 9-11 interleaved rounds) 8 KB against 4:
// 1 row 3.97 against 4.22 ms, 2 rows 3.84 against 4.30, 4 rows 4.65 against 5.02, 8 rows 6.29
// against 6.70; int8 activations 1 row 3.23 against 3.34; 16 KB no better than 8.
constexpr int64_t AHEAD = 8192;
constexpr int64_t TILE_ROWS = 16, TILE_LINE = 64;  // tiled weights: rows per tile, bytes per line (4 columns)
#ifdef PARSCALE_AVX512
constexpr int64_t BLOCK_N = 32;  // weight rows per block of the parallel loop (skinny_linear.cpp says why)
#else
constexpr int64_t BLOCK_N = 16;
#endif

// out[m * ldy + r] = dot(x[m], q[r]) for m < MC rows of x and r < R weight rows (unscaled).
template <int MC, int R>
inline void block(const float* x, int64_t K, const int8_t* w, float* out, int64_t ldy) {
  int64_t k = 0;
  float acc_s[R][MC] = {};
#if defined(PARSCALE_AVX512)
  __m512 acc[R][MC];
  PARSCALE_UNROLL for (int r = 0; r < R; ++r)
    PARSCALE_UNROLL for (int m = 0; m < MC; ++m) acc[r][m] = _mm512_setzero_ps();
  for (; k < K; k += 16) {
    const __mmask16 mask = parscale::first16(K - k);
    __m512 wv[R];
    PARSCALE_UNROLL for (int r = 0; r < R; ++r) {
      if (k % 64 == 0) PARSCALE_PREFETCH(w, r, R, K, k);
      __m128i bytes = _mm_maskz_loadu_epi8(mask, w + r * K + k);  // masked lanes read as 0
      wv[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
    }
    PARSCALE_UNROLL for (int m = 0; m < MC; ++m) {
      __m512 xv = _mm512_maskz_loadu_ps(mask, x + m * K + k);
      PARSCALE_UNROLL for (int r = 0; r < R; ++r) acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  PARSCALE_UNROLL for (int r = 0; r < R; ++r)
    PARSCALE_UNROLL for (int m = 0; m < MC; ++m) acc_s[r][m] = _mm512_reduce_add_ps(acc[r][m]);
#elif defined(PARSCALE_AVX2)
  __m256 acc[R][MC];
  PARSCALE_UNROLL for (int r = 0; r < R; ++r)
    PARSCALE_UNROLL for (int m = 0; m < MC; ++m) acc[r][m] = _mm256_setzero_ps();
  for (; k + 8 <= K; k += 8) {
    __m256 wv[R];
    PARSCALE_UNROLL for (int r = 0; r < R; ++r) {
      if (k % 64 == 0) PARSCALE_PREFETCH(w, r, R, K, k);
      __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + r * K + k));  // 8 bytes
      wv[r] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
    }
    PARSCALE_UNROLL for (int m = 0; m < MC; ++m) {
      __m256 xv = _mm256_loadu_ps(x + m * K + k);
      PARSCALE_UNROLL for (int r = 0; r < R; ++r) acc[r][m] = _mm256_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  PARSCALE_UNROLL for (int r = 0; r < R; ++r)
    PARSCALE_UNROLL for (int m = 0; m < MC; ++m) acc_s[r][m] = hsum(acc[r][m]);
#endif
  for (; k < K; ++k)  // the tail, or everything without AVX2 (vectorised by the compiler)
    PARSCALE_UNROLL for (int r = 0; r < R; ++r) {
      float wk = static_cast<float>(w[r * K + k]);
      PARSCALE_UNROLL for (int m = 0; m < MC; ++m) acc_s[r][m] += wk * x[m * K + k];
    }
  PARSCALE_UNROLL for (int r = 0; r < R; ++r)
    PARSCALE_UNROLL for (int m = 0; m < MC; ++m) out[m * ldy + r] = acc_s[r][m];
}

#ifdef PARSCALE_AVX512  // one row of x: one weight row at a time, as in skinny_linear.cpp (which says why)
template <int MC> constexpr int rows_per_step() { return MC == 1 ? 1 : (MC <= 2 ? 8 : (MC <= 4 ? 4 : 2)); }
#else
template <int MC> constexpr int rows_per_step() { return MC <= 2 ? 4 : (MC <= 4 ? 2 : 1); }
#endif

template <int MC>
void rows_range(const float* x, int64_t K, const int8_t* w, float* y, int64_t N, int64_t n0, int64_t n1) {
  constexpr int R = rows_per_step<MC>();
  int64_t n = n0;
  for (; n + R <= n1; n += R) block<MC, R>(x, K, w + n * K, y + n, N);
  for (; n < n1; ++n) block<MC, 1>(x, K, w + n * K, y + n, N);
}

// The rows of x in a chunk (1-8) as a compile-time constant: the kernels keep MC accumulators
// in registers. f is called with std::integral_constant<int, MC>.
template <typename F>
inline void with_rows(int64_t mc, F&& f) {
  switch (mc) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 7: return f(std::integral_constant<int, 7>{});
    default: return f(std::integral_constant<int, 8>{});
  }
}

void chunk(int64_t mc, const float* x, int64_t K, const int8_t* w, float* y, int64_t N, int64_t n0, int64_t n1) {
  with_rows(mc, [&](auto m) { rows_range<decltype(m)::value>(x, K, w, y, N, n0, n1); });
}


#ifdef PARSCALE_INT16
// ---------------------------------------------------------------- the integer path (AVX2)
// Columns per pass at most, so that no int32 lane can overflow: each lane adds two products of
// at most 32767 * 127 per step, and 128 steps stay below 2^31 with room (128 * 2 * 32767 * 127 =
// 1.07e9). A step is 16 columns on AVX2 (8 lanes) and 32 with AVX-512 (16 lanes; the
// accumulators that take turns are summed in int32 at the end, so a lane then holds the products
// of all the pass's steps): 2048 and 4096 columns. Passes of 2048 cut a down projection's K =
// 2816 into 2048 + 768 even for one row of x, whose short second pass reads a few lines of each
// weight row; with AVX-512 it is now one pass (bfloat16 x, the decode benchmark's model, int8 P =
// 1, Zen 5, 6 interleaved rounds: 4.82 -> 4.24 ms per token, faster in every round).
#ifdef PARSCALE_AVX512
constexpr int64_t INT16_MAX_LEN = 4096;
#else
constexpr int64_t INT16_MAX_LEN = 2048;
#endif

#ifdef PARSCALE_AVX512
inline __m512i dot_pairs(__m512i acc, __m512i w, __m512i x) {  // acc + the sums of pairs of int16 products, exact
#ifdef PARSCALE_VNNI
  return _mm512_dpwssd_epi32(acc, w, x);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(w, x));
#endif
}

inline __m512i dot_i16(__m512i acc, const int8_t* w, const int16_t* x, __mmask32 mask) {  // 32 columns
  return dot_pairs(acc, _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask, w)), _mm512_maskz_loadu_epi16(mask, x));
}

inline int64_t hsum_i64(__m512i v) {  // 16 int32 lanes summed in int64 (their int32 sum may overflow)
  return _mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(v)),
                                                  _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(v, 1))));
}
#endif

inline int64_t hsum_i64(__m256i v) {  // 8 int32 lanes summed in int64, in registers
  // (through a memory array GCC kept the accumulators of the loop in memory too: 2x slower)
  const __m256i wide = _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(v)),
                                        _mm256_cvtepi32_epi64(_mm256_extracti128_si256(v, 1)));
  const __m128i half = _mm_add_epi64(_mm256_castsi256_si128(wide), _mm256_extracti128_si256(wide, 1));
  return _mm_cvtsi128_si64(half) + _mm_extract_epi64(half, 1);
}

// out[m * ldy + r] (+)= dot(xq[m], w[r]) over `len` <= INT16_MAX_LEN columns, exactly (INT16_MAX_LEN
// says why no int32 lane overflows; the passes add up in int64).
template <int MC, int R>
inline void block_i16(const int16_t* x, int64_t len, int64_t ld, const int8_t* w, int64_t* out, int64_t ldy, bool add) {
#ifdef PARSCALE_AVX512
  // 32 columns per step into 16 int32 lanes (two products per lane per step, as AVX2's 16 into
  // 8), the tail masked (zeros add nothing): so no lane holds more products than on AVX2.
  // One row of x (more rows take `row_i16`): one weight row at a time (rows_per_step says why).
  static_assert(MC == 1 && R == 1, "row_i16 takes two or more rows of x");
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;  // 4 lanes of 16 take turns: fewer products each
  int64_t k = 0;
  for (; k + 128 <= len; k += 128) {
    // the two lines AHEAD bytes ahead (the 113 int8 matrices of the benchmark's model, Zen 5:
    // 5.5 -> 4.3 ms with 4 KB against none, before the guided schedule)
    _mm_prefetch(reinterpret_cast<const char*>(w + k) + AHEAD, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + k) + AHEAD + 64, _MM_HINT_T0);
    a0 = dot_i16(a0, w + k, x + k, 0xFFFFFFFFu);
    a1 = dot_i16(a1, w + k + 32, x + k + 32, 0xFFFFFFFFu);
    a2 = dot_i16(a2, w + k + 64, x + k + 64, 0xFFFFFFFFu);
    a3 = dot_i16(a3, w + k + 96, x + k + 96, 0xFFFFFFFFu);
  }
  for (; k < len; k += 32)
    a0 = dot_i16(a0, w + k, x + k, parscale::first32(len - k));
  // The four add up in int32: each lane then holds two products per 32 columns of the pass,
  // which INT16_MAX_LEN keeps below 2^31.
  const int64_t sum = hsum_i64(_mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3)));
  out[0] = (add ? out[0] : 0) + sum;
#else
  __m256i acc[R][MC];
  PARSCALE_UNROLL for (int r = 0; r < R; ++r)
    PARSCALE_UNROLL for (int m = 0; m < MC; ++m) acc[r][m] = _mm256_setzero_si256();
  int64_t k = 0;
  for (; k + 16 <= len; k += 16) {
    __m256i wv[R];
    PARSCALE_UNROLL for (int r = 0; r < R; ++r) {
      if (k % 64 == 0) PARSCALE_PREFETCH(w, r, R, ld, k);
      wv[r] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * ld + k)));
    }
    PARSCALE_UNROLL for (int m = 0; m < MC; ++m) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + m * ld + k));
      PARSCALE_UNROLL for (int r = 0; r < R; ++r) acc[r][m] = _mm256_add_epi32(acc[r][m], _mm256_madd_epi16(wv[r], xv));
    }
  }
  int64_t sums[R][MC];
  PARSCALE_UNROLL for (int r = 0; r < R; ++r)
    PARSCALE_UNROLL for (int m = 0; m < MC; ++m) sums[r][m] = hsum_i64(acc[r][m]);
  for (; k < len; ++k)  // the last columns (fewer than 16)
    PARSCALE_UNROLL for (int r = 0; r < R; ++r)
      PARSCALE_UNROLL for (int m = 0; m < MC; ++m) sums[r][m] += int64_t(w[r * ld + k]) * x[m * ld + k];
  PARSCALE_UNROLL for (int r = 0; r < R; ++r)
    PARSCALE_UNROLL for (int m = 0; m < MC; ++m)
      out[m * ldy + r] = (add ? out[m * ldy + r] : 0) + sums[r][m];
#endif
}

#ifdef PARSCALE_AVX512
// out[m * ldy] (+)= dot(xq[m], w) for MC >= 2 rows of x and one weight row, as `row_u8` does for
// int8 activations: a single stream through the weights per thread, the lines AHEAD bytes ahead
// requested, two sets of accumulators taking turns (each lane then holds at most as many
// products as above). On the 113 int8 matrices of the decode benchmark's model (Zen 5, 2
// threads, best of 7 interleaved rounds) against the earlier scheme (2-8 weight rows side by
// side, `rows_per_step`): 8 rows 7.3 against 9.4 ms, 5 rows 5.6 against 6.9, 2-3 rows the same.
template <int MC>
inline void row_i16(const int16_t* x, int64_t len, int64_t ld, const int8_t* w, int64_t* out, int64_t ldy, bool add) {
  __m512i a0[MC], a1[MC];
  PARSCALE_UNROLL for (int m = 0; m < MC; ++m) a0[m] = a1[m] = _mm512_setzero_si512();
  int64_t k = 0;
  for (; k + 64 <= len; k += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(w + k) + AHEAD, _MM_HINT_T0);
    const __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k)));
    const __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k + 32)));
    PARSCALE_UNROLL for (int m = 0; m < MC; ++m) {
      a0[m] = dot_pairs(a0[m], w0, _mm512_loadu_si512(x + m * ld + k));
      a1[m] = dot_pairs(a1[m], w1, _mm512_loadu_si512(x + m * ld + k + 32));
    }
  }
  for (; k < len; k += 32) {
    const __mmask32 mask = parscale::first32(len - k);
    const __m512i w0 = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask, w + k));
    PARSCALE_UNROLL for (int m = 0; m < MC; ++m) a0[m] = dot_pairs(a0[m], w0, _mm512_maskz_loadu_epi16(mask, x + m * ld + k));
  }
  PARSCALE_UNROLL for (int m = 0; m < MC; ++m)
    out[m * ldy] = (add ? out[m * ldy] : 0) + hsum_i64(_mm512_add_epi32(a0[m], a1[m]));
}
#endif

template <int MC>
void rows_range_i16(const int16_t* x, int64_t len, int64_t ld, const int8_t* w, int64_t* y, int64_t N, int64_t n0,
                    int64_t n1, bool add) {
#ifdef PARSCALE_AVX512
  for (int64_t n = n0; n < n1; ++n) {  // one weight row at a time (row_i16 says why)
    if constexpr (MC == 1) block_i16<1, 1>(x, len, ld, w + n * ld, y + n, N, add);
    else row_i16<MC>(x, len, ld, w + n * ld, y + n, N, add);
  }
#else
  constexpr int R = rows_per_step<MC>();  // MC * R accumulators + R weight vectors + x: 13 of AVX2's 16 registers at most
  int64_t n = n0;
  for (; n + R <= n1; n += R) block_i16<MC, R>(x, len, ld, w + n * ld, y + n, N, add);
  for (; n < n1; ++n) block_i16<MC, 1>(x, len, ld, w + n * ld, y + n, N, add);
#endif
}

void chunk_i16(int64_t mc, const int16_t* x, int64_t len, int64_t ld, const int8_t* w, int64_t* y, int64_t N,
               int64_t n0, int64_t n1, bool add) {
  with_rows(mc, [&](auto m) { rows_range_i16<decltype(m)::value>(x, len, ld, w, y, N, n0, n1, add); });
}

#ifdef PARSCALE_VNNI
// ---------------------------------------------------------------- 8-bit activations (AVX-512 VNNI)
// With activations rounded to int8 (`bits` 8), vpdpbusd multiplies 64 bytes of weights with 64
// of x and sums each four products into an int32 lane: twice vpdpwssd's 32 products, and the
// weights are not widened first. Its first operand is unsigned: the weights go in as w + 128
// (0..255: the sign bit flipped, one vpxord per 64 weights) and x as it is (-127..127), so each
// sum is dot(x, w) + 128 * sum(x), and 128 * sum(x) is taken off again, one sum per row of x and
// pass shared by every weight row (`pass_sums`, summed once per call). The integers are those of the int16 path with the
// same xq, summed exactly: the same results. A lane adds at most 4 * 255 * 127 per 64 columns,
// so no pass can overflow it.
// out[m * ldy] (+)= dot(x[m], w) for MC rows of x and one weight row: one weight row at a time,
// so each thread reads one straight stream (the lines AHEAD bytes ahead requested as well), with two
// sets of accumulators taking turns (2 * MC independent sums). On the 113 int8 matrices of
// the decode benchmark's model (Zen 5, 2 threads, best of 7 interleaved rounds) against the
// int16 kernel with the same values: 8 rows 5.3 against 7.8 ms, 4 rows 4.5 against 5.0, 2 rows
// 4.3 against 5.2, 1 row 4.3 against 4.5; two or more weight rows side by side (the int16
// kernel's scheme) took 6.0 ms at 8 rows (all with 4 KB ahead then). x as xq + 128 and the
// weight rows' sums from vpdpbusd with a vector of ones (two more vpdpbusd per 128 columns and
// weight row, where 8 rows of x take 16: the arithmetic that bounds 8 rows) took 60.9 against
// 55.6 us at 8 rows with the matrix in L2, 3.17 against 3.06 ms on the 48 matrices from memory.
template <int MC>
inline void row_u8(const int8_t* x, int64_t len, int64_t ld, const int8_t* w, const int64_t* sums, int64_t lds,
                   int64_t* out, int64_t ldy, bool add) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));  // w ^ 0x80 = w + 128, unsigned
  __m512i a0[MC], a1[MC];
  PARSCALE_UNROLL for (int m = 0; m < MC; ++m) a0[m] = a1[m] = _mm512_setzero_si512();
  int64_t k = 0;
  for (; k + 128 <= len; k += 128) {
    _mm_prefetch(reinterpret_cast<const char*>(w + k) + AHEAD, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + k) + AHEAD + 64, _MM_HINT_T0);
    const __m512i w0 = _mm512_xor_si512(_mm512_loadu_si512(w + k), flip);
    const __m512i w1 = _mm512_xor_si512(_mm512_loadu_si512(w + k + 64), flip);
    PARSCALE_UNROLL for (int m = 0; m < MC; ++m) {
      a0[m] = _mm512_dpbusd_epi32(a0[m], w0, _mm512_loadu_si512(x + m * ld + k));
      a1[m] = _mm512_dpbusd_epi32(a1[m], w1, _mm512_loadu_si512(x + m * ld + k + 64));
    }
  }
  for (; k < len; k += 64) {  // the tail, masked: x's zeros add nothing (and nothing to its sum)
    const __mmask64 mask = parscale::first64(len - k);
    const __m512i w0 = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, w + k), flip);
    PARSCALE_UNROLL for (int m = 0; m < MC; ++m)
      a0[m] = _mm512_dpbusd_epi32(a0[m], w0, _mm512_maskz_loadu_epi8(mask, x + m * ld + k));
  }
  PARSCALE_UNROLL for (int m = 0; m < MC; ++m)
    out[m * ldy] = (add ? out[m * ldy] : 0) + hsum_i64(_mm512_add_epi32(a0[m], a1[m])) - 128 * sums[m * lds];
}

// sums: row m's sum of x over this pass at sums[m * lds].
void chunk_u8(int64_t mc, const int8_t* x, int64_t len, int64_t ld, const int8_t* w, const int64_t* sums,
              int64_t lds, int64_t* y, int64_t N, int64_t n0, int64_t n1, bool add) {
  with_rows(mc, [&](auto m) {
    for (int64_t n = n0; n < n1; ++n) row_u8<decltype(m)::value>(x, len, ld, w + n * ld, sums, lds, y + n, N, add);
  });
}

// The passes of run_u8 over K for the rows m0 .. m0 + mc of x: x's bytes in L1.
inline int64_t u8_step(int64_t mc, int64_t K) { return parscale::k_step(mc, sizeof(int8_t), K); }

inline int64_t u8_passes(int64_t M, int64_t K) {  // the most passes of any chunk of rows (the first's)
  const int64_t step = u8_step(std::min<int64_t>(CHUNK_M, M), K);
  return (K + step - 1) / step;
}

// xb[0, n) = xq as bytes (|xq| <= 127), and their sum: 32 values a step (the serial part of a
// call, before its parallel loop).
int64_t bytes_and_sum(const int16_t* xq, int64_t n, int8_t* xb) {
  const __m512i ones = _mm512_set1_epi16(1);
  __m512i sum = _mm512_setzero_si512();
  int64_t k = 0;
  for (; k + 32 <= n; k += 32) {
    const __m512i v = _mm512_loadu_si512(xq + k);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xb + k), _mm512_cvtepi16_epi8(v));
    sum = _mm512_add_epi32(sum, _mm512_madd_epi16(v, ones));  // pairs of int16 into int32 lanes
  }
  int64_t total = _mm512_reduce_add_epi32(sum);  // a lane adds 2 * 127 per 32 values: no overflow
  for (; k < n; ++k) {
    xb[k] = static_cast<int8_t>(xq[k]);
    total += xq[k];
  }
  return total;
}

// xb = xq as bytes, and sums[m * passes + p] = row m's sum of xq over run_u8's pass p.
void pass_sums(const int16_t* xq, int64_t M, int64_t K, int8_t* xb, int64_t* sums, int64_t passes) {
  for (int64_t m0 = 0; m0 < M; m0 += CHUNK_M) {
    const int64_t mc = std::min<int64_t>(CHUNK_M, M - m0), step = u8_step(mc, K);
    for (int64_t m = m0; m < m0 + mc; ++m)
      for (int64_t k0 = 0, p = 0; k0 < K; k0 += step, ++p)
        sums[m * passes + p] = bytes_and_sum(xq + m * K + k0, std::min(step, K - k0), xb + m * K + k0);
  }
}

void run_u8(const int8_t* xb, const int64_t* sums, int64_t passes, int64_t M, int64_t K, const int8_t* w, int64_t* y,
            int64_t N, int64_t n0, int64_t n1) {
  for (int64_t m0 = 0; m0 < M; m0 += CHUNK_M) {
    const int64_t mc = std::min<int64_t>(CHUNK_M, M - m0), step = u8_step(mc, K);
    for (int64_t k0 = 0, p = 0; k0 < K; k0 += step, ++p)
      chunk_u8(mc, xb + m0 * K + k0, std::min(step, K - k0), K, w + k0, sums + m0 * passes + p, passes, y + m0 * N,
               N, n0, n1, k0 > 0);
  }
}
#endif

// x's rows as integers, xq = round(x / xs) with xs = max|x_row| / top (1 for a zero row), top 32767
// (int16) or 127 (int8 activations), kept as int16. False
// if some value is a NaN or an infinity (the caller then takes the float32 path). Vectorised by
// hand: the scalar loop (a max chain, a finiteness test, rounding) cost 1.5 ns per value, about
// as much as the product itself at 8 rows of K = 1024.
// x float32 or bfloat16 (widened in registers). With AVX-512 16 values at a time, the tail by masks
// (the same operations, so the same integers). Both (with `group_bf16` no longer widening x into a
// copy first) on a product of 16 outputs, where the call's serial part is most of it (Zen 5, the
// C call from ctypes, best of 9): 8 rows of bfloat16 x, K = 2816 6.9-7.0 -> 6.5-6.6 us, K = 1024
// 3.9-4.0 -> 3.7-3.8; one row 0.1-0.2 us less; the large products the same.
template <typename XT>
bool quantize_rows(const XT* x, int64_t M, int64_t K, float top, int16_t* xq, float* xs) {
  using parscale::load8;
  using parscale::to_float;
#ifdef PARSCALE_AVX512
  const __m512 sign16 = _mm512_set1_ps(-0.0f), largest16 = _mm512_set1_ps(FLT_MAX);
  for (int64_t m = 0; m < M; ++m) {
    const XT* row = x + m * K;
    __m512 peak16 = _mm512_setzero_ps();
    __mmask16 ok = 0xFFFF;  // lanes past the row's end load as zeros, which pass
    for (int64_t k = 0; k < K; k += 16) {
      const __m512 a = _mm512_andnot_ps(sign16, parscale::load16(row + k, parscale::first16(K - k)));
      peak16 = _mm512_max_ps(peak16, a);
      ok &= _mm512_cmp_ps_mask(a, largest16, _CMP_LE_OQ);  // false for a NaN or an infinity
    }
    if (ok != 0xFFFF) return false;
    const float peak = _mm512_reduce_max_ps(peak16);
    xs[m] = peak > 0.0f ? peak / top : 1.0f;
    const float inv = peak > 0.0f ? top / peak : 0.0f;
    const __m512 inv16 = _mm512_set1_ps(inv), hi = _mm512_set1_ps(top), lo = _mm512_set1_ps(-top);
    int16_t* out = xq + m * K;
    for (int64_t k = 0; k < K; k += 16) {  // rounded to nearest even (the default mode), as nearbyint
      const __mmask16 mask = parscale::first16(K - k);
      const __m512i r = _mm512_cvtps_epi32(
          _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(parscale::load16(row + k, mask), inv16), lo), hi));
      _mm256_mask_storeu_epi16(out + k, mask, _mm512_cvtepi32_epi16(r));  // |r| <= top: no saturation needed
    }
  }
  return true;
#else
  const __m256 sign = _mm256_set1_ps(-0.0f), largest = _mm256_set1_ps(FLT_MAX);
  for (int64_t m = 0; m < M; ++m) {
    const XT* row = x + m * K;
    __m256 peak8 = _mm256_setzero_ps(), ok8 = _mm256_cmp_ps(peak8, peak8, _CMP_EQ_OQ);  // all true
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      const __m256 a = _mm256_andnot_ps(sign, load8(row + k));
      peak8 = _mm256_max_ps(peak8, a);
      ok8 = _mm256_and_ps(ok8, _mm256_cmp_ps(a, largest, _CMP_LE_OQ));  // false for a NaN or an infinity
    }
    __m128 p4 = _mm_max_ps(_mm256_castps256_ps128(peak8), _mm256_extractf128_ps(peak8, 1));
    p4 = _mm_max_ps(p4, _mm_movehl_ps(p4, p4));
    float peak = std::max(_mm_cvtss_f32(p4), _mm_cvtss_f32(_mm_movehdup_ps(p4)));
    bool finite = _mm256_movemask_ps(ok8) == 0xFF;
    for (; k < K; ++k) {
      finite &= std::isfinite(to_float(row[k]));
      peak = std::max(peak, std::fabs(to_float(row[k])));
    }
    if (!finite) return false;
    xs[m] = peak > 0.0f ? peak / top : 1.0f;
    const float inv = peak > 0.0f ? top / peak : 0.0f;
    const __m256 inv8 = _mm256_set1_ps(inv), hi = _mm256_set1_ps(top), lo = _mm256_set1_ps(-top);
    int16_t* out = xq + m * K;
    for (k = 0; k + 16 <= K; k += 16) {  // rounded to nearest even (the default mode), as nearbyint
      const __m256i a = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(load8(row + k), inv8), lo), hi));
      const __m256i b = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(load8(row + k + 8), inv8), lo), hi));
      // packs works within 128-bit lanes (a0-3 b0-3 a4-7 b4-7); the permute puts them in order
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k), _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8));
    }
    for (; k < K; ++k) out[k] = static_cast<int16_t>(std::clamp(std::nearbyint(to_float(row[k]) * inv), -top, top));
  }
  return true;
#endif
}

// y = x Q^T unscaled by either scale; the caller applies xs[m] * s[n].
void run_i16(const int16_t* xq, int64_t M, int64_t K, const int8_t* w, int64_t* y, int64_t N, int64_t n0,
             int64_t n1) {
  for (int64_t m0 = 0; m0 < M; m0 += CHUNK_M) {
    const int64_t mc = std::min<int64_t>(CHUNK_M, M - m0);
    const int64_t step = std::min(INT16_MAX_LEN, parscale::k_step(mc, sizeof(int16_t), K));  // x in L1, no overflow
    for (int64_t k0 = 0; k0 < K; k0 += step)
      chunk_i16(mc, xq + m0 * K + k0, std::min(step, K - k0), K, w + k0, y + m0 * N, N, n0, n1, k0 > 0);
  }
}

#ifdef PARSCALE_VNNI
// ---------------------------------------------------------------- weights in tiles (AVX-512 VNNI)
// `quantize_int8` stores the weights of a CPU with AVX-512 VNNI in tiles of 16 output rows
// (`quantize.tile_weight`): [ceil(N / 16)][ceil(K / 4)][16][4], each 64-byte line the next four
// columns of the tile's 16 rows, zeros past N and K. One vpdpbusd then multiplies a line with
// four bytes of a row of x broadcast to every lane (its {1to16} memory operand) and adds into
// 16 int32 lanes that are the 16 outputs themselves: no sums across lanes at the end, and a
// row of x costs one instruction per line and no load of 64 bytes of x (the rows layout's
// `row_u8` loads 64 bytes of x per row and line, and sums its lanes per weight row). The int16
// path widens half a line (8 rows x 4 columns) at a time and multiplies it with four int16 of x
// broadcast as one 64-bit value by vpdpwssd: lanes 2i and 2i + 1 then hold output i's two halves.
// Each thread reads a tile as one straight stream. Measured on Zen 5 (benchmarks/int8_product.py,
// 48 matrices from memory, 2 threads, bfloat16 x, ms): 8 rows of the int16 path 4.3 -> 3.5 (2816 x
// 1024) and 5.7 -> 3.7 (1024 x 2816) against rows, of int8 activations 3.3 -> 2.9 and 4.4 -> 3.1;
// 8 rows now take 1.2-1.4x one row's time (1.4-2.4x in rows). In the decode benchmark's model int8
// P = 8 took 16.8% less, P = 1 the same (benchmarks/README.md).
//
// The products are written in inline assembly: with the intrinsics GCC 12 copied each
// accumulator to another register after every multiply-add (the intrinsic's result is a new
// value) and kept some of 16 in memory at 8 rows of x.
inline __m512i dot_u8(__m512i acc, __m512i w, const int8_t* x) {  // acc + (w as unsigned) . x[0..3] in every lane
  __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*reinterpret_cast<const int32_t*>(x)));
  return acc;
}
inline __m512i dot_w16(__m512i acc, __m512i w, __m512i x) {  // acc + the sums of pairs of int16 products, exact
  __asm__("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(w), "v"(x));
  return acc;
}

// Lines per int32 pass: a lane adds 4 products of at most 255 * 127 per line with int8 activations
// (16384 lines: 2.1e9 < 2^31), 2 of at most 32767 * 127 on the int16 path (256 lines: 2.13e9).
constexpr int64_t U8_PASS = 16384, I16_PASS = 256;

inline void add_lanes(int64_t* out, __m512i lanes, bool add) {  // out[0..16) (+)= the 16 int32 lanes, in int64
  __m512i lo = _mm512_cvtepi32_epi64(_mm512_castsi512_si256(lanes));
  __m512i hi = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(lanes, 1));
  if (add) {
    lo = _mm512_add_epi64(lo, _mm512_loadu_si512(out));
    hi = _mm512_add_epi64(hi, _mm512_loadu_si512(out + 8));
  }
  _mm512_storeu_si512(out, lo);
  _mm512_storeu_si512(out + 8, hi);
}

// out[m * ldo + j] = dot(x[m], row j of the tile) + 128 * sum(x[m]) for j < 16 (the caller takes
// the 128 * sum off): x [MC][4 * lines] bytes, zeros past K; t the tile's lines. One row of x
// takes four accumulators in turn: with one, each line waited for the last one's multiply-add
// (a 2816 x 1024 matrix in L2: 22 against 16 us of the rows layout's kernel).
template <int MC>
inline void tile_u8(const int8_t* x, int64_t ldx, int64_t lines, const int8_t* t, int64_t* out, int64_t ldo) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));  // w ^ 0x80 = w + 128, unsigned
  constexpr int S = MC == 1 ? 4 : 1;  // accumulators per row of x, taking turns
  for (int64_t l0 = 0; l0 < lines; l0 += U8_PASS) {
    const int64_t l1 = std::min(lines, l0 + U8_PASS);
    __m512i acc[S][MC];
    PARSCALE_UNROLL for (int s = 0; s < S; ++s)
      PARSCALE_UNROLL for (int m = 0; m < MC; ++m) acc[s][m] = _mm512_setzero_si512();
    auto line = [&](int s, int64_t l) {
      _mm_prefetch(reinterpret_cast<const char*>(t + l * 64) + AHEAD, _MM_HINT_T0);
      const __m512i w = _mm512_xor_si512(_mm512_loadu_si512(t + l * 64), flip);
      PARSCALE_UNROLL for (int m = 0; m < MC; ++m) acc[s][m] = dot_u8(acc[s][m], w, x + m * ldx + 4 * l);
    };
    int64_t l = l0;
    for (; l + S <= l1; l += S) PARSCALE_UNROLL for (int s = 0; s < S; ++s) line(s, l + s);
    for (; l < l1; ++l) line(0, l);
    PARSCALE_UNROLL for (int m = 0; m < MC; ++m) {
      __m512i sum = acc[0][m];  // the S sets hold the pass's lines between them: no int32 overflow
      PARSCALE_UNROLL for (int s = 1; s < S; ++s) sum = _mm512_add_epi32(sum, acc[s][m]);
      add_lanes(out + m * ldo, sum, l0 > 0);
    }
  }
}

// The same on the int16 path: out[m * ldo + j] = dot(x[m], row j of the tile), x [MC][4 * lines]
// int16, zeros past K.
template <int MC>
inline void tile_i16(const int16_t* x, int64_t ldx, int64_t lines, const int8_t* t, int64_t* out, int64_t ldo) {
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  constexpr int S = MC == 1 ? 2 : 1;  // sets of accumulators per row of x, taking turns (as tile_u8)
  for (int64_t l0 = 0; l0 < lines; l0 += I16_PASS) {
    const int64_t l1 = std::min(lines, l0 + I16_PASS);
    __m512i lo[S][MC], hi[S][MC];  // rows 0-7 and 8-15 of the tile, two lanes each
    PARSCALE_UNROLL for (int s = 0; s < S; ++s)
      PARSCALE_UNROLL for (int m = 0; m < MC; ++m) lo[s][m] = hi[s][m] = _mm512_setzero_si512();
    auto line = [&](int s, int64_t l) {
      _mm_prefetch(reinterpret_cast<const char*>(t + l * 64) + AHEAD, _MM_HINT_T0);
      const __m512i wl = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + l * 64)));
      const __m512i wh = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + l * 64 + 32)));
      PARSCALE_UNROLL for (int m = 0; m < MC; ++m) {
        int64_t four;  // x[m][4l .. 4l + 3], broadcast to every 64-bit lane
        std::memcpy(&four, x + m * ldx + 4 * l, sizeof four);
        const __m512i xv = _mm512_set1_epi64(four);
        lo[s][m] = dot_w16(lo[s][m], wl, xv);
        hi[s][m] = dot_w16(hi[s][m], wh, xv);
      }
    };
    int64_t l = l0;
    for (; l + S <= l1; l += S) PARSCALE_UNROLL for (int s = 0; s < S; ++s) line(s, l + s);
    for (; l < l1; ++l) line(0, l);
    PARSCALE_UNROLL for (int m = 0; m < MC; ++m)
      PARSCALE_UNROLL for (int s = 0; s < S; ++s) {
        // output i = lane 2i + lane 2i + 1, each up to 2.13e9: added in int64
        add_lanes(out + m * ldo, _mm512_permutex2var_epi32(lo[s][m], even, hi[s][m]), l0 > 0 || s > 0);
        add_lanes(out + m * ldo, _mm512_permutex2var_epi32(lo[s][m], odd, hi[s][m]), true);
      }
  }
}

// acc[m * ldo + j] = dot(x[m], w[n0 + j]) exactly for the rows of x and the outputs n0 .. n1 of
// tiled weights w (n0 a multiple of 16); x [M][ldx] as bytes (`bits` 8: less 128 * sums[m]) or int16.
void run_tiles(const void* x, int bits, const int64_t* sums, int64_t M, int64_t ldx, const int8_t* w, int64_t n0,
               int64_t n1, int64_t* acc, int64_t ldo) {
  const int64_t lines = ldx / 4;
  for (int64_t t0 = n0; t0 < n1; t0 += TILE_ROWS) {
    const int8_t* tile = w + (t0 / TILE_ROWS) * lines * TILE_LINE;
    for (int64_t m0 = 0; m0 < M; m0 += CHUNK_M) {
      const int64_t mc = std::min<int64_t>(CHUNK_M, M - m0);
      int64_t* out = acc + m0 * ldo + (t0 - n0);
      with_rows(mc, [&](auto m) {
        constexpr int MC = decltype(m)::value;
        if (bits == 8) tile_u8<MC>(static_cast<const int8_t*>(x) + m0 * ldx, ldx, lines, tile, out, ldo);
        else tile_i16<MC>(static_cast<const int16_t*>(x) + m0 * ldx, ldx, lines, tile, out, ldo);
      });
      if (bits == 8)
        for (int64_t r = 0; r < mc; ++r)
          for (int64_t j = 0; j < TILE_ROWS; ++j) out[r * ldo + j] -= 128 * sums[m0 + r];
    }
  }
}
#endif
#endif


// Rows rounded to int8 and kept as float32 (xq = round(x / xs), xs = max|x_row| / 127, as
// `quantize_rows` computes them), for the float32 products below: the plain C++ path's int8
// activations, and the rows of a call that the integer paths cannot take. A row with a NaN or
// an infinity is left as it is (xs 1), so that it propagates and the other rows are rounded.
void quantize_rows_float(const float* x, int64_t M, int64_t K, float* xq, float* xs) {
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x + m * K;
    float peak = 0.0f;
    bool finite = true;
    for (int64_t k = 0; k < K; ++k) {
      finite &= std::isfinite(row[k]);
      peak = std::max(peak, std::fabs(row[k]));
    }
    xs[m] = finite && peak > 0.0f ? peak / 127.0f : 1.0f;
    const float inv = peak > 0.0f ? 127.0f / peak : 0.0f;
    for (int64_t k = 0; k < K; ++k)
      xq[m * K + k] = finite ? std::clamp(std::nearbyint(row[k] * inv), -127.0f, 127.0f) : row[k];
  }
}

// The weight rows n0 .. n1 of tiled weights w (`quantize.tile_weight`) as rows [n1 - n0][K], into
// rows: for the paths that read rows (a row of x with a NaN or an infinity, CPUs without VNNI).
void untile(const int8_t* w, int64_t K, int64_t n0, int64_t n1, int8_t* rows) {
  const int64_t lines = (K + 3) / 4;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* tile = w + (n / TILE_ROWS) * lines * TILE_LINE + (n % TILE_ROWS) * 4;
    for (int64_t k = 0; k < K; ++k) rows[(n - n0) * K + k] = tile[(k / 4) * TILE_LINE + k % 4];
  }
}

// G products of the same x (a layer's q, k and v, or its gate and up): y_g = x Q_g^T * s_g (+ b_g)
// into float32 y, y_g [M, N[g]] one after another, and also rounded into bfloat16 y16 (the same
// offsets) when it is not null (block by block in the parallel loop, while the block's outputs
// are in cache). x is rounded once for all of them, and their blocks of weight rows go through
// one parallel loop; each y_g is what a call of its own gives, bit for bit. `bits` 16: x rounded
// to int16 per row where the integer path runs; 8: to int8 per row on every path. The biases
// are float32, or bfloat16 where `bias_bf16` is 1 (widened here, exactly, as bias.float() would:
// a bfloat16 model's q/k/v biases would otherwise be converted by torch at every call). `tiled`:
// the weights are in tiles of 16 rows (the section above), else rows [N, K]. The integer paths
// sum each output exactly in int64 over all of K, whatever their passes, and round it to float32
// once: every integer path and layout gives the same bits.
// x: float32, or bfloat16 (uint16_t), which the integer paths round from as it is (widened in
// registers; the same integers) and the float32 path widens first.
template <typename XT>
void int8_product(const XT* x_in, int64_t M, int64_t K, int64_t G, const int8_t* const* w, const float* const* scale,
                  const void* const* bias, int bias_bf16, float* y, uint16_t* y16, const int64_t* N, int threads,
                  int bits, bool tiled) {
  const parscale::Group group(M, G, N, BLOCK_N);
  const int64_t* offsets = group.offset;
  auto finish = [&](int64_t g, int64_t m, int64_t n0, int64_t n1, float row_scale) {  // scales and bias, in cache
    const int64_t n = N[g];
    float* yg = y + offsets[g];
    const void* b = bias[g];
    for (int64_t j = n0; j < n1; ++j) {
      const float add = !b ? 0.0f
                        : bias_bf16 ? parscale::to_float(static_cast<const uint16_t*>(b)[j]) : static_cast<const float*>(b)[j];
      const float v = yg[m * n + j] * (row_scale * scale[g][j]) + add;
      yg[m * n + j] = v;
      if (y16) parscale::store(y16 + offsets[g] + m * n + j, v);
    }
  };
  // `finish` from the exact sums acc[0 .. n1 - n0) of row m, 16 outputs at a time on AVX-512 (the
  // same operations: float32 of the sum, times the two scales' product, plus the bias in one
  // fused multiply-add, as GCC contracts `finish`). Each output costs a few scalar operations
  // otherwise: on a 2816 x 1024 matrix with 8 rows of x in L2, about 9 us of a 60 us call.
  auto finish_sums = [&](int64_t g, int64_t m, int64_t n0, int64_t n1, float row_scale, const int64_t* acc) {
    int64_t j = n0;
#if defined(PARSCALE_AVX512) && defined(__AVX512DQ__)
    const int64_t n = N[g];
    float* yg = y + offsets[g] + m * n;
    const void* b = bias[g];
    const __m512 rs = _mm512_set1_ps(row_scale);
    for (; j < n1; j += 16) {
      const __mmask16 mask = parscale::first16(n1 - j);
      const int64_t* a = acc + (j - n0);
      const __m256 lo = _mm512_cvtepi64_ps(_mm512_maskz_loadu_epi64(static_cast<__mmask8>(mask), a));
      const __m256 hi = _mm512_cvtepi64_ps(_mm512_maskz_loadu_epi64(static_cast<__mmask8>(mask >> 8), a + 8));
      const __m512 sum = _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1);
      const __m512 add = !b ? _mm512_setzero_ps()
                         : bias_bf16 ? parscale::load16(static_cast<const uint16_t*>(b) + j, mask)
                                     : parscale::load16(static_cast<const float*>(b) + j, mask);
      const __m512 v = _mm512_fmadd_ps(sum, _mm512_mul_ps(rs, _mm512_maskz_loadu_ps(mask, scale[g] + j)), add);
      _mm512_mask_storeu_ps(yg + j, mask, v);
      if (y16) parscale::store16(y16 + offsets[g] + m * n + j, parscale::round_bf16(v), mask);
    }
#endif
    for (int64_t i = j; i < n1; ++i) y[offsets[g] + m * N[g] + i] = static_cast<float>(acc[i - n0]);
    finish(g, m, j, n1, row_scale);
  };
  std::vector<float> xs(static_cast<size_t>(M), 1.0f);
  // The block's weight rows as rows [n1 - n0][K]: in place, or untiled into a buffer of the thread.
  auto rows_of = [&](int64_t g, int64_t n0, int64_t n1) -> const int8_t* {
    if (!tiled) return w[g] + n0 * K;
    thread_local std::vector<int8_t> buffer;
    buffer.resize(static_cast<size_t>(BLOCK_N * K));
    untile(w[g], K, n0, n1, buffer.data());
    return buffer.data();
  };
  // The parallel loop over the blocks of weight rows of all G: `block(g, n0, n1)` computes
  // outputs n0 .. n1 of product g for every row of x, the scales and bias put on while in cache. Guided, as in skinny_linear.cpp (which says why): on the 113
  // int8 matrices of the decode benchmark's model (Zen 5, 2 threads, best of 7) 1 row 3.78
  // against 4.22 ms, 8 rows 6.78 against 7.45, than with runs of 4 blocks.
  const int64_t blocks = group.blocks();
  auto over_blocks = [&](auto block) {
#pragma omp parallel for schedule(guided) num_threads(threads)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t g = group.product(b);
      const int64_t n0 = (b - group.start[g]) * BLOCK_N, n1 = std::min(N[g], n0 + BLOCK_N);
      block(g, n0, n1);
    }
  };
#ifdef PARSCALE_INT16
  // The integer paths: `sums(g, n0, n1, acc)` puts the exact sums of the block into acc
  // [M][BLOCK_N] (int64), rounded to float32 into y by `finish_sums`.
  auto over_integer_blocks = [&](auto sums) {
    over_blocks([&](int64_t g, int64_t n0, int64_t n1) {
      thread_local std::vector<int64_t> acc;
      acc.resize(static_cast<size_t>(M * BLOCK_N));
      sums(g, n0, n1, acc.data());
      for (int64_t m = 0; m < M; ++m) finish_sums(g, m, n0, n1, xs[m], acc.data() + m * BLOCK_N);
    });
  };
  parscale::Buffer<int16_t> xq(M * K);
  if (quantize_rows(x_in, M, K, bits == 8 ? 127.0f : 32767.0f, xq.data(), xs.data())) {
#ifdef PARSCALE_VNNI
    if (tiled) {  // x with its rows padded to whole lines (zeros), as bytes or int16 (xq itself where K is)
      const int64_t ldx = (K + 3) / 4 * 4;
      const bool padded = bits == 16 && ldx != K;
      parscale::Buffer<int16_t> x16(padded ? M * ldx : 0);
      parscale::Buffer<int8_t> x8(bits == 8 ? M * ldx : 0);
      std::vector<int64_t> row_sums(static_cast<size_t>(bits == 8 ? M : 0));
      for (int64_t m = 0; m < M; ++m) {
        if (bits == 8) {
          row_sums[m] = bytes_and_sum(xq.data() + m * K, K, x8.data() + m * ldx);
          std::fill(x8.data() + m * ldx + K, x8.data() + (m + 1) * ldx, int8_t(0));
        } else if (padded) {
          std::copy(xq.data() + m * K, xq.data() + (m + 1) * K, x16.data() + m * ldx);
          std::fill(x16.data() + m * ldx + K, x16.data() + (m + 1) * ldx, int16_t(0));
        }
      }
      const void* xt = bits == 8 ? static_cast<const void*>(x8.data())
                       : padded  ? static_cast<const void*>(x16.data())
                                 : static_cast<const void*>(xq.data());
      over_integer_blocks([&](int64_t g, int64_t n0, int64_t n1, int64_t* acc) {
        run_tiles(xt, bits, row_sums.data(), M, ldx, w[g], n0, n1, acc, BLOCK_N);
      });
      return;
    }
    if (bits == 8) {
      const int64_t passes = u8_passes(M, K);
      parscale::Buffer<int8_t> xb(M * K);
      std::vector<int64_t> sums(static_cast<size_t>(M * passes));
      pass_sums(xq.data(), M, K, xb.data(), sums.data(), passes);
      over_integer_blocks([&](int64_t g, int64_t n0, int64_t n1, int64_t* acc) {
        run_u8(xb.data(), sums.data(), passes, M, K, w[g] + n0 * K, acc, BLOCK_N, 0, n1 - n0);
      });
      return;
    }
#endif
    over_integer_blocks([&](int64_t g, int64_t n0, int64_t n1, int64_t* acc) {
      run_i16(xq.data(), M, K, rows_of(g, n0, n1), acc, BLOCK_N, 0, n1 - n0);
    });
    return;
  }
  xs.assign(static_cast<size_t>(M), 1.0f);  // a NaN or an infinity: x as it is (it propagates)
#endif
  parscale::Buffer<float> x32(std::is_same_v<XT, float> ? 0 : M * K);  // bfloat16 x widened for the float32 path
  const float* x;
  if constexpr (std::is_same_v<XT, float>) {
    x = x_in;
  } else {
    for (int64_t i = 0; i < M * K; ++i) x32.data()[i] = parscale::to_float(x_in[i]);
    x = x32.data();
  }
  parscale::Buffer<float> x8(bits == 8 ? M * K : 0);  // int8 activations on the float32 path
  if (bits == 8) {
    quantize_rows_float(x, M, K, x8.data(), xs.data());
    x = x8.data();
  }
  over_blocks([&](int64_t g, int64_t n0, int64_t n1) {
    const int8_t* rows = rows_of(g, n0, n1);
    for (int64_t m0 = 0; m0 < M; m0 += CHUNK_M)
      chunk(std::min<int64_t>(CHUNK_M, M - m0), x + m0 * K, K, rows, y + offsets[g] + m0 * N[g] + n0, N[g], 0, n1 - n0);
    for (int64_t m = 0; m < M; ++m) finish(g, m, n0, n1, xs[m]);
  });
}

}  // namespace

// x: [M, K] float32; w: [N, K] int8, or in tiles where `tiled` is 1 (`quantize.tile_weight`);
// scale: [N] float32; bias: [N] float32 (bias_bf16 0) or bfloat16 (1), or null; y: [M, N]
// float32. All row-major and contiguous (checked by the Python caller). bits: 16 or 8, the
// activations' rounding (`int8_product`).
extern "C" void parscale_int8_f32(const float* x, int64_t M, int64_t K, const int8_t* w, const float* scale,
                                  const void* bias, float* y, int64_t N, int threads, int bits, int bias_bf16,
                                  int tiled) {
  int8_product(x, M, K, 1, &w, &scale, &bias, bias_bf16, y, nullptr, &N, threads, bits, tiled);
}

// G products of one float32 x (`int8_product`): w, scale and bias as above, one pointer each per
// product, y_g [M, N[g]] one after another in y; each as parscale_int8_f32 gives it.
extern "C" void parscale_int8_group_f32(const float* x, int64_t M, int64_t K, int64_t G, const int8_t* const* w,
                                        const float* const* scale, const void* const* bias, float* y,
                                        const int64_t* N, int threads, int bits, int bias_bf16) {
  int8_product(x, M, K, G, w, scale, bias, bias_bf16, y, nullptr, N, threads, bits, false);
}

// The same with the weights in tiles (the signature of the entry above, so that the decode step's
// chain calls either by pointer alike).
extern "C" void parscale_int8_group_tiled_f32(const float* x, int64_t M, int64_t K, int64_t G, const int8_t* const* w,
                                              const float* const* scale, const void* const* bias, float* y,
                                              const int64_t* N, int threads, int bits, int bias_bf16) {
  int8_product(x, M, K, G, w, scale, bias, bias_bf16, y, nullptr, N, threads, bits, true);
}

namespace {
// bfloat16 x and y (scales float32, biases as above): rounded to integers from bfloat16 as it
// is (x is widened first only for the float32 path), y rounded here, rather than by two torch
// calls around the kernel, as in skinny_linear.cpp's parscale_skinny_bf16_io (`quantize_rows`
// says what rounding x as it is saves).
void group_bf16(const uint16_t* x, int64_t M, int64_t K, int64_t G, const int8_t* const* w, const float* const* scale,
                const void* const* bias, uint16_t* y, const int64_t* N, int threads, int bits, int bias_bf16,
                bool tiled) {
  parscale::Buffer<float> y32(parscale::Group(M, G, N, BLOCK_N).values(M));
  int8_product(x, M, K, G, w, scale, bias, bias_bf16, y32.data(), y, N, threads, bits, tiled);
}
}  // namespace

extern "C" void parscale_int8_group_bf16(const uint16_t* x, int64_t M, int64_t K, int64_t G, const int8_t* const* w,
                                         const float* const* scale, const void* const* bias, uint16_t* y,
                                         const int64_t* N, int threads, int bits, int bias_bf16) {
  group_bf16(x, M, K, G, w, scale, bias, y, N, threads, bits, bias_bf16, false);
}

extern "C" void parscale_int8_group_tiled_bf16(const uint16_t* x, int64_t M, int64_t K, int64_t G,
                                               const int8_t* const* w, const float* const* scale,
                                               const void* const* bias, uint16_t* y, const int64_t* N, int threads,
                                               int bits, int bias_bf16) {
  group_bf16(x, M, K, G, w, scale, bias, y, N, threads, bits, bias_bf16, true);
}

extern "C" void parscale_int8_bf16(const uint16_t* x, int64_t M, int64_t K, const int8_t* w, const float* scale,
                                   const void* bias, uint16_t* y, int64_t N, int threads, int bits, int bias_bf16,
                                   int tiled) {
  group_bf16(x, M, K, 1, &w, &scale, &bias, y, &N, threads, bits, bias_bf16, tiled);
}

// 1 where the integer products read tiled weights directly (AVX-512 VNNI: `quantize_int8` then
// stores them so); elsewhere tiled weights are taken back to rows block by block (correct, slower).
extern "C" int parscale_int8_tiles() {
#if defined(PARSCALE_VNNI)
  return 1;
#else
  return 0;
#endif
}

// 5: AVX-512 VNNI integer products, 4: AVX-512 integer products without VNNI, 3: AVX2 integer
// products, 0: plain C++ (the float32 paths of AVX-512 and AVX2 run only for a row with a NaN
// or an infinity; 2 and 1 named them in earlier builds).
extern "C" int parscale_int8_isa() {
#if defined(PARSCALE_VNNI)
  return 5;
#elif defined(PARSCALE_AVX512)
  return 4;
#elif defined(PARSCALE_INT16)
  return 3;
#else
  return 0;
#endif
}
