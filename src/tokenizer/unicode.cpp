#include "unicode.h"

#include <algorithm>
#include <vector>

namespace tessera::nn::unicode {
namespace {

// Hangul syllable arithmetic (Unicode §3.12): syllables are not in the
// decomposition tables, their (de)composition is computed.
constexpr char32_t kSBase = 0xAC00, kLBase = 0x1100, kVBase = 0x1161, kTBase = 0x11A7;
constexpr char32_t kLCount = 19, kVCount = 21, kTCount = 28;
constexpr char32_t kNCount = kVCount * kTCount, kSCount = kLCount * kNCount;

// Invalid UTF-8 bytes ride through normalization as 0x80000000 | byte: not a
// code point, combining class 0, composes with nothing.
constexpr char32_t kRawByteTag = 0x80000000;

// The value of the run that contains `cp` in a runs table (see unicode.h).
uint32_t run_value(const uint32_t* runs, size_t size, int shift, char32_t cp) {
  const uint32_t key = (uint32_t(cp) << shift) | ((1u << shift) - 1);
  const uint32_t* it = std::upper_bound(runs, runs + size, key);
  return it == runs ? 0 : (*(it - 1) & ((1u << shift) - 1));
}

uint8_t combining_class(char32_t cp) {
  if (cp < 0x300 || cp > 0x10FFFF) return 0;
  return uint8_t(run_value(detail::kCccRuns, detail::kCccRunsSize, 8, cp));
}

bool needs_nfc_check(char32_t cp) {
  // Nothing below U+0300 can change under NFC.
  if (cp < 0x300 || cp > 0x10FFFF) return false;
  return run_value(detail::kNfcCheckRuns, detail::kNfcCheckRunsSize, 1, cp) != 0;
}

void decompose(char32_t cp, std::vector<char32_t>& out) {
  if (cp >= kSBase && cp < kSBase + kSCount) {
    const char32_t s = cp - kSBase;
    out.push_back(kLBase + s / kNCount);
    out.push_back(kVBase + (s % kNCount) / kTCount);
    if (s % kTCount != 0) out.push_back(kTBase + s % kTCount);
    return;
  }
  if (cp >= 0xC0 && cp <= 0x10FFFF) {
    const auto* begin = detail::kDecompositions;
    const auto* end = begin + detail::kDecompositionsSize;
    const auto* it = std::lower_bound(
        begin, end, cp, [](const detail::Decomposition& d, char32_t c) { return d.cp < c; });
    if (it != end && it->cp == cp) {
      decompose(it->first, out);
      if (it->second != 0) decompose(it->second, out);
      return;
    }
  }
  out.push_back(cp);
}

// The primary composite of first + second, or 0 when there is none.
char32_t compose(char32_t first, char32_t second) {
  if (first >= kLBase && first < kLBase + kLCount && second >= kVBase &&
      second < kVBase + kVCount) {
    return kSBase + ((first - kLBase) * kVCount + (second - kVBase)) * kTCount;
  }
  if (first >= kSBase && first < kSBase + kSCount && (first - kSBase) % kTCount == 0 &&
      second > kTBase && second < kTBase + kTCount) {
    return first + (second - kTBase);
  }
  const auto* begin = detail::kCompositions;
  const auto* end = begin + detail::kCompositionsSize;
  const auto* it =
      std::lower_bound(begin, end, std::make_pair(first, second),
                       [](const detail::Composition& c, std::pair<char32_t, char32_t> k) {
                         return c.first < k.first || (c.first == k.first && c.second < k.second);
                       });
  return (it != end && it->first == first && it->second == second) ? it->composite : 0;
}

}  // namespace

CharClass char_class(char32_t cp) {
  if (cp < 0x80) {
    if (cp >= 'a' && cp <= 'z') return CharClass::kLetter;
    if (cp >= 'A' && cp <= 'Z') return CharClass::kLetter;
    if (cp >= '0' && cp <= '9') return CharClass::kNumber;
    if (cp == ' ' || (cp >= '\t' && cp <= '\r')) return CharClass::kWhitespace;
    return CharClass::kOther;
  }
  if (cp > 0x10FFFF) return CharClass::kOther;
  return CharClass(run_value(detail::kClassRuns, detail::kClassRunsSize, 2, cp));
}

void append_utf8(char32_t cp, std::string& out) {
  if (cp < 0x80) {
    out.push_back(char(cp));
  } else if (cp < 0x800) {
    out.push_back(char(0xC0 | (cp >> 6)));
    out.push_back(char(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(char(0xE0 | (cp >> 12)));
    out.push_back(char(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(char(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(char(0xF0 | (cp >> 18)));
    out.push_back(char(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(char(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(char(0x80 | (cp & 0x3F)));
  }
}

bool is_nfc_quick(std::string_view text) {
  for (size_t pos = 0; pos < text.size();) {
    // U+0300 is the first code point NFC can change; its lead byte is 0xCC.
    if (static_cast<unsigned char>(text[pos]) < 0xCC) {
      ++pos;
      continue;
    }
    const Utf8Char c = decode_utf8(text, pos);
    if (needs_nfc_check(c.cp)) return false;
    pos += c.size;
  }
  return true;
}

std::string to_nfc(std::string_view text) {
  // 1. Full canonical decomposition.
  std::vector<char32_t> cps;
  cps.reserve(text.size());
  for (size_t pos = 0; pos < text.size();) {
    const Utf8Char c = decode_utf8(text, pos);
    if (c.cp == kInvalid) {
      cps.push_back(kRawByteTag | static_cast<unsigned char>(text[pos]));
    } else {
      decompose(c.cp, cps);
    }
    pos += c.size;
  }
  // 2. Canonical ordering: a stable sort by combining class of every run of
  // non-starters. Runs are short, so insertion sort.
  for (size_t i = 1; i < cps.size(); ++i) {
    const uint8_t ccc = combining_class(cps[i]);
    if (ccc == 0) continue;
    size_t j = i;
    while (j > 0) {
      const uint8_t prev = combining_class(cps[j - 1]);
      if (prev == 0 || prev <= ccc) break;
      std::swap(cps[j - 1], cps[j]);
      --j;
    }
  }
  // 3. Canonical composition (the algorithm of UAX #15's reference code): a
  // character joins the last starter unless a character between them blocks
  // it (has class 0, or a class not below its own).
  if (!cps.empty()) {
    size_t starter = 0;
    size_t kept = 1;
    int last_class = combining_class(cps[0]) == 0 ? 0 : 256;
    for (size_t i = 1; i < cps.size(); ++i) {
      const char32_t c = cps[i];
      const int cls = combining_class(c);
      const char32_t composite =
          (cps[starter] & kRawByteTag) || (c & kRawByteTag) ? 0 : compose(cps[starter], c);
      if (composite != 0 && (last_class < cls || last_class == 0)) {
        cps[starter] = composite;
        continue;
      }
      if (cls == 0) starter = kept;
      last_class = cls;
      cps[kept++] = c;
    }
    cps.resize(kept);
  }
  std::string out;
  out.reserve(text.size());
  for (char32_t c : cps) {
    if (c & kRawByteTag) {
      out.push_back(char(c & 0xFF));
    } else {
      append_utf8(c, out);
    }
  }
  return out;
}

const char* tables_version() { return detail::kTablesUnicodeVersion; }

}  // namespace tessera::nn::unicode
