// fedmoe — federated training of a small Mixture-of-Experts language model
// over clients whose private text comes mostly from one domain (English
// prose, Cantonese, source code, arithmetic), with FedAvg, FedAvg of the
// shared parts with local experts, or FedMoE-DA.
//
//   fedmoe --strategy fedmoe_da --clients 8 --rounds 20 --alpha 0.1
//   fedmoe --strategy fedavg --alpha 1.0 --json fedavg.json
//
// This program is the server; it starts the clients as copies of itself
// (real processes talking gRPC) and prints one line per round: held-out
// loss, bytes through the server and between clients, failures. Needs the
// shared test data (Moby-Dick, Yue-Benchmark) and a Tessera source tree
// (the code domain).
#include <iomanip>
#include <iostream>
#include <map>

#include "command_line.h"
#include "tessera/core/runtime.h"
#include "tessera/fed/experiment.h"

int main(int argc, char** argv) {
  // Copies of this program started by the launcher become clients here.
  if (auto code = tessera::fed::run_client_if_spawned(tessera::fed::language_model_app))
    return *code;

  tessera::fed::ExperimentOptions o;
  std::string source_tree = TESSERA_SOURCE_DIR;                // code domain: its src/ and include/
  std::string testdata = source_tree + "/../shared/testdata";  // moby-dick.txt, yue-benchmark/
  double fraction_fit = 1.0;
  CLI::App app{
      "Federated MoE language modelling over non-IID text domains (FedAvg, local experts, "
      "FedMoE-DA).",
      "fedmoe"};
  app.option_defaults()->always_capture_default();
  app.add_option("--strategy", o.strategy, "fedavg, local_experts or fedmoe_da")
      ->check(CLI::IsMember({"fedavg", "local_experts", "fedmoe_da"}));
  app.add_option("--clients", o.clients, "client processes (client k's home domain is k mod 4)")
      ->check(tessera::examples::positive());
  app.add_option("--rounds", o.rounds, "federated rounds")->check(tessera::examples::positive());
  app.add_option("--alpha", o.alpha,
                 "Dirichlet concentration of each client's domain mix (small: one domain)")
      ->check(tessera::examples::positive());
  app.add_option("--seed", o.seed, "seed of data split, model init, sampling and training");
  app.add_option("--local-steps", o.local_steps, "optimiser steps per client per round")
      ->check(tessera::examples::positive());
  app.add_option("--batch", o.batch, "windows per step")->check(tessera::examples::positive());
  app.add_option("--seq-len", o.seq_len, "tokens (bytes) per window")
      ->check(tessera::examples::positive());
  app.add_option("--lr", o.lr, "peak learning rate (AdamW, warm-up then cosine)");
  app.add_option("--tokens-per-client", o.tokens_per_client, "private training tokens per client");
  app.add_option("--fraction-fit", fraction_fit,
                 "share of the clients sampled for training each round");
  app.add_option("--neighbours", o.strategy_options.domain_aware.neighbours,
                 "FedMoE-DA P: neighbours per expert besides itself")
      ->check(tessera::examples::at_least(0));
  app.add_option("--tau", o.strategy_options.domain_aware.temperature,
                 "FedMoE-DA softmax temperature")
      ->check(tessera::examples::positive());
  std::string scope = "all";
  app.add_option("--scope", scope,
                 "FedMoE-DA neighbour candidates: all (every client's every expert) or same "
                 "(other clients' copies of the same expert)")
      ->check(CLI::IsMember({"all", "same"}));
  app.add_option("--refresh-every", o.strategy_options.refresh_every,
                 "FedMoE-DA I: rounds between neighbour-matrix refreshes")
      ->check(tessera::examples::positive());
  app.add_option("--source-tree", source_tree,
                 "source tree whose src/ and include/ are the code domain");
  app.add_option("--testdata", testdata, "folder with text/moby-dick.txt and yue-benchmark/");
  if (auto code = tessera::examples::parse_command_line(app, argc, argv)) return *code;
  o.strategy_options.domain_aware.scope =
      scope == "same" ? tessera::fed::DomainAwareOptions::Scope::kSameExpert
                      : tessera::fed::DomainAwareOptions::Scope::kAllExperts;

  tessera::init_runtime();
  o.sources = tessera::fed::default_sources(source_tree, testdata);
  o.strategy_options.sampling.fraction_fit = fraction_fit;
  std::cout << "round  loss_own  loss_global  server_in_MB  server_out_MB  p2p_MB  fallbacks  "
               "failures  seconds\n";
  o.on_round = [](const tessera::fed::RoundRecord& r) {
    double global = 0;
    for (const auto& e : r.evaluate) global += e.metrics.at("loss_global") / r.evaluate.size();
    std::cout << std::setw(5) << r.round << std::fixed << std::setprecision(4) << std::setw(10)
              << r.summary.loss << std::setw(13) << global << std::setprecision(3) << std::setw(14)
              << r.server_bytes_in() / 1e6 << std::setw(15) << r.server_bytes_out() / 1e6
              << std::setw(8) << r.peer_bytes() / 1e6 << std::setw(11) << r.fallbacks
              << std::setw(10) << r.fit_failures.size() + r.evaluate_failures.size()
              << std::setprecision(1) << std::setw(9) << r.seconds << "\n"
              << std::flush;
  };
  const tessera::fed::ExperimentResult result = tessera::fed::run_experiment(o);

  std::cout << "\nmodel: " << result.parameters << " parameters, " << result.expert_parameters
            << " in experts; wall time " << std::setprecision(1) << result.seconds << " s\n";
  std::cout << "final held-out loss (nats per byte) by client:\n";
  for (const auto& e : result.rounds.back().evaluate) {
    const auto& plan = result.plans.at(e.client);
    std::cout << "  client " << e.client << " (home " << tessera::fed::domain_name(plan.home)
              << ", " << std::setprecision(0) << 100 * plan.mixture[plan.home]
              << "% of its data): own " << std::setprecision(4) << e.loss;
    for (int d = 0; d < tessera::fed::kNumDomains; ++d) {
      const std::string name = tessera::fed::domain_name(d);
      std::cout << ", " << name << " " << e.metrics.at("loss_" + name);
    }
    std::cout << "\n";
  }
  return 0;
}
