#include "tessera/tokenizer/chat.h"

#include "tessera/core/error.h"

namespace tessera::nn {

std::string format_chat(const std::string& chat_template,
                        const std::vector<ChatMessage>& messages) {
  TESSERA_CHECK(chat_template.empty() || chat_template.find("<|im_start|>") != std::string::npos,
                InvalidArgument,
                "format_chat: only ChatML templates (<|im_start|>...<|im_end|>) are supported");
  std::string out;
  bool has_system = !messages.empty() && messages.front().role == "system";
  if (!has_system) {
    // Templates such as SmolLM2's open with a default system prompt:
    // "... messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nTEXT<|im_end|>\n' }}".
    const std::string marker = "<|im_start|>system\\n";
    auto pos = chat_template.find(marker);
    if (pos != std::string::npos) {
      auto end = chat_template.find("<|im_end|>", pos);
      if (end != std::string::npos) {
        std::string text = chat_template.substr(pos + marker.size(), end - pos - marker.size());
        if (text.find("{{") == std::string::npos && text.find("{%") == std::string::npos) {
          out += "<|im_start|>system\n" + text + "<|im_end|>\n";
        }
      }
    }
  }
  for (const auto& m : messages) {
    TESSERA_CHECK(m.role == "system" || m.role == "user" || m.role == "assistant", InvalidArgument,
                  "format_chat: unknown role '", m.role, "'");
    out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
  }
  out += "<|im_start|>assistant\n";
  return out;
}

}  // namespace tessera::nn
