#include "tessera/rlhf/hybrid_engine.h"

#include <ATen/ATen.h>

#include "tessera/core/error.h"

namespace tessera::rlhf {

HybridEngineGroups hybrid_engine_groups(int world, int train_tp, int gen_tp) {
  TESSERA_CHECK(world >= 1 && train_tp >= 1 && gen_tp >= 1 && world % train_tp == 0 &&
                    train_tp % gen_tp == 0,
                InvalidArgument, "hybrid_engine_groups: need train_tp dividing world and gen_tp "
                "dividing train_tp (world ", world, ", train_tp ", train_tp, ", gen_tp ", gen_tp, ")");
  HybridEngineGroups g;
  g.world = world;
  g.train_tp = train_tp;
  g.train_dp = world / train_tp;
  g.gen_tp = gen_tp;
  g.micro_dp = train_tp / gen_tp;
  for (int replica = 0; replica < g.train_dp; ++replica) {
    const int base = replica * train_tp;
    // Stride d_g: generation tp group j holds local ranks j, j + d_g, ...
    for (int j = 0; j < g.micro_dp; ++j) {
      std::vector<int> group;
      for (int k = 0; k < gen_tp; ++k) group.push_back(base + j + g.micro_dp * k);
      g.gen_tp_groups.push_back(group);
    }
    // Neighbours: micro-DP group k holds local ranks d_g k .. d_g k + d_g - 1.
    for (int k = 0; k < gen_tp; ++k) {
      std::vector<int> group;
      for (int j = 0; j < g.micro_dp; ++j) group.push_back(base + g.micro_dp * k + j);
      g.micro_dp_groups.push_back(group);
    }
  }
  return g;
}

int HybridEngineGroups::gen_tp_rank(int rank) const {
  TESSERA_CHECK(rank >= 0 && rank < world, InvalidArgument, "rank ", rank, " outside world ", world);
  return (rank % train_tp) / micro_dp;
}

int HybridEngineGroups::first_train_shard(int rank) const { return gen_tp_rank(rank) * micro_dp; }

int HybridEngineGroups::micro_dp_group_of(int rank) const {
  return (rank / train_tp) * gen_tp + gen_tp_rank(rank);
}

int64_t hybrid_engine_bytes_per_rank(int64_t model_bytes, int train_tp, int gen_tp) {
  TESSERA_CHECK(train_tp >= 1 && gen_tp >= 1 && train_tp % gen_tp == 0, InvalidArgument,
                "hybrid_engine_bytes_per_rank: gen_tp ", gen_tp, " must divide train_tp ", train_tp);
  const int64_t micro_dp = train_tp / gen_tp;
  return (micro_dp - 1) * model_bytes / train_tp;
}

std::shared_ptr<dist::ProcessGroup> make_micro_dp_group(dist::ProcessGroup& world,
                                                        const HybridEngineGroups& g) {
  TESSERA_CHECK(world.size() == g.world, InvalidArgument, "make_micro_dp_group: world of ",
                world.size(), " ranks, groups planned for ", g.world);
  std::shared_ptr<dist::ProcessGroup> mine;
  for (size_t i = 0; i < g.micro_dp_groups.size(); ++i) {
    auto group = world.new_subgroup(g.micro_dp_groups[i], "micro_dp_" + std::to_string(i));
    if (group) mine = group;
  }
  return mine;
}

at::Tensor gather_generation_shard(const at::Tensor& local,
                                   const std::shared_ptr<dist::ProcessGroup>& micro_dp_group,
                                   int64_t* bytes_received, int64_t dim) {
  TESSERA_CHECK(local.defined() && local.dim() >= 1 && dim >= 0 && dim < local.dim(), InvalidArgument,
                "gather_generation_shard: expected a training shard with at least one dimension and a "
                "dimension inside it");
  const int n = micro_dp_group ? micro_dp_group->size() : 1;
  if (n == 1) return local;
  std::vector<int64_t> shape(local.sizes().begin(), local.sizes().end());
  shape[0] *= n;
  at::Tensor out = at::empty(shape, local.options());
  at::Tensor in = local.contiguous();
  micro_dp_group->all_gather(out, in).wait();
  if (bytes_received) *bytes_received += static_cast<int64_t>(in.nbytes()) * (n - 1);
  if (dim == 0) return out;
  // Blocks were gathered along rows; put them side by side along `dim`.
  return at::cat(out.chunk(n, 0), dim);
}

}  // namespace tessera::rlhf
