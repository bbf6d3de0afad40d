// tessera/core/base64.h — base64 (RFC 4648, standard alphabet, padded), as
// data: URLs and JSON payloads carry binary data.
//
//   std::string text = tessera::base64_encode(png_bytes);
//   std::string bytes = tessera::base64_decode(text, "messages[0].content[1]");
//
// Thread safety: pure functions.
#pragma once

#include <string>
#include <string_view>

namespace tessera {

std::string base64_encode(std::string_view bytes);

// Strict decoding: only the standard alphabet, '=' padding to a multiple of
// four characters (input without padding is accepted too), no whitespace,
// zero bits after the last byte. InvalidArgument naming `what` (and the
// offset of the first bad character) otherwise.
std::string base64_decode(std::string_view text, const std::string& what = "base64 data");

}  // namespace tessera
