// Internal to the serving engine: token sampling, log-probabilities and
// UTF-8-safe streaming of detokenized bytes.
//
// Every function computes on one row of logits and, when it draws, on the
// generator it is given, so a sequence's samples depend only on its own
// logits and seed, never on what else runs in the batch.
//
// Thread-safety: free functions are pure; SampleRng and Utf8Stream are
// value types, one per sequence.
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace tessera::serve::detail {

// A sequence's random stream: 53-bit uniform doubles from a 64-bit
// Mersenne twister (the same numbers on every platform).
class SampleRng {
 public:
  explicit SampleRng(uint64_t seed) : engine_(seed) {}
  // In [0, 1).
  double uniform() { return static_cast<double>(engine_() >> 11) * 0x1.0p-53; }

 private:
  std::mt19937_64 engine_;
};

// The seed of sample `index` of a request seeded with `seed` (SplitMix64 of
// both, so neighbouring seeds and indices give unrelated streams).
uint64_t sample_seed(uint64_t seed, int64_t index);

struct SamplingConfig {
  double temperature = 0;  // <= 0: greedy
  double top_p = 1;        // (0, 1]
  int64_t top_k = 0;       // <= 0: off
};

// Index of the largest logit among allowed tokens (allowed null: all);
// ties go to the lowest index. -1 when nothing is allowed.
int64_t argmax(const float* logits, int64_t vocab, const uint8_t* allowed);

// Greedy, or a draw from softmax(logits / temperature) restricted to the
// top_k largest and then to the smallest set of most likely tokens whose
// probabilities reach top_p (a token is dropped when the tokens ranked
// above it already reach top_p), over allowed tokens only. -1 when nothing
// is allowed. `scratch` is reused between calls.
int64_t sample_token(const float* logits, int64_t vocab, const SamplingConfig& config,
                     const uint8_t* allowed, SampleRng& rng,
                     std::vector<std::pair<float, int64_t>>* scratch);

// Log-probability of `token` under softmax(logits) (the model's raw
// distribution) and the `top` most likely tokens with theirs (most likely
// first, ties by lower id).
struct TokenLogprobs {
  double logprob = 0;
  std::vector<std::pair<int64_t, double>> top;
};
TokenLogprobs token_logprobs(const float* logits, int64_t vocab, int64_t token, int64_t top);

// Detokenized bytes in, whole UTF-8 characters out: a trailing incomplete
// sequence is held back until the bytes completing it arrive; bytes that
// can never be part of a valid character become U+FFFD.
class Utf8Stream {
 public:
  std::string feed(std::string_view bytes);
  // The held-back tail, as U+FFFD when there is one.
  std::string flush();

 private:
  std::string held_;
};

}  // namespace tessera::serve::detail
