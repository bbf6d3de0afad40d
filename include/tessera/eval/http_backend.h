// tessera/eval/http_backend.h — the evaluation Backend that calls an OpenAI-compatible endpoint.
//
//   tessera::eval::HttpBackendOptions o;
//   o.base_url = "http://127.0.0.1:8080";   // "/v1" is added unless present
//   auto backend = tessera::eval::HttpBackend::create(o);
//   RunReport report = run_task(task, *backend, run_options);
//
// Generation (GenerateRequest):
//   chat on   POST /v1/chat/completions {model, messages, max_tokens,
//             temperature, stop}: the server renders its own chat template;
//   chat off  POST /v1/completions {model, prompt: context, max_tokens,
//             temperature, stop}.
// The answer is choices[0].message.content (choices[0].text), cut again
// before the first stop string: servers may cap how many stop strings they
// honour (OpenAI: 4), so the first four are sent and all are applied here.
//
// Log-likelihoods (LoglikelihoodRequest): POST /v1/completions with
// {prompt, echo: true, logprobs: 1, max_tokens: 1, temperature: 0}; the
// server returns the prompt's tokens with token_logprobs and top_logprobs
// (lm-eval's local-completions does the same). The scored prompt is
// context + continuation, or with the chat template the rendered messages
// + chat_continuation. Which returned tokens are the continuation's:
//   with a tokenizer   the prompt is sent as token ids encoded here as lm-eval
//                      encodes it (the continuation's tokens are those past
//                      the context's own encoding), so the split is exact and
//                      the same as ModelBackend's;
//   without one        the prompt is sent as text and a token belongs to the
//                      continuation when its text_offset is at or past the
//                      context's length (in characters, as OpenAI counts).
// is_greedy: each continuation token was the top entry of top_logprobs.
// A server that does not echo prompt log-probabilities (llama.cpp's
// llama-server answers "Only no echo is supported") gives an error naming
// the URL and quoting the server.
//
// Transport: requests of a batch go out `concurrency` at a time; each has
// a `timeout`; connection failures, timeouts, HTTP 408/429/5xx are retried
// `max_retries` times with doubling `retry_backoff`; then Unavailable (or
// DeadlineExceeded) naming the URL. Other HTTP errors are InvalidArgument
// with the server's message; an answer that is not the expected JSON is
// DataLoss naming the URL and the missing field.
//
// Thread-safe: calls may come from several threads (each request opens its
// own connection).
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "tessera/eval/model_backend.h"
#include "tessera/eval/request.h"

namespace tessera::eval {

struct HttpBackendOptions {
  // "http://host:port" or "http://host:port/v1" (https when the HTTP library
  // was built with TLS).
  std::string base_url;
  // The "model" field; empty: the first id GET /v1/models lists.
  std::string model;
  // Sent as "Authorization: Bearer <api_key>" when not empty.
  std::string api_key;
  // A GGUF file, tokenizer.json or Hugging Face folder of the served model:
  // gives exact log-likelihood splits (token-id prompts) and the chat
  // template for log-likelihood prompts. Optional.
  std::string tokenizer_path;
  // kAuto: generation through /v1/chat/completions; log-likelihoods with the
  // tokenizer's chat template when it has one, else plain prompts.
  // kOn: as kAuto, but a log-likelihood request without a known template is
  // an error. kOff: plain prompts through /v1/completions for both.
  ChatTemplateMode chat_template = ChatTemplateMode::kAuto;
  std::chrono::milliseconds timeout{std::chrono::seconds(600)};  // per HTTP request
  int max_retries = 3;
  std::chrono::milliseconds retry_backoff{500};  // before the first retry; doubles
  int concurrency = 4;                           // requests in flight
  // Sent with every request ("seed"), for servers that sample.
  int64_t seed = 1234;
};

class HttpBackend final : public Backend {
 public:
  // Checks the options and, with an empty `model`, asks GET /v1/models
  // (errors as above). InvalidArgument for a URL that is not http(s)://,
  // concurrency < 1 or max_retries < 0; the tokenizer's load errors.
  static std::unique_ptr<HttpBackend> create(const HttpBackendOptions& options);
  ~HttpBackend() override;

  std::vector<std::string> generate(const std::vector<GenerateRequest>& requests) override;
  std::vector<LoglikelihoodResult> loglikelihood(
      const std::vector<LoglikelihoodRequest>& requests) override;

  // The "model" name in use (from the options or /v1/models).
  const std::string& model_name() const;
  // One line for logs and result files: URL, model, chat template, tokenizer.
  std::string describe() const;

 private:
  struct Impl;
  explicit HttpBackend(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Parses an OpenAI /v1/completions answer with echo + logprobs (the JSON
// text `body`) into the continuation's log-likelihood. `n_prompt_tokens` is
// the number of prompt tokens when the prompt was sent as token ids (then
// tokens [n_context, n_prompt_tokens) are the continuation), or -1 for a
// text prompt (then the tokens whose text_offset is >= `context_chars` and
// that lie inside the prompt, text_offset < `prompt_chars`, are).
// DataLoss naming `where` for a missing or malformed field, or no
// continuation tokens. Exposed for tests.
LoglikelihoodResult parse_echo_logprobs(const std::string& body, int64_t n_context,
                                        int64_t n_prompt_tokens, int64_t context_chars,
                                        int64_t prompt_chars, const std::string& where);

}  // namespace tessera::eval
