// tessera/sim/calibration.h — measurements on this machine that the
// simulator's models are fitted to: collective times on Tessera's process
// groups, compute slowed by concurrent communication, and compute slowed by
// other ranks computing on the same host.
//
// Every function is collective over `world` (run it under tessera-launch on
// every rank) and returns its results on every rank.
//
//   auto world = tessera::dist::init_process_group();
//   auto m = tessera::sim::measure_collectives(*world, {});
//   if (world->rank() == 0) write(collective_bench_to_json(m, world->size()));
//
// Timing: before each timed call the ranks meet in a barrier, each times its
// own call (issue to the end of wait()), and the slowest rank's time counts
// (for collectives with compute_ms: compute and calls in a plain loop, the
// mean over ranks from the last member's issue; see there); the median over
// repetitions is kept.
//
// Not thread-safe (one call at a time per group); sets LibTorch's intra-op
// thread count for its duration (restored afterwards).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "tessera/dist/process_group.h"
#include "tessera/sim/collective_model.h"
#include "tessera/sim/host_sharing.h"
#include "tessera/sim/overlap.h"
#include "tessera/sim/training_job.h"

namespace tessera::sim {

struct CollectiveSweepOptions {
  // Operations to time (send_recv is not timed).
  std::vector<CollectiveKind> ops = {CollectiveKind::kAllReduce, CollectiveKind::kAllGather,
                                     CollectiveKind::kReduceScatter, CollectiveKind::kAllToAll,
                                     CollectiveKind::kBroadcast};
  // Sizes (nccl-tests convention, fp32 elements): min_bytes, min_bytes * step, ... <= max_bytes.
  int64_t min_bytes = 256;
  int64_t max_bytes = int64_t{64} << 20;
  double size_step = 2;
  // Repetitions per size: at least min_repeats, then until target_seconds
  // of measuring or max_repeats (rank 0's clock decides for all).
  int min_repeats = 5;
  int max_repeats = 40;
  double target_seconds = 0.25;
  // Ranks per group: 0 = the whole world; otherwise the world splits into
  // consecutive groups of this size that all run the operation at once
  // (e.g. the tp groups of a dp x tp job). Must divide the world size.
  int group_size = 0;
  // Intra-op threads (0: usable cores / world size, at least 1).
  int threads = 0;
  // 0: time the collectives back to back (each call starts right after a
  // barrier; the slowest rank's time counts). > 0: time them as a training
  // step meets them: every rank loops compute (fp32 GEMMs, about compute_ms
  // alone) and the call, with nothing else synchronising the ranks in
  // between; each rank records when it issued the call and when it
  // completed, and the mean over ranks of the time from the last issue in
  // the rank's group to its completion counts (after_last_arrival in
  // host_sharing.h). That holds what an in-step collective costs once its
  // last member arrives: the transfer, and the wake-up of a process that
  // blocked and gave its core away (milliseconds when 4 ranks share 2
  // cores). The wait for that last member is the simulator's straggler
  // term (Topology::host_sync_skew and host_sync_us, measured by
  // measure_host_sharing on the same basis). Compares the ranks' clocks:
  // every rank must run on one host (InvalidArgument otherwise). Cluster
  // files for a host whose ranks share cores are fitted from these
  // (data/sim/gloo_local).
  double compute_ms = 0;
};

// One Measurement per (op, size): shape = the group's size on one node.
// InvalidArgument for bad options.
std::vector<Measurement> measure_collectives(dist::ProcessGroup& world,
                                             const CollectiveSweepOptions& options);

struct OverlapSweepOptions {
  // Square fp32 GEMMs [n, n] x [n, n], repeated to about gemm_ms each.
  std::vector<int64_t> gemm_sizes = {64, 128, 256, 384, 512};
  double gemm_ms = 20;
  // Sizes of the all_reduce running beside the GEMMs (bytes).
  std::vector<int64_t> comm_bytes = {int64_t{16} << 10, int64_t{256} << 10, int64_t{1} << 20,
                                     int64_t{4} << 20,  int64_t{16} << 20,  int64_t{64} << 20};
  // Timed repetitions per (GEMM, size) pair; the median is kept.
  int repeats = 5;
  int threads = 0;  // as CollectiveSweepOptions::threads
};

// Compute slowed by concurrent communication: every rank times its GEMMs
// alone, and again after issuing an all_reduce over the world that runs
// while they compute. One sample per (GEMM size, comm size) from rank 0's
// timings: slowdown = with / alone; overlap_fraction = (time the all_reduce
// takes alone) / (GEMM time with it), capped at 1; compute_kind "gemm";
// comm_threads 2 (Gloo's threads per group).
std::vector<OverlapSample> measure_overlap(dist::ProcessGroup& world,
                                           const OverlapSweepOptions& options);

struct HostSharingOptions {
  // The work each rank runs: one optimiser step of this job on a single
  // rank (its layout is ignored), repeated.
  TrainingJobConfig job;
  int repeats = 9;
  int threads = 0;  // as CollectiveSweepOptions::threads
  // The lock-step measurement (HostSharing::lockstep_slowdown): the job's
  // step as rank 0 of this layout runs it (it must issue collectives),
  // lockstep_repeats steps per mode.
  ParallelLayout lockstep_layout{1, 2, 1};
  int lockstep_repeats = 9;
  // The job's own layout (and ZeRO-1 setting), as a validation case runs
  // it: the out-of-step and the in-step measurements both time rank 0's
  // step of job.layout on a placeholder group (lockstep_layout is ignored),
  // and compute_slowdown and sync_skew come from the out-of-step runs of
  // that step, repeats times (lockstep_repeats is ignored). How much ranks
  // sharing cores slow each other depends on what they run: a
  // data-parallel rank's share of the batch shares them better than the
  // whole batch does. job.layout must issue collectives.
  bool own_layout = false;
  // Only the slowdowns and the straggler share: no sync_us (left at 0) and
  // no comm_load (left empty), the minutes of those measurements saved
  // (validate's per-case figures keep the cluster file's).
  bool compute_only = false;
  // HostSharing::sync_us: the segment of the job's compute it is taken at
  // (the collective calibration's --compute-ms).
  double sync_compute_ms = 10;
  // HostSharing::comm_load: the all_reduce sizes (bytes, increasing) and
  // the computing ranks' GEMM segment (about this long alone).
  std::vector<int64_t> comm_load_bytes = {int64_t{4} << 10, int64_t{64} << 10, int64_t{1} << 20,
                                          int64_t{8} << 20};
  double comm_load_compute_ms = 150;
  // Repeats during which other processes (or the hypervisor) took more than
  // this share of the host's CPU time are left out of the medians, keeping
  // at least the three quietest.
  double max_foreign_cpu = 0.05;
};

// Compute slowed by other ranks computing on the same host: for k = 1 ..
// world size, ranks 0 .. k-1 run the work at the same time while the others
// wait in a barrier (out of step). In step: ranks 0 .. k-1 each run the
// step of rank 0 of `lockstep_layout` on a placeholder group, once on their
// own and once with every wait for a collective also waiting for an
// all_reduce of one number over all ranks (so they leave each collective
// together, as in the real job), the times of those waits left out. Every
// repeat runs every measurement for every k, so a drift of the machine's
// speed lands on all of them alike; each figure is a median over the
// repeats that other processes left alone (max_foreign_cpu).
HostSharing measure_host_sharing(dist::ProcessGroup& world, const HostSharingOptions& options);

}  // namespace tessera::sim
