// tessera/rlhf/protocol.h — how the driver spreads a call's batch over a
// worker group and collects the results (HybridFlow's transfer protocols).
//
// A batch is a set of named tensors sharing their first dimension (one row
// per sample). A worker group is an SPMD mesh of dp x tp workers (worker =
// dp_rank * tp + tp_rank). Each protocol is a dispatch (driver batch ->
// one batch per worker) and a collect (one result per worker -> driver
// result):
//   * kOneToAll  — every worker gets the whole batch; all results returned
//                  (concatenated in worker order);
//   * kAllToAll  — the driver passes one batch per worker; all results
//                  concatenated in worker order;
//   * kRankZero  — every worker gets the whole batch; worker 0's result;
//   * kDpCompute — the batch is split into dp equal chunks (padded by
//                  repeating its last row when dp does not divide it; the
//                  padding is dropped again on collect), every worker of dp
//                  rank r gets chunk r; the results of the tp-rank-0 workers
//                  are concatenated in dp order.
//
// Thread safety: pure functions; thread-safe.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace tessera::rlhf {

using Batch = std::map<std::string, at::Tensor>;

// Rows of a batch (InvalidArgument when its tensors disagree or it is empty).
int64_t batch_rows(const Batch& batch);

enum class Protocol { kOneToAll, kAllToAll, kRankZero, kDpCompute };
const char* protocol_name(Protocol protocol);

struct WorkerMesh {
  int dp = 1, tp = 1;
  int size() const { return dp * tp; }
  int dp_rank(int worker) const { return worker / tp; }
  int tp_rank(int worker) const { return worker % tp; }
};

// DP_COMPUTE's split of `rows` over `dp` ranks: chunks of ceil(rows / dp)
// rows; dp rank r reads rows [begin, end) and then the last of them
// `repeat` more times; `padding` of its chunk's rows are not real (dropped
// on collect). A rank past the end gets only the batch's last row, repeated.
struct DpChunk {
  int64_t begin = 0, end = 0, repeat = 0, padding = 0;
};
DpChunk dp_compute_chunk(int64_t rows, int dp, int dp_rank);

// What the workers receive. `pad` (kDpCompute) is how many rows were added
// to make the batch divisible by dp; collect() drops them.
struct Dispatched {
  std::vector<Batch> per_worker;
  int64_t pad = 0;
};

// kAllToAll takes its per-worker batches from `per_worker_input` (one per
// worker) and ignores `batch`; the others ignore `per_worker_input`.
Dispatched dispatch(Protocol protocol, const WorkerMesh& mesh, const Batch& batch,
                    const std::vector<Batch>& per_worker_input = {});

Batch collect(Protocol protocol, const WorkerMesh& mesh, const std::vector<Batch>& results,
              int64_t pad = 0);

}  // namespace tessera::rlhf
