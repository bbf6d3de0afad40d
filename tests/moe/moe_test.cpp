// moe: billing against hand computation, the price sheet as data, the
// optimal deployment against brute force, limits, and popularity
// prediction on a real MoE model's routing.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <random>
#include <sstream>
#include <thread>

#include "tessera/core/error.h"
#include "tessera/core/subprocess.h"
#include "tessera/moe/deploy.h"
#include "tessera/moe/prediction.h"
#include "tessera/moe/search.h"
#include "tessera/moe/storage.h"
#include "tessera/nn/loader.h"
#include "tessera/nn/train.h"

#include <unistd.h>
#include <cstdio>
#include <filesystem>

namespace tessera::moe {
namespace {

TEST(Billing, MatchesAHandComputation) {
  BillingMeter meter(PriceSheet::aws_lambda());
  // 1024 MB for 123.4 ms: billed 124 ms = 0.124 GB-s.
  EXPECT_DOUBLE_EQ(meter.record("expert-0", 1024, 0.1234), 0.124 * 1.0 * 0.0000166667 + 0.0000002);
  // 128 MB for 0.4 ms: the 1 ms minimum, 0.125 GB.
  EXPECT_DOUBLE_EQ(meter.record("expert-1", 128, 0.0004), 0.001 * 0.125 * 0.0000166667 + 0.0000002);
  // 3072 MB for exactly 2 s.
  EXPECT_DOUBLE_EQ(meter.record("expert-2", 3072, 2.0), 2.0 * 3.0 * 0.0000166667 + 0.0000002);
  const double gb_s = 0.124 + 0.001 * 0.125 + 6.0;
  EXPECT_NEAR(meter.gb_seconds(), gb_s, 1e-12);
  EXPECT_NEAR(meter.total_cost(), gb_s * 0.0000166667 + 3 * 0.0000002, 1e-15);
  ASSERT_EQ(meter.invocations().size(), 3u);
  EXPECT_DOUBLE_EQ(meter.invocations()[0].billed_seconds, 0.124);
  EXPECT_THROW(meter.record("bad", 0, 1.0), InvalidArgument);
}

// Found by fuzz/moe_price_sheet_fuzz.cpp: with a billing granularity far
// above the run time (and no minimum), the absolute rounding tolerance
// rounded the run down to zero units, billing nothing.
TEST(Billing, ARunShorterThanOneUnitIsBilledOneUnit) {
  PriceSheet p = PriceSheet::aws_lambda();
  p.minimum_billed_ms = 0;
  p.billing_granularity_ms = 1e12;
  EXPECT_DOUBLE_EQ(p.billed_seconds(0.002), 1e9);
  EXPECT_DOUBLE_EQ(p.billed_seconds(0.0), 0.0);
  p.billing_granularity_ms = 100;  // whole multiples stay as they are
  EXPECT_DOUBLE_EQ(p.billed_seconds(0.3), 0.3);
  EXPECT_DOUBLE_EQ(p.billed_seconds(0.3001), 0.4);
}

TEST(PriceSheet, ShippedFileEqualsTheBuiltInSheetAndUnknownKeysAreRefused) {
  const PriceSheet file =
      PriceSheet::from_json_file(std::string(TESSERA_SOURCE_DIR) + "/data/aws_lambda_prices.json");
  const PriceSheet builtin = PriceSheet::aws_lambda();
  EXPECT_EQ(file.name, builtin.name);
  EXPECT_EQ(file.gb_second, builtin.gb_second);
  EXPECT_EQ(file.per_request, builtin.per_request);
  EXPECT_EQ(file.memory_sizes_mb, builtin.memory_sizes_mb);
  EXPECT_EQ(file.payload_limit_bytes, builtin.payload_limit_bytes);
  EXPECT_EQ(file.memory_sizes_mb.size(), 14u);
  try {
    PriceSheet::from_json(
        R"({"name": "x", "gb_second": 1, "per_request": 0, "memory_sizes_mb": [128], "gb_secnd": 2})");
    ADD_FAILURE() << "no error";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("gb_secnd"), std::string::npos) << e.what();
  }
}

PlatformProfile small_profile() {
  PlatformProfile p;
  p.memory_mb = {256, 1024, 3072};
  p.t_cal = {4e-3, 1.2e-3, 0.5e-3};
  p.t_head = 0.05;
  p.t_dl = 0.02;
  p.storage_bandwidth = 50e6;
  p.call_bandwidth = 20e6;
  p.input_bytes_per_token = 4096;
  p.output_bytes_per_token = 4096;
  p.expert_weight_bytes = 100 << 20;
  p.intermediate_bytes_per_token = 16384;
  p.runtime_overhead_bytes = 64 << 20;
  return p;
}

TEST(Deployment, OptimalEqualsBruteForceOnSmallInstances) {
  const PriceSheet prices = PriceSheet::aws_lambda();
  const PlatformProfile p = small_profile();
  SearchSpace space;
  space.max_replicas = 2;
  space.betas = {16, 64};
  std::mt19937 rng(7);
  std::uniform_real_distribution<double> tokens(0, 600);
  int feasible = 0, infeasible = 0;
  for (int trial = 0; trial < 24; ++trial) {
    std::vector<std::vector<double>> loads(2, std::vector<double>(2));
    for (auto& l : loads) {
      for (double& t : l) t = trial % 5 == 0 ? 0.0 : std::round(tokens(rng));
    }
    for (double slo : {0.3, 0.8, 1.5, 4.0}) {
      SCOPED_TRACE(testing::Message() << "trial " << trial << " slo " << slo);
      Deployment exact = optimal_deployment(p, prices, loads, slo, space);
      Deployment brute = brute_force_deployment(p, prices, loads, slo, space);
      ASSERT_EQ(exact.feasible, brute.feasible);
      if (exact.feasible) {
        ++feasible;
        EXPECT_NEAR(exact.cost, brute.cost, 1e-12 + 1e-9 * brute.cost);
        EXPECT_LE(exact.seconds, slo + 1e-12);
        // The paper's repair loop is never cheaper than the optimum.
        Deployment repaired = repair_deployment(p, prices, loads, slo, space);
        if (repaired.feasible) {
          EXPECT_GE(repaired.cost, exact.cost - 1e-12);
        }
      } else {
        ++infeasible;
        EXPECT_NEAR(exact.seconds, brute.seconds, 1e-12);  // both return the fastest
      }
    }
  }
  EXPECT_GT(feasible, 20);
  EXPECT_GT(infeasible, 0);
}

TEST(Deployment, LimitsAreRespected) {
  const PriceSheet prices = PriceSheet::aws_lambda();
  PlatformProfile p = small_profile();
  // Direct invocation: tokens * D_in over the 6 MiB payload limit is impossible.
  const int64_t over = prices.payload_limit_bytes / p.input_bytes_per_token + 1;
  EXPECT_TRUE(std::isinf(replica_seconds(p, prices, {Method::kDirect, 2, over, 0})));
  EXPECT_TRUE(std::isfinite(replica_seconds(p, prices, {Method::kDirect, 2, over - 1, 0})));
  // Memory: 256 MB cannot hold 100 MiB of weights plus thousands of tokens.
  EXPECT_TRUE(std::isinf(replica_seconds(p, prices, {Method::kIndirect, 0, 10000, 0})));
  // Pipelining holds only beta tokens at once.
  EXPECT_TRUE(std::isfinite(replica_seconds(p, prices, {Method::kPipelined, 0, 10000, 64})));
  // A layer with more tokens than any option can take is an error, not a crash.
  p.memory_mb = {128};
  p.t_cal = {1e-3};
  EXPECT_THROW(optimal_deployment(p, prices, {{1000.0}}, 10.0), InvalidArgument);
}

TEST(Simulator, OverflowsAreCorrectedAndCounted) {
  const PriceSheet prices = PriceSheet::aws_lambda();
  const PlatformProfile p = small_profile();
  // Planned for 100 tokens per expert; the batch brings 5000 to expert 1.
  Deployment plan = optimal_deployment(p, prices, {{100, 100}}, 10.0);
  ASSERT_TRUE(plan.feasible);
  Simulation same = simulate(p, prices, plan, {{100, 100}});
  EXPECT_NEAR(same.cost, plan.cost, 1e-12);
  EXPECT_EQ(same.memory_overflows + same.payload_overflows, 0);
  Simulation big = simulate(p, prices, plan, {{100, 5000}});
  EXPECT_GT(big.memory_overflows + big.payload_overflows, 0);
  EXPECT_GT(big.cost, same.cost);
  EXPECT_TRUE(big.memory_factor[0][1] > 1 || big.payload_factor[0][1] > 1);
  EXPECT_EQ(big.memory_factor[0][0], 1.0);
}

TEST(BayesianOptimisation, ConvergesOnTheSimulatorAndBeatsThePrediction) {
  const PriceSheet prices = PriceSheet::aws_lambda();
  const PlatformProfile p = small_profile();
  // The real popularity; the predictor underestimates the two hot experts.
  const Loads real_mean = {{900, 120, 60, 20}, {500, 500, 30, 10}};
  Loads predicted = real_mean;
  predicted[0][0] *= 0.3;
  predicted[1][1] *= 0.3;
  std::mt19937 rng(3);
  std::normal_distribution<double> noise(1.0, 0.05);
  auto real = [&](int) {
    Loads r = real_mean;
    for (auto& l : r)
      for (double& t : l) t = std::round(t * noise(rng));
    return r;
  };
  BoOptions o;
  o.slo_seconds = 2.5;
  o.space.max_replicas = 3;
  o.space.betas = {32, 128};
  BoTrace t = bayesian_optimisation(p, prices, predicted, real, o);
  EXPECT_TRUE(t.converged) << t.iterations << " iterations";
  EXPECT_LT(t.iterations, o.max_iterations);
  ASSERT_FALSE(t.best.empty());
  for (size_t i = 1; i < t.best.size(); ++i) EXPECT_LE(t.best[i], t.best[i - 1]);
  // The first deployment is planned from the (wrong) prediction; the search
  // must find a strictly cheaper one.
  EXPECT_LT(t.best.back(), t.cost.front());
  // Planning with the true loads is the floor the search approaches.
  const double oracle =
      simulate(p, prices, optimal_deployment(p, prices, real_mean, o.slo_seconds, o.space),
               real_mean)
          .cost;
  std::printf("BO: first %.6g, best %.6g, oracle %.6g (%d iterations)\n", t.cost.front(),
              t.best.back(), oracle, t.iterations);
  EXPECT_LE(t.best.back(), 1.1 * oracle);
}

TEST(Prediction, BayesianAndTokenOnlyBeatHistoricalOnARealRouter) {
  nn::ModelConfig cfg;
  cfg.model_type = "mixtral";
  cfg.vocab_size = 64;
  cfg.hidden_size = 32;
  cfg.intermediate_size = 64;
  cfg.num_hidden_layers = 2;
  cfg.num_attention_heads = 4;
  cfg.num_key_value_heads = 2;
  cfg.num_experts = 8;
  cfg.num_experts_per_tok = 2;
  cfg.max_position_embeddings = 64;
  nn::Transformer model(cfg);
  model.init_random(3);
  // Token ids from a skewed distribution, as text has.
  at::manual_seed(5);
  at::Tensor weights = at::pow(at::arange(1, 65, at::kDouble), -1.1);
  auto batch = [&] { return at::multinomial(weights, 16 * 32, true).view({16, 32}); };
  CountTable table(2, 8, 2);
  for (int i = 0; i < 20; ++i) table.add(trace_batch(model, batch()));
  EXPECT_EQ(table.batches(), 20);
  EXPECT_GT(table.cells(), 0);
  double err[3] = {0, 0, 0};
  for (int i = 0; i < 5; ++i) {
    at::Tensor ids = batch();
    RoutingTrace real = trace_batch(model, ids);
    ASSERT_EQ(real.attention_ids.sizes(), (std::vector<int64_t>{2, 16 * 32}));
    at::Tensor loads = real.loads();
    EXPECT_EQ(loads.sum().item<double>(), 2.0 * 2 * 16 * 32);
    int j = 0;
    for (Predictor pr : {Predictor::kBayesian, Predictor::kTokenOnly, Predictor::kHistorical}) {
      at::Tensor pred = table.predict(ids, pr);
      EXPECT_NEAR(pred.sum().item<double>(), loads.sum().item<double>(), 1e-2);
      err[j++] += load_error(pred, loads) / 5;
    }
  }
  EXPECT_LT(err[0], err[2]);
  EXPECT_LT(err[1], err[2]);
  std::cout << "relative L1 load error: bayesian " << err[0] << ", token-only " << err[1]
            << ", historical " << err[2] << "\n";
  EXPECT_THROW(CountTable(2, 8, 9), InvalidArgument);
  RoutingTrace wrong = trace_batch(model, batch());
  CountTable other(3, 8, 2);
  EXPECT_THROW(other.add(wrong), InvalidArgument);
}

// Runs tessera-moe-plan with `args` (a shell word list); *status is its
// exit code.
std::string run_tool(const std::string& args, int* status) {
  CommandResult r =
      run_shell(std::string(TESSERA_MOE_PLAN_BIN) + " " + args, std::chrono::minutes(5));
  *status = r.status.shell_code();
  return r.output;
}

TEST(MoePlanTool, PlansADeploymentAndRefusesADenseModel) {
  namespace fs = std::filesystem;
  const std::string dir =
      (fs::temp_directory_path() / ("tessera-moe-plan-test-" + std::to_string(getpid()))).string();
  nn::ModelConfig c;
  c.model_type = "mixtral";
  c.vocab_size = 64;
  c.hidden_size = 32;
  c.intermediate_size = 64;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.num_experts = 4;
  c.num_experts_per_tok = 2;
  nn::write_random_model(dir + "/moe", c, 1);
  std::vector<int64_t> ids(20000);
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int64_t>((i * 7919) % 64);
  nn::TokenDataset::write(dir + "/data.tokens", ids);
  int status = 0;
  std::string out = run_tool("--model " + dir + "/moe --tokens " + dir +
                                 "/data.tokens --batches 5 --batch-tokens 256 "
                                 "--seq 32 --slo 5",
                             &status);
  EXPECT_EQ(status, 0) << out;
  EXPECT_NE(out.find("2 MoE layers x 4 experts"), std::string::npos) << out;
  EXPECT_NE(out.find("predicted: $"), std::string::npos) << out;
  EXPECT_NE(out.find("on the batch's real routing"), std::string::npos) << out;
  c.num_experts = 0;
  c.model_type = "llama";
  nn::write_random_model(dir + "/dense", c, 1);
  out = run_tool("--model " + dir + "/dense --tokens " + dir + "/data.tokens", &status);
  EXPECT_NE(status, 0);
  EXPECT_NE(out.find("is not an MoE model"), std::string::npos) << out;
  out = run_tool("--model " + dir + "/moe --tokens " + dir + "/data.tokens --slp 1", &status);
  EXPECT_NE(status, 0);
  EXPECT_NE(out.find("unknown option '--slp'"), std::string::npos) << out;
  fs::remove_all(dir);
}

// Malformed tensors reach LibTorch inside the predictor; the caller sees a
// tessera::Error naming the call.
TEST(Errors, LibTorchErrorsSurfaceAsTesseraErrors) {
  CountTable table(2, 8, 2);
  try {
    (void)load_error(at::zeros({2, 8}), at::zeros({3, 5}));
    ADD_FAILURE();
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("load_error"), std::string::npos) << e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "non-tessera error: " << e.what();
  }
  try {
    (void)table.predict(at::Tensor(), Predictor::kBayesian);
    ADD_FAILURE();
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("CountTable::predict"), std::string::npos) << e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "non-tessera error: " << e.what();
  }
}

// Regression (the overflow fuzz/moe_function_request_fuzz.cpp found in the
// function's wait): the storage channel added the wait to now() unchecked,
// so milliseconds::max() ("wait for ever") overflowed into a deadline in the
// past and get() gave up at once on an object that was about to appear.
TEST(Storage, FuzzWaitForeverDoesNotOverflowTheDeadline) {
  const auto dir =
      std::filesystem::temp_directory_path() / ("tessera-moe-storage-" + std::to_string(getpid()));
  auto storage = StorageChannel::open("files:" + dir.string());
  std::thread writer([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    storage->put("late", at::arange(3, at::kFloat));
  });
  const at::Tensor got = storage->get("late", std::chrono::milliseconds::max());
  writer.join();
  EXPECT_TRUE(at::equal(got, at::arange(3, at::kFloat)));
  EXPECT_THROW(storage->get("missing", std::chrono::milliseconds(-5)), NotFound);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace tessera::moe
