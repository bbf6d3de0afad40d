#include "tessera/lora/lora.h"

#ifdef TESSERA_LORA_CUDA
#include "bgmv_cuda.h"
#endif

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>
#include <sstream>

#include "tessera/core/config.h"
#include "tessera/core/error.h"
#include "tessera/core/file_io.h"
#include "tessera/core/tensor.h"
#include "tessera/formats/safetensors.h"

namespace fs = std::filesystem;

namespace tessera::lora {
namespace {

bool matches(const std::string& module, const std::string& pattern) {
  if (pattern == "all-linear") return true;
  return module == pattern ||
         (module.size() > pattern.size() &&
          module.compare(module.size() - pattern.size(), pattern.size(), pattern) == 0 &&
          module[module.size() - pattern.size() - 1] == '.');
}

// Kaiming-uniform with a = sqrt(5), PyTorch's nn.Linear default and PEFT's
// LoRA A initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
at::Tensor kaiming(int64_t rows, int64_t fan_in, at::Generator& gen) {
  double bound = 1.0 / std::sqrt(static_cast<double>(fan_in));
  return at::empty({rows, fan_in}).uniform_(-bound, bound, gen);
}

}  // namespace

std::vector<TargetModule> find_targets(const nn::Transformer& model,
                                       const std::vector<std::string>& patterns) {
  TESSERA_CHECK(!patterns.empty(), InvalidArgument, "adapter: no target_modules given");
  std::vector<TargetModule> out;
  const std::string suffix = ".weight";
  for (const auto& name : model.full_parameter_names()) {
    if (name.size() <= suffix.size() ||
        name.compare(name.size() - suffix.size(), suffix.size(), suffix))
      continue;
    std::string module = name.substr(0, name.size() - suffix.size());
    // Linear layers only: 2-D weights that are not embeddings, the LM head
    // or routers.
    auto shape = model.full_shape(name);
    if (shape.size() != 2 || module == "model.embed_tokens" || module == "lm_head" ||
        (module.size() >= 5 && module.compare(module.size() - 5, 5, ".gate") == 0) ||
        module.find("shared_expert_gate") != std::string::npos) {
      continue;
    }
    for (const auto& p : patterns) {
      if (matches(module, p)) {
        out.push_back({module, shape[1], shape[0]});
        break;
      }
    }
  }
  std::string list;
  for (const auto& p : patterns) list += (list.empty() ? "" : ", ") + p;
  TESSERA_CHECK(!out.empty(), InvalidArgument, "adapter: target_modules [", list,
                "] match no linear layer of this ", model.config().model_type, " model");
  return out;
}

MosConfig MosConfig::all_off(const LoraConfig& lora) {
  MosConfig c;
  c.rank = lora.rank;
  c.alpha = lora.alpha;
  c.dropout = lora.dropout;
  c.target_modules = lora.target_modules;
  c.public_fraction = 1.0;
  c.private_shards = 0;
  c.pair_dissociation = false;
  c.vector_sharding = false;
  c.subset_selection = false;
  c.privatization = false;
  c.rank_scaling = false;
  return c;
}

std::string ParameterReport::summary() const {
  std::ostringstream out;
  out << trainable << " trainable (" << stored << " stored), LoRA-equivalent rank "
      << equivalent_rank;
  return out.str();
}

// ---------------------------------------------------------------------------
// Adapter

Adapter::~Adapter() = default;

void Adapter::set_targets(std::vector<TargetModule> targets) {
  targets_ = std::move(targets);
  for (size_t i = 0; i < targets_.size(); ++i) target_index_[targets_[i].name] = i;
}

bool Adapter::adapts(const std::string& module) const { return target_index_.count(module) > 0; }

std::vector<at::Tensor> Adapter::trainable() {
  std::vector<at::Tensor> out;
  for (auto& [name, t] : named_trainable()) out.push_back(t);
  return out;
}

at::Tensor Adapter::apply(const std::string& name, const at::Tensor& x, const at::Tensor& y,
                          const nn::AdapterContext& context) {
  return translate_errors(
      "lora Adapter::apply",
      [&]() -> at::Tensor {
        if (!adapts(name)) return y;
        at::Tensor in = dropout_ > 0 && training_ ? at::dropout(x, dropout_, true) : x;
        if (context.token_adapters.defined()) {
          // Rows of a flattened input, each with its own choice (paged and
          // batch-invariant forwards): rows whose id is negative get nothing.
          const int64_t rows = context.token_adapters.numel();
          TESSERA_CHECK(x.numel() == rows * x.size(-1), InvalidArgument, "adapter on '", name,
                        "': ", rows, " token adapter ids for input ", shape_string(x.sizes()));
          at::Tensor x2 = in.reshape({rows, x.size(-1)});
          at::Tensor delta = context.batch_invariant
                                 ? nn::linear_invariant(nn::linear_invariant(x2, a(name).detach()),
                                                        b(name).detach())
                                 : at::matmul(at::matmul(x2, a(name).t()), b(name).t());
          delta = delta * scale();
          at::Tensor on = (context.token_adapters.view({rows, 1}) >= 0).to(delta.scalar_type());
          return y + (delta * on).to(y.scalar_type()).view(y.sizes());
        }
        at::Tensor delta = at::matmul(at::matmul(in, a(name).t()), b(name).t()) * scale();
        if (context.sequence_adapters.defined()) {
          // As a lone adapter: sequences that asked for none get nothing.
          TESSERA_CHECK(x.dim() == 3 && x.size(0) == context.sequence_adapters.size(0),
                        InvalidArgument, "adapter on '", name,
                        "': per-sequence adapter ids need [batch, tokens, features] input");
          at::Tensor on = (context.sequence_adapters >= 0).to(delta.scalar_type()).view({-1, 1, 1});
          delta = delta * on;
        }
        return y + delta.to(y.scalar_type());
      },
      ErrorCode::kInvalidArgument);
}

// ---------------------------------------------------------------------------
// LoRA

namespace {

class LoraAdapter : public Adapter {
 public:
  LoraAdapter(std::vector<TargetModule> targets, int64_t rank, double alpha, double dropout,
              bool rslora)
      : rank_(rank), alpha_(alpha), rslora_(rslora) {
    TESSERA_CHECK(rank >= 1, InvalidArgument, "LoRA: rank must be >= 1, got ", rank);
    set_targets(std::move(targets));
    dropout_ = dropout;
    for (const auto& t : targets_) {
      a_.push_back(at::zeros({rank, t.in}).requires_grad_(true));
      b_.push_back(at::zeros({t.out, rank}).requires_grad_(true));
    }
  }

  std::string kind() const override { return "lora"; }
  int64_t rank() const override { return rank_; }
  double alpha() const { return alpha_; }
  bool rslora() const { return rslora_; }
  double scale() const override {
    return rslora_ ? alpha_ / std::sqrt(static_cast<double>(rank_))
                   : alpha_ / static_cast<double>(rank_);
  }
  at::Tensor a(const std::string& module) override { return a_[index(module)]; }
  at::Tensor b(const std::string& module) override { return b_[index(module)]; }
  at::Tensor& a_param(size_t i) { return a_[i]; }
  at::Tensor& b_param(size_t i) { return b_[i]; }

  std::vector<std::pair<std::string, at::Tensor>> named_trainable() override {
    std::vector<std::pair<std::string, at::Tensor>> out;
    for (size_t i = 0; i < targets_.size(); ++i) {
      out.push_back({targets_[i].name + ".lora_A.weight", a_[i]});
      out.push_back({targets_[i].name + ".lora_B.weight", b_[i]});
    }
    return out;
  }

  ParameterReport report() override {
    ParameterReport r;
    for (const auto& t : targets_) r.lora_equivalent += rank_ * (t.in + t.out);
    r.trainable = r.stored = r.lora_equivalent;
    r.equivalent_rank = static_cast<double>(rank_);
    return r;
  }

 private:
  size_t index(const std::string& module) const {
    auto it = target_index_.find(module);
    TESSERA_CHECK(it != target_index_.end(), NotFound, "LoRA adapter has no module '", module, "'");
    return it->second;
  }
  int64_t rank_;
  double alpha_;
  bool rslora_;
  std::vector<at::Tensor> a_, b_;
};

// ---------------------------------------------------------------------------
// MoS

class MosAdapter : public Adapter {
 public:
  MosAdapter(const nn::Transformer& model, const MosConfig& c) : config_(c) {
    TESSERA_CHECK(c.rank >= 1, InvalidArgument, "MoS: rank must be >= 1");
    TESSERA_CHECK(c.public_fraction > 0, InvalidArgument, "MoS: public_fraction must be positive");
    set_targets(find_targets(model, c.target_modules));
    dropout_ = c.dropout;
    const int64_t hidden = model.config().hidden_size;
    if (c.vector_sharding) {
      TESSERA_CHECK(c.shards_per_vector >= 1 && hidden % c.shards_per_vector == 0, InvalidArgument,
                    "MoS: hidden size ", hidden, " does not split into ", c.shards_per_vector,
                    " shards");
      shard_ = hidden / c.shards_per_vector;
      for (const auto& t : targets_) {
        TESSERA_CHECK(t.in % shard_ == 0 && t.out % shard_ == 0, InvalidArgument, "MoS: module '",
                      t.name, "' (", t.in, " -> ", t.out,
                      ") is not a multiple of the shard length ", shard_);
      }
    }
    build(model);
  }

  std::string kind() const override { return "mos"; }
  int64_t rank() const override { return config_.rank; }
  double scale() const override { return config_.alpha / static_cast<double>(config_.rank); }
  const MosConfig& config() const { return config_; }

  at::Tensor a(const std::string& module) override { return gather(module, true); }
  at::Tensor b(const std::string& module) override { return gather(module, false); }

  std::vector<std::pair<std::string, at::Tensor>> named_trainable() override {
    std::vector<std::pair<std::string, at::Tensor>> out;
    for (auto& [len, pool] : pool_a_) out.push_back({"mos.pool_a." + std::to_string(len), pool});
    for (auto& [len, pool] : pool_b_) out.push_back({"mos.pool_b." + std::to_string(len), pool});
    for (size_t i = 0; i < targets_.size(); ++i) {
      const auto& m = modules_[i];
      if (m.private_a.defined()) out.push_back({targets_[i].name + ".mos_private_A", m.private_a});
      if (m.private_b.defined()) out.push_back({targets_[i].name + ".mos_private_B", m.private_b});
      if (m.scaling.defined()) out.push_back({targets_[i].name + ".mos_scaling", m.scaling});
    }
    return out;
  }

  // Index tables (frozen, int64), for saving.
  std::vector<std::pair<std::string, at::Tensor>> named_indices() const {
    std::vector<std::pair<std::string, at::Tensor>> out;
    for (size_t i = 0; i < targets_.size(); ++i) {
      out.push_back({targets_[i].name + ".mos_index_A", modules_[i].index_a});
      out.push_back({targets_[i].name + ".mos_index_B", modules_[i].index_b});
    }
    return out;
  }

  // Replaces trainable tensors and index tables by name (loading).
  void assign(const std::string& name, const at::Tensor& value) {
    at::NoGradGuard no_grad;
    for (auto& [n, t] : named_trainable()) {
      if (n == name) {
        check_shape(value, t.sizes(), name);
        t.copy_(value);
        return;
      }
    }
    for (size_t i = 0; i < targets_.size(); ++i) {
      for (bool is_a : {true, false}) {
        if (name == targets_[i].name + (is_a ? ".mos_index_A" : ".mos_index_B")) {
          at::Tensor& idx = is_a ? modules_[i].index_a : modules_[i].index_b;
          check_shape(value, idx.sizes(), name);
          TESSERA_CHECK(value.min().item<int64_t>() >= 0 &&
                            value.max().item<int64_t>() < source_rows(i, is_a),
                        InvalidArgument, name, ": index outside its pool");
          idx = value.to(at::kLong).clone();
          return;
        }
      }
    }
    TESSERA_THROW(InvalidArgument, "MoS adapter has no tensor '", name, "'");
  }

  ParameterReport report() override {
    ParameterReport r;
    for (auto& [name, t] : named_trainable()) r.trainable += t.numel();
    r.stored = r.trainable;
    for (const auto& [name, t] : named_indices()) r.stored += t.numel();
    int64_t dims = 0;
    for (const auto& t : targets_) {
      r.lora_equivalent += config_.rank * (t.in + t.out);
      dims += t.in + t.out;
    }
    r.equivalent_rank = static_cast<double>(r.trainable) / static_cast<double>(dims);
    return r;
  }

 private:
  struct Module {
    int64_t shards_a = 0, shards_b = 0;  // shards per rank vector of A (width in) and B (width out)
    int64_t len_a = 0, len_b = 0;        // shard lengths
    at::Tensor index_a, index_b;         // [rank, shards] into Concat(pool, private)
    at::Tensor private_a, private_b;     // [private, len]
    at::Tensor scaling;                  // [rank]
  };

  // Rows of Concat(public pool, private shards) a module indexes.
  int64_t source_rows(size_t i, bool is_a) const {
    const Module& m = modules_[i];
    const at::Tensor& pool = is_a ? pool_a_.at(m.len_a) : pool_b_.at(m.len_b);
    const at::Tensor& priv = is_a ? m.private_a : m.private_b;
    return pool.size(0) + (priv.defined() ? priv.size(0) : 0);
  }

  void build(const nn::Transformer& model) {
    const MosConfig& c = config_;
    auto gen = at::make_generator<at::CPUGeneratorImpl>(c.seed);
    std::mt19937_64 rng(c.seed * 7919 + 13);
    modules_.resize(targets_.size());
    std::map<int64_t, int64_t> need_a, need_b;  // shard length -> shards drawn by all matrices
    for (size_t i = 0; i < targets_.size(); ++i) {
      Module& m = modules_[i];
      m.len_a = c.vector_sharding ? shard_ : targets_[i].in;
      m.len_b = c.vector_sharding ? shard_ : targets_[i].out;
      m.shards_a = targets_[i].in / m.len_a;
      m.shards_b = targets_[i].out / m.len_b;
      need_a[m.len_a] += c.rank * m.shards_a;
      need_b[m.len_b] += c.rank * m.shards_b;
    }
    // Public pools, one per shard length: A random as LoRA's A, B zero so
    // the adapter starts as the identity.
    for (auto [len, need] : need_a) {
      int64_t rows =
          std::max<int64_t>(1, static_cast<int64_t>(std::ceil(need * c.public_fraction)));
      pool_a_[len] = kaiming(rows, len * (c.vector_sharding ? c.shards_per_vector : 1), gen)
                         .narrow(1, 0, len)
                         .contiguous()
                         .requires_grad_(true);
    }
    for (auto [len, need] : need_b) {
      int64_t rows =
          std::max<int64_t>(1, static_cast<int64_t>(std::ceil(need * c.public_fraction)));
      pool_b_[len] = at::zeros({rows, len}).requires_grad_(true);
    }
    const int64_t priv = c.privatization ? c.private_shards : 0;
    std::map<int64_t, int64_t> next_a, next_b;  // contiguous cursors when subset selection is off
    for (size_t i = 0; i < targets_.size(); ++i) {
      Module& m = modules_[i];
      const int64_t pa = pool_a_[m.len_a].size(0), pb = pool_b_[m.len_b].size(0);
      if (priv > 0) {
        m.private_a = kaiming(priv, m.len_a, gen).requires_grad_(true);
        m.private_b = at::zeros({priv, m.len_b}).requires_grad_(true);
      }
      if (c.rank_scaling) m.scaling = at::ones({c.rank}).requires_grad_(true);
      m.index_a = table(c.rank, m.shards_a, pa, priv, next_a[m.len_a], rng, 0);
      // Without pair dissociation, rank vector k of B is drawn with the same
      // stream as rank vector k of A: the pair stays tied.
      uint64_t tie = c.pair_dissociation ? 0 : c.seed * 31 + i + 1;
      m.index_b = table(c.rank, m.shards_b, pb, priv, next_b[m.len_b], rng, tie);
    }
  }

  // Index table [rank, shards] into Concat(public of `pool_rows`, `priv`
  // private shards).
  at::Tensor table(int64_t rank, int64_t shards, int64_t pool_rows, int64_t priv, int64_t& cursor,
                   std::mt19937_64& rng, uint64_t tie) {
    at::Tensor t = at::empty({rank, shards}, at::kLong);
    auto acc = t.accessor<int64_t, 2>();
    if (!config_.subset_selection) {
      // Matrices take consecutive public shards: with a pool as large as
      // LoRA's parameters this is an exact partition (LoRA itself).
      for (int64_t k = 0; k < rank; ++k)
        for (int64_t s = 0; s < shards; ++s) acc[k][s] = (cursor++) % pool_rows;
    } else {
      for (int64_t k = 0; k < rank; ++k) {
        std::mt19937_64 pair_rng(tie ? tie * 1000003 + k : rng());
        for (int64_t s = 0; s < shards; ++s)
          acc[k][s] = static_cast<int64_t>(pair_rng() % pool_rows);
      }
    }
    if (priv > 0) {
      // Privatisation: the matrix's own shards take random slots, so every
      // private shard is used.
      std::vector<int64_t> slots(rank * shards);
      std::iota(slots.begin(), slots.end(), 0);
      std::shuffle(slots.begin(), slots.end(), rng);
      for (int64_t p = 0; p < priv && p < static_cast<int64_t>(slots.size()); ++p) {
        acc[slots[p] / shards][slots[p] % shards] = pool_rows + p;
      }
    }
    return t;
  }

  at::Tensor gather(const std::string& module, bool is_a) {
    auto it = target_index_.find(module);
    TESSERA_CHECK(it != target_index_.end(), NotFound, "MoS adapter has no module '", module, "'");
    const size_t i = it->second;
    const Module& m = modules_[i];
    const TargetModule& t = targets_[i];
    at::Tensor pool = is_a ? pool_a_.at(m.len_a) : pool_b_.at(m.len_b);
    const at::Tensor& priv = is_a ? m.private_a : m.private_b;
    at::Tensor source = priv.defined() ? at::cat({pool, priv}, 0) : pool;
    const at::Tensor& index = is_a ? m.index_a : m.index_b;
    // [rank, shards, len] -> rank vectors of full width.
    at::Tensor vectors =
        source.index_select(0, index.reshape({-1})).view({config_.rank, is_a ? t.in : t.out});
    if (m.scaling.defined() && is_a) vectors = vectors * m.scaling.unsqueeze(1);
    return is_a ? vectors : vectors.t();  // A [rank, in], B [out, rank]
  }

  MosConfig config_;
  int64_t shard_ = 0;
  std::map<int64_t, at::Tensor> pool_a_, pool_b_;  // shard length -> [shards, length]
  std::vector<Module> modules_;
};

}  // namespace

std::shared_ptr<Adapter> make_lora(const nn::Transformer& model, const LoraConfig& config,
                                   uint64_t seed) {
  auto adapter =
      std::make_shared<LoraAdapter>(find_targets(model, config.target_modules), config.rank,
                                    config.alpha, config.dropout, config.use_rslora);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < adapter->targets().size(); ++i) {
    adapter->a_param(i).copy_(kaiming(config.rank, adapter->targets()[i].in, gen));
  }
  return adapter;
}

std::shared_ptr<Adapter> make_mos(const nn::Transformer& model, const MosConfig& config) {
  return std::make_shared<MosAdapter>(model, config);
}

namespace {

void add_delta(nn::Transformer& model, Adapter& adapter, double sign) {
  at::NoGradGuard no_grad;
  for (const auto& t : adapter.targets()) {
    at::Tensor& w = model.parameter(t.name + ".weight");
    at::Tensor delta = at::matmul(adapter.b(t.name).detach().to(at::kDouble),
                                  adapter.a(t.name).detach().to(at::kDouble)) *
                       (sign * adapter.scale());
    w.copy_((w.to(at::kDouble) + delta).to(w.scalar_type()));
  }
}

}  // namespace

void merge(nn::Transformer& model, Adapter& adapter) { add_delta(model, adapter, 1.0); }
void unmerge(nn::Transformer& model, Adapter& adapter) { add_delta(model, adapter, -1.0); }

// ---------------------------------------------------------------------------
// Save / load

namespace {

constexpr const char* kPeftPrefix = "base_model.model.";

void write_json(const fs::path& path, const nlohmann::ordered_json& j) {
  std::string text = j.dump(2) + "\n";
  AtomicFileWriter out(path.string());
  out.append(text.data(), text.size());
  out.commit();
}

std::vector<std::string> module_patterns(const Adapter& adapter) {
  // The exact module names: unambiguous for any loader.
  std::vector<std::string> names;
  for (const auto& t : adapter.targets()) names.push_back(t.name);
  return names;
}

}  // namespace

void save_adapter(Adapter& adapter, const std::string& dir) {
  fs::create_directories(dir);
  nn::NamedTensors tensors;
  nlohmann::ordered_json cfg;
  if (auto* lora = dynamic_cast<LoraAdapter*>(&adapter)) {
    cfg["peft_type"] = "LORA";
    cfg["task_type"] = "CAUSAL_LM";
    cfg["r"] = lora->rank();
    cfg["lora_alpha"] = lora->alpha();
    cfg["lora_dropout"] = 0.0;
    cfg["use_rslora"] = lora->rslora();
    cfg["bias"] = "none";
    cfg["fan_in_fan_out"] = false;
    cfg["inference_mode"] = true;
    cfg["target_modules"] = module_patterns(adapter);
    for (size_t i = 0; i < adapter.targets().size(); ++i) {
      const std::string base = std::string(kPeftPrefix) + adapter.targets()[i].name;
      tensors.push_back({base + ".lora_A.weight", lora->a_param(i).detach().contiguous()});
      tensors.push_back({base + ".lora_B.weight", lora->b_param(i).detach().contiguous()});
    }
  } else if (auto* mos = dynamic_cast<MosAdapter*>(&adapter)) {
    const MosConfig& c = mos->config();
    cfg["peft_type"] = "MOS";
    cfg["format_version"] = 1;
    cfg["r"] = c.rank;
    cfg["lora_alpha"] = c.alpha;
    cfg["target_modules"] = module_patterns(adapter);
    cfg["shards_per_vector"] = c.shards_per_vector;
    cfg["public_fraction"] = c.public_fraction;
    cfg["private_shards"] = c.private_shards;
    cfg["pair_dissociation"] = c.pair_dissociation;
    cfg["vector_sharding"] = c.vector_sharding;
    cfg["subset_selection"] = c.subset_selection;
    cfg["privatization"] = c.privatization;
    cfg["rank_scaling"] = c.rank_scaling;
    cfg["seed"] = c.seed;
    for (auto& [name, t] : mos->named_trainable())
      tensors.push_back({name, t.detach().contiguous()});
    for (auto& [name, t] : mos->named_indices()) tensors.push_back({name, t.contiguous()});
  } else {
    TESSERA_THROW(InvalidArgument, "save_adapter: unknown adapter kind '", adapter.kind(), "'");
  }
  nn::save_safetensors((fs::path(dir) / "adapter_model.safetensors").string(), tensors,
                       {{"format", "pt"}});
  write_json(fs::path(dir) / "adapter_config.json", cfg);
}

std::shared_ptr<Adapter> load_adapter(const std::string& dir, const nn::Transformer& base) {
  const std::string cfg_path = (fs::path(dir) / "adapter_config.json").string();
  ConfigObject cfg = ConfigObject::load_file(cfg_path);
  const std::string type = cfg.get_string("peft_type");
  std::vector<std::string> targets;
  if (cfg.has("target_modules")) {
    auto raw = nlohmann::json::parse(cfg.get_raw("target_modules"));
    if (raw.is_string()) {
      targets = {raw.get<std::string>()};
    } else {
      targets = cfg.get_string_list("target_modules");
    }
  }
  TESSERA_CHECK(!targets.empty(), InvalidArgument, cfg_path,
                ": target_modules is missing or empty");
  auto weights = nn::SafetensorsFile::open((fs::path(dir) / "adapter_model.safetensors").string());
  const std::string wfile = weights.path();

  if (type == "LORA") {
    LoraConfig c;
    c.rank = cfg.get_int("r");
    c.alpha = cfg.get_double("lora_alpha", static_cast<double>(c.rank));
    c.use_rslora = cfg.get_bool("use_rslora", false);
    c.target_modules = targets;
    TESSERA_CHECK(cfg.get_string("bias", "none") == "none", InvalidArgument, cfg_path,
                  ": bias adapters are not supported (bias must be \"none\")");
    TESSERA_CHECK(!cfg.get_bool("fan_in_fan_out", false), InvalidArgument, cfg_path,
                  ": fan_in_fan_out=true (Conv1D layers) is not supported");
    TESSERA_CHECK(!cfg.get_bool("use_dora", false), InvalidArgument, cfg_path,
                  ": DoRA adapters (use_dora) are not supported");
    TESSERA_CHECK(c.rank >= 1, InvalidArgument, cfg_path, ": r must be >= 1");
    auto adapter = std::make_shared<LoraAdapter>(find_targets(base, targets), c.rank, c.alpha,
                                                 cfg.get_double("lora_dropout", 0.0), c.use_rslora);
    at::NoGradGuard no_grad;
    for (size_t i = 0; i < adapter->targets().size(); ++i) {
      const auto& t = adapter->targets()[i];
      const std::string name_a = std::string(kPeftPrefix) + t.name + ".lora_A.weight";
      const std::string name_b = std::string(kPeftPrefix) + t.name + ".lora_B.weight";
      for (const auto* n : {&name_a, &name_b}) {
        TESSERA_CHECK(weights.contains(*n), NotFound, wfile, ": tensor '", *n, "' is missing");
      }
      at::Tensor a = weights.get(name_a), b = weights.get(name_b);
      TESSERA_CHECK(a.dim() == 2 && a.size(0) == c.rank && a.size(1) == t.in, InvalidArgument,
                    wfile, ": tensor '", name_a, "' has shape ", shape_string(a.sizes()),
                    ", expected [", c.rank, ", ", t.in,
                    "] (r from adapter_config.json, the module's input)");
      TESSERA_CHECK(b.dim() == 2 && b.size(0) == t.out && b.size(1) == c.rank, InvalidArgument,
                    wfile, ": tensor '", name_b, "' has shape ", shape_string(b.sizes()),
                    ", expected [", t.out, ", ", c.rank, "]");
      adapter->a_param(i).copy_(a);
      adapter->b_param(i).copy_(b);
    }
    return adapter;
  }
  if (type == "MOS") {
    TESSERA_CHECK(cfg.get_int("format_version") == 1, InvalidArgument, cfg_path,
                  ": unsupported MoS format_version");
    MosConfig c;
    c.rank = cfg.get_int("r");
    c.alpha = cfg.get_double("lora_alpha");
    c.target_modules = targets;
    c.shards_per_vector = cfg.get_int("shards_per_vector");
    c.public_fraction = cfg.get_double("public_fraction");
    c.private_shards = cfg.get_int("private_shards");
    c.pair_dissociation = cfg.get_bool("pair_dissociation");
    c.vector_sharding = cfg.get_bool("vector_sharding");
    c.subset_selection = cfg.get_bool("subset_selection");
    c.privatization = cfg.get_bool("privatization");
    c.rank_scaling = cfg.get_bool("rank_scaling");
    c.seed = static_cast<uint64_t>(cfg.get_int("seed"));
    cfg.check_no_unknown_keys();
    auto adapter = std::make_shared<MosAdapter>(base, c);
    std::vector<std::string> wanted;
    for (auto& [name, t] : adapter->named_trainable()) wanted.push_back(name);
    for (auto& [name, t] : adapter->named_indices()) wanted.push_back(name);
    for (const auto& name : wanted) {
      TESSERA_CHECK(weights.contains(name), NotFound, wfile, ": tensor '", name, "' is missing");
      try {
        adapter->assign(name, weights.get(name));
      } catch (const InvalidArgument& e) {
        TESSERA_THROW(InvalidArgument, wfile, ": ", e.message());
      }
    }
    return adapter;
  }
  TESSERA_THROW(InvalidArgument, cfg_path, ": peft_type '", type,
                "' is not supported (LORA or MOS)");
}

// ---------------------------------------------------------------------------
// AdapterBank

int64_t AdapterBank::add(std::shared_ptr<Adapter> adapter) {
  TESSERA_CHECK(adapter != nullptr, InvalidArgument, "AdapterBank: null adapter");
  adapter->set_training(false);
  adapters_.push_back(std::move(adapter));
  stacks_.clear();
  factors_.clear();
  return static_cast<int64_t>(adapters_.size()) - 1;
}

const AdapterBank::Stack& AdapterBank::stack(const std::string& module, const at::Tensor& x,
                                             const at::Tensor& y) {
  // One stack per module and device (a bank may serve CPU and GPU inputs).
  const std::string key = module + "@" + x.device().str();
  auto it = stacks_.find(key);
  if (it != stacks_.end()) return it->second;
  at::NoGradGuard no_grad;
  const int64_t n = size(), in = x.size(-1), out = y.size(-1);
  int64_t r_max = 1;
  for (auto& a : adapters_) r_max = std::max(r_max, a->adapts(module) ? a->rank() : 0);
  Stack s;
  s.a = at::zeros({n + 1, r_max, in}, x.options());
  s.b = at::zeros({n + 1, out, r_max}, x.options());
  s.scale = at::zeros({n + 1}, x.options());
  for (int64_t k = 0; k < n; ++k) {
    auto& ad = adapters_[k];
    if (!ad->adapts(module)) continue;
    s.a[k].narrow(0, 0, ad->rank()).copy_(ad->a(module));
    s.b[k].narrow(1, 0, ad->rank()).copy_(ad->b(module));
    s.scale[k] = ad->scale();
  }
  return stacks_.emplace(key, std::move(s)).first->second;
}

at::Tensor AdapterBank::apply(const std::string& name, const at::Tensor& x, const at::Tensor& y,
                              const nn::AdapterContext& context) {
  return translate_errors(
      "lora AdapterBank::apply",
      [&]() -> at::Tensor {
        if (adapters_.empty()) return y;
        if (context.token_adapters.defined() && (context.batch_invariant || x.dim() == 2)) {
          return apply_rows(name, x, y, context.token_adapters, context.batch_invariant);
        }
        if (!context.sequence_adapters.defined()) return y;
        const at::Tensor& ids = context.sequence_adapters;
        TESSERA_CHECK(
            x.dim() == 3 && x.size(0) == ids.size(0), InvalidArgument, "AdapterBank on '", name,
            "': per-sequence adapters need [batch, tokens, features] inputs (not MoE experts)");
        TESSERA_CHECK(ids.max().item<int64_t>() < size(), InvalidArgument,
                      "AdapterBank: adapter id ", ids.max().item<int64_t>(), " but the bank holds ",
                      size());
        const Stack& s = stack(name, x, y);
        at::Tensor slot = at::where(ids < 0, at::full_like(ids, size()), ids).to(at::kLong);
#ifdef TESSERA_LORA_CUDA
        // Serving on a GPU: the gathered shrink/expand kernels (kernels/lora).
        if (x.is_cuda() && x.scalar_type() == at::kFloat && y.scalar_type() == at::kFloat &&
            !(at::GradMode::is_enabled() && (x.requires_grad() || y.requires_grad()))) {
          return detail::bank_apply_cuda(x, y, s.a, s.b, s.scale, slot);
        }
#endif
        // Gather each sequence's A and B, then two batched matmuls.
        at::Tensor a = s.a.index_select(0, slot);                  // [B, r, in]
        at::Tensor b = s.b.index_select(0, slot);                  // [B, out, r]
        at::Tensor shrunk = at::bmm(x, a.transpose(1, 2));         // [B, T, r]
        at::Tensor expanded = at::bmm(shrunk, b.transpose(1, 2));  // [B, T, out]
        return y + expanded * s.scale.index_select(0, slot).view({-1, 1, 1});
      },
      ErrorCode::kInvalidArgument);
}

at::Tensor AdapterBank::apply_rows(const std::string& name, const at::Tensor& x,
                                   const at::Tensor& y, const at::Tensor& token_adapters,
                                   bool invariant) {
  const int64_t in = x.size(-1), out = y.size(-1);
  const int64_t rows = token_adapters.numel();
  TESSERA_CHECK(x.numel() == rows * in && y.numel() == rows * out, InvalidArgument,
                "AdapterBank on '", name, "': ", rows, " token adapter ids for input ",
                shape_string(x.sizes()));
  at::Tensor ids = token_adapters.to(at::kLong).cpu().contiguous();
  const int64_t* idp = ids.data_ptr<int64_t>();
  // Rows per adapter, in row order.
  std::map<int64_t, std::vector<int64_t>> groups;
  for (int64_t r = 0; r < rows; ++r) {
    TESSERA_CHECK(idp[r] < size(), InvalidArgument, "AdapterBank: adapter id ", idp[r],
                  " but the bank holds ", size());
    if (idp[r] >= 0 && adapters_[idp[r]]->adapts(name)) groups[idp[r]].push_back(r);
  }
  if (groups.empty()) return y;
  at::NoGradGuard no_grad;
  at::Tensor x2 = x.reshape({rows, in});
  at::Tensor result = y.reshape({rows, out}).clone();
  for (const auto& [id, members] : groups) {
    const Factors& f = factors(name, id);
    at::Tensor idx = at::tensor(members, at::kLong).to(x.device());
    at::Tensor xr = x2.index_select(0, idx);
    // The adapter's own rank (no zero padding), each row by itself in a
    // fixed order when invariant: a row's result does not depend on which
    // other rows or adapters share the forward.
    at::Tensor delta = invariant ? nn::linear_invariant(nn::linear_invariant(xr, f.a), f.b)
                                 : at::matmul(at::matmul(xr, f.a.t()), f.b.t());
    result.index_copy_(0, idx, result.index_select(0, idx) + (delta * f.scale).to(y.scalar_type()));
  }
  return result.view(y.sizes());
}

const AdapterBank::Factors& AdapterBank::factors(const std::string& module, int64_t id) {
  const std::string key = module + "#" + std::to_string(id);
  auto it = factors_.find(key);
  if (it != factors_.end()) return it->second;
  at::NoGradGuard no_grad;
  Adapter& ad = *adapters_[id];
  Factors f{ad.a(module).detach().to(at::kFloat).contiguous(),
            ad.b(module).detach().to(at::kFloat).contiguous(), ad.scale()};
  return factors_.emplace(key, std::move(f)).first->second;
}

// ---------------------------------------------------------------------------
// AdapterRegistry

AdapterRegistry::AdapterRegistry(Options options, const nn::Transformer& base)
    : options_(std::move(options)), base_(base) {
  TESSERA_CHECK(options_.max_resident >= 1, InvalidArgument,
                "AdapterRegistry: max_resident must be >= 1");
}

std::shared_ptr<Adapter> AdapterRegistry::get(const std::string& name) {
  TESSERA_CHECK(!name.empty() && name.find('/') == std::string::npos && name != "." && name != "..",
                InvalidArgument, "AdapterRegistry: bad adapter name '", name, "'");
  std::shared_ptr<std::once_flag> once;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = lru_.begin(); it != lru_.end(); ++it) {
      if (it->first == name) {
        lru_.splice(lru_.begin(), lru_, it);  // most recent first
        return lru_.front().second;
      }
    }
    auto& slot = loading_[name];
    if (!slot) slot = std::make_shared<std::once_flag>();
    once = slot;
  }
  // One thread loads; others asking for the same name wait here, then find
  // it resident. Loading happens outside the registry lock.
  std::shared_ptr<Adapter> loaded;
  std::call_once(*once, [&] {
    loaded = load_adapter((fs::path(options_.root) / name).string(), base_);
    std::lock_guard<std::mutex> lock(mu_);
    lru_.emplace_front(name, loaded);
    ++loads_;
    while (lru_.size() > options_.max_resident) lru_.pop_back();
    loading_.erase(name);
  });
  if (loaded) return loaded;
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& [n, a] : lru_) {
    if (n == name) return a;
  }
  // Loaded and already evicted by others in between: load again.
  loading_.erase(name);
  return get(name);
}

std::vector<std::string> AdapterRegistry::resident() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::string> out;
  for (const auto& [n, a] : lru_) out.push_back(n);
  return out;
}

int64_t AdapterRegistry::loads() const {
  std::lock_guard<std::mutex> lock(mu_);
  return loads_;
}

}  // namespace tessera::lora
