// tessera/synth/reversegen.h — ReverseGen (Li et al., "Forewarned is
// Forearmed: Leveraging LLMs for Data Synthesis through Failure-Inducing
// Exploration", ICLR 2025): a proposer model learns to write instructions
// that make a target model fail, and the target is fine-tuned on them.
//
// Stages, each kept in files under work_dir so that a killed run resumes
// where it stopped (JSONL records appended and fsynced as work finishes;
// training checkpoints every few steps; a stage's summary written last marks
// it done):
//   warm_up()        the proposer (base model + LoRA A0) learns by SFT to
//                    continue few-shot prompts of seed tasks with a new one;
//   run_round(r)     the proposer of round r samples many instructions per
//                    few-shot prompt (through the serving engine), MinHash
//                    removes near duplicates (of each other and of the
//                    seeds), the target answers, the labeller marks failures,
//                    pairs (failure-inducing instruction preferred over one
//                    the target solved, or one the labeller cannot judge,
//                    same prompt) train the proposer by DPO: proposer r+1;
//   sft_target()     the target (base + a fresh LoRA) is fine-tuned on
//                    instructions with good responses (the labeller's);
//   evaluate()       the target's failure rate on a held-out set.
//
// The DPO reference is the warm-up proposer, with no second copy of the
// weights: training loads the base, merges A0 into it, and trains a second
// LoRA A1 (continued from round to round) whose reference forward is the
// merged model with A1 detached. For generation the engine needs one
// adapter per request, so proposer r is written as one LoRA of rank
// rank(A0) + rank(A1) whose product equals A0's plus A1's (compose_lora).
//
//   tessera::synth::ReverseGenOptions o;
//   o.work_dir = "runs/rg";
//   o.model = smollm2_gguf;
//   o.seed_tasks = tessera::synth::arithmetic_problems(200, 1);
//   auto gen = std::shared_ptr<tessera::synth::Generator>(EngineGenerator::create(engine_options));
//   tessera::synth::ReverseGen rg(o, std::make_shared<tessera::synth::MathLabeller>(), gen);
//   rg.warm_up();
//   for (int r = 0; r < 3; ++r) rg.run_round(r);
//   auto last = rg.run_round(3, /*train=*/false);  // the final proposer's instructions
//
// Thread safety: not thread-safe (one stage at a time); the files of a
// work_dir belong to one process at a time.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "tessera/lora/lora.h"
#include "tessera/nn/model.h"
#include "tessera/synth/generator.h"
#include "tessera/synth/labeller.h"
#include "tessera/synth/minhash.h"

namespace tessera::synth {

// LoRA fine-tuning (SFT or DPO) knobs.
struct LoraTrainingOptions {
  int64_t rank = 8;
  double alpha = 16;
  std::vector<std::string> target_modules{"q_proj", "k_proj", "v_proj", "o_proj"};
  int64_t batch = 8;  // examples (SFT) or pairs (DPO) per step
  int64_t epochs = 1;
  double lr = 1e-3;
  int64_t warmup_steps = 2;
  int64_t max_length = 320;      // tokens per row, prompt truncated from the left
  int64_t checkpoint_every = 4;  // steps between resumable checkpoints
};

struct ReverseGenOptions {
  std::string work_dir;
  // The model the target and the proposer start from: a GGUF file or a
  // Hugging Face folder (then `tokenizer`, or its tokenizer.json). Training
  // loads it; the generator must serve the same model.
  std::string model;
  // Appended to responses the models learn (ends the assistant's turn).
  std::string end_of_turn = "<|im_end|>";
  std::vector<std::string> seed_tasks;
  int64_t shots = 3;  // seed examples per proposer prompt
  std::string proposer_instruction =
      "Write one new question of the same kind. Reply with the question only.";
  // Warm-up SFT of the proposer (A0).
  int64_t warmup_examples = 192;
  LoraTrainingOptions warmup;
  // Rounds.
  int64_t prompts_per_round = 24;
  int64_t samples_per_prompt = 8;
  double proposer_temperature = 1.0;
  double proposer_top_p = 1.0;
  int64_t proposer_max_tokens = 48;
  MinHashOptions minhash;
  // The target's prompt: the instruction, then this suffix.
  std::string target_suffix = "";
  int64_t target_max_tokens = 64;
  // Preference pairs: at most this many per prompt; instructions the
  // labeller cannot judge may serve as the rejected side.
  int64_t max_pairs_per_prompt = 2;
  bool invalid_as_rejected = true;
  double dpo_beta = 0.1;
  LoraTrainingOptions dpo;  // A1 (its rank may differ from A0's)
  // Requests per generate() call (records are appended after each).
  int64_t generation_chunk = 16;
  uint64_t seed = 0;
  // Called after each unit of work is safely in files: a chunk of records
  // appended ("sample", "label", "eval:<name>") or a training step taken
  // ("warmup", "dpo", "target:<name>"), with the count done so far. May be
  // empty. An exception thrown here stops the stage as a crash would (what
  // tests of resumption use).
  std::function<void(const std::string& stage, int64_t done)> progress;
};

// One labelled instruction of a round (the records of labels.jsonl).
struct LabelledInstruction {
  std::string id;  // "r<round>-p<prompt>-s<sample>"
  int64_t prompt = 0;
  int64_t sample = 0;
  std::string text;
  FailureLabel label;
  std::string response;  // the target's greedy response (or first sample)
};

struct RoundReport {
  int64_t round = 0;
  int64_t sampled = 0;     // instructions generated
  int64_t duplicates = 0;  // removed by MinHash (of each other or of seeds)
  int64_t invalid = 0;     // kept but not judgeable by the labeller
  int64_t valid = 0;
  int64_t failures = 0;
  double failure_rate = 0;  // failures / valid
  double duplicate_rate = 0;
  double distinct_1 = 0, distinct_2 = 0, distinct_3 = 0;  // over kept instructions
  int64_t pairs = 0;
  int64_t dpo_steps = 0;
  double dpo_loss = 0, dpo_margin = 0, dpo_accuracy = 0;  // last step's
  double sample_seconds = 0, label_seconds = 0, dpo_seconds = 0;
  bool resumed = false;  // some of its work came from an earlier, interrupted run
};

// Instructions and the responses the target should learn.
struct TargetExample {
  std::string instruction;
  std::string response;
};

struct EvalReport {
  int64_t problems = 0;
  int64_t valid = 0;
  int64_t failures = 0;
  double accuracy = 0;  // 1 - failures / valid
  double seconds = 0;
};

class ReverseGen {
 public:
  // InvalidArgument for an empty work_dir or model, fewer than shots + 1
  // seed tasks, or non-positive sizes.
  ReverseGen(ReverseGenOptions options, std::shared_ptr<FailureLabeller> labeller,
             std::shared_ptr<Generator> generator);
  ~ReverseGen();

  const ReverseGenOptions& options() const { return options_; }
  // Stage 1; returns A0's folder. Seconds it took in *seconds (when given).
  std::string warm_up(double* seconds = nullptr);
  // Stages 2-4 with proposer `round` (0: the warm-up proposer); with
  // `train`, DPO then makes proposer round + 1. FailedPrecondition when the
  // proposer of `round` does not exist yet.
  RoundReport run_round(int64_t round, bool train = true);
  // The adapter folder generating with proposer `round`.
  std::string proposer_adapter(int64_t round) const;
  // The kept (deduplicated) labelled instructions of a finished round.
  std::vector<LabelledInstruction> labelled(int64_t round) const;
  // The few-shot message of a round's prompt (what the proposer sees).
  std::string proposer_message(int64_t round, int64_t prompt) const;

  // Fine-tunes the target (base + fresh LoRA from `training`, seeded) on
  // the examples; returns the adapter folder work_dir/target/<name>.
  std::string sft_target(const std::string& name, const std::vector<TargetExample>& examples,
                         const LoraTrainingOptions& training, uint64_t seed,
                         double* seconds = nullptr);
  // The target (base + `adapter`, "" for none) on `problems`, greedy;
  // answers in work_dir/eval/<name>.jsonl (resumable).
  EvalReport evaluate(const std::string& name, const std::string& adapter,
                      const std::vector<std::string>& problems);

 private:
  struct Impl;
  ReverseGenOptions options_;
  std::unique_ptr<Impl> impl_;
};

// One LoRA adapter equal to `first` + `second` (same base, same target
// modules): rank r1 + r2, scale 1, A = [A1; A2], B = [s1 B1, s2 B2]. Built on
// `model`'s shapes. InvalidArgument when the targets differ.
std::shared_ptr<lora::Adapter> compose_lora(const nn::Transformer& model, lora::Adapter& first,
                                            lora::Adapter& second);

}  // namespace tessera::synth
