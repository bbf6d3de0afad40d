// GPU: MoE token permutation kernels (kernels/moe/permute.cu) — sort by
// expert, gather rows, combine — against the same work done with ATen ops
// on the CPU. Built only with CUDA; run by scripts/gpu-check.sh.
//
//   moe_permute_bench [TOKENS=16384] [TOP_K=2] [EXPERTS=64] [HIDDEN=4096]
//   moe_permute_bench --help
#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#include "command_line.h"
#include "moe/permute.h"
#include "tessera/core/metrics.h"

namespace tk = tessera::kernels;

#define CHECK_CUDA(x)                                                     \
  do {                                                                    \
    cudaError_t e = (x);                                                  \
    if (e != cudaSuccess) {                                               \
      std::fprintf(stderr, "%s failed: %s\n", #x, cudaGetErrorString(e)); \
      return 1;                                                           \
    }                                                                     \
  } while (0)

int main(int argc, char** argv) {
  int tokens = 16384, top_k = 2, experts = 64, hidden = 4096;
  CLI::App app{
      "GPU MoE token permutation kernels (sort by expert, gather, combine) against the "
      "same work in ATen on the CPU.",
      "moe_permute_bench"};
  app.option_defaults()->always_capture_default();
  const CLI::Validator positive = tessera::examples::positive();
  app.add_option("TOKENS", tokens, "tokens in the batch")->check(positive);
  app.add_option("TOP_K", top_k, "experts per token")->check(positive);
  app.add_option("EXPERTS", experts, "experts")->check(positive);
  app.add_option("HIDDEN", hidden, "hidden size (row width)")->check(positive);
  if (auto code = tessera::examples::parse_command_line(app, argc, argv)) return *code;
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("moe_permute_bench: no CUDA device, skipped\n");
    return 0;
  }
  const int n = tokens * top_k;
  at::Tensor ids = at::randint(0, experts, {n}, at::kInt);
  at::Tensor x = at::randn({tokens, hidden});
  at::Tensor w = at::rand({n});
  int32_t *d_ids, *d_sorted, *d_pos, *d_off;
  float *d_x, *d_w, *d_rows, *d_out;
  void* d_ws;
  size_t ws = tk::moe_sort_workspace_bytes(n, experts);
  CHECK_CUDA(cudaMalloc(&d_ids, n * 4));
  CHECK_CUDA(cudaMalloc(&d_sorted, n * 4));
  CHECK_CUDA(cudaMalloc(&d_pos, n * 4));
  CHECK_CUDA(cudaMalloc(&d_off, (experts + 1) * 4));
  CHECK_CUDA(cudaMalloc(&d_x, x.numel() * 4));
  CHECK_CUDA(cudaMalloc(&d_w, n * 4));
  CHECK_CUDA(cudaMalloc(&d_rows, static_cast<size_t>(n) * hidden * 4));
  CHECK_CUDA(cudaMalloc(&d_out, x.numel() * 4));
  CHECK_CUDA(cudaMalloc(&d_ws, ws));
  CHECK_CUDA(cudaMemcpy(d_ids, ids.data_ptr(), n * 4, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d_x, x.data_ptr(), x.numel() * 4, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d_w, w.data_ptr(), n * 4, cudaMemcpyHostToDevice));
  auto run = [&]() -> cudaError_t {
    cudaError_t e =
        tk::invoke_moe_sort(d_ids, n, experts, d_sorted, d_pos, d_off, d_ws, ws, nullptr);
    if (e == cudaSuccess)
      e = tk::invoke_moe_gather_rows(d_x, d_sorted, n, top_k, hidden, d_rows, nullptr);
    if (e == cudaSuccess)
      e = tk::invoke_moe_combine(d_rows, d_pos, d_w, tokens, top_k, hidden, d_out, nullptr);
    return e;
  };
  CHECK_CUDA(run());
  CHECK_CUDA(cudaDeviceSynchronize());
  const int iters = 50;
  tessera::Stopwatch gpu;
  for (int i = 0; i < iters; ++i) CHECK_CUDA(run());
  CHECK_CUDA(cudaDeviceSynchronize());
  double gpu_ms = gpu.milliseconds() / iters;

  tessera::Stopwatch cpu;
  at::Tensor sorted_ids, order;
  std::tie(sorted_ids, order) = at::sort(ids, /*stable=*/true, 0, false);
  at::Tensor rows = x.index_select(0, order.div(top_k, "floor"));
  at::Tensor position = at::empty_like(order).scatter_(0, order, at::arange(n, at::kLong));
  at::Tensor combined =
      (rows.index_select(0, position) * w.unsqueeze(1)).view({tokens, top_k, hidden}).sum(1);
  double cpu_ms = cpu.milliseconds();
  double bytes = 3.0 * n * hidden * 4 + 1.0 * tokens * hidden * 4;
  std::printf(
      "| %d tokens x top-%d, %d experts, hidden %d | GPU %.3f ms (%.0f GB/s) | CPU ATen %.1f ms | "
      "%.0fx |\n",
      tokens, top_k, experts, hidden, gpu_ms, bytes / gpu_ms / 1e6, cpu_ms, cpu_ms / gpu_ms);
  return 0;
}
