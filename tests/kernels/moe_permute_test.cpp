// kernels/moe/permute.cu against a plain CPU reference, on random routings
// of ragged sizes. Needs a CUDA device; skipped (not failed) without one.
#include "moe/permute.h"

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <vector>

namespace tessera::kernels {
namespace {

bool have_device() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

template <typename T>
struct DeviceBuffer {
  T* ptr = nullptr;
  explicit DeviceBuffer(size_t n) {
    EXPECT_EQ(cudaMalloc(&ptr, std::max<size_t>(n, 1) * sizeof(T)), cudaSuccess);
  }
  ~DeviceBuffer() { cudaFree(ptr); }
  void upload(const std::vector<T>& v) {
    ASSERT_EQ(cudaMemcpy(ptr, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  }
  std::vector<T> download(size_t n) const {
    std::vector<T> v(n);
    EXPECT_EQ(cudaMemcpy(v.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return v;
  }
};

TEST(MoePermute, MatchesCpuReference) {
  if (!have_device()) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(7);
  for (auto [tokens, top_k, experts, hidden] : std::vector<std::tuple<int, int, int, int>>{
           {1, 1, 1, 4}, {37, 2, 8, 33}, {513, 2, 64, 128}, {1000, 4, 16, 1030}, {0, 2, 4, 8}}) {
    const int n = tokens * top_k;
    std::vector<int32_t> ids(n);
    for (auto& e : ids) e = std::uniform_int_distribution<int>(0, experts - 1)(rng);
    std::vector<float> x(static_cast<size_t>(tokens) * hidden), w(n);
    for (auto& v : x) v = std::normal_distribution<float>()(rng);
    for (auto& v : w) v = std::uniform_real_distribution<float>()(rng);

    // CPU reference: stable sort of assignments by expert.
    std::vector<int32_t> ref_sorted(n);
    std::iota(ref_sorted.begin(), ref_sorted.end(), 0);
    std::stable_sort(ref_sorted.begin(), ref_sorted.end(),
                     [&](int a, int b) { return ids[a] < ids[b]; });
    std::vector<int32_t> ref_offsets(experts + 1, 0);
    for (int e : ids) ref_offsets[e + 1]++;
    for (int e = 0; e < experts; ++e) ref_offsets[e + 1] += ref_offsets[e];

    DeviceBuffer<int32_t> d_ids(n), d_sorted(n), d_pos(n), d_offsets(experts + 1);
    DeviceBuffer<float> d_x(x.size()), d_w(n), d_rows(static_cast<size_t>(n) * hidden),
        d_out(x.size());
    d_ids.upload(ids);
    d_x.upload(x);
    d_w.upload(w);
    size_t ws = moe_sort_workspace_bytes(n, experts);
    DeviceBuffer<char> d_ws(ws);
    ASSERT_EQ(invoke_moe_sort(d_ids.ptr, n, experts, d_sorted.ptr, d_pos.ptr, d_offsets.ptr,
                              d_ws.ptr, ws, nullptr),
              cudaSuccess);
    ASSERT_EQ(invoke_moe_gather_rows(d_x.ptr, d_sorted.ptr, n, top_k, hidden, d_rows.ptr, nullptr),
              cudaSuccess);
    // "Experts" are the identity, so combining must give sum_j w_j * x_t.
    ASSERT_EQ(invoke_moe_combine(d_rows.ptr, d_pos.ptr, d_w.ptr, tokens, top_k, hidden, d_out.ptr,
                                 nullptr),
              cudaSuccess);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(d_sorted.download(n), ref_sorted);
    EXPECT_EQ(d_offsets.download(experts + 1), ref_offsets);
    auto rows = d_rows.download(static_cast<size_t>(n) * hidden);
    for (int p = 0; p < n; ++p)
      for (int h = 0; h < hidden; ++h)
        ASSERT_EQ(rows[static_cast<size_t>(p) * hidden + h],
                  x[static_cast<size_t>(ref_sorted[p] / top_k) * hidden + h]);
    auto out = d_out.download(x.size());
    for (int t = 0; t < tokens; ++t) {
      float wsum = 0;
      for (int j = 0; j < top_k; ++j) wsum += w[t * top_k + j];
      for (int h = 0; h < hidden; ++h) {
        float want = wsum * x[static_cast<size_t>(t) * hidden + h];
        ASSERT_NEAR(out[static_cast<size_t>(t) * hidden + h], want, 1e-5f * (1 + std::abs(want)));
      }
    }
  }
}

TEST(MoePermute, BadSizesAreRejected) {
  EXPECT_EQ(invoke_moe_sort(nullptr, -1, 4, nullptr, nullptr, nullptr, nullptr, 0, nullptr),
            cudaErrorInvalidValue);
  EXPECT_EQ(invoke_moe_gather_rows(nullptr, nullptr, 4, 0, 8, nullptr, nullptr),
            cudaErrorInvalidValue);
  EXPECT_EQ(moe_sort_workspace_bytes(10, 0), 0u);
}

}  // namespace
}  // namespace tessera::kernels
