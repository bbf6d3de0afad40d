// tessera/nn/generate.h — batched text generation with a KV cache.
//
// Prompts of different lengths run as one batch: the prefill pads them on
// the right and records each sequence's real length in the cache, so every
// later step appends at each sequence's own position. Sampling is greedy
// (temperature 0) or temperature / top-k / top-p with a seeded generator, so
// runs repeat exactly.
//
//   tessera::nn::SamplingOptions opts;
//   opts.max_new_tokens = 32;
//   opts.stop_tokens = {eos};
//   auto result = tessera::nn::generate(model, {{1, 2, 3}, {4, 5}}, opts);
//   // result.tokens[i]: the new tokens of prompt i (stop token included)
//
// Thread safety: generate() runs forwards of its model, which are not
// thread-safe: one generate() per model at a time. sample_next() and
// pad_prompts() are thread-safe.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "tessera/nn/model.h"

namespace tessera::nn {

struct SamplingOptions {
  double temperature = 0.0;  // 0: greedy (argmax)
  int64_t top_k = 0;         // 0: no top-k filter
  double top_p = 1.0;        // 1: no nucleus filter
  uint64_t seed = 0;
  int64_t max_new_tokens = 64;
  std::vector<int64_t> stop_tokens;  // generation of a sequence ends after one of these
  // Per prompt: which adapter of the model's LinearAdapter to use (-1:
  // none). Empty: the adapter's default.
  std::vector<int64_t> sequence_adapters;
  // false: recompute the whole sequence every step (a reference for tests;
  // quadratic cost).
  bool use_cache = true;
  // Forwards run batch-invariant (ForwardOptions::batch_invariant): each
  // sequence's tokens do not depend on what else is in the batch. fp32 CPU
  // models; what speculative decoding's exactness rests on.
  bool batch_invariant = false;
};

struct GenerationResult {
  std::vector<std::vector<int64_t>> tokens;  // new tokens per prompt
  std::vector<std::string> finish_reason;    // "stop" or "length"
  int64_t new_tokens = 0;                    // summed over prompts
  double prefill_seconds = 0;
  double decode_seconds = 0;
  int64_t cache_bytes = 0;
};

// Collective under tensor/expert parallelism (every rank of the replica
// calls it with the same prompts and options).
GenerationResult generate(Transformer& model, const std::vector<std::vector<int64_t>>& prompts,
                          const SamplingOptions& options);

// The same, also handing back the KV cache as it stands after the last step
// (use_cache must be true).
GenerationResult generate(Transformer& model, const std::vector<std::vector<int64_t>>& prompts,
                          const SamplingOptions& options, std::unique_ptr<KVCache>* cache_out);

// Prompts right-padded with 0 into one batch, as generate() and
// specdec::generate() prefill them.
struct PaddedPrompts {
  at::Tensor ids;      // [B, longest] int64
  at::Tensor lengths;  // [B] int64
  int64_t longest = 0;
};
// InvalidArgument for no prompts or an empty one.
PaddedPrompts pad_prompts(const std::vector<std::vector<int64_t>>& prompts);

// Next token per row of logits [B, V] under `options` (greedy when
// temperature is 0). `generator` must be a CPU generator.
at::Tensor sample_next(const at::Tensor& logits, const SamplingOptions& options,
                       at::Generator& generator);

}  // namespace tessera::nn
