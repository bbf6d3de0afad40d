#include "tessera/eval/filters.h"

#include <cctype>

#include "tessera/core/error.h"
#include "unicode_regex.h"
#include "utf8.h"

namespace tessera::eval {

// ---------------------------------------------------------------------------
// GSM8K numbers

std::optional<std::string> canonical_number(std::string_view text) {
  size_t i = 0;
  bool negative = false;
  if (i < text.size() && text[i] == '-') {
    negative = true;
    ++i;
  }
  const size_t int_begin = i;
  while (i < text.size() && std::isdigit(static_cast<unsigned char>(text[i]))) ++i;
  std::string int_part(text.substr(int_begin, i - int_begin));
  if (int_part.empty()) return std::nullopt;
  std::string frac_part;
  if (i < text.size() && text[i] == '.') {
    ++i;
    const size_t frac_begin = i;
    while (i < text.size() && std::isdigit(static_cast<unsigned char>(text[i]))) ++i;
    frac_part = std::string(text.substr(frac_begin, i - frac_begin));
  }
  if (i != text.size()) return std::nullopt;
  const size_t nonzero = int_part.find_first_not_of('0');
  int_part = nonzero == std::string::npos ? "0" : int_part.substr(nonzero);
  while (!frac_part.empty() && frac_part.back() == '0') frac_part.pop_back();
  std::string out = int_part;
  if (!frac_part.empty()) out += "." + frac_part;
  if (negative && out != "0") out = "-" + out;
  return out;
}

std::optional<std::string> extract_gsm8k_number(std::string_view input) {
  std::string text;
  for (char c : input) {
    if (c != ',') text += c;
  }
  static const UnicodeRegex kMarked =
      UnicodeRegex::compile(R"(####\s*\$?\s*(-?[0-9]+(?:\.[0-9]*)?))", "gsm8k marked answer");
  if (auto marked = kMarked.search(text)) return canonical_number(*marked);
  // Only the part before a continuation the model invented.
  static const UnicodeRegex kContinuation =
      UnicodeRegex::compile("Question:|Example:|問題：|樣例：", "gsm8k continuation");
  const auto parts = kContinuation.find_all(text);
  if (!parts.empty()) {
    const std::string marker = parts.front().front();
    text = text.substr(0, text.find(marker));
  }
  static const UnicodeRegex kNumber =
      UnicodeRegex::compile(R"(-?[0-9]+(?:\.[0-9]+)?)", "gsm8k number");
  const auto numbers = kNumber.find_all(text);
  if (numbers.empty()) return std::nullopt;
  return canonical_number(numbers.back().front());
}

// ---------------------------------------------------------------------------
// Choice letters

namespace {

std::string fold_fullwidth(std::string_view text) {
  std::string out;
  size_t pos = 0;
  while (pos < text.size()) {
    char32_t cp = utf8::decode(text, pos);
    if (cp >= 0xFF21 && cp <= 0xFF3A) cp = cp - 0xFF21 + 'A';  // Ａ-Ｚ
    if (cp >= 0xFF41 && cp <= 0xFF5A) cp = cp - 0xFF41 + 'a';  // ａ-ｚ
    utf8::append(out, cp);
  }
  return out;
}

struct LetterPatterns {
  UnicodeRegex statement;
  UnicodeRegex leading;
  UnicodeRegex bracketed;
};

LetterPatterns make_patterns(std::string_view letters) {
  const std::string cls = "[" + std::string(letters) + "]";
  const std::string open = "[\\(（\\[【]";
  const std::string close = "[\\)）\\]】]";
  return LetterPatterns{
      UnicodeRegex::compile("(?:正確答案|正确答案|答案|回應|回应|選擇|选择|答|選|[Aa]nswer|ANSWER)"
                            "\\s*(?:應該|应该)?\\s*"
                            "(?:係|是|為|为|is)?\\s*[:：]?\\s*" +
                                open + "?\\s*(" + cls + ")(?![A-Za-z0-9])",
                            "choice letter statement"),
      // The opening letter must end there: "A同B都唔啱" does not answer A.
      UnicodeRegex::compile(
          "^\\s*" + open + "?(" + cls + ")(?=$|[\\s\\.．。、,，:：;；!！?？\\)）\\]】])",
          "choice letter lead"),
      UnicodeRegex::compile(open + "(" + cls + ")" + close, "choice letter bracket"),
  };
}

}  // namespace

std::optional<std::string> extract_choice_letter(std::string_view input, std::string_view letters) {
  TESSERA_CHECK(!letters.empty(), InvalidArgument, "extract_choice_letter: no letters given");
  for (char c : letters) {
    TESSERA_CHECK(c >= 'A' && c <= 'Z', InvalidArgument,
                  "extract_choice_letter: letters must be upper-case ASCII, got '", letters, "'");
  }
  const std::string text = fold_fullwidth(input);
  static const LetterPatterns kAbcd = make_patterns("ABCD");
  const LetterPatterns custom = letters == "ABCD" ? LetterPatterns{} : make_patterns(letters);
  const LetterPatterns& p = letters == "ABCD" ? kAbcd : custom;

  const auto statements = p.statement.find_all(text);
  if (!statements.empty()) return statements.back().front();
  if (auto lead = p.leading.search(text)) return lead;
  if (auto bracket = p.bracketed.search(text)) return bracket;
  // A lone letter: no ASCII letter or digit directly before or after it.
  const std::u32string chars = utf8::to_u32(text);
  for (size_t i = 0; i < chars.size(); ++i) {
    const char32_t c = chars[i];
    if (c >= 0x80 || letters.find(static_cast<char>(c)) == std::string_view::npos) continue;
    const bool before = i > 0 && utf8::is_ascii_alnum(chars[i - 1]);
    const bool after = i + 1 < chars.size() && utf8::is_ascii_alnum(chars[i + 1]);
    if (!before && !after) return std::string(1, static_cast<char>(c));
  }
  return std::nullopt;
}

// ---------------------------------------------------------------------------
// Pipelines

namespace {

struct CompiledFilter {
  FilterSpec spec;
  std::optional<UnicodeRegex> regex;
};

}  // namespace

struct FilterPipeline::Impl {
  std::string name;
  std::vector<CompiledFilter> filters;
};

FilterPipeline::FilterPipeline(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}

FilterPipeline FilterPipeline::create(const FilterPipelineSpec& spec, const std::string& where) {
  auto impl = std::make_shared<Impl>();
  impl->name = spec.name;
  TESSERA_CHECK(!spec.name.empty(), InvalidArgument, where, ": a filter pipeline needs a name");
  for (size_t i = 0; i < spec.filters.size(); ++i) {
    const FilterSpec& f = spec.filters[i];
    const std::string at = where + ".filter[" + std::to_string(i) + "]";
    CompiledFilter compiled{f, std::nullopt};
    if (f.function == "regex") {
      TESSERA_CHECK(!f.regex_pattern.empty(), InvalidArgument, at,
                    ": the regex filter needs a regex_pattern");
      compiled.regex = UnicodeRegex::compile(f.regex_pattern, at + ".regex_pattern");
    } else if (f.function == "choice_letter") {
      TESSERA_CHECK(!f.letters.empty(), InvalidArgument, at, ".letters: must not be empty");
      for (char c : f.letters) {
        TESSERA_CHECK(c >= 'A' && c <= 'Z', InvalidArgument, at,
                      ".letters: expected upper-case ASCII letters, got '", f.letters, "'");
      }
    } else if (f.function != "take_first" && f.function != "remove_whitespace" &&
               f.function != "lowercase" && f.function != "uppercase" &&
               f.function != "gsm8k_number") {
      TESSERA_THROW(InvalidArgument, at, ".function: unknown filter '", f.function,
                    "' (expected regex, take_first, remove_whitespace, lowercase, uppercase, "
                    "choice_letter or gsm8k_number)");
    }
    impl->filters.push_back(std::move(compiled));
  }
  return FilterPipeline(std::move(impl));
}

const std::string& FilterPipeline::name() const { return impl_->name; }

std::string FilterPipeline::apply(const std::vector<std::string>& input) const {
  TESSERA_CHECK(!input.empty(), InvalidArgument, "filter pipeline '", impl_->name,
                "': no responses to filter");
  std::vector<std::string> responses = input;
  for (const CompiledFilter& f : impl_->filters) {
    const std::string& fn = f.spec.function;
    if (fn == "take_first") {
      responses.resize(1);
      continue;
    }
    for (std::string& r : responses) {
      if (fn == "regex") {
        const auto matches = f.regex->find_all(r);
        const int n = static_cast<int>(matches.size());
        const int k = f.spec.group_select < 0 ? f.spec.group_select + n : f.spec.group_select;
        if (matches.empty() || k < 0 || k >= n) {
          r = f.spec.fallback;
          continue;
        }
        std::string picked;
        bool found = false;
        for (const std::string& g : matches[k]) {
          if (!g.empty()) {
            picked = g;
            found = true;
            break;
          }
        }
        // One group (or none): the match itself even when empty, as re.findall
        // returns it; several groups: the first non-empty one, else the fallback.
        if (matches[k].size() == 1) {
          picked = matches[k][0];
          found = true;
        }
        r = found ? utf8::strip(picked) : f.spec.fallback;
      } else if (fn == "remove_whitespace") {
        r = utf8::lstrip(r);
      } else if (fn == "lowercase") {
        r = utf8::ascii_lower(r);
      } else if (fn == "uppercase") {
        r = utf8::ascii_upper(r);
      } else if (fn == "choice_letter") {
        r = extract_choice_letter(r, f.spec.letters).value_or(f.spec.fallback);
      } else if (fn == "gsm8k_number") {
        r = extract_gsm8k_number(r).value_or(f.spec.fallback);
      }
    }
  }
  return responses.front();
}

}  // namespace tessera::eval
