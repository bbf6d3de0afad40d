#include "tessera/sim/overlap.h"

#include <xgboost/c_api.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <map>
#include <mutex>
#include <numeric>
#include <random>
#include <set>
#include <sstream>

#include "json_reader.h"
#include "tessera/core/error.h"
#include "tessera/core/file_io.h"
#include "util.h"

namespace tessera::sim {

using detail::json;
using detail::JsonObject;

namespace {

constexpr const char* kModelSchema = "tessera.sim.overlap/1";
constexpr const char* kSamplesSchema = "tessera.sim.overlap_samples/1";
constexpr CollectiveKind kCommKinds[] = {CollectiveKind::kAllReduce,     CollectiveKind::kAllGather,
                                         CollectiveKind::kReduceScatter, CollectiveKind::kAllToAll,
                                         CollectiveKind::kBroadcast,     CollectiveKind::kSendRecv};

void check_features(const OverlapFeatures& f, const std::string& where) {
  auto nonneg = [&](const char* name, double v) {
    TESSERA_CHECK(std::isfinite(v) && v >= 0, InvalidArgument, where, ": feature '", name,
                  "' must be a finite number >= 0, got ", v);
  };
  nonneg("compute_flops", f.compute_flops);
  nonneg("compute_duration_us", f.compute_duration_us);
  nonneg("comm_bytes", f.comm_bytes);
  TESSERA_CHECK(f.comm_ranks >= 1, InvalidArgument, where,
                ": feature 'comm_ranks' must be >= 1, got ", f.comm_ranks);
  TESSERA_CHECK(f.concurrent_comms >= 0, InvalidArgument, where,
                ": feature 'concurrent_comms' must be >= 0, got ", f.concurrent_comms);
  TESSERA_CHECK(f.comm_threads >= 0, InvalidArgument, where,
                ": feature 'comm_threads' must be >= 0, got ", f.comm_threads);
  TESSERA_CHECK(
      std::isfinite(f.overlap_fraction) && f.overlap_fraction >= 0 && f.overlap_fraction <= 1,
      InvalidArgument, where, ": feature 'overlap_fraction' must be in [0, 1], got ",
      f.overlap_fraction);
}

void check_samples(const std::vector<OverlapSample>& samples) {
  TESSERA_CHECK(!samples.empty(), InvalidArgument, "overlap fit: no samples");
  for (size_t i = 0; i < samples.size(); ++i) {
    const std::string where =
        samples[i].origin.empty() ? "sample " + std::to_string(i) : samples[i].origin;
    check_features(samples[i].features, where);
    TESSERA_CHECK(std::isfinite(samples[i].slowdown) && samples[i].slowdown > 0, InvalidArgument,
                  where, ": slowdown must be > 0, got ", samples[i].slowdown);
  }
}

// The numeric encoding shared by both models (order documented in the
// header): log-scaled sizes, counts, one-hot compute kind over the training
// vocabulary, one-hot communication kind. overlap_fraction is not included.
class Encoder {
 public:
  Encoder() = default;
  explicit Encoder(std::vector<std::string> vocabulary) : kinds_(std::move(vocabulary)) {
    std::sort(kinds_.begin(), kinds_.end());
    kinds_.erase(std::unique(kinds_.begin(), kinds_.end()), kinds_.end());
  }
  static Encoder from_samples(const std::vector<OverlapSample>& samples) {
    std::vector<std::string> kinds;
    for (const OverlapSample& s : samples) kinds.push_back(s.features.compute_kind);
    return Encoder(std::move(kinds));
  }
  const std::vector<std::string>& vocabulary() const { return kinds_; }
  size_t width() const { return 6 + kinds_.size() + std::size(kCommKinds); }

  std::vector<double> encode(const OverlapFeatures& f) const {
    std::vector<double> x;
    x.reserve(width());
    x.push_back(std::log2(1 + f.compute_flops));
    x.push_back(std::log2(1 + f.compute_duration_us));
    x.push_back(std::log2(1 + f.comm_bytes));
    x.push_back(f.comm_ranks);
    x.push_back(f.concurrent_comms);
    x.push_back(f.comm_threads);
    for (const std::string& k : kinds_) x.push_back(k == f.compute_kind ? 1.0 : 0.0);
    for (CollectiveKind c : kCommKinds) x.push_back(c == f.comm_kind ? 1.0 : 0.0);
    return x;
  }

 private:
  std::vector<std::string> kinds_;
};

// Solves (A + ridge·I) w = b after scaling A to a unit diagonal (the
// log-size features and the one-hot ones differ in scale by ~30x, their
// squares by ~1000x), by Gaussian elimination with partial pivoting.
// Internal error when singular even with the ridge.
std::vector<double> solve_ridge(std::vector<std::vector<double>> a, std::vector<double> b,
                                double ridge) {
  const size_t n = b.size();
  std::vector<double> scale(n, 1.0);
  for (size_t i = 0; i < n; ++i) {
    if (a[i][i] > 0) scale[i] = std::sqrt(a[i][i]);
  }
  for (size_t i = 0; i < n; ++i) {
    for (size_t j = 0; j < n; ++j) a[i][j] /= scale[i] * scale[j];
    b[i] /= scale[i];
    a[i][i] += std::max(ridge, 1e-300);
  }
  for (size_t col = 0; col < n; ++col) {
    size_t pivot = col;
    for (size_t r = col + 1; r < n; ++r) {
      if (std::fabs(a[r][col]) > std::fabs(a[pivot][col])) pivot = r;
    }
    TESSERA_CHECK(std::fabs(a[pivot][col]) > 0, Internal, "linear overlap fit: singular system");
    std::swap(a[col], a[pivot]);
    std::swap(b[col], b[pivot]);
    for (size_t r = 0; r < n; ++r) {
      if (r == col || a[r][col] == 0) continue;
      const double f = a[r][col] / a[col][col];
      for (size_t j = col; j < n; ++j) a[r][j] -= f * a[col][j];
      b[r] -= f * b[col];
    }
  }
  std::vector<double> w(n);
  for (size_t i = 0; i < n; ++i) w[i] = b[i] / a[i][i] / scale[i];
  return w;
}

class LinearOverlapModel : public OverlapModel {
 public:
  LinearOverlapModel(Encoder encoder, std::vector<double> weights)
      : encoder_(std::move(encoder)), weights_(std::move(weights)) {
    TESSERA_CHECK(weights_.size() == encoder_.width() + 1, InvalidArgument,
                  "linear overlap model: expected ", encoder_.width() + 1, " weights, got ",
                  weights_.size());
  }

  double predict(const OverlapFeatures& f) const override {
    check_features(f, "overlap features");
    const std::vector<double> x = encoder_.encode(f);
    double g = weights_[0];
    for (size_t i = 0; i < x.size(); ++i) g += weights_[i + 1] * x[i];
    return std::max(1.0, 1.0 + f.overlap_fraction * g);
  }
  std::string kind() const override { return "linear"; }
  std::string to_json() const override {
    json j = {{"schema", kModelSchema},
              {"kind", "linear"},
              {"compute_kinds", encoder_.vocabulary()},
              {"weights", weights_}};
    return j.dump(1) + "\n";
  }

 private:
  Encoder encoder_;
  std::vector<double> weights_;  // [bias, one per encoded feature]
};

#define TESSERA_XGB_CHECK(call)                                                            \
  do {                                                                                     \
    if ((call) != 0) TESSERA_THROW(Internal, "xgboost: ", #call, ": ", XGBGetLastError()); \
  } while (0)

struct BoosterDeleter {
  void operator()(void* h) const {
    if (h) XGBoosterFree(h);
  }
};
struct DMatrixDeleter {
  void operator()(void* h) const {
    if (h) XGDMatrixFree(h);
  }
};
using BoosterPtr = std::unique_ptr<void, BoosterDeleter>;
using DMatrixPtr = std::unique_ptr<void, DMatrixDeleter>;

DMatrixPtr make_dmatrix(const std::vector<float>& values, size_t rows, size_t cols) {
  DMatrixHandle h = nullptr;
  TESSERA_XGB_CHECK(XGDMatrixCreateFromMat(values.data(), rows, cols, std::nanf(""), &h));
  return DMatrixPtr(h);
}

class XGBoostOverlapModel : public OverlapModel {
 public:
  XGBoostOverlapModel(Encoder encoder, BoosterPtr booster)
      : encoder_(std::move(encoder)), booster_(std::move(booster)) {}

  double predict(const OverlapFeatures& f) const override {
    check_features(f, "overlap features");
    std::vector<float> row = row_of(encoder_, f);
    std::lock_guard<std::mutex> lock(mu_);
    DMatrixPtr m = make_dmatrix(row, 1, row.size());
    bst_ulong len = 0;
    const float* out = nullptr;
    TESSERA_XGB_CHECK(XGBoosterPredict(booster_.get(), m.get(), 0, 0, 0, &len, &out));
    TESSERA_CHECK(len == 1, Internal, "xgboost: expected one prediction, got ", len);
    return std::max(1.0, static_cast<double>(out[0]));
  }
  std::string kind() const override { return "xgboost"; }
  std::string to_json() const override {
    std::lock_guard<std::mutex> lock(mu_);
    bst_ulong len = 0;
    const char* data = nullptr;
    TESSERA_XGB_CHECK(
        XGBoosterSaveModelToBuffer(booster_.get(), R"({"format": "json"})", &len, &data));
    json booster = json::parse(std::string(data, len));
    json j = {{"schema", kModelSchema},
              {"kind", "xgboost"},
              {"compute_kinds", encoder_.vocabulary()},
              {"booster", std::move(booster)}};
    return j.dump() + "\n";
  }

  static std::vector<float> row_of(const Encoder& encoder, const OverlapFeatures& f) {
    std::vector<double> x = encoder.encode(f);
    std::vector<float> row(x.begin(), x.end());
    row.push_back(static_cast<float>(f.overlap_fraction));
    return row;
  }

 private:
  Encoder encoder_;
  BoosterPtr booster_;
  mutable std::mutex mu_;  // guards booster_ (XGBoost predictions are not re-entrant)
};

BoosterPtr booster_from_json(const json& booster, const std::string& where) {
  BoosterHandle h = nullptr;
  TESSERA_XGB_CHECK(XGBoosterCreate(nullptr, 0, &h));
  BoosterPtr ptr(h);
  const std::string text = booster.dump();
  if (XGBoosterLoadModelFromBuffer(h, text.data(), text.size()) != 0) {
    TESSERA_THROW(InvalidArgument, where,
                  ": field 'booster': XGBoost cannot load it: ", XGBGetLastError());
  }
  return ptr;
}

// Applies one named column of a CSV row or JSON sample to `s`.
void set_field(OverlapSample& s, const std::string& key, const std::string& text,
               const std::string& where) {
  auto number = [&]() {
    size_t used = 0;
    double v = 0;
    try {
      v = std::stod(text, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    TESSERA_CHECK(used == text.size() && !text.empty() && std::isfinite(v), InvalidArgument, where,
                  ": column '", key, "': expected a number, got '", text, "'");
    return v;
  };
  auto integer = [&]() {
    const double v = number();
    TESSERA_CHECK(v == std::floor(v) && std::fabs(v) < 1e9, InvalidArgument, where, ": column '",
                  key, "': expected an integer, got '", text, "'");
    return static_cast<int>(v);
  };
  OverlapFeatures& f = s.features;
  if (key == "compute_kind") {
    TESSERA_CHECK(!text.empty(), InvalidArgument, where, ": column 'compute_kind' is empty");
    f.compute_kind = text;
  } else if (key == "compute_flops") {
    f.compute_flops = number();
  } else if (key == "compute_duration_us") {
    f.compute_duration_us = number();
  } else if (key == "comm_kind") {
    try {
      f.comm_kind = parse_collective_kind(text);
    } catch (const InvalidArgument& e) {
      TESSERA_THROW(InvalidArgument, where, ": column 'comm_kind': ", e.message());
    }
  } else if (key == "comm_bytes") {
    f.comm_bytes = number();
  } else if (key == "comm_ranks") {
    f.comm_ranks = integer();
  } else if (key == "concurrent_comms") {
    f.concurrent_comms = integer();
  } else if (key == "comm_threads") {
    f.comm_threads = integer();
  } else if (key == "overlap_fraction") {
    f.overlap_fraction = number();
  } else if (key == "slowdown") {
    s.slowdown = number();
  } else {
    TESSERA_THROW(InvalidArgument, where, ": unknown column '", key,
                  "' (expected compute_kind, compute_flops, compute_duration_us, comm_kind, "
                  "comm_bytes, comm_ranks, concurrent_comms, comm_threads, overlap_fraction, "
                  "slowdown)");
  }
}

const char* const kRequired[] = {"compute_kind", "compute_duration_us", "comm_kind",
                                 "comm_bytes",   "overlap_fraction",    "slowdown"};

std::string read_text(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  TESSERA_CHECK(in.good(), NotFound, "cannot open ", what, " '", path, "'");
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

}  // namespace

void OverlapModel::save_file(const std::string& path) const {
  const std::string text = to_json();
  AtomicFileWriter writer(path);
  writer.append(text.data(), text.size());
  writer.commit();
}

std::unique_ptr<OverlapModel> parse_overlap_model(std::string_view text,
                                                  const std::string& source) {
  const json root = detail::parse_json(text, source);
  JsonObject top(root, source);
  const std::string schema = top.get_string("schema");
  if (schema != kModelSchema) {
    top.fail("schema", "expected '" + std::string(kModelSchema) + "', got '" + schema + "'");
  }
  const std::string kind = top.get_string("kind");
  std::vector<std::string> vocabulary;
  for (const json& k : top.get_array("compute_kinds")) {
    if (!k.is_string()) top.fail("compute_kinds", "expected strings, found " + k.dump());
    vocabulary.push_back(k.get<std::string>());
  }
  Encoder encoder(vocabulary);
  std::unique_ptr<OverlapModel> model;
  if (kind == "linear") {
    std::vector<double> weights;
    for (const json& w : top.get_array("weights")) {
      if (!w.is_number()) top.fail("weights", "expected numbers, found " + w.dump());
      weights.push_back(w.get<double>());
    }
    if (weights.size() != encoder.width() + 1) {
      top.fail("weights", "expected " + std::to_string(encoder.width() + 1) + " weights for " +
                              std::to_string(vocabulary.size()) + " compute kinds, got " +
                              std::to_string(weights.size()));
    }
    model = std::make_unique<LinearOverlapModel>(std::move(encoder), std::move(weights));
  } else if (kind == "xgboost") {
    const json& booster = top.at("booster");
    if (!booster.is_object()) top.fail("booster", "expected an XGBoost JSON model object");
    model = std::make_unique<XGBoostOverlapModel>(std::move(encoder),
                                                  booster_from_json(booster, top.where()));
  } else {
    top.fail("kind", "expected 'linear' or 'xgboost', got '" + kind + "'");
  }
  top.check_keys();
  return model;
}

std::unique_ptr<OverlapModel> load_overlap_model(const std::string& path) {
  return parse_overlap_model(read_text(path, "overlap model"), path);
}

std::unique_ptr<OverlapModel> fit_linear_overlap(const std::vector<OverlapSample>& samples,
                                                 const LinearOverlapOptions& options) {
  check_samples(samples);
  TESSERA_CHECK(options.ridge >= 0, InvalidArgument, "linear overlap fit: ridge must be >= 0");
  Encoder encoder = Encoder::from_samples(samples);
  const size_t d = encoder.width() + 1;
  std::vector<std::vector<double>> a(d, std::vector<double>(d, 0));
  std::vector<double> b(d, 0);
  for (const OverlapSample& s : samples) {
    const std::vector<double> x = encoder.encode(s.features);
    std::vector<double> z(d);
    const double f = s.features.overlap_fraction;
    z[0] = f;
    for (size_t i = 0; i < x.size(); ++i) z[i + 1] = f * x[i];
    const double y = s.slowdown - 1;
    for (size_t i = 0; i < d; ++i) {
      if (z[i] == 0) continue;
      for (size_t j = 0; j < d; ++j) a[i][j] += z[i] * z[j];
      b[i] += z[i] * y;
    }
  }
  std::vector<double> w = solve_ridge(std::move(a), std::move(b), options.ridge);
  return std::make_unique<LinearOverlapModel>(std::move(encoder), std::move(w));
}

std::unique_ptr<OverlapModel> fit_xgboost_overlap(const std::vector<OverlapSample>& samples,
                                                  const XGBoostOverlapOptions& options) {
  check_samples(samples);
  TESSERA_CHECK(options.rounds >= 1 && options.max_depth >= 1 && options.eta > 0 &&
                    options.subsample > 0 && options.subsample <= 1 && options.threads >= 1,
                InvalidArgument,
                "xgboost overlap fit: need rounds >= 1, max_depth >= 1, eta > 0, subsample in "
                "(0, 1], threads >= 1");
  Encoder encoder = Encoder::from_samples(samples);
  const size_t cols = encoder.width() + 1;
  std::vector<float> values;
  values.reserve(samples.size() * cols);
  std::vector<float> labels;
  double mean = 0;
  for (const OverlapSample& s : samples) {
    std::vector<float> row = XGBoostOverlapModel::row_of(encoder, s.features);
    values.insert(values.end(), row.begin(), row.end());
    labels.push_back(static_cast<float>(s.slowdown));
    mean += s.slowdown;
  }
  mean /= static_cast<double>(samples.size());
  DMatrixPtr train = make_dmatrix(values, samples.size(), cols);
  TESSERA_XGB_CHECK(XGDMatrixSetFloatInfo(train.get(), "label", labels.data(), labels.size()));
  BoosterHandle h = nullptr;
  DMatrixHandle dm[] = {train.get()};
  TESSERA_XGB_CHECK(XGBoosterCreate(dm, 1, &h));
  BoosterPtr booster(h);
  const std::pair<std::string, std::string> params[] = {
      {"objective", "reg:squarederror"},
      {"max_depth", std::to_string(options.max_depth)},
      {"eta", detail::format("%.17g", options.eta)},
      {"subsample", detail::format("%.17g", options.subsample)},
      {"min_child_weight", detail::format("%.17g", options.min_child_weight)},
      {"lambda", detail::format("%.17g", options.lambda)},
      {"nthread", std::to_string(options.threads)},
      {"seed", std::to_string(options.seed)},
      {"base_score", detail::format("%.17g", mean)},
      {"verbosity", "0"}};
  for (const auto& [key, value] : params) {
    TESSERA_XGB_CHECK(XGBoosterSetParam(h, key.c_str(), value.c_str()));
  }
  for (int round = 0; round < options.rounds; ++round) {
    TESSERA_XGB_CHECK(XGBoosterUpdateOneIter(h, round, train.get()));
  }
  return std::make_unique<XGBoostOverlapModel>(std::move(encoder), std::move(booster));
}

std::vector<OverlapSample> parse_overlap_csv(std::string_view text, const std::string& source) {
  std::vector<std::string> header;
  std::vector<OverlapSample> out;
  std::istringstream in{std::string(text)};
  std::string line;
  int line_no = 0;
  auto split = [](const std::string& l) {
    std::vector<std::string> cells;
    std::string cell;
    std::istringstream cs(l);
    while (std::getline(cs, cell, ',')) {
      size_t b = cell.find_first_not_of(" \t\r");
      size_t e = cell.find_last_not_of(" \t\r");
      cells.push_back(b == std::string::npos ? "" : cell.substr(b, e - b + 1));
    }
    if (!l.empty() && l.back() == ',') cells.push_back("");
    return cells;
  };
  while (std::getline(in, line)) {
    ++line_no;
    if (line.find_first_not_of(" \t\r") == std::string::npos || line[0] == '#') continue;
    const std::string where = source + ":" + std::to_string(line_no);
    std::vector<std::string> cells = split(line);
    if (header.empty()) {
      std::set<std::string> seen;
      OverlapSample probe;
      for (const std::string& name : cells) {
        TESSERA_CHECK(seen.insert(name).second, InvalidArgument, where, ": column '", name,
                      "' appears twice in the header");
        if (name == "compute_kind") continue;  // any text is valid; checked per row
        // Rejects unknown names now, not on the first row.
        set_field(probe, name, name == "comm_kind" ? "all_reduce" : "1", where);
      }
      for (const char* required : kRequired) {
        TESSERA_CHECK(seen.count(required) > 0, InvalidArgument, where,
                      ": header lacks the required column '", required, "'");
      }
      header = std::move(cells);
      continue;
    }
    TESSERA_CHECK(cells.size() == header.size(), InvalidArgument, where, ": expected ",
                  header.size(), " columns, got ", cells.size());
    OverlapSample s;
    s.origin = where;
    for (size_t i = 0; i < cells.size(); ++i) set_field(s, header[i], cells[i], where);
    check_features(s.features, where);
    TESSERA_CHECK(s.slowdown > 0, InvalidArgument, where, ": column 'slowdown' must be > 0, got ",
                  s.slowdown);
    out.push_back(std::move(s));
  }
  TESSERA_CHECK(!header.empty(), InvalidArgument, source, ": no header line");
  return out;
}

std::vector<OverlapSample> parse_overlap_json(std::string_view text, const std::string& source) {
  const json root = detail::parse_json(text, source);
  JsonObject top(root, source);
  const std::string schema = top.get_string("schema");
  if (schema != kSamplesSchema) {
    top.fail("schema", "expected '" + std::string(kSamplesSchema) + "', got '" + schema + "'");
  }
  std::vector<OverlapSample> out;
  const json& list = top.get_array("samples");
  for (size_t i = 0; i < list.size(); ++i) {
    JsonObject obj(list[i], source, "samples[" + std::to_string(i) + "]");
    OverlapSample s;
    s.origin = obj.where();
    for (const char* required : kRequired) {
      if (!obj.has(required)) obj.fail(required, "missing (required)");
    }
    for (const std::string& key : obj.keys()) {
      const json& v = obj.at(key);
      std::string text_value;
      if (v.is_string()) {
        text_value = v.get<std::string>();
      } else if (v.is_number()) {
        text_value = v.is_number_integer() ? std::to_string(v.get<int64_t>())
                                           : detail::format("%.17g", v.get<double>());
      } else {
        obj.fail(key, "expected a number or a string, got " + v.dump());
      }
      set_field(s, key, text_value, obj.where());
    }
    check_features(s.features, obj.where());
    if (!(s.slowdown > 0)) obj.fail("slowdown", "must be > 0");
    out.push_back(std::move(s));
  }
  top.check_keys();
  return out;
}

std::vector<OverlapSample> load_overlap_samples(const std::string& path) {
  const std::string text = read_text(path, "overlap measurements");
  const bool csv = path.size() >= 4 && path.compare(path.size() - 4, 4, ".csv") == 0;
  return csv ? parse_overlap_csv(text, path) : parse_overlap_json(text, path);
}

std::string overlap_samples_to_csv(const std::vector<OverlapSample>& samples) {
  std::string out =
      "compute_kind,compute_flops,compute_duration_us,comm_kind,comm_bytes,comm_ranks,"
      "concurrent_comms,comm_threads,overlap_fraction,slowdown\n";
  for (const OverlapSample& s : samples) {
    const OverlapFeatures& f = s.features;
    out += detail::format("%s,%.17g,%.17g,%s,%.17g,%d,%d,%d,%.17g,%.17g\n", f.compute_kind.c_str(),
                          f.compute_flops, f.compute_duration_us, collective_kind_name(f.comm_kind),
                          f.comm_bytes, f.comm_ranks, f.concurrent_comms, f.comm_threads,
                          f.overlap_fraction, s.slowdown);
  }
  return out;
}

OverlapError evaluate_overlap(const OverlapModel& model,
                              const std::vector<OverlapSample>& samples) {
  OverlapError e;
  e.samples = samples.size();
  if (samples.empty()) return e;
  double abs_sum = 0, sq = 0, rel = 0;
  for (const OverlapSample& s : samples) {
    const double d = model.predict(s.features) - s.slowdown;
    abs_sum += std::fabs(d);
    sq += d * d;
    rel += std::fabs(d) / s.slowdown;
    e.max_abs_error = std::max(e.max_abs_error, std::fabs(d));
  }
  const double n = static_cast<double>(samples.size());
  e.mean_abs_error = abs_sum / n;
  e.rms_error = std::sqrt(sq / n);
  e.mean_abs_rel_error = rel / n;
  return e;
}

SampleSplit split_samples(const std::vector<OverlapSample>& samples, double test_fraction,
                          uint64_t seed) {
  TESSERA_CHECK(test_fraction > 0 && test_fraction < 1, InvalidArgument,
                "split_samples: test_fraction must be in (0, 1), got ", test_fraction);
  const size_t n = samples.size();
  const size_t n_test = static_cast<size_t>(std::llround(test_fraction * static_cast<double>(n)));
  TESSERA_CHECK(n_test >= 1 && n_test < n, InvalidArgument, "split_samples: ", n,
                " samples cannot be split with test_fraction ", test_fraction);
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::mt19937_64 rng(seed);
  // Fisher-Yates with our own index draw: std::shuffle's sequence differs
  // between standard libraries, this one does not.
  for (size_t i = n - 1; i > 0; --i) {
    const size_t j = static_cast<size_t>(rng() % (i + 1));
    std::swap(order[i], order[j]);
  }
  SampleSplit out;
  for (size_t i = 0; i < n; ++i) {
    (i < n_test ? out.test : out.train).push_back(samples[order[i]]);
  }
  return out;
}

}  // namespace tessera::sim
