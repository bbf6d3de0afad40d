// tessera/core/metrics.h — timers, counters, gauges and histograms.
//
// A MetricsRegistry owns named metrics and renders them in the Prometheus
// text exposition format (version 0.0.4), so a serving process can expose
// them on /metrics and a training loop can dump them to a file.
//
//   tessera::MetricsRegistry registry;
//   auto& steps = registry.counter("tessera_train_steps_total", "Optimizer steps");
//   auto& step_time = registry.histogram("tessera_step_seconds", "Step time",
//                                        {0.01, 0.1, 1, 10});
//   { tessera::ScopedTimer t(step_time); train_step(); }
//   steps.increment();
//   std::cout << registry.to_prometheus();
//
// All metric operations are thread-safe and lock-free except Histogram
// observe (one small mutex per histogram). References returned by the
// registry stay valid for the registry's lifetime.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace tessera {

// Wall-clock stopwatch on a monotonic clock.
class Stopwatch {
 public:
  Stopwatch() : start_(std::chrono::steady_clock::now()) {}
  void reset() { start_ = std::chrono::steady_clock::now(); }
  double seconds() const {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  }
  double milliseconds() const { return seconds() * 1e3; }

 private:
  std::chrono::steady_clock::time_point start_;
};

// Monotonically increasing count.
class Counter {
 public:
  void increment(double by = 1.0);
  double value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0.0};
};

// A value that goes up and down.
class Gauge {
 public:
  void set(double v) { value_.store(v, std::memory_order_relaxed); }
  void add(double by);
  double value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0.0};
};

// Cumulative histogram over fixed upper bounds (the +Inf bucket is implicit).
class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds);
  void observe(double v);

  struct Snapshot {
    std::vector<double> bounds;
    std::vector<uint64_t> cumulative;  // one per bound, then +Inf
    double sum = 0;
    uint64_t count = 0;
  };
  Snapshot snapshot() const;

 private:
  std::vector<double> bounds_;
  mutable std::mutex mu_;
  std::vector<uint64_t> buckets_;  // guarded by mu_; per bucket, not cumulative
  double sum_ = 0;                 // guarded by mu_
  uint64_t count_ = 0;             // guarded by mu_
};

// Observes the lifetime of the scope, in seconds, into a histogram.
class ScopedTimer {
 public:
  explicit ScopedTimer(Histogram& histogram) : histogram_(histogram) {}
  ScopedTimer(const ScopedTimer&) = delete;
  ScopedTimer& operator=(const ScopedTimer&) = delete;
  ~ScopedTimer() { histogram_.observe(watch_.seconds()); }

 private:
  Histogram& histogram_;
  Stopwatch watch_;
};

// Prometheus labels of one series, as (name, value) pairs; the order given
// is the order rendered. Label names match [a-zA-Z_][a-zA-Z0-9_]* and do not
// start with "__"; histograms may not use "le". Values are any UTF-8.
using MetricLabels = std::vector<std::pair<std::string, std::string>>;

// Owns metrics by name. Asking twice for the same name (and labels) returns
// the same metric; asking for an existing name as another kind throws
// InvalidArgument. Names must match [a-zA-Z_:][a-zA-Z0-9_:]*.
//
// A name may carry several series that differ in their labels
// (vllm:request_success_total{finished_reason="stop"} and
// {finished_reason="length"}): each is its own metric, rendered under one
// HELP and TYPE. The overloads without labels are the series with none.
//
//   auto& ok = registry.counter("vllm:request_success_total", "Finished requests",
//                               {{"model_name", "smollm2"}, {"finished_reason", "stop"}});
class MetricsRegistry {
 public:
  MetricsRegistry();
  ~MetricsRegistry();
  MetricsRegistry(const MetricsRegistry&) = delete;
  MetricsRegistry& operator=(const MetricsRegistry&) = delete;

  Counter& counter(const std::string& name, const std::string& help);
  Gauge& gauge(const std::string& name, const std::string& help);
  Histogram& histogram(const std::string& name, const std::string& help,
                       std::vector<double> bounds);
  // The series of `name` with `labels` (InvalidArgument for a bad label
  // name). A histogram's bounds are those of its first series.
  Counter& counter(const std::string& name, const std::string& help, const MetricLabels& labels);
  Gauge& gauge(const std::string& name, const std::string& help, const MetricLabels& labels);
  Histogram& histogram(const std::string& name, const std::string& help, std::vector<double> bounds,
                       const MetricLabels& labels);

  // Prometheus text format, metrics sorted by name, then series by their
  // rendered labels.
  std::string to_prometheus() const;

 private:
  struct Entry;
  Entry& find_or_add(const std::string& name, const std::string& help, int kind);
  mutable std::mutex mu_;
  std::map<std::string, std::unique_ptr<Entry>> entries_;  // guarded by mu_
};

}  // namespace tessera
