// Pretrain a small byte-level Llama on a text file for about a minute and
// sample from it.
//
//   pretrain_text [TEXT_FILE] [SECONDS]
//   pretrain_text ../shared/testdata/text/moby-dick.txt 60
//
// TEXT_FILE defaults to ../shared/testdata/text/moby-dick.txt, SECONDS
// (the training time budget) to 60; --help prints both.
//
// Run it under tessera-launch to train data parallel:
//   tessera-launch --nproc 2 -- pretrain_text moby-dick.txt
#include <ATen/ATen.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>

#include "command_line.h"
#include "tessera/core/error.h"
#include "tessera/core/metrics.h"
#include "tessera/core/runtime.h"
#include "tessera/dist/rendezvous.h"
#include "tessera/nn/generate.h"
#include "tessera/nn/train.h"
#include "tessera/tokenizer/tokenizer.h"

namespace tn = tessera::nn;

int main(int argc, char** argv) {
  std::string text_path = "../shared/testdata/text/moby-dick.txt";
  double budget_s = 60.0;
  CLI::App app{
      "Pretrains a small byte-level Llama on a text file for a time budget, then "
      "samples from it. Under tessera-launch it trains data parallel.",
      "pretrain_text"};
  app.option_defaults()->always_capture_default();
  app.add_option("TEXT_FILE", text_path, "the text to train on (bytes are the tokens)");
  app.add_option("SECONDS", budget_s, "training time budget, seconds (rank 0's clock)");
  if (auto code = tessera::examples::parse_command_line(app, argc, argv)) return *code;
  try {
    tessera::init_runtime();
    auto world = tessera::dist::init_process_group();  // one rank without launcher variables
    const int me = world->rank(), n = world->size();

    // Bytes as tokens: no tokenizer training, and every text works.
    auto tokenizer = tn::Tokenizer::bytes({"<|endoftext|>"});
    const std::string tokens_path = "/tmp/tessera-pretrain-text.tokens";
    if (me == 0) {
      std::ifstream in(text_path, std::ios::binary);
      TESSERA_CHECK(in.good(), NotFound, "cannot open '", text_path, "'");
      std::stringstream text;
      text << in.rdbuf();
      auto ids32 = tokenizer.encode(text.str(), /*parse_special=*/false);
      tn::TokenDataset::write(tokens_path, std::vector<int64_t>(ids32.begin(), ids32.end()));
    }
    world->barrier().wait();
    auto data = tn::TokenDataset::open(tokens_path);

    tn::ModelConfig cfg;  // a 3.3M-parameter Llama over bytes
    cfg.vocab_size = tokenizer.vocab_size();
    cfg.hidden_size = 256;
    cfg.intermediate_size = 768;
    cfg.num_hidden_layers = 4;
    cfg.num_attention_heads = 8;
    cfg.num_key_value_heads = 4;
    cfg.tie_word_embeddings = true;
    tn::Transformer model(cfg);
    model.init_random(0);
    tn::TrainerOptions opts;
    opts.steps = 100000;  // the time budget ends training
    opts.lr = 3e-3;
    opts.min_lr = 3e-3;
    opts.warmup = 20;
    tn::Trainer trainer(model, opts, world);
    if (me == 0) {
      std::cout << cfg.summary() << "\n"
                << data.num_tokens() << " byte tokens from " << text_path << ", " << n
                << " rank(s), " << budget_s << " s\n";
    }
    tessera::Stopwatch watch;
    const int64_t global_batch = 8 * n, seq = 128;
    for (int64_t step = 0;; ++step) {
      auto batch = data.batch(step, global_batch, seq, me, n, /*seed=*/1);
      auto stats = trainer.step(batch.input_ids, batch.labels);
      // Rank 0's clock decides for everyone.
      at::Tensor stop = at::full({1}, watch.seconds() >= budget_s ? 1 : 0, at::kInt);
      world->broadcast(stop, 0).wait();
      if (me == 0 && (step % 20 == 0 || stop.item<int>())) {
        std::printf("step %4lld  loss %.3f (%.2f bits/byte)  %.0f tok/s  %.0f s\n",
                    static_cast<long long>(step), stats.loss, stats.loss / std::log(2.0),
                    stats.tokens_per_second, watch.seconds());
        std::fflush(stdout);
      }
      if (stop.item<int>()) break;
    }
    tn::SamplingOptions sampling;
    sampling.temperature = 0.8;
    sampling.top_k = 40;
    sampling.max_new_tokens = 200;
    sampling.seed = 3;
    auto prompt = tokenizer.encode("Call me Ishmael. ");
    auto out = tn::generate(model, {std::vector<int64_t>(prompt.begin(), prompt.end())}, sampling);
    std::vector<int32_t> ids(out.tokens[0].begin(), out.tokens[0].end());
    if (me == 0) std::cout << "\nsample: Call me Ishmael. " << tokenizer.decode(ids, true) << "\n";
    world->barrier().wait();
    return 0;
  } catch (const tessera::Error& e) {
    std::cerr << "pretrain_text: " << e.what() << "\n";
    return 1;
  }
}
