// AVX-512 kernels (compiled with -mavx512f -mavx512bw -mavx512vl
// -mavx512vnni -mavx512bf16; called only when the CPU has all of them):
// VPDPBUSD for the integer modes, VDPBF16PS for W4A16. Four tokens share
// each unpacked block of 64 weights.
#include <immintrin.h>

#include <algorithm>

#include "kernels.h"

namespace tessera::quant::kernels {

namespace {

constexpr int kTokens = 4;

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

}  // namespace

void w4a16_avx512(const uint16_t* x, const float* /*xf*/, int64_t M, const Packed& w, float* out,
                  int64_t n0, int64_t n1) {
  const int64_t G = w.K / w.group, K = w.K;
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const Bf16Tables& tab = tables();
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.codes + n * (K / 2);
    for (int64_t m0 = 0; m0 < M; m0 += kTokens) {
      const int mb = static_cast<int>(std::min<int64_t>(kTokens, M - m0));
      __m512 acc[kTokens];
      for (int t = 0; t < kTokens; ++t) acc[t] = _mm512_setzero_ps();
      for (int64_t g = 0; g < G; ++g) {
        const __m512i table = _mm512_load_si512(tab.t[w.zeros[n * G + g]]);
        __m512 gacc[kTokens];
        for (int t = 0; t < kTokens; ++t) gacc[t] = _mm512_setzero_ps();
        for (int64_t k0 = g * w.group; k0 < (g + 1) * w.group; k0 += 64) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k0 / 2));
          const __m256i lo = _mm256_and_si256(v, mask);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
          // (code - z) as bf16, exact: inputs 0..31 and 32..63.
          const __m512i w0 = _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(lo), table);
          const __m512i w1 = _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(hi), table);
          for (int t = 0; t < mb; ++t) {
            const uint16_t* xr = x + (m0 + t) * K + k0;
            const __m512i x0 = _mm512_loadu_si512(xr);
            const __m512i x1 = _mm512_loadu_si512(xr + 32);
            gacc[t] = _mm512_dpbf16_ps(gacc[t], (__m512bh)w0, (__m512bh)x0);
            gacc[t] = _mm512_dpbf16_ps(gacc[t], (__m512bh)w1, (__m512bh)x1);
          }
        }
        const __m512 s = _mm512_set1_ps(w.scales[n * G + g]);
        for (int t = 0; t < mb; ++t) acc[t] = _mm512_fmadd_ps(gacc[t], s, acc[t]);
      }
      for (int t = 0; t < mb; ++t) out[(m0 + t) * w.N + n] = _mm512_reduce_add_ps(acc[t]);
    }
  }
}

void w4ax_avx512(const int8_t* xq, const float* xs, const int32_t* xsum, int64_t M,
                 const Packed& w, float* out, int64_t n0, int64_t n1) {
  const int64_t G = w.K / w.group, K = w.K;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.codes + n * (K / 2);
    for (int64_t m0 = 0; m0 < M; m0 += kTokens) {
      const int mb = static_cast<int>(std::min<int64_t>(kTokens, M - m0));
      __m512 acc[kTokens];
      for (int t = 0; t < kTokens; ++t) acc[t] = _mm512_setzero_ps();
      for (int64_t g = 0; g < G; ++g) {
        __m512i iacc[kTokens];
        for (int t = 0; t < kTokens; ++t) iacc[t] = _mm512_setzero_si512();
        for (int64_t k0 = g * w.group; k0 < (g + 1) * w.group; k0 += 64) {
          const __m512i wv = unpack64(row + k0 / 2);
          for (int t = 0; t < mb; ++t) {
            const __m512i xv = _mm512_loadu_si512(xq + (m0 + t) * K + k0);
            iacc[t] = _mm512_dpbusd_epi32(iacc[t], wv, xv);  // u8 codes x s8 activations
          }
        }
        const int32_t z = w.zeros[n * G + g];
        const float s = w.scales[n * G + g];
        for (int t = 0; t < mb; ++t) {
          const int64_t mg = (m0 + t) * G + g;
          const __m512i fixed = _mm512_mask_sub_epi32(iacc[t], 1, iacc[t], _mm512_set1_epi32(z * xsum[mg]));
          acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(fixed), _mm512_set1_ps(s * xs[mg]), acc[t]);
        }
      }
      for (int t = 0; t < mb; ++t) out[(m0 + t) * w.N + n] = _mm512_reduce_add_ps(acc[t]);
    }
  }
}

}  // namespace tessera::quant::kernels
