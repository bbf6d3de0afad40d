#include "tessera/rlhf/hybrid_engine.h"

#include "tessera/dist/redistribute.h"

#include <ATen/ATen.h>

#include "tessera/core/error.h"

namespace tessera::rlhf {

HybridEngineGroups hybrid_engine_groups(int world, int train_tp, int gen_tp) {
  TESSERA_CHECK(
      world >= 1 && train_tp >= 1 && gen_tp >= 1 && world % train_tp == 0 && train_tp % gen_tp == 0,
      InvalidArgument,
      "hybrid_engine_groups: need train_tp dividing world and gen_tp "
      "dividing train_tp (world ",
      world, ", train_tp ", train_tp, ", gen_tp ", gen_tp, ")");
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
  TESSERA_CHECK(rank >= 0 && rank < world, InvalidArgument, "rank ", rank, " outside world ",
                world);
  return (rank % train_tp) / micro_dp;
}

int HybridEngineGroups::first_train_shard(int rank) const { return gen_tp_rank(rank) * micro_dp; }

int HybridEngineGroups::micro_dp_group_of(int rank) const {
  return (rank / train_tp) * gen_tp + gen_tp_rank(rank);
}

int64_t hybrid_engine_bytes_per_rank(int64_t model_bytes, int train_tp, int gen_tp) {
  TESSERA_CHECK(train_tp >= 1 && gen_tp >= 1 && train_tp % gen_tp == 0, InvalidArgument,
                "hybrid_engine_bytes_per_rank: gen_tp ", gen_tp, " must divide train_tp ",
                train_tp);
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
                                   int64_t* bytes_received, int64_t dim,
                                   const std::vector<int64_t>& block_sizes) {
  TESSERA_CHECK(
      local.defined() && local.dim() >= 1 && dim >= 0 && dim < local.dim(), InvalidArgument,
      "gather_generation_shard: expected a training shard with at least one dimension and a "
      "dimension inside it");
  const int n = micro_dp_group ? micro_dp_group->size() : 1;
  if (n == 1) return local;
  const int me = micro_dp_group->rank();
  std::vector<int64_t> sizes =
      block_sizes.empty() ? std::vector<int64_t>(n, local.size(dim)) : block_sizes;
  TESSERA_CHECK(static_cast<int>(sizes.size()) == n && sizes[me] == local.size(dim),
                InvalidArgument, "gather_generation_shard: ", sizes.size(),
                " block sizes for a micro-DP group of ", n, ", or this rank's block (",
                local.size(dim), ") differs from its size in the list");
  // The generation shard is the "global" tensor of this sub-problem: member
  // i holds its block i along `dim`, every member ends with all of it.
  std::vector<int64_t> shape(local.sizes().begin(), local.sizes().end());
  shape[dim] = 0;
  for (int64_t s : sizes) shape[dim] += s;
  std::vector<std::vector<dist::Chunk>> from(n);
  int64_t offset = 0;
  for (int i = 0; i < n; ++i) {
    dist::Box box{std::vector<int64_t>(shape.size(), 0), shape};
    box.offset[dim] = offset;
    box.length[dim] = sizes[i];
    offset += sizes[i];
    from[i].push_back({box, 0});
  }
  const dist::Layout source = dist::Layout::from_chunks(shape, std::move(from), /*flat=*/false);
  const dist::Layout target = dist::Layout::replicated(shape, n);
  at::Tensor out = dist::redistribute(*micro_dp_group, local, source, target);
  if (bytes_received) {
    *bytes_received += static_cast<int64_t>(out.nbytes()) - static_cast<int64_t>(local.nbytes());
  }
  return out;
}

}  // namespace tessera::rlhf
