// One decode step's attention on CPU: every row's query heads over [its stream's prefix ; the cache].
//
// A decode step has one query per row, a few rows, and a short cache: a few hundred thousand
// multiply-adds. torch's fused CPU attention kernel spends far longer than that setting up
// (its per-call buffers, and bfloat16 conversions), twice per layer (prefix and cache), and
// the log-sum-exp merge adds more small ops. Here one call does it all: for each (row, KV head)
// the `groups` query heads that share the KV head score the T prefix keys of the row's stream
// and the L cache keys, one float32 softmax over both, and sum the values; each key and value
// row is read once for all its query heads. Float32 accumulation; bfloat16 keys and values are
// widened in registers (a 16-bit shift). The additive mask (float32, per row or one for all)
// hides padding. No torch header (see skinny_linear.cpp): Python calls it through ctypes.
//
// With AVX2 the loops are written for the registers: the softmax's exponential is a vectorised
// polynomial, and where the head size is a multiple of 8 (else the plain loops run) eight keys
// are scored at once, their eight vector sums reduced together, and the weighted sum keeps up
// to 4 query heads x 16 columns of output in registers over all keys.
// Measured at P = 8 (8 rows, 16 heads, 4 KV heads, 64 columns, 48 + 96 keys, 2 threads): 204 us
// per layer with the plain loops, which summed every dot product horizontally, kept the
// output accumulators in memory and called a scalar exp per score. With AVX-512 the scores and
// the weighted sum run 16 lanes wide (PARSCALE_ATTENTION_AVX512 below). A task's keys and
// values are loaded once by a loop of plain loads before it is computed (touch_task).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"

namespace {

using parscale::store;
using parscale::to_float;

// Scores of G queries (float32, [G][D]) against N keys ([N][stride] of T), into s[g * n_all + j].
template <typename T>
void scores(const float* q, int64_t G, int64_t D, const T* keys, int64_t N, int64_t stride, float* s, int64_t n_all) {
  std::vector<float> key(D);
  for (int64_t j = 0; j < N; ++j) {
    const T* k = keys + j * stride;
    for (int64_t i = 0; i < D; ++i) key[i] = to_float(k[i]);
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = q + g * D;
      float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < D; ++i) acc += qg[i] * key[i];
      s[g * n_all + j] = acc;
    }
  }
}

// out[g][:] += sum_j p[g * n_all + j] * values[j][:]
template <typename T>
void weighted(const float* p, int64_t G, int64_t D, const T* values, int64_t N, int64_t stride, float* out,
              int64_t n_all) {
  std::vector<float> value(D);
  for (int64_t j = 0; j < N; ++j) {
    const T* v = values + j * stride;
    for (int64_t i = 0; i < D; ++i) value[i] = to_float(v[i]);
    for (int64_t g = 0; g < G; ++g) {
      const float w = p[g * n_all + j];
      float* o = out + g * D;
#pragma omp simd
      for (int64_t i = 0; i < D; ++i) o[i] += w * value[i];
    }
  }
}

#ifdef PARSCALE_AVX2
using parscale::load8;

// The eight sums of eight vectors, as one vector (a[i]'s sum in lane i).
inline __m256 sum8(const __m256 a[8]) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  // lanes 0-3 | 4-7 halves
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// e^x in float32 lanes (Cephes' expf: x = n ln2 + r, e^r by its degree-5 polynomial, 2^n put
// into the exponent bits; within 2 ulp). Scores are at most 0 after the max is taken out; from
// about -87.6 down (-inf: a hidden key) the result is exactly 0; NaN stays NaN.
inline __m256 exp8(__m256 x) {
  const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  const __m256 c = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f)), _mm256_set1_ps(88.3762626647949f));
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(c, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), c);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_blendv_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(bits)), x, nan);
}

inline const float* as_float(const float* row, int64_t, float*) { return row; }
inline const float* as_float(const uint16_t* row, int64_t D, float* buffer) {  // widened once for all heads
  for (int64_t i = 0; i < D; i += 8) _mm256_storeu_ps(buffer + i, load8(row + i));
  return buffer;
}

// scores() for D % 8 == 0: eight keys at a time, each query head's eight dot products summed
// together (sum8) instead of one horizontal sum each. `buffer` holds 8 widened bfloat16 keys.
template <typename T>
void scores8(const float* q, int64_t G, int64_t D, const T* keys, int64_t N, int64_t stride, float* s, int64_t n_all,
             float* buffer) {
  for (int64_t j0 = 0; j0 < N; j0 += 8) {
    const int64_t nb = std::min<int64_t>(8, N - j0);
    const float* k[8];
    for (int64_t i = 0; i < 8; ++i)  // a short last block scores its last key again, unused
      k[i] = i < nb ? as_float(keys + (j0 + i) * stride, D, buffer + i * D) : k[nb - 1];
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = q + g * D;
      __m256 acc[8];
      PARSCALE_UNROLL for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; d += 8) {
        const __m256 x = _mm256_loadu_ps(qg + d);
        PARSCALE_UNROLL for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(x, _mm256_loadu_ps(k[i] + d), acc[i]);
      }
      const __m256 sums = sum8(acc);
      if (nb == 8) {
        _mm256_storeu_ps(s + g * n_all + j0, sums);
      } else {
        alignas(32) float part[8];
        _mm256_store_ps(part, sums);
        std::copy(part, part + nb, s + g * n_all + j0);
      }
    }
  }
}

// The float32 vectors of one width for the loops below written once for both: 8 lanes (AVX2)
// or 16 (AVX-512, Lanes16 further down).
struct Lanes8 {
  using V = __m256;
  static constexpr int n = 8;
  static V zero() { return _mm256_setzero_ps(); }
  template <typename T>
  static V widen(const T* v) { return load8(v); }  // float32 or bfloat16 values as float32
  static V splat(const float* x) { return _mm256_broadcast_ss(x); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static void add_to(float* o, V v) { _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), v)); }
};

// out[g][d0, d0 + n DV) += sum_j p[g * n_all + j] * values[j][d0, d0 + n DV) for GB heads, n the
// lanes of L: the GB x DV accumulators stay in registers over all N keys; each value vector is
// read (and widened) once for the GB heads.
template <typename L, int GB, int DV, typename T>
inline void weighted_block(const float* p, int64_t n_all, const T* values, int64_t N, int64_t stride, float* out,
                           int64_t D, int64_t d0) {
  typename L::V acc[GB][DV];
  PARSCALE_UNROLL for (int g = 0; g < GB; ++g)
    PARSCALE_UNROLL for (int u = 0; u < DV; ++u) acc[g][u] = L::zero();
  for (int64_t j = 0; j < N; ++j) {
    const T* v = values + j * stride + d0;
    typename L::V x[DV];
    PARSCALE_UNROLL for (int u = 0; u < DV; ++u) x[u] = L::widen(v + L::n * u);
    PARSCALE_UNROLL for (int g = 0; g < GB; ++g) {
      const typename L::V w = L::splat(p + g * n_all + j);
      PARSCALE_UNROLL for (int u = 0; u < DV; ++u) acc[g][u] = L::fma(w, x[u], acc[g][u]);
    }
  }
  PARSCALE_UNROLL for (int g = 0; g < GB; ++g)
    PARSCALE_UNROLL for (int u = 0; u < DV; ++u) L::add_to(out + g * D + d0 + L::n * u, acc[g][u]);
}

template <int GB, typename T>
void weighted_heads(const float* p, int64_t n_all, const T* values, int64_t N, int64_t stride, float* out, int64_t D) {
  int64_t d0 = 0;
  for (; d0 + 16 <= D; d0 += 16) weighted_block<Lanes8, GB, 2>(p, n_all, values, N, stride, out, D, d0);
  if (d0 < D) weighted_block<Lanes8, GB, 1>(p, n_all, values, N, stride, out, D, d0);  // D % 16 == 8
}

// G query heads in blocks of up to 4: heads(std::integral_constant<int, GB>, g0) for each block,
// its size a compile-time constant (the accumulators of its heads live in registers).
template <typename Heads>
void in_head_blocks(int64_t G, Heads heads) {
  for (int64_t g0 = 0; g0 < G; g0 += 4) {
    switch (std::min<int64_t>(4, G - g0)) {
      case 4: heads(std::integral_constant<int, 4>{}, g0); break;
      case 3: heads(std::integral_constant<int, 3>{}, g0); break;
      case 2: heads(std::integral_constant<int, 2>{}, g0); break;
      default: heads(std::integral_constant<int, 1>{}, g0); break;
    }
  }
}

// weighted() for D % 8 == 0, query heads in blocks of up to 4.
template <typename T>
void weighted8(const float* p, int64_t G, int64_t D, const T* values, int64_t N, int64_t stride, float* out,
               int64_t n_all) {
  in_head_blocks(G, [&](auto block, int64_t g0) {
    weighted_heads<decltype(block)::value>(p + g0 * n_all, n_all, values, N, stride, out + g0 * D, D);
  });
}
#endif

#if defined(PARSCALE_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__)
#define PARSCALE_ATTENTION_AVX512 1
// With AVX-512 (where the head size is a multiple of 16) the same loops 16 lanes wide: sixteen
// keys scored at a time and their sixteen vector sums reduced together (sum16); bfloat16 keys
// with AVX512-BF16 (head size a multiple of 32) are not widened at all: `vdpbf16ps` multiplies
// the bfloat16 query and key pairs exactly and sums them in float32, the scale applied to the
// sum (the same scores up to float32 rounding; the other paths scale the query first). At P = 8
// of the decode benchmark (8 rows, 16 heads, 4 KV heads, 64 columns, 48 + 96 keys, 2 threads,
// bfloat16, inputs in cache) the AVX2 loops took 31 us per layer, these 20 (float32 36 against
// 26; benchmarks/decode_attention.py, Zen 5).
using parscale::load16;

// The sixteen sums of sixteen vectors, as one vector (a[i]'s sum in lane i): pairs combined
// within 128-bit lanes (32-bit, then 64-bit interleaves), then across them.
inline __m512 sum16(const __m512 a[16]) {
  __m512 b[8], c[4];
  PARSCALE_UNROLL for (int i = 0; i < 8; ++i)
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  PARSCALE_UNROLL for (int i = 0; i < 4; ++i) {
    const __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
    c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }  // c[i]: in each 128-bit lane the partial sums of keys 4i .. 4i + 3
  const __m512 d0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
  const __m512 d1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x88), _mm512_shuffle_f32x4(c[2], c[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d0, d1, 0x88), _mm512_shuffle_f32x4(d0, d1, 0xDD));
}

// Sixteen keys at a time (a short last block scores its last key again, unused): for each query
// head, acc[i] = dot(acc[i], load(q + d), key_i + d) over the D columns, S at a time, then the
// sixteen sums times `scale` into s.
template <int S, typename QT, typename T, typename Load, typename Dot>
void scores16_by(const QT* q, int64_t G, int64_t D, const T* keys, int64_t N, int64_t stride, float scale, float* s,
                 int64_t n_all, Load load, Dot dot) {
  const __m512 scale_v = _mm512_set1_ps(scale);
  for (int64_t j0 = 0; j0 < N; j0 += 16) {
    const int64_t nb = std::min<int64_t>(16, N - j0);
    const T* k[16];
    PARSCALE_UNROLL for (int i = 0; i < 16; ++i) k[i] = keys + (j0 + std::min<int64_t>(i, nb - 1)) * stride;
    for (int64_t g = 0; g < G; ++g) {
      const QT* qg = q + g * D;
      __m512 acc[16];
      PARSCALE_UNROLL for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; d += S) {
        const auto x = load(qg + d);
        PARSCALE_UNROLL for (int i = 0; i < 16; ++i) acc[i] = dot(acc[i], x, k[i] + d);
      }
      _mm512_mask_storeu_ps(s + g * n_all + j0, parscale::first16(nb), _mm512_mul_ps(sum16(acc), scale_v));
    }
  }
}

// scores() for D % 16 == 0: float32 query (already scaled) by keys widened in registers.
template <typename T>
void scores16(const float* q, int64_t G, int64_t D, const T* keys, int64_t N, int64_t stride, float* s,
              int64_t n_all) {
  scores16_by<16>(q, G, D, keys, N, stride, 1.0f, s, n_all, [](const float* x) { return _mm512_loadu_ps(x); },
                  [](__m512 acc, __m512 x, const T* k) { return _mm512_fmadd_ps(x, load16(k, 0xFFFF), acc); });
}

#ifdef __AVX512BF16__
// scores16 for bfloat16 keys and D % 32 == 0: the query heads as they are (bfloat16, unscaled)
// by `vdpbf16ps`, 32 columns per instruction, the scale applied to each sum.
void scores16_dot(const uint16_t* q, int64_t G, int64_t D, const uint16_t* keys, int64_t N, int64_t stride,
                  float scale, float* s, int64_t n_all) {
  const auto bf16x32 = [](const uint16_t* x) { return reinterpret_cast<__m512bh>(_mm512_loadu_si512(x)); };
  scores16_by<32>(q, G, D, keys, N, stride, scale, s, n_all, bf16x32,
                  [&](__m512 acc, __m512bh x, const uint16_t* k) { return _mm512_dpbf16_ps(acc, x, bf16x32(k)); });
}
#endif

struct Lanes16 {  // Lanes8's 16-lane form
  using V = __m512;
  static constexpr int n = 16;
  static V zero() { return _mm512_setzero_ps(); }
  template <typename T>
  static V widen(const T* v) { return load16(v, 0xFFFF); }
  static V splat(const float* x) { return _mm512_set1_ps(*x); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static void add_to(float* o, V v) { _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), v)); }
};

template <int GB, typename T>
void weighted_heads16(const float* p, int64_t n_all, const T* values, int64_t N, int64_t stride, float* out,
                      int64_t D) {
  int64_t d0 = 0;
  for (; d0 + 64 <= D; d0 += 64) weighted_block<Lanes16, GB, 4>(p, n_all, values, N, stride, out, D, d0);
  switch ((D - d0) / 16) {
    case 3: weighted_block<Lanes16, GB, 3>(p, n_all, values, N, stride, out, D, d0); break;
    case 2: weighted_block<Lanes16, GB, 2>(p, n_all, values, N, stride, out, D, d0); break;
    case 1: weighted_block<Lanes16, GB, 1>(p, n_all, values, N, stride, out, D, d0); break;
    default: break;
  }
}

// weighted() for D % 16 == 0, query heads in blocks of up to 4.
template <typename T>
void weighted16(const float* p, int64_t G, int64_t D, const T* values, int64_t N, int64_t stride, float* out,
                int64_t n_all) {
  in_head_blocks(G, [&](auto block, int64_t g0) {
    weighted_heads16<decltype(block)::value>(p + g0 * n_all, n_all, values, N, stride, out + g0 * D, D);
  });
}
#endif

// Softmax of one head's scores [prefix ; cache] in place, the mask added to the last L (the
// cache). With AVX2 eight lanes at a time (a vectorised exponential), the tail in plain C++.
inline void softmax(float* sg, int64_t n_all, const float* mask, int64_t Tp) {
  if (mask)
    for (int64_t j = Tp; j < n_all; ++j) sg[j] += mask[j - Tp];
  int64_t n8 = 0;  // scores done eight at a time
  float top = -INFINITY, total = 0.0f;
#ifdef PARSCALE_AVX2
  n8 = n_all & ~int64_t(7);
  __m256 top8 = _mm256_set1_ps(-INFINITY);
  for (int64_t j = 0; j < n8; j += 8) top8 = _mm256_max_ps(_mm256_loadu_ps(sg + j), top8);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, top8);
  top = *std::max_element(lanes, lanes + 8);
#endif
  for (int64_t j = n8; j < n_all; ++j) top = std::max(top, sg[j]);
#ifdef PARSCALE_AVX2
  const __m256 top_v = _mm256_set1_ps(top);
  __m256 total8 = _mm256_setzero_ps();
  for (int64_t j = 0; j < n8; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sg + j), top_v));
    _mm256_storeu_ps(sg + j, e);
    total8 = _mm256_add_ps(total8, e);
  }
  total = parscale::hsum(total8);
#endif
  for (int64_t j = n8; j < n_all; ++j) {
    sg[j] = std::exp(sg[j] - top);
    total += sg[j];
  }
  const float inv = 1.0f / total;
#ifdef PARSCALE_AVX2
  const __m256 inv8 = _mm256_set1_ps(inv);
  for (int64_t j = 0; j < n8; j += 8) _mm256_storeu_ps(sg + j, _mm256_mul_ps(_mm256_loadu_ps(sg + j), inv8));
#endif
  for (int64_t j = n8; j < n_all; ++j) sg[j] *= inv;
}

// One task's parts: the prefix keys and values of its row's stream, the cache keys and values of
// its row, all of one KV head.
template <typename T>
struct Task {
  const T *prefix_k, *prefix_v, *k, *v;
};

// Every line of a task's prefix keys and values and its cache keys and values (a few short
// streams: 6-12 KB each at 48 prefix and 96 cached positions of 64 bfloat16 columns) loaded once,
// with independent plain loads, before the task is computed, where they are at most TOUCH_BYTES.
// After a layer's products these lines come from memory. The scores' and the weighted sum's own
// loads sit between many multiply-adds, so few of them are in flight at once, and the hardware
// prefetcher ramps up on each short stream anew; a loop of nothing but loads keeps enough of
// them in flight. Software prefetches of the next task's lines (the scheme this replaced) were
// no faster than none on Zen 5; in the decode benchmark's 16-layer model (bfloat16, P = 8, a
// build of decode_step.cpp that timed its parts, 6 rounds) the attention took 1.05 ms of a step
// with them and 0.62 with these loads. Longer caches are long streams the prefetcher follows:
// the bare call after a 64 MiB sweep (benchmarks/decode_attention.py's cold state), bfloat16
// P = 8, took 68 -> 49 us at 96 cached positions, 106 -> 80 at 256, 154 -> 134 at 512, and the
// same at 1024 (268 KB a task), where the lines would go no nearer than L2 anyway.
constexpr int64_t TOUCH_BYTES = 256 * 1024;

template <typename T>
inline void touch_task(const Task<T>& t, int64_t prefix_bytes, int64_t cache_bytes) {
  const char* spans[4] = {reinterpret_cast<const char*>(t.prefix_k), reinterpret_cast<const char*>(t.k),
                          reinterpret_cast<const char*>(t.prefix_v), reinterpret_cast<const char*>(t.v)};
  const int64_t bytes[4] = {prefix_bytes, cache_bytes, prefix_bytes, cache_bytes};
  uint64_t any = 0;
  for (int i = 0; i < 4; ++i)
    for (int64_t b = 0; b + 8 <= bytes[i]; b += 64) {
      uint64_t word;
      std::memcpy(&word, spans[i] + b, sizeof(word));
      any |= word;
    }
  asm volatile("" : : "r"(any));  // the loads are kept: their result is "used"
}

// query [rows][heads][D] (contiguous); key/value rows, heads and positions by strides, D contiguous;
// prefix [P][kv][Tp][D] contiguous; mask [mask_rows][L] float32 additive or null; out [rows][heads][D].
template <typename T>
void run(const T* query, const T* key, const T* value, int64_t row_stride, int64_t head_stride, int64_t pos_stride,
         const T* prefix_k, const T* prefix_v, const float* mask, int64_t mask_rows, T* out, int64_t rows,
         int64_t heads, int64_t kv, int64_t L, int64_t Tp, int64_t D, int64_t batch, float scale, int threads) {
  const int64_t G = heads / kv, n_all = Tp + L;
#ifdef PARSCALE_AVX2
  const bool vectors = D % 8 == 0;
#endif
#ifdef PARSCALE_ATTENTION_AVX512
  const bool wide = D % 16 == 0;  // the 16-lane loops
#endif
  bool dot = false;  // bfloat16 scores by vdpbf16ps, from the query as it is
#if defined(PARSCALE_ATTENTION_AVX512) && defined(__AVX512BF16__)
  dot = sizeof(T) == 2 && D % 32 == 0;
#endif
  const int64_t prefix_bytes = Tp * D * int64_t(sizeof(T)), cache_bytes = ((L - 1) * pos_stride + D) * int64_t(sizeof(T));
  const bool touch = 2 * (prefix_bytes + cache_bytes) <= TOUCH_BYTES;
#pragma omp parallel num_threads(threads)
  {
    parscale::Buffer<float> q(G * D), s(G * n_all), acc(G * D), keys(8 * D);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < rows * kv; ++task) {
      const int64_t row = task / kv, h = task % kv, stream = row / batch;
      const T* qrow = query + (row * heads + h * G) * D;  // heads are kv-major: h's G query heads are adjacent
      if (!dot)
        for (int64_t i = 0; i < G * D; ++i) q.data()[i] = to_float(qrow[i]) * scale;
      const Task<T> here{prefix_k + (stream * kv + h) * Tp * D, prefix_v + (stream * kv + h) * Tp * D,
                         key + row * row_stride + h * head_stride, value + row * row_stride + h * head_stride};
      if (touch) touch_task(here, prefix_bytes, cache_bytes);  // see touch_task
      const float* m = mask ? mask + (mask_rows > 1 ? row : 0) * L : nullptr;
      float* sc = s.data();
      float* a = acc.data();
      std::fill(a, a + G * D, 0.0f);
      // the two parts the query heads attend to: the stream's prefix, then the cache; their
      // scores side by side in sc (one softmax over both)
      struct Part {
        const T *keys, *values;
        int64_t n, stride, offset;
      };
      const Part parts[2] = {{here.prefix_k, here.prefix_v, Tp, D, 0}, {here.k, here.v, L, pos_stride, Tp}};
      for (const Part& p : parts) {
#ifdef PARSCALE_ATTENTION_AVX512
#ifdef __AVX512BF16__
        if (dot) {
          scores16_dot(reinterpret_cast<const uint16_t*>(qrow), G, D, reinterpret_cast<const uint16_t*>(p.keys), p.n,
                       p.stride, scale, sc + p.offset, n_all);
          continue;
        }
#endif
        if (wide) {
          scores16(q.data(), G, D, p.keys, p.n, p.stride, sc + p.offset, n_all);
          continue;
        }
#endif
#ifdef PARSCALE_AVX2
        if (vectors) {
          scores8(q.data(), G, D, p.keys, p.n, p.stride, sc + p.offset, n_all, keys.data());
          continue;
        }
#endif
        scores(q.data(), G, D, p.keys, p.n, p.stride, sc + p.offset, n_all);
      }
      for (int64_t g = 0; g < G; ++g) softmax(sc + g * n_all, n_all, m, Tp);  // one softmax over [prefix ; cache]
      for (const Part& p : parts) {
#ifdef PARSCALE_ATTENTION_AVX512
        if (wide) {
          weighted16(sc + p.offset, G, D, p.values, p.n, p.stride, a, n_all);
          continue;
        }
#endif
#ifdef PARSCALE_AVX2
        if (vectors) {
          weighted8(sc + p.offset, G, D, p.values, p.n, p.stride, a, n_all);
          continue;
        }
#endif
        weighted(sc + p.offset, G, D, p.values, p.n, p.stride, a, n_all);
      }
      T* o = out + (row * heads + h * G) * D;
      for (int64_t i = 0; i < G * D; ++i) store(o + i, a[i]);
    }
  }
}

}  // namespace

extern "C" void parscale_decode_attention_f32(const float* query, const float* key, const float* value,
                                              int64_t row_stride, int64_t head_stride, int64_t pos_stride,
                                              const float* prefix_k, const float* prefix_v, const float* mask,
                                              int64_t mask_rows, float* out, int64_t rows, int64_t heads, int64_t kv,
                                              int64_t L, int64_t Tp, int64_t D, int64_t batch, float scale,
                                              int threads) {
  run(query, key, value, row_stride, head_stride, pos_stride, prefix_k, prefix_v, mask, mask_rows, out, rows, heads,
      kv, L, Tp, D, batch, scale, threads);
}

extern "C" void parscale_decode_attention_bf16(const uint16_t* query, const uint16_t* key, const uint16_t* value,
                                               int64_t row_stride, int64_t head_stride, int64_t pos_stride,
                                               const uint16_t* prefix_k, const uint16_t* prefix_v, const float* mask,
                                               int64_t mask_rows, uint16_t* out, int64_t rows, int64_t heads,
                                               int64_t kv, int64_t L, int64_t Tp, int64_t D, int64_t batch,
                                               float scale, int threads) {
  run(query, key, value, row_stride, head_stride, pos_stride, prefix_k, prefix_v, mask, mask_rows, out, rows, heads,
      kv, L, Tp, D, batch, scale, threads);
}

// ----- the rotary embedding of one decode step's queries and keys, in place ----------------------
//
// transformers' `apply_rotary_pos_emb` (Llama, Qwen2, Mistral...) is x * cos + rotate_half(x) * sin
// with rotate_half(x) = [-x2, x1]: eleven torch calls on a few thousand values per layer, about
// 20 us of a decode step's layer. Here it is one pass over [rows][heads][D], each pair (i, i + D/2)
// read before either is written, with the stock rounding: each product is rounded to the input's
// dtype, then their sum (bfloat16 as torch computes it: in float32, rounded to nearest even), so
// the result is the stock one bit for bit. With AVX2, eight pairs at a time where D/2 is a
// multiple of 8 (the plain loop took 40 us for P = 8 rows of 16 + 4 heads of 64 in bfloat16,
// more than the stock ops). cos and sin are [rows or 1][D] (cs_stride 0: one position for every row).
namespace {

using parscale::narrow;

// a * b rounded to float32 and kept apart from the next add (no fused multiply-add), as torch's
// separate mul and add ops compute it
inline float product(float a, float b) {
  float p = a * b;
  __asm__("" : "+x"(p));
  return p;
}

#ifdef PARSCALE_AVX2
using parscale::narrow8;
using parscale::store8;

inline __m256 product8(__m256 a, __m256 b) {
  __m256 p = _mm256_mul_ps(a, b);
  __asm__("" : "+x"(p));
  return p;
}

// pairs [i, i + 8) and [half + i, half + i + 8) of one head, from v to o (the same or another place)
template <typename T>
inline void rotary8(const T* v, T* o, const T* c, const T* s, int64_t i, int64_t half) {
  const __m256 a = load8(v + i), b = load8(v + i + half);
  const __m256 minus_b = _mm256_xor_ps(b, _mm256_set1_ps(-0.0f));
  const __m256 first = _mm256_add_ps(narrow8(o, product8(a, load8(c + i))), narrow8(o, product8(minus_b, load8(s + i))));
  const __m256 second = _mm256_add_ps(narrow8(o, product8(b, load8(c + i + half))),
                                      narrow8(o, product8(a, load8(s + i + half))));
  store8(o + i, narrow8(o, first));
  store8(o + i + half, narrow8(o, second));
}
#endif

// x [rows][heads][D] (rows row_stride apart) rotated into out (rows out_row_stride and heads
// out_head_stride apart; out may be x itself: each pair is read before it is written).
template <typename T>
void rotary(const T* x, int64_t rows, int64_t heads, int64_t D, int64_t row_stride, const T* cos, const T* sin,
            int64_t cs_stride, T* out, int64_t out_row_stride, int64_t out_head_stride) {
  const int64_t half = D / 2;
  int64_t vector_end = 0;  // pairs done eight at a time
#ifdef PARSCALE_AVX2
  vector_end = half & ~int64_t(7);
#endif
  for (int64_t r = 0; r < rows; ++r) {
    const T* c = cos + r * cs_stride;
    const T* s = sin + r * cs_stride;
    for (int64_t h = 0; h < heads; ++h) {
      const T* v = x + r * row_stride + h * D;
      T* o = out + r * out_row_stride + h * out_head_stride;
#ifdef PARSCALE_AVX2
      for (int64_t i = 0; i < vector_end; i += 8) rotary8(v, o, c, s, i, half);
#endif
      for (int64_t i = vector_end; i < half; ++i) {
        const float a = to_float(v[i]), b = to_float(v[i + half]);
        const float first = narrow(o, product(a, to_float(c[i]))) + narrow(o, product(-b, to_float(s[i])));
        const float second = narrow(o, product(b, to_float(c[i + half]))) + narrow(o, product(a, to_float(s[i + half])));
        store(o + i, first);
        store(o + i + half, second);
      }
    }
  }
}

}  // namespace

extern "C" void parscale_rotary_f32(float* x, int64_t rows, int64_t heads, int64_t D, int64_t row_stride,
                                    const float* cos, const float* sin, int64_t cs_stride) {
  rotary(x, rows, heads, D, row_stride, cos, sin, cs_stride, x, row_stride, D);
}

extern "C" void parscale_rotary_bf16(uint16_t* x, int64_t rows, int64_t heads, int64_t D, int64_t row_stride,
                                     const uint16_t* cos, const uint16_t* sin, int64_t cs_stride) {
  rotary(x, rows, heads, D, row_stride, cos, sin, cs_stride, x, row_stride, D);
}

// A decode step's keys and values appended to a KV cache with room (`kv_cache.GrowingLayer`):
// key and value [rows][heads * D] (the products' outputs), the keys rotated on the way, into
// column `pos` of the buffers [rows][heads][capacity][D] (rows buf_row_stride, heads
// buf_head_stride apart). One call for what `rotary_in_place` and the cache's `update` did
// in eight torch calls (two indexed copies, two views).
template <typename T>
void rotary_append(const T* key, const T* value, int64_t rows, int64_t heads, int64_t D, const T* cos, const T* sin,
                   int64_t cs_stride, T* kbuf, T* vbuf, int64_t buf_row_stride, int64_t buf_head_stride, int64_t pos) {
  rotary(key, rows, heads, D, heads * D, cos, sin, cs_stride, kbuf + pos * D, buf_row_stride, buf_head_stride);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t h = 0; h < heads; ++h)
      std::memcpy(vbuf + r * buf_row_stride + h * buf_head_stride + pos * D, value + (r * heads + h) * D, D * sizeof(T));
}

extern "C" void parscale_rotary_append_f32(const float* key, const float* value, int64_t rows, int64_t heads,
                                           int64_t D, const float* cos, const float* sin, int64_t cs_stride,
                                           float* kbuf, float* vbuf, int64_t buf_row_stride, int64_t buf_head_stride,
                                           int64_t pos) {
  rotary_append(key, value, rows, heads, D, cos, sin, cs_stride, kbuf, vbuf, buf_row_stride, buf_head_stride, pos);
}

extern "C" void parscale_rotary_append_bf16(const uint16_t* key, const uint16_t* value, int64_t rows, int64_t heads,
                                            int64_t D, const uint16_t* cos, const uint16_t* sin, int64_t cs_stride,
                                            uint16_t* kbuf, uint16_t* vbuf, int64_t buf_row_stride,
                                            int64_t buf_head_stride, int64_t pos) {
  rotary_append(key, value, rows, heads, D, cos, sin, cs_stride, kbuf, vbuf, buf_row_stride, buf_head_stride, pos);
}
