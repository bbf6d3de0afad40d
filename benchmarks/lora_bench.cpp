// MoS vs LoRA: quality per trainable parameter on a synthetic fine-tuning
// task, the MoS ablation, and serving throughput of many adapters in one
// gathered forward. One run prints every table.
//
//   lora_bench [--steps N] [--smollm2 PATH] [--corpus TEXT_FILE] [--serving-only]
//
// Defaults: --steps 300 (adapter fine-tuning steps), no SmolLM2 rows,
// --corpus ../shared/testdata/text/moby-dick.txt; --serving-only skips the
// quality tables (steps 0). --help lists the options.
//
// The task: the base is a small byte-level Llama pretrained here for a few
// hundred steps on arithmetic text, then frozen; adapters alone adapt it to
// English prose (Moby-Dick, --corpus). Eval loss (nats per byte) on
// held-out text.
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <cstdio>
#include <fstream>
#include <iterator>
#include <algorithm>
#include <random>
#include <string>

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

namespace {

struct Batch {
  at::Tensor ids, labels;
};

// The fine-tuning task: English prose (Moby-Dick, bytes) for a base that
// only ever saw arithmetic. Training windows come from the first 95% of
// the text, evaluation windows from the last 5%.
struct Corpus {
  at::Tensor bytes;  // [n] int64
  int64_t split = 0;
};

Corpus load_corpus(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  TESSERA_CHECK(in.good(), NotFound, "lora_bench: cannot open the corpus '", path, "'");
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  Corpus c;
  c.bytes = at::empty({static_cast<int64_t>(text.size())}, at::kLong);
  auto acc = c.bytes.accessor<int64_t, 1>();
  for (size_t i = 0; i < text.size(); ++i) acc[i] = static_cast<uint8_t>(text[i]);
  c.split = static_cast<int64_t>(text.size() * 0.95);
  return c;
}

Batch make_batch(const Corpus& c, int64_t n, uint64_t seed, bool eval) {
  const int64_t len = 64;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  at::Tensor starts = eval ? c.split + at::arange(n, at::kLong) * ((c.bytes.size(0) - c.split - len - 1) / n)
                           : at::randint(0, c.split - len - 1, {n}, gen, at::kLong);
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
  int64_t trainable;
  double eval_loss;
};

Result fine_tune(const std::shared_ptr<tl::Adapter>& adapter, tn::Transformer& model, int64_t steps,
                 const Corpus& corpus) {
  model.set_adapter(adapter);
  tn::TrainerOptions o;
  o.steps = steps;
  o.lr = 1e-2;
  o.min_lr = 1e-3;
  o.warmup = steps / 20;
  o.adamw.weight_decay = 0;
  tn::Trainer trainer(model, o, nullptr, adapter->trainable());
  for (int64_t s = 0; s < steps; ++s) {
    Batch b = make_batch(corpus, 16, 1000 + s, false);
    trainer.step(b.ids, b.labels);
  }
  at::NoGradGuard no_grad;
  adapter->set_training(false);
  Batch eval = make_batch(corpus, 128, 7, true);
  double loss = model.loss(eval.ids, eval.labels).ce.item<double>();
  model.set_adapter(nullptr);
  return {adapter->report().trainable, loss};
}

const std::vector<std::string> kTargets{"q_proj", "k_proj", "v_proj", "o_proj",
                                        "gate_proj", "up_proj", "down_proj"};

}  // namespace

int main(int argc, char** argv) {
  int64_t steps = 300;
  std::string smollm2;
  std::string corpus_path = "../shared/testdata/text/moby-dick.txt";
  bool serving_only = false;
  CLI::App app{
      "MoS vs LoRA: quality per trainable parameter, the MoS ablation, and serving "
      "throughput of many adapters in one gathered forward.",
      "lora_bench"};
  app.option_defaults()->always_capture_default();
  app.add_option("--steps", steps, "adapter fine-tuning steps per quality row");
  app.add_option(
      "--smollm2", smollm2,
      "SmolLM2-135M-Instruct GGUF file: also compare LoRA and MoS on it (default: skipped)");
  app.add_option("--corpus", corpus_path, "the English text adapters are tuned and evaluated on");
  app.add_flag("--serving-only", serving_only, "skip the quality tables (as --steps 0)");
  if (auto code = tessera::examples::parse_command_line(app, argc, argv)) return *code;
  if (serving_only) steps = 0;
  Corpus corpus = steps > 0 ? load_corpus(corpus_path) : Corpus{};
  auto info = tessera::init_runtime();
  std::printf("# LoRA / MoS benchmark: %s\n\n", info.summary().c_str());
  tn::Transformer model(base_config());
  model.init_random(0);
  if (steps > 0) {
    // Pretrain the base on arithmetic text (bytes), then freeze it.
    std::string text;
    for (const auto& e : tessera::tasks::arithmetic_examples(20000, 5)) text += e.prompt + e.answer + "\n";
    at::Tensor all = at::empty({static_cast<int64_t>(text.size())}, at::kLong);
    for (size_t i = 0; i < text.size(); ++i) all[i] = static_cast<uint8_t>(text[i]);
    tn::TrainerOptions o;
    o.steps = 300;
    o.lr = 3e-3;
    o.warmup = 20;
    tn::Trainer trainer(model, o);
    tessera::Stopwatch w;
    double loss = 0;
    for (int64_t s = 0; s < o.steps; ++s) {
      at::Tensor starts = at::randint(0, all.size(0) - 65, {16}, at::kLong);
      at::Tensor idx = starts.unsqueeze(1) + at::arange(65, at::kLong).unsqueeze(0);
      at::Tensor window = all.index_select(0, idx.reshape({-1})).view({16, 65});
      loss = trainer.step(window.narrow(1, 0, 64), window.narrow(1, 1, 64)).loss;
    }
    std::printf("base: %s, pretrained %lld steps on arithmetic text to loss %.3f in %.0f s\n\n",
                model.config().summary().c_str(), static_cast<long long>(o.steps), loss, w.seconds());
  }
  model.set_requires_grad(false);
  if (steps > 0) {
  std::printf("## Quality per parameter: fine-tune on Moby-Dick (%lld steps, batch 16 x 64 bytes; eval loss on 128 held-out windows)\n\n",
              static_cast<long long>(steps));
  std::printf("| adapter | trainable | eval loss |\n|---|---|---|\n");
  double lora64 = 0;
  int64_t lora64_params = 0;
  for (int64_t r : {2, 4, 8, 16, 32, 64}) {
    auto res = fine_tune(tl::make_lora(model, {r, 2.0 * r, 0.0, false, kTargets}, r), model, steps, corpus);
    if (r == 64) {
      lora64 = res.eval_loss;
      lora64_params = res.trainable;
    }
    std::printf("| LoRA r=%lld | %lld | %.4f |\n", static_cast<long long>(r),
                static_cast<long long>(res.trainable), res.eval_loss);
    std::fflush(stdout);
  }
  auto mos = [&](int64_t rank, double fraction, auto&& tweak) {
    tl::MosConfig c;
    c.rank = rank;
    c.alpha = 2.0 * rank;
    c.target_modules = kTargets;
    c.shards_per_vector = 4;
    c.public_fraction = fraction;
    c.private_shards = 1;
    tweak(c);
    return fine_tune(tl::make_mos(model, c), model, steps, corpus);
  };
  for (auto [rank, fraction] : std::vector<std::pair<int64_t, double>>{{64, 1.0 / 16}, {64, 1.0 / 8}, {32, 1.0 / 4}}) {
    auto res = mos(rank, fraction, [](tl::MosConfig&) {});
    std::printf("| MoS r=%lld, pool %.3g of LoRA r=%lld | %lld (%.1f%% of LoRA r=64) | %.4f |\n",
                static_cast<long long>(rank), fraction, static_cast<long long>(rank),
                static_cast<long long>(res.trainable), 100.0 * res.trainable / lora64_params, res.eval_loss);
    std::fflush(stdout);
  }
  std::printf("\nLoRA r=64 eval loss: %.4f\n\n## MoS ablation (r=64, pool 1/8)\n\n", lora64);
  std::printf("| variant | trainable | eval loss |\n|---|---|---|\n");
  struct Variant {
    const char* name;
    void (*tweak)(tl::MosConfig&);
  };
  for (const Variant& v : std::vector<Variant>{
           {"all ingredients", [](tl::MosConfig&) {}},
           {"no pair dissociation", [](tl::MosConfig& c) { c.pair_dissociation = false; }},
           {"no vector sharding", [](tl::MosConfig& c) { c.vector_sharding = false; }},
           {"no subset selection", [](tl::MosConfig& c) { c.subset_selection = false; }},
           {"no privatization", [](tl::MosConfig& c) { c.privatization = false; }}}) {
    auto res = mos(64, 1.0 / 8, v.tweak);
    std::printf("| %s | %lld | %.4f |\n", v.name, static_cast<long long>(res.trainable), res.eval_loss);
    std::fflush(stdout);
  }

  }  // steps > 0

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
      at::Tensor ids = at::full({n, len}, pad, at::kLong), labels = at::full({n, len}, -100, at::kLong);
      for (int64_t i = 0; i < n; ++i) {
        const auto& s = seqs[i];
        for (size_t j = 0; j + 1 < s.size(); ++j) ids[i][static_cast<int64_t>(j)] = s[j];
        for (size_t j = prompt_len[i] - 1; j + 1 < s.size(); ++j) labels[i][static_cast<int64_t>(j)] = s[j + 1];
      }
      return Batch{ids, labels};
    };
    const auto train = tessera::tasks::arithmetic_examples(8 * 40, 11), held_out = tessera::tasks::arithmetic_examples(64, 12);
    const std::vector<std::string> all{"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
    auto run = [&](const char* name, const std::shared_ptr<tl::Adapter>& adapter) {
      smol.set_adapter(adapter);
      tn::TrainerOptions o;
      o.steps = 40;
      o.lr = 2e-3;
      o.min_lr = 2e-4;
      o.warmup = 4;
      o.adamw.weight_decay = 0;
      tn::Trainer trainer(smol, o, nullptr, adapter->trainable());
      at::NoGradGuard outer;  // eval below; training enables grad itself
      double before = smol.loss(batch_of(held_out).ids, batch_of(held_out).labels).ce.item<double>();
      tessera::Stopwatch w;
      {
        at::AutoGradMode enable(true);
        for (int64_t s = 0; s < o.steps; ++s) {
          std::vector<tessera::tasks::ArithmeticExample> ex(train.begin() + s * 8, train.begin() + (s + 1) * 8);
          Batch b = batch_of(ex);
          trainer.step(b.ids, b.labels);
        }
      }
      adapter->set_training(false);
      Batch eval = batch_of(held_out);
      double after = smol.loss(eval.ids, eval.labels).ce.item<double>();
      smol.set_adapter(nullptr);
      std::printf("| %s | %lld | %.4f | %.4f | %.0f |\n", name,
                  static_cast<long long>(adapter->report().trainable), before, after, w.seconds());
      std::fflush(stdout);
    };
    std::printf("\n## SmolLM2-135M-Instruct on arithmetic (40 steps x 8 questions; held-out loss on 64 answers)\n\n");
    std::printf("| adapter | trainable | loss before | loss after | seconds |\n|---|---|---|---|---|\n");
    run("LoRA r=16", tl::make_lora(smol, {16, 32, 0.0, false, all}, 1));
    tl::MosConfig m;
    m.rank = 16;
    m.alpha = 32;
    m.target_modules = all;
    m.shards_per_vector = 3;  // shard 192: divides 576, 192 (kv) and 1536
    m.public_fraction = 0.125;
    m.private_shards = 1;
    run("MoS r=16, pool 1/8", tl::make_mos(smol, m));
  }

  // Serving: 16 sequences, 16 different adapters.
  {
    at::NoGradGuard no_grad;
    tn::ModelConfig c = base_config();
    c.hidden_size = 512;
    c.intermediate_size = 1536;
    c.num_hidden_layers = 4;
    c.num_attention_heads = 8;
    c.num_key_value_heads = 8;
    tn::Transformer big(c);
    big.init_random(1);
    auto bank = std::make_shared<tl::AdapterBank>();
    std::vector<std::shared_ptr<tl::Adapter>> adapters;
    for (int k = 0; k < 16; ++k) {
      adapters.push_back(tl::make_lora(big, {8 << (k % 3), 16, 0.0, false, {"q_proj", "v_proj", "o_proj", "up_proj", "down_proj"}}, k));
      bank->add(adapters.back());
    }
    at::Tensor ids = at::randint(0, 256, {16, 128}, at::kLong);
    auto timed = [&](auto&& fn) {
      fn();
      tessera::Stopwatch w;
      for (int i = 0; i < 3; ++i) fn();
      return w.seconds() / 3;
    };
    double base = timed([&] { big.forward(ids); });
    big.set_adapter(bank);
    tn::ForwardOptions opts;
    opts.sequence_adapters = at::arange(16, at::kLong);
    double gathered = timed([&] { big.forward(ids, opts); });
    double looped = timed([&] {
      for (int k = 0; k < 16; ++k) {
        big.set_adapter(adapters[k]);
        big.forward(ids.narrow(0, k, 1));
      }
    });
    big.set_adapter(nullptr);
    const double tokens = 16.0 * 128;
    std::printf("\n## Serving 16 sequences x 128 tokens with 16 different adapters (ranks 8/16/32), forward\n\n");
    std::printf("| path | ms | tokens/s | time / base |\n|---|---|---|---|\n");
    std::printf("| merged base model (no adapter) | %.1f | %.0f | 1.00 |\n", base * 1e3, tokens / base);
    std::printf("| gathered (AdapterBank, one forward) | %.1f | %.0f | %.2f |\n", gathered * 1e3, tokens / gathered, gathered / base);
    std::printf("| one adapter at a time (16 forwards) | %.1f | %.0f | %.2f |\n", looped * 1e3, tokens / looped, looped / base);
  }
  return 0;
}
