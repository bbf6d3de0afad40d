// Layouts and the overlap planner, without processes: plans are executed
// with redistribute_offline(), which runs every rank's part in one process.
#include "tessera/dist/layout.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <random>

#include "tessera/core/error.h"
#include "tessera/dist/redistribute.h"

namespace tessera::dist {
namespace {

TEST(Layout, DecomposeFlatRangeIsContiguousAndComplete) {
  std::vector<int64_t> shape{3, 4, 5};
  // Every range of a small tensor: boxes must enumerate exactly the range's
  // elements, in row-major order.
  for (int64_t b = 0; b <= 60; ++b) {
    for (int64_t e = b; e <= 60; ++e) {
      auto boxes = decompose_flat_range(shape, b, e);
      EXPECT_LE(boxes.size(), 5u);
      int64_t expect = b;
      for (const Box& box : boxes) {
        for (int64_t i = 0; i < box.length[0]; ++i)
          for (int64_t j = 0; j < box.length[1]; ++j)
            for (int64_t k = 0; k < box.length[2]; ++k) {
              int64_t flat = ((box.offset[0] + i) * 4 + box.offset[1] + j) * 5 + box.offset[2] + k;
              ASSERT_EQ(flat, expect) << "range [" << b << ", " << e << ") box " << box.to_string();
              ++expect;
            }
      }
      ASSERT_EQ(expect, e);
    }
  }
}

TEST(Layout, ShardedBoxesFollowArraySplit) {
  MeshShape mesh{{2, 3}, {"dp", "tp"}};
  auto layout = Layout::sharded({10, 7}, mesh, {Placement::Shard(0), Placement::Shard(1)});
  EXPECT_EQ(layout.world_size(), 6);
  // rank 5 = (dp 1, tp 2): rows 5..10, columns 5..7 (7 = 3 + 2 + 2).
  EXPECT_EQ(layout.chunks(5)[0].box.to_string(), "[5:10, 5:7]");
  EXPECT_EQ(layout.chunks(0)[0].box.to_string(), "[0:5, 0:3]");
  EXPECT_EQ(layout.local_shape(1), (std::vector<int64_t>{5, 2}));
  EXPECT_TRUE(layout.covers_exactly());
  // Two axes sharding one dimension nest: dp outer, tp inner.
  auto nested = Layout::sharded({12}, mesh, {Placement::Shard(0), Placement::Shard(0)});
  EXPECT_EQ(nested.chunks(4)[0].box.to_string(), "[8:10]");
}

TEST(Layout, ZeroFlatShardsOfTensorParallelShards) {
  MeshShape mesh{{2, 2}, {"dp", "tp"}};
  auto layout =
      Layout::sharded_flat({4, 6}, mesh, {Placement::Replicate(), Placement::Shard(1)}, "dp");
  // tp shard 0 is columns 0..3 (12 elements); dp rank 1 holds its flat
  // elements [6, 12): rows 2..4 of those columns.
  EXPECT_EQ(layout.local_shape(2), (std::vector<int64_t>{6}));
  ASSERT_EQ(layout.chunks(2).size(), 1u);
  EXPECT_EQ(layout.chunks(2)[0].box.to_string(), "[2:4, 0:3]");
  EXPECT_TRUE(layout.covers_exactly());
}

TEST(Layout, InvalidLayoutsAreRejected) {
  MeshShape mesh{{2}, {"tp"}};
  EXPECT_THROW(Layout::sharded({4}, mesh, {Placement::Shard(1)}), InvalidArgument);
  EXPECT_THROW(Layout::sharded({4}, mesh, {}), InvalidArgument);
  EXPECT_THROW(mesh.axis("ep"), NotFound);
  EXPECT_THROW(Layout::flat({4}, {{0, 5}}), InvalidArgument);
  // Partially overlapping ranges do not tile: not a valid source.
  auto overlap = Layout::flat({8}, {{0, 5}, {3, 8}});
  EXPECT_FALSE(overlap.covers_exactly());
  EXPECT_THROW(plan_redistribute(overlap, Layout::replicated({8}, 2)), InvalidArgument);
  auto gap = Layout::flat({8}, {{0, 3}, {4, 8}});
  EXPECT_THROW(plan_redistribute(gap, Layout::replicated({8}, 2)), InvalidArgument);
  EXPECT_THROW(plan_redistribute(Layout::replicated({8}, 2), Layout::replicated({8}, 3)),
               InvalidArgument);
}

TEST(Planner, ReplicasAreReadOnceAndFromSelfFirst) {
  MeshShape mesh{{2, 2}, {"dp", "tp"}};
  auto from = Layout::sharded({8, 8}, mesh, {Placement::Replicate(), Placement::Shard(0)});
  auto to = Layout::sharded({8, 8}, mesh, {Placement::Replicate(), Placement::Shard(1)});
  auto plan = plan_redistribute(from, to);
  // Each target rank needs 32 elements; it holds 16 of them itself (its own
  // row block), so 16 cross ranks per target.
  EXPECT_EQ(plan.moved_elements(), 4 * 16);
  for (const auto& t : plan.transfers) {
    // Sources are spread: each rank sends exactly one 16-element piece.
    if (t.src_rank != t.dst_rank) {
      EXPECT_EQ(t.box.numel(), 16);
    }
  }
  auto sends = plan.send_elements(4);
  for (int64_t s : sends) EXPECT_EQ(s, 16);
}

// Random layouts over random meshes for random shapes.
struct RandomLayouts {
  std::mt19937 rng;
  explicit RandomLayouts(uint32_t seed) : rng(seed) {}
  int64_t uniform(int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  }

  MeshShape mesh_for(int world) {
    // Factor `world` into up to three axes at random.
    std::vector<int64_t> sizes;
    int rest = world;
    while (rest > 1 && sizes.size() < 2) {
      std::vector<int> divisors;
      for (int d = 1; d <= rest; ++d)
        if (rest % d == 0) divisors.push_back(d);
      int d = divisors[uniform(0, divisors.size() - 1)];
      sizes.push_back(d);
      rest /= d;
    }
    sizes.push_back(rest);
    MeshShape mesh;
    mesh.sizes = sizes;
    for (size_t i = 0; i < sizes.size(); ++i) mesh.names.push_back("a" + std::to_string(i));
    return mesh;
  }

  Layout layout(const std::vector<int64_t>& shape, int world) {
    MeshShape mesh = mesh_for(world);
    std::vector<Placement> placements;
    for (size_t a = 0; a < mesh.sizes.size(); ++a) {
      if (shape.empty() || uniform(0, 2) == 0) {
        placements.push_back(Placement::Replicate());
      } else {
        placements.push_back(Placement::Shard(static_cast<int>(uniform(0, shape.size() - 1))));
      }
    }
    switch (uniform(0, 3)) {
      case 0: {  // ZeRO over one replicated axis
        std::vector<int> replicated;
        for (size_t a = 0; a < placements.size(); ++a)
          if (placements[a].kind == Placement::Kind::kReplicate) replicated.push_back(a);
        if (!replicated.empty()) {
          int axis = replicated[uniform(0, replicated.size() - 1)];
          return Layout::sharded_flat(shape, mesh, placements, mesh.names[axis]);
        }
        return Layout::sharded(shape, mesh, placements);
      }
      case 1: {  // irregular flat ranges: random cut points, some empty
        int64_t n = 1;
        for (auto s : shape) n *= s;
        std::vector<int64_t> cuts{0, n};
        for (int r = 1; r < world; ++r) cuts.push_back(uniform(0, n));
        std::sort(cuts.begin(), cuts.end());
        std::vector<std::pair<int64_t, int64_t>> ranges;
        for (int r = 0; r < world; ++r) ranges.push_back({cuts[r], cuts[r + 1]});
        std::shuffle(ranges.begin(), ranges.end(), rng);
        return Layout::flat(shape, ranges);
      }
      default:
        return Layout::sharded(shape, mesh, placements);
    }
  }

  std::vector<int64_t> shape() {
    std::vector<int64_t> s(uniform(0, 4));
    for (auto& d : s) d = uniform(1, 9);
    if (!s.empty() && uniform(0, 5) == 0) s[uniform(0, s.size() - 1)] = 0;  // empty tensors too
    return s;
  }
};

TEST(Planner, PropertyRandomLayoutsReassembleExactly) {
  RandomLayouts gen(20261128);
  int checked = 0;
  for (int iter = 0; iter < 600; ++iter) {
    int world = static_cast<int>(gen.uniform(1, 8));
    auto shape = gen.shape();
    Layout from = gen.layout(shape, world);
    Layout to = gen.layout(shape, world);
    SCOPED_TRACE("from " + from.to_string() + " to " + to.to_string());
    at::Tensor full = at::arange(from.global_numel(), at::kDouble).view(shape);
    std::vector<at::Tensor> locals;
    for (int r = 0; r < world; ++r) locals.push_back(extract_local(from, r, full));
    auto plan = plan_redistribute(from, to);
    auto moved = redistribute_offline(locals, from, to, plan);
    int64_t received = 0;
    for (const auto& t : plan.transfers) received += t.box.numel();
    int64_t wanted = 0;
    for (int r = 0; r < world; ++r) {
      wanted += to.local_numel(r);
      ASSERT_TRUE(at::equal(moved[r], extract_local(to, r, full))) << "rank " << r;
    }
    // Each target element is written exactly once.
    ASSERT_EQ(received, wanted);
    // Reassemble from the target layout: the original tensor, exactly.
    at::Tensor back = at::full(shape, -1.0, at::kDouble);
    for (int r = 0; r < world; ++r) insert_local(to, r, moved[r], back);
    if (to.covers_exactly()) {
      ASSERT_TRUE(at::equal(back, full));
    }
    ++checked;
  }
  EXPECT_EQ(checked, 600);
}

TEST(Planner, OfflineRejectsWrongLocalShapes) {
  auto from = Layout::sharded({4, 4}, MeshShape{{2}, {"tp"}}, {Placement::Shard(0)});
  auto to = Layout::replicated({4, 4}, 2);
  auto plan = plan_redistribute(from, to);
  std::vector<at::Tensor> locals{at::zeros({2, 4}), at::zeros({4, 2})};
  try {
    redistribute_offline(locals, from, to, plan);
    FAIL();
  } catch (const InvalidArgument& e) {
    EXPECT_NE(e.message().find("rank 1"), std::string::npos) << e.message();
  }
}

}  // namespace
}  // namespace tessera::dist
