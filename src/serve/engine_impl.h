// Internal to the serving engine: Engine::Impl and the state of requests
// and samples. engine.cpp holds the public API and model loading,
// engine_loop.cpp the engine thread (scheduling, the model step, sampling,
// events).
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "adapters.h"
#include "sampling.h"
#include "tensor_parallel.h"
#include "tessera/core/metrics.h"
#include "tessera/lora/lora.h"
#include "tessera/nn/model.h"
#include "tessera/nn/vlm.h"
#include "tessera/quant/model.h"
#include "tessera/serve/engine.h"
#include "tessera/serve/json_grammar.h"
#include "tessera/serve/stop.h"
#include "tessera/tokenizer/tokenizer.h"

namespace tessera::serve {

using Clock = std::chrono::steady_clock;

struct RequestHandle::State {
  std::mutex mu;
  std::condition_variable cv;
  bool finished = false;  // guarded by mu
};

namespace detail {

struct RequestState;

// One generated sequence (sample `index` of its request). Touched by the
// engine thread only, except that submit() creates the first one.
struct SampleState {
  RequestState* request = nullptr;
  int64_t index = 0;
  SequenceId seq = -1;  // in the scheduler; -1 before a fork
  SampleRng rng{0};
  Utf8Stream utf8;
  StopStringMatcher stops;
  std::optional<JsonRecognizer> json;
  int64_t generated = 0;  // tokens reported so far
  bool finished = false;
  bool echoed = false;
  Clock::time_point last_token_time;
  // QSPEC: tokens the verifier already decided, fed to the scheduler one
  // per step; positions <= kv_valid_until hold their verified keys and
  // values, in blocks spec_table names (scratch blocks past the real
  // table); scratch: the scratch blocks held.
  std::deque<int64_t> queued;
  int64_t kv_valid_until = -1;
  std::vector<int32_t> spec_table;
  std::vector<int32_t> scratch;
};

// One submitted request.
struct RequestState {
  uint64_t id = 0;
  GenerateRequest request;  // prompt_text cleared once tokenized
  std::vector<int64_t> prompt;
  TokenCallback callback;
  std::shared_ptr<RequestHandle::State> handle;
  std::shared_ptr<lora::Adapter> adapter;  // pinned for the request's lifetime
  std::string salt;
  std::vector<int64_t> stop_token_ids;  // EOS (unless ignore_eos) and the request's own
  SamplingConfig sampling;
  uint64_t seed = 0;
  Clock::time_point submitted;
  bool scheduled = false;  // first admitted (queue time, prompt tokens counted)
  bool first_token = false;
  bool forked = false;  // samples 1..n-1 created
  int64_t finished_samples = 0;
  std::vector<std::unique_ptr<SampleState>> samples;
  // Vision-language models: the image tokens' embeddings [n, hidden] (the
  // connector's output, computed once at submit) and the prompt positions
  // they go to, ascending (row k to image_positions[k]).
  at::Tensor image_embeds;
  std::vector<int64_t> image_positions;
  // Echo with logprobs: log-probabilities of prompt tokens 1..P-1 (NaN
  // for token 0), filled from the prefill's logits.
  std::vector<double> prompt_logprobs;
  std::vector<std::vector<TopLogprob>> prompt_top;
  int64_t prompt_logprobs_done = 0;  // prompt positions whose logits were read
};

// One event for the callback of `request`, delivered outside the lock.
struct PendingEvent {
  std::shared_ptr<RequestState> request;
  TokenEvent event;
  bool request_done = false;  // the request's last event: notify its handle after delivery
};

}  // namespace detail

struct Engine::Impl {
  EngineOptions options;
  std::string name;
  int64_t max_len = 0;
  int64_t vocab = 0;

  // The model (read by the engine thread; loaders and adapters read its
  // config and parameter names from any thread): owned_model for a text
  // model, the language model of `vlm` for a vision-language model.
  std::unique_ptr<nn::Transformer> owned_model;
  nn::Transformer* model = nullptr;
  // Vision-language models: the folder's model, tokenizer and processor.
  // submit() runs its vision encoder and connector (never the language
  // model) under vision_mu, on the calling thread.
  std::unique_ptr<nn::LoadedVlm> vlm;
  std::mutex vision_mu;
  std::shared_ptr<quant::QuantizedModel> packed;  // null for "fp"
  bool qspec = false;
  std::optional<nn::Tokenizer> tokenizer;
  std::string chat_template;
  std::vector<int64_t> eos_ids;
  std::unique_ptr<nn::PagedKVCache> cache;
  // Tensor parallelism (EngineOptions::tensor_parallel of more than one
  // rank), else null. Rank 0 runs the engine thread and sends each step to
  // the others (tensor_parallel.h).
  std::shared_ptr<dist::ProcessGroup> tp;
  int64_t manager_blocks = 0;  // blocks the scheduler hands out: [0, manager_blocks)
  std::vector<int32_t>
      free_scratch;  // QSPEC scratch blocks: [manager_blocks, total); engine thread
  std::unique_ptr<detail::AdapterRegistry> adapters;

  // Constrained decoding, built on the first json_object request.
  std::once_flag json_once;
  std::unique_ptr<JsonTokenMasker> json_masker;
  const JsonTokenMasker& json();

  // Engine thread: the AdapterBank of adapters pinned by live requests.
  std::shared_ptr<lora::AdapterBank> bank;
  std::vector<lora::Adapter*> bank_members;

  MetricsRegistry metrics;
  Gauge* running_gauge = nullptr;
  Gauge* waiting_gauge = nullptr;
  Gauge* kv_usage_gauge = nullptr;
  Counter* prefix_queries = nullptr;
  Counter* prefix_hits = nullptr;
  Counter* prompt_tokens_total = nullptr;
  Counter* generation_tokens_total = nullptr;
  Histogram* ttft = nullptr;
  Histogram* itl = nullptr;
  Histogram* e2e = nullptr;
  Histogram* queue_time = nullptr;
  Counter& success(FinishReason reason);

  // Shared state, guarded by mu.
  std::mutex mu;
  std::condition_variable wake;      // the engine thread waits on it
  std::condition_variable progress;  // drain() waits on it
  std::unique_ptr<Scheduler> scheduler;
  std::map<uint64_t, std::shared_ptr<detail::RequestState>> requests;
  std::unordered_map<SequenceId, detail::SampleState*> by_seq;
  std::vector<uint64_t> pending_cancels;
  bool accepting = true;
  bool stopping = false;
  uint64_t next_id = 1;
  std::mt19937_64 seed_source;
  int64_t prompt_tokens = 0, generation_tokens = 0, steps = 0, finished_requests = 0;
  int64_t spec_drafted = 0, spec_accepted = 0;
  PrefixCacheStats prefix_seen;  // what the counters have been told

  std::thread thread;

  // engine.cpp
  void load(const EngineOptions& options);
  // Submit-time image work for `r` (prompt text with one "<image>" marker
  // per image): preprocess, expand markers, tokenize into r.prompt, encode
  // the images into r.image_embeds / r.image_positions.
  void prepare_images(detail::RequestState& r, const std::string& prompt_text);
  std::string token_bytes(int64_t token) const;
  std::vector<int64_t> encode(const std::string& text) const;

  // engine_loop.cpp
  void run();
};

}  // namespace tessera::serve
