#include "tessera/serve/json_grammar.h"

#include <algorithm>
#include <numeric>
#include <utility>

#include "tessera/core/error.h"

namespace tessera::serve {

namespace {

constexpr const char* kLiterals[3] = {"true", "false", "null"};
constexpr uint8_t kLiteralLengths[3] = {4, 5, 4};

bool is_whitespace(uint8_t b) { return b == ' ' || b == '\t' || b == '\n' || b == '\r'; }
bool is_digit(uint8_t b) { return b >= '0' && b <= '9'; }

int hex_value(uint8_t b) {
  if (b >= '0' && b <= '9') return b - '0';
  if (b >= 'a' && b <= 'f') return b - 'a' + 10;
  if (b >= 'A' && b <= 'F') return b - 'A' + 10;
  return -1;
}

// Bytes that leave a string state unchanged: printable ASCII except the
// quote and the backslash (DEL is allowed unescaped by RFC 8259).
bool is_plain_string_byte(uint8_t b) { return b >= 0x20 && b < 0x80 && b != '"' && b != '\\'; }

}  // namespace

JsonRecognizer::JsonRecognizer(const JsonGrammarOptions& options) {
  TESSERA_CHECK(options.max_depth >= 1 && options.max_depth <= kMaxSupportedDepth, InvalidArgument,
                "JsonGrammarOptions.max_depth must be in [1, ", kMaxSupportedDepth, "], got ",
                options.max_depth);
  TESSERA_CHECK(options.max_whitespace_run >= 0 && options.max_whitespace_run <= 65535,
                InvalidArgument,
                "JsonGrammarOptions.max_whitespace_run must be in [0, 65535], got ",
                options.max_whitespace_run);
  max_depth_ = static_cast<uint16_t>(options.max_depth);
  max_whitespace_run_ = static_cast<uint16_t>(options.max_whitespace_run);
}

bool JsonRecognizer::feed(uint8_t byte) {
  JsonRecognizer next = *this;
  if (!next.step(byte)) return false;
  *this = next;
  return true;
}

bool JsonRecognizer::feed(std::string_view bytes) {
  JsonRecognizer next = *this;
  for (char c : bytes) {
    if (!next.step(static_cast<uint8_t>(c))) return false;
  }
  *this = next;
  return true;
}

bool JsonRecognizer::top_is_array() const {
  const int bit = depth_ - 1;
  return (kinds_[bit / 64] >> (bit % 64)) & 1;
}

bool JsonRecognizer::push(bool is_array) {
  if (depth_ >= max_depth_) return false;
  const int bit = depth_;
  if (is_array) {
    kinds_[bit / 64] |= uint64_t{1} << (bit % 64);
  } else {
    kinds_[bit / 64] &= ~(uint64_t{1} << (bit % 64));
  }
  ++depth_;
  mode_ = is_array ? Mode::kArrayFirst : Mode::kObjectFirst;
  return true;
}

// A value inside a container (or the top-level object) has ended.
void JsonRecognizer::close_value() { mode_ = depth_ == 0 ? Mode::kDone : Mode::kAfterValue; }

bool JsonRecognizer::whitespace() {
  if (max_whitespace_run_ != 0 && whitespace_run_ >= max_whitespace_run_) return false;
  ++whitespace_run_;
  return true;
}

bool JsonRecognizer::value_start(uint8_t b) {
  switch (b) {
    case '{':
      return push(false);
    case '[':
      return push(true);
    case '"':
      mode_ = Mode::kString;
      in_key_ = false;
      pending_ = 0;
      return true;
    case '-':
      mode_ = Mode::kNumberMinus;
      return true;
    case '0':
      mode_ = Mode::kNumberZero;
      return true;
    case 't':
    case 'f':
    case 'n':
      mode_ = Mode::kLiteral;
      literal_ = b == 't' ? 0 : b == 'f' ? 1 : 2;
      pending_ = 1;
      return true;
    default:
      if (b >= '1' && b <= '9') {
        mode_ = Mode::kNumberInt;
        return true;
      }
      return false;
  }
}

bool JsonRecognizer::after_value(uint8_t b) {
  if (is_whitespace(b)) return whitespace();
  const bool array = top_is_array();
  if (b == ',') {
    mode_ = array ? Mode::kValue : Mode::kObjectKey;
    return true;
  }
  if ((b == ']' && array) || (b == '}' && !array)) {
    --depth_;
    close_value();
    return true;
  }
  return false;
}

bool JsonRecognizer::step(uint8_t b) {
  if (!is_whitespace(b)) whitespace_run_ = 0;
  switch (mode_) {
    case Mode::kStart:
      if (is_whitespace(b)) return whitespace();
      return b == '{' && push(false);
    case Mode::kDone:
      return is_whitespace(b) && whitespace();
    case Mode::kObjectFirst:
    case Mode::kObjectKey:
      if (is_whitespace(b)) return whitespace();
      if (b == '"') {
        mode_ = Mode::kString;
        in_key_ = true;
        pending_ = 0;
        return true;
      }
      if (b == '}' && mode_ == Mode::kObjectFirst) {
        --depth_;
        close_value();
        return true;
      }
      return false;
    case Mode::kColon:
      if (is_whitespace(b)) return whitespace();
      if (b != ':') return false;
      mode_ = Mode::kValue;
      return true;
    case Mode::kValue:
      if (is_whitespace(b)) return whitespace();
      return value_start(b);
    case Mode::kArrayFirst:
      if (is_whitespace(b)) return whitespace();
      if (b == ']') {
        --depth_;
        close_value();
        return true;
      }
      return value_start(b);
    case Mode::kAfterValue:
      return after_value(b);

    case Mode::kString:
      if (pending_ > 0) {
        if (b < utf8_lo_ || b > utf8_hi_) return false;
        --pending_;
        utf8_lo_ = 0x80;
        utf8_hi_ = 0xBF;
        return true;
      }
      if (b == '"') {
        if (in_key_) {
          mode_ = Mode::kColon;
        } else {
          close_value();
        }
        return true;
      }
      if (b == '\\') {
        mode_ = Mode::kEscape;
        return true;
      }
      if (b < 0x20) return false;  // control characters must be escaped
      if (b < 0x80) return true;
      // The first byte of a multi-byte UTF-8 sequence fixes its length and,
      // for E0/ED/F0/F4, the range of the next byte (no overlong forms, no
      // surrogates, nothing above U+10FFFF).
      utf8_lo_ = 0x80;
      utf8_hi_ = 0xBF;
      if (b >= 0xC2 && b <= 0xDF) {
        pending_ = 1;
      } else if (b >= 0xE0 && b <= 0xEF) {
        pending_ = 2;
        if (b == 0xE0) utf8_lo_ = 0xA0;
        if (b == 0xED) utf8_hi_ = 0x9F;
      } else if (b >= 0xF0 && b <= 0xF4) {
        pending_ = 3;
        if (b == 0xF0) utf8_lo_ = 0x90;
        if (b == 0xF4) utf8_hi_ = 0x8F;
      } else {
        return false;
      }
      return true;
    case Mode::kEscape:
      switch (b) {
        case '"':
        case '\\':
        case '/':
        case 'b':
        case 'f':
        case 'n':
        case 'r':
        case 't':
          mode_ = Mode::kString;
          return true;
        case 'u':
          mode_ = Mode::kUnicode;
          pending_ = 0;
          hex_ = 0;
          return true;
        default:
          return false;
      }
    case Mode::kUnicode: {
      const int v = hex_value(b);
      if (v < 0) return false;
      // The first two digits decide whether the code unit is a surrogate:
      // D8-DB high (a low one must follow), DC-DF low (only right after a
      // high one).
      if (low_surrogate_) {
        if (pending_ == 0 && v != 0xD) return false;
        if (pending_ == 1 && v < 0xC) return false;
      } else if (pending_ == 1 && hex_ == 0xD && v >= 0xC) {
        return false;  // a lone low surrogate
      }
      hex_ = static_cast<uint16_t>(hex_ * 16 + v);
      if (++pending_ < 4) return true;
      pending_ = 0;
      if (low_surrogate_) {
        low_surrogate_ = false;
        mode_ = Mode::kString;
      } else if (hex_ >= 0xD800 && hex_ <= 0xDBFF) {
        mode_ = Mode::kLowSurrogateBackslash;
      } else {
        mode_ = Mode::kString;
      }
      return true;
    }
    case Mode::kLowSurrogateBackslash:
      if (b != '\\') return false;
      mode_ = Mode::kLowSurrogateU;
      return true;
    case Mode::kLowSurrogateU:
      if (b != 'u') return false;
      mode_ = Mode::kUnicode;
      low_surrogate_ = true;
      pending_ = 0;
      hex_ = 0;
      return true;

    case Mode::kLiteral:
      if (b != static_cast<uint8_t>(kLiterals[literal_][pending_])) return false;
      if (++pending_ == kLiteralLengths[literal_]) {
        pending_ = 0;
        close_value();
      }
      return true;

    case Mode::kNumberMinus:
      if (b == '0') {
        mode_ = Mode::kNumberZero;
        return true;
      }
      if (b >= '1' && b <= '9') {
        mode_ = Mode::kNumberInt;
        return true;
      }
      return false;
    case Mode::kNumberZero:
    case Mode::kNumberInt:
    case Mode::kNumberFrac:
    case Mode::kNumberExpDigits:
      if (is_digit(b) && mode_ != Mode::kNumberZero) return true;
      if (b == '.' && (mode_ == Mode::kNumberZero || mode_ == Mode::kNumberInt)) {
        mode_ = Mode::kNumberDot;
        return true;
      }
      if ((b == 'e' || b == 'E') && mode_ != Mode::kNumberExpDigits) {
        mode_ = Mode::kNumberExp;
        return true;
      }
      // Any other byte ends the number (numbers only occur inside
      // containers, so a delimiter always follows).
      mode_ = Mode::kAfterValue;
      return after_value(b);
    case Mode::kNumberDot:
      if (!is_digit(b)) return false;
      mode_ = Mode::kNumberFrac;
      return true;
    case Mode::kNumberExp:
      if (b == '+' || b == '-') {
        mode_ = Mode::kNumberExpSign;
        return true;
      }
      if (!is_digit(b)) return false;
      mode_ = Mode::kNumberExpDigits;
      return true;
    case Mode::kNumberExpSign:
      if (!is_digit(b)) return false;
      mode_ = Mode::kNumberExpDigits;
      return true;
  }
  return false;
}

JsonTokenMasker::JsonTokenMasker(const std::vector<std::string>& vocab,
                                 std::vector<int64_t> eos_token_ids)
    : vocab_size_(static_cast<int64_t>(vocab.size())),
      vocab_(vocab),
      eos_(std::move(eos_token_ids)) {
  TESSERA_CHECK(vocab.size() < static_cast<size_t>(INT32_MAX), InvalidArgument,
                "JsonTokenMasker: a vocabulary of ", vocab.size(), " tokens is too large");
  is_eos_.assign(vocab.size(), 0);
  for (int64_t id : eos_) {
    TESSERA_CHECK(id >= 0 && id < vocab_size_, InvalidArgument, "JsonTokenMasker: EOS token id ",
                  id, " is outside the vocabulary of ", vocab_size_, " tokens");
    is_eos_[static_cast<size_t>(id)] = 1;
  }
  std::vector<int32_t> sorted;
  sorted.reserve(vocab.size());
  for (size_t i = 0; i < vocab.size(); ++i) {
    if (!vocab[i].empty() && !is_eos_[i]) sorted.push_back(static_cast<int32_t>(i));
  }
  std::sort(sorted.begin(), sorted.end(), [&](int32_t a, int32_t b) {
    return vocab[a] < vocab[b] || (vocab[a] == vocab[b] && a < b);
  });
  nodes_.emplace_back();
  node_tokens_.reserve(sorted.size());
  build(0, sorted, vocab, 0, sorted.size(), 0);
}

void JsonTokenMasker::build(uint32_t node, const std::vector<int32_t>& sorted,
                            const std::vector<std::string>& vocab, size_t lo, size_t hi,
                            size_t depth) {
  // sorted[lo, hi) share their first `depth` bytes; the ones that end here
  // sort first.
  nodes_[node].tokens_begin = static_cast<uint32_t>(node_tokens_.size());
  while (lo < hi && vocab[sorted[lo]].size() == depth) node_tokens_.push_back(sorted[lo++]);
  nodes_[node].tokens_end = static_cast<uint32_t>(node_tokens_.size());
  std::vector<std::pair<size_t, size_t>> groups;
  for (size_t i = lo; i < hi;) {
    const char byte = vocab[sorted[i]][depth];
    size_t j = i + 1;
    while (j < hi && vocab[sorted[j]][depth] == byte) ++j;
    groups.emplace_back(i, j);
    i = j;
  }
  const uint32_t first = static_cast<uint32_t>(nodes_.size());
  nodes_[node].first_child = first;
  nodes_[node].num_children = static_cast<uint32_t>(groups.size());
  nodes_.resize(nodes_.size() + groups.size());
  bool plain = true;
  for (size_t g = 0; g < groups.size(); ++g) {
    const uint32_t child = first + static_cast<uint32_t>(g);
    nodes_[child].byte = static_cast<uint8_t>(vocab[sorted[groups[g].first]][depth]);
    build(child, sorted, vocab, groups[g].first, groups[g].second, depth + 1);
    plain = plain && is_plain_string_byte(nodes_[child].byte) && nodes_[child].plain_below;
  }
  nodes_[node].plain_below = plain;
  nodes_[node].subtree_end = static_cast<uint32_t>(node_tokens_.size());
}

void JsonTokenMasker::fill_mask(const JsonRecognizer& state, std::vector<uint8_t>* mask) const {
  TESSERA_CHECK(mask != nullptr, InvalidArgument, "JsonTokenMasker::fill_mask: mask is null");
  mask->assign(static_cast<size_t>(vocab_size_), 0);
  uint8_t* out = mask->data();
  const int32_t* tokens = node_tokens_.data();
  const bool complete = state.is_complete();
  for (int64_t id : eos_) out[id] = complete ? 1 : 0;

  // Depth-first over the trie; each entry is a node whose prefix the state
  // accepted, with the state after it.
  struct Entry {
    uint32_t node;
    JsonRecognizer state;
  };
  std::vector<Entry> stack;
  stack.reserve(256);
  stack.push_back({0, state});
  while (!stack.empty()) {
    const Entry entry = stack.back();
    stack.pop_back();
    const Node& parent = nodes_[entry.node];
    for (uint32_t c = parent.first_child; c < parent.first_child + parent.num_children; ++c) {
      const Node& child = nodes_[c];
      JsonRecognizer next = entry.state;
      if (!next.step(child.byte)) continue;
      if (child.plain_below && next.in_plain_string()) {
        // Inside a string, plain bytes change nothing: the whole subtree is
        // allowed without walking it.
        for (uint32_t t = child.tokens_begin; t < child.subtree_end; ++t) out[tokens[t]] = 1;
        continue;
      }
      for (uint32_t t = child.tokens_begin; t < child.tokens_end; ++t) out[tokens[t]] = 1;
      if (child.num_children > 0) stack.push_back({c, next});
    }
  }
}

bool JsonTokenMasker::accept_token(JsonRecognizer* state, int64_t token) const {
  TESSERA_CHECK(state != nullptr, InvalidArgument, "JsonTokenMasker::accept_token: state is null");
  TESSERA_CHECK(token >= 0 && token < vocab_size_, InvalidArgument,
                "JsonTokenMasker::accept_token: token ", token, " is outside the vocabulary of ",
                vocab_size_, " tokens");
  if (is_eos_[static_cast<size_t>(token)]) return state->is_complete();
  const std::string& bytes = vocab_[static_cast<size_t>(token)];
  if (bytes.empty()) return false;
  return state->feed(bytes);
}

}  // namespace tessera::serve
