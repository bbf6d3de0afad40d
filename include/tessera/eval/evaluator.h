// tessera/eval/evaluator.h — run one task against a backend, with resumable sample logs.
//
//   Task task = Task::load("data/eval/tasks/yue_arc_c/yue_arc_c_gen_0shot.yaml", {root});
//   RunOptions options;
//   options.sample_log_path = "out/yue_arc_c_gen_0shot.jsonl";  // resume from here
//   RunReport report = run_task(task, backend, options);
//   std::cout << format_results_table({report.result});
//
// The loop: build every document's requests (few-shot draws always cover
// all documents in order, so a resumed or limited run prompts exactly as a
// full one), skip documents the sample log already holds, send the rest to
// the backend in batches, score each document and append its record to the
// log at once, then aggregate all records (logged and new).
//
// A logged record whose prompt differs from the prompt built now means the
// task file or data changed since the log was written: FailedPrecondition,
// rather than mixing two different evaluations.
//
// Not thread-safe with respect to the backend (calls it from this thread).
#pragma once

#include <cstddef>
#include <functional>
#include <string>
#include <vector>

#include "tessera/eval/request.h"
#include "tessera/eval/results.h"
#include "tessera/eval/task.h"

namespace tessera::eval {

// Where a run stands, for progress displays.
struct RunProgress {
  size_t done = 0;     // documents finished (resumed ones included)
  size_t total = 0;    // documents in this run (after the limit)
  size_t resumed = 0;  // documents taken from the sample log
  double seconds = 0;  // wall time spent on new documents so far
};

struct RunOptions {
  // Requests per backend call; a document's requests (one per choice) are
  // never split across calls, so a call may hold a few more.
  size_t batch_size = 32;
  // Evaluate only the first `limit` documents (0: all).
  size_t limit = 0;
  // JSON Lines sample log; empty for none. An existing log is resumed.
  std::string sample_log_path;
  AggregateOptions aggregate;
  // Called on the calling thread once before the first batch and after each
  // batch. Exceptions it throws propagate (the log keeps what was written).
  std::function<void(const RunProgress&)> on_progress;
};

struct RunReport {
  TaskResult result;
  std::vector<SampleRecord> records;  // by document index
  size_t resumed = 0;                 // documents taken from the existing log
  bool log_was_truncated = false;     // the log's last line was cut off and redone
  size_t evaluated = 0;               // documents the backend answered in this run
  double seconds = 0;                 // wall time for them: backend calls, scoring and logging
};

// Errors: those of the backend (propagated), Internal when the backend
// returns the wrong number of results, FailedPrecondition for a stale log,
// and the errors of read_sample_log / SampleLogWriter.
RunReport run_task(const Task& task, Backend& backend, const RunOptions& options = {});

}  // namespace tessera::eval
