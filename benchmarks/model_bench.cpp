// Training and generation throughput of Tessera's transformer on CPU, next
// to the same model in PyTorch eager (benchmarks/torch_eager_bench.py, run
// by /usr/bin/python3 with Debian's PyTorch: same LibTorch, same BLAS, same
// thread count), measured in one run. Also a MoE layer against a dense
// layer with the same active parameters.
//
//   model_bench [--smollm2 PATH] [--skip-torch] [--train-steps 20] [--reps 3]
//               [--warmup 1] [--quick] [--json FILE]
//
// --smollm2 PATH adds rows for SmolLM2-135M-Instruct from that GGUF file;
// --skip-torch leaves out the PyTorch column. Both sides run --warmup
// untimed then --train-steps timed training steps (each timed alone) and
// --reps timed generation calls per batch size; --json writes every step's
// and call's seconds. --quick: a tiny model, 2 steps, 1 call (smoke test).
// --help lists the options.
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <unistd.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>

#include "bench_report.h"
#include "command_line.h"
#include "tessera/core/metrics.h"
#include "tessera/core/runtime.h"
#include "tessera/core/subprocess.h"
#include "tessera/nn/generate.h"
#include "tessera/nn/loader.h"
#include "tessera/nn/train.h"

namespace tn = tessera::nn;
namespace fs = std::filesystem;

namespace {

struct Shapes {
  int64_t train_batch = 8, train_seq = 128, train_steps = 20;
  std::vector<int64_t> gen_batches{1, 16};
  int64_t gen_calls = 3, warmup = 1;
  int64_t prompt_len = 16, new_tokens = 32;
};

// Every timed step's and call's seconds, and the tokens each counts; the
// same keys as torch_eager_bench.py prints.
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
    std::vector<double> times;
    for (int64_t step = 0; step < s.warmup + s.train_steps; ++step) {
      at::Tensor ids = at::randint(0, V, {s.train_batch, s.train_seq + 1}, gen, at::kLong);
      tessera::Stopwatch w;
      trainer.step(ids.narrow(1, 0, s.train_seq), ids.narrow(1, 1, s.train_seq));
      if (step >= s.warmup) times.push_back(w.seconds());
    }
    out["train_step_seconds"] = times;
    out["train_tokens_per_step"] = s.train_batch * s.train_seq;
    model.set_requires_grad(false);
  }
  for (int64_t b : s.gen_batches) {
    std::vector<double> times;
    int64_t tokens = 0;
    for (int64_t call = 0; call < s.warmup + s.gen_calls; ++call) {
      std::vector<std::vector<int64_t>> prompts;
      for (int64_t i = 0; i < b; ++i) {
        at::Tensor p = at::randint(0, V, {s.prompt_len}, gen, at::kLong);
        prompts.emplace_back(p.data_ptr<int64_t>(), p.data_ptr<int64_t>() + s.prompt_len);
      }
      tn::SamplingOptions opts;
      opts.max_new_tokens = s.new_tokens;
      tessera::Stopwatch w;
      auto r = tn::generate(model, prompts, opts);
      if (call >= s.warmup) times.push_back(w.seconds());
      tokens = r.new_tokens;
    }
    out["gen_b" + std::to_string(b) + "_seconds"] = times;
    out["gen_b" + std::to_string(b) + "_tokens"] = tokens;
  }
  return out;
}

nlohmann::json measure_torch(const std::string& dir, const Shapes& s, int threads) {
  nlohmann::json args = {{"threads", threads},        {"train_batch", s.train_batch},
                         {"train_seq", s.train_seq},  {"train_steps", s.train_steps},
                         {"warmup", s.warmup},        {"gen_batches", s.gen_batches},
                         {"gen_calls", s.gen_calls},  {"prompt_len", s.prompt_len},
                         {"new_tokens", s.new_tokens}};
  const std::string text =
      tessera::run_command(
          {"/usr/bin/python3", std::string(TESSERA_SOURCE_DIR) + "/benchmarks/torch_eager_bench.py",
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

// Tokens per second of the median step ("train") or call ("gen_b16"); 0
// when the side has no such numbers.
double rate(const nlohmann::json& side, const std::string& metric) {
  const std::string tokens_key = metric == "train" ? "train_tokens_per_step" : metric + "_tokens";
  if (!side.contains(metric + (metric == "train" ? "_step_seconds" : "_seconds"))) return 0;
  const auto v =
      side[metric + (metric == "train" ? "_step_seconds" : "_seconds")].get<std::vector<double>>();
  return side[tokens_key].get<double>() / tessera::bench::median(v);
}

// Prints the table rows of one model and adds its series to the report.
void report_model(const std::string& model, const std::string& key, const Shapes& s,
                  const nlohmann::json& ours, const nlohmann::json& torch,
                  tessera::bench::Report& out) {
  std::vector<std::string> metrics;
  if (ours.contains("train_step_seconds")) metrics.push_back("train");
  for (int64_t b : s.gen_batches) metrics.push_back("gen_b" + std::to_string(b));
  for (const std::string& m : metrics) {
    const double a = rate(ours, m), t = torch.is_null() ? 0 : rate(torch, m);
    if (t > 0) {
      std::printf("| %s | %s tokens/s | %.0f | %.0f | %.2fx |\n", model.c_str(), m.c_str(), a, t,
                  a / t);
    } else {
      std::printf("| %s | %s tokens/s | %.0f | — | — |\n", model.c_str(), m.c_str(), a);
    }
    std::fflush(stdout);
    const std::string seconds = m == "train" ? "train_step_seconds" : m + "_seconds";
    const std::string tokens = m == "train" ? "train_tokens_per_step" : m + "_tokens";
    for (const auto& [side, doc] : {std::pair<std::string, const nlohmann::json*>{"tessera", &ours},
                                    {"torch_eager", &torch}}) {
      if (doc->is_null() || !doc->contains(seconds)) continue;
      out.add_series(key + "." + m + "." + side, "s", (*doc)[seconds].get<std::vector<double>>(),
                     {{"model", model},
                      {"metric", m},
                      {"side", side},
                      {"tokens", (*doc)[tokens].get<double>()}});
    }
  }
}

// MoE layer (E experts, top-k) vs a dense MLP with the same active
// parameters (intermediate = k * expert intermediate), forward, no grad.
void moe_vs_dense(const Shapes& s, bool quick, tessera::bench::Report& out) {
  at::NoGradGuard no_grad;
  const int64_t hidden = quick ? 64 : 512, inter = quick ? 128 : 1024;
  auto layer_model = [&](int64_t experts, int64_t top_k, int64_t intermediate) {
    tn::ModelConfig c;
    c.model_type = experts ? "mixtral" : "llama";
    c.vocab_size = 512;
    c.hidden_size = hidden;
    c.intermediate_size = intermediate;
    c.num_hidden_layers = 1;
    c.num_attention_heads = 8;
    c.num_key_value_heads = 8;
    c.num_experts = experts;
    c.num_experts_per_tok = top_k;
    auto m = std::make_unique<tn::Transformer>(c);
    m->init_random(1);
    return m;
  };
  auto dense = layer_model(0, 0, 2 * inter);
  auto moe = layer_model(8, 2, inter);
  at::Tensor ids = at::randint(0, 512, {8, 256}, at::kLong);
  auto time = [&](tn::Transformer& m) {
    for (int64_t i = 0; i < s.warmup; ++i) m.forward(ids);
    std::vector<double> t;
    for (int64_t i = 0; i < s.gen_calls; ++i) {
      tessera::Stopwatch w;
      m.forward(ids);
      t.push_back(w.seconds());
    }
    return t;
  };
  const std::vector<double> td = time(*dense), tm = time(*moe);
  out.add_series("layer.dense", "s", td,
                 {{"hidden", hidden},
                  {"intermediate", 2 * inter},
                  {"tokens", 2048},
                  {"active_parameters", dense->config().num_active_parameters()}});
  out.add_series("layer.moe", "s", tm,
                 {{"hidden", hidden},
                  {"intermediate", inter},
                  {"experts", 8},
                  {"top_k", 2},
                  {"tokens", 2048},
                  {"active_parameters", moe->config().num_active_parameters()},
                  {"parameters", moe->config().num_parameters()}});
  const double d = tessera::bench::median(td), m = tessera::bench::median(tm);
  std::printf("\n| layer (hidden %lld, 2048 tokens) | forward ms | tokens/s |\n|---|---|---|\n",
              static_cast<long long>(hidden));
  std::printf("| dense MLP, intermediate %lld (%.2fM active) | %.1f | %.0f |\n",
              static_cast<long long>(2 * inter), dense->config().num_active_parameters() / 1e6,
              d * 1e3, 2048 / d);
  std::printf(
      "| MoE 8 experts top-2, intermediate %lld (%.2fM active, %.2fM total) | %.1f | %.0f |\n",
      static_cast<long long>(inter), moe->config().num_active_parameters() / 1e6,
      moe->config().num_parameters() / 1e6, m * 1e3, 2048 / m);
}

}  // namespace

int main(int argc, char** argv) {
  std::string smollm2;
  bool skip_torch = false;
  Shapes shapes;
  tessera::bench::RepeatOptions rep;
  rep.reps = 3;
  rep.warmup = 1;
  CLI::App app{
      "Training and generation throughput of Tessera's transformer on CPU next to "
      "PyTorch eager, and a MoE layer against a dense one.",
      "model_bench"};
  app.option_defaults()->always_capture_default();
  app.add_option("--smollm2", smollm2,
                 "SmolLM2-135M-Instruct GGUF file: also measure it (default: skipped)");
  app.add_flag("--skip-torch", skip_torch, "do not run the PyTorch eager side");
  app.add_option("--train-steps", shapes.train_steps, "timed training steps per side")
      ->check(tessera::examples::positive());
  tessera::bench::add_repeat_options(app, rep);
  app.get_option("--reps")->description("timed generation calls per batch size and side");
  if (auto code = tessera::examples::parse_command_line(app, argc, argv)) return *code;
  shapes.gen_calls = rep.reps;
  shapes.warmup = rep.warmup;
  if (rep.quick) {
    shapes.train_steps = std::min<int64_t>(shapes.train_steps, 2);
    shapes.train_batch = 2;
    shapes.train_seq = 16;
    shapes.gen_batches = {1, 4};
    shapes.new_tokens = 4;
  }
  auto info = tessera::init_runtime();
  tessera::bench::Report report("model", argc, argv, rep.quick);
  std::cout << "# Model benchmark: " << info.summary() << "\n\n";
  std::printf(
      "| model | metric | Tessera | PyTorch eager | Tessera / PyTorch |\n|---|---|---|---|---|\n");
  fs::path dir = fs::temp_directory_path() / ("tessera-model-bench-" + std::to_string(::getpid()));
  fs::remove_all(dir);

  // A ~20M-parameter Llama (a ~0.2M one with --quick).
  tn::ModelConfig c;
  c.vocab_size = rep.quick ? 512 : 8192;
  c.hidden_size = rep.quick ? 64 : 384;
  c.intermediate_size = rep.quick ? 128 : 1536;
  c.num_hidden_layers = rep.quick ? 2 : 6;
  c.num_attention_heads = rep.quick ? 4 : 6;
  c.num_key_value_heads = 2;
  nlohmann::json models = nlohmann::json::array();
  std::string torch_version;
  {
    tn::write_random_model((dir / "small").string(), c, 0);
    tn::Transformer model = tn::load_hf_model((dir / "small").string());
    auto ours = measure_ours(model, shapes);
    auto torch = skip_torch ? nlohmann::json()
                            : measure_torch((dir / "small").string(), shapes, info.num_threads);
    if (torch.contains("torch")) torch_version = torch["torch"];
    const std::string name = rep.quick
                                 ? std::string("Llama (tiny)")
                                 : "Llama " + std::to_string(c.num_parameters() / 1000000) + "M";
    models.push_back({{"key", "llama"},
                      {"name", name},
                      {"parameters", c.num_parameters()},
                      {"train_batch", shapes.train_batch},
                      {"train_seq", shapes.train_seq}});
    report_model(name, "llama", shapes, ours, torch, report);
  }
  if (!smollm2.empty()) {
    auto g = tn::read_gguf_model(smollm2);
    tn::save_hf_model((dir / "smollm2").string(), g.config, g.weights);
    tn::Transformer model(g.config);
    tn::load_weights(model, g.weights, smollm2);
    Shapes s = shapes;
    s.train_batch = 4;
    s.train_seq = 64;
    if (rep.quick) {
      s.train_batch = 1;
      s.train_seq = 16;
    }
    auto ours = measure_ours(model, s);
    auto torch = skip_torch ? nlohmann::json()
                            : measure_torch((dir / "smollm2").string(), s, info.num_threads);
    models.push_back({{"key", "smollm2"},
                      {"name", "SmolLM2-135M"},
                      {"parameters", g.config.num_parameters()},
                      {"train_batch", s.train_batch},
                      {"train_seq", s.train_seq}});
    report_model("SmolLM2-135M", "smollm2", s, ours, torch, report);
  }
  moe_vs_dense(shapes, rep.quick, report);
  report.config() = {
      {"threads", info.num_threads},
      {"torch_eager", skip_torch ? nlohmann::json(nullptr) : nlohmann::json(torch_version)},
      {"torch_python", "/usr/bin/python3"},
      {"models", models},
      {"train_steps", shapes.train_steps},
      {"gen_calls", shapes.gen_calls},
      {"warmup", shapes.warmup},
      {"gen_batches", shapes.gen_batches},
      {"prompt_len", shapes.prompt_len},
      {"new_tokens", shapes.new_tokens},
      {"optimizer", "AdamW (lr 1e-4, betas 0.9/0.95, weight decay 0.1), clipping at 1.0"}};
  report.write(rep.json);
  fs::remove_all(dir);
  return 0;
}
