// tessera/reason/model_client.h — the one interface through which the
// ProReason roles call models, and its in-process implementations.
//
// A ModelClient answers a chat (messages, some carrying images) with text
// and reports what the call cost (prompt and completion tokens, seconds).
// In-process clients run nn generation on a vision-language model folder
// (nn::load_vlm_folder) or on a text model (a GGUF file such as SmolLM2, or
// a Hugging Face folder with tokenizer.json); OpenAiClient speaks to
// tessera-serve or any OpenAI-compatible server (images as base64 data:
// URLs in image_url content parts).
//
//   auto vlm = tessera::reason::VlmClient::create({"scene-vlm"});
//   auto llm = tessera::reason::TextClient::create({smollm2_gguf_path});
//   tessera::reason::CompletionRequest r;
//   r.messages = {{"user", "How many red circles are there?", {image}}};
//   auto c = vlm->complete(r);   // c.text, c.prompt_tokens, ...
//
// Thread safety: clients are thread-safe; calls on one client are
// serialised (one model forward at a time).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "tessera/nn/image.h"

namespace tessera::reason {

struct Message {
  std::string role;  // "system", "user", "assistant"
  std::string text;
  std::vector<nn::Image> images;  // placed before the text, as chat templates do
};

struct CompletionRequest {
  std::vector<Message> messages;
  int64_t max_tokens = 128;
  double temperature = 0.0;  // 0: greedy
  uint64_t seed = 0;
  // The answer is cut before the first of these (not included).
  std::vector<std::string> stop;
};

struct Completion {
  std::string text;
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
  double seconds = 0;
  std::string finish_reason;  // "stop" or "length"
};

class ModelClient {
 public:
  virtual ~ModelClient() = default;
  // InvalidArgument for images sent to a client that takes none, an empty
  // conversation or an unknown role; errors of the model otherwise.
  virtual Completion complete(const CompletionRequest& request) = 0;
  // A short name for traces ("scene-vlm", "SmolLM2-135M-Instruct").
  virtual std::string name() const = 0;
  virtual bool accepts_images() const = 0;
};

struct VlmClientOptions {
  std::string model_dir;  // nn::load_vlm_folder's layout
  int threads = 0;        // intra-op threads (0: LibTorch's default)
};

class VlmClient {
 public:
  // Loads the folder (errors of nn::load_vlm_folder).
  static std::unique_ptr<ModelClient> create(const VlmClientOptions& options);
};

struct TextClientOptions {
  // A GGUF file (tokenizer and chat template inside) or a Hugging Face
  // folder with tokenizer.json and a ChatML chat_template in
  // tokenizer_config.json.
  std::string model_path;
  int threads = 0;
};

class TextClient {
 public:
  // NotFound / InvalidArgument / DataLoss from the loaders; InvalidArgument
  // when the model has no ChatML chat template.
  static std::unique_ptr<ModelClient> create(const TextClientOptions& options);
};

// A model behind an OpenAI-compatible chat endpoint (tessera-serve, vLLM,
// llama-server): messages go to POST {base_url}/v1/chat/completions, images
// as PNG base64 data: URLs in image_url parts placed before the text.
struct OpenAiClientOptions {
  std::string base_url;  // "http://127.0.0.1:8000"; a trailing /v1 is accepted
  std::string model;     // empty: the first model GET /v1/models lists
  std::string api_key;   // sent as Authorization: Bearer
  bool images = false;   // the endpoint serves a vision-language model
  double timeout_seconds = 600;
};

class OpenAiClient {
 public:
  // InvalidArgument for a malformed base_url; Unavailable when the server
  // does not answer GET /v1/models. complete() throws InvalidArgument with
  // the server's message for a 4xx answer, Unavailable / DeadlineExceeded
  // when the server fails or times out; usage and timing come from the
  // response.
  static std::unique_ptr<ModelClient> create(const OpenAiClientOptions& options);
};

// Cuts `text` before the first occurrence of any stop string.
std::string cut_at_stop(const std::string& text, const std::vector<std::string>& stop);

}  // namespace tessera::reason
