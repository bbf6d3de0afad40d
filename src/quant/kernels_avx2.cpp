// AVX2 + FMA kernels (compiled with -mavx2 -mfma; called only when the CPU
// has both). Four tokens share each unpacked block of 64 weights.
#include <immintrin.h>

#include <algorithm>

#include "kernels.h"

namespace tessera::quant::kernels {

namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The 64 codes of one block: low nibbles (inputs 0..31), high (32..63).
inline void unpack(const uint8_t* p, __m256i& lo, __m256i& hi) {
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  lo = _mm256_and_si256(v, mask);
  hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
}

// 8 codes (bytes) starting at byte `i` of `v`, as floats minus z.
template <int I>
inline __m256 codes_to_float(__m256i v, __m256 z) {
  __m128i part = I < 2 ? _mm256_castsi256_si128(v) : _mm256_extracti128_si256(v, 1);
  if (I % 2) part = _mm_srli_si128(part, 8);
  return _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(part)), z);
}

template <int MB>
inline void w4a16_rows(const float* xf, int64_t m0, const Packed& w, float* out, int64_t n) {
  const int64_t G = w.K / w.group, K = w.K;
  const uint8_t* row = w.codes + n * (K / 2);
  __m256 acc[MB];
  for (int t = 0; t < MB; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const __m256 z = _mm256_set1_ps(static_cast<float>(w.zeros[n * G + g]));
    __m256 gacc[MB];
    for (int t = 0; t < MB; ++t) gacc[t] = _mm256_setzero_ps();
    for (int64_t k0 = g * w.group; k0 < (g + 1) * w.group; k0 += 64) {
      __m256i lo, hi;
      unpack(row + k0 / 2, lo, hi);
      const __m256 wv[8] = {codes_to_float<0>(lo, z), codes_to_float<1>(lo, z),
                            codes_to_float<2>(lo, z), codes_to_float<3>(lo, z),
                            codes_to_float<0>(hi, z), codes_to_float<1>(hi, z),
                            codes_to_float<2>(hi, z), codes_to_float<3>(hi, z)};
      for (int t = 0; t < MB; ++t) {
        const float* x = xf + (m0 + t) * K + k0;
        for (int c = 0; c < 8; ++c)
          gacc[t] = _mm256_fmadd_ps(wv[c], _mm256_loadu_ps(x + 8 * c), gacc[t]);
      }
    }
    const __m256 s = _mm256_set1_ps(w.scales[n * G + g]);
    for (int t = 0; t < MB; ++t) acc[t] = _mm256_fmadd_ps(gacc[t], s, acc[t]);
  }
  for (int t = 0; t < MB; ++t) out[(m0 + t) * w.N + n] = hsum(acc[t]);
}

template <int MB>
inline void w4ax_rows(const int8_t* xq, const float* xs, const int32_t* xsum, int64_t m0,
                      const Packed& w, float* out, int64_t n) {
  const int64_t G = w.K / w.group, K = w.K;
  const __m256i ones = _mm256_set1_epi16(1);
  const uint8_t* row = w.codes + n * (K / 2);
  __m256 acc[MB];
  for (int t = 0; t < MB; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256i iacc[MB];
    for (int t = 0; t < MB; ++t) iacc[t] = _mm256_setzero_si256();
    for (int64_t k0 = g * w.group; k0 < (g + 1) * w.group; k0 += 64) {
      __m256i lo, hi;
      unpack(row + k0 / 2, lo, hi);
      for (int t = 0; t < MB; ++t) {
        const int8_t* x = xq + (m0 + t) * K + k0;
        const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
        const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32));
        // u8 codes (<= 15) x s8 activations: pair sums stay far from the
        // int16 limits (2 * 15 * 127 per pair, two pairs added).
        const __m256i s16 =
            _mm256_add_epi16(_mm256_maddubs_epi16(lo, x0), _mm256_maddubs_epi16(hi, x1));
        iacc[t] = _mm256_add_epi32(iacc[t], _mm256_madd_epi16(s16, ones));
      }
    }
    const int32_t z = w.zeros[n * G + g];
    const float s = w.scales[n * G + g];
    for (int t = 0; t < MB; ++t) {
      const int64_t mg = (m0 + t) * G + g;
      const __m256i fixed =
          _mm256_sub_epi32(iacc[t], _mm256_setr_epi32(z * xsum[mg], 0, 0, 0, 0, 0, 0, 0));
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(fixed), _mm256_set1_ps(s * xs[mg]), acc[t]);
    }
  }
  for (int t = 0; t < MB; ++t) out[(m0 + t) * w.N + n] = hsum(acc[t]);
}

}  // namespace

// Blocks of four tokens, then the remainder, with the same
// per-output operations (batch-invariant).
void w4a16_avx2(const uint16_t* /*x*/, const float* xf, int64_t M, const Packed& w, float* out,
                int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    for_token_blocks(
        M, [&](auto mb, int64_t m0) { w4a16_rows<decltype(mb)::value>(xf, m0, w, out, n); });
  }
}

void w4ax_avx2(const int8_t* xq, const float* xs, const int32_t* xsum, int64_t M, const Packed& w,
               float* out, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    for_token_blocks(M, [&](auto mb, int64_t m0) {
      w4ax_rows<decltype(mb)::value>(xq, xs, xsum, m0, w, out, n);
    });
  }
}

}  // namespace tessera::quant::kernels
