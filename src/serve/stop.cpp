#include "tessera/serve/stop.h"

#include <algorithm>
#include <utility>

#include "tessera/core/error.h"

namespace tessera::serve {

StopStringMatcher::StopStringMatcher(std::vector<std::string> stop_strings)
    : stops_(std::move(stop_strings)) {
  for (size_t i = 0; i < stops_.size(); ++i) {
    TESSERA_CHECK(!stops_[i].empty(), InvalidArgument, "stop string ", i, " is empty");
    max_stop_length_ = std::max(max_stop_length_, stops_[i].size());
  }
}

StopStringMatcher::Result StopStringMatcher::feed(std::string_view piece) {
  TESSERA_CHECK(!stopped_ && !flushed_, FailedPrecondition, "StopStringMatcher::feed: the stream ",
                stopped_ ? "already matched a stop string" : "was already flushed");
  Result result;
  if (stops_.empty()) {
    result.text.assign(piece);
    return result;
  }
  std::string text = std::move(held_);
  held_.clear();
  const size_t old_size = text.size();
  text.append(piece);
  // The held text contains no whole stop string (it would have matched), so
  // a match must end inside the new piece; the first end position wins.
  for (size_t end = old_size + 1; end <= text.size(); ++end) {
    std::optional<size_t> best;
    for (size_t k = 0; k < stops_.size(); ++k) {
      const std::string& s = stops_[k];
      if (s.size() > end || text.compare(end - s.size(), s.size(), s) != 0) continue;
      if (!best || s.size() > stops_[*best].size()) best = k;
    }
    if (best) {
      text.resize(end - stops_[*best].size());
      result.text = std::move(text);
      result.stop_index = best;
      stopped_ = true;
      return result;
    }
  }
  // Hold the longest suffix that is a proper prefix of some stop string; a
  // future match can only start inside it.
  size_t hold = 0;
  for (size_t k = std::min(text.size(), max_stop_length_ - 1); k > 0 && hold == 0; --k) {
    const std::string_view suffix(text.data() + text.size() - k, k);
    for (const std::string& s : stops_) {
      if (s.size() > k && s.compare(0, k, suffix) == 0) {
        hold = k;
        break;
      }
    }
  }
  held_.assign(text, text.size() - hold, hold);
  text.resize(text.size() - hold);
  result.text = std::move(text);
  return result;
}

std::string StopStringMatcher::flush() {
  flushed_ = true;
  std::string out = std::move(held_);
  held_.clear();
  return out;
}

}  // namespace tessera::serve
