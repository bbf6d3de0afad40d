// sim: ranks that share a CPU host (Topology::host_compute_slowdown) — the
// cluster field's parsing and errors, Topology::host_slowdown, and the
// composer's processor sharing on hand-computed timelines.
#include <gtest/gtest.h>

#include <string>

#include "tessera/core/error.h"
#include "tessera/sim/cluster.h"
#include "tessera/sim/collective_model.h"
#include "tessera/sim/timeline.h"
#include "tessera/sim/trace.h"

namespace tessera::sim {
namespace {

// all_reduce over 2 ranks of one node: 10 + bytes / 1000 us.
ClusterSpec host_cluster(std::vector<double> slowdown, int devices_per_node = 2) {
  ClusterSpec c;
  c.name = "host";
  c.topology.devices_per_node = devices_per_node;
  c.topology.host_compute_slowdown = std::move(slowdown);
  RegimeParams ring;
  ring.protocol = "simple";
  ring.setup_us = 10;
  ring.intra_gbps = 1;
  ring.inter_gbps = 1;
  c.defaults.algorithms[Algorithm::kRing] = {ring};
  return c;
}

SimulationResult run(const std::string& entries, int world, const ClusterSpec& cluster) {
  const Trace trace =
      Trace::parse(R"({"schema": "tessera.sim.trace/1", "metadata": {"world_size": )" +
                       std::to_string(world) + R"(}, "ranks": [)" + entries + "]}",
                   "host.json");
  const CollectiveModel model(cluster);
  SimulationOptions o;
  o.collectives = &model;
  return simulate(trace, o);
}

// One trace entry for `ranks` (e.g. "0" or "0, 1": ranks traced once).
std::string rank_entry(const std::string& ranks, double compute_us, const std::string& group) {
  return R"({"ranks": [)" + ranks + R"(], "nodes": [
      {"id": 0, "kind": "compute", "name": "work", "duration_us": )" +
         std::to_string(compute_us) + R"(},
      {"id": 1, "kind": "collective", "name": "ar", "op": "all_reduce", "group": )" +
         group +
         R"(, "bytes": 20000, "deps": [0]},
      {"id": 2, "kind": "compute", "name": "tail", "duration_us": 10, "deps": [1]}]})";
}

std::string rank_entry(int rank, double compute_us, const std::string& group) {
  return rank_entry(std::to_string(rank), compute_us, group);
}

TEST(HostSharing, SlowdownTable) {
  Topology t;
  EXPECT_DOUBLE_EQ(t.host_slowdown(3), 1.0);  // accelerators: never
  t.host_compute_slowdown = {1.0, 1.5};
  EXPECT_DOUBLE_EQ(t.host_slowdown(1), 1.0);
  EXPECT_DOUBLE_EQ(t.host_slowdown(2), 1.5);
  EXPECT_DOUBLE_EQ(t.host_slowdown(4), 3.0);  // beyond the table: 1.5 * 4 / 2
}

TEST(HostSharing, LockstepTableFallsBackToTheComputeTable) {
  Topology t;
  t.host_compute_slowdown = {1.0, 1.5};
  EXPECT_DOUBLE_EQ(t.host_slowdown(2, /*lockstep=*/true), 1.5);  // no lock-step table
  t.host_lockstep_slowdown = {1.0, 1.8};
  EXPECT_DOUBLE_EQ(t.host_slowdown(2, true), 1.8);
  EXPECT_DOUBLE_EQ(t.host_slowdown(2, false), 1.5);
  EXPECT_DOUBLE_EQ(t.host_slowdown(4, true), 3.6);  // beyond the table: 1.8 * 4 / 2
}

TEST(HostSharing, LockstepSlowdownAppliesToComputeAfterCommunication) {
  // Two ranks compute 100 us at the out-of-step slowdown 1 (the first node
  // waits for no communication): both end at 100. The all_reduce (10 + 20
  // us) ends at 130. The tails (10 us each) wait for it, so they run in
  // step: slowdown 2 with both computing, 20 us, ending at 150 (140 without
  // the lock-step table).
  ClusterSpec c = host_cluster({1.0, 1.0});
  c.topology.host_lockstep_slowdown = {1.0, 2.0};
  const std::string entries = rank_entry(0, 100, "[0, 1]") + ", " + rank_entry(1, 100, "[0, 1]");
  const SimulationResult r = run(entries, 2, c);
  EXPECT_DOUBLE_EQ(r.events[0][0].end.count(), 100);
  EXPECT_DOUBLE_EQ(r.events[0][1].end.count(), 130);
  EXPECT_DOUBLE_EQ(r.events[0][2].slowdown, 2.0);
  EXPECT_DOUBLE_EQ(r.events[1][2].end.count(), 150);
  EXPECT_DOUBLE_EQ(r.step_time.count(), 150);
  EXPECT_DOUBLE_EQ(run(entries, 2, host_cluster({1.0, 1.0})).step_time.count(), 140);
}

TEST(HostSharing, WaitingRankFreesItsShare) {
  // Both ranks compute from 0 at half speed (slowdown 2 with 2 computing).
  // Rank 1's 50 us of work end at 100; rank 0 has done 50 of its 100 by
  // then and does the other 50 alone (slowdown 1), ending at 150. The
  // all_reduce (10 + 20 us) runs 150-180; both tails (10 us each, again
  // together: 20 us) end at 200.
  const std::string entries = rank_entry(0, 100, "[0, 1]") + ", " + rank_entry(1, 50, "[0, 1]");
  const SimulationResult r = run(entries, 2, host_cluster({1.0, 2.0}));
  EXPECT_DOUBLE_EQ(r.events[1][0].end.count(), 100);
  EXPECT_DOUBLE_EQ(r.events[0][0].end.count(), 150);
  EXPECT_DOUBLE_EQ(r.events[0][0].slowdown, 1.5);
  EXPECT_DOUBLE_EQ(r.events[0][1].start.count(), 150);
  EXPECT_DOUBLE_EQ(r.events[0][1].end.count(), 180);
  EXPECT_DOUBLE_EQ(r.events[0][2].end.count(), 200);
  EXPECT_DOUBLE_EQ(r.step_time.count(), 200);
  EXPECT_DOUBLE_EQ(r.ranks[1].sync_wait.count(), 50);
  EXPECT_DOUBLE_EQ(r.ranks[0].slowdown_extra.count(), 50 + 10);
}

TEST(HostSharing, RanksOnOtherNodesDoNotCount) {
  // One rank per node: nobody shares, the table's k = 1 entry applies.
  const std::string entries = rank_entry(0, 100, "[0, 1]") + ", " + rank_entry(1, 50, "[0, 1]");
  const SimulationResult r = run(entries, 2, host_cluster({1.0, 2.0}, /*devices_per_node=*/1));
  EXPECT_DOUBLE_EQ(r.events[1][0].end.count(), 50);
  EXPECT_DOUBLE_EQ(r.events[0][0].end.count(), 100);
}

TEST(HostSharing, WithoutTheFieldRanksAreIndependent) {
  const std::string entries = rank_entry(0, 100, "[0, 1]") + ", " + rank_entry(1, 50, "[0, 1]");
  const SimulationResult r = run(entries, 2, host_cluster({}));
  EXPECT_DOUBLE_EQ(r.events[0][0].end.count(), 100);
  EXPECT_DOUBLE_EQ(r.step_time.count(), 100 + 30 + 10);
}

TEST(HostSharing, FourRanksBeyondTheTable) {
  // 4 ranks computing 30 us each on one node with table [1, 1.5]:
  // slowdown 1.5 * 4 / 2 = 3, all end at 90.
  std::string entries;
  for (int r = 0; r < 4; ++r) {
    if (r) entries += ", ";
    entries += R"({"ranks": [)" + std::to_string(r) +
               R"(], "nodes": [{"id": 0, "kind": "compute", "name": "w", "duration_us": 30}]})";
  }
  const SimulationResult res = run(entries, 4, host_cluster({1.0, 1.5}, 4));
  for (int r = 0; r < 4; ++r) EXPECT_DOUBLE_EQ(res.events[r][0].end.count(), 90) << r;
}

TEST(HostSharing, SyncSkewDelaysTheCollectiveByTheStragglerShare) {
  // Two ranks, 100 us of compute each at slowdown 1, then the all_reduce
  // (10 + 20 us). With host_sync_skew [0, 0.1] the pair starts 10 % of the
  // 100 us computed since the last communication later: 110, ends 140; the
  // tails (10 us) end at 150. The wait counts as sync_wait. The tail's
  // compute is after the collective started, so a second collective would
  // see only those 10 us.
  ClusterSpec c = host_cluster({1.0, 1.0});
  c.topology.host_sync_skew = {0, 0.1};
  const std::string entries = rank_entry("0, 1", 100, "[0, 1]");
  const SimulationResult r = run(entries, 2, c);
  EXPECT_DOUBLE_EQ(r.events[0][1].ready.count(), 100);
  EXPECT_DOUBLE_EQ(r.events[0][1].start.count(), 110);
  EXPECT_DOUBLE_EQ(r.events[1][1].start.count(), 110);
  EXPECT_DOUBLE_EQ(r.events[0][1].end.count(), 140);
  EXPECT_DOUBLE_EQ(r.step_time.count(), 150);
  EXPECT_DOUBLE_EQ(r.ranks[0].sync_wait.count(), 10);
  // The k = 1 entry and an absent list add nothing; beyond the list, the
  // last entry.
  Topology t;
  EXPECT_DOUBLE_EQ(t.sync_skew(4), 0.0);
  t.host_sync_skew = {0, 0.05, 0.08};
  EXPECT_DOUBLE_EQ(t.sync_skew(1), 0.0);
  EXPECT_DOUBLE_EQ(t.sync_skew(3), 0.08);
  EXPECT_DOUBLE_EQ(t.sync_skew(8), 0.08);
  const SimulationResult plain = run(entries, 2, host_cluster({1.0, 1.0}));
  EXPECT_DOUBLE_EQ(plain.step_time.count(), 140);
}

TEST(HostSharing, SyncFixedWaitOnlyAfterCompute) {
  // 100 us of compute on both ranks, then two all_reduces (10 + 20 us each)
  // and a 10 us tail. host_sync_us [0, 15]: the first starts 15 us after
  // the last member issued it (115, ends 145); the second follows it with
  // no compute between, so it starts at once (145-175); the tail ends at
  // 185.
  ClusterSpec c = host_cluster({1.0, 1.0});
  c.topology.host_sync_us = {0, 15};
  const std::string entries = R"({"ranks": [0, 1], "nodes": [
      {"id": 0, "kind": "compute", "name": "work", "duration_us": 100},
      {"id": 1, "kind": "collective", "name": "ar", "op": "all_reduce", "group": [0, 1],
       "bytes": 20000, "deps": [0]},
      {"id": 2, "kind": "collective", "name": "ar2", "op": "all_reduce", "group": [0, 1],
       "bytes": 20000, "deps": [1]},
      {"id": 3, "kind": "compute", "name": "tail", "duration_us": 10, "deps": [2]}]})";
  const SimulationResult r = run(entries, 2, c);
  EXPECT_DOUBLE_EQ(r.events[0][1].start.count(), 115);
  EXPECT_DOUBLE_EQ(r.events[0][1].end.count(), 145);
  EXPECT_DOUBLE_EQ(r.events[0][2].start.count(), 145);
  EXPECT_DOUBLE_EQ(r.step_time.count(), 185);
  EXPECT_DOUBLE_EQ(r.ranks[0].sync_wait.count(), 15);
  // With host_sync_skew as well: 15 + 10 % of 100 us. Ranks traced
  // separately (two entries) wait for the straggler too, after the last
  // issue whatever the time between their issues: rank 1 with the same
  // compute, 20 us or 50 us faster, the call starts 25 us after rank 0's.
  c.topology.host_sync_skew = {0, 0.1};
  EXPECT_DOUBLE_EQ(run(rank_entry("0, 1", 100, "[0, 1]"), 2, c).step_time.count(),
                   100 + 15 + 10 + 30 + 10);
  auto split = [](double second) {
    return rank_entry(0, 100, "[0, 1]") + ", " + rank_entry(1, second, "[0, 1]");
  };
  EXPECT_DOUBLE_EQ(run(split(100), 2, c).step_time.count(), 100 + 25 + 30 + 10);
  EXPECT_DOUBLE_EQ(run(split(80), 2, c).step_time.count(), 100 + 25 + 30 + 10);
  EXPECT_DOUBLE_EQ(run(split(50), 2, c).step_time.count(), 100 + 25 + 30 + 10);
  // The faster rank waits its lead and the straggler's share.
  EXPECT_DOUBLE_EQ(run(split(50), 2, c).ranks[1].sync_wait.count(), 50 + 25);
  Topology t;
  EXPECT_DOUBLE_EQ(t.sync_fixed_us(2), 0.0);
  t.host_sync_us = {0, 15, 40};
  EXPECT_DOUBLE_EQ(t.sync_fixed_us(1), 0.0);
  EXPECT_DOUBLE_EQ(t.sync_fixed_us(3), 40.0);
  EXPECT_DOUBLE_EQ(t.sync_fixed_us(8), 40.0);  // beyond the list: the last entry
}

TEST(HostSharing, CommLoadTable) {
  Topology t;
  EXPECT_DOUBLE_EQ(t.comm_load(1000), 0.0);  // absent: communication takes no cores
  t.host_comm_load = {{1024, 0.2}, {int64_t{1} << 20, 0.5}};
  EXPECT_DOUBLE_EQ(t.comm_load(512), 0.2);  // held beyond the ends
  EXPECT_DOUBLE_EQ(t.comm_load(1024), 0.2);
  EXPECT_NEAR(t.comm_load(int64_t{1} << 15), 0.35, 1e-12);  // halfway in log(bytes)
  EXPECT_DOUBLE_EQ(t.comm_load(int64_t{1} << 24), 0.5);
  // A fractional count of computing ranks interpolates the slowdown table,
  // also beyond its end (3 ranks: 2.5, 4 ranks: 2.5 x 4 / 3).
  t.host_compute_slowdown = {1.0, 1.5, 2.5};
  EXPECT_DOUBLE_EQ(t.host_slowdown(1.2), 1.1);
  EXPECT_DOUBLE_EQ(t.host_slowdown(2.5), 2.0);
  EXPECT_NEAR(t.host_slowdown(3.5), (2.5 + 2.5 * 4 / 3) / 2, 1e-12);
}

TEST(HostSharing, CommunicatingRanksTakeTheirLoad) {
  // Rank 0 computes 100 us while ranks 1 and 2 of its node run an
  // all_reduce (10 + 20 us) from time 0. Each counts 0.5 of a computing
  // rank, so rank 0 runs at host_slowdown(2) = 2 for 30 us (15 us of its
  // work) and alone for the other 85: it ends at 115 instead of 100.
  ClusterSpec c = host_cluster({1.0, 2.0, 3.0}, 3);
  const std::string entries = R"({"ranks": [0], "nodes": [
      {"id": 0, "kind": "compute", "name": "work", "duration_us": 100}]},
    {"ranks": [1, 2], "nodes": [
      {"id": 0, "kind": "collective", "name": "ar", "op": "all_reduce", "group": [1, 2],
       "bytes": 20000}]})";
  EXPECT_DOUBLE_EQ(run(entries, 3, c).step_time.count(), 100);
  c.topology.host_comm_load = {{1, 0.5}};
  const SimulationResult r = run(entries, 3, c);
  EXPECT_DOUBLE_EQ(r.step_time.count(), 115);
  EXPECT_DOUBLE_EQ(r.events[1][0].end.count(), 30);  // the collective itself is not slowed
  // A rank that computes while its own collective runs counts once (the
  // overlap model covers what its communication costs it): ranks 0 and 1
  // compute 100 us each while rank 1's all_reduce with rank 2 runs, rank 2
  // counts 0.5: host_slowdown(2.5) = 2.5 for 30 us, then 2 (ranks 0 and 1)
  // for the rest: 12 us of work by 30, 88 more at half speed, end 206.
  const std::string overlapped = R"({"ranks": [0], "nodes": [
      {"id": 0, "kind": "compute", "name": "work", "duration_us": 100}]},
    {"ranks": [1], "nodes": [
      {"id": 0, "kind": "collective", "name": "ar", "op": "all_reduce", "group": [1, 2],
       "bytes": 20000, "stream": "comm"},
      {"id": 1, "kind": "compute", "name": "work", "duration_us": 100}]},
    {"ranks": [2], "nodes": [
      {"id": 0, "kind": "collective", "name": "ar", "op": "all_reduce", "group": [1, 2],
       "bytes": 20000}]})";
  EXPECT_DOUBLE_EQ(run(overlapped, 3, c).step_time.count(), 206);
}

const char* kClusterDoc = R"({
  "schema": "tessera.sim.cluster/1", "name": "cpu",
  "topology": {"devices_per_node": 4, "num_nodes": 1, "nics_per_node": 1,
               "intra_node": {"bandwidth_gbps": 10, "latency_us": 50},
               "inter_node": {"bandwidth_gbps": 1, "latency_us": 100}SLOWDOWN},
  "algorithms": {"ring": [{"protocol": "simple", "max_bytes": 0, "setup_us": 100,
                           "intra_hop_us": 10, "inter_hop_us": 20, "intra_gbps": 1,
                           "inter_gbps": 1}]}})";

std::string cluster_doc(const std::string& slowdown) {
  std::string doc = kClusterDoc;
  return doc.replace(doc.find("SLOWDOWN"), 8, slowdown);
}

TEST(HostSharing, ClusterFieldRoundTrips) {
  const ClusterSpec c =
      ClusterSpec::parse(cluster_doc(R"(, "host_compute_slowdown": [1.0, 1.1, 1.6, 2.2])"), "c");
  ASSERT_EQ(c.topology.host_compute_slowdown.size(), 4u);
  EXPECT_DOUBLE_EQ(c.topology.host_compute_slowdown[2], 1.6);
  const ClusterSpec again = ClusterSpec::parse(c.to_json(), "again");
  EXPECT_EQ(cluster_difference(c, again, 0), "");
  ClusterSpec other = again;
  other.topology.host_compute_slowdown[3] = 2.3;
  EXPECT_NE(cluster_difference(c, other, 1e-6).find("host_compute_slowdown[3]"), std::string::npos);
  const ClusterSpec skewed =
      ClusterSpec::parse(cluster_doc(R"(, "host_sync_skew": [0, 0.04, 0.07, 0.1])"), "c");
  ASSERT_EQ(skewed.topology.host_sync_skew.size(), 4u);
  EXPECT_DOUBLE_EQ(ClusterSpec::parse(skewed.to_json(), "again").topology.host_sync_skew[3], 0.1);
  const ClusterSpec in_step = ClusterSpec::parse(
      cluster_doc(R"(, "host_compute_slowdown": [1.0, 1.1], "host_lockstep_slowdown": [1.0, 1.2])"),
      "c");
  ASSERT_EQ(in_step.topology.host_lockstep_slowdown.size(), 2u);
  const ClusterSpec in_step_again = ClusterSpec::parse(in_step.to_json(), "again");
  EXPECT_EQ(cluster_difference(in_step, in_step_again, 0), "");
  ClusterSpec in_step_other = in_step_again;
  in_step_other.topology.host_lockstep_slowdown[1] = 1.3;
  EXPECT_NE(cluster_difference(in_step, in_step_other, 1e-6).find("host_lockstep_slowdown[1]"),
            std::string::npos);
  const ClusterSpec fixed = ClusterSpec::parse(cluster_doc(R"(, "host_sync_us": [0, 900])"), "c");
  ASSERT_EQ(fixed.topology.host_sync_us.size(), 2u);
  EXPECT_DOUBLE_EQ(ClusterSpec::parse(fixed.to_json(), "again").topology.host_sync_us[1], 900);
  const ClusterSpec loaded = ClusterSpec::parse(
      cluster_doc(
          R"(, "host_comm_load": [{"bytes": 4096, "load": 0.3}, {"bytes": 65536, "load": 0.5}])"),
      "c");
  ASSERT_EQ(loaded.topology.host_comm_load.size(), 2u);
  EXPECT_EQ(loaded.topology.host_comm_load[1].bytes, 65536);
  const ClusterSpec loaded_again = ClusterSpec::parse(loaded.to_json(), "again");
  EXPECT_EQ(cluster_difference(loaded, loaded_again, 0), "");
  ClusterSpec loaded_other = loaded_again;
  loaded_other.topology.host_comm_load[0].load = 0.4;
  EXPECT_NE(cluster_difference(loaded, loaded_other, 1e-6).find("host_comm_load[0]"),
            std::string::npos);
  // Absent: empty, and not written back.
  const ClusterSpec plain = ClusterSpec::parse(cluster_doc(""), "plain");
  EXPECT_TRUE(plain.topology.host_compute_slowdown.empty());
  EXPECT_EQ(plain.to_json().find("host_compute_slowdown"), std::string::npos);
  EXPECT_EQ(plain.to_json().find("host_lockstep_slowdown"), std::string::npos);
  EXPECT_EQ(plain.to_json().find("host_sync_us"), std::string::npos);
  EXPECT_EQ(plain.to_json().find("host_comm_load"), std::string::npos);
}

TEST(HostSharing, ClusterFieldErrorsNameTheField) {
  for (const char* bad :
       {R"(, "host_compute_slowdown": [1.0, 0])", R"(, "host_compute_slowdown": [1.0, -2])",
        R"(, "host_compute_slowdown": [1.0, "x"])", R"(, "host_compute_slowdown": 2)",
        R"(, "host_sync_skew": [0, -0.1])", R"(, "host_sync_skew": [0, "x"])",
        R"(, "host_lockstep_slowdown": [1.0, 0])", R"(, "host_lockstep_slowdown": [true])",
        R"(, "host_sync_us": [0, -5])", R"(, "host_sync_us": [0, "x"])",
        R"(, "host_comm_load": [{"bytes": 4096, "load": -0.1}])",
        R"(, "host_comm_load": [{"bytes": 4096, "load": 5}])",
        R"(, "host_comm_load": [{"bytes": 0, "load": 0.1}])",
        R"(, "host_comm_load": [{"bytes": 4096, "load": 0.1}, {"bytes": 4096, "load": 0.2}])",
        R"(, "host_comm_load": [{"bytes": 4096, "load": 0.1, "kind": "x"}])",
        R"(, "host_comm_load": [{"bytes": 4096}])", R"(, "host_comm_load": [0.5])"}) {
    SCOPED_TRACE(bad);
    try {
      ClusterSpec::parse(cluster_doc(bad), "cpu.json");
      FAIL() << "accepted";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find("cpu.json"), std::string::npos) << e.what();
      const std::string b = bad;
      const std::string field = b.find("skew") != std::string::npos       ? "host_sync_skew"
                                : b.find("lockstep") != std::string::npos ? "host_lockstep_slowdown"
                                : b.find("sync_us") != std::string::npos  ? "host_sync_us"
                                : b.find("comm_load") != std::string::npos
                                    ? "host_comm_load"
                                    : "host_compute_slowdown";
      EXPECT_NE(std::string(e.what()).find(field), std::string::npos) << e.what();
    }
  }
}

}  // namespace
}  // namespace tessera::sim
