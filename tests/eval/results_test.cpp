#include "tessera/eval/results.h"

#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <nlohmann/json.hpp>

#include "eval_test_util.h"
#include "tessera/core/error.h"
#include "tessera/eval/evaluator.h"
#include "tessera/eval/metrics.h"
#include "tessera/eval/segmenter.h"
#include "tessera/eval/task.h"

namespace tessera::eval {
namespace {

using json = nlohmann::json;

// A backend whose answers a test scripts; it records what it was asked.
class ScriptedBackend : public Backend {
 public:
  std::function<std::string(const GenerateRequest&)> answer;
  std::function<LoglikelihoodResult(const LoglikelihoodRequest&)> score;
  std::vector<size_t> batch_sizes;
  std::vector<std::string> contexts;
  // Throws Unavailable on the call with this index (0-based), once.
  int fail_on_call = -1;
  bool drop_one = false;  // returns one result too few

  std::vector<std::string> generate(const std::vector<GenerateRequest>& requests) override {
    before_call(requests.size());
    std::vector<std::string> out;
    for (const auto& r : requests) {
      contexts.push_back(r.context);
      out.push_back(answer(r));
    }
    if (drop_one) out.pop_back();
    return out;
  }
  std::vector<LoglikelihoodResult> loglikelihood(
      const std::vector<LoglikelihoodRequest>& requests) override {
    before_call(requests.size());
    std::vector<LoglikelihoodResult> out;
    for (const auto& r : requests) {
      contexts.push_back(r.context);
      out.push_back(score(r));
    }
    return out;
  }

 private:
  void before_call(size_t n) {
    if (static_cast<int>(batch_sizes.size()) == fail_on_call) {
      fail_on_call = -1;
      throw Unavailable("endpoint went away");
    }
    batch_sizes.push_back(n);
  }
};

class ResultsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    json docs = json::array();
    for (int i = 0; i < 10; ++i) {
      docs.push_back({{"q", "第" + std::to_string(i) + "題"},
                      {"answer", std::string(1, static_cast<char>('A' + i % 4))},
                      {"ref", "我哋今日去咗旅行 " + std::to_string(i)}});
    }
    dir_.write("data/d.json", docs.dump());
    dir_.write("data/mc.json", R"([{"c": ["a", "bbbbbbbb"], "g": 1}, {"c": ["是", "ab"], "g": 0},
                                    {"c": ["x", "y"], "g": 0}])");
  }
  Task load(const std::string& yaml) {
    return Task::load(dir_.write("task.yaml", yaml), {dir_.file("data")});
  }

  testing::TempDir dir_;
};

constexpr const char* kLetterTask = R"(task: letters
version: "3"
dataset_path: d.json
output_type: generate_until
doc_to_text: "{{ q }}"
doc_to_target: "{{ answer }}"
num_fewshot: 1
fewshot_config: {sampler: first_n}
filter_list:
  - name: letter
    filter:
      - function: choice_letter
      - function: take_first
  - name: raw
    filter:
      - function: take_first
metric_list:
  - metric: exact_match
)";

TEST_F(ResultsTest, ScoresGenerationsPerFilter) {
  const Task task = load(kLetterTask);
  const auto requests = build_requests(task);
  const SampleRecord r = score_document(task, requests[2], {{"答案係 C"}, {}});
  EXPECT_EQ(r.task, "letters");
  EXPECT_EQ(r.doc_index, 2u);
  EXPECT_EQ(r.target, "C");
  EXPECT_EQ(r.source, "d.json item 2");
  ASSERT_EQ(r.filters.size(), 2u);
  EXPECT_EQ(r.filters[0].filter, "letter");
  EXPECT_EQ(r.filters[0].response, "C");
  EXPECT_EQ(r.filters[0].metrics.at(0).value, 1.0);
  EXPECT_EQ(r.filters[1].response, "答案係 C");
  EXPECT_EQ(r.filters[1].metrics.at(0).value, 0.0);
  EXPECT_THROW(score_document(task, requests[2], {{}, {}}), InvalidArgument);
}

TEST_F(ResultsTest, BleuAndRougeUseTheMetricTokenizer) {
  const Task task = load(
      "task: tr\ndataset_path: d.json\noutput_type: generate_until\n"
      "doc_to_text: \"{{ q }}\"\ndoc_to_target: \"{{ ref }}\"\nmetric_list:\n"
      "  - metric: bleu\n    tokenize: yue\n    lexicon: " +
      testing::lexicon_path() + "\n  - metric: rouge_l\n    tokenize: yue_char\n");
  const auto requests = build_requests(task);
  std::vector<SampleRecord> records;
  std::vector<Tokens> hyps, refs;
  const auto seg = YueSegmenter::load(testing::lexicon_path());
  for (size_t i = 0; i < task.size(); ++i) {
    const std::string response = i % 2 ? "我哋今日去咗旅行" : "今日好開心 " + std::to_string(i);
    records.push_back(score_document(task, requests[i], {{response}, {}}));
    hyps.push_back(seg.segment(response));
    refs.push_back(seg.segment(task.target(i)));
    const auto& m = records.back().filters.at(0).metrics;
    EXPECT_EQ(m.at(0).reference, task.target(i));
    EXPECT_EQ(m.at(0).prediction, response);
    EXPECT_NEAR(
        m.at(1).value,
        100.0 * rouge_l(segment_characters(task.target(i)), segment_characters(response)).fmeasure,
        1e-12);
  }
  const TaskResult result = aggregate(task, records, {200});
  ASSERT_EQ(result.rows.size(), 2u);
  EXPECT_EQ(result.rows[0].metric, "bleu");
  EXPECT_NEAR(result.rows[0].value, corpus_bleu(hyps, {refs}).score, 1e-9);
  ASSERT_TRUE(result.rows[0].stderr_value.has_value());
  EXPECT_GT(*result.rows[0].stderr_value, 0.0);
  // BLEU's bootstrap is capped at 100 resamples, as lm-eval caps it: 200
  // iterations give the same estimate as 100.
  EXPECT_EQ(*result.rows[0].stderr_value, *aggregate(task, records, {100}).rows[0].stderr_value);
}

TEST_F(ResultsTest, MultipleChoiceAccAndNormalisedAcc) {
  const std::string yaml = R"(task: mc
dataset_path: mc.json
output_type: multiple_choice
doc_to_text: "?"
doc_to_choice: "{{ c }}"
doc_to_target: "{{ g }}"
metric_list:
  - metric: acc
  - metric: acc_norm
)";
  const Task task = load(yaml);
  const auto requests = build_requests(task);
  // Doc 0: "a" (1 char) at -2, "bbbbbbbb" (8 chars) at -4: acc picks "a",
  // acc_norm picks -4/8 > -2/1 -> "bbbbbbbb", which is gold.
  const SampleRecord r0 = score_document(task, requests[0], {{}, {{-2.0, true}, {-4.0, false}}});
  EXPECT_EQ(r0.filters.at(0).response, "a");
  EXPECT_EQ(r0.filters.at(0).metrics.at(0).value, 0.0);
  EXPECT_EQ(r0.filters.at(0).metrics.at(1).value, 1.0);
  // Doc 1: "是" is 1 character but 3 bytes; "ab" is 2 of each.
  const DocResponses lls{{}, {{-3.0, false}, {-5.0, false}}};
  EXPECT_EQ(score_document(task, requests[1], lls).filters.at(0).metrics.at(1).value,
            0.0);  // chars: picks "ab"
  const Task bytes = load(std::string(yaml) + "    length_unit: bytes\n");
  EXPECT_EQ(score_document(bytes, build_requests(bytes)[1], lls).filters.at(0).metrics.at(1).value,
            1.0);
  // Ties go to the first choice, as numpy.argmax.
  EXPECT_EQ(score_document(task, requests[2], {{}, {{-1.0, true}, {-1.0, true}}})
                .filters[0]
                .metrics[0]
                .value,
            1.0);
  EXPECT_THROW(score_document(task, requests[0], {{}, {{-1.0, true}}}), InvalidArgument);

  std::vector<SampleRecord> records = {
      r0, score_document(task, requests[1], lls),
      score_document(task, requests[2], {{}, {{-1.0, true}, {-2.0, true}}})};
  const TaskResult result = aggregate(task, records);
  EXPECT_NEAR(result.rows[0].value, 2.0 / 3, 1e-15);  // acc: 0, 1, 1
  EXPECT_NEAR(*result.rows[0].stderr_value, mean_stderr({0, 1, 1}), 1e-15);
  EXPECT_NEAR(result.rows[1].value, 2.0 / 3, 1e-15);  // acc_norm: 1, 0, 1
  EXPECT_EQ(result.rows[1].filter, "none");
  // Bootstrapped means: close to the analytic value, and reproducible.
  AggregateOptions boot;
  boot.bootstrap_means = true;
  boot.bootstrap_iters = 1000;
  const double b = *aggregate(task, records, boot).rows[0].stderr_value;
  EXPECT_EQ(b, *aggregate(task, records, boot).rows[0].stderr_value);
  EXPECT_NEAR(b, mean_stderr({0, 1, 1}) * std::sqrt(2.0 / 3), 0.05);
  // No standard errors when disabled or for a single document.
  EXPECT_FALSE(aggregate(task, records, {0}).rows[0].stderr_value.has_value());
  EXPECT_FALSE(aggregate(task, {r0}).rows[0].stderr_value.has_value());
  // Bad record sets.
  EXPECT_THROW(aggregate(task, {r0, r0}), InvalidArgument);
  EXPECT_THROW(aggregate(task, {}), InvalidArgument);
  SampleRecord other = r0;
  other.task = "other";
  EXPECT_THROW(aggregate(task, {other}), InvalidArgument);
}

TEST_F(ResultsTest, LoglikelihoodPerplexity) {
  const Task task = load(
      "task: ll\ndataset_path: d.json\noutput_type: loglikelihood\n"
      "doc_to_text: \"{{ q }}\"\ndoc_to_target: \"{{ answer }}\"\n");
  const auto requests = build_requests(task, {3});
  std::vector<SampleRecord> records;
  const double lls[] = {-1.0, -2.0, -6.0};
  for (size_t i = 0; i < 3; ++i) {
    records.push_back(score_document(task, requests[i], {{}, {{lls[i], i == 0}}}));
  }
  const TaskResult r = aggregate(task, records, {1000});
  EXPECT_EQ(r.rows[0].metric, "perplexity");
  EXPECT_FALSE(r.rows[0].higher_is_better);
  EXPECT_NEAR(r.rows[0].value, std::exp(3.0), 1e-12);
  EXPECT_EQ(r.rows[1].metric, "acc");
  EXPECT_NEAR(r.rows[1].value, 1.0 / 3, 1e-15);
}

TEST(ResultsFormat, TableLikeLmEval) {
  TaskResult t;
  t.task = "t";
  t.version = "1";
  t.n_shot = 5;
  t.rows = {{"strict-match", "exact_match", true, 0.5, 0.1},
            {"flexible", "exact_match", true, 0.25, std::nullopt}};
  EXPECT_EQ(format_results_table({t}),
            "|Tasks|Version|   Filter   |n-shot|  Metric   |   |Value |   |Stderr|\n"
            "|-----|------:|------------|-----:|-----------|---|-----:|---|-----:|\n"
            "|t    |      1|flexible    |     5|exact_match|↑  |0.2500|±  |   N/A|\n"
            "|     |       |strict-match|     5|exact_match|↑  |0.5000|±  |0.1000|\n");
  t.n_samples = 7;
  t.n_total = 10;
  const json j = json::parse(results_to_json({t}));
  EXPECT_EQ(j["results"]["t"]["exact_match,strict-match"], 0.5);
  EXPECT_EQ(j["results"]["t"]["exact_match_stderr,strict-match"], 0.1);
  EXPECT_EQ(j["results"]["t"]["exact_match_stderr,flexible"], "N/A");
  EXPECT_EQ(j["versions"]["t"], "1");
  EXPECT_EQ(j["n-shot"]["t"], 5);
  EXPECT_EQ(j["higher_is_better"]["t"]["exact_match"], true);
  EXPECT_EQ(j["n-samples"]["t"]["effective"], 7);
  EXPECT_EQ(j["n-samples"]["t"]["original"], 10);
}

SampleRecord sample_record() {
  SampleRecord r;
  r.task = "t";
  r.doc_index = 4;
  r.source = "x.json item 4";
  r.prompt = "問題：\n\"quoted\"";
  r.target = "B";
  r.choices = {"a", "b"};
  r.responses = {"B!"};
  r.loglikelihoods = {{-INFINITY, false}, {-0.25, true}};
  r.filters = {{"f", "B", {{"exact_match", 1.0, "", ""}, {"bleu", 0, "ref text", "pred text"}}}};
  return r;
}

TEST(SampleLog, RecordsRoundTrip) {
  const SampleRecord r = sample_record();
  const std::string line = sample_record_to_json(r);
  EXPECT_EQ(line.find('\n'), std::string::npos);
  const SampleRecord back = sample_record_from_json(line, "test");
  EXPECT_EQ(back.task, r.task);
  EXPECT_EQ(back.doc_index, r.doc_index);
  EXPECT_EQ(back.prompt, r.prompt);
  EXPECT_EQ(back.choices, r.choices);
  EXPECT_EQ(back.responses, r.responses);
  ASSERT_EQ(back.loglikelihoods.size(), 2u);
  EXPECT_TRUE(std::isinf(back.loglikelihoods[0].logprob) && back.loglikelihoods[0].logprob < 0);
  EXPECT_EQ(back.loglikelihoods[1].logprob, -0.25);
  EXPECT_TRUE(back.loglikelihoods[1].is_greedy);
  ASSERT_EQ(back.filters.size(), 1u);
  EXPECT_EQ(back.filters[0].metrics[0].value, 1.0);
  EXPECT_EQ(back.filters[0].metrics[1].reference, "ref text");
  EXPECT_EQ(back.filters[0].metrics[1].prediction, "pred text");
  EXPECT_THROW(sample_record_from_json("{\"task\": \"t\"}", "test"), DataLoss);
}

TEST(SampleLog, ResumeToleratesACutOffLastLine) {
  testing::TempDir dir;
  const std::string path = dir.file("log.jsonl");
  EXPECT_TRUE(read_sample_log(path).records.empty());  // no file yet
  SampleRecord a = sample_record(), b = sample_record(), c = sample_record();
  a.doc_index = 0;
  b.doc_index = 1;
  c.doc_index = 2;
  {
    SampleLogWriter w(path, 0);
    w.append(a);
    w.append(b);
  }
  const std::string complete = testing::read_file(path);
  // The process died halfway through writing c.
  const std::string c_line = sample_record_to_json(c);
  dir.write("log.jsonl", complete + c_line.substr(0, c_line.size() / 2));
  const SampleLog log = read_sample_log(path, "t");
  EXPECT_TRUE(log.truncated_last_line);
  EXPECT_EQ(log.done, (std::set<size_t>{0, 1}));
  EXPECT_EQ(log.valid_bytes, complete.size());
  // Appending after the cut drops the partial line.
  {
    SampleLogWriter w(path, log.valid_bytes);
    w.append(c);
  }
  const SampleLog again = read_sample_log(path);
  EXPECT_FALSE(again.truncated_last_line);
  EXPECT_EQ(again.done, (std::set<size_t>{0, 1, 2}));

  // A complete record missing only its newline is kept, and the writer adds
  // the newline before the next record.
  dir.write("log.jsonl", complete + c_line);
  const SampleLog no_newline = read_sample_log(path);
  EXPECT_FALSE(no_newline.truncated_last_line);
  EXPECT_EQ(no_newline.done.size(), 3u);
  SampleRecord d = sample_record();
  d.doc_index = 3;
  {
    SampleLogWriter w(path, no_newline.valid_bytes);
    w.append(d);
  }
  EXPECT_EQ(read_sample_log(path).done.size(), 4u);
}

TEST(SampleLog, CorruptionIsDataLoss) {
  testing::TempDir dir;
  const std::string good = sample_record_to_json(sample_record());
  const std::string path = dir.write("bad.jsonl", good + "\n{not json}\n" + good + "\n");
  try {
    read_sample_log(path);
    FAIL() << "no throw";
  } catch (const DataLoss& e) {
    EXPECT_NE(e.message().find(path + ":2"), std::string::npos) << e.message();
  }
  const std::string dup = dir.write("dup.jsonl", good + "\n" + good + "\n");
  EXPECT_THROW(read_sample_log(dup), DataLoss);
  const std::string other = dir.write("other.jsonl", good + "\n");
  EXPECT_THROW(read_sample_log(other, "another_task"), InvalidArgument);
}

TEST_F(ResultsTest, RunTaskBatchesAndResumes) {
  const Task task = load(kLetterTask);
  // Right for even documents, a refusal for odd ones.
  auto answer = [&](const GenerateRequest& r) -> std::string {
    for (size_t i = 0; i < task.size(); ++i) {
      if (r.context.size() >= task.text(i).size() &&
          r.context.compare(r.context.size() - task.text(i).size(), std::string::npos,
                            task.text(i)) == 0) {
        return i % 2 == 0 ? "答案係 " + task.target(i) : "唔知";
      }
    }
    return "?";
  };
  ScriptedBackend fresh;
  fresh.answer = answer;
  RunOptions options;
  options.batch_size = 4;
  const RunReport full = run_task(task, fresh, options);
  EXPECT_EQ(fresh.batch_sizes, (std::vector<size_t>{4, 4, 2}));
  EXPECT_EQ(full.records.size(), 10u);
  EXPECT_NEAR(full.result.rows.at(0).value, 0.5, 1e-15);  // letter filter
  EXPECT_EQ(full.result.rows.at(1).value, 0.0);           // raw filter
  EXPECT_EQ(full.result.version, "3");
  EXPECT_EQ(full.result.n_shot, 1);

  // An interrupted run: the endpoint fails on the third call.
  options.sample_log_path = dir_.file("run.jsonl");
  ScriptedBackend flaky;
  flaky.answer = answer;
  flaky.fail_on_call = 2;
  EXPECT_THROW(run_task(task, flaky, options), Unavailable);
  EXPECT_EQ(read_sample_log(options.sample_log_path).done.size(), 8u);
  // Simulate a crash in the middle of writing the next record.
  const std::string log_text = testing::read_file(options.sample_log_path);
  dir_.write("run.jsonl", log_text + "{\"task\": \"letters\", \"doc_ind");

  ScriptedBackend resumed;
  resumed.answer = answer;
  const RunReport second = run_task(task, resumed, options);
  EXPECT_EQ(second.resumed, 8u);
  EXPECT_TRUE(second.log_was_truncated);
  EXPECT_EQ(resumed.batch_sizes, (std::vector<size_t>{2}));  // only documents 8 and 9
  ASSERT_EQ(second.records.size(), 10u);
  for (size_t i = 0; i < 10; ++i) {
    EXPECT_EQ(second.records[i].doc_index, i);
    EXPECT_EQ(second.records[i].prompt, full.records[i].prompt);
  }
  EXPECT_EQ(second.result.rows.at(0).value, full.result.rows.at(0).value);
  EXPECT_EQ(second.result.rows.at(0).stderr_value, full.result.rows.at(0).stderr_value);
  EXPECT_EQ(read_sample_log(options.sample_log_path).done.size(), 10u);

  // A log written for other prompts is refused.
  const Task changed = load(
      std::string(kLetterTask).replace(std::string(kLetterTask).find("{{ q }}"), 7, "Q{{ q }}"));
  ScriptedBackend unused;
  unused.answer = answer;
  EXPECT_THROW(run_task(changed, unused, options), FailedPrecondition);
  // A backend that returns too few results.
  ScriptedBackend short_backend;
  short_backend.answer = answer;
  short_backend.drop_one = true;
  EXPECT_THROW(run_task(task, short_backend, RunOptions{}), Internal);
}

TEST_F(ResultsTest, RunTaskKeepsMultipleChoiceDocumentsWhole) {
  const Task task = load(R"(task: mc
dataset_path: mc.json
output_type: multiple_choice
doc_to_text: "?"
doc_to_choice: "{{ c }}"
doc_to_target: "{{ g }}"
)");
  ScriptedBackend backend;
  backend.score = [](const LoglikelihoodRequest& r) {
    return LoglikelihoodResult{-static_cast<double>(r.continuation.size()), false};
  };
  RunOptions options;
  options.batch_size = 3;
  const RunReport report = run_task(task, backend, options);
  // Two choices per document: 2 + 2 would pass 3, so each call holds one document.
  EXPECT_EQ(backend.batch_sizes, (std::vector<size_t>{2, 2, 2}));
  EXPECT_EQ(report.records.size(), 3u);
}

}  // namespace
}  // namespace tessera::eval
