// The shipped Yue-Benchmark task files against the real data: every file
// loads, every document renders, the counts are the README's, and answers
// written the way the paper expects score as correct.
#include <gtest/gtest.h>

#include <filesystem>
#include <map>

#include "eval_test_util.h"
#include "tessera/eval/request.h"
#include "tessera/eval/results.h"
#include "tessera/eval/task.h"

namespace tessera::eval {
namespace {

namespace fs = std::filesystem;

#define REQUIRE_YUE_DATA()                                                                       \
  do {                                                                                           \
    if (!testing::have_yue_data()) {                                                             \
      const std::string why = "Yue-Benchmark data not found under " + testing::yue_data_root() + \
                              " (set TESSERA_TESTDATA)";                                         \
      GTEST_SKIP() << why; /* data beside the checkout, not installed: skipped, even in CI */    \
    }                                                                                            \
  } while (0)

Task load(const std::string& relative) {
  return Task::load(testing::tasks_dir() + "/" + relative, {testing::yue_data_root()});
}

// Sizes from the benchmark's README.
const std::map<std::string, size_t> kSizes = {
    {"yue_truthfulqa", 817}, {"yue_gsm8k", 1319}, {"yue_arc_c", 1171},
    {"yue_mmlu", 3721},      {"yue_trans", 200},
};

TEST(YueTasks, EveryShippedTaskLoadsAndRendersEveryDocument) {
  REQUIRE_YUE_DATA();
  size_t files = 0;
  for (const auto& entry : fs::recursive_directory_iterator(testing::tasks_dir())) {
    const fs::path p = entry.path();
    if (p.extension() != ".yaml" || p.filename().string()[0] == '_') continue;
    ++files;
    const std::string folder = p.parent_path().filename().string();
    SCOPED_TRACE(p.string());
    const Task task = Task::load(p.string(), {testing::yue_data_root()});
    EXPECT_EQ(task.name(), p.stem().string());
    ASSERT_TRUE(kSizes.count(folder)) << folder;
    EXPECT_EQ(task.size(), kSizes.at(folder));
    const int shots = p.stem().string().find("5shot") != std::string::npos ? 5 : 0;
    EXPECT_EQ(task.config().num_fewshot, shots);
    const auto requests = build_requests(task);
    ASSERT_EQ(requests.size(), task.size());
    for (size_t i = 0; i < task.size(); ++i) {
      ASSERT_FALSE(task.text(i).empty()) << i;
      ASSERT_FALSE(task.target(i).empty()) << "empty target, doc " << i;
      ASSERT_EQ(task.fewshot_indices(i).size(), static_cast<size_t>(shots)) << i;
      for (size_t k : task.fewshot_indices(i))
        ASSERT_NE(k, i) << "doc " << i << " is its own example";
      // The question comes last, after every example.
      const std::string& prompt = requests[i].prompt;
      ASSERT_EQ(
          prompt.compare(prompt.size() - task.text(i).size(), std::string::npos, task.text(i)), 0);
      ASSERT_EQ(requests[i].generate.size() + requests[i].loglikelihood.size() > 0, true);
      const size_t user_turns = 1 + shots;
      size_t seen = 0;
      for (const auto& m : (requests[i].generate.empty() ? requests[i].loglikelihood[0].messages
                                                         : requests[i].generate[0].messages)) {
        seen += m.role == ChatRole::kUser;
      }
      ASSERT_EQ(seen, user_turns) << i;
    }
  }
  // 0/5-shot each of: TruthfulQA, GSM8K, ARC-C (gen, mc), MMLU (gen, mc), TRANS (3 directions).
  EXPECT_EQ(files, 18u);
}

TEST(YueTasks, Gsm8kMarkedAnswersScoreUnderBothFilters) {
  REQUIRE_YUE_DATA();
  const Task task = load("yue_gsm8k/yue_gsm8k_5shot.yaml");
  const auto requests = build_requests(task);
  EXPECT_EQ(task.text(0).substr(0, 3 * 3), "問題：");
  // The paper's layout: instruction, worked examples, then the question.
  EXPECT_EQ(requests[0].prompt.substr(0, requests[0].prompt.find("問題：")),
            "請逐步思考，最終答案前用「####」標記。用粵語回答下面問題。\n");
  std::vector<SampleRecord> records;
  for (size_t i = 0; i < task.size(); ++i) {
    std::string gold = task.target(i).substr(task.target(i).rfind("####") + 4);
    // A model that writes the number with its thousands separators, after
    // some working that contains other numbers.
    const std::string response = "計算：1+2=3，所以答案係 ####" + gold;
    records.push_back(score_document(task, requests[i], {{response}, {}}));
    ASSERT_EQ(records.back().filters.at(0).metrics.at(0).value, 1.0) << i << ": " << task.target(i);
    ASSERT_EQ(records.back().filters.at(1).metrics.at(0).value, 1.0) << i << ": " << task.target(i);
  }
  // Answers without the marker: the last number, canonical form, counts
  // under the paper's extraction but not under strict-match.
  const SampleRecord unmarked = score_document(task, requests[0], {{"佢每日賺 $18.00"}, {}});
  EXPECT_EQ(unmarked.filters.at(0).filter, "yue-extract");
  EXPECT_EQ(unmarked.filters.at(0).response, "18");
  EXPECT_EQ(unmarked.filters.at(0).metrics.at(0).value, 1.0);
  EXPECT_EQ(unmarked.filters.at(1).metrics.at(0).value, 0.0);
  const TaskResult result = aggregate(task, records, {0});
  EXPECT_EQ(result.rows.at(0).value, 1.0);
  EXPECT_EQ(result.n_samples, 1319u);
}

TEST(YueTasks, ArcAnswersIncludingNumericLabelsAndThreeOptionQuestions) {
  REQUIRE_YUE_DATA();
  const Task gen = load("yue_arc_c/yue_arc_c_gen_0shot.yaml");
  const Task mc = load("yue_arc_c/yue_arc_c_mc_0shot.yaml");
  // Item 121 has no option D; item 437's answer is given as "3".
  EXPECT_EQ(gen.text(121).find("\nD. "), std::string::npos);
  EXPECT_NE(gen.text(120).find("\nD. "), std::string::npos);
  EXPECT_EQ(mc.choices(121).size(), 3u);
  EXPECT_EQ(gen.target(437), "C");
  EXPECT_EQ(mc.gold(437), 2u);
  EXPECT_EQ(mc.target(437), gen.doc(437).find("C")->as_string());
  const auto gen_requests = build_requests(gen);
  const auto mc_requests = build_requests(mc);
  std::vector<SampleRecord> gen_records, mc_records;
  for (size_t i = 0; i < gen.size(); ++i) {
    ASSERT_TRUE(gen.target(i) == "A" || gen.target(i) == "B" || gen.target(i) == "C" ||
                gen.target(i) == "D")
        << i;
    ASSERT_EQ(std::string(1, static_cast<char>('A' + mc.gold(i))), gen.target(i)) << i;
    gen_records.push_back(
        score_document(gen, gen_requests[i], {{"我認為答案係（" + gen.target(i) + "）。"}, {}}));
    ASSERT_EQ(gen_records.back().filters.at(0).metrics.at(0).value, 1.0) << i;
    // Log-likelihoods that favour the gold continuation.
    DocResponses lls;
    for (size_t k = 0; k < mc.choices(i).size(); ++k) {
      lls.loglikelihoods.push_back({k == mc.gold(i) ? -1.0 : -50.0, k == mc.gold(i)});
    }
    ASSERT_EQ(mc_requests[i].loglikelihood.at(mc.gold(i)).continuation, " " + mc.target(i));
    mc_records.push_back(score_document(mc, mc_requests[i], lls));
  }
  EXPECT_EQ(aggregate(gen, gen_records, {0}).rows.at(0).value, 1.0);
  const TaskResult mc_result = aggregate(mc, mc_records, {0});
  EXPECT_EQ(mc_result.rows.at(0).metric, "acc");
  EXPECT_EQ(mc_result.rows.at(0).value, 1.0);
  EXPECT_EQ(mc_result.rows.at(1).metric, "acc_norm");
}

TEST(YueTasks, MmluCoversAllSubjectsAndTheItemWithoutOptionA) {
  REQUIRE_YUE_DATA();
  const Task gen = load("yue_mmlu/yue_mmlu_gen_5shot.yaml");
  const Task mc = load("yue_mmlu/yue_mmlu_mc_0shot.yaml");
  std::map<std::string, size_t> per_file;
  size_t missing_a = 0;
  for (size_t i = 0; i < gen.size(); ++i) {
    const std::string& src = gen.doc_source(i);
    ++per_file[src.substr(0, src.find(" item "))];
    if (gen.doc(i).find("A") == nullptr) {
      ++missing_a;
      EXPECT_EQ(src, "Yue-MMLU/security_study.json item 84");
      EXPECT_NE(gen.text(i).find("\nA. \nB. "), std::string::npos);
    }
    EXPECT_EQ(mc.choices(i), (std::vector<std::string>{"A", "B", "C", "D"}));
    EXPECT_EQ(mc.target(i), gen.target(i));
  }
  EXPECT_EQ(missing_a, 1u);
  EXPECT_EQ(per_file.size(), 22u);  // the README says 21 subjects; the folder has 22 files
  EXPECT_EQ(per_file["Yue-MMLU/arts.json"], 160u);
  // Random few-shot draws mix subjects.
  std::set<std::string> subjects;
  for (size_t k : gen.fewshot_indices(0)) subjects.insert(gen.doc_source(k).substr(0, 20));
  EXPECT_GT(subjects.size(), 1u);
}

TEST(YueTasks, TruthfulQaAndTranslationScoreSegmentedCantonese) {
  REQUIRE_YUE_DATA();
  const Task tqa = load("yue_truthfulqa/yue_truthfulqa_0shot.yaml");
  EXPECT_EQ(tqa.target(0), tqa.doc(0).find("best_answer")->as_string());
  const auto requests = build_requests(tqa, {20});
  std::vector<SampleRecord> records;
  for (size_t i = 0; i < 20; ++i) {
    records.push_back(score_document(tqa, requests[i], {{"  " + tqa.target(i)}, {}}));
    ASSERT_EQ(records.back().filters.at(0).metrics.at(1).value, 100.0) << i;  // rouge_l
  }
  const TaskResult perfect = aggregate(tqa, records, {0});
  EXPECT_EQ(perfect.rows.at(0).metric, "bleu");
  EXPECT_NEAR(perfect.rows.at(0).value, 100.0, 1e-9);

  const Task zh = load("yue_trans/yue_trans_zh_yue_0shot.yaml");
  const Task en = load("yue_trans/yue_trans_en_yue_5shot.yaml");
  const Task back = load("yue_trans/yue_trans_yue_en_0shot.yaml");
  EXPECT_EQ(zh.text(0),
            "請將下面呢句/段話直接翻譯成粵語：\n" + zh.doc(0).find("en")->as_string() + "\n翻譯：");
  EXPECT_EQ(zh.target(0), zh.doc(0).find("yue")->as_string());
  EXPECT_EQ(back.target(3), en.doc(3).find("en")->as_string());
  EXPECT_EQ(back.config().metric_list.at(0).tokenize, "13a");
  EXPECT_EQ(en.config().metric_list.at(0).tokenize, "yue");
  // Five translated examples precede the paragraph.
  const std::string prompt = build_requests(en, {1})[0].prompt;
  size_t count = 0;
  for (size_t at = prompt.find("翻譯："); at != std::string::npos;
       at = prompt.find("翻譯：", at + 1))
    ++count;
  EXPECT_EQ(count, 6u);
}

}  // namespace
}  // namespace tessera::eval
