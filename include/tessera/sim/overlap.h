// tessera/sim/overlap.h — how much a compute kernel slows down while
// communication runs beside it on the same device.
//
// A kernel that takes D microseconds alone takes D·slowdown when
// communication overlaps it (communication kernels take SMs and memory
// bandwidth, CPU-driven transports take host threads). An OverlapModel
// predicts that slowdown from features of the kernel and of the concurrent
// communication:
//
//   compute_kind         category ("gemm", "attention", ...); one-hot over the
//                        categories seen in training, unseen ones encode as
//                        all zeros
//   compute_flops        FLOPs of the kernel (0 = unknown)      -> log2(1 + x)
//   compute_duration_us  the kernel alone                       -> log2(1 + x)
//   comm_kind            the concurrent collective (largest by bytes), one-hot
//   comm_bytes           bytes of all concurrent communication  -> log2(1 + x)
//   comm_ranks           group size of that collective
//   concurrent_comms     number of communication ops running
//   comm_threads         threads / channels the transport uses (0 = unknown)
//   overlap_fraction     fraction of the kernel's time with communication
//                        running, in [0, 1]
//
// The target is slowdown = (time with communication) / (time alone). The
// timeline composer asks for overlap_fraction = 1, which is the
// instantaneous rate factor: a kernel overlapped for a fraction f slows by
// 1 + f·(s - 1) under the linear model, and the composer integrates the
// rate over the periods with and without communication.
//
// Two implementations share the interface:
//   * linear (fit_linear_overlap): slowdown = 1 + f·(w · [1, features]) by
//     ridge-regularised least squares; exactly 1 when f = 0. Always available.
//   * xgboost (fit_xgboost_overlap): gradient-boosted trees (the regressor the
//     Echo paper uses) through XGBoost's C API, on [features, f].
// Predictions are never below 1.
//
// Measurements come as CSV (header with the column names above plus
// "slowdown"; compute_kind, compute_duration_us, comm_kind, comm_bytes,
// overlap_fraction and slowdown required, the rest optional) or JSON
// ({"schema": "tessera.sim.overlap_samples/1", "samples": [{...same keys...}]}).
//
//   auto samples = tessera::sim::load_overlap_samples("gemm_vs_allreduce.csv");
//   auto split = tessera::sim::split_samples(samples, 0.2, /*seed=*/1);
//   auto model = tessera::sim::fit_xgboost_overlap(split.train);
//   auto err = tessera::sim::evaluate_overlap(*model, split.test);
//   model->save_file("overlap.json");
//
// Models are immutable after fitting; predict() is thread-safe (the XGBoost
// one serialises calls on an internal mutex).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "tessera/sim/types.h"

namespace tessera::sim {

struct OverlapFeatures {
  std::string compute_kind = "other";
  double compute_flops = 0;
  double compute_duration_us = 0;
  CollectiveKind comm_kind = CollectiveKind::kAllReduce;
  double comm_bytes = 0;
  int comm_ranks = 2;
  int concurrent_comms = 1;
  int comm_threads = 0;
  double overlap_fraction = 1;
};

struct OverlapSample {
  OverlapFeatures features;
  double slowdown = 1;  // (time with communication) / (time alone), > 0
  std::string origin;   // "file.csv:12"
};

class OverlapModel {
 public:
  virtual ~OverlapModel() = default;

  // The predicted slowdown (>= 1). InvalidArgument for features out of range
  // (negative sizes, overlap_fraction outside [0, 1]).
  virtual double predict(const OverlapFeatures& features) const = 0;
  // "linear" or "xgboost".
  virtual std::string kind() const = 0;
  // {"schema": "tessera.sim.overlap/1", "kind": ..., ...}; load_overlap_model
  // reads it back.
  virtual std::string to_json() const = 0;

  // Writes to_json() atomically.
  void save_file(const std::string& path) const;
};

// Reads a model written by to_json() / save_file(). InvalidArgument naming
// the source and the field for malformed input.
std::unique_ptr<OverlapModel> parse_overlap_model(std::string_view text,
                                                  const std::string& source = "<overlap>");
std::unique_ptr<OverlapModel> load_overlap_model(const std::string& path);

struct LinearOverlapOptions {
  // Ridge penalty on the weights, on features scaled to unit norm: keeps
  // the system solvable when columns are collinear (the one-hot kinds sum to
  // the bias) or never vary, without biasing well-determined weights.
  double ridge = 1e-10;
};
// InvalidArgument when samples is empty or a sample is out of range.
std::unique_ptr<OverlapModel> fit_linear_overlap(const std::vector<OverlapSample>& samples,
                                                 const LinearOverlapOptions& options = {});

struct XGBoostOverlapOptions {
  int rounds = 300;        // boosting rounds
  int max_depth = 4;       // tree depth
  double eta = 0.1;        // learning rate
  double subsample = 1.0;  // row subsampling per tree
  double min_child_weight = 1.0;
  double lambda = 1.0;  // L2 penalty on leaf weights
  int threads = 1;      // 1 keeps the fit deterministic
  int seed = 0;
};
// InvalidArgument as fit_linear_overlap; Internal when XGBoost fails.
std::unique_ptr<OverlapModel> fit_xgboost_overlap(const std::vector<OverlapSample>& samples,
                                                  const XGBoostOverlapOptions& options = {});

// Measurements from CSV or JSON text (format above). InvalidArgument naming
// the source, line (CSV) or sample index (JSON), and the column.
std::vector<OverlapSample> parse_overlap_csv(std::string_view text,
                                             const std::string& source = "<csv>");
std::vector<OverlapSample> parse_overlap_json(std::string_view text,
                                              const std::string& source = "<json>");
// By extension: ".csv" -> CSV, otherwise JSON. NotFound when unreadable.
std::vector<OverlapSample> load_overlap_samples(const std::string& path);
// CSV text with every column (parse_overlap_csv reads it back).
std::string overlap_samples_to_csv(const std::vector<OverlapSample>& samples);

struct OverlapError {
  size_t samples = 0;
  double mean_abs_error = 0;  // of the slowdown
  double rms_error = 0;
  double mean_abs_rel_error = 0;  // |predicted - measured| / measured
  double max_abs_error = 0;
};
OverlapError evaluate_overlap(const OverlapModel& model, const std::vector<OverlapSample>& samples);

struct SampleSplit {
  std::vector<OverlapSample> train;
  std::vector<OverlapSample> test;
};
// A seeded random split with round(test_fraction · n) samples held out.
// InvalidArgument unless 0 < test_fraction < 1 and both parts are non-empty.
SampleSplit split_samples(const std::vector<OverlapSample>& samples, double test_fraction,
                          uint64_t seed);

}  // namespace tessera::sim
