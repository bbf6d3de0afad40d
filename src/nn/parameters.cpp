#include "tessera/nn/parameters.h"

#include <regex>

#include "parameter_names.h"
#include "tessera/core/error.h"

namespace tessera::nn {

using detail::layer_prefix;
using detail::moe_names;
using detail::MoeNames;
using detail::with_expert;

const char* split_name(Split split) {
  switch (split) {
    case Split::kRows:
      return "rows";
    case Split::kCols:
      return "cols";
    case Split::kReplicate:
      break;
  }
  return "replicate";
}

Split parse_split(const std::string& name) {
  if (name == "rows") return Split::kRows;
  if (name == "cols") return Split::kCols;
  if (name == "replicate") return Split::kReplicate;
  TESSERA_THROW(InvalidArgument, "unknown split '", name, "' (rows, cols or replicate)");
}

std::vector<ParameterSpec> parameter_specs(const ModelConfig& c) {
  const int64_t H = c.hidden_size, hd = c.head_size();
  const int64_t nq = c.num_attention_heads * hd, nkv = c.num_key_value_heads * hd;
  std::vector<ParameterSpec> specs;
  specs.push_back({"model.embed_tokens.weight", {c.vocab_size, H}, Split::kRows});
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = layer_prefix(l);
    specs.push_back({p + "input_layernorm.weight", {H}, Split::kReplicate});
    specs.push_back({p + "self_attn.q_proj.weight", {nq, H}, Split::kRows});
    specs.push_back({p + "self_attn.k_proj.weight", {nkv, H}, Split::kRows});
    specs.push_back({p + "self_attn.v_proj.weight", {nkv, H}, Split::kRows});
    if (c.attention_bias) {
      specs.push_back({p + "self_attn.q_proj.bias", {nq}, Split::kRows});
      specs.push_back({p + "self_attn.k_proj.bias", {nkv}, Split::kRows});
      specs.push_back({p + "self_attn.v_proj.bias", {nkv}, Split::kRows});
    }
    specs.push_back({p + "self_attn.o_proj.weight", {H, nq}, Split::kCols});
    specs.push_back({p + "post_attention_layernorm.weight", {H}, Split::kReplicate});
    if (c.is_moe_layer(l)) {
      MoeNames n = moe_names(c, l);
      const int64_t I = c.expert_intermediate();
      specs.push_back({n.router, {c.num_experts, H}, Split::kReplicate});
      for (int64_t j = 0; j < c.num_experts; ++j) {
        specs.push_back({with_expert(n.expert_gate, j), {I, H}, Split::kRows, j});
        specs.push_back({with_expert(n.expert_up, j), {I, H}, Split::kRows, j});
        specs.push_back({with_expert(n.expert_down, j), {H, I}, Split::kCols, j});
      }
      if (c.shared_expert_intermediate_size > 0) {
        const int64_t S = c.shared_expert_intermediate_size;
        specs.push_back({n.shared_gate_proj, {S, H}, Split::kRows});
        specs.push_back({n.shared_up_proj, {S, H}, Split::kRows});
        specs.push_back({n.shared_down_proj, {H, S}, Split::kCols});
        specs.push_back({n.shared_gate, {1, H}, Split::kReplicate});
      }
    } else {
      const int64_t I = c.intermediate_size;
      specs.push_back({p + "mlp.gate_proj.weight", {I, H}, Split::kRows});
      specs.push_back({p + "mlp.up_proj.weight", {I, H}, Split::kRows});
      specs.push_back({p + "mlp.down_proj.weight", {H, I}, Split::kCols});
    }
  }
  specs.push_back({"model.norm.weight", {H}, Split::kReplicate});
  if (!c.tie_word_embeddings) specs.push_back({"lm_head.weight", {c.vocab_size, H}, Split::kRows});
  return specs;
}

ParameterSpec parameter_spec(const ModelConfig& config, const std::string& name) {
  for (auto& s : parameter_specs(config)) {
    if (s.name == name) return s;
  }
  TESSERA_THROW(InvalidArgument, "a ", config.model_type, " model has no parameter named '", name,
                "'");
}

dist::Layout parameter_layout(const ParameterSpec& spec, int64_t num_experts, int tp, int ep) {
  TESSERA_CHECK(tp >= 1 && ep >= 1, InvalidArgument, "parameter_layout: tp and ep must be >= 1");
  dist::MeshShape mesh{{ep, tp}, {"ep", "tp"}};
  std::vector<dist::Placement> placements{
      dist::Placement::Replicate(), spec.split == Split::kRows   ? dist::Placement::Shard(0)
                                    : spec.split == Split::kCols ? dist::Placement::Shard(1)
                                                                 : dist::Placement::Replicate()};
  dist::Layout full = dist::Layout::sharded(spec.shape, mesh, placements);
  if (spec.expert < 0) return full;
  TESSERA_CHECK(num_experts % ep == 0, InvalidArgument, num_experts,
                " experts cannot be split over ep=", ep);
  // An expert lives only on the ep rank that owns it.
  const int64_t owner = spec.expert / (num_experts / ep);
  std::vector<std::vector<dist::Chunk>> chunks(ep * tp);
  for (int r = 0; r < ep * tp; ++r) {
    if (r / tp == owner) chunks[r] = full.chunks(r);
  }
  return dist::Layout::from_chunks(spec.shape, chunks, /*flat=*/false);
}

}  // namespace tessera::nn
