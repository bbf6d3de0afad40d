#include "tessera/sim/trace.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <numeric>
#include <sstream>
#include <unordered_map>

#include "json_reader.h"
#include "tessera/core/error.h"
#include "util.h"

namespace tessera::sim {

using detail::json;
using detail::JsonObject;

namespace {

constexpr const char* kSchema = "tessera.sim.trace/1";

std::string entry_where(const std::string& source, size_t entry, const std::vector<int>& ranks) {
  return source + ": rank entry " + std::to_string(entry) + " (ranks " +
         detail::format_ranks(ranks) + ")";
}

// "rank entry 2 (ranks [0-3]), node 5 (id 7 'x')" without the source.
std::string node_path(size_t entry, const RankTrace& rt, size_t index) {
  std::string out = "rank entry " + std::to_string(entry) + " (ranks " +
                    detail::format_ranks(rt.ranks) + "), node " + std::to_string(index);
  if (index < rt.nodes.size()) {
    out += " (id " + std::to_string(rt.nodes[index].id);
    if (!rt.nodes[index].name.empty()) out += " '" + rt.nodes[index].name + "'";
    out += ")";
  }
  return out;
}

std::string node_where(const std::string& source, size_t entry, const RankTrace& rt, size_t index) {
  return source + ": " + node_path(entry, rt, index);
}

NodeKind parse_node_kind(const JsonObject& obj) {
  const std::string kind = obj.get_string("kind");
  if (kind == "compute") return NodeKind::kCompute;
  if (kind == "collective") return NodeKind::kCollective;
  if (kind == "p2p_send") return NodeKind::kSend;
  if (kind == "p2p_recv") return NodeKind::kRecv;
  obj.fail("kind",
           "unknown kind '" + kind + "' (expected compute, collective, p2p_send or p2p_recv)");
}

int to_rank(const JsonObject& obj, std::string_view key, int64_t value) {
  if (value < 0 || value > (int64_t{1} << 30)) {
    obj.fail(key, "rank " + std::to_string(value) + " is out of range");
  }
  return static_cast<int>(value);
}

std::vector<int> parse_rank_list(const JsonObject& obj, std::string_view key) {
  std::vector<int> out;
  for (int64_t r : obj.get_int_list(key)) out.push_back(to_rank(obj, key, r));
  return out;
}

TraceNode parse_node(const json& value, const std::string& source, const std::string& path) {
  JsonObject obj(value, source, path);
  TraceNode node;
  node.id = obj.get_int("id");
  node.kind = parse_node_kind(obj);
  node.name = obj.get_string("name");
  node.stream = obj.get_string("stream", node.kind == NodeKind::kCompute ? "compute" : "comm");
  if (obj.has("deps")) node.deps = obj.get_int_list("deps");
  node.call_site = obj.get_string("call_site", "");
  switch (node.kind) {
    case NodeKind::kCompute: {
      node.duration = Microseconds(obj.get_nonnegative("duration_us"));
      if (obj.has("step_durations_us")) {
        for (const json& x : obj.get_array("step_durations_us")) {
          if (!x.is_number() || !std::isfinite(x.get<double>()) || x.get<double>() < 0) {
            obj.fail("step_durations_us", "expected a list of numbers >= 0, found " + x.dump());
          }
          node.step_durations.emplace_back(x.get<double>());
        }
        if (node.step_durations.empty()) obj.fail("step_durations_us", "empty list");
      }
      node.compute_kind = obj.get_string("compute_kind", "other");
      node.flops = obj.get_nonnegative("flops", 0.0);
      break;
    }
    case NodeKind::kCollective: {
      const std::string op = obj.get_string("op");
      try {
        node.op = parse_collective_kind(op);
      } catch (const InvalidArgument& e) {
        obj.fail("op", e.message());
      }
      if (node.op == CollectiveKind::kSendRecv) {
        obj.fail("op", "send_recv is not a collective; use kind p2p_send / p2p_recv");
      }
      const json& group = obj.at("group");
      if (group.is_string()) {
        node.group.partition = group.get<std::string>();
        if (node.group.partition.empty()) obj.fail("group", "empty partition name");
      } else if (group.is_array()) {
        node.group.members = parse_rank_list(obj, "group");
        std::sort(node.group.members.begin(), node.group.members.end());
      } else {
        obj.fail("group", "expected a list of ranks or a partition name, got " + group.dump());
      }
      node.bytes = obj.get_size("bytes");
      node.dtype = obj.get_string("dtype", "");
      if (node.op == CollectiveKind::kBroadcast) {
        node.root_index = static_cast<int>(obj.get_size("root_index"));
      }
      break;
    }
    case NodeKind::kSend:
    case NodeKind::kRecv: {
      node.op = CollectiveKind::kSendRecv;
      const bool absolute = obj.has("peer");
      const bool relative = obj.has("peer_offset");
      if (absolute == relative) {
        obj.fail("peer", "give exactly one of 'peer' (a global rank) and 'peer_offset'");
      }
      if (absolute) {
        node.peer = to_rank(obj, "peer", obj.get_int("peer"));
      } else {
        const int64_t offset = obj.get_int("peer_offset");
        if (std::llabs(offset) > (int64_t{1} << 30)) obj.fail("peer_offset", "out of range");
        node.peer_relative = true;
        node.peer_offset = static_cast<int>(offset);
      }
      node.bytes = obj.get_size("bytes");
      node.dtype = obj.get_string("dtype", "");
      node.tag = obj.get_size("tag", 0);
      break;
    }
  }
  obj.check_keys();
  return node;
}

// Finds a cycle among the nodes Kahn's algorithm could not order and
// describes it: "node 3 (id 7 'x') waits for node 5 (id 9 'y') [stream
// 'comm' order] waits for node 3 ...".
std::string describe_cycle(const RankTrace& rt, const std::vector<std::vector<int>>& preds,
                           const std::vector<int>& stream_pred, const std::vector<int>& indegree) {
  auto label = [&](int i) {
    return "node " + std::to_string(i) + " (id " + std::to_string(rt.nodes[i].id) + " '" +
           rt.nodes[i].name + "')";
  };
  int start = -1;
  for (size_t i = 0; i < indegree.size(); ++i) {
    if (indegree[i] > 0) {
      start = static_cast<int>(i);
      break;
    }
  }
  // Every unordered node waits for at least one unordered node, so walking
  // to such a predecessor must revisit a node.
  std::vector<int> seen_at(rt.nodes.size(), -1);
  std::vector<int> path;
  int current = start;
  while (seen_at[current] < 0) {
    seen_at[current] = static_cast<int>(path.size());
    path.push_back(current);
    int next = -1;
    if (stream_pred[current] >= 0 && indegree[stream_pred[current]] > 0)
      next = stream_pred[current];
    for (int p : preds[current]) {
      if (indegree[p] > 0) {
        next = p;
        break;
      }
    }
    current = next;
  }
  std::string out;
  for (size_t k = static_cast<size_t>(seen_at[current]); k < path.size(); ++k) {
    const int node = path[k];
    const int next = k + 1 < path.size() ? path[k + 1] : current;
    out += label(node) + " waits for ";
    if (stream_pred[node] == next &&
        std::find(preds[node].begin(), preds[node].end(), next) == preds[node].end()) {
      out += "[order on stream '" + rt.nodes[node].stream + "'] ";
    }
  }
  return out + label(current);
}

}  // namespace

const char* node_kind_name(NodeKind kind) {
  switch (kind) {
    case NodeKind::kCompute:
      return "compute";
    case NodeKind::kCollective:
      return "collective";
    case NodeKind::kSend:
      return "p2p_send";
    case NodeKind::kRecv:
      return "p2p_recv";
  }
  return "?";
}

Trace Trace::parse(std::string_view text, std::string source) {
  const json root = detail::parse_json(text, source);
  JsonObject top(root, source);
  Trace trace;
  trace.source = source;
  const std::string schema = top.get_string("schema");
  if (schema != kSchema) {
    top.fail("schema", "expected '" + std::string(kSchema) + "', got '" + schema + "'");
  }

  JsonObject meta = top.get_object("metadata");
  const int64_t world = meta.get_int("world_size");
  if (world < 1 || world > (int64_t{1} << 24)) {
    meta.fail("world_size", "must be between 1 and 2^24, got " + std::to_string(world));
  }
  trace.metadata.world_size = static_cast<int>(world);
  if (meta.has("layout")) {
    JsonObject layout = meta.get_object("layout");
    for (const std::string& axis : layout.keys()) {
      const int64_t v = layout.get_int(axis);
      if (v < 1 || v > world) {
        layout.fail(axis, "axis size must be between 1 and world_size, got " + std::to_string(v));
      }
      trace.metadata.layout[axis] = static_cast<int>(v);
    }
    layout.check_keys();
  }
  trace.metadata.model = meta.get_string("model", "");
  trace.metadata.memory_capacity_bytes = meta.get_size("memory_capacity_bytes", 0);
  if (meta.has("groups")) {
    JsonObject groups = meta.get_object("groups");
    for (const std::string& name : groups.keys()) {
      const json& list = groups.get_array(name);
      std::vector<std::vector<int>> parts;
      for (size_t g = 0; g < list.size(); ++g) {
        const std::string where = groups.where() + "." + name + "[" + std::to_string(g) + "]";
        TESSERA_CHECK(list[g].is_array(), InvalidArgument, where,
                      ": expected a list of ranks, got ", list[g].dump());
        std::vector<int> members;
        for (const json& r : list[g]) {
          TESSERA_CHECK(r.is_number_integer() && r.get<int64_t>() >= 0 &&
                            r.get<int64_t>() < (int64_t{1} << 30),
                        InvalidArgument, where, ": expected a list of ranks, found ", r.dump());
          members.push_back(r.get<int>());
        }
        std::sort(members.begin(), members.end());
        parts.push_back(std::move(members));
      }
      trace.metadata.groups[name] = std::move(parts);
    }
    groups.check_keys();
  }
  meta.check_keys();

  const json& entries = top.get_array("ranks");
  for (size_t e = 0; e < entries.size(); ++e) {
    JsonObject entry(entries[e], source, "rank entry " + std::to_string(e));
    RankTrace rt;
    rt.ranks = parse_rank_list(entry, "ranks");
    std::sort(rt.ranks.begin(), rt.ranks.end());
    rt.peak_memory_bytes = entry.get_size("peak_memory_bytes", 0);
    const json& nodes = entry.get_array("nodes");
    rt.nodes.reserve(nodes.size());
    for (size_t i = 0; i < nodes.size(); ++i) {
      std::string path = node_path(e, rt, i);
      if (nodes[i].is_object() && nodes[i].contains("id") && nodes[i]["id"].is_number_integer()) {
        path += " (id " + std::to_string(nodes[i]["id"].get<int64_t>()) + ")";
      }
      rt.nodes.push_back(parse_node(nodes[i], source, path));
    }
    entry.check_keys();
    trace.entries.push_back(std::move(rt));
  }
  top.check_keys();
  trace.validate();
  return trace;
}

Trace Trace::load_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  TESSERA_CHECK(in.good(), NotFound, "cannot open trace file '", path, "'");
  std::stringstream buffer;
  buffer << in.rdbuf();
  return parse(buffer.str(), path);
}

void Trace::validate() {
  const int world = metadata.world_size;
  TESSERA_CHECK(world >= 1, InvalidArgument, source, ": metadata.world_size must be >= 1, got ",
                world);
  if (!metadata.layout.empty()) {
    int64_t product = 1;
    for (const auto& [axis, size] : metadata.layout) {
      TESSERA_CHECK(size >= 1, InvalidArgument, source, ": metadata.layout.", axis,
                    " must be >= 1, got ", size);
      product *= size;
    }
    TESSERA_CHECK(product == world, InvalidArgument, source,
                  ": metadata.layout: the product of the axis sizes is ", product,
                  ", but world_size is ", world);
  }
  TESSERA_CHECK(metadata.memory_capacity_bytes >= 0, InvalidArgument, source,
                ": metadata.memory_capacity_bytes must be >= 0");

  partition_index_.clear();
  for (const auto& [name, parts] : metadata.groups) {
    std::vector<int> index(static_cast<size_t>(world), -1);
    for (size_t g = 0; g < parts.size(); ++g) {
      const std::string where =
          source + ": metadata.groups." + name + "[" + std::to_string(g) + "]";
      TESSERA_CHECK(!parts[g].empty(), InvalidArgument, where, ": empty group");
      TESSERA_CHECK(std::is_sorted(parts[g].begin(), parts[g].end()), InvalidArgument, where,
                    ": members must be sorted");
      for (int r : parts[g]) {
        TESSERA_CHECK(r >= 0 && r < world, InvalidArgument, where, ": rank ", r, " is outside [0, ",
                      world, ")");
        TESSERA_CHECK(index[r] < 0, InvalidArgument, where, ": rank ", r, " is already in group ",
                      index[r], " of partition '", name, "'");
        index[r] = static_cast<int>(g);
      }
    }
    partition_index_.emplace(name, std::move(index));
  }

  entry_of_rank_.assign(static_cast<size_t>(world), -1);
  for (size_t e = 0; e < entries.size(); ++e) {
    const RankTrace& rt = entries[e];
    const std::string where = entry_where(source, e, rt.ranks);
    TESSERA_CHECK(!rt.ranks.empty(), InvalidArgument, where, ": field 'ranks' is empty");
    TESSERA_CHECK(std::is_sorted(rt.ranks.begin(), rt.ranks.end()), InvalidArgument, where,
                  ": field 'ranks' must be sorted");
    TESSERA_CHECK(rt.peak_memory_bytes >= 0, InvalidArgument, where,
                  ": field 'peak_memory_bytes' must be >= 0");
    for (int r : rt.ranks) {
      TESSERA_CHECK(r >= 0 && r < world, InvalidArgument, where, ": field 'ranks': rank ", r,
                    " is outside [0, world_size = ", world, ")");
      TESSERA_CHECK(entry_of_rank_[r] < 0, InvalidArgument, where, ": field 'ranks': rank ", r,
                    " is already covered by rank entry ", entry_of_rank_[r]);
      entry_of_rank_[r] = static_cast<int>(e);
    }
  }
  for (int r = 0; r < world; ++r) {
    TESSERA_CHECK(entry_of_rank_[r] >= 0, InvalidArgument, source, ": rank ", r,
                  " has no entry in 'ranks' (world_size is ", world, ")");
  }

  int measured_steps = -1;  // set by the first compute node
  for (size_t e = 0; e < entries.size(); ++e) {
    const RankTrace& rt = entries[e];
    const size_t n = rt.nodes.size();
    std::unordered_map<int64_t, int> index_of_id;
    index_of_id.reserve(n * 2);
    for (size_t i = 0; i < n; ++i) {
      const TraceNode& node = rt.nodes[i];
      auto [it, inserted] = index_of_id.emplace(node.id, static_cast<int>(i));
      TESSERA_CHECK(inserted, InvalidArgument, node_where(source, e, rt, i), ": field 'id': id ",
                    node.id, " is already used by node ", it->second);
    }
    std::vector<std::vector<int>> preds(n);
    std::vector<int> stream_pred(n, -1);
    std::map<std::string, int, std::less<>> last_on_stream;
    for (size_t i = 0; i < n; ++i) {
      const TraceNode& node = rt.nodes[i];
      auto where = [&] { return node_where(source, e, rt, i); };
      TESSERA_CHECK(!node.name.empty(), InvalidArgument, where(), ": field 'name' is empty");
      TESSERA_CHECK(!node.stream.empty(), InvalidArgument, where(), ": field 'stream' is empty");
      for (int64_t dep : node.deps) {
        auto it = index_of_id.find(dep);
        TESSERA_CHECK(it != index_of_id.end(), InvalidArgument, where(), ": field 'deps': id ", dep,
                      " does not name a node of this entry");
        TESSERA_CHECK(it->second != static_cast<int>(i), InvalidArgument, where(),
                      ": field 'deps': a node cannot wait for itself");
        TESSERA_CHECK(std::find(preds[i].begin(), preds[i].end(), it->second) == preds[i].end(),
                      InvalidArgument, where(), ": field 'deps': id ", dep, " is listed twice");
        preds[i].push_back(it->second);
      }
      auto [slot, first] = last_on_stream.try_emplace(node.stream, static_cast<int>(i));
      if (!first) {
        stream_pred[i] = slot->second;
        slot->second = static_cast<int>(i);
      }
      switch (node.kind) {
        case NodeKind::kCompute:
          TESSERA_CHECK(std::isfinite(node.duration.count()) && node.duration.count() >= 0,
                        InvalidArgument, where(), ": field 'duration_us' must be >= 0, got ",
                        node.duration.count());
          TESSERA_CHECK(std::isfinite(node.flops) && node.flops >= 0, InvalidArgument, where(),
                        ": field 'flops' must be >= 0, got ", node.flops);
          for (Microseconds d : node.step_durations) {
            TESSERA_CHECK(std::isfinite(d.count()) && d.count() >= 0, InvalidArgument, where(),
                          ": field 'step_durations_us' must hold numbers >= 0, got ", d.count());
          }
          if (measured_steps < 0) measured_steps = static_cast<int>(node.step_durations.size());
          TESSERA_CHECK(static_cast<int>(node.step_durations.size()) == measured_steps,
                        InvalidArgument, where(), ": field 'step_durations_us' gives ",
                        node.step_durations.size(),
                        " measured steps, the trace's first compute "
                        "node ",
                        measured_steps, " (every compute node gives all of them or none)");
          break;
        case NodeKind::kCollective: {
          TESSERA_CHECK(node.op != CollectiveKind::kSendRecv, InvalidArgument, where(),
                        ": field 'op': send_recv is not a collective");
          TESSERA_CHECK(node.bytes >= 0, InvalidArgument, where(),
                        ": field 'bytes' must be >= 0, got ", node.bytes);
          const bool named = !node.group.partition.empty();
          TESSERA_CHECK(named != !node.group.members.empty(), InvalidArgument, where(),
                        ": field 'group': give either a partition name or a non-empty rank list");
          if (named) {
            TESSERA_CHECK(partition_index_.count(node.group.partition) > 0, InvalidArgument,
                          where(), ": field 'group': no partition '", node.group.partition,
                          "' in metadata.groups");
          } else {
            const auto& m = node.group.members;
            for (size_t k = 0; k < m.size(); ++k) {
              TESSERA_CHECK(m[k] >= 0 && m[k] < world, InvalidArgument, where(),
                            ": field 'group': rank ", m[k], " is outside [0, ", world, ")");
              TESSERA_CHECK(k == 0 || m[k] > m[k - 1], InvalidArgument, where(),
                            ": field 'group': ranks must be sorted and distinct, found ", m[k],
                            " after ", m[k - 1]);
            }
          }
          for (int r : rt.ranks) {
            const std::vector<int>* members = nullptr;
            if (named) {
              const int g = partition_index_.find(node.group.partition)->second[r];
              TESSERA_CHECK(g >= 0, InvalidArgument, where(), ": field 'group': rank ", r,
                            " is in no group of partition '", node.group.partition, "'");
              members = &metadata.groups.find(node.group.partition)->second[g];
            } else {
              members = &node.group.members;
              TESSERA_CHECK(std::binary_search(members->begin(), members->end(), r),
                            InvalidArgument, where(),
                            ": field 'group': ", detail::format_ranks(*members),
                            " does not contain rank ", r);
            }
            if (node.op == CollectiveKind::kBroadcast) {
              TESSERA_CHECK(
                  node.root_index >= 0 && node.root_index < static_cast<int>(members->size()),
                  InvalidArgument, where(), ": field 'root_index': ", node.root_index,
                  " is not a position in the group ", detail::format_ranks(*members), " of rank ",
                  r);
            }
          }
          TESSERA_CHECK(node.op == CollectiveKind::kBroadcast || node.root_index < 0,
                        InvalidArgument, where(), ": field 'root_index' is only for broadcast");
          break;
        }
        case NodeKind::kSend:
        case NodeKind::kRecv:
          TESSERA_CHECK(node.bytes >= 0, InvalidArgument, where(),
                        ": field 'bytes' must be >= 0, got ", node.bytes);
          TESSERA_CHECK(node.tag >= 0, InvalidArgument, where(), ": field 'tag' must be >= 0");
          for (int r : rt.ranks) {
            const int peer = node.peer_of(r);
            TESSERA_CHECK(peer >= 0 && peer < world, InvalidArgument, where(), ": field '",
                          node.peer_relative ? "peer_offset" : "peer", "': peer of rank ", r,
                          " would be ", peer, ", outside [0, ", world, ")");
            TESSERA_CHECK(peer != r, InvalidArgument, where(), ": field '",
                          node.peer_relative ? "peer_offset" : "peer", "': rank ", r,
                          " cannot send to or receive from itself");
          }
          break;
      }
    }

    // Kahn's algorithm over deps and stream order together: a node that
    // can never be ordered sits on a cycle (or behind one).
    std::vector<std::vector<int>> succs(n);
    std::vector<int> indegree(n, 0);
    for (size_t i = 0; i < n; ++i) {
      for (int p : preds[i]) succs[p].push_back(static_cast<int>(i));
      indegree[i] = static_cast<int>(preds[i].size());
      if (stream_pred[i] >= 0) {
        succs[stream_pred[i]].push_back(static_cast<int>(i));
        ++indegree[i];
      }
    }
    std::vector<int> ready;
    for (size_t i = 0; i < n; ++i) {
      if (indegree[i] == 0) ready.push_back(static_cast<int>(i));
    }
    size_t ordered = 0;
    while (!ready.empty()) {
      const int i = ready.back();
      ready.pop_back();
      ++ordered;
      for (int s : succs[i]) {
        if (--indegree[s] == 0) ready.push_back(s);
      }
    }
    TESSERA_CHECK(ordered == n, InvalidArgument, entry_where(source, e, rt.ranks),
                  ": dependency cycle: ", describe_cycle(rt, preds, stream_pred, indegree));
  }
  measured_steps_ = std::max(measured_steps, 0);
}

Trace Trace::step(int step) const {
  TESSERA_CHECK(step >= 0 && step < measured_steps_, InvalidArgument, source, ": step ", step,
                " is outside the trace's ", measured_steps_, " measured steps");
  Trace out = *this;
  out.source = source + " (measured step " + std::to_string(step) + ")";
  for (RankTrace& rt : out.entries) {
    for (TraceNode& node : rt.nodes) {
      if (node.kind != NodeKind::kCompute) continue;
      node.duration = node.step_durations[static_cast<size_t>(step)];
      node.step_durations.clear();
    }
  }
  out.measured_steps_ = 0;
  return out;
}

int Trace::entry_of(int rank) const {
  TESSERA_CHECK(rank >= 0 && rank < static_cast<int>(entry_of_rank_.size()), InvalidArgument,
                source, ": rank ", rank, " is outside [0, ", entry_of_rank_.size(),
                ") (or the trace was not validated)");
  return entry_of_rank_[rank];
}

const std::vector<int>& Trace::resolve_group(const GroupRef& group, int rank) const {
  if (group.partition.empty()) {
    TESSERA_CHECK(std::binary_search(group.members.begin(), group.members.end(), rank),
                  InvalidArgument, source, ": group ", detail::format_ranks(group.members),
                  " does not contain rank ", rank);
    return group.members;
  }
  auto it = partition_index_.find(group.partition);
  TESSERA_CHECK(it != partition_index_.end(), InvalidArgument, source, ": no partition '",
                group.partition, "' (or the trace was not validated)");
  TESSERA_CHECK(rank >= 0 && rank < static_cast<int>(it->second.size()) && it->second[rank] >= 0,
                InvalidArgument, source, ": rank ", rank, " is in no group of partition '",
                group.partition, "'");
  return metadata.groups.find(group.partition)->second[it->second[rank]];
}

std::string Trace::to_json() const {
  json meta = {{"world_size", metadata.world_size}};
  if (!metadata.layout.empty()) meta["layout"] = metadata.layout;
  if (!metadata.model.empty()) meta["model"] = metadata.model;
  if (metadata.memory_capacity_bytes > 0) {
    meta["memory_capacity_bytes"] = metadata.memory_capacity_bytes;
  }
  if (!metadata.groups.empty()) meta["groups"] = metadata.groups;
  json ranks = json::array();
  for (const RankTrace& rt : entries) {
    json nodes = json::array();
    for (const TraceNode& node : rt.nodes) {
      json j = {{"id", node.id},
                {"kind", node_kind_name(node.kind)},
                {"name", node.name},
                {"stream", node.stream}};
      if (!node.deps.empty()) j["deps"] = node.deps;
      if (!node.call_site.empty()) j["call_site"] = node.call_site;
      switch (node.kind) {
        case NodeKind::kCompute:
          j["duration_us"] = node.duration.count();
          if (!node.step_durations.empty()) {
            json steps = json::array();
            for (Microseconds d : node.step_durations) steps.push_back(d.count());
            j["step_durations_us"] = std::move(steps);
          }
          j["compute_kind"] = node.compute_kind.empty() ? "other" : node.compute_kind;
          if (node.flops > 0) j["flops"] = node.flops;
          break;
        case NodeKind::kCollective:
          j["op"] = collective_kind_name(node.op);
          if (node.group.partition.empty()) {
            j["group"] = node.group.members;
          } else {
            j["group"] = node.group.partition;
          }
          j["bytes"] = node.bytes;
          if (!node.dtype.empty()) j["dtype"] = node.dtype;
          if (node.op == CollectiveKind::kBroadcast) j["root_index"] = node.root_index;
          break;
        case NodeKind::kSend:
        case NodeKind::kRecv:
          if (node.peer_relative) {
            j["peer_offset"] = node.peer_offset;
          } else {
            j["peer"] = node.peer;
          }
          j["bytes"] = node.bytes;
          if (!node.dtype.empty()) j["dtype"] = node.dtype;
          if (node.tag != 0) j["tag"] = node.tag;
          break;
      }
      nodes.push_back(std::move(j));
    }
    json entry = {{"ranks", rt.ranks}, {"nodes", std::move(nodes)}};
    if (rt.peak_memory_bytes > 0) entry["peak_memory_bytes"] = rt.peak_memory_bytes;
    ranks.push_back(std::move(entry));
  }
  json root = {{"schema", kSchema}, {"metadata", std::move(meta)}, {"ranks", std::move(ranks)}};
  return root.dump(1);
}

}  // namespace tessera::sim
