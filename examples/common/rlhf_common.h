// Shared by examples/rlhf_grpo and examples/rlhf_ppo: command line, model
// preparation, worker placement and the progress table.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "command_line.h"
#include "progress.h"
#include "smollm2.h"
#include "tessera/core/error.h"
#include "tessera/nn/generate.h"
#include "tessera/nn/loader.h"
#include "tessera/nn/train.h"
#include "tessera/rlhf/driver.h"
#include "tessera/rlhf/pipeline.h"
#include "tessera/rlhf/roles.h"
#include "tessera/tasks/arithmetic.h"

namespace rlhf_example {

namespace tn = tessera::nn;
namespace tr = tessera::rlhf;

struct Options {
  std::string model = "smollm2";  // smollm2 | small
  std::string gguf;               // SmolLM2 file (default: scripts/smollm2-path.sh)
  std::string small_dir = "/tmp/tessera-rlhf-small";
  std::string placement = "colocated";  // colocated | split
  int processes = 4, tp = 0,
      gen_tp = 1;    // tp 0: per-model default (SmolLM2's 9 heads allow 1 or 3)
  double lr = 0;     // 0: per-model default
  std::string ckpt;  // checkpoint root ("" : none)
  int64_t checkpoint_every = 1;
  bool resume = false;
  tr::PipelineOptions run;
};

// Reads the command line of the example running `algorithm` (its name, as
// "GRPO") into `o`; --help lists every option. Returns the code main()
// should return when it should stop (0 after --help, 2 after a bad command
// line), std::nullopt to go on. Values left at their "per model" setting
// are then filled in for the chosen --model; `default_iterations` is
// SmolLM2's (the small model runs 5x as many).
inline std::optional<int> parse(int argc, char** argv, const std::string& algorithm,
                                int64_t default_iterations, Options* o) {
  o->run.iterations = -1;
  o->run.prompts_per_iteration = -1;
  o->run.samples = -1;
  o->run.max_operand = 9;  // single-digit sums: hard enough for 135M parameters
  CLI::App app{algorithm +
                   " on arithmetic questions with a rule reward: SmolLM2-135M-Instruct (or a "
                   "small byte-level model) trained by local worker processes under one driver.",
               std::filesystem::path(argc > 0 ? argv[0] : "").filename().string()};
  app.option_defaults()->always_capture_default();
  app.add_option("--model", o->model,
                 "smollm2: SmolLM2-135M-Instruct; small: a byte-level model pretrained once "
                 "into " +
                     o->small_dir)
      ->check(CLI::IsMember({"smollm2", "small"}));
  app.add_option("--gguf", o->gguf,
                 "the SmolLM2 GGUF file (default: $TESSERA_SMOLLM2_GGUF, else what "
                 "scripts/smollm2-path.sh finds)");
  const auto per_model = [](const std::string& smollm2, const std::string& small) {
    return " (default: " + smollm2 + " with smollm2, " + small + " with small)";
  };
  app.add_option("--iterations", o->run.iterations,
                 "training iterations" + per_model(std::to_string(default_iterations),
                                                   std::to_string(5 * default_iterations)))
      ->default_str("");
  app.add_option("--prompts", o->run.prompts_per_iteration,
                 "prompts per iteration" + per_model("8", "16"))
      ->default_str("");
  app.add_option("--samples", o->run.samples, "responses sampled per prompt" + per_model("4", "8"))
      ->default_str("");
  app.add_option("--placement", o->placement,
                 "colocated: every role on all " + std::to_string(o->processes) +
                     " worker processes; split: the actor on half, the other roles on the "
                     "other half")
      ->check(CLI::IsMember({"colocated", "split"}));
  app.add_option("--tp", o->tp,
                 "the actor's tensor-parallel degree in training (SmolLM2's 9 heads allow 1 "
                 "or 3)" +
                     per_model("1", "2"))
      ->default_str("");
  app.add_option("--gen-tp", o->gen_tp,
                 "the actor's tensor-parallel degree in generation (at most --tp)");
  app.add_option("--lr", o->lr, "learning rate of the actor and critic" + per_model("2e-6", "1e-4"))
      ->default_str("");
  app.add_option("--ckpt", o->ckpt, "checkpoint root directory (default: no checkpoints)");
  app.add_option("--checkpoint-every", o->checkpoint_every,
                 "iterations between checkpoints (with --ckpt)");
  app.add_flag("--resume", o->resume, "resume from the latest checkpoint under --ckpt");
  app.add_option("--stop-after", o->run.stop_after,
                 "stop, as if interrupted, after this many iterations of this run; -1: run all");
  app.add_option("--max-operand", o->run.max_operand, "largest operand of the questions");
  if (auto code = tessera::examples::parse_command_line(app, argc, argv)) return code;

  // Defaults per model: SmolLM2 iterations cost ~15 s on 2 cores, the small
  // model's ~0.4 s, so it takes more and larger iterations in the same time.
  const bool small = o->model == "small";
  if (o->run.iterations < 0)
    o->run.iterations = small ? 5 * default_iterations : default_iterations;
  if (o->run.prompts_per_iteration < 0) o->run.prompts_per_iteration = small ? 16 : 8;
  if (o->run.samples < 0) o->run.samples = small ? 8 : 4;
  o->run.checkpoint_dir = o->ckpt;
  o->run.checkpoint_every = o->ckpt.empty() ? 0 : o->checkpoint_every;
  o->run.resume = o->resume;
  return std::nullopt;
}

inline std::string smollm2_path(const std::string& given) {
  if (!given.empty()) return given;
  const std::string out = tessera::examples::smollm2_gguf_path();
  if (out.empty()) {
    throw tessera::NotFound(
        "SmolLM2-135M-Instruct not found: run scripts/install-deps.sh, pass --gguf, or use "
        "--model small");
  }
  return out;
}

// A small byte-level model that has seen some arithmetic (a few hundred
// steps of next-token training, as the quickstart's pretraining stage
// does), written once as a Hugging Face folder and reused.
inline std::string small_model(const std::string& dir) {
  if (std::filesystem::exists(dir + "/config.json")) return dir;
  std::printf("pretraining the small model (once, into %s)...\n", dir.c_str());
  auto tokenizer = tn::Tokenizer::bytes({"<|endoftext|>"});
  std::filesystem::create_directories(dir);
  tn::TokenDataset::write(dir + "/arithmetic.tokens",
                          tessera::tasks::arithmetic_corpus(tokenizer, 20000, /*seed=*/1));
  auto data = tn::TokenDataset::open(dir + "/arithmetic.tokens");
  tn::ModelConfig cfg = tessera::tasks::small_arithmetic_config(tokenizer.vocab_size());
  tn::Transformer model(cfg);
  model.init_random(/*seed=*/7);
  tn::TrainerOptions to;
  to.steps = 500;
  to.lr = 3e-3;
  to.min_lr = 3e-4;
  to.warmup = 15;
  tn::Trainer trainer(model, to);
  tessera::examples::Progress progress("pretraining", to.steps);
  for (int64_t s = 0; s < to.steps; ++s) {
    auto batch = data.batch(s, /*global_batch=*/32, /*seq_len=*/64);
    progress.step(trainer.step(batch.input_ids, batch.labels).loss);
  }
  tn::save_hf_model(dir, cfg, tn::gather_full_weights(model));
  return dir;
}

// Pools and roles for the chosen placement: colocated puts every role on
// all processes (time-shared); split gives the actor half the processes
// and the other roles the other half.
inline tr::DriverOptions placement(const Options& o, const std::string& model_json,
                                   const std::string& tokenizer, double lr, bool with_critic) {
  tr::DriverOptions d;
  const bool split = o.placement == "split";
  const int actor_procs = split ? o.processes / 2 : o.processes;
  const std::string other = split ? "others" : "all";
  d.pools = {{split ? "actor" : "all", actor_procs}};
  if (split) d.pools.push_back({"others", o.processes - actor_procs});
  const int tp = std::min(o.tp, actor_procs);
  const std::string actor =
      "{\"model\": " + model_json + ", \"tp\": " + std::to_string(tp) +
      ", \"gen_tp\": " + std::to_string(std::min(o.gen_tp, tp)) +
      ", \"lr\": " + std::to_string(lr) +
      ", \"temperature\": 1.0, \"max_new_tokens\": 8, \"micro_batch\": 16, \"seed\": 1}";
  d.roles.push_back({"actor", "actor", d.pools[0].name, actor});
  d.roles.push_back(
      {"reference", "reference", other, "{\"model\": " + model_json + ", \"micro_batch\": 16}"});
  d.roles.push_back({"reward", "reward_rule", other, "{\"tokenizer\": \"" + tokenizer + "\"}"});
  if (with_critic) {
    d.roles.push_back({"critic", "critic", other,
                       "{\"model\": " + model_json + ", \"lr\": " + std::to_string(lr) +
                           ", \"micro_batch\": 16}"});
  }
  return d;
}

// Sets up model, tokenizer and prompt format; returns the driver options.
struct Prepared {
  tr::DriverOptions driver;
  tn::Tokenizer tokenizer;
};
inline Prepared prepare(Options& o, bool with_critic) {
  std::string model_json, tokenizer_spec;
  double lr = o.lr;
  if (o.model == "smollm2") {
    const std::string path = smollm2_path(o.gguf);
    model_json = "{\"gguf\": \"" + path + "\"}";
    tokenizer_spec = "gguf:" + path;
    auto gguf = tn::read_gguf_model(path);
    o.run.prompt_format = "chat";
    o.run.chat_template = gguf.chat_template;
    if (lr == 0) lr = 2e-6;
    if (o.tp == 0) o.tp = 1;
  } else {
    model_json = "{\"hf\": \"" + small_model(o.small_dir) + "\"}";
    tokenizer_spec = "bytes";
    if (lr == 0) lr = 1e-4;
    if (o.tp == 0) o.tp = 2;
  }
  Prepared p{placement(o, model_json, tokenizer_spec, lr, with_critic),
             tr::load_tokenizer(tokenizer_spec)};
  return p;
}

inline void print_header() {
  std::printf("%5s %8s %9s %8s %7s %8s %9s %12s %11s\n", "iter", "reward", "pg_loss", "kl", "clip",
              "sec", "tok/s", "reshard MB", "gen wts MB");
}

inline void print_row(const tr::IterationStats& s) {
  std::printf("%5lld %8.3f %9.4f %8.4f %7.3f %8.2f %9.1f %12.2f %11.2f\n",
              static_cast<long long>(s.iteration), s.mean_score, s.pg_loss, s.kl, s.clip_fraction,
              s.seconds, s.tokens_per_second, s.transition_bytes / 1e6,
              s.generation_weight_bytes / 1e6);
  std::fflush(stdout);
}

inline void print_summary(const std::vector<tr::IterationStats>& stats) {
  if (stats.size() < 2) return;
  const size_t k = std::max<size_t>(1, stats.size() / 3);
  double first = 0, last = 0;
  for (size_t i = 0; i < k; ++i) {
    first += stats[i].mean_score / k;
    last += stats[stats.size() - 1 - i].mean_score / k;
  }
  std::printf("mean reward: first %zu iterations %.3f -> last %zu iterations %.3f\n", k, first, k,
              last);
}

// The examples' main(): spawned copies run their roles; the driver parses
// the flags, starts the workers and runs `algorithm` (run_grpo, run_ppo).
template <typename Algorithm>
int example_main(int argc, char** argv, const char* name, bool with_critic, Algorithm&& algorithm,
                 const tr::IterationCallback& on_iteration = print_row) {
  // Spawned copies run their roles before (and without) the command line.
  if (auto code = tr::run_worker_if_spawned(tr::RoleRegistry::builtin())) return *code;
  Options o;
  if (auto code = parse(argc, argv, name, /*default_iterations=*/12, &o)) return *code;
  try {
    auto prepared = prepare(o, with_critic);
    tr::Driver driver(prepared.driver);
    std::printf(
        "%s, %s model, %s placement on %d processes, %lld prompts x %lld samples per iteration\n",
        name, o.model.c_str(), o.placement.c_str(), o.processes,
        static_cast<long long>(o.run.prompts_per_iteration), static_cast<long long>(o.run.samples));
    print_header();
    print_summary(algorithm(driver, prepared.tokenizer, o.run, on_iteration));
    driver.shutdown();
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: %s\n", argv[0], e.what());
    return 1;
  }
}

}  // namespace rlhf_example
