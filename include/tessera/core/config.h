// tessera/core/config.h — JSON configuration with strict keys.
//
// A ConfigObject is one JSON object read from a file or a string. Typed
// getters read fields and remember which keys were read; after an Options
// struct has taken what it knows, check_no_unknown_keys() rejects anything
// left over, by name, so that a misspelt key is an error rather than a
// silently ignored setting.
//
//   auto cfg = tessera::ConfigObject::load_file("train.json");
//   opts.lr = cfg.get_double("lr", 3e-4);
//   auto model = cfg.get_object("model");
//   opts.layers = model.get_int("num_layers");        // required
//   cfg.check_no_unknown_keys();   // throws: "train.json: unknown key 'model.num_layer'"
//
// Errors are tessera::InvalidArgument naming the source, the key path and,
// for malformed JSON, the line and column. A ConfigObject obtained from
// get_object() shares state with its parent. Not thread-safe.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace tessera {

// 1-based line and column of byte `offset` in `text`, for messages about
// malformed JSON (nlohmann reports byte offsets). Shared by every JSON reader.
std::pair<size_t, size_t> line_column(std::string_view text, size_t offset);

class ConfigObject {
 public:
  // Parses `text`, which must hold a JSON object. `source` names it in
  // messages (a file name, "<inline>").
  static ConfigObject parse(std::string_view text, std::string source = "<inline>");
  // Reads and parses a file. NotFound if it cannot be opened.
  static ConfigObject load_file(const std::string& path);

  ConfigObject(const ConfigObject&);
  ConfigObject& operator=(const ConfigObject&);
  ConfigObject(ConfigObject&&) noexcept;
  ConfigObject& operator=(ConfigObject&&) noexcept;
  ~ConfigObject();

  // "train.json" for the root, "train.json:model.attention" for children.
  std::string where() const;
  bool has(std::string_view key) const;
  std::vector<std::string> keys() const;

  // Required getters throw InvalidArgument when the key is missing or has
  // the wrong type; the ones with a default only when the type is wrong.
  int64_t get_int(std::string_view key) const;
  int64_t get_int(std::string_view key, int64_t fallback) const;
  double get_double(std::string_view key) const;
  double get_double(std::string_view key, double fallback) const;
  bool get_bool(std::string_view key) const;
  bool get_bool(std::string_view key, bool fallback) const;
  std::string get_string(std::string_view key) const;
  std::string get_string(std::string_view key, std::string fallback) const;
  std::vector<int64_t> get_int_list(std::string_view key) const;
  std::vector<double> get_double_list(std::string_view key) const;
  std::vector<std::string> get_string_list(std::string_view key) const;
  ConfigObject get_object(std::string_view key) const;
  // True when the key is present with the value null.
  bool is_null(std::string_view key) const;
  // The value as JSON text (any type); marks the key read.
  std::string get_raw(std::string_view key) const;
  // Marks a key as known without reading it (fields kept for other tools).
  void ignore(std::string_view key) const;

  // Throws InvalidArgument listing every key of this object, and of every
  // object taken from it with get_object(), that no getter has read.
  void check_no_unknown_keys() const;

  // The object as compact JSON text.
  std::string dump() const;

 private:
  struct Node;
  explicit ConfigObject(std::shared_ptr<Node> node);
  std::shared_ptr<Node> node_;
};

}  // namespace tessera
