// tessera/nn/train.h — optimiser, data and the training loop.
//
// AdamW (decoupled weight decay) runs either plainly or as ZeRO-1: each
// data-parallel rank keeps the optimiser state (and fp32 master copy) of
// one contiguous slice of the flattened parameters, gradients arrive by
// reduce_scatter, and updated parameters return by all_gather. Both give
// the same parameters after every step (the update is elementwise).
// Data-parallel gradients are averaged in buckets (one all_reduce per
// ~25 MiB) rather than per tensor.
//
//   tessera::nn::Trainer trainer(model, opts, {dp_group});
//   for (int64_t step = 0; step < opts.steps; ++step) {
//     auto batch = data.batch(step, dp_rank, dp_size);
//     auto stats = trainer.step(batch.input_ids, batch.labels);
//   }
//
// Thread safety: AdamW, Trainer and TokenDataset are thread-compatible; a
// Trainer step is collective over its groups. TokenDataset's const methods
// may run concurrently.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "tessera/dist/process_group.h"
#include "tessera/nn/model.h"

namespace tessera::nn {

struct AdamWOptions {
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;  // applied to matrices only (dim >= 2), not norms or biases
};

class AdamW {
 public:
  // `params` must have gradients when step() runs. With `zero_group`, state
  // is sharded over that group (ZeRO-1) and step() is collective over it;
  // gradients must NOT have been averaged already (step() reduce-scatters
  // and averages them).
  //
  // The gradient norm for clipping is global: squared norms are summed over
  // each of the model-parallel `norm_groups` in turn (tensor and expert
  // parallel: together they span one model replica), each parameter
  // weighted by `norm_weights[i]` — the share of its elements this rank
  // counts, so that elements several ranks hold count once (1 for a
  // parameter sharded over the replica, 1/tp for one every tp rank holds
  // whole, ...). Empty weights: all 1. Every rank of a replica then clips
  // by the same factor, and replicated parameters stay identical.
  AdamW(std::vector<at::Tensor> params, AdamWOptions options,
        std::shared_ptr<dist::ProcessGroup> zero_group = nullptr,
        std::vector<std::shared_ptr<dist::ProcessGroup>> norm_groups = {},
        std::vector<double> norm_weights = {});
  ~AdamW();
  AdamW(AdamW&&) noexcept;

  // One update with learning rate `lr`. Returns the global gradient norm
  // before clipping; gradients are clipped to `max_grad_norm` (0: off).
  double step(double lr, double max_grad_norm = 0.0);
  void zero_grad();
  // Updates taken so far (the bias-correction step count).
  int64_t steps() const;
  // Sets the step count, e.g. after restoring the state from a checkpoint;
  // the next step() uses steps + 1 for bias correction. InvalidArgument
  // when negative.
  void set_steps(int64_t steps);
  // Bytes of optimiser state held by this rank (m, v and, under ZeRO, the
  // master slice).
  int64_t state_bytes() const;
  // True when the state is sharded over a ZeRO group of more than one rank.
  bool zero1() const;

  // The live optimiser state, by name: the tensors alias it, so writing into
  // them (e.g. a checkpoint load) restores the optimiser in place. Valid
  // while this AdamW lives; all float32 CPU, contiguous.
  //   ZeRO-1: "master", "exp_avg", "exp_avg_sq", each [shard]: this rank's
  //     slice of the padded concatenation of the flattened parameters
  //     (constructor order), shard = ceil(total / zero size). "master" is
  //     the float32 copy the update is applied to; parameters are copied
  //     from it after every step.
  //   plain: "exp_avg.<i>" and "exp_avg_sq.<i>" for parameter i (constructor
  //     order), shaped like it.
  std::vector<std::pair<std::string, at::Tensor>> state_tensors();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Averages gradients over `group` in buckets of about `bucket_bytes`.
void all_reduce_gradients(const std::vector<at::Tensor>& params, dist::ProcessGroup& group,
                          int64_t bucket_bytes = int64_t{25} << 20);

// Linear warm-up to `max_lr` over `warmup` steps, then cosine decay to
// `min_lr` at `total` steps (and `min_lr` after).
double warmup_cosine_lr(int64_t step, int64_t warmup, int64_t total, double max_lr, double min_lr);

// A file of token ids (uint16 or uint32, little-endian), memory-mapped.
// Batches are windows of seq_len + 1 tokens at offsets drawn from a seeded
// permutation: batch(step, rank, world) gives every data-parallel rank
// disjoint windows, and the union over ranks equals batch(step, 0, 1) of a
// world_size-times larger batch, so dp=N training sees the same data as one
// rank with the global batch.
class TokenDataset {
 public:
  static TokenDataset open(const std::string& path, int bytes_per_token = 2);
  // Writes ids as a token file (atomically).
  static void write(const std::string& path, const std::vector<int64_t>& ids,
                    int bytes_per_token = 2);
  int64_t num_tokens() const;

  struct Batch {
    at::Tensor input_ids;  // [batch, seq_len] int64
    at::Tensor labels;     // [batch, seq_len] int64, input shifted by one
  };
  // `global_batch` windows per step, split evenly over `world` ranks.
  Batch batch(int64_t step, int64_t global_batch, int64_t seq_len, int rank = 0, int world = 1,
              uint64_t seed = 0) const;

 private:
  struct Impl;
  std::shared_ptr<const Impl> impl_;
};

struct TrainerOptions {
  int64_t steps = 100;
  double lr = 3e-3;
  double min_lr = 3e-4;
  int64_t warmup = 10;
  double max_grad_norm = 1.0;
  int64_t grad_accumulation = 1;  // micro-batches per step
  bool zero1 = false;
  // Run forward and backward under LibTorch's CPU autocast in bfloat16
  // (matmuls in bf16, parameters and optimiser state stay fp32). Uses the
  // AVX-512 BF16 instructions where the CPU has them.
  bool bf16_autocast = false;
  // Log a progress line (loss, grad norm, lr, tokens/s, expert load) every
  // this many steps on logger "nn" (0: never).
  int64_t log_every = 0;
  AdamWOptions adamw;
  // Called in every step() after the backward pass and the gradient
  // reductions, right before the optimiser changes the parameters and its
  // state (may be empty). A deferred checkpoint releases the tensors here:
  //   opts.before_update = [&] { pending_save.release_tensors(); };
  std::function<void()> before_update;
};

struct StepStats {
  int64_t step = 0;
  double loss = 0;  // mean cross-entropy over the global batch
  double aux_loss = 0;
  double grad_norm = 0;
  double lr = 0;
  double tokens_per_second = 0;  // global
  at::Tensor expert_load;        // [moe layers, experts], summed over the global batch
};

class Trainer {
 public:
  // `dp` (may be null) is the data-parallel group; model parallel groups
  // come from the model.
  Trainer(Transformer& model, TrainerOptions options,
          std::shared_ptr<dist::ProcessGroup> dp = nullptr);
  // Trains only `params` (adapters: the model's own weights are frozen).
  Trainer(Transformer& model, TrainerOptions options, std::shared_ptr<dist::ProcessGroup> dp,
          std::vector<at::Tensor> params);
  ~Trainer();
  // One optimiser step over `input_ids`/`labels` [B, T] (this rank's part of
  // the global batch; split into grad_accumulation micro-batches).
  StepStats step(const at::Tensor& input_ids, const at::Tensor& labels);
  AdamW& optimizer();
  // The model being trained (borrowed at construction).
  Transformer& model();
  // Steps taken so far: the index of the next step's learning-rate schedule
  // position (StepStats::step of the next step()).
  int64_t steps() const;
  // Sets the step count of the trainer and its optimiser, e.g. when resuming
  // from a checkpoint. InvalidArgument when negative.
  void set_steps(int64_t steps);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace tessera::nn
