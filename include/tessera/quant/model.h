// tessera/quant/model.h — a whole model's linear layers packed to int4.
//
//   auto model = tessera::nn::load_hf_model(dir);
//   auto packed = tessera::quant::QuantizedModel::pack(model, {.group_size = 64});
//   model.set_linear_override(packed);    // the model now runs packed weights
//   packed->set_mode(tessera::quant::Mode::kW4A4);
//   packed->save("model.q4.safetensors");  // weights, codes and config in one file
//
// The mode is one field: switching it between forwards switches every
// layer, over the same packed weights (what QSPEC's draft and verify steps
// do).
//
// Thread safety: linear() may run concurrently; the mode is one atomic
// field, so changing it while forwards run changes the mode of the layers
// they have not reached yet (set it between forwards).
#pragma once

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "tessera/nn/model.h"
#include "tessera/quant/quant.h"

namespace tessera::quant {

class QuantizedModel final : public nn::LinearOverride {
 public:
  // Packs every linear layer of a single-rank model: attention and MLP
  // projections, MoE experts and the output projection ("lm_head", tied or
  // not). Embeddings, norms, routers and shared-expert layers stay in
  // floating point. InvalidArgument naming the layer whose input size the
  // group size does not divide.
  static std::shared_ptr<QuantizedModel> pack(const nn::Transformer& model,
                                              const QuantConfig& config = {});

  // The same, with outlier smoothing (SmoothQuant): the model first runs
  // `calibration` (token sequences) in fp32 recording each packed layer's
  // largest |input| per channel; each layer then packs W diag(m) and divides
  // its inputs by m at run time, m_j = max|x_j|^alpha / max|W_:j|^(1-alpha).
  // The product is unchanged in exact arithmetic; activation outliers move
  // into the weights, which the integer modes quantize better. Every mode
  // (W4A16 included) runs the smoothed weights.
  static std::shared_ptr<QuantizedModel> pack(nn::Transformer& model, const QuantConfig& config,
                                              const std::vector<std::vector<int64_t>>& calibration,
                                              double alpha = 0.5);

  void set_mode(Mode mode) { mode_.store(mode); }
  Mode mode() const { return mode_.load(); }
  void set_isa(Isa isa);  // InvalidArgument if this CPU cannot run it
  Isa isa() const { return isa_; }

  at::Tensor linear(const std::string& name, const at::Tensor& x) override;
  // Layers that share their input run as one product over their packed
  // weights stacked by output (built on first use, kept per name list):
  // each output row is computed by the same kernel operations as in
  // linear(), so the results are bit-identical. Layers with smoothing, or
  // with differing widths or group settings, run one by one.
  std::vector<at::Tensor> linear_group(const std::vector<std::string>& names,
                                       const at::Tensor& x) override;

  // Moves every packed weight to `device` (CUDA models run kernels/quant).
  void to(const at::Device& device);

  const QuantConfig& config() const { return config_; }
  const std::map<std::string, QuantizedWeight>& weights() const { return weights_; }
  // Per packed layer with smoothing: 1 / m per input channel (else absent).
  const std::map<std::string, at::Tensor>& smoothing() const { return smooth_; }
  const QuantizedWeight& weight(const std::string& name) const;  // NotFound
  int64_t bytes() const;                                         // packed bytes of all layers

  // One safetensors file: every packed layer ("<name>.codes", ".scales",
  // ".zeros"), the model's floating-point parameters that are not packed,
  // and in the metadata the model config and the quantization settings.
  // Written atomically.
  void save(const std::string& path, const nn::Transformer& model) const;

  // Reads a file written by save(): returns the model (packed layers hold
  // their dequantized weights, so kFloat mode still works) with the packed
  // weights installed as its override. InvalidArgument for a file that is
  // not a packed model or has an unknown format version; DataLoss for a
  // truncated one (from the safetensors reader).
  struct Loaded {
    nn::Transformer model;
    std::shared_ptr<QuantizedModel> packed;
  };
  static Loaded load(const std::string& path);

 private:
  // Packs every linear layer; with per-layer input maxima (`amax`), smooths
  // each layer that has them first.
  static std::shared_ptr<QuantizedModel> pack_layers(const nn::Transformer& model,
                                                     const QuantConfig& config,
                                                     const std::map<std::string, at::Tensor>* amax,
                                                     double alpha);

  QuantConfig config_;
  std::map<std::string, QuantizedWeight> weights_;
  std::map<std::string, at::Tensor> smooth_;
  // linear_group()'s stacked weights by joined names; a null entry: the
  // group cannot be stacked. Guarded by fused_mu_.
  std::mutex fused_mu_;
  std::map<std::string, std::shared_ptr<const QuantizedWeight>> fused_;
  std::atomic<Mode> mode_{Mode::kW4A16};
  Isa isa_ = best_isa();
};

// Sets a model's packed mode for one scope, restoring the previous one.
class ScopedMode {
 public:
  ScopedMode(QuantizedModel& model, Mode mode) : model_(model), previous_(model.mode()) {
    model_.set_mode(mode);
  }
  ~ScopedMode() { model_.set_mode(previous_); }
  ScopedMode(const ScopedMode&) = delete;
  ScopedMode& operator=(const ScopedMode&) = delete;

 private:
  QuantizedModel& model_;
  Mode previous_;
};

}  // namespace tessera::quant
