// The tokenizer folders the tests' small random models use: byte-level BPE
// without merges (ids 0..255 are the bytes) followed by special tokens, so
// that the serving engine, the loaders and the chat template all work on a
// model that needs no download.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "tessera/tokenizer/tokenizer_folder.h"

namespace tessera::testutil {

// A ChatML chat template (what SmolLM2's and Qwen's files hold, minus the
// default system prompt).
inline const char* kChatMlTemplate =
    "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

// Writes `dir`/tokenizer.json and tokenizer_config.json: the 256 bytes,
// then `specials` as special tokens (ids 256, 257, ...), `eos` (one of
// them) as EOS, and `chat_template` when not empty.
inline void write_byte_tokenizer(const std::string& dir, const std::vector<std::string>& specials,
                                 const std::string& eos,
                                 const std::string& chat_template = kChatMlTemplate) {
  nn::TokenizerSpec spec;
  for (int b = 0; b < 256; ++b) spec.vocab.push_back(nn::byte_level_symbol(uint8_t(b)));
  for (size_t i = 0; i < specials.size(); ++i) {
    nn::AddedToken t;
    t.content = specials[i];
    t.id = static_cast<int32_t>(256 + i);
    if (t.content == eos) spec.eos_id = t.id;
    spec.added.push_back(t);
  }
  nn::write_tokenizer_folder(dir, spec, chat_template);
}

}  // namespace tessera::testutil
