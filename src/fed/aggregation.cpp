#include "tessera/fed/aggregation.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <regex>
#include <set>

#include "tessera/core/error.h"
#include "tessera/core/tensor.h"

namespace tessera::fed {

namespace {

// "<prefix>layers.<l>.<block_sparse_moe|mlp>.experts.<e>.<suffix>"
const std::regex& expert_pattern() {
  static const std::regex pattern(
      R"(^(?:.*\.)?layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(.+)$)");
  return pattern;
}

const std::regex& router_pattern() {
  static const std::regex pattern(
      R"(^(?:.*\.)?layers\.(\d+)\.(?:block_sparse_moe|mlp)\.gate\.weight$)");
  return pattern;
}

}  // namespace

std::optional<ExpertParameter> parse_expert_parameter(const std::string& name) {
  std::smatch m;
  if (!std::regex_match(name, m, expert_pattern())) return std::nullopt;
  return ExpertParameter{std::stoll(m[1].str()), std::stoll(m[2].str()), m[3].str()};
}

std::optional<int64_t> parse_router_parameter(const std::string& name) {
  std::smatch m;
  if (!std::regex_match(name, m, router_pattern())) return std::nullopt;
  return std::stoll(m[1].str());
}

std::vector<int64_t> ModelPartition::moe_layers() const {
  std::vector<int64_t> layers;
  for (const auto& [layer, name] : routers) layers.push_back(layer);
  return layers;
}

std::vector<std::string> ModelPartition::expert_names() const {
  std::vector<std::string> names;
  for (const auto& [key, list] : experts) names.insert(names.end(), list.begin(), list.end());
  return names;
}

std::vector<std::string> ModelPartition::all_names() const {
  std::vector<std::string> names = shared;
  for (const std::string& n : expert_names()) names.push_back(n);
  return names;
}

const std::vector<std::string>& ModelPartition::expert(int64_t layer, int64_t e) const {
  auto it = experts.find({layer, e});
  TESSERA_CHECK(it != experts.end(), NotFound, "model has no expert ", e, " in layer ", layer);
  return it->second;
}

ModelPartition partition_parameters(const std::vector<std::string>& names) {
  ModelPartition p;
  std::map<int64_t, std::set<int64_t>> experts_by_layer;
  for (const std::string& name : names) {
    if (auto e = parse_expert_parameter(name)) {
      p.experts[{e->layer, e->expert}].push_back(name);
      experts_by_layer[e->layer].insert(e->expert);
      continue;
    }
    if (auto layer = parse_router_parameter(name)) {
      TESSERA_CHECK(!p.routers.count(*layer), InvalidArgument, "two routers in layer ", *layer,
                    ": '", p.routers[*layer], "' and '", name, "'");
      p.routers[*layer] = name;
    }
    p.shared.push_back(name);
  }
  std::vector<std::string> reference_suffixes;
  std::pair<int64_t, int64_t> reference{-1, -1};
  for (const auto& [layer, indices] : experts_by_layer) {
    TESSERA_CHECK(p.routers.count(layer), InvalidArgument, "layer ", layer,
                  " has routed experts but no router ('...layers.", layer,
                  ".block_sparse_moe.gate.weight')");
    const int64_t count = static_cast<int64_t>(indices.size());
    TESSERA_CHECK(*indices.rbegin() == count - 1, InvalidArgument, "layer ", layer, " has experts ",
                  *indices.begin(), "..", *indices.rbegin(), " but only ", count,
                  " of them (expert indices must be 0..E-1)");
    if (p.num_experts == 0) p.num_experts = count;
    TESSERA_CHECK(count == p.num_experts, InvalidArgument, "layer ", layer, " has ", count,
                  " experts, another layer ", p.num_experts);
    for (int64_t e = 0; e < count; ++e) {
      std::vector<std::string> suffixes;
      for (const std::string& n : p.experts.at({layer, e}))
        suffixes.push_back(parse_expert_parameter(n)->suffix);
      if (reference.first < 0) {
        reference_suffixes = suffixes;
        reference = {layer, e};
      }
      TESSERA_CHECK(suffixes == reference_suffixes, InvalidArgument, "expert ", e, " of layer ",
                    layer, " has other parameters than expert ", reference.second, " of layer ",
                    reference.first);
    }
  }
  for (const auto& [layer, name] : p.routers) {
    TESSERA_CHECK(experts_by_layer.count(layer), InvalidArgument, "router '", name,
                  "' has no experts");
  }
  return p;
}

TensorMap weighted_average(const std::vector<const TensorMap*>& inputs,
                           const std::vector<double>& weights,
                           const std::vector<std::string>& names) {
  TESSERA_CHECK(!inputs.empty(), InvalidArgument, "weighted_average: no inputs");
  TESSERA_CHECK(inputs.size() == weights.size(), InvalidArgument,
                "weighted_average: ", inputs.size(), " inputs but ", weights.size(), " weights");
  double total = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    TESSERA_CHECK(std::isfinite(weights[i]) && weights[i] >= 0, InvalidArgument,
                  "weighted_average: weight ", i, " is ", weights[i],
                  " (expected a finite value >= 0)");
    total += weights[i];
  }
  TESSERA_CHECK(total > 0, InvalidArgument, "weighted_average: the weights sum to 0");
  TensorMap out;
  for (const std::string& name : names) {
    at::Tensor sum;
    at::ScalarType dtype = at::kFloat;
    for (size_t i = 0; i < inputs.size(); ++i) {
      auto it = inputs[i]->find(name);
      TESSERA_CHECK(it != inputs[i]->end(), InvalidArgument, "weighted_average: input ", i,
                    " lacks '", name, "'");
      const at::Tensor x = it->second.detach().to(at::kCPU, at::kDouble);
      if (i == 0) {
        dtype = it->second.scalar_type();
        sum = x * (weights[i] / total);
      } else {
        TESSERA_CHECK(x.sizes() == sum.sizes(), InvalidArgument, "weighted_average: '", name,
                      "' of input ", i, " has shape ", shape_string(x.sizes()), ", input 0 ",
                      shape_string(sum.sizes()));
        sum.add_(x, weights[i] / total);
      }
    }
    out[name] = sum.to(dtype);
  }
  return out;
}

const std::vector<Neighbour>& LayerNeighbours::row(int client, int64_t expert) const {
  auto it = std::find(clients.begin(), clients.end(), client);
  TESSERA_CHECK(it != clients.end() && expert >= 0 && expert < num_experts, NotFound,
                "neighbour matrix has no row for expert ", expert, " of client ", client);
  return rows[static_cast<size_t>((it - clients.begin()) * num_experts + expert)];
}

LayerNeighbours domain_neighbours(const std::vector<int>& clients,
                                  const std::vector<at::Tensor>& routers,
                                  const DomainAwareOptions& options) {
  TESSERA_CHECK(!clients.empty(), InvalidArgument, "domain_neighbours: no clients");
  TESSERA_CHECK(clients.size() == routers.size(), InvalidArgument,
                "domain_neighbours: ", clients.size(), " clients but ", routers.size(), " routers");
  TESSERA_CHECK(options.neighbours >= 0, InvalidArgument, "domain_neighbours: P (neighbours) is ",
                options.neighbours, ", expected >= 0");
  TESSERA_CHECK(options.temperature > 0 && std::isfinite(options.temperature), InvalidArgument,
                "domain_neighbours: temperature tau is ", options.temperature, ", expected > 0");
  std::set<int> seen;
  for (size_t k = 0; k < clients.size(); ++k) {
    TESSERA_CHECK(seen.insert(clients[k]).second, InvalidArgument, "domain_neighbours: client ",
                  clients[k], " appears twice");
    TESSERA_CHECK(routers[k].dim() == 2 && routers[k].sizes() == routers[0].sizes(),
                  InvalidArgument, "domain_neighbours: router of client ", clients[k],
                  " has shape ", shape_string(routers[k].sizes()), ", client ", clients[0], "'s ",
                  shape_string(routers[0].sizes()), " (expected the same [experts, hidden])");
  }
  LayerNeighbours out;
  out.clients = clients;
  out.num_experts = routers[0].size(0);
  const int64_t E = out.num_experts;
  const int64_t n = static_cast<int64_t>(clients.size()) * E;

  // Rows g_{c,e}, client-major; cosine similarity of unit rows.
  std::vector<at::Tensor> blocks;
  for (const at::Tensor& r : routers) blocks.push_back(r.detach().to(at::kCPU, at::kDouble));
  const at::Tensor g = at::cat(blocks, 0);
  const at::Tensor unit = g / g.norm(2, {1}, /*keepdim=*/true).clamp_min(1e-12);
  at::Tensor s = at::matmul(unit, unit.t()).contiguous();
  s.diagonal().fill_(1.0);  // a zero row is still most similar to itself
  out.similarity = s;
  const double* S = s.data_ptr<double>();

  out.rows.resize(static_cast<size_t>(n));
  std::vector<int64_t> candidates;
  for (int64_t i = 0; i < n; ++i) {
    candidates.clear();
    for (int64_t j = 0; j < n; ++j) {
      if (j == i) continue;
      if (options.scope == DomainAwareOptions::Scope::kSameExpert && j % E != i % E) continue;
      candidates.push_back(j);
    }
    const size_t keep =
        static_cast<size_t>(std::min<int64_t>(options.neighbours, candidates.size()));
    std::partial_sort(candidates.begin(), candidates.begin() + keep, candidates.end(),
                      [&](int64_t a, int64_t b) {
                        const double sa = S[i * n + a], sb = S[i * n + b];
                        return sa != sb ? sa > sb : a < b;
                      });
    std::vector<int64_t> chosen = {i};
    chosen.insert(chosen.end(), candidates.begin(), candidates.begin() + keep);
    // Softmax over S_ij / tau, shifted by the largest value (S_ii = 1) for
    // stability.
    double norm = 0;
    std::vector<Neighbour>& row = out.rows[static_cast<size_t>(i)];
    for (int64_t j : chosen) {
      Neighbour nb;
      nb.client = clients[static_cast<size_t>(j / E)];
      nb.expert = j % E;
      nb.similarity = S[i * n + j];
      nb.weight = std::exp((nb.similarity - 1.0) / options.temperature);
      norm += nb.weight;
      row.push_back(nb);
    }
    for (Neighbour& nb : row) nb.weight /= norm;
  }
  return out;
}

TensorMap mix_experts(const std::vector<std::pair<double, const TensorMap*>>& sources) {
  TESSERA_CHECK(!sources.empty(), InvalidArgument, "mix_experts: no sources");
  const TensorMap& first = *sources.front().second;
  TensorMap out;
  for (const auto& [suffix, t0] : first) {
    at::Tensor sum = at::zeros(t0.sizes(), at::TensorOptions().dtype(at::kDouble));
    for (size_t k = 0; k < sources.size(); ++k) {
      const TensorMap& src = *sources[k].second;
      TESSERA_CHECK(src.size() == first.size(), InvalidArgument, "mix_experts: source ", k, " has ",
                    src.size(), " parameters, source 0 has ", first.size());
      auto it = src.find(suffix);
      TESSERA_CHECK(it != src.end(), InvalidArgument, "mix_experts: source ", k, " lacks '", suffix,
                    "'");
      TESSERA_CHECK(it->second.sizes() == t0.sizes(), InvalidArgument, "mix_experts: '", suffix,
                    "' of source ", k, " has shape ", shape_string(it->second.sizes()),
                    ", source 0 ", shape_string(t0.sizes()));
      sum.add_(it->second.detach().to(at::kCPU, at::kDouble), sources[k].first);
    }
    out[suffix] = sum.to(t0.scalar_type());
  }
  return out;
}

}  // namespace tessera::fed
