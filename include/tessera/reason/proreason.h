// tessera/reason/proreason.h — ProReason (decoupled eyesight and wisdom)
// and the baselines it is compared with, over any ModelClient.
//
// ProReason keeps one shared memory of facts about the question's image.
// Each iteration:
//   1. Referee (text LLM): does the memory suffice to answer? (skipped while
//      the memory is empty: nothing can suffice yet, and the call is saved)
//   2. if not, Dispatcher (text LLM) picks the next expert:
//        "VISION: <question>" -> Vision Expert (the VLM, with the image)
//                                answers that targeted question;
//        "INSIGHT"            -> Insight Expert (text LLM) reasons over the
//                                memory and states a new conclusion;
//      the expert's answer is appended to the memory;
//   3. when the Referee says the memory suffices, or after max_iterations,
//      the Summarizer (text LLM, no image) answers from the memory.
// Every role is a prompt and an output parser (role_prompt(), parse_*), so a
// model that answers off format degrades to a documented fallback instead
// of stopping the loop. The roles may share one client.
//
// The baselines: direct (the VLM answers the question), chain of thought
// (the VLM is asked to reason step by step, then answer), and passive
// describe-then-reason (the VLM describes the image once; the text LLM
// answers from that description).
//
// Every model call is recorded (method, role, prompt, answer, tokens,
// seconds) in a Trace that writes JSONL.
//
//   tessera::reason::Agents agents{vlm.get(), llm.get(), llm.get(), llm.get(), llm.get()};
//   tessera::reason::Question q{"q1", image, "How many more red circles than blue squares?",
//   {"1","2","3","4"}}; auto r = tessera::reason::run_proreason(agents, q, {}); r.choice;  // 0..3,
//   or -1 when the answer names no option
//
// Thread safety: functions are thread-safe when their clients are; a Trace
// is not (one per thread).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "tessera/nn/image.h"
#include "tessera/reason/model_client.h"

namespace tessera::reason {

struct Question {
  std::string id;
  nn::Image image;
  std::string text;
  std::vector<std::string> options;  // multiple choice ("A".. in prompts); empty: open answer
};

struct TraceRecord {
  std::string question_id;
  std::string method;  // "direct", "cot", "describe", "proreason"
  std::string role;    // "vlm", "describer", "reasoner", "referee", "dispatcher", "vision",
                       // "insight", "summarizer"
  std::string model;
  int64_t iteration = 0;
  std::string prompt;  // the text of the last user message
  std::string answer;
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
  double seconds = 0;
};

// One JSON object per line: question_id, method, role, model, iteration,
// prompt, answer, prompt_tokens, completion_tokens, seconds.
std::string to_jsonl(const std::vector<TraceRecord>& records);
// Appends to `path` (created if missing). I/O errors name the path.
void append_jsonl(const std::string& path, const std::vector<TraceRecord>& records);

struct MethodResult {
  std::string answer;  // the final model output
  int choice = -1;     // parsed option index, -1 when none
  std::vector<TraceRecord> trace;
  std::vector<std::string> memory;  // ProReason's facts, in order
  int64_t calls() const { return static_cast<int64_t>(trace.size()); }
  int64_t tokens() const;  // prompt + completion, over every call
};

// The option an answer picks: a leading or standalone letter ("B", "(B)",
// "Answer: B"), else an option text found as a whole word (the last one
// mentioned wins, as answers usually end with the result). -1 when none.
int parse_choice(const std::string& answer, const std::vector<std::string>& options);

struct ProReasonOptions {
  int64_t max_iterations = 4;  // expert calls before the Summarizer is forced
  // Generation budgets per role (the Referee gets 4 tokens, the Dispatcher
  // 24: a verdict and one line).
  int64_t max_tokens_vision = 24;
  int64_t max_tokens_insight = 64;
  int64_t max_tokens_answer = 16;  // Summarizer (an option letter, or a short answer)
};

// The roles' models (borrowed; may be the same object). vision must accept
// images.
struct Agents {
  ModelClient* vision = nullptr;
  ModelClient* referee = nullptr;
  ModelClient* dispatcher = nullptr;
  ModelClient* insight = nullptr;
  ModelClient* summarizer = nullptr;
};

// Role prompts, exposed for tests and for users who swap in their own.
std::string referee_prompt(const Question& q, const std::vector<std::string>& memory);
std::string dispatcher_prompt(const Question& q, const std::vector<std::string>& memory);
std::string insight_prompt(const Question& q, const std::vector<std::string>& memory);
std::string summarizer_prompt(const Question& q, const std::vector<std::string>& memory);
std::string options_text(const Question& q);  // "A. 3\nB. 5\n..." or ""

// Referee output: true for a leading "yes" (case-insensitive, after
// punctuation and spaces); anything else (including off-format text) means
// the memory does not suffice.
bool parse_referee(const std::string& answer);

struct Dispatch {
  bool vision = true;
  std::string question;  // for the Vision Expert
};
// "VISION: <q>" (or "Vision Expert: <q>") -> ask the VLM <q>; "INSIGHT" ->
// the Insight Expert. Off format: a text with a question mark goes to the
// VLM as the question; otherwise the VLM is asked to describe the image
// when the memory is empty, and the Insight Expert is called when it is not.
Dispatch parse_dispatch(const std::string& answer, bool memory_empty);

MethodResult run_direct(ModelClient& vlm, const Question& q);
MethodResult run_cot(ModelClient& vlm, const Question& q);
// The reasoner answers from the description with the Summarizer's prompt
// and budget (`max_answer_tokens`).
MethodResult run_describe_then_reason(ModelClient& vlm, ModelClient& llm, const Question& q,
                                      int64_t max_answer_tokens = 16);
// InvalidArgument when a role is null or vision takes no images.
MethodResult run_proreason(const Agents& agents, const Question& q,
                           const ProReasonOptions& options);

}  // namespace tessera::reason
