// Fuzz target: safetensors files (tessera::nn::SafetensorsFile::open, get).
//
// Input: the bytes of a .safetensors file, written to a scratch file and
// opened from there (open() maps it). A file that opens must hand out every
// tensor it lists with that tensor's dtype, shape and byte count, readable
// to the last byte, and writing the tensors and metadata back with
// save_safetensors() must give a file that opens to the same names,
// dtypes, shapes, bytes and metadata.
#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>
#include <string>

#include "fuzz_common.h"
#include "tessera/formats/safetensors.h"

namespace {

tessera::fuzz::ScratchDir& scratch() {
  static tessera::fuzz::ScratchDir dir;
  return dir;
}

bool same_bytes(const at::Tensor& a, const at::Tensor& b) {
  return a.nbytes() == b.nbytes() &&
         (a.nbytes() == 0 || std::memcmp(a.data_ptr(), b.data_ptr(), a.nbytes()) == 0);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = scratch().file("model.safetensors");
  const std::string again_path = scratch().file("again.safetensors");
  tessera::fuzz::write_file(path, std::string_view(reinterpret_cast<const char*>(data), size));
  tessera::fuzz::expect_errors("SafetensorsFile", [&] {
    const auto file = tessera::nn::SafetensorsFile::open(path);
    tessera::nn::NamedTensors tensors;
    for (const auto& info : file.tensors()) {
      const at::Tensor t = file.get(info.name, info.dtype, info.shape);
      tessera::fuzz::require(t.nbytes() == info.data_end - info.data_begin,
                             "tensor '" + info.name + "': byte count differs from data_offsets");
      tensors.emplace_back(info.name, t.clone());  // reads every byte
    }
    tessera::nn::save_safetensors(again_path, tensors, file.metadata());
    const auto again = tessera::nn::SafetensorsFile::open(again_path);
    tessera::fuzz::require(again.metadata() == file.metadata(),
                           "metadata changed in the round trip");
    tessera::fuzz::require(again.tensors().size() == tensors.size(),
                           "tensor count changed in the round trip");
    for (const auto& [name, t] : tensors) {
      const at::Tensor back = again.get(name, t.scalar_type(), t.sizes());
      tessera::fuzz::require(same_bytes(back, t),
                             "tensor '" + name + "' changed in the round trip");
    }
  });
  return 0;
}
