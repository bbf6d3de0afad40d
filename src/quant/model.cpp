#include "tessera/quant/model.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>  // at::NoGradGuard (not in ATen.h since LibTorch 2.x)

#include "tessera/core/error.h"
#include "tessera/formats/safetensors.h"

namespace tessera::quant {

namespace {

constexpr const char* kFormat = "tessera-quant";
constexpr const char* kVersion = "1";

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// The linear layer a parameter belongs to ("" if it is not packed).
std::string packed_layer_of(const std::string& param, const nn::ModelConfig& c) {
  if (param == "lm_head.weight") return "lm_head";
  if (param == "model.embed_tokens.weight") return "";
  if (!ends_with(param, ".weight") || param.find("norm") != std::string::npos) return "";
  // Routers and the shared expert stay in floating point.
  if (ends_with(param, ".gate.weight") || param.find("shared_expert") != std::string::npos)
    return "";
  return param.substr(0, param.size() - 7);
}

}  // namespace

std::shared_ptr<QuantizedModel> QuantizedModel::pack(const nn::Transformer& model,
                                                     const QuantConfig& config) {
  return pack_layers(model, config, nullptr, 0.0);
}

std::shared_ptr<QuantizedModel> QuantizedModel::pack_layers(
    const nn::Transformer& model, const QuantConfig& config,
    const std::map<std::string, at::Tensor>* amax, double alpha) {
  TESSERA_CHECK(model.groups().tp_size() == 1 && model.groups().ep_size() == 1, InvalidArgument,
                "QuantizedModel::pack: single-rank models only (tp = ep = 1)");
  const nn::ModelConfig& c = model.config();
  // Resolve an automatic group size over every layer that will be packed.
  std::vector<int64_t> widths;
  for (const auto& [name, param] : model.named_parameters()) {
    const bool packed = !packed_layer_of(name, c).empty() ||
                        (name == "model.embed_tokens.weight" && c.tie_word_embeddings);
    if (packed && param.dim() == 2) widths.push_back(param.size(1));
  }
  const QuantConfig resolved = resolve_group_size(config, widths);
  auto q = std::make_shared<QuantizedModel>();
  q->config_ = resolved;
  auto pack_one = [&](const std::string& layer, const at::Tensor& param) {
    try {
      const at::Tensor* stats = nullptr;
      if (amax) {
        auto it = amax->find(layer);
        if (it != amax->end()) stats = &it->second;
      }
      if (!stats) {  // no smoothing (or a layer that never ran)
        q->weights_.emplace(layer, quantize(param, resolved));
        return;
      }
      at::Tensor w = param.detach().to(at::kFloat);
      at::Tensor xmax = stats->clamp_min(1e-5);
      at::Tensor wmax = w.abs().amax(0).clamp_min(1e-5);
      at::Tensor m = (xmax.pow(alpha) / wmax.pow(1.0 - alpha)).clamp(1e-2, 1e2);
      q->weights_.emplace(layer, quantize(w * m.unsqueeze(0), resolved));
      q->smooth_.emplace(layer, (1.0 / m).contiguous());
    } catch (const Error& e) {
      TESSERA_THROW(InvalidArgument, "QuantizedModel::pack: layer '", layer, "': ", e.what());
    }
  };
  for (const auto& [name, param] : model.named_parameters()) {
    if (name == "model.embed_tokens.weight" && c.tie_word_embeddings) pack_one("lm_head", param);
    const std::string layer = packed_layer_of(name, c);
    if (!layer.empty() && param.dim() == 2) pack_one(layer, param);
  }
  return q;
}

namespace {

// Records each linear layer's largest |input| per channel; the model keeps
// using its own weights.
class InputRecorder final : public nn::LinearOverride {
 public:
  at::Tensor linear(const std::string& name, const at::Tensor& x) override {
    at::Tensor m = x.detach().abs().reshape({-1, x.size(-1)}).amax(0).to(at::kFloat);
    auto it = amax.find(name);
    if (it == amax.end()) {
      amax.emplace(name, m);
    } else {
      it->second = at::maximum(it->second, m);
    }
    return {};
  }
  std::map<std::string, at::Tensor> amax;
};

}  // namespace

std::shared_ptr<QuantizedModel> QuantizedModel::pack(
    nn::Transformer& model, const QuantConfig& config,
    const std::vector<std::vector<int64_t>>& calibration, double alpha) {
  TESSERA_CHECK(!calibration.empty(), InvalidArgument,
                "QuantizedModel::pack: smoothing needs calibration sequences");
  TESSERA_CHECK(alpha >= 0 && alpha <= 1, InvalidArgument,
                "QuantizedModel::pack: smoothing alpha must be in [0, 1], got ", alpha);
  auto recorder = std::make_shared<InputRecorder>();
  auto previous = model.linear_override();
  model.set_linear_override(recorder);
  try {
    at::NoGradGuard no_grad;
    for (size_t i = 0; i < calibration.size(); ++i) {
      TESSERA_CHECK(!calibration[i].empty(), InvalidArgument,
                    "QuantizedModel::pack: calibration sequence ", i, " is empty");
      model.forward(at::tensor(calibration[i], at::kLong).view({1, -1}));
    }
  } catch (...) {
    model.set_linear_override(previous);
    throw;
  }
  model.set_linear_override(previous);

  return pack_layers(model, config, &recorder->amax, alpha);
}

void QuantizedModel::set_isa(Isa isa) {
  TESSERA_CHECK(isa_supported(isa), InvalidArgument, "QuantizedModel: this CPU cannot run the ",
                isa_name(isa), " kernels");
  isa_ = isa;
}

at::Tensor QuantizedModel::linear(const std::string& name, const at::Tensor& x) {
  return translate_errors(
      "QuantizedModel::linear",
      [&]() -> at::Tensor {
        const Mode m = mode();
        if (m == Mode::kFloat) return {};  // the model's own weights
        auto it = weights_.find(name);
        if (it == weights_.end()) return {};
        auto sm = smooth_.find(name);
        if (sm == smooth_.end()) return quant::linear(x, it->second, m, isa_);
        // QuantizedModel::to() moves the smoothing with the weights; this .to()
        // only converts the dtype when x is not fp32.
        return quant::linear(x * sm->second.to(x.scalar_type()), it->second, m, isa_);
      },
      ErrorCode::kInvalidArgument);
}

std::vector<at::Tensor> QuantizedModel::linear_group(const std::vector<std::string>& names,
                                                     const at::Tensor& x) {
  return translate_errors(
      "QuantizedModel::linear_group",
      [&]() -> std::vector<at::Tensor> {
        const Mode m = mode();
        if (m == Mode::kFloat) return std::vector<at::Tensor>(names.size());
        std::string key;
        for (const auto& n : names) key += n + "|";
        std::shared_ptr<const QuantizedWeight> fused;
        {
          std::lock_guard<std::mutex> lock(fused_mu_);
          auto it = fused_.find(key);
          if (it == fused_.end()) {
            // Stackable: every layer packed, unsmoothed, same width, group
            // settings and device.
            std::vector<const QuantizedWeight*> parts;
            for (const auto& n : names) {
              auto w = weights_.find(n);
              if (w == weights_.end() || smooth_.count(n)) {
                parts.clear();
                break;
              }
              parts.push_back(&w->second);
            }
            bool same = names.size() > 1 && parts.size() == names.size();
            for (size_t i = 1; same && i < parts.size(); ++i) {
              const QuantizedWeight& a = *parts[0];
              const QuantizedWeight& b = *parts[i];
              same = a.in_features == b.in_features && a.config.group_size == b.config.group_size &&
                     a.config.rotate == b.config.rotate && a.codes.device() == b.codes.device();
            }
            std::shared_ptr<const QuantizedWeight> made;
            if (same) {
              auto w = std::make_shared<QuantizedWeight>(*parts[0]);
              std::vector<at::Tensor> codes, scales, zeros;
              w->out_features = 0;
              for (const QuantizedWeight* p : parts) {
                codes.push_back(p->codes);
                scales.push_back(p->scales);
                zeros.push_back(p->zeros);
                w->out_features += p->out_features;
              }
              w->codes = at::cat(codes, 0).contiguous();
              w->scales = at::cat(scales, 0).contiguous();
              w->zeros = at::cat(zeros, 0).contiguous();
              made = w;
            }
            it = fused_.emplace(key, made).first;
          }
          fused = it->second;
        }
        std::vector<at::Tensor> out;
        if (!fused) {
          for (const auto& n : names) out.push_back(linear(n, x));
          return out;
        }
        at::Tensor y = quant::linear(x, *fused, m, isa_);
        int64_t offset = 0;
        for (const auto& n : names) {
          const int64_t width = weights_.at(n).out_features;
          out.push_back(y.narrow(-1, offset, width));
          offset += width;
        }
        return out;
      },
      ErrorCode::kInvalidArgument);
}

void QuantizedModel::to(const at::Device& device) {
  {
    std::lock_guard<std::mutex> lock(fused_mu_);
    fused_.clear();
  }
  for (auto& [name, w] : weights_) w = w.to(device);
  for (auto& [name, s] : smooth_) s = s.to(device);
}

const QuantizedWeight& QuantizedModel::weight(const std::string& name) const {
  auto it = weights_.find(name);
  TESSERA_CHECK(it != weights_.end(), NotFound, "QuantizedModel: no packed layer '", name, "'");
  return it->second;
}

int64_t QuantizedModel::bytes() const {
  int64_t total = 0;
  for (const auto& [name, w] : weights_) total += w.bytes();
  return total;
}

void QuantizedModel::save(const std::string& path, const nn::Transformer& model) const {
  nn::NamedTensors tensors;
  for (const auto& [name, w] : weights_) {
    tensors.emplace_back(name + ".codes", w.codes);
    tensors.emplace_back(name + ".scales", w.scales);
    tensors.emplace_back(name + ".zeros", w.zeros);
    auto sm = smooth_.find(name);
    if (sm != smooth_.end()) tensors.emplace_back(name + ".smooth", sm->second);
  }
  for (const auto& [name, param] : model.named_parameters()) {
    const std::string layer = packed_layer_of(name, model.config());
    if (!layer.empty() && weights_.count(layer)) continue;
    tensors.emplace_back(name, param);
  }
  nn::save_safetensors(path, tensors,
                       {{"format", kFormat},
                        {"version", kVersion},
                        {"group_size", std::to_string(config_.group_size)},
                        {"symmetric", config_.symmetric ? "true" : "false"},
                        {"rotate", config_.rotate ? "true" : "false"},
                        {"model_config", model.config().to_json()}});
}

QuantizedModel::Loaded QuantizedModel::load(const std::string& path) {
  nn::SafetensorsFile file = nn::SafetensorsFile::open(path);
  const auto& meta = file.metadata();
  auto field = [&](const char* key) -> const std::string& {
    auto it = meta.find(key);
    TESSERA_CHECK(it != meta.end(), InvalidArgument, "'", path,
                  "' is not a packed Tessera model (no '", key, "' in its metadata)");
    return it->second;
  };
  TESSERA_CHECK(field("format") == kFormat, InvalidArgument, "'", path,
                "' is not a packed Tessera model (format '", field("format"), "')");
  TESSERA_CHECK(field("version") == kVersion, InvalidArgument, "'", path,
                "': packed model format version ", field("version"),
                " is not supported (this build reads version ", kVersion, ")");
  QuantConfig qc;
  qc.group_size = std::stoll(field("group_size"));
  qc.symmetric = field("symmetric") == "true";
  qc.rotate = meta.count("rotate") && meta.at("rotate") == "true";
  nn::ModelConfig config = nn::ModelConfig::parse(field("model_config"), path);
  Loaded out{nn::Transformer(config), std::make_shared<QuantizedModel>()};
  out.packed->config_ = qc;
  for (const std::string& name : out.model.full_parameter_names()) {
    const std::string layer = packed_layer_of(name, config);
    if (!layer.empty() && file.contains(layer + ".codes")) continue;
    TESSERA_CHECK(file.contains(name), InvalidArgument, "'", path, "' lacks parameter '", name,
                  "'");
    out.model.load_full(name, file.get(name));
  }
  for (const auto& info : file.tensors()) {
    if (!ends_with(info.name, ".codes")) continue;  // .scales, .zeros, .smooth follow their codes
    const std::string layer = info.name.substr(0, info.name.size() - 6);
    QuantizedWeight w;
    w.config = qc;
    w.codes = file.get(layer + ".codes").contiguous();
    w.scales = file.get(layer + ".scales").to(at::kFloat).contiguous();
    w.zeros = file.get(layer + ".zeros").contiguous();
    TESSERA_CHECK(w.codes.dim() == 2 && w.codes.scalar_type() == at::kByte &&
                      w.zeros.scalar_type() == at::kByte,
                  InvalidArgument, "'", path, "': layer '", layer, "' has malformed codes");
    w.out_features = w.codes.size(0);
    w.in_features = w.codes.size(1) * 2;
    TESSERA_CHECK(w.in_features % qc.group_size == 0 && w.scales.sizes() == w.zeros.sizes() &&
                      w.scales.dim() == 2 && w.scales.size(0) == w.out_features &&
                      w.scales.size(1) == w.in_features / qc.group_size,
                  InvalidArgument, "'", path, "': layer '", layer, "': codes ", w.codes.sizes(),
                  ", scales ", w.scales.sizes(), " and zeros ", w.zeros.sizes(),
                  " disagree with group size ", qc.group_size);
    at::Tensor smooth;
    if (file.contains(layer + ".smooth")) {
      smooth = file.get(layer + ".smooth").to(at::kFloat).contiguous();
      TESSERA_CHECK(smooth.dim() == 1 && smooth.size(0) == w.in_features, InvalidArgument, "'",
                    path, "': layer '", layer, "': smoothing of ", smooth.sizes(), " for ",
                    w.in_features, " inputs");
    }
    const std::string param = layer == "lm_head" && config.tie_word_embeddings
                                  ? "model.embed_tokens.weight"
                                  : layer + ".weight";
    if (!(layer == "lm_head" && config.tie_word_embeddings)) {
      TESSERA_CHECK(out.model.has_parameter(param), InvalidArgument, "'", path, "': packed layer '",
                    layer, "' is not part of the model");
      at::Tensor full = dequantize(w);
      if (smooth.defined()) full = full * smooth.unsqueeze(0);  // undo W diag(m)
      out.model.load_full(param, full);
    }
    if (smooth.defined()) out.packed->smooth_.emplace(layer, smooth);
    out.packed->weights_.emplace(layer, std::move(w));
  }
  out.model.set_linear_override(out.packed);
  return out;
}

}  // namespace tessera::quant
