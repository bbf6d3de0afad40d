// tessera/eval/request.h — what a model backend must answer, and the Backend interface.
//
// A task turns each document into requests:
//   generate_until   one GenerateRequest (generate text until a stop string);
//   multiple_choice  one LoglikelihoodRequest per choice, continuation =
//                    target_delimiter + choice;
//   loglikelihood    one LoglikelihoodRequest, continuation =
//                    target_delimiter + target.
// A Backend (an in-process model, an OpenAI-compatible HTTP endpoint, ...)
// answers them in batches; evaluator.h drives the loop and scores.
//
//   auto docs = build_requests(task);
//   std::vector<GenerateRequest> batch;
//   for (const auto& d : docs) batch.insert(batch.end(), d.generate.begin(), d.generate.end());
//   std::vector<std::string> texts = backend.generate(batch);
//
// Prompt forms. Every request carries the prompt twice:
//   context   the whole prompt as one string, as lm-eval builds it for a
//             completion model: description + for each few-shot example
//             (text + target_delimiter + target + fewshot_delimiter) + text.
//   messages  the same prompt as chat turns: the description as a system
//             message (when non-empty), each few-shot example as a user turn
//             (its text) and an assistant turn (its target), and the
//             document's text as the last user turn — lm-eval's
//             fewshot_as_multiturn layout.
// Applying a chat template is the backend's job: a chat backend renders
// `messages` with its model's template and its generation prompt (for
// log-likelihoods it then scores `continuation` after that prompt); a
// completion backend uses `context`. We carry the turns rather than one
// pre-rendered chat string because the template belongs to the model, and a
// few-shot example is only a real conversation turn if the backend sees it
// as one.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

namespace tessera::eval {

class Task;

enum class ChatRole { kSystem, kUser, kAssistant };
// "system", "user", "assistant" (the OpenAI spellings).
const char* chat_role_name(ChatRole role);

struct ChatMessage {
  ChatRole role = ChatRole::kUser;
  std::string content;
};

struct GenerateRequest {
  std::string context;
  std::vector<ChatMessage> messages;
  // Generation stops before the first occurrence of any of these strings;
  // the returned text must not include the stop string.
  std::vector<std::string> until;
  int max_gen_toks = 256;    // upper bound on generated tokens
  double temperature = 0.0;  // 0 with do_sample=false: greedy decoding
  bool do_sample = false;
};

struct LoglikelihoodRequest {
  std::string context;
  std::vector<ChatMessage> messages;
  // Scored after the context; starts with the task's target_delimiter.
  std::string continuation;
  // Scored after `messages` rendered by a chat template: the continuation
  // without the target_delimiter, since the answer opens the assistant's
  // turn (lm-eval drops the delimiter when it applies a chat template).
  std::string chat_continuation;
};

struct LoglikelihoodResult {
  // Sum over the continuation's tokens of log P(token | everything before), natural log.
  double logprob = 0.0;
  // True when greedy decoding from the context would produce exactly the continuation.
  bool is_greedy = false;
};

// The model interface the harness calls. Implementations decide their own
// thread-safety; the harness calls one method at a time from one thread.
class Backend {
 public:
  virtual ~Backend() = default;
  // One generated text per request, same order and count. Errors: throw a
  // tessera::Error (Unavailable for a transient endpoint failure).
  virtual std::vector<std::string> generate(const std::vector<GenerateRequest>& requests) = 0;
  // One result per request, same order and count.
  virtual std::vector<LoglikelihoodResult> loglikelihood(
      const std::vector<LoglikelihoodRequest>& requests) = 0;
};

// The requests of one document.
struct DocRequests {
  size_t doc_index = 0;
  std::string prompt;                               // == the requests' context, kept for logs
  std::vector<GenerateRequest> generate;            // generate_until: one
  std::vector<LoglikelihoodRequest> loglikelihood;  // one per choice, or one
};

struct BuildOptions {
  // Only the first `limit` documents (0: all). Few-shot draws are the same
  // as without a limit: they are made for all documents in order.
  size_t limit = 0;
};

// Requests for the task's documents, in document order.
std::vector<DocRequests> build_requests(const Task& task, const BuildOptions& options = {});

}  // namespace tessera::eval
