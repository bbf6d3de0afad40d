// src/eval/prompt_tokens.h — what the in-process and HTTP backends share about
// turning requests into tokens: the tokenizer files of a model, prompt
// rendering (chat template or plain) and lm-eval's context/continuation split.
//
// Private to the eval module. Pure functions over immutable inputs; thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "tessera/eval/request.h"
#include "tessera/tokenizer/chat.h"
#include "tessera/tokenizer/tokenizer.h"

namespace tessera::eval::detail {

// A model's tokenizer with what decides how prompts are encoded.
struct TokenizerFiles {
  nn::Tokenizer tokenizer;
  std::string chat_template;  // "" when the files have none
  bool add_bos = false;       // prompts start with the BOS token
};

// Reads the tokenizer of a GGUF file (metadata only, no weights), of a
// tokenizer.json (with tokenizer_config.json beside it, when present: chat
// template and add_bos_token) or of a Hugging Face folder holding one.
// NotFound for a missing path; the tokenizer's own errors otherwise.
TokenizerFiles load_tokenizer_files(const std::string& path);

// The chat template and add_bos_token of a tokenizer_config.json in `dir`
// (empty / false when the file is absent). InvalidArgument naming the file
// for malformed JSON or a chat_template that is not a string.
void read_tokenizer_config(const std::string& dir, std::string* chat_template, bool* add_bos);

// add_bos_token of a GGUF file (false when absent).
bool gguf_add_bos(const std::string& gguf_path);

std::vector<nn::ChatMessage> to_chat(const std::vector<ChatMessage>& messages);

// Token ids of `text` (special tokens parsed), with BOS first when `add_bos`.
std::vector<int64_t> encode(const nn::Tokenizer& tokenizer, bool add_bos, const std::string& text);

// The text a log-likelihood request scores, split as lm-eval's _encode_pair
// does: trailing spaces of the context move to the continuation.
struct TextPair {
  std::string context;
  std::string continuation;
};
TextPair loglikelihood_text(const LoglikelihoodRequest& request, bool chat,
                            const std::string& chat_template);

// A log-likelihood request as tokens: `tokens` is the encoding of context +
// continuation; tokens[0, context) count as the context, where `context` is
// the length of the context's own encoding (lm-eval). An empty context is
// replaced by the EOS (else BOS) token. InvalidArgument naming `request` when
// the continuation adds no tokens or there is no token to start an empty
// context with.
struct ScoredTokens {
  std::vector<int64_t> tokens;
  size_t context = 0;
};
ScoredTokens encode_pair(const nn::Tokenizer& tokenizer, bool add_bos, const TextPair& pair,
                         size_t request);

// The earliest position of any of `until` in `text` (std::string::npos: none).
size_t first_stop(const std::string& text, const std::vector<std::string>& until);

}  // namespace tessera::eval::detail
