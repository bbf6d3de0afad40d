// tessera/eval/eval.h — the evaluation harness in one include.
//
// Load a task file, let a backend answer its requests, print lm-eval's table:
//
//   #include "tessera/eval/eval.h"
//   using namespace tessera::eval;
//   Task task = Task::load("data/eval/tasks/yue_gsm8k/yue_gsm8k_0shot.yaml",
//                          TaskLoadOptions{"/data/yue-benchmark"});
//   RunOptions options;
//   options.sample_log_path = "yue_gsm8k_0shot.jsonl";  // resumable
//   RunReport report = run_task(task, my_backend, options);  // my_backend: a Backend
//   std::cout << format_results_table({report.result});
//
// Pieces, one per header: value.h (documents), template.h (Jinja subset),
// task.h (task files), request.h (requests, Backend), filters.h (answer
// extraction), metrics.h (BLEU, ROUGE-L, exact match, standard errors),
// segmenter.h (Cantonese words), results.h (scores, logs), evaluator.h (the loop).
// Thread-safety is stated in each header.
#pragma once

#include "tessera/eval/evaluator.h"
#include "tessera/eval/filters.h"
#include "tessera/eval/metrics.h"
#include "tessera/eval/request.h"
#include "tessera/eval/results.h"
#include "tessera/eval/segmenter.h"
#include "tessera/eval/task.h"
#include "tessera/eval/template.h"
#include "tessera/eval/value.h"
