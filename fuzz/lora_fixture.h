// fuzz/lora_fixture.h — the base model and adapters the adapter_config.json
// fuzz target loads against, shared with the seed-corpus builder so the
// seeds are exactly what save_adapter() writes for this model.
//
//   nn::Transformer base = tessera::fuzz::lora_base_model();
//   tessera::fuzz::save_fixture_adapters(base, dir);  // dir/lora/, dir/mos/, dir/both/
//
// Not thread-safe (writes files).
#pragma once

#include <ATen/ATen.h>

#include <filesystem>
#include <string>

#include "tessera/formats/safetensors.h"
#include "tessera/lora/lora.h"
#include "tessera/nn/model.h"

namespace tessera::fuzz {

// A two-layer Llama with hidden size 16: every projection is a multiple of
// the MoS shard width (16 / 4).
inline nn::Transformer lora_base_model() {
  nn::ModelConfig c;
  c.model_type = "llama";
  c.vocab_size = 32;
  c.hidden_size = 16;
  c.intermediate_size = 32;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 2;
  c.num_key_value_heads = 1;
  c.max_position_embeddings = 64;
  return nn::Transformer(c);
}

// Saves a rank-4 LoRA adapter (q_proj, v_proj, down_proj) to dir/lora and a
// MoS adapter (every switch on, rank 4, all-linear) to dir/mos with
// save_adapter(), then writes dir/both/adapter_model.safetensors holding the
// tensors of both, so either kind of adapter_config.json finds its tensors
// there.
inline void save_fixture_adapters(const nn::Transformer& base, const std::string& dir) {
  at::manual_seed(0);
  lora::LoraConfig lc;
  lc.rank = 4;
  lc.alpha = 8;
  lc.target_modules = {"q_proj", "v_proj", "mlp.down_proj"};
  auto lora_adapter = lora::make_lora(base, lc, /*seed=*/1);
  lora::save_adapter(*lora_adapter, dir + "/lora");
  lora::MosConfig mc;
  mc.rank = 4;
  mc.target_modules = {"all-linear"};
  mc.seed = 3;
  auto mos_adapter = lora::make_mos(base, mc);
  lora::save_adapter(*mos_adapter, dir + "/mos");

  nn::NamedTensors all;
  for (const char* kind : {"lora", "mos"}) {
    const auto file = nn::SafetensorsFile::open(dir + "/" + kind + "/adapter_model.safetensors");
    for (const auto& info : file.tensors())
      all.emplace_back(info.name, file.get(info.name).clone());
  }
  std::filesystem::create_directories(dir + "/both");
  nn::save_safetensors(dir + "/both/adapter_model.safetensors", all, {{"format", "pt"}});
}

}  // namespace tessera::fuzz
