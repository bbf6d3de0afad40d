#include "tessera/core/metrics.h"

#include <algorithm>
#include <cmath>
#include <iomanip>
#include <sstream>

#include "tessera/core/error.h"

namespace tessera {
namespace {

void atomic_add(std::atomic<double>& target, double by) {
  double old = target.load(std::memory_order_relaxed);
  while (!target.compare_exchange_weak(old, old + by, std::memory_order_relaxed)) {
  }
}

bool valid_name(const std::string& name) {
  if (name.empty()) return false;
  auto head = [](char c) { return std::isalpha(static_cast<unsigned char>(c)) || c == '_' || c == ':'; };
  if (!head(name[0])) return false;
  return std::all_of(name.begin(), name.end(), [&](char c) {
    return head(c) || std::isdigit(static_cast<unsigned char>(c));
  });
}

// Prometheus float formatting: integers without exponent, +Inf spelled out.
std::string format_value(double v) {
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  if (std::isnan(v)) return "NaN";
  std::ostringstream out;
  out << std::setprecision(17) << v;
  return out.str();
}

std::string escape_help(const std::string& help) {
  std::string out;
  for (char c : help) {
    if (c == '\\') out += "\\\\";
    else if (c == '\n') out += "\\n";
    else out += c;
  }
  return out;
}

enum Kind { kCounter = 0, kGauge = 1, kHistogram = 2 };
const char* kind_name(int kind) {
  return kind == kCounter ? "counter" : kind == kGauge ? "gauge" : "histogram";
}

}  // namespace

void Counter::increment(double by) {
  TESSERA_CHECK(by >= 0, InvalidArgument, "counter increment must be non-negative, got ", by);
  atomic_add(value_, by);
}

void Gauge::add(double by) { atomic_add(value_, by); }

Histogram::Histogram(std::vector<double> bounds) : bounds_(std::move(bounds)) {
  TESSERA_CHECK(std::is_sorted(bounds_.begin(), bounds_.end()) &&
                    std::adjacent_find(bounds_.begin(), bounds_.end()) == bounds_.end(),
                InvalidArgument, "histogram bounds must be strictly increasing");
  buckets_.assign(bounds_.size() + 1, 0);
}

void Histogram::observe(double v) {
  size_t bucket = std::lower_bound(bounds_.begin(), bounds_.end(), v) - bounds_.begin();
  std::lock_guard<std::mutex> lock(mu_);
  ++buckets_[bucket];
  sum_ += v;
  ++count_;
}

Histogram::Snapshot Histogram::snapshot() const {
  Snapshot snap;
  snap.bounds = bounds_;
  std::lock_guard<std::mutex> lock(mu_);
  uint64_t running = 0;
  for (uint64_t b : buckets_) {
    running += b;
    snap.cumulative.push_back(running);
  }
  snap.sum = sum_;
  snap.count = count_;
  return snap;
}

struct MetricsRegistry::Entry {
  int kind;
  std::string help;
  std::unique_ptr<Counter> counter;
  std::unique_ptr<Gauge> gauge;
  std::unique_ptr<Histogram> histogram;
};

MetricsRegistry::MetricsRegistry() = default;
MetricsRegistry::~MetricsRegistry() = default;

MetricsRegistry::Entry& MetricsRegistry::find_or_add(const std::string& name,
                                                     const std::string& help, int kind) {
  TESSERA_CHECK(valid_name(name), InvalidArgument, "invalid metric name '", name, "'");
  auto it = entries_.find(name);
  if (it != entries_.end()) {
    TESSERA_CHECK(it->second->kind == kind, InvalidArgument, "metric '", name,
                  "' already registered as a ", kind_name(it->second->kind));
    return *it->second;
  }
  auto entry = std::make_unique<Entry>();
  entry->kind = kind;
  entry->help = help;
  return *entries_.emplace(name, std::move(entry)).first->second;
}

Counter& MetricsRegistry::counter(const std::string& name, const std::string& help) {
  std::lock_guard<std::mutex> lock(mu_);
  Entry& e = find_or_add(name, help, kCounter);
  if (!e.counter) e.counter = std::make_unique<Counter>();
  return *e.counter;
}

Gauge& MetricsRegistry::gauge(const std::string& name, const std::string& help) {
  std::lock_guard<std::mutex> lock(mu_);
  Entry& e = find_or_add(name, help, kGauge);
  if (!e.gauge) e.gauge = std::make_unique<Gauge>();
  return *e.gauge;
}

Histogram& MetricsRegistry::histogram(const std::string& name, const std::string& help,
                                      std::vector<double> bounds) {
  std::lock_guard<std::mutex> lock(mu_);
  Entry& e = find_or_add(name, help, kHistogram);
  if (!e.histogram) e.histogram = std::make_unique<Histogram>(std::move(bounds));
  return *e.histogram;
}

std::string MetricsRegistry::to_prometheus() const {
  std::ostringstream out;
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& [name, e] : entries_) {
    out << "# HELP " << name << " " << escape_help(e->help) << "\n";
    out << "# TYPE " << name << " " << kind_name(e->kind) << "\n";
    if (e->kind == kCounter) {
      out << name << " " << format_value(e->counter->value()) << "\n";
    } else if (e->kind == kGauge) {
      out << name << " " << format_value(e->gauge->value()) << "\n";
    } else {
      auto snap = e->histogram->snapshot();
      for (size_t i = 0; i < snap.bounds.size(); ++i) {
        out << name << "_bucket{le=\"" << format_value(snap.bounds[i]) << "\"} "
            << snap.cumulative[i] << "\n";
      }
      out << name << "_bucket{le=\"+Inf\"} " << snap.cumulative.back() << "\n";
      out << name << "_sum " << format_value(snap.sum) << "\n";
      out << name << "_count " << snap.count << "\n";
    }
  }
  return out.str();
}

}  // namespace tessera
