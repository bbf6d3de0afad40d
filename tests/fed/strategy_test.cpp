// The three strategies, driven directly (no runtime): what they send, what
// they ask back, how they aggregate.
#include "tessera/fed/strategy.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <set>

#include "tessera/core/error.h"
#include "tessera/fed/experiment.h"
#include "tessera/nn/model.h"

namespace tessera::fed {
namespace {

nn::ModelConfig tiny_config() {
  nn::ModelConfig c = small_fed_config(40);
  c.hidden_size = 16;
  c.intermediate_size = 24;
  c.num_attention_heads = 2;
  c.num_key_value_heads = 1;
  return c;
}

TensorMap random_model(uint64_t seed) {
  nn::Transformer model(tiny_config());
  model.init_random(seed);
  TensorMap m;
  for (const auto& [n, t] : model.named_parameters()) m[n] = t.detach().clone();
  return m;
}

double max_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a - b).abs().max().item<double>();
}

TEST(Sampling, FractionMinimumAndDeterminism) {
  const std::vector<int> avail = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9};
  std::mt19937_64 rng(5);
  EXPECT_EQ(sample_clients(avail, 1.0, 1, rng), avail);
  std::mt19937_64 a(11), b(11);
  const std::vector<int> s1 = sample_clients(avail, 0.25, 1, a);
  EXPECT_EQ(s1.size(), 3u);  // ceil(2.5)
  EXPECT_EQ(s1, sample_clients(avail, 0.25, 1, b));
  EXPECT_EQ(std::set<int>(s1.begin(), s1.end()).size(), 3u);
  EXPECT_TRUE(std::is_sorted(s1.begin(), s1.end()));
  EXPECT_EQ(sample_clients(avail, 0.1, 4, a).size(), 4u);
  EXPECT_EQ(sample_clients({3, 4}, 0.1, 4, a), (std::vector<int>{3, 4}));
  EXPECT_TRUE(sample_clients({}, 0.5, 1, a).empty());
  EXPECT_THROW(sample_clients(avail, 0.0, 1, a), InvalidArgument);
  EXPECT_THROW(sample_clients(avail, 1.5, 1, a), InvalidArgument);
  // Over many draws every client is picked about equally often.
  std::vector<int> hits(10, 0);
  for (int i = 0; i < 2000; ++i) {
    for (int c : sample_clients(avail, 0.3, 1, a)) ++hits[c];
  }
  for (int h : hits) EXPECT_NEAR(h, 600, 90);
}

// Fit results of `clients` clients trained from `base`: every parameter
// perturbed differently per client, except the routers, which are the same
// for all (as when every client holds the same data and trains the same way).
std::vector<FitResult> same_data_results(const TensorMap& base, int clients, int64_t examples) {
  std::vector<FitResult> out;
  const ModelPartition p = partition_parameters([&] {
    std::vector<std::string> n;
    for (const auto& [k, v] : base) n.push_back(k);
    return n;
  }());
  at::manual_seed(17);
  TensorMap router_update;
  for (const auto& [layer, name] : p.routers)
    router_update[name] = at::randn(base.at(name).sizes());
  for (int c = 0; c < clients; ++c) {
    FitResult r;
    r.client = c;
    r.num_examples = examples;
    for (const auto& [name, t] : base) {
      r.tensors[name] =
          router_update.count(name) ? t + router_update.at(name) : t + at::randn(t.sizes());
    }
    out.push_back(r);
  }
  return out;
}

// Client c's personalised experts from a FedMoE-DA strategy's mixes.
TensorMap personalise(const FedMoEDA& s, int client, const std::vector<FitResult>& results) {
  TensorMap out;
  const ModelPartition& p = s.partition();
  for (const ExpertMix& mix : s.mixes_for(client)) {
    std::vector<TensorMap> holders;
    std::vector<double> weights;
    for (const ExpertSource& src : mix.sources) {
      TensorMap h;
      for (const std::string& name : p.expert(mix.layer, src.expert)) {
        h[parse_expert_parameter(name)->suffix] = results.at(src.owner).tensors.at(name);
      }
      holders.push_back(h);
      weights.push_back(src.weight);
    }
    std::vector<std::pair<double, const TensorMap*>> sources;
    for (size_t k = 0; k < holders.size(); ++k) sources.emplace_back(weights[k], &holders[k]);
    const TensorMap mixed = mix_experts(sources);
    for (const std::string& name : p.expert(mix.layer, mix.expert)) {
      out[name] = mixed.at(parse_expert_parameter(name)->suffix);
    }
  }
  return out;
}

TEST(FedMoEDA, EqualsFedAvgWhenClientsShareDataAndPCoversAllCopies) {
  const TensorMap initial = random_model(1);
  const int C = 3;
  const std::vector<FitResult> results = same_data_results(initial, C, 1000);
  std::mt19937_64 rng(0);

  FedAvg avg;
  avg.initialize(initial);
  avg.configure_fit(1, {0, 1, 2}, rng);
  avg.aggregate_fit(1, results, {});

  FedMoEDAOptions o;
  o.domain_aware.scope = DomainAwareOptions::Scope::kSameExpert;
  o.domain_aware.neighbours = C - 1;  // every other client's copy of the expert
  o.domain_aware.temperature = 0.3;
  FedMoEDA da(o);
  da.initialize(initial);
  const auto fit = da.configure_fit(1, {0, 1, 2}, rng);
  ASSERT_EQ(fit.size(), 3u);
  EXPECT_TRUE(fit[0].payload.mixes.empty());  // no matrix before round 1's routers
  da.aggregate_fit(1, results, {});
  EXPECT_EQ(da.refreshed_round(), 1);

  // Shared parts: the same weighted average.
  for (const std::string& name : da.partition().shared) {
    EXPECT_LT(max_diff(da.shared().at(name), avg.global().at(name)), 1e-6) << name;
  }
  // Experts: every client's personalised experts equal FedAvg's.
  for (int c = 0; c < C; ++c) {
    const TensorMap mine = personalise(da, c, results);
    ASSERT_EQ(mine.size(), da.partition().expert_names().size());
    for (const auto& [name, t] : mine)
      EXPECT_LT(max_diff(t, avg.global().at(name)), 1e-6) << "client " << c << " " << name;
  }

  // Over all (client, expert) pairs the same P mixes different experts of
  // the layer, which FedAvg never does.
  o.domain_aware.scope = DomainAwareOptions::Scope::kAllExperts;
  o.domain_aware.neighbours = C * 4 - 1;
  FedMoEDA all(o);
  all.initialize(initial);
  all.configure_fit(1, {0, 1, 2}, rng);
  all.aggregate_fit(1, results, {});
  double worst = 0;
  for (const auto& [name, t] : personalise(all, 0, results))
    worst = std::max(worst, max_diff(t, avg.global().at(name)));
  EXPECT_GT(worst, 1e-2);
}

TEST(FedMoEDA, SendsSharedPartsAndMatrixRowsOnly) {
  const TensorMap initial = random_model(2);
  FedMoEDAOptions o;
  o.domain_aware.neighbours = 2;
  FedMoEDA da(o);
  da.initialize(initial);
  std::mt19937_64 rng(0);
  // What the server lets through: the shared parts the instruction asked for.
  std::vector<FitResult> results = same_data_results(initial, 4, 10);
  for (FitResult& r : results) {
    for (const std::string& n : da.partition().expert_names()) r.tensors.erase(n);
  }
  da.aggregate_fit(1, results, {});
  const auto fit = da.configure_fit(2, {0, 1, 2, 3}, rng);
  ASSERT_EQ(fit.size(), 4u);
  for (const FitInstruction& in : fit) {
    EXPECT_EQ(in.payload.version, 1);
    for (const auto& [name, t] : in.payload.tensors)
      EXPECT_FALSE(parse_expert_parameter(name)) << name;
    EXPECT_EQ(in.payload.tensors.size(), da.partition().shared.size());
    EXPECT_EQ(in.upload, da.partition().shared);
    // One row per own expert and MoE layer, P + 1 entries, self first.
    ASSERT_EQ(in.payload.mixes.size(), 8u);
    for (const ExpertMix& m : in.payload.mixes) {
      ASSERT_EQ(m.sources.size(), 3u);
      EXPECT_EQ(m.sources[0].owner, in.client);
      EXPECT_EQ(m.sources[0].expert, m.expert);
    }
  }
  // Bootstrap: the whole model, experts from the initial model.
  const TensorMap boot = da.bootstrap(3);
  EXPECT_EQ(boot.size(), initial.size());
  const std::string e = da.partition().expert(0, 1)[0];
  EXPECT_EQ(max_diff(boot.at(e), initial.at(e)), 0.0);
  // The server's fallback copy of an expert is the initial one, round 0.
  auto copy = da.expert_copy(2, 1, 3);
  ASSERT_TRUE(copy);
  EXPECT_EQ(copy->round, 0);
  EXPECT_EQ(max_diff(copy->tensors.at("w2.weight"),
                     initial.at("model.layers.1.block_sparse_moe.experts.3.w2.weight")),
            0.0);
  EXPECT_FALSE(da.expert_copy(2, 5, 0));
}

TEST(FedMoEDA, RefreshesEveryIRoundsAndKeepsBackups) {
  const TensorMap initial = random_model(3);
  FedMoEDAOptions o;
  o.refresh_every = 2;
  o.expert_backup_every = 3;
  FedMoEDA da(o);
  da.initialize(initial);
  std::mt19937_64 rng(0);
  std::vector<int64_t> refreshed;
  at::Tensor previous;
  for (int64_t r = 1; r <= 5; ++r) {
    const auto fit = da.configure_fit(r, {0, 1}, rng);
    const bool backup = r % 3 == 0;
    EXPECT_EQ(fit[0].upload.size(),
              da.partition().shared.size() + (backup ? da.partition().expert_names().size() : 0))
        << "round " << r;
    std::vector<FitResult> results;
    for (const FitInstruction& in : fit) {
      FitResult res{in.client, {}, 10, {}};
      for (const std::string& n : in.upload)
        res.tensors[n] = initial.at(n) + at::randn(initial.at(n).sizes());
      results.push_back(res);
    }
    da.aggregate_fit(r, results, {});
    refreshed.push_back(da.refreshed_round());
    const at::Tensor sim = da.neighbours().at(0).similarity;
    if (r % 2 == 0) {
      EXPECT_TRUE(sim.is_same(previous)) << "round " << r << " recomputed the matrix";
    } else if (previous.defined()) {
      EXPECT_FALSE(sim.is_same(previous)) << "round " << r << " kept the old matrix";
    }
    previous = sim;
    if (backup) {
      auto copy = da.expert_copy(1, 0, 2);
      ASSERT_TRUE(copy);
      EXPECT_EQ(copy->round, r);
      EXPECT_EQ(
          max_diff(copy->tensors.at("w1.weight"),
                   results[1].tensors.at("model.layers.0.block_sparse_moe.experts.2.w1.weight")),
          0.0);
    }
  }
  EXPECT_EQ(refreshed, (std::vector<int64_t>{1, 1, 3, 3, 5}));
  EXPECT_THROW(FedMoEDA(FedMoEDAOptions{{}, {}, {}, {}, 0, 0}), InvalidArgument);
}

TEST(Strategies, FailuresAndEmptyRoundsKeepTheState) {
  const TensorMap initial = random_model(4);
  for (const char* name : {"fedavg", "local_experts", "fedmoe_da"}) {
    auto s = make_strategy(name, {});
    s->initialize(initial);
    std::mt19937_64 rng(0);
    s->configure_fit(1, {0, 1}, rng);
    s->aggregate_fit(1, {}, {{0, "no heartbeat"}, {1, "died"}});
    const TensorMap boot = s->bootstrap(0);
    for (const auto& [n, t] : initial) EXPECT_EQ(max_diff(boot.at(n), t), 0.0) << name << " " << n;
    const EvaluateSummary none = s->aggregate_evaluate(1, {}, {{0, "x"}});
    EXPECT_EQ(none.num_examples, 0);
    EXPECT_TRUE(std::isnan(none.loss));
    const EvaluateSummary two = s->aggregate_evaluate(1, {{0, 10, 2.0, {}}, {1, 30, 4.0, {}}}, {});
    EXPECT_DOUBLE_EQ(two.loss, 3.5);
  }
  EXPECT_THROW(make_strategy("fedprox", {}), InvalidArgument);
}

TEST(Strategies, WhatEachSendsAndAsksBack) {
  const TensorMap initial = random_model(5);
  std::mt19937_64 rng(0);
  FedAvg avg;
  avg.initialize(initial);
  const auto a = avg.configure_fit(1, {0}, rng);
  EXPECT_EQ(a[0].payload.tensors.size(), initial.size());
  EXPECT_EQ(a[0].upload.size(), initial.size());
  LocalExperts local;
  local.initialize(initial);
  const auto l = local.configure_fit(1, {0}, rng);
  EXPECT_EQ(l[0].payload.tensors.size(), local.partition().shared.size());
  EXPECT_EQ(l[0].upload, local.partition().shared);
  EXPECT_TRUE(l[0].payload.mixes.empty());
  // A dense model has no experts to keep local.
  nn::ModelConfig dense = tiny_config();
  dense.model_type = "llama";
  dense.num_experts = 0;
  nn::Transformer m(dense);
  TensorMap dense_weights;
  for (const auto& [n, t] : m.named_parameters()) dense_weights[n] = t;
  EXPECT_THROW(LocalExperts().initialize(dense_weights), InvalidArgument);
  EXPECT_THROW(FedMoEDA().initialize(dense_weights), InvalidArgument);
}

}  // namespace
}  // namespace tessera::fed
