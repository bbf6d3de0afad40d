// The mixed-adapter forward of AdapterBank on a CUDA device, through the
// gathered shrink/expand kernels of kernels/lora (private to lora; built
// with TESSERA_LORA_CUDA only).
#pragma once

#include <ATen/core/Tensor.h>

namespace tessera::lora::detail {

// y + scale[slot] · (x A[slot]ᵀ) B[slot]ᵀ per sequence, float32 on a CUDA
// device: x [B, T, in], y [B, T, out], a_stack [S, r, in], b_stack
// [S, out, r], scale [S], slot [B] (adapter stack index of each sequence).
// Not differentiable (serving). Internal error naming the kernel on a
// CUDA failure.
at::Tensor bank_apply_cuda(const at::Tensor& x, const at::Tensor& y, const at::Tensor& a_stack,
                           const at::Tensor& b_stack, const at::Tensor& scale,
                           const at::Tensor& slot);

}  // namespace tessera::lora::detail
