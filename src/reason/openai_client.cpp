// OpenAiClient: a ModelClient over an OpenAI-compatible chat endpoint
// (cpp-httplib, Debian's libcpp-httplib-dev; the same library tessera-serve
// and tessera-eval's HTTP backend use).
#include <httplib.h>

#include <nlohmann/json.hpp>

#include "tessera/core/base64.h"
#include "tessera/core/error.h"
#include "tessera/core/metrics.h"
#include "tessera/reason/model_client.h"

namespace tessera::reason {
namespace {

using json = nlohmann::json;

class HttpChatClient final : public ModelClient {
 public:
  explicit HttpChatClient(const OpenAiClientOptions& o) : options_(o) {
    std::string base = o.base_url;
    while (!base.empty() && base.back() == '/') base.pop_back();
    if (base.size() >= 3 && base.compare(base.size() - 3, 3, "/v1") == 0) {
      base.resize(base.size() - 3);
    }
    const size_t scheme = base.find("://");
    TESSERA_CHECK(base.rfind("http://", 0) == 0 && base.size() > 7, InvalidArgument,
                  "OpenAiClient: base_url '", o.base_url,
                  "' must be http://host:port (https is not built in)");
    const size_t path = base.find('/', scheme + 3);
    host_ = base.substr(0, path);
    prefix_ = path == std::string::npos ? "" : base.substr(path);
    TESSERA_CHECK(o.timeout_seconds > 0, InvalidArgument,
                  "OpenAiClient: timeout_seconds must be > 0");
    model_ = o.model;
    if (model_.empty()) {
      const json models = json::parse(send("GET", "/v1/models", ""), nullptr, false);
      TESSERA_CHECK(models.is_object() && models.contains("data") && models["data"].is_array() &&
                        !models["data"].empty() && models["data"][0].contains("id"),
                    Unavailable, host_, prefix_, "/v1/models lists no model");
      model_ = models["data"][0]["id"].get<std::string>();
    }
  }

  Completion complete(const CompletionRequest& request) override {
    TESSERA_CHECK(!request.messages.empty(), InvalidArgument,
                  "OpenAiClient: the conversation is empty");
    json messages = json::array();
    for (const Message& m : request.messages) {
      TESSERA_CHECK(m.role == "system" || m.role == "user" || m.role == "assistant",
                    InvalidArgument, "OpenAiClient: unknown role '", m.role, "'");
      TESSERA_CHECK(m.images.empty() || options_.images, InvalidArgument, "OpenAiClient: model '",
                    model_, "' at ", host_, " was not declared to take images");
      if (m.images.empty()) {
        messages.push_back({{"role", m.role}, {"content", m.text}});
        continue;
      }
      json parts = json::array();
      for (const nn::Image& img : m.images) {
        parts.push_back(
            {{"type", "image_url"},
             {"image_url",
              {{"url", "data:image/png;base64," + base64_encode(nn::encode_png(img))}}}});
      }
      parts.push_back({{"type", "text"}, {"text", m.text}});
      messages.push_back({{"role", m.role}, {"content", parts}});
    }
    json body = {{"model", model_},
                 {"messages", messages},
                 {"max_tokens", request.max_tokens},
                 {"temperature", request.temperature},
                 {"seed", request.seed}};
    if (!request.stop.empty()) body["stop"] = request.stop;
    Stopwatch watch;
    const json r = json::parse(send("POST", "/v1/chat/completions", body.dump()), nullptr, false);
    Completion c;
    c.seconds = watch.seconds();
    try {
      const json& choice = r.at("choices").at(0);
      c.text = choice.at("message").at("content").is_string()
                   ? choice["message"]["content"].get<std::string>()
                   : "";
      c.finish_reason = choice.value("finish_reason", "");
      c.prompt_tokens = r.at("usage").at("prompt_tokens").get<int64_t>();
      c.completion_tokens = r.at("usage").at("completion_tokens").get<int64_t>();
    } catch (const json::exception& e) {
      TESSERA_THROW(DataLoss, host_, prefix_, "/v1/chat/completions: unexpected answer (", e.what(),
                    ")");
    }
    // Servers apply stop strings themselves; cut again for those that do
    // not.
    c.text = cut_at_stop(c.text, request.stop);
    return c;
  }

  std::string name() const override { return model_; }
  bool accepts_images() const override { return options_.images; }

 private:
  // One request; the body of a 200 answer.
  std::string send(const std::string& method, const std::string& path, const std::string& body) {
    const std::string where = host_ + prefix_ + path;
    httplib::Client client(host_);
    const auto micros = static_cast<int64_t>(options_.timeout_seconds * 1e6);
    client.set_connection_timeout(micros / 1000000, micros % 1000000);
    client.set_read_timeout(micros / 1000000, micros % 1000000);
    client.set_write_timeout(micros / 1000000, micros % 1000000);
    httplib::Headers headers;
    if (!options_.api_key.empty()) headers.emplace("Authorization", "Bearer " + options_.api_key);
    httplib::Result res = method == "GET"
                              ? client.Get(prefix_ + path, headers)
                              : client.Post(prefix_ + path, headers, body, "application/json");
    if (!res) {
      const httplib::Error err = res.error();
      if (err == httplib::Error::ConnectionTimeout || err == httplib::Error::Read) {
        TESSERA_THROW(DeadlineExceeded, where, ": no answer within ", options_.timeout_seconds,
                      " s (", httplib::to_string(err), ")");
      }
      TESSERA_THROW(Unavailable, where, ": request failed (", httplib::to_string(err), ")");
    }
    if (res->status == 200) return res->body;
    std::string message = res->body.substr(0, 500);
    const json j = json::parse(res->body, nullptr, /*allow_exceptions=*/false);
    if (j.is_object() && j.contains("error") && j["error"].is_object() &&
        j["error"].contains("message") && j["error"]["message"].is_string()) {
      message = j["error"]["message"].get<std::string>();
    }
    if (res->status >= 400 && res->status < 500) {
      TESSERA_THROW(InvalidArgument, where, ": HTTP ", res->status, ": ", message);
    }
    TESSERA_THROW(Unavailable, where, ": HTTP ", res->status, ": ", message);
  }

  OpenAiClientOptions options_;
  std::string host_, prefix_, model_;
};

}  // namespace

std::unique_ptr<ModelClient> OpenAiClient::create(const OpenAiClientOptions& options) {
  return std::make_unique<HttpChatClient>(options);
}

}  // namespace tessera::reason
