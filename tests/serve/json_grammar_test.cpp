#include "tessera/serve/json_grammar.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "tessera/core/error.h"

namespace tessera::serve {
namespace {

// ---------------------------------------------------------------------------
// An independent reference: a recursive-descent parser that reports whether
// a text is a complete JSON object document, a proper prefix of one, or
// neither. Where the text ends inside a UTF-8 sequence or a \u escape, it
// decides by enumerating every completion of the missing bytes or digits.

enum class Verdict { kComplete, kIncomplete, kInvalid };

const char* verdict_name(Verdict v) {
  return v == Verdict::kComplete     ? "complete"
         : v == Verdict::kIncomplete ? "incomplete"
                                     : "invalid";
}

class Reference {
 public:
  Reference(const std::string& text, int max_depth) : s_(text), max_depth_(max_depth) {}

  Verdict run() {
    try {
      skip_ws();
      if (peek() != '{') return Verdict::kInvalid;
      value(0);
      skip_ws();
      return i_ == s_.size() ? Verdict::kComplete : Verdict::kInvalid;
    } catch (const IncompleteText&) {
      return Verdict::kIncomplete;
    } catch (const InvalidText&) {
      return Verdict::kInvalid;
    }
  }

 private:
  struct IncompleteText {};
  struct InvalidText {};

  bool at_end() const { return i_ >= s_.size(); }
  uint8_t peek() const {
    if (at_end()) throw IncompleteText{};
    return static_cast<uint8_t>(s_[i_]);
  }
  uint8_t next() {
    const uint8_t c = peek();
    ++i_;
    return c;
  }
  void expect(char c) {
    if (next() != static_cast<uint8_t>(c)) throw InvalidText{};
  }
  void skip_ws() {
    while (!at_end() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\n' || s_[i_] == '\r')) ++i_;
  }

  void value(int depth) {
    skip_ws();
    const uint8_t c = peek();
    if (c == '{') {
      if (depth + 1 > max_depth_) throw InvalidText{};
      ++i_;
      skip_ws();
      if (peek() == '}') {
        ++i_;
        return;
      }
      while (true) {
        skip_ws();
        if (peek() != '"') throw InvalidText{};
        string();
        skip_ws();
        expect(':');
        value(depth + 1);
        skip_ws();
        const uint8_t d = next();
        if (d == '}') return;
        if (d != ',') throw InvalidText{};
      }
    } else if (c == '[') {
      if (depth + 1 > max_depth_) throw InvalidText{};
      ++i_;
      skip_ws();
      if (peek() == ']') {
        ++i_;
        return;
      }
      while (true) {
        value(depth + 1);
        skip_ws();
        const uint8_t d = next();
        if (d == ']') return;
        if (d != ',') throw InvalidText{};
      }
    } else if (c == '"') {
      string();
    } else if (c == '-' || (c >= '0' && c <= '9')) {
      number();
    } else if (c == 't') {
      literal("true");
    } else if (c == 'f') {
      literal("false");
    } else if (c == 'n') {
      literal("null");
    } else {
      throw InvalidText{};
    }
  }

  void literal(const char* word) {
    for (const char* p = word; *p != 0; ++p) expect(*p);
  }

  static bool digit(uint8_t c) { return c >= '0' && c <= '9'; }

  void number() {
    if (peek() == '-') ++i_;
    const uint8_t first = next();
    if (!digit(first)) throw InvalidText{};
    if (first != '0') {
      while (digit(peek())) ++i_;
    }
    if (peek() == '.') {
      ++i_;
      if (!digit(next())) throw InvalidText{};
      while (digit(peek())) ++i_;
    }
    if (peek() == 'e' || peek() == 'E') {
      ++i_;
      if (peek() == '+' || peek() == '-') ++i_;
      if (!digit(next())) throw InvalidText{};
      while (digit(peek())) ++i_;
    }
  }

  // Reads 4 hex digits; at the end of the text, checks whether any
  // completion of the digits read satisfies `ok`.
  template <typename Ok>
  void hex4(Ok ok) {
    uint32_t v = 0;
    for (int k = 0; k < 4; ++k) {
      if (at_end()) {
        const int missing = 4 - k;
        for (uint32_t tail = 0; tail < (1u << (4 * missing)); ++tail) {
          if (ok((v << (4 * missing)) | tail)) throw IncompleteText{};
        }
        throw InvalidText{};
      }
      const uint8_t c = next();
      int d = -1;
      if (digit(c)) d = c - '0';
      if (c >= 'a' && c <= 'f') d = c - 'a' + 10;
      if (c >= 'A' && c <= 'F') d = c - 'A' + 10;
      if (d < 0) throw InvalidText{};
      v = v * 16 + static_cast<uint32_t>(d);
    }
    if (!ok(v)) throw InvalidText{};
  }

  static bool valid_code_point(const std::vector<uint8_t>& bytes) {
    const size_t n = bytes.size();
    uint32_t cp = bytes[0] & (n == 2 ? 0x1F : n == 3 ? 0x0F : 0x07);
    for (size_t k = 1; k < n; ++k) {
      if ((bytes[k] & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (bytes[k] & 0x3F);
    }
    const uint32_t min = n == 2 ? 0x80 : n == 3 ? 0x800 : 0x10000;
    return cp >= min && cp <= 0x10FFFF && !(cp >= 0xD800 && cp <= 0xDFFF);
  }

  // Every way to finish `bytes` to `n` bytes with continuation bytes.
  static bool some_completion_valid(std::vector<uint8_t> bytes, size_t n) {
    if (bytes.size() == n) return valid_code_point(bytes);
    for (uint32_t b = 0x80; b <= 0xBF; ++b) {
      bytes.push_back(static_cast<uint8_t>(b));
      if (some_completion_valid(bytes, n)) return true;
      bytes.pop_back();
    }
    return false;
  }

  void string() {
    expect('"');
    while (true) {
      const uint8_t c = next();
      if (c == '"') return;
      if (c == '\\') {
        const uint8_t e = next();
        if (e == 'u') {
          uint32_t unit = 0;
          hex4([&](uint32_t v) {
            unit = v;
            return !(v >= 0xDC00 && v <= 0xDFFF);
          });
          if (unit >= 0xD800 && unit <= 0xDBFF) {
            expect('\\');
            expect('u');
            hex4([](uint32_t v) { return v >= 0xDC00 && v <= 0xDFFF; });
          }
        } else if (std::string("\"\\/bfnrt").find(static_cast<char>(e)) == std::string::npos) {
          throw InvalidText{};
        }
      } else if (c < 0x20) {
        throw InvalidText{};
      } else if (c >= 0x80) {
        size_t n = 0;
        if ((c & 0xE0) == 0xC0) n = 2;
        if ((c & 0xF0) == 0xE0) n = 3;
        if ((c & 0xF8) == 0xF0) n = 4;
        if (n == 0) throw InvalidText{};
        std::vector<uint8_t> bytes = {c};
        while (bytes.size() < n) {
          if (at_end()) {
            if (some_completion_valid(bytes, n)) throw IncompleteText{};
            throw InvalidText{};
          }
          bytes.push_back(next());
          // A wrong byte inside the sequence cannot be repaired later.
          if (!some_completion_valid(bytes, n)) throw InvalidText{};
        }
      }
    }
  }

  const std::string& s_;
  size_t i_ = 0;
  int max_depth_;
};

Verdict reference(const std::string& text, int max_depth = 32) {
  return Reference(text, max_depth).run();
}

// The recogniser's verdict: kInvalid if some byte is refused.
Verdict recognise(const std::string& text, const JsonGrammarOptions& options = {}) {
  JsonRecognizer r(options);
  for (char c : text) {
    if (!r.feed(static_cast<uint8_t>(c))) return Verdict::kInvalid;
  }
  return r.is_complete() ? Verdict::kComplete : Verdict::kIncomplete;
}

// Index of the first refused byte, or -1.
int64_t first_rejected(const std::string& text, const JsonGrammarOptions& options = {}) {
  JsonRecognizer r(options);
  for (size_t i = 0; i < text.size(); ++i) {
    if (!r.feed(static_cast<uint8_t>(text[i]))) return static_cast<int64_t>(i);
  }
  return -1;
}

TEST(JsonRecognizer, AcceptsValidDocuments) {
  const std::vector<std::string> valid = {
      "{}",
      " \t\r\n{ }\n ",
      R"({"a":1})",
      R"({"a": [1, -2, 3.5, -0, 0.25e-3, 1E+2, 7e9, -0.0]})",
      R"({"nested": {"deeper": {"list": [[], [{}], [[1]]]}}})",
      R"({"t": true, "f": false, "n": null})",
      R"({"esc": "\" \\ \/ \b \f \n \r \t \u00e9 \u0000 \uFFFF"})",
      R"({"pair": "\ud83d\ude00", "upper": "\uD834\uDD1E"})",
      "{\"raw\": \"caf\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80 \xED\x9F\xBF \xF4\x8F\xBF\xBF\"}",
      "{\"del\": \"\x7F\"}",
      R"({"": ""})",
      R"({"a":{"b":[true,false,null,"x",{"c":[]}]}})",
  };
  for (const auto& doc : valid) {
    EXPECT_EQ(recognise(doc), Verdict::kComplete) << doc;
    EXPECT_EQ(reference(doc), Verdict::kComplete) << doc;
    EXPECT_TRUE(nlohmann::json::accept(doc)) << doc;
    // Every proper prefix is valid; complete once only whitespace is left.
    for (size_t n = 0; n < doc.size(); ++n) {
      const bool rest_is_whitespace = doc.find_first_not_of(" \t\r\n", n) == std::string::npos;
      EXPECT_EQ(recognise(doc.substr(0, n)),
                rest_is_whitespace ? Verdict::kComplete : Verdict::kIncomplete)
          << doc.substr(0, n);
    }
  }
}

TEST(JsonRecognizer, RejectsAtTheFirstImpossibleByte) {
  struct Case {
    std::string text;
    int64_t rejected_at;
  };
  const std::vector<Case> cases = {
      {"[]", 0},     // top level must be an object
      {"\"a\"", 0},  // ...not a string
      {"1", 0},      // ...not a number
      {"x", 0},
      {R"({"a"})", 4},   // missing colon
      {R"({"a":})", 5},  // missing value
      {R"({,})", 1},
      {R"({"a":1,})", 7},    // trailing comma in an object
      {R"({"a":[1,]})", 8},  // trailing comma in an array
      {R"({"a":01})", 6},    // leading zero
      {R"({"a":1.})", 7},    // digit needed after the point
      {R"({"a":.5})", 5},
      {R"({"a":+1})", 5},
      {R"({"a":-})", 6},
      {R"({"a":1e})", 7},
      {R"({"a":1e+})", 8},
      {R"({"a":1.5.2})", 8},
      {R"({"a":tru})", 8},
      {R"({"a":nul1})", 8},
      {R"({"a":"\x"})", 7},  // unknown escape
      {R"({"a":"\u12G4"})", 10},
      {"{\"a\":\"\x01\"}", 6},  // control character in a string
      {"{\"a\":\"\n\"}", 6},
      {R"({"a":"\udc00"})", 9},         // a lone low surrogate (decided by its 2nd digit)
      {R"({"a":"\ud800"})", 12},        // a high surrogate must be followed by \u
      {R"({"a":"\ud800\u0041"})", 14},  // ...by a low surrogate
      {R"({"a":"\ud800\udbff"})", 15},
      {"{\"a\":\"\xC0\x80\"}", 6},  // overlong
      {"{\"a\":\"\xC1\xBF\"}", 6},
      {"{\"a\":\"\xE0\x80\x80\"}", 7},  // overlong 3-byte form
      {"{\"a\":\"\xED\xA0\x80\"}", 7},  // an encoded surrogate
      {"{\"a\":\"\xF0\x80\x80\x80\"}", 7},
      {"{\"a\":\"\xF4\x90\x80\x80\"}", 7},  // above U+10FFFF
      {"{\"a\":\"\xF5\x80\x80\x80\"}", 6},
      {"{\"a\":\"\x80\"}", 6},  // a lone continuation byte
      {"{\"a\":\"\xC3\"}", 7},  // a sequence cut short by the quote
      {R"({"a":1}x)", 7},
      {R"({} {})", 3},
      {R"({"a":1]})", 6},  // mismatched closer
      {R"({"a":[1}})", 7},
      {R"({1:2})", 1},  // keys are strings
      {"{\"a\" :\t[ 1 ,\n 2 ] }  ]", 21},
  };
  for (const auto& c : cases) {
    EXPECT_EQ(first_rejected(c.text), c.rejected_at) << c.text;
    EXPECT_EQ(reference(c.text), Verdict::kInvalid) << c.text;
    EXPECT_FALSE(nlohmann::json::accept(c.text) && c.text[0] == '{') << c.text;
  }
}

TEST(JsonRecognizer, IncompletePrefixesAreNotComplete) {
  for (const std::string prefix : {"", " ", "{", "{\"a", "{\"a\"", "{\"a\":", "{\"a\":tr",
                                   "{\"a\":\"\\u00", "{\"a\":\"\\ud83d", "{\"a\":\"\\ud83d\\",
                                   "{\"a\":\"\xF0\x9F", "{\"a\":[1,", "{\"a\":12", "{\"a\":{}"}) {
    EXPECT_EQ(recognise(prefix), Verdict::kIncomplete) << prefix;
    EXPECT_EQ(reference(prefix), Verdict::kIncomplete) << prefix;
  }
}

TEST(JsonRecognizer, DepthLimit) {
  JsonGrammarOptions o;
  o.max_depth = 3;
  EXPECT_EQ(recognise(R"({"a":{"b":[1]}})", o), Verdict::kComplete);
  EXPECT_EQ(first_rejected(R"({"a":{"b":[[1]]}})", o), 11);
  EXPECT_EQ(first_rejected(R"({"a":{"b":{}}})", o), -1);
  EXPECT_EQ(first_rejected(R"({"a":{"b":{"c":{}}}})", o), 15);
  JsonGrammarOptions deep;
  deep.max_depth = JsonRecognizer::kMaxSupportedDepth;
  std::string doc = "{\"a\":";
  for (int i = 1; i < deep.max_depth; ++i) doc += "[";
  for (int i = 1; i < deep.max_depth; ++i) doc += "]";
  doc += "}";
  EXPECT_EQ(recognise(doc, deep), Verdict::kComplete);
  EXPECT_EQ(recognise("{\"a\":[" + doc.substr(5), deep), Verdict::kInvalid);
  JsonRecognizer r(deep);
  EXPECT_TRUE(r.feed(std::string_view("{\"a\":[[")));
  EXPECT_EQ(r.depth(), 3);
  o.max_depth = 0;
  EXPECT_THROW(JsonRecognizer{o}, InvalidArgument);
  o.max_depth = JsonRecognizer::kMaxSupportedDepth + 1;
  EXPECT_THROW(JsonRecognizer{o}, InvalidArgument);
}

TEST(JsonRecognizer, WhitespaceRunLimit) {
  JsonGrammarOptions o;
  o.max_whitespace_run = 2;
  // Runs inside strings do not count.
  EXPECT_EQ(recognise("{\n \"a\": 1,\n \"b\": \"x    y\"\n}\n", o), Verdict::kComplete);
  EXPECT_EQ(first_rejected("{\n  \"a\": 1}", o), 3);
  EXPECT_EQ(first_rejected("{\"a\": 1}   ", o), 10);
  EXPECT_EQ(first_rejected("{\"a\": 1   }", o), 9);  // after a number too
  o.max_whitespace_run = -1;
  EXPECT_THROW(JsonRecognizer{o}, InvalidArgument);
}

TEST(JsonRecognizer, FeedIsAllOrNothingAndCopiesBranch) {
  JsonRecognizer r;
  ASSERT_TRUE(r.feed(std::string_view("{\"a\":")));
  JsonRecognizer branch = r;
  EXPECT_FALSE(r.feed(std::string_view("12x")));  // refused at 'x': nothing consumed
  EXPECT_TRUE(r.feed(std::string_view("[true]}")));
  EXPECT_TRUE(r.is_complete());
  EXPECT_FALSE(branch.is_complete());
  EXPECT_TRUE(branch.feed(std::string_view("\"s\"}")));
  EXPECT_TRUE(branch.is_complete());
}

// Random JSON text: mostly valid objects with random whitespace, strings,
// escapes, UTF-8 and numbers; then mutated byte-wise.
class JsonFuzzer {
 public:
  explicit JsonFuzzer(uint32_t seed) : rng_(seed) {}

  std::string document() {
    std::string out;
    ws(out);
    object(out, 1);
    ws(out);
    return out;
  }

  std::string mutate(std::string s) {
    static const std::string kBytes =
        std::string("{}[],:\"\\u019-+.eEtrnlx \n\tDdCAF8") +
        std::string("\x01\x7F\x80\xBF\xC0\xC3\xE0\xED\xF0\xF4\xF5\xFF", 12);
    const int edits = uniform(1, 3);
    for (int k = 0; k < edits && !s.empty(); ++k) {
      const size_t pos = static_cast<size_t>(uniform(0, static_cast<int>(s.size()) - 1));
      const char b = kBytes[static_cast<size_t>(uniform(0, static_cast<int>(kBytes.size()) - 1))];
      switch (uniform(0, 2)) {
        case 0:
          s[pos] = b;
          break;
        case 1:
          s.insert(s.begin() + static_cast<std::ptrdiff_t>(pos), b);
          break;
        default:
          s.erase(pos, 1);
      }
    }
    return s;
  }

  int uniform(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng_); }

 private:
  void ws(std::string& out) {
    static const char kWs[] = {' ', '\n', '\t', '\r'};
    if (uniform(0, 2) != 0) return;
    for (int n = uniform(1, 3); n > 0; --n) out.push_back(kWs[uniform(0, 3)]);
  }

  static void utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
      out.push_back(static_cast<char>(cp));
    } else if (cp < 0x800) {
      out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
      out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else if (cp < 0x10000) {
      out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
      out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else {
      out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
      out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
  }

  void string(std::string& out) {
    out.push_back('"');
    for (int n = uniform(0, 6); n > 0; --n) {
      char buf[16];
      switch (uniform(0, 6)) {
        case 0:
          out += "\\n";
          break;
        case 1:
          std::snprintf(buf, sizeof buf, "\\u%04x", uniform(0, 0xD7FF));
          out += buf;
          break;
        case 2:
          std::snprintf(buf, sizeof buf, "\\u%04X\\u%04x", uniform(0xD800, 0xDBFF),
                        uniform(0xDC00, 0xDFFF));
          out += buf;
          break;
        case 3: {
          uint32_t cp = static_cast<uint32_t>(uniform(0x80, 0x10FFFF));
          if (cp >= 0xD800 && cp <= 0xDFFF) cp = 0xE9;
          utf8(out, cp);
          break;
        }
        default:
          out.push_back(static_cast<char>(uniform('a', 'z')));
      }
    }
    out.push_back('"');
  }

  void number(std::string& out) {
    if (uniform(0, 1)) out.push_back('-');
    if (uniform(0, 3) == 0) {
      out.push_back('0');
    } else {
      out += std::to_string(uniform(1, 99999));
    }
    if (uniform(0, 1)) out += "." + std::to_string(uniform(0, 999));
    if (uniform(0, 2) == 0) {
      out.push_back(uniform(0, 1) ? 'e' : 'E');
      if (uniform(0, 1)) out.push_back(uniform(0, 1) ? '+' : '-');
      out += std::to_string(uniform(0, 30));
    }
  }

  void value(std::string& out, int depth) {
    const int kind = uniform(0, depth >= 5 ? 4 : 6);
    switch (kind) {
      case 0:
        string(out);
        break;
      case 1:
        number(out);
        break;
      case 2:
        out += uniform(0, 1) ? "true" : "false";
        break;
      case 3:
        out += "null";
        break;
      case 4:
        number(out);
        break;
      case 5:
        object(out, depth + 1);
        break;
      default:
        array(out, depth + 1);
    }
  }

  void object(std::string& out, int depth) {
    out.push_back('{');
    const int n = uniform(0, 3);
    for (int i = 0; i < n; ++i) {
      if (i > 0) out.push_back(',');
      ws(out);
      string(out);
      ws(out);
      out.push_back(':');
      ws(out);
      value(out, depth);
      ws(out);
    }
    if (n == 0) ws(out);
    out.push_back('}');
  }

  void array(std::string& out, int depth) {
    out.push_back('[');
    const int n = uniform(0, 3);
    for (int i = 0; i < n; ++i) {
      if (i > 0) out.push_back(',');
      ws(out);
      value(out, depth);
      ws(out);
    }
    out.push_back(']');
  }

  std::mt19937 rng_;
};

TEST(JsonRecognizer, AgreesWithTheReferenceOnEveryPrefixOfRandomTexts) {
  JsonFuzzer fuzz(2024);
  int complete = 0;
  int invalid = 0;
  for (int trial = 0; trial < 1500; ++trial) {
    std::string text = fuzz.document();
    if (trial % 3 != 0) text = fuzz.mutate(text);
    // Prefix by prefix: the recogniser accepts byte i exactly when the
    // reference finds text[0..i] completable.
    JsonRecognizer r;
    bool alive = true;
    for (size_t n = 1; n <= text.size() && alive; ++n) {
      alive = r.feed(static_cast<uint8_t>(text[n - 1]));
      const Verdict expected = reference(text.substr(0, n));
      const Verdict got = !alive            ? Verdict::kInvalid
                          : r.is_complete() ? Verdict::kComplete
                                            : Verdict::kIncomplete;
      ASSERT_EQ(verdict_name(got), verdict_name(expected))
          << "prefix of " << n << " bytes of trial " << trial << ": " << text.substr(0, n);
    }
    const Verdict whole = reference(text);
    complete += whole == Verdict::kComplete;
    invalid += whole == Verdict::kInvalid;
    // The reference itself agrees with nlohmann on whole texts that start
    // with an object (nlohmann also accepts other top-level values).
    const size_t first = text.find_first_not_of(" \t\r\n");
    if (first != std::string::npos && text[first] == '{') {
      ASSERT_EQ(whole == Verdict::kComplete, nlohmann::json::accept(text)) << text;
    }
  }
  // Both kinds of text are well represented.
  EXPECT_GT(complete, 400);
  EXPECT_GT(invalid, 400);
}

// ---------------------------------------------------------------------------
// Token masks.

std::vector<uint8_t> brute_force_mask(const std::vector<std::string>& vocab,
                                      const std::vector<int64_t>& eos,
                                      const JsonRecognizer& state) {
  std::vector<uint8_t> mask(vocab.size(), 0);
  for (size_t i = 0; i < vocab.size(); ++i) {
    if (std::find(eos.begin(), eos.end(), static_cast<int64_t>(i)) != eos.end()) {
      mask[i] = state.is_complete();
      continue;
    }
    if (vocab[i].empty()) continue;
    JsonRecognizer copy = state;
    mask[i] = copy.feed(vocab[i]);
  }
  return mask;
}

std::vector<std::string> small_vocab() {
  std::vector<std::string> v;
  v.push_back("");  // EOS (id 0)
  v.push_back("");  // another special token, never allowed
  for (int b = 1; b < 128; ++b) v.push_back(std::string(1, static_cast<char>(b)));
  for (int b : {0x80, 0xA9, 0xBF, 0xC3, 0xE0, 0xED, 0xF0, 0xF4, 0xFF}) {
    v.push_back(std::string(1, static_cast<char>(b)));
  }
  for (const char* t : {"{\"",
                        "\":",
                        "\": ",
                        "\",",
                        "\", \"",
                        "\"}",
                        "}}",
                        "]}",
                        "},",
                        "[{",
                        "[[",
                        "true",
                        "tru",
                        "false",
                        "null",
                        "nul",
                        "e}",
                        "12",
                        "3.5",
                        "e-3",
                        "-0",
                        "00",
                        "\\u",
                        "\\u00",
                        "\\ud83d",
                        "\\ude00",
                        "\\n",
                        "\\\"",
                        "\\\\",
                        "  ",
                        "\n  ",
                        "\n}",
                        " \"",
                        "\"key",
                        "value\"",
                        "hello",
                        " world",
                        "é",
                        "\xC3",
                        "\xA9",
                        "\xF0\x9F",
                        "\x98\x80",
                        "\xF0\x9F\x98\x80",
                        "\xE2\x82\xAC",
                        "ab\"cd",
                        "x\\",
                        "{}",
                        "{\"a\":1}",
                        "1,",
                        ", ",
                        "]",
                        "[]",
                        "\t",
                        "\r\n"}) {
    v.push_back(t);
  }
  return v;
}

TEST(JsonTokenMasker, MatchesBruteForceOnEveryPrefixState) {
  const std::vector<std::string> vocab = small_vocab();
  const std::vector<int64_t> eos = {0};
  JsonTokenMasker masker(vocab, eos);
  EXPECT_EQ(masker.vocab_size(), static_cast<int64_t>(vocab.size()));
  JsonFuzzer fuzz(99);
  std::vector<uint8_t> mask;
  int states = 0;
  for (int doc = 0; doc < 60; ++doc) {
    const std::string text = fuzz.document();
    JsonRecognizer state;
    for (size_t n = 0; n <= text.size(); ++n) {
      masker.fill_mask(state, &mask);
      ASSERT_EQ(mask, brute_force_mask(vocab, eos, state)) << "after " << n << " bytes of " << text;
      ++states;
      if (n < text.size()) {
        ASSERT_TRUE(state.feed(static_cast<uint8_t>(text[n])));
      }
    }
    EXPECT_EQ(mask[0], 1);  // complete: EOS allowed
  }
  EXPECT_GT(states, 3000);
  JsonRecognizer fresh;
  masker.fill_mask(fresh, &mask);
  EXPECT_EQ(mask[0], 0);
  EXPECT_EQ(mask[1], 0);
}

TEST(JsonTokenMasker, MaskedSamplingProducesValidJson) {
  const std::vector<std::string> vocab = small_vocab();
  JsonTokenMasker masker(vocab, {0});
  std::mt19937 rng(5);
  std::vector<uint8_t> mask;
  int finished = 0;
  for (int run = 0; run < 200; ++run) {
    JsonGrammarOptions o;
    o.max_depth = 4;
    o.max_whitespace_run = 3;
    JsonRecognizer state(o);
    std::string text;
    for (int step = 0; step < 400; ++step) {
      masker.fill_mask(state, &mask);
      std::vector<int64_t> allowed;
      for (size_t i = 0; i < mask.size(); ++i) {
        if (mask[i]) allowed.push_back(static_cast<int64_t>(i));
      }
      ASSERT_FALSE(allowed.empty()) << "dead end after: " << text;
      // Prefer closing once the text is long, so that most runs finish.
      int64_t token = allowed[std::uniform_int_distribution<size_t>(0, allowed.size() - 1)(rng)];
      if (step > 40 && mask[0]) token = 0;
      if (token == 0) {
        ASSERT_TRUE(state.is_complete());
        ASSERT_TRUE(masker.accept_token(&state, token));
        break;
      }
      ASSERT_TRUE(masker.accept_token(&state, token));
      text += vocab[static_cast<size_t>(token)];
    }
    // (The reference, not nlohmann: nlohmann refuses numbers beyond the
    // range of double, such as 1E575, which RFC 8259 allows.)
    const Verdict verdict = reference(text, o.max_depth);
    if (state.is_complete()) {
      ++finished;
      ASSERT_EQ(verdict, Verdict::kComplete) << text;
    } else {
      ASSERT_EQ(verdict, Verdict::kIncomplete) << text;
    }
  }
  EXPECT_GT(finished, 10);
}

TEST(JsonTokenMasker, AcceptTokenAndErrors) {
  const std::vector<std::string> vocab = {"", "{", "}", "x", ""};
  EXPECT_THROW(JsonTokenMasker(vocab, {5}), InvalidArgument);
  JsonTokenMasker masker(vocab, {0});
  JsonRecognizer state;
  EXPECT_FALSE(masker.accept_token(&state, 0));  // EOS before the object
  EXPECT_FALSE(masker.accept_token(&state, 3));
  EXPECT_FALSE(masker.accept_token(&state, 4));  // special token
  EXPECT_TRUE(masker.accept_token(&state, 1));
  EXPECT_TRUE(masker.accept_token(&state, 2));
  EXPECT_TRUE(masker.accept_token(&state, 0));
  EXPECT_TRUE(state.is_complete());
  EXPECT_THROW((void)masker.accept_token(&state, 5), InvalidArgument);
  EXPECT_THROW((void)masker.accept_token(&state, -1), InvalidArgument);
  EXPECT_THROW(masker.fill_mask(state, nullptr), InvalidArgument);
}

// A synthetic byte-level vocabulary of `size` tokens shaped like a real one:
// all 256 bytes, words with and without a leading space, numbers, JSON
// punctuation runs, quoted fragments, indentation, and UTF-8 characters
// (some cut in the middle, as byte-level BPE tokens are).
std::vector<std::string> synthetic_vocab(size_t size) {
  std::mt19937 rng(3);
  auto uniform = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  auto word = [&] {
    std::string w;
    for (int n = uniform(2, 9); n > 0; --n) w.push_back(static_cast<char>(uniform('a', 'z')));
    return w;
  };
  std::vector<std::string> v;
  for (int b = 0; b < 256; ++b) v.push_back(std::string(1, static_cast<char>(b)));
  static const char kPunct[] = "{}[],:\" \n.-_/\\()'!?";
  while (v.size() < size) {
    const int kind = uniform(0, 9);
    std::string t;
    if (kind <= 3) {
      t = (uniform(0, 1) ? " " : "") + word();
    } else if (kind == 4) {
      t = word();
      t[0] = static_cast<char>(t[0] - 'a' + 'A');
    } else if (kind == 5) {
      t = std::to_string(uniform(0, 999));
      if (uniform(0, 3) == 0) t += ".";
    } else if (kind == 6) {
      for (int n = uniform(1, 4); n > 0; --n) t.push_back(kPunct[uniform(0, sizeof kPunct - 2)]);
    } else if (kind == 7) {
      static const char* kJson[] = {"\"", "\":", "\": \"", "\",", "\", \"", "\":{", "\":[", "\"}"};
      t = uniform(0, 1) ? kJson[uniform(0, 7)] + word() : word() + kJson[uniform(0, 7)];
    } else if (kind == 8) {
      for (int n = uniform(1, 3); n > 0; --n) {
        const uint32_t cp = static_cast<uint32_t>(uniform(0xA0, 0x2FFF));
        if (cp < 0x800) {
          t.push_back(static_cast<char>(0xC0 | (cp >> 6)));
          t.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
        } else {
          t.push_back(static_cast<char>(0xE0 | (cp >> 12)));
          t.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
          t.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
        }
      }
      if (uniform(0, 2) == 0) t.pop_back();
    } else {
      t = "\n" + std::string(static_cast<size_t>(uniform(0, 8)), ' ');
    }
    v.push_back(t);
  }
  return v;
}

TEST(JsonTokenMasker, FastEnoughForA49kVocabulary) {
  const std::vector<std::string> vocab = synthetic_vocab(49152);
  const int64_t eos = 17;  // any id: it is only ever allowed when complete
  JsonTokenMasker masker(vocab, {eos});
  const std::vector<std::string> prefixes = {"",
                                             "{",
                                             "{\"na",
                                             "{\"name\"",
                                             "{\"name\": ",
                                             "{\"name\": \"Ada Love",
                                             "{\"n\": 12",
                                             "{\"n\": [1, 2",
                                             "{\"s\": \"\\",
                                             "{\"s\": \"\xE2\x82",
                                             "{\"a\": 1}"};
  std::vector<uint8_t> mask;
  double worst_ms = 0;
  double total_ms = 0;
  int calls = 0;
  for (const std::string& prefix : prefixes) {
    JsonRecognizer state;
    ASSERT_TRUE(state.feed(prefix)) << prefix;
    masker.fill_mask(state, &mask);
    ASSERT_EQ(mask, brute_force_mask(vocab, {eos}, state)) << prefix;
    int64_t allowed = 0;
    for (uint8_t m : mask) allowed += m;
    double best_ms = 1e9;
    for (int rep = 0; rep < 10; ++rep) {
      const auto t0 = std::chrono::steady_clock::now();
      masker.fill_mask(state, &mask);
      const double ms =
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      best_ms = std::min(best_ms, ms);
      total_ms += ms;
      ++calls;
    }
    worst_ms = std::max(worst_ms, best_ms);
    std::string shown;
    for (unsigned char c : prefix) {
      char buf[8];
      std::snprintf(buf, sizeof buf, c >= 0x20 && c < 0x7F ? "%c" : "\\x%02X", c);
      shown += buf;
    }
    std::printf("  mask after %-26s %6lld allowed  %.3f ms\n", ("'" + shown + "'").c_str(),
                static_cast<long long>(allowed), best_ms);
  }
  std::printf("49152-token vocabulary: mean %.3f ms per mask, slowest state %.3f ms\n",
              total_ms / calls, worst_ms);
#ifdef NDEBUG
  // Optimised builds only; a loose bound so that a loaded machine passes.
  EXPECT_LT(worst_ms, 25.0);
#endif
}

}  // namespace
}  // namespace tessera::serve
