#include "tessera/eval/segmenter.h"

#include <gtest/gtest.h>

#include "eval_test_util.h"
#include "tessera/core/error.h"

namespace tessera::eval {
namespace {

using Tokens = std::vector<std::string>;

TEST(YueSegmenter, LongestMatchFromTheLeft) {
  const auto seg = YueSegmenter::from_words({"我哋", "今日", "旅行", "開心", "今日去", "去咗"});
  EXPECT_EQ(seg.max_word_length(), 3u);
  // "今日去" is longer than "今日", so forward maximum matching takes it even
  // though "去咗" then cannot match — the greedy rule, not the best split.
  EXPECT_EQ(seg.segment("我哋今日去咗旅行"), (Tokens{"我哋", "今日去", "咗", "旅行"}));
  EXPECT_EQ(seg.segment("好開心！"), (Tokens{"好", "開心", "！"}));
}

TEST(YueSegmenter, NonHanRules) {
  const auto seg = YueSegmenter::from_words({"主人"});
  // ASCII letter/digit runs are one token, whitespace separates, each other
  // character (punctuation, symbols, kana) is its own token.
  EXPECT_EQ(seg.segment("從前有隻狗叫 Spot ，佢2024年好乖。"),
            (Tokens{"從", "前", "有", "隻", "狗", "叫", "Spot", "，", "佢", "2024", "年", "好",
                    "乖", "。"}));
  EXPECT_EQ(seg.segment("主人:mp3\t檔案…ok"), (Tokens{"主人", ":", "mp3", "檔", "案", "…", "ok"}));
  EXPECT_EQ(seg.segment("   "), Tokens{});
  // Extension-B characters (HKCanCor uses some) are Han too.
  EXPECT_EQ(seg.segment("𡃉喎"), (Tokens{"𡃉", "喎"}));
}

TEST(YueSegmenter, PerCharacterOption) {
  EXPECT_EQ(segment_characters("我哋去 Hong Kong 2次。"),
            (Tokens{"我", "哋", "去", "Hong", "Kong", "2", "次", "。"}));
}

TEST(YueSegmenter, ShippedLexiconSegmentsCantonese) {
  const auto seg = YueSegmenter::load(testing::lexicon_path());
  EXPECT_GT(seg.lexicon_size(), 4000u);
  // Words HKCanCor has, segmented as a Cantonese reader would.
  EXPECT_EQ(seg.segment("我哋今日去咗旅行，好開心。"),
            (Tokens{"我哋", "今日", "去", "咗", "旅行", "，", "好", "開心", "。"}));
  EXPECT_EQ(seg.segment("你老公有冇平機票啊？"),
            (Tokens{"你", "老公", "有冇", "平", "機票", "啊", "？"}));
}

TEST(YueSegmenter, LexiconErrors) {
  testing::TempDir dir;
  EXPECT_THROW(YueSegmenter::load(dir.file("absent.txt")), NotFound);
  const std::string bad = dir.write("bad.txt", "# header\n我哋\n\nok詞\n");
  try {
    YueSegmenter::load(bad);
    FAIL() << "no throw";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(e.message().find(bad + ":4: lexicon word 'ok詞' contains a non-Han character"),
              std::string::npos)
        << e.message();
  }
  EXPECT_THROW(YueSegmenter::load(dir.write("empty.txt", "# only a comment\n")), InvalidArgument);
}

}  // namespace
}  // namespace tessera::eval
