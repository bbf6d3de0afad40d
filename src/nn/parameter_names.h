// Hugging Face parameter names of the decoder family (private to nn).
#pragma once

#include <cstdint>
#include <string>

#include "tessera/formats/model_config.h"

namespace tessera::nn::detail {

inline std::string layer_prefix(int64_t l) { return "model.layers." + std::to_string(l) + "."; }

// Hugging Face names of one MoE layer's pieces.
struct MoeNames {
  std::string router, expert_gate, expert_up, expert_down;  // expert_* contain "{j}"
  std::string shared_gate_proj, shared_up_proj, shared_down_proj, shared_gate;
};

inline MoeNames moe_names(const ModelConfig& c, int64_t l) {
  const std::string p = layer_prefix(l);
  MoeNames n;
  if (c.model_type == "qwen2_moe") {
    n.router = p + "mlp.gate.weight";
    n.expert_gate = p + "mlp.experts.{j}.gate_proj.weight";
    n.expert_up = p + "mlp.experts.{j}.up_proj.weight";
    n.expert_down = p + "mlp.experts.{j}.down_proj.weight";
    n.shared_gate_proj = p + "mlp.shared_expert.gate_proj.weight";
    n.shared_up_proj = p + "mlp.shared_expert.up_proj.weight";
    n.shared_down_proj = p + "mlp.shared_expert.down_proj.weight";
    n.shared_gate = p + "mlp.shared_expert_gate.weight";
  } else {
    n.router = p + "block_sparse_moe.gate.weight";
    n.expert_gate = p + "block_sparse_moe.experts.{j}.w1.weight";
    n.expert_up = p + "block_sparse_moe.experts.{j}.w3.weight";
    n.expert_down = p + "block_sparse_moe.experts.{j}.w2.weight";
  }
  return n;
}

inline std::string with_expert(std::string pattern, int64_t j) {
  pattern.replace(pattern.find("{j}"), 3, std::to_string(j));
  return pattern;
}

}  // namespace tessera::nn::detail
