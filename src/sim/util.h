// Internal to src/sim: small helpers for messages, tables and statistics.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "tessera/core/error.h"

namespace tessera::sim::detail {

// "[0-3, 8, 10-11]" for sorted ranks; long lists are cut after 8 runs.
inline std::string format_ranks(const std::vector<int>& ranks) {
  std::string out = "[";
  size_t runs = 0;
  for (size_t i = 0; i < ranks.size();) {
    size_t j = i;
    while (j + 1 < ranks.size() && ranks[j + 1] == ranks[j] + 1) ++j;
    if (runs == 8) {
      out += ", ... (" + std::to_string(ranks.size()) + " ranks)";
      break;
    }
    if (runs > 0) out += ", ";
    out += std::to_string(ranks[i]);
    if (j > i) out += "-" + std::to_string(ranks[j]);
    ++runs;
    i = j + 1;
  }
  return out + "]";
}

// The median (the mean of the two middle values for an even count); 0 for
// none.
inline double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// printf-style formatting into a std::string.
template <typename... Args>
std::string format(const char* fmt, Args... args) {
  int n = std::snprintf(nullptr, 0, fmt, args...);
  std::string out(static_cast<size_t>(n > 0 ? n : 0), '\0');
  std::snprintf(out.data(), out.size() + 1, fmt, args...);
  return out;
}

// The whole file as text; NotFound naming `what` and the path when it
// cannot be opened.
inline std::string read_text_file(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  TESSERA_CHECK(in.good(), NotFound, "cannot open ", what, " '", path, "'");
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

}  // namespace tessera::sim::detail
