#include "tessera/sim/synth.h"

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>

#include "json_reader.h"
#include "tessera/core/error.h"
#include "tessera/nn/parameters.h"
#include "tessera/sim/tracer.h"
#include "util.h"

namespace tessera::sim {

// ---------------------------------------------------------------------------
// DeviceSpec

DeviceSpec DeviceSpec::parse(std::string_view text, const std::string& source) {
  const detail::json root = detail::parse_json(text, source);
  detail::JsonObject top(root, source);
  const std::string schema = top.get_string("schema");
  if (schema != "tessera.sim.device/1") {
    top.fail("schema", "expected 'tessera.sim.device/1', got '" + schema + "'");
  }
  DeviceSpec d;
  d.name = top.get_string("name");
  if (d.name.empty()) top.fail("name", "must not be empty");
  d.description = top.get_string("description", "");
  d.provenance = top.get_string("provenance", "");
  detail::JsonObject peaks = top.get_object("matmul_tflops");
  d.matmul_tflops_fp32 = peaks.get_double("fp32");
  d.matmul_tflops_bf16 = peaks.get_double("bf16");
  if (d.matmul_tflops_fp32 <= 0) peaks.fail("fp32", "must be > 0");
  if (d.matmul_tflops_bf16 <= 0) peaks.fail("bf16", "must be > 0");
  peaks.check_keys();
  d.memory_gbps = top.get_double("memory_gbps");
  if (d.memory_gbps <= 0) top.fail("memory_gbps", "must be > 0");
  d.memory_bytes = top.get_size("memory_bytes", 0);
  d.matmul_efficiency = top.get_double("matmul_efficiency", d.matmul_efficiency);
  if (d.matmul_efficiency <= 0 || d.matmul_efficiency > 1) {
    top.fail("matmul_efficiency", "must be in (0, 1]");
  }
  d.memory_efficiency = top.get_double("memory_efficiency", d.memory_efficiency);
  if (d.memory_efficiency <= 0 || d.memory_efficiency > 1) {
    top.fail("memory_efficiency", "must be in (0, 1]");
  }
  d.kernel_overhead_us = top.get_nonnegative("kernel_overhead_us", d.kernel_overhead_us);
  top.check_keys();
  return d;
}

DeviceSpec DeviceSpec::load_file(const std::string& path) {
  return parse(detail::read_text_file(path, "device file"), path);
}

std::string DeviceSpec::to_json() const {
  nlohmann::ordered_json j;
  j["schema"] = "tessera.sim.device/1";
  j["name"] = name;
  if (!description.empty()) j["description"] = description;
  if (!provenance.empty()) j["provenance"] = provenance;
  j["matmul_tflops"] = {{"fp32", matmul_tflops_fp32}, {"bf16", matmul_tflops_bf16}};
  j["memory_gbps"] = memory_gbps;
  j["memory_bytes"] = memory_bytes;
  j["matmul_efficiency"] = matmul_efficiency;
  j["memory_efficiency"] = memory_efficiency;
  j["kernel_overhead_us"] = kernel_overhead_us;
  return j.dump(2) + "\n";
}

namespace {

// ---------------------------------------------------------------------------
// The shapes one rank works on.

struct Dims {
  int64_t B = 0, T = 0, N = 0;                // micro-batch sequences, sequence length, tokens
  int64_t H = 0, hd = 0, nh = 0, nkv = 0;     // nh, nkv: local heads
  int64_t I = 0;                              // local dense intermediate
  int64_t E = 0, K = 0, E_local = 0, Ie = 0;  // experts, top-k, local experts, local expert width
  int64_t V = 0;                              // local vocabulary
  int64_t moe_layers = 0;
  double ad = 4;  // bytes of a matrix product's output (2 under bf16 autocast)
  int tp = 1, ep = 1, dp = 1;
};

std::pair<int64_t, int64_t> split_range(int64_t n, int64_t parts, int64_t index) {
  const int64_t base = n / parts, extra = n % parts;
  return {index * base + std::min(index, extra), base + (index < extra ? 1 : 0)};
}

Dims dims_of(const TrainingJobConfig& c, const RankCoords& at) {
  Dims d;
  const nn::ModelConfig& m = c.model;
  d.tp = c.layout.tp;
  d.ep = c.layout.ep;
  d.dp = c.layout.dp;
  d.B = c.local_batch() / c.grad_accumulation;
  d.T = c.seq_len;
  d.N = d.B * d.T;
  d.H = m.hidden_size;
  d.hd = m.head_size();
  d.nh = m.num_attention_heads / d.tp;
  d.nkv = m.num_key_value_heads / d.tp;
  d.I = m.intermediate_size / d.tp;
  d.E = m.num_experts;
  d.K = m.num_experts_per_tok;
  d.E_local = d.E > 0 ? d.E / d.ep : 0;
  d.Ie = m.expert_intermediate() / d.tp;
  d.V = split_range(m.vocab_size, d.tp, at.tp).second;
  for (int64_t l = 0; l < m.num_hidden_layers; ++l) d.moe_layers += m.is_moe_layer(l) ? 1 : 0;
  d.ad = c.bf16_autocast ? 2 : 4;
  return d;
}

// This rank's parameters: (name, local elements), in the model's order.
std::vector<std::pair<std::string, int64_t>> local_parameters(const TrainingJobConfig& c,
                                                              const RankCoords& at) {
  std::vector<std::pair<std::string, int64_t>> out;
  const int64_t E = c.model.num_experts;
  const int64_t per_rank = E > 0 ? E / c.layout.ep : 0;
  const int64_t first = at.ep * per_rank;
  const int replica_rank = at.ep * c.layout.tp + at.tp;
  for (const nn::ParameterSpec& s : nn::parameter_specs(c.model)) {
    if (s.expert >= 0 && (s.expert < first || s.expert >= first + per_rank)) continue;
    const dist::Layout layout = nn::parameter_layout(s, E, c.layout.tp, c.layout.ep);
    out.emplace_back(s.name, layout.local_numel(replica_rank));
  }
  return out;
}

// Cuts a rank's step into compute nodes (roofline time per operation) and
// communication nodes, in the trainer's order.
class StepWriter {
 public:
  StepWriter(const DeviceSpec& device, bool bf16) : device_(device) {
    peak_ = (bf16 ? device.matmul_tflops_bf16 : device.matmul_tflops_fp32) * 1e12 *
            device.matmul_efficiency;
    bandwidth_ = device.memory_gbps * 1e9 * device.memory_efficiency;
  }

  // A matrix product [M, K] x [K, N] (count: how many of them, batched).
  void matmul(const char* what, double M, double K, double N, double in_bytes, double out_bytes,
              double count = 1) {
    const double flops = 2 * M * K * N * count;
    const double bytes = ((M * K + K * N) * in_bytes + M * N * out_bytes) * count;
    add(what, flops, bytes, 1);
  }
  // Vector work moving `bytes` in `kernels` launches.
  void vector(const char* what, double bytes, int kernels = 1) { add(what, 0, bytes, kernels); }

  void collective(CollectiveKind op, const std::string& partition, int64_t bytes,
                  const char* dtype) {
    close_compute();
    TraceNode n;
    n.id = static_cast<int64_t>(nodes_.size());
    n.kind = NodeKind::kCollective;
    n.op = op;
    n.group.partition = partition;
    n.bytes = bytes;
    n.dtype = dtype;
    n.stream = "comm";
    n.name = partition + "." + collective_kind_name(op) + "." + std::to_string(n.id);
    if (last_compute_ >= 0) n.deps.push_back(last_compute_);
    pending_ = n.id;
    nodes_.push_back(std::move(n));
  }

  std::vector<TraceNode> finish() {
    close_compute();
    return std::move(nodes_);
  }

 private:
  void add(const char* what, double flops, double bytes, int kernels) {
    us_ += kernels * device_.kernel_overhead_us + std::max(flops / peak_, bytes / bandwidth_) * 1e6;
    flops_ += flops;
    label_ = what;
  }
  void close_compute() {
    TraceNode n;
    n.id = static_cast<int64_t>(nodes_.size());
    n.kind = NodeKind::kCompute;
    n.stream = "compute";
    n.compute_kind = "step";
    n.name = label_ + "." + std::to_string(n.id);
    n.duration = Microseconds(us_);
    n.flops = flops_;
    if (pending_ >= 0) n.deps.push_back(pending_);
    pending_ = -1;
    last_compute_ = n.id;
    nodes_.push_back(std::move(n));
    us_ = 0;
    flops_ = 0;
  }

  const DeviceSpec& device_;
  double peak_ = 1, bandwidth_ = 1;
  double us_ = 0, flops_ = 0;
  std::string label_ = "start";
  int64_t pending_ = -1, last_compute_ = -1;
  std::vector<TraceNode> nodes_;
};

constexpr double kF32 = 4;

// Gradient buckets of nn::all_reduce_gradients (25 MiB, parameter order).
void gradient_buckets(StepWriter& w, const std::vector<int64_t>& numels,
                      const std::string& partition) {
  const int64_t limit = int64_t{25} << 20;
  int64_t bytes = 0;
  auto flush = [&] {
    if (bytes == 0) return;
    w.vector("grad_bucket.pack", 2.0 * bytes);
    w.collective(CollectiveKind::kAllReduce, partition, bytes, "Float");
    w.vector("grad_bucket.unpack", 2.0 * bytes);
    bytes = 0;
  };
  for (int64_t n : numels) {
    bytes += n * 4;
    if (bytes >= limit) flush();
  }
  flush();
}

std::vector<TraceNode> synthesize_rank(const TrainingJobConfig& c, const RankCoords& at,
                                       const DeviceSpec& device) {
  const Dims d = dims_of(c, at);
  const nn::ModelConfig& m = c.model;
  const int64_t L = m.num_hidden_layers;
  const double N = static_cast<double>(d.N), H = static_cast<double>(d.H);
  const double ad = d.ad;
  const char* ad_name = c.bf16_autocast ? "BFloat16" : "Float";
  const bool tp = d.tp > 1, ep = d.ep > 1;
  StepWriter w(device, c.bf16_autocast);
  const double q_width = static_cast<double>(d.nh * d.hd);
  const double kv_width = static_cast<double>(d.nkv * d.hd);
  const double scores = static_cast<double>(d.B * d.nh) * d.T * d.T;
  const double rows = N * static_cast<double>(d.K);  // MoE assignments, balanced over ranks
  const double shared_I =
      static_cast<double>(m.shared_expert_intermediate_size) / static_cast<double>(d.tp);

  for (int64_t micro = 0; micro < c.grad_accumulation; ++micro) {
    // Forward (nn::Transformer::forward with gather_logits off, then the loss).
    w.vector("embed", N * H * kF32 * 2, tp ? 5 : 2);
    if (tp) w.collective(CollectiveKind::kAllReduce, "tp", d.N * d.H * 4, "Float");
    w.vector("rope_tables", N * static_cast<double>(d.hd) * kF32 * 8 + N * d.T * 3.0, 12);
    for (int64_t l = 0; l < L; ++l) {
      w.vector("norm", N * H * kF32 * 4, 6);
      w.matmul("qkv", N, H, q_width, ad, ad);
      w.matmul("qkv", N, H, kv_width, ad, ad, 2);
      w.vector("rope", N * (q_width + kv_width) * ad * 6, 10);
      if (d.nh > d.nkv) w.vector("gqa_expand", 2 * N * q_width * ad, 2);
      w.matmul("attention.scores", static_cast<double>(d.T), static_cast<double>(d.hd),
               static_cast<double>(d.T), ad, ad, static_cast<double>(d.B * d.nh));
      w.vector("attention.softmax", scores * (ad + 1 + 4 + 4 + ad), 4);
      w.matmul("attention.values", static_cast<double>(d.T), static_cast<double>(d.T),
               static_cast<double>(d.hd), ad, ad, static_cast<double>(d.B * d.nh));
      w.matmul("attention.out", N, q_width, H, ad, ad);
      if (tp) {
        w.vector("attention.reduce", N * H * ad * 2);
        w.collective(CollectiveKind::kAllReduce, "tp", d.N * d.H * static_cast<int64_t>(ad),
                     ad_name);
      }
      w.vector("residual", N * H * kF32 * 3);
      w.vector("norm", N * H * kF32 * 4, 6);
      if (!m.is_moe_layer(l)) {
        w.matmul("mlp.gate_up", N, H, static_cast<double>(d.I), ad, ad, 2);
        w.vector("mlp.silu", N * static_cast<double>(d.I) * ad * 5, 2);
        w.matmul("mlp.down", N, static_cast<double>(d.I), H, ad, ad);
        if (tp) {
          w.vector("mlp.reduce", N * H * ad * 2);
          w.collective(CollectiveKind::kAllReduce, "tp", d.N * d.H * static_cast<int64_t>(ad),
                       ad_name);
        }
      } else {
        w.matmul("moe.router", N, H, static_cast<double>(d.E), ad, ad);
        w.vector("moe.route", N * static_cast<double>(d.E) * kF32 * 6 + rows * 8 * 8, 14);
        w.vector("moe.dispatch", rows * H * kF32 * 2, 3);
        if (ep) {
          w.collective(CollectiveKind::kAllGather, "ep", int64_t{d.ep} * d.E * 8, "Long");
          w.collective(CollectiveKind::kAllToAll, "ep", d.N * d.K * d.H * 4, "Float");
        }
        w.vector("moe.experts.gather", rows * H * kF32 * 2, static_cast<int>(d.E_local));
        w.matmul("moe.experts.gate_up", rows, H, static_cast<double>(d.Ie), ad, ad, 2);
        w.vector("moe.experts.silu", rows * static_cast<double>(d.Ie) * ad * 5,
                 static_cast<int>(2 * d.E_local));
        w.matmul("moe.experts.down", rows, static_cast<double>(d.Ie), H, ad, ad);
        w.vector("moe.experts.scatter", rows * H * ad * 2, static_cast<int>(d.E_local));
        if (ep) {
          w.collective(CollectiveKind::kAllToAll, "ep", d.N * d.K * d.H * static_cast<int64_t>(ad),
                       ad_name);
        }
        w.vector("moe.combine", rows * H * (ad + kF32) + N * H * kF32 * 2, 4);
        if (shared_I > 0) {
          w.matmul("moe.shared", N, H, shared_I, ad, ad, 3);
          w.matmul("moe.shared_gate", N, H, 1, ad, ad);
        }
        if (tp) w.collective(CollectiveKind::kAllReduce, "tp", d.N * d.H * 4, "Float");
      }
      w.vector("residual", N * H * kF32 * 3);
    }
    w.vector("final_norm", N * H * kF32 * 4, 6);
    const double V = static_cast<double>(d.V);
    w.matmul("lm_head", N, H, V, ad, ad);
    if (tp) {
      w.vector("loss.max", N * V * (ad + kF32 * 2), 3);
      w.collective(CollectiveKind::kAllReduce, "tp", d.N * 4, "Float");
      w.vector("loss.exp", N * V * kF32 * 3, 3);
      w.collective(CollectiveKind::kAllReduce, "tp", d.N * 4, "Float");
      w.vector("loss.pick", N * kF32 * 8, 8);
      w.collective(CollectiveKind::kAllReduce, "tp", d.N * 4, "Float");
      w.vector("loss", N * V * kF32 * 2 + N * kF32 * 6, 8);
    } else {
      w.vector("loss", N * V * (ad + kF32 * 3), 6);
    }

    // Backward (autograd: reverse order; grads of norm outputs are fp32).
    w.vector("loss.backward", N * V * kF32 * 4, 5);
    w.matmul("lm_head.backward", N, V, H, ad, kF32);
    w.matmul("lm_head.backward", H, N, V, ad, kF32);
    if (tp) w.collective(CollectiveKind::kAllReduce, "tp", d.N * d.H * 4, "Float");
    w.vector("final_norm.backward", N * H * kF32 * 6, 8);
    for (int64_t l = L - 1; l >= 0; --l) {
      if (!m.is_moe_layer(l)) {
        w.matmul("mlp.down.backward", N, H, static_cast<double>(d.I), ad, kF32);
        w.matmul("mlp.down.backward", H, N, static_cast<double>(d.I), ad, kF32);
        w.vector("mlp.silu.backward", N * static_cast<double>(d.I) * kF32 * 8, 6);
        w.matmul("mlp.gate_up.backward", N, static_cast<double>(d.I), H, ad, kF32, 2);
        w.matmul("mlp.gate_up.backward", static_cast<double>(d.I), N, H, ad, kF32, 2);
      } else {
        w.vector("moe.combine.backward", rows * H * (ad + kF32) * 2, 4);
        if (ep) {
          w.collective(CollectiveKind::kAllToAll, "ep", d.N * d.K * d.H * static_cast<int64_t>(ad),
                       ad_name);
        }
        w.vector("moe.experts.scatter.backward", rows * H * ad * 2, static_cast<int>(d.E_local));
        w.matmul("moe.experts.down.backward", rows, H, static_cast<double>(d.Ie), ad, kF32);
        w.matmul("moe.experts.down.backward", H, rows, static_cast<double>(d.Ie), ad, kF32);
        w.vector("moe.experts.silu.backward", rows * static_cast<double>(d.Ie) * kF32 * 8,
                 static_cast<int>(6 * d.E_local));
        w.matmul("moe.experts.gate_up.backward", rows, static_cast<double>(d.Ie), H, ad, kF32, 2);
        w.matmul("moe.experts.gate_up.backward", static_cast<double>(d.Ie), rows, H, ad, kF32, 2);
        w.vector("moe.experts.gather.backward", rows * H * kF32 * 2, static_cast<int>(d.E_local));
        if (ep) w.collective(CollectiveKind::kAllToAll, "ep", d.N * d.K * d.H * 4, "Float");
        w.vector("moe.dispatch.backward", rows * H * kF32 * 3, 3);
        if (shared_I > 0) {
          w.matmul("moe.shared.backward", N, shared_I, H, ad, kF32, 6);
        }
        w.vector("moe.route.backward", N * static_cast<double>(d.E) * kF32 * 8, 12);
        w.matmul("moe.router.backward", N, static_cast<double>(d.E), H, ad, kF32, 2);
      }
      if (tp) w.collective(CollectiveKind::kAllReduce, "tp", d.N * d.H * 4, "Float");
      w.vector("norm.backward", N * H * kF32 * 6, 8);
      w.matmul("attention.out.backward", N, H, q_width, ad, kF32, 2);
      w.matmul("attention.values.backward", static_cast<double>(d.T), static_cast<double>(d.hd),
               static_cast<double>(d.T), ad, kF32, 2.0 * static_cast<double>(d.B * d.nh));
      w.vector("attention.softmax.backward", scores * kF32 * 5, 4);
      w.matmul("attention.scores.backward", static_cast<double>(d.T), static_cast<double>(d.T),
               static_cast<double>(d.hd), ad, kF32, 2.0 * static_cast<double>(d.B * d.nh));
      w.vector("rope.backward", N * (q_width + kv_width) * kF32 * 6, 10);
      w.matmul("qkv.backward", N, q_width + 2 * kv_width, H, ad, kF32, 2);
      if (tp) w.collective(CollectiveKind::kAllReduce, "tp", d.N * d.H * 4, "Float");
      w.vector("norm.backward", N * H * kF32 * 6, 8);
    }
    w.vector("embed.backward", N * H * kF32 * 3 + static_cast<double>(d.V) * H * kF32, 3);
  }

  // Gradient reductions and the optimiser (nn::Trainer::step, nn::AdamW).
  const auto params = local_parameters(c, at);
  double total = 0;
  std::vector<int64_t> all_numels, dense_numels;
  double expert_elems = 0;
  for (const auto& [name, numel] : params) {
    total += static_cast<double>(numel);
    all_numels.push_back(numel);
    if (name.find(".experts.") == std::string::npos) {
      dense_numels.push_back(numel);
    } else {
      expert_elems += static_cast<double>(numel);
    }
  }
  if (ep) {
    w.vector("expert_grads.scale", expert_elems * kF32 * 2);
    gradient_buckets(w, dense_numels, "ep");
  }
  if (d.dp > 1 && !c.zero1) gradient_buckets(w, all_numels, "dp");
  auto norm_groups = [&] {
    if (tp) w.collective(CollectiveKind::kAllReduce, "tp", 8, "Double");
    if (ep) w.collective(CollectiveKind::kAllReduce, "ep", 8, "Double");
  };
  if (c.zero1 && d.dp > 1) {
    const int64_t shard = (static_cast<int64_t>(total) + d.dp - 1) / d.dp;
    const int64_t padded = shard * d.dp;
    w.vector("zero.flatten", total * kF32 * 3, static_cast<int>(params.size()));
    w.collective(CollectiveKind::kReduceScatter, "dp", padded * 4, "Float");
    w.vector("zero.norm", static_cast<double>(shard) * kF32 * 3, 3);
    w.collective(CollectiveKind::kAllReduce, "dp", 8, "Double");
    norm_groups();
    w.vector("adamw", static_cast<double>(shard) * kF32 * 16, 12);
    w.collective(CollectiveKind::kAllGather, "dp", padded * 4, "Float");
    w.vector("zero.unflatten", total * kF32 * 2, static_cast<int>(params.size()));
  } else {
    w.vector("grad_norm", total * kF32 * 3, static_cast<int>(2 * params.size()));
    norm_groups();
    w.vector("adamw", total * kF32 * 18, static_cast<int>(12 * params.size()));
  }
  // Loss and expert load averaged for the statistics.
  const char* mean_group = d.dp > 1 ? "dp" : ep ? "ep" : nullptr;
  if (mean_group != nullptr) {
    w.collective(CollectiveKind::kAllReduce, mean_group, 16, "Double");
    if (d.E > 0) {
      w.collective(CollectiveKind::kAllReduce, mean_group, d.moe_layers * d.E * 4, "Float");
    }
  }
  w.vector("statistics", 64, 2);
  return w.finish();
}

}  // namespace

MemoryEstimate estimate_memory(const TrainingJobConfig& c, int rank) {
  const RankCoords at = coords_of(c.layout, rank);
  const Dims d = dims_of(c, at);
  const nn::ModelConfig& m = c.model;
  MemoryEstimate e;
  int64_t params = 0;
  for (const auto& [name, numel] : local_parameters(c, at)) params += numel;
  e.parameters = params * 4;
  e.gradients = params * 4;
  if (c.zero1 && d.dp > 1) {
    e.optimizer = (params + d.dp - 1) / d.dp * 12;
  } else {
    e.optimizer = params * 8;
  }
  // Activations kept for backward, per layer (Tessera's attention keeps the
  // [T, T] scores and probabilities).
  const double N = static_cast<double>(d.N), H = static_cast<double>(d.H), ad = d.ad;
  const double q_width = static_cast<double>(d.nh * d.hd);
  const double kv_width = static_cast<double>(d.nkv * d.hd);
  const double scores = static_cast<double>(d.B * d.nh) * d.T * d.T;
  double acts = 0;
  for (int64_t l = 0; l < m.num_hidden_layers; ++l) {
    acts += N * H * 4 * 4;                              // residuals, norm inputs and outputs
    acts += N * (2 * q_width + 2 * kv_width) * ad * 2;  // q, k, v, roped, attention output
    acts += scores * (ad + 4 + 1);                      // scores, probabilities, mask
    if (m.is_moe_layer(l)) {
      const double rows = N * static_cast<double>(d.K);
      acts += rows * H * 4 * 2 + rows * static_cast<double>(d.Ie) * ad * 4 +
              N * static_cast<double>(d.E) * 4 * 3;
    } else {
      acts += N * static_cast<double>(d.I) * ad * 4;
    }
  }
  acts += N * static_cast<double>(d.V) * (ad + 4 * 2);  // logits, fp32 copy, softmax
  e.activations = static_cast<int64_t>(acts);
  return e;
}

Trace synthesize_trace(const TrainingJobConfig& config, const DeviceSpec& device) {
  config.validate();
  Trace t;
  t.source = config.source + " on " + device.name;
  const int world = config.layout.world_size();
  t.metadata.world_size = world;
  t.metadata.layout = {
      {"dp", config.layout.dp}, {"ep", config.layout.ep}, {"tp", config.layout.tp}};
  t.metadata.model = config.name.empty() ? config.model.model_type : config.name;
  t.metadata.memory_capacity_bytes = device.memory_bytes;
  t.metadata.groups = layout_partitions(config.layout);
  for (const std::vector<int>& cls : rank_classes(config)) {
    RankTrace entry;
    entry.ranks = cls;
    entry.nodes = synthesize_rank(config, coords_of(config.layout, cls.front()), device);
    entry.peak_memory_bytes = estimate_memory(config, cls.front()).total();
    t.entries.push_back(std::move(entry));
  }
  t.validate();
  return t;
}

}  // namespace tessera::sim
