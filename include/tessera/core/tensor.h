// tessera/core/tensor.h — dtype and device helpers over at::Tensor.
//
// Names follow Hugging Face / safetensors spelling where one exists
// ("F32", "BF16") and PyTorch's otherwise ("float32", "bfloat16"); parsing
// accepts both. Every function is thread-safe.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace tessera {

// "float32", "bfloat16", "int64", ... (PyTorch's names).
std::string dtype_name(at::ScalarType dtype);
// Accepts PyTorch names ("float32", "float", "bf16", "bfloat16", "half") and
// safetensors names ("F32", "BF16", "F16", "I64", "U8", "BOOL").
// InvalidArgument names the text otherwise.
at::ScalarType parse_dtype(std::string_view name);
size_t dtype_size(at::ScalarType dtype);

// "cpu", "cuda", "cuda:1". InvalidArgument for anything else, and for a CUDA
// device when this LibTorch or machine has no CUDA.
at::Device parse_device(std::string_view name);
bool cuda_available();

// Bytes held by the tensor's elements (numel * element size).
int64_t tensor_bytes(const at::Tensor& t);

// "[2, 3, 4]".
std::string shape_string(at::IntArrayRef shape);

// Throws InvalidArgument "<what>: expected shape [..], got [..]".
void check_shape(const at::Tensor& t, at::IntArrayRef expected, std::string_view what);
// Throws InvalidArgument "<what>: expected dtype X, got Y".
void check_dtype(const at::Tensor& t, at::ScalarType expected, std::string_view what);

}  // namespace tessera
