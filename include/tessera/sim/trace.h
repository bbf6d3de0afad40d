// tessera/sim/trace.h — the per-rank execution trace the simulator replays.
//
// A Trace is what a tracer records for one training step: for every rank the
// ordered list of operations it issued (compute kernels with their measured
// durations, collectives and point-to-point transfers as placeholders with
// their group and size), the streams they ran on and the dependencies between
// them. It is stored as JSON (Chakra-like in spirit, but smaller):
//
//   {
//     "schema": "tessera.sim.trace/1",
//     "metadata": {
//       "world_size": 4,
//       "layout": {"dp": 2, "tp": 2},          // mesh axis sizes (optional)
//       "model": "llama-1b",                   // free text (optional)
//       "memory_capacity_bytes": 42949672960,  // device memory (optional, 0 = unknown)
//       "groups": {"tp": [[0, 1], [2, 3]], "dp": [[0, 2], [1, 3]]}   // optional
//     },
//     "ranks": [
//       {"ranks": [0, 1, 2, 3],                // the ranks this entry stands for
//        "peak_memory_bytes": 1073741824,      // optional
//        "nodes": [
//          {"id": 0, "kind": "compute", "name": "layer0.fwd", "duration_us": 120.5,
//           "compute_kind": "gemm", "flops": 2.1e9, "call_site": "model.cpp:88"},
//          {"id": 1, "kind": "collective", "name": "tp.ar", "op": "all_reduce",
//           "group": "tp", "bytes": 4194304, "dtype": "bf16", "deps": [0]},
//          {"id": 2, "kind": "p2p_send", "name": "act", "peer_offset": 2, "bytes": 65536},
//          ...]}]
//   }
//
// Node fields (unknown keys are errors):
//   id            integer, unique within the entry; deps refer to it.
//   kind          "compute" | "collective" | "p2p_send" | "p2p_recv".
//   name          non-empty text (shown in timelines and errors).
//   stream        stream name; default "compute" for compute nodes, "comm"
//                 otherwise. Each stream of a rank runs its nodes one at a
//                 time, in list order.
//   deps          ids of nodes of the same rank that must finish first.
//   call_site     free text (optional).
//   compute:      duration_us (>= 0, measured alone), compute_kind (category
//                 for the overlap model, default "other"), flops (>= 0, 0 =
//                 unknown), step_durations_us (optional: the duration in
//                 each measured step when duration_us is their median; either
//                 no compute node of the trace has it or all have the same
//                 number of entries, see Trace::measured_steps).
//   collective:   op ("all_reduce", "all_gather", "reduce_scatter",
//                 "all_to_all", "broadcast"), group (a list of global ranks,
//                 or the name of a partition in metadata.groups: the member of
//                 that partition containing the rank), bytes (>= 0, nccl-tests
//                 convention, see types.h), dtype (optional text),
//                 root_index (broadcast only, required: the root's position
//                 in the group's sorted members, 0 = lowest rank; a position
//                 rather than a global rank so that identical ranks in
//                 different groups can share one entry).
//   p2p_send/recv: peer (global rank) or peer_offset (peer = rank + offset),
//                 bytes (>= 0), tag (>= 0, default 0). The k-th send from a to
//                 b with tag t pairs with the k-th recv at b from a with tag t.
//
// Ranks that behave identically are given once: an entry's "ranks" lists all
// the ranks it stands for, which is why groups may be named partitions and
// peers may be relative. Every rank of [0, world_size) must be covered by
// exactly one entry.
//
// Trace::parse validates everything that can be checked per rank: unknown
// kinds, fields and keys, negative sizes, dangling or duplicate ids,
// dependency cycles (through deps and stream order together), groups that do
// not contain the rank, peers out of range. Errors are InvalidArgument naming
// the source, the entry (with its ranks), the node index and id, and the
// field. Cross-rank consistency (every member issues each collective, p2p
// pairs match) is checked when the timeline is composed (timeline.h).
//
//   tessera::sim::Trace trace = tessera::sim::Trace::load_file("step.trace.json");
//   std::cout << trace.metadata.world_size << " ranks, "
//             << trace.entries.size() << " distinct rank programs\n";
//
// Trace is a plain value: thread-compatible (const methods may be called
// concurrently).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "tessera/sim/types.h"

namespace tessera::sim {

enum class NodeKind { kCompute, kCollective, kSend, kRecv };

// "compute", "collective", "p2p_send", "p2p_recv".
const char* node_kind_name(NodeKind kind);

// The group a collective runs over: either an explicit list of global ranks
// (`members`, sorted, no duplicates) or the name of a partition in
// TraceMetadata::groups (`partition`). Exactly one of the two is set.
struct GroupRef {
  std::string partition;
  std::vector<int> members;
};

struct TraceNode {
  int64_t id = 0;
  NodeKind kind = NodeKind::kCompute;
  std::string name;
  std::string stream;         // never empty after parsing
  std::vector<int64_t> deps;  // ids of nodes in the same entry
  std::string call_site;

  // kCompute only.
  Microseconds duration{0};  // measured alone, without concurrent communication
  // The duration in each measured step (empty: only `duration` is known).
  std::vector<Microseconds> step_durations;
  std::string compute_kind;  // "gemm", "attention", ...; "other" when not given
  double flops = 0;          // 0 = unknown

  // kCollective only.
  CollectiveKind op = CollectiveKind::kAllReduce;
  GroupRef group;
  int root_index = -1;  // broadcast: root's position in the sorted group; else -1

  // kCollective, kSend, kRecv.
  int64_t bytes = 0;
  std::string dtype;

  // kSend, kRecv: the peer is `peer` when peer_relative is false, otherwise
  // rank + peer_offset.
  bool peer_relative = false;
  int peer = -1;
  int peer_offset = 0;
  int64_t tag = 0;

  bool is_communication() const { return kind != NodeKind::kCompute; }
  // The peer of a p2p node as seen from `rank`.
  int peer_of(int rank) const { return peer_relative ? rank + peer_offset : peer; }
};

struct TraceMetadata {
  int world_size = 0;
  std::map<std::string, int> layout;  // mesh axis -> size; product = world_size
  std::string model;
  int64_t memory_capacity_bytes = 0;  // 0 = unknown
  // Named partitions of the ranks: each is a list of disjoint groups.
  std::map<std::string, std::vector<std::vector<int>>> groups;
};

// The program of one or more identical ranks.
struct RankTrace {
  std::vector<int> ranks;         // sorted, non-empty
  int64_t peak_memory_bytes = 0;  // 0 = unknown
  std::vector<TraceNode> nodes;   // in issue order
};

class Trace {
 public:
  TraceMetadata metadata;
  std::vector<RankTrace> entries;
  std::string source = "<trace>";  // names the trace in error messages

  // Parses and validates JSON text. InvalidArgument as described above.
  static Trace parse(std::string_view text, std::string source = "<trace>");
  // Reads a file; NotFound when it cannot be opened.
  static Trace load_file(const std::string& path);

  // Checks every rule listed at the top of this file; parse() calls it, and
  // programs that build traces in memory should too. Also builds the
  // rank -> entry index that entry_of() uses.
  void validate();

  // JSON text in the format above (parse(to_json()) gives an equal trace).
  std::string to_json() const;

  // How many measured steps the compute nodes' step_durations hold (0: none
  // has any). Valid after validate(), which checks that every compute node
  // of every entry has this many.
  int measured_steps() const { return measured_steps_; }

  // This trace with every compute node's duration replaced by its duration in
  // measured step `step` (and no step_durations): one real step, as it ran.
  // InvalidArgument for a step outside [0, measured_steps()).
  Trace step(int step) const;

  // Index into `entries` of the entry standing for `rank`. Valid after
  // validate(); InvalidArgument for a rank outside [0, world_size).
  int entry_of(int rank) const;

  // The members (sorted global ranks) of `group` as seen from `rank`.
  // InvalidArgument when the rank is not in the group.
  const std::vector<int>& resolve_group(const GroupRef& group, int rank) const;

 private:
  std::vector<int> entry_of_rank_;
  int measured_steps_ = 0;
  // partition name -> rank -> index of its group in metadata.groups (-1: none)
  std::map<std::string, std::vector<int>, std::less<>> partition_index_;
};

}  // namespace tessera::sim
