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
  auto head = [](char c) {
    return std::isalpha(static_cast<unsigned char>(c)) || c == '_' || c == ':';
  };
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
    if (c == '\\')
      out += "\\\\";
    else if (c == '\n')
      out += "\\n";
    else
      out += c;
  }
  return out;
}

bool valid_label_name(const std::string& name) {
  if (name.empty() || name.rfind("__", 0) == 0) return false;
  auto head = [](char c) { return std::isalpha(static_cast<unsigned char>(c)) || c == '_'; };
  if (!head(name[0])) return false;
  return std::all_of(name.begin(), name.end(), [&](char c) {
    return head(c) || std::isdigit(static_cast<unsigned char>(c));
  });
}

std::string escape_label_value(const std::string& value) {
  std::string out;
  for (char c : value) {
    if (c == '\\')
      out += "\\\\";
    else if (c == '"')
      out += "\\\"";
    else if (c == '\n')
      out += "\\n";
    else
      out += c;
  }
  return out;
}

// The pairs inside the braces, rendered: a="x",b="y" ("" without labels).
std::string render_labels(const MetricLabels& labels, bool histogram) {
  std::string out;
  for (const auto& [name, value] : labels) {
    TESSERA_CHECK(valid_label_name(name) && !(histogram && name == "le"), InvalidArgument,
                  "invalid metric label name '", name, "'");
    out += (out.empty() ? "" : ",") + name + "=\"" + escape_label_value(value) + "\"";
  }
  return out;
}

// name{labels} or name{labels,extra}, without braces when both are empty.
std::string series(const std::string& name, const std::string& labels,
                   const std::string& extra = "") {
  std::string inside = labels;
  if (!extra.empty()) inside += (inside.empty() ? "" : ",") + extra;
  return inside.empty() ? name : name + "{" + inside + "}";
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
  // Series by rendered labels ("" : none).
  std::map<std::string, std::unique_ptr<Counter>> counters;
  std::map<std::string, std::unique_ptr<Gauge>> gauges;
  std::map<std::string, std::unique_ptr<Histogram>> histograms;
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
  return counter(name, help, MetricLabels{});
}

Gauge& MetricsRegistry::gauge(const std::string& name, const std::string& help) {
  return gauge(name, help, MetricLabels{});
}

Histogram& MetricsRegistry::histogram(const std::string& name, const std::string& help,
                                      std::vector<double> bounds) {
  return histogram(name, help, std::move(bounds), MetricLabels{});
}

Counter& MetricsRegistry::counter(const std::string& name, const std::string& help,
                                  const MetricLabels& labels) {
  const std::string key = render_labels(labels, false);
  std::lock_guard<std::mutex> lock(mu_);
  Entry& e = find_or_add(name, help, kCounter);
  auto& c = e.counters[key];
  if (!c) c = std::make_unique<Counter>();
  return *c;
}

Gauge& MetricsRegistry::gauge(const std::string& name, const std::string& help,
                              const MetricLabels& labels) {
  const std::string key = render_labels(labels, false);
  std::lock_guard<std::mutex> lock(mu_);
  Entry& e = find_or_add(name, help, kGauge);
  auto& g = e.gauges[key];
  if (!g) g = std::make_unique<Gauge>();
  return *g;
}

Histogram& MetricsRegistry::histogram(const std::string& name, const std::string& help,
                                      std::vector<double> bounds, const MetricLabels& labels) {
  const std::string key = render_labels(labels, true);
  std::lock_guard<std::mutex> lock(mu_);
  Entry& e = find_or_add(name, help, kHistogram);
  auto& h = e.histograms[key];
  if (!h) h = std::make_unique<Histogram>(std::move(bounds));
  return *h;
}

std::string MetricsRegistry::to_prometheus() const {
  std::ostringstream out;
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& [name, e] : entries_) {
    out << "# HELP " << name << " " << escape_help(e->help) << "\n";
    out << "# TYPE " << name << " " << kind_name(e->kind) << "\n";
    for (const auto& [labels, c] : e->counters) {
      out << series(name, labels) << " " << format_value(c->value()) << "\n";
    }
    for (const auto& [labels, g] : e->gauges) {
      out << series(name, labels) << " " << format_value(g->value()) << "\n";
    }
    for (const auto& [labels, h] : e->histograms) {
      auto snap = h->snapshot();
      for (size_t i = 0; i < snap.bounds.size(); ++i) {
        out << series(name + "_bucket", labels, "le=\"" + format_value(snap.bounds[i]) + "\"")
            << " " << snap.cumulative[i] << "\n";
      }
      out << series(name + "_bucket", labels, "le=\"+Inf\"") << " " << snap.cumulative.back()
          << "\n";
      out << series(name + "_sum", labels) << " " << format_value(snap.sum) << "\n";
      out << series(name + "_count", labels) << " " << snap.count << "\n";
    }
  }
  return out.str();
}

}  // namespace tessera
