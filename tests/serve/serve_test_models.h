// Shared by the serving engine's tests: random models of a small size
// with a byte-level tokenizer, and the mixed-length prompt set of the
// equality tests.
#pragma once

#include <cstdint>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "tessera/formats/model_config.h"
#include "tessera/tokenizer/tokenizer_folder.h"

namespace tessera::serve::test {

constexpr int64_t kVocab = 300;   // model vocabulary
constexpr int64_t kEAcute = 256;  // the merged token "é" (two bytes)
constexpr int64_t kEos = 257;     // <|endoftext|>

// A byte-level tokenizer: ids 0..255 are the bytes, 256 the merge "é"
// (0xC3 0xA9), 257 <|endoftext|> (EOS). Model ids 258..299 have no text.
inline void write_tokenizer(const std::filesystem::path& dir) {
  nn::TokenizerSpec spec;
  for (int b = 0; b < 256; ++b) spec.vocab.push_back(nn::byte_level_symbol(uint8_t(b)));
  const std::string c3 = nn::byte_level_symbol(0xC3), a9 = nn::byte_level_symbol(0xA9);
  spec.vocab.push_back(c3 + a9);  // kEAcute
  spec.merges = {{c3, a9}};
  nn::AddedToken eos;
  eos.content = "<|endoftext|>";
  eos.id = kEos;
  spec.added = {eos};
  spec.eos_id = kEos;
  nn::write_tokenizer_folder(dir.string(), spec);
}

inline nn::ModelConfig tiny(const std::string& type) {
  nn::ModelConfig c;
  c.model_type = type;
  c.vocab_size = kVocab;
  c.hidden_size = 64;
  c.intermediate_size = 128;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.max_position_embeddings = 512;
  c.eos_token_ids = {kEos};
  if (type == "qwen2" || type == "qwen2_moe") c.attention_bias = true;
  if (type == "qwen2") c.tie_word_embeddings = true;
  if (type == "mixtral" || type == "qwen2_moe") {
    c.num_experts = 4;
    c.num_experts_per_tok = 2;
  }
  if (type == "qwen2_moe") {
    c.moe_intermediate_size = 64;
    c.shared_expert_intermediate_size = 64;
  }
  return c;
}

// Prompts of mixed lengths (1..40 tokens of text bytes); every other one
// starts with one of three shared 20-token prefixes (prefix-cache hits).
inline std::vector<std::vector<int64_t>> mixed_prompts(int count, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::vector<int64_t>> shared(3);
  for (auto& p : shared) {
    for (int i = 0; i < 20; ++i) p.push_back(static_cast<int64_t>(rng() % 256));
  }
  std::vector<std::vector<int64_t>> prompts;
  for (int i = 0; i < count; ++i) {
    std::vector<int64_t> p;
    if (i % 2 == 0) p = shared[(i / 2) % 3];
    const int extra = 1 + static_cast<int>(rng() % 20);
    for (int k = 0; k < extra; ++k) p.push_back(static_cast<int64_t>(rng() % 256));
    prompts.push_back(p);
  }
  return prompts;
}

}  // namespace tessera::serve::test
