#include "tessera/synth/generator.h"

#include <condition_variable>
#include <filesystem>

#include "tessera/core/error.h"

namespace tessera::synth {

std::unique_ptr<EngineGenerator> EngineGenerator::create(
    const serve::EngineOptions& options, std::chrono::milliseconds request_timeout) {
  return std::unique_ptr<EngineGenerator>(
      new EngineGenerator(serve::Engine::create(options), request_timeout));
}

EngineGenerator::EngineGenerator(std::unique_ptr<serve::Engine> engine,
                                 std::chrono::milliseconds timeout)
    : engine_(std::move(engine)), timeout_(timeout) {}

EngineGenerator::~EngineGenerator() = default;

std::string EngineGenerator::adapter_name(const std::string& folder) {
  if (folder.empty()) return "";
  const std::string key = std::filesystem::weakly_canonical(folder).string();
  std::lock_guard<std::mutex> lock(mu_);
  auto it = adapters_.find(key);
  if (it != adapters_.end()) return it->second;
  const std::string name = "synth-" + std::to_string(adapters_.size());
  engine_->load_adapter(name, key);
  adapters_[key] = name;
  return name;
}

std::vector<std::vector<std::string>> EngineGenerator::generate(
    const std::vector<GenerationRequest>& requests) {
  struct Collected {
    std::mutex mu;
    std::vector<std::vector<std::string>> texts;
    std::vector<std::string> aborted;
  } out;
  out.texts.resize(requests.size());
  std::vector<serve::RequestHandle> handles;
  try {
    for (size_t i = 0; i < requests.size(); ++i) {
      const GenerationRequest& r = requests[i];
      TESSERA_CHECK(r.n >= 1, InvalidArgument, "generator: request ", i, " asks for ", r.n,
                    " samples");
      out.texts[i].resize(static_cast<size_t>(r.n));
      serve::GenerateRequest g;
      g.prompt_text = r.prompt;
      g.params.n = r.n;
      g.params.temperature = r.temperature;
      g.params.top_p = r.top_p;
      g.params.max_tokens = r.max_tokens;
      g.params.seed = r.seed;
      g.params.stop = r.stop;
      g.adapter = adapter_name(r.adapter);
      handles.push_back(engine_->submit(g, [&out, i](const serve::TokenEvent& e) {
        std::lock_guard<std::mutex> lock(out.mu);
        out.texts[i][static_cast<size_t>(e.index)] += e.text;
        if (e.finished && e.finish_reason == "abort") out.aborted.push_back(std::to_string(i));
      }));
    }
    const auto deadline = std::chrono::steady_clock::now() + timeout_;
    for (auto& h : handles) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          deadline - std::chrono::steady_clock::now());
      TESSERA_CHECK(h.wait(std::max(left, std::chrono::milliseconds(0))), DeadlineExceeded,
                    "generator: requests did not finish within ", timeout_.count(), " ms");
    }
  } catch (...) {
    for (auto& h : handles) engine_->cancel(h.id());
    for (auto& h : handles) h.wait(std::chrono::seconds(60));
    throw;
  }
  std::lock_guard<std::mutex> lock(out.mu);
  TESSERA_CHECK(out.aborted.empty(), Aborted, "generator: request ", out.aborted.front(),
                " was aborted by the engine");
  return std::move(out.texts);
}

std::string EngineGenerator::apply_chat_template(
    const std::vector<nn::ChatMessage>& messages) const {
  return engine_->apply_chat_template(messages);
}

std::vector<int64_t> EngineGenerator::tokenize(const std::string& text) const {
  return engine_->tokenize(text);
}

std::string EngineGenerator::describe() const {
  return "serve::Engine(" + engine_->model_name() + ")";
}

}  // namespace tessera::synth
