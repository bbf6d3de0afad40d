// Non-IID domain data: the Dirichlet mixtures, the disjoint split, the
// batches and held-out windows, and the real corpora.
#include "tessera/fed/domains.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <numeric>
#include <set>

#include "tessera/core/error.h"

namespace tessera::fed {
namespace {

// Synthetic corpora: domain d's token i is d * 1000 + i % 1000 (so a
// window tells its domain and position).
std::vector<DomainCorpus> synthetic(int64_t train, int64_t held) {
  std::vector<DomainCorpus> out;
  for (int d = 0; d < kNumDomains; ++d) {
    DomainCorpus c;
    c.domain = static_cast<Domain>(d);
    for (int64_t i = 0; i < train; ++i)
      c.train.push_back(static_cast<int32_t>(d * 1000 + i % 1000));
    for (int64_t i = 0; i < held; ++i)
      c.heldout.push_back(static_cast<int32_t>(d * 1000 + i % 1000));
    out.push_back(c);
  }
  return out;
}

TEST(Dirichlet, SumsToOneWithTheLargestAtHome) {
  std::mt19937_64 rng(1);
  double max_small = 0, max_large = 0;
  const int n = 400;
  for (int i = 0; i < n; ++i) {
    for (double alpha : {0.1, 1.0}) {
      const auto p = dirichlet_mixture(alpha, i % 4, rng);
      EXPECT_NEAR(std::accumulate(p.begin(), p.end(), 0.0), 1.0, 1e-12);
      for (double x : p) EXPECT_GE(x, 0.0);
      EXPECT_EQ(std::max_element(p.begin(), p.end()) - p.begin(), i % 4);
      (alpha < 0.5 ? max_small : max_large) += p[i % 4] / n;
    }
  }
  // E[max of Dirichlet(alpha, 4)]: 0.847 for 0.1 and 0.521 for 1 (by
  // simulation); 400 draws put the means within about +-0.03.
  EXPECT_NEAR(max_small, 0.847, 0.04);
  EXPECT_NEAR(max_large, 0.521, 0.04);
  EXPECT_THROW(dirichlet_mixture(0.0, 0, rng), InvalidArgument);
  EXPECT_THROW(dirichlet_mixture(1.0, 4, rng), InvalidArgument);
}

TEST(DataPlan, ClientsGetDisjointBlocksInTheirProportions) {
  const auto corpora = synthetic(64 * 256, 4096);
  DataPlanOptions o;
  o.clients = 6;
  o.alpha = 1.0;
  o.seed = 3;
  o.tokens_per_client = 8 * 256;
  o.block_tokens = 256;
  const auto plans = plan_client_data(corpora, o);
  ASSERT_EQ(plans.size(), 6u);
  std::array<std::set<int64_t>, kNumDomains> used;
  for (const ClientDataPlan& p : plans) {
    EXPECT_EQ(p.home, p.client % 4);
    EXPECT_FALSE(p.wrapped);
    EXPECT_EQ(std::accumulate(p.block_count.begin(), p.block_count.end(), int64_t{0}), 8);
    for (int d = 0; d < kNumDomains; ++d) {
      EXPECT_NEAR(p.block_count[d], p.mixture[d] * 8, 1.01 + (d == p.home ? 2 : 0))
          << "client " << p.client;
      const auto order = block_order(64, p.seed, d);
      for (int64_t i = 0; i < p.block_count[d]; ++i) {
        EXPECT_TRUE(used[d].insert(order[(p.block_begin[d] + i) % 64]).second)
            << "block given twice, domain " << d << ", client " << p.client;
      }
    }
    // The dataset holds exactly those blocks: count windows by domain.
    const ClientDataset data(corpora, p);
    EXPECT_EQ(data.num_tokens(), 8 * 256);
    std::mt19937_64 rng(p.client);
    const TokenBatch b = data.batch(400, 16, rng);
    EXPECT_EQ(b.input_ids.sizes(), (std::vector<int64_t>{400, 16}));
    EXPECT_TRUE(at::equal(b.input_ids.narrow(1, 1, 15), b.labels.narrow(1, 0, 15)));
    std::array<int, kNumDomains> seen{};
    for (int64_t i = 0; i < 400; ++i) {
      const int64_t first = b.input_ids[i][0].item<int64_t>(),
                    last = b.labels[i][15].item<int64_t>();
      EXPECT_EQ(first / 1000, last / 1000);  // one window, one domain
      ++seen[first / 1000];
    }
    for (int d = 0; d < kNumDomains; ++d) {
      if (p.block_count[d] == 0) {
        EXPECT_EQ(seen[d], 0);
      }
      EXPECT_NEAR(seen[d] / 400.0, p.block_count[d] / 8.0, 0.1)
          << "client " << p.client << " domain " << d;
    }
  }
  // More demand than a domain holds: blocks are reused and the plan says so.
  o.clients = 12;
  o.tokens_per_client = 32 * 256;
  bool wrapped = false;
  for (const ClientDataPlan& p : plan_client_data(corpora, o)) wrapped |= p.wrapped;
  EXPECT_TRUE(wrapped);
}

TEST(DataPlan, HeldoutWindowsAreFixedAndSpread) {
  const auto corpora = synthetic(4096, 1000);
  const TokenBatch h = heldout_windows(corpora[2], 5, 32);
  EXPECT_EQ(h.input_ids.sizes(), (std::vector<int64_t>{5, 32}));
  EXPECT_EQ(h.input_ids[0][0].item<int64_t>(), 2000);
  EXPECT_EQ(h.labels[4][31].item<int64_t>(), 2000 + 999);  // the last window ends at the last token
  EXPECT_TRUE(at::equal(h.input_ids.narrow(1, 1, 31), h.labels.narrow(1, 0, 31)));
  EXPECT_TRUE(at::equal(h.input_ids, heldout_windows(corpora[2], 5, 32).input_ids));
  EXPECT_THROW(heldout_windows(corpora[2], 2, 1000), InvalidArgument);
}

TEST(Corpora, RealDomainsLoad) {
  const std::string testdata = std::string(TESSERA_SOURCE_DIR) + "/../shared/testdata";
  if (!std::filesystem::exists(testdata + "/text/moby-dick.txt")) {
    GTEST_SKIP() << "shared test data not found at " << testdata;
  }
  DomainSources s = default_sources(TESSERA_SOURCE_DIR, testdata);
  s.max_tokens = 200000;
  const nn::Tokenizer tok = nn::Tokenizer::bytes({"<|endoftext|>"});
  const auto corpora = load_domain_corpora(s, tok);
  ASSERT_EQ(corpora.size(), 4u);
  for (int d = 0; d < kNumDomains; ++d) {
    EXPECT_EQ(static_cast<int>(corpora[d].domain), d);
    EXPECT_EQ(corpora[d].train.size() + corpora[d].heldout.size(), 200000u) << domain_name(d);
    EXPECT_EQ(corpora[d].heldout.size(), 20000u) << domain_name(d);
  }
  auto text = [&](int d) {
    std::vector<int32_t> head(corpora[d].train.begin(), corpora[d].train.begin() + 20000);
    return tok.decode(head);
  };
  EXPECT_NE(text(0).find("Call me Ishmael"), std::string::npos);
  // Cantonese: mostly multi-byte UTF-8, with Cantonese particles.
  const std::string yue = text(1);
  int high = 0;
  for (unsigned char c : yue) high += c >= 0x80;
  EXPECT_GT(high, 10000);
  EXPECT_NE(yue.find("嘅"), std::string::npos);
  EXPECT_NE(text(2).find("#include"), std::string::npos);
  EXPECT_NE(text(3).find("Q: "), std::string::npos);

  DomainSources missing = s;
  missing.english_file = testdata + "/no-such-file.txt";
  EXPECT_THROW(load_domain_corpora(missing, tok), NotFound);
}

}  // namespace
}  // namespace tessera::fed
