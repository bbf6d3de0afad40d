// Training and generation throughput of Tessera's transformer on CPU, next
// to the same model in PyTorch eager (benchmarks/torch_eager_bench.py, run
// by /usr/bin/python3 with Debian's PyTorch: same LibTorch, same BLAS, same
// thread count), measured in one run. Also a MoE layer against a dense
// layer with the same active parameters.
//
//   model_bench [--smollm2 PATH] [--skip-torch]
//
// --smollm2 PATH adds rows for SmolLM2-135M-Instruct from that GGUF file;
// --skip-torch leaves out the PyTorch column. --help lists the options.
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>

#include "command_line.h"
#include "tessera/core/subprocess.h"
#include "tessera/core/metrics.h"
#include "tessera/core/runtime.h"
#include "tessera/nn/generate.h"
#include "tessera/nn/loader.h"
#include "tessera/nn/train.h"

namespace tn = tessera::nn;
namespace fs = std::filesystem;

namespace {

struct Shapes {
  int64_t train_batch = 8, train_seq = 128, train_steps = 3;
  std::vector<int64_t> gen_batches{1, 16};
  int64_t prompt_len = 16, new_tokens = 32;
};

nlohmann::json measure_ours(tn::Transformer& model, const Shapes& s) {
  nlohmann::json out;
  const int64_t V = model.config().vocab_size;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(0);
  if (s.train_steps > 0) {
    tn::TrainerOptions opts;
    opts.steps = 1000;
    opts.lr = 1e-4;
    opts.warmup = 0;
    tn::Trainer trainer(model, opts);
    double total = 0;
    for (int64_t step = 0; step <= s.train_steps; ++step) {
      at::Tensor ids = at::randint(0, V, {s.train_batch, s.train_seq + 1}, gen, at::kLong);
      tessera::Stopwatch w;
      trainer.step(ids.narrow(1, 0, s.train_seq), ids.narrow(1, 1, s.train_seq));
      if (step > 0) total += w.seconds();
    }
    out["train_tokens_per_s"] = s.train_batch * s.train_seq / (total / s.train_steps);
    model.set_requires_grad(false);
  }
  for (int64_t b : s.gen_batches) {
    std::vector<std::vector<int64_t>> prompts;
    for (int64_t i = 0; i < b; ++i) {
      at::Tensor p = at::randint(0, V, {s.prompt_len}, gen, at::kLong);
      prompts.emplace_back(p.data_ptr<int64_t>(), p.data_ptr<int64_t>() + s.prompt_len);
    }
    tn::SamplingOptions opts;
    opts.max_new_tokens = s.new_tokens;
    tessera::Stopwatch w;
    auto r = tn::generate(model, prompts, opts);
    out["gen_b" + std::to_string(b) + "_tokens_per_s"] = r.new_tokens / w.seconds();
  }
  return out;
}

nlohmann::json measure_torch(const std::string& dir, const Shapes& s, int threads) {
  nlohmann::json args = {{"threads", threads},        {"train_batch", s.train_batch},
                         {"train_seq", s.train_seq},  {"train_steps", s.train_steps},
                         {"gen_batches", s.gen_batches}, {"prompt_len", s.prompt_len},
                         {"new_tokens", s.new_tokens}};
  const std::string text =
      tessera::run_command({"/usr/bin/python3", std::string(TESSERA_SOURCE_DIR) + "/benchmarks/torch_eager_bench.py",
                            dir, args.dump()},
                           std::chrono::hours(2))
          .output;
  auto brace = text.rfind('{');
  if (brace == std::string::npos) {
    std::cerr << "PyTorch side failed:\n" << text << "\n";
    return {};
  }
  return nlohmann::json::parse(text.substr(brace));
}

void report(const std::string& name, const nlohmann::json& ours, const nlohmann::json& torch) {
  for (const auto& [key, value] : ours.items()) {
    double a = value.get<double>();
    if (torch.contains(key)) {
      double b = torch[key].get<double>();
      std::printf("| %s | %s | %.0f | %.0f | %.2fx |\n", name.c_str(), key.c_str(), a, b, a / b);
    } else {
      std::printf("| %s | %s | %.0f | — | — |\n", name.c_str(), key.c_str(), a);
    }
    std::fflush(stdout);
  }
}

// MoE layer (E experts, top-k) vs a dense MLP with the same active
// parameters (intermediate = k * expert intermediate), forward, no grad.
void moe_vs_dense() {
  at::NoGradGuard no_grad;
  auto layer_model = [](int64_t experts, int64_t top_k, int64_t inter) {
    tn::ModelConfig c;
    c.model_type = experts ? "mixtral" : "llama";
    c.vocab_size = 512;
    c.hidden_size = 512;
    c.intermediate_size = inter;
    c.num_hidden_layers = 1;
    c.num_attention_heads = 8;
    c.num_key_value_heads = 8;
    c.num_experts = experts;
    c.num_experts_per_tok = top_k;
    auto m = std::make_unique<tn::Transformer>(c);
    m->init_random(1);
    return m;
  };
  auto dense = layer_model(0, 0, 2 * 1024);
  auto moe = layer_model(8, 2, 1024);
  at::Tensor ids = at::randint(0, 512, {8, 256}, at::kLong);
  auto time = [&](tn::Transformer& m) {
    m.forward(ids);
    tessera::Stopwatch w;
    for (int i = 0; i < 3; ++i) m.forward(ids);
    return w.seconds() / 3;
  };
  double td = time(*dense), tm = time(*moe);
  std::printf("\n| layer (hidden 512, 2048 tokens) | forward ms | tokens/s |\n|---|---|---|\n");
  std::printf("| dense MLP, intermediate 2048 (%.1fM active) | %.1f | %.0f |\n",
              dense->config().num_active_parameters() / 1e6, td * 1e3, 2048 / td);
  std::printf("| MoE 8 experts top-2, intermediate 1024 (%.1fM active, %.1fM total) | %.1f | %.0f |\n",
              moe->config().num_active_parameters() / 1e6, moe->config().num_parameters() / 1e6,
              tm * 1e3, 2048 / tm);
}

}  // namespace

int main(int argc, char** argv) {
  std::string smollm2;
  bool skip_torch = false;
  CLI::App app{
      "Training and generation throughput of Tessera's transformer on CPU next to "
      "PyTorch eager, and a MoE layer against a dense one.",
      "model_bench"};
  app.option_defaults()->always_capture_default();
  app.add_option("--smollm2", smollm2,
                 "SmolLM2-135M-Instruct GGUF file: also measure it (default: skipped)");
  app.add_flag("--skip-torch", skip_torch, "do not run the PyTorch eager side");
  if (auto code = tessera::examples::parse_command_line(app, argc, argv)) return *code;
  auto info = tessera::init_runtime();
  std::cout << "# Model benchmark: " << info.summary() << "\n\n";
  std::printf("| model | metric | Tessera | PyTorch eager | Tessera / PyTorch |\n|---|---|---|---|---|\n");
  fs::path dir = fs::temp_directory_path() / "tessera-model-bench";
  fs::remove_all(dir);

  // A ~20M-parameter Llama.
  tn::ModelConfig c;
  c.vocab_size = 8192;
  c.hidden_size = 384;
  c.intermediate_size = 1536;
  c.num_hidden_layers = 6;
  c.num_attention_heads = 6;
  c.num_key_value_heads = 2;
  {
    tn::write_random_model((dir / "small").string(), c, 0);
    tn::Transformer model = tn::load_hf_model((dir / "small").string());
    Shapes s;
    auto ours = measure_ours(model, s);
    auto torch = skip_torch ? nlohmann::json{} : measure_torch((dir / "small").string(), s, info.num_threads);
    report("Llama " + std::to_string(c.num_parameters() / 1000000) + "M", ours, torch);
  }
  if (!smollm2.empty()) {
    auto g = tn::read_gguf_model(smollm2);
    tn::save_hf_model((dir / "smollm2").string(), g.config, g.weights);
    tn::Transformer model(g.config);
    tn::load_weights(model, g.weights, smollm2);
    Shapes s;
    s.train_batch = 4;
    s.train_seq = 64;
    s.train_steps = 2;
    auto ours = measure_ours(model, s);
    auto torch = skip_torch ? nlohmann::json{} : measure_torch((dir / "smollm2").string(), s, info.num_threads);
    report("SmolLM2-135M", ours, torch);
  }
  moe_vs_dense();
  fs::remove_all(dir);
  return 0;
}
