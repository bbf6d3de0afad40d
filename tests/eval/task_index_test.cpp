// Task names as tessera-eval's --tasks resolves them (task_index.h), on a
// folder laid out like data/eval/tasks and on the shipped folder itself.
#include <gtest/gtest.h>

#include <filesystem>

#include "eval_test_util.h"
#include "tessera/core/error.h"
#include "tessera/eval/task.h"
#include "tessera/eval/task_index.h"

namespace tessera::eval {
namespace {

namespace fs = std::filesystem;

std::vector<std::string> stems(const std::vector<TaskSelection>& selected) {
  std::vector<std::string> out;
  for (const auto& s : selected) out.push_back(fs::path(s.path).stem().string());
  return out;
}

class TaskIndex : public ::testing::Test {
 protected:
  void SetUp() override {
    for (const char* name :
         {"math/_math.yaml", "math/math_0shot.yaml", "math/math_5shot.yaml", "qa/qa_gen_0shot.yaml",
          "qa/qa_mc_0shot.yaml", "qa/qa_gen_5shot.yaml", "qa/qa_mc_5shot.yaml", "solo/solo.yaml",
          "qa_extra/qa_gen_long_0shot.yaml"}) {
      dir_.write(std::string("tasks/") + name, "task: x\n");
    }
  }
  std::string tasks() const { return dir_.file("tasks"); }
  testing::TempDir dir_;
};

TEST_F(TaskIndex, NamesFollowTheRulesInOrder) {
  // Rule 2: a file by its own name (shot count from the file).
  EXPECT_EQ(stems(resolve_tasks({"solo"}, tasks())), std::vector<std::string>{"solo"});
  EXPECT_EQ(stems(resolve_tasks({"math_5shot"}, tasks())), std::vector<std::string>{"math_5shot"});
  // Rule 3: N_Kshot, K = 0 by default.
  EXPECT_EQ(stems(resolve_tasks({"math"}, tasks())), std::vector<std::string>{"math_0shot"});
  EXPECT_EQ(stems(resolve_tasks({"math"}, tasks(), 5)), std::vector<std::string>{"math_5shot"});
  // An exact N_Kshot wins over files that share the prefix.
  EXPECT_EQ(stems(resolve_tasks({"qa_gen"}, tasks())), std::vector<std::string>{"qa_gen_0shot"});
  // Rule 4: a group, sorted.
  EXPECT_EQ(stems(resolve_tasks({"qa"}, tasks(), 5)),
            (std::vector<std::string>{"qa_gen_5shot", "qa_mc_5shot"}));
  EXPECT_EQ(stems(resolve_tasks({"qa"}, tasks())),
            (std::vector<std::string>{"qa_gen_0shot", "qa_gen_long_0shot", "qa_mc_0shot"}));
  // The same file twice is selected once, in first-named order.
  EXPECT_EQ(stems(resolve_tasks({"qa_mc", "qa", "qa_mc"}, tasks())),
            (std::vector<std::string>{"qa_mc_0shot", "qa_gen_0shot", "qa_gen_long_0shot"}));
  // No override when the file has the shot count asked for.
  for (const auto& s : resolve_tasks({"math"}, tasks(), 5)) {
    EXPECT_FALSE(s.num_fewshot.has_value());
    EXPECT_TRUE(s.task_name.empty());
  }
}

TEST_F(TaskIndex, OtherShotCountsOverrideAndRename) {
  // Rule 5: no 3-shot files; the smallest shot count there is (0) is run with 3.
  const auto selected = resolve_tasks({"qa"}, tasks(), 3);
  ASSERT_EQ(stems(selected),
            (std::vector<std::string>{"qa_gen_0shot", "qa_gen_long_0shot", "qa_mc_0shot"}));
  EXPECT_EQ(selected[0].num_fewshot, 3);
  EXPECT_EQ(selected[0].task_name, "qa_gen_3shot");
  EXPECT_EQ(selected[2].task_name, "qa_mc_3shot");
  const TaskLoadOptions o = selected[0].load_options("/data");
  EXPECT_EQ(o.data_root, "/data");
  EXPECT_EQ(o.num_fewshot, 3);
  EXPECT_EQ(o.task_name, "qa_gen_3shot");
  // Rule 2 with a K: the file's own num_fewshot is replaced, the name kept.
  const auto solo = resolve_tasks({"solo"}, tasks(), 2);
  EXPECT_EQ(solo[0].num_fewshot, 2);
  EXPECT_TRUE(solo[0].task_name.empty());
}

TEST_F(TaskIndex, FilesAndErrors) {
  const std::string file = dir_.file("tasks/math/math_5shot.yaml");
  EXPECT_EQ(resolve_tasks({file}, tasks())[0].path, fs::path(file).lexically_normal().string());
  try {
    resolve_tasks({"mathh"}, tasks());
    FAIL() << "expected NotFound";
  } catch (const NotFound& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("no task named 'mathh'"), std::string::npos) << m;
    // What the folder offers, without shot suffixes and without bases.
    EXPECT_NE(m.find("math, qa_gen, qa_gen_long, qa_mc, solo"), std::string::npos) << m;
  }
  EXPECT_THROW(resolve_tasks({"absent.yaml"}, tasks()), NotFound);
  EXPECT_THROW(resolve_tasks({"math"}, dir_.file("nowhere")), NotFound);
  EXPECT_THROW(resolve_tasks({""}, tasks()), InvalidArgument);
  EXPECT_THROW(resolve_tasks({"math"}, tasks(), -1), InvalidArgument);
  dir_.write("tasks/other/solo.yaml", "task: y\n");
  EXPECT_THROW(resolve_tasks({"solo"}, tasks()), InvalidArgument);  // defined twice
}

TEST_F(TaskIndex, ListsAndSplits) {
  EXPECT_EQ(list_tasks(tasks()),
            (std::vector<std::string>{"math_0shot", "math_5shot", "qa_gen_0shot", "qa_gen_5shot",
                                      "qa_gen_long_0shot", "qa_mc_0shot", "qa_mc_5shot", "solo"}));
  EXPECT_EQ(split_task_list(" a,b ,, c "), (std::vector<std::string>{"a", "b", "c"}));
  EXPECT_TRUE(split_task_list(" , ").empty());
}

TEST(ShippedTasks, EveryYueNameResolves) {
  const std::string dir = testing::tasks_dir();
  EXPECT_EQ(stems(resolve_tasks({"yue_gsm8k"}, dir)), std::vector<std::string>{"yue_gsm8k_0shot"});
  EXPECT_EQ(stems(resolve_tasks({"yue_arc_c"}, dir, 5)),
            (std::vector<std::string>{"yue_arc_c_gen_5shot", "yue_arc_c_mc_5shot"}));
  EXPECT_EQ(stems(resolve_tasks({"yue_trans"}, dir)),
            (std::vector<std::string>{"yue_trans_en_yue_0shot", "yue_trans_yue_en_0shot",
                                      "yue_trans_zh_yue_0shot"}));
  EXPECT_EQ(
      resolve_tasks({"yue_truthfulqa", "yue_gsm8k", "yue_arc_c", "yue_mmlu", "yue_trans"}, dir, 5)
          .size(),
      9u);
  EXPECT_EQ(list_tasks(dir).size(), 18u);
}

TEST(ShippedTasks, OverriddenShotCountLoads) {
  if (!testing::have_yue_data()) {
    GTEST_SKIP() << "Yue-Benchmark data not found under " << testing::yue_data_root();
  }
  const auto selected = resolve_tasks({"yue_gsm8k"}, testing::tasks_dir(), 2);
  ASSERT_EQ(selected.size(), 1u);
  const Task task =
      Task::load(selected[0].path, selected[0].load_options(testing::yue_data_root()));
  EXPECT_EQ(task.name(), "yue_gsm8k_2shot");
  EXPECT_EQ(task.config().num_fewshot, 2);
  EXPECT_EQ(task.fewshot_indices(0).size(), 2u);
}

}  // namespace
}  // namespace tessera::eval
