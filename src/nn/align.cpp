#include "tessera/nn/align.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <sstream>
#include <string>
#include <utility>

#include "tessera/core/error.h"
#include "tessera/core/log.h"
#include "tessera/core/metrics.h"

namespace tessera::nn {

ResponseBatch make_response_batch(const std::vector<std::vector<int64_t>>& prompts,
                                  const std::vector<std::vector<int64_t>>& responses,
                                  const BatchOptions& options) {
  TESSERA_CHECK(!prompts.empty(), InvalidArgument, "response batch: no rows");
  TESSERA_CHECK(prompts.size() == responses.size(), InvalidArgument,
                "response batch: ", prompts.size(), " prompts but ", responses.size(),
                " responses");
  TESSERA_CHECK(options.max_length >= 0, InvalidArgument,
                "response batch: max_length must be >= 0, got ", options.max_length);
  const int64_t n = static_cast<int64_t>(prompts.size());
  // Each row keeps its whole response and as much of the prompt's end as
  // fits; at least one token must precede the response (it is scored given
  // what comes before it).
  std::vector<int64_t> keep_prompt(n), length(n);
  int64_t longest = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t p = static_cast<int64_t>(prompts[i].size());
    const int64_t r = static_cast<int64_t>(responses[i].size());
    TESSERA_CHECK(r > 0, InvalidArgument, "response batch: row ", i, " has an empty response");
    TESSERA_CHECK(p > 0, InvalidArgument, "response batch: row ", i, " has an empty prompt");
    keep_prompt[i] = p;
    if (options.max_length > 0) {
      TESSERA_CHECK(r + 1 <= options.max_length, InvalidArgument, "response batch: row ", i,
                    "'s response of ", r, " tokens does not fit max_length ", options.max_length,
                    " with at least one prompt token");
      keep_prompt[i] = std::min(p, options.max_length - r);
    }
    length[i] = keep_prompt[i] + r;
    longest = std::max(longest, length[i]);
  }
  at::Tensor ids = at::full({n, longest}, options.pad_id, at::kLong);
  at::Tensor mask = at::zeros({n, longest}, at::kFloat);
  auto id = ids.accessor<int64_t, 2>();
  auto m = mask.accessor<float, 2>();
  for (int64_t i = 0; i < n; ++i) {
    const auto& p = prompts[i];
    const int64_t skip = static_cast<int64_t>(p.size()) - keep_prompt[i];
    int64_t col = 0;
    for (int64_t j = skip; j < static_cast<int64_t>(p.size()); ++j) id[i][col++] = p[j];
    for (int64_t t : responses[i]) {
      id[i][col] = t;
      m[i][col++] = 1.0f;
    }
  }
  return {ids, mask};
}

SftBatch make_sft_batch(const std::vector<SftExample>& examples, const BatchOptions& options) {
  std::vector<std::vector<int64_t>> prompts, responses;
  prompts.reserve(examples.size());
  responses.reserve(examples.size());
  for (const auto& e : examples) {
    prompts.push_back(e.prompt);
    responses.push_back(e.response);
  }
  ResponseBatch rows = make_response_batch(prompts, responses, options);
  const int64_t L = rows.input_ids.size(1);
  at::Tensor targets = rows.input_ids.narrow(1, 1, L - 1);
  at::Tensor scored = rows.response_mask.narrow(1, 1, L - 1) > 0;
  return {rows.input_ids.narrow(1, 0, L - 1).contiguous(),
          at::where(scored, targets, at::full_like(targets, -100)).contiguous()};
}

PreferenceBatch make_preference_batch(const std::vector<PreferencePair>& pairs,
                                      const BatchOptions& options) {
  TESSERA_CHECK(!pairs.empty(), InvalidArgument, "preference batch: no pairs");
  std::vector<std::vector<int64_t>> prompts, responses;
  for (const auto& p : pairs) {
    prompts.push_back(p.prompt);
    responses.push_back(p.chosen);
  }
  for (const auto& p : pairs) {
    prompts.push_back(p.prompt);
    responses.push_back(p.rejected);
  }
  PreferenceBatch batch;
  batch.rows = make_response_batch(prompts, responses, options);
  batch.num_pairs = static_cast<int64_t>(pairs.size());
  return batch;
}

PreferenceBatch slice_pairs(const PreferenceBatch& batch, int64_t begin, int64_t count) {
  const int64_t B = batch.num_pairs;
  TESSERA_CHECK(begin >= 0 && count > 0 && begin + count <= B, InvalidArgument,
                "slice_pairs: pairs [", begin, ", ", begin + count, ") outside a batch of ", B);
  auto rows = [&](const at::Tensor& t) {
    return at::cat({t.narrow(0, begin, count), t.narrow(0, B + begin, count)});
  };
  PreferenceBatch out;
  out.num_pairs = count;
  out.rows.input_ids = rows(batch.rows.input_ids);
  out.rows.response_mask = rows(batch.rows.response_mask);
  // Trailing columns that only padding uses are dropped (shorter forwards).
  at::Tensor any = out.rows.response_mask.sum(0).nonzero();
  const int64_t last = any.numel() > 0 ? any.max().item<int64_t>() + 1 : out.rows.input_ids.size(1);
  out.rows.input_ids = out.rows.input_ids.narrow(1, 0, last).contiguous();
  out.rows.response_mask = out.rows.response_mask.narrow(1, 0, last).contiguous();
  if (batch.reference_logprobs.defined()) out.reference_logprobs = rows(batch.reference_logprobs);
  return out;
}

at::Tensor response_logprob_sums(const at::Tensor& logits, const at::Tensor& input_ids,
                                 const at::Tensor& response_mask) {
  TESSERA_CHECK(
      input_ids.dim() == 2 && input_ids.size(1) >= 2 && input_ids.scalar_type() == at::kLong,
      InvalidArgument, "response_logprob_sums: input_ids must be int64 [N, L >= 2]");
  const int64_t N = input_ids.size(0), L = input_ids.size(1);
  TESSERA_CHECK(logits.dim() == 3 && logits.size(0) == N && logits.size(1) == L - 1,
                InvalidArgument, "response_logprob_sums: logits must be [", N, ", ", L - 1,
                ", V], got ", logits.sizes());
  TESSERA_CHECK(response_mask.sizes() == input_ids.sizes(), InvalidArgument,
                "response_logprob_sums: response_mask must be shaped like input_ids [", N, ", ", L,
                "], got ", response_mask.sizes());
  const at::ScalarType dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor logp = at::log_softmax(logits.to(dtype), -1);
  at::Tensor picked = logp.gather(-1, input_ids.narrow(1, 1, L - 1).unsqueeze(-1)).squeeze(-1);
  return (picked * response_mask.narrow(1, 1, L - 1).to(dtype)).sum(1);
}

at::Tensor sequence_logprobs(Transformer& model, const ResponseBatch& batch,
                             const ForwardOptions& options) {
  return translate_errors(
      "sequence_logprobs",
      [&]() -> at::Tensor {
        TESSERA_CHECK(
            options.cache == nullptr && !options.last_logits_only && !options.hidden_only &&
                options.paged == nullptr,
            InvalidArgument,
            "sequence_logprobs: cache, last_logits_only, hidden_only and paged must be unset");
        const int64_t L = batch.input_ids.size(1);
        ForwardOptions o = options;
        o.gather_logits = true;
        at::Tensor logits = model.forward(batch.input_ids.narrow(1, 0, L - 1), o).logits;
        return response_logprob_sums(logits, batch.input_ids, batch.response_mask);
      },
      ErrorCode::kInvalidArgument);
}

DpoLoss dpo_loss(const at::Tensor& policy_chosen, const at::Tensor& policy_rejected,
                 const at::Tensor& reference_chosen, const at::Tensor& reference_rejected,
                 double beta, double label_smoothing) {
  TESSERA_CHECK(beta > 0, InvalidArgument, "dpo_loss: beta must be > 0, got ", beta);
  TESSERA_CHECK(label_smoothing >= 0 && label_smoothing < 0.5, InvalidArgument,
                "dpo_loss: label_smoothing must be in [0, 0.5), got ", label_smoothing);
  TESSERA_CHECK(policy_chosen.dim() == 1 && policy_chosen.size(0) > 0, InvalidArgument,
                "dpo_loss: policy_chosen must be [B] with B > 0, got ", policy_chosen.sizes());
  const int64_t B = policy_chosen.size(0);
  for (const at::Tensor* t : {&policy_rejected, &reference_chosen, &reference_rejected}) {
    TESSERA_CHECK(t->dim() == 1 && t->size(0) == B, InvalidArgument,
                  "dpo_loss: every log-probability tensor must be [", B, "], got ", t->sizes());
  }
  const at::ScalarType dtype = policy_chosen.scalar_type();
  at::Tensor chosen_ratio = policy_chosen - reference_chosen.detach().to(dtype);
  at::Tensor rejected_ratio = policy_rejected - reference_rejected.detach().to(dtype);
  at::Tensor h = beta * (chosen_ratio - rejected_ratio);
  at::Tensor per_pair = -(1.0 - label_smoothing) * at::log_sigmoid(h);
  if (label_smoothing > 0) per_pair = per_pair - label_smoothing * at::log_sigmoid(-h);
  DpoLoss out;
  out.loss = per_pair.mean();
  out.chosen_rewards = (beta * chosen_ratio).detach();
  out.rejected_rewards = (beta * rejected_ratio).detach();
  out.margin = (chosen_ratio - rejected_ratio).detach().mean().item<double>();
  out.accuracy = (out.chosen_rewards > out.rejected_rewards).to(at::kDouble).mean().item<double>();
  return out;
}

namespace {

// Detaches a model's adapter for its lifetime (the reference forward of an
// adapter policy) and puts it back, also when the forward throws.
class AdapterDetached {
 public:
  explicit AdapterDetached(Transformer& model) : model_(model), adapter_(model.adapter()) {
    model_.set_adapter(nullptr);
  }
  ~AdapterDetached() { model_.set_adapter(adapter_); }
  AdapterDetached(const AdapterDetached&) = delete;
  AdapterDetached& operator=(const AdapterDetached&) = delete;

 private:
  Transformer& model_;
  std::shared_ptr<LinearAdapter> adapter_;
};

void check_options(const DpoOptions& o) {
  TESSERA_CHECK(o.beta > 0, InvalidArgument, "DPO: beta must be > 0, got ", o.beta);
  TESSERA_CHECK(o.label_smoothing >= 0 && o.label_smoothing < 0.5, InvalidArgument,
                "DPO: label_smoothing must be in [0, 0.5), got ", o.label_smoothing);
  TESSERA_CHECK(o.grad_accumulation >= 1, InvalidArgument, "DPO: grad_accumulation must be >= 1");
  TESSERA_CHECK(o.steps >= 1, InvalidArgument, "DPO: steps must be >= 1, got ", o.steps);
}

}  // namespace

struct DpoTrainer::Impl {
  Transformer* policy = nullptr;
  Transformer* reference = nullptr;  // null: the policy without its adapter
  DpoOptions options;
  std::shared_ptr<dist::ProcessGroup> dp;
  std::vector<at::Tensor> params;
  std::unique_ptr<AdamW> optimizer;
  int64_t step = 0;
};

DpoTrainer::DpoTrainer(Transformer& policy, Transformer& reference, DpoOptions options,
                       std::shared_ptr<dist::ProcessGroup> dp)
    : impl_(std::make_unique<Impl>()) {
  check_options(options);
  TESSERA_CHECK(&policy != &reference, InvalidArgument,
                "DPO: the reference must be a separate, frozen model (or use the adapter form)");
  TESSERA_CHECK(policy.config().vocab_size == reference.config().vocab_size, InvalidArgument,
                "DPO: policy vocabulary ", policy.config().vocab_size, " != reference vocabulary ",
                reference.config().vocab_size);
  TESSERA_CHECK(policy.groups().ep_size() == 1, InvalidArgument,
                "DPO: expert-parallel policies are not supported");
  Impl& t = *impl_;
  t.policy = &policy;
  t.reference = &reference;
  t.options = std::move(options);
  t.dp = dp && dp->size() > 1 ? dp : nullptr;
  reference.set_requires_grad(false);
  policy.set_requires_grad(true);
  std::vector<double> norm_weights;
  for (const auto& [name, p] : policy.named_parameters()) {
    t.params.push_back(p);
    // As nn::Trainer: elements several tp ranks hold count once in the norm.
    auto layout = policy.layout_of(name);
    int64_t held = 0;
    for (int r = 0; r < layout.world_size(); ++r) held += layout.local_numel(r);
    norm_weights.push_back(held > 0 ? static_cast<double>(layout.global_numel()) / held : 1.0);
  }
  t.optimizer = std::make_unique<AdamW>(
      t.params, t.options.adamw, nullptr,
      std::vector<std::shared_ptr<dist::ProcessGroup>>{policy.groups().tp}, norm_weights);
}

DpoTrainer::DpoTrainer(Transformer& policy, DpoOptions options,
                       std::shared_ptr<dist::ProcessGroup> dp, std::vector<at::Tensor> params)
    : impl_(std::make_unique<Impl>()) {
  check_options(options);
  TESSERA_CHECK(!params.empty(), InvalidArgument,
                "DPO: the adapter form needs the adapter's trainable tensors");
  TESSERA_CHECK(policy.adapter() != nullptr, InvalidArgument,
                "DPO: the adapter form needs a model with an adapter installed (set_adapter)");
  Impl& t = *impl_;
  t.policy = &policy;
  t.options = std::move(options);
  t.dp = dp && dp->size() > 1 ? dp : nullptr;
  t.params = std::move(params);
  policy.set_requires_grad(false);
  for (auto& p : t.params) p.requires_grad_(true);
  t.optimizer = std::make_unique<AdamW>(t.params, t.options.adamw);
}

DpoTrainer::~DpoTrainer() = default;
AdamW& DpoTrainer::optimizer() { return *impl_->optimizer; }
int64_t DpoTrainer::steps() const { return impl_->step; }

void DpoTrainer::set_steps(int64_t steps) {
  TESSERA_CHECK(steps >= 0, InvalidArgument, "DPO: step count must be >= 0, got ", steps);
  impl_->step = steps;
  impl_->optimizer->set_steps(steps);
}

at::Tensor DpoTrainer::reference_logprobs(const PreferenceBatch& batch) {
  return translate_errors(
      "DpoTrainer::reference_logprobs",
      [&]() -> at::Tensor {
        Impl& t = *impl_;
        at::NoGradGuard no_grad;
        const int64_t B = batch.num_pairs;
        const int64_t micro = std::min<int64_t>(t.options.grad_accumulation, B);
        std::vector<at::Tensor> chosen, rejected;
        for (int64_t begin = 0; begin < B;) {
          const int64_t count = std::min(B - begin, (B + micro - 1) / micro);
          PreferenceBatch part = slice_pairs(batch, begin, count);
          at::Tensor sums;
          if (t.reference != nullptr) {
            sums = sequence_logprobs(*t.reference, part.rows);
          } else {
            AdapterDetached base(*t.policy);
            sums = sequence_logprobs(*t.policy, part.rows);
          }
          sums = sums.to(at::kDouble);
          chosen.push_back(sums.narrow(0, 0, count));
          rejected.push_back(sums.narrow(0, count, count));
          begin += count;
        }
        return at::cat({at::cat(chosen), at::cat(rejected)});
      },
      ErrorCode::kInvalidArgument);
}

DpoStepStats DpoTrainer::step(const PreferenceBatch& batch) {
  return translate_errors(
      "DpoTrainer::step",
      [&]() -> DpoStepStats {
        Impl& t = *impl_;
        Stopwatch watch;
        const int64_t B = batch.num_pairs;
        const int64_t micro = t.options.grad_accumulation;
        TESSERA_CHECK(B > 0 && B % micro == 0, InvalidArgument, "DPO: ", B,
                      " pairs do not split into ", micro, " micro-batches");
        TESSERA_CHECK(batch.rows.input_ids.size(0) == 2 * B, InvalidArgument, "DPO: a batch of ", B,
                      " pairs needs ", 2 * B, " rows, got ", batch.rows.input_ids.size(0));
        at::Tensor reference = batch.reference_logprobs.defined() ? batch.reference_logprobs
                                                                  : reference_logprobs(batch);
        TESSERA_CHECK(reference.dim() == 1 && reference.size(0) == 2 * B, InvalidArgument,
                      "DPO: reference_logprobs must be [", 2 * B, "], got ", reference.sizes());
        const int64_t mb = B / micro;
        // Sums over this rank's pairs: loss, margin, accuracy, chosen and rejected rewards.
        double sums[5] = {0, 0, 0, 0, 0};
        for (int64_t i = 0; i < micro; ++i) {
          PreferenceBatch part = slice_pairs(batch, i * mb, mb);
          at::Tensor policy = sequence_logprobs(*t.policy, part.rows);
          at::Tensor ref =
              at::cat({reference.narrow(0, i * mb, mb), reference.narrow(0, B + i * mb, mb)});
          DpoLoss d =
              dpo_loss(policy.narrow(0, 0, mb), policy.narrow(0, mb, mb), ref.narrow(0, 0, mb),
                       ref.narrow(0, mb, mb), t.options.beta, t.options.label_smoothing);
          (d.loss / static_cast<double>(micro)).backward();
          sums[0] += d.loss.item<double>() * mb;
          sums[1] += d.margin * mb;
          sums[2] += d.accuracy * mb;
          sums[3] += d.chosen_rewards.sum().item<double>();
          sums[4] += d.rejected_rewards.sum().item<double>();
        }
        if (t.dp) all_reduce_gradients(t.params, *t.dp);
        DpoStepStats stats;
        stats.lr = warmup_cosine_lr(t.step, t.options.warmup, t.options.steps, t.options.lr,
                                    t.options.min_lr);
        stats.grad_norm = t.optimizer->step(stats.lr, t.options.max_grad_norm);
        t.optimizer->zero_grad();
        stats.step = t.step++;
        at::Tensor totals = at::tensor(
            {sums[0], sums[1], sums[2], sums[3], sums[4], static_cast<double>(B)}, at::kDouble);
        if (t.dp) t.dp->all_reduce(totals).wait();
        const double pairs = totals[5].item<double>();
        stats.loss = totals[0].item<double>() / pairs;
        stats.margin = totals[1].item<double>() / pairs;
        stats.accuracy = totals[2].item<double>() / pairs;
        stats.chosen_reward = totals[3].item<double>() / pairs;
        stats.rejected_reward = totals[4].item<double>() / pairs;
        stats.seconds = watch.seconds();
        if (t.options.log_every > 0 &&
            (stats.step % t.options.log_every == 0 || t.step == t.options.steps)) {
          TESSERA_LOG(Info, "nn") << "dpo step " << stats.step + 1 << "/" << t.options.steps
                                  << " loss " << stats.loss << " margin " << stats.margin
                                  << " accuracy " << stats.accuracy << " grad-norm "
                                  << stats.grad_norm << " lr " << stats.lr;
        }
        return stats;
      },
      ErrorCode::kInvalidArgument);
}

}  // namespace tessera::nn
