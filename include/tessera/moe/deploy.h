// tessera/moe/deploy.h — billing, the cost and time models of serverless
// expert deployment, the optimal deployment search and a simulator
// (the serverless-MoE paper, ALGORITHMS.md §1).
//
// A deployment chooses, per MoE layer, how tokens reach the experts
// (pipelined indirect through storage in minibatches of beta tokens,
// indirect, or direct in the request payload) and, per expert, a memory
// size and a replica count. Per replica handling r tokens:
//   pipelined: T_head + a + c + u + (ceil(r / beta) - 1) max(a, c, u), with
//              a = T_dl + beta D_in / B_s (download), c = beta t_cal(m),
//              u = T_dl + beta D_o / B_s (upload) per minibatch;
//   indirect:  T_head + 2 T_dl + r ((D_in + D_o) / B_s + t_cal(m));
//   direct:    T_head + r (D_o / B_f + t_cal(m)), only when r D_in <= payload limit.
// Memory: weights + intermediates + (tokens held at once) (D_in + D_o) <= m.
// A layer takes as long as its slowest replica; layers run one after the
// other, so the end-to-end time is the sum. Cost: every replica is billed
// its duration (rounded up to the billing granularity) times its memory in
// GB at the price per GB-second, plus the per-request fee.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace tessera::moe {

// A provider's price sheet and limits, kept as data (data/aws_lambda_prices.json).
struct PriceSheet {
  std::string name;
  double gb_second = 0;    // $ per GB-second
  double per_request = 0;  // $ per invocation
  double billing_granularity_ms = 1;
  double minimum_billed_ms = 1;
  std::vector<int64_t> memory_sizes_mb;
  double memory_mb_per_vcpu = 1769;
  int64_t payload_limit_bytes = 6 << 20;
  std::string cpu_cluster_name;
  double cpu_cluster_per_hour = 0;  // the always-on alternative

  // InvalidArgument naming the key for unknown or missing keys.
  static PriceSheet from_json_file(const std::string& path);
  static PriceSheet from_json(const std::string& text, const std::string& source = "<inline>");
  // The sheet shipped in data/aws_lambda_prices.json (compiled in).
  static PriceSheet aws_lambda();

  // Billed duration: rounded up to the granularity, at least the minimum.
  double billed_seconds(double seconds) const;
  // Cost of one invocation.
  double invocation_cost(int64_t memory_mb, double seconds) const;
};

// Records invocations as the provider bills them. Thread-compatible.
class BillingMeter {
 public:
  explicit BillingMeter(PriceSheet prices) : prices_(std::move(prices)) {}
  struct Invocation {
    std::string function;
    int64_t memory_mb = 0;
    double seconds = 0, billed_seconds = 0, cost = 0;
  };
  // Returns the invocation's cost.
  double record(const std::string& function, int64_t memory_mb, double seconds);
  double total_cost() const { return total_; }
  double gb_seconds() const { return gb_seconds_; }
  const std::vector<Invocation>& invocations() const { return invocations_; }
  const PriceSheet& prices() const { return prices_; }

 private:
  PriceSheet prices_;
  std::vector<Invocation> invocations_;
  double total_ = 0, gb_seconds_ = 0;
};

// Measured (or assumed) platform parameters.
struct PlatformProfile {
  std::vector<int64_t> memory_mb;      // the sizes t_cal was measured at
  std::vector<double> t_cal;           // seconds per token at each size
  double t_head = 0.05;                // start of a warm instance + weight load share
  double t_dl = 0.01;                  // storage access latency per object
  double storage_bandwidth = 100e6;    // B_s, bytes/s
  double call_bandwidth = 50e6;        // B_f, bytes/s (request/response payloads)
  int64_t input_bytes_per_token = 0;   // D_in
  int64_t output_bytes_per_token = 0;  // D_o
  int64_t expert_weight_bytes = 0;
  int64_t intermediate_bytes_per_token = 0;
  int64_t runtime_overhead_bytes = 64 << 20;  // the function's own footprint
  // A cold start (new instance, weights loaded) beyond a warm invocation:
  // measured by calibrate_platform and reported; deployments are priced
  // warm, as a served model's functions stay warm between batches.
  double cold_start = 0;
};

enum class Method { kPipelined, kIndirect, kDirect };
const char* method_name(Method m);

struct ExpertChoice {
  int memory_index = 0;  // into PlatformProfile::memory_mb
  int replicas = 1;
};

struct LayerPlan {
  Method method = Method::kIndirect;
  int64_t beta = 0;  // pipelined minibatch size
  std::vector<ExpertChoice> experts;
  double seconds = 0, cost = 0;
};

struct Deployment {
  std::vector<LayerPlan> layers;
  double seconds = 0, cost = 0;
  bool feasible = false;
};

struct SearchSpace {
  int max_replicas = 8;
  std::vector<int64_t> betas = {32, 128, 512};
  std::vector<Method> methods = {Method::kPipelined, Method::kIndirect, Method::kDirect};
  // Fix every function at one memory size (index; -1: free), e.g. LambdaML's maximum.
  int fixed_memory_index = -1;
  bool allow_replicas = true;
};

// What one function replica is asked to do.
struct ReplicaWork {
  Method method = Method::kDirect;
  int memory_index = 0;  // into PriceSheet::memory_sizes_mb
  int64_t tokens = 0;
  int64_t beta = 0;  // pipelined minibatch size (kPipelined only)
};
// Time of one replica handling its tokens (infinite when infeasible:
// memory or payload limit).
double replica_seconds(const PlatformProfile& p, const PriceSheet& prices, const ReplicaWork& work);

// What one expert of a layer is asked to do: `tokens` tokens split evenly
// over the replicas `choice` gives it.
struct ExpertWork {
  Method method = Method::kDirect;
  int64_t beta = 0;
  ExpertChoice choice;
  double tokens = 0;
};
// Time and billed cost of an expert's work (0 tokens: no invocation, 0 time).
struct ExpertCost {
  double seconds = 0, cost = 0;
  bool feasible = true;
};
ExpertCost expert_cost(const PlatformProfile& p, const PriceSheet& prices, const ExpertWork& work);

// Evaluates a deployment against per-expert token counts [layers][experts].
Deployment evaluate(const PlatformProfile& p, const PriceSheet& prices, const Deployment& plan,
                    const std::vector<std::vector<double>>& loads);

// The cheapest deployment whose end-to-end time is at most `slo_seconds`,
// exactly: per layer, the Pareto front of (time, cost) over methods, betas
// and per-expert choices (each expert takes its cheapest option within the
// layer's time), then the layers' fronts merged. `feasible` is false when
// no deployment meets the SLO (the fastest one is returned).
Deployment optimal_deployment(const PlatformProfile& p, const PriceSheet& prices,
                              const std::vector<std::vector<double>>& loads, double slo_seconds,
                              const SearchSpace& space = {});

// Every combination, for checking optimal_deployment on small instances.
Deployment brute_force_deployment(const PlatformProfile& p, const PriceSheet& prices,
                                  const std::vector<std::vector<double>>& loads, double slo_seconds,
                                  const SearchSpace& space = {});

// The paper's procedure: per layer the cheapest method (ignoring the SLO),
// then, while the SLO is violated, the slowest layer moves to its next
// faster option (at most 2 |E| rounds per layer).
Deployment repair_deployment(const PlatformProfile& p, const PriceSheet& prices,
                             const std::vector<std::vector<double>>& loads, double slo_seconds,
                             const SearchSpace& space = {});

// The always-on alternative: a CPU cluster billed per hour for the time the
// same tokens take at `cluster_tokens_per_second` (per MoE layer token).
double cpu_cluster_cost(const PriceSheet& prices, double token_layers,
                        double cluster_tokens_per_second);

}  // namespace tessera::moe

namespace tessera::moe {

// Measures this machine: the per-token time of one expert (a SwiGLU MLP of
// the given sizes) on one thread, scaled to each memory size's CPU share
// (memory / memory_mb_per_vcpu of a vCPU, at most the vCPUs it gets), and
// the storage bandwidth of writing and reading a file in `scratch_dir`.
// Sizes, call bandwidth and start times keep the profile's given values.
PlatformProfile profile_platform(int64_t hidden_size, int64_t intermediate_size,
                                 const PriceSheet& prices, const std::string& scratch_dir,
                                 PlatformProfile base = {});

}  // namespace tessera::moe
