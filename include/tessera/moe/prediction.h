// tessera/moe/prediction.h — expert popularity prediction for serverless
// MoE deployment (the serverless-MoE paper's Bayesian predictor).
//
// Routing traces record, for every token of a batch and every MoE layer,
// its token id (f1), position (f2), "attention id" (f3: the token that
// received the most attention from it in that layer's attention, summed
// over heads) and the experts the router chose. A CountTable accumulates
// traces; predictors turn a new batch's token ids into expected tokens per
// expert and layer:
//   * kBayesian   — P(e | f1) = sum over (f2, f3) of P(e | f1, f2, f3) P(f2) P(f3),
//                   f2 uniform over positions, P(f3) the token-id frequency;
//                   cells never seen fall back to P(e | f1), then P(e), and
//                   sparse cells are shrunk toward P(e | f1) (4 pseudo-tokens);
//   * kTokenOnly  — the empirical P(e | f1) (falling back to P(e));
//   * kHistorical — the historical expert frequencies P(e), ignoring tokens.
// Loads are top-k aware: a token contributes k * P(e | f1) to expert e.
//
//   auto trace = tessera::moe::trace_batch(model, ids);     // forward with routing records
//   tessera::moe::CountTable table(model.config());
//   table.add(trace);
//   at::Tensor loads = table.predict(new_ids, tessera::moe::Predictor::kBayesian);  // [layers,
//   experts]
//
// Thread safety: CountTable is thread-compatible (guard concurrent add());
// the free functions are thread-safe.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "tessera/nn/model.h"

namespace tessera::moe {

struct RoutingTrace {
  int64_t num_experts = 0, top_k = 0;
  at::Tensor tokens;         // [N] int64 token ids (f1), N = batch * seq
  at::Tensor positions;      // [N] int64 (f2)
  at::Tensor attention_ids;  // [layers, N] int64 token ids (f3)
  at::Tensor experts;        // [layers, N, top_k] int64
  int64_t num_layers() const { return experts.size(0); }
  // Real tokens per expert: [layers, experts] float.
  at::Tensor loads() const;
};

// Runs the model over `ids` [B, T] (no gradient) and records its routing.
// InvalidArgument for a dense model.
RoutingTrace trace_batch(nn::Transformer& model, const at::Tensor& ids);

enum class Predictor { kBayesian, kTokenOnly, kHistorical };
const char* predictor_name(Predictor p);

class CountTable {
 public:
  CountTable(int64_t num_layers, int64_t num_experts, int64_t top_k);
  // InvalidArgument when the trace's shape does not match.
  void add(const RoutingTrace& trace);
  int64_t batches() const { return batches_; }
  int64_t cells() const;  // distinct (layer, f1, f2, f3) keys

  // Expected tokens per expert for a batch of token ids (any shape):
  // [layers, experts] float, each layer summing to tokens * top_k.
  at::Tensor predict(const at::Tensor& token_ids, Predictor predictor) const;
  // P(e | f1) for one token and layer under a predictor ([experts] double).
  std::vector<double> expert_distribution(int64_t layer, int64_t token, Predictor predictor) const;

  // Multiplies the counts of the (layer, token) cells by `factor` — the
  // knob the Bayesian-optimisation outer loop turns.
  void scale_token(int64_t layer, int64_t token, double factor);

 private:
  struct Cell {
    std::vector<double> experts;
  };
  int64_t layers_, experts_, top_k_;
  int64_t batches_ = 0;
  // (layer, f1) -> ((f2, f3) -> counts); (layer, f1) -> counts; layer -> counts.
  std::vector<std::map<int64_t, std::map<std::pair<int64_t, int64_t>, Cell>>> joint_;
  std::vector<std::map<int64_t, Cell>> by_token_;
  std::vector<Cell> by_layer_;
  std::map<int64_t, double> token_frequency_;  // f3 prior: counts of token ids seen
  double token_total_ = 0;
  int64_t max_position_ = 0;
};

// Relative L1 error of predicted vs real loads: sum |pred - real| / sum real
// over all layers and experts.
double load_error(const at::Tensor& predicted, const at::Tensor& real);

}  // namespace tessera::moe
