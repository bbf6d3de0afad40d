// Internal to the serving engine: how rank 0 of a tensor-parallel engine
// hands each step to the other ranks (EngineOptions::tensor_parallel).
//
// Every step is one StepMessage: the copy-on-write block copies the
// scheduler asked for and the paged forward's batch. Rank 0 broadcasts it
// (its length, then its words as one int64 tensor) and runs it; the other
// ranks receive it and run it on their shards, meeting rank 0 in the
// forward's collectives. Rank 0 alone samples from the gathered logits.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "tessera/dist/process_group.h"
#include "tessera/nn/model.h"
#include "tessera/serve/block_manager.h"

namespace tessera::serve::detail {

struct StepMessage {
  bool stop = false;              // rank 0's engine is going away: return
  std::vector<BlockCopy> copies;  // applied before the forward
  std::vector<int64_t> ids;       // the forward's tokens; empty: no forward
  nn::PagedBatch batch;           // sequences and logits rows (cache unset)
  bool hidden_only = false;       // no logits rows: skip the LM head
};

// Rank 0: sends `message` to the group's other ranks.
void broadcast_step(dist::ProcessGroup& group, const StepMessage& message);
// Other ranks: the next message from rank 0. DataLoss for a malformed one.
StepMessage receive_step(dist::ProcessGroup& group);
// Applies the copies, then runs the forward (collective over the model's tp
// group) on `cache`. Returns the logits [1, rows, V], undefined without a
// forward or with hidden_only.
at::Tensor run_step(nn::Transformer& model, nn::PagedKVCache& cache, const StepMessage& message);

}  // namespace tessera::serve::detail
