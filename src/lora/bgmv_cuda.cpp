// Compiled only when nvcc was found (TESSERA_LORA_CUDA).
#include "bgmv_cuda.h"

#include <ATen/ATen.h>

#include "lora/bgmv.h"
#include "tessera/core/error.h"

namespace tessera::lora::detail {

at::Tensor bank_apply_cuda(const at::Tensor& x, const at::Tensor& y, const at::Tensor& a_stack,
                           const at::Tensor& b_stack, const at::Tensor& scale,
                           const at::Tensor& slot) {
  const int64_t B = x.size(0), T = x.size(1), in = x.size(2), out = y.size(2),
                rank = a_stack.size(1);
  const int64_t rows = B * T;
  // Each token row uses its sequence's adapter.
  const at::Tensor index = slot.to(x.device(), at::kInt).repeat_interleave(T).contiguous();
  const at::Tensor xc = x.reshape({rows, in}).contiguous();
  const at::Tensor a = a_stack.contiguous(), b = b_stack.contiguous(), s = scale.contiguous();
  at::Tensor h = at::empty({rows, rank}, x.options());
  at::Tensor result = y.reshape({rows, out}).clone().contiguous();
  // The legacy default stream (nullptr) orders these launches with
  // LibTorch's own work on the device.
  cudaError_t err = kernels::invoke_lora_shrink(
      xc.data_ptr<float>(), a.data_ptr<float>(), index.data_ptr<int32_t>(), static_cast<int>(rows),
      static_cast<int>(in), static_cast<int>(rank), h.data_ptr<float>(), nullptr);
  TESSERA_CHECK(err == cudaSuccess, Internal,
                "AdapterBank: CUDA shrink failed: ", cudaGetErrorString(err));
  err = kernels::invoke_lora_expand(h.data_ptr<float>(), b.data_ptr<float>(),
                                    index.data_ptr<int32_t>(), s.data_ptr<float>(),
                                    static_cast<int>(rows), static_cast<int>(rank),
                                    static_cast<int>(out), result.data_ptr<float>(), nullptr);
  TESSERA_CHECK(err == cudaSuccess, Internal,
                "AdapterBank: CUDA expand failed: ", cudaGetErrorString(err));
  return result.view(y.sizes());
}

}  // namespace tessera::lora::detail
