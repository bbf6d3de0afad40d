#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <sys/resource.h>

#include "tessera/core/error.h"
#include "tessera/core/log.h"
#include "tessera/core/runtime.h"
#include "tessera/core/tensor.h"

namespace tessera {
namespace {

TEST(Tensor, DtypeNamesRoundTrip) {
  for (auto dt : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16, at::kByte, at::kChar,
                  at::kShort, at::kInt, at::kLong, at::kBool}) {
    EXPECT_EQ(parse_dtype(dtype_name(dt)), dt) << dtype_name(dt);
  }
  EXPECT_EQ(parse_dtype("BF16"), at::kBFloat16);
  EXPECT_EQ(parse_dtype("F32"), at::kFloat);
  EXPECT_EQ(dtype_size(at::kBFloat16), 2u);
  EXPECT_THROW(parse_dtype("float8"), InvalidArgument);
}

TEST(Tensor, DevicesAndShapes) {
  EXPECT_EQ(parse_device("cpu"), at::Device(at::kCPU));
  EXPECT_THROW(parse_device("tpu"), InvalidArgument);
  if (!cuda_available()) {
    EXPECT_THROW(parse_device("cuda:0"), InvalidArgument);
  }
  auto t = at::zeros({2, 3}, at::kBFloat16);
  EXPECT_EQ(tensor_bytes(t), 12);
  EXPECT_EQ(shape_string(t.sizes()), "[2, 3]");
  EXPECT_NO_THROW(check_shape(t, {2, 3}, "w"));
  try {
    check_shape(t, {3, 2}, "layer.0.weight");
    FAIL();
  } catch (const InvalidArgument& e) {
    EXPECT_EQ(e.message(), "layer.0.weight: expected shape [3, 2], got [2, 3]");
  }
  EXPECT_THROW(check_dtype(t, at::kFloat, "w"), InvalidArgument);
}

TEST(Log, LevelsAndSpecs) {
  EXPECT_EQ(log::parse_level("WARN"), log::Level::kWarn);
  EXPECT_THROW(log::parse_level("loud"), InvalidArgument);
  log::configure("error,dist=debug");
  EXPECT_FALSE(log::enabled("core", log::Level::kInfo));
  EXPECT_TRUE(log::enabled("core", log::Level::kError));
  EXPECT_TRUE(log::enabled("dist", log::Level::kDebug));
  // The message expression is not evaluated when the level is off.
  int evaluated = 0;
  auto side_effect = [&] { return ++evaluated; };
  TESSERA_LOG(Info, "core") << side_effect();
  EXPECT_EQ(evaluated, 0);
  TESSERA_LOG(Debug, "dist") << "visible " << side_effect();
  EXPECT_EQ(evaluated, 1);
  log::set_level(log::Level::kInfo);
  EXPECT_TRUE(log::enabled("dist", log::Level::kInfo));
  EXPECT_FALSE(log::enabled("dist", log::Level::kDebug));
}

TEST(Runtime, ThreadsFromOptionsAndBlasDetected) {
  RuntimeOptions opts;
  opts.num_threads = 2;
  auto info = init_runtime(opts);
  EXPECT_EQ(info.num_threads, 2);
  EXPECT_GE(info.usable_cores, 1);
  EXPECT_FALSE(info.blas_name.empty());
  EXPECT_NE(info.summary().find("BLAS"), std::string::npos);
  opts.num_threads = 1;
  EXPECT_EQ(init_runtime(opts).num_threads, 1);
}

long minor_faults() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_minflt;
}

// The allocator init_runtime installs keeps a freed 45 MiB buffer and hands
// it out again: the second buffer of that size takes no page faults (with
// LibTorch's own allocator every one is faulted in afresh: 11,463 faults).
// Blocks of a different size class are not handed out, small ones are not
// cached, and the data survives the round trip untouched by the cache.
TEST(Runtime, LargeCpuBlocksAreReusedWithoutPageFaults) {
  init_runtime();
  const int64_t n = 46950400 / 4;
  void* first_ptr = nullptr;
  {
    at::Tensor first = at::empty({n});
    first.fill_(1);
    first_ptr = first.data_ptr();
  }
  const auto [idle_bytes, idle_blocks] = cpu_allocator_idle();
  EXPECT_GE(idle_bytes, static_cast<size_t>(n) * 4);
  EXPECT_GE(idle_blocks, 1u);
  const long before = minor_faults();
  at::Tensor second = at::empty({n});
  second.fill_(2);
  const long faults = minor_faults() - before;
  EXPECT_EQ(second.data_ptr(), first_ptr);
  EXPECT_LT(faults, 100) << "the reused 45 MiB block was faulted in again";
  EXPECT_EQ(second.sum().item<double>(), 2.0 * n);
  // Twice the size: not served by the cached block, which stays idle.
  at::Tensor larger = at::empty({2 * n});
  EXPECT_NE(larger.data_ptr(), first_ptr);
  // Small blocks are not cached.
  const size_t idle_now = cpu_allocator_idle().first;
  { at::Tensor small = at::ones({1000}); }
  EXPECT_EQ(cpu_allocator_idle().first, idle_now);
}

}  // namespace
}  // namespace tessera
