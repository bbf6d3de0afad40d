// tessera/tokenizer/tokenizer_folder.h — writing a byte-level BPE
// tokenizer as a Hugging Face tokenizer folder, for small models trained
// from scratch and for tests:
//
//   tessera::nn::TokenizerSpec spec;
//   for (int b = 0; b < 256; ++b) spec.vocab.push_back(tessera::nn::byte_level_symbol(b));
//   ... merges, added tokens, eos_id ...
//   tessera::nn::write_tokenizer_folder("model/", spec, chat_template);
//   auto tok = tessera::nn::Tokenizer::from_tokenizer_json("model/tokenizer.json");
#pragma once

#include <cstdint>
#include <string>

#include "tessera/tokenizer/tokenizer.h"

namespace tessera::nn {

// GPT-2's byte-to-unicode map: the vocabulary form of a byte ("Ġ" for the
// space, "a" for 'a'), as TokenizerSpec::vocab spells byte-level tokens.
std::string byte_level_symbol(uint8_t byte);

// Writes `spec` as a Hugging Face tokenizer folder: `dir`/tokenizer.json
// (byte-level BPE) and `dir`/tokenizer_config.json naming the BOS, EOS and
// pad tokens and, when not empty, `chat_template`. Tokenizer::from_tokenizer_json
// reads it back as the same tokenizer (and so do Hugging Face's tokenizers).
// For small models trained from scratch and for tests. InvalidArgument for a
// spec from_spec refuses or the file format cannot hold (pre-tokenizer other
// than kGpt2, an unk id); the files are replaced atomically. Creates `dir`.
void write_tokenizer_folder(const std::string& dir, const TokenizerSpec& spec,
                            const std::string& chat_template = "");

}  // namespace tessera::nn
