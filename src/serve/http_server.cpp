#include "tessera/serve/http_server.h"

#include <httplib.h>
#include <nlohmann/json.hpp>

#include <atomic>
#include <condition_variable>
#include <ctime>
#include <deque>
#include <filesystem>
#include <mutex>
#include <random>
#include <thread>

#include "openai_protocol.h"
#include "tessera/core/error.h"
#include "tessera/core/log.h"
#include "tessera/core/metrics.h"
#include "tessera/serve/engine.h"

namespace tessera::serve {
namespace {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

int status_of(const Error& e) {
  switch (e.code()) {
    case ErrorCode::kInvalidArgument:
      return 400;
    case ErrorCode::kNotFound:
      return 404;
    case ErrorCode::kResourceExhausted:
      return 429;
    case ErrorCode::kUnavailable:
    case ErrorCode::kFailedPrecondition:
      return 503;
    default:
      return 500;
  }
}

void send_error(httplib::Response& res, int status, const std::string& message,
                const std::string& param = "") {
  res.status = status;
  res.set_content(openai::error_body(status, message, param), "application/json");
}

// The events of one HTTP request's engine requests (one per prompt), queued
// by the engine thread and consumed by the connection's thread.
struct Exchange {
  std::mutex mu;  // guards everything below
  std::condition_variable cv;
  std::deque<std::pair<int64_t, TokenEvent>> events;  // (choice index, event)
  int64_t finished = 0;
};

}  // namespace

struct HttpServer::Impl {
  Engine& engine;
  HttpServerOptions options;
  httplib::Server server;
  std::thread listener;
  int port = 0;
  std::atomic<bool> draining{false};
  std::atomic<int64_t> in_flight{0};
  std::atomic<uint64_t> next_id{1};
  uint64_t id_salt = 0;
  std::once_flag stopped;
  std::mutex done_mu;  // guards done
  std::condition_variable done_cv;
  bool done = false;  // the listener has returned

  Impl(Engine& e, HttpServerOptions o) : engine(e), options(std::move(o)) {
    std::random_device rd;
    id_salt = (static_cast<uint64_t>(rd()) << 32) ^ rd();
  }

  std::string new_id(const char* prefix) {
    char buf[40];
    std::snprintf(
        buf, sizeof(buf), "%s-%016llx", prefix,
        static_cast<unsigned long long>(id_salt ^ (next_id.fetch_add(1) * 0x9E3779B97F4A7C15ULL)));
    return buf;
  }

  bool authorized(const httplib::Request& req) const {
    if (options.api_key.empty()) return true;
    return req.get_header_value("Authorization") == "Bearer " + options.api_key;
  }

  void routes();
  void generate(openai::Endpoint endpoint, const httplib::Request& req, httplib::Response& res);
  void adapter_route(bool load, const httplib::Request& req, httplib::Response& res);
};

void HttpServer::Impl::routes() {
  server.set_payload_max_length(static_cast<size_t>(options.max_request_bytes));
  // One thread per open connection (a stream holds one for its duration);
  // cpp-httplib takes ownership of the queue it is given.
  const size_t threads = static_cast<size_t>(options.threads);
  server.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  server.set_keep_alive_max_count(1000);
  // Idle keep-alive connections stay open longer than clients keep them in
  // their pools (httpx and aiohttp: 5 s, cpp-httplib's own default too):
  // when both sides give up at the same moment, a client can send a request
  // on a connection the server is closing and get no response.
  server.set_keep_alive_timeout(60);
  server.set_read_timeout(std::chrono::seconds(60));
  server.set_write_timeout(std::chrono::seconds(60));
  // The API key guards every route but /health.
  server.set_pre_routing_handler([this](const httplib::Request& req, httplib::Response& res) {
    if (req.path != "/health" && !authorized(req)) {
      send_error(res, 401, "missing or wrong API key (Authorization: Bearer <key>)");
      return httplib::Server::HandlerResponse::Handled;
    }
    return httplib::Server::HandlerResponse::Unhandled;
  });
  // Routes that do not exist, and bodies over the limit, get error objects.
  server.set_error_handler([](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return;
    if (res.status == 413) {
      send_error(res, 413, "request body over the server's limit");
    } else if (res.status == 404) {
      send_error(res, 404, "no route " + req.method + " " + req.path);
    } else {
      send_error(res, res.status, "HTTP error " + std::to_string(res.status));
    }
  });
  server.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
    if (draining) {
      send_error(res, 503, "draining");
      return;
    }
    res.set_content(R"({"status":"ok"})", "application/json");
  });
  server.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(engine.metrics().to_prometheus(), "text/plain; version=0.0.4");
  });
  server.Get("/v1/models", [this](const httplib::Request&, httplib::Response& res) {
    const int64_t created = static_cast<int64_t>(std::time(nullptr));
    json data = json::array();
    data.push_back({{"id", engine.model_name()},
                    {"object", "model"},
                    {"created", created},
                    {"owned_by", "tessera"},
                    {"max_model_len", engine.max_model_len()}});
    for (const auto& a : engine.adapters()) {
      data.push_back({{"id", a},
                      {"object", "model"},
                      {"created", created},
                      {"owned_by", "tessera"},
                      {"parent", engine.model_name()}});
    }
    res.set_content(openai::dump_json(json({{"object", "list"}, {"data", data}})),
                    "application/json");
  });
  server.Post("/v1/completions", [this](const httplib::Request& req, httplib::Response& res) {
    generate(openai::Endpoint::kCompletions, req, res);
  });
  server.Post("/v1/chat/completions", [this](const httplib::Request& req, httplib::Response& res) {
    generate(openai::Endpoint::kChat, req, res);
  });
  server.Post("/v1/load_lora_adapter", [this](const httplib::Request& req, httplib::Response& res) {
    adapter_route(true, req, res);
  });
  server.Post("/v1/unload_lora_adapter",
              [this](const httplib::Request& req, httplib::Response& res) {
                adapter_route(false, req, res);
              });
}

void HttpServer::Impl::adapter_route(bool load, const httplib::Request& req,
                                     httplib::Response& res) {
  if (!options.enable_adapter_loading) {
    send_error(res, 404,
               "adapter loading is disabled (start tessera-serve with --enable-adapter-loading)");
    return;
  }
  json j;
  try {
    j = json::parse(req.body);
  } catch (const json::parse_error&) {
    send_error(res, 400, "malformed JSON");
    return;
  }
  if (!j.is_object() || !j.contains("lora_name") || !j["lora_name"].is_string()) {
    send_error(res, 400, "'lora_name' (a string) is required", "lora_name");
    return;
  }
  const std::string name = j["lora_name"];
  try {
    if (!load) {
      engine.unload_adapter(name);
      res.set_content("Success: LoRA adapter '" + name + "' removed successfully.", "text/plain");
      return;
    }
    if (!j.contains("lora_path") || !j["lora_path"].is_string()) {
      send_error(res, 400, "'lora_path' (a string) is required", "lora_path");
      return;
    }
    // Adapters come only from under the configured root.
    namespace fs = std::filesystem;
    std::error_code ec;
    const fs::path root = fs::weakly_canonical(options.adapter_root, ec);
    const fs::path path = fs::weakly_canonical(fs::path(j["lora_path"].get<std::string>()), ec);
    const auto rel = path.lexically_relative(root);
    if (rel.empty() || rel.native().rfind("..", 0) == 0) {
      send_error(res, 400, "'lora_path' must lie under the server's adapter root", "lora_path");
      return;
    }
    engine.load_adapter(name, path.string());
    res.set_content("Success: LoRA adapter '" + name + "' added successfully.", "text/plain");
  } catch (const Error& e) {
    send_error(res, status_of(e), e.message());
  }
}

void HttpServer::Impl::generate(openai::Endpoint endpoint, const httplib::Request& req,
                                httplib::Response& res) {
  if (draining) {
    send_error(res, 503, "the server is draining and accepts no new requests");
    return;
  }
  if (in_flight.fetch_add(1) >= options.max_concurrent_requests) {
    in_flight.fetch_sub(1);
    send_error(res, 503,
               "too many requests in flight (limit " +
                   std::to_string(options.max_concurrent_requests) + ")");
    return;
  }
  // Counts the request until its response is written (the provider below
  // holds a copy).
  struct Release {
    std::atomic<int64_t>& n;
    ~Release() { n.fetch_sub(1); }
  };
  auto release = std::make_shared<Release>(Release{in_flight});

  openai::Parsed parsed;
  try {
    openai::ChatOptions chat_options;
    chat_options.local_media_root = options.allowed_local_media_path;
    chat_options.max_images = engine.max_images_per_request();
    parsed = openai::parse(endpoint, req.body, engine, options.max_choices, chat_options);
  } catch (const openai::BadRequest& b) {
    res.status = b.status;
    res.set_content(openai::error_body(b.status, b.message, b.param, b.type), "application/json");
    return;
  } catch (const Error& e) {
    send_error(res, status_of(e), e.message());
    return;
  }

  // Submit every prompt; the engine's callbacks queue events for this
  // connection. A request the engine refuses cancels those already queued.
  auto ex = std::make_shared<Exchange>();
  std::vector<RequestHandle> handles;
  const int64_t n = parsed.prompts.front().params.n;
  const int64_t choices = static_cast<int64_t>(parsed.prompts.size()) * n;
  try {
    for (size_t p = 0; p < parsed.prompts.size(); ++p) {
      const int64_t base = static_cast<int64_t>(p) * n;
      handles.push_back(engine.submit(parsed.prompts[p], [ex, base](const TokenEvent& e) {
        std::lock_guard<std::mutex> lock(ex->mu);
        ex->events.emplace_back(base + e.index, e);
        if (e.finished) ++ex->finished;
        ex->cv.notify_all();
      }));
    }
  } catch (const Error& e) {
    for (const auto& h : handles) engine.cancel(h.id());
    send_error(res, status_of(e), e.message());
    return;
  }

  const bool chat = endpoint == openai::Endpoint::kChat;
  const std::string id = new_id(chat ? "chatcmpl" : "cmpl");
  const int64_t created = static_cast<int64_t>(std::time(nullptr));
  auto parsed_ptr = std::make_shared<openai::Parsed>(std::move(parsed));
  auto cancel_all = [this, handles] {
    for (const auto& h : handles) engine.cancel(h.id());
  };
  // The response is written by a chunked content provider in both modes,
  // so that a client that goes away is noticed (the sink stops being
  // writable) and its requests are cancelled.
  auto provider = [this, ex, parsed_ptr, id, created, choices, cancel_all, release](
                      size_t, httplib::DataSink& sink) {
    const openai::Parsed& p = *parsed_ptr;
    std::vector<openai::Choice> acc(static_cast<size_t>(choices));
    std::vector<bool> started(static_cast<size_t>(choices), false);
    auto write = [&](const std::string& s) { return sink.write(s.data(), s.size()); };
    for (;;) {
      std::deque<std::pair<int64_t, TokenEvent>> batch;
      bool all_done = false;
      {
        std::unique_lock<std::mutex> lock(ex->mu);
        ex->cv.wait_for(lock, std::chrono::milliseconds(50), [&] { return !ex->events.empty(); });
        batch.swap(ex->events);
        all_done = ex->finished == choices && ex->events.empty();
      }
      for (auto& [index, e] : batch) {
        openai::Choice& c = acc[static_cast<size_t>(index)];
        c.text += e.text;
        c.tokens.insert(c.tokens.end(), e.tokens.begin(), e.tokens.end());
        c.logprobs.insert(c.logprobs.end(), e.logprobs.begin(), e.logprobs.end());
        c.top_logprobs.insert(c.top_logprobs.end(), e.top_logprobs.begin(), e.top_logprobs.end());
        c.prompt_tokens = e.prompt_tokens;
        c.completion_tokens = e.completion_tokens;
        if (e.finished) {
          c.finished = true;
          c.finish_reason = e.finish_reason;
        }
        if (p.stream) {
          const json chunk =
              openai::stream_chunk(p, id, created, index, e, !started[index], engine);
          started[static_cast<size_t>(index)] = true;
          if (!write("data: " + openai::dump_json(chunk) + "\n\n")) {
            cancel_all();
            return false;
          }
        }
      }
      if (all_done) break;
      if (!sink.is_writable()) {  // the client went away
        cancel_all();
        return false;
      }
    }
    if (p.stream) {
      if (p.include_usage)
        write("data: " + openai::dump_json(openai::usage_chunk(p, id, created, acc)) + "\n\n");
      write("data: [DONE]\n\n");
    } else {
      write(openai::dump_json(openai::full_response(p, id, created, acc, engine)));
    }
    sink.done();
    return true;
  };
  res.set_chunked_content_provider(parsed_ptr->stream ? "text/event-stream" : "application/json",
                                   provider, [cancel_all](bool success) {
                                     // Ended early (an error or the client left): stop generating.
                                     if (!success) cancel_all();
                                   });
}

std::unique_ptr<HttpServer> HttpServer::start(Engine& engine, const HttpServerOptions& options) {
  TESSERA_CHECK(options.threads >= 2 && options.max_concurrent_requests >= 1 &&
                    options.max_request_bytes >= 1024 && options.max_choices >= 1,
                InvalidArgument, "HttpServer: threads >= 2, limits positive, body limit >= 1 KiB");
  TESSERA_CHECK(
      !options.enable_adapter_loading || !options.adapter_root.empty(), InvalidArgument,
      "HttpServer: adapter loading needs an adapter root (the folders requests may name)");
  auto impl = std::make_unique<Impl>(engine, options);
  impl->routes();
  Impl& m = *impl;
  m.port = options.port == 0
               ? m.server.bind_to_any_port(options.host)
               : (m.server.bind_to_port(options.host, options.port) ? options.port : -1);
  TESSERA_CHECK(m.port > 0, Unavailable, "tessera-serve: cannot listen on ", options.host, ":",
                options.port);
  m.listener = std::thread([&m] {
    m.server.listen_after_bind();
    std::lock_guard<std::mutex> lock(m.done_mu);
    m.done = true;
    m.done_cv.notify_all();
  });
  TESSERA_LOG(Info, "serve") << "listening on http://" << options.host << ":" << m.port;
  return std::unique_ptr<HttpServer>(new HttpServer(std::move(impl)));
}

HttpServer::HttpServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

HttpServer::~HttpServer() { stop(); }

int HttpServer::port() const { return impl_->port; }

std::string HttpServer::url() const {
  return "http://" + impl_->options.host + ":" + std::to_string(impl_->port);
}

bool HttpServer::drain(std::chrono::milliseconds deadline) {
  impl_->draining = true;
  const bool finished = impl_->engine.drain(deadline);
  // The connections write their last bytes (aborted requests end with
  // finish_reason "abort").
  const auto until = Clock::now() + std::chrono::seconds(5);
  while (impl_->in_flight > 0 && Clock::now() < until)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  stop();
  return finished;
}

void HttpServer::stop() {
  std::call_once(impl_->stopped, [this] {
    impl_->server.stop();
    if (impl_->listener.joinable()) impl_->listener.join();
  });
}

void HttpServer::wait() {
  std::unique_lock<std::mutex> lock(impl_->done_mu);
  impl_->done_cv.wait(lock, [this] { return impl_->done; });
}

}  // namespace tessera::serve
