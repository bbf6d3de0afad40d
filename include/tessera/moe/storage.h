// tessera/moe/storage.h — the storage channel of indirect transfers between
// the MoE gate and its expert functions: objects (one tensor each) by key.
//
//   auto files = tessera::moe::StorageChannel::open("files:/dev/shm/run1");
//   auto redis = tessera::moe::StorageChannel::open("redis://127.0.0.1:6379");
//   redis->put("layer0.e3", x);
//   at::Tensor y = redis->get("layer0.e3.out", std::chrono::seconds(30));
//
// "files:<dir>" keeps each object as a safetensors file written atomically;
// "redis://host:port" keeps it as one Redis string (the tensor as a
// serialised rpc TensorProto). get() waits up to `wait` for a key to
// appear (pipelined transfers read objects while they are being written),
// then fails with NotFound naming the key. Thread-safe.
#pragma once

#include <ATen/core/Tensor.h>

#include <chrono>
#include <memory>
#include <string>

namespace tessera::moe {

class StorageChannel {
 public:
  virtual ~StorageChannel() = default;
  // InvalidArgument for an unknown scheme; Unavailable when Redis cannot be reached.
  static std::shared_ptr<StorageChannel> open(const std::string& url);

  virtual void put(const std::string& key, const at::Tensor& x) = 0;
  virtual at::Tensor get(const std::string& key, std::chrono::milliseconds wait = {}) = 0;
  virtual void remove(const std::string& key) = 0;
  virtual std::string url() const = 0;
};

}  // namespace tessera::moe
