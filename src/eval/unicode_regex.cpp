#include "unicode_regex.h"

#include "tessera/core/error.h"
#include "utf8.h"

namespace tessera::eval {

namespace {

std::wstring widen(std::string_view text) {
  std::wstring out;
  out.reserve(text.size());
  size_t pos = 0;
  while (pos < text.size()) out.push_back(static_cast<wchar_t>(utf8::decode(text, pos)));
  return out;
}

std::string narrow(const std::wstring& text) {
  std::string out;
  out.reserve(text.size());
  for (wchar_t c : text) utf8::append(out, static_cast<char32_t>(c));
  return out;
}

}  // namespace

UnicodeRegex UnicodeRegex::compile(const std::string& pattern, const std::string& where) {
  static_assert(sizeof(wchar_t) == 4, "UnicodeRegex needs a 32-bit wchar_t");
  UnicodeRegex r;
  r.pattern_ = pattern;
  try {
    r.regex_ = std::wregex(widen(pattern), std::regex::ECMAScript);
  } catch (const std::regex_error& e) {
    TESSERA_THROW(InvalidArgument, where, ": invalid regex '", pattern, "': ", e.what());
  }
  return r;
}

std::vector<std::vector<std::string>> UnicodeRegex::find_all(std::string_view text) const {
  const std::wstring wide = widen(text);
  std::vector<std::vector<std::string>> out;
  for (auto it = std::wsregex_iterator(wide.begin(), wide.end(), regex_);
       it != std::wsregex_iterator(); ++it) {
    const std::wsmatch& m = *it;
    std::vector<std::string> groups;
    if (m.size() <= 1) {
      groups.push_back(narrow(m.str(0)));
    } else {
      for (size_t g = 1; g < m.size(); ++g) groups.push_back(m[g].matched ? narrow(m.str(g)) : "");
    }
    out.push_back(std::move(groups));
  }
  return out;
}

std::string UnicodeRegex::replace_all(std::string_view text, std::string_view replacement) const {
  const std::wstring wide = widen(text);
  std::wstring out;
  auto last = wide.cbegin();
  for (auto it = std::wsregex_iterator(wide.begin(), wide.end(), regex_);
       it != std::wsregex_iterator(); ++it) {
    out.append(last, (*it)[0].first);
    out.append(widen(replacement));
    last = (*it)[0].second;
  }
  out.append(last, wide.cend());
  return narrow(out);
}

std::optional<std::string> UnicodeRegex::search(std::string_view text) const {
  const std::wstring wide = widen(text);
  std::wsmatch m;
  if (!std::regex_search(wide, m, regex_)) return std::nullopt;
  if (m.size() <= 1) return narrow(m.str(0));
  return m[1].matched ? narrow(m.str(1)) : std::string();
}

}  // namespace tessera::eval
