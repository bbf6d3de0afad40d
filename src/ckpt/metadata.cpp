// metadata.json: reading and writing. No ATen here (compile time).
#include <cstdint>
#include <limits>
#include <nlohmann/json.hpp>
#include <vector>

#include "tessera/ckpt/checkpoint.h"
#include "tessera/core/error.h"

namespace tessera::ckpt {

using nlohmann::json;

namespace {

// nlohmann converts any JSON number to any arithmetic type with a
// static_cast, which is undefined for a float outside the target's range
// and wraps or truncates otherwise. Metadata integers must be JSON integers
// that fit; anything else is DataLoss naming the field.
template <typename T>
T integer(const json& v, const std::string& source, const char* field) {
  bool fits = false;
  if (v.is_number_unsigned()) {
    fits = v.get<uint64_t>() <= static_cast<uint64_t>(std::numeric_limits<T>::max());
  } else if (v.is_number_integer()) {
    const int64_t x = v.get<int64_t>();
    fits =
        std::numeric_limits<T>::is_signed
            ? x >= static_cast<int64_t>(std::numeric_limits<T>::min()) &&
                  static_cast<uint64_t>(x) <= static_cast<uint64_t>(std::numeric_limits<T>::max())
            : x >= 0;
  }
  TESSERA_CHECK(fits, DataLoss, "checkpoint metadata '", source, "': ", field,
                " must be an integer in [", std::numeric_limits<T>::min(), ", ",
                std::numeric_limits<T>::max(), "], got ", v.dump());
  return v.is_number_unsigned() ? static_cast<T>(v.get<uint64_t>())
                                : static_cast<T>(v.get<int64_t>());
}

template <typename T>
std::vector<T> integers(const json& v, const std::string& source, const char* field) {
  TESSERA_CHECK(v.is_array(), DataLoss, "checkpoint metadata '", source, "': ", field,
                " must be a list of integers, got ", v.dump());
  std::vector<T> out;
  out.reserve(v.size());
  for (const json& x : v) out.push_back(integer<T>(x, source, field));
  return out;
}

}  // namespace

std::string Metadata::to_json(int indent) const {
  json j;
  j["format_version"] = format_version;
  j["world_size"] = world_size;
  j["step"] = step;
  j["data_position"] = data_position;
  j["checksum"] = "crc32c";
  j["checksum_block"] = checksum_block;
  j["user"] = user;
  json files_j = json::array();
  for (const auto& f : files) files_j.push_back({{"name", f.name}, {"bytes", f.bytes}});
  j["files"] = files_j;
  json ranks_j = json::array();
  for (const auto& r : rank_state) {
    ranks_j.push_back({{"file", r.file},
                       {"byte_offset", r.byte_offset},
                       {"byte_length", r.byte_length},
                       {"crc32c", r.crc32c}});
  }
  j["rank_state"] = ranks_j;
  json tensors_j = json::object();
  for (const auto& [name, t] : tensors) {
    json boxes = json::array();
    for (const auto& b : t.boxes) {
      boxes.push_back({{"offset", b.box.offset},
                       {"length", b.box.length},
                       {"ranks", b.ranks},
                       {"file", b.file},
                       {"byte_offset", b.byte_offset},
                       {"byte_length", b.byte_length},
                       {"crc32c", b.crc32c}});
    }
    tensors_j[name] = {
        {"dtype", t.dtype}, {"shape", t.shape}, {"attrs", t.attrs}, {"boxes", boxes}};
  }
  j["tensors"] = tensors_j;
  return j.dump(indent);
}

Metadata Metadata::parse(const std::string& text, const std::string& source) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    // parse_error, or out_of_range for a number too large for a double.
    TESSERA_THROW(DataLoss, "checkpoint metadata '", source, "' is not valid JSON: ", e.what());
  }
  TESSERA_CHECK(j.is_object() && j.contains("format_version"), DataLoss, "checkpoint metadata '",
                source, "' has no format_version");
  Metadata m;
  try {
    m.format_version = integer<int>(j.at("format_version"), source, "format_version");
  } catch (const json::exception& e) {
    TESSERA_THROW(DataLoss, "checkpoint metadata '", source, "': bad format_version: ", e.what());
  }
  TESSERA_CHECK(m.format_version == kFormatVersion, FailedPrecondition, "checkpoint metadata '",
                source, "' has format_version ", m.format_version,
                "; this reader understands only version ", kFormatVersion,
                " (written by a newer or older Tessera?)");
  try {
    m.world_size = integer<int>(j.at("world_size"), source, "world_size");
    m.step = integer<int64_t>(j.at("step"), source, "step");
    m.data_position = integer<int64_t>(j.at("data_position"), source, "data_position");
    m.checksum_block = integer<uint64_t>(j.at("checksum_block"), source, "checksum_block");
    TESSERA_CHECK(j.value("checksum", std::string("crc32c")) == "crc32c", DataLoss,
                  "checkpoint metadata '", source, "': unknown checksum '", j["checksum"], "'");
    m.user = j.at("user").get<std::map<std::string, std::string>>();
    for (const auto& f : j.at("files")) {
      m.files.push_back({f.at("name").get<std::string>(),
                         integer<uint64_t>(f.at("bytes"), source, "files.bytes")});
    }
    for (const auto& r : j.at("rank_state")) {
      m.rank_state.push_back(
          {r.at("file").get<std::string>(),
           integer<uint64_t>(r.at("byte_offset"), source, "rank_state.byte_offset"),
           integer<uint64_t>(r.at("byte_length"), source, "rank_state.byte_length"),
           integer<uint32_t>(r.at("crc32c"), source, "rank_state.crc32c")});
    }
    for (const auto& [name, t] : j.at("tensors").items()) {
      TensorMeta tm;
      tm.dtype = t.at("dtype").get<std::string>();
      tm.shape = integers<int64_t>(t.at("shape"), source, "shape");
      tm.attrs = t.at("attrs").get<std::map<std::string, std::string>>();
      for (const auto& b : t.at("boxes")) {
        SavedBox sb;
        sb.box.offset = integers<int64_t>(b.at("offset"), source, "boxes.offset");
        sb.box.length = integers<int64_t>(b.at("length"), source, "boxes.length");
        sb.ranks = integers<int>(b.at("ranks"), source, "boxes.ranks");
        sb.file = b.at("file").get<std::string>();
        sb.byte_offset = integer<uint64_t>(b.at("byte_offset"), source, "boxes.byte_offset");
        sb.byte_length = integer<uint64_t>(b.at("byte_length"), source, "boxes.byte_length");
        sb.crc32c = integers<uint32_t>(b.at("crc32c"), source, "boxes.crc32c");
        TESSERA_CHECK(
            sb.box.offset.size() == tm.shape.size() && sb.box.length.size() == tm.shape.size(),
            DataLoss, "checkpoint metadata '", source, "': tensor '", name,
            "' has a box of the wrong rank");
        tm.boxes.push_back(std::move(sb));
      }
      m.tensors.emplace(name, std::move(tm));
    }
  } catch (const json::exception& e) {
    TESSERA_THROW(DataLoss, "checkpoint metadata '", source, "' is malformed: ", e.what());
  }
  TESSERA_CHECK(m.checksum_block > 0, DataLoss, "checkpoint metadata '", source,
                "': checksum_block must be positive");
  return m;
}

Metadata read_metadata(const std::string& dir, const std::shared_ptr<Storage>& storage) {
  auto st = storage ? storage : Storage::local();
  const std::string path = dir + "/" + kMetadataFile;
  std::string text;
  try {
    text = st->read_all(path);
  } catch (const NotFound&) {
    TESSERA_THROW(NotFound, "'", dir, "' is not a complete checkpoint: it has no ", kMetadataFile,
                  st->exists(dir) ? " (the save never committed, or this is not a checkpoint)"
                                  : " (the directory does not exist)");
  }
  return Metadata::parse(text, path);
}

}  // namespace tessera::ckpt
