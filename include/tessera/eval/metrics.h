// tessera/eval/metrics.h — scoring functions with the definitions of the reference packages.
//
// Each function reproduces a reference implementation exactly, so numbers
// computed here can be put next to numbers from the Python tools:
//   corpus_bleu()      sacreBLEU 2.x corpus_bleu (BLEU-4, closest reference
//                      length, brevity penalty, smoothing 'exp' | 'floor' |
//                      'add-k' | 'none'); inputs are already tokenized, as
//                      sacreBLEU sees them with tokenize='none'.
//   tokenize_13a()     sacreBLEU's default '13a' tokenizer (for English).
//   rouge_l()          rouge-score's ROUGE-L (LCS) precision/recall/F1 on given tokens.
//   rouge_tokenize()   rouge-score's default tokenizer (lowercase, [a-z0-9]+ runs).
//   ExactMatcher       lm-evaluation-harness exact_match with its options.
//   mean_stderr(), bootstrap_stderr()
//                      lm-evaluation-harness's standard errors; the bootstrap
//                      draws the same replicates as lm-eval's bootstrap_stderr
//                      (chunks of min(1000, iters) resamples, chunk i seeded
//                      with random.Random(i)).
//
//   std::vector<std::vector<std::string>> hyps = {split_whitespace("the cat sat")};
//   std::vector<std::vector<std::string>> refs = {split_whitespace("the cat sat down")};
//   BleuScore s = corpus_bleu(hyps, {refs});   // s.score in [0, 100]
//
// Case folding is ASCII-only throughout (Python's str.lower() also folds
// other scripts; Cantonese has no case). Pure functions and immutable
// objects: thread-safe.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace tessera::eval {

using Tokens = std::vector<std::string>;

// Python's str.split() with no argument (Unicode whitespace, no empty tokens).
Tokens split_whitespace(std::string_view text);

// sacreBLEU's Tokenizer13a: returns the tokens joined by single spaces.
std::string tokenize_13a(std::string_view line);

// rouge-score's tokenize.tokenize(text, stemmer=None).
Tokens rouge_tokenize(std::string_view text);

// ---------------------------------------------------------------------------
// BLEU

enum class BleuSmoothing { kNone, kFloor, kAddK, kExp };

// Parses "none" | "floor" | "add-k" | "exp"; InvalidArgument otherwise.
BleuSmoothing parse_bleu_smoothing(std::string_view name);

struct BleuOptions {
  // sacreBLEU's default for corpus_bleu is 'exp'.
  BleuSmoothing smoothing = BleuSmoothing::kExp;
  // Value for 'floor' (default 0.1) and 'add-k' (default 1); ignored otherwise.
  std::optional<double> smooth_value;
  // sacreBLEU's use_effective_order (off for corpus BLEU).
  bool effective_order = false;
};

// Sufficient statistics of one segment (sacreBLEU's per-segment stats);
// they add up over a corpus.
struct BleuStats {
  int64_t hyp_len = 0;
  int64_t ref_len = 0;               // length of the reference closest to hyp_len (shorter on ties)
  std::array<int64_t, 4> correct{};  // clipped n-gram matches, n = 1..4
  std::array<int64_t, 4> total{};    // hypothesis n-grams, n = 1..4
  BleuStats& operator+=(const BleuStats& other);
};

struct BleuScore {
  double score = 0;                    // 0..100
  std::array<double, 4> precisions{};  // percentages, as sacreBLEU reports them
  double brevity_penalty = 0;
  int64_t hyp_len = 0;
  int64_t ref_len = 0;
};

// Statistics of one hypothesis against one or more references. Requires at
// least one reference.
BleuStats bleu_stats(const Tokens& hypothesis, const std::vector<Tokens>& references);
// sacreBLEU's compute_bleu from summed statistics.
BleuScore bleu_from_stats(const BleuStats& stats, const BleuOptions& options = {});

// sacreBLEU corpus_bleu(hypotheses, references). `references` holds reference
// streams, as sacreBLEU takes them: references[r][i] is the r-th reference of
// hypothesis i; every stream has one entry per hypothesis. InvalidArgument on
// mismatched sizes or no streams.
BleuScore corpus_bleu(const std::vector<Tokens>& hypotheses,
                      const std::vector<std::vector<Tokens>>& references,
                      const BleuOptions& options = {});

// ---------------------------------------------------------------------------
// ROUGE-L

struct RougeScore {
  double precision = 0;
  double recall = 0;
  double fmeasure = 0;
};

// rouge-score's _score_lcs(target, prediction): zeros when either is empty.
RougeScore rouge_l(const Tokens& target, const Tokens& prediction);

// ---------------------------------------------------------------------------
// exact_match

struct ExactMatchOptions {
  bool ignore_case = false;
  // Removes ASCII punctuation (Python's string.punctuation).
  bool ignore_punctuation = false;
  // Removes the digits 0-9.
  bool ignore_numbers = false;
  // Removed (re.sub with "") from both strings, in order, before the other
  // options. ECMAScript syntax over code points.
  std::vector<std::string> regexes_to_ignore;
};

// lm-evaluation-harness's exact_match (exact_match_hf_evaluate) for one pair.
class ExactMatcher {
 public:
  // InvalidArgument (naming `where` and the pattern) for a bad regex.
  static ExactMatcher create(const ExactMatchOptions& options,
                             const std::string& where = "exact_match");
  // The string after the options were applied.
  std::string normalize(std::string_view text) const;
  // 1.0 when normalize(prediction) == normalize(reference), else 0.0.
  double score(std::string_view prediction, std::string_view reference) const;

 private:
  struct Impl;
  explicit ExactMatcher(std::shared_ptr<const Impl> impl);
  std::shared_ptr<const Impl> impl_;
};

// ---------------------------------------------------------------------------
// Aggregates and standard errors

double mean(const std::vector<double>& values);
// Sample standard deviation (n - 1 in the denominator); 0 for fewer than 2 values.
double sample_stddev(const std::vector<double>& values);
// lm-eval's mean_stderr: sample_stddev / sqrt(n).
double mean_stderr(const std::vector<double>& values);

struct BootstrapOptions {
  // lm-eval's default is 100000 (and min(100, that) for BLEU). Resamples are
  // drawn in chunks of min(1000, iterations), and only whole chunks count, as
  // in lm-eval: 1500 iterations draw 1000 resamples.
  int64_t iterations = 100000;
};

// Bootstrap standard error of `statistic` over `n` items: the statistic is
// evaluated on index resamples (drawn with replacement, n indices each) and
// the sample standard deviation of the results returned. The resamples are
// lm-eval's: chunk c uses random.Random(c).choices(range(n), k=n).
// InvalidArgument when n == 0 or fewer than 2 resamples would be drawn.
double bootstrap_stderr(const std::function<double(const std::vector<size_t>&)>& statistic,
                        size_t n, const BootstrapOptions& options = {});

}  // namespace tessera::eval
