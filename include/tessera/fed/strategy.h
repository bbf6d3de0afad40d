// tessera/fed/strategy.h — what the server does each round, after Flower's
// Strategy: configure_fit picks the clients of a round and what they
// receive, aggregate_fit turns their results (and failures) into the next
// global state, configure_evaluate / aggregate_evaluate do the same for
// held-out evaluation.
//
// Three strategies over Mixture-of-Experts models:
//   FedAvg        the whole model is averaged (weighted by examples) and
//                 every client receives all of it;
//   LocalExperts  the shared parts (embeddings, attention, norms, routers,
//                 LM head) are averaged; each client's routed experts never
//                 leave it;
//   FedMoEDA      shared parts as LocalExperts; each client's experts are
//                 personalised as the weighted sum of their domain-aware
//                 neighbours (aggregation.h), which the clients fetch from
//                 each other: the server sends the shared parameters and
//                 the client's rows of the sparse neighbour matrix only.
//
//   tessera::fed::FedMoEDAOptions o;
//   o.domain_aware.neighbours = 3;          // P
//   o.domain_aware.temperature = 0.1;       // tau
//   o.refresh_every = 2;                    // I
//   auto strategy = std::make_unique<tessera::fed::FedMoEDA>(o);
//   tessera::fed::Server server(server_options, std::move(strategy), initial_weights);
//
// Round r's aggregate is version r; the initial model is version 0.
//
// Thread safety: a strategy is thread-compatible; the server calls it from
// one thread at a time.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "tessera/fed/aggregation.h"

namespace tessera::fed {

// Numbers a task carries to the client and back ("lr", "loss_code", ...).
using Config = std::map<std::string, double>;

// One source of an expert being personalised: expert `expert` of client
// `owner`, with its weight a_ij.
struct ExpertSource {
  int owner = 0;
  int64_t expert = 0;
  double weight = 0;
};

// Expert (layer, expert) of the receiving client becomes
// sum(weight * source) over `sources`.
struct ExpertMix {
  int64_t layer = 0;
  int64_t expert = 0;
  std::vector<ExpertSource> sources;
};

// What a client receives before a task.
struct Payload {
  int64_t version = 0;           // the aggregate these values come from
  TensorMap tensors;             // parameters the client overwrites
  std::vector<ExpertMix> mixes;  // experts the client personalises from peers
};

struct FitInstruction {
  int client = 0;
  Payload payload;
  std::vector<std::string> upload;  // parameters the client sends back
  Config config;
};

struct EvaluateInstruction {
  int client = 0;
  Payload payload;
  Config config;
};

struct FitResult {
  int client = 0;
  TensorMap tensors;  // exactly the instruction's `upload`
  int64_t num_examples = 0;
  Config metrics;
};

struct EvaluateResult {
  int client = 0;
  int64_t num_examples = 0;
  double loss = 0;
  Config metrics;
};

// A client that was dropped from a phase: it died, stopped sending
// heartbeats, missed the deadline or sent a result the server refused.
struct Failure {
  int client = 0;
  std::string reason;
};

struct EvaluateSummary {
  double loss = 0;           // examples-weighted mean of the clients' losses
  int64_t num_examples = 0;  // 0: nobody evaluated (loss is NaN then)
};

// Which clients take part in a phase.
struct SamplingOptions {
  double fraction_fit = 1.0;  // of the available clients, rounded up
  double fraction_evaluate = 1.0;
  int min_fit_clients = 1;  // sampled at least (all if fewer are available)
  int min_evaluate_clients = 1;
};

// ceil(fraction * available), at least min_clients (capped at the
// available count), drawn without replacement; returned sorted.
// InvalidArgument for a fraction outside (0, 1].
std::vector<int> sample_clients(const std::vector<int>& available, double fraction, int min_clients,
                                std::mt19937_64& rng);

class Strategy {
 public:
  virtual ~Strategy() = default;
  virtual std::string name() const = 0;

  // The server's starting point. `initial` holds every parameter of the
  // model. Called once, before any other method.
  virtual void initialize(const TensorMap& initial) = 0;

  // Everything a client that holds no model (first contact, or a restart
  // without saved state) starts from: all parameters, its own experts
  // included, as the server knows them.
  virtual TensorMap bootstrap(int client) const = 0;

  // `available`: clients with a live session, sorted. `rng`: the server's
  // seeded sampler.
  virtual std::vector<FitInstruction> configure_fit(int64_t round,
                                                    const std::vector<int>& available,
                                                    std::mt19937_64& rng) = 0;
  // `results` hold what each client uploaded; `failures` the clients that
  // were dropped. Must tolerate any number of failures, even all.
  virtual void aggregate_fit(int64_t round, const std::vector<FitResult>& results,
                             const std::vector<Failure>& failures) = 0;
  virtual std::vector<EvaluateInstruction> configure_evaluate(int64_t round,
                                                              const std::vector<int>& available,
                                                              std::mt19937_64& rng) = 0;
  virtual EvaluateSummary aggregate_evaluate(int64_t round,
                                             const std::vector<EvaluateResult>& results,
                                             const std::vector<Failure>& failures);

  // The server's copy of expert (layer, expert) of `client`, keyed by
  // suffix ("w1.weight"), and the round it is from; for clients whose peer
  // is gone. nullopt when the server keeps none (the default).
  struct ExpertCopy {
    TensorMap tensors;
    int64_t round = 0;
  };
  virtual std::optional<ExpertCopy> expert_copy(int client, int64_t layer, int64_t expert) const;
};

// --- FedAvg over the whole model ---------------------------------------------
struct FedAvgOptions {
  SamplingOptions sampling;
  Config fit_config;       // sent with every fit instruction
  Config evaluate_config;  // sent with every evaluate instruction
};

class FedAvg final : public Strategy {
 public:
  explicit FedAvg(FedAvgOptions options = {});
  std::string name() const override { return "fedavg"; }
  void initialize(const TensorMap& initial) override;
  TensorMap bootstrap(int client) const override;
  std::vector<FitInstruction> configure_fit(int64_t round, const std::vector<int>& available,
                                            std::mt19937_64& rng) override;
  void aggregate_fit(int64_t round, const std::vector<FitResult>& results,
                     const std::vector<Failure>& failures) override;
  std::vector<EvaluateInstruction> configure_evaluate(int64_t round,
                                                      const std::vector<int>& available,
                                                      std::mt19937_64& rng) override;
  const TensorMap& global() const { return global_; }
  int64_t version() const { return version_; }

 private:
  FedAvgOptions options_;
  TensorMap global_;
  std::vector<std::string> names_;
  int64_t version_ = 0;
};

// --- Shared parts averaged, experts kept local --------------------------------
class LocalExperts final : public Strategy {
 public:
  explicit LocalExperts(FedAvgOptions options = {});
  std::string name() const override { return "local_experts"; }
  void initialize(const TensorMap& initial) override;
  TensorMap bootstrap(int client) const override;
  std::vector<FitInstruction> configure_fit(int64_t round, const std::vector<int>& available,
                                            std::mt19937_64& rng) override;
  void aggregate_fit(int64_t round, const std::vector<FitResult>& results,
                     const std::vector<Failure>& failures) override;
  std::vector<EvaluateInstruction> configure_evaluate(int64_t round,
                                                      const std::vector<int>& available,
                                                      std::mt19937_64& rng) override;
  const TensorMap& shared() const { return shared_; }
  const ModelPartition& partition() const { return partition_; }

 private:
  FedAvgOptions options_;
  ModelPartition partition_;
  TensorMap shared_;
  TensorMap initial_experts_;
  int64_t version_ = 0;
};

// --- FedMoE-DA ----------------------------------------------------------------
struct FedMoEDAOptions {
  SamplingOptions sampling;
  Config fit_config;
  Config evaluate_config;
  DomainAwareOptions domain_aware;  // P, tau, candidate scope
  // I: the neighbour matrix is recomputed from the latest routers in
  // rounds 1, 1 + I, 1 + 2I, ...; between refreshes the last matrix is
  // reused (experts are still mixed every round).
  int64_t refresh_every = 1;
  // Every this many rounds (0: never) fit results also carry the client's
  // experts, so that the server's fallback copy (served when a peer is
  // gone) is recent; otherwise the fallback is the initial model's expert.
  // Costs client->server bytes.
  int64_t expert_backup_every = 0;
};

class FedMoEDA final : public Strategy {
 public:
  explicit FedMoEDA(FedMoEDAOptions options = {});
  std::string name() const override { return "fedmoe_da"; }
  void initialize(const TensorMap& initial) override;
  TensorMap bootstrap(int client) const override;
  std::vector<FitInstruction> configure_fit(int64_t round, const std::vector<int>& available,
                                            std::mt19937_64& rng) override;
  void aggregate_fit(int64_t round, const std::vector<FitResult>& results,
                     const std::vector<Failure>& failures) override;
  std::vector<EvaluateInstruction> configure_evaluate(int64_t round,
                                                      const std::vector<int>& available,
                                                      std::mt19937_64& rng) override;
  std::optional<ExpertCopy> expert_copy(int client, int64_t layer, int64_t expert) const override;

  const TensorMap& shared() const { return shared_; }
  const ModelPartition& partition() const { return partition_; }
  // The current neighbour matrix by MoE layer (empty before the first
  // refresh) and the round that computed it (0: none yet).
  const std::map<int64_t, LayerNeighbours>& neighbours() const { return neighbours_; }
  int64_t refreshed_round() const { return refreshed_round_; }
  // The client's rows of the current matrix as mixes (empty when the
  // client has no rows).
  std::vector<ExpertMix> mixes_for(int client) const;

 private:
  Payload payload_for(int client) const;

  FedMoEDAOptions options_;
  ModelPartition partition_;
  TensorMap shared_;
  TensorMap initial_;
  // Latest router rows each client reported: client -> layer -> [E, H].
  std::map<int, std::map<int64_t, at::Tensor>> routers_;
  // Experts uploaded as backups: client -> parameter name -> tensor, round.
  std::map<int, std::pair<TensorMap, int64_t>> backups_;
  std::map<int64_t, LayerNeighbours> neighbours_;
  int64_t refreshed_round_ = 0;
  int64_t version_ = 0;
};

// "fedavg", "local_experts" or "fedmoe_da" with the given options (the
// sampling and configs of `da` apply to all three). InvalidArgument naming
// the strategy otherwise.
std::unique_ptr<Strategy> make_strategy(const std::string& name, const FedMoEDAOptions& da);

}  // namespace tessera::fed
