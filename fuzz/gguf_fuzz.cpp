// Fuzz target: GGUF files (tessera::nn::GgufFile, read_gguf_model).
//
// Input: the bytes of a .gguf file, written to a scratch file and opened
// from there. A file that opens must answer every metadata getter that
// matches a key's type, and load every tensor of a type load() reads
// (F32, F16, BF16, Q8_0, Q4_0, Q4_1) as float32 of the listed shape (F32
// bit for bit). Then the model reader runs (read_gguf_model: llama
// hyperparameters, byte-level BPE tokenizer, weights renamed and
// unpermuted); a model it returns must give a tokenizer that tokenizes.
#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>
#include <string>

#include "fuzz_common.h"
#include "tessera/formats/gguf.h"
#include "tessera/formats/hf.h"
#include "tessera/tokenizer/tokenizer.h"

namespace {

using tessera::nn::GgmlType;
using tessera::nn::GgufType;

tessera::fuzz::ScratchDir& scratch() {
  static tessera::fuzz::ScratchDir dir;
  return dir;
}

void read_value(const tessera::nn::GgufFile& f, const std::string& key) {
  switch (f.type(key)) {
    case GgufType::kString:
      f.get_string(key);
      break;
    case GgufType::kFloat32:
    case GgufType::kFloat64:
      f.get_float(key);
      break;
    case GgufType::kBool:
      f.get_bool(key);
      break;
    case GgufType::kArray: {
      const uint64_t n = f.array_size(key);
      switch (f.array_type(key)) {
        case GgufType::kString:
          tessera::fuzz::require(f.get_string_array(key).size() == n, "string array size");
          break;
        case GgufType::kFloat32:
        case GgufType::kFloat64:
          tessera::fuzz::require(f.get_float_array(key).size() == n, "float array size");
          break;
        case GgufType::kBool:
          break;
        default:
          // Integer arrays; a uint64 element above INT64_MAX is InvalidArgument.
          tessera::fuzz::expect_errors("get_int_array", [&] {
            tessera::fuzz::require(f.get_int_array(key).size() == n, "int array size");
          });
      }
      break;
    }
    default:
      tessera::fuzz::expect_errors("get_int", [&] { f.get_int(key); });
  }
}

bool loadable(GgmlType t) {
  return t == GgmlType::kF32 || t == GgmlType::kF16 || t == GgmlType::kBF16 ||
         t == GgmlType::kQ8_0 || t == GgmlType::kQ4_0 || t == GgmlType::kQ4_1;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = scratch().file("model.gguf");
  tessera::fuzz::write_file(path, std::string_view(reinterpret_cast<const char*>(data), size));
  tessera::fuzz::expect_errors("GgufFile", [&] {
    const auto file = tessera::nn::GgufFile::open(path);
    for (const std::string& key : file.keys()) read_value(file, key);
    for (const auto& info : file.tensors()) {
      if (!loadable(info.type)) continue;
      const at::Tensor t = file.load(info.name);
      tessera::fuzz::require(t.sizes().vec() == info.shape, "tensor '" + info.name + "': shape");
      tessera::fuzz::require(t.scalar_type() == at::kFloat,
                             "tensor '" + info.name + "': not float32");
      if (info.type == GgmlType::kF32) {
        tessera::fuzz::require(
            t.nbytes() == info.nbytes &&
                (t.nbytes() == 0 || std::memcmp(t.data_ptr(), data + info.offset, t.nbytes()) == 0),
            "tensor '" + info.name + "': F32 bytes changed");
      }
    }
  });
  tessera::fuzz::expect_errors("read_gguf_model", [&] {
    const auto model = tessera::nn::read_gguf_model(path);
    const auto tok = tessera::nn::Tokenizer::from_spec(model.tokenizer);
    tok.decode(tok.encode("Hello, world! 123 caf\xc3\xa9"));
  });
  return 0;
}
