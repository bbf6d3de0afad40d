// examples/common/moe_policies.h — the three deployment policies compared on the
// local function platform with a real model: batches served with the MoE
// layers' experts as functions (billed by the platform's meter), outputs
// checked against the in-process model.
//
//   cpu-cluster  the in-process model on this machine, priced at the CPU
//                cluster's per-core hourly rate for the cores it used;
//   lambdaml     every function at the largest memory size, no prediction,
//                no replicas, indirect transfer through storage;
//   ours         Bayesian-predicted loads, the cheapest deployment whose
//                predicted latency is within slo_factor x LambdaML's
//                measured latency (platform calibrated from real invocations).
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <string>
#include <vector>

#include "tessera/moe/deploy.h"
#include "tessera/moe/platform.h"
#include "tessera/nn/model.h"

namespace tessera::examples {

struct LocalComparisonOptions {
  int64_t profile_batches = 50;  // count-table batches
  int64_t batches = 4;           // served and timed per policy (after 2 warm-up batches)
  double slo_factor = 1.2;
  moe::PlatformOptions platform;
};

struct PolicyResult {
  std::string name;
  double cost = 0;     // billed $ over the timed batches
  double seconds = 0;  // wall time over the timed batches
  double tokens_per_second = 0;
  double max_error = 0;  // max |served - in-process| / max |in-process| of the logits
};

struct LocalComparison {
  moe::PlatformProfile profile;        // calibrated
  std::vector<PolicyResult> policies;  // cpu-cluster, lambdaml, ours
  moe::Deployment ours;                // its plan (predicted cost and latency)
  double slo_seconds = 0;              // per batch
  int64_t tokens_per_batch = 0;
  moe::FunctionPlatform::Stats platform;
};

// `model` is an MoE model loaded from the Hugging Face folder whose single
// safetensors file is `weights`; batch(i) returns token ids [B, T].
LocalComparison compare_policies_locally(nn::Transformer& model, const std::string& weights,
                                         const std::function<at::Tensor(int64_t)>& batch,
                                         const LocalComparisonOptions& options = {});

}  // namespace tessera::examples
