// tessera/moe/platform.h — a real local serverless platform for expert
// functions, and the MoE gate's scatter-gather over it.
//
// FunctionPlatform runs each invocation on an instance of its function: a
// tessera-function process serving gRPC on loopback. A warm idle instance
// is reused; otherwise one is started (a cold start loads the expert's
// weights), up to the function's concurrency limit (more invocations wait).
// Instances idle longer than the keep-alive are reclaimed. Every invocation
// is billed by the meter exactly as the price sheet says (duration seen by
// the platform, rounded up, times the configured memory, plus the request
// fee). An instance that dies mid-request is billed for what it ran, removed,
// and the request retried on another instance (`retries` times), then
// reported (tessera::Unavailable naming the function) — never dropped.
//
// Indirect transfers go through a storage channel (storage.h): local files
// by default, or Redis.
//
// ServerlessMoE is one MoE layer's gate: each expert's tokens go to its
// replicas by the layer's method — direct (in the payload; a payload the
// function refuses falls back to indirect), indirect (one object in, one
// out) or pipelined (minibatches of beta tokens written while the function
// already reads and computes the first) — and the outputs are combined with
// the router weights exactly as the in-process layer does.
#pragma once

#include <ATen/core/Tensor.h>

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "tessera/moe/deploy.h"

namespace tessera::moe {

struct FunctionSpec {
  std::string weights;  // safetensors file with the expert's tensors
  std::string prefix;   // their names: prefix + "w1.weight", "w2.weight", "w3.weight"
  int64_t memory_mb = 1024;
};

struct PlatformOptions {
  std::string program;  // tessera-function; default: next to this program, then PATH
  PriceSheet prices = PriceSheet::aws_lambda();
  // Storage channel of indirect transfers (storage.h): "files:<dir>",
  // "redis://host:port", or "" for files in a fresh directory under /dev/shm.
  std::string storage;
  std::chrono::milliseconds keep_alive{60000};
  int concurrency_limit = 8;  // instances per function
  std::chrono::milliseconds start_timeout{30000};
  std::chrono::milliseconds invoke_timeout{120000};
  int retries = 1;
};

class FunctionPlatform {
 public:
  explicit FunctionPlatform(PlatformOptions options);
  ~FunctionPlatform();  // stops every instance, removes the storage directory it made
  FunctionPlatform(const FunctionPlatform&) = delete;
  FunctionPlatform& operator=(const FunctionPlatform&) = delete;

  // Creates or reconfigures a function (instances of an older
  // configuration are stopped).
  void deploy(const std::string& name, const FunctionSpec& spec);

  struct Request {
    at::Tensor tokens;                    // direct
    std::vector<std::string> input_keys;  // indirect / pipelined (keys in the storage channel)
    // At most a day: the function refuses longer waits (InvalidArgument).
    std::chrono::milliseconds wait{30000};  // pipelined: how long a key may take to appear
  };
  struct Result {
    at::Tensor outputs;  // direct only
    double seconds = 0;  // billed duration (before rounding)
    double compute_seconds = 0;
    bool cold_start = false;
    int attempts = 1;
  };
  // Thread-safe; blocks while the function is at its concurrency limit.
  // InvalidArgument / ResourceExhausted from the function (bad input,
  // payload or memory limit) propagate; Unavailable after the retries.
  Result invoke(const std::string& name, const Request& request);

  // Storage channel (keys are plain names).
  std::string storage_key(const std::string& name) const;
  void put(const std::string& key, const at::Tensor& x);
  at::Tensor get(const std::string& key, std::chrono::milliseconds wait = {});
  void remove(const std::string& key);

  BillingMeter& meter();
  struct Stats {
    int64_t cold_starts = 0, warm_starts = 0, retries = 0, reclaimed = 0, instances = 0;
  };
  Stats stats() const;
  // Stops instances idle longer than the keep-alive (also done by a
  // background thread); returns how many.
  int reclaim_idle();
  // Live instances' process ids (for fault tests).
  std::vector<long> instance_pids(const std::string& name) const;
  const PlatformOptions& options() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// One MoE layer's expert weights in the Mixtral layout of a Hugging Face
// safetensors file.
struct ExpertLayer {
  std::string weights;  // safetensors file
  std::string prefix;   // "model.layers.<l>.block_sparse_moe."
  int64_t num_experts = 0, top_k = 0;
  bool normalize_top_k = true;
};

// The in-process reference: router softmax, top-k, (normalised) weights,
// SwiGLU experts, weighted sum. x [N, H] -> [N, H].
struct Routing {
  at::Tensor experts;  // [N, k] int64
  at::Tensor weights;  // [N, k] float
};
Routing route(const ExpertLayer& layer, const at::Tensor& x);
at::Tensor moe_layer_reference(const ExpertLayer& layer, const at::Tensor& x,
                               const Routing& routing);

class ServerlessMoE {
 public:
  ServerlessMoE(FunctionPlatform& platform, ExpertLayer layer, std::string name);
  // Deploys the layer's functions as `plan` says (one function per expert
  // at its memory size; replicas are concurrent invocations of it).
  void configure(const LayerPlan& plan, const PlatformProfile& profile);
  struct Stats {
    double seconds = 0;
    int64_t invocations = 0, fallbacks = 0;
  };
  // Scatter, compute on the platform, gather and combine.
  at::Tensor forward(const at::Tensor& x, const Routing& routing, Stats* stats = nullptr);

 private:
  FunctionPlatform& platform_;
  ExpertLayer layer_;
  std::string name_;
  LayerPlan plan_;
  uint64_t calls_ = 0;
};

// Calibrates a cost-model profile from real invocations on `platform`: the
// expert's per-token time at every memory size of the price sheet (one
// function per size, timed inside the function), the warm-invocation
// overhead (t_head), storage latency and bandwidth of the storage channel,
// and the call bandwidth of direct payloads. Sizes (D_in, D_o, weights,
// intermediates) come from the layer's tensors.
// With `concurrency` > 1 the per-token time is measured while that many
// functions compute at once (local processes share the machine's cores, as
// a layer's experts will when served), and the storage latency from a
// pipelined invocation (per minibatch, as the function sees it).
PlatformProfile calibrate_platform(FunctionPlatform& platform, const ExpertLayer& layer,
                                   int64_t hidden_size, int64_t intermediate_size,
                                   int concurrency = 1);

}  // namespace tessera::moe
