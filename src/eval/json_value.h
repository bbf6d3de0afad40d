// src/eval/json_value.h — conversions between Value and nlohmann::ordered_json.
//
// Private to the eval module: the public API never exposes nlohmann. Object
// key order is preserved both ways. Pure functions; thread-safe.
#pragma once

#include <nlohmann/json.hpp>

#include "tessera/eval/value.h"

namespace tessera::eval {

using OrderedJson = nlohmann::ordered_json;

OrderedJson value_to_json(const Value& value);
Value value_from_json(const OrderedJson& json);

// Parses JSON text; InvalidArgument "<source>: malformed JSON at line L, column C: ...".
OrderedJson parse_json_text(std::string_view text, std::string_view source);

}  // namespace tessera::eval
