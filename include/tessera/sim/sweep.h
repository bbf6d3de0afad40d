// tessera/sim/sweep.h — what-if sweeps over parallel layouts and world
// sizes, and the library core of `tessera-sim collective`.
//
// sweep() asks a caller-supplied factory for the trace of every (layout,
// world size) pair, simulates each and returns one row per pair; a pair the
// factory rejects or whose simulation fails (deadlock, cluster too small)
// becomes a row with its error message rather than stopping the sweep.
//
//   tessera::sim::SweepOptions opts;
//   opts.layouts = {"dp=8,tp=1", "dp=4,tp=2", "dp=2,tp=4"};
//   opts.world_sizes = {8, 64, 1024};
//   opts.simulation.collectives = &model;
//   auto rows = tessera::sim::sweep(make_trace, opts);
//   std::cout << tessera::sim::format_sweep_table(rows);
//
// The collective command prints the modelled time of one collective:
//
//   tessera-sim collective --op all_reduce --gpus 16 --bytes 64M --cluster a100_ib.json
//   1084.83
//   tessera-sim collective --op all_reduce --gpus 16 --cluster a100_ib.json --table
//   (nccl-tests-style table, 8 B .. 1 GiB, which parse_nccl_tests reads back)
//
// Pure functions; sweep() calls the factory and simulate() sequentially.
//
// Thread safety: thread-safe when the trace factory is.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "tessera/sim/cluster.h"
#include "tessera/sim/timeline.h"
#include "tessera/sim/trace.h"
#include "tessera/sim/types.h"

namespace tessera::sim {

// Produces the trace of one training step for a layout (free text the
// factory understands, e.g. "dp=4,tp=2") and a world size. Throws a
// tessera::Error (typically InvalidArgument) for combinations it cannot
// build.
using TraceFactory = std::function<Trace(const std::string& layout, int world_size)>;

struct SweepOptions {
  std::vector<std::string> layouts;
  std::vector<int> world_sizes;
  // Passed to simulate() for every case (collectives is required).
  // record_events is forced off: a sweep keeps only the summaries.
  SimulationOptions simulation;
};

struct SweepRow {
  std::string layout;
  int world_size = 0;
  bool ok = false;
  std::string error;  // what() of the failure when !ok
  Microseconds step_time{0};
  int slowest_rank = 0;
  // Breakdown of the slowest rank.
  Microseconds compute{0};
  Microseconds exposed_comm{0};
  Microseconds overlapped_comm{0};
  Microseconds sync_wait{0};
  Microseconds idle{0};
  int64_t max_peak_memory_bytes = 0;
  bool out_of_memory = false;   // some rank exceeds the trace's memory capacity
  double simulate_seconds = 0;  // wall time of the simulation
};

// One row per (layout, world size), layouts outer. InvalidArgument when the
// lists are empty or no collective model is given; per-case failures are
// reported in the rows.
std::vector<SweepRow> sweep(const TraceFactory& factory, const SweepOptions& options);

// Aligned text table (errors shown in place of the numbers).
std::string format_sweep_table(const std::vector<SweepRow>& rows);
// CSV with a header line.
std::string sweep_to_csv(const std::vector<SweepRow>& rows);

// ---------------------------------------------------------------------------
// tessera-sim collective

struct CollectiveCommand {
  CollectiveKind op = CollectiveKind::kAllReduce;
  int gpus = 0;        // ranks, packed onto nodes in order
  int64_t bytes = -1;  // required unless table
  std::string cluster_file;
  bool table = false;
  int64_t min_bytes = 8;  // table range, doubling
  int64_t max_bytes = int64_t{1} << 30;
  std::optional<Algorithm> algorithm;  // default: the fastest
  std::string dtype = "float";         // float, half, bfloat16, double, int8, int32, int64
};

// Parses the arguments after "collective": --op NAME, --gpus N, --bytes S,
// --cluster FILE, --table, --min-bytes S, --max-bytes S, --algorithm NAME,
// --dtype NAME. Sizes accept K, M, G suffixes (powers of 1024). Each flag
// also accepts --flag=value. InvalidArgument naming the flag for unknown
// flags, missing values, bad numbers and missing required flags (--gpus,
// --cluster, and --bytes without --table).
CollectiveCommand parse_collective_command(const std::vector<std::string>& args);

// The command's output for a given cluster: one line with the time in
// microseconds ("%.2f\n"), or with `table` an nccl-tests-style table (header
// comments with one "#  Rank" line per GPU, then size, count, type, redop,
// time, algbw, busbw per row). Errors of the collective model pass through.
std::string run_collective_command(const CollectiveCommand& command, const ClusterSpec& cluster);
// Same, loading command.cluster_file.
std::string run_collective_command(const CollectiveCommand& command);

// Bytes per element of a dtype name; InvalidArgument for unknown names.
int dtype_size(const std::string& dtype);

}  // namespace tessera::sim
