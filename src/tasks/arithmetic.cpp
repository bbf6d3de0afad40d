#include "tessera/tasks/arithmetic.h"

#include <cctype>
#include <random>
#include <utility>

namespace tessera::tasks {

std::vector<ArithmeticExample> arithmetic_examples(int64_t count, uint64_t seed, int max_operand) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> operand(0, max_operand);
  std::vector<ArithmeticExample> out;
  for (int64_t i = 0; i < count; ++i) {
    int a = operand(rng), b = operand(rng);
    bool add = rng() % 2 == 0;
    if (!add && b > a) std::swap(a, b);
    ArithmeticExample e;
    e.prompt = "Q: " + std::to_string(a) + (add ? "+" : "-") + std::to_string(b) + "=? A: ";
    e.answer = std::to_string(add ? a + b : a - b);
    out.push_back(std::move(e));
  }
  return out;
}

namespace {
// The first number of a completion (after leading spaces), sign included; "" if none.
std::string first_number(const std::string& completion) {
  size_t i = 0;
  while (i < completion.size() && completion[i] == ' ') ++i;
  size_t j = i;
  if (j < completion.size() && completion[j] == '-') ++j;
  const size_t digits = j;
  while (j < completion.size() && std::isdigit(static_cast<unsigned char>(completion[j]))) ++j;
  return j > digits ? completion.substr(i, j - i) : std::string();
}
}  // namespace

ArithmeticScore score_arithmetic(const ArithmeticExample& example, const std::string& completion) {
  ArithmeticScore s;
  const std::string got = first_number(completion);
  s.exact = arithmetic_correct(example, completion);
  if (got.empty() || example.answer.empty()) return s;
  s.last_digit = got.back() == example.answer.back();
  s.length = got.size() == example.answer.size() && (got[0] == '-') == (example.answer[0] == '-');
  return s;
}

bool arithmetic_correct(const ArithmeticExample& example, const std::string& completion) {
  size_t i = 0;
  while (i < completion.size() && completion[i] == ' ') ++i;
  size_t j = i;
  if (j < completion.size() && completion[j] == '-') ++j;
  while (j < completion.size() && std::isdigit(static_cast<unsigned char>(completion[j]))) ++j;
  return j > i && completion.substr(i, j - i) == example.answer;
}

nn::ModelConfig small_arithmetic_config(int64_t vocab_size, int64_t num_experts) {
  nn::ModelConfig cfg;
  cfg.model_type = num_experts > 0 ? "mixtral" : "llama";
  cfg.vocab_size = vocab_size;
  cfg.hidden_size = 128;
  cfg.intermediate_size = 256;
  cfg.num_hidden_layers = 4;
  cfg.num_attention_heads = 4;
  cfg.num_key_value_heads = 2;
  cfg.max_position_embeddings = 256;
  if (num_experts > 0) {
    cfg.num_experts = num_experts;
    cfg.num_experts_per_tok = 2;
  }
  cfg.bos_token_id = vocab_size - 1;
  cfg.eos_token_ids = {vocab_size - 1};
  return cfg;
}

std::vector<int64_t> arithmetic_corpus(const nn::Tokenizer& tokenizer, int64_t count, uint64_t seed,
                                       int max_operand) {
  std::vector<int64_t> ids;
  for (const auto& e : arithmetic_examples(count, seed, max_operand)) {
    for (int32_t id : tokenizer.encode(e.prompt + e.answer + "\n")) ids.push_back(id);
  }
  return ids;
}

}  // namespace tessera::tasks
