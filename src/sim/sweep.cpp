#include "tessera/sim/sweep.h"

#include <algorithm>
#include <cmath>

#include "tessera/core/error.h"
#include "tessera/sim/collective_model.h"
#include "util.h"

namespace tessera::sim {

namespace {

int64_t parse_size(const std::string& flag, const std::string& text) {
  TESSERA_CHECK(!text.empty(), InvalidArgument, flag, ": expected a size, got ''");
  size_t used = 0;
  long long value = 0;
  try {
    value = std::stoll(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  TESSERA_CHECK(used > 0, InvalidArgument, flag,
                ": expected a size such as 4096, 64K, 16M or 1G, got '", text, "'");
  std::string suffix = text.substr(used);
  if (!suffix.empty() && (suffix.back() == 'B' || suffix.back() == 'b')) suffix.pop_back();
  int shift = 0;
  if (suffix == "K" || suffix == "k") {
    shift = 10;
  } else if (suffix == "M" || suffix == "m") {
    shift = 20;
  } else if (suffix == "G" || suffix == "g") {
    shift = 30;
  } else {
    TESSERA_CHECK(suffix.empty(), InvalidArgument, flag, ": unknown size suffix in '", text,
                  "' (use K, M or G)");
  }
  TESSERA_CHECK(value >= 0, InvalidArgument, flag, ": size must be >= 0, got '", text, "'");
  TESSERA_CHECK(value <= (INT64_MAX >> shift), InvalidArgument, flag, ": size '", text,
                "' is too large");
  return static_cast<int64_t>(value) << shift;
}

int parse_count(const std::string& flag, const std::string& text) {
  size_t used = 0;
  long long value = 0;
  try {
    value = std::stoll(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  TESSERA_CHECK(used == text.size() && !text.empty() && value >= 1 && value <= (1 << 24),
                InvalidArgument, flag, ": expected a positive integer, got '", text, "'");
  return static_cast<int>(value);
}

double bus_factor(CollectiveKind op, int n) {
  switch (op) {
    case CollectiveKind::kAllReduce:
      return 2.0 * (n - 1) / n;
    case CollectiveKind::kAllGather:
    case CollectiveKind::kReduceScatter:
    case CollectiveKind::kAllToAll:
      return static_cast<double>(n - 1) / n;
    case CollectiveKind::kBroadcast:
    case CollectiveKind::kSendRecv:
      return 1.0;
  }
  return 1.0;
}

}  // namespace

std::vector<SweepRow> sweep(const TraceFactory& factory, const SweepOptions& options) {
  TESSERA_CHECK(!options.layouts.empty() && !options.world_sizes.empty(), InvalidArgument,
                "sweep: needs at least one layout and one world size");
  TESSERA_CHECK(options.simulation.collectives != nullptr, InvalidArgument,
                "sweep: SweepOptions::simulation.collectives is required");
  TESSERA_CHECK(static_cast<bool>(factory), InvalidArgument, "sweep: no trace factory");
  SimulationOptions sim = options.simulation;
  sim.record_events = false;
  std::vector<SweepRow> rows;
  for (const std::string& layout : options.layouts) {
    for (int world : options.world_sizes) {
      SweepRow row;
      row.layout = layout;
      row.world_size = world;
      try {
        const Trace trace = factory(layout, world);
        TESSERA_CHECK(trace.metadata.world_size == world, InvalidArgument,
                      "the factory returned a trace of ", trace.metadata.world_size,
                      " ranks for world size ", world);
        const SimulationResult result = simulate(trace, sim);
        const RankBreakdown& b = result.ranks[result.slowest_rank];
        row.ok = true;
        row.step_time = result.step_time;
        row.slowest_rank = result.slowest_rank;
        row.compute = b.compute;
        row.exposed_comm = b.exposed_comm;
        row.overlapped_comm = b.overlapped_comm;
        row.sync_wait = b.sync_wait;
        row.idle = b.idle;
        for (const RankBreakdown& r : result.ranks) {
          row.max_peak_memory_bytes = std::max(row.max_peak_memory_bytes, r.peak_memory_bytes);
        }
        row.out_of_memory = !result.out_of_memory_ranks.empty();
        row.simulate_seconds = result.wall_seconds;
      } catch (const Error& e) {
        row.ok = false;
        row.error = e.what();
      }
      rows.push_back(std::move(row));
    }
  }
  return rows;
}

std::string format_sweep_table(const std::vector<SweepRow>& rows) {
  size_t width = 6;
  for (const SweepRow& r : rows) width = std::max(width, r.layout.size());
  const int w = static_cast<int>(width);
  std::string out =
      detail::format("%-*s %7s %14s %14s %14s %14s %14s %8s\n", w, "layout", "ranks", "step_us",
                     "compute_us", "exposed_us", "overlap_us", "sync_wait_us", "memory");
  for (const SweepRow& r : rows) {
    if (!r.ok) {
      out += detail::format("%-*s %7d  error: %s\n", w, r.layout.c_str(), r.world_size,
                            r.error.c_str());
      continue;
    }
    out += detail::format("%-*s %7d %14.1f %14.1f %14.1f %14.1f %14.1f %8s\n", w, r.layout.c_str(),
                          r.world_size, r.step_time.count(), r.compute.count(),
                          r.exposed_comm.count(), r.overlapped_comm.count(), r.sync_wait.count(),
                          r.out_of_memory ? "OOM" : "ok");
  }
  return out;
}

std::string sweep_to_csv(const std::vector<SweepRow>& rows) {
  std::string out =
      "layout,world_size,ok,step_us,slowest_rank,compute_us,exposed_comm_us,overlapped_comm_us,"
      "sync_wait_us,idle_us,max_peak_memory_bytes,out_of_memory,error\n";
  for (const SweepRow& r : rows) {
    std::string error = r.error;
    std::replace(error.begin(), error.end(), '"', '\'');
    out += detail::format(
        "\"%s\",%d,%d,%.6f,%d,%.6f,%.6f,%.6f,%.6f,%.6f,%lld,%d,\"%s\"\n", r.layout.c_str(),
        r.world_size, r.ok ? 1 : 0, r.step_time.count(), r.slowest_rank, r.compute.count(),
        r.exposed_comm.count(), r.overlapped_comm.count(), r.sync_wait.count(), r.idle.count(),
        static_cast<long long>(r.max_peak_memory_bytes), r.out_of_memory ? 1 : 0, error.c_str());
  }
  return out;
}

int dtype_size(const std::string& dtype) {
  if (dtype == "int8" || dtype == "uint8") return 1;
  if (dtype == "half" || dtype == "float16" || dtype == "bfloat16" || dtype == "bf16") return 2;
  if (dtype == "float" || dtype == "float32" || dtype == "int32") return 4;
  if (dtype == "double" || dtype == "float64" || dtype == "int64") return 8;
  TESSERA_THROW(InvalidArgument, "unknown dtype '", dtype,
                "' (expected int8, uint8, half, float16, bfloat16, float, float32, int32, double, "
                "float64, int64)");
}

CollectiveCommand parse_collective_command(const std::vector<std::string>& args) {
  CollectiveCommand c;
  bool have_gpus = false;
  for (size_t i = 0; i < args.size(); ++i) {
    std::string flag = args[i];
    std::string value;
    bool inline_value = false;
    const size_t eq = flag.find('=');
    if (flag.rfind("--", 0) == 0 && eq != std::string::npos) {
      value = flag.substr(eq + 1);
      flag = flag.substr(0, eq);
      inline_value = true;
    }
    auto take = [&]() -> std::string {
      if (inline_value) return value;
      TESSERA_CHECK(i + 1 < args.size(), InvalidArgument, flag, ": missing value");
      return args[++i];
    };
    if (flag == "--op") {
      c.op = parse_collective_kind(take());
    } else if (flag == "--gpus") {
      c.gpus = parse_count(flag, take());
      have_gpus = true;
    } else if (flag == "--bytes") {
      c.bytes = parse_size(flag, take());
    } else if (flag == "--cluster") {
      c.cluster_file = take();
      TESSERA_CHECK(!c.cluster_file.empty(), InvalidArgument, "--cluster: empty file name");
    } else if (flag == "--table") {
      TESSERA_CHECK(!inline_value, InvalidArgument, "--table takes no value");
      c.table = true;
    } else if (flag == "--min-bytes") {
      c.min_bytes = parse_size(flag, take());
    } else if (flag == "--max-bytes") {
      c.max_bytes = parse_size(flag, take());
    } else if (flag == "--algorithm") {
      c.algorithm = parse_algorithm(take());
    } else if (flag == "--dtype") {
      c.dtype = take();
      (void)dtype_size(c.dtype);
    } else {
      TESSERA_THROW(InvalidArgument, "unknown flag '", args[i],
                    "' (expected --op, --gpus, --bytes, --cluster, --table, --min-bytes, "
                    "--max-bytes, --algorithm, --dtype)");
    }
  }
  TESSERA_CHECK(have_gpus, InvalidArgument, "--gpus is required");
  TESSERA_CHECK(!c.cluster_file.empty(), InvalidArgument, "--cluster is required");
  TESSERA_CHECK(c.table || c.bytes >= 0, InvalidArgument, "--bytes is required (or use --table)");
  TESSERA_CHECK(c.min_bytes >= 1 && c.min_bytes <= c.max_bytes, InvalidArgument,
                "--min-bytes must be >= 1 and <= --max-bytes");
  TESSERA_CHECK(c.op != CollectiveKind::kSendRecv || c.gpus == 2, InvalidArgument,
                "--op send_recv needs --gpus 2");
  return c;
}

std::string run_collective_command(const CollectiveCommand& command, const ClusterSpec& cluster) {
  TESSERA_CHECK(command.gpus >= 1, InvalidArgument, "--gpus must be >= 1");
  CollectiveModelOptions mopts;
  mopts.algorithm = command.algorithm;
  const CollectiveModel model(cluster, mopts);
  const GroupShape shape = GroupShape::packed(command.gpus, cluster.topology.devices_per_node);
  if (!command.table) {
    TESSERA_CHECK(command.bytes >= 0, InvalidArgument, "--bytes is required (or use --table)");
    return detail::format("%.2f\n", model.estimate(command.op, shape, command.bytes).time.count());
  }
  const int elem = dtype_size(command.dtype);
  const bool reduces = collective_reduces(command.op);
  std::string out = detail::format(
      "# %s modelled by tessera-sim on cluster '%s': %d GPUs on %d node(s)\n#\n# Using devices\n",
      collective_kind_name(command.op), cluster.name.c_str(), shape.ranks, shape.nodes);
  for (int r = 0; r < shape.ranks; ++r) {
    out += detail::format("#  Rank %2d Pid %6d on node-%06d device %2d [model] %s\n", r, 0,
                          r / cluster.topology.devices_per_node,
                          r % cluster.topology.devices_per_node, cluster.name.c_str());
  }
  out += "#\n";
  out += detail::format("# %10s %12s %8s %6s %8s %7s %7s  %s\n", "size", "count", "type", "redop",
                        "time", "algbw", "busbw", "algorithm");
  out += detail::format("# %10s %12s %8s %6s %8s %7s %7s\n", "(B)", "(elements)", "", "", "(us)",
                        "(GB/s)", "(GB/s)");
  const double factor = bus_factor(command.op, shape.ranks);
  for (int64_t size = command.min_bytes; size <= command.max_bytes; size *= 2) {
    const CollectiveEstimate e = model.estimate(command.op, shape, size);
    const double us = e.time.count();
    const double algbw = us > 0 ? static_cast<double>(size) / (us * 1e3) : 0.0;
    out += detail::format("  %10lld %12lld %8s %6s %8.2f %7.2f %7.2f  %s/%s\n",
                          static_cast<long long>(size), static_cast<long long>(size / elem),
                          command.dtype.c_str(), reduces ? "sum" : "none", us, algbw,
                          algbw * factor, algorithm_name(e.algorithm), e.protocol.c_str());
    if (size > INT64_MAX / 2) break;
  }
  return out;
}

std::string run_collective_command(const CollectiveCommand& command) {
  return run_collective_command(command, ClusterSpec::load_file(command.cluster_file));
}

}  // namespace tessera::sim
