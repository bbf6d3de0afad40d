#include "tessera/serve/stop.h"

#include <gtest/gtest.h>

#include <optional>
#include <random>
#include <string>
#include <vector>

#include "tessera/core/error.h"

namespace tessera::serve {
namespace {

struct Outcome {
  std::string text;  // everything emitted, flush included
  std::optional<size_t> stop_index;
  bool operator==(const Outcome& o) const { return text == o.text && stop_index == o.stop_index; }
};

std::ostream& operator<<(std::ostream& os, const Outcome& o) {
  os << "'" << o.text << "' stop=";
  if (o.stop_index) {
    os << *o.stop_index;
  } else {
    os << "none";
  }
  return os;
}

// Streams `pieces` through a matcher, checking along the way that nothing is
// emitted after a stop; flushes when no stop matched.
Outcome stream(const std::vector<std::string>& stops, const std::vector<std::string>& pieces) {
  StopStringMatcher m(stops);
  Outcome out;
  for (const std::string& p : pieces) {
    auto r = m.feed(p);
    out.text += r.text;
    if (r.stop_index) {
      out.stop_index = r.stop_index;
      EXPECT_TRUE(m.stopped());
      EXPECT_EQ(m.flush(), "");
      return out;
    }
  }
  out.text += m.flush();
  return out;
}

// Reference: grow the text one byte at a time and stop at the first length
// where it ends with a stop string (the longest one if several end there).
Outcome reference(const std::vector<std::string>& stops, const std::string& text) {
  for (size_t len = 1; len <= text.size(); ++len) {
    std::optional<size_t> best;
    for (size_t k = 0; k < stops.size(); ++k) {
      const std::string& s = stops[k];
      if (s.size() <= len && text.compare(len - s.size(), s.size(), s) == 0 &&
          (!best || s.size() > stops[*best].size())) {
        best = k;
      }
    }
    if (best) return {text.substr(0, len - stops[*best].size()), best};
  }
  return {text, std::nullopt};
}

TEST(StopStringMatcher, NoStopsPassThrough) {
  StopStringMatcher m;
  EXPECT_EQ(m.feed("hello").text, "hello");
  EXPECT_EQ(m.feed(" world").text, " world");
  EXPECT_EQ(m.held_bytes(), 0u);
  EXPECT_EQ(m.flush(), "");
}

TEST(StopStringMatcher, HoldsBackAPossibleStopAcrossPieces) {
  StopStringMatcher m({"###"});
  auto r = m.feed("abc#");
  EXPECT_EQ(r.text, "abc");
  EXPECT_FALSE(r.stop_index.has_value());
  EXPECT_EQ(m.held_bytes(), 1u);
  r = m.feed("#");
  EXPECT_EQ(r.text, "");
  EXPECT_EQ(m.held_bytes(), 2u);
  r = m.feed("#tail");
  EXPECT_EQ(r.text, "");
  ASSERT_TRUE(r.stop_index.has_value());
  EXPECT_EQ(*r.stop_index, 0u);
  EXPECT_TRUE(m.stopped());
  EXPECT_THROW(m.feed("more"), FailedPrecondition);
  EXPECT_EQ(m.flush(), "");
}

TEST(StopStringMatcher, ReleasesHeldTextWhenItCannotMatch) {
  StopStringMatcher m({"###"});
  EXPECT_EQ(m.feed("ab##").text, "ab");
  EXPECT_EQ(m.feed("x#").text, "##x");
  EXPECT_EQ(m.held_bytes(), 1u);
  EXPECT_EQ(m.flush(), "#");
  EXPECT_THROW(m.feed("y"), FailedPrecondition);
  EXPECT_EQ(m.flush(), "");
}

TEST(StopStringMatcher, StopInsideOnePiece) {
  StopStringMatcher m({"STOP"});
  auto r = m.feed("before STOP after");
  EXPECT_EQ(r.text, "before ");
  EXPECT_EQ(r.stop_index, std::optional<size_t>(0));
}

TEST(StopStringMatcher, MultipleStopsReportWhichMatched) {
  const std::vector<std::string> stops = {"\n\nUser:", "</s>", "###"};
  EXPECT_EQ(stream(stops, {"Hi", " there<", "/s", ">x"}), (Outcome{"Hi there", 1}));
  EXPECT_EQ(stream(stops, {"a\n", "\nUs", "er:"}), (Outcome{"a", 0}));
  EXPECT_EQ(stream(stops, {"a\n", "\nUs", "e"}), (Outcome{"a\n\nUse", std::nullopt}));
}

TEST(StopStringMatcher, OverlappingStopsTheFirstToEndWins) {
  // "abc" ends at byte 3, "bcd" at byte 4: "abc" matches, however the text
  // is split.
  EXPECT_EQ(stream({"bcd", "abc"}, {"xabcd"}), (Outcome{"x", 1}));
  EXPECT_EQ(stream({"bcd", "abc"}, {"xa", "bcd"}), (Outcome{"x", 1}));
  // A stop that is a prefix of another ends first.
  EXPECT_EQ(stream({"abc", "ab"}, {"zabc"}), (Outcome{"z", 1}));
  // Two stops ending at the same byte: the longer one, so none of it shows.
  EXPECT_EQ(stream({"bc", "abc"}, {"xa", "bc"}), (Outcome{"x", 1}));
  EXPECT_EQ(stream({"abc", "bc"}, {"xabc"}), (Outcome{"x", 0}));
  // A stop overlapping itself: "aab" in "aaab".
  EXPECT_EQ(stream({"aab"}, {"a", "a", "a", "b"}), (Outcome{"a", 0}));
}

TEST(StopStringMatcher, Utf8StopsAndPieces) {
  // "é" is two bytes; pieces carry whole characters.
  EXPECT_EQ(stream({"é!"}, {"caf", "é", "!", "x"}), (Outcome{"caf", 0}));
  EXPECT_EQ(stream({"é!"}, {"caf", "é", "?"}), (Outcome{"café?", std::nullopt}));
  StopStringMatcher m({"ét"});
  EXPECT_EQ(m.feed("caf").text, "caf");
  EXPECT_EQ(m.feed("é").text, "");  // held: could become "ét"
  EXPECT_EQ(m.held_bytes(), 2u);
}

TEST(StopStringMatcher, RejectsAnEmptyStop) {
  EXPECT_THROW(StopStringMatcher({"ok", ""}), InvalidArgument);
}

TEST(StopStringMatcher, AnySplitMatchesTheByteByByteReference) {
  std::mt19937 rng(7);
  auto uniform = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  auto random_string = [&](int min_len, int max_len) {
    std::string s;
    const int n = uniform(min_len, max_len);
    for (int i = 0; i < n; ++i) s.push_back(static_cast<char>('a' + uniform(0, 2)));
    return s;
  };
  int matched = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    std::vector<std::string> stops;
    const int num_stops = uniform(1, 3);
    for (int k = 0; k < num_stops; ++k) stops.push_back(random_string(1, 4));
    const std::string text = random_string(0, 24);
    std::vector<std::string> pieces;
    for (size_t i = 0; i < text.size();) {
      const size_t n = static_cast<size_t>(uniform(0, 5));  // empty pieces too
      pieces.push_back(text.substr(i, n));
      i += n;
    }
    const Outcome expected = reference(stops, text);
    ASSERT_EQ(stream(stops, pieces), expected) << "text '" << text << "', trial " << trial;
    matched += expected.stop_index.has_value();
  }
  EXPECT_GT(matched, 1000);  // both outcomes are well represented
  EXPECT_LT(matched, 2900);
}

}  // namespace
}  // namespace tessera::serve
