// GRPO and PPO driver programs on real worker processes with a small random
// model: the 3D-HybridEngine moves exactly the formula's bytes; a worker
// killed mid-iteration stops the run naming role and rank, leaving no
// process behind; restarting from the last checkpoint repeats the
// uninterrupted run's losses exactly.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <signal.h>
#include "test_main.h"

#include <chrono>
#include <cmath>
#include <filesystem>

#include "tessera/ckpt/checkpoint.h"
#include "tessera/ckpt_nn/model_state.h"
#include "tessera/core/error.h"
#include "tessera/core/runtime.h"
#include "tessera/formats/safetensors.h"
#include "tessera/nn/loader.h"
#include "tessera/nn/parameters.h"
#include "tessera/nn/train.h"
#include "tessera/rlhf/algorithms.h"
#include "tessera/rlhf/driver.h"
#include "tessera/rlhf/hybrid_engine.h"
#include "tessera/rlhf/pipeline.h"
#include "tessera/rlhf/roles.h"

namespace tessera::rlhf {
namespace {

namespace fs = std::filesystem;

struct Fixture {
  std::string dir =
      (fs::temp_directory_path() / ("tessera-pipeline-test-" + std::to_string(getpid()))).string();
  nn::ModelConfig config;
  std::string model_json;
  std::string head;

  Fixture() {
    fs::remove_all(dir);
    config.vocab_size = 256;
    config.hidden_size = 64;
    config.intermediate_size = 128;
    config.num_hidden_layers = 2;
    config.num_attention_heads = 4;
    config.num_key_value_heads = 2;
    config.max_position_embeddings = 128;
    config.eos_token_ids = {255};
    nn::write_random_model(dir + "/model", config, /*seed=*/3);
    model_json = "{\"hf\": \"" + dir + "/model\"}";
    head = dir + "/head.safetensors";
    nn::save_safetensors(head, {{"value_head.weight", at::randn({64}, at::kFloat)},
                                {"value_head.bias", at::zeros({}, at::kFloat)}});
  }
  ~Fixture() { fs::remove_all(dir); }

  DriverOptions options(bool critic) const {
    DriverOptions o;
    o.pools = {{"all", 4}};
    o.roles = {{"actor", "actor", "all",
                "{\"model\": " + model_json +
                    ", \"tp\": 2, \"gen_tp\": 1, \"lr\": 1e-3, \"kl_coef\": 0.1, "
                    "\"max_new_tokens\": 6, \"seed\": 5}"},
               {"reference", "reference", "all", "{\"model\": " + model_json + "}"},
               {"reward", "reward_model", "all",
                "{\"model\": " + model_json + ", \"head\": \"" + head + "\"}"}};
    if (critic)
      o.roles.push_back(
          {"critic", "critic", "all", "{\"model\": " + model_json + ", \"lr\": 1e-3}"});
    return o;
  }

  PipelineOptions run(const std::string& ckpt) const {
    PipelineOptions p;
    p.iterations = 4;
    p.prompts_per_iteration = 4;
    p.samples = 2;
    p.checkpoint_dir = ckpt;
    p.checkpoint_every = ckpt.empty() ? 0 : 1;
    return p;
  }
};

Fixture* g_fixture = nullptr;
const nn::Tokenizer& tokenizer() {
  static nn::Tokenizer t = nn::Tokenizer::bytes();
  return t;
}

TEST(Pipeline, HybridEngineMovesTheFormulasBytes) {
  const Fixture& f = *g_fixture;
  Driver driver(f.options(false));
  auto stats = run_grpo(driver, tokenizer(), [&] {
    auto p = f.run("");
    p.iterations = 1;
    return p;
  }());
  ASSERT_EQ(stats.size(), 1u);
  // t = 2, t_g = 1: every rank receives (d_g - 1) / t = 1/2 of the
  // tensor-parallel weights' bytes (replicated norms need no transfer).
  int64_t split_bytes = 0;
  nn::Transformer full(f.config);
  for (const std::string& name : full.full_parameter_names()) {
    if (nn::parameter_spec(f.config, name).split == nn::Split::kReplicate) continue;
    int64_t n = 4;
    for (int64_t s : full.full_shape(name)) n *= s;
    split_bytes += n;
  }
  EXPECT_EQ(stats[0].transition_bytes,
            static_cast<double>(hybrid_engine_bytes_per_rank(split_bytes, 2, 1)));
  EXPECT_GT(stats[0].generation_weight_bytes, 0);
  EXPECT_GT(stats[0].kv_cache_bytes, 0);
  EXPECT_GT(stats[0].new_tokens, 0);
}

// 4 prompts over a pool of 3: the driver pads the batch to 2 prompts per
// worker, and the padded rows generate too. Counting the workers' tokens
// reported 12 responses' worth (72 here, almost every response reaches
// max_new_tokens) where 8 responses exist; the count is now the real
// responses' lengths, at most 4 x 2 x 6.
TEST(Pipeline, GeneratedTokensLeaveOutBatchPadding) {
  const Fixture& f = *g_fixture;
  DriverOptions o = f.options(false);
  o.pools = {{"all", 3}};
  o.roles[0].config_json =
      "{\"model\": " + f.model_json +
      ", \"tp\": 1, \"gen_tp\": 1, \"lr\": 1e-3, \"max_new_tokens\": 6, \"seed\": 5}";
  Driver driver(o);
  auto p = f.run("");
  p.iterations = 1;
  auto stats = run_grpo(driver, tokenizer(), p);
  ASSERT_EQ(stats.size(), 1u);
  EXPECT_GT(stats[0].new_tokens, 0);
  EXPECT_LE(stats[0].new_tokens, p.prompts_per_iteration * p.samples * 6);
}

TEST(Pipeline, GrpoKilledWorkerThenResumeRepeatsTheLosses) {
  const Fixture& f = *g_fixture;
  std::vector<IterationStats> reference;
  {
    Driver driver(f.options(false));
    reference = run_grpo(driver, tokenizer(), f.run(f.dir + "/ckpt_a"));
  }
  ASSERT_EQ(reference.size(), 4u);
  for (const auto& s : reference) {
    EXPECT_TRUE(std::isfinite(s.pg_loss));
    EXPECT_GT(s.grad_norm, 0);
  }
  EXPECT_NE(reference[3].kl, 0.0);  // the policy moved away from the reference

  // Pool rank 1 dies as iteration 2's update begins (its 3rd update call).
  std::vector<ProcessInfo> procs;
  {
    DriverOptions o = f.options(false);
    o.worker_env = {"TESSERA_RLHF_FAULT=actor.update:3:1"};
    Driver driver(o);
    procs = driver.processes();
    const auto start = std::chrono::steady_clock::now();
    try {
      run_grpo(driver, tokenizer(), f.run(f.dir + "/ckpt_b"));
      ADD_FAILURE() << "no error";
    } catch (const Unavailable& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find("actor rank 1"), std::string::npos) << msg;
      EXPECT_NE(msg.find("during actor.update"), std::string::npos) << msg;
    }
    EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(),
              30.0);
  }
  for (const ProcessInfo& p : procs)
    EXPECT_NE(::kill(static_cast<pid_t>(p.pid), 0), 0) << "orphan " << p.pid;

  // Restart from the last checkpoint (after iteration 1): iterations 2 and
  // 3 repeat the uninterrupted run bit for bit.
  Driver driver(f.options(false));
  auto resume = f.run(f.dir + "/ckpt_b");
  resume.resume = true;
  auto resumed = run_grpo(driver, tokenizer(), resume);
  ASSERT_EQ(resumed.size(), 2u);
  for (size_t i = 0; i < resumed.size(); ++i) {
    const IterationStats& a = reference[i + 2];
    const IterationStats& b = resumed[i];
    EXPECT_EQ(b.iteration, a.iteration);
    EXPECT_EQ(b.mean_score, a.mean_score);
    EXPECT_EQ(b.pg_loss, a.pg_loss);
    EXPECT_EQ(b.kl, a.kl);
    EXPECT_EQ(b.grad_norm, a.grad_norm);
  }
}

TEST(Pipeline, PpoTrainsActorAndCriticAndResumes) {
  const Fixture& f = *g_fixture;
  std::vector<IterationStats> reference;
  {
    Driver driver(f.options(true));
    reference = run_ppo(driver, tokenizer(), f.run(f.dir + "/ppo_a"));
  }
  ASSERT_EQ(reference.size(), 4u);
  for (const auto& s : reference) {
    EXPECT_TRUE(std::isfinite(s.value_loss) && s.value_loss > 0);
    EXPECT_GT(s.grad_norm, 0);
  }
  {
    Driver driver(f.options(true));
    auto p = f.run(f.dir + "/ppo_b");
    p.stop_after = 2;  // stopped after two iterations (checkpointed)
    EXPECT_EQ(run_ppo(driver, tokenizer(), p).size(), 2u);
  }
  Driver driver(f.options(true));
  auto p = f.run(f.dir + "/ppo_b");
  p.resume = true;
  auto resumed = run_ppo(driver, tokenizer(), p);
  ASSERT_EQ(resumed.size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_EQ(resumed[i].pg_loss, reference[i + 2].pg_loss);
    EXPECT_EQ(resumed[i].value_loss, reference[i + 2].value_loss);
    EXPECT_EQ(resumed[i].grad_norm, reference[i + 2].grad_norm);
  }
}

// The actor's update at tp 2 x dp 2 against one process computing the same
// token-mean GRPO loss and AdamW step on the whole batch.
TEST(Pipeline, ActorUpdateAtTp2Dp2MatchesOneProcess) {
  const Fixture& f = *g_fixture;
  const double lr = 1e-3;
  // A fixed batch: 8 sequences of 12 tokens, prompts of 3-5, responses of 2-7.
  at::manual_seed(11);
  const int64_t n = 8, L = 12;
  at::Tensor seq = at::randint(0, 255, {n, L}, at::kLong);
  at::Tensor plen = at::randint(3, 6, {n}, at::kLong), rlen = at::randint(2, 8, {n}, at::kLong);
  at::Tensor mask = response_mask(plen, rlen, L);
  at::Tensor adv = at::randn({n, L - 1}) * mask;
  Batch batch = {{"sequences", seq},
                 {"prompt_lengths", plen},
                 {"response_lengths", rlen},
                 {"advantages", adv}};

  DriverOptions o;
  o.pools = {{"all", 4}};
  o.roles = {{"actor", "actor", "all",
              "{\"model\": " + f.model_json + ", \"tp\": 2, \"lr\": " + std::to_string(lr) +
                  ", \"max_grad_norm\": 0}"}};
  const std::string saved = f.dir + "/update_ckpt";
  CallResult up;
  {
    Driver driver(o);
    up = driver.group("actor").call("update", {driver.put("batch", batch)}).get();
    driver.group("actor").call("save", {}, Args().set("dir", saved)).get();
  }

  // One process: the same loss (ratio 1, so the gradient is -A grad logp,
  // averaged over all response tokens), one AdamW step.
  nn::Transformer ref = nn::load_hf_model(f.dir + "/model");
  ref.set_requires_grad(true);
  std::vector<at::Tensor> params;
  for (const auto& [name, p] : ref.named_parameters()) params.push_back(p);
  nn::AdamWOptions ao;
  ao.weight_decay = 0;
  ao.beta2 = 0.999;
  nn::AdamW opt(params, ao);
  at::Tensor logp = token_logprobs(ref, seq);
  at::Tensor loss = (-(at::exp(logp - logp.detach()) * adv) * mask).sum() / mask.sum();
  loss.backward();
  const double grad_norm = opt.step(lr, 0.0);
  EXPECT_NEAR(up.metric("pg_loss"), loss.item<double>(), 1e-6);
  EXPECT_NEAR(up.metric("grad_norm"), grad_norm, 1e-4 * grad_norm);

  // The weights the 4 ranks saved, read back into one process.
  nn::Transformer got = nn::load_hf_model(f.dir + "/model");
  ckpt::State state;
  ckpt::add_model(state, got, {0, 1});
  ckpt::LoadOptions lo;
  lo.allow_missing = false;
  ckpt::Checkpointer().load(saved, state, nullptr, lo);
  // Adam's first step moves every weight by about lr * sign(gradient): a
  // gradient that is ~0 may round to either sign in a different reduction
  // order, so allow those few elements 2 lr; everything else must agree.
  int64_t total = 0, flipped = 0;
  for (const auto& [name, w] : ref.named_parameters()) {
    at::Tensor diff = (got.parameter(name) - w.detach()).abs();
    total += diff.numel();
    flipped += (diff > 1e-5).sum().item<int64_t>();
    EXPECT_LE(diff.max().item<double>(), 2 * lr + 1e-5) << name;
  }
  EXPECT_LT(flipped, total / 200) << flipped << " of " << total << " weights differ";
}

}  // namespace
}  // namespace tessera::rlhf

int main(int argc, char** argv) {
  tessera::init_runtime();
  if (auto code = tessera::rlhf::run_worker_if_spawned(tessera::rlhf::RoleRegistry::builtin()))
    return *code;
  ::testing::InitGoogleTest(&argc, argv);
  tessera::rlhf::Fixture fixture;
  tessera::rlhf::g_fixture = &fixture;
  return tessera::testutil::run_all_tests();
}
