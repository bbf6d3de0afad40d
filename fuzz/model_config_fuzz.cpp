// Fuzz target: Hugging Face config.json files (tessera::nn::ModelConfig::parse).
//
// Input: config.json text. A config that parses is valid (parse() calls
// validate()), so everything a tool prints about it must work: summary()
// and the parameter counts (never negative, active <= total), and the
// round trip parse(to_json()) gives the same config back.
#include <cstdint>
#include <string>

#include "fuzz_common.h"
#include "tessera/formats/model_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text = tessera::fuzz::as_string(data, size);
  tessera::fuzz::expect_errors("ModelConfig::parse", [&] {
    const auto cfg = tessera::nn::ModelConfig::parse(text, "config.json");
    const std::string json = cfg.to_json();
    tessera::fuzz::require(tessera::nn::ModelConfig::parse(json, "round trip").to_json() == json,
                           "ModelConfig: parse(to_json()) changed the config");
    cfg.summary();
    const int64_t total = cfg.num_parameters(), active = cfg.num_active_parameters();
    tessera::fuzz::require(
        total > 0 && active > 0 && active <= total,
        "parameter counts: total " + std::to_string(total) + ", active " + std::to_string(active));
  });
  return 0;
}
