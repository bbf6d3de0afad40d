// tessera/fed/experiment.h — federated language modelling over non-IID
// domains: the client app (a small Mixtral-style model trained on its
// private Dirichlet mix of domains, evaluated on every domain's held-out
// text) and a runner that starts a server and N client processes on this
// machine and records every round.
//
//   int main(int argc, char** argv) {
//     // Spawned copies of this program become the clients.
//     if (auto code = tessera::fed::run_client_if_spawned(tessera::fed::language_model_app))
//       return *code;
//     tessera::fed::ExperimentOptions o;
//     o.strategy = "fedmoe_da";
//     o.clients = 8;
//     o.alpha = 0.1;
//     o.sources = tessera::fed::default_sources(source_tree, testdata);
//     auto result = tessera::fed::run_experiment(o);
//     for (const auto& r : result.rounds) std::cout << r.round << " " << r.server_bytes() << "\n";
//   }
//
// Evaluation metrics each client reports (EvaluateResult::metrics):
// "loss_<domain>" (mean next-token cross-entropy in nats per byte on that
// domain's held-out windows), "loss_own" (sum_d p_kd loss_d: the client's
// own mixture; also EvaluateResult::loss) and "loss_global" (the mean over
// the four domains).
//
// Thread safety: run_experiment() blocks its caller; call it from main's
// thread (client processes die with the thread that started them).
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "tessera/fed/client.h"
#include "tessera/fed/domains.h"
#include "tessera/fed/server.h"
#include "tessera/fed/strategy.h"
#include "tessera/formats/model_config.h"

namespace tessera::fed {

// The experiments' model: Mixtral-style, 2 layers, hidden 128, 4 heads
// over 2 kv heads, 4 experts (top-2) of intermediate 256, untied LM head;
// about 0.95M parameters, 83% of them in experts.
nn::ModelConfig small_fed_config(int64_t vocab_size);

// What a client process needs: model, data and training settings.
struct LanguageModelSpec {
  nn::ModelConfig model;
  DomainSources sources;
  ClientDataPlan plan;
  int64_t local_steps = 10;  // optimiser steps per fit
  int64_t batch = 8;         // windows per step
  int64_t seq_len = 64;
  double lr = 3e-3;
  double min_lr = 3e-4;
  int64_t warmup = 10;
  int64_t total_steps = 200;  // length of the cosine schedule
  int64_t eval_windows = 8;   // held-out windows per domain
  uint64_t seed = 0;

  std::string to_json() const;
  // Strict: InvalidArgument naming an unknown or missing key.
  static LanguageModelSpec parse(const std::string& json);
};

// The language-model client app; an AppFactory for run_client_if_spawned.
std::unique_ptr<ClientApp> language_model_app(const std::string& spec_json, int client_id);

struct ExperimentOptions {
  std::string strategy = "fedmoe_da";  // fedavg | local_experts | fedmoe_da
  int clients = 8;
  int64_t rounds = 20;
  double alpha = 1.0;  // Dirichlet concentration of the domain mixes
  uint64_t seed = 0;   // data plan, model init, sampling, training
  // Empty: small_fed_config() over the byte vocabulary.
  std::optional<nn::ModelConfig> model;
  int64_t local_steps = 10;
  int64_t batch = 8;
  int64_t seq_len = 64;
  double lr = 3e-3;
  double min_lr = 3e-4;
  int64_t warmup = 10;
  int64_t eval_windows = 8;
  int64_t tokens_per_client = 65536;
  int64_t block_tokens = 256;
  DomainSources sources;
  // Sampling, configs and FedMoE-DA's P, tau, I (used by all strategies
  // where they apply).
  FedMoEDAOptions strategy_options;
  // Timeouts and limits; the enrollment key is generated when empty.
  ServerOptions server;
  // Key, specs, client state and logs (empty: a fresh folder under the
  // temporary directory, removed afterwards unless keep_work_dir).
  std::string work_dir;
  bool keep_work_dir = false;
  std::string program;  // client program (empty: this one)
  int threads_per_client = 1;
  std::chrono::milliseconds join_timeout{std::chrono::minutes(3)};
  std::function<void(const RoundRecord&)> on_round;
};

struct ExperimentResult {
  std::vector<RoundRecord> rounds;
  std::vector<ClientDataPlan> plans;
  int64_t parameters = 0;         // of the model
  int64_t expert_parameters = 0;  // of it in routed experts
  double seconds = 0;             // wall time, start of the server to the last round
};

// Starts the server and the client processes, runs the rounds, shuts
// everything down. Errors of the parts; Unavailable when a client process
// fails to start (its log is named).
ExperimentResult run_experiment(const ExperimentOptions& options);

// The pieces run_experiment uses, for programs that drive the rounds
// themselves (fault-injection tests): the model and data set-up, the
// initial weights and each client's spec.
struct ExperimentSetup {
  nn::ModelConfig model;
  std::vector<ClientDataPlan> plans;
  std::vector<std::string> specs;
  TensorMap initial;
};
ExperimentSetup prepare_experiment(const ExperimentOptions& options);

}  // namespace tessera::fed
