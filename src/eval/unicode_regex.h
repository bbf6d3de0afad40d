// src/eval/unicode_regex.h — regular expressions over code points.
//
// Task files carry regexes (filters, exact_match's regexes_to_ignore) that
// mix ASCII syntax with Chinese literals and classes such as [：:]. std::regex
// over UTF-8 bytes would split those characters, so patterns and texts are
// decoded to UTF-32 and matched with std::wregex (wchar_t is 32 bits on the
// platforms Tessera supports). Syntax is ECMAScript: no lookbehind, no
// (?s) / (?P<name>) — write [\s\S] instead of a DOTALL dot.
//
// Immutable after compile(); safe to share between threads.
#pragma once

#include <optional>
#include <regex>
#include <string>
#include <string_view>
#include <vector>

namespace tessera::eval {

class UnicodeRegex {
 public:
  // InvalidArgument "<where>: invalid regex '<pattern>': <reason>".
  static UnicodeRegex compile(const std::string& pattern, const std::string& where);

  // Python's re.findall: one entry per non-overlapping match, holding the
  // whole match when the pattern has no groups, else the groups (an unmatched
  // group is an empty string, as in Python).
  std::vector<std::vector<std::string>> find_all(std::string_view text) const;

  // Python's re.sub(pattern, replacement, text) with a literal replacement.
  std::string replace_all(std::string_view text, std::string_view replacement) const;

  // Group 1 (or the whole match when there are no groups) of the first match.
  std::optional<std::string> search(std::string_view text) const;

  size_t group_count() const { return regex_.mark_count(); }
  const std::string& pattern() const { return pattern_; }

 private:
  std::string pattern_;
  std::wregex regex_;
};

}  // namespace tessera::eval
