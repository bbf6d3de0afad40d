// tessera/moe/search.h — the simulator and the Bayesian-optimisation outer
// loop of serverless MoE deployment.
//
// simulate() runs a deployment on the loads a batch really routes (not the
// predicted ones), as the platform would: a replica whose real tokens no
// longer fit its memory is split further (ceil(M_real / M_cfg) replicas), a
// direct payload over the limit goes through storage instead; both are
// counted, since the outer loop corrects for them.
//
// bayesian_optimisation() searches over per-(layer, expert) corrections of
// the predicted loads — the count-table entries those experts' tokens map
// to, scaled — and one correction scaling all of them (headroom), with a Gaussian-process surrogate
// of billed cost and a multi-dimensional epsilon-greedy proposal: each dimension k is perturbed
// with its own probability eps0 / (1 + rho tau_k), tau_k counting how often
// it was explored. After each deployment (the three corrective cases):
// experts whose predicted load missed the real one by more than alpha get
// tau reset (explored longer) and their correction moved halfway to the
// ratio the batch showed; memory overflows raise the correction by the
// overflow factor; payload overflows likewise by ceil(R / D_p); an SLO miss
// on the real batch raises the headroom by the relative miss. A deployment
// that misses the SLO counts as its cost times 1 + slo_penalty * (relative
// miss). It stops when
// the best cost improved by less than zeta (relative) over lambda iterations.
//
// Thread safety: pure functions of their arguments; thread-safe.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "tessera/moe/deploy.h"

namespace tessera::moe {

using Loads = std::vector<std::vector<double>>;  // [layer][expert] tokens

struct Simulation {
  double seconds = 0, cost = 0;
  int64_t invocations = 0, memory_overflows = 0, payload_overflows = 0;
  // Per (layer, expert): extra replica factor a memory overflow needed, and
  // the payload overflow factor (1: none).
  std::vector<std::vector<double>> memory_factor, payload_factor;
};
Simulation simulate(const PlatformProfile& p, const PriceSheet& prices, const Deployment& plan,
                    const Loads& real);

struct BoOptions {
  double slo_seconds = 1.0;
  int max_iterations = 60;
  int candidates = 64;  // epsilon-greedy proposals scored by expected improvement per iteration
  // Multi-dimensional epsilon-greedy: dimension k (one correction) is
  // perturbed with probability eps0 / (1 + rho * tau_k), tau_k counting how
  // often it was explored, so well-explored corrections settle while
  // mispredicted ones (tau reset) keep moving. eps0: the starting
  // probability; rho: how fast it decays per exploration.
  double eps0 = 0.5, rho = 0.2;
  double step = 0.25;   // relative perturbation of a correction
  double alpha = 0.2;   // relative load miss that counts as a misprediction
  double zeta = 0.002;  // stop: best cost improved by less than this (relative) ...
  int lambda = 8;       // ... over this many iterations
  double length_scale = 0.5, noise = 1e-4;
  double slo_penalty = 10;  // cost x (1 + slo_penalty x relative SLO miss)
  uint64_t seed = 0;
  SearchSpace space;
};

struct BoTrace {
  std::vector<double> cost;  // simulated billed cost of each iteration's deployment
  std::vector<double> best;  // best so far
  int iterations = 0;
  bool converged = false;                        // the stop rule fired (not the iteration cap)
  std::vector<std::vector<double>> corrections;  // the best corrections
  Deployment deployment;                         // the best deployment
};

// `predicted` are the predictor's loads; `real_batch(i)` returns the real
// loads of the i-th batch the deployment is tried on (the simulator's input).
BoTrace bayesian_optimisation(const PlatformProfile& p, const PriceSheet& prices,
                              const Loads& predicted, const std::function<Loads(int)>& real_batch,
                              const BoOptions& options);

}  // namespace tessera::moe
