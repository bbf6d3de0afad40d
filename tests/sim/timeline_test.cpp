// sim: the timeline composer on hand-computed small traces (sync waits,
// overlap and slowdown, p2p pairs, dependency chains across streams, named
// groups across nodes), its error reports (deadlocks, disagreeing members),
// the Chrome trace, and a 1,024-rank job timed.
#include "tessera/sim/timeline.h"

#include <gtest/gtest.h>

#include <chrono>
#include <nlohmann/json.hpp>
#include <string>

#include "tessera/core/error.h"
#include "tessera/sim/cluster.h"
#include "tessera/sim/collective_model.h"
#include "tessera/sim/overlap.h"
#include "tessera/sim/trace.h"

namespace tessera::sim {
namespace {

// Collective times that are easy to add by hand: all_reduce over 2 ranks in
// a node = 10 + bytes / 1000 us (1 GB/s); across nodes = 10 + bytes / 500;
// send/recv in a node = 2 + bytes / 1000.
ClusterSpec hand_cluster(int devices_per_node = 8, int num_nodes = 0) {
  ClusterSpec c;
  c.name = "hand";
  c.topology.devices_per_node = devices_per_node;
  c.topology.num_nodes = num_nodes;
  RegimeParams ring;
  ring.protocol = "simple";
  ring.setup_us = 10;
  ring.intra_gbps = 1;
  ring.inter_gbps = 0.5;
  c.defaults.algorithms[Algorithm::kRing] = {ring};
  RegimeParams direct = ring;
  direct.setup_us = 2;
  c.defaults.algorithms[Algorithm::kDirect] = {direct};
  return c;
}

std::string trace_doc(int world, const std::string& entries, const std::string& extra_meta = "") {
  return R"({"schema": "tessera.sim.trace/1", "metadata": {"world_size": )" +
         std::to_string(world) + extra_meta + R"(}, "ranks": [)" + entries + "]}";
}

SimulationResult run(const std::string& text, const ClusterSpec& cluster = hand_cluster(),
                     const OverlapModel* overlap = nullptr) {
  const Trace trace = Trace::parse(text, "t.json");
  const CollectiveModel model(cluster);
  SimulationOptions o;
  o.collectives = &model;
  o.overlap = overlap;
  return simulate(trace, o);
}

void expect_breakdown(const RankBreakdown& b, double compute, double exposed, double sync_wait,
                      double idle, double overlapped) {
  SCOPED_TRACE("rank " + std::to_string(b.rank));
  EXPECT_DOUBLE_EQ(b.compute.count(), compute);
  EXPECT_DOUBLE_EQ(b.exposed_comm.count(), exposed);
  EXPECT_DOUBLE_EQ(b.sync_wait.count(), sync_wait);
  EXPECT_DOUBLE_EQ(b.idle.count(), idle);
  EXPECT_DOUBLE_EQ(b.overlapped_comm.count(), overlapped);
}

const char* kSyncTrace = R"(
  {"ranks": [0], "nodes": [
    {"id": 0, "kind": "compute", "name": "fwd", "duration_us": 100},
    {"id": 1, "kind": "collective", "name": "ar", "op": "all_reduce", "group": [0, 1],
     "bytes": 20000, "deps": [0]},
    {"id": 2, "kind": "compute", "name": "opt", "duration_us": 50, "deps": [1]}]},
  {"ranks": [1], "nodes": [
    {"id": 0, "kind": "compute", "name": "fwd", "duration_us": 150},
    {"id": 1, "kind": "collective", "name": "ar", "op": "all_reduce", "group": [0, 1],
     "bytes": 20000, "deps": [0]},
    {"id": 2, "kind": "compute", "name": "opt", "duration_us": 50, "deps": [1]}]})";

TEST(Timeline, CollectiveWaitsForTheLastRank) {
  // Rank 0 issues at 100, rank 1 at 150; the all_reduce (10 + 20 us) runs
  // 150-180 on both; opt runs 180-230.
  const SimulationResult r = run(trace_doc(2, kSyncTrace));
  EXPECT_DOUBLE_EQ(r.step_time.count(), 230);
  const SimEvent& ar0 = r.events[0][1];
  EXPECT_DOUBLE_EQ(ar0.ready.count(), 100);
  EXPECT_DOUBLE_EQ(ar0.start.count(), 150);
  EXPECT_DOUBLE_EQ(ar0.end.count(), 180);
  EXPECT_DOUBLE_EQ(r.events[1][1].ready.count(), 150);
  EXPECT_DOUBLE_EQ(r.events[0][2].start.count(), 180);
  EXPECT_DOUBLE_EQ(r.events[0][2].end.count(), 230);
  expect_breakdown(r.ranks[0], /*compute=*/150, /*exposed=*/30, /*sync_wait=*/50, /*idle=*/0, 0);
  expect_breakdown(r.ranks[1], 200, 30, 0, 0, 0);
  EXPECT_EQ(r.collective_calls, 1u);
  EXPECT_EQ(r.simulated_nodes, 6u);
}

// Two ranks traced apart, three measured steps: rank 0's forward took 100,
// 300 and 200 us, rank 1's 300, 100 and 200 (medians 200 and 200).
const char* kStepsTrace = R"(
  {"ranks": [0], "nodes": [
    {"id": 0, "kind": "compute", "name": "fwd", "duration_us": 200,
     "step_durations_us": [100, 300, 200]},
    {"id": 1, "kind": "collective", "name": "ar", "op": "all_reduce", "group": [0, 1],
     "bytes": 20000, "deps": [0]},
    {"id": 2, "kind": "compute", "name": "opt", "duration_us": 50,
     "step_durations_us": [50, 50, 50], "deps": [1]}]},
  {"ranks": [1], "nodes": [
    {"id": 0, "kind": "compute", "name": "fwd", "duration_us": 200,
     "step_durations_us": [300, 100, 200]},
    {"id": 1, "kind": "collective", "name": "ar", "op": "all_reduce", "group": [0, 1],
     "bytes": 20000, "deps": [0]},
    {"id": 2, "kind": "compute", "name": "opt", "duration_us": 50,
     "step_durations_us": [50, 50, 60], "deps": [1]}]})";

TEST(Timeline, ReplaysEachMeasuredStepAndReportsTheMedian) {
  // Step 0: the all_reduce waits for rank 1 until 300, runs 300-330, opt
  // ends at 380. Step 1 the same with the ranks swapped: 380. Step 2: both
  // issue at 200, 200-230, rank 1's opt ends at 290. Sorted 290, 380, 380:
  // the median is step 0's (the first of the two equal ones).
  const SimulationResult r = run(trace_doc(2, kStepsTrace));
  ASSERT_EQ(r.replayed_step_times.size(), 3u);
  EXPECT_DOUBLE_EQ(r.replayed_step_times[0].count(), 380);
  EXPECT_DOUBLE_EQ(r.replayed_step_times[1].count(), 380);
  EXPECT_DOUBLE_EQ(r.replayed_step_times[2].count(), 290);
  EXPECT_EQ(r.replayed_step, 0);
  EXPECT_DOUBLE_EQ(r.step_time.count(), 380);
  // The result is step 0's own: rank 0 waited 200 us for rank 1.
  EXPECT_DOUBLE_EQ(r.events[0][1].ready.count(), 100);
  EXPECT_DOUBLE_EQ(r.events[0][1].start.count(), 300);
  expect_breakdown(r.ranks[0], /*compute=*/150, /*exposed=*/30, /*sync_wait=*/200, /*idle=*/0, 0);

  // Composing the per-node medians instead: both issue at 200, step 280.
  const Trace trace = Trace::parse(trace_doc(2, kStepsTrace), "t.json");
  const CollectiveModel model(hand_cluster());
  SimulationOptions o;
  o.collectives = &model;
  o.replay_steps = false;
  const SimulationResult medians = simulate(trace, o);
  EXPECT_DOUBLE_EQ(medians.step_time.count(), 280);
  EXPECT_TRUE(medians.replayed_step_times.empty());
  EXPECT_EQ(medians.replayed_step, -1);
}

std::unique_ptr<OverlapModel> constant_slowdown(double s) {
  // slowdown = 1 + f·w0 with every other weight 0; no compute kinds seen,
  // so the encoding has 6 numeric + 6 communication one-hot features.
  std::string weights = std::to_string(s - 1);
  for (int i = 0; i < 12; ++i) weights += ", 0";
  return parse_overlap_model(R"({"schema": "tessera.sim.overlap/1", "kind": "linear",
                                 "compute_kinds": [], "weights": [)" +
                             weights + "]}");
}

const char* kOverlapTrace = R"(
  {"ranks": [0, 1], "nodes": [
    {"id": 0, "kind": "compute", "name": "A", "duration_us": 100},
    {"id": 1, "kind": "collective", "name": "C", "op": "all_reduce", "group": [0, 1],
     "bytes": 20000},
    {"id": 2, "kind": "compute", "name": "B", "duration_us": 10, "deps": [0]}]})";

TEST(Timeline, CommunicationOverlapsComputeOnAnotherStream) {
  // C (30 us) runs on the comm stream during A: hidden, A unchanged.
  const SimulationResult r = run(trace_doc(2, kOverlapTrace));
  EXPECT_DOUBLE_EQ(r.step_time.count(), 110);
  EXPECT_DOUBLE_EQ(r.events[0][1].start.count(), 0);
  EXPECT_DOUBLE_EQ(r.events[0][1].end.count(), 30);
  expect_breakdown(r.ranks[0], 110, 0, 0, 0, /*overlapped=*/30);
  EXPECT_DOUBLE_EQ(r.ranks[0].slowdown_extra.count(), 0);
}

TEST(Timeline, OverlapSlowsComputeWhileCommunicationRuns) {
  // With slowdown 1.5 while C runs: A does 30 / 1.5 = 20 us of work by
  // t = 30, the remaining 80 at full speed, ending at 110; B 110-120.
  const auto slow = constant_slowdown(1.5);
  const SimulationResult r = run(trace_doc(2, kOverlapTrace), hand_cluster(), slow.get());
  EXPECT_DOUBLE_EQ(r.events[1][0].end.count(), 110);
  EXPECT_DOUBLE_EQ(r.events[1][0].slowdown, 1.1);
  EXPECT_DOUBLE_EQ(r.events[1][2].start.count(), 110);
  EXPECT_DOUBLE_EQ(r.step_time.count(), 120);
  EXPECT_DOUBLE_EQ(r.ranks[1].slowdown_extra.count(), 10);
  expect_breakdown(r.ranks[1], 120, 0, 0, 0, 30);
}

TEST(Timeline, SlowdownAppliesOnlyWhileCommunicationRuns) {
  // A starts at 0; C waits for P (40 us on a side stream) and runs 40-70,
  // during which A runs at half speed: A has done 40 us of work at 40,
  // 15 more by 70, and the last 45 end at 115.
  const auto slow = constant_slowdown(2.0);
  const SimulationResult r = run(trace_doc(2, R"(
    {"ranks": [0, 1], "nodes": [
      {"id": 0, "kind": "compute", "name": "A", "duration_us": 100},
      {"id": 1, "kind": "compute", "name": "P", "duration_us": 40, "stream": "side"},
      {"id": 2, "kind": "collective", "name": "C", "op": "all_reduce", "group": [0, 1],
       "bytes": 20000, "deps": [1]}]})"),
                                 hand_cluster(), slow.get());
  EXPECT_DOUBLE_EQ(r.events[0][2].start.count(), 40);
  EXPECT_DOUBLE_EQ(r.events[0][0].end.count(), 115);
  EXPECT_DOUBLE_EQ(r.step_time.count(), 115);
  // P (40 us on "side") ran before C, so only A was slowed.
  EXPECT_DOUBLE_EQ(r.events[0][1].slowdown, 1.0);
  EXPECT_DOUBLE_EQ(r.ranks[0].slowdown_extra.count(), 15);
}

TEST(Timeline, PointToPointPairsStartWhenBothSidesIssue) {
  // send/recv of 10 kB: 2 + 10 = 12 us. Rank 1's recv waits from 0 to 40.
  const SimulationResult r = run(trace_doc(2, R"(
    {"ranks": [0], "nodes": [
      {"id": 0, "kind": "compute", "name": "A", "duration_us": 40},
      {"id": 1, "kind": "p2p_send", "name": "S", "peer": 1, "bytes": 10000, "deps": [0]},
      {"id": 2, "kind": "compute", "name": "B", "duration_us": 5, "deps": [1]}]},
    {"ranks": [1], "nodes": [
      {"id": 0, "kind": "p2p_recv", "name": "R", "peer": 0, "bytes": 10000},
      {"id": 1, "kind": "compute", "name": "C", "duration_us": 30, "deps": [0]}]})"));
  EXPECT_DOUBLE_EQ(r.events[1][0].ready.count(), 0);
  EXPECT_DOUBLE_EQ(r.events[1][0].start.count(), 40);
  EXPECT_DOUBLE_EQ(r.events[1][0].end.count(), 52);
  EXPECT_DOUBLE_EQ(r.events[0][2].end.count(), 57);
  EXPECT_DOUBLE_EQ(r.step_time.count(), 82);
  EXPECT_EQ(r.slowest_rank, 1);
  expect_breakdown(r.ranks[0], 45, 12, 0, /*idle after 57=*/25, 0);
  expect_breakdown(r.ranks[1], 30, 12, 40, 0, 0);
  EXPECT_DOUBLE_EQ(r.ranks[0].finish.count(), 57);
}

TEST(Timeline, SendsPairWithReceivesInIssueOrder) {
  // Both sends are issued at 0 on separate streams; the receives are
  // issued one after the other. The first send (1 kB, 3 us) pairs with the
  // first receive, the second (2 kB, 4 us) with the second.
  const SimulationResult r = run(trace_doc(2, R"(
    {"ranks": [0], "nodes": [
      {"id": 0, "kind": "p2p_send", "name": "S1", "peer": 1, "bytes": 1000, "stream": "a"},
      {"id": 1, "kind": "p2p_send", "name": "S2", "peer": 1, "bytes": 2000, "stream": "b"}]},
    {"ranks": [1], "nodes": [
      {"id": 0, "kind": "p2p_recv", "name": "R1", "peer": 0, "bytes": 1000},
      {"id": 1, "kind": "p2p_recv", "name": "R2", "peer": 0, "bytes": 2000}]})"));
  EXPECT_DOUBLE_EQ(r.events[1][0].end.count(), 3);
  EXPECT_DOUBLE_EQ(r.events[1][1].start.count(), 3);
  EXPECT_DOUBLE_EQ(r.events[1][1].end.count(), 7);
  // S2 was issued at 0 and waited for R2.
  EXPECT_DOUBLE_EQ(r.events[0][1].ready.count(), 0);
  EXPECT_DOUBLE_EQ(r.events[0][1].start.count(), 3);
  expect_breakdown(r.ranks[0], 0, 7, 0, 0, 0);
}

TEST(Timeline, DependencyChainsAcrossStreams) {
  // A 0-10; C (deps A) 10-40 on comm; B (after A on compute) 10-30;
  // D (after B, deps C) 40-45.
  const SimulationResult r = run(trace_doc(2, R"(
    {"ranks": [0, 1], "nodes": [
      {"id": 0, "kind": "compute", "name": "A", "duration_us": 10},
      {"id": 1, "kind": "collective", "name": "C", "op": "all_reduce", "group": [0, 1],
       "bytes": 20000, "deps": [0]},
      {"id": 2, "kind": "compute", "name": "B", "duration_us": 20},
      {"id": 3, "kind": "compute", "name": "D", "duration_us": 5, "deps": [1]}]})"));
  EXPECT_DOUBLE_EQ(r.events[0][1].start.count(), 10);
  EXPECT_DOUBLE_EQ(r.events[0][2].start.count(), 10);
  EXPECT_DOUBLE_EQ(r.events[0][3].ready.count(), 40);
  EXPECT_DOUBLE_EQ(r.step_time.count(), 45);
  expect_breakdown(r.ranks[0], 35, 10, 0, 0, 20);
}

TEST(Timeline, NamedGroupsOnOneEntryAndAcrossNodes) {
  // Four identical ranks, two per node. tp pairs sit inside a node (30 us),
  // dp pairs span nodes (10 + 20000 / 500 = 50 us).
  const SimulationResult r = run(trace_doc(4, R"(
    {"ranks": [0, 1, 2, 3], "nodes": [
      {"id": 0, "kind": "compute", "name": "A", "duration_us": 10},
      {"id": 1, "kind": "collective", "name": "T", "op": "all_reduce", "group": "tp",
       "bytes": 20000, "deps": [0]},
      {"id": 2, "kind": "collective", "name": "D", "op": "all_reduce", "group": "dp",
       "bytes": 20000, "deps": [1]}]})",
                                           R"(, "groups": {"tp": [[0, 1], [2, 3]],
                                                           "dp": [[0, 2], [1, 3]]})"),
                                 hand_cluster(/*devices_per_node=*/2));
  EXPECT_EQ(r.collective_calls, 4u);
  for (int rank = 0; rank < 4; ++rank) {
    EXPECT_DOUBLE_EQ(r.events[rank][1].end.count(), 40) << rank;
    EXPECT_DOUBLE_EQ(r.events[rank][2].end.count(), 90) << rank;
  }
  EXPECT_DOUBLE_EQ(r.step_time.count(), 90);
}

void expect_sim_error(const std::string& text, const std::vector<std::string>& needles,
                      const ClusterSpec& cluster = hand_cluster()) {
  try {
    run(text, cluster);
    ADD_FAILURE() << "simulated; expected " << needles.front();
  } catch (const InvalidArgument& e) {
    for (const std::string& n : needles) {
      EXPECT_NE(std::string(e.what()).find(n), std::string::npos)
          << "missing '" << n << "' in: " << e.what();
    }
  }
}

TEST(TimelineErrors, CollectiveThatARankNeverIssues) {
  expect_sim_error(trace_doc(3, R"(
    {"ranks": [0, 1], "nodes": [
      {"id": 0, "kind": "collective", "name": "ar", "op": "all_reduce", "group": [0, 1, 2],
       "bytes": 8}]},
    {"ranks": [2], "nodes": [{"id": 0, "kind": "compute", "name": "x", "duration_us": 1}]})"),
                   {"t.json: deadlock: 2 rank(s) cannot finish [0-1]",
                    "all_reduce 'ar' (call #0 on group [0-2])", "issued by rank(s) [0-1]",
                    "never by rank(s) [2]", "rank 2 finished all its nodes"});
}

TEST(TimelineErrors, CrossRankCycle) {
  // 0 waits for 1 in X, 1 waits for 2 in Z, 2 waits for 0 in Y.
  expect_sim_error(trace_doc(3, R"(
    {"ranks": [0], "nodes": [
      {"id": 0, "kind": "collective", "name": "X", "op": "all_reduce", "group": [0, 1], "bytes": 8},
      {"id": 1, "kind": "collective", "name": "Y", "op": "all_reduce", "group": [0, 2], "bytes": 8}]},
    {"ranks": [1], "nodes": [
      {"id": 0, "kind": "collective", "name": "Z", "op": "all_reduce", "group": [1, 2], "bytes": 8},
      {"id": 1, "kind": "collective", "name": "X", "op": "all_reduce", "group": [0, 1], "bytes": 8}]},
    {"ranks": [2], "nodes": [
      {"id": 0, "kind": "collective", "name": "Y", "op": "all_reduce", "group": [0, 2], "bytes": 8},
      {"id": 1, "kind": "collective", "name": "Z", "op": "all_reduce", "group": [1, 2], "bytes": 8}]})"),
                   {"deadlock: 3 rank(s)", "'X' (call #0 on group [0-1]) was issued by rank(s) [0]",
                    "never by rank(s) [1] (rank 1 waits in all_reduce 'Z'",
                    "'Y' (call #0 on group [0, 2]) was issued by rank(s) [2]"});
}

TEST(TimelineErrors, UnmatchedSendAndDisagreeingMembers) {
  expect_sim_error(
      trace_doc(2, R"(
    {"ranks": [0], "nodes": [{"id": 0, "kind": "p2p_send", "name": "act", "peer": 1, "bytes": 8}]},
    {"ranks": [1], "nodes": [{"id": 0, "kind": "compute", "name": "x", "duration_us": 1}]})"),
      {"deadlock", "p2p_send 'act' from rank 0 to rank 1 (tag 0) has no matching p2p_recv"});
  expect_sim_error(trace_doc(2, R"(
    {"ranks": [0], "nodes": [{"id": 0, "kind": "p2p_send", "name": "a", "peer": 1, "bytes": 8}]},
    {"ranks": [1], "nodes": [{"id": 0, "kind": "p2p_recv", "name": "b", "peer": 0, "bytes": 16}]})"),
                   {"p2p pair disagrees on size", "'a' has 8 bytes", "'b' has 16 bytes"});
  expect_sim_error(
      trace_doc(2, R"(
    {"ranks": [0], "nodes": [
      {"id": 0, "kind": "collective", "name": "g", "op": "all_reduce", "group": [0, 1], "bytes": 100}]},
    {"ranks": [1], "nodes": [
      {"id": 0, "kind": "collective", "name": "h", "op": "all_gather", "group": [0, 1], "bytes": 200}]})"),
      {"ranks 0 and 1 disagree on call #0 of group [0-1]",
       "rank 0 issued all_reduce 'g' (100 bytes)", "rank 1 issued all_gather 'h' (200 bytes)"});
  // A cluster with too few devices for the trace.
  expect_sim_error(trace_doc(2, kSyncTrace), {"the trace has 2 ranks", "1 nodes x 1 devices"},
                   hand_cluster(1, 1));
}

TEST(Timeline, ReportsRanksOverTheirMemory) {
  const SimulationResult r = run(trace_doc(2, R"(
    {"ranks": [0], "peak_memory_bytes": 1500, "nodes": [
      {"id": 0, "kind": "compute", "name": "a", "duration_us": 1}]},
    {"ranks": [1], "peak_memory_bytes": 900, "nodes": [
      {"id": 0, "kind": "compute", "name": "a", "duration_us": 1}]})",
                                           R"(, "memory_capacity_bytes": 1000)"));
  EXPECT_EQ(r.out_of_memory_ranks, (std::vector<int>{0}));
  EXPECT_EQ(r.ranks[0].peak_memory_bytes, 1500);
}

TEST(ChromeTrace, OneSlicePerNodeOnItsRankAndStream) {
  const Trace trace = Trace::parse(trace_doc(2, kSyncTrace), "t.json");
  const CollectiveModel model(hand_cluster());
  SimulationOptions o;
  o.collectives = &model;
  const SimulationResult r = simulate(trace, o);
  const nlohmann::json j = nlohmann::json::parse(chrome_trace_json(trace, r));
  ASSERT_TRUE(j.contains("traceEvents"));
  int slices = 0;
  bool saw_ar = false, saw_wait = false, saw_comm_thread = false;
  for (const auto& e : j["traceEvents"]) {
    if (e["ph"] == "M" && e["name"] == "thread_name" && e["args"]["name"] == "comm") {
      saw_comm_thread = true;
    }
    if (e["ph"] != "X") continue;
    ++slices;
    if (e["name"] == "ar" && e["pid"] == 0) {
      saw_ar = true;
      EXPECT_DOUBLE_EQ(e["ts"].get<double>(), 150);
      EXPECT_DOUBLE_EQ(e["dur"].get<double>(), 30);
      EXPECT_EQ(e["args"]["op"], "all_reduce");
      EXPECT_EQ(e["args"]["bytes"], 20000);
    }
    if (e["name"] == "wait: ar" && e["pid"] == 0) {
      saw_wait = true;
      EXPECT_DOUBLE_EQ(e["ts"].get<double>(), 100);
      EXPECT_DOUBLE_EQ(e["dur"].get<double>(), 50);
    }
  }
  EXPECT_EQ(slices, 6 + 1);  // six nodes and rank 0's wait
  EXPECT_TRUE(saw_ar);
  EXPECT_TRUE(saw_wait);
  EXPECT_TRUE(saw_comm_thread);
  // Only rank 1, without waits.
  ChromeTraceOptions only1;
  only1.ranks = {1};
  only1.include_waits = false;
  const auto j1 = nlohmann::json::parse(chrome_trace_json(trace, r, only1));
  for (const auto& e : j1["traceEvents"]) EXPECT_EQ(e["pid"], 1);
  // Without events there is nothing to draw.
  o.record_events = false;
  const SimulationResult bare = simulate(trace, o);
  EXPECT_TRUE(bare.events.empty());
  EXPECT_DOUBLE_EQ(bare.step_time.count(), 230);
  EXPECT_THROW(chrome_trace_json(trace, bare), InvalidArgument);
  EXPECT_NE(format_breakdown(r).find("step time 230.000 us"), std::string::npos);
}

// ---------------------------------------------------------------------------
// Scale: 1,024 ranks (tp 8 x dp 32 x pp 4), GPipe with 16 microbatches of a
// 24-layer model: about 3,100 nodes per rank, one entry per pipeline stage.

Trace pipeline_trace(int tp, int dp, int pp, int microbatches, int layers) {
  Trace t;
  t.source = "pipeline";
  const int world = tp * dp * pp;
  t.metadata.world_size = world;
  t.metadata.layout = {{"tp", tp}, {"dp", dp}, {"pp", pp}};
  t.metadata.model = "synthetic-gpt";
  auto rank_of = [&](int stage, int d, int k) { return (stage * dp + d) * tp + k; };
  auto& tp_groups = t.metadata.groups["tp"];
  auto& dp_groups = t.metadata.groups["dp"];
  for (int s = 0; s < pp; ++s) {
    for (int d = 0; d < dp; ++d) {
      std::vector<int> g;
      for (int k = 0; k < tp; ++k) g.push_back(rank_of(s, d, k));
      tp_groups.push_back(g);
    }
    for (int k = 0; k < tp; ++k) {
      std::vector<int> g;
      for (int d = 0; d < dp; ++d) g.push_back(rank_of(s, d, k));
      dp_groups.push_back(g);
    }
  }
  const int stride = dp * tp;  // rank distance between pipeline stages
  for (int s = 0; s < pp; ++s) {
    RankTrace rt;
    for (int d = 0; d < dp; ++d) {
      for (int k = 0; k < tp; ++k) rt.ranks.push_back(rank_of(s, d, k));
    }
    std::sort(rt.ranks.begin(), rt.ranks.end());
    rt.peak_memory_bytes = int64_t{30} << 30;
    int64_t id = 0;
    auto add = [&](TraceNode n) {
      n.id = id++;
      if (n.stream.empty()) n.stream = n.kind == NodeKind::kCompute ? "compute" : "comm";
      rt.nodes.push_back(std::move(n));
      return n.id;
    };
    auto compute = [&](const std::string& name, double us, std::vector<int64_t> deps) {
      TraceNode n;
      n.kind = NodeKind::kCompute;
      n.name = name;
      n.duration = Microseconds(us);
      n.compute_kind = "gemm";
      n.flops = us * 1e8;
      n.deps = std::move(deps);
      return add(std::move(n));
    };
    auto collective = [&](const std::string& name, const std::string& group, int64_t bytes,
                          std::vector<int64_t> deps, const std::string& stream) {
      TraceNode n;
      n.kind = NodeKind::kCollective;
      n.name = name;
      n.op = CollectiveKind::kAllReduce;
      n.group.partition = group;
      n.bytes = bytes;
      n.deps = std::move(deps);
      n.stream = stream;
      return add(std::move(n));
    };
    auto p2p = [&](bool send, int offset, int64_t tag, std::vector<int64_t> deps) {
      TraceNode n;
      n.kind = send ? NodeKind::kSend : NodeKind::kRecv;
      n.name = send ? "pp.send" : "pp.recv";
      n.peer_relative = true;
      n.peer_offset = offset;
      n.bytes = 8 << 20;
      n.tag = tag;
      n.deps = std::move(deps);
      n.stream = "pp";
      return add(std::move(n));
    };
    std::vector<int64_t> last_bwd_of_layer(layers, -1);
    for (int m = 0; m < microbatches; ++m) {
      std::vector<int64_t> deps;
      if (s > 0) deps.push_back(p2p(false, -stride, 0, {}));
      int64_t last = -1;
      for (int l = 0; l < layers; ++l) {
        const int64_t a = compute("attn.fwd", 120, deps);
        const int64_t ar1 = collective("tp.ar", "tp", 4 << 20, {a}, "tp");
        const int64_t b = compute("mlp.fwd", 160, {ar1});
        last = collective("tp.ar", "tp", 4 << 20, {b}, "tp");
        deps = {last};
      }
      if (s + 1 < pp) p2p(true, stride, 0, {last});
    }
    for (int m = microbatches - 1; m >= 0; --m) {
      std::vector<int64_t> deps;
      if (s + 1 < pp) deps.push_back(p2p(false, stride, 1, {}));
      int64_t last = -1;
      for (int l = layers - 1; l >= 0; --l) {
        const int64_t b = compute("mlp.bwd", 320, deps);
        const int64_t ar1 = collective("tp.ar.bwd", "tp", 4 << 20, {b}, "tp");
        const int64_t a = compute("attn.bwd", 240, {ar1});
        last = collective("tp.ar.bwd", "tp", 4 << 20, {a}, "tp");
        deps = {last};
        last_bwd_of_layer[l] = last;
      }
      if (s > 0) p2p(true, -stride, 1, {last});
    }
    // Gradient buckets of 6 layers each, reduced over dp while the last
    // microbatch's backward continues.
    std::vector<int64_t> buckets;
    for (int l0 = layers - 6; l0 >= 0; l0 -= 6) {
      buckets.push_back(collective("dp.grad", "dp", 96 << 20, {last_bwd_of_layer[l0]}, "dp"));
    }
    compute("optimizer", 400, buckets);
    t.entries.push_back(std::move(rt));
  }
  t.validate();
  return t;
}

TEST(TimelineScale, ThousandRanksWithThousandsOfNodesEach) {
  const auto build_start = std::chrono::steady_clock::now();
  const Trace trace = pipeline_trace(/*tp=*/8, /*dp=*/32, /*pp=*/4, /*microbatches=*/16,
                                     /*layers=*/24);
  const double build_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - build_start).count();
  ASSERT_EQ(trace.metadata.world_size, 1024);
  ASSERT_EQ(trace.entries.size(), 4u);
  size_t per_rank = trace.entries[1].nodes.size();
  EXPECT_GT(per_rank, 3000u);

  ClusterSpec a100 =
      ClusterSpec::load_file(std::string(TESSERA_SOURCE_DIR) + "/data/sim/a100_ib.json");
  const CollectiveModel model(a100);
  const auto slow = constant_slowdown(1.15);
  SimulationOptions o;
  o.collectives = &model;
  o.overlap = slow.get();
  const SimulationResult r = simulate(trace, o);
  std::cout << "[scale] 1024 ranks, " << per_rank << " nodes per rank (" << r.simulated_nodes
            << " in all, " << r.collective_calls << " collective/p2p calls): simulated in "
            << r.wall_seconds << " s (trace built in " << build_s << " s); step "
            << r.step_time.count() / 1e3 << " ms\n"
            << format_breakdown(r, 4);
  EXPECT_LT(r.wall_seconds, 30.0);
  size_t total = 0;
  for (const RankTrace& rt : trace.entries) total += rt.nodes.size() * rt.ranks.size();
  EXPECT_EQ(r.simulated_nodes, total);
  // Identical ranks of a stage finish together; the pipeline's last stage
  // starts its first forward after the three stages before it.
  const double first = r.ranks[trace.entries[0].ranks.front()].finish.count();
  for (int rank : trace.entries[0].ranks) EXPECT_DOUBLE_EQ(r.ranks[rank].finish.count(), first);
  EXPECT_GT(r.events[768][1].start.count(), 3 * 24 * (120 + 160));
  // Compute is a lower bound on the step: 16 x 24 x 840 us of kernels.
  EXPECT_GT(r.step_time.count(), 16 * 24 * 840.0);
  for (const RankBreakdown& b : r.ranks) {
    EXPECT_NEAR((b.compute + b.exposed_comm + b.sync_wait + b.idle).count(), r.step_time.count(),
                1e-6 * r.step_time.count());
  }
  // The dedup'd trace stays small on disk and parses quickly.
  const auto io_start = std::chrono::steady_clock::now();
  const Trace back = Trace::parse(trace.to_json(), "pipeline.json");
  const double io_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - io_start).count();
  std::cout << "[scale] trace JSON round trip: " << io_s << " s\n";
  EXPECT_EQ(back.entries.size(), 4u);
}

}  // namespace
}  // namespace tessera::sim
