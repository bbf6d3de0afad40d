// tessera/nn/parameters.h — the parameters of a model config and how they
// are laid out under tensor and expert parallelism.
//
// The one statement of Tessera's Megatron-style split rules: q/k/v, gate/up
// (w1/w3) and the vocabulary dimension of the embedding and LM head split
// by rows (column-parallel), o/down (w2) by columns (row-parallel), norms,
// routers and shared-expert gates replicated; expert weights live only on
// the ep rank that owns them (num_experts / ep experts per rank). The
// Transformer, model loading, checkpoints (ckpt_nn) and offline resharding
// all take layouts from here.
//
//   for (const auto& spec : tessera::nn::parameter_specs(config)) {
//     dist::Layout l = tessera::nn::parameter_layout(spec, config.num_experts, /*tp=*/2, /*ep=*/1);
//   }
//
// Pure functions; thread-safe.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "tessera/dist/layout.h"
#include "tessera/formats/model_config.h"

namespace tessera::nn {

// How a parameter is split over the tp ranks of a replica.
enum class Split { kReplicate, kRows, kCols };
const char* split_name(Split split);         // "replicate", "rows", "cols"
Split parse_split(const std::string& name);  // InvalidArgument naming the text

// One parameter of the full model.
struct ParameterSpec {
  std::string name;            // Hugging Face name, "model.layers.0.self_attn.q_proj.weight"
  std::vector<int64_t> shape;  // full (unsharded) shape
  Split split = Split::kReplicate;
  int64_t expert = -1;  // owning expert for routed-expert weights, else -1
};

// Every parameter of `config`'s full model, in the model's order.
std::vector<ParameterSpec> parameter_specs(const ModelConfig& config);
// The spec of one parameter; InvalidArgument naming it when the model has none.
ParameterSpec parameter_spec(const ModelConfig& config, const std::string& name);

// The parameter's layout over one replica of tp x ep ranks (replica rank =
// ep_rank * tp + tp_rank). InvalidArgument when num_experts does not split
// over ep, or the split dimension over tp.
dist::Layout parameter_layout(const ParameterSpec& spec, int64_t num_experts, int tp, int ep);

}  // namespace tessera::nn
