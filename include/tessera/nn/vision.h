// tessera/nn/vision.h — the ViT image encoders of vision-language models:
// SigLIP (SmolVLM / Idefics3) and CLIP (LLaVA-1.5).
//
// Both are pre-norm transformers over image patches: a strided convolution
// cuts the image into patch_size x patch_size patches and projects each to
// hidden_size, learned position embeddings are added, then every layer runs
// x += attn(layer_norm1(x)); x += fc2(act(fc1(layer_norm2(x)))) with full
// (bidirectional) multi-head attention. They differ where Hugging Face's
// SiglipVisionModel / Idefics3VisionTransformer and CLIPVisionModel differ:
//
//                    SigLIP / Idefics3            CLIP
//   patch conv bias  yes                          no
//   class token      none                         class_embedding, first
//   before layers    nothing                      pre_layrnorm
//   activation       gelu_pytorch_tanh            quick_gelu
//   output           post_layernorm(last layer)   hidden state of any layer
//
// Parameters carry Hugging Face names under a prefix ("model.vision_model."
// for Idefics3 / SmolVLM, "vision_tower.vision_model." for LLaVA), so the
// tensors of a checkpoint folder map onto them by name.
//
//   tessera::nn::VisionEncoder enc(cfg, "model.vision_model.");
//   enc.init_random(0);
//   at::Tensor h = enc.forward(pixel_values);   // [N, patches, hidden]
//
// Forward is differentiable. Not thread-safe: one forward at a time.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace tessera {
class ConfigObject;
}

namespace tessera::nn {

struct VisionConfig {
  // "siglip_vision_model", "idefics3_vision", "smolvlm_vision" (SigLIP
  // family) or "clip_vision_model" (CLIP family).
  std::string model_type = "siglip_vision_model";
  int64_t hidden_size = 768;
  int64_t intermediate_size = 3072;
  int64_t num_hidden_layers = 12;
  int64_t num_attention_heads = 12;
  int64_t num_channels = 3;
  int64_t image_size = 224;  // pixels per side the encoder takes
  int64_t patch_size = 16;
  double layer_norm_eps = 1e-6;
  // "gelu_pytorch_tanh", "gelu" (erf) or "quick_gelu" (x * sigmoid(1.702 x)).
  std::string hidden_act = "gelu_pytorch_tanh";

  bool is_clip() const { return model_type == "clip_vision_model"; }
  int64_t patches_per_side() const { return image_size / patch_size; }
  int64_t num_patches() const { return patches_per_side() * patches_per_side(); }
  // Position embeddings: one per patch, plus the class token's for CLIP.
  int64_t num_positions() const { return num_patches() + (is_clip() ? 1 : 0); }
  int64_t num_parameters() const;

  // InvalidArgument naming the field for an inconsistent config (image_size
  // not a multiple of patch_size, heads not dividing hidden_size, an
  // unknown model_type or hidden_act, non-positive sizes).
  void validate() const;

  // Reads a vision_config object; missing fields take the Hugging Face
  // defaults of `default_model_type`'s config class (SiglipVisionConfig,
  // Idefics3VisionConfig, CLIPVisionConfig). Strict: unknown keys are
  // InvalidArgument naming them. Fields that only matter for training or
  // other heads (dropout, initializer_range, projection_dim, ...) are
  // accepted and ignored.
  static VisionConfig from_config(const ConfigObject& cfg, const std::string& default_model_type);
  // The vision_config object as JSON text (Hugging Face field names).
  std::string to_json() const;
};

class VisionEncoder {
 public:
  // Zero-initialised parameters named under `prefix`. InvalidArgument for
  // an invalid config.
  VisionEncoder(VisionConfig config, std::string prefix);
  ~VisionEncoder();
  VisionEncoder(VisionEncoder&&) noexcept;
  VisionEncoder& operator=(VisionEncoder&&) noexcept;

  const VisionConfig& config() const;
  const std::string& prefix() const;
  // Parameters by full Hugging Face name, in a stable order.
  const std::vector<std::pair<std::string, at::Tensor>>& named_parameters() const;
  // Full shape of every parameter, by name (for loaders' checks).
  std::vector<std::pair<std::string, std::vector<int64_t>>> parameter_shapes() const;
  at::Tensor& parameter(const std::string& name);  // NotFound naming it

  // Normal(0, 0.02) matrices, unit norm weights, zero biases; seeded.
  void init_random(uint64_t seed);
  void set_requires_grad(bool requires_grad);

  // Hidden states of an image batch. pixel_values: [N, num_channels,
  // image_size, image_size] float. `layers`: run the first `layers` encoder
  // layers (-1: all). With post_norm (SigLIP's last_hidden_state) the
  // result goes through post_layernorm. Returns [N, num_positions, hidden]
  // (CLIP's class token first). InvalidArgument for other shapes or a
  // layer count outside [0, num_hidden_layers].
  at::Tensor forward(const at::Tensor& pixel_values, int64_t layers = -1, bool post_norm = true);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace tessera::nn
