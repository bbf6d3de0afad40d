#include "permute.h"

#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

namespace tessera::kernels {
namespace {

constexpr size_t kAlign = 256;
size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

int bits_for(int num_experts) {
  int bits = 1;
  while ((1 << bits) < num_experts) ++bits;
  return bits;
}

struct WorkspaceLayout {
  size_t keys_out, iota, counts, sort_temp, scan_temp, total;
  size_t sort_temp_bytes, scan_temp_bytes;
};

WorkspaceLayout layout_for(int n, int num_experts) {
  WorkspaceLayout w{};
  cub::DeviceRadixSort::SortPairs(nullptr, w.sort_temp_bytes, static_cast<const int32_t*>(nullptr),
                                  static_cast<int32_t*>(nullptr),
                                  static_cast<const int32_t*>(nullptr),
                                  static_cast<int32_t*>(nullptr), n, 0, bits_for(num_experts));
  cub::DeviceScan::ExclusiveSum(nullptr, w.scan_temp_bytes, static_cast<const int32_t*>(nullptr),
                                static_cast<int32_t*>(nullptr), num_experts + 1);
  w.keys_out = 0;
  w.iota = w.keys_out + align_up(sizeof(int32_t) * n);
  w.counts = w.iota + align_up(sizeof(int32_t) * n);
  w.sort_temp = w.counts + align_up(sizeof(int32_t) * (num_experts + 1));
  w.scan_temp = w.sort_temp + align_up(w.sort_temp_bytes);
  w.total = w.scan_temp + align_up(w.scan_temp_bytes);
  return w;
}

__global__ void iota_and_count(const int32_t* expert_ids, int n, int32_t* iota, int32_t* counts) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) {
    iota[i] = i;
    atomicAdd(&counts[expert_ids[i]], 1);
  }
}

__global__ void invert(const int32_t* sorted, int n, int32_t* position) {
  int p = blockIdx.x * blockDim.x + threadIdx.x;
  if (p < n) position[sorted[p]] = p;
}

// One block per output row; threads stride over the hidden dimension with
// float4 loads when the row is 16-byte aligned.
__global__ void gather_rows(const float* tokens, const int32_t* sorted, int top_k, int hidden,
                            float* out) {
  const int p = blockIdx.x;
  const float* src = tokens + static_cast<size_t>(sorted[p] / top_k) * hidden;
  float* dst = out + static_cast<size_t>(p) * hidden;
  if (hidden % 4 == 0) {
    const float4* s4 = reinterpret_cast<const float4*>(src);
    float4* d4 = reinterpret_cast<float4*>(dst);
    for (int i = threadIdx.x; i < hidden / 4; i += blockDim.x) d4[i] = s4[i];
  } else {
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = src[i];
  }
}

__global__ void combine(const float* expert_out, const int32_t* position, const float* weights,
                        int top_k, int hidden, float* out) {
  const int t = blockIdx.x;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    float acc = 0.f;
    for (int j = 0; j < top_k; ++j) {
      int a = t * top_k + j;
      acc += weights[a] * expert_out[static_cast<size_t>(position[a]) * hidden + i];
    }
    out[static_cast<size_t>(t) * hidden + i] = acc;
  }
}

int threads_for(int hidden) { return hidden >= 1024 ? 256 : hidden >= 256 ? 128 : 64; }

}  // namespace

size_t moe_sort_workspace_bytes(int num_assignments, int num_experts) {
  if (num_assignments < 0 || num_experts < 1) return 0;
  return layout_for(num_assignments, num_experts).total;
}

cudaError_t invoke_moe_sort(const int32_t* expert_ids, int n, int num_experts, int32_t* sorted,
                            int32_t* position, int32_t* expert_offsets, void* workspace,
                            size_t workspace_bytes, cudaStream_t stream) {
  if (n < 0 || num_experts < 1) return cudaErrorInvalidValue;
  WorkspaceLayout w = layout_for(n, num_experts);
  if (workspace_bytes < w.total) return cudaErrorInvalidValue;
  char* base = static_cast<char*>(workspace);
  auto* keys_out = reinterpret_cast<int32_t*>(base + w.keys_out);
  auto* iota = reinterpret_cast<int32_t*>(base + w.iota);
  auto* counts = reinterpret_cast<int32_t*>(base + w.counts);

  cudaError_t err = cudaMemsetAsync(counts, 0, sizeof(int32_t) * (num_experts + 1), stream);
  if (err != cudaSuccess) return err;
  if (n > 0) {
    iota_and_count<<<(n + 255) / 256, 256, 0, stream>>>(expert_ids, n, iota, counts);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    size_t sort_bytes = w.sort_temp_bytes;
    // Radix sort is stable: equal experts keep ascending assignment order.
    err = cub::DeviceRadixSort::SortPairs(base + w.sort_temp, sort_bytes, expert_ids, keys_out,
                                          iota, sorted, n, 0, bits_for(num_experts), stream);
    if (err != cudaSuccess) return err;
    invert<<<(n + 255) / 256, 256, 0, stream>>>(sorted, n, position);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  size_t scan_bytes = w.scan_temp_bytes;
  return cub::DeviceScan::ExclusiveSum(base + w.scan_temp, scan_bytes, counts, expert_offsets,
                                       num_experts + 1, stream);
}

cudaError_t invoke_moe_gather_rows(const float* tokens, const int32_t* sorted, int n, int top_k,
                                   int hidden, float* out, cudaStream_t stream) {
  if (n < 0 || top_k < 1 || hidden < 1) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  gather_rows<<<n, threads_for(hidden), 0, stream>>>(tokens, sorted, top_k, hidden, out);
  return cudaGetLastError();
}

cudaError_t invoke_moe_combine(const float* expert_out, const int32_t* position,
                               const float* weights, int num_tokens, int top_k, int hidden,
                               float* out, cudaStream_t stream) {
  if (num_tokens < 0 || top_k < 1 || hidden < 1) return cudaErrorInvalidValue;
  if (num_tokens == 0) return cudaSuccess;
  combine<<<num_tokens, threads_for(hidden), 0, stream>>>(expert_out, position, weights, top_k,
                                                          hidden, out);
  return cudaGetLastError();
}

}  // namespace tessera::kernels
