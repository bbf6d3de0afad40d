#include "tessera/rlhf/algorithms.h"

#include <ATen/ATen.h>

#include "tessera/core/error.h"
#include "tessera/core/tensor.h"
#include "tessera/nn/model.h"
#include "tessera/nn/train.h"
#include "tessera/tasks/arithmetic.h"

namespace tessera::rlhf {

namespace {

void check_tokens(const at::Tensor& x, const at::Tensor& mask, const char* what) {
  TESSERA_CHECK(x.defined() && mask.defined() && x.dim() == 2 && x.sizes() == mask.sizes(),
                InvalidArgument, what, ": expected [batch, tokens] tensors matching the mask ",
                mask.defined() ? shape_string(mask.sizes()) : std::string("(undefined)"), ", got ",
                x.defined() ? shape_string(x.sizes()) : std::string("undefined"));
}

}  // namespace

at::Tensor masked_mean(const at::Tensor& x, const at::Tensor& mask) {
  at::Tensor m = mask.to(x.scalar_type());
  return (x * m).sum() / m.sum().clamp_min(1.0);
}

Gae gae(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask, double gamma,
        double lambda) {
  check_tokens(rewards, mask, "gae: rewards");
  check_tokens(values, mask, "gae: values");
  at::Tensor r = rewards.detach().to(at::kDouble), v = values.detach().to(at::kDouble);
  at::Tensor m = mask.to(at::kDouble);
  const int64_t B = r.size(0), T = r.size(1);
  at::Tensor adv = at::zeros({B, T}, at::kDouble);
  auto ra = r.accessor<double, 2>();
  auto va = v.accessor<double, 2>();
  auto ma = m.accessor<double, 2>();
  auto aa = adv.accessor<double, 2>();
  for (int64_t b = 0; b < B; ++b) {
    double next_value = 0, next_adv = 0;
    for (int64_t t = T - 1; t >= 0; --t) {
      if (ma[b][t] == 0) continue;  // padding: skipped, keeps the chain of response tokens
      const double delta = ra[b][t] + gamma * next_value - va[b][t];
      aa[b][t] = delta + gamma * lambda * next_adv;
      next_adv = aa[b][t];
      next_value = va[b][t];
    }
  }
  Gae out;
  out.advantages = adv.to(at::kFloat);
  out.returns = ((adv + v) * m).to(at::kFloat);
  return out;
}

PolicyLoss ppo_policy_loss(const at::Tensor& logp, const at::Tensor& old_logp,
                           const at::Tensor& advantages, const at::Tensor& mask, double clip_eps) {
  check_tokens(logp, mask, "ppo_policy_loss: logp");
  check_tokens(old_logp, mask, "ppo_policy_loss: old_logp");
  check_tokens(advantages, mask, "ppo_policy_loss: advantages");
  TESSERA_CHECK(clip_eps > 0, InvalidArgument, "ppo_policy_loss: clip_eps must be > 0, got ",
                clip_eps);
  at::Tensor adv = advantages.detach().to(logp.scalar_type());
  at::Tensor ratio = at::exp(logp - old_logp.detach());
  at::Tensor unclipped = -adv * ratio;
  at::Tensor clipped = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps);
  PolicyLoss out;
  out.loss = masked_mean(at::maximum(unclipped, clipped), mask);
  at::NoGradGuard no_grad;
  out.clip_fraction = masked_mean((clipped > unclipped).to(at::kFloat), mask).item<double>();
  out.approx_kl = masked_mean((old_logp - logp).detach(), mask).item<double>();
  return out;
}

at::Tensor value_loss(const at::Tensor& values, const at::Tensor& old_values,
                      const at::Tensor& returns, const at::Tensor& mask, double clip_eps) {
  check_tokens(values, mask, "value_loss: values");
  check_tokens(old_values, mask, "value_loss: old_values");
  check_tokens(returns, mask, "value_loss: returns");
  at::Tensor ret = returns.detach().to(values.scalar_type());
  at::Tensor old = old_values.detach().to(values.scalar_type());
  at::Tensor clipped = old + (values - old).clamp(-clip_eps, clip_eps);
  at::Tensor loss = at::maximum((values - ret).pow(2), (clipped - ret).pow(2)) * 0.5;
  return masked_mean(loss, mask);
}

at::Tensor kl_divergence(const at::Tensor& logp, const at::Tensor& ref_logp,
                         KlEstimator estimator) {
  TESSERA_CHECK(logp.sizes() == ref_logp.sizes(), InvalidArgument, "kl_divergence: shapes ",
                shape_string(logp.sizes()), " and ", shape_string(ref_logp.sizes()), " differ");
  at::Tensor d = logp - ref_logp;
  switch (estimator) {
    case KlEstimator::kK1:
      return d;
    case KlEstimator::kK2:
      return d.pow(2) * 0.5;
    case KlEstimator::kK3:
      return at::exp(-d) + d - 1.0;
  }
  return d;
}

at::Tensor kl_penalized_rewards(const at::Tensor& scores, const at::Tensor& kl,
                                const at::Tensor& mask, double beta) {
  check_tokens(kl, mask, "kl_penalized_rewards: kl");
  TESSERA_CHECK(scores.dim() == 1 && scores.size(0) == mask.size(0), InvalidArgument,
                "kl_penalized_rewards: expected scores [", mask.size(0), "], got ",
                shape_string(scores.sizes()));
  at::Tensor m = mask.to(at::kFloat);
  at::Tensor rewards = -beta * kl.detach().to(at::kFloat) * m;
  // The last response token of each sequence: the highest masked position.
  at::Tensor positions = at::arange(mask.size(1), at::kLong).unsqueeze(0).expand_as(mask);
  at::Tensor last = at::where(mask.to(at::kBool), positions, at::full_like(positions, -1)).amax(1);
  TESSERA_CHECK((last >= 0).all().item<bool>(), InvalidArgument,
                "kl_penalized_rewards: a sequence has no response token");
  rewards.scatter_add_(1, last.unsqueeze(1), scores.to(at::kFloat).unsqueeze(1));
  return rewards;
}

at::Tensor grpo_advantages(const at::Tensor& scores, int64_t group_size, const at::Tensor& mask,
                           bool divide_by_std, double eps) {
  TESSERA_CHECK(scores.dim() == 1 && mask.dim() == 2 && scores.size(0) == mask.size(0),
                InvalidArgument, "grpo_advantages: expected scores [B] and mask [B, T], got ",
                shape_string(scores.sizes()), " and ", shape_string(mask.sizes()));
  TESSERA_CHECK(group_size >= 2 && scores.size(0) % group_size == 0, InvalidArgument,
                "grpo_advantages: ", scores.size(0), " responses do not form groups of ",
                group_size, " (need group_size >= 2 dividing the batch)");
  at::Tensor s = scores.to(at::kDouble).view({-1, group_size});
  at::Tensor centered = s - s.mean(1, true);
  at::Tensor adv = divide_by_std ? centered / (s.std(1, /*unbiased=*/true, true) + eps) : centered;
  return (adv.view({-1, 1}) * mask.to(at::kDouble)).to(at::kFloat);
}

at::Tensor remax_advantages(const at::Tensor& scores, const at::Tensor& baseline_scores,
                            const at::Tensor& mask) {
  TESSERA_CHECK(scores.dim() == 1 && scores.sizes() == baseline_scores.sizes() && mask.dim() == 2 &&
                    mask.size(0) == scores.size(0),
                InvalidArgument,
                "remax_advantages: expected scores and baselines [B] and mask [B, T]");
  return ((scores - baseline_scores).to(at::kFloat).unsqueeze(1) * mask.to(at::kFloat));
}

at::Tensor token_logprobs(nn::Transformer& model, const at::Tensor& sequences) {
  TESSERA_CHECK(
      sequences.dim() == 2 && sequences.size(1) >= 2 && sequences.scalar_type() == at::kLong,
      InvalidArgument, "token_logprobs: expected int64 sequences [batch, length >= 2], got ",
      shape_string(sequences.sizes()));
  const int64_t L = sequences.size(1);
  at::Tensor logits = model.forward(sequences.narrow(1, 0, L - 1)).logits.to(at::kFloat);
  at::Tensor logp = at::log_softmax(logits, -1);
  return logp.gather(-1, sequences.narrow(1, 1, L - 1).unsqueeze(-1)).squeeze(-1);
}

double arithmetic_reward(const std::string& answer, const std::string& completion) {
  tessera::tasks::ArithmeticExample ex;
  ex.answer = answer;
  return tessera::tasks::arithmetic_correct(ex, completion) ? 1.0 : 0.0;
}

}  // namespace tessera::rlhf
