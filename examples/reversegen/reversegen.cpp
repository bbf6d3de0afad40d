// ReverseGen on SmolLM2-135M-Instruct, math domain: a proposer (SmolLM2 +
// LoRA) learns by DPO to write arithmetic questions SmolLM2 gets wrong,
// then SmolLM2 is fine-tuned on them and compared with fine-tuning on the
// warm-up proposer's questions and on the seed questions.
//
//   reversegen --rounds 3 --work-dir runs/reversegen
//
// Every stage keeps its results under --work-dir (JSONL records, training
// checkpoints, summaries); run the same command again after a crash or a
// kill and it continues where it stopped. Prints, per round, the failure
// rate of the proposer's questions on the target and their diversity, then
// (unless --no-target) held-out accuracy of the target after each kind of
// fine-tuning, for --target-seeds seeds. The results also go to
// <work-dir>/results.md. With the default sizes a run takes about 11
// minutes on two CPU cores; docs/reversegen.md reports two (the default
// level and --max-operands 2 --max-value 20 --no-division).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "command_line.h"
#include "smollm2.h"
#include "tessera/core/error.h"
#include "tessera/core/metrics.h"
#include "tessera/core/runtime.h"
#include "tessera/synth/generator.h"
#include "tessera/synth/labeller.h"
#include "tessera/synth/math.h"
#include "tessera/synth/reversegen.h"

namespace ts = tessera::synth;

namespace {

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), f, v);
  return buf;
}

// Mean and sample standard deviation.
std::pair<double, double> mean_sd(const std::vector<double>& x) {
  double m = 0, v = 0;
  for (double a : x) m += a;
  m /= static_cast<double>(x.size());
  for (double a : x) v += (a - m) * (a - m);
  return {m, x.size() > 1 ? std::sqrt(v / static_cast<double>(x.size() - 1)) : 0.0};
}

}  // namespace

int main(int argc, char** argv) {
  std::string work_dir = "runs/reversegen";
  std::string model = tessera::examples::smollm2_gguf_path();
  int64_t rounds = 3;
  int64_t num_seeds = 200;         // seed questions (few-shot material, the seed baseline)
  int64_t warmup_examples = 160;   // few-shot prompts the proposer warms up on
  int64_t prompts_per_round = 16;  // few-shot prompts sampled per round
  int64_t samples_per_prompt = 8;  // questions per prompt
  int64_t heldout = 100;           // held-out questions for the target's accuracy
  int64_t final_examples = 64;     // fine-tuning questions per condition
  int64_t target_seeds = 3;
  int64_t threads = 0;
  bool no_target = false;
  // The level of the seed and held-out questions (see below).
  int64_t max_operands = 3;
  int64_t max_value = 50;
  bool no_division = false;
  CLI::App app{
      "ReverseGen, math domain: trains a proposer by DPO to write questions the target "
      "(SmolLM2-135M-Instruct) fails, reports failure rate and diversity per round, then "
      "fine-tunes the target on them and compares held-out accuracy. Resumes from --work-dir.",
      "reversegen"};
  app.option_defaults()->always_capture_default();
  app.add_option("--work-dir", work_dir, "where every stage keeps its files (resumable)");
  app.add_option("--model", model,
                 "GGUF file or Hugging Face folder: the target and the proposer's start");
  app.add_option("--rounds", rounds, "DPO rounds of the proposer")
      ->check(tessera::examples::positive());
  app.add_option("--seed-tasks", num_seeds, "seed questions")->check(tessera::examples::positive());
  app.add_option("--warmup-examples", warmup_examples,
                 "few-shot examples of the proposer's warm-up")
      ->check(tessera::examples::positive());
  app.add_option("--prompts-per-round", prompts_per_round, "few-shot prompts per round")
      ->check(tessera::examples::positive());
  app.add_option("--samples-per-prompt", samples_per_prompt, "questions sampled per prompt")
      ->check(tessera::examples::positive());
  app.add_option("--heldout", heldout, "held-out questions for the target's accuracy")
      ->check(tessera::examples::positive());
  app.add_option("--final-examples", final_examples, "fine-tuning questions per condition")
      ->check(tessera::examples::positive());
  app.add_option("--target-seeds", target_seeds, "fine-tuning seeds per condition")
      ->check(tessera::examples::positive());
  app.add_option("--threads", threads, "intra-op threads (0: all usable cores)");
  app.add_flag("--no-target", no_target, "stop after the proposer rounds");
  app.add_option("--max-operands", max_operands, "operands per seed question (2 or more)")
      ->check(CLI::Range(int64_t{2}, int64_t{6}));
  app.add_option("--max-value", max_value, "largest number in a seed question")
      ->check(CLI::Range(int64_t{2}, int64_t{999}));
  app.add_flag("--no-division", no_division, "seed questions without division or parentheses");
  if (auto code = tessera::examples::parse_command_line(app, argc, argv)) return *code;
  try {
    tessera::RuntimeOptions runtime;
    runtime.num_threads = static_cast<int>(threads);
    tessera::init_runtime(runtime);
    TESSERA_CHECK(!model.empty(), NotFound,
                  "no model: pass --model or install SmolLM2 (scripts/install-deps.sh)");

    // Seed questions: by default one or two operations on numbers up to 50
    // (SmolLM2-135M-Instruct answers about 2 % of them right, so nearly
    // every question already fails); --max-operands 2 --max-value 20
    // --no-division is an easier level. The held-out set comes from the
    // same generator with another seed, minus seeds.
    ts::ProblemGeneratorOptions level;
    level.min_operands = 2;
    level.max_operands = max_operands;
    level.max_value = max_value;
    level.division = !no_division;
    level.parentheses = !no_division;
    std::vector<std::string> seeds = ts::arithmetic_problems(num_seeds, 1, level);
    std::set<std::string> seed_set(seeds.begin(), seeds.end());
    std::vector<std::string> test;
    for (const auto& q : ts::arithmetic_problems(heldout + num_seeds, 2, level)) {
      if (!seed_set.count(q) && static_cast<int64_t>(test.size()) < heldout) test.push_back(q);
    }

    tessera::serve::EngineOptions engine;
    engine.model = model;
    engine.max_num_seqs = 16;
    engine.num_threads = static_cast<int>(threads);
    auto generator = std::shared_ptr<ts::Generator>(ts::EngineGenerator::create(engine));

    ts::ReverseGenOptions o;
    o.work_dir = work_dir;
    o.model = model;
    o.seed_tasks = seeds;
    o.warmup_examples = warmup_examples;
    o.warmup.batch = 8;
    o.warmup.epochs = 1;
    o.warmup.lr = 1e-3;
    o.prompts_per_round = prompts_per_round;
    o.samples_per_prompt = samples_per_prompt;
    o.proposer_max_tokens = 40;
    o.target_suffix = " Answer with the number only.";
    o.target_max_tokens = 40;
    o.dpo_beta = 0.1;
    o.dpo.batch = 4;
    o.dpo.epochs = 2;
    o.dpo.lr = 5e-4;
    o.generation_chunk = 16;
    o.seed = 7;
    o.progress = [](const std::string& stage, int64_t done) {
      std::printf("  [%s] %lld\n", stage.c_str(), static_cast<long long>(done));
      std::fflush(stdout);
    };
    auto labeller = std::make_shared<ts::MathLabeller>();
    ts::ReverseGen rg(o, labeller, generator);
    std::ostringstream md;

    double warmup_seconds = 0;
    rg.warm_up(&warmup_seconds);
    std::printf("warm-up: %.0f s\n", warmup_seconds);
    std::vector<ts::RoundReport> reports;
    for (int64_t r = 0; r <= rounds; ++r) {
      // Round `rounds` only samples: the final proposer's questions.
      reports.push_back(rg.run_round(r, /*train=*/r < rounds));
      const auto& x = reports.back();
      std::printf(
          "proposer %lld: failure rate %.3f (%lld/%lld valid), invalid %lld, duplicates %lld "
          "(%.3f), distinct-1/2/3 %.3f %.3f %.3f, pairs %lld\n",
          static_cast<long long>(r), x.failure_rate, static_cast<long long>(x.failures),
          static_cast<long long>(x.valid), static_cast<long long>(x.invalid),
          static_cast<long long>(x.duplicates), x.duplicate_rate, x.distinct_1, x.distinct_2,
          x.distinct_3, static_cast<long long>(x.pairs));
      std::fflush(stdout);
    }
    md << "| proposer | sampled | duplicates | invalid | valid | failures | failure rate | "
          "distinct-1 | "
          "distinct-2 | distinct-3 | pairs | DPO margin (last step) | sample s | label s | DPO s "
          "|\n"
       << "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    for (const auto& x : reports) {
      md << "| " << x.round << (x.round == 0 ? " (warm-up)" : "") << " | " << x.sampled << " | "
         << x.duplicates << " | " << x.invalid << " | " << x.valid << " | " << x.failures << " | "
         << fmt("%.3f", x.failure_rate) << " | " << fmt("%.3f", x.distinct_1) << " | "
         << fmt("%.3f", x.distinct_2) << " | " << fmt("%.3f", x.distinct_3) << " | " << x.pairs
         << " | " << (x.dpo_steps > 0 ? fmt("%.2f", x.dpo_margin) : "-") << " | "
         << fmt("%.0f", x.sample_seconds) << " | " << fmt("%.0f", x.label_seconds) << " | "
         << fmt("%.0f", x.dpo_seconds) << " |\n";
    }
    md << "\nwarm-up: " << fmt("%.0f", warmup_seconds) << " s\n";

    if (!no_target) {
      // Fine-tuning data, the same number of questions per condition:
      // ReverseGen (the final proposer's questions the target failed, then
      // others it wrote), the warm-up proposer's valid questions (in a
      // seeded random order), and seed questions; answers from the verifier.
      auto final_round = rg.labelled(rounds);
      std::vector<std::string> rg_questions, warm_questions;
      for (int pass = 0; pass < 2; ++pass) {
        for (const auto& l : final_round) {
          if (l.label.valid && l.label.failure == (pass == 0)) rg_questions.push_back(l.text);
        }
      }
      for (const auto& l : rg.labelled(0)) {
        if (l.label.valid) warm_questions.push_back(l.text);
      }
      std::shuffle(warm_questions.begin(), warm_questions.end(), std::mt19937_64(11));
      std::vector<std::string> seed_questions(seeds.begin(), seeds.end());
      std::shuffle(seed_questions.begin(), seed_questions.end(), std::mt19937_64(12));
      const int64_t n =
          std::min<int64_t>({final_examples, static_cast<int64_t>(rg_questions.size()),
                             static_cast<int64_t>(warm_questions.size()),
                             static_cast<int64_t>(seed_questions.size())});
      std::printf("fine-tuning on %lld questions per condition\n", static_cast<long long>(n));
      std::map<std::string, std::vector<std::string>> conditions = {
          {"reversegen", rg_questions}, {"warmup", warm_questions}, {"seed", seed_questions}};
      ts::LoraTrainingOptions t;
      t.batch = 8;
      t.epochs = 2;
      t.lr = 1e-3;
      auto base = rg.evaluate("base", "", test);
      std::printf("target before fine-tuning: accuracy %.3f on %lld held-out questions (%.0f s)\n",
                  base.accuracy, static_cast<long long>(base.valid), base.seconds);
      md << "\n| target fine-tuned on | accuracy (mean ± sd over " << target_seeds
         << " seeds) | per seed | fine-tuning s (mean) | evaluation s (mean) "
            "|\n|---|---|---|---|---|\n"
         << "| nothing (SmolLM2-135M-Instruct) | " << fmt("%.3f", base.accuracy) << " | - | - | "
         << fmt("%.0f", base.seconds) << " |\n";
      for (const auto& [name, questions] : conditions) {
        std::vector<ts::TargetExample> data;
        for (int64_t i = 0; i < n; ++i) {
          data.push_back({questions[i], labeller->good_response(questions[i])});
        }
        std::vector<double> acc;
        double train_s = 0, eval_s = 0;
        std::string per_seed;
        for (int64_t s = 1; s <= target_seeds; ++s) {
          const std::string run = name + "-s" + std::to_string(s);
          double seconds = 0;
          const std::string adapter =
              rg.sft_target(run, data, t, static_cast<uint64_t>(s), &seconds);
          auto e = rg.evaluate(run, adapter, test);
          acc.push_back(e.accuracy);
          train_s += seconds;
          eval_s += e.seconds;
          per_seed += (per_seed.empty() ? "" : ", ") + fmt("%.3f", e.accuracy);
          std::printf("target fine-tuned on %s (seed %lld): accuracy %.3f\n", name.c_str(),
                      static_cast<long long>(s), e.accuracy);
          std::fflush(stdout);
        }
        auto [m, sd] = mean_sd(acc);
        md << "| " << name << " (" << n << " questions) | " << fmt("%.3f", m) << " ± "
           << fmt("%.3f", sd) << " | " << per_seed << " | " << fmt("%.0f", train_s / target_seeds)
           << " | " << fmt("%.0f", eval_s / target_seeds) << " |\n";
      }
    }
    std::ofstream(work_dir + "/results.md") << md.str();
    std::printf("\n%s", md.str().c_str());
    return 0;
  } catch (const tessera::Error& e) {
    std::fprintf(stderr, "reversegen: %s\n", e.what());
    return 1;
  }
}
