#include "tessera/dist/process_group.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <numeric>

#include "c10d_compat.h"
#include "tessera/core/error.h"
#include "tessera/core/log.h"
#include "tessera/core/tensor.h"
#include "tessera/dist/rendezvous.h"

#if defined(TESSERA_WITH_NCCL_LIB)
#include <nccl.h>
#endif

namespace tessera::dist {

using detail::C10dBackend;

const char* backend_name(Backend backend) { return backend == Backend::kNccl ? "nccl" : "gloo"; }

bool nccl_available() {
#if defined(TESSERA_WITH_C10D_NCCL)
  return true;
#else
  return false;
#endif
}

int nccl_version() {
#if defined(TESSERA_WITH_NCCL_LIB)
  int version = 0;
  if (ncclGetVersion(&version) == ncclSuccess) return version;
#endif
  return 0;
}

// ---------------------------------------------------------------------------
// Work

struct Work::Impl {
  c10::intrusive_ptr<::c10d::Work> work;  // null: completed synchronously
  std::string what;                       // "all_reduce on group 'world' (rank 1 of 4)"
  std::chrono::milliseconds default_timeout{0};
  // Runs once after the transport finished: copy back, scale, cast.
  std::function<void()> finish;
  // Runs once after `finish`: the observer's on_complete.
  std::function<void()> on_done;
  std::mutex mu;
  bool done = false;  // guarded by mu
};

Work::Work() = default;
Work::Work(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}

bool Work::is_completed() const {
  if (!impl_) return true;
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->done || !impl_->work || impl_->work->isCompleted();
}

void Work::wait(std::chrono::milliseconds timeout) {
  if (!impl_) return;
  std::lock_guard<std::mutex> lock(impl_->mu);
  if (impl_->done) return;
  if (timeout.count() <= 0) timeout = impl_->default_timeout;
  if (impl_->work) {
    bool completed = false;
    try {
      completed = impl_->work->wait(timeout);
    } catch (const std::exception& e) {
      std::string text = e.what();
      if (auto nl = text.find('\n'); nl != std::string::npos) text.resize(nl);
      if (text.find("imed out") != std::string::npos) {
        TESSERA_THROW(DeadlineExceeded, impl_->what, " did not finish within ", timeout.count(),
                      " ms (a peer is missing or stuck): ", text);
      }
      TESSERA_THROW(Unavailable, impl_->what, " failed (a peer may have exited): ", text);
    }
    TESSERA_CHECK(completed, DeadlineExceeded, impl_->what, " did not finish within ",
                  timeout.count(), " ms");
  }
  if (impl_->finish) impl_->finish();
  impl_->done = true;
  if (impl_->on_done) impl_->on_done();
}

// ---------------------------------------------------------------------------
// ProcessGroup

struct ProcessGroup::Impl {
  std::shared_ptr<Store> store;
  c10::intrusive_ptr<C10dBackend> backend;
  ProcessGroupOptions options;
  int rank = 0;
  int size = 1;
  std::vector<int> world_ranks;
  int next_subgroup = 0;
  // create_placeholder(): no store, no backend; operations complete at once.
  bool placeholder = false;
  // Shared by a root group and its sub-groups: the last CollectiveCall::id.
  std::shared_ptr<std::atomic<uint64_t>> call_ids = std::make_shared<std::atomic<uint64_t>>(0);

  CollectiveCall call(const char* op, int64_t bytes, at::ScalarType dtype) const {
    CollectiveCall c;
    c.op = op;
    c.group = options.name;
    c.ranks = world_ranks;
    c.rank = rank;
    c.bytes = bytes;
    c.dtype = dtype;
    return c;
  }

  std::string describe(const char* op) const {
    return std::string(op) + " on group '" + options.name + "' (rank " + std::to_string(rank) +
           " of " + std::to_string(size) + ")";
  }

  Work make_work(const char* op, c10::intrusive_ptr<::c10d::Work> work,
                 std::function<void()> finish = nullptr) const {
    auto impl = std::make_shared<Work::Impl>();
    impl->work = std::move(work);
    impl->what = describe(op);
    impl->default_timeout = options.timeout;
    impl->finish = std::move(finish);
    return Work(std::move(impl));
  }

  bool gloo() const { return options.backend == Backend::kGloo; }
};

namespace {

// Gloo moves raw bytes for every dtype; this views a contiguous tensor's
// storage as uint8 and keeps the tensor alive as long as the view.
at::Tensor as_bytes(const at::Tensor& t) {
  TESSERA_CHECK(t.is_contiguous(), Internal, "as_bytes needs a contiguous tensor");
  at::Tensor keep = t;
  return at::from_blob(
      t.data_ptr(), {tensor_bytes(t)}, [keep](void*) mutable { keep.reset(); },
      at::TensorOptions().dtype(at::kByte).device(t.device()));
}

::c10d::ReduceOp to_c10d(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAvg:
      return ::c10d::ReduceOp::SUM;
    case ReduceOp::kMax:
      return ::c10d::ReduceOp::MAX;
    case ReduceOp::kMin:
      return ::c10d::ReduceOp::MIN;
    case ReduceOp::kProduct:
      return ::c10d::ReduceOp::PRODUCT;
  }
  return ::c10d::ReduceOp::SUM;
}

// Dtype the transport reduces in: Gloo has no bfloat16 arithmetic, and its
// fp16 sums lose precision, so both are reduced in fp32.
at::ScalarType reduce_dtype(const at::Tensor& t, bool gloo) {
  if (gloo && (t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf)) return at::kFloat;
  return t.scalar_type();
}

std::vector<int64_t> equal_splits(int64_t rows, int parts, const char* which) {
  TESSERA_CHECK(rows % parts == 0, InvalidArgument, "all_to_all: ", which, " has ", rows,
                " rows, not divisible into ", parts, " equal splits");
  return std::vector<int64_t>(parts, rows / parts);
}

// Elements per row along dim 0 (the product of the trailing sizes), also
// for tensors with no rows.
int64_t row_elements(const at::Tensor& t) {
  int64_t n = 1;
  for (int64_t d = 1; d < t.dim(); ++d) n *= t.size(d);
  return n;
}

}  // namespace

namespace {

// Placeholder results (create_placeholder): what the operation would leave
// if every member held this rank's data.
void placeholder_reduce(at::Tensor& t, ReduceOp op, int size) {
  at::NoGradGuard no_grad;
  switch (op) {
    case ReduceOp::kSum:
      t.mul_(size);
      break;
    case ReduceOp::kProduct:
      t.pow_(size);
      break;
    case ReduceOp::kAvg:
    case ReduceOp::kMax:
    case ReduceOp::kMin:
      break;
  }
}

// An all_to_all's checked row splits.
struct AllToAllPlan {
  std::vector<int64_t> output_splits, input_splits;  // rows per group rank
  int64_t row_bytes = 0;
};

AllToAllPlan plan_all_to_all(const ProcessGroup::Impl& g, const at::Tensor& output,
                             const at::Tensor& input, std::vector<int64_t> output_splits,
                             std::vector<int64_t> input_splits) {
  const std::string what = g.describe("all_to_all");
  TESSERA_CHECK(input.dim() >= 1 && output.dim() == input.dim() &&
                    output.scalar_type() == input.scalar_type() &&
                    row_elements(input) == row_elements(output),
                InvalidArgument, what, ": input ", shape_string(input.sizes()), " and output ",
                shape_string(output.sizes()), " must share dtype and row shape");
  if (input_splits.empty()) input_splits = equal_splits(input.size(0), g.size, "input");
  if (output_splits.empty()) output_splits = equal_splits(output.size(0), g.size, "output");
  auto check_splits = [&](const std::vector<int64_t>& splits, int64_t rows, const char* which) {
    TESSERA_CHECK(static_cast<int>(splits.size()) == g.size, InvalidArgument, what, ": ", which,
                  " splits have ", splits.size(), " entries for ", g.size, " ranks");
    int64_t total = 0;
    for (int64_t s : splits) {
      TESSERA_CHECK(s >= 0, InvalidArgument, what, ": negative ", which, " split ", s);
      total += s;
    }
    TESSERA_CHECK(total == rows, InvalidArgument, what, ": ", which, " splits sum to ", total,
                  " but the ", which, " has ", rows, " rows");
  };
  check_splits(input_splits, input.size(0), "input");
  check_splits(output_splits, output.size(0), "output");
  AllToAllPlan plan;
  plan.output_splits = std::move(output_splits);
  plan.input_splits = std::move(input_splits);
  plan.row_bytes = row_elements(input) * static_cast<int64_t>(input.element_size());
  return plan;
}

// The transport part of an all_to_all (or its placeholder). Not observed:
// all_gather and reduce_scatter use it under their own names.
Work run_all_to_all(ProcessGroup::Impl& g, at::Tensor& output, const at::Tensor& input,
                    AllToAllPlan plan) {
  if (g.placeholder) {
    // Rows from every source: the rows this rank sends to itself.
    at::NoGradGuard no_grad;
    int64_t self_begin = 0;
    for (int r = 0; r < g.rank; ++r) self_begin += plan.input_splits[r];
    at::Tensor self_rows = input.narrow(0, self_begin, plan.input_splits[g.rank]);
    int64_t at_row = 0;
    for (int r = 0; r < g.size; ++r) {
      const int64_t n = plan.output_splits[r];
      const int64_t copied = std::min(n, self_rows.size(0));
      if (copied > 0) output.narrow(0, at_row, copied).copy_(self_rows.narrow(0, 0, copied));
      if (n > copied) output.narrow(0, at_row + copied, n - copied).zero_();
      at_row += n;
    }
    return Work();
  }
  at::Tensor in = input.contiguous();
  bool copy_back = !output.is_contiguous();
  at::Tensor out = copy_back ? at::empty_like(output, at::MemoryFormat::Contiguous) : output;
  at::Tensor in_wire = in, out_wire = out;
  std::vector<int64_t> input_splits = std::move(plan.input_splits);
  std::vector<int64_t> output_splits = std::move(plan.output_splits);
  if (g.gloo()) {
    // Gloo's alltoall lacks some dtypes (bfloat16); bytes work for all.
    for (auto& s : input_splits) s *= plan.row_bytes;
    for (auto& s : output_splits) s *= plan.row_bytes;
    in_wire = as_bytes(in);
    out_wire = as_bytes(out);
  } else {
    // Flatten rows so that splits count rows of any trailing shape.
    in_wire = in.view({in.size(0), row_elements(in)});
    out_wire = out.view({out.size(0), row_elements(out)});
  }
  ::c10d::AllToAllOptions opts;
  auto work = translate_errors(
      g.describe("all_to_all"),
      [&] {
        return g.backend->alltoall_base(out_wire, in_wire, output_splits, input_splits, opts);
      },
      ErrorCode::kUnavailable);
  at::Tensor target = output;
  return g.make_work("all_to_all", work, [in, out, target, copy_back]() mutable {
    if (copy_back) target.copy_(out);
  });
}

}  // namespace

ProcessGroup::ProcessGroup(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ProcessGroup::~ProcessGroup() = default;

Work ProcessGroup::observed(Impl& group, CollectiveCall call, const std::function<Work()>& run) {
  const std::shared_ptr<CollectiveObserver> observer = group.options.observer;
  if (!observer) return run();
  call.id = ++*group.call_ids;
  observer->on_issue(call);
  Work work = run();
  if (!work.impl_) {
    // Completed synchronously: a handle that reports on its first wait().
    work.impl_ = std::make_shared<Work::Impl>();
    work.impl_->what = group.describe(call.op.c_str());
    work.impl_->default_timeout = group.options.timeout;
  }
  work.impl_->on_done = [observer, call = std::move(call)] { observer->on_complete(call); };
  return work;
}

std::shared_ptr<ProcessGroup> ProcessGroup::create(std::shared_ptr<Store> store, int rank, int size,
                                                   const ProcessGroupOptions& options) {
  TESSERA_CHECK(store != nullptr, InvalidArgument, "process group '", options.name, "': no store");
  TESSERA_CHECK(size >= 1 && rank >= 0 && rank < size, InvalidArgument, "process group '",
                options.name, "': rank ", rank, " outside a group of ", size);
  auto impl = std::make_unique<Impl>();
  impl->store = store;
  impl->options = options;
  impl->rank = rank;
  impl->size = size;
  impl->world_ranks.resize(size);
  std::iota(impl->world_ranks.begin(), impl->world_ranks.end(), 0);
  const std::string where = "creating process group '" + options.name + "' (rank " +
                            std::to_string(rank) + " of " + std::to_string(size) + ")";
  translate_errors(
      where,
      [&] {
        if (options.backend == Backend::kNccl) {
#if defined(TESSERA_WITH_C10D_NCCL)
          auto nccl_opts = ::c10d::ProcessGroupNCCL::Options::create();
          nccl_opts->timeout = options.timeout;
          impl->backend = c10::make_intrusive<::c10d::ProcessGroupNCCL>(store->impl().store, rank,
                                                                        size, nccl_opts);
#else
          TESSERA_THROW(FailedPrecondition,
                        "NCCL requested but this build's LibTorch has no c10d NCCL backend");
#endif
        } else {
          auto gloo_opts = ::c10d::ProcessGroupGloo::Options::create();
          gloo_opts->timeout = options.timeout;
          if (!options.gloo_interface.empty()) {
            gloo_opts->devices.push_back(
                ::c10d::ProcessGroupGloo::createDeviceForInterface(options.gloo_interface));
          } else if (!options.gloo_address.empty()) {
            gloo_opts->devices.push_back(
                ::c10d::ProcessGroupGloo::createDeviceForHostname(options.gloo_address));
          } else {
            gloo_opts->devices.push_back(::c10d::ProcessGroupGloo::createDefaultDevice());
          }
          // Gloo runs collectives on its own threads; two are enough for the
          // overlapping work one rank issues.
          gloo_opts->threads = 2;
          impl->backend = c10::make_intrusive<::c10d::ProcessGroupGloo>(store->impl().store, rank,
                                                                        size, gloo_opts);
        }
      },
      ErrorCode::kUnavailable);
  // Gloo's connecting side returns from its constructor as soon as the
  // kernel completed the TCP handshake, while the listening side accepts the
  // connection later on its own event thread. A member that returned and
  // destroyed the group at once (a sub-group it only needed briefly) closed
  // the socket before its peer accepted it, and the peer's creation failed
  // with "Connection closed by peer". Like torch.distributed's store-based
  // barrier after new_group, no member returns before all have connected.
  try {
    rendezvous_barrier(*store, "group-created/" + options.name, rank, size, options.timeout);
  } catch (const DeadlineExceeded& e) {
    TESSERA_THROW(DeadlineExceeded, where, ": not every member finished connecting: ", e.message());
  }
  TESSERA_LOG(Debug, "dist") << "created " << backend_name(options.backend) << " group '"
                             << options.name << "' of " << size << " ranks";
  return std::shared_ptr<ProcessGroup>(new ProcessGroup(std::move(impl)));
}

std::shared_ptr<ProcessGroup> ProcessGroup::create_placeholder(int rank, int size,
                                                               const ProcessGroupOptions& options) {
  TESSERA_CHECK(size >= 1 && rank >= 0 && rank < size, InvalidArgument,
                "placeholder process group '", options.name, "': rank ", rank,
                " outside a group of ", size);
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  impl->rank = rank;
  impl->size = size;
  impl->placeholder = true;
  impl->world_ranks.resize(size);
  std::iota(impl->world_ranks.begin(), impl->world_ranks.end(), 0);
  return std::shared_ptr<ProcessGroup>(new ProcessGroup(std::move(impl)));
}

int ProcessGroup::rank() const { return impl_->rank; }
int ProcessGroup::size() const { return impl_->size; }
const std::string& ProcessGroup::name() const { return impl_->options.name; }
Backend ProcessGroup::backend() const { return impl_->options.backend; }
std::chrono::milliseconds ProcessGroup::timeout() const { return impl_->options.timeout; }
const std::vector<int>& ProcessGroup::world_ranks() const { return impl_->world_ranks; }
bool ProcessGroup::is_placeholder() const { return impl_->placeholder; }

Work ProcessGroup::all_reduce(at::Tensor& tensor, ReduceOp op) {
  Impl& g = *impl_;
  TESSERA_CHECK(tensor.defined(), InvalidArgument, g.describe("all_reduce"), ": undefined tensor");
  CollectiveCall call = g.call("all_reduce", tensor_bytes(tensor), tensor.scalar_type());
  call.reduce = op;
  return observed(g, std::move(call), [&]() -> Work {
    if (g.placeholder) {
      placeholder_reduce(tensor, op, g.size);
      return Work();
    }
    at::ScalarType wire = reduce_dtype(tensor, g.gloo());
    bool copy_back = wire != tensor.scalar_type() || !tensor.is_contiguous();
    std::vector<at::Tensor> buf{copy_back ? tensor.to(wire).contiguous() : tensor};
    ::c10d::AllreduceOptions opts;
    opts.reduceOp = to_c10d(op);
    auto work = translate_errors(
        g.describe("all_reduce"), [&] { return g.backend->allreduce(buf, opts); },
        ErrorCode::kUnavailable);
    int size = g.size;
    at::Tensor target = tensor;
    return g.make_work("all_reduce", work, [buf, target, op, size, copy_back]() mutable {
      if (op == ReduceOp::kAvg) buf[0].div_(size);
      if (copy_back) target.copy_(buf[0]);
    });
  });
}

Work ProcessGroup::broadcast(at::Tensor& tensor, int root) {
  Impl& g = *impl_;
  TESSERA_CHECK(root >= 0 && root < g.size, InvalidArgument, g.describe("broadcast"), ": root ",
                root, " outside the group");
  CollectiveCall call = g.call("broadcast", tensor_bytes(tensor), tensor.scalar_type());
  call.peer = root;
  return observed(g, std::move(call), [&]() -> Work {
    if (g.placeholder) return Work();
    bool copy_back = !tensor.is_contiguous();
    at::Tensor data = copy_back ? tensor.contiguous() : tensor;
    std::vector<at::Tensor> buf{g.gloo() ? as_bytes(data) : data};
    ::c10d::BroadcastOptions opts;
    opts.rootRank = root;
    auto work = translate_errors(
        g.describe("broadcast"), [&] { return g.backend->broadcast(buf, opts); },
        ErrorCode::kUnavailable);
    at::Tensor target = tensor;
    return g.make_work("broadcast", work, [data, target, copy_back]() mutable {
      if (copy_back) target.copy_(data);
    });
  });
}

Work ProcessGroup::all_gather(at::Tensor& output, const at::Tensor& input) {
  Impl& g = *impl_;
  TESSERA_CHECK(
      input.dim() >= 1 && output.dim() == input.dim() && output.size(0) == input.size(0) * g.size &&
          output.numel() == input.numel() * g.size && output.scalar_type() == input.scalar_type(),
      InvalidArgument, g.describe("all_gather"), ": output ", shape_string(output.sizes()),
      " must be [", g.size, " * ", input.size(0), ", ...] of the input's dtype for input ",
      shape_string(input.sizes()));
  CollectiveCall call = g.call("all_gather", tensor_bytes(output), output.scalar_type());
  return observed(g, std::move(call), [&]() -> Work {
    at::Tensor in = input.contiguous();
    if (g.placeholder) {
      at::NoGradGuard no_grad;
      for (int r = 0; r < g.size; ++r) output.narrow(0, r * input.size(0), input.size(0)).copy_(in);
      return Work();
    }
    if (g.gloo()) {
      // Gloo's allgather copies through per-peer staging buffers and runs at a
      // third of its all_to_all's bandwidth for large tensors on loopback
      // (docs/benchmarks.md); sending the input to every peer with one
      // all_to_all costs one extra local copy and is faster at every size.
      std::vector<int64_t> expanded(in.dim() + 1, -1);
      expanded[0] = g.size;
      std::vector<int64_t> shape = input.sizes().vec();
      shape[0] *= g.size;
      at::Tensor fanout = in.unsqueeze(0).expand(expanded).reshape(shape);
      return run_all_to_all(g, output, fanout, plan_all_to_all(g, output, fanout, {}, {}));
    }
    bool copy_back = !output.is_contiguous();
    at::Tensor out = copy_back ? at::empty_like(output, at::MemoryFormat::Contiguous) : output;
    std::vector<at::Tensor> inputs{in};
    std::vector<std::vector<at::Tensor>> outputs(1);
    for (int r = 0; r < g.size; ++r) {
      outputs[0].push_back(out.narrow(0, r * input.size(0), input.size(0)));
    }
    auto work = translate_errors(
        g.describe("all_gather"), [&] { return g.backend->allgather(outputs, inputs); },
        ErrorCode::kUnavailable);
    at::Tensor target = output;
    return g.make_work("all_gather", work, [in, out, target, copy_back]() mutable {
      if (copy_back) target.copy_(out);
    });
  });
}

Work ProcessGroup::reduce_scatter(at::Tensor& output, const at::Tensor& input, ReduceOp op) {
  Impl& g = *impl_;
  TESSERA_CHECK(
      input.dim() >= 1 && output.dim() == input.dim() && input.size(0) == output.size(0) * g.size &&
          input.numel() == output.numel() * g.size && output.scalar_type() == input.scalar_type(),
      InvalidArgument, g.describe("reduce_scatter"), ": input ", shape_string(input.sizes()),
      " must be [", g.size, " * ", output.size(0), ", ...] of the output's dtype for output ",
      shape_string(output.sizes()));
  CollectiveCall call = g.call("reduce_scatter", tensor_bytes(input), input.scalar_type());
  call.reduce = op;
  return observed(g, std::move(call), [&]() -> Work {
    if (g.placeholder) {
      at::NoGradGuard no_grad;
      output.copy_(input.narrow(0, g.rank * output.size(0), output.size(0)));
      placeholder_reduce(output, op, g.size);
      return Work();
    }
    // One all_to_all brings every rank the size pieces of its own slice (the
    // same bytes a ring reduce-scatter moves), then a local reduction. Works
    // on every backend and dtype; the reduction order is fixed (rank order),
    // so results are deterministic.
    at::Tensor in = input.contiguous();
    at::Tensor gathered = at::empty_like(in, at::MemoryFormat::Contiguous);
    Work exchange = run_all_to_all(g, gathered, in, plan_all_to_all(g, gathered, in, {}, {}));
    int size = g.size;
    at::Tensor target = output;
    auto finish = [exchange, gathered, target, op, size]() mutable {
      exchange.wait();
      std::vector<int64_t> shape = target.sizes().vec();
      shape.insert(shape.begin(), size);
      shape[1] = target.size(0);
      at::Tensor parts = gathered.view(shape);
      at::ScalarType acc = parts.scalar_type() == at::kBFloat16 || parts.scalar_type() == at::kHalf
                               ? at::kFloat
                               : parts.scalar_type();
      at::Tensor result;
      switch (op) {
        case ReduceOp::kSum:
          result = parts.sum(0, false, acc);
          break;
        case ReduceOp::kAvg:
          result = parts.sum(0, false, acc).div_(size);
          break;
        case ReduceOp::kMax:
          result = std::get<0>(parts.max(0));
          break;
        case ReduceOp::kMin:
          result = std::get<0>(parts.min(0));
          break;
        case ReduceOp::kProduct:
          result = parts.prod(0, false, acc);
          break;
      }
      target.copy_(result);
    };
    auto impl = std::make_shared<Work::Impl>();
    impl->what = g.describe("reduce_scatter");
    impl->default_timeout = g.options.timeout;
    impl->finish = std::move(finish);
    return Work(std::move(impl));
  });
}

Work ProcessGroup::all_to_all(at::Tensor& output, const at::Tensor& input,
                              std::vector<int64_t> output_splits,
                              std::vector<int64_t> input_splits) {
  Impl& g = *impl_;
  AllToAllPlan plan =
      plan_all_to_all(g, output, input, std::move(output_splits), std::move(input_splits));
  CollectiveCall call = g.call("all_to_all", input.size(0) * plan.row_bytes, input.scalar_type());
  for (int64_t rows : plan.input_splits) call.send_bytes.push_back(rows * plan.row_bytes);
  for (int64_t rows : plan.output_splits) call.recv_bytes.push_back(rows * plan.row_bytes);
  return observed(g, std::move(call),
                  [&]() -> Work { return run_all_to_all(g, output, input, std::move(plan)); });
}

Work ProcessGroup::send(const at::Tensor& tensor, int dst, int tag) {
  Impl& g = *impl_;
  TESSERA_CHECK(dst >= 0 && dst < g.size && dst != g.rank, InvalidArgument, g.describe("send"),
                ": bad destination rank ", dst);
  CollectiveCall call = g.call("send", tensor_bytes(tensor), tensor.scalar_type());
  call.peer = dst;
  call.tag = tag;
  return observed(g, std::move(call), [&]() -> Work {
    if (g.placeholder) return Work();
    at::Tensor data = tensor.contiguous();
    std::vector<at::Tensor> buf{g.gloo() ? as_bytes(data) : data};
    auto work = translate_errors(
        g.describe("send"), [&] { return g.backend->send(buf, dst, tag); },
        ErrorCode::kUnavailable);
    return g.make_work("send", work, [data]() {});
  });
}

Work ProcessGroup::recv(at::Tensor& tensor, int src, int tag) {
  Impl& g = *impl_;
  TESSERA_CHECK(src >= 0 && src < g.size && src != g.rank, InvalidArgument, g.describe("recv"),
                ": bad source rank ", src);
  CollectiveCall call = g.call("recv", tensor_bytes(tensor), tensor.scalar_type());
  call.peer = src;
  call.tag = tag;
  return observed(g, std::move(call), [&]() -> Work {
    if (g.placeholder) return Work();
    bool copy_back = !tensor.is_contiguous();
    at::Tensor data = copy_back ? tensor.contiguous() : tensor;
    std::vector<at::Tensor> buf{g.gloo() ? as_bytes(data) : data};
    auto work = translate_errors(
        g.describe("recv"), [&] { return g.backend->recv(buf, src, tag); },
        ErrorCode::kUnavailable);
    at::Tensor target = tensor;
    return g.make_work("recv", work, [data, target, copy_back]() mutable {
      if (copy_back) target.copy_(data);
    });
  });
}

Work ProcessGroup::barrier() {
  Impl& g = *impl_;
  return observed(g, g.call("barrier", 0, at::kByte), [&]() -> Work {
    if (g.placeholder) return Work();
    ::c10d::BarrierOptions opts;
    opts.timeout = g.options.timeout;
    auto work = translate_errors(
        g.describe("barrier"), [&] { return g.backend->barrier(opts); }, ErrorCode::kUnavailable);
    return g.make_work("barrier", work);
  });
}

std::shared_ptr<ProcessGroup> ProcessGroup::new_subgroup(const std::vector<int>& ranks,
                                                         const std::string& name) {
  Impl& g = *impl_;
  TESSERA_CHECK(!ranks.empty() && std::is_sorted(ranks.begin(), ranks.end()) &&
                    std::adjacent_find(ranks.begin(), ranks.end()) == ranks.end() &&
                    ranks.front() >= 0 && ranks.back() < g.size,
                InvalidArgument, "new_subgroup of '", g.options.name,
                "': ranks must be ascending, unique and inside the group");
  // Every member computes the same id, so the sub-group's keys never clash
  // with those of another sub-group or of a later call.
  int id = g.next_subgroup++;
  auto it = std::find(ranks.begin(), ranks.end(), g.rank);
  if (it == ranks.end()) return nullptr;
  ProcessGroupOptions options = g.options;
  options.name = name.empty() ? g.options.name + "/sub" + std::to_string(id) : name;
  const int sub_rank = static_cast<int>(it - ranks.begin());
  const int sub_size = static_cast<int>(ranks.size());
  auto group = g.placeholder
                   ? create_placeholder(sub_rank, sub_size, options)
                   : create(Store::prefixed(g.store, g.options.name + "/sub" + std::to_string(id)),
                            sub_rank, sub_size, options);
  for (size_t i = 0; i < ranks.size(); ++i) group->impl_->world_ranks[i] = g.world_ranks[ranks[i]];
  group->impl_->call_ids = g.call_ids;
  return group;
}

}  // namespace tessera::dist
