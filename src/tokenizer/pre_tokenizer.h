// src/nn/pre_tokenizer.h — the regex-family word splitters (private).
//
// Each family is a hand-written matcher equal to its regex under the
// leftmost-first alternation of backtracking engines (Oniguruma, fancy-regex,
// Python's `regex`); tokenizer.h states the regexes. Pure functions;
// thread-safe.
#pragma once

#include <string_view>
#include <vector>

#include "tessera/tokenizer/tokenizer.h"

namespace tessera::nn::detail {

// Appends the words of `text` to `words`: non-empty views into `text` that
// cover it in order.
void split_words(std::string_view text, PreTokenizerKind kind,
                 std::vector<std::string_view>& words);

}  // namespace tessera::nn::detail
