// Serverless MoE measurements, in one run:
//  1. expert-popularity prediction error on held-out batches (relative L1
//     of per-expert loads): Bayesian vs token-id-only vs historical average,
//     on a small MoE trained on arithmetic text and (with --smollm2) on
//     SmolLM2-135M-Instruct upcycled to 4 experts and briefly fine-tuned;
//  2. local real runs: that small MoE served through the function platform
//     (tessera-function processes, billed by the meter) under the three
//     policies, with its outputs checked against the in-process model;
//  3. the cost/time model as a simulator at cloud scale: the small MoE's
//     layers and experts with BERT-base-sized experts (768 -> 3072 -> 768,
//     compute calibrated on this machine), 10,240-token batches, the price
//     sheet's memory sizes, <= 8 replicas. The loads are the real model's:
//     "ours" plans from the Bayesian predictor's loads for the batch; the
//     batch is then billed at the loads the model really routed (traced);
//     the BO loop corrects the plan on further real batches. Billed cost
//     and throughput of an always-on CPU cluster, a LambdaML-style
//     deployment and ours.
//
// The CPU cluster appears twice: measured (section 2: the in-process model
// on this machine, billed at the cluster's per-core rate for the cores it
// used, while it runs) and simulated (section 3: 128 cores). For each, the
// break-even arrival interval: an always-on cluster is cheaper than ours
// only when batches arrive at least that often (ours' $ per batch divided
// by the cluster's $ per second).
//
//   build/release/bin/moe_bench [--smollm2] [--gguf FILE] [--reps 5] [--warmup 1]
//                               [--quick] [--json FILE]
//
// --smollm2 adds the SmolLM2 rows of table 1; --gguf FILE names its GGUF
// file (default: the one scripts/smollm2-path.sh finds). --reps repeats the
// local comparison (each serving 4 timed batches per policy); prediction
// errors are recorded per held-out batch. --quick: a 4-expert small MoE,
// few training steps and batches (smoke test). --help lists them.
#include <ATen/ATen.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <string>

#include "bench_report.h"
#include "command_line.h"
#include "moe_policies.h"
#include "smollm2.h"
#include "tessera/core/runtime.h"
#include "tessera/moe/deploy.h"
#include "tessera/moe/prediction.h"
#include "tessera/moe/search.h"
#include "tessera/nn/loader.h"
#include "tessera/nn/train.h"
#include "tessera/tasks/arithmetic.h"

namespace tn = tessera::nn;
namespace tmoe = tessera::moe;
using nlohmann::json;

namespace {

// Relative L1 error of each predictor, one value per held-out batch.
struct Errors {
  std::vector<double> bayes, token, hist;
};

Errors prediction_errors(tn::Transformer& model, const std::function<at::Tensor(int64_t)>& batch,
                         int64_t profile, int64_t held_out) {
  const auto& c = model.config();
  tmoe::CountTable table(c.num_hidden_layers, c.num_experts, c.num_experts_per_tok);
  for (int64_t b = 0; b < profile; ++b) table.add(tmoe::trace_batch(model, batch(b)));
  Errors e;
  for (int64_t b = 0; b < held_out; ++b) {
    at::Tensor ids = batch(profile + b);
    at::Tensor real = tmoe::trace_batch(model, ids).loads();
    e.bayes.push_back(tmoe::load_error(table.predict(ids, tmoe::Predictor::kBayesian), real));
    e.token.push_back(tmoe::load_error(table.predict(ids, tmoe::Predictor::kTokenOnly), real));
    e.hist.push_back(tmoe::load_error(table.predict(ids, tmoe::Predictor::kHistorical), real));
  }
  return e;
}

// [layers, experts] tensor -> Loads.
tmoe::Loads to_loads(const at::Tensor& t) {
  at::Tensor d = t.to(at::kDouble).contiguous();
  tmoe::Loads out(d.size(0), std::vector<double>(d.size(1)));
  for (int64_t l = 0; l < d.size(0); ++l)
    for (int64_t e = 0; e < d.size(1); ++e) out[l][e] = d[l][e].item<double>();
  return out;
}

// `steps` optimiser steps of next-token training on consecutive batches.
void train(tn::Transformer& model, const tn::TokenDataset& data, int64_t steps, double lr,
           int64_t rows, int64_t seq) {
  tn::TrainerOptions to;
  to.steps = steps;
  to.lr = lr;
  to.warmup = std::max<int64_t>(1, steps / 10);
  tn::Trainer trainer(model, to);
  for (int64_t s = 0; s < steps; ++s) {
    auto b = data.batch(s, rows, seq);
    trainer.step(b.input_ids, b.labels);
  }
}

void print_errors(const char* name, const Errors& e, int64_t profile, int64_t held_out,
                  int64_t tokens) {
  auto mean = [](const std::vector<double>& v) {
    double s = 0;
    for (double x : v) s += x;
    return s / v.size();
  };
  std::printf(
      "%-44s %10.4f %12.4f %12.4f   (%lld profiling + %lld held-out batches of %lld tokens)\n",
      name, mean(e.bayes), mean(e.token), mean(e.hist), static_cast<long long>(profile),
      static_cast<long long>(held_out), static_cast<long long>(tokens));
}

void add_errors(tessera::bench::Report& report, const std::string& model, const Errors& e,
                int64_t profile, int64_t tokens) {
  const json labels = {
      {"model", model}, {"profile_batches", profile}, {"tokens_per_batch", tokens}};
  report.add_series("prediction." + model + ".bayesian", "relative L1", e.bayes, labels);
  report.add_series("prediction." + model + ".token_only", "relative L1", e.token, labels);
  report.add_series("prediction." + model + ".historical", "relative L1", e.hist, labels);
}

}  // namespace

int main(int argc, char** argv) {
  bool smollm2 = false;
  std::string gguf;
  tessera::bench::RepeatOptions rep;
  CLI::App app{
      "Serverless MoE: expert-load prediction error, local runs on the function "
      "platform under three policies, and the cloud-scale cost/time simulation.",
      "moe_bench"};
  app.option_defaults()->always_capture_default();
  app.add_flag("--smollm2", smollm2,
               "also measure prediction on SmolLM2-135M-Instruct upcycled to 4 experts");
  app.add_option("--gguf", gguf,
                 "the SmolLM2 GGUF file for --smollm2 (default: what scripts/smollm2-path.sh "
                 "finds)");
  tessera::bench::add_repeat_options(app, rep);
  app.get_option("--reps")->description(
      "repetitions of the local comparison (4 timed batches each)");
  if (auto code = tessera::examples::parse_command_line(app, argc, argv)) return *code;
  tessera::init_runtime();
  tessera::bench::Report report("moe", argc, argv, rep.quick);
  const int64_t train_steps = rep.quick ? 5 : 150, profile = rep.quick ? 4 : 100,
                held_out = rep.quick ? 2 : 10;

  std::string small_dir;
  std::function<at::Tensor(int64_t)> local_batch;
  std::unique_ptr<tn::Transformer> small;
  std::shared_ptr<tmoe::CountTable> small_table;
  std::string corpus_path;
  // --- 1. Prediction error ----------------------------------------------------
  std::printf(
      "1. expert-load prediction error (relative L1, lower is better; mean over held-out "
      "batches)\n");
  std::printf("%-44s %10s %12s %12s\n", "model", "bayesian", "token-only", "historical");
  {
    auto tokenizer = tn::Tokenizer::bytes({"<|endoftext|>"});
    corpus_path = (std::filesystem::temp_directory_path() /
                   ("tessera-moe-bench-" + std::to_string(::getpid()) + ".tokens"))
                      .string();
    tn::TokenDataset::write(corpus_path,
                            tessera::tasks::arithmetic_corpus(tokenizer, 40000, /*seed=*/1));
    auto data = tn::TokenDataset::open(corpus_path);
    tn::ModelConfig cfg =
        tessera::tasks::small_arithmetic_config(tokenizer.vocab_size(), rep.quick ? 4 : 8);
    small = std::make_unique<tn::Transformer>(cfg);
    small->init_random(7);
    train(*small, data, train_steps, 3e-3, 32, 64);
    auto batch = [&](int64_t b) { return data.batch(1000 + b, 32, 64).input_ids; };
    const Errors e = prediction_errors(*small, batch, profile, held_out);
    const std::string name = "small MoE (" + std::to_string(cfg.num_experts) + " experts top-" +
                             std::to_string(cfg.num_experts_per_tok) + "), arithmetic text";
    print_errors(name.c_str(), e, profile, held_out, 2048);
    add_errors(report, "small", e, profile, 2048);
    small_table = std::make_shared<tmoe::CountTable>(cfg.num_hidden_layers, cfg.num_experts,
                                                     cfg.num_experts_per_tok);
    for (int64_t b = 0; b < profile; ++b) small_table->add(tmoe::trace_batch(*small, batch(b)));
    // Kept for the local runs below.
    small_dir = (std::filesystem::temp_directory_path() /
                 ("tessera-moe-bench-model-" + std::to_string(::getpid())))
                    .string();
    tn::save_hf_model(small_dir, cfg, tn::gather_full_weights(*small));
    local_batch = [path = corpus_path](int64_t b) {
      static auto d = tn::TokenDataset::open(path);
      return d.batch(2000 + b, 32, 64).input_ids;
    };
  }
  if (smollm2) {
    if (gguf.empty()) {
      gguf = tessera::examples::smollm2_gguf_path();
    }
    auto loaded = tn::read_gguf_model(gguf);
    auto up =
        tn::upcycle_to_moe(loaded.config, loaded.weights, /*experts=*/4, /*top_k=*/2, /*seed=*/1);
    tn::Transformer model(up.config);
    for (const auto& [name, t] : up.weights) model.load_full(name, t);
    auto tokenizer = tn::Tokenizer::from_spec(loaded.tokenizer);
    std::ifstream in(std::string(TESSERA_SOURCE_DIR) + "/../shared/testdata/text/moby-dick.txt");
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::vector<int64_t> ids;
    for (int32_t id : tokenizer.encode(text.substr(0, 400000))) ids.push_back(id);
    const std::string path =
        (std::filesystem::temp_directory_path() /
         ("tessera-moe-bench-smollm2-" + std::to_string(::getpid()) + ".tokens"))
            .string();
    tn::TokenDataset::write(path, ids);
    auto data = tn::TokenDataset::open(path);
    train(model, data, rep.quick ? 1 : 10, 1e-4, 8,
          128);  // brief fine-tuning: experts and routers diverge
    auto batch = [&](int64_t b) { return data.batch(100 + b, 8, 128).input_ids; };
    const int64_t sp = rep.quick ? 2 : 40, sh = rep.quick ? 1 : 8;
    const Errors e = prediction_errors(model, batch, sp, sh);
    print_errors("SmolLM2-135M upcycled to 4 experts top-2", e, sp, sh, 1024);
    add_errors(report, "smollm2", e, sp, 1024);
    std::filesystem::remove(path);
  }

  // --- 2. Local real runs ---------------------------------------------------------
  const tmoe::PriceSheet prices = tmoe::PriceSheet::aws_lambda();
  json local_info;
  {
    tn::Transformer model = tn::load_hf_model(small_dir);
    tessera::examples::LocalComparisonOptions lo;
    lo.batches = rep.quick ? 1 : 4;
    if (rep.quick) lo.profile_batches = 4;
    std::map<std::string, std::vector<double>> cost, seconds, tps, err;
    tessera::examples::LocalComparison c;
    for (int r = 0; r < rep.reps; ++r) {
      c = tessera::examples::compare_policies_locally(model, small_dir + "/model.safetensors",
                                                      local_batch, lo);
      for (const auto& p : c.policies) {
        cost[p.name].push_back(p.cost);
        seconds[p.name].push_back(p.seconds);
        tps[p.name].push_back(p.tokens_per_second);
        err[p.name].push_back(p.max_error);
      }
    }
    std::printf(
        "\n2. local real runs: the small MoE's %lld layers x %lld experts as tessera-function "
        "processes on this\n"
        "   machine, %lld timed batches of %lld tokens per policy, billed by the AWS Lambda sheet, "
        "median of %d runs\n",
        static_cast<long long>(model.config().num_hidden_layers),
        static_cast<long long>(model.config().num_experts), static_cast<long long>(lo.batches),
        static_cast<long long>(c.tokens_per_batch), rep.reps);
    std::printf("%-46s %14s %12s %14s\n", "policy", "$ (timed)", "tokens/s", "max rel. err");
    for (const auto& p : c.policies) {
      const json labels = {
          {"policy", p.name}, {"batches", lo.batches}, {"tokens_per_batch", c.tokens_per_batch}};
      report.add_series("local." + p.name + ".cost", "$", cost[p.name], labels);
      report.add_series("local." + p.name + ".seconds", "s", seconds[p.name], labels);
      report.add_series("local." + p.name + ".tokens_per_s", "tokens/s", tps[p.name], labels);
      report.add_series("local." + p.name + ".max_error", "relative", err[p.name], labels);
      std::printf("%-46s %14.8f %12.0f %14.1e\n", p.name.c_str(),
                  tessera::bench::median(cost[p.name]), tessera::bench::median(tps[p.name]),
                  tessera::bench::max_of(err[p.name]));
    }
    const std::string cl = c.policies[0].name, lm = c.policies[1].name, ours = c.policies[2].name;
    auto med = [](const std::vector<double>& v) { return tessera::bench::median(v); };
    const double ours_per_batch = med(cost[ours]) / lo.batches;
    const double cluster_per_second = med(cost[cl]) / med(seconds[cl]);
    std::printf(
        "ours vs lambdaml: cost %+.1f%%, throughput %+.1f%% (predicted latency %.3f s/batch, SLO "
        "%.3f)\n",
        100 * (med(cost[ours]) / med(cost[lm]) - 1), 100 * (med(tps[ours]) / med(tps[lm]) - 1),
        c.ours.seconds, c.slo_seconds);
    std::printf(
        "measured CPU cluster (this machine's cores at the cluster's per-core rate): always on, it "
        "is cheaper "
        "than ours only when a batch arrives at least every %.3f s\n",
        ours_per_batch / cluster_per_second);
    local_info = {{"batches", lo.batches},
                  {"tokens_per_batch", c.tokens_per_batch},
                  {"profile_batches", lo.profile_batches},
                  {"slo_factor", lo.slo_factor},
                  {"predicted_latency_s", c.ours.seconds},
                  {"slo_seconds", c.slo_seconds},
                  {"policies", {cl, lm, ours}}};
    std::filesystem::remove_all(small_dir);
  }

  // --- 3. Simulator at cloud scale ---------------------------------------------
  // BERT-base-sized experts (the paper turns BERT/GPT-2 into MoE), compute
  // measured on this machine; cloud storage and call parameters assumed.
  tmoe::PlatformProfile base;
  base.t_head = 0.05;             // warm start + runtime
  base.t_dl = 0.02;               // object-store request latency
  base.storage_bandwidth = 80e6;  // per function, object store
  base.call_bandwidth = 40e6;     // request/response payloads
  tmoe::PlatformProfile p = tmoe::profile_platform(768, 3072, prices, "/tmp", base);
  p.storage_bandwidth = base.storage_bandwidth;  // the object store's, not this machine's disk
  const auto& sc = small->config();
  const int L = static_cast<int>(sc.num_hidden_layers), E = static_cast<int>(sc.num_experts),
            K = static_cast<int>(sc.num_experts_per_tok);
  // One simulated batch: 5 of the local batches (5 x 32 x 64 = 10,240 tokens).
  const int64_t per_batch = 5;
  auto sim_ids = [&](int i) {
    std::vector<at::Tensor> parts;
    for (int64_t k = 0; k < per_batch; ++k) parts.push_back(local_batch(100 + i * per_batch + k));
    return at::cat(parts, 0);
  };
  const at::Tensor eval_ids = sim_ids(0);
  const int64_t batch_tokens = eval_ids.numel();
  const tmoe::Loads predicted =
      to_loads(small_table->predict(eval_ids, tmoe::Predictor::kBayesian));
  const tmoe::Loads eval = to_loads(tmoe::trace_batch(*small, eval_ids).loads());
  auto real_batch = [&](int i) {
    return to_loads(tmoe::trace_batch(*small, sim_ids(1 + i)).loads());
  };

  tmoe::SearchSpace lambdaml_space;
  lambdaml_space.methods = {tmoe::Method::kIndirect};
  lambdaml_space.fixed_memory_index = static_cast<int>(p.memory_mb.size()) - 1;
  lambdaml_space.allow_replicas = false;
  tmoe::Deployment lambdaml = tmoe::optimal_deployment(p, prices, predicted, 1e9, lambdaml_space);
  const tmoe::Simulation lm = tmoe::simulate(p, prices, lambdaml, eval);
  const double slo = 1.2 * lm.seconds;
  tmoe::Deployment ours = tmoe::optimal_deployment(p, prices, predicted, slo);
  const tmoe::Simulation us = tmoe::simulate(p, prices, ours, eval);
  tmoe::BoOptions bo;
  bo.slo_seconds = slo;
  bo.max_iterations = rep.quick ? 3 : 40;
  bo.candidates = rep.quick ? 4 : 32;
  bo.alpha = 0.05;
  const tmoe::BoTrace trace = tmoe::bayesian_optimisation(p, prices, predicted, real_batch, bo);
  const tmoe::Simulation us_bo = tmoe::simulate(p, prices, trace.deployment, eval);
  // The CPU cluster: all 128 cores on the batch (perfect scaling, generous
  // to it), billed per hour while on; always on for a stream of one batch
  // every `interval` seconds.
  double core_seconds = 0;
  for (const auto& l : eval)
    for (double t : l)
      core_seconds +=
          t * p.t_cal.back() * std::min(1.0, p.memory_mb.back() / prices.memory_mb_per_vcpu);
  const double cluster_seconds = core_seconds / 128.0;
  const double interval = 10.0;
  const double cluster_cost = prices.cpu_cluster_per_hour * interval / 3600.0;
  const double tokens = static_cast<double>(batch_tokens);
  const double us_per_token =
      p.t_cal.back() * 1e6 * std::min(1.0, p.memory_mb.back() / prices.memory_mb_per_vcpu);

  std::printf(
      "\n3. simulator: the small MoE's %d layers x %d experts (top %d) with 768 -> 3072 -> 768 "
      "experts, %lld-token\n"
      "   batches, loads predicted (Bayesian) and real (traced) from the model, %zu memory sizes, "
      "<= 8 replicas;\n"
      "   expert %.2f us/token measured here at one vCPU, storage %.0f MB/s + %.0f ms, calls %.0f "
      "MB/s,\n"
      "   warm start %.0f ms (assumed); prices: %s\n",
      L, E, K, static_cast<long long>(batch_tokens), p.memory_mb.size(), us_per_token,
      p.storage_bandwidth / 1e6, p.t_dl * 1e3, p.call_bandwidth / 1e6, p.t_head * 1e3,
      prices.name.c_str());
  std::printf("%-46s %14s %12s %14s %6s\n", "policy", "$ per batch", "seconds", "tokens/s", "SLO");
  auto row = [&](const char* name, double cost, double seconds, const char* slo_text) {
    std::printf("%-46s %14.6f %12.3f %14.0f %6s\n", name, cost, seconds, tokens / seconds,
                slo_text);
  };
  row("CPU cluster (128 cores, on for 1 batch / 10 s)", cluster_cost, cluster_seconds, "-");
  row("LambdaML (largest memory, no replicas, indirect)", lm.cost, lm.seconds, "-");
  row("ours (Bayesian predicted loads, optimal)", us.cost, us.seconds,
      us.seconds <= slo ? "met" : "missed");
  row("ours + BO loop", us_bo.cost, us_bo.seconds, us_bo.seconds <= slo ? "met" : "missed");
  std::printf("SLO %.3f s (1.2x LambdaML's latency)\n", slo);
  std::printf(
      "ours+BO vs CPU cluster: cost %+.1f%% (break-even: the cluster is cheaper only when a batch "
      "arrives\n"
      "  at least every %.2f s); vs LambdaML: cost %+.1f%%, throughput %+.1f%%\n",
      100 * (us_bo.cost / cluster_cost - 1), us_bo.cost * 3600 / prices.cpu_cluster_per_hour,
      100 * (us_bo.cost / lm.cost - 1), 100 * (lm.seconds / us_bo.seconds - 1));
  std::printf(
      "BO: %d iterations, %s; best simulated cost %.6f (first %.6f, SLO misses penalised)\n",
      trace.iterations, trace.converged ? "stopped by its rule" : "hit the iteration cap",
      trace.best.back(), trace.cost.front());

  double predicted_error = 0, total_real = 0;
  for (int l = 0; l < L; ++l) {
    for (int e = 0; e < E; ++e) {
      predicted_error += std::abs(predicted[l][e] - eval[l][e]);
      total_real += eval[l][e];
    }
  }
  report.facts()["simulation"] = {
      {"layers", L},
      {"experts", E},
      {"top_k", K},
      {"batch_tokens", batch_tokens},
      {"expert_us_per_token", us_per_token},
      {"storage_mb_s", p.storage_bandwidth / 1e6},
      {"storage_latency_ms", p.t_dl * 1e3},
      {"call_mb_s", p.call_bandwidth / 1e6},
      {"warm_start_ms", p.t_head * 1e3},
      {"memory_sizes", p.memory_mb.size()},
      {"prices", prices.name},
      {"cluster_per_hour", prices.cpu_cluster_per_hour},
      {"cluster_cores", 128},
      {"cluster_interval_s", interval},
      {"predicted_load_error", predicted_error / total_real},
      {"cluster", {{"cost", cluster_cost}, {"seconds", cluster_seconds}}},
      {"lambdaml", {{"cost", lm.cost}, {"seconds", lm.seconds}}},
      {"ours", {{"cost", us.cost}, {"seconds", us.seconds}}},
      {"ours_bo", {{"cost", us_bo.cost}, {"seconds", us_bo.seconds}}},
      {"slo_seconds", slo},
      {"bo",
       {{"iterations", trace.iterations},
        {"converged", trace.converged},
        {"best", trace.best.back()},
        {"first", trace.cost.front()}}}};
  report.config() = {{"small_model",
                      {{"layers", L},
                       {"experts", E},
                       {"top_k", K},
                       {"train_steps", train_steps},
                       {"profile_batches", profile},
                       {"held_out_batches", held_out}}},
                     {"smollm2", smollm2},
                     {"local", local_info},
                     {"reps", rep.reps},
                     {"warmup", rep.warmup}};
  report.write(rep.json);
  std::filesystem::remove(corpus_path);
  return 0;
}
