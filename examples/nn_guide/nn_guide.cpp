// Load a Hugging Face model folder, fine-tune it for a few steps, generate.
//
//   nn_guide MODEL_DIR     # a folder with config.json + *.safetensors
//   nn_guide               # writes a small random Llama to /tmp and uses it
//   nn_guide --help        # the command line
#include <ATen/ATen.h>

#include <iostream>

#include "command_line.h"  // examples/common: CLI11 with --help
#include "tessera/core/runtime.h"
#include "tessera/nn/generate.h"
#include "tessera/nn/loader.h"
#include "tessera/nn/train.h"

int main(int argc, char** argv) {
  std::string dir;
  CLI::App app{"Loads a Hugging Face model folder, fine-tunes it for a few steps, generates.",
               "nn_guide"};
  app.add_option("MODEL_DIR", dir,
                 "a folder with config.json + *.safetensors (default: a small random Llama "
                 "written to /tmp/tessera-nn-guide-model)");
  if (auto code = tessera::examples::parse_command_line(app, argc, argv)) return *code;

  tessera::init_runtime();  // threads from the cores, BLAS check
  if (dir.empty()) {
    dir = "/tmp/tessera-nn-guide-model";
    tessera::nn::ModelConfig cfg;  // a tiny Llama: 2 layers, hidden 64
    cfg.vocab_size = 256;
    cfg.hidden_size = 64;
    cfg.intermediate_size = 128;
    cfg.num_hidden_layers = 2;
    cfg.num_attention_heads = 4;
    cfg.num_key_value_heads = 2;
    tessera::nn::write_random_model(dir, cfg, /*seed=*/0);
  }

  // 1. Load: config.json is validated strictly; tensors keep HF names.
  tessera::nn::Transformer model = tessera::nn::load_hf_model(dir);
  std::cout << model.config().summary() << "\n";

  // 2. Train: AdamW with warm-up + cosine, gradient clipping.
  tessera::nn::TrainerOptions opts;
  opts.steps = 20;
  opts.lr = 1e-3;
  tessera::nn::Trainer trainer(model, opts);
  at::Tensor tokens = at::randint(0, model.config().vocab_size, {4, 33}, at::kLong);
  for (int64_t step = 0; step < opts.steps; ++step) {
    auto stats = trainer.step(tokens.narrow(1, 0, 32), tokens.narrow(1, 1, 32));
    if (step % 5 == 0) std::cout << "step " << step << " loss " << stats.loss << "\n";
  }

  // 3. Generate: a batch of prompts of different lengths, greedy, KV cache.
  tessera::nn::SamplingOptions sampling;
  sampling.max_new_tokens = 8;
  auto result = tessera::nn::generate(model, {{1, 2, 3}, {4, 5}}, sampling);
  for (const auto& seq : result.tokens) {
    for (int64_t t : seq) std::cout << t << " ";
    std::cout << "\n";
  }
  return 0;
}
