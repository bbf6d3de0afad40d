// Internal: the int4 GEMM kernels behind tessera::quant::linear, one set per
// instruction-set level. Each computes out[m, n] for rows m in [0, M) and
// output features n in [n0, n1) (callers split n across threads).
#pragma once

#include <cstdint>
#include <type_traits>

namespace tessera::quant::kernels {

// Calls f(std::integral_constant<int, MB>{}, m0) for blocks of four tokens
// starting at m0, then once for the remaining 1-3: the kernels get MB at
// compile time (accumulators in registers) and do the same operations for
// every output whatever the block, which keeps them batch-invariant.
template <typename F>
inline void for_token_blocks(int64_t M, F&& f) {
  int64_t m0 = 0;
  for (; m0 + 4 <= M; m0 += 4) f(std::integral_constant<int, 4>{}, m0);
  switch (M - m0) {
    case 3:
      f(std::integral_constant<int, 3>{}, m0);
      break;
    case 2:
      f(std::integral_constant<int, 2>{}, m0);
      break;
    case 1:
      f(std::integral_constant<int, 1>{}, m0);
      break;
    default:
      break;
  }
}

// A packed weight as raw pointers (see QuantizedWeight).
struct Packed {
  const uint8_t* codes;  // [N, K / 2]
  const float* scales;   // [N, G]
  const uint8_t* zeros;  // [N, G]
  int64_t N, K, group;   // group: multiple of 64 dividing K
};

// W4A16: x [M, K] as bf16 bit patterns and as the same values in fp32.
// out [M, N] fp32.
using W4A16Fn = void (*)(const uint16_t* x, const float* xf, int64_t M, const Packed& w, float* out,
                         int64_t n0, int64_t n1);
// Integer modes: xq [M, K] int8 codes, xs [M, G] scales, xsum [M, G] sums of
// the codes per group. out [M, N] fp32.
using W4AxFn = void (*)(const int8_t* xq, const float* xs, const int32_t* xsum, int64_t M,
                        const Packed& w, float* out, int64_t n0, int64_t n1);

void w4a16_reference(const uint16_t*, const float*, int64_t, const Packed&, float*, int64_t,
                     int64_t);
void w4ax_reference(const int8_t*, const float*, const int32_t*, int64_t, const Packed&, float*,
                    int64_t, int64_t);
void w4a16_avx2(const uint16_t*, const float*, int64_t, const Packed&, float*, int64_t, int64_t);
void w4ax_avx2(const int8_t*, const float*, const int32_t*, int64_t, const Packed&, float*, int64_t,
               int64_t);
void w4a16_avx512(const uint16_t*, const float*, int64_t, const Packed&, float*, int64_t, int64_t);
void w4ax_avx512(const int8_t*, const float*, const int32_t*, int64_t, const Packed&, float*,
                 int64_t, int64_t);

inline float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even (NaN kept a NaN).
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

}  // namespace tessera::quant::kernels
