#include "paged_attention.h"

#include <cmath>

namespace tessera::kernels {
namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 128;
constexpr int kSharedBytes = 48 * 1024;

// The max (or sum) of v over the block, on every thread. `red` holds one
// float per warp.
__device__ float block_reduce(float v, float* red, bool is_max) {
  for (int off = kWarp / 2; off > 0; off /= 2) {
    const float o = __shfl_xor_sync(0xffffffffu, v, off);
    v = is_max ? fmaxf(v, o) : v + o;
  }
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  __syncthreads();  // an earlier reduction may still read red
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = lane < blockDim.x / kWarp ? red[lane] : (is_max ? -INFINITY : 0.f);
  for (int off = kWarp / 2; off > 0; off /= 2) {
    const float o = __shfl_xor_sync(0xffffffffu, v, off);
    v = is_max ? fmaxf(v, o) : v + o;
  }
  return v;
}

// One block per (token, head): scores of every position into shared
// memory, softmax, then each thread a slice of the head dimension summed
// over the positions.
__global__ void paged_attention(const float* __restrict__ q, const float* __restrict__ k_pool,
                                const float* __restrict__ v_pool,
                                const int32_t* __restrict__ block_tables, int max_blocks,
                                const int32_t* __restrict__ token_seq,
                                const int32_t* __restrict__ token_pos, int heads, int kv_heads,
                                int head_dim, int block_size, int max_context, float scale,
                                float* __restrict__ out) {
  extern __shared__ float smem[];
  float* qs = smem;             // head_dim
  float* red = qs + head_dim;   // one per warp
  float* scores = red + kWarp;  // one per position
  const int token = blockIdx.x, head = blockIdx.y;
  const int ctx = token_pos[token] + 1;
  const int kvh = head / (heads / kv_heads);
  const int32_t* table = block_tables + static_cast<size_t>(token_seq[token]) * max_blocks;
  const size_t block_stride = static_cast<size_t>(kv_heads) * block_size * head_dim;
  const size_t head_offset = static_cast<size_t>(kvh) * block_size * head_dim;
  float* o = out + (static_cast<size_t>(token) * heads + head) * head_dim;
  // A position the launch was not sized for: NaN, not a write past the scores.
  if (ctx < 1 || ctx > max_context) {
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) o[d] = NAN;
    return;
  }
  const float* qr = q + (static_cast<size_t>(token) * heads + head) * head_dim;
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) qs[d] = qr[d];
  __syncthreads();

  float local_max = -INFINITY;
  for (int t = threadIdx.x; t < ctx; t += blockDim.x) {
    const float* kr = k_pool + table[t / block_size] * block_stride + head_offset +
                      static_cast<size_t>(t % block_size) * head_dim;
    float s = 0.f;
    for (int d = 0; d < head_dim; ++d) s += qs[d] * kr[d];
    s *= scale;
    scores[t] = s;
    local_max = fmaxf(local_max, s);
  }
  const float m = block_reduce(local_max, red, true);
  float local_sum = 0.f;
  for (int t = threadIdx.x; t < ctx; t += blockDim.x) {
    const float e = expf(scores[t] - m);
    scores[t] = e;
    local_sum += e;
  }
  const float sum = block_reduce(local_sum, red, false);
  __syncthreads();  // every score written before any thread reads them all

  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float acc = 0.f;
    for (int t = 0; t < ctx; ++t) {
      const float* vr = v_pool + table[t / block_size] * block_stride + head_offset +
                        static_cast<size_t>(t % block_size) * head_dim;
      acc += scores[t] * vr[d];
    }
    o[d] = acc / sum;
  }
}

}  // namespace

int max_paged_attention_context(int head_dim) {
  return (kSharedBytes - static_cast<int>(sizeof(float)) * (head_dim + kWarp)) /
         static_cast<int>(sizeof(float));
}

cudaError_t invoke_paged_attention(const float* q, const float* k_pool, const float* v_pool,
                                   const int32_t* block_tables, int max_blocks,
                                   const int32_t* token_seq, const int32_t* token_pos, int tokens,
                                   int heads, int kv_heads, int head_dim, int block_size,
                                   int max_context, float scale, float* out, cudaStream_t stream) {
  if (tokens < 0 || heads < 1 || kv_heads < 1 || heads % kv_heads != 0 || head_dim < 1 ||
      block_size < 1 || max_blocks < 1 || max_context < 1 ||
      max_context > max_paged_attention_context(head_dim) ||
      max_context > max_blocks * block_size) {
    return cudaErrorInvalidValue;
  }
  if (tokens == 0) return cudaSuccess;
  const size_t shared = sizeof(float) * (static_cast<size_t>(head_dim) + kWarp + max_context);
  paged_attention<<<dim3(tokens, heads), kThreads, shared, stream>>>(
      q, k_pool, v_pool, block_tables, max_blocks, token_seq, token_pos, heads, kv_heads, head_dim,
      block_size, max_context, scale, out);
  return cudaGetLastError();
}

}  // namespace tessera::kernels
