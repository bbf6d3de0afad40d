#include "tessera/nn/train.h"

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/grad_mode.h>

#include <cmath>
#include <cstring>
#include <random>
#include <sstream>

#include "tessera/core/error.h"
#include "tessera/core/file_io.h"
#include "tessera/core/log.h"
#include "tessera/core/metrics.h"
#include "tessera/core/tensor.h"

namespace tessera::nn {

// ---------------------------------------------------------------------------
// AdamW

struct AdamW::Impl {
  std::vector<at::Tensor> params;
  AdamWOptions options;
  std::shared_ptr<dist::ProcessGroup> zero;
  std::vector<std::shared_ptr<dist::ProcessGroup>> norm_groups;  // non-null, size > 1
  std::vector<double> norm_weights;
  at::Tensor norm_weight_flat;  // ZeRO: [shard]
  int64_t step = 0;

  // Sums a local squared norm over the model-parallel groups.
  double global_norm(double local_sq) const {
    if (norm_groups.empty()) return std::sqrt(local_sq);
    at::Tensor t = at::full({1}, local_sq, at::kDouble);
    for (const auto& g : norm_groups) g->all_reduce(t).wait();
    return std::sqrt(t.item<double>());
  }
  // Plain mode: per-parameter state.
  std::vector<at::Tensor> m, v;
  // ZeRO-1: the flattened parameters [padded], this rank's slice.
  int64_t total = 0, padded = 0, shard = 0, begin = 0;
  at::Tensor master, m_flat, v_flat, decay_mask;  // [shard]
  // Step buffers, made at the first step and reused: the flattened
  // gradients and the gathered parameters [padded], the averaged gradient
  // slice [shard]. With init_runtime's allocator fresh tensors would be
  // recycled too (core/runtime.cpp, LargeBlockCache); kept here, the step
  // does not depend on it.
  at::Tensor flat_grad, gathered, grad_shard;
  // Per parameter, its place in flat_grad and in gathered, shaped like it.
  std::vector<at::Tensor> grad_slots, param_slots;

  bool decays(const at::Tensor& p) const { return p.dim() >= 2; }
};

AdamW::AdamW(std::vector<at::Tensor> params, AdamWOptions options,
             std::shared_ptr<dist::ProcessGroup> zero_group,
             std::vector<std::shared_ptr<dist::ProcessGroup>> norm_groups,
             std::vector<double> norm_weights)
    : impl_(std::make_unique<Impl>()) {
  Impl& s = *impl_;
  s.params = std::move(params);
  s.options = options;
  s.zero = zero_group && zero_group->size() > 1 ? zero_group : nullptr;
  for (auto& g : norm_groups) {
    if (g && g->size() > 1) s.norm_groups.push_back(std::move(g));
  }
  s.norm_weights = norm_weights.empty() ? std::vector<double>(s.params.size(), 1.0) : norm_weights;
  TESSERA_CHECK(s.norm_weights.size() == s.params.size(), InvalidArgument,
                "AdamW: ", s.norm_weights.size(), " norm weights for ", s.params.size(),
                " parameters");
  at::NoGradGuard no_grad;
  if (!s.zero) {
    for (const auto& p : s.params) {
      s.m.push_back(at::zeros_like(p, at::kFloat));
      s.v.push_back(at::zeros_like(p, at::kFloat));
    }
    return;
  }
  const int world = s.zero->size();
  for (const auto& p : s.params) s.total += p.numel();
  s.shard = (s.total + world - 1) / world;
  s.padded = s.shard * world;
  s.begin = s.shard * s.zero->rank();
  std::vector<at::Tensor> flat, mask, weight;
  for (size_t i = 0; i < s.params.size(); ++i) {
    const auto& p = s.params[i];
    flat.push_back(p.detach().reshape({-1}).to(at::kFloat));
    mask.push_back(at::full({p.numel()}, s.decays(p) ? 1.0f : 0.0f));
    weight.push_back(at::full({p.numel()}, static_cast<float>(s.norm_weights[i])));
  }
  auto padded = [&](std::vector<at::Tensor>& parts) {
    at::Tensor all = at::cat(parts);
    if (s.padded > s.total) all = at::cat({all, at::zeros({s.padded - s.total})});
    return all.narrow(0, s.begin, s.shard).clone();
  };
  s.master = padded(flat);
  s.decay_mask = padded(mask);
  s.norm_weight_flat = padded(weight);
  s.m_flat = at::zeros({s.shard});
  s.v_flat = at::zeros({s.shard});
}

AdamW::~AdamW() = default;
AdamW::AdamW(AdamW&&) noexcept = default;

int64_t AdamW::steps() const { return impl_->step; }

void AdamW::set_steps(int64_t steps) {
  TESSERA_CHECK(steps >= 0, InvalidArgument, "AdamW: step count must be >= 0, got ", steps);
  impl_->step = steps;
}

bool AdamW::zero1() const { return impl_->zero != nullptr; }

std::vector<std::pair<std::string, at::Tensor>> AdamW::state_tensors() {
  Impl& s = *impl_;
  std::vector<std::pair<std::string, at::Tensor>> out;
  if (s.zero) {
    out.emplace_back("master", s.master);
    out.emplace_back("exp_avg", s.m_flat);
    out.emplace_back("exp_avg_sq", s.v_flat);
    return out;
  }
  for (size_t i = 0; i < s.m.size(); ++i) out.emplace_back("exp_avg." + std::to_string(i), s.m[i]);
  for (size_t i = 0; i < s.v.size(); ++i)
    out.emplace_back("exp_avg_sq." + std::to_string(i), s.v[i]);
  return out;
}

int64_t AdamW::state_bytes() const {
  const Impl& s = *impl_;
  if (s.zero) return (s.master.numel() + s.m_flat.numel() + s.v_flat.numel()) * 4;
  int64_t n = 0;
  for (size_t i = 0; i < s.m.size(); ++i) n += (s.m[i].numel() + s.v[i].numel()) * 4;
  return n;
}

void AdamW::zero_grad() {
  for (auto& p : impl_->params) {
    if (p.grad().defined()) p.mutable_grad() = at::Tensor();
  }
}

double AdamW::step(double lr, double max_grad_norm) {
  return translate_errors(
      "AdamW::step",
      [&]() -> double {
        Impl& s = *impl_;
        at::NoGradGuard no_grad;
        ++s.step;
        const auto& o = s.options;
        const double bc1 = 1 - std::pow(o.beta1, static_cast<double>(s.step));
        const double bc2 = 1 - std::pow(o.beta2, static_cast<double>(s.step));
        auto grad_of = [](const at::Tensor& p) {
          return p.grad().defined() ? p.grad().to(at::kFloat) : at::zeros_like(p, at::kFloat);
        };
        if (!s.zero) {
          double sq = 0;
          std::vector<at::Tensor> grads;
          for (size_t i = 0; i < s.params.size(); ++i) {
            grads.push_back(grad_of(s.params[i]));
            sq += grads.back().pow(2).sum().item<double>() * s.norm_weights[i];
          }
          double norm = s.global_norm(sq);
          double scale =
              max_grad_norm > 0 && norm > max_grad_norm ? max_grad_norm / (norm + 1e-6) : 1.0;
          for (size_t i = 0; i < s.params.size(); ++i) {
            at::Tensor g = grads[i] * scale;
            s.m[i].mul_(o.beta1).add_(g, 1 - o.beta1);
            s.v[i].mul_(o.beta2).addcmul_(g, g, 1 - o.beta2);
            at::Tensor p32 = s.params[i].detach().to(at::kFloat);
            if (s.decays(s.params[i])) p32.mul_(1 - lr * o.weight_decay);
            p32.addcdiv_(s.m[i] / bc1, (s.v[i] / bc2).sqrt_().add_(o.eps), -lr);
            s.params[i].detach().copy_(p32);
          }
          return norm;
        }
        // ZeRO-1: average-reduce-scatter the flat gradients, update this slice,
        // all_gather the parameters.
        if (!s.flat_grad.defined()) {
          s.flat_grad = at::zeros({s.padded});  // the padding stays zero
          s.gathered = at::empty({s.padded});
          s.grad_shard = at::empty({s.shard});
          int64_t offset = 0;
          for (const auto& p : s.params) {
            s.grad_slots.push_back(s.flat_grad.narrow(0, offset, p.numel()).view(p.sizes()));
            s.param_slots.push_back(s.gathered.narrow(0, offset, p.numel()).view(p.sizes()));
            offset += p.numel();
          }
        }
        for (size_t i = 0; i < s.params.size(); ++i) {
          const at::Tensor& grad = s.params[i].grad();
          if (grad.defined()) {
            s.grad_slots[i].copy_(grad);
          } else {
            s.grad_slots[i].zero_();
          }
        }
        at::Tensor& g = s.grad_shard;
        s.zero->reduce_scatter(g, s.flat_grad, dist::ReduceOp::kAvg).wait();
        at::Tensor sq = (g.pow(2) * s.norm_weight_flat).sum().to(at::kDouble).view({1});
        s.zero->all_reduce(sq).wait();
        double norm = s.global_norm(sq.item<double>());
        if (max_grad_norm > 0 && norm > max_grad_norm) g.mul_(max_grad_norm / (norm + 1e-6));
        s.m_flat.mul_(o.beta1).add_(g, 1 - o.beta1);
        s.v_flat.mul_(o.beta2).addcmul_(g, g, 1 - o.beta2);
        s.master.mul_(1 - lr * o.weight_decay * s.decay_mask);
        s.master.addcdiv_(s.m_flat / bc1, (s.v_flat / bc2).sqrt_().add_(o.eps), -lr);
        s.zero->all_gather(s.gathered, s.master).wait();
        for (size_t i = 0; i < s.params.size(); ++i) s.params[i].detach().copy_(s.param_slots[i]);
        return norm;
      },
      ErrorCode::kInvalidArgument);
}

void all_reduce_gradients(const std::vector<at::Tensor>& params, dist::ProcessGroup& group,
                          int64_t bucket_bytes) {
  if (group.size() == 1) return;
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> bucket;
  int64_t bytes = 0;
  auto flush = [&] {
    if (bucket.empty()) return;
    std::vector<at::Tensor> flat;
    for (auto& g : bucket) flat.push_back(g.reshape({-1}));
    at::Tensor buf = at::cat(flat);
    group.all_reduce(buf, dist::ReduceOp::kAvg).wait();
    int64_t off = 0;
    for (auto& g : bucket) {
      g.copy_(buf.narrow(0, off, g.numel()).view(g.sizes()));
      off += g.numel();
    }
    bucket.clear();
    bytes = 0;
  };
  for (const auto& p : params) {
    if (!p.grad().defined()) continue;
    bucket.push_back(p.grad());
    bytes += tensor_bytes(p.grad());
    if (bytes >= bucket_bytes) flush();
  }
  flush();
}

double warmup_cosine_lr(int64_t step, int64_t warmup, int64_t total, double max_lr, double min_lr) {
  if (warmup > 0 && step < warmup) return max_lr * static_cast<double>(step + 1) / warmup;
  if (step >= total) return min_lr;
  double progress = static_cast<double>(step - warmup) / std::max<int64_t>(1, total - warmup);
  return min_lr + 0.5 * (max_lr - min_lr) * (1 + std::cos(M_PI * progress));
}

// ---------------------------------------------------------------------------
// TokenDataset

struct TokenDataset::Impl {
  std::string path;
  int bytes_per_token = 2;
  int64_t tokens = 0;
  std::unique_ptr<MappedFile> file;

  int64_t at(int64_t i) const {
    const uint8_t* p = file->data() + i * bytes_per_token;
    int64_t v = 0;
    for (int b = bytes_per_token - 1; b >= 0; --b) v = (v << 8) | p[b];
    return v;
  }
};

TokenDataset TokenDataset::open(const std::string& path, int bytes_per_token) {
  TESSERA_CHECK(bytes_per_token == 2 || bytes_per_token == 4, InvalidArgument,
                "token file: bytes_per_token must be 2 or 4");
  auto impl = std::make_shared<Impl>();
  impl->path = path;
  impl->bytes_per_token = bytes_per_token;
  impl->file = std::make_unique<MappedFile>(path);
  const size_t size = impl->file->size();
  TESSERA_CHECK(size > 0 && size % bytes_per_token == 0, DataLoss, "token file '", path, "' has ",
                size, " bytes, not a positive multiple of ", bytes_per_token, " (truncated?)");
  impl->tokens = static_cast<int64_t>(size) / bytes_per_token;
  TokenDataset d;
  d.impl_ = std::move(impl);
  return d;
}

void TokenDataset::write(const std::string& path, const std::vector<int64_t>& ids,
                         int bytes_per_token) {
  TESSERA_CHECK(bytes_per_token == 2 || bytes_per_token == 4, InvalidArgument,
                "token file: bytes_per_token must be 2 or 4");
  const int64_t limit = bytes_per_token == 2 ? 65535 : 0xffffffffLL;
  std::vector<uint8_t> bytes(ids.size() * bytes_per_token);
  for (size_t i = 0; i < ids.size(); ++i) {
    TESSERA_CHECK(ids[i] >= 0 && ids[i] <= limit, InvalidArgument, "token file: id ", ids[i],
                  " does not fit in ", bytes_per_token, " bytes");
    for (int b = 0; b < bytes_per_token; ++b)
      bytes[i * bytes_per_token + b] = (ids[i] >> (8 * b)) & 0xff;
  }
  AtomicFileWriter out(path);
  out.append(bytes.data(), bytes.size());
  out.commit();
}

int64_t TokenDataset::num_tokens() const { return impl_->tokens; }

TokenDataset::Batch TokenDataset::batch(int64_t step, int64_t global_batch, int64_t seq_len,
                                        int rank, int world, uint64_t seed) const {
  TESSERA_CHECK(global_batch % world == 0, InvalidArgument, "token data: global batch ",
                global_batch, " does not split over ", world, " ranks");
  const int64_t windows = (impl_->tokens - 1) / seq_len;
  TESSERA_CHECK(windows >= 1, InvalidArgument, "token data: ", impl_->tokens,
                " tokens are too few for sequences of ", seq_len);
  const int64_t local = global_batch / world;
  at::Tensor ids = at::empty({local, seq_len + 1}, at::kLong);
  auto acc = ids.accessor<int64_t, 2>();
  for (int64_t i = 0; i < local; ++i) {
    // Window of global sample j of this step: a hash of (seed, step, j), so
    // every rank can compute any sample without shared state.
    int64_t j = rank * local + i;
    std::mt19937_64 rng(seed * 0x9E3779B97F4A7C15ULL + static_cast<uint64_t>(step) * 1000003ULL +
                        static_cast<uint64_t>(j));
    int64_t w = static_cast<int64_t>(rng() % static_cast<uint64_t>(windows));
    for (int64_t t = 0; t <= seq_len; ++t) acc[i][t] = impl_->at(w * seq_len + t);
  }
  return {ids.narrow(1, 0, seq_len).contiguous(), ids.narrow(1, 1, seq_len).contiguous()};
}

// ---------------------------------------------------------------------------
// Trainer

namespace {

// CPU autocast to bfloat16 for the scope (the same switch torch.autocast
// flips); restores the previous state and drops the cast-weight cache.
class Bf16Autocast {
 public:
  explicit Bf16Autocast(bool on) : on_(on) {
    if (!on_) return;
    was_enabled_ = at::autocast::is_cpu_enabled();
    was_dtype_ = at::autocast::get_autocast_cpu_dtype();
    at::autocast::set_cpu_enabled(true);
    at::autocast::set_autocast_cpu_dtype(at::kBFloat16);
    at::autocast::increment_nesting();
  }
  ~Bf16Autocast() {
    if (!on_) return;
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    at::autocast::set_cpu_enabled(was_enabled_);
    at::autocast::set_autocast_cpu_dtype(was_dtype_);
  }
  Bf16Autocast(const Bf16Autocast&) = delete;
  Bf16Autocast& operator=(const Bf16Autocast&) = delete;

 private:
  bool on_;
  bool was_enabled_ = false;
  at::ScalarType was_dtype_ = at::kBFloat16;
};

}  // namespace

struct Trainer::Impl {
  Transformer* model;
  TrainerOptions options;
  std::shared_ptr<dist::ProcessGroup> dp;
  std::unique_ptr<AdamW> optimizer;
  std::vector<at::Tensor> params;
  int64_t step = 0;
};

Trainer::Trainer(Transformer& model, TrainerOptions options, std::shared_ptr<dist::ProcessGroup> dp)
    : Trainer(model, std::move(options), std::move(dp), {}) {}

Trainer::Trainer(Transformer& model, TrainerOptions options, std::shared_ptr<dist::ProcessGroup> dp,
                 std::vector<at::Tensor> params)
    : impl_(std::make_unique<Impl>()) {
  Impl& t = *impl_;
  t.params = std::move(params);
  t.model = &model;
  t.options = options;
  t.dp = dp && dp->size() > 1 ? dp : nullptr;
  TESSERA_CHECK(options.grad_accumulation >= 1, InvalidArgument,
                "trainer: grad_accumulation must be >= 1");
  TESSERA_CHECK(model.groups().ep_size() == 1 || !t.dp, InvalidArgument,
                "trainer: expert parallelism together with a separate data-parallel group is not "
                "supported yet");
  TESSERA_CHECK(!options.zero1 || t.dp, InvalidArgument,
                "trainer: ZeRO-1 needs a data-parallel group of more than one rank");
  if (!t.params.empty()) {
    // Only the given tensors train (adapters); the base model is frozen.
    model.set_requires_grad(false);
    for (auto& p : t.params) p.requires_grad_(true);
    t.optimizer = std::make_unique<AdamW>(t.params, options.adamw, options.zero1 ? t.dp : nullptr);
    return;
  }
  model.set_requires_grad(true);
  std::vector<double> norm_weights;
  for (const auto& [name, p] : model.named_parameters()) {
    t.params.push_back(p);
    // Elements held by several ranks of the replica (tp x ep) count once in
    // the global norm: weight = global elements / elements over all ranks.
    auto layout = model.layout_of(name);
    int64_t held = 0;
    for (int r = 0; r < layout.world_size(); ++r) held += layout.local_numel(r);
    norm_weights.push_back(held > 0 ? static_cast<double>(layout.global_numel()) / held : 1.0);
  }
  t.optimizer = std::make_unique<AdamW>(
      t.params, options.adamw, options.zero1 ? t.dp : nullptr,
      std::vector<std::shared_ptr<dist::ProcessGroup>>{model.groups().tp, model.groups().ep},
      norm_weights);
}

Trainer::~Trainer() = default;
AdamW& Trainer::optimizer() { return *impl_->optimizer; }
Transformer& Trainer::model() { return *impl_->model; }
int64_t Trainer::steps() const { return impl_->step; }

void Trainer::set_steps(int64_t steps) {
  TESSERA_CHECK(steps >= 0, InvalidArgument, "trainer: step count must be >= 0, got ", steps);
  impl_->step = steps;
  impl_->optimizer->set_steps(steps);
}

StepStats Trainer::step(const at::Tensor& input_ids, const at::Tensor& labels) {
  return translate_errors(
      "Trainer::step",
      [&]() -> StepStats {
        Impl& t = *impl_;
        Stopwatch watch;
        const int64_t micro = t.options.grad_accumulation;
        TESSERA_CHECK(input_ids.size(0) % micro == 0, InvalidArgument, "trainer: batch of ",
                      input_ids.size(0), " does not split into ", micro, " micro-batches");
        const int64_t mb = input_ids.size(0) / micro;
        double ce_sum = 0, aux_sum = 0;
        at::Tensor load;
        for (int64_t i = 0; i < micro; ++i) {
          Bf16Autocast autocast(t.options.bf16_autocast);
          auto loss = t.model->loss(input_ids.narrow(0, i * mb, mb), labels.narrow(0, i * mb, mb));
          (loss.total / static_cast<double>(micro)).backward();
          ce_sum += loss.ce.item<double>();
          aux_sum += loss.aux.item<double>();
          if (loss.expert_load.defined())
            load = load.defined() ? load + loss.expert_load : loss.expert_load;
        }
        const auto& groups = t.model->groups();
        if (groups.ep_size() > 1) {
          // Expert parallel ranks see different tokens: average the dense
          // parameters' gradients over them; an expert's gradient already holds
          // every rank's contribution (through the all_to_all backward), so it is
          // scaled to the mean.
          std::vector<at::Tensor> dense;
          for (const auto& [name, p] : t.model->named_parameters()) {
            if (name.find(".experts.") != std::string::npos) {
              if (p.grad().defined()) p.mutable_grad().div_(groups.ep_size());
            } else {
              dense.push_back(p);
            }
          }
          all_reduce_gradients(dense, *groups.ep);
        }
        if (t.dp && !t.options.zero1) all_reduce_gradients(t.params, *t.dp);
        double lr = warmup_cosine_lr(t.step, t.options.warmup, t.options.steps, t.options.lr,
                                     t.options.min_lr);
        if (t.options.before_update) t.options.before_update();
        StepStats stats;
        stats.grad_norm = t.optimizer->step(lr, t.options.max_grad_norm);
        t.optimizer->zero_grad();
        stats.step = t.step++;
        stats.lr = lr;
        at::Tensor totals = at::tensor({ce_sum / micro, aux_sum / micro}, at::kDouble);
        auto* mean_group = t.dp ? t.dp.get() : groups.ep_size() > 1 ? groups.ep.get() : nullptr;
        if (mean_group) mean_group->all_reduce(totals, dist::ReduceOp::kAvg).wait();
        stats.loss = totals[0].item<double>();
        stats.aux_loss = totals[1].item<double>();
        if (load.defined()) {
          if (mean_group) mean_group->all_reduce(load).wait();
          stats.expert_load = load;
        }
        const double world = mean_group ? mean_group->size() : 1;
        stats.tokens_per_second = static_cast<double>(input_ids.numel()) * world / watch.seconds();
        if (t.options.log_every > 0 &&
            (stats.step % t.options.log_every == 0 || t.step == t.options.steps)) {
          TESSERA_LOG(Info, "nn") << [&] {
            std::ostringstream line;
            line << "step " << stats.step + 1 << "/" << t.options.steps << " loss " << stats.loss
                 << " grad-norm " << stats.grad_norm << " lr " << stats.lr << " "
                 << static_cast<int64_t>(stats.tokens_per_second) << " tok/s";
            if (stats.expert_load.defined()) {
              at::Tensor load = stats.expert_load.sum(0);
              load = load / load.sum().clamp_min(1) * 100;
              line << " expert load %:";
              for (int64_t e = 0; e < load.size(0); ++e)
                line << " " << static_cast<int>(load[e].item<double>() + 0.5);
            }
            return line.str();
          }();
        }
        return stats;
      },
      ErrorCode::kInvalidArgument);
}

}  // namespace tessera::nn
