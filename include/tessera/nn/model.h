// tessera/nn/model.h — the decoder-only transformer (Llama / Qwen2 / Mixtral /
// Qwen2-MoE), dense or sparse, on one rank or tensor/expert parallel.
//
// Parameters carry Hugging Face names ("model.layers.0.self_attn.q_proj.weight",
// "model.layers.3.block_sparse_moe.experts.5.w1.weight", ...), so a model
// folder downloaded from the Hub maps onto it by name. Under tensor
// parallelism (Megatron style) each rank holds a shard: q/k/v/gate/up and the
// vocabulary dimension of the embedding and LM head split by rows
// (column-parallel), o/down by columns (row-parallel), norms and routers
// replicated; under expert parallelism each rank of the ep group holds
// num_experts / ep experts and tokens travel to them with one uneven
// all_to_all each way. layout_of(name) states each parameter's layout, and
// the loaders cut full Hugging Face tensors into shards through dist's
// layout planner.
//
//   auto model = tessera::nn::Transformer(cfg);          // one rank, fp32
//   model.init_random(/*seed=*/0);
//   auto out = model.forward(input_ids);                 // logits [B, T, V]
//
// Forward is differentiable (LibTorch autograd, including through the
// tensor- and expert-parallel collectives). Not thread-safe: one forward at a
// time per model object.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "tessera/dist/layout.h"
#include "tessera/dist/process_group.h"
#include "tessera/formats/model_config.h"

namespace tessera::nn {

// The groups one model replica spans. Null groups mean size 1. For MoE with
// both tp and ep, the ep group must join ranks of equal tp rank.
struct ParallelGroups {
  std::shared_ptr<dist::ProcessGroup> tp;
  std::shared_ptr<dist::ProcessGroup> ep;

  int tp_size() const { return tp ? tp->size() : 1; }
  int tp_rank() const { return tp ? tp->rank() : 0; }
  int ep_size() const { return ep ? ep->size() : 1; }
  int ep_rank() const { return ep ? ep->rank() : 0; }
};

// Per-layer key/value cache, preallocated: [batch, kv_heads_local, max_len,
// head_dim] per layer, and each sequence's filled length. Sequences of one
// batch may hold different lengths.
class KVCache {
 public:
  KVCache(const ModelConfig& config, int64_t batch, int64_t max_length, at::TensorOptions options,
          int tp_size = 1);

  int64_t batch() const { return batch_; }
  int64_t max_length() const { return max_length_; }
  // [batch] int64, tokens stored per sequence.
  const at::Tensor& lengths() const { return lengths_; }
  at::Tensor& key(int64_t layer) { return keys_[layer]; }
  at::Tensor& value(int64_t layer) { return values_[layer]; }
  // Sets every sequence's length (after a forward appended tokens, or to
  // roll back rejected speculative tokens). Entries past a length are
  // garbage that the next write overwrites.
  void set_lengths(const at::Tensor& lengths);
  void reset();
  int64_t bytes() const;

 private:
  int64_t batch_, max_length_;
  std::vector<at::Tensor> keys_, values_;
  at::Tensor lengths_;
};

// The KV cache of a serving engine: per layer, a pool of fixed-size blocks
// of key and value rows, [num_blocks, kv_heads_local, block_size, head_dim]
// fp32 each (kv_heads_local = num_key_value_heads / tp_size: a
// tensor-parallel rank keeps its own heads' keys and values). Which block holds which positions of
// which sequence is the caller's business (serve::BlockManager decides it); a forward reads and
// writes the pools through a PagedBatch. Not thread-safe.
class PagedKVCache {
 public:
  // InvalidArgument for num_blocks or block_size < 1, or kv heads that do
  // not split over tp_size.
  PagedKVCache(const ModelConfig& config, int64_t num_blocks, int64_t block_size, int tp_size = 1);

  int64_t num_blocks() const { return num_blocks_; }
  int64_t block_size() const { return block_size_; }
  int64_t num_layers() const { return static_cast<int64_t>(keys_.size()); }
  at::Tensor& key(int64_t layer) { return keys_[layer]; }
  at::Tensor& value(int64_t layer) { return values_[layer]; }
  // Copies every slot of block `src` into block `dst`, in every layer
  // (copy-on-write of a shared block). InvalidArgument out of range.
  void copy_block(int64_t src, int64_t dst);
  // Copies `count` consecutive slots from (src_block, src_slot) to
  // (dst_block, dst_slot), in every layer; the ranges stay within their
  // blocks. InvalidArgument otherwise.
  void copy_slots(int64_t src_block, int64_t src_slot, int64_t dst_block, int64_t dst_slot,
                  int64_t count);
  int64_t bytes() const;
  // Bytes one block takes over all layers on one rank: what a memory
  // budget divides by.
  static int64_t bytes_per_block(const ModelConfig& config, int64_t block_size, int tp_size = 1);

 private:
  int64_t num_blocks_, block_size_;
  std::vector<at::Tensor> keys_, values_;
};

// A flat batch of tokens from several sequences, for one forward over a
// PagedKVCache (ForwardOptions::paged). input_ids is [1, N]: the tokens of
// sequences[0], then those of sequences[1], and so on. Each token's keys
// and values are written to its position's slot before attention, and it
// attends to positions [0, its own] of its sequence, so the model sees
// exactly what a KVCache forward of the same tokens would.
struct PagedBatch {
  PagedKVCache* cache = nullptr;
  struct Sequence {
    int64_t num_tokens = 0;      // >= 1 consecutive entries of input_ids
    int64_t start_position = 0;  // position of the first; [0, start) are in the cache
    // Position p lives in block block_table[p / block_size], slot
    // p % block_size; the table covers every position up to the last token.
    std::vector<int32_t> block_table;
    int64_t adapter = -1;  // AdapterContext::token_adapters of its tokens (-1: none)
  };
  std::vector<Sequence> sequences;
  // Tokens (indices into input_ids) whose logits the forward computes, in
  // this order: ForwardOutput::logits is [1, logits_rows.size(), V].
  std::vector<int64_t> logits_rows;
};

// x [..., K] times w [N, K]^T in fp32 on the CPU, each output computed by
// one fixed sequence of operations whatever the number of rows (the
// batch-invariant forward's linear layers). InvalidArgument for other
// dtypes or devices, or mismatched shapes.
at::Tensor linear_invariant(const at::Tensor& x, const at::Tensor& w);

// One MoE layer's routing decisions for one forward (traces for the
// serverless-MoE planner and for load statistics).
struct RoutingRecord {
  int64_t layer = 0;
  at::Tensor experts;       // [tokens, top_k] int64, tokens in [B*T] order
  at::Tensor weights;       // [tokens, top_k] float
  at::Tensor router_probs;  // [tokens, num_experts] float (after softmax)
  // Per token, the position (within its sequence) of the key that received
  // the most attention from it in this layer's attention, summed over heads
  // (the serverless-MoE paper's "attention id" is the token there). Local
  // heads only under tensor parallelism; empty on the batch-invariant path.
  at::Tensor attention_argmax;  // [tokens] int64
};

// What an adapter may know about the current forward.
struct AdapterContext {
  // [batch] int64: which adapter each sequence uses (-1: none). Undefined:
  // the adapter's default for every sequence.
  at::Tensor sequence_adapters;
  // [tokens] int64, set alongside sequence_adapters in batch-invariant and
  // paged forwards: the adapter of every row of a layer's input flattened to
  // [tokens, in] (for MoE experts, of the rows the expert receives).
  at::Tensor token_adapters;
  // The forward is batch-invariant (ForwardOptions::batch_invariant, or
  // paged): the adapter must compute each row with a fixed operation order.
  bool batch_invariant = false;
};

// Extra computation on the output of named linear layers: LoRA-style
// adapters (tessera::lora) implement it. `name` is the layer's Hugging Face
// module name ("model.layers.3.self_attn.q_proj",
// "model.layers.1.block_sparse_moe.experts.2.w1"); x is the layer's input
// ([B, T, in], or [rows, in] inside MoE experts, where rows are tokens
// grouped by expert), y the base output. Returns y plus the adapter's
// contribution, or y itself for layers it does not adapt. Must be
// differentiable (training) and must not modify y in place.
class LinearAdapter {
 public:
  virtual ~LinearAdapter() = default;
  virtual at::Tensor apply(const std::string& name, const at::Tensor& x, const at::Tensor& y,
                           const AdapterContext& context) = 0;
};

// Replaces the matrix product of linear layers: quantized kernels
// (tessera::quant) implement it. `name` is the module name as for
// LinearAdapter, or "lm_head" for the output projection (tied or not).
// Returns x W^T without the bias (the model adds it), or an undefined tensor
// to let the model multiply by its own weight. MoE routers and shared-expert
// gates always use the model's weights.
class LinearOverride {
 public:
  virtual ~LinearOverride() = default;
  virtual at::Tensor linear(const std::string& name, const at::Tensor& x) = 0;
  // The products of several layers that read the same input x (one
  // layer's q, k and v projections; an MLP's gate and up), in the order of
  // `names`, each exactly what linear(name, x) returns. The default calls
  // linear() per name; an override may run them as one product (one pass
  // over x, one parallel region) when that gives the same bits. The
  // batch-invariant forwards call this.
  virtual std::vector<at::Tensor> linear_group(const std::vector<std::string>& names,
                                               const at::Tensor& x);
};

struct ForwardOptions {
  // With a cache, input_ids [B, T] are appended at each sequence's current
  // length (right-padded prompts: set `lengths` to the real lengths so the
  // cache records them; padded positions are never attended to).
  KVCache* cache = nullptr;
  at::Tensor lengths;  // [B] real tokens in input_ids; empty: all T
  bool record_routing = false;
  // Tensor parallel: gather the vocabulary-sharded logits into full ones.
  bool gather_logits = true;
  // Only compute logits for the last real position of each sequence.
  bool last_logits_only = false;
  // Per-sequence adapter choice, passed to the model's adapter (if any).
  at::Tensor sequence_adapters;
  // Every layer computed so that each token's result does not depend on
  // how many tokens run in the same forward (fixed-order loops instead of
  // BLAS, whose blocking changes with the shape): norms, RoPE, attention,
  // the fp32 linear layers (linear_invariant), MoE routing and combining,
  // and adapters that honour AdapterContext::batch_invariant. With a
  // batch-invariant LinearOverride (tessera::quant), verifying k tokens in
  // one forward gives bit-identical logits to decoding them one at a time.
  // fp32 CPU models only; fp32 linear layers run at a fraction of BLAS's
  // speed for large batches.
  bool batch_invariant = false;
  // Skip the LM head: ForwardOutput::hidden gets the final-normed hidden
  // states [B, T, H] (or [B, 1, H] with last_logits_only) and logits stay
  // undefined. For value heads (critics, reward models).
  bool hidden_only = false;
  // Input embeddings used instead of looking up input_ids in the embedding
  // table: [B, T, hidden_size] (paged: [1, N, hidden_size]) in the model's
  // dtype, e.g. text embeddings with image features spliced in
  // (nn::VisionLanguageModel). input_ids still give the shape and must be
  // valid ids. Undefined: the usual lookup. Differentiable. Single-rank or
  // tensor-parallel models (each tp rank passes the full embeddings).
  at::Tensor input_embeds;
  // Computes the routed experts of every MoE layer elsewhere (a serverless
  // platform, a simulator): called with the layer index, the layer's tokens
  // [N, H], the chosen experts [N, k] and their weights [N, k]; returns the
  // weighted mixture [N, H] (shared experts are still added here).
  // Single-rank models only (no tp / ep); no capacity drops.
  std::function<at::Tensor(int64_t layer, const at::Tensor& x, const at::Tensor& experts,
                           const at::Tensor& weights)>
      expert_override;
  // A paged forward (the serving engine's): input_ids [1, N] are the
  // tokens of paged->sequences, read and written through paged->cache, with
  // logits only for paged->logits_rows. Always batch-invariant (fp32 CPU
  // models); cache, lengths, last_logits_only, sequence_adapters and
  // record_routing must be left unset. Tensor-parallel models (no ep) run
  // it too: every tp rank passes the same batch and token ids, its cache
  // holds its own kv heads, the row-parallel outputs are summed in rank
  // order (detail::sum_in_rank_order, so the result stays batch-invariant
  // for any tp) and the logits come back gathered on every rank.
  const PagedBatch* paged = nullptr;
};

struct ForwardOutput {
  at::Tensor logits;    // [B, T, V] (or [B, 1, V] with last_logits_only; V local when not gathered)
  at::Tensor aux_loss;  // scalar: load-balancing + z-loss terms, already weighted (0 for dense)
  std::vector<RoutingRecord> routing;
  at::Tensor expert_load;  // [num_layers_moe, num_experts] tokens routed per expert (float)
  at::Tensor hidden;       // with ForwardOptions::hidden_only
};

class Transformer {
 public:
  explicit Transformer(ModelConfig config, ParallelGroups groups = {},
                       at::ScalarType dtype = at::kFloat);
  ~Transformer();
  Transformer(Transformer&&) noexcept;
  Transformer& operator=(Transformer&&) noexcept;

  const ModelConfig& config() const;
  const ParallelGroups& groups() const;

  // This rank's parameters by Hugging Face name, in a stable order.
  const std::vector<std::pair<std::string, at::Tensor>>& named_parameters() const;
  at::Tensor& parameter(const std::string& name);  // NotFound
  bool has_parameter(const std::string& name) const;
  // Every parameter name of the full model (all experts), in order.
  std::vector<std::string> full_parameter_names() const;
  // Global shape of a parameter (InvalidArgument for unknown names).
  std::vector<int64_t> full_shape(const std::string& name) const;
  // Layout over the tp x ep ranks of one replica (rank = ep_rank * tp + tp_rank).
  dist::Layout layout_of(const std::string& name) const;
  int replica_rank() const;

  // Normal(0, 0.02) weights, unit norms, same full tensors for any layout
  // given the seed (each shard is cut from the full random tensor).
  void init_random(uint64_t seed);
  // Sets this rank's shard of `name` from the full tensor (any float dtype).
  void load_full(const std::string& name, const at::Tensor& full);
  void set_requires_grad(bool requires_grad);
  // Installs (or, with nullptr, removes) an adapter applied after every
  // linear layer; single-rank models only (InvalidArgument under tp/ep).
  void set_adapter(std::shared_ptr<LinearAdapter> adapter);
  const std::shared_ptr<LinearAdapter>& adapter() const;
  // Installs (or removes) a replacement for the linear layers' products;
  // single-rank models only. An adapter, if any, applies on top.
  void set_linear_override(std::shared_ptr<LinearOverride> override_);
  const std::shared_ptr<LinearOverride>& linear_override() const;
  int64_t num_local_parameters() const;

  ForwardOutput forward(const at::Tensor& input_ids, const ForwardOptions& options = {});

  // Mean next-token cross-entropy over labels != -100 (vocabulary-parallel
  // under tp, never materialising full logits), plus the MoE aux loss.
  // labels: [B, T], aligned with input_ids (shift is done by the caller).
  struct Loss {
    at::Tensor total;  // ce + aux, for backward
    at::Tensor ce;     // detached
    at::Tensor aux;    // detached
    int64_t tokens = 0;
    at::Tensor expert_load;
  };
  Loss loss(const at::Tensor& input_ids, const at::Tensor& labels);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Byte-for-byte the same model as `dense`, with every MLP copied into
// `num_experts` experts behind a new router (sparse upcycling, as the
// serverless-MoE paper does with dense models). Router weights are small
// random values (seeded), so experts start identical and diverge in
// fine-tuning. Returns the MoE config and full tensors by Hugging Face name
// (Mixtral naming).
struct UpcycledModel {
  ModelConfig config;
  std::map<std::string, at::Tensor> weights;
};
UpcycledModel upcycle_to_moe(const ModelConfig& dense,
                             const std::map<std::string, at::Tensor>& dense_weights,
                             int64_t num_experts, int64_t top_k, uint64_t seed);

}  // namespace tessera::nn
