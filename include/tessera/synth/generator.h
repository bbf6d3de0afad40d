// tessera/synth/generator.h — where the synthesis pipeline's text comes
// from: a small interface, implemented over the serving engine in process
// (tessera::serve::Engine: continuous batching, many samples per prompt
// sharing the prompt's KV blocks, LoRA adapters per request).
//
//   auto gen = tessera::synth::EngineGenerator::create(engine_options);
//   tessera::synth::GenerationRequest r;
//   r.prompt = gen->apply_chat_template({{"user", "Write a math question."}});
//   r.n = 8;
//   r.temperature = 1.0;
//   r.adapter = "runs/warmup/adapter";     // a LoRA folder, or "" for the base model
//   auto texts = gen->generate({r});      // texts[0][k]: sample k
//
// Thread safety: implementations are thread-safe (the engine is); one
// generate() call's requests run concurrently inside it.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "tessera/serve/engine.h"
#include "tessera/tokenizer/chat.h"

namespace tessera::synth {

struct GenerationRequest {
  std::string prompt;        // text; chat markers are parsed as special tokens
  int64_t n = 1;             // samples
  double temperature = 0.0;  // 0: greedy
  double top_p = 1.0;
  int64_t max_tokens = 64;
  uint64_t seed = 0;              // samples of one request are reproducible whatever else runs
  std::vector<std::string> stop;  // stop strings (not included in the text)
  std::string adapter;            // LoRA / MoS adapter folder; "" for the base model
};

class Generator {
 public:
  virtual ~Generator() = default;
  // The completions, [request][sample]. Errors of the backend propagate
  // (InvalidArgument for a bad request, Aborted when a request was aborted,
  // DeadlineExceeded when one did not finish in time).
  virtual std::vector<std::vector<std::string>> generate(
      const std::vector<GenerationRequest>& requests) = 0;
  // The model's chat template applied to messages, the assistant's turn open.
  virtual std::string apply_chat_template(const std::vector<nn::ChatMessage>& messages) const = 0;
  // Token ids of `text` as the model sees it (chat markers parsed, no BOS).
  virtual std::vector<int64_t> tokenize(const std::string& text) const = 0;
  virtual std::string describe() const = 0;
};

class EngineGenerator : public Generator {
 public:
  // Starts an engine (errors of serve::Engine::create). `request_timeout`
  // bounds how long one generate() call may take.
  static std::unique_ptr<EngineGenerator> create(
      const serve::EngineOptions& options,
      std::chrono::milliseconds request_timeout = std::chrono::hours(2));
  ~EngineGenerator() override;

  // Adapters are loaded into the engine on first use, named by their folder.
  std::vector<std::vector<std::string>> generate(
      const std::vector<GenerationRequest>& requests) override;
  std::string apply_chat_template(const std::vector<nn::ChatMessage>& messages) const override;
  std::vector<int64_t> tokenize(const std::string& text) const override;
  std::string describe() const override;
  serve::Engine& engine() { return *engine_; }

 private:
  EngineGenerator(std::unique_ptr<serve::Engine> engine, std::chrono::milliseconds timeout);
  std::string adapter_name(const std::string& folder);
  std::unique_ptr<serve::Engine> engine_;
  std::chrono::milliseconds timeout_;
  std::mutex mu_;
  std::map<std::string, std::string> adapters_;  // folder -> engine name; guarded by mu_
};

}  // namespace tessera::synth
