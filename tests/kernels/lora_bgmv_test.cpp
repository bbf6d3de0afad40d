// kernels/lora/bgmv.cu against a plain CPU reference (the arithmetic of
// lora::AdapterBank's gathered path) on random adapters of mixed ranks.
#include "lora/bgmv.h"

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <tuple>
#include <vector>

namespace tessera::kernels {
namespace {

bool have_device() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

template <typename T>
T* to_device(const std::vector<T>& v) {
  T* p = nullptr;
  EXPECT_EQ(cudaMalloc(&p, std::max<size_t>(v.size(), 1) * sizeof(T)), cudaSuccess);
  EXPECT_EQ(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  return p;
}

TEST(LoraBgmv, MatchesCpuReference) {
  if (!have_device()) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  for (auto [rows, in, out, adapters] : std::vector<std::tuple<int, int, int, int>>{
           {1, 64, 64, 1}, {37, 576, 192, 5}, {128, 1024, 4096, 16}}) {
    const int rank = 16;
    std::vector<float> x(size_t(rows) * in), a(size_t(adapters) * rank * in),
        b(size_t(adapters) * out * rank), scale(adapters), y0(size_t(rows) * out);
    for (auto& v : x) v = normal(rng);
    for (auto& v : y0) v = normal(rng);
    for (auto& v : scale) v = 0.5f + std::uniform_real_distribution<float>()(rng);
    // Mixed ranks: adapter k uses only its first 4 << (k % 3) rank rows.
    for (int k = 0; k < adapters; ++k) {
      int r = 4 << (k % 3);
      for (int j = 0; j < rank; ++j) {
        for (int i = 0; i < in; ++i)
          a[(size_t(k) * rank + j) * in + i] = j < r ? 0.1f * normal(rng) : 0.f;
        for (int o = 0; o < out; ++o)
          b[(size_t(k) * out + o) * rank + j] = j < r ? 0.1f * normal(rng) : 0.f;
      }
    }
    std::vector<int32_t> index(rows);
    for (auto& v : index) v = static_cast<int32_t>(rng() % (adapters + 1)) - 1;  // -1: none
    // CPU reference, in double.
    std::vector<float> h_ref(size_t(rows) * rank, 0.f), y_ref = y0;
    for (int r = 0; r < rows; ++r) {
      int k = index[r];
      if (k < 0) continue;
      for (int j = 0; j < rank; ++j) {
        double acc = 0;
        for (int i = 0; i < in; ++i)
          acc += double(x[size_t(r) * in + i]) * a[(size_t(k) * rank + j) * in + i];
        h_ref[size_t(r) * rank + j] = float(acc);
      }
      for (int o = 0; o < out; ++o) {
        double acc = 0;
        for (int j = 0; j < rank; ++j)
          acc += double(h_ref[size_t(r) * rank + j]) * b[(size_t(k) * out + o) * rank + j];
        y_ref[size_t(r) * out + o] += float(scale[k] * acc);
      }
    }
    float *dx = to_device(x), *da = to_device(a), *db = to_device(b), *ds = to_device(scale),
          *dy = to_device(y0), *dh = nullptr;
    int32_t* di = to_device(index);
    ASSERT_EQ(cudaMalloc(&dh, size_t(rows) * rank * sizeof(float)), cudaSuccess);
    ASSERT_EQ(invoke_lora_shrink(dx, da, di, rows, in, rank, dh, nullptr), cudaSuccess);
    ASSERT_EQ(invoke_lora_expand(dh, db, di, ds, rows, rank, out, dy, nullptr), cudaSuccess);
    std::vector<float> h(h_ref.size()), y(y_ref.size());
    ASSERT_EQ(cudaMemcpy(h.data(), dh, h.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(y.data(), dy, y.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
    for (size_t i = 0; i < h.size(); ++i)
      ASSERT_NEAR(h[i], h_ref[i], 1e-4f * (1 + std::abs(h_ref[i]))) << i;
    for (size_t i = 0; i < y.size(); ++i)
      ASSERT_NEAR(y[i], y_ref[i], 1e-4f * (1 + std::abs(y_ref[i]))) << i;
    for (void* p : {(void*)dx, (void*)da, (void*)db, (void*)ds, (void*)dy, (void*)dh, (void*)di})
      cudaFree(p);
  }
}

TEST(LoraBgmv, BadSizesAreRejected) {
  EXPECT_EQ(invoke_lora_shrink(nullptr, nullptr, nullptr, 4, 0, 8, nullptr, nullptr),
            cudaErrorInvalidValue);
  EXPECT_EQ(invoke_lora_expand(nullptr, nullptr, nullptr, nullptr, -1, 8, 8, nullptr, nullptr),
            cudaErrorInvalidValue);
}

}  // namespace
}  // namespace tessera::kernels
