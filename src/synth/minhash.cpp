#include "tessera/synth/minhash.h"

#include <algorithm>
#include <cctype>
#include <limits>
#include <random>
#include <set>

#include "tessera/core/error.h"

namespace tessera::synth {
namespace {

constexpr uint64_t kMersenne61 = (uint64_t{1} << 61) - 1;

// FNV-1a over the bytes, then a splitmix64 finaliser: stable across builds
// and platforms (unlike std::hash), so signatures written to files stay valid.
uint64_t hash_bytes(std::string_view s, uint64_t h = 1469598103934665603ULL) {
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ULL;
  }
  h += 0x9E3779B97F4A7C15ULL;
  h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9ULL;
  h = (h ^ (h >> 27)) * 0x94D049BB133111EBULL;
  return h ^ (h >> 31);
}

// (a x + b) mod 2^61 - 1 without overflow.
uint64_t universal(uint64_t a, uint64_t b, uint64_t x) {
  unsigned __int128 v = static_cast<unsigned __int128>(a) * (x % kMersenne61) + b;
  uint64_t r = static_cast<uint64_t>((v & kMersenne61) + (v >> 61));
  r = (r & kMersenne61) + (r >> 61);
  return r >= kMersenne61 ? r - kMersenne61 : r;
}

}  // namespace

std::vector<std::string> shingle_words(std::string_view text) {
  std::vector<std::string> words;
  size_t i = 0;
  while (i < text.size()) {
    const unsigned char c = static_cast<unsigned char>(text[i]);
    if (std::isspace(c)) {
      ++i;
    } else if (std::isdigit(c)) {
      size_t j = i;
      while (j < text.size() && std::isdigit(static_cast<unsigned char>(text[j]))) ++j;
      words.emplace_back(text.substr(i, j - i));
      i = j;
    } else if (std::isalpha(c) || c >= 0x80) {
      // Letters (and UTF-8 bytes, kept whole within a word).
      std::string w;
      while (i < text.size()) {
        const unsigned char d = static_cast<unsigned char>(text[i]);
        if (!(std::isalpha(d) || d >= 0x80)) break;
        w += static_cast<char>(std::tolower(d));
        ++i;
      }
      words.push_back(std::move(w));
    } else {
      words.emplace_back(1, static_cast<char>(c));
      ++i;
    }
  }
  return words;
}

std::vector<uint64_t> shingles(std::string_view text, const MinHashOptions& options) {
  TESSERA_CHECK(options.shingle_words >= 1, InvalidArgument,
                "minhash: shingle_words must be >= 1, got ", options.shingle_words);
  const std::vector<std::string> words = shingle_words(text);
  std::vector<uint64_t> out;
  if (words.empty()) return out;
  const size_t n = std::min<size_t>(static_cast<size_t>(options.shingle_words), words.size());
  for (size_t i = 0; i + n <= words.size(); ++i) {
    uint64_t h = 1469598103934665603ULL;
    for (size_t k = 0; k < n; ++k) {
      h = hash_bytes(words[i + k], h);
      h = hash_bytes("\x1f", h);  // word separator: ("ab", "c") != ("a", "bc")
    }
    out.push_back(h);
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

double jaccard(const std::vector<uint64_t>& a, const std::vector<uint64_t>& b) {
  if (a.empty() && b.empty()) return 1.0;
  size_t i = 0, j = 0, common = 0;
  while (i < a.size() && j < b.size()) {
    if (a[i] == b[j]) {
      ++common;
      ++i;
      ++j;
    } else if (a[i] < b[j]) {
      ++i;
    } else {
      ++j;
    }
  }
  return static_cast<double>(common) / static_cast<double>(a.size() + b.size() - common);
}

MinHasher::MinHasher(const MinHashOptions& options) : options_(options) {
  TESSERA_CHECK(options.num_permutations >= 1, InvalidArgument,
                "minhash: num_permutations must be >= 1, got ", options.num_permutations);
  TESSERA_CHECK(options.bands >= 1 && options.num_permutations % options.bands == 0,
                InvalidArgument, "minhash: bands (", options.bands,
                ") must divide num_permutations (", options.num_permutations, ")");
  TESSERA_CHECK(options.shingle_words >= 1, InvalidArgument,
                "minhash: shingle_words must be >= 1, got ", options.shingle_words);
  TESSERA_CHECK(options.threshold > 0 && options.threshold <= 1, InvalidArgument,
                "minhash: threshold must be in (0, 1], got ", options.threshold);
  std::mt19937_64 rng(options.seed);
  std::uniform_int_distribution<uint64_t> coefficient(1, kMersenne61 - 1);
  for (int64_t i = 0; i < options.num_permutations; ++i) {
    a_.push_back(coefficient(rng));
    b_.push_back(coefficient(rng));
  }
}

std::vector<uint64_t> MinHasher::signature(const std::vector<uint64_t>& shingle_set) const {
  std::vector<uint64_t> sig(a_.size(), kMersenne61);
  for (uint64_t x : shingle_set) {
    for (size_t i = 0; i < a_.size(); ++i) sig[i] = std::min(sig[i], universal(a_[i], b_[i], x));
  }
  return sig;
}

std::vector<uint64_t> MinHasher::signature(std::string_view text) const {
  return signature(shingles(text, options_));
}

double MinHasher::estimate(const std::vector<uint64_t>& a, const std::vector<uint64_t>& b) {
  TESSERA_CHECK(a.size() == b.size() && !a.empty(), InvalidArgument,
                "minhash: signatures of different lengths (", a.size(), " vs ", b.size(), ")");
  size_t equal = 0;
  for (size_t i = 0; i < a.size(); ++i) equal += a[i] == b[i];
  return static_cast<double>(equal) / static_cast<double>(a.size());
}

NearDuplicateIndex::NearDuplicateIndex(const MinHashOptions& options)
    : hasher_(options), buckets_(static_cast<size_t>(options.bands)) {}

NearDuplicateIndex::Match NearDuplicateIndex::best_match(const std::vector<uint64_t>& set,
                                                         const std::vector<uint64_t>& sig) const {
  const auto& o = hasher_.options();
  const int64_t rows = o.num_permutations / o.bands;
  std::set<int64_t> candidates;
  for (int64_t band = 0; band < o.bands; ++band) {
    uint64_t key = 0;
    for (int64_t r = 0; r < rows; ++r) key = hash_bytes(std::to_string(sig[band * rows + r]), key);
    auto it = buckets_[band].find(key);
    if (it != buckets_[band].end()) candidates.insert(it->second.begin(), it->second.end());
  }
  Match best;
  for (int64_t id : candidates) {
    ++candidates_checked_;
    const double j =
        o.exact_verification ? jaccard(set, sets_[id]) : MinHasher::estimate(sig, signatures_[id]);
    if (j >= o.threshold && j > best.jaccard) {
      best.duplicate_of = id;
      best.jaccard = j;
    }
  }
  return best;
}

int64_t NearDuplicateIndex::keep(std::vector<uint64_t> set, std::vector<uint64_t> sig) {
  const auto& o = hasher_.options();
  const int64_t rows = o.num_permutations / o.bands;
  const int64_t id = size();
  for (int64_t band = 0; band < o.bands; ++band) {
    uint64_t key = 0;
    for (int64_t r = 0; r < rows; ++r) key = hash_bytes(std::to_string(sig[band * rows + r]), key);
    buckets_[band][key].push_back(id);
  }
  sets_.push_back(std::move(set));
  signatures_.push_back(std::move(sig));
  return id;
}

NearDuplicateIndex::Match NearDuplicateIndex::query(std::string_view text) const {
  auto set = shingles(text, hasher_.options());
  return best_match(set, hasher_.signature(set));
}

NearDuplicateIndex::Match NearDuplicateIndex::insert(std::string_view text) {
  auto set = shingles(text, hasher_.options());
  auto sig = hasher_.signature(set);
  Match m = best_match(set, sig);
  if (m.duplicate_of < 0) keep(std::move(set), std::move(sig));
  return m;
}

int64_t NearDuplicateIndex::add(std::string_view text) {
  auto set = shingles(text, hasher_.options());
  auto sig = hasher_.signature(set);
  return keep(std::move(set), std::move(sig));
}

DedupResult deduplicate(const std::vector<std::string>& texts, const MinHashOptions& options,
                        const std::vector<std::string>& reference) {
  NearDuplicateIndex index(options);
  for (const auto& r : reference) index.add(r);
  const int64_t offset = static_cast<int64_t>(reference.size());
  std::vector<int64_t> index_to_text;  // index id - offset -> text position
  DedupResult out;
  for (size_t i = 0; i < texts.size(); ++i) {
    auto m = index.insert(texts[i]);
    if (m.duplicate_of < 0) {
      out.kept.push_back(static_cast<int64_t>(i));
      index_to_text.push_back(static_cast<int64_t>(i));
      out.duplicate_of.push_back(-1);
    } else if (m.duplicate_of < offset) {
      out.duplicate_of.push_back(-2 - m.duplicate_of);
    } else {
      out.duplicate_of.push_back(index_to_text[m.duplicate_of - offset]);
    }
  }
  if (!texts.empty()) {
    out.duplicate_rate = static_cast<double>(texts.size() - out.kept.size()) / texts.size();
  }
  return out;
}

double distinct_n(const std::vector<std::string>& texts, int64_t n) {
  TESSERA_CHECK(n >= 1, InvalidArgument, "distinct_n: n must be >= 1, got ", n);
  std::set<std::vector<std::string>> seen;
  int64_t total = 0;
  for (const auto& t : texts) {
    const auto words = shingle_words(t);
    for (size_t i = 0; i + static_cast<size_t>(n) <= words.size(); ++i) {
      seen.insert(std::vector<std::string>(words.begin() + i, words.begin() + i + n));
      ++total;
    }
  }
  return total == 0 ? 0.0 : static_cast<double>(seen.size()) / static_cast<double>(total);
}

}  // namespace tessera::synth
