// tessera/formats/model_config.h — model configuration read from a Hugging Face config.json.
//
// One struct describes the decoder-only family Tessera runs: Llama
// (RMSNorm, RoPE, grouped-query attention, SwiGLU), Qwen2 (attention bias)
// and sparse Mixture-of-Experts layers in the Mixtral and Qwen2-MoE styles.
// Loading is strict: an unknown model_type, an unknown field, or a known
// field with a value Tessera does not implement (rope_scaling type "yarn",
// hidden_act "gelu", sliding-window attention switched on, ...) is an
// InvalidArgument naming the file and the field, never a silent default.
// Fields that only describe how a checkpoint was produced
// (transformers_version, torch_dtype, ...) are accepted and ignored.
//
//   auto cfg = tessera::nn::ModelConfig::load("models/llama/config.json");
//   std::cout << cfg.summary() << "\n";
//
// Thread safety: ModelConfig is a plain value; load() and parse() are
// thread-safe.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace tessera {
class ConfigObject;
}

namespace tessera::nn {

enum class RopeScaling { kNone, kLinear, kLlama3 };

struct ModelConfig {
  std::string model_type = "llama";  // "llama", "qwen2", "mixtral", "qwen2_moe"
  int64_t vocab_size = 32000;
  int64_t hidden_size = 4096;
  int64_t intermediate_size = 11008;
  int64_t num_hidden_layers = 32;
  int64_t num_attention_heads = 32;
  int64_t num_key_value_heads = 32;
  int64_t head_dim = 0;  // 0: hidden_size / num_attention_heads
  int64_t max_position_embeddings = 4096;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling = RopeScaling::kNone;
  double rope_factor = 1.0;                   // linear and llama3
  double rope_low_freq_factor = 1.0;          // llama3
  double rope_high_freq_factor = 4.0;         // llama3
  int64_t rope_original_max_position = 8192;  // llama3
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // q/k/v biases (Qwen2: true)
  int64_t bos_token_id = -1;
  std::vector<int64_t> eos_token_ids;

  // Mixture of Experts (num_experts == 0: dense).
  int64_t num_experts = 0;
  int64_t num_experts_per_tok = 2;
  int64_t moe_intermediate_size = 0;            // 0: intermediate_size
  int64_t shared_expert_intermediate_size = 0;  // Qwen2-MoE shared expert; 0: none
  bool norm_topk_prob = true;                   // renormalise the top-k weights
  double router_aux_loss_coef = 0.01;           // Switch-style load balancing
  double router_z_loss_coef = 0.0;              // ST-MoE router z-loss
  double capacity_factor = 0.0;                 // 0: no token dropping
  int64_t decoder_sparse_step = 1;              // every k-th layer is MoE
  std::vector<int64_t> mlp_only_layers;         // layers kept dense

  int64_t head_size() const { return head_dim > 0 ? head_dim : hidden_size / num_attention_heads; }
  bool is_moe_layer(int64_t layer) const;
  int64_t expert_intermediate() const {
    return moe_intermediate_size > 0 ? moe_intermediate_size : intermediate_size;
  }
  // Parameters of the whole model (all experts counted).
  int64_t num_parameters() const;
  // Parameters one token passes through (top-k experts only).
  int64_t num_active_parameters() const;
  std::string summary() const;

  // Throws InvalidArgument naming the field on an inconsistent config.
  void validate() const;

  static ModelConfig load(const std::string& config_json_path);
  static ModelConfig parse(const std::string& json_text, const std::string& source = "<inline>");
  static ModelConfig from_config(const ConfigObject& cfg);
  // config.json text in Hugging Face's field names; parse(to_json()) == *this.
  std::string to_json() const;
};

}  // namespace tessera::nn
