#include "parallel_ops.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

namespace tessera::nn::detail {

using torch::autograd::AutogradContext;
using torch::autograd::Function;
using torch::autograd::variable_list;

namespace {

bool trivial(const GroupPtr& g) { return !g || g->size() == 1; }

at::Tensor all_reduce_copy(const at::Tensor& x, dist::ProcessGroup& group) {
  at::Tensor out = x.contiguous().clone();
  group.all_reduce(out).wait();
  return out;
}

struct CopyToGroup : Function<CopyToGroup> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, dist::ProcessGroup* group) {
    ctx->saved_data["group"] = reinterpret_cast<int64_t>(group);
    return x.view_as(x);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto* group = reinterpret_cast<dist::ProcessGroup*>(ctx->saved_data["group"].toInt());
    return {all_reduce_copy(grads[0], *group), at::Tensor()};
  }
};

struct ReduceFromGroup : Function<ReduceFromGroup> {
  static at::Tensor forward(AutogradContext*, const at::Tensor& x, dist::ProcessGroup* group) {
    return all_reduce_copy(x, *group);
  }
  static variable_list backward(AutogradContext*, variable_list grads) {
    return {grads[0], at::Tensor()};
  }
};

// all_gather concatenates along dim 0; move the last dim to the front.
at::Tensor gather_last(const at::Tensor& x, dist::ProcessGroup& group,
                       const std::vector<int64_t>& sizes) {
  at::Tensor front = x.movedim(-1, 0).contiguous();
  int64_t total = 0;
  for (auto s : sizes) total += s;
  std::vector<int64_t> shape = front.sizes().vec();
  shape[0] = total;
  at::Tensor out = at::empty(shape, front.options());
  bool even = std::all_of(sizes.begin(), sizes.end(), [&](int64_t s) { return s == sizes[0]; });
  if (even) {
    group.all_gather(out, front).wait();
  } else {
    // Uneven shards (vocabulary not divisible by tp): an all_to_all that
    // sends the whole shard to every rank.
    std::vector<int64_t> in_splits(group.size(), front.size(0));
    at::Tensor fanout = front.repeat([&] {
      std::vector<int64_t> r(front.dim(), 1);
      r[0] = group.size();
      return r;
    }());
    group.all_to_all(out, fanout, sizes, in_splits).wait();
  }
  return out.movedim(0, -1);
}

struct GatherLastDim : Function<GatherLastDim> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, dist::ProcessGroup* group,
                            std::vector<int64_t> sizes) {
    int64_t start = 0;
    for (int r = 0; r < group->rank(); ++r) start += sizes[r];
    ctx->saved_data["start"] = start;
    ctx->saved_data["len"] = sizes[group->rank()];
    return gather_last(x, *group, sizes);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    int64_t start = ctx->saved_data["start"].toInt(), len = ctx->saved_data["len"].toInt();
    return {grads[0].narrow(-1, start, len).contiguous(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor exchange_rows(const at::Tensor& x, dist::ProcessGroup& group,
                         const std::vector<int64_t>& out_splits,
                         const std::vector<int64_t>& in_splits) {
  int64_t rows = 0;
  for (auto s : out_splits) rows += s;
  std::vector<int64_t> shape = x.sizes().vec();
  shape[0] = rows;
  at::Tensor out = at::empty(shape, x.options());
  group.all_to_all(out, x.contiguous(), out_splits, in_splits).wait();
  return out;
}

struct AllToAllRows : Function<AllToAllRows> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, dist::ProcessGroup* group,
                            std::vector<int64_t> out_splits, std::vector<int64_t> in_splits) {
    ctx->saved_data["group"] = reinterpret_cast<int64_t>(group);
    ctx->saved_data["out"] = out_splits;
    ctx->saved_data["in"] = in_splits;
    return exchange_rows(x, *group, out_splits, in_splits);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto* group = reinterpret_cast<dist::ProcessGroup*>(ctx->saved_data["group"].toInt());
    auto out_splits = ctx->saved_data["out"].toIntVector();
    auto in_splits = ctx->saved_data["in"].toIntVector();
    return {exchange_rows(grads[0], *group, in_splits, out_splits), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

struct VocabParallelCE : Function<VocabParallelCE> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& logits,
                            const at::Tensor& targets, int64_t vocab_start,
                            dist::ProcessGroup* group) {
    at::Tensor x = logits.to(at::kFloat);
    at::Tensor local_max = std::get<0>(x.max(-1));
    at::Tensor global_max = local_max.clone();
    group->all_reduce(global_max, dist::ReduceOp::kMax).wait();
    at::Tensor shifted = x - global_max.unsqueeze(-1);
    at::Tensor exp = shifted.exp();
    at::Tensor sum_exp = exp.sum(-1);
    group->all_reduce(sum_exp).wait();
    const int64_t v_local = x.size(-1);
    at::Tensor local_t = targets - vocab_start;
    at::Tensor in_shard = (local_t >= 0) & (local_t < v_local) & (targets != -100);
    at::Tensor safe_t = at::where(in_shard, local_t, at::zeros_like(local_t));
    at::Tensor picked =
        shifted.gather(-1, safe_t.unsqueeze(-1)).squeeze(-1) * in_shard.to(at::kFloat);
    group->all_reduce(picked).wait();
    at::Tensor valid = (targets != -100).to(at::kFloat);
    at::Tensor loss = (sum_exp.log() - picked) * valid;
    at::Tensor softmax = exp / sum_exp.unsqueeze(-1);
    ctx->save_for_backward({softmax, safe_t, in_shard, valid});
    ctx->saved_data["dtype"] = static_cast<int64_t>(logits.scalar_type());
    return loss;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    at::Tensor grad = saved[0].clone();
    grad.scatter_add_(-1, saved[1].unsqueeze(-1), -saved[2].to(at::kFloat).unsqueeze(-1));
    grad.mul_((grads[0] * saved[3]).unsqueeze(-1));
    auto dtype = static_cast<at::ScalarType>(ctx->saved_data["dtype"].toInt());
    return {grad.to(dtype), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor copy_to_group(const at::Tensor& x, const GroupPtr& group) {
  return trivial(group) ? x : CopyToGroup::apply(x, group.get());
}

at::Tensor reduce_from_group(const at::Tensor& x, const GroupPtr& group) {
  return trivial(group) ? x : ReduceFromGroup::apply(x, group.get());
}

at::Tensor gather_last_dim(const at::Tensor& x, const GroupPtr& group,
                           const std::vector<int64_t>& sizes) {
  return trivial(group) ? x : GatherLastDim::apply(x, group.get(), sizes);
}

at::Tensor all_to_all_rows(const at::Tensor& x, const GroupPtr& group,
                           const std::vector<int64_t>& out_splits,
                           const std::vector<int64_t>& in_splits) {
  return trivial(group) ? x : AllToAllRows::apply(x, group.get(), out_splits, in_splits);
}

at::Tensor vocab_parallel_cross_entropy(const at::Tensor& logits, const at::Tensor& targets,
                                        int64_t vocab_start, const GroupPtr& group) {
  if (trivial(group)) {
    at::Tensor lp = logits.to(at::promote_types(logits.scalar_type(), at::kFloat)).log_softmax(-1);
    at::Tensor valid = targets != -100;
    at::Tensor safe = at::where(valid, targets, at::zeros_like(targets));
    return -lp.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * valid.to(lp.scalar_type());
  }
  return VocabParallelCE::apply(logits, targets, vocab_start, group.get());
}

at::Tensor sum_in_rank_order(const at::Tensor& x, const GroupPtr& group) {
  if (trivial(group)) return x;
  const at::Tensor flat = x.contiguous().view({-1});
  const int64_t n = flat.numel();
  at::Tensor parts = at::empty({group->size() * n}, flat.options());
  group->all_gather(parts, flat).wait();
  at::Tensor sum = parts.narrow(0, 0, n).clone();
  for (int r = 1; r < group->size(); ++r) sum.add_(parts.narrow(0, r * n, n));
  return sum.view(x.sizes());
}

}  // namespace tessera::nn::detail
