// The OpenAI request and response shapes of /v1/completions and
// /v1/chat/completions, translated to and from the Engine's (private to
// serve_http).
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>
#include <vector>

#include "tessera/serve/engine.h"

namespace tessera::serve::openai {

// A request the client got wrong: HTTP `status` with an OpenAI error object
// naming `param`.
struct BadRequest {
  int status = 400;
  std::string message;
  std::string param;
  std::string type = "invalid_request_error";
};

enum class Endpoint { kCompletions, kChat };

// One HTTP request, parsed: a GenerateRequest per prompt (chat: one), and
// how to answer.
struct Parsed {
  Endpoint endpoint = Endpoint::kCompletions;
  std::vector<GenerateRequest> prompts;
  std::string model;  // as the client named it (the base model or an adapter)
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
  // Chat: logprobs: true (with top_logprobs alternatives); completions:
  // logprobs N.
  bool want_logprobs = false;
  int64_t top_logprobs = 0;
};

// What chat requests may carry besides text: image_url parts (data: URLs;
// local files only under local_media_root when it is set), at most
// max_images per request.
struct ChatOptions {
  std::string local_media_root;
  int64_t max_images = 8;
};

// Throws BadRequest for malformed JSON, wrong field types, values out of
// range, unsupported fields, an unknown model (404), more than `max_choices`
// choices. `engine` resolves the model name and applies the chat template.
Parsed parse(Endpoint endpoint, const std::string& body, const Engine& engine, int64_t max_choices,
             const ChatOptions& chat_options = {});

// JSON text of a response. Token texts may hold part of a UTF-8 character
// (a byte-level token, a model that emits invalid bytes): such bytes become
// U+FFFD instead of failing the response; the exact bytes are in the
// logprobs' "bytes" arrays.
std::string dump_json(const nlohmann::json& j);

// The OpenAI error object for a status and message.
std::string error_body(int status, const std::string& message, const std::string& param = "",
                       const std::string& type = "");

// Accumulates one choice's events.
struct Choice {
  std::string text;
  std::vector<int64_t> tokens;
  std::vector<double> logprobs;
  std::vector<std::vector<TopLogprob>> top_logprobs;
  std::string finish_reason;
  int64_t prompt_tokens = 0, completion_tokens = 0;
  bool finished = false;
};

// Response bodies. `id` ("cmpl-..." / "chatcmpl-..."), `created` (Unix
// seconds) and `model` as sent. `text_of(token)` gives a token's text.
nlohmann::json full_response(const Parsed& p, const std::string& id, int64_t created,
                             const std::vector<Choice>& choices, const Engine& engine);
// One streamed chunk for an event of choice `index` (chat: `first` adds the
// assistant role).
nlohmann::json stream_chunk(const Parsed& p, const std::string& id, int64_t created, int64_t index,
                            const TokenEvent& event, bool first, const Engine& engine);
// The closing chunk with usage (stream_options.include_usage).
nlohmann::json usage_chunk(const Parsed& p, const std::string& id, int64_t created,
                           const std::vector<Choice>& choices);

}  // namespace tessera::serve::openai
