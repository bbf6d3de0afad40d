#include "tessera/sim/tracer.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/typeid.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <map>
#include <set>
#include <tuple>

#include "tessera/core/error.h"
#include "tessera/core/log.h"
#include "tessera/core/metrics.h"
#include "tessera/core/runtime.h"
#include "util.h"

namespace tessera::sim {

// ---------------------------------------------------------------------------
// CallRecorder

void CallRecorder::on_issue(const dist::CollectiveCall& call) {
  std::lock_guard<std::mutex> lock(mu_);
  calls_.push_back(call);
}

void CallRecorder::on_complete(const dist::CollectiveCall&) {}

std::vector<dist::CollectiveCall> CallRecorder::calls() const {
  std::lock_guard<std::mutex> lock(mu_);
  return calls_;
}

void CallRecorder::clear() {
  std::lock_guard<std::mutex> lock(mu_);
  calls_.clear();
}

// ---------------------------------------------------------------------------
// Layout helpers

std::map<std::string, std::vector<std::vector<int>>> layout_partitions(
    const ParallelLayout& layout) {
  std::map<std::string, std::vector<std::vector<int>>> out;
  const int world = layout.world_size();
  std::vector<int> all(static_cast<size_t>(world));
  for (int r = 0; r < world; ++r) all[r] = r;
  out["world"] = {all};
  auto axis = [&](const char* name, int size, int RankCoords::*member) {
    if (size <= 1) return;
    std::vector<std::vector<int>> groups;
    std::vector<bool> placed(static_cast<size_t>(world), false);
    for (int r = 0; r < world; ++r) {
      if (placed[r]) continue;
      RankCoords c = coords_of(layout, r);
      std::vector<int> members;
      for (int i = 0; i < size; ++i) {
        c.*member = i;
        const int m = rank_of(layout, c);
        members.push_back(m);
        placed[m] = true;
      }
      std::sort(members.begin(), members.end());
      groups.push_back(std::move(members));
    }
    out[name] = std::move(groups);
  };
  axis("dp", layout.dp, &RankCoords::dp);
  axis("ep", layout.ep, &RankCoords::ep);
  axis("tp", layout.tp, &RankCoords::tp);
  return out;
}

std::vector<std::vector<int>> rank_classes(const TrainingJobConfig& config) {
  const ParallelLayout& l = config.layout;
  const bool uneven_vocab = config.model.vocab_size % l.tp != 0;
  // MoE: data-parallel ranks route different tokens to the experts, so
  // their compute differs too.
  const bool moe = config.model.num_experts > 0;
  std::map<std::tuple<int, int, int>, std::vector<int>> classes;
  for (int r = 0; r < l.world_size(); ++r) {
    const RankCoords c = coords_of(l, r);
    classes[{c.ep, uneven_vocab ? c.tp : 0, moe ? c.dp : 0}].push_back(r);
  }
  std::vector<std::vector<int>> out;
  for (auto& [key, ranks] : classes) out.push_back(std::move(ranks));
  std::sort(out.begin(), out.end());
  return out;
}

namespace {

// ---------------------------------------------------------------------------
// Recording one step

struct RecordedNode {
  bool compute = true;
  double us = 0;              // compute
  dist::CollectiveCall call;  // communication
  std::vector<size_t> deps;   // indices of earlier nodes
};

// Sets LibTorch's intra-op threads for the scope.
class ThreadScope {
 public:
  explicit ThreadScope(int threads) : previous_(at::get_num_threads()) {
    if (threads != previous_) at::set_num_threads(threads);
  }
  ~ThreadScope() {
    if (at::get_num_threads() != previous_) at::set_num_threads(previous_);
  }
  ThreadScope(const ThreadScope&) = delete;
  ThreadScope& operator=(const ThreadScope&) = delete;

 private:
  int previous_;
};

// Observes a placeholder world and cuts the step into compute and
// communication nodes (see tracer.h). Used from the tracing thread only.
class StepRecorder : public dist::CollectiveObserver {
 public:
  void begin() {
    nodes_.clear();
    calls_.clear();
    issued_.clear();
    completed_since_compute_.clear();
    last_compute_ = -1;
    active_ = true;
    mark_ = std::chrono::steady_clock::now();
  }
  // Closes the tail compute node; returns the step's nodes.
  std::vector<RecordedNode> end() {
    close_compute(std::chrono::steady_clock::now());
    active_ = false;
    return std::move(nodes_);
  }
  const std::vector<dist::CollectiveCall>& calls() const { return calls_; }

  void on_issue(const dist::CollectiveCall& call) override {
    if (!active_) return;
    close_compute(std::chrono::steady_clock::now());
    RecordedNode n;
    n.compute = false;
    n.call = call;
    if (last_compute_ >= 0) n.deps.push_back(static_cast<size_t>(last_compute_));
    issued_[call.id] = nodes_.size();
    nodes_.push_back(std::move(n));
    calls_.push_back(call);
  }
  void on_complete(const dist::CollectiveCall& call) override {
    if (!active_) return;
    auto it = issued_.find(call.id);
    if (it != issued_.end()) completed_since_compute_.push_back(it->second);
    mark_ = std::chrono::steady_clock::now();
  }

 private:
  // The compute between the last mark and `now`.
  void close_compute(std::chrono::steady_clock::time_point now) {
    RecordedNode n;
    n.compute = true;
    n.us = std::chrono::duration<double, std::micro>(now - mark_).count();
    n.deps = completed_since_compute_;
    completed_since_compute_.clear();
    last_compute_ = static_cast<int64_t>(nodes_.size());
    nodes_.push_back(std::move(n));
    mark_ = now;
  }

  bool active_ = false;
  std::chrono::steady_clock::time_point mark_;
  std::vector<RecordedNode> nodes_;
  std::vector<dist::CollectiveCall> calls_;
  std::map<uint64_t, size_t> issued_;  // call id -> node index
  std::vector<size_t> completed_since_compute_;
  int64_t last_compute_ = -1;
};

using detail::median;

int64_t median_int(std::vector<int64_t> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Resets the peak resident set size (VmHWM); false when the kernel refuses.
bool reset_peak_rss() {
  std::ofstream out("/proc/self/clear_refs");
  if (!out) return false;
  out << "5";
  out.flush();
  return static_cast<bool>(out);
}

int64_t peak_rss_bytes() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::stoll(line.substr(6)) * 1024;
  }
  return 0;
}

CollectiveKind kind_of(const std::string& op) {
  if (op == "barrier") return CollectiveKind::kAllReduce;  // a 0-byte all_reduce
  return parse_collective_kind(op);
}

std::string dtype_text(at::ScalarType t) { return c10::toString(t); }

// The partition (of `partitions`) whose group containing `rank` has exactly
// `members`; "" when none does.
std::string partition_of(const std::map<std::string, std::vector<std::vector<int>>>& partitions,
                         std::vector<int> members, int rank) {
  std::sort(members.begin(), members.end());
  for (const auto& [name, groups] : partitions) {
    for (const auto& g : groups) {
      if (std::binary_search(g.begin(), g.end(), rank) && g == members) return name;
    }
  }
  return "";
}

// Node `i` of the combined entry from the measured steps' recordings.
TraceNode make_node(const std::vector<std::vector<RecordedNode>>& steps, size_t i, int rank,
                    const std::map<std::string, std::vector<std::vector<int>>>& partitions,
                    std::vector<int64_t>* send_bytes) {
  const RecordedNode& first = steps.front()[i];
  TraceNode n;
  n.id = static_cast<int64_t>(i);
  for (size_t d : first.deps) n.deps.push_back(static_cast<int64_t>(d));
  if (first.compute) {
    n.kind = NodeKind::kCompute;
    n.name = "compute." + std::to_string(i);
    n.stream = "compute";
    n.compute_kind = "step";
    std::vector<double> us;
    for (const auto& s : steps) {
      us.push_back(s[i].us);
      n.step_durations.emplace_back(s[i].us);
    }
    n.duration = Microseconds(median(us));
    return n;
  }
  const dist::CollectiveCall& c = first.call;
  std::vector<int64_t> bytes;
  for (const auto& s : steps) bytes.push_back(s[i].call.bytes);
  n.bytes = median_int(bytes);
  n.dtype = dtype_text(c.dtype);
  n.stream = "comm";
  if (c.op == "send" || c.op == "recv") {
    n.kind = c.op == "send" ? NodeKind::kSend : NodeKind::kRecv;
    n.peer_relative = true;
    n.peer_offset = c.ranks.at(static_cast<size_t>(c.peer)) - rank;
    n.tag = c.tag;
    n.name = c.op + "." + std::to_string(i);
    return n;
  }
  n.kind = NodeKind::kCollective;
  n.op = kind_of(c.op);
  if (c.op == "barrier") n.bytes = 0;
  const std::string partition = partition_of(partitions, c.ranks, rank);
  TESSERA_CHECK(!partition.empty(), Internal, "tracer: rank ", rank, ": ", c.op, " on group '",
                c.group, "' ", detail::format_ranks([&] {
                  std::vector<int> m = c.ranks;
                  std::sort(m.begin(), m.end());
                  return m;
                }()),
                " is not a group of the job's mesh");
  n.group.partition = partition;
  n.name = partition + "." + c.op + "." + std::to_string(i);
  if (n.op == CollectiveKind::kBroadcast) {
    std::vector<int> sorted = c.ranks;
    std::sort(sorted.begin(), sorted.end());
    const int root_world = c.ranks.at(static_cast<size_t>(c.peer));
    n.root_index = static_cast<int>(std::lower_bound(sorted.begin(), sorted.end(), root_world) -
                                    sorted.begin());
  }
  if (send_bytes != nullptr && c.op == "all_to_all") {
    // Per destination (as world ranks' positions in the sorted group), median
    // over the steps.
    std::vector<int> sorted = c.ranks;
    std::sort(sorted.begin(), sorted.end());
    send_bytes->assign(sorted.size(), 0);
    for (size_t j = 0; j < c.ranks.size(); ++j) {
      std::vector<int64_t> per_step;
      for (const auto& s : steps) per_step.push_back(s[i].call.send_bytes.at(j));
      const size_t pos = static_cast<size_t>(
          std::lower_bound(sorted.begin(), sorted.end(), c.ranks[j]) - sorted.begin());
      (*send_bytes)[pos] = median_int(per_step);
    }
  }
  return n;
}

// Same structure in every step: kinds, ops, groups and dependencies.
void check_same_structure(const std::vector<std::vector<RecordedNode>>& steps, int rank,
                          const std::string& source) {
  const auto& ref = steps.front();
  for (size_t s = 1; s < steps.size(); ++s) {
    const auto& cur = steps[s];
    TESSERA_CHECK(cur.size() == ref.size(), Internal, source, ": tracing rank ", rank,
                  ": measured step ", s, " has ", cur.size(), " nodes, the first one ", ref.size(),
                  " (the step's communication depends on the data)");
    for (size_t i = 0; i < ref.size(); ++i) {
      const bool same = cur[i].compute == ref[i].compute && cur[i].deps == ref[i].deps &&
                        (cur[i].compute || (cur[i].call.op == ref[i].call.op &&
                                            cur[i].call.ranks == ref[i].call.ranks));
      TESSERA_CHECK(same, Internal, source, ": tracing rank ", rank, ": node ", i,
                    " of measured step ", s, " differs from the first measured step (",
                    ref[i].compute ? "compute" : ref[i].call.op, " vs ",
                    cur[i].compute ? "compute" : cur[i].call.op, ")");
    }
  }
}

struct TracedEntryExtras {
  std::map<size_t, std::vector<int64_t>> send_bytes;  // node index -> per sorted member
};

TracedRank trace_rank_impl(const TrainingJobConfig& config, int rank, const TracerOptions& options,
                           TracedEntryExtras* extras) {
  config.validate();
  const int world_size = config.layout.world_size();
  TESSERA_CHECK(rank >= 0 && rank < world_size, InvalidArgument, config.source, ": rank ", rank,
                " outside layout ", config.layout.to_string(), " of ", world_size, " ranks");
  TESSERA_CHECK(options.warmup_steps >= 0 && options.measured_steps >= 1, InvalidArgument,
                "tracer: warmup_steps must be >= 0 and measured_steps >= 1");
  const int threads =
      options.threads > 0 ? options.threads : std::max(1, usable_cores() / world_size);
  ThreadScope thread_scope(threads);

  auto recorder = std::make_shared<StepRecorder>();
  dist::ProcessGroupOptions group_options;
  group_options.name = "world";
  group_options.observer = recorder;
  auto world = dist::ProcessGroup::create_placeholder(rank, world_size, group_options);
  auto job = TrainingJob::create(config, world);

  std::vector<std::vector<RecordedNode>> measured;
  std::vector<double> step_seconds;
  TracedRank out;
  out.rank = rank;
  const int total = options.warmup_steps + options.measured_steps;
  for (int s = 0; s < total; ++s) {
    const nn::TokenDataset::Batch batch = job->batch(s);
    const bool timed = s >= options.warmup_steps;
    if (s == options.warmup_steps) reset_peak_rss();
    recorder->begin();
    Stopwatch watch;
    job->step(batch);
    const double seconds = watch.seconds();
    std::vector<RecordedNode> nodes = recorder->end();
    if (!timed) continue;
    step_seconds.push_back(seconds);
    measured.push_back(std::move(nodes));
    if (s == total - 1) out.calls = recorder->calls();
  }
  out.peak_memory_bytes = peak_rss_bytes();
  out.step_seconds = median(step_seconds);
  check_same_structure(measured, rank, config.source);

  const auto partitions = layout_partitions(config.layout);
  out.entry.ranks = {rank};
  out.entry.peak_memory_bytes = out.peak_memory_bytes;
  for (size_t i = 0; i < measured.front().size(); ++i) {
    std::vector<int64_t> sends;
    out.entry.nodes.push_back(make_node(measured, i, rank, partitions, &sends));
    if (extras != nullptr && !sends.empty()) extras->send_bytes[i] = std::move(sends);
  }
  TESSERA_LOG(Debug, "sim") << config.source << ": traced rank " << rank << " of "
                            << config.layout.to_string() << ": " << out.entry.nodes.size()
                            << " nodes, step " << out.step_seconds << " s, " << threads
                            << " thread(s)";
  return out;
}

}  // namespace

TracedRank trace_rank(const TrainingJobConfig& config, int rank, const TracerOptions& options) {
  TracedRank r = trace_rank_impl(config, rank, options, nullptr);
  r.stands_for = {rank};
  return r;
}

TraceResult trace_training_job(const TrainingJobConfig& config, const TracerOptions& options) {
  Stopwatch watch;
  config.validate();
  const ParallelLayout& layout = config.layout;
  const auto partitions = layout_partitions(layout);
  TraceResult result;
  std::vector<TracedEntryExtras> extras;
  for (const std::vector<int>& cls : rank_classes(config)) {
    extras.emplace_back();
    TracedRank r = trace_rank_impl(config, cls.front(), options, &extras.back());
    r.stands_for = cls;
    r.entry.ranks = cls;
    result.ranks.push_back(std::move(r));
  }

  // Every entry issues the same communication, in the same order.
  const auto comm_nodes = [](const RankTrace& e) {
    std::vector<size_t> out;
    for (size_t i = 0; i < e.nodes.size(); ++i) {
      if (e.nodes[i].is_communication()) out.push_back(i);
    }
    return out;
  };
  const std::vector<size_t> ref = comm_nodes(result.ranks.front().entry);
  for (size_t k = 1; k < result.ranks.size(); ++k) {
    const RankTrace& e = result.ranks[k].entry;
    const std::vector<size_t> mine = comm_nodes(e);
    TESSERA_CHECK(mine.size() == ref.size(), Internal, config.source, ": traced rank ",
                  result.ranks[k].rank, " issues ", mine.size(),
                  " communication calls per step, rank ", result.ranks.front().rank, " issues ",
                  ref.size());
    for (size_t c = 0; c < ref.size(); ++c) {
      const TraceNode& a = result.ranks.front().entry.nodes[ref[c]];
      const TraceNode& b = e.nodes[mine[c]];
      TESSERA_CHECK(a.kind == b.kind && a.op == b.op && a.group.partition == b.group.partition,
                    Internal, config.source, ": communication call ", c, " differs between rank ",
                    result.ranks.front().rank, " (", a.name, ") and rank ", result.ranks[k].rank,
                    " (", b.name, ")");
    }
  }

  // Uneven all_to_all: the busiest member's volume, on every member.
  const int world = layout.world_size();
  std::vector<int> class_of(static_cast<size_t>(world), 0);
  for (size_t k = 0; k < result.ranks.size(); ++k) {
    for (int r : result.ranks[k].stands_for) class_of[r] = static_cast<int>(k);
  }
  for (size_t c = 0; c < ref.size(); ++c) {
    const TraceNode& probe = result.ranks.front().entry.nodes[ref[c]];
    if (probe.kind != NodeKind::kCollective || probe.op != CollectiveKind::kAllToAll) continue;
    const auto& groups = partitions.at(probe.group.partition);
    int64_t busiest = 0;
    for (const std::vector<int>& members : groups) {
      // sends[i][j]: bytes members[i] sends to members[j].
      std::vector<std::vector<int64_t>> sends;
      for (int r : members) {
        const int k = class_of[r];
        const size_t node = comm_nodes(result.ranks[k].entry)[c];
        sends.push_back(extras[k].send_bytes.at(node));
      }
      for (size_t i = 0; i < members.size(); ++i) {
        int64_t out_bytes = 0, in_bytes = 0;
        for (size_t j = 0; j < members.size(); ++j) {
          out_bytes += sends[i][j];
          in_bytes += sends[j][i];
        }
        busiest = std::max({busiest, out_bytes, in_bytes});
      }
    }
    for (TracedRank& r : result.ranks) r.entry.nodes[comm_nodes(r.entry)[c]].bytes = busiest;
  }

  Trace& t = result.trace;
  t.source = config.source;
  t.metadata.world_size = world;
  t.metadata.layout = {{"dp", layout.dp}, {"ep", layout.ep}, {"tp", layout.tp}};
  t.metadata.model = config.name.empty() ? config.model.model_type : config.name;
  t.metadata.memory_capacity_bytes = options.memory_capacity_bytes;
  t.metadata.groups = partitions;
  for (const TracedRank& r : result.ranks) t.entries.push_back(r.entry);
  t.validate();
  result.seconds = watch.seconds();
  return result;
}

}  // namespace tessera::sim
