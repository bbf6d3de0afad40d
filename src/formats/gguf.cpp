#include "tessera/formats/gguf.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <unordered_map>
#include <utility>

#include "tessera/core/error.h"
#include "tessera/core/file_io.h"
#include "tessera/core/tensor.h"

namespace tessera::nn {

namespace fs = std::filesystem;

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "GGUF files are read as little-endian; a big-endian host would need byte swaps");

namespace {

constexpr uint32_t kGgufMagic = 0x46554747;  // "GGUF" read as a little-endian uint32
constexpr uint64_t kDefaultAlignment = 32;
constexpr uint32_t kMaxDims = 4;     // GGML_MAX_DIMS
constexpr int64_t kQuantBlock = 32;  // QK4_0 == QK4_1 == QK8_0
// Blocks per at::parallel_for task: 2048 blocks = 64K values, enough work to
// amortise scheduling while still splitting a 576x576 matrix across threads.
constexpr int64_t kDequantGrain = 2048;

// ---------------------------------------------------------------------------
// Type tables

// Size in bytes of a scalar metadata value; 0 for string, array and numbers
// outside the enum.
size_t scalar_size(uint32_t type) {
  switch (static_cast<GgufType>(type)) {
    case GgufType::kUint8:
    case GgufType::kInt8:
    case GgufType::kBool:
      return 1;
    case GgufType::kUint16:
    case GgufType::kInt16:
      return 2;
    case GgufType::kUint32:
    case GgufType::kInt32:
    case GgufType::kFloat32:
      return 4;
    case GgufType::kUint64:
    case GgufType::kInt64:
    case GgufType::kFloat64:
      return 8;
    default:
      return 0;
  }
}

bool is_integer(GgufType t) {
  switch (t) {
    case GgufType::kUint8:
    case GgufType::kInt8:
    case GgufType::kUint16:
    case GgufType::kInt16:
    case GgufType::kUint32:
    case GgufType::kInt32:
    case GgufType::kUint64:
    case GgufType::kInt64:
      return true;
    default:
      return false;
  }
}

bool is_float(GgufType t) { return t == GgufType::kFloat32 || t == GgufType::kFloat64; }

// Block geometry of every ggml type, taken from the block structs in ggml's
// ggml-common.h (elements per block, bytes per block). Needed to validate
// tensors of types load() cannot decode, so a file of K-quants still opens.
struct GgmlTraits {
  uint32_t id;
  const char* name;
  int64_t block_size;
  int64_t type_size;
};
constexpr GgmlTraits kGgmlTraits[] = {
    {0, "F32", 1, 4},         {1, "F16", 1, 2},         {2, "Q4_0", 32, 18},
    {3, "Q4_1", 32, 20},      {6, "Q5_0", 32, 22},      {7, "Q5_1", 32, 24},
    {8, "Q8_0", 32, 34},      {9, "Q8_1", 32, 36},      {10, "Q2_K", 256, 84},
    {11, "Q3_K", 256, 110},   {12, "Q4_K", 256, 144},   {13, "Q5_K", 256, 176},
    {14, "Q6_K", 256, 210},   {15, "Q8_K", 256, 292},   {16, "IQ2_XXS", 256, 66},
    {17, "IQ2_XS", 256, 74},  {18, "IQ3_XXS", 256, 98}, {19, "IQ1_S", 256, 50},
    {20, "IQ4_NL", 32, 18},   {21, "IQ3_S", 256, 110},  {22, "IQ2_S", 256, 82},
    {23, "IQ4_XS", 256, 136}, {24, "I8", 1, 1},         {25, "I16", 1, 2},
    {26, "I32", 1, 4},        {27, "I64", 1, 8},        {28, "F64", 1, 8},
    {29, "IQ1_M", 256, 56},   {30, "BF16", 1, 2},       {34, "TQ1_0", 256, 54},
    {35, "TQ2_0", 256, 66},   {39, "MXFP4", 32, 17},
};

const GgmlTraits* find_traits(uint32_t id) {
  for (const auto& t : kGgmlTraits) {
    if (t.id == id) return &t;
  }
  return nullptr;
}

// Stored bytes of a tensor whose GGUF dims (fastest first) are `ne`; false
// on a partial block or overflow. Also used by the writer.
bool stored_size(const GgmlTraits& traits, const std::vector<uint64_t>& ne, uint64_t* out) {
  const uint64_t row = ne.empty() ? 1 : ne[0];
  if (row % traits.block_size != 0) return false;
  constexpr uint64_t kLimit = std::numeric_limits<int64_t>::max();
  uint64_t blocks = row / traits.block_size;
  for (size_t i = 1; i < ne.size(); ++i) {
    if (ne[i] != 0 && blocks > kLimit / ne[i]) return false;
    blocks *= ne[i];
  }
  if (blocks > kLimit / traits.type_size) return false;
  *out = blocks * traits.type_size;
  return true;
}

uint64_t align_up(uint64_t n, uint64_t alignment) {
  return (n + alignment - 1) / alignment * alignment;
}

template <typename T>
T read_le(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

float fp16_to_float(const uint8_t* p) {
  return c10::detail::fp16_ieee_to_fp32_value(read_le<uint16_t>(p));
}

// ---------------------------------------------------------------------------
// Parsing

// A bounds-checked reader over the mapped file. Every read names what it
// was reading, so truncation errors say which structure was cut off.
class Cursor {
 public:
  Cursor(const std::string& path, const uint8_t* data, uint64_t size)
      : path_(path), data_(data), size_(size) {}

  uint64_t pos() const { return pos_; }
  uint64_t remaining() const { return size_ - pos_; }

  // Advances past `n` bytes and returns where they start.
  uint64_t take(uint64_t n, const std::string& what) {
    TESSERA_CHECK(n <= remaining(), DataLoss, "GGUF file ", path_, " is truncated: ", what,
                  " needs ", n, " bytes at offset ", pos_, " but the file is ", size_, " bytes");
    const uint64_t at = pos_;
    pos_ += n;
    return at;
  }
  template <typename T>
  T read(const std::string& what) {
    return read_le<T>(data_ + take(sizeof(T), what));
  }
  // A gguf_string: uint64 length, then that many bytes (no terminator).
  std::string read_string(const std::string& what) {
    const uint64_t n = read<uint64_t>(what + " (length)");
    const uint64_t at = take(n, what);
    return std::string(reinterpret_cast<const char*>(data_ + at), n);
  }

 private:
  const std::string& path_;
  const uint8_t* data_;
  uint64_t size_;
  uint64_t pos_ = 0;
};

struct KvEntry {
  std::string key;
  GgufType type = GgufType::kUint8;
  GgufType element_type = GgufType::kUint8;  // arrays only
  uint64_t count = 0;                        // arrays only
  // Offset of the value in the file: the scalar, the string's length
  // prefix, or an array's first element.
  uint64_t payload = 0;
};

}  // namespace

std::string gguf_type_name(GgufType type) {
  switch (type) {
    case GgufType::kUint8:
      return "uint8";
    case GgufType::kInt8:
      return "int8";
    case GgufType::kUint16:
      return "uint16";
    case GgufType::kInt16:
      return "int16";
    case GgufType::kUint32:
      return "uint32";
    case GgufType::kInt32:
      return "int32";
    case GgufType::kFloat32:
      return "float32";
    case GgufType::kBool:
      return "bool";
    case GgufType::kString:
      return "string";
    case GgufType::kArray:
      return "array";
    case GgufType::kUint64:
      return "uint64";
    case GgufType::kInt64:
      return "int64";
    case GgufType::kFloat64:
      return "float64";
  }
  return "type" + std::to_string(static_cast<uint32_t>(type));
}

std::string ggml_type_name(GgmlType type) {
  const GgmlTraits* traits = find_traits(static_cast<uint32_t>(type));
  return traits ? traits->name : "type" + std::to_string(static_cast<uint32_t>(type));
}

// ---------------------------------------------------------------------------
// GgufFile

struct GgufFile::Impl {
  std::string path;
  std::shared_ptr<const MappedFile> file;
  uint32_t version = 0;
  uint64_t alignment = kDefaultAlignment;
  uint64_t data_offset = 0;
  std::vector<KvEntry> kvs;  // file order
  std::unordered_map<std::string, size_t> kv_index;
  std::vector<GgufTensorInfo> tensors;  // file order
  std::unordered_map<std::string, size_t> tensor_index;

  const uint8_t* at(uint64_t offset) const { return file->data() + offset; }

  const KvEntry& kv(const std::string& key) const {
    auto it = kv_index.find(key);
    TESSERA_CHECK(it != kv_index.end(), NotFound, "GGUF file ", path, " has no metadata key '", key,
                  "'");
    return kvs[it->second];
  }
  [[noreturn]] void wrong_type(const KvEntry& e, const char* wanted) const {
    std::string stored = gguf_type_name(e.type);
    if (e.type == GgufType::kArray) stored += " of " + gguf_type_name(e.element_type);
    TESSERA_THROW(InvalidArgument, "GGUF file ", path, ", key '", e.key, "': expected ", wanted,
                  ", stored as ", stored);
  }
  // The integer of integer type `type` at `offset`, range-checked to int64.
  int64_t int_at(const KvEntry& e, GgufType type, uint64_t offset) const {
    const uint8_t* p = at(offset);
    switch (type) {
      case GgufType::kUint8:
        return read_le<uint8_t>(p);
      case GgufType::kInt8:
        return read_le<int8_t>(p);
      case GgufType::kUint16:
        return read_le<uint16_t>(p);
      case GgufType::kInt16:
        return read_le<int16_t>(p);
      case GgufType::kUint32:
        return read_le<uint32_t>(p);
      case GgufType::kInt32:
        return read_le<int32_t>(p);
      case GgufType::kInt64:
        return read_le<int64_t>(p);
      case GgufType::kUint64: {
        const uint64_t v = read_le<uint64_t>(p);
        TESSERA_CHECK(v <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()),
                      InvalidArgument, "GGUF file ", path, ", key '", e.key, "': uint64 value ", v,
                      " does not fit in int64");
        return static_cast<int64_t>(v);
      }
      default:
        wrong_type(e, "an integer");
    }
  }
  double float_at(GgufType type, uint64_t offset) const {
    return type == GgufType::kFloat32 ? read_le<float>(at(offset)) : read_le<double>(at(offset));
  }
  std::string string_at(uint64_t offset, uint64_t* next = nullptr) const {
    const uint64_t n = read_le<uint64_t>(at(offset));
    if (next != nullptr) *next = offset + 8 + n;
    return std::string(reinterpret_cast<const char*>(at(offset + 8)), n);
  }
  const KvEntry& array(const std::string& key) const {
    const KvEntry& e = kv(key);
    if (e.type != GgufType::kArray) wrong_type(e, "an array");
    return e;
  }

  // The parsing steps of GgufFile::open after the header, in file order.
  // Each throws DataLoss (InvalidArgument for what this reader does not
  // support) naming the file and the entry or tensor at fault.
  //
  // Metadata entry `i`: validated and skipped; values are decoded on demand.
  void read_kv(Cursor& in, uint64_t i);
  // general.alignment, when present: a positive power of two.
  void read_alignment();
  // Tensor info `i`: name, dims, type and (relative) offset.
  void read_tensor_info(Cursor& in, uint64_t i);
  // The data section starts at the first multiple of the alignment at or
  // after `infos_end`: makes tensor offsets absolute and checks that every
  // tensor is aligned, inside the file and overlaps no other.
  void place_tensors(uint64_t infos_end);
};

GgufFile::GgufFile(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}

void GgufFile::Impl::read_kv(Cursor& in, uint64_t i) {
  const std::string where = detail::concat("metadata entry ", i);
  KvEntry e;
  e.key = in.read_string(where + " key");
  const std::string what = "metadata '" + e.key + "'";
  e.type = static_cast<GgufType>(in.read<uint32_t>(what + " type"));
  e.payload = in.pos();
  if (e.type == GgufType::kString) {
    in.read_string(what + " value");
  } else if (e.type == GgufType::kArray) {
    e.element_type = static_cast<GgufType>(in.read<uint32_t>(what + " element type"));
    e.count = in.read<uint64_t>(what + " element count");
    e.payload = in.pos();
    if (e.element_type == GgufType::kString) {
      for (uint64_t j = 0; j < e.count; ++j) {
        in.read_string(detail::concat(what, " element ", j));
      }
    } else {
      TESSERA_CHECK(e.element_type != GgufType::kArray, InvalidArgument, "GGUF file ", path, ", ",
                    what, ": nested arrays are not supported (ggml rejects them too)");
      const size_t size = scalar_size(static_cast<uint32_t>(e.element_type));
      TESSERA_CHECK(size != 0, DataLoss, "GGUF file ", path, ", ", what,
                    ": unknown array element type ", static_cast<uint32_t>(e.element_type));
      TESSERA_CHECK(e.count <= in.remaining() / size, DataLoss, "GGUF file ", path,
                    " is truncated: ", what, " holds ", e.count, " elements of ",
                    gguf_type_name(e.element_type), " at offset ", in.pos(), " but the file is ",
                    file->size(), " bytes");
      in.take(e.count * size, what + " elements");
    }
  } else {
    const size_t size = scalar_size(static_cast<uint32_t>(e.type));
    TESSERA_CHECK(size != 0, DataLoss, "GGUF file ", path, ", ", what, ": unknown value type ",
                  static_cast<uint32_t>(e.type));
    in.take(size, what + " value");
  }
  TESSERA_CHECK(kv_index.emplace(e.key, kvs.size()).second, DataLoss, "GGUF file ", path,
                ": duplicate metadata key '", e.key, "'");
  kvs.push_back(std::move(e));
}

void GgufFile::Impl::read_alignment() {
  auto it = kv_index.find("general.alignment");
  if (it == kv_index.end()) return;
  const KvEntry& e = kvs[it->second];
  TESSERA_CHECK(is_integer(e.type), DataLoss, "GGUF file ", path,
                ": general.alignment must be an integer, stored as ", gguf_type_name(e.type));
  const int64_t a = int_at(e, e.type, e.payload);
  TESSERA_CHECK(a > 0 && (a & (a - 1)) == 0, DataLoss, "GGUF file ", path, ": general.alignment ",
                a, " is not a positive power of two");
  alignment = static_cast<uint64_t>(a);
}

void GgufFile::Impl::read_tensor_info(Cursor& in, uint64_t i) {
  GgufTensorInfo t;
  t.name = in.read_string(detail::concat("tensor info ", i, " name"));
  const std::string what = "tensor '" + t.name + "'";
  const uint32_t n_dims = in.read<uint32_t>(what + " dimension count");
  TESSERA_CHECK(n_dims <= kMaxDims, DataLoss, "GGUF file ", path, ", ", what, ": ", n_dims,
                " dimensions, more than ggml's ", kMaxDims);
  std::vector<uint64_t> ne(n_dims);
  for (uint32_t d = 0; d < n_dims; ++d) {
    ne[d] = in.read<uint64_t>(what + " dimensions");
    TESSERA_CHECK(ne[d] <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()), DataLoss,
                  "GGUF file ", path, ", ", what, ": dimension ", ne[d], " is too large");
  }
  const uint32_t type = in.read<uint32_t>(what + " type");
  const uint64_t offset = in.read<uint64_t>(what + " offset");
  const GgmlTraits* traits = find_traits(type);
  TESSERA_CHECK(traits != nullptr, InvalidArgument, "GGUF file ", path, ", ", what,
                ": ggml type id ", type, " is not known to this reader");
  TESSERA_CHECK(stored_size(*traits, ne, &t.nbytes), DataLoss, "GGUF file ", path, ", ", what,
                ": dims ", shape_string(std::vector<int64_t>(ne.begin(), ne.end())),
                " do not fit type ", traits->name, " (row length must be a multiple of ",
                traits->block_size, ")");
  t.type = static_cast<GgmlType>(type);
  t.shape.assign(ne.rbegin(), ne.rend());
  t.offset = offset;  // relative for now; made absolute in place_tensors
  TESSERA_CHECK(tensor_index.emplace(t.name, tensors.size()).second, DataLoss, "GGUF file ", path,
                ": duplicate tensor '", t.name, "'");
  tensors.push_back(std::move(t));
}

void GgufFile::Impl::place_tensors(uint64_t infos_end) {
  // A file with no tensors may end before the data section.
  data_offset = align_up(infos_end, alignment);
  const uint64_t file_size = file->size();
  std::vector<const GgufTensorInfo*> by_offset;
  for (auto& t : tensors) {
    const std::string what = "tensor '" + t.name + "'";
    TESSERA_CHECK(t.offset % alignment == 0, DataLoss, "GGUF file ", path, ", ", what, ": offset ",
                  t.offset, " is not a multiple of the alignment ", alignment);
    TESSERA_CHECK(data_offset <= file_size && t.offset <= file_size - data_offset &&
                      t.nbytes <= file_size - data_offset - t.offset,
                  DataLoss, "GGUF file ", path, " is truncated: ", what, " (",
                  ggml_type_name(t.type), ", ", t.nbytes, " bytes) at data offset ", t.offset,
                  " ends past the end of the file (", file_size, " bytes)");
    t.offset += data_offset;
    by_offset.push_back(&t);
  }
  std::sort(by_offset.begin(), by_offset.end(),
            [](const auto* a, const auto* b) { return a->offset < b->offset; });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const auto* prev = by_offset[i - 1];
    TESSERA_CHECK(prev->offset + prev->nbytes <= by_offset[i]->offset, DataLoss, "GGUF file ", path,
                  ": tensor '", by_offset[i]->name, "' overlaps tensor '", prev->name, "'");
  }
}

GgufFile GgufFile::open(const std::string& path) {
  auto impl = std::make_shared<Impl>();
  impl->path = path;
  impl->file = std::make_shared<MappedFile>(path);
  const MappedFile& file = *impl->file;
  Cursor in(impl->path, file.data(), file.size());

  // Header. A file shorter than the magic is truncated, not foreign.
  const uint32_t magic = in.read<uint32_t>("the magic");
  TESSERA_CHECK(magic == kGgufMagic, InvalidArgument, path,
                " is not a GGUF file: it does not start with \"GGUF\"");
  impl->version = in.read<uint32_t>("the version");
  const uint32_t swapped = __builtin_bswap32(impl->version);
  TESSERA_CHECK(!(swapped == 2 || swapped == 3), InvalidArgument, "GGUF file ", path,
                " is big-endian, which this reader does not support");
  TESSERA_CHECK(impl->version == 2 || impl->version == 3, InvalidArgument, "GGUF file ", path,
                " has version ", impl->version, "; only versions 2 and 3 are supported");
  const uint64_t n_tensors = in.read<uint64_t>("the tensor count");
  const uint64_t n_kv = in.read<uint64_t>("the metadata count");

  for (uint64_t i = 0; i < n_kv; ++i) impl->read_kv(in, i);
  impl->read_alignment();
  for (uint64_t i = 0; i < n_tensors; ++i) impl->read_tensor_info(in, i);
  // Data section: starts at the next multiple of the alignment.
  impl->place_tensors(in.pos());
  return GgufFile(std::move(impl));
}

const std::string& GgufFile::path() const { return impl_->path; }
uint32_t GgufFile::version() const { return impl_->version; }
uint64_t GgufFile::alignment() const { return impl_->alignment; }
uint64_t GgufFile::data_offset() const { return impl_->data_offset; }

std::vector<std::string> GgufFile::keys() const {
  std::vector<std::string> out;
  out.reserve(impl_->kvs.size());
  for (const auto& e : impl_->kvs) out.push_back(e.key);
  return out;
}
bool GgufFile::has(const std::string& key) const { return impl_->kv_index.count(key) != 0; }
GgufType GgufFile::type(const std::string& key) const { return impl_->kv(key).type; }
GgufType GgufFile::array_type(const std::string& key) const {
  return impl_->array(key).element_type;
}
uint64_t GgufFile::array_size(const std::string& key) const { return impl_->array(key).count; }

std::string GgufFile::get_string(const std::string& key) const {
  const KvEntry& e = impl_->kv(key);
  if (e.type != GgufType::kString) impl_->wrong_type(e, "string");
  return impl_->string_at(e.payload);
}

int64_t GgufFile::get_int(const std::string& key) const {
  const KvEntry& e = impl_->kv(key);
  if (!is_integer(e.type)) impl_->wrong_type(e, "an integer");
  return impl_->int_at(e, e.type, e.payload);
}

double GgufFile::get_float(const std::string& key) const {
  const KvEntry& e = impl_->kv(key);
  if (!is_float(e.type)) impl_->wrong_type(e, "float32 or float64");
  return impl_->float_at(e.type, e.payload);
}

bool GgufFile::get_bool(const std::string& key) const {
  const KvEntry& e = impl_->kv(key);
  if (e.type != GgufType::kBool) impl_->wrong_type(e, "bool");
  return *impl_->at(e.payload) != 0;
}

std::vector<std::string> GgufFile::get_string_array(const std::string& key) const {
  const KvEntry& e = impl_->array(key);
  if (e.element_type != GgufType::kString) impl_->wrong_type(e, "array of string");
  std::vector<std::string> out;
  out.reserve(e.count);
  uint64_t offset = e.payload;
  for (uint64_t i = 0; i < e.count; ++i) out.push_back(impl_->string_at(offset, &offset));
  return out;
}

std::vector<int64_t> GgufFile::get_int_array(const std::string& key) const {
  const KvEntry& e = impl_->array(key);
  if (!is_integer(e.element_type)) impl_->wrong_type(e, "array of integers");
  const size_t size = scalar_size(static_cast<uint32_t>(e.element_type));
  std::vector<int64_t> out(e.count);
  for (uint64_t i = 0; i < e.count; ++i) {
    out[i] = impl_->int_at(e, e.element_type, e.payload + i * size);
  }
  return out;
}

std::vector<double> GgufFile::get_float_array(const std::string& key) const {
  const KvEntry& e = impl_->array(key);
  if (!is_float(e.element_type)) impl_->wrong_type(e, "array of float32 or float64");
  const size_t size = scalar_size(static_cast<uint32_t>(e.element_type));
  std::vector<double> out(e.count);
  for (uint64_t i = 0; i < e.count; ++i) {
    out[i] = impl_->float_at(e.element_type, e.payload + i * size);
  }
  return out;
}

const std::vector<GgufTensorInfo>& GgufFile::tensors() const { return impl_->tensors; }
bool GgufFile::has_tensor(const std::string& name) const {
  return impl_->tensor_index.count(name) != 0;
}
const GgufTensorInfo& GgufFile::tensor_info(const std::string& name) const {
  auto it = impl_->tensor_index.find(name);
  TESSERA_CHECK(it != impl_->tensor_index.end(), NotFound, "GGUF file ", impl_->path,
                " has no tensor '", name, "'");
  return impl_->tensors[it->second];
}

namespace {

// Block decoders, transcribed from ggml's dequantize_row_q8_0 / q4_0 / q4_1
// (ggml-quants.c). Each reads one block at `src` and writes 32 floats.
// Block layouts: Q8_0 {fp16 d; int8 qs[32]}; Q4_0 {fp16 d; uint8 qs[16]};
// Q4_1 {fp16 d; fp16 m; uint8 qs[16]}. In the 4-bit types byte j holds
// element j in its low nibble and element j + 16 in its high nibble.
// Results are bit-exact whatever the compiler flags: a product of an fp16
// scale (11 significant bits) and a quant of at most 8 bits is exact in
// float32, so only Q4_1's add rounds, and contracting q * d + m into an FMA
// (as -march=native may) cannot change it.
void dequant_q8_0(const uint8_t* src, float* dst) {
  const float d = fp16_to_float(src);
  const auto* qs = reinterpret_cast<const int8_t*>(src + 2);
  for (int j = 0; j < 32; ++j) dst[j] = static_cast<float>(qs[j]) * d;
}

void dequant_q4_0(const uint8_t* src, float* dst) {
  const float d = fp16_to_float(src);
  const uint8_t* qs = src + 2;
  for (int j = 0; j < 16; ++j) {
    const int x0 = (qs[j] & 0x0F) - 8;
    const int x1 = (qs[j] >> 4) - 8;
    dst[j] = static_cast<float>(x0) * d;
    dst[j + 16] = static_cast<float>(x1) * d;
  }
}

void dequant_q4_1(const uint8_t* src, float* dst) {
  const float d = fp16_to_float(src);
  const float m = fp16_to_float(src + 2);
  const uint8_t* qs = src + 4;
  for (int j = 0; j < 16; ++j) {
    const int x0 = qs[j] & 0x0F;
    const int x1 = qs[j] >> 4;
    dst[j] = static_cast<float>(x0) * d + m;
    dst[j + 16] = static_cast<float>(x1) * d + m;
  }
}

}  // namespace

at::Tensor GgufFile::load(const std::string& name) const {
  const GgufTensorInfo& info = tensor_info(name);
  // const_cast: ATen wants void*, but these views are only ever read from.
  void* src = const_cast<uint8_t*>(impl_->at(info.offset));
  const auto cpu = at::TensorOptions().device(at::kCPU);
  switch (info.type) {
    case GgmlType::kF32:
      return at::from_blob(src, info.shape, cpu.dtype(at::kFloat)).clone();
    case GgmlType::kF16:
      return at::from_blob(src, info.shape, cpu.dtype(at::kHalf)).to(at::kFloat);
    case GgmlType::kBF16:
      return at::from_blob(src, info.shape, cpu.dtype(at::kBFloat16)).to(at::kFloat);
    case GgmlType::kQ8_0:
    case GgmlType::kQ4_0:
    case GgmlType::kQ4_1: {
      void (*decode)(const uint8_t*, float*) = info.type == GgmlType::kQ8_0   ? dequant_q8_0
                                               : info.type == GgmlType::kQ4_0 ? dequant_q4_0
                                                                              : dequant_q4_1;
      const int64_t block_bytes = find_traits(static_cast<uint32_t>(info.type))->type_size;
      at::Tensor out = at::empty(info.shape, cpu.dtype(at::kFloat));
      // Blocks never straddle rows (open() checked the row length), so the
      // output is simply block after block.
      const int64_t n_blocks = out.numel() / kQuantBlock;
      const auto* blocks = static_cast<const uint8_t*>(src);
      float* dst = out.data_ptr<float>();
      at::parallel_for(0, n_blocks, kDequantGrain, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          decode(blocks + b * block_bytes, dst + b * kQuantBlock);
        }
      });
      return out;
    }
  }
  TESSERA_THROW(InvalidArgument, "GGUF file ", impl_->path, ", tensor '", name, "': type ",
                ggml_type_name(info.type),
                " cannot be loaded (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)");
}

// ---------------------------------------------------------------------------
// GgufWriter

namespace {

void put_bytes(std::vector<uint8_t>& out, const void* data, size_t n) {
  const auto* p = static_cast<const uint8_t*>(data);
  out.insert(out.end(), p, p + n);
}
template <typename T>
void put(std::vector<uint8_t>& out, T value) {
  put_bytes(out, &value, sizeof(T));
}
void put_string(std::vector<uint8_t>& out, const std::string& s) {
  put<uint64_t>(out, s.size());
  put_bytes(out, s.data(), s.size());
}

uint16_t float_to_fp16(float x) { return c10::detail::fp16_ieee_from_fp32_value(x); }

// Reference quantisers, transcribed from ggml's quantize_row_q8_0_ref,
// quantize_row_q4_0_ref and quantize_row_q4_1_ref. Each encodes the 32
// floats at `x` into one block at `y`. Inputs are finite (checked by the
// caller), so the float-to-int conversions below stay in range.
void quantize_q8_0(const float* x, uint8_t* y) {
  float amax = 0.0f;
  for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float d = amax / ((1 << 7) - 1);
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  const uint16_t dh = float_to_fp16(d);
  std::memcpy(y, &dh, 2);
  for (int j = 0; j < 32; ++j) {
    const auto q = static_cast<int8_t>(std::round(x[j] * id));
    std::memcpy(y + 2 + j, &q, 1);
  }
}

void quantize_q4_0(const float* x, uint8_t* y) {
  // The scale takes the sign of the value of largest magnitude, so that
  // value maps exactly to -8 and the other side gets up to +7.
  float amax = 0.0f;
  float max = 0.0f;
  for (int j = 0; j < 32; ++j) {
    if (amax < std::fabs(x[j])) {
      amax = std::fabs(x[j]);
      max = x[j];
    }
  }
  const float d = max / -8;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  const uint16_t dh = float_to_fp16(d);
  std::memcpy(y, &dh, 2);
  for (int j = 0; j < 16; ++j) {
    const int q0 = std::min(15, static_cast<int>(static_cast<int8_t>(x[j] * id + 8.5f)));
    const int q1 = std::min(15, static_cast<int>(static_cast<int8_t>(x[j + 16] * id + 8.5f)));
    y[2 + j] = static_cast<uint8_t>(q0 | (q1 << 4));
  }
}

void quantize_q4_1(const float* x, uint8_t* y) {
  float min = std::numeric_limits<float>::max();
  float max = -std::numeric_limits<float>::max();
  for (int j = 0; j < 32; ++j) {
    min = std::min(min, x[j]);
    max = std::max(max, x[j]);
  }
  const float d = (max - min) / ((1 << 4) - 1);
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  const uint16_t dh = float_to_fp16(d);
  const uint16_t mh = float_to_fp16(min);
  std::memcpy(y, &dh, 2);
  std::memcpy(y + 2, &mh, 2);
  for (int j = 0; j < 16; ++j) {
    const int q0 = std::min(15, static_cast<int>(static_cast<int8_t>((x[j] - min) * id + 0.5f)));
    const int q1 =
        std::min(15, static_cast<int>(static_cast<int8_t>((x[j + 16] - min) * id + 0.5f)));
    y[4 + j] = static_cast<uint8_t>(q0 | (q1 << 4));
  }
}

}  // namespace

GgufWriter::GgufWriter(uint32_t alignment) : alignment_(alignment) {
  TESSERA_CHECK(alignment > 0 && (alignment & (alignment - 1)) == 0, InvalidArgument,
                "GGUF alignment must be a positive power of two, got ", alignment);
}

void GgufWriter::add_key(const std::string& key, GgufType type, std::vector<uint8_t> value) {
  TESSERA_CHECK(key != "general.alignment", InvalidArgument,
                "GGUF key general.alignment is set through the GgufWriter constructor");
  TESSERA_CHECK(std::find(keys_.begin(), keys_.end(), key) == keys_.end(), InvalidArgument,
                "duplicate GGUF metadata key '", key, "'");
  std::vector<uint8_t> encoded;
  put_string(encoded, key);
  put<uint32_t>(encoded, static_cast<uint32_t>(type));
  encoded.insert(encoded.end(), value.begin(), value.end());
  keys_.push_back(key);
  kv_encoded_.push_back(std::move(encoded));
}

namespace {
template <typename T>
std::vector<uint8_t> encode_scalar(T value) {
  std::vector<uint8_t> out;
  put(out, value);
  return out;
}
template <typename T>
std::vector<uint8_t> encode_array(GgufType element_type, const std::vector<T>& values) {
  std::vector<uint8_t> out;
  put<uint32_t>(out, static_cast<uint32_t>(element_type));
  put<uint64_t>(out, values.size());
  for (const T& v : values) put(out, v);
  return out;
}
}  // namespace

void GgufWriter::add_uint8(const std::string& k, uint8_t v) {
  add_key(k, GgufType::kUint8, encode_scalar(v));
}
void GgufWriter::add_int8(const std::string& k, int8_t v) {
  add_key(k, GgufType::kInt8, encode_scalar(v));
}
void GgufWriter::add_uint16(const std::string& k, uint16_t v) {
  add_key(k, GgufType::kUint16, encode_scalar(v));
}
void GgufWriter::add_int16(const std::string& k, int16_t v) {
  add_key(k, GgufType::kInt16, encode_scalar(v));
}
void GgufWriter::add_uint32(const std::string& k, uint32_t v) {
  add_key(k, GgufType::kUint32, encode_scalar(v));
}
void GgufWriter::add_int32(const std::string& k, int32_t v) {
  add_key(k, GgufType::kInt32, encode_scalar(v));
}
void GgufWriter::add_uint64(const std::string& k, uint64_t v) {
  add_key(k, GgufType::kUint64, encode_scalar(v));
}
void GgufWriter::add_int64(const std::string& k, int64_t v) {
  add_key(k, GgufType::kInt64, encode_scalar(v));
}
void GgufWriter::add_float32(const std::string& k, float v) {
  add_key(k, GgufType::kFloat32, encode_scalar(v));
}
void GgufWriter::add_float64(const std::string& k, double v) {
  add_key(k, GgufType::kFloat64, encode_scalar(v));
}
void GgufWriter::add_bool(const std::string& k, bool v) {
  add_key(k, GgufType::kBool, encode_scalar<uint8_t>(v ? 1 : 0));
}
void GgufWriter::add_string(const std::string& k, const std::string& v) {
  std::vector<uint8_t> out;
  put_string(out, v);
  add_key(k, GgufType::kString, std::move(out));
}

void GgufWriter::add_array(const std::string& k, const std::vector<uint8_t>& v) {
  add_key(k, GgufType::kArray, encode_array(GgufType::kUint8, v));
}
void GgufWriter::add_array(const std::string& k, const std::vector<int8_t>& v) {
  add_key(k, GgufType::kArray, encode_array(GgufType::kInt8, v));
}
void GgufWriter::add_array(const std::string& k, const std::vector<uint16_t>& v) {
  add_key(k, GgufType::kArray, encode_array(GgufType::kUint16, v));
}
void GgufWriter::add_array(const std::string& k, const std::vector<int16_t>& v) {
  add_key(k, GgufType::kArray, encode_array(GgufType::kInt16, v));
}
void GgufWriter::add_array(const std::string& k, const std::vector<uint32_t>& v) {
  add_key(k, GgufType::kArray, encode_array(GgufType::kUint32, v));
}
void GgufWriter::add_array(const std::string& k, const std::vector<int32_t>& v) {
  add_key(k, GgufType::kArray, encode_array(GgufType::kInt32, v));
}
void GgufWriter::add_array(const std::string& k, const std::vector<uint64_t>& v) {
  add_key(k, GgufType::kArray, encode_array(GgufType::kUint64, v));
}
void GgufWriter::add_array(const std::string& k, const std::vector<int64_t>& v) {
  add_key(k, GgufType::kArray, encode_array(GgufType::kInt64, v));
}
void GgufWriter::add_array(const std::string& k, const std::vector<float>& v) {
  add_key(k, GgufType::kArray, encode_array(GgufType::kFloat32, v));
}
void GgufWriter::add_array(const std::string& k, const std::vector<double>& v) {
  add_key(k, GgufType::kArray, encode_array(GgufType::kFloat64, v));
}

void GgufWriter::add_array(const std::string& k, const std::vector<bool>& v) {
  std::vector<uint8_t> out;
  put<uint32_t>(out, static_cast<uint32_t>(GgufType::kBool));
  put<uint64_t>(out, v.size());
  for (bool b : v) put<uint8_t>(out, b ? 1 : 0);
  add_key(k, GgufType::kArray, std::move(out));
}

void GgufWriter::add_array(const std::string& k, const std::vector<std::string>& v) {
  std::vector<uint8_t> out;
  put<uint32_t>(out, static_cast<uint32_t>(GgufType::kString));
  put<uint64_t>(out, v.size());
  for (const auto& s : v) put_string(out, s);
  add_key(k, GgufType::kArray, std::move(out));
}

void GgufWriter::add_raw_tensor(const std::string& name, GgmlType type,
                                const std::vector<int64_t>& shape, std::vector<uint8_t> bytes) {
  const std::string what = "GGUF tensor '" + name + "'";
  TESSERA_CHECK(!name.empty(), InvalidArgument, "GGUF tensor name must not be empty");
  TESSERA_CHECK(std::none_of(tensors_.begin(), tensors_.end(),
                             [&](const PendingTensor& t) { return t.name == name; }),
                InvalidArgument, "duplicate ", what);
  TESSERA_CHECK(shape.size() <= kMaxDims, InvalidArgument, what, ": ", shape.size(),
                " dimensions, more than ggml's ", kMaxDims);
  const GgmlTraits* traits = find_traits(static_cast<uint32_t>(type));
  TESSERA_CHECK(traits != nullptr, InvalidArgument, what, ": unknown ggml type ",
                static_cast<uint32_t>(type));
  std::vector<uint64_t> ne;
  for (auto it = shape.rbegin(); it != shape.rend(); ++it) {
    TESSERA_CHECK(*it >= 0, InvalidArgument, what, ": negative dimension in ", shape_string(shape));
    ne.push_back(static_cast<uint64_t>(*it));
  }
  uint64_t expected = 0;
  TESSERA_CHECK(stored_size(*traits, ne, &expected), InvalidArgument, what, ": shape ",
                shape_string(shape), " does not fit type ", traits->name,
                " (last dimension must be a multiple of ", traits->block_size, ")");
  TESSERA_CHECK(bytes.size() == expected, InvalidArgument, what, ": ", traits->name,
                " data for shape ", shape_string(shape), " is ", expected, " bytes, got ",
                bytes.size());
  tensors_.push_back(PendingTensor{name, type, shape, std::move(bytes)});
}

void GgufWriter::add_tensor(const std::string& name, const at::Tensor& tensor, GgmlType type) {
  const std::string what = "GGUF tensor '" + name + "'";
  TESSERA_CHECK(tensor.defined() && at::isFloatingType(tensor.scalar_type()), InvalidArgument, what,
                ": expected a floating-point tensor");
  TESSERA_CHECK(tensor.dim() >= 1 && tensor.dim() <= static_cast<int64_t>(kMaxDims),
                InvalidArgument, what, ": expected 1 to 4 dimensions, got ", tensor.dim());
  const at::Tensor x =
      translate_errors(what, [&] { return tensor.to(at::kCPU, at::kFloat).contiguous(); });
  const std::vector<int64_t> shape = x.sizes().vec();
  const int64_t n = x.numel();
  std::vector<uint8_t> bytes;
  switch (type) {
    case GgmlType::kF32:
      bytes.resize(n * 4);
      std::memcpy(bytes.data(), x.data_ptr(), bytes.size());
      break;
    case GgmlType::kF16:
    case GgmlType::kBF16: {
      const at::Tensor h = x.to(type == GgmlType::kF16 ? at::kHalf : at::kBFloat16);
      bytes.resize(n * 2);
      std::memcpy(bytes.data(), h.data_ptr(), bytes.size());
      break;
    }
    case GgmlType::kQ8_0:
    case GgmlType::kQ4_0:
    case GgmlType::kQ4_1: {
      TESSERA_CHECK(shape.back() % kQuantBlock == 0, InvalidArgument, what, ": ",
                    ggml_type_name(type), " needs the last dimension to be a multiple of ",
                    kQuantBlock, ", got shape ", shape_string(shape));
      TESSERA_CHECK(at::isfinite(x).all().item<bool>(), InvalidArgument, what,
                    ": cannot quantise non-finite values");
      void (*encode)(const float*, uint8_t*) = type == GgmlType::kQ8_0   ? quantize_q8_0
                                               : type == GgmlType::kQ4_0 ? quantize_q4_0
                                                                         : quantize_q4_1;
      const int64_t block_bytes = find_traits(static_cast<uint32_t>(type))->type_size;
      const int64_t n_blocks = n / kQuantBlock;
      bytes.resize(n_blocks * block_bytes);
      const float* src = x.data_ptr<float>();
      for (int64_t b = 0; b < n_blocks; ++b) {
        encode(src + b * kQuantBlock, bytes.data() + b * block_bytes);
      }
      break;
    }
    default:
      TESSERA_THROW(InvalidArgument, what, ": writing type ", ggml_type_name(type),
                    " is not supported (F32, F16, BF16, Q8_0, Q4_0, Q4_1 are)");
  }
  add_raw_tensor(name, type, shape, std::move(bytes));
}

void GgufWriter::write(const std::string& path) const {
  std::vector<uint8_t> head;
  put<uint32_t>(head, kGgufMagic);
  put<uint32_t>(head, 3);
  put<uint64_t>(head, tensors_.size());
  const bool custom_alignment = alignment_ != kDefaultAlignment;
  put<uint64_t>(head, kv_encoded_.size() + (custom_alignment ? 1 : 0));
  if (custom_alignment) {
    put_string(head, "general.alignment");
    put<uint32_t>(head, static_cast<uint32_t>(GgufType::kUint32));
    put<uint32_t>(head, alignment_);
  }
  for (const auto& kv : kv_encoded_) put_bytes(head, kv.data(), kv.size());

  // Like ggml, every tensor's data is padded to the alignment, the last too.
  uint64_t offset = 0;
  for (const auto& t : tensors_) {
    put_string(head, t.name);
    put<uint32_t>(head, static_cast<uint32_t>(t.shape.size()));
    for (auto it = t.shape.rbegin(); it != t.shape.rend(); ++it) put<uint64_t>(head, *it);
    put<uint32_t>(head, static_cast<uint32_t>(t.type));
    put<uint64_t>(head, offset);
    offset += align_up(t.bytes.size(), alignment_);
  }
  head.resize(align_up(head.size(), alignment_), 0);

  AtomicFileWriter out(path);
  out.append(head.data(), head.size());
  const std::vector<uint8_t> padding(alignment_, 0);
  for (const auto& t : tensors_) {
    out.append(t.bytes.data(), t.bytes.size());
    out.append(padding.data(), align_up(t.bytes.size(), alignment_) - t.bytes.size());
  }
  out.commit();
}

}  // namespace tessera::nn
