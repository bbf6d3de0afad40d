#include "test_main.h"

#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

namespace tessera::testutil {
namespace {

// Records each skipped test and the message GTEST_SKIP gave.
class SkipRecorder : public ::testing::EmptyTestEventListener {
 public:
  void OnTestPartResult(const ::testing::TestPartResult& result) override {
    if (result.skipped()) reason_ = result.message();
  }
  void OnTestStart(const ::testing::TestInfo&) override { reason_.clear(); }
  void OnTestEnd(const ::testing::TestInfo& info) override {
    if (info.result()->Skipped()) {
      skipped_.push_back(std::string(info.test_suite_name()) + "." + info.name() + ": " +
                         (reason_.empty() ? "(no reason given)" : reason_));
    }
  }
  const std::vector<std::string>& skipped() const { return skipped_; }

 private:
  std::string reason_;
  std::vector<std::string> skipped_;
};

}  // namespace

bool ci() {
  const char* v = std::getenv("CI");
  return v != nullptr &&
         (std::strcmp(v, "true") == 0 || std::strcmp(v, "1") == 0 || std::strcmp(v, "yes") == 0);
}

int run_all_tests() {
  auto* recorder = new SkipRecorder;  // owned by gtest's listener list
  ::testing::UnitTest::GetInstance()->listeners().Append(recorder);
  const int failed = RUN_ALL_TESTS();
  for (const std::string& s : recorder->skipped()) std::cout << "[ SKIPPED  ] " << s << "\n";
  std::cout.flush();
  if (failed != 0) return 1;
  return recorder->skipped().empty() ? 0 : kSkippedExitCode;
}

}  // namespace tessera::testutil
