// Portable reference kernels: the definition of every quantized product.
#include "kernels.h"

namespace tessera::quant::kernels {

namespace {
// Code of input k of row `row` (packed as documented in quant.h).
inline int code_at(const uint8_t* row, int64_t k) {
  const int64_t block = k / 64, j = k % 64;
  const uint8_t byte = row[block * 32 + (j % 32)];
  return j < 32 ? (byte & 0x0F) : (byte >> 4);
}
}  // namespace

void w4a16_reference(const uint16_t* /*x*/, const float* xf, int64_t M, const Packed& w, float* out,
                     int64_t n0, int64_t n1) {
  const int64_t G = w.K / w.group;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.codes + n * (w.K / 2);
    for (int64_t m = 0; m < M; ++m) {
      const float* x = xf + m * w.K;
      float acc = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        const int z = w.zeros[n * G + g];
        float gsum = 0.f;
        for (int64_t k = g * w.group; k < (g + 1) * w.group; ++k) {
          gsum += x[k] * static_cast<float>(code_at(row, k) - z);
        }
        acc += w.scales[n * G + g] * gsum;
      }
      out[m * w.N + n] = acc;
    }
  }
}

void w4ax_reference(const int8_t* xq, const float* xs, const int32_t* xsum, int64_t M,
                    const Packed& w, float* out, int64_t n0, int64_t n1) {
  const int64_t G = w.K / w.group;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.codes + n * (w.K / 2);
    for (int64_t m = 0; m < M; ++m) {
      const int8_t* x = xq + m * w.K;
      float acc = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        int32_t dot = 0;
        for (int64_t k = g * w.group; k < (g + 1) * w.group; ++k) dot += code_at(row, k) * x[k];
        dot -= static_cast<int32_t>(w.zeros[n * G + g]) * xsum[m * G + g];
        acc += w.scales[n * G + g] * xs[m * G + g] * static_cast<float>(dot);
      }
      out[m * w.N + n] = acc;
    }
  }
}

}  // namespace tessera::quant::kernels
