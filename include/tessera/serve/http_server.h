// tessera/serve/http_server.h — an OpenAI-compatible HTTP server over an
// Engine (what tessera-serve runs).
//
// Routes (the OpenAI API as vLLM and llama-server serve it):
//   POST /v1/completions           prompt (text, token ids, or a list of either),
//                                  max_tokens, temperature, top_p, top_k, n, stop,
//                                  seed, logprobs, echo, stream (+ stream_options),
//                                  response_format, priority, ignore_eos, stop_token_ids
//   POST /v1/chat/completions      messages (text content, or text parts), the same
//                                  sampling fields, logprobs + top_logprobs, stream
//   GET  /v1/models                the model and its loaded adapters
//   POST /v1/load_lora_adapter     {"lora_name", "lora_path"} (when enabled)
//   POST /v1/unload_lora_adapter   {"lora_name"}
//   GET  /health                   200 while serving, 503 while draining
//   GET  /metrics                  Prometheus text (the engine's vllm:* metrics)
// A request's "model" names the model or one of its adapters. Streams are
// server-sent events (`data: {chunk}` ... `data: [DONE]`). Errors are
// OpenAI error objects ({"error": {"message", "type", "param", "code"}})
// with the HTTP status in "code": 400 for a malformed request, 401 for a
// missing or wrong API key, 404 for an unknown model, adapter or route,
// 413 for a body over the limit, 503 while draining or when the
// concurrent-request limit is reached.
//
//   auto engine = tessera::serve::Engine::create(options);
//   tessera::serve::HttpServerOptions http;
//   http.port = 8000;
//   auto server = tessera::serve::HttpServer::start(*engine, http);
//   ...
//   server->drain(std::chrono::seconds(30));   // finish or abort, then stop
//
// A client that disconnects (streaming or not) has its request cancelled,
// which frees its KV blocks at the engine's next step.
//
// Thread-safety: the server runs its own threads; drain() and stop() may be
// called from any thread, once.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

namespace tessera::serve {

class Engine;

struct HttpServerOptions {
  // Where to listen. Loopback unless told otherwise; port 0: a free one.
  std::string host = "127.0.0.1";
  int port = 8000;
  // Requests must carry "Authorization: Bearer <api_key>" (empty: none).
  // /health is open; every other route needs the key.
  std::string api_key;
  // /v1/load_lora_adapter and /v1/unload_lora_adapter answer 404 unless
  // enabled; loadable folders must lie under adapter_root (required then).
  bool enable_adapter_loading = false;
  std::string adapter_root;
  // Limits: request body bytes (413 beyond), requests in flight at once
  // (503 beyond), choices per request (n times the number of prompts).
  int64_t max_request_bytes = int64_t{4} << 20;
  // Chat image parts may name local files (file:// URLs or absolute paths)
  // under this folder (vLLM's --allowed-local-media-path); empty: only
  // data: URLs.
  std::string allowed_local_media_path;
  int64_t max_concurrent_requests = 256;
  int64_t max_choices = 64;
  // Threads serving connections (each open stream holds one).
  int threads = 128;
};

class HttpServer {
 public:
  // Binds and starts serving. Unavailable naming host:port when it cannot
  // bind; InvalidArgument for inconsistent options.
  static std::unique_ptr<HttpServer> start(Engine& engine, const HttpServerOptions& options);
  // Stops at once (in-flight requests are aborted).
  ~HttpServer();

  int port() const;
  // "http://host:port".
  std::string url() const;
  // Refuses new requests (503, /health too), lets running requests finish
  // for up to `deadline`, aborts the rest, then stops. True when every
  // request finished in time.
  bool drain(std::chrono::milliseconds deadline);
  void stop();
  // Blocks until the server has stopped.
  void wait();

  struct Impl;

 private:
  explicit HttpServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace tessera::serve
