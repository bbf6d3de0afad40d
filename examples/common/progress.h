// A progress line for loops that run longer than a few seconds: steps done,
// the last loss, the rate and the time left, at most every `interval`
// seconds (and at the end).
//
//   tessera::examples::Progress progress("pretraining", steps);
//   for (int64_t s = 0; s < steps; ++s) progress.step(trainer.step(x, y).loss);
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>

#include "tessera/core/metrics.h"

namespace tessera::examples {

class Progress {
 public:
  Progress(std::string what, int64_t total, double interval_seconds = 5.0)
      : what_(std::move(what)), total_(total), interval_(interval_seconds) {}

  // One step done; `loss` < 0: none to show.
  void step(double loss = -1) {
    ++done_;
    const double now = watch_.seconds();
    if (done_ < total_ && now - last_ < interval_) return;
    last_ = now;
    const double rate = static_cast<double>(done_) / now;
    const double left = rate > 0 ? static_cast<double>(total_ - done_) / rate : 0;
    std::printf("  %s: step %lld/%lld", what_.c_str(), static_cast<long long>(done_),
                static_cast<long long>(total_));
    if (loss >= 0) std::printf("  loss %.3f", loss);
    std::printf("  %.1f steps/s  %.0f s elapsed, ~%.0f s left\n", rate, now, left);
    std::fflush(stdout);
  }

 private:
  std::string what_;
  int64_t total_;
  double interval_;
  int64_t done_ = 0;
  double last_ = 0;
  Stopwatch watch_;
};

}  // namespace tessera::examples
