// tessera/nn/moe_mixture.h — the routed-expert mixture of one MoE layer.
//
// Top-k routing gives every token k (expert, weight) assignments. The
// mixture sorts the assignments by expert (stable: token order within an
// expert), runs each expert once on its contiguous rows, and combines the
// results per token with the routing weights:
//   out[t] = sum_j top_w[t, j] * expert(top_e[t, j], x[t])
// On a CUDA device (float32, no autograd) the sort, gather and combine are
// the kernels of kernels/moe when this build has them; elsewhere ATen's
// stable sort, index_select and index_add (differentiable). The
// Transformer's MoE layers use it for tokens on a CUDA device.
//
//   at::Tensor y = tessera::nn::moe_mixture(x, top_e, top_w, /*num_experts=*/8,
//       [&](int64_t e, const at::Tensor& rows) { return experts[e](rows); });
//
// Thread-compatible (no state).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>

namespace tessera::nn {

// An expert applied to its rows [n, H] -> [n, H].
using ExpertFn = std::function<at::Tensor(int64_t expert, const at::Tensor& rows)>;

// x [N, H]; top_e [N, k] int64 (or int32) expert ids in [0, num_experts);
// top_w [N, k] weights. Returns [N, H]. InvalidArgument for mismatched
// shapes or ids out of range.
at::Tensor moe_mixture(const at::Tensor& x, const at::Tensor& top_e, const at::Tensor& top_w,
                       int64_t num_experts, const ExpertFn& expert);

}  // namespace tessera::nn
