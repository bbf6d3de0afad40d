// tessera/eval/results.h — scoring documents, aggregating, and the logs lm-eval users expect.
//
//   SampleRecord r = score_document(task, requests[i], responses);   // per document
//   TaskResult t = aggregate(task, records);                          // per task
//   std::cout << format_results_table({t});                           // lm-eval's table
//   write results_to_json({t}) and one sample_record_to_json(r) line per document.
//
// Per-document values: exact_match, acc, acc_norm are 0/1; rouge_l is
// 100 x F1; bleu and perplexity are corpus metrics, so a document carries
// its item (reference and prediction, or the log-probability) and the
// aggregate computes the score over all items (BLEU 0..100, as lm-eval).
//
// Standard errors follow lm-eval: mean metrics use mean_stderr (or a
// bootstrap with AggregateOptions::bootstrap_means); bleu is bootstrapped
// with min(bootstrap_iters, 100) resamples; perplexity with bootstrap_iters;
// none for fewer than 2 documents or bootstrap_iters <= 0.
//
// Sample logs are JSON Lines, one document per line, written as documents
// finish; read_sample_log() lets an interrupted run resume: it returns the
// finished documents and tolerates (and reports) a cut-off last line.
//
// Functions are thread-safe; SampleLogWriter is not (one writer per file).
#pragma once

#include <cstddef>
#include <cstdint>
#include <fstream>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "tessera/eval/request.h"

namespace tessera::eval {

class Task;

// One metric's value for one document under one filter.
struct MetricValue {
  std::string metric;
  double value = 0;  // mean metrics; for perplexity the continuation's log-probability
  // bleu only: the item the corpus score is computed from.
  std::string reference;
  std::string prediction;
};

struct FilterResult {
  std::string filter;    // pipeline name ("none" for log-likelihood tasks)
  std::string response;  // the filtered response (multiple_choice: the chosen choice)
  std::vector<MetricValue> metrics;
};

struct SampleRecord {
  std::string task;
  size_t doc_index = 0;
  std::string source;  // Task::doc_source
  std::string prompt;
  std::string target;
  std::vector<std::string> choices;                 // multiple_choice
  std::vector<std::string> responses;               // generate_until
  std::vector<LoglikelihoodResult> loglikelihoods;  // multiple_choice, loglikelihood
  std::vector<FilterResult> filters;
};

// A backend's answers to one document's requests.
struct DocResponses {
  std::vector<std::string> generations;
  std::vector<LoglikelihoodResult> loglikelihoods;
};

// Scores one document. InvalidArgument when the number of responses does not
// match the requests.
SampleRecord score_document(const Task& task, const DocRequests& requests,
                            const DocResponses& responses);

struct ResultRow {
  std::string filter;
  std::string metric;
  bool higher_is_better = true;
  double value = 0;
  std::optional<double> stderr_value;
};

struct TaskResult {
  std::string task;
  std::string version;
  int n_shot = 0;
  size_t n_samples = 0;         // documents aggregated
  size_t n_total = 0;           // documents in the task
  std::vector<ResultRow> rows;  // per filter, per metric, in task-file order
};

struct AggregateOptions {
  // lm-eval's --bootstrap_iters default; <= 0 disables standard errors.
  int64_t bootstrap_iters = 100000;
  // Bootstrap the mean metrics too, instead of sample stddev / sqrt(n).
  bool bootstrap_means = false;
};

// Aggregates records of `task` (any subset of its documents, each at most
// once). InvalidArgument for records of another task, unknown documents,
// duplicates, or no records.
TaskResult aggregate(const Task& task, const std::vector<SampleRecord>& records,
                     const AggregateOptions& options = {});

// lm-eval's markdown table: |Tasks|Version|Filter|n-shot|Metric| |Value| |Stderr|,
// metrics of a task sorted by "metric,filter", task name on its first row only.
std::string format_results_table(const std::vector<TaskResult>& results);

// lm-eval's results JSON: results ("metric,filter" and "metric_stderr,filter"
// keys, "N/A" for no stderr), versions, n-shot, higher_is_better, n-samples.
std::string results_to_json(const std::vector<TaskResult>& results);

// One JSON line (no trailing newline) / its inverse. The inverse throws
// DataLoss naming `where` for malformed or incomplete records.
std::string sample_record_to_json(const SampleRecord& record);
SampleRecord sample_record_from_json(std::string_view line, std::string_view where);

struct SampleLog {
  std::vector<SampleRecord> records;
  std::set<size_t> done;             // doc indices with a complete record
  bool truncated_last_line = false;  // the file ended inside a record (dropped)
  uint64_t valid_bytes = 0;          // bytes up to the end of the last complete line
};

// Reads a sample log. A missing file is an empty log. A last line that is
// cut off (no newline and not valid JSON) is dropped and reported through
// truncated_last_line and a warning; any other bad line is DataLoss naming
// the line. When `task_name` is not empty, records of another task are
// InvalidArgument. A document logged twice is DataLoss.
SampleLog read_sample_log(const std::string& path, const std::string& task_name = "");

// Appends records to a sample log, one flushed line each.
class SampleLogWriter {
 public:
  // Opens `path` for appending after cutting it to `keep_bytes` (pass
  // SampleLog::valid_bytes to drop a cut-off last line; 0 starts afresh).
  SampleLogWriter(const std::string& path, uint64_t keep_bytes);
  SampleLogWriter(const SampleLogWriter&) = delete;
  SampleLogWriter& operator=(const SampleLogWriter&) = delete;

  // Writes the record and a newline, then flushes. DataLoss on write errors.
  void append(const SampleRecord& record);

 private:
  std::string path_;
  std::ofstream out_;
};

}  // namespace tessera::eval
