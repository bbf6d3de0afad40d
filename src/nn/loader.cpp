#include "tessera/nn/loader.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <filesystem>

#include "tessera/core/error.h"
#include "tessera/core/file_io.h"
#include "tessera/core/tensor.h"
#include "tessera/dist/redistribute.h"
#include "tessera/formats/hf.h"
#include "tessera/formats/safetensors.h"

namespace fs = std::filesystem;

namespace tessera::nn {

void load_weights(Transformer& model, const WeightMap& weights, const std::string& source) {
  for (const auto& name : model.full_parameter_names()) {
    auto it = weights.find(name);
    TESSERA_CHECK(it != weights.end(), NotFound, source, ": tensor '", name,
                  "' is missing (the config needs it)");
    model.load_full(name, it->second);
  }
}

Transformer load_hf_model(const std::string& dir, ParallelGroups groups, at::ScalarType dtype) {
  const fs::path root(dir);
  TESSERA_CHECK(fs::is_directory(root), NotFound, "model folder '", dir, "' does not exist");
  ModelConfig config = ModelConfig::load((root / "config.json").string());
  auto folder = SafetensorsFolder::open(dir);
  Transformer model(config, groups, dtype);
  at::NoGradGuard no_grad;
  for (const auto& name : model.full_parameter_names()) {
    auto shape = model.full_shape(name);
    TESSERA_CHECK(folder.contains(name), NotFound, dir, ": tensor '", name,
                  "' is missing from the checkpoint");
    at::Tensor t = folder.get(name);
    TESSERA_CHECK(t.sizes() == at::IntArrayRef(shape), InvalidArgument, folder.file_of(name),
                  ": tensor '", name, "' has shape ", shape_string(t.sizes()),
                  " but config.json implies ", shape_string(shape));
    TESSERA_CHECK(at::isFloatingType(t.scalar_type()), InvalidArgument, folder.file_of(name),
                  ": tensor '", name, "' has dtype ", dtype_name(t.scalar_type()),
                  ", expected a floating-point type");
    model.load_full(name, t);
  }
  return model;
}

WeightMap gather_full_weights(Transformer& model,
                              const std::shared_ptr<dist::ProcessGroup>& replica) {
  at::NoGradGuard no_grad;
  WeightMap out;
  const int world = replica ? replica->size() : 1;
  for (const auto& name : model.full_parameter_names()) {
    dist::Layout layout = model.layout_of(name);
    const int me = model.replica_rank();
    at::ScalarType dtype = model.named_parameters().front().second.scalar_type();
    at::Tensor local = model.has_parameter(name)
                           ? model.parameter(name).detach()
                           : at::empty(layout.local_shape(me), at::TensorOptions().dtype(dtype));
    if (world == 1) {
      out[name] = local.clone();
      continue;
    }
    TESSERA_CHECK(layout.world_size() == world, InvalidArgument, "gather_full_weights: group of ",
                  world, " ranks for a model replica of ", layout.world_size());
    out[name] = dist::redistribute(*replica, local, layout,
                                   dist::Layout::replicated(layout.global_shape(), world));
  }
  return out;
}

WeightMap write_random_model(const std::string& dir, const ModelConfig& config, uint64_t seed,
                             int64_t max_shard_bytes) {
  Transformer model(config);
  model.init_random(seed);
  WeightMap weights = gather_full_weights(model);
  save_hf_model(dir, config, weights, max_shard_bytes);
  return weights;
}

LoadedModel load_gguf_model(const std::string& path, ParallelGroups groups) {
  GgufModel g = read_gguf_model(path);
  auto model = std::make_unique<Transformer>(g.config, std::move(groups));
  load_weights(*model, g.weights, path);
  return LoadedModel{std::move(model), Tokenizer::from_spec(std::move(g.tokenizer)),
                     std::move(g.chat_template)};
}

}  // namespace tessera::nn
