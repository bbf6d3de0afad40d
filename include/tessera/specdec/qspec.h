// tessera/specdec/qspec.h — QSPEC: quantized speculative decoding.
//
// One model, one set of packed int4 weights (tessera::quant), one KV cache.
// Each step drafts gamma tokens autoregressively in an activation-quantized
// mode (W4A4 by default: integer kernels, cheap), then verifies all of them
// in one forward in the weight-only mode (W4A16: accurate). The verify
// forward rewrites the cache entries of the drafted positions with the
// verifier's keys and values; the cache is then cut back past the first
// rejected token, so no second model and no second cache exist.
//
// Acceptance is greedy (the longest prefix the verifier agrees with, plus
// the verifier's own next token) or, with temperature > 0, speculative
// rejection sampling, which leaves the verifier's distribution unchanged.
// Every forward runs batch-invariant (nn::ForwardOptions::batch_invariant),
// so greedy QSPEC output equals greedy W4A16 decoding token for token.
//
//   auto packed = tessera::quant::QuantizedModel::pack(model, {.group_size = 64});
//   model.set_linear_override(packed);
//   tessera::specdec::GenerateOptions opts;   // QSPEC by default
//   opts.sampling.max_new_tokens = 64;
//   auto out = tessera::specdec::generate(model, *packed, prompts, opts);
//   // out.stats.acceptance_rate(), out.stats.tokens_per_verify()
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "tessera/nn/generate.h"
#include "tessera/nn/model.h"
#include "tessera/quant/model.h"

namespace tessera::specdec {

struct QSpecOptions {
  int64_t gamma = 3;  // tokens drafted per step (the starting value when adaptive)
  // Choose gamma in [min_gamma, max_gamma] step by step from the measured
  // throughput of each value (tokens emitted per second of draft + verify,
  // summed over the steps run with it): min_gamma early, untried neighbours
  // of the best so far next, then the best, with a neighbour tried after
  // `explore_every` steps; each try that does not change the best doubles
  // that wait (up to 32x). gamma = 0 is plain decoding
  // in the verify mode, so with min_gamma = 0 QSPEC falls back to W4A16
  // where drafting does not pay (as on CPUs where a draft forward costs what
  // a verify forward does). Greedy output stays equal to W4A16's whatever
  // gamma runs.
  bool adaptive_gamma = false;
  int64_t min_gamma = 1, max_gamma = 8;
  int64_t explore_every = 8;
  quant::Mode draft_mode = quant::Mode::kW4A4;
  quant::Mode verify_mode = quant::Mode::kW4A16;
};

// How to decode: QSPEC (speculative), or plain autoregressive decoding in
// one mode of the packed weights (quant::Mode::kFloat: the model's own).
struct GenerateOptions {
  bool speculative = true;
  quant::Mode mode = quant::Mode::kW4A16;  // plain decoding (speculative = false)
  nn::SamplingOptions sampling;            // temperature 0: greedy
  QSpecOptions qspec;
};

// Sets `options` from a decoding name: "qspec", or a plain mode "fp",
// "w4a16", "w4a8", "w4a4". InvalidArgument naming the text otherwise.
void parse_decoding(const std::string& name, GenerateOptions* options);
// "qspec", or the plain mode's name.
std::string decoding_name(const GenerateOptions& options);

struct SpecStats {
  int64_t verify_steps = 0;  // per sequence: one verify forward each
  int64_t drafted = 0;       // draft tokens proposed
  int64_t accepted = 0;      // draft tokens the verifier accepted
  int64_t emitted = 0;       // tokens produced by verify steps (accepted + one each)
  double draft_seconds = 0, verify_seconds = 0;
  std::vector<int64_t> steps_per_gamma;  // batch steps run with each gamma (index = gamma)
  double acceptance_rate() const { return drafted ? static_cast<double>(accepted) / drafted : 0.0; }
  double tokens_per_verify() const {
    return verify_steps ? static_cast<double>(emitted) / verify_steps : 0.0;
  }
  // Mean number of draft tokens kept per verify step.
  double mean_accepted() const {
    return verify_steps ? static_cast<double>(accepted) / verify_steps : 0.0;
  }
};

struct GenerationResult : nn::GenerationResult {
  SpecStats stats;
};

// Generates for each prompt (a batch; prompts may differ in length). The
// model must have `packed` installed as its linear override unless decoding
// plainly in kFloat. Single-rank models; fp32 CPU (batch-invariant
// forwards). Sets packed's mode during the call and restores it afterwards.
// Plain decoding is nn::generate with batch-invariant forwards. Not
// thread-safe with other users of `model` or `packed`.
GenerationResult generate(nn::Transformer& model, quant::QuantizedModel& packed,
                          const std::vector<std::vector<int64_t>>& prompts,
                          const GenerateOptions& options);

// The same, also handing back the KV cache as it stands after the last
// step (every kept entry is the verifier's), for inspection.
GenerationResult generate(nn::Transformer& model, quant::QuantizedModel& packed,
                          const std::vector<std::vector<int64_t>>& prompts,
                          const GenerateOptions& options, std::unique_ptr<nn::KVCache>* cache_out);

// The sampling distribution `options` applies to logits [N, V]
// (temperature, top-k, top-p), as probabilities [N, V] in fp32.
at::Tensor sampling_probs(const at::Tensor& logits, const nn::SamplingOptions& options);

// One speculative step's acceptance for one sequence.
struct Acceptance {
  int64_t accepted = 0;    // leading draft tokens kept
  int64_t next_token = 0;  // the token after them (the verifier's, or a resample)
};
// Greedy: verifier logits [gamma + 1, V] (row i predicts the token after
// draft i - 1), draft tokens [gamma].
Acceptance accept_greedy(const at::Tensor& verifier_logits, const std::vector<int64_t>& draft);
// Rejection sampling (Leviathan et al. / Chen et al.): p [gamma + 1, V]
// verifier probabilities, q [gamma, V] draft probabilities the draft tokens
// were sampled from. Draft i is kept with probability min(1, p_i/q_i); the
// first rejected position resamples from max(0, p - q) normalised; if all
// are kept the next token comes from p[gamma]. The emitted tokens are
// distributed exactly as sampling from p one token at a time.
Acceptance accept_sampled(const at::Tensor& p, const at::Tensor& q,
                          const std::vector<int64_t>& draft, at::Generator& generator);

}  // namespace tessera::specdec
