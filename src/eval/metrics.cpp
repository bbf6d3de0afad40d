#include "tessera/eval/metrics.h"

#include <algorithm>
#include <cmath>
#include <unordered_map>

#include "py_random.h"
#include "tessera/core/error.h"
#include "unicode_regex.h"
#include "utf8.h"

namespace tessera::eval {

// ---------------------------------------------------------------------------
// Tokenizers

Tokens split_whitespace(std::string_view text) {
  Tokens tokens;
  size_t pos = 0, start = 0;
  bool in_token = false;
  while (pos < text.size()) {
    const size_t here = pos;
    const char32_t cp = utf8::decode(text, pos);
    if (utf8::is_space(cp)) {
      if (in_token) tokens.emplace_back(text.substr(start, here - start));
      in_token = false;
    } else if (!in_token) {
      start = here;
      in_token = true;
    }
  }
  if (in_token) tokens.emplace_back(text.substr(start));
  return tokens;
}

namespace {

std::string replace_all(std::string s, std::string_view from, std::string_view to) {
  std::string out;
  size_t i = 0;
  while (true) {
    const size_t k = s.find(from, i);
    if (k == std::string::npos) break;
    out.append(s, i, k - i);
    out.append(to);
    i = k + from.size();
  }
  out.append(s, i, std::string::npos);
  return out;
}

bool is_digit(char32_t c) { return c >= '0' && c <= '9'; }

// The first regex of sacreBLEU's TokenizerRegexp:
// [\{-\~\[-\` -\&\(-\+\:-\@\/], i.e. ASCII symbols other than ' , - .
bool is_13a_symbol(char32_t c) {
  return (c >= 0x7B && c <= 0x7E) || (c >= 0x5B && c <= 0x60) || (c >= 0x20 && c <= 0x26) ||
         (c >= 0x28 && c <= 0x2B) || (c >= 0x3A && c <= 0x40) || c == '/';
}

}  // namespace

std::string tokenize_13a(std::string_view input) {
  // Tokenizer13a's language-independent part.
  std::string line(input);
  line = replace_all(line, "<skipped>", "");
  line = replace_all(line, "-\n", "");
  line = replace_all(line, "\n", " ");
  if (line.find('&') != std::string::npos) {
    line = replace_all(line, "&quot;", "\"");
    line = replace_all(line, "&amp;", "&");
    line = replace_all(line, "&lt;", "<");
    line = replace_all(line, "&gt;", ">");
  }
  std::u32string s = utf8::to_u32(" " + line + " ");
  // TokenizerRegexp's four re.sub passes, each a left-to-right scan with
  // non-overlapping matches, exactly as Python applies them.
  std::u32string out;
  for (char32_t c : s) {
    if (is_13a_symbol(c)) {
      out += U' ';
      out += c;
      out += U' ';
    } else {
      out += c;
    }
  }
  s.swap(out);
  out.clear();
  // ([^0-9])([\.,]) -> \1 \2
  for (size_t i = 0; i < s.size();) {
    if (i + 1 < s.size() && !is_digit(s[i]) && (s[i + 1] == U'.' || s[i + 1] == U',')) {
      out += s[i];
      out += U' ';
      out += s[i + 1];
      out += U' ';
      i += 2;
    } else {
      out += s[i++];
    }
  }
  s.swap(out);
  out.clear();
  // ([\.,])([^0-9]) -> " \1 \2"
  for (size_t i = 0; i < s.size();) {
    if (i + 1 < s.size() && (s[i] == U'.' || s[i] == U',') && !is_digit(s[i + 1])) {
      out += U' ';
      out += s[i];
      out += U' ';
      out += s[i + 1];
      i += 2;
    } else {
      out += s[i++];
    }
  }
  s.swap(out);
  out.clear();
  // ([0-9])(-) -> \1 \2
  for (size_t i = 0; i < s.size();) {
    if (i + 1 < s.size() && is_digit(s[i]) && s[i + 1] == U'-') {
      out += s[i];
      out += U" - ";
      i += 2;
    } else {
      out += s[i++];
    }
  }
  const Tokens tokens = split_whitespace(utf8::from_u32(out));
  std::string joined;
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (i) joined += ' ';
    joined += tokens[i];
  }
  return joined;
}

Tokens rouge_tokenize(std::string_view text) {
  // lower(), then [^a-z0-9]+ -> " ", split, keep ^[a-z0-9]+$ tokens: the
  // tokens are exactly the maximal runs of ASCII letters and digits.
  Tokens tokens;
  std::string current;
  for (char c : text) {
    const char lower = (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c;
    if ((lower >= 'a' && lower <= 'z') || (lower >= '0' && lower <= '9')) {
      current += lower;
    } else if (!current.empty()) {
      tokens.push_back(std::move(current));
      current.clear();
    }
  }
  if (!current.empty()) tokens.push_back(std::move(current));
  return tokens;
}

// ---------------------------------------------------------------------------
// BLEU

BleuSmoothing parse_bleu_smoothing(std::string_view name) {
  if (name == "none") return BleuSmoothing::kNone;
  if (name == "floor") return BleuSmoothing::kFloor;
  if (name == "add-k") return BleuSmoothing::kAddK;
  if (name == "exp") return BleuSmoothing::kExp;
  TESSERA_THROW(InvalidArgument, "unknown BLEU smoothing '", name,
                "' (expected none, floor, add-k or exp)");
}

BleuStats& BleuStats::operator+=(const BleuStats& other) {
  hyp_len += other.hyp_len;
  ref_len += other.ref_len;
  for (size_t n = 0; n < 4; ++n) {
    correct[n] += other.correct[n];
    total[n] += other.total[n];
  }
  return *this;
}

namespace {

using NgramCounts = std::unordered_map<std::string, int64_t>;

// n-gram counts for n = 1..4; keys are length-prefixed so that no two
// different n-grams share a key whatever bytes the tokens hold.
NgramCounts count_ngrams(const Tokens& tokens) {
  NgramCounts counts;
  for (size_t n = 1; n <= 4; ++n) {
    for (size_t i = 0; i + n <= tokens.size(); ++i) {
      std::string key;
      for (size_t k = i; k < i + n; ++k) {
        const uint32_t len = static_cast<uint32_t>(tokens[k].size());
        key.append(reinterpret_cast<const char*>(&len), sizeof(len));
        key += tokens[k];
      }
      ++counts[key];
    }
  }
  return counts;
}

// The n of a key produced by count_ngrams.
size_t ngram_order(const std::string& key) {
  size_t n = 0, i = 0;
  while (i < key.size()) {
    uint32_t len = 0;
    std::copy(key.data() + i, key.data() + i + sizeof(len), reinterpret_cast<char*>(&len));
    i += sizeof(len) + len;
    ++n;
  }
  return n;
}

double my_log(double x) { return x == 0.0 ? -9999999999.0 : std::log(x); }

}  // namespace

BleuStats bleu_stats(const Tokens& hypothesis, const std::vector<Tokens>& references) {
  TESSERA_CHECK(!references.empty(), InvalidArgument, "BLEU needs at least one reference");
  NgramCounts ref_counts;
  std::vector<int64_t> ref_lens;
  for (const Tokens& ref : references) {
    ref_lens.push_back(static_cast<int64_t>(ref.size()));
    for (const auto& [ngram, count] : count_ngrams(ref)) {
      int64_t& best = ref_counts[ngram];
      best = std::max(best, count);
    }
  }
  BleuStats stats;
  stats.hyp_len = static_cast<int64_t>(hypothesis.size());
  // The closest reference length; the shorter one on ties.
  int64_t closest_diff = -1, closest_len = -1;
  for (int64_t len : ref_lens) {
    const int64_t diff = std::llabs(stats.hyp_len - len);
    if (closest_diff == -1 || diff < closest_diff) {
      closest_diff = diff;
      closest_len = len;
    } else if (diff == closest_diff && len < closest_len) {
      closest_len = len;
    }
  }
  stats.ref_len = closest_len;
  for (const auto& [ngram, count] : count_ngrams(hypothesis)) {
    const size_t n = ngram_order(ngram) - 1;
    stats.total[n] += count;
    const auto it = ref_counts.find(ngram);
    if (it != ref_counts.end()) stats.correct[n] += std::min(count, it->second);
  }
  return stats;
}

BleuScore bleu_from_stats(const BleuStats& stats, const BleuOptions& options) {
  double smooth_value = 0;
  if (options.smoothing == BleuSmoothing::kFloor) smooth_value = options.smooth_value.value_or(0.1);
  if (options.smoothing == BleuSmoothing::kAddK) smooth_value = options.smooth_value.value_or(1.0);

  BleuScore out;
  out.hyp_len = stats.hyp_len;
  out.ref_len = stats.ref_len;
  out.brevity_penalty = 1.0;
  if (stats.hyp_len < stats.ref_len) {
    out.brevity_penalty = stats.hyp_len > 0 ? std::exp(1.0 - static_cast<double>(stats.ref_len) /
                                                                 static_cast<double>(stats.hyp_len))
                                            : 0.0;
  }
  std::array<double, 4> correct{}, total{};
  bool any_correct = false;
  for (size_t n = 0; n < 4; ++n) {
    correct[n] = static_cast<double>(stats.correct[n]);
    total[n] = static_cast<double>(stats.total[n]);
    any_correct = any_correct || stats.correct[n] != 0;
  }
  if (!any_correct) return out;  // sacreBLEU's early stop: score 0

  double smooth_mteval = 1.0;
  size_t eff_order = 4;
  for (size_t n = 1; n <= 4; ++n) {
    if (options.smoothing == BleuSmoothing::kAddK && n > 1) {
      correct[n - 1] += smooth_value;
      total[n - 1] += smooth_value;
    }
    if (total[n - 1] == 0) break;
    if (options.effective_order) eff_order = n;
    if (correct[n - 1] == 0) {
      if (options.smoothing == BleuSmoothing::kExp) {
        smooth_mteval *= 2;
        out.precisions[n - 1] = 100.0 / (smooth_mteval * total[n - 1]);
      } else if (options.smoothing == BleuSmoothing::kFloor) {
        out.precisions[n - 1] = 100.0 * smooth_value / total[n - 1];
      }
    } else {
      out.precisions[n - 1] = 100.0 * correct[n - 1] / total[n - 1];
    }
  }
  double log_sum = 0;
  for (size_t n = 0; n < eff_order; ++n) log_sum += my_log(out.precisions[n]);
  out.score = out.brevity_penalty * std::exp(log_sum / static_cast<double>(eff_order));
  return out;
}

BleuScore corpus_bleu(const std::vector<Tokens>& hypotheses,
                      const std::vector<std::vector<Tokens>>& references,
                      const BleuOptions& options) {
  TESSERA_CHECK(!references.empty(), InvalidArgument,
                "corpus_bleu needs at least one reference stream");
  for (size_t r = 0; r < references.size(); ++r) {
    TESSERA_CHECK(references[r].size() == hypotheses.size(), InvalidArgument,
                  "corpus_bleu: reference stream ", r, " has ", references[r].size(),
                  " segments but there are ", hypotheses.size(), " hypotheses");
  }
  BleuStats total;
  for (size_t i = 0; i < hypotheses.size(); ++i) {
    std::vector<Tokens> refs;
    refs.reserve(references.size());
    for (const auto& stream : references) refs.push_back(stream[i]);
    total += bleu_stats(hypotheses[i], refs);
  }
  return bleu_from_stats(total, options);
}

// ---------------------------------------------------------------------------
// ROUGE-L

RougeScore rouge_l(const Tokens& target, const Tokens& prediction) {
  RougeScore out;
  if (target.empty() || prediction.empty()) return out;
  // LCS length with one rolling row.
  std::vector<size_t> prev(prediction.size() + 1, 0), row(prediction.size() + 1, 0);
  for (size_t i = 1; i <= target.size(); ++i) {
    for (size_t j = 1; j <= prediction.size(); ++j) {
      row[j] = target[i - 1] == prediction[j - 1] ? prev[j - 1] + 1 : std::max(prev[j], row[j - 1]);
    }
    std::swap(prev, row);
  }
  const double lcs = static_cast<double>(prev[prediction.size()]);
  out.precision = lcs / static_cast<double>(prediction.size());
  out.recall = lcs / static_cast<double>(target.size());
  out.fmeasure = out.precision + out.recall > 0
                     ? 2 * out.precision * out.recall / (out.precision + out.recall)
                     : 0.0;
  return out;
}

// ---------------------------------------------------------------------------
// exact_match

struct ExactMatcher::Impl {
  ExactMatchOptions options;
  std::vector<UnicodeRegex> ignore;
};

ExactMatcher::ExactMatcher(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}

ExactMatcher ExactMatcher::create(const ExactMatchOptions& options, const std::string& where) {
  auto impl = std::make_shared<Impl>();
  impl->options = options;
  for (size_t i = 0; i < options.regexes_to_ignore.size(); ++i) {
    impl->ignore.push_back(UnicodeRegex::compile(
        options.regexes_to_ignore[i], where + ".regexes_to_ignore[" + std::to_string(i) + "]"));
  }
  return ExactMatcher(std::move(impl));
}

std::string ExactMatcher::normalize(std::string_view text) const {
  std::string s(text);
  for (const UnicodeRegex& re : impl_->ignore) s = re.replace_all(s, "");
  if (impl_->options.ignore_case) s = utf8::ascii_lower(s);
  if (impl_->options.ignore_punctuation) {
    static constexpr std::string_view kPunctuation = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~";
    s.erase(std::remove_if(s.begin(), s.end(),
                           [](char c) { return kPunctuation.find(c) != std::string_view::npos; }),
            s.end());
  }
  if (impl_->options.ignore_numbers) {
    s.erase(std::remove_if(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; }),
            s.end());
  }
  return s;
}

double ExactMatcher::score(std::string_view prediction, std::string_view reference) const {
  return normalize(prediction) == normalize(reference) ? 1.0 : 0.0;
}

// ---------------------------------------------------------------------------
// Aggregates

double mean(const std::vector<double>& values) {
  if (values.empty()) return 0;
  double sum = 0;
  for (double v : values) sum += v;
  return sum / static_cast<double>(values.size());
}

double sample_stddev(const std::vector<double>& values) {
  if (values.size() < 2) return 0;
  const double mu = mean(values);
  double sum = 0;
  for (double v : values) sum += (v - mu) * (v - mu);
  return std::sqrt(sum / static_cast<double>(values.size() - 1));
}

double mean_stderr(const std::vector<double>& values) {
  if (values.size() < 2) return 0;
  return sample_stddev(values) / std::sqrt(static_cast<double>(values.size()));
}

double bootstrap_stderr(const std::function<double(const std::vector<size_t>&)>& statistic,
                        size_t n, const BootstrapOptions& options) {
  TESSERA_CHECK(n > 0, InvalidArgument, "bootstrap_stderr over zero items");
  TESSERA_CHECK(options.iterations > 0, InvalidArgument,
                "bootstrap iterations must be positive, got ", options.iterations);
  const int64_t chunk_size = std::min<int64_t>(1000, options.iterations);
  const int64_t chunks = options.iterations / chunk_size;
  TESSERA_CHECK(chunks * chunk_size >= 2, InvalidArgument,
                "bootstrap needs at least 2 resamples, got ", chunks * chunk_size);
  std::vector<double> replicates;
  replicates.reserve(static_cast<size_t>(chunks * chunk_size));
  for (int64_t c = 0; c < chunks; ++c) {
    PyRandom rng(static_cast<uint64_t>(c));
    for (int64_t k = 0; k < chunk_size; ++k) replicates.push_back(statistic(rng.choices(n, n)));
  }
  return sample_stddev(replicates);
}

}  // namespace tessera::eval
