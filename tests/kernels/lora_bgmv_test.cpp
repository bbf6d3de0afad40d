// kernels/lora/bgmv.cu against the CPU path (ATen batched matmuls, as
// lora::AdapterBank computes it) on random adapters of mixed ranks.
#include "lora/bgmv.h"

#include <ATen/ATen.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

namespace tessera::kernels {
namespace {

bool have_device() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

template <typename T>
T* to_device(const at::Tensor& t) {
  T* p = nullptr;
  EXPECT_EQ(cudaMalloc(&p, std::max<int64_t>(t.numel(), 1) * sizeof(T)), cudaSuccess);
  EXPECT_EQ(cudaMemcpy(p, t.data_ptr(), t.numel() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  return p;
}

TEST(LoraBgmv, MatchesCpuReference) {
  if (!have_device()) GTEST_SKIP() << "no CUDA device";
  for (auto [rows, in, out, adapters] :
       std::vector<std::tuple<int, int, int, int>>{{1, 64, 64, 1}, {37, 576, 192, 5}, {128, 1024, 4096, 16}}) {
    const int rank = 16;
    at::Tensor x = at::randn({rows, in});
    at::Tensor a = at::randn({adapters, rank, in}) * 0.1;
    at::Tensor b = at::randn({adapters, out, rank}) * 0.1;
    // Mixed ranks: adapter k uses only its first 4 << (k % 3) rank rows.
    for (int k = 0; k < adapters; ++k) {
      int r = 4 << (k % 3);
      a[k].narrow(0, r, rank - r).zero_();
      b[k].narrow(1, r, rank - r).zero_();
    }
    at::Tensor scale = at::rand({adapters}) + 0.5;
    at::Tensor index = at::randint(-1, adapters, {rows}, at::kInt);
    at::Tensor y0 = at::randn({rows, out});
    // CPU reference.
    at::Tensor slot = index.to(at::kLong).clamp_min(0);
    at::Tensor on = (index >= 0).to(at::kFloat).unsqueeze(1);
    at::Tensor h_ref = at::bmm(x.unsqueeze(1), a.index_select(0, slot).transpose(1, 2)).squeeze(1) * on;
    at::Tensor y_ref = y0 + at::bmm(h_ref.unsqueeze(1), b.index_select(0, slot).transpose(1, 2)).squeeze(1) *
                                scale.index_select(0, slot).unsqueeze(1) * on;
    float *dx = to_device<float>(x), *da = to_device<float>(a), *db = to_device<float>(b),
          *ds = to_device<float>(scale), *dy = to_device<float>(y0), *dh = nullptr;
    int32_t* di = to_device<int32_t>(index);
    ASSERT_EQ(cudaMalloc(&dh, rows * rank * sizeof(float)), cudaSuccess);
    ASSERT_EQ(invoke_lora_shrink(dx, da, di, rows, in, rank, dh, nullptr), cudaSuccess);
    ASSERT_EQ(invoke_lora_expand(dh, db, di, ds, rows, rank, out, dy, nullptr), cudaSuccess);
    at::Tensor h = at::empty({rows, rank}), y = at::empty({rows, out});
    ASSERT_EQ(cudaMemcpy(h.data_ptr(), dh, h.numel() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(y.data_ptr(), dy, y.numel() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
    EXPECT_TRUE(at::allclose(h, h_ref, 1e-4, 1e-4));
    EXPECT_TRUE(at::allclose(y, y_ref, 1e-4, 1e-4));
    for (void* p : {(void*)dx, (void*)da, (void*)db, (void*)ds, (void*)dy, (void*)dh, (void*)di}) cudaFree(p);
  }
}

TEST(LoraBgmv, BadSizesAreRejected) {
  EXPECT_EQ(invoke_lora_shrink(nullptr, nullptr, nullptr, 4, 0, 8, nullptr, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(invoke_lora_expand(nullptr, nullptr, nullptr, nullptr, -1, 8, 8, nullptr, nullptr),
            cudaErrorInvalidValue);
}

}  // namespace
}  // namespace tessera::kernels
