#include "tessera/rpc/rpc.h"

#include <ATen/ATen.h>

#include <chrono>
#include <cstring>

#include "tessera/core/tensor.h"

namespace tessera::rpc {

std::shared_ptr<grpc::Channel> channel(const std::string& address, const ChannelOptions& options) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(options.max_message_bytes);
  args.SetMaxSendMessageSize(options.max_message_bytes);
  // Loopback peers come and go with their processes: reconnect quickly.
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 50);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 500);
  return grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
}

Server Server::start(const std::vector<grpc::Service*>& services, const ServerOptions& options) {
  grpc::ServerBuilder builder;
  int port = 0;
  const std::string address = options.host + ":" + std::to_string(options.port);
  builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &port);
  builder.SetMaxReceiveMessageSize(options.max_message_bytes);
  builder.SetMaxSendMessageSize(options.max_message_bytes);
  for (grpc::Service* s : services) builder.RegisterService(s);
  Server server;
  server.server_ = builder.BuildAndStart();
  TESSERA_CHECK(server.server_ && port > 0, Unavailable, "rpc: could not listen on ", address);
  server.host_ = options.host;
  server.port_ = port;
  return server;
}

Server::~Server() { shutdown(); }

void Server::shutdown(std::chrono::milliseconds grace) {
  if (!server_) return;
  server_->Shutdown(std::chrono::system_clock::now() + grace);
  server_->Wait();
  server_.reset();
}

void Server::wait() {
  if (server_) server_->Wait();
}

void set_deadline(grpc::ClientContext& context, std::chrono::milliseconds timeout) {
  context.set_deadline(std::chrono::system_clock::now() + timeout);
}

grpc::StatusCode to_grpc_code(ErrorCode code) {
  switch (code) {
    case ErrorCode::kInvalidArgument:
      return grpc::StatusCode::INVALID_ARGUMENT;
    case ErrorCode::kNotFound:
      return grpc::StatusCode::NOT_FOUND;
    case ErrorCode::kDataLoss:
      return grpc::StatusCode::DATA_LOSS;
    case ErrorCode::kUnavailable:
      return grpc::StatusCode::UNAVAILABLE;
    case ErrorCode::kDeadlineExceeded:
      return grpc::StatusCode::DEADLINE_EXCEEDED;
    case ErrorCode::kFailedPrecondition:
      return grpc::StatusCode::FAILED_PRECONDITION;
    case ErrorCode::kResourceExhausted:
      return grpc::StatusCode::RESOURCE_EXHAUSTED;
    case ErrorCode::kAborted:
      return grpc::StatusCode::ABORTED;
    case ErrorCode::kInternal:
      return grpc::StatusCode::INTERNAL;
  }
  return grpc::StatusCode::UNKNOWN;
}

ErrorCode from_grpc_code(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::INVALID_ARGUMENT:
    case grpc::StatusCode::OUT_OF_RANGE:
      return ErrorCode::kInvalidArgument;
    case grpc::StatusCode::NOT_FOUND:
      return ErrorCode::kNotFound;
    case grpc::StatusCode::DATA_LOSS:
      return ErrorCode::kDataLoss;
    case grpc::StatusCode::UNAVAILABLE:
    case grpc::StatusCode::CANCELLED:
      return ErrorCode::kUnavailable;
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return ErrorCode::kDeadlineExceeded;
    case grpc::StatusCode::FAILED_PRECONDITION:
    // The caller must present other credentials before retrying.
    case grpc::StatusCode::UNAUTHENTICATED:
    case grpc::StatusCode::PERMISSION_DENIED:
      return ErrorCode::kFailedPrecondition;
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      return ErrorCode::kResourceExhausted;
    case grpc::StatusCode::ABORTED:
      return ErrorCode::kAborted;
    default:
      return ErrorCode::kInternal;
  }
}

grpc::Status guard(const std::function<void()>& body) {
  try {
    body();
    return grpc::Status::OK;
  } catch (const Error& e) {
    return grpc::Status(to_grpc_code(e.code()), e.message());
  } catch (const std::exception& e) {
    return grpc::Status(grpc::StatusCode::INTERNAL, e.what());
  }
}

void check(const grpc::Status& status, const std::string& what, const std::string& peer) {
  if (status.ok()) return;
  throw_error(from_grpc_code(status.error_code()),
              detail::concat(what, " to ", peer, ": ", status.error_message()));
}

void to_proto(const at::Tensor& tensor, const std::string& name, TensorProto* out) {
  at::Tensor t = tensor.to(at::kCPU).contiguous();
  out->set_name(name);
  out->set_dtype(dtype_name(t.scalar_type()));
  out->clear_shape();
  for (int64_t s : t.sizes()) out->add_shape(s);
  out->set_data(static_cast<const char*>(t.data_ptr()), t.nbytes());
}

at::Tensor from_proto(const TensorProto& proto) {
  at::ScalarType dtype;
  try {
    dtype = parse_dtype(proto.dtype());
  } catch (const Error& e) {
    throw InvalidArgument(detail::concat("tensor '", proto.name(), "': ", e.message()));
  }
  std::vector<int64_t> shape(proto.shape().begin(), proto.shape().end());
  int64_t numel = 1;
  for (int64_t s : shape) {
    TESSERA_CHECK(s >= 0 && s < (int64_t{1} << 40), InvalidArgument, "tensor '", proto.name(),
                  "': bad dimension ", s);
    // Checked before multiplying: two dimensions below 2^40 can overflow int64.
    TESSERA_CHECK(s == 0 || numel < ((int64_t{1} << 40) + s - 1) / s, InvalidArgument, "tensor '",
                  proto.name(), "': too many elements");
    numel *= s;
  }
  const size_t expected = static_cast<size_t>(numel) * dtype_size(dtype);
  TESSERA_CHECK(proto.data().size() == expected, InvalidArgument, "tensor '", proto.name(),
                "': ", proto.data().size(), " data bytes for shape ", shape_string(shape), " of ",
                proto.dtype(), " (expected ", expected, ")");
  at::Tensor t = at::empty(shape, at::TensorOptions().dtype(dtype));
  if (expected) std::memcpy(t.data_ptr(), proto.data().data(), expected);
  return t;
}

}  // namespace tessera::rpc
