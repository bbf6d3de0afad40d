#include "tessera/sim/timeline.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <deque>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>
#include <queue>
#include <unordered_map>

#include "tessera/core/error.h"
#include "tessera/core/log.h"
#include "util.h"

namespace tessera::sim {

namespace {

// The dependency graph of one trace entry, shared by all the ranks it
// stands for.
struct EntryPlan {
  std::vector<int> succ_begin;  // CSR: successors of node i are succ[succ_begin[i] .. [i+1])
  std::vector<int> succ;
  std::vector<int> indegree;  // deps + stream predecessor
  std::vector<int> stream_of;
  std::vector<std::string> streams;
  std::vector<int> explicit_group;  // collective with a member list: its group id; else -1
  std::vector<int> partition;       // collective with a named group: partition index; else -1
  // Compute that depends on a communication node: it starts when a wait
  // ends, in step with the op's other members (Topology::host_lockstep_slowdown).
  std::vector<char> after_comm;
};

struct GroupInfo {
  std::vector<int> members;
  std::string partition;  // "" for explicit lists
  GroupShape shape;
};

struct Instance {
  bool p2p = false;
  int group = -1;   // collectives
  int64_t seq = 0;  // collectives: call number on the group
  CollectiveKind op = CollectiveKind::kAllReduce;
  int64_t bytes = 0;
  int root_index = -1;
  int expected = 0;                          // members that must issue it
  std::vector<std::pair<int, int>> members;  // (rank, node) in arrival order
  GroupShape shape;
  bool started = false;
};

struct P2PKey {
  int src;
  int dst;
  int64_t tag;
  bool operator==(const P2PKey& o) const { return src == o.src && dst == o.dst && tag == o.tag; }
};
struct P2PKeyHash {
  size_t operator()(const P2PKey& k) const {
    uint64_t h = static_cast<uint64_t>(k.src) * 0x9E3779B97F4A7C15ull;
    h ^= static_cast<uint64_t>(k.dst) + 0x632BE59BD9B4E019ull + (h << 6) + (h >> 2);
    h ^= static_cast<uint64_t>(k.tag) + 0x9E3779B97F4A7C15ull + (h << 6) + (h >> 2);
    return static_cast<size_t>(h);
  }
};
// A p2p node issued and not yet matched: (rank, node) and when.
struct PendingP2P {
  int rank;
  int node;
};
struct P2PQueues {
  std::deque<PendingP2P> sends;
  std::deque<PendingP2P> recvs;
};

struct Event {
  double t;
  uint64_t seq;  // tie-break: first scheduled, first processed (deterministic)
  int type;      // kComputeDone, kCommDone or kSyncDone
  int a;         // rank (compute) or instance (comm)
  int b;         // node (compute)
  uint32_t gen;  // compute: generation, stale events are skipped
  bool operator>(const Event& o) const { return t != o.t ? t > o.t : seq > o.seq; }
};
constexpr int kComputeDone = 0;
constexpr int kCommDone = 1;
constexpr int kSyncDone = 2;  // a communication op's straggler wait is over (host_sync_*)

struct RunningCompute {
  int node;
  double remaining;  // unslowed microseconds left
  double rate;       // current slowdown factor
  double last;       // time `remaining` was last updated
  uint32_t gen;
  double start;
};

struct ActiveComm {
  int instance;
  CollectiveKind op;
  int64_t bytes;
  int ranks;
};

struct RankState {
  int entry = 0;
  std::vector<int32_t> indegree;
  size_t done = 0;
  std::unordered_map<int, int64_t> group_seq;  // group id -> calls issued so far
  std::vector<RunningCompute> compute;
  std::vector<ActiveComm> comms;
  int waiting = 0;  // communication ops issued but not started
  double last_change = 0;
  double t_compute = 0, t_exposed = 0, t_wait = 0, t_idle = 0, t_overlapped = 0;
  double slowdown_extra = 0;
  double finish = 0;
  // Time spent computing since the rank's last communication op started
  // (host_sync_skew scales it).
  double since_sync = 0;
  // What the rank counts toward its node's computing ranks (host sharing):
  // 1 while computing, Topology::comm_load while only communicating, else 0.
  double host_share = 0;
};

class Simulator {
 public:
  Simulator(const Trace& trace, const SimulationOptions& options)
      : trace_(trace), options_(options) {}

  SimulationResult run();

 private:
  void plan();
  int intern_group(const std::string& partition, const std::vector<int>& members);
  int group_of(int rank, int node) const;
  const TraceNode& node_at(int rank, int node) const {
    return trace_.entries[ranks_[rank].entry].nodes[node];
  }

  void push(double t, int type, int a, int b, uint32_t gen) {
    heap_.push(Event{t, event_seq_++, type, a, b, gen});
  }
  void account(RankState& rs, double t);
  double overlap_rate(const TraceNode& node, const RankState& rs);
  // The overlap slowdown times the host-sharing slowdown of the rank's node.
  double rate_for(int rank, int node, const RankState& rs);
  void retime(int rank, double t);
  // Re-times every computing rank of a node whose count of computing ranks
  // changed (host sharing).
  void retime_host(int host, double t);
  // Re-counts the rank's share of its node after its compute or its
  // communication changed; true when the node's count changed.
  bool update_host_share(int rank);
  // update_host_share, then re-times the node's computing ranks if its count
  // changed, else the rank's own compute (the overlap model).
  void after_change(int rank, double t);
  double collective_time(CollectiveKind op, const GroupShape& shape, int64_t bytes);

  void on_ready(int rank, int node, double t);
  void issue_collective(int rank, int node, double t);
  void issue_p2p(int rank, int node, double t);
  // All members have issued: starts the instance now, or after the
  // straggler wait (host_sync_skew).
  void members_ready(int index, double t);
  void start_instance(int index, double t);
  void finish_instance(int index, double t);
  void finish_compute(int rank, int node, uint32_t gen, double t);
  void complete(int rank, int node, double t);
  [[noreturn]] void report_deadlock();
  std::string describe_instance(const Instance& inst) const;

  const Trace& trace_;
  const SimulationOptions& options_;
  std::vector<EntryPlan> plans_;
  std::vector<GroupInfo> groups_;
  std::map<std::pair<std::string, std::vector<int>>, int> group_ids_;
  std::vector<std::vector<int>> partition_groups_;  // partition index -> rank -> group id
  std::vector<std::string> partition_names_;
  std::vector<RankState> ranks_;
  std::vector<std::vector<SimEvent>> events_;
  std::vector<Instance> instances_;
  std::unordered_map<uint64_t, int> pending_collectives_;  // (group, seq) -> instance
  std::unordered_map<P2PKey, P2PQueues, P2PKeyHash> p2p_;
  std::priority_queue<Event, std::vector<Event>, std::greater<Event>> heap_;
  uint64_t event_seq_ = 0;
  std::unordered_map<std::string, double> rate_cache_;
  std::unordered_map<std::string, double> time_cache_;
  // Host sharing (Topology::host_compute_slowdown non-empty): the computing
  // ranks of each node, communicating ones counting their load.
  bool host_sharing_ = false;
  int devices_per_node_ = 1;
  std::vector<double> host_computing_;
};

int Simulator::intern_group(const std::string& partition, const std::vector<int>& members) {
  auto key = std::make_pair(partition, members);
  auto it = group_ids_.find(key);
  if (it != group_ids_.end()) return it->second;
  GroupInfo info;
  info.members = members;
  info.partition = partition;
  info.shape = options_.collectives->shape_of(members);
  groups_.push_back(std::move(info));
  const int id = static_cast<int>(groups_.size()) - 1;
  group_ids_.emplace(std::move(key), id);
  return id;
}

void Simulator::plan() {
  const int world = trace_.metadata.world_size;
  std::map<std::string, int> partition_index;
  for (const auto& [name, parts] : trace_.metadata.groups) {
    std::vector<int> by_rank(static_cast<size_t>(world), -1);
    for (const std::vector<int>& members : parts) {
      const int id = intern_group(name, members);
      for (int r : members) by_rank[r] = id;
    }
    partition_index[name] = static_cast<int>(partition_groups_.size());
    partition_groups_.push_back(std::move(by_rank));
    partition_names_.push_back(name);
  }
  for (const RankTrace& rt : trace_.entries) {
    EntryPlan p;
    const size_t n = rt.nodes.size();
    std::unordered_map<int64_t, int> index_of;
    index_of.reserve(n * 2);
    for (size_t i = 0; i < n; ++i) index_of[rt.nodes[i].id] = static_cast<int>(i);
    std::vector<std::vector<int>> succs(n);
    p.indegree.assign(n, 0);
    p.stream_of.assign(n, 0);
    p.explicit_group.assign(n, -1);
    p.partition.assign(n, -1);
    p.after_comm.assign(n, 0);
    std::map<std::string, int> stream_ids;
    std::vector<int> last_on_stream;
    for (size_t i = 0; i < n; ++i) {
      const TraceNode& node = rt.nodes[i];
      auto [it, inserted] = stream_ids.emplace(node.stream, static_cast<int>(p.streams.size()));
      if (inserted) {
        p.streams.push_back(node.stream);
        last_on_stream.push_back(-1);
      }
      const int s = it->second;
      p.stream_of[i] = s;
      if (last_on_stream[s] >= 0) {
        succs[last_on_stream[s]].push_back(static_cast<int>(i));
        ++p.indegree[i];
      }
      last_on_stream[s] = static_cast<int>(i);
      for (int64_t dep : node.deps) {
        const int d = index_of.at(dep);
        succs[d].push_back(static_cast<int>(i));
        ++p.indegree[i];
        if (!node.is_communication() && rt.nodes[d].is_communication()) p.after_comm[i] = 1;
      }
      if (node.kind == NodeKind::kCollective) {
        if (node.group.partition.empty()) {
          p.explicit_group[i] = intern_group("", node.group.members);
        } else {
          p.partition[i] = partition_index.at(node.group.partition);
        }
      }
    }
    p.succ_begin.assign(n + 1, 0);
    for (size_t i = 0; i < n; ++i) {
      p.succ_begin[i + 1] = p.succ_begin[i] + static_cast<int>(succs[i].size());
    }
    p.succ.reserve(static_cast<size_t>(p.succ_begin[n]));
    for (size_t i = 0; i < n; ++i) p.succ.insert(p.succ.end(), succs[i].begin(), succs[i].end());
    plans_.push_back(std::move(p));
  }
}

int Simulator::group_of(int rank, int node) const {
  const EntryPlan& p = plans_[ranks_[rank].entry];
  if (p.explicit_group[node] >= 0) return p.explicit_group[node];
  return partition_groups_[p.partition[node]][rank];
}

// Adds the time since the rank's last change to the category of the state
// it was in (see the breakdown definitions in timeline.h).
void Simulator::account(RankState& rs, double t) {
  const double dt = t - rs.last_change;
  if (dt > 0) {
    if (!rs.compute.empty()) {
      rs.t_compute += dt;
      rs.since_sync += dt;
      if (!rs.comms.empty()) rs.t_overlapped += dt;
    } else if (!rs.comms.empty()) {
      rs.t_exposed += dt;
    } else if (rs.waiting > 0) {
      rs.t_wait += dt;
    } else {
      rs.t_idle += dt;
    }
  }
  rs.last_change = t;
}

double Simulator::rate_for(int rank, int node, const RankState& rs) {
  const double overlap = overlap_rate(node_at(rank, node), rs);
  if (!host_sharing_) return overlap;
  const Topology& topo = options_.collectives->cluster().topology;
  const bool lockstep = plans_[rs.entry].after_comm[static_cast<size_t>(node)] != 0;
  return overlap * topo.host_slowdown(host_computing_[rank / devices_per_node_], lockstep);
}

double Simulator::overlap_rate(const TraceNode& node, const RankState& rs) {
  if (options_.overlap == nullptr || rs.comms.empty()) return 1.0;
  OverlapFeatures f;
  f.compute_kind = node.compute_kind.empty() ? "other" : node.compute_kind;
  f.compute_flops = node.flops;
  f.compute_duration_us = node.duration.count();
  f.concurrent_comms = static_cast<int>(rs.comms.size());
  f.comm_threads = options_.comm_threads;
  f.overlap_fraction = 1.0;
  const ActiveComm* largest = &rs.comms[0];
  double bytes = 0;
  for (const ActiveComm& c : rs.comms) {
    bytes += static_cast<double>(c.bytes);
    if (c.bytes > largest->bytes) largest = &c;
  }
  f.comm_bytes = bytes;
  f.comm_kind = largest->op;
  f.comm_ranks = largest->ranks;
  // Identical kernels under identical communication recur across layers and
  // ranks: cache on the exact feature values.
  std::string key = f.compute_kind;
  key.push_back('\0');
  const double nums[] = {f.compute_flops,
                         f.compute_duration_us,
                         f.comm_bytes,
                         static_cast<double>(f.comm_kind),
                         static_cast<double>(f.comm_ranks),
                         static_cast<double>(f.concurrent_comms)};
  key.append(reinterpret_cast<const char*>(nums), sizeof(nums));
  auto it = rate_cache_.find(key);
  if (it != rate_cache_.end()) return it->second;
  const double rate = std::max(1.0, options_.overlap->predict(f));
  rate_cache_.emplace(std::move(key), rate);
  return rate;
}

// Re-times the running compute nodes of a rank after its set of running
// communication ops changed at time t.
void Simulator::retime(int rank, double t) {
  if (options_.overlap == nullptr && !host_sharing_) return;
  RankState& rs = ranks_[rank];
  for (RunningCompute& c : rs.compute) {
    const double new_rate = rate_for(rank, c.node, rs);
    if (new_rate == c.rate) continue;
    c.remaining = std::max(0.0, c.remaining - (t - c.last) / c.rate);
    c.last = t;
    c.rate = new_rate;
    ++c.gen;
    push(t + c.remaining * c.rate, kComputeDone, rank, c.node, c.gen);
  }
}

void Simulator::retime_host(int host, double t) {
  const int first = host * devices_per_node_;
  const int last = std::min(static_cast<int>(ranks_.size()), first + devices_per_node_);
  for (int r = first; r < last; ++r) {
    if (!ranks_[r].compute.empty()) retime(r, t);
  }
}

bool Simulator::update_host_share(int rank) {
  if (!host_sharing_) return false;
  RankState& rs = ranks_[rank];
  double share = 0;
  if (!rs.compute.empty()) {
    share = 1;
  } else if (!rs.comms.empty()) {
    int64_t bytes = 0;
    for (const ActiveComm& c : rs.comms) bytes = std::max(bytes, c.bytes);
    share = options_.collectives->cluster().topology.comm_load(bytes);
  }
  if (share == rs.host_share) return false;
  rs.host_share = share;
  // Summed afresh rather than adjusted, so fractional loads leave no
  // rounding residue behind.
  const int host = rank / devices_per_node_;
  const int first = host * devices_per_node_;
  const int last = std::min(static_cast<int>(ranks_.size()), first + devices_per_node_);
  double total = 0;
  for (int r = first; r < last; ++r) total += ranks_[r].host_share;
  host_computing_[host] = total;
  return true;
}

void Simulator::after_change(int rank, double t) {
  if (update_host_share(rank)) {
    retime_host(rank / devices_per_node_, t);
  } else {
    retime(rank, t);
  }
}

double Simulator::collective_time(CollectiveKind op, const GroupShape& shape, int64_t bytes) {
  std::string key(sizeof(int) * 4 + sizeof(int64_t), '\0');
  const int ints[] = {static_cast<int>(op), shape.ranks, shape.nodes, shape.max_ranks_per_node};
  std::memcpy(key.data(), ints, sizeof(ints));
  std::memcpy(key.data() + sizeof(ints), &bytes, sizeof(bytes));
  auto it = time_cache_.find(key);
  if (it != time_cache_.end()) return it->second;
  const double us = options_.collectives->estimate(op, shape, bytes).time.count();
  time_cache_.emplace(std::move(key), us);
  return us;
}

void Simulator::on_ready(int rank, int node, double t) {
  RankState& rs = ranks_[rank];
  if (!events_.empty()) events_[rank][node].ready = Microseconds(t);
  const TraceNode& n = node_at(rank, node);
  switch (n.kind) {
    case NodeKind::kCompute: {
      account(rs, t);
      rs.compute.push_back(RunningCompute{node, n.duration.count(), 1.0, t, 0, t});
      const bool share_changed = update_host_share(rank);
      RunningCompute& c = rs.compute.back();
      c.rate = rate_for(rank, node, rs);
      if (!events_.empty()) events_[rank][node].start = Microseconds(t);
      push(t + c.remaining * c.rate, kComputeDone, rank, node, 0);
      // The other computing ranks of the node slow down.
      if (share_changed) retime_host(rank / devices_per_node_, t);
      break;
    }
    case NodeKind::kCollective:
      issue_collective(rank, node, t);
      break;
    case NodeKind::kSend:
    case NodeKind::kRecv:
      issue_p2p(rank, node, t);
      break;
  }
}

void Simulator::issue_collective(int rank, int node, double t) {
  RankState& rs = ranks_[rank];
  account(rs, t);
  ++rs.waiting;
  const TraceNode& n = node_at(rank, node);
  const int group = group_of(rank, node);
  const int64_t seq = rs.group_seq[group]++;
  const uint64_t key = (static_cast<uint64_t>(group) << 32) | static_cast<uint64_t>(seq);
  auto [it, created] = pending_collectives_.emplace(key, static_cast<int>(instances_.size()));
  if (created) {
    Instance inst;
    inst.group = group;
    inst.seq = seq;
    inst.op = n.op;
    inst.bytes = n.bytes;
    inst.root_index = n.root_index;
    inst.expected = static_cast<int>(groups_[group].members.size());
    inst.shape = groups_[group].shape;
    inst.members.reserve(static_cast<size_t>(inst.expected));
    instances_.push_back(std::move(inst));
  }
  Instance& inst = instances_[it->second];
  if (!created && (inst.op != n.op || inst.bytes != n.bytes || inst.root_index != n.root_index)) {
    const auto [first_rank, first_node] = inst.members.front();
    const TraceNode& f = node_at(first_rank, first_node);
    TESSERA_THROW(
        InvalidArgument, trace_.source, ": ranks ", first_rank, " and ", rank,
        " disagree on call #", seq, " of group ", detail::format_ranks(groups_[group].members),
        ": rank ", first_rank, " issued ", collective_kind_name(f.op), " '", f.name, "' (", f.bytes,
        " bytes", f.root_index >= 0 ? ", root_index " + std::to_string(f.root_index) : "",
        "), rank ", rank, " issued ", collective_kind_name(n.op), " '", n.name, "' (", n.bytes,
        " bytes", n.root_index >= 0 ? ", root_index " + std::to_string(n.root_index) : "", ")");
  }
  inst.members.emplace_back(rank, node);
  if (static_cast<int>(inst.members.size()) == inst.expected) {
    const int index = it->second;
    pending_collectives_.erase(it);
    members_ready(index, t);
  }
}

void Simulator::issue_p2p(int rank, int node, double t) {
  RankState& rs = ranks_[rank];
  account(rs, t);
  ++rs.waiting;
  const TraceNode& n = node_at(rank, node);
  const int peer = n.peer_of(rank);
  const bool send = n.kind == NodeKind::kSend;
  P2PQueues& q = p2p_[P2PKey{send ? rank : peer, send ? peer : rank, n.tag}];
  auto& mine = send ? q.sends : q.recvs;
  auto& theirs = send ? q.recvs : q.sends;
  if (theirs.empty()) {
    mine.push_back(PendingP2P{rank, node});
    return;
  }
  const auto [other_rank, other_node] = theirs.front();
  theirs.pop_front();
  const TraceNode& o = node_at(other_rank, other_node);
  if (o.bytes != n.bytes) {
    TESSERA_THROW(InvalidArgument, trace_.source, ": p2p pair disagrees on size: rank ", rank, " ",
                  node_kind_name(n.kind), " '", n.name, "' has ", n.bytes, " bytes, rank ",
                  other_rank, " ", node_kind_name(o.kind), " '", o.name, "' has ", o.bytes,
                  " bytes (tag ", n.tag, ")");
  }
  Instance inst;
  inst.p2p = true;
  inst.op = CollectiveKind::kSendRecv;
  inst.bytes = n.bytes;
  inst.expected = 2;
  inst.members = {{other_rank, other_node}, {rank, node}};
  inst.shape = options_.collectives->shape_of({rank, other_rank});
  instances_.push_back(std::move(inst));
  members_ready(static_cast<int>(instances_.size()) - 1, t);
}

void Simulator::members_ready(int index, double t) {
  const Instance& inst = instances_[index];
  const Topology& topo = options_.collectives->cluster().topology;
  const double share = topo.sync_skew(inst.expected);
  const double fixed = topo.sync_fixed_us(inst.expected);
  double computed = 0;
  if (share > 0 || fixed > 0) {
    for (const auto& [rank, node] : inst.members) {
      RankState& rs = ranks_[rank];
      account(rs, t);
      computed = std::max(computed, rs.since_sync);
    }
  }
  // Members that computed nothing since their previous op left it together:
  // no straggler, no fixed wait either. Members that arrived apart (ranks
  // traced separately: expert-parallel ranks, pipeline stages) wait the whole
  // of it after the last one too: the host's scheduling noise delays the
  // last member as much as any (measured with moe-s ep4, docs/sim.md: a
  // segment whose ranks compute different amounts ends its members further
  // apart than one of identical work by the traced difference plus about the
  // identical segment's spread).
  const double wait = computed > 0 ? fixed + share * computed : 0.0;
  if (wait > 0) {
    push(t + wait, kSyncDone, index, 0, 0);
  } else {
    start_instance(index, t);
  }
}

void Simulator::start_instance(int index, double t) {
  Instance& inst = instances_[index];
  inst.started = true;
  const double duration = collective_time(inst.op, inst.shape, inst.bytes);
  for (const auto& [rank, node] : inst.members) {
    RankState& rs = ranks_[rank];
    account(rs, t);
    --rs.waiting;
    rs.since_sync = 0;
    rs.comms.push_back(ActiveComm{index, inst.op, inst.bytes, inst.shape.ranks});
    if (!events_.empty()) events_[rank][node].start = Microseconds(t);
    after_change(rank, t);
  }
  push(t + duration, kCommDone, index, 0, 0);
}

void Simulator::finish_instance(int index, double t) {
  // Copy: complete() may start new instances and grow instances_.
  const std::vector<std::pair<int, int>> members = instances_[index].members;
  for (const auto& [rank, node] : members) {
    RankState& rs = ranks_[rank];
    account(rs, t);
    auto it = std::find_if(rs.comms.begin(), rs.comms.end(),
                           [&](const ActiveComm& c) { return c.instance == index; });
    rs.comms.erase(it);
    if (!events_.empty()) events_[rank][node].end = Microseconds(t);
    after_change(rank, t);
  }
  for (const auto& [rank, node] : members) complete(rank, node, t);
}

void Simulator::finish_compute(int rank, int node, uint32_t gen, double t) {
  RankState& rs = ranks_[rank];
  auto it = std::find_if(rs.compute.begin(), rs.compute.end(),
                         [&](const RunningCompute& c) { return c.node == node; });
  if (it == rs.compute.end() || it->gen != gen) return;  // re-timed since
  account(rs, t);
  const double start = it->start;
  rs.compute.erase(it);
  const double measured = node_at(rank, node).duration.count();
  rs.slowdown_extra += std::max(0.0, (t - start) - measured);
  if (update_host_share(rank)) retime_host(rank / devices_per_node_, t);
  if (!events_.empty()) {
    SimEvent& e = events_[rank][node];
    e.end = Microseconds(t);
    e.slowdown = measured > 0 ? (t - start) / measured : 1.0;
  }
  complete(rank, node, t);
}

void Simulator::complete(int rank, int node, double t) {
  RankState& rs = ranks_[rank];
  ++rs.done;
  rs.finish = std::max(rs.finish, t);
  const EntryPlan& p = plans_[rs.entry];
  for (int k = p.succ_begin[node]; k < p.succ_begin[node + 1]; ++k) {
    const int s = p.succ[k];
    if (--rs.indegree[s] == 0) on_ready(rank, s, t);
  }
}

std::string Simulator::describe_instance(const Instance& inst) const {
  const auto [rank, node] = inst.members.front();
  const TraceNode& n = node_at(rank, node);
  return std::string(collective_kind_name(inst.op)) + " '" + n.name + "' (call #" +
         std::to_string(inst.seq) + " on group " +
         detail::format_ranks(groups_[inst.group].members) +
         (groups_[inst.group].partition.empty() ? ""
                                                : " of '" + groups_[inst.group].partition + "'") +
         ")";
}

void Simulator::report_deadlock() {
  std::vector<int> stuck;
  for (size_t r = 0; r < ranks_.size(); ++r) {
    if (ranks_[r].done < trace_.entries[ranks_[r].entry].nodes.size()) {
      stuck.push_back(static_cast<int>(r));
    }
  }
  // What each stuck rank waits in: an issued collective or p2p op.
  std::map<int, std::string> waiting_in;
  std::vector<const Instance*> pending;
  for (const auto& [key, index] : pending_collectives_) pending.push_back(&instances_[index]);
  std::sort(pending.begin(), pending.end(), [](const Instance* a, const Instance* b) {
    return a->group != b->group ? a->group < b->group : a->seq < b->seq;
  });
  for (const Instance* inst : pending) {
    for (const auto& [rank, node] : inst->members) {
      waiting_in.emplace(rank, "waits in " + describe_instance(*inst));
    }
  }
  std::vector<std::string> p2p_lines;
  for (const auto& [key, q] : p2p_) {
    for (const auto& [rank, node] : q.sends) {
      const TraceNode& n = node_at(rank, node);
      p2p_lines.push_back("p2p_send '" + n.name + "' from rank " + std::to_string(key.src) +
                          " to rank " + std::to_string(key.dst) + " (tag " +
                          std::to_string(key.tag) + ") has no matching p2p_recv");
      waiting_in.emplace(rank,
                         "waits in p2p_send '" + n.name + "' to rank " + std::to_string(key.dst));
    }
    for (const auto& [rank, node] : q.recvs) {
      const TraceNode& n = node_at(rank, node);
      p2p_lines.push_back("p2p_recv '" + n.name + "' at rank " + std::to_string(key.dst) +
                          " from rank " + std::to_string(key.src) + " (tag " +
                          std::to_string(key.tag) + ") has no matching p2p_send");
      waiting_in.emplace(rank,
                         "waits in p2p_recv '" + n.name + "' from rank " + std::to_string(key.src));
    }
  }
  std::sort(p2p_lines.begin(), p2p_lines.end());
  auto status = [&](int rank) -> std::string {
    auto it = waiting_in.find(rank);
    if (it != waiting_in.end()) return "rank " + std::to_string(rank) + " " + it->second;
    const RankState& rs = ranks_[rank];
    const auto& nodes = trace_.entries[rs.entry].nodes;
    if (rs.done == nodes.size()) return "rank " + std::to_string(rank) + " finished all its nodes";
    for (size_t i = 0; i < nodes.size(); ++i) {
      if (rs.indegree[i] > 0) {
        return "rank " + std::to_string(rank) + " is blocked before node " + std::to_string(i) +
               " '" + nodes[i].name + "'";
      }
    }
    return "rank " + std::to_string(rank) + " is blocked";
  };

  std::string msg = trace_.source + ": deadlock: " + std::to_string(stuck.size()) +
                    " rank(s) cannot finish " + detail::format_ranks(stuck) + ".";
  constexpr size_t kMaxListed = 5;
  size_t listed = 0;
  for (const Instance* inst : pending) {
    if (listed == kMaxListed) break;
    ++listed;
    std::vector<int> issued, missing;
    for (const auto& [rank, node] : inst->members) issued.push_back(rank);
    std::sort(issued.begin(), issued.end());
    for (int r : groups_[inst->group].members) {
      if (!std::binary_search(issued.begin(), issued.end(), r)) missing.push_back(r);
    }
    msg += " Collective " + describe_instance(*inst) + " was issued by rank(s) " +
           detail::format_ranks(issued) + " but never by rank(s) " + detail::format_ranks(missing) +
           " (";
    for (size_t k = 0; k < missing.size() && k < 3; ++k)
      msg += (k ? "; " : "") + status(missing[k]);
    if (missing.size() > 3) msg += "; ...";
    msg += ").";
  }
  for (const std::string& line : p2p_lines) {
    if (listed == kMaxListed) break;
    ++listed;
    msg += " " + line + ".";
  }
  const size_t total = pending.size() + p2p_lines.size();
  if (total > listed)
    msg += " And " + std::to_string(total - listed) + " more pending operation(s).";
  if (total == 0) {
    msg += " ";
    for (size_t k = 0; k < stuck.size() && k < 3; ++k) msg += (k ? "; " : "") + status(stuck[k]);
    msg += ".";
  }
  TESSERA_THROW(InvalidArgument, msg);
}

SimulationResult Simulator::run() {
  const auto wall_start = std::chrono::steady_clock::now();
  TESSERA_CHECK(options_.collectives != nullptr, InvalidArgument,
                "simulate: SimulationOptions::collectives is required");
  const Topology& topo = options_.collectives->cluster().topology;
  const int world = trace_.metadata.world_size;
  if (topo.num_nodes > 0) {
    const int64_t capacity = int64_t{topo.num_nodes} * topo.devices_per_node;
    TESSERA_CHECK(world <= capacity, InvalidArgument, trace_.source, ": the trace has ", world,
                  " ranks, but cluster '", options_.collectives->cluster().name, "' has ",
                  topo.num_nodes, " nodes x ", topo.devices_per_node, " devices = ", capacity);
  }
  plan();
  ranks_.resize(static_cast<size_t>(world));
  host_sharing_ = !topo.host_compute_slowdown.empty();
  devices_per_node_ = topo.devices_per_node;
  host_computing_.assign(static_cast<size_t>((world + devices_per_node_ - 1) / devices_per_node_),
                         0.0);
  size_t total_nodes = 0;
  for (int r = 0; r < world; ++r) {
    RankState& rs = ranks_[r];
    rs.entry = trace_.entry_of(r);
    rs.indegree.assign(plans_[rs.entry].indegree.begin(), plans_[rs.entry].indegree.end());
    total_nodes += rs.indegree.size();
  }
  if (options_.record_events) {
    events_.resize(static_cast<size_t>(world));
    for (int r = 0; r < world; ++r) events_[r].resize(ranks_[r].indegree.size());
  }
  for (int r = 0; r < world; ++r) {
    const size_t n = ranks_[r].indegree.size();
    for (size_t i = 0; i < n; ++i) {
      if (plans_[ranks_[r].entry].indegree[i] == 0) on_ready(r, static_cast<int>(i), 0.0);
    }
  }
  while (!heap_.empty()) {
    const Event e = heap_.top();
    heap_.pop();
    if (e.type == kComputeDone) {
      finish_compute(e.a, e.b, e.gen, e.t);
    } else if (e.type == kSyncDone) {
      start_instance(e.a, e.t);
    } else {
      finish_instance(e.a, e.t);
    }
  }
  for (const RankState& rs : ranks_) {
    if (rs.done < rs.indegree.size()) report_deadlock();
  }

  SimulationResult result;
  double step = 0;
  for (int r = 0; r < world; ++r) {
    if (ranks_[r].finish > step) {
      step = ranks_[r].finish;
      result.slowest_rank = r;
    }
  }
  result.step_time = Microseconds(step);
  result.ranks.resize(static_cast<size_t>(world));
  const int64_t capacity = trace_.metadata.memory_capacity_bytes;
  for (int r = 0; r < world; ++r) {
    RankState& rs = ranks_[r];
    account(rs, step);
    RankBreakdown& b = result.ranks[r];
    b.rank = r;
    b.finish = Microseconds(rs.finish);
    b.compute = Microseconds(rs.t_compute);
    b.exposed_comm = Microseconds(rs.t_exposed);
    b.sync_wait = Microseconds(rs.t_wait);
    b.idle = Microseconds(rs.t_idle);
    b.overlapped_comm = Microseconds(rs.t_overlapped);
    b.slowdown_extra = Microseconds(rs.slowdown_extra);
    b.peak_memory_bytes = trace_.entries[rs.entry].peak_memory_bytes;
    if (capacity > 0 && b.peak_memory_bytes > capacity) result.out_of_memory_ranks.push_back(r);
  }
  result.events = std::move(events_);
  result.simulated_nodes = total_nodes;
  result.collective_calls = instances_.size();
  result.wall_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - wall_start).count();
  TESSERA_LOG(Debug, "sim") << trace_.source << ": " << world << " ranks, " << total_nodes
                            << " nodes, " << instances_.size() << " communication calls: step "
                            << step << " us, simulated in " << result.wall_seconds << " s";
  return result;
}

}  // namespace

SimulationResult simulate(const Trace& trace, const SimulationOptions& options) {
  const int steps = trace.measured_steps();
  if (!options.replay_steps || steps < 2) {
    Simulator sim(trace, options);
    return sim.run();
  }
  const auto wall_start = std::chrono::steady_clock::now();
  std::vector<SimulationResult> results;
  results.reserve(static_cast<size_t>(steps));
  for (int k = 0; k < steps; ++k) {
    const Trace one = trace.step(k);
    Simulator sim(one, options);
    results.push_back(sim.run());
  }
  std::vector<int> order(static_cast<size_t>(steps));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
    return results[static_cast<size_t>(a)].step_time < results[static_cast<size_t>(b)].step_time;
  });
  std::vector<Microseconds> times;
  for (const SimulationResult& r : results) times.push_back(r.step_time);
  const int chosen = order[static_cast<size_t>((steps - 1) / 2)];
  SimulationResult out = std::move(results[static_cast<size_t>(chosen)]);
  out.replayed_step_times = std::move(times);
  out.replayed_step = chosen;
  out.wall_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - wall_start).count();
  return out;
}

std::string chrome_trace_json(const Trace& trace, const SimulationResult& result,
                              const ChromeTraceOptions& options) {
  using nlohmann::json;
  const int world = trace.metadata.world_size;
  TESSERA_CHECK(static_cast<int>(result.events.size()) == world, InvalidArgument,
                "chrome_trace_json: the result has no events (simulate with record_events)");
  std::vector<int> ranks = options.ranks;
  if (ranks.empty()) {
    for (int r = 0; r < world; ++r) ranks.push_back(r);
  }
  json events = json::array();
  for (int rank : ranks) {
    TESSERA_CHECK(rank >= 0 && rank < world, InvalidArgument, "chrome_trace_json: rank ", rank,
                  " is outside [0, ", world, ")");
    const RankTrace& rt = trace.entries[trace.entry_of(rank)];
    std::map<std::string, int> tids;
    for (const TraceNode& n : rt.nodes) tids.emplace(n.stream, 0);
    int next = 0;
    for (auto& [name, tid] : tids) tid = next++;
    events.push_back({{"ph", "M"},
                      {"name", "process_name"},
                      {"pid", rank},
                      {"args", {{"name", "rank " + std::to_string(rank)}}}});
    events.push_back({{"ph", "M"},
                      {"name", "process_sort_index"},
                      {"pid", rank},
                      {"args", {{"sort_index", rank}}}});
    for (const auto& [name, tid] : tids) {
      events.push_back({{"ph", "M"},
                        {"name", "thread_name"},
                        {"pid", rank},
                        {"tid", tid},
                        {"args", {{"name", name}}}});
    }
    for (size_t i = 0; i < rt.nodes.size(); ++i) {
      const TraceNode& n = rt.nodes[i];
      const SimEvent& e = result.events[rank][i];
      const int tid = tids.at(n.stream);
      json args = {{"kind", node_kind_name(n.kind)}, {"id", n.id}};
      if (n.kind == NodeKind::kCompute) {
        // A replayed step's own duration (see simulate()).
        const bool replayed = result.replayed_step >= 0 &&
                              static_cast<size_t>(result.replayed_step) < n.step_durations.size();
        args["measured_us"] =
            replayed ? n.step_durations[static_cast<size_t>(result.replayed_step)].count()
                     : n.duration.count();
        args["slowdown"] = e.slowdown;
      } else {
        args["op"] = collective_kind_name(n.op);
        args["bytes"] = n.bytes;
        if (n.kind != NodeKind::kCollective) args["peer"] = n.peer_of(rank);
      }
      if (!n.call_site.empty()) args["call_site"] = n.call_site;
      if (options.include_waits && n.is_communication() && e.start > e.ready) {
        events.push_back({{"ph", "X"},
                          {"name", "wait: " + n.name},
                          {"cat", "sync_wait"},
                          {"pid", rank},
                          {"tid", tid},
                          {"ts", e.ready.count()},
                          {"dur", (e.start - e.ready).count()}});
      }
      events.push_back({{"ph", "X"},
                        {"name", n.name},
                        {"cat", node_kind_name(n.kind)},
                        {"pid", rank},
                        {"tid", tid},
                        {"ts", e.start.count()},
                        {"dur", (e.end - e.start).count()},
                        {"args", std::move(args)}});
    }
  }
  json root = {{"traceEvents", std::move(events)}, {"displayTimeUnit", "ms"}};
  return root.dump();
}

std::string format_breakdown(const SimulationResult& result, size_t max_ranks) {
  std::string out = detail::format("step time %.3f us (slowest rank %d)\n",
                                   result.step_time.count(), result.slowest_rank);
  if (!result.replayed_step_times.empty()) {
    out += detail::format("replayed %zu measured steps (us):", result.replayed_step_times.size());
    for (Microseconds t : result.replayed_step_times) out += detail::format(" %.0f", t.count());
    out += detail::format("; shown: step %d, the median\n", result.replayed_step);
  }
  out += detail::format("%6s %12s %12s %12s %12s %12s %12s\n", "rank", "finish", "compute",
                        "exposed", "overlapped", "sync_wait", "idle");
  std::vector<const RankBreakdown*> order;
  for (const RankBreakdown& b : result.ranks) order.push_back(&b);
  std::stable_sort(order.begin(), order.end(), [](const RankBreakdown* a, const RankBreakdown* b) {
    return a->finish > b->finish;
  });
  if (order.size() > max_ranks) order.resize(max_ranks);
  std::sort(order.begin(), order.end(),
            [](const RankBreakdown* a, const RankBreakdown* b) { return a->rank < b->rank; });
  for (const RankBreakdown* b : order) {
    out += detail::format("%6d %12.3f %12.3f %12.3f %12.3f %12.3f %12.3f\n", b->rank,
                          b->finish.count(), b->compute.count(), b->exposed_comm.count(),
                          b->overlapped_comm.count(), b->sync_wait.count(), b->idle.count());
  }
  return out;
}

}  // namespace tessera::sim
