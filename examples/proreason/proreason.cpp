// ProReason on rendered scenes: train a small vision-language model (the
// vision expert), build a held-out visual-reasoning set, and compare direct
// VLM answers, VLM chain of thought, passive describe-then-reason and
// ProReason, with SmolLM2-135M-Instruct (or any GGUF / Hugging Face text
// model) as the text LLM of every reasoning role.
//
//   proreason train-vlm --out stage1 --seed 0          # 1,500 steps: about 6 min on 2 cores
//   proreason train-vlm --out scene-vlm --init-from stage1 --steps 2500 --lr 1e-3 --warmup 50
//   proreason eval-vlm --vlm scene-vlm --scenes 200    # held-out perception accuracy
//   proreason make-benchmark --out bench --scenes 30   # bench/benchmark.json + images
//   proreason run --vlm scene-vlm --llm SmolLM2.gguf --benchmark bench/benchmark.json
//       --trace trace.jsonl --report report.json       # the four methods
//   proreason ask --vlm scene-vlm --llm SmolLM2.gguf --image bench/images/scene3.png
//       --question "How many more red circles than blue squares are there?"
//
// --vlm takes any folder nn::load_vlm_folder reads (a SmolVLM download
// works the same way); --benchmark takes the MMMU-style JSON format of
// tessera/reason/benchmark.h. --llm defaults to the SmolLM2 GGUF that
// scripts/install-deps.sh installs. With --vlm-url / --llm-url the models
// are served instead (tessera-serve or any OpenAI-compatible server), e.g.
//   tessera-serve --model scene-vlm --port 8001 &
//   tessera-serve --model SmolLM2.gguf --port 8002 &
//   proreason run --vlm-url http://127.0.0.1:8001 --llm-url http://127.0.0.1:8002 --benchmark ...
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "command_line.h"
#include "smollm2.h"
#include "tessera/core/error.h"
#include "tessera/core/log.h"
#include "tessera/reason/benchmark.h"
#include "tessera/reason/model_client.h"
#include "tessera/reason/proreason.h"
#include "tessera/reason/scene_vlm.h"

namespace tr = tessera::reason;

namespace {

void print_perception(const tr::PerceptionEval& e) {
  std::printf("held-out perception: %lld/%lld correct (%.1f%%), majority-answer baseline %.1f%%\n",
              static_cast<long long>(e.correct), static_cast<long long>(e.questions),
              100 * e.accuracy, 100 * e.majority_baseline);
  for (const auto& [kind, ct] : e.by_kind) {
    std::printf("  %-8s %lld/%lld\n", kind.c_str(), static_cast<long long>(ct.first),
                static_cast<long long>(ct.second));
  }
}

nlohmann::json perception_json(const tr::PerceptionEval& e) {
  nlohmann::json j = {{"questions", e.questions},
                      {"correct", e.correct},
                      {"accuracy", e.accuracy},
                      {"majority_baseline", e.majority_baseline}};
  for (const auto& [kind, ct] : e.by_kind) j["by_kind"][kind] = {ct.first, ct.second};
  return j;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "ProReason on rendered scenes: train the vision expert, build the held-out set, compare "
      "methods.",
      "proreason"};
  app.option_defaults()->always_capture_default();
  app.require_subcommand(1);

  tr::SceneVlmOptions train;
  int64_t eval_scenes = 200;
  auto* train_cmd =
      app.add_subcommand("train-vlm", "train the scene VLM and save it in the SmolVLM layout");
  train_cmd->add_option("--out", train.output_dir, "output folder")->required();
  train_cmd->add_option("--seed", train.seed, "weights and data order");
  train_cmd->add_option("--steps", train.steps, "optimiser steps")
      ->check(tessera::examples::positive());
  train_cmd->add_option("--batch", train.batch, "scenes per step")
      ->check(tessera::examples::positive());
  train_cmd->add_option("--lr", train.lr, "peak learning rate");
  train_cmd->add_option("--threads", train.threads, "intra-op threads (0: LibTorch's default)");
  train_cmd->add_option("--vision-lr-scale", train.vision_lr_scale,
                        "learning rate of the vision encoder and connector relative to the LM's");
  train_cmd->add_option("--warmup", train.warmup, "warm-up steps");
  train_cmd->add_option("--min-lr", train.min_lr, "learning rate at the end of the cosine decay");
  train_cmd->add_option("--init-from", train.init_from,
                        "continue training the scene VLM in this folder (empty: random weights)");
  train_cmd->add_option("--eval-scenes", eval_scenes,
                        "held-out scenes for the perception check afterwards");

  std::string vlm_dir, llm_path, benchmark, trace, report_path, image, question, options;
  int threads = 0;
  auto* eval_cmd = app.add_subcommand("eval-vlm", "perception accuracy on held-out scenes");
  eval_cmd->add_option("--vlm", vlm_dir, "VLM folder")->required();
  eval_cmd->add_option("--scenes", eval_scenes, "held-out scenes (seeds 0..N-1)");

  std::string bench_out;
  int64_t bench_scenes = 40, per_scene = 2;
  uint64_t first_seed = 10000;
  auto* make_cmd = app.add_subcommand("make-benchmark", "render the held-out visual-reasoning set");
  make_cmd->add_option("--out", bench_out, "output folder (benchmark.json, images/)")->required();
  make_cmd->add_option("--scenes", bench_scenes, "scenes")->check(tessera::examples::positive());
  make_cmd->add_option("--per-scene", per_scene, "questions per scene")
      ->check(tessera::examples::positive());
  make_cmd->add_option("--first-seed", first_seed, "first scene seed (held out: below 500000)");

  tr::BenchmarkOptions bench;
  std::string vlm_url, llm_url, api_key;
  auto add_urls = [&](CLI::App* cmd) {
    cmd->add_option("--vlm-url", vlm_url,
                    "the vision expert on an OpenAI-compatible server (instead of --vlm)");
    cmd->add_option("--llm-url", llm_url,
                    "the text LLM on an OpenAI-compatible server (instead of --llm)");
    cmd->add_option("--api-key", api_key, "API key for the servers");
  };
  auto* run_cmd = app.add_subcommand("run", "compare the methods on a benchmark JSON");
  run_cmd->add_option("--vlm", vlm_dir, "VLM folder (vision expert)");
  add_urls(run_cmd);
  run_cmd->add_option("--llm", llm_path,
                      "text LLM (GGUF or HF folder); default: the installed SmolLM2");
  run_cmd->add_option("--benchmark", benchmark, "MMMU-style JSON")->required();
  run_cmd->add_option(
      "--methods", bench.methods,
      "blind (control: the image replaced by its mean colour), direct, cot, describe, proreason");
  run_cmd->add_option("--limit", bench.limit, "first N items (0: all)");
  run_cmd->add_option("--max-iterations", bench.proreason.max_iterations,
                      "ProReason expert calls at most");
  run_cmd->add_option("--trace", trace, "JSONL trace of every model call (appended)");
  run_cmd->add_option("--report", report_path, "JSON report of the results");
  run_cmd->add_option("--threads", threads, "intra-op threads (0: LibTorch's default)");

  auto* ask_cmd = app.add_subcommand("ask", "ProReason on one image and question");
  ask_cmd->add_option("--vlm", vlm_dir, "VLM folder");
  add_urls(ask_cmd);
  ask_cmd->add_option("--llm", llm_path, "text LLM; default: the installed SmolLM2");
  ask_cmd->add_option("--image", image, "PNG or JPEG")->required();
  ask_cmd->add_option("--question", question, "the question")->required();
  ask_cmd->add_option("--options", options, "comma-separated options (multiple choice)");
  ask_cmd->add_option("--trace", trace, "JSONL trace of every model call (appended)");

  if (auto code = tessera::examples::parse_command_line(app, argc, argv)) return *code;
  try {
    if (train_cmd->parsed()) {
      tr::SceneVlmReport r = tr::train_scene_vlm(train);
      std::printf("trained %s: %.2fM parameters, vocabulary %lld, %.0f s, final loss %.4f\n",
                  train.output_dir.c_str(), r.parameters / 1e6,
                  static_cast<long long>(r.vocab_size), r.seconds, r.loss_curve.back().second);
      auto vlm = tessera::nn::load_vlm_folder(train.output_dir);
      tr::PerceptionEval e = tr::evaluate_perception(vlm, 0, eval_scenes);
      print_perception(e);
      nlohmann::json j = {{"parameters", r.parameters},
                          {"vocab_size", r.vocab_size},
                          {"seconds", r.seconds},
                          {"seed", train.seed},
                          {"steps", train.steps},
                          {"batch", train.batch},
                          {"perception", perception_json(e)}};
      for (auto [step, loss] : r.loss_curve) j["loss_curve"].push_back({step, loss});
      std::ofstream(std::filesystem::path(train.output_dir) / "training_report.json")
          << j.dump(1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
      return 0;
    }
    if (eval_cmd->parsed()) {
      auto vlm = tessera::nn::load_vlm_folder(vlm_dir);
      print_perception(tr::evaluate_perception(vlm, 0, eval_scenes));
      return 0;
    }
    if (make_cmd->parsed()) {
      auto items = tr::make_rendered_benchmark(bench_out, first_seed, bench_scenes, per_scene);
      std::printf("%zu questions written to %s/benchmark.json\n", items.size(), bench_out.c_str());
      return 0;
    }
    if (vlm_dir.empty() == vlm_url.empty()) {
      std::fprintf(stderr, "proreason: give one of --vlm and --vlm-url\n");
      return 2;
    }
    if (llm_url.empty() && llm_path.empty()) llm_path = tessera::examples::smollm2_gguf_path();
    if (llm_url.empty() && llm_path.empty()) {
      std::fprintf(stderr, "proreason: no --llm given and the SmolLM2 GGUF is not installed\n");
      return 1;
    }
    auto served = [&](const std::string& url, bool images) {
      tr::OpenAiClientOptions o;
      o.base_url = url;
      o.api_key = api_key;
      o.images = images;
      return tr::OpenAiClient::create(o);
    };
    std::unique_ptr<tr::ModelClient> vlm =
        vlm_url.empty() ? tr::VlmClient::create({vlm_dir, threads}) : served(vlm_url, true);
    std::unique_ptr<tr::ModelClient> llm =
        llm_url.empty() ? tr::TextClient::create({llm_path, threads}) : served(llm_url, false);
    if (run_cmd->parsed()) {
      bench.trace_path = trace;
      auto items = tr::load_benchmark(benchmark);
      std::vector<tr::ItemOutcome> outcomes;
      auto summaries = tr::run_benchmark(items, *vlm, *llm, bench, &outcomes);
      std::printf("%-10s %9s %9s %8s %8s %9s\n", "method", "accuracy", "unparsed", "calls/q",
                  "tokens/q", "seconds/q");
      nlohmann::json report = {
          {"vlm", vlm->name()}, {"llm", llm->name()}, {"benchmark", benchmark}};
      for (const auto& s : summaries) {
        std::printf("%-10s %8.1f%% %9lld %8.2f %8.0f %9.2f\n", s.method.c_str(), 100 * s.accuracy,
                    static_cast<long long>(s.unparsed), s.calls_per_question, s.tokens_per_question,
                    s.seconds_per_question);
        nlohmann::json m = {{"questions", s.questions},
                            {"correct", s.correct},
                            {"accuracy", s.accuracy},
                            {"unparsed", s.unparsed},
                            {"calls_per_question", s.calls_per_question},
                            {"tokens_per_question", s.tokens_per_question},
                            {"seconds_per_question", s.seconds_per_question}};
        for (const auto& [kind, ct] : s.by_kind) m["by_kind"][kind] = {ct.first, ct.second};
        report["methods"][s.method] = m;
      }
      for (const auto& o : outcomes) {
        report["outcomes"].push_back({{"id", o.id},
                                      {"method", o.method},
                                      {"choice", o.choice},
                                      {"correct", o.correct},
                                      {"answer", o.answer},
                                      {"memory", o.memory}});
      }
      // A model may answer with bytes that are not UTF-8 (a byte-level
      // token cut mid-character): they are written as U+FFFD.
      if (!report_path.empty()) {
        std::ofstream(report_path)
            << report.dump(1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
      }
      return 0;
    }
    tr::Question q{"ask", tessera::nn::read_image(image), question, {}};
    for (size_t start = 0; !options.empty() && start <= options.size();) {
      const size_t comma = options.find(',', start);
      q.options.push_back(
          options.substr(start, comma == std::string::npos ? std::string::npos : comma - start));
      if (comma == std::string::npos) break;
      start = comma + 1;
    }
    tr::Agents agents{vlm.get(), llm.get(), llm.get(), llm.get(), llm.get()};
    tr::MethodResult r = tr::run_proreason(agents, q, {});
    for (const auto& t : r.trace)
      std::printf("[%s] %s\n  -> %s\n", t.role.c_str(), t.prompt.c_str(), t.answer.c_str());
    std::printf("answer: %s\n", r.answer.c_str());
    if (!trace.empty()) tr::append_jsonl(trace, r.trace);
    return 0;
  } catch (const tessera::Error& e) {
    std::fprintf(stderr, "proreason: %s\n", e.what());
    return 1;
  }
}
