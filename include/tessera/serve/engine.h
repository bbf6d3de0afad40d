// tessera/serve/engine.h — the serving engine: continuous batching over a
// paged KV cache, usable from C++ without any server.
//
// An Engine owns one model (dense or MoE; float, or packed int4 weights with
// W4A16 or QSPEC decoding), its tokenizer and chat template, a pool of KV
// blocks and a background thread that runs the Scheduler (scheduler.h) one
// model step at a time. Requests are submitted from any thread; their
// tokens come back through a callback as they are generated.
//
//   tessera::serve::EngineOptions options;
//   options.model = path;                            // GGUF file or Hugging Face folder
//   auto engine = tessera::serve::Engine::create(options);
//   tessera::serve::GenerateRequest r;
//   r.prompt_text = engine->apply_chat_template({{"user", "What is the capital of France?"}});
//   r.params.max_tokens = 32;
//   auto handle = engine->submit(r, [](const tessera::serve::TokenEvent& e) {
//     std::cout << e.text << std::flush;          // a piece of the answer
//     if (e.finished) std::cout << "\n";
//   });
//   handle.wait(std::chrono::seconds(30));         // or engine->cancel(handle.id())
//
// Guarantees (tested): greedy outputs under continuous batching equal the
// same request decoded alone (batch-invariant forwards: they equal
// nn::generate with SamplingOptions::batch_invariant at batch 1), with
// prefix-cache hits, chunked prefill and preemption; a seeded sampled
// request gives the same tokens whatever else runs; cancelling frees the
// request's blocks at the next step.
//
// How a step runs: Scheduler::schedule() picks the tokens (decodes first,
// then prefill chunks, within max_num_batched_tokens); copy-on-write block
// copies run; one paged forward (nn::ForwardOptions::paged) computes every
// scheduled token of every sequence, writing keys and values into the block
// pool and producing logits only where a token is sampled; each sequence
// samples from its own generator (seeded from the request's seed and the
// sample's index) under its JSON mask; text is detokenized with UTF-8
// characters held back until complete and checked against stop strings;
// Scheduler::update() records the tokens; events go out. With n > 1 the
// other samples fork from the first once the prompt is computed, sharing
// its blocks. With quantization "qspec", greedy decoding sequences draft
// qspec_gamma tokens in W4A4 and verify them in one W4A16 forward; the
// accepted tokens are fed to the scheduler over the next steps without
// model work (their keys and values are already in place).
//
// Thread-safety: every public method may be called from any thread. Token
// callbacks run on the engine thread, in order per request; they must not
// block for long and must not call wait() on their own request.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "tessera/nn/image.h"
#include "tessera/serve/scheduler.h"
#include "tessera/tokenizer/chat.h"

namespace tessera {
class MetricsRegistry;
}
namespace tessera::dist {
class ProcessGroup;
}

namespace tessera::serve {

struct EngineOptions {
  // The model: a Hugging Face folder (config.json + safetensors), a GGUF
  // file (its tokenizer and chat template come with it), or a packed
  // int4 .safetensors file written by quant::QuantizedModel::save. A folder
  // needs `tokenizer` (tokenizer.json) unless it holds one; a packed file
  // always does. A folder whose config.json has model_type idefics3, smolvlm
  // or llava is a vision-language model (nn::load_vlm_folder: tokenizer and
  // preprocessor_config.json from the folder): requests may then carry
  // images.
  std::string model;
  std::string tokenizer;
  // Name reported by /v1/models and in metrics' model_name label; empty:
  // the file or folder name.
  std::string model_name;
  // "fp" (the model's own weights in fp32, multiplied by
  // nn::linear_invariant), "w4a16" (packed int4, bf16 activations), or
  // "qspec" (W4A16, and greedy requests decode speculatively: W4A4 drafts
  // verified in W4A16 on the same cache; sampled requests, and those with
  // logprobs or json_object, decode plainly in W4A16).
  std::string quantization = "fp";
  // KV cache: block size in tokens and the pool, as a block count or a byte
  // budget (0 and 0: 512 MiB).
  int64_t block_size = 16;
  int64_t num_blocks = 0;
  int64_t kv_memory_bytes = 0;
  bool enable_prefix_caching = true;
  // Scheduling (SchedulerOptions): running sequences and per-step tokens.
  int64_t max_num_seqs = 16;
  int64_t max_num_batched_tokens = 2048;
  bool enable_chunked_prefill = true;
  int64_t priority_aging_steps = 0;  // 0: strict priorities
  // Longest prompt + generation; 0: the model's max_position_embeddings.
  int64_t max_model_len = 0;
  // LoRA / Mixture-of-Shards adapters a request may name, by name (PEFT
  // folders); more can be loaded at run time. At most `max_loaded_adapters`
  // stay resident (least recently used are unloaded; reloaded on use).
  std::map<std::string, std::string> adapters;
  int64_t max_loaded_adapters = 64;
  // Intra-op threads for the model (0: those of the thread calling create()).
  int num_threads = 0;
  // The chat template (ChatML family); empty: the GGUF's, or for a folder
  // the "chat_template" of its tokenizer_config.json when present.
  std::string chat_template;
  // QSPEC: tokens drafted per step by each greedy decoding sequence.
  int64_t qspec_gamma = 3;
  // Seeds the seeds of requests that bring none.
  uint64_t seed = 0;
  // Largest SamplingParams::logprobs accepted.
  int64_t max_logprobs = 20;
  // Vision-language models: images one request may carry.
  int64_t max_images_per_request = 8;
  // Tensor-parallel serving (Megatron-style shards, as nn::Transformer
  // splits them): the ranks that hold one model. Null or one rank: the
  // engine runs alone. Otherwise the group's rank 0 calls create() and
  // serves requests; every other rank calls Engine::run_tensor_parallel_rank
  // with the same options. Rank 0 schedules; each step it sends the batch
  // (tokens, positions, block tables, copy-on-write copies) to the other
  // ranks, and all run the forward on their shards and their heads' part
  // of the KV cache. Float weights ("fp") of text models without adapters;
  // the model's kv heads must split over the group. Not read from JSON.
  std::shared_ptr<dist::ProcessGroup> tensor_parallel;

  // Reads the keys above from a JSON object (strict: unknown keys are
  // InvalidArgument naming them; "adapters" is an object of name: folder).
  static EngineOptions from_json(const std::string& json_text,
                                 const std::string& source = "<inline>");
};

struct SamplingParams {
  int64_t max_tokens =
      16;  // >= 1; 0: up to max_model_len (what the context leaves after the prompt)
  double temperature = 1.0;  // 0: greedy
  double top_p = 1.0;        // (0, 1]
  int64_t top_k = 0;         // 0 (or -1): off
  // Seeded requests sample reproducibly whatever else runs; unseeded ones
  // draw their seed from the engine.
  std::optional<uint64_t> seed;
  std::vector<std::string> stop;  // stop strings (not included in the output)
  // In addition to the model's EOS. Like EOS, a stop token is reported in
  // TokenEvent::tokens but adds no text.
  std::vector<int64_t> stop_token_ids;
  bool ignore_eos = false;
  // Log-probability (under the model's raw distribution, before
  // temperature, top-k/top-p and the JSON mask) of each sampled token and of
  // the `logprobs` most likely alternatives (0: only the sampled one).
  // nullopt: none. At most EngineOptions::max_logprobs.
  std::optional<int64_t> logprobs;
  int64_t n = 1;             // parallel samples sharing the prompt's blocks; <= max_num_seqs
  bool json_object = false;  // constrain the output to one JSON object
  int64_t priority = 0;      // lower runs first (an int32)
};

struct GenerateRequest {
  // Either token ids or text (tokenized with the model's tokenizer; chat
  // markers are parsed as special tokens).
  std::vector<int64_t> prompt_tokens;
  std::string prompt_text;
  SamplingParams params;
  std::string adapter;  // "" : the base model
  // Echo the prompt's tokens (with their log-probabilities when
  // params.logprobs is set; NaN for the first, which has no context) in
  // the first event of each sample, as /v1/completions echo. Prompt
  // log-probabilities need every prompt position computed, so such a
  // request takes no prefix-cache hits.
  bool echo = false;
  // Extra prefix-cache namespace (vLLM's cache_salt): blocks are shared
  // only between requests with the same salt and adapter.
  std::string cache_salt;
  // Vision-language models: one image per "<image>" marker of prompt_text
  // (apply_chat_template with image counts places them), in order. At
  // submit() each is preprocessed as the model's processor does, its marker
  // expanded to the model's image tokens (they count as prompt tokens, in
  // the KV budget and in usage) and encoded once; the prefill then feeds
  // the image tokens' embeddings in place of the placeholders. Requests
  // with images share prefix-cache blocks only with requests carrying the
  // same images.
  std::vector<nn::Image> images;
};

struct TopLogprob {
  int64_t token = 0;
  std::string text;
  double logprob = 0;
};

// One step of one request's output (sample `index` of n).
struct TokenEvent {
  uint64_t request_id = 0;
  int64_t index = 0;
  std::vector<int64_t> tokens;   // new tokens (one per step; the prompt with echo)
  std::string text;              // their text, held back while it may be the start of a stop string
  std::vector<double> logprobs;  // per token, when asked
  std::vector<std::vector<TopLogprob>> top_logprobs;  // per token, when asked
  bool finished = false;
  std::string finish_reason;  // "stop", "length", "abort" (finished only)
  // Usage so far (prompt tokens, generated tokens of this sample).
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
  // Seconds since submit() of the first token of this sample (time to
  // first token), set on the event that carries it.
  double ttft_seconds = 0;
};

using TokenCallback = std::function<void(const TokenEvent&)>;

// A submitted request. Copyable; copies refer to the same request. A
// default-constructed handle refers to none (id 0; wait() returns true).
class RequestHandle {
 public:
  RequestHandle() = default;
  uint64_t id() const { return id_; }
  // Blocks until every sample has finished (its last event delivered) or
  // `timeout` passes; true when finished.
  bool wait(std::chrono::milliseconds timeout) const;
  bool finished() const;

  struct State;  // the engine's; opaque here

 private:
  friend class Engine;
  RequestHandle(uint64_t id, std::shared_ptr<State> state) : id_(id), state_(std::move(state)) {}
  uint64_t id_ = 0;
  std::shared_ptr<State> state_;
};

struct EngineStats {
  int64_t running = 0, waiting = 0;
  double kv_cache_usage = 0;  // fraction of blocks in use
  int64_t num_blocks = 0, free_blocks = 0;
  int64_t prefix_cache_queries = 0;  // tokens looked up
  int64_t prefix_cache_hits = 0;     // tokens found
  int64_t preemptions = 0;
  int64_t prompt_tokens = 0, generation_tokens = 0;  // totals
  int64_t steps = 0;                                 // schedule() calls that ran the model
  int64_t finished_requests = 0;
  // QSPEC: draft tokens proposed and accepted by the verifier.
  int64_t spec_drafted = 0, spec_accepted = 0;
};

class Engine {
 public:
  // Loads the model and starts the engine thread. InvalidArgument for bad
  // options, NotFound / DataLoss for model files (naming them).
  static std::unique_ptr<Engine> create(const EngineOptions& options);
  // Finishes nothing: running requests are aborted (finish_reason "abort").
  // Under tensor parallelism, also releases the other ranks.
  ~Engine();
  // A tensor-parallel rank other than 0 (EngineOptions::tensor_parallel):
  // loads this rank's shards with the options rank 0 gave create(), then
  // runs rank 0's steps until rank 0's Engine is destroyed, and returns.
  // The same errors as create() for bad options (every rank checks them
  // alike); Unavailable / DeadlineExceeded when rank 0 is gone.
  static void run_tensor_parallel_rank(const EngineOptions& options);

  // Queues a request. InvalidArgument (nothing queued) for an empty prompt,
  // bad parameters, an unknown adapter, or a prompt + max_tokens longer
  // than max_model_len (the message names the lengths); FailedPrecondition
  // after drain(). The callback (may be empty) gets every event.
  RequestHandle submit(const GenerateRequest& request, TokenCallback callback);
  // Aborts a request (its callback gets a final event with reason "abort")
  // and frees its blocks at the next step. Unknown or finished ids: no-op.
  void cancel(uint64_t request_id);
  // Stops accepting requests, lets queued and running ones finish for up to
  // `deadline`, aborts the rest (their last events delivered before it
  // returns). Returns true when everything finished in time.
  bool drain(std::chrono::milliseconds deadline);
  // False once drain() has begun or the engine is shutting down (submit()
  // then refuses).
  bool accepting() const;

  // Adapters at run time (vLLM's /v1/load_lora_adapter): InvalidArgument for
  // a name in use or a folder that is not a PEFT / MoS adapter of this model.
  void load_adapter(const std::string& name, const std::string& path);
  // NotFound for an unknown name; requests using it keep running.
  void unload_adapter(const std::string& name);
  // Names that requests may use, sorted.
  std::vector<std::string> adapters() const;

  const std::string& model_name() const;
  int64_t max_model_len() const;
  int64_t vocab_size() const;  // the model's (token ids are below it)
  // The model's chat template applied to messages, ending with the
  // assistant's turn opened.
  std::string apply_chat_template(const std::vector<nn::ChatMessage>& messages) const;
  // The same with images: images_per_message[i] "<image>" markers open
  // message i (the vision-language chat formats of nn::format_vlm_chat).
  // InvalidArgument when images are given to a model that takes none, or
  // the counts do not match the messages.
  std::string apply_chat_template(const std::vector<nn::ChatMessage>& messages,
                                  const std::vector<int64_t>& images_per_message) const;
  // True for a vision-language model (requests may carry images).
  bool accepts_images() const;
  int64_t max_images_per_request() const;
  // Chat markers in `text` are parsed as special tokens; no BOS is added.
  std::vector<int64_t> tokenize(const std::string& text) const;
  // Special tokens are dropped; ids past the tokenizer's vocabulary give
  // no text. InvalidArgument for an id outside [0, vocab_size()).
  std::string detokenize(const std::vector<int64_t>& tokens) const;

  EngineStats stats() const;
  // vLLM's metric names (vllm:num_requests_running, ...:kv_cache_usage_perc,
  // prefix_cache_queries/_hits, prompt/generation_tokens_total,
  // request_success_total{finished_reason}, histograms time_to_first_token_seconds,
  // inter_token_latency_seconds, e2e_request_latency_seconds,
  // request_queue_time_seconds), each labelled model_name.
  const MetricsRegistry& metrics() const;

  struct Impl;

 private:
  explicit Engine(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace tessera::serve
