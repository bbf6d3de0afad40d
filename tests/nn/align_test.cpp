// SFT and DPO: batches, the loss against direct double-precision
// computations (value and gradient), the reference of adapter policies, a
// toy preference set that DPO learns (LoRA, MoS, full fine-tuning), and data
// parallelism (two ranks as threads) against one rank on the global batch.
#include "tessera/nn/align.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>
#include <thread>
#include <vector>

#include "tessera/core/error.h"
#include "tessera/dist/rendezvous.h"
#include "tessera/lora/lora.h"
#include "test_main.h"

namespace tessera::nn {
namespace {

ModelConfig tiny_config() {
  ModelConfig c;
  c.vocab_size = 37;
  c.hidden_size = 32;
  c.intermediate_size = 64;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  return c;
}

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

TEST(ResponseBatch, PadsMasksAndTruncatesThePromptFromTheLeft) {
  auto b = make_response_batch({{1, 2, 3}, {4}}, {{5, 6}, {7, 8, 9}}, {.pad_id = 0});
  EXPECT_TRUE(
      at::equal(b.input_ids, at::tensor({1, 2, 3, 5, 6, 4, 7, 8, 9, 0}, at::kLong).view({2, 5})));
  EXPECT_TRUE(at::equal(b.response_mask,
                        at::tensor({0, 0, 0, 1, 1, 0, 1, 1, 1, 0}, at::kFloat).view({2, 5})));
  auto t = make_response_batch({{1, 2, 3}}, {{5, 6}}, {.pad_id = 0, .max_length = 3});
  EXPECT_TRUE(at::equal(t.input_ids, at::tensor({3, 5, 6}, at::kLong).view({1, 3})));
  EXPECT_THROW(make_response_batch({{1}}, {{2, 3}}, {.pad_id = 0, .max_length = 2}),
               InvalidArgument);
  EXPECT_THROW(make_response_batch({{1}}, {{}}), InvalidArgument);
  EXPECT_THROW(make_response_batch({{1}}, {{2}, {3}}), InvalidArgument);
  EXPECT_THROW(make_response_batch({}, {}), InvalidArgument);
}

TEST(SftBatch, LossIsTheMeanCrossEntropyOverResponseTokensOnly) {
  Transformer model(tiny_config());
  model.init_random(1);
  std::vector<SftExample> ex = {{{1, 2, 3, 4}, {5, 6}}, {{7, 8}, {9, 10, 11}}};
  auto batch = make_sft_batch(ex, {.pad_id = 0});
  EXPECT_EQ((batch.labels != -100).sum().item<int64_t>(), 5);
  double got = model.loss(batch.input_ids, batch.labels).ce.item<double>();
  // Direct: each example alone, -log p of each response token, averaged.
  double total = 0;
  int count = 0;
  for (const auto& e : ex) {
    std::vector<int64_t> row = e.prompt;
    row.insert(row.end(), e.response.begin(), e.response.end());
    at::Tensor ids = at::tensor(row, at::kLong).view({1, -1});
    at::Tensor logp = at::log_softmax(model.forward(ids).logits.to(at::kDouble), -1);
    for (size_t j = e.prompt.size(); j < row.size(); ++j, ++count) {
      total -= logp[0][static_cast<int64_t>(j) - 1][row[j]].item<double>();
    }
  }
  EXPECT_NEAR(got, total / count, 1e-5);
}

// The DPO loss and its gradient in the logits, from random logits in
// float64, against plain loops: log-softmax by hand, the loss by its
// formula, and the gradient by its closed form
//   dL/dlogits[row, j-1, v] = +-(1/B) beta (eps sigmoid(h) - (1-eps) sigmoid(-h)) (1[v = tok] -
//   p_v)
// (+ on chosen rows, - on rejected ones) at response tokens, 0 elsewhere.
TEST(DpoLoss, ValueAndLogitGradientMatchADirectDoublePrecisionComputation) {
  const int64_t B = 3, L = 7, V = 11;
  for (double eps : {0.0, 0.1}) {
    SCOPED_TRACE(eps);
    const double beta = 0.1;
    auto gen = at::make_generator<at::CPUGeneratorImpl>(7);
    at::Tensor logits = (3 * at::randn({2 * B, L - 1, V}, gen, at::kDouble)).requires_grad_(true);
    at::Tensor ids = at::randint(0, V, {2 * B, L}, gen, at::kLong);
    at::Tensor mask = at::zeros({2 * B, L}, at::kFloat);
    for (int64_t r = 0; r < 2 * B; ++r) {
      for (int64_t j = 2 + r % 3; j < L - (r % 2); ++j) mask[r][j] = 1;
    }
    at::Tensor ref = at::randn({2 * B}, gen, at::kDouble) * 4 - 20;
    at::Tensor sums = response_logprob_sums(logits, ids, mask);
    DpoLoss d = dpo_loss(sums.narrow(0, 0, B), sums.narrow(0, B, B), ref.narrow(0, 0, B),
                         ref.narrow(0, B, B), beta, eps);
    d.loss.backward();

    at::Tensor plain = logits.detach();
    auto lg = plain.accessor<double, 3>();
    auto id = ids.accessor<int64_t, 2>();
    auto m = mask.accessor<float, 2>();
    std::vector<double> s(2 * B, 0.0);
    std::vector<std::vector<std::vector<double>>> prob(2 * B);
    for (int64_t r = 0; r < 2 * B; ++r) {
      prob[r].assign(L - 1, std::vector<double>(V));
      for (int64_t j = 0; j < L - 1; ++j) {
        double mx = -1e300, z = 0;
        for (int64_t v = 0; v < V; ++v) mx = std::max(mx, lg[r][j][v]);
        for (int64_t v = 0; v < V; ++v) z += std::exp(lg[r][j][v] - mx);
        for (int64_t v = 0; v < V; ++v) prob[r][j][v] = std::exp(lg[r][j][v] - mx) / z;
        if (m[r][j + 1] > 0) s[r] += lg[r][j][id[r][j + 1]] - mx - std::log(z);
      }
    }
    double loss = 0, margin = 0;
    std::vector<double> coef(2 * B, 0.0);
    for (int64_t i = 0; i < B; ++i) {
      const double diff = (s[i] - ref[i].item<double>()) - (s[B + i] - ref[B + i].item<double>());
      const double h = beta * diff;
      loss += -(1 - eps) * std::log(sigmoid(h)) - eps * std::log(sigmoid(-h));
      margin += diff;
      const double g = beta * (eps * sigmoid(h) - (1 - eps) * sigmoid(-h)) / B;
      coef[i] = g;
      coef[B + i] = -g;
    }
    EXPECT_NEAR(d.loss.item<double>(), loss / B, 1e-12);
    EXPECT_NEAR(d.margin, margin / B, 1e-10);
    for (int64_t i = 0; i < B; ++i) EXPECT_NEAR(sums[i].item<double>(), s[i], 1e-10);
    at::Tensor logit_grad = logits.grad();
    auto grad = logit_grad.accessor<double, 3>();
    double worst = 0;
    for (int64_t r = 0; r < 2 * B; ++r) {
      for (int64_t j = 0; j < L - 1; ++j) {
        for (int64_t v = 0; v < V; ++v) {
          const double want =
              m[r][j + 1] > 0 ? coef[r] * ((v == id[r][j + 1] ? 1.0 : 0.0) - prob[r][j][v]) : 0.0;
          worst = std::max(worst, std::abs(grad[r][j][v] - want));
        }
      }
    }
    EXPECT_LT(worst, 1e-14);
  }
}

TEST(DpoLoss, RejectsBadArguments) {
  at::Tensor a = at::zeros({2}, at::kDouble);
  EXPECT_THROW(dpo_loss(a, a, a, a, 0.0), InvalidArgument);
  EXPECT_THROW(dpo_loss(a, a, a, a, 0.1, 0.5), InvalidArgument);
  EXPECT_THROW(dpo_loss(a, at::zeros({3}, at::kDouble), a, a, 0.1), InvalidArgument);
}

std::vector<PreferencePair> toy_pairs(int64_t count, uint64_t seed) {
  // Prompts are random; the chosen answer is always "3 4 5", the rejected
  // one "6 7 8" (a preference the model can only learn from the pairs).
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  std::vector<PreferencePair> pairs;
  for (int64_t i = 0; i < count; ++i) {
    at::Tensor p = at::randint(10, 37, {3 + i % 3}, gen, at::kLong);
    std::vector<int64_t> prompt(p.data_ptr<int64_t>(), p.data_ptr<int64_t>() + p.numel());
    pairs.push_back({prompt, {3, 4, 5}, {6, 7, 8}});
  }
  return pairs;
}

// The gradient DpoTrainer applies, through a whole model, against the same
// model in float64 with the loss computed by plain loops from its logits.
TEST(DpoTrainer, ModelGradientsMatchADoublePrecisionComputation) {
  ModelConfig c = tiny_config();
  Transformer policy(c), reference(c);
  policy.init_random(2);
  reference.init_random(3);
  Transformer policy64(c, {}, at::kDouble), reference64(c, {}, at::kDouble);
  for (const auto& [name, p] : policy.named_parameters()) policy64.load_full(name, p);
  for (const auto& [name, p] : reference.named_parameters()) reference64.load_full(name, p);
  auto batch = make_preference_batch(toy_pairs(4, 9), {.pad_id = 0});
  DpoOptions o;
  o.beta = 0.5;
  o.lr = 0.0;  // keep the weights: only the gradient is compared
  o.min_lr = 0.0;
  o.max_grad_norm = 0.0;
  DpoTrainer trainer(policy, reference, o);
  // Capture the gradients right before the (zero-lr) update clears them.
  at::Tensor ref = trainer.reference_logprobs(batch);
  at::Tensor lp = sequence_logprobs(policy, batch.rows);
  DpoLoss d = dpo_loss(lp.narrow(0, 0, 4), lp.narrow(0, 4, 4), ref.narrow(0, 0, 4),
                       ref.narrow(0, 4, 4), o.beta);
  d.loss.backward();

  policy64.set_requires_grad(true);
  const int64_t L = batch.rows.input_ids.size(1);
  at::Tensor in = batch.rows.input_ids.narrow(1, 0, L - 1);
  at::Tensor pl = at::log_softmax(policy64.forward(in).logits, -1);
  at::Tensor rl;
  {
    at::NoGradGuard g;
    rl = at::log_softmax(reference64.forward(in).logits, -1);
  }
  at::Tensor loss64 = at::zeros({}, at::kDouble);
  auto id = batch.rows.input_ids.accessor<int64_t, 2>();
  auto m = batch.rows.response_mask.accessor<float, 2>();
  std::vector<at::Tensor> s(8);
  std::vector<double> r(8, 0.0);
  for (int64_t row = 0; row < 8; ++row) {
    s[row] = at::zeros({}, at::kDouble);
    for (int64_t j = 1; j < L; ++j) {
      if (m[row][j] == 0) continue;
      s[row] = s[row] + pl[row][j - 1][id[row][j]];
      r[row] += rl[row][j - 1][id[row][j]].item<double>();
    }
  }
  for (int64_t i = 0; i < 4; ++i) {
    at::Tensor h = o.beta * ((s[i] - r[i]) - (s[4 + i] - r[4 + i]));
    loss64 = loss64 - at::log_sigmoid(h) / 4.0;
  }
  loss64.backward();
  EXPECT_NEAR(d.loss.item<double>(), loss64.item<double>(), 1e-5);
  for (int64_t i = 0; i < 8; ++i) EXPECT_NEAR(ref[i].item<double>(), r[i], 1e-4);
  int compared = 0;
  for (const auto& [name, p] : policy.named_parameters()) {
    at::Tensor want = policy64.parameter(name).grad();
    ASSERT_TRUE(p.grad().defined()) << name;
    const double scale = std::max(want.abs().max().item<double>(), 1e-6);
    EXPECT_LT((p.grad().to(at::kDouble) - want).abs().max().item<double>(), 2e-4 * scale) << name;
    ++compared;
  }
  EXPECT_GT(compared, 10);
  // The trainer's own step reports the same loss and leaves lr-0 weights.
  for (const auto& [name, p] : policy.named_parameters()) p.mutable_grad() = at::Tensor();
  auto stats = trainer.step(batch);
  EXPECT_NEAR(stats.loss, loss64.item<double>(), 1e-5);
}

// With an adapter, the reference is the model without it: equal to a model
// that never had one, and the adapter is back afterwards.
TEST(DpoTrainer, AdapterReferenceIsTheBaseModel) {
  Transformer model(tiny_config()), plain(tiny_config());
  model.init_random(4);
  plain.init_random(4);
  auto adapter = lora::make_lora(model, {4, 8, 0.0, false, {"q_proj", "v_proj", "down_proj"}}, 1);
  for (auto& t : adapter->trainable()) {
    at::NoGradGuard g;
    t.normal_(0, 0.2);  // a non-zero adapter, so the two forwards differ
  }
  model.set_adapter(adapter);
  auto batch = make_preference_batch(toy_pairs(3, 2), {.pad_id = 0});
  DpoTrainer trainer(model, DpoOptions{}, nullptr, adapter->trainable());
  at::Tensor ref = trainer.reference_logprobs(batch);
  at::NoGradGuard g;
  at::Tensor want = sequence_logprobs(plain, batch.rows).to(at::kDouble);
  at::Tensor with = sequence_logprobs(model, batch.rows).to(at::kDouble);
  EXPECT_LT((ref - want).abs().max().item<double>(), 1e-5);
  EXPECT_GT((with - want).abs().max().item<double>(), 1e-2);
  EXPECT_EQ(model.adapter(), adapter);
  EXPECT_THROW(DpoTrainer(plain, DpoOptions{}, nullptr, adapter->trainable()), InvalidArgument);
}

struct ToyRun {
  std::vector<DpoStepStats> stats;
  double margin_after = 0;  // policy's margin on held-out pairs after training
};

ToyRun train_toy(const std::string& kind) {
  ModelConfig c = tiny_config();
  Transformer model(c), reference(c);
  model.init_random(5);
  reference.init_random(5);
  std::shared_ptr<lora::Adapter> adapter;
  DpoOptions o;
  o.steps = 40;
  o.warmup = 2;
  o.lr = kind == "full" ? 3e-3 : 6e-2;
  o.min_lr = o.lr / 10;
  std::unique_ptr<DpoTrainer> trainer;
  if (kind == "full") {
    trainer = std::make_unique<DpoTrainer>(model, reference, o);
  } else {
    if (kind == "lora") {
      adapter = lora::make_lora(model, {4, 8, 0.0, false, {"q_proj", "v_proj", "down_proj"}}, 3);
    } else {
      lora::MosConfig m;
      m.target_modules = {"q_proj", "v_proj", "down_proj"};
      m.shards_per_vector = 2;
      m.seed = 3;
      adapter = lora::make_mos(model, m);
    }
    model.set_adapter(adapter);
    trainer = std::make_unique<DpoTrainer>(model, o, nullptr, adapter->trainable());
  }
  auto batch = make_preference_batch(toy_pairs(8, 11), {.pad_id = 0});
  batch.reference_logprobs = trainer->reference_logprobs(batch);
  ToyRun run;
  for (int64_t s = 0; s < o.steps; ++s) run.stats.push_back(trainer->step(batch));
  // Held-out prompts: does the preference generalise beyond the pairs seen?
  auto held = make_preference_batch(toy_pairs(6, 99), {.pad_id = 0});
  at::Tensor ref = trainer->reference_logprobs(held);
  at::NoGradGuard g;
  at::Tensor lp = sequence_logprobs(model, held.rows).to(at::kDouble);
  run.margin_after =
      ((lp.narrow(0, 0, 6) - ref.narrow(0, 0, 6)) - (lp.narrow(0, 6, 6) - ref.narrow(0, 6, 6)))
          .mean()
          .item<double>();
  return run;
}

TEST(DpoTrainer, ToyPreferenceSetWidensTheMarginWithLoraMosAndFullFineTuning) {
  for (const std::string kind : {"lora", "mos", "full"}) {
    SCOPED_TRACE(kind);
    ToyRun run = train_toy(kind);
    // Policy = reference at the start: zero margin, loss log 2.
    EXPECT_NEAR(run.stats.front().margin, 0.0, 1e-5);
    EXPECT_NEAR(run.stats.front().loss, std::log(2.0), 1e-6);
    // beta = 0.1: loss -log sigmoid(0.1 * margin) falls from log 2 = 0.693.
    EXPECT_GT(run.stats.back().margin, 2.0);
    EXPECT_LT(run.stats.back().loss, 0.6);
    // The margin grows step by step (a few noisy steps aside).
    int rises = 0;
    for (size_t s = 1; s < run.stats.size(); ++s)
      rises += run.stats[s].margin > run.stats[s - 1].margin;
    EXPECT_GT(rises, static_cast<int>(run.stats.size()) * 2 / 3);
    EXPECT_EQ(run.stats.back().accuracy, 1.0);
    EXPECT_GT(run.stats.back().chosen_reward, run.stats.back().rejected_reward);
    EXPECT_GT(run.margin_after, 1.0);
  }
}

// Two ranks (threads over an in-memory store), each with half of the pairs,
// against one rank with all of them: the same losses and adapter weights.
TEST(DpoTrainer, DataParallelEqualsOneRankOnTheGlobalBatch) {
  auto pairs = toy_pairs(8, 21);
  auto run = [&](std::shared_ptr<dist::ProcessGroup> dp, int rank, int world) {
    Transformer model(tiny_config());
    model.init_random(6);
    auto adapter = lora::make_lora(model, {4, 8, 0.0, false, {"q_proj", "v_proj"}}, 4);
    model.set_adapter(adapter);
    DpoOptions o;
    o.steps = 4;
    o.warmup = 1;
    o.lr = 1e-2;
    DpoTrainer trainer(model, o, dp, adapter->trainable());
    const int64_t local = static_cast<int64_t>(pairs.size()) / world;
    std::vector<PreferencePair> mine(pairs.begin() + rank * local,
                                     pairs.begin() + (rank + 1) * local);
    auto batch = make_preference_batch(mine, {.pad_id = 0});
    std::vector<double> losses;
    for (int s = 0; s < o.steps; ++s) losses.push_back(trainer.step(batch).loss);
    std::vector<at::Tensor> params;
    for (auto& t : adapter->trainable()) params.push_back(t.detach().clone());
    return std::make_pair(losses, params);
  };
  auto [want, want_params] = run(nullptr, 0, 1);
  auto store = dist::Store::in_memory();
  std::vector<std::pair<std::vector<double>, std::vector<at::Tensor>>> got(2);
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r) {
    threads.emplace_back([&, r] {
      auto group = dist::ProcessGroup::create(store, r, 2);
      got[r] = run(group, r, 2);
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < 2; ++r) {
    for (size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(got[r].first[i], want[i], 1e-5) << i;
    for (size_t i = 0; i < want_params.size(); ++i) {
      EXPECT_LT((got[r].second[i] - want_params[i]).abs().max().item<double>(), 1e-5) << i;
    }
  }
}

}  // namespace
}  // namespace tessera::nn
