// tessera/tasks/arithmetic.h — a toy task with checkable answers.
//
// Synthetic two-operand arithmetic ("Q: 37+48=? A: 85"), the small model
// the examples, tests and benchmarks train on it, and the rule that checks
// an answer. Not part of the training or serving API: it exists so that
// examples show learning within a minute on a CPU and tests can score
// generations exactly (rlhf's rule reward uses arithmetic_correct).
//
//   auto examples = tessera::tasks::arithmetic_examples(1000, /*seed=*/1);
//   auto ids = tessera::tasks::arithmetic_corpus(tokenizer, 20000, /*seed=*/2);
//   auto cfg = tessera::tasks::small_arithmetic_config(tokenizer.vocab_size());
//
// Pure functions; thread-safe.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "tessera/formats/model_config.h"
#include "tessera/tokenizer/tokenizer.h"

namespace tessera::tasks {

// One question and its answer, e.g. {"Q: 37+48=? A: ", "85"}.
struct ArithmeticExample {
  std::string prompt;  // "Q: 37+48=? A: "
  std::string answer;  // "85"
};

// `count` questions with operands in [0, max_operand]: sums, and
// differences that are never negative. Deterministic given the seed.
std::vector<ArithmeticExample> arithmetic_examples(int64_t count, uint64_t seed,
                                                   int max_operand = 99);

// Checks a completion: its first number (after leading spaces) equals the
// answer.
bool arithmetic_correct(const ArithmeticExample& example, const std::string& completion);

// Partial credit for a completion, to show what a small model learnt before
// it gets whole answers right: the first number's last digit, and its
// number of digits (sign included), compared with the answer's.
struct ArithmeticScore {
  bool exact = false;       // arithmetic_correct
  bool last_digit = false;  // the units digit is right
  bool length = false;      // as many digits (and the same sign) as the answer
};
ArithmeticScore score_arithmetic(const ArithmeticExample& example, const std::string& completion);

// A pretraining corpus: `count` seeded examples written as text one after
// another ("Q: 37+48=? A: 85\n..."), as `tokenizer`'s token ids.
std::vector<int64_t> arithmetic_corpus(const nn::Tokenizer& tokenizer, int64_t count, uint64_t seed,
                                       int max_operand = 99);

// The small model the examples and benchmarks train on that corpus: 4
// layers, hidden 128 (intermediate 256), 4 heads over 2 kv heads, 256
// positions, the tokenizer's last id as BOS and EOS. With `num_experts` > 0
// a mixtral (top-2 routing), otherwise a llama.
nn::ModelConfig small_arithmetic_config(int64_t vocab_size, int64_t num_experts = 0);

}  // namespace tessera::tasks
