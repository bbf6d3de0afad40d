// tessera/synth/minhash.h — near-duplicate removal with MinHash and
// locality-sensitive hashing (Broder 1997; Leskovec et al., Mining of
// Massive Datasets, ch. 3), and the diversity measures of a text set.
//
// A text becomes a set of shingles (word n-grams after lower-casing, with
// punctuation and digits runs as their own words); its MinHash signature is
// the minimum of `num_permutations` hash functions h_i(x) = (a_i x + b_i) mod
// (2^61 - 1) over the shingles, so that two signatures agree in a position
// with probability equal to the Jaccard similarity of the two sets. The
// signature is cut into `bands` bands of num_permutations / bands rows; texts
// that agree on every row of some band become candidates (probability
// 1 - (1 - J^rows)^bands), and a candidate is a duplicate when its Jaccard
// with the kept text — exact over the shingle sets by default, or estimated
// from the signatures — reaches `threshold`.
//
//   tessera::synth::NearDuplicateIndex index({.threshold = 0.7});
//   for (const auto& text : texts) {
//     auto m = index.insert(text);       // m.duplicate_of >= 0: dropped
//   }
//
// Thread safety: functions are pure and thread-safe; NearDuplicateIndex is
// thread-compatible (const methods may run concurrently).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

namespace tessera::synth {

struct MinHashOptions {
  int64_t num_permutations = 128;  // signature length; estimate std error ~ sqrt(J(1-J)/128)
  // Bands of num_permutations / bands rows (must divide). 32 x 4 makes pairs
  // at J = 0.7 candidates with probability 0.9998 and at J = 0.3 with 0.23;
  // the exact check then removes the false candidates.
  int64_t bands = 32;
  int64_t shingle_words = 2;       // words per shingle; texts shorter than this are one shingle
  double threshold = 0.7;          // Jaccard at or above which a text duplicates a kept one
  bool exact_verification = true;  // confirm candidates with the exact Jaccard
  uint64_t seed = 1;               // draws the hash functions
};

// The words of `text`: lower-cased runs of letters, runs of digits, and
// single other non-space characters ("What is 23+5?" -> what is 23 + 5 ?).
std::vector<std::string> shingle_words(std::string_view text);

// Sorted, unique 64-bit hashes of the text's word n-grams (n =
// options.shingle_words). Empty for a text without words.
std::vector<uint64_t> shingles(std::string_view text, const MinHashOptions& options = {});

// Exact Jaccard similarity |a ∩ b| / |a ∪ b| of two sorted unique sets (1 for
// two empty sets).
double jaccard(const std::vector<uint64_t>& a, const std::vector<uint64_t>& b);

class MinHasher {
 public:
  // InvalidArgument when num_permutations < 1, bands does not divide it, or
  // shingle_words < 1 or threshold outside (0, 1].
  explicit MinHasher(const MinHashOptions& options = {});
  const MinHashOptions& options() const { return options_; }
  // [num_permutations] minima; all 2^61 - 1 for an empty set.
  std::vector<uint64_t> signature(const std::vector<uint64_t>& shingle_set) const;
  std::vector<uint64_t> signature(std::string_view text) const;
  // Share of equal positions: an unbiased estimate of the Jaccard similarity.
  static double estimate(const std::vector<uint64_t>& a, const std::vector<uint64_t>& b);

 private:
  MinHashOptions options_;
  std::vector<uint64_t> a_, b_;
};

// Texts kept so far, indexed by band for candidate lookup.
class NearDuplicateIndex {
 public:
  explicit NearDuplicateIndex(const MinHashOptions& options = {});

  struct Match {
    int64_t duplicate_of = -1;  // id of the kept text it duplicates, -1: none
    double jaccard = 0;         // with that text (exact or estimated, as configured)
  };
  // The best-matching kept text at or above the threshold, if any.
  Match query(std::string_view text) const;
  // query(); when no duplicate is found the text is kept and gets the next
  // id (0, 1, ...). Returns the match (duplicate_of = -1 when kept).
  Match insert(std::string_view text);
  // Keeps the text whatever it matches (e.g. seed tasks that later texts
  // must not copy); returns its id.
  int64_t add(std::string_view text);
  int64_t size() const { return static_cast<int64_t>(sets_.size()); }
  // Candidate pairs examined so far (for the cost of the check).
  int64_t candidates_checked() const { return candidates_checked_; }

 private:
  Match best_match(const std::vector<uint64_t>& set, const std::vector<uint64_t>& sig) const;
  int64_t keep(std::vector<uint64_t> set, std::vector<uint64_t> sig);
  MinHasher hasher_;
  std::vector<std::vector<uint64_t>> sets_, signatures_;
  std::vector<std::map<uint64_t, std::vector<int64_t>>> buckets_;  // per band: key -> ids
  mutable int64_t candidates_checked_ = 0;
};

// Greedy removal in order: each text is dropped when it duplicates a text
// kept before it (or one of `reference`, e.g. the seed tasks, which are
// never in the output).
struct DedupResult {
  std::vector<int64_t> kept;          // indices into texts, in order
  std::vector<int64_t> duplicate_of;  // per text: index of the text it duplicates
                                      // (-1 kept; -2 - i: reference[i])
  double duplicate_rate = 0;          // dropped / texts (0 for none)
};
DedupResult deduplicate(const std::vector<std::string>& texts, const MinHashOptions& options = {},
                        const std::vector<std::string>& reference = {});

// Distinct-n: distinct word n-grams over all n-grams of the texts (Li et
// al. 2016), words as shingle_words(); 0 when there are none.
double distinct_n(const std::vector<std::string>& texts, int64_t n);

}  // namespace tessera::synth
