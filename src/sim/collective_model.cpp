#include "tessera/sim/collective_model.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <fstream>
#include <limits>
#include <map>
#include <set>
#include <sstream>

#include "json_reader.h"
#include "tessera/core/error.h"
#include "tessera/core/log.h"
#include "tessera/sim/host_sharing.h"
#include "util.h"

namespace tessera::sim {

using detail::json;
using detail::JsonObject;

namespace {

// GB/s -> bytes per microsecond.
constexpr double kBytesPerUsPerGbps = 1e3;
// A bandwidth whose inverse the fit drove to zero (the data cannot see the
// term) is stored as this value: large enough to be negligible, finite so
// the file stays valid JSON and passes validation.
constexpr double kUnseenBandwidthGbps = 1e6;

void check_shape(const GroupShape& s) {
  TESSERA_CHECK(s.ranks >= 1, InvalidArgument, "group shape: ranks must be >= 1, got ", s.ranks);
  TESSERA_CHECK(s.nodes >= 1 && s.nodes <= s.ranks, InvalidArgument,
                "group shape: nodes must be in [1, ranks = ", s.ranks, "], got ", s.nodes);
  const int min_m = (s.ranks + s.nodes - 1) / s.nodes;
  TESSERA_CHECK(s.max_ranks_per_node >= min_m && s.max_ranks_per_node <= s.ranks - s.nodes + 1,
                InvalidArgument, "group shape: max_ranks_per_node must be in [", min_m, ", ",
                s.ranks - s.nodes + 1, "] for ", s.ranks, " ranks on ", s.nodes, " nodes, got ",
                s.max_ranks_per_node);
}

// A GPU's share of its node's NICs when all m GPUs of the group in that node
// send off-node at once (direct algorithm).
double direct_nic_share(const GroupShape& shape, int nics_per_node) {
  return std::min(1.0, static_cast<double>(nics_per_node) / std::max(1, shape.max_ranks_per_node));
}

[[noreturn]] void cannot_run(CollectiveKind op, Algorithm algorithm, const GroupShape& shape) {
  TESSERA_THROW(InvalidArgument, "algorithm ", algorithm_name(algorithm), " cannot run ",
                collective_kind_name(op), " over ", shape.ranks, " rank(s)");
}

int ceil_log2(int k) {
  int bits = 0;
  while ((1 << bits) < k) ++bits;
  return bits;
}

double round_significant(double v, int digits) {
  if (v == 0 || !std::isfinite(v) || digits <= 0) return v;
  const double scale =
      std::pow(10.0, digits - 1 - static_cast<int>(std::floor(std::log10(std::fabs(v)))));
  return std::round(v * scale) / scale;
}

std::string trim(std::string_view s) {
  size_t b = 0, e = s.size();
  while (b < e && std::isspace(static_cast<unsigned char>(s[b]))) ++b;
  while (e > b && std::isspace(static_cast<unsigned char>(s[e - 1]))) --e;
  return std::string(s.substr(b, e - b));
}

std::vector<std::string> split_ws(std::string_view s) {
  std::vector<std::string> out;
  std::istringstream in{std::string(s)};
  std::string token;
  while (in >> token) out.push_back(token);
  return out;
}

std::string read_file(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  TESSERA_CHECK(in.good(), NotFound, "cannot open ", what, " '", path, "'");
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

std::string directory_of(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  return slash == std::string::npos ? "." : path.substr(0, slash);
}

}  // namespace

// ---------------------------------------------------------------------------
// Shapes and formulas.

GroupShape GroupShape::of(const std::vector<int>& members, int devices_per_node) {
  TESSERA_CHECK(!members.empty(), InvalidArgument, "group shape: empty group");
  TESSERA_CHECK(devices_per_node >= 1, InvalidArgument,
                "group shape: devices_per_node must be >= 1");
  std::map<int, int> per_node;
  std::set<int> distinct(members.begin(), members.end());
  for (int r : distinct) {
    TESSERA_CHECK(r >= 0, InvalidArgument, "group shape: negative rank ", r);
    ++per_node[r / devices_per_node];
  }
  GroupShape s;
  s.ranks = static_cast<int>(distinct.size());
  s.nodes = static_cast<int>(per_node.size());
  s.max_ranks_per_node = 0;
  for (const auto& [node, count] : per_node)
    s.max_ranks_per_node = std::max(s.max_ranks_per_node, count);
  return s;
}

GroupShape GroupShape::packed(int ranks, int devices_per_node) {
  TESSERA_CHECK(ranks >= 1, InvalidArgument, "group shape: ranks must be >= 1, got ", ranks);
  TESSERA_CHECK(devices_per_node >= 1, InvalidArgument,
                "group shape: devices_per_node must be >= 1");
  GroupShape s;
  s.ranks = ranks;
  s.nodes = (ranks + devices_per_node - 1) / devices_per_node;
  s.max_ranks_per_node = std::min(ranks, devices_per_node);
  return s;
}

CostTerms cost_terms(CollectiveKind op, Algorithm algorithm, const GroupShape& shape) {
  check_shape(shape);
  const double n = shape.ranks;
  const double k = shape.nodes;
  const double m = shape.max_ranks_per_node;
  const bool multi = shape.nodes > 1;
  CostTerms t;
  auto fail = [&]() { cannot_run(op, algorithm, shape); };
  switch (algorithm) {
    case Algorithm::kLocal:
      if (shape.ranks != 1) fail();
      t.bytes_factor = 1;
      return t;
    case Algorithm::kRing: {
      if (shape.ranks < 2) fail();
      switch (op) {
        case CollectiveKind::kAllReduce: {
          const double steps = 2 * (n - 1);
          t.inter_steps = multi ? std::min(2 * k, steps) : 0;
          t.intra_steps = steps - t.inter_steps;
          t.bytes_factor = 2 * (n - 1) / n;
          t.reduce_factor = (n - 1) / n;
          return t;
        }
        case CollectiveKind::kAllGather:
        case CollectiveKind::kReduceScatter:
        case CollectiveKind::kBroadcast: {
          const double steps = n - 1;
          t.inter_steps = multi ? std::min(k, steps) : 0;
          t.intra_steps = steps - t.inter_steps;
          t.bytes_factor = op == CollectiveKind::kBroadcast ? 1.0 : (n - 1) / n;
          t.reduce_factor = op == CollectiveKind::kReduceScatter ? (n - 1) / n : 0.0;
          return t;
        }
        default:
          cannot_run(op, algorithm, shape);
      }
    }
    case Algorithm::kTree:
      if (op != CollectiveKind::kAllReduce || shape.ranks < 2) fail();
      t.intra_steps = 2 * (m - 1);
      t.inter_steps = 2.0 * ceil_log2(shape.nodes);
      t.bytes_factor = 2 * (n - 1) / n;
      t.reduce_factor = (n - 1) / n;
      return t;
    case Algorithm::kDirect:
      t.direct = true;
      if (op == CollectiveKind::kSendRecv) {
        if (shape.ranks != 2) fail();
        t.intra_steps = multi ? 0 : 1;
        t.inter_steps = multi ? 1 : 0;
        t.bytes_factor = multi ? 0 : 1;
        t.inter_bytes_factor = multi ? 1 : 0;
        return t;
      }
      if (op == CollectiveKind::kAllToAll) {
        if (shape.ranks < 2) fail();
        t.intra_steps = m - 1;
        t.inter_steps = n - m;
        t.bytes_factor = (m - 1) / n;
        t.inter_bytes_factor = (n - m) / n;
        return t;
      }
      cannot_run(op, algorithm, shape);
  }
  cannot_run(op, algorithm, shape);
}

const RegimeParams& select_regime(const AlgorithmParams& regimes, int64_t bytes) {
  TESSERA_CHECK(!regimes.empty(), InvalidArgument, "select_regime: no regimes");
  for (const RegimeParams& r : regimes) {
    if (r.max_bytes == 0 || bytes <= r.max_bytes) return r;
  }
  return regimes.back();
}

Microseconds regime_time(const RegimeParams& r, const CostTerms& t, const GroupShape& shape,
                         int64_t bytes, int nics_per_node) {
  const double s = static_cast<double>(bytes);
  double us = r.setup_us + t.intra_steps * r.intra_hop_us + t.inter_steps * r.inter_hop_us;
  if (t.direct) {
    const double nic_share = direct_nic_share(shape, nics_per_node);
    const double intra = t.bytes_factor * s / (r.intra_gbps * kBytesPerUsPerGbps);
    const double inter = t.inter_bytes_factor * s / (r.inter_gbps * nic_share * kBytesPerUsPerGbps);
    us += std::max(intra, inter);
  } else {
    const double bw = shape.nodes > 1 ? std::min(r.intra_gbps, r.inter_gbps) : r.intra_gbps;
    us += t.bytes_factor * s / (bw * kBytesPerUsPerGbps);
  }
  if (r.reduce_gbps > 0) us += t.reduce_factor * s / (r.reduce_gbps * kBytesPerUsPerGbps);
  return Microseconds(us);
}

std::vector<Algorithm> candidate_algorithms(CollectiveKind op, const GroupShape& shape) {
  if (shape.ranks == 1) return {Algorithm::kLocal};
  switch (op) {
    case CollectiveKind::kAllReduce:
      return {Algorithm::kRing, Algorithm::kTree};
    case CollectiveKind::kAllGather:
    case CollectiveKind::kReduceScatter:
    case CollectiveKind::kBroadcast:
      return {Algorithm::kRing};
    case CollectiveKind::kAllToAll:
    case CollectiveKind::kSendRecv:
      return {Algorithm::kDirect};
  }
  return {};
}

CollectiveModel::CollectiveModel(ClusterSpec cluster, CollectiveModelOptions options)
    : cluster_(std::move(cluster)), options_(options) {
  cluster_.validate(cluster_.name);
}

CollectiveEstimate CollectiveModel::estimate_with(CollectiveKind op, Algorithm algorithm,
                                                  const GroupShape& shape, int64_t bytes) const {
  TESSERA_CHECK(bytes >= 0, InvalidArgument, "collective ", collective_kind_name(op),
                ": bytes must be >= 0, got ", bytes);
  const CostTerms terms = cost_terms(op, algorithm, shape);
  const AlgorithmParams* params = cluster_.params(op, algorithm);
  TESSERA_CHECK(params != nullptr, NotFound, "cluster '", cluster_.name, "' has no ",
                algorithm_name(algorithm), " parameters (for ", collective_kind_name(op), ")");
  const RegimeParams& regime = select_regime(*params, bytes);
  CollectiveEstimate e;
  e.time = regime_time(regime, terms, shape, bytes, cluster_.topology.nics_per_node);
  e.algorithm = algorithm;
  e.protocol = regime.protocol;
  return e;
}

CollectiveEstimate CollectiveModel::estimate(CollectiveKind op, const GroupShape& shape,
                                             int64_t bytes) const {
  check_shape(shape);
  if (shape.ranks == 1) {
    if (cluster_.params(op, Algorithm::kLocal) == nullptr) {
      CollectiveEstimate free;
      free.algorithm = Algorithm::kLocal;
      free.protocol = "none";
      return free;
    }
    return estimate_with(op, Algorithm::kLocal, shape, bytes);
  }
  if (options_.algorithm && *options_.algorithm != Algorithm::kLocal) {
    return estimate_with(op, *options_.algorithm, shape, bytes);
  }
  std::optional<CollectiveEstimate> best;
  for (Algorithm a : candidate_algorithms(op, shape)) {
    if (cluster_.params(op, a) == nullptr) continue;
    CollectiveEstimate e = estimate_with(op, a, shape, bytes);
    if (!best || e.time < best->time) best = e;
  }
  if (!best) {
    std::string names;
    for (Algorithm a : candidate_algorithms(op, shape)) {
      names += (names.empty() ? "" : " or ") + std::string(algorithm_name(a));
    }
    TESSERA_THROW(NotFound, "cluster '", cluster_.name, "' has no parameters for ",
                  collective_kind_name(op), " (needs ", names, ")");
  }
  return *best;
}

// ---------------------------------------------------------------------------
// nccl-tests logs.

std::vector<Measurement> parse_nccl_tests(std::string_view text, const std::string& source,
                                          const NcclTestsOptions& options) {
  std::map<std::string, std::set<int>> ranks_by_host;
  std::set<int> all_ranks;
  std::vector<std::string> header;
  struct Row {
    int line;
    std::vector<std::string> fields;
  };
  std::vector<Row> rows;
  int line_no = 0;
  size_t pos = 0;
  while (pos <= text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string_view::npos) end = text.size();
    std::string_view raw = text.substr(pos, end - pos);
    pos = end + 1;
    ++line_no;
    // mpirun --tag-output prefixes: "[1,0]<stdout>:".
    if (!raw.empty() && raw[0] == '[') {
      const size_t close = raw.find(">:");
      if (close != std::string_view::npos && raw.find("]<std") != std::string_view::npos) {
        raw = raw.substr(close + 2);
      }
    }
    const std::string line = trim(raw);
    if (line.empty()) {
      if (end == text.size()) break;
      continue;
    }
    if (line[0] == '#') {
      const std::vector<std::string> tokens = split_ws(std::string_view(line).substr(1));
      // "#  Rank  3 Pid  63453 on node-000000 device  3 [0x00] A100-SXM4-40GB"
      if (tokens.size() >= 6 && tokens[0] == "Rank" && tokens[2] == "Pid" && tokens[4] == "on") {
        int rank = -1;
        try {
          rank = std::stoi(tokens[1]);
        } catch (const std::exception&) {
        }
        TESSERA_CHECK(rank >= 0, DataLoss, source, ":", line_no, ": bad rank number '", tokens[1],
                      "'");
        TESSERA_CHECK(all_ranks.insert(rank).second, DataLoss, source, ":", line_no, ": rank ",
                      rank, " listed twice");
        ranks_by_host[tokens[5]].insert(rank);
      } else if (!tokens.empty() && tokens[0] == "size" &&
                 std::find(tokens.begin(), tokens.end(), "time") != tokens.end()) {
        header = tokens;
      }
      if (end == text.size()) break;
      continue;
    }
    // Anything else that starts with a digit is a table row; other lines
    // (NCCL INFO/WARN output, launcher chatter) are not part of the table.
    if (std::isdigit(static_cast<unsigned char>(line[0]))) {
      TESSERA_CHECK(!header.empty(), DataLoss, source, ":", line_no,
                    ": table row before the '# size count type ... time' header");
      rows.push_back(Row{line_no, split_ws(line)});
    }
    if (end == text.size()) break;
  }
  TESSERA_CHECK(!header.empty(), DataLoss, source,
                ": no '# size count type ... time algbw busbw' header: not nccl-tests output?");
  TESSERA_CHECK(!all_ranks.empty(), DataLoss, source,
                ": no '#  Rank r Pid p on HOST device d' lines: cannot tell the group size");
  const int n = static_cast<int>(all_ranks.size());
  TESSERA_CHECK(*all_ranks.rbegin() == n - 1, DataLoss, source, ": ranks are not 0..", n - 1);
  GroupShape shape;
  shape.ranks = n;
  shape.nodes = static_cast<int>(ranks_by_host.size());
  shape.max_ranks_per_node = 0;
  for (const auto& [host, ranks] : ranks_by_host) {
    shape.max_ranks_per_node = std::max(shape.max_ranks_per_node, static_cast<int>(ranks.size()));
  }

  // Column positions: "size" and the first (out-of-place) or second
  // (in-place) "time".
  const size_t size_col = 0;
  std::vector<size_t> time_cols;
  for (size_t i = 0; i < header.size(); ++i) {
    if (header[i] == "time") time_cols.push_back(i);
  }
  const size_t want = options.in_place ? 1 : 0;
  TESSERA_CHECK(time_cols.size() > want, DataLoss, source, ": header has no ",
                options.in_place ? "in-place" : "out-of-place", " time column");
  const size_t time_col = time_cols[want];

  std::vector<Measurement> out;
  out.reserve(rows.size());
  for (const Row& row : rows) {
    const std::string where = source + ":" + std::to_string(row.line);
    TESSERA_CHECK(row.fields.size() > time_col, DataLoss, where, ": expected at least ",
                  time_col + 1, " columns, got ", row.fields.size());
    Measurement m;
    m.op = options.op;
    m.shape = shape;
    m.origin = where;
    size_t used = 0;
    try {
      m.bytes = std::stoll(row.fields[size_col], &used);
    } catch (const std::exception&) {
      used = 0;
    }
    TESSERA_CHECK(used == row.fields[size_col].size() && m.bytes >= 0, DataLoss, where,
                  ": column 'size': expected a byte count, got '", row.fields[size_col], "'");
    try {
      m.time = Microseconds(std::stod(row.fields[time_col], &used));
    } catch (const std::exception&) {
      used = 0;
    }
    TESSERA_CHECK(
        used == row.fields[time_col].size() && std::isfinite(m.time.count()) && m.time.count() > 0,
        DataLoss, where, ": column 'time': expected a positive number of microseconds, got '",
        row.fields[time_col], "'");
    out.push_back(std::move(m));
  }
  TESSERA_CHECK(!out.empty(), DataLoss, source, ": the table has no rows");
  return out;
}

std::vector<Measurement> load_nccl_tests(const std::string& path, const NcclTestsOptions& options) {
  return parse_nccl_tests(read_file(path, "nccl-tests log"), path, options);
}

// ---------------------------------------------------------------------------
// Tessera's collective benchmark JSON.

std::vector<Measurement> parse_collective_bench(std::string_view text, const std::string& source) {
  const json root = detail::parse_json(text, source);
  JsonObject top(root, source);
  const std::string schema = top.get_string("schema");
  if (schema != "tessera.sim.collective_bench/1") {
    top.fail("schema", "expected 'tessera.sim.collective_bench/1', got '" + schema + "'");
  }
  const int64_t devices = top.get_int("devices_per_node");
  if (devices < 1 || devices > 4096) top.fail("devices_per_node", "must be in [1, 4096]");
  const json& results = top.get_array("results");
  std::vector<Measurement> out;
  for (size_t i = 0; i < results.size(); ++i) {
    JsonObject r(results[i], source, "results[" + std::to_string(i) + "]");
    Measurement m;
    try {
      m.op = parse_collective_kind(r.get_string("op"));
    } catch (const InvalidArgument& e) {
      if (!r.has("op")) throw;
      r.fail("op", e.message());
    }
    const int64_t ranks = r.get_int("ranks");
    if (ranks < 1 || ranks > (int64_t{1} << 24)) r.fail("ranks", "must be in [1, 2^24]");
    if (r.has("nodes")) {
      const int64_t nodes = r.get_int("nodes");
      if (nodes < 1 || nodes > ranks) r.fail("nodes", "must be in [1, ranks]");
      m.shape.ranks = static_cast<int>(ranks);
      m.shape.nodes = static_cast<int>(nodes);
      m.shape.max_ranks_per_node = static_cast<int>((ranks + nodes - 1) / nodes);
    } else {
      m.shape = GroupShape::packed(static_cast<int>(ranks), static_cast<int>(devices));
    }
    m.bytes = r.get_size("bytes");
    const double seconds = r.get_double("seconds");
    if (!(seconds > 0)) r.fail("seconds", "must be > 0");
    m.time = Microseconds(seconds * 1e6);
    if (m.op == CollectiveKind::kSendRecv && m.shape.ranks != 2) {
      r.fail("ranks", "send_recv is measured between 2 ranks");
    }
    m.origin = source + ": results[" + std::to_string(i) + "]";
    r.check_keys();
    out.push_back(std::move(m));
  }
  top.check_keys();
  return out;
}

std::vector<Measurement> load_collective_bench(const std::string& path) {
  return parse_collective_bench(read_file(path, "collective benchmark file"), path);
}

std::string collective_bench_to_json(const std::vector<Measurement>& measurements,
                                     int devices_per_node) {
  json results = json::array();
  for (const Measurement& m : measurements) {
    results.push_back({{"op", collective_kind_name(m.op)},
                       {"ranks", m.shape.ranks},
                       {"nodes", m.shape.nodes},
                       {"bytes", m.bytes},
                       {"seconds", m.time.count() * 1e-6}});
  }
  json root = {{"schema", "tessera.sim.collective_bench/1"},
               {"devices_per_node", devices_per_node},
               {"results", std::move(results)}};
  return root.dump(1) + "\n";
}

// ---------------------------------------------------------------------------
// Fitting.

namespace {

// Unknowns: α, λ_i, λ_x, 1/B_i, 1/B_x, 1/δ (times in us, bandwidths in
// bytes/us).
constexpr int kCols = 6;
using Vec = std::array<double, kCols>;

struct Gram {
  double g[kCols][kCols] = {};
  Vec b = {};
  double count = 0;  // Σ y² with y = 1 for every row

  void add_row(const Vec& x) {
    for (int i = 0; i < kCols; ++i) {
      for (int j = 0; j < kCols; ++j) g[i][j] += x[i] * x[j];
      b[i] += x[i];
    }
    count += 1;
  }
  Gram operator-(const Gram& o) const {
    Gram d;
    for (int i = 0; i < kCols; ++i) {
      for (int j = 0; j < kCols; ++j) d.g[i][j] = g[i][j] - o.g[i][j];
      d.b[i] = b[i] - o.b[i];
    }
    d.count = count - o.count;
    return d;
  }
};

struct SegmentFit {
  bool ok = false;
  Vec theta = {};
  double sse = std::numeric_limits<double>::infinity();
};

// Solves the normal equations restricted to the columns in `mask` by
// Gaussian elimination with partial pivoting; false when singular. Columns
// are first scaled to unit norm: the byte columns are ~1e9 times the
// constant one, and unscaled normal equations would lose every digit.
bool solve_subset(const Gram& gram, unsigned mask, Vec& theta) {
  int idx[kCols];
  int c = 0;
  for (int i = 0; i < kCols; ++i) {
    if (mask & (1u << i)) idx[c++] = i;
  }
  double scale[kCols];
  for (int i = 0; i < c; ++i) {
    const double d = gram.g[idx[i]][idx[i]];
    if (!(d > 0)) return false;
    scale[i] = std::sqrt(d);
  }
  double a[kCols][kCols + 1];
  for (int i = 0; i < c; ++i) {
    for (int j = 0; j < c; ++j) a[i][j] = gram.g[idx[i]][idx[j]] / (scale[i] * scale[j]);
    a[i][c] = gram.b[idx[i]] / scale[i];
  }
  for (int col = 0; col < c; ++col) {
    int pivot = col;
    for (int r = col + 1; r < c; ++r) {
      if (std::fabs(a[r][col]) > std::fabs(a[pivot][col])) pivot = r;
    }
    // Unit diagonal after scaling: a pivot this small means collinear columns.
    if (std::fabs(a[pivot][col]) <= 1e-11) return false;
    if (pivot != col) {
      for (int j = 0; j <= c; ++j) std::swap(a[col][j], a[pivot][j]);
    }
    for (int r = 0; r < c; ++r) {
      if (r == col) continue;
      const double f = a[r][col] / a[col][col];
      if (f == 0) continue;
      for (int j = col; j <= c; ++j) a[r][j] -= f * a[col][j];
    }
  }
  theta.fill(0);
  for (int i = 0; i < c; ++i) theta[idx[i]] = a[i][c] / a[i][i] / scale[i];
  return true;
}

// Non-negative least squares over at most 6 unknowns: the best of all
// active sets whose unconstrained solution is non-negative. `usable` masks
// the columns that carry data in this segment.
SegmentFit fit_segment(const Gram& gram, unsigned usable) {
  SegmentFit best;
  best.ok = true;
  best.sse = gram.count;  // all coefficients zero
  for (unsigned mask = 1; mask < (1u << kCols); ++mask) {
    if ((mask & ~usable) != 0) continue;
    Vec theta;
    if (!solve_subset(gram, mask, theta)) continue;
    bool nonnegative = true;
    for (double v : theta) nonnegative = nonnegative && v >= 0;
    if (!nonnegative) continue;
    // SSE = Σ(xθ - 1)² = θᵀGθ - 2θᵀb + n.
    double quad = 0, lin = 0;
    for (int i = 0; i < kCols; ++i) {
      lin += theta[i] * gram.b[i];
      for (int j = 0; j < kCols; ++j) quad += theta[i] * gram.g[i][j] * theta[j];
    }
    const double sse = std::max(0.0, quad - 2 * lin + gram.count);
    if (sse < best.sse) {
      best.sse = sse;
      best.theta = theta;
    }
  }
  return best;
}

// Whether `algorithm` can run this measurement (n = 1 only with local).
bool usable_for(const Measurement& m, Algorithm algorithm) {
  if (algorithm == Algorithm::kLocal) return m.shape.ranks == 1;
  if (m.shape.ranks < 2) return false;
  try {
    (void)cost_terms(m.op, algorithm, m.shape);
    return true;
  } catch (const InvalidArgument&) {
    return false;
  }
}

const char* regime_label(size_t index, size_t count) {
  static constexpr const char* kTwo[] = {"small", "large"};
  static constexpr const char* kThree[] = {"small", "medium", "large"};
  static constexpr const char* kFour[] = {"small", "medium", "large", "huge"};
  switch (count) {
    case 1:
      return "all";
    case 2:
      return kTwo[index];
    case 3:
      return kThree[index];
    default:
      return kFour[index];
  }
}

// The measurements of one fit, sorted by size, and how each is modelled.
struct FitProblem {
  std::vector<const Measurement*> points;
  Algorithm algorithm = Algorithm::kRing;
  // > 0: all_reduce points may follow the tree formula, whose regimes are
  // the ring's with both bandwidths multiplied by this factor.
  double tree_factor = 0;
  int nics_per_node = 1;
  bool fit_reduction = false;
};

// The design row of a measurement, scaled by 1/T (relative error).
Vec design_row(const FitProblem& p, const Measurement& m, bool tree) {
  const CostTerms t = cost_terms(m.op, tree ? Algorithm::kTree : p.algorithm, m.shape);
  const double s = static_cast<double>(m.bytes);
  const double bw_scale = tree ? 1.0 / p.tree_factor : 1.0;
  const bool multi = m.shape.nodes > 1;
  Vec x = {};
  x[0] = 1;
  x[1] = t.intra_steps;
  x[2] = t.inter_steps;
  if (t.direct) {
    // Direct traffic is max(intra, inter); across nodes the inter part is
    // taken as the bottleneck.
    if (multi) {
      x[4] = t.inter_bytes_factor * s / direct_nic_share(m.shape, p.nics_per_node);
    } else {
      x[3] = t.bytes_factor * s;
    }
  } else if (multi) {
    x[4] = t.bytes_factor * s * bw_scale;
  } else {
    x[3] = t.bytes_factor * s * bw_scale;
  }
  x[5] = t.reduce_factor * s;
  for (double& v : x) v /= m.time.count();
  return x;
}

struct Segmentation {
  std::vector<std::pair<size_t, size_t>> segments;  // ranges of unique sizes
  std::vector<Vec> theta;
  std::vector<bool> multi;  // the segment holds multi-node points
  std::vector<int64_t> last_size;
};

// Least-SSE cut of the sizes into regimes (exact dynamic programme over
// breakpoints), then the number of regimes chosen as FitOptions says.
Segmentation segment(const FitProblem& p, const std::vector<char>& use_tree,
                     const FitOptions& options) {
  const auto& points = p.points;
  std::vector<int64_t> sizes;
  std::vector<size_t> first_point;  // first point of each unique size
  for (size_t i = 0; i < points.size(); ++i) {
    if (sizes.empty() || points[i]->bytes != sizes.back()) {
      sizes.push_back(points[i]->bytes);
      first_point.push_back(i);
    }
  }
  first_point.push_back(points.size());
  const size_t u = sizes.size();
  std::vector<Gram> prefix(points.size() + 1);
  std::vector<unsigned> row_mask(points.size(), 0);
  std::vector<int> multi_prefix(points.size() + 1, 0);
  for (size_t i = 0; i < points.size(); ++i) {
    const Vec x = design_row(p, *points[i], use_tree[i] != 0);
    prefix[i + 1] = prefix[i];
    prefix[i + 1].add_row(x);
    for (int c = 0; c < kCols; ++c) {
      if (x[c] != 0) row_mask[i] |= 1u << c;
    }
    multi_prefix[i + 1] = multi_prefix[i] + (points[i]->shape.nodes > 1 ? 1 : 0);
  }

  // Fits of every segment [a, b) of unique sizes with enough points.
  std::vector<std::vector<SegmentFit>> seg(u, std::vector<SegmentFit>(u + 1));
  for (size_t a = 0; a < u; ++a) {
    unsigned mask = 0;
    for (size_t b = a + 1; b <= u; ++b) {
      for (size_t i = first_point[b - 1]; i < first_point[b]; ++i) mask |= row_mask[i];
      const size_t count = first_point[b] - first_point[a];
      if (static_cast<int>(count) < options.min_points_per_regime) continue;
      unsigned usable = mask;
      if (!p.fit_reduction) usable &= ~(1u << 5);
      seg[a][b] = fit_segment(prefix[first_point[b]] - prefix[first_point[a]], usable);
    }
  }

  const double inf = std::numeric_limits<double>::infinity();
  const int max_r = options.max_regimes;
  std::vector<std::vector<double>> best(max_r + 1, std::vector<double>(u + 1, inf));
  std::vector<std::vector<size_t>> cut(max_r + 1, std::vector<size_t>(u + 1, 0));
  best[0][0] = 0;
  for (int r = 1; r <= max_r; ++r) {
    for (size_t b = 1; b <= u; ++b) {
      for (size_t a = 0; a < b; ++a) {
        if (best[r - 1][a] == inf || !seg[a][b].ok) continue;
        const double total = best[r - 1][a] + seg[a][b].sse;
        if (total < best[r][b]) {
          best[r][b] = total;
          cut[r][b] = a;
        }
      }
    }
  }
  TESSERA_CHECK(best[1][u] < inf, Internal, "fit: no single-regime fit");
  int chosen = 1;
  const double n_points = static_cast<double>(points.size());
  for (int r = 2; r <= max_r; ++r) {
    if (best[r][u] == inf) break;
    const double rms_prev = std::sqrt(best[chosen][u] / n_points);
    const double rms_next = std::sqrt(best[r][u] / n_points);
    // An exact fit needs no further regime.
    if (rms_prev < 1e-9 || rms_next > (1 - options.min_improvement) * rms_prev) break;
    chosen = r;
  }
  Segmentation out;
  for (size_t b = u, r = static_cast<size_t>(chosen); r > 0; --r) {
    const size_t a = cut[r][b];
    out.segments.emplace_back(a, b);
    b = a;
  }
  std::reverse(out.segments.begin(), out.segments.end());
  for (const auto& [a, b] : out.segments) {
    out.theta.push_back(seg[a][b].theta);
    out.multi.push_back(multi_prefix[first_point[b]] - multi_prefix[first_point[a]] > 0);
    out.last_size.push_back(sizes[b - 1]);
  }
  return out;
}

AlgorithmParams make_regimes(const Segmentation& sg, const FitProblem& p,
                             const FitOptions& options) {
  const double nominal_inter_gbps =
      p.algorithm == Algorithm::kDirect
          ? options.topology.inter_node.bandwidth_gbps
          : options.topology.inter_node.bandwidth_gbps * options.topology.nics_per_node;
  const int digits = options.significant_digits;
  auto bandwidth = [&](double inverse_bytes_per_us) {
    return inverse_bytes_per_us > 0
               ? std::min(kUnseenBandwidthGbps, 1.0 / inverse_bytes_per_us / kBytesPerUsPerGbps)
               : kUnseenBandwidthGbps;
  };
  AlgorithmParams regimes;
  for (size_t s = 0; s < sg.segments.size(); ++s) {
    const Vec& th = sg.theta[s];
    RegimeParams r;
    r.protocol = regime_label(s, sg.segments.size());
    r.max_bytes = s + 1 == sg.segments.size() ? 0 : sg.last_size[s];
    r.setup_us = round_significant(th[0], digits);
    r.intra_hop_us = round_significant(th[1], digits);
    r.intra_gbps = round_significant(bandwidth(th[3]), digits);
    if (sg.multi[s]) {
      r.inter_hop_us = round_significant(th[2], digits);
      r.inter_gbps = round_significant(bandwidth(th[4]), digits);
    } else {
      r.inter_hop_us = round_significant(th[1] + options.topology.inter_node.latency_us, digits);
      r.inter_gbps = round_significant(nominal_inter_gbps, digits);
    }
    r.reduce_gbps =
        p.fit_reduction && th[5] > 0 ? round_significant(bandwidth(th[5]), digits) : 0.0;
    regimes.push_back(std::move(r));
  }
  return regimes;
}

}  // namespace

AlgorithmParams derive_tree_regimes(const AlgorithmParams& ring, double bandwidth_factor) {
  TESSERA_CHECK(bandwidth_factor > 0 && bandwidth_factor <= 1, InvalidArgument,
                "derive_tree_regimes: bandwidth factor must be in (0, 1], got ", bandwidth_factor);
  AlgorithmParams tree = ring;
  for (RegimeParams& r : tree) {
    r.intra_gbps *= bandwidth_factor;
    r.inter_gbps *= bandwidth_factor;
  }
  return tree;
}

FitReport fit_algorithm(const std::vector<Measurement>& measurements, const FitOptions& options) {
  TESSERA_CHECK(options.max_regimes >= 1 && options.max_regimes <= 4, InvalidArgument,
                "fit: max_regimes must be in [1, 4], got ", options.max_regimes);
  TESSERA_CHECK(options.min_points_per_regime >= 2, InvalidArgument,
                "fit: min_points_per_regime must be >= 2");
  TESSERA_CHECK(options.min_improvement >= 0 && options.min_improvement < 1, InvalidArgument,
                "fit: min_improvement must be in [0, 1)");
  TESSERA_CHECK(options.tree_bandwidth_factor >= 0 && options.tree_bandwidth_factor <= 1,
                InvalidArgument, "fit: tree_bandwidth_factor must be in [0, 1]");
  FitProblem p;
  p.algorithm = options.algorithm;
  p.nics_per_node = options.topology.nics_per_node;
  for (const Measurement& m : measurements) {
    TESSERA_CHECK(m.time.count() > 0 && std::isfinite(m.time.count()) && m.bytes >= 0,
                  InvalidArgument, "fit: measurement ", m.origin, " has time ", m.time.count(),
                  " us and ", m.bytes, " bytes");
    if (usable_for(m, p.algorithm)) p.points.push_back(&m);
  }
  TESSERA_CHECK(static_cast<int>(p.points.size()) >= options.min_points_per_regime, InvalidArgument,
                "fit: only ", p.points.size(), " measurement(s) usable for ",
                algorithm_name(p.algorithm), ", need at least ", options.min_points_per_regime);
  std::stable_sort(p.points.begin(), p.points.end(),
                   [](const Measurement* a, const Measurement* b) { return a->bytes < b->bytes; });

  // Which unknowns the data can identify at all.
  bool any_multi = false, any_reducing = false, any_plain = false, any_tree_capable = false;
  for (const Measurement* m : p.points) {
    any_multi = any_multi || m->shape.nodes > 1;
    const bool reduces = cost_terms(m->op, p.algorithm, m->shape).reduce_factor > 0;
    any_reducing = any_reducing || reduces;
    any_plain = any_plain || !reduces;
    any_tree_capable = any_tree_capable || m->op == CollectiveKind::kAllReduce;
  }
  p.fit_reduction = any_reducing && any_plain;
  if (p.algorithm == Algorithm::kRing && any_tree_capable)
    p.tree_factor = options.tree_bandwidth_factor;

  // With a tree, each all_reduce measurement is explained by whichever of
  // ring and tree the fitted model finds faster (as NCCL picks the faster
  // one): alternate fitting and reassigning until the assignment settles.
  std::vector<char> use_tree(p.points.size(), 0);
  AlgorithmParams regimes, tree;
  auto predict = [&](const Measurement& m, bool* picked_tree) {
    const CostTerms t = cost_terms(m.op, p.algorithm, m.shape);
    double best =
        regime_time(select_regime(regimes, m.bytes), t, m.shape, m.bytes, p.nics_per_node).count();
    if (picked_tree) *picked_tree = false;
    if (!tree.empty() && m.op == CollectiveKind::kAllReduce) {
      const double via_tree =
          regime_time(select_regime(tree, m.bytes), cost_terms(m.op, Algorithm::kTree, m.shape),
                      m.shape, m.bytes, p.nics_per_node)
              .count();
      if (via_tree < best) {
        best = via_tree;
        if (picked_tree) *picked_tree = true;
      }
    }
    return best;
  };
  constexpr int kMaxRounds = 20;
  for (int round = 0; round < kMaxRounds; ++round) {
    const Segmentation sg = segment(p, use_tree, options);
    regimes = make_regimes(sg, p, options);
    if (p.tree_factor > 0) tree = derive_tree_regimes(regimes, p.tree_factor);
    if (tree.empty()) break;
    bool changed = false;
    for (size_t i = 0; i < p.points.size(); ++i) {
      bool picked_tree = false;
      predict(*p.points[i], &picked_tree);
      if (static_cast<char>(picked_tree) != use_tree[i]) {
        use_tree[i] = picked_tree;
        changed = true;
      }
    }
    if (!changed) break;
  }

  FitReport report;
  report.regimes = regimes;
  report.tree_regimes = tree;
  report.points = p.points.size();
  report.inter_node_from_data = any_multi;
  report.reduction_from_data = p.fit_reduction;
  double sq = 0, abs_sum = 0, abs_max = 0;
  for (const Measurement* m : p.points) {
    const double e = (predict(*m, nullptr) - m->time.count()) / m->time.count();
    sq += e * e;
    abs_sum += std::fabs(e);
    abs_max = std::max(abs_max, std::fabs(e));
  }
  const double n_points = static_cast<double>(p.points.size());
  report.rms_rel_error = std::sqrt(sq / n_points);
  report.mean_abs_rel_error = abs_sum / n_points;
  report.max_abs_rel_error = abs_max;
  return report;
}

ClusterSpec fit_cluster(const std::vector<Measurement>& measurements,
                        const ClusterFitOptions& options) {
  ClusterSpec cluster;
  cluster.name = options.name;
  cluster.description = options.description;
  cluster.provenance = options.provenance;
  cluster.topology = options.topology;

  FitOptions fit = options.fit;
  fit.topology = options.topology;

  std::vector<Measurement> all_reduce, local;
  std::map<CollectiveKind, std::vector<Measurement>> others;
  for (const Measurement& m : measurements) {
    if (m.shape.ranks == 1) {
      local.push_back(m);
    } else if (m.op == CollectiveKind::kAllReduce) {
      all_reduce.push_back(m);
    } else {
      others[m.op].push_back(m);
    }
  }
  TESSERA_CHECK(!all_reduce.empty(), InvalidArgument,
                "fit_cluster: no all_reduce measurement over 2 or more ranks");
  fit.algorithm = Algorithm::kRing;
  const FitReport ring_fit = fit_algorithm(all_reduce, fit);
  const AlgorithmParams& ring = ring_fit.regimes;
  TESSERA_LOG(Info, "sim") << "cluster '" << options.name << "': " << ring.size()
                           << " ring regime(s) fitted to " << ring_fit.points
                           << " all_reduce measurements, mean |relative error| "
                           << ring_fit.mean_abs_rel_error << ", inter-node terms "
                           << (ring_fit.inter_node_from_data ? "fitted" : "nominal");
  cluster.defaults.algorithms[Algorithm::kRing] = ring;
  if (!ring_fit.tree_regimes.empty()) {
    cluster.defaults.algorithms[Algorithm::kTree] = ring_fit.tree_regimes;
  }

  AlgorithmParams direct;
  for (const RegimeParams& r : ring) {
    RegimeParams d = r;
    d.inter_gbps =
        round_significant(r.inter_gbps / options.topology.nics_per_node, fit.significant_digits);
    d.reduce_gbps = 0;
    direct.push_back(d);
  }
  cluster.defaults.algorithms[Algorithm::kDirect] = direct;

  if (!local.empty()) {
    fit.algorithm = Algorithm::kLocal;
    cluster.defaults.algorithms[Algorithm::kLocal] = fit_algorithm(local, fit).regimes;
  }
  for (const auto& [op, list] : others) {
    const Algorithm a = (op == CollectiveKind::kAllToAll || op == CollectiveKind::kSendRecv)
                            ? Algorithm::kDirect
                            : Algorithm::kRing;
    fit.algorithm = a;
    cluster.overrides[op].algorithms[a] = fit_algorithm(list, fit).regimes;
  }
  cluster.validate(cluster.name);
  return cluster;
}

// ---------------------------------------------------------------------------
// Recipes.

ClusterRecipe load_cluster_recipe(const std::string& path) {
  const std::string text = read_file(path, "cluster recipe");
  const json root = detail::parse_json(text, path);
  JsonObject top(root, path);
  const std::string schema = top.get_string("schema");
  if (schema != "tessera.sim.cluster_fit/1") {
    top.fail("schema", "expected 'tessera.sim.cluster_fit/1', got '" + schema + "'");
  }
  ClusterRecipe recipe;
  ClusterFitOptions& o = recipe.options;
  o.name = top.get_string("name");
  o.description = top.get_string("description", "");
  o.provenance = top.get_string("provenance", "");

  // The topology block has the cluster file's format: reuse its parser on a
  // minimal cluster document.
  json stub = {{"schema", "tessera.sim.cluster/1"},
               {"name", o.name},
               {"topology", top.at("topology")},
               {"algorithms", json::object()}};
  o.topology = ClusterSpec::parse(stub.dump(), path).topology;
  const std::string dir = directory_of(path);
  if (top.has("host_sharing")) {
    // A `calibrate host` measurement supplies the topology's host_* figures.
    const std::string file = dir + "/" + top.get_string("host_sharing");
    apply_host_sharing(parse_host_sharing(read_file(file, "host sharing measurement"), file),
                       o.topology);
  }

  if (top.has("fit")) {
    JsonObject fit = top.get_object("fit");
    o.fit.max_regimes = static_cast<int>(fit.get_int("max_regimes", o.fit.max_regimes));
    o.fit.min_improvement = fit.get_double("min_improvement", o.fit.min_improvement);
    o.fit.min_points_per_regime =
        static_cast<int>(fit.get_int("min_points_per_regime", o.fit.min_points_per_regime));
    o.fit.significant_digits =
        static_cast<int>(fit.get_int("significant_digits", o.fit.significant_digits));
    o.fit.tree_bandwidth_factor =
        fit.get_double("tree_bandwidth_factor", o.fit.tree_bandwidth_factor);
    fit.check_keys();
  }

  const json& logs = top.get_array("nccl_tests");
  for (size_t i = 0; i < logs.size(); ++i) {
    JsonObject entry(logs[i], path, "nccl_tests[" + std::to_string(i) + "]");
    NcclTestsOptions nopts;
    try {
      nopts.op = parse_collective_kind(entry.get_string("op", "all_reduce"));
    } catch (const InvalidArgument& e) {
      entry.fail("op", e.message());
    }
    nopts.in_place = entry.get_bool("in_place", false);
    const std::string file = dir + "/" + entry.get_string("file");
    const bool held_out = entry.get_bool("held_out", false);
    entry.check_keys();
    std::vector<Measurement> ms = load_nccl_tests(file, nopts);
    auto& target = held_out ? recipe.held_out_measurements : recipe.fit_measurements;
    target.insert(target.end(), ms.begin(), ms.end());
  }
  if (top.has("collective_bench")) {
    const json& benches = top.get_array("collective_bench");
    for (size_t i = 0; i < benches.size(); ++i) {
      TESSERA_CHECK(benches[i].is_string(), InvalidArgument, path, ": collective_bench[", i,
                    "]: expected a file name");
      std::vector<Measurement> ms =
          load_collective_bench(dir + "/" + benches[i].get<std::string>());
      recipe.fit_measurements.insert(recipe.fit_measurements.end(), ms.begin(), ms.end());
    }
  }
  top.check_keys();
  return recipe;
}

ClusterSpec fit_cluster_from_recipe(const std::string& path) {
  ClusterRecipe recipe = load_cluster_recipe(path);
  return fit_cluster(recipe.fit_measurements, recipe.options);
}

// ---------------------------------------------------------------------------
// Reports.

PredictionReport evaluate_predictions(const CollectiveModel& model,
                                      const std::vector<Measurement>& measurements) {
  PredictionReport report;
  std::vector<double> abs_errors;
  for (const Measurement& m : measurements) {
    PredictionRow row;
    row.measured = m;
    row.predicted = model.estimate(m.op, m.shape, m.bytes);
    row.rel_error = (row.predicted.time.count() - m.time.count()) / m.time.count();
    abs_errors.push_back(std::fabs(row.rel_error));
    report.rows.push_back(std::move(row));
  }
  if (!abs_errors.empty()) {
    double sum = 0;
    for (double e : abs_errors) sum += e;
    report.mean_abs_rel_error = sum / abs_errors.size();
    report.max_abs_rel_error = *std::max_element(abs_errors.begin(), abs_errors.end());
    std::vector<double> sorted = abs_errors;
    std::sort(sorted.begin(), sorted.end());
    const size_t mid = sorted.size() / 2;
    report.median_abs_rel_error =
        sorted.size() % 2 ? sorted[mid] : 0.5 * (sorted[mid - 1] + sorted[mid]);
  }
  return report;
}

std::string PredictionReport::to_text() const {
  std::string out =
      detail::format("%-14s %5s %5s %14s %12s %12s %8s  %s\n", "op", "ranks", "nodes", "size(B)",
                     "measured(us)", "predicted", "error", "algorithm/regime");
  for (const PredictionRow& r : rows) {
    out += detail::format("%-14s %5d %5d %14lld %12.2f %12.2f %7.1f%%  %s/%s\n",
                          collective_kind_name(r.measured.op), r.measured.shape.ranks,
                          r.measured.shape.nodes, static_cast<long long>(r.measured.bytes),
                          r.measured.time.count(), r.predicted.time.count(), 100 * r.rel_error,
                          algorithm_name(r.predicted.algorithm), r.predicted.protocol.c_str());
  }
  out += detail::format("%zu measurements: mean |error| %.1f%%, median %.1f%%, max %.1f%%\n",
                        rows.size(), 100 * mean_abs_rel_error, 100 * median_abs_rel_error,
                        100 * max_abs_rel_error);
  return out;
}

}  // namespace tessera::sim
