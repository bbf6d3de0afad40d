// tessera/rlhf/roles.h — the roles RoleRegistry::builtin() provides, their
// configuration (JSON, unknown keys rejected) and methods.
//
// Batches are rows of samples. A generation batch holds
//   sequences         [n, L] int64  prompt then response, right-padded with 0
//   prompt_lengths    [n]    int64
//   response_lengths  [n]    int64
// plus any extra per-prompt columns of the prompt batch (e.g. "answers"),
// repeated per sample. Per-token tensors ("old_logprobs", "ref_logprobs",
// "values", "advantages", "returns") are [n, L - 1]: column j is about
// token j + 1 given tokens 0..j, so the response occupies columns
// [prompt_length - 1, prompt_length - 1 + response_length) (response_mask).
//
// Model sources (the "model" key): {"hf": "<Hugging Face folder>"} or
// {"gguf": "<file>"}. Tokenizers ("tokenizer"): "bytes", "gguf:<file>" or
// the path of a tokenizer.json.
//
// "actor" — the policy; trains with tensor parallelism "tp" (dp = pool size
//   / tp; "zero1" shards AdamW state over dp) and generates with "gen_tp"
//   (dividing tp) through the 3D-HybridEngine (hybrid_engine.h): before
//   each generation the training shards are all-gathered inside micro-DP
//   groups into generation shards, which (with the KV cache) are freed
//   before the method returns. Keys: model, tp, gen_tp, zero1, lr,
//   max_grad_norm, weight_decay, clip, kl_coef (KL loss against
//   "ref_logprobs", k3), temperature, top_k, max_new_tokens, stop_tokens,
//   micro_batch, seed.
//   generate          DP_COMPUTE (generation mesh)  prompt_ids, prompt_lengths [, extra]
//                     args iteration, samples (per prompt), greedy
//   compute_logprobs  DP_COMPUTE (training mesh)    -> old_logprobs
//   update            DP_COMPUTE (training mesh)    sequences..., advantages [, old_logprobs,
//                     ref_logprobs]; one AdamW step; metrics pg_loss, clip_fraction, kl, grad_norm
//   save / load       ONE_TO_ALL                    args dir (a ckpt checkpoint directory)
// "reference" — the frozen initial policy. Keys: model, tp, micro_batch.
//   compute_logprobs  DP_COMPUTE                    -> ref_logprobs
// "critic" — a value model: the transformer's final hidden state times a
//   value head (zero-initialised). One rank per replica (tp 1), dp = pool size.
//   Keys: model, lr, max_grad_norm, weight_decay, clip, micro_batch.
//   compute_values    DP_COMPUTE                    -> values
//   update            DP_COMPUTE                    sequences..., values, returns; metrics
//   value_loss save / load       ONE_TO_ALL
// "reward_rule" — the arithmetic task's rule: 1 when the response's first
//   number equals "answers" (int64 per row), else 0. Keys: tokenizer.
//   score             DP_COMPUTE                    -> scores [n]; metric mean_score
// "reward_model" — a learned reward: value head on the last response
//   token's hidden state. Keys: model, head (a safetensors file with
//   "value_head.weight" [H] and "value_head.bias" []), micro_batch.
//   score             DP_COMPUTE                    -> scores [n]; metric mean_score
//
// Thread safety: roles run on their worker's single executor thread; the
// helper functions are thread-safe.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

#include "tessera/tokenizer/tokenizer.h"

namespace tessera::rlhf {

// [n, L - 1] float mask of the response tokens' log-probability columns.
at::Tensor response_mask(const at::Tensor& prompt_lengths, const at::Tensor& response_lengths,
                         int64_t length);

// A tokenizer from a role's "tokenizer" value ("bytes", "gguf:<file>",
// tokenizer.json path).
nn::Tokenizer load_tokenizer(const std::string& spec);

}  // namespace tessera::rlhf
