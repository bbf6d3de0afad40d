// The arithmetic of tessera/fed/aggregation.h against direct computations.
#include "tessera/fed/aggregation.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "tessera/core/error.h"
#include "tessera/fed/experiment.h"
#include "tessera/nn/model.h"

namespace tessera::fed {
namespace {

std::vector<std::string> model_names(const nn::ModelConfig& cfg) {
  nn::Transformer model(cfg);
  std::vector<std::string> names;
  for (const auto& [n, t] : model.named_parameters()) names.push_back(n);
  return names;
}

TEST(Partition, SplitsMixtralIntoSharedAndExperts) {
  const nn::ModelConfig cfg = small_fed_config(257);
  const std::vector<std::string> names = model_names(cfg);
  const ModelPartition p = partition_parameters(names);
  EXPECT_EQ(p.num_experts, 4);
  EXPECT_EQ(p.moe_layers(), (std::vector<int64_t>{0, 1}));
  EXPECT_EQ(p.routers.at(1), "model.layers.1.block_sparse_moe.gate.weight");
  ASSERT_EQ(p.experts.size(), 8u);
  EXPECT_EQ(p.expert(1, 3),
            (std::vector<std::string>{"model.layers.1.block_sparse_moe.experts.3.w1.weight",
                                      "model.layers.1.block_sparse_moe.experts.3.w3.weight",
                                      "model.layers.1.block_sparse_moe.experts.3.w2.weight"}));
  // Every name lands in exactly one part; routers are shared.
  EXPECT_EQ(p.shared.size() + p.expert_names().size(), names.size());
  EXPECT_NE(std::find(p.shared.begin(), p.shared.end(), p.routers.at(0)), p.shared.end());
  for (const std::string& n : p.shared) EXPECT_FALSE(parse_expert_parameter(n)) << n;
  std::vector<std::string> all = p.all_names(), sorted_names = names;
  std::sort(all.begin(), all.end());
  std::sort(sorted_names.begin(), sorted_names.end());
  EXPECT_EQ(all, sorted_names);

  auto e = parse_expert_parameter("model.layers.12.mlp.experts.7.gate_proj.weight");
  ASSERT_TRUE(e);
  EXPECT_EQ(e->layer, 12);
  EXPECT_EQ(e->expert, 7);
  EXPECT_EQ(e->suffix, "gate_proj.weight");
  EXPECT_FALSE(parse_expert_parameter("model.layers.1.mlp.shared_expert.gate_proj.weight"));
  EXPECT_EQ(parse_router_parameter("model.layers.3.mlp.gate.weight"), 3);
  EXPECT_FALSE(parse_router_parameter("model.layers.3.mlp.shared_expert_gate.weight"));
}

TEST(Partition, RefusesInconsistentExperts) {
  const std::string p = "model.layers.0.block_sparse_moe.";
  // No router.
  EXPECT_THROW(partition_parameters({p + "experts.0.w1.weight"}), InvalidArgument);
  // A hole in the expert indices.
  EXPECT_THROW(partition_parameters(
                   {p + "gate.weight", p + "experts.0.w1.weight", p + "experts.2.w1.weight"}),
               InvalidArgument);
  // Experts with different parameters.
  EXPECT_THROW(partition_parameters(
                   {p + "gate.weight", p + "experts.0.w1.weight", p + "experts.1.w2.weight"}),
               InvalidArgument);
  // Fine.
  const ModelPartition ok = partition_parameters(
      {"x", p + "gate.weight", p + "experts.0.w1.weight", p + "experts.1.w1.weight"});
  EXPECT_EQ(ok.num_experts, 2);
  EXPECT_EQ(ok.shared, (std::vector<std::string>{"x", p + "gate.weight"}));
}

TEST(WeightedAverage, MatchesDirectSum) {
  at::manual_seed(1);
  std::vector<TensorMap> maps(3);
  for (auto& m : maps) {
    m["a"] = at::randn({4, 5});
    m["b"] = at::randn({7});
    m["unused"] = at::randn({2});
  }
  const std::vector<double> w = {100, 300, 50};
  const TensorMap avg = weighted_average({&maps[0], &maps[1], &maps[2]}, w, {"a", "b"});
  ASSERT_EQ(avg.size(), 2u);
  for (const char* name : {"a", "b"}) {
    const at::Tensor& got = avg.at(name);
    EXPECT_EQ(got.scalar_type(), at::kFloat);
    const int64_t n = got.numel();
    for (int64_t i = 0; i < n; ++i) {
      double direct = 0;
      for (int k = 0; k < 3; ++k) direct += w[k] * maps[k].at(name).reshape(-1)[i].item<double>();
      direct /= 450.0;
      EXPECT_NEAR(got.reshape(-1)[i].item<double>(), direct, 1e-6) << name << "[" << i << "]";
    }
  }
  EXPECT_THROW(weighted_average({&maps[0]}, {0.0}, {"a"}), InvalidArgument);
  EXPECT_THROW(weighted_average({&maps[0], &maps[1]}, {1.0}, {"a"}), InvalidArgument);
  EXPECT_THROW(weighted_average({&maps[0]}, {1.0}, {"missing"}), InvalidArgument);
  TensorMap other = maps[1];
  other["a"] = at::randn({5, 4});
  EXPECT_THROW(weighted_average({&maps[0], &other}, {1.0, 1.0}, {"a"}), InvalidArgument);
}

// The similarity / top-(P+1) / softmax step computed directly: loops over
// plain doubles, a full sort, and exp over the chosen set.
struct DirectNeighbour {
  int client;
  int64_t expert;
  double similarity, weight;
};
std::vector<std::vector<DirectNeighbour>> direct_neighbours(const std::vector<int>& clients,
                                                            const std::vector<at::Tensor>& routers,
                                                            int64_t P, double tau,
                                                            bool same_expert) {
  const int64_t E = routers[0].size(0), H = routers[0].size(1);
  std::vector<std::vector<double>> g;
  for (const at::Tensor& r : routers) {
    const at::Tensor d = r.to(at::kDouble).contiguous();
    for (int64_t e = 0; e < E; ++e) {
      std::vector<double> row(static_cast<size_t>(H));
      for (int64_t h = 0; h < H; ++h) row[static_cast<size_t>(h)] = d[e][h].item<double>();
      g.push_back(row);
    }
  }
  const int64_t n = static_cast<int64_t>(g.size());
  auto cosine = [&](int64_t i, int64_t j) {
    if (i == j) return 1.0;
    double dot = 0, ni = 0, nj = 0;
    for (int64_t h = 0; h < H; ++h) {
      dot += g[i][h] * g[j][h];
      ni += g[i][h] * g[i][h];
      nj += g[j][h] * g[j][h];
    }
    return dot / (std::sqrt(ni) * std::sqrt(nj));
  };
  std::vector<std::vector<DirectNeighbour>> rows;
  for (int64_t i = 0; i < n; ++i) {
    std::vector<std::pair<double, int64_t>> cand;
    for (int64_t j = 0; j < n; ++j) {
      if (j == i || (same_expert && j % E != i % E)) continue;
      cand.push_back({-cosine(i, j), j});  // ascending: largest similarity, then lowest index
    }
    std::sort(cand.begin(), cand.end());
    std::vector<int64_t> chosen = {i};
    for (size_t k = 0; k < cand.size() && static_cast<int64_t>(k) < P; ++k)
      chosen.push_back(cand[k].second);
    double z = 0;
    for (int64_t j : chosen) z += std::exp(cosine(i, j) / tau);
    std::vector<DirectNeighbour> row;
    for (int64_t j : chosen) {
      row.push_back({clients[static_cast<size_t>(j / E)], j % E, cosine(i, j),
                     std::exp(cosine(i, j) / tau) / z});
    }
    rows.push_back(row);
  }
  return rows;
}

TEST(DomainNeighbours, MatchesDirectComputation) {
  at::manual_seed(7);
  const std::vector<int> clients = {4, 0, 9};
  std::vector<at::Tensor> routers;
  for (size_t k = 0; k < clients.size(); ++k) routers.push_back(at::randn({4, 6}));
  // A row that duplicates another expert's (a tie broken by index) and one
  // close to it.
  routers[2][1].copy_(routers[0][3]);
  routers[1][2].copy_(routers[0][3] * 2 + 0.01);
  for (bool same : {false, true}) {
    for (int64_t P : {0, 1, 3, 11, 50}) {
      for (double tau : {0.05, 0.5, 2.0}) {
        DomainAwareOptions o;
        o.neighbours = P;
        o.temperature = tau;
        o.scope =
            same ? DomainAwareOptions::Scope::kSameExpert : DomainAwareOptions::Scope::kAllExperts;
        const LayerNeighbours got = domain_neighbours(clients, routers, o);
        const auto want = direct_neighbours(clients, routers, P, tau, same);
        ASSERT_EQ(got.rows.size(), want.size());
        EXPECT_EQ(got.similarity.sizes(), (std::vector<int64_t>{12, 12}));
        for (size_t i = 0; i < want.size(); ++i) {
          const std::string where = "row " + std::to_string(i) + " P=" + std::to_string(P) +
                                    " tau=" + std::to_string(tau) +
                                    (same ? " same-expert" : " all");
          ASSERT_EQ(got.rows[i].size(), want[i].size()) << where;
          double sum = 0;
          for (size_t k = 0; k < want[i].size(); ++k) {
            EXPECT_EQ(got.rows[i][k].client, want[i][k].client) << where << " entry " << k;
            EXPECT_EQ(got.rows[i][k].expert, want[i][k].expert) << where << " entry " << k;
            EXPECT_NEAR(got.rows[i][k].similarity, want[i][k].similarity, 1e-12) << where;
            EXPECT_NEAR(got.rows[i][k].weight, want[i][k].weight, 1e-12) << where;
            sum += got.rows[i][k].weight;
          }
          EXPECT_NEAR(sum, 1.0, 1e-12) << where;
          // The expert itself comes first.
          EXPECT_EQ(got.rows[i][0].client, clients[i / 4]);
          EXPECT_EQ(got.rows[i][0].expert, static_cast<int64_t>(i % 4));
        }
      }
    }
  }
  // row() finds rows by client id.
  const LayerNeighbours l = domain_neighbours(clients, routers, {});
  EXPECT_EQ(l.row(9, 2)[0].client, 9);
  EXPECT_EQ(l.row(9, 2)[0].expert, 2);
  EXPECT_THROW(l.row(5, 0), NotFound);
}

TEST(DomainNeighbours, RefusesBadInput) {
  const at::Tensor r = at::randn({4, 6});
  DomainAwareOptions o;
  EXPECT_THROW(domain_neighbours({}, {}, o), InvalidArgument);
  EXPECT_THROW(domain_neighbours({1, 1}, {r, r}, o), InvalidArgument);
  EXPECT_THROW(domain_neighbours({1, 2}, {r, at::randn({3, 6})}, o), InvalidArgument);
  o.temperature = 0;
  EXPECT_THROW(domain_neighbours({1}, {r}, o), InvalidArgument);
  o.temperature = 1;
  o.neighbours = -1;
  EXPECT_THROW(domain_neighbours({1}, {r}, o), InvalidArgument);
}

TEST(MixExperts, MatchesDirectSum) {
  at::manual_seed(3);
  TensorMap a = {{"w1.weight", at::randn({3, 4})}, {"w2.weight", at::randn({4, 3})}};
  TensorMap b = {{"w1.weight", at::randn({3, 4})}, {"w2.weight", at::randn({4, 3})}};
  const TensorMap m = mix_experts({{0.25, &a}, {0.75, &b}});
  for (const char* k : {"w1.weight", "w2.weight"}) {
    EXPECT_TRUE(at::allclose(m.at(k), a.at(k) * 0.25 + b.at(k) * 0.75, 1e-6, 1e-6)) << k;
  }
  TensorMap c = {{"w1.weight", at::randn({3, 4})}};
  EXPECT_THROW(mix_experts({{0.5, &a}, {0.5, &c}}), InvalidArgument);
}

}  // namespace
}  // namespace tessera::fed
