// tessera/sim/timeline.h — event-driven composition of every rank's trace
// into one simulated training step.
//
// Rules (all ranks start at time 0):
//   * Each stream of a rank runs its nodes one at a time, in trace order; a
//     node is *ready* when the previous node of its stream and every node in
//     its deps have finished.
//   * A compute node starts when ready and runs for its measured duration,
//     stretched while communication runs on the same rank: the overlap model
//     gives the rate factor s for the current set of running communication
//     ops (OverlapFeatures with overlap_fraction = 1), and the node's
//     remaining work is re-timed whenever that set changes. Without an
//     overlap model s = 1.
//   * On a cluster whose topology has host_compute_slowdown (CPU hosts whose
//     ranks share cores, cluster.h), a compute node is further stretched by
//     host_slowdown(k), k = the ranks of its node with a compute node
//     running, and re-timed whenever k changes: a rank waiting in a
//     collective frees its share of the cores. With host_comm_load, a rank
//     running a communication op and no compute counts comm_load(bytes) in
//     k (its largest running op's size; a fractional k interpolates). A compute node that depends
//     on a communication node (it starts when a wait ends, in step with the
//     op's other members) takes host_slowdown(k, lockstep = true), which is
//     host_lockstep_slowdown where the cluster gives it.
//   * A collective is *issued* when ready. The k-th collective a rank issues
//     on a group (same members, and same partition name when named) is the
//     same call as the k-th of every other member; it starts when the last
//     member issues it (synchronisation) and lasts the collective model's
//     time for the group's shape on the cluster, ending on all members
//     together. Members that disagree on op, bytes or root are an error.
//   * The k-th p2p_send from a to b with tag t pairs with the k-th p2p_recv
//     at b from a with tag t; the pair starts when both are issued and lasts
//     the model's send_recv time.
//   * With host_sync_skew (CPU hosts, cluster.h), a collective or p2p pair
//     of k ranks starts sync_skew(k) x (the longest time any member spent
//     computing since its previous communication op started) after the last
//     member issued it, plus host_sync_us's fixed part when that time is
//     above 0: the straggler among ranks that run the same compute at once,
//     which identical traced ranks do not show. Members that issued it
//     apart (ranks traced separately: expert-parallel ranks, MoE
//     data-parallel ranks, pipeline stages) wait it in full after the last
//     one as well: on a shared host the last member's own scheduling noise
//     adds to the traced difference. That wait counts as sync_wait.
//   * If some rank can never finish (a collective that some member never
//     issues, a send without its recv, a cross-rank cycle), simulate()
//     throws InvalidArgument starting "<trace>: deadlock:" that names the
//     pending operations, the ranks that issued them, the ranks that did not,
//     and where each of those is stuck.
//
// Measured steps: a trace whose compute nodes carry their duration in each
// measured step (Trace::measured_steps() >= 2; the tracer writes them) is
// composed once per measured step (Trace::step), and the result is that of
// the step with the median time (the lower middle one for an even count;
// replayed_step_times lists them all). Composing the per-node medians
// instead would give every rank its typical compute between two
// synchronisations, while a real step waits at each for the member that was
// slowest there: with MoE routing the load moves between expert ranks from
// layer to layer and from step to step, and the median of each rank's
// compute misses those waits. SimulationOptions::replay_steps = false
// composes the medians.
//
// Output: the step time (latest finish over ranks), per-rank breakdown,
// per-rank event lists (optional) and a Chrome trace ("traceEvents" JSON for
// chrome://tracing and Perfetto; pid = rank, tid = stream).
//
// The per-rank breakdown partitions [0, step_time] of each rank:
//   compute          some compute node running;
//   exposed_comm     communication running, no compute;
//   sync_wait        nothing running, a communication op issued and waiting
//                    for its peers;
//   idle             none of these (includes the time after the rank's last
//                    node until the step ends);
// and separately overlapped_comm (communication running while compute runs,
// part of compute) and slowdown_extra (sum over compute nodes of simulated
// minus measured duration).
//
// Scale: ranks that share a trace entry share its node list and the
// pre-computed dependency graph; per rank only counters and (optionally)
// event times are kept. 1,024 ranks × 3,000 nodes simulate in about a
// second (tests/sim/timeline_test.cpp prints the measured time).
//
//   tessera::sim::CollectiveModel collectives(cluster);
//   tessera::sim::SimulationOptions options;
//   options.collectives = &collectives;
//   auto result = tessera::sim::simulate(trace, options);
//   std::cout << result.step_time.count() << " us\n";
//   std::ofstream("step.json") << tessera::sim::chrome_trace_json(trace, result);
//
// simulate() is a pure function of its inputs; the models it borrows must be
// thread-safe for concurrent simulations (CollectiveModel and the shipped
// OverlapModels are).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "tessera/sim/collective_model.h"
#include "tessera/sim/overlap.h"
#include "tessera/sim/trace.h"
#include "tessera/sim/types.h"

namespace tessera::sim {

struct SimulationOptions {
  // Required. Borrowed; must outlive the call.
  const CollectiveModel* collectives = nullptr;
  // Optional (nullptr = compute never slows). Borrowed.
  const OverlapModel* overlap = nullptr;
  // Keep every node's times (needed for events and the Chrome trace). Costs
  // 32 bytes per node per rank.
  bool record_events = true;
  // Passed to the overlap model as comm_threads.
  int comm_threads = 0;
  // Compose each measured step of the trace and report the median one (see
  // the top); false: compose the per-node medians (duration) once.
  bool replay_steps = true;
};

// The times of one node on one rank.
struct SimEvent {
  Microseconds ready{0};  // all predecessors done (communication: issued)
  Microseconds start{0};  // running (collectives: when the last member issued)
  Microseconds end{0};
  double slowdown = 1;  // compute: simulated / measured duration
};

struct RankBreakdown {
  int rank = 0;
  Microseconds finish{0};  // end of the rank's last node
  Microseconds compute{0};
  Microseconds exposed_comm{0};
  Microseconds sync_wait{0};
  Microseconds idle{0};
  Microseconds overlapped_comm{0};
  Microseconds slowdown_extra{0};
  int64_t peak_memory_bytes = 0;  // from the trace (0 = unknown)
};

struct SimulationResult {
  Microseconds step_time{0};
  int slowest_rank = 0;
  std::vector<RankBreakdown> ranks;  // indexed by rank
  // events[rank][i] belongs to node i of the rank's trace entry; empty when
  // record_events is false.
  std::vector<std::vector<SimEvent>> events;
  // Ranks whose peak_memory_bytes exceeds metadata.memory_capacity_bytes.
  std::vector<int> out_of_memory_ranks;
  size_t simulated_nodes = 0;   // over all ranks
  size_t collective_calls = 0;  // collective and p2p instances
  double wall_seconds = 0;      // time simulate() took (all replayed steps)
  // With replayed measured steps: each step's composed time, in trace order,
  // and the index of the one this result is (its events and breakdown).
  // Empty and -1 when the per-node medians were composed.
  std::vector<Microseconds> replayed_step_times;
  int replayed_step = -1;
};

// Composes the step. InvalidArgument for a missing collective model, a
// trace that does not fit the cluster (more ranks than
// topology.num_nodes × devices_per_node when num_nodes > 0), disagreeing
// collective members, and deadlocks (see above); errors of the collective
// and overlap models pass through.
SimulationResult simulate(const Trace& trace, const SimulationOptions& options);

struct ChromeTraceOptions {
  std::vector<int> ranks;     // ranks to include; empty = all
  bool include_waits = true;  // a "wait" slice from issue to start of each communication op
};

// The Chrome trace-event JSON of a simulated step ({"traceEvents": [...],
// "displayTimeUnit": "ms"}): one complete ("X") event per node, pid = rank,
// tid = stream (named through thread_name metadata), ts/dur in
// microseconds, args with kind, op, bytes and slowdown. InvalidArgument when
// the result has no events (record_events was false) or a rank is out of
// range.
std::string chrome_trace_json(const Trace& trace, const SimulationResult& result,
                              const ChromeTraceOptions& options = {});

// A short text table: step time, then per rank (or the `max_ranks` slowest)
// finish, compute, exposed and overlapped communication, sync wait, idle.
std::string format_breakdown(const SimulationResult& result, size_t max_ranks = 16);

}  // namespace tessera::sim
