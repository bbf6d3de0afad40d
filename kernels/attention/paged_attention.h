// kernels/attention/paged_attention.h — attention over a paged KV cache on
// CUDA: the serving engine's decode and chunked-prefill attention (vLLM's
// PagedAttention), over the cache layout of nn::PagedKVCache.
//
// Every query token attends to positions [0, its own position] of its
// sequence; the keys and values of position p live in block
// block_tables[s][p / block_size], slot p % block_size.
//
// Shapes (row-major, device memory, float32 unless noted):
//   q             [tokens x heads x head_dim]           rotary already applied
//   k_pool        [num_blocks x kv_heads x block_size x head_dim]   one layer
//   v_pool        [num_blocks x kv_heads x block_size x head_dim]
//   block_tables  [sequences x max_blocks] int32
//   token_seq     [tokens] int32                         each token's sequence
//   token_pos     [tokens] int32                         each token's position
//   out           [tokens x heads x head_dim]
// heads must be a multiple of kv_heads (grouped-query attention: head h
// reads kv head h / (heads / kv_heads)); scale multiplies q·k
// (1/sqrt(head_dim) for the models here). max_context bounds every
// token_pos + 1: one thread block per (token, head) keeps its scores in
// shared memory, so max_context is at most
// max_paged_attention_context(head_dim); a token whose position the launch
// was not sized for gets NaN outputs. The launcher never allocates and
// returns the first CUDA error (cudaErrorInvalidValue for bad sizes).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace tessera::kernels {

// The longest context one launch takes (48 KiB of shared memory per block).
int max_paged_attention_context(int head_dim);

cudaError_t invoke_paged_attention(const float* q, const float* k_pool, const float* v_pool,
                                   const int32_t* block_tables, int max_blocks,
                                   const int32_t* token_seq, const int32_t* token_pos, int tokens,
                                   int heads, int kv_heads, int head_dim, int block_size,
                                   int max_context, float scale, float* out, cudaStream_t stream);

}  // namespace tessera::kernels
