// nn: the batch-invariant linear kernels, every one this CPU runs (not only
// the one linear_fixed picks): close to ATen's matmul, and the same bits for
// a row whatever rows and output range run with it.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cstring>

#include "../../src/nn/invariant_ops.h"

namespace tessera::nn::detail {
namespace {

TEST(InvariantLinear, EveryKernelIsExactAndBatchInvariant) {
  at::manual_seed(3);
  const auto kernels = linear_kernels();
  ASSERT_FALSE(kernels.empty());
  EXPECT_STREQ(kernels.back().name, "generic");
  // K not a multiple of 8 or 16 (the masked tail), M and N not multiples of
  // the tile sizes.
  for (const auto [M, N, K] :
       {std::tuple<int64_t, int64_t, int64_t>{7, 13, 83}, {1, 4, 16}, {5, 9, 7}, {9, 6, 200}}) {
    const at::Tensor x = at::randn({M, K});
    const at::Tensor w = at::randn({N, K});
    const at::Tensor expect = at::matmul(x.to(at::kDouble), w.to(at::kDouble).t());
    for (const NamedLinearKernel& k : kernels) {
      SCOPED_TRACE(std::string(k.name) + " M=" + std::to_string(M) + " N=" + std::to_string(N) +
                   " K=" + std::to_string(K));
      at::Tensor all = at::full({M, N}, -7.f);
      k.fn(x.data_ptr<float>(), M, w.data_ptr<float>(), N, K, all.data_ptr<float>(), 0, N);
      EXPECT_TRUE(at::allclose(all.to(at::kDouble), expect, 1e-4, 1e-4))
          << (all.to(at::kDouble) - expect).abs().max().item<double>();
      // Row by row, and the outputs in two ranges: the same bits.
      at::Tensor split = at::full({M, N}, -7.f);
      const int64_t cut = N / 2;
      for (int64_t m = 0; m < M; ++m) {
        const float* row = x.data_ptr<float>() + m * K;
        float* out = split.data_ptr<float>() + m * N;
        k.fn(row, 1, w.data_ptr<float>(), N, K, out, 0, cut);
        k.fn(row, 1, w.data_ptr<float>(), N, K, out, cut, N);
      }
      EXPECT_EQ(std::memcmp(all.data_ptr<float>(), split.data_ptr<float>(), M * N * sizeof(float)),
                0);
    }
  }
}

}  // namespace
}  // namespace tessera::nn::detail
