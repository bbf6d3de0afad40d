#include "tessera/nn/vlm.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "hf_config_keys.h"
#include "tessera/core/config.h"
#include "tessera/core/error.h"
#include "tessera/core/file_io.h"
#include "tessera/core/metrics.h"
#include "tessera/core/tensor.h"
#include "tessera/formats/safetensors.h"

namespace fs = std::filesystem;

namespace tessera::nn {
namespace {

using nlohmann::json;

// Keys of a text_config that only Idefics3 / SmolVLM's training code reads.
// A setting that would change the function (a perceiver resampler, q/k
// layer norms) is refused instead.
const char* const kIgnoredTextKeys[] = {
    "perceiver_config",
    "neftune_noise_alpha",
    "pixel_shuffle_factor",
    "freeze_text_layers",
    "freeze_vision_layers",
    "freeze_lm_head",
    "freeze_text_module_exceptions",
    "freeze_vision_module_exceptions",
    "additional_vocab_size",
    "alpha_initializer",
    "alphas_initializer_range",
    "cross_layer_interval",
    "qk_layer_norms_perceiver",
    "pad_token_id",
    "head_dim_",
};

// LlamaConfig's defaults for the fields ModelConfig requires (LLaVA's
// text_config lists only what differs from them).
void fill_llama_defaults(json& t) {
  if (!t.contains("model_type")) t["model_type"] = "llama";
  const bool llama = t["model_type"] == "llama";
  if (!llama) return;
  if (!t.contains("vocab_size")) t["vocab_size"] = 32000;
  if (!t.contains("hidden_size")) t["hidden_size"] = 4096;
  if (!t.contains("intermediate_size")) t["intermediate_size"] = 11008;
  if (!t.contains("num_hidden_layers")) t["num_hidden_layers"] = 32;
  if (!t.contains("num_attention_heads")) t["num_attention_heads"] = 32;
  if (!t.contains("max_position_embeddings")) t["max_position_embeddings"] = 2048;
}

ModelConfig parse_text_config(const std::string& raw, const std::string& where) {
  json t = json::parse(raw);
  TESSERA_CHECK(t.is_object(), InvalidArgument, where, ": text_config must be an object");
  for (const char* key : {"qk_layer_norms", "use_resampler"}) {
    if (t.contains(key)) {
      TESSERA_CHECK(t[key].is_boolean() && !t[key].get<bool>(), InvalidArgument, where,
                    ": text_config.", key, "=true is not supported");
      t.erase(key);
    }
  }
  for (const char* key : kIgnoredTextKeys) t.erase(key);
  for (const char* key : detail::kGenericConfigKeys) t.erase(key);
  fill_llama_defaults(t);
  ModelConfig c = ModelConfig::parse(t.dump(), where + ":text_config");
  TESSERA_CHECK(c.num_experts == 0, InvalidArgument, where,
                ": text_config describes a Mixture-of-Experts model; VLMs take dense text models");
  return c;
}

// Text parameter name (Transformer's) <-> checkpoint name.
std::string text_to_checkpoint(VlmLayout layout, const std::string& name) {
  if (layout == VlmLayout::kLlava) return "language_model." + name;
  if (name.rfind("model.", 0) == 0) return "model.text_model." + name.substr(6);
  return name;  // lm_head.weight
}

// transformers >= 4.52 saves LLaVA as model.language_model.* (without the
// inner "model."), model.vision_tower.*, model.multi_modal_projector.* and
// lm_head.weight.
std::string llava_new_spelling(const std::string& name) {
  if (name.rfind("language_model.model.", 0) == 0) {
    return "model.language_model." + name.substr(std::string("language_model.model.").size());
  }
  if (name == "language_model.lm_head.weight") return "lm_head.weight";
  if (name.rfind("vision_tower.", 0) == 0 || name.rfind("multi_modal_projector.", 0) == 0) {
    return "model." + name;
  }
  return name;
}

at::Tensor act(const at::Tensor& x, const std::string& name) {
  if (name == "gelu") return at::gelu(x);
  if (name == "gelu_pytorch_tanh") return at::gelu(x, "tanh");
  if (name == "silu") return at::silu(x);
  return at::relu(x);
}

// Idefics3Connector.pixel_shuffle, step for step.
at::Tensor idefics3_pixel_shuffle(const at::Tensor& x, int64_t s) {
  const int64_t n = x.size(0), seq = x.size(1), d = x.size(2);
  const int64_t side = static_cast<int64_t>(std::lround(std::sqrt(static_cast<double>(seq))));
  at::Tensor y = x.reshape({n, side, side, d});
  y = y.reshape({n, side, side / s, d * s});
  y = y.permute({0, 2, 1, 3});
  y = y.reshape({n, side / s, side / s, d * s * s});
  y = y.permute({0, 2, 1, 3});
  return y.reshape({n, seq / (s * s), d * s * s});
}

int64_t int_or_object(const ConfigObject& cfg, const char* key, const char* field) {
  const json j = json::parse(cfg.get_raw(key));
  if (j.is_number_integer()) return j.get<int64_t>();
  TESSERA_CHECK(j.is_object() && j.contains(field) && j[field].is_number_integer(), InvalidArgument,
                cfg.where(), ": ", key, " must be an integer or an object with '", field, "'");
  return j[field].get<int64_t>();
}

}  // namespace

const char* vlm_layout_name(VlmLayout layout) {
  return layout == VlmLayout::kIdefics3 ? "idefics3" : "llava";
}

// ---------------------------------------------------------------------------
// VlmConfig

int64_t VlmConfig::image_seq_len() const {
  if (layout == VlmLayout::kIdefics3) return vision.num_patches() / (scale_factor * scale_factor);
  return vision_feature_select_strategy == "full" ? vision.num_positions() : vision.num_patches();
}

int64_t VlmConfig::connector_input_size() const {
  return layout == VlmLayout::kIdefics3 ? vision.hidden_size * scale_factor * scale_factor
                                        : vision.hidden_size;
}

int64_t VlmConfig::num_parameters() const {
  const int64_t h = text.hidden_size;
  int64_t connector = connector_input_size() * h;
  if (layout == VlmLayout::kLlava) connector += h * h + (projector_bias ? 2 * h : 0);
  return vision.num_parameters() + connector + text.num_parameters();
}

std::string VlmConfig::summary() const {
  std::ostringstream out;
  out << model_type << " (" << vlm_layout_name(layout) << "): vision " << vision.model_type << " "
      << vision.num_hidden_layers << " layers, hidden " << vision.hidden_size << ", "
      << vision.image_size << "px / " << vision.patch_size << "px patches; " << image_seq_len()
      << " tokens per image; text " << text.summary() << "; " << num_parameters() / 1e6
      << "M parameters";
  return out.str();
}

void VlmConfig::validate() const {
  vision.validate();
  text.validate();
  TESSERA_CHECK(text.num_experts == 0, InvalidArgument, "VLM config: the text model must be dense");
  TESSERA_CHECK(image_token_id >= 0 && image_token_id < text.vocab_size, InvalidArgument,
                "VLM config: image_token_id ", image_token_id, " outside the text vocabulary of ",
                text.vocab_size);
  if (layout == VlmLayout::kIdefics3) {
    TESSERA_CHECK(!vision.is_clip(), InvalidArgument,
                  "VLM config: the idefics3 layout takes a SigLIP-family vision model, not ",
                  vision.model_type);
    TESSERA_CHECK(scale_factor >= 1 && vision.patches_per_side() % scale_factor == 0,
                  InvalidArgument, "VLM config: scale_factor ", scale_factor,
                  " does not divide the ", vision.patches_per_side(), " patches per side");
  } else {
    const int64_t L = vision.num_hidden_layers;
    TESSERA_CHECK(vision_feature_layer >= -(L + 1) && vision_feature_layer <= L, InvalidArgument,
                  "VLM config: vision_feature_layer ", vision_feature_layer,
                  " outside the encoder's ", L + 1, " hidden states");
    TESSERA_CHECK(
        vision_feature_select_strategy == "default" || vision_feature_select_strategy == "full",
        InvalidArgument, "VLM config: vision_feature_select_strategy '",
        vision_feature_select_strategy, "' is not 'default' or 'full'");
    TESSERA_CHECK(
        vision_feature_select_strategy == "full" || vision.is_clip(), InvalidArgument,
        "VLM config: strategy 'default' drops a class token, which only CLIP encoders have");
    TESSERA_CHECK(projector_hidden_act == "gelu" || projector_hidden_act == "gelu_pytorch_tanh" ||
                      projector_hidden_act == "silu" || projector_hidden_act == "relu",
                  InvalidArgument, "VLM config: projector_hidden_act '", projector_hidden_act,
                  "' is not supported (gelu, gelu_pytorch_tanh, silu, relu)");
  }
}

VlmConfig VlmConfig::parse(const std::string& json_text, const std::string& source) {
  const ConfigObject cfg = ConfigObject::parse(json_text, source);
  VlmConfig c;
  c.model_type = cfg.get_string("model_type");
  const std::string where = cfg.where();
  if (c.model_type == "idefics3" || c.model_type == "smolvlm") {
    c.layout = VlmLayout::kIdefics3;
  } else if (c.model_type == "llava") {
    c.layout = VlmLayout::kLlava;
  } else {
    TESSERA_THROW(InvalidArgument, where, ": unsupported vision-language model_type '",
                  c.model_type, "' (supported: idefics3, smolvlm, llava)");
  }
  TESSERA_CHECK(cfg.has("text_config"), InvalidArgument, where, ": text_config is missing");
  c.text = parse_text_config(cfg.get_raw("text_config"), where);
  const std::string default_vision =
      c.layout == VlmLayout::kLlava ? "clip_vision_model" : c.model_type + "_vision";
  if (cfg.has("vision_config")) {
    ConfigObject v = cfg.get_object("vision_config");
    c.vision = VisionConfig::from_config(v, default_vision);
  } else {
    c.vision = VisionConfig::from_config(ConfigObject::parse("{}", where + ":vision_config"),
                                         default_vision);
  }
  for (const char* key : detail::kGenericConfigKeys) cfg.ignore(key);
  for (const char* key : {"vocab_size", "pad_token_id", "tie_word_embeddings", "ignore_index",
                          "image_seq_length", "bos_token_id", "eos_token_id"}) {
    cfg.ignore(key);
  }
  if (c.layout == VlmLayout::kIdefics3) {
    c.image_token_id = cfg.get_int("image_token_id", 128257);
    c.scale_factor = cfg.get_int("scale_factor", 2);
  } else {
    c.image_token_id = cfg.has("image_token_index") ? cfg.get_int("image_token_index")
                                                    : cfg.get_int("image_token_id", 32000);
    if (cfg.has("image_token_id")) cfg.ignore("image_token_id");
    c.vision_feature_layer = cfg.get_int("vision_feature_layer", -2);
    c.vision_feature_select_strategy = cfg.get_string("vision_feature_select_strategy", "default");
    c.projector_hidden_act = cfg.get_string("projector_hidden_act", "gelu");
    c.projector_bias = cfg.get_bool("multimodal_projector_bias", true);
  }
  cfg.check_no_unknown_keys();
  try {
    c.validate();
  } catch (const Error& e) {
    throw_error(e.code(), where + ": " + e.message());
  }
  return c;
}

VlmConfig VlmConfig::load(const std::string& path) {
  const ConfigObject probe =
      ConfigObject::load_file(path);  // NotFound / syntax errors name the file
  return parse(probe.dump(), path);
}

std::string VlmConfig::to_json() const {
  nlohmann::ordered_json j;
  j["model_type"] = model_type;
  j["architectures"] = {layout == VlmLayout::kLlava ? "LlavaForConditionalGeneration"
                        : model_type == "smolvlm"   ? "SmolVLMForConditionalGeneration"
                                                    : "Idefics3ForConditionalGeneration"};
  if (layout == VlmLayout::kIdefics3) {
    j["image_token_id"] = image_token_id;
    j["scale_factor"] = scale_factor;
  } else {
    j["image_token_index"] = image_token_id;
    j["vision_feature_layer"] = vision_feature_layer;
    j["vision_feature_select_strategy"] = vision_feature_select_strategy;
    j["projector_hidden_act"] = projector_hidden_act;
    j["multimodal_projector_bias"] = projector_bias;
  }
  j["tie_word_embeddings"] = text.tie_word_embeddings;
  j["vocab_size"] = text.vocab_size;
  json text_json = json::parse(text.to_json());
  text_json.erase("architectures");
  j["text_config"] = text_json;
  j["vision_config"] = json::parse(vision.to_json());
  return j.dump(2);
}

// ---------------------------------------------------------------------------
// Image processor

void ImageProcessorConfig::validate() const {
  const bool known = idefics3() || image_processor_type == "CLIPImageProcessor" ||
                     image_processor_type == "SiglipImageProcessor";
  TESSERA_CHECK(known, InvalidArgument, "image processor: unsupported image_processor_type '",
                image_processor_type,
                "' (supported: Idefics3ImageProcessor, SmolVLMImageProcessor, CLIPImageProcessor, "
                "SiglipImageProcessor)");
  if (do_resize) {
    const int ways =
        (size_longest_edge > 0) + (size_shortest_edge > 0) + (size_height > 0 && size_width > 0);
    TESSERA_CHECK(ways == 1, InvalidArgument,
                  "image processor: size must give exactly one of longest_edge, shortest_edge or "
                  "height and width");
  }
  if (idefics3()) {
    TESSERA_CHECK(max_image_size > 0, InvalidArgument,
                  "image processor: max_image_size.longest_edge must be positive for ",
                  image_processor_type);
  }
  if (do_center_crop) {
    TESSERA_CHECK(crop_height > 0 && crop_width > 0, InvalidArgument,
                  "image processor: crop_size must be positive");
  }
  for (int c = 0; c < 3; ++c) {
    TESSERA_CHECK(image_std[c] > 0, InvalidArgument, "image processor: image_std[", c,
                  "] must be positive");
  }
}

ImageProcessorConfig ImageProcessorConfig::parse(const std::string& json_text,
                                                 const std::string& source) {
  const ConfigObject cfg = ConfigObject::parse(json_text, source);
  ImageProcessorConfig c;
  c.image_processor_type =
      cfg.get_string("image_processor_type", cfg.get_string("feature_extractor_type", ""));
  if (cfg.has("feature_extractor_type")) cfg.ignore("feature_extractor_type");
  const bool idefics = c.image_processor_type == "Idefics3ImageProcessor" ||
                       c.image_processor_type == "SmolVLMImageProcessor";
  c.do_resize = cfg.get_bool("do_resize", true);
  if (cfg.has("size")) {
    const json size = json::parse(cfg.get_raw("size"));
    if (size.is_number_integer()) {
      c.size_shortest_edge = size.get<int64_t>();
    } else {
      TESSERA_CHECK(size.is_object(), InvalidArgument, cfg.where(),
                    ": size must be an object or an integer");
      for (const auto& [k, v] : size.items()) {
        TESSERA_CHECK(v.is_number_integer(), InvalidArgument, cfg.where(), ": size.", k,
                      " must be an integer");
        if (k == "longest_edge")
          c.size_longest_edge = v.get<int64_t>();
        else if (k == "shortest_edge")
          c.size_shortest_edge = v.get<int64_t>();
        else if (k == "height")
          c.size_height = v.get<int64_t>();
        else if (k == "width")
          c.size_width = v.get<int64_t>();
        else
          TESSERA_THROW(InvalidArgument, cfg.where(), ": unknown key 'size.", k, "'");
      }
    }
  } else if (idefics) {
    c.size_longest_edge = 4 * 364;
  }
  c.resample = resample_from_int(cfg.get_int("resample", idefics ? 1 : 3));
  c.do_center_crop = cfg.get_bool("do_center_crop", false);
  if (cfg.has("crop_size")) {
    const json crop = json::parse(cfg.get_raw("crop_size"));
    if (crop.is_number_integer()) {
      c.crop_height = c.crop_width = crop.get<int64_t>();
    } else {
      TESSERA_CHECK(crop.is_object() && crop.contains("height") && crop.contains("width"),
                    InvalidArgument, cfg.where(),
                    ": crop_size must be an integer or {height, width}");
      c.crop_height = crop["height"].get<int64_t>();
      c.crop_width = crop["width"].get<int64_t>();
    }
  }
  c.do_rescale = cfg.get_bool("do_rescale", true);
  c.rescale_factor = cfg.get_double("rescale_factor", 1.0 / 255.0);
  c.do_normalize = cfg.get_bool("do_normalize", true);
  auto triple = [&](const char* key, std::array<double, 3> fallback) {
    if (!cfg.has(key)) return fallback;
    const json j = json::parse(cfg.get_raw(key));
    if (j.is_number())
      return std::array<double, 3>{j.get<double>(), j.get<double>(), j.get<double>()};
    auto v = cfg.get_double_list(key);
    TESSERA_CHECK(v.size() == 3, InvalidArgument, cfg.where(), ": ", key,
                  " must have 3 values, got ", v.size());
    return std::array<double, 3>{v[0], v[1], v[2]};
  };
  c.image_mean = triple("image_mean", {0.5, 0.5, 0.5});
  c.image_std = triple("image_std", {0.5, 0.5, 0.5});
  c.do_image_splitting = cfg.get_bool("do_image_splitting", false);
  if (cfg.has("max_image_size"))
    c.max_image_size = int_or_object(cfg, "max_image_size", "longest_edge");
  // Settings the steps above always follow (RGB conversion, padding of a
  // batch to one size) or that belong to other inputs (video).
  for (const char* key :
       {"processor_class", "do_convert_rgb", "do_pad", "video_sampling", "image_seq_len",
        "return_row_col_info", "default_to_square", "use_square_size"}) {
    cfg.ignore(key);
  }
  cfg.check_no_unknown_keys();
  try {
    c.validate();
  } catch (const Error& e) {
    throw_error(e.code(), cfg.where() + ": " + e.message());
  }
  return c;
}

ImageProcessorConfig ImageProcessorConfig::load(const std::string& path) {
  const ConfigObject probe = ConfigObject::load_file(path);
  return parse(probe.dump(), path);
}

std::string ImageProcessorConfig::to_json() const {
  nlohmann::ordered_json j;
  j["image_processor_type"] = image_processor_type;
  j["do_resize"] = do_resize;
  nlohmann::ordered_json size = nlohmann::ordered_json::object();
  if (size_longest_edge > 0) size["longest_edge"] = size_longest_edge;
  if (size_shortest_edge > 0) size["shortest_edge"] = size_shortest_edge;
  if (size_height > 0) size["height"] = size_height;
  if (size_width > 0) size["width"] = size_width;
  j["size"] = size;
  j["resample"] = static_cast<int>(resample);
  j["do_center_crop"] = do_center_crop;
  if (do_center_crop) j["crop_size"] = {{"height", crop_height}, {"width", crop_width}};
  j["do_rescale"] = do_rescale;
  j["rescale_factor"] = rescale_factor;
  j["do_normalize"] = do_normalize;
  j["image_mean"] = image_mean;
  j["image_std"] = image_std;
  if (idefics3()) {
    j["do_image_splitting"] = do_image_splitting;
    j["max_image_size"] = {{"longest_edge", max_image_size}};
  }
  return j.dump(2);
}

namespace {

// Idefics3 / SmolVLM's get_resize_output_image_size: the longest edge to
// `longest`, the other side by the aspect ratio, rounded up to even, then
// both below 4096.
std::pair<int64_t, int64_t> longest_edge_size(int64_t height, int64_t width, int64_t longest) {
  const double aspect = static_cast<double>(width) / height;
  if (width >= height) {
    width = longest;
    height = static_cast<int64_t>(width / aspect);
    if (height % 2 != 0) ++height;
  } else {
    height = longest;
    width = static_cast<int64_t>(height * aspect);
    if (width % 2 != 0) ++width;
  }
  height = std::max<int64_t>(height, 1);
  width = std::max<int64_t>(width, 1);
  constexpr int64_t kMax = 4096;
  const double aspect2 = static_cast<double>(width) / height;
  if (width >= height && width > kMax) {
    width = kMax;
    height = static_cast<int64_t>(width / aspect2);
  } else if (height > width && height > kMax) {
    height = kMax;
    width = static_cast<int64_t>(height * aspect2);
  }
  return {std::max<int64_t>(height, 1), std::max<int64_t>(width, 1)};
}

at::Tensor to_pixel_values(const Image& image, const ImageProcessorConfig& c) {
  at::Tensor out = at::empty({3, image.height, image.width}, at::kFloat);
  float* o = out.data_ptr<float>();
  const int64_t plane = image.height * image.width;
  for (int ch = 0; ch < 3; ++ch) {
    const float mean = static_cast<float>(c.image_mean[ch]),
                std = static_cast<float>(c.image_std[ch]);
    for (int64_t i = 0; i < plane; ++i) {
      const uint8_t p = image.pixels[i * 3 + ch];
      // transformers rescales in float64 and casts to float32, then
      // normalises in float32.
      float v = c.do_rescale ? static_cast<float>(static_cast<double>(p) * c.rescale_factor)
                             : static_cast<float>(p);
      if (c.do_normalize) v = (v - mean) / std;
      o[ch * plane + i] = v;
    }
  }
  return out;
}

}  // namespace

ProcessedImage preprocess_image(const Image& image, const ImageProcessorConfig& c) {
  c.validate();
  TESSERA_CHECK(image.height >= 1 && image.width >= 1, InvalidArgument,
                "preprocess_image: empty image");
  ProcessedImage result;
  std::vector<Image> crops;
  Image img = image;
  if (c.idefics3()) {
    if (c.do_resize && c.size_longest_edge > 0) {
      auto [h, w] = longest_edge_size(img.height, img.width, c.size_longest_edge);
      img = resize_image(img, h, w, c.resample);
    } else if (c.do_resize && c.size_height > 0) {
      img = resize_image(img, c.size_height, c.size_width, c.resample);
    }
    const int64_t m = c.max_image_size;
    if (c.do_image_splitting) {
      // resize_for_vision_encoder: both sides up to multiples of m.
      int64_t h = img.height, w = img.width;
      const double aspect = static_cast<double>(w) / h;
      if (w >= h) {
        w = (w + m - 1) / m * m;
        h = static_cast<int64_t>(w / aspect);
        h = (h + m - 1) / m * m;
      } else {
        h = (h + m - 1) / m * m;
        w = static_cast<int64_t>(h * aspect);
        w = (w + m - 1) / m * m;
      }
      img = resize_image(img, h, w, c.resample);
      if (img.height > m || img.width > m) {
        result.rows = (img.height + m - 1) / m;
        result.cols = (img.width + m - 1) / m;
        const int64_t oh = (img.height + result.rows - 1) / result.rows;
        const int64_t ow = (img.width + result.cols - 1) / result.cols;
        for (int64_t r = 0; r < result.rows; ++r) {
          for (int64_t col = 0; col < result.cols; ++col) {
            const int64_t top = r * oh, left = col * ow;
            crops.push_back(crop_image(img, top, left, std::min(oh, img.height - top),
                                       std::min(ow, img.width - left)));
          }
        }
        img = resize_image(img, m, m, c.resample);
      }
      crops.push_back(img);
    } else {
      crops.push_back(resize_image(img, m, m, c.resample));
    }
  } else {
    if (c.do_resize) {
      if (c.size_shortest_edge > 0) {
        const int64_t s = c.size_shortest_edge;
        if (img.width <= img.height) {
          img = resize_image(img,
                             static_cast<int64_t>(s * static_cast<double>(img.height) / img.width),
                             s, c.resample);
        } else {
          img = resize_image(img, s,
                             static_cast<int64_t>(s * static_cast<double>(img.width) / img.height),
                             c.resample);
        }
      } else if (c.size_height > 0) {
        img = resize_image(img, c.size_height, c.size_width, c.resample);
      } else {
        auto [h, w] = longest_edge_size(img.height, img.width, c.size_longest_edge);
        img = resize_image(img, h, w, c.resample);
      }
    }
    if (c.do_center_crop) {
      TESSERA_CHECK(c.crop_height <= img.height && c.crop_width <= img.width, InvalidArgument,
                    "preprocess_image: crop ", c.crop_width, "x", c.crop_height,
                    " larger than the ", img.width, "x", img.height,
                    " image (padding crops are not supported)");
      img = crop_image(img, (img.height - c.crop_height) / 2, (img.width - c.crop_width) / 2,
                       c.crop_height, c.crop_width);
    }
    crops.push_back(img);
  }
  std::vector<at::Tensor> planes;
  for (const Image& crop : crops) {
    TESSERA_CHECK(crop.height == crop.width, InvalidArgument,
                  "preprocess_image: ", c.image_processor_type, " produced a ", crop.width, "x",
                  crop.height, " image; encoders take square images (set resize or crop)");
    planes.push_back(to_pixel_values(crop, c));
  }
  result.pixel_values = at::stack(planes);
  return result;
}

// ---------------------------------------------------------------------------
// The model

struct VisionLanguageModel::Impl {
  VlmConfig config;
  std::unique_ptr<VisionEncoder> vision;
  std::unique_ptr<Transformer> text;
  // Connector parameters by checkpoint name.
  std::vector<std::pair<std::string, at::Tensor>> connector;
  at::Tensor proj_w, l1_w, l1_b, l2_w, l2_b;

  at::Tensor add(const std::string& name, std::vector<int64_t> shape) {
    at::Tensor t = at::zeros(shape, at::kFloat);
    connector.emplace_back(name, t);
    return t;
  }
};

VisionLanguageModel::VisionLanguageModel(VlmConfig config) : impl_(std::make_unique<Impl>()) {
  config.validate();
  Impl& m = *impl_;
  m.config = std::move(config);
  const VlmConfig& c = m.config;
  const bool llava = c.layout == VlmLayout::kLlava;
  m.vision = std::make_unique<VisionEncoder>(
      c.vision, llava ? "vision_tower.vision_model." : "model.vision_model.");
  m.text = std::make_unique<Transformer>(c.text);
  const int64_t h = c.text.hidden_size;
  if (llava) {
    m.l1_w = m.add("multi_modal_projector.linear_1.weight", {h, c.vision.hidden_size});
    if (c.projector_bias) m.l1_b = m.add("multi_modal_projector.linear_1.bias", {h});
    m.l2_w = m.add("multi_modal_projector.linear_2.weight", {h, h});
    if (c.projector_bias) m.l2_b = m.add("multi_modal_projector.linear_2.bias", {h});
  } else {
    m.proj_w =
        m.add("model.connector.modality_projection.proj.weight", {h, c.connector_input_size()});
  }
}

VisionLanguageModel::~VisionLanguageModel() = default;
VisionLanguageModel::VisionLanguageModel(VisionLanguageModel&&) noexcept = default;
VisionLanguageModel& VisionLanguageModel::operator=(VisionLanguageModel&&) noexcept = default;

const VlmConfig& VisionLanguageModel::config() const { return impl_->config; }
VisionEncoder& VisionLanguageModel::vision() { return *impl_->vision; }
Transformer& VisionLanguageModel::language_model() { return *impl_->text; }

std::vector<std::pair<std::string, at::Tensor>> VisionLanguageModel::named_parameters() const {
  const Impl& m = *impl_;
  std::vector<std::pair<std::string, at::Tensor>> out = m.vision->named_parameters();
  for (const auto& p : m.connector) out.push_back(p);
  for (const auto& [name, t] : m.text->named_parameters()) {
    out.emplace_back(text_to_checkpoint(m.config.layout, name), t);
  }
  return out;
}

std::map<std::string, std::vector<int64_t>> VisionLanguageModel::parameter_shapes() const {
  std::map<std::string, std::vector<int64_t>> out;
  for (const auto& [name, t] : named_parameters()) out[name] = t.sizes().vec();
  return out;
}

void VisionLanguageModel::init_random(uint64_t seed) {
  at::NoGradGuard no_grad;
  Impl& m = *impl_;
  m.vision->init_random(seed * 3 + 1);
  m.text->init_random(seed * 3 + 2);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed * 3 + 3);
  for (auto& [name, t] : m.connector) {
    if (t.dim() == 2) {
      t.copy_(at::normal(0.0, 0.02, t.sizes(), gen));
    } else {
      t.zero_();
    }
  }
}

void VisionLanguageModel::set_requires_grad(bool requires_grad) {
  impl_->vision->set_requires_grad(requires_grad);
  impl_->text->set_requires_grad(requires_grad);
  for (auto& [name, t] : impl_->connector) t.set_requires_grad(requires_grad);
}

void VisionLanguageModel::load_weights(const WeightMap& weights, const std::string& source) {
  at::NoGradGuard no_grad;
  Impl& m = *impl_;
  const VlmConfig& c = m.config;
  bool new_llava = false;
  if (c.layout == VlmLayout::kLlava) {
    for (const auto& [name, t] : weights) {
      if (name.rfind("model.language_model.", 0) == 0 ||
          name.rfind("model.vision_tower.", 0) == 0) {
        new_llava = true;
        break;
      }
    }
  }
  std::set<std::string> used;
  auto fetch = [&](const std::string& canonical, at::IntArrayRef shape) -> const at::Tensor& {
    const std::string name = new_llava ? llava_new_spelling(canonical) : canonical;
    auto it = weights.find(name);
    TESSERA_CHECK(it != weights.end(), NotFound, source, ": tensor '", name,
                  "' is missing (config.json needs it)");
    TESSERA_CHECK(it->second.sizes() == shape, InvalidArgument, source, ": tensor '", name,
                  "' has shape ", shape_string(it->second.sizes()), " but config.json implies ",
                  shape_string(shape));
    TESSERA_CHECK(at::isFloatingType(it->second.scalar_type()), InvalidArgument, source,
                  ": tensor '", name, "' has dtype ", dtype_name(it->second.scalar_type()),
                  ", expected floating point");
    used.insert(name);
    return it->second;
  };
  for (auto& [name, t] : m.vision->named_parameters()) {
    const at::Tensor& src = fetch(name, t.sizes());
    const_cast<at::Tensor&>(t).copy_(src);
  }
  for (auto& [name, t] : m.connector) t.copy_(fetch(name, t.sizes()));
  for (const std::string& name : m.text->full_parameter_names()) {
    const auto shape = m.text->full_shape(name);
    m.text->load_full(name, fetch(text_to_checkpoint(c.layout, name), shape));
  }
  std::vector<std::string> extra;
  const std::string tied_head =
      new_llava ? "lm_head.weight" : text_to_checkpoint(c.layout, "lm_head.weight");
  for (const auto& [name, t] : weights) {
    if (used.count(name)) continue;
    if (c.text.tie_word_embeddings && name == tied_head) continue;  // a tied head saved anyway
    extra.push_back(name);
  }
  if (!extra.empty()) {
    std::string list;
    for (size_t i = 0; i < std::min<size_t>(extra.size(), 5); ++i)
      list += (i ? ", '" : "'") + extra[i] + "'";
    TESSERA_THROW(InvalidArgument, source, ": ", extra.size(),
                  " tensor(s) the config does not describe (", list,
                  extra.size() > 5 ? ", ..." : "", "); config.json and the weights disagree");
  }
}

WeightMap VisionLanguageModel::weights() const {
  WeightMap out;
  for (const auto& [name, t] : named_parameters()) out[name] = t.detach().clone();
  return out;
}

at::Tensor VisionLanguageModel::encode_images(const at::Tensor& pixel_values) {
  Impl& m = *impl_;
  const VlmConfig& c = m.config;
  if (c.layout == VlmLayout::kIdefics3)
    return m.vision->forward(pixel_values, -1, /*post_norm=*/true);
  const int64_t L = c.vision.num_hidden_layers;
  const int64_t index =
      c.vision_feature_layer < 0 ? L + 1 + c.vision_feature_layer : c.vision_feature_layer;
  at::Tensor h = m.vision->forward(pixel_values, index, /*post_norm=*/false);
  if (c.vision_feature_select_strategy == "default") h = h.narrow(1, 1, h.size(1) - 1);
  return h;
}

at::Tensor VisionLanguageModel::connect(const at::Tensor& features) {
  return translate_errors(
      "VisionLanguageModel::connect",
      [&] {
        Impl& m = *impl_;
        const VlmConfig& c = m.config;
        const int64_t positions = c.layout == VlmLayout::kIdefics3 ? c.vision.num_patches()
                                  : c.vision_feature_select_strategy == "full"
                                      ? c.vision.num_positions()
                                      : c.vision.num_patches();
        TESSERA_CHECK(features.dim() == 3 && features.size(1) == positions &&
                          features.size(2) == c.vision.hidden_size,
                      InvalidArgument, "connector: features must be [N, ", positions, ", ",
                      c.vision.hidden_size, "], got ", shape_string(features.sizes()));
        if (c.layout == VlmLayout::kIdefics3) {
          return at::linear(idefics3_pixel_shuffle(features, c.scale_factor), m.proj_w);
        }
        at::Tensor h = act(at::linear(features, m.l1_w, m.l1_b), c.projector_hidden_act);
        return at::linear(h, m.l2_w, m.l2_b);
      },
      ErrorCode::kInvalidArgument);
}

at::Tensor VisionLanguageModel::image_features(const at::Tensor& pixel_values) {
  return connect(encode_images(pixel_values));
}

at::Tensor VisionLanguageModel::embed(const at::Tensor& input_ids,
                                      const at::Tensor& image_features) {
  return translate_errors(
      "VisionLanguageModel::embed",
      [&] {
        Impl& m = *impl_;
        const VlmConfig& c = m.config;
        TESSERA_CHECK(input_ids.dim() == 2 && input_ids.scalar_type() == at::kLong, InvalidArgument,
                      "VLM embed: input_ids must be int64 [batch, tokens], got ",
                      dtype_name(input_ids.scalar_type()), " ", shape_string(input_ids.sizes()));
        TESSERA_CHECK(
            input_ids.numel() == 0 || (input_ids.min().item<int64_t>() >= 0 &&
                                       input_ids.max().item<int64_t>() < c.text.vocab_size),
            InvalidArgument, "VLM embed: token id outside the vocabulary of ", c.text.vocab_size);
        at::Tensor embeds =
            at::embedding(m.text->parameter("model.embed_tokens.weight"), input_ids);
        const at::Tensor mask = input_ids == c.image_token_id;
        const int64_t placeholders = mask.sum().item<int64_t>();
        const int64_t provided =
            image_features.defined() ? image_features.size(0) * image_features.size(1) : 0;
        TESSERA_CHECK(placeholders == provided, InvalidArgument, "VLM embed: the prompt has ",
                      placeholders, " image tokens (id ", c.image_token_id, ") but ",
                      image_features.defined() ? image_features.size(0) : 0, " image(s) give ",
                      provided, " (", c.image_seq_len(), " per image)");
        if (provided == 0) return embeds;
        TESSERA_CHECK(image_features.dim() == 3 && image_features.size(2) == c.text.hidden_size,
                      InvalidArgument, "VLM embed: image features must be [N, tokens, ",
                      c.text.hidden_size, "], got ", shape_string(image_features.sizes()));
        return embeds.index_put(
            {mask}, image_features.reshape({-1, c.text.hidden_size}).to(embeds.scalar_type()));
      },
      ErrorCode::kInvalidArgument);
}

ForwardOutput VisionLanguageModel::forward(const at::Tensor& input_ids,
                                           const at::Tensor& pixel_values, ForwardOptions options) {
  at::Tensor features = pixel_values.defined() ? image_features(pixel_values) : at::Tensor();
  options.input_embeds = embed(input_ids, features);
  return impl_->text->forward(input_ids, options);
}

void save_vlm(const std::string& dir, const VisionLanguageModel& model) {
  fs::create_directories(dir);
  const std::string config = model.config().to_json();
  std::string path = (fs::path(dir) / "config.json").string();
  AtomicFileWriter writer(path);
  writer.append(config.data(), config.size());
  writer.commit();
  NamedTensors tensors;
  for (const auto& [name, t] : model.named_parameters()) tensors.emplace_back(name, t.detach());
  save_safetensors_folder(dir, tensors, uint64_t{5} << 30);
}

VisionLanguageModel load_vlm(const std::string& dir) {
  const fs::path root(dir);
  TESSERA_CHECK(fs::is_directory(root), NotFound, "model folder '", dir, "' does not exist");
  VlmConfig config = VlmConfig::load((root / "config.json").string());
  auto folder = SafetensorsFolder::open(dir);
  WeightMap weights;
  for (const std::string& name : folder.names()) weights[name] = folder.get(name);
  VisionLanguageModel model(std::move(config));
  model.load_weights(weights, dir);
  return model;
}

WeightMap write_random_vlm(const std::string& dir, const VlmConfig& config, uint64_t seed) {
  VisionLanguageModel model(config);
  model.init_random(seed);
  save_vlm(dir, model);
  return model.weights();
}

// ---------------------------------------------------------------------------
// Generation

GenerationResult generate_vlm(VisionLanguageModel& model, const std::vector<VlmInput>& inputs,
                              const SamplingOptions& options) {
  return translate_errors(
      "generate_vlm",
      [&] {
        TESSERA_CHECK(!inputs.empty(), InvalidArgument, "generate_vlm: no prompts");
        TESSERA_CHECK(options.max_new_tokens >= 0, InvalidArgument,
                      "generate_vlm: max_new_tokens < 0");
        at::NoGradGuard no_grad;
        Transformer& lm = model.language_model();
        const int64_t B = static_cast<int64_t>(inputs.size()), H = model.config().text.hidden_size;
        auto gen = at::make_generator<at::CPUGeneratorImpl>(options.seed);
        GenerationResult result;
        result.tokens.assign(B, {});
        result.finish_reason.assign(B, "length");
        std::vector<bool> done(B, options.max_new_tokens == 0);
        auto accept = [&](const at::Tensor& next) {
          auto acc = next.accessor<int64_t, 1>();
          for (int64_t b = 0; b < B; ++b) {
            if (done[b]) continue;
            result.tokens[b].push_back(acc[b]);
            ++result.new_tokens;
            if (std::find(options.stop_tokens.begin(), options.stop_tokens.end(), acc[b]) !=
                options.stop_tokens.end()) {
              done[b] = true;
              result.finish_reason[b] = "stop";
            } else if (static_cast<int64_t>(result.tokens[b].size()) >= options.max_new_tokens) {
              done[b] = true;
            }
          }
        };
        auto all_done = [&] {
          return std::all_of(done.begin(), done.end(), [](bool d) { return d; });
        };

        // Image tokens of every prompt, once.
        Stopwatch watch;
        std::vector<at::Tensor> features(B);
        std::vector<std::vector<int64_t>> prompts(B);
        for (int64_t b = 0; b < B; ++b) {
          TESSERA_CHECK(!inputs[b].ids.empty(), InvalidArgument, "generate_vlm: prompt ", b,
                        " is empty");
          prompts[b] = inputs[b].ids;
          if (inputs[b].pixel_values.defined())
            features[b] = model.image_features(inputs[b].pixel_values);
        }
        auto embeds_of = [&](int64_t b, const std::vector<int64_t>& ids) {
          return model.embed(at::tensor(ids, at::kLong).view({1, -1}), features[b]);
        };

        if (!options.use_cache) {
          while (!all_done()) {
            std::vector<int64_t> next(B, 0);
            for (int64_t b = 0; b < B; ++b) {
              if (done[b]) continue;
              std::vector<int64_t> seq = prompts[b];
              seq.insert(seq.end(), result.tokens[b].begin(), result.tokens[b].end());
              // Generated tokens are text: only the prompt's placeholders
              // take image features (a generated image_token_id is looked
              // up like any token, as in the cached path).
              ForwardOptions one;
              one.batch_invariant = options.batch_invariant;
              one.input_embeds = embeds_of(b, prompts[b]);
              if (!result.tokens[b].empty()) {
                at::Tensor generated = at::embedding(lm.parameter("model.embed_tokens.weight"),
                                                     at::tensor(result.tokens[b], at::kLong))
                                           .unsqueeze(0);
                one.input_embeds = at::cat({one.input_embeds, generated}, 1);
              }
              at::Tensor ids = at::tensor(seq, at::kLong).view({1, -1});
              next[b] =
                  sample_next(lm.forward(ids, one).logits.select(1, ids.size(1) - 1), options, gen)
                      .item<int64_t>();
            }
            accept(at::tensor(next, at::kLong));
          }
          result.decode_seconds = watch.seconds();
          return result;
        }

        const PaddedPrompts padded = pad_prompts(prompts);
        at::Tensor embeds = at::zeros({B, padded.longest, H}, at::kFloat);
        for (int64_t b = 0; b < B; ++b) {
          embeds[b]
              .narrow(0, 0, static_cast<int64_t>(prompts[b].size()))
              .copy_(embeds_of(b, prompts[b])[0]);
        }
        KVCache cache(lm.config(), B, padded.longest + std::max<int64_t>(options.max_new_tokens, 1),
                      at::TensorOptions().dtype(at::kFloat));
        result.cache_bytes = cache.bytes();
        ForwardOptions fwd;
        fwd.cache = &cache;
        fwd.lengths = padded.lengths;
        fwd.last_logits_only = true;
        fwd.batch_invariant = options.batch_invariant;
        fwd.input_embeds = embeds;
        at::Tensor logits = lm.forward(padded.ids, fwd).logits.select(1, 0);
        if (!all_done()) accept(sample_next(logits, options, gen));
        result.prefill_seconds = watch.seconds();
        watch.reset();
        fwd.input_embeds = at::Tensor();
        fwd.lengths = at::ones({B}, at::kLong);
        while (!all_done()) {
          at::Tensor last = at::empty({B, 1}, at::kLong);
          for (int64_t b = 0; b < B; ++b) last[b][0] = result.tokens[b].back();
          logits = lm.forward(last, fwd).logits.select(1, 0);
          accept(sample_next(logits, options, gen));
        }
        result.decode_seconds = watch.seconds();
        return result;
      },
      ErrorCode::kInvalidArgument);
}

// ---------------------------------------------------------------------------
// Prompts

std::string format_vlm_chat(VlmLayout layout, const std::vector<VlmMessage>& messages) {
  std::string out;
  if (layout == VlmLayout::kIdefics3) {
    out = "<|im_start|>";
    for (const VlmMessage& m : messages) {
      TESSERA_CHECK(m.role == "user" || m.role == "assistant" || m.role == "system",
                    InvalidArgument, "format_vlm_chat: unknown role '", m.role, "'");
      TESSERA_CHECK(m.images >= 0, InvalidArgument, "format_vlm_chat: negative image count");
      std::string role = m.role;
      role[0] = static_cast<char>(std::toupper(static_cast<unsigned char>(role[0])));
      out += role + (m.images > 0 ? ":" : ": ");
      for (int64_t i = 0; i < m.images; ++i) out += "<image>";
      out += m.content + "<end_of_utterance>\n";
    }
    return out + "Assistant:";
  }
  for (const VlmMessage& m : messages) {
    TESSERA_CHECK(m.role == "user" || m.role == "assistant" || m.role == "system", InvalidArgument,
                  "format_vlm_chat: unknown role '", m.role, "'");
    if (m.role != "system") out += (m.role == "user" ? "USER: " : "ASSISTANT: ");
    for (int64_t i = 0; i < m.images; ++i) out += "<image>\n";
    out += m.content + " ";
  }
  return out + "ASSISTANT:";
}

std::string expand_image_markers(const std::string& text, const VlmConfig& config,
                                 const std::vector<ProcessedImage>& images) {
  static const std::string kMarker = "<image>";
  std::vector<std::string> pieces;
  size_t start = 0;
  for (size_t pos; (pos = text.find(kMarker, start)) != std::string::npos;
       start = pos + kMarker.size()) {
    pieces.push_back(text.substr(start, pos - start));
  }
  pieces.push_back(text.substr(start));
  TESSERA_CHECK(pieces.size() - 1 == images.size(), InvalidArgument, "the prompt has ",
                pieces.size() - 1, " <image> markers but ", images.size(), " images were given");
  const int64_t n = config.image_seq_len();
  std::string tokens;
  for (int64_t i = 0; i < n; ++i) tokens += kMarker;
  std::string out = pieces[0];
  for (size_t i = 0; i < images.size(); ++i) {
    if (config.layout == VlmLayout::kLlava) {
      out += tokens;
    } else {
      const ProcessedImage& img = images[i];
      for (int64_t r = 0; r < img.rows; ++r) {
        for (int64_t c = 0; c < img.cols; ++c) {
          out += "<fake_token_around_image><row_" + std::to_string(r + 1) + "_col_" +
                 std::to_string(c + 1) + ">" + tokens;
        }
        out += "\n";
      }
      if (img.rows > 0) out += "\n";
      out += "<fake_token_around_image><global-img>" + tokens + "<fake_token_around_image>";
    }
    out += pieces[i + 1];
  }
  return out;
}

VlmInput LoadedVlm::prepare(const std::vector<VlmMessage>& messages,
                            const std::vector<Image>& images) const {
  int64_t count = 0;
  for (const VlmMessage& m : messages) count += m.images;
  TESSERA_CHECK(count == static_cast<int64_t>(images.size()), InvalidArgument,
                "the messages carry ", count, " images but ", images.size(), " were given");
  std::vector<ProcessedImage> processed;
  std::vector<at::Tensor> pixels;
  for (const Image& image : images) {
    processed.push_back(preprocess_image(image, processor));
    pixels.push_back(processed.back().pixel_values);
  }
  const std::string text = expand_image_markers(format_vlm_chat(model->config().layout, messages),
                                                model->config(), processed);
  VlmInput input;
  for (int32_t id : tokenizer.encode(text, /*parse_special=*/true)) input.ids.push_back(id);
  if (!pixels.empty()) input.pixel_values = at::cat(pixels, 0);
  return input;
}

std::vector<int64_t> LoadedVlm::stop_tokens() const {
  std::vector<int64_t> out;
  if (model->config().layout == VlmLayout::kIdefics3) {
    for (const AddedToken& t : tokenizer.added_tokens()) {
      if (t.content == "<end_of_utterance>") out.push_back(t.id);
    }
  }
  if (tokenizer.eos_id()) out.push_back(*tokenizer.eos_id());
  for (int64_t id : model->config().text.eos_token_ids) out.push_back(id);
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

LoadedVlm load_vlm_folder(const std::string& dir) {
  const fs::path root(dir);
  LoadedVlm loaded{std::make_unique<VisionLanguageModel>(load_vlm(dir)),
                   Tokenizer::from_tokenizer_json((root / "tokenizer.json").string()),
                   ImageProcessorConfig::load((root / "preprocessor_config.json").string())};
  TESSERA_CHECK(loaded.tokenizer.vocab_size() <= loaded.model->config().text.vocab_size,
                InvalidArgument, dir, ": tokenizer.json has ", loaded.tokenizer.vocab_size(),
                " tokens, more than the ", loaded.model->config().text.vocab_size,
                " rows of the embedding table");
  if (loaded.model->config().layout == VlmLayout::kIdefics3) {
    for (const char* token : {"<image>", "<fake_token_around_image>", "<global-img>"}) {
      int32_t id = -1;
      try {
        id = loaded.tokenizer.token_to_id(token);
      } catch (const NotFound&) {
        TESSERA_THROW(InvalidArgument, dir, ": tokenizer.json lacks the token '", token,
                      "' that SmolVLM prompts use");
      }
      if (std::string(token) == "<image>") {
        TESSERA_CHECK(id == loaded.model->config().image_token_id, InvalidArgument, dir,
                      ": tokenizer.json gives <image> id ", id,
                      " but config.json's image_token_id is ",
                      loaded.model->config().image_token_id);
      }
    }
  }
  return loaded;
}

}  // namespace tessera::nn
