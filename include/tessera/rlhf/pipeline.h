// tessera/rlhf/pipeline.h — GRPO and PPO as short driver programs over the
// built-in roles (roles.h), on the synthetic arithmetic task.
//
// Roles by name: "actor", "reward" (reward_rule or reward_model), and for
// GRPO with kl_coef > 0 or PPO "reference"; PPO also "critic". Each
// iteration takes the next `prompts_per_iteration` questions of a seeded
// stream, generates `samples` responses each, scores them, computes
// advantages in the driver (small per-token tensors) and updates. Calls
// that do not depend on each other (reference log-probs, rewards, values)
// are issued together and run concurrently where their roles do not share
// processes.
//
// Checkpoints (checkpoint_dir, every checkpoint_every iterations): each role
// saves into its own namespace <dir>/<role>/step_<N> (ckpt), then the
// driver commits <dir>/driver.json {"iteration": N} atomically; resume
// restarts from the iteration that file names. Sampling seeds depend only
// on (seed, iteration, generation dp rank), so a resumed run repeats the
// uninterrupted run's losses exactly (fp32, same layout).
//
// Thread safety: a pipeline drives one Driver from the calling thread; run
// one pipeline per driver at a time.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "tessera/rlhf/driver.h"
#include "tessera/tokenizer/tokenizer.h"

namespace tessera::rlhf {

struct PipelineOptions {
  int64_t iterations = 10;
  int64_t prompts_per_iteration = 8;
  int64_t samples = 4;     // responses per prompt (GRPO's group size)
  uint64_t data_seed = 1;  // the question stream
  int max_operand = 99;
  // Prompt text around "Q: a+b=? A: " questions: "plain", or "chat" with
  // `chat_template` (ChatML, as SmolLM2's GGUF carries it).
  std::string prompt_format = "plain";
  std::string chat_template;
  // PPO: KL penalty in the reward (k1), discount and GAE lambda.
  double kl_penalty = 0.05, gamma = 1.0, lambda = 0.95;
  std::string checkpoint_dir;  // "" : no checkpoints
  int64_t checkpoint_every = 0;
  int keep_last = 2;
  bool resume = false;
  int64_t stop_after = -1;  // stop (as if interrupted) after this many iterations of this run
  std::chrono::milliseconds call_timeout{0};  // 0: the driver's default
};

struct IterationStats {
  int64_t iteration = 0;
  double mean_score = 0;
  double pg_loss = 0, kl = 0, clip_fraction = 0, grad_norm = 0, value_loss = 0;
  double seconds = 0, generate_seconds = 0, update_seconds = 0;
  int64_t new_tokens = 0;
  double tokens_per_second = 0;  // generated tokens / iteration time
  // 3D-HybridEngine transition (per rank, max over ranks).
  double transition_seconds = 0, transition_bytes = 0, generation_weight_bytes = 0,
         kv_cache_bytes = 0;
};

using IterationCallback = std::function<void(const IterationStats&)>;

// Return the stats of the iterations this call ran (after a resume, from
// the restored iteration on). Errors from the driver propagate.
std::vector<IterationStats> run_grpo(Driver& driver, const nn::Tokenizer& tokenizer,
                                     const PipelineOptions& options,
                                     const IterationCallback& callback = {});
std::vector<IterationStats> run_ppo(Driver& driver, const nn::Tokenizer& tokenizer,
                                    const PipelineOptions& options,
                                    const IterationCallback& callback = {});

// The prompt batch of one iteration (prompt_ids, prompt_lengths, answers),
// as the pipelines build it; for drivers users write themselves.
Batch arithmetic_prompts(const nn::Tokenizer& tokenizer, const PipelineOptions& options,
                         int64_t iteration);

}  // namespace tessera::rlhf
