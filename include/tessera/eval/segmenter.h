// tessera/eval/segmenter.h — Cantonese word segmentation for BLEU and ROUGE-L.
//
// BLEU and ROUGE-L count word n-grams, and written Cantonese has no spaces.
// The Yue-Benchmark paper segments with PyCantonese; this segmenter does
// greedy longest match (forward maximum matching) over a word list built from
// the Hong Kong Cantonese Corpus (HKCanCor) — data/eval/yue_lexicon.txt,
// produced by scripts/build_yue_lexicon.py.
//
// Both segmenters split text the same way outside Han characters:
//   - whitespace separates tokens and is dropped;
//   - a run of ASCII letters and digits is one token ("Spot", "2024");
//   - any other character (punctuation, symbols, kana, emoji) is one token.
// Inside a run of Han characters YueSegmenter takes, at each position, the
// longest lexicon word that starts there (a single character when none does);
// segment_characters() makes every Han character its own token.
//
//   auto seg = YueSegmenter::load("data/eval/yue_lexicon.txt");
//   seg.segment("我哋今日去咗旅行。");  // {"我哋", "今日", "去", "咗", "旅行", "。"}
//
// YueSegmenter is immutable after load and safe to share between threads.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace tessera::eval {

class YueSegmenter {
 public:
  // Reads one word per line (UTF-8; blank lines and lines starting with '#'
  // are skipped). NotFound when the file cannot be opened; InvalidArgument
  // naming the file and line for a word that contains whitespace or a
  // non-Han character (such a word could never match).
  static YueSegmenter load(const std::string& lexicon_path);
  // Same rules, from words in memory (`source` names them in messages).
  static YueSegmenter from_words(const std::vector<std::string>& words,
                                 const std::string& source = "<words>");

  std::vector<std::string> segment(std::string_view text) const;

  size_t lexicon_size() const;
  // Longest lexicon word, in characters.
  size_t max_word_length() const;

 private:
  struct Impl;
  explicit YueSegmenter(std::shared_ptr<const Impl> impl);
  std::shared_ptr<const Impl> impl_;
};

// The character-level alternative: every Han character is a token; the rules
// for other characters are the ones above.
std::vector<std::string> segment_characters(std::string_view text);

}  // namespace tessera::eval
