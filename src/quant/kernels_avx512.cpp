// AVX-512 kernels (compiled with -mavx512f -mavx512bw -mavx512vl
// -mavx512vnni -mavx512bf16; called only when the CPU has all of them):
// VPDPBUSD for the integer modes, VDPBF16PS for W4A16. Four tokens share
// each unpacked block of 64 weights.
#include <immintrin.h>

#include <algorithm>

#include "kernels.h"

namespace tessera::quant::kernels {

namespace {

// The 64 codes of one block in input order (u8 lanes).
inline __m512i unpack64(const uint8_t* p) {
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i lo = _mm256_and_si256(v, mask);
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
  return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

// Per zero point z: the bf16 bit patterns of (i - z) for codes i = 0..15,
// as a 32-entry table for VPERMW (entries 16..31 unused).
struct Bf16Tables {
  alignas(64) uint16_t t[16][32];
  Bf16Tables() {
    for (int z = 0; z < 16; ++z) {
      for (int i = 0; i < 32; ++i) t[z][i] = float_to_bf16(static_cast<float>((i & 15) - z));
    }
  }
};
const Bf16Tables& tables() {
  static const Bf16Tables kTables;  // immutable after construction
  return kTables;
}

// One output row n for MB tokens starting at m0 (MB known at compile time so
// the accumulators stay in registers). Every output's operations are the
// same whatever MB is: batch-invariant.
template <int MB>
inline void w4a16_rows(const uint16_t* x, int64_t m0, const Packed& w, float* out, int64_t n,
                       const Bf16Tables& tab) {
  const int64_t G = w.K / w.group, K = w.K;
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const uint8_t* row = w.codes + n * (K / 2);
  __m512 acc[MB];
  for (int t = 0; t < MB; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const __m512i table = _mm512_load_si512(tab.t[w.zeros[n * G + g]]);
    __m512 gacc[MB];
    for (int t = 0; t < MB; ++t) gacc[t] = _mm512_setzero_ps();
    for (int64_t k0 = g * w.group; k0 < (g + 1) * w.group; k0 += 64) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k0 / 2));
      const __m256i lo = _mm256_and_si256(v, mask);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
      // (code - z) as bf16, exact: inputs 0..31 and 32..63.
      const __m512i w0 = _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(lo), table);
      const __m512i w1 = _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(hi), table);
      for (int t = 0; t < MB; ++t) {
        const uint16_t* xr = x + (m0 + t) * K + k0;
        gacc[t] = _mm512_dpbf16_ps(gacc[t], (__m512bh)w0, (__m512bh)_mm512_loadu_si512(xr));
        gacc[t] = _mm512_dpbf16_ps(gacc[t], (__m512bh)w1, (__m512bh)_mm512_loadu_si512(xr + 32));
      }
    }
    const __m512 s = _mm512_set1_ps(w.scales[n * G + g]);
    for (int t = 0; t < MB; ++t) acc[t] = _mm512_fmadd_ps(gacc[t], s, acc[t]);
  }
  for (int t = 0; t < MB; ++t) out[(m0 + t) * w.N + n] = _mm512_reduce_add_ps(acc[t]);
}

template <int MB>
inline void w4ax_rows(const int8_t* xq, const float* xs, const int32_t* xsum, int64_t m0,
                      const Packed& w, float* out, int64_t n) {
  const int64_t G = w.K / w.group, K = w.K;
  const uint8_t* row = w.codes + n * (K / 2);
  __m512 acc[MB];
  for (int t = 0; t < MB; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512i iacc[MB];
    for (int t = 0; t < MB; ++t) iacc[t] = _mm512_setzero_si512();
    for (int64_t k0 = g * w.group; k0 < (g + 1) * w.group; k0 += 64) {
      const __m512i wv = unpack64(row + k0 / 2);
      for (int t = 0; t < MB; ++t) {
        const __m512i xv = _mm512_loadu_si512(xq + (m0 + t) * K + k0);
        iacc[t] = _mm512_dpbusd_epi32(iacc[t], wv, xv);  // u8 codes x s8 activations
      }
    }
    const int32_t z = w.zeros[n * G + g];
    const float s = w.scales[n * G + g];
    for (int t = 0; t < MB; ++t) {
      const int64_t mg = (m0 + t) * G + g;
      // Zero point: subtract z * sum(x codes) from lane 0, in integers.
      const __m512i fixed =
          _mm512_mask_sub_epi32(iacc[t], 1, iacc[t], _mm512_set1_epi32(z * xsum[mg]));
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(fixed), _mm512_set1_ps(s * xs[mg]), acc[t]);
    }
  }
  for (int t = 0; t < MB; ++t) out[(m0 + t) * w.N + n] = _mm512_reduce_add_ps(acc[t]);
}

}  // namespace

void w4a16_avx512(const uint16_t* x, const float* /*xf*/, int64_t M, const Packed& w, float* out,
                  int64_t n0, int64_t n1) {
  const Bf16Tables& tab = tables();
  for (int64_t n = n0; n < n1; ++n) {
    for_token_blocks(
        M, [&](auto mb, int64_t m0) { w4a16_rows<decltype(mb)::value>(x, m0, w, out, n, tab); });
  }
}

void w4ax_avx512(const int8_t* xq, const float* xs, const int32_t* xsum, int64_t M, const Packed& w,
                 float* out, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    for_token_blocks(M, [&](auto mb, int64_t m0) {
      w4ax_rows<decltype(mb)::value>(xq, xs, xsum, m0, w, out, n);
    });
  }
}

}  // namespace tessera::quant::kernels
