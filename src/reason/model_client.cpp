#include "tessera/reason/model_client.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>

#include <filesystem>
#include <mutex>
#include <nlohmann/json.hpp>

#include "tessera/core/config.h"
#include "tessera/core/error.h"
#include "tessera/core/metrics.h"
#include "tessera/nn/generate.h"
#include "tessera/nn/loader.h"
#include "tessera/nn/vlm.h"
#include "tessera/tokenizer/chat.h"

namespace fs = std::filesystem;

namespace tessera::reason {

std::string cut_at_stop(const std::string& text, const std::vector<std::string>& stop) {
  size_t cut = text.size();
  for (const std::string& s : stop) {
    if (s.empty()) continue;
    const size_t pos = text.find(s);
    if (pos != std::string::npos) cut = std::min(cut, pos);
  }
  return text.substr(0, cut);
}

namespace {

void check_request(const CompletionRequest& r, bool images_allowed, const std::string& who) {
  TESSERA_CHECK(!r.messages.empty(), InvalidArgument, who, ": empty conversation");
  TESSERA_CHECK(r.max_tokens >= 1, InvalidArgument, who, ": max_tokens must be >= 1, got ",
                r.max_tokens);
  for (const Message& m : r.messages) {
    TESSERA_CHECK(m.role == "system" || m.role == "user" || m.role == "assistant", InvalidArgument,
                  who, ": unknown role '", m.role, "'");
    TESSERA_CHECK(images_allowed || m.images.empty(), InvalidArgument, who,
                  " is a text model: it takes no images");
  }
}

Completion finish(const std::vector<int64_t>& tokens, const nn::Tokenizer& tok,
                  const CompletionRequest& r, int64_t prompt_tokens, const std::string& reason,
                  double seconds) {
  Completion c;
  std::vector<int32_t> ids(tokens.begin(), tokens.end());
  c.text = cut_at_stop(tok.decode(ids, /*skip_special=*/true), r.stop);
  c.prompt_tokens = prompt_tokens;
  c.completion_tokens = static_cast<int64_t>(tokens.size());
  c.finish_reason = reason;
  c.seconds = seconds;
  return c;
}

class InProcessVlm final : public ModelClient {
 public:
  InProcessVlm(nn::LoadedVlm vlm, std::string name, int threads)
      : vlm_(std::move(vlm)), name_(std::move(name)), threads_(threads) {}

  Completion complete(const CompletionRequest& r) override {
    check_request(r, true, name_);
    std::lock_guard<std::mutex> lock(mu_);
    if (threads_ > 0) at::set_num_threads(threads_);
    Stopwatch watch;
    std::vector<nn::VlmMessage> messages;
    std::vector<nn::Image> images;
    for (const Message& m : r.messages) {
      messages.push_back({m.role, m.text, static_cast<int64_t>(m.images.size())});
      images.insert(images.end(), m.images.begin(), m.images.end());
    }
    nn::VlmInput input = vlm_.prepare(messages, images);
    nn::SamplingOptions s;
    s.max_new_tokens = r.max_tokens;
    s.temperature = r.temperature;
    s.seed = r.seed;
    s.stop_tokens = vlm_.stop_tokens();
    nn::GenerationResult g = nn::generate_vlm(*vlm_.model, {input}, s);
    return finish(g.tokens[0], vlm_.tokenizer, r, static_cast<int64_t>(input.ids.size()),
                  g.finish_reason[0], watch.seconds());
  }
  std::string name() const override { return name_; }
  bool accepts_images() const override { return true; }

 private:
  std::mutex mu_;  // guards vlm_ (one forward at a time)
  nn::LoadedVlm vlm_;
  std::string name_;
  int threads_;
};

class InProcessText final : public ModelClient {
 public:
  InProcessText(std::unique_ptr<nn::Transformer> model, nn::Tokenizer tok,
                std::string chat_template, std::string name, int threads)
      : model_(std::move(model)),
        tok_(std::move(tok)),
        template_(std::move(chat_template)),
        name_(std::move(name)),
        threads_(threads) {
    for (const char* t : {"<|im_end|>", "<|endoftext|>"}) {
      try {
        stop_.push_back(tok_.token_to_id(t));
      } catch (const NotFound&) {
      }
    }
    if (tok_.eos_id()) stop_.push_back(*tok_.eos_id());
  }

  Completion complete(const CompletionRequest& r) override {
    check_request(r, false, name_);
    std::lock_guard<std::mutex> lock(mu_);
    if (threads_ > 0) at::set_num_threads(threads_);
    Stopwatch watch;
    std::vector<nn::ChatMessage> messages;
    for (const Message& m : r.messages) messages.push_back({m.role, m.text});
    const std::string prompt = nn::format_chat(template_, messages);
    std::vector<int64_t> ids;
    for (int32_t id : tok_.encode(prompt, true)) ids.push_back(id);
    TESSERA_CHECK(
        static_cast<int64_t>(ids.size()) + r.max_tokens <= model_->config().max_position_embeddings,
        InvalidArgument, name_, ": prompt of ", ids.size(), " tokens + ", r.max_tokens,
        " new ones exceeds the context of ", model_->config().max_position_embeddings);
    nn::SamplingOptions s;
    s.max_new_tokens = r.max_tokens;
    s.temperature = r.temperature;
    s.seed = r.seed;
    s.stop_tokens = stop_;
    nn::GenerationResult g = nn::generate(*model_, {ids}, s);
    return finish(g.tokens[0], tok_, r, static_cast<int64_t>(ids.size()), g.finish_reason[0],
                  watch.seconds());
  }
  std::string name() const override { return name_; }
  bool accepts_images() const override { return false; }

 private:
  std::mutex mu_;  // guards model_
  std::unique_ptr<nn::Transformer> model_;
  nn::Tokenizer tok_;
  std::string template_;
  std::string name_;
  int threads_;
  std::vector<int64_t> stop_;
};

}  // namespace

std::unique_ptr<ModelClient> VlmClient::create(const VlmClientOptions& options) {
  nn::LoadedVlm vlm = nn::load_vlm_folder(options.model_dir);
  std::string name = fs::path(options.model_dir).filename().string();
  if (name.empty()) name = fs::path(options.model_dir).parent_path().filename().string();
  return std::make_unique<InProcessVlm>(std::move(vlm), name, options.threads);
}

std::unique_ptr<ModelClient> TextClient::create(const TextClientOptions& options) {
  const fs::path path(options.model_path);
  TESSERA_CHECK(fs::exists(path), NotFound, "text model '", options.model_path, "' does not exist");
  if (fs::is_directory(path)) {
    auto model = std::make_unique<nn::Transformer>(nn::load_hf_model(options.model_path));
    nn::Tokenizer tok = nn::Tokenizer::from_tokenizer_json((path / "tokenizer.json").string());
    const std::string config_path = (path / "tokenizer_config.json").string();
    TESSERA_CHECK(fs::exists(config_path), InvalidArgument, options.model_path,
                  ": no tokenizer_config.json with a chat_template");
    const ConfigObject cfg = ConfigObject::load_file(config_path);
    TESSERA_CHECK(cfg.has("chat_template"), InvalidArgument, config_path, ": no chat_template");
    return std::make_unique<InProcessText>(std::move(model), std::move(tok),
                                           cfg.get_string("chat_template"),
                                           path.filename().string(), options.threads);
  }
  nn::LoadedModel loaded = nn::load_gguf_model(options.model_path);
  TESSERA_CHECK(!loaded.chat_template.empty(), InvalidArgument, options.model_path,
                ": the GGUF has no chat template");
  std::string name = path.stem().string();
  return std::make_unique<InProcessText>(std::move(loaded.model), std::move(loaded.tokenizer),
                                         std::move(loaded.chat_template), name, options.threads);
}

}  // namespace tessera::reason
