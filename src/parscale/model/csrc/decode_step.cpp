// A Llama-family decoder layer's decode step as two C calls (`decode_layer`): the layer's C
// kernels, which live in their own libraries, called in the stock layer's order by function
// pointer, with nothing between them but the residual adds.
//
// The Python of `decode_layer._step` between the same kernel calls (a dozen ctypes calls, views,
// output tensors, the residual adds) took about 45 of the 60 us a layer's step took on a model of
// hidden 128 (16 layers, one thread): most of a step's work that is neither a product nor the
// attention. Only SiLU x up stays in torch between the two calls: its exp is Sleef's, and the
// step must give the stock layer's bits.
//
// front: x = norm(h_in); q, k, v = group(x); q rotated in place; k rotated and v copied into the
//        cache's free column; a = attention(q, cache, prefixes); h = h_in + o(a);
//        x2 = post_norm(h); gate, up = group(x2)
// back:  h_out = h + down(m), m = silu(gate) * up (computed by torch between the two)
// Each kernel is called with the arguments `decode_layer._step` gives it, so the outputs are
// theirs bit for bit; the residual adds round as torch's add does (float32 sum, then the
// nearest-even bfloat16).
#include <cstdint>

#include "common.h"

extern "C" {

// One C call of products of the same x: a group (q/k/v, gate/up) or a group of one (o, down).
// The group entries of skinny_linear.cpp and int8_linear.cpp; a group of one gives what the
// single entry gives, bit for bit.
struct ParscaleProduct {
  void* fn;           // the float or the int8 group entry (`int8` says which)
  int64_t int8;       // 1: an int8 entry, with scales, bits and bias_bf16
  int64_t bits;       // int8: the activations' rounding (16 or 8)
  int64_t bias_bf16;  // int8: the biases are bfloat16
  int64_t K, G;
  const void* weights[4];
  const void* scales[4];
  const void* biases[4];
  int64_t N[4];
};

// What a layer's step reads that does not change from step to step (`decode_layer._Chain`).
struct ParscaleLayer {
  void* norm;       // rms_norm.cpp's entry for the dtype
  void* rotary;     // decode_attention.cpp's
  void* append;     // decode_attention.cpp's rotary_append
  void* attention;  // decode_attention.cpp's
  const void* norm_weight[2];  // input, post-attention
  float eps[2];
  float scaling;
  float unused;
  ParscaleProduct qkv, o, gate_up, down;
  const void* prefix_k;  // [P, kv, T, D]
  const void* prefix_v;
  int64_t hidden, heads, kv, head_dim, n_prefix, n_streams;
};

}  // extern "C"

namespace {

using NormFn = void (*)(const void*, int64_t, int64_t, const void*, float, void*);
using FloatGroupFn = void (*)(const void*, int64_t, int64_t, int64_t, const void* const*, const void* const*, void*,
                              const int64_t*, int);
using Int8GroupFn = void (*)(const void*, int64_t, int64_t, int64_t, const void* const*, const void* const*,
                             const void* const*, void*, const int64_t*, int, int, int);
using RotaryFn = void (*)(void*, int64_t, int64_t, int64_t, int64_t, const void*, const void*, int64_t);
using AppendFn = void (*)(const void*, const void*, int64_t, int64_t, int64_t, const void*, const void*, int64_t, void*,
                          void*, int64_t, int64_t, int64_t);
using AttentionFn = void (*)(const void*, const void*, const void*, int64_t, int64_t, int64_t, const void*, const void*,
                             const float*, int64_t, void*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                             int64_t, float, int);

int64_t outputs(const ParscaleProduct& p) {
  int64_t n = 0;
  for (int64_t g = 0; g < p.G; ++g) n += p.N[g];
  return n;
}

void product(const ParscaleProduct& p, const void* x, int64_t rows, void* y, int threads) {
  if (p.int8)
    reinterpret_cast<Int8GroupFn>(p.fn)(x, rows, p.K, p.G, p.weights, p.scales, p.biases, y, p.N, threads,
                                        static_cast<int>(p.bits), static_cast<int>(p.bias_bf16));
  else
    reinterpret_cast<FloatGroupFn>(p.fn)(x, rows, p.K, p.G, p.weights, p.biases, y, p.N, threads);
}

template <typename T>
void add(const T* a, const T* b, T* out, int64_t n) {  // torch's a + b: the float32 sum, rounded to T
  for (int64_t i = 0; i < n; ++i) parscale::store(out + i, parscale::to_float(a[i]) + parscale::to_float(b[i]));
}

// The scratch values of one segment, rounded up to whole 64-byte lines: each segment is a
// product's x (the kernels load x a line at a time; see common.h's Buffer).
template <typename T>
int64_t lines(int64_t n) {
  const int64_t per_line = 64 / static_cast<int64_t>(sizeof(T));
  return (n + per_line - 1) / per_line * per_line;
}

template <typename T>
void front(const ParscaleLayer* c, const T* hidden, int64_t rows, const T* cos, const T* sin, int64_t cs_stride,
           T* kbuf, T* vbuf, int64_t buf_row_stride, int64_t buf_head_stride, int64_t column, const float* mask,
           int64_t mask_rows, T* h, T* gate_up, int threads) {
  const int64_t H = c->hidden, D = c->head_dim, heads = c->heads, kv = c->kv;
  const int64_t nq = heads * D, nk = kv * D;
  const int64_t x_size = lines<T>(rows * H), qkv_size = lines<T>(rows * outputs(c->qkv)),
                a_size = lines<T>(rows * nq);
  parscale::Buffer<T> scratch(x_size + qkv_size + a_size + rows * H);
  T* x = scratch.data();
  T* q = x + x_size;  // q [rows, nq], then k [rows, nk], then v [rows, nk]: the group's outputs
  T* k = q + rows * nq;
  T* v = k + rows * nk;
  T* a = q + qkv_size;
  T* o = a + a_size;
  const auto norm = reinterpret_cast<NormFn>(c->norm);
  norm(hidden, rows, H, c->norm_weight[0], c->eps[0], x);
  product(c->qkv, x, rows, q, threads);
  reinterpret_cast<RotaryFn>(c->rotary)(q, rows, heads, D, nq, cos, sin, cs_stride);
  reinterpret_cast<AppendFn>(c->append)(k, v, rows, kv, D, cos, sin, cs_stride, kbuf, vbuf, buf_row_stride,
                                        buf_head_stride, column);
  reinterpret_cast<AttentionFn>(c->attention)(q, kbuf, vbuf, buf_row_stride, buf_head_stride, D, c->prefix_k,
                                              c->prefix_v, mask, mask_rows, a, rows, heads, kv, column + 1,
                                              c->n_prefix, D, rows / c->n_streams, c->scaling, threads);
  product(c->o, a, rows, o, threads);
  add(hidden, o, h, rows * H);
  norm(h, rows, H, c->norm_weight[1], c->eps[1], x);
  product(c->gate_up, x, rows, gate_up, threads);
}

template <typename T>
void back(const ParscaleLayer* c, const T* m, int64_t rows, const T* h, T* out, int threads) {
  parscale::Buffer<T> down(rows * c->hidden);
  product(c->down, m, rows, down.data(), threads);
  add(h, down.data(), out, rows * c->hidden);
}

}  // namespace

// hidden [rows, H]; cos, sin [rows or 1, D] (cs_stride D or 0); kbuf, vbuf the cache layer's
// buffers [rows, kv, capacity, D] with room at `column`; mask float32 [mask_rows, column + 1] or
// null; h [rows, H] and gate_up [rows, 2 I] (gate, then up) are written. All contiguous.
extern "C" void parscale_layer_front_f32(const ParscaleLayer* c, const float* hidden, int64_t rows, const float* cos,
                                         const float* sin, int64_t cs_stride, float* kbuf, float* vbuf,
                                         int64_t buf_row_stride, int64_t buf_head_stride, int64_t column,
                                         const float* mask, int64_t mask_rows, float* h, float* gate_up, int threads) {
  front(c, hidden, rows, cos, sin, cs_stride, kbuf, vbuf, buf_row_stride, buf_head_stride, column, mask, mask_rows, h,
        gate_up, threads);
}

extern "C" void parscale_layer_front_bf16(const ParscaleLayer* c, const uint16_t* hidden, int64_t rows,
                                          const uint16_t* cos, const uint16_t* sin, int64_t cs_stride, uint16_t* kbuf,
                                          uint16_t* vbuf, int64_t buf_row_stride, int64_t buf_head_stride,
                                          int64_t column, const float* mask, int64_t mask_rows, uint16_t* h,
                                          uint16_t* gate_up, int threads) {
  front(c, hidden, rows, cos, sin, cs_stride, kbuf, vbuf, buf_row_stride, buf_head_stride, column, mask, mask_rows, h,
        gate_up, threads);
}

// m [rows, I] (silu(gate) * up), h [rows, H] (front's): out [rows, H] = h + down(m).
extern "C" void parscale_layer_back_f32(const ParscaleLayer* c, const float* m, int64_t rows, const float* h,
                                        float* out, int threads) {
  back(c, m, rows, h, out, threads);
}

extern "C" void parscale_layer_back_bf16(const ParscaleLayer* c, const uint16_t* m, int64_t rows, const uint16_t* h,
                                         uint16_t* out, int threads) {
  back(c, m, rows, h, out, threads);
}
