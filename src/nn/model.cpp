#include "tessera/nn/model.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "invariant_ops.h"
#include "parallel_ops.h"
#include "parameter_names.h"
#include "tessera/core/error.h"
#include "tessera/core/tensor.h"
#include "tessera/dist/redistribute.h"
#include "tessera/nn/moe_mixture.h"
#include "tessera/nn/parameters.h"

namespace tessera::nn {

using detail::all_to_all_rows;
using detail::copy_to_group;
using detail::gather_last_dim;
using detail::layer_prefix;
using detail::moe_names;
using detail::MoeNames;
using detail::reduce_from_group;
using detail::with_expert;

// ---------------------------------------------------------------------------
// KVCache

KVCache::KVCache(const ModelConfig& config, int64_t batch, int64_t max_length,
                 at::TensorOptions options, int tp_size)
    : batch_(batch), max_length_(max_length) {
  TESSERA_CHECK(batch >= 1 && max_length >= 1, InvalidArgument,
                "KV cache: batch and max_length must be positive");
  TESSERA_CHECK(config.num_key_value_heads % tp_size == 0, InvalidArgument,
                "KV cache: ", config.num_key_value_heads,
                " kv heads do not split over tp=", tp_size);
  const int64_t heads = config.num_key_value_heads / tp_size;
  for (int64_t l = 0; l < config.num_hidden_layers; ++l) {
    keys_.push_back(at::zeros({batch, heads, max_length, config.head_size()}, options));
    values_.push_back(at::zeros({batch, heads, max_length, config.head_size()}, options));
  }
  lengths_ = at::zeros({batch}, at::kLong);
}

void KVCache::set_lengths(const at::Tensor& lengths) {
  TESSERA_CHECK(lengths.numel() == batch_, InvalidArgument, "KV cache: ", lengths.numel(),
                " lengths for a batch of ", batch_);
  TESSERA_CHECK(lengths.max().item<int64_t>() <= max_length_ && lengths.min().item<int64_t>() >= 0,
                ResourceExhausted, "KV cache: length beyond max_length ", max_length_);
  lengths_ = lengths.to(at::kLong).cpu().contiguous().clone();
}

void KVCache::reset() { lengths_.zero_(); }

int64_t KVCache::bytes() const {
  int64_t n = 0;
  for (size_t l = 0; l < keys_.size(); ++l) n += tensor_bytes(keys_[l]) + tensor_bytes(values_[l]);
  return n;
}

// ---------------------------------------------------------------------------
// Parameter naming and layouts

namespace {

struct ExpertWeights {
  at::Tensor gate, up, down;  // [I_local, H], [I_local, H], [H, I_local]
};

struct LayerWeights {
  std::string prefix;  // "model.layers.3."
  at::Tensor input_norm, post_norm;
  at::Tensor q, k, v, o, q_bias, k_bias, v_bias;
  bool moe = false;
  at::Tensor gate, up, down;           // dense MLP
  at::Tensor router;                   // [E, H]
  std::vector<ExpertWeights> experts;  // local experts, in order
  ExpertWeights shared;                // Qwen2-MoE shared expert
  at::Tensor shared_gate;              // [1, H]
};

// RoPE inverse frequencies [head_dim / 2] with the configured scaling.
at::Tensor rope_inv_freq(const ModelConfig& c) {
  const int64_t hd = c.head_size();
  at::Tensor inv = 1.0 / at::pow(c.rope_theta, at::arange(0, hd, 2, at::kDouble) / hd);
  if (c.rope_scaling == RopeScaling::kLinear) {
    inv = inv / c.rope_factor;
  } else if (c.rope_scaling == RopeScaling::kLlama3) {
    const double old_len = static_cast<double>(c.rope_original_max_position);
    const double low_wavelen = old_len / c.rope_low_freq_factor;
    const double high_wavelen = old_len / c.rope_high_freq_factor;
    auto acc = inv.accessor<double, 1>();
    for (int64_t i = 0; i < inv.size(0); ++i) {
      double freq = acc[i], wavelen = 2 * M_PI / freq;
      if (wavelen > low_wavelen) {
        acc[i] = freq / c.rope_factor;
      } else if (wavelen >= high_wavelen) {
        double smooth = (old_len / wavelen - c.rope_low_freq_factor) /
                        (c.rope_high_freq_factor - c.rope_low_freq_factor);
        acc[i] = (1 - smooth) * freq / c.rope_factor + smooth * freq;
      }
    }
  }
  return inv.to(at::kFloat);
}

// ForwardOptions::input_embeds after checking its shape and dtype against
// what the embedding lookup would have produced.
at::Tensor checked_input_embeds(const at::Tensor& embeds, at::IntArrayRef expected,
                                at::ScalarType dtype) {
  TESSERA_CHECK(embeds.sizes() == expected && embeds.scalar_type() == dtype, InvalidArgument,
                "forward: input_embeds must be ", dtype_name(dtype), " ", shape_string(expected),
                ", got ", dtype_name(embeds.scalar_type()), " ", shape_string(embeds.sizes()));
  return embeds;
}

// Reductions (norms, softmax) run in at least fp32; fp64 models stay fp64.
at::ScalarType accumulate_type(at::ScalarType t) { return at::promote_types(t, at::kFloat); }

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  at::Tensor xf = x.to(accumulate_type(x.scalar_type()));
  at::Tensor normed = xf * at::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps);
  return normed.to(x.scalar_type()) * w;
}

void check_invariant_input(const at::Tensor& x) {
  TESSERA_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(), InvalidArgument,
                "batch_invariant forward: fp32 CPU models only");
}

// rms_norm with one fixed summation order per row (batch-invariant).
at::Tensor rms_norm_invariant(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_invariant_input(x);
  at::Tensor xc = x.contiguous();
  const int64_t H = xc.size(-1), rows = xc.numel() / std::max<int64_t>(H, 1);
  at::Tensor out = at::empty_like(xc);
  at::Tensor wc = w.to(at::kFloat).contiguous();
  const float* src = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(H, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    detail::rms_norm_rows(src + r0 * H, wp, dst + r0 * H, r1 - r0, H, static_cast<float>(eps));
  });
  return out;
}

// silu(gate) * up elementwise (batch-invariant: a scalar exp per value).
at::Tensor silu_mul_invariant(const at::Tensor& gate, const at::Tensor& up) {
  at::Tensor g = gate.contiguous(), u = up.contiguous();
  at::Tensor out = at::empty_like(g);
  const float* gp = g.data_ptr<float>();
  const float* upp = u.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, g.numel(), 32768, [&](int64_t i0, int64_t i1) {
    detail::silu_mul(gp + i0, upp + i0, op + i0, i1 - i0);
  });
  return out;
}

// Keys visited by one query of the KV-cache (or cache-less) forward:
// positions j of one sequence and kv head, rows `stride` floats apart,
// hidden where the mask row says so.
struct MaskedKeys {
  const float* k;
  const float* v;
  int64_t k_stride, v_stride, n;
  const bool* hidden;
  template <typename F>
  void operator()(F&& f) const {
    for (int64_t j = 0; j < n; ++j) {
      if (!hidden[j]) f(j, k + j * k_stride, v + j * v_stride);
    }
  }
};

// Keys of one sequence and kv head in a paged cache: positions [0, n) in
// blocks table[p / block_size], each block `block_stride` floats from the
// previous, rows hd floats apart within a block.
struct PagedKeys {
  const float* k;  // kv head's rows of block 0
  const float* v;
  const int32_t* table;
  int64_t block_stride, block_size, hd, n;
  template <typename F>
  void operator()(F&& f) const {
    int64_t j = 0;
    for (int64_t b = 0; j < n; ++b) {
      const float* kb = k + table[b] * block_stride;
      const float* vb = v + table[b] * block_stride;
      for (int64_t s = 0; s < block_size && j < n; ++s, ++j) f(j, kb + s * hd, vb + s * hd);
    }
  }
};

at::Tensor rotate_half(const at::Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  return at::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
}

at::Tensor dense(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b = {}) {
  return b.defined() ? at::linear(x, w, b) : at::matmul(x, w.t());
}

at::Tensor swiglu(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& up,
                  const at::Tensor& down) {
  return dense(at::silu(dense(x, gate)) * dense(x, up), down);
}

std::pair<int64_t, int64_t> split_range(int64_t n, int64_t parts, int64_t index) {
  int64_t base = n / parts, extra = n % parts;
  return {index * base + std::min(index, extra), base + (index < extra ? 1 : 0)};
}

}  // namespace

at::Tensor linear_invariant(const at::Tensor& x, const at::Tensor& w) {
  return detail::linear_fixed(x, w);
}

std::vector<at::Tensor> LinearOverride::linear_group(const std::vector<std::string>& names,
                                                     const at::Tensor& x) {
  std::vector<at::Tensor> out;
  for (const std::string& name : names) out.push_back(linear(name, x));
  return out;
}

// Heads [first, first + count) of query row `row` (rows of nh * hd floats
// in q and out) attend to `keys`, at most detail::kMaxQueryGroup at a time.
template <typename Keys>
void attend_heads(const float* q, float* out, int64_t row, int64_t nh, int64_t first, int64_t count,
                  int64_t hd, float scale, const Keys& keys, float* scores, int64_t stride) {
  for (int64_t h0 = first; h0 < first + count; h0 += detail::kMaxQueryGroup) {
    const int n = static_cast<int>(std::min<int64_t>(detail::kMaxQueryGroup, first + count - h0));
    const float* qs[detail::kMaxQueryGroup];
    float* os[detail::kMaxQueryGroup];
    for (int k = 0; k < n; ++k) {
      qs[k] = q + (row * nh + h0 + k) * hd;
      os[k] = out + (row * nh + h0 + k) * hd;
    }
    detail::attend_queries(qs, n, hd, scale, keys, scores, stride, os);
  }
}

// ---------------------------------------------------------------------------
// PagedKVCache

PagedKVCache::PagedKVCache(const ModelConfig& config, int64_t num_blocks, int64_t block_size,
                           int tp_size)
    : num_blocks_(num_blocks), block_size_(block_size) {
  TESSERA_CHECK(num_blocks >= 1 && block_size >= 1, InvalidArgument, "paged KV cache: num_blocks (",
                num_blocks, ") and block_size (", block_size, ") must be positive");
  TESSERA_CHECK(tp_size >= 1 && config.num_key_value_heads % tp_size == 0, InvalidArgument,
                "paged KV cache: ", config.num_key_value_heads,
                " kv heads do not split over tp=", tp_size);
  const int64_t heads = config.num_key_value_heads / tp_size, hd = config.head_size();
  for (int64_t l = 0; l < config.num_hidden_layers; ++l) {
    keys_.push_back(at::zeros({num_blocks, heads, block_size, hd}, at::kFloat));
    values_.push_back(at::zeros({num_blocks, heads, block_size, hd}, at::kFloat));
  }
}

void PagedKVCache::copy_block(int64_t src, int64_t dst) {
  TESSERA_CHECK(src >= 0 && src < num_blocks_ && dst >= 0 && dst < num_blocks_, InvalidArgument,
                "paged KV cache: block copy ", src, " -> ", dst, " outside [0, ", num_blocks_, ")");
  if (src == dst) return;
  for (size_t l = 0; l < keys_.size(); ++l) {
    keys_[l][dst].copy_(keys_[l][src]);
    values_[l][dst].copy_(values_[l][src]);
  }
}

void PagedKVCache::copy_slots(int64_t src_block, int64_t src_slot, int64_t dst_block,
                              int64_t dst_slot, int64_t count) {
  auto in_range = [&](int64_t block, int64_t slot) {
    return block >= 0 && block < num_blocks_ && slot >= 0 && count >= 0 &&
           slot + count <= block_size_;
  };
  TESSERA_CHECK(in_range(src_block, src_slot) && in_range(dst_block, dst_slot), InvalidArgument,
                "paged KV cache: slot copy of ", count, " from block ", src_block, " slot ",
                src_slot, " to block ", dst_block, " slot ", dst_slot, " leaves the ", num_blocks_,
                " blocks of ", block_size_, " slots");
  if (count == 0 || (src_block == dst_block && src_slot == dst_slot)) return;
  for (size_t l = 0; l < keys_.size(); ++l) {
    for (at::Tensor* pool : {&keys_[l], &values_[l]}) {
      (*pool)[dst_block]
          .narrow(1, dst_slot, count)
          .copy_((*pool)[src_block].narrow(1, src_slot, count));
    }
  }
}

int64_t PagedKVCache::bytes() const {
  int64_t n = 0;
  for (size_t l = 0; l < keys_.size(); ++l) n += tensor_bytes(keys_[l]) + tensor_bytes(values_[l]);
  return n;
}

int64_t PagedKVCache::bytes_per_block(const ModelConfig& config, int64_t block_size, int tp_size) {
  return 2 * config.num_hidden_layers * (config.num_key_value_heads / std::max(tp_size, 1)) *
         block_size * config.head_size() * static_cast<int64_t>(sizeof(float));
}

// ---------------------------------------------------------------------------
// Transformer

struct Transformer::Impl {
  ModelConfig config;
  ParallelGroups groups;
  at::ScalarType dtype;
  std::vector<ParameterSpec> specs;  // full model
  std::map<std::string, size_t> spec_index;
  std::vector<std::pair<std::string, at::Tensor>> params;  // this rank's
  std::map<std::string, size_t> param_index;
  at::Tensor embed, final_norm, lm_head;
  std::vector<LayerWeights> layers;
  at::Tensor inv_freq;
  int64_t experts_per_rank = 0, first_expert = 0;
  int64_t vocab_start = 0, vocab_local = 0;
  std::vector<int64_t> vocab_sizes;  // per tp rank
  std::shared_ptr<LinearAdapter> adapter;
  std::shared_ptr<LinearOverride> linear_override;
  AdapterContext adapter_context;  // of the forward in progress
  bool invariant = false;          // ForwardOptions::batch_invariant of the forward in progress
  bool record_attention =
      false;  // keep the last attention's argmax key per query (routing records)
  const ForwardOptions* options = nullptr;  // of the forward in progress
  bool routing_stats = true;  // load and aux-loss statistics of MoE layers (off in paged forwards)
  at::Tensor last_attention_argmax;
  // RoPE tables of the batch-invariant paths, [positions, hd] each, grown
  // on demand (rows are computed one by one, so growing changes no row).
  at::Tensor rope_cos, rope_sin;

  // A linear layer by Hugging Face module name, with the override and the
  // adapter applied.
  at::Tensor proj(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                  const std::string& name) {
    at::Tensor y;
    if (linear_override) y = linear_override->linear(name, x);
    if (!y.defined()) {
      if (invariant) {
        y = linear_invariant(x, w);
        if (b.defined()) y = y + b;
      } else {
        y = dense(x, w, b);
      }
    } else if (b.defined()) {
      y = y + b;
    }
    return adapter ? adapter->apply(name, x, y, adapter_context) : y;
  }

  // Several proj() of one input x, through LinearOverride::linear_group
  // (one product where the override can fuse them). Batch-invariant
  // forwards only. `biases` entries may point to undefined tensors.
  std::vector<at::Tensor> proj_group(const at::Tensor& x,
                                     const std::vector<const at::Tensor*>& weights,
                                     const std::vector<const at::Tensor*>& biases,
                                     const std::vector<std::string>& names) {
    std::vector<at::Tensor> ys;
    if (linear_override) ys = linear_override->linear_group(names, x);
    ys.resize(names.size());
    for (size_t i = 0; i < names.size(); ++i) {
      if (!ys[i].defined()) ys[i] = linear_invariant(x, *weights[i]);
      if (biases[i]->defined()) ys[i] = ys[i] + *biases[i];
      if (adapter) ys[i] = adapter->apply(names[i], x, ys[i], adapter_context);
    }
    return ys;
  }

  at::Tensor mlp(const at::Tensor& x, const ExpertWeights& e, const std::string& gate,
                 const std::string& up, const std::string& down) {
    if (invariant) {
      const at::Tensor none;
      auto ys = proj_group(x, {&e.gate, &e.up}, {&none, &none}, {gate, up});
      return proj(silu_mul_invariant(ys[0], ys[1]), e.down, {}, down);
    }
    if (!adapter && !linear_override) return swiglu(x, e.gate, e.up, e.down);
    return proj(at::silu(proj(x, e.gate, {}, gate)) * proj(x, e.up, {}, up), e.down, {}, down);
  }

  // Makes the RoPE tables cover positions [0, n): cos and sin of position *
  // inv_freq in fp32, one scalar call per value.
  void ensure_rope(int64_t n) {
    const int64_t have = rope_cos.defined() ? rope_cos.size(0) : 0;
    if (n <= have) return;
    const int64_t rows = std::max<int64_t>({n, 2 * have, 256});
    const int64_t hd = config.head_size(), half = hd / 2;
    at::Tensor cos_t = at::empty({rows, hd}, at::kFloat), sin_t = at::empty({rows, hd}, at::kFloat);
    if (have > 0) {
      cos_t.narrow(0, 0, have).copy_(rope_cos);
      sin_t.narrow(0, 0, have).copy_(rope_sin);
    }
    at::Tensor inv = inv_freq.to(at::kFloat).contiguous();
    const float* f = inv.data_ptr<float>();
    float* cp = cos_t.data_ptr<float>();
    float* sp = sin_t.data_ptr<float>();
    for (int64_t p = have; p < rows; ++p) {
      for (int64_t i = 0; i < half; ++i) {
        const float angle = static_cast<float>(p) * f[i];
        cp[p * hd + i] = cp[p * hd + half + i] = std::cos(angle);
        sp[p * hd + i] = sp[p * hd + half + i] = std::sin(angle);
      }
    }
    rope_cos = cos_t;
    rope_sin = sin_t;
  }

  // q, k, v projections of h (rows of any leading shape) with RoPE applied
  // to q and k at `positions` (one per row), batch-invariantly. Returns
  // contiguous [rows, heads * hd] tensors.
  std::array<at::Tensor, 3> qkv_invariant(const LayerWeights& w, const at::Tensor& h,
                                          const std::vector<int64_t>& positions) {
    const ModelConfig& c = config;
    const int64_t hd = c.head_size();
    const int64_t nh = c.num_attention_heads / groups.tp_size();
    const int64_t nkv = c.num_key_value_heads / groups.tp_size();
    const int64_t rows = static_cast<int64_t>(positions.size());
    const std::string a = w.prefix + "self_attn.";
    auto ys = proj_group(h, {&w.q, &w.k, &w.v}, {&w.q_bias, &w.k_bias, &w.v_bias},
                         {a + "q_proj", a + "k_proj", a + "v_proj"});
    at::Tensor q = ys[0].reshape({rows, nh * hd}).contiguous();
    at::Tensor k = ys[1].reshape({rows, nkv * hd}).contiguous();
    at::Tensor v = ys[2].reshape({rows, nkv * hd}).contiguous();
    int64_t top = 0;
    for (int64_t p : positions) top = std::max(top, p + 1);
    ensure_rope(top);
    detail::rope_rows(q.data_ptr<float>(), rows, nh, hd, positions.data(),
                      rope_cos.data_ptr<float>(), rope_sin.data_ptr<float>());
    detail::rope_rows(k.data_ptr<float>(), rows, nkv, hd, positions.data(),
                      rope_cos.data_ptr<float>(), rope_sin.data_ptr<float>());
    return {q, k, v};
  }

  bool owns(const ParameterSpec& s) const {
    return s.expert < 0 || (s.expert >= first_expert && s.expert < first_expert + experts_per_rank);
  }

  dist::Layout layout_for(const ParameterSpec& s) const {
    return parameter_layout(s, config.num_experts, groups.tp_size(), groups.ep_size());
  }

  at::Tensor& param(const std::string& name) {
    auto it = param_index.find(name);
    TESSERA_CHECK(it != param_index.end(), NotFound, "model has no parameter '", name,
                  "' on this rank");
    return params[it->second].second;
  }

  void bind() {
    const ModelConfig& c = config;
    embed = param("model.embed_tokens.weight");
    final_norm = param("model.norm.weight");
    lm_head = c.tie_word_embeddings ? embed : param("lm_head.weight");
    layers.assign(c.num_hidden_layers, {});
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
      const std::string p = layer_prefix(l);
      LayerWeights& w = layers[l];
      w.prefix = p;
      w.input_norm = param(p + "input_layernorm.weight");
      w.post_norm = param(p + "post_attention_layernorm.weight");
      w.q = param(p + "self_attn.q_proj.weight");
      w.k = param(p + "self_attn.k_proj.weight");
      w.v = param(p + "self_attn.v_proj.weight");
      w.o = param(p + "self_attn.o_proj.weight");
      if (c.attention_bias) {
        w.q_bias = param(p + "self_attn.q_proj.bias");
        w.k_bias = param(p + "self_attn.k_proj.bias");
        w.v_bias = param(p + "self_attn.v_proj.bias");
      }
      w.moe = c.is_moe_layer(l);
      if (w.moe) {
        MoeNames n = moe_names(c, l);
        w.router = param(n.router);
        for (int64_t j = first_expert; j < first_expert + experts_per_rank; ++j) {
          w.experts.push_back({param(with_expert(n.expert_gate, j)),
                               param(with_expert(n.expert_up, j)),
                               param(with_expert(n.expert_down, j))});
        }
        if (c.shared_expert_intermediate_size > 0) {
          w.shared = {param(n.shared_gate_proj), param(n.shared_up_proj),
                      param(n.shared_down_proj)};
          w.shared_gate = param(n.shared_gate);
        }
      } else {
        w.gate = param(p + "mlp.gate_proj.weight");
        w.up = param(p + "mlp.up_proj.weight");
        w.down = param(p + "mlp.down_proj.weight");
      }
    }
  }

  // Self-attention of one layer; returns the row-parallel partial output.
  at::Tensor attention(const LayerWeights& w, const at::Tensor& h, const at::Tensor& cos,
                       const at::Tensor& sin, const at::Tensor& mask, KVCache* cache, int64_t layer,
                       const at::Tensor& starts, int64_t kv_len, bool invariant) {
    const ModelConfig& c = config;
    const int64_t B = h.size(0), T = h.size(1), hd = c.head_size();
    const int64_t nh = c.num_attention_heads / groups.tp_size();
    const int64_t nkv = c.num_key_value_heads / groups.tp_size();
    const std::string a = w.prefix + "self_attn.";
    if (invariant) return attention_invariant(w, h, mask, cache, layer, starts, kv_len);
    at::Tensor q = proj(h, w.q, w.q_bias, a + "q_proj").view({B, T, nh, hd}).transpose(1, 2);
    at::Tensor k = proj(h, w.k, w.k_bias, a + "k_proj").view({B, T, nkv, hd}).transpose(1, 2);
    at::Tensor v = proj(h, w.v, w.v_bias, a + "v_proj").view({B, T, nkv, hd}).transpose(1, 2);
    q = q * cos + rotate_half(q) * sin;
    k = k * cos + rotate_half(k) * sin;
    if (cache) {
      at::Tensor& kc = cache->key(layer);
      at::Tensor& vc = cache->value(layer);
      // Write each sequence's new entries at its own offset: one indexed
      // write per cache, through a [B, max_len, kv_heads, head_dim] view.
      at::Tensor rows = at::arange(B, at::kLong).view({B, 1}).expand({B, T});
      at::Tensor cols = starts.view({B, 1}) + at::arange(T, at::kLong).view({1, T});
      kc.permute({0, 2, 1, 3}).index_put_({rows, cols}, k.transpose(1, 2));
      vc.permute({0, 2, 1, 3}).index_put_({rows, cols}, v.transpose(1, 2));
      k = kc.narrow(2, 0, kv_len);
      v = vc.narrow(2, 0, kv_len);
    }
    const int64_t rep = nh / nkv;
    if (rep > 1) {
      const int64_t L = k.size(2);
      k = k.unsqueeze(2).expand({B, nkv, rep, L, hd}).reshape({B, nh, L, hd});
      v = v.unsqueeze(2).expand({B, nkv, rep, L, hd}).reshape({B, nh, L, hd});
    }
    at::Tensor scores =
        at::matmul(q, k.transpose(-1, -2)) * (1.0 / std::sqrt(static_cast<double>(hd)));
    scores = scores.masked_fill(mask, -std::numeric_limits<float>::infinity());
    at::Tensor probs =
        at::softmax(scores.to(accumulate_type(scores.scalar_type())), -1).to(q.scalar_type());
    if (record_attention) last_attention_argmax = probs.detach().sum(1).argmax(-1).reshape({B * T});
    at::Tensor out = at::matmul(probs, v).transpose(1, 2).reshape({B, T, nh * hd});
    return proj(out, w.o, {}, a + "o_proj");
  }

  // The batch-invariant attention of the KV-cache (or cache-less) forward:
  // h [B, T, H], mask [B, 1, T, kv_len] (true: hidden).
  at::Tensor attention_invariant(const LayerWeights& w, const at::Tensor& h, const at::Tensor& mask,
                                 KVCache* cache, int64_t layer, const at::Tensor& starts,
                                 int64_t kv_len) {
    const ModelConfig& c = config;
    const int64_t B = h.size(0), T = h.size(1), hd = c.head_size();
    const int64_t nh = c.num_attention_heads / groups.tp_size();
    const int64_t nkv = c.num_key_value_heads / groups.tp_size();
    check_invariant_input(h);
    std::vector<int64_t> positions(B * T);
    auto st = starts.accessor<int64_t, 1>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t) positions[b * T + t] = st[b] + t;
    auto [q, k, v] = qkv_invariant(w, h, positions);
    // Keys [B, nkv, L, hd] with strides; the cache's, or this forward's own.
    at::Tensor keys, values;
    if (cache) {
      at::Tensor& kc = cache->key(layer);
      at::Tensor& vc = cache->value(layer);
      at::Tensor rows = at::arange(B, at::kLong).view({B, 1}).expand({B, T});
      at::Tensor cols = starts.view({B, 1}) + at::arange(T, at::kLong).view({1, T});
      kc.permute({0, 2, 1, 3}).index_put_({rows, cols}, k.view({B, T, nkv, hd}));
      vc.permute({0, 2, 1, 3}).index_put_({rows, cols}, v.view({B, T, nkv, hd}));
      keys = kc;
      values = vc;
    } else {
      keys = k.view({B, T, nkv, hd}).transpose(1, 2);
      values = v.view({B, T, nkv, hd}).transpose(1, 2);
    }
    TESSERA_CHECK(keys.stride(3) == 1 && values.stride(3) == 1, Internal,
                  "attention: key rows must be contiguous");
    at::Tensor mc = mask.to(at::kBool).contiguous();
    const bool* mp = mc.data_ptr<bool>();
    const float* qp = q.data_ptr<float>();
    const float* kp = keys.data_ptr<float>();
    const float* vp = values.data_ptr<float>();
    at::Tensor out = at::empty({B, T, nh * hd}, at::kFloat);
    float* op = out.data_ptr<float>();
    const int64_t rep = nh / nkv;
    const float scale = 1.f / std::sqrt(static_cast<float>(hd));
    // One task per (query row, kv head): the kv head's query heads together.
    at::parallel_for(0, B * T * nkv, 1, [&](int64_t i0, int64_t i1) {
      std::vector<float> scores(std::min<int64_t>(rep, detail::kMaxQueryGroup) * kv_len);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t row = i / nkv, kvh = i % nkv, b = row / T, t = row % T;
        MaskedKeys keys_of{kp + b * keys.stride(0) + kvh * keys.stride(1),
                           vp + b * values.stride(0) + kvh * values.stride(1),
                           keys.stride(2),
                           values.stride(2),
                           kv_len,
                           mp + (b * T + t) * kv_len};
        attend_heads(qp, op, row, nh, kvh * rep, rep, hd, scale, keys_of, scores.data(), kv_len);
      }
    });
    return proj(out, w.o, {}, w.prefix + "self_attn.o_proj");
  }

  // Attention of a paged forward: h [N, H] are the batch's tokens, whose
  // keys and values go to their slots before any token attends.
  at::Tensor attention_paged(const LayerWeights& w, const at::Tensor& h, int64_t layer,
                             const PagedBatch& batch, const std::vector<int64_t>& positions,
                             const std::vector<int64_t>& seq_of) {
    const ModelConfig& c = config;
    const int64_t N = h.size(0), hd = c.head_size();
    const int64_t nh = c.num_attention_heads / groups.tp_size();
    const int64_t nkv = c.num_key_value_heads / groups.tp_size(), rep = nh / nkv;
    PagedKVCache& cache = *batch.cache;
    const int64_t bs = cache.block_size();
    auto [q, k, v] = qkv_invariant(w, h, positions);
    float* kpool = cache.key(layer).data_ptr<float>();
    float* vpool = cache.value(layer).data_ptr<float>();
    const int64_t block_stride = nkv * bs * hd;
    const float* kp = k.data_ptr<float>();
    const float* vp = v.data_ptr<float>();
    for (int64_t i = 0; i < N; ++i) {
      const auto& table = batch.sequences[seq_of[i]].block_table;
      const int64_t p = positions[i];
      const int64_t base = table[p / bs] * block_stride + (p % bs) * hd;
      for (int64_t g = 0; g < nkv; ++g) {
        std::copy(kp + (i * nkv + g) * hd, kp + (i * nkv + g + 1) * hd, kpool + base + g * bs * hd);
        std::copy(vp + (i * nkv + g) * hd, vp + (i * nkv + g + 1) * hd, vpool + base + g * bs * hd);
      }
    }
    const float* qp = q.data_ptr<float>();
    at::Tensor out = at::empty({N, nh * hd}, at::kFloat);
    float* op = out.data_ptr<float>();
    const float scale = 1.f / std::sqrt(static_cast<float>(hd));
    int64_t longest = 0;
    for (int64_t p : positions) longest = std::max(longest, p + 1);
    // One task per (token, kv head); grain so that short contexts share a task.
    const int64_t grain =
        std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, longest * hd * rep));
    at::parallel_for(0, N * nkv, grain, [&](int64_t i0, int64_t i1) {
      std::vector<float> scores(std::min<int64_t>(rep, detail::kMaxQueryGroup) * longest);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t row = i / nkv, kvh = i % nkv;
        const auto& table = batch.sequences[seq_of[row]].block_table;
        PagedKeys keys_of{
            kpool + kvh * bs * hd, vpool + kvh * bs * hd, table.data(), block_stride, bs, hd,
            positions[row] + 1};
        attend_heads(qp, op, row, nh, kvh * rep, rep, hd, scale, keys_of, scores.data(), longest);
      }
    });
    return proj(out, w.o, {}, w.prefix + "self_attn.o_proj");
  }

  // The router's decision for tokens x [N, H]: logits and probs [N, E]
  // (accumulation type), each token's top-k experts top_e [N, K] and their
  // weights top_w [N, K] (normalized when norm_topk_prob, in x's dtype).
  struct MoeRouting {
    at::Tensor logits, probs, top_w, top_e;
  };
  MoeRouting route(const LayerWeights& w, const at::Tensor& x) {
    const ModelConfig& c = config;
    MoeRouting r;
    if (invariant) return route_invariant(w, x);
    r.logits = dense(x, w.router).to(accumulate_type(x.scalar_type()));
    r.probs = at::softmax(r.logits, -1);
    std::tie(r.top_w, r.top_e) = r.probs.topk(c.num_experts_per_tok, -1);
    if (c.norm_topk_prob) r.top_w = r.top_w / r.top_w.sum(-1, true);
    r.top_w = r.top_w.to(x.scalar_type());
    return r;
  }

  // route() with every row computed by itself in a fixed order: softmax with
  // scalar exps, top-k by repeated selection (ties: lower expert first),
  // weights renormalised in slot order.
  MoeRouting route_invariant(const LayerWeights& w, const at::Tensor& x) {
    const ModelConfig& c = config;
    const int64_t N = x.size(0), E = c.num_experts, K = c.num_experts_per_tok;
    MoeRouting r;
    r.logits = linear_invariant(x, w.router);
    r.probs = at::empty({N, E}, at::kFloat);
    r.top_w = at::empty({N, K}, at::kFloat);
    r.top_e = at::empty({N, K}, at::kLong);
    const float* lp = r.logits.data_ptr<float>();
    float* pp = r.probs.data_ptr<float>();
    float* wp = r.top_w.data_ptr<float>();
    int64_t* ep = r.top_e.data_ptr<int64_t>();
    for (int64_t n = 0; n < N; ++n) {
      const float* l = lp + n * E;
      float* p = pp + n * E;
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t e = 0; e < E; ++e) mx = std::max(mx, l[e]);
      float sum = 0.f;
      for (int64_t e = 0; e < E; ++e) {
        p[e] = std::exp(l[e] - mx);
        sum += p[e];
      }
      for (int64_t e = 0; e < E; ++e) p[e] /= sum;
      float total = 0.f;
      for (int64_t k = 0; k < K; ++k) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; ++e) {
          bool taken = false;
          for (int64_t j = 0; j < k; ++j) taken = taken || ep[n * K + j] == e;
          if (!taken && (best < 0 || p[e] > p[best])) best = e;
        }
        ep[n * K + k] = best;
        wp[n * K + k] = p[best];
        total += p[best];
      }
      if (c.norm_topk_prob) {
        for (int64_t k = 0; k < K; ++k) wp[n * K + k] /= total;
      }
    }
    return r;
  }

  // Load statistics and auxiliary losses (Switch load balancing, ST-MoE
  // z-loss) of one layer's routing over N tokens, and its routing record.
  void account_routing(const MoeRouting& r, int64_t N, int64_t layer, ForwardOutput& out,
                       bool record, std::vector<at::Tensor>& loads) {
    const ModelConfig& c = config;
    const int64_t E = c.num_experts, K = c.num_experts_per_tok;
    at::Tensor counts = at::zeros({E}, at::kFloat)
                            .index_add_(0, r.top_e.reshape({-1}), at::ones({N * K}, at::kFloat));
    loads.push_back(counts);
    if (N > 0 && (c.router_aux_loss_coef > 0 || c.router_z_loss_coef > 0)) {
      at::Tensor frac = counts / static_cast<double>(N * K);
      at::Tensor mean_prob = r.probs.mean(0);
      at::Tensor aux = (frac * mean_prob).sum() * static_cast<double>(E) * c.router_aux_loss_coef;
      if (c.router_z_loss_coef > 0)
        aux = aux + r.logits.logsumexp(-1).pow(2).mean() * c.router_z_loss_coef;
      out.aux_loss = out.aux_loss.defined() ? out.aux_loss + aux : aux;
    }
    if (record) {
      out.routing.push_back({layer, r.top_e.detach().clone(),
                             r.top_w.detach().to(at::kFloat).clone(), r.probs.detach().clone(),
                             last_attention_argmax});
    }
  }

  // ForwardOptions::expert_override in place of the routed experts (plus the
  // shared expert).
  at::Tensor override_experts(const LayerWeights& w, const at::Tensor& x, int64_t layer,
                              const MoeRouting& r) {
    const ModelConfig& c = config;
    TESSERA_CHECK(groups.tp_size() == 1 && groups.ep_size() == 1, InvalidArgument,
                  "ForwardOptions::expert_override needs a single-rank model (no tp / ep)");
    at::Tensor result = options->expert_override(layer, x, r.top_e, r.top_w);
    check_shape(result, x.sizes(), "expert_override result");
    if (c.shared_expert_intermediate_size > 0) {
      result = result + at::sigmoid(dense(x, w.shared_gate)) *
                            swiglu(x, w.shared.gate, w.shared.up, w.shared.down);
    }
    return result;
  }

  // The token rows each expert receives. `order` holds the kept (token,
  // slot) assignments sorted by expert, as indices into top_e.reshape(-1);
  // `rows` their tokens' rows, on this rank after the expert-parallel
  // exchange; count_matrix [sources, E] how many rows each source rank sent
  // for each expert; the splits are for the return trip.
  struct MoeDispatch {
    at::Tensor order, rows, count_matrix;
    std::vector<int64_t> send_splits, recv_splits;
  };
  MoeDispatch dispatch(const at::Tensor& x, const at::Tensor& top_e) {
    const ModelConfig& c = config;
    const int64_t N = x.size(0), E = c.num_experts, K = c.num_experts_per_tok;
    MoeDispatch d;
    // Sort assignments by expert (stable: token order within an expert).
    at::Tensor flat_e = top_e.reshape({-1});
    d.order = std::get<1>(flat_e.sort(/*stable=*/true, 0, false));
    at::Tensor sorted_e = flat_e.index_select(0, d.order);
    at::Tensor keep;  // capacity: drop assignments past each expert's capacity
    // Capacity drops depend on the whole batch; batch-invariant (inference)
    // forwards keep every assignment.
    if (c.capacity_factor > 0 && !invariant) {
      const int64_t capacity = static_cast<int64_t>(std::ceil(c.capacity_factor * N * K / E));
      at::Tensor per_expert =
          at::zeros({E}, at::kLong).index_add_(0, flat_e, at::ones_like(flat_e));
      at::Tensor starts = per_expert.cumsum(0) - per_expert;
      at::Tensor rank_in_expert = at::arange(N * K, at::kLong) - starts.index_select(0, sorted_e);
      keep = rank_in_expert < capacity;
      d.order = d.order.masked_select(keep);
      sorted_e = sorted_e.masked_select(keep);
    }
    at::Tensor expert_counts =
        at::zeros({E}, at::kLong).index_add_(0, sorted_e, at::ones_like(sorted_e));
    d.rows = x.index_select(0, d.order.div(K, "floor"));

    // Expert parallel: send each expert's rows to its owner.
    const int ep = groups.ep_size();
    d.send_splits.assign(ep, 0);
    d.recv_splits.assign(ep, 0);
    d.count_matrix = expert_counts.view({1, E});
    if (ep > 1) {
      auto ec = expert_counts.accessor<int64_t, 1>();
      for (int64_t j = 0; j < E; ++j) d.send_splits[j / experts_per_rank] += ec[j];
      d.count_matrix = at::empty({ep, E}, at::kLong);
      groups.ep->all_gather(d.count_matrix, expert_counts.view({1, E})).wait();
      auto cm = d.count_matrix.accessor<int64_t, 2>();
      for (int s = 0; s < ep; ++s) {
        for (int64_t j = first_expert; j < first_expert + experts_per_rank; ++j)
          d.recv_splits[s] += cm[s][j];
      }
      d.rows = all_to_all_rows(d.rows, groups.ep, d.recv_splits, d.send_splits);
    }
    return d;
  }

  // Rows arrive grouped by source rank, then by expert: run each local
  // expert once on its rows from every source, then put the results back
  // in arrival order for the return trip.
  at::Tensor run_local_experts(const LayerWeights& w, int64_t layer, const MoeDispatch& d) {
    const ModelConfig& c = config;
    const int sources = groups.ep_size();
    auto cm = d.count_matrix.accessor<int64_t, 2>();
    std::vector<std::vector<std::pair<int64_t, int64_t>>> spans(
        experts_per_rank);  // (offset, rows)
    int64_t offset = 0;
    for (int s = 0; s < sources; ++s) {
      for (int64_t j = first_expert; j < first_expert + experts_per_rank; ++j) {
        spans[j - first_expert].push_back({offset, cm[s][j]});
        offset += cm[s][j];
      }
    }
    std::vector<at::Tensor> ordered(sources * experts_per_rank);
    for (int64_t e = 0; e < experts_per_rank; ++e) {
      std::vector<at::Tensor> ins;
      for (auto [off, n] : spans[e]) ins.push_back(d.rows.narrow(0, off, n));
      at::Tensor in = ins.size() == 1 ? ins[0] : at::cat(ins, 0);
      const ExpertWeights& ew = w.experts[e];
      at::Tensor y;
      if (invariant && in.size(0) == 0) {
        y = at::empty({0, in.size(1)}, in.options());
      } else if (adapter || linear_override || invariant) {
        MoeNames names = moe_names(c, layer);
        auto strip = [](std::string n) { return n.substr(0, n.size() - 7); };  // ".weight"
        const int64_t j = first_expert + e;
        // Per-row adapters follow the rows to their expert (one source rank:
        // the rows are this forward's own tokens, in d.order).
        const at::Tensor all_tokens = adapter_context.token_adapters;
        if (all_tokens.defined() && sources == 1) {
          const int64_t off = spans[e][0].first, n = spans[e][0].second;
          adapter_context.token_adapters = all_tokens.index_select(
              0, d.order.narrow(0, off, n).div(c.num_experts_per_tok, "floor"));
        }
        y = mlp(in, ew, strip(with_expert(names.expert_gate, j)),
                strip(with_expert(names.expert_up, j)), strip(with_expert(names.expert_down, j)));
        adapter_context.token_adapters = all_tokens;
      } else {
        y = swiglu(in, ew.gate, ew.up, ew.down);
      }
      int64_t pos = 0;
      for (int s = 0; s < sources; ++s) {
        int64_t n = spans[e][s].second;
        ordered[s * experts_per_rank + e] = y.narrow(0, pos, n);
        pos += n;
      }
    }
    return at::cat(ordered, 0);
  }

  // MoE MLP over flattened tokens x [N, H] (replicated over tp). Returns the
  // tp-partial output and adds the layer's aux loss / load / routing.
  at::Tensor moe(const LayerWeights& w, const at::Tensor& x, int64_t layer, ForwardOutput& out,
                 bool record, std::vector<at::Tensor>& loads) {
    const ModelConfig& c = config;
    const int64_t N = x.size(0), K = c.num_experts_per_tok;
    const MoeRouting r = route(w, x);
    if (routing_stats) account_routing(r, N, layer, out, record, loads);
    if (options && options->expert_override) return override_experts(w, x, layer, r);
    // Tokens on a GPU: nn::moe_mixture, whose device path is the token
    // permutation kernels (kernels/moe). Same assignments as dispatch()
    // without capacity drops; the CPU path below keeps its own order.
    const bool drops = c.capacity_factor > 0 && !invariant;
    if (x.is_cuda() && groups.ep_size() == 1 && !drops && !adapter && !linear_override) {
      at::Tensor result =
          moe_mixture(x, r.top_e, r.top_w, c.num_experts, [&](int64_t e, const at::Tensor& rows) {
            const ExpertWeights& ew = w.experts[e];
            return swiglu(rows, ew.gate, ew.up, ew.down);
          });
      return add_shared_expert(w, x, result);
    }

    const MoeDispatch d = dispatch(x, r.top_e);
    at::Tensor back = run_local_experts(w, layer, d);
    if (groups.ep_size() > 1) back = all_to_all_rows(back, groups.ep, d.send_splits, d.recv_splits);

    if (invariant) return add_shared_expert(w, x, combine_invariant(r, d, back, N));
    // Combine: each kept assignment's output times its weight, summed per token.
    at::Tensor weights = r.top_w.reshape({-1}).index_select(0, d.order).unsqueeze(1);
    at::Tensor result = at::zeros({N, x.size(1)}, x.options())
                            .index_add(0, d.order.div(K, "floor"), back * weights);
    return add_shared_expert(w, x, result);
  }

  // Each token's output: its slots' expert outputs times their weights,
  // added in slot order (batch-invariant). back holds one row per entry of
  // d.order (every assignment is kept: no capacity drops when invariant).
  at::Tensor combine_invariant(const MoeRouting& r, const MoeDispatch& d, const at::Tensor& back,
                               int64_t N) {
    const int64_t K = config.num_experts_per_tok, H = back.size(1);
    TESSERA_CHECK(d.order.numel() == N * K, Internal, "MoE combine: ", d.order.numel(),
                  " assignments for ", N, " tokens of ", K);
    std::vector<int64_t> row_of(N * K);
    auto order = d.order.accessor<int64_t, 1>();
    for (int64_t i = 0; i < N * K; ++i) row_of[order[i]] = i;
    at::Tensor bc = back.contiguous();
    at::Tensor result = at::empty({N, H}, at::kFloat);
    const float* bp = bc.data_ptr<float>();
    const float* wp = r.top_w.data_ptr<float>();
    float* op = result.data_ptr<float>();
    for (int64_t n = 0; n < N; ++n) {
      float* o = op + n * H;
      std::fill(o, o + H, 0.f);
      for (int64_t k = 0; k < K; ++k) {
        const float weight = wp[n * K + k];
        const float* row = bp + row_of[n * K + k] * H;
        for (int64_t h = 0; h < H; ++h) o[h] += row[h] * weight;
      }
    }
    return result;
  }

  // Adds a Qwen2-MoE shared expert's gated output (when the model has one).
  at::Tensor add_shared_expert(const LayerWeights& w, const at::Tensor& x, at::Tensor result) {
    if (config.shared_expert_intermediate_size > 0 && invariant) {
      at::Tensor shared = linear_invariant(
          silu_mul_invariant(linear_invariant(x, w.shared.gate), linear_invariant(x, w.shared.up)),
          w.shared.down);
      at::Tensor gate = linear_invariant(x, w.shared_gate).contiguous();  // [N, 1]
      float* g = gate.data_ptr<float>();
      for (int64_t i = 0; i < gate.numel(); ++i) g[i] = 1.f / (1.f + std::exp(-g[i]));
      return result + gate * shared;
    }
    if (config.shared_expert_intermediate_size > 0) {
      at::Tensor shared = swiglu(x, w.shared.gate, w.shared.up, w.shared.down);
      // The sigmoid gate is replicated; the shared expert's output is
      // tp-partial like the experts', so the gate applies to each part.
      result = result + at::sigmoid(dense(x, w.shared_gate)) * shared;
    }
    return result;
  }

  // Transformer::forward with ForwardOptions::paged.
  ForwardOutput forward_paged(const at::Tensor& input_ids, const ForwardOptions& options) {
    const ModelConfig& c = config;
    const PagedBatch& batch = *options.paged;
    TESSERA_CHECK(groups.ep_size() == 1, InvalidArgument,
                  "paged forward: expert-parallel models are not supported (ep = 1)");
    TESSERA_CHECK(dtype == at::kFloat && embed.device().is_cpu(), InvalidArgument,
                  "paged forward: fp32 CPU models only");
    TESSERA_CHECK(!options.cache && !options.lengths.defined() && !options.last_logits_only &&
                      !options.sequence_adapters.defined() && !options.record_routing,
                  InvalidArgument,
                  "paged forward: cache, lengths, last_logits_only, sequence_adapters and "
                  "record_routing do not apply (the PagedBatch describes the batch)");
    TESSERA_CHECK(batch.cache != nullptr, InvalidArgument,
                  "paged forward: PagedBatch::cache is null");
    PagedKVCache& cache = *batch.cache;
    TESSERA_CHECK(cache.num_layers() == c.num_hidden_layers &&
                      cache.key(0).size(1) == c.num_key_value_heads / groups.tp_size() &&
                      cache.key(0).size(3) == c.head_size(),
                  InvalidArgument, "paged forward: the cache was made for another model config");
    TESSERA_CHECK(input_ids.size(0) == 1, InvalidArgument,
                  "paged forward: input_ids must be [1, tokens], got ",
                  shape_string(input_ids.sizes()));
    const int64_t N = input_ids.size(1), bs = cache.block_size();
    std::vector<int64_t> positions, seq_of;
    positions.reserve(N);
    seq_of.reserve(N);
    std::vector<int64_t> token_adapters;
    for (size_t s = 0; s < batch.sequences.size(); ++s) {
      const PagedBatch::Sequence& seq = batch.sequences[s];
      TESSERA_CHECK(seq.num_tokens >= 1 && seq.start_position >= 0, InvalidArgument,
                    "paged forward: sequence ", s, " has ", seq.num_tokens,
                    " tokens from position ", seq.start_position);
      const int64_t end = seq.start_position + seq.num_tokens;
      TESSERA_CHECK(static_cast<int64_t>(seq.block_table.size()) * bs >= end, InvalidArgument,
                    "paged forward: sequence ", s, "'s block table (", seq.block_table.size(),
                    " blocks of ", bs, ") does not cover position ", end - 1);
      for (int64_t b = 0; b < (end + bs - 1) / bs; ++b) {
        TESSERA_CHECK(seq.block_table[b] >= 0 && seq.block_table[b] < cache.num_blocks(),
                      InvalidArgument, "paged forward: sequence ", s, " names block ",
                      seq.block_table[b], " of a cache of ", cache.num_blocks());
      }
      for (int64_t t = 0; t < seq.num_tokens; ++t) {
        positions.push_back(seq.start_position + t);
        seq_of.push_back(static_cast<int64_t>(s));
        token_adapters.push_back(seq.adapter);
      }
    }
    TESSERA_CHECK(static_cast<int64_t>(positions.size()) == N, InvalidArgument,
                  "paged forward: ", N, " input tokens but the sequences hold ", positions.size());
    for (int64_t r : batch.logits_rows) {
      TESSERA_CHECK(r >= 0 && r < N, InvalidArgument, "paged forward: logits row ", r,
                    " outside the ", N, " tokens");
    }
    at::Tensor ids = input_ids.reshape({N}).contiguous();
    const int64_t* idp = ids.data_ptr<int64_t>();
    for (int64_t i = 0; i < N; ++i) {
      TESSERA_CHECK(idp[i] >= 0 && idp[i] < c.vocab_size, InvalidArgument,
                    "paged forward: token id ", idp[i], " outside the vocabulary of ",
                    c.vocab_size);
    }

    invariant = true;
    record_attention = false;
    routing_stats = false;
    this->options = &options;
    adapter_context = AdapterContext{};
    adapter_context.batch_invariant = true;
    if (adapter) adapter_context.token_adapters = at::tensor(token_adapters, at::kLong);

    // Under tp the embedding is vocabulary-parallel: each rank looks up the
    // ids of its shard (zero rows for the others), and the rank-order sum is
    // exact (one non-zero term per element).
    at::Tensor x;
    if (options.input_embeds.defined()) {
      x = checked_input_embeds(options.input_embeds, {1, N, c.hidden_size}, dtype)
              .reshape({N, c.hidden_size});
    } else if (groups.tp_size() > 1) {
      at::Tensor local = ids - vocab_start;
      at::Tensor inside = (local >= 0) & (local < vocab_local);
      at::Tensor part = at::embedding(embed, at::where(inside, local, at::zeros_like(local)));
      x = detail::sum_in_rank_order(part * inside.unsqueeze(-1).to(part.scalar_type()), groups.tp);
    } else {
      x = at::embedding(embed, ids);  // [N, H]
    }
    ForwardOutput out;
    std::vector<at::Tensor> loads;
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
      const LayerWeights& w = layers[l];
      at::Tensor h = rms_norm_invariant(x, w.input_norm, c.rms_norm_eps);
      x = x +
          detail::sum_in_rank_order(attention_paged(w, h, l, batch, positions, seq_of), groups.tp);
      h = rms_norm_invariant(x, w.post_norm, c.rms_norm_eps);
      at::Tensor y = w.moe ? moe(w, h, l, out, false, loads)
                           : mlp(h, {w.gate, w.up, w.down}, w.prefix + "mlp.gate_proj",
                                 w.prefix + "mlp.up_proj", w.prefix + "mlp.down_proj");
      x = x + detail::sum_in_rank_order(y, groups.tp);
    }
    at::Tensor rows = at::tensor(batch.logits_rows, at::kLong);
    at::Tensor h = rms_norm_invariant(x.index_select(0, rows), final_norm, c.rms_norm_eps);
    out.aux_loss = at::zeros({}, at::kFloat);
    if (options.hidden_only) {
      out.hidden = h.unsqueeze(0);
      return out;
    }
    at::Tensor logits;
    if (linear_override) logits = linear_override->linear("lm_head", h);
    if (!logits.defined()) logits = linear_invariant(h, lm_head);
    if (groups.tp_size() > 1) logits = detail::gather_last_dim(logits, groups.tp, vocab_sizes);
    out.logits = logits.unsqueeze(0);
    return out;
  }
};

Transformer::Transformer(ModelConfig config, ParallelGroups groups, at::ScalarType dtype)
    : impl_(std::make_unique<Impl>()) {
  config.validate();
  Impl& m = *impl_;
  m.config = std::move(config);
  m.groups = std::move(groups);
  m.dtype = dtype;
  const ModelConfig& c = m.config;
  const int tp = m.groups.tp_size(), ep = m.groups.ep_size();
  TESSERA_CHECK(c.num_key_value_heads % tp == 0 && c.num_attention_heads % tp == 0, InvalidArgument,
                "tensor parallel size ", tp, " must divide the ", c.num_attention_heads,
                " attention and ", c.num_key_value_heads, " kv heads");
  if (c.num_experts > 0) {
    TESSERA_CHECK(c.num_experts % ep == 0, InvalidArgument, "expert parallel size ", ep,
                  " must divide num_experts=", c.num_experts);
    m.experts_per_rank = c.num_experts / ep;
    m.first_expert = m.groups.ep_rank() * m.experts_per_rank;
  } else {
    TESSERA_CHECK(ep == 1, InvalidArgument, "expert parallelism needs a MoE model");
  }
  for (int r = 0; r < tp; ++r) m.vocab_sizes.push_back(split_range(c.vocab_size, tp, r).second);
  std::tie(m.vocab_start, m.vocab_local) = split_range(c.vocab_size, tp, m.groups.tp_rank());
  m.specs = parameter_specs(c);
  const int me = replica_rank();
  for (size_t i = 0; i < m.specs.size(); ++i) {
    const ParameterSpec& s = m.specs[i];
    m.spec_index[s.name] = i;
    if (!m.owns(s)) continue;
    auto shape = m.layout_for(s).local_shape(me);
    m.param_index[s.name] = m.params.size();
    m.params.push_back({s.name, at::zeros(shape, at::TensorOptions().dtype(dtype))});
  }
  m.inv_freq = rope_inv_freq(c);
  m.bind();
}

Transformer::~Transformer() = default;
Transformer::Transformer(Transformer&&) noexcept = default;
Transformer& Transformer::operator=(Transformer&&) noexcept = default;

const ModelConfig& Transformer::config() const { return impl_->config; }
const ParallelGroups& Transformer::groups() const { return impl_->groups; }
const std::vector<std::pair<std::string, at::Tensor>>& Transformer::named_parameters() const {
  return impl_->params;
}
at::Tensor& Transformer::parameter(const std::string& name) { return impl_->param(name); }
bool Transformer::has_parameter(const std::string& name) const {
  return impl_->param_index.count(name) > 0;
}
int Transformer::replica_rank() const {
  return impl_->groups.ep_rank() * impl_->groups.tp_size() + impl_->groups.tp_rank();
}

std::vector<std::string> Transformer::full_parameter_names() const {
  std::vector<std::string> names;
  for (const auto& s : impl_->specs) names.push_back(s.name);
  return names;
}

std::vector<int64_t> Transformer::full_shape(const std::string& name) const {
  auto it = impl_->spec_index.find(name);
  TESSERA_CHECK(it != impl_->spec_index.end(), InvalidArgument, "model (", impl_->config.model_type,
                ") has no parameter named '", name, "'");
  return impl_->specs[it->second].shape;
}

dist::Layout Transformer::layout_of(const std::string& name) const {
  auto it = impl_->spec_index.find(name);
  TESSERA_CHECK(it != impl_->spec_index.end(), InvalidArgument, "model has no parameter named '",
                name, "'");
  return impl_->layout_for(impl_->specs[it->second]);
}

void Transformer::load_full(const std::string& name, const at::Tensor& full) {
  auto shape = full_shape(name);
  TESSERA_CHECK(full.sizes() == at::IntArrayRef(shape), InvalidArgument, "parameter '", name,
                "': expected shape ", shape_string(shape), ", got ", shape_string(full.sizes()));
  if (!has_parameter(name)) return;  // an expert another ep rank owns
  at::NoGradGuard no_grad;
  at::Tensor local = dist::extract_local(layout_of(name), replica_rank(), full.to(impl_->dtype));
  parameter(name).copy_(local);
}

void Transformer::init_random(uint64_t seed) {
  at::NoGradGuard no_grad;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  for (const auto& s : impl_->specs) {
    // Every rank draws every full tensor in the same order, so shards of
    // any layout come from the same full model.
    bool norm = s.name.find("norm.weight") != std::string::npos;
    at::Tensor full = norm ? at::ones(s.shape) : at::normal(0.0, 0.02, s.shape, gen);
    if (s.name.find(".bias") != std::string::npos) full.zero_();
    load_full(s.name, full);
  }
}

void Transformer::set_requires_grad(bool requires_grad) {
  for (auto& [name, t] : impl_->params) t.requires_grad_(requires_grad);
}

void Transformer::set_adapter(std::shared_ptr<LinearAdapter> adapter) {
  TESSERA_CHECK(!adapter || (impl_->groups.tp_size() == 1 && impl_->groups.ep_size() == 1),
                InvalidArgument, "adapters run on single-rank model replicas (tp = ep = 1)");
  impl_->adapter = std::move(adapter);
}

const std::shared_ptr<LinearAdapter>& Transformer::adapter() const { return impl_->adapter; }

void Transformer::set_linear_override(std::shared_ptr<LinearOverride> override_) {
  TESSERA_CHECK(!override_ || (impl_->groups.tp_size() == 1 && impl_->groups.ep_size() == 1),
                InvalidArgument,
                "linear overrides run on single-rank model replicas (tp = ep = 1)");
  impl_->linear_override = std::move(override_);
}

const std::shared_ptr<LinearOverride>& Transformer::linear_override() const {
  return impl_->linear_override;
}

int64_t Transformer::num_local_parameters() const {
  int64_t n = 0;
  for (const auto& [name, t] : impl_->params) n += t.numel();
  return n;
}

ForwardOutput Transformer::forward(const at::Tensor& input_ids, const ForwardOptions& options) {
  return translate_errors(
      "Transformer::forward",
      [&]() -> ForwardOutput {
        Impl& m = *impl_;
        const ModelConfig& c = m.config;
        TESSERA_CHECK(input_ids.dim() == 2 && input_ids.scalar_type() == at::kLong, InvalidArgument,
                      "forward: input_ids must be int64 [batch, tokens], got ",
                      dtype_name(input_ids.scalar_type()), " ", shape_string(input_ids.sizes()));
        if (options.paged) return m.forward_paged(input_ids, options);
        const int64_t B = input_ids.size(0), T = input_ids.size(1);
        TESSERA_CHECK(T >= 1, InvalidArgument, "forward: empty input");
        KVCache* cache = options.cache;
        at::Tensor lengths = options.lengths.defined() ? options.lengths.to(at::kLong).cpu()
                                                       : at::full({B}, T, at::kLong);
        at::Tensor starts = cache ? cache->lengths().clone() : at::zeros({B}, at::kLong);
        if (cache) {
          TESSERA_CHECK(cache->batch() == B, InvalidArgument, "forward: cache holds ",
                        cache->batch(), " sequences, input has ", B);
          TESSERA_CHECK((starts + T).max().item<int64_t>() <= cache->max_length(),
                        ResourceExhausted, "forward: ", T, " more tokens overflow the KV cache of ",
                        cache->max_length());
        }
        const int64_t kv_len = cache ? (starts + T).max().item<int64_t>() : T;

        // Positions [B, T] and RoPE tables [B, 1, T, hd].
        at::Tensor positions = starts.unsqueeze(1) + at::arange(T, at::kLong).unsqueeze(0);
        // In fp32 like Hugging Face's rotary embedding (fp64 for fp64 models).
        const at::ScalarType rope_type = accumulate_type(m.dtype);
        // (The batch-invariant path uses its own tables instead.)
        at::Tensor cos, sin;
        if (!options.batch_invariant) {
          at::Tensor freqs =
              positions.to(rope_type).unsqueeze(-1) * m.inv_freq.to(rope_type);  // [B, T, hd/2]
          at::Tensor emb = at::cat({freqs, freqs}, -1).unsqueeze(1);
          cos = emb.cos().to(m.dtype);
          sin = emb.sin().to(m.dtype);
        }
        // Mask [B, 1, T, kv_len]: key j is hidden from query i when j is beyond
        // the query's own position, or beyond the sequence's real tokens.
        at::Tensor key_pos = at::arange(kv_len, at::kLong).view({1, 1, kv_len});
        at::Tensor end = (starts + lengths).view({B, 1, 1});
        at::Tensor mask = ((key_pos > positions.unsqueeze(-1)) | (key_pos >= end)).unsqueeze(1);

        // Vocabulary-parallel embedding: each rank looks up its shard's ids.
        at::Tensor x;
        if (options.input_embeds.defined()) {
          x = checked_input_embeds(options.input_embeds, {B, T, c.hidden_size}, m.dtype);
        } else if (m.groups.tp_size() > 1) {
          at::Tensor local = input_ids - m.vocab_start;
          at::Tensor inside = (local >= 0) & (local < m.vocab_local);
          at::Tensor part = at::embedding(m.embed, at::where(inside, local, at::zeros_like(local)));
          part = part * inside.unsqueeze(-1).to(part.scalar_type());
          x = reduce_from_group(part, m.groups.tp);
        } else {
          TESSERA_CHECK(input_ids.numel() == 0 || (input_ids.min().item<int64_t>() >= 0 &&
                                                   input_ids.max().item<int64_t>() < c.vocab_size),
                        InvalidArgument, "forward: token id outside the vocabulary of ",
                        c.vocab_size);
          x = at::embedding(m.embed, input_ids);
        }

        const bool invariant = options.batch_invariant;
        m.invariant = invariant;
        m.record_attention = options.record_routing;
        m.options = &options;
        m.last_attention_argmax = at::Tensor();
        auto norm = [&](const at::Tensor& v, const at::Tensor& weight) {
          return invariant ? rms_norm_invariant(v, weight, c.rms_norm_eps)
                           : rms_norm(v, weight, c.rms_norm_eps);
        };
        ForwardOutput out;
        std::vector<at::Tensor> loads;
        m.routing_stats = true;
        m.adapter_context = AdapterContext{};
        m.adapter_context.sequence_adapters = options.sequence_adapters;
        m.adapter_context.batch_invariant = invariant;
        if (invariant && options.sequence_adapters.defined()) {
          TESSERA_CHECK(options.sequence_adapters.numel() == B, InvalidArgument,
                        "forward: ", options.sequence_adapters.numel(),
                        " sequence adapters for a batch of ", B);
          m.adapter_context.token_adapters =
              options.sequence_adapters.to(at::kLong).cpu().repeat_interleave(T);
        }
        for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
          const LayerWeights& w = m.layers[l];
          at::Tensor h = copy_to_group(norm(x, w.input_norm), m.groups.tp);
          x = x + reduce_from_group(
                      m.attention(w, h, cos, sin, mask, cache, l, starts, kv_len, invariant),
                      m.groups.tp);
          h = copy_to_group(norm(x, w.post_norm), m.groups.tp);
          at::Tensor mlp;
          if (w.moe) {
            mlp = m.moe(w, h.reshape({B * T, c.hidden_size}), l, out, options.record_routing, loads)
                      .view({B, T, c.hidden_size});
          } else {
            mlp = m.mlp(h, {w.gate, w.up, w.down}, w.prefix + "mlp.gate_proj",
                        w.prefix + "mlp.up_proj", w.prefix + "mlp.down_proj");
          }
          x = x + reduce_from_group(mlp, m.groups.tp);
        }
        if (cache) cache->set_lengths(starts + lengths);

        at::Tensor h = norm(x, m.final_norm);
        if (options.last_logits_only) {
          at::Tensor last = (lengths - 1).clamp_min(0);
          h = h.gather(1, last.view({B, 1, 1}).expand({B, 1, h.size(2)}).to(h.device()));
        }
        if (!out.aux_loss.defined()) out.aux_loss = at::zeros({}, at::kFloat);
        if (!loads.empty()) out.expert_load = at::stack(loads);
        if (options.hidden_only) {
          out.hidden = h;
          return out;
        }
        at::Tensor logits;
        if (m.linear_override) logits = m.linear_override->linear("lm_head", h);
        if (!logits.defined()) {
          logits = invariant ? linear_invariant(copy_to_group(h, m.groups.tp), m.lm_head)
                             : dense(copy_to_group(h, m.groups.tp), m.lm_head);
        }
        if (options.gather_logits) logits = gather_last_dim(logits, m.groups.tp, m.vocab_sizes);
        out.logits = logits;
        return out;
      },
      ErrorCode::kInvalidArgument);
}

Transformer::Loss Transformer::loss(const at::Tensor& input_ids, const at::Tensor& labels) {
  return translate_errors(
      "Transformer::loss",
      [&]() -> Transformer::Loss {
        Impl& m = *impl_;
        check_shape(labels, input_ids.sizes(), "loss: labels");
        ForwardOptions opts;
        opts.gather_logits = false;
        ForwardOutput out = forward(input_ids, opts);
        at::Tensor flat_logits = out.logits.reshape({-1, out.logits.size(-1)});
        at::Tensor targets = labels.reshape({-1}).to(at::kLong);
        at::Tensor per_token =
            detail::vocab_parallel_cross_entropy(flat_logits, targets, m.vocab_start, m.groups.tp);
        int64_t n = (targets != -100).sum().item<int64_t>();
        Loss result;
        at::Tensor ce = per_token.sum() / static_cast<double>(std::max<int64_t>(n, 1));
        result.total = ce + out.aux_loss;
        result.ce = ce.detach();
        result.aux = out.aux_loss.detach();
        result.tokens = n;
        result.expert_load = out.expert_load;
        return result;
      },
      ErrorCode::kInvalidArgument);
}

UpcycledModel upcycle_to_moe(const ModelConfig& dense,
                             const std::map<std::string, at::Tensor>& dense_weights,
                             int64_t num_experts, int64_t top_k, uint64_t seed) {
  TESSERA_CHECK(dense.num_experts == 0, InvalidArgument, "upcycle_to_moe: model is already MoE");
  TESSERA_CHECK(dense.model_type == "llama", InvalidArgument,
                "upcycle_to_moe: only llama-style dense models are upcycled (got ",
                dense.model_type, ")");
  UpcycledModel up;
  up.config = dense;
  up.config.model_type = "mixtral";
  up.config.num_experts = num_experts;
  up.config.num_experts_per_tok = top_k;
  up.config.norm_topk_prob = true;
  up.config.validate();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  for (const auto& [name, t] : dense_weights) {
    auto pos = name.find(".mlp.");
    if (pos == std::string::npos) {
      up.weights[name] = t;
      continue;
    }
    const std::string prefix = name.substr(0, pos) + ".block_sparse_moe.";
    const std::string which = name.substr(pos + 5);  // gate_proj.weight, ...
    const std::string target = which == "gate_proj.weight" ? "w1.weight"
                               : which == "up_proj.weight" ? "w3.weight"
                                                           : "w2.weight";
    for (int64_t j = 0; j < num_experts; ++j) {
      up.weights[prefix + "experts." + std::to_string(j) + "." + target] = t;
    }
    if (which == "gate_proj.weight") {
      up.weights[prefix + "gate.weight"] =
          at::normal(0.0, 0.02, {num_experts, dense.hidden_size}, gen).to(t.scalar_type());
    }
  }
  return up;
}

}  // namespace tessera::nn
