#include "tessera/synth/labeller.h"

#include <cctype>
#include <cmath>
#include <map>

#include "tessera/core/error.h"

namespace tessera::synth {

FailureLabel FailureLabeller::precheck(const std::string& instruction) const {
  FailureLabel l;
  l.valid = !instruction.empty();
  if (!l.valid) l.reason = "empty instruction";
  return l;
}

FailureLabel MathLabeller::precheck(const std::string& instruction) const {
  MathProblem p = parse_math_problem(instruction, options_);
  FailureLabel l;
  l.valid = p.valid;
  l.reason = p.valid ? "expression: " + p.expression : p.reason;
  if (p.valid) l.reference = p.value.to_string();
  return l;
}

FailureLabel MathLabeller::label(const std::string& instruction,
                                 const TargetResponses& responses) const {
  MathProblem p = parse_math_problem(instruction, options_);
  FailureLabel l;
  l.valid = p.valid;
  if (!p.valid) {
    l.reason = p.reason;
    return l;
  }
  l.reference = p.value.to_string();
  auto got = extract_answer(responses.greedy);
  l.answer = got ? got->to_string() : "";
  l.failure = !got || *got != p.value;
  l.score = l.failure ? 1.0 : 0.0;
  l.reason = "expression: " + p.expression + (got ? "" : "; no number in the answer");
  return l;
}

std::string MathLabeller::good_response(const std::string& instruction) const {
  MathProblem p = parse_math_problem(instruction, options_);
  return p.valid ? worked_solution(p) : "";
}

double answer_entropy(const std::vector<std::string>& keys) {
  TESSERA_CHECK(!keys.empty(), InvalidArgument, "answer_entropy: no answers");
  std::map<std::string, int64_t> counts;
  for (const auto& k : keys) ++counts[k];
  double h = 0;
  const double n = static_cast<double>(keys.size());
  for (const auto& [key, c] : counts) {
    const double p = static_cast<double>(c) / n;
    h -= p * std::log(p);
  }
  return h;
}

std::string default_answer_key(const std::string& response) {
  if (auto v = extract_answer(response)) return v->to_string();
  std::string line = response.substr(0, response.find('\n'));
  std::string key;
  for (unsigned char c : line) {
    if (std::isalnum(c) || c >= 0x80) {
      key += static_cast<char>(std::tolower(c));
    } else if (std::isspace(c) && !key.empty() && key.back() != ' ') {
      key += ' ';
    }
  }
  while (!key.empty() && key.back() == ' ') key.pop_back();
  return key;
}

EntropyLabeller::EntropyLabeller(EntropyLabellerOptions options) : options_(std::move(options)) {
  TESSERA_CHECK(options_.samples >= 2, InvalidArgument,
                "entropy labeller: samples must be >= 2, got ", options_.samples);
  TESSERA_CHECK(options_.threshold >= 0, InvalidArgument,
                "entropy labeller: threshold must be >= 0, got ", options_.threshold);
  TESSERA_CHECK(static_cast<bool>(options_.answer_key), InvalidArgument,
                "entropy labeller: answer_key must be set");
}

TargetQuery EntropyLabeller::query() const {
  return {false, options_.samples, options_.temperature};
}

FailureLabel EntropyLabeller::label(const std::string& instruction,
                                    const TargetResponses& responses) const {
  FailureLabel l;
  if (static_cast<int64_t>(responses.samples.size()) < options_.samples) {
    l.valid = false;
    l.reason = "expected " + std::to_string(options_.samples) + " samples, got " +
               std::to_string(responses.samples.size());
    return l;
  }
  std::vector<std::string> keys;
  for (int64_t i = 0; i < options_.samples; ++i)
    keys.push_back(options_.answer_key(responses.samples[i]));
  l.score = answer_entropy(keys);
  l.failure = l.score > options_.threshold;
  // The most frequent answer stands for the target's answer.
  std::map<std::string, int64_t> counts;
  for (const auto& k : keys) ++counts[k];
  int64_t best = 0;
  for (const auto& [k, c] : counts) {
    if (c > best) {
      best = c;
      l.answer = k;
    }
  }
  l.reason = std::to_string(counts.size()) + " distinct answers over " +
             std::to_string(keys.size()) + " samples";
  return l;
}

}  // namespace tessera::synth
