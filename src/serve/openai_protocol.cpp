#include "openai_protocol.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <limits>

#include "tessera/core/base64.h"
#include "tessera/core/config.h"
#include "tessera/core/error.h"

namespace tessera::serve::openai {
namespace {

using json = nlohmann::json;

[[noreturn]] void bad(const std::string& param, const std::string& message, int status = 400) {
  throw BadRequest{status, message, param};
}

// Typed readers: absent or null gives the fallback; another type is a 400
// naming the field.
const json* field(const json& j, const char* key) {
  auto it = j.find(key);
  return it == j.end() || it->is_null() ? nullptr : &*it;
}
int64_t get_int(const json& j, const char* key, int64_t fallback, int64_t lo, int64_t hi) {
  const json* v = field(j, key);
  if (!v) return fallback;
  if (!v->is_number_integer()) bad(key, std::string("'") + key + "' must be an integer");
  const int64_t x = v->get<int64_t>();
  if (x < lo || x > hi) {
    bad(key, std::string("'") + key + "' must be in [" + std::to_string(lo) + ", " +
                 std::to_string(hi) + "], got " + std::to_string(x));
  }
  return x;
}
double get_number(const json& j, const char* key, double fallback, double lo, double hi) {
  const json* v = field(j, key);
  if (!v) return fallback;
  if (!v->is_number()) bad(key, std::string("'") + key + "' must be a number");
  const double x = v->get<double>();
  if (!(x >= lo && x <= hi)) {
    bad(key, std::string("'") + key + "' must be in [" + std::to_string(lo) + ", " +
                 std::to_string(hi) + "]");
  }
  return x;
}
bool get_bool(const json& j, const char* key, bool fallback) {
  const json* v = field(j, key);
  if (!v) return fallback;
  if (!v->is_boolean()) bad(key, std::string("'") + key + "' must be a boolean");
  return v->get<bool>();
}
std::string get_string(const json& j, const char* key, const std::string& fallback) {
  const json* v = field(j, key);
  if (!v) return fallback;
  if (!v->is_string()) bad(key, std::string("'") + key + "' must be a string");
  return v->get<std::string>();
}

// Fields OpenAI defines that this server does not implement: accepted only
// at their neutral value, refused otherwise (never silently ignored).
void refuse_unsupported(const json& j) {
  for (const char* key : {"presence_penalty", "frequency_penalty"}) {
    if (const json* v = field(j, key); v && (!v->is_number() || v->get<double>() != 0.0)) {
      bad(key, std::string("'") + key + "' is not supported (only 0)");
    }
  }
  if (field(j, "suffix")) bad("suffix", "'suffix' is not supported");
  if (const json* v = field(j, "best_of");
      v && !(v->is_number_integer() && v->get<int64_t>() == 1)) {
    bad("best_of", "'best_of' is not supported (only 1)");
  }
  if (const json* v = field(j, "logit_bias"); v && !(v->is_object() && v->empty())) {
    bad("logit_bias", "'logit_bias' is not supported");
  }
  if (const json* v = field(j, "tools"); v && !(v->is_array() && v->empty()))
    bad("tools", "'tools' is not supported");
}

// The sampling fields both endpoints share.
SamplingParams sampling(const json& j, const Engine& engine, bool chat) {
  SamplingParams s;
  const int64_t max_len = engine.max_model_len();
  // Chat without a limit may answer up to the end of the context (as vLLM
  // does): 0 asks the engine for max_model_len minus the prompt.
  const int64_t default_max = chat ? 0 : 16;
  s.max_tokens = get_int(j, "max_tokens", default_max, 1, max_len);
  if (chat) s.max_tokens = get_int(j, "max_completion_tokens", s.max_tokens, 1, max_len);
  s.temperature = get_number(j, "temperature", 1.0, 0.0, 2.0);
  s.top_p = get_number(j, "top_p", 1.0, 0.0, 1.0);
  if (s.top_p <= 0.0) bad("top_p", "'top_p' must be in (0, 1]");
  s.top_k = get_int(j, "top_k", 0, -1, engine.vocab_size());
  if (s.top_k < 0) s.top_k = 0;
  s.n = get_int(j, "n", 1, 1, 1 << 20);
  s.priority = get_int(j, "priority", 0, std::numeric_limits<int32_t>::min(),
                       std::numeric_limits<int32_t>::max());
  s.ignore_eos = get_bool(j, "ignore_eos", false);
  if (const json* v = field(j, "seed")) {
    if (!v->is_number_integer() || v->get<int64_t>() < 0)
      bad("seed", "'seed' must be a non-negative integer");
    s.seed = v->get<uint64_t>();
  }
  if (const json* v = field(j, "stop")) {
    if (v->is_string()) {
      s.stop.push_back(v->get<std::string>());
    } else if (v->is_array()) {
      for (const auto& e : *v) {
        if (!e.is_string()) bad("stop", "'stop' must be a string or a list of strings");
        s.stop.push_back(e.get<std::string>());
      }
    } else {
      bad("stop", "'stop' must be a string or a list of strings");
    }
    for (const auto& stop : s.stop) {
      if (stop.empty()) bad("stop", "stop strings must not be empty");
    }
  }
  if (const json* v = field(j, "stop_token_ids")) {
    if (!v->is_array()) bad("stop_token_ids", "'stop_token_ids' must be a list of token ids");
    for (const auto& e : *v) {
      if (!e.is_number_integer() || e.get<int64_t>() < 0 ||
          e.get<int64_t>() >= engine.vocab_size()) {
        bad("stop_token_ids", "'stop_token_ids' must hold token ids below the vocabulary size");
      }
      s.stop_token_ids.push_back(e.get<int64_t>());
    }
  }
  if (const json* v = field(j, "response_format")) {
    if (!v->is_object()) bad("response_format", "'response_format' must be an object");
    const std::string type = get_string(*v, "type", "text");
    if (type == "json_object") {
      s.json_object = true;
    } else if (type != "text") {
      bad("response_format",
          "response_format type '" + type + "' is not supported (text, json_object)");
    }
  }
  return s;
}

std::vector<int64_t> token_list(const json& v, const Engine& engine) {
  std::vector<int64_t> out;
  for (const auto& e : v) {
    if (!e.is_number_integer() || e.get<int64_t>() < 0 || e.get<int64_t>() >= engine.vocab_size()) {
      bad("prompt", "prompt token ids must be integers below the vocabulary size " +
                        std::to_string(engine.vocab_size()));
    }
    out.push_back(e.get<int64_t>());
  }
  if (out.empty()) bad("prompt", "a prompt must not be empty");
  return out;
}

// /v1/completions' prompt: text, token ids, or a list of either.
std::vector<GenerateRequest> completion_prompts(const json& j, const Engine& engine) {
  const json* p = field(j, "prompt");
  if (!p) bad("prompt", "'prompt' is required");
  std::vector<GenerateRequest> out;
  auto add_text = [&](const std::string& text) {
    if (text.empty()) bad("prompt", "a prompt must not be empty");
    GenerateRequest r;
    r.prompt_text = text;
    out.push_back(std::move(r));
  };
  if (p->is_string()) {
    add_text(p->get<std::string>());
  } else if (p->is_array() && !p->empty() && (*p)[0].is_number_integer()) {
    GenerateRequest r;
    r.prompt_tokens = token_list(*p, engine);
    out.push_back(std::move(r));
  } else if (p->is_array() && !p->empty()) {
    for (const auto& e : *p) {
      if (e.is_string()) {
        add_text(e.get<std::string>());
      } else if (e.is_array()) {
        GenerateRequest r;
        r.prompt_tokens = token_list(e, engine);
        out.push_back(std::move(r));
      } else {
        bad("prompt", "'prompt' must be a string, a list of token ids, or a list of those");
      }
    }
  } else {
    bad("prompt", "'prompt' must be a string, a list of token ids, or a list of those");
  }
  return out;
}

// An image_url part's image: a data: URL (base64 PNG or JPEG), or with a
// media root, a file:// URL or absolute path inside it. Remote URLs are
// refused (the server fetches nothing over the network).
nn::Image image_of(const json& part, const std::string& where, const ChatOptions& options) {
  const json* iu = field(part, "image_url");
  std::string url;
  if (iu && iu->is_string()) {
    url = iu->get<std::string>();
  } else if (iu && iu->is_object() && field(*iu, "url") && (*iu)["url"].is_string()) {
    url = (*iu)["url"].get<std::string>();
  } else {
    bad(where, where + ".image_url must be {\"url\": \"data:image/png;base64,...\"}");
  }
  try {
    if (url.rfind("data:", 0) == 0) {
      const size_t comma = url.find(',');
      const std::string_view head =
          comma == std::string::npos ? std::string_view() : std::string_view(url).substr(0, comma);
      if (head.size() < 12 || head.substr(head.size() - 7) != ";base64") {
        bad(where, where + ": a data: URL must be data:<type>;base64,<data>");
      }
      return nn::decode_image(base64_decode(std::string_view(url).substr(comma + 1), where), where);
    }
    if (url.rfind("http://", 0) == 0 || url.rfind("https://", 0) == 0) {
      bad(where, where + ": remote images are not fetched; send a data: URL");
    }
    std::string path = url.rfind("file://", 0) == 0 ? url.substr(7) : url;
    if (path.empty() || path[0] != '/') {
      bad(where, where + ": the image URL must be a data: URL or a local file (file:///...)");
    }
    if (options.local_media_root.empty()) {
      bad(where, where + ": local image files are not allowed (--allowed-local-media-path)");
    }
    namespace fs = std::filesystem;
    std::error_code ec;
    const fs::path file = fs::weakly_canonical(path, ec);
    const fs::path root = fs::weakly_canonical(options.local_media_root, ec);
    const std::string f = file.string(), r = root.string();
    if (ec || f.size() <= r.size() || f.compare(0, r.size(), r) != 0 || f[r.size()] != '/') {
      bad(where, where + ": '" + path + "' is outside the allowed media path");
    }
    return nn::read_image(f);
  } catch (const Error& e) {
    bad(where, e.message());
  }
  return {};
}

// Chat messages: text content, or a list of text and image parts. Images
// go to `images`, their count per message to `images_per_message` (the
// chat format places them at the start of their message).
std::vector<nn::ChatMessage> chat_messages(const json& j, const Engine& engine,
                                           const ChatOptions& options,
                                           std::vector<int64_t>& images_per_message,
                                           std::vector<nn::Image>& images) {
  const json* m = field(j, "messages");
  if (!m || !m->is_array() || m->empty()) bad("messages", "'messages' must be a non-empty list");
  std::vector<nn::ChatMessage> out;
  for (size_t i = 0; i < m->size(); ++i) {
    const json& msg = (*m)[i];
    const std::string where = "messages[" + std::to_string(i) + "]";
    if (!msg.is_object()) bad(where, where + " must be an object");
    const json* role = field(msg, "role");
    if (!role || !role->is_string()) bad(where + ".role", where + ".role must be a string");
    nn::ChatMessage cm;
    cm.role = role->get<std::string>();
    if (cm.role != "system" && cm.role != "user" && cm.role != "assistant" &&
        cm.role != "developer") {
      bad(where + ".role", "unknown role '" + cm.role + "' (system, developer, user, assistant)");
    }
    if (cm.role == "developer") cm.role = "system";
    const json* content = field(msg, "content");
    if (!content) bad(where + ".content", where + ".content is required");
    int64_t count = 0;
    if (content->is_string()) {
      cm.content = content->get<std::string>();
    } else if (content->is_array()) {
      for (size_t k = 0; k < content->size(); ++k) {
        const json& part = (*content)[k];
        const std::string pw = where + ".content[" + std::to_string(k) + "]";
        const std::string type = part.is_object() ? get_string(part, "type", "") : "";
        if (type == "text") {
          cm.content += get_string(part, "text", "");
        } else if (type == "image_url") {
          if (!engine.accepts_images()) {
            bad(pw, pw + ": model '" + engine.model_name() + "' takes no images");
          }
          if (static_cast<int64_t>(images.size()) >= options.max_images) {
            bad(pw, pw + ": more than " + std::to_string(options.max_images) +
                        " images in one request");
          }
          images.push_back(image_of(part, pw, options));
          ++count;
        } else {
          bad(pw, pw + ": content parts must be {\"type\": \"text\", \"text\": ...} or "
                       "{\"type\": \"image_url\", \"image_url\": {\"url\": ...}}");
        }
      }
    } else {
      bad(where + ".content", where + ".content must be a string or a list of parts");
    }
    out.push_back(std::move(cm));
    images_per_message.push_back(count);
  }
  return out;
}

json token_bytes(const std::string& text) {
  json b = json::array();
  for (unsigned char c : text) b.push_back(static_cast<int>(c));
  return b;
}

json logprob_value(double lp) { return std::isnan(lp) ? json(nullptr) : json(lp); }

// Completions' logprobs object for tokens starting at text offset `offset`.
json completion_logprobs(const std::vector<int64_t>& tokens, const std::vector<double>& lps,
                         const std::vector<std::vector<TopLogprob>>& tops, const Engine& engine,
                         int64_t offset) {
  json out = {{"tokens", json::array()},
              {"token_logprobs", json::array()},
              {"top_logprobs", json::array()},
              {"text_offset", json::array()}};
  for (size_t i = 0; i < tokens.size(); ++i) {
    const std::string text = engine.detokenize({tokens[i]});
    out["tokens"].push_back(text);
    out["token_logprobs"].push_back(i < lps.size() ? logprob_value(lps[i]) : json(nullptr));
    json top = json::object();
    if (i < tops.size()) {
      for (const auto& t : tops[i]) top[t.text] = t.logprob;
    }
    out["top_logprobs"].push_back(i < tops.size() && !tops[i].empty() ? top : json(nullptr));
    out["text_offset"].push_back(offset);
    offset += static_cast<int64_t>(text.size());
  }
  return out;
}

// Chat's logprobs object.
json chat_logprobs(const std::vector<int64_t>& tokens, const std::vector<double>& lps,
                   const std::vector<std::vector<TopLogprob>>& tops, const Engine& engine) {
  json content = json::array();
  for (size_t i = 0; i < tokens.size(); ++i) {
    const std::string text = engine.detokenize({tokens[i]});
    json top = json::array();
    if (i < tops.size()) {
      for (const auto& t : tops[i]) {
        top.push_back({{"token", t.text}, {"logprob", t.logprob}, {"bytes", token_bytes(t.text)}});
      }
    }
    content.push_back({{"token", text},
                       {"logprob", i < lps.size() ? logprob_value(lps[i]) : json(nullptr)},
                       {"bytes", token_bytes(text)},
                       {"top_logprobs", top}});
  }
  return {{"content", content}};
}

json usage_of(const std::vector<Choice>& choices, size_t samples_per_prompt) {
  int64_t prompt = 0, completion = 0;
  for (size_t i = 0; i < choices.size(); ++i) {
    if (i % samples_per_prompt == 0) prompt += choices[i].prompt_tokens;
    completion += choices[i].completion_tokens;
  }
  return {{"prompt_tokens", prompt},
          {"completion_tokens", completion},
          {"total_tokens", prompt + completion}};
}

}  // namespace

std::string dump_json(const json& j) {
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

Parsed parse(Endpoint endpoint, const std::string& body, const Engine& engine, int64_t max_choices,
             const ChatOptions& chat_options) {
  json j;
  try {
    j = json::parse(body);
  } catch (const json::parse_error& e) {
    const auto [line, column] = line_column(body, e.byte == 0 ? 0 : e.byte - 1);
    bad("",
        "malformed JSON at line " + std::to_string(line) + ", column " + std::to_string(column));
  }
  if (!j.is_object()) bad("", "the request body must be a JSON object");
  refuse_unsupported(j);
  Parsed p;
  p.endpoint = endpoint;
  p.model = get_string(j, "model", engine.model_name());
  std::string adapter;
  if (!p.model.empty() && p.model != engine.model_name()) {
    const auto names = engine.adapters();
    if (std::find(names.begin(), names.end(), p.model) == names.end()) {
      throw BadRequest{404, "The model `" + p.model + "` does not exist.", "model",
                       "NotFoundError"};
    }
    adapter = p.model;
  }
  if (p.model.empty()) p.model = engine.model_name();
  const bool chat = endpoint == Endpoint::kChat;
  const SamplingParams params = sampling(j, engine, chat);
  p.stream = get_bool(j, "stream", false);
  if (const json* so = field(j, "stream_options")) {
    if (!so->is_object()) bad("stream_options", "'stream_options' must be an object");
    if (!p.stream) bad("stream_options", "'stream_options' is only allowed with stream: true");
    p.include_usage = get_bool(*so, "include_usage", false);
  }
  bool echo = false;
  if (chat) {
    p.want_logprobs = get_bool(j, "logprobs", false);
    p.top_logprobs = get_int(j, "top_logprobs", 0, 0, 20);
    if (p.top_logprobs > 0 && !p.want_logprobs)
      bad("top_logprobs", "'top_logprobs' needs logprobs: true");
    GenerateRequest r;
    std::vector<int64_t> images_per_message;
    const auto messages = chat_messages(j, engine, chat_options, images_per_message, r.images);
    r.prompt_text = engine.apply_chat_template(messages, images_per_message);
    p.prompts.push_back(std::move(r));
  } else {
    if (const json* v = field(j, "logprobs")) {
      if (!v->is_number_integer() || v->get<int64_t>() < 0 || v->get<int64_t>() > 20) {
        bad("logprobs", "'logprobs' must be an integer in [0, 20]");
      }
      p.want_logprobs = true;
      p.top_logprobs = v->get<int64_t>();
    }
    echo = get_bool(j, "echo", false);
    if (echo && p.stream) bad("echo", "'echo' is not supported with stream: true");
    p.prompts = completion_prompts(j, engine);
  }
  if (static_cast<int64_t>(p.prompts.size()) * params.n > max_choices) {
    bad("n", "at most " + std::to_string(max_choices) + " choices per request (prompts x n)");
  }
  for (auto& r : p.prompts) {
    r.params = params;
    if (p.want_logprobs) r.params.logprobs = p.top_logprobs;
    r.adapter = adapter;
    r.echo = echo;
  }
  return p;
}

std::string error_body(int status, const std::string& message, const std::string& param,
                       const std::string& type) {
  std::string t = type;
  if (t.empty()) {
    t = status == 401   ? "AuthenticationError"
        : status == 404 ? "NotFoundError"
        : status == 413 ? "RequestTooLarge"
        : status == 503 ? "ServiceUnavailable"
        : status >= 500 ? "InternalServerError"
                        : "invalid_request_error";
  }
  json e = {{"message", message},
            {"type", t},
            {"param", param.empty() ? json(nullptr) : json(param)},
            {"code", status}};
  return dump_json(json({{"error", e}}));
}

json full_response(const Parsed& p, const std::string& id, int64_t created,
                   const std::vector<Choice>& choices, const Engine& engine) {
  const bool chat = p.endpoint == Endpoint::kChat;
  json cs = json::array();
  for (size_t i = 0; i < choices.size(); ++i) {
    const Choice& c = choices[i];
    json lp = nullptr;
    if (p.want_logprobs) {
      lp = chat ? chat_logprobs(c.tokens, c.logprobs, c.top_logprobs, engine)
                : completion_logprobs(c.tokens, c.logprobs, c.top_logprobs, engine, 0);
    }
    json choice = {{"index", i}, {"logprobs", lp}, {"finish_reason", c.finish_reason}};
    if (chat) {
      choice["message"] = {{"role", "assistant"}, {"content", c.text}};
    } else {
      choice["text"] = c.text;
    }
    cs.push_back(std::move(choice));
  }
  const size_t per_prompt = choices.size() / std::max<size_t>(p.prompts.size(), 1);
  return {{"id", id},           {"object", chat ? "chat.completion" : "text_completion"},
          {"created", created}, {"model", p.model},
          {"choices", cs},      {"usage", usage_of(choices, std::max<size_t>(per_prompt, 1))}};
}

json stream_chunk(const Parsed& p, const std::string& id, int64_t created, int64_t index,
                  const TokenEvent& e, bool first, const Engine& engine) {
  const bool chat = p.endpoint == Endpoint::kChat;
  json lp = nullptr;
  if (p.want_logprobs && !e.tokens.empty()) {
    lp = chat ? chat_logprobs(e.tokens, e.logprobs, e.top_logprobs, engine)
              : completion_logprobs(e.tokens, e.logprobs, e.top_logprobs, engine, 0);
  }
  json choice = {{"index", index},
                 {"logprobs", lp},
                 {"finish_reason", e.finished ? json(e.finish_reason) : json(nullptr)}};
  if (chat) {
    json delta = json::object();
    if (first) delta["role"] = "assistant";
    if (!e.text.empty() || first) delta["content"] = e.text;
    choice["delta"] = delta;
  } else {
    choice["text"] = e.text;
  }
  json chunk = {{"id", id},
                {"object", chat ? "chat.completion.chunk" : "text_completion"},
                {"created", created},
                {"model", p.model},
                {"choices", json::array({choice})}};
  if (p.include_usage) chunk["usage"] = nullptr;
  return chunk;
}

json usage_chunk(const Parsed& p, const std::string& id, int64_t created,
                 const std::vector<Choice>& choices) {
  const size_t per_prompt = choices.size() / std::max<size_t>(p.prompts.size(), 1);
  return {{"id", id},
          {"object", p.endpoint == Endpoint::kChat ? "chat.completion.chunk" : "text_completion"},
          {"created", created},
          {"model", p.model},
          {"choices", json::array()},
          {"usage", usage_of(choices, std::max<size_t>(per_prompt, 1))}};
}

}  // namespace tessera::serve::openai
