#include "tessera/synth/math.h"

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <set>
#include <sstream>
#include <vector>

#include "tessera/core/error.h"

namespace tessera::synth {

struct ExpressionNode {
  char op = 0;  // 0: number; '+', '-', '*', '/': binary; 'n': negation of `left`
  Rational value;
  std::shared_ptr<const ExpressionNode> left, right;
};

namespace {

using i128 = __int128;

int64_t narrow(i128 v, const char* what) {
  TESSERA_CHECK(
      v <= std::numeric_limits<int64_t>::max() && v >= -std::numeric_limits<int64_t>::max(),
      InvalidArgument, "math: ", what, " overflows int64");
  return static_cast<int64_t>(v);
}

i128 gcd128(i128 a, i128 b) {
  if (a < 0) a = -a;
  if (b < 0) b = -b;
  while (b != 0) {
    i128 t = a % b;
    a = b;
    b = t;
  }
  return a;
}

Rational make_rational(i128 num, i128 den, const char* what) {
  TESSERA_CHECK(den != 0, InvalidArgument, "math: division by zero");
  if (den < 0) {
    num = -num;
    den = -den;
  }
  i128 g = gcd128(num, den);
  if (g > 1) {
    num /= g;
    den /= g;
  }
  return {narrow(num, what), narrow(den, what)};
}

Rational apply(char op, const Rational& a, const Rational& b) {
  switch (op) {
    case '+':
      return make_rational(i128{a.num} * b.den + i128{b.num} * a.den, i128{a.den} * b.den, "a sum");
    case '-':
      return make_rational(i128{a.num} * b.den - i128{b.num} * a.den, i128{a.den} * b.den,
                           "a difference");
    case '*':
      return make_rational(i128{a.num} * b.num, i128{a.den} * b.den, "a product");
    case '/':
      TESSERA_CHECK(b.num != 0, InvalidArgument, "math: division by zero");
      return make_rational(i128{a.num} * b.den, i128{a.den} * b.num, "a quotient");
  }
  TESSERA_THROW(InvalidArgument, "math: unknown operator '", op, "'");
}

enum class Kind { kNum, kOp, kLParen, kRParen, kWord, kSym };

struct Token {
  Kind kind;
  std::string text;  // operator char, word (lower case), symbol bytes, or number text
  Rational value;    // numbers
  int64_t digits = 0;
  bool glued = false;  // no white space between this token and the previous one
};

// Reads a number at text[i] (a digit): integers with optional thousands
// commas (exactly three digits after each), optional decimals.
size_t read_number(std::string_view text, size_t i, Token& tok) {
  size_t j = i;
  std::string digits;
  while (j < text.size() && std::isdigit(static_cast<unsigned char>(text[j]))) digits += text[j++];
  // Thousands separators only where they are unambiguous: 1-3 digits, then
  // groups of ",ddd" not followed by another digit.
  if (digits.size() <= 3) {
    while (j + 3 < text.size() && text[j] == ',' &&
           std::isdigit(static_cast<unsigned char>(text[j + 1])) &&
           std::isdigit(static_cast<unsigned char>(text[j + 2])) &&
           std::isdigit(static_cast<unsigned char>(text[j + 3])) &&
           (j + 4 >= text.size() || !std::isdigit(static_cast<unsigned char>(text[j + 4])))) {
      digits += text.substr(j + 1, 3);
      j += 4;
    }
  }
  std::string frac;
  if (j + 1 < text.size() && text[j] == '.' &&
      std::isdigit(static_cast<unsigned char>(text[j + 1]))) {
    ++j;
    while (j < text.size() && std::isdigit(static_cast<unsigned char>(text[j]))) frac += text[j++];
  }
  tok.kind = Kind::kNum;
  tok.text = std::string(text.substr(i, j - i));
  tok.digits = static_cast<int64_t>(digits.size() + frac.size());
  // Numbers too long for exact int64 arithmetic are marked with value 0 and
  // digits > 18; the caller refuses them through max_digits (or here).
  if (digits.size() + frac.size() <= 18) {
    i128 num = 0, den = 1;
    for (char c : digits) num = num * 10 + (c - '0');
    for (char c : frac) {
      num = num * 10 + (c - '0');
      den *= 10;
    }
    tok.value = make_rational(num, den, "a number");
  }
  return j;
}

std::vector<Token> tokenize(std::string_view text) {
  std::vector<Token> out;
  size_t i = 0;
  bool space = true;
  while (i < text.size()) {
    const unsigned char c = static_cast<unsigned char>(text[i]);
    if (std::isspace(c)) {
      space = true;
      ++i;
      continue;
    }
    Token tok{Kind::kSym, "", {}, 0, !space && !out.empty()};
    if (std::isdigit(c)) {
      i = read_number(text, i, tok);
    } else if (c == '+' || c == '-' || c == '*' || c == '/') {
      tok.kind = Kind::kOp;
      tok.text = std::string(1, static_cast<char>(c));
      ++i;
    } else if (c == '(' || c == ')') {
      tok.kind = c == '(' ? Kind::kLParen : Kind::kRParen;
      tok.text = std::string(1, static_cast<char>(c));
      ++i;
    } else if (std::isalpha(c)) {
      tok.kind = Kind::kWord;
      while (i < text.size() && std::isalpha(static_cast<unsigned char>(text[i]))) {
        tok.text += static_cast<char>(std::tolower(static_cast<unsigned char>(text[i++])));
      }
    } else {
      // One UTF-8 character; × ÷ − are operators.
      size_t len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
      len = std::min(len, text.size() - i);
      tok.text = std::string(text.substr(i, len));
      i += len;
      if (tok.text == "\xC3\x97") {
        tok = Token{Kind::kOp, "*", {}, 0, tok.glued};
      } else if (tok.text == "\xC3\xB7") {
        tok = Token{Kind::kOp, "/", {}, 0, tok.glued};
      } else if (tok.text == "\xE2\x88\x92") {
        tok = Token{Kind::kOp, "-", {}, 0, tok.glued};
      }
    }
    out.push_back(std::move(tok));
    space = false;
  }
  return out;
}

bool is_operand_end(const Token& t) { return t.kind == Kind::kNum || t.kind == Kind::kRParen; }
bool is_operand_start(const Token& t) {
  return t.kind == Kind::kNum || t.kind == Kind::kLParen || (t.kind == Kind::kOp && t.text == "-");
}

// Operator words between two operands become operators.
void read_operator_words(std::vector<Token>& toks) {
  std::vector<Token> out;
  for (size_t i = 0; i < toks.size(); ++i) {
    Token t = toks[i];
    if (t.kind == Kind::kWord && !out.empty() && is_operand_end(out.back())) {
      std::string op;
      size_t skip = 0;
      if (t.text == "plus") op = "+";
      if (t.text == "minus") op = "-";
      if (t.text == "times" || t.text == "x") op = "*";
      if ((t.text == "multiplied" || t.text == "divided") && i + 1 < toks.size() &&
          toks[i + 1].kind == Kind::kWord && toks[i + 1].text == "by") {
        op = t.text == "multiplied" ? "*" : "/";
        skip = 1;
      }
      if (!op.empty() && i + 1 + skip < toks.size() && is_operand_start(toks[i + 1 + skip])) {
        out.push_back(Token{Kind::kOp, op, {}, 0, false});
        i += skip;
        continue;
      }
    }
    out.push_back(std::move(t));
  }
  toks = std::move(out);
}

class Parser {
 public:
  Parser(const std::vector<Token>& toks, size_t begin, size_t end)
      : toks_(toks), pos_(begin), end_(end) {}

  std::shared_ptr<const ExpressionNode> parse() {
    auto node = expr();
    TESSERA_CHECK(pos_ == end_, InvalidArgument, "math: unexpected '", toks_[pos_].text, "'");
    return node;
  }

 private:
  bool at_op(const char* ops) const {
    return pos_ < end_ && toks_[pos_].kind == Kind::kOp &&
           std::string(ops).find(toks_[pos_].text[0]) != std::string::npos;
  }
  std::shared_ptr<const ExpressionNode> binary(char op, std::shared_ptr<const ExpressionNode> l,
                                               std::shared_ptr<const ExpressionNode> r) {
    auto n = std::make_shared<ExpressionNode>();
    n->op = op;
    n->value = apply(op, l->value, r->value);
    n->left = std::move(l);
    n->right = std::move(r);
    return n;
  }
  std::shared_ptr<const ExpressionNode> expr() {
    auto node = term();
    while (at_op("+-")) {
      char op = toks_[pos_++].text[0];
      node = binary(op, node, term());
    }
    return node;
  }
  std::shared_ptr<const ExpressionNode> term() {
    auto node = factor();
    while (at_op("*/")) {
      char op = toks_[pos_++].text[0];
      node = binary(op, node, factor());
    }
    return node;
  }
  std::shared_ptr<const ExpressionNode> factor() {
    TESSERA_CHECK(pos_ < end_, InvalidArgument, "math: the expression ends early");
    const Token& t = toks_[pos_];
    if (t.kind == Kind::kOp && t.text == "-") {
      ++pos_;
      auto inner = factor();
      auto n = std::make_shared<ExpressionNode>();
      n->op = 'n';
      n->value = make_rational(-i128{inner->value.num}, inner->value.den, "a negation");
      n->left = std::move(inner);
      return n;
    }
    if (t.kind == Kind::kNum) {
      TESSERA_CHECK(t.digits <= 18, InvalidArgument, "math: number ", t.text, " is too long");
      ++pos_;
      auto n = std::make_shared<ExpressionNode>();
      n->value = t.value;
      return n;
    }
    if (t.kind == Kind::kLParen) {
      ++pos_;
      auto inner = expr();
      TESSERA_CHECK(pos_ < end_ && toks_[pos_].kind == Kind::kRParen, InvalidArgument,
                    "math: unbalanced parentheses");
      ++pos_;
      return inner;
    }
    TESSERA_THROW(InvalidArgument, "math: unexpected '", t.text, "'");
  }

  const std::vector<Token>& toks_;
  size_t pos_, end_;
};

bool in_expression(const Token& t) {
  return t.kind == Kind::kNum || t.kind == Kind::kOp || t.kind == Kind::kLParen ||
         t.kind == Kind::kRParen;
}

// Words that state an operation the expression alone would not capture.
const std::set<std::string>& operation_words() {
  static const std::set<std::string> words = {
      "double",    "doubled",  "triple",  "tripled", "twice", "thrice", "half",    "halve",
      "halved",    "square",   "squared", "cube",    "cubed", "root",   "percent", "percentage",
      "remainder", "modulo",   "mod",     "average", "mean",  "round",  "rounded", "factorial",
      "power",     "exponent", "then",    "more",    "less",  "fewer",  "each",    "per"};
  return words;
}

std::string join(const std::vector<Token>& toks, size_t begin, size_t end) {
  std::string s;
  for (size_t i = begin; i < end; ++i) {
    const Token& t = toks[i];
    const bool tight = t.kind == Kind::kRParen ||
                       (i > begin && (toks[i - 1].kind == Kind::kLParen ||
                                      (toks[i - 1].kind == Kind::kOp && toks[i - 1].text == "-" &&
                                       (i - 1 == begin || !is_operand_end(toks[i - 2])))));
    if (i > begin && !tight) s += ' ';
    s += t.text;
  }
  return s;
}

int64_t count_operands(const ExpressionNode& n) {
  if (n.op == 0) return 1;
  if (n.op == 'n') return count_operands(*n.left);
  return count_operands(*n.left) + count_operands(*n.right);
}

MathProblem refuse(std::string reason) {
  MathProblem p;
  p.reason = std::move(reason);
  return p;
}

}  // namespace

std::string Rational::to_string() const {
  if (den == 1) return std::to_string(num);
  int64_t d = den;
  int twos = 0, fives = 0;
  while (d % 2 == 0) d /= 2, ++twos;
  while (d % 5 == 0) d /= 5, ++fives;
  if (d != 1) return std::to_string(num) + "/" + std::to_string(den);
  // Terminating decimal: scale to 10^k exactly.
  const int k = std::max(twos, fives);
  i128 scale = 1;
  for (int i = 0; i < k; ++i) scale *= 10;
  i128 scaled = i128{num} * (scale / den);
  const bool negative = scaled < 0;
  if (negative) scaled = -scaled;
  i128 whole = scaled / scale, frac = scaled % scale;
  std::string f = std::to_string(static_cast<int64_t>(frac));
  f = std::string(static_cast<size_t>(k) - f.size(), '0') + f;
  while (!f.empty() && f.back() == '0') f.pop_back();
  return (negative ? "-" : "") + std::to_string(static_cast<int64_t>(whole)) + "." + f;
}

MathProblem parse_math_problem(std::string_view text, const MathProblemOptions& options) {
  std::vector<Token> toks;
  try {
    toks = tokenize(text);
  } catch (const Error& e) {
    return refuse(e.message());
  }
  // A leading list marker ("4. ", "4) ", "Question 4: ") is not part of the problem.
  size_t start = 0;
  if (toks.size() > 2 && toks[0].kind == Kind::kWord && toks[0].text == "question" &&
      toks[1].kind == Kind::kNum && toks[2].kind == Kind::kSym && toks[2].text == ":") {
    start = 3;
  } else if (toks.size() > 1 && toks[0].kind == Kind::kNum && toks[0].value.is_integer() &&
             ((toks[1].kind == Kind::kSym && toks[1].text == ".") ||
              toks[1].kind == Kind::kRParen) &&
             toks[1].glued) {
    start = 2;
  }
  toks.erase(toks.begin(), toks.begin() + static_cast<std::ptrdiff_t>(start));
  read_operator_words(toks);
  for (const Token& t : toks) {
    if (t.kind == Kind::kWord && operation_words().count(t.text)) {
      return refuse("the wording states an operation ('" + t.text + "') outside the expression");
    }
  }
  // Maximal runs of expression tokens; those with a number and an operator
  // are expressions. Numbers outside the expression are refused (they
  // would be quantities the expression ignores).
  std::vector<std::pair<size_t, size_t>> spans;
  int64_t loose_numbers = 0;
  for (size_t i = 0; i < toks.size();) {
    if (!in_expression(toks[i])) {
      ++i;
      continue;
    }
    size_t j = i;
    bool number = false, op = false;
    while (j < toks.size() && in_expression(toks[j])) {
      number |= toks[j].kind == Kind::kNum;
      op |= toks[j].kind == Kind::kOp;
      ++j;
    }
    // Brackets at a span's edge that open or close around words belong to
    // the sentence, not the expression.
    size_t b = i, e = j;
    while (b < e && toks[b].kind == Kind::kRParen) ++b;
    while (e > b && toks[e - 1].kind == Kind::kLParen) --e;
    if (number && op) {
      spans.emplace_back(b, e);
    } else if (number) {
      ++loose_numbers;
    }
    i = j;
  }
  if (spans.empty()) return refuse("no arithmetic expression");
  if (spans.size() > 1) return refuse("several expressions");
  if (loose_numbers > 0) return refuse("numbers outside the expression");
  const auto [b, e] = spans.front();
  auto bad_neighbour = [](const Token& t) {
    return t.kind == Kind::kSym &&
           (t.text == "^" || t.text == "%" || t.text == "!" || t.text == "=" ||
            t.text == "\xC2\xB2" || t.text == "\xC2\xB3" || t.text == "\xE2\x88\x9A");
  };
  if (b > 0) {
    const Token& prev = toks[b - 1];
    if (bad_neighbour(prev)) return refuse("'" + prev.text + "' before the expression");
    if (prev.kind == Kind::kWord && toks[b].glued)
      return refuse("a word attached to the expression");
    if (prev.kind == Kind::kSym && prev.text == "." && toks[b].glued)
      return refuse("malformed number");
  }
  if (e < toks.size()) {
    const Token& next = toks[e];
    if (next.kind == Kind::kSym && next.text == "=") {
      if (e + 1 < toks.size() && in_expression(toks[e + 1])) return refuse("an equation");
    } else if (bad_neighbour(next)) {
      return refuse("'" + next.text + "' after the expression");
    }
    if (next.kind == Kind::kWord && next.glued) return refuse("a word attached to the expression");
  }
  MathProblem p;
  p.expression = join(toks, b, e);
  for (size_t i = b; i < e; ++i) {
    if (toks[i].kind == Kind::kNum && toks[i].digits > options.max_digits) {
      return refuse("number " + toks[i].text + " has more than " +
                    std::to_string(options.max_digits) + " digits");
    }
  }
  try {
    p.tree = Parser(toks, b, e).parse();
  } catch (const Error& err) {
    return refuse("malformed expression: " + err.message());
  }
  p.value = p.tree->value;
  p.operands = count_operands(*p.tree);
  if (p.operands > options.max_operands) {
    return refuse("more than " + std::to_string(options.max_operands) + " operands");
  }
  if (options.integer_answers_only && !p.value.is_integer())
    return refuse("the answer is not an integer");
  if (p.value.num / p.value.den > options.max_abs_answer ||
      p.value.num / p.value.den < -options.max_abs_answer) {
    return refuse("the answer is too large");
  }
  p.valid = true;
  return p;
}

Rational evaluate_expression(std::string_view expression) {
  std::vector<Token> toks = tokenize(expression);
  read_operator_words(toks);
  TESSERA_CHECK(!toks.empty(), InvalidArgument, "math: empty expression");
  for (const Token& t : toks) {
    TESSERA_CHECK(in_expression(t), InvalidArgument, "math: '", t.text, "' in expression '",
                  std::string(expression), "'");
  }
  return Parser(toks, 0, toks.size()).parse()->value;
}

std::optional<Rational> extract_answer(std::string_view response) {
  std::vector<Token> toks;
  try {
    toks = tokenize(response);
  } catch (const Error&) {
    return std::nullopt;
  }
  std::optional<Rational> last;
  for (size_t i = 0; i < toks.size(); ++i) {
    if (toks[i].kind != Kind::kNum || toks[i].digits > 18) continue;
    const size_t first = i;
    Rational v = toks[i].value;
    // A fraction written a/b without spaces.
    if (i + 2 < toks.size() && toks[i + 1].kind == Kind::kOp && toks[i + 1].text == "/" &&
        toks[i + 1].glued && toks[i + 2].kind == Kind::kNum && toks[i + 2].glued &&
        toks[i + 2].digits <= 18 && toks[i + 2].value.num != 0) {
      try {
        v = apply('/', v, toks[i + 2].value);
        i += 2;
      } catch (const Error&) {
      }
    }
    // A minus sign glued to the number is its sign unless it is a binary
    // minus glued to an operand before it ("10-3").
    if (first > 0 && toks[first - 1].kind == Kind::kOp && toks[first - 1].text == "-" &&
        toks[first].glued) {
      const bool binary = first >= 2 && toks[first - 1].glued && is_operand_end(toks[first - 2]);
      if (!binary) v.num = -v.num;
    }
    last = v;
  }
  return last;
}

bool answers_match(const Rational& value, std::string_view response) {
  auto got = extract_answer(response);
  return got.has_value() && *got == value;
}

std::string worked_solution(const MathProblem& problem) {
  TESSERA_CHECK(problem.valid && problem.tree, InvalidArgument,
                "worked_solution: the problem is not valid (", problem.reason, ")");
  std::ostringstream out;
  auto show = [](const Rational& v) {
    return v.num < 0 ? "(" + v.to_string() + ")" : v.to_string();
  };
  std::function<void(const ExpressionNode&)> walk = [&](const ExpressionNode& n) {
    if (n.op == 0) return;
    if (n.op == 'n') {
      walk(*n.left);
      return;
    }
    walk(*n.left);
    walk(*n.right);
    out << show(n.left->value) << " " << n.op << " " << show(n.right->value) << " = "
        << n.value.to_string() << "\n";
  };
  walk(*problem.tree);
  out << "The answer is " << problem.value.to_string() << ".";
  return out.str();
}

std::vector<std::string> arithmetic_problems(int64_t count, uint64_t seed,
                                             const ProblemGeneratorOptions& options) {
  TESSERA_CHECK(count >= 0, InvalidArgument, "arithmetic_problems: count must be >= 0");
  TESSERA_CHECK(options.min_operands >= 2 && options.max_operands >= options.min_operands &&
                    options.max_value >= 2,
                InvalidArgument,
                "arithmetic_problems: need 2 <= min_operands <= max_operands and max_value >= 2");
  std::mt19937_64 rng(seed);
  auto uniform = [&](int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  };
  static const char* kSymbols[] = {"+", "-", "*", "/"};
  static const char* kWords[] = {"plus", "minus", "times", "divided by"};
  std::set<std::string> seen;
  std::vector<std::string> out;
  int64_t attempts = 0;
  while (static_cast<int64_t>(out.size()) < count) {
    TESSERA_CHECK(++attempts < 1000 * (count + 10), InvalidArgument,
                  "arithmetic_problems: cannot find ", count,
                  " distinct problems with these options");
    const int64_t operands = uniform(options.min_operands, options.max_operands);
    const bool words = uniform(0, 4) == 0;  // one problem in five spelt with words
    std::vector<int64_t> ops;
    for (int64_t i = 0; i + 1 < operands; ++i) ops.push_back(uniform(0, options.division ? 3 : 2));
    // Parentheses around one adjacent pair of operands (symbol phrasing only).
    int64_t open = -1;
    if (options.parentheses && !words && operands >= 3 && uniform(0, 2) == 0)
      open = uniform(0, operands - 2);
    std::string expr;
    for (int64_t i = 0; i < operands; ++i) {
      if (i > 0)
        expr += std::string(" ") + (words ? kWords[ops[i - 1]] : kSymbols[ops[i - 1]]) + " ";
      if (i == open) expr += "(";
      // Multiplication and division operands stay small, as in school drills.
      const bool small = (i > 0 && ops[i - 1] >= 2) || (i + 1 < operands && ops[i] >= 2);
      expr += std::to_string(
          uniform(1, small ? std::min<int64_t>(options.max_value, 12) : options.max_value));
      if (open >= 0 && i == open + 1) expr += ")";
    }
    std::string text;
    switch (uniform(0, 4)) {
      case 0:
        text = "What is " + expr + "?";
        break;
      case 1:
        text = "Compute " + expr + ".";
        break;
      case 2:
        text = "Calculate " + expr + ".";
        break;
      case 3:
        text = "Evaluate " + expr + ".";
        break;
      default:
        text = "Find the value of " + expr + ".";
        break;
    }
    MathProblem p = parse_math_problem(text);
    if (!p.valid || p.value.num < 0 || !seen.insert(text).second) continue;
    out.push_back(text);
  }
  return out;
}

}  // namespace tessera::synth
