#include "tessera/sim/cluster.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>

#include "json_reader.h"
#include "tessera/core/error.h"

namespace tessera::sim {

using detail::json;
using detail::JsonObject;

namespace {

constexpr const char* kSchema = "tessera.sim.cluster/1";

LinkSpec parse_link(const JsonObject& obj) {
  LinkSpec link;
  link.bandwidth_gbps = obj.get_double("bandwidth_gbps");
  link.latency_us = obj.get_double("latency_us");
  obj.check_keys();
  return link;
}

RegimeParams parse_regime(const JsonObject& obj) {
  RegimeParams r;
  r.protocol = obj.get_string("protocol");
  r.max_bytes = obj.get_int("max_bytes");
  r.setup_us = obj.get_double("setup_us");
  r.intra_hop_us = obj.get_double("intra_hop_us");
  r.inter_hop_us = obj.get_double("inter_hop_us");
  r.intra_gbps = obj.get_double("intra_gbps");
  r.inter_gbps = obj.get_double("inter_gbps");
  r.reduce_gbps = obj.get_double("reduce_gbps", 0.0);
  obj.check_keys();
  return r;
}

CollectiveParams parse_algorithms(const JsonObject& obj) {
  CollectiveParams out;
  for (const auto& item : obj.keys()) {
    Algorithm algorithm;
    try {
      algorithm = parse_algorithm(item);
    } catch (const InvalidArgument& e) {
      obj.fail(item, e.message());
    }
    const json& list = obj.get_array(item);
    AlgorithmParams regimes;
    for (size_t i = 0; i < list.size(); ++i) {
      regimes.push_back(parse_regime(
          JsonObject(list[i], obj.source(), obj.child_path(item) + "[" + std::to_string(i) + "]")));
    }
    out.algorithms[algorithm] = std::move(regimes);
  }
  obj.check_keys();
  return out;
}

json regime_json(const RegimeParams& r) {
  // nlohmann keeps insertion order only with ordered_json; json sorts keys,
  // which keeps the output deterministic.
  return json{{"protocol", r.protocol},         {"max_bytes", r.max_bytes},
              {"setup_us", r.setup_us},         {"intra_hop_us", r.intra_hop_us},
              {"inter_hop_us", r.inter_hop_us}, {"intra_gbps", r.intra_gbps},
              {"inter_gbps", r.inter_gbps},     {"reduce_gbps", r.reduce_gbps}};
}

json algorithms_json(const CollectiveParams& params) {
  json out = json::object();
  for (const auto& [algorithm, regimes] : params.algorithms) {
    json list = json::array();
    for (const RegimeParams& r : regimes) list.push_back(regime_json(r));
    out[algorithm_name(algorithm)] = std::move(list);
  }
  return out;
}

void validate_regimes(const AlgorithmParams& regimes, const std::string& where) {
  TESSERA_CHECK(!regimes.empty(), InvalidArgument, where, ": needs at least one regime");
  for (size_t i = 0; i < regimes.size(); ++i) {
    const RegimeParams& r = regimes[i];
    const std::string at = where + "[" + std::to_string(i) + "]";
    TESSERA_CHECK(!r.protocol.empty(), InvalidArgument, at, ": field 'protocol' is empty");
    const bool last = i + 1 == regimes.size();
    if (last) {
      TESSERA_CHECK(r.max_bytes == 0, InvalidArgument, at,
                    ": field 'max_bytes': the last regime must be unbounded (0), got ",
                    r.max_bytes);
    } else {
      TESSERA_CHECK(r.max_bytes > 0, InvalidArgument, at,
                    ": field 'max_bytes': only the last regime may be unbounded; must be > 0, got ",
                    r.max_bytes);
      TESSERA_CHECK(i == 0 || r.max_bytes > regimes[i - 1].max_bytes, InvalidArgument, at,
                    ": field 'max_bytes': must be larger than the previous regime's (",
                    regimes[i - 1].max_bytes, "), got ", r.max_bytes);
    }
    auto check_latency = [&](const char* key, double v) {
      TESSERA_CHECK(std::isfinite(v) && v >= 0, InvalidArgument, at, ": field '", key,
                    "': must be >= 0, got ", v);
    };
    auto check_bandwidth = [&](const char* key, double v) {
      TESSERA_CHECK(std::isfinite(v) && v > 0, InvalidArgument, at, ": field '", key,
                    "': must be > 0, got ", v);
    };
    check_latency("setup_us", r.setup_us);
    check_latency("intra_hop_us", r.intra_hop_us);
    check_latency("inter_hop_us", r.inter_hop_us);
    check_bandwidth("intra_gbps", r.intra_gbps);
    check_bandwidth("inter_gbps", r.inter_gbps);
    TESSERA_CHECK(std::isfinite(r.reduce_gbps) && r.reduce_gbps >= 0, InvalidArgument, at,
                  ": field 'reduce_gbps': must be >= 0 (0 = folded into the bandwidths), got ",
                  r.reduce_gbps);
  }
}

bool close(double a, double b, double rel_tol) {
  return std::fabs(a - b) <= rel_tol * std::max(std::fabs(a), std::fabs(b)) || a == b;
}

std::string regimes_difference(const AlgorithmParams& a, const AlgorithmParams& b,
                               const std::string& where, double rel_tol) {
  if (a.size() != b.size()) {
    return where + ": " + std::to_string(a.size()) + " vs " + std::to_string(b.size()) + " regimes";
  }
  for (size_t i = 0; i < a.size(); ++i) {
    const std::string at = where + "[" + std::to_string(i) + "].";
    if (a[i].protocol != b[i].protocol)
      return at + "protocol: " + a[i].protocol + " vs " + b[i].protocol;
    if (a[i].max_bytes != b[i].max_bytes) {
      return at + "max_bytes: " + std::to_string(a[i].max_bytes) + " vs " +
             std::to_string(b[i].max_bytes);
    }
    const std::pair<const char*, std::pair<double, double>> fields[] = {
        {"setup_us", {a[i].setup_us, b[i].setup_us}},
        {"intra_hop_us", {a[i].intra_hop_us, b[i].intra_hop_us}},
        {"inter_hop_us", {a[i].inter_hop_us, b[i].inter_hop_us}},
        {"intra_gbps", {a[i].intra_gbps, b[i].intra_gbps}},
        {"inter_gbps", {a[i].inter_gbps, b[i].inter_gbps}},
        {"reduce_gbps", {a[i].reduce_gbps, b[i].reduce_gbps}}};
    for (const auto& [key, values] : fields) {
      if (!close(values.first, values.second, rel_tol)) {
        std::ostringstream out;
        out.precision(10);
        out << at << key << ": " << values.first << " vs " << values.second;
        return out.str();
      }
    }
  }
  return "";
}

std::string params_difference(const CollectiveParams& a, const CollectiveParams& b,
                              const std::string& where, double rel_tol) {
  for (const auto& [algorithm, regimes] : a.algorithms) {
    auto it = b.algorithms.find(algorithm);
    const std::string at = where + "." + algorithm_name(algorithm);
    if (it == b.algorithms.end()) return at + ": only in the first";
    std::string diff = regimes_difference(regimes, it->second, at, rel_tol);
    if (!diff.empty()) return diff;
  }
  for (const auto& [algorithm, regimes] : b.algorithms) {
    if (a.algorithms.count(algorithm) == 0) {
      return where + "." + algorithm_name(algorithm) + ": only in the second";
    }
  }
  return "";
}

}  // namespace

bool RegimeParams::operator==(const RegimeParams& o) const {
  return protocol == o.protocol && max_bytes == o.max_bytes && setup_us == o.setup_us &&
         intra_hop_us == o.intra_hop_us && inter_hop_us == o.inter_hop_us &&
         intra_gbps == o.intra_gbps && inter_gbps == o.inter_gbps && reduce_gbps == o.reduce_gbps;
}

ClusterSpec ClusterSpec::parse(std::string_view text, std::string source) {
  const json root = detail::parse_json(text, source);
  JsonObject top(root, source);
  ClusterSpec c;
  const std::string schema = top.get_string("schema");
  if (schema != kSchema) {
    top.fail("schema", "expected '" + std::string(kSchema) + "', got '" + schema + "'");
  }
  c.name = top.get_string("name");
  c.description = top.get_string("description", "");
  c.provenance = top.get_string("provenance", "");

  JsonObject topo = top.get_object("topology");
  const int64_t devices = topo.get_int("devices_per_node");
  if (devices < 1 || devices > 4096) topo.fail("devices_per_node", "must be in [1, 4096]");
  c.topology.devices_per_node = static_cast<int>(devices);
  const int64_t nodes = topo.get_int("num_nodes");
  if (nodes < 0 || nodes > (int64_t{1} << 20)) topo.fail("num_nodes", "must be in [0, 2^20]");
  c.topology.num_nodes = static_cast<int>(nodes);
  const int64_t nics = topo.get_int("nics_per_node");
  if (nics < 1 || nics > 4096) topo.fail("nics_per_node", "must be in [1, 4096]");
  c.topology.nics_per_node = static_cast<int>(nics);
  c.topology.intra_node = parse_link(topo.get_object("intra_node"));
  c.topology.inter_node = parse_link(topo.get_object("inter_node"));
  // Optional lists of numbers (CPU hosts).
  auto numbers = [&topo](const char* key) {
    std::vector<double> out;
    if (!topo.has(key)) return out;
    for (const json& v : topo.get_array(key)) {
      if (!v.is_number()) topo.fail(key, "expected a list of numbers, found " + v.dump());
      out.push_back(v.get<double>());
    }
    return out;
  };
  c.topology.host_compute_slowdown = numbers("host_compute_slowdown");
  c.topology.host_sync_skew = numbers("host_sync_skew");
  c.topology.host_lockstep_slowdown = numbers("host_lockstep_slowdown");
  c.topology.host_sync_us = numbers("host_sync_us");
  if (topo.has("host_comm_load")) {
    const json& points = topo.get_array("host_comm_load");
    for (size_t i = 0; i < points.size(); ++i) {
      JsonObject point(points[i], source, "topology.host_comm_load[" + std::to_string(i) + "]");
      c.topology.host_comm_load.push_back(
          CommLoadPoint{point.get_int("bytes"), point.get_double("load")});
      point.check_keys();
    }
  }
  topo.check_keys();

  c.defaults = parse_algorithms(top.get_object("algorithms"));
  if (top.has("collectives")) {
    JsonObject colls = top.get_object("collectives");
    for (const std::string& name : colls.keys()) {
      CollectiveKind kind;
      try {
        kind = parse_collective_kind(name);
      } catch (const InvalidArgument& e) {
        colls.fail(name, e.message());
      }
      c.overrides[kind] = parse_algorithms(colls.get_object(name));
    }
    colls.check_keys();
  }
  top.check_keys();
  c.validate(source);
  return c;
}

ClusterSpec ClusterSpec::load_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  TESSERA_CHECK(in.good(), NotFound, "cannot open cluster file '", path, "'");
  std::stringstream buffer;
  buffer << in.rdbuf();
  return parse(buffer.str(), path);
}

void ClusterSpec::validate(const std::string& source) const {
  TESSERA_CHECK(!name.empty(), InvalidArgument, source, ": field 'name' is empty");
  const std::string topo = source + ": topology";
  TESSERA_CHECK(topology.devices_per_node >= 1, InvalidArgument, topo,
                ": field 'devices_per_node': must be >= 1");
  TESSERA_CHECK(topology.num_nodes >= 0, InvalidArgument, topo,
                ": field 'num_nodes': must be >= 0");
  TESSERA_CHECK(topology.nics_per_node >= 1, InvalidArgument, topo,
                ": field 'nics_per_node': must be >= 1");
  for (const auto& [key, link] :
       {std::pair<const char*, LinkSpec>{"intra_node", topology.intra_node},
        std::pair<const char*, LinkSpec>{"inter_node", topology.inter_node}}) {
    TESSERA_CHECK(std::isfinite(link.bandwidth_gbps) && link.bandwidth_gbps > 0, InvalidArgument,
                  topo, ".", key, ": field 'bandwidth_gbps': must be > 0, got ",
                  link.bandwidth_gbps);
    TESSERA_CHECK(std::isfinite(link.latency_us) && link.latency_us >= 0, InvalidArgument, topo,
                  ".", key, ": field 'latency_us': must be >= 0, got ", link.latency_us);
  }
  for (size_t k = 0; k < topology.host_compute_slowdown.size(); ++k) {
    const double v = topology.host_compute_slowdown[k];
    TESSERA_CHECK(std::isfinite(v) && v > 0, InvalidArgument, topo,
                  ": field 'host_compute_slowdown': entry ", k, " must be > 0, got ", v);
  }
  for (size_t k = 0; k < topology.host_lockstep_slowdown.size(); ++k) {
    const double v = topology.host_lockstep_slowdown[k];
    TESSERA_CHECK(std::isfinite(v) && v > 0, InvalidArgument, topo,
                  ": field 'host_lockstep_slowdown': entry ", k, " must be > 0, got ", v);
  }
  for (size_t k = 0; k < topology.host_sync_us.size(); ++k) {
    const double v = topology.host_sync_us[k];
    TESSERA_CHECK(std::isfinite(v) && v >= 0 && v < 1e7, InvalidArgument, topo,
                  ": field 'host_sync_us': entry ", k, " must be in [0, 1e7), got ", v);
  }
  for (size_t k = 0; k < topology.host_sync_skew.size(); ++k) {
    const double v = topology.host_sync_skew[k];
    TESSERA_CHECK(std::isfinite(v) && v >= 0 && v < 10, InvalidArgument, topo,
                  ": field 'host_sync_skew': entry ", k, " must be in [0, 10), got ", v);
  }
  for (size_t k = 0; k < topology.host_comm_load.size(); ++k) {
    const CommLoadPoint& p = topology.host_comm_load[k];
    TESSERA_CHECK(p.bytes > 0 && (k == 0 || p.bytes > topology.host_comm_load[k - 1].bytes),
                  InvalidArgument, topo, ".host_comm_load[", k,
                  "]: field 'bytes': must be > 0 and ", "above the previous point's, got ",
                  p.bytes);
    TESSERA_CHECK(std::isfinite(p.load) && p.load >= 0 && p.load <= 4, InvalidArgument, topo,
                  ".host_comm_load[", k, "]: field 'load': must be in [0, 4], got ", p.load);
  }
  for (const auto& [algorithm, regimes] : defaults.algorithms) {
    validate_regimes(regimes, source + ": algorithms." + algorithm_name(algorithm));
  }
  for (const auto& [kind, params] : overrides) {
    for (const auto& [algorithm, regimes] : params.algorithms) {
      validate_regimes(regimes, source + ": collectives." + collective_kind_name(kind) + "." +
                                    algorithm_name(algorithm));
    }
  }
}

std::string ClusterSpec::to_json() const {
  json topo = {{"devices_per_node", topology.devices_per_node},
               {"num_nodes", topology.num_nodes},
               {"nics_per_node", topology.nics_per_node},
               {"intra_node",
                {{"bandwidth_gbps", topology.intra_node.bandwidth_gbps},
                 {"latency_us", topology.intra_node.latency_us}}},
               {"inter_node",
                {{"bandwidth_gbps", topology.inter_node.bandwidth_gbps},
                 {"latency_us", topology.inter_node.latency_us}}}};
  if (!topology.host_compute_slowdown.empty()) {
    topo["host_compute_slowdown"] = topology.host_compute_slowdown;
  }
  if (!topology.host_sync_skew.empty()) topo["host_sync_skew"] = topology.host_sync_skew;
  if (!topology.host_lockstep_slowdown.empty()) {
    topo["host_lockstep_slowdown"] = topology.host_lockstep_slowdown;
  }
  if (!topology.host_sync_us.empty()) topo["host_sync_us"] = topology.host_sync_us;
  if (!topology.host_comm_load.empty()) {
    json points = json::array();
    for (const CommLoadPoint& p : topology.host_comm_load) {
      points.push_back({{"bytes", p.bytes}, {"load", p.load}});
    }
    topo["host_comm_load"] = std::move(points);
  }
  json root = {{"schema", kSchema},
               {"name", name},
               {"topology", std::move(topo)},
               {"algorithms", algorithms_json(defaults)}};
  if (!description.empty()) root["description"] = description;
  if (!provenance.empty()) root["provenance"] = provenance;
  if (!overrides.empty()) {
    json colls = json::object();
    for (const auto& [kind, params] : overrides) {
      colls[collective_kind_name(kind)] = algorithms_json(params);
    }
    root["collectives"] = std::move(colls);
  }
  return root.dump(2) + "\n";
}

double Topology::comm_load(int64_t bytes) const {
  if (host_comm_load.empty()) return 0.0;
  if (bytes <= host_comm_load.front().bytes) return host_comm_load.front().load;
  if (bytes >= host_comm_load.back().bytes) return host_comm_load.back().load;
  auto hi = std::upper_bound(host_comm_load.begin(), host_comm_load.end(), bytes,
                             [](int64_t b, const CommLoadPoint& p) { return b < p.bytes; });
  auto lo = hi - 1;
  const double f = std::log(static_cast<double>(bytes) / static_cast<double>(lo->bytes)) /
                   std::log(static_cast<double>(hi->bytes) / static_cast<double>(lo->bytes));
  return lo->load + f * (hi->load - lo->load);
}

const AlgorithmParams* ClusterSpec::params(CollectiveKind op, Algorithm algorithm) const {
  auto it = overrides.find(op);
  if (it != overrides.end()) {
    auto found = it->second.algorithms.find(algorithm);
    if (found != it->second.algorithms.end()) return &found->second;
  }
  auto found = defaults.algorithms.find(algorithm);
  return found == defaults.algorithms.end() ? nullptr : &found->second;
}

bool ClusterSpec::operator==(const ClusterSpec& other) const {
  return cluster_difference(*this, other, 0.0).empty();
}

std::string cluster_difference(const ClusterSpec& a, const ClusterSpec& b, double rel_tol) {
  if (a.name != b.name) return "name: " + a.name + " vs " + b.name;
  if (a.description != b.description) return "description differs";
  if (a.provenance != b.provenance) return "provenance differs";
  const Topology& x = a.topology;
  const Topology& y = b.topology;
  if (x.devices_per_node != y.devices_per_node) return "topology.devices_per_node differs";
  if (x.num_nodes != y.num_nodes) return "topology.num_nodes differs";
  if (x.nics_per_node != y.nics_per_node) return "topology.nics_per_node differs";
  if (!close(x.intra_node.bandwidth_gbps, y.intra_node.bandwidth_gbps, rel_tol) ||
      !close(x.intra_node.latency_us, y.intra_node.latency_us, rel_tol)) {
    return "topology.intra_node differs";
  }
  if (!close(x.inter_node.bandwidth_gbps, y.inter_node.bandwidth_gbps, rel_tol) ||
      !close(x.inter_node.latency_us, y.inter_node.latency_us, rel_tol)) {
    return "topology.inter_node differs";
  }
  // Slowdowns compare relatively, the skew shares (near 0) absolutely.
  auto list_difference = [rel_tol](const std::vector<double>& u, const std::vector<double>& v,
                                   const char* key, bool relative) -> std::string {
    if (u.size() != v.size()) return std::string("topology.") + key + " differs in length";
    for (size_t k = 0; k < u.size(); ++k) {
      if (relative ? !close(u[k], v[k], rel_tol) : std::abs(u[k] - v[k]) > rel_tol) {
        return std::string("topology.") + key + "[" + std::to_string(k) + "] differs";
      }
    }
    return "";
  };
  for (const std::string& diff :
       {list_difference(x.host_compute_slowdown, y.host_compute_slowdown, "host_compute_slowdown",
                        true),
        list_difference(x.host_sync_skew, y.host_sync_skew, "host_sync_skew", false),
        list_difference(x.host_lockstep_slowdown, y.host_lockstep_slowdown,
                        "host_lockstep_slowdown", true),
        list_difference(x.host_sync_us, y.host_sync_us, "host_sync_us", true)}) {
    if (!diff.empty()) return diff;
  }
  if (x.host_comm_load.size() != y.host_comm_load.size()) {
    return "topology.host_comm_load differs in length";
  }
  for (size_t k = 0; k < x.host_comm_load.size(); ++k) {
    if (x.host_comm_load[k].bytes != y.host_comm_load[k].bytes ||
        std::abs(x.host_comm_load[k].load - y.host_comm_load[k].load) > rel_tol) {
      return "topology.host_comm_load[" + std::to_string(k) + "] differs";
    }
  }
  std::string diff = params_difference(a.defaults, b.defaults, "algorithms", rel_tol);
  if (!diff.empty()) return diff;
  if (a.overrides.size() != b.overrides.size()) return "collectives: different overrides";
  for (const auto& [kind, params] : a.overrides) {
    auto it = b.overrides.find(kind);
    if (it == b.overrides.end()) {
      return std::string("collectives.") + collective_kind_name(kind) + ": only in the first";
    }
    diff = params_difference(params, it->second,
                             std::string("collectives.") + collective_kind_name(kind), rel_tol);
    if (!diff.empty()) return diff;
  }
  return "";
}

}  // namespace tessera::sim
