// fed_bench — FedAvg, FedAvg of the shared parts with local experts, and
// FedMoE-DA side by side on the same non-IID federation: per-client and
// per-domain held-out loss, the global held-out loss, bytes through the
// server and between clients per round, rounds to reach FedAvg's final
// loss, and wall time; for each Dirichlet alpha and seed.
//
//   fed_bench [--alphas 0.1,1.0] [--seeds 3] [--rounds 20] [--clients 8] [--quick] [--json FILE]
//
// Each run starts a server (this process) and the client processes (copies
// of this program); runs happen one after another.
#include <cmath>
#include <iomanip>
#include <iostream>
#include <map>

#include "bench_report.h"
#include "command_line.h"
#include "tessera/core/runtime.h"
#include "tessera/fed/experiment.h"

namespace {

using tessera::fed::ExperimentResult;
using tessera::fed::kNumDomains;

struct RunSummary {
  std::string strategy;
  double alpha = 0;
  uint64_t seed = 0;
  std::array<double, kNumDomains>
      domain_loss{};                       // mean final own loss of the clients of each home domain
  double client_loss = 0;                  // mean final own loss over clients
  double global_loss = 0;                  // mean over clients of the four-domain mean
  std::vector<double> server_mb, peer_mb;  // per round
  std::vector<std::array<double, kNumDomains>> domain_curve;  // per round
  double seconds = 0;
  int64_t failures = 0;
};

RunSummary summarise(const std::string& strategy, double alpha, uint64_t seed,
                     const ExperimentResult& r) {
  RunSummary s;
  s.strategy = strategy;
  s.alpha = alpha;
  s.seed = seed;
  s.seconds = r.seconds;
  for (const auto& rec : r.rounds) {
    s.server_mb.push_back(rec.server_bytes() / 1e6);
    s.peer_mb.push_back(rec.peer_bytes() / 1e6);
    s.failures += static_cast<int64_t>(rec.fit_failures.size() + rec.evaluate_failures.size());
    std::array<double, kNumDomains> sum{}, n{};
    for (const auto& e : rec.evaluate) {
      const int home = r.plans.at(e.client).home;
      sum[home] += e.loss;
      n[home] += 1;
    }
    std::array<double, kNumDomains> curve{};
    for (int d = 0; d < kNumDomains; ++d) curve[d] = n[d] > 0 ? sum[d] / n[d] : NAN;
    s.domain_curve.push_back(curve);
  }
  s.domain_loss = s.domain_curve.back();
  const auto& last = r.rounds.back().evaluate;
  for (const auto& e : last) {
    s.client_loss += e.loss / last.size();
    s.global_loss += e.metrics.at("loss_global") / last.size();
  }
  return s;
}

double mean(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m += x / v.size();
  return m;
}

double stdev(const std::vector<double>& v) {
  if (v.size() < 2) return 0;
  const double m = mean(v);
  double s = 0;
  for (double x : v) s += (x - m) * (x - m);
  return std::sqrt(s / (v.size() - 1));
}

// First round whose loss is <= target (0: never).
int rounds_to(const std::vector<std::array<double, kNumDomains>>& curve, int d, double target) {
  for (size_t r = 0; r < curve.size(); ++r) {
    if (curve[r][d] <= target + 1e-12) return static_cast<int>(r + 1);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (auto code = tessera::fed::run_client_if_spawned(tessera::fed::language_model_app))
    return *code;

  tessera::bench::RepeatOptions rep;  // one run per configuration: seeds are the repetitions
  rep.reps = 1;
  rep.warmup = 0;
  std::vector<double> alphas = {0.1, 1.0};
  int seeds = 3;
  std::vector<std::string> strategies = {"fedavg", "local_experts", "fedmoe_da"};
  tessera::fed::ExperimentOptions o;
  o.clients = 8;
  o.rounds = 20;
  std::string source_tree = TESSERA_SOURCE_DIR;
  std::string testdata = source_tree + "/../shared/testdata";
  CLI::App app{"Federated MoE strategies side by side on non-IID text domains.", "fed_bench"};
  app.option_defaults()->always_capture_default();
  tessera::bench::add_repeat_options(app, rep);
  app.add_option("--alphas", alphas, "Dirichlet concentrations of the domain mixes")
      ->delimiter(',');
  app.add_option("--seeds", seeds, "seeds per configuration (0, 1, ...)")
      ->check(tessera::examples::positive());
  app.add_option("--strategies", strategies, "strategies to compare")->delimiter(',');
  app.add_option("--clients", o.clients, "client processes")->check(tessera::examples::positive());
  app.add_option("--rounds", o.rounds, "federated rounds")->check(tessera::examples::positive());
  app.add_option("--local-steps", o.local_steps, "optimiser steps per client per round")
      ->check(tessera::examples::positive());
  app.add_option("--batch", o.batch, "windows per step")->check(tessera::examples::positive());
  app.add_option("--seq-len", o.seq_len, "bytes per window")->check(tessera::examples::positive());
  app.add_option("--neighbours", o.strategy_options.domain_aware.neighbours, "FedMoE-DA P");
  app.add_option("--tau", o.strategy_options.domain_aware.temperature, "FedMoE-DA temperature");
  std::string scope = "all";
  app.add_option("--scope", scope,
                 "FedMoE-DA neighbour candidates: all (every client's every expert) or same "
                 "(other clients' copies of the same expert)")
      ->check(CLI::IsMember({"all", "same"}));
  app.add_option("--refresh-every", o.strategy_options.refresh_every, "FedMoE-DA I");
  app.add_option("--source-tree", source_tree,
                 "source tree whose src/ and include/ are the code domain");
  app.add_option("--testdata", testdata, "folder with text/moby-dick.txt and yue-benchmark/");
  if (auto code = tessera::examples::parse_command_line(app, argc, argv)) return *code;
  o.strategy_options.domain_aware.scope =
      scope == "same" ? tessera::fed::DomainAwareOptions::Scope::kSameExpert
                      : tessera::fed::DomainAwareOptions::Scope::kAllExperts;
  tessera::init_runtime();
  if (rep.quick) {
    seeds = 1;
    alphas = {1.0};
    o.clients = 4;
    o.rounds = 2;
    o.local_steps = 2;
    o.batch = 2;
    o.seq_len = 32;
    o.eval_windows = 2;
    o.tokens_per_client = 4096;
    o.block_tokens = 128;
  }
  o.sources = tessera::fed::default_sources(source_tree, testdata);
  if (rep.quick) o.sources.max_tokens = 50000;

  tessera::bench::Report report("fed", argc, argv, rep.quick);
  const tessera::nn::ModelConfig model = tessera::fed::small_fed_config(257);
  report.config() = {{"clients", o.clients},
                     {"rounds", o.rounds},
                     {"local_steps", o.local_steps},
                     {"batch", o.batch},
                     {"seq_len", o.seq_len},
                     {"tokens_per_client", o.tokens_per_client},
                     {"lr", o.lr},
                     {"P", o.strategy_options.domain_aware.neighbours},
                     {"tau", o.strategy_options.domain_aware.temperature},
                     {"refresh_every", o.strategy_options.refresh_every},
                     {"scope", scope},
                     {"model", model.summary()},
                     {"alphas", alphas},
                     {"seeds", seeds},
                     {"strategies", strategies}};

  std::vector<RunSummary> runs;
  for (double alpha : alphas) {
    for (int seed = 0; seed < seeds; ++seed) {
      for (const std::string& strategy : strategies) {
        o.strategy = strategy;
        o.alpha = alpha;
        o.seed = static_cast<uint64_t>(seed);
        std::cerr << "fed_bench: " << strategy << " alpha " << alpha << " seed " << seed << "\n";
        const ExperimentResult r = tessera::fed::run_experiment(o);
        runs.push_back(summarise(strategy, alpha, o.seed, r));
        const RunSummary& s = runs.back();
        report.facts()["parameters"] = r.parameters;
        report.facts()["expert_parameters"] = r.expert_parameters;
        const nlohmann::json labels = {{"strategy", strategy}, {"alpha", alpha}, {"seed", seed}};
        report.add_series(
            "server_mb." + strategy + ".a" + std::to_string(alpha) + ".s" + std::to_string(seed),
            "MB", s.server_mb, labels);
        report.add_series(
            "peer_mb." + strategy + ".a" + std::to_string(alpha) + ".s" + std::to_string(seed),
            "MB", s.peer_mb, labels);
        std::vector<double> final_losses(s.domain_loss.begin(), s.domain_loss.end());
        final_losses.push_back(s.client_loss);
        final_losses.push_back(s.global_loss);
        report.add_series(
            "final_loss." + strategy + ".a" + std::to_string(alpha) + ".s" + std::to_string(seed),
            "nats/byte", final_losses,
            {{"strategy", strategy},
             {"alpha", alpha},
             {"seed", seed},
             {"order", "english, cantonese, code, arithmetic (home domains), clients, global"}});
        report.add_series(
            "seconds." + strategy + ".a" + std::to_string(alpha) + ".s" + std::to_string(seed), "s",
            {s.seconds}, labels);
      }
    }
  }

  // Means over seeds, and rounds to reach FedAvg's final loss of the same
  // alpha and seed.
  std::cout << "\nfinal held-out loss (nats/byte, mean over seeds +- stdev); home domain of the "
               "clients\n";
  std::cout << std::left << std::setw(15) << "strategy" << std::setw(7) << "alpha";
  for (int d = 0; d < kNumDomains; ++d) std::cout << std::setw(17) << tessera::fed::domain_name(d);
  std::cout << std::setw(17) << "clients" << std::setw(17) << "global" << std::setw(12)
            << "server MB/r" << std::setw(10) << "p2p MB/r" << std::setw(9) << "wall s"
            << "rounds to FedAvg's final (per domain)\n";
  for (double alpha : alphas) {
    for (const std::string& strategy : strategies) {
      std::vector<std::vector<double>> dom(kNumDomains);
      std::vector<double> cl, gl, smb, pmb, sec;
      std::vector<std::vector<int>> to_target(kNumDomains);
      for (const RunSummary& s : runs) {
        if (s.strategy != strategy || s.alpha != alpha) continue;
        for (int d = 0; d < kNumDomains; ++d) dom[d].push_back(s.domain_loss[d]);
        cl.push_back(s.client_loss);
        gl.push_back(s.global_loss);
        smb.push_back(mean(s.server_mb));
        pmb.push_back(mean(s.peer_mb));
        sec.push_back(s.seconds);
        for (const RunSummary& f : runs) {
          if (f.strategy == "fedavg" && f.alpha == alpha && f.seed == s.seed) {
            for (int d = 0; d < kNumDomains; ++d)
              to_target[d].push_back(rounds_to(s.domain_curve, d, f.domain_loss[d]));
          }
        }
      }
      auto cell = [](const std::vector<double>& v) {
        std::ostringstream os;
        os << std::fixed << std::setprecision(3) << mean(v) << "+-" << stdev(v);
        return os.str();
      };
      std::cout << std::setw(15) << strategy << std::setw(7) << alpha;
      for (int d = 0; d < kNumDomains; ++d) std::cout << std::setw(17) << cell(dom[d]);
      std::cout << std::setw(17) << cell(cl) << std::setw(17) << cell(gl) << std::fixed
                << std::setprecision(3) << std::setw(12) << mean(smb) << std::setw(10) << mean(pmb)
                << std::setprecision(1) << std::setw(9) << mean(sec);
      for (int d = 0; d < kNumDomains; ++d) {
        std::cout << (d ? "/" : "");
        for (size_t k = 0; k < to_target[d].size(); ++k) {
          std::cout << (k ? "," : "") << (to_target[d][k] ? std::to_string(to_target[d][k]) : "-");
        }
      }
      std::cout << "\n";
      report.facts()["summary." + strategy + ".a" + std::to_string(alpha)] = {
          {"client_loss", mean(cl)},
          {"global_loss", mean(gl)},
          {"server_mb_per_round", mean(smb)},
          {"peer_mb_per_round", mean(pmb)},
          {"seconds", mean(sec)}};
    }
  }
  int64_t failures = 0;
  for (const RunSummary& s : runs) failures += s.failures;
  report.facts()["failures"] = failures;
  report.write(rep.json);
  return 0;
}
