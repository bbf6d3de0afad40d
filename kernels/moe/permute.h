// kernels/moe/permute.h — MoE token permutation on CUDA.
//
// Top-k routing gives every token k (expert, weight) assignments. Experts
// run faster on contiguous rows, so the assignments are sorted by expert
// (stable: within an expert, in token order), rows are gathered into that
// order, experts run on their slices, and the results are combined back
// per token with the routing weights. These are the device halves of that
// dance; the CPU reference is in tests/kernels/ and in nn's MoE layer.
//
// Shapes (row-major, device memory, int32 indices):
//   expert_ids        [num_tokens x top_k]   expert of each assignment
//   sorted            [num_tokens * top_k]   assignment index (t * top_k + j)
//                                            at each expert-sorted position
//   position          [num_tokens * top_k]   inverse of `sorted`
//   expert_offsets    [num_experts + 1]      first sorted position of each
//                                            expert; last entry = total
//   hidden rows       [.. x hidden]          float32
//
// Launchers never allocate: the caller passes a workspace whose size
// moe_sort_workspace_bytes() gives. They return the first CUDA error (also
// cudaErrorInvalidValue for bad sizes or expert ids out of range are the
// caller's to check: ids must lie in [0, num_experts)).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace tessera::kernels {

size_t moe_sort_workspace_bytes(int num_assignments, int num_experts);

cudaError_t invoke_moe_sort(const int32_t* expert_ids, int num_assignments, int num_experts,
                            int32_t* sorted, int32_t* position, int32_t* expert_offsets,
                            void* workspace, size_t workspace_bytes, cudaStream_t stream);

// out[p, :] = tokens[sorted[p] / top_k, :] for p in [0, num_assignments).
cudaError_t invoke_moe_gather_rows(const float* tokens, const int32_t* sorted, int num_assignments,
                                   int top_k, int hidden, float* out, cudaStream_t stream);

// out[t, :] = sum_j weights[t * top_k + j] * expert_out[position[t * top_k + j], :].
cudaError_t invoke_moe_combine(const float* expert_out, const int32_t* position,
                               const float* weights, int num_tokens, int top_k, int hidden,
                               float* out, cudaStream_t stream);

}  // namespace tessera::kernels
