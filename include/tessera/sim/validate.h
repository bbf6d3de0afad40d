// tessera/sim/validate.h — predicted against measured step times of real
// multi-rank training runs on this machine.
//
// A suite file lists the configurations:
//
//   {
//     "schema": "tessera.sim.validation/1",
//     "clusters": {"2": "gloo_local_np2", "4": "gloo_local_np4"},  // per world size:
//                                      // a cluster file or bundled name
//     "overlap": "my_overlap.json",     // optional overlap model file (none is shipped)
//     "warmup_steps": 2, "measured_steps": 10,         // of each real run
//     "trace": {"warmup_steps": 2, "measured_steps": 5}, // of each traced rank
//     "cases": [
//       {"name": "dense-s dp=2", "job": "jobs/dense-s.json", "layout": "dp=2",
//        "zero1": false},                                // layout, zero1: optional overrides
//       ...]
//   }
//
// Paths are relative to the suite file. For every case, in order:
//   1. the job (with the overrides) is traced in this process
//      (tracer.h) and the trace simulated on the world size's cluster;
//   2. the job runs for real: `tessera-launch --nproc N -- tessera-train
//      JOB --timings FILE --warmup W --measure M`, whose median step is the
//      measurement;
//   3. error = (predicted - measured) / measured.
// The machine may be shared: before tracing and before each run the suite
// waits until the host is idle (ValidationOptions::quiet_idle), and a run
// during which other processes used more than max_foreign_cpu of the host's
// CPU is repeated (up to max_attempts, keeping the least disturbed).
// Everything is written to the work directory (JOB, trace, timings,
// predicted timeline and measured steps as Chrome traces per case:
// <case>.timeline.json, <case>.measured.json), so a later run with
// reuse_measurements re-predicts from the same traces and measurements.
//
//   auto suite = tessera::sim::ValidationSuite::load_file("data/sim/validation.json");
//   tessera::sim::ValidationOptions opts;
//   opts.work_dir = "/tmp/sim-validation";
//   auto report = tessera::sim::run_validation(suite, opts);
//   std::cout << report.to_markdown();
//
// Not thread-safe (tracing sets process-wide thread counts; runs take the
// machine).
#pragma once

#include <chrono>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "tessera/sim/timeline.h"
#include "tessera/sim/training_job.h"

namespace tessera::sim {

struct ValidationCase {
  std::string name;
  std::string job_file;                  // resolved path
  std::optional<ParallelLayout> layout;  // overrides the job's
  std::optional<bool> zero1;             // overrides the job's
};

struct ValidationSuite {
  std::string source;
  std::map<int, std::string> clusters;  // world size -> cluster file or bundled name
  std::string overlap;                  // "" = none
  int warmup_steps = 2;
  int measured_steps = 10;
  int trace_warmup_steps = 2;
  int trace_measured_steps = 5;
  std::vector<ValidationCase> cases;

  // InvalidArgument naming the source and the field (unknown keys, a case
  // without job, a world size without cluster); NotFound for the file.
  static ValidationSuite parse(std::string_view text, const std::string& source,
                               const std::string& base_dir);
  static ValidationSuite load_file(const std::string& path);
};

struct ValidationRow {
  std::string name;
  std::string layout;
  int world_size = 0;
  bool zero1 = false;
  bool moe = false;
  double measured_s = 0;  // median of the measured steps
  double measured_min_s = 0;
  double measured_max_s = 0;
  double predicted_s = 0;
  double error = 0;           // (predicted - measured) / measured
  double traced_alone_s = 0;  // the traced ranks' slowest step alone (sum of compute)
  // Breakdown of the predicted slowest rank (seconds).
  double compute_s = 0;
  double exposed_comm_s = 0;
  double sync_wait_s = 0;
  // The measured slowest rank's split (medians over the steps; 0 when the
  // timings have none): time in communication, waiting for peers included,
  // and the rest of its step.
  double measured_comm_s = 0;
  double measured_compute_s = 0;
  int collective_calls = 0;  // per step, all ranks
  double trace_seconds = 0;  // time tracing took
  // Share of the host's CPU time other processes used during the kept
  // tracing and run attempts (see ValidationOptions), and the attempts made.
  double trace_foreign_cpu = 0;
  double run_foreign_cpu = 0;
  int run_attempts = 0;
  double simulate_seconds = 0;  // time the prediction took
  // With several rounds (ValidationOptions::rounds): each round's measured
  // median step and prediction. The row's measured_s and predicted_s are
  // then the medians over rounds, measured_min_s / max_s the smallest and
  // largest round, and the breakdowns those of the round whose measurement
  // is the median. Empty with one round.
  std::vector<double> round_measured_s;
  std::vector<double> round_predicted_s;
};

struct ValidationOptions {
  std::string work_dir = "sim-validation";
  // Programs run for the measurements.
  std::string launch_bin = "tessera-launch";
  std::string train_bin = "tessera-train";
  std::string sim_bin = "tessera-sim";
  // When set, before each round: `tessera-sim calibrate host --job
  // host_job --repeats host_repeats` under tessera-launch for each world
  // size of the suite (work_dir/host.rN.npW.json), and that round is
  // predicted with the suite's cluster files carrying those figures
  // (apply_host_sharing; written to work_dir/host.rN.npW.cluster.json). A
  // shared host's speed drifts over a long validation; this predicts each
  // round with the host as it was then. Empty: the cluster files as they are.
  std::string host_job;
  int host_repeats = 9;
  // With host_job: predict every round with the median over all rounds of
  // those figures (median_host_sharing) instead of its own round's; written
  // to work_dir/host.median.npW.cluster.json.
  bool host_median = false;
  // When set (not with host_job): before the first round, for each case,
  // `tessera-sim calibrate host --job <case>.host-job.json --own-layout
  // --compute-only --repeats host_repeats` under tessera-launch
  // (work_dir/<case>.host.json): host_compute_slowdown and
  // host_lockstep_slowdown measured with rank 0's step of the case itself,
  // and every round of the case is predicted with the cluster file carrying
  // those two (work_dir/<case>.host.cluster.json; the cluster's straggler
  // and communication-load figures stay). With reuse_measurements an
  // existing <case>.host.json is re-used.
  bool host_per_case = false;
  // Resolves cluster and overlap names to files (tessera-sim's bundled data
  // lookup); identity when empty.
  std::function<std::string(const std::string& name, const char* what)> find_data_file;
  // Re-use traces and timings already in work_dir (re-predict only); cases
  // missing either are traced and run.
  bool reuse_measurements = false;
  // Only these cases (by name); empty: all.
  std::vector<std::string> only;
  // Limit on one real run.
  std::chrono::seconds run_timeout{900};
  // Before tracing and before each run, wait until the host's CPUs were at
  // least this idle over two seconds (0: do not wait), for at most
  // quiet_timeout (then go on, with a warning).
  double quiet_idle = 0.9;
  std::chrono::seconds quiet_timeout{1800};
  // A run (or tracing) during which other processes used more than this
  // fraction of the host's CPU time is repeated, at most max_attempts times
  // in all; the least disturbed attempt is kept.
  double max_foreign_cpu = 0.1;
  int max_attempts = 3;
  // Every case is traced, predicted and measured this many times, round by
  // round over all cases (files get a .rN suffix when > 1); see
  // ValidationRow::round_measured_s.
  int rounds = 1;
  // Called with each case's row (combined over the rounds) once every
  // round is measured and predicted (progress output).
  std::function<void(const ValidationRow&)> on_row;
};

struct ValidationReport {
  std::vector<ValidationRow> rows;
  double median_abs_error = 0;
  double max_abs_error = 0;
  double mean_abs_error = 0;

  // A Markdown table (one row per case, then the summary line).
  std::string to_markdown() const;
  std::string to_json() const;
};

// Runs the suite (see the top). Errors of tracing, running (a failed run is
// Unavailable with the command and its output's tail) and simulating pass
// through.
ValidationReport run_validation(const ValidationSuite& suite, const ValidationOptions& options);

// Summary statistics over rows (also used by run_validation).
void summarize(ValidationReport& report);

// One case's rounds as one row (see ValidationRow::round_measured_s);
// InvalidArgument for none.
ValidationRow combine_rounds(const std::vector<ValidationRow>& rounds);

}  // namespace tessera::sim
