// kernels/quant/w4.h — int4-weight GEMM on CUDA, the two modes of
// tessera::quant (see include/tessera/quant/quant.h for the packing).
//
// Shapes (row-major, device memory):
//   codes   [N x K/2] uint8   two 4-bit codes per byte; in each block of 64
//                             inputs byte j holds input j (low nibble) and
//                             input j + 32 (high nibble)
//   scales  [N x K/group] float,  zeros [N x K/group] uint8
//   out     [M x N] float     out[m, n] = sum_k x[m, k] * scales * (code - zero)
// W4A16: x [M x K] bf16 bit patterns. W4Ax (W4A8 / W4A4): xq [M x K] int8
// codes with per-(token, group) scales xs [M x K/group]; products in int32
// (DP4A), rescaled per group.
// K and group must be multiples of 64 with group dividing K; launchers never
// allocate and return the first CUDA error (cudaErrorInvalidValue for bad
// sizes).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace tessera::kernels {

cudaError_t invoke_w4a16_gemm(const uint16_t* x, int M, const uint8_t* codes, const float* scales,
                              const uint8_t* zeros, int N, int K, int group, float* out,
                              cudaStream_t stream);

cudaError_t invoke_w4ax_gemm(const int8_t* xq, const float* xs, int M, const uint8_t* codes,
                             const float* scales, const uint8_t* zeros, int N, int K, int group,
                             float* out, cudaStream_t stream);

}  // namespace tessera::kernels
