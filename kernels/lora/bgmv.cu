#include "bgmv.h"

namespace tessera::kernels {
namespace {

constexpr int kWarp = 32;

// One block per row; one warp per rank entry: a warp-reduced dot product of
// the row with one row of A.
__global__ void shrink(const float* __restrict__ x, const float* __restrict__ a_stack,
                       const int32_t* __restrict__ index, int in, int rank, float* __restrict__ h) {
  const int row = blockIdx.x;
  const int adapter = index[row];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int warps = blockDim.x / kWarp;
  const float* xr = x + static_cast<size_t>(row) * in;
  for (int k = warp; k < rank; k += warps) {
    float acc = 0.f;
    if (adapter >= 0) {
      const float* ak = a_stack + (static_cast<size_t>(adapter) * rank + k) * in;
      for (int i = lane; i < in; i += kWarp) acc += xr[i] * ak[i];
      for (int off = kWarp / 2; off > 0; off /= 2) acc += __shfl_down_sync(0xffffffffu, acc, off);
    }
    if (lane == 0) h[static_cast<size_t>(row) * rank + k] = acc;
  }
}

// One block per row; threads stride over outputs, each a dot product over
// the (small) rank.
__global__ void expand(const float* __restrict__ h, const float* __restrict__ b_stack,
                       const int32_t* __restrict__ index, const float* __restrict__ scale, int rank,
                       int out, float* __restrict__ y) {
  const int row = blockIdx.x;
  const int adapter = index[row];
  if (adapter < 0) return;
  const float s = scale[adapter];
  const float* hr = h + static_cast<size_t>(row) * rank;
  const float* b = b_stack + static_cast<size_t>(adapter) * out * rank;
  for (int o = threadIdx.x; o < out; o += blockDim.x) {
    float acc = 0.f;
    for (int k = 0; k < rank; ++k) acc += hr[k] * b[static_cast<size_t>(o) * rank + k];
    y[static_cast<size_t>(row) * out + o] += s * acc;
  }
}

}  // namespace

cudaError_t invoke_lora_shrink(const float* x, const float* a_stack, const int32_t* index, int rows,
                               int in, int rank, float* h, cudaStream_t stream) {
  if (rows < 0 || in < 1 || rank < 1) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  shrink<<<rows, 256, 0, stream>>>(x, a_stack, index, in, rank, h);
  return cudaGetLastError();
}

cudaError_t invoke_lora_expand(const float* h, const float* b_stack, const int32_t* index,
                               const float* scale, int rows, int rank, int out, float* y,
                               cudaStream_t stream) {
  if (rows < 0 || out < 1 || rank < 1) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  expand<<<rows, out >= 256 ? 256 : 128, 0, stream>>>(h, b_stack, index, scale, rank, out, y);
  return cudaGetLastError();
}

}  // namespace tessera::kernels
