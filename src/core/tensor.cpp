#include "tessera/core/tensor.h"

#include <ATen/Context.h>
#include <c10/core/ScalarType.h>
#include <torch/cuda.h>

#include <algorithm>
#include <cctype>
#include <sstream>

#include "tessera/core/error.h"

namespace tessera {

std::string dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return "float32";
    case at::kDouble:
      return "float64";
    case at::kHalf:
      return "float16";
    case at::kBFloat16:
      return "bfloat16";
    case at::kByte:
      return "uint8";
    case at::kChar:
      return "int8";
    case at::kShort:
      return "int16";
    case at::kInt:
      return "int32";
    case at::kLong:
      return "int64";
    case at::kBool:
      return "bool";
    default:
      return c10::toString(dtype);
  }
}

at::ScalarType parse_dtype(std::string_view name) {
  std::string lower(name);
  std::transform(lower.begin(), lower.end(), lower.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  if (lower == "float32" || lower == "float" || lower == "f32" || lower == "fp32")
    return at::kFloat;
  if (lower == "float64" || lower == "double" || lower == "f64") return at::kDouble;
  if (lower == "float16" || lower == "half" || lower == "f16" || lower == "fp16") return at::kHalf;
  if (lower == "bfloat16" || lower == "bf16") return at::kBFloat16;
  if (lower == "uint8" || lower == "u8") return at::kByte;
  if (lower == "int8" || lower == "i8") return at::kChar;
  if (lower == "int16" || lower == "i16") return at::kShort;
  if (lower == "int32" || lower == "i32" || lower == "int") return at::kInt;
  if (lower == "int64" || lower == "i64" || lower == "long") return at::kLong;
  if (lower == "bool") return at::kBool;
  TESSERA_THROW(InvalidArgument, "unknown dtype '", name, "'");
}

size_t dtype_size(at::ScalarType dtype) { return c10::elementSize(dtype); }

bool cuda_available() { return at::hasCUDA() && torch::cuda::device_count() > 0; }

at::Device parse_device(std::string_view name) {
  std::string text(name);
  if (text == "cpu") return at::Device(at::kCPU);
  if (text.rfind("cuda", 0) == 0) {
    TESSERA_CHECK(cuda_available(), InvalidArgument, "device '", text,
                  "' requested but this build of LibTorch or this machine has no CUDA device");
    int index = 0;
    if (text.size() > 4) {
      TESSERA_CHECK(
          text[4] == ':' && text.size() > 5 && std::all_of(text.begin() + 5, text.end(), ::isdigit),
          InvalidArgument, "malformed device '", text, "' (expected cuda or cuda:N)");
      index = std::stoi(text.substr(5));
    }
    return at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(index));
  }
  TESSERA_THROW(InvalidArgument, "unknown device '", text, "' (expected cpu, cuda or cuda:N)");
}

int64_t tensor_bytes(const at::Tensor& t) {
  return t.numel() * static_cast<int64_t>(t.element_size());
}

std::string shape_string(at::IntArrayRef shape) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << "]";
  return out.str();
}

void check_shape(const at::Tensor& t, at::IntArrayRef expected, std::string_view what) {
  TESSERA_CHECK(t.sizes() == expected, InvalidArgument, what, ": expected shape ",
                shape_string(expected), ", got ", shape_string(t.sizes()));
}

void check_dtype(const at::Tensor& t, at::ScalarType expected, std::string_view what) {
  TESSERA_CHECK(t.scalar_type() == expected, InvalidArgument, what, ": expected dtype ",
                dtype_name(expected), ", got ", dtype_name(t.scalar_type()));
}

}  // namespace tessera
