// tessera-moe-plan — reads an MoE model (Hugging Face folder) and a token
// file, profiles routing over the first batches, predicts the next batch's
// expert loads (Bayesian), profiles this machine, and prints the cheapest
// serverless deployment meeting the latency SLO with its predicted cost and
// latency — and what that deployment costs on the batch's real routing.
//
//   tessera-moe-plan --model /tmp/tessera-quickstart/pretrained
//                    --tokens /tmp/tessera-quickstart/arithmetic.tokens [--slo 2.0]
//   (one command line)
//
// Options (--help lists them): --batches N (profiling batches, 100),
// --batch-tokens N (2048), --seq N (64), --slo S (seconds, end to end over
// the MoE layers, 2.0), --prices FILE (price sheet JSON; default AWS
// Lambda), --max-replicas N (8).
#include <cstdio>
#include <iostream>
#include <string>

#include "command_line.h"
#include "tessera/core/error.h"
#include "tessera/core/runtime.h"
#include "tessera/moe/deploy.h"
#include "tessera/moe/prediction.h"
#include "tessera/nn/loader.h"
#include "tessera/nn/train.h"

namespace tmoe = tessera::moe;

int main(int argc, char** argv) {
  std::string model_dir, tokens, prices_file;
  int64_t batches = 100, batch_tokens = 2048, seq = 64;
  double slo = 2.0;
  int max_replicas = 8;
  CLI::App app{
      "Profiles an MoE model's routing, predicts the next batch's expert loads and "
      "prints the cheapest serverless deployment meeting the latency SLO.",
      "tessera-moe-plan"};
  app.option_defaults()->always_capture_default();
  app.add_option("--model", model_dir, "the MoE model, a Hugging Face folder")->required();
  app.add_option("--tokens", tokens, "token file (nn::TokenDataset) to profile and predict on")
      ->required();
  app.add_option("--batches", batches, "profiling batches before the predicted one")
      ->check(tessera::examples::positive());
  app.add_option("--batch-tokens", batch_tokens, "tokens per batch")
      ->check(tessera::examples::positive());
  app.add_option("--seq", seq, "sequence length")->check(tessera::examples::positive());
  app.add_option("--slo", slo, "latency SLO, seconds end to end over the MoE layers");
  app.add_option("--prices", prices_file, "price sheet JSON (default: AWS Lambda's)");
  app.add_option("--max-replicas", max_replicas, "most replicas per expert");
  if (auto code = tessera::examples::parse_command_line(app, argc, argv)) return *code;
  try {
    tessera::init_runtime();
    auto model = tessera::nn::load_hf_model(model_dir);
    const auto& cfg = model.config();
    TESSERA_CHECK(cfg.num_experts > 0, InvalidArgument, model_dir, " is not an MoE model");
    auto data = tessera::nn::TokenDataset::open(tokens);
    const int64_t rows = std::max<int64_t>(1, batch_tokens / seq);
    int64_t moe_layers = 0;
    tmoe::CountTable* table = nullptr;
    std::unique_ptr<tmoe::CountTable> owned;
    for (int64_t b = 0; b < batches; ++b) {
      tmoe::RoutingTrace t = tmoe::trace_batch(model, data.batch(b, rows, seq).input_ids);
      if (!owned) {
        moe_layers = t.num_layers();
        owned = std::make_unique<tmoe::CountTable>(moe_layers, cfg.num_experts,
                                                   cfg.num_experts_per_tok);
        table = owned.get();
      }
      table->add(t);
    }
    at::Tensor next = data.batch(batches, rows, seq).input_ids;
    tmoe::RoutingTrace real = tmoe::trace_batch(model, next);
    at::Tensor predicted = table->predict(next, tmoe::Predictor::kBayesian);
    const tmoe::PriceSheet prices = prices_file.empty()
                                        ? tmoe::PriceSheet::aws_lambda()
                                        : tmoe::PriceSheet::from_json_file(prices_file);
    tmoe::PlatformProfile profile =
        tmoe::profile_platform(cfg.hidden_size, cfg.intermediate_size, prices, "/tmp");
    auto as_loads = [&](const at::Tensor& t) {
      std::vector<std::vector<double>> out(t.size(0), std::vector<double>(t.size(1)));
      for (int64_t l = 0; l < t.size(0); ++l)
        for (int64_t e = 0; e < t.size(1); ++e) out[l][e] = t[l][e].item<double>();
      return out;
    };
    tmoe::SearchSpace space;
    space.max_replicas = max_replicas;
    tmoe::Deployment plan =
        tmoe::optimal_deployment(profile, prices, as_loads(predicted), slo, space);
    tmoe::Deployment on_real = tmoe::evaluate(profile, prices, plan, as_loads(real.loads()));
    std::printf(
        "model %s: %lld MoE layers x %lld experts (top %lld); count table from %lld batches of "
        "%lld tokens\n",
        model_dir.c_str(), static_cast<long long>(moe_layers),
        static_cast<long long>(cfg.num_experts), static_cast<long long>(cfg.num_experts_per_tok),
        static_cast<long long>(batches), static_cast<long long>(rows * seq));
    std::printf(
        "profile: %.3g s/token at %lld MB .. %.3g s/token at %lld MB, storage %.0f MB/s; prices: "
        "%s\n",
        profile.t_cal.front(), static_cast<long long>(profile.memory_mb.front()),
        profile.t_cal.back(), static_cast<long long>(profile.memory_mb.back()),
        profile.storage_bandwidth / 1e6, prices.name.c_str());
    std::printf("prediction error (relative L1) on the next batch: %.3f\n",
                tmoe::load_error(predicted, real.loads()));
    std::printf("\n%-6s %-10s %6s  %s\n", "layer", "method", "beta",
                "per expert: predicted tokens / memory MB x replicas");
    for (size_t l = 0; l < plan.layers.size(); ++l) {
      const auto& lp = plan.layers[l];
      std::printf("%-6zu %-10s %6lld ", l, tmoe::method_name(lp.method),
                  static_cast<long long>(lp.beta));
      for (size_t e = 0; e < lp.experts.size(); ++e) {
        std::printf(" %.0f/%lldx%d", predicted[l][e].item<double>(),
                    static_cast<long long>(profile.memory_mb[lp.experts[e].memory_index]),
                    lp.experts[e].replicas);
      }
      std::printf("\n");
    }
    std::printf("\npredicted: $%.8f per batch, %.3f s (SLO %.3f s%s)\n", plan.cost, plan.seconds,
                slo, plan.feasible ? "" : ", NOT met: fastest deployment shown");
    std::printf("on the batch's real routing: $%.8f, %.3f s%s\n", on_real.cost, on_real.seconds,
                on_real.feasible ? "" : " (some replica over its memory or payload limit)");
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "tessera-moe-plan: " << e.what() << "\n";
    return 1;
  }
}
