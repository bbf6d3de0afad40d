#include "transfer.h"

#include <ATen/ATen.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include <cstring>
#include <optional>

#include "tessera/core/error.h"
#include "tessera/core/tensor.h"
#include "tessera/rpc/rpc.h"

namespace tessera::fed::internal {

int64_t write_tensors(const NamedTensorList& tensors, int64_t chunk_bytes,
                      const std::function<bool(const proto::Chunk&)>& write) {
  TESSERA_CHECK(chunk_bytes >= 1, InvalidArgument, "chunk size is ", chunk_bytes,
                " bytes, expected >= 1");
  int64_t written = 0;
  proto::Chunk chunk;
  for (const auto& [name, tensor] : tensors) {
    const at::Tensor t = tensor.detach().to(at::kCPU).contiguous();
    const auto* data = static_cast<const char*>(t.data_ptr());
    const uint64_t total = static_cast<uint64_t>(t.nbytes());
    uint64_t offset = 0;
    do {
      const uint64_t n = std::min<uint64_t>(static_cast<uint64_t>(chunk_bytes), total - offset);
      chunk.Clear();
      proto::TensorChunk* piece = chunk.mutable_tensor();
      piece->set_name(name);
      piece->set_offset(offset);
      piece->set_total_bytes(total);
      if (offset == 0) {
        piece->set_dtype(dtype_name(t.scalar_type()));
        for (int64_t s : t.sizes()) piece->add_shape(s);
      }
      piece->set_data(data + offset, n);
      written += static_cast<int64_t>(chunk.ByteSizeLong());
      if (!write(chunk)) return -1;
      offset += n;
    } while (offset < total);
  }
  return written;
}

TensorAssembler::TensorAssembler(std::string source) : source_(std::move(source)) {}

void TensorAssembler::add(const proto::TensorChunk& chunk) {
  if (chunk.offset() == 0) {
    TESSERA_CHECK(name_.empty(), DataLoss, source_, ": tensor '", name_, "' ends after ", received_,
                  " of ", total_, " bytes (next: '", chunk.name(), "')");
    TESSERA_CHECK(!chunk.name().empty(), InvalidArgument, source_, ": a tensor without a name");
    TESSERA_CHECK(!done_.count(chunk.name()), InvalidArgument, source_, ": tensor '", chunk.name(),
                  "' sent twice");
    at::ScalarType dtype;
    try {
      dtype = parse_dtype(chunk.dtype());
    } catch (const Error& e) {
      TESSERA_THROW(InvalidArgument, source_, ": tensor '", chunk.name(), "': ", e.message());
    }
    std::vector<int64_t> shape(chunk.shape().begin(), chunk.shape().end());
    uint64_t numel = 1;
    for (int64_t s : shape) {
      TESSERA_CHECK(s >= 0 && s < (int64_t{1} << 40), InvalidArgument, source_, ": tensor '",
                    chunk.name(), "' has dimension ", s);
      numel *= static_cast<uint64_t>(s);
      TESSERA_CHECK(numel < (uint64_t{1} << 40), InvalidArgument, source_, ": tensor '",
                    chunk.name(), "' is too large");
    }
    const uint64_t expected = numel * dtype_size(dtype);
    TESSERA_CHECK(chunk.total_bytes() == expected, InvalidArgument, source_, ": tensor '",
                  chunk.name(), "' announces ", chunk.total_bytes(), " bytes for shape ",
                  shape_string(shape), " of ", chunk.dtype(), " (", expected, " expected)");
    current_ = at::empty(shape, at::TensorOptions().dtype(dtype));
    name_ = chunk.name();
    total_ = expected;
    received_ = 0;
  } else {
    TESSERA_CHECK(!name_.empty() && chunk.name() == name_ && chunk.offset() == received_,
                  InvalidArgument, source_, ": piece of '", chunk.name(), "' at offset ",
                  chunk.offset(), " out of order (expected ",
                  name_.empty() ? std::string("a new tensor at offset 0")
                                : "'" + name_ + "' at offset " + std::to_string(received_),
                  ")");
  }
  TESSERA_CHECK(chunk.total_bytes() == total_ && received_ + chunk.data().size() <= total_,
                InvalidArgument, source_, ": piece of '", name_, "' overruns its ", total_,
                " bytes");
  if (!chunk.data().empty()) {
    std::memcpy(static_cast<char*>(current_.data_ptr()) + received_, chunk.data().data(),
                chunk.data().size());
  }
  received_ += chunk.data().size();
  if (received_ == total_) {
    done_[name_] = current_;
    name_.clear();
    current_ = at::Tensor();
  }
}

TensorMap TensorAssembler::finish(int64_t expected_count) {
  TESSERA_CHECK(name_.empty(), DataLoss, source_, ": tensor '", name_, "' cut short after ",
                received_, " of ", total_, " bytes");
  TESSERA_CHECK(expected_count < 0 || static_cast<int64_t>(done_.size()) == expected_count,
                InvalidArgument, source_, ": ", done_.size(),
                " tensors received, the header announced ", expected_count);
  return std::move(done_);
}

namespace {

std::string grant_message(int requester, int owner, int64_t layer, int64_t expert,
                          int64_t version) {
  return "tessera-fed-grant-v1\n" + std::to_string(requester) + "\n" + std::to_string(owner) +
         "\n" + std::to_string(layer) + "\n" + std::to_string(expert) + "\n" +
         std::to_string(version);
}

}  // namespace

std::string make_grant(const std::string& key, int requester, int owner, int64_t layer,
                       int64_t expert, int64_t version) {
  TESSERA_CHECK(!key.empty(), FailedPrecondition, "grant for client ", owner,
                "'s expert: the owner has no key");
  const std::string message = grant_message(requester, owner, layer, expert, version);
  unsigned char out[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  const unsigned char* ok =
      HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()),
           reinterpret_cast<const unsigned char*>(message.data()), message.size(), out, &length);
  TESSERA_CHECK(ok != nullptr, Internal, "HMAC-SHA256 failed");
  return std::string(reinterpret_cast<const char*>(out), length);
}

bool check_grant(const std::string& key, const std::string& grant, int requester, int owner,
                 int64_t layer, int64_t expert, int64_t version) {
  if (key.empty()) return false;
  return secrets_equal(make_grant(key, requester, owner, layer, expert, version), grant);
}

grpc::Status guarded(const std::function<void()>& body) {
  std::optional<grpc::Status> refused;
  grpc::Status status = rpc::guard([&] {
    try {
      body();
    } catch (const Refusal& r) {
      refused = grpc::Status(r.code(), r.what());
    }
  });
  return refused ? *refused : status;
}

std::string random_bytes(size_t n) {
  std::string out(n, '\0');
  TESSERA_CHECK(RAND_bytes(reinterpret_cast<unsigned char*>(out.data()), static_cast<int>(n)) == 1,
                Internal, "RAND_bytes failed");
  return out;
}

std::string hex(const std::string& bytes) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out;
  for (unsigned char c : bytes) {
    out.push_back(kDigits[c >> 4]);
    out.push_back(kDigits[c & 15]);
  }
  return out;
}

bool secrets_equal(const std::string& a, const std::string& b) {
  return a.size() == b.size() && CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0;
}

}  // namespace tessera::fed::internal
