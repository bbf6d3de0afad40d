// tessera-eval: evaluate a model on task files and print lm-eval's results table.
//
//   tessera-eval --model SmolLM2-135M-Instruct.Q4_1.gguf --tasks yue_gsm8k --limit 50
//   tessera-eval --endpoint http://127.0.0.1:8080 --tasks yue_arc_c,yue_mmlu --num-fewshot 5
//
// The model runs in this process (--model: GGUF file or Hugging Face folder,
// fp32 or packed int4 with --decoding) or behind an OpenAI-compatible server
// (--endpoint). Tasks are YAML files (data/eval/tasks, tessera/eval/task.h)
// named as lm-eval names them (tessera/eval/task_index.h): "yue_gsm8k" with
// --num-fewshot 5 is yue_gsm8k_5shot.yaml, "yue_arc_c" both of its variants.
//
// Output: the results table on stdout; results JSON (--output, lm-eval's
// layout plus "config" and "timing"); one JSON Lines sample log per task in
// --samples-dir, written as documents finish. Running the same command again
// resumes every task from its log (a run stopped after 900 of 1319 documents
// answers the other 419); --fresh starts over.
//
// Exit codes: 0 success, 1 an error (bad task file, data, model, server),
// 2 a bad command line.
#include <chrono>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "command_line.h"
#include "eval/progress_bar.h"
#include "tessera/core/error.h"
#include "tessera/core/file_io.h"
#include "tessera/core/log.h"
#include "tessera/core/runtime.h"
#include "tessera/eval/eval.h"
#include "tessera/eval/http_backend.h"
#include "tessera/eval/model_backend.h"
#include "tessera/eval/task_index.h"

#ifndef TESSERA_EVAL_SOURCE_DIR
#define TESSERA_EVAL_SOURCE_DIR ""
#endif

namespace fs = std::filesystem;
namespace ev = tessera::eval;
using nlohmann::json;

namespace {

// Caps every generation request's max_gen_toks (--max-gen-toks).
class CappedBackend final : public ev::Backend {
 public:
  CappedBackend(ev::Backend& inner, int cap) : inner_(inner), cap_(cap) {}
  std::vector<std::string> generate(const std::vector<ev::GenerateRequest>& requests) override {
    std::vector<ev::GenerateRequest> capped = requests;
    for (auto& r : capped) r.max_gen_toks = std::min(r.max_gen_toks, cap_);
    return inner_.generate(capped);
  }
  std::vector<ev::LoglikelihoodResult> loglikelihood(
      const std::vector<ev::LoglikelihoodRequest>& requests) override {
    return inner_.loglikelihood(requests);
  }

 private:
  ev::Backend& inner_;
  int cap_;
};

// The first of: the option, the environment variable, the source-tree
// default when it exists.
std::string pick_dir(const std::string& given, const char* env, const std::string& fallback) {
  if (!given.empty()) return given;
  if (const char* e = std::getenv(env); e != nullptr && *e != '\0') return e;
  if (!fallback.empty() && fs::is_directory(fallback)) return fallback;
  return "";
}

void write_atomic(const std::string& path, const std::string& text) {
  tessera::AtomicFileWriter writer(path);
  writer.append(text.data(), text.size());
  writer.commit();
}

std::string now_iso() {
  const std::time_t t = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  std::string model_path, endpoint, tasks_arg, tasks_dir, data_root, output = "results.json";
  std::string samples_dir, decoding = "fp", adapter, chat = "auto", tokenizer, api_model;
  std::string api_key_env = "OPENAI_API_KEY", log_level;
  int64_t limit = 0, batch_size = 8, chunk_tokens = 64, group_size = 0, max_length = 0;
  int64_t bootstrap_iters = 100000;
  int num_fewshot = -1, max_gen_toks = 0, retries = 3, concurrency = 4;
  double timeout_seconds = 600;
  bool fresh = false, list = false, no_batch_invariant = false;

  CLI::App app{
      "Evaluates a model on evaluation tasks (lm-evaluation-harness style YAML files) "
      "and prints lm-eval's results table.",
      "tessera-eval"};
  app.option_defaults()->always_capture_default();
  auto* model_opt = app.add_option("--model", model_path,
                                   "run this model in process: a GGUF file or a Hugging Face "
                                   "folder (config.json + safetensors)");
  auto* endpoint_opt = app.add_option("--endpoint", endpoint,
                                      "use an OpenAI-compatible server: http://host:port[/v1]");
  model_opt->excludes(endpoint_opt);
  app.add_option("--tasks", tasks_arg,
                 "comma-separated task names (see --list-tasks) or task YAML files");
  app.add_flag("--list-tasks", list, "print the task names of --tasks-dir and exit");
  app.add_option("--tasks-dir", tasks_dir,
                 "folder of task files (default: $TESSERA_EVAL_TASKS, else the source tree's "
                 "data/eval/tasks)");
  app.add_option("--data-root", data_root,
                 "folder the task files' dataset_path is relative to (default: "
                 "$TESSERA_EVAL_DATA, else shared/testdata/yue-benchmark beside the source tree)");
  app.add_option("--limit", limit, "evaluate the first N documents of each task (0: all)")
      ->check(tessera::examples::at_least(0));
  app.add_option("--num-fewshot", num_fewshot,
                 "few-shot examples per prompt (picks the task's N-shot file; -1: the files' own)")
      ->check(tessera::examples::at_least(-1));
  app.add_option("--output", output, "results JSON file");
  app.add_option("--samples-dir", samples_dir,
                 "folder of per-task sample logs, <task>.jsonl (default: the --output path "
                 "without .json, plus .samples)");
  app.add_flag("--fresh", fresh, "remove existing sample logs first instead of resuming them");
  app.add_option("--batch-size", batch_size,
                 "documents per backend call; with --model also prompts per forward")
      ->check(tessera::examples::positive());
  app.add_option("--max-gen-toks", max_gen_toks,
                 "cap on new tokens per generated answer (0: the task's max_gen_toks)")
      ->check(tessera::examples::at_least(0));
  app.add_option("--bootstrap-iters", bootstrap_iters,
                 "bootstrap resamples for standard errors (lm-eval's default; 0: none)")
      ->check(tessera::examples::at_least(0));
  app.add_option("--chat-template", chat,
                 "auto: use the model's chat template when it has one; on; off")
      ->check(CLI::IsMember({"auto", "on", "off"}));
  // In-process model.
  app.add_option("--decoding", decoding,
                 "--model: fp | w4a16 | w4a8 | w4a4 (int4-packed weights) | qspec (QSPEC "
                 "speculative decoding over the packed weights)")
      ->check(CLI::IsMember({"fp", "w4a16", "w4a8", "w4a4", "qspec"}));
  app.add_option("--group-size", group_size, "--model: inputs per int4 scale (0: automatic)")
      ->check(tessera::examples::at_least(0));
  app.add_option("--adapter", adapter, "--model: a LoRA / MoS adapter folder to apply");
  app.add_option("--chunk-tokens", chunk_tokens,
                 "--model: tokens decoded before the first stop-string check (later chunks "
                 "double)")
      ->check(tessera::examples::positive());
  app.add_flag("--no-batch-invariant", no_batch_invariant,
               "--model: faster forwards whose scores may move slightly with the batch");
  app.add_option("--max-length", max_length, "--model: context window in tokens (0: the model's)")
      ->check(tessera::examples::at_least(0));
  // Tokenizer: folders for --model, any for --endpoint.
  app.add_option("--tokenizer", tokenizer,
                 "--model: tokenizer.json of a Hugging Face folder (default: its own); "
                 "--endpoint: the served model's GGUF / tokenizer.json, for exact "
                 "log-likelihood token splits and its chat template");
  // Endpoint.
  app.add_option("--api-model", api_model,
                 "--endpoint: the \"model\" name to send (default: the first of /v1/models)");
  app.add_option("--api-key-env", api_key_env,
                 "--endpoint: environment variable holding the API key (sent as a Bearer "
                 "token when set)");
  app.add_option("--timeout", timeout_seconds, "--endpoint: seconds per HTTP request")
      ->check(tessera::examples::positive());
  app.add_option("--retries", retries, "--endpoint: retries of a failed request")
      ->check(tessera::examples::at_least(0));
  app.add_option("--concurrency", concurrency, "--endpoint: requests in flight")
      ->check(tessera::examples::positive());
  app.add_option("--log-level", log_level, "log level spec, e.g. info or warn,eval=debug");
  app.footer(
      "Examples:\n"
      "  tessera-eval --model SmolLM2-135M-Instruct.Q4_1.gguf --tasks yue_gsm8k --limit 50\n"
      "  tessera-eval --endpoint http://127.0.0.1:8080 --tasks yue_arc_c --num-fewshot 5\n"
      "  tessera-eval --list-tasks\n"
      "Exit codes: 0 success, 1 an error while evaluating, 2 a bad command line.");
  if (auto code = tessera::examples::parse_command_line(app, argc, argv)) return *code;

  try {
    tasks_dir = pick_dir(tasks_dir, "TESSERA_EVAL_TASKS",
                         std::string(TESSERA_EVAL_SOURCE_DIR).empty()
                             ? ""
                             : std::string(TESSERA_EVAL_SOURCE_DIR) + "/data/eval/tasks");
    TESSERA_CHECK(!tasks_dir.empty(), InvalidArgument,
                  "no tasks folder: pass --tasks-dir or set TESSERA_EVAL_TASKS");
    if (list) {
      for (const std::string& name : ev::list_tasks(tasks_dir)) std::cout << name << "\n";
      return 0;
    }
    if (model_path.empty() && endpoint.empty()) {
      std::cerr << "tessera-eval: pass --model PATH or --endpoint URL\n"
                   "Run with --help for more information.\n";
      return 2;
    }
    if (tasks_arg.empty()) {
      std::cerr << "tessera-eval: pass --tasks (names from --list-tasks)\n"
                   "Run with --help for more information.\n";
      return 2;
    }
    data_root =
        pick_dir(data_root, "TESSERA_EVAL_DATA",
                 std::string(TESSERA_EVAL_SOURCE_DIR).empty()
                     ? ""
                     : std::string(TESSERA_EVAL_SOURCE_DIR) + "/../shared/testdata/yue-benchmark");
    TESSERA_CHECK(!data_root.empty(), InvalidArgument,
                  "no data folder: pass --data-root or set TESSERA_EVAL_DATA (the folder the "
                  "task files' dataset_path is relative to)");

    tessera::RuntimeOptions runtime;
    runtime.log_level = log_level;
    tessera::init_runtime(runtime);

    // Tasks first: a typo fails before a model is loaded.
    const std::vector<ev::TaskSelection> selected =
        ev::resolve_tasks(ev::split_task_list(tasks_arg), tasks_dir,
                          num_fewshot >= 0 ? std::optional<int>(num_fewshot) : std::nullopt);
    std::vector<ev::Task> tasks;
    for (const ev::TaskSelection& s : selected) {
      tasks.push_back(ev::Task::load(s.path, s.load_options(data_root)));
    }

    std::unique_ptr<ev::Backend> backend;
    std::string description;
    const ev::ChatTemplateMode chat_mode = ev::parse_chat_template_mode(chat);
    if (!model_path.empty()) {
      ev::ModelBackendOptions o;
      o.model_path = model_path;
      o.tokenizer_path = tokenizer;
      o.decoding = decoding;
      o.group_size = group_size;
      o.adapter_path = adapter;
      o.chat_template = chat_mode;
      o.max_batch = batch_size;
      o.chunk_tokens = chunk_tokens;
      o.batch_invariant = !no_batch_invariant;
      o.max_length = max_length;
      auto b = ev::ModelBackend::create(o);
      description = "model " + b->describe();
      backend = std::move(b);
    } else {
      ev::HttpBackendOptions o;
      o.base_url = endpoint;
      o.model = api_model;
      if (const char* key = std::getenv(api_key_env.c_str())) o.api_key = key;
      o.tokenizer_path = tokenizer;
      o.chat_template = chat_mode;
      o.timeout = std::chrono::milliseconds(static_cast<int64_t>(timeout_seconds * 1000));
      o.max_retries = retries;
      o.concurrency = concurrency;
      auto b = ev::HttpBackend::create(o);
      description = "endpoint " + b->describe();
      backend = std::move(b);
    }
    std::unique_ptr<CappedBackend> capped;
    ev::Backend* runner = backend.get();
    if (max_gen_toks > 0) {
      capped = std::make_unique<CappedBackend>(*backend, max_gen_toks);
      runner = capped.get();
    }

    // Sample logs, and the run they belong to: resuming another model's
    // logs would mix two evaluations.
    if (samples_dir.empty()) {
      fs::path p(output);
      samples_dir = (p.parent_path() / p.stem()).string() + ".samples";
    }
    fs::create_directories(samples_dir);
    const fs::path identity_path = fs::path(samples_dir) / "run.json";
    const json identity = {{"backend", description}, {"max_gen_toks", max_gen_toks}};
    if (fresh) {
      for (const ev::Task& t : tasks) fs::remove(fs::path(samples_dir) / (t.name() + ".jsonl"));
      fs::remove(identity_path);
    }
    if (fs::exists(identity_path)) {
      std::ifstream in(identity_path);
      json logged;
      try {
        logged = json::parse(in);
      } catch (const json::exception& e) {
        TESSERA_THROW(DataLoss, identity_path.string(), ": not valid JSON: ", e.what());
      }
      TESSERA_CHECK(logged == identity, FailedPrecondition, identity_path.string(),
                    ": the sample logs there were written by another run (", logged.dump(),
                    "), not by this one (", identity.dump(),
                    "); pass --fresh to start over or choose another --output / --samples-dir");
    } else {
      write_atomic(identity_path.string(), identity.dump(2) + "\n");
    }

    std::vector<ev::TaskResult> results;
    json timing = json::object(), logs = json::object();
    for (const ev::Task& task : tasks) {
      ev::RunOptions run;
      run.batch_size = static_cast<size_t>(
          endpoint.empty() ? batch_size : std::max<int64_t>(batch_size, concurrency));
      run.limit = static_cast<size_t>(limit);
      run.aggregate.bootstrap_iters = bootstrap_iters;
      run.sample_log_path = (fs::path(samples_dir) / (task.name() + ".jsonl")).string();
      tessera::tools::ProgressBar bar(task.name());
      run.on_progress = [&bar](const ev::RunProgress& p) { bar.update(p); };
      const ev::RunReport report = ev::run_task(task, *runner, run);
      bar.finish();
      results.push_back(report.result);
      json t = {{"documents", report.result.n_samples},
                {"evaluated", report.evaluated},
                {"resumed", report.resumed},
                {"seconds", report.seconds}};
      if (report.evaluated > 0) {
        t["seconds_per_item"] = report.seconds / static_cast<double>(report.evaluated);
        t["items_per_second"] = static_cast<double>(report.evaluated) / report.seconds;
      }
      timing[task.name()] = t;
      logs[task.name()] = run.sample_log_path;
    }

    std::cout << ev::format_results_table(results);
    std::cout.flush();
    for (const ev::Task& task : tasks) {
      const json& t = timing[task.name()];
      if (t.contains("seconds_per_item")) {
        std::fprintf(stderr, "%s: %zu documents in %.1f s, %.2f s/item, %.3f items/s\n",
                     task.name().c_str(), t["evaluated"].get<size_t>(), t["seconds"].get<double>(),
                     t["seconds_per_item"].get<double>(), t["items_per_second"].get<double>());
      }
    }

    json out = json::parse(ev::results_to_json(results));
    out["config"] = {{"backend", description},
                     {"tasks", tasks_arg},
                     {"limit", limit},
                     {"num_fewshot", num_fewshot},
                     {"batch_size", batch_size},
                     {"max_gen_toks", max_gen_toks},
                     {"bootstrap_iters", bootstrap_iters},
                     {"data_root", data_root},
                     {"date", now_iso()}};
    out["timing"] = timing;
    out["samples"] = logs;
    if (!fs::path(output).parent_path().empty())
      fs::create_directories(fs::path(output).parent_path());
    write_atomic(output, out.dump(2) + "\n");
    std::fprintf(stderr, "tessera-eval: results in %s, sample logs in %s\n", output.c_str(),
                 samples_dir.c_str());
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "tessera-eval: " << e.what() << "\n";
    return 1;
  }
}
