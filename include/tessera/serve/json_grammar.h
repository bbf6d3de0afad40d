// tessera/serve/json_grammar.h — constrained decoding for JSON object output.
//
// OpenAI's `response_format: {"type": "json_object"}` promises that the
// generated text is one JSON object. The engine enforces it token by token:
// before sampling, it masks out every token whose bytes would make the text
// stop being a prefix of a JSON object, and allows EOS only once the object
// is complete.
//
//   tessera::serve::JsonTokenMasker masker(vocab_bytes, /*eos_token_ids=*/{eos});
//   tessera::serve::JsonRecognizer state;            // one per sequence
//   std::vector<uint8_t> mask;
//   while (true) {
//     masker.fill_mask(state, &mask);                // 1: allowed
//     int64_t token = sample(logits, mask);          // masked tokens get -inf
//     if (token == eos) break;                       // only allowed when complete
//     bool ok = masker.accept_token(&state, token);  // true for any allowed token
//   }
//
// JsonRecognizer reads RFC 8259 JSON byte by byte: objects, arrays, strings
// (escapes, \uXXXX with surrogate pairs checked, strict UTF-8: no overlong
// forms, no encoded surrogates, nothing above U+10FFFF), numbers, true,
// false, null, whitespace. The top-level value must be an object; whitespace
// may precede and follow it. A prefix is accepted exactly when some
// continuation makes it a complete document. Nesting is bounded (the
// top-level object is depth 1), and runs of whitespace outside strings may be
// bounded too, so a model cannot loop on newlines forever.
//
// Thread-safety: JsonRecognizer is a small value type (copying it is the way
// to branch); not thread-safe. JsonTokenMasker is immutable after
// construction; its const methods may run concurrently.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace tessera::serve {

struct JsonGrammarOptions {
  // Deepest nesting of objects and arrays, the top-level object being depth
  // 1; in [1, JsonRecognizer::kMaxSupportedDepth].
  int max_depth = 32;
  // Longest run of consecutive whitespace bytes outside strings; 0: no bound.
  // A small bound (e.g. 8) keeps a model from emitting endless newlines while
  // still allowing pretty-printing.
  int max_whitespace_run = 0;
};

class JsonRecognizer {
 public:
  static constexpr int kMaxSupportedDepth = 128;

  // InvalidArgument: max_depth outside [1, kMaxSupportedDepth],
  // max_whitespace_run negative or above 65535.
  explicit JsonRecognizer(const JsonGrammarOptions& options = {});

  // Reads one byte. True: the text read so far is still a prefix of a valid
  // document, and the state has advanced. False: it is not; the state is
  // unchanged (the byte is as if never given).
  [[nodiscard]] bool feed(uint8_t byte);
  // Reads `bytes` in order; all or nothing: on false the state is unchanged.
  [[nodiscard]] bool feed(std::string_view bytes);

  // True when the text read is a complete document (the top-level object has
  // closed; only whitespace may follow).
  bool is_complete() const { return mode_ == Mode::kDone; }
  // Open objects and arrays.
  int depth() const { return depth_; }
  // True inside a string with no escape or UTF-8 sequence pending: printable
  // ASCII other than '"' and '\\' leaves the state as it is.
  bool in_plain_string() const { return mode_ == Mode::kString && pending_ == 0; }

 private:
  friend class JsonTokenMasker;  // steps copies directly on its hot path

  enum class Mode : uint8_t {
    kStart,                  // before the top-level '{'
    kObjectFirst,            // after '{': a key or '}'
    kObjectKey,              // after ',' in an object: a key
    kColon,                  // after a key
    kValue,                  // after ':' or after ',' in an array: a value
    kArrayFirst,             // after '[': a value or ']'
    kAfterValue,             // after a value inside a container: ',' or the closer
    kDone,                   // the top-level object has closed
    kString,                 // inside a string; pending_ continuation bytes owed
    kEscape,                 // after '\'
    kUnicode,                // inside \uXXXX; pending_ hex digits read
    kLowSurrogateBackslash,  // after a high-surrogate escape: '\' must follow
    kLowSurrogateU,          // then 'u'
    kLiteral,                // inside true/false/null; literal_, pending_ = next index
    kNumberMinus,            // '-'
    kNumberZero,             // a leading 0
    kNumberInt,              // integer digits
    kNumberDot,              // '.', a digit must follow
    kNumberFrac,             // fraction digits
    kNumberExp,              // 'e' or 'E'
    kNumberExpSign,
    kNumberExpDigits,
  };

  // Reads one byte; on false the state is garbage (feed() works on a copy).
  bool step(uint8_t byte);
  bool value_start(uint8_t byte);
  bool after_value(uint8_t byte);
  bool whitespace();
  bool push(bool is_array);
  void close_value();
  bool top_is_array() const;

  uint64_t kinds_[kMaxSupportedDepth / 64] = {};  // bit d-1: depth d is an array
  uint16_t depth_ = 0;
  uint16_t max_depth_ = 0;
  uint16_t whitespace_run_ = 0;
  uint16_t max_whitespace_run_ = 0;
  uint16_t hex_ = 0;  // \u digits read so far, as a number
  Mode mode_ = Mode::kStart;
  uint8_t pending_ = 0;     // UTF-8 bytes owed / hex digits read / literal index
  uint8_t utf8_lo_ = 0x80;  // allowed range of the next continuation byte
  uint8_t utf8_hi_ = 0xBF;
  uint8_t literal_ = 0;  // 0 true, 1 false, 2 null
  bool in_key_ = false;
  bool low_surrogate_ = false;  // the \u being read must be a low surrogate
};

class JsonTokenMasker {
 public:
  // vocab[i]: the bytes token i decodes to (byte-level BPE tokens may hold
  // partial UTF-8). Tokens with no bytes (special tokens) are never allowed,
  // except those in eos_token_ids, which are allowed exactly when the text is
  // complete. InvalidArgument: an EOS id outside the vocabulary.
  JsonTokenMasker(const std::vector<std::string>& vocab, std::vector<int64_t> eos_token_ids);

  int64_t vocab_size() const { return vocab_size_; }

  // Resizes *mask to vocab_size() and sets mask[i] = 1 exactly when token i is
  // allowed after `state`: its bytes keep the text a valid prefix (or, for
  // EOS, the text is complete). Walks a trie of the vocabulary with the
  // recogniser, so tokens sharing a prefix share the work.
  void fill_mask(const JsonRecognizer& state, std::vector<uint8_t>* mask) const;

  // Advances *state over token's bytes. False, state unchanged, if the token
  // is not allowed. For an EOS token: returns is_complete(), state unchanged.
  // InvalidArgument: token outside the vocabulary.
  [[nodiscard]] bool accept_token(JsonRecognizer* state, int64_t token) const;

 private:
  struct Node {
    uint32_t first_child = 0;
    uint32_t num_children = 0;
    uint32_t tokens_begin = 0;  // tokens ending at this node: node_tokens_[begin, end)
    uint32_t tokens_end = 0;
    uint32_t subtree_end = 0;  // tokens of the whole subtree: node_tokens_[begin, subtree_end)
    uint8_t byte = 0;          // the edge byte leading here
    // Every byte below this node is printable ASCII other than '"' and '\'.
    bool plain_below = true;
  };
  void build(uint32_t node, const std::vector<int32_t>& sorted,
             const std::vector<std::string>& vocab, size_t lo, size_t hi, size_t depth);

  int64_t vocab_size_ = 0;
  std::vector<std::string> vocab_;
  std::vector<int64_t> eos_;
  std::vector<uint8_t> is_eos_;
  std::vector<Node> nodes_;           // nodes_[0] is the root (empty prefix)
  std::vector<int32_t> node_tokens_;  // token ids in trie preorder
};

}  // namespace tessera::serve
