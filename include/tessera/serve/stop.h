// tessera/serve/stop.h — stop strings over streamed text.
//
// Generation with OpenAI's `stop` parameter ends as soon as the generated text
// contains one of the stop strings, and the text returned stops just before
// it. Text arrives one detokenized piece per token, and a stop string can
// span pieces ("<|e" + "nd|>"), so text that might be the start of a stop
// string is held back until the next piece decides it:
//
//   tessera::serve::StopStringMatcher stops({"\n\nUser:", "###"});
//   for (each sampled token) {
//     auto r = stops.feed(detokenize(token));
//     send(r.text);                         // safe to show now; may be empty
//     if (r.stop_index) { finish(kStop); break; }   // r.text ends before the stop
//   }
//   // Generation ended another way (EOS, length): release the held text.
//   send(stops.flush());
//
// Matching rule (independent of how the text is split into pieces): the
// text is cut at the first byte position where it ends with a stop string;
// when several stop strings end there, the longest one (the earliest start)
// is the match, so no byte of it is emitted. Matching is bytewise; with whole
// UTF-8 pieces and UTF-8 stop strings, emitted text is whole UTF-8.
//
// Thread-safety: a value type, not thread-safe; one per generated sequence.
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace tessera::serve {

class StopStringMatcher {
 public:
  // No stop strings: feed() passes text straight through. InvalidArgument:
  // an empty stop string (it would match before any text).
  explicit StopStringMatcher(std::vector<std::string> stop_strings = {});

  struct Result {
    // Text to emit now: everything that can no longer be part of a stop
    // string, up to the match when there is one.
    std::string text;
    // Index into stop_strings() of the match; set once, on the feed that
    // completed it. The matched string and anything after it are dropped.
    std::optional<size_t> stop_index;
  };

  // Adds the next piece of generated text. FailedPrecondition after a stop
  // string has matched or after flush().
  Result feed(std::string_view piece);

  // Ends the stream without a match: returns the held-back text (the prefix
  // of a stop string that never completed). Empty after a match. Further
  // feed() calls are refused; flush() again returns "".
  std::string flush();

  bool stopped() const { return stopped_; }
  // Bytes held back so far (at most the longest stop string's length - 1).
  size_t held_bytes() const { return held_.size(); }
  const std::vector<std::string>& stop_strings() const { return stops_; }

 private:
  std::vector<std::string> stops_;
  size_t max_stop_length_ = 0;
  std::string held_;
  bool stopped_ = false;
  bool flushed_ = false;
};

}  // namespace tessera::serve
