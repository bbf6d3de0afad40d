// Tensor, expert and data parallelism on real ranks (tessera-launch
// --nproc 2), each checked against the same model on one rank.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <unistd.h>
#include "test_main.h"

#include <filesystem>

#include "tessera/core/runtime.h"
#include "tessera/dist/rendezvous.h"
#include "tessera/nn/loader.h"
#include "tessera/nn/model.h"
#include "tessera/nn/train.h"

namespace tessera::nn {
namespace {

std::shared_ptr<dist::ProcessGroup> g_world;

ModelConfig tiny(const std::string& type) {
  ModelConfig c;
  c.model_type = type;
  c.vocab_size = 101;  // not divisible by 2: uneven vocabulary shards
  c.hidden_size = 32;
  c.intermediate_size = 48;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.attention_bias = type == "qwen2" || type == "qwen2_moe";
  if (type == "mixtral" || type == "qwen2_moe") {
    c.num_experts = 4;
    c.num_experts_per_tok = 2;
    c.moe_intermediate_size = type == "qwen2_moe" ? 24 : 0;
    c.shared_expert_intermediate_size = type == "qwen2_moe" ? 40 : 0;
    c.norm_topk_prob = type == "mixtral";
  }
  return c;
}

void expect_close(const at::Tensor& a, const at::Tensor& b, double rtol = 1e-5) {
  ASSERT_EQ(a.sizes(), b.sizes());
  double scale = b.abs().max().item<double>();
  double diff = (a - b).abs().max().item<double>();
  EXPECT_LE(diff, rtol * std::max(scale, 1.0)) << "max diff " << diff << " at scale " << scale;
}

// Parameters after several AdamW steps: the update divides by sqrt(v), so
// last-bit differences in near-zero gradients (summation order across
// ranks) grow to ~1e-5 of the weights' scale; losses still agree to 1e-5.
constexpr double kTrainedTolerance = 1e-4;

at::Tensor ids_for(int seed, int64_t batch, int64_t len) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::randint(0, 101, {batch, len}, gen, at::kLong);
}

TEST(TensorParallel, LogitsEqualOneRank) {
  for (const std::string type : {"llama", "qwen2", "mixtral", "qwen2_moe"}) {
    SCOPED_TRACE(type);
    Transformer single(tiny(type));
    single.init_random(21);
    Transformer sharded(tiny(type), ParallelGroups{g_world, nullptr});
    sharded.init_random(21);
    EXPECT_LT(sharded.num_local_parameters(), single.num_local_parameters());
    at::Tensor ids = ids_for(5, 2, 9);
    expect_close(sharded.forward(ids).logits, single.forward(ids).logits);
    // Weights gathered back from the shards are the original ones.
    auto full = gather_full_weights(sharded, g_world);
    for (const auto& [name, t] : single.named_parameters()) {
      ASSERT_TRUE(at::equal(full.at(name), t)) << name;
    }
  }
}

// The serving engine's paged forward under tp: each rank keeps its own kv
// heads in the block pool, the logits match the single-rank paged forward,
// and a sequence's logits are the same bits whatever else shares the batch.
TEST(TensorParallel, PagedForwardMatchesOneRankAndIsBatchInvariant) {
  at::NoGradGuard no_grad;
  for (const std::string type : {"llama", "qwen2", "mixtral", "qwen2_moe"}) {
    SCOPED_TRACE(type);
    const ModelConfig c = tiny(type);
    Transformer single(c);
    single.init_random(31);
    Transformer sharded(c, ParallelGroups{g_world, nullptr});
    sharded.init_random(31);
    const int tp = g_world->size();
    PagedKVCache one(c, 8, 4), mine(c, 8, 4, tp);
    EXPECT_EQ(mine.key(0).size(1), c.num_key_value_heads / tp);
    EXPECT_EQ(PagedKVCache::bytes_per_block(c, 4, tp) * tp, PagedKVCache::bytes_per_block(c, 4));

    // Three sequences of 7, 5 and 3 tokens; logits for every last token
    // and two inner ones.
    const at::Tensor ids = ids_for(7, 1, 15);
    PagedBatch batch;
    batch.sequences = {{7, 0, {0, 1}, -1}, {5, 0, {2, 3}, -1}, {3, 0, {4}, -1}};
    batch.logits_rows = {6, 3, 11, 14};
    auto run = [&](Transformer& model, PagedKVCache& cache, PagedBatch b, const at::Tensor& x) {
      b.cache = &cache;
      ForwardOptions f;
      f.paged = &b;
      return model.forward(x, f).logits[0];
    };
    const at::Tensor got = run(sharded, mine, batch, ids);
    expect_close(got, run(single, one, batch, ids));

    // The second sequence alone, in other blocks: the same bits.
    PagedKVCache fresh(c, 8, 4, tp);
    PagedBatch alone;
    alone.sequences = {{5, 0, {6, 5}, -1}};
    alone.logits_rows = {4};
    const at::Tensor by_itself = run(sharded, fresh, alone, ids.narrow(1, 7, 5));
    EXPECT_TRUE(at::equal(by_itself[0], got[2])) << "batch-dependent logits under tp";

    // A decode step on the cached prefix: the next token of sequence 2
    // sees the keys and values the batch wrote into this rank's heads.
    PagedBatch decode;
    decode.sequences = {{1, 3, {4}, -1}};
    decode.logits_rows = {0};
    const at::Tensor next = ids_for(8, 1, 1);
    expect_close(run(sharded, mine, decode, next), run(single, one, decode, next));
  }
}

TEST(TensorParallel, LoadsAHuggingFaceFolderIntoShards) {
  std::string dir = ::testing::TempDir() + "/tessera_tp_load_" + std::to_string(getppid());
  if (g_world->rank() == 0) write_random_model(dir, tiny("qwen2"), 33, 30000);
  g_world->barrier().wait();
  Transformer single = load_hf_model(dir);
  Transformer sharded = load_hf_model(dir, ParallelGroups{g_world, nullptr});
  at::Tensor ids = ids_for(6, 3, 7);
  expect_close(sharded.forward(ids).logits, single.forward(ids).logits);
  g_world->barrier().wait();
  if (g_world->rank() == 0) std::filesystem::remove_all(dir);
}

TEST(ExpertParallel, MoeEqualsOneRank) {
  for (const std::string type : {"mixtral", "qwen2_moe"}) {
    SCOPED_TRACE(type);
    Transformer single(tiny(type));
    single.init_random(22);
    Transformer experts(tiny(type), ParallelGroups{nullptr, g_world});
    experts.init_random(22);
    // Each ep rank routes its own tokens (ep ranks see different data).
    at::Tensor ids = ids_for(100 + g_world->rank(), 2, 11);
    auto got = experts.forward(ids);
    auto want = single.forward(ids);
    expect_close(got.logits, want.logits);
  }
}

// Runs `steps` training steps; returns the loss sequence.
std::vector<double> train(Transformer& model, std::shared_ptr<dist::ProcessGroup> dp, bool zero1,
                          int64_t local_batch, int rank, int world, double clip = 1.0) {
  TrainerOptions opts;
  opts.steps = 4;
  opts.lr = 1e-2;
  opts.warmup = 1;
  opts.zero1 = zero1;
  opts.max_grad_norm = clip;
  Trainer trainer(model, opts, dp);
  std::vector<double> losses;
  for (int64_t s = 0; s < opts.steps; ++s) {
    at::Tensor all = ids_for(1000 + s, local_batch * world, 10);
    at::Tensor mine = all.narrow(0, rank * local_batch, local_batch);
    at::Tensor labels = at::roll(mine, -1, 1);
    losses.push_back(trainer.step(mine, labels).loss);
  }
  return losses;
}

TEST(DataParallel, LossesEqualOneRankOnTheGlobalBatchAndZeroEqualsAdamW) {
  const int me = g_world->rank(), n = g_world->size();
  for (const std::string type : {"llama", "mixtral"}) {
    SCOPED_TRACE(type);
    ModelConfig cfg = tiny(type);
    // The load-balancing loss of a rank's tokens is not that of the global
    // batch (it is a product of batch means), so it is off here.
    cfg.router_aux_loss_coef = 0;
    Transformer single(cfg), dp(cfg), zero(cfg);
    single.init_random(23);
    dp.init_random(23);
    zero.init_random(23);
    auto want = train(single, nullptr, false, 2 * n, 0, 1);
    auto got = train(dp, g_world, false, 2, me, n);
    auto got_zero = train(zero, g_world, true, 2, me, n);
    for (size_t i = 0; i < want.size(); ++i) {
      EXPECT_NEAR(got[i], want[i], 1e-5 * std::abs(want[i])) << "step " << i;
      EXPECT_NEAR(got_zero[i], want[i], 1e-5 * std::abs(want[i])) << "step " << i;
    }
    for (const auto& [name, p] : single.named_parameters()) {
      expect_close(dp.parameter(name).detach(), p.detach(), kTrainedTolerance);
      expect_close(zero.parameter(name).detach(), p.detach(), kTrainedTolerance);
    }
  }
}

TEST(TensorParallel, TrainingEqualsOneRank) {
  ModelConfig cfg = tiny("qwen2");
  Transformer single(cfg), sharded(cfg, ParallelGroups{g_world, nullptr});
  single.init_random(24);
  sharded.init_random(24);
  // Same data on both tp ranks (a tensor-parallel replica sees one batch).
  auto want = train(single, nullptr, false, 4, 0, 1, /*clip=*/0.5);
  auto got = train(sharded, nullptr, false, 4, 0, 1, /*clip=*/0.5);
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_NEAR(got[i], want[i], 1e-5 * std::abs(want[i])) << "step " << i;
  }
  auto full = gather_full_weights(sharded, g_world);
  for (const auto& [name, p] : single.named_parameters()) {
    expect_close(full.at(name), p.detach(), kTrainedTolerance);
  }
}

TEST(ExpertParallel, TrainingEqualsOneRankOnTheGlobalBatch) {
  const int me = g_world->rank(), n = g_world->size();
  ModelConfig cfg = tiny("mixtral");
  cfg.router_aux_loss_coef = 0;  // a per-rank aux loss is not the global one
  Transformer single(cfg), experts(cfg, ParallelGroups{nullptr, g_world});
  single.init_random(25);
  experts.init_random(25);
  // Clipping on: the global gradient norm must count every rank's experts
  // (and the replicated weights once), or ranks clip differently and their
  // copies of the replicated weights drift apart.
  auto want = train(single, nullptr, false, 2 * n, 0, 1, /*clip=*/0.05);
  auto got = train(experts, nullptr, false, 2, me, n, /*clip=*/0.05);
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_NEAR(got[i], want[i], 1e-5 * std::abs(want[i])) << "step " << i;
  }
  auto full = gather_full_weights(experts, g_world);
  for (const auto& [name, p] : single.named_parameters()) {
    expect_close(full.at(name), p.detach(), kTrainedTolerance);
  }
  // Replicated weights are bit for bit the same on every rank.
  for (const auto& [name, p] : experts.named_parameters()) {
    if (name.find(".experts.") != std::string::npos) continue;
    at::Tensor mine = p.detach().clone();
    at::Tensor rank0 = mine.clone();
    g_world->broadcast(rank0, 0).wait();
    EXPECT_TRUE(at::equal(mine, rank0)) << name << " on rank " << me;
  }
}

}  // namespace
}  // namespace tessera::nn

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  tessera::init_runtime();
  tessera::dist::InitOptions options;
  options.group.timeout = std::chrono::seconds(120);
  tessera::nn::g_world = tessera::dist::init_process_group(options);
  int result = tessera::testutil::run_all_tests();
  tessera::nn::g_world->barrier().wait();
  tessera::nn::g_world.reset();
  return result;
}
