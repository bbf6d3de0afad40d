// tessera/sim/training_job.h — a training job described by one JSON file,
// and the loop that runs it on real ranks or on a tracer's placeholders.
//
// The same file drives tessera-train (real training under tessera-launch),
// tessera-sim trace / predict / sweep / validate, so a prediction and the
// run it predicts read identical settings:
//
//   {
//     "name": "dense-s",                       // free text (optional)
//     "model": {...},                          // Hugging Face config.json fields, or a path
//                                              // to a config.json (relative to this file)
//     "layout": {"dp": 2, "tp": 2, "ep": 1},   // mesh axes; world size = dp * tp * ep
//     "zero1": false,                          // AdamW state sharded over dp (ZeRO-1)
//     "batch": {"global_batch": 16,            // sequences per optimiser step, all ranks
//               "seq_len": 128,
//               "grad_accumulation": 1},       // micro-batches per step (optional)
//     "optimizer": {"lr": 3e-3, "min_lr": 3e-4, "warmup": 10, "max_grad_norm": 1.0,
//                   "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8},
//     "precision": "fp32",                     // or "bf16_autocast"
//     "steps": 20,                             // optimiser steps (learning-rate schedule length)
//     "data": {"kind": "synthetic", "seed": 1} // uniform random token ids, or
//             // {"kind": "tokens", "path": "train.tokens", "bytes_per_token": 2}
//     "seed": 0                                // weight initialisation
//   }
//
// Only "model" and "layout" are required; the rest default as shown. Keys
// are strict: an unknown key anywhere (model fields included) is an
// InvalidArgument naming the file and the key path.
//
// Ranks and data. The mesh is [dp, ep, tp] (tp varies fastest, so a tp group
// is consecutive ranks); MoE expert parallelism uses the ep axis, and the
// trainer averages gradients over dp (buckets of 25 MiB) or reduce-scatters
// them under ZeRO-1. Sequences are split over the dp x ep "data ranks"
// (tp ranks of one replica read the same batch): global_batch must be a
// multiple of dp * ep * grad_accumulation. The trainer does not combine ep
// with a separate dp group (InvalidArgument).
//
//   auto config = tessera::sim::TrainingJobConfig::load_file("job.json");
//   auto world = tessera::dist::init_process_group();
//   auto job = tessera::sim::TrainingJob::create(config, world);
//   for (int64_t s = 0; s < config.steps; ++s) job->step(s);
//
// TrainingJobConfig is a plain value (thread-compatible). A TrainingJob is
// used from one thread; its steps are collective over the job's ranks.
#pragma once

#include <ATen/core/Tensor.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "tessera/dist/process_group.h"
#include "tessera/formats/model_config.h"
#include "tessera/nn/model.h"
#include "tessera/nn/train.h"

namespace tessera::sim {

// Sizes of the mesh axes. Every size >= 1.
struct ParallelLayout {
  int dp = 1;
  int tp = 1;
  int ep = 1;

  int world_size() const { return dp * tp * ep; }
  // "dp=2,tp=2" (axes of size 1 left out; "dp=1" for a single rank).
  std::string to_string() const;
  // Parses "dp=2,tp=2" (any order, spaces allowed, missing axes 1).
  // InvalidArgument naming the text for unknown axes, repeated axes and
  // sizes < 1.
  static ParallelLayout parse(std::string_view text);
  bool operator==(const ParallelLayout& o) const { return dp == o.dp && tp == o.tp && ep == o.ep; }
};

// A rank's coordinates on the [dp, ep, tp] mesh.
struct RankCoords {
  int dp = 0;
  int ep = 0;
  int tp = 0;
};
RankCoords coords_of(const ParallelLayout& layout, int rank);
int rank_of(const ParallelLayout& layout, const RankCoords& coords);

struct TrainingJobConfig {
  std::string name;
  std::string source = "<job>";  // the file, for messages
  nn::ModelConfig model;
  ParallelLayout layout;
  bool zero1 = false;
  int64_t global_batch = 8;
  int64_t seq_len = 128;
  int64_t grad_accumulation = 1;
  double lr = 3e-3;
  double min_lr = 3e-4;
  int64_t warmup = 10;
  double max_grad_norm = 1.0;
  nn::AdamWOptions adamw;
  bool bf16_autocast = false;
  int64_t steps = 20;
  // Data: synthetic (token_file empty) or a token file.
  std::string token_file;  // absolute, or relative to the working directory
  int bytes_per_token = 2;
  uint64_t data_seed = 1;
  uint64_t seed = 0;

  // Parses and checks (see the top of this file). `base_dir` resolves a
  // model given as a path and a relative token-file path.
  static TrainingJobConfig parse(std::string_view text, const std::string& source = "<job>",
                                 const std::string& base_dir = ".");
  // NotFound when the file cannot be read.
  static TrainingJobConfig load_file(const std::string& path);
  // JSON in the format above (the model inline); parse(to_json()) gives an
  // equal job.
  std::string to_json() const;
  // InvalidArgument naming the source and the field when the layout does
  // not fit the model (tp must divide the heads, ep the experts; ep needs a
  // MoE model and dp = 1), the batch does not split, or ZeRO-1 has dp = 1.
  void validate() const;

  // Data ranks (dp * ep) and sequences per data rank per step.
  int data_ranks() const { return layout.dp * layout.ep; }
  int64_t local_batch() const { return global_batch / data_ranks(); }
  // The same job with another layout (not validated).
  TrainingJobConfig with_layout(const ParallelLayout& layout) const;
};

// One rank of a job: its mesh, model, trainer and data.
class TrainingJob {
 public:
  // Builds this rank's part of the job on `world` (size must equal the
  // layout's world size; a placeholder group traces the rank). Creating the
  // mesh is collective over `world`. Weights: init_random(config.seed).
  // InvalidArgument when the sizes disagree or the config is invalid.
  static std::unique_ptr<TrainingJob> create(const TrainingJobConfig& config,
                                             std::shared_ptr<dist::ProcessGroup> world);
  ~TrainingJob();

  const TrainingJobConfig& config() const;
  int rank() const;
  RankCoords coords() const;
  // This rank's input ids and labels [local_batch, seq_len] of step `step`
  // (deterministic in the config, the step and the data rank).
  nn::TokenDataset::Batch batch(int64_t step) const;
  // One optimiser step on batch(step). Collective over the job's ranks.
  nn::StepStats step(int64_t step);
  // One optimiser step on a given batch.
  nn::StepStats step(const nn::TokenDataset::Batch& batch);

  nn::Transformer& model();
  nn::Trainer& trainer();
  // The world and the mesh axis groups (null for axes of size 1).
  const std::shared_ptr<dist::ProcessGroup>& world() const;
  std::shared_ptr<dist::ProcessGroup> axis_group(const std::string& axis) const;

 private:
  TrainingJob();
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// One operation as a rank met it: issue to completion (the first
// successful wait), waiting for its peers included.
struct CollectiveTime {
  std::string op;  // dist::CollectiveCall::op
  int64_t bytes = 0;
  int group_size = 0;
  double seconds = 0;        // issue to completion
  double start_seconds = 0;  // issue, after the window's start()
  // The group's two lowest world ranks (second -1 for one rank): with
  // group_size they name a device-mesh group, whose ranks are evenly spaced.
  int first_rank = 0;
  int second_rank = -1;
};

// One operation of a measured step as one rank met it
// (StepTimings::operations).
struct MeasuredOperation {
  int rank = 0;
  int step = 0;  // index among the measured steps
  CollectiveTime what;
};

// Time one rank spends in communication: the union of the intervals from an
// operation's issue to its completion (the first successful wait), counted
// between start() and stop(), and each operation's own interval. Install it
// as the world group's observer (InitOptions::group.observer; sub-groups
// inherit it) and pass it in RunOptions::clock. Operations issued outside
// the window are not counted; one still running at stop() counts until
// then in the union, and not in operations(). Thread-safe.
class CommunicationClock : public dist::CollectiveObserver {
 public:
  void on_issue(const dist::CollectiveCall& call) override;
  void on_complete(const dist::CollectiveCall& call) override;
  void start();
  // Seconds in communication since start(); closes the window.
  double stop();
  // Operations issued in the last window.
  int calls() const;
  // The operations of the last window that completed in it, in completion
  // order.
  std::vector<CollectiveTime> operations() const;

 private:
  using Clock = std::chrono::steady_clock;
  struct Pending {
    uint64_t id;
    CollectiveTime what;
    Clock::time_point issued;
  };
  mutable std::mutex mu_;
  bool open_ = false;                 // guarded by mu_
  Clock::time_point window_start_;    // start()
  std::vector<Pending> outstanding_;  // issued in the window, not yet complete
  Clock::time_point busy_since_;      // when outstanding_ became non-empty
  double total_ = 0;
  int calls_ = 0;
  std::vector<CollectiveTime> done_;
};

// StepTimings::collectives: one kind of operation over the measured steps
// and all ranks.
struct CollectiveTiming {
  std::string op;
  int64_t bytes = 0;
  int group_size = 0;
  int calls = 0;  // over the measured steps and ranks
  double median_seconds = 0;
  double min_seconds = 0;
  double max_seconds = 0;
  bool operator==(const CollectiveTiming& o) const {
    return op == o.op && bytes == o.bytes && group_size == o.group_size && calls == o.calls &&
           median_seconds == o.median_seconds && min_seconds == o.min_seconds &&
           max_seconds == o.max_seconds;
  }
};

// Step times of a real run.
struct StepTimings {
  // Wall time of each measured step: every rank times Trainer::step between
  // a barrier and its return, and the slowest rank's time is kept.
  std::vector<double> step_seconds;
  std::vector<double> losses;
  double median_seconds = 0;
  double min_seconds = 0;
  double max_seconds = 0;
  int world_size = 1;
  std::string layout;
  // With a CommunicationClock (RunOptions::clock), per measured step and
  // rank: the rank's own step time and its time in communication (issue to
  // completion, waiting for peers included); empty without one. What the
  // rest of the step holds is the rank's compute as it ran in the job.
  std::vector<std::vector<double>> rank_step_seconds;
  std::vector<std::vector<double>> rank_comm_seconds;
  // With a clock: each kind of operation (op, bytes, group size) as the
  // ranks met it in the measured steps, issue to completion; sorted by op,
  // group size, bytes. Empty without one.
  std::vector<CollectiveTiming> collectives;
  // With a clock: every rank's operations of the measured steps, by rank,
  // step and issue time (what measured_chrome_trace_json draws). Kept in
  // memory only: to_json does not write them.
  std::vector<MeasuredOperation> operations;
  // Medians over the measured steps of the slowest rank's communication
  // time and of the rest of its step (0 without a clock).
  double median_comm_seconds() const;
  double median_compute_seconds() const;
  // {"schema": "tessera.sim.step_timings/1", "job": ..., "layout": ..., "world_size": ...,
  //  "warmup_steps": ..., "step_seconds": [...], "losses": [...], "median_seconds": ...,
  //  "rank_step_seconds": [[...]], "rank_comm_seconds": [[...]],
  //  "collectives": [{"op": ..., "bytes": ..., "group_size": ..., "calls": ...,
  //                   "median_seconds": ..., "min_seconds": ..., "max_seconds": ...}]}
  //  (the last three optional)
  std::string to_json(int warmup_steps) const;
  // Reads what to_json wrote; InvalidArgument naming the source and field.
  static StepTimings parse(std::string_view text, const std::string& source = "<timings>");
};

struct RunOptions {
  int warmup_steps = 2;     // run first, not timed
  int measured_steps = 10;  // timed
  // The world group's observer, when the run should also split each step
  // into communication and compute (StepTimings::rank_comm_seconds).
  std::shared_ptr<CommunicationClock> clock;
};

// Runs warmup + measured steps of `job` (steps 0, 1, ...) and times the
// measured ones (see StepTimings). Collective over the job's ranks.
StepTimings run_timed_steps(TrainingJob& job, const RunOptions& options);

// The measured steps as a Chrome trace ({"traceEvents": [...]}, the format
// of chrome_trace_json in timeline.h, to open beside a predicted step): per
// rank (pid), a "step" slice per measured step on thread 0 and each
// communication operation from issue to completion on thread 1 and up
// (operations that overlap in time take further threads). Steps follow each
// other on one time axis, step s starting at the sum of the slowest ranks'
// times of steps 0 .. s-1 (the barrier that starts every step is left out),
// times in microseconds. InvalidArgument without per-rank step times (a
// run without a clock).
std::string measured_chrome_trace_json(const StepTimings& timings);

}  // namespace tessera::sim
