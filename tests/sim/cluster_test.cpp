// sim: cluster files — round trip, override precedence, and strict-key
// errors that name the file and the key path.
#include "tessera/sim/cluster.h"

#include <gtest/gtest.h>

#include <string>

#include "tessera/core/error.h"

namespace tessera::sim {
namespace {

const char* kCluster = R"({
  "schema": "tessera.sim.cluster/1",
  "name": "two-regimes",
  "description": "test cluster",
  "topology": {"devices_per_node": 4, "num_nodes": 2, "nics_per_node": 2,
               "intra_node": {"bandwidth_gbps": 150, "latency_us": 0.5},
               "inter_node": {"bandwidth_gbps": 12.5, "latency_us": 3}},
  "algorithms": {
    "ring": [
      {"protocol": "ll", "max_bytes": 65536, "setup_us": 5, "intra_hop_us": 1,
       "inter_hop_us": 3, "intra_gbps": 20, "inter_gbps": 5},
      {"protocol": "simple", "max_bytes": 0, "setup_us": 30, "intra_hop_us": 0.5,
       "inter_hop_us": 2, "intra_gbps": 140, "inter_gbps": 24, "reduce_gbps": 900}],
    "direct": [
      {"protocol": "p2p", "max_bytes": 0, "setup_us": 4, "intra_hop_us": 1,
       "inter_hop_us": 3, "intra_gbps": 100, "inter_gbps": 12}]
  },
  "collectives": {
    "all_gather": {"ring": [
      {"protocol": "ag", "max_bytes": 0, "setup_us": 7, "intra_hop_us": 1,
       "inter_hop_us": 3, "intra_gbps": 120, "inter_gbps": 20}]}
  }
})";

TEST(ClusterSpec, ParsesAndRoundTrips) {
  const ClusterSpec c = ClusterSpec::parse(kCluster, "c.json");
  EXPECT_EQ(c.name, "two-regimes");
  EXPECT_EQ(c.topology.devices_per_node, 4);
  EXPECT_EQ(c.topology.num_nodes, 2);
  EXPECT_EQ(c.topology.nics_per_node, 2);
  EXPECT_DOUBLE_EQ(c.topology.inter_node.bandwidth_gbps, 12.5);
  EXPECT_EQ(c.topology.node_of(5), 1);
  const AlgorithmParams& ring = c.defaults.algorithms.at(Algorithm::kRing);
  ASSERT_EQ(ring.size(), 2u);
  EXPECT_EQ(ring[0].protocol, "ll");
  EXPECT_EQ(ring[0].max_bytes, 65536);
  EXPECT_DOUBLE_EQ(ring[1].reduce_gbps, 900);
  EXPECT_DOUBLE_EQ(ring[0].reduce_gbps, 0);  // optional, default 0
  const ClusterSpec back = ClusterSpec::parse(c.to_json(), "again.json");
  EXPECT_TRUE(back == c) << cluster_difference(back, c, 0);
  EXPECT_EQ(back.to_json(), c.to_json());
}

TEST(ClusterSpec, OverridesTakePrecedencePerCollective) {
  const ClusterSpec c = ClusterSpec::parse(kCluster, "c.json");
  EXPECT_EQ(c.params(CollectiveKind::kAllGather, Algorithm::kRing)->front().protocol, "ag");
  EXPECT_EQ(c.params(CollectiveKind::kAllReduce, Algorithm::kRing)->front().protocol, "ll");
  EXPECT_EQ(c.params(CollectiveKind::kAllToAll, Algorithm::kDirect)->front().protocol, "p2p");
  EXPECT_EQ(c.params(CollectiveKind::kAllReduce, Algorithm::kTree), nullptr);
}

TEST(ClusterSpec, DifferenceNamesTheField) {
  const ClusterSpec a = ClusterSpec::parse(kCluster, "a.json");
  ClusterSpec b = a;
  b.defaults.algorithms[Algorithm::kRing][1].intra_gbps = 140.0001;
  EXPECT_EQ(cluster_difference(a, b, 1e-3), "");
  const std::string diff = cluster_difference(a, b, 1e-9);
  EXPECT_NE(diff.find("algorithms.ring[1].intra_gbps: 140 vs 140.0001"), std::string::npos) << diff;
  b = a;
  b.overrides.clear();
  EXPECT_NE(cluster_difference(a, b, 0), "");
  EXPECT_FALSE(a == b);
}

std::string edit(const std::string& from, const std::string& to) {
  std::string text = kCluster;
  const size_t at = text.find(from);
  EXPECT_NE(at, std::string::npos) << from;
  if (at != std::string::npos) text.replace(at, from.size(), to);
  return text;
}

void expect_error(const std::string& text, const std::string& needle) {
  try {
    ClusterSpec::parse(text, "c.json");
    ADD_FAILURE() << "accepted; expected " << needle;
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(ClusterSpec, StrictKeysAndNamedErrors) {
  expect_error(edit(R"("intra_gbps": 20,)", R"("intra_gbps": 20, "intra_gpbs": 1,)"),
               "c.json: algorithms.ring[0]: unknown key(s) 'intra_gpbs'");
  expect_error(edit(R"("intra_gbps": 140)", R"("intra_gbps": 0)"),
               "c.json: algorithms.ring[1]: field 'intra_gbps': must be > 0");
  expect_error(edit(R"("inter_hop_us": 2,)", R"("inter_hop_us": -2,)"),
               "algorithms.ring[1]: field 'inter_hop_us': must be >= 0");
  expect_error(edit(R"("max_bytes": 65536)", R"("max_bytes": 0)"),
               "algorithms.ring[0]: field 'max_bytes': only the last regime may be unbounded");
  expect_error(
      edit(R"("protocol": "simple", "max_bytes": 0)", R"("protocol": "simple", "max_bytes": 1024)"),
      "algorithms.ring[1]: field 'max_bytes': the last regime must be unbounded");
  expect_error(edit(R"("direct": [)", R"("butterfly": [)"),
               "c.json: algorithms: field 'butterfly': unknown algorithm 'butterfly'");
  expect_error(edit(R"("all_gather": {)", R"("allgather": {)"),
               "c.json: collectives: field 'allgather': unknown collective 'allgather'");
  expect_error(edit(R"("devices_per_node": 4,)", ""),
               "c.json: topology: field 'devices_per_node': missing (required)");
  expect_error(edit(R"("latency_us": 0.5})", R"("latency_us": 0.5, "lanes": 12})"),
               "c.json: topology.intra_node: unknown key(s) 'lanes'");
  expect_error(edit(R"("bandwidth_gbps": 12.5)", R"("bandwidth_gbps": -1)"),
               "topology.inter_node: field 'bandwidth_gbps': must be > 0");
  expect_error(edit(R"("setup_us": 5,)", R"("setup_us": "fast",)"),
               "algorithms.ring[0]: field 'setup_us': expected a number");
  expect_error(edit(R"("schema": "tessera.sim.cluster/1")", R"("schema": "v2")"), "field 'schema'");
  expect_error("{\"schema\": 1,,}", "c.json: malformed JSON at line 1");
  EXPECT_THROW(ClusterSpec::load_file("/nonexistent/cluster.json"), NotFound);
}

// Regression (found by fuzz/sim_cluster_fuzz.cpp): a number too large for a
// double made nlohmann throw out_of_range.406, which escaped parse() instead
// of an InvalidArgument naming the file. The fuzzer's input, verbatim.
TEST(ClusterSpec, FuzzNumberTooLargeForADoubleIsInvalidArgument) {
  expect_error("{\n  \"algorithms\": \n  866888880888881E88888088\r\r\r\r\r&\r\r\r\r\r",
               "c.json: malformed JSON");
  expect_error(edit(R"("intra_gbps": 140)", R"("intra_gbps": 1e999)"), "c.json: malformed JSON");
}

}  // namespace
}  // namespace tessera::sim
