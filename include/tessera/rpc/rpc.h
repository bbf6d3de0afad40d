// tessera/rpc/rpc.h — the control plane's plumbing over gRPC: servers and
// channels on loopback with message limits, deadlines, status translation
// both ways, and tensors in protobuf messages.
//
// Services are generated from each module's protos (proto/tessera/<module>/).
// A handler that throws tessera::Error answers with the matching gRPC code
// (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, ...); a client turns a failed
// status back into a tessera::Error naming the call and the peer:
//
//   auto server = tessera::rpc::Server::start({&service}, {});   // 127.0.0.1, free port
//   auto channel = tessera::rpc::channel(server.address(), {});
//   auto stub = tessera::rpc::Worker::NewStub(channel);
//   grpc::ClientContext ctx;
//   tessera::rpc::set_deadline(ctx, std::chrono::seconds(5));
//   tessera::rpc::check(stub->Health(&ctx, req, &reply), "Health", server.address());
//
// Thread safety: the helpers are thread-safe; a Server may be shut down
// from any thread once.
#pragma once

#include <ATen/core/Tensor.h>
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "tessera/core/error.h"
#include "tessera/rpc/common.pb.h"

namespace tessera::rpc {

struct ChannelOptions {
  // Largest message either side accepts; bigger ones fail with
  // RESOURCE_EXHAUSTED before reaching the handler.
  int max_message_bytes = 4 << 20;
};

// An insecure channel (loopback control plane) with the given limits.
std::shared_ptr<grpc::Channel> channel(const std::string& address, const ChannelOptions& options);

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 0;  // 0: a free port, see Server::port()
  int max_message_bytes = 4 << 20;
};

// A running gRPC server; Shutdown on destruction (in-flight calls are
// cancelled after a short grace period).
class Server {
 public:
  static Server start(const std::vector<grpc::Service*>& services, const ServerOptions& options);
  Server() = default;
  Server(Server&&) noexcept = default;
  Server& operator=(Server&&) noexcept = default;
  ~Server();
  int port() const { return port_; }
  std::string address() const { return host_ + ":" + std::to_string(port_); }
  void shutdown(std::chrono::milliseconds grace = std::chrono::seconds(1));
  void wait();

 private:
  std::unique_ptr<grpc::Server> server_;
  std::string host_;
  int port_ = 0;
};

// Sets a deadline `seconds` from now.
void set_deadline(grpc::ClientContext& context, std::chrono::milliseconds timeout);

// gRPC status code for a tessera error code, and back.
grpc::StatusCode to_grpc_code(ErrorCode code);
ErrorCode from_grpc_code(grpc::StatusCode code);

// Runs a handler body: returns OK, or the status matching the exception it
// threw (tessera::Error keeps its code; anything else is INTERNAL).
grpc::Status guard(const std::function<void()>& body);

// Throws a tessera::Error for a failed status: "<what> to <peer>: <message>"
// with the matching code. No-op for OK.
void check(const grpc::Status& status, const std::string& what, const std::string& peer);

// Tensors in messages: contiguous CPU bytes, dtype by name.
void to_proto(const at::Tensor& tensor, const std::string& name, TensorProto* out);
// InvalidArgument naming the tensor for an unknown dtype, a negative
// dimension or data whose size does not match the shape.
at::Tensor from_proto(const TensorProto& proto);

}  // namespace tessera::rpc
