// MoS vs LoRA at matched trainable-parameter budgets, the MoS ablation, and
// serving throughput of many adapters in one gathered forward. One run
// prints every table; --json writes every seed's and repetition's numbers.
//
//   lora_bench [--steps 300] [--budgets 1,2,4,8,16] [--lrs 0.003,0.01,0.03]
//              [--seeds 3] [--smollm2 PATH] [--corpus TEXT_FILE] [--serving-only]
//              [--reps 5] [--warmup 1] [--quick] [--json FILE]
//
// The task: the base is a small byte-level Llama pretrained here for a few
// hundred steps on arithmetic text, then frozen; adapters alone adapt it to
// English prose (Moby-Dick, --corpus): training windows from the first 90 %
// of the text, validation windows from the next 5 %, test windows from the
// last 5 %. Loss in nats per byte.
//
// Budgets: for each LoRA rank r in --budgets (adapters on every projection),
// MoS gets the configuration (rank, public pool fraction) whose trainable
// parameter count is the largest not above LoRA r's. Every method and budget
// is trained at every learning rate of --lrs with every seed (adapter
// initialisation and batch order); the learning rate with the lowest mean
// validation loss is chosen per method and budget, and its test losses over
// the seeds are reported (mean, standard deviation, min–max). The ablation
// removes one MoS ingredient at a time at the budget of LoRA r=8, at MoS's
// chosen learning rate there, over the same seeds.
//
// Serving: 16 sequences x 128 tokens, each with its own LoRA adapter
// (ranks 8/16/32), forward only: the base model alone, the gathered path
// (AdapterBank, one forward) and one adapter at a time; --reps timed
// repetitions after --warmup.
//
// --quick: a few steps, two budgets, one learning rate, one seed (smoke
// test). --help lists the options.
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <map>
#include <random>
#include <string>

#include "bench_report.h"
#include "command_line.h"
#include "tessera/core/error.h"
#include "tessera/core/metrics.h"
#include "tessera/core/runtime.h"
#include "tessera/lora/lora.h"
#include "tessera/nn/generate.h"
#include "tessera/nn/loader.h"
#include "tessera/nn/train.h"
#include "tessera/tasks/arithmetic.h"

namespace tl = tessera::lora;
namespace tn = tessera::nn;
using nlohmann::json;

namespace {

struct Batch {
  at::Tensor ids, labels;
};

// The fine-tuning task: English prose (Moby-Dick, bytes) for a base that
// only ever saw arithmetic. Training windows come from the first 90% of
// the text, validation windows from the next 5%, test windows from the
// last 5%.
struct Corpus {
  at::Tensor bytes;  // [n] int64
  int64_t train_end = 0, validation_end = 0;
};

Corpus load_corpus(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  TESSERA_CHECK(in.good(), NotFound, "lora_bench: cannot open the corpus '", path, "'");
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  TESSERA_CHECK(text.size() > 100000, InvalidArgument, "lora_bench: the corpus '", path, "' has ",
                text.size(), " bytes; at least 100000 expected");
  Corpus c;
  c.bytes = at::empty({static_cast<int64_t>(text.size())}, at::kLong);
  auto acc = c.bytes.accessor<int64_t, 1>();
  for (size_t i = 0; i < text.size(); ++i) acc[i] = static_cast<uint8_t>(text[i]);
  c.train_end = static_cast<int64_t>(text.size() * 0.90);
  c.validation_end = static_cast<int64_t>(text.size() * 0.95);
  return c;
}

enum class Split { kTrain, kValidation, kTest };

Batch make_batch(const Corpus& c, int64_t n, uint64_t seed, Split split) {
  const int64_t len = 64;
  at::Tensor starts;
  if (split == Split::kTrain) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
    starts = at::randint(0, c.train_end - len - 1, {n}, gen, at::kLong);
  } else {
    const int64_t begin = split == Split::kValidation ? c.train_end : c.validation_end;
    const int64_t end = split == Split::kValidation ? c.validation_end : c.bytes.size(0);
    starts = begin + at::arange(n, at::kLong) * ((end - begin - len - 1) / n);
  }
  at::Tensor idx = starts.unsqueeze(1) + at::arange(len + 1, at::kLong).unsqueeze(0);
  at::Tensor window = c.bytes.index_select(0, idx.reshape({-1})).view({n, len + 1});
  return {window.narrow(1, 0, len).contiguous(), window.narrow(1, 1, len).contiguous()};
}

tn::ModelConfig base_config() {
  tn::ModelConfig c;
  c.vocab_size = 256;
  c.hidden_size = 128;
  c.intermediate_size = 256;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 4;
  return c;
}

struct Result {
  int64_t trainable = 0;
  double validation = 0, test = 0;
};

// Fine-tunes `adapter` on the frozen model for `steps` steps at `lr` (batch
// order from `seed`), then evaluates it on 128 validation and 128 test
// windows.
Result fine_tune(const std::shared_ptr<tl::Adapter>& adapter, tn::Transformer& model, int64_t steps,
                 double lr, uint64_t seed, const Corpus& corpus) {
  model.set_adapter(adapter);
  tn::TrainerOptions o;
  o.steps = steps;
  o.lr = lr;
  o.min_lr = lr / 10;
  o.warmup = steps / 20;
  o.adamw.weight_decay = 0;
  tn::Trainer trainer(model, o, nullptr, adapter->trainable());
  for (int64_t s = 0; s < steps; ++s) {
    Batch b = make_batch(corpus, 16, seed * 100000 + 1000 + s, Split::kTrain);
    trainer.step(b.ids, b.labels);
  }
  at::NoGradGuard no_grad;
  adapter->set_training(false);
  Result r;
  Batch val = make_batch(corpus, 128, 0, Split::kValidation);
  Batch test = make_batch(corpus, 128, 0, Split::kTest);
  r.validation = model.loss(val.ids, val.labels).ce.item<double>();
  r.test = model.loss(test.ids, test.labels).ce.item<double>();
  model.set_adapter(nullptr);
  r.trainable = adapter->report().trainable;
  return r;
}

const std::vector<std::string> kTargets{"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                        "gate_proj", "up_proj", "down_proj"};

tl::MosConfig mos_config(int64_t rank, double fraction, uint64_t seed) {
  tl::MosConfig c;
  c.rank = rank;
  c.alpha = 2.0 * rank;
  c.target_modules = kTargets;
  c.shards_per_vector = 4;
  c.public_fraction = fraction;
  c.private_shards = 1;
  c.seed = seed;
  return c;
}

// The MoS configuration with the most trainable parameters not above
// `budget` (ties: the higher rank): rank from 2r to 64 by doubling, public
// pool fractions from 1/2 down to 1/128 in steps of 2^(1/8).
tl::MosConfig mos_at_budget(const tn::Transformer& model, int64_t lora_rank, int64_t budget) {
  tl::MosConfig best;
  int64_t best_count = -1;
  for (int64_t rank = 2 * lora_rank; rank <= std::max<int64_t>(64, 2 * lora_rank); rank *= 2) {
    for (int step = 8; step <= 7 * 8; ++step) {
      const double fraction = std::pow(2.0, -step / 8.0);
      const tl::MosConfig c = mos_config(rank, fraction, 0);
      const int64_t n = tl::make_mos(model, c)->report().trainable;
      if (n <= budget && n >= best_count) {
        best = c;
        best_count = n;
      }
    }
  }
  TESSERA_CHECK(best_count > 0, InvalidArgument,
                "lora_bench: no MoS configuration fits the budget of LoRA r=", lora_rank, " (",
                budget, " trainable parameters)");
  return best;
}

double mean_of(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  return v.empty() ? 0 : s / v.size();
}

double std_of(const std::vector<double>& v) {
  if (v.size() < 2) return 0;
  const double m = mean_of(v);
  double s = 0;
  for (double x : v) s += (x - m) * (x - m);
  return std::sqrt(s / (v.size() - 1));
}

std::string lr_text(double lr) {
  char b[32];
  std::snprintf(b, sizeof(b), "%g", lr);
  return b;
}

}  // namespace

int main(int argc, char** argv) {
  int64_t steps = 300;
  std::vector<int64_t> budgets = {1, 2, 4, 8, 16};
  std::vector<double> lrs = {3e-3, 1e-2, 3e-2};
  int64_t seeds = 3;
  std::string smollm2;
  std::string corpus_path =
      std::string(TESSERA_SOURCE_DIR) + "/../shared/testdata/text/moby-dick.txt";
  bool serving_only = false;
  tessera::bench::RepeatOptions rep;
  CLI::App app{
      "MoS vs LoRA at matched trainable-parameter budgets (learning-rate sweep, several seeds), "
      "the MoS ablation, and serving throughput of many adapters in one gathered forward.",
      "lora_bench"};
  app.option_defaults()->always_capture_default();
  auto* steps_opt = app.add_option("--steps", steps, "adapter fine-tuning steps per run");
  app.add_option("--budgets", budgets, "LoRA ranks whose trainable counts are the budgets")
      ->delimiter(',')
      ->check(tessera::examples::positive());
  app.add_option("--lrs", lrs, "learning rates swept per method and budget")
      ->delimiter(',')
      ->check(tessera::examples::positive());
  app.add_option("--seeds", seeds, "seeds per method, budget and learning rate")
      ->check(tessera::examples::positive());
  app.add_option("--smollm2", smollm2,
                 "SmolLM2-135M-Instruct GGUF file: also compare LoRA and MoS on it, one seed "
                 "(default: skipped)");
  app.add_option("--corpus", corpus_path, "the English text adapters are tuned and evaluated on");
  app.add_flag("--serving-only", serving_only, "skip the quality tables (as --steps 0)");
  tessera::bench::add_repeat_options(app, rep);
  app.get_option("--reps")->description("timed repetitions of each serving path");
  if (auto code = tessera::examples::parse_command_line(app, argc, argv)) return *code;
  int64_t pretrain_steps = 300;
  if (rep.quick) {
    if (steps_opt->count() == 0) steps = 3;
    budgets = {1, 2};
    lrs = {1e-2};
    seeds = 1;
    pretrain_steps = 5;
  }
  if (serving_only) steps = 0;
  Corpus corpus = steps > 0 ? load_corpus(corpus_path) : Corpus{};
  auto info = tessera::init_runtime();
  tessera::bench::Report report("lora", argc, argv, rep.quick);
  std::printf("# LoRA / MoS benchmark: %s\n\n", info.summary().c_str());
  tn::Transformer model(base_config());
  model.init_random(0);
  double base_loss = 0;
  if (steps > 0) {
    // Pretrain the base on arithmetic text (bytes), then freeze it.
    std::string text;
    for (const auto& e : tessera::tasks::arithmetic_examples(20000, 5))
      text += e.prompt + e.answer + "\n";
    at::Tensor all = at::empty({static_cast<int64_t>(text.size())}, at::kLong);
    for (size_t i = 0; i < text.size(); ++i) all[i] = static_cast<uint8_t>(text[i]);
    tn::TrainerOptions o;
    o.steps = pretrain_steps;
    o.lr = 3e-3;
    o.warmup = std::min<int64_t>(20, pretrain_steps / 2);
    tn::Trainer trainer(model, o);
    tessera::Stopwatch w;
    auto gen = at::make_generator<at::CPUGeneratorImpl>(11);
    for (int64_t s = 0; s < o.steps; ++s) {
      at::Tensor starts = at::randint(0, all.size(0) - 65, {16}, gen, at::kLong);
      at::Tensor idx = starts.unsqueeze(1) + at::arange(65, at::kLong).unsqueeze(0);
      at::Tensor window = all.index_select(0, idx.reshape({-1})).view({16, 65});
      base_loss = trainer.step(window.narrow(1, 0, 64), window.narrow(1, 1, 64)).loss;
    }
    std::printf("base: %s, pretrained %lld steps on arithmetic text to loss %.3f in %.0f s\n\n",
                model.config().summary().c_str(), static_cast<long long>(o.steps), base_loss,
                w.seconds());
  }
  model.set_requires_grad(false);
  json budget_info = json::array();
  json ablation_info = json::object();
  if (steps > 0) {
    std::printf(
        "## MoS vs LoRA at matched budgets (%lld steps, batch 16 x 64 bytes, %lld seeds; test loss "
        "at the learning rate with the best mean validation loss)\n\n",
        static_cast<long long>(steps), static_cast<long long>(seeds));
    std::printf(
        "| budget | method | trainable | best lr | test loss mean | std | min–max |\n"
        "|---|---|---:|---:|---:|---:|---|\n");
    // (method, budget) -> lr -> per-seed results.
    std::map<std::pair<std::string, int64_t>, std::map<double, std::vector<Result>>> runs;
    std::map<int64_t, tl::MosConfig> mos_configs;
    std::map<int64_t, double> mos_best_lr;
    for (int64_t r : budgets) {
      const int64_t lora_count =
          tl::make_lora(model, {r, 2.0 * r, 0.0, false, kTargets}, 0)->report().trainable;
      const tl::MosConfig mc = mos_at_budget(model, r, lora_count);
      mos_configs[r] = mc;
      json b = {{"lora_rank", r},
                {"lora_trainable", lora_count},
                {"mos_rank", mc.rank},
                {"mos_public_fraction", mc.public_fraction}};
      for (const std::string method : {"lora", "mos"}) {
        double best_lr = 0, best_val = 1e30;
        int64_t trainable = 0;
        for (double lr : lrs) {
          std::vector<double> val, test;
          for (int64_t seed = 1; seed <= seeds; ++seed) {
            auto adapter = method == "lora"
                               ? tl::make_lora(model, {r, 2.0 * r, 0.0, false, kTargets}, seed)
                               : tl::make_mos(model, [&] {
                                   tl::MosConfig c = mc;
                                   c.seed = seed;
                                   return c;
                                 }());
            const Result res = fine_tune(adapter, model, steps, lr, seed, corpus);
            runs[{method, r}][lr].push_back(res);
            val.push_back(res.validation);
            test.push_back(res.test);
            trainable = res.trainable;
          }
          const std::string id = method + ".b" + std::to_string(r) + ".lr" + lr_text(lr);
          const json labels = {
              {"method", method}, {"budget_rank", r}, {"lr", lr}, {"trainable", trainable}};
          report.add_series(id + ".validation", "nats/byte", val, labels);
          report.add_series(id + ".test", "nats/byte", test, labels);
          if (mean_of(val) < best_val) {
            best_val = mean_of(val);
            best_lr = lr;
          }
        }
        std::vector<double> test;
        for (const Result& res : runs[{method, r}][best_lr]) test.push_back(res.test);
        b[method + "_trainable_actual"] = trainable;
        b[method + "_best_lr"] = best_lr;
        if (method == "mos") mos_best_lr[r] = best_lr;
        std::printf("| LoRA r=%lld (%lld) | %s | %lld | %g | %.4f | %.4f | %.4f–%.4f |\n",
                    static_cast<long long>(r), static_cast<long long>(lora_count),
                    method == "lora" ? "LoRA"
                                     : ("MoS r=" + std::to_string(mc.rank) + ", pool " +
                                        lr_text(mc.public_fraction))
                                           .c_str(),
                    static_cast<long long>(trainable), best_lr, mean_of(test), std_of(test),
                    tessera::bench::min_of(test), tessera::bench::max_of(test));
        std::fflush(stdout);
      }
      budget_info.push_back(b);
    }

    // Ablation at the budget of LoRA r=8 (or the largest budget below it).
    int64_t ab = budgets.front();
    for (int64_t r : budgets)
      if (r <= 8) ab = std::max(ab, r);
    const tl::MosConfig base_mc = mos_configs[ab];
    const double ab_lr = mos_best_lr[ab];
    std::printf(
        "\n## MoS ablation (budget of LoRA r=%lld: MoS r=%lld, pool %s; lr %g; %lld seeds)\n\n",
        static_cast<long long>(ab), static_cast<long long>(base_mc.rank),
        lr_text(base_mc.public_fraction).c_str(), ab_lr, static_cast<long long>(seeds));
    std::printf(
        "| variant | trainable | test loss mean | std | min–max |\n|---|---:|---:|---:|---|\n");
    struct Variant {
      const char* key;
      const char* name;
      void (*tweak)(tl::MosConfig&);
    };
    for (const Variant& v :
         std::vector<Variant>{{"all", "all ingredients", [](tl::MosConfig&) {}},
                              {"no_pair_dissociation", "no pair dissociation",
                               [](tl::MosConfig& c) { c.pair_dissociation = false; }},
                              {"no_vector_sharding", "no vector sharding",
                               [](tl::MosConfig& c) { c.vector_sharding = false; }},
                              {"no_subset_selection", "no subset selection",
                               [](tl::MosConfig& c) { c.subset_selection = false; }},
                              {"no_privatization", "no privatization",
                               [](tl::MosConfig& c) { c.privatization = false; }}}) {
      std::vector<double> test;
      int64_t trainable = 0;
      for (int64_t seed = 1; seed <= seeds; ++seed) {
        tl::MosConfig c = base_mc;
        c.seed = seed;
        v.tweak(c);
        const Result res = fine_tune(tl::make_mos(model, c), model, steps, ab_lr, seed, corpus);
        test.push_back(res.test);
        trainable = res.trainable;
      }
      report.add_series(std::string("ablation.") + v.key + ".test", "nats/byte", test,
                        {{"variant", v.name}, {"trainable", trainable}, {"lr", ab_lr}});
      std::printf("| %s | %lld | %.4f | %.4f | %.4f–%.4f |\n", v.name,
                  static_cast<long long>(trainable), mean_of(test), std_of(test),
                  tessera::bench::min_of(test), tessera::bench::max_of(test));
      std::fflush(stdout);
    }
    ablation_info = {{"budget_rank", ab},
                     {"mos_rank", base_mc.rank},
                     {"mos_public_fraction", base_mc.public_fraction},
                     {"lr", ab_lr}};
  }

  if (!smollm2.empty()) {
    // Confirmation on a real model: SmolLM2-135M-Instruct, LoRA r=16 vs MoS
    // with 1/8 of its trainable parameters, on arithmetic (answers only).
    auto loaded = tn::load_gguf_model(smollm2);
    tn::Transformer& smol = *loaded.model;
    smol.set_requires_grad(false);
    const auto& tok = loaded.tokenizer;
    const int64_t pad = *tok.eos_id();
    auto batch_of = [&](const std::vector<tessera::tasks::ArithmeticExample>& ex) {
      std::vector<std::vector<int32_t>> seqs;
      std::vector<size_t> prompt_len;
      size_t longest = 0;
      for (const auto& e : ex) {
        auto p = tok.encode(e.prompt);
        auto full = tok.encode(e.prompt + e.answer + "\n");
        prompt_len.push_back(p.size());
        longest = std::max(longest, full.size());
        seqs.push_back(full);
      }
      const int64_t n = static_cast<int64_t>(ex.size()), len = static_cast<int64_t>(longest) - 1;
      at::Tensor ids = at::full({n, len}, pad, at::kLong),
                 labels = at::full({n, len}, -100, at::kLong);
      for (int64_t i = 0; i < n; ++i) {
        const auto& s = seqs[i];
        for (size_t j = 0; j + 1 < s.size(); ++j) ids[i][static_cast<int64_t>(j)] = s[j];
        for (size_t j = prompt_len[i] - 1; j + 1 < s.size(); ++j)
          labels[i][static_cast<int64_t>(j)] = s[j + 1];
      }
      return Batch{ids, labels};
    };
    const auto train = tessera::tasks::arithmetic_examples(8 * 40, 11),
               held_out = tessera::tasks::arithmetic_examples(64, 12);
    const std::vector<std::string> all{"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                       "gate_proj", "up_proj", "down_proj"};
    auto run = [&](const char* key, const char* name, const std::shared_ptr<tl::Adapter>& adapter) {
      smol.set_adapter(adapter);
      tn::TrainerOptions o;
      o.steps = 40;
      o.lr = 2e-3;
      o.min_lr = 2e-4;
      o.warmup = 4;
      o.adamw.weight_decay = 0;
      tn::Trainer trainer(smol, o, nullptr, adapter->trainable());
      at::NoGradGuard outer;  // eval below; training enables grad itself
      double before =
          smol.loss(batch_of(held_out).ids, batch_of(held_out).labels).ce.item<double>();
      tessera::Stopwatch w;
      {
        at::AutoGradMode enable(true);
        for (int64_t s = 0; s < o.steps; ++s) {
          std::vector<tessera::tasks::ArithmeticExample> ex(train.begin() + s * 8,
                                                            train.begin() + (s + 1) * 8);
          Batch b = batch_of(ex);
          trainer.step(b.ids, b.labels);
        }
      }
      adapter->set_training(false);
      Batch eval = batch_of(held_out);
      double after = smol.loss(eval.ids, eval.labels).ce.item<double>();
      smol.set_adapter(nullptr);
      const double seconds = w.seconds();
      std::printf("| %s | %lld | %.4f | %.4f | %.0f |\n", name,
                  static_cast<long long>(adapter->report().trainable), before, after, seconds);
      report.facts()[std::string("smollm2.") + key] = {{"name", name},
                                                       {"trainable", adapter->report().trainable},
                                                       {"loss_before", before},
                                                       {"loss_after", after},
                                                       {"seconds", seconds},
                                                       {"steps", o.steps},
                                                       {"seed", 1}};
      std::fflush(stdout);
    };
    std::printf(
        "\n## SmolLM2-135M-Instruct on arithmetic (40 steps x 8 questions; held-out loss on 64 "
        "answers)\n\n");
    std::printf(
        "| adapter | trainable | loss before | loss after | seconds |\n|---|---|---|---|---|\n");
    run("lora", "LoRA r=16", tl::make_lora(smol, {16, 32, 0.0, false, all}, 1));
    tl::MosConfig m;
    m.rank = 16;
    m.alpha = 32;
    m.target_modules = all;
    m.shards_per_vector = 3;  // shard 192: divides 576, 192 (kv) and 1536
    m.public_fraction = 0.125;
    m.private_shards = 1;
    m.seed = 1;
    run("mos", "MoS r=16, pool 1/8", tl::make_mos(smol, m));
  }

  // Serving: 16 sequences, 16 different adapters.
  {
    at::NoGradGuard no_grad;
    // A 4-layer hidden-512 model (--quick: 2 layers, hidden 128, 32 tokens).
    tn::ModelConfig c = base_config();
    c.hidden_size = rep.quick ? 128 : 512;
    c.intermediate_size = rep.quick ? 256 : 1536;
    c.num_hidden_layers = rep.quick ? 2 : 4;
    c.num_attention_heads = 8;
    c.num_key_value_heads = 8;
    tn::Transformer big(c);
    big.init_random(1);
    auto bank = std::make_shared<tl::AdapterBank>();
    std::vector<std::shared_ptr<tl::Adapter>> adapters;
    for (int k = 0; k < 16; ++k) {
      adapters.push_back(tl::make_lora(
          big,
          {8 << (k % 3), 16, 0.0, false, {"q_proj", "v_proj", "o_proj", "up_proj", "down_proj"}},
          k));
      bank->add(adapters.back());
    }
    const int64_t seq = rep.quick ? 32 : 128;
    at::Tensor ids = at::randint(0, 256, {16, seq}, at::kLong);
    auto timed = [&](auto&& fn) {
      for (int i = 0; i < rep.warmup; ++i) fn();
      std::vector<double> t;
      for (int i = 0; i < rep.reps; ++i) {
        tessera::Stopwatch w;
        fn();
        t.push_back(w.seconds());
      }
      return t;
    };
    const std::vector<double> base = timed([&] { big.forward(ids); });
    big.set_adapter(bank);
    tn::ForwardOptions opts;
    opts.sequence_adapters = at::arange(16, at::kLong);
    const std::vector<double> gathered = timed([&] { big.forward(ids, opts); });
    const std::vector<double> looped = timed([&] {
      for (int k = 0; k < 16; ++k) {
        big.set_adapter(adapters[k]);
        big.forward(ids.narrow(0, k, 1));
      }
    });
    big.set_adapter(nullptr);
    report.add_series("serving.base", "s", base, {{"path", "base model, no adapter"}});
    report.add_series("serving.gathered", "s", gathered,
                      {{"path", "gathered (AdapterBank, one forward)"}});
    report.add_series("serving.looped", "s", looped,
                      {{"path", "one adapter at a time (16 forwards)"}});
    const double tokens = 16.0 * seq;
    const double b = tessera::bench::median(base), g = tessera::bench::median(gathered),
                 l = tessera::bench::median(looped);
    std::printf(
        "\n## Serving 16 sequences x %lld tokens with 16 different adapters (ranks 8/16/32), "
        "forward, median of %d\n\n",
        static_cast<long long>(seq), rep.reps);
    std::printf("| path | ms | tokens/s | time / base |\n|---|---|---|---|\n");
    std::printf("| base model (no adapter) | %.1f | %.0f | 1.00 |\n", b * 1e3, tokens / b);
    std::printf("| gathered (AdapterBank, one forward) | %.1f | %.0f | %.2f |\n", g * 1e3,
                tokens / g, g / b);
    std::printf("| one adapter at a time (16 forwards) | %.1f | %.0f | %.2f |\n", l * 1e3,
                tokens / l, l / b);
  }
  report.config() = {{"steps", steps},
                     {"budgets", budgets},
                     {"lrs", lrs},
                     {"seeds", seeds},
                     {"pretrain_steps", pretrain_steps},
                     {"base_loss", base_loss},
                     {"base", model.config().summary()},
                     {"targets", kTargets},
                     {"batch", "16 x 64 bytes"},
                     {"eval_windows", 128},
                     {"budget_configs", budget_info},
                     {"ablation", ablation_info},
                     {"serving",
                      {{"sequences", 16},
                       {"tokens_per_sequence", rep.quick ? 32 : 128},
                       {"hidden", rep.quick ? 128 : 512},
                       {"layers", rep.quick ? 2 : 4},
                       {"adapters", 16},
                       {"reps", rep.reps},
                       {"warmup", rep.warmup}}},
                     {"threads", info.num_threads}};
  report.write(rep.json);
  return 0;
}
