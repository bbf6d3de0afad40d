#include "tessera/fed/strategy.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "tessera/core/error.h"
#include "tessera/core/log.h"

namespace tessera::fed {

std::vector<int> sample_clients(const std::vector<int>& available, double fraction, int min_clients,
                                std::mt19937_64& rng) {
  TESSERA_CHECK(fraction > 0 && fraction <= 1, InvalidArgument, "client fraction ", fraction,
                " is outside (0, 1]");
  const int n = static_cast<int>(available.size());
  int k = static_cast<int>(std::ceil(fraction * n - 1e-9));
  k = std::min(n, std::max(k, min_clients));
  std::vector<int> pool = available;
  // Partial Fisher-Yates: the first k are a uniform sample without
  // replacement.
  for (int i = 0; i < k; ++i) {
    std::uniform_int_distribution<int> pick(i, n - 1);
    std::swap(pool[i], pool[pick(rng)]);
  }
  pool.resize(static_cast<size_t>(k));
  std::sort(pool.begin(), pool.end());
  return pool;
}

EvaluateSummary Strategy::aggregate_evaluate(int64_t round,
                                             const std::vector<EvaluateResult>& results,
                                             const std::vector<Failure>& failures) {
  EvaluateSummary s;
  double weighted = 0;
  for (const EvaluateResult& r : results) {
    weighted += r.loss * static_cast<double>(r.num_examples);
    s.num_examples += r.num_examples;
  }
  s.loss = s.num_examples > 0 ? weighted / static_cast<double>(s.num_examples)
                              : std::numeric_limits<double>::quiet_NaN();
  return s;
}

std::optional<Strategy::ExpertCopy> Strategy::expert_copy(int client, int64_t layer,
                                                          int64_t expert) const {
  return std::nullopt;
}

namespace {

TensorMap select(const TensorMap& all, const std::vector<std::string>& names) {
  TensorMap out;
  for (const std::string& n : names) {
    auto it = all.find(n);
    TESSERA_CHECK(it != all.end(), NotFound, "model has no parameter '", n, "'");
    out[n] = it->second;
  }
  return out;
}

TensorMap clone_all(const TensorMap& in) {
  TensorMap out;
  for (const auto& [k, v] : in) out[k] = v.detach().to(at::kCPU).clone();
  return out;
}

std::vector<std::string> names_of(const TensorMap& m) {
  std::vector<std::string> names;
  for (const auto& [k, v] : m) names.push_back(k);
  return names;
}

// Examples-weighted average of `names` over the results; the previous
// values when there are none.
void average_into(TensorMap& target, const std::vector<FitResult>& results,
                  const std::vector<std::string>& names, const char* strategy, int64_t round) {
  if (results.empty()) {
    TESSERA_LOG(Warn, "fed") << strategy << " round " << round
                             << ": no results; the global state stays";
    return;
  }
  std::vector<const TensorMap*> inputs;
  std::vector<double> weights;
  for (const FitResult& r : results) {
    inputs.push_back(&r.tensors);
    weights.push_back(static_cast<double>(r.num_examples));
  }
  for (auto& [name, t] : weighted_average(inputs, weights, names)) target[name] = t;
}

}  // namespace

// --- FedAvg ------------------------------------------------------------------
FedAvg::FedAvg(FedAvgOptions options) : options_(std::move(options)) {}

void FedAvg::initialize(const TensorMap& initial) {
  global_ = clone_all(initial);
  names_ = names_of(global_);
  version_ = 0;
}

TensorMap FedAvg::bootstrap(int client) const { return global_; }

std::vector<FitInstruction> FedAvg::configure_fit(int64_t round, const std::vector<int>& available,
                                                  std::mt19937_64& rng) {
  std::vector<FitInstruction> out;
  const SamplingOptions& s = options_.sampling;
  for (int c : sample_clients(available, s.fraction_fit, s.min_fit_clients, rng)) {
    out.push_back({c, {version_, global_, {}}, names_, options_.fit_config});
  }
  return out;
}

void FedAvg::aggregate_fit(int64_t round, const std::vector<FitResult>& results,
                           const std::vector<Failure>& failures) {
  average_into(global_, results, names_, "fedavg", round);
  version_ = round;
}

std::vector<EvaluateInstruction> FedAvg::configure_evaluate(int64_t round,
                                                            const std::vector<int>& available,
                                                            std::mt19937_64& rng) {
  std::vector<EvaluateInstruction> out;
  const SamplingOptions& s = options_.sampling;
  for (int c : sample_clients(available, s.fraction_evaluate, s.min_evaluate_clients, rng)) {
    out.push_back({c, {version_, global_, {}}, options_.evaluate_config});
  }
  return out;
}

// --- LocalExperts ------------------------------------------------------------
LocalExperts::LocalExperts(FedAvgOptions options) : options_(std::move(options)) {}

void LocalExperts::initialize(const TensorMap& initial) {
  partition_ = partition_parameters(names_of(initial));
  TESSERA_CHECK(partition_.num_experts > 0, InvalidArgument,
                "local_experts needs a Mixture-of-Experts model (no routed experts found)");
  shared_ = clone_all(select(initial, partition_.shared));
  initial_experts_ = clone_all(select(initial, partition_.expert_names()));
  version_ = 0;
}

TensorMap LocalExperts::bootstrap(int client) const {
  TensorMap all = shared_;
  for (const auto& [k, v] : initial_experts_) all[k] = v;
  return all;
}

std::vector<FitInstruction> LocalExperts::configure_fit(int64_t round,
                                                        const std::vector<int>& available,
                                                        std::mt19937_64& rng) {
  std::vector<FitInstruction> out;
  const SamplingOptions& s = options_.sampling;
  for (int c : sample_clients(available, s.fraction_fit, s.min_fit_clients, rng)) {
    out.push_back({c, {version_, shared_, {}}, partition_.shared, options_.fit_config});
  }
  return out;
}

void LocalExperts::aggregate_fit(int64_t round, const std::vector<FitResult>& results,
                                 const std::vector<Failure>& failures) {
  average_into(shared_, results, partition_.shared, "local_experts", round);
  version_ = round;
}

std::vector<EvaluateInstruction> LocalExperts::configure_evaluate(int64_t round,
                                                                  const std::vector<int>& available,
                                                                  std::mt19937_64& rng) {
  std::vector<EvaluateInstruction> out;
  const SamplingOptions& s = options_.sampling;
  for (int c : sample_clients(available, s.fraction_evaluate, s.min_evaluate_clients, rng)) {
    out.push_back({c, {version_, shared_, {}}, options_.evaluate_config});
  }
  return out;
}

// --- FedMoE-DA ---------------------------------------------------------------
FedMoEDA::FedMoEDA(FedMoEDAOptions options) : options_(std::move(options)) {
  TESSERA_CHECK(options_.refresh_every >= 1, InvalidArgument, "fedmoe_da: refresh_every (I) is ",
                options_.refresh_every, ", expected >= 1");
  TESSERA_CHECK(options_.expert_backup_every >= 0, InvalidArgument,
                "fedmoe_da: expert_backup_every is ", options_.expert_backup_every,
                ", expected >= 0");
  TESSERA_CHECK(options_.domain_aware.neighbours >= 0, InvalidArgument,
                "fedmoe_da: P (neighbours) is ", options_.domain_aware.neighbours,
                ", expected >= 0");
  TESSERA_CHECK(options_.domain_aware.temperature > 0, InvalidArgument,
                "fedmoe_da: temperature is ", options_.domain_aware.temperature, ", expected > 0");
}

void FedMoEDA::initialize(const TensorMap& initial) {
  partition_ = partition_parameters(names_of(initial));
  TESSERA_CHECK(partition_.num_experts > 0, InvalidArgument,
                "fedmoe_da needs a Mixture-of-Experts model (no routed experts found)");
  initial_ = clone_all(initial);
  shared_ = select(initial_, partition_.shared);
  version_ = 0;
}

TensorMap FedMoEDA::bootstrap(int client) const {
  TensorMap all = shared_;
  auto backup = backups_.find(client);
  for (const std::string& name : partition_.expert_names()) {
    all[name] = backup != backups_.end() ? backup->second.first.at(name) : initial_.at(name);
  }
  return all;
}

std::vector<ExpertMix> FedMoEDA::mixes_for(int client) const {
  std::vector<ExpertMix> mixes;
  for (const auto& [layer, matrix] : neighbours_) {
    if (std::find(matrix.clients.begin(), matrix.clients.end(), client) == matrix.clients.end())
      continue;
    for (int64_t e = 0; e < matrix.num_experts; ++e) {
      ExpertMix mix{layer, e, {}};
      for (const Neighbour& n : matrix.row(client, e))
        mix.sources.push_back({n.client, n.expert, n.weight});
      mixes.push_back(std::move(mix));
    }
  }
  return mixes;
}

Payload FedMoEDA::payload_for(int client) const { return {version_, shared_, mixes_for(client)}; }

std::vector<FitInstruction> FedMoEDA::configure_fit(int64_t round,
                                                    const std::vector<int>& available,
                                                    std::mt19937_64& rng) {
  std::vector<FitInstruction> out;
  const SamplingOptions& s = options_.sampling;
  const bool backup = options_.expert_backup_every > 0 && round % options_.expert_backup_every == 0;
  std::vector<std::string> upload = partition_.shared;
  if (backup) {
    for (const std::string& n : partition_.expert_names()) upload.push_back(n);
  }
  for (int c : sample_clients(available, s.fraction_fit, s.min_fit_clients, rng)) {
    out.push_back({c, payload_for(c), upload, options_.fit_config});
  }
  return out;
}

void FedMoEDA::aggregate_fit(int64_t round, const std::vector<FitResult>& results,
                             const std::vector<Failure>& failures) {
  // Domain embeddings: each reporting client's routers after its local
  // training, before they are averaged away.
  for (const FitResult& r : results) {
    for (const auto& [layer, name] : partition_.routers) {
      routers_[r.client][layer] = r.tensors.at(name).detach().to(at::kCPU).clone();
    }
    if (r.tensors.count(partition_.expert_names().front())) {
      backups_[r.client] = {select(r.tensors, partition_.expert_names()), round};
    }
  }
  average_into(shared_, results, partition_.shared, "fedmoe_da", round);
  version_ = round;
  if ((round - 1) % options_.refresh_every == 0 && !routers_.empty()) {
    neighbours_.clear();
    for (const auto& [layer, name] : partition_.routers) {
      std::vector<int> clients;
      std::vector<at::Tensor> rows;
      for (const auto& [client, by_layer] : routers_) {
        clients.push_back(client);
        rows.push_back(by_layer.at(layer));
      }
      neighbours_[layer] = domain_neighbours(clients, rows, options_.domain_aware);
    }
    refreshed_round_ = round;
  }
}

std::vector<EvaluateInstruction> FedMoEDA::configure_evaluate(int64_t round,
                                                              const std::vector<int>& available,
                                                              std::mt19937_64& rng) {
  std::vector<EvaluateInstruction> out;
  const SamplingOptions& s = options_.sampling;
  for (int c : sample_clients(available, s.fraction_evaluate, s.min_evaluate_clients, rng)) {
    out.push_back({c, payload_for(c), options_.evaluate_config});
  }
  return out;
}

std::optional<Strategy::ExpertCopy> FedMoEDA::expert_copy(int client, int64_t layer,
                                                          int64_t expert) const {
  if (!partition_.experts.count({layer, expert})) return std::nullopt;
  ExpertCopy copy;
  auto backup = backups_.find(client);
  const TensorMap& source = backup != backups_.end() ? backup->second.first : initial_;
  copy.round = backup != backups_.end() ? backup->second.second : 0;
  for (const std::string& name : partition_.expert(layer, expert)) {
    copy.tensors[parse_expert_parameter(name)->suffix] = source.at(name);
  }
  return copy;
}

std::unique_ptr<Strategy> make_strategy(const std::string& name, const FedMoEDAOptions& da) {
  FedAvgOptions avg;
  avg.sampling = da.sampling;
  avg.fit_config = da.fit_config;
  avg.evaluate_config = da.evaluate_config;
  if (name == "fedavg") return std::make_unique<FedAvg>(avg);
  if (name == "local_experts") return std::make_unique<LocalExperts>(avg);
  if (name == "fedmoe_da") return std::make_unique<FedMoEDA>(da);
  TESSERA_THROW(InvalidArgument, "unknown strategy '", name,
                "' (fedavg, local_experts or fedmoe_da)");
}

}  // namespace tessera::fed
