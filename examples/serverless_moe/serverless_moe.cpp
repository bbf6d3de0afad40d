// Serves batches of a small MoE model (the quickstart's, or one trained here
// in ~30 s) with its experts on the local serverless platform: every expert
// a tessera-function process, billed per invocation by the AWS Lambda price
// sheet. For each policy it prints billed cost and throughput, and checks
// that the model's outputs equal the in-process model's:
//   cpu-cluster  the in-process model on this machine, priced at the CPU
//                cluster's per-core hourly rate for the cores it used;
//   lambdaml     every function at the largest memory size, no prediction,
//                no replicas, indirect transfer through storage;
//   ours         Bayesian-predicted expert loads, the cheapest deployment
//                (method per layer, memory and replicas per expert) whose
//                predicted latency is within 1.2x LambdaML's measured one.
//
// Local processes share this machine's cores, unlike functions on a cloud,
// so measured latencies exceed what the calibrated model predicts (which
// assumes each function has its CPU share to itself); the cloud-scale
// comparison is benchmarks/moe_bench's simulator.
//
//   build/release/bin/serverless_moe [--model DIR] [--batches 4] [--batch-tokens 2048]
//
// Without --model it trains the small MoE once into
// /tmp/tessera-serverless-moe/model. --help lists the options.
#include <ATen/ATen.h>

#include <cstdio>
#include <filesystem>
#include <iostream>
#include <string>

#include "command_line.h"
#include "moe_policies.h"
#include "progress.h"
#include "tessera/core/error.h"
#include "tessera/core/metrics.h"
#include "tessera/core/runtime.h"
#include "tessera/moe/deploy.h"
#include "tessera/moe/platform.h"
#include "tessera/moe/prediction.h"
#include "tessera/nn/loader.h"
#include "tessera/nn/train.h"
#include "tessera/tasks/arithmetic.h"

namespace tn = tessera::nn;
namespace tmoe = tessera::moe;

namespace {

// The arithmetic token stream and, when no model is given, a small MoE
// trained on it (the quickstart's configuration, fewer steps).
std::string prepare(const std::string& dir, std::string* model_dir) {
  std::filesystem::create_directories(dir);
  const std::string tokens = dir + "/arithmetic.tokens";
  auto tokenizer = tn::Tokenizer::bytes({"<|endoftext|>"});
  if (!std::filesystem::exists(tokens)) {
    tn::TokenDataset::write(tokens,
                            tessera::tasks::arithmetic_corpus(tokenizer, 40000, /*seed=*/1));
  }
  if (model_dir->empty()) {
    *model_dir = dir + "/model";
    if (!std::filesystem::exists(*model_dir + "/config.json")) {
      std::printf("training a small MoE (once, into %s)...\n", model_dir->c_str());
      tn::ModelConfig cfg =
          tessera::tasks::small_arithmetic_config(tokenizer.vocab_size(), /*num_experts=*/4);
      tn::Transformer model(cfg);
      model.init_random(7);
      tn::TrainerOptions to;
      to.steps = 150;
      to.lr = 3e-3;
      to.warmup = 15;
      tn::Trainer trainer(model, to);
      auto data = tn::TokenDataset::open(tokens);
      tessera::examples::Progress progress("training", to.steps);
      for (int64_t s = 0; s < to.steps; ++s) {
        auto b = data.batch(s, 32, 64);
        progress.step(trainer.step(b.input_ids, b.labels).loss);
      }
      tn::save_hf_model(*model_dir, cfg, tn::gather_full_weights(model));
    }
  }
  return tokens;
}

}  // namespace

int main(int argc, char** argv) {
  std::string model_dir;
  int64_t batches = 4, batch_tokens = 2048;
  const int64_t seq = 64;
  CLI::App app{
      "Serves batches of a small MoE with its experts as local serverless functions "
      "(tessera-function processes) under three policies, and prints billed cost and "
      "throughput of each.",
      "serverless_moe"};
  app.option_defaults()->always_capture_default();
  app.add_option("--model", model_dir,
                 "an MoE model, a Hugging Face folder (default: a small MoE trained here once)");
  app.add_option("--batches", batches, "batches to serve per policy")
      ->check(tessera::examples::positive());
  app.add_option("--batch-tokens", batch_tokens, "tokens per batch (sequences of 64)")
      ->check(tessera::examples::at_least(seq));
  if (auto code = tessera::examples::parse_command_line(app, argc, argv)) return *code;
  try {
    tessera::init_runtime();
    const std::string tokens = prepare("/tmp/tessera-serverless-moe", &model_dir);
    tn::Transformer model = tn::load_hf_model(model_dir);
    const tn::ModelConfig& cfg = model.config();
    TESSERA_CHECK(cfg.num_experts > 0, InvalidArgument, model_dir, " is not an MoE model");
    auto data = tn::TokenDataset::open(tokens);
    const int64_t rows = batch_tokens / seq;

    tessera::examples::LocalComparisonOptions lo;
    lo.batches = batches;
    std::printf("profiling routing, calibrating the platform (%zu memory sizes), serving...\n",
                lo.platform.prices.memory_sizes_mb.size());
    const tessera::examples::LocalComparison c = tessera::examples::compare_policies_locally(
        model, model_dir + "/model.safetensors",
        [&](int64_t b) { return data.batch(b, rows, seq).input_ids; }, lo);
    const tmoe::PlatformProfile& profile = c.profile;
    std::printf(
        "  cold start %.0f ms, t_head %.1f ms, storage %.2f ms + %.0f MB/s, calls %.0f MB/s, "
        "expert %.2f us/token at %lld MB\n",
        profile.cold_start * 1e3, profile.t_head * 1e3, profile.t_dl * 1e3,
        profile.storage_bandwidth / 1e6, profile.call_bandwidth / 1e6, profile.t_cal.back() * 1e6,
        static_cast<long long>(profile.memory_mb.back()));
    std::printf("\n%lld batches of %lld tokens through %lld MoE layers x %lld experts (top %lld)\n",
                static_cast<long long>(batches), static_cast<long long>(c.tokens_per_batch),
                static_cast<long long>(cfg.num_hidden_layers),
                static_cast<long long>(cfg.num_experts),
                static_cast<long long>(cfg.num_experts_per_tok));
    std::printf("%-12s %14s %12s %14s\n", "policy", "billed $", "tokens/s", "max rel. err");
    for (const auto& p : c.policies) {
      char err[32] = "-";
      if (p.name != "cpu-cluster") std::snprintf(err, sizeof(err), "%.1e", p.max_error);
      std::printf("%-12s %14.8f %12.0f %14s\n", p.name.c_str(), p.cost, p.tokens_per_second, err);
    }
    const auto& lm = c.policies[1];
    const auto& ours = c.policies[2];
    std::printf(
        "ours vs lambdaml: cost %+.1f%%, throughput %+.1f%%; predicted latency %.3f s/batch (SLO "
        "%.3f)\n",
        100 * (ours.cost / lm.cost - 1), 100 * (ours.tokens_per_second / lm.tokens_per_second - 1),
        c.ours.seconds, c.slo_seconds);
    for (size_t l = 0; l < c.ours.layers.size(); ++l) {
      std::printf("  layer %zu: %s", l, tmoe::method_name(c.ours.layers[l].method));
      for (const auto& e : c.ours.layers[l].experts) {
        std::printf(" %lldMBx%d", static_cast<long long>(profile.memory_mb[e.memory_index]),
                    e.replicas);
      }
      std::printf("\n");
    }
    std::printf("platform: %lld cold starts, %lld warm, %lld retries, %lld reclaimed\n",
                static_cast<long long>(c.platform.cold_starts),
                static_cast<long long>(c.platform.warm_starts),
                static_cast<long long>(c.platform.retries),
                static_cast<long long>(c.platform.reclaimed));
    return ours.max_error < 1e-4 && lm.max_error < 1e-4 ? 0 : 2;
  } catch (const std::exception& e) {
    std::cerr << "serverless_moe: " << e.what() << "\n";
    return 1;
  }
}
