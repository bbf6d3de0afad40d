// Model and optimizer checkpoints, Hugging Face interop, offline resharding.
#include "tessera/ckpt_nn/model_state.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <thread>

#include "tessera/core/error.h"
#include "tessera/core/tensor.h"
#include "tessera/dist/redistribute.h"
#include "tessera/dist/rendezvous.h"
#include "tessera/formats/safetensors.h"
#include "tessera/nn/loader.h"

namespace tessera::ckpt {

using dist::Box;
using dist::Chunk;
using dist::Layout;

namespace {

std::string optim_name(const std::string& key, const std::string& param) {
  return "optim." + key + "/" + param;
}

}  // namespace

Layout over_dp(const Layout& replica, int dp_size) {
  const int R = replica.world_size();
  std::vector<std::vector<Chunk>> chunks(R * dp_size);
  for (int d = 0; d < dp_size; ++d) {
    for (int r = 0; r < R; ++r) chunks[d * R + r] = replica.chunks(r);
  }
  return Layout::from_chunks(replica.global_shape(), chunks, replica.is_flat());
}

std::map<std::string, Layout> zero1_layouts(
    const std::vector<std::pair<std::string, Layout>>& replica_layouts, int dp_size) {
  TESSERA_CHECK(!replica_layouts.empty(), InvalidArgument, "zero1_layouts: no parameters");
  const int R = replica_layouts.front().second.world_size();
  std::map<std::string, std::vector<std::vector<Chunk>>> chunks;
  for (const auto& [name, l] : replica_layouts) chunks[name].resize(R * dp_size);
  for (int r = 0; r < R; ++r) {
    int64_t total = 0;
    for (const auto& [name, l] : replica_layouts) total += l.local_numel(r);
    const int64_t shard = (total + dp_size - 1) / dp_size;
    int64_t off = 0;
    for (const auto& [name, l] : replica_layouts) {
      const int64_t n = l.local_numel(r);
      if (n > 0) {
        TESSERA_CHECK(l.chunks(r).size() == 1 && !l.is_flat(), InvalidArgument,
                      "zero1_layouts: parameter '", name, "' must have one regular chunk per rank");
        const Box& box = l.chunks(r)[0].box;
        for (int d = 0; d < dp_size; ++d) {
          const int64_t a = std::max(off, d * shard), b = std::min(off + n, (d + 1) * shard);
          if (a >= b) continue;
          int64_t local = 0;
          for (Box piece : dist::decompose_flat_range(box.length, a - off, b - off)) {
            for (size_t k = 0; k < piece.offset.size(); ++k) piece.offset[k] += box.offset[k];
            const int64_t numel = piece.numel();
            chunks[name][d * R + r].push_back({std::move(piece), local});
            local += numel;
          }
        }
      }
      off += n;
    }
  }
  std::map<std::string, Layout> out;
  for (const auto& [name, l] : replica_layouts) {
    out.emplace(name, Layout::from_chunks(l.global_shape(), chunks[name], /*flat=*/true));
  }
  return out;
}

namespace {

// The split and owning expert are stored so that tools can rebuild the
// layouts for other parallel degrees from the metadata alone.
std::map<std::string, std::string> param_attrs(const nn::Transformer& model,
                                               const std::string& name, int64_t order) {
  const nn::ParameterSpec spec = nn::parameter_spec(model.config(), name);
  return {{"split", nn::split_name(spec.split)},
          {"expert", std::to_string(spec.expert)},
          {"order", std::to_string(order)}};
}

void set_model_user(State& state, const nn::Transformer& model, const ModelState& where) {
  state.user["tessera.model_config"] = model.config().to_json();
  state.user["tessera.tp"] = std::to_string(model.groups().tp_size());
  state.user["tessera.ep"] = std::to_string(model.groups().ep_size());
  state.user["tessera.dp"] = std::to_string(where.dp_size);
}

// Replica layouts of every parameter, in model order (the model's own, which
// nn::parameter_layout gives).
std::vector<std::pair<std::string, Layout>> model_replica_layouts(const nn::Transformer& model) {
  std::vector<std::pair<std::string, Layout>> out;
  for (const auto& name : model.full_parameter_names())
    out.emplace_back(name, model.layout_of(name));
  return out;
}

std::map<std::string, at::Tensor> local_params(const nn::Transformer& model) {
  std::map<std::string, at::Tensor> m;
  for (const auto& [name, t] : model.named_parameters()) m[name] = t;
  return m;
}

}  // namespace

void add_model(State& state, const nn::Transformer& model, const ModelState& where) {
  auto layouts = model_replica_layouts(model);
  auto locals = local_params(model);
  int64_t order = 0;
  for (auto& [name, l] : layouts) {
    auto it = locals.find(name);
    at::Tensor local =
        it != locals.end() ? it->second.detach() : at::empty({0}, locals.begin()->second.options());
    auto attrs = param_attrs(model, name, order++);
    attrs["role"] = "param";
    state.add(name, local, over_dp(l, where.dp_size), std::move(attrs));
  }
  set_model_user(state, model, where);
}

void add_zero1_optimizer(State& state, const nn::Transformer& model, const ModelState& where,
                         const std::map<std::string, at::Tensor>& flat) {
  auto layouts = model_replica_layouts(model);
  auto zero = zero1_layouts(layouts, where.dp_size);
  const int R = layouts.front().second.world_size();
  const int me = where.dp_rank * R + model.replica_rank();
  // This rank's slice [begin, begin + shard) of its replica rank's concatenation.
  int64_t total = 0;
  for (const auto& [name, t] : model.named_parameters()) total += t.numel();
  const int64_t shard = (total + where.dp_size - 1) / where.dp_size;
  for (const auto& [key, buffer] : flat) {
    TESSERA_CHECK(buffer.dim() == 1 && buffer.numel() == shard, InvalidArgument,
                  "checkpoint: ZeRO-1 optimizer state '", key, "' on dp rank ", where.dp_rank,
                  " has shape ", shape_string(buffer.sizes()), ", expected [", shard, "]");
  }
  int64_t order = 0;
  for (const auto& [name, l] : layouts) {
    const Layout& zl = zero.at(name);
    const int64_t n = zl.local_numel(me);
    // The parameter's share starts where its first chunk's flat range does.
    int64_t start = 0;
    if (n > 0) {
      int64_t off = 0;
      for (const auto& [pname, t] : model.named_parameters()) {
        if (pname == name) break;
        off += t.numel();
      }
      start = std::max<int64_t>(off, where.dp_rank * shard) - where.dp_rank * shard;
    }
    for (const auto& [key, buffer] : flat) {
      auto attrs = param_attrs(model, name, order);
      attrs["role"] = "optim";
      attrs["key"] = key;
      attrs["param"] = name;
      attrs["zero1"] = "1";
      at::Tensor local =
          n > 0 ? buffer.detach().narrow(0, start, n) : buffer.detach().narrow(0, 0, 0);
      state.add(optim_name(key, name), local, zl, std::move(attrs));
    }
    ++order;
  }
  set_model_user(state, model, where);
  state.user["tessera.zero1"] = "1";
}

void add_optimizer(State& state, const nn::Transformer& model, const ModelState& where,
                   const std::map<std::string, std::vector<at::Tensor>>& per_param) {
  auto layouts = model_replica_layouts(model);
  std::map<std::string, size_t> index;
  const auto& params = model.named_parameters();
  for (size_t i = 0; i < params.size(); ++i) index[params[i].first] = i;
  int64_t order = 0;
  for (const auto& [name, l] : layouts) {
    for (const auto& [key, tensors] : per_param) {
      TESSERA_CHECK(tensors.size() == params.size(), InvalidArgument,
                    "checkpoint: optimizer state '", key, "' has ", tensors.size(), " tensors for ",
                    params.size(), " parameters");
      auto it = index.find(name);
      at::Tensor local = it != index.end() ? tensors[it->second].detach()
                                           : at::empty({0}, tensors.front().options());
      auto attrs = param_attrs(model, name, order);
      attrs["role"] = "optim";
      attrs["key"] = key;
      attrs["param"] = name;
      state.add(optim_name(key, name), local, over_dp(l, where.dp_size), std::move(attrs));
    }
    ++order;
  }
  set_model_user(state, model, where);
}

namespace {

// ZeRO-1 slice length for `model`'s local parameters over where.dp_size ranks.
int64_t zero1_shard(const nn::Transformer& model, const ModelState& where) {
  int64_t total = 0;
  for (const auto& [name, t] : model.named_parameters()) total += t.numel();
  return (total + where.dp_size - 1) / where.dp_size;
}

bool has_master(const State& state) {
  auto it = state.entries.lower_bound(optim_name("master", ""));
  return it != state.entries.end() && it->first.rfind(optim_name("master", ""), 0) == 0;
}

}  // namespace

void add_optimizer(State& state, const nn::Transformer& model, const ModelState& where,
                   nn::AdamW& optimizer) {
  const auto& params = model.named_parameters();
  auto tensors = optimizer.state_tensors();
  if (optimizer.zero1()) {
    bool all_fp32 = true;
    for (const auto& [name, t] : params) all_fp32 &= t.scalar_type() == at::kFloat;
    std::map<std::string, at::Tensor> flat;
    for (auto& [key, t] : tensors) {
      TESSERA_CHECK(t.numel() == zero1_shard(model, where), InvalidArgument,
                    "checkpoint: the optimizer's ZeRO-1 slice '", key, "' has ", t.numel(),
                    " elements, but the model's local parameters split over dp=", where.dp_size,
                    " give ", zero1_shard(model, where),
                    "; the optimizer must be built over model.named_parameters() (not an "
                    "adapter Trainer) and where.dp_size must be its ZeRO group's size");
      if (key == "master" && all_fp32) continue;  // rebuilt from the parameters
      flat[key] = t;
    }
    add_zero1_optimizer(state, model, where, flat);
    return;
  }
  std::map<std::string, std::vector<at::Tensor>> per_param;
  for (auto& [name, t] : tensors) {
    // "<key>.<parameter index>"
    const auto dot = name.rfind('.');
    TESSERA_CHECK(dot != std::string::npos, Internal, "checkpoint: unexpected AdamW state name '",
                  name, "'");
    const size_t i = std::stoul(name.substr(dot + 1));
    auto& list = per_param[name.substr(0, dot)];
    TESSERA_CHECK(i < params.size(), InvalidArgument, "checkpoint: the optimizer has state for ",
                  "parameter ", i, " but the model has ", params.size(),
                  " local parameters; it must be built over model.named_parameters() (not an "
                  "adapter Trainer)");
    if (list.size() <= i) list.resize(params.size());
    list[i] = t;
  }
  for (const auto& [key, list] : per_param) {
    for (size_t i = 0; i < list.size(); ++i) {
      TESSERA_CHECK(list[i].defined() && list[i].numel() == params[i].second.numel(),
                    InvalidArgument, "checkpoint: optimizer state '", key, "' of parameter ", i,
                    " ('", params[i].first, "') does not match it; the optimizer must be built ",
                    "over model.named_parameters() (not an adapter Trainer)");
    }
  }
  add_optimizer(state, model, where, per_param);
}

void add_trainer(State& state, nn::Trainer& trainer, const ModelState& where) {
  add_model(state, trainer.model(), where);
  add_optimizer(state, trainer.model(), where, trainer.optimizer());
  state.step = trainer.steps();
}

void restore_master(const nn::Transformer& model, const ModelState& where, nn::AdamW& optimizer) {
  if (!optimizer.zero1()) return;
  at::Tensor master;
  for (auto& [key, t] : optimizer.state_tensors()) {
    if (key == "master") master = t;
  }
  TESSERA_CHECK(master.defined(), Internal, "checkpoint: the ZeRO-1 optimizer has no master slice");
  const int64_t shard = zero1_shard(model, where);
  TESSERA_CHECK(master.numel() == shard, InvalidArgument, "checkpoint: the optimizer's master ",
                "slice has ", master.numel(), " elements, but dp rank ", where.dp_rank, " of ",
                where.dp_size, " should hold ", shard);
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> flat;
  for (const auto& [name, t] : model.named_parameters()) {
    flat.push_back(t.detach().reshape({-1}).to(at::kFloat));
  }
  at::Tensor all = at::cat(flat);
  const int64_t padded = shard * where.dp_size;
  if (padded > all.numel()) all = at::cat({all, at::zeros({padded - all.numel()})});
  master.copy_(all.narrow(0, where.dp_rank * shard, shard));
}

void restore_trainer(const State& state, nn::Trainer& trainer, const ModelState& where,
                     const LoadResult& loaded) {
  trainer.set_steps(state.step);
  if (!trainer.optimizer().zero1()) return;
  bool rebuild = !has_master(state);
  for (const auto& name : loaded.missing) {
    rebuild |= name.rfind(optim_name("master", ""), 0) == 0;
  }
  if (rebuild) restore_master(trainer.model(), where, trainer.optimizer());
}

namespace {

nn::ModelConfig config_of(const Metadata& meta, const std::string& dir) {
  auto it = meta.user.find("tessera.model_config");
  TESSERA_CHECK(it != meta.user.end(), NotFound, "checkpoint '", dir,
                "' has no model config (user key 'tessera.model_config'); was it saved with "
                "ckpt::add_model?");
  return nn::ModelConfig::parse(it->second, dir + " (tessera.model_config)");
}

int64_t attr_int(const TensorMeta& tm, const std::string& key, int64_t fallback) {
  auto it = tm.attrs.find(key);
  return it == tm.attrs.end() ? fallback : std::stoll(it->second);
}

std::string attr(const TensorMeta& tm, const std::string& key) {
  auto it = tm.attrs.find(key);
  return it == tm.attrs.end() ? std::string() : it->second;
}

}  // namespace

void export_hf(const std::string& dir, const std::string& out, int64_t max_shard_bytes) {
  Metadata meta = read_metadata(dir);
  nn::ModelConfig config = config_of(meta, dir);
  State st;
  for (const auto& [name, tm] : meta.tensors) {
    if (attr(tm, "role") != "param") continue;
    st.add(name, at::empty(tm.shape, at::TensorOptions().dtype(parse_dtype(tm.dtype))),
           Layout::replicated(tm.shape, 1));
  }
  load(dir, st, nullptr);
  nn::WeightMap weights;
  for (auto& [name, e] : st.entries) weights[name] = e.local;
  nn::save_hf_model(out, config, weights, max_shard_bytes);
}

std::vector<std::string> import_hf(const std::string& hf_dir, State& state, int rank) {
  auto folder = nn::SafetensorsFolder::open(hf_dir);
  std::vector<std::string> filled;
  at::NoGradGuard no_grad;
  for (auto& [name, e] : state.entries) {
    if (!folder.contains(name)) continue;
    at::Tensor full = folder.get(name);
    TESSERA_CHECK(full.sizes().vec() == e.layout.global_shape(), InvalidArgument, "'", hf_dir,
                  "': tensor '", name, "' has shape ", shape_string(full.sizes()),
                  ", the state expects ", shape_string(e.layout.global_shape()));
    at::Tensor local = dist::extract_local(e.layout, rank, full);
    e.local.copy_(local.reshape(e.local.sizes()));
    filled.push_back(name);
  }
  return filled;
}

void reshard(const std::string& dir, const std::string& out, int tp, int dp, int ep) {
  TESSERA_CHECK(tp >= 1 && dp >= 1 && ep >= 1, InvalidArgument,
                "reshard: tp, dp and ep must be >= 1");
  Metadata meta = read_metadata(dir);
  nn::ModelConfig config = config_of(meta, dir);
  const int R = tp * ep, world = R * dp;
  const bool zero1 = meta.user.count("tessera.zero1") > 0 && dp > 1;
  // Target layouts, in model order for ZeRO.
  std::vector<std::pair<int64_t, std::string>> params;
  for (const auto& [name, tm] : meta.tensors) {
    if (attr(tm, "role") == "param") params.emplace_back(attr_int(tm, "order", 0), name);
  }
  std::sort(params.begin(), params.end());
  std::vector<std::pair<std::string, Layout>> replica;
  for (const auto& [order, name] : params) {
    const TensorMeta& tm = meta.tensors.at(name);
    nn::ParameterSpec spec{name, tm.shape, nn::parse_split(attr(tm, "split")),
                           attr_int(tm, "expert", -1)};
    replica.emplace_back(name, nn::parameter_layout(spec, config.num_experts, tp, ep));
  }
  std::map<std::string, Layout> replica_by_name(replica.begin(), replica.end());
  std::map<std::string, Layout> zero =
      zero1 ? zero1_layouts(replica, dp) : std::map<std::string, Layout>{};
  std::map<std::string, Layout> target;
  std::map<std::string, std::map<std::string, std::string>> attrs;
  for (const auto& [name, tm] : meta.tensors) {
    const std::string role = attr(tm, "role");
    attrs[name] = tm.attrs;
    if (role == "param") {
      target.emplace(name, over_dp(replica_by_name.at(name), dp));
    } else if (role == "optim") {
      const std::string param = attr(tm, "param");
      if (zero1) {
        target.emplace(name, zero.at(param));
      } else {
        attrs[name].erase("zero1");
        target.emplace(name, over_dp(replica_by_name.at(param), dp));
      }
    } else {
      target.emplace(name, Layout::replicated(tm.shape, world));
    }
  }
  auto run_rank = [&](std::shared_ptr<dist::ProcessGroup> g) {
    const int rank = g ? g->rank() : 0;
    State st;
    for (const auto& [name, l] : target) {
      const TensorMeta& tm = meta.tensors.at(name);
      st.add(name, at::empty(l.local_shape(rank), at::TensorOptions().dtype(parse_dtype(tm.dtype))),
             l, attrs.at(name));
    }
    load(dir, st, g);
    st.user["tessera.tp"] = std::to_string(tp);
    st.user["tessera.ep"] = std::to_string(ep);
    st.user["tessera.dp"] = std::to_string(dp);
    if (zero1) {
      st.user["tessera.zero1"] = "1";
    } else {
      st.user.erase("tessera.zero1");
    }
    save(out, st, g);
  };
  // Target ranks as threads of this process over an in-memory store.
  dist::run_thread_ranks(world, run_rank);
}

}  // namespace tessera::ckpt
