#include "tessera/sim/host_sharing.h"

#include <algorithm>
#include <nlohmann/json.hpp>

#include "json_reader.h"
#include "tessera/core/error.h"
#include "util.h"

namespace tessera::sim {

using detail::median;

namespace {

// The k >= c at which the slowdown table, interpolated as the simulator
// does, covers `share` of its way from entry c to entry n (beyond n it grows
// in proportion to k, as Topology::host_slowdown extrapolates).
double computing_ranks_at(const std::vector<double>& table, int c, int n, double share) {
  Topology t;
  t.host_compute_slowdown = table;
  const double from = t.host_slowdown(c);
  const double to = t.host_slowdown(n);
  const double target = from + share * (to - from);
  if (share <= 0) return c;
  for (int k = c; k < n; ++k) {
    const double a = t.host_slowdown(k), b = t.host_slowdown(k + 1);
    if (target <= b) return b > a ? k + (target - a) / (b - a) : k + 1.0;
  }
  return static_cast<double>(n) * target / to;
}

}  // namespace

namespace {

// after_last_arrival's and arrival_lateness's layout check; the calls per rank.
size_t calls_per_rank(size_t first, size_t second, int ranks, int group_size, const char* what) {
  TESSERA_CHECK(ranks >= 1 && group_size >= 1 && ranks % group_size == 0 && first == second &&
                    first % static_cast<size_t>(ranks) == 0,
                InvalidArgument, what, ": need ", ranks, " ranks in groups of ", group_size,
                " and two series of the same calls (", first, " and ", second, " values)");
  return first / static_cast<size_t>(ranks);
}

}  // namespace

std::vector<double> after_last_arrival(const std::vector<double>& issue,
                                       const std::vector<double>& end, int ranks, int group_size) {
  const size_t calls =
      calls_per_rank(issue.size(), end.size(), ranks, group_size, "after_last_arrival");
  std::vector<double> out(calls, 0.0);
  for (size_t i = 0; i < calls; ++i) {
    for (int first = 0; first < ranks; first += group_size) {
      double last = issue[static_cast<size_t>(first) * calls + i];
      for (int r = first; r < first + group_size; ++r) {
        last = std::max(last, issue[static_cast<size_t>(r) * calls + i]);
      }
      for (int r = first; r < first + group_size; ++r) {
        const size_t at = static_cast<size_t>(r) * calls + i;
        // A rank that finished before the last issue (a broadcast's root)
        // never waited for it: its whole call counts.
        out[i] += end[at] - (end[at] >= last ? last : issue[at]);
      }
    }
    out[i] /= ranks;
  }
  return out;
}

std::vector<std::pair<double, double>> arrival_lateness(const std::vector<double>& issue,
                                                        const std::vector<double>& compute,
                                                        int ranks, int group_size) {
  const size_t calls =
      calls_per_rank(issue.size(), compute.size(), ranks, group_size, "arrival_lateness");
  std::vector<std::pair<double, double>> out;
  for (int first = 0; first < ranks; first += group_size) {
    for (size_t i = 0; i < calls; ++i) {
      double last = issue[static_cast<size_t>(first) * calls + i], issued = 0, computed = 0;
      for (int r = first; r < first + group_size; ++r) {
        const size_t at = static_cast<size_t>(r) * calls + i;
        last = std::max(last, issue[at]);
        issued += issue[at];
        computed += compute[at];
      }
      out.emplace_back(computed / group_size, last - issued / group_size);
    }
  }
  return out;
}

double comm_load_from_slowdowns(const std::vector<double>& compute_slowdown, int computing,
                                double busy_slowdown, double comm_slowdown) {
  const int n = static_cast<int>(compute_slowdown.size());
  TESSERA_CHECK(computing >= 1 && computing < n, InvalidArgument,
                "comm_load_from_slowdowns: computing ranks ", computing,
                " must be in [1, world size) with world size ", n);
  if (busy_slowdown <= 1.02) return 0.0;  // no shared cores to measure
  const double share = std::max(0.0, (comm_slowdown - 1) / (busy_slowdown - 1));
  const double load =
      (computing_ranks_at(compute_slowdown, computing, n, share) - computing) / (n - computing);
  return std::clamp(load, 0.0, 4.0);
}

std::string host_sharing_to_json(const HostSharing& sharing, const std::string& job) {
  nlohmann::json points = nlohmann::json::array();
  for (const CommLoadPoint& p : sharing.comm_load) {
    points.push_back({{"bytes", p.bytes}, {"load", p.load}});
  }
  nlohmann::json root = {{"schema", "tessera.sim.host_sharing/1"},
                         {"job", job},
                         {"compute_slowdown", sharing.compute_slowdown},
                         {"sync_skew", sharing.sync_skew},
                         {"lockstep_slowdown", sharing.lockstep_slowdown},
                         {"lockstep_ratio", sharing.lockstep_ratio},
                         {"sync_us", sharing.sync_us},
                         {"comm_load", std::move(points)},
                         {"comm_load_slowdown", sharing.comm_load_slowdown},
                         {"busy_slowdown", sharing.busy_slowdown},
                         {"foreign_cpu", sharing.foreign_cpu},
                         {"repeats_kept", sharing.repeats_kept}};
  return root.dump() + "\n";
}

HostSharing parse_host_sharing(std::string_view text, const std::string& source) {
  const detail::json root = detail::parse_json(text, source);
  detail::JsonObject top(root, source);
  const std::string schema = top.get_string("schema");
  if (schema != "tessera.sim.host_sharing/1") {
    top.fail("schema", "expected 'tessera.sim.host_sharing/1', got '" + schema + "'");
  }
  top.get_string("job");  // provenance only
  auto numbers = [&top](const char* key) {
    std::vector<double> out;
    for (const detail::json& v : top.get_array(key)) {
      if (!v.is_number()) top.fail(key, "expected a list of numbers, found " + v.dump());
      out.push_back(v.get<double>());
    }
    return out;
  };
  HostSharing h;
  h.compute_slowdown = numbers("compute_slowdown");
  h.sync_skew = numbers("sync_skew");
  h.lockstep_slowdown = numbers("lockstep_slowdown");
  h.lockstep_ratio = numbers("lockstep_ratio");
  h.sync_us = numbers("sync_us");
  h.comm_load_slowdown = numbers("comm_load_slowdown");
  h.busy_slowdown = top.get_nonnegative("busy_slowdown");
  h.foreign_cpu = numbers("foreign_cpu");
  h.repeats_kept = static_cast<int>(top.get_size("repeats_kept"));
  const detail::json& points = top.get_array("comm_load");
  for (size_t i = 0; i < points.size(); ++i) {
    detail::JsonObject point(points[i], source, "comm_load[" + std::to_string(i) + "]");
    h.comm_load.push_back(CommLoadPoint{point.get_int("bytes"), point.get_nonnegative("load")});
    point.check_keys();
  }
  top.check_keys();
  if (h.compute_slowdown.empty()) top.fail("compute_slowdown", "is empty");
  const size_t n = h.compute_slowdown.size();
  for (const auto& [key, list] :
       {std::pair<const char*, const std::vector<double>*>{"sync_skew", &h.sync_skew},
        {"lockstep_slowdown", &h.lockstep_slowdown},
        {"lockstep_ratio", &h.lockstep_ratio},
        {"sync_us", &h.sync_us}}) {
    if (list->size() != n) {
      top.fail(key, "has " + std::to_string(list->size()) + " entries, compute_slowdown " +
                        std::to_string(n) + " (one per count of ranks)");
    }
  }
  return h;
}

HostSharing median_host_sharing(const std::vector<HostSharing>& measurements) {
  TESSERA_CHECK(!measurements.empty(), InvalidArgument, "median_host_sharing: no measurements");
  const HostSharing& first = measurements.front();
  // Entry by entry, over the measurements.
  auto entrywise = [&](std::vector<double> HostSharing::*field, const char* name) {
    const size_t n = (first.*field).size();
    std::vector<double> out(n);
    for (size_t k = 0; k < n; ++k) {
      std::vector<double> values;
      for (const HostSharing& h : measurements) {
        TESSERA_CHECK((h.*field).size() == n, InvalidArgument, "median_host_sharing: ", name,
                      " has ", (h.*field).size(), " entries in one measurement, ", n,
                      " in the first");
        values.push_back((h.*field)[k]);
      }
      out[k] = median(values);
    }
    return out;
  };
  HostSharing out;
  out.compute_slowdown = entrywise(&HostSharing::compute_slowdown, "compute_slowdown");
  out.sync_skew = entrywise(&HostSharing::sync_skew, "sync_skew");
  out.lockstep_slowdown = entrywise(&HostSharing::lockstep_slowdown, "lockstep_slowdown");
  out.lockstep_ratio = entrywise(&HostSharing::lockstep_ratio, "lockstep_ratio");
  out.sync_us = entrywise(&HostSharing::sync_us, "sync_us");
  out.comm_load_slowdown = entrywise(&HostSharing::comm_load_slowdown, "comm_load_slowdown");
  std::vector<double> busy;
  for (const HostSharing& h : measurements) {
    busy.push_back(h.busy_slowdown);
    out.foreign_cpu.insert(out.foreign_cpu.end(), h.foreign_cpu.begin(), h.foreign_cpu.end());
    out.repeats_kept += h.repeats_kept;
  }
  out.busy_slowdown = median(busy);
  for (size_t k = 0; k < first.comm_load.size(); ++k) {
    std::vector<double> loads;
    for (const HostSharing& h : measurements) {
      TESSERA_CHECK(h.comm_load.size() == first.comm_load.size() &&
                        h.comm_load[k].bytes == first.comm_load[k].bytes,
                    InvalidArgument,
                    "median_host_sharing: the measurements' comm_load sizes differ");
      loads.push_back(h.comm_load[k].load);
    }
    out.comm_load.push_back(CommLoadPoint{first.comm_load[k].bytes, median(loads)});
  }
  return out;
}

void apply_host_sharing(const HostSharing& sharing, Topology& topology) {
  topology.host_compute_slowdown = sharing.compute_slowdown;
  topology.host_sync_skew = sharing.sync_skew;
  topology.host_lockstep_slowdown = sharing.lockstep_slowdown;
  topology.host_sync_us = sharing.sync_us;
  if (!sharing.comm_load.empty()) topology.host_comm_load = sharing.comm_load;
}

}  // namespace tessera::sim
