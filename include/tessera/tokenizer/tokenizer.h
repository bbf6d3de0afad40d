// tessera/tokenizer/tokenizer.h — byte-level BPE tokenizer (GPT-2, Llama 3, Qwen2/3,
// SmolLM2 and the other models whose vocabularies are byte-level BPE).
//
// A Tokenizer turns UTF-8 text into token ids and back. Encoding runs, in order:
//   1. added tokens: "<|im_start|>" and the like are cut out of the text first,
//      longest match first, and become their ids directly;
//   2. normalization (NFC for Qwen2/3; none for GPT-2 and Llama 3);
//   3. pre-tokenization: a regex family splits the rest into words (see
//      PreTokenizerKind); the splits are exactly those of the reference
//      implementations (Hugging Face `tokenizers`, tiktoken);
//   4. byte-level BPE on each word: the word's bytes become the 256 base
//      symbols of GPT-2's byte-to-unicode map and merge by rank.
// decode() inverts this byte for byte, so decode(encode(t)) == normalize(t)
// for every byte string t, valid UTF-8 or not.
//
// Example:
//   auto tok = tessera::nn::Tokenizer::from_tokenizer_json("qwen3/tokenizer.json");
//   std::vector<int32_t> ids = tok.encode("<|im_start|>user\nHi!<|im_end|>");
//   std::string text = tok.decode(ids);               // the same text back
//   int32_t im_end = tok.token_to_id("<|im_end|>");  // 151645
//
// Thread safety: a Tokenizer is immutable after construction; all const
// methods may be called from any number of threads at once. Copies are cheap
// and share the vocabulary.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace tessera::nn {

// A token matched verbatim in the input before normalization and BPE, and
// emitted verbatim by decode(): chat markers, <|endoftext|>, tool tags.
struct AddedToken {
  // The raw UTF-8 text matched in the input and produced by decode(). Not in
  // byte-to-unicode form. Must not be empty.
  std::string content;
  int32_t id = -1;
  // Control token (GGUF token type CONTROL, Hugging Face special=true):
  // matched only when encode() is asked to parse_special, and dropped by
  // decode(skip_special=true). Non-special added tokens (GGUF USER_DEFINED,
  // e.g. Qwen3's "<think>") are always matched and always decoded.
  bool special = true;
  // When matched, also swallow the white space to the left / right of the
  // token (Hugging Face lstrip / rstrip).
  bool lstrip = false;
  bool rstrip = false;
};

// The pre-tokenizer regex families. Each is a hand-written matcher equal to
// the regex of the reference implementation, with Unicode 16.0 classes:
//   kGpt2   GPT-2 (tiktoken r50k_base/p50k_base, Hugging Face ByteLevel with
//           use_regex=true): 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+|
//           ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//   kLlama3 Llama 3 (tiktoken cl100k_base family): (?i:'s|'t|'re|'ve|'m|'ll|'d)|
//           [^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|
//           \s*[\r\n]+|\s+(?!\S)|\s+
//   kQwen2  Qwen2, Qwen2.5, Qwen3: kLlama3 with \p{N} one digit at a time.
//   kSmolLM SmolLM/SmolLM2, StarCoder: every \p{N} is a word of its own
//           (Hugging Face Digits(individual_digits=true)), then kGpt2 on what
//           lies between the digits.
//   kNone   no split: each run of text between added tokens is one word.
// (?i:...) folds case as the engines do, so "'ſ" (long s) also counts as 's.
enum class PreTokenizerKind { kGpt2, kLlama3, kQwen2, kSmolLM, kNone };

// Lower-case name of a kind ("gpt2", "llama3", "qwen2", "smollm", "none").
const char* pre_tokenizer_name(PreTokenizerKind kind);

// Splits `text` into the words BPE sees, without added-token matching or
// normalization. The views point into `text`, cover it in order without gaps,
// and are never empty. Bytes that are not valid UTF-8 count as [^\s\p{L}\p{N}].
std::vector<std::string_view> pre_tokenize(std::string_view text, PreTokenizerKind kind);

enum class NormalizerKind {
  kNone,  // text is used as is (GPT-2, Llama 3, every GGUF file: llama.cpp
          // applies no normalizer)
  kNfc,   // Unicode NFC before pre-tokenization (Qwen2/3's tokenizer.json)
};

// Everything needed to build a Tokenizer; GGUF metadata or a tokenizer file
// fills it. Checked by Tokenizer::from_spec.
struct TokenizerSpec {
  // id -> token, in GPT-2's byte-to-unicode form ("Ġthe" for " the"). Ids of
  // added tokens may also appear here (as in GGUF files); their entry is then
  // ignored in favour of AddedToken::content.
  std::vector<std::string> vocab;
  // BPE merges, highest priority first. Both halves and their concatenation
  // must be in `vocab`. A pair listed twice keeps its first (best) rank, as
  // in llama.cpp (Hugging Face keeps the last; trained files have no repeats).
  std::vector<std::pair<std::string, std::string>> merges;
  // Added tokens. Ids may lie inside `vocab` or extend it; together they must
  // cover 0..N-1 without holes.
  std::vector<AddedToken> added;
  PreTokenizerKind pre = PreTokenizerKind::kGpt2;
  NormalizerKind normalizer = NormalizerKind::kNone;
  // A word that is itself in the vocabulary becomes that token without
  // merging (Hugging Face BPE ignore_merges, llama.cpp's Llama 3 vocab).
  bool ignore_merges = false;
  std::optional<int32_t> bos_id, eos_id, pad_id;
  // Emitted for a byte whose base symbol is missing from the vocabulary.
  // Without it such a byte makes encode() throw.
  std::optional<int32_t> unk_id;
};

class Tokenizer {
 public:
  // Builds a tokenizer from a spec. Throws InvalidArgument naming the
  // offending entry for: an empty vocabulary, a merge whose halves or result
  // are not in the vocabulary, an added token with an empty content or an id
  // that is negative or leaves a hole, and bos/eos/pad/unk ids out of range.
  [[nodiscard]] static Tokenizer from_spec(TokenizerSpec spec);

  // Loads a Hugging Face tokenizer.json whose model is byte-level BPE.
  // Supported: normalizer null or NFC; pre_tokenizer ByteLevel(use_regex),
  // Split(one of the regexes of PreTokenizerKind, Isolated) + ByteLevel, or
  // Digits(individual_digits) + ByteLevel; decoder ByteLevel or null; merges
  // as "a b" strings or [a, b] pairs; added_tokens with lstrip/rstrip.
  // Anything else (other normalizers or regexes, add_prefix_space, byte
  // fallback, dropout, subword prefixes, single_word) throws InvalidArgument
  // naming it rather than tokenizing differently from the reference. When a
  // tokenizer_config.json sits in the same directory, its bos_token,
  // eos_token and pad_token set the corresponding ids (InvalidArgument when
  // one names no token). Added tokens are matched in the raw text, also
  // those marked normalized=true; the two differ only for text that NFC changes.
  // Throws NotFound when the file cannot be opened and InvalidArgument with
  // line and column for malformed JSON.
  [[nodiscard]] static Tokenizer from_tokenizer_json(const std::string& path);

  // Loads OpenAI's original GPT-2 files: encoder.json (token -> id) and
  // vocab.bpe (a "#version" line, then one "a b" merge per line). Uses the
  // GPT-2 pre-tokenizer; "<|endoftext|>", when present, becomes a special
  // added token and the BOS and EOS id.
  // A byte-level tokenizer without merges: ids 0..255 are the bytes, then
  // `specials` as special added tokens (256, 257, ...). The first special,
  // if any, is BOS and EOS. For small models trained from scratch.
  [[nodiscard]] static Tokenizer bytes(const std::vector<std::string>& specials = {});
  [[nodiscard]] static Tokenizer from_gpt2_files(const std::string& encoder_json,
                                                 const std::string& vocab_bpe);

  // Maps a GGUF "tokenizer.ggml.pre" value to its regex family, following
  // llama.cpp's table for the families above ("gpt-2", "llama-bpe", "qwen2",
  // "smollm", "starcoder", ...). "default" (and an empty name) mean kGpt2:
  // llama.cpp's own fallback for them is a different, lossy split it warns
  // about. Throws InvalidArgument for any name outside these families.
  static PreTokenizerKind pre_tokenizer_from_gguf_name(const std::string& name);

  // Token ids of `text`. With parse_special false, special added tokens in
  // the text are encoded as ordinary text; non-special ones still match.
  // Adds no BOS/EOS; callers prepend bos_id() where the model wants it.
  // Throws InvalidArgument only when a byte has no base token and no unk_id.
  [[nodiscard]] std::vector<int32_t> encode(std::string_view text, bool parse_special = true) const;

  // The bytes of the tokens, concatenated: the exact inverse of encode() up to
  // normalization, invalid UTF-8 included (a token may end mid-character).
  // skip_special drops special added tokens. Throws InvalidArgument for an
  // id outside [0, vocab_size()).
  [[nodiscard]] std::string decode(const std::vector<int32_t>& ids,
                                   bool skip_special = false) const;

  // The text the pre-tokenizer sees for `text` (no added-token matching):
  // NFC for an NFC tokenizer, `text` itself otherwise.
  [[nodiscard]] std::string normalize(std::string_view text) const;

  // The id of a token given in vocabulary form ("Ġthe") or, for added
  // tokens, by its content ("<|im_end|>"). Throws NotFound.
  [[nodiscard]] int32_t token_to_id(std::string_view token) const;
  // The vocabulary form of a token, or an added token's content. The
  // reference lives as long as any copy of this Tokenizer. Throws
  // InvalidArgument for an id outside [0, vocab_size()).
  [[nodiscard]] const std::string& id_to_token(int32_t id) const;

  // Number of ids, added tokens included (151669 for Qwen3, 50257 for GPT-2);
  // a model's embedding table may be larger.
  int64_t vocab_size() const;
  std::optional<int32_t> bos_id() const;
  std::optional<int32_t> eos_id() const;
  std::optional<int32_t> pad_id() const;
  // True for special added tokens. Throws InvalidArgument when out of range.
  bool is_special(int32_t id) const;
  PreTokenizerKind pre_tokenizer() const;
  NormalizerKind normalizer() const;
  // The added tokens, in id order.
  const std::vector<AddedToken>& added_tokens() const;

 private:
  struct Impl;
  explicit Tokenizer(std::shared_ptr<const Impl> impl);
  std::shared_ptr<const Impl> impl_;
};

}  // namespace tessera::nn
