// Multi-process tests: run under tessera-launch with 2 and 4 ranks on
// 127.0.0.1 (see tests/CMakeLists.txt). Every rank's input is a
// deterministic function of (test, rank), so each rank computes the
// single-process reference of every collective locally and compares.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "test_main.h"

#include <random>

#include "tessera/core/error.h"
#include "tessera/core/runtime.h"
#include "tessera/dist/device_mesh.h"
#include "tessera/dist/redistribute.h"
#include "tessera/dist/rendezvous.h"

namespace tessera::dist {
namespace {

std::shared_ptr<ProcessGroup> g_world;
// CPU for Gloo; this rank's GPU when the group runs on NCCL
// (TESSERA_DIST_BACKEND=nccl, scripts/gpu-check.sh).
at::Device g_device(at::kCPU);

at::TensorOptions dev(at::ScalarType dtype = at::kFloat) {
  return at::TensorOptions().dtype(dtype).device(g_device);
}

bool same(const at::Tensor& a, const at::Tensor& b) { return at::equal(a.cpu(), b.cpu()); }

at::Tensor input_of(int rank, at::IntArrayRef shape, at::ScalarType dtype, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed * 7919 + rank);
  if (at::isIntegralType(dtype, /*includeBool=*/false)) {
    return at::randint(-50, 50, shape, gen, at::kLong).to(dtype).to(g_device);
  }
  return at::randn(shape, gen, at::kDouble).to(dtype).to(g_device);
}

std::vector<at::Tensor> all_inputs(at::IntArrayRef shape, at::ScalarType dtype, uint64_t seed) {
  std::vector<at::Tensor> out;
  for (int r = 0; r < g_world->size(); ++r) out.push_back(input_of(r, shape, dtype, seed));
  return out;
}

// Reference reduction over ranks, in double, cast back.
at::Tensor reference_reduce(const std::vector<at::Tensor>& inputs, ReduceOp op) {
  at::Tensor stacked = at::stack(inputs).to(at::kDouble).cpu();
  at::Tensor r;
  switch (op) {
    case ReduceOp::kSum:
      r = stacked.sum(0);
      break;
    case ReduceOp::kAvg:
      r = stacked.mean(0);
      break;
    case ReduceOp::kMax:
      r = std::get<0>(stacked.max(0));
      break;
    case ReduceOp::kMin:
      r = std::get<0>(stacked.min(0));
      break;
    case ReduceOp::kProduct:
      r = stacked.prod(0);
      break;
  }
  return r;
}

void expect_close(const at::Tensor& got, const at::Tensor& want, at::ScalarType dtype) {
  at::Tensor g = got.cpu();
  if (at::isIntegralType(dtype, false)) {
    ASSERT_TRUE(same(g.to(at::kLong), want.round().to(at::kLong)));
    return;
  }
  double rtol = dtype == at::kBFloat16 ? 1e-2 : dtype == at::kHalf ? 2e-3 : 1e-5;
  ASSERT_TRUE(at::allclose(g.to(at::kDouble), want.to(dtype).to(at::kDouble), rtol, rtol))
      << "max diff " << (g.to(at::kDouble) - want).abs().max().item<double>();
}

TEST(Collectives, AllReduceEveryOpAndDtype) {
  int seed = 1;
  for (auto dtype : {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf, at::kLong, at::kInt}) {
    for (auto op :
         {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMax, ReduceOp::kMin, ReduceOp::kProduct}) {
      if (op == ReduceOp::kAvg && at::isIntegralType(dtype, false)) continue;
      SCOPED_TRACE(std::string(c10::toString(dtype)) + " op " + std::to_string(int(op)));
      auto inputs = all_inputs({5, 33}, dtype, ++seed);
      at::Tensor mine = inputs[g_world->rank()].clone();
      g_world->all_reduce(mine, op).wait();
      expect_close(mine, reference_reduce(inputs, op), dtype);
    }
  }
}

TEST(Collectives, AllReduceNonContiguous) {
  auto inputs = all_inputs({6, 8}, at::kFloat, 99);
  at::Tensor base = inputs[g_world->rank()].clone();
  at::Tensor view = base.t();  // not contiguous
  g_world->all_reduce(view).wait();
  expect_close(base, reference_reduce(inputs, ReduceOp::kSum), at::kFloat);
}

TEST(Collectives, BroadcastFromEveryRoot) {
  for (int root = 0; root < g_world->size(); ++root) {
    for (auto dtype : {at::kFloat, at::kBFloat16, at::kLong}) {
      auto inputs = all_inputs({4, 3}, dtype, 200 + root);
      at::Tensor mine = inputs[g_world->rank()].clone();
      g_world->broadcast(mine, root).wait();
      ASSERT_TRUE(same(mine, inputs[root])) << "root " << root;
    }
  }
}

TEST(Collectives, AllGather) {
  for (auto dtype : {at::kFloat, at::kBFloat16, at::kInt}) {
    auto inputs = all_inputs({3, 5}, dtype, 300);
    at::Tensor out = at::empty({3 * g_world->size(), 5}, dev(dtype));
    g_world->all_gather(out, inputs[g_world->rank()]).wait();
    ASSERT_TRUE(same(out, at::cat(inputs, 0)));
  }
  at::Tensor wrong = at::empty({1, 5}, dev());
  EXPECT_THROW(g_world->all_gather(wrong, at::zeros({3, 5}, dev())), InvalidArgument);
}

TEST(Collectives, ReduceScatter) {
  const int n = g_world->size();
  for (auto dtype : {at::kFloat, at::kBFloat16, at::kDouble}) {
    for (auto op : {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMax}) {
      auto inputs = all_inputs({2 * n, 7}, dtype, 400 + int(op));
      at::Tensor out = at::empty({2, 7}, dev(dtype));
      g_world->reduce_scatter(out, inputs[g_world->rank()], op).wait();
      at::Tensor full = reference_reduce(inputs, op);
      expect_close(out, full.narrow(0, 2 * g_world->rank(), 2), dtype);
    }
  }
}

// reduce_scatter (an all_to_all into a staging buffer, then a local
// reduction) and Gloo's all_gather (a fan-out buffer) stage data inside the
// operation, in blocks the runtime's allocator recycles once freed.
// Several issued before any is waited on, larger and smaller than earlier
// ones, must each keep their own: a block handed to a second operation
// while the first still runs would mix their data.
TEST(Collectives, StagingBuffersOfOperationsInFlight) {
  const int n = g_world->size();
  for (int round = 0; round < 3; ++round) {
    std::vector<std::vector<at::Tensor>> rs_inputs, ag_inputs;
    std::vector<at::Tensor> rs_out, ag_out;
    std::vector<Work> works;
    for (int k = 0; k < 6; ++k) {
      const int64_t rows = (k % 3 + 1) * 4 * n;
      rs_inputs.push_back(all_inputs({rows, 5}, at::kFloat, 700 + 10 * round + k));
      rs_out.push_back(at::empty({rows / n, 5}, dev()));
      works.push_back(g_world->reduce_scatter(rs_out.back(), rs_inputs.back()[g_world->rank()]));
      ag_inputs.push_back(all_inputs({rows / n + k, 3}, at::kFloat, 800 + 10 * round + k));
      ag_out.push_back(at::empty({n * (rows / n + k), 3}, dev()));
      works.push_back(g_world->all_gather(ag_out.back(), ag_inputs.back()[g_world->rank()]));
    }
    for (auto& w : works) w.wait();
    for (size_t k = 0; k < rs_out.size(); ++k) {
      SCOPED_TRACE("round " + std::to_string(round) + " operation " + std::to_string(k));
      const int64_t rows = rs_out[k].size(0);
      expect_close(
          rs_out[k],
          reference_reduce(rs_inputs[k], ReduceOp::kSum).narrow(0, rows * g_world->rank(), rows),
          at::kFloat);
      ASSERT_TRUE(same(ag_out[k], at::cat(ag_inputs[k], 0)));
    }
  }
}

TEST(Collectives, AllToAllEqualAndUneven) {
  const int n = g_world->size();
  const int me = g_world->rank();
  // Equal splits, rows of shape [3, 2].
  {
    auto inputs = all_inputs({2 * n, 3, 2}, at::kFloat, 500);
    at::Tensor out = at::empty({2 * n, 3, 2}, dev());
    g_world->all_to_all(out, inputs[me]).wait();
    std::vector<at::Tensor> expect;
    for (int src = 0; src < n; ++src) expect.push_back(inputs[src].narrow(0, 2 * me, 2));
    ASSERT_TRUE(same(out, at::cat(expect, 0)));
  }
  // Uneven splits, zeros included, as MoE token dispatch produces:
  // rank s sends split(s, d) = (s * 3 + d * 5) % 4 rows to rank d.
  for (auto dtype : {at::kFloat, at::kBFloat16, at::kLong}) {
    auto split = [](int s, int d) { return static_cast<int64_t>((s * 3 + d * 5) % 4); };
    std::vector<int64_t> in_splits, out_splits;
    for (int d = 0; d < n; ++d) in_splits.push_back(split(me, d));
    for (int s = 0; s < n; ++s) out_splits.push_back(split(s, me));
    auto rows_of = [&](int s) {
      int64_t total = 0;
      for (int d = 0; d < n; ++d) total += split(s, d);
      return total;
    };
    std::vector<at::Tensor> inputs;
    for (int s = 0; s < n; ++s) inputs.push_back(input_of(s, {rows_of(s), 4}, dtype, 600));
    int64_t out_rows = 0;
    for (auto v : out_splits) out_rows += v;
    at::Tensor out = at::empty({out_rows, 4}, dev(dtype));
    g_world->all_to_all(out, inputs[me], out_splits, in_splits).wait();
    std::vector<at::Tensor> expect;
    for (int s = 0; s < n; ++s) {
      int64_t offset = 0;
      for (int d = 0; d < me; ++d) offset += split(s, d);
      expect.push_back(inputs[s].narrow(0, offset, split(s, me)));
    }
    ASSERT_TRUE(same(out, at::cat(expect, 0))) << c10::toString(dtype);
  }
  at::Tensor out = at::empty({n, 1}, dev());
  EXPECT_THROW(g_world->all_to_all(out, at::zeros({n, 1}, dev()), {}, std::vector<int64_t>(n, 2)),
               InvalidArgument);
}

TEST(Collectives, SendRecvRing) {
  const int n = g_world->size();
  const int me = g_world->rank();
  if (n < 2) GTEST_SKIP();
  auto inputs = all_inputs({8}, at::kBFloat16, 700);
  at::Tensor got = at::empty({8}, dev(at::kBFloat16));
  // Even ranks send first; odd ranks receive first: no deadlock on any n.
  int next = (me + 1) % n, prev = (me + n - 1) % n;
  if (me % 2 == 0) {
    g_world->send(inputs[me], next, 1).wait();
    g_world->recv(got, prev, 1).wait();
  } else {
    g_world->recv(got, prev, 1).wait();
    g_world->send(inputs[me], next, 1).wait();
  }
  ASSERT_TRUE(same(got, inputs[prev]));
  g_world->barrier().wait();
}

TEST(Subgroups, EvenRanksAndMeshAxes) {
  const int n = g_world->size();
  const int me = g_world->rank();
  std::vector<int> evens;
  for (int r = 0; r < n; r += 2) evens.push_back(r);
  auto group = g_world->new_subgroup(evens, "evens");
  ASSERT_EQ(group != nullptr, me % 2 == 0);
  auto inputs = all_inputs({10}, at::kFloat, 800);
  if (group) {
    EXPECT_EQ(group->size(), static_cast<int>(evens.size()));
    EXPECT_EQ(group->rank(), me / 2);
    at::Tensor mine = inputs[me].clone();
    group->all_reduce(mine).wait();
    std::vector<at::Tensor> members;
    for (int r : evens) members.push_back(inputs[r]);
    expect_close(mine, reference_reduce(members, ReduceOp::kSum), at::kFloat);
    // all_to_all inside the sub-group too.
    at::Tensor out = at::empty({group->size(), 10}, dev());
    group->all_to_all(out, mine.repeat({group->size(), 1})).wait();
    EXPECT_TRUE(at::allclose(out.cpu(), mine.cpu().expand({group->size(), 10})));
  }
  // Every 2-axis mesh of this world: each axis group's sum is the sum over
  // the ranks along that axis.
  for (int64_t a = 1; a <= n; ++a) {
    if (n % a) continue;
    auto mesh = DeviceMesh::create(g_world, {{"dp", a}, {"tp", n / a}});
    for (const std::string axis : {"dp", "tp"}) {
      at::Tensor mine = inputs[me].clone();
      mesh.group(axis)->all_reduce(mine).wait();
      std::vector<at::Tensor> members;
      for (int r : mesh.ranks_along(axis, me)) members.push_back(inputs[r]);
      expect_close(mine, reference_reduce(members, ReduceOp::kSum), at::kFloat);
    }
  }
}

TEST(Redistribute, RandomLayoutsOnRealRanks) {
  const int n = g_world->size();
  const int me = g_world->rank();
  std::mt19937 rng(4242);  // same sequence on every rank
  auto uniform = [&](int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  };
  std::vector<MeshShape> meshes{{{n}, {"a"}}};
  if (n == 4) meshes.push_back({{2, 2}, {"a", "b"}});
  auto random_layout = [&](const std::vector<int64_t>& shape) {
    const MeshShape& mesh = meshes[uniform(0, meshes.size() - 1)];
    std::vector<Placement> placements;
    for (size_t a = 0; a < mesh.sizes.size(); ++a) {
      placements.push_back(uniform(0, 2) == 0
                               ? Placement::Replicate()
                               : Placement::Shard(static_cast<int>(uniform(0, shape.size() - 1))));
    }
    if (uniform(0, 2) == 0) {
      for (size_t a = 0; a < placements.size(); ++a) {
        if (placements[a].kind == Placement::Kind::kReplicate)
          return Layout::sharded_flat(shape, mesh, placements, mesh.names[a]);
      }
    }
    return Layout::sharded(shape, mesh, placements);
  };
  for (int iter = 0; iter < 60; ++iter) {
    std::vector<int64_t> shape(uniform(1, 3));
    for (auto& d : shape) d = uniform(1, 13);
    auto dtype = iter % 3 == 0 ? at::kBFloat16 : at::kFloat;
    Layout from = random_layout(shape), to = random_layout(shape);
    at::Tensor full = input_of(0, shape, dtype, 900 + iter).cpu();
    at::Tensor moved = redistribute(*g_world, extract_local(from, me, full).to(g_device), from, to);
    ASSERT_TRUE(same(moved, extract_local(to, me, full)))
        << "from " << from.to_string() << " to " << to.to_string();
  }
}

// Shard(dim) -> Replicate is the all_gather fast path (rows, columns, and the
// middle dimension of a 3-D tensor); an uneven split along the same dim must
// take the general path and give the same result.
TEST(Redistribute, ShardToReplicateAlongEveryDimension) {
  const int n = g_world->size();
  const int me = g_world->rank();
  const MeshShape mesh{{n}, {"tp"}};
  for (int dim = 0; dim < 3; ++dim) {
    for (bool even : {true, false}) {
      std::vector<int64_t> shape{3, 5, 7};
      shape[dim] = even ? 2 * n : 2 * n + 1;
      const Layout from = Layout::sharded(shape, mesh, {Placement::Shard(dim)});
      const Layout to = Layout::replicated(shape, n);
      at::Tensor full = input_of(0, shape, at::kFloat, 77 + dim).cpu();
      at::Tensor moved =
          redistribute(*g_world, extract_local(from, me, full).to(g_device), from, to);
      ASSERT_TRUE(same(moved, full)) << "dim " << dim << (even ? " even" : " uneven");
    }
  }
}

TEST(Redistribute, RejectsWrongLocalShape) {
  const int n = g_world->size();
  auto from = Layout::sharded({4 * n, 3}, MeshShape{{n}, {"tp"}}, {Placement::Shard(0)});
  auto to = Layout::replicated({4 * n, 3}, n);
  EXPECT_THROW(redistribute(*g_world, at::zeros({3, 3}, dev()), from, to), InvalidArgument);
}

}  // namespace
}  // namespace tessera::dist

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  tessera::init_runtime();
  tessera::dist::InitOptions options;
  options.group.timeout = std::chrono::seconds(60);
  tessera::dist::g_world = tessera::dist::init_process_group(options);
  if (tessera::dist::g_world->backend() == tessera::dist::Backend::kNccl) {
    tessera::dist::g_device = at::Device(
        at::kCUDA, static_cast<c10::DeviceIndex>(tessera::dist::EnvInfo::from_env().local_rank));
  }
  int result = tessera::testutil::run_all_tests();
  // Keep rank 0's store alive until everyone is done.
  tessera::dist::g_world->barrier().wait();
  tessera::dist::g_world.reset();
  return result;
}
