// tessera/eval/value.h — a JSON-like value: one dataset document or a template variable.
//
// Evaluation data sets are JSON/JSONL records ("documents"); templates read
// their fields. Value holds such a record without exposing a JSON library in
// the public API: null, bool, integer, double, UTF-8 string, list, or object
// (an ordered list of key/value pairs, in file order, so logs echo documents
// as they were written).
//
//   Value doc = Value::parse_json(R"({"question": "1+1?", "choices": ["1", "2"]})");
//   doc.find("choices")->as_list()[1].as_string();          // "2"
//   Value::object({{"q", Value("hi")}, {"n", Value(3)}}).to_json();  // {"q":"hi","n":3}
//
// Lists and objects are shared, immutable storage: copying a Value is cheap
// and a Value may be read from many threads at once.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

namespace tessera::eval {

class Value {
 public:
  enum class Kind { kNull, kBool, kInt, kDouble, kString, kList, kObject };
  using List = std::vector<Value>;
  using Object = std::vector<std::pair<std::string, Value>>;

  Value() = default;  // null
  Value(std::nullptr_t) {}
  Value(bool b) : data_(b) {}
  Value(int i) : data_(static_cast<int64_t>(i)) {}
  Value(int64_t i) : data_(i) {}
  Value(double d) : data_(d) {}
  Value(std::string s) : data_(std::move(s)) {}
  Value(const char* s) : data_(std::string(s)) {}
  Value(std::string_view s) : data_(std::string(s)) {}
  static Value list(List items);
  // Later duplicates of a key are kept but find() returns the first.
  static Value object(Object fields);

  // Parses one JSON value (objects keep their key order). InvalidArgument
  // naming `source` with line and column when the text is not JSON.
  static Value parse_json(std::string_view text, std::string_view source = "<inline>");

  Kind kind() const { return static_cast<Kind>(data_.index()); }
  bool is_null() const { return kind() == Kind::kNull; }
  bool is_bool() const { return kind() == Kind::kBool; }
  bool is_int() const { return kind() == Kind::kInt; }
  bool is_double() const { return kind() == Kind::kDouble; }
  bool is_number() const { return is_int() || is_double(); }
  bool is_string() const { return kind() == Kind::kString; }
  bool is_list() const { return kind() == Kind::kList; }
  bool is_object() const { return kind() == Kind::kObject; }

  // Typed access; InvalidArgument when the kind differs (as_double accepts ints).
  bool as_bool() const;
  int64_t as_int() const;
  double as_double() const;
  const std::string& as_string() const;
  const List& as_list() const;
  const Object& as_object() const;

  // Field of an object; nullptr when absent or when this is not an object.
  const Value* find(std::string_view key) const;

  // Compact JSON text (UTF-8 kept as is; doubles printed so that they read
  // back exactly).
  std::string to_json() const;

  // Structural equality; an int and a double are equal when numerically equal.
  friend bool operator==(const Value& a, const Value& b);
  friend bool operator!=(const Value& a, const Value& b) { return !(a == b); }

  // "null", "bool", "int", "double", "string", "list", "object".
  static const char* kind_name(Kind kind);

 private:
  std::variant<std::monostate, bool, int64_t, double, std::string, std::shared_ptr<const List>,
               std::shared_ptr<const Object>>
      data_;
};

}  // namespace tessera::eval
