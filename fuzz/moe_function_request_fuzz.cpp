// Fuzz target: the requests a serverless expert function serves
// (ExpertFunction.Invoke of proto/tessera/moe/function.proto).
//
// The handler is the Function service of src/tools/function/main.cpp (the
// tessera-function program), in an anonymous namespace; this target
// compiles that file into itself (its main() renamed) and calls the handler
// directly, as gRPC would, with no process and no network. The function is
// an expert of hidden size 8 and intermediate size 16 with 1 MB of memory,
// so large token batches hit its memory check. Its storage channel (files)
// holds four inputs: k0 float32 [3, 8] (valid), k1 float32 [2, 5] (wrong
// width), k2 int64 [3, 8] (wrong dtype), k3 float32 [2, 3, 8] (wrong rank).
//
// Input: a serialized InvokeRequest. Bytes protobuf cannot parse are
// skipped (gRPC refuses them before the handler), and so are requests
// naming more than eight input keys or keys other than k0..k3: a missing
// key is waited for (at least a second, by design, for pipelined inputs that
// are still being written), which would only slow the fuzzer down. The
// answer must be a status the handler chose (INTERNAL means an exception
// other than tessera::Error escaped), and a direct call that succeeds must
// return one output row per input row.
#include <ATen/ATen.h>

#include <cstdint>
#include <set>
#include <string>

#include <google/protobuf/stubs/logging.h>
#include "command_line.h"

#include "fuzz_common.h"
#include "tessera/moe/function.grpc.pb.h"
#include "tessera/moe/storage.h"
#include "tessera/rpc/rpc.h"

// The headers above are included first so that the macro renames only the
// program's own main().
#define main tessera_function_main
#include "../src/tools/function/main.cpp"
#undef main

namespace {

struct Fixture {
  tessera::fuzz::ScratchDir scratch;
  std::shared_ptr<tessera::moe::StorageChannel> storage =
      tessera::moe::StorageChannel::open("files:" + scratch.file("storage"));
  std::unique_ptr<Function> function;
  Fixture() {
    at::manual_seed(0);
    function =
        std::make_unique<Function>(at::randn({16, 8}), at::randn({8, 16}), at::randn({16, 8}),
                                   /*memory_mb=*/1, /*threads=*/1, storage);
    storage->put("k0", at::randn({3, 8}));
    storage->put("k1", at::randn({2, 5}));
    storage->put("k2", at::ones({3, 8}, at::kLong));
    storage->put("k3", at::randn({2, 3, 8}));
  }
};

Fixture& fixture() {
  static Fixture f;
  return f;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // Protobuf logs every string field of invalid UTF-8 it parses; quiet.
  google::protobuf::SetLogHandler(nullptr);
  at::set_num_threads(1);
  fixture();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Fixture& f = fixture();
  tessera::moe::proto::InvokeRequest req;
  if (!req.ParseFromArray(data, static_cast<int>(size))) return 0;
  static const std::set<std::string> kKeys = {"k0", "k1", "k2", "k3"};
  if (req.input_keys_size() > 8) return 0;
  for (const auto& key : req.input_keys()) {
    if (!kKeys.count(key)) return 0;
  }
  tessera::moe::proto::InvokeReply reply;
  const grpc::Status status = f.function->Invoke(nullptr, &req, &reply);
  for (const auto& key : req.input_keys()) f.storage->remove(key + ".out");
  if (tessera::fuzz::verbose() && !status.ok()) {
    std::fprintf(stderr, "status %d: %s\n", status.error_code(), status.error_message().c_str());
  }
  tessera::fuzz::require(status.error_code() != grpc::StatusCode::INTERNAL,
                         "Invoke answered INTERNAL (an exception other than tessera::Error): " +
                             status.error_message());
  if (status.ok() && req.input_keys_size() == 0) {
    tessera::fuzz::require(reply.outputs().shape_size() == 2 &&
                               reply.outputs().shape(0) == req.tokens().shape(0) &&
                               reply.outputs().shape(1) == 8,
                           "Invoke: output shape does not match the input rows");
  }
  return 0;
}
