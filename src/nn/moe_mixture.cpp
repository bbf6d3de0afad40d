#include "tessera/nn/moe_mixture.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <vector>

#include "tessera/core/error.h"

#ifdef TESSERA_NN_CUDA
#include "moe/permute.h"
#endif

namespace tessera::nn {
namespace {

#ifdef TESSERA_NN_CUDA
void check(cudaError_t err, const char* what) {
  TESSERA_CHECK(err == cudaSuccess, Internal, "MoE layer: CUDA ", what,
                " failed: ", cudaGetErrorString(err));
}

// The device path: kernels/moe's sort, gather and combine.
at::Tensor mixture_cuda(const at::Tensor& x_in, const at::Tensor& top_e, const at::Tensor& top_w,
                        int64_t num_experts, const ExpertFn& expert) {
  const at::Tensor x = x_in.contiguous();
  const int64_t N = x.size(0), H = x.size(1), K = top_e.size(1), A = N * K;
  const auto ints = x.options().dtype(at::kInt);
  const at::Tensor ids = top_e.to(ints).contiguous();
  at::Tensor sorted = at::empty({A}, ints), position = at::empty({A}, ints);
  at::Tensor offsets = at::empty({num_experts + 1}, ints);
  const size_t ws =
      kernels::moe_sort_workspace_bytes(static_cast<int>(A), static_cast<int>(num_experts));
  at::Tensor workspace = at::empty({static_cast<int64_t>(ws)}, x.options().dtype(at::kByte));
  // The legacy default stream (nullptr) orders these launches with
  // LibTorch's own work on the device.
  check(kernels::invoke_moe_sort(ids.data_ptr<int32_t>(), static_cast<int>(A),
                                 static_cast<int>(num_experts), sorted.data_ptr<int32_t>(),
                                 position.data_ptr<int32_t>(), offsets.data_ptr<int32_t>(),
                                 workspace.data_ptr(), ws, nullptr),
        "sort");
  at::Tensor rows = at::empty({A, H}, x.options());
  check(kernels::invoke_moe_gather_rows(x.data_ptr<float>(), sorted.data_ptr<int32_t>(),
                                        static_cast<int>(A), static_cast<int>(K),
                                        static_cast<int>(H), rows.data_ptr<float>(), nullptr),
        "gather");
  const at::Tensor host_offsets = offsets.cpu();
  auto o = host_offsets.accessor<int32_t, 1>();
  at::Tensor expert_out = at::empty({A, H}, x.options());
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t n = o[e + 1] - o[e];
    if (n > 0) expert_out.narrow(0, o[e], n).copy_(expert(e, rows.narrow(0, o[e], n)));
  }
  const at::Tensor weights = top_w.to(x.options()).contiguous();
  at::Tensor out = at::empty({N, H}, x.options());
  check(kernels::invoke_moe_combine(expert_out.data_ptr<float>(), position.data_ptr<int32_t>(),
                                    weights.data_ptr<float>(), static_cast<int>(N),
                                    static_cast<int>(K), static_cast<int>(H), out.data_ptr<float>(),
                                    nullptr),
        "combine");
  return out;
}
#endif  // TESSERA_NN_CUDA

// ATen's stable sort, index_select and index_add (any device, differentiable).
at::Tensor mixture_aten(const at::Tensor& x, const at::Tensor& top_e, const at::Tensor& top_w,
                        int64_t num_experts, const ExpertFn& expert) {
  const int64_t K = top_e.size(1);
  const at::Tensor flat_e = top_e.reshape({-1}).to(at::kLong);
  const at::Tensor order = std::get<1>(flat_e.sort(/*stable=*/true, 0, false));
  const at::Tensor rows = x.index_select(0, order.div(K, "floor"));
  const at::Tensor counts =
      at::zeros({num_experts}, flat_e.options()).index_add_(0, flat_e, at::ones_like(flat_e)).cpu();
  auto c = counts.accessor<int64_t, 1>();
  std::vector<at::Tensor> outs;
  int64_t offset = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    if (c[e] > 0) outs.push_back(expert(e, rows.narrow(0, offset, c[e])));
    offset += c[e];
  }
  const at::Tensor back = outs.empty() ? at::zeros_like(rows) : at::cat(outs, 0);
  const at::Tensor weights =
      top_w.reshape({-1}).to(x.scalar_type()).index_select(0, order).unsqueeze(1);
  return at::zeros_like(x).index_add(0, order.div(K, "floor"), back * weights);
}

}  // namespace

at::Tensor moe_mixture(const at::Tensor& x, const at::Tensor& top_e, const at::Tensor& top_w,
                       int64_t num_experts, const ExpertFn& expert) {
  return translate_errors(
      "moe_mixture",
      [&]() -> at::Tensor {
        TESSERA_CHECK(x.dim() == 2 && top_e.dim() == 2 && top_e.size(0) == x.size(0) &&
                          top_w.sizes() == top_e.sizes() && num_experts >= 1,
                      InvalidArgument,
                      "moe_mixture: expected x [N, H], top_e and top_w [N, k], num_experts >= 1");
        if (top_e.numel() > 0) {
          TESSERA_CHECK(
              top_e.min().item<int64_t>() >= 0 && top_e.max().item<int64_t>() < num_experts,
              InvalidArgument, "moe_mixture: expert ids outside [0, ", num_experts, ")");
        }
#ifdef TESSERA_NN_CUDA
        if (x.is_cuda() && x.scalar_type() == at::kFloat &&
            !(at::GradMode::is_enabled() && (x.requires_grad() || top_w.requires_grad()))) {
          return mixture_cuda(x, top_e, top_w, num_experts, expert);
        }
#endif
        return mixture_aten(x, top_e, top_w, num_experts, expert);
      },
      ErrorCode::kInvalidArgument);
}

}  // namespace tessera::nn
