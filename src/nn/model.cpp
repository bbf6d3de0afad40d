#include "tessera/nn/model.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>

#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

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
using detail::reduce_from_group;
using detail::layer_prefix;
using detail::MoeNames;
using detail::moe_names;
using detail::with_expert;

// ---------------------------------------------------------------------------
// KVCache

KVCache::KVCache(const ModelConfig& config, int64_t batch, int64_t max_length,
                 at::TensorOptions options, int tp_size)
    : batch_(batch), max_length_(max_length) {
  TESSERA_CHECK(batch >= 1 && max_length >= 1, InvalidArgument,
                "KV cache: batch and max_length must be positive");
  TESSERA_CHECK(config.num_key_value_heads % tp_size == 0, InvalidArgument, "KV cache: ",
                config.num_key_value_heads, " kv heads do not split over tp=", tp_size);
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
  at::Tensor gate, up, down;            // dense MLP
  at::Tensor router;                    // [E, H]
  std::vector<ExpertWeights> experts;   // local experts, in order
  ExpertWeights shared;                 // Qwen2-MoE shared expert
  at::Tensor shared_gate;               // [1, H]
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

// Reductions (norms, softmax) run in at least fp32; fp64 models stay fp64.
at::ScalarType accumulate_type(at::ScalarType t) { return at::promote_types(t, at::kFloat); }

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  at::Tensor xf = x.to(accumulate_type(x.scalar_type()));
  at::Tensor normed = xf * at::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps);
  return normed.to(x.scalar_type()) * w;
}

// rms_norm with one fixed summation order per row (batch-invariant).
at::Tensor rms_norm_invariant(const at::Tensor& x, const at::Tensor& w, double eps) {
  TESSERA_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(), InvalidArgument,
                "batch_invariant forward: fp32 CPU models only");
  at::Tensor xc = x.contiguous();
  const int64_t H = xc.size(-1), rows = xc.numel() / std::max<int64_t>(H, 1);
  at::Tensor out = at::empty_like(xc);
  at::Tensor wc = w.to(at::kFloat).contiguous();
  const float* src = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* v = src + r * H;
      float ss = 0.f;
      for (int64_t i = 0; i < H; ++i) ss += v[i] * v[i];
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(H) + static_cast<float>(eps));
      for (int64_t i = 0; i < H; ++i) dst[r * H + i] = v[i] * inv * wp[i];
    }
  });
  return out;
}

// Causal attention with fixed-order loops (batch-invariant): q [B, nh, T,
// hd], k and v [B, nkv, L, hd] (any strides), mask [B, 1, T, L] (true:
// hidden). Returns [B, nh, T, hd].
at::Tensor attention_invariant(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& mask) {
  TESSERA_CHECK(q.scalar_type() == at::kFloat && q.device().is_cpu(), InvalidArgument,
                "batch_invariant forward: fp32 CPU models only");
  // k and v are usually views of the KV cache: read them in place (rows of
  // head_dim contiguous), copying only if the innermost stride is not 1.
  at::Tensor qc = q.contiguous();
  at::Tensor kc = k.stride(3) == 1 ? k : k.contiguous();
  at::Tensor vc = v.stride(3) == 1 ? v : v.contiguous();
  at::Tensor mc = mask.to(at::kBool).contiguous();
  const int64_t B = q.size(0), nh = q.size(1), T = q.size(2), hd = q.size(3);
  const int64_t nkv = k.size(1), L = k.size(2), rep = nh / nkv;
  at::Tensor out = at::zeros({B, nh, T, hd}, at::kFloat);
  const float* qp = qc.data_ptr<float>();
  const float* kp = kc.data_ptr<float>();
  const float* vp = vc.data_ptr<float>();
  const int64_t ks0 = kc.stride(0), ks1 = kc.stride(1), ks2 = kc.stride(2);
  const int64_t vs0 = vc.stride(0), vs1 = vc.stride(1), vs2 = vc.stride(2);
  const bool* mp = mc.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  at::parallel_for(0, B * nh, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores(L);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / nh, h = i % nh, kvh = h / rep;
      const float* kb = kp + b * ks0 + kvh * ks1;
      const float* vb = vp + b * vs0 + kvh * vs1;
      for (int64_t t = 0; t < T; ++t) {
        const float* qr = qp + ((b * nh + h) * T + t) * hd;
        const bool* mr = mp + (b * T + t) * L;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < L; ++j) {
          if (mr[j]) continue;
          float d = 0.f;
          for (int64_t e = 0; e < hd; ++e) d += qr[e] * kb[j * ks2 + e];
          scores[j] = d * scale;
          mx = std::max(mx, scores[j]);
        }
        float denom = 0.f;
        for (int64_t j = 0; j < L; ++j) {
          if (mr[j]) continue;
          scores[j] = std::exp(scores[j] - mx);
          denom += scores[j];
        }
        float* orow = op + ((b * nh + h) * T + t) * hd;
        if (denom == 0.f) continue;
        for (int64_t j = 0; j < L; ++j) {
          if (mr[j]) continue;
          const float p = scores[j] / denom;
          for (int64_t e = 0; e < hd; ++e) orow[e] += p * vb[j * vs2 + e];
        }
      }
    }
  });
  return out;
}

// x [N, K] times w [E, K]^T with one fixed summation order per output
// (batch-invariant; for small layers such as MoE routers).
at::Tensor linear_invariant(const at::Tensor& x, const at::Tensor& w) {
  TESSERA_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(), InvalidArgument,
                "batch_invariant forward: fp32 CPU models only");
  at::Tensor xc = x.contiguous(), wc = w.to(at::kFloat).contiguous();
  const int64_t N = xc.size(0), K = xc.size(1), E = wc.size(0);
  at::Tensor out = at::empty({N, E}, at::kFloat);
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t e = 0; e < E; ++e) {
        float acc = 0.f;
        for (int64_t k = 0; k < K; ++k) acc += xp[n * K + k] * wp[e * K + k];
        op[n * E + e] = acc;
      }
    }
  });
  return out;
}

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

// ---------------------------------------------------------------------------
// Transformer

struct Transformer::Impl {
  ModelConfig config;
  ParallelGroups groups;
  at::ScalarType dtype;
  std::vector<ParameterSpec> specs;                    // full model
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
  bool record_attention = false;   // keep the last attention's argmax key per query (routing records)
  const ForwardOptions* options = nullptr;  // of the forward in progress
  at::Tensor last_attention_argmax;

  // A linear layer by Hugging Face module name, with the override and the
  // adapter applied.
  at::Tensor proj(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                  const std::string& name) {
    at::Tensor y;
    if (linear_override) y = linear_override->linear(name, x);
    if (!y.defined()) {
      y = dense(x, w, b);
    } else if (b.defined()) {
      y = y + b;
    }
    return adapter ? adapter->apply(name, x, y, adapter_context) : y;
  }

  at::Tensor mlp(const at::Tensor& x, const ExpertWeights& e, const std::string& gate,
                 const std::string& up, const std::string& down) {
    if (!adapter && !linear_override) return swiglu(x, e.gate, e.up, e.down);
    return proj(at::silu(proj(x, e.gate, {}, gate)) * proj(x, e.up, {}, up), e.down, {}, down);
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
          w.experts.push_back({param(with_expert(n.expert_gate, j)), param(with_expert(n.expert_up, j)),
                               param(with_expert(n.expert_down, j))});
        }
        if (c.shared_expert_intermediate_size > 0) {
          w.shared = {param(n.shared_gate_proj), param(n.shared_up_proj), param(n.shared_down_proj)};
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
                       const at::Tensor& sin, const at::Tensor& mask, KVCache* cache,
                       int64_t layer, const at::Tensor& starts, int64_t kv_len,
                       bool invariant) {
    const ModelConfig& c = config;
    const int64_t B = h.size(0), T = h.size(1), hd = c.head_size();
    const int64_t nh = c.num_attention_heads / groups.tp_size();
    const int64_t nkv = c.num_key_value_heads / groups.tp_size();
    const std::string a = w.prefix + "self_attn.";
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
    if (invariant) {
      at::Tensor out = attention_invariant(q, k, v, mask).transpose(1, 2).reshape({B, T, nh * hd});
      return proj(out, w.o, {}, a + "o_proj");
    }
    if (rep > 1) {
      const int64_t L = k.size(2);
      k = k.unsqueeze(2).expand({B, nkv, rep, L, hd}).reshape({B, nh, L, hd});
      v = v.unsqueeze(2).expand({B, nkv, rep, L, hd}).reshape({B, nh, L, hd});
    }
    at::Tensor scores = at::matmul(q, k.transpose(-1, -2)) * (1.0 / std::sqrt(static_cast<double>(hd)));
    scores = scores.masked_fill(mask, -std::numeric_limits<float>::infinity());
    at::Tensor probs = at::softmax(scores.to(accumulate_type(scores.scalar_type())), -1).to(q.scalar_type());
    if (record_attention) last_attention_argmax = probs.detach().sum(1).argmax(-1).reshape({B * T});
    at::Tensor out = at::matmul(probs, v).transpose(1, 2).reshape({B, T, nh * hd});
    return proj(out, w.o, {}, a + "o_proj");
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
    // [N, E]; the batch-invariant path multiplies row by row in a fixed order.
    r.logits = invariant ? linear_invariant(x, w.router)
                         : dense(x, w.router).to(accumulate_type(x.scalar_type()));
    r.probs = at::softmax(r.logits, -1);
    std::tie(r.top_w, r.top_e) = r.probs.topk(c.num_experts_per_tok, -1);
    if (c.norm_topk_prob) r.top_w = r.top_w / r.top_w.sum(-1, true);
    r.top_w = r.top_w.to(x.scalar_type());
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
      if (adapter || linear_override) {
        MoeNames names = moe_names(c, layer);
        auto strip = [](std::string n) { return n.substr(0, n.size() - 7); };  // ".weight"
        const int64_t j = first_expert + e;
        y = mlp(in, ew, strip(with_expert(names.expert_gate, j)),
                strip(with_expert(names.expert_up, j)), strip(with_expert(names.expert_down, j)));
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
    account_routing(r, N, layer, out, record, loads);
    if (options && options->expert_override) return override_experts(w, x, layer, r);
    // Tokens on a GPU: nn::moe_mixture, whose device path is the token
    // permutation kernels (kernels/moe). Same assignments as dispatch()
    // without capacity drops; the CPU path below keeps its own order.
    const bool drops = c.capacity_factor > 0 && !invariant;
    if (x.is_cuda() && groups.ep_size() == 1 && !drops && !adapter && !linear_override) {
      at::Tensor result = moe_mixture(x, r.top_e, r.top_w, c.num_experts, [&](int64_t e, const at::Tensor& rows) {
        const ExpertWeights& ew = w.experts[e];
        return swiglu(rows, ew.gate, ew.up, ew.down);
      });
      return add_shared_expert(w, x, result);
    }

    const MoeDispatch d = dispatch(x, r.top_e);
    at::Tensor back = run_local_experts(w, layer, d);
    if (groups.ep_size() > 1) back = all_to_all_rows(back, groups.ep, d.send_splits, d.recv_splits);

    // Combine: each kept assignment's output times its weight, summed per token.
    at::Tensor weights = r.top_w.reshape({-1}).index_select(0, d.order).unsqueeze(1);
    at::Tensor result = at::zeros({N, x.size(1)}, x.options())
                            .index_add(0, d.order.div(K, "floor"), back * weights);
    return add_shared_expert(w, x, result);
  }

  // Adds a Qwen2-MoE shared expert's gated output (when the model has one).
  at::Tensor add_shared_expert(const LayerWeights& w, const at::Tensor& x, at::Tensor result) {
    if (config.shared_expert_intermediate_size > 0) {
      at::Tensor shared = swiglu(x, w.shared.gate, w.shared.up, w.shared.down);
      // The sigmoid gate is replicated; the shared expert's output is
      // tp-partial like the experts', so the gate applies to each part.
      result = result + at::sigmoid(dense(x, w.shared_gate)) * shared;
    }
    return result;
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
  TESSERA_CHECK(c.num_key_value_heads % tp == 0 && c.num_attention_heads % tp == 0,
                InvalidArgument, "tensor parallel size ", tp, " must divide the ",
                c.num_attention_heads, " attention and ", c.num_key_value_heads, " kv heads");
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
                InvalidArgument, "linear overrides run on single-rank model replicas (tp = ep = 1)");
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
  return translate_errors("Transformer::forward", [&]() -> ForwardOutput {
  Impl& m = *impl_;
  const ModelConfig& c = m.config;
  TESSERA_CHECK(input_ids.dim() == 2 && input_ids.scalar_type() == at::kLong, InvalidArgument,
                "forward: input_ids must be int64 [batch, tokens], got ",
                dtype_name(input_ids.scalar_type()), " ", shape_string(input_ids.sizes()));
  const int64_t B = input_ids.size(0), T = input_ids.size(1);
  TESSERA_CHECK(T >= 1, InvalidArgument, "forward: empty input");
  KVCache* cache = options.cache;
  at::Tensor lengths = options.lengths.defined() ? options.lengths.to(at::kLong).cpu()
                                                 : at::full({B}, T, at::kLong);
  at::Tensor starts = cache ? cache->lengths().clone() : at::zeros({B}, at::kLong);
  if (cache) {
    TESSERA_CHECK(cache->batch() == B, InvalidArgument, "forward: cache holds ", cache->batch(),
                  " sequences, input has ", B);
    TESSERA_CHECK((starts + T).max().item<int64_t>() <= cache->max_length(), ResourceExhausted,
                  "forward: ", T, " more tokens overflow the KV cache of ", cache->max_length());
  }
  const int64_t kv_len = cache ? (starts + T).max().item<int64_t>() : T;

  // Positions [B, T] and RoPE tables [B, 1, T, hd].
  at::Tensor positions = starts.unsqueeze(1) + at::arange(T, at::kLong).unsqueeze(0);
  // In fp32 like Hugging Face's rotary embedding (fp64 for fp64 models).
  const at::ScalarType rope_type = accumulate_type(m.dtype);
  at::Tensor freqs = positions.to(rope_type).unsqueeze(-1) * m.inv_freq.to(rope_type);  // [B, T, hd/2]
  at::Tensor emb = at::cat({freqs, freqs}, -1).unsqueeze(1);
  at::Tensor cos = emb.cos().to(m.dtype), sin = emb.sin().to(m.dtype);
  // Mask [B, 1, T, kv_len]: key j is hidden from query i when j is beyond
  // the query's own position, or beyond the sequence's real tokens.
  at::Tensor key_pos = at::arange(kv_len, at::kLong).view({1, 1, kv_len});
  at::Tensor end = (starts + lengths).view({B, 1, 1});
  at::Tensor mask = ((key_pos > positions.unsqueeze(-1)) | (key_pos >= end)).unsqueeze(1);

  // Vocabulary-parallel embedding: each rank looks up its shard's ids.
  at::Tensor x;
  if (m.groups.tp_size() > 1) {
    at::Tensor local = input_ids - m.vocab_start;
    at::Tensor inside = (local >= 0) & (local < m.vocab_local);
    at::Tensor part = at::embedding(m.embed, at::where(inside, local, at::zeros_like(local)));
    part = part * inside.unsqueeze(-1).to(part.scalar_type());
    x = reduce_from_group(part, m.groups.tp);
  } else {
    TESSERA_CHECK(input_ids.numel() == 0 ||
                      (input_ids.min().item<int64_t>() >= 0 &&
                       input_ids.max().item<int64_t>() < c.vocab_size),
                  InvalidArgument, "forward: token id outside the vocabulary of ", c.vocab_size);
    x = at::embedding(m.embed, input_ids);
  }

  const bool invariant = options.batch_invariant;
  m.invariant = invariant;
  m.record_attention = options.record_routing;
  m.options = &options;
  m.last_attention_argmax = at::Tensor();
  auto norm = [&](const at::Tensor& v, const at::Tensor& weight) {
    return invariant ? rms_norm_invariant(v, weight, c.rms_norm_eps) : rms_norm(v, weight, c.rms_norm_eps);
  };
  ForwardOutput out;
  std::vector<at::Tensor> loads;
  m.adapter_context.sequence_adapters = options.sequence_adapters;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const LayerWeights& w = m.layers[l];
    at::Tensor h = copy_to_group(norm(x, w.input_norm), m.groups.tp);
    x = x + reduce_from_group(m.attention(w, h, cos, sin, mask, cache, l, starts, kv_len, invariant),
                              m.groups.tp);
    h = copy_to_group(norm(x, w.post_norm), m.groups.tp);
    at::Tensor mlp;
    if (w.moe) {
      mlp = m.moe(w, h.reshape({B * T, c.hidden_size}), l, out, options.record_routing, loads)
                .view({B, T, c.hidden_size});
    } else {
      mlp = m.mlp(h, {w.gate, w.up, w.down}, w.prefix + "mlp.gate_proj", w.prefix + "mlp.up_proj",
                  w.prefix + "mlp.down_proj");
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
  if (!logits.defined()) logits = dense(copy_to_group(h, m.groups.tp), m.lm_head);
  if (options.gather_logits) logits = gather_last_dim(logits, m.groups.tp, m.vocab_sizes);
  out.logits = logits;
  return out;
  }, ErrorCode::kInvalidArgument);
}

Transformer::Loss Transformer::loss(const at::Tensor& input_ids, const at::Tensor& labels) {
  return translate_errors("Transformer::loss", [&]() -> Transformer::Loss {
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
  }, ErrorCode::kInvalidArgument);
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
