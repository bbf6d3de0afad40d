// Tests of tessera/rpc/rpc.h that need no server: tensors in messages.
#include "tessera/rpc/rpc.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <string>

#include "tessera/core/error.h"

namespace tessera::rpc {
namespace {

TEST(TensorProto, RoundTripsShapeDtypeAndBytes) {
  for (const at::Tensor& t :
       {at::arange(6, at::kFloat).reshape({2, 3}), at::tensor({-1, 7}, at::kLong),
        at::ones({2, 0, 3}, at::kBFloat16), at::scalar_tensor(true)}) {
    TensorProto p;
    to_proto(t, "t", &p);
    const at::Tensor back = from_proto(p);
    EXPECT_EQ(back.scalar_type(), t.scalar_type());
    EXPECT_EQ(back.sizes(), t.sizes());
    EXPECT_TRUE(at::equal(back, t));
  }
}

// Regression (found by fuzz/rpc_tensor_proto_fuzz.cpp): two dimensions each
// below the 2^40 limit overflowed int64 when from_proto multiplied them
// (UBSan: signed integer overflow) instead of InvalidArgument.
TEST(TensorProto, FuzzShapeWhoseProductOverflowsIsInvalidArgument) {
  TensorProto p;
  p.set_name("x");
  p.set_dtype("float32");
  p.add_shape(int64_t{1} << 35);
  p.add_shape(int64_t{1} << 35);
  try {
    from_proto(p);
    FAIL() << "no exception";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(e.message().find("tensor 'x': too many elements"), std::string::npos) << e.message();
  }
  // The fuzzer's input, verbatim: shape [16, 16, 16, 16, 16, 24, 64, 24,
  // 4299194626] of "f64", with fields of the wrong wire type mixed in.
  const std::string fuzzed(
      "\x10\x10\x18\x10\x18\x10\x18\x10\x12\x03\x66\x36\x33\x12\x03\x66\x10\x10\x18\x10\x18\x10\x10"
      "\x10"
      "\x40\x40\x18\x18\x30\x3d\x18\x40\x18\x18\x30\x3d\x18\x82\x82\x82\x82\x10\x12\x03\x66\x36"
      "\x34",
      47);
  ASSERT_TRUE(p.ParseFromString(fuzzed));
  EXPECT_THROW(from_proto(p), InvalidArgument);
}

TEST(TensorProto, BadDtypeDimensionAndSizeAreInvalidArgument) {
  TensorProto p;
  p.set_name("x");
  p.set_dtype("float32");
  p.add_shape(2);
  p.set_data(std::string(7, '\0'));
  EXPECT_THROW(from_proto(p), InvalidArgument);  // 7 bytes for 8
  p.set_dtype("float33");
  EXPECT_THROW(from_proto(p), InvalidArgument);
  p.set_dtype("float32");
  p.set_shape(0, -1);
  EXPECT_THROW(from_proto(p), InvalidArgument);
}

}  // namespace
}  // namespace tessera::rpc
