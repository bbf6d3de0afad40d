// Fuzz target: tensors in control-plane messages (tessera::rpc::from_proto).
//
// Input: a serialized tessera.rpc.TensorProto, as a gRPC handler receives
// it. Bytes protobuf cannot parse are skipped (gRPC answers INTERNAL before
// any Tessera code runs). A message from_proto accepts must describe its
// tensor exactly: encoding the tensor again gives the same shape and bytes.
#include <ATen/ATen.h>

#include <cstdint>
#include <string>

#include <google/protobuf/stubs/logging.h>

#include "fuzz_common.h"
#include "tessera/rpc/rpc.h"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // Protobuf logs every string field of invalid UTF-8 it parses; quiet.
  google::protobuf::SetLogHandler(nullptr);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  tessera::rpc::TensorProto proto;
  if (!proto.ParseFromArray(data, static_cast<int>(size))) return 0;
  tessera::fuzz::expect_errors("rpc::from_proto", [&] {
    const at::Tensor t = tessera::rpc::from_proto(proto);
    tessera::rpc::TensorProto again;
    tessera::rpc::to_proto(t, proto.name(), &again);
    tessera::fuzz::require(again.data() == proto.data(),
                           "to_proto(from_proto(p)) changed the bytes");
    tessera::fuzz::require(again.shape_size() == proto.shape_size(),
                           "to_proto(from_proto(p)) changed the rank");
    for (int i = 0; i < proto.shape_size(); ++i) {
      tessera::fuzz::require(again.shape(i) == proto.shape(i),
                             "to_proto(from_proto(p)) changed the shape");
    }
  });
  return 0;
}
