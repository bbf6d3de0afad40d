// tessera/tokenizer/chat.h — chat messages rendered with a model's template.
//
//   std::string prompt = tessera::nn::format_chat(chat_template,
//       {{"user", "What is the capital of France?"}});
//   auto ids = tokenizer.encode(prompt, /*parse_special=*/true);
//
// Pure functions; thread-safe.
#pragma once

#include <string>
#include <vector>

namespace tessera::nn {

struct ChatMessage {
  std::string role;  // "system", "user", "assistant"
  std::string content;
};

// Renders messages with a ChatML template (<|im_start|>role\n...<|im_end|>),
// which SmolLM2 and Qwen use, ending with the assistant's turn opened. When
// no system message is given, the template's default system prompt (if it
// has one) is used. InvalidArgument for templates of other families and for
// unknown roles.
std::string format_chat(const std::string& chat_template, const std::vector<ChatMessage>& messages);

}  // namespace tessera::nn
