#include "tessera/nn/generate.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>

#include "tessera/core/error.h"
#include "tessera/core/metrics.h"

namespace tessera::nn {

at::Tensor sample_next(const at::Tensor& logits, const SamplingOptions& options,
                       at::Generator& generator) {
  TESSERA_CHECK(logits.dim() == 2, InvalidArgument, "sample_next: logits must be [batch, vocab]");
  if (options.temperature <= 0) return logits.argmax(-1);
  at::Tensor scaled = logits.to(at::kFloat) / options.temperature;
  if (options.top_k > 0 && options.top_k < scaled.size(-1)) {
    at::Tensor kth = std::get<0>(scaled.topk(options.top_k, -1)).narrow(-1, options.top_k - 1, 1);
    scaled = scaled.masked_fill(scaled < kth, -std::numeric_limits<float>::infinity());
  }
  if (options.top_p < 1.0) {
    auto [sorted, idx] = scaled.sort(-1, /*descending=*/true);
    at::Tensor cum = at::softmax(sorted, -1).cumsum(-1);
    // Drop a token when the tokens before it already reach top_p.
    at::Tensor drop = (cum - at::softmax(sorted, -1)) > options.top_p;
    sorted = sorted.masked_fill(drop, -std::numeric_limits<float>::infinity());
    scaled = at::empty_like(scaled).scatter_(-1, idx, sorted);
  }
  at::Tensor probs = at::softmax(scaled, -1);
  return at::multinomial(probs, 1, /*replacement=*/false, generator).squeeze(-1);
}

PaddedPrompts pad_prompts(const std::vector<std::vector<int64_t>>& prompts) {
  TESSERA_CHECK(!prompts.empty(), InvalidArgument, "generate: no prompts");
  PaddedPrompts out;
  const int64_t B = static_cast<int64_t>(prompts.size());
  std::vector<int64_t> lens(B);
  for (int64_t b = 0; b < B; ++b) {
    TESSERA_CHECK(!prompts[b].empty(), InvalidArgument, "generate: prompt ", b, " is empty");
    lens[b] = static_cast<int64_t>(prompts[b].size());
    out.longest = std::max(out.longest, lens[b]);
  }
  out.ids = at::zeros({B, out.longest}, at::kLong);
  for (int64_t b = 0; b < B; ++b) {
    out.ids[b].narrow(0, 0, lens[b]).copy_(at::tensor(prompts[b], at::kLong));
  }
  out.lengths = at::tensor(lens, at::kLong);
  return out;
}

GenerationResult generate(Transformer& model, const std::vector<std::vector<int64_t>>& prompts,
                          const SamplingOptions& options) {
  return generate(model, prompts, options, nullptr);
}

GenerationResult generate(Transformer& model, const std::vector<std::vector<int64_t>>& prompts,
                          const SamplingOptions& options, std::unique_ptr<KVCache>* cache_out) {
  return translate_errors(
      "generate",
      [&] {
        TESSERA_CHECK(options.use_cache || cache_out == nullptr, InvalidArgument,
                      "generate: no cache to hand back with use_cache = false");
        const PaddedPrompts padded = pad_prompts(prompts);
        TESSERA_CHECK(options.max_new_tokens >= 0, InvalidArgument, "generate: max_new_tokens < 0");
        at::NoGradGuard no_grad;
        const int64_t B = static_cast<int64_t>(prompts.size());
        const int64_t longest = padded.longest;
        auto gen = at::make_generator<at::CPUGeneratorImpl>(options.seed);

        GenerationResult result;
        result.tokens.assign(B, {});
        result.finish_reason.assign(B, "length");
        std::vector<bool> done(B, options.max_new_tokens == 0);
        auto is_stop = [&](int64_t t) {
          return std::find(options.stop_tokens.begin(), options.stop_tokens.end(), t) !=
                 options.stop_tokens.end();
        };
        auto accept = [&](const at::Tensor& next) {
          auto acc = next.accessor<int64_t, 1>();
          for (int64_t b = 0; b < B; ++b) {
            if (done[b]) continue;
            result.tokens[b].push_back(acc[b]);
            ++result.new_tokens;
            if (is_stop(acc[b])) {
              done[b] = true;
              result.finish_reason[b] = "stop";
            } else if (static_cast<int64_t>(result.tokens[b].size()) >= options.max_new_tokens) {
              done[b] = true;
            }
          }
        };
        auto all_done = [&] {
          return std::all_of(done.begin(), done.end(), [](bool d) { return d; });
        };

        const at::ScalarType dtype = model.named_parameters().front().second.scalar_type();
        if (!options.use_cache) {
          // Reference path: every step runs each sequence from its first token.
          Stopwatch watch;
          while (!all_done()) {
            std::vector<int64_t> next(B, 0);
            for (int64_t b = 0; b < B; ++b) {
              if (done[b]) continue;
              std::vector<int64_t> seq = prompts[b];
              seq.insert(seq.end(), result.tokens[b].begin(), result.tokens[b].end());
              at::Tensor ids = at::tensor(seq, at::kLong).view({1, -1});
              ForwardOptions one;
              one.batch_invariant = options.batch_invariant;
              if (!options.sequence_adapters.empty()) {
                one.sequence_adapters = at::full({1}, options.sequence_adapters[b], at::kLong);
              }
              at::Tensor logits = model.forward(ids, one).logits.select(1, ids.size(1) - 1);
              next[b] = sample_next(logits, options, gen).item<int64_t>();
            }
            accept(at::tensor(next, at::kLong));
          }
          result.decode_seconds = watch.seconds();
          return result;
        }

        auto cache = std::make_unique<KVCache>(
            model.config(), B, longest + std::max<int64_t>(options.max_new_tokens, 1),
            at::TensorOptions().dtype(dtype), model.groups().tp_size());
        result.cache_bytes = cache->bytes();
        Stopwatch watch;
        ForwardOptions fwd;
        fwd.cache = cache.get();
        fwd.batch_invariant = options.batch_invariant;
        fwd.lengths = padded.lengths;
        fwd.last_logits_only = true;
        if (!options.sequence_adapters.empty()) {
          TESSERA_CHECK(static_cast<int64_t>(options.sequence_adapters.size()) == B,
                        InvalidArgument, "generate: ", options.sequence_adapters.size(),
                        " adapter ids for ", B, " prompts");
          fwd.sequence_adapters = at::tensor(options.sequence_adapters, at::kLong);
        }
        at::Tensor logits = model.forward(padded.ids, fwd).logits.select(1, 0);
        if (!all_done()) accept(sample_next(logits, options, gen));
        result.prefill_seconds = watch.seconds();
        watch.reset();
        fwd.lengths = at::ones({B}, at::kLong);
        while (!all_done()) {
          at::Tensor last = at::empty({B, 1}, at::kLong);
          for (int64_t b = 0; b < B; ++b) {
            last[b][0] = result.tokens[b].empty() ? 0 : result.tokens[b].back();
          }
          logits = model.forward(last, fwd).logits.select(1, 0);
          accept(sample_next(logits, options, gen));
        }
        result.decode_seconds = watch.seconds();
        if (cache_out) *cache_out = std::move(cache);
        return result;
      },
      ErrorCode::kInvalidArgument);
}

}  // namespace tessera::nn
