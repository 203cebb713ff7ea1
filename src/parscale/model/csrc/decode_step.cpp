// A Llama-family decoder layer's decode step as two C calls (`decode_layer`): the layer's C
// kernels, which live in their own libraries, called in the stock layer's order by function
// pointer, with nothing between them but the residual adds.
//
// The Python of `decode_layer._step` between the same kernel calls (a dozen ctypes calls, views,
// output tensors, the residual adds) took about 45 of the 60 us a layer's step took on a model of
// hidden 128 (16 layers, one thread): most of a step's work that is neither a product nor the
// attention.
//
// front: x = norm(h_in); q, k, v = group(x); q rotated in place; k rotated and v copied into the
//        cache's free column; a = attention(q, cache, prefixes); h = h_in + o(a);
//        x2 = post_norm(h); gate, up = group(x2)
// back:  h_out = h + down(m), m = silu(gate) * up
// Each kernel is called with the arguments `decode_layer._step` gives it, so the outputs are
// theirs bit for bit; the residual adds round as torch's add does (float32 sum, then the
// nearest-even bfloat16). In float32, SiLU x up stays in torch between the two calls: torch
// computes SiLU's exp with Sleef's vectorised exp on whole vectors and with the C library's on
// a chunk's last values (fewer than 32), and the two differ in the last bit for some inputs. In
// bfloat16 on AVX-512 or AVX2 the whole step is one call (`parscale_layer_bf16`): SiLU is
// computed as torch's vectorised loop computes it (x / (1 + exp(-x)) in float32, with the exp
// torch's own Sleef function of the width, found in torch's library by `decode_layer`), and
// for bfloat16 inputs torch's exps all give the same result for each of the 65536 values
// (checked at first use on each machine, `decode_layer.exp_for_silu`, and by the tests).
#include <cstdint>

#include "common.h"  // with AVX2, its 8-lane bfloat16 load, rounding and store; with AVX-512, 16-lane ones
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define PARSCALE_SILU_WIDTH 16  // SiLU x up 16 values at a time, with Sleef_expf16_u10
#elif defined(PARSCALE_AVX2)
#define PARSCALE_SILU_WIDTH 8  // 8 at a time, with Sleef_expf8_u10
#else
#define PARSCALE_SILU_WIDTH 0  // none: the two calls, SiLU x up in torch
#endif

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
  void* exp;  // bfloat16 in one call: torch's Sleef exp of PARSCALE_SILU_WIDTH lanes (null: the two calls)
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

#if PARSCALE_SILU_WIDTH == 16
using ExpFn = __m512 (*)(__m512);

// out = bfloat16(silu(gate)) * up, rounded, as F.silu(gate) * up computes it: torch's loop takes
// x / (1 + exp(-x)) in float32 (exp: Sleef's), rounds it to bfloat16, and the product is the
// float32 one rounded.
void silu_mul(const uint16_t* gate, const uint16_t* up, uint16_t* out, int64_t n, ExpFn exp, int threads) {
  const int64_t blocks = (n + 15) / 16;
#pragma omp parallel for schedule(static) num_threads(threads) if (n >= 8192)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t i = b * 16;
    const __mmask16 m = parscale::first16(n - i);
    const __m512 g = parscale::load16(gate + i, m);
    const __m512 minus = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(g), _mm512_set1_epi32(INT32_MIN)));
    const __m512 silu = parscale::round_bf16(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp(minus))));
    parscale::store16(out + i, parscale::round_bf16(_mm512_mul_ps(silu, parscale::load16(up + i, m))), m);
  }
}
#elif PARSCALE_SILU_WIDTH == 8
using ExpFn = __m256 (*)(__m256);

void silu_mul8(const uint16_t* gate, const uint16_t* up, uint16_t* out, ExpFn exp) {  // 8 values of silu_mul above
  const __m256 g = parscale::load8(gate);
  const __m256 minus = _mm256_xor_ps(g, _mm256_castsi256_ps(_mm256_set1_epi32(INT32_MIN)));
  const __m256 silu = parscale::round_bf16(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), exp(minus))));
  parscale::store8(out, parscale::round_bf16(_mm256_mul_ps(silu, parscale::load8(up))));
}

// silu_mul above, 8 values at a time; a last partial group goes through a zero-padded copy.
void silu_mul(const uint16_t* gate, const uint16_t* up, uint16_t* out, int64_t n, ExpFn exp, int threads) {
  const int64_t blocks = (n + 7) / 8;
#pragma omp parallel for schedule(static) num_threads(threads) if (n >= 8192)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t i = b * 8;
    if (n - i >= 8) {
      silu_mul8(gate + i, up + i, out + i, exp);
    } else {
      uint16_t g[8] = {}, u[8] = {}, o[8];
      std::memcpy(g, gate + i, (n - i) * sizeof(uint16_t));
      std::memcpy(u, up + i, (n - i) * sizeof(uint16_t));
      silu_mul8(g, u, o, exp);
      std::memcpy(out + i, o, (n - i) * sizeof(uint16_t));
    }
  }
}
#endif

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

// The values this build computes bfloat16 SiLU x up with at a time: 16 (AVX-512, torch's
// Sleef_expf16_u10), 8 (AVX2, Sleef_expf8_u10) or 0 (none: the two calls).
extern "C" int parscale_has_silu() { return PARSCALE_SILU_WIDTH; }

// out [n] = bfloat16(silu(gate)) * up (`silu_mul`), exp torch's Sleef exp of the width
// parscale_has_silu() gives. Only called where that is not 0.
extern "C" void parscale_silu_mul_bf16(const uint16_t* gate, const uint16_t* up, uint16_t* out, int64_t n, void* exp,
                                       int threads) {
#if PARSCALE_SILU_WIDTH
  silu_mul(gate, up, out, n, reinterpret_cast<ExpFn>(exp), threads);
#else
  (void)gate, (void)up, (void)out, (void)n, (void)exp, (void)threads;
#endif
}

// The whole bfloat16 step (front, SiLU x up, back) in one call, where c->exp is set (and
// parscale_has_silu()): arguments as parscale_layer_front_bf16's, out [rows, H] the layer's output.
extern "C" void parscale_layer_bf16(const ParscaleLayer* c, const uint16_t* hidden, int64_t rows, const uint16_t* cos,
                                    const uint16_t* sin, int64_t cs_stride, uint16_t* kbuf, uint16_t* vbuf,
                                    int64_t buf_row_stride, int64_t buf_head_stride, int64_t column, const float* mask,
                                    int64_t mask_rows, uint16_t* out, int threads) {
#if PARSCALE_SILU_WIDTH
  const int64_t inter = c->gate_up.N[0], n = rows * inter;
  parscale::Buffer<uint16_t> h(rows * c->hidden), gate_up(2 * n), m(n);
  front(c, hidden, rows, cos, sin, cs_stride, kbuf, vbuf, buf_row_stride, buf_head_stride, column, mask, mask_rows,
        h.data(), gate_up.data(), threads);
  silu_mul(gate_up.data(), gate_up.data() + n, m.data(), n, reinterpret_cast<ExpFn>(c->exp), threads);
  back(c, m.data(), rows, h.data(), out, threads);
#else
  (void)c, (void)hidden, (void)rows, (void)cos, (void)sin, (void)cs_stride, (void)kbuf, (void)vbuf;
  (void)buf_row_stride, (void)buf_head_stride, (void)column, (void)mask, (void)mask_rows, (void)out, (void)threads;
#endif
}

// The decode steps of a forward's layers in one call (`decode_stack`): layer i's one-call step
// (parscale_layer_bf16) on layer i-1's output, layer 0's on `hidden`, all with the same position
// (cos, sin), mask and cache column; layer i's keys and values into kbufs[i], vbufs[i] (its
// cache layer's buffers, strides row_strides[i], head_strides[i]), its output into out + i rows
// x H. The same calls with the same arguments as the layers' calls one by one, so the same bits.
extern "C" void parscale_stack_bf16(const ParscaleLayer* const* layers, int64_t n_layers, const uint16_t* hidden,
                                    int64_t rows, const uint16_t* cos, const uint16_t* sin, int64_t cs_stride,
                                    uint16_t* const* kbufs, uint16_t* const* vbufs, const int64_t* row_strides,
                                    const int64_t* head_strides, int64_t column, const float* mask, int64_t mask_rows,
                                    uint16_t* out, int threads) {
  const uint16_t* x = hidden;
  for (int64_t i = 0; i < n_layers; ++i) {
    uint16_t* y = out + i * rows * layers[i]->hidden;
    parscale_layer_bf16(layers[i], x, rows, cos, sin, cs_stride, kbufs[i], vbufs[i], row_strides[i], head_strides[i],
                        column, mask, mask_rows, y, threads);
    x = y;
  }
}
