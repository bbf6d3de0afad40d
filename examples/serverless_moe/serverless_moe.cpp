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
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdio>
#include <filesystem>
#include <iostream>
#include <string>

#include "tessera/core/error.h"
#include "tessera/core/metrics.h"
#include "tessera/core/runtime.h"
#include "tessera/moe/deploy.h"
#include "tessera/moe/platform.h"
#include "tessera/moe/prediction.h"
#include "tessera/moe/search.h"
#include "tessera/nn/loader.h"
#include "tessera/nn/train.h"

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
    std::vector<int64_t> ids;
    for (const auto& e : tn::arithmetic_examples(40000, /*seed=*/1)) {
      for (int32_t id : tokenizer.encode(e.prompt + e.answer + "\n")) ids.push_back(id);
    }
    tn::TokenDataset::write(tokens, ids);
  }
  if (model_dir->empty()) {
    *model_dir = dir + "/model";
    if (!std::filesystem::exists(*model_dir + "/config.json")) {
      std::printf("training a small MoE (once, into %s)...\n", model_dir->c_str());
      tn::ModelConfig cfg;
      cfg.model_type = "mixtral";
      cfg.vocab_size = tokenizer.vocab_size();
      cfg.hidden_size = 128;
      cfg.intermediate_size = 256;
      cfg.num_hidden_layers = 4;
      cfg.num_attention_heads = 4;
      cfg.num_key_value_heads = 2;
      cfg.max_position_embeddings = 256;
      cfg.num_experts = 4;
      cfg.num_experts_per_tok = 2;
      tn::Transformer model(cfg);
      model.init_random(7);
      tn::TrainerOptions to;
      to.steps = 150;
      to.lr = 3e-3;
      to.warmup = 15;
      tn::Trainer trainer(model, to);
      auto data = tn::TokenDataset::open(tokens);
      for (int64_t s = 0; s < to.steps; ++s) {
        auto b = data.batch(s, 32, 64);
        trainer.step(b.input_ids, b.labels);
      }
      tn::save_hf_model(*model_dir, cfg, tn::gather_full_weights(model));
    }
  }
  return tokens;
}

tmoe::Loads to_loads(const at::Tensor& t) {
  tmoe::Loads out(t.size(0), std::vector<double>(t.size(1)));
  for (int64_t l = 0; l < t.size(0); ++l)
    for (int64_t e = 0; e < t.size(1); ++e) out[l][e] = t[l][e].item<double>();
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    tessera::init_runtime();
    std::string model_dir;
    int64_t batches = 4, batch_tokens = 2048, seq = 64, profile_batches = 50;
    for (int i = 1; i + 1 < argc; i += 2) {
      const std::string a = argv[i], v = argv[i + 1];
      if (a == "--model") model_dir = v;
      else if (a == "--batches") batches = std::stoll(v);
      else if (a == "--batch-tokens") batch_tokens = std::stoll(v);
      else TESSERA_THROW(InvalidArgument, "unknown option '", a, "' (--model DIR, --batches N, --batch-tokens N)");
    }
    const std::string tokens = prepare("/tmp/tessera-serverless-moe", &model_dir);
    tn::Transformer model = tn::load_hf_model(model_dir);
    const tn::ModelConfig& cfg = model.config();
    TESSERA_CHECK(cfg.num_experts > 0, InvalidArgument, model_dir, " is not an MoE model");
    auto data = tn::TokenDataset::open(tokens);
    const int64_t rows = batch_tokens / seq;

    // Popularity: count table over profiling batches, predictions for the served ones.
    tmoe::CountTable table(cfg.num_hidden_layers, cfg.num_experts, cfg.num_experts_per_tok);
    for (int64_t b = 0; b < profile_batches; ++b) table.add(tmoe::trace_batch(model, data.batch(b, rows, seq).input_ids));

    tmoe::FunctionPlatform platform({});
    std::vector<tmoe::ExpertLayer> layers;
    std::vector<std::unique_ptr<tmoe::ServerlessMoE>> gates;
    for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
      layers.push_back({model_dir + "/model.safetensors", "model.layers." + std::to_string(l) + ".block_sparse_moe.",
                        cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob});
      gates.push_back(std::make_unique<tmoe::ServerlessMoE>(platform, layers.back(), "layer" + std::to_string(l)));
    }
    std::printf("calibrating the platform (%zu memory sizes)...\n", platform.options().prices.memory_sizes_mb.size());
    const tmoe::PlatformProfile profile = tmoe::calibrate_platform(platform, layers[0], cfg.hidden_size, cfg.intermediate_size);
    std::printf("  t_head %.1f ms, storage %.2f ms + %.0f MB/s, calls %.0f MB/s, expert %.2f us/token at %lld MB\n",
                profile.t_head * 1e3, profile.t_dl * 1e3, profile.storage_bandwidth / 1e6, profile.call_bandwidth / 1e6,
                profile.t_cal.back() * 1e6, static_cast<long long>(profile.memory_mb.back()));
    const tessera::moe::PriceSheet& prices = platform.options().prices;

    struct Outcome {
      double cost = 0, seconds = 0, max_error = 0;
    };
    auto serve = [&](const std::vector<tmoe::LayerPlan>& plans) {
      Outcome o;
      for (size_t l = 0; l < gates.size(); ++l) gates[l]->configure(plans[l], profile);
      tn::ForwardOptions fo;
      fo.expert_override = [&](int64_t layer, const at::Tensor& x, const at::Tensor& e, const at::Tensor& w) {
        return gates[layer]->forward(x, {e, w.to(at::kFloat)});
      };
      // Warm the functions up (cold starts, and each new process's first
      // kernels, are reported by the platform, not timed here).
      for (int w = 0; w < 2; ++w) model.forward(data.batch(profile_batches, rows, seq).input_ids, fo);
      const double before = platform.meter().total_cost();
      for (int64_t b = 0; b < batches; ++b) {
        at::Tensor ids = data.batch(profile_batches + 1 + b, rows, seq).input_ids;
        at::NoGradGuard no_grad;
        tessera::Stopwatch w;
        at::Tensor served = model.forward(ids, fo).logits;
        o.seconds += w.seconds();
        at::Tensor local = model.forward(ids).logits;
        o.max_error = std::max(o.max_error, (served - local).abs().max().item<double>() / local.abs().max().item<double>());
      }
      o.cost = platform.meter().total_cost() - before;
      return o;
    };

    // (a) the in-process model, priced as cluster cores.
    double local_seconds = 0;
    for (int64_t b = 0; b < batches; ++b) {
      at::NoGradGuard no_grad;
      tessera::Stopwatch w;
      model.forward(data.batch(profile_batches + 1 + b, rows, seq).input_ids);
      local_seconds += w.seconds();
    }
    const int cores = at::get_num_threads();
    const double cluster_cost = local_seconds / 3600.0 * prices.cpu_cluster_per_hour * cores / 128.0;

    // (b) LambdaML: largest memory, one replica, indirect.
    std::vector<tmoe::LayerPlan> lambdaml(cfg.num_hidden_layers);
    for (auto& lp : lambdaml) {
      lp.method = tmoe::Method::kIndirect;
      lp.experts.assign(cfg.num_experts, {static_cast<int>(profile.memory_mb.size()) - 1, 1});
    }
    const Outcome lm = serve(lambdaml);

    // (c) ours: predicted loads of the served batches, SLO 1.2x LambdaML's latency.
    at::Tensor pred = at::zeros({cfg.num_hidden_layers, cfg.num_experts});
    for (int64_t b = 0; b < batches; ++b) {
      pred += table.predict(data.batch(profile_batches + 1 + b, rows, seq).input_ids, tmoe::Predictor::kBayesian);
    }
    pred /= static_cast<double>(batches);
    const double slo = 1.2 * lm.seconds / batches;
    tmoe::Deployment plan = tmoe::optimal_deployment(profile, prices, to_loads(pred), slo);
    const Outcome ours = serve(plan.layers);

    const double tokens_total = static_cast<double>(batches * rows * seq);
    std::printf("\n%lld batches of %lld tokens through %lld MoE layers x %lld experts (top %lld)\n",
                static_cast<long long>(batches), static_cast<long long>(rows * seq),
                static_cast<long long>(cfg.num_hidden_layers), static_cast<long long>(cfg.num_experts),
                static_cast<long long>(cfg.num_experts_per_tok));
    std::printf("%-12s %14s %12s %14s\n", "policy", "billed $", "tokens/s", "max rel. err");
    std::printf("%-12s %14.8f %12.0f %14s\n", "cpu-cluster", cluster_cost, tokens_total / local_seconds, "-");
    std::printf("%-12s %14.8f %12.0f %14.1e\n", "lambdaml", lm.cost, tokens_total / lm.seconds, lm.max_error);
    std::printf("%-12s %14.8f %12.0f %14.1e\n", "ours", ours.cost, tokens_total / ours.seconds, ours.max_error);
    std::printf("ours vs lambdaml: cost %+.1f%%, throughput %+.1f%%; predicted latency %.3f s/batch (SLO %.3f)\n",
                100 * (ours.cost / lm.cost - 1), 100 * (lm.seconds / ours.seconds - 1), plan.seconds, slo);
    for (size_t l = 0; l < plan.layers.size(); ++l) {
      std::printf("  layer %zu: %s", l, tmoe::method_name(plan.layers[l].method));
      for (const auto& e : plan.layers[l].experts) {
        std::printf(" %lldMBx%d", static_cast<long long>(profile.memory_mb[e.memory_index]), e.replicas);
      }
      std::printf("\n");
    }
    auto st = platform.stats();
    std::printf("platform: %lld cold starts, %lld warm, %lld retries, %lld reclaimed\n",
                static_cast<long long>(st.cold_starts), static_cast<long long>(st.warm_starts),
                static_cast<long long>(st.retries), static_cast<long long>(st.reclaimed));
    return ours.max_error < 1e-4 && lm.max_error < 1e-4 ? 0 : 2;
  } catch (const std::exception& e) {
    std::cerr << "serverless_moe: " << e.what() << "\n";
    return 1;
  }
}
