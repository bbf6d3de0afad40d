// tessera/eval/task.h — evaluation tasks described by lm-evaluation-harness style YAML files.
//
// A task file names a data set, Jinja templates that turn a document into a
// prompt and a target, how a model answers (free generation, one
// log-likelihood, or a choice among continuations) and how answers are
// scored. Task::load reads the file (following `include:`), loads the
// documents, renders every template for every document, and fails early and
// by name on anything wrong.
//
//   auto task = Task::load("data/eval/tasks/yue_gsm8k/yue_gsm8k_5shot.yaml",
//                          TaskLoadOptions{"/data/yue-benchmark"});
//   std::cout << task.name() << ": " << task.size() << " documents\n";
//
// Keys (as in lm-eval; every other key is an error):
//   task                name (required)
//   include             base file (relative to this one); this file's keys win
//   dataset_path        a .json (array of objects) or .jsonl file, or a folder
//                       of them, relative to TaskLoadOptions::data_root (required)
//   test_split          file name(s) inside a dataset_path folder (default: every
//                       .json/.jsonl file, sorted); not allowed for a file
//   fewshot_split       file name(s) for few-shot examples (inside the folder, or
//                       beside the dataset_path file); default: the test
//                       documents, never including the document being asked
//   output_type         generate_until | loglikelihood | multiple_choice (required)
//   doc_to_text         template of the question (required)
//   doc_to_target       template of the answer (required): text; for
//                       multiple_choice an index or the text of a choice
//   doc_to_choice       multiple_choice only (required there): a YAML list of
//                       templates, or one template whose single {{ expr }} is a list
//   description         template put in front of every prompt (a system message
//                       for chat models)
//   target_delimiter    between a question and its answer (default " ")
//   fewshot_delimiter   after each few-shot example (default "\n\n")
//   num_fewshot         examples per prompt (default 0)
//   fewshot_config      sampler: first_n | random (default random), seed (default 1234)
//   generation_kwargs   until (default [fewshot_delimiter]), max_gen_toks (256),
//                       temperature (0), do_sample (false)
//   metric_list         list of {metric, aggregation, higher_is_better, options...};
//                       default: exact_match (generate_until), acc + acc_norm
//                       (multiple_choice), perplexity + acc (loglikelihood)
//   filter_list         generate_until only: [{name, filter: [{function, ...}]}]
//                       (see filters.h); default: one pipeline "none" = take_first
//   version             task version, printed in results (default "0");
//   metadata            {version: ...}, lm-eval's spelling of the same
//
// Metrics and their options:
//   exact_match  (mean)        ignore_case, ignore_punctuation, ignore_numbers,
//                              regexes_to_ignore — see ExactMatcher
//   bleu         (bleu)        corpus BLEU-4 as sacreBLEU, 0..100. tokenize: 13a
//                              (default) | none | yue | yue_char; smooth_method:
//                              exp (default) | floor | add-k | none; smooth_value;
//                              lowercase; lexicon (for yue: word list file,
//                              relative to the task file)
//   rouge_l      (mean)        100 x ROUGE-L F1 per document. tokenize: rouge
//                              (default, rouge-score's) | none | yue | yue_char;
//                              lexicon
//   acc          (mean)        multiple_choice: argmax of summed log-probability;
//                              loglikelihood: the continuation is the greedy one
//   acc_norm     (mean)        multiple_choice: argmax of log-probability divided
//                              by the choice's length; length_unit: chars
//                              (default; Python len(), as lm-eval) | bytes (UTF-8)
//   perplexity   (perplexity)  loglikelihood: exp(-mean log-probability)
// Tokenizers: 'yue' segments with YueSegmenter, 'yue_char' per character,
// 'none' splits on whitespace, '13a' is sacreBLEU's.
//
// Errors are tessera::InvalidArgument whose message starts with the file that
// holds the key and the key path ("gsm8k.yaml: metric_list[1].aggregation: ..."),
// or, for a document, the item ("yue_mmlu.yaml: doc_to_text: Yue-MMLU/arts.json
// item 12 (doc 12): ... undefined field 'A'"); NotFound for missing files.
//
// A Task is immutable after load; copies share it; safe to use from many threads.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "tessera/eval/filters.h"
#include "tessera/eval/value.h"

namespace tessera::eval {

enum class OutputType { kGenerateUntil, kLoglikelihood, kMultipleChoice };
const char* output_type_name(OutputType type);

enum class FewshotSampler { kFirstN, kRandom };

struct GenerationKwargs {
  std::vector<std::string> until;  // stop strings; empty in the file means [fewshot_delimiter]
  int max_gen_toks = 256;
  double temperature = 0.0;
  bool do_sample = false;
};

struct MetricSpec {
  std::string metric;       // exact_match | bleu | rouge_l | acc | acc_norm | perplexity
  std::string aggregation;  // mean | bleu | perplexity
  bool higher_is_better = true;
  // exact_match
  bool ignore_case = false;
  bool ignore_punctuation = false;
  bool ignore_numbers = false;
  std::vector<std::string> regexes_to_ignore;
  // bleu / rouge_l
  std::string tokenize;  // resolved default: "13a" for bleu, "rouge" for rouge_l
  std::string smooth_method = "exp";
  std::optional<double> smooth_value;
  bool lowercase = false;
  std::string lexicon;  // absolute path when tokenize is "yue"
  // acc_norm
  std::string length_unit = "chars";
};

struct TaskConfig {
  std::string task;
  std::string source_path;  // the YAML file the task was loaded from
  std::string version = "0";
  std::string dataset_path;
  std::vector<std::string> test_split;
  std::vector<std::string> fewshot_split;
  OutputType output_type = OutputType::kGenerateUntil;
  std::string doc_to_text;
  std::string doc_to_target;
  std::vector<std::string> doc_to_choice;  // one entry: a template yielding a list
  bool doc_to_choice_is_list = false;      // true: a YAML list, one template per choice
  std::string description;
  std::string target_delimiter = " ";
  std::string fewshot_delimiter = "\n\n";
  int num_fewshot = 0;
  FewshotSampler sampler = FewshotSampler::kRandom;
  uint64_t fewshot_seed = 1234;
  GenerationKwargs generation_kwargs;
  std::vector<MetricSpec> metric_list;
  std::vector<FilterPipelineSpec> filter_list;
};

struct TaskLoadOptions {
  TaskLoadOptions() = default;
  // The common case, Task::load(path, {data_root}).
  TaskLoadOptions(std::string root) : data_root(std::move(root)) {}  // NOLINT: implicit on purpose

  // Folder that dataset_path is relative to (an absolute dataset_path ignores it).
  std::string data_root;
  // Replaces the file's num_fewshot (lm-eval's --num_fewshot); 0..1000.
  std::optional<int> num_fewshot;
  // Replaces the file's task name (empty: keep it), e.g. for a task run
  // with another num_fewshot than its file's.
  std::string task_name;
};

class Task {
 public:
  static Task load(const std::string& yaml_path, const TaskLoadOptions& options);

  const TaskConfig& config() const;
  const std::string& name() const;
  const std::string& version() const;

  // Test documents, in file order (folders: files sorted by name).
  size_t size() const;
  const Value& doc(size_t i) const;
  // "Yue-MMLU/arts.json item 12": file relative to the data root and the
  // 0-based position in it.
  const std::string& doc_source(size_t i) const;

  // Rendered templates of test document i.
  const std::string& description(size_t i) const;
  const std::string& text(size_t i) const;
  // The answer as text (multiple_choice: the gold choice).
  const std::string& target(size_t i) const;
  // multiple_choice only (empty otherwise).
  const std::vector<std::string>& choices(size_t i) const;
  // multiple_choice: index of the gold choice.
  size_t gold(size_t i) const;

  // The few-shot examples of test document i, in prompt order: indices into
  // the few-shot documents (see fewshot_text/fewshot_target). The draw is
  // lm-eval's: first_n takes the first examples; random uses one
  // random.Random(seed) for the whole task, calling sample() for documents
  // 0, 1, 2, ... in turn; with no fewshot_split one extra example is drawn
  // and the document itself dropped.
  const std::vector<size_t>& fewshot_indices(size_t i) const;
  const std::string& fewshot_text(size_t k) const;
  const std::string& fewshot_target(size_t k) const;
  size_t fewshot_size() const;

 private:
  friend struct TaskAccess;
  struct Impl;
  explicit Task(std::shared_ptr<const Impl> impl);
  std::shared_ptr<const Impl> impl_;
};

}  // namespace tessera::eval
