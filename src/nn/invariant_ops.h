// Internal: the building blocks of batch-invariant forwards (private to nn).
//
// Every function here computes each output row with one fixed sequence of
// floating-point operations that depends only on that row's inputs (and on
// the instruction set chosen once per process), never on how many rows run
// together or how the work is split over threads. The KV-cache forward, the
// paged forward and the MoE layer all use them, so a token's result is the
// same bits whichever path, batch or chunk computes it.
//
// All pointers are to fp32 CPU memory; the functions do not allocate unless
// they return a tensor.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace tessera::nn::detail {

// y = x W^T for x [..., K] and w [N, K] (fp32, CPU); returns [..., N].
at::Tensor linear_fixed(const at::Tensor& x, const at::Tensor& w);

// The kernels behind linear_fixed: out[m * N + n] for rows m < M and
// outputs n in [n0, n1) of x [M, K] w^T, w [N, K]. Each keeps one order of
// operations per output whatever M and the range are; instruction sets
// differ from each other in the last bits.
using LinearKernel = void (*)(const float* x, int64_t M, const float* w, int64_t N, int64_t K,
                              float* out, int64_t n0, int64_t n1);
struct NamedLinearKernel {
  const char* name;  // "avx512", "avx2", "generic"
  LinearKernel fn;
};
// The kernels this CPU runs, the one linear_fixed uses first.
std::vector<NamedLinearKernel> linear_kernels();

// The dot product of a and b (n values) in one fixed order, chosen once per
// process from the CPU: 16 fused multiply-add lanes and _mm512_reduce_add_ps
// with AVX-512, else 16 interleaved partial sums and a fixed tree.
using DotFn = float (*)(const float* a, const float* b, int64_t n);
extern const DotFn dot_fixed_kernel;
inline float dot_fixed(const float* a, const float* b, int64_t n) {
  return dot_fixed_kernel(a, b, n);
}

// out[i] += p * v[i] for i < n: a multiply, then an add (never fused), so
// every instruction set gives the same bits.
using AxpyFn = void (*)(float p, const float* v, float* out, int64_t n);
extern const AxpyFn axpy_kernel;

// out = x / rms(x) * w per row of H values (fp32 accumulation).
void rms_norm_rows(const float* x, const float* w, float* out, int64_t rows, int64_t H, float eps);

// Rotary embedding in place: rows [rows, heads * hd]; row r's position is
// positions[r]; cos_table / sin_table [max_position, hd] (Hugging Face's
// layout: the hd/2 frequencies twice).
void rope_rows(float* x, int64_t rows, int64_t heads, int64_t hd, const int64_t* positions,
               const float* cos_table, const float* sin_table);

// out[i] = silu(gate[i]) * up[i] = gate / (1 + exp(-gate)) * up.
void silu_mul(const float* gate, const float* up, float* out, int64_t n);

// Most queries attend_queries takes at once.
constexpr int kMaxQueryGroup = 64;

// Attention of nq (<= kMaxQueryGroup) query rows q[0..nq) (hd floats each) that share their
// keys (the heads of one kv head) over the keys `for_each_key` visits:
// for_each_key(f) calls f(j, key_row, value_row) for every key the queries
// may see, in increasing j (j < stride), each row holding hd floats.
// scores: scratch of nq * stride floats; out[0..nq) are overwritten.
// Every pass visits the keys in the same order and each query's arithmetic
// is the same whatever nq, so a query's result depends only on the visible
// keys' values, not on where they are stored or which queries share them.
template <typename ForEachKey>
inline void attend_queries(const float* const* q, int nq, int64_t hd, float scale,
                           const ForEachKey& for_each_key, float* scores, int64_t stride,
                           float* const* out) {
  float mx[kMaxQueryGroup], denom[kMaxQueryGroup];
  for (int h = 0; h < nq; ++h) {
    mx[h] = -__builtin_inff();
    denom[h] = 0.f;
  }
  for_each_key([&](int64_t j, const float* k, const float*) {
    for (int h = 0; h < nq; ++h) {
      float& s = scores[h * stride + j];
      s = dot_fixed(q[h], k, hd) * scale;
      mx[h] = s > mx[h] ? s : mx[h];
    }
  });
  for_each_key([&](int64_t j, const float*, const float*) {
    for (int h = 0; h < nq; ++h) {
      float& s = scores[h * stride + j];
      s = __builtin_expf(s - mx[h]);
      denom[h] += s;
    }
  });
  for (int h = 0; h < nq; ++h) {
    for (int64_t e = 0; e < hd; ++e) out[h][e] = 0.f;
  }
  for_each_key([&](int64_t j, const float*, const float* v) {
    for (int h = 0; h < nq; ++h) {
      if (denom[h] != 0.f) axpy_kernel(scores[h * stride + j] / denom[h], v, out[h], hd);
    }
  });
}

}  // namespace tessera::nn::detail
