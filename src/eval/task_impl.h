// src/eval/task_impl.h — the loaded form of a Task, shared by the module's sources.
//
// Task's public API hands out rendered strings; the request builder and the
// scorer also need the compiled metrics and filters, which live here.
// Immutable once Task::load returns.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "tessera/eval/filters.h"
#include "tessera/eval/metrics.h"
#include "tessera/eval/segmenter.h"
#include "tessera/eval/task.h"

namespace tessera::eval {

enum class TokenizerKind { k13a, kNone, kYue, kYueChar, kRouge };

// A metric_list entry ready to score.
struct MetricRuntime {
  MetricSpec spec;
  std::optional<ExactMatcher> exact;               // exact_match
  TokenizerKind tokenizer = TokenizerKind::kNone;  // bleu, rouge_l
  std::shared_ptr<const YueSegmenter> segmenter;   // tokenizer kYue
  BleuOptions bleu;                                // bleu
  bool length_in_bytes = false;                    // acc_norm

  // The tokens BLEU / ROUGE-L see for `text`, following sacreBLEU's
  // preprocessing for bleu (optional lowercase, rstrip, tokenizer, split).
  Tokens tokens(std::string_view text) const;
};

struct Task::Impl {
  TaskConfig config;

  std::vector<Value> docs;
  std::vector<std::string> sources;
  std::vector<std::string> descriptions;
  std::vector<std::string> texts;
  std::vector<std::string> targets;
  std::vector<std::vector<std::string>> choices;
  std::vector<size_t> gold;

  // Few-shot pool: the test documents themselves unless fewshot_split is set.
  std::vector<std::string> fewshot_texts;
  std::vector<std::string> fewshot_targets;
  std::vector<std::vector<size_t>> fewshot;  // per test document

  std::vector<MetricRuntime> metrics;
  std::vector<FilterPipeline> filters;
};

struct TaskAccess {
  using Impl = Task::Impl;
  static const Task::Impl& impl(const Task& task) { return *task.impl_; }
};

}  // namespace tessera::eval
