// tessera/nn/vlm.h — vision-language models: an image encoder, a connector
// and a decoder-only language model, in the two layouts Hugging Face
// publishes most small models in.
//
//   layout     checkpoint names (config.json model_type)      connector
//   kIdefics3  model.vision_model.*, model.connector.*,       pixel shuffle by scale_factor,
//              model.text_model.*, lm_head.weight              then one linear (no bias)
//              (idefics3, smolvlm: SmolVLM-256M/500M/2B)
//   kLlava     vision_tower.vision_model.*,                    linear_1, GELU, linear_2
//              multi_modal_projector.*, language_model.*       (LLaVA-1.5)
//              (llava; transformers >= 4.52's model.vision_tower.* /
//              model.multi_modal_projector.* / model.language_model.* /
//              lm_head.weight spelling loads too)
//
// An image becomes a fixed number of "image tokens" (image_seq_len()): the
// encoder's patch features (SigLIP's post-normed last layer for Idefics3;
// the hidden state of vision_feature_layer without the class token for
// LLaVA) pass the connector and replace, in order, the embeddings of the
// image_token_id placeholders in the prompt. The language model then runs
// as any Transformer (nn/model.h) with ForwardOptions::input_embeds, so a
// KV-cache generation prefills the prompt with its image tokens and
// decodes text as usual.
//
//   auto vlm = tessera::nn::load_vlm_folder("SmolVLM-256M-Instruct/");
//   tessera::nn::Image img = tessera::nn::read_image("scene.png");
//   auto inputs = vlm.prepare({{"user", "How many red circles are there?", 1}}, {img});
//   tessera::nn::SamplingOptions s;
//   s.max_new_tokens = 16;
//   s.stop_tokens = vlm.stop_tokens();
//   auto out = tessera::nn::generate_vlm(*vlm.model, {inputs}, s);
//   std::string answer = vlm.tokenizer.decode(to_int32(out.tokens[0]), true);
//
// Only single-rank models (no tensor parallelism) and images with every
// patch present (the processors' output; Idefics3's patch_attention_mask
// for padded batches is not implemented) are supported.
//
// Thread safety: configs and ImageProcessorConfig are plain values and
// their functions thread-safe; a VisionLanguageModel runs one forward at a
// time (not thread-safe), like Transformer.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "tessera/formats/hf.h"
#include "tessera/formats/model_config.h"
#include "tessera/nn/generate.h"
#include "tessera/nn/image.h"
#include "tessera/nn/model.h"
#include "tessera/nn/vision.h"
#include "tessera/tokenizer/tokenizer.h"

namespace tessera::nn {

enum class VlmLayout { kIdefics3, kLlava };
const char* vlm_layout_name(VlmLayout layout);  // "idefics3", "llava"

struct VlmConfig {
  VlmLayout layout = VlmLayout::kIdefics3;
  // config.json's model_type: "idefics3" or "smolvlm" (kIdefics3), "llava".
  std::string model_type = "idefics3";
  VisionConfig vision;
  ModelConfig text;
  // The placeholder id that image tokens replace.
  int64_t image_token_id = 0;
  // Idefics3: pixel-shuffle factor (each scale_factor x scale_factor block
  // of patches becomes one token of scale_factor^2 * vision hidden size).
  int64_t scale_factor = 2;
  // LLaVA: which hidden state of the encoder feeds the projector (Python
  // indexing over [embeddings, layer 1, ..., layer L]: -1 is the last
  // layer, -2 the one before), "default" (drop the class token) or "full",
  // the projector's activation and whether its linears have biases.
  int64_t vision_feature_layer = -2;
  std::string vision_feature_select_strategy = "default";
  std::string projector_hidden_act = "gelu";
  bool projector_bias = true;

  // Language-model tokens per image (per crop when an image is split).
  int64_t image_seq_len() const;
  // Width of the connector's input per token.
  int64_t connector_input_size() const;
  // Parameters of the vision encoder, the connector and the language model.
  int64_t num_parameters() const;
  std::string summary() const;

  // InvalidArgument naming the field: patches per side not divisible by
  // scale_factor, a feature layer outside the encoder, an image token id
  // outside the text vocabulary, an unknown activation or strategy, and
  // the checks of VisionConfig / ModelConfig.
  void validate() const;

  // Reads a VLM config.json (vision_config and text_config nested). Strict:
  // unknown keys are InvalidArgument naming the file and key; keys only
  // describing how the checkpoint was made are ignored. Missing fields take
  // transformers' defaults (LLaVA's text_config usually lists only what
  // differs from LlamaConfig). Text models must be Llama / Qwen2 family
  // dense models that ModelConfig accepts.
  static VlmConfig load(const std::string& config_json_path);
  static VlmConfig parse(const std::string& json_text, const std::string& source = "<inline>");
  // config.json text; parse(to_json()) reproduces this config.
  std::string to_json() const;
};

// How a processor turns an image into pixel_values (preprocessor_config.json).
struct ImageProcessorConfig {
  // "Idefics3ImageProcessor", "SmolVLMImageProcessor", "CLIPImageProcessor",
  // "SiglipImageProcessor" (the last two are the LLaVA-style single-crop
  // pipelines).
  std::string image_processor_type = "Idefics3ImageProcessor";
  bool do_resize = true;
  // Exactly one of: longest_edge (Idefics3: aspect kept, the other side
  // rounded up to even), shortest_edge (CLIP: aspect kept), height x width.
  int64_t size_longest_edge = 0;
  int64_t size_shortest_edge = 0;
  int64_t size_height = 0, size_width = 0;
  Resample resample = Resample::kLanczos;
  bool do_center_crop = false;
  int64_t crop_height = 0, crop_width = 0;
  bool do_rescale = true;
  double rescale_factor = 1.0 / 255.0;
  bool do_normalize = true;
  std::array<double, 3> image_mean = {0.5, 0.5, 0.5};
  std::array<double, 3> image_std = {0.5, 0.5, 0.5};
  // Idefics3 / SmolVLM: split into max_image_size crops plus a global image
  // (do_image_splitting), or square-resize to max_image_size.
  bool do_image_splitting = false;
  int64_t max_image_size = 0;

  bool idefics3() const {
    return image_processor_type == "Idefics3ImageProcessor" ||
           image_processor_type == "SmolVLMImageProcessor";
  }
  // InvalidArgument naming the field.
  void validate() const;
  // Strict reader of preprocessor_config.json (unknown keys are errors;
  // processor_class and the like are ignored).
  static ImageProcessorConfig load(const std::string& path);
  static ImageProcessorConfig parse(const std::string& json_text,
                                    const std::string& source = "<inline>");
  std::string to_json() const;
};

struct ProcessedImage {
  // [crops, 3, S, S] float32: the split crops row by row, then the global
  // image (a single crop when not split).
  at::Tensor pixel_values;
  // Idefics3 grid (0, 0 when not split): the prompt lays out rows x cols
  // crop tokens before the global image's.
  int64_t rows = 0, cols = 0;
};

// `image` through the processor's steps, as transformers runs them (resize
// with PIL's filters, crop or split, x * rescale_factor, (x - mean) / std),
// channels first. InvalidArgument when the result does not come out square
// for an encoder (a config without resize or crop on a non-square image).
ProcessedImage preprocess_image(const Image& image, const ImageProcessorConfig& config);

class VisionLanguageModel {
 public:
  // Zero-initialised (norm weights one). InvalidArgument for an invalid
  // config.
  explicit VisionLanguageModel(VlmConfig config);
  ~VisionLanguageModel();
  VisionLanguageModel(VisionLanguageModel&&) noexcept;
  VisionLanguageModel& operator=(VisionLanguageModel&&) noexcept;

  const VlmConfig& config() const;
  VisionEncoder& vision();
  Transformer& language_model();

  // Every parameter with its checkpoint name (text parameters under the
  // layout's prefix), in a stable order. The tensors alias the model's.
  std::vector<std::pair<std::string, at::Tensor>> named_parameters() const;
  // Checkpoint name -> full shape, for every parameter.
  std::map<std::string, std::vector<int64_t>> parameter_shapes() const;
  // Seeded normal(0, 0.02) matrices (vision, connector, language model).
  void init_random(uint64_t seed);
  void set_requires_grad(bool requires_grad);
  // Loads every parameter from `weights` by checkpoint name (either LLaVA
  // spelling). NotFound naming the tensor and `source` when one is missing;
  // InvalidArgument naming it for a shape that does not match the config,
  // or for tensors the model does not have (a config that does not describe
  // the checkpoint, e.g. fewer layers).
  void load_weights(const WeightMap& weights, const std::string& source);
  // Full tensors by checkpoint name (the layout's canonical spelling).
  WeightMap weights() const;

  // Encoder features the connector takes: [N, positions, vision hidden]
  // (Idefics3: post-normed last layer; LLaVA: vision_feature_layer's hidden
  // state, class token dropped under "default").
  at::Tensor encode_images(const at::Tensor& pixel_values);
  // Connector: [N, positions, vision hidden] -> [N, image_seq_len, text hidden].
  at::Tensor connect(const at::Tensor& features);
  // Both: pixel_values [N, 3, S, S] -> image tokens [N, image_seq_len, text hidden].
  at::Tensor image_features(const at::Tensor& pixel_values);
  // Text embeddings of input_ids [B, T] with the image_token_id positions
  // replaced, in row-major order, by the rows of image_features [N,
  // image_seq_len, H] (N * image_seq_len placeholders in all, else
  // InvalidArgument naming both counts). Undefined image_features: no
  // placeholders allowed.
  at::Tensor embed(const at::Tensor& input_ids, const at::Tensor& image_features);
  // Logits of a prompt batch with its images (pixel_values may be undefined
  // for text-only prompts). `options` as Transformer::forward (its
  // input_embeds is set here).
  ForwardOutput forward(const at::Tensor& input_ids, const at::Tensor& pixel_values,
                        ForwardOptions options = {});

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Writes config.json and model.safetensors of `model` into `dir`.
void save_vlm(const std::string& dir, const VisionLanguageModel& model);
// Reads config.json and the safetensors of `dir` into a model (fp32).
// Errors as VlmConfig::load and VisionLanguageModel::load_weights.
VisionLanguageModel load_vlm(const std::string& dir);
// A random model of `config` written as a checkpoint folder; returns the
// weights written.
WeightMap write_random_vlm(const std::string& dir, const VlmConfig& config, uint64_t seed);

// One prompt for generate_vlm: token ids with the image placeholders
// expanded, and the pixel values of its images in placeholder order
// (undefined when it has none).
struct VlmInput {
  std::vector<int64_t> ids;
  at::Tensor pixel_values;
};

// Greedy or sampled generation (SamplingOptions as generate()) for prompts
// with images: one prefill of each prompt's embeddings with its image
// tokens into a KV cache, then token-by-token decoding. With use_cache =
// false every step recomputes the whole sequence (the reference the tests
// compare against). Collective-free; single rank.
GenerationResult generate_vlm(VisionLanguageModel& model, const std::vector<VlmInput>& inputs,
                              const SamplingOptions& options);

// A chat turn for VLM prompts: text and how many images it carries (they
// come first in the turn, as the processors' chat templates place them).
struct VlmMessage {
  std::string role;  // "user", "assistant", "system"
  std::string content;
  int64_t images = 0;
};

// The layout's chat format with one "<image>" marker per image:
//   kIdefics3  "<|im_start|>User:<image>How many?<end_of_utterance>\nAssistant:"
//              (SmolVLM's template; ": " after the role when the turn has no image)
//   kLlava     "USER: <image>\nHow many? ASSISTANT:" (llava-1.5-hf)
// InvalidArgument for an unknown role.
std::string format_vlm_chat(VlmLayout layout, const std::vector<VlmMessage>& messages);

// Replaces the i-th "<image>" marker of `text` by the layout's expansion of
// image i (Idefics3: <fake_token_around_image>, <row_r_col_c> or
// <global-img>, image_seq_len "<image>" tokens per crop; LLaVA:
// image_seq_len "<image>" tokens). InvalidArgument when the marker count
// differs from images.size().
std::string expand_image_markers(const std::string& text, const VlmConfig& config,
                                 const std::vector<ProcessedImage>& images);

// A checkpoint folder ready to answer: model, tokenizer (tokenizer.json of
// the folder) and image processor (preprocessor_config.json).
struct LoadedVlm {
  std::unique_ptr<VisionLanguageModel> model;
  Tokenizer tokenizer;
  ImageProcessorConfig processor;

  // Token ids and pixel values of a chat ending with the assistant's turn
  // opened: format_vlm_chat, images preprocessed, markers expanded, BOS
  // never added (SmolVLM's template starts with <|im_start|>). The images
  // are those of the messages, in order.
  VlmInput prepare(const std::vector<VlmMessage>& messages, const std::vector<Image>& images) const;
  // End-of-answer tokens: <end_of_utterance> (Idefics3), the tokenizer's
  // EOS, and those of config.json's text eos_token_id.
  std::vector<int64_t> stop_tokens() const;
};
// NotFound / InvalidArgument / DataLoss naming the file at fault.
LoadedVlm load_vlm_folder(const std::string& dir);

}  // namespace tessera::nn
