// kernels/quant/w4.cu against tessera::quant's CPU reference kernels on
// random and ragged shapes, both modes, symmetric and asymmetric groups.
#include "quant/w4.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <array>
#include <vector>

#include "tessera/quant/quant.h"

namespace tessera::kernels {
namespace {

bool have_device() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

template <typename T>
T* to_device(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  T* p = nullptr;
  EXPECT_EQ(cudaMalloc(&p, std::max<size_t>(c.nbytes(), 1)), cudaSuccess);
  EXPECT_EQ(cudaMemcpy(p, c.data_ptr(), c.nbytes(), cudaMemcpyHostToDevice), cudaSuccess);
  return p;
}

at::Tensor from_device(const float* p, int64_t rows, int64_t cols) {
  at::Tensor out = at::empty({rows, cols}, at::kFloat);
  EXPECT_EQ(cudaMemcpy(out.data_ptr(), p, out.nbytes(), cudaMemcpyDeviceToHost), cudaSuccess);
  return out;
}

TEST(QuantW4, BothModesMatchTheCpuReference) {
  if (!have_device()) GTEST_SKIP() << "no CUDA device";
  auto gen = at::make_generator<at::CPUGeneratorImpl>(5);
  const std::vector<std::array<int64_t, 4>> shapes = {{1, 1, 64, 64},
                                                      {3, 37, 192, 64},
                                                      {16, 576, 576, 64},
                                                      {33, 1536, 576, 64},
                                                      {7, 130, 1024, 128}};
  for (const auto& [M, N, K, group] : shapes) {
    for (bool symmetric : {true, false}) {
      quant::QuantizedWeight w = quant::quantize(at::randn({N, K}, gen) * 0.05, {group, symmetric});
      at::Tensor x = at::randn({M, K}, gen);
      uint8_t* codes = to_device<uint8_t>(w.codes);
      float* scales = to_device<float>(w.scales);
      uint8_t* zeros = to_device<uint8_t>(w.zeros);
      float* out = nullptr;
      ASSERT_EQ(cudaMalloc(&out, M * N * sizeof(float)), cudaSuccess);
      // W4A16.
      at::Tensor xb = x.to(at::kBFloat16).contiguous();
      uint16_t* xdev = to_device<uint16_t>(xb);
      ASSERT_EQ(invoke_w4a16_gemm(xdev, M, codes, scales, zeros, N, K, group, out, nullptr),
                cudaSuccess);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      at::Tensor want = quant::linear(x, w, quant::Mode::kW4A16, quant::Isa::kReference);
      at::Tensor tol = at::matmul(x.abs(), quant::dequantize(w).abs().t()) * 1e-5 + 1e-6;
      EXPECT_TRUE(((from_device(out, M, N) - want).abs() <= tol).all().item<bool>())
          << "w4a16 M" << M << " N" << N << " K" << K;
      // W4A8 and W4A4.
      for (quant::Mode mode : {quant::Mode::kW4A8, quant::Mode::kW4A4}) {
        quant::QuantizedActivations qa = quant::quantize_activations(x, group, mode);
        int8_t* xq = to_device<int8_t>(qa.codes);
        float* xs = to_device<float>(qa.scales);
        ASSERT_EQ(invoke_w4ax_gemm(xq, xs, M, codes, scales, zeros, N, K, group, out, nullptr),
                  cudaSuccess);
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        at::Tensor ref = quant::linear(x, w, mode, quant::Isa::kReference);
        EXPECT_TRUE(((from_device(out, M, N) - ref).abs() <= tol).all().item<bool>())
            << quant::mode_name(mode) << " M" << M << " N" << N << " K" << K;
        cudaFree(xq);
        cudaFree(xs);
      }
      cudaFree(xdev);
      cudaFree(codes);
      cudaFree(scales);
      cudaFree(zeros);
      cudaFree(out);
    }
  }
}

TEST(QuantW4, BadSizesAreRefused) {
  EXPECT_EQ(invoke_w4a16_gemm(nullptr, 1, nullptr, nullptr, nullptr, 4, 100, 64, nullptr, nullptr),
            cudaErrorInvalidValue);
  EXPECT_EQ(invoke_w4ax_gemm(nullptr, nullptr, 1, nullptr, nullptr, nullptr, 4, 128, 48, nullptr,
                             nullptr),
            cudaErrorInvalidValue);
}

}  // namespace
}  // namespace tessera::kernels
