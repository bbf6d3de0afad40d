// Fuzz target: adapter_config.json of LoRA (PEFT) and MoS adapters
// (tessera::lora::load_adapter).
//
// At start a two-layer base model is built and a LoRA and a MoS adapter of
// it are saved (lora_fixture.h); their weights sit together in one
// adapter_model.safetensors. Input: the bytes of adapter_config.json,
// written beside those weights. An adapter that loads must fit the base
// model: every target is one of the model's linear modules, and applying it
// to a batch gives an output of the layer's shape.
#include <ATen/ATen.h>

#include <cstdint>
#include <string>

#include "fuzz_common.h"
#include "lora_fixture.h"

namespace {

struct Fixture {
  tessera::fuzz::ScratchDir scratch;
  tessera::nn::Transformer base = tessera::fuzz::lora_base_model();
  std::string dir = scratch.file("both");
  Fixture() { tessera::fuzz::save_fixture_adapters(base, scratch.path()); }
};

Fixture& fixture() {
  static Fixture f;
  return f;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fixture();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Fixture& f = fixture();
  tessera::fuzz::write_file(f.dir + "/adapter_config.json",
                            std::string_view(reinterpret_cast<const char*>(data), size));
  tessera::fuzz::expect_errors("lora::load_adapter", [&] {
    const auto adapter = tessera::lora::load_adapter(f.dir, f.base);
    adapter->set_training(false);
    at::NoGradGuard no_grad;
    for (const auto& t : adapter->targets()) {
      tessera::fuzz::require(f.base.has_parameter(t.name + ".weight"),
                             "target '" + t.name + "' is not a module of the base model");
      const at::Tensor x = at::ones({1, 3, t.in});
      const at::Tensor y = at::zeros({1, 3, t.out});
      tessera::nn::AdapterContext context;
      const at::Tensor out = adapter->apply(t.name, x, y, context);
      tessera::fuzz::require(out.sizes() == y.sizes(), "adapter output shape for '" + t.name + "'");
    }
  });
  return 0;
}
