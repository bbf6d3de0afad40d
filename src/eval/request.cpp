#include "tessera/eval/request.h"

#include "task_impl.h"
#include "tessera/eval/task.h"

namespace tessera::eval {

const char* chat_role_name(ChatRole role) {
  switch (role) {
    case ChatRole::kSystem:
      return "system";
    case ChatRole::kUser:
      return "user";
    case ChatRole::kAssistant:
      return "assistant";
  }
  return "?";
}

std::vector<DocRequests> build_requests(const Task& task, const BuildOptions& options) {
  const auto& impl = TaskAccess::impl(task);
  const TaskConfig& c = impl.config;
  const size_t n = options.limit > 0 ? std::min(options.limit, task.size()) : task.size();
  std::vector<DocRequests> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    // lm-eval's fewshot_context: description, then each example followed by
    // the fewshot delimiter (an example with an empty target gets neither
    // delimiter, as in lm-eval), then the question.
    std::string context = impl.descriptions[i];
    std::vector<ChatMessage> messages;
    if (!impl.descriptions[i].empty()) {
      messages.push_back({ChatRole::kSystem, impl.descriptions[i]});
    }
    for (size_t k : impl.fewshot[i]) {
      const std::string& text = impl.fewshot_texts[k];
      const std::string& target = impl.fewshot_targets[k];
      context += text;
      if (!target.empty()) context += c.target_delimiter + target + c.fewshot_delimiter;
      messages.push_back({ChatRole::kUser, text});
      messages.push_back({ChatRole::kAssistant, target});
    }
    context += impl.texts[i];
    messages.push_back({ChatRole::kUser, impl.texts[i]});

    DocRequests d;
    d.doc_index = i;
    d.prompt = context;
    switch (c.output_type) {
      case OutputType::kGenerateUntil: {
        GenerateRequest r;
        r.context = context;
        r.messages = messages;
        r.until = c.generation_kwargs.until;
        r.max_gen_toks = c.generation_kwargs.max_gen_toks;
        r.temperature = c.generation_kwargs.temperature;
        r.do_sample = c.generation_kwargs.do_sample;
        d.generate.push_back(std::move(r));
        break;
      }
      case OutputType::kMultipleChoice:
        for (const std::string& choice : impl.choices[i]) {
          d.loglikelihood.push_back({context, messages, c.target_delimiter + choice, choice});
        }
        break;
      case OutputType::kLoglikelihood:
        d.loglikelihood.push_back(
            {context, messages, c.target_delimiter + impl.targets[i], impl.targets[i]});
        break;
    }
    out.push_back(std::move(d));
  }
  return out;
}

}  // namespace tessera::eval
