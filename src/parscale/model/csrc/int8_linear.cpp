// Skinny product with weight-only int8: y = (x Q^T) * s (+ b) for a few rows of x.
//
// Q: [N, K] int8 (symmetric, per output row), s: [N] float32 scales, x: [M, K] float32. The
// same scheme as skinny_linear.cpp (each weight row streamed once and dotted with every row of
// x while it sits in L1), reading a quarter of the float32 bytes: int8 is widened to float32 in
// registers (sign-extend, convert) and the scale is applied once per output at the end, so the
// sums are float32 products of exact integers with x. Three instruction paths chosen by the
// compiler flags: AVX-512 (16 lanes, masked tails), AVX2/FMA (8 lanes) and plain C++.
//
// Why not torch's own CPU kernel, torch._weight_int8pack_mm (torch 2.13): on the 48 matrices of
// 2816 x 1024 (benchmarks/int8_product.py, one thread, best of 5) it took 35/43/44/81 ms for
// M = 1/2/4/8 rows with bfloat16 activations and 308-2419 ms with float32 ones; this kernel
// 29/32/35/60 ms (and the bfloat16 kernel path 60/52/52/67 ms).
//
// No torch header (see skinny_linear.cpp): Python calls the C functions at the end by ctypes.
#include <algorithm>
#include <cstdint>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define PARSCALE_AVX2 1
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define PARSCALE_AVX512 1
#endif
#ifdef PARSCALE_AVX2
// One 64-byte line of int8 weights per 64 elements: ask for the same offset in the next R rows,
// one pass ahead, so that the loads of a block overlap (as in skinny_linear.cpp).
#define PARSCALE_PREFETCH(w, r, R, K, k) \
  _mm_prefetch(reinterpret_cast<const char*>((w) + ((r) + (R)) * (K) + (k)), _MM_HINT_T0)
#endif

namespace {

constexpr int64_t CHUNK_M = 8;  // rows of x per pass over a block of weight rows

#ifdef PARSCALE_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// out[m * ldy + r] = dot(x[m], q[r]) for m < MC rows of x and r < R weight rows (unscaled).
template <int MC, int R>
inline void block(const float* x, int64_t K, const int8_t* w, float* out, int64_t ldy) {
  int64_t k = 0;
  float acc_s[R][MC] = {};
#if defined(PARSCALE_AVX512)
  __m512 acc[R][MC];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MC; ++m) acc[r][m] = _mm512_setzero_ps();
  for (; k < K; k += 16) {
    const __mmask16 mask = K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1);
    __m512 wv[R];
    for (int r = 0; r < R; ++r) {
      if (k % 64 == 0) PARSCALE_PREFETCH(w, r, R, K, k);
      __m128i bytes = _mm_maskz_loadu_epi8(mask, w + r * K + k);  // masked lanes read as 0
      wv[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
    }
    for (int m = 0; m < MC; ++m) {
      __m512 xv = _mm512_maskz_loadu_ps(mask, x + m * K + k);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MC; ++m) acc_s[r][m] = _mm512_reduce_add_ps(acc[r][m]);
#elif defined(PARSCALE_AVX2)
  __m256 acc[R][MC];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MC; ++m) acc[r][m] = _mm256_setzero_ps();
  for (; k + 8 <= K; k += 8) {
    __m256 wv[R];
    for (int r = 0; r < R; ++r) {
      if (k % 64 == 0) PARSCALE_PREFETCH(w, r, R, K, k);
      __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + r * K + k));  // 8 bytes
      wv[r] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
    }
    for (int m = 0; m < MC; ++m) {
      __m256 xv = _mm256_loadu_ps(x + m * K + k);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm256_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MC; ++m) acc_s[r][m] = hsum(acc[r][m]);
#endif
  for (; k < K; ++k)  // the tail, or everything without AVX2 (vectorised by the compiler)
    for (int r = 0; r < R; ++r) {
      float wk = static_cast<float>(w[r * K + k]);
      for (int m = 0; m < MC; ++m) acc_s[r][m] += wk * x[m * K + k];
    }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MC; ++m) out[m * ldy + r] = acc_s[r][m];
}

#ifdef PARSCALE_AVX512
template <int MC> constexpr int rows_per_step() { return MC <= 2 ? 8 : (MC <= 4 ? 4 : 2); }
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

void chunk(int64_t mc, const float* x, int64_t K, const int8_t* w, float* y, int64_t N, int64_t n0, int64_t n1) {
  switch (mc) {
    case 1: return rows_range<1>(x, K, w, y, N, n0, n1);
    case 2: return rows_range<2>(x, K, w, y, N, n0, n1);
    case 3: return rows_range<3>(x, K, w, y, N, n0, n1);
    case 4: return rows_range<4>(x, K, w, y, N, n0, n1);
    case 5: return rows_range<5>(x, K, w, y, N, n0, n1);
    case 6: return rows_range<6>(x, K, w, y, N, n0, n1);
    case 7: return rows_range<7>(x, K, w, y, N, n0, n1);
    default: return rows_range<8>(x, K, w, y, N, n0, n1);
  }
}

}  // namespace

// x: [M, K] float32; w: [N, K] int8; scale: [N] float32; bias: [N] float32 or null;
// y: [M, N] float32. All row-major and contiguous (checked by the Python caller).
extern "C" void parscale_int8_f32(const float* x, int64_t M, int64_t K, const int8_t* w, const float* scale,
                                  const float* bias, float* y, int64_t N, int threads) {
  // Blocks of 16 weight rows handed out dynamically (a thread that loses its core does fewer).
  const int64_t blocks = (N + 15) / 16;
#pragma omp parallel for schedule(dynamic, 4) num_threads(threads)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t n0 = b * 16, n1 = std::min(N, n0 + 16);
    for (int64_t m0 = 0; m0 < M; m0 += CHUNK_M) {
      chunk(std::min<int64_t>(CHUNK_M, M - m0), x + m0 * K, K, w, y + m0 * N, N, n0, n1);
      for (int64_t m = m0; m < std::min(M, m0 + CHUNK_M); ++m)  // the scale (and bias) while y is in cache
        for (int64_t n = n0; n < n1; ++n) y[m * N + n] = y[m * N + n] * scale[n] + (bias ? bias[n] : 0.0f);
    }
  }
}

extern "C" int parscale_int8_isa() {  // 2: AVX-512, 1: AVX2/FMA, 0: plain C++
#if defined(PARSCALE_AVX512)
  return 2;
#elif defined(PARSCALE_AVX2)
  return 1;
#else
  return 0;
#endif
}
