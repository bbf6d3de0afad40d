// Fuzz target: simulator cluster files (tessera::sim::ClusterSpec::parse, JSON).
//
// Input: cluster JSON text. A cluster that parses must survive the round
// trip (parse(to_json()) == the parsed value, as cluster.h promises) and
// give the collective model an answer for every collective on a few group
// shapes: a finite, non-negative time, or NotFound / InvalidArgument as
// documented.
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "fuzz_common.h"
#include "tessera/sim/cluster.h"
#include "tessera/sim/collective_model.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text = tessera::fuzz::as_string(data, size);
  tessera::fuzz::expect_errors("ClusterSpec::parse", [&] {
    const auto cluster = tessera::sim::ClusterSpec::parse(text, "fuzz.json");
    tessera::fuzz::require(
        tessera::sim::ClusterSpec::parse(cluster.to_json(), "round trip") == cluster,
        "ClusterSpec: parse(to_json()) != the parsed cluster");
    const tessera::sim::CollectiveModel model(cluster);
    const std::vector<std::vector<int>> groups = {{0}, {0, 1}, {0, 1, 2, 3, 4, 5, 6, 7, 8, 9}};
    for (const auto& members : groups) {
      for (auto op :
           {tessera::sim::CollectiveKind::kAllReduce, tessera::sim::CollectiveKind::kAllGather,
            tessera::sim::CollectiveKind::kReduceScatter, tessera::sim::CollectiveKind::kAllToAll,
            tessera::sim::CollectiveKind::kBroadcast, tessera::sim::CollectiveKind::kSendRecv}) {
        for (int64_t bytes : {int64_t{0}, int64_t{8}, int64_t{1} << 20, int64_t{1} << 40}) {
          tessera::fuzz::expect_errors("CollectiveModel::estimate", [&] {
            const double us = model.estimate(op, model.shape_of(members), bytes).time.count();
            tessera::fuzz::require(std::isfinite(us) && us >= 0,
                                   "estimate: time " + std::to_string(us));
          });
        }
      }
    }
  });
  return 0;
}
