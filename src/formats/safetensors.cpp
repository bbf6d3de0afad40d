#include "tessera/formats/safetensors.h"

#include <ATen/ATen.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <unordered_map>
#include <utility>

#include "tessera/core/error.h"
#include "tessera/core/file_io.h"
#include "tessera/core/tensor.h"

namespace tessera::nn {

namespace fs = std::filesystem;
using json = nlohmann::json;
using ordered_json = nlohmann::ordered_json;

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "safetensors stores little-endian bytes; a big-endian host would need byte swaps");

namespace {

// The reference implementation refuses headers above this size; a larger
// length field almost always means the file is not safetensors at all.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

// ---------------------------------------------------------------------------
// dtypes

struct DtypeName {
  const char* name;
  at::ScalarType dtype;
};
constexpr DtypeName kDtypes[] = {
    {"F64", at::kDouble}, {"F32", at::kFloat}, {"F16", at::kHalf},  {"BF16", at::kBFloat16},
    {"I64", at::kLong},   {"I32", at::kInt},   {"I16", at::kShort}, {"I8", at::kChar},
    {"U8", at::kByte},    {"BOOL", at::kBool},
};
// Defined by the format but with no LibTorch 1.13 dtype to view them as.
constexpr const char* kUnsupportedDtypes[] = {"U16",     "U32",     "U64",     "F8_E4M3", "F8_E5M2",
                                              "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4",      "C64"};

// Safetensors name of `dtype`, or nullptr when the format cannot hold it.
const char* safetensors_dtype_name(at::ScalarType dtype) {
  for (const auto& d : kDtypes) {
    if (d.dtype == dtype) return d.name;
  }
  return nullptr;
}

// Throws DataLoss prefixed with the file (and tensor, when given).
template <typename... Args>
[[noreturn]] void corrupt(const std::string& path, const std::string& tensor, Args&&... args) {
  std::string where = "safetensors file " + path;
  if (!tensor.empty()) where += ", tensor '" + tensor + "'";
  TESSERA_THROW(DataLoss, where, ": ", std::forward<Args>(args)...);
}

at::ScalarType parse_entry_dtype(const std::string& path, const std::string& name,
                                 const json& value) {
  if (!value.is_string()) corrupt(path, name, "\"dtype\" must be a string, got ", value.dump());
  const auto& text = value.get_ref<const std::string&>();
  for (const auto& d : kDtypes) {
    if (text == d.name) return d.dtype;
  }
  for (const char* unsupported : kUnsupportedDtypes) {
    TESSERA_CHECK(text != unsupported, InvalidArgument, "safetensors file ", path, ", tensor '",
                  name, "': dtype ", text, " is not supported by this reader");
  }
  corrupt(path, name, "unknown dtype '", text, "'");
}

// A JSON array of non-negative integers, as shape and data_offsets must be.
std::vector<uint64_t> parse_uint_array(const std::string& path, const std::string& name,
                                       const char* field, const json& value) {
  if (!value.is_array())
    corrupt(path, name, "\"", field, "\" must be an array, got ", value.dump());
  std::vector<uint64_t> out;
  out.reserve(value.size());
  for (const auto& v : value) {
    if (!v.is_number_unsigned()) {
      corrupt(path, name, "\"", field, "\" must hold non-negative integers, got ", value.dump());
    }
    out.push_back(v.get<uint64_t>());
  }
  return out;
}

std::string range_string(const SafetensorsTensorInfo& t) {
  return detail::concat("'", t.name, "' [", t.data_begin, ", ", t.data_end, ")");
}

// The steps of SafetensorsFile::open, in order; each throws DataLoss naming
// the file (and the tensor) at fault.

// The header: a little-endian u64 length, then that many bytes of JSON
// holding an object. Sets `data_offset` to where the data section starts.
json read_header(const std::string& path, const MappedFile& file, uint64_t& data_offset) {
  if (file.size() < 8) {
    corrupt(path, "", "file is ", file.size(), " bytes, too short for the 8-byte header length");
  }
  uint64_t header_len = 0;
  std::memcpy(&header_len, file.data(), 8);
  if (header_len > file.size() - 8) {
    corrupt(path, "", "header length ", header_len, " runs past the end of the file (", file.size(),
            " bytes); truncated or not a safetensors file");
  }
  if (header_len > kMaxHeaderBytes) {
    corrupt(path, "", "header length ", header_len, " exceeds the ", kMaxHeaderBytes,
            "-byte limit");
  }
  data_offset = 8 + header_len;

  json header;
  {
    const auto* begin = reinterpret_cast<const char*>(file.data()) + 8;
    try {
      header = json::parse(begin, begin + header_len);
    } catch (const json::exception& e) {
      // parse_error, or out_of_range for a number too large for a double.
      corrupt(path, "", "header is not valid JSON: ", e.what());
    }
  }
  if (!header.is_object())
    corrupt(path, "", "header must be a JSON object, got ", header.type_name());
  return header;
}

// The "__metadata__" entry: an object of strings, added to `metadata`.
void read_user_metadata(const std::string& path, const json& entry,
                        std::map<std::string, std::string>& metadata) {
  if (!entry.is_object()) corrupt(path, "", "\"__metadata__\" must be an object of strings");
  for (const auto& [key, value] : entry.items()) {
    if (!value.is_string()) {
      corrupt(path, "", "\"__metadata__\" value of '", key, "' must be a string, got ",
              value.dump());
    }
    metadata.emplace(key, value.get<std::string>());
  }
}

// Tensor `name`'s entry: dtype, shape and data_offsets, whose length must
// be what dtype and shape need and which must lie inside the data section
// of `data_size` bytes.
SafetensorsTensorInfo read_tensor_entry(const std::string& path, const std::string& name,
                                        const json& entry, uint64_t data_size) {
  if (!entry.is_object()) corrupt(path, name, "entry must be an object, got ", entry.dump());
  for (const char* field : {"dtype", "shape", "data_offsets"}) {
    if (!entry.contains(field)) corrupt(path, name, "entry has no \"", field, "\"");
  }
  SafetensorsTensorInfo info;
  info.name = name;
  info.dtype = parse_entry_dtype(path, name, entry["dtype"]);
  std::vector<uint64_t> shape = parse_uint_array(path, name, "shape", entry["shape"]);
  std::vector<uint64_t> offsets =
      parse_uint_array(path, name, "data_offsets", entry["data_offsets"]);
  if (offsets.size() != 2 || offsets[0] > offsets[1]) {
    corrupt(path, name, "\"data_offsets\" must be [begin, end] with begin <= end, got ",
            entry["data_offsets"].dump());
  }
  // numel * element size, refusing anything that does not fit in int64 so
  // that a hostile shape cannot wrap around and pass the length check.
  uint64_t bytes = dtype_size(info.dtype);
  for (uint64_t dim : shape) {
    if (dim > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      corrupt(path, name, "dimension ", dim, " is too large");
    }
    if (dim != 0 && bytes > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) / dim) {
      corrupt(path, name, "shape ", entry["shape"].dump(), " is too large");
    }
    bytes *= dim;
    info.shape.push_back(static_cast<int64_t>(dim));
  }
  info.data_begin = offsets[0];
  info.data_end = offsets[1];
  if (info.data_end - info.data_begin != bytes) {
    corrupt(path, name, "data_offsets [", info.data_begin, ", ", info.data_end, ") hold ",
            info.data_end - info.data_begin, " bytes but dtype ",
            safetensors_dtype_name(info.dtype), " and shape ", shape_string(info.shape), " need ",
            bytes);
  }
  if (info.data_end > data_size) {
    corrupt(path, name, "data [", info.data_begin, ", ", info.data_end,
            ") runs past the end of the data section (", data_size,
            " bytes); the file is truncated");
  }
  return info;
}

// The reference format packs tensors back to back from offset 0 to the end
// of the file; anything else is an overlap (two tensors sharing bytes), a
// gap or trailing bytes, each a sign of corruption. Sorts `tensors` by
// offset and indexes them by name in `index`.
void check_packing(const std::string& path, std::vector<SafetensorsTensorInfo>& tensors,
                   std::unordered_map<std::string, size_t>& index, uint64_t data_size) {
  std::sort(tensors.begin(), tensors.end(), [](const auto& a, const auto& b) {
    return std::tie(a.data_begin, a.data_end) < std::tie(b.data_begin, b.data_end);
  });
  uint64_t expected_begin = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& t = tensors[i];
    if (t.data_begin < expected_begin) {
      corrupt(path, t.name, "data ", range_string(t), " overlaps tensor ",
              range_string(tensors[i - 1]));
    }
    if (t.data_begin > expected_begin) {
      corrupt(path, t.name, "data ", range_string(t), " leaves a gap of ",
              t.data_begin - expected_begin, " bytes before it");
    }
    expected_begin = t.data_end;
    index.emplace(t.name, i);
  }
  if (expected_begin != data_size) {
    corrupt(path, "", "data section is ", data_size, " bytes but its tensors cover only ",
            expected_begin, "; trailing bytes");
  }
}

}  // namespace

// ---------------------------------------------------------------------------
// SafetensorsFile

struct SafetensorsFile::Impl {
  std::string path;
  std::shared_ptr<const MappedFile> file;
  uint64_t data_offset = 0;
  std::vector<SafetensorsTensorInfo> tensors;     // ascending data_begin
  std::unordered_map<std::string, size_t> index;  // name -> position in tensors
  std::map<std::string, std::string> metadata;

  const SafetensorsTensorInfo& find(const std::string& name) const {
    auto it = index.find(name);
    TESSERA_CHECK(it != index.end(), NotFound, "safetensors file ", path, " has no tensor '", name,
                  "'");
    return tensors[it->second];
  }
};

SafetensorsFile::SafetensorsFile(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}

SafetensorsFile SafetensorsFile::open(const std::string& path) {
  auto impl = std::make_shared<Impl>();
  impl->path = path;
  impl->file = std::make_shared<MappedFile>(path);
  const MappedFile& file = *impl->file;
  const json header = read_header(path, file, impl->data_offset);
  const uint64_t data_size = file.size() - impl->data_offset;
  impl->tensors.reserve(header.size());
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      read_user_metadata(path, entry, impl->metadata);
    } else {
      impl->tensors.push_back(read_tensor_entry(path, name, entry, data_size));
    }
  }
  check_packing(path, impl->tensors, impl->index, data_size);
  return SafetensorsFile(std::move(impl));
}

const std::string& SafetensorsFile::path() const { return impl_->path; }
uint64_t SafetensorsFile::data_offset() const { return impl_->data_offset; }
const std::vector<SafetensorsTensorInfo>& SafetensorsFile::tensors() const {
  return impl_->tensors;
}
bool SafetensorsFile::contains(const std::string& name) const {
  return impl_->index.count(name) != 0;
}
const SafetensorsTensorInfo& SafetensorsFile::info(const std::string& name) const {
  return impl_->find(name);
}
const std::map<std::string, std::string>& SafetensorsFile::metadata() const {
  return impl_->metadata;
}

at::Tensor SafetensorsFile::get(const std::string& name) const {
  const SafetensorsTensorInfo& info = impl_->find(name);
  // const_cast: ATen wants void*; the pages are read-only (see the header).
  void* ptr = const_cast<uint8_t*>(impl_->file->data() + impl_->data_offset + info.data_begin);
  auto options = at::TensorOptions().dtype(info.dtype).device(at::kCPU);
  if (reinterpret_cast<uintptr_t>(ptr) % dtype_size(info.dtype) != 0) {
    at::Tensor copy = at::empty(info.shape, options);
    // An empty tensor's data_ptr() is null, and memcpy(nullptr, p, 0) is undefined.
    if (info.data_end > info.data_begin) {
      std::memcpy(copy.data_ptr(), ptr, info.data_end - info.data_begin);
    }
    return copy;
  }
  // The deleter owns a reference to the mapping: the tensor (and every view
  // of it) keeps the file mapped after this SafetensorsFile is gone.
  std::shared_ptr<const MappedFile> keep_alive = impl_->file;
  return at::from_blob(
      ptr, info.shape, [keep_alive](void*) {}, options);
}

at::Tensor SafetensorsFile::get(const std::string& name, at::ScalarType expected_dtype,
                                at::IntArrayRef expected_shape) const {
  const SafetensorsTensorInfo& info = impl_->find(name);
  const std::string what = "safetensors file " + impl_->path + ", tensor '" + name + "'";
  TESSERA_CHECK(info.dtype == expected_dtype, InvalidArgument, what, ": expected dtype ",
                dtype_name(expected_dtype), ", got ", dtype_name(info.dtype));
  TESSERA_CHECK(at::IntArrayRef(info.shape) == expected_shape, InvalidArgument, what,
                ": expected shape ", shape_string(expected_shape), ", got ",
                shape_string(info.shape));
  return get(name);
}

// ---------------------------------------------------------------------------
// save_safetensors

void save_safetensors(const std::string& path, const NamedTensors& tensors,
                      const std::map<std::string, std::string>& metadata) {
  std::set<std::string> seen;
  for (const auto& [name, t] : tensors) {
    TESSERA_CHECK(!name.empty(), InvalidArgument, "saving ", path, ": empty tensor name");
    TESSERA_CHECK(name != "__metadata__", InvalidArgument, "saving ", path,
                  ": '__metadata__' is reserved and cannot name a tensor");
    TESSERA_CHECK(seen.insert(name).second, InvalidArgument, "saving ", path,
                  ": duplicate tensor name '", name, "'");
    TESSERA_CHECK(t.defined(), InvalidArgument, "saving ", path, ", tensor '", name,
                  "': tensor is undefined");
    TESSERA_CHECK(t.layout() == at::kStrided, InvalidArgument, "saving ", path, ", tensor '", name,
                  "': only dense (strided) tensors can be saved");
    TESSERA_CHECK(safetensors_dtype_name(t.scalar_type()) != nullptr, InvalidArgument, "saving ",
                  path, ", tensor '", name, "': dtype ", dtype_name(t.scalar_type()),
                  " has no safetensors equivalent supported here");
  }

  // Descending element size keeps every tensor aligned to its element size,
  // given that the data section starts 8-aligned (as the reference does).
  std::vector<size_t> order(tensors.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return tensors[a].second.element_size() > tensors[b].second.element_size();
  });

  ordered_json header = ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (size_t i : order) {
    const auto& [name, t] = tensors[i];
    const uint64_t bytes = static_cast<uint64_t>(tensor_bytes(t));
    header[name] = {{"dtype", safetensors_dtype_name(t.scalar_type())},
                    {"shape", t.sizes().vec()},
                    {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const json::type_error& e) {
    TESSERA_THROW(InvalidArgument, "saving ", path,
                  ": a tensor name or metadata string is not valid UTF-8 (", e.what(), ")");
  }
  text.append((8 - text.size() % 8) % 8, ' ');

  AtomicFileWriter out(path);
  const uint64_t header_len = text.size();
  out.append(&header_len, 8);
  out.append(text.data(), text.size());
  for (size_t i : order) {
    const std::string& name = tensors[i].first;
    const at::Tensor& t = tensors[i].second;  // lambdas cannot capture structured bindings
    at::Tensor cpu = translate_errors(
        "saving " + path + ", tensor '" + name + "'", [&] { return t.to(at::kCPU).contiguous(); },
        ErrorCode::kInternal);
    out.append(cpu.data_ptr(), static_cast<size_t>(tensor_bytes(cpu)));
  }
  out.commit();
}

// ---------------------------------------------------------------------------
// SafetensorsFolder

struct SafetensorsFolder::Impl {
  std::string dir;
  // The index file, or the single model.safetensors when not sharded; named
  // in NotFound messages as the place the lookup was made.
  std::string source;
  bool sharded = false;
  std::map<std::string, std::string> weight_map;  // tensor -> shard file name
  std::map<std::string, SafetensorsFile> shards;  // shard file name -> open file

  const std::string& file_of(const std::string& name) const {
    auto it = weight_map.find(name);
    TESSERA_CHECK(it != weight_map.end(), NotFound, "tensor '", name, "' is not in ",
                  sharded ? "the weight_map of " : "", source);
    return it->second;
  }
  const SafetensorsFile& shard_of(const std::string& name) const {
    const std::string& file = file_of(name);
    const SafetensorsFile& shard = shards.at(file);
    TESSERA_CHECK(shard.contains(name), NotFound, "tensor '", name, "': ", source,
                  " says it is in '", file, "', but ", shard.path(), " has no such tensor");
    return shard;
  }
};

SafetensorsFolder::SafetensorsFolder(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}

SafetensorsFolder SafetensorsFolder::open(const std::string& dir) {
  auto impl = std::make_shared<Impl>();
  impl->dir = dir;
  const fs::path index_path = fs::path(dir) / kSafetensorsIndexFile;
  const fs::path single_path = fs::path(dir) / kSafetensorsSingleFile;

  std::error_code ec;
  if (!fs::exists(index_path, ec)) {
    TESSERA_CHECK(fs::exists(single_path, ec), NotFound, "safetensors folder ", dir,
                  " has neither ", kSafetensorsIndexFile, " nor ", kSafetensorsSingleFile);
    impl->source = single_path.string();
    SafetensorsFile file = SafetensorsFile::open(impl->source);
    for (const auto& t : file.tensors()) impl->weight_map.emplace(t.name, kSafetensorsSingleFile);
    impl->shards.emplace(kSafetensorsSingleFile, std::move(file));
    return SafetensorsFolder(std::move(impl));
  }

  impl->sharded = true;
  impl->source = index_path.string();
  const std::string& source = impl->source;
  json index;
  {
    auto mapped = std::make_shared<MappedFile>(source);
    const auto* text = reinterpret_cast<const char*>(mapped->data());
    try {
      index = json::parse(text, text + mapped->size());
    } catch (const json::exception& e) {
      // parse_error, or out_of_range for a number too large for a double.
      TESSERA_THROW(DataLoss, "safetensors index ", source, " is not valid JSON: ", e.what());
    }
  }
  TESSERA_CHECK(
      index.is_object() && index.contains("weight_map") && index["weight_map"].is_object(),
      DataLoss, "safetensors index ", source,
      " must be a JSON object with a \"weight_map\" object");
  for (const auto& [name, file] : index["weight_map"].items()) {
    TESSERA_CHECK(file.is_string(), DataLoss, "safetensors index ", source, ": weight_map entry '",
                  name, "' must be a file name string, got ", file.dump());
    const auto& file_name = file.get_ref<const std::string&>();
    // Shards are plain names inside the folder; anything else could make a
    // downloaded index read files elsewhere on the machine.
    TESSERA_CHECK(!file_name.empty() && file_name.find('/') == std::string::npos &&
                      file_name != "." && file_name != "..",
                  DataLoss, "safetensors index ", source, ": tensor '", name, "' names shard '",
                  file_name, "', which is not a plain file name in the folder");
    impl->weight_map.emplace(name, file_name);
  }
  for (const auto& [name, file_name] : impl->weight_map) {
    if (impl->shards.count(file_name) != 0) continue;
    const fs::path shard_path = fs::path(dir) / file_name;
    TESSERA_CHECK(fs::exists(shard_path, ec), NotFound, "safetensors index ", source,
                  " names shard '", file_name, "' (for tensor '", name, "' and maybe others), but ",
                  shard_path.string(), " does not exist");
    impl->shards.emplace(file_name, SafetensorsFile::open(shard_path.string()));
  }
  return SafetensorsFolder(std::move(impl));
}

const std::string& SafetensorsFolder::dir() const { return impl_->dir; }
bool SafetensorsFolder::sharded() const { return impl_->sharded; }

std::vector<std::string> SafetensorsFolder::names() const {
  std::vector<std::string> out;
  out.reserve(impl_->weight_map.size());
  for (const auto& entry : impl_->weight_map) out.push_back(entry.first);
  return out;
}

bool SafetensorsFolder::contains(const std::string& name) const {
  return impl_->weight_map.count(name) != 0;
}
const std::string& SafetensorsFolder::file_of(const std::string& name) const {
  return impl_->file_of(name);
}
const SafetensorsFile& SafetensorsFolder::shard_of(const std::string& name) const {
  return impl_->shard_of(name);
}
at::Tensor SafetensorsFolder::get(const std::string& name) const {
  return impl_->shard_of(name).get(name);
}
at::Tensor SafetensorsFolder::get(const std::string& name, at::ScalarType expected_dtype,
                                  at::IntArrayRef expected_shape) const {
  return impl_->shard_of(name).get(name, expected_dtype, expected_shape);
}

void save_safetensors_folder(const std::string& dir, const NamedTensors& tensors,
                             uint64_t max_shard_bytes,
                             const std::map<std::string, std::string>& metadata) {
  TESSERA_CHECK(max_shard_bytes > 0, InvalidArgument, "saving safetensors folder ", dir,
                ": max_shard_bytes must be positive");
  std::map<std::string, std::string> shard_metadata = metadata;
  shard_metadata.emplace("format", "pt");  // no-op when the caller set it

  // Greedy packing in the caller's order, as transformers does: a shard is
  // closed when the next tensor would push it past the limit.
  std::vector<NamedTensors> shards;
  uint64_t shard_bytes = 0;
  uint64_t total_bytes = 0;
  for (const auto& entry : tensors) {
    const uint64_t bytes =
        entry.second.defined() ? static_cast<uint64_t>(tensor_bytes(entry.second)) : 0;
    if (shards.empty() || (!shards.back().empty() && shard_bytes + bytes > max_shard_bytes)) {
      shards.emplace_back();
      shard_bytes = 0;
    }
    shards.back().push_back(entry);
    shard_bytes += bytes;
    total_bytes += bytes;
  }
  if (shards.empty()) shards.emplace_back();  // an empty model is one empty file

  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw_io_error("cannot create directory " + dir, ec.value());

  std::set<std::string> written;
  if (shards.size() == 1) {
    save_safetensors((fs::path(dir) / kSafetensorsSingleFile).string(), shards[0], shard_metadata);
    written.insert(kSafetensorsSingleFile);
  } else {
    ordered_json weight_map = ordered_json::object();
    std::map<std::string, std::string> sorted_map;  // transformers writes it sorted
    for (size_t i = 0; i < shards.size(); ++i) {
      char file_name[64];
      std::snprintf(file_name, sizeof(file_name), "model-%05zu-of-%05zu.safetensors", i + 1,
                    shards.size());
      save_safetensors((fs::path(dir) / file_name).string(), shards[i], shard_metadata);
      written.insert(file_name);
      for (const auto& entry : shards[i]) sorted_map.emplace(entry.first, file_name);
    }
    for (const auto& [name, file] : sorted_map) weight_map[name] = file;
    ordered_json index = {{"metadata", {{"total_size", total_bytes}}},
                          {"weight_map", std::move(weight_map)}};
    const std::string text = index.dump(2) + "\n";
    AtomicFileWriter out((fs::path(dir) / kSafetensorsIndexFile).string());
    out.append(text.data(), text.size());
    out.commit();
    written.insert(kSafetensorsIndexFile);
  }

  // Remove what an earlier save left and this layout does not use, only now
  // that the new files are complete: until this point a reader still sees
  // the old, consistent checkpoint. A stale index goes first, so that no
  // reader finds an index whose shards are being deleted.
  const fs::path stale_index = fs::path(dir) / kSafetensorsIndexFile;
  if (written.count(kSafetensorsIndexFile) == 0) fs::remove(stale_index, ec);
  const std::regex shard_pattern(R"(model-\d{5}-of-\d{5}\.safetensors)");
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    const std::string name = entry.path().filename().string();
    const bool ours = name == kSafetensorsSingleFile || std::regex_match(name, shard_pattern);
    if (ours && written.count(name) == 0) fs::remove(entry.path(), ec);
  }
}

}  // namespace tessera::nn
