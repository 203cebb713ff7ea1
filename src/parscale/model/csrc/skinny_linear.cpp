// Skinny matrix product y = x W^T (+ b) for a few rows of x, reading every weight row once.
//
// Decoding with P streams multiplies each weight matrix by P*B rows (a handful). The stock
// CPU GEMMs pack and block for large M, so with 2-16 rows their time grows with M although
// the step is bound by reading the weights. Here each weight row is streamed once from memory
// and dotted with every row of x while it sits in L1 (x itself is small and stays cached).
// The row count is a compile-time constant (1..8) so that the accumulators live in registers;
// more rows are done in chunks of 8 over the same, now cached, weight rows.
// bfloat16 weights are widened to float32 in registers (a 16-bit shift), so half the bytes
// are read; accumulation is float32 throughout, rounding once at the end.
//
// No torch header is included (the extension headers take minutes to compile on a small
// machine, this file a second): Python calls the C functions at the end through ctypes and
// passes torch's thread count; OpenMP is the runtime torch itself uses.
#include <algorithm>
#include <cstdint>
#include <cstring>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define PARSCALE_AVX2 1
#endif

namespace {

#ifdef PARSCALE_AVX2
inline __m256 load8(const float* w) { return _mm256_loadu_ps(w); }
inline __m256 load8(const uint16_t* w) {  // bfloat16 bits -> float32: shift into the high half
  __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

inline float to_float(float v) { return v; }
inline float to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// out[m * ldy + r] = dot(x[m], w[r]) for m < MC rows of x and r < R weight rows.
template <int MC, int R, typename WT>
inline void block(const float* x, int64_t K, const WT* w, float* out, int64_t ldy) {
  int64_t k = 0;
  float acc_s[R][MC] = {};
#ifdef PARSCALE_AVX2
  __m256 acc[R][MC];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MC; ++m) acc[r][m] = _mm256_setzero_ps();
  for (; k + 8 <= K; k += 8) {
    __m256 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = load8(w + r * K + k);
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
      float wk = to_float(w[r * K + k]);
      for (int m = 0; m < MC; ++m) acc_s[r][m] += wk * x[m * K + k];
    }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MC; ++m) out[m * ldy + r] = acc_s[r][m];
}

// Weight rows per step: enough independent accumulators, at most 8 of them in registers.
template <int MC> constexpr int rows_per_step() { return MC <= 2 ? 4 : (MC <= 4 ? 2 : 1); }

template <int MC, typename WT>
void rows_range(const float* x, int64_t K, const WT* w, float* y, int64_t N, int64_t n0, int64_t n1) {
  constexpr int R = rows_per_step<MC>();
  int64_t n = n0;
  for (; n + R <= n1; n += R) block<MC, R>(x, K, w + n * K, y + n, N);
  for (; n < n1; ++n) block<MC, 1>(x, K, w + n * K, y + n, N);
}

template <typename WT>
void chunk(int64_t mc, const float* x, int64_t K, const WT* w, float* y, int64_t N, int64_t n0, int64_t n1) {
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

template <typename WT>
void run(const float* x, int64_t M, int64_t K, const WT* w, float* y, int64_t N, int threads) {
  // Blocks of 16 weight rows handed out dynamically: on a shared machine a thread that loses
  // its core does fewer blocks instead of making the others wait at the end of a static split.
  const int64_t blocks = (N + 15) / 16;
#pragma omp parallel for schedule(dynamic, 4) num_threads(threads)
  for (int64_t b = 0; b < blocks; ++b) {
    int64_t n0 = b * 16, n1 = std::min(N, n0 + 16);
    for (int64_t m0 = 0; m0 < M; m0 += 8)  // rows beyond 8 reuse the weight block from cache
      chunk<WT>(std::min<int64_t>(8, M - m0), x + m0 * K, K, w, y + m0 * N, N, n0, n1);
  }
}

}  // namespace

// x: [M, K] float32; w: [N, K] float32 or bfloat16 bits; bias: [N] of the weight type or null;
// y: [M, N] float32. All row-major and contiguous (checked by the Python caller).
extern "C" void parscale_skinny_f32(const float* x, int64_t M, int64_t K, const float* w, const float* bias,
                                    float* y, int64_t N, int threads) {
  run<float>(x, M, K, w, y, N, threads);
  if (bias)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) y[m * N + n] += bias[n];
}

extern "C" void parscale_skinny_bf16(const float* x, int64_t M, int64_t K, const uint16_t* w, const uint16_t* bias,
                                     float* y, int64_t N, int threads) {
  run<uint16_t>(x, M, K, w, y, N, threads);
  if (bias)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) y[m * N + n] += to_float(bias[n]);
}

extern "C" int parscale_skinny_has_avx2() {
#ifdef PARSCALE_AVX2
  return 1;
#else
  return 0;
#endif
}
