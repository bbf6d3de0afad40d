#include "tessera/moe/prediction.h"

#include <ATen/ATen.h>

#include <cmath>

#include "tessera/core/error.h"

namespace tessera::moe {

namespace {
constexpr double kShrinkage = 4.0;
}  // namespace

at::Tensor RoutingTrace::loads() const {
  const int64_t L = num_layers();
  at::Tensor out = at::zeros({L, num_experts}, at::kFloat);
  for (int64_t l = 0; l < L; ++l) {
    out[l].index_add_(0, experts[l].reshape({-1}), at::ones({experts[l].numel()}, at::kFloat));
  }
  return out;
}

RoutingTrace trace_batch(nn::Transformer& model, const at::Tensor& ids) {
  return translate_errors(
      "moe trace_batch",
      [&]() -> RoutingTrace {
        const nn::ModelConfig& c = model.config();
        TESSERA_CHECK(c.num_experts > 0, InvalidArgument,
                      "trace_batch: the model has no MoE layers");
        TESSERA_CHECK(ids.dim() == 2, InvalidArgument,
                      "trace_batch: expected token ids [batch, seq]");
        at::NoGradGuard no_grad;
        nn::ForwardOptions o;
        o.record_routing = true;
        nn::ForwardOutput out = model.forward(ids, o);
        const int64_t B = ids.size(0), T = ids.size(1);
        RoutingTrace t;
        t.num_experts = c.num_experts;
        t.top_k = c.num_experts_per_tok;
        t.tokens = ids.reshape({-1}).to(at::kLong);
        t.positions = at::arange(T, at::kLong).repeat({B});
        std::vector<at::Tensor> experts, attention;
        for (const nn::RoutingRecord& r : out.routing) {
          experts.push_back(r.experts);
          // Attention argmax is a position within the token's sequence: map it to
          // the token id there.
          at::Tensor pos = r.attention_argmax.defined() ? r.attention_argmax : t.positions;
          at::Tensor row = at::arange(B, at::kLong).repeat_interleave(T);
          attention.push_back(ids.to(at::kLong).index({row, pos}));
        }
        t.experts = at::stack(experts);
        t.attention_ids = at::stack(attention);
        return t;
      },
      ErrorCode::kInvalidArgument);
}

const char* predictor_name(Predictor p) {
  switch (p) {
    case Predictor::kBayesian:
      return "bayesian";
    case Predictor::kTokenOnly:
      return "token-only";
    case Predictor::kHistorical:
      return "historical";
  }
  return "?";
}

CountTable::CountTable(int64_t num_layers, int64_t num_experts, int64_t top_k)
    : layers_(num_layers), experts_(num_experts), top_k_(top_k) {
  TESSERA_CHECK(num_layers > 0 && num_experts > 0 && top_k > 0 && top_k <= num_experts,
                InvalidArgument, "CountTable: bad shape (", num_layers, " layers, ", num_experts,
                " experts, top ", top_k, ")");
  joint_.resize(layers_);
  by_token_.resize(layers_);
  by_layer_.assign(layers_, Cell{std::vector<double>(experts_, 0.0)});
}

void CountTable::add(const RoutingTrace& t) {
  return translate_errors(
      "moe CountTable::add",
      [&]() -> void {
        TESSERA_CHECK(t.num_layers() == layers_ && t.num_experts == experts_ && t.top_k == top_k_,
                      InvalidArgument, "CountTable::add: a trace of ", t.num_layers(), " layers x ",
                      t.num_experts, " experts (top ", t.top_k, ") into a table of ", layers_,
                      " x ", experts_, " (top ", top_k_, ")");
        const int64_t N = t.tokens.size(0);
        auto tok = t.tokens.accessor<int64_t, 1>();
        auto pos = t.positions.accessor<int64_t, 1>();
        auto att = t.attention_ids.accessor<int64_t, 2>();
        auto exp = t.experts.accessor<int64_t, 3>();
        for (int64_t i = 0; i < N; ++i) {
          token_frequency_[tok[i]] += 1;
          token_total_ += 1;
          max_position_ = std::max(max_position_, pos[i] + 1);
        }
        for (int64_t l = 0; l < layers_; ++l) {
          for (int64_t i = 0; i < N; ++i) {
            Cell& joint = joint_[l][tok[i]][{pos[i], att[l][i]}];
            Cell& token = by_token_[l][tok[i]];
            if (joint.experts.empty()) joint.experts.assign(experts_, 0.0);
            if (token.experts.empty()) token.experts.assign(experts_, 0.0);
            for (int64_t k = 0; k < top_k_; ++k) {
              const int64_t e = exp[l][i][k];
              joint.experts[e] += 1;
              token.experts[e] += 1;
              by_layer_[l].experts[e] += 1;
            }
          }
        }
        ++batches_;
      },
      ErrorCode::kInvalidArgument);
}

int64_t CountTable::cells() const {
  int64_t n = 0;
  for (const auto& layer : joint_) {
    for (const auto& [tok, cells] : layer) n += static_cast<int64_t>(cells.size());
  }
  return n;
}

namespace {
std::vector<double> normalised(const std::vector<double>& counts) {
  double s = 0;
  for (double c : counts) s += c;
  std::vector<double> p(counts.size(), s > 0 ? 0.0 : 1.0 / static_cast<double>(counts.size()));
  if (s > 0) {
    for (size_t i = 0; i < counts.size(); ++i) p[i] = counts[i] / s;
  }
  return p;
}
}  // namespace

std::vector<double> CountTable::expert_distribution(int64_t layer, int64_t token,
                                                    Predictor predictor) const {
  TESSERA_CHECK(layer >= 0 && layer < layers_, InvalidArgument, "layer ", layer, " outside [0, ",
                layers_, ")");
  const std::vector<double> prior = normalised(by_layer_[layer].experts);
  if (predictor == Predictor::kHistorical) return prior;
  auto t = by_token_[layer].find(token);
  const std::vector<double> token_only =
      t == by_token_[layer].end() ? prior : normalised(t->second.experts);
  if (predictor == Predictor::kTokenOnly) return token_only;
  // Bayesian marginalisation over f2 (uniform over positions) and f3 (the
  // token-id frequency); cells never observed contribute P(e | f1).
  auto j = joint_[layer].find(token);
  if (j == joint_[layer].end()) return token_only;
  std::vector<double> p(experts_, 0.0);
  double seen = 0;
  const double p_position = 1.0 / static_cast<double>(std::max<int64_t>(max_position_, 1));
  for (const auto& [key, cell] : j->second) {
    auto f = token_frequency_.find(key.second);
    const double w = p_position * (f == token_frequency_.end() ? 0.0 : f->second / token_total_);
    if (w <= 0) continue;
    // A sparsely observed cell is shrunk toward P(e | f1) (kShrinkage
    // pseudo-observations of top_k choices each).
    double n = 0;
    for (double c : cell.experts) n += c;
    const double m = kShrinkage * static_cast<double>(top_k_);
    for (int64_t e = 0; e < experts_; ++e)
      p[e] += w * (cell.experts[e] + m * token_only[e]) / (n + m);
    seen += w;
  }
  for (int64_t e = 0; e < experts_; ++e) p[e] += (1.0 - seen) * token_only[e];
  return p;
}

at::Tensor CountTable::predict(const at::Tensor& token_ids, Predictor predictor) const {
  return translate_errors(
      "moe CountTable::predict",
      [&]() -> at::Tensor {
        at::Tensor ids = token_ids.reshape({-1}).to(at::kLong).contiguous();
        std::map<int64_t, int64_t> counts;
        auto acc = ids.accessor<int64_t, 1>();
        for (int64_t i = 0; i < ids.size(0); ++i) counts[acc[i]] += 1;
        at::Tensor out = at::zeros({layers_, experts_}, at::kDouble);
        auto o = out.accessor<double, 2>();
        for (int64_t l = 0; l < layers_; ++l) {
          for (const auto& [token, n] : counts) {
            const std::vector<double> p = expert_distribution(l, token, predictor);
            for (int64_t e = 0; e < experts_; ++e)
              o[l][e] += static_cast<double>(n * top_k_) * p[e];
          }
        }
        return out.to(at::kFloat);
      },
      ErrorCode::kInvalidArgument);
}

void CountTable::scale_token(int64_t layer, int64_t token, double factor) {
  TESSERA_CHECK(layer >= 0 && layer < layers_ && factor >= 0, InvalidArgument,
                "scale_token: bad layer or factor");
  auto j = joint_[layer].find(token);
  if (j != joint_[layer].end()) {
    for (auto& [key, cell] : j->second) {
      for (double& c : cell.experts) c *= factor;
    }
  }
}

double load_error(const at::Tensor& predicted, const at::Tensor& real) {
  return translate_errors(
      "moe load_error",
      [&]() -> double {
        TESSERA_CHECK(predicted.sizes() == real.sizes(), InvalidArgument,
                      "load_error: shapes differ");
        const double total = real.to(at::kDouble).sum().item<double>();
        return (predicted.to(at::kDouble) - real.to(at::kDouble)).abs().sum().item<double>() /
               std::max(total, 1e-12);
      },
      ErrorCode::kInvalidArgument);
}

}  // namespace tessera::moe
