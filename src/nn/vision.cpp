#include "tessera/nn/vision.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/grad_mode.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "hf_config_keys.h"
#include "tessera/core/config.h"
#include "tessera/core/error.h"
#include "tessera/core/tensor.h"

namespace tessera::nn {
namespace {

bool is_siglip_type(const std::string& t) {
  return t == "siglip_vision_model" || t == "idefics3_vision" || t == "smolvlm_vision" ||
         t == "idefics3" || t == "smolvlm";
}

struct LayerParams {
  at::Tensor ln1_w, ln1_b, q_w, q_b, k_w, k_b, v_w, v_b, o_w, o_b, ln2_w, ln2_b, fc1_w, fc1_b,
      fc2_w, fc2_b;
};

at::Tensor activation(const at::Tensor& x, const std::string& act) {
  if (act == "gelu_pytorch_tanh") return at::gelu(x, "tanh");
  if (act == "gelu") return at::gelu(x);
  return x * at::sigmoid(1.702 * x);  // quick_gelu
}

}  // namespace

int64_t VisionConfig::num_parameters() const {
  const int64_t d = hidden_size, p = patch_size;
  // Patch conv, then its bias (SigLIP) or the class embedding (CLIP): d
  // either way; position embeddings; post_layernorm; CLIP's pre_layrnorm.
  int64_t n = d * num_channels * p * p + d + num_positions() * d + 2 * d;
  if (is_clip()) n += 2 * d;
  n += num_hidden_layers *
       (4 * (d * d + d) + 2 * d * intermediate_size + intermediate_size + d + 4 * d);
  return n;
}

void VisionConfig::validate() const {
  TESSERA_CHECK(
      is_siglip_type(model_type) || is_clip(), InvalidArgument,
      "vision config: unsupported model_type '", model_type,
      "' (supported: siglip_vision_model, idefics3_vision, smolvlm_vision, clip_vision_model)");
  auto positive = [](int64_t v, const char* name) {
    TESSERA_CHECK(v > 0, InvalidArgument, "vision config: ", name, " must be positive, got ", v);
  };
  positive(hidden_size, "hidden_size");
  positive(intermediate_size, "intermediate_size");
  positive(num_hidden_layers, "num_hidden_layers");
  positive(num_attention_heads, "num_attention_heads");
  positive(num_channels, "num_channels");
  positive(image_size, "image_size");
  positive(patch_size, "patch_size");
  TESSERA_CHECK(image_size % patch_size == 0, InvalidArgument, "vision config: image_size ",
                image_size, " is not a multiple of patch_size ", patch_size);
  TESSERA_CHECK(hidden_size % num_attention_heads == 0, InvalidArgument,
                "vision config: hidden_size ", hidden_size, " is not divisible by ",
                num_attention_heads, " attention heads");
  TESSERA_CHECK(
      hidden_act == "gelu_pytorch_tanh" || hidden_act == "gelu" || hidden_act == "quick_gelu",
      InvalidArgument, "vision config: hidden_act '", hidden_act,
      "' is not supported (gelu_pytorch_tanh, gelu, quick_gelu)");
  TESSERA_CHECK(layer_norm_eps > 0, InvalidArgument,
                "vision config: layer_norm_eps must be positive");
}

VisionConfig VisionConfig::from_config(const ConfigObject& cfg,
                                       const std::string& default_model_type) {
  VisionConfig c;
  c.model_type = cfg.get_string("model_type", default_model_type);
  const bool clip = c.model_type == "clip_vision_model";
  const bool idefics = c.model_type == "idefics3_vision" || c.model_type == "smolvlm_vision" ||
                       c.model_type == "idefics3" || c.model_type == "smolvlm";
  TESSERA_CHECK(
      clip || is_siglip_type(c.model_type), InvalidArgument, cfg.where(),
      ": unsupported vision model_type '", c.model_type,
      "' (supported: siglip_vision_model, idefics3_vision, smolvlm_vision, clip_vision_model)");
  // The defaults of transformers' config classes.
  c.hidden_size = cfg.get_int("hidden_size", idefics ? 1152 : 768);
  c.intermediate_size = cfg.get_int("intermediate_size", 3072);
  c.num_hidden_layers = cfg.get_int("num_hidden_layers", 12);
  c.num_attention_heads = cfg.get_int("num_attention_heads", idefics ? 16 : 12);
  c.num_channels = cfg.get_int("num_channels", 3);
  c.image_size = cfg.get_int("image_size", 224);
  c.patch_size = cfg.get_int("patch_size", clip || idefics ? 32 : 16);
  c.layer_norm_eps = cfg.get_double("layer_norm_eps", clip ? 1e-5 : 1e-6);
  c.hidden_act = cfg.get_string("hidden_act", clip ? "quick_gelu" : "gelu_pytorch_tanh");
  for (const char* key : detail::kGenericConfigKeys) cfg.ignore(key);
  // Only other heads or the processor use these.
  for (const char* key : {"projection_dim", "vocab_size", "tie_word_embeddings", "use_base_siglip",
                          "max_image_size", "size", "vision_use_head", "num_image_tokens"}) {
    cfg.ignore(key);
  }
  cfg.check_no_unknown_keys();
  if (c.model_type == "idefics3" || c.model_type == "smolvlm") c.model_type += "_vision";
  c.validate();
  return c;
}

std::string VisionConfig::to_json() const {
  nlohmann::ordered_json j;
  j["model_type"] = model_type;
  j["hidden_size"] = hidden_size;
  j["intermediate_size"] = intermediate_size;
  j["num_hidden_layers"] = num_hidden_layers;
  j["num_attention_heads"] = num_attention_heads;
  j["num_channels"] = num_channels;
  j["image_size"] = image_size;
  j["patch_size"] = patch_size;
  j["layer_norm_eps"] = layer_norm_eps;
  j["hidden_act"] = hidden_act;
  return j.dump(2);
}

struct VisionEncoder::Impl {
  VisionConfig config;
  std::string prefix;
  std::vector<std::pair<std::string, at::Tensor>> params;
  std::vector<bool> is_matrix;  // normal-initialised (vs norm weight = 1, bias = 0)
  at::Tensor patch_w, patch_b, class_emb, pos_emb, pre_w, pre_b, post_w, post_b;
  std::vector<LayerParams> layers;

  at::Tensor add(const std::string& name, std::vector<int64_t> shape, bool matrix) {
    at::Tensor t = at::zeros(shape, at::kFloat);
    params.emplace_back(prefix + name, t);
    is_matrix.push_back(matrix);
    return t;
  }

  void build() {
    const VisionConfig& c = config;
    const int64_t d = c.hidden_size, i = c.intermediate_size;
    patch_w = add("embeddings.patch_embedding.weight",
                  {d, c.num_channels, c.patch_size, c.patch_size}, true);
    if (c.is_clip()) {
      class_emb = add("embeddings.class_embedding", {d}, true);
    } else {
      patch_b = add("embeddings.patch_embedding.bias", {d}, false);
    }
    pos_emb = add("embeddings.position_embedding.weight", {c.num_positions(), d}, true);
    if (c.is_clip()) {
      pre_w = add("pre_layrnorm.weight", {d}, false);
      pre_b = add("pre_layrnorm.bias", {d}, false);
    }
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
      const std::string p = "encoder.layers." + std::to_string(l) + ".";
      LayerParams w;
      w.ln1_w = add(p + "layer_norm1.weight", {d}, false);
      w.ln1_b = add(p + "layer_norm1.bias", {d}, false);
      w.q_w = add(p + "self_attn.q_proj.weight", {d, d}, true);
      w.q_b = add(p + "self_attn.q_proj.bias", {d}, false);
      w.k_w = add(p + "self_attn.k_proj.weight", {d, d}, true);
      w.k_b = add(p + "self_attn.k_proj.bias", {d}, false);
      w.v_w = add(p + "self_attn.v_proj.weight", {d, d}, true);
      w.v_b = add(p + "self_attn.v_proj.bias", {d}, false);
      w.o_w = add(p + "self_attn.out_proj.weight", {d, d}, true);
      w.o_b = add(p + "self_attn.out_proj.bias", {d}, false);
      w.ln2_w = add(p + "layer_norm2.weight", {d}, false);
      w.ln2_b = add(p + "layer_norm2.bias", {d}, false);
      w.fc1_w = add(p + "mlp.fc1.weight", {i, d}, true);
      w.fc1_b = add(p + "mlp.fc1.bias", {i}, false);
      w.fc2_w = add(p + "mlp.fc2.weight", {d, i}, true);
      w.fc2_b = add(p + "mlp.fc2.bias", {d}, false);
      layers.push_back(w);
    }
    post_w = add("post_layernorm.weight", {d}, false);
    post_b = add("post_layernorm.bias", {d}, false);
    // Norm weights start at one, so that an uninitialised encoder is not a
    // degenerate zero function.
    for (size_t k = 0; k < params.size(); ++k) {
      const std::string& n = params[k].first;
      if (n.size() > 7 && n.compare(n.size() - 7, 7, ".weight") == 0 &&
          params[k].second.dim() == 1) {
        params[k].second.fill_(1.0);
      }
    }
  }

  at::Tensor layer(const LayerParams& w, const at::Tensor& x) const {
    const VisionConfig& c = config;
    const int64_t N = x.size(0), T = x.size(1), H = c.num_attention_heads,
                  hd = c.hidden_size / c.num_attention_heads;
    at::Tensor h = at::layer_norm(x, {c.hidden_size}, w.ln1_w, w.ln1_b, c.layer_norm_eps);
    auto heads = [&](const at::Tensor& t) { return t.view({N, T, H, hd}).transpose(1, 2); };
    at::Tensor q = heads(at::linear(h, w.q_w, w.q_b));
    at::Tensor k = heads(at::linear(h, w.k_w, w.k_b));
    at::Tensor v = heads(at::linear(h, w.v_w, w.v_b));
    at::Tensor att =
        at::softmax(at::matmul(q, k.transpose(-1, -2)) / std::sqrt(static_cast<double>(hd)), -1);
    at::Tensor o = at::matmul(att, v).transpose(1, 2).reshape({N, T, c.hidden_size});
    at::Tensor y = x + at::linear(o, w.o_w, w.o_b);
    h = at::layer_norm(y, {c.hidden_size}, w.ln2_w, w.ln2_b, c.layer_norm_eps);
    return y +
           at::linear(activation(at::linear(h, w.fc1_w, w.fc1_b), c.hidden_act), w.fc2_w, w.fc2_b);
  }
};

VisionEncoder::VisionEncoder(VisionConfig config, std::string prefix)
    : impl_(std::make_unique<Impl>()) {
  config.validate();
  impl_->config = std::move(config);
  impl_->prefix = std::move(prefix);
  impl_->build();
}

VisionEncoder::~VisionEncoder() = default;
VisionEncoder::VisionEncoder(VisionEncoder&&) noexcept = default;
VisionEncoder& VisionEncoder::operator=(VisionEncoder&&) noexcept = default;

const VisionConfig& VisionEncoder::config() const { return impl_->config; }
const std::string& VisionEncoder::prefix() const { return impl_->prefix; }

const std::vector<std::pair<std::string, at::Tensor>>& VisionEncoder::named_parameters() const {
  return impl_->params;
}

std::vector<std::pair<std::string, std::vector<int64_t>>> VisionEncoder::parameter_shapes() const {
  std::vector<std::pair<std::string, std::vector<int64_t>>> out;
  for (const auto& [name, t] : impl_->params) out.emplace_back(name, t.sizes().vec());
  return out;
}

at::Tensor& VisionEncoder::parameter(const std::string& name) {
  for (auto& [n, t] : impl_->params) {
    if (n == name) return t;
  }
  TESSERA_THROW(NotFound, "vision encoder has no parameter '", name, "'");
}

void VisionEncoder::init_random(uint64_t seed) {
  at::NoGradGuard no_grad;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  for (size_t k = 0; k < impl_->params.size(); ++k) {
    at::Tensor& t = impl_->params[k].second;
    if (impl_->is_matrix[k]) {
      t.copy_(at::normal(0.0, 0.02, t.sizes(), gen));
    } else {
      const std::string& n = impl_->params[k].first;
      const bool weight = n.compare(n.size() - 7, 7, ".weight") == 0;
      t.fill_(weight ? 1.0 : 0.0);
    }
  }
}

void VisionEncoder::set_requires_grad(bool requires_grad) {
  for (auto& [n, t] : impl_->params) t.set_requires_grad(requires_grad);
}

at::Tensor VisionEncoder::forward(const at::Tensor& pixel_values, int64_t layers, bool post_norm) {
  return translate_errors(
      "VisionEncoder::forward",
      [&] {
        const Impl& m = *impl_;
        const VisionConfig& c = m.config;
        TESSERA_CHECK(
            pixel_values.dim() == 4 && pixel_values.size(1) == c.num_channels &&
                pixel_values.size(2) == c.image_size && pixel_values.size(3) == c.image_size &&
                at::isFloatingType(pixel_values.scalar_type()),
            InvalidArgument, "vision encoder: pixel_values must be float [N, ", c.num_channels,
            ", ", c.image_size, ", ", c.image_size, "], got ",
            dtype_name(pixel_values.scalar_type()), " ", shape_string(pixel_values.sizes()));
        if (layers < 0) layers = c.num_hidden_layers;
        TESSERA_CHECK(layers <= c.num_hidden_layers, InvalidArgument, "vision encoder: ", layers,
                      " layers requested, the encoder has ", c.num_hidden_layers);
        const int64_t N = pixel_values.size(0);
        at::Tensor x = at::conv2d(pixel_values.to(at::kFloat), m.patch_w,
                                  m.patch_b.defined() ? m.patch_b : at::Tensor(),
                                  {c.patch_size, c.patch_size});  // [N, D, P, P]
        x = x.flatten(2).transpose(1, 2);                         // [N, P*P, D], row-major patches
        if (c.is_clip())
          x = at::cat({m.class_emb.view({1, 1, -1}).expand({N, 1, c.hidden_size}), x}, 1);
        x = x + m.pos_emb.unsqueeze(0);
        if (c.is_clip()) x = at::layer_norm(x, {c.hidden_size}, m.pre_w, m.pre_b, c.layer_norm_eps);
        for (int64_t l = 0; l < layers; ++l) x = m.layer(m.layers[l], x);
        if (post_norm) x = at::layer_norm(x, {c.hidden_size}, m.post_w, m.post_b, c.layer_norm_eps);
        return x;
      },
      ErrorCode::kInvalidArgument);
}

}  // namespace tessera::nn
