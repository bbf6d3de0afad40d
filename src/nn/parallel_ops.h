// Private: differentiable collectives for tensor- and expert-parallel
// layers (Megatron's f/g operators and an autograd-aware all_to_all). With a
// null group each is the identity, so dense single-rank code pays nothing.
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>
#include <vector>

#include "tessera/dist/process_group.h"

namespace tessera::nn::detail {

using GroupPtr = std::shared_ptr<dist::ProcessGroup>;

// Identity forward, all_reduce(sum) of the gradient backward: put before a
// column-parallel linear whose input is replicated over tp.
at::Tensor copy_to_group(const at::Tensor& x, const GroupPtr& group);
// all_reduce(sum) forward, identity backward: after a row-parallel linear.
at::Tensor reduce_from_group(const at::Tensor& x, const GroupPtr& group);
// The sum of every rank's x, added in rank order on every rank (all_gather,
// then part 0 + part 1 + ...): each element's value does not depend on the
// tensor's size, unlike a ring all_reduce whose chunking decides the order
// for more than two ranks. Forward only (the batch-invariant inference
// paths); identity with a null group.
at::Tensor sum_in_rank_order(const at::Tensor& x, const GroupPtr& group);
// Concatenates each rank's x along the last dimension; backward keeps this
// rank's slice. `sizes` are every rank's last-dimension sizes.
at::Tensor gather_last_dim(const at::Tensor& x, const GroupPtr& group,
                           const std::vector<int64_t>& sizes);
// Row all_to_all with uneven splits; backward sends gradients back the same
// way (splits swapped).
at::Tensor all_to_all_rows(const at::Tensor& x, const GroupPtr& group,
                           const std::vector<int64_t>& out_splits,
                           const std::vector<int64_t>& in_splits);
// Per-token cross-entropy of vocabulary-sharded logits [N, V_local] whose
// shard starts at `vocab_start`, targets [N] (global ids, -100 ignored:
// loss 0). Never materialises full logits. Returns [N].
at::Tensor vocab_parallel_cross_entropy(const at::Tensor& logits, const at::Tensor& targets,
                                        int64_t vocab_start, const GroupPtr& group);

}  // namespace tessera::nn::detail
