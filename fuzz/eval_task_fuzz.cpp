// Fuzz target: evaluation task files (tessera::eval::Task::load, YAML).
//
// Input: the bytes of a task YAML file. It is written as tasks/t/task.yaml
// in a scratch tree laid out like data/eval/: the shipped base files
// (data/eval/tasks/*/_*.yaml, which the shipped tasks `include:`) sit beside
// it, a shortened yue_lexicon.txt two levels up, and a data root with the
// first documents of each Yue-Benchmark set (from ../shared/testdata when
// present, else a few made-up documents with the same fields). So the
// shipped task files, as seeds, load for real: includes, templates over the
// documents, few-shot sampling, metrics and filters with their regexes.
// A task that loads must answer every accessor for every document.
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "fuzz_common.h"
#include "tessera/eval/task.h"

namespace fs = std::filesystem;

namespace {

constexpr size_t kDocsPerFile = 6;

// Writes the first kDocsPerFile documents of a Yue-Benchmark JSON file.
void copy_head(const fs::path& from, const fs::path& to) {
  const auto docs = nlohmann::json::parse(std::ifstream(from));
  nlohmann::json head = nlohmann::json::array();
  for (size_t i = 0; i < docs.size() && i < kDocsPerFile; ++i) head.push_back(docs[i]);
  fs::create_directories(to.parent_path());
  tessera::fuzz::write_file(to.string(), head.dump());
}

void write_made_up(const fs::path& to) {
  nlohmann::json docs = nlohmann::json::array();
  for (size_t i = 0; i < kDocsPerFile; ++i) {
    const std::string n = std::to_string(i);
    docs.push_back({{"question", "問題 " + n + " 係乜嘢？"},
                    {"answer", i % 2 ? "B" : "####" + n},
                    {"A", "甲" + n},
                    {"B", "乙"},
                    {"C", "丙"},
                    {"D", "丁"},
                    {"no", i},
                    {"en", "sentence " + n},
                    {"yue", "句子" + n},
                    {"zh", "句子" + n},
                    {"true", "真"},
                    {"false", "假"},
                    {"best_answer", "真"}});
  }
  fs::create_directories(to.parent_path());
  tessera::fuzz::write_file(to.string(), docs.dump());
}

struct Tree {
  tessera::fuzz::ScratchDir scratch;
  std::string task_path;
  std::string data_root;

  Tree() {
    const fs::path root = scratch.path();
    const fs::path src = tessera::fuzz::source_dir();
    const fs::path tasks = root / "eval" / "tasks" / "t";
    fs::create_directories(tasks);
    for (const auto& dir : fs::directory_iterator(src / "data" / "eval" / "tasks")) {
      for (const auto& f : fs::directory_iterator(dir.path())) {
        if (f.path().filename().string().rfind('_', 0) == 0)
          fs::copy_file(f.path(), tasks / f.path().filename());
      }
    }
    {
      std::ifstream in(src / "data" / "eval" / "yue_lexicon.txt");
      std::ofstream out(root / "eval" / "yue_lexicon.txt");
      std::string line;
      for (int i = 0; i < 300 && std::getline(in, line); ++i) out << line << "\n";
    }
    task_path = (tasks / "task.yaml").string();
    data_root = (root / "data").string();
    const fs::path yue = src.parent_path() / "shared" / "testdata" / "yue-benchmark";
    const char* files[] = {"Yue-GSM8K/Yue-GSM8K.json",           "Yue-ARC-C/Yue-ARC-C.json",
                           "Yue-TruthfulQA/Yue-TruthfulQA.json", "Yue-TRANS/Yue-TRANS-en-yue.json",
                           "Yue-TRANS/Yue-TRANS-zh-yue.json",    "Yue-MMLU/economics.json",
                           "Yue-MMLU/security_study.json"};
    for (const char* f : files) {
      if (fs::exists(yue / f)) {
        copy_head(yue / f, fs::path(data_root) / f);
      } else {
        write_made_up(fs::path(data_root) / f);
      }
    }
  }
};

Tree& tree() {
  static Tree t;
  return t;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  tree();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const Tree& t = tree();
  tessera::fuzz::write_file(t.task_path,
                            std::string_view(reinterpret_cast<const char*>(data), size));
  tessera::fuzz::expect_errors("Task::load", [&] {
    const auto task = tessera::eval::Task::load(t.task_path, {t.data_root});
    const bool mc = task.config().output_type == tessera::eval::OutputType::kMultipleChoice;
    for (size_t i = 0; i < task.size(); ++i) {
      task.doc(i);
      task.doc_source(i);
      task.description(i);
      task.text(i);
      task.target(i);
      if (mc)
        tessera::fuzz::require(task.gold(i) < task.choices(i).size(), "gold choice out of range");
      for (size_t k : task.fewshot_indices(i)) {
        tessera::fuzz::require(k < task.fewshot_size(), "few-shot index out of range");
        task.fewshot_text(k);
        task.fewshot_target(k);
      }
    }
  });
  return 0;
}
