#include "tessera/eval/value.h"

#include <cmath>

#include "json_value.h"
#include "tessera/core/config.h"
#include "tessera/core/error.h"

namespace tessera::eval {

Value Value::list(List items) {
  Value v;
  v.data_ = std::make_shared<const List>(std::move(items));
  return v;
}

Value Value::object(Object fields) {
  Value v;
  v.data_ = std::make_shared<const Object>(std::move(fields));
  return v;
}

const char* Value::kind_name(Kind kind) {
  switch (kind) {
    case Kind::kNull:
      return "null";
    case Kind::kBool:
      return "bool";
    case Kind::kInt:
      return "int";
    case Kind::kDouble:
      return "double";
    case Kind::kString:
      return "string";
    case Kind::kList:
      return "list";
    case Kind::kObject:
      return "object";
  }
  return "?";
}

namespace {

[[noreturn]] void wrong_kind(Value::Kind want, Value::Kind got) {
  TESSERA_THROW(InvalidArgument, "expected a ", Value::kind_name(want), " value, got ",
                Value::kind_name(got));
}

}  // namespace

bool Value::as_bool() const {
  if (!is_bool()) wrong_kind(Kind::kBool, kind());
  return std::get<bool>(data_);
}

int64_t Value::as_int() const {
  if (!is_int()) wrong_kind(Kind::kInt, kind());
  return std::get<int64_t>(data_);
}

double Value::as_double() const {
  if (is_int()) return static_cast<double>(std::get<int64_t>(data_));
  if (!is_double()) wrong_kind(Kind::kDouble, kind());
  return std::get<double>(data_);
}

const std::string& Value::as_string() const {
  if (!is_string()) wrong_kind(Kind::kString, kind());
  return std::get<std::string>(data_);
}

const Value::List& Value::as_list() const {
  if (!is_list()) wrong_kind(Kind::kList, kind());
  return *std::get<std::shared_ptr<const List>>(data_);
}

const Value::Object& Value::as_object() const {
  if (!is_object()) wrong_kind(Kind::kObject, kind());
  return *std::get<std::shared_ptr<const Object>>(data_);
}

const Value* Value::find(std::string_view key) const {
  if (!is_object()) return nullptr;
  for (const auto& [k, v] : as_object()) {
    if (k == key) return &v;
  }
  return nullptr;
}

bool operator==(const Value& a, const Value& b) {
  if (a.is_number() && b.is_number()) {
    if (a.is_int() && b.is_int()) return a.as_int() == b.as_int();
    return a.as_double() == b.as_double();
  }
  if (a.kind() != b.kind()) return false;
  switch (a.kind()) {
    case Value::Kind::kNull:
      return true;
    case Value::Kind::kBool:
      return a.as_bool() == b.as_bool();
    case Value::Kind::kString:
      return a.as_string() == b.as_string();
    case Value::Kind::kList:
      return a.as_list() == b.as_list();
    case Value::Kind::kObject:
      return a.as_object() == b.as_object();
    default:
      return false;
  }
}

OrderedJson value_to_json(const Value& value) {
  switch (value.kind()) {
    case Value::Kind::kNull:
      return nullptr;
    case Value::Kind::kBool:
      return value.as_bool();
    case Value::Kind::kInt:
      return value.as_int();
    case Value::Kind::kDouble:
      return value.as_double();
    case Value::Kind::kString:
      return value.as_string();
    case Value::Kind::kList: {
      OrderedJson out = OrderedJson::array();
      for (const Value& item : value.as_list()) out.push_back(value_to_json(item));
      return out;
    }
    case Value::Kind::kObject: {
      OrderedJson out = OrderedJson::object();
      for (const auto& [k, v] : value.as_object()) {
        if (!out.contains(k)) out[k] = value_to_json(v);
      }
      return out;
    }
  }
  return nullptr;
}

Value value_from_json(const OrderedJson& json) {
  switch (json.type()) {
    case OrderedJson::value_t::null:
      return Value();
    case OrderedJson::value_t::boolean:
      return Value(json.get<bool>());
    case OrderedJson::value_t::number_integer:
      return Value(json.get<int64_t>());
    case OrderedJson::value_t::number_unsigned: {
      const auto u = json.get<uint64_t>();
      if (u <= static_cast<uint64_t>(INT64_MAX)) return Value(static_cast<int64_t>(u));
      return Value(static_cast<double>(u));
    }
    case OrderedJson::value_t::number_float:
      return Value(json.get<double>());
    case OrderedJson::value_t::string:
      return Value(json.get<std::string>());
    case OrderedJson::value_t::array: {
      Value::List items;
      items.reserve(json.size());
      for (const auto& item : json) items.push_back(value_from_json(item));
      return Value::list(std::move(items));
    }
    case OrderedJson::value_t::object: {
      Value::Object fields;
      fields.reserve(json.size());
      for (auto it = json.begin(); it != json.end(); ++it) {
        fields.emplace_back(it.key(), value_from_json(it.value()));
      }
      return Value::object(std::move(fields));
    }
    default:
      return Value();
  }
}

OrderedJson parse_json_text(std::string_view text, std::string_view source) {
  try {
    return OrderedJson::parse(text.begin(), text.end());
  } catch (const OrderedJson::parse_error& e) {
    auto [line, column] = line_column(text, e.byte > 0 ? e.byte - 1 : 0);
    std::string what = e.what();
    // nlohmann's text starts with "[json.exception.parse_error.101] parse
    // error at line L, column C: "; keep only the explanation after it.
    auto colon = what.find(": ", what.find("parse error"));
    std::string reason = colon == std::string::npos ? what : what.substr(colon + 2);
    TESSERA_THROW(InvalidArgument, source, ": malformed JSON at line ", line, ", column ", column,
                  ": ", reason);
  } catch (const OrderedJson::out_of_range& e) {
    // A number too large for a double ("1e999"): out_of_range.406.
    TESSERA_THROW(InvalidArgument, source, ": malformed JSON: ", e.what());
  }
}

Value Value::parse_json(std::string_view text, std::string_view source) {
  return value_from_json(parse_json_text(text, source));
}

std::string Value::to_json() const {
  // Invalid UTF-8 (a model can emit a cut multi-byte sequence) becomes U+FFFD
  // instead of an exception.
  return value_to_json(*this).dump(-1, ' ', false, OrderedJson::error_handler_t::replace);
}

}  // namespace tessera::eval
