// tessera-eval's progress display: one bar per task on stderr.
//
//   ProgressBar bar("yue_gsm8k_0shot");
//   options.on_progress = [&](const eval::RunProgress& p) { bar.update(p); };
//   ...
//   bar.finish();
//
// On a terminal the bar redraws in place, tqdm style:
//   yue_gsm8k_0shot |██████████░░░░░░░░░░| 25/50 [00:31<00:31, 0.80 it/s]
// otherwise (a log file) it prints a line at most every `interval` seconds
// and at the end. The rate counts documents evaluated in this run (resumed
// ones are shown but not timed). Not thread-safe (one task at a time).
#pragma once

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <string>

#include "tessera/eval/evaluator.h"

namespace tessera::tools {

class ProgressBar {
 public:
  explicit ProgressBar(std::string label, double interval_seconds = 30.0)
      : label_(std::move(label)), interval_(interval_seconds), tty_(isatty(2) == 1) {}

  void update(const eval::RunProgress& p) {
    last_ = p;
    if (tty_) {
      draw();
      return;
    }
    if (p.done == p.total || p.seconds - printed_at_ >= interval_ || !started_) {
      printed_at_ = p.seconds;
      started_ = true;
      std::fprintf(stderr, "%s\n", line().c_str());
    }
  }

  // Ends the bar's line (terminal) or prints the final line.
  void finish() {
    if (tty_) {
      draw();
      std::fputc('\n', stderr);
    } else if (last_.done != last_.total || printed_at_ != last_.seconds) {
      std::fprintf(stderr, "%s\n", line().c_str());
    }
    std::fflush(stderr);
  }

 private:
  static std::string clock(double seconds) {
    const long s = static_cast<long>(seconds + 0.5);
    char buf[32];
    if (s >= 3600) {
      std::snprintf(buf, sizeof(buf), "%ld:%02ld:%02ld", s / 3600, (s / 60) % 60, s % 60);
    } else {
      std::snprintf(buf, sizeof(buf), "%02ld:%02ld", s / 60, s % 60);
    }
    return buf;
  }

  std::string line() const {
    const eval::RunProgress& p = last_;
    const size_t fresh = p.done - std::min(p.done, p.resumed);
    const double rate = p.seconds > 0 ? static_cast<double>(fresh) / p.seconds : 0.0;
    const double left = rate > 0 ? static_cast<double>(p.total - p.done) / rate : 0.0;
    constexpr int kWidth = 20;
    const int filled =
        p.total == 0 ? kWidth : static_cast<int>(kWidth * static_cast<double>(p.done) / p.total);
    std::string bar;
    for (int i = 0; i < kWidth; ++i) bar += i < filled ? "\u2588" : "\u2591";
    char tail[160];
    std::snprintf(tail, sizeof(tail), "| %zu/%zu [%s<%s, %.2f it/s]%s", p.done, p.total,
                  clock(p.seconds).c_str(), rate > 0 ? clock(left).c_str() : "?", rate,
                  p.resumed > 0 ? (" (" + std::to_string(p.resumed) + " resumed)").c_str() : "");
    return label_ + " |" + bar + tail;
  }

  void draw() {
    std::fprintf(stderr, "\r%s\x1b[K", line().c_str());
    std::fflush(stderr);
  }

  std::string label_;
  double interval_;
  bool tty_;
  bool started_ = false;
  double printed_at_ = 0;
  eval::RunProgress last_;
};

}  // namespace tessera::tools
