// The built-in roles: actor (with the 3D-HybridEngine), reference, critic,
// rule reward and reward model.
#include "tessera/rlhf/roles.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <numeric>

#include "tessera/ckpt/checkpoint.h"
#include "tessera/ckpt_nn/model_state.h"
#include "tessera/core/error.h"
#include "tessera/core/metrics.h"
#include "tessera/core/tensor.h"
#include "tessera/formats/safetensors.h"
#include "tessera/nn/generate.h"
#include "tessera/nn/loader.h"
#include "tessera/nn/parameters.h"
#include "tessera/nn/train.h"
#include "tessera/rlhf/algorithms.h"
#include "tessera/rlhf/hybrid_engine.h"
#include "tessera/rlhf/worker.h"

namespace tessera::rlhf {

at::Tensor response_mask(const at::Tensor& prompt_lengths, const at::Tensor& response_lengths,
                         int64_t length) {
  TESSERA_CHECK(prompt_lengths.dim() == 1 && response_lengths.sizes() == prompt_lengths.sizes() &&
                    length >= 2,
                InvalidArgument,
                "response_mask: expected prompt and response lengths [n] and length >= 2");
  at::Tensor cols = at::arange(length - 1, at::kLong).unsqueeze(0);
  at::Tensor first = (prompt_lengths.to(at::kLong) - 1).unsqueeze(1);
  at::Tensor last = first + response_lengths.to(at::kLong).unsqueeze(1);
  return ((cols >= first) & (cols < last)).to(at::kFloat);
}

nn::Tokenizer load_tokenizer(const std::string& spec) {
  if (spec == "bytes") return nn::Tokenizer::bytes({"<|endoftext|>"});
  if (spec.rfind("gguf:", 0) == 0)
    return nn::Tokenizer::from_spec(nn::read_gguf_model(spec.substr(5)).tokenizer);
  return nn::Tokenizer::from_tokenizer_json(spec);
}

namespace {

// --- Shared pieces -------------------------------------------------------------

std::unique_ptr<nn::Transformer> load_model(const ConfigObject& source, nn::ParallelGroups groups) {
  std::unique_ptr<nn::Transformer> model;
  if (source.has("hf")) {
    model = std::make_unique<nn::Transformer>(nn::load_hf_model(source.get_string("hf"), groups));
  } else if (source.has("gguf")) {
    model = std::move(nn::load_gguf_model(source.get_string("gguf"), groups).model);
  } else {
    throw InvalidArgument(source.where() + ": expected \"hf\" or \"gguf\"");
  }
  source.check_no_unknown_keys();
  return model;
}

// Groups of `tp` consecutive ranks (tensor parallel) and of equal tp rank
// (data parallel). Collective over world.
struct Mesh2D {
  int tp = 1, dp = 1, tp_rank = 0, dp_rank = 0;
  std::shared_ptr<dist::ProcessGroup> tp_group, dp_group;
};
Mesh2D make_mesh(const std::shared_ptr<dist::ProcessGroup>& world, int tp,
                 const std::string& role) {
  Mesh2D m;
  const int size = world ? world->size() : 1, rank = world ? world->rank() : 0;
  TESSERA_CHECK(tp >= 1 && size % tp == 0, InvalidArgument, role, ": tp ", tp,
                " does not divide the pool's ", size, " processes");
  m.tp = tp;
  m.dp = size / tp;
  m.tp_rank = rank % tp;
  m.dp_rank = rank / tp;
  if (!world) return m;
  for (int d = 0; d < m.dp && tp > 1; ++d) {
    std::vector<int> ranks(tp);
    std::iota(ranks.begin(), ranks.end(), d * tp);
    if (auto g = world->new_subgroup(ranks, role + "_tp" + std::to_string(d))) m.tp_group = g;
  }
  if (m.dp == size) {
    m.dp_group = world;
  } else {
    for (int t = 0; t < tp && m.dp > 1; ++t) {
      std::vector<int> ranks;
      for (int d = 0; d < m.dp; ++d) ranks.push_back(d * tp + t);
      if (auto g = world->new_subgroup(ranks, role + "_dp" + std::to_string(t))) m.dp_group = g;
    }
  }
  return m;
}

nn::AdamWOptions adamw_options(const ConfigObject& c) {
  nn::AdamWOptions o;
  o.weight_decay = c.get_double("weight_decay", 0.0);
  o.beta2 = 0.999;
  return o;
}

// Runs fn over row chunks of `micro` rows (all rows when micro <= 0).
template <typename Fn>
void for_chunks(int64_t rows, int64_t micro, Fn&& fn) {
  const int64_t step = micro > 0 ? micro : std::max<int64_t>(rows, 1);
  for (int64_t b = 0; b < rows; b += step) fn(b, std::min(step, rows - b));
}

at::Tensor logprobs_no_grad(nn::Transformer& model, const at::Tensor& sequences, int64_t micro) {
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> parts;
  for_chunks(sequences.size(0), micro, [&](int64_t b, int64_t n) {
    parts.push_back(token_logprobs(model, sequences.narrow(0, b, n)));
  });
  return at::cat(parts, 0);
}

double sum_over(const std::shared_ptr<dist::ProcessGroup>& group, double value) {
  if (!group || group->size() == 1) return value;
  at::Tensor t = at::full({1}, value, at::kDouble);
  group->all_reduce(t).wait();
  return t.item<double>();
}

MethodMesh whole_group_mesh(const WorkerContext& ctx) { return {ctx.size, 1, ctx.rank, 0}; }

// Value = hidden state . w + b, per position.
struct ValueHead {
  at::Tensor weight, bias;
  void init(int64_t hidden) {
    weight = at::zeros({hidden}, at::kFloat);
    bias = at::zeros({}, at::kFloat);
  }
  at::Tensor operator()(nn::Transformer& model, const at::Tensor& ids) const {
    nn::ForwardOptions o;
    o.hidden_only = true;
    at::Tensor h = model.forward(ids, o).hidden.to(at::kFloat);
    return at::matmul(h, weight) + bias;  // [B, T]
  }
};

// --- actor ---------------------------------------------------------------------

class ActorRole : public Role {
 public:
  void setup(WorkerContext& ctx, MethodTable& methods) override {
    const ConfigObject& c = ctx.config;
    world_ = ctx.group;
    name_ = ctx.role;
    mesh_ = make_mesh(world_, static_cast<int>(c.get_int("tp", 1)), ctx.role);
    gen_tp_ = static_cast<int>(c.get_int("gen_tp", mesh_.tp));
    lr_ = c.get_double("lr", 1e-5);
    max_grad_norm_ = c.get_double("max_grad_norm", 1.0);
    clip_ = c.get_double("clip", 0.2);
    kl_coef_ = c.get_double("kl_coef", 0.0);
    micro_batch_ = c.get_int("micro_batch", 0);
    seed_ = static_cast<uint64_t>(c.get_int("seed", 1));
    sampling_.temperature = c.get_double("temperature", 1.0);
    sampling_.top_k = c.get_int("top_k", 0);
    sampling_.max_new_tokens = c.get_int("max_new_tokens", 16);
    sampling_.stop_tokens =
        c.has("stop_tokens") ? c.get_int_list("stop_tokens") : std::vector<int64_t>{};
    const bool zero1 = c.get_bool("zero1", false);
    model_ = load_model(c.get_object("model"), {mesh_.tp_group, nullptr});
    config_ = model_->config();
    if (sampling_.stop_tokens.empty()) sampling_.stop_tokens = config_.eos_token_ids;
    model_->set_requires_grad(true);
    std::vector<at::Tensor> params;
    std::vector<double> norm_weights;
    for (const auto& [name, p] : model_->named_parameters()) {
      params.push_back(p);
      auto layout = model_->layout_of(name);
      const bool whole = layout.local_numel(model_->replica_rank()) == layout.global_numel();
      norm_weights.push_back(whole ? 1.0 / mesh_.tp : 1.0);
    }
    zero1_ = zero1 && mesh_.dp > 1;
    optimizer_ = std::make_unique<nn::AdamW>(
        params, adamw_options(c), zero1_ ? mesh_.dp_group : nullptr,
        std::vector<std::shared_ptr<dist::ProcessGroup>>{mesh_.tp_group}, norm_weights);
    // 3D-HybridEngine groups: generation tp groups by stride, micro-DP by neighbours.
    engine_ = hybrid_engine_groups(ctx.size, mesh_.tp, gen_tp_);
    if (gen_tp_ != mesh_.tp) {
      micro_dp_ = make_micro_dp_group(*world_, engine_);
      for (size_t i = 0; i < engine_.gen_tp_groups.size() && gen_tp_ > 1; ++i) {
        if (auto g = world_->new_subgroup(engine_.gen_tp_groups[i],
                                          ctx.role + "_gen_tp" + std::to_string(i))) {
          gen_tp_group_ = g;
        }
      }
    }
    int gen_dp_rank = 0;
    for (size_t i = 0; i < engine_.gen_tp_groups.size(); ++i) {
      const auto& g = engine_.gen_tp_groups[i];
      if (std::find(g.begin(), g.end(), ctx.rank) != g.end()) gen_dp_rank = static_cast<int>(i);
    }
    gen_dp_rank_ = gen_dp_rank;
    const MethodMesh gen_mesh{ctx.size / gen_tp_, gen_tp_, gen_dp_rank,
                              engine_.gen_tp_rank(ctx.rank)};
    const MethodMesh train_mesh{mesh_.dp, mesh_.tp, mesh_.dp_rank, mesh_.tp_rank};
    methods.add("generate", Protocol::kDpCompute, gen_mesh,
                [this](const Batch& in, const ConfigObject& a) { return generate(in, a); });
    methods.add(
        "compute_logprobs", Protocol::kDpCompute, train_mesh,
        [this](const Batch& in, const ConfigObject&) {
          return MethodResult{
              {{"old_logprobs", logprobs_no_grad(*model_, in.at("sequences"), micro_batch_)}}, {}};
        });
    methods.add("update", Protocol::kDpCompute, train_mesh,
                [this](const Batch& in, const ConfigObject& a) { return update(in, a); });
    methods.add("save", Protocol::kOneToAll, whole_group_mesh(ctx),
                [this](const Batch&, const ConfigObject& a) { return save(a.get_string("dir")); });
    methods.add("load", Protocol::kOneToAll, whole_group_mesh(ctx),
                [this](const Batch&, const ConfigObject& a) { return load(a.get_string("dir")); });
  }

 private:
  // The generation model: the training model itself when the layouts
  // agree, else generation shards gathered in each micro-DP group.
  MethodResult generate(const Batch& in, const ConfigObject& args) {
    at::NoGradGuard no_grad;
    const int64_t iteration = args.get_int("iteration");
    const int64_t samples = args.get_int("samples", 1);
    const bool greedy = args.get_bool("greedy", false);
    TESSERA_CHECK(samples >= 1, InvalidArgument, "generate: samples must be >= 1");
    MethodResult r;
    Stopwatch transition;
    std::unique_ptr<nn::Transformer> gen_model;
    int64_t received = 0, gen_bytes = 0;
    if (gen_tp_ != mesh_.tp) {
      gen_model =
          std::make_unique<nn::Transformer>(config_, nn::ParallelGroups{gen_tp_group_, nullptr});
      for (const auto& [name, local] : model_->named_parameters()) {
        const nn::Split split = nn::parameter_spec(config_, name).split;
        at::Tensor shard =
            split == nn::Split::kReplicate
                ? local.detach()
                : gather_shard(name, local.detach(), split == nn::Split::kRows ? 0 : 1, &received);
        gen_model->parameter(name).copy_(shard);
        gen_bytes += static_cast<int64_t>(gen_model->parameter(name).nbytes());
      }
    }
    r.metrics["transition_seconds"] = transition.seconds();
    r.metrics["transition_bytes"] = static_cast<double>(received);
    r.metrics["generation_weight_bytes"] = static_cast<double>(gen_bytes);
    nn::Transformer& gen = gen_model ? *gen_model : *model_;

    const at::Tensor ids = in.at("prompt_ids"), lengths = in.at("prompt_lengths");
    std::vector<std::vector<int64_t>> prompts;
    auto acc = lengths.accessor<int64_t, 1>();
    for (int64_t i = 0; i < ids.size(0); ++i) {
      std::vector<int64_t> p(ids[i].data_ptr<int64_t>(), ids[i].data_ptr<int64_t>() + acc[i]);
      for (int64_t s = 0; s < samples; ++s) prompts.push_back(p);
    }
    nn::SamplingOptions so = sampling_;
    if (greedy) so.temperature = 0;
    // The same seed on every rank of a generation tp group (they sample
    // together); different per dp rank and iteration.
    so.seed = seed_ * 1000003ULL + static_cast<uint64_t>(iteration) * 7919ULL +
              static_cast<uint64_t>(gen_dp_rank_);
    Stopwatch watch;
    nn::GenerationResult g = nn::generate(gen, prompts, so);
    r.metrics["generate_seconds"] = watch.seconds();
    r.metrics["kv_cache_bytes"] = static_cast<double>(g.cache_bytes);
    r.metrics["new_tokens"] = static_cast<double>(g.new_tokens);
    gen_model.reset();  // generation weights and cache are gone before training resumes

    // Every dp rank's rows get the same width (the prompt batch's width +
    // max_new_tokens), so the chunks concatenate.
    const int64_t n = static_cast<int64_t>(prompts.size());
    at::Tensor seq =
        at::zeros({n, std::max<int64_t>(ids.size(1) + so.max_new_tokens, 2)}, at::kLong);
    at::Tensor plen = at::empty({n}, at::kLong), rlen = at::empty({n}, at::kLong);
    for (int64_t i = 0; i < n; ++i) {
      int64_t* row = seq[i].data_ptr<int64_t>();
      std::copy(prompts[i].begin(), prompts[i].end(), row);
      std::copy(g.tokens[i].begin(), g.tokens[i].end(), row + prompts[i].size());
      plen[i] = static_cast<int64_t>(prompts[i].size());
      rlen[i] = static_cast<int64_t>(g.tokens[i].size());
    }
    r.output["sequences"] = seq;
    r.output["prompt_lengths"] = plen;
    r.output["response_lengths"] = rlen;
    for (const auto& [k, t] : in) {  // per-prompt columns follow their samples
      if (k != "prompt_ids" && k != "prompt_lengths") r.output[k] = t.repeat_interleave(samples, 0);
    }
    return r;
  }

  // One weight's generation shard. Shards of a split that tp does not
  // divide evenly (a vocabulary of 257) differ in size: those are padded to
  // the largest for the all-gather and trimmed after.
  // This rank's generation shard of `name`: the training shards of its
  // micro-DP group, gathered through dist's planner (hybrid_engine.h).
  at::Tensor gather_shard(const std::string& name, const at::Tensor& local, int64_t dim,
                          int64_t* received) {
    const dist::Layout layout = model_->layout_of(name);
    const std::vector<int64_t> full = model_->full_shape(name);
    int64_t other = 1;
    for (size_t d = 0; d < full.size(); ++d) other *= d == static_cast<size_t>(dim) ? 1 : full[d];
    const int first = engine_.first_train_shard(world_->rank());
    std::vector<int64_t> sizes;
    for (int i = 0; i < engine_.micro_dp; ++i)
      sizes.push_back(layout.local_numel(first + i) / other);
    return gather_generation_shard(local, micro_dp_, received, dim, sizes);
  }

  MethodResult update(const Batch& in, const ConfigObject& args) {
    const double lr = args.get_double("lr", lr_);
    args.ignore("iteration");  // for the driver's bookkeeping
    const at::Tensor seq = in.at("sequences");
    const at::Tensor mask =
        response_mask(in.at("prompt_lengths"), in.at("response_lengths"), seq.size(1));
    const at::Tensor adv = in.at("advantages").to(at::kFloat);
    check_shape(adv, mask.sizes(), "update: advantages");
    const bool has_old = in.count("old_logprobs") > 0, has_ref = in.count("ref_logprobs") > 0;
    TESSERA_CHECK(kl_coef_ == 0 || has_ref, InvalidArgument,
                  "update: kl_coef > 0 needs ref_logprobs");
    // Token-mean over the whole global batch: each dp rank scales its sum
    // by dp / (global tokens), and the gradient average over dp does the rest.
    const double tokens = sum_over(mesh_.dp_group, mask.sum().item<double>());
    const double scale = mesh_.dp / std::max(tokens, 1.0);
    optimizer_->zero_grad();
    double pg_sum = 0, clipped = 0, kl_sum = 0;
    for_chunks(seq.size(0), micro_batch_, [&](int64_t b, int64_t n) {
      at::Tensor m = mask.narrow(0, b, n);
      at::Tensor logp = token_logprobs(*model_, seq.narrow(0, b, n));
      at::Tensor old = has_old ? in.at("old_logprobs").narrow(0, b, n) : logp.detach();
      at::Tensor a = adv.narrow(0, b, n);
      at::Tensor ratio = at::exp(logp - old);
      at::Tensor s1 = ratio * a, s2 = at::clamp(ratio, 1 - clip_, 1 + clip_) * a;
      at::Tensor per_token = -at::min(s1, s2);
      at::Tensor loss = (per_token * m).sum();
      pg_sum += loss.item<double>();
      clipped += ((s2 < s1).to(at::kFloat) * m).sum().item<double>();
      if (has_ref) {
        at::Tensor kl =
            kl_divergence(logp, in.at("ref_logprobs").narrow(0, b, n), KlEstimator::kK3);
        at::Tensor kl_tok = (kl * m).sum();
        kl_sum += kl_tok.item<double>();
        if (kl_coef_ > 0) loss = loss + kl_coef_ * kl_tok;
      }
      (loss * scale).backward();
    });
    if (!zero1_ && mesh_.dp_group && mesh_.dp > 1) {
      std::vector<at::Tensor> params;
      for (const auto& [name, p] : model_->named_parameters()) params.push_back(p);
      nn::all_reduce_gradients(params, *mesh_.dp_group);
    }
    const double grad_norm = optimizer_->step(lr, max_grad_norm_);
    MethodResult r;
    const double denom = std::max(tokens, 1.0);
    r.metrics["pg_loss"] = sum_over(mesh_.dp_group, pg_sum) / denom;
    r.metrics["clip_fraction"] = sum_over(mesh_.dp_group, clipped) / denom;
    r.metrics["kl"] = sum_over(mesh_.dp_group, kl_sum) / denom;
    r.metrics["grad_norm"] = grad_norm;
    r.metrics["tokens"] = tokens;
    return r;
  }

  ckpt::State state() {
    ckpt::State s;
    const ckpt::ModelState where{mesh_.dp_rank, mesh_.dp};
    ckpt::add_model(s, *model_, where);
    ckpt::add_optimizer(s, *model_, where, *optimizer_);
    s.step = optimizer_->steps();
    return s;
  }

  MethodResult save(const std::string& dir) {
    ckpt::State s = state();
    ckpt::SaveOptions o;
    o.overwrite = true;
    checkpointer_.save(dir, s, world_, o);
    return {};
  }

  MethodResult load(const std::string& dir) {
    ckpt::State s = state();
    checkpointer_.load(dir, s, world_);
    optimizer_->set_steps(s.step);
    ckpt::restore_master(*model_, {mesh_.dp_rank, mesh_.dp}, *optimizer_);
    return {{}, {{"step", static_cast<double>(s.step)}}};
  }

  std::shared_ptr<dist::ProcessGroup> world_, micro_dp_, gen_tp_group_;
  std::string name_;
  Mesh2D mesh_;
  int gen_tp_ = 1, gen_dp_rank_ = 0;
  HybridEngineGroups engine_;
  double lr_ = 0, max_grad_norm_ = 0, clip_ = 0.2, kl_coef_ = 0;
  int64_t micro_batch_ = 0;
  uint64_t seed_ = 1;
  bool zero1_ = false;
  nn::SamplingOptions sampling_;
  nn::ModelConfig config_;
  std::unique_ptr<nn::Transformer> model_;
  std::unique_ptr<nn::AdamW> optimizer_;
  ckpt::Checkpointer checkpointer_;
};

// --- reference -----------------------------------------------------------------

class ReferenceRole : public Role {
 public:
  void setup(WorkerContext& ctx, MethodTable& methods) override {
    mesh_ = make_mesh(ctx.group, static_cast<int>(ctx.config.get_int("tp", 1)), ctx.role);
    micro_batch_ = ctx.config.get_int("micro_batch", 0);
    model_ = load_model(ctx.config.get_object("model"), {mesh_.tp_group, nullptr});
    model_->set_requires_grad(false);
    methods.add(
        "compute_logprobs", Protocol::kDpCompute,
        {mesh_.dp, mesh_.tp, mesh_.dp_rank, mesh_.tp_rank},
        [this](const Batch& in, const ConfigObject&) {
          return MethodResult{
              {{"ref_logprobs", logprobs_no_grad(*model_, in.at("sequences"), micro_batch_)}}, {}};
        });
  }

 private:
  Mesh2D mesh_;
  int64_t micro_batch_ = 0;
  std::unique_ptr<nn::Transformer> model_;
};

// --- critic --------------------------------------------------------------------

class CriticRole : public Role {
 public:
  void setup(WorkerContext& ctx, MethodTable& methods) override {
    const ConfigObject& c = ctx.config;
    world_ = ctx.group;
    lr_ = c.get_double("lr", 1e-5);
    max_grad_norm_ = c.get_double("max_grad_norm", 1.0);
    clip_ = c.get_double("clip", 0.2);
    micro_batch_ = c.get_int("micro_batch", 0);
    model_ = load_model(c.get_object("model"), {});
    model_->set_requires_grad(true);
    head_.init(model_->config().hidden_size);
    head_.weight.requires_grad_(true);
    head_.bias.requires_grad_(true);
    std::vector<at::Tensor> params;
    for (const auto& [name, p] : model_->named_parameters()) params.push_back(p);
    const nn::AdamWOptions o = adamw_options(c);
    model_opt_ = std::make_unique<nn::AdamW>(params, o);
    head_opt_ = std::make_unique<nn::AdamW>(std::vector<at::Tensor>{head_.weight, head_.bias}, o);
    const MethodMesh mesh = whole_group_mesh(ctx);
    methods.add(
        "compute_values", Protocol::kDpCompute, mesh, [this](const Batch& in, const ConfigObject&) {
          at::NoGradGuard no_grad;
          const at::Tensor seq = in.at("sequences");
          std::vector<at::Tensor> parts;
          for_chunks(seq.size(0), micro_batch_, [&](int64_t b, int64_t n) {
            parts.push_back(head_(*model_, seq.narrow(0, b, n).narrow(1, 0, seq.size(1) - 1)));
          });
          return MethodResult{{{"values", at::cat(parts, 0)}}, {}};
        });
    methods.add("update", Protocol::kDpCompute, mesh,
                [this](const Batch& in, const ConfigObject& a) { return update(in, a); });
    methods.add("save", Protocol::kOneToAll, mesh, [this](const Batch&, const ConfigObject& a) {
      ckpt::State s = state();
      ckpt::SaveOptions o;
      o.overwrite = true;
      checkpointer_.save(a.get_string("dir"), s, world_, o);
      return MethodResult{};
    });
    methods.add("load", Protocol::kOneToAll, mesh, [this](const Batch&, const ConfigObject& a) {
      ckpt::State s = state();
      checkpointer_.load(a.get_string("dir"), s, world_);
      model_opt_->set_steps(s.step);
      head_opt_->set_steps(s.step);
      return MethodResult{};
    });
  }

 private:
  MethodResult update(const Batch& in, const ConfigObject& args) {
    const at::Tensor seq = in.at("sequences");
    const at::Tensor mask =
        response_mask(in.at("prompt_lengths"), in.at("response_lengths"), seq.size(1));
    const int size = world_ ? world_->size() : 1;
    const double tokens = sum_over(world_, mask.sum().item<double>());
    const double scale = size / std::max(tokens, 1.0);
    model_opt_->zero_grad();
    head_opt_->zero_grad();
    double loss_sum = 0;
    for_chunks(seq.size(0), micro_batch_, [&](int64_t b, int64_t n) {
      at::Tensor m = mask.narrow(0, b, n);
      at::Tensor v = head_(*model_, seq.narrow(0, b, n).narrow(1, 0, seq.size(1) - 1));
      at::Tensor old = in.at("values").narrow(0, b, n), ret = in.at("returns").narrow(0, b, n);
      at::Tensor clipped = old + at::clamp(v - old, -clip_, clip_);
      at::Tensor per_token = 0.5 * at::max((v - ret).pow(2), (clipped - ret).pow(2));
      at::Tensor loss = (per_token * m).sum();
      loss_sum += loss.item<double>();
      (loss * scale).backward();
    });
    if (world_ && size > 1) {
      std::vector<at::Tensor> params;
      for (const auto& [name, p] : model_->named_parameters()) params.push_back(p);
      params.push_back(head_.weight);
      params.push_back(head_.bias);
      nn::all_reduce_gradients(params, *world_);
    }
    const double lr = args.get_double("lr", lr_);
    const double norm = model_opt_->step(lr, max_grad_norm_);
    head_opt_->step(lr, max_grad_norm_);
    return {{},
            {{"value_loss", sum_over(world_, loss_sum) / std::max(tokens, 1.0)},
             {"critic_grad_norm", norm}}};
  }

  ckpt::State state() {
    ckpt::State s;
    const int size = world_ ? world_->size() : 1, rank = world_ ? world_->rank() : 0;
    const ckpt::ModelState where{rank, size};
    ckpt::add_model(s, *model_, where);
    ckpt::add_optimizer(s, *model_, where, *model_opt_);
    s.add_replicated("value_head.weight", head_.weight.detach(), size);
    s.add_replicated("value_head.bias", head_.bias.detach(), size);
    for (auto& [name, t] : head_opt_->state_tensors())
      s.add_replicated("value_head_optim." + name, t, size);
    s.step = model_opt_->steps();
    return s;
  }

  std::shared_ptr<dist::ProcessGroup> world_;
  double lr_ = 0, max_grad_norm_ = 0, clip_ = 0.2;
  int64_t micro_batch_ = 0;
  std::unique_ptr<nn::Transformer> model_;
  ValueHead head_;
  std::unique_ptr<nn::AdamW> model_opt_, head_opt_;
  ckpt::Checkpointer checkpointer_;
};

// --- rewards -------------------------------------------------------------------

class RuleRewardRole : public Role {
 public:
  void setup(WorkerContext& ctx, MethodTable& methods) override {
    tokenizer_ = std::make_unique<nn::Tokenizer>(
        load_tokenizer(ctx.config.get_string("tokenizer", "bytes")));
    methods.add("score", Protocol::kDpCompute, whole_group_mesh(ctx),
                [this](const Batch& in, const ConfigObject&) {
                  const at::Tensor seq = in.at("sequences"), plen = in.at("prompt_lengths"),
                                   rlen = in.at("response_lengths");
                  const at::Tensor answers = in.at("answers");
                  const int64_t n = seq.size(0);
                  at::Tensor scores = at::empty({n}, at::kFloat);
                  for (int64_t i = 0; i < n; ++i) {
                    const int64_t* row = seq[i].data_ptr<int64_t>();
                    const int64_t p = plen[i].item<int64_t>(), r = rlen[i].item<int64_t>();
                    std::vector<int32_t> ids(row + p, row + p + r);
                    scores[i] = static_cast<float>(arithmetic_reward(
                        std::to_string(answers[i].item<int64_t>()), tokenizer_->decode(ids)));
                  }
                  return MethodResult{{{"scores", scores}},
                                      {{"mean_score", n ? scores.mean().item<double>() : 0.0}}};
                });
  }

 private:
  std::unique_ptr<nn::Tokenizer> tokenizer_;
};

class RewardModelRole : public Role {
 public:
  void setup(WorkerContext& ctx, MethodTable& methods) override {
    micro_batch_ = ctx.config.get_int("micro_batch", 0);
    model_ = load_model(ctx.config.get_object("model"), {});
    model_->set_requires_grad(false);
    const auto head = nn::SafetensorsFile::open(ctx.config.get_string("head"));
    const int64_t hidden = model_->config().hidden_size;
    head_.weight = head.get("value_head.weight", at::kFloat, {hidden}).clone();
    head_.bias = head.get("value_head.bias", at::kFloat, {}).clone();
    methods.add("score", Protocol::kDpCompute, whole_group_mesh(ctx),
                [this](const Batch& in, const ConfigObject&) {
                  at::NoGradGuard no_grad;
                  const at::Tensor seq = in.at("sequences");
                  const at::Tensor last =
                      (in.at("prompt_lengths") + in.at("response_lengths") - 1).clamp_min(0);
                  std::vector<at::Tensor> parts;
                  for_chunks(seq.size(0), micro_batch_, [&](int64_t b, int64_t n) {
                    at::Tensor v = head_(*model_, seq.narrow(0, b, n));
                    parts.push_back(v.gather(1, last.narrow(0, b, n).unsqueeze(1)).squeeze(1));
                  });
                  at::Tensor scores = at::cat(parts, 0);
                  return MethodResult{
                      {{"scores", scores}},
                      {{"mean_score", scores.numel() ? scores.mean().item<double>() : 0.0}}};
                });
  }

 private:
  int64_t micro_batch_ = 0;
  std::unique_ptr<nn::Transformer> model_;
  ValueHead head_;
};

}  // namespace

RoleRegistry RoleRegistry::builtin() {
  RoleRegistry r;
  r.add("actor", [] { return std::make_unique<ActorRole>(); });
  r.add("reference", [] { return std::make_unique<ReferenceRole>(); });
  r.add("critic", [] { return std::make_unique<CriticRole>(); });
  r.add("reward_rule", [] { return std::make_unique<RuleRewardRole>(); });
  r.add("reward_model", [] { return std::make_unique<RewardModelRole>(); });
  return r;
}

}  // namespace tessera::rlhf
