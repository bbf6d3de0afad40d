#include "tessera/formats/safetensors.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <unistd.h>
#include "test_main.h"

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "tessera/core/error.h"

namespace fs = std::filesystem;

namespace tessera::nn {
namespace {

class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() /
           ("tessera_st_" + std::to_string(::getpid()) + "_" + info->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  // Writes a file by hand: length prefix, `header` verbatim, then `data`.
  std::string write_raw(const std::string& name, const std::string& header,
                        const std::string& data = "") const {
    std::string p = path(name);
    std::ofstream out(p, std::ios::binary);
    const uint64_t n = header.size();
    out.write(reinterpret_cast<const char*>(&n), 8);
    out << header << data;
    return p;
  }

  fs::path dir_;
};

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

// Runs `fn`, expects it to throw `E`, and returns the message.
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

NamedTensors every_dtype() {
  at::manual_seed(0);
  return {
      {"f32", at::randn({3, 5})},
      {"f64", at::randn({4}, at::kDouble)},
      {"f16", at::randn({2, 3, 3}).to(at::kHalf)},  // odd byte count: tests alignment sort
      {"bf16", at::randn({7}).to(at::kBFloat16)},
      {"i64", at::randint(-1000000, 1000000, {5}, at::kLong)},
      {"i32", at::randint(-100000, 100000, {2, 2}, at::kInt)},
      {"i16", at::randint(-30000, 30000, {3}, at::kShort)},
      {"i8", at::randint(-128, 127, {9}, at::kChar)},
      {"u8", at::randint(0, 255, {11}, at::kByte)},
      {"bool", at::randint(0, 2, {6}).to(at::kBool)},
      {"scalar", at::scalar_tensor(3.5)},                           // 0-d
      {"empty", at::empty({0, 4})},                                 // no bytes
      {"transposed", at::arange(12, at::kFloat).view({3, 4}).t()},  // non-contiguous input
  };
}

TEST_F(SafetensorsTest, RoundTripsEveryDtypeAndMetadata) {
  const NamedTensors tensors = every_dtype();
  const std::string p = path("all.safetensors");
  save_safetensors(p, tensors, {{"format", "pt"}, {"note", "héllo"}});

  auto file = SafetensorsFile::open(p);
  EXPECT_EQ(file.metadata().at("format"), "pt");
  EXPECT_EQ(file.metadata().at("note"), "héllo");
  EXPECT_EQ(file.data_offset() % 8, 0u) << "header must be padded to 8 bytes";
  ASSERT_EQ(file.tensors().size(), tensors.size());
  for (const auto& [name, expected] : tensors) {
    SCOPED_TRACE(name);
    const at::Tensor got = file.get(name);
    EXPECT_EQ(got.scalar_type(), expected.scalar_type());
    EXPECT_EQ(got.sizes(), expected.sizes());
    EXPECT_TRUE(got.is_contiguous());
    EXPECT_TRUE(at::equal(got, expected));
    // The writer orders data so every tensor is aligned to its element size.
    EXPECT_EQ(reinterpret_cast<uintptr_t>(got.data_ptr()) % got.element_size(), 0u);
    const auto& info = file.info(name);
    EXPECT_EQ(info.data_end - info.data_begin,
              static_cast<uint64_t>(got.numel() * got.element_size()));
  }
  EXPECT_EQ(file.get("scalar").dim(), 0);
  EXPECT_EQ(file.get("empty").numel(), 0);
  // tensors() is in data order.
  for (size_t i = 1; i < file.tensors().size(); ++i) {
    EXPECT_EQ(file.tensors()[i].data_begin, file.tensors()[i - 1].data_end);
  }
  // Nothing but the file itself is left behind.
  EXPECT_EQ(std::distance(fs::directory_iterator(dir_), fs::directory_iterator()), 1);
}

TEST_F(SafetensorsTest, HeaderLayoutMatchesReference) {
  const std::string p = path("layout.safetensors");
  save_safetensors(p, {{"a", at::ones({2}, at::kHalf)}, {"b", at::zeros({1}, at::kFloat)}});
  const std::string bytes = read_bytes(p);
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  EXPECT_EQ(n % 8, 0u);
  ASSERT_EQ(bytes.size(), 8 + n + 2 * 2 + 4);
  auto header = nlohmann::json::parse(bytes.substr(8, n));
  EXPECT_FALSE(header.contains("__metadata__")) << "no metadata given, none written";
  // The 4-byte tensor comes first even though the caller listed it second.
  EXPECT_EQ(header["b"]["data_offsets"], nlohmann::json({0, 4}));
  EXPECT_EQ(header["a"]["data_offsets"], nlohmann::json({4, 8}));
  EXPECT_EQ(header["a"]["dtype"], "F16");
  EXPECT_EQ(header["a"]["shape"], nlohmann::json({2}));
}

TEST_F(SafetensorsTest, GetIsZeroCopyAndOutlivesTheFile) {
  const std::string p = path("zc.safetensors");
  save_safetensors(p, {{"w", at::arange(1024, at::kFloat)}, {"v", at::ones({16}, at::kFloat)}});
  at::Tensor w;
  {
    auto file = SafetensorsFile::open(p);
    w = file.get("w");
    at::Tensor again = file.get("w");
    at::Tensor v = file.get("v");
    // Two gets see the same bytes, and tensors sit where the header says:
    // both only hold for views of one mapping, never for copies.
    EXPECT_EQ(w.data_ptr(), again.data_ptr());
    const auto delta =
        static_cast<const uint8_t*>(v.data_ptr()) - static_cast<const uint8_t*>(w.data_ptr());
    EXPECT_EQ(delta, static_cast<ptrdiff_t>(file.info("v").data_begin) -
                         static_cast<ptrdiff_t>(file.info("w").data_begin));
  }
  // The file object is gone; the deleter's reference keeps the mapping.
  EXPECT_TRUE(at::equal(w, at::arange(1024, at::kFloat)));
  at::Tensor slice = w.slice(0, 10, 20);
  w.reset();
  EXPECT_EQ(slice[0].item<float>(), 10.0f);
}

TEST_F(SafetensorsTest, TypedGetChecksDtypeAndShape) {
  const std::string p = path("typed.safetensors");
  save_safetensors(p, {{"w", at::zeros({2, 3}, at::kBFloat16)}});
  auto file = SafetensorsFile::open(p);
  EXPECT_NO_THROW(file.get("w", at::kBFloat16, {2, 3}));

  std::string msg = error_of<InvalidArgument>([&] { file.get("w", at::kFloat, {2, 3}); });
  EXPECT_NE(msg.find(p), std::string::npos) << msg;
  EXPECT_NE(msg.find("'w'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("expected dtype float32, got bfloat16"), std::string::npos) << msg;

  msg = error_of<InvalidArgument>([&] { file.get("w", at::kBFloat16, {3, 2}); });
  EXPECT_NE(msg.find(p), std::string::npos) << msg;
  EXPECT_NE(msg.find("expected shape [3, 2], got [2, 3]"), std::string::npos) << msg;
}

TEST_F(SafetensorsTest, MissingTensorIsNotFound) {
  const std::string p = path("m.safetensors");
  save_safetensors(p, {{"w", at::zeros({1})}});
  auto file = SafetensorsFile::open(p);
  EXPECT_FALSE(file.contains("bias"));
  const std::string msg = error_of<NotFound>([&] { file.get("bias"); });
  EXPECT_NE(msg.find(p), std::string::npos) << msg;
  EXPECT_NE(msg.find("'bias'"), std::string::npos) << msg;
  EXPECT_THROW(SafetensorsFile::open(path("nope.safetensors")), NotFound);
}

TEST_F(SafetensorsTest, CorruptHeadersAreDataLoss) {
  // Not JSON.
  std::string p = write_raw("badjson.safetensors", "{\"w\": {\"dtype\": ");
  std::string msg = error_of<DataLoss>([&] { SafetensorsFile::open(p); });
  EXPECT_NE(msg.find(p), std::string::npos) << msg;
  EXPECT_NE(msg.find("not valid JSON"), std::string::npos) << msg;

  // Header length claims more bytes than the file has.
  p = path("pasteof.safetensors");
  {
    std::ofstream out(p, std::ios::binary);
    const uint64_t n = 1000;
    out.write(reinterpret_cast<const char*>(&n), 8);
    out << "{}";
  }
  msg = error_of<DataLoss>([&] { SafetensorsFile::open(p); });
  EXPECT_NE(msg.find(p), std::string::npos) << msg;
  EXPECT_NE(msg.find("runs past the end of the file"), std::string::npos) << msg;

  // Shorter than the length field; and empty.
  p = path("tiny.safetensors");
  std::ofstream(p, std::ios::binary) << "abc";
  EXPECT_THROW(SafetensorsFile::open(p), DataLoss);
  p = path("zero.safetensors");
  std::ofstream(p, std::ios::binary).flush();
  EXPECT_THROW(SafetensorsFile::open(p), DataLoss);

  // JSON but not an object; entry missing a field; negative shape;
  // non-string metadata.
  EXPECT_THROW(SafetensorsFile::open(write_raw("arr.safetensors", "[1, 2]")), DataLoss);
  p = write_raw("nofield.safetensors", R"({"w": {"dtype": "F32", "shape": [1]}})", "1234");
  msg = error_of<DataLoss>([&] { SafetensorsFile::open(p); });
  EXPECT_NE(msg.find("'w'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("data_offsets"), std::string::npos) << msg;
  EXPECT_THROW(SafetensorsFile::open(write_raw(
                   "neg.safetensors",
                   R"({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}})", "1234")),
               DataLoss);
  EXPECT_THROW(
      SafetensorsFile::open(write_raw("meta.safetensors", R"({"__metadata__": {"a": 1}})")),
      DataLoss);
}

TEST_F(SafetensorsTest, TruncatedDataNamesTheTensor) {
  const std::string p = path("trunc.safetensors");
  save_safetensors(p, {{"first", at::ones({8})}, {"last", at::ones({8})}});
  fs::resize_file(p, fs::file_size(p) - 5);
  const std::string msg = error_of<DataLoss>([&] { SafetensorsFile::open(p); });
  EXPECT_NE(msg.find(p), std::string::npos) << msg;
  EXPECT_NE(msg.find("'last'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("truncated"), std::string::npos) << msg;
}

TEST_F(SafetensorsTest, EveryTruncationAndCorruptByteIsATypedError) {
  const std::string p = path("src.safetensors");
  save_safetensors(p, {{"a", at::ones({3}, at::kHalf)}, {"b", at::arange(4, at::kInt)}},
                   {{"format", "pt"}});
  const std::string bytes = read_bytes(p);
  const std::string bad = path("bad.safetensors");
  // Every proper prefix loses bytes the header accounts for.
  for (size_t n = 0; n < bytes.size(); ++n) {
    std::ofstream(bad, std::ios::binary | std::ios::trunc) << bytes.substr(0, n);
    EXPECT_THROW(SafetensorsFile::open(bad), DataLoss) << "truncated to " << n;
  }
  // Any byte of the length field or header overwritten: a typed error or a
  // file that still validates, never a crash or a foreign exception.
  const uint64_t header_end = SafetensorsFile::open(p).data_offset();
  for (size_t i = 0; i < header_end; ++i) {
    for (char value : {'\0', '\xff', '9', '"', '}'}) {
      std::string corrupt = bytes;
      corrupt[i] = value;
      std::ofstream(bad, std::ios::binary | std::ios::trunc) << corrupt;
      try {
        auto file = SafetensorsFile::open(bad);
        for (const auto& t : file.tensors()) file.get(t.name).sum();
      } catch (const Error&) {
      }
    }
  }
}

TEST_F(SafetensorsTest, RangeErrorsAreDataLoss) {
  const std::string data(16, '\0');
  // Overlap: b starts inside a.
  std::string p = write_raw("overlap.safetensors",
                            R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
                            data.substr(0, 12));
  std::string msg = error_of<DataLoss>([&] { SafetensorsFile::open(p); });
  EXPECT_NE(msg.find(p), std::string::npos) << msg;
  EXPECT_NE(msg.find("'b'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("overlaps tensor 'a'"), std::string::npos) << msg;

  // Byte length disagrees with dtype and shape.
  p = write_raw("len.safetensors",
                R"({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})",
                data.substr(0, 8));
  msg = error_of<DataLoss>([&] { SafetensorsFile::open(p); });
  EXPECT_NE(msg.find("'w'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("need 12"), std::string::npos) << msg;

  // A gap, and trailing bytes, are rejected as the reference does.
  EXPECT_THROW(
      SafetensorsFile::open(write_raw(
          "gap.safetensors", R"({"w": {"dtype": "U8", "shape": [4], "data_offsets": [4, 8]}})",
          data.substr(0, 8))),
      DataLoss);
  EXPECT_THROW(
      SafetensorsFile::open(write_raw(
          "trail.safetensors", R"({"w": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}})",
          data.substr(0, 8))),
      DataLoss);
  // Offsets reversed; shape whose byte count overflows.
  EXPECT_THROW(SafetensorsFile::open(write_raw(
                   "rev.safetensors",
                   R"({"w": {"dtype": "U8", "shape": [0], "data_offsets": [4, 0]}})", "")),
               DataLoss);
  EXPECT_THROW(
      SafetensorsFile::open(write_raw(
          "huge.safetensors",
          R"({"w": {"dtype": "F64", "shape": [4294967296, 4294967296], "data_offsets": [0, 0]}})",
          "")),
      DataLoss);
}

TEST_F(SafetensorsTest, DtypeErrors) {
  std::string p =
      write_raw("u16.safetensors",
                R"({"w": {"dtype": "U16", "shape": [2], "data_offsets": [0, 4]}})", "abcd");
  std::string msg = error_of<InvalidArgument>([&] { SafetensorsFile::open(p); });
  EXPECT_NE(msg.find("'w'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("U16"), std::string::npos) << msg;
  p = write_raw("junk.safetensors",
                R"({"w": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 4]}})", "abcd");
  EXPECT_THROW(SafetensorsFile::open(p), DataLoss);
  // Writing a dtype the format cannot hold is the caller's mistake.
  EXPECT_THROW(save_safetensors(path("c.safetensors"), {{"c", at::zeros({2}, at::kComplexFloat)}}),
               InvalidArgument);
  EXPECT_THROW(
      save_safetensors(path("d.safetensors"), {{"x", at::zeros({1})}, {"x", at::zeros({1})}}),
      InvalidArgument);
  EXPECT_THROW(save_safetensors(path("e.safetensors"), {{"__metadata__", at::zeros({1})}}),
               InvalidArgument);
}

TEST_F(SafetensorsTest, FailedSaveLeavesOldFileAndNoTemporary) {
  const std::string p = path("keep.safetensors");
  save_safetensors(p, {{"w", at::ones({3})}});
  // A meta tensor has no bytes to copy: the save fails after the temporary
  // file was created and partly written, as a failing device copy would.
  EXPECT_THROW(save_safetensors(p, {{"w", at::zeros({3})}, {"m", at::empty({2}, at::kMeta)}}),
               Error);
  EXPECT_TRUE(at::equal(SafetensorsFile::open(p).get("w"), at::ones({3})));
  // Overwriting replaces the file, and only the file remains.
  save_safetensors(p, {{"w", at::full({3}, 2.0)}});
  EXPECT_TRUE(at::equal(SafetensorsFile::open(p).get("w"), at::full({3}, 2.0)));
  EXPECT_EQ(std::distance(fs::directory_iterator(dir_), fs::directory_iterator()), 1);
  // A directory that does not exist: NotFound, nothing created.
  EXPECT_THROW(save_safetensors(path("no/such/dir/x.safetensors"), {{"w", at::ones({1})}}),
               NotFound);
}

TEST_F(SafetensorsTest, ShardedFolderRoundTrip) {
  NamedTensors tensors;
  for (int i = 0; i < 7; ++i) {
    tensors.emplace_back("layers." + std::to_string(i) + ".weight",
                         at::full({10}, static_cast<float>(i)));  // 40 bytes each
  }
  tensors.emplace_back("big", at::arange(50, at::kFloat));  // 200 bytes > limit
  tensors.emplace_back("tail", at::ones({2}, at::kHalf));
  const std::string dir = path("model");
  save_safetensors_folder(dir, tensors, /*max_shard_bytes=*/100);

  // 40+40 | 40+40 | 40+40 | 40 | 200 | 4  -> 6 shards.
  const std::string index_text = read_bytes((fs::path(dir) / kSafetensorsIndexFile).string());
  auto index = nlohmann::json::parse(index_text);
  EXPECT_EQ(index["metadata"]["total_size"], 7 * 40 + 200 + 4);
  EXPECT_EQ(index["weight_map"]["layers.0.weight"], "model-00001-of-00006.safetensors");
  EXPECT_EQ(index["weight_map"]["layers.2.weight"], "model-00002-of-00006.safetensors");
  EXPECT_EQ(index["weight_map"]["big"], "model-00005-of-00006.safetensors");
  EXPECT_EQ(index["weight_map"]["tail"], "model-00006-of-00006.safetensors");
  EXPECT_FALSE(fs::exists(fs::path(dir) / kSafetensorsSingleFile));

  auto folder = SafetensorsFolder::open(dir);
  EXPECT_TRUE(folder.sharded());
  EXPECT_EQ(folder.names().size(), tensors.size());
  for (const auto& [name, expected] : tensors) {
    EXPECT_TRUE(at::equal(folder.get(name), expected)) << name;
  }
  EXPECT_EQ(folder.shard_of("big").metadata().at("format"), "pt");
  EXPECT_NO_THROW(folder.get("tail", at::kHalf, {2}));
  EXPECT_THROW(folder.get("tail", at::kFloat, {2}), InvalidArgument);

  const std::string msg = error_of<NotFound>([&] { folder.get("lm_head.weight"); });
  EXPECT_NE(msg.find("'lm_head.weight'"), std::string::npos) << msg;
  EXPECT_NE(msg.find(kSafetensorsIndexFile), std::string::npos) << msg;

  // Re-saving so that it fits in one file leaves a single model.safetensors
  // and removes the old index and shards.
  save_safetensors_folder(dir, {{"only", at::ones({1})}}, 1 << 20);
  EXPECT_EQ(std::distance(fs::directory_iterator(dir), fs::directory_iterator()), 1);
  auto single = SafetensorsFolder::open(dir);
  EXPECT_FALSE(single.sharded());
  EXPECT_EQ(single.file_of("only"), kSafetensorsSingleFile);
  EXPECT_TRUE(at::equal(single.get("only"), at::ones({1})));
  const std::string msg2 = error_of<NotFound>([&] { single.get("w"); });
  EXPECT_NE(msg2.find(kSafetensorsSingleFile), std::string::npos) << msg2;
}

TEST_F(SafetensorsTest, FolderIndexErrors) {
  const std::string dir = path("bad");
  EXPECT_THROW(SafetensorsFolder::open(dir), NotFound);
  fs::create_directories(dir);
  const std::string index = (fs::path(dir) / kSafetensorsIndexFile).string();
  save_safetensors((fs::path(dir) / "a.safetensors").string(), {{"x", at::ones({1})}});

  // The index lists a tensor its shard does not hold.
  std::ofstream(index)
      << R"({"metadata": {"total_size": 4}, "weight_map": {"x": "a.safetensors", "y": "a.safetensors"}})";
  auto folder = SafetensorsFolder::open(dir);
  EXPECT_TRUE(at::equal(folder.get("x"), at::ones({1})));
  std::string msg = error_of<NotFound>([&] { folder.get("y"); });
  EXPECT_NE(msg.find("'y'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("a.safetensors"), std::string::npos) << msg;

  // A missing shard fails at open, naming it.
  std::ofstream(index) << R"({"weight_map": {"x": "missing.safetensors"}})";
  msg = error_of<NotFound>([&] { SafetensorsFolder::open(dir); });
  EXPECT_NE(msg.find("missing.safetensors"), std::string::npos) << msg;

  // Paths outside the folder and malformed JSON are corrupt indexes.
  std::ofstream(index) << R"({"weight_map": {"x": "../a.safetensors"}})";
  EXPECT_THROW(SafetensorsFolder::open(dir), DataLoss);
  std::ofstream(index) << R"({"weight_map": )";
  EXPECT_THROW(SafetensorsFolder::open(dir), DataLoss);
}

// Cross-check with the reference implementation in the project's Python
// environment (build/pyenv: PyPI's safetensors over Debian's python3-torch).
TEST_F(SafetensorsTest, CrossCheckWithPythonSafetensors) {
  const std::string python = TESSERA_PYTHON;
  TESSERA_REQUIRE_INSTALLED(
      std::system((python + " -c 'import safetensors.torch, torch' >/dev/null 2>&1").c_str()) == 0,
      python + " with safetensors and torch");
  const std::string ours = path("ours.safetensors");
  const std::string theirs = path("theirs.safetensors");
  save_safetensors(ours, every_dtype(), {{"format", "pt"}});
  const std::string script = path("check.py");
  std::ofstream(script) << R"(
import sys, torch
from safetensors.torch import load_file, save_file
t = load_file(sys.argv[1])
assert t["transposed"].equal(torch.arange(12, dtype=torch.float32).view(3, 4).t()), "transposed"
assert t["scalar"].dim() == 0 and t["empty"].shape == (0, 4) and t["bf16"].dtype == torch.bfloat16
save_file({"a": torch.arange(6, dtype=torch.bfloat16).view(2, 3), "b": torch.tensor(True)},
          sys.argv[2], metadata={"k": "v"})
)";
  ASSERT_EQ(std::system((python + " " + script + " " + ours + " " + theirs).c_str()), 0);
  auto file = SafetensorsFile::open(theirs);
  EXPECT_TRUE(at::equal(file.get("a", at::kBFloat16, {2, 3}),
                        at::arange(6, at::kFloat).view({2, 3}).to(at::kBFloat16)));
  EXPECT_TRUE(file.get("b", at::kBool, {}).item<bool>());
  EXPECT_EQ(file.metadata().at("k"), "v");
}

// Regression (the bug fuzz/sim_cluster_fuzz.cpp found in sim's JSON reader,
// present here too): a number too large for a double in the header (or in a
// folder's index) escaped as nlohmann's out_of_range.406 instead of DataLoss.
TEST_F(SafetensorsTest, FuzzNumberTooLargeForADoubleIsDataLoss) {
  EXPECT_THROW(SafetensorsFile::open(write_raw(
                   "big.safetensors",
                   R"({"w": {"dtype": "F32", "shape": [1e999], "data_offsets": [0, 4]}})", "1234")),
               DataLoss);
  std::ofstream(path(kSafetensorsIndexFile))
      << R"({"metadata": {"total_size": 1e999}, "weight_map": {}})";
  EXPECT_THROW(SafetensorsFolder::open(dir_.string()), DataLoss);
}

// Regression (found by fuzz/safetensors_fuzz.cpp): an empty tensor whose
// bytes are not aligned to its element size took the copying path, which
// called memcpy with the null data pointer of the empty copy (undefined
// behaviour; the asan preset's UBSan reports it).
TEST_F(SafetensorsTest, FuzzMisalignedEmptyTensorIsReadWithoutMemcpyFromNull) {
  // Header padded to a multiple of 4 bytes: the data section starts 4-byte
  // aligned, so "e" (after the 1-byte "a") is misaligned for float32.
  std::string header = R"({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},)"
                       R"( "e": {"dtype": "F32", "shape": [0, 3], "data_offsets": [1, 1]}})";
  header.append((4 - header.size() % 4) % 4, ' ');
  const auto file = SafetensorsFile::open(write_raw("empty.safetensors", header, "x"));
  const at::Tensor e = file.get("e", at::kFloat, {0, 3});
  EXPECT_EQ(e.numel(), 0);
  EXPECT_EQ(file.get("a").item<uint8_t>(), 'x');
}

}  // namespace
}  // namespace tessera::nn
