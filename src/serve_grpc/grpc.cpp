// The gRPC Generation service over an Engine, and its client
// (tessera/serve/grpc.h).
#include "tessera/serve/grpc.h"

#include <atomic>
#include <condition_variable>
#include <deque>
#include <mutex>

#include "tessera/core/error.h"
#include "tessera/rpc/rpc.h"
#include "tessera/serve/generation.grpc.pb.h"

namespace tessera::serve {
namespace {

namespace pb = tessera::serve::proto;

// How often a streaming handler looks at its call while no event comes:
// the bound on how long a cancelled call keeps its request running.
constexpr auto kPollInterval = std::chrono::milliseconds(50);

void sampling_from_proto(const pb::SamplingParams& in, SamplingParams* out) {
  if (in.has_max_tokens()) out->max_tokens = in.max_tokens();
  if (in.has_temperature()) out->temperature = in.temperature();
  if (in.has_top_p()) out->top_p = in.top_p();
  if (in.has_top_k()) out->top_k = in.top_k();
  if (in.has_seed()) out->seed = in.seed();
  out->stop.assign(in.stop().begin(), in.stop().end());
  out->stop_token_ids.assign(in.stop_token_ids().begin(), in.stop_token_ids().end());
  out->ignore_eos = in.ignore_eos();
  if (in.has_logprobs()) out->logprobs = in.logprobs();
  if (in.has_n()) out->n = in.n();
  out->json_object = in.json_object();
  out->priority = in.priority();
}

void sampling_to_proto(const SamplingParams& in, pb::SamplingParams* out) {
  // Every field is sent, so the server's defaults never replace the
  // client's (SamplingParams' own defaults are the engine's).
  out->set_max_tokens(in.max_tokens);
  out->set_temperature(in.temperature);
  out->set_top_p(in.top_p);
  out->set_top_k(in.top_k);
  if (in.seed) out->set_seed(*in.seed);
  for (const auto& s : in.stop) out->add_stop(s);
  for (int64_t t : in.stop_token_ids) out->add_stop_token_ids(t);
  out->set_ignore_eos(in.ignore_eos);
  if (in.logprobs) out->set_logprobs(*in.logprobs);
  out->set_n(in.n);
  out->set_json_object(in.json_object);
  TESSERA_CHECK(in.priority >= INT32_MIN && in.priority <= INT32_MAX, InvalidArgument,
                "SamplingParams.priority ", in.priority, " is not an int32");
  out->set_priority(static_cast<int32_t>(in.priority));
}

// The engine request a message asks for (the chat template applied here).
GenerateRequest request_from_proto(const pb::GenerateRequest& in, const Engine& engine) {
  GenerateRequest r;
  switch (in.prompt_case()) {
    case pb::GenerateRequest::kText:
      r.prompt_text = in.text();
      break;
    case pb::GenerateRequest::kTokens:
      r.prompt_tokens.assign(in.tokens().ids().begin(), in.tokens().ids().end());
      break;
    case pb::GenerateRequest::kChat: {
      std::vector<nn::ChatMessage> messages;
      for (const auto& m : in.chat().messages()) messages.push_back({m.role(), m.content()});
      TESSERA_CHECK(!messages.empty(), InvalidArgument, "GenerateRequest.chat has no messages");
      r.prompt_text = engine.apply_chat_template(messages);
      break;
    }
    case pb::GenerateRequest::PROMPT_NOT_SET:
      throw InvalidArgument("GenerateRequest has no prompt (set text, tokens or chat)");
  }
  sampling_from_proto(in.params(), &r.params);
  r.adapter = in.adapter();
  r.echo = in.echo();
  r.cache_salt = in.cache_salt();
  return r;
}

void request_to_proto(const GenerateRequest& in, pb::GenerateRequest* out) {
  TESSERA_CHECK(in.prompt_text.empty() || in.prompt_tokens.empty(), InvalidArgument,
                "GenerateRequest: set prompt_text or prompt_tokens, not both");
  if (!in.prompt_tokens.empty()) {
    for (int64_t t : in.prompt_tokens) out->mutable_tokens()->add_ids(t);
  } else {
    out->set_text(in.prompt_text);
  }
  sampling_to_proto(in.params, out->mutable_params());
  out->set_adapter(in.adapter);
  out->set_echo(in.echo);
  out->set_cache_salt(in.cache_salt);
}

void event_to_proto(const TokenEvent& e, pb::GenerateResponse* out) {
  out->set_request_id(e.request_id);
  out->set_index(e.index);
  for (int64_t t : e.tokens) out->add_tokens(t);
  out->set_text(e.text);
  for (double l : e.logprobs) out->add_logprobs(l);
  for (const auto& alternatives : e.top_logprobs) {
    auto* list = out->add_top_logprobs();
    for (const auto& a : alternatives) {
      auto* entry = list->add_entries();
      entry->set_token(a.token);
      entry->set_text(a.text);
      entry->set_logprob(a.logprob);
    }
  }
  out->set_finished(e.finished);
  out->set_finish_reason(e.finish_reason);
  out->set_prompt_tokens(e.prompt_tokens);
  out->set_completion_tokens(e.completion_tokens);
  out->set_ttft_seconds(e.ttft_seconds);
}

TokenEvent event_from_proto(const pb::GenerateResponse& in) {
  TokenEvent e;
  e.request_id = in.request_id();
  e.index = in.index();
  e.tokens.assign(in.tokens().begin(), in.tokens().end());
  e.text = in.text();
  e.logprobs.assign(in.logprobs().begin(), in.logprobs().end());
  for (const auto& list : in.top_logprobs()) {
    std::vector<TopLogprob> alternatives;
    for (const auto& a : list.entries()) alternatives.push_back({a.token(), a.text(), a.logprob()});
    e.top_logprobs.push_back(std::move(alternatives));
  }
  e.finished = in.finished();
  e.finish_reason = in.finish_reason();
  e.prompt_tokens = in.prompt_tokens();
  e.completion_tokens = in.completion_tokens();
  e.ttft_seconds = in.ttft_seconds();
  return e;
}

// Events of one call's request, queued by the engine thread and written by
// the call's handler thread. Shared: a cancelled request's last events may
// arrive after the handler has returned.
struct EventQueue {
  std::mutex mu;  // guards events
  std::condition_variable cv;
  std::deque<TokenEvent> events;
};

class GenerationService final : public pb::Generation::Service {
 public:
  GenerationService(Engine& engine, const GrpcServerOptions& options)
      : engine_(engine), options_(options) {}

  grpc::Status Generate(grpc::ServerContext* ctx, const pb::GenerateRequest* req,
                        grpc::ServerWriter<pb::GenerateResponse>* writer) override {
    if (!authorized(*ctx)) return unauthenticated();
    if (in_flight_.fetch_add(1) >= options_.max_concurrent_requests) {
      in_flight_.fetch_sub(1);
      return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                          "the server is at its limit of " +
                              std::to_string(options_.max_concurrent_requests) +
                              " concurrent Generate calls");
    }
    bool cancelled = false;
    grpc::Status status = rpc::guard([&] { cancelled = !stream(ctx, *req, writer); });
    in_flight_.fetch_sub(1);
    if (cancelled) return grpc::Status(grpc::StatusCode::CANCELLED, "cancelled by the client");
    return status;
  }

  grpc::Status Tokenize(grpc::ServerContext* ctx, const pb::TokenizeRequest* req,
                        pb::TokenizeReply* reply) override {
    if (!authorized(*ctx)) return unauthenticated();
    return rpc::guard([&] {
      for (int64_t t : engine_.tokenize(req->text())) reply->add_ids(t);
    });
  }

  grpc::Status Info(grpc::ServerContext* ctx, const pb::InfoRequest*,
                    pb::InfoReply* reply) override {
    if (!authorized(*ctx)) return unauthenticated();
    return rpc::guard([&] {
      reply->set_model_name(engine_.model_name());
      reply->set_max_model_len(engine_.max_model_len());
      reply->set_vocab_size(engine_.vocab_size());
      for (const auto& a : engine_.adapters()) reply->add_adapters(a);
      reply->set_serving(engine_.accepting());
    });
  }

 private:
  bool authorized(const grpc::ServerContext& ctx) const {
    if (options_.api_key.empty()) return true;
    const auto& md = ctx.client_metadata();
    auto it = md.find("authorization");
    if (it == md.end()) return false;
    return std::string(it->second.data(), it->second.size()) == "Bearer " + options_.api_key;
  }

  static grpc::Status unauthenticated() {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        "missing or wrong API key (metadata authorization: Bearer <key>)");
  }

  // Runs one request, writing its events as they come. False when the
  // client went away first (the request is then cancelled).
  bool stream(grpc::ServerContext* ctx, const pb::GenerateRequest& req,
              grpc::ServerWriter<pb::GenerateResponse>* writer) {
    const GenerateRequest request = request_from_proto(req, engine_);
    auto queue = std::make_shared<EventQueue>();
    RequestHandle handle = engine_.submit(request, [queue](const TokenEvent& e) {
      {
        std::lock_guard<std::mutex> lock(queue->mu);
        queue->events.push_back(e);
      }
      queue->cv.notify_one();
    });
    const int64_t samples = request.params.n;
    int64_t finished = 0;
    std::deque<TokenEvent> batch;
    while (finished < samples) {
      {
        std::unique_lock<std::mutex> lock(queue->mu);
        queue->cv.wait_for(lock, kPollInterval, [&] { return !queue->events.empty(); });
        batch.swap(queue->events);
      }
      if (ctx->IsCancelled()) {
        engine_.cancel(handle.id());
        return false;
      }
      for (const TokenEvent& e : batch) {
        pb::GenerateResponse message;
        event_to_proto(e, &message);
        if (!writer->Write(message)) {
          engine_.cancel(handle.id());
          return false;
        }
        if (e.finished) ++finished;
      }
      batch.clear();
    }
    return true;
  }

  Engine& engine_;
  const GrpcServerOptions options_;
  std::atomic<int64_t> in_flight_{0};
};

}  // namespace

// ---------------------------------------------------------------- server

struct GrpcServer::Impl {
  std::unique_ptr<GenerationService> service;
  rpc::Server server;
  std::once_flag stopped;
};

GrpcServer::GrpcServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

std::unique_ptr<GrpcServer> GrpcServer::start(Engine& engine, const GrpcServerOptions& options) {
  TESSERA_CHECK(options.max_concurrent_requests > 0, InvalidArgument,
                "GrpcServerOptions.max_concurrent_requests must be positive, got ",
                options.max_concurrent_requests);
  TESSERA_CHECK(options.max_message_bytes > 0, InvalidArgument,
                "GrpcServerOptions.max_message_bytes must be positive, got ",
                options.max_message_bytes);
  auto impl = std::make_unique<Impl>();
  impl->service = std::make_unique<GenerationService>(engine, options);
  impl->server = rpc::Server::start({impl->service.get()},
                                    {options.host, options.port, options.max_message_bytes});
  return std::unique_ptr<GrpcServer>(new GrpcServer(std::move(impl)));
}

GrpcServer::~GrpcServer() { shutdown(std::chrono::seconds(1)); }

int GrpcServer::port() const { return impl_->server.port(); }

std::string GrpcServer::address() const { return impl_->server.address(); }

void GrpcServer::shutdown(std::chrono::milliseconds grace) {
  std::call_once(impl_->stopped, [&] { impl_->server.shutdown(grace); });
}

// ---------------------------------------------------------------- client

struct GenerationClient::Impl {
  std::string address;
  GenerationClientOptions options;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<pb::Generation::Stub> stub;

  void prepare(grpc::ClientContext& ctx) const {
    if (!options.api_key.empty()) ctx.AddMetadata("authorization", "Bearer " + options.api_key);
    if (options.timeout.count() > 0) rpc::set_deadline(ctx, options.timeout);
  }

  void run(const pb::GenerateRequest& req, const EventHandler& on_event) const {
    grpc::ClientContext ctx;
    prepare(ctx);
    auto reader = stub->Generate(&ctx, req);
    pb::GenerateResponse message;
    while (reader->Read(&message)) {
      if (on_event && !on_event(event_from_proto(message))) {
        ctx.TryCancel();
        while (reader->Read(&message)) {
        }
        reader->Finish();
        return;
      }
    }
    rpc::check(reader->Finish(), "Generate", address);
  }
};

GenerationClient::GenerationClient(const std::string& address, GenerationClientOptions options)
    : impl_(std::make_unique<Impl>()) {
  impl_->address = address;
  impl_->options = std::move(options);
  impl_->channel = rpc::channel(address, {impl_->options.max_message_bytes});
  impl_->stub = pb::Generation::NewStub(impl_->channel);
}

GenerationClient::~GenerationClient() = default;

const std::string& GenerationClient::address() const { return impl_->address; }

void GenerationClient::generate(const GenerateRequest& request, const EventHandler& on_event) {
  pb::GenerateRequest req;
  request_to_proto(request, &req);
  impl_->run(req, on_event);
}

void GenerationClient::generate_chat(const std::vector<nn::ChatMessage>& messages,
                                     const GenerateRequest& request, const EventHandler& on_event) {
  TESSERA_CHECK(request.prompt_text.empty() && request.prompt_tokens.empty(), InvalidArgument,
                "generate_chat: the prompt comes from the messages; the request must have none");
  pb::GenerateRequest req;
  request_to_proto(request, &req);
  auto* chat = req.mutable_chat();  // replaces the (empty) text prompt
  for (const auto& m : messages) {
    auto* out = chat->add_messages();
    out->set_role(m.role);
    out->set_content(m.content);
  }
  impl_->run(req, on_event);
}

namespace {

// Gathers a request's events into one Completion per sample.
GenerationClient::EventHandler collector(std::vector<Completion>& out) {
  return [&out](const TokenEvent& e) {
    if (e.index >= static_cast<int64_t>(out.size())) out.resize(e.index + 1);
    Completion& c = out[e.index];
    if (e.completion_tokens > 0) {  // an echo event carries the prompt only
      c.tokens.insert(c.tokens.end(), e.tokens.begin(), e.tokens.end());
      c.text += e.text;
      c.logprobs.insert(c.logprobs.end(), e.logprobs.begin(), e.logprobs.end());
    }
    c.prompt_tokens = e.prompt_tokens;
    if (e.ttft_seconds > 0) c.ttft_seconds = e.ttft_seconds;
    if (e.finished) c.finish_reason = e.finish_reason;
    return true;
  };
}

}  // namespace

std::vector<Completion> GenerationClient::complete(const GenerateRequest& request) {
  std::vector<Completion> out;
  generate(request, collector(out));
  return out;
}

std::vector<Completion> GenerationClient::chat(const std::vector<nn::ChatMessage>& messages,
                                               const SamplingParams& params,
                                               const std::string& adapter) {
  GenerateRequest request;
  request.params = params;
  request.adapter = adapter;
  std::vector<Completion> out;
  generate_chat(messages, request, collector(out));
  return out;
}

std::vector<int64_t> GenerationClient::tokenize(const std::string& text) {
  grpc::ClientContext ctx;
  impl_->prepare(ctx);
  pb::TokenizeRequest req;
  req.set_text(text);
  pb::TokenizeReply reply;
  rpc::check(impl_->stub->Tokenize(&ctx, req, &reply), "Tokenize", impl_->address);
  return {reply.ids().begin(), reply.ids().end()};
}

ServerInfo GenerationClient::info() {
  grpc::ClientContext ctx;
  impl_->prepare(ctx);
  pb::InfoReply reply;
  rpc::check(impl_->stub->Info(&ctx, pb::InfoRequest(), &reply), "Info", impl_->address);
  ServerInfo info;
  info.model_name = reply.model_name();
  info.max_model_len = reply.max_model_len();
  info.vocab_size = reply.vocab_size();
  info.adapters.assign(reply.adapters().begin(), reply.adapters().end());
  info.serving = reply.serving();
  return info;
}

}  // namespace tessera::serve
