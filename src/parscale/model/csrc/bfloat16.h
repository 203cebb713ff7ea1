// bfloat16 <-> float32 for the kernels, bit for bit as torch converts (bfloat16 is the high half
// of a float32; narrowing rounds to nearest even). One header for the three kernel sources;
// kernels.compiled hashes it with each source, so a change here rebuilds them all.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>

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

}  // namespace parscale
