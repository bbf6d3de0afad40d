// tessera/synth/labeller.h — failure labellers: whether a target model's
// responses to an instruction count as a failure, as plug-ins of the
// ReverseGen pipeline.
//
// A labeller states what it needs from the target (the greedy response,
// and/or n sampled ones), may refuse an instruction before the target sees
// it (a math problem it cannot check), and labels the responses. Two are
// provided:
//   MathLabeller     the greedy answer's last number disagrees with the
//                    value the verifier computes (synth/math.h);
//   EntropyLabeller  honesty: the entropy of the answers over n samples
//                    exceeds a threshold (the model does not consistently
//                    know the answer, so it should say so rather than guess).
//
//   tessera::synth::MathLabeller math;
//   auto pre = math.precheck("What is 12 * 12?");        // valid, reference 144
//   auto label = math.label("What is 12 * 12?", {.greedy = "It is 124."});  // failure
//
// Thread safety: labellers are immutable after construction; label() and
// the other const methods may run concurrently.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "tessera/synth/math.h"

namespace tessera::synth {

// The target's responses to one instruction.
struct TargetResponses {
  std::string greedy;                // empty when the labeller did not ask for it
  std::vector<std::string> samples;  // as many as asked for
};

struct FailureLabel {
  bool valid = true;      // the instruction can be judged
  bool failure = false;   // the target failed it (valid only)
  std::string reason;     // why not valid, or what the judgement rests on
  std::string reference;  // the correct answer when known ("" otherwise)
  std::string answer;     // the target's answer as judged
  double score = 0;       // math: 1 wrong / 0 right; entropy: the entropy in nats
};

// What a labeller asks of the target per instruction.
struct TargetQuery {
  bool greedy = true;
  int64_t samples = 0;       // sampled responses
  double temperature = 1.0;  // for the samples
};

class FailureLabeller {
 public:
  virtual ~FailureLabeller() = default;
  virtual std::string name() const = 0;
  virtual TargetQuery query() const = 0;
  // Called before the target answers; an invalid label skips the target.
  // Default: every instruction is valid.
  virtual FailureLabel precheck(const std::string& instruction) const;
  virtual FailureLabel label(const std::string& instruction,
                             const TargetResponses& responses) const = 0;
  // A response the target should learn to give (for the final fine-tuning),
  // or "" when the labeller knows none.
  virtual std::string good_response(const std::string& instruction) const { return ""; }
};

class MathLabeller : public FailureLabeller {
 public:
  explicit MathLabeller(MathProblemOptions options = {}) : options_(options) {}
  std::string name() const override { return "math"; }
  TargetQuery query() const override { return {true, 0, 1.0}; }
  // Invalid unless parse_math_problem() vouches for the text.
  FailureLabel precheck(const std::string& instruction) const override;
  FailureLabel label(const std::string& instruction,
                     const TargetResponses& responses) const override;
  // worked_solution() of the problem.
  std::string good_response(const std::string& instruction) const override;

 private:
  MathProblemOptions options_;
};

// Entropy in nats of the empirical distribution of `keys` (0 for one
// distinct key; log n for n distinct keys). InvalidArgument when empty.
double answer_entropy(const std::vector<std::string>& keys);

// The key an answer counts as for the entropy: its last number when it has
// one ("... is 1,250." -> "1250"), else its first line lower-cased with
// punctuation and surrounding space removed.
std::string default_answer_key(const std::string& response);

struct EntropyLabellerOptions {
  int64_t samples = 10;
  double temperature = 1.0;
  // Failure when the entropy exceeds this, in nats. With 10 samples: 0 for
  // one answer throughout, 0.33 for a 9/1 split, 0.61 for 7/3, 0.69 for
  // 5/5, 0.80 for 6/3/1, 2.30 for ten different answers.
  double threshold = 0.5;
  std::function<std::string(const std::string&)> answer_key = default_answer_key;
};

class EntropyLabeller : public FailureLabeller {
 public:
  // InvalidArgument for samples < 2 or a negative threshold.
  explicit EntropyLabeller(EntropyLabellerOptions options = {});
  std::string name() const override { return "honesty"; }
  TargetQuery query() const override;
  // Invalid when fewer responses than `samples` came back.
  FailureLabel label(const std::string& instruction,
                     const TargetResponses& responses) const override;

 private:
  EntropyLabellerOptions options_;
};

}  // namespace tessera::synth
