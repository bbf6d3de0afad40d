// PPO / GRPO / ReMax arithmetic against direct per-token loops in double on
// fixed inputs, and the 3D-HybridEngine grouping against the paper's
// 8-rank example.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <cmath>

#include "tessera/core/error.h"
#include "tessera/nn/model.h"
#include "tessera/rlhf/algorithms.h"
#include "tessera/rlhf/hybrid_engine.h"
#include "tessera/rlhf/protocol.h"

namespace tessera::rlhf {
namespace {

struct Tokens {
  at::Tensor mask, rewards, values, logp, old_logp, ref_logp, adv;
};

// Three sequences with responses of 5, 3 and 6 tokens, right-padded to 6.
Tokens batch() {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(11);
  Tokens b;
  b.mask = at::zeros({3, 6});
  b.mask[0].narrow(0, 0, 5).fill_(1);
  b.mask[1].narrow(0, 0, 3).fill_(1);
  b.mask[2].fill_(1);
  b.rewards = at::randn({3, 6}, gen) * b.mask;
  b.values = at::randn({3, 6}, gen) * b.mask;
  b.logp = -at::rand({3, 6}, gen) * 2;
  b.old_logp = b.logp + at::randn({3, 6}, gen) * 0.3;
  b.ref_logp = b.logp + at::randn({3, 6}, gen) * 0.2;
  b.adv = at::randn({3, 6}, gen) * b.mask;
  return b;
}

double at2(const at::Tensor& t, int64_t i, int64_t j) { return t[i][j].item<double>(); }

TEST(Gae, MatchesTheRecursionPerSequence) {
  Tokens b = batch();
  const double gamma = 0.99, lam = 0.9;
  Gae g = gae(b.rewards, b.values, b.mask, gamma, lam);
  for (int64_t s = 0; s < 3; ++s) {
    const int64_t len = static_cast<int64_t>(b.mask[s].sum().item<double>());
    double next_v = 0, next_a = 0;
    for (int64_t t = len - 1; t >= 0; --t) {
      const double delta = at2(b.rewards, s, t) + gamma * next_v - at2(b.values, s, t);
      const double a = delta + gamma * lam * next_a;
      EXPECT_NEAR(at2(g.advantages, s, t), a, 1e-5) << s << "," << t;
      EXPECT_NEAR(at2(g.returns, s, t), a + at2(b.values, s, t), 1e-5);
      next_a = a;
      next_v = at2(b.values, s, t);
    }
    for (int64_t t = len; t < 6; ++t) EXPECT_EQ(at2(g.advantages, s, t), 0.0);
  }
  EXPECT_THROW(gae(b.rewards, b.values.narrow(1, 0, 5), b.mask, 1, 1), InvalidArgument);
}

TEST(Ppo, ClippedLossKlAndClipFractionMatchDirectComputation) {
  Tokens b = batch();
  at::Tensor logp = b.logp.clone().requires_grad_(true);
  const double eps = 0.2;
  PolicyLoss pl = ppo_policy_loss(logp, b.old_logp, b.adv, b.mask, eps);
  double sum = 0, n = 0, clipped = 0, kl = 0;
  for (int64_t s = 0; s < 3; ++s) {
    for (int64_t t = 0; t < 6; ++t) {
      if (at2(b.mask, s, t) == 0) continue;
      const double r = std::exp(at2(b.logp, s, t) - at2(b.old_logp, s, t)), a = at2(b.adv, s, t);
      const double u = -a * r, c = -a * std::min(std::max(r, 1 - eps), 1 + eps);
      sum += std::max(u, c);
      clipped += c > u ? 1 : 0;
      kl += at2(b.old_logp, s, t) - at2(b.logp, s, t);
      ++n;
    }
  }
  EXPECT_NEAR(pl.loss.item<double>(), sum / n, 1e-5);
  EXPECT_NEAR(pl.clip_fraction, clipped / n, 1e-6);
  EXPECT_NEAR(pl.approx_kl, kl / n, 1e-5);
  pl.loss.backward();  // differentiable in logp, zero gradient on padding
  EXPECT_TRUE((logp.grad() * (1 - b.mask)).abs().sum().item<double>() == 0);
  EXPECT_GT(logp.grad().abs().sum().item<double>(), 0);
}

TEST(Ppo, ValueLossAndKlEstimators) {
  Tokens b = batch();
  at::Tensor ret = b.values + at::randn({3, 6}) * b.mask;
  at::Tensor v = b.values + 0.5 * at::randn({3, 6});
  const double eps = 0.2;
  double sum = 0, n = 0;
  for (int64_t s = 0; s < 3; ++s) {
    for (int64_t t = 0; t < 6; ++t) {
      if (at2(b.mask, s, t) == 0) continue;
      const double vv = at2(v, s, t), old = at2(b.values, s, t), rr = at2(ret, s, t);
      const double vc = old + std::min(std::max(vv - old, -eps), eps);
      sum += 0.5 * std::max((vv - rr) * (vv - rr), (vc - rr) * (vc - rr));
      ++n;
    }
  }
  EXPECT_NEAR(value_loss(v, b.values, ret, b.mask, eps).item<double>(), sum / n, 1e-5);
  const double d = at2(b.logp, 0, 0) - at2(b.ref_logp, 0, 0);
  EXPECT_NEAR(at2(kl_divergence(b.logp, b.ref_logp, KlEstimator::kK1), 0, 0), d, 1e-6);
  EXPECT_NEAR(at2(kl_divergence(b.logp, b.ref_logp, KlEstimator::kK2), 0, 0), d * d / 2, 1e-6);
  EXPECT_NEAR(at2(kl_divergence(b.logp, b.ref_logp, KlEstimator::kK3), 0, 0), std::exp(-d) + d - 1,
              1e-6);
  EXPECT_TRUE((kl_divergence(b.logp, b.ref_logp, KlEstimator::kK3) >= 0).all().item<bool>());
}

TEST(Rewards, KlPenaltyOnEveryTokenScoreOnTheLast) {
  Tokens b = batch();
  at::Tensor kl = kl_divergence(b.logp, b.ref_logp, KlEstimator::kK1);
  at::Tensor scores = at::tensor({1.0f, -2.0f, 0.5f});
  at::Tensor r = kl_penalized_rewards(scores, kl, b.mask, 0.1);
  const int64_t last[] = {4, 2, 5};
  for (int64_t s = 0; s < 3; ++s) {
    for (int64_t t = 0; t < 6; ++t) {
      double want = at2(b.mask, s, t) ? -0.1 * at2(kl, s, t) : 0.0;
      if (t == last[s]) want += scores[s].item<double>();
      EXPECT_NEAR(at2(r, s, t), want, 1e-6) << s << "," << t;
    }
  }
}

TEST(Grpo, GroupNormalisedAdvantagesAndReMaxBaseline) {
  at::Tensor scores = at::tensor({1.0f, 0.0f, 0.0f, 1.0f, 3.0f, 1.0f, 2.0f, 2.0f});
  at::Tensor mask = at::ones({8, 4});
  mask[1][3] = 0;
  at::Tensor a = grpo_advantages(scores, 4, mask);
  for (int g = 0; g < 2; ++g) {
    double mean = 0, var = 0;
    for (int i = 0; i < 4; ++i) mean += scores[g * 4 + i].item<double>() / 4;
    for (int i = 0; i < 4; ++i) var += std::pow(scores[g * 4 + i].item<double>() - mean, 2) / 3;
    for (int i = 0; i < 4; ++i) {
      const double want = (scores[g * 4 + i].item<double>() - mean) / (std::sqrt(var) + 1e-6);
      EXPECT_NEAR(at2(a, g * 4 + i, 0), want, 1e-5);
    }
  }
  EXPECT_EQ(at2(a, 1, 3), 0.0);  // padding
  EXPECT_NEAR(at2(grpo_advantages(scores, 4, mask, false), 4, 0), 3.0 - 2.0, 1e-6);
  EXPECT_THROW(grpo_advantages(scores, 3, mask), InvalidArgument);
  at::Tensor base = at::full({8}, 1.0f);
  EXPECT_NEAR(at2(remax_advantages(scores, base, mask), 4, 2), 2.0, 1e-6);
}

TEST(HybridEngine, PaperExampleEightRanks) {
  // Training 1-4-2 (p-t-d), generation 1-2-2-2 (p_g-t_g-d_g-d).
  HybridEngineGroups g = hybrid_engine_groups(8, 4, 2);
  EXPECT_EQ(g.micro_dp, 2);
  EXPECT_EQ(g.gen_tp_groups, (std::vector<std::vector<int>>{{0, 2}, {1, 3}, {4, 6}, {5, 7}}));
  EXPECT_EQ(g.micro_dp_groups, (std::vector<std::vector<int>>{{0, 1}, {2, 3}, {4, 5}, {6, 7}}));
  // Rank 2 is generation tp rank 1 and holds training shards 2, 3 after
  // gathering in micro-DP group {2, 3}.
  EXPECT_EQ(g.gen_tp_rank(2), 1);
  EXPECT_EQ(g.first_train_shard(2), 2);
  EXPECT_EQ(g.micro_dp_groups[g.micro_dp_group_of(2)], (std::vector<int>{2, 3}));
  EXPECT_EQ(g.gen_tp_rank(1), 0);
  EXPECT_EQ(g.first_train_shard(5), 0);
  // Each rank receives (d_g - 1) / (t p) of the model: 1/4 here.
  EXPECT_EQ(hybrid_engine_bytes_per_rank(1 << 20, 4, 2), (1 << 20) / 4);
  EXPECT_EQ(hybrid_engine_bytes_per_rank(1 << 20, 4, 4), 0);
  EXPECT_THROW(hybrid_engine_groups(8, 4, 3), InvalidArgument);
  EXPECT_THROW(hybrid_engine_groups(6, 4, 2), InvalidArgument);
}

TEST(LogProbs, TokenLogprobsMatchLogSoftmaxPerPosition) {
  nn::ModelConfig c;
  c.model_type = "llama";
  c.vocab_size = 40;
  c.hidden_size = 32;
  c.intermediate_size = 64;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  nn::Transformer model(c);
  model.init_random(3);
  at::Tensor seq = at::randint(40, {2, 7}, at::kLong);
  at::Tensor lp = token_logprobs(model, seq);
  ASSERT_EQ(lp.sizes(), (std::vector<int64_t>{2, 6}));
  // Position by position: the prefix alone gives the same next-token log-prob.
  for (int64_t j = 0; j < 6; ++j) {
    at::Tensor logits = model.forward(seq.narrow(1, 0, j + 1)).logits;
    at::Tensor want = at::log_softmax(logits.select(1, j), -1);
    for (int64_t b = 0; b < 2; ++b) {
      EXPECT_NEAR(lp[b][j].item<double>(), want[b][seq[b][j + 1].item<int64_t>()].item<double>(),
                  1e-5);
    }
  }
  EXPECT_THROW(token_logprobs(model, seq.narrow(1, 0, 1)), InvalidArgument);
  EXPECT_EQ(arithmetic_reward("85", " 85\n"), 1.0);
  EXPECT_EQ(arithmetic_reward("85", " 58"), 0.0);
  EXPECT_EQ(arithmetic_reward("-3", "-3 and more"), 1.0);
}

// A worker's computation in these tests: every tensor doubled, plus a tag
// of which worker ran it.
Batch work(const Batch& in, int worker) {
  Batch out;
  for (const auto& [name, t] : in) out[name] = t * 2;
  out["worker"] = at::full({batch_rows(in)}, worker, at::kLong);
  return out;
}

std::vector<Batch> run_all(const Dispatched& d) {
  std::vector<Batch> results;
  for (size_t w = 0; w < d.per_worker.size(); ++w)
    results.push_back(work(d.per_worker[w], static_cast<int>(w)));
  return results;
}

TEST(Protocols, DpComputeSplitsPadsAndCollectsFromTpRankZero) {
  const WorkerMesh mesh{4, 2};  // 8 workers
  Batch batch{{"ids", at::arange(30, at::kLong).view({10, 3})},
              {"score", at::arange(10, at::kFloat)}};
  Dispatched d = dispatch(Protocol::kDpCompute, mesh, batch);
  EXPECT_EQ(d.pad, 2);  // 10 rows -> 12 = 4 chunks of 3
  ASSERT_EQ(d.per_worker.size(), 8u);
  for (int w = 0; w < 8; ++w) {
    const int r = mesh.dp_rank(w);
    EXPECT_EQ(batch_rows(d.per_worker[w]), 3);
    // tp peers get the same chunk; chunk r starts at row 3r.
    EXPECT_TRUE(at::equal(d.per_worker[w].at("score"), d.per_worker[r * 2].at("score")));
    if (r < 3) {
      EXPECT_EQ(d.per_worker[w].at("score")[0].item<float>(), 3.0f * r);
    }
  }
  // The padding repeats the last row.
  EXPECT_EQ(d.per_worker[6].at("score")[2].item<float>(), 9.0f);
  Batch out = collect(Protocol::kDpCompute, mesh, run_all(d), d.pad);
  EXPECT_EQ(batch_rows(out), 10);
  EXPECT_TRUE(at::equal(out.at("ids"), batch.at("ids") * 2));
  EXPECT_TRUE(at::equal(out.at("score"), batch.at("score") * 2));
  // Only tp-rank-0 workers' results, in dp order.
  EXPECT_TRUE(at::equal(out.at("worker"), at::tensor({0, 0, 0, 2, 2, 2, 4, 4, 4, 6}, at::kLong)));
  // No padding when dp divides the batch.
  EXPECT_EQ(dispatch(Protocol::kDpCompute, WorkerMesh{2, 1}, batch).pad, 0);
}

TEST(Protocols, OneToAllRankZeroAndAllToAll) {
  const WorkerMesh mesh{1, 3};
  Batch batch{{"x", at::arange(4, at::kFloat)}};
  Dispatched d = dispatch(Protocol::kOneToAll, mesh, batch);
  ASSERT_EQ(d.per_worker.size(), 3u);
  for (const Batch& b : d.per_worker) EXPECT_TRUE(at::equal(b.at("x"), batch.at("x")));
  Batch all = collect(Protocol::kOneToAll, mesh, run_all(d));
  EXPECT_EQ(batch_rows(all), 12);
  EXPECT_EQ(all.at("worker")[11].item<int64_t>(), 2);
  Batch zero =
      collect(Protocol::kRankZero, mesh, run_all(dispatch(Protocol::kRankZero, mesh, batch)));
  EXPECT_TRUE(at::equal(zero.at("worker"), at::zeros({4}, at::kLong)));
  std::vector<Batch> inputs{{{"x", at::ones({1})}}, {{"x", at::ones({2})}}, {{"x", at::ones({3})}}};
  Dispatched a = dispatch(Protocol::kAllToAll, mesh, {}, inputs);
  Batch gathered = collect(Protocol::kAllToAll, mesh, run_all(a));
  EXPECT_TRUE(at::equal(gathered.at("worker"), at::tensor({0, 1, 1, 2, 2, 2}, at::kLong)));
  // Bad input is named.
  EXPECT_THROW(dispatch(Protocol::kAllToAll, mesh, {}, {inputs[0]}), InvalidArgument);
  EXPECT_THROW(collect(Protocol::kOneToAll, mesh, {run_all(d)[0]}), InvalidArgument);
  EXPECT_THROW(batch_rows({{"a", at::ones({2})}, {"b", at::ones({3})}}), InvalidArgument);
  EXPECT_THROW(dispatch(Protocol::kDpCompute, mesh, {}), InvalidArgument);
}

}  // namespace
}  // namespace tessera::rlhf
