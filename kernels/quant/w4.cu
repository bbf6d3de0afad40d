// One warp per output (token m, feature n): lanes walk the row's packed
// codes four bytes (eight inputs) at a time, accumulate, and reduce with
// warp shuffles. W4A16 multiplies bf16 activations by (code - zero) and the
// group scale in fp32; W4Ax forms integer dot products with DP4A and
// rescales them per group.
#include "quant/w4.h"

#include <cuda_bf16.h>

namespace tessera::kernels {

namespace {

constexpr int kWarps = 4;  // output features per block

__device__ inline float warp_sum(float v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

__device__ inline float bf16_bits_to_float(uint16_t b) {
  return __uint_as_float(static_cast<uint32_t>(b) << 16);
}

__global__ void w4a16_kernel(const uint16_t* __restrict__ x, const uint8_t* __restrict__ codes,
                             const float* __restrict__ scales, const uint8_t* __restrict__ zeros,
                             int N, int K, int group, float* __restrict__ out) {
  const int lane = threadIdx.x % 32;
  const int n = blockIdx.x * kWarps + threadIdx.x / 32;
  const int m = blockIdx.y;
  if (n >= N) return;
  const int G = K / group;
  const uint8_t* row = codes + static_cast<size_t>(n) * (K / 2);
  const uint16_t* xr = x + static_cast<size_t>(m) * K;
  float acc = 0.f;
  for (int b = lane * 4; b < K / 2; b += 32 * 4) {
    const uint32_t four = *reinterpret_cast<const uint32_t*>(row + b);
    const int block = b / 32, j = b % 32;
    const int e0 = block * 64 + j;  // inputs e0..e0+3 (low nibbles), e0+32.. (high)
    const int g = e0 / group;
    const float s = scales[static_cast<size_t>(n) * G + g];
    const float z = static_cast<float>(zeros[static_cast<size_t>(n) * G + g]);
    float part = 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t byte = (four >> (8 * i)) & 0xffu;
      part += bf16_bits_to_float(xr[e0 + i]) * (static_cast<float>(byte & 0xfu) - z);
      part += bf16_bits_to_float(xr[e0 + 32 + i]) * (static_cast<float>(byte >> 4) - z);
    }
    acc += s * part;
  }
  acc = warp_sum(acc);
  if (lane == 0) out[static_cast<size_t>(m) * N + n] = acc;
}

__global__ void w4ax_kernel(const int8_t* __restrict__ xq, const float* __restrict__ xs,
                            const uint8_t* __restrict__ codes, const float* __restrict__ scales,
                            const uint8_t* __restrict__ zeros, int N, int K, int group,
                            float* __restrict__ out) {
  const int lane = threadIdx.x % 32;
  const int n = blockIdx.x * kWarps + threadIdx.x / 32;
  const int m = blockIdx.y;
  if (n >= N) return;
  const int G = K / group;
  const uint8_t* row = codes + static_cast<size_t>(n) * (K / 2);
  const int8_t* xr = xq + static_cast<size_t>(m) * K;
  float acc = 0.f;
  for (int b = lane * 4; b < K / 2; b += 32 * 4) {
    const uint32_t four = *reinterpret_cast<const uint32_t*>(row + b);
    const int block = b / 32, j = b % 32;
    const int e0 = block * 64 + j;
    const int g = e0 / group;
    // Low nibbles are inputs e0..e0+3, high nibbles e0+32..e0+35; codes
    // 0..15 are valid signed bytes for DP4A.
    const int lo = static_cast<int>(four & 0x0f0f0f0fu);
    const int hi = static_cast<int>((four >> 4) & 0x0f0f0f0fu);
    const int x_lo = *reinterpret_cast<const int*>(xr + e0);
    const int x_hi = *reinterpret_cast<const int*>(xr + e0 + 32);
    int dot = __dp4a(lo, x_lo, 0);
    dot = __dp4a(hi, x_hi, dot);
    const int xsum = __dp4a(0x01010101, x_lo, __dp4a(0x01010101, x_hi, 0));
    dot -= static_cast<int>(zeros[static_cast<size_t>(n) * G + g]) * xsum;
    acc += scales[static_cast<size_t>(n) * G + g] * xs[static_cast<size_t>(m) * G + g] *
           static_cast<float>(dot);
  }
  acc = warp_sum(acc);
  if (lane == 0) out[static_cast<size_t>(m) * N + n] = acc;
}

bool valid(int M, int N, int K, int group) {
  return M >= 0 && N >= 0 && K > 0 && group > 0 && group % 64 == 0 && K % group == 0;
}

}  // namespace

cudaError_t invoke_w4a16_gemm(const uint16_t* x, int M, const uint8_t* codes, const float* scales,
                              const uint8_t* zeros, int N, int K, int group, float* out,
                              cudaStream_t stream) {
  if (!valid(M, N, K, group)) return cudaErrorInvalidValue;
  if (M == 0 || N == 0) return cudaSuccess;
  dim3 grid((N + kWarps - 1) / kWarps, M);
  w4a16_kernel<<<grid, 32 * kWarps, 0, stream>>>(x, codes, scales, zeros, N, K, group, out);
  return cudaGetLastError();
}

cudaError_t invoke_w4ax_gemm(const int8_t* xq, const float* xs, int M, const uint8_t* codes,
                             const float* scales, const uint8_t* zeros, int N, int K, int group,
                             float* out, cudaStream_t stream) {
  if (!valid(M, N, K, group)) return cudaErrorInvalidValue;
  if (M == 0 || N == 0) return cudaSuccess;
  dim3 grid((N + kWarps - 1) / kWarps, M);
  w4ax_kernel<<<grid, 32 * kWarps, 0, stream>>>(xq, xs, codes, scales, zeros, N, K, group, out);
  return cudaGetLastError();
}

}  // namespace tessera::kernels
