// Helpers shared by the eval tests: temporary folders, where the Yue-Benchmark
// data and the shipped task files are, and running the reference Python
// packages (sacrebleu, rouge-score) for cross-checks.
//
// Needs TESSERA_SOURCE_DIR (the repository root) as a compile definition.
#pragma once

#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

namespace tessera::eval::testing {

inline std::string source_dir() { return TESSERA_SOURCE_DIR; }

// $TESSERA_TESTDATA, else shared/testdata beside the repository.
inline std::string testdata_dir() {
  if (const char* env = std::getenv("TESSERA_TESTDATA")) return env;
  return source_dir() + "/../shared/testdata";
}

inline std::string yue_data_root() { return testdata_dir() + "/yue-benchmark"; }
inline bool have_yue_data() {
  return std::filesystem::is_directory(yue_data_root() + "/Yue-GSM8K");
}

inline std::string tasks_dir() { return source_dir() + "/data/eval/tasks"; }
inline std::string lexicon_path() { return source_dir() + "/data/eval/yue_lexicon.txt"; }

// A fresh directory under the system temp dir, removed when destroyed.
class TempDir {
 public:
  TempDir() {
    std::string pattern =
        (std::filesystem::temp_directory_path() / "tessera_eval_test_XXXXXX").string();
    std::vector<char> buf(pattern.begin(), pattern.end());
    buf.push_back('\0');
    const char* made = mkdtemp(buf.data());
    if (made == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = made;
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }
  std::string file(const std::string& name) const { return path_ + "/" + name; }
  // Writes `content` to `name` (creating parent folders) and returns the path.
  std::string write(const std::string& name, const std::string& content) const {
    const std::filesystem::path p = file(name);
    std::filesystem::create_directories(p.parent_path());
    std::ofstream out(p, std::ios::binary);
    out << content;
    return p.string();
  }

 private:
  std::string path_;
};

inline std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

// The interpreter for the reference packages: $TESSERA_PYTHON, else
// build/pyenv/bin/python in the source tree. Returns "" and sets *why when it
// is missing or cannot import every module in `modules`.
inline std::string find_python(const std::vector<std::string>& modules, std::string* why) {
  std::string python = source_dir() + "/build/pyenv/bin/python";
  if (const char* env = std::getenv("TESSERA_PYTHON")) python = env;
  if (!std::filesystem::exists(python)) {
    *why = "Python interpreter '" + python +
           "' not found (set TESSERA_PYTHON, or create build/pyenv: python3 -m venv "
           "--system-site-packages build/pyenv && build/pyenv/bin/pip install sacrebleu "
           "rouge-score pycantonese)";
    return "";
  }
  std::string imports = "import sys";
  for (const auto& m : modules) imports += "; import " + m;
  const std::string cmd = "'" + python + "' -c '" + imports + "' >/dev/null 2>&1";
  if (std::system(cmd.c_str()) != 0) {
    std::string list;
    for (const auto& m : modules) list += (list.empty() ? "" : ", ") + m;
    *why = "'" + python + "' cannot import " + list + " (pip install sacrebleu rouge-score)";
    return "";
  }
  return python;
}

inline bool running_in_ci() {
  const char* ci = std::getenv("CI");
  return ci != nullptr && std::string(ci) == "true";
}

// Runs `script` with `python`, passing `input_path` as its argument, and
// returns what it printed. Fails the test (empty result) on a non-zero exit.
inline std::string run_python(const std::string& python, const TempDir& dir,
                              const std::string& script, const std::string& input_path) {
  const std::string script_path = dir.write("check.py", script);
  const std::string out_path = dir.file("python_out.txt");
  const std::string err_path = dir.file("python_err.txt");
  const std::string cmd = "'" + python + "' '" + script_path + "' '" + input_path + "' > '" +
                          out_path + "' 2> '" + err_path + "'";
  const int rc = std::system(cmd.c_str());
  EXPECT_EQ(rc, 0) << "python failed: " << read_file(err_path);
  return rc == 0 ? read_file(out_path) : "";
}

}  // namespace tessera::eval::testing

// In a TEST body: the interpreter with `modules`, else a failure under CI=true
// and a skip elsewhere.
#define TESSERA_EVAL_REQUIRE_PYTHON(var, ...)                          \
  std::string var;                                                     \
  {                                                                    \
    std::string why_;                                                  \
    var = ::tessera::eval::testing::find_python({__VA_ARGS__}, &why_); \
    if (var.empty()) {                                                 \
      if (::tessera::eval::testing::running_in_ci()) {                 \
        FAIL() << "CI=true needs the reference packages: " << why_;    \
      } else {                                                         \
        GTEST_SKIP() << why_;                                          \
      }                                                                \
    }                                                                  \
  }
