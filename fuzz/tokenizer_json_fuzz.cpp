// Fuzz target: Hugging Face tokenizer.json files (Tokenizer::from_tokenizer_json).
//
// Input: the bytes of a tokenizer.json, written to a scratch directory and
// loaded from there. A tokenizer that loads must then tokenize: a few fixed
// texts (ASCII, CJK, invalid UTF-8, the contents of its own added tokens)
// are encoded and decoded, every id must lie inside the vocabulary, and,
// when no byte lacks its base token (encode() throws then) and no added
// token strips white space, decoding gives the text back (up to the
// tokenizer's normalizer, which is applied piecewise around added tokens).
// A tokenizer_config.json is not written, so the special-token ids come from
// tokenizer.json alone.
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "fuzz_common.h"
#include "tessera/tokenizer/tokenizer.h"

namespace {

tessera::fuzz::ScratchDir& scratch() {
  static tessera::fuzz::ScratchDir dir;
  return dir;
}

// `has_unk`: the file names a model.unk_token, so a byte without a base
// token becomes that token and the text cannot come back.
void exercise(const tessera::nn::Tokenizer& tok, bool has_unk) {
  static const char kInvalidUtf8[] = "bad \xff\xfe utf8 \xc3 \0 nul";
  std::vector<std::string> texts = {
      "Hello, world! It's 2024: 3.14159 apples.\n\n  indented\ttab",
      "\xe4\xbd\xa0\xe5\xa5\xbd\xef\xbc\x8c\xe4\xb8\x96\xe7\x95\x8c caf\xc3\xa9 e\xcc\x81",
      std::string(kInvalidUtf8, sizeof(kInvalidUtf8) - 1),
  };
  bool strips = false;
  std::string all_added;
  for (const auto& t : tok.added_tokens()) {
    strips |= t.lstrip || t.rstrip;
    all_added += " " + t.content + "x";
  }
  texts.push_back(all_added);
  for (const std::string& text : texts) {
    for (bool parse_special : {false, true}) {
      std::vector<int32_t> ids;
      try {
        ids = tok.encode(text, parse_special);
      } catch (const tessera::InvalidArgument&) {
        continue;  // a byte without a base token and no unk_id: documented
      }
      for (int32_t id : ids) {
        tessera::fuzz::require(id >= 0 && id < tok.vocab_size(),
                               "encode returned an id outside the vocabulary");
      }
      const std::string back = tok.decode(ids);
      if (!strips && !has_unk) {
        tessera::fuzz::require(tok.normalize(back) == tok.normalize(text),
                               "normalize(decode(encode(text))) != normalize(text)");
      }
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = scratch().file("tokenizer.json");
  tessera::fuzz::write_file(path, std::string_view(reinterpret_cast<const char*>(data), size));
  tessera::fuzz::expect_errors("Tokenizer::from_tokenizer_json", [&] {
    auto tok = tessera::nn::Tokenizer::from_tokenizer_json(path);
    // The loader accepted the file, so it is JSON with a "model" object.
    const auto root = nlohmann::json::parse(data, data + size, nullptr, false);
    const bool has_unk = root.is_object() && root.contains("model") &&
                         root.at("model").is_object() && root.at("model").contains("unk_token") &&
                         !root.at("model").at("unk_token").is_null();
    exercise(tok, has_unk);
  });
  return 0;
}
