// sim: the overlap-slowdown regressors on synthetic measurements with known
// generating functions (held-out errors printed), model files, and the
// measurement readers.
#include "tessera/sim/overlap.h"

#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <random>

#include "tessera/core/error.h"

namespace tessera::sim {
namespace {

using Truth = double (*)(const OverlapFeatures&);

// Random features in the ranges a GEMM-vs-collective sweep covers.
std::vector<OverlapSample> synthesize(size_t n, uint64_t seed, Truth truth, double noise) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> unit(0, 1);
  std::normal_distribution<double> gauss(0, noise > 0 ? noise : 1);
  const char* kinds[] = {"gemm", "attention", "elementwise"};
  const CollectiveKind comms[] = {CollectiveKind::kAllReduce, CollectiveKind::kAllGather,
                                  CollectiveKind::kReduceScatter};
  std::vector<OverlapSample> out;
  for (size_t i = 0; i < n; ++i) {
    OverlapSample s;
    OverlapFeatures& f = s.features;
    f.compute_kind = kinds[rng() % 3];
    f.compute_duration_us = std::pow(2.0, 3 + 10 * unit(rng));
    f.compute_flops = f.compute_duration_us * 1e8 * (0.8 + 0.4 * unit(rng));
    f.comm_kind = comms[rng() % 3];
    f.comm_bytes = std::pow(2.0, 16 + 13 * unit(rng));
    f.comm_ranks = 2 << (rng() % 3);
    f.concurrent_comms = 1 + static_cast<int>(rng() % 2);
    f.comm_threads = 1 << (rng() % 3);
    f.overlap_fraction = unit(rng);
    s.slowdown = truth(f) + (noise > 0 ? gauss(rng) : 0.0);
    out.push_back(s);
  }
  return out;
}

double linear_truth(const OverlapFeatures& f) {
  const double g = 0.02 + 0.01 * std::log2(1 + f.comm_bytes) +
                   (f.compute_kind == "gemm" ? 0.05 : 0) +
                   (f.compute_kind == "elementwise" ? 0.12 : 0) +
                   (f.comm_kind == CollectiveKind::kAllReduce ? 0.03 : 0) + 0.004 * f.comm_ranks;
  return 1 + f.overlap_fraction * g;
}

// Saturating in the message size, multiplicative in kinds: not linear.
double nonlinear_truth(const OverlapFeatures& f) {
  const double size = 1 / (1 + std::exp(-(std::log2(f.comm_bytes) - 22) / 1.5));
  const double kind = f.compute_kind == "gemm" ? 1.0 : f.compute_kind == "attention" ? 0.7 : 1.6;
  const double comm = f.comm_kind == CollectiveKind::kAllReduce ? 1.0 : 0.6;
  return 1 + f.overlap_fraction * 0.6 * size * kind * comm;
}

TEST(LinearOverlap, RecoversALinearGeneratingFunction) {
  const auto data = synthesize(600, 1, linear_truth, 0);
  const SampleSplit split = split_samples(data, 0.25, 7);
  const auto model = fit_linear_overlap(split.train);
  EXPECT_EQ(model->kind(), "linear");
  const OverlapError e = evaluate_overlap(*model, split.test);
  std::cout << "[linear, linear truth] held-out MAE " << e.mean_abs_error << ", max "
            << e.max_abs_error << " (" << e.samples << " samples)\n";
  EXPECT_LT(e.max_abs_error, 1e-6);
  // No overlap, no slowdown.
  OverlapFeatures f = split.test[0].features;
  f.overlap_fraction = 0;
  EXPECT_DOUBLE_EQ(model->predict(f), 1.0);
}

TEST(Overlap, XGBoostBeatsLinearOnANonlinearFunction) {
  const auto data = synthesize(2000, 2, nonlinear_truth, 0.01);
  const SampleSplit split = split_samples(data, 0.2, 11);
  const auto linear = fit_linear_overlap(split.train);
  const auto boosted = fit_xgboost_overlap(split.train);
  EXPECT_EQ(boosted->kind(), "xgboost");
  const OverlapError el = evaluate_overlap(*linear, split.test);
  const OverlapError ex = evaluate_overlap(*boosted, split.test);
  std::cout << "[nonlinear truth, noise 0.01] held-out MAE: linear " << el.mean_abs_error
            << " (rel " << el.mean_abs_rel_error << "), xgboost " << ex.mean_abs_error << " (rel "
            << ex.mean_abs_rel_error << "), " << ex.samples << " samples\n";
  // Measured when written: linear 0.029, xgboost 0.012 (noise alone: 0.008).
  EXPECT_LT(ex.mean_abs_error, 0.02);
  EXPECT_LT(ex.mean_abs_error, 0.5 * el.mean_abs_error);
  for (const OverlapSample& s : split.test) EXPECT_GE(boosted->predict(s.features), 1.0);
}

TEST(Overlap, ModelsSurviveSaveAndLoad) {
  const auto data = synthesize(300, 3, nonlinear_truth, 0.01);
  XGBoostOverlapOptions small;
  small.rounds = 40;
  const std::unique_ptr<OverlapModel> models[] = {fit_linear_overlap(data),
                                                  fit_xgboost_overlap(data, small)};
  for (const auto& model : models) {
    const std::string path = ::testing::TempDir() + "/overlap_" + model->kind() + ".json";
    model->save_file(path);
    const auto back = load_overlap_model(path);
    EXPECT_EQ(back->kind(), model->kind());
    for (size_t i = 0; i < 50; ++i) {
      EXPECT_DOUBLE_EQ(back->predict(data[i].features), model->predict(data[i].features))
          << model->kind() << " sample " << i;
    }
  }
  // An unseen compute kind still predicts (its one-hot is all zeros).
  OverlapFeatures f = data[0].features;
  f.compute_kind = "softmax";
  EXPECT_GE(models[0]->predict(f), 1.0);
  EXPECT_GE(models[1]->predict(f), 1.0);
  f.overlap_fraction = 1.5;
  EXPECT_THROW(models[0]->predict(f), InvalidArgument);
  EXPECT_THROW(models[1]->predict(f), InvalidArgument);
}

TEST(Overlap, ModelFileErrorsNameTheField) {
  auto expect_error = [](const std::string& text, const std::string& needle) {
    try {
      parse_overlap_model(text, "m.json");
      ADD_FAILURE() << "accepted: " << needle;
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_error(R"({"schema": "tessera.sim.overlap/1", "kind": "forest", "compute_kinds": []})",
               "field 'kind'");
  expect_error(R"({"schema": "tessera.sim.overlap/1", "kind": "linear", "compute_kinds": [],
                   "weights": [1, 2]})",
               "field 'weights': expected 13 weights");
  expect_error(R"({"schema": "tessera.sim.overlap/1", "kind": "xgboost", "compute_kinds": [],
                   "booster": {"learner": 1}})",
               "field 'booster': XGBoost cannot load it");
  expect_error(R"({"schema": "tessera.sim.overlap/1", "kind": "linear", "compute_kinds": [],
                   "weights": [0,0,0,0,0,0,0,0,0,0,0,0,0], "bias": 1})",
               "unknown key(s) 'bias'");
}

TEST(OverlapSamples, CsvAndJsonReadersAndErrors) {
  const auto data = synthesize(20, 4, linear_truth, 0);
  const std::string csv = overlap_samples_to_csv(data);
  const auto back = parse_overlap_csv(csv, "s.csv");
  ASSERT_EQ(back.size(), data.size());
  for (size_t i = 0; i < data.size(); ++i) {
    EXPECT_EQ(back[i].features.compute_kind, data[i].features.compute_kind);
    EXPECT_DOUBLE_EQ(back[i].features.comm_bytes, data[i].features.comm_bytes);
    EXPECT_DOUBLE_EQ(back[i].slowdown, data[i].slowdown);
  }
  EXPECT_EQ(back[2].origin, "s.csv:4");
  // Files are read by extension.
  const std::string path = ::testing::TempDir() + "/samples.csv";
  std::ofstream(path) << csv;
  EXPECT_EQ(load_overlap_samples(path).size(), data.size());

  const auto json = parse_overlap_json(R"({"schema": "tessera.sim.overlap_samples/1", "samples": [
      {"compute_kind": "gemm", "compute_duration_us": 100, "comm_kind": "all_gather",
       "comm_bytes": 1048576, "overlap_fraction": 0.5, "slowdown": 1.2, "comm_ranks": 8}]})",
                                       "s.json");
  ASSERT_EQ(json.size(), 1u);
  EXPECT_EQ(json[0].features.comm_kind, CollectiveKind::kAllGather);
  EXPECT_EQ(json[0].features.comm_ranks, 8);

  auto expect_error = [](const std::string& text, const std::string& needle) {
    try {
      parse_overlap_csv(text, "s.csv");
      ADD_FAILURE() << "accepted: " << needle;
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  const std::string header =
      "compute_kind,compute_duration_us,comm_kind,comm_bytes,overlap_fraction,slowdown\n";
  expect_error(header + "gemm,100,all_reduce,1e6,0.5,abc\n", "s.csv:2: column 'slowdown'");
  expect_error(header + "gemm,100,allreduce,1e6,0.5,1.1\n", "s.csv:2: column 'comm_kind'");
  expect_error(header + "gemm,100,all_reduce,1e6,1.5,1.1\n", "s.csv:2: feature 'overlap_fraction'");
  expect_error(header + "gemm,100,all_reduce,1e6,0.5\n", "s.csv:2: expected 6 columns, got 5");
  expect_error("compute_kind,compute_duration_us,comm_kind,comm_bytes,overlap_fraction\n",
               "lacks the required column 'slowdown'");
  expect_error("compute_kind,gpu,compute_duration_us\n", "s.csv:1: unknown column 'gpu'");
  try {
    parse_overlap_json(R"({"schema": "tessera.sim.overlap_samples/1", "samples": [
        {"compute_kind": "gemm", "compute_duration_us": 100, "comm_kind": "all_gather",
         "comm_bytes": 1, "overlap_fraction": 0.5}]})",
                       "s.json");
    ADD_FAILURE() << "missing slowdown accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("s.json: samples[0]: field 'slowdown'"), std::string::npos)
        << e.what();
  }
}

TEST(OverlapSamples, SplitIsSeededAndComplete) {
  const auto data = synthesize(10, 5, linear_truth, 0);
  const SampleSplit a = split_samples(data, 0.3, 42);
  const SampleSplit b = split_samples(data, 0.3, 42);
  ASSERT_EQ(a.test.size(), 3u);
  ASSERT_EQ(a.train.size(), 7u);
  for (size_t i = 0; i < a.test.size(); ++i) EXPECT_EQ(a.test[i].slowdown, b.test[i].slowdown);
  double sum_all = 0, sum_parts = 0;
  for (const auto& s : data) sum_all += s.slowdown;
  for (const auto& s : a.train) sum_parts += s.slowdown;
  for (const auto& s : a.test) sum_parts += s.slowdown;
  EXPECT_DOUBLE_EQ(sum_all, sum_parts);
  EXPECT_THROW(split_samples(data, 0.0, 1), InvalidArgument);
  EXPECT_THROW(split_samples(data, 0.01, 1), InvalidArgument);
  EXPECT_THROW(fit_linear_overlap({}), InvalidArgument);
  EXPECT_THROW(fit_xgboost_overlap({}), InvalidArgument);
}

}  // namespace
}  // namespace tessera::sim
