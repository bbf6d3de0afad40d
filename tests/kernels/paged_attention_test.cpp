// kernels/attention/paged_attention.cu against a CPU reference in double
// (the arithmetic of nn's paged attention: softmax(q·k · scale) · v over
// positions [0, p] of the token's sequence, read through its block table),
// on shuffled blocks, grouped-query heads, decode and chunked-prefill tokens.
#include "attention/paged_attention.h"

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
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
T* to_device(const std::vector<T>& v) {
  T* p = nullptr;
  EXPECT_EQ(cudaMalloc(&p, std::max<size_t>(v.size(), 1) * sizeof(T)), cudaSuccess);
  EXPECT_EQ(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  return p;
}

TEST(PagedAttention, MatchesCpuReference) {
  if (!have_device()) GTEST_SKIP() << "no CUDA device";
  const int heads = 8, kv_heads = 2, head_dim = 64, block_size = 16;
  const std::vector<int> lengths = {1, 17, 100, 300, 33};
  int max_blocks = 0, total_blocks = 0;
  for (int n : lengths) {
    max_blocks = std::max(max_blocks, (n + block_size - 1) / block_size);
    total_blocks += (n + block_size - 1) / block_size;
  }
  const int num_blocks = total_blocks + 3;  // some blocks belong to nobody
  std::mt19937 rng(11);
  std::normal_distribution<float> normal;
  // Each sequence gets blocks from a shuffled pool.
  std::vector<int32_t> pool(num_blocks);
  std::iota(pool.begin(), pool.end(), 0);
  std::shuffle(pool.begin(), pool.end(), rng);
  std::vector<int32_t> tables(lengths.size() * max_blocks, -1);
  int next = 0;
  for (size_t s = 0; s < lengths.size(); ++s) {
    for (int b = 0; b < (lengths[s] + block_size - 1) / block_size; ++b) {
      tables[s * max_blocks + b] = pool[next++];
    }
  }
  const size_t pool_floats = size_t(num_blocks) * kv_heads * block_size * head_dim;
  std::vector<float> k(pool_floats), v(pool_floats);
  for (auto& x : k) x = normal(rng);
  for (auto& x : v) x = normal(rng);
  // Tokens: each sequence's last position (decode), and the last 5 of the
  // 100-long one (a prefill chunk attending causally).
  std::vector<int32_t> seq, pos;
  for (size_t s = 0; s < lengths.size(); ++s) {
    seq.push_back(int32_t(s));
    pos.push_back(lengths[s] - 1);
  }
  for (int p = 95; p < 100; ++p) {
    seq.push_back(2);
    pos.push_back(p);
  }
  const int tokens = int(seq.size());
  std::vector<float> q(size_t(tokens) * heads * head_dim);
  for (auto& x : q) x = normal(rng);
  const float scale = 1.f / std::sqrt(float(head_dim));

  std::vector<float> ref(q.size());
  auto at = [&](const std::vector<float>& pool_v, int s, int t, int kvh, int d) {
    const int block = tables[size_t(s) * max_blocks + t / block_size];
    return double(
        pool_v[((size_t(block) * kv_heads + kvh) * block_size + t % block_size) * head_dim + d]);
  };
  for (int i = 0; i < tokens; ++i) {
    for (int h = 0; h < heads; ++h) {
      const int kvh = h / (heads / kv_heads), ctx = pos[i] + 1;
      std::vector<double> w(ctx);
      double m = -INFINITY, sum = 0;
      for (int t = 0; t < ctx; ++t) {
        double dot = 0;
        for (int d = 0; d < head_dim; ++d)
          dot += double(q[(size_t(i) * heads + h) * head_dim + d]) * at(k, seq[i], t, kvh, d);
        w[t] = dot * scale;
        m = std::max(m, w[t]);
      }
      for (double& x : w) sum += (x = std::exp(x - m));
      for (int d = 0; d < head_dim; ++d) {
        double acc = 0;
        for (int t = 0; t < ctx; ++t) acc += w[t] * at(v, seq[i], t, kvh, d);
        ref[(size_t(i) * heads + h) * head_dim + d] = float(acc / sum);
      }
    }
  }

  float *dq = to_device(q), *dk = to_device(k), *dv = to_device(v), *dout = nullptr;
  int32_t *dt = to_device(tables), *ds = to_device(seq), *dp = to_device(pos);
  ASSERT_EQ(cudaMalloc(&dout, q.size() * sizeof(float)), cudaSuccess);
  const int longest = *std::max_element(lengths.begin(), lengths.end());
  ASSERT_EQ(invoke_paged_attention(dq, dk, dv, dt, max_blocks, ds, dp, tokens, heads, kv_heads,
                                   head_dim, block_size, longest, scale, dout, nullptr),
            cudaSuccess);
  std::vector<float> got(q.size());
  ASSERT_EQ(cudaMemcpy(got.data(), dout, got.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
  double worst = 0;
  for (size_t i = 0; i < got.size(); ++i)
    worst = std::max(worst, double(std::abs(got[i] - ref[i])));
  EXPECT_LT(worst, 1e-4) << "largest difference from the CPU reference";

  // Bad sizes are refused before launching.
  EXPECT_EQ(invoke_paged_attention(dq, dk, dv, dt, max_blocks, ds, dp, tokens, 6, 4, head_dim,
                                   block_size, longest, scale, dout, nullptr),
            cudaErrorInvalidValue);  // 6 heads over 4 kv heads
  EXPECT_EQ(invoke_paged_attention(dq, dk, dv, dt, max_blocks, ds, dp, tokens, heads, kv_heads,
                                   head_dim, block_size, max_paged_attention_context(head_dim) + 1,
                                   scale, dout, nullptr),
            cudaErrorInvalidValue);
  for (void* p : {static_cast<void*>(dq), static_cast<void*>(dk), static_cast<void*>(dv),
                  static_cast<void*>(dout), static_cast<void*>(dt), static_cast<void*>(ds),
                  static_cast<void*>(dp)}) {
    cudaFree(p);
  }
}

}  // namespace
}  // namespace tessera::kernels
