#include "sampling.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace tessera::serve::detail {

uint64_t sample_seed(uint64_t seed, int64_t index) {
  uint64_t z = seed + 0x9E3779B97F4A7C15ull * (static_cast<uint64_t>(index) + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

int64_t argmax(const float* logits, int64_t vocab, const uint8_t* allowed) {
  int64_t best = -1;
  float best_value = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < vocab; ++i) {
    if (allowed && !allowed[i]) continue;
    if (best < 0 || logits[i] > best_value) {
      best = i;
      best_value = logits[i];
    }
  }
  return best;
}

int64_t sample_token(const float* logits, int64_t vocab, const SamplingConfig& config,
                     const uint8_t* allowed, SampleRng& rng,
                     std::vector<std::pair<float, int64_t>>* scratch) {
  if (config.temperature <= 0) return argmax(logits, vocab, allowed);
  // Candidates (scaled logit, id) in id order.
  std::vector<std::pair<float, int64_t>>& cand = *scratch;
  cand.clear();
  const float t = static_cast<float>(config.temperature);
  for (int64_t i = 0; i < vocab; ++i) {
    if (allowed && !allowed[i]) continue;
    const float v = logits[i] / t;
    if (v > -std::numeric_limits<float>::infinity()) cand.emplace_back(v, i);
  }
  if (cand.empty()) return argmax(logits, vocab, allowed);
  // Most likely first; ties by lower id, so the order is total.
  auto before = [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  size_t keep = cand.size();
  if (config.top_k > 0 && static_cast<size_t>(config.top_k) < keep) {
    // Every token whose logit reaches the k-th largest stays (ties included).
    std::nth_element(cand.begin(), cand.begin() + (config.top_k - 1), cand.end(), before);
    const float kth = cand[config.top_k - 1].first;
    keep = static_cast<size_t>(
        std::partition(cand.begin(), cand.end(), [&](const auto& c) { return c.first >= kth; }) -
        cand.begin());
  }
  cand.resize(keep);
  std::sort(cand.begin(), cand.end(), before);
  const double mx = cand.front().first;
  std::vector<double> p(cand.size());
  double total = 0;
  for (size_t i = 0; i < cand.size(); ++i) {
    p[i] = std::exp(static_cast<double>(cand[i].first) - mx);
    total += p[i];
  }
  if (config.top_p < 1.0) {
    // Drop a token when the more likely ones already reach top_p.
    double before_mass = 0;
    size_t n = 0;
    while (n < cand.size() && before_mass / total <= config.top_p) {
      before_mass += p[n];
      ++n;
    }
    double kept = 0;
    for (size_t i = 0; i < n; ++i) kept += p[i];
    p.resize(n);
    total = kept;
  }
  const double u = rng.uniform() * total;
  double acc = 0;
  for (size_t i = 0; i < p.size(); ++i) {
    acc += p[i];
    if (u < acc) return cand[i].second;
  }
  return cand[p.size() - 1].second;  // rounding left u at the very top
}

TokenLogprobs token_logprobs(const float* logits, int64_t vocab, int64_t token, int64_t top) {
  double mx = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < vocab; ++i) mx = std::max(mx, static_cast<double>(logits[i]));
  double sum = 0;
  for (int64_t i = 0; i < vocab; ++i) sum += std::exp(static_cast<double>(logits[i]) - mx);
  const double lse = mx + std::log(sum);
  TokenLogprobs out;
  out.logprob = static_cast<double>(logits[token]) - lse;
  if (top > 0) {
    top = std::min(top, vocab);
    std::vector<int64_t> ids(vocab);
    for (int64_t i = 0; i < vocab; ++i) ids[i] = i;
    std::partial_sort(ids.begin(), ids.begin() + top, ids.end(), [&](int64_t a, int64_t b) {
      return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
    });
    for (int64_t i = 0; i < top; ++i)
      out.top.emplace_back(ids[i], static_cast<double>(logits[ids[i]]) - lse);
  }
  return out;
}

namespace {

constexpr const char* kReplacement = "\xEF\xBF\xBD";  // U+FFFD

// Bytes in the sequence a lead byte starts (0: not a lead byte) and the
// allowed range of the byte after it (RFC 3629: no overlong forms, no
// surrogates, nothing above U+10FFFF).
struct Lead {
  int length = 0;
  uint8_t lo = 0x80, hi = 0xBF;
};

Lead lead_of(uint8_t b) {
  if (b >= 0xC2 && b <= 0xDF) return {2, 0x80, 0xBF};
  if (b == 0xE0) return {3, 0xA0, 0xBF};
  if ((b >= 0xE1 && b <= 0xEC) || b == 0xEE || b == 0xEF) return {3, 0x80, 0xBF};
  if (b == 0xED) return {3, 0x80, 0x9F};
  if (b == 0xF0) return {4, 0x90, 0xBF};
  if (b >= 0xF1 && b <= 0xF3) return {4, 0x80, 0xBF};
  if (b == 0xF4) return {4, 0x80, 0x8F};
  return {};
}

}  // namespace

std::string Utf8Stream::feed(std::string_view bytes) {
  std::string data = held_;
  data.append(bytes.data(), bytes.size());
  held_.clear();
  std::string out;
  size_t i = 0;
  const size_t n = data.size();
  while (i < n) {
    const auto b = static_cast<uint8_t>(data[i]);
    if (b < 0x80) {
      out += static_cast<char>(b);
      ++i;
      continue;
    }
    const Lead lead = lead_of(b);
    if (lead.length == 0) {
      out += kReplacement;
      ++i;
      continue;
    }
    // Continuation bytes present and valid so far.
    int k = 1;
    bool bad = false;
    for (; k < lead.length && i + k < n; ++k) {
      const auto c = static_cast<uint8_t>(data[i + k]);
      const uint8_t lo = k == 1 ? lead.lo : 0x80, hi = k == 1 ? lead.hi : 0xBF;
      if (c < lo || c > hi) {
        bad = true;
        break;
      }
    }
    if (bad) {  // the maximal valid prefix becomes one replacement character
      out += kReplacement;
      i += k;
    } else if (k == lead.length) {
      out.append(data, i, k);
      i += k;
    } else {  // incomplete at the end: wait for more bytes
      held_ = data.substr(i);
      break;
    }
  }
  return out;
}

std::string Utf8Stream::flush() {
  const bool had = !held_.empty();
  held_.clear();
  return had ? kReplacement : "";
}

}  // namespace tessera::serve::detail
