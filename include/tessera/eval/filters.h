// tessera/eval/filters.h — answer extraction and lm-eval style filter pipelines.
//
// A generation task scores a model's free text only after pulling the answer
// out of it. As in lm-evaluation-harness, a task names one or more filter
// pipelines; each pipeline maps the responses of one document through an
// ordered list of filters and the first remaining response is scored:
//
//   filter_list:
//     - name: strict-match
//       filter:
//         - function: regex
//           regex_pattern: "####\\s*(-?[0-9.,]+)"
//         - function: take_first
//
// Filters ("function" values):
//   regex           regex_pattern (required), group_select (default 0; negative
//                   counts from the end), fallback (default "[invalid]"): Python
//                   re.findall semantics — the group_select-th match; its first
//                   non-empty group when the pattern has several groups; stripped.
//   take_first      keeps the first response only.
//   remove_whitespace  strips leading whitespace (lm-eval's WhitespaceFilter).
//   lowercase / uppercase  ASCII case mapping.
//   choice_letter   letters (default "ABCD"), fallback: extract_choice_letter().
//   gsm8k_number    fallback: extract_gsm8k_number().
// Regexes are ECMAScript over code points (see unicode_regex.h): no lookbehind
// and no (?s); use [\s\S] for "any character".
//
// A compiled FilterPipeline is immutable and thread-safe.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace tessera::eval {

// The answer of a GSM8K-style solution, as the Yue-Benchmark scorer finds it:
// commas are removed; the number after the first "####" (optionally "$") if
// there is one, else the last number in the text before any "Question:",
// "Example:", "問題：" or "樣例：" (where a model starts inventing the next
// few-shot example). The number is returned in canonical form: no sign for
// zero, no leading zeros, no trailing fractional zeros ("18.50" -> "18.5",
// "18.0" -> "18", "-0" -> "0"). nullopt when the text holds no number.
std::optional<std::string> extract_gsm8k_number(std::string_view text);

// Canonical form of a decimal number string (see above); nullopt when `text`
// is not of the form -?[0-9]+(.[0-9]*)?.
std::optional<std::string> canonical_number(std::string_view text);

// The option letter a free-text answer to a multiple-choice question picks,
// by a cascade of patterns in the spirit of the Yue-Benchmark scorer
// (fullwidth Ａ-Ｚ count as ASCII); the first step that matches decides:
//   1. the last explicit answer statement: 答案/正確答案/答/回應/選擇/選/Answer,
//      optionally followed by 應該, 係/是/為/:/：/is and a bracket, then the
//      letter ("答案係 C", "正確答案：(B)", "Answer: D");
//   2. a letter that opens the response and is followed by the end, a space
//      or punctuation ("C. 行星…", "(B)", "A", but not "A同B都唔啱…");
//   3. the first bracketed letter anywhere ("(C)", "（D）", "【A】");
//   4. the first lone letter: one of `letters` with no ASCII letter or digit
//      on either side ("揀C。", "我會揀 B 呢個").
// nullopt when nothing matches. `letters` are upper-case ASCII letters.
std::optional<std::string> extract_choice_letter(std::string_view text,
                                                 std::string_view letters = "ABCD");

struct FilterSpec {
  std::string function;                // one of the names above
  std::string regex_pattern;           // regex
  int group_select = 0;                // regex
  std::string fallback = "[invalid]";  // regex, choice_letter, gsm8k_number
  std::string letters = "ABCD";        // choice_letter
};

struct FilterPipelineSpec {
  std::string name;
  std::vector<FilterSpec> filters;
};

class FilterPipeline {
 public:
  // Compiles `spec`. InvalidArgument naming `where` (e.g.
  // "gsm8k.yaml: filter_list[0].filter[1]") for an unknown function, a bad
  // regex, empty letters.
  static FilterPipeline create(const FilterPipelineSpec& spec, const std::string& where);

  // Runs the filters over one document's responses and returns the first
  // response that remains. InvalidArgument when `responses` is empty.
  std::string apply(const std::vector<std::string>& responses) const;

  const std::string& name() const;

 private:
  struct Impl;
  explicit FilterPipeline(std::shared_ptr<const Impl> impl);
  std::shared_ptr<const Impl> impl_;
};

}  // namespace tessera::eval
