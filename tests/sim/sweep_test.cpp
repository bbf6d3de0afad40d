// sim: layout x world-size sweeps and the `tessera-sim collective` core.
#include "tessera/sim/sweep.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <string>

#include "tessera/core/error.h"
#include "tessera/sim/collective_model.h"

namespace tessera::sim {
namespace {

std::string detail_format_two_decimals(double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.2f\n", v);
  return buf;
}

std::string a100_file() { return std::string(TESSERA_SOURCE_DIR) + "/data/sim/a100_ib.json"; }

// A data-parallel step: `layers` gradient all_reduces of 32 MB over dp,
// each after 500 us of backward, and "tp=k" layouts that also all_reduce
// 8 MB activations over tensor-parallel groups of k consecutive ranks.
Trace make_trace(const std::string& layout, int world) {
  int tp = 1;
  TESSERA_CHECK(layout.rfind("tp=", 0) == 0, InvalidArgument, "unknown layout '", layout, "'");
  tp = std::stoi(layout.substr(3));
  TESSERA_CHECK(tp >= 1 && world % tp == 0, InvalidArgument, "layout ", layout,
                " does not divide world size ", world);
  const int dp = world / tp;
  Trace t;
  t.source = layout;
  t.metadata.world_size = world;
  t.metadata.layout = {{"dp", dp}, {"tp", tp}};
  t.metadata.memory_capacity_bytes = int64_t{40} << 30;
  for (int d = 0; d < dp; ++d) {
    std::vector<int> g;
    for (int k = 0; k < tp; ++k) g.push_back(d * tp + k);
    t.metadata.groups["tp"].push_back(g);
  }
  for (int k = 0; k < tp; ++k) {
    std::vector<int> g;
    for (int d = 0; d < dp; ++d) g.push_back(d * tp + k);
    t.metadata.groups["dp"].push_back(g);
  }
  RankTrace rt;
  for (int r = 0; r < world; ++r) rt.ranks.push_back(r);
  // Model weights are split over tp: a smaller footprint with more tp.
  rt.peak_memory_bytes = (int64_t{48} << 30) / tp;
  int64_t id = 0;
  for (int l = 0; l < 4; ++l) {
    TraceNode c;
    c.id = id++;
    c.kind = NodeKind::kCompute;
    c.name = "bwd";
    c.stream = "compute";
    c.duration = Microseconds(500.0 / tp);
    rt.nodes.push_back(c);
    if (tp > 1) {
      TraceNode a;
      a.id = id++;
      a.kind = NodeKind::kCollective;
      a.name = "tp.ar";
      a.stream = "tp";
      a.op = CollectiveKind::kAllReduce;
      a.group.partition = "tp";
      a.bytes = 8 << 20;
      a.deps = {c.id};
      rt.nodes.push_back(a);
    }
    TraceNode g;
    g.id = id++;
    g.kind = NodeKind::kCollective;
    g.name = "dp.ar";
    g.stream = "dp";
    g.op = CollectiveKind::kAllReduce;
    g.group.partition = "dp";
    g.bytes = (32 << 20) / tp;
    g.deps = {c.id};
    rt.nodes.push_back(g);
  }
  t.entries.push_back(rt);
  t.validate();
  return t;
}

TEST(Sweep, OneRowPerLayoutAndWorldSizeWithErrorsInPlace) {
  const CollectiveModel model(ClusterSpec::load_file(a100_file()));
  SweepOptions o;
  o.layouts = {"tp=1", "tp=8", "pp=2"};
  o.world_sizes = {8, 64};
  o.simulation.collectives = &model;
  const std::vector<SweepRow> rows = sweep(make_trace, o);
  ASSERT_EQ(rows.size(), 6u);
  EXPECT_EQ(rows[0].layout, "tp=1");
  EXPECT_EQ(rows[1].world_size, 64);
  for (int i = 0; i < 4; ++i) EXPECT_TRUE(rows[i].ok) << rows[i].error;
  EXPECT_FALSE(rows[4].ok);
  EXPECT_NE(rows[4].error.find("unknown layout 'pp=2'"), std::string::npos) << rows[4].error;
  // Each row matches a direct simulation of the same trace.
  SimulationOptions direct;
  direct.collectives = &model;
  const SimulationResult r = simulate(make_trace("tp=8", 64), direct);
  EXPECT_DOUBLE_EQ(rows[3].step_time.count(), r.step_time.count());
  EXPECT_DOUBLE_EQ(rows[3].compute.count(), r.ranks[r.slowest_rank].compute.count());
  // 4 x 500 us of compute at tp = 1; the last gradient all_reduce of 32 MB
  // over 64 ranks on 8 nodes is exposed after it.
  EXPECT_DOUBLE_EQ(rows[1].compute.count(), 2000);
  EXPECT_GT(rows[1].exposed_comm.count(), 0);
  EXPECT_TRUE(rows[0].out_of_memory);   // 48 GiB on a 40 GiB device
  EXPECT_FALSE(rows[2].out_of_memory);  // 6 GiB with tp = 8
  const std::string table = format_sweep_table(rows);
  EXPECT_NE(table.find("error: INVALID_ARGUMENT: unknown layout 'pp=2'"), std::string::npos)
      << table;
  EXPECT_NE(table.find("OOM"), std::string::npos);
  const std::string csv = sweep_to_csv(rows);
  EXPECT_EQ(std::count(csv.begin(), csv.end(), '\n'), 7);
  std::cout << table;

  SweepOptions empty = o;
  empty.layouts.clear();
  EXPECT_THROW(sweep(make_trace, empty), InvalidArgument);
  SweepOptions no_model = o;
  no_model.simulation.collectives = nullptr;
  EXPECT_THROW(sweep(make_trace, no_model), InvalidArgument);
}

TEST(CollectiveCommand, ParsesFlags) {
  const CollectiveCommand c =
      parse_collective_command({"--op", "all_gather", "--gpus", "16", "--bytes", "64M", "--cluster",
                                "c.json", "--algorithm=ring", "--dtype", "bfloat16"});
  EXPECT_EQ(c.op, CollectiveKind::kAllGather);
  EXPECT_EQ(c.gpus, 16);
  EXPECT_EQ(c.bytes, int64_t{64} << 20);
  EXPECT_EQ(c.cluster_file, "c.json");
  EXPECT_EQ(c.algorithm, Algorithm::kRing);
  EXPECT_EQ(c.dtype, "bfloat16");
  EXPECT_FALSE(c.table);
  const CollectiveCommand t = parse_collective_command(
      {"--gpus=8", "--cluster=c.json", "--table", "--min-bytes", "1K", "--max-bytes", "1G"});
  EXPECT_TRUE(t.table);
  EXPECT_EQ(t.min_bytes, 1024);
  EXPECT_EQ(t.max_bytes, int64_t{1} << 30);
  auto expect_error = [](const std::vector<std::string>& args, const std::string& needle) {
    try {
      parse_collective_command(args);
      ADD_FAILURE() << "accepted: " << needle;
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_error({"--gpus", "8", "--cluster", "c"}, "--bytes is required");
  expect_error({"--bytes", "8", "--cluster", "c"}, "--gpus is required");
  expect_error({"--gpus", "8", "--bytes", "8"}, "--cluster is required");
  expect_error({"--gpus", "8", "--bytes", "12X", "--cluster", "c"}, "--bytes: unknown size suffix");
  expect_error({"--gpus", "zero", "--bytes", "8", "--cluster", "c"}, "--gpus: expected a positive");
  expect_error({"--gpus", "8", "--bytes", "8", "--cluster", "c", "--fast"},
               "unknown flag '--fast'");
  expect_error({"--gpus", "8", "--bytes"}, "--bytes: missing value");
  expect_error({"--op", "allreduce"}, "unknown collective 'allreduce'");
  expect_error({"--gpus", "8", "--bytes", "8", "--cluster", "c", "--dtype", "fp4"},
               "unknown dtype 'fp4'");
}

TEST(CollectiveCommand, OneLineAndANcclTestsTableThatParsesBack) {
  const ClusterSpec cluster = ClusterSpec::load_file(a100_file());
  const CollectiveModel model(cluster);
  CollectiveCommand c = parse_collective_command(
      {"--op", "all_reduce", "--gpus", "16", "--bytes", "64M", "--cluster", a100_file()});
  const std::string line = run_collective_command(c);
  const double expected =
      model.estimate(CollectiveKind::kAllReduce, GroupShape::packed(16, 8), 64 << 20).time.count();
  EXPECT_EQ(line, detail_format_two_decimals(expected));
  std::cout << "tessera-sim collective --op all_reduce --gpus 16 --bytes 64M: " << line;

  c.table = true;
  const std::string table = run_collective_command(c, cluster);
  const std::vector<Measurement> rows = parse_nccl_tests(table, "model.log");
  ASSERT_EQ(rows.size(), 28u);  // 8 B .. 1 GiB
  EXPECT_EQ(rows.front().bytes, 8);
  EXPECT_EQ(rows.back().bytes, int64_t{1} << 30);
  EXPECT_EQ(rows.front().shape.ranks, 16);
  EXPECT_EQ(rows.front().shape.nodes, 2);
  for (const Measurement& m : rows) {
    const double want = model.estimate(CollectiveKind::kAllReduce, m.shape, m.bytes).time.count();
    EXPECT_NEAR(m.time.count(), want, 0.005 + 1e-9 * want) << m.bytes;
  }
  EXPECT_NE(table.find("float    sum"), std::string::npos) << table;
}

}  // namespace
}  // namespace tessera::sim
