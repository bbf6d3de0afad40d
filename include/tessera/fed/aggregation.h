// tessera/fed/aggregation.h — the arithmetic of federated aggregation over
// Mixture-of-Experts models: which parameters are shared and which belong
// to a routed expert, weighted averages (FedAvg), and FedMoE-DA's
// domain-aware neighbour selection and expert mixing.
//
// FedMoE-DA, as implemented here (docs/fed.md has the derivation). For one
// MoE layer with E experts over the clients c_1..c_C that have reported a
// router, the domain embedding of expert e of client c is row e of that
// client's router weight, g_{c,e} in R^H. Over all N = C*E (client, expert)
// pairs i, j:
//   S_ij = <g_i, g_j> / (|g_i| |g_j|)            (cosine; S_ii = 1)
//   N(i) = {i} + the P pairs j != i of largest S_ij among i's candidates
//          (every other pair, or with Scope::kSameExpert only the other
//          clients' copies of the same expert index), ties to the lower
//          index j
//   a_ij = exp(S_ij / tau) / sum_{k in N(i)} exp(S_ik / tau),  j in N(i)
// and the personalised expert is W'_i = sum_{j in N(i)} a_ij W_j.
//
//   auto part = tessera::fed::partition_parameters(names);
//   auto avg = tessera::fed::weighted_average({&a, &b}, {100, 300}, part.shared);
//   auto layer0 = tessera::fed::domain_neighbours({0, 1, 2}, {r0, r1, r2}, {});
//   // layer0.rows[c * E + e]: the neighbours of expert e of the c-th client
//
// Pure functions; thread-safe.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace tessera::fed {

// Parameters by Hugging Face name.
using TensorMap = std::map<std::string, at::Tensor>;

// A routed expert's parameter: "model.layers.3.block_sparse_moe.experts.5.w1.weight"
// (Mixtral) or "model.layers.3.mlp.experts.5.gate_proj.weight" (Qwen2-MoE)
// is {layer 3, expert 5, suffix "w1.weight"}.
struct ExpertParameter {
  int64_t layer = 0;
  int64_t expert = 0;
  std::string suffix;
};
std::optional<ExpertParameter> parse_expert_parameter(const std::string& name);
// The layer of a router ("model.layers.3.block_sparse_moe.gate.weight",
// "model.layers.3.mlp.gate.weight"); nullopt for anything else.
std::optional<int64_t> parse_router_parameter(const std::string& name);

// A model's parameters split as FedMoE-DA treats them: the routed experts'
// weights, and everything else (embeddings, attention, norms, routers,
// shared experts, the LM head), which the server averages.
struct ModelPartition {
  std::vector<std::string> shared;  // in the given order
  // (layer, expert) -> that expert's parameter names, in the given order.
  std::map<std::pair<int64_t, int64_t>, std::vector<std::string>> experts;
  std::map<int64_t, std::string> routers;  // layer -> router weight [E, H]
  int64_t num_experts = 0;                 // per MoE layer (0: a dense model)

  std::vector<int64_t> moe_layers() const;
  // Every expert parameter, layer by layer, expert by expert.
  std::vector<std::string> expert_names() const;
  // Every parameter: shared ones, then the experts'.
  std::vector<std::string> all_names() const;
  // The parameter names of one expert; NotFound naming it.
  const std::vector<std::string>& expert(int64_t layer, int64_t expert) const;
};
// InvalidArgument when a MoE layer lacks its router or an expert, or the
// experts of a layer differ in their parameter suffixes or count from
// another layer's.
ModelPartition partition_parameters(const std::vector<std::string>& names);

// sum_i weights[i] * inputs[i][name] / sum_i weights[i] for each name
// (FedAvg with weights = examples), accumulated in float64 and returned in
// each parameter's dtype. InvalidArgument for no inputs, a weight count
// that differs from the input count, a negative weight or a zero sum, a
// missing parameter or a shape mismatch (naming the parameter and input).
TensorMap weighted_average(const std::vector<const TensorMap*>& inputs,
                           const std::vector<double>& weights,
                           const std::vector<std::string>& names);

struct DomainAwareOptions {
  // P: neighbours kept per expert besides itself. Fewer when there are
  // fewer candidates; P >= candidates keeps them all.
  int64_t neighbours = 3;
  // tau: softmax temperature over cosine similarities (> 0). Small values
  // concentrate the weight on the most similar neighbours.
  double temperature = 0.1;
  enum class Scope {
    kAllExperts,  // every (client, expert) pair of the layer is a candidate
    kSameExpert,  // only the other clients' copies of the same expert index
  };
  Scope scope = Scope::kAllExperts;
};

// One entry of a row of FedMoE-DA's sparse neighbour matrix.
struct Neighbour {
  int client = 0;
  int64_t expert = 0;
  double similarity = 0;
  double weight = 0;  // a_ij; a row's weights sum to 1
};

// The neighbour matrix of one MoE layer.
struct LayerNeighbours {
  std::vector<int> clients;  // row blocks, in the given order
  int64_t num_experts = 0;
  // rows[k * num_experts + e]: neighbours of expert e of clients[k], the
  // expert itself first, then by decreasing similarity.
  std::vector<std::vector<Neighbour>> rows;
  at::Tensor similarity;  // [N, N] float64, N = clients * num_experts

  const std::vector<Neighbour>& row(int client, int64_t expert) const;  // NotFound
};

// The domain-aware neighbours of one layer from each client's router
// weight ([E, H], any float dtype). InvalidArgument for no clients, a
// repeated client, routers of different shapes, P < 0 or tau <= 0.
LayerNeighbours domain_neighbours(const std::vector<int>& clients,
                                  const std::vector<at::Tensor>& routers,
                                  const DomainAwareOptions& options);

// sum_k weight_k * source_k for expert parameters keyed by suffix
// ("w1.weight"), accumulated in float64, returned in the first source's
// dtypes. Every source must hold the same suffixes and shapes
// (InvalidArgument naming the suffix otherwise).
TensorMap mix_experts(const std::vector<std::pair<double, const TensorMap*>>& sources);

}  // namespace tessera::fed
