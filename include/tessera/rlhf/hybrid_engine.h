// tessera/rlhf/hybrid_engine.h — the 3D-HybridEngine's rank grouping
// (HybridFlow §5.3): an actor trained with tensor parallelism t and data
// parallelism d (no pipeline stages; rank = dp_rank * t + tp_rank) generates
// with a smaller tensor parallelism t_g (dividing t) and micro data
// parallelism d_g = t / t_g inside each training tp group.
//
// Generation tp groups take the ranks of a training tp group by stride d_g,
// micro-DP groups by neighbours, so a rank's generation shard (1/t_g of a
// weight) is exactly the concatenation of the training shards of its
// micro-DP group: the transition is one all-gather inside each micro-DP
// group, no rank holds more than its generation shard, and each receives
// (d_g - 1) / t of the weights' bytes.
//
//   auto g = tessera::rlhf::hybrid_engine_groups(8, /*train_tp=*/4, /*gen_tp=*/2);
//   // g.gen_tp_groups   = {0,2},{1,3},{4,6},{5,7}
//   // g.micro_dp_groups = {0,1},{2,3},{4,5},{6,7}
//
// Thread safety: pure functions except make_micro_dp_group and
// gather_generation_shard, which are collective (same order on every rank).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "tessera/dist/process_group.h"

namespace tessera::rlhf {

struct HybridEngineGroups {
  int world = 1, train_tp = 1, train_dp = 1, gen_tp = 1, micro_dp = 1;
  std::vector<std::vector<int>> gen_tp_groups;    // each gen_tp ranks, in generation tp order
  std::vector<std::vector<int>> micro_dp_groups;  // each micro_dp ranks, in shard order

  // Rank's position in its generation tp group.
  int gen_tp_rank(int rank) const;
  // The training tp shards [first, first + micro_dp) the rank holds after
  // the all-gather: its generation shard gen_tp_rank(rank) of gen_tp.
  int first_train_shard(int rank) const;
  // Index into micro_dp_groups of the rank's micro-DP group.
  int micro_dp_group_of(int rank) const;
};

// InvalidArgument unless train_tp divides world and gen_tp divides train_tp.
HybridEngineGroups hybrid_engine_groups(int world, int train_tp, int gen_tp);

// Bytes one rank receives in the training -> generation transition of
// weights totalling `model_bytes`: (micro_dp - 1) / train_tp * model_bytes.
int64_t hybrid_engine_bytes_per_rank(int64_t model_bytes, int train_tp, int gen_tp);

// Creates every micro-DP group (collective over `world`, whose size must be
// g.world) and returns this rank's.
std::shared_ptr<dist::ProcessGroup> make_micro_dp_group(dist::ProcessGroup& world,
                                                        const HybridEngineGroups& g);

// The transition for one weight: `local` is this rank's training shard (a
// weight split into train_tp blocks along `dim`, shard = tp rank); returns
// its generation shard (the micro-DP group's train_tp / gen_tp consecutive
// blocks), moved by dist::redistribute inside `micro_dp_group` — one
// all_gather when the blocks are equal, an all_to_all of the uneven blocks
// otherwise. `block_sizes` are the members' block extents along `dim`
// (empty: all equal to this rank's). Adds the bytes this rank received to
// *bytes_received when given. Collective over `micro_dp_group`.
at::Tensor gather_generation_shard(const at::Tensor& local,
                                   const std::shared_ptr<dist::ProcessGroup>& micro_dp_group,
                                   int64_t* bytes_received = nullptr, int64_t dim = 0,
                                   const std::vector<int64_t>& block_sizes = {});

}  // namespace tessera::rlhf
