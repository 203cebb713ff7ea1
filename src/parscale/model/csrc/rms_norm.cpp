// The Llama-family RMSNorm for a few rows: y = w * round(x * rsqrt(mean(x^2) + eps)), in one pass
// per row.
//
// transformers' forward (LlamaRMSNorm, and the Qwen2, Qwen3, Mistral... copies of it) is seven
// torch calls on a [rows, hidden] tensor: widen, square, mean, add, rsqrt, multiply, narrow,
// multiply by the weight. In a decode step each is a few microseconds of dispatch on a few
// thousand values, and a model calls the norm twice per layer: 31-40 us per call in bfloat16
// on an AVX2 EPYC against 12-16 through this kernel, 2 ms per step (benchmarks/norm.py).
//
// The arithmetic is the stock one step for step, in float32: the sum of squares divided by the
// row length, eps added, 1 / sqrt, the product rounded to the input's dtype (bfloat16: nearest
// even) and then multiplied by the weight and rounded again. Only the order of the sum of
// squares differs from torch's reduction, so results equal the stock ones to a rounding of the
// last bit, not bit for bit.
//
// No torch header (see skinny_linear.cpp): Python calls the C functions at the end by ctypes.
#include <cmath>
#include <cstdint>

#include "common.h"

namespace {

using parscale::narrow;
#ifdef PARSCALE_AVX2
using parscale::narrow8;
using parscale::store8;
#endif

template <typename T>
void rms_norm(const T* x, int64_t M, int64_t H, const T* w, float eps, T* y) {
  for (int64_t m = 0; m < M; ++m) {
    const T* row = x + m * H;
    T* out = y + m * H;
    float sum = 0.0f;
    int64_t k = 0;
#ifdef PARSCALE_AVX2
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (; k + 32 <= H; k += 32)
      PARSCALE_UNROLL for (int j = 0; j < 4; ++j) {
        const __m256 v = parscale::load8(row + k + 8 * j);
        acc[j] = _mm256_fmadd_ps(v, v, acc[j]);
      }
    for (; k + 8 <= H; k += 8) {
      const __m256 v = parscale::load8(row + k);
      acc[0] = _mm256_fmadd_ps(v, v, acc[0]);
    }
    sum = parscale::hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
#endif
    for (; k < H; ++k) {
      const float v = parscale::to_float(row[k]);
      sum += v * v;
    }
    const float inv = 1.0f / std::sqrt(sum / static_cast<float>(H) + eps);  // torch.rsqrt's CPU formula
    k = 0;
#ifdef PARSCALE_AVX2
    const __m256 inv8 = _mm256_set1_ps(inv);
    for (; k + 8 <= H; k += 8) {
      const __m256 normed = narrow8(out, _mm256_mul_ps(parscale::load8(row + k), inv8));
      store8(out + k, narrow8(out, _mm256_mul_ps(parscale::load8(w + k), normed)));
    }
#endif
    for (; k < H; ++k) parscale::store(out + k, parscale::to_float(w[k]) * narrow(out, parscale::to_float(row[k]) * inv));
  }
}

}  // namespace

// x, y: [M, H] row-major and contiguous, w: [H], all of one dtype (checked by the Python caller).
extern "C" void parscale_rms_norm_f32(const float* x, int64_t M, int64_t H, const float* w, float eps, float* y) {
  rms_norm(x, M, H, w, eps, y);
}

extern "C" void parscale_rms_norm_bf16(const uint16_t* x, int64_t M, int64_t H, const uint16_t* w, float eps,
                                       uint16_t* y) {
  rms_norm(x, M, H, w, eps, y);
}
