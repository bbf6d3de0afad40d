// sim through its programs, as a user runs them: tessera-sim collective
// (one line and the nccl-tests table), trace --device + predict + sweep on
// the bundled A100 files, a real trace + predict on this machine,
// tessera-train under tessera-launch writing step timings, and a small
// validation suite end to end (real 2-rank runs through tessera-launch).
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "tessera/core/subprocess.h"
#include "tessera/sim/collective_model.h"
#include "tessera/sim/sweep.h"
#include "tessera/sim/training_job.h"

namespace tessera::sim {
namespace {

namespace fs = std::filesystem;

const std::string kData = std::string(TESSERA_SOURCE_DIR) + "/data/sim";

CommandResult run(std::vector<std::string> argv, int seconds = 300) {
  return run_command(argv, std::chrono::seconds(seconds), /*merge_stderr=*/true);
}

std::string temp_dir(const std::string& name) {
  const std::string dir = ::testing::TempDir() + "/" + name + "_" + std::to_string(getpid());
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

std::string read(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

TEST(TesseraSim, CollectiveOneLineAndTable) {
  const auto line = run({TESSERA_SIM_BIN, "collective", "--op", "all_reduce", "--gpus", "16",
                         "--bytes", "64M", "--cluster", "a100_ib"});
  ASSERT_TRUE(line.status.success()) << line.output;
  // The same number the library computes from the bundled file.
  CollectiveCommand cmd;
  cmd.op = CollectiveKind::kAllReduce;
  cmd.gpus = 16;
  cmd.bytes = int64_t{64} << 20;
  EXPECT_EQ(line.output,
            run_collective_command(cmd, ClusterSpec::load_file(kData + "/a100_ib.json")));
  const auto table = run({TESSERA_SIM_BIN, "collective", "--op", "all_reduce", "--gpus", "32",
                          "--cluster", kData + "/a100_ib.json", "--table"});
  ASSERT_TRUE(table.status.success()) << table.output;
  // nccl-tests format: it parses back into one measurement per size.
  const auto rows = parse_nccl_tests(table.output, "table");
  EXPECT_EQ(rows.size(), 28u);  // 8 B .. 1 GiB
  EXPECT_EQ(rows[0].shape.ranks, 32);
  const auto bad = run({TESSERA_SIM_BIN, "collective", "--op", "all_reduce", "--gpus", "16",
                        "--cluster", "no-such-cluster", "--bytes", "1K"});
  EXPECT_EQ(bad.status.code, 3);
  EXPECT_NE(bad.output.find("no-such-cluster"), std::string::npos) << bad.output;
}

TEST(TesseraSim, AnalyticalTracePredictAndSweep) {
  const std::string dir = temp_dir("sim_tools_synth");
  const auto trace = run({TESSERA_SIM_BIN, "trace", "--job", kData + "/jobs/mixtral-8x7b.json",
                          "--device", "a100_sxm4_80gb", "-o", dir + "/t.json"});
  ASSERT_TRUE(trace.status.success()) << trace.output;
  const auto predict = run({TESSERA_SIM_BIN, "predict", "--trace", dir + "/t.json", "--cluster",
                            "a100_ib", "--chrome", dir + "/tl.json"});
  ASSERT_TRUE(predict.status.success()) << predict.output;
  EXPECT_NE(predict.output.find("64 ranks on a100-ib"), std::string::npos) << predict.output;
  const auto chrome = nlohmann::json::parse(read(dir + "/tl.json"));
  EXPECT_GT(chrome.at("traceEvents").size(), 64u);
  const auto sweep = run({TESSERA_SIM_BIN, "sweep", "--job", kData + "/jobs/llama-70b.json",
                          "--layouts", "tp=8", "--world", "64", "1024", "--device",
                          "a100_sxm4_80gb", "--cluster", "a100_ib", "--csv", dir + "/s.csv"});
  ASSERT_TRUE(sweep.status.success()) << sweep.output;
  const std::string csv = read(dir + "/s.csv");
  EXPECT_NE(csv.find("\"tp=8\",64,1"), std::string::npos) << csv;
  EXPECT_NE(csv.find("\"tp=8\",1024,1"), std::string::npos) << csv;
  fs::remove_all(dir);
}

const char* kTinyJob = R"({
  "name": "tiny",
  "model": {"model_type": "llama", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 64},
  "layout": {"dp": 2},
  "batch": {"global_batch": 4, "seq_len": 16},
  "steps": 5
})";

TEST(TesseraSim, TraceHereTrainForRealAndValidate) {
  const std::string dir = temp_dir("sim_tools_real");
  std::ofstream(dir + "/tiny.json") << kTinyJob;
  // Trace on this machine and predict on the bundled 2-rank cluster.
  const auto trace = run({TESSERA_SIM_BIN, "trace", "--job", dir + "/tiny.json", "--layout", "tp=2",
                          "-o", dir + "/t.json", "--warmup", "1", "--measure", "2"});
  ASSERT_TRUE(trace.status.success()) << trace.output;
  const auto predict =
      run({TESSERA_SIM_BIN, "predict", "--trace", dir + "/t.json", "--cluster", "gloo_local_np2"});
  ASSERT_TRUE(predict.status.success()) << predict.output;
  // tessera-train for real under tessera-launch.
  const auto train = run({TESSERA_LAUNCH_BIN, "--nproc", "2", "--", TESSERA_TRAIN_BIN,
                          dir + "/tiny.json", "--timings", dir + "/timings.json", "--warmup", "1",
                          "--measure", "3", "--chrome", dir + "/measured.json"});
  ASSERT_TRUE(train.status.success()) << train.output;
  const StepTimings t = StepTimings::parse(read(dir + "/timings.json"), "timings.json");
  EXPECT_EQ(t.step_seconds.size(), 3u);
  EXPECT_EQ(t.world_size, 2);
  EXPECT_EQ(t.layout, "dp=2");
  EXPECT_GT(t.median_seconds, 0);
  // Each rank's step split: a dp=2 step all-reduces its gradients, so some
  // of it is communication, never more than the step.
  ASSERT_EQ(t.rank_comm_seconds.size(), 3u);
  for (size_t s = 0; s < 3; ++s) {
    for (int r = 0; r < 2; ++r) {
      EXPECT_GT(t.rank_comm_seconds[s][r], 0);
      EXPECT_LT(t.rank_comm_seconds[s][r], t.rank_step_seconds[s][r]);
    }
    EXPECT_DOUBLE_EQ(t.step_seconds[s],
                     std::max(t.rank_step_seconds[s][0], t.rank_step_seconds[s][1]));
  }
  // Each kind of operation over the measured steps and both ranks: a dp=2
  // step all-reduces its gradients over both ranks, the same calls on
  // each rank every step.
  ASSERT_FALSE(t.collectives.empty());
  bool gradients = false;
  for (const CollectiveTiming& c : t.collectives) {
    gradients |= c.op == "all_reduce" && c.group_size == 2 && c.bytes > 1000;
    EXPECT_EQ(c.calls % 6, 0) << c.op << " " << c.bytes;  // 3 steps x 2 ranks
    EXPECT_LE(c.min_seconds, c.median_seconds);
    EXPECT_LE(c.median_seconds, c.max_seconds);
    EXPECT_LE(c.max_seconds, t.max_seconds);
  }
  EXPECT_TRUE(gradients);
  // The measured steps as a Chrome trace: per rank three step slices, and
  // every operation the collectives table counts inside its rank's step.
  const auto chrome = nlohmann::json::parse(read(dir + "/measured.json")).at("traceEvents");
  int table_calls = 0;
  for (const CollectiveTiming& c : t.collectives) table_calls += c.calls;
  std::map<std::pair<int, int>, std::pair<double, double>> step_span;  // (rank, step) -> [ts, end]
  for (const auto& e : chrome) {
    if (e.at("ph") == "X" && e.at("cat") == "step") {
      const int step = std::stoi(e.at("name").get<std::string>().substr(5));
      step_span[{e.at("pid").get<int>(), step}] = {
          e.at("ts").get<double>(), e.at("ts").get<double>() + e.at("dur").get<double>()};
    }
  }
  EXPECT_EQ(step_span.size(), 6u);  // 2 ranks x 3 steps
  int drawn = 0;
  for (const auto& e : chrome) {
    if (e.at("ph") != "X" || e.at("cat") != "communication") continue;
    ++drawn;
    const auto span = step_span.at({e.at("pid").get<int>(), e.at("args").at("step").get<int>()});
    EXPECT_GE(e.at("ts").get<double>(), span.first);
    EXPECT_LE(e.at("ts").get<double>() + e.at("dur").get<double>(), span.second + 1.0);
    EXPECT_GE(e.at("tid").get<int>(), 1);
    EXPECT_EQ(e.at("args").at("group"), "0,1");  // dp=2: both ranks
  }
  EXPECT_EQ(drawn, table_calls);
  // --chrome needs --timings (the clock that records the operations).
  const auto no_timings = run({TESSERA_TRAIN_BIN, dir + "/tiny.json", "--chrome", dir + "/x.json"});
  EXPECT_EQ(no_timings.status.code, 2) << no_timings.output;
  // A two-case suite, end to end.
  std::ofstream(dir + "/suite.json") << R"({"schema": "tessera.sim.validation/1",
    "clusters": {"2": "gloo_local_np2"}, "warmup_steps": 1, "measured_steps": 3,
    "trace": {"warmup_steps": 1, "measured_steps": 2},
    "cases": [{"name": "tiny dp2", "job": "tiny.json"},
              {"name": "tiny tp2", "job": "tiny.json", "layout": "tp=2"}]})";
  const auto validate = run(
      {TESSERA_SIM_BIN, "validate", dir + "/suite.json", "--work-dir", dir + "/work",
       "--quiet-idle", "0", "--attempts", "1", "--json", dir + "/report.json", "--max-error", "10",
       "--max-median-error", "10"},  // the plumbing, not the accuracy (docs/sim.md reports that)
      600);
  ASSERT_TRUE(validate.status.success()) << validate.output;
  const auto report = nlohmann::json::parse(read(dir + "/report.json"));
  ASSERT_EQ(report.at("rows").size(), 2u);
  for (const auto& row : report.at("rows")) {
    EXPECT_GT(row.at("measured_s").get<double>(), 0);
    EXPECT_GT(row.at("predicted_s").get<double>(), 0);
    const double error = row.at("error").get<double>();
    EXPECT_DOUBLE_EQ(error,
                     (row.at("predicted_s").get<double>() - row.at("measured_s").get<double>()) /
                         row.at("measured_s").get<double>());
  }
  EXPECT_TRUE(fs::exists(dir + "/work/tiny_tp2.trace.json"));
  EXPECT_TRUE(fs::exists(dir + "/work/tiny_tp2.timings.json"));
  EXPECT_TRUE(fs::exists(dir + "/work/tiny_tp2.measured.json"));  // the measured steps
  EXPECT_FALSE(fs::exists(dir + "/work/tiny_tp2.measured.attempt.json"));
  EXPECT_TRUE(fs::exists(dir + "/work/tiny_tp2.timeline.json"));
  // Re-predicting from the same traces and timings runs nothing again.
  const auto again = run({TESSERA_SIM_BIN, "validate", dir + "/suite.json", "--work-dir",
                          dir + "/work", "--reuse", "--quiet-idle", "0", "--json",
                          dir + "/report2.json", "--max-error", "10", "--max-median-error", "10"});
  ASSERT_TRUE(again.status.success()) << again.output;
  const auto report2 = nlohmann::json::parse(read(dir + "/report2.json"));
  EXPECT_EQ(report2.at("rows")[1].at("measured_s"), report.at("rows")[1].at("measured_s"));
  EXPECT_EQ(report2.at("rows")[1].at("predicted_s"), report.at("rows")[1].at("predicted_s"));
  // Two rounds of one case: two traces and runs, the row holds both rounds.
  const auto rounds =
      run({TESSERA_SIM_BIN, "validate", dir + "/suite.json", "--work-dir", dir + "/work2", "--only",
           "tiny dp2", "--rounds", "2", "--quiet-idle", "0", "--attempts", "1", "--json",
           dir + "/report3.json", "--max-error", "10", "--max-median-error", "10"},
          600);
  ASSERT_TRUE(rounds.status.success()) << rounds.output;
  const auto report3 = nlohmann::json::parse(read(dir + "/report3.json"));
  ASSERT_EQ(report3.at("rows").size(), 1u);
  EXPECT_EQ(report3.at("rows")[0].at("round_measured_s").size(), 2u);
  EXPECT_TRUE(fs::exists(dir + "/work2/tiny_dp2.r2.timings.json"));
  // The host measured before the round, and the round predicted with it:
  // the cluster it wrote carries the measured figures.
  const auto host =
      run({TESSERA_SIM_BIN, "validate", dir + "/suite.json", "--work-dir", dir + "/work3", "--only",
           "tiny dp2", "--host-job", dir + "/tiny.json", "--host-repeats", "1", "--quiet-idle", "0",
           "--attempts", "1", "--max-error", "10", "--max-median-error", "10"},
          600);
  ASSERT_TRUE(host.status.success()) << host.output;
  const auto measured = nlohmann::json::parse(read(dir + "/work3/host.r1.np2.json"));
  const auto cluster = nlohmann::json::parse(read(dir + "/work3/host.r1.np2.cluster.json"));
  ASSERT_EQ(measured.at("compute_slowdown").size(), 2u);
  EXPECT_EQ(cluster.at("topology").at("host_compute_slowdown"), measured.at("compute_slowdown"));
  EXPECT_EQ(cluster.at("topology").at("host_lockstep_slowdown"), measured.at("lockstep_slowdown"));
  EXPECT_EQ(cluster.at("topology").at("host_sync_us"), measured.at("sync_us"));
  // The median over rounds, re-predicted from the same measurements: of
  // one round, that round's figures.
  const auto median =
      run({TESSERA_SIM_BIN, "validate", dir + "/suite.json", "--work-dir", dir + "/work3", "--only",
           "tiny dp2", "--host-job", dir + "/tiny.json", "--host-median", "--reuse", "--quiet-idle",
           "0", "--max-error", "10", "--max-median-error", "10"});
  ASSERT_TRUE(median.status.success()) << median.output;
  const auto pooled = nlohmann::json::parse(read(dir + "/work3/host.median.np2.cluster.json"));
  EXPECT_EQ(pooled.at("topology").at("host_compute_slowdown"), measured.at("compute_slowdown"));
  // Per case: the case's own step measured once, its two slowdowns in the
  // case's cluster, the cluster file's straggler and load figures kept.
  const auto per_case =
      run({TESSERA_SIM_BIN, "validate", dir + "/suite.json", "--work-dir", dir + "/work3", "--only",
           "tiny dp2", "--host-per-case", "--host-repeats", "1", "--reuse", "--quiet-idle", "0",
           "--max-error", "10", "--max-median-error", "10"},
          600);
  ASSERT_TRUE(per_case.status.success()) << per_case.output;
  const auto own = nlohmann::json::parse(read(dir + "/work3/tiny_dp2.host.json"));
  const auto own_cluster = nlohmann::json::parse(read(dir + "/work3/tiny_dp2.host.cluster.json"));
  const auto shipped = nlohmann::json::parse(read(kData + "/gloo_local_np2.json"));
  ASSERT_EQ(own.at("compute_slowdown").size(), 2u);
  EXPECT_EQ(own.at("sync_us"), nlohmann::json::array({0.0, 0.0}));  // --compute-only
  EXPECT_TRUE(own.at("comm_load").empty());
  EXPECT_EQ(own_cluster.at("topology").at("host_compute_slowdown"), own.at("compute_slowdown"));
  EXPECT_EQ(own_cluster.at("topology").at("host_lockstep_slowdown"), own.at("lockstep_slowdown"));
  EXPECT_EQ(own_cluster.at("topology").at("host_sync_us"),
            shipped.at("topology").at("host_sync_us"));
  EXPECT_EQ(own_cluster.at("topology").at("host_sync_skew"),
            shipped.at("topology").at("host_sync_skew"));
  // One job's figures per round and per-case figures do not mix.
  const auto both =
      run({TESSERA_SIM_BIN, "validate", dir + "/suite.json", "--work-dir", dir + "/work3",
           "--host-per-case", "--host-job", dir + "/tiny.json", "--reuse", "--quiet-idle", "0"});
  EXPECT_EQ(both.status.code, 3) << both.output;
  EXPECT_NE(both.output.find("host_per_case and host_job are exclusive"), std::string::npos)
      << both.output;
  fs::remove_all(dir);
}

TEST(TesseraTrain, BadJobFileIsAClearError) {
  const std::string dir = temp_dir("sim_tools_bad");
  // A complete job but for a misspelt layout axis.
  std::string bad = kTinyJob;
  const size_t at = bad.find("\"dp\": 2");
  ASSERT_NE(at, std::string::npos);
  bad.replace(at, 4, "\"tq\"");
  std::ofstream(dir + "/bad.json") << bad;
  const auto r = run({TESSERA_TRAIN_BIN, dir + "/bad.json"});
  EXPECT_EQ(r.status.code, 3);
  EXPECT_NE(r.output.find("bad.json"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("tq"), std::string::npos) << r.output;
  fs::remove_all(dir);
}

}  // namespace
}  // namespace tessera::sim
