// src/eval/utf8.h — UTF-8 and character-class helpers private to the eval module.
//
// The harness works on UTF-8 std::string throughout; these helpers decode it
// to code points where a rule is defined per character (Python's str.split()
// whitespace, Han ranges for segmentation, code-point lengths for acc_norm).
// Invalid UTF-8 bytes decode to U+FFFD one byte at a time, so no input can
// make a loop stall or read out of bounds.
//
// Pure functions; thread-safe.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace tessera::eval::utf8 {

inline constexpr char32_t kReplacement = 0xFFFD;

// Decodes the code point starting at byte `pos` and advances `pos` past it.
// Precondition: pos < text.size().
char32_t decode(std::string_view text, size_t& pos);

// Appends the UTF-8 encoding of `cp` (U+FFFD for surrogates and values above U+10FFFF).
void append(std::string& out, char32_t cp);

std::u32string to_u32(std::string_view text);
std::string from_u32(std::u32string_view text);

// Number of code points (Python's len() of the decoded str).
size_t length(std::string_view text);

// Python's str.isspace() for one code point (the characters str.split() and
// str.strip() treat as whitespace).
bool is_space(char32_t cp);

// CJK ideographs: Unified (incl. extensions A-H), compatibility ideographs and
// U+3007 (〇). These are the characters the Cantonese segmenter matches words over.
bool is_han(char32_t cp);

inline bool is_ascii_alnum(char32_t cp) {
  return (cp >= '0' && cp <= '9') || (cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z');
}

// Python's str.strip() / lstrip() / rstrip() with no argument.
std::string strip(std::string_view text);
std::string lstrip(std::string_view text);
std::string rstrip(std::string_view text);

// ASCII-only case mapping: other characters pass through unchanged.
std::string ascii_lower(std::string_view text);
std::string ascii_upper(std::string_view text);

}  // namespace tessera::eval::utf8
