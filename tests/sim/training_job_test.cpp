// sim: the training-job file (strict parsing, every error naming the file
// and the key, round trip, layouts and rank coordinates), step-timing
// files, validation suites, device files and the validation summary.
#include "tessera/sim/training_job.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>

#include "tessera/core/error.h"
#include "tessera/sim/synth.h"
#include "tessera/sim/validate.h"

namespace tessera::sim {
namespace {

const char* kModel = R"({"model_type": "llama", "vocab_size": 64, "hidden_size": 32,
  "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
  "num_key_value_heads": 2, "max_position_embeddings": 64})";

std::string job_doc(const std::string& rest, const std::string& model = kModel) {
  return std::string(R"({"model": )") + model + ", " + rest + "}";
}

// The message of the InvalidArgument `fn` throws ("" when it throws none).
template <typename F>
std::string error_of(F&& fn) {
  try {
    fn();
  } catch (const InvalidArgument& e) {
    return e.what();
  }
  return "";
}

void expect_error(const std::string& what, std::initializer_list<const char*> parts) {
  ASSERT_FALSE(what.empty()) << "no error";
  for (const char* p : parts) EXPECT_NE(what.find(p), std::string::npos) << what;
}

TEST(ParallelLayout, ParsesAndPrints) {
  const ParallelLayout l = ParallelLayout::parse(" tp=2, dp=4 ");
  EXPECT_EQ(l.dp, 4);
  EXPECT_EQ(l.tp, 2);
  EXPECT_EQ(l.ep, 1);
  EXPECT_EQ(l.world_size(), 8);
  EXPECT_EQ(l.to_string(), "dp=4,tp=2");
  EXPECT_EQ(ParallelLayout{}.to_string(), "dp=1");
  EXPECT_EQ(ParallelLayout::parse(l.to_string()), l);
  expect_error(error_of([] { ParallelLayout::parse("pp=2"); }), {"pp=2", "unknown axis 'pp'"});
  expect_error(error_of([] { ParallelLayout::parse("dp=2,dp=2"); }), {"given twice"});
  expect_error(error_of([] { ParallelLayout::parse("dp=0"); }), {"size 0"});
  expect_error(error_of([] { ParallelLayout::parse("dp=x"); }), {"'x'", "not an integer"});
  expect_error(error_of([] { ParallelLayout::parse("dp=2,,tp=2"); }), {"empty part"});
  expect_error(error_of([] { ParallelLayout::parse(""); }), {"no axis"});
}

TEST(ParallelLayout, CoordinatesAreRowMajorDpEpTp) {
  const ParallelLayout l{/*dp=*/2, /*tp=*/2, /*ep=*/3};
  // rank = (dp * ep + ep_i) * tp + tp_i, checked against a direct count.
  int rank = 0;
  for (int d = 0; d < 2; ++d) {
    for (int e = 0; e < 3; ++e) {
      for (int t = 0; t < 2; ++t, ++rank) {
        const RankCoords c = coords_of(l, rank);
        EXPECT_EQ(c.dp, d);
        EXPECT_EQ(c.ep, e);
        EXPECT_EQ(c.tp, t);
        EXPECT_EQ(rank_of(l, c), rank);
      }
    }
  }
  expect_error(error_of([&] { coords_of(l, 12); }), {"rank 12", "12 ranks"});
}

TEST(TrainingJobConfig, ParsesEveryFieldAndRoundTrips) {
  const std::string text = job_doc(R"(
    "name": "j", "layout": {"dp": 2, "tp": 2}, "zero1": true,
    "batch": {"global_batch": 12, "seq_len": 16, "grad_accumulation": 3},
    "optimizer": {"lr": 0.01, "min_lr": 0.001, "warmup": 3, "max_grad_norm": 0.5,
                  "weight_decay": 0.05, "beta1": 0.8, "beta2": 0.9, "eps": 1e-6},
    "precision": "bf16_autocast", "steps": 7, "data": {"kind": "synthetic", "seed": 5},
    "seed": 9)");
  const TrainingJobConfig c = TrainingJobConfig::parse(text, "job.json");
  EXPECT_EQ(c.name, "j");
  EXPECT_EQ(c.model.hidden_size, 32);
  EXPECT_EQ(c.layout, (ParallelLayout{2, 2, 1}));
  EXPECT_TRUE(c.zero1);
  EXPECT_EQ(c.global_batch, 12);
  EXPECT_EQ(c.seq_len, 16);
  EXPECT_EQ(c.grad_accumulation, 3);
  EXPECT_DOUBLE_EQ(c.lr, 0.01);
  EXPECT_DOUBLE_EQ(c.min_lr, 0.001);
  EXPECT_EQ(c.warmup, 3);
  EXPECT_DOUBLE_EQ(c.max_grad_norm, 0.5);
  EXPECT_DOUBLE_EQ(c.adamw.weight_decay, 0.05);
  EXPECT_DOUBLE_EQ(c.adamw.beta1, 0.8);
  EXPECT_DOUBLE_EQ(c.adamw.beta2, 0.9);
  EXPECT_DOUBLE_EQ(c.adamw.eps, 1e-6);
  EXPECT_TRUE(c.bf16_autocast);
  EXPECT_EQ(c.steps, 7);
  EXPECT_EQ(c.data_seed, 5u);
  EXPECT_EQ(c.seed, 9u);
  EXPECT_EQ(c.data_ranks(), 2);
  EXPECT_EQ(c.local_batch(), 6);
  const TrainingJobConfig again = TrainingJobConfig::parse(c.to_json(), "again.json");
  EXPECT_EQ(again.to_json(), c.to_json());
  EXPECT_EQ(again.layout, c.layout);
  EXPECT_EQ(again.model.to_json(), c.model.to_json());
}

TEST(TrainingJobConfig, ModelFromAFileRelativeToTheJob) {
  const std::string dir = ::testing::TempDir() + "/sim_job_" + std::to_string(getpid());
  std::filesystem::create_directories(dir + "/models");
  std::ofstream(dir + "/models/config.json") << kModel;
  std::ofstream(dir + "/job.json") << R"({"model": "models/config.json", "layout": {"tp": 2},
    "batch": {"seq_len": 32}, "data": {"kind": "tokens", "path": "train.tokens"}})";
  const TrainingJobConfig c = TrainingJobConfig::load_file(dir + "/job.json");
  EXPECT_EQ(c.model.num_attention_heads, 4);
  EXPECT_EQ(c.token_file, std::filesystem::path(dir + "/train.tokens").lexically_normal().string());
  std::filesystem::remove_all(dir);
}

TEST(TrainingJobConfig, ErrorsNameTheFileAndTheKey) {
  auto parse = [](const std::string& text) {
    return error_of([&] { TrainingJobConfig::parse(text, "bad.json"); });
  };
  expect_error(parse(job_doc(R"("layout": {"dp": 2}, "batchh": {})")), {"bad.json", "batchh"});
  expect_error(parse(job_doc(R"("layout": {"dp": 2, "pp": 2})")), {"bad.json", "layout.pp"});
  expect_error(parse(job_doc(R"("layout": {"dp": 0})")), {"bad.json", "dp", ">= 1"});
  expect_error(parse(R"({"layout": {"dp": 2}})"), {"bad.json", "model"});
  expect_error(parse(job_doc(R"("layout": {"tp": 3})")), {"bad.json", "tp=3", "heads"});
  expect_error(parse(job_doc(R"("layout": {"ep": 2})")), {"bad.json", "MoE"});
  expect_error(parse(job_doc(R"("layout": {"dp": 1}, "zero1": true)")), {"zero1", "dp > 1"});
  expect_error(parse(job_doc(R"("layout": {"dp": 3}, "batch": {"global_batch": 8})")),
               {"global_batch=8", "dp * ep"});
  expect_error(parse(job_doc(R"("layout": {"dp": 1}, "batch": {"seq_len": 65})")),
               {"seq_len=65", "max_position_embeddings"});
  expect_error(parse(job_doc(R"("layout": {"dp": 1}, "precision": "fp8")")), {"precision", "fp8"});
  expect_error(parse(job_doc(R"("layout": {"dp": 1}, "data": {"kind": "web"})")),
               {"data.kind", "web"});
  expect_error(parse(job_doc(R"("layout": {"dp": 1}, "data": {"kind": "tokens"})")),
               {"bad.json", "path"});
  expect_error(parse(job_doc(R"("layout": {"dp": 1})", R"({"model_type": "gpt9"})")), {"gpt9"});
  expect_error(parse("{\"model\": "), {"bad.json", "line"});
  // A MoE model with ep and dp together: the trainer refuses it.
  const std::string moe = R"({"model_type": "mixtral", "vocab_size": 64, "hidden_size": 32,
    "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "num_local_experts": 4, "max_position_embeddings": 64})";
  expect_error(parse(job_doc(R"("layout": {"dp": 2, "ep": 2})", moe)), {"ep > 1"});
  expect_error(parse(job_doc(R"("layout": {"ep": 3})", moe)), {"ep=3", "num_experts=4"});
}

TEST(StepTimings, RoundTripsAndRejectsBadFiles) {
  StepTimings t;
  t.step_seconds = {0.5, 0.25, 0.75};
  t.losses = {3, 2, 1};
  t.median_seconds = 0.5;
  t.min_seconds = 0.25;
  t.max_seconds = 0.75;
  t.world_size = 4;
  t.layout = "dp=2,tp=2";
  const StepTimings back = StepTimings::parse(t.to_json(2), "t.json");
  EXPECT_EQ(back.step_seconds, t.step_seconds);
  EXPECT_EQ(back.losses, t.losses);
  EXPECT_DOUBLE_EQ(back.median_seconds, 0.5);
  EXPECT_EQ(back.layout, t.layout);
  EXPECT_EQ(back.world_size, 4);
  expect_error(error_of([] { StepTimings::parse(R"({"schema": "x"})", "t.json"); }),
               {"t.json", "schema"});
  std::string text = t.to_json(2);
  text.insert(1, "\"extra\": 1, ");
  expect_error(error_of([&] { StepTimings::parse(text, "t.json"); }), {"t.json", "extra"});
  EXPECT_EQ(back.median_comm_seconds(), 0);  // no per-rank split
}

TEST(StepTimings, SplitsTheSlowestRanksStepIntoCommunicationAndTheRest) {
  StepTimings t;
  t.step_seconds = {2, 3, 4};
  t.losses = {1, 1, 1};
  t.median_seconds = 3;
  t.min_seconds = 2;
  t.max_seconds = 4;
  t.world_size = 2;
  t.layout = "dp=2";
  t.rank_step_seconds = {{1, 2}, {3, 1}, {4, 3.5}};
  t.rank_comm_seconds = {{0.5, 0.5}, {1, 0.2}, {0.25, 3}};
  // Slowest ranks 1, 0, 0: communication 0.5, 1, 0.25; the rest 1.5, 2, 3.75.
  EXPECT_DOUBLE_EQ(t.median_comm_seconds(), 0.5);
  EXPECT_DOUBLE_EQ(t.median_compute_seconds(), 2);
  const StepTimings back = StepTimings::parse(t.to_json(2), "t.json");
  EXPECT_EQ(back.rank_step_seconds, t.rank_step_seconds);
  EXPECT_EQ(back.rank_comm_seconds, t.rank_comm_seconds);
  std::string text = t.to_json(2);
  const std::string row = "[\n    [\n      0.5,\n      0.5\n    ]";
  ASSERT_NE(text.find(row), std::string::npos) << text;
  text.replace(text.find(row), row.size(), "[\n    [\n      0.5\n    ]");
  expect_error(error_of([&] { StepTimings::parse(text, "t.json"); }),
               {"t.json", "rank_comm_seconds", "2 numbers per step"});
  // The per-operation table round-trips; a bad entry names itself.
  t.collectives = {{"all_reduce", 8192, 2, 40, 0.001, 0.0005, 0.004},
                   {"all_to_all", 1 << 20, 4, 20, 0.0125, 0.01, 0.02}};
  EXPECT_EQ(StepTimings::parse(t.to_json(2), "t.json").collectives, t.collectives);
  text = t.to_json(2);
  const std::string calls = "\"calls\": 40";
  ASSERT_NE(text.find(calls), std::string::npos) << text;
  text.replace(text.find(calls), calls.size(), "\"calls\": -1");
  expect_error(error_of([&] { StepTimings::parse(text, "t.json"); }),
               {"t.json", "collectives[0]", "calls"});
}

TEST(CommunicationClock, CountsTheUnionOfOperationsIssuedInTheWindow) {
  using namespace std::chrono_literals;
  CommunicationClock clock;
  dist::CollectiveCall a, b, before;
  a.id = 1;
  b.id = 2;
  before.id = 3;
  clock.on_issue(before);  // before the window: never counted
  clock.start();
  const auto t0 = std::chrono::steady_clock::now();
  clock.on_issue(a);
  std::this_thread::sleep_for(20ms);
  clock.on_issue(b);  // overlaps a: counted once
  clock.on_complete(a);
  clock.on_complete(before);
  std::this_thread::sleep_for(20ms);
  clock.on_complete(b);
  const double busy = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::this_thread::sleep_for(30ms);  // outside any operation
  const double total = clock.stop();
  EXPECT_GE(total, 0.04);
  EXPECT_LE(total, busy);
  EXPECT_EQ(clock.calls(), 2);
  // An operation still running at stop() counts until then.
  clock.start();
  clock.on_issue(before);
  std::this_thread::sleep_for(10ms);
  EXPECT_GE(clock.stop(), 0.01);
}

TEST(CommunicationClock, TimesEachOperationOfTheWindow) {
  using namespace std::chrono_literals;
  CommunicationClock clock;
  dist::CollectiveCall a, b;
  a.id = 1;
  a.op = "all_reduce";
  a.bytes = 8192;
  a.ranks = {0, 1};
  b.id = 2;
  b.op = "all_gather";
  b.bytes = 64;
  b.ranks = {3, 1, 0, 2};  // in group-rank order, not sorted
  clock.start();
  const auto t0 = std::chrono::steady_clock::now();
  clock.on_issue(a);
  clock.on_issue(b);
  std::this_thread::sleep_for(10ms);
  clock.on_complete(b);
  std::this_thread::sleep_for(20ms);
  clock.on_complete(a);
  const double busy = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  clock.stop();
  const std::vector<CollectiveTime> ops = clock.operations();
  ASSERT_EQ(ops.size(), 2u);  // in completion order
  EXPECT_EQ(ops[0].op, "all_gather");
  EXPECT_EQ(ops[0].bytes, 64);
  EXPECT_EQ(ops[0].group_size, 4);
  EXPECT_GE(ops[0].seconds, 0.01);
  EXPECT_LT(ops[0].seconds, ops[1].seconds);
  EXPECT_EQ(ops[1].op, "all_reduce");
  EXPECT_EQ(ops[1].group_size, 2);
  EXPECT_GE(ops[1].seconds, 0.03);
  EXPECT_LE(ops[1].seconds, busy);
  // Issued right after the window opened; the groups by their two lowest
  // ranks.
  EXPECT_GE(ops[1].start_seconds, 0.0);
  EXPECT_LT(ops[1].start_seconds, 0.01);
  EXPECT_EQ(ops[1].first_rank, 0);
  EXPECT_EQ(ops[1].second_rank, 1);
  EXPECT_EQ(ops[0].first_rank, 0);
  EXPECT_EQ(ops[0].second_rank, 1);
  // A new window starts empty; one still running at stop() is not listed.
  clock.start();
  clock.on_issue(a);
  clock.stop();
  EXPECT_TRUE(clock.operations().empty());
}

// The measured steps drawn by hand-built timings: steps back to back after
// the slowest rank, operations that overlap on further threads, a one-rank
// run without operations, and an operation outside the steps refused.
TEST(MeasuredChromeTrace, PlacesStepsAndOperations) {
  StepTimings t;
  t.world_size = 2;
  t.step_seconds = {0.5, 0.25};
  t.rank_step_seconds = {{0.5, 0.4}, {0.2, 0.25}};
  t.rank_comm_seconds = {{0.1, 0.1}, {0.1, 0.1}};
  auto op = [](int rank, int step, double start, double seconds) {
    MeasuredOperation m;
    m.rank = rank;
    m.step = step;
    m.what.op = "all_reduce";
    m.what.bytes = 1024;
    m.what.group_size = 2;
    m.what.first_rank = 0;
    m.what.second_rank = 1;
    m.what.start_seconds = start;
    m.what.seconds = seconds;
    return m;
  };
  // Rank 0: two overlapping operations in step 0, one in step 1.
  t.operations = {op(0, 0, 0.1, 0.2), op(0, 0, 0.15, 0.05), op(0, 1, 0.0, 0.1), op(1, 0, 0.3, 0.1)};
  const auto events = nlohmann::json::parse(measured_chrome_trace_json(t)).at("traceEvents");
  std::vector<nlohmann::json> comm, steps;
  for (const auto& e : events) {
    if (e.at("ph") != "X") continue;
    (e.at("cat") == "step" ? steps : comm).push_back(e);
  }
  ASSERT_EQ(steps.size(), 4u);
  ASSERT_EQ(comm.size(), 4u);
  // Step 1 starts after step 0's slowest rank (0.5 s).
  for (const auto& e : steps) {
    if (e.at("name") == "step 1") {
      EXPECT_DOUBLE_EQ(e.at("ts").get<double>(), 0.5e6);
    }
  }
  auto find = [&comm](int pid, double ts) {
    for (const auto& e : comm) {
      if (e.at("pid") == pid && std::abs(e.at("ts").get<double>() - ts) < 1e-3) return e;
    }
    ADD_FAILURE() << "no operation of rank " << pid << " at " << ts;
    return nlohmann::json();
  };
  EXPECT_EQ(find(0, 0.1e6).at("tid"), 1);
  EXPECT_EQ(find(0, 0.15e6).at("tid"), 2);  // overlaps the first
  EXPECT_EQ(find(0, 0.5e6).at("tid"), 1);   // step 1, 0.0 s in
  EXPECT_DOUBLE_EQ(find(0, 0.5e6).at("dur").get<double>(), 0.1e6);
  EXPECT_EQ(find(1, 0.3e6).at("args").at("group"), "0,1");
  // One rank, no operations: the steps alone.
  StepTimings one;
  one.world_size = 1;
  one.step_seconds = {0.1};
  one.rank_step_seconds = {{0.1}};
  one.rank_comm_seconds = {{0.0}};
  EXPECT_NO_THROW(measured_chrome_trace_json(one));
  // Without a clock (no per-rank times), or an operation outside the steps.
  StepTimings bare;
  bare.world_size = 1;
  bare.step_seconds = {0.1};
  EXPECT_THROW(measured_chrome_trace_json(bare), InvalidArgument);
  t.operations.push_back(op(1, 2, 0.0, 0.1));
  EXPECT_THROW(measured_chrome_trace_json(t), InvalidArgument);
}

const char* kSuite = R"({"schema": "tessera.sim.validation/1",
  "clusters": {"2": "gloo_local_np2", "4": "/abs/np4.json"},
  "warmup_steps": 1, "measured_steps": 3, "trace": {"warmup_steps": 0, "measured_steps": 2},
  "cases": [{"name": "a", "job": "jobs/a.json", "layout": "dp=2", "zero1": true},
            {"name": "b", "job": "/abs/b.json"}]})";

TEST(ValidationSuite, ParsesAndResolvesPaths) {
  const ValidationSuite s = ValidationSuite::parse(kSuite, "suite.json", "/data");
  ASSERT_EQ(s.cases.size(), 2u);
  EXPECT_EQ(s.clusters.at(2), "gloo_local_np2");
  EXPECT_EQ(s.clusters.at(4), "/abs/np4.json");
  EXPECT_EQ(s.warmup_steps, 1);
  EXPECT_EQ(s.measured_steps, 3);
  EXPECT_EQ(s.trace_warmup_steps, 0);
  EXPECT_EQ(s.trace_measured_steps, 2);
  EXPECT_EQ(s.cases[0].job_file, "/data/jobs/a.json");
  EXPECT_EQ(*s.cases[0].layout, (ParallelLayout{2, 1, 1}));
  EXPECT_TRUE(*s.cases[0].zero1);
  EXPECT_EQ(s.cases[1].job_file, "/abs/b.json");
  EXPECT_FALSE(s.cases[1].layout.has_value());
}

TEST(ValidationSuite, ErrorsNameTheField) {
  auto parse = [](std::string text, const std::string& from, const std::string& to) {
    text.replace(text.find(from), from.size(), to);
    return error_of([&] { ValidationSuite::parse(text, "suite.json", "."); });
  };
  expect_error(parse(kSuite, "\"2\": ", "\"two\": "), {"suite.json", "two", "world sizes"});
  expect_error(parse(kSuite, "\"layout\": \"dp=2\"", "\"layout\": \"dq=2\""),
               {"cases[0]", "layout", "dq"});
  expect_error(parse(kSuite, "\"name\": \"b\"", "\"name\": \"a\""), {"cases[1]", "used twice"});
  expect_error(parse(kSuite, "\"job\": \"/abs/b.json\"", "\"jobs\": \"/abs/b.json\""),
               {"cases[1]", "job"});
  expect_error(parse(kSuite, "\"measured_steps\": 3", "\"measured_steps\": 0"),
               {"measured_steps", ">= 1"});
  expect_error(parse(kSuite, "\"schema\": \"tessera.sim.validation/1\"", "\"schema\": \"v2\""),
               {"schema"});
}

TEST(ValidationReport, SummarizesAbsoluteErrors) {
  ValidationReport r;
  for (double e : {0.02, -0.08, 0.01, -0.03}) {
    ValidationRow row;
    row.error = e;
    r.rows.push_back(row);
  }
  summarize(r);
  EXPECT_DOUBLE_EQ(r.median_abs_error, 0.025);  // |errors| 0.01 0.02 0.03 0.08
  EXPECT_DOUBLE_EQ(r.max_abs_error, 0.08);
  EXPECT_DOUBLE_EQ(r.mean_abs_error, 0.035);
  EXPECT_NE(r.to_markdown().find("median |error| 2.5 %"), std::string::npos) << r.to_markdown();
}

TEST(ValidationReport, CombinesRoundsIntoMedians) {
  std::vector<ValidationRow> rounds(3);
  const double measured[] = {0.30, 0.40, 0.35}, predicted[] = {0.33, 0.32, 0.36};
  for (int k = 0; k < 3; ++k) {
    rounds[k].name = "c";
    rounds[k].measured_s = measured[k];
    rounds[k].predicted_s = predicted[k];
    rounds[k].compute_s = k;  // tells which round's breakdown is kept
    rounds[k].run_attempts = 1;
  }
  const ValidationRow row = combine_rounds(rounds);
  EXPECT_DOUBLE_EQ(row.measured_s, 0.35);
  EXPECT_DOUBLE_EQ(row.predicted_s, 0.33);
  EXPECT_DOUBLE_EQ(row.error, (0.33 - 0.35) / 0.35);
  EXPECT_DOUBLE_EQ(row.measured_min_s, 0.30);
  EXPECT_DOUBLE_EQ(row.measured_max_s, 0.40);
  EXPECT_DOUBLE_EQ(row.compute_s, 2);  // the round measuring the median, 0.35
  EXPECT_EQ(row.run_attempts, 3);
  EXPECT_EQ(row.round_measured_s, (std::vector<double>{0.30, 0.40, 0.35}));
  ValidationReport r;
  r.rows.push_back(row);
  summarize(r);
  EXPECT_NE(r.to_markdown().find("300 / 330, 400 / 320, 350 / 360"), std::string::npos)
      << r.to_markdown();
  EXPECT_THROW(combine_rounds({}), InvalidArgument);
}

const char* kDevice = R"({"schema": "tessera.sim.device/1", "name": "gpu",
  "matmul_tflops": {"fp32": 10, "bf16": 100}, "memory_gbps": 1000, "memory_bytes": 1024,
  "matmul_efficiency": 0.5, "memory_efficiency": 0.5, "kernel_overhead_us": 2})";

TEST(DeviceSpec, ParsesRoundTripsAndRejects) {
  const DeviceSpec d = DeviceSpec::parse(kDevice, "gpu.json");
  EXPECT_DOUBLE_EQ(d.matmul_tflops_bf16, 100);
  EXPECT_EQ(d.memory_bytes, 1024);
  EXPECT_EQ(DeviceSpec::parse(d.to_json(), "again").to_json(), d.to_json());
  auto parse = [](std::string text, const std::string& from, const std::string& to) {
    text.replace(text.find(from), from.size(), to);
    return error_of([&] { DeviceSpec::parse(text, "gpu.json"); });
  };
  expect_error(parse(kDevice, "\"fp32\": 10", "\"fp32\": 0"), {"gpu.json", "fp32", "> 0"});
  expect_error(parse(kDevice, "\"matmul_efficiency\": 0.5", "\"matmul_efficiency\": 1.5"),
               {"gpu.json", "matmul_efficiency"});
  expect_error(parse(kDevice, "\"memory_gbps\"", "\"memory_gbs\""), {"gpu.json", "memory_gb"});
  expect_error(parse(kDevice, "\"kernel_overhead_us\": 2", "\"kernel_overhead_us\": -1"),
               {"kernel_overhead_us", ">= 0"});
}

TEST(ShippedFiles, JobsSuiteAndDevicesParse) {
  const std::string dir = std::string(TESSERA_SOURCE_DIR) + "/data/sim";
  for (const char* job : {"dense-s", "dense-m", "moe-s", "moe-m", "llama-70b", "mixtral-8x7b"}) {
    SCOPED_TRACE(job);
    EXPECT_NO_THROW(TrainingJobConfig::load_file(dir + "/jobs/" + job + ".json"));
  }
  const ValidationSuite s = ValidationSuite::load_file(dir + "/validation.json");
  EXPECT_GE(s.cases.size(), 12u);
  for (const ValidationCase& c : s.cases) {
    SCOPED_TRACE(c.name);
    TrainingJobConfig job = TrainingJobConfig::load_file(c.job_file);
    if (c.layout) job.layout = *c.layout;
    if (c.zero1) job.zero1 = *c.zero1;
    EXPECT_NO_THROW(job.validate());
    EXPECT_TRUE(s.clusters.count(job.layout.world_size()));
  }
  EXPECT_NO_THROW(DeviceSpec::load_file(dir + "/a100_sxm4_80gb.json"));
}

}  // namespace
}  // namespace tessera::sim
