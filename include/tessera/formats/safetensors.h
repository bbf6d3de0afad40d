// tessera/formats/safetensors.h — read and write safetensors files and the sharded
// folders Hugging Face writes.
//
// A safetensors file is an 8-byte little-endian header length N, N bytes of
// JSON describing every tensor ({"w": {"dtype": "F32", "shape": [2, 3],
// "data_offsets": [0, 24]}, "__metadata__": {"k": "v"}}), then the tensor
// bytes, packed without gaps. SafetensorsFile maps the file and hands out
// tensors that view the mapped bytes, so opening a multi-gigabyte checkpoint
// costs a header parse and tensors are paged in only when touched.
//
//   auto file = tessera::nn::SafetensorsFile::open("model.safetensors");
//   at::Tensor w = file.get("lm_head.weight", at::kBFloat16, {32000, 4096});
//
//   tessera::nn::save_safetensors("out.safetensors", {{"w", w}}, {{"format", "pt"}});
//
//   auto folder = tessera::nn::SafetensorsFolder::open("Llama-3-8B/");
//   at::Tensor q = folder.get("model.layers.0.self_attn.q_proj.weight");
//
// Errors: DataLoss for a corrupt or truncated file (the message names the
// file and, where one is at fault, the tensor), NotFound for a missing file
// or tensor, InvalidArgument for a request the file cannot satisfy (wrong
// dtype or shape, an unsupported dtype). Malformed input never crashes the
// process, with one exception inherent to mmap: if another process truncates
// a file while it is mapped, touching the lost pages raises SIGBUS.
//
// Supported dtypes: F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL.
// Assumes a little-endian host, as safetensors does.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace tessera::nn {

// Tensors to save, in the caller's order. Names must be unique and non-empty.
using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

// One entry of a safetensors header.
struct SafetensorsTensorInfo {
  std::string name;
  at::ScalarType dtype = at::kFloat;
  std::vector<int64_t> shape;  // [] for a 0-d tensor
  // [data_begin, data_end) within the data section, which starts at
  // SafetensorsFile::data_offset() bytes into the file.
  uint64_t data_begin = 0;
  uint64_t data_end = 0;
};

// An open, validated safetensors file.
//
// Immutable after open(); every method is thread-safe. Copies are cheap and
// share one mapping, which lives until the last copy and the last tensor
// returned by get() are gone.
class SafetensorsFile {
 public:
  // Maps `path` read-only and validates the whole header: header length
  // within the file (and at most 100 MB, the reference limit), well-formed
  // JSON object, each entry with a supported dtype, a non-negative shape and
  // data_offsets whose length is numel * element size, ranges that neither
  // overlap nor leave gaps and exactly cover the data section (as the
  // reference implementation requires), and "__metadata__", if present, a
  // map of strings. Tensor bytes themselves are not read.
  // NotFound if the file cannot be opened; DataLoss if it is corrupt or
  // truncated; InvalidArgument for a dtype this reader does not support.
  static SafetensorsFile open(const std::string& path);

  const std::string& path() const;
  // Byte offset of the data section in the file (8 + header length).
  uint64_t data_offset() const;

  // Every tensor, in data order (ascending data_begin).
  const std::vector<SafetensorsTensorInfo>& tensors() const;
  bool contains(const std::string& name) const;
  // NotFound naming the file and the tensor when missing.
  const SafetensorsTensorInfo& info(const std::string& name) const;

  // A contiguous CPU tensor viewing the mapped bytes (no copy). The mapping
  // is read-only: writing into the tensor in place (w.add_(1), w.copy_(x))
  // kills the process with SIGSEGV, so clone() a tensor that must change.
  // (A writable private mapping would make that safe, but the kernel charges
  // it against the commit limit and refuses checkpoints larger than RAM.)
  // Reading pages the file no longer has (it was truncated by another
  // process after open) raises SIGBUS. The one exception to
  // zero-copy is a tensor whose bytes are not aligned to its element size
  // (possible only in files from writers that ignore the reference layout);
  // it is copied so that kernels never see a misaligned pointer.
  // NotFound naming the file and the tensor when missing.
  at::Tensor get(const std::string& name) const;
  // get(name) after checking dtype and shape; InvalidArgument naming the
  // file, the tensor, and what was expected and found on a mismatch.
  at::Tensor get(const std::string& name, at::ScalarType expected_dtype,
                 at::IntArrayRef expected_shape) const;

  // The "__metadata__" map; empty when the header has none.
  const std::map<std::string, std::string>& metadata() const;

 private:
  struct Impl;
  explicit SafetensorsFile(std::shared_ptr<const Impl> impl);
  std::shared_ptr<const Impl> impl_;
};

// Writes `tensors` and `metadata` as a safetensors file at `path`.
//
// Layout follows the reference writer: the header JSON is padded with spaces
// to a multiple of 8 bytes, and tensor data is ordered by descending element
// size (stable within equal sizes), so every tensor starts aligned to its
// element size. Tensors may live on any device and be non-contiguous; they
// are copied to CPU one at a time, so peak extra memory is one tensor.
//
// Atomic: the bytes go to "<path>.tmp.<pid>", which is fsynced and renamed
// over `path`, and the directory is fsynced; a crash leaves either the old
// file or the new one, never a partial one (the temporary file is removed
// on failure). Not safe to call for the same path from two threads of one
// process (they would share the temporary name). InvalidArgument for
// duplicate or empty names, the reserved name "__metadata__", an unsupported
// dtype or layout; for I/O failures, an error naming the path and the errno
// text whose code follows the errno: NotFound (missing directory),
// ResourceExhausted (disk full, quota), InvalidArgument (permission denied,
// read-only file system), Internal otherwise, also for a failing copy of a
// tensor to CPU.
void save_safetensors(const std::string& path, const NamedTensors& tensors,
                      const std::map<std::string, std::string>& metadata = {});

// File names Hugging Face uses in a checkpoint folder.
inline constexpr const char* kSafetensorsSingleFile = "model.safetensors";
inline constexpr const char* kSafetensorsIndexFile = "model.safetensors.index.json";

// A checkpoint folder: either "model.safetensors.index.json" ({"metadata":
// {"total_size": N}, "weight_map": {tensor: shard file}}) with its shards, or
// a single "model.safetensors". The index wins when both exist.
//
// Immutable after open(); thread-safe; copies share the open shards.
class SafetensorsFolder {
 public:
  // Opens and validates the index (if any) and every shard it names, up
  // front, so a missing or corrupt shard fails here rather than mid-load.
  // NotFound if `dir` has neither file or a shard named by the index is
  // missing; DataLoss for a malformed index or shard.
  static SafetensorsFolder open(const std::string& dir);

  const std::string& dir() const;
  // True when the folder is sharded (has an index).
  bool sharded() const;
  // Tensor names, sorted.
  std::vector<std::string> names() const;
  bool contains(const std::string& name) const;
  // The shard file name (relative to dir) that holds `name`; NotFound.
  const std::string& file_of(const std::string& name) const;
  // The open shard that holds `name`; NotFound.
  const SafetensorsFile& shard_of(const std::string& name) const;

  // As SafetensorsFile::get. NotFound names the tensor and the index (or
  // single file) where it was looked up, and, when the index lists it but
  // the shard lacks it, that shard.
  at::Tensor get(const std::string& name) const;
  at::Tensor get(const std::string& name, at::ScalarType expected_dtype,
                 at::IntArrayRef expected_shape) const;

 private:
  struct Impl;
  explicit SafetensorsFolder(std::shared_ptr<const Impl> impl);
  std::shared_ptr<const Impl> impl_;
};

// Writes `tensors` into `dir` (created if missing) the way Hugging Face
// does: tensors are packed in the given order into shards of at most
// `max_shard_bytes` of tensor data (a tensor larger than that gets a shard
// of its own), named "model-00001-of-00003.safetensors", plus
// "model.safetensors.index.json". When everything fits in one shard the
// result is a single "model.safetensors" and no index, as in transformers.
//
// Every shard carries `metadata` plus "format": "pt" unless `metadata` sets
// "format" (transformers rejects shards without it). Each file is written
// atomically and the index last, so a reader never sees an index naming a
// shard that is not complete. Afterwards, files of an earlier save that the
// new layout no longer uses (an old index, single file or shards named
// model-*-of-*.safetensors) are removed. Errors as save_safetensors;
// InvalidArgument when max_shard_bytes is 0.
void save_safetensors_folder(const std::string& dir, const NamedTensors& tensors,
                             uint64_t max_shard_bytes,
                             const std::map<std::string, std::string>& metadata = {});

}  // namespace tessera::nn
