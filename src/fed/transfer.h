// Private to the fed module: tensors streamed as chunks, grants for peer
// fetches, session secrets.
//
// A tensor of any size travels as TensorChunk messages of at most
// `chunk_bytes` data each, so the gRPC message limit (4 MiB by default, 2
// GiB at most) never binds; offsets are 64-bit.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "tessera/fed/aggregation.h"
#include "tessera/fed/federation.pb.h"

namespace tessera::fed::internal {

using NamedTensorList = std::vector<std::pair<std::string, at::Tensor>>;

// Sends each tensor (any device, any layout) as chunks through `write`,
// which returns false when the stream has broken (then this stops and
// returns -1). Returns the bytes written (serialised message sizes).
// InvalidArgument for chunk_bytes < 1.
int64_t write_tensors(const NamedTensorList& tensors, int64_t chunk_bytes,
                      const std::function<bool(const proto::Chunk&)>& write);

// Rebuilds tensors from their chunks, checking every piece: chunks of one
// tensor in order and without gaps, sizes matching dtype and shape, no
// tensor twice. Errors name `source` and the tensor: InvalidArgument for
// a malformed stream, DataLoss for a tensor cut short.
class TensorAssembler {
 public:
  explicit TensorAssembler(std::string source);
  void add(const proto::TensorChunk& chunk);
  // The finished tensors; DataLoss when one is incomplete, InvalidArgument
  // when `expected_count` >= 0 and the count differs.
  TensorMap finish(int64_t expected_count);

 private:
  std::string source_;
  TensorMap done_;
  std::string name_;  // tensor being received; empty: none
  at::Tensor current_;
  uint64_t received_ = 0, total_ = 0;
};

// HMAC-SHA256 under `key` of the grant's fields: the proof that the
// coordinator lets `requester` fetch expert (layer, expert) of `owner` for
// payload `version`.
std::string make_grant(const std::string& key, int requester, int owner, int64_t layer,
                       int64_t expert, int64_t version);
// Constant-time comparison with the grant the fields should have.
bool check_grant(const std::string& key, const std::string& grant, int requester, int owner,
                 int64_t layer, int64_t expert, int64_t version);

// A refusal with a gRPC code that tessera::Error has no kind for
// (UNAUTHENTICATED, PERMISSION_DENIED).
class Refusal : public std::exception {
 public:
  Refusal(grpc::StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}
  grpc::StatusCode code() const { return code_; }
  const char* what() const noexcept override { return message_.c_str(); }

 private:
  grpc::StatusCode code_;
  std::string message_;
};

// rpc::guard, plus Refusal with its own code.
grpc::Status guarded(const std::function<void()>& body);

// `n` bytes from OpenSSL's CSPRNG; Internal when it fails.
std::string random_bytes(size_t n);
std::string hex(const std::string& bytes);
// Constant-time equality of two secrets.
bool secrets_equal(const std::string& a, const std::string& b);

}  // namespace tessera::fed::internal
