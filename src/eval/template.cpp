#include "tessera/eval/template.h"

#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <optional>
#include <utility>
#include <vector>

#include "tessera/core/error.h"
#include "utf8.h"

namespace tessera::eval {

// ---------------------------------------------------------------------------
// Python-style printing.

namespace {

std::string python_float_repr(double x) {
  if (std::isnan(x)) return "nan";
  if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
  if (x == 0) return std::signbit(x) ? "-0.0" : "0.0";
  // Shortest digit string that reads back exactly, then Python's repr layout:
  // positional for 1e-4 <= |x| < 1e16, scientific otherwise.
  char buf[64];
  int precision = 1;
  for (; precision <= 17; ++precision) {
    std::snprintf(buf, sizeof(buf), "%.*e", precision - 1, x);
    if (std::strtod(buf, nullptr) == x) break;
  }
  std::string sci = buf;
  const size_t e_pos = sci.find('e');
  std::string mantissa = sci.substr(0, e_pos);
  const int exponent = std::atoi(sci.c_str() + e_pos + 1);
  const bool negative = mantissa[0] == '-';
  if (negative) mantissa.erase(0, 1);
  std::string digits;
  for (char c : mantissa) {
    if (c != '.') digits.push_back(c);
  }
  while (digits.size() > 1 && digits.back() == '0') digits.pop_back();
  std::string out = negative ? "-" : "";
  if (exponent >= -4 && exponent < 16) {
    if (exponent < 0) {
      out += "0." + std::string(-exponent - 1, '0') + digits;
    } else if (static_cast<int>(digits.size()) <= exponent + 1) {
      out += digits + std::string(exponent + 1 - digits.size(), '0') + ".0";
    } else {
      out += digits.substr(0, exponent + 1) + "." + digits.substr(exponent + 1);
    }
    return out;
  }
  out += digits.substr(0, 1);
  if (digits.size() > 1) out += "." + digits.substr(1);
  char exp_buf[16];
  std::snprintf(exp_buf, sizeof(exp_buf), "e%c%02d", exponent < 0 ? '-' : '+', std::abs(exponent));
  return out + exp_buf;
}

std::string python_repr_string(const std::string& s) {
  const bool has_single = s.find('\'') != std::string::npos;
  const bool has_double = s.find('"') != std::string::npos;
  const char quote = has_single && !has_double ? '"' : '\'';
  std::string out(1, quote);
  for (char c : s) {
    switch (c) {
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (c == quote) {
          out += '\\';
          out += c;
        } else if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\x%02x", static_cast<unsigned char>(c));
          out += buf;
        } else {
          out += c;
        }
    }
  }
  out += quote;
  return out;
}

std::string python_repr(const Value& v);

std::string python_str_impl(const Value& v) {
  switch (v.kind()) {
    case Value::Kind::kNull:
      return "None";
    case Value::Kind::kBool:
      return v.as_bool() ? "True" : "False";
    case Value::Kind::kInt:
      return std::to_string(v.as_int());
    case Value::Kind::kDouble:
      return python_float_repr(v.as_double());
    case Value::Kind::kString:
      return v.as_string();
    case Value::Kind::kList: {
      std::string out = "[";
      bool first = true;
      for (const Value& item : v.as_list()) {
        if (!first) out += ", ";
        first = false;
        out += python_repr(item);
      }
      return out + "]";
    }
    case Value::Kind::kObject: {
      std::string out = "{";
      bool first = true;
      for (const auto& [k, item] : v.as_object()) {
        if (!first) out += ", ";
        first = false;
        out += python_repr_string(k) + ": " + python_repr(item);
      }
      return out + "}";
    }
  }
  return "";
}

std::string python_repr(const Value& v) {
  return v.is_string() ? python_repr_string(v.as_string()) : python_str_impl(v);
}

bool truthy(const Value& v) {
  switch (v.kind()) {
    case Value::Kind::kNull:
      return false;
    case Value::Kind::kBool:
      return v.as_bool();
    case Value::Kind::kInt:
      return v.as_int() != 0;
    case Value::Kind::kDouble:
      return v.as_double() != 0.0;
    case Value::Kind::kString:
      return !v.as_string().empty();
    case Value::Kind::kList:
      return !v.as_list().empty();
    case Value::Kind::kObject:
      return !v.as_object().empty();
  }
  return false;
}

const char* python_type_name(const Value& v) {
  switch (v.kind()) {
    case Value::Kind::kNull:
      return "NoneType";
    case Value::Kind::kBool:
      return "bool";
    case Value::Kind::kInt:
      return "int";
    case Value::Kind::kDouble:
      return "float";
    case Value::Kind::kString:
      return "str";
    case Value::Kind::kList:
      return "list";
    case Value::Kind::kObject:
      return "dict";
  }
  return "?";
}

}  // namespace

std::string python_str(const Value& value) { return python_str_impl(value); }

// ---------------------------------------------------------------------------
// Syntax tree.

namespace {

struct Expr {
  enum class Kind {
    kLiteral,
    kName,
    kAttr,
    kItem,
    kList,
    kNeg,
    kBinary,
    kCompare,
    kAnd,
    kOr,
    kNot,
    kCondition,
    kFilter,
    kTest,
    kCall,
  };
  Kind kind;
  size_t pos;                               // byte offset in the template source
  Value literal;                            // kLiteral
  std::string name;                         // name / attribute / operator / filter / test / method
  bool negated = false;                     // "is not", "not in"
  std::vector<std::unique_ptr<Expr>> args;  // operands; for kFilter/kCall args[0] is the subject
};

struct Node {
  enum class Kind { kText, kOutput, kIf, kFor };
  Kind kind;
  size_t pos = 0;
  std::string text;            // kText
  std::unique_ptr<Expr> expr;  // kOutput, kFor iterable
  std::vector<std::pair<std::unique_ptr<Expr>, std::vector<Node>>> branches;  // kIf
  std::vector<Node> else_body;                                                // kIf
  std::vector<std::string> loop_vars;                                         // kFor
  std::vector<Node> body;                                                     // kFor
};

// The compiled template; Template::Impl derives from it so that the helper
// classes below (outside Template's access scope) can use it.
struct CompiledTemplate {
  std::string name;
  std::string source;
  std::vector<Node> nodes;

  // "name: line L, column C: " for byte offset `pos` (column in code points).
  std::string where(size_t pos) const {
    size_t line = 1, column = 1, i = 0;
    while (i < pos && i < source.size()) {
      if (source[i] == '\n') {
        ++line;
        column = 1;
        ++i;
      } else {
        utf8::decode(source, i);
        ++column;
      }
    }
    return name + ": line " + std::to_string(line) + ", column " + std::to_string(column) + ": ";
  }
  [[noreturn]] void fail(size_t pos, const std::string& message) const {
    throw InvalidArgument(where(pos) + message);
  }
};

}  // namespace

struct Template::Impl : CompiledTemplate {};

// ---------------------------------------------------------------------------
// Expression lexer and parser.

namespace {

struct Token {
  enum class Kind { kName, kInt, kFloat, kString, kOp, kEnd };
  Kind kind;
  std::string text;  // name, operator, or decoded string literal
  size_t pos;
  int64_t int_value = 0;
  double float_value = 0;
};

class ExprParser {
 public:
  // `begin`/`end` delimit the expression inside the template source.
  ExprParser(const CompiledTemplate& tmpl, size_t begin, size_t end) : tmpl_(tmpl) {
    lex(begin, end);
  }

  std::unique_ptr<Expr> parse_expression() { return parse_condition(); }

  // Parses a comma-separated list of names (loop targets).
  std::vector<std::string> parse_target_names() {
    std::vector<std::string> names;
    do {
      const Token& t = peek();
      if (t.kind != Token::Kind::kName) tmpl_.fail(t.pos, "expected a loop variable name");
      names.push_back(t.text);
      next();
    } while (accept_op(","));
    return names;
  }

  bool accept_name(const char* keyword) {
    if (peek().kind == Token::Kind::kName && peek().text == keyword) {
      next();
      return true;
    }
    return false;
  }
  void expect_name(const char* keyword) {
    if (!accept_name(keyword)) tmpl_.fail(peek().pos, std::string("expected '") + keyword + "'");
  }
  void expect_end() {
    if (peek().kind != Token::Kind::kEnd) {
      tmpl_.fail(peek().pos, "unexpected '" + peek().text + "'");
    }
  }
  const Token& peek() const { return tokens_[index_]; }

 private:
  void lex(size_t begin, size_t end) {
    const std::string& s = tmpl_.source;
    size_t i = begin;
    while (i < end) {
      const char c = s[i];
      if (c == ' ' || c == '\t' || c == '\n' || c == '\r') {
        ++i;
        continue;
      }
      Token t{Token::Kind::kOp, "", i};
      if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
        size_t j = i;
        while (j < end && (std::isalnum(static_cast<unsigned char>(s[j])) || s[j] == '_')) ++j;
        t.kind = Token::Kind::kName;
        t.text = s.substr(i, j - i);
        i = j;
      } else if (std::isdigit(static_cast<unsigned char>(c))) {
        size_t j = i;
        while (j < end && std::isdigit(static_cast<unsigned char>(s[j]))) ++j;
        bool is_float = false;
        if (j + 1 < end && s[j] == '.' && std::isdigit(static_cast<unsigned char>(s[j + 1]))) {
          is_float = true;
          ++j;
          while (j < end && std::isdigit(static_cast<unsigned char>(s[j]))) ++j;
        }
        if (j < end && (s[j] == 'e' || s[j] == 'E')) {
          size_t k = j + 1;
          if (k < end && (s[k] == '+' || s[k] == '-')) ++k;
          if (k < end && std::isdigit(static_cast<unsigned char>(s[k]))) {
            is_float = true;
            j = k;
            while (j < end && std::isdigit(static_cast<unsigned char>(s[j]))) ++j;
          }
        }
        t.text = s.substr(i, j - i);
        if (is_float) {
          t.kind = Token::Kind::kFloat;
          t.float_value = std::strtod(t.text.c_str(), nullptr);
        } else {
          t.kind = Token::Kind::kInt;
          errno = 0;
          t.int_value = std::strtoll(t.text.c_str(), nullptr, 10);
          if (errno == ERANGE) tmpl_.fail(i, "integer literal out of range");
        }
        i = j;
      } else if (c == '\'' || c == '"') {
        t.kind = Token::Kind::kString;
        size_t j = i + 1;
        bool closed = false;
        while (j < end) {
          if (s[j] == c) {
            closed = true;
            ++j;
            break;
          }
          if (s[j] == '\\' && j + 1 < end) {
            const char e = s[j + 1];
            j += 2;
            switch (e) {
              case 'n':
                t.text += '\n';
                break;
              case 't':
                t.text += '\t';
                break;
              case 'r':
                t.text += '\r';
                break;
              case '0':
                t.text += '\0';
                break;
              case '\\':
                t.text += '\\';
                break;
              case '\'':
                t.text += '\'';
                break;
              case '"':
                t.text += '"';
                break;
              case 'u': {
                if (j + 4 > end) tmpl_.fail(j - 2, "truncated \\u escape");
                const std::string hex = s.substr(j, 4);
                char* stop = nullptr;
                const long cp = std::strtol(hex.c_str(), &stop, 16);
                if (stop != hex.c_str() + 4) tmpl_.fail(j - 2, "bad \\u escape");
                utf8::append(t.text, static_cast<char32_t>(cp));
                j += 4;
                break;
              }
              default:  // unknown escapes keep the backslash, as Python does
                t.text += '\\';
                t.text += e;
            }
            continue;
          }
          t.text += s[j++];
        }
        if (!closed) tmpl_.fail(i, "unterminated string literal");
        i = j;
      } else {
        static const char* kOps[] = {"//", "==", "!=", "<=", ">=", "(", ")", "[", "]", ",", ".",
                                     "|",  "~",  "+",  "-",  "*",  "/", "%", "<", ">", ":"};
        bool found = false;
        for (const char* op : kOps) {
          const size_t n = std::char_traits<char>::length(op);
          if (s.compare(i, n, op) == 0) {
            t.text = op;
            i += n;
            found = true;
            break;
          }
        }
        if (!found) {
          size_t j = i;
          const char32_t cp = utf8::decode(s, j);
          std::string ch;
          utf8::append(ch, cp);
          tmpl_.fail(i, "unexpected character '" + ch + "' in expression");
        }
      }
      tokens_.push_back(std::move(t));
    }
    tokens_.push_back(Token{Token::Kind::kEnd, "end of expression", end});
  }

  void next() {
    if (index_ + 1 < tokens_.size()) ++index_;
  }
  bool is_op(const char* op) const { return peek().kind == Token::Kind::kOp && peek().text == op; }
  bool accept_op(const char* op) {
    if (is_op(op)) {
      next();
      return true;
    }
    return false;
  }
  void expect_op(const char* op) {
    if (!accept_op(op)) {
      tmpl_.fail(peek().pos, std::string("expected '") + op + "', got '" + peek().text + "'");
    }
  }
  bool is_name(const char* keyword) const {
    return peek().kind == Token::Kind::kName && peek().text == keyword;
  }

  static std::unique_ptr<Expr> make(Expr::Kind kind, size_t pos) {
    auto e = std::make_unique<Expr>();
    e->kind = kind;
    e->pos = pos;
    return e;
  }

  std::unique_ptr<Expr> parse_condition() {
    auto value = parse_or();
    if (is_name("if")) {
      const size_t pos = peek().pos;
      next();
      auto cond = parse_or();
      expect_name("else");
      auto other = parse_condition();
      auto e = make(Expr::Kind::kCondition, pos);
      e->args.push_back(std::move(cond));
      e->args.push_back(std::move(value));
      e->args.push_back(std::move(other));
      return e;
    }
    return value;
  }

  std::unique_ptr<Expr> parse_or() {
    auto left = parse_and();
    while (is_name("or")) {
      auto e = make(Expr::Kind::kOr, peek().pos);
      next();
      e->args.push_back(std::move(left));
      e->args.push_back(parse_and());
      left = std::move(e);
    }
    return left;
  }

  std::unique_ptr<Expr> parse_and() {
    auto left = parse_not();
    while (is_name("and")) {
      auto e = make(Expr::Kind::kAnd, peek().pos);
      next();
      e->args.push_back(std::move(left));
      e->args.push_back(parse_not());
      left = std::move(e);
    }
    return left;
  }

  std::unique_ptr<Expr> parse_not() {
    if (is_name("not")) {
      auto e = make(Expr::Kind::kNot, peek().pos);
      next();
      e->args.push_back(parse_not());
      return e;
    }
    return parse_compare();
  }

  std::unique_ptr<Expr> parse_compare() {
    auto left = parse_concat();
    while (true) {
      const size_t pos = peek().pos;
      std::string op;
      bool negated = false;
      if (peek().kind == Token::Kind::kOp &&
          (is_op("==") || is_op("!=") || is_op("<") || is_op(">") || is_op("<=") || is_op(">="))) {
        op = peek().text;
        next();
      } else if (is_name("in")) {
        op = "in";
        next();
      } else if (is_name("not") && index_ + 1 < tokens_.size() &&
                 tokens_[index_ + 1].kind == Token::Kind::kName &&
                 tokens_[index_ + 1].text == "in") {
        op = "in";
        negated = true;
        next();
        next();
      } else {
        return left;
      }
      auto e = make(Expr::Kind::kCompare, pos);
      e->name = op;
      e->negated = negated;
      e->args.push_back(std::move(left));
      e->args.push_back(parse_concat());
      left = std::move(e);
    }
  }

  std::unique_ptr<Expr> parse_concat() {
    auto left = parse_additive();
    while (is_op("~")) {
      auto e = make(Expr::Kind::kBinary, peek().pos);
      e->name = "~";
      next();
      e->args.push_back(std::move(left));
      e->args.push_back(parse_additive());
      left = std::move(e);
    }
    return left;
  }

  std::unique_ptr<Expr> parse_additive() {
    auto left = parse_multiplicative();
    while (is_op("+") || is_op("-")) {
      auto e = make(Expr::Kind::kBinary, peek().pos);
      e->name = peek().text;
      next();
      e->args.push_back(std::move(left));
      e->args.push_back(parse_multiplicative());
      left = std::move(e);
    }
    return left;
  }

  std::unique_ptr<Expr> parse_multiplicative() {
    auto left = parse_unary();
    while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
      auto e = make(Expr::Kind::kBinary, peek().pos);
      e->name = peek().text;
      next();
      e->args.push_back(std::move(left));
      e->args.push_back(parse_unary());
      left = std::move(e);
    }
    return left;
  }

  std::unique_ptr<Expr> parse_unary() {
    if (is_op("-")) {
      auto e = make(Expr::Kind::kNeg, peek().pos);
      next();
      e->args.push_back(parse_unary());
      return e;
    }
    if (accept_op("+")) return parse_unary();
    auto value = parse_postfix(parse_primary());
    // Filters bind to the operand before any test, as in Jinja.
    while (is_op("|")) {
      next();
      const Token& name = peek();
      if (name.kind != Token::Kind::kName) tmpl_.fail(name.pos, "expected a filter name after '|'");
      auto e = make(Expr::Kind::kFilter, name.pos);
      e->name = name.text;
      check_filter_name(name);
      next();
      e->args.push_back(std::move(value));
      if (accept_op("(")) parse_call_args(*e);
      value = std::move(e);
    }
    if (is_name("is")) {
      next();
      auto e = make(Expr::Kind::kTest, peek().pos);
      e->negated = accept_name("not");
      const Token& name = peek();
      if (name.kind != Token::Kind::kName) tmpl_.fail(name.pos, "expected a test name after 'is'");
      static const char* kTests[] = {"defined", "undefined", "none",    "string",  "number",
                                     "integer", "boolean",   "mapping", "sequence"};
      bool known = false;
      for (const char* t : kTests) known = known || name.text == t;
      if (!known) tmpl_.fail(name.pos, "unknown test '" + name.text + "'");
      e->name = name.text;
      next();
      e->args.push_back(std::move(value));
      value = std::move(e);
    }
    return value;
  }

  void check_filter_name(const Token& name) const {
    static const char* kFilters[] = {"trim",  "upper",   "lower",      "join",   "default",
                                     "d",     "length",  "count",      "first",  "last",
                                     "list",  "select",  "reject",     "string", "int",
                                     "float", "replace", "capitalize", "title"};
    for (const char* f : kFilters) {
      if (name.text == f) return;
    }
    tmpl_.fail(name.pos, "unknown filter '" + name.text + "'");
  }

  void parse_call_args(Expr& call) {
    if (accept_op(")")) return;
    do {
      call.args.push_back(parse_expression());
    } while (accept_op(","));
    expect_op(")");
  }

  std::unique_ptr<Expr> parse_postfix(std::unique_ptr<Expr> value) {
    while (true) {
      if (is_op(".")) {
        next();
        const Token& name = peek();
        if (name.kind != Token::Kind::kName && name.kind != Token::Kind::kInt) {
          tmpl_.fail(name.pos, "expected an attribute name after '.'");
        }
        auto e = make(Expr::Kind::kAttr, name.pos);
        e->name = name.text;
        next();
        e->args.push_back(std::move(value));
        value = std::move(e);
      } else if (is_op("[")) {
        auto e = make(Expr::Kind::kItem, peek().pos);
        next();
        e->args.push_back(std::move(value));
        e->args.push_back(parse_expression());
        expect_op("]");
        value = std::move(e);
      } else if (is_op("(")) {
        if (value->kind != Expr::Kind::kAttr) {
          tmpl_.fail(peek().pos, "only methods such as x.split(...) can be called");
        }
        auto e = make(Expr::Kind::kCall, value->pos);
        e->name = value->name;
        next();
        e->args.push_back(std::move(value->args[0]));
        parse_call_args(*e);
        value = std::move(e);
      } else {
        return value;
      }
    }
  }

  std::unique_ptr<Expr> parse_primary() {
    const Token t = peek();
    switch (t.kind) {
      case Token::Kind::kInt: {
        next();
        auto e = make(Expr::Kind::kLiteral, t.pos);
        e->literal = Value(t.int_value);
        return e;
      }
      case Token::Kind::kFloat: {
        next();
        auto e = make(Expr::Kind::kLiteral, t.pos);
        e->literal = Value(t.float_value);
        return e;
      }
      case Token::Kind::kString: {
        next();
        auto e = make(Expr::Kind::kLiteral, t.pos);
        std::string text = t.text;
        // Adjacent string literals concatenate, as in Python and Jinja.
        while (peek().kind == Token::Kind::kString) {
          text += peek().text;
          next();
        }
        e->literal = Value(std::move(text));
        return e;
      }
      case Token::Kind::kName: {
        next();
        auto e = make(Expr::Kind::kLiteral, t.pos);
        if (t.text == "true" || t.text == "True") {
          e->literal = Value(true);
        } else if (t.text == "false" || t.text == "False") {
          e->literal = Value(false);
        } else if (t.text == "none" || t.text == "None") {
          e->literal = Value();
        } else {
          static const char* kReserved[] = {"and", "or", "not", "in", "is", "if", "else"};
          for (const char* r : kReserved) {
            if (t.text == r) tmpl_.fail(t.pos, "unexpected keyword '" + t.text + "'");
          }
          e->kind = Expr::Kind::kName;
          e->name = t.text;
        }
        return e;
      }
      case Token::Kind::kOp:
        if (t.text == "(") {
          next();
          auto e = parse_expression();
          expect_op(")");
          return e;
        }
        if (t.text == "[") {
          next();
          auto e = make(Expr::Kind::kList, t.pos);
          if (!accept_op("]")) {
            do {
              if (is_op("]")) break;  // trailing comma
              e->args.push_back(parse_expression());
            } while (accept_op(","));
            expect_op("]");
          }
          return e;
        }
        tmpl_.fail(t.pos, "unexpected '" + t.text + "'");
      case Token::Kind::kEnd:
        tmpl_.fail(t.pos, "expected an expression");
    }
    tmpl_.fail(t.pos, "expected an expression");
  }

  const CompiledTemplate& tmpl_;
  std::vector<Token> tokens_;
  size_t index_ = 0;
};

// ---------------------------------------------------------------------------
// Template structure: splitting text from tags, then nesting blocks.

struct Tag {
  enum class Kind { kText, kOutput, kStatement };
  Kind kind;
  size_t begin;      // for tags: first byte inside the delimiters
  size_t end;        // one past the last byte inside the delimiters
  size_t pos;        // byte offset of the opening delimiter
  std::string text;  // kText only, after whitespace control
};

// Offset of the closing delimiter `close` at or after `from`, skipping string
// literals; npos when missing.
size_t find_close(const std::string& s, size_t from, const char* close) {
  char quote = 0;
  for (size_t i = from; i < s.size(); ++i) {
    const char c = s[i];
    if (quote) {
      if (c == '\\') {
        ++i;
      } else if (c == quote) {
        quote = 0;
      }
      continue;
    }
    if (c == '\'' || c == '"') {
      quote = c;
      continue;
    }
    if (s.compare(i, 2, close) == 0) return i;
  }
  return std::string::npos;
}

bool is_ws(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

std::vector<Tag> split_tags(const CompiledTemplate& t) {
  const std::string& s = t.source;
  std::vector<Tag> tags;
  size_t i = 0;
  bool strip_next_text = false;
  auto push_text = [&](size_t from, size_t to, bool strip_left, bool strip_right) {
    std::string text = s.substr(from, to - from);
    if (strip_left) {
      size_t k = 0;
      while (k < text.size() && is_ws(text[k])) ++k;
      text.erase(0, k);
    }
    if (strip_right) {
      while (!text.empty() && is_ws(text.back())) text.pop_back();
    }
    if (!text.empty()) tags.push_back(Tag{Tag::Kind::kText, 0, 0, from, std::move(text)});
  };
  while (i < s.size()) {
    size_t open = std::string::npos;
    for (size_t k = i; k + 1 < s.size(); ++k) {
      if (s[k] == '{' && (s[k + 1] == '{' || s[k + 1] == '%' || s[k + 1] == '#')) {
        open = k;
        break;
      }
    }
    if (open == std::string::npos) {
      push_text(i, s.size(), strip_next_text, false);
      break;
    }
    const char type = s[open + 1];
    const bool strip_before = open + 2 < s.size() && s[open + 2] == '-';
    push_text(i, open, strip_next_text, strip_before);
    const size_t inner = open + 2 + (strip_before ? 1 : 0);
    const char* close = type == '{' ? "}}" : type == '%' ? "%}" : "#}";
    const size_t close_at = type == '#' ? s.find(close, inner) : find_close(s, inner, close);
    if (close_at == std::string::npos) {
      t.fail(open, std::string("unclosed '") + s.substr(open, 2) + "' (missing '" + close + "')");
    }
    const bool strip_after = close_at > inner && s[close_at - 1] == '-';
    const size_t inner_end = strip_after ? close_at - 1 : close_at;
    if (type != '#') {
      tags.push_back(Tag{type == '{' ? Tag::Kind::kOutput : Tag::Kind::kStatement, inner, inner_end,
                         open, ""});
    }
    strip_next_text = strip_after;
    i = close_at + 2;
  }
  return tags;
}

class BlockParser {
 public:
  BlockParser(const CompiledTemplate& t, std::vector<Tag> tags) : t_(t), tags_(std::move(tags)) {}

  std::vector<Node> parse_all() {
    std::string terminator;
    auto nodes = parse_until({}, &terminator);
    return nodes;
  }

 private:
  // Keyword of a statement tag ("if", "endfor", ...) and the offset after it.
  std::pair<std::string, size_t> keyword(const Tag& tag) const {
    size_t i = tag.begin;
    while (i < tag.end && is_ws(t_.source[i])) ++i;
    size_t j = i;
    while (j < tag.end &&
           (std::isalpha(static_cast<unsigned char>(t_.source[j])) || t_.source[j] == '_'))
      ++j;
    return {t_.source.substr(i, j - i), j};
  }

  // Parses nodes until a statement whose keyword is in `stops`; stores that
  // keyword in *terminator ("" at end of input).
  std::vector<Node> parse_until(const std::vector<std::string>& stops, std::string* terminator) {
    std::vector<Node> nodes;
    while (index_ < tags_.size()) {
      const Tag& tag = tags_[index_];
      if (tag.kind == Tag::Kind::kText) {
        Node n;
        n.kind = Node::Kind::kText;
        n.pos = tag.pos;
        n.text = tag.text;
        nodes.push_back(std::move(n));
        ++index_;
        continue;
      }
      if (tag.kind == Tag::Kind::kOutput) {
        ExprParser p(t_, tag.begin, tag.end);
        Node n;
        n.kind = Node::Kind::kOutput;
        n.pos = tag.pos;
        n.expr = p.parse_expression();
        p.expect_end();
        nodes.push_back(std::move(n));
        ++index_;
        continue;
      }
      auto [word, after] = keyword(tag);
      for (const auto& stop : stops) {
        if (word == stop) {
          *terminator = word;
          return nodes;
        }
      }
      if (word == "if") {
        nodes.push_back(parse_if(tag, after));
      } else if (word == "for") {
        nodes.push_back(parse_for(tag, after));
      } else if (word.empty()) {
        t_.fail(tag.pos, "empty statement");
      } else if (word == "endif" || word == "endfor" || word == "elif" || word == "else") {
        t_.fail(tag.pos, "unexpected '" + word + "' with no open block");
      } else {
        t_.fail(tag.pos, "unsupported statement '" + word + "'");
      }
    }
    *terminator = "";
    return nodes;
  }

  Node parse_if(const Tag& open, size_t after) {
    Node n;
    n.kind = Node::Kind::kIf;
    n.pos = open.pos;
    size_t cond_begin = after, cond_end = open.end;
    while (true) {
      ExprParser p(t_, cond_begin, cond_end);
      auto cond = p.parse_expression();
      p.expect_end();
      ++index_;
      std::string term;
      auto body = parse_until({"elif", "else", "endif"}, &term);
      n.branches.emplace_back(std::move(cond), std::move(body));
      if (term.empty()) t_.fail(open.pos, "'if' without matching 'endif'");
      const Tag& tag = tags_[index_];
      if (term == "elif") {
        cond_begin = keyword(tag).second;
        cond_end = tag.end;
        continue;
      }
      if (term == "else") {
        expect_only_keyword(tag);
        ++index_;
        n.else_body = parse_until({"endif", "elif", "else"}, &term);
        if (term.empty()) t_.fail(open.pos, "'if' without matching 'endif'");
        if (term != "endif") t_.fail(tags_[index_].pos, "'" + term + "' after 'else'");
      }
      expect_only_keyword(tags_[index_]);
      ++index_;
      return n;
    }
  }

  Node parse_for(const Tag& open, size_t after) {
    Node n;
    n.kind = Node::Kind::kFor;
    n.pos = open.pos;
    ExprParser p(t_, after, open.end);
    n.loop_vars = p.parse_target_names();
    p.expect_name("in");
    n.expr = p.parse_expression();
    p.expect_end();
    ++index_;
    std::string term;
    n.body = parse_until({"endfor"}, &term);
    if (term.empty()) t_.fail(open.pos, "'for' without matching 'endfor'");
    expect_only_keyword(tags_[index_]);
    ++index_;
    return n;
  }

  void expect_only_keyword(const Tag& tag) const {
    const size_t after = keyword(tag).second;
    for (size_t i = after; i < tag.end; ++i) {
      if (!is_ws(t_.source[i])) t_.fail(i, "unexpected text after '" + keyword(tag).first + "'");
    }
  }

  const CompiledTemplate& t_;
  std::vector<Tag> tags_;
  size_t index_ = 0;
};

// ---------------------------------------------------------------------------
// Evaluation.

// The result of an expression: a value, or an undefined marker that becomes
// an error as soon as anything but "is defined" / default() consumes it.
struct Result {
  Value value;
  bool undefined = false;
  std::string what;  // description for the error: "field 'A'", "index 5 of list"
  size_t pos = 0;
};

class Renderer {
 public:
  Renderer(const CompiledTemplate& t, const Value& context) : t_(t), context_(context) {}

  void render(const std::vector<Node>& nodes, std::string& out) {
    for (const Node& n : nodes) {
      switch (n.kind) {
        case Node::Kind::kText:
          out += n.text;
          break;
        case Node::Kind::kOutput:
          out += python_str(require(eval(*n.expr)));
          break;
        case Node::Kind::kIf: {
          bool taken = false;
          for (const auto& [cond, body] : n.branches) {
            if (truthy(require(eval(*cond)))) {
              render(body, out);
              taken = true;
              break;
            }
          }
          if (!taken) render(n.else_body, out);
          break;
        }
        case Node::Kind::kFor:
          render_for(n, out);
          break;
      }
    }
  }

  Value eval_value(const Expr& e) { return require(eval(e)); }

 private:
  void render_for(const Node& n, std::string& out) {
    const Value seq = require(eval(*n.expr));
    Value::List items;
    if (seq.is_list()) {
      items = seq.as_list();
    } else if (seq.is_object()) {
      for (const auto& [k, v] : seq.as_object()) items.emplace_back(k);
    } else if (seq.is_string()) {
      const std::u32string chars = utf8::to_u32(seq.as_string());
      for (char32_t c : chars) items.emplace_back(utf8::from_u32(std::u32string(1, c)));
    } else {
      t_.fail(n.expr->pos,
              std::string("cannot iterate over a value of type '") + python_type_name(seq) + "'");
    }
    const int64_t length = static_cast<int64_t>(items.size());
    for (int64_t i = 0; i < length; ++i) {
      Frame frame;
      if (n.loop_vars.size() == 1) {
        frame.emplace_back(n.loop_vars[0], items[i]);
      } else {
        if (!items[i].is_list() || items[i].as_list().size() != n.loop_vars.size()) {
          t_.fail(n.pos, "cannot unpack item " + std::to_string(i) + " into " +
                             std::to_string(n.loop_vars.size()) + " loop variables");
        }
        for (size_t k = 0; k < n.loop_vars.size(); ++k) {
          frame.emplace_back(n.loop_vars[k], items[i].as_list()[k]);
        }
      }
      frame.emplace_back("loop", Value::object({{"index", Value(i + 1)},
                                                {"index0", Value(i)},
                                                {"revindex", Value(length - i)},
                                                {"revindex0", Value(length - i - 1)},
                                                {"first", Value(i == 0)},
                                                {"last", Value(i + 1 == length)},
                                                {"length", Value(length)}}));
      frames_.push_back(std::move(frame));
      render(n.body, out);
      frames_.pop_back();
    }
  }

  using Frame = std::vector<std::pair<std::string, Value>>;

  Value require(const Result& r) const {
    if (r.undefined) t_.fail(r.pos, "undefined " + r.what);
    return r.value;
  }

  static Result defined(Value v) {
    Result r;
    r.value = std::move(v);
    return r;
  }
  static Result undefined(std::string what, size_t pos) {
    Result r;
    r.undefined = true;
    r.what = std::move(what);
    r.pos = pos;
    return r;
  }

  [[noreturn]] void type_error(size_t pos, const std::string& message) const {
    t_.fail(pos, message);
  }

  Result eval(const Expr& e) {
    switch (e.kind) {
      case Expr::Kind::kLiteral:
        return defined(e.literal);
      case Expr::Kind::kName: {
        for (auto f = frames_.rbegin(); f != frames_.rend(); ++f) {
          for (auto v = f->rbegin(); v != f->rend(); ++v) {
            if (v->first == e.name) return defined(v->second);
          }
        }
        if (const Value* v = context_.find(e.name)) return defined(*v);
        return undefined("field '" + e.name + "'", e.pos);
      }
      case Expr::Kind::kAttr:
        return get_item(*e.args[0], Value(e.name), e.pos, /*attribute=*/true);
      case Expr::Kind::kItem: {
        const Value key = require(eval(*e.args[1]));
        return get_item(*e.args[0], key, e.pos, /*attribute=*/false);
      }
      case Expr::Kind::kList: {
        Value::List items;
        for (const auto& a : e.args) items.push_back(require(eval(*a)));
        return defined(Value::list(std::move(items)));
      }
      case Expr::Kind::kNeg: {
        const Value v = require(eval(*e.args[0]));
        if (v.is_int()) return defined(Value(-v.as_int()));
        if (v.is_double()) return defined(Value(-v.as_double()));
        type_error(e.pos,
                   std::string("bad operand type for unary -: '") + python_type_name(v) + "'");
      }
      case Expr::Kind::kBinary:
        return defined(binary(e, require(eval(*e.args[0])), require(eval(*e.args[1]))));
      case Expr::Kind::kCompare:
        return defined(Value(compare(e, require(eval(*e.args[0])), require(eval(*e.args[1])))));
      case Expr::Kind::kAnd: {
        const Value left = require(eval(*e.args[0]));
        if (!truthy(left)) return defined(left);
        return defined(require(eval(*e.args[1])));
      }
      case Expr::Kind::kOr: {
        const Value left = require(eval(*e.args[0]));
        if (truthy(left)) return defined(left);
        return defined(require(eval(*e.args[1])));
      }
      case Expr::Kind::kNot:
        return defined(Value(!truthy(require(eval(*e.args[0])))));
      case Expr::Kind::kCondition:
        return truthy(require(eval(*e.args[0]))) ? eval(*e.args[1]) : eval(*e.args[2]);
      case Expr::Kind::kTest:
        return defined(Value(test(e)));
      case Expr::Kind::kFilter:
        return defined(filter(e));
      case Expr::Kind::kCall:
        return defined(call_method(e));
    }
    type_error(e.pos, "internal: unknown expression");
  }

  Result get_item(const Expr& base_expr, const Value& key, size_t pos, bool attribute) {
    const Value base = require(eval(base_expr));
    const std::string shown = key.is_string() ? "'" + key.as_string() + "'" : python_str(key);
    if (base.is_object()) {
      if (key.is_string()) {
        if (const Value* v = base.find(key.as_string())) return defined(*v);
      }
      return undefined("field " + shown + (attribute ? " (attribute of a dict)" : ""), pos);
    }
    if (base.is_list() || (base.is_string() && !attribute)) {
      int64_t index = 0;
      if (key.is_int()) {
        index = key.as_int();
      } else if (attribute && key.is_string() && !key.as_string().empty() &&
                 std::isdigit(static_cast<unsigned char>(key.as_string()[0]))) {
        index = std::strtoll(key.as_string().c_str(), nullptr, 10);  // Jinja's foo.0
      } else if (attribute) {
        return undefined("attribute " + shown + " of a " + python_type_name(base), pos);
      } else {
        type_error(pos, std::string(python_type_name(base)) + " indices must be integers, got " +
                            python_type_name(key));
      }
      if (base.is_list()) {
        const int64_t n = static_cast<int64_t>(base.as_list().size());
        const int64_t k = index < 0 ? index + n : index;
        if (k < 0 || k >= n) {
          return undefined(
              "index " + std::to_string(index) + " of a list of length " + std::to_string(n), pos);
        }
        return defined(base.as_list()[k]);
      }
      const std::u32string chars = utf8::to_u32(base.as_string());
      const int64_t n = static_cast<int64_t>(chars.size());
      const int64_t k = index < 0 ? index + n : index;
      if (k < 0 || k >= n) {
        return undefined(
            "index " + std::to_string(index) + " of a string of length " + std::to_string(n), pos);
      }
      return defined(Value(utf8::from_u32(chars.substr(k, 1))));
    }
    return undefined(
        std::string("attribute ") + shown + " of a value of type '" + python_type_name(base) + "'",
        pos);
  }

  Value binary(const Expr& e, const Value& a, const Value& b) {
    const std::string& op = e.name;
    if (op == "~") return Value(python_str(a) + python_str(b));
    if (op == "+") {
      if (a.is_string() && b.is_string()) return Value(a.as_string() + b.as_string());
      if (a.is_list() && b.is_list()) {
        Value::List items = a.as_list();
        items.insert(items.end(), b.as_list().begin(), b.as_list().end());
        return Value::list(std::move(items));
      }
    }
    const bool numeric = (a.is_number() || a.is_bool()) && (b.is_number() || b.is_bool());
    if (!numeric) {
      type_error(e.pos, "unsupported operand types for " + op + ": '" + python_type_name(a) +
                            "' and '" + python_type_name(b) + "'");
    }
    auto as_int = [](const Value& v) { return v.is_bool() ? int64_t{v.as_bool()} : v.as_int(); };
    auto as_num = [](const Value& v) {
      return v.is_bool() ? double{v.as_bool() ? 1.0 : 0.0} : v.as_double();
    };
    const bool ints = !a.is_double() && !b.is_double();
    if (op == "/") {
      if (as_num(b) == 0) type_error(e.pos, "division by zero");
      return Value(as_num(a) / as_num(b));
    }
    if (ints) {
      const int64_t x = as_int(a), y = as_int(b);
      if (op == "+") return Value(x + y);
      if (op == "-") return Value(x - y);
      if (op == "*") return Value(x * y);
      if (y == 0) type_error(e.pos, "integer division or modulo by zero");
      // Python floors towards negative infinity.
      int64_t q = x / y;
      if ((x % y != 0) && ((x < 0) != (y < 0))) --q;
      if (op == "//") return Value(q);
      return Value(x - q * y);
    }
    const double x = as_num(a), y = as_num(b);
    if (op == "+") return Value(x + y);
    if (op == "-") return Value(x - y);
    if (op == "*") return Value(x * y);
    if (y == 0) type_error(e.pos, "float division or modulo by zero");
    if (op == "//") return Value(std::floor(x / y));
    return Value(x - std::floor(x / y) * y);
  }

  bool compare(const Expr& e, const Value& a, const Value& b) {
    const std::string& op = e.name;
    if (op == "==") return a == b;
    if (op == "!=") return !(a == b);
    if (op == "in") {
      bool found = false;
      if (b.is_string()) {
        if (!a.is_string()) {
          type_error(e.pos, std::string("'in <string>' requires string as left operand, not ") +
                                python_type_name(a));
        }
        found = b.as_string().find(a.as_string()) != std::string::npos;
      } else if (b.is_list()) {
        for (const Value& item : b.as_list()) found = found || item == a;
      } else if (b.is_object()) {
        found = a.is_string() && b.find(a.as_string()) != nullptr;
      } else {
        type_error(e.pos,
                   std::string("argument of type '") + python_type_name(b) + "' is not iterable");
      }
      return found != e.negated;
    }
    int order = 0;
    if (a.is_number() && b.is_number()) {
      order = a.as_double() < b.as_double() ? -1 : a.as_double() > b.as_double() ? 1 : 0;
    } else if (a.is_string() && b.is_string()) {
      order = a.as_string().compare(b.as_string());
    } else {
      type_error(e.pos, "'" + op + "' not supported between '" + python_type_name(a) + "' and '" +
                            python_type_name(b) + "'");
    }
    if (op == "<") return order < 0;
    if (op == ">") return order > 0;
    if (op == "<=") return order <= 0;
    return order >= 0;
  }

  bool test(const Expr& e) {
    const Result r = eval(*e.args[0]);
    bool result = false;
    if (e.name == "defined" || e.name == "undefined") {
      result = (e.name == "defined") != r.undefined;
    } else if (e.name == "none") {
      result = !r.undefined && r.value.is_null();
    } else {
      const Value v = require(r);
      if (e.name == "string") result = v.is_string();
      if (e.name == "number") result = v.is_number();
      if (e.name == "integer") result = v.is_int();
      if (e.name == "boolean") result = v.is_bool();
      if (e.name == "mapping") result = v.is_object();
      if (e.name == "sequence") result = v.is_list() || v.is_string() || v.is_object();
    }
    return result != e.negated;
  }

  void expect_args(const Expr& e, size_t min, size_t max) const {
    const size_t n = e.args.size() - 1;
    if (n < min || n > max) {
      t_.fail(e.pos, "'" + e.name + "' takes " +
                         (min == max ? std::to_string(min)
                                     : std::to_string(min) + " to " + std::to_string(max)) +
                         " argument(s), got " + std::to_string(n));
    }
  }

  std::string string_arg(const Expr& e, size_t i) {
    const Value v = require(eval(*e.args[i]));
    if (!v.is_string()) {
      t_.fail(e.args[i]->pos,
              "'" + e.name + "' expects a string argument, got " + python_type_name(v));
    }
    return v.as_string();
  }

  Value filter(const Expr& e) {
    const std::string& f = e.name;
    if (f == "default" || f == "d") {
      expect_args(e, 0, 2);
      const Result r = eval(*e.args[0]);
      const bool boolean = e.args.size() > 2 && truthy(require(eval(*e.args[2])));
      if (!r.undefined && !(boolean && !truthy(r.value))) return r.value;
      return e.args.size() > 1 ? require(eval(*e.args[1])) : Value("");
    }
    const Value v = require(eval(*e.args[0]));
    if (f == "trim") {
      expect_args(e, 0, 0);
      return Value(utf8::strip(python_str(v)));
    }
    if (f == "upper" || f == "lower" || f == "capitalize" || f == "title") {
      expect_args(e, 0, 0);
      const std::string s = python_str(v);
      if (f == "upper") return Value(utf8::ascii_upper(s));
      if (f == "lower") return Value(utf8::ascii_lower(s));
      std::string out = utf8::ascii_lower(s);
      bool start = true;
      for (char& c : out) {
        const bool alpha = std::isalpha(static_cast<unsigned char>(c)) != 0;
        if (start && alpha) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
        if (f == "capitalize") {
          start = false;
        } else {
          start = !alpha;
        }
      }
      return Value(out);
    }
    if (f == "join") {
      expect_args(e, 0, 1);
      const std::string sep = e.args.size() > 1 ? string_arg(e, 1) : "";
      std::string out;
      bool first = true;
      for (const Value& item : iterate(v, e.pos)) {
        if (!first) out += sep;
        first = false;
        out += python_str(item);
      }
      return Value(out);
    }
    if (f == "length" || f == "count") {
      expect_args(e, 0, 0);
      if (v.is_string()) return Value(static_cast<int64_t>(utf8::length(v.as_string())));
      return Value(static_cast<int64_t>(iterate(v, e.pos).size()));
    }
    if (f == "first" || f == "last") {
      expect_args(e, 0, 0);
      const Value::List items = iterate(v, e.pos);
      if (items.empty()) t_.fail(e.pos, "'" + f + "' of an empty sequence");
      return f == "first" ? items.front() : items.back();
    }
    if (f == "list") {
      expect_args(e, 0, 0);
      return Value::list(iterate(v, e.pos));
    }
    if (f == "select" || f == "reject") {
      expect_args(e, 0, 0);
      Value::List out;
      for (const Value& item : iterate(v, e.pos)) {
        if (truthy(item) == (f == "select")) out.push_back(item);
      }
      return Value::list(std::move(out));
    }
    if (f == "string") {
      expect_args(e, 0, 0);
      return Value(python_str(v));
    }
    if (f == "int" || f == "float") {
      expect_args(e, 0, 1);
      const Value fallback =
          e.args.size() > 1 ? require(eval(*e.args[1])) : (f == "int" ? Value(0) : Value(0.0));
      double x = 0;
      if (v.is_number()) {
        x = v.as_double();
      } else if (v.is_bool()) {
        x = v.as_bool() ? 1 : 0;
      } else if (v.is_string()) {
        const std::string s = utf8::strip(v.as_string());
        char* stop = nullptr;
        x = std::strtod(s.c_str(), &stop);
        if (s.empty() || stop != s.c_str() + s.size()) return fallback;
      } else {
        return fallback;
      }
      if (f == "int") return Value(static_cast<int64_t>(std::trunc(x)));
      return Value(x);
    }
    if (f == "replace") {
      expect_args(e, 2, 2);
      return Value(replace_all(python_str(v), string_arg(e, 1), string_arg(e, 2)));
    }
    t_.fail(e.pos, "unknown filter '" + f + "'");
  }

  Value::List iterate(const Value& v, size_t pos) const {
    if (v.is_list()) return v.as_list();
    Value::List items;
    if (v.is_object()) {
      for (const auto& [k, item] : v.as_object()) items.emplace_back(k);
      return items;
    }
    if (v.is_string()) {
      for (char32_t c : utf8::to_u32(v.as_string())) {
        items.emplace_back(utf8::from_u32(std::u32string(1, c)));
      }
      return items;
    }
    t_.fail(pos, std::string("'") + python_type_name(v) + "' object is not iterable");
  }

  static std::string replace_all(std::string s, const std::string& from, const std::string& to) {
    if (from.empty()) return s;
    std::string out;
    size_t i = 0;
    while (true) {
      const size_t k = s.find(from, i);
      if (k == std::string::npos) break;
      out.append(s, i, k - i);
      out += to;
      i = k + from.size();
    }
    out.append(s, i, std::string::npos);
    return out;
  }

  Value call_method(const Expr& e) {
    const Value self = require(eval(*e.args[0]));
    const std::string& m = e.name;
    if (self.is_string()) {
      const std::string& s = self.as_string();
      if (m == "strip" || m == "lstrip" || m == "rstrip") {
        expect_args(e, 0, 1);
        if (e.args.size() == 1) {
          return Value(m == "strip"    ? utf8::strip(s)
                       : m == "lstrip" ? utf8::lstrip(s)
                                       : utf8::rstrip(s));
        }
        const std::u32string chars = utf8::to_u32(string_arg(e, 1));
        std::u32string text = utf8::to_u32(s);
        auto in_set = [&](char32_t c) { return chars.find(c) != std::u32string::npos; };
        size_t b = 0, en = text.size();
        if (m != "rstrip") {
          while (b < en && in_set(text[b])) ++b;
        }
        if (m != "lstrip") {
          while (en > b && in_set(text[en - 1])) --en;
        }
        return Value(utf8::from_u32(text.substr(b, en - b)));
      }
      if (m == "upper") return Value(utf8::ascii_upper(s));
      if (m == "lower") return Value(utf8::ascii_lower(s));
      if (m == "replace") {
        expect_args(e, 2, 2);
        return Value(replace_all(s, string_arg(e, 1), string_arg(e, 2)));
      }
      if (m == "startswith" || m == "endswith") {
        expect_args(e, 1, 1);
        const std::string x = string_arg(e, 1);
        const bool ok = x.size() <= s.size() &&
                        (m == "startswith" ? s.compare(0, x.size(), x) == 0
                                           : s.compare(s.size() - x.size(), x.size(), x) == 0);
        return Value(ok);
      }
      if (m == "split") {
        expect_args(e, 0, 1);
        Value::List parts;
        if (e.args.size() == 1) {
          std::string current;
          size_t pos = 0;
          bool in_word = false;
          while (pos < s.size()) {
            const size_t start = pos;
            const char32_t cp = utf8::decode(s, pos);
            if (utf8::is_space(cp)) {
              if (in_word) parts.emplace_back(current);
              current.clear();
              in_word = false;
            } else {
              current.append(s, start, pos - start);
              in_word = true;
            }
          }
          if (in_word) parts.emplace_back(current);
          return Value::list(std::move(parts));
        }
        const std::string sep = string_arg(e, 1);
        if (sep.empty()) t_.fail(e.args[1]->pos, "empty separator");
        size_t i = 0;
        while (true) {
          const size_t k = s.find(sep, i);
          if (k == std::string::npos) break;
          parts.emplace_back(s.substr(i, k - i));
          i = k + sep.size();
        }
        parts.emplace_back(s.substr(i));
        return Value::list(std::move(parts));
      }
    } else if (self.is_list()) {
      if (m == "index" || m == "count") {
        expect_args(e, 1, 1);
        const Value x = require(eval(*e.args[1]));
        const auto& items = self.as_list();
        int64_t count = 0;
        for (size_t i = 0; i < items.size(); ++i) {
          if (items[i] == x) {
            if (m == "index") return Value(static_cast<int64_t>(i));
            ++count;
          }
        }
        if (m == "index") t_.fail(e.pos, python_repr(x) + " is not in list");
        return Value(count);
      }
    } else if (self.is_object()) {
      if (m == "get") {
        expect_args(e, 1, 2);
        const Value key = require(eval(*e.args[1]));
        if (key.is_string()) {
          if (const Value* v = self.find(key.as_string())) return *v;
        }
        return e.args.size() > 2 ? require(eval(*e.args[2])) : Value();
      }
      if (m == "keys" || m == "values" || m == "items") {
        expect_args(e, 0, 0);
        Value::List out;
        for (const auto& [k, v] : self.as_object()) {
          if (m == "keys") out.emplace_back(k);
          if (m == "values") out.push_back(v);
          if (m == "items") out.push_back(Value::list({Value(k), v}));
        }
        return Value::list(std::move(out));
      }
    }
    t_.fail(e.pos,
            std::string("'") + python_type_name(self) + "' object has no method '" + m + "'");
  }

  const CompiledTemplate& t_;
  const Value& context_;
  std::vector<Frame> frames_;
};

}  // namespace

// ---------------------------------------------------------------------------

Template::Template(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}

Template Template::compile(std::string_view source, std::string name) {
  auto impl = std::make_shared<Impl>();
  impl->name = std::move(name);
  impl->source = std::string(source);
  // Jinja drops one trailing newline of the template (keep_trailing_newline=False).
  if (!impl->source.empty() && impl->source.back() == '\n') {
    impl->source.pop_back();
    if (!impl->source.empty() && impl->source.back() == '\r') impl->source.pop_back();
  }
  BlockParser parser(*impl, split_tags(*impl));
  impl->nodes = parser.parse_all();
  return Template(std::move(impl));
}

std::string Template::render(const Value& context) const {
  std::string out;
  Renderer(*impl_, context).render(impl_->nodes, out);
  return out;
}

bool Template::is_single_expression() const {
  const Node* output = nullptr;
  for (const Node& n : impl_->nodes) {
    if (n.kind == Node::Kind::kText && utf8::strip(n.text).empty()) continue;
    if (n.kind != Node::Kind::kOutput || output != nullptr) return false;
    output = &n;
  }
  return output != nullptr;
}

Value Template::evaluate(const Value& context) const {
  if (!is_single_expression()) return Value(render(context));
  for (const Node& n : impl_->nodes) {
    if (n.kind == Node::Kind::kOutput) return Renderer(*impl_, context).eval_value(*n.expr);
  }
  return Value(render(context));
}

const std::string& Template::name() const { return impl_->name; }
const std::string& Template::source() const { return impl_->source; }

}  // namespace tessera::eval
