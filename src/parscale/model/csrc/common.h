// What the kernel sources share: bfloat16 <-> float32 bit for bit as torch converts (bfloat16 is
// the high half of a float32; narrowing rounds to nearest even), an aligned scratch buffer, the
// columns of x per pass, and the AVX2 loads and sums. kernels.compiled hashes this header with each source, so a change
// here rebuilds them all.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define PARSCALE_AVX2 1
#endif

// The loops over compile-time counts (rows of a block, heads, columns) are unrolled before
// register allocation. Left to itself GCC 12 kept the accumulators of the larger blocks (8 rows
// of x) in memory, a store (and a load) of each per step: half the speed of the same loop in
// registers.
#define PARSCALE_UNROLL _Pragma("GCC unroll 16")

namespace parscale {

inline float to_float(float v) { return v; }
inline float to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline void store(float* out, float v) { *out = v; }
inline void store(uint16_t* out, float v) {  // float32 -> bfloat16, round to nearest even
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {  // NaN stays NaN
    *out = static_cast<uint16_t>((bits >> 16) | 0x40);
    return;
  }
  bits += 0x7fffu + ((bits >> 16) & 1u);
  *out = static_cast<uint16_t>(bits >> 16);
}

// The value v would have once stored as T and read back: v itself for float32, v rounded to the
// nearest-even bfloat16 (as store() rounds) for bfloat16; narrow8 below likewise for eight lanes.
inline float narrow(float*, float v) { return v; }
inline float narrow(uint16_t*, float v) {
  uint16_t b;
  store(&b, v);
  return to_float(b);
}

// A scratch buffer aligned to a cache line. The kernels load x 32 or 64 bytes at a time; from a
// std::vector (malloc aligns to 16 bytes) every other load straddled two lines, and 8 rows of
// bfloat16 decoding ran 20% slower than from torch's 64-byte aligned tensors.
template <typename T>
class Buffer {
 public:
  explicit Buffer(int64_t n)
      : data_(static_cast<T*>(std::aligned_alloc(64, (static_cast<size_t>(n) * sizeof(T) + 63) / 64 * 64 + 64))) {}
  ~Buffer() { std::free(data_); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  T* data() const { return data_; }

 private:
  T* data_;
};

// The products of one group call (`run_group` in skinny_linear.cpp, `int8_product` in
// int8_linear.cpp): G of them of the same x, output g [M, N[g]] at `offset[g]` in y, one after
// another, and their blocks of `block` weight rows numbered one after another from `start[g]`,
// so that one parallel loop runs over the blocks of all of them.
constexpr int64_t MAX_GROUP = 4;  // products per call at most (kernels.MAX_GROUP; the caller keeps to it)
struct Group {
  int64_t G, start[MAX_GROUP + 1] = {0}, offset[MAX_GROUP] = {0};
  const int64_t* N;
  Group(int64_t M, int64_t G_, const int64_t* N_, int64_t block) : G(G_), N(N_) {
    for (int64_t g = 0; g < G; ++g) {
      start[g + 1] = start[g] + (N[g] + block - 1) / block;
      if (g) offset[g] = offset[g - 1] + M * N[g - 1];
    }
  }
  int64_t blocks() const { return start[G]; }
  int64_t values(int64_t M) const { return offset[G - 1] + M * N[G - 1]; }  // y's size
  int64_t product(int64_t b) const {  // which product block b belongs to
    int64_t g = 0;
    while (b >= start[g + 1]) ++g;
    return g;
  }
};

// Columns of x per pass: the rows of a chunk are re-read once per weight row, so x must stay in
// L1. With 8 float32 rows of K = 2816 (a down projection) x is 90 KB, and every weight row then
// streamed it from L2: the step became core-bound on those loads. Passes over blocks of at most
// X_BYTES of x keep it in L1; each weight element is still read once, the partial sums add up in y.
constexpr int64_t X_BYTES = 32768;
inline int64_t k_step(int64_t mc, int64_t x_size, int64_t K) {
  const int64_t step = std::max<int64_t>(256, (X_BYTES / (mc * x_size)) & ~int64_t(31));
  return step >= K ? K : step;
}

#ifdef PARSCALE_AVX2
inline __m256 round_bf16(__m256 v) {  // float32 -> the nearest-even bfloat16, kept as float32
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_and_si256(_mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)),
                                           _mm256_set1_epi32(int(0xffff0000u)));
  const __m256 quiet = _mm256_castsi256_ps(_mm256_or_si256(bits, _mm256_set1_epi32(0x00400000)));  // as store()
  return _mm256_blendv_ps(_mm256_castsi256_ps(rounded), quiet, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}

inline void store8(float* out, __m256 v) { _mm256_storeu_ps(out, v); }
inline void store8(uint16_t* out, __m256 v) {  // v already rounded to bfloat16: its high halves
  const __m256i high = _mm256_srli_epi32(_mm256_castps_si256(v), 16);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(high), _mm256_extracti128_si256(high, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), packed);
}

inline __m256 narrow8(float*, __m256 v) { return v; }
inline __m256 narrow8(uint16_t*, __m256 v) { return round_bf16(v); }
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

#if defined(__AVX512F__) && defined(__AVX512BW__)
// The first min(n, 16), min(n, 32) or min(n, 64) lanes: the mask of a masked load that reads a row's last
// columns (the masked-off lanes read as zeros, which add nothing), so no scalar tail loop runs.
inline __mmask16 first16(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }
inline __mmask32 first32(int64_t n) { return n >= 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << n) - 1); }
inline __mmask64 first64(int64_t n) { return n >= 64 ? ~__mmask64(0) : (__mmask64(1) << n) - 1; }

// The 16-lane load8, round_bf16 and store8 (masked: the lanes past a row's end are not read, or
// not written).
inline __m512 load16(const float* w, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, w); }
inline __m512 load16(const uint16_t* w, __mmask16 mask) {  // bfloat16 bits -> float32
  __m256i half = _mm256_maskz_loadu_epi16(mask, w);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}
inline __m512 round_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_and_si512(_mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)),
                                           _mm512_set1_epi32(int(0xffff0000u)));
  const __m512i quiet = _mm512_or_si512(bits, _mm512_set1_epi32(0x00400000));  // as store()
  return _mm512_castsi512_ps(_mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), rounded, quiet));
}
inline void store16(uint16_t* out, __m512 v, __mmask16 mask) {  // v already rounded to bfloat16: its high halves
  _mm256_mask_storeu_epi16(out, mask, _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16)));
}
#endif
#endif

}  // namespace parscale
