#include "tessera/eval/http_backend.h"

#include <httplib.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <future>
#include <limits>
#include <mutex>
#include <optional>
#include <sstream>
#include <thread>

#include "prompt_tokens.h"
#include "tessera/core/error.h"
#include "tessera/core/log.h"
#include "tessera/core/metrics.h"
#include "tessera/core/thread_pool.h"
#include "utf8.h"

namespace tessera::eval {

using nlohmann::json;

namespace {

// OpenAI's /v1/chat/completions and /v1/completions take at most four stop
// strings; the rest are applied to the answer here.
constexpr size_t kMaxStopStrings = 4;

struct Endpoint {
  std::string scheme_host_port;  // "http://127.0.0.1:8080"
  std::string prefix;            // "/v1" or "/openai/v1"
};

Endpoint parse_url(const std::string& url) {
  const size_t scheme_end = url.find("://");
  TESSERA_CHECK(scheme_end != std::string::npos, InvalidArgument, "endpoint URL '", url,
                "' has no scheme (expected http://host:port[/v1])");
  const std::string scheme = url.substr(0, scheme_end);
  TESSERA_CHECK(scheme == "http" || scheme == "https", InvalidArgument, "endpoint URL '", url,
                "': scheme '", scheme, "' is not http or https");
  const size_t path_start = url.find('/', scheme_end + 3);
  Endpoint e;
  e.scheme_host_port = url.substr(0, path_start);
  TESSERA_CHECK(e.scheme_host_port.size() > scheme_end + 3, InvalidArgument, "endpoint URL '", url,
                "' has no host");
  std::string path = path_start == std::string::npos ? "" : url.substr(path_start);
  while (!path.empty() && path.back() == '/') path.pop_back();
  if (path.size() < 3 || path.compare(path.size() - 3, 3, "/v1") != 0) path += "/v1";
  e.prefix = path;
  return e;
}

// A field of a JSON answer, or DataLoss naming the URL and the path.
const json& field(const json& j, const std::string& key, const std::string& where,
                  const std::string& path) {
  TESSERA_CHECK(j.is_object() && j.contains(key), DataLoss, where, ": the answer has no '",
                path.empty() ? key : path + "." + key, "'");
  return j.at(key);
}

// The number of a JSON value that must be a number.
double number(const json& j, const std::string& where, const std::string& what) {
  TESSERA_CHECK(j.is_number(), DataLoss, where, ": ", what, " is not a number (", j.dump(), ")");
  return j.get<double>();
}

}  // namespace

LoglikelihoodResult parse_echo_logprobs(const std::string& body, int64_t n_context,
                                        int64_t n_prompt_tokens, int64_t context_chars,
                                        int64_t prompt_chars, const std::string& where) {
  json answer;
  try {
    answer = json::parse(body);
  } catch (const json::exception& e) {
    TESSERA_THROW(DataLoss, where, ": the answer is not JSON (", e.what(),
                  "): ", body.substr(0, 200));
  }
  const json& choices = field(answer, "choices", where, "");
  TESSERA_CHECK(choices.is_array() && !choices.empty(), DataLoss, where,
                ": 'choices' is not a non-empty list");
  const json& logprobs = field(choices[0], "logprobs", where, "choices[0]");
  TESSERA_CHECK(logprobs.is_object(), DataLoss, where,
                ": choices[0].logprobs is null: the server did not return log-probabilities");
  const json& token_logprobs = field(logprobs, "token_logprobs", where, "choices[0].logprobs");
  const json& top_logprobs = field(logprobs, "top_logprobs", where, "choices[0].logprobs");
  TESSERA_CHECK(
      token_logprobs.is_array() && top_logprobs.is_array() &&
          top_logprobs.size() == token_logprobs.size(),
      DataLoss, where,
      ": choices[0].logprobs.token_logprobs and top_logprobs are not lists of one length");
  const int64_t n = static_cast<int64_t>(token_logprobs.size());

  // Which entries are the continuation's.
  int64_t begin = 0, end = 0;
  if (n_prompt_tokens >= 0) {
    // Token prompts: the echoed prompt is followed by the generated tokens
    // (usage.completion_tokens, 1 for max_tokens 1 when usage is absent); a
    // server may drop a leading BOS from the echo, so count from the end.
    int64_t generated = 1;
    if (answer.contains("usage") && answer["usage"].is_object() &&
        answer["usage"].contains("completion_tokens")) {
      generated = static_cast<int64_t>(
          number(answer["usage"]["completion_tokens"], where, "usage.completion_tokens"));
    }
    end = n - generated;
    begin = end - (n_prompt_tokens - n_context);
    TESSERA_CHECK(begin >= 1 && end <= n && end > begin, DataLoss, where, ": the answer echoes ", n,
                  " tokens (", generated, " generated) but the prompt had ", n_prompt_tokens,
                  " of which ", n_prompt_tokens - n_context, " are the continuation");
  } else {
    const json& offsets = field(logprobs, "text_offset", where, "choices[0].logprobs");
    TESSERA_CHECK(offsets.is_array() && static_cast<int64_t>(offsets.size()) == n, DataLoss, where,
                  ": choices[0].logprobs.text_offset is not a list as long as token_logprobs");
    begin = n;
    end = 0;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t off = static_cast<int64_t>(number(offsets[i], where, "text_offset"));
      if (off >= context_chars && off < prompt_chars) {
        begin = std::min(begin, i);
        end = std::max(end, i + 1);
      }
    }
    TESSERA_CHECK(begin < end && begin >= 1, DataLoss, where,
                  ": no echoed token starts inside the continuation (characters ", context_chars,
                  "..", prompt_chars, " of the prompt); does the server echo the prompt?");
  }

  LoglikelihoodResult r;
  r.is_greedy = true;
  for (int64_t i = begin; i < end; ++i) {
    const std::string what = "token_logprobs[" + std::to_string(i) + "]";
    const double lp = number(token_logprobs[i], where, what);
    r.logprob += lp;
    const json& top = top_logprobs[i];
    TESSERA_CHECK(top.is_object() && !top.empty(), DataLoss, where, ": top_logprobs[", i,
                  "] is not an object of token log-probabilities");
    double best = -std::numeric_limits<double>::infinity();
    for (const auto& [token, value] : top.items()) {
      best = std::max(best, number(value, where, "top_logprobs[" + std::to_string(i) + "]"));
    }
    // The scored token is greedy when no listed token is more likely.
    if (lp < best) r.is_greedy = false;
  }
  return r;
}

struct HttpBackend::Impl {
  HttpBackendOptions options;
  Endpoint endpoint;
  std::string model;
  std::optional<detail::TokenizerFiles> tokenizer;
  bool chat_generation = true;
  bool chat_likelihood = false;
  std::once_flag plain_likelihood_warning;

  std::string url(const std::string& path) const {
    return endpoint.scheme_host_port + endpoint.prefix + path;
  }

  // One HTTP request with retries. Returns the body of a 200 answer.
  std::string send(const std::string& method, const std::string& path, const std::string& body) {
    const std::string where = url(path);
    std::chrono::milliseconds backoff = options.retry_backoff;
    std::string last_error;
    bool timed_out = false;
    for (int attempt = 0; attempt <= options.max_retries; ++attempt) {
      if (attempt > 0) {
        TESSERA_LOG(Warn, "eval") << where << ": " << last_error << "; retry " << attempt << " of "
                                  << options.max_retries << " in " << backoff.count() << " ms";
        std::this_thread::sleep_for(backoff);
        backoff *= 2;
      }
      httplib::Client client(endpoint.scheme_host_port);
      const auto seconds = std::chrono::duration_cast<std::chrono::seconds>(options.timeout);
      const auto micros =
          std::chrono::duration_cast<std::chrono::microseconds>(options.timeout - seconds);
      client.set_connection_timeout(seconds.count(), micros.count());
      client.set_read_timeout(seconds.count(), micros.count());
      client.set_write_timeout(seconds.count(), micros.count());
      httplib::Headers headers;
      if (!options.api_key.empty()) {
        headers.emplace("Authorization", "Bearer " + options.api_key);
      }
      const Stopwatch watch;
      httplib::Result res =
          method == "GET" ? client.Get(endpoint.prefix + path, headers)
                          : client.Post(endpoint.prefix + path, headers, body, "application/json");
      if (!res) {
        const httplib::Error err = res.error();
        timed_out = err == httplib::Error::ConnectionTimeout ||
                    (err == httplib::Error::Read &&
                     watch.seconds() * 1000 >= 0.9 * static_cast<double>(options.timeout.count()));
        last_error = timed_out
                         ? "no answer within " + std::to_string(options.timeout.count()) + " ms"
                         : "request failed (" + httplib::to_string(err) + ")";
        continue;
      }
      timed_out = false;
      if (res->status == 200) return res->body;
      // The server's own message, when it sent one.
      std::string message = res->body.substr(0, 500);
      try {
        const json j = json::parse(res->body);
        if (j.contains("error")) {
          const json& e = j["error"];
          message = e.is_object() && e.contains("message") && e["message"].is_string()
                        ? e["message"].get<std::string>()
                        : e.dump();
        }
      } catch (const json::exception&) {
      }
      if (message.size() > 500) message = message.substr(0, 500) + "...";
      last_error = "HTTP " + std::to_string(res->status) + ": " + message;
      const bool transient = res->status == 408 || res->status == 429 || res->status >= 500;
      if (!transient) TESSERA_THROW(InvalidArgument, where, ": ", last_error);
    }
    if (timed_out) {
      TESSERA_THROW(DeadlineExceeded, where, ": ", last_error, " (after ", options.max_retries,
                    " retries)");
    }
    TESSERA_THROW(Unavailable, where, ": ", last_error, " (after ", options.max_retries,
                  " retries)");
  }

  // Runs `fn(i)` for i in [0, n), `concurrency` at a time; the first error
  // (in request order) propagates once all have finished.
  template <typename T, typename Fn>
  std::vector<T> run_all(size_t n, Fn fn) {
    std::vector<T> out(n);
    if (n == 0) return out;
    ThreadPool pool(std::min<size_t>(n, static_cast<size_t>(options.concurrency)));
    std::vector<std::future<T>> futures;
    futures.reserve(n);
    for (size_t i = 0; i < n; ++i) futures.push_back(pool.submit([&fn, i] { return fn(i); }));
    std::exception_ptr first;
    for (size_t i = 0; i < n; ++i) {
      try {
        out[i] = futures[i].get();
      } catch (...) {
        if (!first) first = std::current_exception();
      }
    }
    if (first) std::rethrow_exception(first);
    return out;
  }

  std::string generate_one(const GenerateRequest& r) {
    json body;
    body["model"] = model;
    body["max_tokens"] = r.max_gen_toks;
    const bool greedy = !r.do_sample || r.temperature <= 0;
    body["temperature"] = greedy ? 0.0 : r.temperature;
    body["seed"] = options.seed;
    json stop = json::array();
    for (const std::string& s : r.until) {
      if (!s.empty() && stop.size() < kMaxStopStrings) stop.push_back(s);
    }
    if (!stop.empty()) body["stop"] = stop;
    std::string path;
    if (chat_generation) {
      path = "/chat/completions";
      json messages = json::array();
      for (const ChatMessage& m : r.messages) {
        messages.push_back({{"role", chat_role_name(m.role)}, {"content", m.content}});
      }
      body["messages"] = messages;
    } else {
      path = "/completions";
      body["prompt"] = r.context;
    }
    const std::string where = url(path);
    const std::string answer_text = send("POST", path, body.dump());
    json answer;
    try {
      answer = json::parse(answer_text);
    } catch (const json::exception& e) {
      TESSERA_THROW(DataLoss, where, ": the answer is not JSON (", e.what(), ")");
    }
    const json& choices = field(answer, "choices", where, "");
    TESSERA_CHECK(choices.is_array() && !choices.empty(), DataLoss, where,
                  ": 'choices' is not a non-empty list");
    std::string text;
    if (chat_generation) {
      const json& message = field(choices[0], "message", where, "choices[0]");
      const json& content = field(message, "content", where, "choices[0].message");
      TESSERA_CHECK(content.is_string() || content.is_null(), DataLoss, where,
                    ": choices[0].message.content is not a string");
      if (content.is_string()) text = content.get<std::string>();
    } else {
      const json& t = field(choices[0], "text", where, "choices[0]");
      TESSERA_CHECK(t.is_string(), DataLoss, where, ": choices[0].text is not a string");
      text = t.get<std::string>();
    }
    const size_t cut = detail::first_stop(text, r.until);
    if (cut != std::string::npos) text.resize(cut);
    return text;
  }

  LoglikelihoodResult loglikelihood_one(const LoglikelihoodRequest& r, size_t index) {
    if (!chat_likelihood && chat_generation && options.chat_template != ChatTemplateMode::kOff) {
      std::call_once(
          plain_likelihood_warning, [&] {
            TESSERA_LOG(Warn, "eval")
                << url("/completions")
                << ": log-likelihoods use plain prompts (no chat template is known here; pass the "
                   "model's tokenizer to score with its template)";
          });
    }
    const detail::TextPair pair = detail::loglikelihood_text(
        r, chat_likelihood, tokenizer ? tokenizer->chat_template : std::string());
    json body;
    body["model"] = model;
    body["max_tokens"] = 1;
    body["temperature"] = 0.0;
    body["logprobs"] = 1;
    body["echo"] = true;
    body["seed"] = options.seed;
    int64_t n_context = 0, n_prompt = -1, context_chars = 0, prompt_chars = 0;
    if (tokenizer) {
      const detail::ScoredTokens s =
          detail::encode_pair(tokenizer->tokenizer, tokenizer->add_bos, pair, index);
      body["prompt"] = s.tokens;
      n_context = static_cast<int64_t>(s.context);
      n_prompt = static_cast<int64_t>(s.tokens.size());
    } else {
      TESSERA_CHECK(!pair.context.empty(), InvalidArgument, "loglikelihood: request ", index,
                    " has an empty context; scoring it through ", url("/completions"),
                    " needs the model's tokenizer");
      body["prompt"] = pair.context + pair.continuation;
      context_chars = static_cast<int64_t>(utf8::length(pair.context));
      prompt_chars = context_chars + static_cast<int64_t>(utf8::length(pair.continuation));
    }
    const std::string answer = send("POST", "/completions", body.dump());
    return parse_echo_logprobs(answer, n_context, n_prompt, context_chars, prompt_chars,
                               url("/completions"));
  }
};

HttpBackend::HttpBackend(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
HttpBackend::~HttpBackend() = default;

std::unique_ptr<HttpBackend> HttpBackend::create(const HttpBackendOptions& options) {
  TESSERA_CHECK(options.concurrency >= 1, InvalidArgument,
                "HttpBackend: concurrency must be at least 1, got ", options.concurrency);
  TESSERA_CHECK(options.max_retries >= 0, InvalidArgument,
                "HttpBackend: max_retries must not be negative, got ", options.max_retries);
  TESSERA_CHECK(options.timeout.count() > 0, InvalidArgument,
                "HttpBackend: timeout must be positive");
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  impl->endpoint = parse_url(options.base_url);
  if (!options.tokenizer_path.empty()) {
    impl->tokenizer = detail::load_tokenizer_files(options.tokenizer_path);
  }
  const bool have_template = impl->tokenizer && !impl->tokenizer->chat_template.empty();
  switch (options.chat_template) {
    case ChatTemplateMode::kAuto:
      impl->chat_generation = true;
      impl->chat_likelihood = have_template;
      break;
    case ChatTemplateMode::kOn:
      impl->chat_generation = true;
      impl->chat_likelihood = have_template;
      break;
    case ChatTemplateMode::kOff:
      impl->chat_generation = false;
      impl->chat_likelihood = false;
      break;
  }
  if (impl->chat_likelihood) {
    // Fails early (InvalidArgument) for templates other than ChatML.
    (void)nn::format_chat(impl->tokenizer->chat_template, {{"user", "x"}});
  }
  impl->model = options.model;
  if (impl->model.empty()) {
    const std::string where = impl->url("/models");
    const std::string text = impl->send("GET", "/models", "");
    json answer;
    try {
      answer = json::parse(text);
    } catch (const json::exception& e) {
      TESSERA_THROW(DataLoss, where, ": the answer is not JSON (", e.what(), ")");
    }
    const json& data = field(answer, "data", where, "");
    TESSERA_CHECK(data.is_array() && !data.empty(), DataLoss, where,
                  ": the server lists no models; pass the model name");
    const json& id = field(data[0], "id", where, "data[0]");
    TESSERA_CHECK(id.is_string(), DataLoss, where, ": data[0].id is not a string");
    impl->model = id.get<std::string>();
  }
  auto backend = std::unique_ptr<HttpBackend>(new HttpBackend(std::move(impl)));
  TESSERA_LOG(Info, "eval") << "HTTP backend: " << backend->describe();
  return backend;
}

std::vector<std::string> HttpBackend::generate(const std::vector<GenerateRequest>& requests) {
  return impl_->run_all<std::string>(requests.size(),
                                     [&](size_t i) { return impl_->generate_one(requests[i]); });
}

std::vector<LoglikelihoodResult> HttpBackend::loglikelihood(
    const std::vector<LoglikelihoodRequest>& requests) {
  if (impl_->options.chat_template == ChatTemplateMode::kOn && !impl_->chat_likelihood) {
    TESSERA_THROW(InvalidArgument, impl_->url("/completions"),
                  ": log-likelihoods with the chat template need the model's tokenizer "
                  "(its chat template renders the prompt here)");
  }
  return impl_->run_all<LoglikelihoodResult>(
      requests.size(), [&](size_t i) { return impl_->loglikelihood_one(requests[i], i); });
}

const std::string& HttpBackend::model_name() const { return impl_->model; }

std::string HttpBackend::describe() const {
  std::ostringstream d;
  d << impl_->endpoint.scheme_host_port << impl_->endpoint.prefix << ", model " << impl_->model
    << ", generation " << (impl_->chat_generation ? "chat" : "completions") << ", log-likelihoods "
    << (impl_->chat_likelihood ? "chat template" : "plain");
  if (!impl_->options.tokenizer_path.empty()) d << ", tokenizer " << impl_->options.tokenizer_path;
  return d.str();
}

}  // namespace tessera::eval
