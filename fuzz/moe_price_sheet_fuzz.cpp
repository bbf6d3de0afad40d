// Fuzz target: serverless price sheets (tessera::moe::PriceSheet::from_json),
// and the deployment search that consumes them (tessera-moe-plan --prices).
//
// Input: price-sheet JSON text. A sheet that parses must bill sensibly
// (billed time never below the run time, costs not NaN) and drive the
// optimal deployment search of a small two-layer problem on a made-up
// platform profile, whose answer must match the brute-force search.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "fuzz_common.h"
#include "tessera/moe/deploy.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text = tessera::fuzz::as_string(data, size);
  tessera::fuzz::expect_errors("PriceSheet::from_json", [&] {
    const auto prices = tessera::moe::PriceSheet::from_json(text, "prices.json");
    for (double s : {0.0, 1e-3, 0.25, 3.0}) {
      const double billed = prices.billed_seconds(s);
      tessera::fuzz::require(!std::isnan(billed), "billed_seconds is NaN");
      tessera::fuzz::require(billed >= s * (1 - 1e-9), "billed_seconds below the run time");
      for (int64_t mb : prices.memory_sizes_mb) {
        tessera::fuzz::require(!std::isnan(prices.invocation_cost(mb, s)),
                               "invocation_cost is NaN");
      }
    }
    // The search: the sheet's first four memory sizes, a compute time
    // that shrinks with memory, two layers of two experts.
    tessera::moe::PlatformProfile profile;
    for (size_t i = 0; i < prices.memory_sizes_mb.size() && i < 4; ++i) {
      profile.memory_mb.push_back(prices.memory_sizes_mb[i]);
      profile.t_cal.push_back(1e-4 * 1769.0 / std::max<double>(1.0, prices.memory_sizes_mb[i]));
    }
    profile.input_bytes_per_token = profile.output_bytes_per_token = 2048;
    profile.expert_weight_bytes = 8 << 20;
    profile.intermediate_bytes_per_token = 8192;
    const std::vector<std::vector<double>> loads = {{300, 20}, {0, 900}};
    tessera::moe::SearchSpace space;
    space.max_replicas = 1;  // keeps the brute force to 48^2 combinations
    space.betas = {64};
    const auto best = tessera::moe::optimal_deployment(profile, prices, loads, 2.0, space);
    const auto brute = tessera::moe::brute_force_deployment(profile, prices, loads, 2.0, space);
    tessera::fuzz::require(best.feasible == brute.feasible,
                           "optimal and brute force disagree on feasibility");
    if (best.feasible) {
      tessera::fuzz::require(std::isfinite(best.cost) && best.cost >= 0, "cost not finite");
      tessera::fuzz::require(
          std::abs(best.cost - brute.cost) <= 1e-9 * std::max(1.0, std::abs(brute.cost)),
          "optimal_deployment cost " + std::to_string(best.cost) + " != brute force " +
              std::to_string(brute.cost));
    }
  });
  return 0;
}
