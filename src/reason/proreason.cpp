#include "tessera/reason/proreason.h"

#include <algorithm>
#include <cctype>
#include <nlohmann/json.hpp>

#include "tessera/core/error.h"
#include "tessera/core/file_io.h"
#include "tessera/reason/scenes.h"

namespace tessera::reason {
namespace {

std::string trim(std::string s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.erase(0, 1);
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.pop_back();
  return s;
}

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

std::string facts(const std::vector<std::string>& memory) {
  if (memory.empty()) return "(none yet)\n";
  std::string out;
  for (const std::string& f : memory) out += "- " + f + "\n";
  return out;
}

bool is_word_char(char c) { return std::isalnum(static_cast<unsigned char>(c)) != 0; }

// Calls `client` with one user message and records the call.
std::string call(ModelClient& client, const std::string& method, const std::string& role,
                 int64_t iteration, const Question& q, const std::string& prompt, bool with_image,
                 int64_t max_tokens, MethodResult& result) {
  CompletionRequest r;
  Message m{"user", prompt, {}};
  if (with_image) m.images.push_back(q.image);
  r.messages.push_back(std::move(m));
  r.max_tokens = max_tokens;
  Completion c = client.complete(r);
  TraceRecord rec;
  rec.question_id = q.id;
  rec.method = method;
  rec.role = role;
  rec.model = client.name();
  rec.iteration = iteration;
  rec.prompt = prompt;
  rec.answer = c.text;
  rec.prompt_tokens = c.prompt_tokens;
  rec.completion_tokens = c.completion_tokens;
  rec.seconds = c.seconds;
  result.trace.push_back(std::move(rec));
  return trim(c.text);
}

}  // namespace

std::string to_jsonl(const std::vector<TraceRecord>& records) {
  std::string out;
  for (const TraceRecord& r : records) {
    nlohmann::ordered_json j;
    j["question_id"] = r.question_id;
    j["method"] = r.method;
    j["role"] = r.role;
    j["model"] = r.model;
    j["iteration"] = r.iteration;
    j["prompt"] = r.prompt;
    j["answer"] = r.answer;
    j["prompt_tokens"] = r.prompt_tokens;
    j["completion_tokens"] = r.completion_tokens;
    j["seconds"] = r.seconds;
    out += j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
  }
  return out;
}

void append_jsonl(const std::string& path, const std::vector<TraceRecord>& records) {
  const std::string text = to_jsonl(records);
  FILE* f = std::fopen(path.c_str(), "ab");
  if (f == nullptr) throw_io_error("trace file '" + path + "'", errno);
  const size_t written = std::fwrite(text.data(), 1, text.size(), f);
  const int err = written == text.size() ? 0 : errno;
  if (std::fclose(f) != 0 || err != 0)
    throw_io_error("writing trace file '" + path + "'", err ? err : errno);
}

int64_t MethodResult::tokens() const {
  int64_t n = 0;
  for (const TraceRecord& r : trace) n += r.prompt_tokens + r.completion_tokens;
  return n;
}

int parse_choice(const std::string& raw, const std::vector<std::string>& options) {
  const std::string answer = trim(raw);
  const int n = static_cast<int>(options.size());
  if (n == 0 || answer.empty()) return -1;
  auto letter_at = [&](size_t i) -> int {
    if (i >= answer.size()) return -1;
    const char c = answer[i];
    if (c < 'A' || c >= 'A' + n) return -1;
    const bool left = i == 0 || !is_word_char(answer[i - 1]);
    const bool right = i + 1 >= answer.size() || !is_word_char(answer[i + 1]);
    return left && right ? c - 'A' : -1;
  };
  // A leading letter: "B", "B.", "(B) 5".
  size_t start = 0;
  while (start < answer.size() && (answer[start] == '(' || answer[start] == '[')) ++start;
  if (int k = letter_at(start);
      k >= 0 &&
      (start + 1 >= answer.size() || answer[start + 1] != ' ' || answer.size() <= start + 2 ||
       !std::islower(static_cast<unsigned char>(answer[start + 2])))) {
    return k;
  }
  // "answer is B", "Answer: (B)".
  const std::string low = lower(answer);
  for (const std::string cue : {"answer is", "answer:", "option"}) {
    size_t pos = low.rfind(cue);
    if (pos == std::string::npos) continue;
    pos += cue.size();
    while (pos < answer.size() && (answer[pos] == ' ' || answer[pos] == '(' || answer[pos] == ':'))
      ++pos;
    if (int k = letter_at(pos); k >= 0) return k;
  }
  // The last option text mentioned as a whole word.
  int best = -1;
  size_t best_pos = 0;
  for (int k = 0; k < n; ++k) {
    const std::string& o = options[k];
    if (o.empty()) continue;
    for (size_t pos = answer.find(o); pos != std::string::npos; pos = answer.find(o, pos + 1)) {
      const bool left = pos == 0 || !is_word_char(answer[pos - 1]);
      const bool right = pos + o.size() >= answer.size() || !is_word_char(answer[pos + o.size()]);
      if (left && right && (best < 0 || pos >= best_pos)) {
        best = k;
        best_pos = pos;
      }
    }
  }
  return best;
}

std::string options_text(const Question& q) {
  std::string out;
  for (size_t i = 0; i < q.options.size(); ++i)
    out += option_letter(static_cast<int>(i)) + ". " + q.options[i] + "\n";
  return out;
}

std::string referee_prompt(const Question& q, const std::vector<std::string>& memory) {
  return "You are a referee. Decide whether the known facts are enough to answer the question.\n"
         "Question: " +
         q.text + "\nKnown facts about the image:\n" + facts(memory) +
         "Are the known facts enough to answer the question? Reply with only Yes or No.";
}

std::string dispatcher_prompt(const Question& q, const std::vector<std::string>& memory) {
  // Two worked examples of the reply format: small models follow a pattern
  // far more reliably than an instruction. Their question is of another
  // kind than the benchmark's.
  return "You plan how to answer a question about an image that you cannot see. Reply with "
         "VISION: and one simple question for the vision expert when a fact about the image is "
         "missing, or with INSIGHT when the known facts only need calculation.\n\n"
         "Question: Are there more green squares than yellow triangles?\n"
         "Known facts about the image:\n(none yet)\n"
         "Next step: VISION: How many green squares are there?\n\n"
         "Question: Are there more green squares than yellow triangles?\n"
         "Known facts about the image:\n- How many green squares are there? 3\n"
         "- How many yellow triangles are there? 1\n"
         "Next step: INSIGHT\n\n"
         "Question: " +
         q.text + "\nKnown facts about the image:\n" + facts(memory) + "Next step:";
}

std::string insight_prompt(const Question& q, const std::vector<std::string>& memory) {
  return "Known facts about an image:\n" + facts(memory) + "Question: " + q.text +
         "\nUsing only these facts, work out the answer step by step and state the result in one "
         "sentence.";
}

std::string summarizer_prompt(const Question& q, const std::vector<std::string>& memory) {
  std::string p = "Known facts about an image:\n" + facts(memory) + "Question: " + q.text + "\n";
  if (!q.options.empty())
    return p + "Options:\n" + options_text(q) + "Answer with the letter of the correct option.";
  return p + "Answer with a short final answer.";
}

bool parse_referee(const std::string& answer) {
  std::string a = lower(trim(answer));
  size_t i = 0;
  while (i < a.size() && !std::isalpha(static_cast<unsigned char>(a[i]))) ++i;
  return a.compare(i, 3, "yes") == 0;
}

Dispatch parse_dispatch(const std::string& raw, bool memory_empty) {
  const std::string answer = trim(raw);
  const std::string low = lower(answer);
  for (const std::string cue : {"vision expert:", "vision:"}) {
    const size_t pos = low.find(cue);
    if (pos != std::string::npos) {
      std::string q = trim(answer.substr(pos + cue.size()));
      const size_t nl = q.find('\n');
      if (nl != std::string::npos) q = trim(q.substr(0, nl));
      if (!q.empty()) return {true, q};
    }
  }
  if (low.find("insight") != std::string::npos) return {false, ""};
  const size_t mark = answer.find('?');
  if (mark != std::string::npos) {
    size_t begin = answer.find_last_of(".!\n:", mark);
    begin = begin == std::string::npos ? 0 : begin + 1;
    return {true, trim(answer.substr(begin, mark - begin + 1))};
  }
  if (memory_empty) return {true, "Describe the image."};
  return {false, ""};
}

MethodResult run_direct(ModelClient& vlm, const Question& q) {
  MethodResult r;
  std::string prompt = q.text;
  if (!q.options.empty()) prompt += "\n" + options_text(q) + "Answer with the option's letter.";
  r.answer = call(vlm, "direct", "vlm", 0, q, prompt, true, 16, r);
  r.choice = parse_choice(r.answer, q.options);
  return r;
}

MethodResult run_cot(ModelClient& vlm, const Question& q) {
  MethodResult r;
  std::string prompt = q.text;
  if (!q.options.empty()) prompt += "\n" + options_text(q);
  prompt += "Let's think step by step, then give the answer.";
  r.answer = call(vlm, "cot", "vlm", 0, q, prompt, true, 96, r);
  r.choice = parse_choice(r.answer, q.options);
  return r;
}

MethodResult run_describe_then_reason(ModelClient& vlm, ModelClient& llm, const Question& q,
                                      int64_t max_answer_tokens) {
  MethodResult r;
  const std::string description =
      call(vlm, "describe", "describer", 0, q, "Describe the image.", true, 48, r);
  r.memory.push_back(description);
  r.answer = call(llm, "describe", "reasoner", 0, q, summarizer_prompt(q, r.memory), false,
                  max_answer_tokens, r);
  r.choice = parse_choice(r.answer, q.options);
  return r;
}

MethodResult run_proreason(const Agents& a, const Question& q, const ProReasonOptions& o) {
  TESSERA_CHECK(a.vision && a.referee && a.dispatcher && a.insight && a.summarizer, InvalidArgument,
                "run_proreason: every role needs a model client");
  TESSERA_CHECK(a.vision->accepts_images(), InvalidArgument, "run_proreason: the vision expert '",
                a.vision->name(), "' takes no images");
  TESSERA_CHECK(o.max_iterations >= 1, InvalidArgument,
                "run_proreason: max_iterations must be >= 1");
  MethodResult r;
  for (int64_t it = 0; it < o.max_iterations; ++it) {
    if (!r.memory.empty()) {
      const std::string verdict =
          call(*a.referee, "proreason", "referee", it, q, referee_prompt(q, r.memory), false, 4, r);
      if (parse_referee(verdict)) break;
    }
    const std::string plan = call(*a.dispatcher, "proreason", "dispatcher", it, q,
                                  dispatcher_prompt(q, r.memory), false, 24, r);
    const Dispatch d = parse_dispatch(plan, r.memory.empty());
    if (d.vision) {
      const std::string seen =
          call(*a.vision, "proreason", "vision", it, q, d.question, true, o.max_tokens_vision, r);
      r.memory.push_back(d.question + " " + seen);
    } else {
      const std::string thought = call(*a.insight, "proreason", "insight", it, q,
                                       insight_prompt(q, r.memory), false, o.max_tokens_insight, r);
      r.memory.push_back(thought);
    }
  }
  r.answer = call(*a.summarizer, "proreason", "summarizer", o.max_iterations, q,
                  summarizer_prompt(q, r.memory), false, o.max_tokens_answer, r);
  r.choice = parse_choice(r.answer, q.options);
  return r;
}

}  // namespace tessera::reason
