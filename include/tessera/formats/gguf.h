// tessera/formats/gguf.h — read GGUF files (llama.cpp's format) and write small
// ones.
//
// A GGUF file is a header ("GGUF", version, counts), typed key/value
// metadata, a table of tensor infos (name, dims, ggml type, offset) and an
// aligned data section holding each tensor, possibly block-quantised.
// GgufFile maps the file, validates every structure against the file size,
// and dequantises tensors to float32 on request.
//
//   auto gguf = tessera::nn::GgufFile::open("SmolLM2-135M-Instruct.Q4_1.gguf");
//   std::string arch = gguf.get_string("general.architecture");   // "llama"
//   int64_t layers = gguf.get_int(arch + ".block_count");
//   at::Tensor wq = gguf.load("blk.0.attn_q.weight");   // float32 [576, 576]
//
// Shapes are reported in PyTorch order: GGUF lists dimensions fastest-first
// (ne[0] is the row length), so a tensor with GGUF dims [576, 1536] is
// [1536, 576] here, and its bytes are already row-major in that order.
//
// Errors: DataLoss for a truncated or corrupt file, naming the file and the
// structure at fault; InvalidArgument for a file that is not GGUF (bad
// magic), an unsupported version, a tensor type load() cannot dequantise,
// or a metadata value of another type than the getter reads; NotFound for a
// missing file, key or tensor.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace tessera::nn {

// Type of a metadata value (gguf_type); the numbering is the file format's.
enum class GgufType : uint32_t {
  kUint8 = 0,
  kInt8 = 1,
  kUint16 = 2,
  kInt16 = 3,
  kUint32 = 4,
  kInt32 = 5,
  kFloat32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kUint64 = 10,
  kInt64 = 11,
  kFloat64 = 12,
};
// "uint8", ..., "array"; "type<N>" for numbers outside the enum.
std::string gguf_type_name(GgufType type);

// Storage type of a tensor (ggml_type); the numbering is ggml's. Only those
// this module reads or writes are named; others are still listed by
// GgufFile::tensors() with their raw number.
enum class GgmlType : uint32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ8_0 = 8,
  kBF16 = 30,
};
// ggml's name ("F32", "Q4_1", "Q6_K", "IQ2_XS", ...), "type<N>" if unknown.
std::string ggml_type_name(GgmlType type);

struct GgufTensorInfo {
  std::string name;
  GgmlType type = GgmlType::kF32;
  std::vector<int64_t> shape;  // PyTorch order: GGUF's dims reversed
  uint64_t offset = 0;         // absolute byte offset of the data in the file
  uint64_t nbytes = 0;         // stored (possibly quantised) size
};

// An open, validated GGUF file (versions 2 and 3, little-endian).
//
// Immutable after open(); every method is thread-safe. Copies are cheap and
// share one read-only mapping. Metadata values are decoded from the mapping
// on each call, so big arrays (a 50k-entry vocabulary) cost nothing until
// asked for.
class GgufFile {
 public:
  // Maps `path` and validates the header, every key/value (types, lengths,
  // no duplicate keys, no nested arrays, as ggml), the alignment
  // ("general.alignment", a power of two, default 32) and every tensor info
  // (at most 4 dims, row length a multiple of the type's block size,
  // offset aligned and data inside the file, no overlaps).
  // NotFound if the file cannot be opened; InvalidArgument if it does not
  // start with "GGUF" or has a version other than 2 or 3; DataLoss if it is
  // truncated or corrupt, naming the file and what could not be read.
  static GgufFile open(const std::string& path);

  const std::string& path() const;
  uint32_t version() const;
  uint64_t alignment() const;
  // Byte offset of the data section in the file.
  uint64_t data_offset() const;

  // Metadata keys in file order.
  std::vector<std::string> keys() const;
  bool has(const std::string& key) const;
  // Type of a value; for arrays, kArray, and array_type() gives the element
  // type. NotFound for a missing key; array_type() throws InvalidArgument
  // for a value that is not an array.
  GgufType type(const std::string& key) const;
  GgufType array_type(const std::string& key) const;
  // Number of elements of an array value, without decoding them.
  uint64_t array_size(const std::string& key) const;

  // Typed getters. NotFound naming the file and key when missing;
  // InvalidArgument naming the key, the requested and the stored type on a
  // mismatch. get_int accepts every integer type and throws InvalidArgument
  // for a uint64 above INT64_MAX; get_float accepts float32 and float64.
  std::string get_string(const std::string& key) const;
  int64_t get_int(const std::string& key) const;
  double get_float(const std::string& key) const;
  bool get_bool(const std::string& key) const;
  std::vector<std::string> get_string_array(const std::string& key) const;
  std::vector<int64_t> get_int_array(const std::string& key) const;
  std::vector<double> get_float_array(const std::string& key) const;

  // Tensor infos in file order.
  const std::vector<GgufTensorInfo>& tensors() const;
  bool has_tensor(const std::string& name) const;
  // NotFound naming the file and tensor when missing.
  const GgufTensorInfo& tensor_info(const std::string& name) const;

  // A new contiguous float32 CPU tensor of tensor_info(name).shape, with the
  // stored values converted: F32 copied, F16 and BF16 widened exactly, Q8_0,
  // Q4_0 and Q4_1 dequantised bit-exactly as ggml's reference
  // dequantize_row_* functions do (fp16 scales widened, then one multiply
  // and, for Q4_1, one add, in float32). Parallel over blocks with
  // at::parallel_for. InvalidArgument naming the type and tensor for any
  // other type; NotFound for a missing tensor.
  at::Tensor load(const std::string& name) const;

 private:
  struct Impl;
  explicit GgufFile(std::shared_ptr<const Impl> impl);
  std::shared_ptr<const Impl> impl_;
};

// Builds a GGUF (version 3) file in memory and writes it atomically; meant
// for tests and small exports, since every tensor is held until write().
//
//   tessera::nn::GgufWriter w;
//   w.add_string("general.architecture", "llama");
//   w.add_uint32("llama.block_count", 2);
//   w.add_tensor("blk.0.attn_q.weight", wq, tessera::nn::GgmlType::kQ4_1);
//   w.write("tiny.gguf");
//
// Not thread-safe. Keys and tensor names must be unique (InvalidArgument).
class GgufWriter {
 public:
  // `alignment` of tensor data, a power of two; written as
  // "general.alignment" when it differs from GGUF's default of 32.
  explicit GgufWriter(uint32_t alignment = 32);

  void add_uint8(const std::string& key, uint8_t value);
  void add_int8(const std::string& key, int8_t value);
  void add_uint16(const std::string& key, uint16_t value);
  void add_int16(const std::string& key, int16_t value);
  void add_uint32(const std::string& key, uint32_t value);
  void add_int32(const std::string& key, int32_t value);
  void add_uint64(const std::string& key, uint64_t value);
  void add_int64(const std::string& key, int64_t value);
  void add_float32(const std::string& key, float value);
  void add_float64(const std::string& key, double value);
  void add_bool(const std::string& key, bool value);
  void add_string(const std::string& key, const std::string& value);
  // Arrays; the element type follows the vector's.
  void add_array(const std::string& key, const std::vector<uint8_t>& values);
  void add_array(const std::string& key, const std::vector<int8_t>& values);
  void add_array(const std::string& key, const std::vector<uint16_t>& values);
  void add_array(const std::string& key, const std::vector<int16_t>& values);
  void add_array(const std::string& key, const std::vector<uint32_t>& values);
  void add_array(const std::string& key, const std::vector<int32_t>& values);
  void add_array(const std::string& key, const std::vector<uint64_t>& values);
  void add_array(const std::string& key, const std::vector<int64_t>& values);
  void add_array(const std::string& key, const std::vector<float>& values);
  void add_array(const std::string& key, const std::vector<double>& values);
  void add_array(const std::string& key, const std::vector<bool>& values);
  void add_array(const std::string& key, const std::vector<std::string>& values);

  // Stores `tensor` (any floating dtype, any device; shape in PyTorch order,
  // 1 to 4 dims) as `type`: F32, F16, BF16 (rounded to nearest even), or
  // Q8_0 / Q4_0 / Q4_1 quantised with ggml's reference quantize_row_*_ref,
  // which needs the last dimension to be a multiple of 32. InvalidArgument
  // otherwise, naming the tensor.
  void add_tensor(const std::string& name, const at::Tensor& tensor, GgmlType type);
  // Stores already-encoded bytes as they are, for hand-made blocks in tests.
  // `shape` is in PyTorch order; `bytes` must be exactly the size `type`
  // needs for it (InvalidArgument otherwise).
  void add_raw_tensor(const std::string& name, GgmlType type, const std::vector<int64_t>& shape,
                      std::vector<uint8_t> bytes);

  // Writes the file atomically (temporary file, fsync, rename), like
  // save_safetensors; errors likewise. The writer can be written again.
  void write(const std::string& path) const;

 private:
  struct PendingTensor {
    std::string name;
    GgmlType type;
    std::vector<int64_t> shape;  // PyTorch order
    std::vector<uint8_t> bytes;
  };
  void add_key(const std::string& key, GgufType type, std::vector<uint8_t> encoded);

  uint32_t alignment_;
  std::vector<std::string> keys_;                 // in insertion order
  std::vector<std::vector<uint8_t>> kv_encoded_;  // key + type + value, ready to write
  std::vector<PendingTensor> tensors_;
};

}  // namespace tessera::nn
