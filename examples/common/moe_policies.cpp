#include "moe_policies.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <memory>

#include "tessera/core/error.h"
#include "tessera/core/metrics.h"
#include "tessera/moe/prediction.h"

namespace tessera::examples {
using namespace tessera::moe;  // the module whose policies this harness compares

LocalComparison compare_policies_locally(nn::Transformer& model, const std::string& weights,
                                         const std::function<at::Tensor(int64_t)>& batch,
                                         const LocalComparisonOptions& o) {
  const nn::ModelConfig& cfg = model.config();
  TESSERA_CHECK(cfg.num_experts > 0, InvalidArgument, "compare_policies_locally: not an MoE model");
  TESSERA_CHECK(o.batches > 0 && o.profile_batches > 0, InvalidArgument,
                "compare_policies_locally: batch counts");
  CountTable table(cfg.num_hidden_layers, cfg.num_experts, cfg.num_experts_per_tok);
  for (int64_t b = 0; b < o.profile_batches; ++b) table.add(trace_batch(model, batch(b)));

  FunctionPlatform platform(o.platform);
  std::vector<ExpertLayer> layers;
  std::vector<std::unique_ptr<ServerlessMoE>> gates;
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
    layers.push_back({weights, "model.layers." + std::to_string(l) + ".block_sparse_moe.",
                      cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob});
    gates.push_back(
        std::make_unique<ServerlessMoE>(platform, layers.back(), "layer" + std::to_string(l)));
  }
  LocalComparison out;
  // Calibrated with a layer's experts computing at once, as they will.
  out.profile = calibrate_platform(platform, layers[0], cfg.hidden_size, cfg.intermediate_size,
                                   static_cast<int>(cfg.num_experts));
  const PriceSheet& prices = platform.options().prices;
  const at::Tensor first = batch(o.profile_batches);
  out.tokens_per_batch = first.numel();
  const double tokens = static_cast<double>(out.tokens_per_batch * o.batches);
  auto timed = [&](int64_t b) { return batch(o.profile_batches + 1 + b); };

  auto serve = [&](const std::string& name, const std::vector<LayerPlan>& plans) {
    PolicyResult r;
    r.name = name;
    for (size_t l = 0; l < gates.size(); ++l) gates[l]->configure(plans[l], out.profile);
    nn::ForwardOptions fo;
    fo.expert_override = [&](int64_t layer, const at::Tensor& x, const at::Tensor& e,
                             const at::Tensor& w) {
      return gates[layer]->forward(x, {e, w.to(at::kFloat)});
    };
    at::NoGradGuard no_grad;
    // Warm-up: cold starts, and each new process's first kernels.
    for (int w = 0; w < 2; ++w) model.forward(first, fo);
    const double before = platform.meter().total_cost();
    for (int64_t b = 0; b < o.batches; ++b) {
      const at::Tensor ids = timed(b);
      Stopwatch watch;
      at::Tensor served = model.forward(ids, fo).logits;
      r.seconds += watch.seconds();
      at::Tensor local = model.forward(ids).logits;
      r.max_error = std::max(r.max_error, (served - local).abs().max().item<double>() /
                                              local.abs().max().item<double>());
    }
    r.cost = platform.meter().total_cost() - before;
    r.tokens_per_second = tokens / r.seconds;
    return r;
  };

  // (a) In process, priced as the cluster's cores.
  PolicyResult cluster;
  cluster.name = "cpu-cluster";
  {
    at::NoGradGuard no_grad;
    model.forward(first);
    for (int64_t b = 0; b < o.batches; ++b) {
      Stopwatch watch;
      model.forward(timed(b));
      cluster.seconds += watch.seconds();
    }
  }
  cluster.cost =
      cluster.seconds / 3600.0 * prices.cpu_cluster_per_hour * at::get_num_threads() / 128.0;
  cluster.tokens_per_second = tokens / cluster.seconds;
  out.policies.push_back(cluster);

  // (b) LambdaML.
  std::vector<LayerPlan> lambdaml(cfg.num_hidden_layers);
  for (auto& lp : lambdaml) {
    lp.method = Method::kIndirect;
    lp.experts.assign(cfg.num_experts, {static_cast<int>(out.profile.memory_mb.size()) - 1, 1});
  }
  out.policies.push_back(serve("lambdaml", lambdaml));

  // (c) Ours.
  at::Tensor pred = at::zeros({cfg.num_hidden_layers, cfg.num_experts});
  for (int64_t b = 0; b < o.batches; ++b) pred += table.predict(timed(b), Predictor::kBayesian);
  pred /= static_cast<double>(o.batches);
  std::vector<std::vector<double>> loads(pred.size(0), std::vector<double>(pred.size(1)));
  for (int64_t l = 0; l < pred.size(0); ++l)
    for (int64_t e = 0; e < pred.size(1); ++e) loads[l][e] = pred[l][e].item<double>();
  out.slo_seconds = o.slo_factor * out.policies[1].seconds / static_cast<double>(o.batches);
  out.ours = optimal_deployment(out.profile, prices, loads, out.slo_seconds);
  out.policies.push_back(serve("ours", out.ours.layers));
  out.platform = platform.stats();
  return out;
}

}  // namespace tessera::examples
