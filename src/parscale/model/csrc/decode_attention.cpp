// One decode step's attention on CPU: every row's query heads over [its stream's prefix ; the cache].
//
// A decode step has one query per row, a few rows, and a short cache: a few hundred thousand
// multiply-adds. torch's fused CPU attention kernel spends far longer than that setting up
// (its per-call buffers, and bfloat16 conversions), twice per layer (prefix and cache), and
// the log-sum-exp merge adds more small ops. Here one call does it all: for each (row, KV head)
// the `groups` query heads that share the KV head score the T prefix keys of the row's stream
// and the L cache keys, one float32 softmax over both, and sum the values; each key row is read
// once for all its query heads. Float32 accumulation; bfloat16 keys and values are widened
// in registers (a 16-bit shift). The additive mask (float32, per row or one for all) hides
// padding. No torch header (see skinny_linear.cpp): Python calls it through ctypes.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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

// query [rows][heads][D] (contiguous); key/value rows, heads and positions by strides, D contiguous;
// prefix [P][kv][Tp][D] contiguous; mask [mask_rows][L] float32 additive or null; out [rows][heads][D].
template <typename T>
void run(const T* query, const T* key, const T* value, int64_t row_stride, int64_t head_stride, int64_t pos_stride,
         const T* prefix_k, const T* prefix_v, const float* mask, int64_t mask_rows, T* out, int64_t rows,
         int64_t heads, int64_t kv, int64_t L, int64_t Tp, int64_t D, int64_t batch, float scale, int threads) {
  const int64_t G = heads / kv, n_all = Tp + L;
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> q(G * D), s(G * n_all), acc(G * D);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < rows * kv; ++task) {
      const int64_t row = task / kv, h = task % kv, stream = row / batch;
      const T* qrow = query + (row * heads + h * G) * D;  // heads are kv-major: h's G query heads are adjacent
      for (int64_t i = 0; i < G * D; ++i) q[i] = to_float(qrow[i]) * scale;
      const T* pk = prefix_k + (stream * kv + h) * Tp * D;
      const T* pv = prefix_v + (stream * kv + h) * Tp * D;
      const T* k = key + row * row_stride + h * head_stride;
      const T* v = value + row * row_stride + h * head_stride;
      scores(q.data(), G, D, pk, Tp, D, s.data(), n_all);
      scores(q.data(), G, D, k, L, pos_stride, s.data() + Tp, n_all);
      const float* m = mask ? mask + (mask_rows > 1 ? row : 0) * L : nullptr;
      for (int64_t g = 0; g < G; ++g) {  // one softmax over [prefix ; cache]
        float* sg = s.data() + g * n_all;
        if (m)
          for (int64_t j = 0; j < L; ++j) sg[Tp + j] += m[j];
        float top = -INFINITY;
        for (int64_t j = 0; j < n_all; ++j) top = std::max(top, sg[j]);
        float total = 0.0f;
        for (int64_t j = 0; j < n_all; ++j) {
          sg[j] = std::exp(sg[j] - top);
          total += sg[j];
        }
        const float inv = 1.0f / total;
        for (int64_t j = 0; j < n_all; ++j) sg[j] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      weighted(s.data(), G, D, pv, Tp, D, acc.data(), n_all);
      weighted(s.data() + Tp, G, D, v, L, pos_stride, acc.data(), n_all);
      T* o = out + (row * heads + h * G) * D;
      for (int64_t i = 0; i < G * D; ++i) store(o + i, acc[i]);
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
