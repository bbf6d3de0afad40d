// LoRA vs Mixture-of-Shards, in full: every LoRA rank from 2 to 64, MoS at
// several parameter budgets, and the MoS ablation (each ingredient off),
// fine-tuning a frozen model on multiplication questions it never saw.
//
//   mos_vs_lora [MODEL_DIR] [STEPS]
//
// MODEL_DIR defaults to the quickstart's pretrained model
// (/tmp/tessera-quickstart/pretrained; run build/release/bin/quickstart
// first); STEPS (fine-tuning steps per adapter) to 150; --help prints both.
// Prints one table: trainable parameters and held-out loss.
#include <ATen/ATen.h>

#include <cstdio>
#include <random>
#include <string>

#include "command_line.h"
#include "progress.h"
#include "tessera/core/error.h"
#include "tessera/core/runtime.h"
#include "tessera/lora/lora.h"
#include "tessera/nn/loader.h"
#include "tessera/nn/train.h"
#include "tessera/tokenizer/tokenizer.h"

namespace tl = tessera::lora;
namespace tn = tessera::nn;

// "Q: 7*8=? A: 56\n" as bytes; labels on the answer only.
std::pair<at::Tensor, at::Tensor> questions(uint64_t seed, int64_t count) {
  auto tokenizer = tn::Tokenizer::bytes();
  std::mt19937_64 rng(seed);
  at::Tensor ids = at::zeros({count, 24}, at::kLong),
             labels = at::full({count, 24}, -100, at::kLong);
  for (int64_t i = 0; i < count; ++i) {
    int a = static_cast<int>(rng() % 10), b = static_cast<int>(rng() % 10);
    std::string q = "Q: " + std::to_string(a) + "*" + std::to_string(b) + "=? A: ";
    auto t = tokenizer.encode(q + std::to_string(a * b) + "\n");
    for (size_t j = 0; j < t.size(); ++j) ids[i][static_cast<int64_t>(j)] = t[j];
    for (size_t j = q.size() - 1; j + 1 < t.size(); ++j)
      labels[i][static_cast<int64_t>(j)] = t[j + 1];
  }
  return {ids, labels};
}

int main(int argc, char** argv) {
  std::string dir = "/tmp/tessera-quickstart/pretrained";
  int64_t steps = 150;
  CLI::App app{
      "LoRA vs Mixture-of-Shards: fine-tunes adapters of every LoRA rank and several MoS "
      "budgets (and the MoS ablation) on a frozen model, prints trainable parameters "
      "and held-out loss.",
      "mos_vs_lora"};
  app.option_defaults()->always_capture_default();
  app.add_option("MODEL_DIR", dir,
                 "the frozen base, a Hugging Face folder (the quickstart writes this one)");
  app.add_option("STEPS", steps, "fine-tuning steps per adapter")
      ->check(tessera::examples::positive());
  if (auto code = tessera::examples::parse_command_line(app, argc, argv)) return *code;
  try {
    tessera::init_runtime();
    tn::Transformer model = tn::load_hf_model(dir);
    std::printf("base: %s (frozen)\n\n| adapter | trainable | held-out loss |\n|---|---|---|\n",
                model.config().summary().c_str());
    const std::vector<std::string> targets{"q_proj", "k_proj", "v_proj",    "o_proj",  "w1",
                                           "w2",     "w3",     "gate_proj", "up_proj", "down_proj"};
    auto held_out = questions(/*seed=*/999, 256);
    // Fine-tunes one adapter and prints its row.
    auto run = [&](const std::string& name, const std::shared_ptr<tl::Adapter>& adapter) {
      model.set_adapter(adapter);
      tn::TrainerOptions opts;
      opts.steps = steps;
      opts.lr = 1e-2;
      opts.min_lr = 1e-3;
      opts.warmup = steps / 20;
      opts.adamw.weight_decay = 0;
      tn::Trainer trainer(model, opts, nullptr, adapter->trainable());
      tessera::examples::Progress progress(name, steps);
      for (int64_t s = 0; s < steps; ++s) {
        auto [ids, labels] = questions(static_cast<uint64_t>(s), 32);
        progress.step(trainer.step(ids, labels).loss);
      }
      adapter->set_training(false);
      double loss = model.loss(held_out.first, held_out.second).ce.item<double>();
      model.set_adapter(nullptr);
      std::printf("| %s | %lld | %.4f |\n", name.c_str(),
                  static_cast<long long>(adapter->report().trainable), loss);
      std::fflush(stdout);
    };
    for (int64_t r : {2, 4, 8, 16, 32, 64}) {
      run("LoRA r=" + std::to_string(r),
          tl::make_lora(model, {r, 2.0 * r, 0.0, false, targets}, r));
    }
    auto mos = [&](double fraction) {
      tl::MosConfig c;
      c.rank = 64;
      c.alpha = 128;
      c.target_modules = targets;
      c.public_fraction = fraction;
      return c;
    };
    for (double f : {1.0 / 32, 1.0 / 16, 1.0 / 8}) {
      run("MoS r=64, pool " + std::to_string(f).substr(0, 6), tl::make_mos(model, mos(f)));
    }
    const std::pair<const char*, bool tl::MosConfig::*> ablations[] = {
        {"pair_dissociation", &tl::MosConfig::pair_dissociation},
        {"vector_sharding", &tl::MosConfig::vector_sharding},
        {"subset_selection", &tl::MosConfig::subset_selection},
        {"privatization", &tl::MosConfig::privatization}};
    for (const auto& [name, field] : ablations) {
      tl::MosConfig c = mos(1.0 / 8);
      c.*field = false;
      run(std::string("MoS pool 1/8 without ") + name, tl::make_mos(model, c));
    }
    return 0;
  } catch (const tessera::Error& e) {
    std::fprintf(stderr, "mos_vs_lora: %s\n", e.what());
    return 1;
  }
}
