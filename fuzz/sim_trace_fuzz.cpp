// Fuzz target: simulator traces (tessera::sim::Trace::parse, JSON), then
// the timeline composer on what parses.
//
// Input: trace JSON text. A trace that parses must survive the round trip
// (to_json of the re-parsed text equals to_json of the first parse) and,
// when it is small (at most 64 ranks and 4096 nodes per rank), be simulated
// on the shipped A100 cluster (data/sim/a100_ib.json): a step time, or a
// tessera::Error for deadlocks, disagreeing collective members and traces
// that do not fit the cluster.
#include <cstdint>
#include <string>

#include "fuzz_common.h"
#include "tessera/sim/cluster.h"
#include "tessera/sim/collective_model.h"
#include "tessera/sim/timeline.h"
#include "tessera/sim/trace.h"

namespace {

const tessera::sim::CollectiveModel& collectives() {
  static const tessera::sim::CollectiveModel model(
      tessera::sim::ClusterSpec::load_file(tessera::fuzz::source_dir() + "/data/sim/a100_ib.json"));
  return model;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  collectives();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text = tessera::fuzz::as_string(data, size);
  tessera::fuzz::expect_errors("Trace::parse / simulate", [&] {
    const tessera::sim::Trace trace = tessera::sim::Trace::parse(text, "fuzz.json");
    const std::string json = trace.to_json();
    tessera::fuzz::require(tessera::sim::Trace::parse(json, "round trip").to_json() == json,
                           "Trace: parse(to_json()) changed the trace");
    size_t nodes = 0;
    for (const auto& e : trace.entries) nodes = std::max(nodes, e.nodes.size());
    if (trace.metadata.world_size > 64 || nodes > 4096) return;
    tessera::sim::SimulationOptions options;
    options.collectives = &collectives();
    const auto result = tessera::sim::simulate(trace, options);
    tessera::fuzz::require(result.ranks.size() == static_cast<size_t>(trace.metadata.world_size),
                           "simulate: one breakdown per rank");
    tessera::sim::chrome_trace_json(trace, result);
  });
  return 0;
}
