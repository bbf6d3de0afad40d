// tessera-function — one instance of a serverless expert function for the
// local function platform (tessera/moe/platform.h). Loads one expert's
// weights at start (the cold start), then serves ExpertFunction.Invoke on
// loopback, one request at a time, within its memory size:
//
//   tessera-function --port P (or --port-fd FD: listen on a free port and
//                    write its number to FD) --memory-mb M --weights model.safetensors
//                    --prefix model.layers.0.block_sparse_moe.experts.3.
//                    [--storage files:DIR|redis://HOST:PORT] [--payload-limit BYTES]
//                    [--mb-per-vcpu MB]
//
// Defaults: --storage files:/tmp, --payload-limit 6291456 (6 MiB, Lambda's
// synchronous payload), --mb-per-vcpu 1769, --prefix "" (tensor names
// w1.weight, w2.weight, w3.weight). --help lists the options.
//
// Threads follow the memory size as on AWS Lambda (one vCPU per 1769 MB,
// at least one). A request whose working set would not fit the memory size
// is refused with RESOURCE_EXHAUSTED; a payload over the limit is refused by
// gRPC itself (RESOURCE_EXHAUSTED) before it reaches the handler.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <future>
#include <iostream>
#include <mutex>
#include <thread>

#include "command_line.h"
#include "tessera/core/error.h"
#include "tessera/core/metrics.h"
#include "tessera/core/tensor.h"
#include "tessera/formats/safetensors.h"
#include "tessera/moe/function.grpc.pb.h"
#include "tessera/moe/storage.h"
#include "tessera/rpc/rpc.h"

namespace {

namespace rpc = tessera::rpc;

// The longest a pipelined request may ask to wait for one input (a day).
constexpr double kMaxWaitSeconds = 86400;

class Function final : public tessera::moe::proto::ExpertFunction::Service {
 public:
  Function(at::Tensor w1, at::Tensor w2, at::Tensor w3, int64_t memory_mb, int threads,
           std::shared_ptr<tessera::moe::StorageChannel> storage)
      : w1_(std::move(w1)),
        w2_(std::move(w2)),
        w3_(std::move(w3)),
        memory_mb_(memory_mb),
        threads_(threads),
        storage_(std::move(storage)) {
    weight_bytes_ = static_cast<int64_t>(w1_.nbytes() + w2_.nbytes() + w3_.nbytes());
  }

  grpc::Status Invoke(grpc::ServerContext*, const tessera::moe::proto::InvokeRequest* req,
                      tessera::moe::proto::InvokeReply* reply) override {
    std::lock_guard<std::mutex> one_at_a_time(mu_);
    return rpc::guard([&] {
      double io = 0, compute = 0;
      int64_t tokens = 0, peak = weight_bytes_;
      auto run = [&](const at::Tensor& x) {
        TESSERA_CHECK(x.dim() == 2 && x.size(1) == w1_.size(1) && x.scalar_type() == at::kFloat,
                      InvalidArgument, "expected float32 tokens [n, ", w1_.size(1), "], got ",
                      tessera::shape_string(x.sizes()));
        const int64_t need = weight_bytes_ + x.size(0) * (2 * w1_.size(0) + 2 * x.size(1)) * 4;
        peak = std::max(peak, need);
        TESSERA_CHECK(need <= memory_mb_ * (int64_t{1} << 20), ResourceExhausted,
                      "the request needs ", need >> 20, " MB, the function has ", memory_mb_,
                      " MB");
        tessera::Stopwatch w;
        at::Tensor h = at::silu(at::matmul(x, w1_.t())) * at::matmul(x, w3_.t());
        at::Tensor y = at::matmul(h, w2_.t());
        compute += w.seconds();
        tokens += x.size(0);
        return y;
      };
      if (req->input_keys_size() == 0) {
        reply->mutable_outputs()->CopyFrom(rpc::TensorProto());
        rpc::to_proto(run(rpc::from_proto(req->tokens())), "y", reply->mutable_outputs());
      } else {
        // Pipelined when there are several keys: the next minibatch is read
        // while this one computes, and each output is written as soon as it
        // is ready.
        // The wait comes from the caller: NaN or a count of milliseconds
        // beyond int64 would make std::llround and the deadline overflow.
        TESSERA_CHECK(!std::isnan(req->wait_seconds()) && req->wait_seconds() <= kMaxWaitSeconds,
                      InvalidArgument, "wait_seconds ", req->wait_seconds(),
                      " is not a number of seconds of at most ", kMaxWaitSeconds);
        std::future<at::Tensor> next;
        auto fetch = [&](int i) {
          return std::async(std::launch::async, [this, key = req->input_keys(i),
                                                 wait = std::max(req->wait_seconds(), 1.0)] {
            return storage_->get(key, std::chrono::milliseconds(std::llround(wait * 1000)));
          });
        };
        next = fetch(0);
        for (int i = 0; i < req->input_keys_size(); ++i) {
          tessera::Stopwatch w;
          at::Tensor x = next.get();
          if (i + 1 < req->input_keys_size()) next = fetch(i + 1);
          io += w.seconds();
          at::Tensor y = run(x);
          tessera::Stopwatch wo;
          storage_->put(req->input_keys(i) + ".out", y);
          io += wo.seconds();
        }
      }
      reply->set_compute_seconds(compute);
      reply->set_io_seconds(io);
      reply->set_tokens(tokens);
      reply->set_peak_bytes(peak);
    });
  }

  grpc::Status Health(grpc::ServerContext*, const tessera::moe::proto::FunctionHealthRequest*,
                      tessera::moe::proto::FunctionHealthReply* r) override {
    r->set_pid(getpid());
    r->set_memory_mb(memory_mb_);
    r->set_threads(threads_);
    return grpc::Status::OK;
  }

 private:
  at::Tensor w1_, w2_, w3_;
  int64_t memory_mb_, weight_bytes_ = 0;
  int threads_;
  std::shared_ptr<tessera::moe::StorageChannel> storage_;
  std::mutex mu_;
};

}  // namespace

int main(int argc, char** argv) {
  int port = 0, port_fd = -1;
  int64_t memory_mb = 0, payload_limit = 6 << 20;
  std::string weights, prefix, storage = "files:/tmp";
  double mb_per_vcpu = 1769;
  CLI::App app{
      "One instance of a serverless expert function: loads one expert's weights, then "
      "serves ExpertFunction.Invoke on loopback, one request at a time, within its "
      "memory size.",
      "tessera-function"};
  app.option_defaults()->always_capture_default();
  app.add_option("--port", port,
                 "the port to listen on; 0: none (--port or --port-fd is required)");
  app.add_option("--port-fd", port_fd,
                 "listen on a free port and write its number to this file descriptor; -1: off");
  app.add_option("--memory-mb", memory_mb, "the function's memory size, MB")
      ->required()
      ->default_str("")
      ->check(tessera::examples::positive());
  app.add_option("--weights", weights,
                 "safetensors file holding the expert's w1, w2 and w3 weights")
      ->required();
  app.add_option("--prefix", prefix,
                 "name prefix of the expert's tensors, e.g. "
                 "model.layers.0.block_sparse_moe.experts.3.");
  app.add_option("--storage", storage,
                 "storage channel for indirect inputs and outputs: files:DIR or "
                 "redis://HOST:PORT");
  app.add_option("--payload-limit", payload_limit,
                 "largest request or reply, bytes (gRPC refuses larger ones)");
  app.add_option("--mb-per-vcpu", mb_per_vcpu,
                 "memory per thread, MB: threads = max(1, memory-mb / mb-per-vcpu)")
      ->check(tessera::examples::positive());
  if (auto code = tessera::examples::parse_command_line(app, argc, argv)) return *code;
  try {
    TESSERA_CHECK(port > 0 || port_fd >= 0, InvalidArgument, "--port or --port-fd is required");
    const int threads = std::max(1, static_cast<int>(memory_mb / mb_per_vcpu));
    at::set_num_threads(threads);
    auto file = tessera::nn::SafetensorsFile::open(weights);
    at::Tensor w1 = file.get(prefix + "w1.weight").to(at::kFloat).clone();
    at::Tensor w2 = file.get(prefix + "w2.weight").to(at::kFloat).clone();
    at::Tensor w3 = file.get(prefix + "w3.weight").to(at::kFloat).clone();
    const int64_t weight_bytes = static_cast<int64_t>(w1.nbytes() + w2.nbytes() + w3.nbytes());
    TESSERA_CHECK(weight_bytes <= memory_mb * (int64_t{1} << 20), ResourceExhausted, "expert ",
                  prefix, " needs ", weight_bytes >> 20, " MB of weights, the function has ",
                  memory_mb, " MB");
    Function function(std::move(w1), std::move(w2), std::move(w3), memory_mb, threads,
                      tessera::moe::StorageChannel::open(storage));
    rpc::ServerOptions so;
    so.port = port;
    so.max_message_bytes = static_cast<int>(payload_limit);
    auto server = rpc::Server::start({&function}, so);
    if (port_fd >= 0) {  // tell the platform which port the kernel gave us
      const std::string line = std::to_string(server.port()) + "\n";
      TESSERA_CHECK(write(port_fd, line.data(), line.size()) == static_cast<ssize_t>(line.size()),
                    Unavailable, "cannot report the port");
      close(port_fd);
    }
    server.wait();
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "tessera-function: " << e.what() << std::endl;
    return 1;
  }
}
