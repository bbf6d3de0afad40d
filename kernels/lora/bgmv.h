// kernels/lora/bgmv.h — gathered LoRA shrink/expand (BGMV) on CUDA.
//
// A batch whose rows use different adapters: each row picks its adapter's
// A and B by index, in one launch for all rows (Punica's BGMV). Adapters of
// different ranks share one stack, zero-padded to the largest rank.
//
// Shapes (row-major, device memory, float32):
//   x        [rows x in]                 input rows
//   a_stack  [adapters x rank x in]      A of every adapter
//   b_stack  [adapters x out x rank]     B of every adapter
//   index    [rows] int32                adapter of each row; < 0: none
//   scale    [adapters]                  alpha / r per adapter
//   h        [rows x rank]               shrink output
//   y        [rows x out]                expand adds into y
// Launchers never allocate and return the first CUDA error
// (cudaErrorInvalidValue for bad sizes).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace tessera::kernels {

// h[r, :] = x[r, :] · a_stack[index[r]]ᵀ   (zero where index[r] < 0)
cudaError_t invoke_lora_shrink(const float* x, const float* a_stack, const int32_t* index, int rows,
                               int in, int rank, float* h, cudaStream_t stream);

// y[r, :] += scale[index[r]] · h[r, :] · b_stack[index[r]]ᵀ
cudaError_t invoke_lora_expand(const float* h, const float* b_stack, const int32_t* index,
                               const float* scale, int rows, int rank, int out, float* y,
                               cudaStream_t stream);

}  // namespace tessera::kernels
