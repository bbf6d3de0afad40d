#include "tessera/core/config.h"

#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "tessera/core/error.h"

namespace tessera {

using json = nlohmann::json;

struct ConfigObject::Node {
  json value;
  std::string source;  // file name or "<inline>"
  std::string path;    // dotted key path below the root, "" for the root
  std::set<std::string, std::less<>> used;
  std::map<std::string, std::shared_ptr<Node>, std::less<>> children;

  std::string where() const { return path.empty() ? source : source + ":" + path; }
  std::string key_path(std::string_view key) const {
    return path.empty() ? std::string(key) : path + "." + std::string(key);
  }
};

namespace {

const char* type_name(const json& v) { return v.type_name(); }

}  // namespace

std::pair<size_t, size_t> line_column(std::string_view text, size_t offset) {
  size_t line = 1, column = 1;
  for (size_t i = 0; i < offset && i < text.size(); ++i) {
    if (text[i] == '\n') {
      ++line;
      column = 1;
    } else {
      ++column;
    }
  }
  return {line, column};
}

ConfigObject::ConfigObject(std::shared_ptr<Node> node) : node_(std::move(node)) {}
ConfigObject::ConfigObject(const ConfigObject&) = default;
ConfigObject& ConfigObject::operator=(const ConfigObject&) = default;
ConfigObject::ConfigObject(ConfigObject&&) noexcept = default;
ConfigObject& ConfigObject::operator=(ConfigObject&&) noexcept = default;
ConfigObject::~ConfigObject() = default;

ConfigObject ConfigObject::parse(std::string_view text, std::string source) {
  auto node = std::make_shared<Node>();
  node->source = std::move(source);
  try {
    node->value = json::parse(text.begin(), text.end());
  } catch (const json::parse_error& e) {
    // e.byte is 1-based and points just past the offending character.
    auto [line, column] = line_column(text, e.byte > 0 ? e.byte - 1 : 0);
    std::string what = e.what();
    // nlohmann's text starts with "[json.exception.parse_error.101] parse
    // error at line L, column C: "; keep only the explanation after it.
    auto colon = what.find(": ", what.find("parse error"));
    std::string reason = colon == std::string::npos ? what : what.substr(colon + 2);
    TESSERA_THROW(InvalidArgument, node->source, ": malformed JSON at line ", line, ", column ",
                  column, ": ", reason);
  } catch (const json::out_of_range& e) {
    // A number too large for a double ("1e999"): nlohmann's parser reports
    // it as out_of_range.406, not as a parse_error.
    TESSERA_THROW(InvalidArgument, node->source, ": malformed JSON: ", e.what());
  }
  TESSERA_CHECK(node->value.is_object(), InvalidArgument, node->source,
                ": expected a JSON object at the top level, got ", type_name(node->value));
  return ConfigObject(std::move(node));
}

ConfigObject ConfigObject::load_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  TESSERA_CHECK(in.good(), NotFound, "cannot open config file '", path, "'");
  std::stringstream buffer;
  buffer << in.rdbuf();
  return parse(buffer.str(), path);
}

std::string ConfigObject::where() const { return node_->where(); }

bool ConfigObject::has(std::string_view key) const {
  return node_->value.find(std::string(key)) != node_->value.end();
}

std::vector<std::string> ConfigObject::keys() const {
  std::vector<std::string> out;
  for (auto it = node_->value.begin(); it != node_->value.end(); ++it) out.push_back(it.key());
  return out;
}

// Getter bodies share these: find the key and mark it read, require it,
// and check its JSON type.
#define TESSERA_CONFIG_FIND(key)                   \
  const json* found = nullptr;                     \
  {                                                \
    auto it = node_->value.find(std::string(key)); \
    if (it != node_->value.end()) {                \
      node_->used.emplace(key);                    \
      found = &*it;                                \
    }                                              \
  }

#define TESSERA_CONFIG_REQUIRE(key)                                                           \
  TESSERA_CONFIG_FIND(key)                                                                    \
  TESSERA_CHECK(found != nullptr, InvalidArgument, node_->source, ": missing required key '", \
                node_->key_path(key), "'");

#define TESSERA_CONFIG_TYPE(cond, key, expected)                                       \
  TESSERA_CHECK(cond, InvalidArgument, node_->source, ": key '", node_->key_path(key), \
                "' must be ", expected, ", got ", found->type_name(), " ", found->dump());

int64_t ConfigObject::get_int(std::string_view key) const {
  TESSERA_CONFIG_REQUIRE(key)
  TESSERA_CONFIG_TYPE(found->is_number_integer(), key, "an integer")
  return found->get<int64_t>();
}

int64_t ConfigObject::get_int(std::string_view key, int64_t fallback) const {
  return has(key) ? get_int(key) : fallback;
}

double ConfigObject::get_double(std::string_view key) const {
  TESSERA_CONFIG_REQUIRE(key)
  TESSERA_CONFIG_TYPE(found->is_number(), key, "a number")
  return found->get<double>();
}

double ConfigObject::get_double(std::string_view key, double fallback) const {
  return has(key) ? get_double(key) : fallback;
}

bool ConfigObject::get_bool(std::string_view key) const {
  TESSERA_CONFIG_REQUIRE(key)
  TESSERA_CONFIG_TYPE(found->is_boolean(), key, "true or false")
  return found->get<bool>();
}

bool ConfigObject::get_bool(std::string_view key, bool fallback) const {
  return has(key) ? get_bool(key) : fallback;
}

std::string ConfigObject::get_string(std::string_view key) const {
  TESSERA_CONFIG_REQUIRE(key)
  TESSERA_CONFIG_TYPE(found->is_string(), key, "a string")
  return found->get<std::string>();
}

std::string ConfigObject::get_string(std::string_view key, std::string fallback) const {
  return has(key) ? get_string(key) : fallback;
}

std::vector<int64_t> ConfigObject::get_int_list(std::string_view key) const {
  TESSERA_CONFIG_REQUIRE(key)
  TESSERA_CONFIG_TYPE(found->is_array(), key, "a list of integers")
  std::vector<int64_t> out;
  for (const auto& v : *found) {
    TESSERA_CHECK(v.is_number_integer(), InvalidArgument, node_->source, ": key '",
                  node_->key_path(key), "' must be a list of integers, found ", v.dump());
    out.push_back(v.get<int64_t>());
  }
  return out;
}

std::vector<double> ConfigObject::get_double_list(std::string_view key) const {
  TESSERA_CONFIG_REQUIRE(key)
  TESSERA_CONFIG_TYPE(found->is_array(), key, "a list of numbers")
  std::vector<double> out;
  for (const auto& v : *found) {
    TESSERA_CHECK(v.is_number(), InvalidArgument, node_->source, ": key '", node_->key_path(key),
                  "' must be a list of numbers, found ", v.dump());
    out.push_back(v.get<double>());
  }
  return out;
}

std::vector<std::string> ConfigObject::get_string_list(std::string_view key) const {
  TESSERA_CONFIG_REQUIRE(key)
  TESSERA_CONFIG_TYPE(found->is_array(), key, "a list of strings")
  std::vector<std::string> out;
  for (const auto& v : *found) {
    TESSERA_CHECK(v.is_string(), InvalidArgument, node_->source, ": key '", node_->key_path(key),
                  "' must be a list of strings, found ", v.dump());
    out.push_back(v.get<std::string>());
  }
  return out;
}

ConfigObject ConfigObject::get_object(std::string_view key) const {
  TESSERA_CONFIG_REQUIRE(key)
  TESSERA_CONFIG_TYPE(found->is_object(), key, "an object")
  auto it = node_->children.find(key);
  if (it != node_->children.end()) return ConfigObject(it->second);
  auto child = std::make_shared<Node>();
  child->value = *found;
  child->source = node_->source;
  child->path = node_->key_path(key);
  node_->children.emplace(std::string(key), child);
  return ConfigObject(std::move(child));
}

bool ConfigObject::is_null(std::string_view key) const {
  auto it = node_->value.find(std::string(key));
  return it != node_->value.end() && it->is_null();
}

std::string ConfigObject::get_raw(std::string_view key) const {
  TESSERA_CONFIG_REQUIRE(key)
  return found->dump();
}

void ConfigObject::ignore(std::string_view key) const { node_->used.emplace(key); }

void ConfigObject::check_no_unknown_keys() const {
  std::vector<std::string> unknown;
  std::vector<const Node*> pending{node_.get()};
  while (!pending.empty()) {
    const Node* node = pending.back();
    pending.pop_back();
    for (auto it = node->value.begin(); it != node->value.end(); ++it) {
      if (node->used.count(it.key()) == 0) unknown.push_back(node->key_path(it.key()));
    }
    for (const auto& [name, child] : node->children) pending.push_back(child.get());
  }
  if (unknown.empty()) return;
  std::string list;
  for (const auto& key : unknown) list += (list.empty() ? "'" : ", '") + key + "'";
  TESSERA_THROW(InvalidArgument, node_->source, ": unknown key", unknown.size() > 1 ? "s " : " ",
                list);
}

std::string ConfigObject::dump() const { return node_->value.dump(); }

#undef TESSERA_CONFIG_FIND
#undef TESSERA_CONFIG_REQUIRE
#undef TESSERA_CONFIG_TYPE

}  // namespace tessera
