// QSPEC on a model trained here: train a small character-level model on
// arithmetic ("Q: 37+48=? A: 85"), pack its weights to int4 once, and
// compare every way of running the packed weights — accuracy against fp32
// (per-layer error, held-out perplexity, answers right) and decoding speed —
// with QSPEC drafting in W4A4 or W4A8 and verifying in W4A16. Greedy QSPEC
// output is checked to equal W4A16's token for token.
//
//   build/release/bin/qspec [--steps 300] [--gguf SmolLM2.gguf]   (--help: the options)
//
// With --gguf the same table is printed for that model (chat prompts; no
// arithmetic accuracy or perplexity columns).
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <cstdio>
#include <filesystem>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "command_line.h"
#include "tessera/core/error.h"
#include "tessera/core/metrics.h"
#include "tessera/core/runtime.h"
#include "tessera/nn/loader.h"
#include "tessera/nn/train.h"
#include "tessera/specdec/qspec.h"
#include "tessera/tasks/arithmetic.h"

namespace tn = tessera::nn;
namespace tq = tessera::quant;
namespace ts = tessera::specdec;

namespace {

const std::string kChars = "0123456789+-=?QA: \n";

std::vector<int64_t> encode(const std::string& s) {
  std::vector<int64_t> ids;
  for (char ch : s) ids.push_back(static_cast<int64_t>(kChars.find(ch)));
  return ids;
}

std::string decode(const std::vector<int64_t>& ids) {
  std::string s;
  for (int64_t i : ids) s += kChars[i];
  return s;
}

// Mean relative error ||x W^T - linear(x)|| / ||x W^T|| over the packed
// layers, for random inputs.
double layer_error(tn::Transformer& model, const tq::QuantizedModel& packed, tq::Mode mode) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(1);
  double sum = 0;
  for (const auto& [name, w] : packed.weights()) {
    const std::string param = name == "lm_head" && model.config().tie_word_embeddings
                                  ? "model.embed_tokens.weight"
                                  : (name == "lm_head" ? "lm_head.weight" : name + ".weight");
    at::Tensor full = model.parameter(param);
    at::Tensor x = at::randn({16, w.in_features}, gen);
    at::Tensor ref = at::matmul(x, full.t());
    sum += ((tq::linear(x, w, mode) - ref).norm() / ref.norm()).item<double>();
  }
  return sum / static_cast<double>(packed.weights().size());
}

struct Row {
  std::string name;
  double layer_err = -1, ppl = -1, correct = -1, tok_s = 0, acceptance = -1, per_verify = -1;
};

void print_table(const std::vector<Row>& rows) {
  std::printf(
      "\n| mode | layer rel. error | held-out perplexity | answers right | tokens/s | acceptance | "
      "tokens per verify |\n");
  std::printf("|---|---:|---:|---:|---:|---:|---:|\n");
  for (const Row& r : rows) {
    auto num = [](double v, const char* fmt) {
      if (v < 0) return std::string("—");
      char buf[32];
      std::snprintf(buf, sizeof buf, fmt, v);
      return std::string(buf);
    };
    std::printf("| %s | %s | %s | %s | %.1f | %s | %s |\n", r.name.c_str(),
                num(r.layer_err, "%.4f").c_str(), num(r.ppl, "%.3f").c_str(),
                num(r.correct, "%.0f%%").c_str(), r.tok_s, num(r.acceptance, "%.3f").c_str(),
                num(r.per_verify, "%.2f").c_str());
  }
}

// Decodes `prompts` in every mode; fills speed (and, given `answers`,
// accuracy) columns. Checks greedy QSPEC == W4A16.
void compare(tn::Transformer& model, tq::QuantizedModel& packed,
             const std::vector<std::vector<int64_t>>& prompts, int64_t max_new,
             const std::vector<int64_t>& stop, std::vector<Row>& rows,
             const std::vector<tessera::tasks::ArithmeticExample>* answers) {
  struct Run {
    std::string name;
    std::string decoding;  // specdec::parse_decoding's names
    tq::Mode draft;
  };
  const std::vector<Run> runs = {{"fp32", "fp", tq::Mode::kW4A4},
                                 {"W4A16", "w4a16", tq::Mode::kW4A4},
                                 {"W4A8", "w4a8", tq::Mode::kW4A4},
                                 {"W4A4", "w4a4", tq::Mode::kW4A4},
                                 {"QSPEC (W4A4 draft)", "qspec", tq::Mode::kW4A4},
                                 {"QSPEC (W4A8 draft)", "qspec", tq::Mode::kW4A8}};
  std::vector<std::vector<int64_t>> w4a16_tokens;
  for (size_t i = 0; i < runs.size(); ++i) {
    ts::GenerateOptions o;
    ts::parse_decoding(runs[i].decoding, &o);
    o.sampling.max_new_tokens = max_new;
    o.sampling.stop_tokens = stop;
    o.qspec.gamma = 3;
    o.qspec.draft_mode = runs[i].draft;
    tessera::Stopwatch watch;
    auto r = ts::generate(model, packed, prompts, o);
    Row& row = rows[i];
    row.tok_s = r.new_tokens / watch.seconds();
    if (o.speculative) {
      row.acceptance = r.stats.acceptance_rate();
      row.per_verify = r.stats.tokens_per_verify();
      TESSERA_CHECK(r.tokens == w4a16_tokens, Internal, runs[i].name,
                    " greedy output differs from W4A16's");
    }
    if (runs[i].decoding == "w4a16") w4a16_tokens = r.tokens;
    if (answers) {
      int right = 0;
      for (size_t p = 0; p < prompts.size(); ++p) {
        right += tessera::tasks::arithmetic_correct((*answers)[p], decode(r.tokens[p])) ? 1 : 0;
      }
      row.correct = 100.0 * right / static_cast<double>(prompts.size());
    }
  }
  std::printf("greedy QSPEC output equals W4A16's for all %zu prompts (both drafts)\n",
              prompts.size());
}

}  // namespace

int main(int argc, char** argv) try {
  int64_t steps = 300;
  std::string gguf;
  CLI::App app{
      "QSPEC on a small arithmetic model trained here: accuracy and decoding speed of "
      "fp32, W4A16, W4A4, W4A8 and QSPEC (W4A4 or W4A8 drafts verified in W4A16).",
      "qspec"};
  app.option_defaults()->always_capture_default();
  app.add_option("--steps", steps, "training steps of the arithmetic model");
  app.add_option("--gguf", gguf,
                 "also print the table for this GGUF model (e.g. SmolLM2) on chat prompts");
  if (auto code = tessera::examples::parse_command_line(app, argc, argv)) return *code;
  tessera::init_runtime();

  // 1. Train a small dense model on arithmetic lines.
  tn::ModelConfig c;
  c.model_type = "llama";
  c.vocab_size = static_cast<int64_t>(kChars.size());
  c.hidden_size = 128;
  c.intermediate_size = 384;
  c.num_hidden_layers = 4;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  tn::Transformer model(c);
  model.init_random(1);
  std::vector<int64_t> stream;
  for (const auto& ex : tessera::tasks::arithmetic_examples(20000, 1, 9)) {
    auto ids = encode(ex.prompt + ex.answer + "\n");
    stream.insert(stream.end(), ids.begin(), ids.end());
  }
  tn::TrainerOptions to;
  to.steps = steps;
  to.lr = 5e-3;
  to.min_lr = 5e-4;
  tn::Trainer trainer(model, to);
  std::mt19937_64 rng(2);
  const int64_t B = 32, T = 64;
  auto window_batch = [&](const std::vector<int64_t>& s) {
    at::Tensor ids = at::empty({B, T + 1}, at::kLong);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t start = static_cast<int64_t>(rng() % (s.size() - T - 1));
      for (int64_t k = 0; k <= T; ++k) ids[b][k] = s[start + k];
    }
    return ids;
  };
  tessera::Stopwatch train_watch;
  double loss = 0;
  for (int64_t s = 0; s < steps; ++s) {
    at::Tensor ids = window_batch(stream);
    loss = trainer.step(ids.narrow(1, 0, T).contiguous(), ids.narrow(1, 1, T).contiguous()).loss;
    if ((s + 1) % 100 == 0)
      std::printf("train step %lld: loss %.4f\n", static_cast<long long>(s + 1), loss);
  }
  std::printf("trained %lld steps in %.1f s (final loss %.4f)\n", static_cast<long long>(steps),
              train_watch.seconds(), loss);
  model.set_requires_grad(false);

  // 2. Pack once; every mode runs these weights.
  auto packed = tq::QuantizedModel::pack(model, {64, true});
  model.set_linear_override(packed);
  std::printf("packed %zu layers: %.2f MiB of int4 codes + scales (fp32: %.2f MiB); kernels: %s\n",
              packed->weights().size(), packed->bytes() / 1048576.0,
              model.num_local_parameters() * 4 / 1048576.0, tq::isa_name(tq::best_isa()));

  std::vector<Row> rows(6);
  const char* names[] = {
      "fp32", "W4A16", "W4A8", "W4A4", "QSPEC (W4A4 draft)", "QSPEC (W4A8 draft)"};
  const tq::Mode modes[] = {tq::Mode::kFloat, tq::Mode::kW4A16, tq::Mode::kW4A8, tq::Mode::kW4A4};
  for (int i = 0; i < 6; ++i) rows[i].name = names[i];

  // 3. Accuracy: per-layer error and held-out perplexity per mode.
  std::vector<int64_t> held;
  for (const auto& ex : tessera::tasks::arithmetic_examples(2000, 99, 9)) {
    auto ids = encode(ex.prompt + ex.answer + "\n");
    held.insert(held.end(), ids.begin(), ids.end());
  }
  at::Tensor hb = window_batch(held);
  for (int i = 0; i < 4; ++i) {
    tq::ScopedMode scoped(*packed, modes[i]);
    rows[i].layer_err = i == 0 ? 0.0 : layer_error(model, *packed, modes[i]);
    at::NoGradGuard no_grad;
    rows[i].ppl =
        std::exp(model.loss(hb.narrow(1, 0, T).contiguous(), hb.narrow(1, 1, T).contiguous())
                     .ce.item<double>());
  }

  // 4. Decoding: 64 held-out questions, batch 16.
  auto questions = tessera::tasks::arithmetic_examples(64, 7, 9);
  std::vector<std::vector<int64_t>> prompts;
  for (const auto& q : questions) prompts.push_back(encode("Q: 2+3=? A: 5\n" + q.prompt));
  std::vector<Row> speed = rows;
  // No stop token: the model goes on to write further lines, so drafts run
  // long; the answer is the first number of the completion.
  compare(model, *packed, prompts, 24, {}, speed, &questions);
  for (int i = 0; i < 6; ++i) {
    speed[i].layer_err = i < 4 ? rows[i].layer_err : -1;
    speed[i].ppl = i < 4 ? rows[i].ppl : -1;
  }
  std::printf(
      "\nArithmetic model (%lld parameters), 64 prompts in one batch, 24 new tokens each, "
      "greedy:\n",
      static_cast<long long>(model.num_local_parameters()));
  print_table(speed);

  if (!gguf.empty()) {
    auto loaded = tn::load_gguf_model(gguf);
    auto p2 = tq::QuantizedModel::pack(*loaded.model, {64, true});
    loaded.model->set_linear_override(p2);
    std::vector<std::vector<int64_t>> chat;
    for (const char* q : {"What is the capital of France?", "Name three colors.", "What is 2+2?",
                          "How many legs does a dog have?"}) {
      auto ids = loaded.tokenizer.encode(tn::format_chat(loaded.chat_template, {{"user", q}}));
      chat.emplace_back(ids.begin(), ids.end());
    }
    std::vector<Row> r2(6);
    for (int i = 0; i < 6; ++i) r2[i].name = names[i];
    for (int i = 1; i < 4; ++i) r2[i].layer_err = layer_error(*loaded.model, *p2, modes[i]);
    r2[0].layer_err = 0;
    compare(*loaded.model, *p2, chat, 24, {}, r2, nullptr);
    std::printf("\n%s, 4 chat prompts in one batch, 24 new tokens each, greedy:\n",
                std::filesystem::path(gguf).filename().c_str());
    print_table(r2);
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "qspec: %s\n", e.what());
  return 1;
}
