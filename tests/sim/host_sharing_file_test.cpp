// sim_core: the host-sharing measurement's file, how it combines, and how
// it enters a topology and a cluster recipe (the measurement itself runs on
// real ranks in sim_mp_test).
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "tessera/core/error.h"
#include "tessera/sim/collective_model.h"
#include "tessera/sim/host_sharing.h"

namespace tessera::sim {
namespace {

// A measurement of 4 ranks with every field set.
HostSharing sample_sharing() {
  HostSharing h;
  h.compute_slowdown = {1.0, 1.0312345678, 1.61, 2.2};
  h.sync_skew = {0.0, 0.021, 0.04, 0.05};
  h.lockstep_slowdown = {1.0, 1.09, 1.7, 2.3};
  h.lockstep_ratio = {1.0, 1.06, 1.05, 1.04};
  h.sync_us = {0.0, 850.5, 0.0, 1200.0};
  h.comm_load = {{4096, 0.65}, {8 << 20, 0.97}};
  h.comm_load_slowdown = {1.39, 1.63};
  h.busy_slowdown = 1.66;
  h.foreign_cpu = {0.01, 0.2};
  h.repeats_kept = 7;
  return h;
}

// What cluster recipes and `validate --host-job` read back: every field, numbers at
// full precision, the job path as a JSON string even when it needs escaping.
TEST(HostSharingFile, HostSharingJson) {
  const HostSharing h = sample_sharing();
  const std::string job = R"(jobs/a "quoted" \dense.json)";
  const nlohmann::json j = nlohmann::json::parse(host_sharing_to_json(h, job));
  EXPECT_EQ(j.at("schema"), "tessera.sim.host_sharing/1");
  EXPECT_EQ(j.at("job"), job);
  EXPECT_EQ(j.at("compute_slowdown").get<std::vector<double>>(), h.compute_slowdown);
  EXPECT_EQ(j.at("sync_skew").get<std::vector<double>>(), h.sync_skew);
  EXPECT_EQ(j.at("lockstep_slowdown").get<std::vector<double>>(), h.lockstep_slowdown);
  EXPECT_EQ(j.at("lockstep_ratio").get<std::vector<double>>(), h.lockstep_ratio);
  EXPECT_EQ(j.at("sync_us").get<std::vector<double>>(), h.sync_us);
  ASSERT_EQ(j.at("comm_load").size(), 2u);
  EXPECT_EQ(j.at("comm_load")[1].at("bytes"), 8 << 20);
  EXPECT_EQ(j.at("comm_load")[1].at("load"), 0.97);
  EXPECT_EQ(j.at("comm_load_slowdown").get<std::vector<double>>(), h.comm_load_slowdown);
  EXPECT_EQ(j.at("busy_slowdown"), 1.66);
  EXPECT_EQ(j.at("foreign_cpu").get<std::vector<double>>(), h.foreign_cpu);
  EXPECT_EQ(j.at("repeats_kept"), 7);
}

}  // namespace
// HostSharing::comm_load from the measured slowdowns, by hand: with
// compute_slowdown {1, 1.2, 1.6, 2} and 2 of 4 ranks computing, the span
// runs from 1.2 (2 computing) to 2.0 (4 computing).
TEST(HostSharingFile, CommLoadFromSlowdowns) {
  const std::vector<double> table = {1.0, 1.2, 1.6, 2.0};
  // Busy within 2 % of idle: no shared cores, nothing to measure.
  EXPECT_EQ(comm_load_from_slowdowns(table, 2, 1.01, 1.3), 0.0);
  // Communication that slows nothing (or speeds up): no load.
  EXPECT_EQ(comm_load_from_slowdowns(table, 2, 1.5, 1.0), 0.0);
  EXPECT_EQ(comm_load_from_slowdowns(table, 2, 1.5, 0.9), 0.0);
  // Half the busy slowdown: 1.2 + 0.5 x 0.8 = 1.6, three ranks computing,
  // one of the two others' worth: load 0.5.
  EXPECT_NEAR(comm_load_from_slowdowns(table, 2, 1.5, 1.25), 0.5, 1e-12);
  // A quarter: 1.4, half-way between 2 and 3 computing: load 0.25.
  EXPECT_NEAR(comm_load_from_slowdowns(table, 2, 1.5, 1.125), 0.25, 1e-12);
  // As slow as busy: all four computing, load 1.
  EXPECT_NEAR(comm_load_from_slowdowns(table, 2, 1.5, 1.5), 1.0, 1e-12);
  // Beyond busy the table grows in proportion to the ranks: share 2, 2.8 =
  // 2.0 x 5.6 / 4, so 5.6 computing, load (5.6 - 2) / 2 = 1.8.
  EXPECT_NEAR(comm_load_from_slowdowns(table, 2, 1.5, 2.0), 1.8, 1e-12);
  // Clamped at 4.
  EXPECT_EQ(comm_load_from_slowdowns(table, 2, 1.5, 10.0), 4.0);
  // The computing ranks must be some but not all.
  EXPECT_THROW(comm_load_from_slowdowns(table, 0, 1.5, 1.2), InvalidArgument);
  EXPECT_THROW(comm_load_from_slowdowns(table, 4, 1.5, 1.2), InvalidArgument);
}

// Hand-computed: 4 ranks in two pairs, two calls each. Call 0: pair {0, 1}
// issued at 1.0 and 3.0 (the last at 3.0) and ended at 4.0 and 4.5; pair
// {2, 3} issued at 2.0 and 2.0 and ended at 2.5 and 3.5: (1.0 + 1.5 + 0.5 +
// 1.5) / 4 = 1.125. Call 1 of every rank issued at 10 and ended at 10.2:
// 0.2. As one group of 4, call 0's last issue is 3.0, and rank 2 finished
// before it (at 2.5, having issued at 2.0: its own 0.5 counts):
// (1.0 + 1.5 + 0.5 + 0.5) / 4 = 0.875.
TEST(HostSharingFile, AfterLastArrivalTimesFromTheGroupsLastIssue) {
  // Rank r's calls at r * 2 + i.
  const std::vector<double> issue = {1.0, 10.0, 3.0, 10.0, 2.0, 10.0, 2.0, 10.0};
  const std::vector<double> end = {4.0, 10.2, 4.5, 10.2, 2.5, 10.2, 3.5, 10.2};
  const std::vector<double> pairs = after_last_arrival(issue, end, 4, 2);
  ASSERT_EQ(pairs.size(), 2u);
  EXPECT_DOUBLE_EQ(pairs[0], 1.125);
  EXPECT_NEAR(pairs[1], 0.2, 1e-12);
  const std::vector<double> world = after_last_arrival(issue, end, 4, 4);
  EXPECT_DOUBLE_EQ(world[0], 0.875);
  EXPECT_THROW(after_last_arrival(issue, end, 4, 3), InvalidArgument);
  EXPECT_THROW(after_last_arrival(issue, {1.0}, 4, 2), InvalidArgument);
  EXPECT_THROW(after_last_arrival({1.0, 2.0, 3.0}, {1.0, 2.0, 3.0}, 2, 2), InvalidArgument);
}

// The same issue times with the compute before each call: pair {0, 1}'s
// call 0 has its last member 1.0 behind the mean issue 2.0 after a mean
// 6.0 of compute; every other call's members issued together.
TEST(HostSharingFile, ArrivalLatenessIsTheLastIssueBehindTheMean) {
  const std::vector<double> issue = {1.0, 10.0, 3.0, 10.0, 2.0, 10.0, 2.0, 10.0};
  const std::vector<double> compute = {5.0, 1.0, 7.0, 1.0, 4.0, 2.0, 6.0, 2.0};
  const std::vector<std::pair<double, double>> expected = {
      {6.0, 1.0}, {1.0, 0.0}, {5.0, 0.0}, {2.0, 0.0}};
  EXPECT_EQ(arrival_lateness(issue, compute, 4, 2), expected);
  // One group of 4: call 0's last issue 3.0 is 1.0 behind the mean 2.0.
  EXPECT_EQ(arrival_lateness(issue, compute, 4, 4)[0], std::make_pair(5.5, 1.0));
  EXPECT_THROW(arrival_lateness(issue, {1.0}, 4, 2), InvalidArgument);
}

TEST(HostSharingFile, HostSharingParsesWhatItWrote) {
  const HostSharing h = sample_sharing();
  const HostSharing back = parse_host_sharing(host_sharing_to_json(h, "jobs/a.json"), "h.json");
  EXPECT_EQ(back.compute_slowdown, h.compute_slowdown);
  EXPECT_EQ(back.sync_skew, h.sync_skew);
  EXPECT_EQ(back.lockstep_slowdown, h.lockstep_slowdown);
  EXPECT_EQ(back.lockstep_ratio, h.lockstep_ratio);
  EXPECT_EQ(back.sync_us, h.sync_us);
  EXPECT_EQ(back.comm_load, h.comm_load);
  EXPECT_EQ(back.comm_load_slowdown, h.comm_load_slowdown);
  EXPECT_EQ(back.busy_slowdown, h.busy_slowdown);
  EXPECT_EQ(back.foreign_cpu, h.foreign_cpu);
  EXPECT_EQ(back.repeats_kept, h.repeats_kept);
}

TEST(HostSharingFile, HostSharingErrorsNameTheField) {
  nlohmann::json j = nlohmann::json::parse(host_sharing_to_json(sample_sharing(), "jobs/a.json"));
  auto expect_error = [](const nlohmann::json& doc, const std::string& needle) {
    try {
      parse_host_sharing(doc.dump(), "host.json");
      ADD_FAILURE() << "no error; expected one naming " << needle;
    } catch (const InvalidArgument& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find("host.json"), std::string::npos) << what;
      EXPECT_NE(what.find(needle), std::string::npos) << what;
    }
  };
  nlohmann::json bad = j;
  bad["schema"] = "tessera.sim.cluster/1";
  expect_error(bad, "schema");
  bad = j;
  bad["sync_us"] = {0.0, 1.0};
  expect_error(bad, "sync_us");
  bad = j;
  bad["compute_slowdwon"] = bad["compute_slowdown"];
  expect_error(bad, "compute_slowdwon");
  bad = j;
  bad["comm_load"][0]["load"] = -1;
  expect_error(bad, "comm_load[0]");
  bad = j;
  bad.erase("lockstep_slowdown");
  expect_error(bad, "lockstep_slowdown");
  EXPECT_THROW(parse_host_sharing("{\"schema\": ", "host.json"), InvalidArgument);
}

TEST(HostSharingFile, MedianHostSharingIsEntryByEntry) {
  HostSharing a = sample_sharing(), b = sample_sharing(), c = sample_sharing();
  a.compute_slowdown = {1.0, 1.1, 1.5, 2.0};
  b.compute_slowdown = {1.0, 1.3, 1.4, 2.4};
  c.compute_slowdown = {1.0, 1.2, 1.9, 1.8};
  b.comm_load[1].load = 0.5;
  c.comm_load[1].load = 0.6;
  a.busy_slowdown = 3;
  const HostSharing m = median_host_sharing({a, b, c});
  EXPECT_EQ(m.compute_slowdown, (std::vector<double>{1.0, 1.2, 1.5, 2.0}));
  EXPECT_EQ(m.sync_us, a.sync_us);
  ASSERT_EQ(m.comm_load.size(), 2u);
  EXPECT_EQ(m.comm_load[1].bytes, 8 << 20);
  EXPECT_EQ(m.comm_load[1].load, 0.6);
  EXPECT_EQ(m.busy_slowdown, 1.66);
  EXPECT_EQ(m.foreign_cpu.size(), 6u);
  EXPECT_EQ(m.repeats_kept, 21);
  // Different world sizes or comm_load sizes cannot be combined.
  b.sync_skew.pop_back();
  EXPECT_THROW(median_host_sharing({a, b}), InvalidArgument);
  c.comm_load[0].bytes = 1024;
  EXPECT_THROW(median_host_sharing({a, c}), InvalidArgument);
  EXPECT_THROW(median_host_sharing({}), InvalidArgument);
}

TEST(HostSharingFile, ApplyHostSharingReplacesTheHostFields) {
  Topology t;
  t.devices_per_node = 4;
  t.host_comm_load = {{64, 0.1}};
  HostSharing h = sample_sharing();
  h.comm_load.clear();  // not measured (fewer than 4 ranks): kept
  apply_host_sharing(h, t);
  EXPECT_EQ(t.devices_per_node, 4);
  EXPECT_EQ(t.host_compute_slowdown, h.compute_slowdown);
  EXPECT_EQ(t.host_sync_skew, h.sync_skew);
  EXPECT_EQ(t.host_lockstep_slowdown, h.lockstep_slowdown);
  EXPECT_EQ(t.host_sync_us, h.sync_us);
  EXPECT_EQ(t.host_comm_load, (std::vector<CommLoadPoint>{{64, 0.1}}));
  apply_host_sharing(sample_sharing(), t);
  EXPECT_EQ(t.host_comm_load, sample_sharing().comm_load);
}

// A recipe naming a measurement ("host_sharing") carries its figures into
// the fitted cluster; a missing or malformed file is named.
TEST(HostSharingFile, RecipeAppliesTheNamedMeasurement) {
  const std::string dir = ::testing::TempDir();
  std::ofstream(dir + "/host4.json") << host_sharing_to_json(sample_sharing(), "jobs/x.json");
  std::ofstream(dir + "/bench.json") << R"({"schema": "tessera.sim.collective_bench/1",
    "devices_per_node": 4, "results": [
      {"op": "all_reduce", "bytes": 1024, "ranks": 4, "nodes": 1, "seconds": 0.0002},
      {"op": "all_reduce", "bytes": 65536, "ranks": 4, "nodes": 1, "seconds": 0.0004},
      {"op": "all_reduce", "bytes": 1048576, "ranks": 4, "nodes": 1, "seconds": 0.002},
      {"op": "all_reduce", "bytes": 16777216, "ranks": 4, "nodes": 1, "seconds": 0.03}]})";
  auto recipe_naming = [&dir](const std::string& host_file) {
    const std::string path = dir + "/recipe_" + std::to_string(host_file.size()) + ".json";
    std::ofstream(path) << R"({"schema": "tessera.sim.cluster_fit/1", "name": "local4",
      "topology": {"devices_per_node": 4, "num_nodes": 1, "nics_per_node": 1,
                   "intra_node": {"bandwidth_gbps": 10, "latency_us": 50},
                   "inter_node": {"bandwidth_gbps": 1, "latency_us": 100},
                   "host_compute_slowdown": [1, 1.5, 2, 2.5]},
      "nccl_tests": [], "collective_bench": ["bench.json"], "host_sharing": ")"
                        << host_file << "\"}";
    return path;
  };
  const HostSharing h = sample_sharing();
  const ClusterRecipe recipe = load_cluster_recipe(recipe_naming("host4.json"));
  const Topology& t = recipe.options.topology;
  EXPECT_EQ(t.host_compute_slowdown, h.compute_slowdown);
  EXPECT_EQ(t.host_sync_skew, h.sync_skew);
  EXPECT_EQ(t.host_lockstep_slowdown, h.lockstep_slowdown);
  EXPECT_EQ(t.host_sync_us, h.sync_us);
  EXPECT_EQ(t.host_comm_load, h.comm_load);
  const ClusterSpec fitted = fit_cluster(recipe.fit_measurements, recipe.options);
  EXPECT_EQ(fitted.topology.host_lockstep_slowdown, h.lockstep_slowdown);
  EXPECT_EQ(fitted.topology.host_comm_load, h.comm_load);

  EXPECT_THROW(load_cluster_recipe(recipe_naming("absent_host.json")), NotFound);
  std::ofstream(dir + "/bad_host.json") << R"({"schema": "tessera.sim.host_sharing/1"})";
  try {
    load_cluster_recipe(recipe_naming("bad_host.json"));
    ADD_FAILURE() << "accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("bad_host.json"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("'job'"), std::string::npos) << e.what();
  }
}

}  // namespace tessera::sim
