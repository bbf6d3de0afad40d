#include "tessera/moe/search.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <random>

#include "tessera/core/error.h"

namespace tessera::moe {

Simulation simulate(const PlatformProfile& p, const PriceSheet& prices, const Deployment& plan,
                    const Loads& real) {
  TESSERA_CHECK(plan.layers.size() == real.size(), InvalidArgument, "simulate: plan for ",
                plan.layers.size(), " layers, loads for ", real.size());
  Simulation s;
  s.memory_factor.assign(real.size(), {});
  s.payload_factor.assign(real.size(), {});
  for (size_t l = 0; l < real.size(); ++l) {
    const LayerPlan& lp = plan.layers[l];
    double layer_seconds = 0;
    s.memory_factor[l].assign(real[l].size(), 1.0);
    s.payload_factor[l].assign(real[l].size(), 1.0);
    for (size_t e = 0; e < real[l].size(); ++e) {
      const double tokens = real[l][e];
      if (tokens <= 0) continue;
      ExpertChoice c = lp.experts.at(e);
      Method m = lp.method;
      ExpertCost ec = expert_cost(p, prices, {m, lp.beta, c, tokens});
      if (!ec.feasible && m == Method::kDirect) {
        // Over the payload limit: the gate sends it through storage.
        const double per = std::ceil(tokens / c.replicas);
        if (per * static_cast<double>(p.input_bytes_per_token) >
            static_cast<double>(prices.payload_limit_bytes)) {
          ++s.payload_overflows;
          s.payload_factor[l][e] = std::ceil(per * static_cast<double>(p.input_bytes_per_token) /
                                             static_cast<double>(prices.payload_limit_bytes));
          m = Method::kIndirect;
          ec = expert_cost(p, prices, {m, lp.beta, c, tokens});
        }
      }
      if (!ec.feasible) {
        // Out of memory: more replicas until the tokens fit.
        const int base = c.replicas;
        while (!ec.feasible && c.replicas < 1024) {
          c.replicas *= 2;
          ec = expert_cost(p, prices, {m, lp.beta, c, tokens});
        }
        ++s.memory_overflows;
        s.memory_factor[l][e] = static_cast<double>(c.replicas) / base;
        // The failed attempt is billed its start-up too.
        s.cost += base * prices.invocation_cost(p.memory_mb[c.memory_index], p.t_head);
        s.invocations += base;
      }
      s.invocations += c.replicas;
      s.cost += ec.cost;
      layer_seconds = std::max(layer_seconds, ec.seconds);
    }
    s.seconds += layer_seconds;
  }
  return s;
}

namespace {

// A Gaussian process with an RBF kernel on standardised targets.
class Gp {
 public:
  Gp(double length_scale, double noise) : ls_(length_scale), noise_(noise) {}
  void add(std::vector<double> x, double y) {
    xs_.push_back(std::move(x));
    ys_.push_back(y);
    fit();
  }
  // Posterior mean and standard deviation (in target units).
  std::pair<double, double> predict(const std::vector<double>& x) const {
    const int64_t n = static_cast<int64_t>(xs_.size());
    at::Tensor k = at::empty({n, 1}, at::kDouble);
    for (int64_t i = 0; i < n; ++i) k[i][0] = kernel(x, xs_[i]);
    const double mean = (k.t().matmul(alpha_)).item<double>() * sd_ + mu_;
    at::Tensor v = at::linalg_solve_triangular(chol_, k, /*upper=*/false);
    const double var = std::max(1e-12, 1.0 + noise_ - v.pow(2).sum().item<double>());
    return {mean, std::sqrt(var) * sd_};
  }

 private:
  double kernel(const std::vector<double>& a, const std::vector<double>& b) const {
    double d = 0;
    for (size_t i = 0; i < a.size(); ++i) d += (a[i] - b[i]) * (a[i] - b[i]);
    return std::exp(-0.5 * d / (ls_ * ls_));
  }
  void fit() {
    const int64_t n = static_cast<int64_t>(xs_.size());
    mu_ = 0;
    for (double y : ys_) mu_ += y / n;
    double var = 0;
    for (double y : ys_) var += (y - mu_) * (y - mu_) / n;
    sd_ = var > 0 ? std::sqrt(var) : 1.0;
    at::Tensor K = at::empty({n, n}, at::kDouble), y = at::empty({n, 1}, at::kDouble);
    for (int64_t i = 0; i < n; ++i) {
      y[i][0] = (ys_[i] - mu_) / sd_;
      for (int64_t j = 0; j < n; ++j) K[i][j] = kernel(xs_[i], xs_[j]) + (i == j ? noise_ : 0.0);
    }
    chol_ = at::linalg_cholesky(K);
    alpha_ = at::cholesky_solve(y, chol_);
  }
  double ls_, noise_, mu_ = 0, sd_ = 1;
  std::vector<std::vector<double>> xs_;
  std::vector<double> ys_;
  at::Tensor chol_, alpha_;
};

double expected_improvement(double mean, double sd, double best) {
  const double z = (best - mean) / sd;
  const double cdf = 0.5 * std::erfc(-z / std::sqrt(2.0));
  const double pdf = std::exp(-0.5 * z * z) / std::sqrt(2 * M_PI);
  return (best - mean) * cdf + sd * pdf;
}

}  // namespace

BoTrace bayesian_optimisation(const PlatformProfile& p, const PriceSheet& prices,
                              const Loads& predicted, const std::function<Loads(int)>& real_batch,
                              const BoOptions& o) {
  TESSERA_CHECK(!predicted.empty() && o.max_iterations > 0 && o.lambda > 0, InvalidArgument,
                "bayesian_optimisation: need predicted loads and positive iteration counts");
  const size_t L = predicted.size(), E = predicted.front().size();
  // One dimension per (layer, expert), plus one scaling every entry (the
  // headroom a deployment keeps against load noise).
  const size_t dims = L * E + 1;
  std::mt19937_64 rng(o.seed);
  std::uniform_real_distribution<double> unit(0, 1);
  std::vector<double> tau(dims, 0.0), log_c(dims, 0.0), best_x(dims, 0.0);
  Gp gp(o.length_scale, o.noise);
  BoTrace trace;
  double best = std::numeric_limits<double>::infinity();
  auto loads_for = [&](const std::vector<double>& x) {
    Loads out = predicted;
    for (size_t l = 0; l < L; ++l)
      for (size_t e = 0; e < E; ++e)
        out[l][e] = predicted[l][e] * std::exp(x[l * E + e] + x[dims - 1]);
    return out;
  };
  int since_improvement = 0;
  double best_at_window_start = best;
  for (int it = 0; it < o.max_iterations; ++it) {
    // Propose: the current best perturbed dimension by dimension (epsilon-
    // greedy), scored by expected improvement under the surrogate.
    std::vector<double> x = best_x;
    if (it > 0) {
      double best_ei = -1;
      for (int c = 0; c < o.candidates; ++c) {
        std::vector<double> cand = best_x;
        for (size_t k = 0; k < dims; ++k) {
          const double eps = o.eps0 / (1.0 + o.rho * tau[k]);
          if (unit(rng) < eps) cand[k] += (unit(rng) < 0.5 ? -1 : 1) * o.step * (0.5 + unit(rng));
        }
        auto [m, s] = gp.predict(cand);
        const double ei = expected_improvement(m, s, best);
        if (ei > best_ei) {
          best_ei = ei;
          x = cand;
        }
      }
      for (size_t k = 0; k < dims; ++k) {
        if (x[k] != best_x[k]) tau[k] += 1;
      }
    }
    Deployment d = optimal_deployment(p, prices, loads_for(x), o.slo_seconds, o.space);
    const Loads real = real_batch(it);
    Simulation sim = simulate(p, prices, d, real);
    // Missing the SLO costs in proportion to the miss, so the surrogate
    // sees which way to go.
    const double miss = std::max(0.0, sim.seconds / o.slo_seconds - 1.0);
    double cost = sim.cost * (1.0 + o.slo_penalty * miss);
    gp.add(x, cost);
    trace.cost.push_back(cost);
    if (cost < best) {
      best = cost;
      best_x = x;
      trace.deployment = d;
    }
    trace.best.push_back(best);
    // The corrective cases, applied to the incumbent. A deployment that
    // missed the SLO on the real batch also raises the headroom by the miss.
    if (miss > 0) best_x[dims - 1] = std::max(best_x[dims - 1], x[dims - 1] + std::log1p(miss));
    const Loads used = loads_for(x);
    for (size_t l = 0; l < L; ++l) {
      for (size_t e = 0; e < E; ++e) {
        const size_t k = l * E + e;
        if (std::abs(used[l][e] - real[l][e]) > o.alpha * std::max(real[l][e], 1.0)) {
          // A misprediction: explore this dimension longer, and move the
          // incumbent's correction halfway to what the batch showed.
          tau[k] = 0;
          if (predicted[l][e] > 0 && real[l][e] > 0) {
            best_x[k] += 0.5 * (std::log(real[l][e] / predicted[l][e]) - best_x[k] - x[dims - 1]);
          }
        }
        if (sim.memory_factor[l][e] > 1)
          best_x[k] = std::max(best_x[k], x[k] + std::log(sim.memory_factor[l][e]));
        if (sim.payload_factor[l][e] > 1)
          best_x[k] = std::max(best_x[k], x[k] + std::log(sim.payload_factor[l][e]));
      }
    }
    ++trace.iterations;
    // Stop rule: less than zeta relative improvement over lambda iterations.
    if (++since_improvement >= o.lambda) {
      if (std::isfinite(best_at_window_start) &&
          (best_at_window_start - best) <= o.zeta * best_at_window_start) {
        trace.converged = true;
        break;
      }
      best_at_window_start = best;
      since_improvement = 0;
    }
    if (it == 0) best_at_window_start = best;
  }
  trace.corrections.assign(L, std::vector<double>(E, 1.0));
  for (size_t l = 0; l < L; ++l)
    for (size_t e = 0; e < E; ++e)
      trace.corrections[l][e] = std::exp(best_x[l * E + e] + best_x[dims - 1]);
  return trace;
}

}  // namespace tessera::moe
