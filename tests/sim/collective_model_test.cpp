// sim: the collective cost formulas against hand computation, fitting on
// synthetic data with known parameters, the nccl-tests and benchmark
// parsers, and the fitted A100 cluster against the measured tables.
#include "tessera/sim/collective_model.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <random>
#include <sstream>

#include "tessera/core/error.h"
#include "tessera/sim/cluster.h"

namespace tessera::sim {
namespace {

std::string sim_data_dir() { return std::string(TESSERA_SOURCE_DIR) + "/data/sim"; }

// One regime with round numbers for hand computation.
RegimeParams regime(double setup, double intra_hop, double inter_hop, double intra_gbps,
                    double inter_gbps, double reduce_gbps = 0, int64_t max_bytes = 0,
                    const std::string& protocol = "simple") {
  RegimeParams r;
  r.protocol = protocol;
  r.max_bytes = max_bytes;
  r.setup_us = setup;
  r.intra_hop_us = intra_hop;
  r.inter_hop_us = inter_hop;
  r.intra_gbps = intra_gbps;
  r.inter_gbps = inter_gbps;
  r.reduce_gbps = reduce_gbps;
  return r;
}

ClusterSpec hand_cluster() {
  ClusterSpec c;
  c.name = "hand";
  c.topology.devices_per_node = 8;
  c.topology.nics_per_node = 8;
  c.defaults.algorithms[Algorithm::kRing] = {regime(10, 2, 7, 100, 25)};
  c.defaults.algorithms[Algorithm::kTree] = {regime(10, 2, 7, 100, 25)};
  c.defaults.algorithms[Algorithm::kDirect] = {regime(3, 1, 4, 200, 20)};
  c.defaults.algorithms[Algorithm::kLocal] = {regime(4, 0, 0, 500, 500)};
  return c;
}

double us(const CollectiveModel& m, CollectiveKind op, GroupShape shape, int64_t bytes) {
  return m.estimate(op, shape, bytes).time.count();
}

TEST(GroupShape, CountsNodesAndTheFullestNode) {
  const GroupShape s = GroupShape::of({0, 1, 8, 9, 10}, 8);
  EXPECT_EQ(s.ranks, 5);
  EXPECT_EQ(s.nodes, 2);
  EXPECT_EQ(s.max_ranks_per_node, 3);
  const GroupShape p = GroupShape::packed(20, 8);
  EXPECT_EQ(p.ranks, 20);
  EXPECT_EQ(p.nodes, 3);
  EXPECT_EQ(p.max_ranks_per_node, 8);
  EXPECT_THROW(GroupShape::of({}, 8), InvalidArgument);
}

TEST(CollectiveFormulas, RingAllReduceInAndAcrossNodes) {
  CollectiveModelOptions ring_only;
  ring_only.algorithm = Algorithm::kRing;
  CollectiveModel m(hand_cluster(), ring_only);
  // n = 8, one node: 14 steps of 2 us, 1.75 MB at 100 GB/s = 17.5 us.
  EXPECT_DOUBLE_EQ(us(m, CollectiveKind::kAllReduce, GroupShape::packed(8, 8), 1000000),
                   10 + 14 * 2 + 17.5);
  // n = 16 on 2 nodes: 30 steps, 4 of them across nodes; 1.875 MB at
  // min(100, 25) GB/s = 75 us.
  EXPECT_DOUBLE_EQ(us(m, CollectiveKind::kAllReduce, GroupShape::packed(16, 8), 1000000),
                   10 + 26 * 2 + 4 * 7 + 75);
  // n = 2 on 2 nodes (one rank each): 2 steps, both across nodes.
  EXPECT_DOUBLE_EQ(us(m, CollectiveKind::kAllReduce, GroupShape::of({0, 8}, 8), 1000000),
                   10 + 2 * 7 + 1e6 / 25e3);
}

TEST(CollectiveFormulas, TreeAllReduceAndAutomaticChoice) {
  CollectiveModelOptions tree_only;
  tree_only.algorithm = Algorithm::kTree;
  CollectiveModel tree(hand_cluster(), tree_only);
  // n = 32 on 4 nodes: chains of 7 steps each way, 2·ceil(log2 4) = 4 tree
  // steps; 2·31/32 MB at 25 GB/s.
  EXPECT_DOUBLE_EQ(us(tree, CollectiveKind::kAllReduce, GroupShape::packed(32, 8), 1000000),
                   10 + 14 * 2 + 4 * 7 + 1.9375e6 / 25e3);
  // Three nodes round the tree depth up: ceil(log2 3) = 2.
  EXPECT_DOUBLE_EQ(us(tree, CollectiveKind::kAllReduce, GroupShape::packed(24, 8), 0),
                   10 + 14 * 2 + 4 * 7);
  // Automatic: the tree has fewer steps, same bandwidth here, so it wins
  // across nodes; inside a node both have 2(n-1) steps and ring is kept.
  CollectiveModel automatic(hand_cluster());
  const auto across =
      automatic.estimate(CollectiveKind::kAllReduce, GroupShape::packed(32, 8), 4096);
  EXPECT_EQ(across.algorithm, Algorithm::kTree);
  const auto inside =
      automatic.estimate(CollectiveKind::kAllReduce, GroupShape::packed(8, 8), 4096);
  EXPECT_EQ(inside.algorithm, Algorithm::kRing);
  // A slower tree bandwidth makes ring win for large messages.
  ClusterSpec c = hand_cluster();
  c.defaults.algorithms[Algorithm::kTree] = {regime(10, 2, 7, 50, 12.5)};
  CollectiveModel slow_tree(c);
  EXPECT_EQ(slow_tree.estimate(CollectiveKind::kAllReduce, GroupShape::packed(32, 8), 64).algorithm,
            Algorithm::kTree);
  EXPECT_EQ(
      slow_tree.estimate(CollectiveKind::kAllReduce, GroupShape::packed(32, 8), 1 << 30).algorithm,
      Algorithm::kRing);
}

TEST(CollectiveFormulas, GatherScatterBroadcastWithReduction) {
  ClusterSpec c = hand_cluster();
  c.defaults.algorithms[Algorithm::kRing] = {regime(10, 2, 7, 100, 25, /*reduce_gbps=*/50)};
  CollectiveModel m(c);
  const GroupShape four = GroupShape::packed(4, 8);
  // all_gather: 3 steps, 3/4 of 400 kB at 100 GB/s; no reduction term.
  EXPECT_DOUBLE_EQ(us(m, CollectiveKind::kAllGather, four, 400000), 10 + 3 * 2 + 3.0);
  // reduce_scatter adds 3/4 of 400 kB at 50 GB/s.
  EXPECT_DOUBLE_EQ(us(m, CollectiveKind::kReduceScatter, four, 400000), 10 + 3 * 2 + 3.0 + 6.0);
  // broadcast: a pipelined chain, the whole message once.
  EXPECT_DOUBLE_EQ(us(m, CollectiveKind::kBroadcast, four, 400000), 10 + 3 * 2 + 4.0);
  // all_gather over 3 nodes (n = 24): 23 steps, 3 across nodes.
  EXPECT_DOUBLE_EQ(us(m, CollectiveKind::kAllGather, GroupShape::packed(24, 8), 0),
                   10 + 20 * 2 + 3 * 7);
  // all_reduce with reduction: ring all_reduce reduces (n-1)/n of the data.
  CollectiveModelOptions ring_only;
  ring_only.algorithm = Algorithm::kRing;
  CollectiveModel r(c, ring_only);
  EXPECT_DOUBLE_EQ(us(r, CollectiveKind::kAllReduce, four, 400000),
                   10 + 6 * 2 + 1.5 * 400000 / 100e3 + 0.75 * 400000 / 50e3);
}

TEST(CollectiveFormulas, PointToPointAllToAllAndLocal) {
  CollectiveModel m(hand_cluster());
  // send_recv inside a node: one step, 1 MB at 200 GB/s; across: 20 GB/s.
  EXPECT_DOUBLE_EQ(us(m, CollectiveKind::kSendRecv, GroupShape::of({0, 1}, 8), 1000000), 3 + 1 + 5);
  EXPECT_DOUBLE_EQ(us(m, CollectiveKind::kSendRecv, GroupShape::of({0, 8}, 8), 1000000),
                   3 + 4 + 50);
  // all_to_all over 16 ranks on 2 nodes: 7 peers inside, 8 outside; per
  // rank 7/16 MB over NVLink (2.1875 us) vs 8/16 MB over one NIC each
  // (8 NICs for 8 GPUs) at 20 GB/s = 25 us: the network dominates.
  EXPECT_DOUBLE_EQ(us(m, CollectiveKind::kAllToAll, GroupShape::packed(16, 8), 1000000),
                   3 + 7 * 1 + 8 * 4 + 25);
  // With 2 NICs for 8 GPUs each GPU gets a quarter NIC.
  ClusterSpec c = hand_cluster();
  c.topology.nics_per_node = 2;
  CollectiveModel few_nics(c);
  EXPECT_DOUBLE_EQ(us(few_nics, CollectiveKind::kAllToAll, GroupShape::packed(16, 8), 1000000),
                   3 + 7 * 1 + 8 * 4 + 100);
  // One rank: a local copy at 500 GB/s.
  const auto local = m.estimate(CollectiveKind::kAllReduce, GroupShape::packed(1, 8), 1000000);
  EXPECT_EQ(local.algorithm, Algorithm::kLocal);
  EXPECT_DOUBLE_EQ(local.time.count(), 4 + 2);
  // Without local parameters a one-rank collective is free.
  c.defaults.algorithms.erase(Algorithm::kLocal);
  EXPECT_EQ(CollectiveModel(c)
                .estimate(CollectiveKind::kAllGather, GroupShape::packed(1, 8), 99)
                .time.count(),
            0.0);
}

TEST(CollectiveFormulas, RegimesAreChosenBySizeInclusive) {
  ClusterSpec c = hand_cluster();
  c.defaults.algorithms[Algorithm::kRing] = {regime(1, 0, 0, 10, 10, 0, 1024, "ll"),
                                             regime(50, 0, 0, 1000, 1000, 0, 0, "simple")};
  CollectiveModelOptions ring_only;
  ring_only.algorithm = Algorithm::kRing;
  CollectiveModel m(c, ring_only);
  const GroupShape two = GroupShape::packed(2, 8);  // F = 1
  EXPECT_EQ(m.estimate(CollectiveKind::kAllReduce, two, 1024).protocol, "ll");
  EXPECT_DOUBLE_EQ(us(m, CollectiveKind::kAllReduce, two, 1024), 1 + 1024 / 10e3);
  EXPECT_EQ(m.estimate(CollectiveKind::kAllReduce, two, 1025).protocol, "simple");
  EXPECT_DOUBLE_EQ(us(m, CollectiveKind::kAllReduce, two, 1025), 50 + 1025 / 1000e3);
}

TEST(CollectiveFormulas, NamedErrors) {
  ClusterSpec c = hand_cluster();
  CollectiveModelOptions tree_only;
  tree_only.algorithm = Algorithm::kTree;
  CollectiveModel tree(c, tree_only);
  try {
    tree.estimate(CollectiveKind::kAllGather, GroupShape::packed(4, 8), 10);
    ADD_FAILURE() << "tree all_gather accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("tree cannot run all_gather"), std::string::npos)
        << e.what();
  }
  c.defaults.algorithms.erase(Algorithm::kDirect);
  try {
    CollectiveModel(c).estimate(CollectiveKind::kAllToAll, GroupShape::packed(4, 8), 10);
    ADD_FAILURE() << "missing direct parameters accepted";
  } catch (const NotFound& e) {
    EXPECT_NE(std::string(e.what()).find("no parameters for all_to_all"), std::string::npos)
        << e.what();
  }
  EXPECT_THROW(CollectiveModel(hand_cluster())
                   .estimate(CollectiveKind::kAllReduce, GroupShape::packed(4, 8), -1),
               InvalidArgument);
  GroupShape bad;
  bad.ranks = 4;
  bad.nodes = 5;
  EXPECT_THROW(CollectiveModel(hand_cluster()).estimate(CollectiveKind::kAllReduce, bad, 1),
               InvalidArgument);
}

// Measurements generated by the model itself from known parameters.
std::vector<Measurement> synthesize(const ClusterSpec& truth, CollectiveKind op,
                                    const std::vector<GroupShape>& shapes, double noise,
                                    uint64_t seed, Algorithm algorithm = Algorithm::kRing) {
  CollectiveModelOptions o;
  o.algorithm = algorithm;
  CollectiveModel m(truth, o);
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> jitter(-noise, noise);
  std::vector<Measurement> out;
  for (const GroupShape& s : shapes) {
    for (int64_t bytes = 8; bytes <= (int64_t{1} << 30); bytes *= 2) {
      Measurement x;
      x.op = op;
      x.shape = s;
      x.bytes = bytes;
      x.time = Microseconds(m.estimate(op, s, bytes).time.count() * (1 + jitter(rng)));
      x.origin = "synthetic";
      out.push_back(x);
    }
  }
  return out;
}

void expect_close(double fitted, double truth, double rel, const char* what) {
  EXPECT_NEAR(fitted, truth, rel * std::fabs(truth)) << what;
}

TEST(CollectiveFit, RecoversTwoRegimesIncludingInterNodeTerms) {
  ClusterSpec truth = hand_cluster();
  truth.defaults.algorithms[Algorithm::kRing] = {regime(6, 1.5, 4, 15, 8, 0, 65536, "ll"),
                                                 regime(55, 1.0, 3, 220, 120, 0, 0, "simple")};
  const std::vector<GroupShape> shapes = {GroupShape::packed(2, 8), GroupShape::packed(4, 8),
                                          GroupShape::packed(8, 8), GroupShape::packed(16, 8),
                                          GroupShape::packed(32, 8)};
  const auto data = synthesize(truth, CollectiveKind::kAllReduce, shapes, 0, 1);
  FitOptions o;
  o.significant_digits = 12;
  const FitReport fit = fit_algorithm(data, o);
  ASSERT_EQ(fit.regimes.size(), 2u);
  EXPECT_TRUE(fit.inter_node_from_data);
  EXPECT_FALSE(fit.reduction_from_data);
  EXPECT_EQ(fit.regimes[0].max_bytes, 65536);
  const auto& want = truth.defaults.algorithms[Algorithm::kRing];
  for (size_t i = 0; i < 2; ++i) {
    expect_close(fit.regimes[i].setup_us, want[i].setup_us, 1e-6, "setup");
    expect_close(fit.regimes[i].intra_hop_us, want[i].intra_hop_us, 1e-6, "intra hop");
    expect_close(fit.regimes[i].inter_hop_us, want[i].inter_hop_us, 1e-6, "inter hop");
    expect_close(fit.regimes[i].intra_gbps, want[i].intra_gbps, 1e-6, "intra bandwidth");
    expect_close(fit.regimes[i].inter_gbps, want[i].inter_gbps, 1e-6, "inter bandwidth");
  }
  EXPECT_LT(fit.max_abs_rel_error, 1e-9);

  // With 2% noise the parameters come back within a few percent.
  const auto noisy = synthesize(truth, CollectiveKind::kAllReduce, shapes, 0.02, 7);
  const FitReport nfit = fit_algorithm(noisy, o);
  ASSERT_EQ(nfit.regimes.size(), 2u);
  expect_close(nfit.regimes[1].intra_gbps, 220, 0.03, "noisy intra bandwidth");
  expect_close(nfit.regimes[1].inter_gbps, 120, 0.03, "noisy inter bandwidth");
  expect_close(nfit.regimes[0].setup_us, 6, 0.1, "noisy small-message setup");
  EXPECT_LT(nfit.rms_rel_error, 0.02);
}

TEST(CollectiveFit, OneRegimeWhenTheDataHaveOne) {
  ClusterSpec truth = hand_cluster();
  truth.defaults.algorithms[Algorithm::kRing] = {regime(20, 1.2, 5, 150, 50)};
  const auto data = synthesize(
      truth, CollectiveKind::kAllReduce,
      {GroupShape::packed(2, 8), GroupShape::packed(8, 8), GroupShape::packed(16, 8)}, 0.01, 3);
  const FitReport fit = fit_algorithm(data, FitOptions{});
  ASSERT_EQ(fit.regimes.size(), 1u);
  EXPECT_EQ(fit.regimes[0].protocol, "all");
  EXPECT_EQ(fit.regimes[0].max_bytes, 0);
  expect_close(fit.regimes[0].intra_gbps, 150, 0.02, "bandwidth");
}

TEST(CollectiveFit, ReductionThroughputNeedsReducingAndPlainCollectives) {
  ClusterSpec truth = hand_cluster();
  truth.defaults.algorithms[Algorithm::kRing] = {regime(20, 1.0, 5, 150, 50, /*reduce=*/300)};
  const std::vector<GroupShape> shapes = {GroupShape::packed(4, 8), GroupShape::packed(8, 8)};
  auto data = synthesize(truth, CollectiveKind::kReduceScatter, shapes, 0, 1);
  const auto gathers = synthesize(truth, CollectiveKind::kAllGather, shapes, 0, 2);
  data.insert(data.end(), gathers.begin(), gathers.end());
  FitOptions o;
  o.max_regimes = 1;
  o.significant_digits = 12;
  const FitReport fit = fit_algorithm(data, o);
  EXPECT_TRUE(fit.reduction_from_data);
  expect_close(fit.regimes[0].reduce_gbps, 300, 1e-6, "reduction throughput");
  expect_close(fit.regimes[0].intra_gbps, 150, 1e-6, "bandwidth");
  // all_reduce alone cannot separate the two: δ stays 0.
  const FitReport ar =
      fit_algorithm(synthesize(truth, CollectiveKind::kAllReduce, shapes, 0, 1), o);
  EXPECT_FALSE(ar.reduction_from_data);
  EXPECT_EQ(ar.regimes[0].reduce_gbps, 0.0);
}

TEST(CollectiveFit, NominalInterNodeTermsWithoutMultiNodeData) {
  ClusterSpec truth = hand_cluster();
  truth.defaults.algorithms[Algorithm::kRing] = {regime(20, 1.5, 5, 150, 50)};
  FitOptions o;
  o.max_regimes = 1;
  o.significant_digits = 12;
  o.topology.nics_per_node = 4;
  o.topology.inter_node = LinkSpec{12.5, 3.0};
  const FitReport fit = fit_algorithm(
      synthesize(truth, CollectiveKind::kAllReduce,
                 {GroupShape::packed(2, 8), GroupShape::packed(4, 8), GroupShape::packed(8, 8)}, 0,
                 1),
      o);
  EXPECT_FALSE(fit.inter_node_from_data);
  expect_close(fit.regimes[0].inter_hop_us, 1.5 + 3.0, 1e-9, "nominal inter hop");
  expect_close(fit.regimes[0].inter_gbps, 4 * 12.5, 1e-9, "nominal inter bandwidth");
}

TEST(CollectiveFit, DerivedTreeExplainsSmallMultiNodeMessages) {
  // Ground truth where NCCL would pick the tree for small messages across
  // nodes: the fit with a tree must recover the shared parameters.
  ClusterSpec truth = hand_cluster();
  const AlgorithmParams ring = {regime(6, 1.5, 4, 150, 60)};
  truth.defaults.algorithms[Algorithm::kRing] = ring;
  truth.defaults.algorithms[Algorithm::kTree] = derive_tree_regimes(ring, 0.9);
  CollectiveModel model(truth);
  std::vector<Measurement> data;
  for (int n : {2, 4, 8, 16, 32}) {
    for (int64_t bytes = 1024; bytes <= (int64_t{1} << 30); bytes *= 4) {
      Measurement m;
      m.shape = GroupShape::packed(n, 8);
      m.bytes = bytes;
      m.time =
          Microseconds(model.estimate(CollectiveKind::kAllReduce, m.shape, bytes).time.count());
      data.push_back(m);
    }
  }
  FitOptions o;
  o.max_regimes = 1;
  o.significant_digits = 12;
  o.tree_bandwidth_factor = 0.9;
  const FitReport fit = fit_algorithm(data, o);
  ASSERT_EQ(fit.tree_regimes.size(), 1u);
  expect_close(fit.regimes[0].inter_hop_us, 4, 1e-6, "inter hop");
  expect_close(fit.regimes[0].inter_gbps, 60, 1e-6, "inter bandwidth");
  expect_close(fit.tree_regimes[0].inter_gbps, 54, 1e-6, "tree inter bandwidth");
  EXPECT_LT(fit.max_abs_rel_error, 1e-9);
  // Without the tree the same data cannot be fitted exactly.
  o.tree_bandwidth_factor = 0;
  EXPECT_GT(fit_algorithm(data, o).max_abs_rel_error, 0.05);
}

TEST(CollectiveFit, RejectsTooFewPointsAndBadOptions) {
  std::vector<Measurement> few(2);
  for (auto& m : few) {
    m.shape = GroupShape::packed(4, 8);
    m.bytes = 1024;
    m.time = Microseconds(10);
  }
  EXPECT_THROW(fit_algorithm(few, FitOptions{}), InvalidArgument);
  FitOptions bad;
  bad.max_regimes = 9;
  EXPECT_THROW(fit_algorithm(few, bad), InvalidArgument);
}

// ---------------------------------------------------------------------------
// Parsers.

struct LogCase {
  int gpus;
  size_t rows;
  int nodes;
  int per_node;
  int64_t first_bytes;
  double first_us;
  int64_t last_bytes;
  double last_us;
};

TEST(NcclTestsParser, ReadsEveryShippedLog) {
  const LogCase cases[] = {
      {1, 28, 1, 1, 8, 4.47, 1073741824, 1620.4},
      {2, 28, 1, 2, 8, 8.65, 1073741824, 5203.1},
      {4, 28, 1, 4, 8, 16.42, 1073741824, 7173.7},
      {8, 28, 1, 8, 8, 31.44, 1073741824, 8139.2},
      {16, 25, 2, 8, 1024, 34.66, 17179869184, 251757},
      {32, 23, 4, 8, 1024, 53.00, 4294967296, 67271},
  };
  for (const LogCase& c : cases) {
    const std::string path =
        sim_data_dir() + "/nccl_tests_a100/nccl_" + std::to_string(c.gpus) + ".log";
    const auto rows = load_nccl_tests(path);
    SCOPED_TRACE(path);
    ASSERT_EQ(rows.size(), c.rows);
    for (const Measurement& m : rows) {
      EXPECT_EQ(m.op, CollectiveKind::kAllReduce);
      EXPECT_EQ(m.shape.ranks, c.gpus);
      EXPECT_EQ(m.shape.nodes, c.nodes);
      EXPECT_EQ(m.shape.max_ranks_per_node, c.per_node);
      EXPECT_GT(m.time.count(), 0);
    }
    for (size_t i = 1; i < rows.size(); ++i) EXPECT_EQ(rows[i].bytes, 2 * rows[i - 1].bytes);
    EXPECT_EQ(rows.front().bytes, c.first_bytes);
    EXPECT_DOUBLE_EQ(rows.front().time.count(), c.first_us);
    EXPECT_EQ(rows.back().bytes, c.last_bytes);
    EXPECT_DOUBLE_EQ(rows.back().time.count(), c.last_us);
  }
  NcclTestsOptions in_place;
  in_place.in_place = true;
  const auto rows = load_nccl_tests(sim_data_dir() + "/nccl_tests_a100/nccl_8.log", in_place);
  EXPECT_DOUBLE_EQ(rows.front().time.count(), 32.30);
  EXPECT_NE(rows.front().origin.find("nccl_8.log:"), std::string::npos);
}

TEST(NcclTestsParser, NamedErrors) {
  const std::string header =
      "#  Rank  0 Pid 1 on host-a device  0 [0x00] GPU\n"
      "#  Rank  1 Pid 2 on host-b device  0 [0x00] GPU\n"
      "#       size         count      type   redop    root     time   algbw   busbw #wrong     "
      "time   algbw   busbw #wrong\n";
  // A newer nccl-tests layout (with a root column) parses.
  const auto ok = parse_nccl_tests(header +
                                       "        1024           256     float     sum      -1"
                                       "    12.50    0.08    0.08      0    12.00    0.09    "
                                       "0.09      0\n",
                                   "new.log");
  ASSERT_EQ(ok.size(), 1u);
  EXPECT_DOUBLE_EQ(ok[0].time.count(), 12.5);
  EXPECT_EQ(ok[0].shape.nodes, 2);
  auto expect_error = [](const std::string& text, const std::string& needle) {
    try {
      parse_nccl_tests(text, "bad.log");
      ADD_FAILURE() << "accepted: " << needle;
    } catch (const DataLoss& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_error(header + "        1024           256     float     sum      -1    abc\n",
               "bad.log:4: column 'time'");
  expect_error(header, "the table has no rows");
  expect_error("        1024  256 float sum 1.0\n", "bad.log:1: table row before");
  expect_error("#  size count type redop time\n  1024 256 float sum 3.0\n", "no '#  Rank");
  expect_error("#  Rank  0 Pid 1 on host-a device  0\n", "no '# size count");
}

TEST(CollectiveBench, RoundTripAndNamedErrors) {
  const std::string text = R"({"schema": "tessera.sim.collective_bench/1", "devices_per_node": 8,
    "results": [
      {"op": "all_reduce", "ranks": 16, "bytes": 1048576, "seconds": 1.0e-4},
      {"op": "all_gather", "ranks": 8, "nodes": 2, "bytes": 4096, "seconds": 3.2e-5}]})";
  const auto ms = parse_collective_bench(text, "bench.json");
  ASSERT_EQ(ms.size(), 2u);
  EXPECT_EQ(ms[0].shape.nodes, 2);
  EXPECT_EQ(ms[0].shape.max_ranks_per_node, 8);
  EXPECT_DOUBLE_EQ(ms[0].time.count(), 100);
  EXPECT_EQ(ms[1].op, CollectiveKind::kAllGather);
  EXPECT_EQ(ms[1].shape.nodes, 2);
  EXPECT_EQ(ms[1].shape.max_ranks_per_node, 4);
  const auto back = parse_collective_bench(collective_bench_to_json(ms, 8), "again.json");
  ASSERT_EQ(back.size(), 2u);
  EXPECT_EQ(back[1].shape.max_ranks_per_node, 4);
  EXPECT_DOUBLE_EQ(back[1].time.count(), ms[1].time.count());
  auto expect_error = [](const std::string& body, const std::string& needle) {
    const std::string doc =
        R"({"schema": "tessera.sim.collective_bench/1", "devices_per_node": 8, "results": [)" +
        body + "]}";
    try {
      parse_collective_bench(doc, "bench.json");
      ADD_FAILURE() << "accepted: " << body;
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_error(R"({"op": "all_reduce", "ranks": 4, "bytes": 8, "seconds": 1, "secs": 2})",
               "bench.json: results[0]: unknown key(s) 'secs'");
  expect_error(R"({"op": "all_reduce", "ranks": 4, "bytes": -8, "seconds": 1})",
               "results[0]: field 'bytes': must be >= 0");
  expect_error(R"({"op": "allreduce", "ranks": 4, "bytes": 8, "seconds": 1})",
               "results[0]: field 'op': unknown collective 'allreduce'");
  expect_error(R"({"op": "all_reduce", "ranks": 4, "bytes": 8, "seconds": 0})",
               "field 'seconds': must be > 0");
  expect_error(R"({"op": "all_reduce", "ranks": 4, "nodes": 5, "bytes": 8, "seconds": 1})",
               "field 'nodes'");
}

// ---------------------------------------------------------------------------
// The A100 cluster: fitted on the 1-16 GPU logs, checked on 32 GPUs.

std::vector<Measurement> only(const std::vector<Measurement>& all, int ranks) {
  std::vector<Measurement> out;
  for (const Measurement& m : all) {
    if (m.shape.ranks == ranks) out.push_back(m);
  }
  return out;
}

TEST(A100Cluster, ShippedFileEqualsItsRegeneration) {
  const std::string recipe = sim_data_dir() + "/a100_ib.fit.json";
  const std::string shipped = sim_data_dir() + "/a100_ib.json";
  const ClusterSpec regenerated = fit_cluster_from_recipe(recipe);
  if (std::getenv("TESSERA_SIM_REGENERATE") != nullptr) {
    std::ofstream(shipped) << regenerated.to_json();
    std::cout << "rewrote " << shipped << "\n";
  }
  const ClusterSpec file = ClusterSpec::load_file(shipped);
  EXPECT_EQ(cluster_difference(file, regenerated, 1e-9), "")
      << "regenerate with TESSERA_SIM_REGENERATE=1 (scripts/sim_regen_cluster.sh)";
  // The file round-trips through its own serialisation.
  EXPECT_TRUE(ClusterSpec::parse(file.to_json(), "again") == file);
}

// The shipped cluster files of this machine are what their recipes fit
// from the committed measurements (scripts/sim_calibrate_local.sh runs the
// same fit after measuring), host figures included.
TEST(GlooLocalCluster, ShippedFilesEqualTheirRegeneration) {
  for (int n : {2, 4}) {
    const std::string base = sim_data_dir() + "/gloo_local_np" + std::to_string(n);
    ClusterSpec regenerated = fit_cluster_from_recipe(base + ".fit.json");
    const ClusterSpec file = ClusterSpec::load_file(base + ".json");
    // The script names the machine it measured (fit-cluster --description,
    // --provenance); the numbers are the recipe's.
    regenerated.description = file.description;
    regenerated.provenance = file.provenance;
    EXPECT_EQ(cluster_difference(file, regenerated, 1e-9), "") << base;
    EXPECT_FALSE(file.topology.host_compute_slowdown.empty()) << base;
    EXPECT_EQ(file.topology.host_lockstep_slowdown, regenerated.topology.host_lockstep_slowdown);
  }
}

TEST(A100Cluster, PredictsTheMeasuredTables) {
  const ClusterRecipe recipe = load_cluster_recipe(sim_data_dir() + "/a100_ib.fit.json");
  const CollectiveModel model(ClusterSpec::load_file(sim_data_dir() + "/a100_ib.json"));
  ASSERT_EQ(recipe.held_out_measurements.size(), 23u);
  for (int gpus : {2, 4, 8, 16}) {
    const PredictionReport r = evaluate_predictions(model, only(recipe.fit_measurements, gpus));
    std::cout << "[fit set] " << gpus << " GPUs: mean |error| " << 100 * r.mean_abs_rel_error
              << "%, median " << 100 * r.median_abs_rel_error << "%, max "
              << 100 * r.max_abs_rel_error << "%\n";
    EXPECT_LT(r.mean_abs_rel_error, 0.12) << r.to_text();
  }
  const PredictionReport held = evaluate_predictions(model, recipe.held_out_measurements);
  std::cout << "[held out] 32 GPUs, 4 nodes, per size:\n" << held.to_text();
  // Measured when the model was shipped: mean 18.6%, median 10.7%, max
  // 64.8% (1 KiB, where NCCL's tree beats the modelled ring; the 2 KiB row,
  // a 147 us outlier in the log, is -40%). Bounds leave a small margin so a
  // regression shows.
  EXPECT_LT(held.mean_abs_rel_error, 0.20);
  EXPECT_LT(held.median_abs_rel_error, 0.12);
  EXPECT_LT(held.max_abs_rel_error, 0.70);
  // Large messages are bandwidth-bound and extrapolate well.
  for (const PredictionRow& row : held.rows) {
    if (row.measured.bytes >= (int64_t{128} << 20)) {
      EXPECT_LT(std::fabs(row.rel_error), 0.06) << row.measured.bytes;
    }
  }
  // The local regime reproduces the one-GPU table (an out-of-place copy).
  const PredictionReport one = evaluate_predictions(model, only(recipe.fit_measurements, 1));
  std::cout << "[fit set] 1 GPU: mean |error| " << 100 * one.mean_abs_rel_error << "%\n";
  EXPECT_LT(one.mean_abs_rel_error, 0.05);
}

TEST(A100Cluster, SingleNodeLogsAloneWithNominalNetwork) {
  // What the 1-8 GPU logs alone predict for 2 and 4 nodes when the network
  // terms come from the nominal topology (8 x 25 GB/s, 5 us). The logs do
  // not contain inter-node traffic, so the error is the nominal network's.
  ClusterRecipe recipe = load_cluster_recipe(sim_data_dir() + "/a100_ib.fit.json");
  std::vector<Measurement> single_node = recipe.fit_measurements;
  single_node.erase(std::remove_if(single_node.begin(), single_node.end(),
                                   [](const Measurement& m) { return m.shape.nodes > 1; }),
                    single_node.end());
  const std::vector<Measurement> m16 = only(recipe.fit_measurements, 16);
  const std::vector<Measurement>& m32 = recipe.held_out_measurements;
  struct Variant {
    const char* name;
    double tree_factor;
    double bound16, bound32;  // measured mean errors plus a margin
  };
  // Measured when written (mean |error| at 16 / 32 GPUs): ring only 41.4% /
  // 48.6%; with NCCL's derived tree (0.92) 25.8% / 32.2%. Both are dominated
  // by the nominal 200 GB/s node bandwidth against the ~125 GB/s measured
  // (-36% at 1 GiB); ring only also overestimates small messages, which
  // NCCL sends by tree across nodes.
  for (const Variant& v :
       {Variant{"ring only", 0.0, 0.46, 0.55}, Variant{"ring + NCCL tree", 0.92, 0.30, 0.37}}) {
    ClusterFitOptions options = recipe.options;
    options.fit.tree_bandwidth_factor = v.tree_factor;
    const CollectiveModel model(fit_cluster(single_node, options));
    const PredictionReport r16 = evaluate_predictions(model, m16);
    const PredictionReport r32 = evaluate_predictions(model, m32);
    std::cout << "[1-8 GPU fit, " << v.name << "] 16 GPUs: mean |error| "
              << 100 * r16.mean_abs_rel_error << "%, max " << 100 * r16.max_abs_rel_error
              << "%; 32 GPUs: mean " << 100 * r32.mean_abs_rel_error << "%, max "
              << 100 * r32.max_abs_rel_error << "%\n";
    if (v.tree_factor > 0) std::cout << r16.to_text() << r32.to_text();
    EXPECT_LT(r16.mean_abs_rel_error, v.bound16);
    EXPECT_LT(r32.mean_abs_rel_error, v.bound32);
  }
}

TEST(A100Cluster, RecipeErrorsNameTheField) {
  const std::string dir = ::testing::TempDir();
  const std::string path = dir + "/bad_recipe.json";
  std::ofstream(path) << R"({"schema": "tessera.sim.cluster_fit/1", "name": "x",
    "topology": {"devices_per_node": 8, "num_nodes": 0, "nics_per_node": 1,
                 "intra_node": {"bandwidth_gbps": 1, "latency_us": 1},
                 "inter_node": {"bandwidth_gbps": 1, "latency_us": 1}},
    "nccl_tests": [{"file": "missing.log", "opp": "all_reduce"}]})";
  try {
    load_cluster_recipe(path);
    ADD_FAILURE() << "accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("nccl_tests[0]: unknown key(s) 'opp'"), std::string::npos)
        << e.what();
  }
}

}  // namespace
}  // namespace tessera::sim
