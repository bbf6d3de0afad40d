// tessera/rlhf/algorithms.h — the per-token arithmetic of PPO, GRPO and
// ReMax (HybridFlow's algorithms), as plain tensor functions the driver
// programs call. Token tensors are [B, T] over the response positions, with
// `mask` [B, T] (1 for response tokens, 0 for padding); losses average over
// the masked tokens of the whole batch ("token-mean", as verl does).
//
//   auto kl = tessera::rlhf::kl_divergence(logp, ref_logp, KlEstimator::kK1);
//   at::Tensor rewards = tessera::rlhf::kl_penalized_rewards(scores, kl, mask, 0.05);
//   auto [adv, ret] = tessera::rlhf::gae(rewards, values, mask, 1.0, 0.95);
//   auto pl = tessera::rlhf::ppo_policy_loss(logp, old_logp, adv, mask, 0.2);
//
// Thread safety: pure functions of tensors; thread-safe.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

namespace tessera::rlhf {

// Mean of x over mask == 1 (0 when the mask is empty).
at::Tensor masked_mean(const at::Tensor& x, const at::Tensor& mask);

// Generalised advantage estimation over each sequence's response tokens,
// right to left: delta_t = r_t + gamma V_{t+1} - V_t (V after the last
// response token is 0), A_t = delta_t + gamma lambda A_{t+1}; returns
// R_t = A_t + V_t. Padding positions get 0. Advantages are not whitened.
struct Gae {
  at::Tensor advantages, returns;  // [B, T] float
};
Gae gae(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask, double gamma,
        double lambda);

// PPO's clipped surrogate: ratio = exp(logp - old_logp),
// loss = token-mean of -min(ratio A, clip(ratio, 1 - eps, 1 + eps) A).
// Differentiable in logp.
struct PolicyLoss {
  at::Tensor loss;           // scalar
  double clip_fraction = 0;  // share of tokens where the clipped term won
  double approx_kl = 0;      // token-mean of old_logp - logp
};
PolicyLoss ppo_policy_loss(const at::Tensor& logp, const at::Tensor& old_logp,
                           const at::Tensor& advantages, const at::Tensor& mask, double clip_eps);

// Clipped value loss: token-mean of 0.5 max((V - R)^2, (V_clip - R)^2) with
// V_clip = old_V + clamp(V - old_V, -eps, eps). Differentiable in values.
at::Tensor value_loss(const at::Tensor& values, const at::Tensor& old_values,
                      const at::Tensor& returns, const at::Tensor& mask, double clip_eps);

// Per-token KL(policy || reference) estimates from log-probabilities of the
// sampled tokens: k1 = logp - ref; k2 = (logp - ref)^2 / 2; k3 =
// exp(ref - logp) - (ref - logp) - 1 (non-negative, low variance).
enum class KlEstimator { kK1, kK2, kK3 };
at::Tensor kl_divergence(const at::Tensor& logp, const at::Tensor& ref_logp, KlEstimator estimator);

// Token rewards for PPO with a KL penalty: -beta * kl on every response
// token, plus the sequence's score [B] on its last response token.
at::Tensor kl_penalized_rewards(const at::Tensor& scores, const at::Tensor& kl,
                                const at::Tensor& mask, double beta);

// GRPO: the batch holds groups of `group_size` consecutive responses to one
// prompt; each response's advantage is (score - group mean) / (group std +
// eps) (std with Bessel's correction; without std division when
// `divide_by_std` is false), the same on all its response tokens.
at::Tensor grpo_advantages(const at::Tensor& scores, int64_t group_size, const at::Tensor& mask,
                           bool divide_by_std = true, double eps = 1e-6);

// ReMax: advantage = score - score of the greedy response to the same
// prompt (the baseline), on every response token.
at::Tensor remax_advantages(const at::Tensor& scores, const at::Tensor& baseline_scores,
                            const at::Tensor& mask);

}  // namespace tessera::rlhf

namespace tessera::nn {
class Transformer;
}

namespace tessera::rlhf {

// Log-probabilities under `model` of each token given the ones before it:
// sequences [B, L] (prompt + response, right-padded), result [B, L - 1]
// where column j is log p(sequences[:, j + 1] | sequences[:, :j + 1]) in
// fp32. Differentiable in the model's parameters (for the actor's loss);
// call under at::NoGradGuard for the reference policy and old log-probs.
at::Tensor token_logprobs(nn::Transformer& model, const at::Tensor& sequences);

// Rule reward for the synthetic arithmetic task: 1 when the completion's
// first number equals the answer (tessera::tasks::arithmetic_correct), else 0.
double arithmetic_reward(const std::string& answer, const std::string& completion);

}  // namespace tessera::rlhf
