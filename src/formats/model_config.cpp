#include "tessera/formats/model_config.h"

#include <algorithm>
#include <nlohmann/json.hpp>
#include <sstream>

#include "tessera/core/config.h"
#include "tessera/core/error.h"

namespace tessera::nn {
namespace {

// Fields that record how a checkpoint was made or how Hugging Face should
// run it; they do not change the model's function.
const char* const kIgnoredFields[] = {
    "architectures",
    "transformers_version",
    "torch_dtype",
    "use_cache",
    "initializer_range",
    "pad_token_id",
    "_name_or_path",
    "auto_map",
    "output_router_logits",
    "model_input_names",
    "tokenizer_class",
    "quantization_config",
    "attention_dropout",
    "hidden_dropout",
    "is_llama_config",
    "rope_interleaved",
    "use_bfloat16",
    "id2label",
    "label2id",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "dtype",
};

bool contains(const std::vector<int64_t>& v, int64_t x) {
  return std::find(v.begin(), v.end(), x) != v.end();
}

}  // namespace

bool ModelConfig::is_moe_layer(int64_t layer) const {
  if (num_experts == 0 || contains(mlp_only_layers, layer)) return false;
  return (layer + 1) % decoder_sparse_step == 0;
}

namespace {

// The parameter count in T: int64_t for the answer, double to check first
// that the answer fits (a config may name any sizes).
template <typename T>
T count_parameters(const ModelConfig& c) {
  const T h = T(c.hidden_size), hd = T(c.head_size());
  const T heads = T(c.num_attention_heads), kv = T(c.num_key_value_heads);
  T attn = h * hd * (heads + 2 * kv) + hd * heads * h;
  if (c.attention_bias) attn += hd * (heads + 2 * kv);
  T total = T(c.vocab_size) * h * T(c.tie_word_embeddings ? 1 : 2) + h;
  T moe_layers = 0;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) moe_layers += c.is_moe_layer(l) ? 1 : 0;
  const T dense_layers = T(c.num_hidden_layers) - moe_layers;
  const T moe =
      T(c.num_experts) * 3 * h * T(c.expert_intermediate()) + T(c.num_experts) * h +
      (c.shared_expert_intermediate_size > 0 ? 3 * h * T(c.shared_expert_intermediate_size) + h
                                             : T(0));
  total += T(c.num_hidden_layers) * (attn + 2 * h) + moe_layers * moe +
           dense_layers * 3 * h * T(c.intermediate_size);
  return total;
}

}  // namespace

int64_t ModelConfig::num_parameters() const { return count_parameters<int64_t>(*this); }

int64_t ModelConfig::num_active_parameters() const {
  if (num_experts == 0) return num_parameters();
  ModelConfig dense = *this;
  int64_t inactive = 0;
  for (int64_t l = 0; l < num_hidden_layers; ++l) {
    if (is_moe_layer(l))
      inactive += (num_experts - num_experts_per_tok) * 3 * hidden_size * expert_intermediate();
  }
  return num_parameters() - inactive;
}

std::string ModelConfig::summary() const {
  std::ostringstream out;
  out << model_type << ": " << num_hidden_layers << " layers, hidden " << hidden_size << ", "
      << num_attention_heads << " heads (" << num_key_value_heads << " kv, dim " << head_size()
      << "), vocab " << vocab_size;
  if (num_experts > 0) {
    out << ", " << num_experts << " experts top-" << num_experts_per_tok;
  } else {
    out << ", mlp " << intermediate_size;
  }
  out << ", " << num_parameters() / 1e6 << "M parameters";
  if (num_experts > 0) out << " (" << num_active_parameters() / 1e6 << "M active)";
  return out.str();
}

void ModelConfig::validate() const {
  auto positive = [&](int64_t v, const char* name) {
    TESSERA_CHECK(v > 0, InvalidArgument, "model config: ", name, " must be positive, got ", v);
  };
  positive(vocab_size, "vocab_size");
  positive(hidden_size, "hidden_size");
  positive(num_hidden_layers, "num_hidden_layers");
  positive(num_attention_heads, "num_attention_heads");
  positive(num_key_value_heads, "num_key_value_heads");
  TESSERA_CHECK(num_attention_heads % num_key_value_heads == 0, InvalidArgument,
                "model config: num_attention_heads (", num_attention_heads,
                ") must be a multiple of num_key_value_heads (", num_key_value_heads, ")");
  TESSERA_CHECK(head_dim > 0 || hidden_size % num_attention_heads == 0, InvalidArgument,
                "model config: hidden_size ", hidden_size, " is not divisible by ",
                num_attention_heads, " heads and head_dim is not given");
  TESSERA_CHECK(head_size() % 2 == 0, InvalidArgument, "model config: head dimension ", head_size(),
                " must be even for rotary embeddings");
  if (num_experts > 0) {
    TESSERA_CHECK(num_experts_per_tok >= 1 && num_experts_per_tok <= num_experts, InvalidArgument,
                  "model config: num_experts_per_tok ", num_experts_per_tok,
                  " must lie in [1, num_experts=", num_experts, "]");
    positive(decoder_sparse_step, "decoder_sparse_step");
    positive(expert_intermediate(), "moe_intermediate_size");
  } else {
    positive(intermediate_size, "intermediate_size");
  }
  TESSERA_CHECK(capacity_factor >= 0, InvalidArgument,
                "model config: capacity_factor must be >= 0");
  // Sizes whose parameter count does not fit 64 bits describe no model
  // (and would overflow num_parameters()); the layer count bounds the loops
  // over layers.
  TESSERA_CHECK(num_hidden_layers <= (int64_t{1} << 20), InvalidArgument,
                "model config: num_hidden_layers ", num_hidden_layers,
                " is more than the 1048576 supported");
  const double params = count_parameters<double>(*this);
  TESSERA_CHECK(params < 1e18, InvalidArgument, "model config: the sizes give ", params,
                " parameters (vocab_size ", vocab_size, ", hidden_size ", hidden_size,
                ", num_hidden_layers ", num_hidden_layers, ", num_experts ", num_experts,
                "); at most 1e18 are supported");
}

ModelConfig ModelConfig::from_config(const ConfigObject& cfg) {
  ModelConfig c;
  const std::string where = cfg.where();
  c.model_type = cfg.get_string("model_type");
  const bool llama = c.model_type == "llama", qwen2 = c.model_type == "qwen2",
             mixtral = c.model_type == "mixtral", qwen2_moe = c.model_type == "qwen2_moe";
  TESSERA_CHECK(llama || qwen2 || mixtral || qwen2_moe, InvalidArgument, where,
                ": unsupported model_type '", c.model_type,
                "' (supported: llama, qwen2, mixtral, qwen2_moe)");
  for (const char* f : kIgnoredFields) cfg.ignore(f);

  c.vocab_size = cfg.get_int("vocab_size");
  c.hidden_size = cfg.get_int("hidden_size");
  c.intermediate_size = cfg.get_int("intermediate_size", c.intermediate_size);
  c.num_hidden_layers = cfg.get_int("num_hidden_layers");
  c.num_attention_heads = cfg.get_int("num_attention_heads");
  c.num_key_value_heads = cfg.get_int("num_key_value_heads", c.num_attention_heads);
  c.head_dim = cfg.has("head_dim") && !cfg.is_null("head_dim") ? cfg.get_int("head_dim") : 0;
  cfg.ignore("head_dim");
  c.max_position_embeddings = cfg.get_int("max_position_embeddings", c.max_position_embeddings);
  c.rms_norm_eps = cfg.get_double("rms_norm_eps", c.rms_norm_eps);
  c.rope_theta = cfg.get_double("rope_theta", c.rope_theta);
  c.tie_word_embeddings = cfg.get_bool("tie_word_embeddings", false);
  c.attention_bias = cfg.get_bool("attention_bias", qwen2 || qwen2_moe);
  if (qwen2 || qwen2_moe) c.attention_bias = true;  // Qwen2 always has q/k/v biases
  c.bos_token_id = cfg.get_int("bos_token_id", -1);
  if (cfg.has("eos_token_id")) {
    auto j = nlohmann::json::parse(cfg.get_raw("eos_token_id"));
    if (j.is_array()) {
      c.eos_token_ids = cfg.get_int_list("eos_token_id");
    } else if (j.is_number_integer()) {
      c.eos_token_ids = {cfg.get_int("eos_token_id")};
    }
  }

  const std::string act = cfg.get_string("hidden_act", "silu");
  TESSERA_CHECK(act == "silu" || act == "swish", InvalidArgument, where, ": hidden_act '", act,
                "' is not supported (Tessera implements SwiGLU with silu)");
  TESSERA_CHECK(!cfg.get_bool("mlp_bias", false), InvalidArgument, where,
                ": mlp_bias=true is not supported");
  TESSERA_CHECK(cfg.get_int("pretraining_tp", 1) == 1, InvalidArgument, where,
                ": pretraining_tp other than 1 is not supported");
  if (cfg.has("use_sliding_window") || cfg.has("sliding_window") || cfg.has("max_window_layers")) {
    bool on = cfg.get_bool("use_sliding_window", !qwen2 && !qwen2_moe && cfg.has("sliding_window"));
    cfg.ignore("max_window_layers");
    if (cfg.has("sliding_window")) cfg.ignore("sliding_window");
    TESSERA_CHECK(!on || cfg.is_null("sliding_window"), InvalidArgument, where,
                  ": sliding-window attention is not supported");
  }
  cfg.ignore("rope_scaling");  // null is the same as absent
  if (cfg.has("rope_scaling") && !cfg.is_null("rope_scaling")) {
    auto rs = cfg.get_object("rope_scaling");
    std::string type = rs.has("rope_type") ? rs.get_string("rope_type") : rs.get_string("type");
    if (rs.has("type")) rs.ignore("type");
    if (type == "linear") {
      c.rope_scaling = RopeScaling::kLinear;
      c.rope_factor = rs.get_double("factor");
    } else if (type == "llama3") {
      c.rope_scaling = RopeScaling::kLlama3;
      c.rope_factor = rs.get_double("factor");
      c.rope_low_freq_factor = rs.get_double("low_freq_factor", 1.0);
      c.rope_high_freq_factor = rs.get_double("high_freq_factor", 4.0);
      c.rope_original_max_position = rs.get_int("original_max_position_embeddings", 8192);
    } else if (type != "default") {
      TESSERA_THROW(InvalidArgument, where, ": rope_scaling type '", type,
                    "' is not supported (supported: linear, llama3)");
    }
  }

  if (mixtral) {
    c.num_experts = cfg.get_int("num_local_experts");
    c.num_experts_per_tok = cfg.get_int("num_experts_per_tok", 2);
    c.norm_topk_prob = true;
    cfg.ignore("router_jitter_noise");
  } else if (qwen2_moe) {
    c.num_experts = cfg.get_int("num_experts");
    c.num_experts_per_tok = cfg.get_int("num_experts_per_tok", 4);
    c.moe_intermediate_size = cfg.get_int("moe_intermediate_size");
    c.shared_expert_intermediate_size = cfg.get_int("shared_expert_intermediate_size", 0);
    c.norm_topk_prob = cfg.get_bool("norm_topk_prob", false);
    c.decoder_sparse_step = cfg.get_int("decoder_sparse_step", 1);
    if (cfg.has("mlp_only_layers")) c.mlp_only_layers = cfg.get_int_list("mlp_only_layers");
  }
  if (c.num_experts > 0) {
    c.router_aux_loss_coef = cfg.get_double("router_aux_loss_coef", c.router_aux_loss_coef);
    // Tessera extensions (not read by Hugging Face).
    c.router_z_loss_coef = cfg.get_double("router_z_loss_coef", 0.0);
    c.capacity_factor = cfg.get_double("capacity_factor", 0.0);
  }
  cfg.check_no_unknown_keys();
  c.validate();
  return c;
}

ModelConfig ModelConfig::parse(const std::string& json_text, const std::string& source) {
  return from_config(ConfigObject::parse(json_text, source));
}

ModelConfig ModelConfig::load(const std::string& path) {
  return from_config(ConfigObject::load_file(path));
}

std::string ModelConfig::to_json() const {
  nlohmann::ordered_json j;
  j["model_type"] = model_type;
  j["vocab_size"] = vocab_size;
  j["hidden_size"] = hidden_size;
  j["intermediate_size"] = intermediate_size;
  j["num_hidden_layers"] = num_hidden_layers;
  j["num_attention_heads"] = num_attention_heads;
  j["num_key_value_heads"] = num_key_value_heads;
  if (head_dim > 0) j["head_dim"] = head_dim;
  j["max_position_embeddings"] = max_position_embeddings;
  j["rms_norm_eps"] = rms_norm_eps;
  j["rope_theta"] = rope_theta;
  j["hidden_act"] = "silu";
  j["tie_word_embeddings"] = tie_word_embeddings;
  if (model_type == "llama" || model_type == "mixtral") j["attention_bias"] = attention_bias;
  if (bos_token_id >= 0) j["bos_token_id"] = bos_token_id;
  if (eos_token_ids.size() == 1) j["eos_token_id"] = eos_token_ids[0];
  if (eos_token_ids.size() > 1) j["eos_token_id"] = eos_token_ids;
  if (rope_scaling == RopeScaling::kLinear) {
    j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", rope_factor}};
  } else if (rope_scaling == RopeScaling::kLlama3) {
    j["rope_scaling"] = {{"rope_type", "llama3"},
                         {"factor", rope_factor},
                         {"low_freq_factor", rope_low_freq_factor},
                         {"high_freq_factor", rope_high_freq_factor},
                         {"original_max_position_embeddings", rope_original_max_position}};
  }
  if (model_type == "mixtral") {
    j["num_local_experts"] = num_experts;
    j["num_experts_per_tok"] = num_experts_per_tok;
  } else if (model_type == "qwen2_moe") {
    j["num_experts"] = num_experts;
    j["num_experts_per_tok"] = num_experts_per_tok;
    j["moe_intermediate_size"] = expert_intermediate();
    j["shared_expert_intermediate_size"] = shared_expert_intermediate_size;
    j["norm_topk_prob"] = norm_topk_prob;
    j["decoder_sparse_step"] = decoder_sparse_step;
    j["mlp_only_layers"] = mlp_only_layers;
  }
  if (num_experts > 0) {
    j["router_aux_loss_coef"] = router_aux_loss_coef;
    j["router_z_loss_coef"] = router_z_loss_coef;
    j["capacity_factor"] = capacity_factor;
  }
  j["architectures"] = {model_type == "llama"     ? "LlamaForCausalLM"
                        : model_type == "qwen2"   ? "Qwen2ForCausalLM"
                        : model_type == "mixtral" ? "MixtralForCausalLM"
                                                  : "Qwen2MoeForCausalLM"};
  return j.dump(2);
}

}  // namespace tessera::nn
