// metadata.json: reading and writing. No ATen here (compile time).
#include <nlohmann/json.hpp>

#include "tessera/ckpt/checkpoint.h"
#include "tessera/core/error.h"

namespace tessera::ckpt {

using nlohmann::json;

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
    m.format_version = j.at("format_version").get<int>();
  } catch (const json::exception& e) {
    TESSERA_THROW(DataLoss, "checkpoint metadata '", source, "': bad format_version: ", e.what());
  }
  TESSERA_CHECK(m.format_version == kFormatVersion, FailedPrecondition, "checkpoint metadata '",
                source, "' has format_version ", m.format_version,
                "; this reader understands only version ", kFormatVersion,
                " (written by a newer or older Tessera?)");
  try {
    m.world_size = j.at("world_size").get<int>();
    m.step = j.at("step").get<int64_t>();
    m.data_position = j.at("data_position").get<int64_t>();
    m.checksum_block = j.at("checksum_block").get<uint64_t>();
    TESSERA_CHECK(j.value("checksum", std::string("crc32c")) == "crc32c", DataLoss,
                  "checkpoint metadata '", source, "': unknown checksum '", j["checksum"], "'");
    m.user = j.at("user").get<std::map<std::string, std::string>>();
    for (const auto& f : j.at("files")) {
      m.files.push_back({f.at("name").get<std::string>(), f.at("bytes").get<uint64_t>()});
    }
    for (const auto& r : j.at("rank_state")) {
      m.rank_state.push_back({r.at("file").get<std::string>(), r.at("byte_offset").get<uint64_t>(),
                              r.at("byte_length").get<uint64_t>(), r.at("crc32c").get<uint32_t>()});
    }
    for (const auto& [name, t] : j.at("tensors").items()) {
      TensorMeta tm;
      tm.dtype = t.at("dtype").get<std::string>();
      tm.shape = t.at("shape").get<std::vector<int64_t>>();
      tm.attrs = t.at("attrs").get<std::map<std::string, std::string>>();
      for (const auto& b : t.at("boxes")) {
        SavedBox sb;
        sb.box.offset = b.at("offset").get<std::vector<int64_t>>();
        sb.box.length = b.at("length").get<std::vector<int64_t>>();
        sb.ranks = b.at("ranks").get<std::vector<int>>();
        sb.file = b.at("file").get<std::string>();
        sb.byte_offset = b.at("byte_offset").get<uint64_t>();
        sb.byte_length = b.at("byte_length").get<uint64_t>();
        sb.crc32c = b.at("crc32c").get<std::vector<uint32_t>>();
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
