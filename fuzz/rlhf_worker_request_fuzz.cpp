// Fuzz target: the requests an rlhf worker serves (Worker.Call, Fetch and
// Release of proto/tessera/rlhf/worker.proto).
//
// The handlers live in src/rlhf/worker.cpp inside an anonymous namespace
// (WorkerService), reachable in a real process only through gRPC after
// run_worker_if_spawned(). This target compiles worker.cpp into itself, so
// it calls the very handler code gRPC calls, directly, with no network and
// no driver. The worker hosts one role "echo" with two methods:
//   echo (DP_COMPUTE): returns its inputs as its output rows; reads the
//                      optional argument "scale" (a number);
//   stats (ONE_TO_ALL): returns no rows, one metric per input tensor.
// Before every input the worker holds a batch "b" (float32 [4, 3] and
// int64 [4]) of its own, and process 1 has published a batch "b" in the
// data-plane directory, so requests can refer to rows held locally, held by
// another process, or sent inline.
//
// Input: one byte choosing the request (Call, Fetch, Release), then the
// serialized request message. Bytes protobuf cannot parse are skipped (gRPC
// refuses them before the handler). A Call's `seq` is replaced by the next
// one the worker expects (the worker runs calls in seq order and would wait
// for the missing ones; the driver always sends them in order), except that
// seq 0 is kept to exercise its check. Every answer must be a status with a
// code the handler chose: INTERNAL means an exception other than
// tessera::Error escaped the worker's code, and aborts.
#include "worker.cpp"  // src/rlhf/worker.cpp, see above

#include <cstdint>
#include <string>

#include <google/protobuf/stubs/logging.h>

#include "fuzz_common.h"

namespace {

namespace rlhf = tessera::rlhf;

class EchoRole final : public rlhf::Role {
 public:
  void setup(rlhf::WorkerContext& ctx, rlhf::MethodTable& methods) override {
    methods.add("echo", rlhf::Protocol::kDpCompute, {1, 1, 0, 0},
                [](const rlhf::Batch& in, const tessera::ConfigObject& args) {
                  args.get_double("scale", 1.0);
                  return rlhf::MethodResult{in, {}};
                });
    methods.add("stats", rlhf::Protocol::kOneToAll, {1, 1, 0, 0},
                [](const rlhf::Batch& in, const tessera::ConfigObject&) {
                  rlhf::MethodResult r;
                  for (const auto& [k, t] : in) r.metrics[k] = static_cast<double>(t.numel());
                  return r;
                });
  }
};

rlhf::Batch base_rows() {
  return {{"x", at::arange(12, at::kFloat).reshape({4, 3})}, {"id", at::arange(4, at::kLong)}};
}

struct Worker {
  tessera::fuzz::ScratchDir scratch;
  std::vector<rlhf::HostedRole> roles;
  std::unique_ptr<rlhf::WorkerService> service;

  Worker() {
    rlhf::HostedRole hosted;
    hosted.name = "echo";
    hosted.context = std::make_unique<rlhf::WorkerContext>(rlhf::WorkerContext{
        "echo", tessera::ConfigObject::parse("{}", "echo config"), nullptr, 0, 1, 0});
    hosted.role = std::make_unique<EchoRole>();
    hosted.role->setup(*hosted.context, hosted.methods);
    roles.push_back(std::move(hosted));
    service = std::make_unique<rlhf::WorkerService>(/*process=*/0, /*pool_rank=*/0, scratch.path(),
                                                    &roles, /*fault=*/"");
    const rlhf::Batch rows = base_rows();
    tessera::nn::save_safetensors(rlhf::internal::shared_batch_path(scratch.path(), "b", 1),
                                  tessera::nn::NamedTensors(rows.begin(), rows.end()));
  }

  uint64_t next_seq() {
    rlhf::proto::HealthRequest req;
    rlhf::proto::HealthReply reply;
    service->Health(nullptr, &req, &reply);
    return reply.calls_done() + 1;
  }

  grpc::Status call(rlhf::proto::CallRequest& req) {
    if (req.seq() != 0) req.set_seq(next_seq());
    grpc::ServerContext context;
    rlhf::proto::CallReply reply;
    return service->Call(&context, &req, &reply);
  }

  // Drops every batch, then stores "b" again through a Call with inline rows.
  void reset() {
    rlhf::proto::ReleaseRequest release;
    rlhf::proto::ReleaseReply released;
    service->Release(nullptr, &release, &released);
    rlhf::proto::CallRequest req;
    req.set_seq(1);
    req.set_role("echo");
    req.set_method("echo");
    req.set_output("b");
    auto* input = req.add_inputs();
    input->set_batch("seed");
    auto* part = input->add_parts();
    part->set_process(-1);
    part->set_rows(4);
    for (const auto& [k, t] : base_rows()) tessera::rpc::to_proto(t, k, part->add_inline_rows());
    const grpc::Status st = call(req);
    tessera::fuzz::require(st.ok(), "storing the base batch failed: " + st.error_message());
  }
};

Worker& worker() {
  static Worker w;
  return w;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // Protobuf logs every string field of invalid UTF-8 it parses; quiet.
  google::protobuf::SetLogHandler(nullptr);
  worker().reset();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  Worker& w = worker();
  const int kind = data[0] % 3;
  const void* body = data + 1;
  const int body_size = static_cast<int>(size - 1);
  grpc::Status status;
  if (kind == 0) {
    rlhf::proto::CallRequest req;
    if (!req.ParseFromArray(body, body_size)) return 0;
    status = w.call(req);
  } else if (kind == 1) {
    rlhf::proto::FetchRequest req;
    if (!req.ParseFromArray(body, body_size)) return 0;
    rlhf::proto::FetchReply reply;
    status = w.service->Fetch(nullptr, &req, &reply);
  } else {
    rlhf::proto::ReleaseRequest req;
    if (!req.ParseFromArray(body, body_size)) return 0;
    rlhf::proto::ReleaseReply reply;
    status = w.service->Release(nullptr, &req, &reply);
  }
  if (tessera::fuzz::verbose() && !status.ok()) {
    std::fprintf(stderr, "status %d: %s\n", status.error_code(), status.error_message().c_str());
  }
  tessera::fuzz::require(status.error_code() != grpc::StatusCode::INTERNAL,
                         "handler answered INTERNAL (an exception other than tessera::Error): " +
                             status.error_message());
  w.reset();
  return 0;
}
