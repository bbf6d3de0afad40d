// tessera/synth/math.h — math problems whose answers a program computes.
//
// A proposer writes the problem text; parse_math_problem() finds the one
// arithmetic expression the text states ("What is 17 * (4 + 9)?", "Compute
// 120 divided by 8 minus 3."), evaluates it exactly over the rationals, and
// refuses every text it cannot vouch for: no expression, several
// expressions, an equation or a power or percentage next to the expression
// (which the expression alone would misstate), a malformed expression,
// division by zero, too many operands or digits, or (by default) an answer
// that is not an integer. The answer of a model is read by extract_answer()
// (its last number) and compared exactly.
//
//   auto p = tessera::synth::parse_math_problem("What is 23 + 58 * 2?");
//   if (p.valid) {
//     bool right = tessera::synth::answers_match(p.value, "23 + 116 = 139");  // true
//     std::string s = tessera::synth::worked_solution(p);  // "58 * 2 = 116\n23 + 116 = 139\n..."
//   }
//
// Grammar: expr := term (("+" | "-") term)*; term := factor (("*" | "/")
// factor)*; factor := "-" factor | number | "(" expr ")"; numbers are
// integers (with optional thousands commas, "1,250") or decimals ("2.5").
// Words "plus", "minus", "times", "multiplied by", "divided by", the signs
// × and ÷, and "x" between two numbers are read as operators.
//
// Pure functions; thread-safe.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace tessera::synth {

// An exact rational number num / den in lowest terms, den > 0.
struct Rational {
  int64_t num = 0;
  int64_t den = 1;
  bool is_integer() const { return den == 1; }
  bool operator==(const Rational& o) const { return num == o.num && den == o.den; }
  bool operator!=(const Rational& o) const { return !(*this == o); }
  // "139", "-7", "3.5" (terminating decimals), "1/3" otherwise.
  std::string to_string() const;
};

struct MathProblemOptions {
  int64_t max_operands = 6;  // numbers in the expression
  int64_t max_digits = 6;    // digits per number (decimals: both sides together)
  bool integer_answers_only = true;
  int64_t max_abs_answer = 1000000000000;  // |answer| above this is refused
};

// The expression tree (the worked solution walks it).
struct ExpressionNode;

struct MathProblem {
  bool valid = false;
  std::string reason;      // why it is not valid ("" when valid)
  std::string expression;  // the expression as found, normalised ("23 + 58 * 2")
  Rational value;
  int64_t operands = 0;
  std::shared_ptr<const ExpressionNode> tree;  // null when not valid
};

// Never throws for any text: problems it cannot vouch for come back with
// valid = false and the reason.
MathProblem parse_math_problem(std::string_view text, const MathProblemOptions& options = {});

// Evaluates an expression alone ("17 * (4 + 9)"). InvalidArgument for a
// malformed expression, division by zero, or a result outside int64.
Rational evaluate_expression(std::string_view expression);

// The last number in a model's answer ("... so the answer is 1,250." ->
// 1250; "-7", "3.50", "7/2" as a fraction), or nullopt when it has none.
std::optional<Rational> extract_answer(std::string_view response);

// Whether the answer's last number equals `value` exactly.
bool answers_match(const Rational& value, std::string_view response);

// A step-by-step solution computed from the expression tree, one operation
// a line, innermost first, ending "The answer is <value>." InvalidArgument
// for a problem that is not valid.
std::string worked_solution(const MathProblem& problem);

// Seeded arithmetic problems (seed tasks, held-out sets): random expressions
// of min..max operands in [1, max_value] over + - * / with optional
// parentheses, in a few phrasings ("What is 12 + 7 * 3?", "Compute (45 - 9)
// / 4.", "Calculate 6 times 8 minus 5."). Every text is distinct and valid
// for parse_math_problem() with default options (integer answer).
struct ProblemGeneratorOptions {
  int64_t min_operands = 2;
  int64_t max_operands = 3;
  int64_t max_value = 99;
  bool parentheses = true;
  bool division = true;
};
std::vector<std::string> arithmetic_problems(int64_t count, uint64_t seed,
                                             const ProblemGeneratorOptions& options = {});

}  // namespace tessera::synth
