#include "tessera/eval/segmenter.h"

#include <fstream>
#include <unordered_set>

#include "tessera/core/error.h"
#include "utf8.h"

namespace tessera::eval {

struct YueSegmenter::Impl {
  std::unordered_set<std::string> words;
  size_t max_length = 1;  // in code points
};

YueSegmenter::YueSegmenter(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}

namespace {

// Shared tokenizer: calls `han_run(begin, end)` for every maximal run of Han
// characters (byte offsets) and emits everything else by the common rules.
template <typename HanRun>
std::vector<std::string> split_text(std::string_view text, HanRun&& han_run) {
  std::vector<std::string> tokens;
  size_t pos = 0;
  while (pos < text.size()) {
    const size_t start = pos;
    const char32_t cp = utf8::decode(text, pos);
    if (utf8::is_space(cp)) continue;
    if (utf8::is_ascii_alnum(cp)) {
      size_t end = pos;
      while (end < text.size()) {
        size_t next = end;
        if (!utf8::is_ascii_alnum(utf8::decode(text, next))) break;
        end = next;
      }
      tokens.emplace_back(text.substr(start, end - start));
      pos = end;
    } else if (utf8::is_han(cp)) {
      size_t end = pos;
      while (end < text.size()) {
        size_t next = end;
        if (!utf8::is_han(utf8::decode(text, next))) break;
        end = next;
      }
      han_run(text.substr(start, end - start), tokens);
      pos = end;
    } else {
      tokens.emplace_back(text.substr(start, pos - start));
    }
  }
  return tokens;
}

void check_word(const std::string& word, const std::string& source, size_t line) {
  size_t pos = 0;
  while (pos < word.size()) {
    const char32_t cp = utf8::decode(word, pos);
    if (!utf8::is_han(cp)) {
      TESSERA_THROW(InvalidArgument, source, ":", line, ": lexicon word '", word,
                    "' contains a non-Han character (U+", std::hex, static_cast<uint32_t>(cp),
                    "); only Han words can match");
    }
  }
}

}  // namespace

YueSegmenter YueSegmenter::from_words(const std::vector<std::string>& words,
                                      const std::string& source) {
  auto impl = std::make_shared<Impl>();
  size_t line = 0;
  for (const std::string& word : words) {
    ++line;
    check_word(word, source, line);
    if (word.empty()) continue;
    impl->max_length = std::max(impl->max_length, utf8::length(word));
    impl->words.insert(word);
  }
  return YueSegmenter(std::move(impl));
}

YueSegmenter YueSegmenter::load(const std::string& lexicon_path) {
  std::ifstream in(lexicon_path, std::ios::binary);
  TESSERA_CHECK(in.good(), NotFound, lexicon_path, ": cannot open the Cantonese lexicon");
  auto impl = std::make_shared<Impl>();
  std::string line;
  size_t number = 0;
  while (std::getline(in, line)) {
    ++number;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty() || line[0] == '#') continue;
    check_word(line, lexicon_path, number);
    impl->max_length = std::max(impl->max_length, utf8::length(line));
    impl->words.insert(line);
  }
  TESSERA_CHECK(!impl->words.empty(), InvalidArgument, lexicon_path, ": the lexicon has no words");
  return YueSegmenter(std::move(impl));
}

std::vector<std::string> YueSegmenter::segment(std::string_view text) const {
  const Impl& impl = *impl_;
  return split_text(text, [&impl](std::string_view run, std::vector<std::string>& tokens) {
    // Byte offsets of every character boundary in the run.
    std::vector<size_t> bounds{0};
    for (size_t pos = 0; pos < run.size();) {
      utf8::decode(run, pos);
      bounds.push_back(pos);
    }
    const size_t n = bounds.size() - 1;
    size_t i = 0;
    while (i < n) {
      size_t take = 1;
      for (size_t len = std::min(impl.max_length, n - i); len > 1; --len) {
        const std::string candidate(run.substr(bounds[i], bounds[i + len] - bounds[i]));
        if (impl.words.count(candidate)) {
          take = len;
          break;
        }
      }
      tokens.emplace_back(run.substr(bounds[i], bounds[i + take] - bounds[i]));
      i += take;
    }
  });
}

size_t YueSegmenter::lexicon_size() const { return impl_->words.size(); }
size_t YueSegmenter::max_word_length() const { return impl_->max_length; }

std::vector<std::string> segment_characters(std::string_view text) {
  return split_text(text, [](std::string_view run, std::vector<std::string>& tokens) {
    for (size_t pos = 0; pos < run.size();) {
      const size_t start = pos;
      utf8::decode(run, pos);
      tokens.emplace_back(run.substr(start, pos - start));
    }
  });
}

}  // namespace tessera::eval
