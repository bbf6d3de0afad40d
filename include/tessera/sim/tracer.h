// tessera/sim/tracer.h — ex-situ tracing: one rank's training step, run in
// this process for a world size this process does not have.
//
// For each rank to trace, the tracer builds the job (training_job.h) on a
// placeholder world group of the job's size (dist::ProcessGroup::
// create_placeholder), so the model, the mesh and the trainer are exactly
// those of the real run, and runs real steps with the real kernels. A
// CollectiveObserver records every communication call (kind, group members,
// bytes, dtype) and the compute between calls:
//
//   compute node k   wall time from the previous call's completion (or the
//                    start of Trainer::step) to the next call's issue,
//                    measured on this machine with the intra-op thread count
//                    each rank of the real job would get here;
//   collective node  issued after the compute before it; the compute after
//                    the point where the trainer waits for it depends on it
//                    (Tessera's trainer waits for every collective before
//                    computing on, so a rank's trace is a chain).
//
// Placeholder collectives finish at once; the time they spend making their
// placeholder results is in neither node. Durations are the median over
// `measured_steps` steps after `warmup_steps`, and each compute node keeps
// its duration in every measured step too (step_durations; the simulator
// replays the steps one by one, timeline.h); the node structure must be the
// same in every step (else Internal, naming the step and the node). Ranks
// traced separately run the same steps of the same data, so step k of one
// entry and step k of another are the same training step.
//
// Ranks that behave alike share one trace entry: ranks of a dense model
// differing only in their data-parallel coordinate are traced once;
// expert-parallel ranks (different experts and routing) are traced
// separately, so are the data-parallel ranks of an MoE model (their tokens
// route differently, so their expert compute differs), and so are tensor-
// parallel ranks when the vocabulary does not split evenly over tp (their
// shards differ in size). Groups are written as named partitions ("tp",
// "dp", "ep", "world") so one entry serves all its ranks. An uneven
// all_to_all (MoE token exchange) gets, on every member, the largest of the
// members' send and receive volumes (the busiest member bounds it), computed
// from the traced ranks' send sizes; a traced rank's own receive sizes come
// from placeholder data and are not used.
//
// Each entry's peak_memory_bytes is the tracing process's peak resident set
// during the measured steps (VmHWM, reset before them), the host memory one
// rank uses on this machine.
//
//   auto job = tessera::sim::TrainingJobConfig::load_file("job.json");
//   tessera::sim::TraceResult r = tessera::sim::trace_training_job(job);
//   r.trace.validate();
//   std::ofstream("step.trace.json") << r.trace.to_json();
//
// Not thread-safe: tracing sets LibTorch's process-wide intra-op thread
// count (restored afterwards) and must not run beside other LibTorch work
// whose timing matters.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "tessera/dist/process_group.h"
#include "tessera/sim/trace.h"
#include "tessera/sim/training_job.h"

namespace tessera::sim {

struct TracerOptions {
  // Steps run first and not used (allocator and cache warm-up).
  int warmup_steps = 2;
  // Steps whose node durations are combined (median per node).
  int measured_steps = 5;
  // Intra-op threads while tracing; 0: what each rank of the real job gets
  // on this machine (usable cores / world size, at least 1), as
  // tessera::init_runtime gives it under tessera-launch.
  int threads = 0;
  // Written to the trace's metadata (0 = unknown).
  int64_t memory_capacity_bytes = 0;
};

// Records every operation of the groups it observes, in issue order.
// Thread-safe.
class CallRecorder : public dist::CollectiveObserver {
 public:
  void on_issue(const dist::CollectiveCall& call) override;
  void on_complete(const dist::CollectiveCall& call) override;
  // Issued calls since construction or the last clear().
  std::vector<dist::CollectiveCall> calls() const;
  void clear();

 private:
  mutable std::mutex mu_;
  std::vector<dist::CollectiveCall> calls_;  // guarded by mu_
};

// The ranks that share a trace entry (see the top), each class sorted,
// classes ordered by their lowest rank.
std::vector<std::vector<int>> rank_classes(const TrainingJobConfig& config);

// One traced rank.
struct TracedRank {
  int rank = 0;                 // the rank that ran
  std::vector<int> stands_for;  // its class
  RankTrace entry;              // nodes with median durations, groups as partitions
  // The communication calls of the last measured step, in issue order.
  std::vector<dist::CollectiveCall> calls;
  double step_seconds = 0;  // median wall time of Trainer::step in the tracer
  int64_t peak_memory_bytes = 0;
};

// Traces `rank` of `config` (see the top). InvalidArgument for a rank
// outside the layout; errors of building or running the job pass through.
TracedRank trace_rank(const TrainingJobConfig& config, int rank, const TracerOptions& options = {});

struct TraceResult {
  Trace trace;                    // validated
  std::vector<TracedRank> ranks;  // one per class
  double seconds = 0;             // wall time of tracing
};

// Traces one representative per rank class and assembles the trace
// (metadata: world size, layout, model, groups of every mesh axis > 1 and
// "world"; source: the job's source). Uneven all_to_all volumes are
// reconciled as described at the top.
TraceResult trace_training_job(const TrainingJobConfig& config, const TracerOptions& options = {});

// The named partitions of a layout: "world" and every axis of size > 1.
std::map<std::string, std::vector<std::vector<int>>> layout_partitions(
    const ParallelLayout& layout);

}  // namespace tessera::sim
