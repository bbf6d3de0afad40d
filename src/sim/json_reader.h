// Internal to src/sim: strict, location-aware reading of JSON objects.
//
// JsonObject wraps one JSON object together with a description of where it
// sits ("cluster.json: algorithms.ring[1]", "trace.json: rank entry 2 (ranks
// [4, 5]), node 17 (id 42)"). Getters mark keys as read; check_keys() then
// rejects every key nobody read, so a misspelt key is an error. Every error
// is tessera::InvalidArgument naming the location and the field.
//
// Not thread-safe (records which keys were read). The wrapped json must
// outlive the JsonObject.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "tessera/core/config.h"
#include "tessera/core/error.h"

namespace tessera::sim::detail {

using json = nlohmann::json;

// Parses `text` as JSON; InvalidArgument naming `source`, line and column.
inline json parse_json(std::string_view text, const std::string& source) {
  try {
    return json::parse(text.begin(), text.end());
  } catch (const json::parse_error& e) {
    auto [line, column] = line_column(text, e.byte > 0 ? e.byte - 1 : 0);
    std::string what = e.what();
    auto colon = what.find(": ", what.find("parse error"));
    std::string reason = colon == std::string::npos ? what : what.substr(colon + 2);
    TESSERA_THROW(InvalidArgument, source, ": malformed JSON at line ", line, ", column ", column,
                  ": ", reason);
  } catch (const json::out_of_range& e) {
    // A number too large for a double ("1e999"): out_of_range.406.
    TESSERA_THROW(InvalidArgument, source, ": malformed JSON: ", e.what());
  }
}

class JsonObject {
 public:
  // `source` names the file, `path` the position inside it ("" for the top
  // level, "algorithms.ring[1]", "rank entry 2 (ranks [0-3]), node 5").
  JsonObject(const json& value, std::string source, std::string path = "")
      : value_(value),
        source_(std::move(source)),
        path_(std::move(path)),
        where_(path_.empty() ? source_ : source_ + ": " + path_) {
    TESSERA_CHECK(value_.is_object(), InvalidArgument, where_, ": expected a JSON object, got ",
                  value_.type_name());
  }

  const std::string& where() const { return where_; }
  const std::string& source() const { return source_; }
  // The path of a child key or list element, for nested JsonObjects.
  std::string child_path(std::string_view key) const {
    return path_.empty() ? std::string(key) : path_ + "." + std::string(key);
  }
  // Every key of the object, in the object's order (not marked as read).
  std::vector<std::string> keys() const {
    std::vector<std::string> out;
    for (auto it = value_.begin(); it != value_.end(); ++it) out.push_back(it.key());
    return out;
  }
  bool has(std::string_view key) const { return value_.contains(std::string(key)); }

  [[noreturn]] void fail(std::string_view key, const std::string& message) const {
    TESSERA_THROW(InvalidArgument, where_, ": field '", key, "': ", message);
  }

  // The raw value of a required key.
  const json& at(std::string_view key) const {
    auto it = value_.find(std::string(key));
    if (it == value_.end()) fail(key, "missing (required)");
    used_.emplace(key);
    return *it;
  }

  int64_t get_int(std::string_view key) const {
    const json& v = at(key);
    if (!v.is_number_integer()) fail(key, "expected an integer, got " + v.dump());
    return v.get<int64_t>();
  }
  int64_t get_int(std::string_view key, int64_t fallback) const {
    return has(key) ? get_int(key) : fallback;
  }
  // A non-negative integer (sizes, counts).
  int64_t get_size(std::string_view key) const {
    int64_t v = get_int(key);
    if (v < 0) fail(key, "must be >= 0, got " + std::to_string(v));
    return v;
  }
  int64_t get_size(std::string_view key, int64_t fallback) const {
    return has(key) ? get_size(key) : fallback;
  }
  // A finite number.
  double get_double(std::string_view key) const {
    const json& v = at(key);
    if (!v.is_number()) fail(key, "expected a number, got " + v.dump());
    double d = v.get<double>();
    if (!std::isfinite(d)) fail(key, "expected a finite number, got " + v.dump());
    return d;
  }
  double get_double(std::string_view key, double fallback) const {
    return has(key) ? get_double(key) : fallback;
  }
  // A finite number >= 0.
  double get_nonnegative(std::string_view key) const {
    double d = get_double(key);
    if (d < 0) fail(key, "must be >= 0, got " + at(key).dump());
    return d;
  }
  double get_nonnegative(std::string_view key, double fallback) const {
    return has(key) ? get_nonnegative(key) : fallback;
  }
  bool get_bool(std::string_view key, bool fallback) const {
    if (!has(key)) return fallback;
    const json& v = at(key);
    if (!v.is_boolean()) fail(key, "expected true or false, got " + v.dump());
    return v.get<bool>();
  }
  std::string get_string(std::string_view key) const {
    const json& v = at(key);
    if (!v.is_string()) fail(key, "expected a string, got " + v.dump());
    return v.get<std::string>();
  }
  std::string get_string(std::string_view key, std::string fallback) const {
    return has(key) ? get_string(key) : fallback;
  }
  std::vector<int64_t> get_int_list(std::string_view key) const {
    const json& v = at(key);
    if (!v.is_array()) fail(key, "expected a list of integers, got " + v.dump());
    std::vector<int64_t> out;
    out.reserve(v.size());
    for (const json& x : v) {
      if (!x.is_number_integer()) fail(key, "expected a list of integers, found " + x.dump());
      out.push_back(x.get<int64_t>());
    }
    return out;
  }
  const json& get_array(std::string_view key) const {
    const json& v = at(key);
    if (!v.is_array()) fail(key, std::string("expected a list, got ") + v.type_name());
    return v;
  }
  JsonObject get_object(std::string_view key) const {
    const json& v = at(key);
    if (!v.is_object()) fail(key, std::string("expected an object, got ") + v.type_name());
    return JsonObject(v, source_, child_path(key));
  }

  // InvalidArgument naming every key that no getter read.
  void check_keys() const {
    std::string unknown;
    for (auto it = value_.begin(); it != value_.end(); ++it) {
      if (used_.count(it.key()) == 0) unknown += (unknown.empty() ? "'" : ", '") + it.key() + "'";
    }
    TESSERA_CHECK(unknown.empty(), InvalidArgument, where_, ": unknown key(s) ", unknown);
  }

 private:
  const json& value_;
  std::string source_;
  std::string path_;
  std::string where_;
  mutable std::set<std::string, std::less<>> used_;
};

}  // namespace tessera::sim::detail
