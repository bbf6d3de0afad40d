// tessera/serve/grpc.h — the streaming gRPC Generation service over an
// Engine (proto/tessera/serve/generation.proto) and its C++ client: what
// C++ programs and Tessera's other modules use to talk to a running
// tessera-serve (`--grpc-port`) without HTTP and JSON.
//
//   auto engine = tessera::serve::Engine::create(options);
//   auto server = tessera::serve::GrpcServer::start(*engine, {});  // 127.0.0.1, a free port
//
//   tessera::serve::GenerationClient client(server->address());
//   tessera::serve::GenerateRequest r;
//   r.prompt_text = "The capital of France is";
//   r.params.max_tokens = 16;
//   r.params.temperature = 0;
//   client.generate(r, [](const tessera::serve::TokenEvent& e) {
//     std::cout << e.text << std::flush;
//     return true;                                    // false: cancel the request
//   });
//   auto answers = client.chat({{"user", "What is 2 + 3?"}}, r.params);  // collected
//
// Events arrive as the engine produces them, in order per sample, exactly
// as Engine::submit's callback receives them (the same tokens, text,
// log-probabilities and finish reasons). A call that the client cancels,
// whose deadline passes or whose connection drops aborts its request on
// the server, which frees its KV blocks at the next engine step.
//
// Errors: the client throws the tessera::Error matching the server's
// status, "Generate to <address>: <message>" (InvalidArgument for a bad
// request, FailedPrecondition for a wrong API key or a draining server,
// ResourceExhausted beyond the server's concurrent-call limit,
// Unavailable when nothing answers).
//
// Thread-safety: a GrpcServer serves calls on gRPC's threads; shutdown()
// may be called from any thread, once. A GenerationClient may be used
// from many threads at once (each call is independent).
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "tessera/serve/engine.h"

namespace tessera::serve {

struct GrpcServerOptions {
  // Where to listen: loopback unless told otherwise; port 0: a free one.
  std::string host = "127.0.0.1";
  int port = 0;
  // Calls must carry "authorization: Bearer <api_key>" metadata (empty: none).
  std::string api_key;
  // Generate calls in flight at once (RESOURCE_EXHAUSTED beyond) and the
  // largest request message.
  int64_t max_concurrent_requests = 256;
  int max_message_bytes = 16 << 20;
};

class GrpcServer {
 public:
  // Binds and starts serving. Unavailable naming host:port when it cannot
  // bind.
  static std::unique_ptr<GrpcServer> start(Engine& engine, const GrpcServerOptions& options);
  // shutdown() with a one-second grace.
  ~GrpcServer();

  int port() const;
  std::string address() const;  // "host:port"
  // Stops accepting calls; calls still streaming after `grace` are
  // cancelled and their requests aborted. Idempotent.
  void shutdown(std::chrono::milliseconds grace);

  struct Impl;

 private:
  explicit GrpcServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

struct GenerationClientOptions {
  std::string api_key;                   // sent as "authorization: Bearer <key>"
  int max_message_bytes = 16 << 20;      // largest message either way
  std::chrono::milliseconds timeout{0};  // per call; 0: none
};

// What the server reports about itself (InfoReply).
struct ServerInfo {
  std::string model_name;
  int64_t max_model_len = 0;
  int64_t vocab_size = 0;
  std::vector<std::string> adapters;
  bool serving = false;  // false while draining
};

// One sample's output, collected.
struct Completion {
  std::vector<int64_t> tokens;
  std::string text;
  std::vector<double> logprobs;  // when asked
  std::string finish_reason;
  int64_t prompt_tokens = 0;
  double ttft_seconds = 0;
};

class GenerationClient {
 public:
  // Connects lazily: an address nobody serves fails at the first call.
  explicit GenerationClient(const std::string& address, GenerationClientOptions options = {});
  ~GenerationClient();
  GenerationClient(const GenerationClient&) = delete;
  GenerationClient& operator=(const GenerationClient&) = delete;

  // Streams one request's events to `on_event`, on this thread, until
  // every sample has finished. Returning false from `on_event` cancels the
  // request on the server and returns at once (no error).
  using EventHandler = std::function<bool(const TokenEvent&)>;
  void generate(const GenerateRequest& request, const EventHandler& on_event);
  // The same with the model's chat template applied by the server to
  // `messages` (request.prompt_text and prompt_tokens must be empty).
  void generate_chat(const std::vector<nn::ChatMessage>& messages, const GenerateRequest& request,
                     const EventHandler& on_event);

  // Collected outputs, one per sample (params.n of them).
  std::vector<Completion> complete(const GenerateRequest& request);
  std::vector<Completion> chat(const std::vector<nn::ChatMessage>& messages,
                               const SamplingParams& params, const std::string& adapter = "");

  std::vector<int64_t> tokenize(const std::string& text);
  ServerInfo info();
  const std::string& address() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace tessera::serve
