// tessera/nn/align.h — alignment losses on top of the trainer: supervised
// fine-tuning on (prompt, response) pairs and Direct Preference
// Optimization (DPO, Rafailov et al. 2023) on (prompt, chosen, rejected)
// triples.
//
// SFT needs no trainer of its own: make_sft_batch() masks the prompt and the
// padding out of the labels (-100), and nn::Trainer's loss is then the mean
// cross-entropy over response tokens:
//
//   auto batch = tessera::nn::make_sft_batch(examples, {.pad_id = eos});
//   trainer.step(batch.input_ids, batch.labels);
//
// DPO: for a prompt x with responses y+ (chosen) and y- (rejected), let
// s(y) = sum over the response tokens of log pi(y_t | x, y_<t) under the
// policy and r(y) the same under a frozen reference. With
// h = beta * ((s(y+) - r(y+)) - (s(y-) - r(y-))), the loss per pair is
// -(1 - eps) log sigmoid(h) - eps log sigmoid(-h) (eps: label smoothing,
// 0 = the original DPO), averaged over the pairs. The reference is either a
// second, frozen model (full fine-tuning) or, when only adapter tensors
// train, the policy model itself with its adapter detached for the reference
// forward: no second copy of the weights.
//
//   tessera::nn::DpoOptions opts;                  // beta = 0.1
//   tessera::nn::DpoTrainer dpo(model, opts, dp, adapter->trainable());  // LoRA / MoS
//   auto batch = tessera::nn::make_preference_batch(pairs, {.pad_id = eos});
//   auto stats = dpo.step(batch);                  // stats.margin grows as it learns
//
// Data parallel: each rank passes its own share of the global batch (the
// same number of pairs on every rank); gradients are averaged over the dp
// group, so dp = N equals one rank on the concatenated batch.
//
// Thread safety: the batch builders and loss functions are pure and
// thread-safe; DpoTrainer is thread-compatible and its step() is collective
// over the dp group.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "tessera/dist/process_group.h"
#include "tessera/nn/model.h"
#include "tessera/nn/train.h"

namespace tessera::nn {

// A prompt and the response the model should learn to give.
struct SftExample {
  std::vector<int64_t> prompt;
  std::vector<int64_t> response;
};

// A prompt and two responses, `chosen` preferred over `rejected`.
struct PreferencePair {
  std::vector<int64_t> prompt;
  std::vector<int64_t> chosen;
  std::vector<int64_t> rejected;
};

struct BatchOptions {
  int64_t pad_id = 0;  // fills rows past their length (never attended to: padding is on the right)
  // Longest row in tokens, prompt included (0: no limit). Longer rows keep
  // their response and lose tokens from the left of the prompt; a response
  // that alone exceeds the limit is InvalidArgument.
  int64_t max_length = 0;
};

// Token rows with the positions whose log-probabilities count.
struct ResponseBatch {
  at::Tensor input_ids;  // [N, L] int64, right-padded with pad_id
  // [N, L] float, aligned with input_ids: 1 where the token is part of the
  // response (it is scored given everything before it), else 0. Column 0 is
  // always 0.
  at::Tensor response_mask;
};

// Rows prompt_i + response_i. InvalidArgument for mismatched sizes, an
// empty response, no rows, or a response longer than max_length - 1.
ResponseBatch make_response_batch(const std::vector<std::vector<int64_t>>& prompts,
                                  const std::vector<std::vector<int64_t>>& responses,
                                  const BatchOptions& options = {});

// Supervised fine-tuning rows for nn::Trainer::step: labels are the next
// token where that token belongs to the response, -100 elsewhere (prompt,
// padding), so Transformer::loss averages over response tokens only.
struct SftBatch {
  at::Tensor input_ids;  // [N, L - 1] int64
  at::Tensor labels;     // [N, L - 1] int64
};
SftBatch make_sft_batch(const std::vector<SftExample>& examples, const BatchOptions& options = {});

// A batch of B pairs as 2B rows: rows [0, B) are prompt + chosen, rows
// [B, 2B) prompt + rejected, in pair order.
struct PreferenceBatch {
  ResponseBatch rows;
  int64_t num_pairs = 0;
  // Optional [2B] float64: the reference model's response log-probability
  // sums for the rows, computed once (DpoTrainer::reference_logprobs) and
  // reused across epochs. Undefined: the trainer computes them each step.
  at::Tensor reference_logprobs;
};
PreferenceBatch make_preference_batch(const std::vector<PreferencePair>& pairs,
                                      const BatchOptions& options = {});
// Rows [begin, begin + count) of the pairs (both halves), for micro-batches.
PreferenceBatch slice_pairs(const PreferenceBatch& batch, int64_t begin, int64_t count);

// Per-row sums of log-softmax(logits) at the response tokens:
// out[n] = sum_{j >= 1} mask[n, j] * log p(input_ids[n, j] | row n before j),
// where `logits` [N, L - 1, V] are the model's outputs for input_ids[:, :L-1]
// (row-major, any float dtype; computed in at least fp32, fp64 stays fp64).
// Differentiable in logits. InvalidArgument for mismatched shapes.
at::Tensor response_logprob_sums(const at::Tensor& logits, const at::Tensor& input_ids,
                                 const at::Tensor& response_mask);

// The same through a forward of `model` (differentiable unless called
// under at::NoGradGuard). `options` is passed to the forward (an adapter
// choice, say); cache and last_logits_only must stay unset.
at::Tensor sequence_logprobs(Transformer& model, const ResponseBatch& batch,
                             const ForwardOptions& options = {});

// The DPO loss of B pairs from their four [B] log-probability sums.
struct DpoLoss {
  at::Tensor loss;              // scalar, mean over pairs; differentiable in the policy sums
  at::Tensor chosen_rewards;    // [B] beta * (policy - reference) on chosen, detached
  at::Tensor rejected_rewards;  // [B] the same on rejected, detached
  // Mean over pairs of (s(y+) - r(y+)) - (s(y-) - r(y-)), in nats: the
  // preference margin DPO widens (0 at the start, when policy = reference).
  double margin = 0;
  double accuracy = 0;  // share of pairs whose chosen reward exceeds the rejected one
};
// InvalidArgument for beta <= 0, label_smoothing outside [0, 0.5), or
// tensors that are not [B] with one B.
DpoLoss dpo_loss(const at::Tensor& policy_chosen, const at::Tensor& policy_rejected,
                 const at::Tensor& reference_chosen, const at::Tensor& reference_rejected,
                 double beta, double label_smoothing = 0.0);

struct DpoOptions {
  double beta = 0.1;             // strength of the pull towards the reference
  double label_smoothing = 0.0;  // eps: assumed share of flipped preference labels (cDPO)
  // Optimiser and schedule, as TrainerOptions (warm-up then cosine decay).
  int64_t steps = 100;
  double lr = 5e-4;
  double min_lr = 5e-5;
  int64_t warmup = 5;
  double max_grad_norm = 1.0;
  int64_t grad_accumulation = 1;  // micro-batches of pairs per step
  AdamWOptions adamw;
  // Log a progress line (loss, margin, accuracy) on logger "nn" every this
  // many steps (0: never).
  int64_t log_every = 0;
};

struct DpoStepStats {
  int64_t step = 0;
  double loss = 0;    // mean over the global batch's pairs
  double margin = 0;  // DpoLoss::margin over the global batch
  double accuracy = 0;
  double chosen_reward = 0;  // mean beta * (policy - reference) on chosen
  double rejected_reward = 0;
  double grad_norm = 0;
  double lr = 0;
  double seconds = 0;
};

class DpoTrainer {
 public:
  // Full fine-tuning: every parameter of `policy` trains; `reference` is a
  // frozen model with the same vocabulary (its parameters are set not to
  // require gradients). Both are borrowed and must outlive the trainer.
  DpoTrainer(Transformer& policy, Transformer& reference, DpoOptions options,
             std::shared_ptr<dist::ProcessGroup> dp = nullptr);
  // Adapters: only `params` (the adapter's trainable tensors) train; the
  // reference is `policy` without its adapter (it is detached for the
  // reference forward and put back). InvalidArgument when `params` is empty
  // or the model has no adapter.
  DpoTrainer(Transformer& policy, DpoOptions options, std::shared_ptr<dist::ProcessGroup> dp,
             std::vector<at::Tensor> params);
  ~DpoTrainer();
  DpoTrainer(const DpoTrainer&) = delete;
  DpoTrainer& operator=(const DpoTrainer&) = delete;

  // The reference's [2B] float64 response log-probability sums (no gradient).
  at::Tensor reference_logprobs(const PreferenceBatch& batch);
  // One optimiser step on this rank's pairs (split into grad_accumulation
  // micro-batches; InvalidArgument when they do not divide evenly).
  DpoStepStats step(const PreferenceBatch& batch);

  AdamW& optimizer();
  int64_t steps() const;
  // Sets the schedule position (after restoring optimiser state).
  void set_steps(int64_t steps);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace tessera::nn
