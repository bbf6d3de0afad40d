#include "pre_tokenizer.h"

#include <array>

#include "unicode.h"

namespace tessera::nn {
namespace detail {
namespace {

using unicode::CharClass;

// A character of the text being split. Matchers decode forward only, and
// never more than a character or two behind where they stand.
struct Char {
  char32_t cp;
  uint32_t size;
  CharClass cls;
};

constexpr std::array<CharClass, 128> make_ascii_classes() {
  std::array<CharClass, 128> table{};
  for (int c = 0; c < 128; ++c) {
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) {
      table[c] = CharClass::kLetter;
    } else if (c >= '0' && c <= '9') {
      table[c] = CharClass::kNumber;
    } else if (c == ' ' || (c >= '\t' && c <= '\r')) {
      table[c] = CharClass::kWhitespace;
    } else {
      table[c] = CharClass::kOther;
    }
  }
  return table;
}
constexpr std::array<CharClass, 128> kAsciiClasses = make_ascii_classes();

// Requires pos < text.size().
inline Char char_at(std::string_view text, size_t pos) {
  const auto b = static_cast<unsigned char>(text[pos]);
  if (b < 0x80) return {b, 1, kAsciiClasses[b]};
  const unicode::Utf8Char u = unicode::decode_utf8(text, pos);
  return {u.cp, u.size, unicode::char_class(u.cp)};
}

inline bool is_cr_lf(char32_t cp) { return cp == '\r' || cp == '\n'; }

// End of the run of `cls` characters starting at pos.
size_t run_end(std::string_view text, size_t pos, size_t end, CharClass cls) {
  while (pos < end) {
    const Char c = char_at(text, pos);
    if (c.cls != cls) break;
    pos += c.size;
  }
  return pos;
}

// `\s+(?!\S)|\s+` at a white-space character, and with `through_cr_lf`
// `\s*[\r\n]+` before them. A run of white space followed by a non-space
// gives up its last character, so that " word" stays together.
size_t match_space(std::string_view text, size_t pos, size_t end, bool through_cr_lf) {
  size_t last = pos;     // start of the run's last character
  size_t cr_lf_end = 0;  // end of the run's last \r or \n, 0 when none
  size_t count = 0;
  size_t p = pos;
  while (p < end) {
    const Char c = char_at(text, p);
    if (c.cls != CharClass::kWhitespace) break;
    last = p;
    p += c.size;
    ++count;
    if (is_cr_lf(c.cp)) cr_lf_end = p;
  }
  if (through_cr_lf && cr_lf_end != 0) return cr_lf_end;
  if (p == end || count == 1) return p;
  return last;
}

// GPT-2: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// Returns the end of the match at pos; pos < end.
size_t match_gpt2(std::string_view text, size_t pos, size_t end) {
  const Char c = char_at(text, pos);
  if (c.cp == '\'' && pos + 1 < end) {
    const char a = text[pos + 1];
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return pos + 2;
    if (pos + 2 < end) {
      const char b = text[pos + 2];
      if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) {
        return pos + 3;
      }
    }
  }
  if (c.cp == ' ' && pos + 1 < end) {
    const Char next = char_at(text, pos + 1);
    if (next.cls != CharClass::kWhitespace) {
      return run_end(text, pos + 1 + next.size, end, next.cls);
    }
  } else if (c.cls != CharClass::kWhitespace) {
    return run_end(text, pos + c.size, end, c.cls);
  }
  return match_space(text, pos, end, /*through_cr_lf=*/false);
}

// Simple case folding as the engines apply it to (?i:'s|...): ASCII, plus
// U+017F LATIN SMALL LETTER LONG S, the one non-ASCII character that folds to
// a letter of these contractions.
inline char32_t fold(char32_t cp) {
  if (cp >= 'A' && cp <= 'Z') return cp + ('a' - 'A');
  if (cp == 0x17F) return 's';
  return cp;
}

// Llama 3 (max_digits 3) and Qwen2 (max_digits 1):
// (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,max_digits}|
//  ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
size_t match_llama3(std::string_view text, size_t pos, size_t end, int max_digits) {
  const Char c = char_at(text, pos);
  if (c.cp == '\'' && pos + 1 < end) {
    const Char n1 = char_at(text, pos + 1);
    const char32_t a = fold(n1.cp);
    const size_t after1 = pos + 1 + n1.size;
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return after1;
    if (after1 < end) {
      const Char n2 = char_at(text, after1);
      const char32_t b = fold(n2.cp);
      if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) {
        return after1 + n2.size;
      }
    }
  }
  if (c.cls == CharClass::kLetter) return run_end(text, pos + c.size, end, CharClass::kLetter);
  if (c.cls != CharClass::kNumber && !is_cr_lf(c.cp) && pos + c.size < end) {
    const Char next = char_at(text, pos + c.size);
    if (next.cls == CharClass::kLetter) {
      return run_end(text, pos + c.size + next.size, end, CharClass::kLetter);
    }
  }
  if (c.cls == CharClass::kNumber) {
    size_t p = pos + c.size;
    for (int n = 1; n < max_digits && p < end; ++n) {
      const Char next = char_at(text, p);
      if (next.cls != CharClass::kNumber) break;
      p += next.size;
    }
    return p;
  }
  size_t other = c.cls == CharClass::kOther ? pos : end;
  if (c.cp == ' ' && pos + 1 < end) {
    const Char next = char_at(text, pos + 1);
    if (next.cls == CharClass::kOther) other = pos + 1;
  }
  if (other != end) {
    size_t p = run_end(text, other, end, CharClass::kOther);
    while (p < end && (text[p] == '\r' || text[p] == '\n')) ++p;
    return p;
  }
  return match_space(text, pos, end, /*through_cr_lf=*/true);
}

template <typename Match>
void split_with(std::string_view text, size_t pos, size_t end, Match match,
                std::vector<std::string_view>& words) {
  while (pos < end) {
    const size_t next = match(text, pos, end);
    words.push_back(text.substr(pos, next - pos));
    pos = next;
  }
}

}  // namespace

void split_words(std::string_view text, PreTokenizerKind kind,
                 std::vector<std::string_view>& words) {
  switch (kind) {
    case PreTokenizerKind::kGpt2:
      split_with(text, 0, text.size(), match_gpt2, words);
      return;
    case PreTokenizerKind::kLlama3:
      split_with(
          text, 0, text.size(),
          [](std::string_view t, size_t p, size_t e) { return match_llama3(t, p, e, 3); }, words);
      return;
    case PreTokenizerKind::kQwen2:
      split_with(
          text, 0, text.size(),
          [](std::string_view t, size_t p, size_t e) { return match_llama3(t, p, e, 1); }, words);
      return;
    case PreTokenizerKind::kSmolLM: {
      // Each \p{N} stands alone; GPT-2 splits each stretch between them as a
      // text of its own, so a lookahead stops at the digit.
      size_t pos = 0;
      while (pos < text.size()) {
        const Char c = char_at(text, pos);
        if (c.cls == CharClass::kNumber) {
          words.push_back(text.substr(pos, c.size));
          pos += c.size;
          continue;
        }
        size_t stretch_end = pos + c.size;
        while (stretch_end < text.size()) {
          const Char n = char_at(text, stretch_end);
          if (n.cls == CharClass::kNumber) break;
          stretch_end += n.size;
        }
        split_with(text, pos, stretch_end, match_gpt2, words);
        pos = stretch_end;
      }
      return;
    }
    case PreTokenizerKind::kNone:
      if (!text.empty()) words.push_back(text);
      return;
  }
}

}  // namespace detail

const char* pre_tokenizer_name(PreTokenizerKind kind) {
  switch (kind) {
    case PreTokenizerKind::kGpt2:
      return "gpt2";
    case PreTokenizerKind::kLlama3:
      return "llama3";
    case PreTokenizerKind::kQwen2:
      return "qwen2";
    case PreTokenizerKind::kSmolLM:
      return "smollm";
    case PreTokenizerKind::kNone:
      return "none";
  }
  return "unknown";
}

std::vector<std::string_view> pre_tokenize(std::string_view text, PreTokenizerKind kind) {
  std::vector<std::string_view> words;
  detail::split_words(text, kind, words);
  return words;
}

}  // namespace tessera::nn
