// tessera/lora/lora.h — LoRA and Mixture-of-Shards (MoS) adapters.
//
// An adapter adds ΔW = B·A·scale to chosen linear layers of a frozen model
// (tessera::nn::Transformer), chosen by name pattern with PEFT's rule: a
// pattern matches a module whose name equals it or ends with "." + pattern
// ("q_proj", "mlp.down_proj", "w1" for Mixtral experts; "all-linear" for
// every projection). Adapters plug into the model as its LinearAdapter:
//
//   auto adapter = tessera::lora::make_lora(model, {.rank = 16, .alpha = 32,
//                                                   .target_modules = {"q_proj", "v_proj"}});
//   model.set_adapter(adapter);                      // base weights stay frozen
//   tessera::nn::Trainer trainer(model, opts, dp, adapter->trainable());
//
// MoS (Mixture of Shards, ICLR 2025) builds every A and B from shards of
// two global pools shared by all layers, with four ingredients, each a
// switch (MosConfig): pair dissociation (A's and B's rank vectors are
// indexed independently), vector sharding (a rank vector is several shards,
// so layers of different widths share one pool), subset selection (frozen
// random index tables per matrix), privatization (each matrix also owns
// private shards). With every switch off MoS is exactly LoRA: the pools are
// partitioned into the matrices' rows in order.
//
// Adapters are differentiable (pool gradients are scatter-added by
// autograd), merge into and unmerge from the base weights, and save/load in
// PEFT's layout (LoRA) or a documented MoS layout (docs/lora.md).
// AdapterBank serves a batch whose sequences use different adapters in one
// gathered forward; AdapterRegistry loads adapters on demand with an LRU
// bound. Adapter objects are not thread-safe; the registry is.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "tessera/nn/model.h"

namespace tessera::lora {

struct TargetModule {
  std::string name;  // "model.layers.0.self_attn.q_proj"
  int64_t in = 0;    // input features
  int64_t out = 0;   // output features
};

// Linear modules of `model` matching `patterns` (PEFT semantics, see
// above), in model order. InvalidArgument when nothing matches.
std::vector<TargetModule> find_targets(const nn::Transformer& model,
                                       const std::vector<std::string>& patterns);

struct LoraConfig {
  int64_t rank = 8;
  double alpha = 16;     // scale = alpha / rank (alpha / sqrt(rank) with use_rslora)
  double dropout = 0.0;  // on the adapter's input, training only
  bool use_rslora = false;
  std::vector<std::string> target_modules{"q_proj", "v_proj"};
};

struct MosConfig {
  int64_t rank = 8;
  double alpha = 16;
  double dropout = 0.0;
  std::vector<std::string> target_modules{"q_proj", "v_proj"};
  // Shards per rank vector of width hidden_size (vector sharding); every
  // target dimension must be a multiple of hidden_size / shards_per_vector.
  int64_t shards_per_vector = 4;
  // Public pool size as a fraction of the shards all matrices draw (1.0:
  // as many as LoRA's parameters; 0.125: one eighth).
  double public_fraction = 0.125;
  // Private shards per matrix, for A and for B each.
  int64_t private_shards = 1;
  bool pair_dissociation = true;
  bool vector_sharding = true;
  bool subset_selection = true;
  bool privatization = true;
  bool rank_scaling = false;  // a trainable vector s: ΔW = B·diag(s)·A
  uint64_t seed = 0;

  // Every switch off and public_fraction 1: plain LoRA.
  static MosConfig all_off(const LoraConfig& lora);
};

struct ParameterReport {
  int64_t trainable = 0;        // values the optimiser updates
  int64_t stored = 0;           // trainable + index-table entries
  int64_t lora_equivalent = 0;  // sum over targets of rank * (in + out)
  double equivalent_rank = 0;   // the LoRA rank with as many trainable values
  std::string summary() const;
};

class Adapter : public nn::LinearAdapter {
 public:
  ~Adapter() override;
  virtual std::string kind() const = 0;  // "lora" or "mos"
  virtual int64_t rank() const = 0;
  virtual double scale() const = 0;
  const std::vector<TargetModule>& targets() const { return targets_; }
  bool adapts(const std::string& module) const;
  // A [rank, in] and B [out, rank] of a target (MoS: gathered from the
  // pools; differentiable).
  virtual at::Tensor a(const std::string& module) = 0;
  virtual at::Tensor b(const std::string& module) = 0;
  // Tensors the optimiser should update, by name.
  virtual std::vector<std::pair<std::string, at::Tensor>> named_trainable() = 0;
  std::vector<at::Tensor> trainable();
  virtual ParameterReport report() = 0;
  void set_training(bool training) { training_ = training; }

  // y + dropout(x)·Aᵀ·Bᵀ·scale for targeted layers. Sequences whose
  // context id is negative get nothing added.
  at::Tensor apply(const std::string& name, const at::Tensor& x, const at::Tensor& y,
                   const nn::AdapterContext& context) override;

 protected:
  std::vector<TargetModule> targets_;
  std::map<std::string, size_t> target_index_;
  double dropout_ = 0;
  bool training_ = true;
  void set_targets(std::vector<TargetModule> targets);
};

std::shared_ptr<Adapter> make_lora(const nn::Transformer& model, const LoraConfig& config,
                                   uint64_t seed = 0);
std::shared_ptr<Adapter> make_mos(const nn::Transformer& model, const MosConfig& config);

// W += B·A·scale for every target (no adapter overhead afterwards);
// unmerge subtracts it again. The model's adapter is left as it is.
void merge(nn::Transformer& model, Adapter& adapter);
void unmerge(nn::Transformer& model, Adapter& adapter);

// LoRA: PEFT layout (adapter_config.json + adapter_model.safetensors with
// names "base_model.model.<module>.lora_A.weight"). MoS: docs/lora.md.
// Files are written atomically.
void save_adapter(Adapter& adapter, const std::string& dir);
// Reads either kind. Errors name the file and what is wrong: malformed
// JSON (line/column), an unsupported PEFT option, a missing tensor, a rank
// or shape that does not fit the base model.
std::shared_ptr<Adapter> load_adapter(const std::string& dir, const nn::Transformer& base);

// Several adapters served in one forward. Each sequence picks one through
// AdapterContext::sequence_adapters (index into the bank, -1: none); A and B
// of all adapters are stacked (zero-padded to the largest rank) per module,
// and the shrink x·Aᵀ and expand h·Bᵀ are batched matmuls over the rows
// gathered per sequence (the BGMV idea), not a loop over adapters. In
// batch-invariant and paged forwards (AdapterContext::token_adapters) each
// adapter's rows are gathered and multiplied by its own factors with
// nn::linear_invariant, so a row's output does not depend on the batch.
class AdapterBank : public nn::LinearAdapter {
 public:
  // Returns the adapter's index in the bank.
  int64_t add(std::shared_ptr<Adapter> adapter);
  int64_t size() const { return static_cast<int64_t>(adapters_.size()); }
  at::Tensor apply(const std::string& name, const at::Tensor& x, const at::Tensor& y,
                   const nn::AdapterContext& context) override;

 private:
  struct Stack {
    at::Tensor a;      // [adapters + 1, r_max, in]; last slot zeros (no adapter)
    at::Tensor b;      // [adapters + 1, out, r_max]
    at::Tensor scale;  // [adapters + 1]
  };
  // One adapter's A [rank, in] and B [out, rank] of a module, fp32 CPU.
  struct Factors {
    at::Tensor a, b;
    double scale = 1;
  };
  const Stack& stack(const std::string& module, const at::Tensor& x, const at::Tensor& y);
  const Factors& factors(const std::string& module, int64_t id);
  // Per-row choices (AdapterContext::token_adapters): the rows of each
  // adapter gathered and multiplied by its own A and B (fixed-order
  // products when `invariant`).
  at::Tensor apply_rows(const std::string& name, const at::Tensor& x, const at::Tensor& y,
                        const at::Tensor& token_adapters, bool invariant);
  std::vector<std::shared_ptr<Adapter>> adapters_;
  std::map<std::string, Stack> stacks_;     // by "<module>@<device>"
  std::map<std::string, Factors> factors_;  // by "<module>#<adapter index>"
};

// Adapters by name from folders under `root` (root/<name>/), loaded on
// first use, at most `max_resident` kept (least recently used evicted).
// Thread-safe; concurrent first requests for one name load it once.
class AdapterRegistry {
 public:
  struct Options {
    std::string root;
    size_t max_resident = 8;
  };
  AdapterRegistry(Options options, const nn::Transformer& base);
  std::shared_ptr<Adapter> get(const std::string& name);
  std::vector<std::string> resident() const;  // most recent first
  int64_t loads() const;

 private:
  Options options_;
  const nn::Transformer& base_;
  mutable std::mutex mu_;
  std::list<std::pair<std::string, std::shared_ptr<Adapter>>> lru_;  // guarded by mu_
  std::map<std::string, std::shared_ptr<std::once_flag>> loading_;   // guarded by mu_
  int64_t loads_ = 0;                                                // guarded by mu_
};

}  // namespace tessera::lora
