// Fuzz target: text through the byte-level BPE tokenizers (tessera/tokenizer/tokenizer.h).
//
// Input: one selector byte, then the text (any bytes, valid UTF-8 or not).
// The selector picks the tokenizer (Qwen3's tokenizer.json and GPT-2's
// original files from ../shared/testdata when present, a byte-level
// tokenizer with special tokens always) and whether special tokens are
// parsed. Checked for every input:
//   - pre_tokenize() of every PreTokenizerKind covers the text in order,
//     without gaps or empty words;
//   - every id encode() returns is inside the vocabulary;
//   - decode(encode(text)) gives the text back: exactly for tokenizers
//     without a normalizer, up to NFC for NFC ones (added tokens are cut out
//     of the raw text before the rest is normalized, so only
//     normalize(decode(encode(t))) == normalize(t) holds there).
#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "fuzz_common.h"
#include "tessera/tokenizer/tokenizer.h"

namespace {

using tessera::nn::Tokenizer;

std::vector<Tokenizer>& tokenizers() {
  static std::vector<Tokenizer> all = [] {
    std::vector<Tokenizer> t;
    t.push_back(Tokenizer::bytes({"<|endoftext|>", "<|im_start|>", "<|im_end|>"}));
    const std::string testdata = tessera::fuzz::source_dir() + "/../shared/testdata/tokenizers";
    if (std::filesystem::exists(testdata + "/gpt2/encoder.json")) {
      t.push_back(Tokenizer::from_gpt2_files(testdata + "/gpt2/encoder.json",
                                             testdata + "/gpt2/vocab.bpe"));
    }
    if (std::filesystem::exists(testdata + "/qwen3/tokenizer.json")) {
      t.push_back(Tokenizer::from_tokenizer_json(testdata + "/qwen3/tokenizer.json"));
    }
    return t;
  }();
  return all;
}

void check_pre_tokenize(std::string_view text, tessera::nn::PreTokenizerKind kind) {
  const auto words = tessera::nn::pre_tokenize(text, kind);
  size_t pos = 0;
  for (std::string_view w : words) {
    tessera::fuzz::require(!w.empty(), "pre_tokenize returned an empty word");
    tessera::fuzz::require(w.data() == text.data() + pos,
                           std::string("pre_tokenize (") + tessera::nn::pre_tokenizer_name(kind) +
                               ") left a gap or went back at byte " + std::to_string(pos));
    pos += w.size();
  }
  tessera::fuzz::require(pos == text.size(), "pre_tokenize did not cover the text");
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  tokenizers();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const auto& all = tokenizers();
  const Tokenizer& tok = all[(data[0] >> 1) % all.size()];
  const bool parse_special = data[0] & 1;
  const std::string text = tessera::fuzz::as_string(data + 1, size - 1);

  for (auto kind : {tessera::nn::PreTokenizerKind::kGpt2, tessera::nn::PreTokenizerKind::kLlama3,
                    tessera::nn::PreTokenizerKind::kQwen2, tessera::nn::PreTokenizerKind::kSmolLM,
                    tessera::nn::PreTokenizerKind::kNone}) {
    check_pre_tokenize(text, kind);
  }
  tessera::fuzz::expect_errors("Tokenizer::encode/decode", [&] {
    const std::vector<int32_t> ids = tok.encode(text, parse_special);
    for (int32_t id : ids) {
      tessera::fuzz::require(id >= 0 && id < tok.vocab_size(),
                             "encode returned an id outside the vocabulary");
    }
    const std::string back = tok.decode(ids);
    if (tok.normalizer() == tessera::nn::NormalizerKind::kNone) {
      tessera::fuzz::require(back == text, "decode(encode(text)) != text");
    } else {
      tessera::fuzz::require(tok.normalize(back) == tok.normalize(text),
                             "normalize(decode(encode(text))) != normalize(text)");
    }
  });
  return 0;
}
